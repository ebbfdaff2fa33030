//! How a Deployment moves from one pod template to the next, as a manifest
//! writes it and the API stores it:
//!
//! ```toml
//! strategy = { max_surge = "25%", max_unavailable = 1 }
//! strategy = { type = "Recreate" }
//! progress_deadline = "2m"
//! ```
//!
//! and what the controller records while it does (revisions, the rollout's
//! state). The stepping itself is the scheduler's
//! (`controllers::rollout`).

use crate::PodTemplate;
use crate::probe::Millis;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// How long a rollout may go without progress before it halts, unless the
/// Deployment says otherwise.
pub const DEFAULT_PROGRESS_DEADLINE: Millis = Millis(600_000);
/// Revisions a Deployment keeps (the current one included) for
/// `rollout history` and `rollout undo`.
pub const REVISION_HISTORY: usize = 10;

/// A count of pods, or a percentage of the desired replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// The count for `replicas` pods: a percentage rounds up (a surge) or
    /// down (unavailability), as `round_up` says.
    pub fn of(self, replicas: u32, round_up: bool) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => {
                let scaled = u64::from(replicas) * u64::from(p);
                let n = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                n.min(u64::from(u32::MAX)) as u32
            }
        }
    }

    pub fn parse(s: &str) -> Result<Amount, String> {
        let t = s.trim();
        let bad = || format!("'{s}' is neither a count nor a percentage (e.g. 1 or \"25%\")");
        match t.strip_suffix('%') {
            Some(p) => {
                let p: u32 = p.trim().parse().map_err(|_| bad())?;
                if p > 100 {
                    return Err(format!("'{s}' is more than 100%"));
                }
                Ok(Amount::Percent(p))
            }
            None => t.parse().map(Amount::Count).map_err(|_| bad()),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(n) => s.serialize_u32(*n),
            Amount::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Amount, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count of pods or a percentage such as \"25%\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Amount, E> {
                Amount::parse(s).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Amount, E> {
                u32::try_from(v)
                    .map(Amount::Count)
                    .map_err(|_| E::custom(format!("{v} is not a count of pods")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Amount, E> {
                u32::try_from(v)
                    .map(Amount::Count)
                    .map_err(|_| E::custom(format!("{v} is not a count of pods")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrategyType {
    /// New pods replace old ones a few at a time, gated on readiness.
    #[default]
    RollingUpdate,
    /// Every old pod goes before any new one is made.
    Recreate,
}

/// How a template change replaces pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    #[serde(rename = "type", default)]
    pub kind: StrategyType,
    /// Pods above `replicas` a rolling update may make (default 25%).
    #[serde(default = "quarter")]
    pub max_surge: Amount,
    /// Pods below `replicas` that may be unready during a rolling update
    /// (default 25%).
    #[serde(default = "quarter")]
    pub max_unavailable: Amount,
}

fn quarter() -> Amount {
    Amount::Percent(25)
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            kind: StrategyType::RollingUpdate,
            max_surge: quarter(),
            max_unavailable: quarter(),
        }
    }
}

impl Strategy {
    /// The surge and unavailability in pods for `replicas`; never both 0
    /// (a rollout that could neither add nor remove a pod would never
    /// move), so then one pod may be unavailable.
    pub fn limits(&self, replicas: u32) -> (u32, u32) {
        let surge = self.max_surge.of(replicas, true);
        let unavailable = self.max_unavailable.of(replicas, false);
        if surge == 0 && unavailable == 0 {
            (0, 1)
        } else {
            (surge, unavailable)
        }
    }

    /// What is wrong with it, in words for the manifest's author.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind == StrategyType::RollingUpdate
            && self.max_surge == Amount::Count(0)
            && self.max_unavailable == Amount::Count(0)
        {
            return Err(
                "max_surge and max_unavailable are both 0: a rolling update could never replace a pod"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A pod template the Deployment has rolled out, kept for history and undo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub number: u64,
    /// The template's hash (the `flotilla.dev/template-hash` label of its pods).
    pub hash: String,
    pub template: PodTemplate,
    /// The `rollout restart` stamp it was made with (part of the hash).
    #[serde(default, skip_serializing_if = "crate::object::is_zero")]
    pub restarted_ms: u64,
    pub created_ms: u64,
}

/// Where a Deployment's rollout stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// Every pod is of the current revision and ready.
    #[default]
    Complete,
    /// Pods of the current revision are replacing older ones.
    Progressing,
    /// `rollout pause`: no pod is replaced until `rollout resume`.
    Paused,
    /// No progress within the progress deadline: nothing more is replaced
    /// until the template changes, `rollout undo` or `rollout resume`.
    Halted,
}

impl fmt::Display for RolloutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The rollout's condition: its phase, why, and since when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    pub phase: RolloutPhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the phase last changed.
    #[serde(default)]
    pub since_ms: u64,
    /// When the rollout last made progress (a pod of the current revision
    /// made or ready, an older one removed); the deadline counts from here.
    #[serde(default)]
    pub progress_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_counts_or_percentages_rounded_the_safe_way() {
        assert_eq!(Amount::parse("3"), Ok(Amount::Count(3)));
        assert_eq!(Amount::parse("25%"), Ok(Amount::Percent(25)));
        assert!(
            Amount::parse("101%")
                .unwrap_err()
                .contains("more than 100%")
        );
        assert!(Amount::parse("-1").unwrap_err().contains("neither"));
        assert!(Amount::parse("a%").is_err());
        // 25% of 10: a surge of 3, at most 2 unavailable.
        assert_eq!(Amount::Percent(25).of(10, true), 3);
        assert_eq!(Amount::Percent(25).of(10, false), 2);
        assert_eq!(Amount::Count(4).of(10, false), 4);
        let s: Strategy = toml::from_str("max_surge = 1\nmax_unavailable = \"50%\"").unwrap();
        assert_eq!(s.limits(5), (1, 2));
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"type":"RollingUpdate","max_surge":1,"max_unavailable":"50%"}"#
        );
        let back: Strategy = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_strategy_that_could_never_move_is_refused_and_tiny_ones_still_move() {
        let s: Strategy = toml::from_str("max_surge = 0\nmax_unavailable = 0").unwrap();
        assert!(s.validate().unwrap_err().contains("both 0"));
        // 25% of 1 replica: a surge of 1, none unavailable.
        assert_eq!(Strategy::default().limits(1), (1, 0));
        // 10% of 3, rounding both ways: surge 1, unavailable 0.
        let s: Strategy = toml::from_str("max_surge = \"0%\"\nmax_unavailable = \"10%\"").unwrap();
        assert_eq!(s.limits(3), (0, 1));
        let r: Strategy = toml::from_str("type = \"Recreate\"").unwrap();
        assert_eq!(r.kind, StrategyType::Recreate);
        assert!(toml::from_str::<Strategy>("max_surj = 1").is_err());
    }
}
