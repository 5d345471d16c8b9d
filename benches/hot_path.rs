//! Per-20 ms-frame cost of each stage of the ingest hot path, one frame per
//! iteration, with the speech fixture as input:
//!
//! - decode: PCM s16 and f32 (16 kHz mono), G.711 μ-law and A-law (8 kHz),
//!   Opus (48 kHz and 16 kHz decode rates; `benches/decode.rs` compares
//!   against libopus called directly);
//! - `Pipeline::push` of one `framing=seq` message (header, jitter buffer,
//!   decode), PCM and Opus: what the session does per message before the sinks;
//! - resampling 48k → 16k mono, one 20 ms block (`benches/resample.rs` has
//!   per-second figures for other rate pairs);
//! - the recorder's `write` of one 20 ms block to a WAV file (16 kHz mono s16,
//!   and 48k Opus recorded at 16k after conversion).
//!
//! The jitter buffer alone is `benches/jitter.rs`.
//!
//! Run: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use cochlea::codec::opus::OpusDecoder;
use cochlea::codec::{frame_decoder_for, linear_to_alaw, linear_to_mulaw};
use cochlea::pipeline::convert::{Converter, Layout, OutputFormat};
use cochlea::pipeline::resample::Resampler;
use cochlea::pipeline::{AudioBlock, BlockSamples, Pipeline};
use cochlea::protocol::{Encoding, Framing, StreamFormat};
use cochlea::sinks::recorder::{ChannelsSetting, Recorder, RecorderSettings, SampleFormatSetting};
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
    for (name, fmt, payloads, frames_per_message) in [
        (
            "pcm_s16le_16k_seq",
            format(Encoding::PcmS16le, 16_000, Framing::Seq),
            &pcm,
            320u64,
        ),
        (
            "opus_48k_seq",
            format(Encoding::Opus, 48_000, Framing::Seq),
            &packets,
            960,
        ),
    ] {
        let mut pipeline = Pipeline::new(fmt, 10_000).expect("pipeline");
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
    };
    let settings = RecorderSettings {
        sample_rate: output.sample_rate,
        channels: ChannelsSetting::Keep,
        dir: dir.to_path_buf(),
        flush_interval: Duration::from_millis(1000),
        fsync: false,
        sample_format: SampleFormatSetting::Auto,
    };
    Recorder::create(&context, &settings, output).expect("recorder")
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
    let opus_blocks: Vec<AudioBlock> = audio
        .chunks_exact(960)
        .enumerate()
        .map(|(k, f)| AudioBlock {
            start_frame: 960 * k as u64,
            frames: 960,
            channels: 1,
            samples: BlockSamples::Audio(f.to_vec()),
        })
        .collect();
    let to_16k = OutputFormat {
        sample_rate: Some(16_000),
        layout: Layout::Keep,
    };
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

criterion_group!(benches, decode, pipeline_push, resample, wav_write);
criterion_main!(benches);
