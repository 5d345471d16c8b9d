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
use crate::codec::{frame_decoder_for, CodecBuildError, CodecError, Decoder};
use crate::protocol::{Encoding, Framing, ProtocolError, SeqHeader, StreamFormat};
use crate::telemetry::names;

/// A run of sample frames at a known media position, shared by every sink.
///
/// Blocks from a [`Pipeline`] are at its [`Pipeline::block_rate`], which for
/// Opus may be below the stream's declared rate; positions and lengths are
/// counted at that rate.
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

/// An Opus packet as the client sent it, or a stretch of lost ones, in
/// media order: what a sink that records Opus without decoding takes
/// ([`crate::sinks::Sink::write_packets`]). Durations are in 48 kHz samples,
/// Opus's own clock, read from each packet's TOC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpusPacket {
    Data {
        data: Vec<u8>,
        frames_48k: u32,
        /// Samples at the end of this (last) packet that are padding: an
        /// Ogg stream's end granule said the stream ends before it does.
        end_trim_48k: u32,
    },
    /// Packets lost (a `seq` hole given up on): this much media time.
    Lost { frames_48k: u64 },
}

impl AudioBlock {
    pub fn end_frame(&self) -> u64 {
        self.start_frame + self.frames as u64
    }
}

/// How many spare sample buffers a pipeline or converter keeps.
const SPARE_BUFFERS: usize = 4;

/// Empties `blocks`, keeping up to [`SPARE_BUFFERS`] sample buffers.
pub(crate) fn recycle_into(spare: &mut Vec<Vec<f32>>, blocks: &mut Vec<AudioBlock>) {
    for block in blocks.drain(..) {
        if let BlockSamples::Audio(samples) = block.samples {
            if spare.len() < SPARE_BUFFERS {
                spare.push(samples);
            }
        }
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
    /// The Opus decoder could not be made (for a container, once its header
    /// has said how many channels there are).
    #[error(transparent)]
    CodecBuild(#[from] CodecBuildError),
    #[error(transparent)]
    Demux(#[from] DemuxError),
}

/// Running totals, reported in `closed` and as metrics. Frame counts are at
/// the stream's declared rate, whatever rate Opus is decoded at.
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
    /// Sample frames made up by packet-loss concealment or FEC (and the
    /// silent middle of an Opus gap longer than `codec::opus::MAX_PLC_MS`).
    pub concealed_frames: u64,
    /// Sample frames of silence put in for gaps (PCM and G.711; Opus gaps
    /// are concealed instead and counted in `concealed_frames`).
    pub silence_frames: u64,
    /// `seq` numbers skipped by the client (their media time was filled).
    pub lost_messages: u64,
    /// Arrived after their place had been filled: discarded.
    pub late_messages: u64,
    /// Opus packets run through libopus (decoded or concealed): none when
    /// the session's sinks all take packets ([`Pipeline::set_outputs`]).
    pub decoded_packets: u64,
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
    /// The header's pre-skip, once seen.
    head_pre_skip: Option<u16>,
    /// 48 kHz samples of the packets so far (for the end granule's trim).
    packets_48k: u64,
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
    /// Rate of the samples in the blocks handed out: the stream's own, or for
    /// Opus a lower rate libopus decodes at directly (see
    /// [`Pipeline::decode_for_sinks`]). It divides the stream's rate.
    block_rate_hz: u32,
    /// Stream frames per block frame (`format.sample_rate / block_rate_hz`,
    /// a whole number): everything but the blocks themselves (timestamps,
    /// jitter buffer, gaps, statistics, `media_frames`) counts stream frames.
    stream_frames_per_block_frame: u64,
    /// Media position where the next audio is expected, in stream frames.
    next_frame: u64,
    max_gap_ms: u64,
    stats: PipelineStats,
    last_damage: Option<String>,
    scratch: Vec<f32>,
    /// Sample buffers of blocks the sinks are done with, for the next ones
    /// (see [`Pipeline::recycle`]): no allocation per message.
    spare: Vec<Vec<f32>>,
    /// `framing=seq`: puts messages in order and decides when a hole is
    /// given up on. Holds each message's audio payload.
    jitter: Option<JitterBuffer<Vec<u8>>>,
    /// An Opus hole (start and length in stream frames) released by the
    /// jitter buffer, concealed once the packet
    /// after it is decoded (so in-band FEC can fill its end).
    pending_gap: Option<(u64, u64)>,
    /// Whether the sinks take PCM: when not (Opus input whose sinks all
    /// take packets), libopus never runs and no blocks are made.
    decode_pcm: bool,
    /// Whether the sinks take Opus packets: they go to `packets`.
    emit_packets: bool,
    /// Packets for the sinks that take them, in media order; taken with
    /// [`Pipeline::take_packets`].
    packets: Vec<OpusPacket>,
    /// The last good packet's duration, for a packet too damaged to say.
    last_packet_48k: u32,
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
                head_pre_skip: None,
                packets_48k: 0,
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
            block_rate_hz: format.sample_rate,
            stream_frames_per_block_frame: 1,
            next_frame: 0,
            max_gap_ms,
            stats: PipelineStats::default(),
            last_damage: None,
            scratch: Vec::new(),
            spare: Vec::new(),
            jitter: (format.framing == Framing::Seq && !format.encoding.is_container()).then(
                || {
                    JitterBuffer::new(JitterConfig {
                        sample_rate: format.sample_rate,
                        ..jitter
                    })
                },
            ),
            pending_gap: None,
            decode_pcm: true,
            emit_packets: false,
            packets: Vec::new(),
            last_packet_48k: 960,
        })
    }

    /// Says what the sinks take (before the first audio; later calls are
    /// ignored): PCM blocks, Opus packets ([`Pipeline::take_packets`]), or
    /// both. Only Opus input can give packets; for other encodings this
    /// does nothing. Without PCM, libopus is never run: packet durations
    /// come from their TOC bytes.
    pub fn set_outputs(&mut self, pcm: bool, packets: bool) {
        if self.stats.audio_messages > 0 || matches!(self.source, Source::Frames(_)) {
            return;
        }
        self.decode_pcm = pcm || !packets;
        self.emit_packets = packets;
    }

    /// Moves the packets made so far into `out` (emptied first), keeping
    /// `out`'s buffer for the next ones: no allocation per message beyond
    /// the packets themselves.
    pub fn take_packets(&mut self, out: &mut Vec<OpusPacket>) {
        out.clear();
        std::mem::swap(out, &mut self.packets);
    }

    /// The Opus pre-skip of the stream (48 kHz samples): a container
    /// header's once seen, else 0.
    pub fn opus_pre_skip(&self) -> u16 {
        match &self.source {
            Source::Container(c) => c.head_pre_skip.unwrap_or(0),
            _ => 0,
        }
    }

    /// A packet's duration at 48 kHz from its TOC (the last good packet's
    /// if it cannot be read).
    fn packet_48k(&mut self, packet: &[u8]) -> u32 {
        match opus::packet::get_nb_samples(packet, 48_000) {
            Ok(n) if !packet.is_empty() => {
                self.last_packet_48k = n as u32;
                n as u32
            }
            _ => self.last_packet_48k,
        }
    }

    /// Decodes Opus at the lowest rate that serves sinks wanting
    /// `sink_rates_hz` (`None`: the stream's own rate), instead of at the
    /// stream's rate: see [`crate::codec::opus::decode_rate_for`]. Other
    /// encodings are left as they are. Only before the first audio: once
    /// audio has been decoded, nothing changes.
    pub fn decode_for_sinks(&mut self, sink_rates_hz: &[Option<u32>]) -> Result<(), PipelineError> {
        if self.stats.audio_messages > 0 {
            return Ok(());
        }
        let stream_rate_hz = self.format.sample_rate;
        let decode_rate_hz = crate::codec::opus::decode_rate_for(stream_rate_hz, sink_rates_hz);
        match &mut self.source {
            Source::Frames(_) => return Ok(()),
            Source::Packets(decoder) => {
                *decoder = OpusDecoder::new(decode_rate_hz, self.format.channels)?;
            }
            // The decoder is made from the header, at `block_rate_hz`.
            Source::Container(_) => {}
        }
        self.block_rate_hz = decode_rate_hz;
        self.stream_frames_per_block_frame = u64::from(stream_rate_hz / decode_rate_hz);
        Ok(())
    }

    /// Rate of the samples in the blocks this pipeline hands out.
    pub fn block_rate(&self) -> u32 {
        self.block_rate_hz
    }

    /// Block frames (at [`Pipeline::block_rate`]) to stream frames.
    fn to_stream_frames(&self, block_frames: usize) -> u64 {
        block_frames as u64 * self.stream_frames_per_block_frame
    }

    /// A media position in stream frames, at the block rate (rounded down:
    /// a timestamp between two block frames belongs to the earlier one).
    fn to_block_position(&self, stream_frame: u64) -> u64 {
        stream_frame / self.stream_frames_per_block_frame
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

    /// Takes back the blocks handed out (emptying `blocks`), keeping their
    /// sample buffers for the next ones.
    pub fn recycle(&mut self, blocks: &mut Vec<AudioBlock>) {
        recycle_into(&mut self.spare, blocks);
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
            // Timestamps count stream frames; the decoder counts its own.
            Source::Packets(decoder) => Ok(self.to_stream_frames(decoder.nominal_frames(payload))),
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
                if self.emit_packets {
                    let frames_48k = frames * 48_000 / u64::from(self.format.sample_rate.max(1));
                    self.packets.push(OpusPacket::Lost { frames_48k });
                }
                match self.source {
                    Source::Packets(_) if !self.decode_pcm => {
                        // Concealed by whoever decodes the packets.
                        self.stats.concealed_frames += frames;
                        self.next_frame = timestamp + frames;
                    }
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
                    self.stats.decoded_packets += 1;
                    // The gap in block frames: from where its start falls to
                    // where its end falls, so that successive blocks stay
                    // contiguous whatever the timestamps' alignment.
                    let block_start = self.to_block_position(gap_start);
                    let block_frames =
                        (self.to_block_position(gap_start + gap_frames) - block_start) as usize;
                    if let Source::Packets(decoder) = &mut self.source {
                        // A gap in Opus is concealed (PLC, then FEC from this
                        // packet) rather than left silent; past MAX_PLC_MS,
                        // where PLC has faded out, it is silence, which costs
                        // nothing to make however long the gap.
                        let channels = self.format.channels;
                        let (plc_frames, silent_frames) = decoder.gap_split(block_frames);
                        let mut at = block_start;
                        if silent_frames > 0 {
                            let mut head = Vec::new();
                            decoder.conceal(plc_frames, None, &mut head);
                            push_filled(out, &mut at, channels, plc_frames, head);
                            out.push(AudioBlock {
                                start_frame: at,
                                frames: silent_frames,
                                channels,
                                samples: BlockSamples::Silence,
                            });
                            at += silent_frames as u64;
                        }
                        let rest = block_frames - (at - block_start) as usize;
                        let mut tail = Vec::new();
                        decoder.conceal(rest, Some(&payload), &mut tail);
                        push_filled(out, &mut at, channels, rest, tail);
                        self.stats.concealed_frames += gap_frames;
                    }
                }
                // Validated when it was buffered, so this cannot fail; Opus
                // damage is concealed and counted inside.
                let _ = self.decode_at(timestamp, &payload, out);
            }
        }
    }

    /// Decodes one payload placed at `start_frame` (in stream frames).
    fn decode_at(
        &mut self,
        start_frame: u64,
        payload: &[u8],
        out: &mut Vec<AudioBlock>,
    ) -> Result<(), PipelineError> {
        if self.emit_packets {
            let frames_48k = self.packet_48k(payload);
            self.packets.push(OpusPacket::Data {
                data: payload.to_vec(),
                frames_48k,
                end_trim_48k: 0,
            });
        }
        if let (Source::Packets(decoder), false) = (&self.source, self.decode_pcm) {
            // Nothing takes PCM: the duration from the TOC, no decoding.
            let stream_frames = self.to_stream_frames(decoder.nominal_frames(payload));
            self.next_frame = start_frame + stream_frames;
            self.stats.decoded_frames += stream_frames;
            return Ok(());
        }
        let mut samples = self.spare.pop().unwrap_or_default();
        samples.clear();
        let (block_frames, damage) = match &mut self.source {
            Source::Frames(decoder) => (decoder.decode(payload, &mut samples)?, None),
            Source::Packets(decoder) => {
                self.stats.decoded_packets += 1;
                match decoder.decode(payload, &mut samples) {
                    Ok(frames) => (frames, None),
                    Err((frames, damage)) => (frames, Some(damage)),
                }
            }
            Source::Container(_) => (0, None),
        };
        // Opus durations are multiples of 2.5 ms, whole at every Opus rate,
        // so this is exact.
        let stream_frames = self.to_stream_frames(block_frames);
        if let Some(damage) = damage {
            note_damage(
                &mut self.stats,
                &mut self.last_damage,
                stream_frames,
                &damage,
            );
        }
        if block_frames > 0 {
            out.push(AudioBlock {
                start_frame: self.to_block_position(start_frame),
                frames: block_frames,
                channels: self.format.channels,
                samples: BlockSamples::Audio(samples),
            });
        }
        self.next_frame = start_frame + stream_frames;
        self.stats.decoded_frames += stream_frames;
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
                    if container.head_pre_skip.is_some() {
                        continue;
                    }
                    let channels = u16::from(head.channels);
                    if self.decode_pcm {
                        let mut decoder = OpusDecoder::new(self.block_rate_hz, channels)?;
                        decoder.set_gain_q8(head.output_gain_q8)?;
                        container.decoder = Some(decoder);
                    } else if !(1..=2).contains(&channels) {
                        return Err(CodecBuildError::UnsupportedChannels { channels }.into());
                    }
                    container.head_pre_skip = Some(head.pre_skip);
                    container.pre_skip_48k = u64::from(head.pre_skip);
                    // Dropped from the decoder's output: at its rate.
                    container.skip_frames = (u64::from(head.pre_skip)
                        * u64::from(self.block_rate_hz)
                        / 48_000) as usize;
                    self.format.channels = channels;
                    self.format_known = true;
                }
                DemuxEvent::Packet { data, end_granule } => {
                    if container.head_pre_skip.is_none() {
                        return Err(
                            DemuxError::Malformed("audio before the Opus header".into()).into()
                        );
                    }
                    // Frames here are the decoder's (block frames); a
                    // container's media position is a whole number of them.
                    let stream_frames_per_block_frame = self.stream_frames_per_block_frame;
                    let frames_48k = match opus::packet::get_nb_samples(&data, 48_000) {
                        Ok(n) if !data.is_empty() => {
                            self.last_packet_48k = n as u32;
                            n as u32
                        }
                        _ => self.last_packet_48k,
                    };
                    container.packets_48k += u64::from(frames_48k);
                    let end_trim_48k = end_granule.map_or(0, |granule| {
                        container
                            .packets_48k
                            .saturating_sub(granule)
                            .min(u64::from(frames_48k)) as u32
                    });
                    let Some(decoder) = container.decoder.as_mut() else {
                        // Nothing takes PCM: the packet goes on as it came,
                        // media time from its TOC (pre-skip and end trim as
                        // a decoder would apply them).
                        let frames = (u64::from(frames_48k) * u64::from(self.block_rate_hz)
                            / 48_000) as usize;
                        let skip = container.skip_frames.min(frames);
                        container.skip_frames -= skip;
                        let trim = (u64::from(end_trim_48k) * u64::from(self.block_rate_hz)
                            / 48_000) as usize;
                        let keep = frames - skip - trim.min(frames - skip);
                        let stream_frames = keep as u64 * stream_frames_per_block_frame;
                        self.next_frame += stream_frames;
                        self.stats.decoded_frames += stream_frames;
                        self.packets.push(OpusPacket::Data {
                            data,
                            frames_48k,
                            end_trim_48k,
                        });
                        continue;
                    };
                    if self.emit_packets {
                        self.packets.push(OpusPacket::Data {
                            data: data.clone(),
                            frames_48k,
                            end_trim_48k,
                        });
                    }
                    self.scratch.clear();
                    self.stats.decoded_packets += 1;
                    let frames = match decoder.decode(&data, &mut self.scratch) {
                        Ok(frames) => frames,
                        Err((frames, damage)) => {
                            let stream_frames = frames as u64 * stream_frames_per_block_frame;
                            note_damage(
                                &mut self.stats,
                                &mut self.last_damage,
                                stream_frames,
                                &damage,
                            );
                            frames
                        }
                    };
                    let channels = usize::from(self.format.channels);
                    let skip = container.skip_frames.min(frames);
                    container.skip_frames -= skip;
                    let mut keep = frames - skip;
                    let block_position = self.next_frame / stream_frames_per_block_frame;
                    if let Some(granule) = end_granule {
                        // RFC 7845 §4.5: the final granule says where the
                        // stream really ends; the rest of the packet is padding.
                        let total_block_frames = granule.saturating_sub(container.pre_skip_48k)
                            * u64::from(self.block_rate_hz)
                            / 48_000;
                        let allowed = total_block_frames.saturating_sub(block_position) as usize;
                        keep = keep.min(allowed);
                    }
                    if keep > 0 {
                        let samples =
                            self.scratch[skip * channels..(skip + keep) * channels].to_vec();
                        out.push(AudioBlock {
                            start_frame: block_position,
                            frames: keep,
                            channels: self.format.channels,
                            samples: BlockSamples::Audio(samples),
                        });
                        let stream_frames = keep as u64 * stream_frames_per_block_frame;
                        self.next_frame += stream_frames;
                        self.stats.decoded_frames += stream_frames;
                    }
                }
                DemuxEvent::Damaged { reason, .. } => {
                    self.stats.damaged_packets += 1;
                    self.last_damage = Some(reason);
                }
            }
        }
        container.events = events;
        if let Err(DemuxError::Limit(limit)) = &pushed {
            metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => limit.name()).increment(1);
        }
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

/// Appends `frames` of concealed audio at `*at` (if any) and moves `*at` on.
fn push_filled(
    out: &mut Vec<AudioBlock>,
    at: &mut u64,
    channels: u16,
    frames: usize,
    samples: Vec<f32>,
) {
    if frames > 0 {
        out.push(AudioBlock {
            start_frame: *at,
            frames,
            channels,
            samples: BlockSamples::Audio(samples),
        });
        *at += frames as u64;
    }
}

/// Counts a packet that was concealed instead of decoded, for its duration
/// in stream frames.
fn note_damage(
    stats: &mut PipelineStats,
    last_damage: &mut Option<String>,
    stream_frames: u64,
    damage: &CodecError,
) {
    stats.damaged_packets += 1;
    stats.concealed_frames += stream_frames;
    *last_damage = Some(damage.to_string());
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

    fn opus_packets_20ms_48k(packets: usize) -> Vec<Vec<u8>> {
        let mut encoder =
            opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio).unwrap();
        (0..packets)
            .map(|p| {
                let pcm: Vec<f32> = (0..960)
                    .map(|i| ((p * 960 + i) as f32 * 0.05).sin() * 0.3)
                    .collect();
                encoder.encode_vec_float(&pcm, 4000).unwrap()
            })
            .collect()
    }

    #[test]
    fn opus_decoded_at_the_sinks_rate_keeps_the_stream_timeline() {
        let opus_48k = StreamFormat {
            encoding: Encoding::Opus,
            sample_rate: 48_000,
            channels: 1,
            framing: Framing::Seq,
        };
        let mut p = Pipeline::new(opus_48k, 1000).unwrap();
        assert_eq!(p.block_rate(), 48_000);
        // A sink at the stream's own rate keeps 48 kHz.
        p.decode_for_sinks(&[Some(16_000), None]).unwrap();
        assert_eq!(p.block_rate(), 48_000);
        p.decode_for_sinks(&[Some(16_000)]).unwrap();
        assert_eq!(p.block_rate(), 16_000);

        let packets = opus_packets_20ms_48k(3);
        let message = |seq: u32, timestamp: u64| {
            let mut m = SeqHeader { seq, timestamp }.encode().to_vec();
            m.extend_from_slice(&packets[seq as usize]);
            m
        };
        let mut out = Vec::new();
        p.push(&message(0, 0), Instant::now(), &mut out).unwrap();
        // seq 1 lost; seq 2 placed 30 stream frames late, so the gap (990
        // frames at 48 kHz) is not a whole number of 16 kHz frames.
        p.push(&message(2, 1950), Instant::now(), &mut out).unwrap();
        p.finish(&mut out);
        let blocks: Vec<(u64, usize)> = out.iter().map(|b| (b.start_frame, b.frames)).collect();
        // 16 kHz blocks, contiguous: the gap from 960/3 to 1950/3 (rounded
        // down), then the packet, ending where (1950 + 960) / 3 does.
        assert_eq!(blocks, [(0, 320), (320, 330), (650, 320)]);
        let stats = p.stats();
        assert_eq!(stats.decoded_frames, 2 * 960);
        assert_eq!(stats.gap_frames, 990);
        assert_eq!(stats.concealed_frames, 990);
        assert_eq!(p.media_frames(), 1950 + 960);

        // Audio has been decoded: the rate no longer changes.
        p.decode_for_sinks(&[None]).unwrap();
        assert_eq!(p.block_rate(), 16_000);
    }

    /// Blocks as (start, frames, concealed audio or silence).
    fn layout(out: &[AudioBlock]) -> Vec<(u64, usize, bool)> {
        out.iter()
            .map(|b| {
                let audio = matches!(b.samples, BlockSamples::Audio(_));
                (b.start_frame, b.frames, audio)
            })
            .collect()
    }

    #[test]
    fn a_long_opus_gap_is_concealed_for_max_plc_ms_then_silent() {
        let opus_48k = StreamFormat {
            encoding: Encoding::Opus,
            sample_rate: 48_000,
            channels: 1,
            framing: Framing::Seq,
        };
        let mut p = Pipeline::new(opus_48k, 10_000).unwrap();
        let packets = opus_packets_20ms_48k(2);
        let message = |seq: u32, timestamp: u64| {
            let mut m = SeqHeader { seq, timestamp }.encode().to_vec();
            m.extend_from_slice(&packets[seq as usize]);
            m
        };
        let mut out = Vec::new();
        p.push(&message(0, 0), Instant::now(), &mut out).unwrap();
        // The next seq, 10 s later: the 50-byte message.
        let gap = 480_000;
        p.push(&message(1, 960 + gap), Instant::now(), &mut out)
            .unwrap();
        let plc = 48 * crate::codec::opus::MAX_PLC_MS as u64;
        assert_eq!(
            layout(&out),
            [
                (0, 960, true),
                // 200 ms of PLC, silence, the last 20 ms from FEC.
                (960, plc as usize, true),
                (960 + plc, (gap - plc - 960) as usize, false),
                (gap, 960, true),
                (960 + gap, 960, true),
            ]
        );
        // Only the concealed stretches hold samples: the work and memory
        // are those of 220 ms, not of 10 s.
        let made: usize = out[1..4]
            .iter()
            .map(|b| match &b.samples {
                BlockSamples::Audio(samples) => samples.len(),
                BlockSamples::Silence => 0,
            })
            .sum();
        assert_eq!(made as u64, plc + 960);
        let stats = p.stats();
        assert_eq!(stats.gap_frames, gap);
        assert_eq!(stats.concealed_frames, gap, "the whole gap was filled");
        assert_eq!(p.media_frames(), gap + 2 * 960);
    }

    #[test]
    fn an_opus_gap_up_to_max_plc_ms_and_a_packet_is_concealed_whole() {
        let opus_16k = StreamFormat {
            encoding: Encoding::Opus,
            sample_rate: 16_000,
            channels: 1,
            framing: Framing::Seq,
        };
        let packets = opus_packets_20ms_48k(2);
        for (gap, blocks) in [(3_520u64, 3), (3_560, 5)] {
            let mut p = Pipeline::new(opus_16k, 10_000).unwrap();
            let mut out = Vec::new();
            let mut first = SeqHeader {
                seq: 0,
                timestamp: 0,
            }
            .encode()
            .to_vec();
            first.extend_from_slice(&packets[0]);
            let mut second = SeqHeader {
                seq: 1,
                timestamp: 320 + gap,
            }
            .encode()
            .to_vec();
            second.extend_from_slice(&packets[1]);
            p.push(&first, Instant::now(), &mut out).unwrap();
            p.push(&second, Instant::now(), &mut out).unwrap();
            // 220 ms (200 of PLC, 20 of FEC) is one concealed block; 2.5 ms
            // more is PLC, silence, FEC.
            assert_eq!(out.len(), blocks, "gap {gap}: {:?}", layout(&out));
            let mut at = 0;
            for block in &out {
                assert_eq!(block.start_frame, at, "contiguous");
                at = block.end_frame();
            }
            assert_eq!(at, 320 + gap + 320);
        }
    }

    /// Issue 16: a session whose sinks all take Opus packets never runs
    /// libopus; the packets come out in media order with the hole marked,
    /// durations from their TOCs, and no PCM block is made.
    #[test]
    fn packets_only_never_run_the_decoder() {
        let opus_48k = StreamFormat {
            encoding: Encoding::Opus,
            sample_rate: 48_000,
            channels: 1,
            framing: Framing::Seq,
        };
        let packets = opus_packets_20ms_48k(4);
        let message = |seq: u32| {
            let mut m = SeqHeader {
                seq,
                timestamp: u64::from(seq) * 960,
            }
            .encode()
            .to_vec();
            m.extend_from_slice(&packets[seq as usize]);
            m
        };
        for (pcm, decoded) in [(false, 0), (true, 4)] {
            let mut p = Pipeline::new(opus_48k, 1000).unwrap();
            p.set_outputs(pcm, true);
            let mut out = Vec::new();
            for seq in [0, 1, 3] {
                p.push(&message(seq), Instant::now(), &mut out).unwrap();
            }
            p.finish(&mut out);
            let mut taken = Vec::new();
            p.take_packets(&mut taken);
            let data = |seq: usize| OpusPacket::Data {
                data: packets[seq].clone(),
                frames_48k: 960,
                end_trim_48k: 0,
            };
            assert_eq!(
                taken,
                [
                    data(0),
                    data(1),
                    OpusPacket::Lost { frames_48k: 960 },
                    data(3)
                ]
            );
            let stats = p.stats();
            assert_eq!(stats.decoded_packets, decoded, "pcm {pcm}");
            assert_eq!(p.media_frames(), 4 * 960);
            assert_eq!(stats.decoded_frames, 3 * 960);
            if pcm {
                assert_eq!(out.iter().map(|b| b.frames).sum::<usize>(), 4 * 960);
            } else {
                assert!(out.is_empty(), "no PCM without a sink for it");
            }
        }
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
