//! The recorder's WAV writing: hound's `WavWriter`, fed a whole block at a
//! time. A block is converted to 16-bit in one loop that vectorizes (no libm
//! `round` per sample) and handed to hound's `get_i16_writer`, which copies
//! it into its buffer without a per-sample error check. That is within 1.1x
//! of a hand-written WAV writer and 3x faster than hound's per-sample
//! `write_sample` (`cargo bench --bench hot_path -- wav_writer`,
//! BENCHMARKS.md).
//!
//! hound writes through [`FileBuffer`]: the recording's one descriptor,
//! shared with the recorder (for `sync_data`), and a write buffer that is
//! only allocated once audio arrives, so an idle session holds none.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::WavFormat;

/// Pending bytes before they are written to the file.
const BUFFER_BYTES: usize = 16 * 1024;
/// Zero samples written per step when writing silence.
const SILENCE_CHUNK_SAMPLES: usize = 4096;

/// A buffered writer on a shared file handle, for hound: `BufWriter` owns
/// its file and allocates its buffer up front.
struct FileBuffer {
    file: Arc<File>,
    buffer: Vec<u8>,
}

impl FileBuffer {
    fn drain(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            (&*self.file).write_all(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(())
    }
}

impl Write for FileBuffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buffer.len() + data.len() > BUFFER_BYTES {
            self.drain()?;
        }
        if data.len() >= BUFFER_BYTES {
            return (&*self.file).write(data);
        }
        if self.buffer.capacity() == 0 {
            self.buffer.reserve_exact(BUFFER_BYTES);
        }
        self.buffer.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()
    }
}

impl Seek for FileBuffer {
    /// Writes out what is buffered first (hound seeks to patch the header).
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.drain()?;
        (&*self.file).seek(pos)
    }
}

impl Drop for FileBuffer {
    /// hound's own drop patches the header into the buffer; this writes it.
    fn drop(&mut self) {
        let _ = self.drain();
    }
}

pub(super) struct WavWriter {
    wav: hound::WavWriter<FileBuffer>,
    file: Arc<File>,
    format: WavFormat,
    /// The block as 16-bit samples (s16 files), reused across blocks.
    converted: Vec<i16>,
}

impl WavWriter {
    /// Writes the header to `file` (at offset 0), sizes zero until the first
    /// [`WavWriter::checkpoint`].
    pub fn create(
        file: File,
        channels: u16,
        sample_rate: u32,
        format: WavFormat,
    ) -> Result<Self, hound::Error> {
        let spec = hound::WavSpec {
            channels,
            sample_rate,
            bits_per_sample: (format.bytes_per_sample() * 8) as u16,
            sample_format: match format {
                WavFormat::S16 => hound::SampleFormat::Int,
                WavFormat::F32 => hound::SampleFormat::Float,
            },
        };
        let file = Arc::new(file);
        let buffer = FileBuffer {
            file: file.clone(),
            buffer: Vec::new(),
        };
        Ok(Self {
            wav: hound::WavWriter::new(buffer, spec)?,
            file,
            format,
            converted: Vec::new(),
        })
    }

    /// The recording's file (the same descriptor hound writes through).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends interleaved samples in [-1, 1) in the file's sample format.
    pub fn write(&mut self, samples: &[f32]) -> Result<(), hound::Error> {
        match self.format {
            WavFormat::S16 => {
                // Exact for samples that came from 16-bit or G.711 input.
                samples_to_i16(samples, &mut self.converted);
                self.write_converted()
            }
            WavFormat::F32 => {
                for &s in samples {
                    self.wav.write_sample(s)?;
                }
                Ok(())
            }
        }
    }

    /// Hands `self.converted` to hound in one piece.
    fn write_converted(&mut self) -> Result<(), hound::Error> {
        let n = u32::try_from(self.converted.len())
            .map_err(|_| hound::Error::FormatError("block too large"))?;
        let mut writer = self.wav.get_i16_writer(n);
        for &s in &self.converted {
            // SAFETY: `get_i16_writer(n)` reserved room for exactly `n`
            // samples, and this loop writes `self.converted.len() == n`.
            unsafe { writer.write_sample_unchecked(s) };
        }
        writer.flush()
    }

    /// Appends `samples` zero samples.
    pub fn write_silence(&mut self, samples: usize) -> Result<(), hound::Error> {
        let mut left = samples;
        while left > 0 {
            let n = left.min(SILENCE_CHUNK_SAMPLES);
            match self.format {
                WavFormat::S16 => {
                    self.converted.clear();
                    self.converted.resize(n, 0);
                    self.write_converted()?;
                }
                WavFormat::F32 => {
                    for _ in 0..n {
                        self.wav.write_sample(0.0f32)?;
                    }
                }
            }
            left -= n;
        }
        Ok(())
    }

    /// Writes out the buffer and makes the header cover every sample, so the
    /// file is a valid WAV of everything written so far (hound's `flush`).
    pub fn checkpoint(&mut self) -> Result<(), hound::Error> {
        self.wav.flush()
    }

    /// The header made final and everything written; the file, to sync.
    /// Dropped without this (a cancelled task), hound still patches the
    /// header and [`FileBuffer`] writes it.
    pub fn finalize(self) -> Result<Arc<File>, hound::Error> {
        self.wav.finalize()?;
        Ok(self.file)
    }
}

/// `(s * 32768).round().clamp(-32768, 32767) as i16`, in operations that
/// vectorize. `f32::round` is a libm call on the x86-64 baseline (no SSE4.1),
/// and a saturating `as i32` compiles to per-element checks; together they
/// were half of the recorder's CPU (callgrind, BENCHMARKS.md).
#[inline]
pub fn f32_to_i16(s: f32) -> i16 {
    // NaN is silence, as `round` then `as` made it.
    let v = if s.is_nan() {
        0.0
    } else {
        (s * 32768.0).clamp(-32768.0, 32767.0)
    };
    // 1.5 * 2^23 + v lies in [2^23, 2^24), where the float step is 1: the
    // addition rounds v to the nearest integer (ties to even), and the bits
    // minus MAGIC's bits are that integer.
    const MAGIC: f32 = 12_582_912.0;
    let r = v + MAGIC;
    let nearest = (r.to_bits() as i32) - (MAGIC.to_bits() as i32);
    // Exact; +-0.5 only on a tie, which `round` breaks away from zero.
    let diff = v - (r - MAGIC);
    let away = i32::from(diff == 0.5 && v > 0.0) - i32::from(diff == -0.5 && v < 0.0);
    (nearest + away) as i16
}

/// A block of samples in [-1, 1) as 16-bit samples, into `out` (reused: no
/// allocation once it has grown to the block size). One loop that vectorizes.
pub fn samples_to_i16(samples: &[f32], out: &mut Vec<i16>) {
    out.clear();
    out.resize(samples.len(), 0);
    for (o, &s) in out.iter_mut().zip(samples) {
        *o = f32_to_i16(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expression the fast conversion replaced.
    fn reference(s: f32) -> i16 {
        (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16
    }

    #[test]
    fn conversion_matches_round_then_clamp() {
        let mut cases: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.0,
            -2.0,
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            0.5 / 32768.0,
            -0.5 / 32768.0,
            1.5 / 32768.0,
            -1.5 / 32768.0,
            32766.5 / 32768.0,
            32767.5 / 32768.0,
            -32767.5 / 32768.0,
            -32768.5 / 32768.0,
        ];
        // Every 16-bit value, and values between them.
        for i in -32768i32..=32767 {
            let x = i as f32 / 32768.0;
            cases.extend([x, x + 0.3 / 32768.0, x + 0.5 / 32768.0, x - 0.7 / 32768.0]);
        }
        for x in cases {
            assert_eq!(f32_to_i16(x), reference(x), "{x:e}");
        }
        // 16-bit input comes back bit for bit.
        for i in i16::MIN..=i16::MAX {
            assert_eq!(f32_to_i16(f32::from(i) / 32768.0), i);
        }
    }

    /// A ramp with values between and beyond the 16-bit steps.
    fn samples(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37).sin() * 1.1).clamp(-1.2, 1.2))
            .collect()
    }

    /// Writes `blocks` (and 1000 samples of silence) with hound and with
    /// `WavWriter`, a checkpoint after each block; returns both files' bytes
    /// and ours as it was after the first checkpoint.
    fn both(format: WavFormat, channels: u16, blocks: &[Vec<f32>]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("hound.wav");
        let spec = hound::WavSpec {
            channels,
            sample_rate: 16_000,
            bits_per_sample: (format.bytes_per_sample() * 8) as u16,
            sample_format: match format {
                WavFormat::S16 => hound::SampleFormat::Int,
                WavFormat::F32 => hound::SampleFormat::Float,
            },
        };
        let mut h = hound::WavWriter::create(&theirs, spec).unwrap();
        let ours = dir.path().join("ours.wav");
        let mut w =
            WavWriter::create(File::create(&ours).unwrap(), channels, 16_000, format).unwrap();
        let mut first = None;
        for block in blocks {
            for &s in block {
                match format {
                    WavFormat::S16 => h.write_sample(reference(s)).unwrap(),
                    WavFormat::F32 => h.write_sample(s).unwrap(),
                }
            }
            h.flush().unwrap();
            w.write(block).unwrap();
            w.checkpoint().unwrap();
            first.get_or_insert_with(|| std::fs::read(&ours).unwrap());
        }
        for _ in 0..1000 {
            match format {
                WavFormat::S16 => h.write_sample(0i16).unwrap(),
                WavFormat::F32 => h.write_sample(0f32).unwrap(),
            }
        }
        h.finalize().unwrap();
        w.write_silence(1000).unwrap();
        drop(w);
        (
            std::fs::read(&theirs).unwrap(),
            std::fs::read(&ours).unwrap(),
            first.unwrap_or_default(),
        )
    }

    #[test]
    fn files_are_byte_identical_to_hounds() {
        // Blocks small and large, past the buffer size, in both formats.
        let blocks: Vec<Vec<f32>> = [320, 640, 20_000, 2, 9_000]
            .iter()
            .map(|&n| samples(n))
            .collect();
        for (format, channels) in [
            (WavFormat::S16, 1),
            (WavFormat::S16, 2),
            (WavFormat::F32, 1),
            (WavFormat::F32, 2),
        ] {
            let (theirs, ours, first) = both(format, channels, &blocks);
            assert_eq!(theirs.len(), ours.len(), "{format:?} {channels} ch");
            assert!(theirs == ours, "{format:?} {channels} ch: bytes differ");
            // After one checkpoint the file is a valid WAV of the first block.
            let reader = hound::WavReader::new(std::io::Cursor::new(first)).unwrap();
            assert_eq!(reader.len(), 320, "{format:?} {channels} ch");
        }
    }
}
