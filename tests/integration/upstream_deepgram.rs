//! The `deepgram` backend kind: a session's audio streamed to a Deepgram-
//! style `/v1/listen` upstream, its results relayed as `transcript`s.
//!
//! - through a second cochlea's own `/v1/listen` (which transcribes with the
//!   scripted HTTP stub): the stub's text arrives through both, in stream time;
//! - against a scripted fake Deepgram server that drops the connection in the
//!   middle: the sink reconnects, replays the unacknowledged tail, and the
//!   transcripts stay in order and in stream time; KeepAlive while the client
//!   is idle, Finalize on `flush`, CloseStream at the end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::dialect_client::padded;
use crate::harness::*;
use crate::stt_stub::{Reply, Stub};

const KEY: &str = "dg-test-key-0123456789";

fn server_with_config(text: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cochlea.toml");
    std::fs::write(&path, text).unwrap();
    let server = Server::start_with(
        &[
            "--config",
            path.to_str().unwrap(),
            "--max-realtime-factor",
            "0",
            "--transcribe-retry-backoff-ms",
            "50",
        ],
        &[],
    );
    (server, dir)
}

fn finals(t: &Transcript) -> Vec<&Value> {
    t.of_type("transcript")
        .into_iter()
        .filter(|m| m["is_final"] == true)
        .collect()
}

#[tokio::test]
async fn a_second_cochlea_is_a_deepgram_upstream_and_its_text_arrives_in_stream_time() {
    let stub =
        Stub::start(|_, request| Reply::verbose("alpha beta gamma", request.audio_seconds())).await;
    let upstream = Server::start_with(
        &[
            "--transcribe-url",
            stub.url.as_str(),
            "--max-realtime-factor",
            "0",
        ],
        &[],
    );
    let (server, _config) = server_with_config(&format!(
        r#"
[transcription.backends.up]
kind = "deepgram"
url = "ws://{}/v1/listen"
api_key = "{KEY}"

[transcription.backends.up.query]
model = "nova-3"
punctuate = true
"#,
        upstream.addr
    ));
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let speech_seconds = speech.len() as f64 / 16_000.0;
    let samples = padded(&speech, 16_000, 2, 1.2);
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=up",
    )
    .await;
    assert_eq!(client.expect("started").await["transcribe"], "up");
    client.send_chunks(&s16_bytes(&samples), 640).await;
    let t = client.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    let finals = finals(&t);
    assert_eq!(finals.len(), 2, "{:#?}", t.messages);
    for (i, f) in finals.iter().enumerate() {
        assert_eq!(f["utterance_id"], i as u64, "{f}");
        assert_eq!(f["text"], "alpha beta gamma", "{f}");
        assert_eq!(f["backend"], "up", "{f}");
        // The sentence starts 0.5 s in, the second one after 1.2 s of gap:
        // the upstream's voice detector finds them there, in our time.
        let speech_start = 0.5 + i as f64 * (speech_seconds + 1.2);
        let (start, end) = (f["start"].as_f64().unwrap(), f["end"].as_f64().unwrap());
        assert!(
            (start - speech_start).abs() < 0.6,
            "{start} vs {speech_start}"
        );
        assert!(end > start + speech_seconds * 0.5, "{f}");
        let words = f["words"].as_array().expect("words");
        assert_eq!(words.len(), 3, "{f}");
        for w in words {
            let (ws, we) = (w["start"].as_f64().unwrap(), w["end"].as_f64().unwrap());
            assert!(
                ws >= start - 0.01 && we <= end + 0.2 && ws < we,
                "{w} in {f}"
            );
        }
    }
    // The upstream transcribed exactly the two utterances.
    assert_eq!(stub.requests().len(), 2);
}

/// What the fake Deepgram server saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Connected {
        query: String,
        auth: String,
    },
    /// A binary message, with the stream second its first sample encodes,
    /// and its samples.
    Audio {
        first_second: f64,
        frames: usize,
        samples: Vec<i16>,
    },
    Control(String),
}

type Log = Arc<Mutex<Vec<(usize, Seen)>>>;

/// Our test audio encodes its own position: sample `i` is `i / 160 * 100`
/// (hundredths of a second, times 100), so the server can tell where a
/// replay starts; up to 30,000 at 3 s, large enough that an f32 → s16
/// mapping other than the decoders' inverse changes it.
fn ramp(seconds: f64) -> Vec<i16> {
    (0..(seconds * 16_000.0) as usize)
        .map(|i| (i / 160 * 100) as i16)
        .collect()
}

fn results(start: f64, duration: f64, text: &str, words: &[(&str, f64, f64)]) -> Message {
    let words: Vec<Value> = words
        .iter()
        .map(|(w, s, e)| json!({"word": w, "start": s, "end": e, "confidence": 0.9, "punctuated_word": w}))
        .collect();
    Message::text(
        json!({
            "type": "Results", "channel_index": [0, 1], "start": start, "duration": duration,
            "is_final": true, "speech_final": true, "from_finalize": false,
            "channel": {"alternatives": [{"transcript": text, "confidence": 0.9, "words": words}]},
        })
        .to_string(),
    )
}

/// Connection 1: a final for 0-1 s once 2 s of audio are in, then the
/// connection drops. Connection 2: a final for its 0.5-1.5 s once 2 s of
/// (replayed) audio are in, one after `Finalize` for its 1.5-2.0 s, and a
/// clean close after `CloseStream`.
// tungstenite fixes the callback's error type.
#[allow(clippy::result_large_err)]
async fn fake_deepgram(listener: TcpListener, log: Log) {
    for connection in 0.. {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let seen = log.clone();
        let callback = move |request: &Request, response: Response| {
            let auth = request
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let query = request.uri().query().unwrap_or("").to_owned();
            seen.lock()
                .unwrap()
                .push((connection, Seen::Connected { query, auth }));
            Ok::<_, ErrorResponse>(response)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
            .await
            .unwrap();
        let mut frames = 0usize;
        let mut answered = false;
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(bytes) => {
                    let samples: Vec<i16> = bytes
                        .chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]]))
                        .collect();
                    log.lock().unwrap().push((
                        connection,
                        Seen::Audio {
                            first_second: f64::from(samples[0]) / 10_000.0,
                            frames: bytes.len() / 2,
                            samples,
                        },
                    ));
                    frames += bytes.len() / 2;
                    if frames >= 32_000 && !answered {
                        answered = true;
                        if connection == 0 {
                            ws.send(results(0.0, 1.0, "first", &[("first", 0.2, 0.6)]))
                                .await
                                .unwrap();
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            // Dropped without a close handshake.
                            break;
                        }
                        ws.send(results(0.5, 1.0, "second", &[("second", 0.6, 0.9)]))
                            .await
                            .unwrap();
                    }
                }
                Message::Text(text) => {
                    let kind = serde_json::from_str::<Value>(text.as_str()).unwrap()["type"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    log.lock()
                        .unwrap()
                        .push((connection, Seen::Control(kind.clone())));
                    match kind.as_str() {
                        "Finalize" => ws
                            .send(results(1.5, 0.5, "third", &[("third", 1.6, 1.9)]))
                            .await
                            .unwrap(),
                        "CloseStream" => {
                            let _ = ws.close(None).await;
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn a_dropped_upstream_is_reconnected_with_the_tail_replayed_in_stream_time() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let fake = tokio::spawn(fake_deepgram(listener, log.clone()));
    let (server, _config) = server_with_config(&format!(
        r#"
[transcription.backends.dg]
kind = "deepgram"
url = "ws://{addr}/v1/listen"
api_key = "{KEY}"

[transcription.backends.dg.query]
model = "nova-3"
"#
    ));
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=dg&interim=true",
    )
    .await;
    client.expect("started").await;
    // 3 s of audio: connection 1 acknowledges 0-1 s and drops.
    client.send_chunks(&s16_bytes(&ramp(3.0)), 640).await;
    let first = client.expect("transcript").await;
    assert_eq!(
        (first["text"].as_str(), first["utterance_id"].as_u64()),
        (Some("first"), Some(0))
    );
    let second = client.expect("transcript").await;
    assert_eq!(second["text"], "second", "{second}");
    assert_eq!(second["utterance_id"], 1);
    // Connection 2 started at stream time 1.0 s: its 0.5-1.5 s is 1.5-2.5 s.
    assert!(
        (second["start"].as_f64().unwrap() - 1.5).abs() < 0.01,
        "{second}"
    );
    assert!(
        (second["end"].as_f64().unwrap() - 2.5).abs() < 0.01,
        "{second}"
    );
    assert!(
        (second["words"][0]["start"].as_f64().unwrap() - 1.6).abs() < 0.01,
        "{second}"
    );
    // Idle for longer than the KeepAlive interval.
    tokio::time::sleep(Duration::from_millis(4_600)).await;
    client.send_json(json!({"type": "flush"})).await;
    let mut third = client.next_message().await;
    while third["type"] != "transcript" {
        third = client.next_message().await;
    }
    assert_eq!(third["text"], "third", "{third}");
    assert_eq!(third["utterance_id"], 2);
    // Its 1.5-2.0 s is 2.5-3.0 s of the stream.
    assert!(
        (third["start"].as_f64().unwrap() - 2.5).abs() < 0.01,
        "{third}"
    );
    assert!(
        (third["words"][0]["end"].as_f64().unwrap() - 2.9).abs() < 0.01,
        "{third}"
    );
    let t = client.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    // Nothing was lost: the replay covered everything not acknowledged.
    assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    fake.abort();

    let log = log.lock().unwrap().clone();
    let connects: Vec<&Seen> = log
        .iter()
        .filter(|(_, s)| matches!(s, Seen::Connected { .. }))
        .map(|(_, s)| s)
        .collect();
    assert_eq!(connects.len(), 2, "{log:#?}");
    for seen in connects {
        let Seen::Connected { query, auth } = seen else {
            unreachable!()
        };
        assert_eq!(auth, &format!("Token {KEY}"));
        for part in [
            "encoding=linear16",
            "sample_rate=16000",
            "channels=1",
            "interim_results=true",
            "model=nova-3",
        ] {
            assert!(query.split('&').any(|p| p == part), "{part} in {query}");
        }
    }
    // Connection 2's audio begins with the replay from 1.0 s, and it gets
    // every frame from there to the end: 2 s.
    let audio_2: Vec<(f64, usize)> = log
        .iter()
        .filter_map(|(c, s)| match s {
            Seen::Audio {
                first_second,
                frames,
                ..
            } if *c == 1 => Some((*first_second, *frames)),
            _ => None,
        })
        .collect();
    assert!((audio_2[0].0 - 1.0).abs() < 0.011, "{audio_2:?}");
    assert_eq!(audio_2.iter().map(|(_, f)| f).sum::<usize>(), 32_000);
    let controls: Vec<&str> = log
        .iter()
        .filter_map(|(c, s)| match s {
            Seen::Control(kind) if *c == 1 => Some(kind.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        controls,
        ["KeepAlive", "Finalize", "CloseStream"],
        "{log:#?}"
    );
    // The upstream gets the client's s16 samples exactly: the first
    // connection's audio is the stream's first samples.
    let sent_1: Vec<i16> = log
        .iter()
        .filter_map(|(c, s)| match s {
            Seen::Audio { samples, .. } if *c == 0 => Some(samples.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(sent_1.len() >= 16_000, "{} samples", sent_1.len());
    assert!(
        sent_1[..] == ramp(3.0)[..sent_1.len()],
        "the upstream got other samples than the client sent"
    );
    // The recording is exact whatever the upstream did.
    let recorded = read_wav_i16(&server.recordings_dir().join(format!(
        "{}.wav",
        t.one("started")["session_id"].as_str().unwrap()
    )));
    assert_eq!(recorded.samples, ramp(3.0));
}

/// Connection 1 takes the audio and answers `CloseStream` with an `Error`
/// and a 1011 close, without results (as a cochlea upstream does when the
/// session fails at the end: 1008 when the replay comes too fast).
/// Connection 2, the reconnect, gets the replay and `CloseStream` at once,
/// gives its final and closes normally. Returns the frames each got.
async fn fails_at_close(listener: TcpListener, frames_by_connection: Arc<Mutex<Vec<usize>>>) {
    for connection in 0.. {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        frames_by_connection.lock().unwrap().push(0);
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(bytes) => {
                    frames_by_connection.lock().unwrap()[connection] += bytes.len() / 2;
                }
                Message::Text(text) if text.contains("CloseStream") => {
                    let code = if connection == 0 {
                        let error = json!({"type": "Error", "variant": "internal", "description": "failed"});
                        ws.send(Message::text(error.to_string())).await.unwrap();
                        CloseCode::Error
                    } else {
                        ws.send(results(0.25, 0.5, "late", &[("late", 0.3, 0.6)]))
                            .await
                            .unwrap();
                        CloseCode::Normal
                    };
                    let _ = ws
                        .close(Some(CloseFrame {
                            code,
                            reason: "".into(),
                        }))
                        .await;
                }
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn an_error_close_after_close_stream_is_not_taken_for_the_last_results() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frames: Arc<Mutex<Vec<usize>>> = Arc::default();
    let fake = tokio::spawn(fails_at_close(listener, frames.clone()));
    let (server, _config) = server_with_config(&format!(
        r#"
[transcription.backends.dg]
kind = "deepgram"
url = "ws://{addr}/v1/listen"
"#
    ));
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=dg",
    )
    .await;
    client.expect("started").await;
    client.send_chunks(&s16_bytes(&ramp(1.0)), 640).await;
    let t = client.stop().await;
    fake.abort();
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    // The 1011 close was a failure: the task reconnected, replayed the
    // second that no final covered and got its results there.
    let finals = finals(&t);
    assert_eq!(finals.len(), 1, "{:#?}", t.messages);
    assert_eq!(finals[0]["text"], "late");
    assert!(
        (finals[0]["start"].as_f64().unwrap() - 0.25).abs() < 0.01,
        "{}",
        finals[0]
    );
    assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    assert_eq!(*frames.lock().unwrap(), [16_000, 16_000]);
}
