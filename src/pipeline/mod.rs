//! The per-session pipeline: binary message → framing → decode → media-ordered
//! audio blocks for the sinks.
//!
//! Pure and synchronous: the server hands it bytes, it hands back blocks. Time
//! is media time, counted in sample frames, never read from a clock.

use std::sync::Arc;

use crate::codec::{decoder_for, CodecError, Decoder};
use crate::protocol::{Framing, ProtocolError, SeqHeader, StreamFormat};

/// A run of sample frames at a known media position, shared by every sink.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioBlock {
    /// Media position of the first sample frame since the stream started.
    pub start_frame: u64,
    pub frames: usize,
    pub channels: u16,
    pub samples: BlockSamples,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BlockSamples {
    /// Interleaved samples in [-1, 1), `frames * channels` long.
    Audio(Vec<f32>),
    /// Frames the client skipped (a timestamp gap): silence, not stored.
    Silence,
}

impl AudioBlock {
    pub fn end_frame(&self) -> u64 {
        self.start_frame + self.frames as u64
    }
}

/// Blocks are shared between sink tasks without copying the samples.
pub type SharedBlock = Arc<AudioBlock>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PipelineError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Running totals, reported in `closed` and as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub audio_messages: u64,
    pub audio_bytes: u64,
    /// Sample frames decoded from the client's audio (gaps not included).
    pub decoded_frames: u64,
    pub gap_frames: u64,
    pub duplicate_messages: u64,
}

pub struct Pipeline {
    format: StreamFormat,
    decoder: Box<dyn Decoder>,
    /// Media position where the next audio is expected.
    next_frame: u64,
    last_seq: Option<u32>,
    max_gap_frames: u64,
    stats: PipelineStats,
}

impl Pipeline {
    /// `max_gap_ms` bounds the silence one `framing=seq` timestamp jump may
    /// insert: without it a single header could demand hours of audio.
    pub fn new(format: StreamFormat, max_gap_ms: u64) -> Self {
        let max_gap_frames = max_gap_ms.saturating_mul(u64::from(format.sample_rate)) / 1000;
        Self {
            decoder: decoder_for(&format),
            format,
            next_frame: 0,
            last_seq: None,
            max_gap_frames,
            stats: PipelineStats::default(),
        }
    }

    pub fn format(&self) -> &StreamFormat {
        &self.format
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Media time reached so far, in sample frames (gaps included).
    pub fn media_frames(&self) -> u64 {
        self.next_frame
    }

    /// Takes one binary message and appends the blocks it yields to `out`, in
    /// media order: a silence block for any gap, then the audio. On error
    /// nothing is appended and the pipeline state is unchanged.
    pub fn push(&mut self, message: &[u8], out: &mut Vec<AudioBlock>) -> Result<(), PipelineError> {
        let (start_frame, seq, payload) = match self.format.framing {
            Framing::Raw => (self.next_frame, None, message),
            Framing::Seq => {
                let (header, payload) = SeqHeader::parse(message)?;
                if self.last_seq.is_some_and(|last| header.seq <= last) {
                    // A resend of something already taken: drop it, keep going.
                    self.stats.audio_messages += 1;
                    self.stats.audio_bytes += message.len() as u64;
                    self.stats.duplicate_messages += 1;
                    return Ok(());
                }
                if header.timestamp < self.next_frame {
                    return Err(ProtocolError::TimestampBackwards {
                        seq: header.seq,
                        timestamp: header.timestamp,
                        expected_at_least: self.next_frame,
                    }
                    .into());
                }
                let gap_frames = header.timestamp - self.next_frame;
                if gap_frames > self.max_gap_frames {
                    return Err(ProtocolError::GapTooLarge {
                        seq: header.seq,
                        timestamp: header.timestamp,
                        gap_frames,
                        max_gap_frames: self.max_gap_frames,
                    }
                    .into());
                }
                (header.timestamp, Some(header.seq), payload)
            }
        };

        let mut samples = Vec::new();
        let frames = self.decoder.decode(payload, &mut samples)?;

        // Everything below is infallible: commit.
        if let Some(seq) = seq {
            self.last_seq = Some(seq);
        }
        let channels = self.format.channels;
        let gap_frames = start_frame - self.next_frame;
        if gap_frames > 0 {
            out.push(AudioBlock {
                start_frame: self.next_frame,
                frames: gap_frames as usize,
                channels,
                samples: BlockSamples::Silence,
            });
            self.stats.gap_frames += gap_frames;
        }
        if frames > 0 {
            out.push(AudioBlock {
                start_frame,
                frames,
                channels,
                samples: BlockSamples::Audio(samples),
            });
        }
        self.next_frame = start_frame + frames as u64;
        self.stats.audio_messages += 1;
        self.stats.audio_bytes += message.len() as u64;
        self.stats.decoded_frames += frames as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Encoding;

    fn format(framing: Framing) -> StreamFormat {
        StreamFormat {
            encoding: Encoding::PcmS16le,
            sample_rate: 8000,
            channels: 1,
            framing,
        }
    }

    fn seq_message(seq: u32, timestamp: u64, frames: usize) -> Vec<u8> {
        let mut m = SeqHeader { seq, timestamp }.encode().to_vec();
        m.extend(std::iter::repeat_n(0x11u8, frames * 2));
        m
    }

    #[test]
    fn raw_blocks_are_contiguous() {
        let mut p = Pipeline::new(format(Framing::Raw), 1000);
        let mut out = Vec::new();
        p.push(&[0; 320], &mut out).unwrap();
        p.push(&[0; 320], &mut out).unwrap();
        assert_eq!(out[1].start_frame, 160);
        assert_eq!(p.media_frames(), 320);
    }

    #[test]
    fn seq_gap_becomes_silence_and_duplicates_are_dropped() {
        let mut p = Pipeline::new(format(Framing::Seq), 1000);
        let mut out = Vec::new();
        p.push(&seq_message(0, 0, 160), &mut out).unwrap();
        p.push(&seq_message(2, 320, 160), &mut out).unwrap();
        p.push(&seq_message(2, 320, 160), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].samples, BlockSamples::Silence);
        assert_eq!((out[1].start_frame, out[1].frames), (160, 160));
        assert_eq!(out[2].start_frame, 320);
        let stats = p.stats();
        assert_eq!(stats.gap_frames, 160);
        assert_eq!(stats.duplicate_messages, 1);
        assert_eq!(p.media_frames(), 480);
    }

    #[test]
    fn seq_errors_leave_state_untouched() {
        let mut p = Pipeline::new(format(Framing::Seq), 1000);
        let mut out = Vec::new();
        p.push(&seq_message(0, 0, 160), &mut out).unwrap();
        assert!(matches!(
            p.push(&seq_message(1, 100, 160), &mut out),
            Err(PipelineError::Protocol(
                ProtocolError::TimestampBackwards { .. }
            ))
        ));
        assert!(matches!(
            p.push(&seq_message(1, 160 + 8001, 160), &mut out),
            Err(PipelineError::Protocol(ProtocolError::GapTooLarge { .. }))
        ));
        let mut odd = seq_message(1, 160, 1);
        odd.push(0);
        assert!(matches!(
            p.push(&odd, &mut out),
            Err(PipelineError::Codec(CodecError::PartialFrame { .. }))
        ));
        assert!(matches!(
            p.push(&[1, 2, 3], &mut out),
            Err(PipelineError::Protocol(
                ProtocolError::SeqHeaderTruncated { .. }
            ))
        ));
        assert_eq!(out.len(), 1);
        // The same seq is still acceptable after the failed attempts.
        p.push(&seq_message(1, 160, 160), &mut out).unwrap();
        assert_eq!(p.media_frames(), 320);
    }
}
