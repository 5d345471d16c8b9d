//! The UDP socket every peer shares, and the router that reads it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use str0m::change::SdpOffer;
use str0m::{Candidate, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::config::WebrtcConfig;
use super::peer::{Peer, PeerCommand, PeerLink};
use super::sdp::{self, OpusOffer};
use super::WebrtcError;
use crate::telemetry::names;

/// Receive buffer asked for the shared socket: every peer's packets wait
/// in it while the router is busy. Linux's default (208 KiB) overflowed
/// under 300 streams on 2 cores (450 of 900,000 packets lost, counted in
/// RcvbufErrors); the kernel caps the request at `net.core.rmem_max`.
const SOCKET_RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Datagrams queued per peer before the router drops (about 2.5 s of
/// audio at 50 packets a second, with RTCP).
const PEER_QUEUE: usize = 256;
/// Session events queued before media is dropped (about 40 s of 20 ms
/// packets: a signalling WebSocket may resume within that).
const EVENT_QUEUE: usize = 2048;

/// One received datagram, for a peer task.
#[derive(Debug)]
pub struct Datagram {
    pub at: Instant,
    pub source: SocketAddr,
    pub data: Vec<u8>,
}

#[derive(Default)]
struct Routes {
    by_source: HashMap<SocketAddr, mpsc::Sender<Datagram>>,
    by_ufrag: HashMap<String, mpsc::Sender<Datagram>>,
    /// WHIP sessions' peers, for `DELETE` and `PATCH` on their resource.
    whip: HashMap<String, mpsc::Sender<PeerCommand>>,
}

pub struct Endpoint {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    candidates: Vec<SocketAddr>,
    routes: Mutex<Routes>,
}

/// A negotiated peer: the SDP answer and the session's link to it.
pub struct Negotiated {
    pub answer: String,
    pub offer: OpusOffer,
    pub link: PeerLink,
}

impl Endpoint {
    /// Binds the shared socket (`None` when WebRTC is off) and starts the
    /// router. `http` is the HTTP listener's bound address.
    pub async fn start(
        config: &WebrtcConfig,
        http: SocketAddr,
    ) -> Result<Option<Arc<Self>>, WebrtcError> {
        let Some(addr) = config.udp_address(http)? else {
            return Ok(None);
        };
        // The pure-Rust backend; a second call leaves the first in place.
        str0m::crypto::from_feature_flags().install_process_default();
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| WebrtcError::Bind { addr, source })?;
        let local = socket
            .local_addr()
            .map_err(|source| WebrtcError::Bind { addr, source })?;
        let receive_buffer = widen_receive_buffer(&socket, SOCKET_RECEIVE_BUFFER_BYTES);
        let candidates = config.candidates(local);
        tracing::info!(udp = %local, ?candidates, receive_buffer, "webrtc listening");
        let endpoint = Arc::new(Self {
            socket: Arc::new(socket),
            local,
            candidates,
            routes: Mutex::new(Routes::default()),
        });
        tokio::spawn(endpoint.clone().route_datagrams());
        Ok(Some(endpoint))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        // A panic while holding the lock leaves plain maps: still usable.
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts `offer` for session `session_id` and starts its peer task.
    pub fn negotiate(
        self: &Arc<Self>,
        session_id: &str,
        offer_sdp: &str,
        whip: bool,
    ) -> Result<Negotiated, WebrtcError> {
        let offer = sdp::opus_offer(offer_sdp)?;
        let parsed = SdpOffer::from_sdp_string(offer_sdp)
            .map_err(|e| WebrtcError::BadOffer(e.to_string()))?;
        let now = Instant::now();
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true)
            .set_stats_interval(Some(std::time::Duration::from_secs(1)))
            .build(now);
        for addr in &self.candidates {
            let candidate = Candidate::host(*addr, "udp")
                .map_err(|e| WebrtcError::Config(format!("candidate {addr}: {e}")))?;
            rtc.add_local_candidate(candidate);
        }
        let answer = rtc
            .sdp_api()
            .accept_offer(parsed)
            .map_err(|e| WebrtcError::Negotiation(e.to_string()))?
            .to_sdp_string();
        let ufrag = sdp::ice_ufrag(&answer)
            .ok_or_else(|| WebrtcError::Negotiation("the answer has no ICE user name".into()))?
            .to_owned();
        let (datagrams_tx, datagrams) = mpsc::channel(PEER_QUEUE);
        let (commands_tx, commands) = mpsc::channel(64);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        {
            let mut routes = self.routes();
            routes.by_ufrag.insert(ufrag.clone(), datagrams_tx.clone());
            if whip {
                routes
                    .whip
                    .insert(session_id.to_owned(), commands_tx.clone());
            }
        }
        let peer = Peer {
            rtc,
            session_id: session_id.to_owned(),
            offer,
            last_offer: offer_sdp.to_owned(),
            endpoint: self.clone(),
            socket: self.socket.clone(),
            local: self.local,
            datagrams,
            own: datagrams_tx,
            commands,
            events: events_tx,
            ufrags: vec![ufrag],
        };
        tokio::spawn(peer.run().in_current_span());
        Ok(Negotiated {
            answer,
            offer,
            link: PeerLink {
                events,
                commands: commands_tx,
            },
        })
    }

    /// The peer of a WHIP session, for its `DELETE` and `PATCH`.
    pub fn whip_peer(&self, session_id: &str) -> Option<mpsc::Sender<PeerCommand>> {
        self.routes().whip.get(session_id).cloned()
    }

    pub(super) fn learn_ufrag(&self, ufrag: &str, peer: mpsc::Sender<Datagram>) {
        self.routes().by_ufrag.insert(ufrag.to_owned(), peer);
    }

    /// A peer ended: its routes go.
    pub(super) fn forget(
        &self,
        session_id: &str,
        ufrags: &[String],
        sources: &HashSet<SocketAddr>,
    ) {
        let mut routes = self.routes();
        routes.whip.remove(session_id);
        for ufrag in ufrags {
            routes.by_ufrag.remove(ufrag);
        }
        for source in sources {
            routes.by_source.remove(source);
        }
    }

    async fn route_datagrams(self: Arc<Self>) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (len, source) = match self.socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(error) => {
                    // ICMP port-unreachable from a peer that left shows up
                    // here on some systems: not a reason to stop.
                    tracing::debug!(%error, "webrtc socket read");
                    continue;
                }
            };
            let Some(data) = buf.get(..len) else {
                continue;
            };
            self.route(source, data);
        }
    }

    fn route(&self, source: SocketAddr, data: &[u8]) {
        let mut routes = self.routes();
        let peer = match stun_username(data).and_then(|u| u.split(':').next()) {
            // A binding request names the peer: it may come from a new
            // address (a new candidate pair, an ICE restart).
            Some(ufrag) => match routes.by_ufrag.get(ufrag).cloned() {
                Some(peer) => {
                    routes.by_source.insert(source, peer.clone());
                    peer
                }
                None => return,
            },
            None => match routes.by_source.get(&source) {
                Some(peer) => peer.clone(),
                None => return,
            },
        };
        let datagram = Datagram {
            at: Instant::now(),
            source,
            data: data.to_vec(),
        };
        match peer.try_send(datagram) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!(names::WEBRTC_DATAGRAMS_DROPPED_TOTAL).increment(1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                routes.by_source.remove(&source);
            }
        }
    }
}

/// Asks for a receive buffer of `bytes`; returns what the kernel gave
/// (Linux reports twice the usable size), or 0 where it cannot be read.
#[cfg(unix)]
fn widen_receive_buffer(socket: &UdpSocket, bytes: usize) -> usize {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let wanted = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket for the whole call; the option value
    // is a c_int on the stack and its size is passed with it.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&wanted as *const libc::c_int).cast(),
            size,
        )
    };
    if set != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot widen the WebRTC socket's receive buffer");
    }
    let mut got: libc::c_int = 0;
    let mut len = size;
    // SAFETY: as above; `got` and `len` are valid, exclusive out-pointers.
    let read = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut got as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if read == 0 {
        usize::try_from(got).unwrap_or(0)
    } else {
        0
    }
}

#[cfg(not(unix))]
fn widen_receive_buffer(_socket: &UdpSocket, _bytes: usize) -> usize {
    0
}

/// The USERNAME of a STUN message (RFC 8489), if `data` is one.
fn stun_username(data: &[u8]) -> Option<&str> {
    const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    const USERNAME: u16 = 0x0006;
    let header = data.get(..20)?;
    // RFC 7983: a first byte of 0–3 is STUN on a multiplexed socket.
    if header[0] > 3 || header[4..8] != MAGIC_COOKIE {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut attributes = data.get(20..20usize.checked_add(length)?)?;
    while attributes.len() >= 4 {
        let kind = u16::from_be_bytes([attributes[0], attributes[1]]);
        let len = usize::from(u16::from_be_bytes([attributes[2], attributes[3]]));
        let value = attributes.get(4..4 + len)?;
        if kind == USERNAME {
            return std::str::from_utf8(value).ok();
        }
        // Attributes are padded to four bytes.
        let padded = (4 + len).div_ceil(4) * 4;
        attributes = attributes.get(padded..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attributes = Vec::new();
        // A PRIORITY attribute first, as browsers send it.
        attributes.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        attributes.extend_from_slice(&USERNAME_KIND.to_be_bytes());
        attributes.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attributes.extend_from_slice(username.as_bytes());
        while attributes.len() % 4 != 0 {
            attributes.push(0);
        }
        let mut message = vec![0x00, 0x01];
        message.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        message.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        message.extend_from_slice(&[7; 12]);
        message.extend_from_slice(&attributes);
        message
    }
    const USERNAME_KIND: u16 = 0x0006;

    #[test]
    fn the_username_of_a_binding_request_names_the_peer() {
        let request = binding_request("srvr:clnt1");
        assert_eq!(stun_username(&request), Some("srvr:clnt1"));
    }

    #[test]
    fn other_packets_and_broken_stun_have_no_username() {
        // RTP (version 2: first byte 0x80), DTLS (20–63).
        assert_eq!(stun_username(&[0x80; 40]), None);
        assert_eq!(stun_username(&[22; 40]), None);
        let mut request = binding_request("srvr:clnt1");
        // A length past the end of the datagram.
        request[3] = 200;
        assert_eq!(stun_username(&request), None);
        let mut request = binding_request("srvr:clnt1");
        // An attribute length past the end of the attributes.
        request[31] = 255;
        assert_eq!(stun_username(&request), None);
        assert_eq!(stun_username(&request[..10]), None);
    }
}
