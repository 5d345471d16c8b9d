//! Linear PCM.

use super::{whole_frames, CodecError, Decoder};

/// Signed 16-bit little-endian. Dividing by 32768 is exact in `f32`, so the
/// recorder can restore the original integers bit for bit.
pub struct S16LeDecoder {
    channels: usize,
}

impl S16LeDecoder {
    pub fn new(channels: usize) -> Self {
        Self { channels }
    }
}

impl Decoder for S16LeDecoder {
    fn decode(&mut self, payload: &[u8], out: &mut Vec<f32>) -> Result<usize, CodecError> {
        let frames = whole_frames(payload, 2 * self.channels)?;
        out.reserve(payload.len() / 2);
        out.extend(
            payload
                .chunks_exact(2)
                .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0),
        );
        Ok(frames)
    }
}

/// 32-bit float little-endian, passed through unchanged. NaN and infinities
/// are replaced with silence: they would poison resamplers and WAV readers.
pub struct F32LeDecoder {
    channels: usize,
}

impl F32LeDecoder {
    pub fn new(channels: usize) -> Self {
        Self { channels }
    }
}

impl Decoder for F32LeDecoder {
    fn decode(&mut self, payload: &[u8], out: &mut Vec<f32>) -> Result<usize, CodecError> {
        let frames = whole_frames(payload, 4 * self.channels)?;
        out.reserve(payload.len() / 4);
        out.extend(payload.chunks_exact(4).map(|b| {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if v.is_finite() {
                v
            } else {
                0.0
            }
        }));
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s16_decodes_exactly_and_rejects_half_frames() {
        let mut d = S16LeDecoder::new(2);
        let mut out = Vec::new();
        let bytes: Vec<u8> = [i16::MIN, -1, 0, i16::MAX]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        assert_eq!(d.decode(&bytes, &mut out), Ok(2));
        assert_eq!(out, vec![-1.0, -1.0 / 32768.0, 0.0, 32767.0 / 32768.0]);
        assert_eq!(
            d.decode(&bytes[..6], &mut out),
            Err(CodecError::PartialFrame {
                len_bytes: 6,
                frame_bytes: 4
            })
        );
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn f32_replaces_non_finite_values() {
        let mut d = F32LeDecoder::new(1);
        let mut out = Vec::new();
        let bytes: Vec<u8> = [0.5f32, f32::NAN, f32::INFINITY]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        assert_eq!(d.decode(&bytes, &mut out), Ok(3));
        assert_eq!(out, vec![0.5, 0.0, 0.0]);
    }
}
