//! Scale-out on loopback: three cochlea nodes on a real nats-server
//! (JetStream) and moto's S3, behind haproxy.
//!
//! The kill test: 24 real-time streams through haproxy with `cochlea
//! stream`, then kill -9 the node holding the most sessions. Every stream
//! must resume on another node (the session taken over from its journal),
//! `cochlea stream` must exit 0, every recording in the bucket must be
//! sample-exact, and every session's events, `closed` included, must be on
//! NATS (read back through `GET /v1/sessions/<id>/events` on a live node).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::cluster_support::*;
use crate::harness::*;

const BUCKET: &str = "calls";

/// A nats-server, and an S3 server with the bucket.
fn services() -> (NatsServer, S3Server) {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    (nats, s3)
}

/// A cluster node `id` on those services (a 1.5 s lease), with `extra`
/// arguments.
fn node_with(id: &str, nats: &NatsServer, s3: &S3Server, extra: &[&str]) -> Server {
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (url, recordings) = (nats.url(), format!("s3://{BUCKET}/rec"));
    let mut args = vec![
        "--nats-url",
        &url,
        "--node-id",
        id,
        "--cluster-lease-ms",
        "1500",
        "--recordings-url",
        &recordings,
    ];
    args.extend_from_slice(extra);
    Server::start_with(&args, &env)
}

fn node(index: usize, nats: &NatsServer, s3: &S3Server) -> Server {
    node_with(&format!("n{index}"), nats, s3, &[])
}

/// 12 s of 16 kHz mono whose every sample is known: a sweep of tones with a
/// counter in the low bits, so any sample lost, doubled or moved shows.
fn source_samples() -> Vec<i16> {
    (0..16_000 * 12)
        .map(|i: i32| {
            let t = f64::from(i) / 16_000.0;
            let tone = (t * (300.0 + 40.0 * t) * std::f64::consts::TAU).sin() * 8_000.0;
            (tone as i32 & !0xff | (i & 0xff)) as i16
        })
        .collect()
}

fn write_wav(path: &std::path::Path, samples: &[i16]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).unwrap();
    for s in samples {
        writer.write_sample(*s).unwrap();
    }
    writer.finalize().unwrap();
}

fn sessions_active(addr: SocketAddr) -> u64 {
    http_get(addr, "/healthz")
        .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .and_then(|v| v["sessions_active"].as_u64())
        .unwrap_or(0)
}

/// The recording of `id` as the cluster serves it (from the bucket), once
/// uploaded; `None` if it is not there within the wait.
fn recording(addr: SocketAddr, id: &str) -> Option<Vec<i16>> {
    let path = format!("/v1/recordings/{id}/files/{id}.wav");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(response) = http_get(addr, &path).filter(|r| r.status == 200) {
            let reader = hound::WavReader::new(std::io::Cursor::new(response.body)).ok()?;
            return Some(reader.into_samples::<i16>().map_while(Result::ok).collect());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// The session's events from NATS, through a node's SSE route, up to
/// `closed` (bounded).
fn events(addr: SocketAddr, id: &str) -> Vec<String> {
    let path = format!("/v1/sessions/{id}/events");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = Vec::new();
    let mut buffer = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match std::io::Read::read(&mut stream, &mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buffer[..n]),
        }
        if String::from_utf8_lossy(&body).contains("event: closed") {
            break;
        }
    }
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.strip_prefix("event: ").map(str::to_owned))
        .collect()
}

#[test]
fn killing_a_node_loses_no_stream_and_no_acknowledged_audio() {
    let (nats, s3) = services();
    let mut nodes: Vec<Option<Server>> = (0..3).map(|i| Some(node(i, &nats, &s3))).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().flatten().map(|n| n.addr).collect();
    let haproxy = Haproxy::start(&addrs);
    haproxy.wait_all_up(Duration::from_secs(10));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("call.wav");
    let samples = source_samples();
    write_wav(&file, &samples);
    let mut stream = Command::new(env!("CARGO_BIN_EXE_cochlea"));
    stream
        .arg("stream")
        .arg("--url")
        .arg(haproxy.ws_url("/v1/stream"))
        .arg("--json")
        .arg("--jobs")
        .arg("24")
        .arg("--resume-timeout-ms")
        .arg("40000");
    for _ in 0..24 {
        stream.arg(&file);
    }
    let mut client = stream
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Mid-stream: kill -9 the node holding the most sessions.
    std::thread::sleep(Duration::from_secs(4));
    let loads: Vec<u64> = addrs.iter().map(|a| sessions_active(*a)).collect();
    assert_eq!(
        loads.iter().sum::<u64>(),
        24,
        "sessions per node: {loads:?}"
    );
    let victim = (0..3).max_by_key(|i| loads[*i]).unwrap();
    let killed_at = Instant::now();
    nodes[victim].as_ref().unwrap().signal("KILL");
    let mut dead = nodes[victim].take().unwrap();
    dead.wait_exit(Duration::from_secs(5));
    let survivor = addrs[(victim + 1) % 3];

    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            panic!("cochlea stream did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let survivors_logs: String = nodes.iter().flatten().map(|n| n.log()).collect();
    assert!(
        status.success(),
        "cochlea stream failed ({status}):\n{stderr}\n{stdout}\nnodes:\n{survivors_logs}"
    );
    let results: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(results.len(), 24, "{stdout}");
    let resumed = results
        .iter()
        .filter(|r| r["resumes"].as_u64().unwrap_or(0) > 0)
        .count();
    assert_eq!(
        resumed as u64, loads[victim],
        "every session of the killed node resumed elsewhere"
    );
    let mut waits: Vec<u64> = results
        .iter()
        .flat_map(|r| r["resume_waits_ms"].as_array().cloned().unwrap_or_default())
        .filter_map(|w| w.as_u64())
        .collect();
    waits.sort_unstable();
    assert_eq!(waits.len(), resumed, "one wait per resume");
    // Nearest rank.
    let rank = |p: f64| waits[((p * waits.len() as f64).ceil() as usize).clamp(1, waits.len()) - 1];
    eprintln!(
        "kill test: {resumed} sessions resumed after the kill of n{victim}; resume wait p50 {} ms, p99 {} ms, max {} ms (lease 1500 ms); all done {:.1} s after the kill",
        rank(0.5),
        rank(0.99),
        waits[waits.len() - 1],
        killed_at.elapsed().as_secs_f64()
    );
    for result in &results {
        assert_eq!(result["ok"], true, "{result}");
        let id = result["session_id"].as_str().unwrap();
        let recorded =
            recording(survivor, id).unwrap_or_else(|| panic!("no recording of {id} in the bucket"));
        assert!(
            recorded == samples,
            "recording of {id}: {} samples, not the {} sent, or not the same",
            recorded.len(),
            samples.len()
        );
        let kinds = events(survivor, id);
        assert!(
            kinds.first().is_some_and(|k| k == "started"),
            "{id}: {kinds:?}"
        );
        assert!(kinds.iter().any(|k| k == "recording"), "{id}: {kinds:?}");
        assert_eq!(
            kinds.last().map(String::as_str),
            Some("closed"),
            "{id}: {kinds:?}"
        );
    }
}

/// Sends `frames` (20 ms each) from `first` as seq messages.
async fn send_frames(client: &mut Client, frames: &[&[i16]], first: usize) {
    for (i, frame) in frames.iter().enumerate() {
        let seq = first + i;
        client
            .send_binary(seq_message(seq as u32, seq as u64 * 320, &s16_bytes(frame)))
            .await;
    }
}

/// Sends `frames` at real-time pace (20 ms apart); returns how many acks
/// arrived meanwhile.
async fn send_frames_realtime(client: &mut Client, frames: &[&[i16]], first: usize) -> usize {
    let mut acks = 0;
    let start = tokio::time::Instant::now();
    for (i, frame) in frames.iter().enumerate() {
        let seq = first + i;
        client
            .send_binary(seq_message(seq as u32, seq as u64 * 320, &s16_bytes(frame)))
            .await;
        let due = start + Duration::from_millis(20 * (i as u64 + 1));
        while let Ok(Some(Ok(message))) = tokio::time::timeout_at(due, client.ws.next()).await {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                let value: Value = serde_json::from_str(&text).unwrap();
                assert_ne!(value["type"], "error", "{value}");
                if value["type"] == "ack" {
                    acks += 1;
                }
            }
        }
    }
    acks
}

/// Reads until the ack of `seq` (everything up to it is journalled).
async fn await_ack(client: &mut Client, seq: u64) {
    loop {
        let message = client.next_message().await;
        if message["type"] == "ack" && message["seq"].as_u64() >= Some(seq) {
            return;
        }
        assert_ne!(message["type"], "error", "{message}");
    }
}

#[tokio::test]
async fn a_paused_node_that_lost_its_lease_writes_nothing_more() {
    let (nats, s3) = services();
    let start = |id: &str| node_with(id, &nats, &s3, &["--resume-window-ms", "3000"]);
    let a = start("a");
    let b = start("b");
    let samples = source_samples();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();

    let mut first = Client::connect(&a, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let started = first.expect("started").await;
    let id = started["session_id"].as_str().unwrap().to_owned();
    let token = started["resume_token"].as_str().unwrap().to_owned();
    send_frames(&mut first, &frames[..150], 0).await;
    await_ack(&mut first, 149).await;

    // Node a stops dead; its client gives up on it and, once a's lease has
    // run out, resumes on b.
    a.signal("STOP");
    drop(first);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut second = Client::connect(&b, &format!("resume={id}&resume_token={token}")).await;
    let resumed = second.expect("started").await;
    assert_eq!(resumed["resume_from_seq"], 150, "{resumed}");
    send_frames(&mut second, &frames[150..], 150).await;
    let t = second.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    assert_eq!(
        t.one("closed")["sample_frames"],
        samples.len(),
        "{:#?}",
        t.messages
    );
    let recorded = recording(b.addr, &id).expect("b's recording in the bucket");
    assert!(recorded == samples, "b's recording is not the stream");

    // a wakes up: it must see it lost its lease, and its parked copy of
    // the session must end (after its 3 s resume window) without a write;
    // then it serves again, under a new lease.
    a.signal("CONT");
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let ready = http_get(a.addr, "/readyz").expect("a answers");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let health: Value =
        serde_json::from_slice(&http_get(a.addr, "/healthz").unwrap().body).unwrap();
    assert_eq!(health["cluster"]["fenced"], false, "{health}");
    let recorded = recording(b.addr, &id).expect("the recording is still there");
    assert!(recorded == samples, "a overwrote b's recording");
    let left: Vec<String> = std::fs::read_dir(a.recordings_dir())
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&id))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "a kept {left:?} in its spool");
    let log = a.log();
    assert!(log.contains("lost the node lease"), "{log}");
    assert!(log.contains("took a new node lease"), "{log}");
    assert!(
        log.contains("the session belongs to another node now")
            || log.contains("session lost to another node"),
        "a's copy of the session did not end as lost: {log}"
    );
}

/// `cochlea stream` with `count` copies of `file` at once, through `url`.
fn stream_files(url: &str, file: &std::path::Path, count: usize) -> std::process::Child {
    let mut stream = Command::new(env!("CARGO_BIN_EXE_cochlea"));
    stream
        .arg("stream")
        .arg("--url")
        .arg(url)
        .arg("--json")
        .arg("--jobs")
        .arg(count.to_string())
        .arg("--resume-timeout-ms")
        .arg("40000");
    for _ in 0..count {
        stream.arg(file);
    }
    stream
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_rolling_restart_cuts_no_stream() {
    let (nats, s3) = services();
    let mut nodes: Vec<Option<Server>> = (0..4).map(|i| Some(node(i, &nats, &s3))).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().flatten().map(|n| n.addr).collect();
    let haproxy = Haproxy::start(&addrs);
    haproxy.wait_all_up(Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("call.wav");
    let samples = source_samples();
    write_wav(&file, &samples);
    let mut client = stream_files(&haproxy.ws_url("/v1/stream"), &file, 12);

    // SIGTERM three of the four nodes in turn while the streams run; each
    // hands its sessions off, and their clients resume on the others.
    for (victim, slot) in nodes.iter_mut().enumerate().take(3) {
        std::thread::sleep(Duration::from_millis(2_500));
        let mut node = slot.take().unwrap();
        node.signal("TERM");
        let status = node.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "n{victim} exited with {status}: {}",
            node.log()
        );
        assert!(
            node.log().contains("session handed off") || sessions_moved_none(&node),
            "n{victim} handed nothing off: {}",
            node.log()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            panic!("cochlea stream did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = nodes[3].as_ref().unwrap();
    assert!(
        status.success(),
        "cochlea stream failed ({status}):\n{stderr}\n{stdout}\nlast node:\n{}",
        last.log()
    );
    let results: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(results.len(), 12, "{stdout}");
    let resumes: u64 = results
        .iter()
        .map(|r| r["resumes"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        resumes >= 9,
        "three nodes went down under 12 streams: {resumes} resumes"
    );
    for result in &results {
        assert_eq!(result["ok"], true, "{result}");
        let id = result["session_id"].as_str().unwrap();
        let recorded = recording(last.addr, id)
            .unwrap_or_else(|| panic!("no recording of {id} in the bucket"));
        assert!(recorded == samples, "recording of {id} is not the stream");
    }
}

/// A node that held no session when it went down has nothing to hand off.
fn sessions_moved_none(node: &Server) -> bool {
    !node.log().contains("session opened") && !node.log().contains("taken over")
}

#[tokio::test]
async fn a_live_owner_hands_a_session_over_to_the_node_its_client_reached() {
    let (nats, s3) = services();
    let a = node(0, &nats, &s3);
    let b = node(1, &nats, &s3);
    let samples = source_samples();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let mut first = Client::connect(&a, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let started = first.expect("started").await;
    let id = started["session_id"].as_str().unwrap().to_owned();
    let token = started["resume_token"].as_str().unwrap().to_owned();
    send_frames(&mut first, &frames[..150], 0).await;
    await_ack(&mut first, 149).await;

    // The client comes back through another node while its first
    // connection still looks alive to a (a half-open connection): a lets
    // it go at b's request, well before any lease could run out.
    let asked = Instant::now();
    let mut second = Client::connect(&b, &format!("resume={id}&resume_token={token}")).await;
    let resumed = second.expect("started").await;
    let waited = asked.elapsed();
    assert_eq!(resumed["resume_from_seq"], 150, "{resumed}");
    assert!(
        waited < Duration::from_millis(1_500),
        "the hand-over took {waited:?}, as long as a lease"
    );
    let old = first.finish().await;
    assert!(
        [1001, 1012].contains(&old.close_code()),
        "the old connection ends: {:?}",
        old.close
    );
    send_frames(&mut second, &frames[150..], 150).await;
    let t = second.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    let recorded = recording(b.addr, &id).expect("the recording in the bucket");
    assert!(recorded == samples, "the recording is not the stream");
    assert!(a.log().contains("session handed off"), "{}", a.log());
}

#[tokio::test]
async fn max_sessions_per_key_holds_across_the_cluster() {
    const KEY: &str = "cluster-key-0123456789abcdef";
    let (nats, s3) = services();
    let start = |id: &str| {
        node_with(
            id,
            &nats,
            &s3,
            &["--api-key", KEY, "--max-sessions-per-key", "2"],
        )
    };
    let a = start("a");
    let b = start("b");
    let query = format!("encoding=pcm_s16le&sample_rate=16000&token={KEY}");
    let mut one = Client::connect(&a, &query).await;
    one.expect("started").await;
    let mut two = Client::connect(&a, &query).await;
    two.expect("started").await;
    // b learns a's count from a's lease (renewed every 500 ms).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let third = Client::connect(&b, &query).await;
    let t = third.finish().await;
    t.assert_refused("key_full", 1013);
    // One ends on a: b takes the key's next session.
    let _ = one.stop().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut fourth = Client::connect(&b, &query).await;
    fourth.expect("started").await;
    let _ = fourth.stop().await;
    let _ = two.stop().await;
}

#[tokio::test]
async fn a_session_whose_node_and_client_are_gone_is_finished_by_another_node() {
    let (nats, s3) = services();
    let start = |id: &str| node_with(id, &nats, &s3, &["--resume-window-ms", "2000"]);
    let a = start("a");
    let b = start("b");
    let samples = source_samples();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let mut client = Client::connect(&a, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let started = client.expect("started").await;
    let id = started["session_id"].as_str().unwrap().to_owned();
    // In real time: an ack every 250 ms, each after its own journal append
    // (only the first one went out when a lost journal stalled the rest).
    let acks = send_frames_realtime(&mut client, &frames[..150], 0).await;
    assert!(acks >= 8, "{acks} acks in 3 s of real-time audio");
    await_ack(&mut client, 149).await;
    // The node dies, and the client never comes back: what it was acked
    // must still become a recording.
    a.signal("KILL");
    drop(client);
    let recorded = recording(b.addr, &id).expect("b finished the orphan");
    assert!(
        recorded == samples[..150 * 320],
        "{} samples recorded, {} acked",
        recorded.len(),
        150 * 320
    );
    let kinds = events(b.addr, &id);
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("closed"),
        "{kinds:?}"
    );
    assert!(b
        .log()
        .contains("finishing a session whose node and client are gone"));
}

#[tokio::test]
async fn a_session_taken_over_does_not_repeat_the_transcripts_its_client_had() {
    use crate::dialect_client::padded;
    use crate::stt_stub::{Reply, Stub};
    let stub =
        Stub::start(|_, request| Reply::verbose("alpha beta gamma", request.audio_seconds())).await;
    let (nats, s3) = services();
    let start = |id: &str| {
        node_with(
            id,
            &nats,
            &s3,
            &[
                "--transcribe-url",
                stub.url.as_str(),
                "--max-realtime-factor",
                "0",
            ],
        )
    };
    let a = start("a");
    let b = start("b");
    // Two utterances; the node dies after the first one's final.
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let samples = padded(&speech, 16_000, 2, 1.2);
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let half = (0.5 + speech.len() as f64 / 16_000.0 + 1.2) as usize * 50;
    let mut first = Client::connect(&a, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let started = first.expect("started").await;
    let id = started["session_id"].as_str().unwrap().to_owned();
    let token = started["resume_token"].as_str().unwrap().to_owned();
    send_frames(&mut first, &frames[..half], 0).await;
    // The final and the ack of the last frame, in either order (the ack
    // can come first: reading only for the final, then for the ack, waited
    // for an ack already read, 3 runs in 8).
    let mut had = Vec::new();
    let mut acked = None;
    while had.is_empty() || acked < Some(half as u64 - 1) {
        let message = first.next_message().await;
        assert_ne!(message["type"], "error", "{message}");
        if message["type"] == "transcript" && message["is_final"] == true {
            had.push(message);
        } else if message["type"] == "ack" {
            acked = acked.max(message["seq"].as_u64());
        }
    }
    a.signal("KILL");
    drop(first);
    let mut second = Client::connect(&b, &format!("resume={id}&resume_token={token}")).await;
    let resumed = second.expect("started").await;
    let from = resumed["resume_from_seq"].as_u64().unwrap() as usize;
    send_frames(&mut second, &frames[from..], from).await;
    let t = second.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    let finals: Vec<u64> = had
        .iter()
        .chain(t.of_type("transcript"))
        .filter(|m| m["is_final"] == true)
        .map(|m| m["utterance_id"].as_u64().unwrap())
        .collect();
    assert_eq!(finals, [0, 1], "each utterance's final once, ids going on");
    // b's transcriber did hear utterance 0 again (its replay), and said nothing.
    assert!(
        stub.requests().len() >= 3,
        "{} requests",
        stub.requests().len()
    );
}
