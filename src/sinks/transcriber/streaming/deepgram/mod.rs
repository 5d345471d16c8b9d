//! Kind `deepgram`: Deepgram's live `/v1/listen` WebSocket (Deepgram itself,
//! or another cochlea's `/v1/listen`). The whole session goes up one
//! connection as `linear16` (`channels=N&multichannel=true`); results come
//! back as `Results` with `start`, `duration`, `is_final` and words.
//!
//! `KeepAlive` when idle (Deepgram closes after 10 s without audio),
//! `Finalize` on flush, `CloseStream` at the end, after which the upstream
//! sends its last results and closes.

use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

use super::{
    control, request_to, url_with_query, Heard, HeardWord, Protocol, Reply, Setup, StreamError,
    StreamingKind,
};

pub static KIND: StreamingKind = StreamingKind {
    name: "deepgram",
    own_query_keys: &[
        "encoding",
        "sample_rate",
        "channels",
        "multichannel",
        "interim_results",
    ],
    query_keys: None,
    mono: false,
    sample_rate: 16_000,
    min_chunk_ms: 0,
    protocol: || Box::new(Deepgram),
};

struct Deepgram;

impl Protocol for Deepgram {
    fn request(&self, setup: &Setup) -> Result<Request, StreamError> {
        let flag = |on: bool| if on { "true" } else { "false" }.to_owned();
        let url = url_with_query(
            setup,
            &[
                ("encoding", "linear16".to_owned()),
                ("sample_rate", setup.sample_rate.to_string()),
                ("channels", setup.channels.to_string()),
                ("multichannel", flag(setup.channels > 1)),
                ("interim_results", flag(setup.interim)),
            ],
        );
        request_to(url, setup, "Token")
    }

    fn opened(&mut self, _setup: &Setup) -> Vec<Message> {
        Vec::new()
    }

    fn audio(&mut self, bytes: Vec<u8>, _frames: u64) -> Message {
        Message::binary(bytes)
    }

    fn keepalive(&self) -> Option<Message> {
        Some(control("KeepAlive"))
    }

    fn finalize(&mut self) -> Vec<Message> {
        vec![control("Finalize")]
    }

    fn close(&mut self) -> Vec<Message> {
        vec![control("CloseStream")]
    }

    fn on_text(&mut self, text: &str) -> Vec<Reply> {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return vec![Reply::Error("upstream sent text that is not JSON".into())];
        };
        match value.get("type").and_then(Value::as_str) {
            Some("Results") => match serde_json::from_value::<Results>(value) {
                Ok(results) => vec![Reply::Heard(heard(results))],
                Err(e) => vec![Reply::Error(format!("Results unreadable: {e}"))],
            },
            Some("Error") => vec![Reply::Error(text.to_owned())],
            _ => Vec::new(),
        }
    }
}

fn heard(results: Results) -> Heard {
    let alternative = results.channel.alternatives.into_iter().next();
    let (text, words) = match alternative {
        Some(a) => (
            a.transcript,
            a.words
                .into_iter()
                .map(|w| HeardWord {
                    word: w.punctuated_word.unwrap_or(w.word),
                    start_s: w.start,
                    end_s: w.end,
                    confidence: w.confidence,
                })
                .collect(),
        ),
        None => (String::new(), Vec::new()),
    };
    Heard {
        key: None,
        channel: results.channel_index.first().copied().unwrap_or(0),
        start_s: results.start,
        end_s: results.start + results.duration.max(0.0),
        text,
        is_final: results.is_final,
        words,
    }
}

/// Upstream `Results`, as far as they are used.
#[derive(Debug, Deserialize)]
struct Results {
    #[serde(default)]
    channel_index: Vec<u16>,
    #[serde(default)]
    start: f64,
    #[serde(default)]
    duration: f64,
    #[serde(default)]
    is_final: bool,
    channel: ResultChannel,
}

#[derive(Debug, Deserialize)]
struct ResultChannel {
    #[serde(default)]
    alternatives: Vec<Alternative>,
}

#[derive(Debug, Deserialize)]
struct Alternative {
    #[serde(default)]
    transcript: String,
    #[serde(default)]
    words: Vec<UpstreamWord>,
}

#[derive(Debug, Deserialize)]
struct UpstreamWord {
    word: String,
    start: f64,
    end: f64,
    confidence: Option<f64>,
    punctuated_word: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_heard_with_punctuated_words_and_their_channel() {
        let mut deepgram = Deepgram;
        let replies = deepgram.on_text(
            r#"{"type":"Results","channel_index":[1,2],"start":1.5,"duration":0.75,"is_final":true,
                "channel":{"alternatives":[{"transcript":"hello there","confidence":0.9,
                "words":[{"word":"hello","start":1.5,"end":1.8,"confidence":0.9,"punctuated_word":"Hello"},
                         {"word":"there","start":1.9,"end":2.2}]}]}}"#,
        );
        let [Reply::Heard(heard)] = replies.as_slice() else {
            panic!("{replies:?}");
        };
        assert_eq!(heard.channel, 1);
        assert_eq!((heard.start_s, heard.end_s), (1.5, 2.25));
        assert!(heard.is_final);
        assert_eq!(heard.words[0].word, "Hello");
        assert_eq!(heard.words[1].confidence, None);
        assert_eq!(deepgram.on_text(r#"{"type":"Metadata"}"#), Vec::new());
        assert!(matches!(
            deepgram.on_text("nope").as_slice(),
            [Reply::Error(_)]
        ));
    }
}
