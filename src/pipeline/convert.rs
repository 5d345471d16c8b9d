//! Per-sink format conversion: channel layout, then sample rate.
//!
//! The session keeps one [`Converter`] per distinct output format and hands
//! its blocks to every sink that wants that format, so each conversion runs
//! once however many sinks share it. The identity conversion copies nothing.

use super::resample::{downmix_to_mono, ResampleError, Resampler};
use super::{AudioBlock, BlockSamples};

/// Which channels a sink wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The stream's channels as they are.
    Keep,
    /// The average of all channels.
    Mono,
    /// One channel alone (0 = left): for stereo calls with a speaker per side.
    Channel(u16),
}

/// The format a sink wants; `sample_rate` `None` means the stream's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutputFormat {
    pub sample_rate: Option<u32>,
    pub layout: Layout,
}

impl OutputFormat {
    pub const NATIVE: OutputFormat = OutputFormat {
        sample_rate: None,
        layout: Layout::Keep,
    };

    pub fn rate(&self, input_rate: u32) -> u32 {
        self.sample_rate.unwrap_or(input_rate)
    }

    pub fn channels(&self, input_channels: u16) -> u16 {
        match self.layout {
            Layout::Keep => input_channels,
            Layout::Mono | Layout::Channel(_) => 1,
        }
    }
}

pub struct Converter {
    format: OutputFormat,
    in_channels: u16,
    out_channels: u16,
    resampler: Option<Resampler>,
    /// Media position of the next output frame, at the output rate.
    next_frame: u64,
    layout_scratch: Vec<f32>,
    /// Sample buffers of converted blocks the sinks are done with.
    spare: Vec<Vec<f32>>,
}

impl Converter {
    pub fn new(
        in_rate: u32,
        in_channels: u16,
        format: OutputFormat,
    ) -> Result<Self, ResampleError> {
        let out_rate = format.rate(in_rate);
        let out_channels = format.channels(in_channels);
        let resampler = if out_rate == in_rate {
            None
        } else {
            Some(Resampler::new(
                in_rate,
                out_rate,
                usize::from(out_channels),
            )?)
        };
        Ok(Self {
            format,
            in_channels,
            out_channels,
            resampler,
            next_frame: 0,
            layout_scratch: Vec::new(),
            spare: Vec::new(),
        })
    }

    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// True when blocks pass through unchanged (and can be shared as they are).
    pub fn is_identity(&self) -> bool {
        self.resampler.is_none() && self.out_channels == self.in_channels
    }

    /// Converts one block; appends what it yields (the resampler may hold a
    /// few frames back until the next block or `finish`).
    pub fn convert(&mut self, block: &AudioBlock, out: &mut Vec<AudioBlock>) {
        let channels = usize::from(self.in_channels);
        let zeros;
        let samples: &[f32] = match &block.samples {
            BlockSamples::Audio(samples) => samples,
            BlockSamples::Silence if self.resampler.is_none() => {
                // Silence stays silence, without materialising it.
                let frames = block.frames;
                self.push_out(frames, BlockSamples::Silence, out);
                return;
            }
            BlockSamples::Silence => {
                // Through the resampler, so its timing stays exact.
                zeros = vec![0.0; block.frames * channels];
                &zeros
            }
        };
        let mut laid_out = std::mem::take(&mut self.layout_scratch);
        laid_out.clear();
        match self.format.layout {
            Layout::Keep => laid_out.extend_from_slice(samples),
            Layout::Mono if channels == 1 => laid_out.extend_from_slice(samples),
            Layout::Mono if channels == 2 => downmix_to_mono(samples, &mut laid_out),
            Layout::Mono => laid_out.extend(
                samples
                    .chunks_exact(channels)
                    .map(|f| f.iter().sum::<f32>() / channels as f32),
            ),
            Layout::Channel(c) => {
                let c = usize::from(c).min(channels - 1);
                laid_out.extend(samples.chunks_exact(channels).map(|f| f[c]));
            }
        }
        let mut converted = self.spare.pop().unwrap_or_default();
        converted.clear();
        match self.resampler.as_mut() {
            None => converted.extend_from_slice(&laid_out),
            Some(resampler) => resampler.process(&laid_out, &mut converted),
        }
        self.layout_scratch = laid_out;
        let frames = converted.len() / usize::from(self.out_channels);
        self.push_out(frames, BlockSamples::Audio(converted), out);
    }

    /// End of stream: the resampler's tail, so the total is exact.
    pub fn finish(&mut self, out: &mut Vec<AudioBlock>) {
        if let Some(resampler) = self.resampler.as_mut() {
            let mut tail = Vec::new();
            resampler.finish(&mut tail);
            let frames = tail.len() / usize::from(self.out_channels);
            self.push_out(frames, BlockSamples::Audio(tail), out);
        }
    }

    /// Takes back converted blocks (emptying `blocks`), keeping their buffers.
    pub fn recycle(&mut self, blocks: &mut Vec<AudioBlock>) {
        super::recycle_into(&mut self.spare, blocks);
    }

    fn push_out(&mut self, frames: usize, samples: BlockSamples, out: &mut Vec<AudioBlock>) {
        if frames == 0 {
            return;
        }
        out.push(AudioBlock {
            start_frame: self.next_frame,
            frames,
            channels: self.out_channels,
            samples,
        });
        self.next_frame += frames as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audio(start_frame: u64, channels: u16, samples: Vec<f32>) -> AudioBlock {
        AudioBlock {
            start_frame,
            frames: samples.len() / usize::from(channels),
            channels,
            samples: BlockSamples::Audio(samples),
        }
    }

    #[test]
    fn layouts_pick_and_mix_channels() {
        let stereo = audio(0, 2, vec![0.2, 0.4, -0.2, 0.0]);
        let mut out = Vec::new();
        let mut right = Converter::new(
            8000,
            2,
            OutputFormat {
                sample_rate: None,
                layout: Layout::Channel(1),
            },
        )
        .unwrap();
        right.convert(&stereo, &mut out);
        assert_eq!(out[0].samples, BlockSamples::Audio(vec![0.4, 0.0]));
        out.clear();
        let mut mono = Converter::new(
            8000,
            2,
            OutputFormat {
                sample_rate: None,
                layout: Layout::Mono,
            },
        )
        .unwrap();
        mono.convert(&stereo, &mut out);
        match &out[0].samples {
            BlockSamples::Audio(s) => {
                assert!((s[0] - 0.3).abs() < 1e-6 && (s[1] + 0.1).abs() < 1e-6)
            }
            other => panic!("{other:?}"),
        }
        assert!(Converter::new(8000, 2, OutputFormat::NATIVE)
            .unwrap()
            .is_identity());
    }

    #[test]
    fn resampled_output_is_exact_in_length_and_contiguous() {
        let mut c = Converter::new(
            48_000,
            1,
            OutputFormat {
                sample_rate: Some(16_000),
                layout: Layout::Keep,
            },
        )
        .unwrap();
        let mut out = Vec::new();
        let mut start = 0;
        for n in [960usize, 7, 960, 1, 4800] {
            c.convert(&audio(start, 1, vec![0.1; n]), &mut out);
            start += n as u64;
        }
        c.convert(
            &AudioBlock {
                start_frame: start,
                frames: 480,
                channels: 1,
                samples: BlockSamples::Silence,
            },
            &mut out,
        );
        start += 480;
        c.finish(&mut out);
        let total: usize = out.iter().map(|b| b.frames).sum();
        assert_eq!(total as u64, (start as f64 / 3.0).round() as u64);
        let mut expected_start = 0;
        for b in &out {
            assert_eq!(b.start_frame, expected_start);
            expected_start += b.frames as u64;
        }
    }
}
