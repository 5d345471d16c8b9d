//! One WebSocket stream session: the task that owns the socket.
//!
//! It reads client messages, runs them through the pipeline, hands blocks to
//! the sink tasks, and writes every event back. It arms exactly one timer (the
//! idle deadline, re-armed lazily when it fires), so an idle session costs a
//! timer entry and nothing else.

use std::sync::Arc;
use std::time::SystemTime;

use actix_web::web::{Bytes, BytesMut};
use actix_ws::{CloseCode, CloseReason, Item, Message, MessageStream};
use metrics::Counter;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use super::close::{codes, from_ws_error, SessionError};
use super::dialect::{Dialect, Inbound};
use super::registry::SessionGuard;
use super::resume::{Parked, ResumeRegistry};
use crate::config::Config;
use crate::pipeline::convert::{Converter, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples, Pipeline, SharedBlock};
use crate::protocol::{
    parse_client_message, ClientMessage, ClosedSummary, Framing, ProtocolError, ServerMessage,
    StartRequest, StartedInfo, StreamStats, PROTOCOL_VERSION,
};
use crate::sinks::transcriber::backend::Backend;
use crate::sinks::transcriber::{Transcriber, TranscriptionService};
use crate::sinks::{self, SinkCommand, SinkContext, SinkError, SinkEvent};
use crate::telemetry::names;

/// Before the Close frame: how long the client must have sent nothing, and
/// the most time spent waiting for that (see [`read_until_quiet`]).
const QUIET: std::time::Duration = std::time::Duration::from_millis(50);
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Limits that come with the credential (a token may shorten the session).
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionLimits {
    pub max_session_ms: Option<u64>,
}

/// What a session needs from the server.
#[derive(Clone)]
pub struct SessionEnv {
    pub config: Arc<Config>,
    pub shutdown: watch::Receiver<bool>,
    pub resumes: Arc<ResumeRegistry>,
    pub transcription: Arc<TranscriptionService>,
}

/// Runs a new, admitted session until it ends or is parked for resume.
pub async fn run(
    id: String,
    ws: actix_ws::Session,
    messages: MessageStream,
    query: Result<StartRequest, ProtocolError>,
    env: SessionEnv,
    guard: SessionGuard,
    limits: SessionLimits,
) {
    run_with_dialect(id, ws, messages, query, env, guard, limits, None).await
}

/// Runs a new, admitted session; with a dialect, the socket speaks another
/// system's protocol ([`super::dialect`]) and the session's own stays inside.
#[allow(clippy::too_many_arguments)]
pub async fn run_with_dialect(
    id: String,
    ws: actix_ws::Session,
    messages: MessageStream,
    query: Result<StartRequest, ProtocolError>,
    env: SessionEnv,
    guard: SessionGuard,
    limits: SessionLimits,
    dialect: Option<Box<dyn Dialect>>,
) {
    let span = tracing::info_span!("session", id = %id, dialect = tracing::field::Empty);
    if let Some(dialect) = &dialect {
        span.record("dialect", dialect.kind().name());
    }
    async move {
        tracing::info!("session opened");
        let mut messages = messages;
        let mut session = Session::new(id, ws, &env);
        session.dialect = dialect;
        session.apply_limits(limits);
        let end = match query {
            Ok(query) => match session.open(query).await {
                Ok(()) => session.run_loop(&mut messages, env.shutdown.clone()).await,
                Err(e) => End::Error(e),
            },
            Err(e) => End::Error(e.into()),
        };
        finish_or_park(session, end, guard, env, &mut messages).await;
    }
    .instrument(span)
    .await
}

/// Re-attaches a parked session to a new connection.
pub async fn resume(
    ws: actix_ws::Session,
    messages: MessageStream,
    session_id: String,
    token: String,
    env: SessionEnv,
) {
    let span = tracing::info_span!("session", id = %session_id);
    async move {
        let wait = std::time::Duration::from_secs(3);
        let (parked, takeover) = match env.resumes.claim(&session_id, &token, wait).await {
            Ok(claimed) => claimed,
            Err(error) => {
                metrics::counter!(names::RESUMES_REJECTED_TOTAL).increment(1);
                refuse_in_span(ws, messages, SessionError::Resume(error)).await;
                return;
            }
        };
        let mut session = *parked.session;
        session.reattach(ws, takeover);
        metrics::counter!(names::RESUMES_TOTAL).increment(1);
        let resume_from_seq = session.resume_from_seq();
        tracing::info!(
            resume_from_seq,
            resumes = session.resumes,
            "session resumed"
        );
        session.send_started(Some(resume_from_seq)).await;
        let mut messages = messages;
        let end = session.run_loop(&mut messages, env.shutdown.clone()).await;
        finish_or_park(session, end, parked.guard, env, &mut messages).await;
    }
    .instrument(span)
    .await
}

/// Ends a session, or, when its connection dropped and it can be resumed,
/// parks it for `resume_window_ms` and ends it only if nobody claims it.
async fn finish_or_park(
    mut session: Session,
    end: End,
    guard: SessionGuard,
    env: SessionEnv,
    messages: &mut MessageStream,
) {
    let dropped = matches!(end, End::ClientGone { .. } | End::TakenOver);
    let window = std::time::Duration::from_millis(env.config.resume_window_ms);
    if !(dropped && session.resumable() && !window.is_zero()) {
        env.resumes.remove(&session.id);
        session.end(end, Some(messages)).await;
        drop(guard);
        return;
    }
    if let End::TakenOver = end {
        // The old connection may still be readable by someone: say why it ends.
        let reason = CloseReason {
            code: CloseCode::Away,
            description: Some("resumed_elsewhere".into()),
        };
        let _ = session.ws.clone().close(Some(reason)).await;
    }
    session.generation += 1;
    let generation = session.generation;
    let id = session.id.clone();
    tracing::info!(
        window_ms = env.config.resume_window_ms,
        "connection lost; session parked for resume"
    );
    metrics::gauge!(names::SESSIONS_PARKED).increment(1.0);
    env.resumes.park(
        &id,
        Parked {
            session: Box::new(session),
            guard,
            generation,
        },
    );
    // One one-shot timer per parked session, not a periodic one.
    let mut shutdown = env.shutdown.clone();
    let reason = tokio::select! {
        () = tokio::time::sleep(window) => End::ResumeExpired,
        () = wait_for_shutdown(&mut shutdown) => End::Shutdown,
    };
    metrics::gauge!(names::SESSIONS_PARKED).decrement(1.0);
    if let Some(parked) = env.resumes.take_expired(&id, generation) {
        tracing::info!("resume window over: finishing the session");
        parked.session.end(reason, None).await;
        drop(parked.guard);
    }
}

/// Refuses a connection that was upgraded but cannot be served (server full,
/// shutting down): the client gets an `error` and a close code it can act on,
/// which a browser could not read from a failed HTTP upgrade.
pub async fn refuse(
    id: String,
    ws: actix_ws::Session,
    messages: MessageStream,
    error: SessionError,
) {
    let span = tracing::info_span!("session", id = %id);
    refuse_in_span(ws, messages, error).instrument(span).await
}

async fn refuse_in_span(
    mut ws: actix_ws::Session,
    mut messages: MessageStream,
    error: SessionError,
) {
    {
        let (code, close_code) = error.codes();
        tracing::warn!(%error, "session refused");
        metrics::counter!(names::SESSIONS_REJECTED_TOTAL, "reason" => code).increment(1);
        let message = ServerMessage::Error {
            code,
            message: error.to_string(),
            fatal: true,
        };
        let _ = ws.text(message.to_json()).await;
        read_until_quiet(&mut messages).await;
        let _ = ws
            .close(Some(CloseReason {
                code: CloseCode::from(close_code),
                description: Some(code.to_owned()),
            }))
            .await;
    }
}

/// Reads and discards what the client is still sending, until it has been
/// quiet for [`QUIET`] (or the connection ends, or [`DRAIN_LIMIT`] passes),
/// so that the Close frame goes out on a socket with nothing left unread.
///
/// Why: when the server sends its Close frame, the response ends and the
/// connection is closed at once. Bytes the client sent that nobody read
/// (audio still in flight, or a browser's `start` racing a refusal) make the
/// kernel answer the close with a TCP reset instead of a FIN, and the reset
/// discards what the server had not yet transmitted, often the Close frame
/// itself: a browser then reports close code 1006 instead of the real one,
/// and sometimes loses the `error` too. Found by the browser tests
/// (tests/integration/browser.rs). A client that stops sending on a fatal
/// `error`, as the page does, is quiet within a round trip.
async fn read_until_quiet(messages: &mut MessageStream) {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let wait = deadline.min(Instant::now() + QUIET);
        match tokio::time::timeout_at(wait, messages.recv()).await {
            Ok(Some(Ok(Message::Close(_)) | Err(_))) | Ok(None) | Err(_) => return,
            Ok(Some(Ok(_))) => {}
        }
    }
}

impl End {
    /// The server ends the session while the client may still be sending
    /// (see [`read_until_quiet`]).
    fn client_may_still_send(&self) -> bool {
        matches!(self, End::Error(_) | End::Shutdown)
    }
}

enum End {
    /// The client sent `stop`.
    Stop,
    /// The connection went away without `stop`; `close_frame` if the client
    /// sent a Close frame (which must be answered).
    ClientGone {
        close_frame: bool,
    },
    Error(SessionError),
    Shutdown,
    /// A resuming connection took the session over.
    TakenOver,
    /// The connection dropped and nobody resumed within the window.
    ResumeExpired,
}

/// A message being reassembled from continuation frames.
enum Partial {
    Text(BytesMut),
    Binary(BytesMut),
}

struct SinkSlot {
    name: &'static str,
    /// Bytes this sink may have pending (`max_pending_bytes_per_sink`).
    budget: Arc<tokio::sync::Semaphore>,
    budget_bytes: usize,
    /// Dropped when the session ends, which tells the sink to finish.
    commands: Option<mpsc::Sender<SinkCommand>>,
    /// False once the sink failed: it will answer no more flushes.
    alive: bool,
    flushes_done: u64,
}

/// Counter handles resolved once per session, so the per-frame path does no
/// registry lookups.
struct AudioCounters {
    ingest_seconds: metrics::Histogram,
    bytes: Counter,
    frames: Counter,
    sample_frames: Counter,
}

/// Sinks waiting for a container's header to tell the stream's format.
struct PendingSinks {
    names: Vec<String>,
    transcribe: Option<Arc<Backend>>,
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// Sinks that want the same format, and the one converter that serves them.
struct SinkGroup {
    converter: Converter,
    members: Vec<usize>,
}

struct Active {
    pipeline: Pipeline,
    sinks: Vec<SinkSlot>,
    groups: Vec<SinkGroup>,
    pending_sinks: Option<PendingSinks>,
    /// Kept only until the sinks are spawned (see `sinks::spawn`).
    events_tx: Option<mpsc::UnboundedSender<SinkEvent>>,
    events: mpsc::UnboundedReceiver<SinkEvent>,
    /// Pipeline counters as last added to the server-wide metrics.
    exported: crate::pipeline::PipelineStats,
    /// When the client was last told about damaged audio (at most once a second).
    damage_reported_at: Option<Instant>,
    /// Reused for every message to avoid an allocation per frame.
    blocks: Vec<AudioBlock>,
    counters: AudioCounters,
}

/// One session's whole state. It is `Send`: a resumed session moves to the
/// task of the connection that resumed it.
pub struct Session {
    id: String,
    ws: actix_ws::Session,
    config: Arc<Config>,
    query: StartRequest,
    started_at: SystemTime,
    active: Option<Active>,
    last_activity: Instant,
    /// When to look at idleness next; moved lazily, not on every message.
    idle_check_at: Instant,
    partial: Option<Partial>,
    flushes_requested: u64,
    flushes_reported: u64,
    /// `framing=seq` sessions: the token a resuming connection must show.
    resume_token: Option<String>,
    takeover: Option<Arc<Notify>>,
    /// Highest `seq` handed to the sinks, and the highest acknowledged.
    handed_seq: Option<u32>,
    acked_seq: Option<u32>,
    last_ack_at: Instant,
    last_stats_at: Instant,
    audio_since_stats: bool,
    resumes: u32,
    generation: u64,
    resume_registry: Arc<ResumeRegistry>,
    transcription: Arc<TranscriptionService>,
    /// What `started` said, to say it again on resume.
    started_info: Option<StartedInfo>,
    /// `max_session_duration_ms` (or the token's, if shorter) from connect.
    ends_at: Option<Instant>,
    session_limit_ms: u64,
    /// For `max_realtime_factor`: when audio started, and when the client
    /// was warned that it sends too fast.
    first_audio_at: Option<Instant>,
    too_fast_since: Option<Instant>,
    /// Another system's protocol on this socket; `None`: cochlea's own.
    dialect: Option<Box<dyn Dialect>>,
}

impl Session {
    fn new(id: String, ws: actix_ws::Session, env: &SessionEnv) -> Self {
        let config = env.config.clone();
        Self {
            id,
            ws,
            config: config.clone(),
            resume_registry: env.resumes.clone(),
            transcription: env.transcription.clone(),
            started_info: None,
            ends_at: None,
            session_limit_ms: 0,
            first_audio_at: None,
            too_fast_since: None,
            dialect: None,
            query: StartRequest::default(),
            started_at: SystemTime::now(),
            active: None,
            last_activity: Instant::now(),
            idle_check_at: Instant::now() + config.idle_timeout(),
            partial: None,
            flushes_requested: 0,
            flushes_reported: 0,
            resume_token: None,
            takeover: None,
            handed_seq: None,
            acked_seq: None,
            last_ack_at: Instant::now(),
            last_stats_at: Instant::now(),
            audio_since_stats: false,
            resumes: 0,
            generation: 0,
        }
    }

    fn apply_limits(&mut self, limits: SessionLimits) {
        let configured = (self.config.max_session_duration_ms > 0)
            .then_some(self.config.max_session_duration_ms);
        let max_ms = match (configured, limits.max_session_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.session_limit_ms = max_ms.unwrap_or(0);
        self.ends_at = max_ms.map(|ms| Instant::now() + std::time::Duration::from_millis(ms));
    }

    /// Checks the audio rate against `max_realtime_factor`: a client over it
    /// is warned once, and closed if it is still over a second later.
    async fn check_rate(&mut self, now: Instant) -> Result<(), SessionError> {
        let limit = self.config.max_realtime_factor;
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        if limit <= 0.0 {
            return Ok(());
        }
        let first = *self.first_audio_at.get_or_insert(now);
        let elapsed = now.saturating_duration_since(first).as_secs_f64();
        let rate = f64::from(active.pipeline.declared_format().sample_rate);
        let media = active.pipeline.media_frames() as f64 / rate;
        let burst = self.config.realtime_burst_ms as f64 / 1000.0;
        if media <= burst + elapsed * limit {
            self.too_fast_since = None;
            return Ok(());
        }
        let factor = if elapsed > 0.0 {
            (media - burst).max(0.0) / elapsed
        } else {
            f64::INFINITY
        };
        match self.too_fast_since {
            None => {
                self.too_fast_since = Some(now);
                metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_realtime_factor")
                    .increment(1);
                self.send(&ServerMessage::Error {
                    code: "audio_too_fast",
                    message: format!(
                        "audio arrives {factor:.1}x faster than real time (limit {limit:.1}x); slow down or the session closes in 1 s"
                    ),
                    fatal: false,
                })
                .await;
                Ok(())
            }
            Some(since)
                if now.saturating_duration_since(since) >= std::time::Duration::from_secs(1) =>
            {
                Err(SessionError::TooFast { factor, limit })
            }
            Some(_) => Ok(()),
        }
    }

    /// Starts the stream at once when the query string carries the format.
    async fn open(&mut self, query: StartRequest) -> Result<(), SessionError> {
        let starts_now = query.starts_stream();
        self.query = query;
        if starts_now {
            self.start(StartRequest::default()).await?;
        }
        Ok(())
    }

    /// Binds a parked session to the connection that resumed it.
    fn reattach(&mut self, ws: actix_ws::Session, takeover: Arc<Notify>) {
        self.ws = ws;
        self.takeover = Some(takeover);
        self.partial = None;
        self.resumes += 1;
        self.last_activity = Instant::now();
        self.idle_check_at = self.last_activity + self.config.idle_timeout();
        self.acked_seq = None;
    }

    fn resumable(&self) -> bool {
        self.resume_token.is_some() && self.active.is_some()
    }

    /// The first `seq` the server still needs.
    fn resume_from_seq(&self) -> u32 {
        self.handed_seq.map_or(0, |s| s.saturating_add(1))
    }

    /// The earliest moment the loop must wake up for: idleness, a due ack,
    /// due stats. One timer per session, moved only when this changes.
    fn next_deadline(&self) -> Instant {
        let mut at = self.idle_check_at;
        if self.handed_seq.is_some() && self.handed_seq != self.acked_seq {
            at = at.min(self.last_ack_at + self.ack_interval());
        }
        if self.audio_since_stats && self.config.stats_interval_ms > 0 {
            at = at.min(self.last_stats_at + self.stats_interval());
        }
        if let Some(held) = self
            .active
            .as_ref()
            .and_then(|a| a.pipeline.next_deadline())
        {
            at = at.min(Instant::from_std(held));
        }
        at
    }

    /// Releases audio the jitter buffer stopped waiting for.
    async fn release_held_audio(&mut self, now: Instant) -> Result<(), SessionError> {
        let stall = self.stall_timeout();
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut blocks = std::mem::take(&mut active.blocks);
        blocks.clear();
        active.pipeline.poll(now.into_std(), &mut blocks);
        let sent = dispatch(&active.sinks, &mut active.groups, &mut blocks, stall).await;
        active.blocks = blocks;
        self.handed_seq = active.pipeline.last_seq();
        sent
    }

    fn stall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.sink_stall_timeout_ms)
    }

    fn ack_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.ack_interval_ms)
    }

    fn stats_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.stats_interval_ms)
    }

    /// Sends an ack and stats if they are due; also runs on the message path,
    /// so a streaming session needs no timer wake-ups for them.
    async fn send_due_reports(&mut self, now: Instant) {
        if self.handed_seq.is_some()
            && self.handed_seq != self.acked_seq
            && now >= self.last_ack_at + self.ack_interval()
        {
            if let Some(seq) = self.handed_seq {
                self.acked_seq = Some(seq);
                self.last_ack_at = now;
                self.send(&ServerMessage::Ack { seq }).await;
            }
        }
        if self.audio_since_stats
            && self.config.stats_interval_ms > 0
            && now >= self.last_stats_at + self.stats_interval()
        {
            self.last_stats_at = now;
            self.audio_since_stats = false;
            self.export_jitter_metrics();
            if let Some(stats) = self.stream_stats() {
                self.send(&ServerMessage::Stats(stats)).await;
            }
        }
    }

    /// Adds what the jitter counters gained since the last report to the
    /// server-wide metrics (once per report, not per frame).
    fn export_jitter_metrics(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let now = active.pipeline.stats();
        let was = std::mem::replace(&mut active.exported, now);
        metrics::counter!(names::JITTER_LOST_PACKETS_TOTAL)
            .increment(now.lost_messages.saturating_sub(was.lost_messages));
        metrics::counter!(names::JITTER_LATE_PACKETS_TOTAL)
            .increment(now.late_messages.saturating_sub(was.late_messages));
        metrics::counter!(names::JITTER_CONCEALED_SAMPLE_FRAMES_TOTAL)
            .increment(now.filled_frames().saturating_sub(was.filled_frames()));
    }

    fn stream_stats(&self) -> Option<StreamStats> {
        let active = self.active.as_ref()?;
        let stats = active.pipeline.stats();
        let rate = f64::from(active.pipeline.declared_format().sample_rate);
        Some(StreamStats {
            media_seconds: active.pipeline.media_frames() as f64 / rate,
            packets_received: stats.audio_messages,
            packets_duplicated: stats.duplicate_messages,
            packets_late: stats.late_messages,
            packets_lost: stats.lost_messages,
            packets_damaged: stats.damaged_packets,
            concealed_frames: stats.filled_frames(),
            current_delay_ms: stats.current_delay_ms,
            target_delay_ms: stats.target_delay_ms,
            resumes: self.resumes,
        })
    }

    async fn send(&mut self, message: &ServerMessage) {
        if let Some(dialect) = self.dialect.as_mut() {
            let mut frames = Vec::new();
            dialect.render(message, &mut frames);
            for frame in frames {
                if self.ws.text(frame).await.is_err() {
                    tracing::debug!("client gone; message not sent");
                    return;
                }
            }
            return;
        }
        if self.ws.text(message.to_json()).await.is_err() {
            tracing::debug!("client gone; message not sent");
        }
    }

    /// The main loop: returns how the connection ended.
    async fn run_loop(
        &mut self,
        messages: &mut MessageStream,
        mut shutdown: watch::Receiver<bool>,
    ) -> End {
        let mut armed = self.next_deadline();
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);
        let takeover = self.takeover.clone();
        // Made once, not once per message: each one registers a waiter under
        // a lock when first polled (about 2.5 % of the server's CPU at 1,000
        // streams, BENCHMARKS.md).
        let shutdown_signal = wait_for_shutdown(&mut shutdown);
        tokio::pin!(shutdown_signal);
        let takeover_signal = wait_for_takeover(takeover.as_deref());
        tokio::pin!(takeover_signal);

        loop {
            let wanted = self.next_deadline();
            if wanted != armed {
                armed = wanted;
                timer.as_mut().reset(armed);
            }
            let step = tokio::select! {
                biased;
                () = &mut shutdown_signal => return End::Shutdown,
                () = &mut takeover_signal => return End::TakenOver,
                event = next_event(&mut self.active) => self.on_sink_event(event).await.map(|()| None),
                message = messages.recv() => match message {
                    None => return End::ClientGone { close_frame: false },
                    Some(Ok(message)) => self.on_message(message).await,
                    Some(Err(actix_ws::ProtocolError::Io(e)))
                        if e.kind() != std::io::ErrorKind::InvalidData =>
                    {
                        // actix-ws reports the lost connection before it has
                        // decoded the frames already buffered; polling on
                        // yields them and then the end. Stopping here would
                        // lose the client's last audio.
                        tracing::info!(error = %e, "connection lost; draining what arrived");
                        Ok(None)
                    }
                    Some(Err(e)) => Err(from_ws_error(e, self.config.max_message_bytes).into()),
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if self.ends_at.is_some_and(|at| now >= at) {
                        metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_session_duration")
                            .increment(1);
                        return End::Error(SessionError::MaxDuration {
                            max_ms: self.session_limit_ms,
                        });
                    }
                    // Far in the future until next_deadline() says otherwise.
                    armed = now + std::time::Duration::from_secs(86_400);
                    timer.as_mut().reset(armed);
                    if now >= self.idle_check_at {
                        let idle_until = self.last_activity + self.config.idle_timeout();
                        if now >= idle_until {
                            return End::Error(SessionError::IdleTimeout {
                                idle_timeout_ms: self.config.idle_timeout_ms,
                                close_code: self.config.idle_close_code,
                            });
                        }
                        self.idle_check_at = idle_until;
                    }
                    match self.release_held_audio(now).await {
                        Ok(()) => {
                            self.send_due_reports(now).await;
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match step {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(error) => return End::Error(error),
            }
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<Option<End>, SessionError> {
        let max_bytes = self.config.max_message_bytes;
        match message {
            Message::Text(text) => self.on_text_message(&text).await,
            Message::Binary(data) => self.on_binary_message(&data).await,
            Message::Continuation(item) => {
                let complete = match (item, self.partial.take()) {
                    (Item::FirstText(b), None) => {
                        self.partial = Some(Partial::Text(BytesMut::from(&b[..])));
                        None
                    }
                    (Item::FirstBinary(b), None) => {
                        self.partial = Some(Partial::Binary(BytesMut::from(&b[..])));
                        None
                    }
                    (Item::Continue(b), Some(mut p)) => {
                        extend(&mut p, &b);
                        self.partial = Some(p);
                        None
                    }
                    (Item::Last(b), Some(mut p)) => {
                        extend(&mut p, &b);
                        Some(p)
                    }
                    _ => {
                        return Err(ProtocolError::WebSocket(
                            "continuation frame out of sequence".into(),
                        )
                        .into())
                    }
                };
                let buffered = match (&self.partial, &complete) {
                    (Some(p), _) | (None, Some(p)) => partial_len(p),
                    (None, None) => 0,
                };
                if buffered > max_bytes {
                    return Err(ProtocolError::MessageTooBig { max_bytes }.into());
                }
                match complete {
                    Some(Partial::Text(bytes)) => match std::str::from_utf8(&bytes) {
                        Ok(text) => self.on_text_message(text).await,
                        Err(_) => Err(ProtocolError::InvalidUtf8.into()),
                    },
                    Some(Partial::Binary(bytes)) => self.on_binary_message(&bytes.freeze()).await,
                    None => Ok(None),
                }
            }
            Message::Ping(payload) => {
                let _ = self.ws.pong(&payload).await;
                Ok(None)
            }
            Message::Pong(_) | Message::Nop => Ok(None),
            Message::Close(reason) => {
                tracing::info!(?reason, "client closed the connection without stop");
                Ok(Some(End::ClientGone { close_frame: true }))
            }
        }
    }

    /// A complete text message: the native protocol's, or the dialect's.
    async fn on_text_message(&mut self, text: &str) -> Result<Option<End>, SessionError> {
        let Some(dialect) = self.dialect.as_mut() else {
            return self.on_text(text).await;
        };
        let mut inputs = Vec::new();
        dialect.on_text(text, &mut inputs)?;
        self.on_inbound(inputs).await
    }

    /// A complete binary message: audio, or the dialect's.
    async fn on_binary_message(&mut self, data: &Bytes) -> Result<Option<End>, SessionError> {
        let Some(dialect) = self.dialect.as_mut() else {
            return self.on_audio(data).await.map(|()| None);
        };
        let mut inputs = Vec::new();
        dialect.on_binary(data, &mut inputs)?;
        self.on_inbound(inputs).await
    }

    /// What a dialect made of a message, in the native session's terms.
    async fn on_inbound(&mut self, inputs: Vec<Inbound>) -> Result<Option<End>, SessionError> {
        for input in inputs {
            match input {
                Inbound::Start {
                    request,
                    max_session_ms,
                } => {
                    if self.active.is_some() {
                        return Err(ProtocolError::AlreadyStarted.into());
                    }
                    if max_session_ms.is_some() {
                        self.apply_limits(SessionLimits { max_session_ms });
                    }
                    self.last_activity = Instant::now();
                    self.start(request).await?;
                }
                Inbound::Audio(data) => self.on_audio(&data).await?,
                Inbound::Keepalive => self.last_activity = Instant::now(),
                Inbound::Flush => {
                    self.last_activity = Instant::now();
                    self.flush().await;
                }
                Inbound::Stop => return Ok(Some(End::Stop)),
                Inbound::Reply(text) => {
                    let _ = self.ws.text(text).await;
                }
                Inbound::Event { name, detail } => {
                    self.last_activity = Instant::now();
                    let dialect = self.dialect.as_ref().map_or("native", |d| d.kind().name());
                    tracing::info!(event = name, %detail, "dialect event");
                    metrics::counter!(names::DIALECT_EVENTS_TOTAL, "dialect" => dialect, "event" => name)
                        .increment(1);
                }
            }
        }
        Ok(None)
    }

    async fn on_text(&mut self, text: &str) -> Result<Option<End>, SessionError> {
        match parse_client_message(text)? {
            ClientMessage::Start(request) => {
                if self.active.is_some() {
                    return Err(ProtocolError::AlreadyStarted.into());
                }
                self.last_activity = Instant::now();
                self.start(request).await?;
                Ok(None)
            }
            ClientMessage::Keepalive => {
                self.last_activity = Instant::now();
                Ok(None)
            }
            ClientMessage::Flush => {
                self.last_activity = Instant::now();
                self.flush().await;
                Ok(None)
            }
            ClientMessage::Stop => Ok(Some(End::Stop)),
        }
    }

    /// Resolves the format and creates the pipeline. The sinks are created,
    /// and `started` is sent, as soon as the stream format is known: at once,
    /// or for a container once its header has arrived.
    async fn start(&mut self, start: StartRequest) -> Result<(), SessionError> {
        let request = std::mem::take(&mut self.query).merged_with(start);
        let format = request.resolve()?;
        let sink_names = request
            .sinks
            .clone()
            .unwrap_or_else(|| self.config.default_sinks.clone());
        sinks::check_names(&sink_names)?;
        let transcribe = self
            .transcription
            .select(request.transcribe.as_deref())
            .map_err(SinkError::UnknownBackend)?;
        let mut pipeline = Pipeline::new(format, self.config.max_gap_ms)?;
        // Opus is decoded straight at the rate the sinks need, when that is
        // lower than the stream's: cheaper than decoding and resampling.
        pipeline.decode_for_sinks(&sinks::wanted_rates(
            &sink_names,
            &self.config,
            transcribe.is_some(),
        ))?;
        // A dialect's seq framing is the server's own (Twilio's interleaver):
        // those platforms never resume.
        if format.framing == Framing::Seq
            && self.config.resume_window_ms > 0
            && self.dialect.is_none()
        {
            // 122 random bits: the only thing standing between a session id,
            // which appears in logs and file names, and taking the stream over.
            let token = uuid::Uuid::new_v4().simple().to_string();
            self.takeover = Some(self.resume_registry.attach_new(&self.id, &token));
            self.resume_token = Some(token);
        }

        let (events_tx, events) = mpsc::unbounded_channel();
        let encoding = format.encoding.as_str();
        let counters = AudioCounters {
            ingest_seconds: metrics::histogram!(names::INGEST_LATENCY_SECONDS),
            bytes: metrics::counter!(names::AUDIO_RECEIVED_BYTES_TOTAL, "encoding" => encoding),
            frames: metrics::counter!(names::AUDIO_RECEIVED_FRAMES_TOTAL, "encoding" => encoding),
            sample_frames: metrics::counter!(
                names::AUDIO_DECODED_SAMPLE_FRAMES_TOTAL,
                "encoding" => encoding,
                "sample_rate" => format.sample_rate.to_string()
            ),
        };
        self.active = Some(Active {
            pipeline,
            sinks: Vec::new(),
            groups: Vec::new(),
            pending_sinks: Some(PendingSinks {
                names: sink_names,
                transcribe,
                metadata: request.metadata,
            }),
            events_tx: Some(events_tx),
            events,
            exported: Default::default(),
            damage_reported_at: None,
            blocks: Vec::with_capacity(2),
            counters,
        });
        self.open_sinks_when_format_known().await
    }

    async fn open_sinks_when_format_known(&mut self) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(format) = active.pipeline.format().copied() else {
            return Ok(());
        };
        let Some(pending) = active.pending_sinks.take() else {
            return Ok(());
        };
        let context = SinkContext {
            session_id: self.id.clone(),
            format,
            metadata: pending.metadata.clone(),
            started_at: self.started_at,
        };
        let Some(events_tx) = active.events_tx.take() else {
            return Ok(());
        };
        let mut built = sinks::build(&pending.names, &context, &self.config)?;
        if let Some(backend) = pending.transcribe.clone() {
            built.push(Box::new(Transcriber::start(
                &context,
                &self.transcription,
                backend,
                events_tx.clone(),
            )));
        }
        // The blocks come at the pipeline's block rate, which for Opus may
        // be below the stream's; a sink's "the stream's own rate" still means
        // the declared one, so it is resolved before the converter is made.
        let block_rate = active.pipeline.block_rate();
        let mut groups: Vec<SinkGroup> = Vec::new();
        for (index, sink) in built.iter().enumerate() {
            let asked = sink.output_format();
            let wanted = OutputFormat {
                sample_rate: Some(asked.rate(format.sample_rate)),
                ..asked
            };
            // Decoding below a sink's rate would mean resampling up: worse
            // audio, still correctly labelled.
            debug_assert!(
                block_rate == format.sample_rate || asked.rate(format.sample_rate) <= block_rate,
                "{} wants {:?} but Opus is decoded at {block_rate} Hz: sinks::wanted_rates is out of date",
                sink.name(),
                wanted.sample_rate,
            );
            match groups.iter_mut().find(|g| g.converter.format() == wanted) {
                Some(group) => group.members.push(index),
                None => groups.push(SinkGroup {
                    converter: Converter::new(block_rate, format.channels, wanted)?,
                    members: vec![index],
                }),
            }
        }
        active.groups = groups;
        active.sinks = built
            .into_iter()
            .enumerate()
            .map(|(index, sink)| {
                let handle = sinks::spawn(
                    index,
                    sink,
                    self.config.sink_queue_blocks,
                    events_tx.clone(),
                );
                SinkSlot {
                    name: handle.name,
                    budget: Arc::new(tokio::sync::Semaphore::new(
                        self.config.max_pending_bytes_per_sink,
                    )),
                    budget_bytes: self.config.max_pending_bytes_per_sink,
                    commands: Some(handle.commands),
                    alive: true,
                    flushes_done: 0,
                }
            })
            .collect();
        // Only the sink tasks hold senders now.
        drop(events_tx);

        let started = StartedInfo {
            protocol_version: PROTOCOL_VERSION,
            session_id: self.id.clone(),
            format,
            // Sink names, once each (a split recorder runs one sink per channel).
            sinks: active.sinks.iter().fold(Vec::new(), |mut names, s| {
                if !names.iter().any(|n: &String| n == s.name) {
                    names.push(s.name.to_owned());
                }
                names
            }),
            transcribe: pending.transcribe.as_ref().map(|b| b.name.clone()),
            metadata: pending.metadata,
            max_message_bytes: self.config.max_message_bytes,
            idle_timeout_ms: self.config.idle_timeout_ms,
            resume_token: self.resume_token.clone(),
            resume_from_seq: None,
        };
        tracing::info!(
            encoding = format.encoding.as_str(),
            sample_rate = format.sample_rate,
            channels = format.channels,
            framing = format.framing.as_str(),
            sinks = ?started.sinks,
            "stream started"
        );
        self.started_info = Some(started);
        self.send_started(None).await;
        Ok(())
    }

    /// Sends `started`; on a resume, with the first `seq` still needed.
    async fn send_started(&mut self, resume_from_seq: Option<u32>) {
        if let Some(mut started) = self.started_info.clone() {
            started.resume_from_seq = resume_from_seq;
            self.send(&ServerMessage::Started(started)).await;
        }
    }

    async fn on_audio(&mut self, data: &Bytes) -> Result<(), SessionError> {
        let arrived = std::time::Instant::now();
        let stall = self.stall_timeout();
        let Some(active) = self.active.as_mut() else {
            return Err(ProtocolError::AudioBeforeStart.into());
        };
        // One clock read serves all three (clock reads showed in profiles).
        self.last_activity = Instant::from_std(arrived);
        let before = active.pipeline.stats();
        active.blocks.clear();
        let pushed = active.pipeline.push(data, arrived, &mut active.blocks);
        let after = active.pipeline.stats();
        let damage = active.pipeline.take_damage();
        if after.damaged_packets > before.damaged_packets {
            metrics::counter!(names::AUDIO_DAMAGED_PACKETS_TOTAL)
                .increment(after.damaged_packets - before.damaged_packets);
        }
        // Even when the push failed, what it completed before goes out.
        let mut blocks = std::mem::take(&mut active.blocks);
        self.open_sinks_when_format_known().await?;
        if let Some(damage) = damage {
            self.report_damage(damage, after.damaged_packets).await;
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };

        active.counters.bytes.increment(data.len() as u64);
        active.counters.frames.increment(1);
        active
            .counters
            .sample_frames
            .increment(after.decoded_frames - before.decoded_frames);
        if after.gap_frames > before.gap_frames {
            metrics::counter!(names::AUDIO_GAP_SAMPLE_FRAMES_TOTAL)
                .increment(after.gap_frames - before.gap_frames);
        }
        if after.duplicate_messages > before.duplicate_messages {
            metrics::counter!(names::AUDIO_DUPLICATE_MESSAGES_TOTAL).increment(1);
        }

        let sent = dispatch(&active.sinks, &mut active.groups, &mut blocks, stall).await;
        active.blocks = blocks;
        active
            .counters
            .ingest_seconds
            .record(arrived.elapsed().as_secs_f64());
        sent?;
        // Everything up to this seq is now queued with every sink.
        self.handed_seq = active.pipeline.last_seq();
        self.audio_since_stats = true;
        let now = Instant::now();
        self.send_due_reports(now).await;
        pushed.map_err(SessionError::from)?;
        self.check_rate(now).await
    }

    /// Tells the client that audio was damaged and concealed: a non-fatal
    /// `error`, at most once a second so a broken stream cannot flood it.
    async fn report_damage(&mut self, damage: String, damaged_so_far: u64) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let now = Instant::now();
        if active
            .damage_reported_at
            .is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(1))
        {
            return;
        }
        active.damage_reported_at = Some(now);
        tracing::warn!(%damage, damaged_so_far, "damaged audio concealed");
        self.send(&ServerMessage::Error {
            code: "audio_damaged",
            message: format!("{damage}; concealed ({damaged_so_far} damaged so far)"),
            fatal: false,
        })
        .await;
    }

    async fn flush(&mut self) {
        self.flushes_requested += 1;
        if let Some(active) = &self.active {
            for slot in &active.sinks {
                if let Some(commands) = &slot.commands {
                    let _ = commands.send(SinkCommand::Flush).await;
                }
            }
        }
        self.report_flushes().await;
    }

    /// Sends `flushed` for every flush that all live sinks have processed.
    async fn report_flushes(&mut self) {
        let done = self
            .active
            .as_ref()
            .and_then(|a| {
                a.sinks
                    .iter()
                    .filter(|s| s.alive)
                    .map(|s| s.flushes_done)
                    .min()
            })
            .unwrap_or(self.flushes_requested);
        while self.flushes_reported < done.min(self.flushes_requested) {
            self.flushes_reported += 1;
            self.send(&ServerMessage::Flushed).await;
        }
    }

    async fn on_sink_event(&mut self, event: SinkEvent) -> Result<(), SessionError> {
        match event {
            SinkEvent::Message(message) => {
                if matches!(message, ServerMessage::Recording(_)) {
                    metrics::counter!(names::RECORDINGS_TOTAL).increment(1);
                }
                self.send(&message).await;
                Ok(())
            }
            SinkEvent::Flushed { index } => {
                if let Some(slot) = self.active.as_mut().and_then(|a| a.sinks.get_mut(index)) {
                    slot.flushes_done += 1;
                }
                self.report_flushes().await;
                Ok(())
            }
            SinkEvent::Failed { index, error } => {
                if let Some(slot) = self.active.as_mut().and_then(|a| a.sinks.get_mut(index)) {
                    slot.commands = None;
                    slot.alive = false;
                }
                Err(error.into())
            }
        }
    }

    /// Finishes every sink, reports, and closes: the one exit of a session.
    async fn end(mut self, end: End, messages: Option<&mut MessageStream>) {
        let client_may_send = end.client_may_still_send();
        let client_may_listen = !matches!(
            end,
            End::ClientGone { .. } | End::TakenOver | End::ResumeExpired
        );
        if let End::ClientGone { close_frame: true } = end {
            // Answer the client's Close at once; the sinks finish regardless.
            let normal = CloseReason {
                code: CloseCode::Normal,
                description: None,
            };
            let _ = self.ws.clone().close(Some(normal)).await;
        }
        let (reason, mut close_code, error) = match end {
            End::Stop => ("stop", codes::NORMAL, None),
            End::ClientGone { .. } => ("client_gone", codes::NORMAL, None),
            End::Shutdown => ("shutdown", codes::GOING_AWAY, None),
            End::TakenOver => ("client_gone", codes::GOING_AWAY, None),
            End::ResumeExpired => ("resume_expired", codes::NORMAL, None),
            End::Error(e) => {
                let close_code = e.codes().1;
                let reason = match e {
                    SessionError::IdleTimeout { .. } => "idle_timeout",
                    _ => "error",
                };
                (reason, close_code, Some(e))
            }
        };
        let mut close_text = reason;
        if let Some(error) = &error {
            let (code, _) = error.codes();
            close_text = code;
            tracing::warn!(%error, code, close_code, "session error");
            metrics::counter!(names::SESSION_ERRORS_TOTAL, "kind" => code).increment(1);
            self.send(&ServerMessage::Error {
                code,
                message: error.to_string(),
                fatal: true,
            })
            .await;
        }

        let mut stats = Default::default();
        let mut media_frames = 0;
        let mut sample_rate = 1;
        // Audio a dialect still holds (Twilio's track aligner) goes first.
        let mut held = Vec::new();
        if let Some(dialect) = self.dialect.as_mut() {
            dialect.finish(&mut held);
        }
        for input in held {
            if let Inbound::Audio(data) = input {
                if let Err(error) = self.on_audio(&data).await {
                    tracing::warn!(%error, "audio held by the dialect could not be used");
                }
            }
        }
        // Audio still held for missing packets goes out, holes filled.
        if let Some(active) = self.active.as_mut() {
            let mut blocks = Vec::new();
            active.pipeline.finish(&mut blocks);
            let stall = std::time::Duration::from_millis(self.config.sink_stall_timeout_ms);
            // A sink too slow even now has its own error on the way; what
            // it cannot take is not waited for forever.
            let _ = dispatch(&active.sinks, &mut active.groups, &mut blocks, stall).await;
            let _ = finish_conversions(&active.sinks, &mut active.groups, stall).await;
            self.handed_seq = active.pipeline.last_seq();
        }
        // A last ack, so a client that is still there knows all arrived.
        if let (Some(seq), true) = (self.handed_seq, client_may_listen) {
            if self.acked_seq != Some(seq) {
                self.acked_seq = Some(seq);
                self.send(&ServerMessage::Ack { seq }).await;
            }
        }
        self.export_jitter_metrics();
        // The last word on the stream's health, before the results.
        if self.config.stats_interval_ms > 0 && self.started_info.is_some() {
            if let Some(stats) = self.stream_stats() {
                self.send(&ServerMessage::Stats(stats)).await;
            }
        }
        if let Some(active) = self.active.as_mut() {
            for slot in &mut active.sinks {
                slot.commands = None;
            }
            // Sinks never opened (a container whose header never came).
            active.events_tx = None;
        }
        // Every sink finishes and reports; the channel closes after the last.
        // Flushes the client asked for are still answered: each sink handles
        // its queued commands before it finishes.
        while let Some(event) = self.next_final_event().await {
            if let Err(error) = self.on_sink_event(event).await {
                let (code, code_close) = error.codes();
                tracing::error!(%error, "sink failed while finishing");
                close_code = code_close;
                close_text = code;
                self.send(&ServerMessage::Error {
                    code,
                    message: error.to_string(),
                    fatal: true,
                })
                .await;
            }
        }
        if let Some(active) = self.active.take() {
            stats = active.pipeline.stats();
            media_frames = active.pipeline.media_frames();
            sample_rate = active.pipeline.declared_format().sample_rate;
        }

        let summary = ClosedSummary {
            reason,
            close_code,
            duration_seconds: media_frames as f64 / f64::from(sample_rate),
            sample_frames: media_frames,
            audio_messages: stats.audio_messages,
            audio_bytes: stats.audio_bytes,
            gap_frames: stats.gap_frames,
            duplicate_messages: stats.duplicate_messages,
            damaged_packets: stats.damaged_packets,
            concealed_frames: stats.concealed_frames,
        };
        self.send(&ServerMessage::Closed(summary)).await;
        if let (Some(messages), true) = (messages, client_may_send) {
            read_until_quiet(messages).await;
        }
        let _ = self
            .ws
            .close(Some(CloseReason {
                code: CloseCode::from(close_code),
                description: Some(close_text.to_owned()),
            }))
            .await;
        tracing::info!(
            reason,
            close_code,
            media_seconds = media_frames as f64 / f64::from(sample_rate),
            audio_messages = stats.audio_messages,
            "session closed"
        );
    }
}

impl Session {
    /// Sink events while ending; `None` once every sink task is done.
    async fn next_final_event(&mut self) -> Option<SinkEvent> {
        self.active.as_mut()?.events.recv().await
    }
}

/// Hands blocks to every live sink, in order, each group in its format.
async fn dispatch(
    sinks: &[SinkSlot],
    groups: &mut [SinkGroup],
    blocks: &mut Vec<AudioBlock>,
    stall: std::time::Duration,
) -> Result<(), SessionError> {
    let mut converted = Vec::new();
    for block in blocks.drain(..) {
        let block = Arc::new(block);
        for group in groups.iter_mut() {
            if group.converter.is_identity() {
                send_to(sinks, &group.members, &block, stall).await?;
                continue;
            }
            group.converter.convert(&block, &mut converted);
            for out in converted.drain(..) {
                send_to(sinks, &group.members, &Arc::new(out), stall).await?;
            }
        }
    }
    Ok(())
}

/// End of stream: the converters' tails, so every sink gets exact lengths.
async fn finish_conversions(
    sinks: &[SinkSlot],
    groups: &mut [SinkGroup],
    stall: std::time::Duration,
) -> Result<(), SessionError> {
    let mut tail = Vec::new();
    for group in groups.iter_mut() {
        group.converter.finish(&mut tail);
        for out in tail.drain(..) {
            send_to(sinks, &group.members, &Arc::new(out), stall).await?;
        }
    }
    Ok(())
}

/// Queues a block for each member sink. Waiting is the recorder's overflow
/// policy: it pushes back on the client through TCP instead of dropping
/// audio; but a sink that stays over its pending-bytes budget for `stall`
/// ends the session rather than freezing it.
async fn send_to(
    sinks: &[SinkSlot],
    members: &[usize],
    block: &SharedBlock,
    stall: std::time::Duration,
) -> Result<(), SessionError> {
    let bytes = match &block.samples {
        BlockSamples::Audio(samples) => samples.len() * std::mem::size_of::<f32>(),
        BlockSamples::Silence => 0,
    };
    for &index in members {
        let Some(slot) = sinks.get(index) else {
            continue;
        };
        let Some(commands) = slot.commands.as_ref() else {
            continue;
        };
        let want = u32::try_from(bytes.min(slot.budget_bytes)).unwrap_or(u32::MAX);
        let permit = match tokio::time::timeout(stall, slot.budget.clone().acquire_many_owned(want))
            .await
        {
            Ok(Ok(permit)) => Some(permit),
            // Closed budget: the sink is gone; its Failed event is on the way.
            Ok(Err(_)) => None,
            Err(_) => {
                metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_pending_bytes_per_sink")
                    .increment(1);
                return Err(SessionError::SinkOverloaded {
                    sink: slot.name,
                    pending_bytes: slot.budget_bytes - slot.budget.available_permits(),
                    stall_ms: stall.as_millis() as u64,
                });
            }
        };
        // A failed send means the sink stopped; its Failed event is on the way.
        let _ = commands
            .send(SinkCommand::Audio(block.clone(), permit))
            .await;
    }
    Ok(())
}

fn extend(partial: &mut Partial, bytes: &[u8]) {
    match partial {
        Partial::Text(b) | Partial::Binary(b) => b.extend_from_slice(bytes),
    }
}

fn partial_len(partial: &Partial) -> usize {
    match partial {
        Partial::Text(b) | Partial::Binary(b) => b.len(),
    }
}

/// The next sink event, or never when the stream has not started.
async fn next_event(active: &mut Option<Active>) -> SinkEvent {
    if let Some(active) = active {
        if let Some(event) = active.events.recv().await {
            return event;
        }
    }
    std::future::pending().await
}

/// Resolves when a resuming connection asks for this session; never without one.
async fn wait_for_takeover(takeover: Option<&Notify>) {
    match takeover {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown has been signalled; never if the signal is gone.
async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Used by the server to decide whether to even admit a session.
pub fn is_shutting_down(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow()
}
