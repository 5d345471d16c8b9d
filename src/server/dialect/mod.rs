//! Other systems' WebSocket protocols on the same session pipeline.
//!
//! A dialect sits between the socket and a [`super::session`]: it turns the
//! platform's messages into the session's own inputs ([`Inbound`]: a start
//! request, audio in the session's framing, keepalive, flush, stop, events)
//! and renders the session's [`ServerMessage`]s into the platform's shapes,
//! or drops them where the platform has no use for them. Everything after
//! that (decoding, gap filling, jitter, resampling, recording, transcription,
//! limits, idle timeout) is the native session's, unchanged.
//!
//! | endpoint     | module        | public reference |
//! |--------------|---------------|------------------|
//! | `/twilio`    | [`twilio`]    | Twilio Media Streams WebSocket messages |
//! | `/vonage`    | [`vonage`]    | Vonage Voice API WebSockets |
//! | `/audiofork` | [`audiofork`] | FreeSWITCH mod_audio_fork (drachtio) |
//! | `/v1/listen` | [`deepgram`]  | Deepgram live streaming (`/v1/listen`) |
//!
//! The wire contract of each is in `proto/dialects/<name>.md`.

pub mod audiofork;
pub mod deepgram;
pub mod native;
pub mod twilio;
pub mod vonage;

use std::sync::Arc;

use actix_web::web::Bytes;
use serde_json::{Map, Value};

use super::auth::{Auth, AuthError};
use super::registry::{KeyGuard, Refusal, SessionRegistry};
use crate::protocol::{ProtocolError, ServerMessage, StartRequest};

/// Which protocol an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialectKind {
    /// cochlea's own protocol (`/v1/stream`).
    Native,
    Twilio,
    Vonage,
    AudioFork,
    Deepgram,
}

impl DialectKind {
    pub fn name(self) -> &'static str {
        match self {
            DialectKind::Native => "native",
            DialectKind::Twilio => "twilio",
            DialectKind::Vonage => "vonage",
            DialectKind::AudioFork => "audiofork",
            DialectKind::Deepgram => "deepgram",
        }
    }

    /// Sec-WebSocket-Protocol values the server selects when offered.
    pub fn subprotocols(self) -> &'static [&'static str] {
        match self {
            // mod_audio_fork's default, and its name before version 0.2.
            DialectKind::AudioFork => &[audiofork::SUBPROTOCOL, "audiostream.drachtio.org"],
            // Browsers send `token, <key>`: the server must select `token`.
            DialectKind::Deepgram => &["token", "bearer"],
            DialectKind::Native => &[super::auth::SUBPROTOCOL],
            DialectKind::Twilio | DialectKind::Vonage => &[],
        }
    }
}

/// What a dialect hands to the session, in order.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// Start the stream (as a native `start`); `max_session_ms` is the cap of
    /// a credential that arrived only now.
    Start {
        request: StartRequest,
        max_session_ms: Option<u64>,
    },
    /// One binary message in the stream's own framing.
    Audio(Bytes),
    Keepalive,
    Flush,
    Stop,
    /// A new SDP offer for a `transport: webrtc` session (an ICE restart).
    WebrtcOffer(String),
    /// A text frame to send back as is (an answer the protocol requires).
    Reply(String),
    /// Something the platform reported (DTMF, a mark, extra metadata): kept
    /// in the log and counted; it also counts as activity.
    Event {
        name: &'static str,
        detail: String,
    },
}

/// Everything a dialect client can get wrong beyond the native protocol.
#[derive(Debug, thiserror::Error)]
pub enum DialectError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{dialect} sends audio inside JSON text messages; a binary message is not part of its protocol")]
    BinaryNotAllowed { dialect: &'static str },
    #[error("{dialect}: unsupported media format '{found}'; expected {expected}")]
    UnsupportedMediaFormat {
        dialect: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{dialect}: media payload is not valid base64: {detail}")]
    InvalidPayload {
        dialect: &'static str,
        detail: String,
    },
    #[error(
        "{dialect}: media for track '{track}', which start did not announce (tracks: {announced})"
    )]
    UnknownTrack {
        dialect: &'static str,
        track: String,
        announced: String,
    },
    #[error("{dialect}: unknown message type '{found}'; expected {expected}")]
    UnknownMessageType {
        dialect: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Auth(AuthError),
    #[error("this API key already has {max_sessions_per_key} concurrent sessions; retry later")]
    KeyFull { max_sessions_per_key: usize },
}

/// A session's view of another protocol.
pub trait Dialect: Send {
    fn kind(&self) -> DialectKind;

    /// One complete inbound text message.
    fn on_text(&mut self, text: &str, out: &mut Vec<Inbound>) -> Result<(), DialectError>;

    /// One complete inbound binary message.
    fn on_binary(&mut self, data: &Bytes, out: &mut Vec<Inbound>) -> Result<(), DialectError>;

    /// The stream is ending (stop, error or the client gone): audio the
    /// dialect still holds.
    fn finish(&mut self, _out: &mut Vec<Inbound>) {}

    /// Zero or more text frames for one session message.
    fn render(&mut self, message: &ServerMessage, out: &mut Vec<String>);

    /// Whether a dropped connection may resume the session (`framing=seq`).
    fn resumable(&self) -> bool {
        false
    }
}

/// A credential that must come after the upgrade (Twilio strips query
/// strings and sets no headers: the key rides in a `<Parameter>`).
pub struct DeferredAuth {
    pub auth: Arc<Auth>,
    pub registry: Arc<SessionRegistry>,
}

impl DeferredAuth {
    /// Checks the credential and counts the session against its key.
    fn admit(&self, presented: Option<&str>) -> Result<(Option<u64>, KeyGuard), DialectError> {
        let principal = self
            .auth
            .check(presented, std::time::SystemTime::now())
            .map_err(DialectError::Auth)?
            .ok_or(DialectError::Auth(AuthError::Missing))?;
        let guard =
            self.registry
                .admit_key(&principal.key_id)
                .map_err(|refusal| match refusal {
                    Refusal::KeyFull | Refusal::ServerFull => DialectError::KeyFull {
                        max_sessions_per_key: self.registry.max_per_key(),
                    },
                })?;
        Ok((principal.max_session_ms, guard))
    }
}

/// A dialect endpoint's request, read from its query string.
pub struct Prepared {
    pub dialect: Box<dyn Dialect>,
    /// The stream parameters for the session (format, sinks, transcribe);
    /// an error here ends the session at once, as a native query error does.
    pub query: Result<StartRequest, ProtocolError>,
}

/// Reads a dialect endpoint's query (the `token` credential already taken
/// out) and builds its dialect.
pub fn prepare(
    kind: DialectKind,
    session_id: &str,
    pairs: &[(String, String)],
    deferred_auth: Option<DeferredAuth>,
) -> Prepared {
    match kind {
        DialectKind::Native => Prepared {
            dialect: Box::new(native::Native),
            query: StartRequest::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        },
        DialectKind::Twilio => twilio::prepare(session_id, pairs, deferred_auth),
        DialectKind::Vonage => vonage::prepare(pairs),
        DialectKind::AudioFork => audiofork::prepare(session_id, pairs),
        DialectKind::Deepgram => deepgram::prepare(session_id, pairs),
    }
}

/// The credential of a dialect request, from what that platform can send:
/// the native forms (`Authorization: Bearer`, `?token=`, a `token.<value>`
/// subprotocol), plus Deepgram's `Authorization: Token <key>` and
/// `Sec-WebSocket-Protocol: token, <key>`, and HTTP Basic (mod_audio_fork's
/// `MOD_AUDIO_BASIC_AUTH_*`; the password is the credential).
pub fn presented_credential(
    kind: DialectKind,
    authorization: Option<&str>,
    query_token: Option<&str>,
    subprotocols: Option<&str>,
) -> Option<String> {
    if let Some(native) = super::auth::presented_credential(authorization, query_token, None) {
        return Some(native.to_owned());
    }
    if let Some(header) = authorization.map(str::trim) {
        let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("token") && !value.is_empty() {
            return Some(value.to_owned());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok());
            if let Some((_, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
                return Some(password.to_owned());
            }
        }
    }
    let entries: Vec<&str> = subprotocols?.split(',').map(str::trim).collect();
    if let Some(native) = entries
        .iter()
        .find_map(|p| p.strip_prefix(super::auth::PROTOCOL_TOKEN_PREFIX))
    {
        return Some(native.to_owned());
    }
    if kind == DialectKind::Deepgram {
        // Deepgram's browser form: the scheme, then the credential.
        let at = entries
            .iter()
            .position(|p| p.eq_ignore_ascii_case("token") || p.eq_ignore_ascii_case("bearer"))?;
        return entries
            .get(at + 1)
            .filter(|v| !v.is_empty())
            .map(|v| (*v).to_owned());
    }
    None
}

/// Where a platform-supplied key is passed as a native stream parameter.
/// Only these may be set from a dialect's query or custom parameters.
const STREAM_PARAMETERS: [&str; 2] = ["transcribe", "sinks"];

/// Builds a start request from fixed format pairs plus the caller's
/// `transcribe`/`sinks` choices (checked by the native parser).
fn start_request(
    format: &[(&str, String)],
    chosen: &[(String, String)],
    metadata: Map<String, Value>,
) -> Result<StartRequest, ProtocolError> {
    let pairs = format
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(chosen.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut request = StartRequest::from_query(pairs)?;
    request.metadata = metadata;
    Ok(request)
}

/// The start of a dialect whose binary messages are raw 16-bit
/// little-endian PCM (Vonage, mod_audio_fork).
fn l16_start(
    sample_rate_hz: u32,
    channels: u16,
    chosen: &[(String, String)],
    metadata: Map<String, Value>,
) -> Result<Inbound, ProtocolError> {
    let request = start_request(
        &[
            ("encoding", "pcm_s16le".into()),
            ("sample_rate", sample_rate_hz.to_string()),
            ("channels", channels.to_string()),
            ("framing", "raw".into()),
        ],
        chosen,
        metadata,
    )?;
    Ok(Inbound::Start {
        request,
        max_session_ms: None,
    })
}

/// Splits a dialect query into the native stream parameters it may carry
/// and an error for anything else.
fn only_stream_parameters(
    dialect: &'static str,
    pairs: &[(String, String)],
) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut chosen = Vec::new();
    for (key, value) in pairs {
        if STREAM_PARAMETERS.contains(&key.as_str()) {
            chosen.push((key.clone(), value.clone()));
        } else {
            tracing::debug!(dialect, key, "unknown query parameter");
            return Err(ProtocolError::UnknownParameter(key.clone()));
        }
    }
    Ok(chosen)
}

/// Parses a JSON text message into an object.
fn json_object(dialect: &'static str, text: &str) -> Result<Map<String, Value>, ProtocolError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ProtocolError::InvalidMessage(format!(
            "{dialect} message is not a JSON object"
        ))),
        Err(e) => Err(ProtocolError::MalformedJson(e.to_string())),
    }
}

/// A numeric field that the platform sends as a JSON string (`"40"`), or
/// as a number.
fn number_field(
    dialect: &'static str,
    object: &Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Option<u64>, ProtocolError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => text.trim().parse::<u64>().map(Some).map_err(|_| {
            ProtocolError::InvalidMessage(format!(
                "{dialect} {path}.{key} must be a non-negative integer, not '{}'",
                text.chars().take(32).collect::<String>()
            ))
        }),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ProtocolError::InvalidMessage(format!(
                "{dialect} {path}.{key} must be a non-negative integer, not {n}"
            ))
        }),
        Some(other) => Err(ProtocolError::InvalidMessage(format!(
            "{dialect} {path}.{key} must be an integer (as a string), not {}",
            kind_of(other)
        ))),
    }
}

fn string_field<'a>(
    dialect: &'static str,
    object: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Option<&'a str>, ProtocolError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(ProtocolError::InvalidMessage(format!(
            "{dialect} {path}.{key} must be a string, not {}",
            kind_of(other)
        ))),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most `limit` characters of client text, for logs and events.
fn excerpt(text: &str, limit: usize) -> String {
    let mut out: String = text.chars().take(limit).collect();
    if text.chars().nth(limit).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_every_form_a_platform_can_send() {
        use DialectKind::*;
        let basic = {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("fs:k-one")
            )
        };
        // (dialect, Authorization, ?token=, Sec-WebSocket-Protocol, expected)
        type Case<'a> = (
            DialectKind,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: [Case; 8] = [
            (Deepgram, Some("Token k-one"), None, None, Some("k-one")),
            (Deepgram, Some("token  k-one "), None, None, Some("k-one")),
            (
                Deepgram,
                Some("Bearer ct1.x.y"),
                None,
                None,
                Some("ct1.x.y"),
            ),
            (Deepgram, None, None, Some("token, k-one"), Some("k-one")),
            (Vonage, None, None, Some("token, k-one"), None),
            (AudioFork, Some(&basic), None, None, Some("k-one")),
            (Twilio, None, Some("q"), None, Some("q")),
            (
                Vonage,
                None,
                None,
                Some("cochlea.v1, token.k-two"),
                Some("k-two"),
            ),
        ];
        for (kind, authorization, query, protocols, expected) in cases {
            assert_eq!(
                presented_credential(kind, authorization, query, protocols).as_deref(),
                expected,
                "{kind:?} {authorization:?} {query:?} {protocols:?}"
            );
        }
    }

    #[test]
    fn numbers_as_strings() {
        let object = json_object("twilio", r#"{"a":"40","b":7,"c":"x","d":-1,"e":true}"#).unwrap();
        assert_eq!(number_field("twilio", &object, "m", "a"), Ok(Some(40)));
        assert_eq!(number_field("twilio", &object, "m", "b"), Ok(Some(7)));
        assert_eq!(number_field("twilio", &object, "m", "z"), Ok(None));
        for key in ["c", "d", "e"] {
            assert!(matches!(
                number_field("twilio", &object, "m", key),
                Err(ProtocolError::InvalidMessage(_))
            ));
        }
        assert!(matches!(
            json_object("twilio", "{nope"),
            Err(ProtocolError::MalformedJson(_))
        ));
        assert!(matches!(
            json_object("twilio", "[1]"),
            Err(ProtocolError::InvalidMessage(_))
        ));
    }
}
