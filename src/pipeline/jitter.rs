//! Jitter buffer for `framing=seq` messages: puts them back in media order,
//! holds a hole open for a bounded time in case the missing message is only
//! late, and reports what never came as a gap.
//!
//! Sans-IO in the str0m manner: [`JitterBuffer::push`] takes a message,
//! [`JitterBuffer::pop`] hands back what is due, [`JitterBuffer::next_deadline`]
//! says when to call `pop` again. Time only comes in as `now` arguments; the
//! buffer never reads a clock, so every loss and reorder case is a unit test.
//!
//! Media time is counted in sample frames. Releases are contiguous: every
//! frame from 0 up to [`JitterBuffer::next_timestamp`] was handed out exactly
//! once, either as a [`Released::Packet`] or inside a [`Released::Gap`].
//!
//! Why the target delay starts at `min_delay_ms`: the transport is usually one
//! TCP connection, which never reorders, so a hole is almost always a message
//! the client dropped and waiting for it only adds latency. The buffer learns
//! a longer wait only from evidence: a message that filled a hole after it had
//! been open for a while, or one that came after its hole was given up.
//!
//! Hostile input (seq jumps, timestamps near `u64::MAX`, frame counts that
//! overflow) never panics: arithmetic saturates. Capping the size of a single
//! gap is the caller's job (`max_gap_ms`); this module only keeps the
//! accounting exact.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

/// How long to wait for missing messages, and how much to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitterConfig {
    /// Sample frames per second: turns held frames into milliseconds.
    pub sample_rate: u32,
    /// Longest a hole is held open (default 200). The fixed wait when
    /// `adaptive` is false.
    pub max_delay_ms: u32,
    /// Shortest wait, and where the adaptive wait starts (default 0). Raised
    /// to `max_delay_ms` if it is larger.
    pub min_delay_ms: u32,
    /// Learn the wait from observed reordering (default true).
    pub adaptive: bool,
    /// Held messages before holes are released without waiting (default 512).
    pub capacity_packets: usize,
}

impl JitterConfig {
    /// The defaults for a stream at `sample_rate`.
    pub const fn new(sample_rate: u32) -> Self {
        Self {
            sample_rate,
            max_delay_ms: 200,
            min_delay_ms: 0,
            adaptive: true,
            capacity_packets: 512,
        }
    }
}

/// What [`JitterBuffer::push`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Held until its turn.
    Accepted,
    /// Discarded: its seq was already released or is held, or it claims media
    /// time or an order that a held message already claims (the first wins).
    Duplicate,
    /// Discarded: its media time was already released, as a gap.
    Late,
    /// Held, but the buffer is over `capacity_packets`: the next `pop`
    /// releases holes without waiting for their deadline until it is back
    /// within capacity. Audio is never dropped to make room.
    Overflow,
}

/// What [`JitterBuffer::pop`] hands out, in media order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released<P> {
    Packet {
        seq: u32,
        timestamp: u64,
        frames: u64,
        payload: P,
    },
    /// Media time that no message filled: conceal it or write silence.
    Gap { timestamp: u64, frames: u64 },
}

impl<P> Released<P> {
    /// Media position of the first frame.
    pub fn timestamp(&self) -> u64 {
        match self {
            Released::Packet { timestamp, .. } | Released::Gap { timestamp, .. } => *timestamp,
        }
    }

    pub fn frames(&self) -> u64 {
        match self {
            Released::Packet { frames, .. } | Released::Gap { frames, .. } => *frames,
        }
    }
}

/// Running totals. Every push counts once in `packets_received`, and at most
/// once more as duplicated or late.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Every message pushed, duplicates and late ones included.
    pub packets_received: u64,
    pub packets_duplicated: u64,
    /// Arrived after their slot was released as a gap: discarded.
    pub packets_late: u64,
    /// Seq numbers skipped over by the releases: never arrived in time.
    pub packets_lost: u64,
    /// Frames released as [`Released::Gap`].
    pub concealed_frames: u64,
    /// Media duration of the held messages.
    pub current_delay_ms: u32,
    /// How long a hole is currently held open.
    pub target_delay_ms: u32,
}

/// Seqs below `next_seq` whose fate is remembered, to tell a late message
/// (slot given up) from a resend of one already released.
const SEQ_WINDOW: u64 = 1024;
/// Recently released holes, to measure how late a late message was.
const RECENT_GAPS: usize = 8;

struct Held<P> {
    frames: u64,
    payload: P,
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    seq: u32,
    at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct GivenUp {
    start: u64,
    end: u64,
    first_seen: Instant,
}

pub struct JitterBuffer<P> {
    config: JitterConfig,
    /// Keyed by (timestamp, seq). Invariant: in key order the seqs strictly
    /// increase and the media ranges do not overlap; every key has
    /// `timestamp >= next_timestamp` and `seq >= next_seq`. `push` rejects
    /// anything that would break this, so releases never have to.
    held: BTreeMap<(u64, u32), Held<P>>,
    held_frames: u128,
    /// Accepted messages in arrival order. The front is always the earliest
    /// arrival still held: the moment the hole before the head was first
    /// seen. Released entries behind the front are dropped lazily.
    arrivals: VecDeque<Arrival>,
    next_timestamp: u64,
    /// Every seq below this was released or given up. u64 so that seq
    /// `u32::MAX` can be passed.
    next_seq: u64,
    last_released_seq: Option<u32>,
    /// Bit `seq % SEQ_WINDOW`, for seqs in `next_seq - SEQ_WINDOW..next_seq`:
    /// set when released as a packet or already reported late.
    seen: [u64; (SEQ_WINDOW / 64) as usize],
    given_up: [Option<GivenUp>; RECENT_GAPS],
    given_up_next: usize,
    /// Decaying maximum of observed reorder delays, in microseconds.
    reorder_us: u64,
    target_delay_ms: u32,
    stats: JitterStats,
}

impl<P> JitterBuffer<P> {
    pub fn new(mut config: JitterConfig) -> Self {
        config.max_delay_ms = config.max_delay_ms.max(config.min_delay_ms);
        let target_delay_ms = if config.adaptive {
            config.min_delay_ms
        } else {
            config.max_delay_ms
        };
        Self {
            config,
            held: BTreeMap::new(),
            held_frames: 0,
            arrivals: VecDeque::new(),
            next_timestamp: 0,
            next_seq: 0,
            last_released_seq: None,
            seen: [0; (SEQ_WINDOW / 64) as usize],
            given_up: [None; RECENT_GAPS],
            given_up_next: 0,
            reorder_us: 0,
            target_delay_ms,
            stats: JitterStats::default(),
        }
    }

    /// Takes one message. `frames` is its media duration in sample frames,
    /// `timestamp` the media position of its first frame. Call [`Self::pop`]
    /// afterwards: an accepted message may be releasable at once.
    pub fn push(
        &mut self,
        seq: u32,
        timestamp: u64,
        frames: u64,
        payload: P,
        now: Instant,
    ) -> Pushed {
        self.stats.packets_received += 1;
        let seq_wide = u64::from(seq);
        if seq_wide < self.next_seq {
            // Already accounted for: either released (a resend) or given up
            // (late). Older than the window we cannot tell; a resend is the
            // likelier story that far back.
            if self.next_seq - seq_wide <= SEQ_WINDOW && !self.is_seen(seq) {
                self.mark_seen(seq);
                return self.late(timestamp, now);
            }
            self.stats.packets_duplicated += 1;
            return Pushed::Duplicate;
        }
        if timestamp < self.next_timestamp {
            // A seq not accounted for, yet its media time is: the client's
            // seq and timestamp disagree. The media time decides.
            return self.late(timestamp, now);
        }
        if self.conflicts(seq, timestamp, frames) {
            self.stats.packets_duplicated += 1;
            return Pushed::Duplicate;
        }
        if let Some(((head_ts, head_seq), first_seen)) = self.hole() {
            if (timestamp, seq) < (head_ts, head_seq) {
                // Fills (part of) the hole being held open: that is how long
                // reordering made us wait.
                self.observe(now.saturating_duration_since(first_seen));
            }
        }
        let over = self.held.len() >= self.config.capacity_packets;
        self.held.insert((timestamp, seq), Held { frames, payload });
        self.held_frames = self.held_frames.saturating_add(u128::from(frames));
        self.arrivals.push_back(Arrival { seq, at: now });
        if self.arrivals.len() > 2 * self.held.len() + 32 {
            // Entries released behind the front pile up when a message is
            // held for long; drop them in one pass (amortized O(1)).
            let next_seq = self.next_seq;
            self.arrivals.retain(|a| u64::from(a.seq) >= next_seq);
        }
        if over {
            Pushed::Overflow
        } else {
            Pushed::Accepted
        }
    }

    /// The next release that is due at `now`, in media order. Call until
    /// `None`, after every push and when [`Self::next_deadline`] passes.
    pub fn pop(&mut self, now: Instant) -> Option<Released<P>> {
        self.release(Some(now))
    }

    /// When `pop` will next have something: the deadline of the hole being
    /// held open, or an instant already past if something is due now. `None`
    /// when nothing is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        let (&(timestamp, seq), _) = self.held.first_key_value()?;
        let first_seen = self.arrivals.front()?.at;
        if timestamp <= self.next_timestamp || self.hole_is_due_anyway(seq) {
            return Some(first_seen);
        }
        first_seen.checked_add(self.target_delay())
    }

    /// End of stream: everything held, in media order, holes released as gaps
    /// without waiting. The buffer stays usable.
    pub fn drain(&mut self) -> Vec<Released<P>> {
        let mut out = Vec::with_capacity(self.held.len() * 2);
        while let Some(released) = self.release(None) {
            out.push(released);
        }
        out
    }

    pub fn stats(&self) -> JitterStats {
        let ms = self
            .held_frames
            .saturating_mul(1000)
            .checked_div(u128::from(self.config.sample_rate))
            .unwrap_or(0);
        JitterStats {
            current_delay_ms: u32::try_from(ms).unwrap_or(u32::MAX),
            target_delay_ms: self.target_delay_ms,
            ..self.stats
        }
    }

    /// Highest seq released as a packet (gaps release none): what to ack.
    pub fn last_released_seq(&self) -> Option<u32> {
        self.last_released_seq
    }

    /// Media position of the next release.
    pub fn next_timestamp(&self) -> u64 {
        self.next_timestamp
    }

    fn target_delay(&self) -> Duration {
        Duration::from_millis(u64::from(self.target_delay_ms))
    }

    /// The head key and when its hole was first seen, if the head does not
    /// start at `next_timestamp`.
    fn hole(&self) -> Option<((u64, u32), Instant)> {
        let (&key, _) = self.held.first_key_value()?;
        let first_seen = self.arrivals.front()?.at;
        (key.0 > self.next_timestamp).then_some((key, first_seen))
    }

    /// A hole with no seq missing before the head is a client-side skip:
    /// nothing can fill it. Over capacity, holes are not waited for either.
    fn hole_is_due_anyway(&self, head_seq: u32) -> bool {
        u64::from(head_seq) <= self.next_seq || self.held.len() > self.config.capacity_packets
    }

    /// Whether a new message contradicts its neighbours in the held set.
    fn conflicts(&self, seq: u32, timestamp: u64, frames: u64) -> bool {
        let key = (timestamp, seq);
        if let Some((&(ts, s), held)) = self.held.range(..=key).next_back() {
            if s >= seq || ts.saturating_add(held.frames) > timestamp {
                return true;
            }
        }
        if let Some((&(ts, s), _)) = self
            .held
            .range((Bound::Excluded(key), Bound::Unbounded))
            .next()
        {
            if s <= seq || timestamp.saturating_add(frames) > ts {
                return true;
            }
        }
        false
    }

    fn release(&mut self, now: Option<Instant>) -> Option<Released<P>> {
        let (&(timestamp, seq), _) = self.held.first_key_value()?;
        if timestamp > self.next_timestamp {
            let first_seen = self.arrivals.front().map(|a| a.at);
            let due = self.hole_is_due_anyway(seq)
                || match now {
                    None => true,
                    Some(now) => first_seen
                        .and_then(|seen| seen.checked_add(self.target_delay()))
                        .is_some_and(|deadline| now >= deadline),
                };
            if !due {
                return None;
            }
            let gap = Released::Gap {
                timestamp: self.next_timestamp,
                frames: timestamp - self.next_timestamp,
            };
            let missing = u64::from(seq).saturating_sub(self.next_seq);
            if missing > 0 {
                if let Some(first_seen) = first_seen {
                    self.given_up[self.given_up_next] = Some(GivenUp {
                        start: self.next_timestamp,
                        end: timestamp,
                        first_seen,
                    });
                    self.given_up_next = (self.given_up_next + 1) % RECENT_GAPS;
                }
            }
            self.stats.concealed_frames = self
                .stats
                .concealed_frames
                .saturating_add(timestamp - self.next_timestamp);
            self.skip_seqs_to(u64::from(seq));
            self.next_timestamp = timestamp;
            return Some(gap);
        }

        let ((timestamp, seq), held) = self.held.pop_first()?;
        self.held_frames = self.held_frames.saturating_sub(u128::from(held.frames));
        self.skip_seqs_to(u64::from(seq));
        self.next_seq = u64::from(seq) + 1;
        self.mark_seen(seq);
        self.last_released_seq = Some(seq);
        self.next_timestamp = timestamp.saturating_add(held.frames);
        while self
            .arrivals
            .front()
            .is_some_and(|a| u64::from(a.seq) < self.next_seq)
        {
            self.arrivals.pop_front();
        }
        self.decay();
        Some(Released::Packet {
            seq,
            timestamp,
            frames: held.frames,
            payload: held.payload,
        })
    }

    /// Moves `next_seq` up to `to`, counting the seqs passed over as lost
    /// and forgetting what the window knew about their slots.
    fn skip_seqs_to(&mut self, to: u64) {
        let from = self.next_seq;
        if to <= from {
            return;
        }
        self.stats.packets_lost = self.stats.packets_lost.saturating_add(to - from);
        for seq in from..to.min(from + SEQ_WINDOW) {
            self.seen[(seq % SEQ_WINDOW / 64) as usize] &= !(1 << (seq % 64));
        }
        self.next_seq = to;
    }

    fn is_seen(&self, seq: u32) -> bool {
        let seq = u64::from(seq);
        self.seen[(seq % SEQ_WINDOW / 64) as usize] & (1 << (seq % 64)) != 0
    }

    fn mark_seen(&mut self, seq: u32) {
        let seq = u64::from(seq);
        self.seen[(seq % SEQ_WINDOW / 64) as usize] |= 1 << (seq % 64);
    }

    fn late(&mut self, timestamp: u64, now: Instant) -> Pushed {
        self.stats.packets_late += 1;
        let hole = self
            .given_up
            .iter()
            .flatten()
            .find(|g| (g.start..g.end).contains(&timestamp))
            .copied();
        if let Some(hole) = hole {
            self.observe(now.saturating_duration_since(hole.first_seen));
        }
        Pushed::Late
    }

    /// A message arrived `delay` after the hole it belongs to was first seen.
    fn observe(&mut self, delay: Duration) {
        if !self.config.adaptive {
            return;
        }
        let cap = u64::from(self.config.max_delay_ms) * 1000;
        let us = u64::try_from(delay.as_micros())
            .unwrap_or(u64::MAX)
            .min(cap);
        self.reorder_us = self.reorder_us.max(us);
        self.retarget();
    }

    /// Without fresh evidence the wait shrinks back, 1 % per released message.
    fn decay(&mut self) {
        if self.config.adaptive && self.reorder_us > 0 {
            self.reorder_us = self.reorder_us * 99 / 100;
            self.retarget();
        }
    }

    /// Target = 1.25 × the decaying maximum, rounded up, within the bounds.
    fn retarget(&mut self) {
        let ms = (self.reorder_us * 5).div_ceil(4000);
        let ms = u32::try_from(ms).unwrap_or(u32::MAX);
        self.target_delay_ms = ms
            .max(self.config.min_delay_ms)
            .min(self.config.max_delay_ms);
    }
}

impl<P> std::fmt::Debug for JitterBuffer<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitterBuffer")
            .field("config", &self.config)
            .field("held", &self.held.len())
            .field("next_timestamp", &self.next_timestamp)
            .field("next_seq", &self.next_seq)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::netem::{schedule, NetEvent, NetemConfig};

    /// 20 ms messages at 8 kHz.
    const RATE: u32 = 8000;
    const F: u64 = 160;

    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Push at `at` ms (payload = seq), check the outcome, then pop until
        /// `None` at the same instant, as the session task does.
        Push {
            at: u64,
            seq: u32,
            ts: u64,
            frames: u64,
            expect: Pushed,
        },
        /// The deadline timer fires at this ms: pop until `None`.
        Pop(u64),
        /// End of stream at this ms.
        Drain(u64),
        /// `next_deadline()`, in ms since the start.
        Deadline(Option<u64>),
        /// `stats().current_delay_ms`.
        Delay(u32),
        /// `stats().target_delay_ms`.
        Target(u32),
    }

    /// The usual message: seq `seq` at media position `seq * F`.
    fn push(at: u64, seq: u32, expect: Pushed) -> Step {
        push_at(at, seq, u64::from(seq) * F, F, expect)
    }

    fn push_at(at: u64, seq: u32, ts: u64, frames: u64, expect: Pushed) -> Step {
        Step::Push {
            at,
            seq,
            ts,
            frames,
            expect,
        }
    }

    /// Released at `at` ms: the usual message `seq`.
    fn pkt(at: u64, seq: u32) -> (u64, Released<u32>) {
        pkt_at(at, seq, u64::from(seq) * F, F)
    }

    fn pkt_at(at: u64, seq: u32, timestamp: u64, frames: u64) -> (u64, Released<u32>) {
        let payload = seq;
        (
            at,
            Released::Packet {
                seq,
                timestamp,
                frames,
                payload,
            },
        )
    }

    fn gap(at: u64, timestamp: u64, frames: u64) -> (u64, Released<u32>) {
        (at, Released::Gap { timestamp, frames })
    }

    fn fixed(max_delay_ms: u32) -> JitterConfig {
        JitterConfig {
            adaptive: false,
            max_delay_ms,
            ..JitterConfig::new(RATE)
        }
    }

    struct Case {
        name: &'static str,
        config: JitterConfig,
        steps: Vec<Step>,
        released: Vec<(u64, Released<u32>)>,
        stats: JitterStats,
        last_released_seq: Option<u32>,
        next_timestamp: u64,
    }

    fn run(case: &Case) {
        let name = case.name;
        let base = Instant::now();
        let at = |ms: u64| base + Duration::from_millis(ms);
        let mut jb = JitterBuffer::new(case.config);
        let mut released = Vec::new();
        for (i, step) in case.steps.iter().enumerate() {
            match *step {
                Step::Push {
                    at: ms,
                    seq,
                    ts,
                    frames,
                    expect,
                } => {
                    let got = jb.push(seq, ts, frames, seq, at(ms));
                    assert_eq!(got, expect, "{name}: step {i} {step:?}");
                    while let Some(r) = jb.pop(at(ms)) {
                        released.push((ms, r));
                    }
                }
                Step::Pop(ms) => {
                    while let Some(r) = jb.pop(at(ms)) {
                        released.push((ms, r));
                    }
                }
                Step::Drain(ms) => released.extend(jb.drain().into_iter().map(|r| (ms, r))),
                Step::Deadline(expect) => {
                    let got = jb
                        .next_deadline()
                        .map(|d| d.duration_since(base).as_millis() as u64);
                    assert_eq!(got, expect, "{name}: step {i} {step:?}");
                }
                Step::Delay(ms) => {
                    assert_eq!(jb.stats().current_delay_ms, ms, "{name}: step {i} {step:?}");
                }
                Step::Target(ms) => {
                    assert_eq!(jb.stats().target_delay_ms, ms, "{name}: step {i} {step:?}");
                }
            }
        }
        assert_eq!(released, case.released, "{name}: released");
        assert_eq!(jb.stats(), case.stats, "{name}: stats");
        assert_eq!(jb.last_released_seq(), case.last_released_seq, "{name}");
        assert_eq!(jb.next_timestamp(), case.next_timestamp, "{name}");
    }

    fn cases() -> Vec<Case> {
        use Pushed::{Accepted, Duplicate, Late, Overflow};
        let stats = JitterStats::default;
        let mut cases = vec![
            Case {
                name: "in order: released at once",
                config: JitterConfig::new(RATE),
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 1, Accepted),
                    push(40, 2, Accepted),
                    push(60, 3, Accepted),
                    Step::Deadline(None),
                    Step::Delay(0),
                ],
                released: vec![pkt(0, 0), pkt(20, 1), pkt(40, 2), pkt(60, 3)],
                stats: JitterStats {
                    packets_received: 4,
                    ..stats()
                },
                last_released_seq: Some(3),
                next_timestamp: 640,
            },
            Case {
                name: "single drop, fixed deadline: the hole waits 50 ms",
                config: fixed(50),
                steps: vec![
                    push(0, 0, Accepted),
                    push(40, 2, Accepted),
                    Step::Deadline(Some(90)),
                    push(60, 3, Accepted),
                    Step::Delay(40),
                    Step::Pop(89),
                    Step::Pop(90),
                    push(100, 4, Accepted),
                ],
                released: vec![
                    pkt(0, 0),
                    gap(90, 160, 160),
                    pkt(90, 2),
                    pkt(90, 3),
                    pkt(100, 4),
                ],
                stats: JitterStats {
                    packets_received: 4,
                    packets_lost: 1,
                    concealed_frames: 160,
                    target_delay_ms: 50,
                    ..stats()
                },
                last_released_seq: Some(4),
                next_timestamp: 800,
            },
            Case {
                name: "single drop, adaptive from 0 ms: no wait over TCP",
                config: JitterConfig::new(RATE),
                steps: vec![
                    push(0, 0, Accepted),
                    push(40, 2, Accepted),
                    Step::Deadline(None),
                ],
                released: vec![pkt(0, 0), gap(40, 160, 160), pkt(40, 2)],
                stats: JitterStats {
                    packets_received: 2,
                    packets_lost: 1,
                    concealed_frames: 160,
                    ..stats()
                },
                last_released_seq: Some(2),
                next_timestamp: 480,
            },
            Case {
                name: "min_delay_ms holds the hole even when adaptive",
                config: JitterConfig {
                    min_delay_ms: 20,
                    ..JitterConfig::new(RATE)
                },
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    Step::Deadline(Some(40)),
                    Step::Pop(39),
                    Step::Pop(40),
                ],
                released: vec![pkt(0, 0), gap(40, 160, 160), pkt(40, 2)],
                stats: JitterStats {
                    packets_received: 2,
                    packets_lost: 1,
                    concealed_frames: 160,
                    target_delay_ms: 20,
                    ..stats()
                },
                last_released_seq: Some(2),
                next_timestamp: 480,
            },
            Case {
                name: "burst of 4 drops: one gap, 4 lost",
                config: fixed(60),
                steps: vec![
                    push(0, 0, Accepted),
                    push(100, 5, Accepted),
                    Step::Deadline(Some(160)),
                    push(120, 6, Accepted),
                    push(140, 7, Accepted),
                    Step::Pop(160),
                ],
                released: vec![
                    pkt(0, 0),
                    gap(160, 160, 640),
                    pkt(160, 5),
                    pkt(160, 6),
                    pkt(160, 7),
                ],
                stats: JitterStats {
                    packets_received: 4,
                    packets_lost: 4,
                    concealed_frames: 640,
                    target_delay_ms: 60,
                    ..stats()
                },
                last_released_seq: Some(7),
                next_timestamp: 1280,
            },
            Case {
                name: "timestamp jump without a missing seq: a client skip, no wait",
                config: fixed(200),
                steps: vec![push(0, 0, Accepted), push_at(20, 1, 480, F, Accepted)],
                released: vec![pkt(0, 0), gap(20, 160, 320), pkt_at(20, 1, 480, F)],
                stats: JitterStats {
                    packets_received: 2,
                    concealed_frames: 320,
                    target_delay_ms: 200,
                    ..stats()
                },
                last_released_seq: Some(1),
                next_timestamp: 640,
            },
            Case {
                name: "duplicates: released, held, and conflicting claims",
                config: fixed(100),
                steps: vec![
                    push(0, 0, Accepted),
                    push(10, 0, Duplicate),
                    push(20, 1, Accepted),
                    push(30, 3, Accepted),
                    push(35, 3, Duplicate),
                    // Same seq as a held one, other media time.
                    push_at(36, 3, 1000, F, Duplicate),
                    // Seq order disagrees with media order of a held one.
                    push_at(37, 4, 400, F, Duplicate),
                    // Same seq as a held one, just before it.
                    push_at(38, 3, 320, F, Duplicate),
                    push(40, 2, Accepted),
                    push(50, 1, Duplicate),
                ],
                released: vec![pkt(0, 0), pkt(20, 1), pkt(40, 2), pkt(40, 3)],
                stats: JitterStats {
                    packets_received: 10,
                    packets_duplicated: 6,
                    target_delay_ms: 100,
                    ..stats()
                },
                last_released_seq: Some(3),
                next_timestamp: 640,
            },
            Case {
                name: "lost message shows up long after its gap: late, then duplicate",
                config: fixed(40),
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    push(40, 3, Accepted),
                    Step::Pop(60),
                    push(80, 4, Accepted),
                    push(100, 1, Late),
                    push(120, 1, Duplicate),
                    push(140, 5, Accepted),
                ],
                released: vec![
                    pkt(0, 0),
                    gap(60, 160, 160),
                    pkt(60, 2),
                    pkt(60, 3),
                    pkt(80, 4),
                    pkt(140, 5),
                ],
                stats: JitterStats {
                    packets_received: 7,
                    packets_duplicated: 1,
                    packets_late: 1,
                    packets_lost: 1,
                    concealed_frames: 160,
                    target_delay_ms: 40,
                    ..stats()
                },
                last_released_seq: Some(5),
                next_timestamp: 960,
            },
            Case {
                name: "reorder within the deadline: holes filled, nothing lost",
                config: fixed(60),
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    Step::Deadline(Some(80)),
                    push(30, 1, Accepted),
                    Step::Deadline(None),
                    push(40, 5, Accepted),
                    push(45, 4, Accepted),
                    Step::Deadline(Some(100)),
                    Step::Delay(40),
                    push(50, 3, Accepted),
                ],
                released: vec![
                    pkt(0, 0),
                    pkt(30, 1),
                    pkt(30, 2),
                    pkt(50, 3),
                    pkt(50, 4),
                    pkt(50, 5),
                ],
                stats: JitterStats {
                    packets_received: 6,
                    target_delay_ms: 60,
                    ..stats()
                },
                last_released_seq: Some(5),
                next_timestamp: 960,
            },
            Case {
                name: "reorder beyond the deadline: lost, then late",
                config: fixed(30),
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    push(40, 3, Accepted),
                    Step::Pop(49),
                    Step::Pop(50),
                    push(55, 1, Late),
                ],
                released: vec![pkt(0, 0), gap(50, 160, 160), pkt(50, 2), pkt(50, 3)],
                stats: JitterStats {
                    packets_received: 4,
                    packets_late: 1,
                    packets_lost: 1,
                    concealed_frames: 160,
                    target_delay_ms: 30,
                    ..stats()
                },
                last_released_seq: Some(3),
                next_timestamp: 640,
            },
            Case {
                name: "hostile timestamps and seqs: saturate, never panic",
                config: JitterConfig::new(RATE),
                steps: vec![
                    // First message near the end of media time: a skip.
                    push_at(0, 0, u64::MAX - 100, 50, Accepted),
                    // Unknown seq, released media time.
                    push_at(1, 1, 10, F, Late),
                    // Runs past u64::MAX.
                    push_at(2, 2, u64::MAX - 50, u64::MAX, Accepted),
                    push_at(3, u32::MAX, u64::MAX, 0, Accepted),
                    push_at(4, u32::MAX, u64::MAX, 0, Duplicate),
                    // Far below the remembered window.
                    push_at(5, 7, 0, 0, Duplicate),
                ],
                released: vec![
                    gap(0, 0, u64::MAX - 100),
                    pkt_at(0, 0, u64::MAX - 100, 50),
                    pkt_at(2, 2, u64::MAX - 50, u64::MAX),
                    pkt_at(3, u32::MAX, u64::MAX, 0),
                ],
                stats: JitterStats {
                    packets_received: 6,
                    packets_duplicated: 2,
                    packets_late: 1,
                    // Seq 1 and every seq from 3 to u32::MAX - 1.
                    packets_lost: 1 + u64::from(u32::MAX) - 3,
                    concealed_frames: u64::MAX - 100,
                    ..stats()
                },
                last_released_seq: Some(u32::MAX),
                next_timestamp: u64::MAX,
            },
            Case {
                name: "hostile frame counts and order claims",
                config: fixed(100),
                steps: vec![
                    push(0, 0, Accepted),
                    push_at(10, 2, 1000, u64::MAX, Accepted),
                    Step::Delay(u32::MAX),
                    // Inside the held message's (saturated) media range.
                    push_at(20, 3, 5000, F, Duplicate),
                    // Earlier seq, later media time than a held one.
                    push_at(25, 1, 2000, F, Duplicate),
                    // Fills the start of the hole; the rest is a skip.
                    push_at(30, 1, 160, F, Accepted),
                    push_at(40, 4, 6000, 10, Late),
                    Step::Delay(0),
                ],
                released: vec![
                    pkt(0, 0),
                    pkt(30, 1),
                    gap(30, 320, 680),
                    pkt_at(30, 2, 1000, u64::MAX),
                ],
                stats: JitterStats {
                    packets_received: 6,
                    packets_duplicated: 2,
                    packets_late: 1,
                    concealed_frames: 680,
                    target_delay_ms: 100,
                    ..stats()
                },
                last_released_seq: Some(2),
                next_timestamp: u64::MAX,
            },
            Case {
                name: "capacity overflow: holes released early, no audio dropped",
                config: JitterConfig {
                    capacity_packets: 3,
                    ..fixed(1000)
                },
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    push(40, 4, Accepted),
                    push(60, 5, Accepted),
                    Step::Deadline(Some(1020)),
                    push(80, 6, Overflow),
                    // Back within capacity: the next hole (seq 3) waits again,
                    // from when it was first seen (seq 4 arrived at 40 ms).
                    Step::Deadline(Some(1040)),
                    Step::Drain(100),
                ],
                released: vec![
                    pkt(0, 0),
                    gap(80, 160, 160),
                    pkt(80, 2),
                    gap(100, 480, 160),
                    pkt(100, 4),
                    pkt(100, 5),
                    pkt(100, 6),
                ],
                stats: JitterStats {
                    packets_received: 5,
                    packets_lost: 2,
                    concealed_frames: 320,
                    target_delay_ms: 1000,
                    ..stats()
                },
                last_released_seq: Some(6),
                next_timestamp: 1120,
            },
            Case {
                name: "drain at end of stream fills every hole, buffer stays usable",
                config: fixed(100),
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    push(40, 3, Accepted),
                    push(60, 5, Accepted),
                    Step::Deadline(Some(120)),
                    Step::Delay(60),
                    Step::Drain(70),
                    Step::Deadline(None),
                    Step::Delay(0),
                    push(80, 6, Accepted),
                ],
                released: vec![
                    pkt(0, 0),
                    gap(70, 160, 160),
                    pkt(70, 2),
                    pkt(70, 3),
                    gap(70, 640, 160),
                    pkt(70, 5),
                    pkt(80, 6),
                ],
                stats: JitterStats {
                    packets_received: 5,
                    packets_lost: 2,
                    concealed_frames: 320,
                    target_delay_ms: 100,
                    ..stats()
                },
                last_released_seq: Some(6),
                next_timestamp: 1120,
            },
            Case {
                name: "adaptive: a hole filled late in its wait raises the target",
                config: JitterConfig {
                    min_delay_ms: 50,
                    ..JitterConfig::new(RATE)
                },
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    Step::Deadline(Some(70)),
                    // 45 ms after the hole was seen: 1.25 × 45 = 56.25, then
                    // two releases decay it 1 % each (45 000 → 44 104 µs).
                    push(65, 1, Accepted),
                    Step::Target(56),
                ],
                released: vec![pkt(0, 0), pkt(65, 1), pkt(65, 2)],
                stats: JitterStats {
                    packets_received: 3,
                    target_delay_ms: 56,
                    ..stats()
                },
                last_released_seq: Some(2),
                next_timestamp: 480,
            },
            Case {
                name: "adaptive target is clamped to max_delay_ms",
                config: JitterConfig {
                    min_delay_ms: 10,
                    max_delay_ms: 40,
                    ..JitterConfig::new(RATE)
                },
                steps: vec![
                    push(0, 0, Accepted),
                    Step::Target(10),
                    push(20, 2, Accepted),
                    Step::Deadline(Some(30)),
                    Step::Pop(30),
                    // 130 ms after its hole was first seen.
                    push(150, 1, Late),
                    Step::Target(40),
                ],
                released: vec![pkt(0, 0), gap(30, 160, 160), pkt(30, 2)],
                stats: JitterStats {
                    packets_received: 3,
                    packets_late: 1,
                    packets_lost: 1,
                    concealed_frames: 160,
                    target_delay_ms: 40,
                    ..stats()
                },
                last_released_seq: Some(2),
                next_timestamp: 480,
            },
            Case {
                name: "non-adaptive: late messages do not move the fixed deadline",
                config: fixed(50),
                steps: vec![
                    push(0, 0, Accepted),
                    push(20, 2, Accepted),
                    Step::Pop(69),
                    Step::Pop(70),
                    push(150, 1, Late),
                    Step::Target(50),
                    push(200, 4, Accepted),
                    Step::Deadline(Some(250)),
                    Step::Pop(250),
                    push(260, 3, Late),
                ],
                released: vec![
                    pkt(0, 0),
                    gap(70, 160, 160),
                    pkt(70, 2),
                    gap(250, 480, 160),
                    pkt(250, 4),
                ],
                stats: JitterStats {
                    packets_received: 5,
                    packets_late: 2,
                    packets_lost: 2,
                    concealed_frames: 320,
                    target_delay_ms: 50,
                    ..stats()
                },
                last_released_seq: Some(4),
                next_timestamp: 800,
            },
        ];

        // Adaptive: starts at 0 ms, learns from a late message (25 ms: target
        // 1.25 × 25 = 32), a fill within the target does not raise it, a
        // later late one (80 ms) raises it to 100, then 100 in-order
        // messages decay it 1 % each (80 000 µs → 29 253 µs → 37 ms).
        let mut steps = vec![
            push(0, 0, Accepted),
            push(20, 2, Accepted),
            Step::Target(0),
            push(45, 1, Late),
            Step::Target(32),
            push(60, 3, Accepted),
            Step::Target(31),
            push(100, 5, Accepted),
            Step::Deadline(Some(131)),
            push(110, 4, Accepted),
            Step::Target(31),
            push(140, 7, Accepted),
            Step::Deadline(Some(171)),
            Step::Pop(171),
            push(220, 6, Late),
            Step::Target(100),
        ];
        let mut released = vec![
            pkt(0, 0),
            gap(20, 160, 160),
            pkt(20, 2),
            pkt(60, 3),
            pkt(110, 4),
            pkt(110, 5),
            gap(171, 960, 160),
            pkt(171, 7),
        ];
        for seq in 8..108u32 {
            let at = 240 + 20 * u64::from(seq - 8);
            steps.push(push(at, seq, Accepted));
            released.push(pkt(at, seq));
        }
        steps.push(Step::Target(37));
        cases.push(Case {
            name: "adaptive target rises after late messages and decays back",
            config: JitterConfig::new(RATE),
            steps,
            released,
            stats: JitterStats {
                packets_received: 108,
                packets_late: 2,
                packets_lost: 2,
                concealed_frames: 320,
                target_delay_ms: 37,
                ..stats()
            },
            last_released_seq: Some(107),
            next_timestamp: 108 * F,
        });
        cases
    }

    #[test]
    fn scenarios() {
        for case in cases() {
            run(&case);
        }
    }

    #[test]
    fn config_bounds_are_tolerated() {
        // min above max, no capacity, no sample rate: odd but not fatal.
        let config = JitterConfig {
            sample_rate: 0,
            min_delay_ms: 300,
            max_delay_ms: 100,
            capacity_packets: 0,
            adaptive: true,
        };
        let now = Instant::now();
        let mut jb = JitterBuffer::new(config);
        assert_eq!(jb.push(1, 160, 160, (), now), Pushed::Overflow);
        assert_eq!(jb.stats().current_delay_ms, 0);
        assert_eq!(jb.stats().target_delay_ms, 300);
        let released: Vec<_> = std::iter::from_fn(|| jb.pop(now)).collect();
        assert_eq!(
            released,
            vec![
                Released::Gap {
                    timestamp: 0,
                    frames: 160
                },
                Released::Packet {
                    seq: 1,
                    timestamp: 160,
                    frames: 160,
                    payload: ()
                }
            ]
        );
    }

    /// Random and hostile input: no panic, releases stay contiguous in media
    /// time, and every push is accounted for exactly once.
    #[test]
    fn random_input_keeps_the_books() {
        for seed in 0..20u64 {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                // xorshift64
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let config = JitterConfig {
                capacity_packets: 64,
                adaptive: seed % 2 == 0,
                ..JitterConfig::new(RATE)
            };
            let mut jb = JitterBuffer::new(config);
            let base = Instant::now();
            let mut clock = 0u64;
            let (mut accepted, mut dup, mut late) = (0u64, 0u64, 0u64);
            let mut released = Vec::new();
            for i in 0..5000 {
                clock += next() % 30;
                let now = base + Duration::from_millis(clock);
                let r = next();
                // Mostly a messy but plausible stream (drops, resends,
                // reorders, overlaps); hostile values only at the end, as
                // they end media time.
                let hostile = i >= 4000 && r % 4 == 0;
                let near = jb.last_released_seq().map_or(0, |s| u64::from(s) + 1);
                let seq = match (hostile, (r >> 4) % 8) {
                    (true, 0) => next() as u32,
                    (true, 1) => u32::MAX - (next() % 3) as u32,
                    (_, 2) => near.saturating_sub(next() % 4) as u32,
                    _ => u32::try_from(near + next() % 6).unwrap_or(u32::MAX),
                };
                let ts = match (hostile, (r >> 8) % 8) {
                    (true, 0) => next(),
                    (true, 1) => u64::MAX - next() % 1000,
                    (_, 2) => (u64::from(seq) * F).saturating_sub(next() % F),
                    _ => u64::from(seq) * F,
                };
                let frames = match (hostile, (r >> 16) % 8) {
                    (true, 0) => next(),
                    (_, 1) => 0,
                    (_, 2) => 2 * F,
                    _ => F,
                };
                match jb.push(seq, ts, frames, seq, now) {
                    Pushed::Accepted | Pushed::Overflow => accepted += 1,
                    Pushed::Duplicate => dup += 1,
                    Pushed::Late => late += 1,
                }
                if (r >> 24) % 50 == 0 {
                    released.extend(jb.drain());
                } else {
                    released.extend(std::iter::from_fn(|| jb.pop(now)));
                }
            }
            released.extend(jb.drain());
            let stats = jb.stats();
            assert_eq!(stats.packets_received, accepted + dup + late, "seed {seed}");
            assert_eq!(stats.packets_duplicated, dup, "seed {seed}");
            assert_eq!(stats.packets_late, late, "seed {seed}");
            let packets = released
                .iter()
                .filter(|r| matches!(r, Released::Packet { .. }))
                .count() as u64;
            assert_eq!(
                packets, accepted,
                "seed {seed}: every accepted push released"
            );
            let mut position = 0u64;
            let mut concealed = 0u64;
            for r in &released {
                assert_eq!(r.timestamp(), position, "seed {seed}: contiguous");
                position = r.timestamp().saturating_add(r.frames());
                if let Released::Gap { frames, .. } = r {
                    concealed = concealed.saturating_add(*frames);
                }
            }
            assert_eq!(position, jb.next_timestamp(), "seed {seed}");
            assert_eq!(stats.concealed_frames, concealed, "seed {seed}");
            assert_eq!(stats.current_delay_ms, 0, "seed {seed}");
        }
    }

    /// What a schedule must produce with a fixed deadline, worked out from
    /// the schedule alone. A missing frame's slot is given up `deadline`
    /// after the first later frame arrived; the session pops after every
    /// push and when the deadline passes, so a frame arriving at exactly
    /// the deadline still makes it unless another message came first at
    /// that instant.
    struct Expected {
        /// Index of the last delivered frame: media time ends after it.
        last: usize,
        /// Per frame up to `last`: `None` if released as a packet, else when
        /// its slot is released as a gap (`Duration::MAX`: by the drain).
        given_up: Vec<Option<Duration>>,
        late: u64,
        deliveries: u64,
        distinct: u64,
        never_delivered: u64,
    }

    fn expected(events: &[NetEvent], deadline: Duration) -> Expected {
        let arrivals: Vec<(Duration, usize)> = events
            .iter()
            .filter_map(|e| match *e {
                NetEvent::Deliver { at, index } => Some((at, index)),
                NetEvent::Disconnect { .. } => None,
            })
            .collect();
        let last = arrivals
            .iter()
            .map(|a| a.1)
            .max()
            .expect("something arrives");
        let mut first = vec![None; last + 1];
        for (position, &(_, index)) in arrivals.iter().enumerate() {
            first[index].get_or_insert(position);
        }
        let mut given_up = vec![None; last + 1];
        let mut late = 0;
        // Earliest arrival position of any frame after k.
        let mut first_after: Option<usize> = None;
        for k in (0..=last).rev() {
            if let Some(p) = first_after {
                let at = arrivals[p].0 + deadline;
                // The first message at or after the deadline: the timer
                // fires just before it, or (same instant) the pop after it.
                let (when, before) = match (p..arrivals.len()).find(|&i| arrivals[i].0 >= at) {
                    None => (Duration::MAX, arrivals.len()),
                    Some(i) if arrivals[i].0 > at => (at, i),
                    Some(i) => (at, i + 1),
                };
                match first[k] {
                    None => given_up[k] = Some(when),
                    Some(q) if q > p && q >= before => {
                        given_up[k] = Some(when);
                        late += 1;
                    }
                    Some(_) => {}
                }
            }
            if let Some(q) = first[k] {
                first_after = Some(first_after.map_or(q, |p| p.min(q)));
            }
        }
        Expected {
            last,
            given_up,
            late,
            deliveries: arrivals.len() as u64,
            distinct: first.iter().flatten().count() as u64,
            never_delivered: first.iter().filter(|f| f.is_none()).count() as u64,
        }
    }

    /// Feeds a schedule as the session task would: fire the deadline timer
    /// when it comes before the next message, push, pop until `None`; drain
    /// at the end (released at `Duration::MAX`). Returns what was released
    /// and when, as an offset from the start.
    fn drive(
        config: JitterConfig,
        events: &[NetEvent],
    ) -> (Vec<(Duration, Released<usize>)>, JitterStats) {
        let base = Instant::now();
        let mut jb = JitterBuffer::new(config);
        let mut out = Vec::new();
        for event in events {
            let NetEvent::Deliver { at, index } = *event else {
                continue;
            };
            let now = base + at;
            while let Some(deadline) = jb.next_deadline().filter(|d| *d < now) {
                let before = out.len();
                let offset = deadline - base;
                out.extend(std::iter::from_fn(|| jb.pop(deadline)).map(|r| (offset, r)));
                assert!(out.len() > before, "a passed deadline releases something");
            }
            let index_seq = u32::try_from(index).unwrap();
            jb.push(index_seq, index as u64 * F, F, index, now);
            out.extend(std::iter::from_fn(|| jb.pop(now)).map(|r| (at, r)));
        }
        out.extend(jb.drain().into_iter().map(|r| (Duration::MAX, r)));
        (out, jb.stats())
    }

    /// Every media frame from 0 to the end of the last delivered frame is
    /// released exactly once, in order; returns which frames were packets.
    fn check_coverage(
        released: &[(Duration, Released<usize>)],
        last: usize,
        seed: u64,
    ) -> Vec<bool> {
        let mut position = 0;
        let mut kept = vec![false; last + 1];
        for (_, r) in released {
            assert_eq!(r.timestamp(), position, "seed {seed}: contiguous");
            if let Released::Packet {
                seq,
                timestamp,
                frames,
                payload,
            } = r
            {
                assert_eq!(
                    (*timestamp, *frames),
                    (*payload as u64 * F, F),
                    "seed {seed}"
                );
                assert_eq!(*seq as usize, *payload, "seed {seed}");
                assert!(!kept[*payload], "seed {seed}: frame {payload} twice");
                kept[*payload] = true;
            }
            position += r.frames();
        }
        assert_eq!(position, (last as u64 + 1) * F, "seed {seed}: total frames");
        kept
    }

    fn flaky_network(seed: u64) -> NetemConfig {
        NetemConfig {
            seed,
            drop_rate: 0.05,
            duplicate_rate: 0.03,
            burst_rate: 0.02,
            stall_ms: (60, 250),
            reorder_rate: 0.05,
            disconnect_every: Some((150, 400)),
        }
    }

    #[test]
    fn netem_schedules_with_fixed_deadline_match_the_schedule() {
        let frame = Duration::from_millis(20);
        let mut total_late = 0;
        for seed in 0..20 {
            let events = schedule(&flaky_network(seed), 1000, frame);
            // 0 ms: every reorder is given up; 15 and 45 ms: below every stall.
            for deadline_ms in [0u32, 15, 45] {
                let expect = expected(&events, Duration::from_millis(deadline_ms.into()));
                let (released, stats) = drive(fixed(deadline_ms), &events);
                let kept = check_coverage(&released, expect.last, seed);
                let want: Vec<bool> = expect.given_up.iter().map(Option::is_none).collect();
                assert_eq!(kept, want, "seed {seed}, {deadline_ms} ms: packets");
                for (when, r) in &released {
                    if let Released::Gap { timestamp, frames } = r {
                        for k in timestamp / F..(timestamp + frames) / F {
                            assert_eq!(
                                Some(*when),
                                expect.given_up[k as usize],
                                "seed {seed}, {deadline_ms} ms: frame {k} given up"
                            );
                        }
                    }
                }
                let lost = want.iter().filter(|k| !**k).count() as u64;
                assert_eq!(
                    stats,
                    JitterStats {
                        packets_received: expect.deliveries,
                        packets_duplicated: expect.deliveries - expect.distinct,
                        packets_late: expect.late,
                        packets_lost: lost,
                        concealed_frames: lost * F,
                        current_delay_ms: 0,
                        target_delay_ms: deadline_ms,
                    },
                    "seed {seed}, {deadline_ms} ms"
                );
                if deadline_ms > 0 {
                    // Stalls delay whole runs in order, reorders are adjacent:
                    // only frames the client dropped are lost.
                    assert_eq!(stats.packets_late, 0, "seed {seed}");
                    assert_eq!(stats.packets_lost, expect.never_delivered, "seed {seed}");
                }
                total_late += stats.packets_late;
            }
        }
        assert!(total_late > 0, "the 0 ms runs exercise late messages");
    }

    #[test]
    fn netem_schedules_with_adaptive_deadline_keep_media_time_exact() {
        let frame = Duration::from_millis(20);
        for seed in 0..20 {
            let events = schedule(&flaky_network(seed), 1000, frame);
            let expect = expected(&events, Duration::ZERO);
            let (released, stats) = drive(JitterConfig::new(RATE), &events);
            let kept = check_coverage(&released, expect.last, seed);
            let lost = kept.iter().filter(|k| !**k).count() as u64;
            assert_eq!(stats.packets_lost, lost, "seed {seed}");
            assert_eq!(stats.concealed_frames, lost * F, "seed {seed}");
            assert_eq!(stats.packets_received, expect.deliveries, "seed {seed}");
            assert_eq!(
                stats.packets_duplicated + stats.packets_late,
                expect.deliveries - (kept.len() as u64 - lost),
                "seed {seed}: every delivery is released, duplicated or late"
            );
            assert!(lost >= expect.never_delivered, "seed {seed}");
            assert!(stats.target_delay_ms <= 200, "seed {seed}");
        }
    }
}
