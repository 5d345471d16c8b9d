//! FreeSWITCH mod_audio_fork (`/audiofork`, subprotocol `audio.drachtio.org`):
//! `uuid_audio_fork <uuid> start <url> <mix-type> <sampling-rate> <metadata>`.
//! The module sends the metadata as the first text frame (when given), then
//! binary frames of 16-bit little-endian PCM: `mono` (the caller), `mixed`
//! (both parties in one channel) or `stereo` (caller left, callee right), at
//! 8 or 16 kHz. The format is not on the wire, so the URL says it:
//! `?mix_type=stereo&sampling_rate=8k` (default `mono`, `16k`). Later text
//! frames (`send_text`, the text given to `stop`) are kept as events.
//!
//! The module turns JSON text frames from the server into FreeSWITCH events:
//! transcripts go back as `{"type":"transcription","data":{…}}` (event
//! `mod_audio_fork::transcription`) and errors as `{"type":"error","data":{…}}`
//! (`mod_audio_fork::error`); other session messages are dropped.

use actix_web::web::Bytes;
use serde_json::{json, Map, Value};

use super::{excerpt, l16_start, Dialect, DialectError, DialectKind, Inbound, Prepared};
use crate::protocol::{ProtocolError, ServerMessage, StartRequest};

const NAME: &str = "audiofork";
/// The subprotocol mod_audio_fork asks for (MOD_AUDIO_FORK_SUBPROTOCOL_NAME).
pub const SUBPROTOCOL: &str = "audio.drachtio.org";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixType {
    Mono,
    Mixed,
    Stereo,
}

impl MixType {
    fn parse(text: &str) -> Result<Self, ProtocolError> {
        match text.trim() {
            "mono" => Ok(MixType::Mono),
            "mixed" => Ok(MixType::Mixed),
            "stereo" => Ok(MixType::Stereo),
            other => Err(ProtocolError::UnsupportedChannels(format!(
                "{} (mix_type is mono, mixed or stereo)",
                excerpt(other, 16)
            ))),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            MixType::Mono => "mono",
            MixType::Mixed => "mixed",
            MixType::Stereo => "stereo",
        }
    }

    fn channels(self) -> u16 {
        match self {
            MixType::Stereo => 2,
            MixType::Mono | MixType::Mixed => 1,
        }
    }
}

/// `8k` or `16k`, as on the command line (or `8000`, `16000`): the rates
/// mod_audio_fork generates.
fn parse_rate(text: &str) -> Result<u32, ProtocolError> {
    match text.trim() {
        "8k" | "8000" => Ok(8000),
        "16k" | "16000" => Ok(16000),
        other => Err(ProtocolError::UnsupportedSampleRate(format!(
            "{} (mod_audio_fork sends 8k or 16k)",
            excerpt(other, 16)
        ))),
    }
}

pub fn prepare(session_id: &str, pairs: &[(String, String)]) -> Prepared {
    let mut fork = AudioFork {
        session_id: session_id.to_owned(),
        mix: MixType::Mono,
        sample_rate: 16_000,
        chosen: Vec::new(),
        started: false,
    };
    let mut query = Ok(StartRequest::default());
    for (key, value) in pairs {
        let read = match key.as_str() {
            "mix_type" => MixType::parse(value).map(|m| fork.mix = m),
            "sampling_rate" => parse_rate(value).map(|r| fork.sample_rate = r),
            "transcribe" | "sinks" => {
                fork.chosen.push((key.clone(), value.clone()));
                Ok(())
            }
            other => Err(ProtocolError::UnknownParameter(other.to_owned())),
        };
        if let Err(e) = read {
            query = Err(e);
            break;
        }
    }
    Prepared {
        dialect: Box::new(fork),
        query,
    }
}

pub struct AudioFork {
    session_id: String,
    mix: MixType,
    sample_rate: u32,
    chosen: Vec<(String, String)>,
    started: bool,
}

impl AudioFork {
    fn start(
        &mut self,
        metadata: Option<&str>,
        out: &mut Vec<Inbound>,
    ) -> Result<(), DialectError> {
        let mut map = match metadata.map(serde_json::from_str::<Value>) {
            Some(Ok(Value::Object(object))) => object,
            Some(_) => {
                let mut map = Map::new();
                map.insert(
                    "metadata".into(),
                    Value::String(metadata.unwrap_or("").to_owned()),
                );
                map
            }
            None => Map::new(),
        };
        map.insert(
            "dialect".into(),
            json!({
                "name": NAME,
                "mix_type": self.mix.as_str(),
                "sampling_rate": self.sample_rate,
            }),
        );
        let start = l16_start(self.sample_rate, self.mix.channels(), &self.chosen, map)?;
        self.started = true;
        out.push(start);
        Ok(())
    }
}

impl Dialect for AudioFork {
    fn kind(&self) -> DialectKind {
        DialectKind::AudioFork
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        if self.started {
            // `uuid_audio_fork <uuid> send_text …` or the text given to stop.
            out.push(Inbound::Event {
                name: "text",
                detail: excerpt(text, 200),
            });
            return Ok(());
        }
        self.start(Some(text), out)
    }

    fn on_binary(&mut self, data: &Bytes, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        if !self.started {
            // No metadata was given on the command line.
            self.start(None, out)?;
        }
        out.push(Inbound::Audio(data.clone()));
        Ok(())
    }

    fn render(&mut self, message: &ServerMessage, out: &mut Vec<String>) {
        let frame = match message {
            ServerMessage::Transcript(t) => json!({
                "type": "transcription",
                "data": {
                    "session_id": self.session_id,
                    "utterance_id": t.utterance_id,
                    "channel": t.channel,
                    "start": t.start,
                    "end": t.end,
                    "text": t.text,
                    "final": t.is_final,
                    "backend": t.backend,
                },
            }),
            ServerMessage::TranscribeError(e) => json!({ "type": "error", "data": e }),
            ServerMessage::Error {
                code,
                message,
                fatal,
            } => json!({
                "type": "error",
                "data": { "code": code, "message": message, "fatal": fatal },
            }),
            _ => return,
        };
        out.push(frame.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorCode, TranscribeErrorInfo, Transcript};

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn metadata_first_then_audio_in_the_url_format() {
        let Prepared { mut dialect, query } = prepare(
            "s1",
            &pairs(&[("mix_type", "stereo"), ("sampling_rate", "8k")]),
        );
        assert!(query.is_ok());
        let mut out = Vec::new();
        dialect
            .on_text(r#"{"to":"6173333456","callid":"abc"}"#, &mut out)
            .unwrap();
        dialect
            .on_binary(&Bytes::from_static(&[0; 640]), &mut out)
            .unwrap();
        dialect.on_text("dtmf 5", &mut out).unwrap();
        let [Inbound::Start { request, .. }, Inbound::Audio(_), Inbound::Event {
            name: "text",
            detail,
        }] = &out[..]
        else {
            panic!("{out:?}");
        };
        let format = request.resolve().unwrap();
        assert_eq!(
            (
                format.encoding.as_str(),
                format.sample_rate,
                format.channels
            ),
            ("pcm_s16le", 8000, 2)
        );
        assert_eq!(request.metadata["callid"], "abc");
        assert_eq!(request.metadata["dialect"]["mix_type"], "stereo");
        assert_eq!(detail, "dtmf 5");
    }

    #[test]
    fn audio_without_metadata_and_plain_text_metadata() {
        let Prepared { mut dialect, .. } = prepare("s1", &[]);
        let mut out = Vec::new();
        dialect
            .on_binary(&Bytes::from_static(&[0; 2]), &mut out)
            .unwrap();
        let Inbound::Start { request, .. } = &out[0] else {
            panic!("{out:?}");
        };
        let format = request.resolve().unwrap();
        assert_eq!((format.sample_rate, format.channels), (16000, 1));
        let Prepared { mut dialect, .. } = prepare("s1", &[]);
        let mut out = Vec::new();
        dialect.on_text("call 42", &mut out).unwrap();
        let Inbound::Start { request, .. } = &out[0] else {
            panic!("{out:?}");
        };
        assert_eq!(request.metadata["metadata"], "call 42");
    }

    #[test]
    fn bad_queries() {
        for (query, expected) in [
            (("mix_type", "quad"), "unsupported channels"),
            (("sampling_rate", "44k1"), "unsupported sample_rate"),
            (("sampling_rate", "48k"), "unsupported sample_rate"),
            (("sampling_rate", "96k"), "unsupported sample_rate"),
            (("encoding", "mulaw"), "unknown query parameter"),
        ] {
            let Prepared { query: result, .. } = prepare("s", &pairs(&[query]));
            let error = result.unwrap_err().to_string();
            assert!(error.contains(expected), "{query:?}: {error}");
        }
        assert_eq!(parse_rate("16k"), Ok(16000));
        assert_eq!(parse_rate("8000"), Ok(8000));
    }

    #[test]
    fn transcripts_and_errors_become_module_events() {
        let Prepared { mut dialect, .. } = prepare("s1", &[]);
        let mut out = Vec::new();
        dialect.render(
            &ServerMessage::Transcript(Transcript {
                utterance_id: 3,
                channel: 1,
                start: 0.5,
                end: 2.25,
                text: "hello there".into(),
                stable_text: None,
                is_final: true,
                words: None,
                backend: "default".into(),
                backend_ms: 120,
            }),
            &mut out,
        );
        dialect.render(
            &ServerMessage::TranscribeError(TranscribeErrorInfo {
                code: ErrorCode::TranscribeFailed,
                message: "backend down".into(),
                fatal: false,
                channel: 0,
                utterance_id: Some(4),
                start: Some(1.0),
                end: Some(2.0),
                dropped: None,
            }),
            &mut out,
        );
        dialect.render(
            &ServerMessage::Error {
                code: ErrorCode::PartialFrame,
                message: "641 bytes".into(),
                fatal: true,
            },
            &mut out,
        );
        dialect.render(&ServerMessage::Flushed, &mut out);
        let frames: Vec<Value> = out
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect();
        assert_eq!(
            frames[0],
            json!({"type":"transcription","data":{"session_id":"s1","utterance_id":3,"channel":1,"start":0.5,"end":2.25,"text":"hello there","final":true,"backend":"default"}})
        );
        assert_eq!(frames[1]["type"], "error");
        assert_eq!(frames[1]["data"]["code"], "transcribe_failed");
        assert_eq!(frames[1]["data"]["utterance_id"], 4);
        assert_eq!(
            frames[2],
            json!({"type":"error","data":{"code":"partial_frame","message":"641 bytes","fatal":true}})
        );
        assert_eq!(frames.len(), 3, "flushed has no audio_fork shape");
    }
}
