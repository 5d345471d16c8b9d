//! Transcripts through each dialect, with the scripted HTTP backend
//! (`stt_stub`) as the server's default backend (`--transcribe-url`):
//! Deepgram's Results/SpeechStarted/UtteranceEnd, mod_audio_fork's
//! `transcription` frames; Twilio and Vonage have no channel for them, so
//! there the test checks that the call's audio was transcribed and that
//! nothing was sent on the socket.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::dialect_client::*;
use crate::dialect_deepgram::{token_header, KEY};
use crate::harness::*;
use crate::stt_stub::{Received, Reply, Stub};

/// The utterance a request is for, from the uploaded file's name
/// (`<session>-<utterance>.wav`).
fn utterance_of(request: &Received) -> u64 {
    let body = String::from_utf8_lossy(&request.body);
    body.split("filename=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|name| name.trim_end_matches(".wav").rsplit('-').next())
        .and_then(|id| id.parse().ok())
        .expect("a file name <session>-<utterance>.wav")
}

async fn stub() -> Stub {
    Stub::start(|_, request| Reply::text(&format!("words of utterance {}", utterance_of(request))))
        .await
}

fn server_with(stub: &Stub, api_key: bool) -> Server {
    // The calls are sent as fast as the socket takes them, which is more
    // than the default real-time allowance (a 10 s burst, then 4x): these
    // tests are about the dialects' frames, not pacing, and one of them
    // checks that nothing but transcription frames arrives.
    let mut args = vec![
        "--transcribe-url",
        stub.url.as_str(),
        "--max-realtime-factor",
        "0",
    ];
    if api_key {
        args.extend_from_slice(&["--api-key", KEY]);
    }
    Server::start_with(&args, &[])
}

/// Two copies of the 16 kHz sentence, with silence around them.
fn two_utterances_16k() -> Vec<i16> {
    padded(
        &read_wav_i16(&fixture("speech-16k.wav")).samples,
        16_000,
        2,
        1.2,
    )
}

#[tokio::test]
async fn deepgram_gets_results_speech_started_and_utterance_end_in_its_shapes() {
    let stub = stub().await;
    let server = server_with(&stub, true);
    let samples = two_utterances_16k();
    let (name, value) = token_header();
    let mut client = DialectClient::connect(
        &server,
        "/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&vad_events=true&utterance_end_ms=1000&interim_results=true",
        &[(name, &value)],
    )
    .await;
    for frame in s16_bytes(&samples).chunks(640) {
        client.send_binary(frame).await;
    }
    client.send_json(&json!({"type": "CloseStream"})).await;
    let frames = client.finish().await;
    frames.assert_closed(1000, "stop");
    // Partials (interim_results=true) may come or not at this speed: they
    // have a test of their own below.
    let messages: Vec<Value> = frames
        .json()
        .into_iter()
        .filter(|m| m["is_final"] != false)
        .collect();
    let types: Vec<&str> = messages
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    // Audio goes in faster than real time, so the second utterance may
    // start before the first one's text is back; but each UtteranceEnd
    // comes right after its Results, and Metadata last.
    let without_starts: Vec<&str> = types
        .iter()
        .copied()
        .filter(|t| *t != "SpeechStarted")
        .collect();
    assert_eq!(
        without_starts,
        [
            "Results",
            "UtteranceEnd",
            "Results",
            "UtteranceEnd",
            "Metadata"
        ],
        "{messages:#?}"
    );
    assert_eq!(types[0], "SpeechStarted");
    assert_eq!(types.iter().filter(|t| **t == "SpeechStarted").count(), 2);
    let speech_started: Vec<f64> = messages
        .iter()
        .filter(|m| m["type"] == "SpeechStarted")
        .map(|m| {
            assert_eq!(m["channel"], json!([0, 1]));
            m["timestamp"].as_f64().unwrap()
        })
        .collect();
    let results: Vec<&Value> = messages.iter().filter(|m| m["type"] == "Results").collect();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r["channel"]["alternatives"][0]["transcript"],
            format!("words of utterance {i}")
        );
        assert_eq!(r["channel_index"], json!([0, 1]));
        assert_eq!(r["is_final"], true);
        assert_eq!(r["speech_final"], true);
        assert!(r["start"].as_f64().unwrap() >= 0.0);
        assert!(r["duration"].as_f64().unwrap() > 1.0, "a whole sentence");
        let start = r["start"].as_f64().unwrap();
        assert!(
            speech_started[i] >= start
                && speech_started[i] < start + r["duration"].as_f64().unwrap(),
            "speech of utterance {i} starts inside its result"
        );
        assert_eq!(r["metadata"]["model_info"]["name"], "default");
        assert!(r["metadata"]["request_id"].as_str().is_some());
    }
    // Each UtteranceEnd follows its Results, and speech ends inside it.
    for (i, m) in messages.iter().enumerate() {
        if m["type"] == "UtteranceEnd" {
            let r = &messages[i - 1];
            let start = r["start"].as_f64().unwrap();
            let end = start + r["duration"].as_f64().unwrap();
            let last = m["last_word_end"].as_f64().unwrap();
            assert!(last > start && last <= end, "{last} outside {start}..{end}");
        }
    }
    let metadata = messages.last().unwrap();
    assert_eq!(metadata["models"].as_array().unwrap().len(), 1);
    let finals = stub
        .requests()
        .iter()
        .filter(|r| r.response_format() == "verbose_json")
        .count();
    assert_eq!(finals, 2);
}

#[tokio::test]
async fn deepgram_interim_results_get_partials_then_finals_with_words() {
    let stub = Stub::start(|_, request| crate::interim::engine(request)).await;
    let server = server_with(&stub, true);
    let (name, value) = token_header();
    let mut client = DialectClient::connect(
        &server,
        "/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&interim_results=true&vad_events=true&utterance_end_ms=1000",
        &[(name, &value)],
    )
    .await;
    // Twice real time, in 20 ms messages, as a live microphone would (faster).
    for frame in s16_bytes(&crate::interim::one_sentence()).chunks(640) {
        client.send_binary(frame).await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    client.send_json(&json!({"type": "CloseStream"})).await;
    let frames = client.finish().await;
    frames.assert_closed(1000, "stop");
    let messages = frames.json();
    let kinds: Vec<String> = messages
        .iter()
        .map(
            |m| match (m["type"].as_str().unwrap(), m["is_final"].as_bool()) {
                ("Results", Some(false)) => "partial".to_owned(),
                ("Results", Some(true)) => "final".to_owned(),
                (other, _) => other.to_owned(),
            },
        )
        .collect();
    let first_final = kinds.iter().position(|k| k == "final").expect("a final");
    assert_eq!(kinds[0], "SpeechStarted", "{kinds:?}");
    assert!(
        kinds[..first_final]
            .iter()
            .filter(|k| *k == "partial")
            .count()
            >= 2,
        "two partials before the final: {kinds:?}"
    );
    assert_eq!(
        kinds[first_final..],
        ["final", "UtteranceEnd", "Metadata"],
        "{kinds:?}"
    );
    for partial in messages.iter().filter(|m| m["is_final"] == false) {
        assert_eq!(partial["speech_final"], false);
        assert_eq!(partial["from_finalize"], false);
        let alternative = &partial["channel"]["alternatives"][0];
        assert!(alternative["transcript"]
            .as_str()
            .is_some_and(|t| !t.is_empty()));
    }
    let final_ = &messages[first_final];
    assert_eq!(final_["speech_final"], true);
    let alternative = &final_["channel"]["alternatives"][0];
    assert_eq!(alternative["transcript"], crate::interim::SENTENCE);
    let start = final_["start"].as_f64().unwrap();
    let end = start + final_["duration"].as_f64().unwrap();
    let words = alternative["words"].as_array().unwrap();
    assert_eq!(words.len(), 10);
    for word in words {
        let (s, e) = (
            word["start"].as_f64().unwrap(),
            word["end"].as_f64().unwrap(),
        );
        assert!(
            start - 1e-3 <= s && s <= e && e <= end + 1e-3,
            "{word} outside {start}..{end}"
        );
        assert_eq!(word["confidence"], 0.9);
        assert_eq!(word["punctuated_word"], word["word"]);
    }
    let utterance_end = &messages[first_final + 1];
    assert!(utterance_end["last_word_end"].as_f64().unwrap() <= end + 1e-3);
}

#[tokio::test]
async fn audiofork_gets_transcription_frames_while_the_call_goes_on() {
    let stub = stub().await;
    let server = server_with(&stub, false);
    let samples = two_utterances_16k();
    let mut client = DialectClient::connect(
        &server,
        "/audiofork?mix_type=mono&sampling_rate=16k",
        &[("sec-websocket-protocol", "audio.drachtio.org")],
    )
    .await;
    client.send_text(r#"{"callid":"abc"}"#).await;
    for frame in s16_bytes(&samples).chunks(640) {
        client.send_binary(frame).await;
    }
    // The voice detector ends both utterances within the audio sent, so
    // their transcripts come while the fork is still streaming.
    let mut texts = BTreeSet::new();
    while texts.len() < 2 {
        let frame: Value = serde_json::from_str(&client.next_text().await).unwrap();
        assert_eq!(frame["type"], "transcription", "{frame}");
        let data = &frame["data"];
        assert_eq!(data["final"], true);
        assert_eq!(data["channel"], 0);
        assert!(data["end"].as_f64() > data["start"].as_f64());
        texts.insert(data["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        texts,
        BTreeSet::from([
            "words of utterance 0".to_owned(),
            "words of utterance 1".to_owned()
        ])
    );
    client.hang_up().await;
}

#[tokio::test]
async fn twilio_and_vonage_calls_are_transcribed_with_nothing_sent_back() {
    let stub = stub().await;
    let server = server_with(&stub, false);

    // Twilio: the 8 kHz sentence as μ-law, twice, with μ-law silence around.
    let coded = wav_data_chunk(&fixture("speech-8k-mulaw.wav"));
    let silence = |seconds: f64| vec![0xFFu8; (seconds * 8000.0) as usize];
    let call = [
        silence(0.5),
        coded.clone(),
        silence(1.2),
        coded,
        silence(1.2),
    ]
    .concat();
    let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
    crate::dialect_twilio::stream_one_track(&mut client, &call).await;
    let frames = client.finish().await;
    frames.assert_closed(1000, "stop");
    assert!(frames.texts.is_empty());
    // `closed` (and so the close frame) waits for the transcripts.
    assert_eq!(stub.requests().len(), 2, "both utterances transcribed");

    // Vonage: the 16 kHz sentence, twice.
    let mut client = DialectClient::connect(&server, "/vonage", &[]).await;
    client
        .send_json(&json!({"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}))
        .await;
    for frame in s16_bytes(&two_utterances_16k()).chunks(640) {
        client.send_binary(frame).await;
    }
    // Wait for the backend to have been asked before hanging up.
    let deadline = std::time::Instant::now() + WAIT;
    while stub.requests().len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "vonage audio never transcribed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let frames = client.hang_up().await;
    assert!(frames.texts.is_empty(), "{:#?}", frames.texts);
    // `transcribe=none` turns it off, from the URL as on /v1/stream.
    wait_recordings(&server, 2);
    let before = stub.requests().len();
    let mut client = DialectClient::connect(&server, "/vonage?transcribe=none", &[]).await;
    client
        .send_json(&json!({"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}))
        .await;
    for frame in s16_bytes(&two_utterances_16k()).chunks(640) {
        client.send_binary(frame).await;
    }
    client.hang_up().await;
    wait_recordings(&server, 3);
    assert_eq!(stub.requests().len(), before);
}
