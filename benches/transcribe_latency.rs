//! Time from the end of speech to its transcript on the socket, minus the
//! backend's own time.
//!
//! Starts the release server on 127.0.0.1 port 0 with an OpenAI-compatible
//! backend stand-in (in this process; it answers after `BACKEND_DELAY_MS`),
//! then runs `SESSIONS` concurrent sessions, each streaming 0.5 s of silence,
//! the 4.8 s speech fixture and 1.5 s of silence at real-time pace (each 20 ms
//! frame sent when its last sample would exist). For every transcript:
//!
//!   latency = arrival − wall time at which the `speech_ended` media time was
//!             sent − `backend_ms` (the request's own duration, from the
//!             server)
//!
//! It includes the hangover by design (the segmenter must wait that long to
//! know speech has ended); the bench prints it with and without.
//!
//! Run: `cargo bench --bench transcribe_latency`.

use std::time::Duration;

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const SESSIONS: usize = 24;
const ROUNDS: usize = 2;
const BACKEND_DELAY_MS: u64 = 150;
const HANGOVER_MS: u64 = 400;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("transcribe_latency: run with `cargo bench --bench transcribe_latency`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let backend_url = runtime.block_on(start_backend());

    let dir = std::env::temp_dir().join(format!("cochlea-stt-latency-{}", std::process::id()));
    let (mut server, addr) = support::start_server(
        &dir,
        &[
            "--transcribe-url",
            &backend_url,
            "--vad-hangover-ms",
            &HANGOVER_MS.to_string(),
        ],
    );

    let speech = support::speech_16k();
    let mut samples = vec![0i16; 8_000];
    samples.extend_from_slice(&speech);
    samples.extend(std::iter::repeat_n(0i16, 24_000));
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();

    let mut latencies_ms: Vec<f64> = Vec::new();
    let mut backend_ms: Vec<f64> = Vec::new();
    for _ in 0..ROUNDS {
        let results = runtime.block_on(async {
            let sessions = (0..SESSIONS).map(|i| {
                let url = format!("ws://{addr}/v1/stream?encoding=pcm_s16le&sample_rate=16000");
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    // Spread the starts over a frame so sends do not collide.
                    tokio::time::sleep(Duration::from_micros(800 * i as u64)).await;
                    session(url, bytes).await
                })
            });
            let mut all = Vec::new();
            for handle in sessions.collect::<Vec<_>>() {
                all.extend(handle.await.expect("session task"));
            }
            all
        });
        for (latency, backend) in results {
            latencies_ms.push(latency);
            backend_ms.push(backend);
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(!latencies_ms.is_empty(), "no transcripts arrived");
    latencies_ms.sort_by(f64::total_cmp);
    backend_ms.sort_by(f64::total_cmp);
    let at = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "end of speech -> transcript on the socket, minus backend time: {} utterances, {} concurrent real-time sessions x {} rounds",
        latencies_ms.len(),
        SESSIONS,
        ROUNDS
    );
    println!(
        "  p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (hangover {} ms included; beyond it: p50 {:.1} ms, p95 {:.1} ms)",
        at(&latencies_ms, 0.5),
        at(&latencies_ms, 0.95),
        at(&latencies_ms, 1.0),
        HANGOVER_MS,
        at(&latencies_ms, 0.5) - HANGOVER_MS as f64,
        at(&latencies_ms, 0.95) - HANGOVER_MS as f64,
    );
    println!(
        "  backend_ms reported: p50 {:.0} ms (stand-in answers after {} ms)",
        at(&backend_ms, 0.5),
        BACKEND_DELAY_MS
    );
}

/// Streams one session in real time; returns (latency ms, backend ms) per transcript.
async fn session(url: String, bytes: Vec<u8>) -> Vec<(f64, f64)> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let (mut write, mut read) = ws.split();
    let first = read.next().await;
    assert!(
        matches!(&first, Some(Ok(Message::Text(t))) if t.contains("started")),
        "{first:?}"
    );
    let start = tokio::time::Instant::now();
    let sender = tokio::spawn(async move {
        for (k, chunk) in bytes.chunks(640).enumerate() {
            // Frame k holds media [20k, 20k+20) ms: it exists at its end.
            tokio::time::sleep_until(start + Duration::from_millis(20 * (k as u64 + 1))).await;
            write
                .send(Message::binary(chunk.to_vec()))
                .await
                .expect("send");
        }
        write
            .send(Message::text(r#"{"type":"stop"}"#))
            .await
            .expect("stop");
        write
    });
    let mut ended_at: std::collections::HashMap<u64, f64> = Default::default();
    let mut out = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(30), read.next()).await
    {
        let Message::Text(text) = message else {
            continue;
        };
        let arrived = start.elapsed().as_secs_f64();
        let value: Value = serde_json::from_str(&text).expect("json");
        match value["type"].as_str() {
            Some("vad") if value["event"] == "speech_ended" => {
                let id = value["utterance_id"].as_u64().expect("id");
                ended_at.insert(id, value["time"].as_f64().expect("time"));
            }
            Some("transcript") => {
                let id = value["utterance_id"].as_u64().expect("id");
                let backend = value["backend_ms"].as_f64().expect("backend_ms");
                if let Some(end) = ended_at.get(&id) {
                    out.push(((arrived - end) * 1e3 - backend, backend));
                }
            }
            Some("closed") => break,
            _ => {}
        }
    }
    let _ = sender.await;
    out
}

/// A minimal OpenAI-compatible stand-in: reads each request and answers
/// `{"text": "..."}` after `BACKEND_DELAY_MS`.
async fn start_backend() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut reader = tokio::io::BufReader::new(read);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" && !first {
                            break;
                        }
                        first = false;
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(BACKEND_DELAY_MS)).await;
                    let reply = r#"{"text":"hello from the stand-in"}"#;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                    if write.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}
