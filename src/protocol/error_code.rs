//! Every machine-readable `code` an `error` message can carry.
//!
//! One list: the enum, [`ErrorCode::as_str`] and [`ErrorCode::ALL`] are all
//! made from it, so they cannot drift apart. A test holds the list against
//! the `code` enum of `proto/schemas/server/error.schema.json` and the error
//! table of `proto/PROTOCOL.md`. Which failure gets which code, and which
//! close code goes with it, is decided in `server::close` alone.

use serde::{Serialize, Serializer};

/// Declares [`ErrorCode`] from `Variant = "wire_code"` pairs.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $code:literal,)+) => {
        /// A stable error code of protocol version 1 (PROTOCOL.md §7).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)+
        }

        impl ErrorCode {
            /// Every code, in the order of the list.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            /// The code as it appears on the wire (snake_case).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)+
                }
            }
        }
    };
}

error_codes! {
    MalformedJson = "malformed_json",
    InvalidUtf8 = "invalid_utf8",
    InvalidMessage = "invalid_message",
    UnknownMessageType = "unknown_message_type",
    UnknownParameter = "unknown_parameter",
    UnsupportedEncoding = "unsupported_encoding",
    UnsupportedSampleRate = "unsupported_sample_rate",
    UnsupportedChannels = "unsupported_channels",
    UnsupportedFraming = "unsupported_framing",
    MissingSampleRate = "missing_sample_rate",
    AudioBeforeStart = "audio_before_start",
    AlreadyStarted = "already_started",
    MessageTooBig = "message_too_big",
    WebsocketProtocol = "websocket_protocol",
    SeqHeaderTruncated = "seq_header_truncated",
    TimestampBackwards = "timestamp_backwards",
    GapTooLarge = "gap_too_large",
    PartialFrame = "partial_frame",
    UnknownSink = "unknown_sink",
    /// `record_format` names no format, or one the server does not let
    /// clients choose (`recorder.client_formats`).
    RecordFormatRefused = "record_format_refused",
    SinkFailed = "sink_failed",
    ServerFull = "server_full",
    IdleTimeout = "idle_timeout",
    ShuttingDown = "shutting_down",
    /// The server could not encode a message: a bug, reported, not hidden.
    InternalError = "internal_error",
    /// Not fatal: the damage was concealed or skipped.
    AudioDamaged = "audio_damaged",
    DecoderFailed = "decoder_failed",
    UnsupportedContainer = "unsupported_container",
    MalformedContainer = "malformed_container",
    /// A stream over a bound set against hostile streams (codec::limit).
    LimitExceeded = "limit_exceeded",
    ResumeRejected = "resume_rejected",
    ResampleFailed = "resample_failed",
    KeyFull = "key_full",
    MaxDurationReached = "max_duration_reached",
    /// First a warning (not fatal), then the close.
    AudioTooFast = "audio_too_fast",
    SinkOverloaded = "sink_overloaded",
    /// Not fatal: one utterance got no transcript.
    TranscribeFailed = "transcribe_failed",
    /// Not fatal: the transcription backlog dropped utterances.
    TranscribeShed = "transcribe_shed",
    UnknownBackend = "unknown_backend",
    BinaryNotAllowed = "binary_not_allowed",
    UnsupportedMediaFormat = "unsupported_media_format",
    /// Not fatal: the object store failed; the audio waits in the spool and
    /// the upload is retried.
    StorageUnavailable = "storage_unavailable",
    InvalidMediaPayload = "invalid_media_payload",
    UnknownTrack = "unknown_track",
    /// Also the `error` of an HTTP 401 before the upgrade.
    AuthMissing = "auth_missing",
    AuthWrongKey = "auth_wrong_key",
    AuthBadToken = "auth_bad_token",
    AuthExpired = "auth_expired",
    BadSdp = "bad_sdp",
    WebrtcUnavailable = "webrtc_unavailable",
    WebrtcFailed = "webrtc_failed",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serialized as its wire string, so `as_str` is the only spelling.
impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const ERROR_SCHEMA: &str = include_str!("../../proto/schemas/server/error.schema.json");
    const PROTOCOL_MD: &str = include_str!("../../proto/PROTOCOL.md");
    const README_MD: &str = include_str!("../../README.md");

    fn ours() -> BTreeSet<&'static str> {
        ErrorCode::ALL.iter().map(|c| c.as_str()).collect()
    }

    #[test]
    fn codes_are_distinct_snake_case_and_serialize_as_themselves() {
        assert_eq!(ours().len(), ErrorCode::ALL.len(), "a code is listed twice");
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    && !s.starts_with('_')
                    && !s.ends_with('_'),
                "{s} is not snake_case"
            );
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::json!(s));
            assert_eq!(code.to_string(), s);
        }
    }

    #[test]
    fn the_error_schema_lists_exactly_these_codes() {
        let schema: serde_json::Value = serde_json::from_str(ERROR_SCHEMA).unwrap();
        let listed = schema["properties"]["code"]["enum"]
            .as_array()
            .expect("error.schema.json: properties.code.enum is an array");
        let theirs: BTreeSet<&str> = listed
            .iter()
            .map(|v| v.as_str().expect("codes are strings"))
            .collect();
        assert_eq!(theirs.len(), listed.len(), "the schema lists a code twice");
        let ours = ours();
        assert_eq!(
            ours.difference(&theirs).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "codes missing from error.schema.json"
        );
        assert_eq!(
            theirs.difference(&ours).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "codes in error.schema.json that ErrorCode lacks"
        );
    }

    /// The codes in the first column of PROTOCOL.md's bad-input table (§7):
    /// every `backticked` word of a row's first cell.
    fn protocol_md_table_codes() -> BTreeSet<&'static str> {
        let section = PROTOCOL_MD
            .split("\n## ")
            .find(|s| s.starts_with("7. "))
            .expect("PROTOCOL.md has a section 7");
        section
            .lines()
            .filter(|line| line.starts_with("| `"))
            .filter_map(|line| line.split('|').nth(1))
            .flat_map(|cell| cell.split('`').skip(1).step_by(2))
            .collect()
    }

    #[test]
    fn protocol_md_documents_exactly_these_codes() {
        let theirs = protocol_md_table_codes();
        // The table's header row is `code`, which is no code.
        let theirs: BTreeSet<&str> = theirs.into_iter().filter(|c| *c != "code").collect();
        let ours = ours();
        assert_eq!(
            ours.difference(&theirs).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "codes missing from PROTOCOL.md §7"
        );
        assert_eq!(
            theirs.difference(&ours).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "codes in PROTOCOL.md §7 that ErrorCode lacks"
        );
    }

    /// README's close-code summary names every code (its cells also name
    /// other things, such as `closed` reasons, so only this way round).
    #[test]
    fn the_readme_close_code_table_names_every_code() {
        let table = README_MD
            .split("**Bad input → close code**")
            .nth(1)
            .and_then(|rest| rest.split("\n\n").find(|block| block.starts_with('|')))
            .expect("README.md has its bad input table");
        let named: BTreeSet<&str> = table
            .lines()
            .filter_map(|line| line.split('|').nth(2))
            .flat_map(|cell| cell.split('`').skip(1).step_by(2))
            .collect();
        let missing: Vec<&str> = ours().into_iter().filter(|c| !named.contains(c)).collect();
        assert!(missing.is_empty(), "README.md's table lacks {missing:?}");
    }
}
