//! Authentication, origins and limits, through real sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

const KEY: &str = "test-key-0123456789abcdef";
const OTHER_KEY: &str = "other-key-0123456789abcdef";

fn secured(extra: &[&str]) -> Server {
    let mut args = vec!["--api-key", KEY, "--api-key", OTHER_KEY];
    args.extend_from_slice(extra);
    Server::start_with(&args, &[])
}

/// Tries a WebSocket upgrade; returns the HTTP status of a refusal, or the
/// negotiated subprotocol on success.
async fn upgrade(
    server: &Server,
    query: &str,
    headers: &[(&'static str, &str)],
) -> Result<Option<String>, (u16, Value)> {
    let mut request = server.url(query).into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut ws, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            let _ = ws.close(None).await;
            Ok(protocol)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// A raw HTTP request; returns (status, body).
fn http(server: &Server, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn mint(server: &Server, key: &str, body: &str) -> (u16, Value) {
    mint_from(server, None, key, body)
}

/// `POST /v1/tokens`, from a browser page at `origin` when given.
fn mint_from(server: &Server, origin: Option<&str>, key: &str, body: &str) -> (u16, Value) {
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let request = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: x\r\n{origin}Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = http(server, &request);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_way_of_presenting_a_key_works_and_a_wrong_one_gets_401() {
    let server = secured(&[]);
    let q = "encoding=mulaw";
    let bearer = format!("Bearer {KEY}");
    assert!(upgrade(&server, q, &[("authorization", &bearer)])
        .await
        .is_ok());
    assert!(upgrade(&server, &format!("{q}&token={KEY}"), &[])
        .await
        .is_ok());
    // Browsers: the key rides in Sec-WebSocket-Protocol; the server selects
    // cochlea.v1, so the browser accepts the handshake.
    let protocols = format!("cochlea.v1, token.{KEY}");
    assert_eq!(
        upgrade(&server, q, &[("sec-websocket-protocol", &protocols)]).await,
        Ok(Some("cochlea.v1".to_owned()))
    );
    let (status, body) = upgrade(&server, q, &[]).await.unwrap_err();
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("auth_missing"))
    );
    let (status, body) = upgrade(&server, &format!("{q}&token=not-the-key-at-all"), &[])
        .await
        .unwrap_err();
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("auth_wrong_key"))
    );
    let (_, metrics) = server.get("/metrics");
    assert!(metrics.contains("cochlea_auth_failures_total{reason=\"auth_wrong_key\"} 1"));
}

#[tokio::test]
async fn minted_tokens_work_until_they_expire() {
    let server = secured(&[]);
    // 2 s: a loaded machine may take a while to the first upgrade.
    let (status, minted) = mint(&server, KEY, r#"{"ttl_seconds": 2}"#);
    assert_eq!(status, 200, "{minted}");
    let token = minted["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("ct1."));
    assert_ne!(token, KEY, "a page never sees the key");
    let query = format!("encoding=mulaw&token={token}");
    assert!(upgrade(&server, &query, &[]).await.is_ok());
    // A token lives its ttl, and less than a second more.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, body) = upgrade(&server, &query, &[]).await.unwrap_err();
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("auth_expired"))
    );
    // Minting needs a real key, and a token cannot mint tokens.
    assert_eq!(mint(&server, "wrong-key-0123456789abcdef", "").0, 401);
    assert_eq!(mint(&server, &token, "").0, 401);
}

#[tokio::test]
async fn a_token_can_cap_the_session_length() {
    let server = secured(&[]);
    let (_, minted) = mint(&server, KEY, r#"{"max_session_seconds": 1}"#);
    let token = minted["token"].as_str().unwrap();
    let mut client = Client::connect(&server, &format!("encoding=mulaw&token={token}")).await;
    client.expect("started").await;
    client.send_binary(vec![0xFF; 800]).await;
    let transcript = client.finish().await;
    transcript.assert_error("max_duration_reached", 1008);
    assert_eq!(
        transcript.one("recording")["sample_frames"],
        800,
        "audio kept"
    );
}

#[tokio::test]
async fn wrong_origin_gets_403_and_the_right_one_passes() {
    let server = secured(&["--allowed-origins", "https://app.example"]);
    let q = format!("encoding=mulaw&token={KEY}");
    assert!(upgrade(&server, &q, &[("origin", "https://app.example")])
        .await
        .is_ok());
    let (status, body) = upgrade(&server, &q, &[("origin", "https://evil.example")])
        .await
        .unwrap_err();
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );
}

/// SECURITY.md: a browser request from an unlisted origin gets 403. That
/// holds for minting tokens too, or a page on any site could turn a leaked
/// or embedded key into tokens.
#[tokio::test]
async fn minting_tokens_from_an_unlisted_origin_gets_403() {
    let server = secured(&["--allowed-origins", "https://app.example"]);
    let (status, body) = mint_from(&server, Some("https://evil.example"), KEY, "");
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed")),
        "{body}"
    );
    assert!(body.get("token").is_none(), "{body}");
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains("cochlea_auth_failures_total{reason=\"origin_not_allowed\"} 1"),
        "{metrics}"
    );
    // A listed origin (any case, trailing slash) and a request from no
    // browser at all still get their token.
    let (status, body) = mint_from(&server, Some("https://APP.example/"), KEY, "");
    assert_eq!(status, 200, "{body}");
    assert!(body["token"]
        .as_str()
        .is_some_and(|t| t.starts_with("ct1.")));
    assert_eq!(mint(&server, KEY, "").0, 200);
    // The origin is judged before the key: a wrong key from an unlisted
    // origin learns nothing about the key.
    let (status, body) = mint_from(
        &server,
        Some("https://evil.example"),
        "wrong-key-0123456789",
        "",
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );
}

#[test]
fn no_keys_beyond_loopback_is_refused_at_startup() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args(["serve", "--print-config", "--listen", "0.0.0.0:0"])
        .env_remove("COCHLEA_API_KEYS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without API keys"));
}

#[tokio::test]
async fn sessions_per_key_are_limited_with_1013() {
    let server = secured(&["--max-sessions-per-key", "1"]);
    let mut first = Client::connect(&server, &format!("encoding=mulaw&token={KEY}")).await;
    first.expect("started").await;
    Client::connect(&server, &format!("encoding=mulaw&token={KEY}"))
        .await
        .finish()
        .await
        .assert_refused("key_full", 1013);
    // Another key is not affected, and the slot frees when the session ends.
    let mut other = Client::connect(&server, &format!("encoding=mulaw&token={OTHER_KEY}")).await;
    other.expect("started").await;
    other.stop().await;
    first.stop().await;
    let mut again = Client::connect(&server, &format!("encoding=mulaw&token={KEY}")).await;
    again.expect("started").await;
    again.stop().await;
}

#[tokio::test]
async fn a_client_far_faster_than_real_time_is_warned_then_closed_1008() {
    let server = Server::start_with(
        &["--max-realtime-factor", "2", "--realtime-burst-ms", "200"],
        &[],
    );
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    client.expect("started").await;
    // 100 ms of audio every 10 ms: ten times real time, for up to 3 s.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if client
            .ws
            .send(Message::binary(vec![0u8; 3200]))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let transcript = client.finish().await;
    let errors = transcript.of_type("error");
    assert_eq!(errors[0]["code"], "audio_too_fast");
    assert_eq!(errors[0]["fatal"], false, "told first");
    assert_eq!(errors.last().unwrap()["fatal"], true, "then closed");
    assert_eq!(transcript.close_code(), 1008);
}

/// Issue 15 item 5: `framing=seq` messages each opening a 10 s timestamp
/// gap (the largest `max_gap_ms` allows), sent as fast as the socket takes
/// them, then `stop`. Returns what the client saw and how long it took.
async fn ten_second_jumps(
    server: &Server,
    query: &str,
    payload: &[u8],
    payload_frames: u64,
    messages: u32,
) -> (Transcript, Duration) {
    let started_at = Instant::now();
    let mut client = Client::connect(server, query).await;
    client.expect("started").await;
    let step = payload_frames + 480_000; // 10 s at 48 kHz
    for seq in 0..messages {
        let message = seq_message(seq, u64::from(seq) * step, payload);
        if client.ws.send(Message::binary(message)).await.is_err() {
            break;
        }
    }
    let _ = client
        .ws
        .send(Message::text(r#"{"type":"stop"}"#.to_string()))
        .await;
    let transcript = client.finish().await;
    (transcript, started_at.elapsed())
}

/// SECURITY.md's bound on the media a session can claim within `elapsed` of
/// its first audio, with the defaults: the 10 s burst, 4x real time for
/// `elapsed` and for the one grace second, and the one message that crosses
/// the line (a 10 s gap and its own payload).
fn default_media_bound_seconds(elapsed: Duration, payload_seconds: f64) -> f64 {
    10.0 + 4.0 * (elapsed.as_secs_f64() + 1.0) + 10.0 + payload_seconds
}

/// Closed `audio_too_fast` (1008) well before the stream's end, with a
/// recording, and the disk it took within the bound at `bytes_per_second`.
fn assert_amplification_stopped(
    transcript: &Transcript,
    elapsed: Duration,
    sent_seconds: f64,
    payload_seconds: f64,
    bytes_per_second: f64,
) {
    let errors = transcript.of_type("error");
    let last = errors.last().expect("an error");
    assert_eq!(last["code"], "audio_too_fast", "{:#?}", transcript.messages);
    assert_eq!(last["fatal"], true);
    assert_eq!(transcript.close_code(), 1008);
    let recording = transcript.one("recording");
    let seconds = recording["duration_seconds"].as_f64().unwrap();
    let bound = default_media_bound_seconds(elapsed, payload_seconds);
    assert!(
        seconds <= bound && seconds < sent_seconds,
        "{seconds} s recorded of {sent_seconds} s sent; bound {bound:.1} s"
    );
    let path = recording["path"].as_str().unwrap();
    let on_disk = std::fs::metadata(path).unwrap().len();
    assert_eq!(on_disk, recording["bytes"].as_u64().unwrap());
    let max_bytes = bound * bytes_per_second + 4096.0;
    eprintln!("{seconds} s, {on_disk} bytes recorded in {elapsed:?}; bound {bound:.1} s, {max_bytes:.0} bytes");
    assert!(
        (on_disk as f64) <= max_bytes,
        "{on_disk} bytes on disk, bound {max_bytes:.0}"
    );
}

#[tokio::test]
async fn opus_messages_jumping_10_s_each_are_closed_audio_too_fast_by_default() {
    let server = Server::start();
    let packets = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    // 20 messages: 200 s of concealed audio, 19 MB on disk, for 2 KB sent.
    let (transcript, elapsed) = ten_second_jumps(
        &server,
        "encoding=opus&sample_rate=48000&framing=seq",
        &packets[10],
        960,
        20,
    )
    .await;
    // The recording is 16-bit mono at 48 kHz: 96000 bytes a second.
    assert_amplification_stopped(&transcript, elapsed, 200.4, 0.02, 96_000.0);
}

#[tokio::test]
async fn header_only_f32_stereo_messages_jumping_10_s_are_closed_audio_too_fast_by_default() {
    let server = Server::start();
    // 12 bytes each: a seq header and no audio. Each wrote 3.84 MB of
    // 32-bit float stereo silence.
    let (transcript, elapsed) = ten_second_jumps(
        &server,
        "encoding=pcm_f32le&sample_rate=48000&channels=2&framing=seq",
        &[],
        0,
        20,
    )
    .await;
    assert_amplification_stopped(&transcript, elapsed, 190.0, 0.0, 384_000.0);
}

#[tokio::test]
async fn a_slowloris_upgrade_is_cut_off() {
    let server = Server::start_with(&["--request-timeout-ms", "500"], &[]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    // Half a request, then nothing.
    stream
        .write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "held {waited:?}");
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_thousand_silent_connections_cost_little_and_are_closed_by_idle_timeout() {
    // Long enough that all 1000 are connected before the first times out,
    // even on a loaded machine.
    let server = Server::start_with(&["--idle-timeout-ms", "5000"], &[]);
    let before = rss_kib(server.pid());
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(Client::connect(&server, "").await);
    }
    let (_, health) = server.get("/healthz");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["sessions_active"], 1000);
    let held = rss_kib(server.pid()) - before;
    eprintln!(
        "1000 idle connections: {held} KiB of server RSS, {} KiB each",
        held / 1000
    );
    assert!(held < 64 * 1024, "1000 idle connections took {held} KiB");
    // Each is closed by the idle timeout, with its reason.
    let mut closed = 0;
    for client in clients {
        let transcript = client.finish().await;
        assert_eq!(transcript.one("error")["code"], "idle_timeout");
        closed += 1;
    }
    assert_eq!(closed, 1000);
    let (_, health) = server.get("/healthz");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["sessions_active"], 0);
}

#[tokio::test]
async fn wss_with_a_self_signed_certificate() {
    use std::sync::Arc;
    use tokio_tungstenite::Connector;

    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let server = Server::start_with(
        &[
            "--tls-cert-path",
            cert_path.to_str().unwrap(),
            "--tls-key-path",
            key_path.to_str().unwrap(),
        ],
        &[],
    );

    // A client that trusts exactly this certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let url = format!(
        "wss://localhost:{}/v1/stream?encoding=pcm_s16le&sample_rate=16000",
        server.addr.port()
    );
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        false,
        Some(Connector::Rustls(Arc::new(config))),
    )
    .await
    .expect("wss handshake");
    let mut client = Client {
        ws,
        received: Vec::new(),
    };
    client.expect("started").await;
    let samples: Vec<i16> = (0..3200).map(|i| (i % 500) as i16).collect();
    client.send_chunks(&s16_bytes(&samples), 640).await;
    let transcript = client.stop().await;
    let wav = read_wav_i16(std::path::Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples, "audio over TLS recorded exactly");
    // Plain WebSocket on a TLS port is not served.
    let plain = format!("ws://127.0.0.1:{}/v1/stream", server.addr.port());
    assert!(tokio_tungstenite::connect_async(plain).await.is_err());
}

/// Issue 15, item 4: the session's length limit is a deadline of its own.
/// It used to fire only when another timer did (the stats tick, or with
/// stats off, the 30 s idle timeout); with stats off and a long idle
/// timeout, a 1 s cap now ends the session long before either.
#[tokio::test]
async fn the_session_length_limit_fires_on_time_with_no_other_timer() {
    let server = Server::start_with(
        &[
            "--max-session-duration-ms",
            "1000",
            "--stats-interval-ms",
            "0",
            "--idle-timeout-ms",
            "60000",
        ],
        &[],
    );
    // No sinks: no recorder checkpoint timer to wake the session either.
    let mut client = Client::connect(&server, "encoding=mulaw&sinks=none").await;
    client.expect("started").await;
    client.send_binary(vec![0xFF; 800]).await;
    let started = std::time::Instant::now();
    let transcript = client.finish().await;
    transcript.assert_error("max_duration_reached", 1008);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the 1 s limit fired after {:?}",
        started.elapsed()
    );
}
