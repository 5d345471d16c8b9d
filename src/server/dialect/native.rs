//! cochlea's own protocol (`/v1/stream`, proto/PROTOCOL.md), as one dialect
//! among the others: JSON control messages, binary audio in the stream's
//! framing, and every session message sent as its JSON.

use actix_web::web::Bytes;

use super::{Dialect, DialectError, DialectKind, Inbound};
use crate::protocol::{parse_client_message, ClientMessage, ServerMessage};

/// The native protocol: nothing to translate.
#[derive(Debug, Default)]
pub struct Native;

impl Dialect for Native {
    fn kind(&self) -> DialectKind {
        DialectKind::Native
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        out.push(match parse_client_message(text)? {
            ClientMessage::Start(request) => Inbound::Start {
                request,
                max_session_ms: None,
            },
            ClientMessage::Keepalive => Inbound::Keepalive,
            ClientMessage::Flush => Inbound::Flush,
            ClientMessage::Stop => Inbound::Stop,
            ClientMessage::WebrtcOffer(sdp) => Inbound::WebrtcOffer(sdp),
        });
        Ok(())
    }

    fn on_binary(&mut self, data: &Bytes, out: &mut Vec<Inbound>) -> Result<(), DialectError> {
        out.push(Inbound::Audio(data.clone()));
        Ok(())
    }

    fn render(&mut self, message: &ServerMessage, out: &mut Vec<String>) {
        out.push(message.to_json());
    }

    /// Only the native protocol has resume tokens: the other platforms'
    /// seq framing is the server's own (Twilio's interleaver), and they
    /// never reconnect to a session.
    fn resumable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_map_one_to_one() {
        let mut native = Native;
        let mut out = Vec::new();
        native.on_text(r#"{"type":"flush"}"#, &mut out).unwrap();
        native.on_text(r#"{"type":"stop"}"#, &mut out).unwrap();
        native
            .on_binary(&Bytes::from_static(b"\0\0"), &mut out)
            .unwrap();
        assert_eq!(
            out,
            [
                Inbound::Flush,
                Inbound::Stop,
                Inbound::Audio(Bytes::from_static(b"\0\0"))
            ]
        );
        assert!(native.on_text("{", &mut out).is_err());
    }
}
