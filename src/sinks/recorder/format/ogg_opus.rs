//! Ogg Opus (RFC 7845): the client's own Opus packets copied into Ogg pages
//! (passthrough), or PCM encoded with libopus in 20 ms frames.
//!
//! Granule positions count 48 kHz samples decoded from the start, the
//! pre-skip included. Pages are appended and never rewritten: a page is
//! completed after about a second of audio, when full, and at every
//! checkpoint, so a killed process leaves a file that plays up to its last
//! checkpoint.
//!
//! Lost packets keep their media time: each hole becomes TOC-only packets
//! (one byte, a code-0 packet with a zero-length frame), which libopus
//! decodes as a lost frame of the TOC's duration, concealing it
//! ([`gap_packets`]).

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::super::wav::WavFile;
use super::ogg::OggStream;
use crate::pipeline::OpusPacket;

/// 48 kHz samples after which a page is completed even without a checkpoint.
const PAGE_SAMPLES_48K: u64 = 48_000;
/// PCM is encoded in 20 ms frames.
const ENCODE_FRAME_MS: u32 = 20;
/// Room for one encoded 20 ms frame (libopus's recommended maximum).
const MAX_PACKET_BYTES: usize = 4000;
/// The Opus rates libopus encodes at.
pub const ENCODER_RATES_HZ: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];
/// 2.5 ms at 48 kHz: the shortest Opus frame, the grain of a hole's fill.
const GRAIN_48K: u64 = 120;
/// The TOC of the fill for a hole before any packet: CELT fullband, 20 ms.
const DEFAULT_TOC: u8 = 31 << 3;

fn opus_error(action: &str, error: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("libopus: cannot {action}: {error}"))
}

/// Duration in 48 kHz samples of one frame of TOC configuration `config`
/// (RFC 6716 §3.1).
fn frame_samples_48k(config: u8) -> u64 {
    match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    }
}

/// The TOC-only packets that conceal a hole of `gap_48k` samples after a
/// packet whose TOC was `neighbour_toc`: as many packets of the neighbour's
/// configuration (and channel count) as fit, then CELT fullband frames of
/// 20, 10, 5 and 2.5 ms for the rest. Each is `(toc, samples)`. A hole that
/// is not a multiple of 2.5 ms (timestamps off Opus's grid) is rounded to
/// the nearest multiple: the file's length then differs from the stream's
/// by less than 1.25 ms per such hole.
pub fn gap_packets(neighbour_toc: u8, gap_48k: u64) -> impl Iterator<Item = (u8, u64)> {
    let stereo = neighbour_toc & 0x04;
    let config = neighbour_toc >> 3;
    let own = frame_samples_48k(config);
    let rounded = (gap_48k + GRAIN_48K / 2) / GRAIN_48K * GRAIN_48K;
    let whole = rounded / own;
    let mut rest = rounded % own;
    let same = std::iter::repeat_n(((config << 3) | stereo, own), whole as usize);
    // CELT fullband is configs 28..=31: 2.5, 5, 10 and 20 ms.
    let tail = [(31u8, 960u64), (30, 480), (29, 240), (28, 120)]
        .into_iter()
        .flat_map(move |(config, samples)| {
            let n = rest / samples;
            rest %= samples;
            std::iter::repeat_n(((config << 3) | stereo, samples), n as usize)
        });
    same.chain(tail)
}

/// `OpusHead` (RFC 7845 §5.1), channel mapping family 0.
pub fn opus_head(channels: u8, pre_skip: u16, input_rate_hz: u32) -> Vec<u8> {
    let mut head = Vec::with_capacity(19);
    head.extend_from_slice(b"OpusHead");
    head.push(1);
    head.push(channels);
    head.extend_from_slice(&pre_skip.to_le_bytes());
    head.extend_from_slice(&input_rate_hz.to_le_bytes());
    head.extend_from_slice(&0i16.to_le_bytes());
    head.push(0);
    head
}

/// `OpusTags` with our vendor string and no comments.
fn opus_tags() -> Vec<u8> {
    let vendor = concat!("cochlea ", env!("CARGO_PKG_VERSION"));
    let mut tags = b"OpusTags".to_vec();
    tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
    tags.extend_from_slice(vendor.as_bytes());
    tags.extend_from_slice(&0u32.to_le_bytes());
    tags
}

/// PCM to 20 ms Opus packets.
struct PcmEncoder {
    encoder: opus::Encoder,
    rate_hz: u32,
    channels: usize,
    /// Samples of the frame being gathered.
    frame: Vec<f32>,
    packet: Vec<u8>,
    /// Sample frames handed in, and encoded (padding included).
    input_frames: u64,
    encoded_frames: u64,
    /// The encoder's delay, in its own sample frames.
    lookahead_frames: u64,
}

impl PcmEncoder {
    fn frame_len(&self) -> usize {
        (self.rate_hz / (1000 / ENCODE_FRAME_MS)) as usize * self.channels
    }

    fn to_48k(&self, frames: u64) -> u64 {
        frames * 48_000 / u64::from(self.rate_hz)
    }
}

pub struct OggOpusWriter<F: WavFile = File> {
    file: Arc<F>,
    ogg: OggStream,
    /// Completed pages not yet in the file.
    pages: Vec<u8>,
    /// Bytes in the file: every one of them final.
    bytes: u64,
    /// 48 kHz samples of all packets so far (the next packet's start).
    granule: u64,
    /// Samples in the page being filled.
    page_samples: u64,
    last_toc: Option<u8>,
    encoder: Option<PcmEncoder>,
}

impl<F: WavFile> OggOpusWriter<F> {
    /// A file for the client's own Opus packets: the header pages say
    /// `channels`, `pre_skip` (the input's) and the input's rate.
    pub fn passthrough(
        file: F,
        channels: u16,
        pre_skip: u16,
        input_rate_hz: u32,
        serial: u32,
    ) -> io::Result<Self> {
        let mut writer = Self::new(file, serial);
        writer.start(channels, pre_skip, input_rate_hz)?;
        Ok(writer)
    }

    /// A file for PCM at `rate_hz` (one of [`ENCODER_RATES_HZ`]), encoded
    /// at `bitrate_bps`.
    pub fn encoding(
        file: F,
        channels: u16,
        rate_hz: u32,
        bitrate_bps: u32,
        serial: u32,
    ) -> io::Result<Self> {
        let layout = match channels {
            1 => opus::Channels::Mono,
            2 => opus::Channels::Stereo,
            n => {
                return Err(io::Error::other(format!(
                    "Ogg Opus recordings hold 1 or 2 channels, not {n}"
                )))
            }
        };
        let mut encoder = opus::Encoder::new(rate_hz, layout, opus::Application::Audio)
            .map_err(|e| opus_error("create the encoder", e))?;
        encoder
            .set_bitrate(opus::Bitrate::Bits(bitrate_bps as i32))
            .map_err(|e| opus_error("set the bitrate", e))?;
        let lookahead = encoder
            .get_lookahead()
            .map_err(|e| opus_error("read the lookahead", e))?;
        let pcm = PcmEncoder {
            encoder,
            rate_hz,
            channels: usize::from(channels),
            frame: Vec::new(),
            packet: vec![0; MAX_PACKET_BYTES],
            input_frames: 0,
            encoded_frames: 0,
            lookahead_frames: u64::try_from(lookahead).unwrap_or(0),
        };
        let pre_skip = u16::try_from(pcm.to_48k(pcm.lookahead_frames)).unwrap_or(u16::MAX);
        let mut writer = Self::new(file, serial);
        writer.encoder = Some(pcm);
        writer.start(channels, pre_skip, rate_hz)?;
        Ok(writer)
    }

    fn new(file: F, serial: u32) -> Self {
        Self {
            file: Arc::new(file),
            ogg: OggStream::new(serial),
            pages: Vec::new(),
            bytes: 0,
            granule: 0,
            page_samples: 0,
            last_toc: None,
            encoder: None,
        }
    }

    fn start(&mut self, channels: u16, pre_skip: u16, input_rate_hz: u32) -> io::Result<()> {
        let channels = u8::try_from(channels).unwrap_or(u8::MAX);
        self.ogg.header_page(
            &opus_head(channels, pre_skip, input_rate_hz),
            &mut self.pages,
        );
        self.ogg.header_page(&opus_tags(), &mut self.pages);
        self.write_pages()
    }

    pub fn file(&self) -> &F {
        &self.file
    }

    /// Bytes in the file; none is ever rewritten.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// 48 kHz samples of media the packets so far hold (pre-skip included).
    pub fn granule(&self) -> u64 {
        self.granule
    }

    fn write_pages(&mut self) -> io::Result<()> {
        if self.pages.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(self.bytes, &self.pages)?;
        self.bytes += self.pages.len() as u64;
        self.pages.clear();
        Ok(())
    }

    /// Adds one packet ending at `granule`; completes the page after about
    /// a second.
    fn add(&mut self, packet: &[u8], samples_48k: u64, granule: u64) -> io::Result<()> {
        self.ogg.add_packet(packet, granule, &mut self.pages);
        self.page_samples += samples_48k;
        if self.page_samples >= PAGE_SAMPLES_48K {
            self.ogg.flush(false, &mut self.pages);
            self.page_samples = 0;
        }
        self.write_pages()
    }

    /// Copies the client's packets, concealing holes.
    pub fn write_packets(&mut self, packets: &[OpusPacket]) -> io::Result<()> {
        for packet in packets {
            match packet {
                OpusPacket::Data {
                    data,
                    frames_48k,
                    end_trim_48k,
                } => {
                    if let Some(&toc) = data.first() {
                        self.last_toc = Some(toc);
                    }
                    let samples = u64::from(*frames_48k);
                    self.granule += samples.saturating_sub(u64::from(*end_trim_48k));
                    self.add(data, samples, self.granule)?;
                }
                OpusPacket::Lost { frames_48k } => {
                    let toc = self.last_toc.unwrap_or(DEFAULT_TOC);
                    for (toc, samples) in gap_packets(toc, *frames_48k) {
                        self.granule += samples;
                        self.add(&[toc], samples, self.granule)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Encodes interleaved PCM in [-1, 1) (an encoding writer only).
    pub fn write(&mut self, samples: &[f32]) -> io::Result<()> {
        let Some(mut pcm) = self.encoder.take() else {
            return Err(io::Error::other(
                "PCM given to an Opus passthrough recording",
            ));
        };
        let result = self.encode(&mut pcm, samples);
        self.encoder = Some(pcm);
        result
    }

    fn encode(&mut self, pcm: &mut PcmEncoder, mut samples: &[f32]) -> io::Result<()> {
        let frame_len = pcm.frame_len();
        pcm.input_frames += (samples.len() / pcm.channels) as u64;
        while !samples.is_empty() {
            let take = (frame_len - pcm.frame.len()).min(samples.len());
            pcm.frame.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if pcm.frame.len() == frame_len {
                self.encode_frame(pcm, None)?;
            }
        }
        Ok(())
    }

    /// Encodes the gathered frame; `end_granule` caps its granule (the
    /// last packets, whose padding the end granule trims).
    fn encode_frame(&mut self, pcm: &mut PcmEncoder, end_granule: Option<u64>) -> io::Result<()> {
        let n = pcm
            .encoder
            .encode_float(&pcm.frame, &mut pcm.packet)
            .map_err(|e| opus_error("encode", e))?;
        pcm.frame.clear();
        let frames = (pcm.frame_len() / pcm.channels) as u64;
        pcm.encoded_frames += frames;
        let samples = pcm.to_48k(frames);
        self.granule += samples;
        let granule = end_granule.map_or(self.granule, |end| self.granule.min(end));
        let packet = std::mem::take(&mut pcm.packet);
        let added = self.add(&packet[..n], samples, granule);
        pcm.packet = packet;
        added
    }

    /// Appends `samples` zero samples (encoding) or a hole of that length.
    pub fn write_silence(&mut self, samples: usize) -> io::Result<()> {
        const ZEROS: [f32; 960] = [0.0; 960];
        let mut left = samples;
        while left > 0 {
            let n = left.min(ZEROS.len());
            self.write(&ZEROS[..n])?;
            left -= n;
        }
        Ok(())
    }

    /// Completes the page being filled, so everything so far is in the file.
    /// (An encoding writer's partial 20 ms frame waits for more audio.)
    pub fn checkpoint(&mut self) -> io::Result<()> {
        self.ogg.flush(false, &mut self.pages);
        self.page_samples = 0;
        self.write_pages()
    }

    /// The last page, marked end of stream. An encoding writer first
    /// encodes its last frame, padded, and enough more to bring the
    /// encoder's delayed output out; the end granule trims the padding so
    /// the decoded length is exactly the input's.
    pub fn finalize(mut self) -> io::Result<Arc<F>> {
        if let Some(mut pcm) = self.encoder.take() {
            let pre_skip = pcm.to_48k(pcm.lookahead_frames);
            let end = pre_skip + pcm.to_48k(pcm.input_frames);
            let needed = pcm.input_frames + pcm.lookahead_frames;
            while pcm.encoded_frames < needed || !pcm.frame.is_empty() {
                pcm.frame.resize(pcm.frame_len(), 0.0);
                self.encode_frame(&mut pcm, Some(end))?;
            }
        }
        self.ogg.flush(true, &mut self.pages);
        self.write_pages()?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_filled_with_the_neighbours_frames_then_shorter_ones() {
        // SILK wideband 20 ms, stereo (config 9).
        let toc = (9 << 3) | 0x04;
        let packets: Vec<(u8, u64)> = gap_packets(toc, 3 * 960 + 480 + 120).collect();
        assert_eq!(
            packets,
            [
                (toc, 960),
                (toc, 960),
                (toc, 960),
                ((30 << 3) | 0x04, 480),
                ((28 << 3) | 0x04, 120)
            ]
        );
        // 60 ms SILK neighbours: 100 ms is one 60 ms, then 20 + 20.
        let toc = 3 << 3;
        let samples: Vec<u64> = gap_packets(toc, 4800).map(|(_, s)| s).collect();
        assert_eq!(samples, [2880, 960, 960]);
        // Off the 2.5 ms grid: rounded to the nearest multiple.
        assert_eq!(gap_packets(toc, 59).count(), 0);
        assert_eq!(gap_packets(toc, 60).map(|(_, s)| s).sum::<u64>(), 120);
        for (toc, _) in gap_packets(DEFAULT_TOC, 5000) {
            assert_eq!(toc & 3, 0, "code 0: one frame, of zero length");
        }
    }

    #[test]
    fn a_toc_only_packet_is_decoded_by_libopus_as_a_lost_frame() {
        let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
        let mut out = vec![0f32; 5760];
        for (toc, samples) in gap_packets(DEFAULT_TOC, 960 + 240) {
            let n = decoder.decode_float(&[toc], &mut out, false).unwrap();
            assert_eq!(n as u64, samples);
        }
    }

    #[test]
    fn opus_head_is_laid_out_as_rfc_7845_says() {
        let head = opus_head(2, 312, 16_000);
        let parsed = crate::codec::container::OpusHead::parse(&head).unwrap();
        assert_eq!(
            (parsed.channels, parsed.pre_skip, parsed.input_sample_rate),
            (2, 312, 16_000)
        );
        assert_eq!(parsed.output_gain_q8, 0);
    }
}
