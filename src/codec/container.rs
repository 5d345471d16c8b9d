//! What the Ogg and WebM demuxers share: the Opus identification header and
//! the events a demuxer yields. Demuxers are sans-IO: they take bytes cut at
//! any boundary and buffer only the one incomplete page or element they must.

use super::limit::LimitError;

/// The Opus identification header (RFC 7845 §5.1), from an Ogg `OpusHead`
/// packet or a WebM `CodecPrivate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpusHead {
    /// Output channel count (1 or 2 are supported).
    pub channels: u8,
    /// Samples at 48 kHz to drop from the start of the decoded output.
    pub pre_skip: u16,
    /// Sample rate of the original input (informational only).
    pub input_sample_rate: u32,
    /// Q7.8 dB gain to apply to the output.
    pub output_gain_q8: i16,
    /// 0: mono/stereo without a mapping table (the only family supported).
    pub mapping_family: u8,
}

impl OpusHead {
    /// Parses an `OpusHead` packet (at least 19 bytes, magic `OpusHead`).
    pub fn parse(packet: &[u8]) -> Result<OpusHead, DemuxError> {
        if packet.len() < 19 || &packet[..8] != b"OpusHead" {
            return Err(DemuxError::Malformed(
                "OpusHead header is missing or shorter than 19 bytes".into(),
            ));
        }
        let version = packet[8];
        if version >> 4 != 0 {
            return Err(DemuxError::Unsupported(format!(
                "OpusHead version {version} is not supported"
            )));
        }
        let head = OpusHead {
            channels: packet[9],
            pre_skip: u16::from_le_bytes([packet[10], packet[11]]),
            input_sample_rate: u32::from_le_bytes([packet[12], packet[13], packet[14], packet[15]]),
            output_gain_q8: i16::from_le_bytes([packet[16], packet[17]]),
            mapping_family: packet[18],
        };
        if head.mapping_family != 0 || !(1..=2).contains(&head.channels) {
            return Err(DemuxError::Unsupported(format!(
                "Opus channel mapping family {} with {} channels; only mono and stereo (family 0) are supported",
                head.mapping_family, head.channels
            )));
        }
        Ok(head)
    }
}

/// What a demuxer yields, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemuxEvent {
    /// The stream's Opus header; always before the first packet, exactly once.
    Head(OpusHead),
    /// One Opus packet.
    Packet {
        data: Vec<u8>,
        /// Ogg only: on the last packet of the stream's final page (EOS),
        /// the page granule position: the total number of 48 kHz samples
        /// the stream holds, pre-skip included. Lets the decoder trim the
        /// final packet's padding exactly as RFC 7845 §4.5 requires.
        end_granule: Option<u64>,
    },
    /// Input was damaged and skipped (Ogg: a page failing its CRC; then the
    /// demuxer resynchronises on the next page). The stream goes on.
    Damaged {
        bytes_skipped: usize,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DemuxError {
    /// Well-formed, but not something we decode (a Vorbis track, a
    /// multichannel mapping): close code 1003.
    #[error("unsupported stream: {0}")]
    Unsupported(String),
    /// Broken structure that cannot be resynchronised: close code 1007.
    #[error("malformed container: {0}")]
    Malformed(String),
    /// Over a bound the server sets against hostile streams: close code 1008.
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// A streaming demuxer for one Opus track.
pub trait Demuxer: Send {
    /// Consumes `bytes` (any split of the stream) and appends what it
    /// completes to `out`. After an error the demuxer must not be used again.
    fn push(&mut self, bytes: &[u8], out: &mut Vec<DemuxEvent>) -> Result<(), DemuxError>;

    /// Bytes held back, waiting for the rest of a page or element.
    fn buffered_bytes(&self) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(channels: u8, family: u8) -> Vec<u8> {
        let mut p = b"OpusHead".to_vec();
        p.extend_from_slice(&[1, channels, 0x38, 0x01, 0x80, 0xBB, 0, 0, 0, 0, family]);
        p
    }

    #[test]
    fn parses_and_checks_the_header() {
        let h = OpusHead::parse(&head(2, 0)).unwrap();
        assert_eq!(
            (h.channels, h.pre_skip, h.input_sample_rate),
            (2, 312, 48000)
        );
        assert!(matches!(
            OpusHead::parse(&head(6, 1)),
            Err(DemuxError::Unsupported(_))
        ));
        assert!(matches!(
            OpusHead::parse(&head(1, 0)[..10]),
            Err(DemuxError::Malformed(_))
        ));
    }
}
