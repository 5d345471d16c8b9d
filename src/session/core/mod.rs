//! [`SessionCore`]: the state machine of one stream session. Its methods
//! are grouped by job: [`start`] (format, sinks), [`audio`] (the audio
//! path), [`reports`] (acks, stats, flushes, limits, timers) and [`end`].

mod audio;
mod end;
mod reports;
mod start;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use metrics::Counter;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::pipeline::convert::{Converter, OutputFormat};
use crate::pipeline::{AudioBlock, OpusPacket, Pipeline, PipelineStats};
use crate::protocol::{
    ClosedSummary, ErrorCode, Framing, ProtocolError, ServerMessage, StartRequest, StartedInfo,
    StreamStats, WebrtcStats, PROTOCOL_VERSION,
};
use crate::server::close::{codes, SessionError};
use crate::server::dialect::{Dialect, Inbound};
use crate::sinks::recorder::RecordFormat;
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
    /// Cluster mode: every audio message up to `seq` is in the session's
    /// journal on NATS (answer to [`Output::Persist`]).
    Durable { seq: u32 },
    /// Parked, and nobody resumed it within `resume_window_ms`.
    ResumeExpired,
    /// The transport failed in a way that ends the session (a frame over
    /// the size limit, a broken continuation, invalid UTF-8).
    Failed(SessionError),
    /// WebRTC sessions: one RTP packet as a `framing=seq` message.
    Media(&'a Bytes),
    /// WebRTC sessions: the answer to the offer of [`Output::Negotiate`].
    WebrtcAnswer(String),
    /// WebRTC sessions: the latest RTCP figures, for `stats`.
    TransportStats(WebrtcStats),
    /// The transport asks to end the session as `stop` does (WHIP `DELETE`).
    Stop,
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
    /// Cluster mode: append the audio messages received so far to the
    /// session's journal, then feed [`Input::Durable`] with `seq`; the ack
    /// for `seq` waits for it.
    Persist { seq: u32 },
    /// `transport: webrtc`: negotiate this SDP offer (the first, or an ICE
    /// restart on the same peer), then feed [`Input::WebrtcAnswer`] or
    /// [`Input::Failed`].
    Negotiate { offer: String },
    /// A server event in the native protocol's JSON (whatever the socket's
    /// dialect), without credentials: for NATS in cluster mode.
    Event(String),
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
            Output::Event(json) => f.debug_tuple("Event").field(json).finish(),
            Output::Persist { seq } => write!(f, "Persist({seq})"),
            Output::Negotiate { .. } => f.write_str("Negotiate"),
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
    /// Sinks that take the client's Opus packets instead of PCM.
    packet_sinks: Vec<usize>,
    /// Reused for the packets of each message.
    packets: Vec<OpusPacket>,
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
    record_format: Option<RecordFormat>,
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
    /// Cluster mode, resumable sessions: acks wait for the journal.
    journaled: bool,
    /// The highest `seq` the journal holds.
    durable_seq: Option<u32>,
    /// What the stream was started with, for a node that takes it over.
    journal_request: Option<StartRequest>,
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
    /// The audio comes over WebRTC: no acks (RTP has no `seq` of the
    /// client's), and RTCP figures in `stats`.
    webrtc: bool,
    /// A WHIP session: no resume token (there is no socket to resume).
    whip: bool,
    webrtc_stats: Option<WebrtcStats>,
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
            journaled: false,
            durable_seq: None,
            journal_request: None,
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
            webrtc: false,
            whip: false,
            webrtc_stats: None,
        };
        core.apply_limits(limits);
        core
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A WHIP session, negotiated before the core was made: its audio comes
    /// as [`Input::Media`] and its messages go out on a data channel.
    pub fn use_whip(&mut self) {
        self.webrtc = true;
        self.whip = true;
    }

    /// A WHIP session: its messages go out on the peer's data channel.
    pub fn is_whip(&self) -> bool {
        self.whip
    }

    /// Whether the audio comes over WebRTC.
    pub fn is_webrtc(&self) -> bool {
        self.webrtc
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
                Input::Durable { seq } => self.note_durable(seq),
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
            Input::Durable { seq } => {
                self.note_durable(seq);
                self.send_ack_if_committed();
                Ok(None)
            }
            Input::ResumeExpired => Ok(Some(EndReason::ResumeExpired)),
            Input::Failed(error) => Err(error),
            Input::Media(data) => self.on_audio(data, now).map(|()| None),
            Input::WebrtcAnswer(sdp) => {
                self.send(&ServerMessage::WebrtcAnswer { sdp });
                Ok(None)
            }
            Input::TransportStats(stats) => {
                self.webrtc_stats = Some(stats);
                Ok(None)
            }
            Input::Stop => Ok(Some(EndReason::Stop)),
        };
        match result {
            Ok(None) => self.watch_backlog(now),
            Ok(Some(reason)) => self.end_or_park(reason, now),
            Err(error) => self.end(EndReason::Error(error), now),
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

    /// The token a resuming connection must show (`framing=seq` sessions);
    /// the resume registry compares it in constant time.
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

    /// Cluster mode: the request the stream started with (for the session's
    /// record, from which another node rebuilds it).
    pub fn journal_request(&self) -> Option<&StartRequest> {
        self.journal_request.as_ref()
    }

    /// A node rebuilding a session from its journal: the client holds the
    /// original token, and has been acked up to `resumes` resumes ago.
    pub fn restore(&mut self, token: String, resumes: u32) {
        self.resume_token = Some(token);
        self.resumes = resumes;
    }

    fn note_durable(&mut self, seq: u32) {
        if self.durable_seq.is_none_or(|d| d < seq) {
            self.durable_seq = Some(seq);
        }
    }

    /// Whether the journal holds everything up to `seq`.
    fn durable(&self, seq: u32) -> bool {
        !self.journaled || self.durable_seq.is_some_and(|d| d >= seq)
    }

    /// An ack for `seq` is wanted: in cluster mode, the journal first.
    fn persist(&mut self, seq: u32) {
        if self.journaled && !self.durable(seq) {
            self.outputs.push_back(Output::Persist { seq });
        }
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

    /// Renders a session message in the socket's protocol, and in cluster
    /// mode hands it (but acks) to the driver as an event for NATS.
    fn send(&mut self, message: &ServerMessage) {
        if self.webrtc && matches!(message, ServerMessage::Ack { .. }) {
            return;
        }
        self.dialect.render(message, &mut self.rendered);
        for frame in self.rendered.drain(..) {
            self.outputs.push_back(Output::Text(frame));
        }
        if self.config.cluster.enabled()
            && !matches!(
                message,
                ServerMessage::Ack { .. } | ServerMessage::WebrtcAnswer { .. }
            )
        {
            self.outputs.push_back(Output::Event(event_json(message)));
        }
    }
}

/// The native JSON of an event for subscribers: the resume token is a
/// credential of the socket's client, not theirs.
fn event_json(message: &ServerMessage) -> String {
    let json = match message {
        ServerMessage::Started(info) if info.resume_token.is_some() => {
            let mut info = info.clone();
            info.resume_token = None;
            serde_json::to_string(&ServerMessage::Started(info))
        }
        other => serde_json::to_string(other),
    };
    // Serializing these types cannot fail (no maps with non-string keys).
    json.unwrap_or_default()
}
