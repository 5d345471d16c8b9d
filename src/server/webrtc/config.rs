//! `[webrtc]`: the UDP socket every WebRTC peer shares, and the addresses
//! offered to clients as ICE host candidates.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::WebrtcError;
use crate::config::defaults_from_attributes;

#[derive(Debug, Clone, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct WebrtcConfig {
    /// UDP address for WebRTC media (`IP:PORT`); unset: the HTTP listener's
    /// address and port; `off`: no WebRTC (WHIP and `transport: webrtc`
    /// are refused).
    #[arg(
        long = "webrtc-udp-listen",
        env = "COCHLEA_WEBRTC_UDP_LISTEN",
        value_name = "ADDR:PORT|off"
    )]
    pub udp_listen: Option<String>,
    /// The address clients reach this host at, when it is behind NAT: the
    /// only ICE candidate offered (with the UDP port).
    #[arg(
        long = "webrtc-public-ip",
        env = "COCHLEA_WEBRTC_PUBLIC_IP",
        value_name = "IP"
    )]
    pub public_ip: Option<IpAddr>,
    /// Host candidates to offer, comma-separated; unset: the listen address,
    /// or, when it is a wildcard, 127.0.0.1 and the address of the default
    /// route.
    #[arg(
        long = "webrtc-candidate-ips",
        env = "COCHLEA_WEBRTC_CANDIDATE_IPS",
        value_name = "IP,IP",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub candidate_ips: Vec<IpAddr>,
}

impl Default for WebrtcConfig {
    fn default() -> Self {
        defaults_from_attributes()
    }
}

impl WebrtcConfig {
    /// The UDP address to bind, given the HTTP listener's; `None`: off.
    pub fn udp_address(&self, http: SocketAddr) -> Result<Option<SocketAddr>, WebrtcError> {
        match self.udp_listen.as_deref().map(str::trim) {
            None | Some("") => Ok(Some(http)),
            Some("off") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|e| {
                WebrtcError::Config(format!(
                    "udp_listen must be IP:PORT or off, not '{text}': {e}"
                ))
            }),
        }
    }

    /// The ICE host candidates for a socket bound to `bound`.
    pub fn candidates(&self, bound: SocketAddr) -> Vec<SocketAddr> {
        let port = bound.port();
        let ips: Vec<IpAddr> = if let Some(ip) = self.public_ip {
            vec![ip]
        } else if !self.candidate_ips.is_empty() {
            self.candidate_ips.clone()
        } else if !bound.ip().is_unspecified() {
            vec![bound.ip()]
        } else {
            let mut ips = vec![IpAddr::from([127, 0, 0, 1])];
            ips.extend(default_route_ip());
            ips
        };
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    }
}

/// The local address the kernel picks to reach the internet: connecting a
/// UDP socket sends nothing, it only chooses the route.
fn default_route_ip() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_udp_port_follows_the_http_listener_unless_set_or_off() {
        let http: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut config = WebrtcConfig::default();
        assert_eq!(config.udp_address(http).unwrap(), Some(http));
        config.udp_listen = Some("off".into());
        assert_eq!(config.udp_address(http).unwrap(), None);
        config.udp_listen = Some("0.0.0.0:3478".into());
        assert_eq!(
            config.udp_address(http).unwrap(),
            Some("0.0.0.0:3478".parse().unwrap())
        );
        config.udp_listen = Some("udp".into());
        assert!(config
            .udp_address(http)
            .unwrap_err()
            .to_string()
            .contains("'udp'"));
    }

    #[test]
    fn candidates_prefer_the_public_ip_then_the_list_then_the_bound_address() {
        let bound: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut config = WebrtcConfig::default();
        assert_eq!(config.candidates(bound), [bound]);
        config.candidate_ips = vec!["10.0.0.2".parse().unwrap()];
        assert_eq!(config.candidates(bound), ["10.0.0.2:5000".parse().unwrap()]);
        config.public_ip = Some("203.0.113.7".parse().unwrap());
        assert_eq!(
            config.candidates(bound),
            ["203.0.113.7:5000".parse().unwrap()]
        );
        let wildcard = WebrtcConfig::default().candidates("0.0.0.0:5000".parse().unwrap());
        assert_eq!(wildcard[0], "127.0.0.1:5000".parse().unwrap());
    }
}
