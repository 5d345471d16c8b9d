//! Twilio Media Streams (`/twilio`), as `<Connect><Stream>` or
//! `<Start><Stream>` sends it: JSON text frames only, `connected`, `start`,
//! `media` (base64 μ-law, 8 kHz), `dtmf`, `mark`, `stop`; numbers written as
//! JSON strings.
//!
//! With both tracks the stream is stereo, inbound left and outbound right.
//! The two tracks arrive in separate `media` messages, each with its own
//! `timestamp` (ms since the stream began), so an [`Interleaver`] lays both
//! on one media timeline before the session sees them: a time for which one
//! track sent nothing is silence on that channel, a time for which neither
//! did is a gap that the session's seq framing fills (and counts).
//!
//! Twilio reads nothing of ours but `media`, `mark` and `clear`, so every
//! session message is dropped; an error is told in the close frame (code and
//! the error code as reason). Twilio's `mark` is the echo of a mark the server
//! sent after its own audio; cochlea sends neither audio nor marks, so an
//! incoming mark is only logged, never echoed (an echo of an echo would start
//! a loop).

use std::collections::VecDeque;

use actix_web::web::Bytes;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::{
    excerpt, json_object, number_field, only_stream_parameters, start_request, string_field,
    DeferredAuth, Dialect, DialectError, DialectKind, Inbound, Prepared, STREAM_PARAMETERS,
};
use crate::protocol::{ProtocolError, ServerMessage, StartRequest, SEQ_HEADER_BYTES};
use crate::server::registry::KeyGuard;

const NAME: &str = "twilio";
/// Twilio Media Streams audio: G.711 μ-law, 8000 Hz, one byte per sample.
const SAMPLE_RATE: u64 = 8000;
const FRAMES_PER_MS: u64 = SAMPLE_RATE / 1000;
/// μ-law's zero: what a channel holds where its track sent nothing.
const MULAW_SILENCE: u8 = 0xFF;
/// How far one track may run ahead of the other before the other's missing
/// time is taken as silence (Twilio sends both tracks every 20 ms, so this
/// only matters when one track stalls or is never sent).
pub const MAX_TRACK_LAG_MS: u64 = 1000;
/// Longest message handed to the session (1 s of audio).
const MAX_BLOCK_FRAMES: u64 = SAMPLE_RATE;

pub fn prepare(
    session_id: &str,
    pairs: &[(String, String)],
    deferred_auth: Option<DeferredAuth>,
) -> Prepared {
    let (chosen, query) = match only_stream_parameters(NAME, pairs) {
        Ok(chosen) => (chosen, Ok(StartRequest::default())),
        Err(e) => (Vec::new(), Err(e)),
    };
    Prepared {
        dialect: Box::new(Twilio {
            session_id: session_id.to_owned(),
            chosen,
            deferred_auth,
            key_guard: None,
            tracks: Vec::new(),
            interleaver: None,
        }),
        query,
    }
}

pub struct Twilio {
    session_id: String,
    /// `transcribe`/`sinks` from the URL (custom parameters override them).
    chosen: Vec<(String, String)>,
    deferred_auth: Option<DeferredAuth>,
    /// Held for the session's life: its count against the API key.
    key_guard: Option<KeyGuard>,
    /// Track names in channel order (`inbound` first).
    tracks: Vec<&'static str>,
    interleaver: Option<Interleaver>,
}

impl Twilio {
    fn on_start(
        &mut self,
        message: &Map<String, Value>,
        out: &mut Vec<Inbound>,
    ) -> Result<(), DialectError> {
        if self.interleaver.is_some() {
            return Err(ProtocolError::AlreadyStarted.into());
        }
        let start = match message.get("start") {
            Some(Value::Object(start)) => start,
            _ => {
                return Err(ProtocolError::InvalidMessage(
                    "twilio start event without a start object".into(),
                )
                .into())
            }
        };
        self.tracks = parse_tracks(start.get("tracks"))?;
        check_media_format(start.get("mediaFormat"))?;

        let mut metadata = Map::new();
        let mut chosen = self.chosen.clone();
        let mut token = None;
        match start.get("customParameters") {
            None | Some(Value::Null) => {}
            Some(Value::Object(custom)) => {
                for (key, value) in custom {
                    if key == "token" {
                        // A credential: used, never stored.
                        token = value.as_str().map(str::to_owned);
                    } else if STREAM_PARAMETERS.contains(&key.as_str()) {
                        let Some(text) = value.as_str() else {
                            return Err(ProtocolError::InvalidMessage(format!(
                                "twilio customParameters.{key} must be a string"
                            ))
                            .into());
                        };
                        chosen.retain(|(k, _)| k != key);
                        chosen.push((key.clone(), text.to_owned()));
                    } else {
                        metadata.insert(key.clone(), value.clone());
                    }
                }
            }
            Some(_) => {
                return Err(ProtocolError::InvalidMessage(
                    "twilio start.customParameters must be an object".into(),
                )
                .into())
            }
        }
        let mut max_session_ms = None;
        if let Some(deferred) = self.deferred_auth.take() {
            let (cap, guard) = deferred.admit(token.as_deref())?;
            max_session_ms = cap;
            self.key_guard = Some(guard);
        }

        let sid = |key: &str| {
            start
                .get(key)
                .or_else(|| message.get(key))
                .cloned()
                .unwrap_or(Value::Null)
        };
        metadata.insert(
            "dialect".into(),
            json!({
                "name": NAME,
                "streamSid": sid("streamSid"),
                "callSid": sid("callSid"),
                "accountSid": sid("accountSid"),
                "tracks": self.tracks,
            }),
        );
        let channels = self.tracks.len();
        let request = start_request(
            &[
                ("encoding", "mulaw".into()),
                ("sample_rate", SAMPLE_RATE.to_string()),
                ("channels", channels.to_string()),
                ("framing", "seq".into()),
            ],
            &chosen,
            metadata,
        )?;
        tracing::info!(
            tracks = ?self.tracks,
            session = %self.session_id,
            "twilio stream started"
        );
        self.interleaver = Some(Interleaver::new(channels, MAX_TRACK_LAG_MS * FRAMES_PER_MS));
        out.push(Inbound::Start {
            request,
            max_session_ms,
        });
        Ok(())
    }

    fn on_media(
        &mut self,
        message: &Map<String, Value>,
        out: &mut Vec<Inbound>,
    ) -> Result<(), DialectError> {
        let Some(interleaver) = self.interleaver.as_mut() else {
            return Err(ProtocolError::AudioBeforeStart.into());
        };
        let Some(Value::Object(media)) = message.get("media") else {
            return Err(ProtocolError::InvalidMessage(
                "twilio media event without a media object".into(),
            )
            .into());
        };
        let track_name = string_field(NAME, media, "media", "track")?.unwrap_or("inbound");
        let track = normalize_track(track_name)
            .and_then(|t| self.tracks.iter().position(|&known| known == t))
            .ok_or_else(|| DialectError::UnknownTrack {
                dialect: NAME,
                track: excerpt(track_name, 32),
                announced: self.tracks.join(","),
            })?;
        let timestamp_ms = number_field(NAME, media, "media", "timestamp")?.ok_or_else(|| {
            ProtocolError::InvalidMessage("twilio media.timestamp is missing".into())
        })?;
        let at = timestamp_ms.checked_mul(FRAMES_PER_MS).ok_or_else(|| {
            ProtocolError::InvalidMessage(format!(
                "twilio media.timestamp {timestamp_ms} is out of range"
            ))
        })?;
        let payload = string_field(NAME, media, "media", "payload")?.ok_or_else(|| {
            ProtocolError::InvalidMessage("twilio media.payload is missing".into())
        })?;
        let audio = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|e| DialectError::InvalidPayload {
                dialect: NAME,
                detail: e.to_string(),
            })?;
        // The chunk's end must be a media time too: past u64 it wrapped, and
        // the chunk stuck at the head of its track hid all later audio
        // (found by the dialect_twilio fuzz target).
        if at.checked_add(audio.len() as u64).is_none() {
            return Err(ProtocolError::InvalidMessage(format!(
                "twilio media.timestamp {timestamp_ms} is out of range"
            ))
            .into());
        }
        interleaver.push(track, at, &audio);
        interleaver.drain(out);
        Ok(())
    }
}

impl Dialect for Twilio {
    fn kind(&self) -> DialectKind {
        DialectKind::Twilio
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        let message = json_object(NAME, text)?;
        let event = string_field(NAME, &message, "message", "event")?.ok_or_else(|| {
            ProtocolError::InvalidMessage("twilio message without an event".into())
        })?;
        match event {
            "connected" => {
                let protocol = message
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                out.push(Inbound::Event {
                    name: "connected",
                    detail: excerpt(protocol, 32),
                });
                Ok(())
            }
            "start" => self.on_start(&message, out),
            "media" => self.on_media(&message, out),
            "dtmf" => {
                let dtmf = message.get("dtmf").and_then(Value::as_object);
                let field = |key| {
                    dtmf.and_then(|d| d.get(key))
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                };
                out.push(Inbound::Event {
                    name: "dtmf",
                    detail: format!(
                        "digit {} on {}",
                        excerpt(field("digit"), 4),
                        excerpt(field("track"), 16)
                    ),
                });
                Ok(())
            }
            "mark" => {
                let name = message
                    .get("mark")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                out.push(Inbound::Event {
                    name: "mark",
                    detail: excerpt(name, 64),
                });
                Ok(())
            }
            "stop" => {
                out.push(Inbound::Stop);
                Ok(())
            }
            other => {
                // A newer event this version does not know: not an error.
                out.push(Inbound::Event {
                    name: "unknown",
                    detail: excerpt(other, 32),
                });
                Ok(())
            }
        }
    }

    fn on_binary(&mut self, _data: &Bytes, _out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        Err(DialectError::BinaryNotAllowed { dialect: NAME })
    }

    fn finish(&mut self, out: &mut Vec<Inbound>) {
        if let Some(interleaver) = self.interleaver.as_mut() {
            interleaver.finish(out);
            if interleaver.late_frames > 0 {
                tracing::info!(
                    late_frames = interleaver.late_frames,
                    "twilio audio for time already recorded was dropped (repeated chunks or a track over the lag limit)"
                );
            }
        }
    }

    fn render(&mut self, _message: &ServerMessage, _out: &mut Vec<String>) {
        // Twilio accepts only media, mark and clear: nothing of ours.
    }
}

fn normalize_track(name: &str) -> Option<&'static str> {
    match name {
        "inbound" | "inbound_track" => Some("inbound"),
        "outbound" | "outbound_track" => Some("outbound"),
        _ => None,
    }
}

/// `start.tracks`, in channel order: inbound left, outbound right.
fn parse_tracks(tracks: Option<&Value>) -> Result<Vec<&'static str>, ProtocolError> {
    let names: Vec<&'static str> = match tracks {
        // Twilio's default stream is the inbound track.
        None | Some(Value::Null) => vec!["inbound"],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().and_then(normalize_track).ok_or_else(|| {
                    ProtocolError::InvalidMessage(format!(
                        "twilio start.tracks holds {item}; expected \"inbound\" and/or \"outbound\""
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ProtocolError::InvalidMessage(
                "twilio start.tracks must be an array of track names".into(),
            ))
        }
    };
    let mut ordered = Vec::new();
    for track in ["inbound", "outbound"] {
        if names.contains(&track) {
            ordered.push(track);
        }
    }
    if ordered.is_empty() {
        return Err(ProtocolError::InvalidMessage(
            "twilio start.tracks is empty".into(),
        ));
    }
    Ok(ordered)
}

fn check_media_format(format: Option<&Value>) -> Result<(), DialectError> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(());
    };
    let unsupported = || DialectError::UnsupportedMediaFormat {
        dialect: NAME,
        found: excerpt(&format.to_string(), 120),
        expected: "audio/x-mulaw at 8000 Hz, 1 channel",
    };
    let Some(format) = format.as_object() else {
        return Err(unsupported());
    };
    let encoding_ok = format
        .get("encoding")
        .and_then(Value::as_str)
        .is_none_or(|e| e.eq_ignore_ascii_case("audio/x-mulaw"));
    let number = |key: &str| {
        format.get(key).map(|v| match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
    };
    let rate_ok = number("sampleRate").is_none_or(|r| r == Some(SAMPLE_RATE));
    let channels_ok = number("channels").is_none_or(|c| c == Some(1));
    if encoding_ok && rate_ok && channels_ok {
        Ok(())
    } else {
        Err(unsupported())
    }
}

/// One track's audio not yet handed on: segments in media order, not
/// overlapping, none before the interleaver's `emitted` point.
#[derive(Default)]
struct TrackBuffer {
    segments: VecDeque<(u64, Vec<u8>)>,
    /// Media time (sample frames) after the latest audio received.
    end: u64,
}

/// Lays one or two tracks, each with its own timestamps, on one timeline
/// and hands out interleaved `framing=seq` messages.
pub struct Interleaver {
    tracks: Vec<TrackBuffer>,
    /// Everything before this sample frame has been handed out.
    emitted: u64,
    max_lag_frames: u64,
    next_seq: u32,
    /// Sample frames dropped because their time had already been handed out
    /// (a repeated chunk, or a track that lagged beyond the limit).
    pub late_frames: u64,
    /// Hand out everything up to here at the next drain (a timestamp jump).
    flush_to: u64,
}

impl Interleaver {
    pub fn new(channels: usize, max_lag_frames: u64) -> Self {
        Self {
            tracks: (0..channels.max(1))
                .map(|_| TrackBuffer::default())
                .collect(),
            emitted: 0,
            max_lag_frames,
            next_seq: 0,
            late_frames: 0,
            flush_to: 0,
        }
    }

    /// Adds `audio` (one byte per sample) for `track` at sample frame `at`.
    pub fn push(&mut self, track: usize, at: u64, audio: &[u8]) {
        let Some(buffer) = self.tracks.get(track) else {
            return;
        };
        // Audio for time already covered is dropped: the timeline is the
        // timestamps', and a frame is never emitted twice.
        let floor = buffer.end.max(self.emitted);
        let skip = usize::try_from(floor.saturating_sub(at))
            .unwrap_or(usize::MAX)
            .min(audio.len());
        self.late_frames += skip as u64;
        let audio = &audio[skip..];
        if audio.is_empty() {
            return;
        }
        let at = at.max(floor);
        let timeline_end = self
            .tracks
            .iter()
            .map(|t| t.end)
            .max()
            .unwrap_or(0)
            .max(self.emitted);
        let end = at + audio.len() as u64;
        if let Some(buffer) = self.tracks.get_mut(track) {
            buffer.end = end;
            buffer.segments.push_back((at, audio.to_vec()));
        }
        // A jump beyond the lag limit is handed on at once, so the session
        // judges the gap now (filled, or refused as gap_too_large) instead
        // of the other track's audio being dropped as late behind it until
        // the call ends (issue 15, item 2).
        if at > timeline_end.saturating_add(self.max_lag_frames) {
            self.flush_to = self.flush_to.max(end);
        }
    }

    /// Hands out what every track has covered, or, when one track lags by
    /// more than the limit, everything but the last `max_lag_frames` (the
    /// lagging track is silent there).
    pub fn drain(&mut self, out: &mut Vec<Inbound>) {
        let min_end = self.tracks.iter().map(|t| t.end).min().unwrap_or(0);
        let max_end = self.tracks.iter().map(|t| t.end).max().unwrap_or(0);
        let ready = min_end
            .max(max_end.saturating_sub(self.max_lag_frames))
            .max(self.flush_to);
        self.emit_until(ready, out);
    }

    /// Hands out everything.
    pub fn finish(&mut self, out: &mut Vec<Inbound>) {
        let max_end = self.tracks.iter().map(|t| t.end).max().unwrap_or(0);
        self.emit_until(max_end, out);
    }

    fn emit_until(&mut self, to: u64, out: &mut Vec<Inbound>) {
        let channels = self.tracks.len();
        while self.emitted < to {
            let pos = self.emitted;
            let mut end = to;
            let mut covered = false;
            for track in &self.tracks {
                if let Some((start, audio)) = track.segments.front() {
                    if *start == pos {
                        covered = true;
                        end = end.min(start + audio.len() as u64);
                    } else {
                        end = end.min(*start);
                    }
                }
            }
            if !covered {
                // No track has audio here: a gap, filled by the session.
                self.emitted = end;
                continue;
            }
            let end = end.min(pos.saturating_add(MAX_BLOCK_FRAMES));
            let frames = (end - pos) as usize;
            let mut message = Vec::with_capacity(SEQ_HEADER_BYTES + frames * channels);
            message.extend_from_slice(&self.next_seq.to_le_bytes());
            message.extend_from_slice(&pos.to_le_bytes());
            let slices: Vec<Option<&[u8]>> = self
                .tracks
                .iter()
                .map(|t| match t.segments.front() {
                    Some((start, audio)) if *start == pos => Some(&audio[..frames]),
                    _ => None,
                })
                .collect();
            for i in 0..frames {
                for slice in &slices {
                    message.push(slice.map_or(MULAW_SILENCE, |s| s[i]));
                }
            }
            for track in &mut self.tracks {
                if let Some((start, audio)) = track.segments.front_mut() {
                    if *start == pos {
                        if audio.len() == frames {
                            track.segments.pop_front();
                        } else {
                            audio.drain(..frames);
                            *start = end;
                        }
                    }
                }
            }
            self.next_seq = self.next_seq.wrapping_add(1);
            self.emitted = end;
            out.push(Inbound::Audio(Bytes::from(message)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (seq, timestamp, interleaved bytes) of the messages handed out.
    fn messages(out: Vec<Inbound>) -> Vec<(u32, u64, Vec<u8>)> {
        out.into_iter()
            .map(|i| match i {
                Inbound::Audio(b) => (
                    u32::from_le_bytes(b[0..4].try_into().unwrap()),
                    u64::from_le_bytes(b[4..12].try_into().unwrap()),
                    b[12..].to_vec(),
                ),
                other => panic!("expected audio, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn two_tracks_are_interleaved_on_their_timestamps() {
        let mut il = Interleaver::new(2, 8000);
        let mut out = Vec::new();
        il.push(0, 0, &[1, 2, 3, 4]);
        il.drain(&mut out);
        assert!(out.is_empty(), "waits for the other track");
        il.push(1, 0, &[11, 12]);
        il.drain(&mut out);
        il.push(1, 2, &[13, 14]);
        il.drain(&mut out);
        assert_eq!(
            messages(out),
            vec![(0, 0, vec![1, 11, 2, 12]), (1, 2, vec![3, 13, 4, 14])]
        );
    }

    #[test]
    fn a_gap_in_one_track_is_silence_on_its_channel_and_in_both_a_seq_gap() {
        let mut il = Interleaver::new(2, 8000);
        let mut out = Vec::new();
        il.push(0, 0, &[1, 2]);
        il.push(1, 0, &[11, 12]);
        // Track 0 skips frames 2..4; track 1 goes on.
        il.push(1, 2, &[13, 14, 15]);
        il.push(0, 4, &[5]);
        // Both skip 5..8.
        il.push(0, 8, &[9]);
        il.push(1, 8, &[19]);
        il.finish(&mut out);
        let s = MULAW_SILENCE;
        assert_eq!(
            messages(out),
            vec![
                (0, 0, vec![1, 11, 2, 12]),
                (1, 2, vec![s, 13, s, 14]),
                (2, 4, vec![5, 15]),
                (3, 8, vec![9, 19]),
            ]
        );
    }

    #[test]
    fn a_stalled_track_holds_back_at_most_the_lag() {
        let mut il = Interleaver::new(2, 4);
        let mut out = Vec::new();
        il.push(0, 0, &[1, 2, 3, 4, 5, 6]);
        il.drain(&mut out);
        // 6 frames of track 0, none of track 1: all but the last 4 go out.
        assert_eq!(
            messages(std::mem::take(&mut out)),
            vec![(0, 0, vec![1, MULAW_SILENCE, 2, MULAW_SILENCE])]
        );
        // Track 1's audio for time already out is late and dropped.
        il.push(1, 0, &[11, 12, 13]);
        assert_eq!(il.late_frames, 2);
        il.finish(&mut out);
        assert_eq!(
            messages(out),
            vec![
                (1, 2, vec![3, 13]),
                (
                    2,
                    3,
                    vec![4, MULAW_SILENCE, 5, MULAW_SILENCE, 6, MULAW_SILENCE]
                )
            ]
        );
    }

    #[test]
    fn a_jump_beyond_the_lag_is_handed_on_at_once() {
        let mut il = Interleaver::new(2, 4);
        let mut out = Vec::new();
        il.push(0, 0, &[1, 2]);
        il.drain(&mut out);
        // Within the lag: held back, waiting for track 1.
        assert!(out.is_empty());
        // Far beyond it: everything up to and including the jumped audio
        // goes out now, so the session sees the jump (and judges its gap).
        il.push(0, 1_000_000, &[3]);
        il.drain(&mut out);
        assert_eq!(
            messages(out),
            vec![
                (0, 0, vec![1, MULAW_SILENCE, 2, MULAW_SILENCE]),
                (1, 1_000_000, vec![3, MULAW_SILENCE])
            ]
        );
    }

    #[test]
    fn one_track_passes_straight_through_with_its_timestamps() {
        let mut il = Interleaver::new(1, 8000);
        let mut out = Vec::new();
        il.push(0, 160, &[7; 160]);
        il.drain(&mut out);
        // A repeat of the same chunk is dropped, not recorded twice.
        il.push(0, 160, &[7; 160]);
        il.drain(&mut out);
        il.push(0, 320, &[8; 160]);
        il.drain(&mut out);
        assert_eq!(
            messages(out),
            vec![(0, 160, vec![7; 160]), (1, 320, vec![8; 160])]
        );
        assert_eq!(il.late_frames, 160);
    }

    fn start_message(tracks: &str, custom: &str) -> String {
        format!(
            r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":{tracks},"customParameters":{custom},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"MZ1"}}"#
        )
    }

    fn twilio(query: &[(&str, &str)]) -> Twilio {
        let pairs: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Twilio {
            session_id: "s".into(),
            chosen: pairs,
            deferred_auth: None,
            key_guard: None,
            tracks: Vec::new(),
            interleaver: None,
        }
    }

    #[test]
    fn start_becomes_a_stereo_mulaw_seq_stream_with_metadata() {
        let mut t = twilio(&[("sinks", "record")]);
        let mut out = Vec::new();
        t.on_text(
            &start_message(
                r#"["outbound","inbound"]"#,
                r#"{"agent":"ana","transcribe":"none","token":"secret"}"#,
            ),
            &mut out,
        )
        .unwrap();
        let Some(Inbound::Start {
            request,
            max_session_ms,
        }) = out.pop()
        else {
            panic!("no start");
        };
        assert_eq!(max_session_ms, None);
        let format = request.resolve().unwrap();
        assert_eq!(
            (
                format.encoding.as_str(),
                format.sample_rate,
                format.channels,
                format.framing.as_str()
            ),
            ("mulaw", 8000, 2, "seq")
        );
        assert_eq!(request.transcribe.as_deref(), Some("none"));
        assert_eq!(request.sinks, Some(vec!["record".to_owned()]));
        assert_eq!(request.metadata["agent"], "ana");
        assert!(
            !request.metadata.contains_key("token"),
            "a credential is never stored"
        );
        assert_eq!(
            request.metadata["dialect"]["tracks"],
            json!(["inbound", "outbound"])
        );
        assert_eq!(request.metadata["dialect"]["callSid"], "CA1");

        // The outbound track goes right even though it was listed first.
        let media = |track: &str, ts: &str, payload: &[u8]| {
            format!(
                r#"{{"event":"media","sequenceNumber":"3","media":{{"track":"{track}","chunk":"1","timestamp":"{ts}","payload":"{}"}},"streamSid":"MZ1"}}"#,
                base64::engine::general_purpose::STANDARD.encode(payload)
            )
        };
        t.on_text(&media("outbound", "0", &[2; 8]), &mut out)
            .unwrap();
        t.on_text(&media("inbound", "0", &[1; 8]), &mut out)
            .unwrap();
        let got = messages(out);
        assert_eq!(got, vec![(0, 0, [1, 2].repeat(8))]);
    }

    #[test]
    fn malformed_messages_are_named() {
        let mut t = twilio(&[]);
        let mut out = Vec::new();
        let err =
            |t: &mut Twilio, text: &str| t.on_text(text, &mut Vec::new()).unwrap_err().to_string();
        assert!(err(&mut t, "{nope").contains("not valid JSON"));
        assert!(err(&mut t, r#"{"sequenceNumber":"1"}"#).contains("without an event"));
        assert!(err(
            &mut t,
            r#"{"event":"media","media":{"track":"inbound","timestamp":"0","payload":""}}"#
        )
        .contains("before the stream format"));
        let bad_format = r#"{"event":"start","start":{"tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-l16","sampleRate":16000,"channels":1}}}"#;
        assert!(matches!(
            t.on_text(bad_format, &mut out),
            Err(DialectError::UnsupportedMediaFormat { .. })
        ));
        t.on_text(&start_message(r#"["inbound"]"#, "{}"), &mut out)
            .unwrap();
        assert!(matches!(
            t.on_text(r#"{"event":"media","media":{"track":"outbound","timestamp":"0","payload":"AA=="}}"#, &mut out),
            Err(DialectError::UnknownTrack { .. })
        ));
        assert!(matches!(
            t.on_text(
                r#"{"event":"media","media":{"track":"inbound","timestamp":"0","payload":"***"}}"#,
                &mut out
            ),
            Err(DialectError::InvalidPayload { .. })
        ));
        assert!(err(
            &mut t,
            r#"{"event":"media","media":{"track":"inbound","timestamp":"soon","payload":"AA=="}}"#
        )
        .contains("media.timestamp"));
        assert!(matches!(
            t.on_binary(&Bytes::from_static(b"\xff"), &mut out),
            Err(DialectError::BinaryNotAllowed { .. })
        ));
        assert!(matches!(
            t.on_text(&start_message(r#"["inbound"]"#, "{}"), &mut out),
            Err(DialectError::Protocol(ProtocolError::AlreadyStarted))
        ));
    }

    #[test]
    fn a_timestamp_whose_chunk_ends_past_u64_is_refused() {
        // Found by the dialect_twilio fuzz target: the chunk's end overflowed
        // (a panic in debug builds; in release it wrapped, and the chunk
        // stuck at the head of its track hid every later one).
        let mut t = twilio(&[]);
        let mut out = Vec::new();
        t.on_text(&start_message(r#"["inbound"]"#, "{}"), &mut out)
            .unwrap();
        let last_ms = u64::MAX / FRAMES_PER_MS;
        let media = format!(
            r#"{{"event":"media","media":{{"track":"inbound","timestamp":"{last_ms}","payload":"{}"}}}}"#,
            base64::engine::general_purpose::STANDARD.encode([0xFF; 160])
        );
        let error = t.on_text(&media, &mut out).unwrap_err().to_string();
        assert!(error.contains("out of range"), "{error}");
        // The first sample frame of that millisecond is still a media time.
        let mut il = Interleaver::new(1, 8000);
        il.push(0, u64::MAX - 1, &[1]);
        il.finish(&mut out);
    }

    #[test]
    fn events_are_kept_and_nothing_is_rendered() {
        let mut t = twilio(&[]);
        let mut out = Vec::new();
        t.on_text(
            r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
            &mut out,
        )
        .unwrap();
        t.on_text(r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#, &mut out).unwrap();
        t.on_text(
            r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"my label"}}"#,
            &mut out,
        )
        .unwrap();
        t.on_text(r#"{"event":"stop","sequenceNumber":"5","stop":{"accountSid":"AC1","callSid":"CA1"},"streamSid":"MZ1"}"#, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Inbound::Event {
                    name: "connected",
                    detail: "Call".into()
                },
                Inbound::Event {
                    name: "dtmf",
                    detail: "digit 1 on inbound_track".into()
                },
                Inbound::Event {
                    name: "mark",
                    detail: "my label".into()
                },
                Inbound::Stop,
            ]
        );
        let mut rendered = Vec::new();
        t.render(
            &ServerMessage::Transcript(crate::protocol::Transcript {
                utterance_id: 0,
                channel: 0,
                start: 0.0,
                end: 1.0,
                text: "hello".into(),
                stable_text: None,
                is_final: true,
                words: None,
                backend: "default".into(),
                backend_ms: 1,
            }),
            &mut rendered,
        );
        assert!(rendered.is_empty(), "Twilio reads no messages of ours");
    }
}
