//! The driver of one WebSocket session: socket → [`SessionCore`] → socket.
//!
//! Everything the session decides is in the core ([`crate::session`]); this
//! task only moves things between it and the world. It reads the socket
//! (joining continuation frames), reads the sinks' event channel, sleeps
//! until the core's next deadline (one timer, re-armed only when the deadline
//! moves, so an idle session costs a timer entry and nothing else), and does
//! what the core's outputs say: write frames, finish sinks on the blocking
//! pool, park for resume, close.

use std::sync::Arc;
use std::time::SystemTime;

use actix_web::web::BytesMut;
use actix_ws::{CloseCode, CloseReason, Item, Message, MessageStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use super::close::{from_ws_error, SessionError};
use super::dialect::Dialect;
use super::journaling::Journaling;
use super::registry::SessionGuard;
use super::resume::{Parked, ResumeRegistry};
use super::webrtc::{Endpoint, PeerCommand, PeerEvent, PeerLink, WebrtcError};
use crate::config::Config;
use crate::protocol::{ProtocolError, ServerMessage, StartRequest};
use crate::session::{Input, Output, SessionCore};
use crate::sinks::registry::SinkFactory;
use crate::sinks::{SinkError, SinkEvent};
use crate::telemetry::names;

pub use crate::session::SessionLimits;

/// Before the Close frame: how long the client must have sent nothing, and
/// the most time spent waiting for that (see [`read_until_quiet`]).
const QUIET: std::time::Duration = std::time::Duration::from_millis(50);
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// What a session needs from the server.
#[derive(Clone)]
pub struct SessionEnv {
    pub config: Arc<Config>,
    pub shutdown: watch::Receiver<bool>,
    pub resumes: Arc<ResumeRegistry>,
    pub sinks: Arc<dyn SinkFactory>,
    /// Admission, for sessions taken over from another node.
    pub registry: Arc<super::registry::SessionRegistry>,
    /// Cluster mode: the node's handle on NATS.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The WebRTC endpoint, once the server has bound its UDP socket
    /// (unset when WebRTC is off).
    pub webrtc: Arc<std::sync::OnceLock<Arc<Endpoint>>>,
}

/// A session without a connection: what is parked for resume.
pub struct Suspended {
    pub(super) core: SessionCore,
    events: mpsc::UnboundedReceiver<SinkEvent>,
    /// Cluster mode, resumable sessions: the audio's way to the journal.
    journal: Option<Journaling>,
    /// A session rebuilt from its journal: per channel, the last utterance
    /// whose final its client already had; the rebuilt transcriber's
    /// messages about it and earlier ones are not sent again.
    delivered: std::collections::HashMap<u16, u64>,
    /// WebRTC sessions: the peer the audio comes from.
    peer: Option<PeerLink>,
}

impl Suspended {
    pub(super) fn new(core: SessionCore, events: mpsc::UnboundedReceiver<SinkEvent>) -> Self {
        Self {
            core,
            events,
            journal: None,
            delivered: std::collections::HashMap::new(),
            peer: None,
        }
    }

    pub(super) fn suppress_delivered(&mut self, delivered: std::collections::HashMap<u16, u64>) {
        self.delivered = delivered;
    }

    /// Whether a message is about an utterance the client already had in
    /// full (see `delivered`).
    fn already_delivered(&self, json: &str) -> bool {
        if self.delivered.is_empty()
            || !(json.starts_with(r#"{"type":"transcript""#)
                || json.starts_with(r#"{"type":"vad""#)
                || json.starts_with(r#"{"type":"error""#))
        {
            return false;
        }
        let Ok(message) = serde_json::from_str::<serde_json::Value>(json) else {
            return false;
        };
        let (Some(channel), Some(id)) = (
            message["channel"].as_u64(),
            message["utterance_id"].as_u64(),
        ) else {
            return false;
        };
        u16::try_from(channel)
            .ok()
            .and_then(|c| self.delivered.get(&c))
            .is_some_and(|last| id <= *last)
    }

    pub(super) fn attach_journal(&mut self, journal: Journaling) {
        self.journal = Some(journal);
    }

    /// Whether `request` (the parameters a resuming connection repeated)
    /// fits the session.
    pub fn check_resume_request(&self, request: &StartRequest) -> Result<(), ProtocolError> {
        self.core.check_resume_request(request)
    }
}

/// The socket side of a session.
struct Connection {
    ws: actix_ws::Session,
    messages: MessageStream,
    /// A message being reassembled from continuation frames.
    partial: Option<Partial>,
}

enum Partial {
    Text(BytesMut),
    Binary(BytesMut),
}

/// How a stretch of driving ended.
enum Flow {
    Continue,
    Park,
    Closed,
    /// Cluster mode: another node owns the session; this one must not
    /// write for it.
    Abandon,
}

/// Runs a new, admitted session until it ends or is parked for resume.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    id: String,
    ws: actix_ws::Session,
    messages: MessageStream,
    query: Result<StartRequest, ProtocolError>,
    env: SessionEnv,
    guard: SessionGuard,
    limits: SessionLimits,
    dialect: Box<dyn Dialect>,
) {
    let span = tracing::info_span!("session", id = %id, dialect = dialect.kind().name());
    async move {
        tracing::info!("session opened");
        let (events_tx, events) = mpsc::unbounded_channel();
        let now = Instant::now().into_std();
        let mut core = SessionCore::new(
            id,
            env.config.clone(),
            env.sinks.clone(),
            dialect,
            events_tx,
            limits,
            now,
            SystemTime::now(),
        );
        core.open(query, now);
        let connection = Connection {
            ws,
            messages,
            partial: None,
        };
        drive(
            Suspended::new(core, events),
            Some(connection),
            guard,
            env,
            None,
            0,
        )
        .await;
    }
    .instrument(span)
    .await
}

/// Runs a WHIP session: negotiated already, its audio from `peer`, its
/// messages out on the peer's data channel, no WebSocket.
pub async fn run_whip(
    core: SessionCore,
    events: mpsc::UnboundedReceiver<SinkEvent>,
    peer: PeerLink,
    env: SessionEnv,
    guard: SessionGuard,
) {
    let span = tracing::info_span!("session", id = %core.id(), dialect = "whip");
    async move {
        tracing::info!("session opened");
        let mut session = Suspended::new(core, events);
        session.peer = Some(peer);
        drive(session, None, guard, env, None, 0).await;
    }
    .instrument(span)
    .await
}

/// Re-attaches a parked session to a new connection; in cluster mode, a
/// session this node does not hold is looked for in the cluster.
pub async fn resume(
    ws: actix_ws::Session,
    messages: MessageStream,
    session_id: String,
    token: String,
    request: StartRequest,
    env: SessionEnv,
    key_id: Option<String>,
) {
    let span = tracing::info_span!("session", id = %session_id);
    async move {
        let wait = std::time::Duration::from_secs(3);
        let claimed = env.resumes.claim(&session_id, &token, &request, wait).await;
        let (parked, takeover) = match claimed {
            Ok(claimed) => claimed,
            Err(super::resume::ResumeError::NotResumable(_)) if env.cluster.is_some() => {
                resume_from_cluster(ws, messages, session_id, token, request, env, key_id).await;
                return;
            }
            Err(error) => {
                metrics::counter!(names::RESUMES_REJECTED_TOTAL).increment(1);
                let error = SessionError::Resume(error);
                refuse_in_span(ws, messages, &mut super::dialect::native::Native, error).await;
                return;
            }
        };
        let resumed = Resumed {
            guard: parked.guard,
            takeover,
            generation: parked.generation,
        };
        drive_resumed(
            *parked.session,
            ws,
            messages,
            resumed,
            env,
            "session resumed",
        )
        .await;
    }
    .instrument(span)
    .await
}

/// Takes a session over from a node whose lease ran out (see
/// [`super::takeover`]) and drives it here.
async fn resume_from_cluster(
    ws: actix_ws::Session,
    messages: MessageStream,
    session_id: String,
    token: String,
    request: StartRequest,
    env: SessionEnv,
    key_id: Option<String>,
) {
    let Some(cluster) = env.cluster.clone() else {
        return;
    };
    let guard = match env.registry.try_admit(key_id.as_deref()) {
        Ok(guard) => guard,
        Err(_) => {
            let error = SessionError::ServerFull {
                max_sessions: env.registry.max_sessions(),
            };
            refuse_in_span(ws, messages, &mut super::dialect::native::Native, error).await;
            return;
        }
    };
    let taken = super::takeover::take_over(&env, &cluster, &session_id, &token, &request).await;
    let suspended = match taken {
        Ok(suspended) => suspended,
        Err(error) => {
            metrics::counter!(names::RESUMES_REJECTED_TOTAL).increment(1);
            let error = match error {
                super::takeover::TakeoverError::Resume(e) => SessionError::Resume(e),
                other => {
                    tracing::warn!(error = %other, "cluster resume failed");
                    SessionError::Resume(super::resume::ResumeError::Busy(session_id.clone()))
                }
            };
            refuse_in_span(ws, messages, &mut super::dialect::native::Native, error).await;
            return;
        }
    };
    let resumed = Resumed {
        guard,
        takeover: env.resumes.attach_new(&session_id, &token),
        generation: 0,
    };
    drive_resumed(
        suspended,
        ws,
        messages,
        resumed,
        env,
        "session taken over from another node",
    )
    .await;
}

/// What a resumed session is driven with besides its state and socket.
struct Resumed {
    guard: SessionGuard,
    takeover: Arc<Notify>,
    generation: u64,
}

/// A resumed session on its new connection: `started` again with
/// `resume_from_seq`, then driven as any other.
async fn drive_resumed(
    mut suspended: Suspended,
    ws: actix_ws::Session,
    messages: MessageStream,
    resumed: Resumed,
    env: SessionEnv,
    how: &'static str,
) {
    suspended.core.reattach(Instant::now().into_std());
    metrics::counter!(names::RESUMES_TOTAL).increment(1);
    tracing::info!(
        resume_from_seq = suspended.core.resume_from_seq(),
        resumes = suspended.core.resumes(),
        "{how}"
    );
    let connection = Connection {
        ws,
        messages,
        partial: None,
    };
    drive(
        suspended,
        Some(connection),
        resumed.guard,
        env,
        Some(resumed.takeover),
        resumed.generation,
    )
    .await;
}

/// Drives the session until it closes or parks. With no connection (a
/// parked session whose window ran out), it only finishes the sinks.
async fn drive(
    mut session: Suspended,
    mut connection: Option<Connection>,
    guard: SessionGuard,
    env: SessionEnv,
    takeover: Option<Arc<Notify>>,
    generation: u64,
) {
    let far_future = || Instant::now() + std::time::Duration::from_secs(86_400 * 365);
    let mut armed = far_future();
    let timer = tokio::time::sleep_until(armed);
    tokio::pin!(timer);
    // Made once, not once per message: each one registers a waiter under a
    // lock when first polled (about 2.5 % of the server's CPU at 1,000
    // streams, BENCHMARKS.md).
    let shutdown_signal = wait_for_shutdown(env.shutdown.clone());
    tokio::pin!(shutdown_signal);
    let mut shutdown_seen = false;
    // The client's side of the connection ended while the session finished.
    let mut client_left = false;
    let mut takeover_signal = takeover.map(wait_for_takeover);
    let ingest_seconds = metrics::histogram!(names::INGEST_LATENCY_SECONDS);
    loop {
        let mut registered = None;
        let flow = apply_outputs(&mut session, &mut connection, &env, &mut registered).await;
        if let Some(notify) = registered {
            takeover_signal = Some(wait_for_takeover(notify));
        }
        match flow {
            Flow::Continue => {}
            Flow::Closed => {
                env.resumes.remove(session.core.id());
                forget_record(&session, &env);
                drop(guard);
                return;
            }
            Flow::Park => {
                park(session, guard, env, generation + 1).await;
                return;
            }
            Flow::Abandon => {
                tracing::warn!("the session belongs to another node now: finishing nothing");
                return abandon(session, connection, guard, &env).await;
            }
        }
        let wanted = session
            .core
            .next_deadline()
            .map_or_else(far_future, Instant::from_std);
        if wanted != armed {
            armed = wanted;
            timer.as_mut().reset(armed);
        }
        let watching = !session.core.is_finishing();
        // While the sinks finish (a slow transcript can take the whole stop
        // wait), the socket is still read, for its pings and its end alone:
        // unanswered, a client's keepalive dropped the connection before
        // the last transcript and `closed` reached it.
        let reading =
            connection.is_some() && (session.core.wants_input() || (!watching && !client_left));
        let input = tokio::select! {
            biased;
            () = &mut shutdown_signal, if watching && !shutdown_seen => {
                shutdown_seen = true;
                if env.cluster.is_some() && session.journal.is_some() {
                    return hand_off(session, connection, guard, &env).await;
                }
                Some(Input::Shutdown)
            }
            () = async { match takeover_signal.as_mut() {
                Some(signal) => signal.await,
                None => std::future::pending().await,
            } }, if watching && takeover_signal.is_some() => {
                takeover_signal = None;
                Some(Input::TakenOver)
            }
            event = session.events.recv() => Some(match event {
                Some(event) => Input::Sink(event),
                None => {
                    // The last ack (before `closed`) waits for the journal
                    // too: let a running append land first (bounded).
                    if let Some(seq) = last_append(&mut session.journal).await {
                        session.core.handle_input(
                            Input::Durable { seq },
                            Instant::now().into_std(),
                        );
                    }
                    Input::SinksFinished
                }
            }),
            event = next_peer_event(&mut session.peer), if watching && session.peer.is_some() && session.core.wants_input() => {
                match event {
                    PeerEvent::Media(data) => {
                        session.core.handle_input(Input::Media(&data), std::time::Instant::now());
                        None
                    }
                    PeerEvent::Stats(stats) => Some(Input::TransportStats(stats)),
                    PeerEvent::Stop => Some(Input::Stop),
                    PeerEvent::Gone(reason) => {
                        tracing::info!(%reason, "webrtc media ended");
                        session.peer = None;
                        Some(Input::Failed(SessionError::Webrtc(WebrtcError::PeerGone)))
                    }
                }
            }
            message = next_message(&mut connection), if reading => {
                if !watching {
                    if let Some(connection) = connection.as_mut() {
                        client_left = !answer_while_finishing(connection, message).await;
                    }
                } else if let Some(connection) = connection.as_mut() {
                    let now = std::time::Instant::now();
                    on_message(
                        &mut session.core,
                        session.journal.as_mut(),
                        connection,
                        message,
                        env.config.max_message_bytes,
                        now,
                        &ingest_seconds,
                    )
                    .await;
                }
                None
            }
            durable = journal_next(&mut session.journal), if session.journal.as_ref().is_some_and(Journaling::busy) => {
                match durable {
                    Ok(seq) => Some(Input::Durable { seq }),
                    Err(error) => {
                        // Another node holds the session now: this one
                        // writes nothing more for it.
                        tracing::warn!(%error, "session lost to another node");
                        return abandon(session, connection, guard, &env).await;
                    }
                }
            }
            () = &mut timer => {
                armed = far_future();
                timer.as_mut().reset(armed);
                Some(Input::Timeout)
            }
        };
        if let Some(input) = input {
            session.core.handle_input(input, Instant::now().into_std());
        }
    }
}

/// One socket event: a message for the core, or the transport's own business.
async fn on_message(
    core: &mut SessionCore,
    journal: Option<&mut Journaling>,
    connection: &mut Connection,
    message: Option<Result<Message, actix_ws::ProtocolError>>,
    max_bytes: usize,
    now: std::time::Instant,
    ingest_seconds: &metrics::Histogram,
) {
    let message = match message {
        None => {
            core.handle_input(Input::ClientGone { close_frame: false }, now);
            return;
        }
        Some(Ok(message)) => message,
        Some(Err(actix_ws::ProtocolError::Io(e)))
            if e.kind() != std::io::ErrorKind::InvalidData =>
        {
            // actix-ws reports the lost connection before it has decoded the
            // frames already buffered; polling on yields them and then the
            // end. Stopping here would lose the client's last audio.
            tracing::info!(error = %e, "connection lost; draining what arrived");
            return;
        }
        Some(Err(e)) => {
            core.handle_input(Input::Failed(from_ws_error(e, max_bytes).into()), now);
            return;
        }
    };
    match message {
        Message::Text(text) => core.handle_input(Input::Text(&text), now),
        Message::Binary(data) => {
            if let Some(journal) = journal {
                journal.note(&data, now);
            }
            core.handle_input(Input::Binary(&data), now);
            // From the message's arrival to its audio being with the sinks.
            ingest_seconds.record(now.elapsed().as_secs_f64());
        }
        Message::Continuation(item) => {
            match join_continuation(&mut connection.partial, item, max_bytes) {
                Ok(None) => {}
                Ok(Some(Partial::Text(bytes))) => match std::str::from_utf8(&bytes) {
                    Ok(text) => core.handle_input(Input::Text(text), now),
                    Err(_) => {
                        core.handle_input(Input::Failed(ProtocolError::InvalidUtf8.into()), now)
                    }
                },
                Ok(Some(Partial::Binary(bytes))) => {
                    let bytes = bytes.freeze();
                    if let Some(journal) = journal {
                        journal.note(&bytes, now);
                    }
                    core.handle_input(Input::Binary(&bytes), now)
                }
                Err(e) => core.handle_input(Input::Failed(e.into()), now),
            }
        }
        Message::Ping(payload) => {
            let _ = connection.ws.pong(&payload).await;
        }
        Message::Pong(_) | Message::Nop => {}
        Message::Close(reason) => {
            tracing::info!(?reason, "client closed the connection without stop");
            core.handle_input(Input::ClientGone { close_frame: true }, now);
        }
    }
}

/// A message that arrived while the session finishes: a ping is answered,
/// anything else is ignored. False once the client's side has ended.
async fn answer_while_finishing(
    connection: &mut Connection,
    message: Option<Result<Message, actix_ws::ProtocolError>>,
) -> bool {
    match message {
        Some(Ok(Message::Ping(payload))) => {
            let _ = connection.ws.pong(&payload).await;
            true
        }
        Some(Ok(Message::Close(_)) | Err(_)) | None => false,
        Some(Ok(_)) => true,
    }
}

/// Adds one continuation frame; a whole message once the last one came.
fn join_continuation(
    partial: &mut Option<Partial>,
    item: Item,
    max_bytes: usize,
) -> Result<Option<Partial>, ProtocolError> {
    // The total is checked before a fragment is added, so no more than
    // `max_bytes` is ever held (frame_limit refuses the crossing frame at
    // its header already; this is the backstop).
    let incoming = match &item {
        Item::FirstText(b) | Item::FirstBinary(b) | Item::Continue(b) | Item::Last(b) => b.len(),
    };
    if partial.as_ref().map_or(0, Partial::len) + incoming > max_bytes {
        *partial = None;
        return Err(ProtocolError::MessageTooBig { max_bytes });
    }
    let complete = match (item, partial.take()) {
        (Item::FirstText(b), None) => {
            *partial = Some(Partial::Text(BytesMut::from(&b[..])));
            None
        }
        (Item::FirstBinary(b), None) => {
            *partial = Some(Partial::Binary(BytesMut::from(&b[..])));
            None
        }
        (Item::Continue(b), Some(mut p)) => {
            p.extend(&b);
            *partial = Some(p);
            None
        }
        (Item::Last(b), Some(mut p)) => {
            p.extend(&b);
            Some(p)
        }
        _ => {
            return Err(ProtocolError::WebSocket(
                "continuation frame out of sequence".into(),
            ))
        }
    };
    let buffered = partial
        .as_ref()
        .or(complete.as_ref())
        .map_or(0, Partial::len);
    if buffered > max_bytes {
        *partial = None;
        return Err(ProtocolError::MessageTooBig { max_bytes });
    }
    Ok(complete)
}

impl Partial {
    fn extend(&mut self, bytes: &[u8]) {
        match self {
            Partial::Text(b) | Partial::Binary(b) => b.extend_from_slice(bytes),
        }
    }

    fn len(&self) -> usize {
        match self {
            Partial::Text(b) | Partial::Binary(b) => b.len(),
        }
    }
}

/// Does what the core asked, in order.
async fn apply_outputs(
    session: &mut Suspended,
    connection: &mut Option<Connection>,
    env: &SessionEnv,
    registered: &mut Option<Arc<Notify>>,
) -> Flow {
    while let Some(output) = session.core.poll_output() {
        match output {
            Output::Text(text) if session.already_delivered(&text) => {}
            Output::Event(json) if session.already_delivered(&json) => {}
            Output::Text(text) => {
                if let Some(c) = connection.as_mut() {
                    if c.ws.text(text).await.is_err() {
                        tracing::debug!("client gone; message not sent");
                    }
                } else if let Some(peer) = session.peer.as_ref().filter(|_| session.core.is_whip())
                {
                    // WHIP: the events data channel is the only way back.
                    let _ = peer.commands.try_send(PeerCommand::Send(text));
                }
            }
            Output::Negotiate { offer } => {
                let now = std::time::Instant::now();
                match negotiate(session, env, offer).await {
                    Ok(answer) => session.core.handle_input(Input::WebrtcAnswer(answer), now),
                    Err(error) => session.core.handle_input(Input::Failed(error.into()), now),
                }
            }
            Output::Event(json) => {
                if let Some(cluster) = &env.cluster {
                    cluster.publish_event(session.core.id(), json);
                }
            }
            Output::Resumable { token } => {
                *registered = Some(env.resumes.attach_new(session.core.id(), &token));
                if let (Some(cluster), Some(request)) =
                    (&env.cluster, session.core.journal_request())
                {
                    let record = crate::cluster::SessionRecord {
                        owner: cluster.node_id().to_owned(),
                        owner_instance: cluster.instance().to_owned(),
                        token_sha256: crate::cluster::sessions::token_hash(&token),
                        request: request.clone(),
                        resumes: 0,
                        started_at: humantime::format_rfc3339_seconds(SystemTime::now())
                            .to_string(),
                        closed: false,
                    };
                    session.journal =
                        Some(Journaling::new(cluster.clone(), session.core.id(), record));
                }
            }
            Output::Persist { seq } => {
                if let Some(journal) = session.journal.as_mut() {
                    journal.want(seq);
                }
            }
            Output::AnswerClose => {
                if let Some(c) = connection.as_ref() {
                    let normal = CloseReason {
                        code: CloseCode::Normal,
                        description: None,
                    };
                    let _ = c.ws.clone().close(Some(normal)).await;
                }
            }
            Output::CloseSuperseded => {
                // The old connection may still be readable by someone: say why it ends.
                if let Some(c) = connection.take() {
                    let reason = CloseReason {
                        code: CloseCode::Away,
                        description: Some("resumed_elsewhere".into()),
                    };
                    let _ = c.ws.close(Some(reason)).await;
                }
            }
            Output::FinishSinks { sinks, events } => {
                if !still_owner(session, env).await {
                    drop(sinks);
                    drop(events);
                    return Flow::Abandon;
                }
                finish_sinks(sinks, events)
            }
            Output::AbortSink { sink, reason } => {
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || span.in_scope(|| sink.abort(&reason)));
            }
            Output::Park => return Flow::Park,
            Output::Close {
                code,
                reason,
                drain,
            } => {
                if let Some(mut c) = connection.take() {
                    if drain {
                        read_until_quiet(&mut c.messages).await;
                    }
                    let _ =
                        c.ws.close(Some(CloseReason {
                            code: CloseCode::from(code),
                            description: Some(reason),
                        }))
                        .await;
                }
                return Flow::Closed;
            }
        }
    }
    Flow::Continue
}

/// Negotiates a `transport: webrtc` offer: a new peer, or a new offer (an
/// ICE restart) on the session's peer.
async fn negotiate(
    session: &mut Suspended,
    env: &SessionEnv,
    offer: String,
) -> Result<String, WebrtcError> {
    if let Some(peer) = session.peer.as_ref() {
        let (reply, answer) = tokio::sync::oneshot::channel();
        peer.commands
            .send(PeerCommand::Offer { sdp: offer, reply })
            .await
            .map_err(|_| WebrtcError::PeerGone)?;
        return answer.await.map_err(|_| WebrtcError::PeerGone)?;
    }
    let endpoint = env.webrtc.get().ok_or(WebrtcError::Disabled)?;
    let negotiated = endpoint.negotiate(session.core.id(), &offer, false)?;
    metrics::counter!(names::WEBRTC_SESSIONS_TOTAL, "signalling" => "websocket").increment(1);
    session.peer = Some(negotiated.link);
    Ok(negotiated.answer)
}

async fn next_peer_event(peer: &mut Option<PeerLink>) -> PeerEvent {
    match peer.as_mut() {
        Some(link) => link
            .events
            .recv()
            .await
            .unwrap_or_else(|| PeerEvent::Gone("the peer task ended".into())),
        None => std::future::pending().await,
    }
}

/// Runs each sink's `finish` on the blocking pool and reports what it says.
/// Each task holds a clone of `events`: once the last is done (and any task
/// a sink spawned has let go of its own), the session's receiver yields
/// `None`, which is how the core learns that every sink has finished.
fn finish_sinks(
    sinks: Vec<(usize, Box<dyn crate::sinks::Sink>)>,
    events: mpsc::UnboundedSender<SinkEvent>,
) {
    let span = tracing::Span::current();
    for (index, sink) in sinks {
        let events = events.clone();
        let span = span.clone();
        tokio::spawn(async move {
            let name = sink.name();
            let finished =
                tokio::task::spawn_blocking(move || span.in_scope(|| sink.finish())).await;
            match finished {
                Ok(Ok(messages)) => {
                    for message in messages {
                        let _ = events.send(SinkEvent::Message(message));
                    }
                }
                Ok(Err(error)) => {
                    let _ = events.send(SinkEvent::Failed { index, error });
                }
                Err(join_error) => {
                    let error = SinkError::Failed {
                        sink: name,
                        message: format!("finish panicked: {join_error}"),
                    };
                    let _ = events.send(SinkEvent::Failed { index, error });
                }
            }
        });
    }
}

/// Keeps a dropped session for `resume_window_ms`, and ends it (without a
/// connection) if nobody claims it by then.
async fn park(session: Suspended, guard: SessionGuard, env: SessionEnv, generation: u64) {
    let id = session.core.id().to_owned();
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
    let window = std::time::Duration::from_millis(env.config.resume_window_ms);
    let input = tokio::select! {
        () = tokio::time::sleep(window) => Input::ResumeExpired,
        () = wait_for_shutdown(env.shutdown.clone()) => Input::Shutdown,
    };
    if matches!(input, Input::Shutdown) && env.cluster.is_some() {
        // Cluster mode: another node takes the parked session when its
        // client comes back (it was journalled up to its last ack).
        if let Some(parked) = env.resumes.take_expired(&id, generation) {
            metrics::gauge!(names::SESSIONS_PARKED).decrement(1.0);
            let session = *parked.session;
            if session.journal.is_some() {
                return hand_off(session, None, parked.guard, &env).await;
            }
            env.resumes.park(
                &id,
                Parked {
                    session: Box::new(session),
                    guard: parked.guard,
                    generation,
                },
            );
            metrics::gauge!(names::SESSIONS_PARKED).increment(1.0);
        }
    }
    metrics::gauge!(names::SESSIONS_PARKED).decrement(1.0);
    if let Some(parked) = env.resumes.take_expired(&id, generation) {
        tracing::info!("resume window over: finishing the session");
        let mut session = *parked.session;
        session.core.handle_input(input, Instant::now().into_std());
        Box::pin(drive(session, None, parked.guard, env, None, generation)).await;
    }
}

/// Refuses a connection that was upgraded but cannot be served (server full,
/// shutting down): the client gets an `error` in its protocol and a close
/// code it can act on, which a browser could not read from a failed upgrade.
pub async fn refuse(
    id: String,
    ws: actix_ws::Session,
    messages: MessageStream,
    mut dialect: Box<dyn Dialect>,
    error: SessionError,
) {
    let span = tracing::info_span!("session", id = %id, dialect = dialect.kind().name());
    refuse_in_span(ws, messages, dialect.as_mut(), error)
        .instrument(span)
        .await
}

async fn refuse_in_span(
    mut ws: actix_ws::Session,
    mut messages: MessageStream,
    dialect: &mut dyn Dialect,
    error: SessionError,
) {
    let (code, close_code) = error.codes();
    tracing::warn!(%error, "session refused");
    metrics::counter!(names::SESSIONS_REJECTED_TOTAL, "reason" => code.as_str()).increment(1);
    let mut frames = Vec::new();
    dialect.render(
        &ServerMessage::Error {
            code,
            message: error.to_string(),
            fatal: true,
        },
        &mut frames,
    );
    for frame in frames {
        let _ = ws.text(frame).await;
    }
    read_until_quiet(&mut messages).await;
    let _ = ws
        .close(Some(CloseReason {
            code: CloseCode::from(close_code),
            description: Some(code.as_str().to_owned()),
        }))
        .await;
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

/// The next socket event; never without a connection.
async fn next_message(
    connection: &mut Option<Connection>,
) -> Option<Result<Message, actix_ws::ProtocolError>> {
    match connection {
        Some(c) => c.messages.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves when a resuming connection asks for this session. Boxed: made
/// once per connection, and kept across loop turns.
fn wait_for_takeover(
    notify: Arc<Notify>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move { notify.notified().await })
}

/// At the end of a session: waits (at most 5 s) for the journal's running
/// appends; the `seq` they made durable.
async fn last_append(journal: &mut Option<Journaling>) -> Option<u32> {
    let journal = journal.as_mut()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    let mut durable = None;
    while journal.busy() {
        match tokio::time::timeout_at(deadline, journal.next()).await {
            Ok(Ok(seq)) => durable = Some(seq),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    durable
}

/// The running journal append of a session, if any.
async fn journal_next(
    journal: &mut Option<Journaling>,
) -> Result<u32, crate::cluster::ClusterError> {
    match journal {
        Some(journal) => journal.next().await,
        None => std::future::pending().await,
    }
}

/// A closed session can no longer be resumed anywhere: its record says so
/// (and expires with the bucket's age limit), and its journal goes.
fn forget_record(session: &Suspended, env: &SessionEnv) {
    if let (Some(cluster), Some(_)) = (&env.cluster, &session.journal) {
        if cluster.fenced() {
            return;
        }
        let cluster = cluster.clone();
        let id = session.core.id().to_owned();
        tokio::spawn(async move {
            let closing = cluster
                .sessions()
                .close(&id, cluster.node_id(), cluster.instance());
            if let Err(e) = closing.await {
                tracing::warn!(error = %e, "session record not marked closed");
                return;
            }
            let purge = crate::cluster::journal::purge(cluster.jetstream(), &id);
            if let Err(e) = purge.await {
                tracing::warn!(error = %e, "journal not purged; it expires in a day");
            }
        });
    }
}

/// Another node owns the session now (its journal moved on without this
/// node): drop everything without writing, and tell the client to go on
/// elsewhere (1012, as for a restart).
async fn abandon(
    session: Suspended,
    connection: Option<Connection>,
    guard: SessionGuard,
    env: &SessionEnv,
) {
    let id = session.core.id().to_owned();
    env.resumes.remove(&id);
    // Closes the sinks' files; their uploads stay incomplete (never
    // completed, so never visible in the store).
    drop(session);
    // What this node wrote must not come back: a restart would upload its
    // spool as an unfinished recording over the new owner's.
    remove_spool_files(&env.config.recorder_dir(), &id);
    if let Some(c) = connection {
        let _ =
            c.ws.close(Some(CloseReason {
                code: CloseCode::Restart,
                description: Some("session_moved".into()),
            }))
            .await;
    }
    drop(guard);
}

/// Cluster mode, a node shutting down (rolling restart): journals what the
/// session was handed, tells the client to come back (`reconnect` with its
/// resume credentials, then close 1012), and leaves the session to whichever
/// node the client reaches, writing nothing more for it here.
async fn hand_off(
    mut session: Suspended,
    connection: Option<Connection>,
    guard: SessionGuard,
    env: &SessionEnv,
) {
    let id = session.core.id().to_owned();
    let handed = session.core.resume_from_seq();
    if let Some(journal) = session.journal.as_mut() {
        if handed > 0 {
            journal.want(handed - 1);
        }
        let deadline = Instant::now() + env.config.shutdown_timeout();
        while journal.busy() {
            match tokio::time::timeout_at(deadline, journal.next()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "hand-off: the journal was not completed");
                    break;
                }
                Err(_) => {
                    tracing::warn!("hand-off: the journal was not completed in time");
                    break;
                }
            }
        }
    }
    // Released before the client hears of it: its resume, wherever it
    // lands, then finds no owner to wait for (a resume that raced the
    // release waited out this node's lease and was refused).
    env.resumes.remove(&id);
    if let Some(cluster) = &env.cluster {
        let release = cluster
            .sessions()
            .release(&id, cluster.node_id(), cluster.instance());
        match tokio::time::timeout(std::time::Duration::from_secs(2), release).await {
            Ok(Ok(())) => tracing::info!("session handed off for another node to take"),
            Ok(Err(e)) => tracing::warn!(error = %e, "session not released; its lease will be"),
            Err(_) => tracing::warn!("session not released within 2 s; its lease will be"),
        }
    }
    if let Some(mut c) = connection {
        let reconnect = serde_json::json!({
            "type": "reconnect",
            "reason": "node_shutdown",
            "session_id": id,
            "resume_token": session.core.resume_token(),
        });
        let _ = c.ws.text(reconnect.to_string()).await;
        let _ =
            c.ws.close(Some(CloseReason {
                code: CloseCode::Restart,
                description: Some("node_shutdown".into()),
            }))
            .await;
    }
    abandon(session, None, guard, env).await;
}

/// A session nobody will resume, rebuilt here to be finished: ends it as
/// an expired resume window would, and drives it to its close.
pub(super) async fn finish_detached(mut session: Suspended, guard: SessionGuard, env: SessionEnv) {
    let span = tracing::info_span!("session", id = %session.core.id());
    async move {
        session
            .core
            .handle_input(Input::ResumeExpired, Instant::now().into_std());
        drive(session, None, guard, env, None, 0).await;
    }
    .instrument(span)
    .await
}

/// A parked session handed to another node (it asked: its client came back
/// there).
pub(super) async fn hand_off_parked(session: Suspended, guard: SessionGuard, env: &SessionEnv) {
    hand_off(session, None, guard, env).await;
}

/// Cluster mode, before the sinks finish (and the recording is uploaded):
/// whether this node still owns the session. A node that was paused or cut
/// off past its lease may find another node took it over; it then finishes
/// nothing. If NATS cannot say, the node goes on: it had the session last.
async fn still_owner(session: &Suspended, env: &SessionEnv) -> bool {
    let (Some(cluster), Some(_)) = (&env.cluster, &session.journal) else {
        return true;
    };
    if cluster.fenced() {
        return false;
    }
    let lookup = cluster.sessions().get(session.core.id());
    match tokio::time::timeout(std::time::Duration::from_secs(2), lookup).await {
        Ok(Ok(Some((record, _)))) => {
            record.owner == cluster.node_id() && record.owner_instance == cluster.instance()
        }
        // No record: none was written yet (the first append is pending):
        // nobody else can hold it.
        Ok(Ok(None)) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot check the session's owner; finishing it");
            true
        }
        Err(_) => {
            tracing::warn!("no answer on the session's owner within 2 s; finishing it");
            true
        }
    }
}

/// Deletes the spool's files of session `id` (`<id>.*`: audio, sidecar,
/// transcripts). Ids are server-made UUIDs: the prefix names nothing else.
fn remove_spool_files(dir: &std::path::Path, id: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{id}.");
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(error = %e, path = %entry.path().display(), "spool file not removed");
            }
        }
    }
}

/// Resolves once shutdown has been signalled; never if the signal is gone.
async fn wait_for_shutdown(mut shutdown: watch::Receiver<bool>) {
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
