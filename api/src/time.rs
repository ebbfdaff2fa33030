//! Wall-clock helpers. Stored timestamps are milliseconds since the Unix epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A short human age such as `5s`, `3m`, `2h`, `4d` for a timestamp in the past.
pub fn age(since_ms: u64, now_ms: u64) -> String {
    if since_ms == 0 {
        return "-".into();
    }
    human_duration(Duration::from_millis(now_ms.saturating_sub(since_ms)))
}

/// Formats a duration with its largest unit, the way `kubectl get` does.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_the_largest_unit() {
        assert_eq!(age(0, 10), "-");
        assert_eq!(age(1_000, 6_000), "5s");
        assert_eq!(age(0 + 1, 1 + 180_000), "3m");
        assert_eq!(age(1, 1 + 3 * 3_600_000), "3h");
        assert_eq!(age(1, 1 + 3 * 86_400_000), "3d");
    }
}
