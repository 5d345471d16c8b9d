//! WebRTC ingest: a third way in beside the WebSocket, into the same
//! session core, pipeline and sinks.
//!
//! One UDP socket serves every peer ([`Endpoint`]): a router task reads it
//! and hands each datagram to its peer's task, found by the source address
//! or, for a first STUN request, by the ICE user name. Each peer task
//! ([`peer`]) owns one str0m `Rtc` in RTP mode and turns each Opus RTP
//! packet into a `framing=seq` message (sequence number and media time from
//! the RTP header), which the session's driver feeds to the core: the
//! pipeline's jitter buffer puts packets back in order, conceals losses and
//! adapts its delay as it does for WebSocket clients. str0m answers STUN,
//! runs DTLS and SRTP, sends RTCP receiver reports and NACKs.
//!
//! Negotiation: `POST /v1/whip` ([`whip`], RFC 9725), or a `start` with
//! `"transport": "webrtc"` on `/v1/stream`.

pub mod config;
mod endpoint;
mod peer;
pub mod sdp;
mod timeline;
pub mod whip;

pub use config::WebrtcConfig;
pub use endpoint::Endpoint;
pub use peer::{PeerCommand, PeerEvent, PeerLink, EVENTS_CHANNEL};

/// What can go wrong setting up or running WebRTC.
#[derive(Debug, thiserror::Error)]
pub enum WebrtcError {
    /// The client's offer is unusable (no Opus audio, not SDP, too large).
    #[error("bad SDP offer: {0}")]
    BadOffer(String),
    /// str0m refused the offer.
    #[error("the offer cannot be accepted: {0}")]
    Negotiation(String),
    /// The server was started without WebRTC (`webrtc.udp_listen = "off"`).
    #[error("WebRTC is not enabled on this server")]
    Disabled,
    #[error("cannot open the WebRTC UDP socket on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("webrtc: {0}")]
    Config(String),
    /// The session's peer is gone (its task ended).
    #[error("the WebRTC peer has ended")]
    PeerGone,
}
