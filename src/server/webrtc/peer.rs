//! One WebRTC peer: a task that owns a str0m `Rtc` (RTP mode), fed with
//! the datagrams the endpoint's router sends it, and turns Opus RTP into
//! `framing=seq` messages for the session.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use super::endpoint::{Datagram, Endpoint};
use super::sdp::OpusOffer;
use super::timeline::RtpTimeline;
use super::WebrtcError;
use crate::protocol::WebrtcStats;
use crate::telemetry::names;

/// The data channel events go out on, when the client opens one.
pub const EVENTS_CHANNEL: &str = "cochlea-events";

/// How long a peer may take to connect, and to come back after ICE says
/// it is disconnected (an ICE restart inside this time keeps the session).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const DISCONNECTED_GRACE: Duration = Duration::from_secs(15);
/// How long a peer keeps answering after its session ended.
const LINGER: Duration = Duration::from_secs(1);
/// Session messages held until the events channel opens.
const MAX_PENDING_TEXTS: usize = 1024;

/// What the peer tells the session.
#[derive(Debug)]
pub enum PeerEvent {
    /// One Opus packet as a `framing=seq` message: RTP sequence number and
    /// media time (48 kHz frames), both counted from the first packet.
    Media(Bytes),
    /// RTCP figures, every second while media flows.
    Stats(WebrtcStats),
    /// The client asked to end the session (WHIP `DELETE`).
    Stop,
    /// The peer is gone (ICE failed or timed out, DTLS closed).
    Gone(String),
}

/// What the session (or the WHIP routes) ask of the peer.
#[derive(Debug)]
pub enum PeerCommand {
    /// A session message for the events data channel.
    Send(String),
    /// A new offer on the same session (an ICE restart): the answer.
    Offer {
        sdp: String,
        reply: oneshot::Sender<Result<String, WebrtcError>>,
    },
    /// A WHIP ICE restart (a trickle-ICE fragment with new credentials):
    /// the answer's credentials.
    RestartIce {
        ufrag: String,
        pwd: String,
        reply: oneshot::Sender<Result<String, WebrtcError>>,
    },
    /// Trickled remote candidates (`candidate:…` attributes).
    Candidates(Vec<String>),
    /// End the session as `stop` does.
    Stop,
}

/// The session's end of a peer.
pub struct PeerLink {
    pub events: mpsc::Receiver<PeerEvent>,
    pub commands: mpsc::Sender<PeerCommand>,
}

pub(super) struct Peer {
    pub rtc: Rtc,
    pub session_id: String,
    pub offer: OpusOffer,
    /// The last offer accepted, for a WHIP ICE restart (a fragment).
    pub last_offer: String,
    pub endpoint: Arc<Endpoint>,
    pub socket: Arc<UdpSocket>,
    pub local: SocketAddr,
    pub datagrams: mpsc::Receiver<Datagram>,
    /// The sending end of `datagrams`, for the router to learn new ICE
    /// credentials with.
    pub own: mpsc::Sender<Datagram>,
    pub commands: mpsc::Receiver<PeerCommand>,
    pub events: mpsc::Sender<PeerEvent>,
    pub ufrags: Vec<String>,
}

struct State {
    timeline: RtpTimeline,
    nack_enabled: HashSet<u32>,
    events_channel: Option<ChannelId>,
    pending_texts: VecDeque<String>,
    connected: bool,
    /// When the peer is given up on if it has not (re)connected.
    give_up_at: Option<Instant>,
    sources: HashSet<SocketAddr>,
    media_dropped: u64,
    /// The session has ended: when to stop answering the peer.
    linger_until: Option<Instant>,
}

impl Peer {
    pub(super) async fn run(mut self) {
        metrics::gauge!(names::WEBRTC_PEERS).increment(1.0);
        let mut state = State {
            timeline: RtpTimeline::default(),
            nack_enabled: HashSet::new(),
            events_channel: None,
            pending_texts: VecDeque::new(),
            connected: false,
            give_up_at: Some(Instant::now() + CONNECT_TIMEOUT),
            sources: HashSet::new(),
            media_dropped: 0,
            linger_until: None,
        };
        let reason = self.drive(&mut state).await;
        tracing::info!(
            %reason,
            dropped = state.media_dropped,
            moved = state.timeline.moved_packets,
            "webrtc peer ended"
        );
        let _ = self.events.try_send(PeerEvent::Gone(reason));
        self.close();
        self.endpoint
            .forget(&self.session_id, &self.ufrags, &state.sources);
        metrics::gauge!(names::WEBRTC_PEERS).decrement(1.0);
    }

    async fn drive(&mut self, state: &mut State) -> String {
        // One timer for the peer's life, moved only when str0m's next
        // deadline moves (not made anew for every datagram).
        let mut armed = tokio::time::Instant::now();
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);
        let mut last_source = None;
        loop {
            let timeout = loop {
                match self.rtc.poll_output() {
                    Ok(Output::Timeout(at)) => break at,
                    Ok(Output::Transmit(t)) => {
                        // UDP: a full socket buffer drops, as the network would.
                        let _ = self.socket.try_send_to(&t.contents, t.destination);
                    }
                    Ok(Output::Event(event)) => {
                        if let Some(reason) = self.on_event(event, state) {
                            return reason;
                        }
                    }
                    Err(error) => return format!("webrtc error: {error}"),
                }
            };
            if !self.rtc.is_alive() {
                return "closed by the client".into();
            }
            let now = Instant::now();
            if state.give_up_at.is_some_and(|at| at <= now) {
                return if state.connected {
                    "ICE disconnected and did not come back".into()
                } else {
                    "ICE did not connect".into()
                };
            }
            if state.linger_until.is_some_and(|at| at <= now) {
                return "the session ended".into();
            }
            let mut wake = timeout;
            if let Some(at) = state.give_up_at.or(state.linger_until) {
                wake = wake.min(at);
            }
            let wanted = tokio::time::Instant::from_std(wake.max(now));
            if wanted != armed {
                armed = wanted;
                timer.as_mut().reset(armed);
            }
            let lingering = state.linger_until.is_some();
            tokio::select! {
                // The session's last messages (queued before it ended) go
                // out before its end is noticed.
                biased;
                command = self.commands.recv(), if !lingering => {
                    let Some(command) = command else {
                        return "the session ended".into();
                    };
                    self.on_command(command, state);
                }
                datagram = self.datagrams.recv() => {
                    let Some(datagram) = datagram else {
                        return "the server is shutting down".into();
                    };
                    if last_source != Some(datagram.source) {
                        last_source = Some(datagram.source);
                        state.sources.insert(datagram.source);
                    }
                    let Ok(contents) = datagram.data.as_slice().try_into() else {
                        continue;
                    };
                    let input = Input::Receive(datagram.at, Receive {
                        proto: Protocol::Udp,
                        source: datagram.source,
                        destination: self.local,
                        contents,
                    });
                    if let Err(error) = self.rtc.handle_input(input) {
                        tracing::debug!(%error, "datagram refused");
                    }
                }
                () = self.events.closed(), if !lingering => {
                    // A second for the data channel to deliver the last
                    // events (SCTP may have to resend them).
                    state.linger_until = Some(Instant::now() + LINGER);
                }
                () = &mut timer => {
                    // Fired: parked until the next deadline re-arms it.
                    armed += Duration::from_secs(86_400);
                    timer.as_mut().reset(armed);
                    if let Err(error) = self.rtc.handle_input(Input::Timeout(Instant::now())) {
                        return format!("webrtc error: {error}");
                    }
                }
            }
        }
    }

    /// An event from str0m; `Some(reason)` ends the peer.
    fn on_event(&mut self, event: Event, state: &mut State) -> Option<String> {
        match event {
            Event::Connected => {
                state.connected = true;
                state.give_up_at = None;
                tracing::info!("webrtc peer connected");
            }
            Event::IceConnectionStateChange(ice) => match ice {
                IceConnectionState::Disconnected => {
                    state.give_up_at = Some(Instant::now() + DISCONNECTED_GRACE);
                }
                IceConnectionState::Connected | IceConnectionState::Completed
                    if state.connected =>
                {
                    state.give_up_at = None;
                }
                _ => {}
            },
            Event::RtpPacket(packet) => self.on_rtp(packet, state),
            Event::ChannelOpen(id, label) if label == EVENTS_CHANNEL => {
                state.events_channel = Some(id);
                while let Some(text) = state.pending_texts.pop_front() {
                    self.write_text(id, &text);
                }
            }
            Event::MediaIngressStats(stats) => {
                let _ = self.events.try_send(PeerEvent::Stats(WebrtcStats {
                    packets_received: stats.packets,
                    loss_fraction: stats.loss.map(f64::from),
                    // Interarrival jitter is in RTP units: 48 per millisecond.
                    jitter_ms: f64::from(stats.jitter) / 48.0,
                    rtt_ms: stats.rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
                    nacks_sent: stats.nacks,
                }));
            }
            Event::Closed => return Some("closed by the client".into()),
            _ => {}
        }
        None
    }

    fn on_rtp(&mut self, packet: str0m::rtp::RtpPacket, state: &mut State) {
        if *packet.header.payload_type != self.offer.pt {
            return;
        }
        let ssrc = *packet.header.ssrc;
        if self.offer.nack && state.nack_enabled.insert(ssrc) {
            // str0m asks for resends only where an RTX stream is negotiated;
            // an Opus sender that offered `nack` resends on the same stream.
            if let Some(rx) = self.rtc.direct_api().stream_rx(&packet.header.ssrc) {
                rx.suppress_nack(false);
            }
        }
        // 48 kHz frames, from the packet's TOC byte; a packet too damaged
        // to say is taken for the usual 20 ms (the decoder conceals it).
        // (libopus's error codes come back negative, cast: over 120 ms.)
        let frames = opus::packet::get_nb_samples(&packet.payload, 48_000)
            .ok()
            .filter(|n| (1..=5760).contains(n))
            .map_or(960, |n| n as u64);
        let Some(header) = state
            .timeline
            .place(*packet.seq_no, packet.time.numer(), frames)
        else {
            return;
        };
        let mut message = BytesMut::with_capacity(packet.payload.len() + 12);
        message.put_slice(&header.encode());
        message.put_slice(&packet.payload);
        if self
            .events
            .try_send(PeerEvent::Media(message.freeze()))
            .is_err()
        {
            // The session is not reading (parked, or a sink over budget):
            // the packet is lost as on the network, and concealed.
            state.media_dropped += 1;
            metrics::counter!(names::WEBRTC_PACKETS_DROPPED_TOTAL).increment(1);
        }
    }

    fn on_command(&mut self, command: PeerCommand, state: &mut State) {
        match command {
            PeerCommand::Send(text) => match state.events_channel {
                Some(id) => self.write_text(id, &text),
                None => {
                    if state.pending_texts.len() < MAX_PENDING_TEXTS {
                        state.pending_texts.push_back(text);
                    }
                }
            },
            PeerCommand::Offer { sdp, reply } => {
                let answer = self.accept(&sdp);
                let _ = reply.send(answer);
            }
            PeerCommand::RestartIce { ufrag, pwd, reply } => {
                let offer = super::sdp::with_credentials(&self.last_offer, &ufrag, &pwd);
                let _ = reply.send(self.accept(&offer));
            }
            PeerCommand::Candidates(lines) => {
                for line in lines {
                    match str0m::Candidate::from_sdp_string(&line) {
                        Ok(candidate) => self.rtc.add_remote_candidate(candidate),
                        Err(error) => tracing::debug!(%error, "trickled candidate ignored"),
                    }
                }
            }
            PeerCommand::Stop => {
                let _ = self.events.try_send(PeerEvent::Stop);
            }
        }
    }

    /// A new offer on this peer (an ICE restart): str0m answers it with new
    /// credentials, which the router learns.
    fn accept(&mut self, sdp: &str) -> Result<String, WebrtcError> {
        let offer = super::sdp::opus_offer(sdp)?;
        if offer.channels != self.offer.channels {
            return Err(WebrtcError::BadOffer(
                "a new offer cannot change the channel count".into(),
            ));
        }
        let parsed = str0m::change::SdpOffer::from_sdp_string(sdp)
            .map_err(|e| WebrtcError::BadOffer(e.to_string()))?;
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(parsed)
            .map_err(|e| WebrtcError::Negotiation(e.to_string()))?
            .to_sdp_string();

        if let Some(ufrag) = super::sdp::ice_ufrag(&answer) {
            if !self.ufrags.iter().any(|u| u == ufrag) {
                self.ufrags.push(ufrag.to_owned());
                self.endpoint.learn_ufrag(ufrag, self.own.clone());
            }
        }
        self.last_offer = sdp.to_owned();
        Ok(answer)
    }

    /// Tells the client it is over (RTCP BYE, SCTP shutdown, DTLS
    /// close_notify) instead of leaving it to find out by ICE timeout.
    fn close(&mut self) {
        if self.rtc.close().is_ok() {
            for _ in 0..64 {
                match self.rtc.poll_output() {
                    Ok(Output::Transmit(t)) => {
                        let _ = self.socket.try_send_to(&t.contents, t.destination);
                    }
                    Ok(Output::Event(_)) => {}
                    Ok(Output::Timeout(_)) | Err(_) => break,
                }
                if !self.rtc.is_alive() {
                    break;
                }
            }
        }
        self.rtc.disconnect();
    }

    fn write_text(&mut self, id: ChannelId, text: &str) {
        if let Some(mut channel) = self.rtc.channel(id) {
            if let Err(error) = channel.write(false, text.as_bytes()) {
                tracing::debug!(%error, "event not sent on the data channel");
            }
        }
    }
}
