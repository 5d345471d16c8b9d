//! A Deepgram-compatible live endpoint (`/v1/listen`): an application
//! written against Deepgram's streaming API points its base URL at cochlea.
//!
//! In: binary audio (raw with `encoding` and `sample_rate` in the query, or a
//! WAV, Ogg/Opus or WebM/Opus stream without them, detected from its first
//! bytes), and the text control messages `KeepAlive`, `Finalize` (a flush)
//! and `CloseStream` (stop); an empty binary message also ends the stream.
//! Raw PCM and G.711 may be cut anywhere, as Deepgram allows: whole sample
//! frames are handed on and a split one waits for its other bytes.
//!
//! Out: each final `transcript` as a `Results` with `is_final: true` (and
//! `speech_final` at the endpoint), each partial (`interim_results=true`,
//! which asks the session for `interim`) as a `Results` with
//! `is_final: false`, word timings in `words`, `SpeechStarted` (with
//! `vad_events=true`), `UtteranceEnd` (with `utterance_end_ms`, after the
//! utterance's `Results`), fatal errors as `Error`, and `Metadata` when the
//! stream closes. Parameters for Deepgram's own models (`model`, `language`,
//! `punctuate`, …) are accepted and ignored; they are listed in the
//! recording's metadata.

use std::collections::{BTreeMap, BTreeSet};

use actix_web::web::Bytes;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{
    excerpt, json_object, start_request, string_field, Dialect, DialectError, DialectKind, Inbound,
    Prepared,
};
use crate::protocol::{Encoding, ProtocolError, ServerMessage, StartRequest, Transcript};

const NAME: &str = "deepgram";
/// Longest container header waited for before the format is known.
const MAX_SNIFF_BYTES: usize = 64 * 1024;

/// What the query asked of the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    /// `endpointing` (default on): `speech_final` on each final result.
    endpointing: bool,
    /// `vad_events=true`: `SpeechStarted` messages.
    vad_events: bool,
    /// `utterance_end_ms` given: `UtteranceEnd` messages.
    utterance_end: bool,
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ProtocolError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ProtocolError::InvalidMessage(format!(
            "deepgram parameter {key} must be true or false, not '{}'",
            excerpt(value, 16)
        ))),
    }
}

/// Deepgram's encoding names for what cochlea decodes.
fn native_encoding(deepgram: &str) -> Result<&'static str, ProtocolError> {
    match deepgram.trim() {
        "linear16" => Ok("pcm_s16le"),
        "linear32" => Ok("pcm_f32le"),
        "mulaw" => Ok("mulaw"),
        "alaw" => Ok("alaw"),
        "opus" => Ok("opus"),
        "ogg-opus" => Ok("ogg_opus"),
        other => Err(ProtocolError::UnsupportedEncoding(format!(
            "{} (this Deepgram-compatible endpoint decodes linear16, linear32, mulaw, alaw, opus and ogg-opus, or WAV, Ogg and WebM without encoding)",
            excerpt(other, 16)
        ))),
    }
}

pub fn prepare(session_id: &str, pairs: &[(String, String)]) -> Prepared {
    let mut deepgram = Deepgram {
        session_id: session_id.to_owned(),
        created: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        options: Options {
            endpointing: true,
            vad_events: false,
            utterance_end: false,
        },
        channels: 1,
        sha256: Sha256::new(),
        sniffing: None,
        frame_bytes: None,
        remainder: Vec::new(),
        chosen: Vec::new(),
        metadata: Map::new(),
        open: BTreeMap::new(),
        finalized: BTreeSet::new(),
        pending_ends: BTreeMap::new(),
        backend: None,
        closed: false,
    };
    let query = deepgram.read_query(pairs);
    Prepared {
        dialect: Box::new(deepgram),
        query,
    }
}

pub struct Deepgram {
    session_id: String,
    /// When the connection was accepted (RFC 3339), for `Metadata.created`.
    created: String,
    options: Options,
    channels: u16,
    /// Of every audio byte received, for `Metadata.sha256`.
    sha256: Sha256,
    /// Without `encoding`: the first bytes, until the container is known.
    sniffing: Option<Vec<u8>>,
    /// PCM and G.711: bytes per sample frame, to hand on whole frames only.
    frame_bytes: Option<usize>,
    remainder: Vec<u8>,
    /// `transcribe`/`sinks` and metadata, for a start made after sniffing.
    chosen: Vec<(String, String)>,
    metadata: Map<String, Value>,
    /// Utterances whose speech started and has not ended, and their channel.
    open: BTreeMap<u64, u16>,
    /// Utterances that were open when the client sent `Finalize`.
    finalized: BTreeSet<u64>,
    /// `UtteranceEnd` held until the utterance's `Results` went out:
    /// utterance → (channel, end of speech).
    pending_ends: BTreeMap<u64, (u16, f64)>,
    /// The transcription backend (`started.transcribe`).
    backend: Option<String>,
    closed: bool,
}

impl Deepgram {
    /// Reads the query; the start request for the session (which starts at
    /// once when `encoding` is given).
    fn read_query(&mut self, pairs: &[(String, String)]) -> Result<StartRequest, ProtocolError> {
        let mut encoding = None;
        let mut format: Vec<(&str, String)> = Vec::new();
        let mut ignored = Map::new();
        for (key, value) in pairs {
            match key.as_str() {
                "encoding" => encoding = Some(native_encoding(value)?),
                "sample_rate" => format.push(("sample_rate", value.clone())),
                "channels" => {
                    self.channels = value
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|c| (1..=crate::protocol::MAX_CHANNELS).contains(c))
                        .ok_or_else(|| ProtocolError::UnsupportedChannels(excerpt(value, 8)))?;
                    format.push(("channels", value.clone()));
                }
                // Each channel is always transcribed on its own; accepted
                // for compatibility.
                "multichannel" => {
                    parse_bool(key, value)?;
                }
                "interim_results" => {
                    if parse_bool(key, value)? {
                        self.chosen.push(("interim".into(), "true".into()));
                    }
                }
                "vad_events" => self.options.vad_events = parse_bool(key, value)?,
                "endpointing" => {
                    let value = value.trim();
                    self.options.endpointing = match value.parse::<u64>() {
                        Ok(_) => true,
                        Err(_) => parse_bool(key, value)?,
                    };
                }
                "utterance_end_ms" => {
                    value.trim().parse::<u64>().map_err(|_| {
                        ProtocolError::InvalidMessage(format!(
                            "deepgram parameter utterance_end_ms must be an integer, not '{}'",
                            excerpt(value, 16)
                        ))
                    })?;
                    self.options.utterance_end = true;
                }
                "transcribe" | "sinks" => self.chosen.push((key.clone(), value.clone())),
                other => {
                    ignored.insert(other.to_owned(), Value::String(excerpt(value, 200)));
                }
            }
        }
        self.metadata.insert(
            "dialect".into(),
            json!({ "name": NAME, "ignored_parameters": ignored }),
        );
        let Some(encoding) = encoding else {
            // A container: the format comes from its first bytes.
            self.sniffing = Some(Vec::new());
            return Ok(StartRequest::default());
        };
        let encoding_value = Encoding::parse(encoding)?;
        if encoding_value.is_container() {
            // The container says how many channels; Deepgram ignores it too.
            format.retain(|(k, _)| *k != "channels");
        }
        self.frame_bytes = encoding_value
            .bytes_per_sample()
            .map(|b| b * usize::from(self.channels));
        format.push(("encoding", encoding.to_owned()));
        format.push(("framing", "raw".into()));
        start_request(&format, &self.chosen, self.metadata.clone())
    }

    /// Whole sample frames of what arrived (PCM, G.711); containers and
    /// Opus packets pass as they are.
    fn hand_on(&mut self, data: &[u8], out: &mut Vec<Inbound>) {
        let Some(frame) = self.frame_bytes.filter(|&f| f > 0) else {
            out.push(Inbound::Audio(Bytes::copy_from_slice(data)));
            return;
        };
        let mut joined = std::mem::take(&mut self.remainder);
        joined.extend_from_slice(data);
        let whole = joined.len() - joined.len() % frame;
        self.remainder = joined.split_off(whole);
        if whole > 0 {
            out.push(Inbound::Audio(Bytes::from(joined)));
        }
    }

    /// Looks at the first bytes of a stream sent without `encoding`.
    fn sniff(&mut self, data: &[u8], out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        let Some(buffer) = self.sniffing.as_mut() else {
            return Ok(());
        };
        buffer.extend_from_slice(data);
        let head = buffer.clone();
        let (encoding, format, audio_from) = if head.starts_with(b"OggS") {
            ("ogg_opus", Vec::new(), 0)
        } else if head.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
            ("webm_opus", Vec::new(), 0)
        } else if head.len() < 12 && (b"RIFF".starts_with(&head[..head.len().min(4)])) {
            return Ok(());
        } else if head.starts_with(b"RIFF") && &head[8..12] == b"WAVE" {
            match wav_header(&head)? {
                None if head.len() > MAX_SNIFF_BYTES => {
                    return Err(ProtocolError::UnsupportedEncoding(
                        "a WAV stream whose header is over 64 KiB".into(),
                    )
                    .into())
                }
                None => return Ok(()),
                Some(wav) => {
                    self.channels = wav.channels;
                    self.frame_bytes = Some(wav.frame_bytes);
                    (
                        wav.encoding,
                        vec![
                            ("sample_rate", wav.sample_rate.to_string()),
                            ("channels", wav.channels.to_string()),
                        ],
                        wav.data_offset,
                    )
                }
            }
        } else if head.len() < 4 {
            return Ok(());
        } else {
            return Err(ProtocolError::UnsupportedEncoding(
                "no encoding in the query, and the audio is not WAV, Ogg or WebM: give encoding and sample_rate for raw audio".into(),
            )
            .into());
        };
        self.sniffing = None;
        let mut pairs = format;
        pairs.push(("encoding", encoding.to_owned()));
        pairs.push(("framing", "raw".into()));
        let request = start_request(&pairs, &self.chosen, self.metadata.clone())?;
        out.push(Inbound::Start {
            request,
            max_session_ms: None,
        });
        if head.len() > audio_from {
            self.hand_on(&head[audio_from..], out);
        }
        Ok(())
    }

    fn channel_pair(&self, channel: u16) -> Value {
        json!([channel, self.channels.max(channel + 1)])
    }

    fn results(&self, t: &Transcript, from_finalize: bool) -> Value {
        let duration = ((t.end - t.start).max(0.0) * 1000.0).round() / 1000.0;
        // Deepgram's words carry a confidence; backends that give none are
        // reported as sure (1.0), as the transcript's confidence is.
        let words: Vec<Value> = t
            .words
            .iter()
            .flatten()
            .map(|w| {
                json!({
                    "word": w.word,
                    "start": w.start,
                    "end": w.end,
                    "confidence": w.confidence.unwrap_or(1.0),
                    "punctuated_word": w.word,
                })
            })
            .collect();
        json!({
            "type": "Results",
            "channel_index": self.channel_pair(t.channel),
            "duration": duration,
            "start": t.start,
            "is_final": t.is_final,
            // An endpoint is where a final ends; a partial is never one.
            "speech_final": t.is_final && self.options.endpointing,
            "from_finalize": t.is_final && from_finalize,
            "channel": {
                "alternatives": [{
                    "transcript": t.text,
                    "confidence": 1.0,
                    "words": words,
                }],
            },
            "metadata": {
                "request_id": self.session_id,
                "model_info": model_info(&t.backend),
                "model_uuid": model_uuid(&t.backend),
            },
        })
    }

    fn utterance_end(&self, channel: u16, last_word_end: f64) -> String {
        json!({
            "type": "UtteranceEnd",
            "channel": self.channel_pair(channel),
            "last_word_end": last_word_end,
        })
        .to_string()
    }

    /// The `UtteranceEnd` held for `utterance`, if any.
    fn release_end(&mut self, utterance: u64, out: &mut Vec<String>) {
        if let Some((channel, end)) = self.pending_ends.remove(&utterance) {
            out.push(self.utterance_end(channel, end));
        }
    }
}

struct WavFormat {
    encoding: &'static str,
    sample_rate: u32,
    channels: u16,
    frame_bytes: usize,
    data_offset: usize,
}

/// The format of a WAV header and where its `data` chunk's bytes begin;
/// `None` while the header is incomplete.
fn wav_header(bytes: &[u8]) -> Result<Option<WavFormat>, DialectError> {
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = 12;
    let mut format: Option<(u16, u16, u32, u16)> = None;
    loop {
        let (Some(id), Some(len)) = (bytes.get(at..at + 4), u32_at(at + 4)) else {
            return Ok(None);
        };
        let body = at + 8;
        if id == b"data" {
            let Some((tag, channels, rate, bits)) = format else {
                return Err(ProtocolError::UnsupportedEncoding(
                    "a WAV stream with no fmt chunk before its data".into(),
                )
                .into());
            };
            let encoding = match (tag, bits) {
                (1, 16) => "pcm_s16le",
                (3, 32) => "pcm_f32le",
                (6, 8) => "alaw",
                (7, 8) => "mulaw",
                _ => {
                    return Err(ProtocolError::UnsupportedEncoding(format!(
                        "WAV format tag {tag} with {bits}-bit samples (WAV is read as 16-bit PCM, 32-bit float, A-law or μ-law)"
                    ))
                    .into())
                }
            };
            let sample_rate = crate::protocol::parse_sample_rate(&rate.to_string())?;
            if !(1..=crate::protocol::MAX_CHANNELS).contains(&channels) {
                return Err(ProtocolError::UnsupportedChannels(channels.to_string()).into());
            }
            return Ok(Some(WavFormat {
                encoding,
                sample_rate,
                channels,
                frame_bytes: usize::from(bits / 8) * usize::from(channels),
                data_offset: body,
            }));
        }
        if id == b"fmt " {
            let (Some(mut tag), Some(channels), Some(rate), Some(bits)) = (
                u16_at(body),
                u16_at(body + 2),
                u32_at(body + 4),
                u16_at(body + 14),
            ) else {
                return Ok(None);
            };
            if tag == 0xFFFE {
                // WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID.
                let Some(sub) = u16_at(body + 24) else {
                    return Ok(None);
                };
                tag = sub;
            }
            format = Some((tag, channels, rate, bits));
        }
        // Chunks are padded to an even length.
        at = body + len as usize + (len as usize & 1);
    }
}

fn model_info(backend: &str) -> Value {
    json!({
        "name": backend,
        "version": env!("CARGO_PKG_VERSION"),
        "arch": "cochlea",
    })
}

/// A stable id for a backend name, in the UUID form Deepgram gives models.
fn model_uuid(backend: &str) -> String {
    let digest = Sha256::digest(format!("cochlea backend {backend}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Uuid::from_bytes(bytes).to_string()
}

impl Dialect for Deepgram {
    fn kind(&self) -> DialectKind {
        DialectKind::Deepgram
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        let message = json_object(NAME, text)?;
        let kind = string_field(NAME, &message, "message", "type")?.ok_or_else(|| {
            ProtocolError::InvalidMessage("deepgram control message without a type".into())
        })?;
        match kind {
            "KeepAlive" => out.push(Inbound::Keepalive),
            "CloseStream" => out.push(Inbound::Stop),
            "Finalize" => {
                let channel = message.get("channel").and_then(Value::as_u64);
                for (utterance, open_channel) in &self.open {
                    if channel.is_none_or(|c| c == u64::from(*open_channel)) {
                        self.finalized.insert(*utterance);
                    }
                }
                out.push(Inbound::Flush);
            }
            "Configure" => out.push(Inbound::Reply(
                json!({
                    "type": "ConfigureFailure",
                    "request_id": self.session_id,
                    "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                    "description": "this Deepgram-compatible endpoint does not reconfigure a stream",
                })
                .to_string(),
            )),
            other => {
                return Err(DialectError::UnknownMessageType {
                    dialect: NAME,
                    found: excerpt(other, 32),
                    expected: "KeepAlive, Finalize, CloseStream or Configure",
                })
            }
        }
        Ok(())
    }

    fn on_binary(&mut self, data: &Bytes, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        if data.is_empty() {
            // Deepgram's older way to say CloseStream.
            out.push(Inbound::Stop);
            return Ok(());
        }
        self.sha256.update(data);
        if self.sniffing.is_some() {
            return self.sniff(data, out);
        }
        self.hand_on(data, out);
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Inbound>) {
        if !self.remainder.is_empty() {
            tracing::warn!(
                bytes = self.remainder.len(),
                "deepgram stream ended inside a sample frame; its bytes are dropped"
            );
            self.remainder.clear();
        }
    }

    fn render(&mut self, message: &ServerMessage, out: &mut Vec<String>) {
        match message {
            ServerMessage::Started(info) => {
                self.channels = info.format.channels;
                self.backend = info.transcribe.clone();
            }
            ServerMessage::Vad(vad) => match vad.event {
                crate::protocol::VadEventKind::SpeechStarted => {
                    self.open.insert(vad.utterance_id, vad.channel);
                    if self.options.vad_events {
                        out.push(
                            json!({
                                "type": "SpeechStarted",
                                "channel": self.channel_pair(vad.channel),
                                "timestamp": vad.time,
                            })
                            .to_string(),
                        );
                    }
                }
                crate::protocol::VadEventKind::SpeechEnded => {
                    self.open.remove(&vad.utterance_id);
                    if self.options.utterance_end {
                        self.pending_ends
                            .insert(vad.utterance_id, (vad.channel, vad.time));
                    }
                }
            },
            ServerMessage::Transcript(t) if !t.is_final => {
                out.push(self.results(t, false).to_string());
            }
            ServerMessage::Transcript(t) => {
                let from_finalize = self.finalized.remove(&t.utterance_id);
                out.push(self.results(t, from_finalize).to_string());
                self.release_end(t.utterance_id, out);
            }
            ServerMessage::TranscribeError(e) => {
                // No text for this utterance, but it did end.
                if let Some(utterance) = e.utterance_id {
                    self.finalized.remove(&utterance);
                    self.release_end(utterance, out);
                }
            }
            ServerMessage::Error {
                code,
                message,
                fatal: true,
            } => out.push(
                json!({ "type": "Error", "variant": code, "description": message }).to_string(),
            ),
            ServerMessage::Closed(summary) if !self.closed => {
                self.closed = true;
                let pending: Vec<u64> = self.pending_ends.keys().copied().collect();
                for utterance in pending {
                    self.release_end(utterance, out);
                }
                let sha256: String = self
                    .sha256
                    .clone()
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let (models, model_info) = match &self.backend {
                    Some(name) => (
                        json!([model_uuid(name)]),
                        json!({ model_uuid(name): model_info(name) }),
                    ),
                    None => (json!([]), json!({})),
                };
                out.push(
                    json!({
                        "type": "Metadata",
                        "transaction_key": "deprecated",
                        "request_id": self.session_id,
                        "sha256": sha256,
                        "created": self.created,
                        "duration": summary.duration_seconds,
                        "channels": self.channels,
                        "models": models,
                        "model_info": model_info,
                    })
                    .to_string(),
                );
            }
            // started, ack, stats, flushed, recording and warnings have no
            // Deepgram shape.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        ClosedSummary, ErrorCode, Framing, StartedInfo, StreamFormat, TranscribeErrorInfo,
        VadEvent, VadEventKind,
    };

    fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn deepgram(query: &str) -> (Box<dyn Dialect>, Result<StartRequest, ProtocolError>) {
        let Prepared { dialect, query } = prepare("req-1", &pairs(query));
        (dialect, query)
    }

    fn started(channels: u16) -> ServerMessage {
        ServerMessage::Started(StartedInfo {
            protocol_version: 1,
            session_id: "req-1".into(),
            format: StreamFormat {
                encoding: Encoding::PcmS16le,
                sample_rate: 16000,
                channels,
                framing: Framing::Raw,
            },
            sinks: vec!["record".into(), "transcribe".into()],
            transcribe: Some("default".into()),
            metadata: Map::new(),
            max_message_bytes: 65536,
            idle_timeout_ms: 30000,
            resume_token: None,
            resume_from_seq: None,
        })
    }

    fn vad(event: VadEventKind, channel: u16, time: f64, utterance_id: u64) -> ServerMessage {
        ServerMessage::Vad(VadEvent {
            event,
            channel,
            time,
            utterance_id,
        })
    }

    fn transcript(utterance_id: u64, channel: u16, text: &str) -> ServerMessage {
        ServerMessage::Transcript(Transcript {
            utterance_id,
            channel,
            start: 0.336,
            end: 3.312,
            text: text.into(),
            stable_text: None,
            is_final: true,
            words: None,
            backend: "default".into(),
            backend_ms: 212,
        })
    }

    fn render(dialect: &mut Box<dyn Dialect>, message: ServerMessage) -> Vec<Value> {
        let mut out = Vec::new();
        dialect.render(&message, &mut out);
        out.iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    #[test]
    fn query_parameters_map_onto_the_native_format() {
        let (_, query) = deepgram(
            "encoding=linear16&sample_rate=16000&channels=2&model=nova-3&punctuate=true&interim_results=true",
        );
        let request = query.unwrap();
        let format = request.resolve().unwrap();
        assert_eq!(
            (
                format.encoding.as_str(),
                format.sample_rate,
                format.channels,
                format.framing.as_str()
            ),
            ("pcm_s16le", 16000, 2, "raw")
        );
        assert_eq!(
            request.metadata["dialect"]["ignored_parameters"],
            json!({"model": "nova-3", "punctuate": "true"})
        );
        for (query, encoding) in [
            ("encoding=mulaw&sample_rate=8000", "mulaw"),
            ("encoding=alaw&sample_rate=8000", "alaw"),
            ("encoding=linear32&sample_rate=48000", "pcm_f32le"),
            ("encoding=opus&sample_rate=48000", "opus"),
            ("encoding=ogg-opus&sample_rate=16000&channels=1", "ogg_opus"),
        ] {
            let format = deepgram(query).1.unwrap().resolve().unwrap();
            assert_eq!(format.encoding.as_str(), encoding, "{query}");
        }
        // Containerized audio: no encoding, nothing starts yet.
        assert_eq!(deepgram("model=nova-3").1.unwrap().encoding, None);
        for (query, error) in [
            ("encoding=flac", "unsupported encoding"),
            ("encoding=linear16", "sample_rate is required"),
            (
                "encoding=linear16&sample_rate=16000&vad_events=yes",
                "true or false",
            ),
            (
                "encoding=linear16&sample_rate=16000&channels=3",
                "unsupported channels",
            ),
            (
                "encoding=linear16&sample_rate=16000&utterance_end_ms=soon",
                "utterance_end_ms",
            ),
        ] {
            let result = deepgram(query).1.and_then(|r| r.resolve().map(|_| r));
            let message = result.unwrap_err().to_string();
            assert!(message.contains(error), "{query}: {message}");
        }
    }

    #[test]
    fn control_messages() {
        let (mut dialect, _) = deepgram("encoding=linear16&sample_rate=16000");
        let mut out = Vec::new();
        for text in [
            r#"{"type":"KeepAlive"}"#,
            r#"{"type":"Finalize"}"#,
            r#"{"type":"CloseStream"}"#,
        ] {
            dialect.on_text(text, &mut out).unwrap();
        }
        dialect.on_binary(&Bytes::new(), &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Inbound::Keepalive,
                Inbound::Flush,
                Inbound::Stop,
                Inbound::Stop
            ]
        );
        let mut out = Vec::new();
        dialect
            .on_text(r#"{"type":"Configure","keyterms":["x"]}"#, &mut out)
            .unwrap();
        let Inbound::Reply(reply) = &out[0] else {
            panic!("{out:?}");
        };
        assert!(reply.contains("ConfigureFailure"));
        assert!(matches!(
            dialect.on_text(r#"{"type":"Dance"}"#, &mut out),
            Err(DialectError::UnknownMessageType { .. })
        ));
        assert!(matches!(
            dialect.on_text("KeepAlive", &mut out),
            Err(DialectError::Protocol(ProtocolError::MalformedJson(_)))
        ));
    }

    #[test]
    fn raw_pcm_cut_anywhere_is_handed_on_in_whole_frames() {
        let (mut dialect, _) = deepgram("encoding=linear16&sample_rate=16000&channels=2");
        let mut out = Vec::new();
        dialect
            .on_binary(&Bytes::from_static(&[1, 2, 3, 4, 5]), &mut out)
            .unwrap();
        dialect
            .on_binary(&Bytes::from_static(&[6, 7, 8, 9]), &mut out)
            .unwrap();
        assert_eq!(
            out,
            vec![
                Inbound::Audio(Bytes::from_static(&[1, 2, 3, 4])),
                Inbound::Audio(Bytes::from_static(&[5, 6, 7, 8]))
            ]
        );
    }

    fn wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(b"RIFF");
        w.extend_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        w.extend_from_slice(b"WAVE");
        w.extend_from_slice(b"fmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&tag.to_le_bytes());
        w.extend_from_slice(&channels.to_le_bytes());
        w.extend_from_slice(&rate.to_le_bytes());
        w.extend_from_slice(&(rate * u32::from(channels * bits / 8)).to_le_bytes());
        w.extend_from_slice(&(channels * bits / 8).to_le_bytes());
        w.extend_from_slice(&bits.to_le_bytes());
        w.extend_from_slice(b"LIST");
        w.extend_from_slice(&3u32.to_le_bytes());
        w.extend_from_slice(b"abc\0");
        w.extend_from_slice(b"data");
        w.extend_from_slice(&(data.len() as u32).to_le_bytes());
        w.extend_from_slice(data);
        w
    }

    #[test]
    fn a_wav_stream_without_encoding_is_read_from_its_header() {
        let file = wav(1, 1, 8000, 16, &[1, 0, 2, 0, 3, 0]);
        let (mut dialect, query) = deepgram("");
        assert_eq!(query.unwrap().encoding, None);
        let mut out = Vec::new();
        // The header arrives in pieces.
        for piece in file.chunks(7) {
            dialect
                .on_binary(&Bytes::copy_from_slice(piece), &mut out)
                .unwrap();
        }
        let Inbound::Start { request, .. } = &out[0] else {
            panic!("{out:?}");
        };
        let format = request.resolve().unwrap();
        assert_eq!(
            (
                format.encoding.as_str(),
                format.sample_rate,
                format.channels
            ),
            ("pcm_s16le", 8000, 1)
        );
        let audio: Vec<u8> = out[1..]
            .iter()
            .flat_map(|i| match i {
                Inbound::Audio(b) => b.to_vec(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(audio, vec![1, 0, 2, 0, 3, 0]);

        for (file, encoding) in [
            (wav(7, 1, 8000, 8, &[0xFF]), "mulaw"),
            (wav(3, 2, 48000, 32, &[0; 8]), "pcm_f32le"),
            (b"OggS\0\x02rest".to_vec(), "ogg_opus"),
            (vec![0x1A, 0x45, 0xDF, 0xA3, 1, 2], "webm_opus"),
        ] {
            let (mut dialect, _) = deepgram("");
            let mut out = Vec::new();
            dialect.on_binary(&Bytes::from(file), &mut out).unwrap();
            let Inbound::Start { request, .. } = &out[0] else {
                panic!("{out:?}");
            };
            assert_eq!(request.encoding.as_deref(), Some(encoding));
        }
        for file in [wav(2, 1, 8000, 4, &[0]), b"ID3\x04mp3 bytes".to_vec()] {
            let (mut dialect, _) = deepgram("");
            let error = dialect
                .on_binary(&Bytes::from(file), &mut Vec::new())
                .unwrap_err();
            assert!(
                error.to_string().contains("unsupported encoding"),
                "{error}"
            );
        }
    }

    #[test]
    fn results_speech_started_and_utterance_end_in_deepgram_shapes() {
        let (mut dialect, _) = deepgram(
            "encoding=linear16&sample_rate=16000&channels=2&vad_events=true&utterance_end_ms=1000",
        );
        assert!(render(&mut dialect, started(2)).is_empty());
        let speech = render(&mut dialect, vad(VadEventKind::SpeechStarted, 1, 0.544, 0));
        assert_eq!(
            speech,
            vec![json!({"type":"SpeechStarted","channel":[1,2],"timestamp":0.544})]
        );
        // The end of speech is held until the utterance's Results.
        assert!(render(&mut dialect, vad(VadEventKind::SpeechEnded, 1, 2.912, 0)).is_empty());
        let results = render(&mut dialect, transcript(0, 1, "hello from cochlea"));
        assert_eq!(
            results[0],
            json!({
                "type": "Results",
                "channel_index": [1, 2],
                "duration": 2.976,
                "start": 0.336,
                "is_final": true,
                "speech_final": true,
                "from_finalize": false,
                "channel": {"alternatives": [{"transcript": "hello from cochlea", "confidence": 1.0, "words": []}]},
                "metadata": {
                    "request_id": "req-1",
                    "model_info": {"name": "default", "version": env!("CARGO_PKG_VERSION"), "arch": "cochlea"},
                    "model_uuid": model_uuid("default"),
                },
            })
        );
        assert_eq!(
            results[1],
            json!({"type":"UtteranceEnd","channel":[1,2],"last_word_end":2.912})
        );
        assert_eq!(results.len(), 2);
    }

    #[test]
    fn interim_results_ask_for_partials_which_become_non_final_results_with_words_on_finals() {
        let (mut dialect, query) = deepgram(
            "encoding=linear16&sample_rate=16000&interim_results=true&utterance_end_ms=1000",
        );
        assert_eq!(query.unwrap().interim, Some(true));
        assert_eq!(
            deepgram("encoding=linear16&sample_rate=16000&interim_results=false")
                .1
                .unwrap()
                .interim,
            None
        );
        render(&mut dialect, started(1));
        render(&mut dialect, vad(VadEventKind::SpeechStarted, 0, 0.5, 0));
        let ServerMessage::Transcript(mut partial) = transcript(0, 0, "hello fr") else {
            unreachable!()
        };
        partial.is_final = false;
        partial.stable_text = Some("hello".into());
        let results = render(&mut dialect, ServerMessage::Transcript(partial));
        assert_eq!(results.len(), 1);
        assert_eq!(results[0]["is_final"], false);
        assert_eq!(results[0]["speech_final"], false);
        assert_eq!(
            results[0]["channel"]["alternatives"][0]["transcript"],
            "hello fr"
        );
        render(&mut dialect, vad(VadEventKind::SpeechEnded, 0, 2.9, 0));
        let ServerMessage::Transcript(mut last) = transcript(0, 0, "hello from cochlea") else {
            unreachable!()
        };
        last.words = Some(vec![
            crate::protocol::Word {
                word: "hello".into(),
                start: 0.5,
                end: 0.9,
                confidence: Some(0.75),
            },
            crate::protocol::Word {
                word: "from".into(),
                start: 1.0,
                end: 1.2,
                confidence: None,
            },
        ]);
        let results = render(&mut dialect, ServerMessage::Transcript(last));
        assert_eq!(results[0]["is_final"], true);
        assert_eq!(results[0]["speech_final"], true);
        assert_eq!(
            results[0]["channel"]["alternatives"][0]["words"],
            json!([
                {"word": "hello", "start": 0.5, "end": 0.9, "confidence": 0.75, "punctuated_word": "hello"},
                {"word": "from", "start": 1.0, "end": 1.2, "confidence": 1.0, "punctuated_word": "from"},
            ])
        );
        assert_eq!(results[1]["type"], "UtteranceEnd");
    }

    #[test]
    fn without_options_only_results_and_finalize_marks_open_utterances() {
        let (mut dialect, _) = deepgram("encoding=linear16&sample_rate=16000&endpointing=false");
        render(&mut dialect, started(1));
        assert!(render(&mut dialect, vad(VadEventKind::SpeechStarted, 0, 0.5, 0)).is_empty());
        dialect
            .on_text(r#"{"type":"Finalize"}"#, &mut Vec::new())
            .unwrap();
        assert!(render(&mut dialect, vad(VadEventKind::SpeechEnded, 0, 1.0, 0)).is_empty());
        let results = render(&mut dialect, transcript(0, 0, "cut short"));
        assert_eq!(results.len(), 1);
        assert_eq!(results[0]["from_finalize"], true);
        assert_eq!(results[0]["speech_final"], false);
        assert_eq!(results[0]["channel_index"], json!([0, 1]));
        let later = render(&mut dialect, transcript(1, 0, "later"));
        assert_eq!(later[0]["from_finalize"], false);
    }

    #[test]
    fn errors_failed_utterances_and_metadata_on_close() {
        let (mut dialect, _) =
            deepgram("encoding=linear16&sample_rate=16000&utterance_end_ms=1000");
        dialect
            .on_binary(&Bytes::from_static(b"abc"), &mut Vec::new())
            .unwrap();
        render(&mut dialect, started(1));
        render(&mut dialect, vad(VadEventKind::SpeechStarted, 0, 0.5, 0));
        render(&mut dialect, vad(VadEventKind::SpeechEnded, 0, 1.5, 0));
        render(&mut dialect, vad(VadEventKind::SpeechStarted, 0, 2.5, 1));
        render(&mut dialect, vad(VadEventKind::SpeechEnded, 0, 3.5, 1));
        // A failed utterance still ends.
        let failed = render(
            &mut dialect,
            ServerMessage::TranscribeError(TranscribeErrorInfo {
                code: ErrorCode::TranscribeFailed,
                message: "down".into(),
                fatal: false,
                channel: 0,
                utterance_id: Some(0),
                start: Some(0.3),
                end: Some(1.9),
                dropped: None,
            }),
        );
        assert_eq!(
            failed,
            vec![json!({"type":"UtteranceEnd","channel":[0,1],"last_word_end":1.5})]
        );
        let warning = render(
            &mut dialect,
            ServerMessage::Error {
                code: ErrorCode::AudioTooFast,
                message: "slow down".into(),
                fatal: false,
            },
        );
        assert!(warning.is_empty(), "Deepgram has no warning message");
        let fatal = render(
            &mut dialect,
            ServerMessage::Error {
                code: ErrorCode::PartialFrame,
                message: "641 bytes".into(),
                fatal: true,
            },
        );
        assert_eq!(
            fatal,
            vec![json!({"type":"Error","variant":"partial_frame","description":"641 bytes"})]
        );
        let closing = render(
            &mut dialect,
            ServerMessage::Closed(ClosedSummary {
                reason: "stop",
                close_code: 1000,
                duration_seconds: 4.825,
                sample_frames: 77200,
                audio_messages: 242,
                audio_bytes: 154400,
                gap_frames: 0,
                duplicate_messages: 0,
                damaged_packets: 0,
                concealed_frames: 0,
            }),
        );
        // Utterance 1's end, never transcribed, goes out before Metadata.
        assert_eq!(closing[0]["type"], "UtteranceEnd");
        assert_eq!(closing[0]["last_word_end"], 3.5);
        let metadata = &closing[1];
        assert_eq!(metadata["type"], "Metadata");
        assert_eq!(metadata["request_id"], "req-1");
        assert_eq!(metadata["duration"], 4.825);
        assert_eq!(metadata["channels"], 1);
        assert_eq!(
            metadata["sha256"], "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256 of the audio received (\"abc\")"
        );
        assert_eq!(metadata["models"], json!([model_uuid("default")]));
        assert_eq!(
            metadata["model_info"][model_uuid("default")]["name"],
            "default"
        );
        assert_eq!(closing.len(), 2);
    }
}
