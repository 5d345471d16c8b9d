//! VAD evaluation harness. Usage: vad-eval [tune|eval|bench|all]
mod energy_vad;

use energy_vad::{EnergyVad, EnergyVadConfig};
use std::hint::black_box;
use std::time::Instant;

const SR: usize = 16_000;
const TF: usize = 160; // 10 ms truth grid
const STREAM_S: f64 = 180.0;

// ---------------------------------------------------------------- rng / io
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn read_f32(path: &str) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e} (run scripts/gen_data.sh)"));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn write_f32(path: &str, x: &[f32]) {
    let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, b).unwrap();
}
fn power(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len().max(1) as f64
}
fn db(p: f64) -> f64 {
    10.0 * (p + 1e-20).log10()
}

// ---------------------------------------------------------------- streams
struct Utt {
    on: usize,  // truth onset (10 ms frame index)
    off: usize, // truth offset (exclusive)
}
struct Stream {
    x: Vec<f32>,
    truth: Vec<bool>, // per 10 ms frame
    utts: Vec<Utt>,
}

/// Truth for one sentence at its native level: 10 ms frames whose RMS is within 35 dB of the
/// sentence's loudest frame, with inactive gaps shorter than 100 ms (<10 frames) bridged.
fn sentence_truth(s: &[f32]) -> Vec<bool> {
    let e: Vec<f64> = s.chunks(TF).map(|c| db(power(c))).collect();
    let peak = e.iter().cloned().fold(f64::MIN, f64::max);
    let mut act: Vec<bool> = e.iter().map(|&v| v > peak - 35.0).collect();
    let idx: Vec<usize> = (0..act.len()).filter(|&i| act[i]).collect();
    for w in idx.windows(2) {
        if w[1] - w[0] - 1 < 10 {
            act[w[0]..w[1]].iter_mut().for_each(|a| *a = true);
        }
    }
    act
}

/// Sentences from `pool` in shuffled decks, each scaled to a random active level in
/// [-32, -20] dBFS, separated (and preceded) by random silences of 0.3-2.5 s, ~180 s total.
fn build_clean(pool: &[Vec<f32>], seed: u64) -> Stream {
    let mut rng = Rng(seed);
    let (mut x, mut truth, mut utts) = (Vec::new(), Vec::new(), Vec::new());
    let mut deck: Vec<usize> = Vec::new();
    let gap = |rng: &mut Rng| (rng.uniform(0.3, 2.5) * 100.0) as usize * TF;
    let n0 = gap(&mut rng);
    x.resize(n0, 0.0);
    truth.resize(n0 / TF, false);
    while (x.len() as f64) < STREAM_S * SR as f64 {
        if deck.is_empty() {
            deck = (0..pool.len()).collect();
            for i in (1..deck.len()).rev() {
                deck.swap(i, rng.below(i + 1));
            }
        }
        let s = &pool[deck.pop().unwrap()];
        let t = sentence_truth(s);
        let act: Vec<f32> = s.chunks(TF).zip(&t).filter(|(_, a)| **a).flat_map(|(c, _)| c.iter().cloned()).collect();
        let level = rng.uniform(-32.0, -20.0);
        let g = 10f64.powf((level - db(power(&act))) / 20.0) as f32;
        let base = truth.len();
        let first = t.iter().position(|&a| a).unwrap();
        let last = t.iter().rposition(|&a| a).unwrap();
        utts.push(Utt { on: base + first, off: base + last + 1 });
        x.extend(s.iter().map(|v| v * g));
        x.resize(truth.len() * TF + t.len() * TF, 0.0);
        truth.extend(t);
        let n = gap(&mut rng);
        x.resize(x.len() + n, 0.0);
        truth.resize(truth.len() + n / TF, false);
    }
    Stream { x, truth, utts }
}

fn speech_power(s: &Stream) -> f64 {
    let act: Vec<f32> = s.x.chunks(TF).zip(&s.truth).filter(|(_, a)| **a).flat_map(|(c, _)| c.iter().cloned()).collect();
    power(&act)
}

fn mix(clean: &Stream, noise: &[f32], snr_db: f64) -> Vec<f32> {
    let n = &noise[..clean.x.len()];
    let g = (speech_power(clean) / power(n) / 10f64.powf(snr_db / 10.0)).sqrt() as f32;
    clean.x.iter().zip(n).map(|(s, v)| (s + g * v).clamp(-1.0, 1.0)).collect()
}

fn telephony(x: &[f32], tag: &str) -> Vec<f32> {
    let (a, b, c) = (format!("data/{tag}_in.f32"), format!("data/{tag}_ulaw.wav"), format!("data/{tag}_out.f32"));
    write_f32(&a, x);
    let run = |args: &[&str]| assert!(std::process::Command::new("sox").args(args).status().unwrap().success());
    run(&["-t", "f32", "-r", "16000", "-c", "1", &a, "-r", "8000", "-e", "u-law", &b]);
    run(&["-G", &b, "-r", "16000", "-t", "f32", &c]);
    let mut y = read_f32(&c);
    y.resize(x.len(), 0.0);
    y
}

struct Cond {
    name: &'static str,
    x: Vec<f32>,
}

fn build_conditions(half: usize) -> (Stream, Vec<Cond>) {
    let sents: Vec<Vec<f32>> = (0..24usize).filter(|i| (i % 4 == 0 || i % 4 == 3) == (half == 0)).map(|i| read_f32(&format!("data/sent/{i:02}.f32"))).collect();
    let clean = build_clean(&sents, 1000 + half as u64);
    let len = clean.x.len();
    let off = half * 200 * SR; // tune: noise seconds 0-200, test: 200-400
    let white = &read_f32("data/noise/white.f32")[off..];
    let pink = &read_f32("data/noise/pink.f32")[off..];
    let brown = &read_f32("data/noise/brown.f32")[off..];
    // 50 Hz mains hum with odd harmonics (150 Hz -6 dB, 250 Hz -12 dB), random phase
    let hum: Vec<f32> = (0..len)
        .map(|i| {
            let t = i as f32 / SR as f32;
            let w = 2.0 * std::f32::consts::PI * 50.0 * t;
            w.sin() + 0.5 * (3.0 * w + 1.0).sin() + 0.25 * (5.0 * w + 2.0).sin()
        })
        .collect();
    let hum_mix = {
        let h = Stream { x: mix(&clean, &hum, 10.0), truth: clean.truth.clone(), utts: vec![] };
        let _ = &h;
        let gw = (speech_power(&clean) / power(&white[..len]) / 100.0).sqrt() as f32; // white at 20 dB
        h.x.iter().zip(white).map(|(s, v)| (s + gw * v).clamp(-1.0, 1.0)).collect()
    };
    // babble: 3 other flite voices, continuous speech with 0-0.3 s pauses, at -15 dB re target
    let mut rng = Rng(77 + half as u64);
    let mut bab = vec![0f32; len];
    for v in ["kal16", "awb", "rms"] {
        let mut track = Vec::new();
        while track.len() < len {
            track.extend(read_f32(&format!("data/babble/{v}_{:02}.f32", rng.below(24))));
            track.resize(track.len() + (rng.uniform(0.0, 0.3) * SR as f64) as usize, 0.0);
        }
        bab.iter_mut().zip(&track).for_each(|(b, t)| *b += t);
    }
    // white noise whose level steps up 20 dB in the middle: SNR 30 dB, then 10 dB
    let step: Vec<f32> = {
        let w = &white[..len];
        let g = (speech_power(&clean) / power(w)).sqrt() as f32;
        let (g1, g2) = (g * 10f32.powf(-30.0 / 20.0), g * 10f32.powf(-10.0 / 20.0));
        clean.x.iter().zip(w).enumerate().map(|(i, (s, v))| (s + v * if i < len / 2 { g1 } else { g2 }).clamp(-1.0, 1.0)).collect()
    };
    // knocks/clicks: decaying noise bursts (tau 5-30 ms, peak 0..+10 dB re speech RMS), ~1 per 1.5 s, over white noise at 30 dB
    let knocks: Vec<f32> = {
        let mut y = mix(&clean, white, 30.0);
        let srms = speech_power(&clean).sqrt();
        let mut rng = Rng(500 + half as u64);
        for _ in 0..(len / (SR * 3 / 2)) {
            let at = rng.below(len - SR);
            let tau = rng.uniform(0.005, 0.030) * SR as f64;
            let amp = srms * 10f64.powf(rng.uniform(0.0, 10.0) / 20.0) * 1.7;
            for k in 0..(5.0 * tau) as usize {
                let v = (rng.uniform(-1.0, 1.0) * amp * (-(k as f64) / tau).exp()) as f32;
                y[at + k] = (y[at + k] + v).clamp(-1.0, 1.0);
            }
        }
        y
    };
    // non-stationary noise: pink noise whose level wanders +-8 dB (sum of 4 sines, 0.2-2 Hz), mean SNR 10 dB
    let pinkmod: Vec<f32> = {
        let mut rng = Rng(900 + half as u64);
        let comps: Vec<(f64, f64)> = (0..4).map(|_| (rng.uniform(0.2, 2.0), rng.uniform(0.0, 6.283))).collect();
        let env: Vec<f32> = (0..len)
            .map(|i| {
                let t = i as f64 / SR as f64;
                let d: f64 = comps.iter().map(|(f, p)| (6.283 * f * t + p).sin()).sum::<f64>() * 2.0; // +-8 dB
                10f64.powf(d / 20.0) as f32
            })
            .collect();
        let n: Vec<f32> = pink[..len].iter().zip(&env).map(|(a, b)| a * b).collect();
        mix(&clean, &n, 10.0)
    };
    let conds = vec![
        Cond { name: "clean", x: clean.x.clone() },
        Cond { name: "quiet-20dB", x: clean.x.iter().map(|v| v * 0.1).collect() },
        Cond { name: "white20", x: mix(&clean, white, 20.0) },
        Cond { name: "white10", x: mix(&clean, white, 10.0) },
        Cond { name: "white5", x: mix(&clean, white, 5.0) },
        Cond { name: "pink10", x: mix(&clean, pink, 10.0) },
        Cond { name: "pinkmod10", x: pinkmod },
        Cond { name: "brown10", x: mix(&clean, brown, 10.0) },
        Cond { name: "hum10+wn20", x: hum_mix },
        Cond { name: "ulaw8k", x: telephony(&clean.x, &format!("tel{half}")) },
        Cond { name: "wn-step30to10", x: step },
        Cond { name: "knocks*", x: knocks },
        Cond { name: "babble15*", x: mix(&clean, &bab, 15.0) },
    ];
    (clean, conds)
}

// ---------------------------------------------------------------- detectors
trait Vad {
    fn frame_len(&self) -> usize;
    fn is_speech(&mut self, frame: &[f32]) -> bool;
}
struct Earshot(Box<earshot::Detector>, f32);
impl Vad for Earshot {
    fn frame_len(&self) -> usize {
        256
    }
    fn is_speech(&mut self, f: &[f32]) -> bool {
        self.0.predict_f32(f) >= self.1
    }
}
impl Vad for EnergyVad {
    fn frame_len(&self) -> usize {
        EnergyVad::frame_len(self)
    }
    fn is_speech(&mut self, f: &[f32]) -> bool {
        self.process_frame(f)
    }
}
struct Webrtc(webrtc_vad::Vad, [i16; 160]);
impl Vad for Webrtc {
    fn frame_len(&self) -> usize {
        160
    }
    fn is_speech(&mut self, f: &[f32]) -> bool {
        for (o, v) in self.1.iter_mut().zip(f) {
            *o = (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
        }
        self.0.is_voice_segment(&self.1).unwrap()
    }
}
fn webrtc(mode: u8) -> Webrtc {
    use webrtc_vad::{SampleRate, VadMode::*};
    let m = [Quality, LowBitrate, Aggressive, VeryAggressive].into_iter().nth(mode as usize).unwrap();
    Webrtc(webrtc_vad::Vad::new_with_rate_and_mode(SampleRate::Rate16kHz, m), [0; 160])
}

/// Cascade: B (16 ms frames) gates; when it fires, earshot is warmed up on the buffered
/// pre-roll (last 12 frames = 192 ms, which the sink keeps anyway) and must confirm
/// (score >= thr) before anything is reported; after confirmation earshot stops and B
/// alone carries the segment to its end. Earshot therefore only runs around onsets.
struct Hybrid {
    gate: EnergyVad,
    es: Box<earshot::Detector>,
    thr: f32,
    ring: Vec<[f32; 256]>, // stands in for the sink's pre-roll buffer
    pos: usize,
    filled: usize,
    state: u8, // 0 idle, 1 verifying, 2 confirmed
    quiet: usize,
    pub es_frames: usize,
}
impl Vad for Hybrid {
    fn frame_len(&self) -> usize {
        256
    }
    fn is_speech(&mut self, f: &[f32]) -> bool {
        const HANG: usize = 19; // ~300 ms
        let g = self.gate.process_frame(f);
        self.quiet = if g { 0 } else { self.quiet + 1 };
        if self.state == 0 && g {
            self.state = 1;
            self.es.reset();
            let k = self.ring.len();
            for i in 0..self.filled {
                self.es.predict_f32(&self.ring[(self.pos + k - self.filled + i) % k]);
            }
            self.es_frames += self.filled;
        }
        let out = match self.state {
            1 => {
                self.es_frames += 1;
                if self.es.predict_f32(f) >= self.thr {
                    self.state = 2;
                    true
                } else {
                    false
                }
            }
            2 => g,
            _ => false,
        };
        if self.state != 0 && self.quiet >= HANG {
            self.state = 0;
        }
        let k = self.ring.len();
        self.ring[self.pos].copy_from_slice(f);
        self.pos = (self.pos + 1) % k;
        self.filled = (self.filled + 1).min(k);
        out
    }
}

#[derive(Clone, Debug)]
enum Det {
    Hybrid(EnergyVadConfig, f32),
    Earshot(f32),
    Energy(EnergyVadConfig),
    Webrtc(u8),
}
impl Det {
    fn make(&self) -> Box<dyn Vad> {
        match self {
            Det::Earshot(t) => Box::new(Earshot(earshot::Detector::default_boxed(), *t)),
            Det::Energy(c) => Box::new(EnergyVad::new(*c)),
            Det::Webrtc(m) => Box::new(webrtc(*m)),
            Det::Hybrid(c, t) => Box::new(Hybrid {
                gate: EnergyVad::new(EnergyVadConfig { frame_ms: 16, ..*c }),
                es: earshot::Detector::default_boxed(),
                thr: *t,
                ring: vec![[0.0; 256]; 12],
                pos: 0,
                filled: 0,
                state: 0,
                quiet: 0,
                es_frames: 0,
            }),
        }
    }
    fn label(&self) -> String {
        match self {
            Det::Earshot(t) => format!("A earshot thr={t}"),
            Det::Energy(c) => format!(
                "B energy {}ms hp={} margin={} abs={} rise={}dB/s fall={}ms",
                c.frame_ms, c.highpass_hz, c.margin_db, c.abs_floor_dbfs, c.floor_rise_db_per_s, c.floor_fall_ms
            ),
            Det::Webrtc(m) => format!("C webrtc-vad mode={m}"),
            Det::Hybrid(c, t) => format!("D hybrid gate margin={} (rest as B) earshot thr={t}", c.margin_db),
        }
    }
}

// ---------------------------------------------------------------- segmenter + metrics
struct Seg {
    start: usize,  // sample where speech starts (first of the onset frames)
    decide: usize, // sample at which the segmenter knows (end of 2nd onset frame)
    end: usize,    // last speech frame end + hangover
}

/// Segmenter smoothing: open after 2 consecutive speech frames, close after >=300 ms of non-speech.
fn segment(raw: &[bool], fl: usize) -> Vec<Seg> {
    let hang = (300 * SR / 1000).div_ceil(fl);
    let (mut segs, mut run, mut open, mut sil) = (Vec::new(), 0usize, false, 0usize);
    for (i, &s) in raw.iter().enumerate() {
        run = if s { run + 1 } else { 0 };
        if open {
            sil = if s { 0 } else { sil + 1 };
            if sil >= hang {
                open = false;
                segs.last_mut().map(|g: &mut Seg| g.end = (i + 1) * fl);
            }
        } else if run >= 2 {
            open = true;
            sil = 0;
            segs.push(Seg { start: (i - 1) * fl, decide: (i + 1) * fl, end: usize::MAX });
        }
    }
    if let Some(g) = segs.last_mut() {
        g.end = g.end.min(raw.len() * fl);
    }
    segs
}

#[derive(Default, Clone)]
struct M {
    tp: usize,
    fp: usize,
    fneg: usize,
    lat: Vec<f64>,
    miss: usize,
    false_segs: usize,
    clipped: usize,
    utts: usize,
    raw_f1: f64,
}
impl M {
    fn p(&self) -> f64 {
        self.tp as f64 / (self.tp + self.fp).max(1) as f64
    }
    fn r(&self) -> f64 {
        self.tp as f64 / (self.tp + self.fneg).max(1) as f64
    }
    fn f1(&self) -> f64 {
        2.0 * self.p() * self.r() / (self.p() + self.r()).max(1e-9)
    }
    fn lat_q(&self, q: f64) -> f64 {
        let mut l = self.lat.clone();
        l.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if l.is_empty() { f64::NAN } else { l[((l.len() - 1) as f64 * q).round() as usize] }
    }
}

fn evaluate(det: &Det, x: &[f32], truth: &[bool], utts: &[Utt]) -> M {
    let mut v = det.make();
    let fl = v.frame_len();
    let raw: Vec<bool> = x.chunks_exact(fl).map(|f| v.is_speech(f)).collect();
    let segs = segment(&raw, fl);
    let mut m = M { utts: utts.len(), ..Default::default() };
    {
        let (mut tp, mut fp, mut fneg) = (0.0, 0.0, 0.0);
        for (k, &t) in truth.iter().enumerate() {
            let p = raw.get((k * TF + TF / 2) / fl).copied().unwrap_or(false);
            match (p, t) { (true, true) => tp += 1.0, (true, false) => fp += 1.0, (false, true) => fneg += 1.0, _ => {} }
        }
        m.raw_f1 = 2.0 * tp / (2.0 * tp + fp + fneg);
    }
    let mut pred = vec![false; truth.len()];
    for g in &segs {
        for k in g.start / TF..g.end.div_ceil(TF).min(truth.len()) {
            let c = k * TF + TF / 2;
            pred[k] |= c >= g.start && c < g.end;
        }
    }
    for (p, t) in pred.iter().zip(truth) {
        match (p, t) {
            (true, true) => m.tp += 1,
            (true, false) => m.fp += 1,
            (false, true) => m.fneg += 1,
            _ => {}
        }
    }
    let overl = |g: &Seg, u: &Utt| g.start < u.off * TF && g.end > u.on * TF;
    for u in utts {
        match segs.iter().find(|g| overl(g, u)) {
            None => m.miss += 1,
            Some(g) => {
                m.lat.push((g.decide.saturating_sub(u.on * TF)) as f64 * 1000.0 / SR as f64);
                m.clipped += (g.start > u.on * TF + SR / 5) as usize; // start cut even with 200 ms pre-roll
            }
        }
    }
    m.false_segs = segs.iter().filter(|g| !utts.iter().any(|u| overl(g, u))).count();
    m
}

fn run_all(det: &Det, clean: &Stream, conds: &[Cond]) -> Vec<M> {
    conds.iter().map(|c| evaluate(det, &c.x, &clean.truth, &clean.utts)).collect()
}

/// Tuning objective: mean F1 over the unstarred conditions minus 0.005 per missed, false or clipped utterance.
fn objective(ms: &[M], conds: &[Cond]) -> f64 {
    let ok: Vec<&M> = ms.iter().zip(conds).filter(|(_, c)| !c.name.ends_with('*')).map(|(m, _)| m).collect();
    ok.iter().map(|m| m.f1()).sum::<f64>() / ok.len() as f64 - 0.005 * ok.iter().map(|m| (m.miss + m.false_segs + m.clipped) as f64).sum::<f64>()
}

fn energy_grid() -> Vec<Det> {
    let mut v = Vec::new();
    for frame_ms in [10, 16] {
        for highpass_hz in [100.0, 200.0] {
            for margin_db in [3.0, 4.0, 6.0, 8.0, 10.0, 12.0] {
                for abs_floor_dbfs in [-55.0, -50.0] {
                    for floor_rise_db_per_s in [0.5, 1.0, 2.0, 4.0] {
                        for floor_fall_ms in [200.0, 600.0, 2000.0] {
                            v.push(Det::Energy(EnergyVadConfig {
                                frame_ms,
                                highpass_hz,
                                margin_db,
                                abs_floor_dbfs,
                                floor_rise_db_per_s,
                                floor_fall_ms,
                                ..Default::default()
                            }));
                        }
                    }
                }
            }
        }
    }
    v
}

fn tune(clean: &Stream, conds: &[Cond]) -> Vec<Det> {
    let mut best = Vec::new();
    let families: Vec<(&str, Vec<Det>)> = vec![
        ("A", [0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9].map(Det::Earshot).to_vec()),
        ("B", energy_grid()),
        ("C", (0..4).map(Det::Webrtc).collect()),
    ];
    for (name, grid) in families {
        let mut scored: Vec<(f64, Det)> = grid.into_iter().map(|d| (objective(&run_all(&d, clean, conds), conds), d)).collect();
        scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        println!("tune {name}: objective (mean F1 of unstarred - 0.005*(missed+false+clipped)); top of {}", scored.len());
        for (s, d) in scored.iter().take(if name == "B" { 5 } else { 8 }) {
            println!("  {s:.4}  {}", d.label());
        }
        best.push(scored[0].1.clone());
        if name == "B" {
            let cons = scored.iter().find(|(_, d)| matches!(d, Det::Energy(c) if c.margin_db >= 6.0)).unwrap();
            println!("  best with margin >= 6 dB: {:.4}  {}", cons.0, cons.1.label());
            best.push(cons.1.clone());
        }
    }
    let Det::Energy(bc) = best[1].clone() else { unreachable!() };
    let mut scored: Vec<(f64, Det)> = Vec::new();
    for m in [3.0, 4.0, 6.0, 8.0] {
        for t in [0.5, 0.6, 0.7, 0.8] {
            let d = Det::Hybrid(EnergyVadConfig { margin_db: m, frame_ms: 16, ..bc }, t);
            scored.push((objective(&run_all(&d, clean, conds), conds), d));
        }
    }
    scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    println!("tune D: top of {}", scored.len());
    for (s, d) in scored.iter().take(5) {
        println!("  {s:.4}  {}", d.label());
    }
    best.push(scored[0].1.clone());
    best
}

fn report(dets: &[Det], clean: &Stream, conds: &[Cond], title: &str) {
    println!("\n## {title}: {} s, {} utterances, {:.1}% speech frames", clean.x.len() / SR, clean.utts.len(),
        100.0 * clean.truth.iter().filter(|&&t| t).count() as f64 / clean.truth.len() as f64);
    println!("| detector | condition | P | R | F1 | raw F1 | onset med ms | onset p90 ms | missed | clipped | false |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for d in dets {
        let ms = run_all(d, clean, conds);
        for (m, c) in ms.iter().zip(conds) {
            println!("| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {}/{} | {} | {} |", short(d), c.name, m.p(), m.r(), m.f1(),
                m.raw_f1, m.lat_q(0.5), m.lat_q(0.9), m.miss, m.utts, m.clipped, m.false_segs);
        }
        let ok: Vec<&M> = ms.iter().zip(conds).filter(|(_, c)| !c.name.ends_with('*')).map(|(m, _)| m).collect();
        let mut all = M::default();
        for m in &ok {
            all.tp += m.tp; all.fp += m.fp; all.fneg += m.fneg; all.lat.extend(&m.lat);
            all.miss += m.miss; all.utts += m.utts; all.false_segs += m.false_segs; all.clipped += m.clipped;
        }
        println!("| **{}** | **all unstarred** | {:.3} | {:.3} | **{:.3}** | {:.3} | {:.0} | {:.0} | {}/{} | {} | {} |", short(d), all.p(), all.r(), all.f1(), ok.iter().map(|m| m.raw_f1).sum::<f64>() / ok.len() as f64,
            all.lat_q(0.5), all.lat_q(0.9), all.miss, all.utts, all.clipped, all.false_segs);
    }
}
fn short(d: &Det) -> String {
    match d {
        Det::Earshot(t) => format!("A earshot@{t}"),
        Det::Energy(c) => format!("B energy{}ms m{}", c.frame_ms, c.margin_db),
        Det::Webrtc(m) => format!("C webrtc m{m}"),
        Det::Hybrid(c, t) => format!("D B{}+earshot@{t}", c.margin_db),
    }
}

// ---------------------------------------------------------------- cpu / memory
fn bench(dets: &[Det], x: &[f32], what: &str) {
    let ten_min: Vec<f32> = x.iter().cycle().take(600 * SR).cloned().collect();
    println!("\n## CPU on {what}: 600 s of audio per run, median of 5 runs (release)");
    println!("| detector | ns per 16 ms audio | streams per core (= x realtime) |");
    println!("|---|---|---|");
    let mut times = vec![Vec::new(); dets.len()];
    for _round in 0..5 {
        for (d, t) in dets.iter().zip(times.iter_mut()) {
            let mut v = d.make();
            let fl = v.frame_len();
            let t0 = Instant::now();
            let mut n = 0usize;
            for f in ten_min.chunks_exact(fl) {
                n += v.is_speech(black_box(f)) as usize;
            }
            black_box(n);
            t.push(t0.elapsed().as_nanos() as f64);
        }
    }
    for (d, t) in dets.iter().zip(times.iter_mut()) {
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let ns16 = t[2] / (600.0 / 0.016);
        let duty = if let Det::Hybrid(..) = d {
            let mut h = match d { Det::Hybrid(c, t) => (c, t), _ => unreachable!() };
            let _ = &mut h;
            let mut v = Hybrid { gate: EnergyVad::new(EnergyVadConfig { frame_ms: 16, ..*h.0 }), es: earshot::Detector::default_boxed(), thr: *h.1,
                ring: vec![[0.0; 256]; 12], pos: 0, filled: 0, state: 0, quiet: 0, es_frames: 0 };
            let n = x.chunks_exact(256).map(|f| v.is_speech(f)).count();
            format!(" (earshot ran on {:.1}% of frames)", 100.0 * v.es_frames as f64 / n as f64)
        } else { String::new() };
        println!("| {}{duty} | {:.0} | {:.0} |", short(d), ns16, 16e6 / ns16);
    }
}

#[repr(C)]
#[derive(Default)]
struct MallInfo2 { arena: usize, ordblks: usize, smblks: usize, hblks: usize, hblkhd: usize, usmblks: usize, fsmblks: usize, uordblks: usize, fordblks: usize, keepcost: usize }
unsafe extern "C" { fn mallinfo2() -> MallInfo2; }
fn heap_used() -> usize { unsafe { let m = mallinfo2(); m.uordblks + m.hblkhd } }

fn memory() {
    println!("\n## Memory per instance (inline size + heap measured with glibc mallinfo2 over 1000 instances)");
    let per = |f: &dyn Fn() -> Box<dyn std::any::Any>| {
        let h0 = heap_used();
        let v: Vec<_> = (0..1000).map(|_| f()).collect();
        let h1 = heap_used();
        drop(v);
        (h1 - h0) as f64 / 1000.0
    };
    println!("- A earshot::Detector: size_of = {} B; boxed total per instance = {:.0} B (no other heap)",
        std::mem::size_of::<earshot::Detector>(), per(&|| Box::new(earshot::Detector::default_boxed())));
    println!("- B EnergyVad: size_of = {} B; boxed total per instance = {:.0} B (no other heap)", std::mem::size_of::<EnergyVad>(),
        per(&|| Box::new(EnergyVad::new(EnergyVadConfig::default()))));
    println!("- C webrtc_vad::Vad: size_of = {} B; C heap + box per instance = {:.0} B",
        std::mem::size_of::<webrtc_vad::Vad>(), per(&|| Box::new(webrtc(3))));
}

fn main() {
    let cmd = std::env::args().nth(1).unwrap_or("all".into());
    let (clean0, conds0) = build_conditions(0);
    let (clean1, conds1) = build_conditions(1);
    println!("conditions: {}", conds0.iter().map(|c| c.name).collect::<Vec<_>>().join(", "));
    if cmd == "bench" {
        let d = vec![Det::Earshot(0.5), Det::Energy(EnergyVadConfig::default()), Det::Energy(EnergyVadConfig { frame_ms: 16, ..Default::default() }), Det::Webrtc(3)];
        bench(&d, &conds1[3].x, "white10");
        memory();
        return;
    }
    let best = tune(&clean0, &conds0);
    for d in &best {
        println!("chosen on tune half: {}", d.label());
    }
    let mut dets = vec![Det::Earshot(0.5)];
    dets.extend(best.iter().cloned().filter(|d| !matches!(d, Det::Earshot(t) if *t == 0.5)));
    if cmd == "tune" {
        return;
    }
    report(&dets, &clean0, &conds0, "TUNE half (for reference; parameters were chosen here)");
    report(&dets, &clean1, &conds1, "TEST half (held out: other 12 sentences, other noise, other seeds)");
    if cmd == "eval" {
        return;
    }
    let white10 = &conds1.iter().find(|c| c.name == "white10").unwrap().x;
    bench(&dets, white10, "test white10 (48% speech)");
    let noise_only: Vec<f32> = white10.iter().zip(&clean1.x).map(|(a, b)| a - b).collect();
    bench(&dets, &noise_only, "the same noise without speech (listening side)");
    let knocks = &conds1.iter().find(|c| c.name == "knocks*").unwrap().x;
    let kn_only: Vec<f32> = knocks.iter().zip(&clean1.x).map(|(a, b)| a - b).collect();
    bench(&dets[dets.len() - 1..], &kn_only, "knocks without speech (D only)");
    memory();
}
