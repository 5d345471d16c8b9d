//! One stream of the load: connect, wait for `started`, send at real-time
//! pace (or only rare keepalives), `stop`, wait for `closed`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::histogram::Histogram;

/// What every stream shares, read-only.
pub struct Plan {
    pub addr: SocketAddr,
    /// The full `ws://` URL, query included.
    pub url: String,
    pub payloads: Vec<Vec<u8>>,
    /// Seconds of audio in one loop of `payloads`.
    pub loop_seconds: f64,
    pub frames_per_message: u64,
    pub message_period: Duration,
    pub messages_per_stream: u64,
    pub duration: Duration,
    pub idle: bool,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub close_timeout: Duration,
}

impl Plan {
    /// Message `k` of stream `index`: the `seq` header and the payload. Each
    /// stream starts at its own place in the loop, so recordings differ.
    fn message(&self, index: usize, k: u64) -> Message {
        let len = self.payloads.len() as u64;
        let start = (index as u64).wrapping_mul(7_919) % len;
        let payload = &self.payloads[((start + k) % len) as usize];
        let mut bytes = Vec::with_capacity(12 + payload.len());
        // k < messages_per_stream <= u32::MAX (checked when planning).
        bytes.extend_from_slice(&(k as u32).to_le_bytes());
        bytes.extend_from_slice(&(k * self.frames_per_message).to_le_bytes());
        bytes.extend_from_slice(payload);
        Message::binary(bytes)
    }
}

/// Live counters for the per-second report, shared by every stream.
#[derive(Default)]
pub struct Counters {
    /// Streams that got `started` and have not ended yet.
    pub open: AtomicUsize,
    /// Streams that ever got `started`.
    pub started: AtomicUsize,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub failures: AtomicU64,
    /// Send lateness: when a message went out against when it was due.
    pub lateness: Histogram,
}

/// How one stream ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: u64,
    pub acked: u64,
    /// `audio_messages` from the server's `closed`.
    pub server_audio_messages: Option<u64>,
    pub failure: Option<String>,
    /// Non-fatal `error` codes the server sent (e.g. `audio_damaged`).
    pub warnings: Vec<String>,
}

/// The fields of a server message the generator looks at.
#[derive(Deserialize)]
struct ServerMessage {
    #[serde(rename = "type")]
    kind: String,
    seq: Option<u32>,
    code: Option<String>,
    fatal: Option<bool>,
    audio_messages: Option<u64>,
    close_code: Option<u16>,
}

type Ws = WebSocketStream<TcpStream>;

/// A failure, named for the report (`connect`, `refused:server_full`, ...).
struct Failed(String);

fn failed(kind: impl Into<String>) -> Failed {
    Failed(kind.into())
}

/// Decrements `open` however the stream ends.
struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn run(
    index: usize,
    plan: Arc<Plan>,
    counters: Arc<Counters>,
    start_at: Instant,
) -> Outcome {
    sleep_until(start_at).await;
    let mut stream = Stream {
        index,
        plan: &plan,
        counters: &counters,
        outcome: Outcome::default(),
        closed_seen: false,
        close_code: None,
    };
    if let Err(Failed(kind)) = stream.drive().await {
        counters.failures.fetch_add(1, Ordering::Relaxed);
        stream.outcome.failure = Some(kind);
    }
    stream.outcome
}

struct Stream<'a> {
    index: usize,
    plan: &'a Plan,
    counters: &'a Counters,
    outcome: Outcome,
    closed_seen: bool,
    /// From the server's `closed` message.
    close_code: Option<u16>,
}

impl Stream<'_> {
    async fn drive(&mut self) -> Result<(), Failed> {
        let plan = self.plan;
        let tcp = timeout(plan.connect_timeout, TcpStream::connect(plan.addr))
            .await
            .map_err(|_| failed("connect_timeout"))?
            .map_err(|e| failed(format!("connect:{:?}", e.kind())))?;
        // One small message every 20 ms: Nagle would hold it for an ack.
        let _ = tcp.set_nodelay(true);
        // tungstenite zero-fills its whole read buffer (128 KiB by default)
        // before every read attempt, and a stream polls for the server's acks
        // before each message: that memset was 44 % of the generator's CPU.
        // The server only sends small JSON.
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (mut ws, _) = timeout(
            plan.connect_timeout,
            tokio_tungstenite::client_async_with_config(plan.url.as_str(), tcp, Some(config)),
        )
        .await
        .map_err(|_| failed("handshake_timeout"))?
        .map_err(|e| failed(format!("handshake:{}", short_error(&e))))?;

        self.wait_started(&mut ws).await?;
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        let _open = OpenGuard(self.counters);

        if plan.idle {
            self.idle(&mut ws).await?;
        } else {
            self.stream_audio(&mut ws).await?;
        }
        ws.send(Message::text(r#"{"type":"stop"}"#))
            .await
            .map_err(|e| failed(format!("send_stop:{}", short_error(&e))))?;
        self.wait_closed(&mut ws).await
    }

    async fn wait_started(&mut self, ws: &mut Ws) -> Result<(), Failed> {
        let deadline = Instant::now() + self.plan.connect_timeout;
        loop {
            let message = match timeout_at(deadline, ws.next()).await {
                Err(_) => return Err(failed("started_timeout")),
                Ok(None) => return Err(failed("closed_before_started")),
                Ok(Some(Err(e))) => return Err(failed(format!("ws:{}", short_error(&e)))),
                Ok(Some(Ok(message))) => message,
            };
            if let Message::Text(text) = message {
                let parsed = parse(&text)?;
                match parsed.kind.as_str() {
                    "started" => return Ok(()),
                    "error" => {
                        let code = parsed.code.unwrap_or_default();
                        return Err(failed(format!("refused:{code}")));
                    }
                    _ => {}
                }
            }
        }
    }

    async fn stream_audio(&mut self, ws: &mut Ws) -> Result<(), Failed> {
        let plan = self.plan;
        let t0 = Instant::now();
        let period_ns = plan.message_period.as_nanos() as u64;
        for k in 0..plan.messages_per_stream {
            let due = t0 + Duration::from_nanos(period_ns * k);
            // Read what the server says until the message is due.
            loop {
                tokio::select! {
                    biased;
                    message = ws.next() => self.on_message(message)?,
                    () = sleep_until(due) => break,
                }
            }
            ws.send(plan.message(self.index, k))
                .await
                .map_err(|e| failed(format!("send:{}", short_error(&e))))?;
            let late = Instant::now().saturating_duration_since(due);
            self.counters.lateness.record_us(late.as_micros() as u64);
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            self.outcome.sent += 1;
        }
        Ok(())
    }

    /// An idle session: connected and started, silent but for a keepalive
    /// now and then so the server's idle timeout does not close it.
    async fn idle(&mut self, ws: &mut Ws) -> Result<(), Failed> {
        let end = Instant::now() + self.plan.duration;
        let mut next_keepalive = Instant::now() + self.plan.keepalive;
        loop {
            let wake = next_keepalive.min(end);
            tokio::select! {
                biased;
                message = ws.next() => self.on_message(message)?,
                () = sleep_until(wake) => {
                    if wake >= end {
                        return Ok(());
                    }
                    ws.send(Message::text(r#"{"type":"keepalive"}"#))
                        .await
                        .map_err(|e| failed(format!("send:{}", short_error(&e))))?;
                    next_keepalive += self.plan.keepalive;
                }
            }
        }
    }

    async fn wait_closed(&mut self, ws: &mut Ws) -> Result<(), Failed> {
        let deadline = Instant::now() + self.plan.close_timeout;
        let mut close_frame = None;
        loop {
            match timeout_at(deadline, ws.next()).await {
                Err(_) => return Err(failed("close_timeout")),
                Ok(None) => break,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    close_frame = Some(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Ok(Some(Ok(Message::Text(text)))) => {
                    self.on_text(&text)?;
                }
                Ok(Some(Ok(_))) => {}
                // The server closes TCP right after its close frame.
                Ok(Some(Err(_))) if close_frame.is_some() => break,
                Ok(Some(Err(e))) => return Err(failed(format!("ws:{}", short_error(&e)))),
            }
        }
        if !self.closed_seen {
            return Err(failed("no_closed_message"));
        }
        match (self.close_code, close_frame) {
            (Some(1000), Some(1000) | None) => Ok(()),
            (code, frame) => Err(failed(format!(
                "close_code:{}",
                code.or(frame).unwrap_or(u16::from(CloseCode::Status))
            ))),
        }
    }

    /// A message that arrived while streaming.
    fn on_message(
        &mut self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), Failed> {
        match message {
            None => Err(failed("connection_lost")),
            Some(Err(e)) => Err(failed(format!("ws:{}", short_error(&e)))),
            Some(Ok(Message::Text(text))) => {
                self.on_text(&text)?;
                if self.closed_seen {
                    return Err(failed(format!(
                        "closed_early:{}",
                        self.close_code.unwrap_or(0)
                    )));
                }
                Ok(())
            }
            Some(Ok(Message::Close(frame))) => Err(failed(format!(
                "closed_early:{}",
                frame.map_or(1005, |f| u16::from(f.code))
            ))),
            Some(Ok(_)) => Ok(()),
        }
    }

    fn on_text(&mut self, text: &str) -> Result<(), Failed> {
        let message = parse(text)?;
        match message.kind.as_str() {
            "ack" => {
                if let Some(seq) = message.seq {
                    // Streams number from 0: ack N covers N + 1 messages.
                    let acked = u64::from(seq) + 1;
                    if acked > self.outcome.acked {
                        self.counters
                            .acked
                            .fetch_add(acked - self.outcome.acked, Ordering::Relaxed);
                        self.outcome.acked = acked;
                    }
                }
            }
            "error" => {
                let code = message.code.unwrap_or_default();
                if message.fatal == Some(false) {
                    self.outcome.warnings.push(code);
                } else {
                    return Err(failed(format!("server_error:{code}")));
                }
            }
            "closed" => {
                self.closed_seen = true;
                self.close_code = message.close_code;
                self.outcome.server_audio_messages = message.audio_messages;
            }
            _ => {}
        }
        Ok(())
    }
}

fn parse(text: &str) -> Result<ServerMessage, Failed> {
    serde_json::from_str(text).map_err(|_| failed("unparsable_server_message"))
}

/// An error's kind without the variable parts, to group failures by.
fn short_error(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::ConnectionClosed => "connection_closed".into(),
        Error::AlreadyClosed => "already_closed".into(),
        Error::Io(io) => format!("io_{:?}", io.kind()),
        Error::Http(response) => format!("http_{}", response.status().as_u16()),
        Error::Protocol(_) => "protocol".into(),
        Error::Capacity(_) => "capacity".into(),
        other => other
            .to_string()
            .split(':')
            .next()
            .unwrap_or("other")
            .to_owned(),
    }
}
