//! The physical-limit baseline for `cochlea loadgen`: a minimal WebSocket
//! server (tokio-tungstenite) that speaks just enough of cochlea's protocol
//! for the generator and throws the audio away. It accepts the same URL
//! (`/v1/stream?encoding=...`), answers `started` (at once when the query
//! names an encoding, else after a `start` message), acknowledges `seq`
//! messages at most every 250 ms with `{"type":"ack","seq":N}` (checked on the
//! message path, as cochlea does), and answers `stop` with a last ack, a
//! `closed` carrying `audio_messages`, and close code 1000.
//!
//! What it costs the machine to carry a load is the floor for that load:
//! scripts/loadbench.py runs the same load against cochlea and against this,
//! and reports the ratio of their CPU per stream-second.
//!
//! Run: `cargo run --release --example baseline_sink -- [--listen 127.0.0.1:0] [--threads N]`.
//! Prints `baseline_sink listening on http://ADDR` once bound; SIGINT or
//! SIGTERM ends it. Loopback addresses only, like the generator.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

const ACK_INTERVAL: Duration = Duration::from_millis(250);
const CLOSE_WAIT: Duration = Duration::from_secs(5);

struct Args {
    listen: SocketAddr,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => {
                args.listen = value
                    .parse()
                    .map_err(|e| format!("--listen {value}: {e}"))?
            }
            "--threads" => {
                args.threads = value
                    .parse()
                    .map_err(|e| format!("--threads {value}: {e}"))?
            }
            other => return Err(format!("unknown flag {other} (use --listen, --threads)")),
        }
    }
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {}: the baseline sink is for loopback benchmarks only",
            args.listen
        ));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("baseline_sink: {e}");
            return ExitCode::from(2);
        }
    };
    match cochlea::rlimit::raise_nofile_limit() {
        Ok(limit) => eprintln!("baseline_sink: open files limit {}", limit.soft),
        Err(e) => eprintln!("baseline_sink: warning: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baseline_sink: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline_sink: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!(
        "baseline_sink listening on http://{}",
        listener.local_addr()?
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, _) = accepted?;
                let _ = tcp.set_nodelay(true);
                tokio::spawn(session(tcp));
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
    }
}

async fn session(tcp: TcpStream) {
    let mut starts_now = false;
    // The signature is tungstenite's handshake callback's.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != "/v1/stream" {
            let mut refusal = ErrorResponse::new(Some("only /v1/stream".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        starts_now = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("encoding=")));
        Ok(response)
    };
    // tungstenite zero-fills its whole read buffer (128 KiB by default)
    // before every read; a 20 ms audio message is under 1 KiB. A baseline
    // that wasted that would flatter whatever is compared with it.
    let config = WebSocketConfig::default().read_buffer_size(8192);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(config)).await
    else {
        return;
    };
    let started = r#"{"type":"started","protocol_version":1,"session_id":"baseline"}"#;
    if starts_now && ws.send(Message::text(started)).await.is_err() {
        return;
    }
    let mut last_seq: Option<u32> = None;
    let mut acked_seq: Option<u32> = None;
    let mut last_ack_at = Instant::now();
    let mut audio_messages: u64 = 0;
    let mut audio_bytes: u64 = 0;
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Binary(data) => {
                audio_messages += 1;
                audio_bytes += data.len() as u64;
                if let Some(seq) = data.get(..4) {
                    last_seq = Some(u32::from_le_bytes([seq[0], seq[1], seq[2], seq[3]]));
                }
                let now = Instant::now();
                if last_seq != acked_seq && now.duration_since(last_ack_at) >= ACK_INTERVAL {
                    acked_seq = last_seq;
                    last_ack_at = now;
                    if let Some(seq) = last_seq {
                        let ack = format!(r#"{{"type":"ack","seq":{seq}}}"#);
                        if ws.send(Message::text(ack)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Message::Text(text) if text.contains(r#""stop""#) => {
                if let (Some(seq), true) = (last_seq, last_seq != acked_seq) {
                    let _ = ws
                        .send(Message::text(format!(r#"{{"type":"ack","seq":{seq}}}"#)))
                        .await;
                }
                let closed = format!(
                    r#"{{"type":"closed","reason":"stop","close_code":1000,"audio_messages":{audio_messages},"audio_bytes":{audio_bytes}}}"#
                );
                let _ = ws.send(Message::text(closed)).await;
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "stop".into(),
                    }))
                    .await;
                // Let the client's close frame arrive, then drop the socket.
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                return;
            }
            Message::Text(text) if !starts_now && text.contains(r#""start""#) => {
                starts_now = true;
                if ws.send(Message::text(started)).await.is_err() {
                    return;
                }
            }
            // Keepalives and pings: tungstenite answers pings itself.
            _ => {}
        }
    }
}
