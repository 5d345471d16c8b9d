//! The `deepgram` backend kind: a streaming upstream that speaks Deepgram's
//! live `/v1/listen` WebSocket protocol, one connection per session.
//!
//! The whole session (all its channels, `channels=N&multichannel=true`) goes
//! up one connection as 16 kHz `linear16`. The audio path only converts the
//! block and `try_send`s it to the session's upstream task (a bounded
//! channel): it never waits on the network, so the recorder stays exact and
//! the client's socket is read whatever the upstream does. What does not fit
//! is dropped and reported (`transcribe_failed` with the time range).
//!
//! The task keeps the audio it sent until a final result covers it (at most
//! `replay_buffer_ms`). When the upstream drops, it reconnects with backoff,
//! sends that tail again and maps the new connection's time (which starts at
//! 0) back to stream time with a [`TimeMap`], so transcripts stay in stream
//! time and in order. Audio older than the buffer that no final covered is
//! reported as `transcribe_failed`. The coverage ("ack") is the end of the
//! latest final on any channel, so on a multichannel session a reconnect
//! can lose another channel's words in progress.
//!
//! `KeepAlive` goes up after [`KEEPALIVE_INTERVAL`] without audio,
//! `Finalize` on the session's `flush`, `CloseStream` when the session ends;
//! the task then waits up to `stop_wait_ms` for the last results.
//!
//! Results become `transcript` messages through the orderer (`order.rs`):
//! an utterance id is taken on a channel's first non-empty result and kept
//! until its final, partials get their `stable_text` there, and finals are
//! persisted like the batch backend's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tracing::Instrument;

use super::backend::Backend;
use super::order::{order, Outcome};
use super::persist::TranscriptLog;
use super::{TranscriptionService, NAME, SAMPLE_RATE};
use crate::pipeline::convert::{Layout, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples};
use crate::protocol::{ErrorCode, ServerMessage, TranscribeErrorInfo, Transcript, Word};
use crate::sinks::recorder::f32_to_i16;
use crate::sinks::{Completion, Sink, SinkContext, SinkError, SinkEvent};

/// Deepgram closes a connection after 10 s without audio or KeepAlive.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(4);
/// Blocks waiting for the upstream task; beyond it audio is dropped.
const COMMAND_CAPACITY: usize = 512;
const MAX_RECONNECT_BACKOFF_MS: u64 = 5_000;

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

enum Command {
    /// Interleaved s16le at 16 kHz, from `start_frame` of the stream.
    Audio {
        start_frame: u64,
        bytes: Vec<u8>,
    },
    Finalize,
    Close,
}

fn frames_of(seconds: f64) -> u64 {
    // A peer's number: `as` saturates (NaN and negatives become 0).
    (seconds * f64::from(SAMPLE_RATE)).round() as u64
}

fn seconds_of(frames: u64) -> f64 {
    frames as f64 / f64::from(SAMPLE_RATE)
}

/// One connection's time (frames since it opened) to stream time: each
/// segment starts where the audio sent jumps (the replay at a reconnect, a
/// hole left by dropped audio). Pure.
#[derive(Debug, Default)]
pub struct TimeMap {
    /// `(upstream_frame, stream_frame)` where each run of audio starts.
    segments: Vec<(u64, u64)>,
    upstream_end: u64,
    stream_next: u64,
}

impl TimeMap {
    /// Audio of `frames` from `stream_start` is sent next.
    pub fn append(&mut self, stream_start: u64, frames: u64) {
        if self.segments.is_empty() || stream_start != self.stream_next {
            self.segments.push((self.upstream_end, stream_start));
        }
        self.upstream_end = self.upstream_end.saturating_add(frames);
        self.stream_next = stream_start.saturating_add(frames);
    }

    pub fn to_stream(&self, upstream_frame: u64) -> u64 {
        let index = self
            .segments
            .partition_point(|(up, _)| *up <= upstream_frame)
            .saturating_sub(1);
        match self.segments.get(index) {
            Some((up, stream)) => stream.saturating_add(upstream_frame.saturating_sub(*up)),
            None => upstream_frame,
        }
    }

    /// Drops segments that end before `upstream_frame` (results there are in).
    pub fn forget_before(&mut self, upstream_frame: u64) {
        let keep_from = self
            .segments
            .partition_point(|(up, _)| *up <= upstream_frame)
            .saturating_sub(1);
        self.segments.drain(..keep_from);
    }
}

/// Audio sent and not yet covered by a final, at most `max_frames`. Pure.
#[derive(Debug)]
pub struct ReplayBuffer {
    chunks: VecDeque<(u64, Vec<u8>)>,
    frame_bytes: usize,
    frames: u64,
    max_frames: u64,
}

impl ReplayBuffer {
    pub fn new(channels: u16, max_frames: u64) -> Self {
        Self {
            chunks: VecDeque::new(),
            frame_bytes: 2 * usize::from(channels.max(1)),
            frames: 0,
            max_frames,
        }
    }

    fn chunk_frames(&self, bytes: &[u8]) -> u64 {
        (bytes.len() / self.frame_bytes) as u64
    }

    pub fn push(&mut self, start_frame: u64, bytes: Vec<u8>) {
        self.frames += self.chunk_frames(&bytes);
        self.chunks.push_back((start_frame, bytes));
        while self.frames > self.max_frames {
            let Some((_, old)) = self.chunks.pop_front() else {
                break;
            };
            self.frames -= self.chunk_frames(&old);
        }
    }

    /// Everything before stream frame `frame` is transcribed.
    pub fn ack(&mut self, frame: u64) {
        while let Some((start, bytes)) = self.chunks.front_mut() {
            let frames = (bytes.len() / self.frame_bytes) as u64;
            let end = *start + frames;
            if end <= frame {
                self.frames -= frames;
                self.chunks.pop_front();
            } else {
                if *start < frame {
                    let cut = frame - *start;
                    bytes.drain(..(cut as usize) * self.frame_bytes);
                    *start = frame;
                    self.frames -= cut;
                }
                break;
            }
        }
    }

    /// The oldest frame kept.
    pub fn oldest(&self) -> Option<u64> {
        self.chunks.front().map(|(start, _)| *start)
    }

    pub fn chunks(&self) -> impl Iterator<Item = &(u64, Vec<u8>)> {
        self.chunks.iter()
    }
}

/// The sink: converts blocks and hands them to the upstream task.
pub struct StreamingTranscriber {
    channels: u16,
    frames_written: u64,
    commands: mpsc::Sender<Command>,
    events: mpsc::UnboundedSender<SinkEvent>,
    /// Stream frame where a run of dropped audio began, until it is told.
    dropping_since: Option<u64>,
}

impl StreamingTranscriber {
    pub fn start(
        context: &SinkContext,
        service: &Arc<TranscriptionService>,
        backend: Arc<Backend>,
        events: mpsc::UnboundedSender<SinkEvent>,
        interim: bool,
    ) -> Self {
        let channels = context.format.channels.max(1);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("transcribe", backend = %backend.name);
        let log = service
            .transcripts_dir()
            .map(|dir| TranscriptLog::new(dir, &context.session_id, service.uploader()));
        tokio::spawn(order(outcomes_rx, events.clone(), log).instrument(span.clone()));
        let config = &service.config;
        let replay_frames = backend.replay_buffer_ms() * u64::from(SAMPLE_RATE) / 1000;
        let upstream = Upstream {
            replay: ReplayBuffer::new(channels, replay_frames),
            backend,
            channels,
            interim,
            outcomes: outcomes_tx,
            events: events.clone(),
            connect_timeout_ms: config.request_timeout_ms,
            backoff_ms: config.retry_backoff_ms.max(1),
            stop_wait: Duration::from_millis(config.stop_wait_ms),
            map: TimeMap::default(),
            next_stream_frame: 0,
            acked_frame: 0,
            open: vec![None; usize::from(channels)],
            next_id: 0,
            pending_finalize: false,
        };
        tokio::spawn(upstream.run(commands_rx).instrument(span));
        Self {
            channels,
            frames_written: 0,
            commands: commands_tx,
            events,
            dropping_since: None,
        }
    }

    fn report_dropped(&mut self, until: u64) {
        if let Some(since) = self.dropping_since.take() {
            for channel in 0..self.channels {
                let _ = self.events.send(SinkEvent::Message(lost_message(
                    channel,
                    since,
                    until,
                    "the upstream connection is not keeping up; audio dropped",
                )));
            }
        }
    }
}

fn lost_message(channel: u16, since: u64, until: u64, why: &str) -> ServerMessage {
    let (start, end) = (seconds_of(since), seconds_of(until));
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
            sample_rate: Some(SAMPLE_RATE),
            layout: Layout::Keep,
        }
    }

    fn write(&mut self, block: &AudioBlock, _now: std::time::Instant) -> Result<(), SinkError> {
        let start_frame = self.frames_written;
        self.frames_written += block.frames as u64;
        let samples = usize::from(self.channels) * block.frames;
        let mut bytes = Vec::with_capacity(samples * 2);
        match &block.samples {
            BlockSamples::Audio(audio) => {
                // The project's one f32 → s16 mapping: s16 input goes up
                // to the upstream exactly as the client sent it.
                for sample in audio.iter().take(samples) {
                    bytes.extend_from_slice(&f32_to_i16(*sample).to_le_bytes());
                }
                bytes.resize(samples * 2, 0);
            }
            BlockSamples::Silence => bytes.resize(samples * 2, 0),
        }
        match self
            .commands
            .try_send(Command::Audio { start_frame, bytes })
        {
            Ok(()) => self.report_dropped(start_frame),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropping_since.get_or_insert(start_frame);
            }
            // The task has ended (it only does after Close): nothing to do.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        Ok(())
    }

    /// Sends `Finalize` upstream; the results it brings come as they come.
    fn flush(&mut self, _now: std::time::Instant) -> Result<Completion, SinkError> {
        if self.commands.try_send(Command::Finalize).is_err() {
            tracing::warn!("upstream queue full: Finalize not sent");
        }
        Ok(Completion::Done)
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError> {
        self.report_dropped(self.frames_written);
        // `finish` runs on the blocking pool, where waiting for room is fine.
        let _ = self.commands.blocking_send(Command::Close);
        Ok(Vec::new())
    }

    fn abort(self: Box<Self>, _reason: &str) {
        // Dropping the sender ends the task without waiting for results.
    }
}

/// Upstream `Results`, as far as they are used.
#[derive(Debug, Deserialize)]
struct Results {
    #[serde(default)]
    channel_index: Vec<u16>,
    #[serde(default)]
    start: f64,
    #[serde(default)]
    duration: f64,
    #[serde(default)]
    is_final: bool,
    channel: ResultChannel,
}

#[derive(Debug, Deserialize)]
struct ResultChannel {
    #[serde(default)]
    alternatives: Vec<Alternative>,
}

#[derive(Debug, Deserialize)]
struct Alternative {
    #[serde(default)]
    transcript: String,
    #[serde(default)]
    words: Vec<UpstreamWord>,
}

#[derive(Debug, Deserialize)]
struct UpstreamWord {
    word: String,
    start: f64,
    end: f64,
    confidence: Option<f64>,
    punctuated_word: Option<String>,
}

/// How a connection ended.
enum Ended {
    /// The upstream closed after `CloseStream`: every result is in.
    Done,
    /// The sink is gone (the session aborted), or the stop wait is spent.
    Abandoned,
    Lost(StreamError),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The session's upstream task.
struct Upstream {
    backend: Arc<Backend>,
    channels: u16,
    interim: bool,
    outcomes: mpsc::UnboundedSender<Outcome>,
    events: mpsc::UnboundedSender<SinkEvent>,
    connect_timeout_ms: u64,
    backoff_ms: u64,
    stop_wait: Duration,
    replay: ReplayBuffer,
    /// The current connection's time base.
    map: TimeMap,
    /// The stream frame the next audio should start at (else: a hole).
    next_stream_frame: u64,
    /// Stream frames before this are covered by finals.
    acked_frame: u64,
    /// Each channel's utterance that has results but no final yet.
    open: Vec<Option<u64>>,
    next_id: u64,
    /// A `Finalize` asked for while disconnected.
    pending_finalize: bool,
}

impl Upstream {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut close_by: Option<Instant> = None;
        // Whether the upstream gave all its results (a clean close).
        let mut complete = false;
        let mut backoff_ms = self.backoff_ms;
        loop {
            let attempt = match close_by {
                Some(deadline) => match tokio::time::timeout_at(deadline, self.connect()).await {
                    Ok(result) => result,
                    Err(_) => break,
                },
                None => self.connect().await,
            };
            match attempt {
                Ok(socket) => {
                    backoff_ms = self.backoff_ms;
                    match self.serve(socket, &mut commands, &mut close_by).await {
                        Ended::Done => {
                            complete = true;
                            break;
                        }
                        Ended::Abandoned => break,
                        Ended::Lost(error) => {
                            tracing::warn!(error = %self.backend.scrub_text(error.to_string()), "upstream lost: reconnecting");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %self.backend.scrub_text(error.to_string()), backoff_ms, "upstream connection failed");
                    let wake = Instant::now() + Duration::from_millis(backoff_ms);
                    backoff_ms = (backoff_ms * 2).min(MAX_RECONNECT_BACKOFF_MS);
                    if !self.absorb_until(wake, &mut commands, &mut close_by).await {
                        break;
                    }
                }
            }
            if close_by.is_some_and(|deadline| Instant::now() >= deadline) {
                break;
            }
        }
        self.give_up(complete);
    }

    /// While disconnected: keeps audio (for the replay) and requests until
    /// `wake`. False: the stream is over (the sink is gone, or the stop
    /// wait is spent).
    async fn absorb_until(
        &mut self,
        wake: Instant,
        commands: &mut mpsc::Receiver<Command>,
        close_by: &mut Option<Instant>,
    ) -> bool {
        loop {
            let deadline = match *close_by {
                Some(close) => close.min(wake),
                None => wake,
            };
            match tokio::time::timeout_at(deadline, commands.recv()).await {
                Err(_) => return close_by.is_none_or(|close| Instant::now() < close),
                Ok(None) if close_by.is_none() => return false,
                Ok(None) => {
                    // The sink is gone after Close: wait out the backoff.
                    tokio::time::sleep_until(deadline).await;
                    return close_by.is_none_or(|close| Instant::now() < close);
                }
                Ok(Some(Command::Audio { start_frame, bytes })) => {
                    self.keep(start_frame, bytes);
                }
                Ok(Some(Command::Finalize)) => self.pending_finalize = true,
                Ok(Some(Command::Close)) => {
                    close_by.get_or_insert(Instant::now() + self.stop_wait);
                }
            }
        }
    }

    /// Takes live audio into the replay buffer, reporting a hole before it.
    fn keep(&mut self, start_frame: u64, bytes: Vec<u8>) {
        // A hole (dropped audio) is reported by the sink; the map below
        // keeps the time right across it.
        let frames = (bytes.len() / (2 * usize::from(self.channels))) as u64;
        self.next_stream_frame = start_frame + frames;
        self.replay.push(start_frame, bytes);
    }

    async fn connect(&self) -> Result<Socket, StreamError> {
        let mut url = self.backend.streaming_url().clone();
        {
            let mut pairs = url.query_pairs_mut();
            pairs
                .append_pair("encoding", "linear16")
                .append_pair("sample_rate", &SAMPLE_RATE.to_string())
                .append_pair("channels", &self.channels.to_string())
                .append_pair(
                    "multichannel",
                    if self.channels > 1 { "true" } else { "false" },
                )
                .append_pair(
                    "interim_results",
                    if self.interim { "true" } else { "false" },
                );
            for (key, value) in self.backend.streaming_query() {
                pairs.append_pair(key, value);
            }
        }
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| StreamError::Connect(e.to_string()))?;
        let headers = request.headers_mut();
        for (name, value) in self.backend.headers() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                headers.insert(name, value);
            }
        }
        if let Some(key) = self.backend.api_key() {
            let value = HeaderValue::from_str(&format!("Token {key}"))
                .map_err(|e| StreamError::Connect(format!("api_key: {e}")))?;
            headers.insert("authorization", value);
        }
        let timeout = Duration::from_millis(self.connect_timeout_ms);
        match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request)).await {
            Err(_) => Err(StreamError::ConnectTimeout(self.connect_timeout_ms)),
            Ok(Err(e)) => Err(StreamError::Connect(e.to_string())),
            Ok(Ok((socket, _))) => Ok(socket),
        }
    }

    /// One connection: replays the tail, then relays both ways.
    async fn serve(
        &mut self,
        socket: Socket,
        commands: &mut mpsc::Receiver<Command>,
        close_by: &mut Option<Instant>,
    ) -> Ended {
        let (mut tx, mut rx) = socket.split();
        self.map = TimeMap::default();
        // What no final covers and the buffer no longer holds is lost.
        let replay_from = self.replay.oldest().unwrap_or(self.next_stream_frame);
        if replay_from > self.acked_frame {
            for channel in 0..self.channels {
                self.message(lost_message(
                    channel,
                    self.acked_frame,
                    replay_from,
                    "older than the replay buffer when the upstream connection was lost",
                ));
            }
            self.acked_frame = replay_from;
        }
        let replay: Vec<(u64, Vec<u8>)> = self.replay.chunks().cloned().collect();
        for (start, bytes) in replay {
            let frames = (bytes.len() / (2 * usize::from(self.channels))) as u64;
            self.map.append(start, frames);
            if let Err(e) = tx.send(Message::binary(bytes)).await {
                return Ended::Lost(StreamError::Lost(e.to_string()));
            }
        }
        if std::mem::take(&mut self.pending_finalize) {
            if let Err(e) = tx.send(control("Finalize")).await {
                return Ended::Lost(StreamError::Lost(e.to_string()));
            }
        }
        let mut close_sent = false;
        if close_by.is_some() {
            if let Err(e) = tx.send(control("CloseStream")).await {
                return Ended::Lost(StreamError::Lost(e.to_string()));
            }
            close_sent = true;
        }
        let mut keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
        loop {
            let stop_at = close_by.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                command = commands.recv(), if !close_sent => {
                    let sent = match command {
                        Some(Command::Audio { start_frame, bytes }) => {
                            let frames = (bytes.len() / (2 * usize::from(self.channels))) as u64;
                            self.map.append(start_frame, frames);
                            self.keep(start_frame, bytes.clone());
                            keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
                            tx.send(Message::binary(bytes)).await
                        }
                        Some(Command::Finalize) => tx.send(control("Finalize")).await,
                        Some(Command::Close) => {
                            close_by.get_or_insert(Instant::now() + self.stop_wait);
                            close_sent = true;
                            tx.send(control("CloseStream")).await
                        }
                        None => return Ended::Abandoned,
                    };
                    if let Err(e) = sent {
                        return Ended::Lost(StreamError::Lost(e.to_string()));
                    }
                }
                message = rx.next() => match message {
                    Some(Ok(Message::Text(text))) => self.on_text(text.as_str()),
                    Some(Ok(Message::Close(frame))) => {
                        if close_sent {
                            return Ended::Done;
                        }
                        let why = frame.map(|f| format!(" ({} {})", u16::from(f.code), f.reason.as_str())).unwrap_or_default();
                        return Ended::Lost(StreamError::Closed(why));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(StreamError::Lost(e.to_string())),
                    None if close_sent => return Ended::Done,
                    None => return Ended::Lost(StreamError::Closed(String::new())),
                },
                _ = tokio::time::sleep_until(keepalive_at), if !close_sent => {
                    keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
                    if let Err(e) = tx.send(control("KeepAlive")).await {
                        return Ended::Lost(StreamError::Lost(e.to_string()));
                    }
                }
                _ = tokio::time::sleep_until(stop_at), if close_sent => {
                    tracing::warn!("upstream: no close within stop_wait_ms after CloseStream");
                    return Ended::Abandoned;
                }
            }
        }
    }

    fn message(&self, message: ServerMessage) {
        let _ = self.events.send(SinkEvent::Message(message));
    }

    fn on_text(&mut self, text: &str) {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            tracing::warn!("upstream sent text that is not JSON");
            return;
        };
        match value.get("type").and_then(Value::as_str) {
            Some("Results") => match serde_json::from_value::<Results>(value) {
                Ok(results) => self.on_results(results),
                Err(e) => tracing::warn!(error = %e, "upstream Results unreadable"),
            },
            Some("Error") => {
                tracing::warn!(error = %self.backend.scrub_text(text.chars().take(300).collect()), "upstream error")
            }
            _ => {}
        }
    }

    fn on_results(&mut self, results: Results) {
        let channel = results.channel_index.first().copied().unwrap_or(0);
        let Some(open) = self.open.get_mut(usize::from(channel)) else {
            tracing::warn!(
                channel,
                "upstream result for a channel the stream does not have"
            );
            return;
        };
        let alternative = results.channel.alternatives.into_iter().next();
        let text = alternative
            .as_ref()
            .map(|a| a.transcript.trim().to_owned())
            .unwrap_or_default();
        let start_up = frames_of(results.start);
        let end_up = frames_of(results.start + results.duration.max(0.0));
        let start = seconds_of(self.map.to_stream(start_up));
        let end = seconds_of(self.map.to_stream(end_up));
        if results.is_final {
            let stream_end = self.map.to_stream(end_up);
            if stream_end > self.acked_frame {
                self.acked_frame = stream_end;
                self.replay.ack(stream_end);
            }
            self.map.forget_before(end_up);
        }
        let id = match *open {
            Some(id) => id,
            // Silence: nothing to say, no utterance.
            None if text.is_empty() => return,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                *open = Some(id);
                let _ = self.outcomes.send(Outcome::Created { id, channel });
                id
            }
        };
        let words = alternative.map(|a| {
            a.words
                .into_iter()
                .map(|w| Word {
                    word: w.punctuated_word.unwrap_or(w.word),
                    start: seconds_of(self.map.to_stream(frames_of(w.start))),
                    end: seconds_of(self.map.to_stream(frames_of(w.end))),
                    confidence: w.confidence,
                })
                .collect::<Vec<_>>()
        });
        let transcript = Transcript {
            utterance_id: id,
            channel,
            start,
            end,
            text,
            stable_text: None,
            is_final: results.is_final,
            words: if results.is_final { words } else { None },
            backend: self.backend.name.clone(),
            backend_ms: 0,
        };
        if results.is_final {
            self.open[usize::from(channel)] = None;
            let _ = self.outcomes.send(Outcome::Done {
                id,
                channel,
                message: ServerMessage::Transcript(transcript),
            });
        } else {
            let _ = self.outcomes.send(Outcome::Partial(transcript));
        }
    }

    /// The stream has ended. Without the upstream's clean close, audio no
    /// final covered is reported; open utterances are closed with an error.
    fn give_up(&mut self, complete: bool) {
        if !complete && self.next_stream_frame > self.acked_frame {
            for channel in 0..self.channels {
                self.message(lost_message(
                    channel,
                    self.acked_frame,
                    self.next_stream_frame,
                    "no final result from the upstream before the stream ended",
                ));
            }
        }
        for (channel, open) in self.open.iter_mut().enumerate() {
            if let Some(id) = open.take() {
                let channel = channel as u16;
                let _ = self.outcomes.send(Outcome::Done {
                    id,
                    channel,
                    message: ServerMessage::TranscribeError(TranscribeErrorInfo {
                        code: ErrorCode::TranscribeFailed,
                        message: format!(
                            "utterance {id} (channel {channel}): no final result from the upstream"
                        ),
                        fatal: false,
                        channel,
                        utterance_id: Some(id),
                        start: None,
                        end: None,
                        dropped: None,
                    }),
                });
            }
        }
    }
}

fn control(kind: &str) -> Message {
    Message::text(format!("{{\"type\":\"{kind}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::transcriber::backend::{BackendConfig, BackendKind};

    #[test]
    fn the_time_map_follows_replays_and_holes() {
        let mut map = TimeMap::default();
        // A reconnect replays from stream frame 16000 (1 s).
        map.append(16_000, 8_000);
        map.append(24_000, 8_000);
        assert_eq!(map.to_stream(0), 16_000);
        assert_eq!(map.to_stream(12_000), 28_000);
        // A hole: the next audio starts at 3 s.
        map.append(48_000, 16_000);
        assert_eq!(map.to_stream(16_000), 48_000);
        assert_eq!(map.to_stream(20_000), 52_000);
        map.forget_before(20_000);
        assert_eq!(map.to_stream(20_000), 52_000);
    }

    #[test]
    fn the_replay_buffer_keeps_the_unacknowledged_tail_within_its_bound() {
        let mut replay = ReplayBuffer::new(1, 100);
        replay.push(0, vec![0; 2 * 60]);
        replay.push(60, vec![0; 2 * 60]);
        // 120 frames > 100: the oldest chunk goes.
        assert_eq!(replay.oldest(), Some(60));
        replay.ack(90);
        assert_eq!(replay.oldest(), Some(90));
        assert_eq!(replay.chunks().next().map(|(_, b)| b.len()), Some(2 * 30));
        replay.ack(500);
        assert_eq!(replay.oldest(), None);
    }

    fn refused(change: impl FnOnce(&mut BackendConfig)) -> String {
        let mut config = BackendConfig {
            kind: BackendKind::Deepgram,
            url: "wss://127.0.0.1:1/v1/listen".into(),
            ..BackendConfig::default()
        };
        change(&mut config);
        Backend::new("live", &config).unwrap_err().to_string()
    }

    #[test]
    fn deepgram_settings_are_checked_with_clear_messages() {
        let mut config = BackendConfig {
            kind: BackendKind::Deepgram,
            url: "ws://127.0.0.1:1/v1/listen".into(),
            ..BackendConfig::default()
        };
        config.query.insert("model".into(), Value::from("nova-3"));
        config.query.insert("punctuate".into(), Value::from(true));
        let backend = Backend::new("live", &config).unwrap();
        assert_eq!(
            backend.streaming_query(),
            [
                ("model".to_owned(), "nova-3".to_owned()),
                ("punctuate".to_owned(), "true".to_owned())
            ]
        );
        assert_eq!(
            refused(|c| c.url = "https://127.0.0.1/v1/listen".into()),
            "backend 'live': url must be ws:// or wss:// for kind deepgram, not https"
        );
        assert!(refused(|c| {
            c.query.insert("encoding".into(), Value::from("mulaw"));
        })
        .contains("query.encoding is set by cochlea"));
        assert!(refused(|c| {
            c.query.insert("keyterm".into(), serde_json::json!(["a"]));
        })
        .contains("query.keyterm must be a string, a number or a boolean"));
        assert_eq!(
            refused(|c| c.replay_buffer_ms = 999),
            "backend 'live': replay_buffer_ms must be from 1000 to 120000, not 999"
        );
        // `query` belongs to the streaming kind only.
        let mut openai = BackendConfig {
            url: "http://127.0.0.1:1".into(),
            ..BackendConfig::default()
        };
        openai.query.insert("model".into(), Value::from("x"));
        assert!(Backend::new("o", &openai)
            .unwrap_err()
            .to_string()
            .contains("query is only for kind \"deepgram\""));
    }

    #[test]
    fn peer_seconds_become_frames_without_panics() {
        assert_eq!(frames_of(1.5), 24_000);
        assert_eq!(frames_of(-3.0), 0);
        assert_eq!(frames_of(f64::NAN), 0);
    }
}
