//! Client → server text messages, and the stream request they share with the
//! query string.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::format::{parse_channels, parse_sample_rate, Encoding, Framing, StreamFormat};
use super::format::{MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, OPUS_SAMPLE_RATES};
use super::ProtocolError;

/// What a client asked for, from the query string, a `start` message, or both
/// (the `start` message wins field by field). Nothing here is validated yet
/// beyond types: see [`StartRequest::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    pub encoding: Option<String>,
    pub sample_rate: Option<u32>,
    pub channels: Option<u16>,
    pub framing: Option<String>,
    /// `None`: the configured default sinks. `Some(vec![])`: no sinks.
    pub sinks: Option<Vec<String>>,
    /// Transcription backend by name; `none` for no transcription; `None`:
    /// the configured `default` backend, if any.
    pub transcribe: Option<String>,
    /// Recording format (`wav`, `flac`, `ogg_opus`); checked against the
    /// server's `recorder.client_formats` when the stream starts.
    pub record_format: Option<String>,
    /// `interim=true`: partial transcripts while an utterance is open.
    pub interim: Option<bool>,
    pub metadata: Map<String, Value>,
    /// `webrtc`: the audio comes over WebRTC, negotiated with `sdp` (the
    /// client's offer); `websocket` or unset: in binary messages.
    pub transport: Option<String>,
    pub sdp: Option<String>,
}

impl StartRequest {
    /// Reads the stream parameters of a query string (already percent-decoded pairs).
    ///
    /// An unknown parameter is an error, so that a typo such as `samplerate=`
    /// fails loudly instead of silently falling back to a default.
    pub fn from_query<'a, I>(pairs: I) -> Result<Self, ProtocolError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut request = StartRequest::default();
        for (key, value) in pairs {
            match key {
                "encoding" => request.encoding = Some(value.to_owned()),
                "sample_rate" => request.sample_rate = Some(parse_sample_rate(value)?),
                "channels" => request.channels = Some(parse_channels(value)?),
                "framing" => request.framing = Some(value.to_owned()),
                "sinks" => request.sinks = Some(parse_sink_list(value)),
                "transcribe" => request.transcribe = Some(parse_backend_name(value)?),
                "record_format" => request.record_format = Some(value.to_owned()),
                "interim" => request.interim = Some(parse_interim(value)?),
                other => return Err(ProtocolError::UnknownParameter(other.to_owned())),
            }
        }
        Ok(request)
    }

    /// True when the query string alone starts the stream.
    pub fn starts_stream(&self) -> bool {
        self.encoding.is_some()
    }

    /// Overlays a `start` message on the query-string request.
    pub fn merged_with(mut self, start: StartRequest) -> StartRequest {
        if start.encoding.is_some() {
            self.encoding = start.encoding;
        }
        if start.sample_rate.is_some() {
            self.sample_rate = start.sample_rate;
        }
        if start.channels.is_some() {
            self.channels = start.channels;
        }
        if start.framing.is_some() {
            self.framing = start.framing;
        }
        if start.sinks.is_some() {
            self.sinks = start.sinks;
        }
        if start.transcribe.is_some() {
            self.transcribe = start.transcribe;
        }
        if start.record_format.is_some() {
            self.record_format = start.record_format;
        }
        if start.interim.is_some() {
            self.interim = start.interim;
        }
        if start.transport.is_some() {
            self.transport = start.transport;
        }
        if start.sdp.is_some() {
            self.sdp = start.sdp;
        }
        self.metadata.extend(start.metadata);
        self
    }

    /// Whether the audio comes over WebRTC (`transport: webrtc`).
    pub fn webrtc(&self) -> Result<bool, ProtocolError> {
        match self.transport.as_deref() {
            None | Some("websocket") => Ok(false),
            Some("webrtc") => Ok(true),
            Some(other) => Err(ProtocolError::InvalidMessage(format!(
                "transport must be websocket or webrtc, not '{}'",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }

    /// A `transport: webrtc` request as the stream it becomes: Opus
    /// packets at 48 kHz in `channels`, with RTP's sequence numbers and
    /// media time as `framing=seq` headers. The client names no format.
    pub fn for_webrtc(mut self, channels: u16) -> Result<Self, ProtocolError> {
        let named = [
            ("encoding", self.encoding.is_some()),
            ("sample_rate", self.sample_rate.is_some()),
            ("channels", self.channels.is_some()),
            ("framing", self.framing.is_some()),
        ];
        if let Some((name, _)) = named.iter().find(|(_, set)| *set) {
            return Err(ProtocolError::InvalidMessage(format!(
                "transport webrtc takes its format from the SDP offer: omit {name}"
            )));
        }
        self.encoding = Some("opus".into());
        self.sample_rate = Some(48_000);
        self.channels = Some(channels);
        self.framing = Some("seq".into());
        Ok(self)
    }

    /// Validates the request into the effective stream format.
    pub fn resolve(&self) -> Result<StreamFormat, ProtocolError> {
        let encoding_name = self.encoding.as_deref().ok_or_else(|| {
            ProtocolError::InvalidMessage(
                "encoding is required (in start or in the query string)".into(),
            )
        })?;
        let encoding = Encoding::parse(encoding_name)?;
        let sample_rate = match self.sample_rate.or(encoding.default_sample_rate()) {
            Some(rate) => rate,
            None => return Err(ProtocolError::MissingSampleRate(encoding.as_str())),
        };
        let framing = match self.framing.as_deref() {
            Some(text) => Framing::parse(text)?,
            None => Framing::default(),
        };
        if encoding.is_opus() && !OPUS_SAMPLE_RATES.contains(&sample_rate) {
            return Err(ProtocolError::UnsupportedSampleRate(format!(
                "{sample_rate} (Opus decodes at 8000, 12000, 16000, 24000 or 48000)"
            )));
        }
        if encoding.is_container() {
            if self.channels.is_some() {
                return Err(ProtocolError::InvalidMessage(format!(
                    "{} takes its channel count from the container header: omit channels",
                    encoding.as_str()
                )));
            }
            if framing != Framing::Raw {
                return Err(ProtocolError::UnsupportedFraming(format!(
                    "{} (a container stream is cut anywhere: use framing=raw)",
                    framing.as_str()
                )));
            }
        }
        Ok(StreamFormat {
            encoding,
            sample_rate,
            // For containers, provisional until the header says.
            channels: self.channels.unwrap_or(1),
            framing,
        })
    }
}

/// A backend name as configured (letters, digits, `-`, `_`), or `none`.
/// An empty value means `none`.
fn parse_backend_name(text: &str) -> Result<String, ProtocolError> {
    let name = text.trim();
    if name.is_empty() {
        return Ok("none".into());
    }
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ProtocolError::InvalidMessage(format!(
            "transcribe must name a backend (letters, digits, '-', '_') or be 'none', not '{}'",
            name.chars().take(64).collect::<String>()
        )));
    }
    Ok(name.to_owned())
}

/// `interim=true|false` in the query string.
fn parse_interim(text: &str) -> Result<bool, ProtocolError> {
    match text.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ProtocolError::InvalidMessage(format!(
            "interim must be true or false, not '{}'",
            other.chars().take(16).collect::<String>()
        ))),
    }
}

/// `sinks=record`; an empty value or `none` selects no sink.
fn parse_sink_list(text: &str) -> Vec<String> {
    normalize_sink_names(text.split(','))
}

/// The same rule for the query string and the `start` message: names are
/// trimmed, and empty names and `none` are dropped.
fn normalize_sink_names<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    names
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "none")
        .map(str::to_owned)
        .collect()
}

/// What a connection asks for: a new stream, or to resume a dropped one.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectRequest {
    New(StartRequest),
    /// `request`: stream parameters the connection repeated (its old URL);
    /// they must match the session's.
    Resume {
        session_id: String,
        token: String,
        request: StartRequest,
    },
}

/// Reads the query string of a connection.
pub fn parse_connect<'a, I>(pairs: I) -> Result<ConnectRequest, ProtocolError>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
    let resume = pairs.iter().find(|(k, _)| *k == "resume").map(|(_, v)| *v);
    let Some(session_id) = resume else {
        if pairs.iter().any(|(k, _)| *k == "resume_token") {
            return Err(ProtocolError::InvalidMessage(
                "resume_token without resume=<session_id>".into(),
            ));
        }
        return StartRequest::from_query(pairs).map(ConnectRequest::New);
    };
    let request = StartRequest::from_query(
        pairs
            .iter()
            .copied()
            .filter(|(k, _)| *k != "resume" && *k != "resume_token"),
    )?;
    let token = pairs
        .iter()
        .find(|(k, _)| *k == "resume_token")
        .map(|(_, v)| (*v).to_owned())
        .ok_or_else(|| ProtocolError::InvalidMessage("resume without resume_token".into()))?;
    Ok(ConnectRequest::Resume {
        session_id: session_id.to_owned(),
        token,
        request,
    })
}

/// A text message from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Start(StartRequest),
    Keepalive,
    Flush,
    Stop,
    /// A new SDP offer for a `transport: webrtc` session (an ICE restart).
    WebrtcOffer(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartMessage {
    #[serde(rename = "type")]
    _type: String,
    encoding: Option<String>,
    sample_rate: Option<u64>,
    channels: Option<u64>,
    framing: Option<String>,
    sinks: Option<Vec<String>>,
    transcribe: Option<String>,
    record_format: Option<String>,
    interim: Option<bool>,
    metadata: Option<Map<String, Value>>,
    transport: Option<String>,
    sdp: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OfferMessage {
    #[serde(rename = "type")]
    _type: String,
    sdp: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BareMessage {
    #[serde(rename = "type")]
    _type: String,
}

/// Parses one text message. Malformed JSON is distinguished from well-formed
/// JSON that breaks the protocol, because they close with different codes.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::MalformedJson(e.to_string()))?;
    let Some(kind) = value.get("type").and_then(Value::as_str) else {
        return Err(ProtocolError::InvalidMessage(
            "a text message must be a JSON object with a string field \"type\"".into(),
        ));
    };
    let invalid = |e: serde_json::Error| ProtocolError::InvalidMessage(format!("{kind}: {e}"));
    match kind {
        "start" => {
            let m: StartMessage = serde_json::from_value(value.clone()).map_err(invalid)?;
            let sample_rate = match m.sample_rate {
                None => None,
                Some(r) => Some(
                    u32::try_from(r)
                        .ok()
                        .filter(|r| (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(r))
                        .ok_or_else(|| ProtocolError::UnsupportedSampleRate(r.to_string()))?,
                ),
            };
            let channels = match m.channels {
                None => None,
                Some(c) => Some(
                    u16::try_from(c)
                        .ok()
                        .filter(|c| (1..=MAX_CHANNELS).contains(c))
                        .ok_or_else(|| ProtocolError::UnsupportedChannels(c.to_string()))?,
                ),
            };
            Ok(ClientMessage::Start(StartRequest {
                encoding: m.encoding,
                sample_rate,
                channels,
                framing: m.framing,
                sinks: m
                    .sinks
                    .map(|names| normalize_sink_names(names.iter().map(String::as_str))),
                transcribe: m
                    .transcribe
                    .as_deref()
                    .map(parse_backend_name)
                    .transpose()?,
                record_format: m.record_format,
                interim: m.interim,
                metadata: m.metadata.unwrap_or_default(),
                transport: m.transport,
                sdp: m.sdp,
            }))
        }
        "keepalive" | "flush" | "stop" => {
            let _: BareMessage = serde_json::from_value(value.clone()).map_err(invalid)?;
            Ok(match kind {
                "keepalive" => ClientMessage::Keepalive,
                "flush" => ClientMessage::Flush,
                _ => ClientMessage::Stop,
            })
        }
        "webrtc_offer" => {
            let m: OfferMessage = serde_json::from_value(value.clone()).map_err(invalid)?;
            Ok(ClientMessage::WebrtcOffer(m.sdp))
        }
        other => Err(ProtocolError::UnknownMessageType(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_alone_can_start_a_stream() {
        let request = StartRequest::from_query([
            ("encoding", "mulaw"),
            ("channels", "2"),
            ("framing", "seq"),
        ])
        .unwrap();
        assert!(request.starts_stream());
        let format = request.resolve().unwrap();
        assert_eq!(format.encoding, Encoding::Mulaw);
        assert_eq!(format.sample_rate, 8000);
        assert_eq!(format.channels, 2);
        assert_eq!(format.framing, Framing::Seq);
        assert_eq!(format.bytes_per_frame(), Some(2));
    }

    #[test]
    fn pcm_without_a_rate_is_refused() {
        let request = StartRequest::from_query([("encoding", "pcm_s16le")]).unwrap();
        assert_eq!(
            request.resolve(),
            Err(ProtocolError::MissingSampleRate("pcm_s16le"))
        );
    }

    #[test]
    fn start_message_overrides_query_field_by_field() {
        let query = StartRequest::from_query([("sinks", "none"), ("sample_rate", "8000")]).unwrap();
        let ClientMessage::Start(start) = parse_client_message(
            r#"{"type":"start","encoding":"pcm_s16le","sample_rate":16000,"metadata":{"call":"42"}}"#,
        )
        .unwrap() else {
            panic!("not a start message");
        };
        let merged = query.merged_with(start);
        assert_eq!(merged.sinks, Some(vec![]));
        assert_eq!(merged.resolve().unwrap().sample_rate, 16000);
        assert_eq!(merged.metadata["call"], "42");
    }

    #[test]
    fn interim_comes_from_the_query_or_start_and_must_be_a_boolean() {
        let query = StartRequest::from_query([("interim", "true")]).unwrap();
        assert_eq!(query.interim, Some(true));
        let ClientMessage::Start(start) =
            parse_client_message(r#"{"type":"start","encoding":"mulaw","interim":false}"#).unwrap()
        else {
            panic!("not a start message");
        };
        assert_eq!(query.merged_with(start).interim, Some(false));
        assert!(matches!(
            StartRequest::from_query([("interim", "yes")]),
            Err(ProtocolError::InvalidMessage(m)) if m.contains("interim must be true or false")
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"start","interim":"yes"}"#),
            Err(ProtocolError::InvalidMessage(_))
        ));
    }

    #[test]
    fn unknown_query_parameter_is_named() {
        assert_eq!(
            StartRequest::from_query([("samplerate", "16000")]),
            Err(ProtocolError::UnknownParameter("samplerate".into()))
        );
    }

    #[test]
    fn messages_are_classified() {
        assert!(matches!(
            parse_client_message("{not json"),
            Err(ProtocolError::MalformedJson(_))
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"dance"}"#),
            Err(ProtocolError::UnknownMessageType(_))
        ));
        assert!(matches!(
            parse_client_message(r#"[1,2]"#),
            Err(ProtocolError::InvalidMessage(_))
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"start","encoding":"mulaw","samplerate":8000}"#),
            Err(ProtocolError::InvalidMessage(m)) if m.contains("samplerate")
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"start","encoding":"mulaw","sample_rate":96000}"#),
            Err(ProtocolError::UnsupportedSampleRate(_))
        ));
        assert_eq!(
            parse_client_message(r#"{"type":"stop"}"#),
            Ok(ClientMessage::Stop)
        );
    }
}
