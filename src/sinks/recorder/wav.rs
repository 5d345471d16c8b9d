//! The recorder's WAV writer: the same bytes hound 3.5 writes (a 44-byte
//! PCMWAVEFORMAT header for 16-bit files, a 68-byte WAVEFORMATEXTENSIBLE one
//! for 32-bit float; the unit tests compare against hound), but a block is
//! converted into the output buffer in one loop that vectorizes. hound's
//! writers take one sample per call, which made them the largest single cost
//! of a recorded stream (BENCHMARKS.md, "Profiling the load"). Its buffer is
//! only allocated once audio arrives, so an idle session's recorder holds no
//! 16 KiB buffer.

use std::fs::File;
use std::io::{self, Write};

use super::WavFormat;

/// Pending bytes before they are written to the file.
const BUFFER_BYTES: usize = 16 * 1024;
/// Zeros appended per step when writing silence.
const SILENCE_CHUNK_BYTES: usize = 4096;
const KSDATAFORMAT_SUBTYPE_IEEE_FLOAT: [u8; 16] = [
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71,
];

pub(super) struct WavWriter {
    file: File,
    buffer: Vec<u8>,
    format: WavFormat,
    /// Where the data chunk's length field is (40 or 64); it ends the header.
    data_len_offset: u64,
    /// Data bytes written, buffered ones included.
    data_bytes: u64,
    /// The header covers every data byte (nothing to do on drop).
    clean: bool,
}

impl WavWriter {
    /// Writes the header to `file` (at offset 0), sizes zero until the first
    /// [`WavWriter::checkpoint`].
    pub fn create(
        mut file: File,
        channels: u16,
        sample_rate: u32,
        format: WavFormat,
    ) -> io::Result<Self> {
        let bytes_per_sample = format.bytes_per_sample() as u32;
        let block_align = bytes_per_sample * u32::from(channels);
        let mut header = Vec::with_capacity(68);
        header.extend_from_slice(b"RIFF\0\0\0\0WAVEfmt ");
        let extensible = format == WavFormat::F32;
        let fmt_len: u32 = if extensible { 40 } else { 16 };
        header.extend_from_slice(&fmt_len.to_le_bytes());
        let tag: u16 = if extensible { 0xfffe } else { 1 };
        header.extend_from_slice(&tag.to_le_bytes());
        header.extend_from_slice(&channels.to_le_bytes());
        header.extend_from_slice(&sample_rate.to_le_bytes());
        header.extend_from_slice(&(sample_rate * block_align).to_le_bytes());
        header.extend_from_slice(&(block_align as u16).to_le_bytes());
        let bits = (bytes_per_sample * 8) as u16;
        header.extend_from_slice(&bits.to_le_bytes());
        if extensible {
            header.extend_from_slice(&22u16.to_le_bytes());
            header.extend_from_slice(&bits.to_le_bytes());
            let channel_mask: u32 = (1 << channels.min(18)) - 1;
            header.extend_from_slice(&channel_mask.to_le_bytes());
            header.extend_from_slice(&KSDATAFORMAT_SUBTYPE_IEEE_FLOAT);
        }
        header.extend_from_slice(b"data\0\0\0\0");
        file.write_all(&header)?;
        Ok(Self {
            file,
            buffer: Vec::new(),
            format,
            data_len_offset: header.len() as u64 - 4,
            data_bytes: 0,
            clean: true,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Makes room for `bytes` more in the buffer, writing it out if full.
    fn room_for(&mut self, bytes: usize) -> io::Result<()> {
        if !self.buffer.is_empty() && self.buffer.len() + bytes > BUFFER_BYTES {
            self.file.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        if self.buffer.capacity() == 0 {
            self.buffer.reserve_exact(BUFFER_BYTES.max(bytes));
        }
        Ok(())
    }

    /// Appends interleaved samples in [-1, 1) in the file's sample format.
    pub fn write(&mut self, samples: &[f32]) -> io::Result<()> {
        let bytes = samples.len() * self.format.bytes_per_sample() as usize;
        self.room_for(bytes)?;
        let start = self.buffer.len();
        self.buffer.resize(start + bytes, 0);
        let out = &mut self.buffer[start..];
        match self.format {
            WavFormat::S16 => {
                for (out, &s) in out.chunks_exact_mut(2).zip(samples) {
                    // Exact for samples that came from 16-bit or G.711 input.
                    out.copy_from_slice(&f32_to_i16(s).to_le_bytes());
                }
            }
            WavFormat::F32 => {
                for (out, &s) in out.chunks_exact_mut(4).zip(samples) {
                    out.copy_from_slice(&s.to_le_bytes());
                }
            }
        }
        self.data_bytes += bytes as u64;
        self.clean = false;
        Ok(())
    }

    /// Appends `samples` zero samples.
    pub fn write_silence(&mut self, samples: usize) -> io::Result<()> {
        let mut left = samples * self.format.bytes_per_sample() as usize;
        while left > 0 {
            let n = left.min(SILENCE_CHUNK_BYTES);
            self.room_for(n)?;
            self.buffer.resize(self.buffer.len() + n, 0);
            self.data_bytes += n as u64;
            left -= n;
        }
        self.clean = false;
        Ok(())
    }

    /// Writes out the buffer and makes the header cover every sample, so the
    /// file is a valid WAV of everything written so far.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        self.file.write_all(&self.buffer)?;
        self.buffer.clear();
        let data_len = u32::try_from(self.data_bytes).unwrap_or(u32::MAX);
        let riff_len =
            u32::try_from(self.data_bytes + self.data_len_offset - 4).unwrap_or(u32::MAX);
        write_at(&mut self.file, 4, &riff_len.to_le_bytes())?;
        write_at(
            &mut self.file,
            self.data_len_offset,
            &data_len.to_le_bytes(),
        )?;
        self.clean = true;
        Ok(())
    }
}

impl Drop for WavWriter {
    /// A recorder dropped without finishing (its task cancelled) still
    /// leaves a valid file, as hound's writer did.
    fn drop(&mut self) {
        if !self.clean {
            let _ = self.checkpoint();
        }
    }
}

/// Writes at `offset` without moving the file position (appends go on).
fn write_at(file: &mut File, offset: u64, bytes: &[u8]) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.write_all_at(bytes, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(bytes)?;
        file.seek(SeekFrom::End(0)).map(|_| ())
    }
}

/// `(s * 32768).round().clamp(-32768, 32767) as i16`, in operations that
/// vectorize. `f32::round` is a libm call on the x86-64 baseline (no SSE4.1),
/// and a saturating `as i32` compiles to per-element checks; together they
/// were half of the recorder's CPU (callgrind, BENCHMARKS.md).
#[inline]
fn f32_to_i16(s: f32) -> i16 {
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
