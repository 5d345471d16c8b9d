//! One file, one session: connect, `start`, paced `framing=seq` messages,
//! `stop`, and resume after a dropped connection (PROTOCOL.md §9).
//!
//! The whole file is in memory, so the resend buffer of the resume algorithm
//! is the file itself: after a reconnect the server says which `seq` it needs
//! first (`resume_from_seq`) and sending simply goes on from there, with the
//! original `seq` and timestamps. `seq` k is chunk k.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::connection::{connect, resume_url, without_query, Connection, Incoming};
pub use super::connection::{with_stream_path, STREAM_PATH};
use super::source::Source;
use crate::protocol::ErrorCode;

/// How long to wait for the server's final messages after `stop` before
/// calling the server unresponsive (transcription may take a while to finish).
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the TCP connect and WebSocket handshake may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After an `audio_too_fast` warning, pause this long before going on at real
/// time, so the server's allowance catches up within its one-second grace.
const TOO_FAST_PAUSE: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Source(#[from] super::source::SourceError),
    #[error("invalid --url {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the server refused the connection: HTTP {status}{detail}")]
    Refused { status: u16, detail: String },
    #[error("server error {code}{close}: {message}{partial}")]
    Server {
        code: String,
        message: String,
        close: String,
        partial: String,
    },
    #[error("the session ended before the file did: closed with {close_code} ({reason}){partial}")]
    EndedEarly {
        close_code: u16,
        reason: String,
        partial: String,
    },
    #[error("connection lost at {at_seconds:.2} s of media and not resumed within {waited_seconds:.1} s: {error}")]
    Lost {
        at_seconds: f64,
        waited_seconds: f64,
        error: String,
    },
    #[error("connection lost at {at_seconds:.2} s of media, and the session cannot be resumed ({why}): {error}")]
    NotResumable {
        at_seconds: f64,
        why: String,
        error: String,
    },
    #[error("unexpected reply from the server: {0}")]
    Protocol(String),
}

/// How fast to send media.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// This many media seconds per wall second (1.0 is real time).
    Factor(f64),
    /// As fast as the connection takes it (TCP back-pressure only).
    Max,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    /// API key or token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    pub speed: Speed,
    pub transcribe: Option<String>,
    /// How long to keep trying to resume after a drop.
    pub resume_timeout: Duration,
}

/// What the session reports while it runs, for the progress display.
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        session_id: String,
    },
    /// Sample frames sent so far (media time).
    Sent(u64),
    Lost {
        at_seconds: f64,
        error: String,
    },
    Resumed {
        from_seq: u32,
        at_seconds: f64,
    },
    /// A `transcript` message.
    Transcript(Value),
    /// A `vad` message.
    Vad(Value),
    /// A non-fatal `error` (warning), or a note from the client itself.
    Warning(String),
}

/// A finished session.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub session_id: String,
    /// The `recording` messages.
    pub recordings: Vec<Value>,
    /// The `transcript` messages, in arrival order.
    pub transcripts: Vec<Value>,
    /// The `closed` message.
    pub closed: Value,
    pub resumes: u32,
    /// For each resume, milliseconds from the lost connection to the
    /// server's `started` on the new one.
    pub resume_waits_ms: Vec<u64>,
}

/// When each message is due, in wall time.
struct Pacer {
    speed: Speed,
    rate: f64,
    anchor_at: Instant,
    anchor_frames: u64,
    paused_at: Option<Instant>,
}

impl Pacer {
    fn new(speed: Speed, sample_rate: u32) -> Self {
        Self {
            speed,
            rate: f64::from(sample_rate),
            anchor_at: Instant::now(),
            anchor_frames: 0,
            paused_at: None,
        }
    }

    fn due(&self, timestamp: u64) -> Instant {
        match self.speed {
            Speed::Max => self.anchor_at,
            Speed::Factor(factor) => {
                let ahead = timestamp.saturating_sub(self.anchor_frames) as f64;
                self.anchor_at + Duration::from_secs_f64(ahead / self.rate / factor)
            }
        }
    }

    /// A file is not a live microphone: time spent reconnecting is not made
    /// up for with a burst afterwards.
    fn pause(&mut self) {
        self.paused_at.get_or_insert_with(Instant::now);
    }

    fn unpause(&mut self) {
        if let Some(paused) = self.paused_at.take() {
            self.anchor_at += paused.elapsed();
        }
    }

    /// From `timestamp` on, real time, after a short pause.
    fn slow_to_real_time(&mut self, timestamp: u64) {
        self.speed = Speed::Factor(1.0);
        self.anchor_at = Instant::now() + TOO_FAST_PAUSE;
        self.anchor_frames = timestamp;
    }
}

/// Session state that outlives connections.
struct Session<'a> {
    source: &'a Source,
    options: &'a Options,
    events: &'a mpsc::UnboundedSender<Event>,
    /// Index of the next chunk to send (= its seq).
    next: usize,
    /// `session_id` and `resume_token` once started.
    id: Option<String>,
    resume_token: Option<String>,
    pacer: Pacer,
    /// The last fatal `error` the server sent, if any.
    error: Option<Value>,
    /// The code of the last close frame the server sent.
    close_frame: Option<u16>,
    /// `stop` went out on the current (or the lost) connection.
    stop_sent: bool,
    outcome: Outcome,
}

/// How a connection ended.
enum End {
    /// `closed` arrived.
    Closed,
    /// The connection broke before `closed`.
    Lost(String),
}

fn kind(message: &Value) -> &str {
    message["type"].as_str().unwrap_or("")
}

impl Session<'_> {
    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn sent_seconds(&self) -> f64 {
        let frames = self
            .source
            .chunks
            .get(self.next)
            .map_or(self.source.total_frames, |c| c.timestamp);
        frames as f64 / f64::from(self.source.sample_rate)
    }

    fn start_message(&self) -> Value {
        let mut start = json!({
            "type": "start",
            "encoding": self.source.encoding,
            "sample_rate": self.source.sample_rate,
            "channels": self.source.channels,
            "framing": "seq",
            "metadata": { "source": self.source.name() },
        });
        if let Some(name) = &self.options.transcribe {
            start["transcribe"] = json!(name);
        }
        start
    }

    fn partial(&self) -> String {
        match self.outcome.recordings.first() {
            Some(r) => format!(
                "; the audio received so far is recorded in {} ({:.2} s)",
                r["path"].as_str().unwrap_or("?"),
                r["duration_seconds"].as_f64().unwrap_or(0.0)
            ),
            None => String::new(),
        }
    }

    fn server_error(&self, error: &Value) -> StreamError {
        let close_code = self.outcome.closed["close_code"]
            .as_u64()
            .map(|c| c as u16)
            .or(self.close_frame);
        let code = error["code"].as_str().unwrap_or("?");
        let partial = if code == ErrorCode::ResumeRejected.as_str() && self.stop_sent {
            // The server may well have finished: it had `stop`.
            "; the connection dropped after `stop`, so the recording is probably complete on the server, but its summary was lost".to_owned()
        } else {
            self.partial()
        };
        StreamError::Server {
            code: code.to_owned(),
            message: error["message"].as_str().unwrap_or("").to_owned(),
            close: close_code.map_or(String::new(), |c| format!(" (close {c})")),
            partial,
        }
    }

    /// Handles one server message in any phase. Returns true on `closed`.
    fn take(&mut self, message: Value) -> bool {
        match kind(&message) {
            "ack" | "stats" | "flushed" | "started" => {}
            "transcript" => {
                self.outcome.transcripts.push(message.clone());
                self.emit(Event::Transcript(message));
            }
            "vad" => self.emit(Event::Vad(message)),
            "recording" => self.outcome.recordings.push(message),
            // Cluster mode: the node is shutting down; the close (1012)
            // that follows is answered by resuming, as for any drop.
            "reconnect" => self.emit(Event::Warning(format!(
                "the server asked for a reconnect ({}); resuming",
                message["reason"].as_str().unwrap_or("?")
            ))),
            "error" if message["fatal"] == true => self.error = Some(message),
            "error" => {
                if message["code"] == ErrorCode::AudioTooFast.as_str() {
                    let at = self
                        .source
                        .chunks
                        .get(self.next)
                        .map_or(self.source.total_frames, |c| c.timestamp);
                    self.pacer.slow_to_real_time(at);
                    self.emit(Event::Warning(format!(
                        "{}; going on at real time",
                        message["message"]
                            .as_str()
                            .unwrap_or(ErrorCode::AudioTooFast.as_str())
                    )));
                } else {
                    self.emit(Event::Warning(format!(
                        "{}: {}",
                        message["code"].as_str().unwrap_or("?"),
                        message["message"].as_str().unwrap_or("")
                    )));
                }
            }
            "closed" => {
                self.outcome.closed = message;
                return true;
            }
            // Newer server messages: ignored, as PROTOCOL.md §10 advises.
            _ => {}
        }
        false
    }

    /// Waits for `started` on a fresh connection.
    async fn await_started(&mut self, conn: &mut Connection) -> Result<Value, End> {
        loop {
            let incoming = tokio::time::timeout(CONNECT_TIMEOUT, conn.rx.recv()).await;
            match incoming {
                Err(_) => return Err(End::Lost("no `started` from the server".into())),
                Ok(None) => return Err(End::Lost("the connection ended".into())),
                Ok(Some(Incoming::Text(message))) if kind(&message) == "started" => {
                    return Ok(message)
                }
                Ok(Some(Incoming::Text(message))) => {
                    if self.take(message) {
                        return Err(End::Closed);
                    }
                }
                Ok(Some(Incoming::Closed(frame))) => {
                    self.close_frame = frame.as_ref().map(|f| f.0);
                    return Err(End::Lost(match frame {
                        Some((code, reason)) => format!("closed with {code} {reason}"),
                        None => "closed".into(),
                    }));
                }
                Ok(Some(Incoming::Lost(error))) => return Err(End::Lost(error)),
            }
        }
    }

    /// Sends what is due and reads what comes until `closed` or a drop.
    async fn exchange(&mut self, conn: &mut Connection) -> End {
        // A new connection sends `stop` again once everything is resent.
        self.stop_sent = false;
        let mut last_heard = Instant::now();
        loop {
            // Everything that has arrived, first.
            while let Ok(incoming) = conn.rx.try_recv() {
                if let Some(end) = self.on_incoming(incoming) {
                    return end;
                }
                last_heard = Instant::now();
            }
            let chunk = self.source.chunks.get(self.next);
            let wait_until = match chunk {
                Some(chunk) => {
                    let due = self.pacer.due(chunk.timestamp);
                    if due <= Instant::now() {
                        let mut message = Vec::with_capacity(12 + chunk.payload.len());
                        message.extend_from_slice(&(self.next as u32).to_le_bytes());
                        message.extend_from_slice(&chunk.timestamp.to_le_bytes());
                        message.extend_from_slice(&chunk.payload);
                        if let Err(e) = conn.sink.send(Message::binary(message)).await {
                            return End::Lost(e.to_string());
                        }
                        self.next += 1;
                        self.emit(Event::Sent(chunk.timestamp + u64::from(chunk.frames)));
                        continue;
                    }
                    due
                }
                None if !self.stop_sent => {
                    let stop = Message::text(json!({"type": "stop"}).to_string());
                    if let Err(e) = conn.sink.send(stop).await {
                        return End::Lost(e.to_string());
                    }
                    self.stop_sent = true;
                    last_heard = Instant::now();
                    continue;
                }
                None => {
                    if last_heard.elapsed() > FINISH_TIMEOUT {
                        return End::Lost(format!(
                            "no reply to `stop` within {} s",
                            FINISH_TIMEOUT.as_secs()
                        ));
                    }
                    Instant::now() + FINISH_TIMEOUT
                }
            };
            tokio::select! {
                incoming = conn.rx.recv() => {
                    let incoming = incoming.unwrap_or(Incoming::Lost("the connection ended".into()));
                    if let Some(end) = self.on_incoming(incoming) {
                        return end;
                    }
                    last_heard = Instant::now();
                }
                _ = tokio::time::sleep_until(wait_until.into()) => {}
            }
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) -> Option<End> {
        match incoming {
            Incoming::Text(message) => self.take(message).then_some(End::Closed),
            Incoming::Closed(frame) => {
                self.close_frame = frame.as_ref().map(|f| f.0);
                Some(End::Lost(match frame {
                    Some((code, reason)) => format!("closed with {code} {reason} before `closed`"),
                    None => "closed before `closed`".into(),
                }))
            }
            Incoming::Lost(error) => Some(End::Lost(error)),
        }
    }

    /// The result once `closed` has arrived.
    fn finish(mut self) -> Result<Outcome, StreamError> {
        let closed = &self.outcome.closed;
        let close_code = closed["close_code"].as_u64().unwrap_or(0) as u16;
        if let Some(error) = &self.error {
            return Err(self.server_error(error));
        }
        if close_code != 1000 || closed["reason"] != "stop" {
            return Err(StreamError::EndedEarly {
                close_code,
                reason: closed["reason"].as_str().unwrap_or("?").to_owned(),
                partial: self.partial(),
            });
        }
        self.outcome.session_id = self.id.take().unwrap_or_default();
        Ok(self.outcome)
    }
}

/// Refusals of a resume that another try (on another node, behind a load
/// balancer) can overcome: a node shutting down, or full.
fn retryable_refusal(error: &Value) -> bool {
    let code = error["code"].as_str().unwrap_or_default();
    code == ErrorCode::ShuttingDown.as_str() || code == ErrorCode::ServerFull.as_str()
}

/// Streams `source` to the server; resumes after drops.
pub async fn stream(
    source: &Source,
    options: &Options,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Outcome, StreamError> {
    let mut session = Session {
        source,
        options,
        events,
        next: 0,
        id: None,
        resume_token: None,
        pacer: Pacer::new(options.speed, source.sample_rate),
        error: None,
        close_frame: None,
        stop_sent: false,
        outcome: Outcome::default(),
    };
    // Set while the connection is down: when it went, and why.
    let mut lost: Option<(Instant, String)> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let url = match (&session.id, &session.resume_token) {
            (Some(id), Some(token)) => resume_url(&options.url, id, token),
            _ => options.url.clone(),
        };
        let mut conn = match connect(&url, options.token.as_deref()).await {
            Ok(conn) => conn,
            Err(e) => match &lost {
                None => return Err(e),
                Some((since, _)) => {
                    if since.elapsed() >= options.resume_timeout {
                        return Err(StreamError::Lost {
                            at_seconds: session.sent_seconds(),
                            waited_seconds: since.elapsed().as_secs_f64(),
                            error: e.to_string(),
                        });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        let resuming = session.id.is_some();
        if !resuming {
            let start = Message::text(session.start_message().to_string());
            if let Err(e) = conn.sink.send(start).await {
                return Err(StreamError::Connect {
                    url: without_query(&url).to_owned(),
                    message: e.to_string(),
                });
            }
        }
        let started = match session.await_started(&mut conn).await {
            Ok(started) => started,
            // A node on its way down refused the resume: another will take it.
            Err(End::Closed) | Err(End::Lost(_))
                if resuming && session.error.as_ref().is_some_and(retryable_refusal) =>
            {
                let error = session.error.take().unwrap_or_default();
                let since = lost
                    .get_or_insert((Instant::now(), error["message"].to_string()))
                    .0;
                if since.elapsed() >= options.resume_timeout {
                    return Err(session.server_error(&error));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(End::Closed) | Err(End::Lost(_)) if session.error.is_some() => {
                let error = session.error.clone().unwrap_or_default();
                return Err(session.server_error(&error));
            }
            Err(End::Closed) => return session.finish(),
            Err(End::Lost(error)) if !resuming => {
                return Err(StreamError::Connect {
                    url: without_query(&url).to_owned(),
                    message: error,
                })
            }
            Err(End::Lost(error)) => {
                // The server is there but did not take the session back yet:
                // keep trying within the window.
                let since = lost.get_or_insert((Instant::now(), error.clone())).0;
                if since.elapsed() >= options.resume_timeout {
                    return Err(StreamError::Lost {
                        at_seconds: session.sent_seconds(),
                        waited_seconds: since.elapsed().as_secs_f64(),
                        error,
                    });
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        if resuming {
            if started["session_id"].as_str() != session.id.as_deref() {
                return Err(StreamError::Protocol(format!(
                    "resumed a different session: {}",
                    started["session_id"]
                )));
            }
            let from = started["resume_from_seq"].as_u64().ok_or_else(|| {
                StreamError::Protocol("`started` on resume without resume_from_seq".into())
            })? as usize;
            if from > session.next {
                return Err(StreamError::Protocol(format!(
                    "the server wants seq {from} on, but only {} were sent",
                    session.next
                )));
            }
            session.next = from;
            session.outcome.resumes += 1;
            if let Some((since, _)) = &lost {
                let waited = since.elapsed().as_millis();
                session
                    .outcome
                    .resume_waits_ms
                    .push(u64::try_from(waited).unwrap_or(u64::MAX));
            }
            session.emit(Event::Resumed {
                from_seq: from as u32,
                at_seconds: session.sent_seconds(),
            });
        } else {
            let id = started["session_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            session.resume_token = started["resume_token"].as_str().map(str::to_owned);
            session.emit(Event::Started {
                session_id: id.clone(),
            });
            session.id = Some(id);
        }
        session.pacer.unpause();
        match session.exchange(&mut conn).await {
            End::Closed => return session.finish(),
            End::Lost(error) => {
                if session.error.is_some() {
                    let error = session.error.clone().unwrap_or_default();
                    return Err(session.server_error(&error));
                }
                if session.resume_token.is_none() {
                    return Err(StreamError::NotResumable {
                        at_seconds: session.sent_seconds(),
                        why: "the server sent no resume token".into(),
                        error,
                    });
                }
                session.emit(Event::Lost {
                    at_seconds: session.sent_seconds(),
                    error: error.clone(),
                });
                session.pacer.pause();
                lost = Some((Instant::now(), error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_path_gets_the_stream_path() {
        assert_eq!(with_stream_path("ws://h:8080"), "ws://h:8080/v1/stream");
        assert_eq!(with_stream_path("wss://h/"), "wss://h/v1/stream");
        assert_eq!(
            with_stream_path("ws://h:1?sinks=none"),
            "ws://h:1/v1/stream?sinks=none"
        );
        assert_eq!(with_stream_path("ws://h:1/v1/stream"), "ws://h:1/v1/stream");
        assert_eq!(
            with_stream_path("wss://p/cochlea/x?a=b"),
            "wss://p/cochlea/x?a=b"
        );
        assert_eq!(with_stream_path("not a url"), "not a url");
    }

    #[test]
    fn resume_urls_keep_only_the_credential() {
        assert_eq!(
            resume_url("ws://h:1/v1/stream", "id", "tok"),
            "ws://h:1/v1/stream?resume=id&resume_token=tok"
        );
        assert_eq!(
            resume_url("ws://h:1/v1/stream?sinks=none&token=ct1.x", "id", "tok"),
            "ws://h:1/v1/stream?resume=id&resume_token=tok&token=ct1.x"
        );
    }

    #[test]
    fn messages_leave_out_queries() {
        assert_eq!(
            without_query("ws://h:1/v1/stream?resume=a&resume_token=secret"),
            "ws://h:1/v1/stream"
        );
        assert_eq!(without_query("ws://h:1/v1/stream"), "ws://h:1/v1/stream");
    }

    #[test]
    fn pacing_follows_media_time_and_skips_outages() {
        let mut pacer = Pacer::new(Speed::Factor(2.0), 16000);
        let start = pacer.due(0);
        assert_eq!(pacer.due(32000) - start, Duration::from_secs(1));
        pacer.pause();
        std::thread::sleep(Duration::from_millis(20));
        pacer.unpause();
        assert!(pacer.due(0) - start >= Duration::from_millis(20));
        pacer.slow_to_real_time(48000);
        let at = pacer.due(48000);
        assert_eq!(pacer.due(64000) - at, Duration::from_secs(1));
        // A resend of something older is due at once, not in the past.
        assert_eq!(pacer.due(0), at);
        let max = Pacer::new(Speed::Max, 8000);
        assert_eq!(max.due(1 << 40), max.due(0));
    }
}
