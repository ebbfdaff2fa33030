//! Request latency as a fixed-bucket histogram: cheap to count on the hot
//! path (one atomic add per request), cheap to send (a few integers), and
//! mergeable — the scheduler sums the buckets of every instance of a
//! function and reads its p50 and p99 from them; the agents expose them as
//! Prometheus histograms. A quantile is known to within its bucket: it is
//! interpolated linearly inside it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds; one more bucket past the
/// last takes everything slower.
pub const BOUNDS_US: [u64; 16] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// Number of buckets (the bounds and the overflow).
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

/// Counts of requests per latency bucket, and their total time.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

fn bucket(us: u64) -> usize {
    BOUNDS_US.partition_point(|&b| b < us)
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The counts per bucket (not cumulative) so far.
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Total time of every request counted, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }
}

/// What happened between two readings of counts (`None` when any fell:
/// the counter was started again in between).
pub fn delta(now: &[u64], before: &[u64]) -> Option<Vec<u64>> {
    if now.len() != before.len() {
        return None;
    }
    now.iter()
        .zip(before)
        .map(|(n, b)| n.checked_sub(*b))
        .collect()
}

/// Adds `more` into `into`, bucket by bucket.
pub fn merge(into: &mut Vec<u64>, more: &[u64]) {
    if into.len() < more.len() {
        into.resize(more.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(more) {
        *a += b;
    }
}

/// The `q` quantile (0 < q ≤ 1) of the counted latencies, in microseconds;
/// `None` with nothing counted. Within a bucket the requests are taken as
/// spread evenly; in the overflow bucket, as at its lower bound.
pub fn quantile(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the request asked for (a hair under, so 0.99 × 1000 is
    // the 990th whatever the rounding).
    let rank = (q.clamp(0.0, 1.0) * total as f64 - 1e-9).ceil().max(1.0);
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (below + n) as f64 >= rank {
            let lo = if i == 0 { 0 } else { BOUNDS_US[i - 1] };
            let Some(&hi) = BOUNDS_US.get(i) else {
                return Some(lo);
            };
            let into = (rank - below as f64) / n as f64;
            return Some(lo + ((hi - lo) as f64 * into).round() as u64);
        }
        below += n;
    }
    BOUNDS_US.last().copied()
}

/// A latency for people: `840µs`, `12.5ms`, `2.1s`.
pub fn human(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        let ms = us as f64 / 1000.0;
        if ms < 10.0 {
            format!("{ms:.2}ms")
        } else {
            format!("{ms:.1}ms")
        }
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_the_bucket_bounding_them() {
        let h = Histogram::default();
        for us in [1, 250, 251, 999, 1_000, 40_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let c = h.counts();
        assert_eq!(c.len(), BUCKETS);
        // ≤250µs: 1 and 250; ≤500µs: 251; ≤1ms: 999 and 1000; overflow: 40 s.
        assert_eq!((c[0], c[1], c[2], c[BUCKETS - 1]), (2, 1, 2, 1));
        assert_eq!(c.iter().sum::<u64>(), 6);
        assert_eq!(h.sum_us(), 1 + 250 + 251 + 999 + 1_000 + 40_000_000);
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
        // 100 requests, all between 1 and 2.5 ms: the median is halfway.
        let mut c = vec![0; BUCKETS];
        c[3] = 100;
        assert_eq!(quantile(&c, 0.5), Some(1_750));
        assert_eq!(quantile(&c, 1.0), Some(2_500));
        // 990 fast ones and 10 slow ones: p99 is the last fast one, p99.9
        // a slow one.
        let mut c = vec![0; BUCKETS];
        c[0] = 990;
        c[10] = 10;
        assert_eq!(quantile(&c, 0.99), Some(250));
        assert_eq!(quantile(&c, 0.999), Some(250_000 + 225_000));
        // Past the last bound: its lower bound.
        let mut c = vec![0; BUCKETS];
        c[BUCKETS - 1] = 3;
        assert_eq!(quantile(&c, 0.5), Some(30_000_000));
    }

    #[test]
    fn deltas_refuse_a_counter_that_started_again() {
        assert_eq!(delta(&[5, 7], &[2, 7]), Some(vec![3, 0]));
        assert_eq!(delta(&[5, 1], &[2, 7]), None);
        assert_eq!(delta(&[5], &[2, 7]), None);
        let mut m = vec![1, 2];
        merge(&mut m, &[3, 4, 5]);
        assert_eq!(m, vec![4, 6, 5]);
    }

    #[test]
    fn latencies_read_for_people() {
        assert_eq!(human(840), "840µs");
        assert_eq!(human(1_250), "1.25ms");
        assert_eq!(human(12_500), "12.5ms");
        assert_eq!(human(2_100_000), "2.10s");
    }
}
