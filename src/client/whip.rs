//! A WHIP client built on str0m: pushes Opus packets to `POST /v1/whip`
//! over WebRTC, reads the session's events from the `cochlea-events` data
//! channel, and ends the session with `DELETE`. The tests and the WebRTC
//! load generator use it as a second, independent peer next to Chromium.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpPendingOffer};
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

/// How a push is going, for a caller that counts (the load generator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhipStep {
    /// ICE and DTLS are up: media flows from here.
    Connected,
    /// One packet went out.
    Sent,
}

/// Streams `packets` (one 20 ms Opus packet each, 960 frames at 48 kHz),
/// paced in real time, then deletes the session and waits for `closed`.
pub async fn push(options: &WhipOptions, packets: &[Vec<u8>]) -> Result<WhipOutcome, WhipError> {
    push_with(options, packets, &mut |_| {}).await
}

/// [`push`], telling `progress` each step.
pub async fn push_with(
    options: &WhipOptions,
    packets: &[Vec<u8>],
    progress: &mut (dyn FnMut(WhipStep) + Send),
) -> Result<WhipOutcome, WhipError> {
    let (mut sender, offer_sdp) = OpusSender::offer(options.channels, true).await?;
    // reqwest's TLS layer needs a process-wide provider, even for http.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let request = client
        .post(&options.url)
        .header("content-type", "application/sdp")
        .body(offer_sdp);
    let response = send(request, options).await?;
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
    sender.accept(&body, options.via)?;
    let base = options
        .url
        .split("/v1/whip")
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut outcome = WhipOutcome {
        location,
        ..WhipOutcome::default()
    };
    sender.connect(Duration::from_secs(10)).await?;
    progress(WhipStep::Connected);
    let mut at = Instant::now();
    for (k, packet) in packets.iter().enumerate() {
        sender.pump(at).await?;
        sender.send(packet, k as u64 * 960, at)?;
        outcome.packets_sent += 1;
        progress(WhipStep::Sent);
        at += Duration::from_millis(20);
    }
    // What is on the wire arrives before the DELETE does.
    sender.pump(at + Duration::from_millis(300)).await?;
    let url = format!("{base}{}", outcome.location);
    let response = send(client.delete(&url), options).await?;
    if !response.status().is_success() {
        return Err(WhipError::Refused {
            status: response.status().as_u16(),
            body: response.text().await.unwrap_or_default(),
        });
    }
    let deadline = Instant::now() + options.close_wait;
    while !sender.closed && Instant::now() < deadline {
        sender
            .pump(Instant::now() + Duration::from_millis(50))
            .await?;
    }
    outcome.events = std::mem::take(&mut sender.events);
    Ok(outcome)
}

/// Sends a WHIP request with the options' credentials.
async fn send(
    mut request: reqwest::RequestBuilder,
    options: &WhipOptions,
) -> Result<reqwest::Response, WhipError> {
    if let Some(token) = &options.token {
        request = request.bearer_auth(token);
    }
    request
        .send()
        .await
        .map_err(|e| WhipError::Http(e.to_string()))
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

/// The client side of one WebRTC peer sending one Opus track (str0m, on
/// its own UDP socket on 127.0.0.1), whatever carries the signalling.
pub struct OpusSender {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    mid: Mid,
    pending: Option<SdpPendingOffer>,
    connected: bool,
    /// Messages from the `cochlea-events` data channel, as sent.
    pub events: Vec<serde_json::Value>,
    /// A `closed` came on the data channel.
    pub closed: bool,
    buf: Vec<u8>,
}

impl OpusSender {
    /// A new peer and its SDP offer (`stereo=1` for 2 channels; the
    /// `cochlea-events` data channel if `data_channel`).
    pub async fn offer(channels: u16, data_channel: bool) -> Result<(Self, String), WhipError> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let local = socket.local_addr()?;
        let mut rtc = Rtc::builder().build(Instant::now());
        let candidate = Candidate::host(local, "udp").map_err(|e| WhipError::Rtc(e.to_string()))?;
        rtc.add_local_candidate(candidate);
        let mut change = rtc.sdp_api();
        let mid = change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        if data_channel {
            change.add_channel(crate::server::webrtc::EVENTS_CHANNEL.to_owned());
        }
        let (offer, pending) = change
            .apply()
            .ok_or_else(|| WhipError::Rtc("nothing to offer".into()))?;
        let mut offer_sdp = offer.to_sdp_string();
        if channels == 2 {
            offer_sdp = offer_sdp.replace("useinbandfec=1", "useinbandfec=1;stereo=1");
        }
        let sender = Self {
            rtc,
            socket,
            local,
            mid,
            pending: Some(pending),
            connected: false,
            events: Vec::new(),
            closed: false,
            buf: vec![0u8; 2048],
        };
        Ok((sender, offer_sdp))
    }

    /// Takes the server's answer; with `via`, media goes to that address
    /// instead of the server's candidates.
    pub fn accept(&mut self, answer: &str, via: Option<SocketAddr>) -> Result<(), WhipError> {
        let answer = match via {
            Some(via) => route_candidates_via(answer, via),
            None => answer.to_owned(),
        };
        let answer =
            SdpAnswer::from_sdp_string(&answer).map_err(|e| WhipError::Rtc(e.to_string()))?;
        let pending = self
            .pending
            .take()
            .ok_or_else(|| WhipError::Rtc("no offer is waiting for an answer".into()))?;
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| WhipError::Rtc(e.to_string()))
    }

    /// Runs until ICE and DTLS are up.
    pub async fn connect(&mut self, within: Duration) -> Result<(), WhipError> {
        let deadline = Instant::now() + within;
        while !self.connected {
            if Instant::now() > deadline {
                return Err(WhipError::Timeout(within));
            }
            self.pump(Instant::now() + Duration::from_millis(20))
                .await?;
        }
        Ok(())
    }

    /// Does str0m's IO (datagrams, timers, events) until `until`.
    pub async fn pump(&mut self, until: Instant) -> Result<(), WhipError> {
        loop {
            let timeout = self.drain()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let wake = timeout.min(until).max(now);
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(wake));
            tokio::select! {
                received = self.socket.recv_from(&mut self.buf) => {
                    let (len, source) = received?;
                    let Some(data) = self.buf.get(..len) else { continue };
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
                        self.events.push(event);
                    }
                }
                Output::Event(_) => {}
            }
        }
    }

    /// Sends one Opus packet starting at 48 kHz frame `frame`.
    pub fn send(&mut self, packet: &[u8], frame: u64, at: Instant) -> Result<(), WhipError> {
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
