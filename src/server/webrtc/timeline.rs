//! RTP sequence numbers and timestamps as `framing=seq` headers: both
//! counted from the session's first packet, with overlaps removed.
//!
//! Senders do not always keep RTP time strictly increasing with the
//! sequence number: Chromium, when its capture stops, sends a packet with
//! the previous packet's timestamp again. The jitter buffer rightly refuses
//! a new `seq` placed before audio already handed on (for a WebSocket client
//! that is a bug in the client), so a packet newer than every other one that
//! starts before the previous one ends is moved to start where it ends.
//! Reordered packets keep their own time: the jitter buffer places them.
//! Pure: no clocks, no IO.

use crate::protocol::SeqHeader;

#[derive(Debug, Default)]
pub struct RtpTimeline {
    /// Extended sequence number and RTP time of the first packet.
    first: Option<(u64, u64)>,
    /// The newest packet so far (relative sequence number), and where its
    /// audio ends (relative RTP time).
    newest: Option<u32>,
    end: u64,
    /// Packets moved to remove an overlap.
    pub moved_packets: u64,
}

impl RtpTimeline {
    /// The header for a packet of `frames` (48 kHz) with extended sequence
    /// number `seq` and RTP time `time`; `None` for a packet older than the
    /// first one (its media time would be before the stream's start).
    pub fn place(&mut self, seq: u64, time: u64, frames: u64) -> Option<SeqHeader> {
        let (first_seq, first_time) = *self.first.get_or_insert((seq, time));
        let seq = u32::try_from(seq.checked_sub(first_seq)?).ok()?;
        let mut timestamp = time.checked_sub(first_time)?;
        if self.newest.is_none_or(|newest| seq > newest) {
            if timestamp < self.end {
                timestamp = self.end;
                self.moved_packets += 1;
            }
            self.newest = Some(seq);
            self.end = timestamp.saturating_add(frames);
        }
        Some(SeqHeader { seq, timestamp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(timeline: &mut RtpTimeline, seq: u64, time: u64) -> Option<(u32, u64)> {
        timeline.place(seq, time, 960).map(|h| (h.seq, h.timestamp))
    }

    #[test]
    fn counts_from_the_first_packet_and_keeps_gaps_and_reordering() {
        let mut t = RtpTimeline::default();
        assert_eq!(place(&mut t, 65_530, 1_000_000), Some((0, 0)));
        assert_eq!(place(&mut t, 65_531, 1_000_960), Some((1, 960)));
        // 65_532 lost, 65_534 before 65_533.
        assert_eq!(place(&mut t, 65_534, 1_003_840), Some((4, 3840)));
        assert_eq!(place(&mut t, 65_533, 1_002_880), Some((3, 2880)));
        // Older than the first packet: nowhere to put it.
        assert_eq!(place(&mut t, 65_529, 999_040), None);
        assert_eq!(t.moved_packets, 0);
    }

    #[test]
    fn a_newer_packet_that_overlaps_the_newest_is_moved_after_it() {
        let mut t = RtpTimeline::default();
        place(&mut t, 10, 0);
        place(&mut t, 11, 960);
        // Chromium's last packet repeats the timestamp before it.
        assert_eq!(place(&mut t, 12, 960), Some((2, 1920)));
        assert_eq!(place(&mut t, 13, 2880), Some((3, 2880)));
        assert_eq!(t.moved_packets, 1);
    }
}
