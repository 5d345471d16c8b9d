//! Partial transcripts and word timings through the real server, with the
//! scripted OpenAI-compatible stub (`stt_stub`) as its backend: partials of
//! a long utterance before its final, whose stable text only grows; finals
//! with words in stream time inside their utterance; the fallback from
//! verbose_json to json, remembered for the backend; partials shed, never
//! finals, when the server-wide interim budget is used up.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{fixture, read_wav_i16, s16_bytes, Client, Server, Transcript};
use crate::stt_stub::{Received, Reply, Stub};

pub const SENTENCE: &str = "the quick brown fox jumps over the lazy dog today";

/// The stub's engine: plain `json` requests (partials) get a hypothesis
/// that grows with the audio, two words a second, its last word still wrong
/// ("fox" heard as "foxish"), as a streaming engine revises its tail;
/// `verbose_json` requests (finals) get the whole sentence with word times.
pub fn engine(request: &Received) -> Reply {
    let seconds = request.audio_seconds();
    if request.response_format() == "verbose_json" {
        return Reply::verbose(SENTENCE, seconds);
    }
    let words: Vec<&str> = SENTENCE.split_whitespace().collect();
    let heard = ((seconds * 2.0) as usize).clamp(1, words.len());
    let mut hypothesis: Vec<String> = words[..heard].iter().map(|w| (*w).to_owned()).collect();
    if heard < words.len() {
        if let Some(last) = hypothesis.last_mut() {
            last.push_str("ish");
        }
    }
    Reply::text(&hypothesis.join(" "))
}

/// Half a second of silence, the spoken sentence (4.8 s), then a second of
/// silence so that the utterance ends before the stream does.
pub fn one_sentence() -> Vec<i16> {
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut samples = vec![0i16; 8_000];
    samples.extend_from_slice(&speech);
    samples.extend(std::iter::repeat_n(0i16, 16_000));
    samples
}

/// Streams at twice real time in 20 ms messages (the backend sees the
/// utterance grow as it would live), then stops.
async fn stream_paced(server: &Server, query: &str, samples: &[i16]) -> Transcript {
    let mut client = Client::connect(server, query).await;
    client.expect("started").await;
    for chunk in s16_bytes(samples).chunks(640) {
        client.send_binary(chunk.to_vec()).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.stop().await
}

fn transcripts(t: &Transcript) -> Vec<&Value> {
    t.of_type("transcript")
}

fn partials(t: &Transcript) -> Vec<&Value> {
    transcripts(t)
        .into_iter()
        .filter(|m| m["is_final"] == false)
        .collect()
}

fn finals(t: &Transcript) -> Vec<&Value> {
    transcripts(t)
        .into_iter()
        .filter(|m| m["is_final"] == true)
        .collect()
}

fn metric(server: &Server, name: &str) -> f64 {
    let (_, text) = server.get("/metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

/// Every word of a final lies inside its utterance, in stream time, in order.
fn assert_words_inside(final_: &Value) {
    let (start, end) = (
        final_["start"].as_f64().unwrap(),
        final_["end"].as_f64().unwrap(),
    );
    let words = final_["words"].as_array().expect("a final with words");
    assert!(!words.is_empty(), "{final_}");
    let mut previous_start = start;
    for word in words {
        let (s, e) = (
            word["start"].as_f64().unwrap(),
            word["end"].as_f64().unwrap(),
        );
        assert!(
            start - 1e-6 <= s && s <= e && e <= end + 1e-6,
            "word {word} outside its utterance {start}..{end}"
        );
        assert!(s >= previous_start - 1e-6, "words out of order: {words:?}");
        previous_start = s;
    }
}

#[tokio::test]
async fn a_long_utterance_gets_partials_whose_stable_text_only_grows_then_a_final_with_words() {
    let stub = Stub::start(|_, request| engine(request)).await;
    let server = Server::start_with(&["--transcribe-url", stub.url.as_str()], &[]);
    let t = stream_paced(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&interim=true",
        &one_sentence(),
    )
    .await;
    assert_eq!(t.close_code(), 1000, "{:#?}", t.messages);

    let all = transcripts(&t);
    let last_final = all
        .iter()
        .position(|m| m["is_final"] == true)
        .expect("a final");
    let first = all[last_final]["utterance_id"].clone();
    let before: Vec<&&Value> = all[..last_final]
        .iter()
        .filter(|m| m["utterance_id"] == first)
        .collect();
    assert!(
        before.len() >= 2,
        "at least two partials before the final: {:#?}",
        t.messages
    );
    // Each partial: the whole hypothesis, its stable prefix, never final.
    let mut stable = String::new();
    for partial in &before {
        assert_eq!(partial["is_final"], false);
        assert_eq!(partial["final"], false);
        assert!(partial.get("words").is_none());
        let text = partial["text"].as_str().unwrap();
        let now = partial["stable_text"].as_str().unwrap();
        assert!(
            now.starts_with(stable.as_str()),
            "stable text shrank: {stable:?} then {now:?}"
        );
        assert!(text.starts_with(now), "{now:?} is not a prefix of {text:?}");
        assert!(
            !now.contains("ish"),
            "a revised word became stable: {now:?}"
        );
        stable = now.to_owned();
        // A partial covers the open utterance from its start.
        assert!(partial["end"].as_f64().unwrap() > partial["start"].as_f64().unwrap());
    }
    assert!(
        !stable.is_empty(),
        "two partials in a row agreed on a prefix: {before:#?}"
    );
    // The final: the whole sentence, words in stream time inside it.
    let final_ = all[last_final];
    assert_eq!(final_["text"], SENTENCE);
    assert_eq!(final_["final"], true);
    assert!(final_.get("stable_text").is_none());
    assert_words_inside(final_);
    let words = final_["words"].as_array().unwrap();
    assert_eq!(words.len(), 10);
    assert_eq!(words[0]["word"], "the");
    assert_eq!(words[0]["confidence"], 0.9);
    // Offset by the utterance's start (the stub times words from 0).
    assert_eq!(words[0]["start"], final_["start"]);
    // Partials come before their utterance's final, none after it.
    assert!(all[last_final..]
        .iter()
        .filter(|m| m["utterance_id"] == first)
        .all(|m| m["is_final"] == true));

    // Partials asked for plain json, finals for verbose_json with words.
    let requests = stub.requests();
    let (verbose, plain): (Vec<&Received>, Vec<&Received>) = requests
        .iter()
        .partition(|r| r.response_format() == "verbose_json");
    assert_eq!(verbose.len(), finals(&t).len());
    assert!(plain.len() >= before.len());
    for request in &verbose {
        assert_eq!(
            request
                .multipart_field("timestamp_granularities[]")
                .as_deref(),
            Some(&b"word"[..])
        );
    }
    assert!(metric(&server, "cochlea_transcribe_partials_total") >= 2.0);
}

#[tokio::test]
async fn without_interim_there_are_no_partials_and_nothing_extra_is_sent() {
    let stub = Stub::start(|_, request| engine(request)).await;
    let server = Server::start_with(&["--transcribe-url", stub.url.as_str()], &[]);
    let t = stream_paced(
        &server,
        "encoding=pcm_s16le&sample_rate=16000",
        &one_sentence(),
    )
    .await;
    assert!(partials(&t).is_empty(), "{:#?}", t.messages);
    assert_eq!(finals(&t).len(), 1);
    assert!(stub
        .requests()
        .iter()
        .all(|r| r.response_format() == "verbose_json"));
    // `interim` must be a boolean.
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&interim=soon").await;
    let error = client.expect("error").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("interim must be true or false"),
        "{error}"
    );
}

#[tokio::test]
async fn a_backend_that_refuses_verbose_json_gets_json_and_that_is_remembered() {
    let stub = Stub::start(|_, request| {
        if request.response_format() == "verbose_json" {
            Reply::status(
                400,
                r#"{"error":{"message":"response_format verbose_json is not supported"}}"#,
            )
        } else {
            Reply::text("plain words")
        }
    })
    .await;
    let server = Server::start_with(&["--transcribe-url", stub.url.as_str()], &[]);
    let mut samples = vec![0i16; 8_000];
    samples.extend_from_slice(&read_wav_i16(&fixture("speech-16k.wav")).samples);
    samples.extend(std::iter::repeat_n(0i16, 16_000));
    // Two sessions one after the other: the second one's request goes
    // straight to json, for what the first one learnt of the backend.
    for session in 0..2 {
        let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
        client.expect("started").await;
        client.send_chunks(&s16_bytes(&samples), 640).await;
        let t = client.stop().await;
        let finals = finals(&t);
        assert_eq!(finals.len(), 1, "session {session}: {:#?}", t.messages);
        assert_eq!(finals[0]["text"], "plain words");
        assert!(finals[0].get("words").is_none(), "json gives no timings");
        assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    }
    let formats: Vec<String> = stub
        .requests()
        .iter()
        .map(Received::response_format)
        .collect();
    assert_eq!(formats, ["verbose_json", "json", "json"]);
    assert!(
        server.log().contains("verbose_json"),
        "the fallback is logged"
    );
}

#[tokio::test]
async fn partials_are_shed_never_finals_when_the_interim_budget_is_used_up() {
    // Partials take 2.5 s; the server-wide budget is one at a time. Two
    // sessions speak at once: while one session's partial holds the budget,
    // the other's are shed. Finals need no budget and all arrive.
    let stub = Stub::start(|_, request| {
        let reply = engine(request);
        if request.response_format() == "verbose_json" {
            reply
        } else {
            reply.after(Duration::from_millis(2_500))
        }
    })
    .await;
    let server = Server::start_with(
        &[
            "--transcribe-url",
            stub.url.as_str(),
            "--transcribe-interim-max-concurrent-requests",
            "1",
        ],
        &[],
    );
    let samples = one_sentence();
    let query = "encoding=pcm_s16le&sample_rate=16000&interim=true";
    let (a, b) = tokio::join!(
        stream_paced(&server, query, &samples),
        stream_paced(&server, query, &samples)
    );
    for t in [&a, &b] {
        assert_eq!(t.close_code(), 1000);
        let finals = finals(t);
        assert_eq!(finals.len(), 1, "{:#?}", t.messages);
        assert_eq!(finals[0]["text"], SENTENCE);
        assert_words_inside(finals[0]);
        assert!(t.of_type("error").is_empty(), "{:#?}", t.messages);
    }
    let shed = metric(&server, "cochlea_transcribe_partials_shed_total");
    assert!(shed >= 1.0, "no partial was shed");
    // Never more than one partial in flight: the stub saw few of them.
    let plain = stub
        .requests()
        .iter()
        .filter(|r| r.response_format() == "json")
        .count();
    assert!(plain <= 3, "{plain} partial requests with a budget of one");
}
