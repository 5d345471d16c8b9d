//! What cochlea reads from an SDP offer itself, before str0m negotiates it:
//! whether it carries Opus audio, in how many channels, and whether the
//! client will answer NACKs. Pure text parsing, no IO.

use super::WebrtcError;

/// Largest offer accepted (a browser's audio-and-data offer is about 3 KiB).
pub const MAX_SDP_BYTES: usize = 64 * 1024;

/// The Opus audio an offer proposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpusOffer {
    /// Opus's RTP payload type in this offer.
    pub pt: u8,
    /// 2 when the offer's Opus `fmtp` line says `stereo=1`, else 1.
    pub channels: u16,
    /// The offer lists `a=rtcp-fb:<pt> nack` for Opus: the sender keeps
    /// packets for retransmission, so asking for lost ones can help.
    pub nack: bool,
    /// A data channel (`m=application`) is offered.
    pub data_channel: bool,
}

/// Reads the first audio section's Opus payload type and its parameters.
pub fn opus_offer(sdp: &str) -> Result<OpusOffer, WebrtcError> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(WebrtcError::BadOffer(format!(
            "the offer is {} bytes, over the limit of {MAX_SDP_BYTES}",
            sdp.len()
        )));
    }
    if !sdp.trim_start().starts_with("v=0") {
        return Err(WebrtcError::BadOffer(
            "not an SDP offer (it must start with v=0)".into(),
        ));
    }
    let mut in_audio = false;
    let mut seen_audio = false;
    let mut opus_pt: Option<&str> = None;
    let mut fmtp: Option<&str> = None;
    let mut nack = false;
    let mut data_channel = false;
    // Attributes of the first audio section only: a second one (another
    // track) is refused by str0m's answer, not recorded.
    let mut audio_attributes: Vec<&str> = Vec::new();
    for line in sdp.lines().map(str::trim_end) {
        if let Some(media) = line.strip_prefix("m=") {
            in_audio = media.starts_with("audio ") && !seen_audio;
            seen_audio |= in_audio;
            data_channel |= media.starts_with("application ");
            continue;
        }
        if in_audio {
            audio_attributes.push(line);
        }
    }
    if !seen_audio {
        return Err(WebrtcError::BadOffer(
            "the offer has no audio section".into(),
        ));
    }
    for line in &audio_attributes {
        if let Some(map) = line.strip_prefix("a=rtpmap:") {
            let mut parts = map.splitn(2, ' ');
            let (Some(pt), Some(codec)) = (parts.next(), parts.next()) else {
                continue;
            };
            if codec.to_ascii_lowercase().starts_with("opus/48000") && opus_pt.is_none() {
                opus_pt = Some(pt);
            }
        }
    }
    let Some(pt) = opus_pt else {
        return Err(WebrtcError::BadOffer(
            "the offer's audio has no Opus (opus/48000/2 in an rtpmap line)".into(),
        ));
    };
    let payload_type = pt
        .parse::<u8>()
        .ok()
        .filter(|pt| *pt < 128)
        .ok_or_else(|| WebrtcError::BadOffer(format!("Opus payload type '{pt}' is not 0-127")))?;
    for line in &audio_attributes {
        if let Some(rest) = line.strip_prefix("a=fmtp:") {
            if rest.split(' ').next() == Some(pt) {
                fmtp = rest.split_once(' ').map(|(_, params)| params);
            }
        } else if let Some(rest) = line.strip_prefix("a=rtcp-fb:") {
            let mut parts = rest.split(' ');
            if parts.next() == Some(pt) && parts.next() == Some("nack") && parts.next().is_none() {
                nack = true;
            }
        }
    }
    let stereo = fmtp.is_some_and(|params| {
        params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .any(|(key, value)| key.trim() == "stereo" && value.trim() == "1")
    });
    Ok(OpusOffer {
        pt: payload_type,
        channels: if stereo { 2 } else { 1 },
        nack,
        data_channel,
    })
}

/// The ICE user fragment of a session description (the first one; every
/// section of a bundled session has the same).
pub fn ice_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|line| line.trim_end().strip_prefix("a=ice-ufrag:"))
        .map(str::trim)
}

/// The candidates of a trickle-ICE fragment (`a=candidate:` lines, RFC 8840).
pub fn candidates(fragment: &str) -> impl Iterator<Item = &str> {
    fragment
        .lines()
        .filter_map(|line| line.trim_end().strip_prefix("a="))
        .filter(|attr| attr.starts_with("candidate:"))
}

/// An ICE restart in a trickle-ICE fragment: new `ice-ufrag` and `ice-pwd`.
pub fn restart_credentials(fragment: &str) -> Option<(&str, &str)> {
    let value = |name: &str| {
        fragment
            .lines()
            .find_map(|line| line.trim_end().strip_prefix(name))
            .map(str::trim)
    };
    Some((value("a=ice-ufrag:")?, value("a=ice-pwd:")?))
}

/// `offer` with its ICE credentials replaced: a WHIP ICE restart arrives
/// as a fragment, and str0m takes a whole offer.
pub fn with_credentials(offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(offer.len());
    for line in offer.lines() {
        let line = line.trim_end();
        if line.starts_with("a=ice-ufrag:") {
            out.push_str("a=ice-ufrag:");
            out.push_str(ufrag);
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str("a=ice-pwd:");
            out.push_str(pwd);
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chromium's offer for one microphone track and a data channel
    /// (trimmed: extmaps and other codecs kept where they matter).
    pub const CHROMIUM_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0 1\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\n\
c=IN IP4 0.0.0.0\r\n\
a=ice-ufrag:Ab3x\r\n\
a=ice-pwd:0123456789abcdefghijklmn\r\n\
a=mid:0\r\n\
a=sendrecv\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=rtcp-fb:111 transport-cc\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=rtpmap:63 red/48000/2\r\n\
a=fmtp:63 111/111\r\n\
a=rtpmap:0 PCMU/8000\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
a=mid:1\r\n\
a=sctp-port:5000\r\n";

    #[test]
    fn a_browser_offer_is_mono_opus_without_nack_with_a_data_channel() {
        let offer = opus_offer(CHROMIUM_OFFER).unwrap();
        assert_eq!(
            offer,
            OpusOffer {
                pt: 111,
                channels: 1,
                nack: false,
                data_channel: true
            }
        );
        assert_eq!(ice_ufrag(CHROMIUM_OFFER), Some("Ab3x"));
    }

    #[test]
    fn stereo_and_nack_are_read_from_the_opus_lines_only() {
        let sdp = CHROMIUM_OFFER
            .replace(
                "a=fmtp:111 minptime=10;useinbandfec=1",
                "a=fmtp:111 minptime=10; stereo=1;useinbandfec=1\r\na=rtcp-fb:111 nack",
            )
            .replace("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n", "");
        let offer = opus_offer(&sdp).unwrap();
        assert_eq!(offer.channels, 2);
        assert!(offer.nack);
        assert!(!offer.data_channel);
        // `stereo=1` on another payload type says nothing about Opus.
        let other = CHROMIUM_OFFER.replace("a=fmtp:63 111/111", "a=fmtp:63 stereo=1");
        assert_eq!(opus_offer(&other).unwrap().channels, 1);
    }

    #[test]
    fn offers_without_opus_audio_are_refused_with_the_reason() {
        let no_audio = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
        assert!(opus_offer(no_audio)
            .unwrap_err()
            .to_string()
            .contains("no audio"));
        let pcmu_only = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n";
        assert!(opus_offer(pcmu_only)
            .unwrap_err()
            .to_string()
            .contains("no Opus"));
        assert!(opus_offer("hello").unwrap_err().to_string().contains("v=0"));
        let huge = format!("v=0\r\n{}", "a=x\r\n".repeat(MAX_SDP_BYTES));
        assert!(opus_offer(&huge).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn a_restart_fragment_replaces_the_credentials() {
        let fragment = "a=ice-ufrag:New1\r\na=ice-pwd:newpasswordnewpassword12\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n";
        let (ufrag, pwd) = restart_credentials(fragment).unwrap();
        assert_eq!((ufrag, pwd), ("New1", "newpasswordnewpassword12"));
        let offer = with_credentials(CHROMIUM_OFFER, ufrag, pwd);
        assert_eq!(ice_ufrag(&offer), Some("New1"));
        assert!(offer.contains("a=ice-pwd:newpasswordnewpassword12\r\n"));
        assert_eq!(
            opus_offer(&offer).unwrap(),
            opus_offer(CHROMIUM_OFFER).unwrap()
        );
        assert_eq!(
            candidates(fragment).collect::<Vec<_>>(),
            ["candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"]
        );
        assert!(restart_credentials("a=candidate:1 1 udp 1 127.0.0.1 1 typ host").is_none());
    }
}
