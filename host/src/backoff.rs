//! Exponential backoff, shared by member restarts and link reconnects.

use std::time::Duration;

/// Doubling delays from `min` up to `max`; a run that lasted `reset_after`
/// counts as healthy and starts the sequence over.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    pub reset_after: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, reset_after: Duration) -> Backoff {
        Backoff {
            min,
            max,
            reset_after,
            attempt: 0,
        }
    }

    /// The delay before the next try, given how long the last try lasted.
    pub fn next(&mut self, lasted: Duration) -> Duration {
        if lasted >= self.reset_after {
            self.attempt = 0;
        }
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.attempt = self.attempt.saturating_add(1);
        self.min.saturating_mul(factor).min(self.max)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets_after_a_healthy_run() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000), ms(10_000));
        let got: Vec<u128> = (0..6).map(|_| b.next(ms(1)).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.next(ms(10_000)), ms(100));
        assert_eq!(b.next(ms(5)), ms(200));
        b.reset();
        assert_eq!(b.next(ms(5)), ms(100));
        for _ in 0..100 {
            b.next(ms(0));
        }
        assert_eq!(b.next(ms(0)), ms(1000));
    }
}
