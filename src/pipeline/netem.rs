//! A seeded network emulator for tests: turns "N frames, one every
//! `frame_duration`" into the arrival schedule a flaky client and link would
//! produce. Sans-IO and faster than real time: it only computes instants, the
//! test feeds them to the code under test as `now`.
//!
//! The model is one ordered stream (a WebSocket over TCP) behind a client
//! that misbehaves:
//! - drops: the client never sends the frame (its seq is skipped);
//! - stalls: the link stops for a while; frames queue and then arrive
//!   together, in order, when it resumes;
//! - disconnects: the connection breaks before a frame; everything not yet
//!   delivered waits for the reconnect (a stall length later) and is then
//!   delivered, as a resuming client that resends its unacknowledged frames
//!   would;
//! - reorders: a frame is held back and arrives right after its successor;
//! - duplicates: a frame arrives twice in a row.
//!
//! Each kind of trouble draws from its own stream of the seeded PRNG, so
//! changing one rate does not reshuffle the others.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct NetemConfig {
    pub seed: u64,
    /// Chance the client drops a frame (never sent, never delivered).
    pub drop_rate: f64,
    /// Chance a delivered frame is delivered twice.
    pub duplicate_rate: f64,
    /// Chance, per frame, that a stall starts when none is going on.
    pub burst_rate: f64,
    /// Stall length range in ms, inclusive; also the reconnect time after a
    /// disconnect.
    pub stall_ms: (u32, u32),
    /// Chance a frame is swapped with its successor.
    pub reorder_rate: f64,
    /// Frames between forced disconnects, drawn from this range (inclusive,
    /// at least 1).
    pub disconnect_every: Option<(u32, u32)>,
}

impl Default for NetemConfig {
    /// A perfect network.
    fn default() -> Self {
        Self {
            seed: 0,
            drop_rate: 0.0,
            duplicate_rate: 0.0,
            burst_rate: 0.0,
            stall_ms: (0, 0),
            reorder_rate: 0.0,
            disconnect_every: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetEvent {
    /// Source frame `index` arrives at `at` (offset from stream start).
    Deliver { at: Duration, index: usize },
    /// The connection breaks at `at`; later deliveries come over the next one.
    Disconnect { at: Duration },
}

impl NetEvent {
    pub fn at(&self) -> Duration {
        match self {
            NetEvent::Deliver { at, .. } | NetEvent::Disconnect { at } => *at,
        }
    }
}

/// The arrival schedule of `frames` source frames, frame `i` produced at
/// `i * frame_duration`. Sorted by `at`; at equal instants, a disconnect comes
/// before deliveries, and deliveries keep their order. The same config always
/// gives the same schedule.
pub fn schedule(config: &NetemConfig, frames: usize, frame_duration: Duration) -> Vec<NetEvent> {
    let mut root = SplitMix64(config.seed);
    let mut drops = SplitMix64(root.next_u64());
    let mut duplicates = SplitMix64(root.next_u64());
    let mut stalls = SplitMix64(root.next_u64());
    let mut reorders = SplitMix64(root.next_u64());
    let mut disconnects = SplitMix64(root.next_u64());

    let (stall_lo, stall_hi) = ordered(config.stall_ms);
    let stall_length = |rng: &mut SplitMix64| {
        Duration::from_millis(u64::from(rng.range_inclusive(stall_lo, stall_hi)))
    };
    let disconnect_range = config.disconnect_every.map(|r| {
        let (lo, hi) = ordered(r);
        (lo.max(1), hi.max(1))
    });
    let mut until_disconnect = disconnect_range.map(|(lo, hi)| disconnects.range_inclusive(lo, hi));

    // One ordered stream: a frame leaves no earlier than it is produced and
    // no earlier than the link is back.
    let mut deliveries: Vec<(Duration, usize)> = Vec::with_capacity(frames);
    let mut breaks = Vec::new();
    let mut blocked_until = Duration::ZERO;
    for index in 0..frames {
        let produced = produced_at(frame_duration, index);
        if let (Some(left), Some((lo, hi))) = (until_disconnect.as_mut(), disconnect_range) {
            if *left == 0 {
                let reconnect = produced.saturating_add(stall_length(&mut disconnects));
                // Whatever was still in flight is resent after the reconnect.
                for delivery in deliveries.iter_mut().rev() {
                    if delivery.0 < produced {
                        break;
                    }
                    delivery.0 = delivery.0.max(reconnect);
                }
                blocked_until = blocked_until.max(reconnect);
                breaks.push(NetEvent::Disconnect { at: produced });
                *left = disconnects.range_inclusive(lo, hi);
            }
            *left -= 1;
        }
        if produced >= blocked_until && stalls.chance(config.burst_rate) {
            blocked_until = produced.saturating_add(stall_length(&mut stalls));
        }
        if drops.chance(config.drop_rate) {
            continue;
        }
        deliveries.push((produced.max(blocked_until), index));
    }

    // A reordered frame arrives right after its successor, at the same
    // instant, so the schedule stays sorted.
    let mut i = 0;
    while i + 1 < deliveries.len() {
        if reorders.chance(config.reorder_rate) {
            let (first, second) = (deliveries[i], deliveries[i + 1]);
            deliveries[i] = second;
            deliveries[i + 1] = (second.0, first.1);
            i += 2;
        } else {
            i += 1;
        }
    }

    let mut events = Vec::with_capacity(deliveries.len() + breaks.len());
    for (at, index) in deliveries {
        events.push(NetEvent::Deliver { at, index });
        if duplicates.chance(config.duplicate_rate) {
            events.push(NetEvent::Deliver { at, index });
        }
    }
    events.extend(breaks);
    // Stable: deliveries at one instant keep their order.
    events.sort_by_key(|e| (e.at(), matches!(e, NetEvent::Deliver { .. })));
    events
}

fn ordered((a, b): (u32, u32)) -> (u32, u32) {
    (a.min(b), a.max(b))
}

fn produced_at(frame_duration: Duration, index: usize) -> Duration {
    let nanos = frame_duration.as_nanos().saturating_mul(index as u128);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to make
/// test schedules that look random.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`; never for p <= 0 or NaN, always for p >= 1.
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn range_inclusive(&mut self, lo: u32, hi: u32) -> u32 {
        let span = u64::from(hi - lo) + 1;
        lo + (self.next_u64() % span) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn deliveries(events: &[NetEvent]) -> Vec<(Duration, usize)> {
        events
            .iter()
            .filter_map(|e| match *e {
                NetEvent::Deliver { at, index } => Some((at, index)),
                NetEvent::Disconnect { .. } => None,
            })
            .collect()
    }

    fn disconnects(events: &[NetEvent]) -> Vec<Duration> {
        events
            .iter()
            .filter_map(|e| match *e {
                NetEvent::Disconnect { at } => Some(at),
                NetEvent::Deliver { .. } => None,
            })
            .collect()
    }

    fn everything(seed: u64) -> NetemConfig {
        NetemConfig {
            seed,
            drop_rate: 0.05,
            duplicate_rate: 0.05,
            burst_rate: 0.03,
            stall_ms: (50, 300),
            reorder_rate: 0.05,
            disconnect_every: Some((100, 200)),
        }
    }

    #[test]
    fn same_seed_same_schedule_other_seed_other_schedule() {
        let a = schedule(&everything(7), 2000, FRAME);
        assert_eq!(a, schedule(&everything(7), 2000, FRAME));
        assert_ne!(a, schedule(&everything(8), 2000, FRAME));
    }

    #[test]
    fn perfect_network_delivers_each_frame_when_produced() {
        let events = schedule(&NetemConfig::default(), 5, FRAME);
        let want: Vec<_> = (0..5)
            .map(|index| NetEvent::Deliver {
                at: FRAME * index as u32,
                index,
            })
            .collect();
        assert_eq!(events, want);
        assert!(schedule(&NetemConfig::default(), 0, FRAME).is_empty());
    }

    #[test]
    fn schedules_are_sorted_and_causal() {
        for seed in 0..20 {
            let events = schedule(&everything(seed), 3000, FRAME);
            assert!(
                events.windows(2).all(|w| w[0].at() <= w[1].at()),
                "seed {seed}"
            );
            for (at, index) in deliveries(&events) {
                assert!(
                    at >= FRAME * index as u32,
                    "seed {seed}: frame {index} before it exists"
                );
            }
        }
    }

    #[test]
    fn drops_never_appear_at_about_the_rate() {
        let config = NetemConfig {
            drop_rate: 0.1,
            ..NetemConfig::default()
        };
        let delivered = deliveries(&schedule(&config, 10_000, FRAME));
        assert!(
            (8_800..=9_200).contains(&delivered.len()),
            "{}",
            delivered.len()
        );
        // Whatever is not dropped arrives once, on time, in order.
        assert!(delivered.windows(2).all(|w| w[0].1 < w[1].1));
        assert!(delivered.iter().all(|&(at, i)| at == FRAME * i as u32));

        let all_dropped = NetemConfig {
            drop_rate: 1.0,
            ..NetemConfig::default()
        };
        assert!(schedule(&all_dropped, 100, FRAME).is_empty());
    }

    #[test]
    fn duplicates_arrive_twice_in_a_row() {
        let config = NetemConfig {
            duplicate_rate: 1.0,
            ..NetemConfig::default()
        };
        let delivered = deliveries(&schedule(&config, 4, FRAME));
        let want: Vec<_> = (0..4usize)
            .flat_map(|i| [(FRAME * i as u32, i); 2])
            .collect();
        assert_eq!(delivered, want);
    }

    #[test]
    fn stalls_queue_frames_and_deliver_them_together() {
        // A stall starts whenever none is going on: frames 0-4 wait for the
        // one that ends at 100 ms, 5-9 for the next, and so on.
        let config = NetemConfig {
            burst_rate: 1.0,
            stall_ms: (100, 100),
            ..NetemConfig::default()
        };
        let delivered = deliveries(&schedule(&config, 12, FRAME));
        let want: Vec<_> = (0..12usize)
            .map(|i| (ms(100 * (i as u64 / 5 + 1)), i))
            .collect();
        assert_eq!(delivered, want);
    }

    #[test]
    fn reorders_swap_neighbours() {
        let config = NetemConfig {
            reorder_rate: 1.0,
            ..NetemConfig::default()
        };
        let delivered = deliveries(&schedule(&config, 5, FRAME));
        assert_eq!(
            delivered,
            vec![
                (ms(20), 1),
                (ms(20), 0),
                (ms(60), 3),
                (ms(60), 2),
                (ms(80), 4)
            ]
        );
    }

    #[test]
    fn disconnects_hold_back_what_was_not_delivered() {
        let config = NetemConfig {
            disconnect_every: Some((10, 10)),
            stall_ms: (50, 50),
            ..NetemConfig::default()
        };
        let events = schedule(&config, 25, FRAME);
        assert_eq!(disconnects(&events), vec![ms(200), ms(400)]);
        // Frames 10-12 (produced 200-240 ms) wait for the reconnect at 250.
        let delivered = deliveries(&events);
        assert_eq!(
            &delivered[9..14],
            &[
                (ms(180), 9),
                (ms(250), 10),
                (ms(250), 11),
                (ms(250), 12),
                (ms(260), 13)
            ]
        );
        assert_eq!(events[10], NetEvent::Disconnect { at: ms(200) });

        // A zero-length reconnect: the disconnect sorts before the delivery
        // at the same instant.
        let instant = NetemConfig {
            disconnect_every: Some((3, 3)),
            ..NetemConfig::default()
        };
        let events = schedule(&instant, 4, FRAME);
        assert_eq!(events[3], NetEvent::Disconnect { at: ms(60) });
        assert_eq!(
            events[4],
            NetEvent::Deliver {
                at: ms(60),
                index: 3
            }
        );
    }

    #[test]
    fn disconnect_spacing_stays_in_range() {
        let config = NetemConfig {
            disconnect_every: Some((20, 30)),
            ..NetemConfig::default()
        };
        let at = disconnects(&schedule(&config, 5_000, FRAME));
        let mut previous = Duration::ZERO;
        for at in &at {
            let frames = (*at - previous).as_millis() / 20;
            assert!((20..=30).contains(&frames), "{frames}");
            previous = *at;
        }
        assert!(at.len() > 5_000 / 31);
    }

    #[test]
    fn odd_configs_do_not_panic() {
        let config = NetemConfig {
            seed: u64::MAX,
            drop_rate: f64::NAN,
            duplicate_rate: -1.0,
            burst_rate: 2.0,
            stall_ms: (u32::MAX, 0),
            reorder_rate: f64::INFINITY,
            disconnect_every: Some((0, 0)),
        };
        let events = schedule(&config, 50, Duration::MAX);
        assert!(events.windows(2).all(|w| w[0].at() <= w[1].at()));
        let events = schedule(&config, 50, Duration::ZERO);
        assert_eq!(deliveries(&events).len(), 50);
    }
}
