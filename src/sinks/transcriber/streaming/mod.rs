//! Streaming backend kinds: each session's audio goes to an upstream
//! speech-to-text engine over a WebSocket as it comes, and the engine's
//! partials and finals come back as `transcript` messages in stream time.
//!
//! ```text
//! write() ─ s16le chunks ─ try_send ─→ link task per connection ─→ upstream
//!                                        │  keeps the unacknowledged tail,
//!                                        │  reconnects and replays it
//!   orderer task ←─ partials and finals ─┘  (times mapped to stream time)
//! ```
//!
//! What every kind shares lives here and in [`link`]; what a kind says on
//! the wire lives in its own folder, behind the [`Protocol`] trait, and the
//! kind is one line of [`KINDS`]:
//!
//! | folder               | kind              | upstream                          |
//! |----------------------|-------------------|-----------------------------------|
//! | `deepgram/`          | `deepgram`        | Deepgram live `/v1/listen`        |
//! | `assemblyai/`        | `assemblyai`      | AssemblyAI universal streaming v3 |
//! | `openai_realtime/`   | `openai_realtime` | OpenAI realtime, `intent=transcription` |
//! | `vosk/`              | `vosk`            | vosk-server's WebSocket protocol  |
//!
//! The audio path only converts the block and `try_send`s it to a link's
//! task (a bounded channel): it never waits on the network, so the recorder
//! stays exact and the client's socket is read whatever the upstream does.
//! What does not fit is dropped and reported (`transcribe_failed` with the
//! time range). A kind whose upstream takes one channel gets one connection
//! per channel of the session.

mod assemblyai;
mod deepgram;
mod link;
mod openai_realtime;
mod timing;
mod vosk;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tracing::Instrument;

use super::backend::Backend;
use super::order::start_orderer;
use super::{TranscriptionService, NAME};
use crate::pipeline::convert::{Layout, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples};
use crate::protocol::{ErrorCode, ServerMessage, TranscribeErrorInfo};
use crate::sinks::recorder::f32_to_i16;
use crate::sinks::{Completion, Sink, SinkContext, SinkError, SinkEvent};
use crate::telemetry::names;

pub use self::timing::{frames_of, seconds_of, ReplayBuffer, TimeMap};

/// The streaming kinds, one line each.
pub static KINDS: &[&StreamingKind] = &[
    &deepgram::KIND,
    &assemblyai::KIND,
    &openai_realtime::KIND,
    &vosk::KIND,
];

/// The kind called `name`, if it is a streaming one.
pub fn kind_named(name: &str) -> Option<&'static StreamingKind> {
    KINDS.iter().copied().find(|kind| kind.name == name)
}

/// What cochlea knows of a streaming kind before it connects.
#[derive(Debug)]
pub struct StreamingKind {
    /// Its `kind = "..."` in `[transcription.backends.<name>]`.
    pub name: &'static str,
    /// Query keys cochlea sets from the session; a configured `query` may
    /// not hold them.
    pub own_query_keys: &'static [&'static str],
    /// The keys a `query` may hold, where the kind knows them all (`None`:
    /// anything is passed through to the upstream).
    pub query_keys: Option<&'static [&'static str]>,
    /// The upstream takes one channel per connection.
    pub mono: bool,
    /// The rate of the s16le audio it takes.
    pub sample_rate: u32,
    /// Audio goes up in messages of at least this much (0: block by block).
    pub min_chunk_ms: u32,
    pub protocol: fn() -> Box<dyn Protocol>,
}

impl PartialEq for StreamingKind {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for StreamingKind {}

/// What one connection carries, as a [`Protocol`] needs to know it.
pub struct Setup<'a> {
    pub backend: &'a Backend,
    /// Channels on this connection (the session's, or 1 for a mono kind).
    pub channels: u16,
    pub sample_rate: u32,
    /// The session asked for partials.
    pub interim: bool,
}

/// What a kind says on the wire. Pure: no IO and no clock; the link task
/// connects, sends what this returns and feeds it what arrives. A value
/// lives for the whole session, across reconnects ([`Protocol::opened`]
/// starts each connection).
pub trait Protocol: Send + Sync {
    /// The URL (with its query) and headers to connect with.
    fn request(&self, setup: &Setup) -> Result<Request, StreamError>;
    /// A connection is open: forgets the last one's state; returns what
    /// goes up first (a configuration message).
    fn opened(&mut self, setup: &Setup) -> Vec<Message>;
    /// Interleaved s16le audio of `frames` frames, the next on this
    /// connection.
    fn audio(&mut self, bytes: Vec<u8>, frames: u64) -> Message;
    /// Sent after [`KEEPALIVE_INTERVAL`] without audio, if the upstream
    /// needs it.
    fn keepalive(&self) -> Option<Message>;
    /// The session's `flush`: have the upstream finish what it heard.
    fn finalize(&mut self) -> Vec<Message>;
    /// The stream has ended: ask for the last results.
    fn close(&mut self) -> Vec<Message>;
    /// A text message from the upstream.
    fn on_text(&mut self, text: &str) -> Vec<Reply>;
    /// After [`Protocol::close`]: no result is pending, so the link may
    /// close without waiting for a message (for upstreams that only answer
    /// what was pending).
    fn drained(&self) -> bool {
        false
    }
}

/// What a protocol makes of an upstream message.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Heard(Heard),
    /// Every result is in after [`Protocol::close`]; the link closes the
    /// connection (for upstreams that do not close it themselves).
    Drained,
    /// The upstream has transcribed the audio before this many seconds of
    /// the connection (or heard no speech there): it need not be replayed.
    /// A final covers its own end without saying so.
    Covered(f64),
    /// The upstream reported an error (logged without secrets).
    Error(String),
}

/// A partial or final result, in connection time (seconds since the
/// connection opened).
#[derive(Debug, PartialEq, Default)]
pub struct Heard {
    /// The upstream's name for the utterance (a turn, an item), when it
    /// names them; `None`: one utterance at a time per channel.
    pub key: Option<String>,
    /// The channel on this connection.
    pub channel: u16,
    pub start_s: f64,
    pub end_s: f64,
    pub text: String,
    pub is_final: bool,
    pub words: Vec<HeardWord>,
}

#[derive(Debug, PartialEq)]
pub struct HeardWord {
    pub word: String,
    pub start_s: f64,
    pub end_s: f64,
    pub confidence: Option<f64>,
}

/// Upstreams close an idle connection (Deepgram after 10 s without audio
/// or KeepAlive).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(4);
/// Audio a link's queue holds while its task connects or the upstream is
/// slow; beyond it audio is dropped (and reported). Measured in time, not
/// in chunks: a client may send a burst of seconds at the start (up to
/// `realtime_burst_ms`), before the first connection is even up.
const QUEUE_MS: u32 = 30_000;

/// The queue's length in chunks for `kind` (chunks are at least its
/// `min_chunk_ms`, or a 20 ms block).
fn queue_capacity(kind: &StreamingKind) -> usize {
    (QUEUE_MS / kind.min_chunk_ms.max(20)).max(64) as usize
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("timed out connecting after {0} ms")]
    ConnectTimeout(u64),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("the upstream closed the connection{0}")]
    Closed(String),
}

/// A request to `url` with the backend's configured headers and, when it
/// has a key, `authorization` set to `scheme` and the key (`scheme` empty:
/// the key alone, as AssemblyAI takes it).
pub fn request_to(url: Url, setup: &Setup, scheme: &str) -> Result<Request, StreamError> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| StreamError::Connect(e.to_string()))?;
    let headers = request.headers_mut();
    for (name, value) in setup.backend.headers() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.insert(name, value);
        }
    }
    if let Some(key) = setup.backend.api_key() {
        let text = if scheme.is_empty() {
            key.to_owned()
        } else {
            format!("{scheme} {key}")
        };
        let value = HeaderValue::from_str(&text)
            .map_err(|e| StreamError::Connect(format!("api_key: {e}")))?;
        headers.insert("authorization", value);
    }
    Ok(request)
}

/// The backend's URL with cochlea's own parameters (`own`, the audio format
/// from the session), then the configured `query` passed through.
pub fn url_with_query(setup: &Setup, own: &[(&str, String)]) -> Url {
    let mut url = setup.backend.streaming_url().clone();
    {
        let mut pairs = url.query_pairs_mut();
        for (key, value) in own {
            pairs.append_pair(key, value);
        }
        for (key, value) in setup.backend.streaming_query() {
            pairs.append_pair(key, value);
        }
    }
    url
}

/// `{"type":"<kind>"}`, the control message most upstreams take.
pub fn control(kind: &str) -> Message {
    Message::text(serde_json::json!({ "type": kind }).to_string())
}

enum Command {
    /// Interleaved s16le, from `start_frame` of the stream.
    Audio {
        start_frame: u64,
        bytes: Vec<u8>,
    },
    Finalize,
    Close,
}

/// The sink's end of one connection's task.
struct LinkHandle {
    /// The backend's name, for metrics.
    backend: String,
    first_channel: u16,
    channels: u16,
    commands: mpsc::Sender<Command>,
    /// The chunk being filled, from `pending_start`.
    pending: Vec<u8>,
    pending_start: u64,
    /// Stream frame where a run of dropped audio began, until it is told.
    dropping_since: Option<u64>,
}

/// The sink: converts blocks and hands them to the links' tasks.
pub struct StreamingTranscriber {
    channels: u16,
    links: Vec<LinkHandle>,
    min_chunk_frames: u64,
    sample_rate: u32,
    events: mpsc::UnboundedSender<SinkEvent>,
}

impl StreamingTranscriber {
    pub fn start(
        context: &SinkContext,
        service: &Arc<TranscriptionService>,
        backend: Arc<Backend>,
        kind: &'static StreamingKind,
        events: mpsc::UnboundedSender<SinkEvent>,
        interim: bool,
    ) -> Self {
        let channels = context.format.channels.max(1);
        let span = tracing::info_span!("transcribe", backend = %backend.name);
        let outcomes_tx = start_orderer(service, &context.session_id, &events, &span);
        let per_link = if kind.mono { 1 } else { channels };
        let next_id = Arc::new(AtomicU64::new(0));
        let mut links = Vec::new();
        for first_channel in (0..channels).step_by(usize::from(per_link)) {
            let (commands_tx, commands_rx) = mpsc::channel(queue_capacity(kind));
            let task = link::Link::new(link::LinkSettings {
                backend: backend.clone(),
                kind,
                first_channel,
                channels: per_link,
                interim,
                outcomes: outcomes_tx.clone(),
                events: events.clone(),
                next_id: next_id.clone(),
                config: &service.config,
            });
            let span = tracing::info_span!(parent: &span, "upstream", first_channel);
            tokio::spawn(task.run(commands_rx).instrument(span));
            links.push(LinkHandle {
                backend: backend.name.clone(),
                first_channel,
                channels: per_link,
                commands: commands_tx,
                pending: Vec::new(),
                pending_start: 0,
                dropping_since: None,
            });
        }
        Self {
            channels,
            links,
            min_chunk_frames: u64::from(kind.sample_rate) * u64::from(kind.min_chunk_ms) / 1000,
            sample_rate: kind.sample_rate,
            events,
        }
    }
}

impl LinkHandle {
    fn pending_frames(&self) -> u64 {
        (self.pending.len() / (2 * usize::from(self.channels))) as u64
    }

    /// Hands the pending chunk to the task; drops it if the task is behind.
    fn send_pending(&mut self, events: &mpsc::UnboundedSender<SinkEvent>, rate: u32) {
        if self.pending.is_empty() {
            return;
        }
        let start_frame = self.pending_start;
        let frames = self.pending_frames();
        let bytes = std::mem::take(&mut self.pending);
        self.pending_start = start_frame + frames;
        match self
            .commands
            .try_send(Command::Audio { start_frame, bytes })
        {
            Ok(()) => self.report_dropped(start_frame, events, rate),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropping_since.get_or_insert(start_frame);
            }
            // The task has ended (it only does after Close): nothing to do.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn report_dropped(&mut self, until: u64, events: &mpsc::UnboundedSender<SinkEvent>, rate: u32) {
        if let Some(since) = self.dropping_since.take() {
            report_lost(
                events,
                &self.backend,
                self.first_channel..self.first_channel + self.channels,
                (since, until),
                rate,
                "the upstream connection is not keeping up; audio dropped",
            );
        }
    }
}

/// Tells the client that audio `since..until` (stream frames at `rate`) of
/// channels `channels` was not transcribed, and counts it.
pub(crate) fn report_lost(
    events: &mpsc::UnboundedSender<SinkEvent>,
    backend: &str,
    channels: std::ops::Range<u16>,
    (since, until): (u64, u64),
    rate: u32,
    why: &str,
) {
    for channel in channels {
        metrics::counter!(names::TRANSCRIBE_UPSTREAM_LOST_SPANS_TOTAL, "backend" => backend.to_owned())
            .increment(1);
        let _ = events.send(SinkEvent::Message(lost_message(
            channel, since, until, rate, why,
        )));
    }
}

/// The non-fatal error for audio of `channel` that was not transcribed.
pub(crate) fn lost_message(
    channel: u16,
    since: u64,
    until: u64,
    rate: u32,
    why: &str,
) -> ServerMessage {
    let (start, end) = (seconds_of(since, rate), seconds_of(until, rate));
    ServerMessage::TranscribeError(TranscribeErrorInfo {
        code: ErrorCode::TranscribeFailed,
        message: format!(
            "audio {start:.2}-{end:.2} s (channel {channel}) was not transcribed: {why}"
        ),
        fatal: false,
        channel,
        utterance_id: None,
        start: Some(start),
        end: Some(end),
        dropped: None,
    })
}

impl Sink for StreamingTranscriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn output_format(&self) -> OutputFormat {
        OutputFormat {
            sample_rate: Some(self.sample_rate),
            layout: Layout::Keep,
        }
    }

    fn write(&mut self, block: &AudioBlock, _now: std::time::Instant) -> Result<(), SinkError> {
        let channels = usize::from(self.channels);
        for link in &mut self.links {
            link.pending
                .reserve(block.frames * 2 * usize::from(link.channels));
            let first = usize::from(link.first_channel);
            let last = first + usize::from(link.channels);
            match &block.samples {
                BlockSamples::Audio(audio) => {
                    for frame in 0..block.frames {
                        for channel in first..last {
                            // The project's one f32 → s16 mapping: s16 input
                            // goes up exactly as the client sent it.
                            let sample = audio.get(frame * channels + channel).copied();
                            let value = sample.map_or(0, f32_to_i16);
                            link.pending.extend_from_slice(&value.to_le_bytes());
                        }
                    }
                }
                BlockSamples::Silence => {
                    let bytes = block.frames * 2 * usize::from(link.channels);
                    link.pending.resize(link.pending.len() + bytes, 0);
                }
            }
            if link.pending_frames() >= self.min_chunk_frames {
                link.send_pending(&self.events, self.sample_rate);
            }
        }
        Ok(())
    }

    /// Sends what is pending and asks the upstream to finish what it heard;
    /// the results it brings come as they come.
    fn flush(&mut self, _now: std::time::Instant) -> Result<Completion, SinkError> {
        for link in &mut self.links {
            link.send_pending(&self.events, self.sample_rate);
            if link.commands.try_send(Command::Finalize).is_err() {
                tracing::warn!("upstream queue full: finalize not sent");
            }
        }
        Ok(Completion::Done)
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError> {
        let (events, rate) = (self.events.clone(), self.sample_rate);
        for link in &mut self.links {
            link.send_pending(&events, rate);
            link.report_dropped(link.pending_start, &events, rate);
            // `finish` runs on the blocking pool, where waiting for room is fine.
            let _ = link.commands.blocking_send(Command::Close);
        }
        Ok(Vec::new())
    }

    fn abort(self: Box<Self>, _reason: &str) {
        // Dropping the senders ends the tasks without waiting for results.
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::backend::{Backend, BackendConfig, BackendKind};
    use super::*;

    fn config(kind: &str, url: &str) -> BackendConfig {
        BackendConfig {
            kind: BackendKind::named(kind).unwrap(),
            url: url.into(),
            ..BackendConfig::default()
        }
    }

    fn refused(kind: &str, change: impl FnOnce(&mut BackendConfig)) -> String {
        let mut config = config(kind, "wss://127.0.0.1:1/v1/listen");
        change(&mut config);
        Backend::new("live", &config).unwrap_err().to_string()
    }

    #[test]
    fn every_queue_holds_thirty_seconds_of_audio() {
        // 512 chunks of 20 ms (10 s) overflowed while a Deepgram link was
        // still connecting under a 12 s burst (upstream_deepgram, flaky).
        for kind in KINDS {
            let chunk_ms = kind.min_chunk_ms.max(20) as usize;
            assert!(queue_capacity(kind) * chunk_ms >= 30_000, "{}", kind.name);
        }
    }

    #[test]
    fn every_kind_is_named_by_its_config_string() {
        for kind in KINDS {
            let parsed: BackendKind =
                serde_json::from_value(Value::from(kind.name)).expect(kind.name);
            assert_eq!(parsed, BackendKind::Streaming(kind));
            assert_eq!(String::from(parsed), kind.name);
        }
        let unknown = serde_json::from_value::<BackendKind>(Value::from("whisperx")).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown backend kind 'whisperx' (known: openai, webhook, deepgram, assemblyai, openai_realtime, vosk)"
        );
    }

    #[test]
    fn streaming_settings_are_checked_with_clear_messages() {
        let mut deepgram = config("deepgram", "ws://127.0.0.1:1/v1/listen");
        deepgram.query.insert("model".into(), Value::from("nova-3"));
        deepgram.query.insert("punctuate".into(), Value::from(true));
        let backend = Backend::new("live", &deepgram).unwrap();
        assert_eq!(
            backend.streaming_query(),
            [
                ("model".to_owned(), "nova-3".to_owned()),
                ("punctuate".to_owned(), "true".to_owned())
            ]
        );
        assert_eq!(
            refused("deepgram", |c| c.url = "https://127.0.0.1/v1/listen".into()),
            "backend 'live': url must be ws:// or wss:// for kind deepgram, not https"
        );
        assert!(refused("deepgram", |c| {
            c.query.insert("encoding".into(), Value::from("mulaw"));
        })
        .contains("query.encoding is set by cochlea"));
        assert!(refused("assemblyai", |c| {
            c.query.insert("sample_rate".into(), Value::from(8000));
        })
        .contains("query.sample_rate is set by cochlea"));
        assert!(refused("deepgram", |c| {
            c.query.insert("keyterm".into(), serde_json::json!(["a"]));
        })
        .contains("query.keyterm must be a string, a number or a boolean"));
        assert_eq!(
            refused("openai_realtime", |c| {
                c.query.insert("voice".into(), Value::from("alloy"));
            }),
            "backend 'live': query.voice is not a setting of kind \"openai_realtime\" (it takes model, language, prompt, noise_reduction, vad_threshold, prefix_padding_ms, silence_duration_ms)"
        );
        assert!(refused("vosk", |c| {
            c.query.insert("model".into(), Value::from("en"));
        })
        .contains("(it takes none)"));
        assert_eq!(
            refused("vosk", |c| c.replay_buffer_ms = 999),
            "backend 'live': replay_buffer_ms must be from 1000 to 120000, not 999"
        );
        // `query` belongs to the streaming kinds only.
        let mut openai = config("openai", "http://127.0.0.1:1");
        openai.query.insert("model".into(), Value::from("x"));
        assert!(Backend::new("o", &openai)
            .unwrap_err()
            .to_string()
            .contains("query is only for the streaming kinds"));
    }
}
