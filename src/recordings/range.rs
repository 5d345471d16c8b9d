//! HTTP byte ranges (RFC 9110 §14) against an object of known size. Pure.

/// What to send for a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// The whole object, 200 (no header, one we ignore, or several ranges:
    /// a server may answer a multi-range request with the whole object).
    Full,
    /// Bytes `start..=end`, 206.
    Partial { start: u64, end: u64 },
    /// 416: no byte of the range is in the object.
    Unsatisfiable,
}

impl ByteRange {
    /// Reads `header` (the `Range` value, if any) for an object of `size`
    /// bytes. A header that does not parse is ignored, as the RFC says.
    pub fn parse(header: Option<&str>, size: u64) -> Self {
        let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
            return Self::Full;
        };
        if spec.contains(',') {
            return Self::Full;
        }
        let Some((first, last)) = spec.trim().split_once('-') else {
            return Self::Full;
        };
        let number = |text: &str| -> Option<u64> {
            let text = text.trim();
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            text.parse().ok()
        };
        match (first.trim().is_empty(), last.trim().is_empty()) {
            // `bytes=-N`: the last N bytes.
            (true, false) => {
                let Some(suffix) = number(last) else {
                    return Self::Full;
                };
                if suffix == 0 || size == 0 {
                    return Self::Unsatisfiable;
                }
                Self::Partial {
                    start: size.saturating_sub(suffix),
                    end: size - 1,
                }
            }
            // `bytes=A-` or `bytes=A-B`.
            (false, open_ended) => {
                let Some(start) = number(first) else {
                    return Self::Full;
                };
                let end = if open_ended {
                    u64::MAX
                } else {
                    match number(last) {
                        Some(end) if end >= start => end,
                        _ => return Self::Full,
                    }
                };
                if start >= size {
                    return Self::Unsatisfiable;
                }
                Self::Partial {
                    start,
                    end: end.min(size - 1),
                }
            }
            (true, true) => Self::Full,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(header: &str, size: u64) -> ByteRange {
        ByteRange::parse(Some(header), size)
    }

    #[test]
    fn ranges_resolve_against_the_size() {
        use ByteRange::*;
        assert_eq!(ByteRange::parse(None, 10), Full);
        assert_eq!(parse("bytes=0-99", 1000), Partial { start: 0, end: 99 });
        assert_eq!(parse("bytes=0-99", 50), Partial { start: 0, end: 49 });
        assert_eq!(parse("bytes=10-", 50), Partial { start: 10, end: 49 });
        assert_eq!(parse("bytes=-10", 50), Partial { start: 40, end: 49 });
        assert_eq!(parse("bytes=-100", 50), Partial { start: 0, end: 49 });
        assert_eq!(parse("bytes=49-49", 50), Partial { start: 49, end: 49 });
        assert_eq!(parse("bytes=50-", 50), Unsatisfiable);
        assert_eq!(parse("bytes=50-60", 50), Unsatisfiable);
        assert_eq!(parse("bytes=-0", 50), Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse("bytes=-5", 0), Unsatisfiable);
    }

    #[test]
    fn headers_that_do_not_parse_are_ignored() {
        for header in [
            "bytes=5-2",
            "bytes=a-b",
            "bytes=-",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=1",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(parse(header, 50), ByteRange::Full, "{header}");
        }
    }
}
