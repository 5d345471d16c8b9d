//! Decoders: wire bytes → interleaved `f32` samples in [-1, 1).
//!
//! Every decoder is a plain struct: no IO, no clock. Errors come in two kinds,
//! kept apart as rubato keeps them: [`CodecBuildError`] when a decoder cannot
//! be made (its configuration is wrong: the server's fault, before any audio),
//! and [`CodecError`] when the audio itself is wrong (the client's). A runtime
//! error says how to recover (see [`CodecError::recovery`]), in the manner of
//! Symphonia.

pub mod container;
mod g711;
pub mod limit;
pub mod ogg;
pub mod opus;
mod pcm;
pub mod webm;

pub use g711::{alaw_to_linear, linear_to_alaw, linear_to_mulaw, mulaw_to_linear};
pub use pcm::{F32LeDecoder, S16LeDecoder};

use crate::protocol::{Encoding, StreamFormat};

/// A decoder could not be built from its configuration. Input is checked
/// before a decoder is built (`protocol` for the query and `start`, the
/// demuxers for a container header), so no client input should lead here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecBuildError {
    #[error("Opus decoder: {channels} channels are not supported (1 or 2)")]
    UnsupportedChannels { channels: u16 },
    #[error("Opus decoder: libopus does not decode at {sample_rate_hz} Hz (8000, 12000, 16000, 24000 or 48000)")]
    UnsupportedSampleRate { sample_rate_hz: u32 },
    /// libopus refused a request the checks above let through.
    #[error("Opus decoder: cannot {action}: {detail}")]
    Libopus {
        action: &'static str,
        detail: String,
    },
}

/// The audio could not be decoded: what was wrong with the client's bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error(
        "payload of {len_bytes} bytes is not a whole number of {frame_bytes}-byte sample frames"
    )]
    PartialFrame {
        len_bytes: usize,
        frame_bytes: usize,
    },
    /// One packet could not be decoded; it was concealed.
    #[error("{0}")]
    DamagedPacket(String),
}

/// What the session should do after a decoder error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The client broke the framing contract; its later audio cannot be trusted
    /// to line up, so the stream ends.
    EndStream,
    /// The damage was concealed for its duration; tell the client, go on.
    Concealed,
}

impl CodecError {
    pub fn recovery(&self) -> Recovery {
        match self {
            CodecError::PartialFrame { .. } => Recovery::EndStream,
            CodecError::DamagedPacket(_) => Recovery::Concealed,
        }
    }
}

/// Turns one message's audio payload into samples.
pub trait Decoder: Send {
    /// Appends the decoded interleaved samples to `out` and returns how many
    /// sample frames were added. On error, `out` is left as it was.
    fn decode(&mut self, payload: &[u8], out: &mut Vec<f32>) -> Result<usize, CodecError>;
}

/// Builds the decoder for a sample-frame encoding (PCM, G.711); `None` for
/// the packet and container encodings, which have their own paths.
pub fn frame_decoder_for(format: &StreamFormat) -> Option<Box<dyn Decoder>> {
    let channels = usize::from(format.channels);
    Some(match format.encoding {
        Encoding::PcmS16le => Box::new(S16LeDecoder::new(channels)),
        Encoding::PcmF32le => Box::new(F32LeDecoder::new(channels)),
        Encoding::Mulaw => Box::new(g711::G711Decoder::mulaw(channels)),
        Encoding::Alaw => Box::new(g711::G711Decoder::alaw(channels)),
        Encoding::Opus | Encoding::OggOpus | Encoding::WebmOpus => return None,
    })
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
