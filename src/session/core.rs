//! [`SessionCore`]: the state machine of one stream session.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use metrics::Counter;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::pipeline::convert::{Converter, OutputFormat};
use crate::pipeline::{AudioBlock, Pipeline, PipelineStats};
use crate::protocol::{
    ClosedSummary, ErrorCode, Framing, ProtocolError, ServerMessage, StartRequest, StartedInfo,
    StreamStats, PROTOCOL_VERSION,
};
use crate::server::close::{codes, SessionError};
use crate::server::dialect::{Dialect, Inbound};
use crate::sinks::registry::{SinkFactory, SinkPlan};
use crate::sinks::{Completion, Sink, SinkContext, SinkError, SinkEvent};
use crate::telemetry::names;

/// How often a session whose sink is over its pending-bytes budget looks
/// again (only such sessions wake up for it).
const BACKLOG_CHECK: Duration = Duration::from_millis(5);

/// Limits that come with the credential (a token may shorten the session).
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionLimits {
    pub max_session_ms: Option<u64>,
}

/// Something that happened to the session, at the `now` passed with it.
#[derive(Debug)]
pub enum Input<'a> {
    /// One complete text message from the client.
    Text(&'a str),
    /// One complete binary message from the client.
    Binary(&'a Bytes),
    /// The driver's timer fired (see [`SessionCore::next_deadline`]).
    Timeout,
    /// A sink reported (a result, a flush done, a failure).
    Sink(SinkEvent),
    /// Every sink has finished and reported: the sinks' event channel closed.
    SinksFinished,
    /// The connection went away without `stop`; `close_frame` if the client
    /// sent a Close frame (which must be answered).
    ClientGone { close_frame: bool },
    /// The server is shutting down.
    Shutdown,
    /// A resuming connection took the session over.
    TakenOver,
    /// Parked, and nobody resumed it within `resume_window_ms`.
    ResumeExpired,
    /// The transport failed in a way that ends the session (a frame over
    /// the size limit, a broken continuation, invalid UTF-8).
    Failed(SessionError),
}

/// What the driver must do, in order.
pub enum Output {
    /// One text frame to the client.
    Text(String),
    /// The session has a resume token: register it so that a resuming
    /// connection can find the session.
    Resumable { token: String },
    /// Answer the client's Close frame now; the session goes on finishing.
    AnswerClose,
    /// Tell the superseded connection why it ends (`resumed_elsewhere`).
    CloseSuperseded,
    /// Finish these sinks off the async workers and forward what they report
    /// through `events`; dropping the last clone of `events` is what tells
    /// the core ([`Input::SinksFinished`]) that all of them are done.
    FinishSinks {
        sinks: Vec<(usize, Box<dyn Sink>)>,
        events: mpsc::UnboundedSender<SinkEvent>,
    },
    /// A sink failed: close what it wrote, marked incomplete, off the workers.
    AbortSink { sink: Box<dyn Sink>, reason: String },
    /// The connection dropped and the session can be resumed: keep the core
    /// for `resume_window_ms`, then feed [`Input::ResumeExpired`].
    Park,
    /// The last output: close the socket with `code` and `reason`, after
    /// reading what the client still sends if `drain` (so the Close frame is
    /// not lost to a TCP reset).
    Close {
        code: u16,
        reason: String,
        drain: bool,
    },
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Text(text) => f.debug_tuple("Text").field(text).finish(),
            Output::Resumable { .. } => f.write_str("Resumable"),
            Output::AnswerClose => f.write_str("AnswerClose"),
            Output::CloseSuperseded => f.write_str("CloseSuperseded"),
            Output::FinishSinks { sinks, .. } => {
                write!(f, "FinishSinks({})", sinks.len())
            }
            Output::AbortSink { reason, .. } => write!(f, "AbortSink({reason})"),
            Output::Park => f.write_str("Park"),
            Output::Close {
                code,
                reason,
                drain,
            } => write!(f, "Close({code}, {reason}, drain={drain})"),
        }
    }
}

/// Why a session ends.
#[derive(Debug)]
pub enum EndReason {
    Stop,
    ClientGone { close_frame: bool },
    Error(SessionError),
    Shutdown,
    TakenOver,
    ResumeExpired,
}

impl EndReason {
    /// The server ends the session while the client may still be sending.
    fn client_may_still_send(&self) -> bool {
        matches!(self, EndReason::Error(_) | EndReason::Shutdown)
    }

    fn client_may_listen(&self) -> bool {
        !matches!(
            self,
            EndReason::ClientGone { .. } | EndReason::TakenOver | EndReason::ResumeExpired
        )
    }
}

/// One sink of the session, called in place.
struct SinkSlot {
    name: String,
    /// `None` once handed back to the driver (failed, or finishing).
    sink: Option<Box<dyn Sink>>,
    /// Failed: it answers no more flushes or commits.
    failed: bool,
    flushes_done: u64,
    commits_wanted: u64,
    commits_done: u64,
}

/// Sinks that want the same format, and the one converter that serves them.
struct SinkGroup {
    converter: Converter,
    members: Vec<usize>,
}

/// Counter handles resolved once per session, so the per-message path does
/// no registry lookups.
struct AudioCounters {
    bytes: Counter,
    frames: Counter,
    sample_frames: Counter,
}

/// The stream, once started.
struct Active {
    pipeline: Pipeline,
    sinks: Vec<SinkSlot>,
    groups: Vec<SinkGroup>,
    /// Sinks waiting for a container's header to tell the stream's format.
    pending: Option<PendingSinks>,
    /// Pipeline counters as last added to the server-wide metrics.
    exported: PipelineStats,
    /// When the client was last told about damaged audio (at most once a second).
    damage_reported_at: Option<Instant>,
    /// Reused for every message, so the steady state allocates no vectors.
    blocks: Vec<AudioBlock>,
    converted: Vec<AudioBlock>,
    counters: AudioCounters,
}

struct PendingSinks {
    plan: SinkPlan,
    transcribe: Option<String>,
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// Where the session is in its life.
enum Phase {
    /// Taking messages (started or not).
    Open,
    /// Ending: the sinks are finishing; `closed` and the close follow.
    Finishing(Finishing),
    /// The close went out; the core takes nothing more.
    Ended,
}

struct Finishing {
    reason: &'static str,
    close_code: u16,
    close_text: &'static str,
    drain: bool,
    summary: ClosedSummary,
}

/// One session's whole state: `Send`, so a resumed session moves to the
/// task of the connection that resumed it.
pub struct SessionCore {
    id: String,
    config: Arc<Config>,
    factory: Arc<dyn SinkFactory>,
    dialect: Box<dyn Dialect>,
    /// The sinks' channel back to the session; given away when they finish.
    events: Option<mpsc::UnboundedSender<SinkEvent>>,
    phase: Phase,
    outputs: VecDeque<Output>,
    /// Reused for what the dialect makes of each message.
    inbound: Vec<Inbound>,
    rendered: Vec<String>,

    query: StartRequest,
    started_at: SystemTime,
    active: Option<Active>,
    started_info: Option<StartedInfo>,

    last_activity: Instant,
    /// When to look at idleness next; moved lazily, not on every message.
    idle_check_at: Instant,
    flushes_requested: u64,
    flushes_reported: u64,
    /// `framing=seq`: the token a resuming connection must show.
    resume_token: Option<String>,
    /// Highest `seq` handed to the sinks, and the highest acknowledged.
    handed_seq: Option<u32>,
    acked_seq: Option<u32>,
    /// An ack waiting for the sinks to commit what it covers.
    ack_waiting: Option<u32>,
    /// Since when a sink has held more than `max_pending_bytes_per_sink`
    /// (the socket is not read meanwhile), and when to look again.
    backlog_since: Option<Instant>,
    backlog_check_at: Option<Instant>,
    last_ack_at: Instant,
    last_stats_at: Instant,
    audio_since_stats: bool,
    resumes: u32,
    /// `max_session_duration_ms` (or the credential's, if shorter).
    ends_at: Option<Instant>,
    session_limit_ms: u64,
    connected_at: Instant,
    /// For `max_realtime_factor`: when audio started, and when the client
    /// was warned that it sends too fast.
    first_audio_at: Option<Instant>,
    too_fast_since: Option<Instant>,
}

impl SessionCore {
    /// A new session on a connection made at `now`. `events` is the sending
    /// end of the channel the driver reads sink reports from.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        config: Arc<Config>,
        factory: Arc<dyn SinkFactory>,
        dialect: Box<dyn Dialect>,
        events: mpsc::UnboundedSender<SinkEvent>,
        limits: SessionLimits,
        now: Instant,
        started_at: SystemTime,
    ) -> Self {
        let idle_check_at = now + config.idle_timeout();
        let mut core = Self {
            id,
            config,
            factory,
            dialect,
            events: Some(events),
            phase: Phase::Open,
            outputs: VecDeque::new(),
            inbound: Vec::new(),
            rendered: Vec::new(),
            query: StartRequest::default(),
            started_at,
            active: None,
            started_info: None,
            last_activity: now,
            idle_check_at,
            flushes_requested: 0,
            flushes_reported: 0,
            resume_token: None,
            handed_seq: None,
            acked_seq: None,
            ack_waiting: None,
            backlog_since: None,
            backlog_check_at: None,
            last_ack_at: now,
            last_stats_at: now,
            audio_since_stats: false,
            resumes: 0,
            ends_at: None,
            session_limit_ms: 0,
            connected_at: now,
            first_audio_at: None,
            too_fast_since: None,
        };
        core.apply_limits(limits);
        core
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dialect_name(&self) -> &'static str {
        self.dialect.kind().name()
    }

    /// Takes the connection's query: the stream starts at once when it
    /// names the format; an error in it ends the session.
    pub fn open(&mut self, query: Result<StartRequest, ProtocolError>, now: Instant) {
        let result = match query {
            Ok(query) => {
                let starts_now = query.starts_stream();
                self.query = query;
                if starts_now {
                    self.start(StartRequest::default(), now)
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e.into()),
        };
        if let Err(error) = result {
            self.end(EndReason::Error(error), now);
        }
    }

    /// Feeds one input that happened at `now`.
    pub fn handle_input(&mut self, input: Input<'_>, now: Instant) {
        if matches!(self.phase, Phase::Ended) {
            return;
        }
        if let Phase::Finishing(_) = self.phase {
            match input {
                Input::Sink(event) => self.on_final_sink_event(event),
                Input::SinksFinished => self.close(),
                // The client's messages and timers no longer matter.
                _ => {}
            }
            return;
        }
        let result = match input {
            Input::Text(text) => self.on_text(text, now),
            Input::Binary(data) => self.on_binary(data, now),
            Input::Timeout => self.on_timeout(now),
            Input::Sink(event) => self.on_sink_event(event),
            // Only the sink tasks hold senders once the session ends.
            Input::SinksFinished => Ok(None),
            Input::ClientGone { close_frame } => Ok(Some(EndReason::ClientGone { close_frame })),
            Input::Shutdown => Ok(Some(EndReason::Shutdown)),
            Input::TakenOver => Ok(Some(EndReason::TakenOver)),
            Input::ResumeExpired => Ok(Some(EndReason::ResumeExpired)),
            Input::Failed(error) => Err(error),
        };
        match result {
            Ok(None) => self.watch_backlog(now),
            Ok(Some(reason)) => self.end_or_park(reason, now),
            Err(error) => self.end(EndReason::Error(error), now),
        }
    }

    /// Notes whether a sink holds more than its budget of unwritten audio.
    fn watch_backlog(&mut self, now: Instant) {
        let budget = self.config.max_pending_bytes_per_sink;
        let over = self.active.as_ref().is_some_and(|a| {
            a.sinks
                .iter()
                .filter_map(|s| s.sink.as_ref())
                .any(|s| s.pending_bytes() > budget)
        });
        if !over {
            self.backlog_since = None;
            self.backlog_check_at = None;
            return;
        }
        if self.backlog_since.is_none() {
            self.backlog_since = Some(now);
            tracing::debug!("a sink is over its pending-bytes budget: not reading the socket");
        }
        // Writes complete off this thread: look again shortly.
        self.backlog_check_at = Some(now + BACKLOG_CHECK);
    }

    /// A sink over its budget for `sink_stall_timeout_ms` ends the session.
    fn check_backlog_stall(&self, now: Instant) -> Result<(), SessionError> {
        let Some(since) = self.backlog_since else {
            return Ok(());
        };
        let stall = Duration::from_millis(self.config.sink_stall_timeout_ms);
        if now.saturating_duration_since(since) < stall {
            return Ok(());
        }
        let budget = self.config.max_pending_bytes_per_sink;
        let over = self.active.as_ref().and_then(|a| {
            a.sinks
                .iter()
                .filter_map(|s| s.sink.as_ref())
                .find(|s| s.pending_bytes() > budget)
        });
        match over {
            Some(sink) => {
                metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_pending_bytes_per_sink")
                    .increment(1);
                Err(SessionError::SinkOverloaded {
                    sink: sink.name(),
                    pending_bytes: sink.pending_bytes(),
                    stall_ms: self.config.sink_stall_timeout_ms,
                })
            }
            None => Ok(()),
        }
    }

    /// The next thing for the driver to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the driver must feed [`Input::Timeout`] next: idleness, the
    /// session's end, a due ack or stats, audio the jitter buffer holds, a
    /// sink's own deadline. `None` once the session is ending.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !matches!(self.phase, Phase::Open) {
            return None;
        }
        let mut at = self.idle_check_at;
        if let Some(end) = self.ends_at {
            at = at.min(end);
        }
        if self.handed_seq.is_some()
            && self.handed_seq != self.acked_seq
            && self.ack_waiting.is_none()
        {
            at = at.min(self.last_ack_at + self.ack_interval());
        }
        if let Some(check) = self.backlog_check_at {
            at = at.min(check);
        }
        if self.audio_since_stats && self.config.stats_interval_ms > 0 {
            at = at.min(self.last_stats_at + self.stats_interval());
        }
        if let Some(active) = &self.active {
            if let Some(held) = active.pipeline.next_deadline() {
                at = at.min(held);
            }
            for slot in &active.sinks {
                if let Some(due) = slot.sink.as_ref().and_then(|s| s.next_deadline()) {
                    at = at.min(due);
                }
            }
        }
        Some(at)
    }

    /// Whether the driver should read the socket: not while ending, and not
    /// while a sink is over its pending-bytes budget (TCP then pushes back
    /// on the client instead of the server buffering without bound).
    pub fn wants_input(&self) -> bool {
        matches!(self.phase, Phase::Open) && self.backlog_since.is_none()
    }

    /// True once the close went out: the driver drops the core.
    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    /// True while the session is ending: the client's messages are no longer read.
    pub fn is_finishing(&self) -> bool {
        matches!(self.phase, Phase::Finishing(_))
    }

    /// Whether a dropped connection can resume this session.
    pub fn resumable(&self) -> bool {
        self.resume_token.is_some() && self.active.is_some()
    }

    /// Whether `token` is this session's resume token (constant time).
    pub fn resume_token(&self) -> Option<&str> {
        self.resume_token.as_deref()
    }

    /// The first `seq` the server still needs.
    pub fn resume_from_seq(&self) -> u32 {
        self.handed_seq.map_or(0, |s| s.saturating_add(1))
    }

    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// Checks the stream parameters a resuming connection repeated: the
    /// session's own are fine (a client may simply add `resume=` to its old
    /// URL); one that differs is refused, by name.
    pub fn check_resume_request(&self, request: &StartRequest) -> Result<(), ProtocolError> {
        let Some(started) = &self.started_info else {
            return Ok(());
        };
        let format = &started.format;
        let conflict = |name: &str, asked: String, has: String| {
            Err(ProtocolError::InvalidMessage(format!(
                "resume: {name}={asked} differs from the session's {name} ({has}); omit it or repeat the session's own"
            )))
        };
        if let Some(encoding) = &request.encoding {
            if encoding != format.encoding.as_str() {
                return conflict(
                    "encoding",
                    encoding.clone(),
                    format.encoding.as_str().into(),
                );
            }
        }
        if let Some(rate) = request.sample_rate {
            if rate != format.sample_rate {
                return conflict(
                    "sample_rate",
                    rate.to_string(),
                    format.sample_rate.to_string(),
                );
            }
        }
        if let Some(channels) = request.channels {
            if channels != format.channels {
                return conflict(
                    "channels",
                    channels.to_string(),
                    format.channels.to_string(),
                );
            }
        }
        if let Some(framing) = &request.framing {
            if framing != format.framing.as_str() {
                return conflict("framing", framing.clone(), format.framing.as_str().into());
            }
        }
        if let Some(sinks) = &request.sinks {
            if *sinks != started.sinks {
                return conflict("sinks", sinks.join(","), started.sinks.join(","));
            }
        }
        if let Some(transcribe) = &request.transcribe {
            let has = started.transcribe.clone().unwrap_or_else(|| "none".into());
            if *transcribe != has {
                return conflict("transcribe", transcribe.clone(), has);
            }
        }
        Ok(())
    }

    /// Binds a parked session to the connection that resumed it at `now`,
    /// and says `started` again with the first `seq` still needed.
    pub fn reattach(&mut self, now: Instant) {
        self.resumes += 1;
        self.last_activity = now;
        self.idle_check_at = now + self.config.idle_timeout();
        self.acked_seq = None;
        if let Some(mut started) = self.started_info.clone() {
            started.resume_from_seq = Some(self.resume_from_seq());
            self.send(&ServerMessage::Started(started));
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
        // Counted from the connection, whenever the credential arrived.
        self.ends_at = max_ms.map(|ms| self.connected_at + Duration::from_millis(ms));
    }

    fn ack_interval(&self) -> Duration {
        Duration::from_millis(self.config.ack_interval_ms)
    }

    fn stats_interval(&self) -> Duration {
        Duration::from_millis(self.config.stats_interval_ms)
    }

    /// Renders a session message in the socket's protocol.
    fn send(&mut self, message: &ServerMessage) {
        self.dialect.render(message, &mut self.rendered);
        for frame in self.rendered.drain(..) {
            self.outputs.push_back(Output::Text(frame));
        }
    }

    fn on_text(&mut self, text: &str, now: Instant) -> Result<Option<EndReason>, SessionError> {
        let mut inbound = std::mem::take(&mut self.inbound);
        inbound.clear();
        let parsed = self.dialect.on_text(text, &mut inbound);
        let result = parsed
            .map_err(SessionError::from)
            .and_then(|()| self.on_inbound(&mut inbound, now));
        self.inbound = inbound;
        result
    }

    fn on_binary(&mut self, data: &Bytes, now: Instant) -> Result<Option<EndReason>, SessionError> {
        let mut inbound = std::mem::take(&mut self.inbound);
        inbound.clear();
        let parsed = self.dialect.on_binary(data, &mut inbound);
        let result = parsed
            .map_err(SessionError::from)
            .and_then(|()| self.on_inbound(&mut inbound, now));
        self.inbound = inbound;
        result
    }

    /// What the dialect made of a message, in the session's terms.
    fn on_inbound(
        &mut self,
        inputs: &mut Vec<Inbound>,
        now: Instant,
    ) -> Result<Option<EndReason>, SessionError> {
        for input in inputs.drain(..) {
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
                    self.last_activity = now;
                    self.start(request, now)?;
                }
                Inbound::Audio(data) => self.on_audio(&data, now)?,
                Inbound::Keepalive => self.last_activity = now,
                Inbound::Flush => {
                    self.last_activity = now;
                    self.flush(now)?;
                }
                Inbound::Stop => return Ok(Some(EndReason::Stop)),
                Inbound::Reply(text) => self.outputs.push_back(Output::Text(text)),
                Inbound::Event { name, detail } => {
                    self.last_activity = now;
                    tracing::info!(event = name, %detail, "dialect event");
                    metrics::counter!(
                        names::DIALECT_EVENTS_TOTAL,
                        "dialect" => self.dialect.kind().name(),
                        "event" => name
                    )
                    .increment(1);
                }
            }
        }
        Ok(None)
    }

    /// Resolves the format, plans the sinks and creates the pipeline. The
    /// sinks are built, and `started` is sent, as soon as the stream format
    /// is known: at once, or for a container once its header has arrived.
    fn start(&mut self, start: StartRequest, now: Instant) -> Result<(), SessionError> {
        let request = std::mem::take(&mut self.query).merged_with(start);
        let format = request.resolve()?;
        let planned = self
            .factory
            .plan(request.sinks.as_deref(), request.transcribe.as_deref())?;
        let mut pipeline = Pipeline::new(format, self.config.max_gap_ms)?;
        // Opus is decoded straight at the rate the sinks need, when that is
        // lower than the stream's: cheaper than decoding and resampling.
        pipeline.decode_for_sinks(&planned.plan.wanted_rates())?;
        if format.framing == Framing::Seq
            && self.config.resume_window_ms > 0
            && self.dialect.resumable()
        {
            // 122 random bits: the only thing standing between a session id,
            // which appears in logs and file names, and taking the stream over.
            let token = uuid::Uuid::new_v4().simple().to_string();
            self.outputs.push_back(Output::Resumable {
                token: token.clone(),
            });
            self.resume_token = Some(token);
        }
        let encoding = format.encoding.as_str();
        let counters = AudioCounters {
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
            pending: Some(PendingSinks {
                plan: planned.plan,
                transcribe: planned.transcribe,
                metadata: request.metadata,
            }),
            exported: PipelineStats::default(),
            damage_reported_at: None,
            blocks: Vec::with_capacity(2),
            converted: Vec::with_capacity(2),
            counters,
        });
        self.last_ack_at = now;
        self.open_sinks_when_format_known()
    }

    fn open_sinks_when_format_known(&mut self) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(format) = active.pipeline.format().copied() else {
            return Ok(());
        };
        let Some(pending) = active.pending.take() else {
            return Ok(());
        };
        let Some(events) = self.events.clone() else {
            return Ok(());
        };
        let context = SinkContext {
            session_id: self.id.clone(),
            format,
            metadata: pending.metadata.clone(),
            started_at: self.started_at,
        };
        let built = pending.plan.build(&context, events)?;
        // The blocks come at the pipeline's block rate, which for Opus may
        // be below the stream's; a sink's "the stream's own rate" still means
        // the declared one, so it is resolved before the converter is made.
        let block_rate = active.pipeline.block_rate();
        let mut groups: Vec<SinkGroup> = Vec::new();
        for (index, (_, sink)) in built.iter().enumerate() {
            let asked = sink.output_format();
            let wanted = OutputFormat {
                sample_rate: Some(asked.rate(format.sample_rate)),
                ..asked
            };
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
            .map(|(name, sink)| SinkSlot {
                name,
                sink: Some(sink),
                failed: false,
                flushes_done: 0,
                commits_wanted: 0,
                commits_done: 0,
            })
            .collect();
        let started = StartedInfo {
            protocol_version: PROTOCOL_VERSION,
            session_id: self.id.clone(),
            format,
            // Sink names, once each (a split recorder runs one sink per channel).
            sinks: active.sinks.iter().fold(Vec::new(), |mut names, s| {
                if !names.contains(&s.name) {
                    names.push(s.name.clone());
                }
                names
            }),
            transcribe: pending.transcribe,
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
        self.send(&ServerMessage::Started(started.clone()));
        self.started_info = Some(started);
        Ok(())
    }

    fn on_audio(&mut self, data: &[u8], now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Err(ProtocolError::AudioBeforeStart.into());
        };
        self.last_activity = now;
        let before = active.pipeline.stats();
        active.blocks.clear();
        let pushed = active.pipeline.push(data, now, &mut active.blocks);
        let after = active.pipeline.stats();
        let damage = active.pipeline.take_damage();
        if after.damaged_packets > before.damaged_packets {
            metrics::counter!(names::AUDIO_DAMAGED_PACKETS_TOTAL)
                .increment(after.damaged_packets - before.damaged_packets);
        }
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
        // A container's header may have come with this message.
        self.open_sinks_when_format_known()?;
        if let Some(damage) = damage {
            self.report_damage(damage, after.damaged_packets, now);
        }
        // Even when the push failed, what it completed before goes out.
        self.dispatch(now)?;
        self.audio_since_stats = true;
        self.send_due_reports(now)?;
        pushed?;
        self.check_rate(now)
    }

    /// Hands the blocks waiting in `active.blocks` to every live sink, in
    /// order, each group in its format.
    fn dispatch(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut blocks = std::mem::take(&mut active.blocks);
        let mut converted = std::mem::take(&mut active.converted);
        // A sink that fails leaves at once; the others still get every
        // block, which the acks say they have.
        let mut failed = Vec::new();
        for block in &blocks {
            for group in active.groups.iter_mut() {
                if group.converter.is_identity() {
                    write_to(&mut active.sinks, &group.members, block, now, &mut failed);
                } else {
                    group.converter.convert(block, &mut converted);
                    for out in &converted {
                        write_to(&mut active.sinks, &group.members, out, now, &mut failed);
                    }
                    group.converter.recycle(&mut converted);
                }
            }
        }
        // The sample buffers serve the next message: no allocation per message.
        active.pipeline.recycle(&mut blocks);
        active.blocks = blocks;
        active.converted = converted;
        if let Some(seq) = active.pipeline.last_seq() {
            self.handed_seq = Some(seq);
        }
        self.sinks_failed(failed)
    }

    /// End of stream: the converters' tails, so every sink gets exact lengths.
    fn finish_conversions(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut tail = Vec::new();
        let mut failed = Vec::new();
        for group in active.groups.iter_mut() {
            group.converter.finish(&mut tail);
            for out in tail.drain(..) {
                write_to(&mut active.sinks, &group.members, &out, now, &mut failed);
            }
        }
        self.sinks_failed(failed)
    }

    /// Takes a failed sink out of the session (it is closed off the workers,
    /// marked incomplete); the session then ends with its error.
    fn sink_failed(&mut self, index: usize, error: SinkError) -> SessionError {
        tracing::error!(%error, "sink failed");
        let slot = self.active.as_mut().and_then(|a| a.sinks.get_mut(index));
        if let Some(slot) = slot {
            slot.failed = true;
            if let Some(sink) = slot.sink.take() {
                self.abort_sink(sink, &error);
            }
        }
        error.into()
    }

    /// The sinks [`write_to`] took out: each is aborted; the first failure
    /// is the session's error.
    fn sinks_failed(&mut self, failed: Vec<FailedSink>) -> Result<(), SessionError> {
        let mut first = None;
        for (sink, error) in failed {
            tracing::error!(%error, "sink failed");
            self.abort_sink(sink, &error);
            first.get_or_insert(error);
        }
        first.map_or(Ok(()), |error| Err(error.into()))
    }

    fn abort_sink(&mut self, sink: Box<dyn Sink>, error: &SinkError) {
        metrics::counter!(names::SINK_FAILURES_TOTAL, "sink" => sink.name()).increment(1);
        self.outputs.push_back(Output::AbortSink {
            sink,
            reason: error.to_string(),
        });
    }

    /// Tells the client that audio was damaged and concealed: a non-fatal
    /// `error`, at most once a second so a broken stream cannot flood it.
    fn report_damage(&mut self, damage: String, damaged_so_far: u64, now: Instant) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active
            .damage_reported_at
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        active.damage_reported_at = Some(now);
        tracing::warn!(%damage, damaged_so_far, "damaged audio concealed");
        self.send(&ServerMessage::Error {
            code: ErrorCode::AudioDamaged,
            message: format!("{damage}; concealed ({damaged_so_far} damaged so far)"),
            fatal: false,
        });
    }

    /// Checks the audio rate against `max_realtime_factor`: a client over it
    /// is warned once, and closed if it is still over a second later, or at
    /// once if in that second it goes on past what the limit allows in one.
    ///
    /// Media is the stream's position, gaps included: a timestamp jump costs
    /// the server the disk of the audio it fills, whatever the client sent.
    /// Counted from the first audio, so time lost to a stall or a dropped
    /// connection is room to catch up afterwards.
    fn check_rate(&mut self, now: Instant) -> Result<(), SessionError> {
        const TOO_FAST_GRACE: Duration = Duration::from_secs(1);
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
        let allowed = burst + elapsed * limit;
        if media <= allowed {
            self.too_fast_since = None;
            return Ok(());
        }
        // At elapsed 0 any excess is "infinitely" fast; a millisecond keeps
        // the message a number.
        let factor = (media - burst).max(0.0) / elapsed.max(0.001);
        // The grace second is for slowing down, not for sending more: a
        // client past the allowance by more than the limit lets through in a
        // second is closed now. Without this, one second of 10 s timestamp
        // jumps could claim unbounded disk.
        let grace_ceiling = allowed + limit * TOO_FAST_GRACE.as_secs_f64();
        match self.too_fast_since {
            _ if media > grace_ceiling => {
                if self.too_fast_since.is_none() {
                    metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_realtime_factor")
                        .increment(1);
                }
                Err(SessionError::TooFast { factor, limit })
            }
            None => {
                self.too_fast_since = Some(now);
                metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_realtime_factor")
                    .increment(1);
                self.send(&ServerMessage::Error {
                    code: ErrorCode::AudioTooFast,
                    message: format!(
                        "audio arrives {factor:.1}x faster than real time (limit {limit:.1}x); slow down or the session closes within 1 s"
                    ),
                    fatal: false,
                });
                Ok(())
            }
            Some(since) if now.saturating_duration_since(since) >= TOO_FAST_GRACE => {
                Err(SessionError::TooFast { factor, limit })
            }
            Some(_) => Ok(()),
        }
    }

    fn flush(&mut self, now: Instant) -> Result<(), SessionError> {
        self.flushes_requested += 1;
        let mut failed = None;
        if let Some(active) = self.active.as_mut() {
            for (index, slot) in active.sinks.iter_mut().enumerate() {
                let Some(sink) = slot.sink.as_mut() else {
                    continue;
                };
                match sink.flush(now) {
                    Ok(Completion::Done) => slot.flushes_done += 1,
                    Ok(Completion::Later) => {}
                    Err(error) => {
                        failed = Some((index, error));
                        break;
                    }
                }
            }
        }
        if let Some((index, error)) = failed {
            return Err(self.sink_failed(index, error));
        }
        self.report_flushes();
        Ok(())
    }

    /// Sends `flushed` for every flush that all live sinks have processed.
    fn report_flushes(&mut self) {
        let done = self
            .active
            .as_ref()
            .and_then(|a| {
                a.sinks
                    .iter()
                    .filter(|s| !s.failed)
                    .map(|s| s.flushes_done)
                    .min()
            })
            .unwrap_or(self.flushes_requested);
        while self.flushes_reported < done.min(self.flushes_requested) {
            self.flushes_reported += 1;
            self.send(&ServerMessage::Flushed);
        }
    }

    fn on_sink_event(&mut self, event: SinkEvent) -> Result<Option<EndReason>, SessionError> {
        match event {
            SinkEvent::Message(message) => {
                if matches!(message, ServerMessage::Recording(_)) {
                    metrics::counter!(names::RECORDINGS_TOTAL).increment(1);
                }
                self.send(&message);
                Ok(None)
            }
            SinkEvent::Flushed { .. } | SinkEvent::Committed { .. } => {
                self.on_sink_progress(&event);
                Ok(None)
            }
            SinkEvent::Failed { index, error } => Err(self.sink_failed(index, error)),
        }
    }

    /// A flush or commit that a sink finished off the session's thread.
    fn on_sink_progress(&mut self, event: &SinkEvent) {
        let (SinkEvent::Flushed { index } | SinkEvent::Committed { index }) = *event else {
            return;
        };
        let Some(slot) = self.active.as_mut().and_then(|a| a.sinks.get_mut(index)) else {
            return;
        };
        if let SinkEvent::Flushed { .. } = event {
            slot.flushes_done += 1;
            self.report_flushes();
        } else {
            // Never beyond what it was asked for.
            slot.commits_done = (slot.commits_done + 1).min(slot.commits_wanted);
            self.send_ack_if_committed();
        }
    }

    /// Idleness, the session's end, held audio, sinks' deadlines, and due
    /// acks and stats.
    fn on_timeout(&mut self, now: Instant) -> Result<Option<EndReason>, SessionError> {
        if self.ends_at.is_some_and(|at| now >= at) {
            metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_session_duration")
                .increment(1);
            return Err(SessionError::MaxDuration {
                max_ms: self.session_limit_ms,
            });
        }
        if now >= self.idle_check_at {
            let idle_until = self.last_activity + self.config.idle_timeout();
            if now >= idle_until {
                return Err(SessionError::IdleTimeout {
                    idle_timeout_ms: self.config.idle_timeout_ms,
                    close_code: self.config.idle_close_code,
                });
            }
            self.idle_check_at = idle_until;
        }
        self.check_backlog_stall(now)?;
        if let Some(active) = self.active.as_mut() {
            // Audio the jitter buffer stopped waiting for.
            active.blocks.clear();
            active.pipeline.poll(now, &mut active.blocks);
            self.dispatch(now)?;
            self.sink_deadlines(now)?;
        }
        self.send_due_reports(now)?;
        Ok(None)
    }

    fn sink_deadlines(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut failed = None;
        for (index, slot) in active.sinks.iter_mut().enumerate() {
            let Some(sink) = slot.sink.as_mut() else {
                continue;
            };
            if sink.next_deadline().is_some_and(|due| now >= due) {
                if let Err(error) = sink.on_deadline(now) {
                    failed = Some((index, error));
                    break;
                }
            }
        }
        match failed {
            Some((index, error)) => Err(self.sink_failed(index, error)),
            None => Ok(()),
        }
    }

    /// Sends an ack and stats if they are due; also runs on the message path,
    /// so a streaming session needs no timer wake-ups for them.
    fn send_due_reports(&mut self, now: Instant) -> Result<(), SessionError> {
        if let Some(seq) = self.handed_seq {
            if self.acked_seq != Some(seq)
                && self.ack_waiting.is_none()
                && now >= self.last_ack_at + self.ack_interval()
            {
                self.last_ack_at = now;
                self.ack_waiting = Some(seq);
                self.commit_sinks(now)?;
                self.send_ack_if_committed();
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
                self.send(&ServerMessage::Stats(stats));
            }
        }
        Ok(())
    }

    /// Asks every sink to make what it was given durable, before an ack
    /// says so; the ack goes out once all have ([`Self::send_ack_if_committed`]).
    fn commit_sinks(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut failed = None;
        for (index, slot) in active.sinks.iter_mut().enumerate() {
            if let Some(sink) = slot.sink.as_mut() {
                slot.commits_wanted += 1;
                match sink.commit(now) {
                    Ok(Completion::Done) => slot.commits_done += 1,
                    Ok(Completion::Later) => {}
                    Err(error) => {
                        failed = Some((index, error));
                        break;
                    }
                }
            }
        }
        match failed {
            Some((index, error)) => Err(self.sink_failed(index, error)),
            None => Ok(()),
        }
    }

    /// Sends the waiting ack once every live sink has committed it.
    fn send_ack_if_committed(&mut self) {
        let Some(seq) = self.ack_waiting else {
            return;
        };
        let committed = self.active.as_ref().is_none_or(|a| {
            a.sinks
                .iter()
                .filter(|s| !s.failed)
                .all(|s| s.commits_done >= s.commits_wanted)
        });
        if committed {
            self.ack_waiting = None;
            self.acked_seq = Some(seq);
            self.send(&ServerMessage::Ack { seq });
        }
    }

    /// Adds what the jitter counters gained since the last report to the
    /// server-wide metrics (once per report, not per message).
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

    /// A dropped connection parks a resumable session; anything else ends it.
    fn end_or_park(&mut self, reason: EndReason, now: Instant) {
        let dropped = matches!(reason, EndReason::ClientGone { .. } | EndReason::TakenOver);
        if dropped && self.resumable() && self.config.resume_window_ms > 0 {
            if let EndReason::TakenOver = reason {
                self.outputs.push_back(Output::CloseSuperseded);
            }
            tracing::info!(
                window_ms = self.config.resume_window_ms,
                "connection lost; session parked for resume"
            );
            self.outputs.push_back(Output::Park);
            return;
        }
        self.end(reason, now);
    }

    /// Ends the stream: the last audio to the sinks, the last ack and stats,
    /// then the sinks finish (off the workers) and `closed` follows.
    fn end(&mut self, reason: EndReason, now: Instant) {
        if let EndReason::ClientGone { close_frame: true } = reason {
            self.outputs.push_back(Output::AnswerClose);
        }
        // Audio a dialect still holds (Twilio's track aligner) goes first.
        // If it cannot be used, that is how the session ends: a call whose
        // audio was lost is never reported as a clean stop (issue 15 item 2).
        let mut reason = reason;
        let mut held = Vec::new();
        self.dialect.finish(&mut held);
        for input in held {
            if let Inbound::Audio(data) = input {
                if let Err(error) = self.on_audio(&data, now) {
                    tracing::warn!(%error, "audio held by the dialect could not be used");
                    if !matches!(reason, EndReason::Error(_)) {
                        reason = EndReason::Error(error);
                    }
                    break;
                }
            }
        }
        let drain = reason.client_may_still_send();
        let client_may_listen = reason.client_may_listen();
        let (why, close_code, error) = match reason {
            EndReason::Stop => ("stop", codes::NORMAL, None),
            EndReason::ClientGone { .. } => ("client_gone", codes::NORMAL, None),
            EndReason::Shutdown => ("shutdown", codes::GOING_AWAY, None),
            EndReason::TakenOver => ("client_gone", codes::GOING_AWAY, None),
            EndReason::ResumeExpired => ("resume_expired", codes::NORMAL, None),
            EndReason::Error(e) => {
                let close_code = e.codes().1;
                let why = match e {
                    SessionError::IdleTimeout { .. } => "idle_timeout",
                    _ => "error",
                };
                (why, close_code, Some(e))
            }
        };
        let mut close_text = why;
        if let Some(error) = &error {
            let (code, _) = error.codes();
            close_text = code.as_str();
            tracing::warn!(%error, code = code.as_str(), close_code, "session error");
            metrics::counter!(names::SESSION_ERRORS_TOTAL, "kind" => code.as_str()).increment(1);
            self.send(&ServerMessage::Error {
                code,
                message: error.to_string(),
                fatal: true,
            });
            // What the sinks keep says the session failed (a recording's
            // sidecar: `complete: false` and the error). An idle timeout
            // ends a session that lost nothing.
            if !matches!(error, SessionError::IdleTimeout { .. }) {
                let note = format!("{code}: {error}");
                if let Some(active) = self.active.as_mut() {
                    for sink in active.sinks.iter_mut().filter_map(|s| s.sink.as_mut()) {
                        sink.session_failed(&note);
                    }
                }
            }
        }
        // Audio still held for missing packets goes out, holes filled.
        let mut failed_at_end = None;
        if let Some(active) = self.active.as_mut() {
            active.blocks.clear();
            active.pipeline.finish(&mut active.blocks);
            // A sink that fails now is aborted; the others still finish.
            let dispatched = self.dispatch(now);
            let tails = self.finish_conversions(now);
            failed_at_end = dispatched.and(tails).err();
        }
        // A last ack, so a client that is still there knows all arrived.
        // Sinks that commit off this thread make it wait: it then goes out
        // once they have finished, just before `closed`.
        self.ack_waiting = None;
        if let (Some(seq), true) = (self.handed_seq, client_may_listen) {
            if self.acked_seq != Some(seq) && self.commit_sinks(now).is_ok() {
                self.ack_waiting = Some(seq);
                self.send_ack_if_committed();
            }
        }
        self.export_jitter_metrics();
        // The last word on the stream's health, before the results.
        if self.config.stats_interval_ms > 0 && self.started_info.is_some() {
            if let Some(stats) = self.stream_stats() {
                self.send(&ServerMessage::Stats(stats));
            }
        }
        let mut summary = ClosedSummary {
            reason: why,
            close_code,
            duration_seconds: 0.0,
            sample_frames: 0,
            audio_messages: 0,
            audio_bytes: 0,
            gap_frames: 0,
            duplicate_messages: 0,
            damaged_packets: 0,
            concealed_frames: 0,
        };
        let mut sinks = Vec::new();
        if let Some(active) = self.active.as_mut() {
            let stats = active.pipeline.stats();
            let media_frames = active.pipeline.media_frames();
            let rate = active.pipeline.declared_format().sample_rate;
            summary.duration_seconds = media_frames as f64 / f64::from(rate);
            summary.sample_frames = media_frames;
            summary.audio_messages = stats.audio_messages;
            summary.audio_bytes = stats.audio_bytes;
            summary.gap_frames = stats.gap_frames;
            summary.duplicate_messages = stats.duplicate_messages;
            summary.damaged_packets = stats.damaged_packets;
            summary.concealed_frames = stats.concealed_frames;
            for (index, slot) in active.sinks.iter_mut().enumerate() {
                if let Some(sink) = slot.sink.take() {
                    sinks.push((index, sink));
                }
            }
        }
        // Every sink finishes and reports; the channel closes after the
        // last. Flushes the client asked for were answered in place.
        if let Some(events) = self.events.take() {
            self.outputs
                .push_back(Output::FinishSinks { sinks, events });
        }
        self.phase = Phase::Finishing(Finishing {
            reason: why,
            close_code,
            close_text,
            drain,
            summary,
        });
        // Its last audio is part of finishing: the client is told, and the
        // close carries the sink's error (PROTOCOL.md §6.9).
        if let Some(error) = failed_at_end {
            self.failed_while_finishing(error);
        }
    }

    /// While finishing: the sinks' last reports.
    fn on_final_sink_event(&mut self, event: SinkEvent) {
        match event {
            SinkEvent::Message(message) => {
                if matches!(message, ServerMessage::Recording(_)) {
                    metrics::counter!(names::RECORDINGS_TOTAL).increment(1);
                }
                self.send(&message);
            }
            SinkEvent::Flushed { .. } | SinkEvent::Committed { .. } => {
                self.on_sink_progress(&event)
            }
            SinkEvent::Failed { error, .. } => {
                // What the waiting ack would cover may not have been written.
                self.ack_waiting = None;
                self.failed_while_finishing(error.into());
            }
        }
    }

    /// A sink failed after the session began to end: an extra `error`, and
    /// the close takes its code; `closed` keeps its reason.
    fn failed_while_finishing(&mut self, error: SessionError) {
        let (code, close_code) = error.codes();
        tracing::error!(%error, "sink failed while finishing");
        if let Phase::Finishing(finishing) = &mut self.phase {
            finishing.close_code = close_code;
            finishing.close_text = code.as_str();
            finishing.summary.close_code = close_code;
        }
        self.send(&ServerMessage::Error {
            code,
            message: error.to_string(),
            fatal: true,
        });
    }

    /// Every sink is done: `closed`, then the close.
    fn close(&mut self) {
        let Phase::Finishing(finishing) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return;
        };
        let media_seconds = finishing.summary.duration_seconds;
        let audio_messages = finishing.summary.audio_messages;
        // Every sink has finished: all it was given is written.
        if let Some(seq) = self.ack_waiting.take() {
            self.acked_seq = Some(seq);
            self.send(&ServerMessage::Ack { seq });
        }
        self.send(&ServerMessage::Closed(finishing.summary));
        self.outputs.push_back(Output::Close {
            code: finishing.close_code,
            reason: finishing.close_text.to_owned(),
            drain: finishing.drain,
        });
        tracing::info!(
            reason = finishing.reason,
            close_code = finishing.close_code,
            media_seconds,
            audio_messages,
            "session closed"
        );
    }
}

/// A sink taken out of the session because it failed, and why.
type FailedSink = (Box<dyn Sink>, SinkError);

/// Writes one block to each member sink. One that fails is taken out of its
/// slot at once, so it gets nothing more, and put in `failed`; the others
/// still get the block.
fn write_to(
    sinks: &mut [SinkSlot],
    members: &[usize],
    block: &AudioBlock,
    now: Instant,
    failed: &mut Vec<FailedSink>,
) {
    for &index in members {
        let Some(slot) = sinks.get_mut(index) else {
            continue;
        };
        let Some(sink) = slot.sink.as_mut() else {
            continue;
        };
        if let Err(error) = sink.write(block, now) {
            slot.failed = true;
            failed.extend(slot.sink.take().map(|sink| (sink, error)));
        }
    }
}
