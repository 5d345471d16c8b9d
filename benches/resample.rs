//! Cost of the resampling stage per second of streamed audio, fed the way the
//! pipeline feeds it: 20 ms blocks, one call each, output into a reused Vec.

use std::hint::black_box;

use cochlea::pipeline::resample::Resampler;
use criterion::{criterion_group, criterion_main, Criterion};

fn one_second(rate: u32, channels: usize) -> Vec<f32> {
    let frames = rate as usize;
    (0..frames * channels)
        .map(|i| {
            let t = (i / channels) as f32 / rate as f32;
            0.3 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
                + 0.2 * (2.0 * std::f32::consts::PI * 3_100.0 * t).sin()
        })
        .collect()
}

fn bench_pair(c: &mut Criterion, name: &str, in_rate: u32, out_rate: u32, channels: usize) {
    let input = one_second(in_rate, channels);
    let chunk = in_rate as usize / 50 * channels;
    let mut resampler = Resampler::new(in_rate, out_rate, channels).unwrap();
    let mut out = Vec::with_capacity(2 * out_rate as usize * channels);
    c.bench_function(name, |b| {
        b.iter(|| {
            // Steady-state streaming: the resampler keeps its state between
            // iterations, as it does between seconds of a live stream.
            out.clear();
            for piece in input.chunks(chunk) {
                resampler.process(black_box(piece), &mut out);
            }
            black_box(out.len())
        })
    });
}

fn benches(c: &mut Criterion) {
    bench_pair(
        c,
        "resample_48k_to_16k_mono_per_second_of_audio",
        48_000,
        16_000,
        1,
    );
    bench_pair(
        c,
        "resample_8k_to_16k_mono_per_second_of_audio",
        8_000,
        16_000,
        1,
    );
    bench_pair(
        c,
        "resample_44k1_to_16k_mono_per_second_of_audio",
        44_100,
        16_000,
        1,
    );
    bench_pair(
        c,
        "resample_48k_to_16k_stereo_per_second_of_audio",
        48_000,
        16_000,
        2,
    );
}

criterion_group!(resample, benches);
criterion_main!(resample);
