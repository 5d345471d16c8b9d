//! Kind `openai_realtime`: OpenAI's realtime API in transcription mode
//! (`wss://api.openai.com/v1/realtime?intent=transcription`), or a server
//! speaking it. One channel per connection, s16le at 24 kHz (the only rate
//! of its `audio/pcm`), base64 in `input_audio_buffer.append` events, the
//! key as `Authorization: Bearer`.
//!
//! The connection opens with a `session.update` of type `transcription`
//! (model, language, prompt and server voice detection from `query`). The
//! server's detector cuts the audio into items: `speech_started` and
//! `speech_stopped` give an item's span in milliseconds of the connection,
//! `...input_audio_transcription.delta` its text as it comes (partials),
//! `...completed` its transcript (the final). A flush or the end commits
//! the buffer (`input_audio_buffer.commit`) when it holds at least 100 ms,
//! the least the server takes; at the end the link waits until every
//! committed item is transcribed, then closes.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

use super::{request_to, Heard, Protocol, Reply, Setup, StreamError, StreamingKind};

const SAMPLE_RATE: u32 = 24_000;
const DEFAULT_MODEL: &str = "gpt-4o-transcribe";
/// The server refuses to commit less than 100 ms.
const MIN_COMMIT_FRAMES: u64 = SAMPLE_RATE as u64 / 10;

pub static KIND: StreamingKind = StreamingKind {
    name: "openai_realtime",
    own_query_keys: &[],
    query_keys: Some(&[
        "model",
        "language",
        "prompt",
        "noise_reduction",
        "vad_threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
    ]),
    mono: true,
    sample_rate: SAMPLE_RATE,
    min_chunk_ms: 100,
    protocol: || Box::<OpenAiRealtime>::default(),
};

/// One item (a stretch of speech) of the connection.
#[derive(Debug, Default)]
struct Item {
    start_ms: u64,
    end_ms: Option<u64>,
    text: String,
}

#[derive(Default)]
struct OpenAiRealtime {
    /// Frames sent on this connection.
    sent_frames: u64,
    /// Frames before this are committed (by the server's detector or us).
    committed_to: u64,
    /// Where the audio of our latest commit began.
    commit_from: u64,
    items: BTreeMap<String, Item>,
    /// Items committed whose transcript has not come.
    pending: Vec<String>,
    /// A commit of ours has not been answered (`committed` or an error).
    awaiting_commit: bool,
    closing: bool,
}

fn ms_of(frames: u64) -> u64 {
    frames * 1000 / u64::from(SAMPLE_RATE)
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// A `query` value as JSON: a number where it reads as one.
fn json_value(text: &str) -> Value {
    if let Ok(integer) = text.parse::<i64>() {
        return Value::from(integer);
    }
    text.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or_else(|| Value::from(text), Value::Number)
}

impl OpenAiRealtime {
    fn commit(&mut self) -> Vec<Message> {
        if self.sent_frames.saturating_sub(self.committed_to) < MIN_COMMIT_FRAMES {
            return Vec::new();
        }
        self.commit_from = self.committed_to;
        self.committed_to = self.sent_frames;
        self.awaiting_commit = true;
        vec![Message::text(
            json!({"type": "input_audio_buffer.commit"}).to_string(),
        )]
    }

    fn heard(&self, item_id: &str, is_final: bool) -> Option<Heard> {
        let item = self.items.get(item_id)?;
        let end_ms = item.end_ms.unwrap_or_else(|| ms_of(self.sent_frames));
        Some(Heard {
            key: Some(item_id.to_owned()),
            channel: 0,
            start_s: seconds(item.start_ms),
            end_s: seconds(end_ms.max(item.start_ms)),
            text: item.text.clone(),
            is_final,
            words: Vec::new(),
        })
    }

    fn item_id(value: &Value) -> String {
        value
            .get("item_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    fn ms_field(value: &Value, name: &str) -> u64 {
        value.get(name).and_then(Value::as_u64).unwrap_or(0)
    }
}

impl Protocol for OpenAiRealtime {
    fn request(&self, setup: &Setup) -> Result<Request, StreamError> {
        let mut url = setup.backend.streaming_url().clone();
        if !url.query_pairs().any(|(key, _)| key == "intent") {
            url.query_pairs_mut().append_pair("intent", "transcription");
        }
        request_to(url, setup, "Bearer")
    }

    fn opened(&mut self, setup: &Setup) -> Vec<Message> {
        *self = Self::default();
        let query: BTreeMap<&str, &str> = setup
            .backend
            .streaming_query()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut transcription = Map::new();
        transcription.insert(
            "model".into(),
            Value::from(query.get("model").copied().unwrap_or(DEFAULT_MODEL)),
        );
        for key in ["language", "prompt"] {
            if let Some(value) = query.get(key) {
                transcription.insert(key.into(), Value::from(*value));
            }
        }
        let mut turn_detection = Map::new();
        turn_detection.insert("type".into(), Value::from("server_vad"));
        for (key, field) in [
            ("vad_threshold", "threshold"),
            ("prefix_padding_ms", "prefix_padding_ms"),
            ("silence_duration_ms", "silence_duration_ms"),
        ] {
            if let Some(value) = query.get(key) {
                turn_detection.insert(field.into(), json_value(value));
            }
        }
        let mut input = json!({
            "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
            "transcription": transcription,
            "turn_detection": turn_detection,
        });
        if let Some(kind) = query.get("noise_reduction") {
            input["noise_reduction"] = json!({ "type": kind });
        }
        let update = json!({
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": input}},
        });
        vec![Message::text(update.to_string())]
    }

    fn audio(&mut self, bytes: Vec<u8>, frames: u64) -> Message {
        self.sent_frames += frames;
        let audio = base64::engine::general_purpose::STANDARD.encode(bytes);
        Message::text(json!({"type": "input_audio_buffer.append", "audio": audio}).to_string())
    }

    fn keepalive(&self) -> Option<Message> {
        None
    }

    fn finalize(&mut self) -> Vec<Message> {
        self.commit()
    }

    fn close(&mut self) -> Vec<Message> {
        self.closing = true;
        self.commit()
    }

    fn drained(&self) -> bool {
        self.closing && self.pending.is_empty() && !self.awaiting_commit
    }

    fn on_text(&mut self, text: &str) -> Vec<Reply> {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return vec![Reply::Error("upstream sent text that is not JSON".into())];
        };
        let mut replies = Vec::new();
        match value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "input_audio_buffer.speech_started" => {
                let start_ms = Self::ms_field(&value, "audio_start_ms");
                if self.pending.is_empty() && self.items.values().all(|i| i.end_ms.is_some()) {
                    // Nothing before the new speech awaits a transcript.
                    replies.push(Reply::Covered(seconds(start_ms)));
                }
                self.items.insert(
                    Self::item_id(&value),
                    Item {
                        start_ms,
                        ..Item::default()
                    },
                );
            }
            "input_audio_buffer.speech_stopped" => {
                let end_ms = Self::ms_field(&value, "audio_end_ms");
                let frames = end_ms * u64::from(SAMPLE_RATE) / 1000;
                self.committed_to = self.committed_to.max(frames);
                let item = self.items.entry(Self::item_id(&value)).or_default();
                item.end_ms = Some(end_ms);
            }
            "input_audio_buffer.committed" => {
                self.awaiting_commit = false;
                let id = Self::item_id(&value);
                let committed_ms = ms_of(self.committed_to);
                let from_ms = ms_of(self.commit_from);
                let item = self.items.entry(id.clone()).or_insert_with(|| Item {
                    // Committed without the detector: our commit's audio.
                    start_ms: from_ms,
                    ..Item::default()
                });
                if item.end_ms.is_none() {
                    item.end_ms = Some(committed_ms.max(item.start_ms));
                }
                if !self.pending.contains(&id) {
                    self.pending.push(id);
                }
            }
            "conversation.item.input_audio_transcription.delta" => {
                let id = Self::item_id(&value);
                let delta = value.get("delta").and_then(Value::as_str).unwrap_or("");
                let item = self.items.entry(id.clone()).or_default();
                item.text.push_str(delta);
                replies.extend(self.heard(&id, false).map(Reply::Heard));
            }
            "conversation.item.input_audio_transcription.completed" => {
                let id = Self::item_id(&value);
                let transcript = value
                    .get("transcript")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let item = self.items.entry(id.clone()).or_default();
                item.text = transcript.to_owned();
                replies.extend(self.heard(&id, true).map(Reply::Heard));
                self.items.remove(&id);
                self.pending.retain(|p| *p != id);
            }
            "conversation.item.input_audio_transcription.failed" => {
                let id = Self::item_id(&value);
                self.items.remove(&id);
                self.pending.retain(|p| *p != id);
                replies.push(Reply::Error(text.to_owned()));
            }
            "error" => {
                // A refused commit (too little audio) is answered here.
                self.awaiting_commit = false;
                replies.push(Reply::Error(text.to_owned()));
            }
            _ => {}
        }
        if self.drained() {
            replies.push(Reply::Drained);
        }
        replies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(value: Value) -> String {
        value.to_string()
    }

    #[test]
    fn items_become_partials_and_finals_in_connection_time() {
        let mut p = OpenAiRealtime::default();
        p.audio(vec![0; 2 * 48_000], 48_000);
        let replies = p.on_text(&event(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 500, "item_id": "a"})));
        assert_eq!(replies, vec![Reply::Covered(0.5)]);
        let replies = p.on_text(&event(json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": "a", "delta": "hel"})));
        let [Reply::Heard(partial)] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert_eq!(
            (partial.text.as_str(), partial.start_s, partial.end_s),
            ("hel", 0.5, 2.0)
        );
        p.on_text(&event(json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1800, "item_id": "a"})));
        p.on_text(&event(
            json!({"type": "input_audio_buffer.committed", "item_id": "a"}),
        ));
        let replies = p.on_text(&event(json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "a", "transcript": "hello"})));
        let [Reply::Heard(last)] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert!(last.is_final);
        assert_eq!(
            (last.text.as_str(), last.start_s, last.end_s),
            ("hello", 0.5, 1.8)
        );
    }

    #[test]
    fn the_end_commits_and_waits_for_every_committed_item() {
        let mut p = OpenAiRealtime::default();
        p.audio(vec![0; 2 * 24_000], 24_000);
        // A second of uncommitted audio: the end commits it.
        assert_eq!(p.close().len(), 1);
        assert!(!p.drained());
        let replies = p.on_text(&event(
            json!({"type": "input_audio_buffer.committed", "item_id": "b"}),
        ));
        assert!(replies.is_empty());
        let replies = p.on_text(&event(json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "b", "transcript": "bye"})));
        assert!(
            matches!(replies.as_slice(), [Reply::Heard(h), Reply::Drained] if h.start_s == 0.0 && h.end_s == 1.0)
        );
        // Too little audio for a commit: drained at once.
        let mut idle = OpenAiRealtime::default();
        idle.audio(vec![0; 2 * 240], 240);
        assert!(idle.close().is_empty());
        assert!(idle.drained());
    }

    #[test]
    fn query_values_are_numbers_where_they_read_as_numbers() {
        assert_eq!(json_value("0.6"), json!(0.6));
        assert_eq!(json_value("400").to_string(), "400");
        assert_eq!(json_value("near"), json!("near"));
    }
}
