//! Per-20 ms-frame cost of each stage of the ingest hot path, one frame per
//! iteration, with the speech fixture as input:
//!
//! - decode: PCM s16 and f32 (16 kHz mono), G.711 μ-law and A-law (8 kHz),
//!   Opus (48 kHz and 16 kHz decode rates; `benches/decode.rs` compares
//!   against libopus called directly);
//! - `Pipeline::push` of one `framing=seq` message (header, jitter buffer,
//!   decode), PCM and Opus: what the session does per message before the sinks
//!   (Opus at 48 kHz as for sinks keeping 48 kHz, and as for sinks all at
//!   16 kHz, when it is decoded straight at 16 kHz);
//! - resampling 48k → 16k mono, one 20 ms block (`benches/resample.rs` has
//!   per-second figures for other rate pairs);
//! - the recorder's `write` of one 20 ms block to a WAV file (16 kHz mono s16,
//!   and 48k Opus recorded at 16k after conversion);
//! - the choice of WAV writer (`wav_writer_*`): the hand-written writer the
//!   recorder used for a while, hound fed whole blocks (what it uses), and
//!   hound one sample at a time.
//!
//! The jitter buffer alone is `benches/jitter.rs`.
//!
//! Run: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use cochlea::sinks::registry::Emitter;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use cochlea::codec::opus::OpusDecoder;
use cochlea::codec::{frame_decoder_for, linear_to_alaw, linear_to_mulaw};
use cochlea::pipeline::convert::{Converter, Layout, OutputFormat};
use cochlea::pipeline::resample::Resampler;
use cochlea::pipeline::{AudioBlock, BlockSamples, Pipeline};
use cochlea::protocol::{Encoding, Framing, StreamFormat};
use cochlea::sinks::recorder::{
    f32_to_i16, samples_to_i16, ChannelsSetting, Recorder, RecorderSettings, SampleFormatSetting,
};
use cochlea::sinks::{Sink, SinkContext};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/speech-16k.wav");

/// The 16 kHz speech fixture as 16-bit samples.
fn speech_16k() -> Vec<i16> {
    let mut reader = hound::WavReader::open(FIXTURE).expect("fixture");
    reader
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .expect("samples")
}

/// The fixture resampled to `rate`, as f32.
fn speech_at(rate: u32) -> Vec<f32> {
    let input: Vec<f32> = speech_16k()
        .iter()
        .map(|&s| f32::from(s) / 32768.0)
        .collect();
    let mut resampler = Resampler::new(16_000, rate, 1).expect("resampler");
    let mut out = Vec::new();
    resampler.process(&input, &mut out);
    resampler.finish(&mut out);
    out
}

/// 20 ms Opus packets of the fixture, encoded at 48 kHz, 32 kb/s.
fn opus_packets() -> Vec<Vec<u8>> {
    let audio = speech_at(48_000);
    let mut encoder =
        opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).expect("encoder");
    encoder
        .set_bitrate(opus::Bitrate::Bits(32_000))
        .expect("bitrate");
    let mut buf = vec![0u8; 4000];
    audio
        .chunks_exact(960)
        .map(|frame| {
            let n = encoder.encode_float(frame, &mut buf).expect("encode");
            buf[..n].to_vec()
        })
        .collect()
}

/// What the 16 kHz sinks ask for (the recorder at 16 kHz, the transcriber):
/// 16 kHz, channels kept.
const OUTPUT_16K: OutputFormat = OutputFormat {
    sample_rate: Some(16_000),
    layout: Layout::Keep,
};

/// 48 kHz mono audio as the pipeline hands it on: 20 ms blocks, in order.
fn mono_blocks_20ms_48k(audio: &[f32]) -> Vec<AudioBlock> {
    audio
        .chunks_exact(960)
        .enumerate()
        .map(|(k, f)| AudioBlock {
            start_frame: 960 * k as u64,
            frames: 960,
            channels: 1,
            samples: BlockSamples::Audio(f.to_vec()),
        })
        .collect()
}

fn format(encoding: Encoding, sample_rate: u32, framing: Framing) -> StreamFormat {
    StreamFormat {
        encoding,
        sample_rate,
        channels: 1,
        framing,
    }
}

fn seq_message(seq: u32, timestamp: u64, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(12 + payload.len());
    message.extend_from_slice(&seq.to_le_bytes());
    message.extend_from_slice(&timestamp.to_le_bytes());
    message.extend_from_slice(payload);
    message
}

fn decode(c: &mut Criterion) {
    let speech = speech_16k();
    let s16: Vec<Vec<u8>> = speech
        .chunks_exact(320)
        .map(|f| f.iter().flat_map(|s| s.to_le_bytes()).collect())
        .collect();
    let f32le: Vec<Vec<u8>> = speech
        .chunks_exact(320)
        .map(|f| {
            f.iter()
                .flat_map(|&s| (f32::from(s) / 32768.0).to_le_bytes())
                .collect()
        })
        .collect();
    let speech_8k: Vec<i16> = speech_at(8_000)
        .iter()
        .map(|&x| (x * 32768.0) as i16)
        .collect();
    let mulaw: Vec<Vec<u8>> = speech_8k
        .chunks_exact(160)
        .map(|f| f.iter().map(|&s| linear_to_mulaw(s)).collect())
        .collect();
    let alaw: Vec<Vec<u8>> = speech_8k
        .chunks_exact(160)
        .map(|f| f.iter().map(|&s| linear_to_alaw(s)).collect())
        .collect();

    let mut group = c.benchmark_group("decode_per_20ms_frame");
    for (name, encoding, rate, frames) in [
        ("pcm_s16le_16k_mono", Encoding::PcmS16le, 16_000, &s16),
        ("pcm_f32le_16k_mono", Encoding::PcmF32le, 16_000, &f32le),
        ("mulaw_8k_mono", Encoding::Mulaw, 8_000, &mulaw),
        ("alaw_8k_mono", Encoding::Alaw, 8_000, &alaw),
    ] {
        let mut decoder =
            frame_decoder_for(&format(encoding, rate, Framing::Raw)).expect("frame decoder");
        let mut out = Vec::with_capacity(320);
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let n = decoder
                    .decode(black_box(&frames[i % frames.len()]), &mut out)
                    .expect("decode");
                i += 1;
                n
            })
        });
    }
    let packets = opus_packets();
    for rate in [48_000, 16_000] {
        let mut decoder = OpusDecoder::new(rate, 1).expect("decoder");
        let mut out = Vec::with_capacity(960);
        let mut i = 0;
        group.bench_function(format!("opus_decode_at_{}k_mono", rate / 1000), |b| {
            b.iter(|| {
                out.clear();
                let n = decoder.decode(black_box(&packets[i % packets.len()]), &mut out);
                i += 1;
                n
            })
        });
    }
    group.finish();
}

/// What the session does with one message before the sinks: seq header,
/// jitter buffer, decode. One message per iteration, in order, on time.
fn pipeline_push(c: &mut Criterion) {
    let speech = speech_16k();
    let pcm: Vec<Vec<u8>> = speech
        .chunks_exact(320)
        .map(|f| f.iter().flat_map(|s| s.to_le_bytes()).collect())
        .collect();
    let packets = opus_packets();
    let mut group = c.benchmark_group("pipeline_push_per_20ms_message");
    // The last field: the one rate every sink wants, if not the stream's.
    for (name, fmt, payloads, frames_per_message, sinks_rate_hz) in [
        (
            "pcm_s16le_16k_seq",
            format(Encoding::PcmS16le, 16_000, Framing::Seq),
            &pcm,
            320u64,
            None,
        ),
        (
            "opus_48k_seq",
            format(Encoding::Opus, 48_000, Framing::Seq),
            &packets,
            960,
            None,
        ),
        (
            "opus_48k_seq_for_16k_sinks",
            format(Encoding::Opus, 48_000, Framing::Seq),
            &packets,
            960,
            Some(16_000),
        ),
    ] {
        let mut pipeline = Pipeline::new(fmt, 10_000).expect("pipeline");
        if let Some(rate) = sinks_rate_hz {
            pipeline.decode_for_sinks(&[Some(rate)]).expect("decoder");
        }
        let mut blocks = Vec::with_capacity(2);
        let mut seq = 0u32;
        let start = Instant::now();
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || {
                    let k = seq as usize;
                    let message = seq_message(
                        seq,
                        u64::from(seq) * frames_per_message,
                        &payloads[k % payloads.len()],
                    );
                    seq += 1;
                    (message, start + Duration::from_millis(20 * u64::from(seq)))
                },
                |(message, now)| {
                    blocks.clear();
                    pipeline.push(message, *now, &mut blocks).expect("push");
                    blocks.len()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn resample(c: &mut Criterion) {
    let audio = speech_at(48_000);
    let mut group = c.benchmark_group("resample_per_20ms_frame");
    let mut resampler = Resampler::new(48_000, 16_000, 1).expect("resampler");
    let mut out = Vec::with_capacity(4096);
    let mut i = 0;
    let frames = audio.len() / 960;
    group.bench_function("48k_to_16k_mono", |b| {
        b.iter(|| {
            out.clear();
            let k = i % frames;
            resampler.process(black_box(&audio[k * 960..(k + 1) * 960]), &mut out);
            i += 1;
            out.len()
        })
    });
    group.finish();
}

/// A recorder on a fresh file in `dir`, for a stream of `format`.
fn recorder(dir: &Path, n: usize, format: StreamFormat, output: OutputFormat) -> Recorder {
    let context = SinkContext {
        session_id: format!("bench-{n}"),
        format,
        metadata: Default::default(),
        started_at: SystemTime::now(),
        record_format: None,
        opus_pre_skip: 0,
    };
    let settings = RecorderSettings {
        sample_rate: output.sample_rate,
        channels: ChannelsSetting::Keep,
        dir: dir.to_path_buf(),
        flush_interval: Duration::from_millis(1000),
        fsync: false,
        sample_format: SampleFormatSetting::Auto,
        instance: None,
        uploader: None,
        format: Default::default(),
        opus_bitrate_bps: 32_000,
    };
    // Nothing is asked of the recorder that it reports (no flush, no
    // commit): the receiving end may go.
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    Recorder::create(&context, &settings, output, Emitter::new(0, events)).expect("recorder")
}

/// The recorder's `write` of 20 ms blocks. Files are rotated every 1,000
/// seconds of audio (outside the timing), so a long run stays far from the
/// WAV size limit and the disk stays small; the WAV header is rewritten once
/// per second of wall time, as in a live stream (`recorder.flush_interval_ms`).
fn wav_write(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let speech: Vec<f32> = speech_16k()
        .iter()
        .map(|&s| f32::from(s) / 32768.0)
        .collect();
    let blocks: Vec<AudioBlock> = speech
        .chunks_exact(320)
        .enumerate()
        .map(|(k, f)| AudioBlock {
            start_frame: 320 * k as u64,
            frames: 320,
            channels: 1,
            samples: BlockSamples::Audio(f.to_vec()),
        })
        .collect();
    const ROTATE_EVERY: u64 = 50_000;
    let mut group = c.benchmark_group("wav_write_per_20ms_frame");
    let mut files = 0;
    group.bench_function("s16_16k_mono", |b| {
        b.iter_custom(|iters| {
            let fmt = format(Encoding::PcmS16le, 16_000, Framing::Seq);
            let mut sink = Box::new(recorder(dir.path(), files, fmt, OutputFormat::NATIVE));
            files += 1;
            let mut elapsed = Duration::ZERO;
            let mut written = 0;
            while written < iters {
                let batch = (iters - written).min(ROTATE_EVERY);
                let t0 = Instant::now();
                for k in 0..batch {
                    let block = &blocks[(k as usize) % blocks.len()];
                    sink.write(black_box(block), Instant::now()).expect("write");
                }
                elapsed += t0.elapsed();
                written += batch;
                let _ = sink.finish();
                sink = Box::new(recorder(dir.path(), files, fmt, OutputFormat::NATIVE));
                files += 1;
            }
            let _ = sink.finish();
            for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
            elapsed
        })
    });
    group.finish();

    // Opus decoded at 48 kHz and recorded at 16 kHz: the conversion the
    // session runs once per message, then the recorder's write.
    let audio = speech_at(48_000);
    let opus_blocks = mono_blocks_20ms_48k(&audio);
    let to_16k = OUTPUT_16K;
    let mut group = c.benchmark_group("convert_and_wav_write_per_20ms_frame");
    group.bench_function("48k_to_16k_s16_mono", |b| {
        b.iter_custom(|iters| {
            let fmt = format(Encoding::Opus, 48_000, Framing::Seq);
            let mut converter = Converter::new(48_000, 1, to_16k).expect("converter");
            let mut sink = Box::new(recorder(dir.path(), files, fmt, to_16k));
            files += 1;
            let mut converted = Vec::new();
            let mut elapsed = Duration::ZERO;
            let mut written = 0;
            while written < iters {
                let batch = (iters - written).min(ROTATE_EVERY);
                let t0 = Instant::now();
                for k in 0..batch {
                    // The converter keeps its own media position.
                    let block = &opus_blocks[(k as usize) % opus_blocks.len()];
                    converter.convert(black_box(block), &mut converted);
                    for out in converted.drain(..) {
                        sink.write(&out, Instant::now()).expect("write");
                    }
                }
                elapsed += t0.elapsed();
                written += batch;
                let _ = sink.finish();
                sink = Box::new(recorder(dir.path(), files, fmt, to_16k));
                files += 1;
            }
            let _ = sink.finish();
            for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
            elapsed
        })
    });
    group.finish();
}

/// The recorder's own WAV writer of commits 3e114de and 9c6614c, kept here
/// only to measure the choice of writer against (the recorder went back to
/// hound): a byte buffer the block is converted straight into, written out
/// at 16 KiB, the header patched with `pwrite` at each checkpoint.
struct OwnWav {
    file: std::fs::File,
    buffer: Vec<u8>,
    data_bytes: u64,
}

impl OwnWav {
    fn create(path: &Path) -> OwnWav {
        use std::io::Write;
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        // The same 44-byte header hound writes.
        let mut header = std::io::Cursor::new(Vec::new());
        drop(hound::WavWriter::new(&mut header, spec).expect("header"));
        let mut file = std::fs::File::create(path).expect("create");
        file.write_all(&header.into_inner()).expect("header");
        OwnWav {
            file,
            buffer: Vec::new(),
            data_bytes: 0,
        }
    }

    fn write(&mut self, samples: &[f32]) {
        use std::io::Write;
        let bytes = samples.len() * 2;
        if !self.buffer.is_empty() && self.buffer.len() + bytes > 16 * 1024 {
            self.file.write_all(&self.buffer).expect("write");
            self.buffer.clear();
        }
        if self.buffer.capacity() == 0 {
            self.buffer.reserve_exact(16 * 1024);
        }
        let start = self.buffer.len();
        self.buffer.resize(start + bytes, 0);
        for (out, &s) in self.buffer[start..].chunks_exact_mut(2).zip(samples) {
            out.copy_from_slice(&f32_to_i16(s).to_le_bytes());
        }
        self.data_bytes += bytes as u64;
    }

    fn checkpoint(&mut self) {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        self.file.write_all(&self.buffer).expect("write");
        self.buffer.clear();
        let riff = (self.data_bytes + 36) as u32;
        self.file
            .write_all_at(&riff.to_le_bytes(), 4)
            .expect("pwrite");
        let data = self.data_bytes as u32;
        self.file
            .write_all_at(&data.to_le_bytes(), 40)
            .expect("pwrite");
    }
}

/// The three ways of writing 16-bit WAV the recorder could use, per 20 ms
/// block (320 samples at 16 kHz), a checkpoint (header rewritten) every 50
/// blocks as at the default 1 s `flush_interval_ms`:
///
/// - `a_own_writer`: [`OwnWav`] above;
/// - `b_hound_i16_writer`: hound's `WavWriter` over a 16 KiB `BufWriter`, the
///   block converted by the same vectorized loop into a reused `Vec<i16>`,
///   then `get_i16_writer(n)` + `write_sample_unchecked` + its `flush`
///   (`b_hound_i16_writer_checked`: the same with the bounds-checked
///   `write_sample`, what the recorder uses), `WavWriter::flush` to
///   checkpoint;
/// - `c_hound_naive`: `WavWriter::write_sample` per sample, `round` per sample.
///
/// Then the same after a 48k → 16k conversion of each 20 ms block (the
/// conversion is identical in all three; it is what Opus streams recorded at
/// 16 kHz pay per message).
fn wav_writer_choice(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let speech: Vec<f32> = speech_16k()
        .iter()
        .map(|&s| f32::from(s) / 32768.0)
        .collect();
    let frames: Vec<&[f32]> = speech.chunks_exact(320).collect();
    let audio_48k = speech_at(48_000);
    let blocks_48k = mono_blocks_20ms_48k(&audio_48k);
    let to_16k = OUTPUT_16K;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    // A new file per 50,000 blocks (1,000 s of audio), outside the timing.
    const ROTATE_EVERY: u64 = 50_000;
    const CHECKPOINT_EVERY: u64 = 50;

    #[derive(Clone, Copy)]
    enum Way {
        Own,
        HoundI16,
        HoundI16Checked,
        HoundNaive,
    }
    enum Writer {
        Own(OwnWav),
        Hound(hound::WavWriter<std::io::BufWriter<std::fs::File>>),
    }
    let mut files = 0usize;
    let mut open = |way: Way| {
        files += 1;
        let path = dir.path().join(format!("w{files}.wav"));
        match way {
            Way::Own => Writer::Own(OwnWav::create(&path)),
            _ => {
                let file = std::fs::File::create(&path).expect("create");
                let buffered = std::io::BufWriter::with_capacity(16 * 1024, file);
                Writer::Hound(hound::WavWriter::new(buffered, spec).expect("hound"))
            }
        }
    };
    let mut converted: Vec<i16> = Vec::new();
    let mut write = |writer: &mut Writer, way: Way, block: &[f32], checkpoint: bool| {
        match (writer, way) {
            (Writer::Own(w), _) => {
                w.write(block);
                if checkpoint {
                    w.checkpoint();
                }
            }
            (Writer::Hound(w), way) => {
                match way {
                    Way::HoundI16 | Way::HoundI16Checked => {
                        samples_to_i16(block, &mut converted);
                        let mut s = w.get_i16_writer(converted.len() as u32);
                        if matches!(way, Way::HoundI16) {
                            for &x in &converted {
                                // SAFETY: exactly `converted.len()` samples
                                // were reserved by `get_i16_writer`.
                                unsafe { s.write_sample_unchecked(x) };
                            }
                        } else {
                            for &x in &converted {
                                s.write_sample(x);
                            }
                        }
                        s.flush().expect("flush");
                    }
                    _ => {
                        for &x in block {
                            let v = (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
                            w.write_sample(v).expect("write");
                        }
                    }
                }
                if checkpoint {
                    w.flush().expect("flush");
                }
            }
        }
    };
    let ways = [
        ("a_own_writer", Way::Own),
        ("b_hound_i16_writer", Way::HoundI16),
        ("b_hound_i16_writer_checked", Way::HoundI16Checked),
        ("c_hound_naive", Way::HoundNaive),
    ];

    let mut group = c.benchmark_group("wav_writer_per_20ms_frame_s16_16k_mono");
    for (name, way) in ways {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let batch = (iters - done).min(ROTATE_EVERY);
                    let mut writer = open(way);
                    let t0 = Instant::now();
                    for k in 0..batch {
                        let block = frames[(k as usize) % frames.len()];
                        write(
                            &mut writer,
                            way,
                            black_box(block),
                            k % CHECKPOINT_EVERY == 49,
                        );
                    }
                    elapsed += t0.elapsed();
                    done += batch;
                }
                for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
                    let _ = std::fs::remove_file(entry.path());
                }
                elapsed
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("wav_writer_per_20ms_frame_48k_to_16k_mono");
    for (name, way) in ways {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut converter = Converter::new(48_000, 1, to_16k).expect("converter");
                let mut out = Vec::new();
                let mut elapsed = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let batch = (iters - done).min(ROTATE_EVERY);
                    let mut writer = open(way);
                    let t0 = Instant::now();
                    for k in 0..batch {
                        let block = &blocks_48k[(k as usize) % blocks_48k.len()];
                        converter.convert(black_box(block), &mut out);
                        for o in out.drain(..) {
                            if let BlockSamples::Audio(samples) = &o.samples {
                                write(&mut writer, way, samples, k % CHECKPOINT_EVERY == 49);
                            }
                        }
                    }
                    elapsed += t0.elapsed();
                    done += batch;
                }
                for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
                    let _ = std::fs::remove_file(entry.path());
                }
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    decode,
    pipeline_push,
    resample,
    wav_write,
    wav_writer_choice
);
criterion_main!(benches);
