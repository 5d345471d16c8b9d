//! The streaming kinds `assemblyai`, `openai_realtime` and `vosk`, each
//! against a scripted fake server on loopback that follows the protocol's
//! documented message sequence and drops the first connection in the middle
//! of the stream. Each test checks what the upstream was sent (credentials,
//! configuration, the client's samples, the replay of the unacknowledged
//! tail after the drop, the flush and end messages) and what the client got
//! back (partials, finals with words, in stream time, in order, no error),
//! and that the recording is exact whatever the upstream did.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::harness::*;

const KEY: &str = "upstream-test-key-0123456789";

/// What a fake upstream saw on one connection.
#[derive(Debug, Default, Clone)]
struct Conn {
    path_and_query: String,
    auth: String,
    texts: Vec<String>,
    /// Each audio message's samples.
    audio: Vec<Vec<i16>>,
}

impl Conn {
    fn frames(&self) -> usize {
        self.audio.iter().map(Vec::len).sum()
    }

    fn samples(&self) -> Vec<i16> {
        self.audio.concat()
    }

    fn query_has(&self, pair: &str) -> bool {
        self.path_and_query
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|p| p == pair))
    }
}

type Log = Arc<Mutex<Vec<Conn>>>;

/// Our test audio encodes its own position: sample `i` is `i / 160 * 100`,
/// hundredths of a second times 100 (up to 30,000 at 3 s).
fn ramp(seconds: f64) -> Vec<i16> {
    (0..(seconds * 16_000.0) as usize)
        .map(|i| (i / 160 * 100) as i16)
        .collect()
}

/// The stream second a ramp sample says.
fn position_s(sample: i16) -> f64 {
    f64::from(sample) / 10_000.0
}

fn samples_of(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Accepts the next connection, noting its path, query and credentials.
// tungstenite fixes the callback's error type.
#[allow(clippy::result_large_err)]
async fn accept(listener: &TcpListener, log: &Log) -> Option<(usize, WebSocketStream<TcpStream>)> {
    let (tcp, _) = listener.accept().await.ok()?;
    let seen = log.clone();
    let index = log.lock().unwrap().len();
    let callback = move |request: &Request, response: Response| {
        let auth = request
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        seen.lock().unwrap().push(Conn {
            path_and_query: request.uri().to_string(),
            auth,
            ..Conn::default()
        });
        Ok::<_, ErrorResponse>(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
        .await
        .ok()?;
    Some((index, ws))
}

/// A fake's mid-stream drop: a Close, then whatever the client still sends
/// is read and thrown away until it hangs up. Closing the socket with that
/// unread would make the kernel reset the connection, and a reset discards
/// the replies the client has not read yet (under load the vosk test lost
/// its "first" result that way, and the 300 ms pauses before the others'
/// drops were not always enough).
async fn drop_connection(ws: &mut WebSocketStream<TcpStream>) {
    let _ = ws.send(Message::Close(None)).await;
    let drained = async { while let Some(Ok(_)) = ws.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), drained).await;
}

fn note_text(log: &Log, index: usize, text: &str) {
    log.lock().unwrap()[index].texts.push(text.to_owned());
}

fn note_audio(log: &Log, index: usize, samples: Vec<i16>) {
    log.lock().unwrap()[index].audio.push(samples);
}

fn server_with_backend(name: &str, table: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cochlea.toml");
    std::fs::write(&path, format!("[transcription.backends.{name}]\n{table}")).unwrap();
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

/// The next `transcript` message, skipping others (`vad`, `stats`, acks).
async fn next_transcript(client: &mut Client) -> Value {
    loop {
        let message = client.next_message().await;
        if message["type"] == "transcript" {
            return message;
        }
        assert_ne!(message["type"], "error", "{message}");
    }
}

/// Reads transcripts until the final of utterance `id`; returns them all.
async fn until_final(client: &mut Client, id: u64) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let t = next_transcript(client).await;
        let done = t["is_final"] == true && t["utterance_id"] == id;
        seen.push(t);
        if done {
            return seen;
        }
    }
}

fn assert_near(value: &Value, expected: f64, tolerance: f64, context: &Value) {
    let got = value.as_f64().unwrap_or(f64::NAN);
    assert!(
        (got - expected).abs() <= tolerance,
        "{got} is not {expected} ± {tolerance} in {context}"
    );
}

/// Checks a final's text, utterance, span and words (stream seconds).
fn assert_final(t: &Value, id: u64, text: &str, start: f64, end: f64, tolerance: f64) {
    assert_eq!(t["is_final"], true, "{t}");
    assert_eq!(t["utterance_id"], id, "{t}");
    assert_eq!(t["text"], text, "{t}");
    assert_near(&t["start"], start, tolerance, t);
    assert_near(&t["end"], end, tolerance, t);
}

fn assert_recording_exact(server: &Server, t: &Transcript, samples: &[i16]) {
    let recorded = read_wav_i16(&server.recordings_dir().join(format!(
        "{}.wav",
        t.one("started")["session_id"].as_str().unwrap()
    )));
    assert!(recorded.samples == samples, "the recording is not exact");
}

// ---------------------------------------------------------------- AssemblyAI

fn turn(order: u64, end_of_turn: bool, transcript: &str, words: &[(&str, u64, u64)]) -> Message {
    let words: Vec<Value> = words
        .iter()
        .map(|(w, s, e)| json!({"text": w, "start": s, "end": e, "confidence": 0.9, "word_is_final": end_of_turn}))
        .collect();
    Message::text(
        json!({
            "type": "Turn", "turn_order": order, "turn_is_formatted": false,
            "end_of_turn": end_of_turn, "transcript": transcript,
            "end_of_turn_confidence": if end_of_turn { 0.9 } else { 0.1 }, "words": words,
        })
        .to_string(),
    )
}

/// Universal streaming v3: `Begin`, then `Turn`s. Connection 1: a partial
/// and the final of turn 0 ("first", 0.2-0.6 s) once 2 s of audio are in,
/// then a drop without a close. Connection 2: turn 0 ("second", its
/// 0.5-0.9 s) once 2 s of the replay are in; turn 1 ("third", its
/// 1.6-1.9 s) on `ForceEndpoint`; `Termination` and a close on `Terminate`.
async fn fake_assemblyai(listener: TcpListener, log: Log) {
    while let Some((index, mut ws)) = accept(&listener, &log).await {
        let begin =
            json!({"type": "Begin", "id": format!("s{index}"), "expires_at": 1_900_000_000});
        ws.send(Message::text(begin.to_string())).await.unwrap();
        let mut frames = 0usize;
        let mut answered = false;
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(bytes) => {
                    frames += bytes.len() / 2;
                    note_audio(&log, index, samples_of(&bytes));
                    if frames >= 32_000 && !answered {
                        answered = true;
                        if index == 0 {
                            ws.send(turn(0, false, "", &[("first", 200, 600)]))
                                .await
                                .unwrap();
                            ws.send(turn(0, true, "first", &[("first", 200, 600)]))
                                .await
                                .unwrap();
                            drop_connection(&mut ws).await;
                            break;
                        }
                        ws.send(turn(0, false, "", &[("second", 500, 900)]))
                            .await
                            .unwrap();
                        ws.send(turn(0, true, "second", &[("second", 500, 900)]))
                            .await
                            .unwrap();
                    }
                }
                Message::Text(text) => {
                    note_text(&log, index, text.as_str());
                    let kind = serde_json::from_str::<Value>(text.as_str()).unwrap()["type"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    match kind.as_str() {
                        "ForceEndpoint" => ws
                            .send(turn(1, true, "third", &[("third", 1600, 1900)]))
                            .await
                            .unwrap(),
                        "Terminate" => {
                            let end = json!({"type": "Termination", "audio_duration_seconds": 2, "session_duration_seconds": 3});
                            ws.send(Message::text(end.to_string())).await.unwrap();
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
async fn assemblyai_upstream_relays_turns_and_survives_a_drop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let fake = tokio::spawn(fake_assemblyai(listener, log.clone()));
    let (server, _config) = server_with_backend(
        "aai",
        &format!(
            "kind = \"assemblyai\"\nurl = \"ws://{addr}/v3/ws\"\napi_key = \"{KEY}\"\nquery = {{ speech_model = \"universal-streaming-english\" }}\n"
        ),
    );
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=aai&interim=true",
    )
    .await;
    client.expect("started").await;
    let samples = ramp(3.0);
    client.send_chunks(&s16_bytes(&samples), 640).await;

    let first = until_final(&mut client, 0).await;
    assert_eq!(first.len(), 2, "a partial then the final: {first:#?}");
    assert_eq!(
        (&first[0]["is_final"], &first[0]["text"]),
        (&json!(false), &json!("first"))
    );
    assert_final(&first[1], 0, "first", 0.2, 0.6, 0.001);
    assert_near(&first[1]["words"][0]["start"], 0.2, 0.001, &first[1]);
    // Connection 2 began with the replay from 0.6 s (the first final's
    // end): its 0.5-0.9 s is 1.1-1.5 s of the stream.
    let second = until_final(&mut client, 1).await;
    assert_eq!(second[0]["is_final"], false, "{second:#?}");
    assert_final(second.last().unwrap(), 1, "second", 1.1, 1.5, 0.001);
    // Idle for longer than the keepalive interval, then a flush.
    tokio::time::sleep(Duration::from_millis(4_600)).await;
    client.send_json(json!({"type": "flush"})).await;
    let third = until_final(&mut client, 2).await;
    assert_final(third.last().unwrap(), 2, "third", 2.2, 2.5, 0.001);
    assert_near(
        &third.last().unwrap()["words"][0]["end"],
        2.5,
        0.001,
        &third[0],
    );
    let t = client.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    // Nothing was lost: the replay covered everything not acknowledged.
    assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    fake.abort();

    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:#?}");
    for conn in &log {
        assert_eq!(conn.auth, KEY, "the key alone, as AssemblyAI takes it");
        assert!(
            conn.path_and_query.starts_with("/v3/ws?"),
            "{}",
            conn.path_and_query
        );
        for pair in [
            "sample_rate=16000",
            "encoding=pcm_s16le",
            "speech_model=universal-streaming-english",
        ] {
            assert!(conn.query_has(pair), "{pair} in {}", conn.path_and_query);
        }
        // The API refuses messages shorter than 50 ms (800 frames).
        assert!(
            conn.audio.iter().all(|a| a.len() >= 800),
            "{:?}",
            conn.audio.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
    assert!(log[0].samples()[..] == samples[..log[0].frames()]);
    assert_near(
        &json!(position_s(log[1].audio[0][0])),
        0.6,
        0.001,
        &json!("replay"),
    );
    assert!(
        log[1].samples()[..] == samples[9_600..],
        "the replay is not the tail"
    );
    assert_eq!(
        log[1].texts,
        [
            r#"{"type":"KeepAlive"}"#,
            r#"{"type":"ForceEndpoint"}"#,
            r#"{"type":"Terminate"}"#
        ]
    );
    assert_recording_exact(&server, &t, &samples);
}

// ---------------------------------------------------------------------- vosk

fn vosk_partial(text: &str) -> Message {
    Message::text(json!({ "partial": text }).to_string())
}

fn vosk_result(words: &[(&str, f64, f64)]) -> Message {
    let result: Vec<Value> = words
        .iter()
        .map(|(w, s, e)| json!({"conf": 1.0, "start": s, "end": e, "word": w}))
        .collect();
    let text: Vec<&str> = words.iter().map(|(w, _, _)| *w).collect();
    Message::text(json!({"result": result, "text": text.join(" ")}).to_string())
}

/// vosk-server: a config text first, then one reply per audio message.
/// Connection 1: silence to 1 s, "fir" partials, the result "first"
/// (0.2-0.6 s) at 1.5 s, "sec" partials, and a drop at 2 s without a
/// reply. Connection 2: "second" partials, the result (its 0.1-0.4 s) once
/// 0.5 s is in, then silence; the reply to `{"eof" : 1}` is the result
/// "third" (its 1.3-1.4 s), then a close.
async fn fake_vosk(listener: TcpListener, log: Log) {
    while let Some((index, mut ws)) = accept(&listener, &log).await {
        let mut frames = 0usize;
        let mut said = false;
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(bytes) => {
                    frames += bytes.len() / 2;
                    note_audio(&log, index, samples_of(&bytes));
                    let reply = if index == 0 {
                        if frames <= 16_000 {
                            vosk_partial("")
                        } else if frames < 24_000 {
                            vosk_partial("fir")
                        } else if !said {
                            said = true;
                            vosk_result(&[("first", 0.2, 0.6)])
                        } else if frames < 32_000 {
                            vosk_partial("sec")
                        } else {
                            drop_connection(&mut ws).await;
                            break;
                        }
                    } else if frames < 8_000 {
                        vosk_partial("second")
                    } else if !said {
                        said = true;
                        vosk_result(&[("second", 0.1, 0.4)])
                    } else {
                        vosk_partial("")
                    };
                    ws.send(reply).await.unwrap();
                }
                Message::Text(text) => {
                    note_text(&log, index, text.as_str());
                    if text.as_str() == r#"{"eof" : 1}"# {
                        ws.send(vosk_result(&[("third", 1.3, 1.4)])).await.unwrap();
                        let _ = ws.close(None).await;
                    }
                }
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn vosk_upstream_relays_partials_and_results_and_survives_a_drop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let fake = tokio::spawn(fake_vosk(listener, log.clone()));
    let (server, _config) =
        server_with_backend("vosk", &format!("kind = \"vosk\"\nurl = \"ws://{addr}\"\n"));
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=vosk&interim=true",
    )
    .await;
    client.expect("started").await;
    let samples = ramp(3.0);
    client.send_chunks(&s16_bytes(&samples), 640).await;

    let first = until_final(&mut client, 0).await;
    assert!(first.len() >= 2, "partials before the final: {first:#?}");
    assert!(
        first[..first.len() - 1]
            .iter()
            .all(|p| p["is_final"] == false && p["text"] == "fir"),
        "{first:#?}"
    );
    assert_final(first.last().unwrap(), 0, "first", 0.2, 0.6, 0.001);
    // Utterance 1 began on connection 1 ("sec") and goes on on connection
    // 2, which replays from 1.5 s: its 0.1-0.4 s is 1.6-1.9 s.
    let second = until_final(&mut client, 1).await;
    let partials: Vec<&str> = second
        .iter()
        .filter(|t| t["is_final"] == false)
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert!(
        partials.contains(&"sec") && partials.contains(&"second"),
        "{second:#?}"
    );
    assert_final(second.last().unwrap(), 1, "second", 1.6, 1.9, 0.001);
    let t = client.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    let third = t
        .of_type("transcript")
        .into_iter()
        .find(|m| m["utterance_id"] == 2)
        .expect("the result of eof");
    assert_final(third, 2, "third", 2.8, 2.9, 0.001);
    assert_near(&third["words"][0]["start"], 2.8, 0.001, third);
    fake.abort();

    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:#?}");
    for conn in &log {
        let config: Value = serde_json::from_str(&conn.texts[0]).unwrap();
        assert_eq!(
            config,
            json!({"config": {"sample_rate": 16000, "words": 1}})
        );
    }
    assert_eq!(
        log[1].texts.last().map(String::as_str),
        Some(r#"{"eof" : 1}"#)
    );
    assert!(log[0].samples()[..] == samples[..log[0].frames()]);
    assert!(
        log[1].samples()[..] == samples[24_000..],
        "the replay is not the tail"
    );
    assert_recording_exact(&server, &t, &samples);
}

// ----------------------------------------------------------- OpenAI realtime

fn event(value: Value) -> Message {
    Message::text(value.to_string())
}

/// The realtime API in transcription mode, 24 kHz: `session.update` first,
/// then appends. Connection 1: item a0 (speech 0.2-0.7 s, deltas "fir" and
/// "st", completed "first"), then item b0 starting at 1.1 s with a delta
/// "sec", and a drop at 1.6 s. Connection 2: item c1 (its 0-0.5 s,
/// "second"); a commit is answered by item d1 ("third").
async fn fake_openai(listener: TcpListener, log: Log) {
    while let Some((index, mut ws)) = accept(&listener, &log).await {
        let mut frames = 0usize;
        let mut step = 0;
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            let kind = value["type"].as_str().unwrap_or_default().to_owned();
            if kind != "input_audio_buffer.append" {
                note_text(&log, index, text.as_str());
            }
            let mut replies = Vec::new();
            match kind.as_str() {
                "session.update" => {
                    replies.push(json!({"type": "session.updated", "session": value["session"]}));
                }
                "input_audio_buffer.append" => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value["audio"].as_str().unwrap())
                        .unwrap();
                    frames += bytes.len() / 2;
                    note_audio(&log, index, samples_of(&bytes));
                    let ms = frames * 1000 / 24_000;
                    if index == 0 {
                        if ms >= 200 && step == 0 {
                            step = 1;
                            replies.push(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 200, "item_id": "a0"}));
                        }
                        if ms >= 800 && step == 1 {
                            step = 2;
                            replies.extend([
                                json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 700, "item_id": "a0"}),
                                json!({"type": "input_audio_buffer.committed", "item_id": "a0", "previous_item_id": null}),
                                json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": "a0", "content_index": 0, "delta": "fir"}),
                                json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": "a0", "content_index": 0, "delta": "st"}),
                                json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "a0", "content_index": 0, "transcript": "first"}),
                            ]);
                        }
                        if ms >= 1_200 && step == 2 {
                            step = 3;
                            replies.extend([
                                json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1100, "item_id": "b0"}),
                                json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": "b0", "content_index": 0, "delta": "sec"}),
                            ]);
                        }
                        if ms >= 1_600 {
                            drop_connection(&mut ws).await;
                            break;
                        }
                    } else {
                        if ms >= 300 && step == 0 {
                            step = 1;
                            replies.extend([
                                json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "c1"}),
                                json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": "c1", "content_index": 0, "delta": "second"}),
                            ]);
                        }
                        if ms >= 600 && step == 1 {
                            step = 2;
                            replies.extend([
                                json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 500, "item_id": "c1"}),
                                json!({"type": "input_audio_buffer.committed", "item_id": "c1", "previous_item_id": null}),
                                json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "c1", "content_index": 0, "transcript": "second"}),
                            ]);
                        }
                    }
                }
                "input_audio_buffer.commit" => replies.extend([
                    json!({"type": "input_audio_buffer.committed", "item_id": "d1", "previous_item_id": "c1"}),
                    json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "d1", "content_index": 0, "transcript": "third"}),
                ]),
                _ => {}
            }
            for reply in replies {
                ws.send(event(reply)).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn openai_realtime_upstream_relays_items_and_survives_a_drop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let fake = tokio::spawn(fake_openai(listener, log.clone()));
    let (server, _config) = server_with_backend(
        "rt",
        &format!(
            "kind = \"openai_realtime\"\nurl = \"ws://{addr}/v1/realtime\"\napi_key = \"{KEY}\"\nquery = {{ model = \"gpt-4o-mini-transcribe\", language = \"en\", silence_duration_ms = 400 }}\n"
        ),
    );
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=rt&interim=true",
    )
    .await;
    client.expect("started").await;
    let samples = ramp(3.0);
    client.send_chunks(&s16_bytes(&samples), 640).await;

    let first = until_final(&mut client, 0).await;
    let texts: Vec<&str> = first.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["fir", "first", "first"], "{first:#?}");
    assert_final(&first[2], 0, "first", 0.2, 0.7, 0.001);
    // Item b0 (from 1.1 s) was cut by the drop; connection 2 replays from
    // 1.1 s, and its item c1 (its 0-0.5 s) continues utterance 1.
    let second = until_final(&mut client, 1).await;
    assert_eq!(second[0]["text"], "sec", "{second:#?}");
    assert_near(&second[0]["start"], 1.1, 0.001, &second[0]);
    assert_final(second.last().unwrap(), 1, "second", 1.1, 1.6, 0.001);
    // Let the rest of the audio reach the upstream, then flush: a commit,
    // answered by an item of the audio after c1 (1.6 s to the end).
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.send_json(json!({"type": "flush"})).await;
    let third = until_final(&mut client, 2).await;
    assert_final(third.last().unwrap(), 2, "third", 1.6, 3.0, 0.02);
    let t = client.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    fake.abort();

    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:#?}");
    for conn in &log {
        assert_eq!(conn.auth, format!("Bearer {KEY}"));
        assert!(
            conn.path_and_query.starts_with("/v1/realtime?"),
            "{}",
            conn.path_and_query
        );
        assert!(
            conn.query_has("intent=transcription"),
            "{}",
            conn.path_and_query
        );
        let update: Value = serde_json::from_str(&conn.texts[0]).unwrap();
        assert_eq!(update["type"], "session.update");
        let session = &update["session"];
        assert_eq!(session["type"], "transcription");
        let input = &session["audio"]["input"];
        assert_eq!(input["format"], json!({"type": "audio/pcm", "rate": 24000}));
        assert_eq!(
            input["transcription"],
            json!({"model": "gpt-4o-mini-transcribe", "language": "en"})
        );
        assert_eq!(
            input["turn_detection"],
            json!({"type": "server_vad", "silence_duration_ms": 400})
        );
    }
    assert_eq!(
        log[1].texts[1..],
        [r#"{"type":"input_audio_buffer.commit"}"#]
    );
    // 24 kHz, resampled from the client's 16 kHz: the ramp's steps keep
    // their values, so positions can still be read off the samples.
    let position = position_s(log[1].audio[0][12]);
    assert!(
        (position - 1.1).abs() <= 0.011,
        "the replay starts at {position} s"
    );
    let tail_frames = log[1].frames() as f64;
    assert!(
        (tail_frames - 1.9 * 24_000.0).abs() <= 240.0,
        "connection 2 got {tail_frames} frames, not 1.9 s"
    );
    assert_recording_exact(&server, &t, &samples);
}

// ------------------------------------------------------------------ outages

#[tokio::test]
async fn an_upstream_that_stays_down_is_reported_while_the_stream_runs() {
    // A port where nothing listens: every connection attempt is refused.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (server, _config) = server_with_backend(
        "down",
        &format!("kind = \"vosk\"\nurl = \"ws://{addr}\"\nreplay_buffer_ms = 1000\n"),
    );
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&transcribe=down",
    )
    .await;
    client.expect("started").await;
    let samples = ramp(3.0);
    client.send_chunks(&s16_bytes(&samples), 640).await;
    // The replay buffer holds 1 s: the first 2 s are reported as lost while
    // the stream still runs, not only at its end.
    let lost = loop {
        let message = client.next_message().await;
        if message["type"] == "error" {
            break message;
        }
    };
    assert_eq!(lost["code"], "transcribe_failed", "{lost}");
    assert_eq!(lost["fatal"], false, "{lost}");
    assert_near(&lost["start"], 0.0, 0.001, &lost);
    assert_near(&lost["end"], 2.0, 0.001, &lost);
    assert!(
        lost["message"]
            .as_str()
            .unwrap()
            .contains("older than the replay buffer while the upstream connection was down"),
        "{lost}"
    );
    let t = client.stop().await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);
    // The rest is reported at the end, and the recording is whole.
    let rest: Vec<&Value> = t.of_type("error");
    assert_eq!(rest.len(), 2, "{:#?}", t.messages);
    assert_near(&rest[1]["start"], 2.0, 0.001, rest[1]);
    assert_near(&rest[1]["end"], 3.0, 0.001, rest[1]);
    assert_recording_exact(&server, &t, &samples);
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains(
            r#"cochlea_transcribe_upstream_connects_total{backend="down",outcome="failed"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cochlea_transcribe_upstream_lost_spans_total{backend="down"} 2"#),
        "{metrics}"
    );
}
