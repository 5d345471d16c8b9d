//! One upstream connection's task: connects, sends what the kind's
//! [`Protocol`] says, reconnects with backoff when the upstream drops, and
//! turns what it hears into `transcript` outcomes in stream time.
//!
//! It keeps the audio it sent until a final result covers it (at most
//! `replay_buffer_ms`). On a new connection it sends that tail again and
//! maps the connection's time (which starts at 0) back to stream time with
//! a [`TimeMap`], so transcripts stay in stream time and in order. Audio
//! older than the buffer that no final covered is reported as
//! `transcribe_failed`. The coverage ("ack") is the end of the latest final
//! on the connection, so where one connection carries several channels
//! (`deepgram`), a reconnect can lose another channel's words in progress.
//!
//! The protocol's keepalive goes up after [`KEEPALIVE_INTERVAL`] without
//! audio, its finalize on the session's `flush`, its close when the session
//! ends; the task then waits up to `stop_wait_ms` for the last results. Only
//! a normal close after ours says they are all in: one with an error code
//! is a lost connection (reconnect, replay, close again, within that wait).
//!
//! An utterance id is taken on the first non-empty result of an upstream
//! utterance and kept until its final; partials get their `stable_text` in
//! the orderer, and finals are persisted like the batch backend's.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::super::backend::Backend;
use super::super::config::TranscriptionConfig;
use super::super::order::Outcome;
use super::{
    frames_of, report_lost, seconds_of, Command, Heard, Protocol, ReplayBuffer, Reply, Setup,
    StreamError, StreamingKind, TimeMap, KEEPALIVE_INTERVAL,
};
use crate::protocol::{ErrorCode, ServerMessage, TranscribeErrorInfo, Transcript, Word};
use crate::sinks::SinkEvent;
use crate::telemetry::names;

const MAX_RECONNECT_BACKOFF_MS: u64 = 5_000;
/// Send times kept for the lag of results (a bound for an upstream that
/// covers nothing for a long time: 4096 chunks are minutes of audio).
const MAX_SENT_TIMES: usize = 4_096;

/// Whether an upstream's close, after ours was asked for, says that every
/// result was given: a normal close (1000, or a frame without a code). Any
/// other code (1008 policy, 1011 internal error, 1001 going away: a cochlea
/// upstream closes with 1008 when the replay comes faster than its
/// `max_realtime_factor`) ends the connection without its last results, so
/// the audio is sent again or reported lost rather than dropped unsaid.
fn closed_cleanly(frame: Option<&CloseFrame>) -> bool {
    frame.is_none_or(|f| f.code == CloseCode::Normal)
}

/// How a connection ended.
enum Ended {
    /// The upstream gave its last results after the close: all is in.
    Done,
    /// The sink is gone (the session aborted), or the stop wait is spent.
    Abandoned,
    Lost(StreamError),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(super) struct LinkSettings<'a> {
    pub backend: Arc<Backend>,
    pub kind: &'static StreamingKind,
    pub first_channel: u16,
    pub channels: u16,
    pub interim: bool,
    pub outcomes: mpsc::UnboundedSender<Outcome>,
    pub events: mpsc::UnboundedSender<SinkEvent>,
    /// The session's utterance ids, shared by its links.
    pub next_id: Arc<AtomicU64>,
    pub config: &'a TranscriptionConfig,
}

/// The task of one upstream connection (and its reconnects).
pub(super) struct Link {
    backend: Arc<Backend>,
    protocol: Box<dyn Protocol>,
    first_channel: u16,
    channels: u16,
    sample_rate: u32,
    interim: bool,
    outcomes: mpsc::UnboundedSender<Outcome>,
    events: mpsc::UnboundedSender<SinkEvent>,
    connect_timeout_ms: u64,
    backoff_ms: u64,
    stop_wait: Duration,
    replay: ReplayBuffer,
    /// The current connection's time base.
    map: TimeMap,
    /// The stream frame after the last audio taken.
    next_stream_frame: u64,
    /// Stream frames before this are covered by finals.
    acked_frame: u64,
    /// Utterances with results but no final yet: (channel, upstream key).
    open: HashMap<(u16, Option<String>), u64>,
    /// Per channel, utterances a lost connection left open under its own
    /// keys, oldest first: the new connection's next utterances continue
    /// them (the replay makes it hear that speech again).
    orphans: HashMap<u16, VecDeque<u64>>,
    next_id: Arc<AtomicU64>,
    /// A finalize asked for while disconnected.
    pending_finalize: bool,
    /// When the audio up to each connection frame was sent (oldest first).
    sent_at: VecDeque<(u64, Instant)>,
}

impl Link {
    pub(super) fn new(settings: LinkSettings<'_>) -> Self {
        let kind = settings.kind;
        let replay_frames =
            settings.backend.replay_buffer_ms() * u64::from(kind.sample_rate) / 1000;
        Self {
            replay: ReplayBuffer::new(settings.channels, replay_frames),
            protocol: (kind.protocol)(),
            backend: settings.backend,
            first_channel: settings.first_channel,
            channels: settings.channels,
            sample_rate: kind.sample_rate,
            interim: settings.interim,
            outcomes: settings.outcomes,
            events: settings.events,
            connect_timeout_ms: settings.config.request_timeout_ms,
            backoff_ms: settings.config.retry_backoff_ms.max(1),
            stop_wait: Duration::from_millis(settings.config.stop_wait_ms),
            map: TimeMap::default(),
            next_stream_frame: 0,
            acked_frame: 0,
            open: HashMap::new(),
            orphans: HashMap::new(),
            next_id: settings.next_id,
            pending_finalize: false,
            sent_at: VecDeque::new(),
        }
    }

    fn setup(&self) -> Setup<'_> {
        Setup {
            backend: &self.backend,
            channels: self.channels,
            sample_rate: self.sample_rate,
            interim: self.interim,
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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
            let outcome = if attempt.is_ok() { "ok" } else { "failed" };
            metrics::counter!(names::TRANSCRIBE_UPSTREAM_CONNECTS_TOTAL, "backend" => self.backend.name.clone(), "outcome" => outcome).increment(1);
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
                            metrics::counter!(names::TRANSCRIBE_UPSTREAM_DROPS_TOTAL, "backend" => self.backend.name.clone()).increment(1);
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
                Err(_) => {
                    // Say at once (not at the reconnect) what the replay
                    // buffer could no longer hold.
                    self.report_unreplayable();
                    return close_by.is_none_or(|close| Instant::now() < close);
                }
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

    /// Takes live audio into the replay buffer. A hole before it (dropped
    /// audio) was reported by the sink; the map keeps the time right.
    fn keep(&mut self, start_frame: u64, bytes: Vec<u8>) {
        self.next_stream_frame = start_frame + self.replay.frames_in(&bytes);
        self.replay.push(start_frame, bytes);
    }

    async fn connect(&self) -> Result<Socket, StreamError> {
        let request = self.protocol.request(&self.setup())?;
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
        self.orphan_keyed_utterances();
        let setup = Setup {
            backend: &self.backend,
            channels: self.channels,
            sample_rate: self.sample_rate,
            interim: self.interim,
        };
        let mut first = self.protocol.opened(&setup);
        self.sent_at.clear();
        self.report_unreplayable();
        let replay: Vec<(u64, Vec<u8>)> = self.replay.chunks().cloned().collect();
        for (start, bytes) in replay {
            let frames = self.replay.frames_in(&bytes);
            self.map.append(start, frames);
            first.push(self.protocol.audio(bytes, frames));
            self.sent();
        }
        if std::mem::take(&mut self.pending_finalize) {
            first.extend(self.protocol.finalize());
        }
        let mut close_sent = false;
        if close_by.is_some() {
            first.extend(self.protocol.close());
            close_sent = true;
        }
        for message in first {
            if let Err(e) = tx.send(message).await {
                return Ended::Lost(StreamError::Lost(e.to_string()));
            }
        }
        if close_sent && self.protocol.drained() {
            let _ = tx.send(Message::Close(None)).await;
            return Ended::Done;
        }
        let mut keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
        loop {
            let stop_at = close_by.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                command = commands.recv(), if !close_sent => {
                    let outgoing = match command {
                        Some(Command::Audio { start_frame, bytes }) => {
                            let frames = self.replay.frames_in(&bytes);
                            self.map.append(start_frame, frames);
                            self.keep(start_frame, bytes.clone());
                            keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
                            let message = self.protocol.audio(bytes, frames);
                            self.sent();
                            vec![message]
                        }
                        Some(Command::Finalize) => self.protocol.finalize(),
                        Some(Command::Close) => {
                            close_by.get_or_insert(Instant::now() + self.stop_wait);
                            close_sent = true;
                            self.protocol.close()
                        }
                        None => return Ended::Abandoned,
                    };
                    for message in outgoing {
                        if let Err(e) = tx.send(message).await {
                            return Ended::Lost(StreamError::Lost(e.to_string()));
                        }
                    }
                    if close_sent && self.protocol.drained() {
                        // Nothing was pending: done without waiting.
                        let _ = tx.send(Message::Close(None)).await;
                        return Ended::Done;
                    }
                }
                message = rx.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let replies = self.protocol.on_text(text.as_str());
                        if self.take(replies) && close_sent {
                            // Every result is in: close our side, done.
                            let _ = tx.send(Message::Close(None)).await;
                            return Ended::Done;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        if close_sent && closed_cleanly(frame.as_ref()) {
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
                    if let Some(message) = self.protocol.keepalive() {
                        if let Err(e) = tx.send(message).await {
                            return Ended::Lost(StreamError::Lost(e.to_string()));
                        }
                    }
                }
                _ = tokio::time::sleep_until(stop_at), if close_sent => {
                    tracing::warn!("upstream: no last results within stop_wait_ms of the close");
                    return Ended::Abandoned;
                }
            }
        }
    }

    fn lost(&mut self, since: u64, until: u64, why: &str) {
        report_lost(
            &self.events,
            &self.backend.name,
            self.first_channel..self.first_channel + self.channels,
            (since, until),
            self.sample_rate,
            why,
        );
    }

    /// What no final covers and the replay buffer no longer holds is lost.
    fn report_unreplayable(&mut self) {
        let replay_from = self.replay.oldest().unwrap_or(self.next_stream_frame);
        if replay_from > self.acked_frame {
            self.lost(
                self.acked_frame,
                replay_from,
                "older than the replay buffer while the upstream connection was down",
            );
            self.acked_frame = replay_from;
        }
    }

    /// Notes that the connection's audio up to now was sent now.
    fn sent(&mut self) {
        if self.sent_at.len() == MAX_SENT_TIMES {
            self.sent_at.pop_front();
        }
        self.sent_at
            .push_back((self.map.upstream_end(), Instant::now()));
    }

    /// Since the audio up to `upstream_frame` went up, in milliseconds.
    fn lag_ms(&self, upstream_frame: u64) -> u64 {
        let index = self
            .sent_at
            .partition_point(|(frame, _)| *frame < upstream_frame);
        self.sent_at
            .get(index)
            .or(self.sent_at.back())
            .map_or(0, |(_, at)| at.elapsed().as_millis() as u64)
    }

    /// Handles a message's replies; true if they say every result is in.
    fn take(&mut self, replies: Vec<Reply>) -> bool {
        let mut drained = false;
        for reply in replies {
            match reply {
                Reply::Heard(heard) => self.on_heard(heard),
                Reply::Covered(upstream_s) => self.cover(upstream_s),
                Reply::Drained => drained = true,
                Reply::Error(text) => {
                    tracing::warn!(error = %self.backend.scrub_text(text.chars().take(300).collect()), "upstream error")
                }
            }
        }
        drained
    }

    /// The upstream has transcribed everything before `upstream_s`: that
    /// audio need not be sent again.
    fn cover(&mut self, upstream_s: f64) {
        let covered = frames_of(upstream_s, self.sample_rate);
        let stream_end = self.map.to_stream(covered);
        if stream_end > self.acked_frame {
            self.acked_frame = stream_end;
            self.replay.ack(stream_end);
        }
        self.map.forget_before(covered);
        while self
            .sent_at
            .front()
            .is_some_and(|(frame, _)| *frame < covered)
        {
            self.sent_at.pop_front();
        }
    }

    fn stream_seconds(&self, upstream_s: f64) -> f64 {
        let frame = self.map.to_stream(frames_of(upstream_s, self.sample_rate));
        seconds_of(frame, self.sample_rate)
    }

    fn on_heard(&mut self, heard: Heard) {
        if heard.channel >= self.channels {
            tracing::warn!(
                channel = heard.channel,
                "upstream result for a channel the connection does not carry"
            );
            return;
        }
        let channel = self.first_channel + heard.channel;
        if heard.is_final {
            self.cover(heard.end_s);
        } else if !self.interim {
            return;
        }
        let text = heard.text.trim().to_owned();
        let key = (channel, heard.key);
        let id = match self.open.get(&key) {
            Some(id) => *id,
            // Silence: nothing to say, no utterance.
            None if text.is_empty() => return,
            None => {
                if let Some(id) = self.orphans.get_mut(&channel).and_then(VecDeque::pop_front) {
                    self.open.insert(key.clone(), id);
                    id
                } else {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    self.open.insert(key.clone(), id);
                    let _ = self.outcomes.send(Outcome::Created { id, channel });
                    id
                }
            }
        };
        let words: Vec<Word> = heard
            .words
            .iter()
            .map(|w| Word {
                word: w.word.clone(),
                start: self.stream_seconds(w.start_s),
                end: self.stream_seconds(w.end_s),
                confidence: w.confidence,
            })
            .collect();
        let lag_ms = self.lag_ms(frames_of(heard.end_s, self.sample_rate));
        if heard.is_final {
            metrics::histogram!(names::TRANSCRIBE_UPSTREAM_LAG_SECONDS, "backend" => self.backend.name.clone())
                .record(lag_ms as f64 / 1000.0);
        }
        let transcript = Transcript {
            utterance_id: id,
            channel,
            start: self.stream_seconds(heard.start_s),
            end: self.stream_seconds(heard.end_s.max(heard.start_s)),
            text,
            stable_text: None,
            is_final: heard.is_final,
            words: (heard.is_final && !words.is_empty()).then_some(words),
            backend: self.backend.name.clone(),
            backend_ms: lag_ms,
        };
        if heard.is_final {
            self.open.remove(&key);
            let _ = self.outcomes.send(Outcome::Done {
                id,
                channel,
                message: ServerMessage::Transcript(transcript),
            });
        } else {
            let _ = self.outcomes.send(Outcome::Partial(transcript));
        }
    }

    /// A new connection names its utterances anew: those open under the
    /// lost one's keys wait to be continued. (Without keys, one utterance
    /// per channel simply continues.)
    fn orphan_keyed_utterances(&mut self) {
        let mut keyed: Vec<(u16, u64)> = Vec::new();
        self.open.retain(|(channel, key), id| {
            if key.is_some() {
                keyed.push((*channel, *id));
            }
            key.is_none()
        });
        keyed.sort_unstable_by_key(|(_, id)| *id);
        for (channel, id) in keyed {
            let waiting = self.orphans.entry(channel).or_default();
            waiting.push_back(id);
            waiting.make_contiguous().sort_unstable();
        }
    }

    /// The stream has ended. Without the upstream's last results, audio no
    /// final covered is reported; open utterances are closed with an error.
    fn give_up(&mut self, complete: bool) {
        if !complete && self.next_stream_frame > self.acked_frame {
            self.lost(
                self.acked_frame,
                self.next_stream_frame,
                "no final result from the upstream before the stream ended",
            );
        }
        let mut open: Vec<(u16, u64)> = self.open.drain().map(|((c, _), id)| (c, id)).collect();
        for (channel, waiting) in self.orphans.drain() {
            open.extend(waiting.into_iter().map(|id| (channel, id)));
        }
        open.sort_by_key(|(_, id)| *id);
        for (channel, id) in open {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_normal_close_after_close_stream_counts_as_complete() {
        let frame = |code: u16| CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        assert!(closed_cleanly(None));
        assert!(closed_cleanly(Some(&frame(1000))));
        for code in [1001, 1008, 1011, 4000] {
            assert!(!closed_cleanly(Some(&frame(code))), "{code}");
        }
    }
}
