//! Server → client text messages. Each one has a JSON Schema in
//! `proto/schemas/`, and the integration tests validate every message the
//! server sends against it.

use serde::Serialize;
use serde_json::{Map, Value};

use super::error_code::ErrorCode;
use super::format::StreamFormat;

pub const PROTOCOL_VERSION: u32 = 1;

/// A message the server sends. Serialized with a `type` tag.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Started(StartedInfo),
    Error {
        /// Machine-readable, stable: see the table in PROTOCOL.md.
        code: ErrorCode,
        message: String,
        /// True when the server closes the connection right after.
        fatal: bool,
    },
    /// Every sink has committed what it had when the client sent `flush`.
    Flushed,
    /// Boxed: by far the largest message, and one per recording.
    Recording(Box<RecordingInfo>),
    /// `framing=seq`: every message up to `seq` is safely with the sinks.
    Ack {
        seq: u32,
    },
    Stats(StreamStats),
    Closed(ClosedSummary),
    /// Voice activity on one channel (`transcribe` sessions).
    Vad(VadEvent),
    /// The text of one utterance.
    Transcript(Transcript),
    /// A non-fatal `error` about one utterance or the transcription queue:
    /// `transcribe_failed` or `transcribe_shed`. Same `type` as `Error`, with
    /// the fields that say which audio it concerns.
    #[serde(rename = "error")]
    TranscribeError(TranscribeErrorInfo),
    /// `transport: webrtc`: the server's SDP answer to the client's offer.
    WebrtcAnswer {
        sdp: String,
    },
}

/// `speech_started` / `speech_ended` on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VadEventKind {
    SpeechStarted,
    SpeechEnded,
}

#[derive(Debug, Clone, Serialize)]
pub struct VadEvent {
    pub event: VadEventKind,
    pub channel: u16,
    /// Seconds of media time from the start of the stream.
    pub time: f64,
    /// The utterance this speech belongs to (as in its `transcript`).
    pub utterance_id: u64,
}

/// The text of one utterance: a final, or (sessions with `interim=true`) a
/// partial hypothesis of an utterance still open.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    /// Numbered from 0 per session, in order of speech onset on any channel.
    pub utterance_id: u64,
    pub channel: u16,
    /// Seconds of media time from the start of the stream. A partial's `end`
    /// is the end of the audio it was made from.
    pub start: f64,
    pub end: f64,
    /// A partial: the whole hypothesis so far.
    pub text: String,
    /// Partials only: the prefix of `text` that two hypotheses in a row
    /// agreed on (LocalAgreement-2). It only grows within an utterance.
    pub stable_text: Option<String>,
    /// Sent as `is_final`, and as `final` as protocol version 1 always did.
    pub is_final: bool,
    /// Finals from a backend that gives word timings, in stream time.
    pub words: Option<Vec<Word>>,
    /// The configured backend that produced it.
    pub backend: String,
    /// Wall time of the backend request that succeeded, in milliseconds.
    pub backend_ms: u64,
}

/// One word of a final transcript, in seconds of media time from the start
/// of the stream (its channel's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Word {
    pub word: String,
    pub start: f64,
    pub end: f64,
    /// 0..1, when the backend reports one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
}

impl Serialize for Transcript {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A view with both names of the flag: `final` stays for clients of
        // protocol version 1, `is_final` is the name Deepgram users know.
        #[derive(Serialize)]
        struct Wire<'a> {
            utterance_id: u64,
            channel: u16,
            start: f64,
            end: f64,
            text: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            stable_text: Option<&'a str>,
            is_final: bool,
            #[serde(rename = "final")]
            final_: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            words: Option<&'a [Word]>,
            backend: &'a str,
            backend_ms: u64,
        }
        Wire {
            utterance_id: self.utterance_id,
            channel: self.channel,
            start: self.start,
            end: self.end,
            text: &self.text,
            stable_text: self.stable_text.as_deref(),
            is_final: self.is_final,
            final_: self.is_final,
            words: self.words.as_deref(),
            backend: &self.backend,
            backend_ms: self.backend_ms,
        }
        .serialize(serializer)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TranscribeErrorInfo {
    /// `transcribe_failed` or `transcribe_shed`.
    pub code: ErrorCode,
    pub message: String,
    /// Always false: transcription trouble never ends the stream.
    pub fatal: bool,
    pub channel: u16,
    /// `transcribe_failed`: the utterance that got no text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utterance_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<f64>,
    /// `transcribe_shed`: utterances dropped unsent since the last report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
}

/// Periodic stream statistics, in the terms of WebRTC's getStats and NetEq.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStats {
    /// Media time received so far, gaps included.
    pub media_seconds: f64,
    pub packets_received: u64,
    pub packets_duplicated: u64,
    /// Arrived after their place had been filled: discarded.
    pub packets_late: u64,
    /// `seq` numbers that never arrived (their media time was filled).
    pub packets_lost: u64,
    /// Opus packets or container pages that could not be decoded.
    pub packets_damaged: u64,
    /// Sample frames filled with silence or concealment.
    pub concealed_frames: u64,
    /// Media held back waiting for missing packets.
    pub current_delay_ms: u32,
    /// How long a gap is held open before it is filled.
    pub target_delay_ms: u32,
    /// Times this session has been resumed after a dropped connection.
    pub resumes: u32,
    /// WebRTC sessions: what RTCP says about the network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webrtc: Option<WebrtcStats>,
}

/// RTCP figures of a WebRTC session's audio, as of the last receiver report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WebrtcStats {
    /// RTP packets received, retransmissions included.
    pub packets_received: u64,
    /// Fraction of packets lost in the last report's interval (0–1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_fraction: Option<f64>,
    /// Interarrival jitter (RFC 3550 §6.4.1).
    pub jitter_ms: f64,
    /// Round trip to the client, where it answered an RTCP XR report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// NACKs sent asking the client to resend lost packets.
    pub nacks_sent: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StartedInfo {
    pub protocol_version: u32,
    pub session_id: String,
    pub format: StreamFormat,
    pub sinks: Vec<String>,
    /// The transcription backend in use, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcribe: Option<String>,
    pub metadata: Map<String, Value>,
    pub max_message_bytes: usize,
    pub idle_timeout_ms: u64,
    /// `framing=seq` only: present to reconnect with `resume=<session_id>&resume_token=<this>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
    /// On a resumed session: the first `seq` the server still needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_from_seq: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordingInfo {
    /// Path of the WAV file on the server.
    pub path: String,
    /// Path of the JSON sidecar beside it.
    pub sidecar_path: String,
    pub duration_seconds: f64,
    pub sample_frames: u64,
    pub sample_rate: u32,
    pub channels: u16,
    /// The file's format: `wav`, `flac` or `ogg_opus`.
    pub format: &'static str,
    /// `s16` or `f32` (WAV), `s16` (FLAC), `opus` (Ogg Opus).
    pub sample_format: &'static str,
    /// With `recorder.channels = "split"`: the stream channel this file holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<u16>,
    /// The `[sinks.<name>]` recorder that wrote it; absent for the built-in
    /// `record`, so that a session with two recorders can tell their files apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// Size of the WAV file, header included.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the whole WAV file.
    pub sha256: String,
    /// Where the client can fetch the file through this server (the
    /// recordings API), relative to its address.
    pub url: String,
    /// With an object store (`recordings_url = s3://…`): the object's URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// With an object store: whether the object was complete in the store
    /// when this message was sent. `false`: the store was slow or down, and
    /// the upload goes on from the server's spool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClosedSummary {
    /// Why the session ended: `stop`, `error`, `idle_timeout`, `shutdown`,
    /// or `client_gone` (logged only: that client is no longer there to read it).
    pub reason: &'static str,
    /// The WebSocket close code that follows.
    pub close_code: u16,
    /// Media time of the stream, gaps included.
    pub duration_seconds: f64,
    pub sample_frames: u64,
    pub audio_messages: u64,
    pub audio_bytes: u64,
    /// Sample frames of silence inserted for timestamp gaps (`framing=seq`).
    pub gap_frames: u64,
    /// `framing=seq` messages dropped because their seq was already seen.
    pub duplicate_messages: u64,
    /// Opus packets (or container pages) that could not be decoded.
    pub damaged_packets: u64,
    /// Sample frames filled by Opus loss concealment (damage and seq gaps).
    pub concealed_frames: u64,
}

impl ServerMessage {
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string
        // keys, no failing Serialize impls.
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                r#"{{"type":"error","code":"{}","message":"the server could not encode a message","fatal":false}}"#,
                ErrorCode::InternalError
            )
        })
    }
}
