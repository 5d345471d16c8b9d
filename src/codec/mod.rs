//! Decoders: wire bytes → interleaved `f32` samples in [-1, 1).
//!
//! Every decoder is a plain struct: no IO, no clock. A decoder error says how
//! to recover (see [`CodecError::recovery`]), in the manner of Symphonia.

mod g711;
mod pcm;

pub use g711::{alaw_to_linear, linear_to_alaw, linear_to_mulaw, mulaw_to_linear};
pub use pcm::{F32LeDecoder, S16LeDecoder};

use crate::protocol::{Encoding, StreamFormat};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error(
        "payload of {len_bytes} bytes is not a whole number of {frame_bytes}-byte sample frames"
    )]
    PartialFrame {
        len_bytes: usize,
        frame_bytes: usize,
    },
}

/// What the session should do after a decoder error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The client broke the framing contract; its later audio cannot be trusted
    /// to line up, so the stream ends.
    EndStream,
}

impl CodecError {
    pub fn recovery(&self) -> Recovery {
        match self {
            CodecError::PartialFrame { .. } => Recovery::EndStream,
        }
    }
}

/// Turns one message's audio payload into samples.
pub trait Decoder: Send {
    /// Appends the decoded interleaved samples to `out` and returns how many
    /// sample frames were added. On error, `out` is left as it was.
    fn decode(&mut self, payload: &[u8], out: &mut Vec<f32>) -> Result<usize, CodecError>;
}

/// Builds the decoder for a validated stream format.
pub fn decoder_for(format: &StreamFormat) -> Box<dyn Decoder> {
    let channels = usize::from(format.channels);
    match format.encoding {
        Encoding::PcmS16le => Box::new(S16LeDecoder::new(channels)),
        Encoding::PcmF32le => Box::new(F32LeDecoder::new(channels)),
        Encoding::Mulaw => Box::new(g711::G711Decoder::mulaw(channels)),
        Encoding::Alaw => Box::new(g711::G711Decoder::alaw(channels)),
    }
}

/// Checks that `payload` holds whole sample frames and returns how many.
fn whole_frames(payload: &[u8], frame_bytes: usize) -> Result<usize, CodecError> {
    if !payload.len().is_multiple_of(frame_bytes) {
        return Err(CodecError::PartialFrame {
            len_bytes: payload.len(),
            frame_bytes,
        });
    }
    Ok(payload.len() / frame_bytes)
}
