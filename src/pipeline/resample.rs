//! Sample-rate conversion between the client's rate and a sink's rate.
//!
//! Fixed ratios only, so the synchronous FFT resampler of rubato 5 does the
//! work: it is exact in length, linear phase and several times cheaper than
//! the asynchronous sinc resampler. The wrapper adds what the pipeline needs
//! on top of rubato: any number of input frames per call, delay compensation
//! (output frame k is input time k / out_rate) and an exact total length
//! (`round(frames_in * out_rate / in_rate)`) once the stream is finished.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler as _, WindowFunction};

/// Lowest sample rate accepted on either side.
pub const MIN_RATE: u32 = 8_000;
/// Highest sample rate accepted on either side.
pub const MAX_RATE: u32 = 48_000;

/// Wanted FFT block length in milliseconds of input. rubato's filter is as
/// long as the block, so this sets the transition band, and with it how close
/// to Nyquist the passband stays flat. Measured with the sweep test, 8k -> 16k
/// (the hardest pair) reaches 54 dB SNR at 15 ms, 77 dB at 17 ms and 124 dB at
/// 20 ms. Latency is one block of buffering plus half a block of filter delay.
const BLOCK_MS: u32 = 20;

/// Plain Blackman-Harris (sidelobes about -92 dB): its transition band is
/// narrower than that of the squared window rubato's `Fft::new` uses, which at
/// 20 ms blocks gave only 35 dB SNR for 8k -> 16k.
const WINDOW: WindowFunction = WindowFunction::BlackmanHarris;

/// Kept apart from the (infallible) runtime path, as rubato does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResampleError {
    #[error("cannot build resampler: {0}")]
    Construction(String),
}

/// Streaming resampler for interleaved f32 audio. `Send`, not shared.
pub struct Resampler {
    in_rate: u32,
    out_rate: u32,
    channels: usize,
    /// `None` when the rates are equal: samples are copied unchanged.
    engine: Option<Box<Engine>>,
    /// Passthrough only: samples of an incomplete frame, until the rest comes.
    carry: [f32; 2],
    carry_len: usize,
    /// Samples received since the stream started (a trailing partial frame is
    /// not counted as a frame).
    samples_in: u64,
}

/// The FFT path: rubato needs whole blocks, callers send any amount.
struct Engine {
    core: Core,
    /// One block of interleaved input being gathered; `pending_len` samples valid.
    pending: Box<[f32]>,
    pending_len: usize,
}

struct Core {
    fft: Fft<f32>,
    channels: usize,
    /// Input frames per block.
    block_in: usize,
    /// Output frames per block.
    block_out: usize,
    /// Frames of rubato's start-up delay still to be dropped.
    to_drop: usize,
    delay: usize,
    /// One block of interleaved output.
    out_buf: Box<[f32]>,
    /// Output frames handed to the caller since the stream started.
    emitted: u64,
}

impl Resampler {
    /// `in_rate`, `out_rate`: 8000..=48000; `channels`: 1 or 2. Equal rates
    /// give an exact passthrough.
    pub fn new(in_rate: u32, out_rate: u32, channels: usize) -> Result<Self, ResampleError> {
        for (side, rate) in [("input", in_rate), ("output", out_rate)] {
            if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                return Err(ResampleError::Construction(format!(
                    "{side} rate {rate} Hz is outside {MIN_RATE}..={MAX_RATE}"
                )));
            }
        }
        if !(1..=2).contains(&channels) {
            return Err(ResampleError::Construction(format!(
                "{channels} channels (1 or 2 supported)"
            )));
        }
        let engine = if in_rate == out_rate {
            None
        } else {
            Some(Box::new(Engine::new(in_rate, out_rate, channels)?))
        };
        Ok(Self {
            in_rate,
            out_rate,
            channels,
            engine,
            carry: [0.0; 2],
            carry_len: 0,
            samples_in: 0,
        })
    }

    pub fn in_rate(&self) -> u32 {
        self.in_rate
    }

    pub fn out_rate(&self) -> u32 {
        self.out_rate
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Algorithmic delay in output frames that rubato's FFT block adds (and
    /// that `process` compensates by dropping it); 0 for passthrough.
    pub fn output_delay(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.core.delay)
    }

    /// Input frames gathered before a block is resampled (the buffering part
    /// of the latency); 1 for passthrough.
    pub fn block_frames(&self) -> usize {
        self.engine.as_ref().map_or(1, |e| e.core.block_in)
    }

    /// Takes any number of interleaved input samples (a frame may even be
    /// split between calls) and appends the resampled interleaved output that
    /// is ready to `out`. Output comes one block (about 20 ms, see
    /// [`Self::block_frames`]) at a time, never more than the input so far covers.
    pub fn process(&mut self, input: &[f32], out: &mut Vec<f32>) {
        self.samples_in += input.len() as u64;
        match self.engine.as_deref_mut() {
            Some(engine) => engine.push(input, out),
            None => passthrough(
                self.channels,
                &mut self.carry,
                &mut self.carry_len,
                input,
                out,
            ),
        }
    }

    /// Ends the stream: flushes the tail so that the whole stream's output is
    /// exactly `round(input_frames * out_rate / in_rate)` frames, then resets
    /// for a new stream. A trailing incomplete frame is dropped.
    pub fn finish(&mut self, out: &mut Vec<f32>) {
        let frames_in = self.samples_in / self.channels as u64;
        if let Some(engine) = self.engine.as_deref_mut() {
            let target = expected_output_frames(frames_in, self.in_rate, self.out_rate);
            engine.finish(target, out);
        }
        self.carry_len = 0;
        self.samples_in = 0;
    }
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("in_rate", &self.in_rate)
            .field("out_rate", &self.out_rate)
            .field("channels", &self.channels)
            .field("block_frames", &self.block_frames())
            .field("output_delay", &self.output_delay())
            .finish()
    }
}

/// `round(frames * out / in)`, half up, in integers so it cannot drift.
fn expected_output_frames(frames: u64, in_rate: u32, out_rate: u32) -> u64 {
    let num = 2 * u128::from(frames) * u128::from(out_rate) + u128::from(in_rate);
    (num / (2 * u128::from(in_rate))) as u64
}

fn passthrough(
    channels: usize,
    carry: &mut [f32; 2],
    carry_len: &mut usize,
    mut input: &[f32],
    out: &mut Vec<f32>,
) {
    if *carry_len > 0 {
        let take = (channels - *carry_len).min(input.len());
        carry[*carry_len..*carry_len + take].copy_from_slice(&input[..take]);
        *carry_len += take;
        input = &input[take..];
        if *carry_len < channels {
            return;
        }
        out.extend_from_slice(&carry[..channels]);
        *carry_len = 0;
    }
    let whole = input.len() - input.len() % channels;
    out.extend_from_slice(&input[..whole]);
    let rest = &input[whole..];
    carry[..rest.len()].copy_from_slice(rest);
    *carry_len = rest.len();
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Engine {
    fn new(in_rate: u32, out_rate: u32, channels: usize) -> Result<Self, ResampleError> {
        // rubato's blocks are whole multiples of the smallest block pair
        // (in/gcd, out/gcd). Both blocks must be even: rubato reports the
        // delay as out_block / 2 while its filter is centred on in_block / 2
        // (rounded down), so an odd block on either side shifts the output by
        // half a sample (measured: 11025 -> 16000 fell to 2 dB SNR). The pair
        // is coprime, so one of them is odd and the multiple must be even.
        let g = gcd(in_rate, out_rate);
        let min_in = (in_rate / g) as usize;
        let wanted = (in_rate * BLOCK_MS / 1000) as usize;
        let k = wanted.div_ceil(min_in).max(1).next_multiple_of(2);
        let fft = Fft::<f32>::new_custom(
            in_rate as usize,
            out_rate as usize,
            k * min_in,
            1,
            channels,
            WINDOW,
            FixedSync::Both,
        )
        .map_err(|e| ResampleError::Construction(e.to_string()))?;
        // Trust the sizes rubato reports over our own arithmetic.
        let block_in = fft.input_frames_next();
        let block_out = fft.output_frames_next();
        let delay = fft.output_delay();
        if block_in % 2 == 1 || block_out % 2 == 1 || fft.output_frames_max() != block_out {
            return Err(ResampleError::Construction(format!(
                "unexpected block sizes {block_in} -> {block_out}"
            )));
        }
        Ok(Self {
            core: Core {
                fft,
                channels,
                block_in,
                block_out,
                to_drop: delay,
                delay,
                out_buf: vec![0.0; block_out * channels].into_boxed_slice(),
                emitted: 0,
            },
            pending: vec![0.0; block_in * channels].into_boxed_slice(),
            pending_len: 0,
        })
    }

    fn push(&mut self, mut input: &[f32], out: &mut Vec<f32>) {
        let block = self.pending.len();
        if self.pending_len > 0 {
            let take = (block - self.pending_len).min(input.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&input[..take]);
            self.pending_len += take;
            input = &input[take..];
            if self.pending_len < block {
                return;
            }
            self.core.run(&self.pending, None, u64::MAX, out);
            self.pending_len = 0;
        }
        // Whole blocks straight from the caller's slice: no extra copy.
        let mut blocks = input.chunks_exact(block);
        for chunk in &mut blocks {
            self.core.run(chunk, None, u64::MAX, out);
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    fn finish(&mut self, target: u64, out: &mut Vec<f32>) {
        let channels = self.core.channels;
        // The last partial block, padded with silence by rubato...
        if self.pending_len >= channels && self.core.emitted < target {
            let frames = self.pending_len / channels;
            let pending = &self.pending[..frames * channels];
            self.core.run(pending, Some(frames), target, out);
        }
        // ...then silence until the delayed tail has come out. Each round
        // yields a whole block, so this ends within a couple of rounds.
        while self.core.emitted < target {
            self.core.run(&[], Some(0), target, out);
        }
        self.pending_len = 0;
        self.core.fft.reset();
        self.core.to_drop = self.core.delay;
        self.core.emitted = 0;
    }
}

impl Core {
    /// Resamples one block (`partial`: only that many frames of `input` are
    /// real, the rest is silence) and appends it, minus the start-up delay
    /// still to drop, without going past `limit` frames in total.
    fn run(&mut self, input: &[f32], partial: Option<usize>, limit: u64, out: &mut Vec<f32>) {
        let ch = self.channels;
        let indexing = partial.map(|n| Indexing::new().partial_len(n));
        let produced = match (
            InterleavedSlice::new(input, ch, input.len() / ch),
            InterleavedSlice::new_mut(&mut self.out_buf[..], ch, self.block_out),
        ) {
            (Ok(buf_in), Ok(mut buf_out)) => self
                .fft
                .process_into_buffer(&buf_in, &mut buf_out, indexing.as_ref())
                .map(|(_, frames_out)| frames_out.min(self.block_out))
                .ok(),
            _ => None,
        };
        // Cannot happen with the sizes fixed at construction. Should it ever,
        // emit silence rather than panic, so media time stays right.
        let produced = produced.unwrap_or_else(|| {
            debug_assert!(false, "rubato rejected a block of the size it asked for");
            self.out_buf.fill(0.0);
            self.block_out
        });
        let skip = self.to_drop.min(produced);
        self.to_drop -= skip;
        let room = limit.saturating_sub(self.emitted);
        let keep = ((produced - skip) as u64).min(room) as usize;
        out.extend_from_slice(&self.out_buf[skip * ch..(skip + keep) * ch]);
        self.emitted += keep as u64;
    }
}

/// Average of left and right, appended to `out`. A trailing odd sample is ignored.
pub fn downmix_to_mono(interleaved_stereo: &[f32], out: &mut Vec<f32>) {
    out.extend(
        interleaved_stereo
            .chunks_exact(2)
            .map(|lr| 0.5 * (lr[0] + lr[1])),
    );
}

/// Appends channel c of `interleaved` to `outs[c]`. Only whole frames are
/// split; channels beyond `outs.len()` are dropped. `channels == 0` is a no-op.
pub fn split_channels(interleaved: &[f32], channels: usize, outs: &mut [Vec<f32>]) {
    if channels == 0 {
        return;
    }
    for (c, dest) in outs.iter_mut().enumerate().take(channels) {
        dest.extend(interleaved.chunks_exact(channels).map(|frame| frame[c]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    const PAIRS: [(u32, u32); 4] = [
        (48_000, 16_000),
        (8_000, 16_000),
        (44_100, 16_000),
        (16_000, 48_000),
    ];

    /// Small LCG so the tests need no `rand`.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as u32
        }
        fn below(&mut self, n: usize) -> usize {
            self.next() as usize % n
        }
        fn sample(&mut self) -> f32 {
            (self.next() as f32 / (1u64 << 31) as f32) - 0.5
        }
    }

    fn run_whole(r: &mut Resampler, input: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        r.process(input, &mut out);
        r.finish(&mut out);
        out
    }

    /// Feeds `input` in random pieces of 0..=max_piece samples (frames may be
    /// split between calls), then finishes.
    fn run_pieces(r: &mut Resampler, input: &[f32], seed: u64, max_piece: usize) -> Vec<f32> {
        let mut lcg = Lcg(seed);
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let n = lcg.below(max_piece + 1).min(rest.len());
            r.process(&rest[..n], &mut out);
            rest = &rest[n..];
        }
        r.finish(&mut out);
        out
    }

    fn rms_db(x: &[f32]) -> f64 {
        let p = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len().max(1) as f64;
        10.0 * p.log10()
    }

    #[test]
    fn is_send() {
        fn send<T: Send>() {}
        send::<Resampler>();
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(Resampler::new(7_999, 16_000, 1).is_err());
        assert!(Resampler::new(16_000, 48_001, 1).is_err());
        assert!(Resampler::new(16_000, 16_000, 0).is_err());
        assert!(Resampler::new(16_000, 8_000, 3).is_err());
        let err = Resampler::new(96_000, 16_000, 1).err().unwrap();
        assert!(matches!(err, ResampleError::Construction(_)));
        assert!(err.to_string().contains("96000"));
    }

    /// A linear sweep compared with the same sweep evaluated at output times.
    fn sweep_snr_db(in_rate: u32, out_rate: u32) -> f64 {
        let secs = 3.0;
        let low = f64::from(in_rate.min(out_rate));
        // 0.45 * out_rate where the input can carry it; upsampling from a
        // lower rate caps at just under the input's Nyquist rate.
        let f0 = 100.0;
        let f1 = (0.45 * f64::from(out_rate)).min(0.49 * low);
        let phase = |t: f64| 2.0 * PI * (f0 * t + (f1 - f0) * t * t / (2.0 * secs));
        let freq = |t: f64| f0 + (f1 - f0) * t / secs;
        let amp = 0.5;
        let n_in = (secs * f64::from(in_rate)) as usize;
        let input: Vec<f32> = (0..n_in)
            .map(|n| (amp * phase(n as f64 / f64::from(in_rate)).sin()) as f32)
            .collect();
        let mut r = Resampler::new(in_rate, out_rate, 1).unwrap();
        let out = run_pieces(&mut r, &input, 7, 2000);
        assert_eq!(
            out.len() as u64,
            expected_output_frames(n_in as u64, in_rate, out_rate)
        );
        let passband = 0.9 * low / 2.0;
        let (mut sig, mut err, mut used) = (0.0, 0.0, 0usize);
        for (k, &y) in out.iter().enumerate() {
            let t = k as f64 / f64::from(out_rate);
            if t < 0.05 || t > secs - 0.05 || freq(t) > passband {
                continue;
            }
            let ideal = amp * phase(t).sin();
            sig += ideal * ideal;
            err += (f64::from(y) - ideal).powi(2);
            used += 1;
        }
        assert!(used > out.len() / 2, "too few samples compared: {used}");
        10.0 * (sig / err).log10()
    }

    #[test]
    fn sweep_snr_in_passband() {
        for (i, o) in PAIRS {
            let snr = sweep_snr_db(i, o);
            eprintln!("sweep {i} -> {o}: SNR {snr:.1} dB in the passband");
            assert!(snr >= 60.0, "{i} -> {o}: SNR {snr:.1} dB");
        }
    }

    /// Ratios whose smallest block pair is awkward (odd output block, or
    /// coprime rates) get longer blocks, hence more delay, but stay exact.
    #[test]
    fn awkward_ratios_stay_exact() {
        for (i, o) in [
            (8_000, 44_100),
            (11_025, 16_000),
            (48_000, 8_000),
            (44_100, 48_000),
        ] {
            let snr = sweep_snr_db(i, o);
            let r = Resampler::new(i, o, 1).unwrap();
            eprintln!(
                "sweep {i} -> {o}: SNR {snr:.1} dB; block {} in frames, delay {} out frames",
                r.block_frames(),
                r.output_delay()
            );
            assert!(snr >= 60.0, "{i} -> {o}: SNR {snr:.1} dB");
        }
        // Coprime rates: one block is a whole second. Slow to start, still exact.
        let mut r = Resampler::new(47_999, 48_000, 2).unwrap();
        let input = vec![0.25f32; 2 * 1_001];
        let out = run_pieces(&mut r, &input, 3, 300);
        assert_eq!(
            out.len(),
            2 * expected_output_frames(1_001, 47_999, 48_000) as usize
        );
    }

    #[test]
    fn stopband_tone_is_rejected() {
        let (i, o) = (48_000, 16_000);
        for tone in [12_000.0, 9_000.0, 8_400.0] {
            // 10 ms raised-cosine fades, so no switch-on click (broadband, part
            // of it in the passband) hides what the filter does to the tone.
            let fade = f64::from(i) / 100.0;
            let n_in = i as usize;
            let input: Vec<f32> = (0..n_in)
                .map(|n| {
                    let edge = (n.min(n_in - 1 - n) as f64 / fade).min(1.0);
                    let gain = 0.5 - 0.5 * (PI * edge).cos();
                    (0.5 * gain * (2.0 * PI * tone * n as f64 / f64::from(i)).sin()) as f32
                })
                .collect();
            let mut r = Resampler::new(i, o, 1).unwrap();
            let out = run_pieces(&mut r, &input, 1, 1000);
            let rel = rms_db(&out) - rms_db(&input);
            eprintln!("{tone} Hz tone 48k -> 16k: output {rel:.1} dB relative to input");
            assert!(rel <= -60.0, "{tone} Hz: stopband only {rel:.1} dB");
        }
    }

    #[test]
    fn exact_length_for_any_piece_sizes() {
        let lengths = [0usize, 1, 159, 160, 16_000, 48_001, 12_345];
        let mut lcg = Lcg(99);
        for (i, o) in PAIRS.into_iter().chain([(16_000, 16_000), (8_000, 44_100)]) {
            for channels in [1, 2] {
                let mut r = Resampler::new(i, o, channels).unwrap();
                for &n in &lengths {
                    let input: Vec<f32> = (0..n * channels).map(|_| lcg.sample()).collect();
                    let seed = lcg.next().into();
                    let out = run_pieces(&mut r, &input, seed, 1500);
                    let want = expected_output_frames(n as u64, i, o) as usize;
                    assert_eq!(out.len(), want * channels, "{i}->{o} ch{channels} n={n}");
                }
            }
        }
    }

    #[test]
    fn impulse_lands_on_time() {
        for (i, o) in PAIRS {
            let (mut worst, mut worst_frac) = (0i64, 0.0f64);
            // 0 and the last frame check the very edges of the stream; for the
            // last one round(t*out/in) can equal the output length, hence the ±1.
            for t in [0usize, 1, 1000, 4801, 12_345, 23_999] {
                let mut input = vec![0.0f32; 24_000];
                input[t] = 0.9;
                let mut r = Resampler::new(i, o, 1).unwrap();
                let out = run_pieces(&mut r, &input, t as u64, 700);
                let peak = out
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                    .map(|(k, _)| k)
                    .unwrap();
                let want = expected_output_frames(t as u64, i, o) as i64;
                assert!(
                    (peak as i64 - want).abs() <= 1,
                    "{i}->{o}: impulse at {t} peaked at {peak}, expected {want}"
                );
                worst = worst.max((peak as i64 - want).abs());
            }
            // Sub-frame timing: a smooth click (Gaussian, sigma 0.5 ms, far
            // inside every passband) keeps its shape through the resampler, so
            // the centroid of the output lands exactly where the click was.
            let sigma = 0.0005;
            let secs = 24_000.0 / f64::from(i);
            for centre in [0.004, 0.0123456, secs / 2.0 + 1e-5, secs - 0.004] {
                let input: Vec<f32> = (0..24_000)
                    .map(|k| {
                        let dt = k as f64 / f64::from(i) - centre;
                        (0.8 * (-0.5 * (dt / sigma).powi(2)).exp()) as f32
                    })
                    .collect();
                let mut r = Resampler::new(i, o, 1).unwrap();
                let out = run_pieces(&mut r, &input, 17, 700);
                let (mut m0, mut m1) = (0.0, 0.0);
                for (k, &y) in out.iter().enumerate() {
                    if (k as f64 / f64::from(o) - centre).abs() < 7.0 * sigma {
                        m0 += f64::from(y);
                        m1 += f64::from(y) * k as f64;
                    }
                }
                assert!(m0 > 1.0, "{i}->{o}: click at {centre} s lost");
                worst_frac = worst_frac.max((m1 / m0 - centre * f64::from(o)).abs());
            }
            let r = Resampler::new(i, o, 1).unwrap();
            eprintln!(
                "impulse {i} -> {o}: peak frame within {worst} of round(t*out/in), click centroid \
                 within {worst_frac:.1e} frames of its exact time; compensated delay {} out frames, \
                 block {} in frames",
                r.output_delay(),
                r.block_frames()
            );
            assert!(
                worst_frac < 0.01,
                "{i}->{o}: click off by {worst_frac} frames"
            );
        }
    }

    #[test]
    fn streaming_is_bit_exact_whatever_the_chunking() {
        let mut lcg = Lcg(5);
        for (i, o) in PAIRS {
            for channels in [1, 2] {
                let input: Vec<f32> = (0..(i as usize / 2) * channels)
                    .map(|_| lcg.sample())
                    .collect();
                let mut r = Resampler::new(i, o, channels).unwrap();
                let whole = run_whole(&mut r, &input);
                // Reused after finish: must behave like a fresh one.
                for (seed, max_piece) in [(1, 3), (2, 200), (3, 5000)] {
                    let pieces = run_pieces(&mut r, &input, seed, max_piece);
                    assert_eq!(whole.len(), pieces.len());
                    let max_diff = whole
                        .iter()
                        .zip(&pieces)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    assert_eq!(max_diff, 0.0, "{i}->{o} ch{channels} piece {max_piece}");
                }
            }
        }
    }

    #[test]
    fn passthrough_is_exact() {
        let mut lcg = Lcg(11);
        for channels in [1, 2] {
            let input: Vec<f32> = (0..8_001 * channels).map(|_| lcg.sample()).collect();
            let mut r = Resampler::new(16_000, 16_000, channels).unwrap();
            assert_eq!(run_pieces(&mut r, &input, 4, 7), input);
            assert_eq!(run_whole(&mut r, &input), input);
        }
    }

    #[test]
    fn odd_inputs_never_panic() {
        for (i, o) in PAIRS.into_iter().chain([(16_000, 16_000)]) {
            let mut r = Resampler::new(i, o, 2).unwrap();
            let mut out = Vec::new();
            r.finish(&mut out);
            r.finish(&mut out);
            assert!(out.is_empty());
            r.process(&[], &mut out);
            r.process(&[0.1], &mut out); // half a stereo frame
            r.finish(&mut out);
            assert!(out.is_empty(), "{i}->{o}: a half frame is not a frame");
            r.process(&[0.1, 0.2, 0.3], &mut out);
            r.finish(&mut out);
            let want = expected_output_frames(1, i, o) as usize * 2;
            assert_eq!(out.len(), want);
        }
    }

    #[test]
    fn stereo_channels_stay_apart() {
        let (i, o) = (48_000, 16_000);
        let n = 9_600;
        let left: Vec<f32> = (0..n)
            .map(|k| (0.5 * (2.0 * PI * 440.0 * k as f64 / 48_000.0).sin()) as f32)
            .collect();
        let mut stereo = Vec::with_capacity(2 * n);
        for &l in &left {
            stereo.extend([l, 0.0]);
        }
        let mut r = Resampler::new(i, o, 2).unwrap();
        let out = run_whole(&mut r, &stereo);
        let mut outs = [Vec::new(), Vec::new()];
        split_channels(&out, 2, &mut outs);
        let mut mono = Resampler::new(i, o, 1).unwrap();
        assert_eq!(outs[0], run_whole(&mut mono, &left));
        assert!(outs[1].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn downmix_averages() {
        let mut out = vec![9.0];
        downmix_to_mono(&[1.0, 0.0, -0.5, -0.5, 0.25, 0.75, 0.3], &mut out);
        assert_eq!(out, vec![9.0, 0.5, -0.5, 0.5]);
        downmix_to_mono(&[], &mut out);
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn split_gives_one_vec_per_channel() {
        let mut outs = [vec![], vec![7.0]];
        split_channels(&[1.0, 2.0, 3.0, 4.0, 5.0], 2, &mut outs);
        assert_eq!(outs, [vec![1.0, 3.0], vec![7.0, 2.0, 4.0]]);
        let mut mono = [vec![]];
        split_channels(&[1.0, 2.0], 1, &mut mono);
        assert_eq!(mono, [vec![1.0, 2.0]]);
        // Fewer outputs than channels, or none: no panic.
        split_channels(&[1.0, 2.0, 3.0], 3, &mut mono);
        assert_eq!(mono, [vec![1.0, 2.0, 1.0]]);
        split_channels(&[1.0], 0, &mut []);
    }
}
