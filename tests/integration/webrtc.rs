//! WebRTC ingest through real sockets: the str0m WHIP client of
//! `cochlea::client::whip` (a peer independent of the server's own code
//! path) pushes real Opus, directly and through a seeded UDP impairment
//! proxy; the WHIP routes' refusals and CORS; `transport: webrtc` on
//! `/v1/stream`. Chromium's WebRTC is tested in `browser`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cochlea::client::whip::{push, OpusSender, WhipOptions, WhipOutcome};
use serde_json::{json, Value};

use crate::harness::*;
use crate::signal::{best_alignment, to_f64};

const SPEECH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/audio/speaker-16k.wav");

/// The speech (16 kHz mono), as 20 ms Opus packets, `channels` wide: in
/// stereo the right channel is the speech at half level, inverted, so the
/// two can be told apart.
fn speech_packets(channels: u16) -> (Vec<i16>, Vec<Vec<u8>>) {
    let source = read_wav_i16(Path::new(SPEECH)).samples;
    let layout = if channels == 2 {
        opus::Channels::Stereo
    } else {
        opus::Channels::Mono
    };
    let mut encoder = opus::Encoder::new(16000, layout, opus::Application::Audio).unwrap();
    encoder.set_bitrate(opus::Bitrate::Bits(64_000)).unwrap();
    let mut packets = Vec::new();
    let whole = source.len() / 320 * 320;
    for frame in source[..whole].chunks(320) {
        let pcm: Vec<i16> = if channels == 2 {
            frame.iter().flat_map(|&s| [s, -(s / 2)]).collect()
        } else {
            frame.to_vec()
        };
        let mut out = vec![0u8; 1500];
        let len = encoder.encode(&pcm, &mut out).unwrap();
        out.truncate(len);
        packets.push(out);
    }
    (source[..whole].to_vec(), packets)
}

/// An HTTP client (reqwest's TLS needs a process-wide provider, even for
/// plain http).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn whip_url(server: &Server, query: &str) -> String {
    format!("http://{}/v1/whip?{query}", server.addr)
}

fn options(url: String, channels: u16) -> WhipOptions {
    WhipOptions {
        url,
        token: None,
        channels,
        via: None,
        close_wait: Duration::from_secs(15),
    }
}

fn of_type<'a>(outcome: &'a WhipOutcome, kind: &str) -> Vec<&'a Value> {
    outcome
        .events
        .iter()
        .filter(|e| e["type"] == kind)
        .collect()
}

fn recording_path(outcome: &WhipOutcome) -> PathBuf {
    let recording = of_type(outcome, "recording");
    let path = recording
        .first()
        .and_then(|r| r["path"].as_str())
        .unwrap_or_else(|| panic!("no recording event: {:#?}", outcome.events));
    PathBuf::from(path)
}

/// Correlation of a channel of the recording with the source, at the
/// best lag (Opus adds its look-ahead).
fn correlation(recorded: &[i16], source: &[i16]) -> f64 {
    best_alignment(&to_f64(recorded), &to_f64(source), 1600, 1600).0
}

fn assert_session_events(outcome: &WhipOutcome, channels: u16) {
    let started = of_type(outcome, "started");
    assert_eq!(started.len(), 1, "{:#?}", outcome.events);
    assert_eq!(started[0]["format"]["encoding"], "opus");
    assert_eq!(started[0]["format"]["sample_rate"], 48000);
    assert_eq!(started[0]["format"]["channels"], channels);
    assert!(started[0].get("resume_token").is_none_or(Value::is_null));
    assert!(of_type(outcome, "ack").is_empty(), "acks on WebRTC");
    assert!(
        of_type(outcome, "error").is_empty(),
        "{:#?}",
        outcome.events
    );
    let closed = of_type(outcome, "closed");
    assert_eq!(closed.len(), 1, "{:#?}", outcome.events);
    assert_eq!(closed[0]["reason"], "stop", "{}", closed[0]);
    let stats = of_type(outcome, "stats");
    assert!(
        stats
            .iter()
            .any(|s| s["webrtc"]["packets_received"].as_u64() > Some(0)),
        "no RTCP figures in stats: {stats:#?}"
    );
}

#[tokio::test]
async fn a_whip_stream_is_recorded_at_media_time_with_events_on_the_data_channel() {
    let server = Server::start_with(&["--recorder-sample-rate", "16000"], &[]);
    let (source, packets) = speech_packets(1);
    let outcome = push(&options(whip_url(&server, "sinks=record"), 1), &packets)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert!(
        outcome.location.starts_with("/v1/whip/"),
        "{}",
        outcome.location
    );
    assert_session_events(&outcome, 1);
    let recording = read_wav_i16(&recording_path(&outcome));
    assert_eq!(recording.spec.channels, 1);
    // Media time: exactly what was sent, 320 frames at 16 kHz per packet.
    assert_eq!(recording.samples.len(), packets.len() * 320);
    let c = correlation(&recording.samples, &source);
    assert!(c >= 0.95, "correlation {c:.4}");
}

#[tokio::test]
async fn stereo_opus_is_recorded_as_two_channels() {
    let server = Server::start_with(&["--recorder-sample-rate", "16000"], &[]);
    let (source, packets) = speech_packets(2);
    let outcome = push(&options(whip_url(&server, "sinks=record"), 2), &packets)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert_session_events(&outcome, 2);
    let recording = read_wav_i16(&recording_path(&outcome));
    assert_eq!(recording.spec.channels, 2);
    assert_eq!(recording.samples.len(), packets.len() * 320 * 2);
    let left: Vec<i16> = recording.samples.iter().step_by(2).copied().collect();
    let right: Vec<i16> = recording
        .samples
        .iter()
        .skip(1)
        .step_by(2)
        .copied()
        .collect();
    let c = correlation(&left, &source);
    assert!(c >= 0.9, "left correlation {c:.4}");
    let inverted: Vec<i16> = source.iter().map(|&s| -(s / 2)).collect();
    let c = correlation(&right, &inverted);
    assert!(c >= 0.9, "right correlation {c:.4}");
}

/// A UDP relay between the client and the server that, from a seeded
/// generator, drops SRTP packets in bursts (a two-state Gilbert model:
/// 5 % of packets on average) and swaps neighbours (2 %). STUN, DTLS and
/// the last `clean_tail` packets pass untouched, so the handshake and the
/// stream's end are not what the test measures.
struct Impairment {
    addr: SocketAddr,
    dropped: Arc<AtomicU64>,
    swapped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Impairment {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Impairment {
    async fn start(server: SocketAddr, seed: u64, impaired_packets: u64) -> Impairment {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let swapped = Arc::new(AtomicU64::new(0));
        let (d, s) = (dropped.clone(), swapped.clone());
        let task = tokio::spawn(async move {
            let mut rng = seed;
            let mut random = move || {
                // xorshift64*: reproducible, no crate needed.
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
            };
            let mut client: Option<SocketAddr> = None;
            let mut bad = false;
            let mut held: Option<Vec<u8>> = None;
            let mut media_seen = 0u64;
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let data = buf[..len].to_vec();
                if from == server {
                    if let Some(client) = client {
                        let _ = socket.send_to(&data, client).await;
                    }
                    continue;
                }
                client = Some(from);
                // RFC 7983: 128–191 is RTP or RTCP; only RTP media (not
                // RTCP, payload types 200–207 after the marker bit) counts.
                let is_rtp = matches!(data.first(), Some(128..=191))
                    && !matches!(data.get(1), Some(200..=207));
                if !is_rtp || media_seen >= impaired_packets {
                    if let Some(late) = held.take() {
                        let _ = socket.send_to(&late, server).await;
                    }
                    let _ = socket.send_to(&data, server).await;
                    media_seen += u64::from(is_rtp);
                    continue;
                }
                media_seen += 1;
                // Gilbert model: 1.75 % into a burst, 33 % out of it.
                bad = if bad {
                    random() >= 0.33
                } else {
                    random() < 0.0175
                };
                if bad {
                    d.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if held.is_none() && random() < 0.02 {
                    held = Some(data);
                    s.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let _ = socket.send_to(&data, server).await;
                if let Some(late) = held.take() {
                    let _ = socket.send_to(&late, server).await;
                }
            }
        });
        Impairment {
            addr,
            dropped,
            swapped,
            task,
        }
    }
}

#[tokio::test]
async fn through_a_lossy_reordering_network_the_recording_keeps_media_time_and_stats_count_the_losses(
) {
    let server = Server::start_with(&["--recorder-sample-rate", "16000"], &[]);
    let (source, packets) = speech_packets(1);
    let impaired = packets.len() as u64 - 25;
    let proxy = Impairment::start(server.addr, 0x00C0_C41E_A5EE_D001, impaired).await;
    let mut options = options(whip_url(&server, "sinks=record"), 1);
    options.via = Some(proxy.addr);
    let outcome = push(&options, &packets)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    let dropped = proxy.dropped.load(Ordering::Relaxed);
    let swapped = proxy.swapped.load(Ordering::Relaxed);
    eprintln!(
        "{} packets, {dropped} dropped, {swapped} swapped",
        packets.len()
    );
    assert!(
        dropped as f64 >= 0.02 * impaired as f64,
        "the proxy dropped only {dropped}"
    );
    assert!(swapped >= 1, "nothing reordered");
    assert_session_events(&outcome, 1);
    let recording = read_wav_i16(&recording_path(&outcome));
    // Every lost packet's time is concealed: the length is still exact.
    assert_eq!(recording.samples.len(), packets.len() * 320);
    let stats = of_type(&outcome, "stats");
    let last = stats.last().expect("stats");
    let lost = last["packets_lost"].as_u64().unwrap();
    let late = last["packets_late"].as_u64().unwrap();
    assert!(
        lost >= dropped && lost <= dropped + swapped,
        "packets_lost {lost}, dropped {dropped}, swapped {swapped}: {last}"
    );
    assert!(late <= swapped, "{last}");
    assert_eq!(
        last["packets_received"].as_u64().unwrap() + dropped,
        packets.len() as u64,
        "{last}"
    );
    assert!(
        stats
            .iter()
            .any(|s| s["webrtc"]["loss_fraction"].as_f64() > Some(0.0)),
        "RTCP never reported a loss: {stats:#?}"
    );
    // Concealed, not garbled: the speech is still there.
    let c = correlation(&recording.samples, &source);
    eprintln!("packets_lost {lost}, packets_late {late}, correlation {c:.4}: {last}");
    assert!(c >= 0.8, "correlation {c:.4}");
}

async fn post_offer(
    server: &Server,
    query: &str,
    content_type: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = http()
        .post(whip_url(server, query))
        .header("content-type", content_type)
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

const NO_OPUS: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n";

#[tokio::test]
async fn whip_refuses_bad_offers_and_credentials_with_clear_answers() {
    let server = Server::start_with(&["--api-key", "test-key-0123456789abcdef"], &[]);
    let bearer = [("authorization", "Bearer test-key-0123456789abcdef")];
    let (status, _, body) = post_offer(&server, "", "application/sdp", NO_OPUS, &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = post_offer(&server, "", "text/plain", NO_OPUS, &bearer).await;
    assert_eq!(status, 415, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "bad_sdp"
    );
    let (status, _, body) = post_offer(&server, "", "application/sdp", NO_OPUS, &bearer).await;
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "bad_sdp");
    assert!(
        body["message"].as_str().unwrap().contains("no Opus"),
        "{body}"
    );
    let (status, _, body) = post_offer(
        &server,
        "encoding=pcm_s16le",
        "application/sdp",
        NO_OPUS,
        &bearer,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = post_offer(
        &server,
        "resume=x&resume_token=y",
        "application/sdp",
        NO_OPUS,
        &bearer,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // A refused sink is refused before any media.
    let (_, packets) = speech_packets(1);
    let mut refused = options(format!("http://{}/v1/whip?sinks=tape", server.addr), 1);
    refused.token = Some("test-key-0123456789abcdef".into());
    let error = push(&refused, &packets[..5]).await.unwrap_err().to_string();
    assert!(
        error.contains("400") && error.contains("unknown_sink"),
        "{error}"
    );
    // DELETE of a session that does not exist.
    let response = http()
        .delete(format!("http://{}/v1/whip/no-such-session", server.addr))
        .bearer_auth("test-key-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    // Nothing crashed: the server still answers.
    assert_eq!(server.get("/healthz").0, 200);
}

#[tokio::test]
async fn whip_answers_cors_preflights_and_exposes_location() {
    let server = Server::start_with(&["--allowed-origins", "https://app.example"], &[]);
    let preflight = http()
        .request(reqwest::Method::OPTIONS, whip_url(&server, ""))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 204);
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("DELETE"));
    assert!(headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("Location"));
    let refused = http()
        .request(reqwest::Method::OPTIONS, whip_url(&server, ""))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let (status, headers, _) = post_offer(
        &server,
        "",
        "application/sdp",
        NO_OPUS,
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
}

#[tokio::test]
async fn transport_webrtc_on_the_socket_needs_an_offer_and_no_format() {
    let server = Server::start();
    let cases = [
        (
            json!({"type": "start", "transport": "webrtc"}),
            "invalid_message",
            1002,
        ),
        (
            json!({"type": "start", "transport": "webrtc", "sdp": NO_OPUS, "encoding": "opus"}),
            "invalid_message",
            1002,
        ),
        (
            json!({"type": "start", "transport": "webrtc", "sdp": NO_OPUS}),
            "bad_sdp",
            1003,
        ),
        (
            json!({"type": "start", "transport": "carrier-pigeon"}),
            "invalid_message",
            1002,
        ),
        (
            json!({"type": "start", "encoding": "opus", "sample_rate": 48000, "sdp": NO_OPUS}),
            "invalid_message",
            1002,
        ),
    ];
    for (start, code, close) in cases {
        let mut client = Client::connect(&server, "").await;
        client.send_json(start.clone()).await;
        let t = client.finish().await;
        let errors = t.of_type("error");
        assert_eq!(errors.len(), 1, "{start}: {:#?}", t.messages);
        assert_eq!(errors[0]["code"], code, "{start}");
        assert_eq!(t.close_code(), close, "{start}");
    }
    // An ICE restart offer on a session that is not WebRTC.
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    client.expect("started").await;
    client
        .send_json(json!({"type": "webrtc_offer", "sdp": NO_OPUS}))
        .await;
    let t = client.finish().await;
    assert_eq!(t.of_type("error")[0]["code"], "invalid_message");
}

/// `transport: webrtc` on the socket, and the socket dropping mid-stream:
/// the session parks while the media flows on over WebRTC, the client
/// resumes with its token, and the recording is one file of the whole
/// media time.
#[tokio::test]
async fn a_dropped_signalling_socket_resumes_while_the_media_flows_on() {
    let server = Server::start_with(
        &[
            "--recorder-sample-rate",
            "16000",
            "--stats-interval-ms",
            "500",
        ],
        &[],
    );
    let (source, packets) = speech_packets(1);
    let (mut sender, offer) = OpusSender::offer(1, false).await.unwrap();
    let mut client = Client::connect(&server, "sinks=record").await;
    client
        .send_json(json!({"type": "start", "transport": "webrtc", "sdp": offer}))
        .await;
    let started = client.expect("started").await;
    assert_eq!(started["format"]["encoding"], "opus");
    let id = started["session_id"].as_str().unwrap().to_owned();
    let token = started["resume_token"]
        .as_str()
        .expect("a resume token")
        .to_owned();
    let answer = client.expect("webrtc_answer").await;
    sender
        .accept(answer["sdp"].as_str().unwrap(), None)
        .unwrap();
    sender.connect(Duration::from_secs(10)).await.unwrap();
    let mut at = std::time::Instant::now();
    let dropped_at = packets.len() / 3;
    let resumed_at = dropped_at + 75;
    let mut client = Some(client);
    for (k, packet) in packets.iter().enumerate() {
        if k == dropped_at {
            // Gone without a Close frame, as on a network change.
            drop(client.take());
        }
        if k == resumed_at {
            let mut again =
                Client::connect(&server, &format!("resume={id}&resume_token={token}")).await;
            let restarted = again.expect("started").await;
            assert_eq!(restarted["session_id"], id.as_str());
            client = Some(again);
        }
        sender.pump(at).await.unwrap();
        sender.send(packet, k as u64 * 960, at).unwrap();
        at += Duration::from_millis(20);
    }
    sender.pump(at + Duration::from_millis(300)).await.unwrap();
    let mut client = client.expect("resumed");
    client.send_json(json!({"type": "stop"})).await;
    let t = client.finish().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    assert!(t.of_type("ack").is_empty());
    let closed = t.of_type("closed");
    assert_eq!(closed[0]["reason"], "stop");
    let stats = t.of_type("stats");
    assert_eq!(
        stats.last().expect("stats after the resume")["resumes"],
        1,
        "{stats:#?}"
    );
    let recording = t.of_type("recording");
    let path = PathBuf::from(recording[0]["path"].as_str().unwrap());
    let recorded = read_wav_i16(&path).samples;
    // Nothing lost while the socket was away: every packet's media time.
    assert_eq!(recorded.len(), packets.len() * 320);
    let c = correlation(&recorded, &source);
    assert!(c >= 0.95, "correlation {c:.4}");
}
