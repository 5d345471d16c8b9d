//! G.711 μ-law and A-law (ITU-T G.711), decoded through 256-entry tables
//! built at compile time. The integer results are the standard 16-bit-scaled
//! values (μ-law ±32124, A-law ±32256), the same that sox and ffmpeg produce.

use super::{whole_frames, CodecError, Decoder};

const SIGN_BIT: u8 = 0x80;
const QUANT_MASK: u8 = 0x0f;
const SEG_SHIFT: u32 = 4;
const SEG_MASK: u8 = 0x70;
const ULAW_BIAS: i32 = 0x84;
const ULAW_CLIP: i32 = 8159;

/// Decodes one μ-law byte to a 16-bit linear sample.
pub const fn mulaw_to_linear(byte: u8) -> i16 {
    let u = !byte;
    let mut t = (((u & QUANT_MASK) as i32) << 3) + ULAW_BIAS;
    t <<= ((u & SEG_MASK) >> SEG_SHIFT) as i32;
    let v = if u & SIGN_BIT != 0 {
        ULAW_BIAS - t
    } else {
        t - ULAW_BIAS
    };
    v as i16
}

/// Decodes one A-law byte to a 16-bit linear sample.
pub const fn alaw_to_linear(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let mut t = ((a & QUANT_MASK) as i32) << 4;
    let seg = ((a & SEG_MASK) >> SEG_SHIFT) as i32;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => {
            t += 0x108;
            t <<= seg - 1;
        }
    }
    let v = if a & SIGN_BIT != 0 { t } else { -t };
    v as i16
}

const ULAW_SEG_END: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];
const ALAW_SEG_END: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];

fn segment(value: i32, ends: &[i32; 8]) -> usize {
    ends.iter().position(|&end| value <= end).unwrap_or(8)
}

/// Encodes a 16-bit linear sample to μ-law (for clients, tests and load generation).
pub fn linear_to_mulaw(sample: i16) -> u8 {
    let mut v = i32::from(sample) >> 2;
    let mask: u8 = if v < 0 {
        v = -v;
        0x7F
    } else {
        0xFF
    };
    v = v.min(ULAW_CLIP) + (ULAW_BIAS >> 2);
    let seg = segment(v, &ULAW_SEG_END);
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let byte = ((seg as u8) << 4) | ((v >> (seg + 1)) as u8 & QUANT_MASK);
    byte ^ mask
}

/// Encodes a 16-bit linear sample to A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let mut v = i32::from(sample) >> 3;
    let mask: u8 = if v >= 0 {
        0xD5
    } else {
        v = -v - 1;
        0x55
    };
    let seg = segment(v, &ALAW_SEG_END);
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let shift = if seg < 2 { 1 } else { seg };
    let byte = ((seg as u8) << 4) | ((v >> shift) as u8 & QUANT_MASK);
    byte ^ mask
}

#[derive(Clone, Copy)]
enum Law {
    Mu,
    A,
}

const fn table(law: Law) -> [f32; 256] {
    let mut out = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        let linear = match law {
            Law::Mu => mulaw_to_linear(i as u8),
            Law::A => alaw_to_linear(i as u8),
        };
        out[i] = linear as f32 / 32768.0;
        i += 1;
    }
    out
}

static MULAW_TABLE: [f32; 256] = table(Law::Mu);
static ALAW_TABLE: [f32; 256] = table(Law::A);

/// One byte per sample, looked up in a table.
pub struct G711Decoder {
    table: &'static [f32; 256],
    channels: usize,
}

impl G711Decoder {
    pub fn mulaw(channels: usize) -> Self {
        Self {
            table: &MULAW_TABLE,
            channels,
        }
    }

    pub fn alaw(channels: usize) -> Self {
        Self {
            table: &ALAW_TABLE,
            channels,
        }
    }
}

impl Decoder for G711Decoder {
    fn decode(&mut self, payload: &[u8], out: &mut Vec<f32>) -> Result<usize, CodecError> {
        let frames = whole_frames(payload, self.channels)?;
        out.extend(payload.iter().map(|&b| self.table[usize::from(b)]));
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_from_the_standard() {
        // 0xFF and 0x7F are μ-law's two zeros; 0x00 and 0x80 its extremes.
        assert_eq!(mulaw_to_linear(0xFF), 0);
        assert_eq!(mulaw_to_linear(0x7F), 0);
        assert_eq!(mulaw_to_linear(0x00), -32124);
        assert_eq!(mulaw_to_linear(0x80), 32124);
        // A-law's smallest magnitudes are ±8, its largest ±32256.
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xAA), 32256);
        assert_eq!(alaw_to_linear(0x2A), -32256);
    }

    #[test]
    fn encode_then_decode_is_identity_on_codewords() {
        for byte in 0..=255u8 {
            let linear = mulaw_to_linear(byte);
            let back = linear_to_mulaw(linear);
            assert_eq!(mulaw_to_linear(back), linear, "mulaw byte {byte:#x}");
            let linear = alaw_to_linear(byte);
            assert_eq!(
                alaw_to_linear(linear_to_alaw(linear)),
                linear,
                "alaw byte {byte:#x}"
            );
        }
    }

    #[test]
    fn quantisation_error_is_bounded_by_the_segment_step() {
        for sample in (i16::MIN..=i16::MAX).step_by(7) {
            let mu = i32::from(mulaw_to_linear(linear_to_mulaw(sample)));
            let a = i32::from(alaw_to_linear(linear_to_alaw(sample)));
            // The top segment's step is 1024 (μ-law) / 1024 (A-law): half of it bounds the error,
            // plus the clip region at the very top of μ-law.
            assert!(
                (mu - i32::from(sample)).abs() <= 1024,
                "mulaw {sample} -> {mu}"
            );
            assert!(
                (a - i32::from(sample)).abs() <= 1024,
                "alaw {sample} -> {a}"
            );
        }
    }
}
