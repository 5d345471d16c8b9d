//! Time and replay for a streaming upstream (pure: no IO, no clock).
//!
//! An upstream counts time from the start of each connection. cochlea counts
//! it from the start of the stream. [`TimeMap`] turns one into the other
//! across replays and holes; [`ReplayBuffer`] keeps the audio sent that no
//! final result covers yet, so a new connection can be sent it again.

use std::collections::VecDeque;

/// Seconds as a peer sent them, to frames at `rate`. A peer's number: `as`
/// saturates, so NaN and negatives become 0 and huge values the maximum.
pub fn frames_of(seconds: f64, rate: u32) -> u64 {
    (seconds * f64::from(rate)).round() as u64
}

pub fn seconds_of(frames: u64, rate: u32) -> f64 {
    frames as f64 / f64::from(rate.max(1))
}

/// One connection's time (frames since it opened) to stream time: each
/// segment starts where the audio sent jumps (the replay at a reconnect, a
/// hole left by dropped audio).
#[derive(Debug, Default)]
pub struct TimeMap {
    /// `(upstream_frame, stream_frame)` where each run of audio starts.
    segments: Vec<(u64, u64)>,
    upstream_end: u64,
    stream_next: u64,
}

impl TimeMap {
    /// Audio of `frames` from `stream_start` is sent next.
    pub fn append(&mut self, stream_start: u64, frames: u64) {
        if self.segments.is_empty() || stream_start != self.stream_next {
            self.segments.push((self.upstream_end, stream_start));
        }
        self.upstream_end = self.upstream_end.saturating_add(frames);
        self.stream_next = stream_start.saturating_add(frames);
    }

    pub fn to_stream(&self, upstream_frame: u64) -> u64 {
        let index = self
            .segments
            .partition_point(|(up, _)| *up <= upstream_frame)
            .saturating_sub(1);
        match self.segments.get(index) {
            Some((up, stream)) => stream.saturating_add(upstream_frame.saturating_sub(*up)),
            None => upstream_frame,
        }
    }

    /// Frames sent on this connection so far.
    pub fn upstream_end(&self) -> u64 {
        self.upstream_end
    }

    /// Drops segments that end before `upstream_frame` (results there are in).
    pub fn forget_before(&mut self, upstream_frame: u64) {
        let keep_from = self
            .segments
            .partition_point(|(up, _)| *up <= upstream_frame)
            .saturating_sub(1);
        self.segments.drain(..keep_from);
    }
}

/// Audio sent and not yet covered by a final (interleaved s16le), at most
/// `max_frames`.
#[derive(Debug)]
pub struct ReplayBuffer {
    chunks: VecDeque<(u64, Vec<u8>)>,
    frame_bytes: usize,
    frames: u64,
    max_frames: u64,
}

impl ReplayBuffer {
    pub fn new(channels: u16, max_frames: u64) -> Self {
        Self {
            chunks: VecDeque::new(),
            frame_bytes: 2 * usize::from(channels.max(1)),
            frames: 0,
            max_frames,
        }
    }

    pub fn frames_in(&self, bytes: &[u8]) -> u64 {
        (bytes.len() / self.frame_bytes) as u64
    }

    pub fn push(&mut self, start_frame: u64, bytes: Vec<u8>) {
        self.frames += self.frames_in(&bytes);
        self.chunks.push_back((start_frame, bytes));
        while self.frames > self.max_frames {
            let Some((_, old)) = self.chunks.pop_front() else {
                break;
            };
            self.frames -= self.frames_in(&old);
        }
    }

    /// Everything before stream frame `frame` is transcribed.
    pub fn ack(&mut self, frame: u64) {
        while let Some((start, bytes)) = self.chunks.front_mut() {
            let frames = (bytes.len() / self.frame_bytes) as u64;
            let end = *start + frames;
            if end <= frame {
                self.frames -= frames;
                self.chunks.pop_front();
            } else {
                if *start < frame {
                    let cut = frame - *start;
                    bytes.drain(..(cut as usize) * self.frame_bytes);
                    *start = frame;
                    self.frames -= cut;
                }
                break;
            }
        }
    }

    /// The oldest frame kept.
    pub fn oldest(&self) -> Option<u64> {
        self.chunks.front().map(|(start, _)| *start)
    }

    pub fn chunks(&self) -> impl Iterator<Item = &(u64, Vec<u8>)> {
        self.chunks.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_map_follows_replays_and_holes() {
        let mut map = TimeMap::default();
        // A reconnect replays from stream frame 16000 (1 s).
        map.append(16_000, 8_000);
        map.append(24_000, 8_000);
        assert_eq!(map.to_stream(0), 16_000);
        assert_eq!(map.to_stream(12_000), 28_000);
        // A hole: the next audio starts at 3 s.
        map.append(48_000, 16_000);
        assert_eq!(map.to_stream(16_000), 48_000);
        assert_eq!(map.to_stream(20_000), 52_000);
        assert_eq!(map.upstream_end(), 32_000);
        map.forget_before(20_000);
        assert_eq!(map.to_stream(20_000), 52_000);
    }

    #[test]
    fn the_replay_buffer_keeps_the_unacknowledged_tail_within_its_bound() {
        let mut replay = ReplayBuffer::new(1, 100);
        replay.push(0, vec![0; 2 * 60]);
        replay.push(60, vec![0; 2 * 60]);
        // 120 frames > 100: the oldest chunk goes.
        assert_eq!(replay.oldest(), Some(60));
        replay.ack(90);
        assert_eq!(replay.oldest(), Some(90));
        assert_eq!(replay.chunks().next().map(|(_, b)| b.len()), Some(2 * 30));
        replay.ack(500);
        assert_eq!(replay.oldest(), None);
    }

    #[test]
    fn peer_seconds_become_frames_without_panics() {
        assert_eq!(frames_of(1.5, 16_000), 24_000);
        assert_eq!(frames_of(1.5, 24_000), 36_000);
        assert_eq!(frames_of(-3.0, 16_000), 0);
        assert_eq!(frames_of(f64::NAN, 16_000), 0);
        assert_eq!(frames_of(f64::INFINITY, 16_000), u64::MAX);
        assert_eq!(seconds_of(8_000, 16_000), 0.5);
    }
}
