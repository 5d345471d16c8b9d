//! Audio files → the messages `cochlea stream` sends.
//!
//! WAV files are read with a small RIFF reader of our own rather than hound,
//! because hound refuses G.711 (format tags 6 and 7), which is what call
//! recordings usually are. 16-bit PCM, 32-bit float, μ-law and A-law go on
//! the wire byte for byte as they are in the file (they *are* the wire
//! formats `pcm_s16le`, `pcm_f32le`, `mulaw`, `alaw`); 8-bit PCM becomes
//! 16-bit exactly, 24- and 32-bit integer PCM and 64-bit float become 32-bit
//! float (exact for 24-bit).
//!
//! Ogg/Opus files are demuxed with the server's own [`OggDemuxer`] and sent
//! as one raw Opus packet per message (`encoding=opus`, `framing=seq`), which
//! is what makes them resumable; `ogg_opus` would need `framing=raw`.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::codec::container::{DemuxEvent, Demuxer};
use crate::codec::ogg::OggDemuxer;
use crate::protocol::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, OPUS_SAMPLE_RATES};

/// Media per message for the sample-frame encodings.
pub const MESSAGE_MS: u32 = 20;

const FORMAT_PCM: u16 = 1;
const FORMAT_FLOAT: u16 = 3;
const FORMAT_ALAW: u16 = 6;
const FORMAT_MULAW: u16 = 7;
const FORMAT_EXTENSIBLE: u16 = 0xFFFE;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a WAV (RIFF/WAVE) or Ogg/Opus file")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One message's worth of audio.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// First sample frame of the chunk, since the start of the stream.
    pub timestamp: u64,
    /// Sample frames it holds (Opus: the packet's duration at `sample_rate`).
    pub frames: u32,
    pub payload: Bytes,
}

/// A file ready to stream: its wire format and its messages, in order.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    /// Wire encoding: `pcm_s16le`, `pcm_f32le`, `mulaw`, `alaw` or `opus`.
    pub encoding: &'static str,
    /// Hz; for Opus, the rate the server decodes to.
    pub sample_rate: u32,
    pub channels: u16,
    pub chunks: Vec<Chunk>,
    /// Media length in sample frames at `sample_rate`.
    pub total_frames: u64,
    /// What the file was, for people (`WAV 8000 Hz stereo μ-law`).
    pub description: String,
    /// Something the user should know (a conversion, a truncated file).
    pub notes: Vec<String>,
}

impl Source {
    pub fn duration_seconds(&self) -> f64 {
        self.total_frames as f64 / f64::from(self.sample_rate)
    }

    /// File name for display.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

/// Reads and prepares one file (WAV or Ogg/Opus, told apart by content).
pub fn load(path: &Path) -> Result<Source, SourceError> {
    let bytes = std::fs::read(path).map_err(|source| SourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        from_wav(path, Bytes::from(bytes))
    } else if bytes.starts_with(b"OggS") {
        from_ogg_opus(path, &bytes)
    } else {
        Err(SourceError::UnknownFormat {
            path: path.to_owned(),
        })
    }
}

/// The parts of a WAV file we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WavInfo {
    /// The format tag, with WAVE_FORMAT_EXTENSIBLE resolved to its sub-format.
    pub format_tag: u16,
    pub channels: u16,
    pub sample_rate: u32,
    /// Bytes per sample frame (all channels).
    pub block_align: u16,
    pub bits_per_sample: u16,
    /// Byte range of the audio in the file.
    pub data: std::ops::Range<usize>,
    /// The data chunk claimed more bytes than the file has (a recording cut
    /// short, or a streaming writer's placeholder size).
    pub truncated: bool,
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Walks the RIFF chunks for `fmt ` and `data`.
pub fn parse_wav(bytes: &[u8]) -> Result<WavInfo, String> {
    let mut fmt: Option<&[u8]> = None;
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = le32(bytes, at + 4).ok_or("truncated chunk header")? as usize;
        let body = at + 8;
        if id == b"fmt " {
            fmt = Some(
                bytes
                    .get(body..body.saturating_add(len))
                    .ok_or("fmt chunk runs past the end of the file")?,
            );
        } else if id == b"data" {
            let fmt = fmt.ok_or("data chunk before the fmt chunk")?;
            let mut info = parse_fmt(fmt)?;
            let end = body.saturating_add(len);
            info.truncated = end > bytes.len();
            info.data = body..end.min(bytes.len());
            return Ok(info);
        }
        // Chunks are padded to an even length.
        at = body.saturating_add(len).saturating_add(len & 1);
    }
    Err(match fmt {
        None => "no fmt chunk".to_owned(),
        Some(_) => "no data chunk".to_owned(),
    })
}

fn parse_fmt(fmt: &[u8]) -> Result<WavInfo, String> {
    let short = || "fmt chunk too short".to_owned();
    let mut format_tag = le16(fmt, 0).ok_or_else(short)?;
    let channels = le16(fmt, 2).ok_or_else(short)?;
    let sample_rate = le32(fmt, 4).ok_or_else(short)?;
    let block_align = le16(fmt, 12).ok_or_else(short)?;
    let bits_per_sample = le16(fmt, 14).ok_or_else(short)?;
    if format_tag == FORMAT_EXTENSIBLE {
        // cbSize(2) validBits(2) channelMask(4), then the sub-format GUID
        // whose first two bytes are the format tag.
        format_tag = le16(fmt, 24).ok_or("WAVE_FORMAT_EXTENSIBLE without a sub-format")?;
    }
    Ok(WavInfo {
        format_tag,
        channels,
        sample_rate,
        block_align,
        bits_per_sample,
        data: 0..0,
        truncated: false,
    })
}

fn format_name(tag: u16) -> String {
    match tag {
        0x0002 => "ADPCM".into(),
        0x0011 => "IMA ADPCM".into(),
        0x0031 => "GSM 6.10".into(),
        0x0055 => "MP3".into(),
        other => format!("0x{other:04x}"),
    }
}

fn from_wav(path: &Path, bytes: Bytes) -> Result<Source, SourceError> {
    let invalid = |message: String| SourceError::Invalid {
        path: path.to_owned(),
        message,
    };
    let info = parse_wav(&bytes).map_err(|m| invalid(format!("unreadable WAV file: {m}")))?;
    if !(1..=2).contains(&info.channels) {
        return Err(invalid(format!(
            "{} channels; the server takes mono or stereo (e.g. `sox in.wav -c 1 out.wav`)",
            info.channels
        )));
    }
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&info.sample_rate) {
        return Err(invalid(format!(
            "sample rate {} Hz; the server takes {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz (e.g. `sox in.wav -r 16000 out.wav`)",
            info.sample_rate
        )));
    }
    let channels = usize::from(info.channels);
    if info.block_align == 0 || usize::from(info.block_align) % channels != 0 {
        return Err(invalid(format!(
            "block align {} does not fit {} channels",
            info.block_align, info.channels
        )));
    }
    let sample_bytes = usize::from(info.block_align) / channels;
    let mut notes = Vec::new();
    let data = bytes.slice(info.data.clone());
    let whole = data.len() / usize::from(info.block_align) * usize::from(info.block_align);
    if info.truncated {
        notes.push(format!(
            "the data chunk is longer than the file; streaming the {} bytes present",
            data.len()
        ));
    }
    if whole != data.len() {
        notes.push(format!(
            "dropping {} trailing bytes that are not a whole sample frame",
            data.len() - whole
        ));
    }
    let data = data.slice(..whole);
    let rate = info.sample_rate;
    let stereo = if channels == 2 { "stereo" } else { "mono" };
    let (encoding, wire, what): (&'static str, Bytes, String) =
        match (info.format_tag, sample_bytes) {
            (FORMAT_PCM, 2) => ("pcm_s16le", data, "16-bit PCM".into()),
            (FORMAT_PCM, 1) => {
                let s16: Vec<u8> = data
                    .iter()
                    .flat_map(|&b| ((i16::from(b) - 128) << 8).to_le_bytes())
                    .collect();
                notes.push("8-bit PCM sent as 16-bit (exact)".into());
                ("pcm_s16le", Bytes::from(s16), "8-bit PCM".into())
            }
            (FORMAT_PCM, 3) => {
                let f32s: Vec<u8> = data
                    .chunks_exact(3)
                    .flat_map(|s| {
                        let v = i32::from_le_bytes([0, s[0], s[1], s[2]]) >> 8;
                        (v as f32 / 8_388_608.0).to_le_bytes()
                    })
                    .collect();
                notes.push("24-bit PCM sent as 32-bit float (exact)".into());
                ("pcm_f32le", Bytes::from(f32s), "24-bit PCM".into())
            }
            (FORMAT_PCM, 4) => {
                let f32s: Vec<u8> = data
                    .chunks_exact(4)
                    .flat_map(|s| {
                        let v = i32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                        (v as f32 / 2_147_483_648.0).to_le_bytes()
                    })
                    .collect();
                notes.push("32-bit PCM sent as 32-bit float (24-bit precision)".into());
                ("pcm_f32le", Bytes::from(f32s), "32-bit PCM".into())
            }
            (FORMAT_FLOAT, 4) => ("pcm_f32le", data, "32-bit float".into()),
            (FORMAT_FLOAT, 8) => {
                let f32s: Vec<u8> = data
                    .chunks_exact(8)
                    .flat_map(|s| {
                        let v = f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
                        (v as f32).to_le_bytes()
                    })
                    .collect();
                notes.push("64-bit float sent as 32-bit float".into());
                ("pcm_f32le", Bytes::from(f32s), "64-bit float".into())
            }
            (FORMAT_MULAW, 1) => ("mulaw", data, "G.711 μ-law".into()),
            (FORMAT_ALAW, 1) => ("alaw", data, "G.711 A-law".into()),
            (FORMAT_PCM | FORMAT_FLOAT | FORMAT_MULAW | FORMAT_ALAW, n) => {
                return Err(invalid(format!(
                    "{} bytes per sample is not supported for this format",
                    n
                )))
            }
            (tag, _) => {
                return Err(invalid(format!(
                    "WAV format {} is not supported: convert it to 16-bit PCM or G.711 first (e.g. `sox in.wav -e signed-integer -b 16 out.wav`)",
                    format_name(tag)
                )))
            }
        };
    let frame_bytes = wire_sample_bytes(encoding) * channels;
    let frames_per_chunk = (rate * MESSAGE_MS / 1000).max(1) as usize;
    let chunks = wire
        .chunks(frames_per_chunk * frame_bytes)
        .enumerate()
        .map(|(i, c)| Chunk {
            timestamp: (i * frames_per_chunk) as u64,
            frames: (c.len() / frame_bytes) as u32,
            payload: wire.slice_ref(c),
        })
        .collect();
    Ok(Source {
        path: path.to_owned(),
        encoding,
        sample_rate: rate,
        channels: info.channels,
        chunks,
        total_frames: (wire.len() / frame_bytes) as u64,
        description: format!("WAV {rate} Hz {stereo} {what}"),
        notes,
    })
}

fn wire_sample_bytes(encoding: &str) -> usize {
    match encoding {
        "pcm_s16le" => 2,
        "pcm_f32le" => 4,
        _ => 1,
    }
}

fn from_ogg_opus(path: &Path, bytes: &[u8]) -> Result<Source, SourceError> {
    let invalid = |message: String| SourceError::Invalid {
        path: path.to_owned(),
        message,
    };
    let mut events = Vec::new();
    OggDemuxer::new()
        .push(bytes, &mut events)
        .map_err(|e| invalid(format!("unreadable Ogg/Opus file: {e}")))?;
    let mut head = None;
    let mut packets = Vec::new();
    let mut notes = Vec::new();
    for event in events {
        match event {
            DemuxEvent::Head(h) => head = Some(h),
            DemuxEvent::Packet { data, .. } => packets.push(data),
            DemuxEvent::Damaged {
                bytes_skipped,
                reason,
            } => notes.push(format!(
                "skipped {bytes_skipped} damaged bytes ({reason}); the server conceals the gap"
            )),
        }
    }
    let head = head.ok_or_else(|| invalid("no Opus header: the file ends too soon".into()))?;
    // Decode at the encoder's input rate when libopus can (speech encoded
    // from 16 kHz comes back at 16 kHz), else at Opus's native 48 kHz.
    let sample_rate = OPUS_SAMPLE_RATES
        .into_iter()
        .find(|&r| r >= head.input_sample_rate && head.input_sample_rate > 0)
        .unwrap_or(48_000);
    if head.output_gain_q8 != 0 {
        notes.push(format!(
            "the file's output gain ({:.1} dB) is not applied: raw Opus packets carry no header",
            f64::from(head.output_gain_q8) / 256.0
        ));
    }
    let mut chunks = Vec::with_capacity(packets.len());
    let mut timestamp = 0u64;
    let mut last_frames = sample_rate / 50;
    for (i, packet) in packets.into_iter().enumerate() {
        let frames = match opus::packet::get_nb_samples(&packet, sample_rate) {
            Ok(n) if !packet.is_empty() => n as u32,
            _ => {
                // The server conceals a packet it cannot read; it still takes
                // its place in time, like the one before it.
                notes.push(format!("packet {i} is unreadable; the server conceals it"));
                last_frames
            }
        };
        last_frames = frames;
        chunks.push(Chunk {
            timestamp,
            frames,
            payload: Bytes::from(packet),
        });
        timestamp += u64::from(frames);
    }
    let pre_skip_frames = u64::from(head.pre_skip) * u64::from(sample_rate) / 48_000;
    notes.push(format!(
        "sent as raw Opus packets (resumable): the recording keeps the encoder's {pre_skip_frames}-frame pre-skip at the start and the last packet's padding"
    ));
    let stereo = if head.channels == 2 { "stereo" } else { "mono" };
    Ok(Source {
        path: path.to_owned(),
        encoding: "opus",
        sample_rate,
        channels: u16::from(head.channels),
        chunks,
        total_frames: timestamp,
        description: format!(
            "Ogg/Opus {stereo}, {} Hz input, decoded at {sample_rate} Hz",
            head.input_sample_rate
        ),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_hound(path: &Path, spec: hound::WavSpec, samples: &[i32]) {
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for &s in samples {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
    }

    fn spec(channels: u16, rate: u32, bits: u16) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: hound::SampleFormat::Int,
        }
    }

    #[test]
    fn s16_goes_on_the_wire_unchanged_in_20_ms_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        let samples: Vec<i32> = (0..2 * 8000 + 6)
            .map(|i| (i * 97 % 60000) - 30000)
            .collect();
        write_hound(&path, spec(2, 8000, 16), &samples);
        let source = load(&path).unwrap();
        assert_eq!(source.encoding, "pcm_s16le");
        assert_eq!((source.sample_rate, source.channels), (8000, 2));
        assert_eq!(source.total_frames, 8003);
        // 160 frames per 20 ms chunk, the last one short.
        assert_eq!(source.chunks.len(), 51);
        assert_eq!(source.chunks[1].timestamp, 160);
        assert_eq!(source.chunks[50].frames, 3);
        let wire: Vec<u8> = source
            .chunks
            .iter()
            .flat_map(|c| c.payload.to_vec())
            .collect();
        let expected: Vec<u8> = samples
            .iter()
            .flat_map(|&s| (s as i16).to_le_bytes())
            .collect();
        assert_eq!(wire, expected);
    }

    #[test]
    fn other_integer_widths_convert_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for (bits, values, encoding) in [
            (8u16, vec![-128, -1, 0, 1, 127], "pcm_s16le"),
            (24, vec![-8_388_608, -1, 0, 1, 8_388_607], "pcm_f32le"),
        ] {
            let path = dir.path().join(format!("{bits}.wav"));
            write_hound(&path, spec(1, 16000, bits), &values);
            let source = load(&path).unwrap();
            assert_eq!(source.encoding, encoding, "{bits}-bit");
            let wire = source.chunks[0].payload.to_vec();
            if bits == 8 {
                let got: Vec<i32> = wire
                    .chunks(2)
                    .map(|b| i32::from(i16::from_le_bytes([b[0], b[1]])))
                    .collect();
                assert_eq!(got, values.iter().map(|v| v << 8).collect::<Vec<_>>());
            } else {
                let got: Vec<f32> = wire
                    .chunks(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let want: Vec<f32> = values.iter().map(|&v| v as f32 / 8_388_608.0).collect();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn float_and_g711_and_extensible() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.wav");
        let mut w = hound::WavWriter::create(
            &path,
            hound::WavSpec {
                channels: 1,
                sample_rate: 48000,
                bits_per_sample: 32,
                sample_format: hound::SampleFormat::Float,
            },
        )
        .unwrap();
        for s in [0.5f32, -0.25, 1.0] {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        let source = load(&path).unwrap();
        assert_eq!(source.encoding, "pcm_f32le");
        assert_eq!(source.total_frames, 3);

        // A hand-made μ-law file, and the same as WAVE_FORMAT_EXTENSIBLE.
        let mulaw = |extensible: bool| {
            let mut fmt = Vec::new();
            let tag = if extensible {
                FORMAT_EXTENSIBLE
            } else {
                FORMAT_MULAW
            };
            fmt.extend_from_slice(&tag.to_le_bytes());
            fmt.extend_from_slice(&1u16.to_le_bytes());
            fmt.extend_from_slice(&8000u32.to_le_bytes());
            fmt.extend_from_slice(&8000u32.to_le_bytes());
            fmt.extend_from_slice(&1u16.to_le_bytes());
            fmt.extend_from_slice(&8u16.to_le_bytes());
            if extensible {
                fmt.extend_from_slice(&22u16.to_le_bytes());
                fmt.extend_from_slice(&8u16.to_le_bytes());
                fmt.extend_from_slice(&4u32.to_le_bytes());
                fmt.extend_from_slice(&FORMAT_MULAW.to_le_bytes());
                fmt.extend_from_slice(&[0; 14]);
            }
            let data = [0xFFu8, 0x7F, 0x00];
            let mut file = b"RIFF\0\0\0\0WAVE".to_vec();
            file.extend_from_slice(b"fmt ");
            file.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
            file.extend_from_slice(&fmt);
            // An odd-sized chunk before data, padded.
            file.extend_from_slice(b"LIST\x03\0\0\0abc\0");
            file.extend_from_slice(b"data");
            file.extend_from_slice(&(data.len() as u32).to_le_bytes());
            file.extend_from_slice(&data);
            file
        };
        for extensible in [false, true] {
            let path = dir.path().join(format!("m{extensible}.wav"));
            std::fs::write(&path, mulaw(extensible)).unwrap();
            let source = load(&path).unwrap();
            assert_eq!(source.encoding, "mulaw");
            assert_eq!(source.chunks[0].payload.as_ref(), &[0xFF, 0x7F, 0x00]);
        }
    }

    #[test]
    fn clear_errors_for_what_the_server_cannot_take() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wav");
        write_hound(&path, spec(3, 16000, 16), &[0; 9]);
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("3 channels"), "{e}");
        write_hound(&path, spec(1, 96000, 16), &[0; 9]);
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("96000 Hz"), "{e}");
        std::fs::write(&path, b"ID3 not audio").unwrap();
        assert!(matches!(
            load(&path),
            Err(SourceError::UnknownFormat { .. })
        ));
        std::fs::write(&path, b"RIFF\0\0\0\0WAVEfmt ").unwrap();
        assert!(load(&path)
            .unwrap_err()
            .to_string()
            .contains("unreadable WAV"));
        let e = load(&dir.path().join("missing.wav")).unwrap_err();
        assert!(matches!(e, SourceError::Read { .. }));
    }

    #[test]
    fn a_cut_short_data_chunk_streams_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.wav");
        write_hound(&path, spec(1, 16000, 16), &[7; 1000]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 101); // half a sample gone too
        std::fs::write(&path, bytes).unwrap();
        let source = load(&path).unwrap();
        assert_eq!(source.total_frames, 1000 - 51);
        assert_eq!(source.notes.len(), 2, "{:?}", source.notes);
    }
}
