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
//!
//! When a write fails (a full disk), hound can no longer fix the header: it
//! seeks to patch it, and the seek writes out the buffer first, which fails
//! again. So after the first failure nothing more goes through hound, and
//! [`WavWriter::finalize`] hands back an [`Unfinished`] file whose header
//! [`Unfinished::cover_frames_on_disk`] patches in place, from the file's real
//! length: overwriting the 8 size bytes needs no new space on any disk.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::WavFormat;

/// Pending bytes before they are written to the file.
const BUFFER_BYTES: usize = 16 * 1024;
/// Zero samples written per step when writing silence.
const SILENCE_CHUNK_SAMPLES: usize = 4096;

/// What the WAV writer needs of its file. Calls take `&self`, as `&File`'s
/// do, so the recorder can sync the descriptor hound writes through; tests
/// put a file that runs out of space in its place.
pub trait WavFile: Send + Sync + 'static {
    /// Writes at the current position; may write only part of `data`.
    fn write_some(&self, data: &[u8]) -> io::Result<usize>;
    fn seek_to(&self, pos: SeekFrom) -> io::Result<u64>;
    fn size(&self) -> io::Result<u64>;
    fn truncate_to(&self, len: u64) -> io::Result<()>;

    fn write_all_at(&self, offset: u64, mut data: &[u8]) -> io::Result<()> {
        self.seek_to(SeekFrom::Start(offset))?;
        while !data.is_empty() {
            match self.write_some(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl WavFile for File {
    fn write_some(&self, data: &[u8]) -> io::Result<usize> {
        let mut file: &File = self;
        Write::write(&mut file, data)
    }

    fn seek_to(&self, pos: SeekFrom) -> io::Result<u64> {
        let mut file: &File = self;
        Seek::seek(&mut file, pos)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn truncate_to(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// A buffered writer on a shared file handle, for hound: `BufWriter` owns
/// its file and allocates its buffer up front.
struct FileBuffer<F: WavFile> {
    file: Arc<F>,
    buffer: Vec<u8>,
    /// A write failed: how much of the buffer reached the file is unknown,
    /// so nothing more is written (hound's drop would otherwise write the
    /// buffer again, and a header counting bytes that are not on disk).
    failed: bool,
}

impl<F: WavFile> FileBuffer<F> {
    fn check(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other("an earlier write to this file failed"));
        }
        Ok(())
    }

    /// Runs one file operation; its failure stops all later ones.
    fn guard<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn drain(&mut self) -> io::Result<()> {
        self.check()?;
        let mut written = 0;
        while written < self.buffer.len() {
            let step = match self.file.write_some(&self.buffer[written..]) {
                Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
                Err(e) => Err(e),
            };
            written += self.guard(step)?;
        }
        self.buffer.clear();
        Ok(())
    }
}

impl<F: WavFile> Write for FileBuffer<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        if self.buffer.len() + data.len() > BUFFER_BYTES {
            self.drain()?;
        }
        if data.len() >= BUFFER_BYTES {
            let written = self.file.write_some(data);
            return self.guard(written);
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

impl<F: WavFile> Seek for FileBuffer<F> {
    /// Writes out what is buffered first (hound seeks to patch the header).
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.drain()?;
        let position = self.file.seek_to(pos);
        self.guard(position)
    }
}

impl<F: WavFile> Drop for FileBuffer<F> {
    /// hound's own drop patches the header into the buffer; this writes it
    /// (nothing, after a failed write).
    fn drop(&mut self) {
        let _ = self.drain();
    }
}

/// Where a WAV file's samples start, and the bytes of one sample frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLayout {
    /// Offset of the first sample: the `data` chunk's size field is the 4
    /// bytes before it, and the RIFF size field is at offset 4.
    pub data_start: u64,
    pub frame_bytes: u64,
}

pub struct WavWriter<F: WavFile = File> {
    wav: hound::WavWriter<FileBuffer<F>>,
    file: Arc<F>,
    layout: DataLayout,
    format: WavFormat,
    /// The block as 16-bit samples (s16 files), reused across blocks.
    converted: Vec<i16>,
}

/// A WAV file whose writer stopped on an error, header not yet final.
pub struct Unfinished<F: WavFile = File> {
    file: Arc<F>,
    layout: DataLayout,
}

impl<F: WavFile> Unfinished<F> {
    /// Makes the header cover every whole frame on disk (see
    /// [`cover_frames_on_disk`]); returns their number.
    pub fn cover_frames_on_disk(&self) -> io::Result<u64> {
        cover_frames_on_disk(&*self.file, self.layout)
    }
}

impl<F: WavFile> WavWriter<F> {
    /// Writes the header to `file` (at offset 0, sizes zero) and out to the
    /// file at once, so a recording on disk always starts with a whole header.
    pub fn create(
        file: F,
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
            failed: false,
        };
        let mut wav = hound::WavWriter::new(buffer, spec)?;
        wav.flush()?;
        // hound's flush leaves the file position where the samples go.
        let data_start = file.seek_to(SeekFrom::Current(0))?;
        let layout = DataLayout {
            data_start,
            frame_bytes: u64::from(channels) * format.bytes_per_sample(),
        };
        Ok(Self {
            wav,
            file,
            layout,
            format,
            converted: Vec::new(),
        })
    }

    /// The recording's file (the same descriptor hound writes through).
    pub fn file(&self) -> &F {
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

    /// The header made final and everything written; the file, to sync. On
    /// an error (now or at an earlier write), the file to repair instead.
    /// Dropped without this (a cancelled task), hound still patches the
    /// header and [`FileBuffer`] writes it, unless a write had failed.
    pub fn finalize(self) -> Result<Arc<F>, (hound::Error, Unfinished<F>)> {
        let Self {
            wav, file, layout, ..
        } = self;
        match wav.finalize() {
            Ok(()) => Ok(file),
            Err(error) => Err((error, Unfinished { file, layout })),
        }
    }
}

/// Makes the header of the WAV file `file`, laid out as `layout`, cover
/// every whole sample frame on disk, and returns their number. A partial
/// frame at the end (a write the disk cut short) is cut off, so the file is
/// exactly the header and the frames it counts. Only the two size fields are
/// written, in place: this needs no free space on the disk.
pub(super) fn cover_frames_on_disk<F: WavFile>(file: &F, layout: DataLayout) -> io::Result<u64> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let DataLayout {
        data_start,
        frame_bytes,
    } = layout;
    // The RIFF size field counts the bytes after its own 8.
    let riff_overhead = data_start
        .checked_sub(8)
        .filter(|_| data_start >= 12 && frame_bytes > 0)
        .ok_or_else(|| invalid("not a WAV layout"))?;
    let len = file.size()?;
    let on_disk = len
        .checked_sub(data_start)
        .ok_or_else(|| invalid("the file is shorter than its WAV header"))?;
    // Both size fields are 32-bit.
    let most = u64::from(u32::MAX) - riff_overhead;
    let data_bytes = on_disk.min(most) / frame_bytes * frame_bytes;
    let end = data_start + data_bytes;
    if len > end && len - end < frame_bytes {
        file.truncate_to(end)?;
    }
    let riff_size = u32::try_from(riff_overhead + data_bytes).map_err(|_| invalid("too long"))?;
    let data_size = u32::try_from(data_bytes).map_err(|_| invalid("too long"))?;
    file.write_all_at(4, &riff_size.to_le_bytes())?;
    file.write_all_at(data_start - 4, &data_size.to_le_bytes())?;
    Ok(data_bytes / frame_bytes)
}

/// What [`parse_head`] finds at the start of a WAV file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WavHead {
    pub layout: DataLayout,
    pub sample_rate: u32,
}

/// Reads the layout of a WAV file from its first bytes (crash recovery):
/// the `fmt ` chunk's rate and block size, and where the `data` chunk's
/// samples start. Whatever the size fields say: after a crash they are stale.
pub(super) fn parse_head(head: &[u8]) -> Result<WavHead, &'static str> {
    let bytes = |at: usize, n: usize| head.get(at..at.checked_add(n)?);
    let u32_at = |at: usize| bytes(at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if bytes(0, 4) != Some(b"RIFF") || bytes(8, 4) != Some(b"WAVE") {
        return Err("not a RIFF/WAVE file");
    }
    let mut format = None;
    let mut at = 12usize;
    while let (Some(id), Some(len)) = (bytes(at, 4), u32_at(at.saturating_add(4))) {
        let body = at.saturating_add(8);
        match id {
            b"fmt " => {
                let sample_rate = u32_at(body.saturating_add(4)).ok_or("truncated fmt chunk")?;
                let block_align = bytes(body.saturating_add(12), 2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .ok_or("truncated fmt chunk")?;
                if sample_rate == 0 || block_align == 0 {
                    return Err("fmt chunk with a zero rate or frame size");
                }
                format = Some((sample_rate, u64::from(block_align)));
            }
            b"data" => {
                let (sample_rate, frame_bytes) = format.ok_or("data chunk before fmt")?;
                return Ok(WavHead {
                    layout: DataLayout {
                        data_start: body as u64,
                        frame_bytes,
                    },
                    sample_rate,
                });
            }
            _ => {}
        }
        // Chunks are padded to an even length.
        let len = usize::try_from(len).map_err(|_| "chunk too long")?;
        at = body
            .checked_add(len)
            .and_then(|end| end.checked_add(len & 1))
            .ok_or("chunk too long")?;
    }
    Err("no data chunk in the first bytes")
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

    /// A file on a disk with room for `limit` bytes: a write past the limit
    /// is cut short there and the next one fails, as on a full disk; writes
    /// below it (a header patch) succeed. With `frees_up`, the first failure
    /// makes room for everything after it (space freed by someone else).
    struct FullDisk {
        file: File,
        limit: std::sync::atomic::AtomicU64,
        frees_up: bool,
    }

    impl FullDisk {
        fn new(file: File, limit: u64, frees_up: bool) -> Self {
            Self {
                file,
                limit: limit.into(),
                frees_up,
            }
        }
    }

    impl WavFile for FullDisk {
        fn write_some(&self, data: &[u8]) -> io::Result<usize> {
            use std::sync::atomic::Ordering::Relaxed;
            let at = self.file.seek_to(SeekFrom::Current(0))?;
            let room = self.limit.load(Relaxed).saturating_sub(at);
            if room == 0 && !data.is_empty() {
                if self.frees_up {
                    self.limit.store(u64::MAX, Relaxed);
                }
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "No space left on device",
                ));
            }
            let n = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            self.file.write_some(&data[..n])
        }
        fn seek_to(&self, pos: SeekFrom) -> io::Result<u64> {
            self.file.seek_to(pos)
        }
        fn size(&self) -> io::Result<u64> {
            self.file.size()
        }
        fn truncate_to(&self, len: u64) -> io::Result<()> {
            self.file.truncate_to(len)
        }
    }

    /// The samples of `samples` as the file stores them, as 32-bit words
    /// (s16 samples widened) for comparison.
    fn stored(format: WavFormat, samples: &[f32]) -> Vec<u32> {
        samples
            .iter()
            .map(|&s| match format {
                WavFormat::S16 => reference(s) as u16 as u32,
                WavFormat::F32 => s.to_bits(),
            })
            .collect()
    }

    fn read_back(format: WavFormat, bytes: &[u8]) -> (hound::WavSpec, Vec<u32>) {
        let mut reader = hound::WavReader::new(std::io::Cursor::new(bytes)).unwrap();
        let samples = match format {
            WavFormat::S16 => reader
                .samples::<i16>()
                .map(|s| s.unwrap() as u16 as u32)
                .collect(),
            WavFormat::F32 => reader
                .samples::<f32>()
                .map(|s| s.unwrap().to_bits())
                .collect(),
        };
        (reader.spec(), samples)
    }

    #[test]
    fn a_full_disk_leaves_a_header_covering_every_whole_frame_on_disk() {
        // 200 blocks of 20 ms at 16 kHz: 128,000 bytes and more.
        let audio = samples(200 * 320 * 2);
        for (format, channels) in [
            (WavFormat::S16, 1),
            (WavFormat::S16, 2),
            (WavFormat::F32, 1),
            (WavFormat::F32, 2),
        ] {
            let header: u64 = if format == WavFormat::F32 { 68 } else { 44 };
            let frame_bytes = u64::from(channels) * format.bytes_per_sample();
            let audio = &audio[..200 * 320 * usize::from(channels)];
            // Full inside the first block, at a partial frame, past the
            // write buffer, deep into the stream.
            for limit in [header + 1, 1_001, 16_385, 40_003, 70_001] {
                for (checkpoints, frees_up) in [(true, false), (false, false), (true, true)] {
                    let case =
                        format!("{format:?} {channels} ch, room {limit}, checkpoints {checkpoints}, frees up {frees_up}");
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("full.wav");
                    let disk = FullDisk::new(File::create(&path).unwrap(), limit, frees_up);
                    let mut w = WavWriter::create(disk, channels, 16_000, format).unwrap();
                    for block in audio.chunks(320 * usize::from(channels)) {
                        let step = w.write(block).and_then(|()| {
                            if checkpoints {
                                w.checkpoint()
                            } else {
                                Ok(())
                            }
                        });
                        if step.is_err() {
                            break;
                        }
                    }
                    // Failed at a write, or fails now writing out the rest.
                    let Err((_, unfinished)) = w.finalize() else {
                        panic!("{case}: finalized on a full disk");
                    };
                    let frames = unfinished.cover_frames_on_disk().unwrap();
                    drop(unfinished);

                    // Every whole frame that fitted is covered, and the file
                    // is exactly the header and those frames.
                    assert_eq!(frames, (limit - header) / frame_bytes, "{case}");
                    let bytes = std::fs::read(&path).unwrap();
                    assert_eq!(bytes.len() as u64, header + frames * frame_bytes, "{case}");
                    let (spec, on_disk) = read_back(format, &bytes);
                    assert_eq!(spec.channels, channels, "{case}");
                    assert_eq!(on_disk.len() as u64, frames * u64::from(channels), "{case}");
                    // They are the stream's first frames, nothing written twice.
                    assert!(
                        on_disk[..] == stored(format, audio)[..on_disk.len()],
                        "{case}: the samples on disk are not the stream's prefix"
                    );
                }
            }
        }
    }

    #[test]
    fn no_room_for_the_header_fails_at_create() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FullDisk::new(File::create(dir.path().join("a.wav")).unwrap(), 43, false);
        assert!(WavWriter::create(disk, 1, 16_000, WavFormat::S16).is_err());
    }

    #[test]
    fn covering_the_frames_on_disk_refuses_a_file_shorter_than_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        std::fs::write(&path, b"RIFF\0\0\0\0WAVE").unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        let layout = DataLayout {
            data_start: 44,
            frame_bytes: 2,
        };
        assert!(cover_frames_on_disk(&file, layout).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"RIFF\0\0\0\0WAVE");
    }

    #[test]
    fn the_head_of_a_wav_gives_its_layout_whatever_its_sizes_say() {
        for (format, channels, data_start) in [
            (WavFormat::S16, 1, 44),
            (WavFormat::S16, 2, 44),
            (WavFormat::F32, 2, 68),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("a.wav");
            let mut w =
                WavWriter::create(File::create(&path).unwrap(), channels, 8_000, format).unwrap();
            w.write(&samples(640)).unwrap();
            drop(w);
            let head = parse_head(&std::fs::read(&path).unwrap()).unwrap();
            let frame_bytes = u64::from(channels) * format.bytes_per_sample();
            assert_eq!(
                head,
                WavHead {
                    layout: DataLayout {
                        data_start,
                        frame_bytes
                    },
                    sample_rate: 8_000
                }
            );
        }
        // An unknown chunk before `data` is skipped (padded to even length).
        let mut bytes = b"RIFF\0\0\0\0WAVE".to_vec();
        bytes.extend(b"fmt \x10\0\0\0\x01\0\x02\0\x80\x3e\0\0\0\xfa\0\0\x04\0\x10\0");
        bytes.extend(b"LIST\x03\0\0\0abc\0");
        bytes.extend(b"data\xff\xff\xff\xff");
        let head = parse_head(&bytes).unwrap();
        assert_eq!(head.layout.data_start, bytes.len() as u64);
        assert_eq!((head.layout.frame_bytes, head.sample_rate), (4, 16_000));
        // Damaged heads are refused, never a panic.
        for bad in [
            &b""[..],
            b"RIFF\0\0\0\0WAVX",
            b"RIFF\0\0\0\0WAVEdata\0\0\0\0",
            b"RIFF\0\0\0\0WAVEfmt \x02\0\0\0\x01\0",
            b"RIFF\0\0\0\0WAVEJUNK\xff\xff\xff\xff",
            &bytes[..bytes.len() - 8],
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
        let mut zero_align = bytes.clone();
        zero_align[32] = 0;
        assert!(parse_head(&zero_align).is_err());
    }
}
