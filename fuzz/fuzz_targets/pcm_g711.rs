//! The sample-frame path (pcm_s16le, pcm_f32le, mulaw, alaw), raw and seq:
//! framing checks, the jitter buffer, gaps, and the decoders.
//!
//! Input: [mode][len u16 LE][message][len u16 LE][message]... The mode byte
//! picks the encoding (bits 0-1), the sample rate (bits 2-3), the channels
//! (bit 4), the framing (bit 5) and how far a simulated clock moves between
//! messages (bits 6-7), so that held holes reach their deadlines.
//!
//! Checked: every audio block holds `frames * channels` finite samples (in
//! [-1, 1) for the integer encodings), blocks come in media order without
//! overlapping, and the pipeline's media position never goes backwards.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;

use cochlea::pipeline::{AudioBlock, BlockSamples, Pipeline};
use cochlea::protocol::{Encoding, Framing, StreamFormat};

const ENCODINGS: [Encoding; 4] = [
    Encoding::PcmS16le,
    Encoding::PcmF32le,
    Encoding::Mulaw,
    Encoding::Alaw,
];
const SAMPLE_RATES: [u32; 4] = [8_000, 16_000, 44_100, 48_000];
const CLOCK_STEPS_MS: [u64; 4] = [0, 20, 150, 400];

struct Checker {
    format: StreamFormat,
    /// End of the last block seen.
    end_frame: u64,
    media_frames: u64,
}

impl Checker {
    fn check(&mut self, pipeline: &Pipeline, out: &mut Vec<AudioBlock>) {
        for block in out.drain(..) {
            assert_eq!(block.channels, self.format.channels);
            assert!(
                block.start_frame >= self.end_frame,
                "block at {} overlaps media already handed out (up to {})",
                block.start_frame,
                self.end_frame
            );
            self.end_frame = block.end_frame();
            if let BlockSamples::Audio(samples) = &block.samples {
                assert_eq!(
                    samples.len(),
                    block.frames * usize::from(block.channels),
                    "block of {} frames holds {} samples",
                    block.frames,
                    samples.len()
                );
                for &s in samples {
                    assert!(s.is_finite(), "non-finite sample {s}");
                    if self.format.encoding != Encoding::PcmF32le {
                        assert!((-1.0..1.0).contains(&s), "sample {s} out of [-1, 1)");
                    }
                }
            }
        }
        let media = pipeline.media_frames();
        assert!(
            media >= self.media_frames,
            "media position went back from {} to {media}",
            self.media_frames
        );
        self.media_frames = media;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let format = StreamFormat {
        encoding: ENCODINGS[usize::from(mode & 3)],
        sample_rate: SAMPLE_RATES[usize::from((mode >> 2) & 3)],
        channels: 1 + u16::from(mode & 0x10 != 0),
        framing: if mode & 0x20 != 0 {
            Framing::Seq
        } else {
            Framing::Raw
        },
    };
    let step = Duration::from_millis(CLOCK_STEPS_MS[usize::from(mode >> 6)]);
    // Gaps are silence blocks without samples, so a generous limit is cheap.
    let mut pipeline = Pipeline::new(format, 2_000).expect("pipeline");
    let mut checker = Checker {
        format,
        end_frame: 0,
        media_frames: 0,
    };
    let mut now = Instant::now();
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        // Errors end the stream in the server, but the pipeline must stay
        // consistent after one, so keep going.
        let pushed = pipeline.push(message, now, &mut out);
        if pushed.is_err() {
            assert!(out.is_empty(), "a failed push appended blocks");
        }
        checker.check(&pipeline, &mut out);
        now += step;
        pipeline.poll(now, &mut out);
        checker.check(&pipeline, &mut out);
    }
    pipeline.poll(now + Duration::from_secs(1), &mut out);
    checker.check(&pipeline, &mut out);
    pipeline.finish(&mut out);
    checker.check(&pipeline, &mut out);
});
