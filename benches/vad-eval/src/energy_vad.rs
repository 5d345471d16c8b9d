//! Energy-based voice activity detector ("detector B").
//!
//! Per frame: first-order DC/low-frequency high-pass, frame energy in dBFS, an adaptive noise
//! floor that follows decreases quickly and increases slowly (at a bounded dB/s rate), and a
//! decision `energy > floor + margin_db && energy > abs_floor_dbfs`.
//! No allocation, no sample buffer (only a running sum of squares), any input chunking.
//! Input: mono f32 in [-1, 1] at `sample_rate`.

#[derive(Clone, Copy, Debug)]
pub struct EnergyVadConfig {
    pub sample_rate: u32,
    /// Frame length in ms (10 or 16 are typical).
    pub frame_ms: u32,
    /// Cut-off of the first-order high-pass filter (removes DC, rumble, most of mains hum).
    pub highpass_hz: f32,
    /// Speech if frame energy exceeds the noise floor by this much.
    pub margin_db: f32,
    /// ... and also exceeds this absolute level.
    pub abs_floor_dbfs: f32,
    /// Maximum speed at which the noise floor follows an energy increase.
    pub floor_rise_db_per_s: f32,
    /// Time constant with which the noise floor follows an energy decrease.
    pub floor_fall_ms: f32,
    /// During the first `warmup_ms` the floor follows increases as fast as decreases.
    pub warmup_ms: u32,
}

impl Default for EnergyVadConfig {
    fn default() -> Self {
        Self {
            sample_rate: 16_000,
            frame_ms: 10,
            highpass_hz: 100.0,
            margin_db: 10.0,
            abs_floor_dbfs: -50.0,
            floor_rise_db_per_s: 3.0,
            floor_fall_ms: 40.0,
            warmup_ms: 300,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EnergyVad {
    frame_len: u32,
    hp_a: f32,
    hp_x1: f32,
    hp_y1: f32,
    acc: f32,
    n: u32,
    floor_db: f32,
    frames_seen: u32,
    warmup_frames: u32,
    rise_per_frame: f32,
    fall_coef: f32,
    margin_db: f32,
    abs_floor_db: f32,
    last_db: f32,
}

impl EnergyVad {
    pub fn new(c: EnergyVadConfig) -> Self {
        let frame_len = c.sample_rate * c.frame_ms / 1000;
        let frame_s = c.frame_ms as f32 / 1000.0;
        Self {
            frame_len,
            hp_a: (-2.0 * std::f32::consts::PI * c.highpass_hz / c.sample_rate as f32).exp(),
            hp_x1: 0.0,
            hp_y1: 0.0,
            acc: 0.0,
            n: 0,
            floor_db: 0.0,
            frames_seen: 0,
            warmup_frames: c.warmup_ms / c.frame_ms.max(1),
            rise_per_frame: c.floor_rise_db_per_s * frame_s,
            fall_coef: 1.0 - (-(c.frame_ms as f32) / c.floor_fall_ms).exp(),
            margin_db: c.margin_db,
            abs_floor_db: c.abs_floor_dbfs,
            last_db: -100.0,
        }
    }

    /// Samples per frame (160 for 10 ms at 16 kHz).
    pub fn frame_len(&self) -> usize {
        self.frame_len as usize
    }

    /// Energy (dBFS) of the last completed frame and the current noise floor estimate.
    pub fn levels_db(&self) -> (f32, f32) {
        (self.last_db, self.floor_db)
    }

    pub fn reset(&mut self) {
        (self.hp_x1, self.hp_y1, self.acc, self.n, self.frames_seen) = (0.0, 0.0, 0.0, 0, 0);
    }

    /// Feeds any number of samples; calls `on_frame(is_speech)` once per completed frame.
    pub fn process(&mut self, samples: &[f32], mut on_frame: impl FnMut(bool)) {
        let mut rest = samples;
        while !rest.is_empty() {
            let take = ((self.frame_len - self.n) as usize).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let (a, mut x1, mut y1, mut acc) = (self.hp_a, self.hp_x1, self.hp_y1, self.acc);
            for &x in chunk {
                let y = a * (y1 + x - x1); // y[n] = a * (y[n-1] + x[n] - x[n-1])
                x1 = x;
                y1 = y;
                acc += y * y;
            }
            (self.hp_x1, self.hp_y1, self.acc) = (x1, y1, acc);
            self.n += take as u32;
            if self.n == self.frame_len {
                let speech = self.end_frame();
                on_frame(speech);
            }
        }
    }

    /// Convenience for callers that already frame the audio: `frame.len()` must be `frame_len()`.
    pub fn process_frame(&mut self, frame: &[f32]) -> bool {
        debug_assert!(self.n == 0 && frame.len() == self.frame_len());
        let mut out = false;
        self.process(frame, |s| out = s);
        out
    }

    fn end_frame(&mut self) -> bool {
        let e = 10.0 * (self.acc / self.frame_len as f32 + 1e-10).log10();
        (self.acc, self.n, self.last_db) = (0.0, 0, e);
        if self.frames_seen == 0 {
            self.floor_db = e;
        }
        let speech = e > self.floor_db + self.margin_db && e > self.abs_floor_db;
        let d = e - self.floor_db;
        if d < 0.0 || self.frames_seen < self.warmup_frames {
            self.floor_db += d * self.fall_coef;
        } else {
            self.floor_db += d.min(self.rise_per_frame);
        }
        self.frames_seen = self.frames_seen.saturating_add(1);
        speech
    }
}
