//! A lock-free log-linear histogram of durations in microseconds: every
//! stream task records into the same one with a relaxed `fetch_add`, so there
//! is nothing to merge and no lock on the send path.
//!
//! Values below 16 µs are exact; above, each power of two is split into 16
//! buckets, so a percentile is off by at most 1/32 of its value (the bucket
//! midpoint is reported). The maximum is kept exactly.

use std::sync::atomic::{AtomicU64, Ordering};

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Up to 2^40 µs (12 days): far beyond any bounded run.
const MAX_EXP: u32 = 40;
const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 2) as usize) * SUB as usize;

pub struct Histogram {
    counts: Box<[AtomicU64]>,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }

    fn index(value_us: u64) -> usize {
        let v = value_us.min((1u64 << (MAX_EXP + 1)) - 1);
        if v < SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let mantissa = (v >> (exp - SUB_BITS)) - SUB;
        ((exp - SUB_BITS + 1) as usize) * SUB as usize + mantissa as usize
    }

    /// The range `[low, low + width)` that bucket `index` covers.
    fn bounds(index: usize) -> (u64, u64) {
        let i = index as u64;
        if i < SUB {
            return (i, 1);
        }
        let exp = (i / SUB) as u32 + SUB_BITS - 1;
        let mantissa = i % SUB + SUB;
        let shift = exp - SUB_BITS;
        (mantissa << shift, 1 << shift)
    }

    pub fn record_us(&self, value_us: u64) {
        self.counts[Self::index(value_us)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(value_us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn max_us(&self) -> u64 {
        self.max_us.load(Ordering::Relaxed)
    }

    /// Values at or above `threshold_us`, counted by whole buckets (so a
    /// bucket straddling the threshold counts in full).
    pub fn count_at_least(&self, threshold_us: u64) -> u64 {
        let first = Self::index(threshold_us);
        self.counts[first..]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The `q` quantile (0..=1) in µs: the midpoint of the bucket holding it,
    /// capped at the exact maximum (which is the answer for the last rank);
    /// 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        if rank >= total {
            return self.max_us() as f64;
        }
        let mut seen = 0;
        for (index, &count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = Self::bounds(index);
                let mid = low as f64 + (width as f64 - 1.0) / 2.0;
                return mid.min(self.max_us() as f64);
            }
        }
        self.max_us() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 30, (1 << 40) + 5]) {
            let i = Histogram::index(v);
            assert!(i >= last, "index goes backwards at {v}");
            last = i;
            let (low, width) = Histogram::bounds(i);
            if v < 1 << 41 {
                assert!(
                    low <= v && v < low + width,
                    "{v} not in [{low}, {low}+{width})"
                );
                assert!(
                    width as f64 <= (v as f64 / 16.0).max(1.0),
                    "bucket of {v} too wide"
                );
            }
        }
        assert!(Histogram::index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = Histogram::new();
        for v in 1..=1000u64 {
            h.record_us(v * 10);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max_us(), 10_000);
        let p50 = h.quantile_us(0.5);
        assert!((p50 - 5000.0).abs() <= 5000.0 / 16.0, "p50 {p50}");
        let p99 = h.quantile_us(0.99);
        assert!((p99 - 9900.0).abs() <= 9900.0 / 16.0, "p99 {p99}");
        assert_eq!(h.quantile_us(1.0), 10_000.0);
        assert_eq!(h.count_at_least(20_000), 0);
        assert_eq!(Histogram::new().quantile_us(0.5), 0.0);
    }
}
