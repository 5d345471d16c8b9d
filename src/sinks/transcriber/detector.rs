//! The speech detector the segmenter runs on every channel.

use super::segment::SpeechDetector;

/// The detector: earshot's small neural network (pure Rust, 16 ms frames,
/// about 8 KiB of state). The closing note of issue 5 has the comparison
/// with an energy detector that led to it.
pub struct Earshot(Box<earshot::Detector>);

pub(super) const EARSHOT_FRAME_SAMPLES: usize = 256;

impl Earshot {
    pub fn new() -> Self {
        Self(earshot::Detector::default_boxed())
    }
}

impl Default for Earshot {
    fn default() -> Self {
        Self::new()
    }
}

impl SpeechDetector for Earshot {
    fn frame_samples(&self) -> usize {
        EARSHOT_FRAME_SAMPLES
    }
    fn speech_probability(&mut self, frame: &[i16]) -> f32 {
        self.0.predict_i16(frame)
    }
}
