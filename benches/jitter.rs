//! Per-frame cost of the jitter buffer: one push and the pops it allows, for
//! 20 ms frames at 48 kHz.
//!
//! Run: `cargo bench --bench jitter`. Medians are in
//! `target/criterion/jitter_push_pop_per_frame/*/new/estimates.json`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use cochlea::pipeline::jitter::{JitterBuffer, JitterConfig};

const FRAMES: u64 = 960;
const FRAME: Duration = Duration::from_millis(20);

/// One frame of a live stream: time moves on 20 ms, the frame arrives unless
/// dropped, and everything due is popped (the session's timer and its pop
/// after each message, folded into one call).
struct Stream {
    jb: JitterBuffer<u64>,
    start: Instant,
    seq: u32,
    /// Drop frame `seq` when `seq % drop_every == drop_every - 1`.
    drop_every: Option<u32>,
}

impl Stream {
    fn new(config: JitterConfig, drop_every: Option<u32>) -> Self {
        Self {
            jb: JitterBuffer::new(config),
            start: Instant::now(),
            seq: 0,
            drop_every,
        }
    }

    fn frame(&mut self) -> u64 {
        // A run never reaches 2^32 frames (that would be 2.7 years of audio).
        let seq = self.seq;
        self.seq += 1;
        let now = self.start + FRAME * seq;
        if self.drop_every.is_none_or(|n| seq % n != n - 1) {
            self.jb
                .push(seq, u64::from(seq) * FRAMES, FRAMES, u64::from(seq), now);
        }
        let mut released = 0;
        while let Some(r) = self.jb.pop(now) {
            released += r.frames();
        }
        released
    }
}

fn per_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("jitter_push_pop_per_frame");
    group.bench_function("in_order", |b| {
        let mut stream = Stream::new(JitterConfig::new(48_000), None);
        b.iter(|| black_box(stream.frame()));
    });
    // 2 % drops with a fixed 60 ms wait: every 50th frame opens a hole that
    // holds the next three frames, then a pop releases gap + 3 packets.
    group.bench_function("drops_2pct_fixed_60ms", |b| {
        let config = JitterConfig {
            adaptive: false,
            max_delay_ms: 60,
            ..JitterConfig::new(48_000)
        };
        let mut stream = Stream::new(config, Some(50));
        b.iter(|| black_box(stream.frame()));
    });
    // Same drops, adaptive from 0 ms: holes are given up at once.
    group.bench_function("drops_2pct_adaptive", |b| {
        let mut stream = Stream::new(JitterConfig::new(48_000), Some(50));
        b.iter(|| black_box(stream.frame()));
    });
    group.finish();
}

criterion_group!(benches, per_frame);
criterion_main!(benches);
