//! The Job kind: pods that run to completion, in order with other Jobs
//! (`after`), or on a schedule (`schedule`, cron syntax):
//!
//! ```toml
//! kind = "Job"
//! name = "transform"
//! completions = 4          # pods that must succeed (default 1)
//! parallelism = 2          # at most this many at once (default 1)
//! backoff_limit = 3        # failed pods tolerated (default 6)
//! active_deadline = "10m"  # the whole job (optional)
//! ttl_after_finished = "1h" # removed this long after it finished (optional)
//! after = ["extract"]      # runs once these Jobs succeeded; fails if one fails
//! [template]
//! [[template.members]]
//! wasm = "transform.wasm"
//! ```
//!
//! A Job with `schedule = "*/5 * * * *"` (five fields, or six with seconds
//! first) runs nothing itself: at each time it makes a Job of its own
//! (`NAME-<unix seconds>`), as `concurrency` allows (`Allow`, `Forbid`,
//! `Replace`).

use crate::meta::ObjectMeta;
use crate::probe::Millis;
use crate::{PodTemplate, RestartPolicy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Concurrency {
    /// A run starts even while earlier ones are still going.
    #[default]
    Allow,
    /// A run is skipped while an earlier one is still going.
    Forbid,
    /// Earlier runs still going are removed for the new one.
    Replace,
}

fn one() -> u32 {
    1
}

fn six() -> u32 {
    6
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub template: PodTemplate,
    #[serde(default = "one")]
    pub completions: u32,
    #[serde(default = "one")]
    pub parallelism: u32,
    #[serde(default = "six")]
    pub backoff_limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_after_finished: Option<Millis>,
    /// Jobs of the same namespace that must succeed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default)]
    pub concurrency: Concurrency,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    /// Waiting for the Jobs it comes after.
    #[default]
    Waiting,
    Running,
    Succeeded,
    Failed,
    /// A schedule: it makes Jobs at its times.
    Scheduled,
}

impl JobPhase {
    pub fn finished(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub phase: JobPhase,
    /// One word: `DependencyFailed`, `BackoffLimitExceeded`, `DeadlineExceeded`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub active: u32,
    pub succeeded: u32,
    pub failed: u32,
    #[serde(default)]
    pub started_ms: u64,
    #[serde(default)]
    pub finished_ms: u64,
    /// A schedule's last time it made a Job (ms since the epoch).
    #[serde(default, skip_serializing_if = "crate::object::is_zero")]
    pub last_schedule_ms: u64,
}

/// Pods that run to completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub metadata: ObjectMeta,
    pub spec: JobSpec,
    #[serde(default)]
    pub status: JobStatus,
}

impl JobSpec {
    /// What is wrong with it on its own (the graph of `after` is checked
    /// with the other Jobs: [`check_graph`]).
    pub fn validate(&self) -> Result<(), String> {
        if self.completions == 0 || self.parallelism == 0 {
            return Err("completions and parallelism must be at least 1".into());
        }
        if self
            .template
            .spec
            .members
            .iter()
            .any(|m| m.restart == RestartPolicy::Always)
        {
            return Err(
                "a job's members must finish: restart = \"Never\" or \"OnFailure\", not \"Always\""
                    .into(),
            );
        }
        if let Some(s) = &self.schedule {
            Cron::parse(s)?;
            if !self.after.is_empty() {
                return Err("a scheduled job cannot also come after other jobs".into());
            }
        }
        Ok(())
    }
}

/// Checks the `after` graph of a namespace's Jobs (`name → after`): every
/// name must be a Job, and there must be no cycle. The error names them
/// (`unknown job "x" in after of "y"`, `a cycle: a → b → a`).
pub fn check_graph(jobs: &BTreeMap<String, Vec<String>>) -> Result<(), String> {
    for (name, after) in jobs {
        for dep in after {
            if !jobs.contains_key(dep) {
                return Err(format!(
                    "job \"{name}\" comes after \"{dep}\", which is not a job of this namespace"
                ));
            }
        }
    }
    // Depth-first, keeping the path to report the cycle.
    fn visit<'a>(
        n: &'a str,
        jobs: &'a BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<&'a str>,
        path: &mut Vec<&'a str>,
    ) -> Result<(), String> {
        if let Some(at) = path.iter().position(|p| *p == n) {
            let mut cycle: Vec<&str> = path[at..].to_vec();
            cycle.push(n);
            return Err(format!(
                "the jobs' after lists make a cycle: {}",
                cycle.join(" → ")
            ));
        }
        if done.contains(n) {
            return Ok(());
        }
        path.push(n);
        for dep in jobs.get(n).into_iter().flatten() {
            visit(dep, jobs, done, path)?;
        }
        path.pop();
        done.insert(n);
        Ok(())
    }
    let mut done = BTreeSet::new();
    for name in jobs.keys() {
        visit(name, jobs, &mut done, &mut Vec::new())?;
    }
    Ok(())
}

/// A cron schedule: minute hour day-of-month month day-of-week, with an
/// optional seconds field first; each a `*`, a number, a range `a-b`, a
/// list `a,b` or a step `*/n`, `a-b/n`. Times are UTC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    seconds: Vec<bool>,
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    /// Both day fields restricted: either may match (as cron does).
    either_day: bool,
}

fn field(text: &str, lo: u32, hi: u32, what: &str) -> Result<Vec<bool>, String> {
    let mut set = vec![false; hi as usize + 1];
    let bad = || format!("'{text}' is not a valid {what} field ({lo}-{hi}, *, a-b, a,b or */n)");
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| bad())?),
            None => (part, 1),
        };
        if step == 0 {
            return Err(bad());
        }
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)
        } else {
            let v: u32 = range.parse().map_err(|_| bad())?;
            (v, if part.contains('/') { hi } else { v })
        };
        if a < lo || b > hi || a > b {
            return Err(bad());
        }
        let mut v = a;
        while v <= b {
            set[v as usize] = true;
            v += step;
        }
    }
    Ok(set)
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cron {
    pub fn parse(s: &str) -> Result<Cron, String> {
        let f: Vec<&str> = s.split_whitespace().collect();
        let (sec, rest) = match f.len() {
            5 => ("0", &f[..]),
            6 => (f[0], &f[1..]),
            n => {
                return Err(format!(
                    "'{s}' has {n} fields; a schedule has 5 (minute hour day month weekday) or 6 (seconds first)"
                ));
            }
        };
        let weekdays = {
            let mut w = field(rest[4], 0, 7, "day-of-week")?;
            // 7 is Sunday too.
            if w[7] {
                w[0] = true;
            }
            w
        };
        Ok(Cron {
            seconds: field(sec, 0, 59, "seconds")?,
            minutes: field(rest[0], 0, 59, "minute")?,
            hours: field(rest[1], 0, 23, "hour")?,
            days: field(rest[2], 1, 31, "day-of-month")?,
            months: field(rest[3], 1, 12, "month")?,
            weekdays,
            either_day: rest[2] != "*" && rest[4] != "*",
        })
    }

    fn day_matches(&self, days_since_epoch: i64) -> bool {
        let (_, m, d) = civil(days_since_epoch);
        // 1970-01-01 was a Thursday (4).
        let wd = (days_since_epoch + 4).rem_euclid(7) as usize;
        if !self.months[m as usize] {
            return false;
        }
        if self.either_day {
            self.days[d as usize] || self.weekdays[wd]
        } else {
            self.days[d as usize] && self.weekdays[wd]
        }
    }

    /// The first time strictly after `after_ms` the schedule fires (ms,
    /// on a whole second), within the next 5 years.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let mut t = after_ms / 1000 + 1;
        let end = t + 5 * 366 * 86_400;
        while t < end {
            let day = (t / 86_400) as i64;
            if !self.day_matches(day) {
                t = (day as u64 + 1) * 86_400;
                continue;
            }
            let s = t % 86_400;
            let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
            if !self.hours[h as usize] {
                t = t - s % 3600 + 3600;
                continue;
            }
            if !self.minutes[m as usize] {
                t = t - sec + 60;
                continue;
            }
            if self.seconds[sec as usize] {
                return Some(t * 1000);
            }
            t += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, a)| (n.to_string(), a.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn graphs_with_unknown_names_or_cycles_are_refused_with_them_named() {
        let diamond = graph(&[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])]);
        assert!(check_graph(&diamond).is_ok());
        let e = check_graph(&graph(&[("a", &["zz"])])).unwrap_err();
        assert!(e.contains("\"a\" comes after \"zz\""), "{e}");
        let e = check_graph(&graph(&[
            ("a", &["c"]),
            ("b", &["a"]),
            ("c", &["b"]),
            ("d", &[]),
        ]))
        .unwrap_err();
        assert_eq!(e, "the jobs' after lists make a cycle: a → c → b → a");
        let e = check_graph(&graph(&[("self", &["self"])])).unwrap_err();
        assert!(e.ends_with("self → self"), "{e}");
    }

    #[test]
    fn schedules_parse_and_fire_at_their_times() {
        // 2026-12-01 00:00:00 UTC.
        let t0 = 1_796_083_200_000u64;
        assert_eq!(civil((t0 / 86_400_000) as i64), (2026, 12, 1));
        let every5 = Cron::parse("*/5 * * * *").unwrap();
        assert_eq!(every5.next_after(t0), Some(t0 + 5 * 60_000));
        assert_eq!(every5.next_after(t0 + 1), Some(t0 + 5 * 60_000));
        let secs = Cron::parse("*/2 * * * * *").unwrap();
        assert_eq!(secs.next_after(t0), Some(t0 + 2000));
        assert_eq!(secs.next_after(t0 + 2000), Some(t0 + 4000));
        // 2026-12-01 is a Tuesday: the next Monday 09:30 is 2026-12-07.
        let monday = Cron::parse("30 9 * * 1").unwrap();
        assert_eq!(
            monday.next_after(t0),
            Some(t0 + 6 * 86_400_000 + (9 * 60 + 30) * 60_000)
        );
        let newyear = Cron::parse("0 0 1 1 *").unwrap();
        assert_eq!(
            civil((newyear.next_after(t0).unwrap() / 86_400_000) as i64),
            (2027, 1, 1)
        );
        assert!(Cron::parse("* * * *").unwrap_err().contains("has 4 fields"));
        assert!(Cron::parse("61 * * * *").unwrap_err().contains("minute"));
        assert!(Cron::parse("*/0 * * * *").is_err());
        // Never (February 30th).
        assert_eq!(Cron::parse("0 0 30 2 *").unwrap().next_after(t0), None);
    }
}
