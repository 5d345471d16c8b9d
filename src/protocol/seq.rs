//! The `framing=seq` binary header.

use super::ProtocolError;

/// Header length: u32 sequence number + u64 media timestamp, little-endian.
pub const SEQ_HEADER_BYTES: usize = 12;

/// The header in front of every binary message when `framing=seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqHeader {
    /// Message counter: 0, 1, 2, … per message.
    pub seq: u32,
    /// Index of the message's first sample frame since the stream started.
    pub timestamp: u64,
}

impl SeqHeader {
    /// Splits a binary message into its header and audio payload.
    pub fn parse(message: &[u8]) -> Result<(SeqHeader, &[u8]), ProtocolError> {
        let Some((header, audio)) = message.split_first_chunk::<SEQ_HEADER_BYTES>() else {
            return Err(ProtocolError::SeqHeaderTruncated {
                len_bytes: message.len(),
            });
        };
        let h = header;
        let seq = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let timestamp = u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
        Ok((SeqHeader { seq, timestamp }, audio))
    }

    /// Writes the header; clients and tests use this to build messages.
    pub fn encode(&self) -> [u8; SEQ_HEADER_BYTES] {
        let mut out = [0u8; SEQ_HEADER_BYTES];
        out[..4].copy_from_slice(&self.seq.to_le_bytes());
        out[4..].copy_from_slice(&self.timestamp.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_splits_payload() {
        let header = SeqHeader {
            seq: 7,
            timestamp: 0x0102_0304_0506_0708,
        };
        let mut message = header.encode().to_vec();
        message.extend_from_slice(&[9, 9]);
        let (parsed, audio) = SeqHeader::parse(&message).unwrap();
        assert_eq!(parsed, header);
        assert_eq!(audio, &[9, 9]);
    }

    #[test]
    fn short_message_is_truncated_header() {
        assert_eq!(
            SeqHeader::parse(&[0; 11]),
            Err(ProtocolError::SeqHeaderTruncated { len_bytes: 11 })
        );
    }
}
