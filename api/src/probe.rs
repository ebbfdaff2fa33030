//! Health probes of a member (`liveness`, `readiness`, `startup`), as a
//! manifest writes them and the API stores them:
//!
//! ```toml
//! liveness = { http = { port = 8080, path = "/healthz" }, period = 1, failure_threshold = 3 }
//! readiness = { tcp = { port = 8080 }, period = "500ms" }
//! startup = { exec = ["cat", "/tmp/started"], period = 1, failure_threshold = 30 }
//! liveness = { health = {}, period = 2 }  # a component's flotilla:health/check
//! ```
//!
//! Durations are seconds (a number) or a text with a unit (`"250ms"`,
//! `"2s"`, `"1m"`). What each probe does is the agent's (`host::probe`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration kept in milliseconds, written as seconds or with a unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

impl Millis {
    pub fn duration(self) -> Duration {
        Duration::from_millis(self.0)
    }

    /// `"250ms"`, `"2s"`, `"1.5s"`, `"1m"`, `"1h"`, or a bare number of seconds.
    pub fn parse(s: &str) -> Result<Millis, String> {
        let s = s.trim();
        let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = s.strip_suffix('s') {
            (n, 1000.0)
        } else if let Some(n) = s.strip_suffix('m') {
            (n, 60_000.0)
        } else if let Some(n) = s.strip_suffix('h') {
            (n, 3_600_000.0)
        } else {
            (s, 1000.0)
        };
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a duration (e.g. 1, \"500ms\", \"2s\", \"1m\")"))?;
        Millis::from_f64(v * scale).ok_or_else(|| format!("'{s}' is not a duration"))
    }

    fn from_f64(ms: f64) -> Option<Millis> {
        (ms.is_finite() && (0.0..=1e12).contains(&ms)).then(|| Millis(ms.round() as u64))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}s", self.0 / 1000)
        } else {
            write!(f, "{}ms", self.0)
        }
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("seconds, or a duration such as \"500ms\" or \"2s\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Millis, E> {
                Millis::parse(s).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Millis, E> {
                Millis::from_f64(v as f64 * 1000.0).ok_or_else(|| E::custom("a negative duration"))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Millis, E> {
                self.visit_i64(v.min(i64::MAX as u64) as i64)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Millis, E> {
                Millis::from_f64(v * 1000.0).ok_or_else(|| E::custom("not a duration"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `http = { port = 8080, path = "/healthz" }`: a GET answered 200–399.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    pub port: u16,
    #[serde(default = "root_path")]
    pub path: String,
}

fn root_path() -> String {
    "/".into()
}

/// `tcp = { port = 8080 }`: a connection accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    pub port: u16,
}

/// `health = {}`: calls `check` of the component's
/// `flotilla:health/check` export (`wit/health.wit`) in a fresh instance of
/// the member in its own sandbox; `ok` passes, `err(why)` fails with why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {}

/// The export a `health` probe calls: interface and function.
pub const HEALTH_INTERFACE: &str = "flotilla:health/check@0.1.0";
pub const HEALTH_FUNCTION: &str = "check";

/// One probe of a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// A command run in the container (containers only); exit 0 passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// The component's own health function (wasm components only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthProbe>,
    /// How often (default 10 s).
    #[serde(default = "ten_seconds")]
    pub period: Millis,
    /// How long one check may take (default 1 s).
    #[serde(default = "one_second")]
    pub timeout: Millis,
    /// Before the first check (default 0).
    #[serde(default)]
    pub initial_delay: Millis,
    /// Consecutive failures that make it fail (default 3).
    #[serde(default = "three")]
    pub failure_threshold: u32,
    /// Consecutive successes that make it pass again (default 1; only
    /// readiness may ask for more).
    #[serde(default = "one")]
    pub success_threshold: u32,
}

fn ten_seconds() -> Millis {
    Millis(10_000)
}
fn one_second() -> Millis {
    Millis(1_000)
}
fn three() -> u32 {
    3
}
fn one() -> u32 {
    1
}

/// `pre_stop = { exec = [..] }` or `{ http = { port, path } }`: run when the
/// member is to stop, before it is signalled; the member's grace period
/// covers the hook and the stop together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
}

impl Hook {
    /// What it does, as a probe (one check, no thresholds).
    pub fn as_probe(&self) -> Probe {
        Probe {
            http: self.http.clone(),
            tcp: None,
            exec: self.exec.clone(),
            health: None,
            period: ten_seconds(),
            timeout: one_second(),
            initial_delay: Millis(0),
            failure_threshold: 1,
            success_threshold: 1,
        }
    }

    pub fn validate(&self, container: bool) -> Result<(), String> {
        self.as_probe().action().map_err(|_| {
            "pre_stop needs one of http = { port, path } or exec = [..]".to_string()
        })?;
        self.as_probe()
            .validate(Kind::Startup, container)
            .map_err(|e| e.replacen("startup probe", "pre_stop", 1))
    }
}

/// What a probe does, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    Http {
        port: u16,
        path: &'a str,
    },
    Tcp {
        port: u16,
    },
    Exec(&'a [String]),
    /// The component's `flotilla:health/check.check`.
    Health,
}

/// Which probe of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Liveness => "liveness",
            Kind::Readiness => "readiness",
            Kind::Startup => "startup",
        })
    }
}

/// Shortest period a probe may have.
pub const MIN_PERIOD: Millis = Millis(100);

impl Probe {
    /// The probe's one action.
    pub fn action(&self) -> Result<Action<'_>, String> {
        let mut set = Vec::with_capacity(1);
        if let Some(h) = &self.http {
            set.push(Action::Http {
                port: h.port,
                path: &h.path,
            });
        }
        if let Some(t) = &self.tcp {
            set.push(Action::Tcp { port: t.port });
        }
        if let Some(c) = &self.exec {
            set.push(Action::Exec(c));
        }
        if self.health.is_some() {
            set.push(Action::Health);
        }
        match set.len() {
            1 => Ok(set.remove(0)),
            0 => Err(
                "a probe needs one of http = { port, path }, tcp = { port }, exec = [..] or health = {}"
                    .into(),
            ),
            _ => Err("a probe does one thing: http, tcp, exec or health".into()),
        }
    }

    /// Whether it calls the component's health export (so the member must
    /// be a component exporting [`HEALTH_INTERFACE`]).
    pub fn calls_health(&self) -> bool {
        self.health.is_some()
    }

    /// The checks the API and the CLI make; `container`: the member is a
    /// container (only those can `exec`).
    pub fn validate(&self, kind: Kind, container: bool) -> Result<(), String> {
        let at = |why: String| format!("{kind} probe: {why}");
        match self.action().map_err(at)? {
            Action::Http { port, path } => {
                if port == 0 {
                    return Err(at("port 0".into()));
                }
                if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(at(format!(
                        "'{path}' is not a URL path (e.g. \"/healthz\")"
                    )));
                }
            }
            Action::Tcp { port: 0 } => return Err(at("port 0".into())),
            Action::Health if container => {
                return Err(at(format!(
                    "health calls a wasm component's {HEALTH_INTERFACE} export; a container can use http, tcp or exec"
                )));
            }
            Action::Health => {}
            Action::Tcp { .. } => {}
            Action::Exec(cmd) => {
                if !container {
                    return Err(at(
                        "exec runs a command in a container; a wasm member can use http, tcp or health"
                            .into(),
                    ));
                }
                if cmd.is_empty() || cmd[0].is_empty() {
                    return Err(at("exec needs a command".into()));
                }
            }
        }
        if self.period < MIN_PERIOD {
            return Err(at(format!("period {} is under {MIN_PERIOD}", self.period)));
        }
        if self.timeout.0 == 0 {
            return Err(at("timeout 0".into()));
        }
        if self.failure_threshold == 0 || self.success_threshold == 0 {
            return Err(at("thresholds start at 1".into()));
        }
        if kind != Kind::Readiness && self.success_threshold != 1 {
            return Err(at(format!(
                "success_threshold must be 1 for a {kind} probe (one success is enough)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(text: &str) -> Result<Probe, String> {
        #[derive(Deserialize)]
        struct Doc {
            p: Probe,
        }
        toml::from_str::<Doc>(&format!("p = {text}"))
            .map(|d| d.p)
            .map_err(|e| e.message().to_string())
    }

    #[test]
    fn durations_are_seconds_or_carry_a_unit() {
        for (text, ms) in [
            ("1", 1000),
            ("0.25", 250),
            ("\"500ms\"", 500),
            ("\"2s\"", 2000),
            ("\"1.5s\"", 1500),
            ("\"1m\"", 60_000),
            ("\"2h\"", 7_200_000),
        ] {
            let p = probe(&format!("{{ tcp = {{ port = 80 }}, period = {text} }}")).unwrap();
            assert_eq!(p.period, Millis(ms), "{text}");
        }
        assert!(probe("{ tcp = { port = 80 }, period = \"soon\" }").is_err());
        assert!(probe("{ tcp = { port = 80 }, period = -1 }").is_err());
        // Stored and read back the same.
        let p = probe("{ http = { port = 8080 }, period = 0.5, timeout = 2 }").unwrap();
        let back: Probe = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            p.action().unwrap(),
            Action::Http {
                port: 8080,
                path: "/"
            }
        );
        assert_eq!(
            (p.failure_threshold, p.success_threshold, p.timeout),
            (3, 1, Millis(2000))
        );
    }

    #[test]
    fn probes_are_checked_with_reasons() {
        let bad = |text: &str, kind: Kind, container: bool| {
            probe(text)
                .and_then(|p| p.validate(kind, container))
                .unwrap_err()
        };
        let e = bad("{ period = 1 }", Kind::Liveness, true);
        assert!(e.contains("needs one of http"), "{e}");
        let e = bad(
            "{ tcp = { port = 1 }, http = { port = 2 } }",
            Kind::Liveness,
            true,
        );
        assert!(e.contains("one thing"), "{e}");
        let e = bad("{ exec = [\"true\"] }", Kind::Readiness, false);
        assert!(
            e.starts_with("readiness probe: exec runs a command in a container"),
            "{e}"
        );
        let e = bad(
            "{ tcp = { port = 1 }, success_threshold = 2 }",
            Kind::Liveness,
            true,
        );
        assert!(e.contains("must be 1 for a liveness probe"), "{e}");
        let e = bad(
            "{ tcp = { port = 1 }, period = \"10ms\" }",
            Kind::Startup,
            true,
        );
        assert!(e.contains("under 100ms"), "{e}");
        let e = bad(
            "{ http = { port = 80, path = \"x\" } }",
            Kind::Startup,
            true,
        );
        assert!(e.contains("not a URL path"), "{e}");
        let e = bad("{ tcp = { prot = 1 } }", Kind::Startup, true);
        assert!(e.contains("prot"), "{e}");
        probe("{ tcp = { port = 1 }, success_threshold = 2 }")
            .unwrap()
            .validate(Kind::Readiness, false)
            .unwrap();
        // The component's own health function: wasm members only, and
        // alone.
        let e = bad("{ health = {} }", Kind::Liveness, true);
        assert!(
            e.starts_with(
                "liveness probe: health calls a wasm component's flotilla:health/check@0.1.0 export"
            ),
            "{e}"
        );
        let e = bad("{ health = {}, tcp = { port = 1 } }", Kind::Liveness, false);
        assert!(e.contains("one thing"), "{e}");
        let e = bad("{ health = { function = \"x\" } }", Kind::Liveness, false);
        assert!(e.contains("function"), "{e}");
        let p = probe("{ health = {}, period = 2 }").unwrap();
        p.validate(Kind::Liveness, false).unwrap();
        assert_eq!(p.action().unwrap(), Action::Health);
        assert!(p.calls_health());
        let back: Probe = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
