//! Vonage Voice API WebSockets (`/vonage`): an NCCO `connect` action with a
//! `websocket` endpoint. First a text frame
//! `{"event":"websocket:connected","content-type":"audio/l16;rate=16000", …}`
//! whose other fields are the endpoint's `headers`, flattened; then binary
//! frames of 16-bit little-endian mono PCM, 20 ms each; `websocket:dtmf`
//! events in between.
//!
//! Vonage plays binary frames we would send and takes `clear`/`notify`
//! actions, nothing else: every session message is dropped, and an error is
//! told in the close frame.

use actix_web::web::Bytes;
use serde_json::{json, Map, Value};

use super::{
    excerpt, json_object, l16_start, only_stream_parameters, string_field, Dialect, DialectError,
    DialectKind, Inbound, Prepared,
};
use crate::protocol::{parse_sample_rate, ProtocolError, ServerMessage, StartRequest};

const NAME: &str = "vonage";
const EXPECTED_FORMAT: &str = "audio/l16;rate=8000 or audio/l16;rate=16000";

pub fn prepare(pairs: &[(String, String)]) -> Prepared {
    let (chosen, query) = match only_stream_parameters(NAME, pairs) {
        Ok(chosen) => (chosen, Ok(StartRequest::default())),
        Err(e) => (Vec::new(), Err(e)),
    };
    Prepared {
        dialect: Box::new(Vonage {
            chosen,
            started: false,
        }),
        query,
    }
}

pub struct Vonage {
    /// `transcribe`/`sinks` from the URL.
    chosen: Vec<(String, String)>,
    started: bool,
}

/// The sample rate of `audio/l16;rate=N`.
fn parse_content_type(content_type: &str) -> Result<u32, DialectError> {
    let unsupported = || DialectError::UnsupportedMediaFormat {
        dialect: NAME,
        found: excerpt(content_type, 64),
        expected: EXPECTED_FORMAT,
    };
    let mut parts = content_type.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|mime| mime.eq_ignore_ascii_case("audio/l16"))
    {
        return Err(unsupported());
    }
    let rate = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("rate"))
        .map(|(_, v)| v.trim())
        .ok_or_else(unsupported)?;
    parse_sample_rate(rate).map_err(|_| unsupported())
}

impl Vonage {
    fn on_connected(
        &mut self,
        message: Map<String, Value>,
        out: &mut Vec<Inbound>,
    ) -> Result<(), DialectError> {
        let content_type = string_field(NAME, &message, "websocket:connected", "content-type")?
            .ok_or_else(|| {
                ProtocolError::InvalidMessage(
                    "vonage websocket:connected without content-type".into(),
                )
            })?;
        let rate = parse_content_type(content_type)?;
        let mut metadata: Map<String, Value> = message
            .into_iter()
            .filter(|(k, _)| k != "event" && k != "content-type")
            .collect();
        metadata.insert("dialect".into(), json!({ "name": NAME }));
        let start = l16_start(rate, 1, &self.chosen, metadata)?;
        self.started = true;
        out.push(start);
        Ok(())
    }
}

impl Dialect for Vonage {
    fn kind(&self) -> DialectKind {
        DialectKind::Vonage
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        let message = json_object(NAME, text)?;
        let event = string_field(NAME, &message, "message", "event")?
            .ok_or_else(|| ProtocolError::InvalidMessage("vonage message without an event".into()))?
            .to_owned();
        match event.as_str() {
            "websocket:connected" => {
                if self.started {
                    return Err(ProtocolError::AlreadyStarted.into());
                }
                self.on_connected(message, out)
            }
            "websocket:dtmf" => {
                let digit = match message.get("digit") {
                    Some(Value::String(d)) => excerpt(d, 4),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => "?".into(),
                };
                out.push(Inbound::Event {
                    name: "dtmf",
                    detail: format!("digit {digit}"),
                });
                Ok(())
            }
            other => {
                // websocket:cleared, websocket:notify and newer events.
                out.push(Inbound::Event {
                    name: "other",
                    detail: excerpt(other, 32),
                });
                Ok(())
            }
        }
    }

    fn on_binary(&mut self, data: &Bytes, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        if !self.started {
            return Err(ProtocolError::AudioBeforeStart.into());
        }
        out.push(Inbound::Audio(data.clone()));
        Ok(())
    }

    fn render(&mut self, _message: &ServerMessage, _out: &mut Vec<String>) {
        // Vonage would play binary frames and act on clear/notify: nothing of ours.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_starts_l16_with_the_headers_as_metadata() {
        let Prepared { mut dialect, query } = prepare(&[("transcribe".into(), "none".into())]);
        assert_eq!(query, Ok(StartRequest::default()));
        let mut out = Vec::new();
        assert!(matches!(
            dialect.on_binary(&Bytes::from_static(&[0; 640]), &mut out),
            Err(DialectError::Protocol(ProtocolError::AudioBeforeStart))
        ));
        dialect
            .on_text(
                r#"{"event":"websocket:connected","content-type":"audio/l16;rate=16000","prop1":"value1","call":{"id":42}}"#,
                &mut out,
            )
            .unwrap();
        dialect
            .on_binary(&Bytes::from_static(&[1; 640]), &mut out)
            .unwrap();
        dialect
            .on_text(
                r#"{"event":"websocket:dtmf","digit":"5","duration":100}"#,
                &mut out,
            )
            .unwrap();
        let [Inbound::Start { request, .. }, Inbound::Audio(audio), Inbound::Event {
            name: "dtmf",
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
            ("pcm_s16le", 16000, 1)
        );
        assert_eq!(request.transcribe.as_deref(), Some("none"));
        assert_eq!(request.metadata["prop1"], "value1");
        assert_eq!(request.metadata["call"]["id"], 42);
        assert_eq!(request.metadata["dialect"]["name"], "vonage");
        assert!(!request.metadata.contains_key("content-type"));
        assert_eq!(audio.len(), 640);
        assert_eq!(detail, "digit 5");
    }

    #[test]
    fn content_types() {
        assert_eq!(parse_content_type("audio/l16;rate=8000").unwrap(), 8000);
        assert_eq!(parse_content_type("Audio/L16; rate=16000").unwrap(), 16000);
        for bad in [
            "audio/l16",
            "audio/pcmu;rate=8000",
            "audio/l16;rate=fast",
            "audio/l16;rate=96000",
        ] {
            assert!(
                matches!(
                    parse_content_type(bad),
                    Err(DialectError::UnsupportedMediaFormat { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_messages_and_queries() {
        let Prepared { query, .. } = prepare(&[("encoding".into(), "mulaw".into())]);
        assert_eq!(
            query,
            Err(ProtocolError::UnknownParameter("encoding".into()))
        );
        let Prepared { mut dialect, .. } = prepare(&[]);
        let mut out = Vec::new();
        assert!(matches!(
            dialect.on_text("hello", &mut out),
            Err(DialectError::Protocol(ProtocolError::MalformedJson(_)))
        ));
        assert!(matches!(
            dialect.on_text(r#"{"event":"websocket:connected"}"#, &mut out),
            Err(DialectError::Protocol(ProtocolError::InvalidMessage(_)))
        ));
        dialect
            .on_text(
                r#"{"event":"websocket:connected","content-type":"audio/l16;rate=8000"}"#,
                &mut out,
            )
            .unwrap();
        assert!(matches!(
            dialect.on_text(
                r#"{"event":"websocket:connected","content-type":"audio/l16;rate=8000"}"#,
                &mut out
            ),
            Err(DialectError::Protocol(ProtocolError::AlreadyStarted))
        ));
    }
}
