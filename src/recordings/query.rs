//! `GET /v1/recordings`: its query parameters, the opaque cursor, and the
//! page they select from the index. Pure: the time to compare with is in
//! the sessions, nothing reads a clock.
//!
//! Parameters (anything else is refused, so a typo is not a silent no-op):
//! - `limit`: 1 to 500, default 50;
//! - `cursor`: the `next_cursor` of the previous page;
//! - `since`, `until`: the session started at or after `since` and before
//!   `until`, each an RFC 3339 timestamp (`2026-05-01T12:00:00Z`) or whole
//!   unix seconds (`1777636800`);
//! - `meta.<key>=<value>`, any number: the session's metadata has `key`
//!   with that value (a string equal to it, or a number or boolean whose
//!   JSON text is it); all must hold;
//! - `token`: the credential, as on every route (not a filter).

use base64::Engine as _;
use serde_json::{Map, Value};

use super::catalog::Session;

pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("limit must be a whole number from 1 to {MAX_LIMIT}, not '{0}'")]
    Limit(String),
    #[error("cursor is not one this server gave out (use next_cursor as it is)")]
    Cursor,
    #[error("{name} must be an RFC 3339 timestamp (2026-05-01T12:00:00Z) or unix seconds, not '{value}'")]
    Time { name: &'static str, value: String },
    #[error("a metadata filter names its key: meta.<key>=<value>")]
    EmptyKey,
    #[error("unknown parameter '{0}': expected limit, cursor, since, until, meta.<key> or token")]
    Unknown(String),
    #[error("'{0}' is given twice")]
    Repeated(&'static str),
}

/// Where the previous page ended, in the list's order (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub started_ms: u64,
    pub session_id: String,
}

impl Cursor {
    /// Opaque to clients: base64url of `<started_ms>.<session_id>`.
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}.{}", self.started_ms, self.session_id))
    }

    pub fn decode(text: &str) -> Result<Self, QueryError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| QueryError::Cursor)?;
        let text = String::from_utf8(bytes).map_err(|_| QueryError::Cursor)?;
        let (started, id) = text.split_once('.').ok_or(QueryError::Cursor)?;
        if !super::names::is_session_id(id) || !started.bytes().all(|b| b.is_ascii_digit()) {
            return Err(QueryError::Cursor);
        }
        Ok(Self {
            started_ms: started.parse().map_err(|_| QueryError::Cursor)?,
            session_id: id.to_owned(),
        })
    }

    /// True if `session` comes after this cursor in the list's order.
    fn precedes(&self, session: &Session) -> bool {
        (session.started_ms, session.session_id.as_str())
            < (self.started_ms, self.session_id.as_str())
    }
}

/// A parsed `GET /v1/recordings` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: usize,
    pub cursor: Option<Cursor>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<u64>,
    /// Unix milliseconds, exclusive.
    pub until_ms: Option<u64>,
    pub metadata: Vec<(String, String)>,
}

impl Default for ListQuery {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            cursor: None,
            since_ms: None,
            until_ms: None,
            metadata: Vec::new(),
        }
    }
}

/// A time parameter in unix milliseconds.
pub fn parse_time(name: &'static str, value: &str) -> Result<u64, QueryError> {
    let bad = || QueryError::Time {
        name,
        value: value.to_owned(),
    };
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse::<u64>()
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .ok_or_else(bad);
    }
    let time = humantime::parse_rfc3339_weak(value).map_err(|_| bad())?;
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad())?;
    u64::try_from(since_epoch.as_millis()).map_err(|_| bad())
}

impl ListQuery {
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, QueryError> {
        let mut query = Self::default();
        let seen = |name: &'static str, set: bool| {
            if set {
                Err(QueryError::Repeated(name))
            } else {
                Ok(())
            }
        };
        let mut limit_set = false;
        for (key, value) in pairs {
            match key.as_str() {
                "token" => {}
                "limit" => {
                    seen("limit", limit_set)?;
                    limit_set = true;
                    query.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| QueryError::Limit(value.clone()))?;
                }
                "cursor" => {
                    seen("cursor", query.cursor.is_some())?;
                    query.cursor = Some(Cursor::decode(value)?);
                }
                "since" => {
                    seen("since", query.since_ms.is_some())?;
                    query.since_ms = Some(parse_time("since", value)?);
                }
                "until" => {
                    seen("until", query.until_ms.is_some())?;
                    query.until_ms = Some(parse_time("until", value)?);
                }
                other => match other.strip_prefix("meta.") {
                    Some("") => return Err(QueryError::EmptyKey),
                    Some(meta_key) => query.metadata.push((meta_key.to_owned(), value.clone())),
                    None => return Err(QueryError::Unknown(other.to_owned())),
                },
            }
        }
        Ok(query)
    }

    /// Whether `session` passes the time and metadata filters.
    pub fn matches(&self, session: &Session) -> bool {
        self.since_ms
            .is_none_or(|since| session.started_ms >= since)
            && self.until_ms.is_none_or(|until| session.started_ms < until)
            && self
                .metadata
                .iter()
                .all(|(key, value)| metadata_has(&session.metadata, key, value))
    }

    /// The page this query selects from `sessions` (newest first), and the
    /// cursor of the next page if there is one.
    pub fn page<'a>(&self, sessions: &'a [Session]) -> (Vec<&'a Session>, Option<String>) {
        let mut matching = sessions
            .iter()
            .filter(|s| self.cursor.as_ref().is_none_or(|c| c.precedes(s)))
            .filter(|s| self.matches(s));
        let page: Vec<&Session> = matching.by_ref().take(self.limit).collect();
        let next = match (matching.next(), page.last()) {
            (Some(_), Some(last)) => Some(
                Cursor {
                    started_ms: last.started_ms,
                    session_id: last.session_id.clone(),
                }
                .encode(),
            ),
            _ => None,
        };
        (page, next)
    }
}

fn metadata_has(metadata: &Map<String, Value>, key: &str, wanted: &str) -> bool {
    match metadata.get(key) {
        Some(Value::String(text)) => text == wanted,
        Some(value @ (Value::Number(_) | Value::Bool(_))) => {
            serde_json::to_string(value).is_ok_and(|text| text == wanted)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn session(n: u64, started_ms: u64, metadata: Value) -> Session {
        Session {
            session_id: format!("01a1fe8b-654d-72fd-99f9-{n:012x}"),
            started_ms,
            started_at: String::new(),
            ended_at: None,
            metadata: metadata.as_object().cloned().unwrap_or_default(),
            files: Vec::new(),
            transcript: None,
        }
    }

    #[test]
    fn parameters_parse_with_defaults_and_limits() {
        let query = ListQuery::parse(&pairs(&[("token", "k")])).unwrap();
        assert_eq!(query, ListQuery::default());
        let query = ListQuery::parse(&pairs(&[
            ("limit", "500"),
            ("since", "2026-05-01T12:00:00Z"),
            ("until", "1777640400"),
            ("meta.agent", "ada"),
            ("meta.queue", "7"),
        ]))
        .unwrap();
        assert_eq!(query.limit, 500);
        assert_eq!(query.since_ms, Some(1_777_636_800_000));
        assert_eq!(query.until_ms, Some(1_777_640_400_000));
        assert_eq!(
            query.metadata,
            [("agent".into(), "ada".into()), ("queue".into(), "7".into())]
        );
        for (bad, error) in [
            (("limit", "0"), QueryError::Limit("0".into())),
            (("limit", "501"), QueryError::Limit("501".into())),
            (("limit", "-1"), QueryError::Limit("-1".into())),
            (("cursor", "!!"), QueryError::Cursor),
            (("cursor", "bm90IGEgY3Vyc29y"), QueryError::Cursor),
            (
                ("since", "yesterday"),
                QueryError::Time {
                    name: "since",
                    value: "yesterday".into(),
                },
            ),
            (
                ("until", "99999999999999999999"),
                QueryError::Time {
                    name: "until",
                    value: "99999999999999999999".into(),
                },
            ),
            (("meta.", "x"), QueryError::EmptyKey),
            (("sort", "asc"), QueryError::Unknown("sort".into())),
        ] {
            assert_eq!(ListQuery::parse(&pairs(&[bad])), Err(error), "{bad:?}");
        }
        assert_eq!(
            ListQuery::parse(&pairs(&[("limit", "1"), ("limit", "2")])),
            Err(QueryError::Repeated("limit"))
        );
    }

    #[test]
    fn cursors_round_trip_and_are_opaque() {
        let cursor = Cursor {
            started_ms: 1_777_636_800_123,
            session_id: "01a1fe8b-654d-72fd-99f9-7c0fa87dd94a".into(),
        };
        let text = cursor.encode();
        assert!(!text.contains('.') && !text.contains(&cursor.session_id));
        assert_eq!(Cursor::decode(&text), Ok(cursor));
    }

    #[test]
    fn pages_follow_each_other_without_gaps_or_repeats() {
        // Newest first; two sessions share a start time (the id breaks the tie).
        let sessions = vec![
            session(5, 5_000, json!({})),
            session(4, 4_000, json!({})),
            session(3, 3_000, json!({})),
            session(2, 3_000, json!({})),
            session(1, 1_000, json!({})),
        ];
        let mut query = ListQuery {
            limit: 2,
            ..ListQuery::default()
        };
        let mut seen = Vec::new();
        loop {
            let (page, next) = query.page(&sessions);
            seen.extend(page.iter().map(|s| s.started_ms));
            match next {
                Some(cursor) => query.cursor = Some(Cursor::decode(&cursor).unwrap()),
                None => break,
            }
        }
        assert_eq!(seen, [5_000, 4_000, 3_000, 3_000, 1_000]);
        // A last page exactly full has no next cursor.
        let query = ListQuery {
            limit: 5,
            ..ListQuery::default()
        };
        assert_eq!(query.page(&sessions).1, None);
    }

    #[test]
    fn filters_select_by_time_and_metadata() {
        let sessions = vec![
            session(3, 3_000, json!({"agent": "ada", "queue": 7, "vip": true})),
            session(2, 2_000, json!({"agent": "bob", "queue": 7})),
            session(1, 1_000, json!({"agent": "ada", "nested": {"a": 1}})),
        ];
        let ids = |query: ListQuery| -> Vec<u64> {
            query
                .page(&sessions)
                .0
                .iter()
                .map(|s| s.started_ms)
                .collect()
        };
        let since_until = ListQuery {
            since_ms: Some(2_000),
            until_ms: Some(3_000),
            ..ListQuery::default()
        };
        assert_eq!(ids(since_until), [2_000]);
        let meta = |pairs: &[(&str, &str)]| ListQuery {
            metadata: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..ListQuery::default()
        };
        assert_eq!(ids(meta(&[("agent", "ada")])), [3_000, 1_000]);
        assert_eq!(ids(meta(&[("agent", "ada"), ("queue", "7")])), [3_000]);
        assert_eq!(ids(meta(&[("vip", "true")])), [3_000]);
        assert_eq!(ids(meta(&[("agent", "eve")])), Vec::<u64>::new());
        assert_eq!(ids(meta(&[("nested", "{\"a\":1}")])), Vec::<u64>::new());
    }
}
