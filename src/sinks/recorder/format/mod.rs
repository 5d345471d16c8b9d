//! The recorder's file formats behind one writer: WAV, FLAC and Ogg Opus.
//!
//! The file side of a recording ([`super::RecordingFile`]) calls
//! [`FormatWriter`]'s `write`, `write_silence`, `write_packets`,
//! `checkpoint` and `finalize` without knowing the format.
//!
//! **Invariant (the object-storage uploader relies on it):** for every
//! format, once bytes past the first [`HEADER_REGION_BYTES`] of the file are
//! written they are never rewritten; only the header region at the start
//! is patched (the WAV header's size fields, FLAC's STREAMINFO; Ogg rewrites
//! nothing). So every byte from `HEADER_REGION_BYTES` up to
//! [`FormatWriter::durable_bytes`] can be uploaded once, as soon as a
//! checkpoint has put it in the file, and the header region last.

pub mod flac;
pub mod ogg;
pub mod ogg_opus;

use std::fs::File;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::wav::{Unfinished, WavWriter};
use crate::pipeline::OpusPacket;
use crate::protocol::Encoding;
use flac::FlacWriter;
use ogg_opus::OggOpusWriter;

/// The region at the start of a recording that may be rewritten (see the
/// module doc): far more than any of our headers (WAV 68, FLAC 42 bytes).
pub const HEADER_REGION_BYTES: u64 = 64 * 1024;

/// What a recording is stored as.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, Default, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum RecordFormat {
    /// PCM WAV, as `recorder.sample_format` says.
    #[default]
    Wav,
    /// Lossless FLAC, 16-bit.
    Flac,
    /// Opus in Ogg: the client's packets as sent for Opus input, else
    /// encoded at `recorder.opus_bitrate_bps`.
    #[value(name = "ogg_opus")]
    OggOpus,
}

impl RecordFormat {
    pub const ALL: [RecordFormat; 3] =
        [RecordFormat::Wav, RecordFormat::Flac, RecordFormat::OggOpus];

    pub fn name(self) -> &'static str {
        match self {
            RecordFormat::Wav => "wav",
            RecordFormat::Flac => "flac",
            RecordFormat::OggOpus => "ogg_opus",
        }
    }

    /// The file name's extension.
    pub fn extension(self) -> &'static str {
        match self {
            RecordFormat::Wav => "wav",
            RecordFormat::Flac => "flac",
            RecordFormat::OggOpus => "opus",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether a stream of `encoding` is recorded from its Opus packets as
    /// sent (no decoding) rather than from PCM.
    pub fn takes_opus_packets(self, encoding: Encoding) -> bool {
        self == RecordFormat::OggOpus
            && matches!(
                encoding,
                Encoding::Opus | Encoding::OggOpus | Encoding::WebmOpus
            )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("writing WAV: {0}")]
    Wav(#[from] hound::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One recording's writer, whatever its format.
pub enum FormatWriter {
    Wav(WavWriter),
    // Boxed: the encoder's state is large, and the enum is held per recording.
    Flac(Box<FlacWriter>),
    OggOpus(OggOpusWriter),
}

/// A writer that failed to finalize: the error, and for WAV the file whose
/// header can still be made to cover what is on disk.
pub type FinalizeError = (FormatError, Option<Unfinished>);

impl FormatWriter {
    pub fn format(&self) -> RecordFormat {
        match self {
            FormatWriter::Wav(_) => RecordFormat::Wav,
            FormatWriter::Flac(_) => RecordFormat::Flac,
            FormatWriter::OggOpus(_) => RecordFormat::OggOpus,
        }
    }

    /// Interleaved PCM in [-1, 1).
    pub fn write(&mut self, samples: &[f32]) -> Result<(), FormatError> {
        match self {
            FormatWriter::Wav(w) => w.write(samples)?,
            FormatWriter::Flac(w) => w.write(samples)?,
            FormatWriter::OggOpus(w) => w.write(samples)?,
        }
        Ok(())
    }

    /// `samples` zero samples.
    pub fn write_silence(&mut self, samples: usize) -> Result<(), FormatError> {
        match self {
            FormatWriter::Wav(w) => w.write_silence(samples)?,
            FormatWriter::Flac(w) => w.write_silence(samples)?,
            FormatWriter::OggOpus(w) => w.write_silence(samples)?,
        }
        Ok(())
    }

    /// The client's Opus packets (an Ogg Opus passthrough writer only).
    pub fn write_packets(&mut self, packets: &[OpusPacket]) -> Result<(), FormatError> {
        match self {
            FormatWriter::OggOpus(w) => w.write_packets(packets)?,
            _ => {
                return Err(io::Error::other(format!(
                    "Opus packets given to a {} recording",
                    self.format().name()
                ))
                .into())
            }
        }
        Ok(())
    }

    /// Everything written so far in the file, readable as such (header
    /// patched, frame or page completed).
    pub fn checkpoint(&mut self) -> Result<(), FormatError> {
        match self {
            FormatWriter::Wav(w) => w.checkpoint()?,
            FormatWriter::Flac(w) => w.checkpoint()?,
            FormatWriter::OggOpus(w) => w.checkpoint()?,
        }
        Ok(())
    }

    /// Bytes of the file written so far, as of the last checkpoint (the
    /// file may hold a little more). With [`HEADER_REGION_BYTES`], what an
    /// uploader may take: see the module doc.
    pub fn durable_bytes(&self) -> io::Result<u64> {
        match self {
            FormatWriter::Wav(w) => crate::sinks::recorder::wav::WavFile::size(w.file()),
            FormatWriter::Flac(w) => Ok(w.bytes()),
            FormatWriter::OggOpus(w) => Ok(w.bytes()),
        }
    }

    pub fn file(&self) -> &File {
        match self {
            FormatWriter::Wav(w) => w.file(),
            FormatWriter::Flac(w) => w.file(),
            FormatWriter::OggOpus(w) => w.file(),
        }
    }

    /// The file made final (header, last frame or page); the file, to sync.
    pub fn finalize(self) -> Result<Arc<File>, FinalizeError> {
        match self {
            FormatWriter::Wav(w) => w
                .finalize()
                .map_err(|(error, unfinished)| (error.into(), Some(unfinished))),
            FormatWriter::Flac(w) => (*w).finalize().map_err(|e| (e.into(), None)),
            FormatWriter::OggOpus(w) => w.finalize().map_err(|e| (e.into(), None)),
        }
    }
}
