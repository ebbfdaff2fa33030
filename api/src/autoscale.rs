//! The Autoscaler kind: keeps a Deployment's replicas between `min` and
//! `max` so that what its pods use meets the targets.
//!
//! ```toml
//! kind = "Autoscaler"
//! name = "web"
//! target = "web"                 # a Deployment of the same namespace
//! min = 1
//! max = 10
//! cpu = 60                       # % of the pods' CPU requests, on average
//! memory = "256Mi"               # average per pod
//! metric = { name = "flotilla_member_memory_bytes", member = "cache", average = "128Mi" }
//! scale_up_window = "0s"         # stabilisation: the lowest recommendation of the window
//! scale_down_window = "5m"       # the highest recommendation of the window
//! ```
//!
//! The arithmetic is pure ([`recommend`], [`stabilise`]); the scheduler's
//! autoscale controller feeds it the agents' figures.

use crate::meta::ObjectMeta;
use crate::probe::Millis;
use crate::quantity::Bytes;
use serde::{Deserialize, Serialize};

/// A metric the cluster collects (issue 16 item 3), averaged per pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricTarget {
    /// `flotilla_member_cpu_seconds_total` (as a rate, in millicores) or
    /// `flotilla_member_memory_bytes`.
    pub name: String,
    /// Only this member of each pod (default: the sum of its members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The average per pod to hold: millicores, or bytes (`"128Mi"`).
    pub average: Bytes,
}

/// The metric names a `metric` target may name.
pub const METRIC_CPU: &str = "flotilla_member_cpu_seconds_total";
pub const METRIC_MEMORY: &str = "flotilla_member_memory_bytes";

fn up_window() -> Millis {
    Millis(0)
}

fn down_window() -> Millis {
    Millis(300_000)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoscalerSpec {
    /// The Deployment scaled (same namespace).
    pub target: String,
    pub min: u32,
    pub max: u32,
    /// Target CPU utilisation: percent of the pods' requests (`resources.cpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Target average memory per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<MetricTarget>,
    #[serde(default = "up_window")]
    pub scale_up_window: Millis,
    #[serde(default = "down_window")]
    pub scale_down_window: Millis,
}

impl AutoscalerSpec {
    /// What is wrong with it, for the manifest's author.
    pub fn validate(&self) -> Result<(), String> {
        if self.min == 0 {
            return Err("min must be at least 1".into());
        }
        if self.max < self.min {
            return Err(format!(
                "max ({}) is less than min ({})",
                self.max, self.min
            ));
        }
        if self.max > crate::manifest::MAX_REPLICAS {
            return Err(format!(
                "max ({}) is more than {} replicas",
                self.max,
                crate::manifest::MAX_REPLICAS
            ));
        }
        if self.cpu.is_none() && self.memory.is_none() && self.metric.is_none() {
            return Err("no target: set cpu (percent of requests), memory or metric".into());
        }
        if self.cpu == Some(0) || self.memory.is_some_and(|m| m.0 == 0) {
            return Err("a target of 0 would scale to max at once".into());
        }
        if let Some(m) = &self.metric {
            if m.name != METRIC_CPU && m.name != METRIC_MEMORY {
                return Err(format!(
                    "unknown metric '{}': the collected ones are {METRIC_CPU} and {METRIC_MEMORY}",
                    m.name
                ));
            }
            if m.average.0 == 0 {
                return Err("metric.average must be more than 0".into());
            }
        }
        Ok(())
    }
}

/// One scaling the autoscaler did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoscalerStatus {
    /// The Deployment's replicas when last looked at.
    pub current_replicas: u32,
    /// What the targets ask for now, after stabilisation.
    pub desired_replicas: u32,
    /// CPU utilisation now, percent of requests (measured pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Average memory per measured pod now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// The custom metric's average per measured pod now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<Decision>,
    /// Scalings done so far.
    #[serde(default)]
    pub decisions: u64,
    /// Why it is not scaling, when it cannot (no figures yet, no target).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Scales a Deployment on what its pods use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Autoscaler {
    pub metadata: ObjectMeta,
    pub spec: AutoscalerSpec,
    #[serde(default)]
    pub status: AutoscalerStatus,
}

/// A ratio of use to target within this of 1 changes nothing (noise).
pub const TOLERANCE: f64 = 0.1;

/// Replicas for one metric: the measured pods scaled by how far their
/// average is from the target (`ceil(pods × used / target)`), or the
/// current count when within the tolerance.
pub fn recommend(current: u32, measured: u32, used: f64, target: f64) -> u32 {
    if measured == 0 || target <= 0.0 {
        return current;
    }
    let ratio = used / target;
    if (ratio - 1.0).abs() <= TOLERANCE {
        return current;
    }
    (f64::from(measured) * ratio).ceil().max(0.0) as u32
}

/// The replicas to go to now: a rise only to the lowest recommendation
/// within the up window, a fall only to the highest within the down
/// window, so a brief spike or dip does not move it (`recs`: the
/// recommendations with their times, this one included).
pub fn stabilise(
    current: u32,
    recs: &[(u64, u32)],
    now_ms: u64,
    up_window: Millis,
    down_window: Millis,
) -> u32 {
    let within = |w: Millis| {
        recs.iter()
            .filter(move |(at, _)| now_ms.saturating_sub(*at) <= w.0)
            .map(|&(_, r)| r)
    };
    let up = within(up_window).min().unwrap_or(current);
    let down = within(down_window).max().unwrap_or(current);
    if up > current {
        up
    } else if down < current {
        down
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommendations_follow_the_ratio_and_ignore_noise() {
        // 2 pods at 150% of a 50% target: 6.
        assert_eq!(recommend(2, 2, 150.0, 50.0), 6);
        // Within 10%: stay.
        assert_eq!(recommend(3, 3, 54.0, 50.0), 3);
        // Idle: down to what the figures ask (the caller clamps to min).
        assert_eq!(recommend(4, 4, 0.0, 50.0), 0);
        // A new pod not measured yet does not count.
        assert_eq!(recommend(3, 2, 75.0, 50.0), 3);
        assert_eq!(recommend(3, 0, 75.0, 50.0), 3);
    }

    #[test]
    fn stabilisation_holds_against_spikes_and_dips() {
        let (up, down) = (Millis(0), Millis(10_000));
        // Rising: at once with no up window.
        assert_eq!(stabilise(2, &[(1_000, 2), (2_000, 4)], 2_000, up, down), 4);
        // Falling: only when every recommendation of the last 10 s is lower.
        let recs = [(1_000, 4), (5_000, 1), (9_000, 1)];
        assert_eq!(stabilise(4, &recs, 9_000, up, down), 4);
        assert_eq!(stabilise(4, &recs, 11_500, up, down), 1);
        // With an up window, a spike alone is not followed.
        let recs = [(1_000, 2), (2_000, 6)];
        assert_eq!(stabilise(2, &recs, 2_000, Millis(3_000), down), 2);
    }

    #[test]
    fn specs_are_checked_with_reasons() {
        let spec = |t: &str| -> AutoscalerSpec {
            toml::from_str(&format!("target = \"web\"\n{t}")).unwrap()
        };
        assert!(spec("min = 1\nmax = 3\ncpu = 50").validate().is_ok());
        assert!(
            spec("min = 0\nmax = 3\ncpu = 50")
                .validate()
                .unwrap_err()
                .contains("min")
        );
        assert!(
            spec("min = 4\nmax = 3\ncpu = 50")
                .validate()
                .unwrap_err()
                .contains("less than min")
        );
        assert!(
            spec("min = 1\nmax = 3")
                .validate()
                .unwrap_err()
                .contains("no target")
        );
        let bad = spec("min = 1\nmax = 3\nmetric = { name = \"x\", average = 1 }");
        assert!(bad.validate().unwrap_err().contains("unknown metric 'x'"));
        let s = spec("min = 1\nmax = 3\nmemory = \"64Mi\"");
        assert_eq!(s.memory, Some(Bytes(64 << 20)));
        assert_eq!(
            (s.scale_up_window, s.scale_down_window),
            (Millis(0), Millis(300_000))
        );
    }
}
