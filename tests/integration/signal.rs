//! Signal helpers for comparing recordings with their sources: alignment by
//! cross-correlation (coarse on block averages, then exact) and an
//! independent G.711 μ-law decoder (written from the ITU-T formula, not
//! shared with the server's table-driven one).

/// Normalized cross-correlation of `recorded[i]` with `source[i - lag]`
/// over the indices `i >= skip` where both exist.
pub fn correlation_at(recorded: &[f64], source: &[f64], lag: isize, skip: usize) -> f64 {
    let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
    for (i, &x) in recorded.iter().enumerate().skip(skip) {
        let j = i as isize - lag;
        if j < 0 {
            continue;
        }
        let Some(&y) = source.get(j as usize) else {
            break;
        };
        xy += x * y;
        xx += x * x;
        yy += y * y;
    }
    xy / (xx.sqrt() * yy.sqrt()).max(1e-12)
}

fn block_means(signal: &[f64], block: usize) -> Vec<f64> {
    signal
        .chunks(block)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect()
}

/// The lag (in samples, within ±`max_lag`) at which `recorded` best matches
/// `source`, and the correlation there, ignoring the first `skip` samples of
/// `recorded`. Searched on 8-sample block means first (fast enough for a
/// debug build), then sample by sample around the best coarse lag.
pub fn best_alignment(
    recorded: &[f64],
    source: &[f64],
    max_lag: usize,
    skip: usize,
) -> (f64, isize) {
    const BLOCK: usize = 8;
    let coarse_recorded = block_means(recorded, BLOCK);
    let coarse_source = block_means(source, BLOCK);
    let coarse_max = (max_lag / BLOCK) as isize;
    let mut coarse_best = (f64::MIN, 0isize);
    for lag in -coarse_max..=coarse_max {
        let c = correlation_at(&coarse_recorded, &coarse_source, lag, skip / BLOCK);
        if c > coarse_best.0 {
            coarse_best = (c, lag);
        }
    }
    let centre = coarse_best.1 * BLOCK as isize;
    let mut best = (f64::MIN, centre);
    for lag in centre - 2 * BLOCK as isize..=centre + 2 * BLOCK as isize {
        let c = correlation_at(recorded, source, lag, skip);
        if c > best.0 {
            best = (c, lag);
        }
    }
    best
}

/// The result of [`tracked_alignment`].
#[derive(Debug)]
pub struct Tracked {
    /// Correlation over everything compared, each window at its own lag.
    pub correlation: f64,
    /// (first sample of the window in `recorded`, lag, window correlation).
    pub windows: Vec<(usize, isize, f64)>,
}

impl Tracked {
    /// Places where the lag changes from one window to the next.
    pub fn jumps(&self) -> Vec<(usize, isize)> {
        self.windows
            .windows(2)
            .filter(|w| w[0].1 != w[1].1)
            .map(|w| (w[1].0, w[1].1 - w[0].1))
            .collect()
    }
}

fn window_sums(
    recorded: &[f64],
    source: &[f64],
    start: usize,
    len: usize,
    lag: isize,
) -> (f64, f64, f64) {
    let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
    let end = (start + len).min(recorded.len());
    for (i, &x) in recorded.iter().enumerate().take(end).skip(start) {
        let j = i as isize - lag;
        let y = if j < 0 {
            0.0
        } else {
            source.get(j as usize).copied().unwrap_or(0.0)
        };
        xy += x * y;
        xx += x * x;
        yy += y * y;
    }
    (xy, xx, yy)
}

/// Alignment that follows a lag that moves: `recorded` from `skip` on is cut
/// into windows of `window` samples; the first is searched over ±`first_search`
/// around `first_lag`, each next one over ±`step` around the lag before it.
/// A real-time capture that inserts or drops a buffer under CPU starvation
/// (Chromium's fake microphone does, in 10 ms buffers) shifts everything
/// after it; a single lag would then score the faithful rest of the
/// recording as noise. Each window still has to match the source's waveform.
pub fn tracked_alignment(
    recorded: &[f64],
    source: &[f64],
    skip: usize,
    window: usize,
    first_lag: isize,
    first_search: usize,
    step: usize,
) -> Tracked {
    let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
    let mut windows = Vec::new();
    let mut lag = first_lag;
    let mut search = first_search as isize;
    // Windows 30 dB below the loudest one (pauses, the silent tail) say
    // nothing about the lag: they keep the one before.
    let energy = |start: usize| -> f64 {
        recorded[start..(start + window).min(recorded.len())]
            .iter()
            .map(|x| x * x)
            .sum()
    };
    let loudest = (skip..recorded.len())
        .step_by(window)
        .map(energy)
        .fold(0.0, f64::max);
    let mut start = skip;
    while start < recorded.len() {
        let quiet = energy(start) < loudest * 1e-3;
        let range = if quiet { 0 } else { search };
        let mut best = (f64::MIN, lag, (0.0, 0.0, 0.0));
        for candidate in lag - range..=lag + range {
            let sums = window_sums(recorded, source, start, window, candidate);
            let c = sums.0 / (sums.1.sqrt() * sums.2.sqrt()).max(1e-12);
            if c > best.0 {
                best = (c, candidate, sums);
            }
        }
        lag = best.1;
        xy += best.2 .0;
        xx += best.2 .1;
        yy += best.2 .2;
        windows.push((start, lag, best.0));
        if !quiet {
            search = step as isize;
        }
        start += window;
    }
    Tracked {
        correlation: xy / (xx.sqrt() * yy.sqrt()).max(1e-12),
        windows,
    }
}

pub fn to_f64(samples: &[i16]) -> Vec<f64> {
    samples.iter().map(|&s| f64::from(s)).collect()
}

/// G.711 μ-law byte → 16-bit linear (ITU-T G.711: complement, then
/// ((mantissa << 3) + 0x84) << exponent, minus the bias).
pub fn mulaw_decode(byte: u8) -> i16 {
    let u = !byte;
    let sign = u & 0x80;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0F);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

#[test]
fn mulaw_decoder_known_values() {
    assert_eq!(mulaw_decode(0xFF), 0);
    assert_eq!(mulaw_decode(0x7F), 0);
    assert_eq!(mulaw_decode(0x00), -32124);
    assert_eq!(mulaw_decode(0x80), 32124);
}

#[test]
fn tracking_follows_an_inserted_buffer_and_still_needs_the_waveform() {
    let source: Vec<f64> = (0..48_000)
        .map(|i| ((i as f64 * 0.013).sin() + (i as f64 * 0.171).sin()) * (1 + (i / 700) % 3) as f64)
        .collect();
    // 10 ms of silence inserted at 1.5 s, as a starved capture does, and
    // a silent tail whose lag is anybody's guess.
    let mut recorded = source[..24_000].to_vec();
    recorded.extend(std::iter::repeat_n(0.0, 160));
    recorded.extend_from_slice(&source[24_000..]);
    recorded.extend(std::iter::repeat_n(0.0, 16_000));
    let (single, _) = best_alignment(&recorded, &source, 1000, 0);
    let tracked = tracked_alignment(&recorded, &source, 0, 4000, 0, 1000, 480);
    assert!(tracked.correlation > 0.99, "{tracked:?}");
    assert!(single < tracked.correlation);
    assert_eq!(tracked.jumps(), vec![(24_000, 160)]);
    // Noise is not speech at any lag.
    let noise: Vec<f64> = (0..48_000u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f64 - 1000.0)
        .collect();
    let tracked = tracked_alignment(&noise, &source, 0, 4000, 0, 1000, 480);
    assert!(tracked.correlation < 0.3, "{}", tracked.correlation);
}

#[test]
fn alignment_finds_a_known_delay() {
    let source: Vec<f64> = (0..20_000)
        .map(|i| ((i as f64 * 0.013).sin() + (i as f64 * 0.171).sin()) * ((i / 700) % 3) as f64)
        .collect();
    let delay = 1234;
    let mut recorded = vec![0.0; delay];
    recorded.extend_from_slice(&source);
    let (c, lag) = best_alignment(&recorded, &source, 4000, 2000);
    assert_eq!(lag, delay as isize);
    assert!(c > 0.999, "{c}");
}

/// `samples` through the high-pass filter libopus applies in its VoIP
/// application (the mode WebRTC senders encode in): second order, 60 Hz.
/// It shifts the phase of a voice's fundamental, so a recording from a
/// WebRTC sender is compared with the source as the encoder saw it. Measured
/// with libopus itself on samples/audio/speaker-16k.wav at 32 and 96 kbps:
/// VoIP mode gives 0.929 and 0.928 against the source, and 0.999 and 1.000
/// against the source through this filter; audio mode 0.999 against the
/// source.
pub fn voip_high_pass(samples: &[f64], sample_rate: u32) -> Vec<f64> {
    // A Butterworth biquad (RBJ cookbook), cutoff 60 Hz.
    let w0 = 2.0 * std::f64::consts::PI * 60.0 / f64::from(sample_rate);
    let alpha = w0.sin() / (2.0 * std::f64::consts::FRAC_1_SQRT_2);
    let cos = w0.cos();
    let a0 = 1.0 + alpha;
    let (b0, b1, b2) = (
        (1.0 + cos) / 2.0 / a0,
        -(1.0 + cos) / a0,
        (1.0 + cos) / 2.0 / a0,
    );
    let (a1, a2) = (-2.0 * cos / a0, (1.0 - alpha) / a0);
    let (mut x1, mut x2, mut y1, mut y2) = (0.0, 0.0, 0.0, 0.0);
    samples
        .iter()
        .map(|&x| {
            let y = b0 * x + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2;
            (x2, x1, y2, y1) = (x1, x, y1, y);
            y
        })
        .collect()
}
