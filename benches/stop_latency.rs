//! Time from the client's last audio frame to the `recording` message.
//!
//! Starts the release server on 127.0.0.1 port 0, then for each of N sessions
//! streams the 4.8 s speech fixture as fast as possible in 20 ms frames,
//! sends `stop` right after the last frame, and measures until `recording`
//! arrives (the server finalizes the WAV, hashes it, rewrites the sidecar).
//!
//! Run: `cargo bench --bench stop_latency` (prints median, p90 and max).

use std::time::{Duration, Instant};

mod support;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const SESSIONS: usize = 50;

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: stay quick then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("stop_latency: run with `cargo bench --bench stop_latency`");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cochlea-stop-latency-{}", std::process::id()));
    let (mut server, addr) = support::start_server(&dir, &[]);

    let samples = support::speech_16k();
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut latencies: Vec<Duration> = runtime.block_on(async {
        let mut out = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            let url = format!("ws://{addr}/v1/stream?encoding=pcm_s16le&sample_rate=16000");
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("connect");
            let _started = ws.next().await;
            for chunk in bytes.chunks(640) {
                ws.send(Message::binary(chunk.to_vec()))
                    .await
                    .expect("send");
            }
            let last_frame_sent = Instant::now();
            ws.send(Message::text(r#"{"type":"stop"}"#))
                .await
                .expect("stop");
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""type":"recording""#) => {
                        out.push(last_frame_sent.elapsed());
                        break;
                    }
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("no recording message: {other:?}"),
                }
            }
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_secs(10), ws.next()).await
            {}
        }
        out
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);

    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "last audio frame -> recording message, {} sessions of {:.1} s 16 kHz mono: median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        latencies.len(),
        samples.len() as f64 / 16000.0,
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
    );
}
