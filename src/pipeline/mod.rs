//! The per-session pipeline: binary message → framing → decode → media-ordered
//! audio blocks for the sinks.
//!
//! Pure and synchronous: the server hands it bytes, it hands back blocks. Time
//! is media time, counted in sample frames, never read from a clock.

use std::sync::Arc;
use std::time::Instant;

pub mod convert;
pub mod jitter;
pub mod netem;
pub mod resample;

use jitter::{JitterBuffer, JitterConfig, Pushed, Released};

use crate::codec::container::{DemuxError, DemuxEvent, Demuxer};
use crate::codec::ogg::OggDemuxer;
use crate::codec::opus::OpusDecoder;
use crate::codec::webm::WebmDemuxer;
use crate::codec::{frame_decoder_for, CodecError, Decoder};
use crate::protocol::{Encoding, Framing, ProtocolError, SeqHeader, StreamFormat};

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
    #[error(transparent)]
    Demux(#[from] DemuxError),
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
    /// Opus packets or container pages that could not be decoded.
    pub damaged_packets: u64,
    /// Sample frames made up by packet-loss concealment or FEC.
    pub concealed_frames: u64,
    /// Sample frames of silence put in for gaps (PCM and G.711; Opus gaps
    /// are concealed instead and counted in `concealed_frames`).
    pub silence_frames: u64,
    /// `seq` numbers skipped by the client (their media time was filled).
    pub lost_messages: u64,
    /// Arrived after their place had been filled: discarded.
    pub late_messages: u64,
    /// Media held back waiting for missing packets, and the hold limit.
    pub current_delay_ms: u32,
    pub target_delay_ms: u32,
}

/// Where samples come from.
enum Source {
    /// PCM and G.711: every message holds whole sample frames.
    Frames(Box<dyn Decoder>),
    /// `opus`: one packet per message.
    Packets(OpusDecoder),
    /// `ogg_opus`, `webm_opus`: a byte stream; the decoder exists once the
    /// header has said how many channels there are.
    Container(Box<ContainerSource>),
}

struct ContainerSource {
    demuxer: Box<dyn Demuxer>,
    decoder: Option<OpusDecoder>,
    events: Vec<DemuxEvent>,
    /// Decoded frames still to drop for the header's pre-skip.
    skip_frames: usize,
    /// 48 kHz pre-skip, to turn an end granule into a frame count.
    pre_skip_48k: u64,
}

pub struct Pipeline {
    /// The client's declared format; for containers, channels are only
    /// provisional until `format_known`.
    format: StreamFormat,
    format_known: bool,
    source: Source,
    /// Media position where the next audio is expected.
    next_frame: u64,
    max_gap_ms: u64,
    stats: PipelineStats,
    last_damage: Option<String>,
    scratch: Vec<f32>,
    /// `framing=seq`: puts messages in order and decides when a hole is
    /// given up on. Holds each message's audio payload.
    jitter: Option<JitterBuffer<Vec<u8>>>,
    /// An Opus hole released by the jitter buffer, concealed once the packet
    /// after it is decoded (so in-band FEC can fill its end).
    pending_gap: Option<(u64, u64)>,
}

impl Pipeline {
    /// `max_gap_ms` bounds the silence one `framing=seq` timestamp jump may
    /// insert: without it a single header could demand hours of audio.
    pub fn new(format: StreamFormat, max_gap_ms: u64) -> Result<Self, PipelineError> {
        Self::with_jitter(format, max_gap_ms, JitterConfig::new(format.sample_rate))
    }

    /// As [`Pipeline::new`], with the jitter buffer's settings for `framing=seq`.
    pub fn with_jitter(
        format: StreamFormat,
        max_gap_ms: u64,
        jitter: JitterConfig,
    ) -> Result<Self, PipelineError> {
        let (source, format_known) = if let Some(decoder) = frame_decoder_for(&format) {
            (Source::Frames(decoder), true)
        } else if format.encoding == Encoding::Opus {
            let decoder = OpusDecoder::new(format.sample_rate, format.channels)?;
            (Source::Packets(decoder), true)
        } else {
            let demuxer: Box<dyn Demuxer> = match format.encoding {
                Encoding::WebmOpus => Box::new(WebmDemuxer::new()),
                _ => Box::new(OggDemuxer::new()),
            };
            let container = ContainerSource {
                demuxer,
                decoder: None,
                events: Vec::new(),
                skip_frames: 0,
                pre_skip_48k: 0,
            };
            (Source::Container(Box::new(container)), false)
        };
        Ok(Self {
            format,
            format_known,
            source,
            next_frame: 0,
            max_gap_ms,
            stats: PipelineStats::default(),
            last_damage: None,
            scratch: Vec::new(),
            jitter: (format.framing == Framing::Seq && !format.encoding.is_container()).then(
                || {
                    JitterBuffer::new(JitterConfig {
                        sample_rate: format.sample_rate,
                        ..jitter
                    })
                },
            ),
            pending_gap: None,
        })
    }

    /// The effective format, once known (containers: after their header).
    pub fn format(&self) -> Option<&StreamFormat> {
        self.format_known.then_some(&self.format)
    }

    /// The declared format (for containers, channels may still change).
    pub fn declared_format(&self) -> &StreamFormat {
        &self.format
    }

    pub fn stats(&self) -> PipelineStats {
        let mut stats = self.stats;
        if let Some(jitter) = &self.jitter {
            let j = jitter.stats();
            stats.duplicate_messages = j.packets_duplicated;
            stats.late_messages = j.packets_late;
            stats.lost_messages = j.packets_lost;
            stats.current_delay_ms = j.current_delay_ms;
            stats.target_delay_ms = j.target_delay_ms;
        }
        stats
    }

    /// When [`Pipeline::poll`] should next be called, if a hole is held open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.jitter.as_ref().and_then(JitterBuffer::next_deadline)
    }

    /// Releases what the jitter buffer no longer needs to hold at `now`.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<AudioBlock>) {
        let Some(mut jitter) = self.jitter.take() else {
            return;
        };
        while let Some(released) = jitter.pop(now) {
            self.take_released(released, out);
        }
        self.jitter = Some(jitter);
    }

    /// End of stream: releases everything held, holes filled.
    pub fn finish(&mut self, out: &mut Vec<AudioBlock>) {
        let Some(mut jitter) = self.jitter.take() else {
            return;
        };
        for released in jitter.drain() {
            self.take_released(released, out);
        }
        self.jitter = Some(jitter);
    }

    /// What was wrong with the latest damaged packet, if any since last asked.
    pub fn take_damage(&mut self) -> Option<String> {
        self.last_damage.take()
    }

    /// The highest `seq` handed on to the sinks (`framing=seq`).
    pub fn last_seq(&self) -> Option<u32> {
        self.jitter
            .as_ref()
            .and_then(JitterBuffer::last_released_seq)
    }

    /// Media time reached so far, in sample frames (gaps included).
    pub fn media_frames(&self) -> u64 {
        self.next_frame
    }

    fn max_gap_frames(&self) -> u64 {
        self.max_gap_ms
            .saturating_mul(u64::from(self.format.sample_rate))
            / 1000
    }

    /// Takes one binary message at `now` and appends the blocks it yields
    /// to `out`, in media order. On an error nothing is appended.
    pub fn push(
        &mut self,
        message: &[u8],
        now: Instant,
        out: &mut Vec<AudioBlock>,
    ) -> Result<(), PipelineError> {
        if let Source::Container(_) = self.source {
            self.stats.audio_messages += 1;
            self.stats.audio_bytes += message.len() as u64;
            return self.push_container(message, out);
        }
        if self.jitter.is_some() {
            return self.push_seq(message, now, out);
        }
        let start_frame = self.next_frame;
        self.decode_at(start_frame, message, out)?;
        self.stats.audio_messages += 1;
        self.stats.audio_bytes += message.len() as u64;
        Ok(())
    }

    fn push_seq(
        &mut self,
        message: &[u8],
        now: Instant,
        out: &mut Vec<AudioBlock>,
    ) -> Result<(), PipelineError> {
        let (header, payload) = SeqHeader::parse(message)?;
        let frames = self.frames_of(payload)?;
        let Some(mut jitter) = self.jitter.take() else {
            return Ok(());
        };
        let next = jitter.next_timestamp();
        let is_new = jitter
            .last_released_seq()
            .is_none_or(|released| header.seq > released);
        let checked = if is_new && header.timestamp < next {
            // A new seq placed before media already handed on: the client's
            // clock went backwards, which no reordering can explain.
            Err(ProtocolError::TimestampBackwards {
                seq: header.seq,
                timestamp: header.timestamp,
                expected_at_least: next,
            })
        } else if header.timestamp.saturating_sub(next) > self.max_gap_frames() {
            Err(ProtocolError::GapTooLarge {
                seq: header.seq,
                timestamp: header.timestamp,
                gap_frames: header.timestamp - next,
                max_gap_frames: self.max_gap_frames(),
            })
        } else {
            Ok(())
        };
        if let Err(e) = checked {
            self.jitter = Some(jitter);
            return Err(e.into());
        }
        self.stats.audio_messages += 1;
        self.stats.audio_bytes += message.len() as u64;
        // Duplicates and late arrivals are counted by the buffer and dropped.
        let _: Pushed = jitter.push(header.seq, header.timestamp, frames, payload.to_vec(), now);
        while let Some(released) = jitter.pop(now) {
            self.take_released(released, out);
        }
        self.jitter = Some(jitter);
        Ok(())
    }

    /// Sample frames a payload holds, checked before it is buffered.
    fn frames_of(&self, payload: &[u8]) -> Result<u64, PipelineError> {
        match &self.source {
            Source::Packets(decoder) => Ok(decoder.nominal_frames(payload) as u64),
            _ => {
                let frame_bytes = self.format.bytes_per_frame().unwrap_or(1);
                if !payload.len().is_multiple_of(frame_bytes) {
                    return Err(CodecError::PartialFrame {
                        len_bytes: payload.len(),
                        frame_bytes,
                    }
                    .into());
                }
                Ok((payload.len() / frame_bytes) as u64)
            }
        }
    }

    /// Turns what the jitter buffer released into blocks.
    fn take_released(&mut self, released: Released<Vec<u8>>, out: &mut Vec<AudioBlock>) {
        match released {
            Released::Gap { timestamp, frames } => {
                self.stats.gap_frames += frames;
                match self.source {
                    Source::Packets(_) => self.pending_gap = Some((timestamp, frames)),
                    _ => {
                        self.stats.silence_frames += frames;
                        out.push(AudioBlock {
                            start_frame: timestamp,
                            frames: frames as usize,
                            channels: self.format.channels,
                            samples: BlockSamples::Silence,
                        });
                        self.next_frame = timestamp + frames;
                    }
                }
            }
            Released::Packet {
                timestamp, payload, ..
            } => {
                if let Some((gap_start, gap_frames)) = self.pending_gap.take() {
                    if let Source::Packets(decoder) = &mut self.source {
                        // A gap in Opus is concealed (PLC, then FEC from this
                        // packet) rather than left silent.
                        let mut concealed = Vec::new();
                        decoder.conceal(gap_frames as usize, Some(&payload), &mut concealed);
                        self.stats.concealed_frames += gap_frames;
                        out.push(AudioBlock {
                            start_frame: gap_start,
                            frames: gap_frames as usize,
                            channels: self.format.channels,
                            samples: BlockSamples::Audio(concealed),
                        });
                    }
                }
                // Validated when it was buffered, so this cannot fail; Opus
                // damage is concealed and counted inside.
                let _ = self.decode_at(timestamp, &payload, out);
            }
        }
    }

    /// Decodes one payload placed at `start_frame`.
    fn decode_at(
        &mut self,
        start_frame: u64,
        payload: &[u8],
        out: &mut Vec<AudioBlock>,
    ) -> Result<(), PipelineError> {
        let mut samples = Vec::new();
        let frames = match &mut self.source {
            Source::Frames(decoder) => decoder.decode(payload, &mut samples)?,
            Source::Packets(decoder) => match decoder.decode(payload, &mut samples) {
                Ok(frames) => frames,
                Err((frames, damage)) => {
                    note_damage(&mut self.stats, &mut self.last_damage, frames, &damage)
                }
            },
            Source::Container(_) => 0,
        };
        if frames > 0 {
            out.push(AudioBlock {
                start_frame,
                frames,
                channels: self.format.channels,
                samples: BlockSamples::Audio(samples),
            });
        }
        self.next_frame = start_frame + frames as u64;
        self.stats.decoded_frames += frames as u64;
        Ok(())
    }

    fn push_container(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<AudioBlock>,
    ) -> Result<(), PipelineError> {
        let Source::Container(container) = &mut self.source else {
            return Ok(());
        };
        let mut events = std::mem::take(&mut container.events);
        events.clear();
        let pushed = container.demuxer.push(bytes, &mut events);
        // Events completed before an error are still delivered.
        for event in events.drain(..) {
            match event {
                DemuxEvent::Head(head) => {
                    if container.decoder.is_some() {
                        continue;
                    }
                    let channels = u16::from(head.channels);
                    let mut decoder = OpusDecoder::new(self.format.sample_rate, channels)?;
                    decoder.set_gain_q8(head.output_gain_q8)?;
                    container.decoder = Some(decoder);
                    container.pre_skip_48k = u64::from(head.pre_skip);
                    container.skip_frames = (u64::from(head.pre_skip)
                        * u64::from(self.format.sample_rate)
                        / 48_000) as usize;
                    self.format.channels = channels;
                    self.format_known = true;
                }
                DemuxEvent::Packet { data, end_granule } => {
                    let Some(decoder) = container.decoder.as_mut() else {
                        return Err(
                            DemuxError::Malformed("audio before the Opus header".into()).into()
                        );
                    };
                    self.scratch.clear();
                    let frames = match decoder.decode(&data, &mut self.scratch) {
                        Ok(frames) => frames,
                        Err((frames, damage)) => {
                            note_damage(&mut self.stats, &mut self.last_damage, frames, &damage)
                        }
                    };
                    let channels = usize::from(self.format.channels);
                    let skip = container.skip_frames.min(frames);
                    container.skip_frames -= skip;
                    let mut keep = frames - skip;
                    if let Some(granule) = end_granule {
                        // RFC 7845 §4.5: the final granule says where the
                        // stream really ends; the rest of the packet is padding.
                        let total = granule.saturating_sub(container.pre_skip_48k)
                            * u64::from(self.format.sample_rate)
                            / 48_000;
                        let allowed = total.saturating_sub(self.next_frame) as usize;
                        keep = keep.min(allowed);
                    }
                    if keep > 0 {
                        let samples =
                            self.scratch[skip * channels..(skip + keep) * channels].to_vec();
                        out.push(AudioBlock {
                            start_frame: self.next_frame,
                            frames: keep,
                            channels: self.format.channels,
                            samples: BlockSamples::Audio(samples),
                        });
                        self.next_frame += keep as u64;
                        self.stats.decoded_frames += keep as u64;
                    }
                }
                DemuxEvent::Damaged { reason, .. } => {
                    self.stats.damaged_packets += 1;
                    self.last_damage = Some(reason);
                }
            }
        }
        container.events = events;
        pushed.map_err(PipelineError::from)
    }
}

impl PipelineStats {
    /// Media frames the client did not supply, filled with silence or
    /// concealment: each counted once, whichever way it was filled.
    pub fn filled_frames(&self) -> u64 {
        self.silence_frames + self.concealed_frames
    }
}

/// Counts a packet that was concealed instead of decoded; returns its frames.
fn note_damage(
    stats: &mut PipelineStats,
    last_damage: &mut Option<String>,
    frames: usize,
    damage: &CodecError,
) -> usize {
    stats.damaged_packets += 1;
    stats.concealed_frames += frames as u64;
    *last_damage = Some(damage.to_string());
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Encoding;
    use std::time::Instant;

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
        let mut p = Pipeline::new(format(Framing::Raw), 1000).unwrap();
        let mut out = Vec::new();
        p.push(&[0; 320], Instant::now(), &mut out).unwrap();
        p.push(&[0; 320], Instant::now(), &mut out).unwrap();
        assert_eq!(out[1].start_frame, 160);
        assert_eq!(p.media_frames(), 320);
    }

    #[test]
    fn seq_gap_becomes_silence_and_duplicates_are_dropped() {
        let mut p = Pipeline::new(format(Framing::Seq), 1000).unwrap();
        let mut out = Vec::new();
        p.push(&seq_message(0, 0, 160), Instant::now(), &mut out)
            .unwrap();
        p.push(&seq_message(2, 320, 160), Instant::now(), &mut out)
            .unwrap();
        p.push(&seq_message(2, 320, 160), Instant::now(), &mut out)
            .unwrap();
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
        let mut p = Pipeline::new(format(Framing::Seq), 1000).unwrap();
        let mut out = Vec::new();
        p.push(&seq_message(0, 0, 160), Instant::now(), &mut out)
            .unwrap();
        assert!(matches!(
            p.push(&seq_message(1, 100, 160), Instant::now(), &mut out),
            Err(PipelineError::Protocol(
                ProtocolError::TimestampBackwards { .. }
            ))
        ));
        assert!(matches!(
            p.push(&seq_message(1, 160 + 8001, 160), Instant::now(), &mut out),
            Err(PipelineError::Protocol(ProtocolError::GapTooLarge { .. }))
        ));
        let mut odd = seq_message(1, 160, 1);
        odd.push(0);
        assert!(matches!(
            p.push(&odd, Instant::now(), &mut out),
            Err(PipelineError::Codec(CodecError::PartialFrame { .. }))
        ));
        assert!(matches!(
            p.push(&[1, 2, 3], Instant::now(), &mut out),
            Err(PipelineError::Protocol(
                ProtocolError::SeqHeaderTruncated { .. }
            ))
        ));
        assert_eq!(out.len(), 1);
        // The same seq is still acceptable after the failed attempts.
        p.push(&seq_message(1, 160, 160), Instant::now(), &mut out)
            .unwrap();
        assert_eq!(p.media_frames(), 320);
    }
}
