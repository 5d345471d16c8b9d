//! Streaming FLAC: `fLaC`, a STREAMINFO whose total length is 0 ("unknown",
//! which every decoder accepts), then frames appended as they complete.
//! Frames are encoded by the `flacenc` crate; the container is written here.
//!
//! The stream is variable-blocksize: frames are [`BLOCK_FRAMES`] long, but a
//! checkpoint (before every `ack`) encodes what is pending as a shorter
//! frame, so acknowledged audio is on disk, whole, in a file that decodes
//! (only frames under [`MIN_BLOCK_FRAMES`] wait for more audio, as FLAC
//! allows such short blocks only at the end). At the end, STREAMINFO is
//! rewritten in place with the total length, the block and frame sizes and
//! the MD5 of the samples: its 42 bytes at the start are the only bytes ever
//! written twice.

use std::fs::File;
use std::io;

use flacenc::bitsink::ByteSink;
use flacenc::component::{BitRepr, FrameOffset, StreamInfo};
use flacenc::error::{Verified, Verify};
use flacenc::source::{Context, Fill, FrameBuf};

use super::super::wav::{samples_to_i16, WavFile};

/// Sample frames per FLAC frame (the reference encoder's default).
pub const BLOCK_FRAMES: usize = 4096;
/// The shortest frame FLAC allows anywhere but at the end.
pub const MIN_BLOCK_FRAMES: usize = 16;
/// `fLaC`, the metadata block header, and STREAMINFO's 34 bytes.
pub const HEADER_BYTES: u64 = 42;
/// FLAC's bits per sample here: the recorder keeps 16-bit samples (exact
/// for s16 and G.711 input; `pcm_f32le` is rounded to 16 bits).
const BITS_PER_SAMPLE: u8 = 16;

fn encode_error(error: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("FLAC encoder: {error}"))
}

/// The STREAMINFO fields this writer keeps up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfoFields {
    pub min_block: u16,
    pub max_block: u16,
    pub min_frame_bytes: u32,
    pub max_frame_bytes: u32,
    pub sample_rate: u32,
    pub channels: u8,
    pub total_frames: u64,
    pub md5: [u8; 16],
}

impl StreamInfoFields {
    /// `fLaC` and the one (last) metadata block, STREAMINFO.
    pub fn header(&self) -> [u8; HEADER_BYTES as usize] {
        let mut h = [0u8; HEADER_BYTES as usize];
        h[..4].copy_from_slice(b"fLaC");
        // Last metadata block, type 0 (STREAMINFO), 34 bytes long.
        h[4..8].copy_from_slice(&[0x80, 0, 0, 34]);
        let s = &mut h[8..];
        s[0..2].copy_from_slice(&self.min_block.to_be_bytes());
        s[2..4].copy_from_slice(&self.max_block.to_be_bytes());
        s[4..7].copy_from_slice(&self.min_frame_bytes.to_be_bytes()[1..]);
        s[7..10].copy_from_slice(&self.max_frame_bytes.to_be_bytes()[1..]);
        // 20 bits of rate, 3 of channels - 1, 5 of bits - 1, 36 of total.
        let packed: u64 = (u64::from(self.sample_rate & 0xF_FFFF) << 44)
            | (u64::from(self.channels.saturating_sub(1) & 7) << 41)
            | (u64::from((BITS_PER_SAMPLE - 1) & 31) << 36)
            | (self.total_frames & 0xF_FFFF_FFFF);
        s[10..18].copy_from_slice(&packed.to_be_bytes());
        s[18..34].copy_from_slice(&self.md5);
        h
    }
}

pub struct FlacWriter<F: WavFile = File> {
    file: std::sync::Arc<F>,
    info: StreamInfoFields,
    stream_info: StreamInfo,
    config: Verified<flacenc::config::Encoder>,
    framebuf: FrameBuf,
    /// MD5 of every sample encoded.
    context: Context,
    /// Interleaved samples not yet in a frame.
    pending: Vec<i32>,
    converted: Vec<i16>,
    sink: ByteSink,
    channels: usize,
    /// Frames encoded so far; where the next frame starts.
    frames_encoded: u64,
    /// Size of the file: where the next frame goes.
    bytes: u64,
    /// Block sizes seen, for STREAMINFO at the end.
    min_block: Option<usize>,
    max_block: usize,
}

impl<F: WavFile> FlacWriter<F> {
    /// Writes the header (total length unknown) to `file` at offset 0.
    pub fn create(file: F, channels: u16, sample_rate: u32) -> io::Result<Self> {
        let channel_count = usize::from(channels);
        let stream_info =
            StreamInfo::new(sample_rate as usize, channel_count, 16).map_err(encode_error)?;
        let config = flacenc::config::Encoder::default()
            .into_verified()
            .map_err(|(_, e)| encode_error(e))?;
        let framebuf = FrameBuf::with_size(channel_count, BLOCK_FRAMES).map_err(encode_error)?;
        let info = StreamInfoFields {
            // What the stream may hold until the end says what it did.
            min_block: MIN_BLOCK_FRAMES as u16,
            max_block: BLOCK_FRAMES as u16,
            min_frame_bytes: 0,
            max_frame_bytes: 0,
            sample_rate,
            channels: channels as u8,
            total_frames: 0,
            md5: [0; 16],
        };
        let file = std::sync::Arc::new(file);
        file.write_all_at(0, &info.header())?;
        Ok(Self {
            file,
            info,
            stream_info,
            config,
            framebuf,
            context: Context::new(16, channel_count),
            pending: Vec::new(),
            converted: Vec::new(),
            sink: ByteSink::new(),
            channels: channel_count,
            frames_encoded: 0,
            bytes: HEADER_BYTES,
            min_block: None,
            max_block: 0,
        })
    }

    pub fn file(&self) -> &F {
        &self.file
    }

    /// Bytes in the file, all of them final but the header.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends interleaved samples in [-1, 1); whole frames go to the file.
    pub fn write(&mut self, samples: &[f32]) -> io::Result<()> {
        samples_to_i16(samples, &mut self.converted);
        self.pending
            .extend(self.converted.iter().map(|&s| i32::from(s)));
        self.encode_full_blocks()
    }

    /// Appends `samples` zero samples.
    pub fn write_silence(&mut self, samples: usize) -> io::Result<()> {
        let mut left = samples;
        while left > 0 {
            let n = left.min(BLOCK_FRAMES * self.channels);
            self.pending.resize(self.pending.len() + n, 0);
            self.encode_full_blocks()?;
            left -= n;
        }
        Ok(())
    }

    fn encode_full_blocks(&mut self) -> io::Result<()> {
        let block = BLOCK_FRAMES * self.channels;
        let mut start = 0;
        while self.pending.len() - start >= block {
            self.encode_frame(start, BLOCK_FRAMES)?;
            start += block;
        }
        self.pending.drain(..start);
        Ok(())
    }

    /// Encodes `frames` sample frames of `pending` from `start` as one FLAC
    /// frame and appends it to the file.
    fn encode_frame(&mut self, start: usize, frames: usize) -> io::Result<()> {
        let samples = &self.pending[start..start + frames * self.channels];
        if self.framebuf.size() != frames {
            self.framebuf.resize(frames);
        }
        self.framebuf
            .fill_interleaved(samples)
            .map_err(encode_error)?;
        self.context
            .fill_interleaved(samples)
            .map_err(encode_error)?;
        let frame =
            flacenc::encode_fixed_size_frame(&self.config, &self.framebuf, 0, &self.stream_info)
                .map_err(encode_error)?;
        // Variable blocksize: the header says where the frame starts.
        let (mut header, subframes) = frame.into_parts();
        header.set_frame_offset(FrameOffset::StartSample(self.frames_encoded));
        let frame =
            flacenc::component::Frame::new(header, subframes.into_iter()).map_err(encode_error)?;
        self.sink.clear();
        frame.write(&mut self.sink).map_err(encode_error)?;
        let bytes = self.sink.as_slice();
        self.file.write_all_at(self.bytes, bytes)?;
        self.bytes += bytes.len() as u64;
        let size = bytes.len() as u32;
        self.info.min_frame_bytes = match self.info.min_frame_bytes {
            0 => size,
            min => min.min(size),
        };
        self.info.max_frame_bytes = self.info.max_frame_bytes.max(size);
        // `finalize` leaves the last frame out of min_block.
        self.frames_encoded += frames as u64;
        self.max_block = self.max_block.max(frames);
        self.min_block = Some(self.min_block.map_or(frames, |m| m.min(frames)));
        Ok(())
    }

    /// Puts what is pending into the file as a (short) frame, if FLAC
    /// allows a frame that short outside the end: see the module doc.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        let frames = self.pending.len() / self.channels;
        if frames >= MIN_BLOCK_FRAMES {
            self.encode_frame(0, frames)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Encodes the rest, and rewrites STREAMINFO with the totals.
    pub fn finalize(mut self) -> io::Result<std::sync::Arc<F>> {
        let frames = self.pending.len() / self.channels;
        // The last frame may be shorter than any other: it must not make
        // min_block (of the frames before it) smaller.
        let before_last = self.min_block;
        if frames > 0 {
            self.encode_frame(0, frames)?;
            self.pending.clear();
            self.min_block = before_last.or(Some(frames));
        }
        let min_block = self.min_block.unwrap_or(BLOCK_FRAMES).max(MIN_BLOCK_FRAMES);
        self.info.min_block = min_block as u16;
        self.info.max_block = self.max_block.max(min_block) as u16;
        self.info.total_frames = self.frames_encoded;
        self.info.md5 = self.context.md5_digest();
        self.file.write_all_at(0, &self.info.header())?;
        Ok(self.file)
    }
}

/// Crash recovery: the length of `bytes` (a whole FLAC file of ours) up to
/// the end of its last whole frame, and the sample frames in those frames.
/// A frame is whole when the next frame's sync code follows it, or it ends
/// the file and its CRC-16 checks; a torn last frame is cut off.
pub fn whole_frames(bytes: &[u8]) -> Option<(usize, u64)> {
    if bytes.len() < HEADER_BYTES as usize || &bytes[..4] != b"fLaC" {
        return None;
    }
    // Frame starts: a sync code (0xFFF8 or 0xFFF9) whose header CRC-8 checks.
    let mut starts = Vec::new();
    let mut at = HEADER_BYTES as usize;
    while at + 1 < bytes.len() {
        if bytes[at] == 0xFF
            && (bytes[at + 1] & 0xFE) == 0xF8
            && frame_header(&bytes[at..]).is_some()
        {
            starts.push(at);
        }
        at += 1;
    }
    let mut end = HEADER_BYTES as usize;
    let mut total = 0u64;
    for (i, &start) in starts.iter().enumerate() {
        let Some((first_sample, block)) = frame_header(&bytes[start..]) else {
            continue;
        };
        // A frame is only counted where it continues the stream: a sync
        // pattern inside compressed data would not start at `total`.
        if start != end || first_sample != total {
            continue;
        }
        let next = starts.get(i + 1..).and_then(|rest| {
            rest.iter().copied().find(|&s| {
                frame_header(&bytes[s..]).is_some_and(|(first, _)| first == total + block)
            })
        });
        let frame_end = match next {
            Some(next) => next,
            None => {
                // The last frame: whole if its CRC-16 over everything checks.
                if crc16(&bytes[start..bytes.len() - 2])
                    == u16::from_be_bytes([bytes[bytes.len() - 2], bytes[bytes.len() - 1]])
                {
                    bytes.len()
                } else {
                    break;
                }
            }
        };
        if crc16(&bytes[start..frame_end - 2])
            != u16::from_be_bytes([bytes[frame_end - 2], bytes[frame_end - 1]])
        {
            break;
        }
        end = frame_end;
        total += block;
    }
    Some((end, total))
}

/// A variable-blocksize frame header of ours at the start of `bytes`: the
/// first sample's number and the block size, if its CRC-8 checks.
fn frame_header(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < 6 || bytes[0] != 0xFF || bytes[1] != 0xF9 {
        return None;
    }
    let block_code = bytes[2] >> 4;
    let rate_code = bytes[2] & 0x0F;
    // UTF-8-like coded sample number.
    let lead = bytes[4];
    let (mut value, extra) = match lead.leading_ones() {
        0 => (u64::from(lead), 0),
        n @ 2..=7 => (u64::from(lead & (0xFF >> (n + 1))), n as usize - 1),
        _ => return None,
    };
    let mut at = 5;
    for _ in 0..extra {
        let b = *bytes.get(at)?;
        if b & 0xC0 != 0x80 {
            return None;
        }
        value = (value << 6) | u64::from(b & 0x3F);
        at += 1;
    }
    let block = match block_code {
        1 => 192,
        2..=5 => 576 << (block_code - 2),
        6 => {
            let v = u64::from(*bytes.get(at)?) + 1;
            at += 1;
            v
        }
        7 => {
            let v = u64::from(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?])) + 1;
            at += 2;
            v
        }
        8..=15 => 256 << (block_code - 8),
        _ => return None,
    };
    at += match rate_code {
        12 => 1,
        13 | 14 => 2,
        15 => return None,
        _ => 0,
    };
    let crc = *bytes.get(at)?;
    (crc8(&bytes[..at]) == crc).then_some((value, block))
}

fn crc8(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |mut crc, &b| {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
        crc
    })
}

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |mut crc, &b| {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x8005
            } else {
                crc << 1
            };
        }
        crc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(frames: usize, channels: usize) -> Vec<f32> {
        (0..frames * channels)
            .map(|i| ((i as f32 * 0.01).sin() * 0.5 * 32768.0).round() / 32768.0)
            .collect()
    }

    #[test]
    fn frames_are_appended_and_a_torn_frame_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.flac");
        let file = File::create(&path).unwrap();
        let mut w = FlacWriter::create(file, 2, 16_000).unwrap();
        w.write(&tone(5000, 2)).unwrap();
        // One whole block out; 904 frames pending until the checkpoint.
        let after_block = std::fs::metadata(&path).unwrap().len();
        assert_eq!(after_block, w.bytes());
        w.checkpoint().unwrap();
        assert!(w.bytes() > after_block);
        w.write(&tone(10, 2)).unwrap();
        w.checkpoint().unwrap(); // 10 frames: too short, they wait
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(whole_frames(&bytes), Some((bytes.len(), 5000)));
        assert_eq!(
            whole_frames(&bytes[..bytes.len() - 3]),
            Some((after_block as usize, 4096))
        );
        w.finalize().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(whole_frames(&bytes), Some((bytes.len(), 5010)));
        // STREAMINFO now says 5010 frames.
        let packed = u64::from_be_bytes(bytes[18..26].try_into().unwrap());
        assert_eq!(packed & 0xF_FFFF_FFFF, 5010);
    }

    #[test]
    fn crcs_match_the_flac_reference_check_values() {
        assert_eq!(crc8(b"123456789"), 0xF4);
        assert_eq!(crc16(b"123456789"), 0xFEE8);
    }
}
