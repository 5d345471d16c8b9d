//! Retention: recordings older than `recordings.retention_days` (counted
//! from their start) are deleted, audio, sidecars and transcript alike.
//!
//! The sweep costs nothing while there is nothing to do: it sleeps until the
//! oldest recording in the index expires. A recording made later expires
//! later still (no sooner than `now + retention`), so nothing new can need
//! an earlier wake-up. Sleeps are capped at [`MAX_SLEEP`] so that a wall
//! clock set forward, or recordings another server put in a shared bucket,
//! are noticed within the hour; that is one listing an hour.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::catalog::{Catalog, Session, REFRESH_INTERVAL};

/// Longest sleep between sweeps.
pub const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// A session past its retention but still recording is looked at again
/// after this long (it cannot be deleted while it records).
pub const RECHECK_IN_PROGRESS: Duration = Duration::from_secs(60);

/// What one sweep does, decided from the index and the time. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Sessions to delete now.
    pub expired: Vec<String>,
    /// When to look again, in unix milliseconds.
    pub wake_at_ms: u64,
}

/// Sessions started at or before `now_ms - retention_ms` expire.
pub fn plan(sessions: &[Session], now_ms: u64, retention_ms: u64) -> Plan {
    let mut expired = Vec::new();
    // Nothing recorded from now on expires before now + retention.
    let mut wake_at_ms = now_ms.saturating_add(retention_ms);
    for session in sessions {
        let expires_at = session.started_ms.saturating_add(retention_ms);
        if expires_at > now_ms {
            wake_at_ms = wake_at_ms.min(expires_at);
        } else if session.in_progress() {
            let recheck = now_ms.saturating_add(RECHECK_IN_PROGRESS.as_millis() as u64);
            wake_at_ms = wake_at_ms.min(recheck);
        } else {
            expired.push(session.session_id.clone());
        }
    }
    Plan {
        expired,
        wake_at_ms,
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The sweep task: runs for the life of the server.
pub async fn run(catalog: Arc<Catalog>, retention: Duration) {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    loop {
        let now_ms = unix_ms(SystemTime::now());
        let sleep = match catalog.index(REFRESH_INTERVAL).await {
            Ok(index) => {
                let plan = plan(&index.sessions, now_ms, retention_ms);
                for session_id in &plan.expired {
                    match catalog.delete(session_id).await {
                        Ok(deleted) => tracing::info!(
                            session_id,
                            files = deleted.len(),
                            "retention: recording deleted"
                        ),
                        Err(error) => {
                            tracing::warn!(session_id, %error, "retention: cannot delete")
                        }
                    }
                }
                Duration::from_millis(plan.wake_at_ms.saturating_sub(now_ms))
            }
            Err(error) => {
                tracing::warn!(%error, "retention: cannot list recordings");
                RECHECK_IN_PROGRESS
            }
        };
        // At least the listing interval: a failed delete is not retried in
        // a tight loop.
        tokio::time::sleep(sleep.clamp(REFRESH_INTERVAL, MAX_SLEEP)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recordings::catalog::FileSummary;

    const DAY_MS: u64 = 86_400_000;

    fn session(n: u64, started_ms: u64, in_progress: bool) -> Session {
        Session {
            session_id: format!("s{n}"),
            started_ms,
            started_at: String::new(),
            ended_at: None,
            metadata: Default::default(),
            files: vec![FileSummary {
                name: String::new(),
                sidecar: String::new(),
                content_type: "audio/wav",
                bytes: None,
                complete: !in_progress,
                in_progress,
                channel: None,
                channels: None,
                sample_rate: None,
                duration_seconds: None,
                error: None,
                ended_at: None,
            }],
            transcript: None,
        }
    }

    #[test]
    fn nothing_to_do_sleeps_a_whole_retention_period() {
        let now = 100 * DAY_MS;
        let plan = plan(&[], now, DAY_MS);
        assert_eq!(plan.expired, Vec::<String>::new());
        assert_eq!(plan.wake_at_ms, now + DAY_MS);
    }

    #[test]
    fn old_recordings_expire_and_the_oldest_kept_one_sets_the_wake_up() {
        let now = 100 * DAY_MS;
        let sessions = [
            session(1, now - 1_000, false),
            session(2, now - DAY_MS + 5_000, false),
            session(3, now - DAY_MS, false),
            session(4, now - 2 * DAY_MS, false),
        ];
        let plan = plan(&sessions, now, DAY_MS);
        assert_eq!(plan.expired, ["s3", "s4"]);
        assert_eq!(plan.wake_at_ms, now + 5_000);
    }

    #[test]
    fn a_session_still_recording_is_looked_at_again_later() {
        let now = 100 * DAY_MS;
        let plan = plan(&[session(1, now - 3 * DAY_MS, true)], now, DAY_MS);
        assert!(plan.expired.is_empty());
        assert_eq!(
            plan.wake_at_ms,
            now + RECHECK_IN_PROGRESS.as_millis() as u64
        );
    }
}
