//! Cuts one channel's audio into utterances, from a frame-by-frame speech
//! decision.
//!
//! Pure and clock-free: positions are sample counts at 16 kHz from the start
//! of the stream. An utterance starts `pre_roll` before the first of
//! `min_speech_frames` consecutive speech frames (so the first phoneme's soft
//! start is not clipped) and ends `hangover` after the last speech frame (so a
//! pause between words does not split a sentence). Utterances longer than
//! `max_utterance` are cut at the quietest frame near the limit, where a
//! recognizer loses least.

use std::collections::VecDeque;

/// A frame-level voice detector.
pub trait SpeechDetector: Send {
    /// Samples per frame at 16 kHz; every call gets exactly this many.
    fn frame_samples(&self) -> usize;
    /// Probability that the frame holds speech, 0..=1.
    fn speech_probability(&mut self, frame: &[i16]) -> f32;
}

/// Segmentation settings, in frames of the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmenterSettings {
    pub frame_samples: usize,
    pub pre_roll_frames: usize,
    pub hangover_frames: usize,
    /// Consecutive speech frames that confirm an onset.
    pub min_speech_frames: usize,
    pub max_utterance_frames: usize,
    /// How far back from the limit the quietest frame is looked for.
    pub cut_search_frames: usize,
}

impl SegmenterSettings {
    /// Converts millisecond settings to whole frames (rounded up, at least 1
    /// where a zero would make no sense).
    pub fn from_ms(
        frame_samples: usize,
        pre_roll_ms: u64,
        hangover_ms: u64,
        min_speech_ms: u64,
        max_utterance_ms: u64,
        cut_search_ms: u64,
    ) -> Self {
        let frames = |ms: u64| -> usize {
            let samples = ms as usize * 16;
            samples.div_ceil(frame_samples.max(1))
        };
        let max_utterance_frames = frames(max_utterance_ms).max(2);
        Self {
            frame_samples,
            pre_roll_frames: frames(pre_roll_ms),
            hangover_frames: frames(hangover_ms).max(1),
            min_speech_frames: frames(min_speech_ms).max(1),
            max_utterance_frames,
            cut_search_frames: frames(cut_search_ms).clamp(1, max_utterance_frames - 1),
        }
    }
}

/// What the segmenter found, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// Speech began at sample `at` (the first speech frame, before pre-roll).
    SpeechStarted { at: u64 },
    /// Speech stopped at sample `at` (the end of the last speech frame), or
    /// the utterance was cut there for length or a flush.
    SpeechEnded { at: u64 },
    /// The audio of the utterance that just ended, from sample `start`.
    Utterance { start: u64, samples: Vec<i16> },
}

enum State {
    Silence,
    Speech,
}

pub struct Segmenter<D> {
    detector: D,
    settings: SegmenterSettings,
    threshold: f32,
    /// The frame being filled.
    partial: Vec<f32>,
    /// The whole frame as 16-bit samples, reused.
    frame: Vec<i16>,
    /// Sample position of the start of `partial`.
    position: u64,
    state: State,
    /// While silent: the most recent whole frames, for pre-roll, with their
    /// energies. Always frame-aligned.
    history: VecDeque<i16>,
    history_energy: VecDeque<f32>,
    speech_run: usize,
    /// While in speech: the utterance so far, frame-aligned, and the energy
    /// of each of its frames.
    utterance: Vec<i16>,
    utterance_energy: Vec<f32>,
    utterance_start: u64,
    last_speech_end: u64,
    silence_run: usize,
}

impl<D: SpeechDetector> Segmenter<D> {
    pub fn new(detector: D, settings: SegmenterSettings, threshold: f32) -> Self {
        debug_assert_eq!(detector.frame_samples(), settings.frame_samples);
        Self {
            detector,
            settings,
            threshold,
            partial: Vec::with_capacity(settings.frame_samples),
            frame: Vec::with_capacity(settings.frame_samples),
            position: 0,
            state: State::Silence,
            history: VecDeque::new(),
            history_energy: VecDeque::new(),
            speech_run: 0,
            utterance: Vec::new(),
            utterance_energy: Vec::new(),
            utterance_start: 0,
            last_speech_end: 0,
            silence_run: 0,
        }
    }

    /// Whether an utterance is open.
    pub fn in_speech(&self) -> bool {
        matches!(self.state, State::Speech)
    }

    /// The open utterance, if any: its first sample and its audio so far
    /// (whole frames).
    pub fn open_utterance(&self) -> Option<(u64, &[i16])> {
        self.in_speech()
            .then_some((self.utterance_start, self.utterance.as_slice()))
    }

    /// Samples taken so far (the stream position at 16 kHz).
    pub fn samples_seen(&self) -> u64 {
        self.position + self.partial.len() as u64
    }

    /// Takes mono 16 kHz samples in [-1, 1].
    pub fn push(&mut self, mut samples: &[f32], out: &mut Vec<Segment>) {
        let frame = self.settings.frame_samples;
        while !samples.is_empty() {
            let take = (frame - self.partial.len()).min(samples.len());
            self.partial.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.partial.len() == frame {
                self.frame.clear();
                self.frame.extend(self.partial.iter().map(|&s| to_i16(s)));
                self.partial.clear();
                self.on_frame(out);
            }
        }
    }

    /// Ends the open utterance now (the client sent `flush`). Audio of a
    /// frame not yet complete stays for the next utterance.
    pub fn force_end(&mut self, out: &mut Vec<Segment>) {
        if self.in_speech() {
            self.end_utterance(self.last_speech_end, out);
        }
    }

    /// Ends the stream: an open utterance ends with everything received.
    pub fn finish(&mut self, out: &mut Vec<Segment>) {
        if self.in_speech() {
            self.utterance
                .extend(self.partial.iter().map(|&s| to_i16(s)));
            self.partial.clear();
            self.end_utterance(self.last_speech_end, out);
        }
    }

    fn on_frame(&mut self, out: &mut Vec<Segment>) {
        let frame = &self.frame;
        let frame_samples = self.settings.frame_samples as u64;
        let speech = self.detector.speech_probability(frame) >= self.threshold;
        let energy = frame.iter().map(|&s| f32::from(s).powi(2)).sum::<f32>() / frame.len() as f32;
        let frame_end = self.position + frame_samples;
        match self.state {
            State::Silence => {
                self.history.extend(frame.iter().copied());
                self.history_energy.push_back(energy);
                let keep_frames = self.settings.pre_roll_frames + self.settings.min_speech_frames;
                while self.history_energy.len() > keep_frames {
                    self.history_energy.pop_front();
                    self.history.drain(..self.settings.frame_samples);
                }
                self.speech_run = if speech { self.speech_run + 1 } else { 0 };
                if self.speech_run >= self.settings.min_speech_frames {
                    let onset = frame_end - self.speech_run as u64 * frame_samples;
                    // `history` ends at `frame_end` and holds whole frames.
                    let history_start = frame_end - self.history.len() as u64;
                    let pre_roll = (self.settings.pre_roll_frames as u64) * frame_samples;
                    let start = onset.saturating_sub(pre_roll).max(history_start);
                    let skip_frames = ((start - history_start) / frame_samples) as usize;
                    self.utterance.clear();
                    self.utterance.extend(
                        self.history
                            .iter()
                            .skip(skip_frames * self.settings.frame_samples),
                    );
                    self.utterance_energy.clear();
                    self.utterance_energy
                        .extend(self.history_energy.iter().skip(skip_frames));
                    self.utterance_start = start;
                    self.history.clear();
                    self.history_energy.clear();
                    self.speech_run = 0;
                    self.silence_run = 0;
                    self.last_speech_end = frame_end;
                    self.state = State::Speech;
                    out.push(Segment::SpeechStarted { at: onset });
                }
            }
            State::Speech => {
                self.utterance.extend(frame.iter().copied());
                self.utterance_energy.push(energy);
                if speech {
                    self.silence_run = 0;
                    self.last_speech_end = frame_end;
                } else {
                    self.silence_run += 1;
                }
                if self.silence_run >= self.settings.hangover_frames {
                    self.end_utterance(self.last_speech_end, out);
                } else if self.utterance_energy.len() >= self.settings.max_utterance_frames {
                    self.cut(out);
                }
            }
        }
        self.position = frame_end;
    }

    fn end_utterance(&mut self, speech_end: u64, out: &mut Vec<Segment>) {
        out.push(Segment::SpeechEnded { at: speech_end });
        out.push(Segment::Utterance {
            start: self.utterance_start,
            samples: std::mem::take(&mut self.utterance),
        });
        self.utterance_energy.clear();
        self.silence_run = 0;
        self.speech_run = 0;
        self.state = State::Silence;
    }

    /// Splits an over-long utterance after its quietest frame among the last
    /// `cut_search_frames`; the rest continues as a new utterance.
    fn cut(&mut self, out: &mut Vec<Segment>) {
        let frames = self.utterance_energy.len();
        let from = frames - self.settings.cut_search_frames.min(frames - 1);
        let mut quietest = from;
        for index in from..frames {
            // `<=`: among equals the latest, so the first part is longest.
            if self.utterance_energy[index] <= self.utterance_energy[quietest] {
                quietest = index;
            }
        }
        let keep_frames = quietest + 1;
        let keep_samples = keep_frames * self.settings.frame_samples;
        let cut_at = self.utterance_start + keep_samples as u64;
        let rest = self.utterance.split_off(keep_samples);
        let first = std::mem::replace(&mut self.utterance, rest);
        self.utterance_energy.drain(..keep_frames);
        out.push(Segment::SpeechEnded { at: cut_at });
        out.push(Segment::Utterance {
            start: self.utterance_start,
            samples: first,
        });
        out.push(Segment::SpeechStarted { at: cut_at });
        self.utterance_start = cut_at;
        self.last_speech_end = self.last_speech_end.max(cut_at);
    }
}

fn to_i16(sample: f32) -> i16 {
    // `as` saturates, and NaN becomes 0.
    (sample * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detector that reads its decision off the signal: a frame is speech
    /// when its first sample is positive. Lets a test spell out the exact
    /// decision sequence and check exact boundaries.
    struct Scripted;

    impl SpeechDetector for Scripted {
        fn frame_samples(&self) -> usize {
            4
        }
        fn speech_probability(&mut self, frame: &[i16]) -> f32 {
            if frame[0] > 0 {
                1.0
            } else {
                0.0
            }
        }
    }

    const SETTINGS: SegmenterSettings = SegmenterSettings {
        frame_samples: 4,
        pre_roll_frames: 2,
        hangover_frames: 3,
        min_speech_frames: 2,
        max_utterance_frames: 100,
        cut_search_frames: 10,
    };

    /// `pattern`: one char per frame, `s` speech, `.` silence. Each frame's
    /// samples carry the frame index so boundaries can be checked exactly.
    fn frames(pattern: &str) -> Vec<f32> {
        pattern
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let level = (i as f32 + 1.0) / 1000.0;
                let v = if c == 's' { level } else { -level };
                [v; 4]
            })
            .collect()
    }

    fn run(pattern: &str, settings: SegmenterSettings) -> Vec<Segment> {
        let mut seg = Segmenter::new(Scripted, settings, 0.5);
        let mut out = Vec::new();
        // Odd chunk sizes: framing must not depend on how audio arrives.
        for chunk in frames(pattern).chunks(3) {
            seg.push(chunk, &mut out);
        }
        seg.finish(&mut out);
        out
    }

    fn bounds(out: &[Segment]) -> Vec<(&'static str, u64, u64)> {
        out.iter()
            .map(|s| match s {
                Segment::SpeechStarted { at } => ("start", *at, 0),
                Segment::SpeechEnded { at } => ("end", *at, 0),
                Segment::Utterance { start, samples } => {
                    ("utt", *start, *start + samples.len() as u64)
                }
            })
            .collect()
    }

    #[test]
    fn one_utterance_with_pre_roll_and_hangover() {
        // frames: 0-4 silence, 5-9 speech, 10-14 silence.
        let out = run(".....sssss.....", SETTINGS);
        assert_eq!(
            bounds(&out),
            [
                ("start", 20, 0), // frame 5
                ("end", 40, 0),   // after frame 9
                ("utt", 12, 52),  // pre-roll from frame 3; hangover to frame 12
            ]
        );
    }

    #[test]
    fn a_single_speech_frame_is_not_an_onset() {
        let out = run("...s....s...", SETTINGS);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_pause_shorter_than_the_hangover_keeps_one_utterance() {
        let out = run("..sss..sss......", SETTINGS);
        assert_eq!(
            bounds(&out),
            [("start", 8, 0), ("end", 40, 0), ("utt", 0, 52)]
        );
    }

    #[test]
    fn a_pause_as_long_as_the_hangover_splits() {
        let out = run("..sss...sss......", SETTINGS);
        assert_eq!(
            bounds(&out),
            [
                ("start", 8, 0),
                ("end", 20, 0),
                ("utt", 0, 32),
                // Pre-roll cannot reach back into the previous utterance.
                ("start", 32, 0),
                ("end", 44, 0),
                ("utt", 32, 56),
            ]
        );
    }

    #[test]
    fn speech_at_the_very_start_has_no_pre_roll_and_an_open_end_is_closed_by_finish() {
        let out = run("ssss", SETTINGS);
        assert_eq!(
            bounds(&out),
            [("start", 0, 0), ("end", 16, 0), ("utt", 0, 16)]
        );
    }

    #[test]
    fn finish_keeps_a_partial_frame() {
        let mut seg = Segmenter::new(Scripted, SETTINGS, 0.5);
        let mut out = Vec::new();
        let mut audio = frames("sss");
        audio.extend([0.5, 0.5]);
        seg.push(&audio, &mut out);
        seg.finish(&mut out);
        assert_eq!(
            bounds(&out),
            [("start", 0, 0), ("end", 12, 0), ("utt", 0, 14)]
        );
    }

    #[test]
    fn long_speech_is_cut_at_the_quietest_frame_near_the_limit() {
        let settings = SegmenterSettings {
            max_utterance_frames: 10,
            cut_search_frames: 4,
            pre_roll_frames: 0,
            ..SETTINGS
        };
        // Speech throughout; frame energies grow with the index, so the
        // quietest frame in the search window (frames 6..=9) is frame 6.
        let out = run("ssssssssssssss", settings);
        assert_eq!(
            bounds(&out),
            [
                ("start", 0, 0),
                ("end", 28, 0),
                ("utt", 0, 28),
                ("start", 28, 0),
                ("end", 56, 0),
                ("utt", 28, 56),
            ]
        );
    }

    #[test]
    fn a_cut_prefers_a_quiet_frame() {
        let settings = SegmenterSettings {
            max_utterance_frames: 10,
            cut_search_frames: 5,
            pre_roll_frames: 0,
            ..SETTINGS
        };
        let mut audio = frames("ssssssssssss");
        // Frame 8 nearly silent but still "speech" to the detector.
        for s in &mut audio[32..36] {
            *s = 1e-4;
        }
        let mut seg = Segmenter::new(Scripted, settings, 0.5);
        let mut out = Vec::new();
        seg.push(&audio, &mut out);
        assert_eq!(
            bounds(&out)[..3],
            [("start", 0, 0), ("end", 36, 0), ("utt", 0, 36)]
        );
    }

    #[test]
    fn force_end_sends_the_open_utterance_and_speech_restarts_after_onset() {
        let mut seg = Segmenter::new(Scripted, SETTINGS, 0.5);
        let mut out = Vec::new();
        seg.push(&frames("..sss"), &mut out);
        seg.force_end(&mut out);
        assert_eq!(
            bounds(&out),
            [("start", 8, 0), ("end", 20, 0), ("utt", 0, 20)]
        );
        out.clear();
        seg.push(&frames("ss...."), &mut out);
        // Positions continue: the second push starts at sample 20.
        assert_eq!(
            bounds(&out),
            [("start", 20, 0), ("end", 28, 0), ("utt", 20, 40)]
        );
    }

    #[test]
    fn audio_is_kept_sample_exact() {
        let mut seg = Segmenter::new(Scripted, SETTINGS, 0.5);
        let mut out = Vec::new();
        let audio = frames("..sss.....");
        seg.push(&audio, &mut out);
        let Some(Segment::Utterance { start, samples }) = out.last() else {
            panic!("{out:?}");
        };
        let expected: Vec<i16> = audio[*start as usize..*start as usize + samples.len()]
            .iter()
            .map(|&s| to_i16(s))
            .collect();
        assert_eq!(samples, &expected);
    }

    #[test]
    fn the_open_utterance_grows_from_its_start_until_it_ends() {
        let mut seg = Segmenter::new(Scripted, SETTINGS, 0.5);
        let mut out = Vec::new();
        seg.push(&frames("..."), &mut out);
        assert_eq!(seg.open_utterance(), None);
        seg.push(&frames("..sss")[12..], &mut out);
        let (start, samples) = seg.open_utterance().unwrap();
        // Onset at frame 3, two frames of pre-roll: frames 1-4 so far.
        assert_eq!((start, samples.len()), (4, 16));
        seg.push(&frames("..sss......")[20..], &mut out);
        assert_eq!(seg.open_utterance(), None);
    }

    #[test]
    fn settings_from_ms_round_up_to_frames() {
        let s = SegmenterSettings::from_ms(256, 200, 400, 48, 15_000, 2_000);
        assert_eq!(s.pre_roll_frames, 13); // 3200 samples / 256
        assert_eq!(s.hangover_frames, 25);
        assert_eq!(s.min_speech_frames, 3);
        assert_eq!(s.max_utterance_frames, 938);
        assert_eq!(s.cut_search_frames, 125);
    }
}
