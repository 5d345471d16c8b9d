//! The open-files limit (RLIMIT_NOFILE).
//!
//! A recorded session holds two descriptors (the socket and the WAV file;
//! the sidecar is opened only to be rewritten), and the other side of a
//! loopback benchmark one per stream, so a thousand streams need over 2,000,
//! above the common soft limit of 1,024. The hard limit is what an
//! unprivileged process may raise its soft limit to; both `serve` and
//! `loadgen` do so at startup.

/// The limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    #[error("getrlimit(RLIMIT_NOFILE): {0}")]
    Get(std::io::Error),
    #[error("setrlimit(RLIMIT_NOFILE) to {wanted}: {source}")]
    Set { wanted: u64, source: std::io::Error },
    #[error("open-files limits are not supported on this platform")]
    Unsupported,
}

/// Raises the soft open-files limit to the hard limit.
#[cfg(unix)]
// `rlim_t` is u64 on Linux, not on every unix: the conversions stay.
#[allow(clippy::useless_conversion)]
pub fn raise_nofile_limit() -> Result<NofileLimit, RlimitError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid, exclusive pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(RlimitError::Get(std::io::Error::last_os_error()));
    }
    let soft_before = u64::from(limit.rlim_cur);
    let hard = u64::from(limit.rlim_max);
    // An unlimited hard limit is not a value the kernel takes for the soft
    // one (Linux caps descriptors at fs.nr_open, 1,048,576 by default).
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        NR_OPEN_DEFAULT.min(limit.rlim_max)
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur >= target {
        return Ok(NofileLimit {
            soft_before,
            soft: soft_before,
            hard,
        });
    }
    let wanted = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the `rlimit` behind a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        return Err(RlimitError::Set {
            wanted: u64::from(target),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(NofileLimit {
        soft_before,
        soft: u64::from(target),
        hard,
    })
}

#[cfg(unix)]
const NR_OPEN_DEFAULT: libc::rlim_t = 1 << 20;

#[cfg(not(unix))]
pub fn raise_nofile_limit() -> Result<NofileLimit, RlimitError> {
    Err(RlimitError::Unsupported)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::useless_conversion)]
    fn soft_limit_ends_at_the_hard_limit() {
        let limit = raise_nofile_limit().unwrap();
        assert!(limit.soft_before <= limit.soft);
        assert!(limit.soft == limit.hard || limit.hard == u64::from(libc::RLIM_INFINITY));
        // Raising again changes nothing.
        assert_eq!(raise_nofile_limit().unwrap().soft_before, limit.hard);
    }
}
