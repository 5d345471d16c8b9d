//! Wire protocol v1: the types that cross the socket and their parsing.
//!
//! This module mirrors `proto/PROTOCOL.md` and `proto/schemas/`. It is pure: no
//! sockets, no clocks. The server feeds it bytes and query strings, and gets
//! back typed requests or a [`ProtocolError`] that says exactly what was wrong.

mod control;
mod error_code;
mod events;
mod format;
mod seq;

pub use control::{
    parse_client_message, parse_connect, ClientMessage, ConnectRequest, StartRequest,
};
pub use error_code::ErrorCode;
pub use events::{
    ClosedSummary, RecordingInfo, ServerMessage, StartedInfo, StreamStats, TranscribeErrorInfo,
    Transcript, VadEvent, VadEventKind, WebrtcStats, Word, PROTOCOL_VERSION,
};
pub use format::{
    parse_sample_rate, Encoding, Framing, StreamFormat, MAX_CHANNELS, MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE, OPUS_SAMPLE_RATES,
};
pub use seq::{SeqHeader, SEQ_HEADER_BYTES};

/// Everything a client can get wrong at the protocol level.
///
/// Each variant maps to one machine-readable error code and one close code in
/// `server::close`; the messages are written for the person debugging a client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("text message is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    #[error(
        "unknown message type '{0}'; expected one of start, keepalive, flush, stop, webrtc_offer"
    )]
    UnknownMessageType(String),
    #[error("unknown query parameter '{0}'")]
    UnknownParameter(String),
    #[error("unsupported encoding '{0}'; supported: pcm_s16le, pcm_f32le, mulaw, alaw, opus, ogg_opus, webm_opus")]
    UnsupportedEncoding(String),
    #[error("unsupported sample_rate '{0}'; expected an integer from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}")]
    UnsupportedSampleRate(String),
    #[error("unsupported channels '{0}'; expected 1 or 2 (interleaved)")]
    UnsupportedChannels(String),
    #[error("unsupported framing '{0}'; expected raw or seq")]
    UnsupportedFraming(String),
    #[error("sample_rate is required for encoding {0}")]
    MissingSampleRate(&'static str),
    #[error("audio arrived before the stream format was known: send a start message or put encoding in the query string")]
    AudioBeforeStart,
    #[error("the stream has already started; start may be sent once, and not when the query string carries the format")]
    AlreadyStarted,
    #[error("message is over the limit of {max_bytes} bytes (max_message_bytes)")]
    MessageTooBig { max_bytes: usize },
    #[error("WebSocket protocol violation: {0}")]
    WebSocket(String),
    #[error("binary message of {len_bytes} bytes is shorter than the {SEQ_HEADER_BYTES}-byte seq header")]
    SeqHeaderTruncated { len_bytes: usize },
    #[error("seq {seq} timestamp {timestamp} goes backwards: the previous message ended at sample frame {expected_at_least}")]
    TimestampBackwards {
        seq: u32,
        timestamp: u64,
        expected_at_least: u64,
    },
    #[error("seq {seq} timestamp {timestamp} leaves a gap of {gap_frames} sample frames, over the limit of {max_gap_frames}")]
    GapTooLarge {
        seq: u32,
        timestamp: u64,
        gap_frames: u64,
        max_gap_frames: u64,
    },
}
