//! The transcription sink against a scripted HTTP backend (`stt_stub`):
//! segmentation of real speech, the audio each request carries, ordering,
//! retries, timeouts, bad replies, shedding, the stop wait, and that a slow
//! backend never holds up the recorder. Accuracy with a real engine is the
//! end-to-end test in tests/e2e (run by scripts/test.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::harness::{fixture, read_wav_i16, s16_bytes, Client, Server, Transcript};
use crate::stt_stub::{Received, Reply, Stub};

const RATE: usize = 16_000;

/// Two copies of a spoken sentence with silence around them, and where the
/// speech is (seconds).
fn speech_stream(copies: usize, gap_seconds: f64) -> (Vec<i16>, Vec<(f64, f64)>) {
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let gap = vec![0i16; (gap_seconds * RATE as f64) as usize];
    let mut samples = vec![0i16; RATE / 2];
    let mut regions = Vec::new();
    for _ in 0..copies {
        let start = samples.len() as f64 / RATE as f64;
        samples.extend_from_slice(&speech);
        regions.push((start, samples.len() as f64 / RATE as f64));
        samples.extend_from_slice(&gap);
    }
    (samples, regions)
}

fn server(stub: &Stub, extra: &[&str]) -> Server {
    let mut args = vec![
        "--transcribe-url",
        stub.url.as_str(),
        "--transcribe-retry-backoff-ms",
        "50",
    ];
    args.extend_from_slice(extra);
    Server::start_with(&args, &[])
}

async fn stream(server: &Server, query: &str, samples: &[i16]) -> Client {
    let mut client = Client::connect(server, query).await;
    client.expect("started").await;
    client.send_chunks(&s16_bytes(samples), 640).await;
    client
}

/// The utterance id a request is for, from the uploaded file's name
/// (`<session>-<utterance>.wav`) or the webhook's header.
fn utterance_of(request: &Received) -> u64 {
    if let Some(id) = request.header("x-cochlea-utterance-id") {
        return id.parse().unwrap();
    }
    let body = String::from_utf8_lossy(&request.body);
    let name = body
        .split("filename=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a file name");
    name.trim_end_matches(".wav")
        .rsplit('-')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn transcripts(t: &Transcript) -> Vec<&Value> {
    t.of_type("transcript")
}

fn errors(t: &Transcript, code: &str) -> Vec<Value> {
    t.of_type("error")
        .into_iter()
        .filter(|e| e["code"] == code)
        .cloned()
        .collect()
}

/// Utterance ids announced by `vad` speech_started events.
fn utterance_ids(t: &Transcript) -> BTreeSet<u64> {
    t.of_type("vad")
        .iter()
        .filter(|v| v["event"] == "speech_started")
        .map(|v| v["utterance_id"].as_u64().unwrap())
        .collect()
}

fn assert_closed_last(t: &Transcript) {
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    assert_eq!(
        t.messages.last().map(|m| m["type"].clone()),
        Some(json!("closed")),
        "closed must come after every transcript: {:#?}",
        t.types()
    );
}

#[tokio::test]
async fn utterances_are_transcribed_in_order_with_exactly_their_audio() {
    // The first utterance's reply comes last: order must be restored.
    let stub = Stub::start(|_, request| {
        let id = utterance_of(request);
        let reply = Reply::text(&format!("words of utterance {id}"));
        if id == 0 {
            reply.after(Duration::from_millis(800))
        } else {
            reply
        }
    })
    .await;
    let server = server(&stub, &[]);
    let (samples, regions) = speech_stream(2, 1.2);
    let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
    let t = client.stop().await;
    assert_closed_last(&t);

    let started = t.one("started");
    assert_eq!(started["transcribe"], "default");
    assert!(started["sinks"]
        .as_array()
        .unwrap()
        .contains(&json!("transcribe")));

    // Voice activity: each utterance starts, then ends, inside the speech.
    let vad = t.of_type("vad");
    let ids = utterance_ids(&t);
    assert!(ids.len() >= 2, "one utterance per copy at least: {vad:#?}");
    for id in &ids {
        let events: Vec<&&Value> = vad.iter().filter(|v| v["utterance_id"] == *id).collect();
        assert_eq!(events.len(), 2, "{events:#?}");
        assert_eq!(events[0]["event"], "speech_started");
        assert_eq!(events[1]["event"], "speech_ended");
        let (on, off) = (
            events[0]["time"].as_f64().unwrap(),
            events[1]["time"].as_f64().unwrap(),
        );
        assert!(on < off);
        assert!(
            regions
                .iter()
                .any(|(s, e)| on >= s - 0.05 && off <= e + 0.05),
            "speech {on}-{off} is outside the spoken regions {regions:?}"
        );
    }
    // Every copy of the sentence was heard.
    for (s, e) in &regions {
        assert!(
            vad.iter().any(|v| {
                let time = v["time"].as_f64().unwrap();
                v["event"] == "speech_started" && time >= *s - 0.05 && time < *e
            }),
            "no speech detected in {s}-{e}"
        );
    }

    // One transcript per utterance, in order, each with its own text.
    let texts = transcripts(&t);
    let order: Vec<u64> = texts
        .iter()
        .map(|m| m["utterance_id"].as_u64().unwrap())
        .collect();
    assert_eq!(order, ids.iter().copied().collect::<Vec<_>>());
    for m in &texts {
        let id = m["utterance_id"].as_u64().unwrap();
        assert_eq!(m["text"], format!("words of utterance {id}"));
        assert_eq!(m["channel"], 0);
        assert_eq!(m["final"], true);
        assert_eq!(m["backend"], "default");
    }

    // Each request carried exactly the stream's audio from start to end,
    // pre-roll and hangover included, as a 16 kHz mono WAV.
    let requests = stub.requests();
    assert_eq!(requests.len(), texts.len());
    for request in &requests {
        assert_eq!(request.path, "/v1/audio/transcriptions");
        let model = request.multipart_field("model").unwrap();
        assert_eq!(model, b"whisper-1");
        let id = utterance_of(request);
        let m = texts.iter().find(|m| m["utterance_id"] == id).unwrap();
        let start = (m["start"].as_f64().unwrap() * RATE as f64).round() as usize;
        let end = (m["end"].as_f64().unwrap() * RATE as f64).round() as usize;
        let sent = request.wav_samples();
        assert_eq!(sent.len(), end - start);
        assert!(sent == samples[start..end], "utterance {id}: audio differs");
    }

    // The recording is untouched by all this.
    let recording = read_wav_i16(Path::new(t.one("recording")["path"].as_str().unwrap()));
    assert_eq!(recording.samples, samples);
}

#[tokio::test]
async fn server_errors_are_retried_client_errors_are_not() {
    let stub = Stub::start(|n, request| {
        let id = utterance_of(request);
        if id == 0 {
            // Attempts 1 and 2 fail, the third succeeds (max_retries 2).
            if n < 2 {
                Reply::status(503, "busy")
            } else {
                Reply::text("third time lucky")
            }
        } else {
            Reply::status(400, r#"{"error":{"message":"bad audio"}}"#)
        }
    })
    .await;
    let server = server(
        &stub,
        &["--transcribe-max-concurrent-requests-per-session", "1"],
    );
    let (samples, _) = speech_stream(2, 1.2);
    let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
    let t = client.stop().await;
    assert_closed_last(&t);

    let ids = utterance_ids(&t);
    let texts = transcripts(&t);
    assert_eq!(texts.len(), 1, "{:#?}", t.messages);
    assert_eq!(texts[0]["utterance_id"], 0);
    assert_eq!(texts[0]["text"], "third time lucky");
    let failed = errors(&t, "transcribe_failed");
    assert_eq!(failed.len(), ids.len() - 1);
    for error in &failed {
        assert_eq!(error["fatal"], false);
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("HTTP 400") && message.contains("1 attempt"),
            "{message}"
        );
    }
    let mut attempts: BTreeMap<u64, usize> = BTreeMap::new();
    for request in stub.requests() {
        *attempts.entry(utterance_of(&request)).or_default() += 1;
    }
    assert_eq!(attempts[&0], 3, "{attempts:?}");
    assert!(attempts
        .iter()
        .filter(|(id, _)| **id != 0)
        .all(|(_, n)| *n == 1));
}

#[tokio::test]
async fn timeouts_and_unreadable_replies_fail_alone() {
    let stub = Stub::start(|_, request| {
        if utterance_of(request) == 0 {
            Reply::text("too late").after(Duration::from_secs(3))
        } else {
            Reply::status(200, "<html>not json</html>")
        }
    })
    .await;
    let server = server(
        &stub,
        &[
            "--transcribe-request-timeout-ms",
            "300",
            "--transcribe-max-retries",
            "1",
        ],
    );
    let (samples, _) = speech_stream(2, 1.2);
    let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
    let t = client.stop().await;
    assert_closed_last(&t);
    assert!(transcripts(&t).is_empty());
    let failed = errors(&t, "transcribe_failed");
    assert_eq!(failed.len(), utterance_ids(&t).len());
    let first = failed.iter().find(|e| e["utterance_id"] == 0).unwrap();
    let message = first["message"].as_str().unwrap();
    assert!(
        message.contains("timed out after 300 ms") && message.contains("2 attempts"),
        "{message}"
    );
    let other = failed.iter().find(|e| e["utterance_id"] != 0).unwrap();
    assert!(
        other["message"].as_str().unwrap().contains("not JSON"),
        "{other}"
    );
    // Failures are in utterance order too.
    let order: Vec<u64> = failed
        .iter()
        .map(|e| e["utterance_id"].as_u64().unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
}

#[tokio::test]
async fn a_full_backlog_sheds_the_oldest_and_says_how_many() {
    let stub = Stub::start(|_, request| {
        Reply::text(&format!("u{}", utterance_of(request))).after(Duration::from_millis(1500))
    })
    .await;
    let server = server(
        &stub,
        &[
            "--transcribe-max-concurrent-requests-per-session",
            "1",
            "--transcribe-max-pending-utterances",
            "1",
            // 28.6 s sent at once, to fill the backlog: a replay, past the
            // default real-time limit.
            "--max-realtime-factor",
            "0",
        ],
    );
    let (samples, regions) = speech_stream(5, 0.8);
    // The first utterance alone, until its request is out: on a busy
    // machine the sender might otherwise pick it up only after the next
    // ones arrived, and shed it (seen in CI).
    let first_end = (regions[1].0 * RATE as f64) as usize;
    let mut client = stream(
        &server,
        "encoding=pcm_s16le&sample_rate=16000",
        &samples[..first_end],
    )
    .await;
    let deadline = std::time::Instant::now() + crate::harness::WAIT;
    while stub.requests().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "utterance 0 never sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .send_chunks(&s16_bytes(&samples[first_end..]), 640)
        .await;
    let t = client.stop().await;
    assert_closed_last(&t);

    let ids = utterance_ids(&t);
    let texts = transcripts(&t);
    let shed = errors(&t, "transcribe_shed");
    let dropped: u64 = shed.iter().map(|e| e["dropped"].as_u64().unwrap()).sum();
    assert!(dropped >= 1, "{:#?}", t.messages);
    assert_eq!(
        texts.len() as u64 + dropped,
        ids.len() as u64,
        "every utterance is transcribed or reported dropped"
    );
    // The first went out at once; the newest survived; the oldest pending went.
    let got: Vec<u64> = texts
        .iter()
        .map(|m| m["utterance_id"].as_u64().unwrap())
        .collect();
    assert_eq!(got.first(), Some(&0));
    assert_eq!(got.last(), ids.last());
    assert_eq!(stub.requests().len(), texts.len());
}

#[tokio::test]
async fn a_slow_backend_never_holds_up_the_recorder() {
    let stub = Stub::start(|_, _| Reply::text("slow").after(Duration::from_secs(3))).await;
    let server = server(&stub, &[]);
    let (samples, _) = speech_stream(1, 0.6);
    let mut client = stream(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&framing=raw",
        &samples,
    )
    .await;
    let stopped = Instant::now();
    client.send_json(json!({"type": "stop"})).await;
    // The recording is reported while the backend is still thinking.
    loop {
        let message = client.next_message().await;
        match message["type"].as_str().unwrap() {
            "recording" => break,
            "transcript" => panic!("transcript before the recording: the recorder waited"),
            _ => {}
        }
    }
    let recording_after = stopped.elapsed();
    let t = client.finish().await;
    assert_closed_last(&t);
    assert!(!transcripts(&t).is_empty());
    assert!(
        recording_after < Duration::from_secs(3),
        "recording took {recording_after:?}: it waited for the backend"
    );
    let recording = read_wav_i16(Path::new(t.one("recording")["path"].as_str().unwrap()));
    assert_eq!(recording.samples, samples);
}

#[tokio::test]
async fn stop_waits_for_transcripts_only_so_long() {
    let stub = Stub::start(|_, _| Reply::text("never").after(Duration::from_secs(30))).await;
    let server = server(&stub, &["--transcribe-stop-wait-ms", "500"]);
    let (samples, _) = speech_stream(1, 0.6);
    let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
    let stopped = Instant::now();
    let t = client.stop().await;
    assert!(stopped.elapsed() < Duration::from_secs(15));
    assert_closed_last(&t);
    assert!(transcripts(&t).is_empty());
    let failed = errors(&t, "transcribe_failed");
    assert_eq!(failed.len(), utterance_ids(&t).len());
    assert!(failed[0]["message"]
        .as_str()
        .unwrap()
        .contains("session ended before the transcript arrived"));
}

/// Regression: while the sinks finished, the socket was not read, so a
/// client's pings went unanswered and its keepalive (20 s in Python's
/// `websockets`) dropped the connection before the last transcript came.
#[tokio::test]
async fn pings_are_answered_while_the_last_transcript_is_awaited() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let stub = Stub::start(|_, _| Reply::text("late words").after(Duration::from_secs(3))).await;
    let server = server(&stub, &[]);
    let (samples, _) = speech_stream(1, 0.6);
    let mut client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
    client.send_json(json!({"type": "stop"})).await;
    client
        .ws
        .send(Message::Ping(b"still there?".to_vec().into()))
        .await
        .unwrap();
    // The pong comes while the transcript is still awaited, and the text
    // messages read on the way are kept for the transcript's check.
    let mut before_pong = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), client.ws.next())
            .await
            .expect("no pong within 2 s while the transcript was awaited");
        match next {
            Some(Ok(Message::Pong(payload))) => {
                assert_eq!(&payload[..], b"still there?");
                break;
            }
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                before_pong.push(message["type"].as_str().unwrap_or("?").to_owned());
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended before the pong: {other:?}"),
        }
    }
    assert!(
        !before_pong
            .iter()
            .any(|t| t == "transcript" || t == "closed"),
        "{before_pong:?}"
    );
    let t = client.finish().await;
    assert_closed_last(&t);
    assert_eq!(transcripts(&t).len(), 1, "{:#?}", t.messages);
    assert_eq!(transcripts(&t)[0]["text"], "late words");
}

#[tokio::test]
async fn flush_sends_the_open_utterance_now() {
    let stub = Stub::start(|_, request| Reply::text(&format!("u{}", utterance_of(request)))).await;
    // A long hangover: without the flush, the utterance would stay open.
    let server = server(&stub, &["--vad-hangover-ms", "5000"]);
    let (samples, _) = speech_stream(1, 0.3);
    let mut client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
    client.send_json(json!({"type": "flush"})).await;
    let mut got_transcript = false;
    while !got_transcript {
        let message = client.next_message().await;
        got_transcript = message["type"] == "transcript";
    }
    let t = client.stop().await;
    assert_closed_last(&t);
    // The flushed utterance is not sent again at stop.
    assert_eq!(transcripts(&t).len(), 1, "{:#?}", t.messages);
    assert_eq!(stub.requests().len(), 1);
}

#[tokio::test]
async fn webhook_backend_posts_json_and_reads_a_nested_field() {
    let stub = Stub::start(|_, request| {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let id = body["utterance_id"].as_u64().unwrap();
        Reply::status(
            200,
            &json!({"result": {"text": format!("hook {id}")}}).to_string(),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cochlea.toml");
    std::fs::write(
        &config,
        format!(
            "[transcription.backends.hook]\nkind = \"webhook\"\nurl = \"{}/hook\"\nbody = \"json\"\ntext_field = \"result.text\"\n",
            stub.url
        ),
    )
    .unwrap();
    let server = Server::start_with(&["--config", config.to_str().unwrap()], &[]);
    let (samples, _) = speech_stream(1, 0.6);
    let mut client = Client::connect(&server, "").await;
    client
        .send_json(json!({
            "type": "start", "encoding": "pcm_s16le", "sample_rate": 16000,
            "transcribe": "hook", "metadata": {"call": "A-17"}
        }))
        .await;
    assert_eq!(client.expect("started").await["transcribe"], "hook");
    client.send_chunks(&s16_bytes(&samples), 640).await;
    let t = client.stop().await;
    assert_closed_last(&t);
    let texts = transcripts(&t);
    assert!(!texts.is_empty());
    let requests = stub.requests();
    for (m, request) in texts.iter().zip(&requests) {
        assert_eq!(request.path, "/hook");
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(m["text"], format!("hook {}", body["utterance_id"]));
        assert_eq!(body["metadata"]["call"], "A-17");
        assert_eq!(body["session_id"], t.one("started")["session_id"]);
        let wav = base64::engine::general_purpose::STANDARD
            .decode(body["audio_base64"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<i16> = hound::WavReader::new(std::io::Cursor::new(wav))
            .unwrap()
            .samples::<i16>()
            .map(Result::unwrap)
            .collect();
        let start = (m["start"].as_f64().unwrap() * RATE as f64).round() as usize;
        assert!(decoded == samples[start..start + decoded.len()]);
    }
}

#[tokio::test]
async fn backends_are_chosen_by_name_and_unknown_names_are_refused() {
    let stub = Stub::start(|_, _| Reply::text("x")).await;
    let server = server(&stub, &[]);

    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=none",
    )
    .await;
    let started = client.expect("started").await;
    assert!(started.get("transcribe").is_none(), "{started}");
    assert!(!started["sinks"]
        .as_array()
        .unwrap()
        .contains(&json!("transcribe")));
    let t = client.stop().await;
    assert_eq!(t.close_code(), 1000);

    let client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=nope",
    )
    .await;
    let t = client.finish().await;
    t.assert_error("unknown_backend", 1003);
    let message = t.one("error")["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("nope") && message.contains("default"),
        "{message}"
    );

    // Without any backend configured, asking for one is an error too.
    let plain = Server::start();
    let client = Client::connect(
        &plain,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=default",
    )
    .await;
    client.finish().await.assert_error("unknown_backend", 1003);
    assert!(stub.requests().is_empty());
}

#[tokio::test]
async fn stereo_calls_are_segmented_per_channel() {
    let stub = Stub::start(|_, request| Reply::text(&format!("u{}", utterance_of(request)))).await;
    let server = server(&stub, &[]);
    let call = read_wav_i16(&fixture("call-stereo-8k.wav"));
    assert_eq!((call.spec.channels, call.spec.sample_rate), (2, 8000));
    let client = stream(
        &server,
        "encoding=pcm_s16le&sample_rate=8000&channels=2",
        &call.samples,
    )
    .await;
    let t = client.stop().await;
    assert_closed_last(&t);
    // Where each channel's speech really ends in the file.
    let last_sound = |channel: usize| -> f64 {
        let frame = call
            .samples
            .chunks(2)
            .rposition(|f| f[channel].unsigned_abs() > 300)
            .unwrap();
        frame as f64 / 8000.0
    };
    for channel in 0..2u64 {
        let mine: Vec<&Value> = transcripts(&t)
            .into_iter()
            .filter(|m| m["channel"] == channel)
            .collect();
        assert!(!mine.is_empty(), "no transcript for channel {channel}");
        let ended = t
            .of_type("vad")
            .into_iter()
            .filter(|v| v["channel"] == channel && v["event"] == "speech_ended")
            .map(|v| v["time"].as_f64().unwrap())
            .fold(0.0, f64::max);
        let truth = last_sound(channel as usize);
        assert!(
            (ended - truth).abs() < 0.25,
            "channel {channel}: speech ended at {ended}, the file's at {truth}"
        );
    }
}

#[tokio::test]
async fn https_backends_are_verified_against_the_configured_ca() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let stub = Stub::start_tls(cert, key, |_, _| Reply::text("over tls")).await;
    assert!(stub.url.starts_with("https://localhost:"));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let config = dir.path().join("cochlea.toml");
    let backends = |with_ca: bool| {
        format!(
            "[transcription.backends.default]\nurl = \"{}\"\nmax_retries = 0\n{}",
            stub.url,
            if with_ca {
                format!("ca_cert_path = \"{}\"\n", ca.display())
            } else {
                String::new()
            }
        )
    };
    // max_retries is not a backend key: the file is refused, naming it.
    std::fs::write(&config, backends(true)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args([
            "serve",
            "--print-config",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_retries"));

    let (samples, _) = speech_stream(1, 0.6);
    for with_ca in [true, false] {
        let text = backends(with_ca).replace("max_retries = 0\n", "");
        std::fs::write(&config, text).unwrap();
        let server = Server::start_with(
            &[
                "--config",
                config.to_str().unwrap(),
                "--transcribe-max-retries",
                "0",
            ],
            &[],
        );
        let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
        let t = client.stop().await;
        assert_closed_last(&t);
        if with_ca {
            let texts = transcripts(&t);
            assert!(!texts.is_empty(), "{:#?}", t.messages);
            assert!(texts.iter().all(|m| m["text"] == "over tls"));
        } else {
            // The system's roots do not know this certificate: refused.
            assert!(transcripts(&t).is_empty());
            let failed = errors(&t, "transcribe_failed");
            assert!(!failed.is_empty());
            let message = failed[0]["message"].as_str().unwrap();
            assert!(message.to_lowercase().contains("certificate"), "{message}");
        }
    }
}

/// Issue 15 item 8: the configured URL's query (Azure's `api-version`, a key
/// passed as a parameter) reaches the backend intact, after the path that an
/// OpenAI base URL gets.
#[tokio::test]
async fn a_backend_url_keeps_its_query_when_the_endpoint_path_is_added() {
    let stub = Stub::start(|_, _| Reply::text("query kept")).await;
    let (samples, _) = speech_stream(1, 0.6);
    for (given, requested) in [
        (
            "/v1/audio/transcriptions?api-version=2024-06-01&api_key=k3y-in-the-query",
            "/v1/audio/transcriptions?api-version=2024-06-01&api_key=k3y-in-the-query",
        ),
        (
            "/v1?api-version=2024-06-01",
            "/v1/audio/transcriptions?api-version=2024-06-01",
        ),
        (
            "?api-version=2024-06-01",
            "/v1/audio/transcriptions?api-version=2024-06-01",
        ),
    ] {
        let before = stub.requests().len();
        let url = format!("{}{given}", stub.url);
        let server = Server::start_with(&["--transcribe-url", &url], &[]);
        let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
        let t = client.stop().await;
        assert_closed_last(&t);
        let texts = transcripts(&t);
        assert!(!texts.is_empty(), "{given}: {:#?}", t.messages);
        assert!(texts.iter().all(|m| m["text"] == "query kept"));
        let requests = stub.requests();
        assert_eq!(requests.len() - before, texts.len());
        for request in &requests[before..] {
            assert_eq!(request.path, requested, "configured as {url}");
        }
    }
}

/// Issue 15 item 8: a failing backend is reported to the client and logged
/// without the URL's credentials or query, whether the failure names the
/// URL (a refused connection) or the backend echoes the request target (as
/// Express's default 404 page does).
#[tokio::test]
async fn backend_failures_reach_clients_and_logs_without_the_url_s_secrets() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let echo =
        Stub::start(|_, request| Reply::status(404, &format!("Cannot POST {}", request.path)))
            .await;
    let echo_port = echo.url.rsplit(':').next().unwrap().to_owned();
    let secrets = ["pa55word-in-the-url", "k3y-in-the-query"];
    let (samples, _) = speech_stream(1, 0.6);
    for (host_port, failure) in [
        (format!("127.0.0.1:{closed_port}"), "request failed"),
        (
            format!("localhost:{echo_port}"),
            "HTTP 404: Cannot POST /v1/audio/transcriptions",
        ),
    ] {
        let url = format!(
            "http://user:{}@{host_port}/v1/audio/transcriptions?api-version=2024-06-01&api_key={}",
            secrets[0], secrets[1]
        );
        let server = Server::start_with(
            &["--transcribe-url", &url, "--transcribe-max-retries", "0"],
            &[],
        );
        let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
        let t = client.stop().await;
        assert_closed_last(&t);
        let failed = errors(&t, "transcribe_failed");
        assert!(!failed.is_empty(), "{:#?}", t.messages);
        for error in &failed {
            let message = error["message"].as_str().unwrap();
            // Still says what went wrong.
            assert!(message.contains(failure), "{message}");
            for secret in secrets {
                assert!(!message.contains(secret), "{secret} echoed: {message}");
            }
            assert!(!message.contains("api_key"), "query echoed: {message}");
        }
        if std::env::var_os("COCHLEA_TEST_LOGS").is_none() {
            let log = server.log();
            assert!(log.contains("transcription request failed"), "{log}");
            for secret in secrets {
                assert!(!log.contains(secret), "{secret} logged:\n{log}");
            }
        }
    }
}

/// Issue 15, item 7: SIGTERM with a transcript pending on a slow backend.
/// The whole shutdown, `closed` included, fits `shutdown_timeout_ms`; it
/// used to wait out `stop_wait_ms` (15 s) first. The cut utterance is
/// reported as `transcribe_failed`, not dropped.
#[tokio::test]
async fn shutdown_with_transcripts_pending_fits_the_shutdown_timeout() {
    let stub = Stub::start(|_, _| Reply::text("never").after(Duration::from_secs(60))).await;
    let mut server = server(&stub, &["--shutdown-timeout-ms", "2000"]);
    let (samples, _) = speech_stream(1, 0.6);
    let client = stream(&server, "encoding=pcm_s16le&sample_rate=16000", &samples).await;
    let waiting = Instant::now();
    while stub.requests().is_empty() {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "no request reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    server.signal("TERM");
    let t = client.finish().await;
    let closed_after = signalled.elapsed();
    let status = server.wait_exit(crate::harness::WAIT);
    let exited_after = signalled.elapsed();
    assert!(status.success(), "a clean exit after SIGTERM");
    assert_eq!(t.close_code(), 1001, "going away: {:#?}", t.messages);
    assert_eq!(t.types().last(), Some(&"closed"), "{:#?}", t.types());
    assert_eq!(t.one("closed")["reason"], "shutdown");
    assert!(
        closed_after < Duration::from_millis(2000),
        "closed {closed_after:?} after SIGTERM, over the 2 s shutdown timeout"
    );
    assert!(
        exited_after < Duration::from_millis(3500),
        "the process exited {exited_after:?} after SIGTERM (shutdown timeout 2 s)"
    );
    let failed = errors(&t, "transcribe_failed");
    assert_eq!(failed.len(), utterance_ids(&t).len(), "{:#?}", t.messages);
}
