//! A WHIP client built on str0m: pushes Opus packets to `POST /v1/whip`
//! over WebRTC, reads the session's events from the `cochlea-events` data
//! channel, and ends the session with `DELETE`. The tests and the WebRTC
//! load generator use it as a second, independent peer next to Chromium.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::MediaTime;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

/// What can go wrong pushing a stream over WHIP.
#[derive(Debug, thiserror::Error)]
pub enum WhipError {
    #[error("whip request: {0}")]
    Http(String),
    #[error("the server refused the offer: {status} {body}")]
    Refused { status: u16, body: String },
    #[error("webrtc: {0}")]
    Rtc(String),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// How to push.
#[derive(Debug, Clone)]
pub struct WhipOptions {
    /// `http://host:port/v1/whip?…` (query parameters as on `/v1/stream`).
    pub url: String,
    pub token: Option<String>,
    /// 2: the offer says `stereo=1`, and the packets are stereo.
    pub channels: u16,
    /// Send media to this address instead of the server's candidates (an
    /// impairment proxy in front of the server).
    pub via: Option<SocketAddr>,
    /// How long to wait for the `closed` event after `DELETE`.
    pub close_wait: Duration,
}

/// What happened.
#[derive(Debug, Default)]
pub struct WhipOutcome {
    pub location: String,
    /// The session's events from the data channel, as sent.
    pub events: Vec<serde_json::Value>,
    pub packets_sent: u64,
}

/// Streams `packets` (one 20 ms Opus packet each, 960 frames at 48 kHz),
/// paced in real time, then deletes the session and waits for `closed`.
pub async fn push(options: &WhipOptions, packets: &[Vec<u8>]) -> Result<WhipOutcome, WhipError> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;
    let mut rtc = Rtc::builder().build(Instant::now());
    let candidate = Candidate::host(local, "udp").map_err(|e| WhipError::Rtc(e.to_string()))?;
    rtc.add_local_candidate(candidate);
    let mut change = rtc.sdp_api();
    let mid = change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    change.add_channel(crate::server::webrtc::EVENTS_CHANNEL.to_owned());
    let (offer, pending) = change
        .apply()
        .ok_or_else(|| WhipError::Rtc("nothing to offer".into()))?;
    let mut offer_sdp = offer.to_sdp_string();
    if options.channels == 2 {
        offer_sdp = offer_sdp.replace("useinbandfec=1", "useinbandfec=1;stereo=1");
    }
    // reqwest's TLS layer needs a process-wide provider, even for http.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let mut request = client
        .post(&options.url)
        .header("content-type", "application/sdp")
        .body(offer_sdp);
    if let Some(token) = &options.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| WhipError::Http(e.to_string()))?;
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .text()
        .await
        .map_err(|e| WhipError::Http(e.to_string()))?;
    if status != 201 {
        return Err(WhipError::Refused { status, body });
    }
    let mut answer_sdp = body;
    if let Some(via) = options.via {
        answer_sdp = route_candidates_via(&answer_sdp, via);
    }
    let answer =
        SdpAnswer::from_sdp_string(&answer_sdp).map_err(|e| WhipError::Rtc(e.to_string()))?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| WhipError::Rtc(e.to_string()))?;
    let base = options
        .url
        .split("/v1/whip")
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut peer = ClientPeer {
        rtc,
        socket,
        local,
        mid,
        outcome: WhipOutcome {
            location,
            ..WhipOutcome::default()
        },
        connected: false,
        closed: false,
    };
    peer.run(&client, &base, options, packets).await?;
    Ok(peer.outcome)
}

/// The answer's host candidates, all pointed at `via`.
fn route_candidates_via(answer: &str, via: SocketAddr) -> String {
    answer
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("a=candidate:") else {
                return format!("{line}\r\n");
            };
            let mut fields: Vec<String> = rest.split(' ').map(str::to_owned).collect();
            // foundation component transport priority address port typ host
            if fields.len() > 5 {
                fields[4] = via.ip().to_string();
                fields[5] = via.port().to_string();
            }
            format!("a=candidate:{}\r\n", fields.join(" "))
        })
        .collect()
}

struct ClientPeer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    mid: Mid,
    outcome: WhipOutcome,
    connected: bool,
    closed: bool,
}

impl ClientPeer {
    async fn run(
        &mut self,
        client: &reqwest::Client,
        base: &str,
        options: &WhipOptions,
        packets: &[Vec<u8>],
    ) -> Result<(), WhipError> {
        let connect_by = Instant::now() + Duration::from_secs(10);
        let mut next_packet = 0usize;
        let mut next_send_at: Option<Instant> = None;
        let mut deleted_at: Option<Instant> = None;
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = self.drain()?;
            let now = Instant::now();
            if !self.connected && now > connect_by {
                return Err(WhipError::Timeout(Duration::from_secs(10)));
            }
            if self.connected && next_send_at.is_none() {
                next_send_at = Some(now);
            }
            if let Some(at) = next_send_at.filter(|at| *at <= now) {
                if let Some(packet) = packets.get(next_packet) {
                    self.write(packet, next_packet as u64 * 960, at)?;
                    next_packet += 1;
                    self.outcome.packets_sent += 1;
                    next_send_at = Some(at + Duration::from_millis(20));
                    continue;
                }
                if deleted_at.is_none() {
                    // What is on the wire arrives before the DELETE does.
                    if now < at + Duration::from_millis(300) {
                        next_send_at = Some(at);
                    } else {
                        let url = format!("{base}{}", self.outcome.location);
                        let mut request = client.delete(&url);
                        if let Some(token) = &options.token {
                            request = request.bearer_auth(token);
                        }
                        let response = request
                            .send()
                            .await
                            .map_err(|e| WhipError::Http(e.to_string()))?;
                        if !response.status().is_success() {
                            return Err(WhipError::Refused {
                                status: response.status().as_u16(),
                                body: response.text().await.unwrap_or_default(),
                            });
                        }
                        deleted_at = Some(Instant::now());
                    }
                }
            }
            if self.closed {
                return Ok(());
            }
            if deleted_at.is_some_and(|at| at.elapsed() > options.close_wait) {
                return Ok(());
            }
            let mut wake = timeout.min(now + Duration::from_millis(50));
            if let Some(at) = next_send_at {
                wake = wake.min(at.max(now));
            }
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(wake));
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let (len, source) = received?;
                    let Some(data) = buf.get(..len) else { continue };
                    let Ok(contents) = data.try_into() else { continue };
                    let input = Input::Receive(Instant::now(), Receive {
                        proto: Protocol::Udp,
                        source,
                        destination: self.local,
                        contents,
                    });
                    if let Err(error) = self.rtc.handle_input(input) {
                        tracing::debug!(%error, "whip client: datagram refused");
                    }
                }
                () = sleep => {
                    self.rtc
                        .handle_input(Input::Timeout(Instant::now()))
                        .map_err(|e| WhipError::Rtc(e.to_string()))?;
                }
            }
        }
    }

    /// Polls str0m until it waits; the time it wants to be woken.
    fn drain(&mut self) -> Result<Instant, WhipError> {
        loop {
            match self
                .rtc
                .poll_output()
                .map_err(|e| WhipError::Rtc(e.to_string()))?
            {
                Output::Timeout(at) => return Ok(at),
                Output::Transmit(t) => {
                    let _ = self.socket.try_send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::ChannelData(data)) => {
                    if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&data.data) {
                        if event["type"] == "closed" {
                            self.closed = true;
                        }
                        self.outcome.events.push(event);
                    }
                }
                Output::Event(_) => {}
            }
        }
    }

    fn write(&mut self, packet: &[u8], frame: u64, at: Instant) -> Result<(), WhipError> {
        let writer = self
            .rtc
            .writer(self.mid)
            .ok_or_else(|| WhipError::Rtc("no audio writer".into()))?;
        let pt = writer
            .payload_params()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| p.pt())
            .ok_or_else(|| WhipError::Rtc("Opus was not negotiated".into()))?;
        let time = MediaTime::new(frame, str0m::media::Frequency::FORTY_EIGHT_KHZ);
        writer
            .write(pt, at, time, packet.to_vec())
            .map_err(|e| WhipError::Rtc(e.to_string()))
    }
}
