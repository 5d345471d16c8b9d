//! Kind `assemblyai`: AssemblyAI's universal streaming API, v3
//! (`wss://streaming.assemblyai.com/v3/ws`). One channel per connection,
//! s16le at 16 kHz in messages of at least 50 ms (the API refuses shorter
//! ones), the key as `Authorization: <key>`.
//!
//! The server opens with `Begin`, then sends a `Turn` per update: its
//! `words` carry times in milliseconds of the connection and
//! `word_is_final`; `end_of_turn` ends it. With `format_turns=true` in the
//! query, the final is the second end-of-turn message, the formatted one
//! (`turn_is_formatted`). `ForceEndpoint` on flush, `Terminate` at the end,
//! after which the server sends its last turn and `Termination`.

use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

use super::{
    control, request_to, url_with_query, Heard, HeardWord, Protocol, Reply, Setup, StreamError,
    StreamingKind,
};

pub static KIND: StreamingKind = StreamingKind {
    name: "assemblyai",
    own_query_keys: &["sample_rate", "encoding"],
    query_keys: None,
    mono: true,
    sample_rate: 16_000,
    min_chunk_ms: 50,
    protocol: || Box::<AssemblyAi>::default(),
};

#[derive(Default)]
struct AssemblyAi {
    /// `format_turns=true` was asked for: finals are the formatted turns.
    formatted: bool,
    /// The turn that has had updates and no final.
    open_turn: Option<u64>,
}

impl Protocol for AssemblyAi {
    fn request(&self, setup: &Setup) -> Result<Request, StreamError> {
        let url = url_with_query(
            setup,
            &[
                ("sample_rate", setup.sample_rate.to_string()),
                ("encoding", "pcm_s16le".to_owned()),
            ],
        );
        request_to(url, setup, "")
    }

    fn opened(&mut self, setup: &Setup) -> Vec<Message> {
        self.formatted = setup
            .backend
            .streaming_query()
            .iter()
            .any(|(key, value)| key == "format_turns" && value == "true");
        self.open_turn = None;
        Vec::new()
    }

    fn audio(&mut self, bytes: Vec<u8>, _frames: u64) -> Message {
        Message::binary(bytes)
    }

    fn keepalive(&self) -> Option<Message> {
        Some(control("KeepAlive"))
    }

    fn finalize(&mut self) -> Vec<Message> {
        vec![control("ForceEndpoint")]
    }

    fn close(&mut self) -> Vec<Message> {
        vec![control("Terminate")]
    }

    fn on_text(&mut self, text: &str) -> Vec<Reply> {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return vec![Reply::Error("upstream sent text that is not JSON".into())];
        };
        match value.get("type").and_then(Value::as_str) {
            Some("Turn") => match serde_json::from_value::<Turn>(value) {
                Ok(turn) => self.turn(turn),
                Err(e) => vec![Reply::Error(format!("Turn unreadable: {e}"))],
            },
            Some("Termination") => vec![Reply::Drained],
            Some("Begin") => Vec::new(),
            _ if value.get("error").is_some() => vec![Reply::Error(text.to_owned())],
            _ => Vec::new(),
        }
    }
}

impl AssemblyAi {
    fn turn(&mut self, turn: Turn) -> Vec<Reply> {
        let mut replies = Vec::new();
        let first_start_s = turn.words.first().map(|w| ms(w.start));
        if self.open_turn != Some(turn.turn_order) {
            // A new turn: the audio before its first word held no speech
            // that an earlier turn did not have.
            if self.open_turn.is_none() {
                if let Some(start) = first_start_s {
                    replies.push(Reply::Covered(start));
                }
            }
            self.open_turn = Some(turn.turn_order);
        }
        let is_final = turn.end_of_turn && (turn.turn_is_formatted || !self.formatted);
        if is_final {
            self.open_turn = None;
        }
        // A partial shows every word heard so far; a final its transcript.
        let text = if is_final || turn.words.is_empty() {
            turn.transcript.clone()
        } else {
            let words: Vec<&str> = turn.words.iter().map(|w| w.text.as_str()).collect();
            words.join(" ")
        };
        let start_s = first_start_s.unwrap_or(0.0);
        let end_s = turn.words.last().map_or(start_s, |w| ms(w.end));
        replies.push(Reply::Heard(Heard {
            key: Some(turn.turn_order.to_string()),
            channel: 0,
            start_s,
            end_s,
            text,
            is_final,
            words: if is_final {
                turn.words
                    .into_iter()
                    .map(|w| HeardWord {
                        word: w.text,
                        start_s: ms(w.start),
                        end_s: ms(w.end),
                        confidence: w.confidence,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }));
        replies
    }
}

/// Milliseconds as the peer sent them, to seconds.
fn ms(value: f64) -> f64 {
    value / 1000.0
}

#[derive(Debug, Deserialize)]
struct Turn {
    #[serde(default)]
    turn_order: u64,
    #[serde(default)]
    turn_is_formatted: bool,
    #[serde(default)]
    end_of_turn: bool,
    #[serde(default)]
    transcript: String,
    #[serde(default)]
    words: Vec<TurnWord>,
}

#[derive(Debug, Deserialize)]
struct TurnWord {
    text: String,
    start: f64,
    end: f64,
    confidence: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(order: u64, end: bool, formatted: bool, transcript: &str) -> String {
        serde_json::json!({
            "type": "Turn", "turn_order": order, "end_of_turn": end,
            "turn_is_formatted": formatted, "transcript": transcript,
            "end_of_turn_confidence": 0.5,
            "words": [
                {"text": "hello", "start": 1200, "end": 1500, "confidence": 0.9, "word_is_final": true},
                {"text": "world", "start": 1600, "end": 1900, "confidence": 0.8, "word_is_final": end}
            ]
        })
        .to_string()
    }

    fn heard(replies: &[Reply]) -> &Heard {
        replies
            .iter()
            .find_map(|r| match r {
                Reply::Heard(h) => Some(h),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn turns_become_partials_then_a_final_in_seconds() {
        let mut protocol = AssemblyAi::default();
        let replies = protocol.on_text(&turn(0, false, false, "hello"));
        // A new turn covers the silence before its first word.
        assert_eq!(replies[0], Reply::Covered(1.2));
        let partial = heard(&replies);
        assert_eq!(partial.text, "hello world");
        assert!(!partial.is_final);
        assert_eq!((partial.start_s, partial.end_s), (1.2, 1.9));
        assert_eq!(partial.key.as_deref(), Some("0"));
        let replies = protocol.on_text(&turn(0, true, false, "hello world"));
        assert_eq!(replies.len(), 1);
        let last = heard(&replies);
        assert!(last.is_final);
        assert_eq!(last.words.len(), 2);
        assert_eq!(last.words[1].start_s, 1.6);
        assert_eq!(
            protocol.on_text(r#"{"type":"Termination","audio_duration_seconds":3}"#),
            vec![Reply::Drained]
        );
    }

    #[test]
    fn with_formatted_turns_the_formatted_one_is_the_final() {
        let mut protocol = AssemblyAi {
            formatted: true,
            ..AssemblyAi::default()
        };
        assert!(!heard(&protocol.on_text(&turn(3, true, false, "hello world"))).is_final);
        let last = protocol.on_text(&turn(3, true, true, "Hello world."));
        assert!(heard(&last).is_final);
        assert_eq!(heard(&last).text, "Hello world.");
        assert!(matches!(
            protocol.on_text(r#"{"error":"bad audio"}"#).as_slice(),
            [Reply::Error(_)]
        ));
    }
}
