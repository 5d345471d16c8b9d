//! Word timings from an OpenAI-compatible `verbose_json` reply, in the three
//! shapes servers return, normalised to one list in stream time.
//!
//! - top-level `words: [{word, start, end, probability?}]`: OpenAI and the
//!   faster-whisper servers; each entry is a whole word;
//! - `segments[].words`: whisper.cpp's server, whose entries are really
//!   tokens: a token that does not start with a space continues the word
//!   before it (`" Hel"`, `"lo"` → `"Hello"`);
//! - `segments` only (vLLM, LocalAI, Groq): each word of a segment's text
//!   gets the segment's times, the finest the server gave.
//!
//! Pure: times in the reply are seconds from the start of the uploaded
//! audio; they are clamped into it (engines round past its end) and offset
//! by where the utterance starts in the stream.

use serde_json::Value;

use crate::protocol::Word;

/// The words of `reply`, or `None` when it carries no timing at all.
/// `offset_seconds`: where the audio starts in the stream;
/// `audio_seconds`: how long the audio sent was.
pub fn normalize(reply: &Value, offset_seconds: f64, audio_seconds: f64) -> Option<Vec<Word>> {
    let raw = if let Some(words) = reply.get("words").and_then(Value::as_array) {
        whole_words(words)
    } else {
        let segments = reply.get("segments").and_then(Value::as_array)?;
        if segments
            .iter()
            .any(|s| s.get("words").and_then(Value::as_array).is_some())
        {
            let tokens: Vec<&Value> = segments
                .iter()
                .filter_map(|s| s.get("words").and_then(Value::as_array))
                .flatten()
                .collect();
            merged_tokens(&tokens)
        } else {
            segment_words(segments)
        }
    };
    let duration = if audio_seconds.is_finite() && audio_seconds > 0.0 {
        audio_seconds
    } else {
        0.0
    };
    let clamp = |t: f64| {
        let t = if t.is_finite() { t } else { 0.0 };
        round_ms(offset_seconds + t.clamp(0.0, duration))
    };
    Some(
        raw.into_iter()
            .filter(|w| !w.word.is_empty())
            .map(|w| {
                let start = clamp(w.start);
                Word {
                    word: w.word,
                    start,
                    end: clamp(w.end).max(start),
                    confidence: w
                        .confidence
                        .filter(|c| c.is_finite())
                        .map(|c| c.clamp(0.0, 1.0)),
                }
            })
            .collect(),
    )
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn number(entry: &Value, key: &str) -> Option<f64> {
    entry.get(key).and_then(Value::as_f64)
}

/// `probability` (faster-whisper, whisper.cpp) or `confidence`.
fn confidence(entry: &Value) -> Option<f64> {
    number(entry, "probability").or_else(|| number(entry, "confidence"))
}

fn whole_words(entries: &[Value]) -> Vec<Word> {
    entries
        .iter()
        .filter_map(|entry| {
            Some(Word {
                word: entry.get("word")?.as_str()?.trim().to_owned(),
                start: number(entry, "start")?,
                end: number(entry, "end")?,
                confidence: confidence(entry),
            })
        })
        .collect()
}

/// whisper.cpp's tokens joined into words; special tokens (`[_BEG_]`,
/// `[_TT_150]`) dropped. A merged word's confidence is its tokens' mean.
fn merged_tokens(tokens: &[&Value]) -> Vec<Word> {
    let mut words: Vec<Word> = Vec::new();
    let mut confidences: Vec<(f64, u32)> = Vec::new();
    for token in tokens {
        let (Some(text), Some(start), Some(end)) = (
            token.get("word").and_then(Value::as_str),
            number(token, "start"),
            number(token, "end"),
        ) else {
            continue;
        };
        let trimmed = text.trim();
        if trimmed.is_empty() || (trimmed.starts_with("[_") && trimmed.ends_with(']')) {
            continue;
        }
        let continues = !text.starts_with(char::is_whitespace) && !words.is_empty();
        let token_confidence = confidence(token);
        if continues {
            if let (Some(word), Some(sum)) = (words.last_mut(), confidences.last_mut()) {
                word.word.push_str(trimmed);
                word.end = end.max(word.end);
                if let Some(c) = token_confidence {
                    sum.0 += c;
                    sum.1 += 1;
                }
            }
        } else {
            words.push(Word {
                word: trimmed.to_owned(),
                start,
                end,
                confidence: None,
            });
            confidences.push(token_confidence.map_or((0.0, 0), |c| (c, 1)));
        }
    }
    for (word, (sum, count)) in words.iter_mut().zip(confidences) {
        word.confidence = (count > 0).then(|| sum / f64::from(count));
    }
    words
}

fn segment_words(segments: &[Value]) -> Vec<Word> {
    let mut words = Vec::new();
    for segment in segments {
        let (Some(text), Some(start), Some(end)) = (
            segment.get("text").and_then(Value::as_str),
            number(segment, "start"),
            number(segment, "end"),
        ) else {
            continue;
        };
        words.extend(text.split_whitespace().map(|word| Word {
            word: word.to_owned(),
            start,
            end,
            confidence: None,
        }));
    }
    words
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn summary(words: &[Word]) -> Vec<(&str, f64, f64, Option<f64>)> {
        words
            .iter()
            .map(|w| (w.word.as_str(), w.start, w.end, w.confidence))
            .collect()
    }

    #[test]
    fn top_level_words_are_whole_words_offset_into_stream_time() {
        // faster-whisper (speaches): leading spaces, `probability`.
        let reply = json!({
            "text": "Hello there.",
            "words": [
                {"word": " Hello", "start": 0.12, "end": 0.5, "probability": 0.9},
                {"word": " there.", "start": 0.5, "end": 0.98, "probability": 0.75},
            ],
            "segments": [{"id": 0, "start": 0.0, "end": 1.0, "text": "Hello there."}],
        });
        let words = normalize(&reply, 10.0, 1.2).unwrap();
        assert_eq!(
            summary(&words),
            [
                ("Hello", 10.12, 10.5, Some(0.9)),
                ("there.", 10.5, 10.98, Some(0.75))
            ]
        );
        // OpenAI: no spaces, no probability; each entry is still one word.
        let reply = json!({"words": [{"word": "Hi", "start": 0.0, "end": 0.2}, {"word": "you", "start": 0.2, "end": 0.4}]});
        assert_eq!(
            summary(&normalize(&reply, 0.5, 1.0).unwrap()),
            [("Hi", 0.5, 0.7, None), ("you", 0.7, 0.9, None)]
        );
    }

    #[test]
    fn whisper_cpp_tokens_are_merged_into_words() {
        let reply = json!({
            "text": " Hello world",
            "segments": [
                {"id": 0, "start": 0.0, "end": 1.0, "text": " Hello wor", "words": [
                    {"word": "[_BEG_]", "start": 0.0, "end": 0.0, "probability": 1.0},
                    {"word": " Hel", "start": 0.1, "end": 0.3, "probability": 0.8},
                    {"word": "lo", "start": 0.3, "end": 0.45, "probability": 0.6},
                    {"word": " wor", "start": 0.5, "end": 0.7, "probability": 0.9},
                ]},
                {"id": 1, "start": 1.0, "end": 1.5, "text": "ld", "words": [
                    // A word split across segments continues as well.
                    {"word": "ld", "start": 1.0, "end": 1.2, "probability": 0.5},
                    {"word": "[_TT_75]", "start": 1.5, "end": 1.5},
                ]},
            ],
        });
        let words = normalize(&reply, 2.0, 2.0).unwrap();
        assert_eq!(
            summary(&words),
            [
                ("Hello", 2.1, 2.45, Some(0.7)),
                ("world", 2.5, 3.2, Some(0.7))
            ]
        );
    }

    #[test]
    fn segments_only_give_each_word_its_segment_s_times() {
        // vLLM, LocalAI: no word timings at all.
        let reply = json!({
            "text": "one two three",
            "segments": [
                {"id": 0, "start": 0.0, "end": 1.5, "text": " one two"},
                {"id": 1, "start": 1.5, "end": 2.25, "text": " three"},
            ],
        });
        assert_eq!(
            summary(&normalize(&reply, 1.0, 3.0).unwrap()),
            [
                ("one", 1.0, 2.5, None),
                ("two", 1.0, 2.5, None),
                ("three", 2.5, 3.25, None)
            ]
        );
    }

    #[test]
    fn times_are_clamped_into_the_audio_and_bad_entries_skipped() {
        let reply = json!({"words": [
            {"word": " late", "start": 0.9, "end": 1.4, "probability": 1.7},
            {"word": " early", "start": -0.2, "end": 0.1},
            {"word": "no times"},
            {"word": "  ", "start": 0.0, "end": 0.1},
            {"word": " reversed", "start": 0.5, "end": 0.4},
        ]});
        assert_eq!(
            summary(&normalize(&reply, 3.0, 1.0).unwrap()),
            [
                ("late", 3.9, 4.0, Some(1.0)),
                ("early", 3.0, 3.1, None),
                ("reversed", 3.5, 3.5, None)
            ]
        );
    }

    #[test]
    fn a_reply_without_timings_has_no_words() {
        assert_eq!(normalize(&json!({"text": "plain"}), 0.0, 1.0), None);
        // An empty list is an answer: the server heard nothing.
        assert_eq!(
            normalize(&json!({"text": "", "words": []}), 0.0, 1.0),
            Some(vec![])
        );
    }
}
