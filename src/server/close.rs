//! The one place where every way a session can fail is given its
//! machine-readable error code and its RFC 6455 close code. PROTOCOL.md's
//! table is this file in prose; keep them together.

use crate::codec::container::DemuxError;
use crate::codec::{CodecBuildError, CodecError};
use crate::pipeline::resample::ResampleError;
use crate::pipeline::PipelineError;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::sinks::SinkError;

use super::dialect::DialectError;
use super::resume::ResumeError;
use super::webrtc::WebrtcError;

/// RFC 6455 §7.4.1 close codes used by cochlea.
pub mod codes {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Why a session ends with an error.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    CodecBuild(#[from] CodecBuildError),
    #[error(transparent)]
    Demux(#[from] DemuxError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("server is at its limit of {max_sessions} concurrent sessions; retry later")]
    ServerFull { max_sessions: usize },
    #[error("this API key already has {max_sessions_per_key} concurrent sessions; retry later")]
    KeyFull { max_sessions_per_key: usize },
    #[error("session reached its maximum duration of {max_ms} ms")]
    MaxDuration { max_ms: u64 },
    #[error("audio arrives {factor:.1}x faster than real time, over the limit of {limit:.1}x")]
    TooFast { factor: f64, limit: f64 },
    #[error("sink {sink} has kept {pending_bytes} bytes pending for over {stall_ms} ms")]
    SinkOverloaded {
        sink: &'static str,
        pending_bytes: usize,
        stall_ms: u64,
    },
    #[error("no audio and no start, keepalive or flush message for {idle_timeout_ms} ms")]
    IdleTimeout {
        idle_timeout_ms: u64,
        close_code: u16,
    },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Resume(#[from] ResumeError),
    #[error(transparent)]
    Resample(#[from] ResampleError),
    /// What only a dialect endpoint (`/twilio`, `/vonage`, `/audiofork`,
    /// `/v1/listen`) can get wrong; its native-protocol errors become
    /// `Protocol` (see the `From` below).
    #[error(transparent)]
    Dialect(DialectError),
    #[error(transparent)]
    Webrtc(#[from] WebrtcError),
}

impl From<DialectError> for SessionError {
    fn from(e: DialectError) -> Self {
        match e {
            DialectError::Protocol(e) => SessionError::Protocol(e),
            DialectError::KeyFull {
                max_sessions_per_key,
            } => SessionError::KeyFull {
                max_sessions_per_key,
            },
            other => SessionError::Dialect(other),
        }
    }
}

impl From<PipelineError> for SessionError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Protocol(e) => SessionError::Protocol(e),
            PipelineError::Codec(e) => SessionError::Codec(e),
            PipelineError::CodecBuild(e) => SessionError::CodecBuild(e),
            PipelineError::Demux(e) => SessionError::Demux(e),
        }
    }
}

impl SessionError {
    /// `(error code, close code)`.
    pub fn codes(&self) -> (ErrorCode, u16) {
        use codes::*;
        match self {
            SessionError::Protocol(e) => protocol_codes(e),
            SessionError::Dialect(e) => match e {
                DialectError::Protocol(e) => protocol_codes(e),
                DialectError::BinaryNotAllowed { .. } => {
                    (ErrorCode::BinaryNotAllowed, UNSUPPORTED_DATA)
                }
                DialectError::UnsupportedMediaFormat { .. } => {
                    (ErrorCode::UnsupportedMediaFormat, UNSUPPORTED_DATA)
                }
                DialectError::InvalidPayload { .. } => {
                    (ErrorCode::InvalidMediaPayload, INVALID_PAYLOAD)
                }
                DialectError::UnknownTrack { .. } => (ErrorCode::UnknownTrack, PROTOCOL_ERROR),
                DialectError::UnknownMessageType { .. } => {
                    (ErrorCode::UnknownMessageType, PROTOCOL_ERROR)
                }
                DialectError::Auth(e) => match e.error_code() {
                    Some(code) => (code, POLICY_VIOLATION),
                    // A refused Origin is answered on the HTTP request (403)
                    // and never reaches a session; if one did, that is a bug
                    // of ours, not the client's.
                    None => (ErrorCode::InternalError, INTERNAL_ERROR),
                },
                DialectError::KeyFull { .. } => (ErrorCode::KeyFull, TRY_AGAIN_LATER),
            },
            SessionError::Codec(e) => match e {
                CodecError::PartialFrame { .. } => (ErrorCode::PartialFrame, INVALID_PAYLOAD),
                // Concealed in the pipeline and reported with fatal:false;
                // never ends a session, but has a code like everything else.
                CodecError::DamagedPacket(_) => (ErrorCode::AudioDamaged, INVALID_PAYLOAD),
            },
            // Bad configuration on our side, whichever it is: no client
            // input gets this far (see CodecBuildError).
            SessionError::CodecBuild(_) => (ErrorCode::DecoderFailed, INTERNAL_ERROR),
            SessionError::Demux(e) => match e {
                DemuxError::Unsupported(_) => (ErrorCode::UnsupportedContainer, UNSUPPORTED_DATA),
                DemuxError::Malformed(_) => (ErrorCode::MalformedContainer, INVALID_PAYLOAD),
                // The stream asks more of the server than it gives one
                // client: a policy, not a broken payload.
                DemuxError::Limit(_) => (ErrorCode::LimitExceeded, POLICY_VIOLATION),
            },
            SessionError::Sink(e) => match e {
                SinkError::UnknownSink { .. } => (ErrorCode::UnknownSink, UNSUPPORTED_DATA),
                SinkError::UnknownBackend(_) => (ErrorCode::UnknownBackend, UNSUPPORTED_DATA),
                SinkError::RecordFormatRefused(_) => {
                    (ErrorCode::RecordFormatRefused, UNSUPPORTED_DATA)
                }
                SinkError::Io { .. } | SinkError::Wav { .. } | SinkError::Failed { .. } => {
                    (ErrorCode::SinkFailed, INTERNAL_ERROR)
                }
            },
            SessionError::ServerFull { .. } => (ErrorCode::ServerFull, TRY_AGAIN_LATER),
            SessionError::KeyFull { .. } => (ErrorCode::KeyFull, TRY_AGAIN_LATER),
            SessionError::MaxDuration { .. } => (ErrorCode::MaxDurationReached, POLICY_VIOLATION),
            SessionError::TooFast { .. } => (ErrorCode::AudioTooFast, POLICY_VIOLATION),
            SessionError::SinkOverloaded { .. } => (ErrorCode::SinkOverloaded, INTERNAL_ERROR),
            SessionError::IdleTimeout { close_code, .. } => (ErrorCode::IdleTimeout, *close_code),
            SessionError::ShuttingDown => (ErrorCode::ShuttingDown, GOING_AWAY),
            SessionError::Resume(_) => (ErrorCode::ResumeRejected, POLICY_VIOLATION),
            SessionError::Resample(_) => (ErrorCode::ResampleFailed, INTERNAL_ERROR),
            SessionError::Webrtc(e) => match e {
                WebrtcError::BadOffer(_) | WebrtcError::Negotiation(_) => {
                    (ErrorCode::BadSdp, UNSUPPORTED_DATA)
                }
                WebrtcError::Disabled => (ErrorCode::WebrtcUnavailable, UNSUPPORTED_DATA),
                // The media path went away (ICE did not connect, or did not
                // come back): the session ends with what it received.
                WebrtcError::PeerGone => (ErrorCode::WebrtcFailed, GOING_AWAY),
                WebrtcError::Bind { .. } | WebrtcError::Config(_) => {
                    (ErrorCode::WebrtcUnavailable, INTERNAL_ERROR)
                }
            },
        }
    }

    /// Short text for the close frame (RFC 6455 allows 123 bytes): the code.
    pub fn close_reason(&self) -> &'static str {
        self.codes().0.as_str()
    }
}

/// The error code of a protocol error (for HTTP answers, which have no
/// close code).
pub fn protocol_error_code(e: &ProtocolError) -> ErrorCode {
    protocol_codes(e).0
}

/// `(error code, close code)` of the native protocol's errors.
fn protocol_codes(e: &ProtocolError) -> (ErrorCode, u16) {
    use codes::*;
    match e {
        ProtocolError::MalformedJson(_) => (ErrorCode::MalformedJson, INVALID_PAYLOAD),
        ProtocolError::InvalidUtf8 => (ErrorCode::InvalidUtf8, INVALID_PAYLOAD),
        ProtocolError::InvalidMessage(_) => (ErrorCode::InvalidMessage, PROTOCOL_ERROR),
        ProtocolError::UnknownMessageType(_) => (ErrorCode::UnknownMessageType, PROTOCOL_ERROR),
        ProtocolError::UnknownParameter(_) => (ErrorCode::UnknownParameter, PROTOCOL_ERROR),
        ProtocolError::UnsupportedEncoding(_) => (ErrorCode::UnsupportedEncoding, UNSUPPORTED_DATA),
        ProtocolError::UnsupportedSampleRate(_) => {
            (ErrorCode::UnsupportedSampleRate, UNSUPPORTED_DATA)
        }
        ProtocolError::UnsupportedChannels(_) => (ErrorCode::UnsupportedChannels, UNSUPPORTED_DATA),
        ProtocolError::UnsupportedFraming(_) => (ErrorCode::UnsupportedFraming, UNSUPPORTED_DATA),
        ProtocolError::MissingSampleRate(_) => (ErrorCode::MissingSampleRate, PROTOCOL_ERROR),
        ProtocolError::AudioBeforeStart => (ErrorCode::AudioBeforeStart, PROTOCOL_ERROR),
        ProtocolError::AlreadyStarted => (ErrorCode::AlreadyStarted, PROTOCOL_ERROR),
        ProtocolError::MessageTooBig { .. } => (ErrorCode::MessageTooBig, MESSAGE_TOO_BIG),
        ProtocolError::WebSocket(_) => (ErrorCode::WebsocketProtocol, PROTOCOL_ERROR),
        ProtocolError::SeqHeaderTruncated { .. } => (ErrorCode::SeqHeaderTruncated, PROTOCOL_ERROR),
        ProtocolError::TimestampBackwards { .. } => (ErrorCode::TimestampBackwards, PROTOCOL_ERROR),
        ProtocolError::GapTooLarge { .. } => (ErrorCode::GapTooLarge, POLICY_VIOLATION),
    }
}

/// Maps actix-ws stream errors onto protocol errors.
pub fn from_ws_error(error: actix_ws::ProtocolError, max_message_bytes: usize) -> ProtocolError {
    match error {
        actix_ws::ProtocolError::Overflow => ProtocolError::MessageTooBig {
            max_bytes: max_message_bytes,
        },
        // actix-ws reports a text frame that is not UTF-8 as InvalidData.
        actix_ws::ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            ProtocolError::InvalidUtf8
        }
        other => ProtocolError::WebSocket(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_errors_keep_their_codes_whichever_kind() {
        let cases: [(SessionError, ErrorCode, u16); 4] = [
            (
                CodecError::PartialFrame {
                    len_bytes: 641,
                    frame_bytes: 2,
                }
                .into(),
                ErrorCode::PartialFrame,
                codes::INVALID_PAYLOAD,
            ),
            (
                CodecError::DamagedPacket("empty Opus packet".into()).into(),
                ErrorCode::AudioDamaged,
                codes::INVALID_PAYLOAD,
            ),
            (
                CodecBuildError::UnsupportedChannels { channels: 3 }.into(),
                ErrorCode::DecoderFailed,
                codes::INTERNAL_ERROR,
            ),
            (
                // A container's decoder is built inside the pipeline.
                PipelineError::CodecBuild(CodecBuildError::UnsupportedSampleRate {
                    sample_rate_hz: 44_100,
                })
                .into(),
                ErrorCode::DecoderFailed,
                codes::INTERNAL_ERROR,
            ),
        ];
        for (error, code, close_code) in cases {
            assert_eq!(error.codes(), (code, close_code), "{error}");
        }
    }

    #[test]
    fn limits_are_their_own_code_apart_from_malformed_streams() {
        use crate::codec::limit::LimitError;
        let over: SessionError = PipelineError::Demux(DemuxError::Limit(LimitError::OggPacket {
            max_bytes: 1 << 20,
        }))
        .into();
        assert_eq!(
            over.codes(),
            (ErrorCode::LimitExceeded, codes::POLICY_VIOLATION)
        );
        assert_eq!(over.close_reason(), "limit_exceeded");
        let broken: SessionError = DemuxError::Malformed("not a WebM stream".into()).into();
        assert_eq!(
            broken.codes(),
            (ErrorCode::MalformedContainer, codes::INVALID_PAYLOAD)
        );
    }
}
