//! Kind `vosk`: vosk-server's WebSocket protocol (`ws://host:2700`). One
//! channel per connection; the first message is the configuration
//! (`{"config":{"sample_rate":16000,"words":1}}`), then binary s16le.
//!
//! The server answers every audio message with exactly one reply: a
//! partial (`{"partial": "..."}`) or, at an endpoint, a result
//! (`{"result": [{"word","start","end","conf"}], "text": "..."}`). So the
//! protocol knows how far the audio behind each reply reaches: a result
//! covers its audio, and an empty partial with no utterance open says the
//! audio so far held no speech. The end is the text `{"eof" : 1}`, exactly
//! (the server compares the string), answered by the last result. vosk
//! has no flush and no keepalive.

use std::collections::VecDeque;

use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

use super::{
    request_to, seconds_of, Heard, HeardWord, Protocol, Reply, Setup, StreamError, StreamingKind,
};

const SAMPLE_RATE: u32 = 16_000;

pub static KIND: StreamingKind = StreamingKind {
    name: "vosk",
    own_query_keys: &[],
    query_keys: Some(&[]),
    mono: true,
    sample_rate: SAMPLE_RATE,
    min_chunk_ms: 100,
    protocol: || Box::<Vosk>::default(),
};

#[derive(Default)]
struct Vosk {
    sent_frames: u64,
    /// Where the audio of each unanswered message ends (connection frames).
    unanswered: VecDeque<u64>,
    /// The end of the audio behind the latest reply.
    answered_to: u64,
    /// Where the current utterance starts: the last result's audio end.
    utterance_from: u64,
    /// Partials with words since the last result.
    speaking: bool,
    eof_sent: bool,
}

impl Protocol for Vosk {
    fn request(&self, setup: &Setup) -> Result<Request, StreamError> {
        request_to(setup.backend.streaming_url().clone(), setup, "Bearer")
    }

    fn opened(&mut self, setup: &Setup) -> Vec<Message> {
        *self = Self::default();
        let config = serde_json::json!({
            "config": {"sample_rate": setup.sample_rate, "words": 1}
        });
        vec![Message::text(config.to_string())]
    }

    fn audio(&mut self, bytes: Vec<u8>, frames: u64) -> Message {
        self.sent_frames += frames;
        self.unanswered.push_back(self.sent_frames);
        Message::binary(bytes)
    }

    fn keepalive(&self) -> Option<Message> {
        None
    }

    fn finalize(&mut self) -> Vec<Message> {
        Vec::new()
    }

    fn close(&mut self) -> Vec<Message> {
        self.eof_sent = true;
        self.unanswered.push_back(self.sent_frames);
        vec![Message::text(r#"{"eof" : 1}"#)]
    }

    fn on_text(&mut self, text: &str) -> Vec<Reply> {
        let reply: VoskReply =
            match serde_json::from_str::<Value>(text).and_then(serde_json::from_value) {
                Ok(reply) => reply,
                Err(_) => {
                    return vec![Reply::Error(
                        "upstream sent a reply that is not vosk's".into(),
                    )]
                }
            };
        if let Some(end) = self.unanswered.pop_front() {
            self.answered_to = end;
        }
        let to = seconds_of(self.answered_to, SAMPLE_RATE);
        let from = seconds_of(self.utterance_from, SAMPLE_RATE);
        let mut replies = Vec::new();
        if let Some(partial) = reply.partial {
            if partial.trim().is_empty() && !self.speaking {
                replies.push(Reply::Covered(to));
            } else {
                self.speaking = true;
                replies.push(Reply::Heard(Heard {
                    channel: 0,
                    start_s: from,
                    end_s: to,
                    text: partial,
                    ..Heard::default()
                }));
            }
        } else if let Some(text) = reply.text {
            let words: Vec<HeardWord> = reply
                .result
                .into_iter()
                .map(|w| HeardWord {
                    word: w.word,
                    start_s: w.start,
                    end_s: w.end,
                    confidence: w.conf,
                })
                .collect();
            let start_s = words.first().map_or(from, |w| w.start_s);
            let end_s = words.last().map_or(to, |w| w.end_s);
            replies.push(Reply::Heard(Heard {
                channel: 0,
                start_s,
                end_s,
                text,
                is_final: true,
                words,
                ..Heard::default()
            }));
            replies.push(Reply::Covered(to));
            self.utterance_from = self.answered_to;
            self.speaking = false;
            if self.eof_sent && self.unanswered.is_empty() {
                replies.push(Reply::Drained);
            }
        } else {
            return vec![Reply::Error(
                "upstream reply has neither partial nor text".into(),
            )];
        }
        replies
    }
}

#[derive(Debug, Deserialize)]
struct VoskReply {
    partial: Option<String>,
    text: Option<String>,
    #[serde(default)]
    result: Vec<VoskWord>,
}

#[derive(Debug, Deserialize)]
struct VoskWord {
    word: String,
    start: f64,
    end: f64,
    conf: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reply_answers_one_message_and_results_cover_their_audio() {
        let mut vosk = Vosk::default();
        vosk.audio(vec![0; 3200], 1600);
        vosk.audio(vec![0; 3200], 1600);
        vosk.audio(vec![0; 3200], 1600);
        // Silence so far: covered.
        assert_eq!(
            vosk.on_text(r#"{"partial" : ""}"#),
            vec![Reply::Covered(0.1)]
        );
        let replies = vosk.on_text(r#"{"partial" : "one"}"#);
        let [Reply::Heard(partial)] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert_eq!(
            (partial.start_s, partial.end_s, partial.is_final),
            (0.0, 0.2, false)
        );
        let replies = vosk.on_text(
            r#"{"result" : [{"conf": 1.0, "end": 0.27, "start": 0.12, "word": "one"}], "text" : "one"}"#,
        );
        let [Reply::Heard(last), Reply::Covered(covered)] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert!(last.is_final);
        assert_eq!((last.start_s, last.end_s, *covered), (0.12, 0.27, 0.3));
        // The end: the reply to eof is the last result.
        vosk.close();
        let replies = vosk.on_text(r#"{"text" : ""}"#);
        assert_eq!(replies.last(), Some(&Reply::Drained));
        assert!(matches!(vosk.on_text("{}").as_slice(), [Reply::Error(_)]));
    }
}
