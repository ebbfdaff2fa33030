//! Functions: `wasi:http/proxy` components served one fresh instance per
//! request. A `Function` is what users write; the scheduler's functions
//! controller stamps out the pods that host it (a Deployment it owns, whose
//! member carries [`HttpServe`]) and a Service in front of them, so
//! placement, rollouts, Services and node ports work for functions as they
//! do for pods.

use crate::config::{EnvFrom, EnvValue};
use crate::meta::{Labels, ObjectMeta};
use crate::object::MemberSource;
use crate::probe::Millis;
use crate::quantity::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The label on a function's pods (and its Service's selector).
pub const FUNCTION_LABEL: &str = "flotilla.dev/function";
/// A Secret with this label set to `"true"` holds a certificate (`tls.crt`)
/// and its key (`tls.key`, PEM) that nodes' gateways serve HTTPS with, for
/// the hosts it names that routes of Functions in its namespace name.
pub const GATEWAY_TLS_LABEL: &str = "flotilla.dev/gateway-tls";

/// Whether `obj` is a Secret gateways serve HTTPS with.
pub fn is_gateway_tls(obj: &crate::Object) -> bool {
    matches!(obj, crate::Object::Secret(s)
        if s.metadata.labels.get(GATEWAY_TLS_LABEL).map(String::as_str) == Some("true"))
}
/// The port function pods listen on unless the spec says otherwise.
pub const DEFAULT_PORT: u16 = 8080;
/// The port of a function's Service (its pods' `port` behind it).
pub const SERVICE_PORT: u16 = 80;
pub const DEFAULT_TIMEOUT: Millis = Millis(30_000);
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;
/// Longest request a function may be given.
pub const MAX_TIMEOUT: Millis = Millis(3_600_000);
pub const MAX_CONCURRENCY: u32 = 4096;
/// The share of each instance's `max_concurrency` the autoscaler aims
/// for: past it, another instance is added (within `max_instances`).
pub const TARGET_UTILISATION: f64 = 0.7;

/// How long a function with `min_instances = 0` keeps its instances
/// after its last request, unless the spec says otherwise.
pub const DEFAULT_SCALE_TO_ZERO_AFTER: Millis = Millis(60_000);
/// The bounds of `scale_to_zero_after`: a second to a day.
pub const MIN_SCALE_TO_ZERO_AFTER: Millis = Millis(1_000);
pub const MAX_SCALE_TO_ZERO_AFTER: Millis = Millis(86_400_000);
pub const MAX_INSTANCES: u32 = 1000;
pub const MAX_ROUTES: usize = 64;
/// The longest function name: its canary's objects are `NAME-canary`.
pub const MAX_NAME: usize = 56;
/// What a function's canary Deployment and Service are called.
pub fn canary_name(function: &str) -> String {
    format!("{function}-canary")
}

/// A member served per request rather than run: the agent listens on the
/// member's first port and answers each request with a fresh instance of
/// the component's `wasi:http/incoming-handler`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpServe {
    /// Each request's limit, from its arrival until the function finished
    /// answering: past it, 504.
    #[serde(default = "default_timeout")]
    pub timeout: Millis,
    /// Requests served at once on the node; more are answered 503 with
    /// `Retry-After`.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// Hosts (`name` or `name:port`, `*` for any) the function may send
    /// requests to through `wasi:http/outgoing-handler`; none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Opt-in: an instance that answered without failing serves later
    /// requests too, one at a time, instead of a fresh instance for every
    /// request. Far faster for components that are costly to instantiate
    /// (interpreters), but what one request leaves in the instance's
    /// memory the next one sees. An instance that traps, runs out of
    /// memory or time is never reused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse_instances: bool,
}

impl Default for HttpServe {
    fn default() -> Self {
        HttpServe {
            timeout: DEFAULT_TIMEOUT,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            allow_hosts: Vec::new(),
            reuse_instances: false,
        }
    }
}

fn default_timeout() -> Millis {
    DEFAULT_TIMEOUT
}

fn default_max_concurrency() -> u32 {
    DEFAULT_MAX_CONCURRENCY
}

impl HttpServe {
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout.0 == 0 || self.timeout.0 > MAX_TIMEOUT.0 {
            return Err(format!(
                "timeout = {} must be more than 0 and at most 1 h",
                self.timeout
            ));
        }
        if self.max_concurrency == 0 || self.max_concurrency > MAX_CONCURRENCY {
            return Err(format!(
                "max_concurrency = {} must be between 1 and {MAX_CONCURRENCY}",
                self.max_concurrency
            ));
        }
        for h in &self.allow_hosts {
            let ok = h == "*"
                || (!h.is_empty()
                    && h.len() <= 253
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')));
            if !ok {
                return Err(format!(
                    "allow_hosts entry '{h}' is not a host name, host:port or '*'"
                ));
            }
        }
        Ok(())
    }
}

/// Where a function is reached through a node's gateway: requests whose
/// `Host` is `host` (any host when empty) and whose path starts with `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default = "root")]
    pub path: String,
    /// The share of the route's requests this target gets when several
    /// Services carry the same route (a Function's stable and canary
    /// revisions): requests are split in proportion to the weights.
    #[serde(default = "full", skip_serializing_if = "is_full")]
    pub weight: u32,
}

fn root() -> String {
    "/".into()
}

fn full() -> u32 {
    100
}

fn is_full(w: &u32) -> bool {
    *w == 100
}

/// The label telling a Function's stable pods from its canary's.
pub const TRACK_LABEL: &str = "flotilla.dev/function-track";

/// A second revision of a Function taking `weight` percent of each of its
/// routes' requests, beside the stable one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    #[serde(flatten)]
    pub source: MemberSource,
    /// Percent of the requests (1–99); the stable revision gets the rest.
    pub weight: u32,
    /// Variables that differ from the stable revision's (added over them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
}

impl Route {
    pub fn validate(&self) -> Result<(), String> {
        if self.weight > 100 {
            return Err(format!("route weight {} is over 100", self.weight));
        }
        if !self.path.starts_with('/') {
            return Err(format!("route path '{}' must start with '/'", self.path));
        }
        if self.path.len() > 1024 || self.path.contains(['?', '#', ' ']) {
            return Err(format!(
                "route path '{}' must be a plain path prefix (no '?', '#' or spaces, at most 1024 characters)",
                self.path
            ));
        }
        let h = &self.host;
        if h.len() > 253
            || !h
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        {
            return Err(format!(
                "route host '{h}' must be a lowercase host name without a port"
            ));
        }
        Ok(())
    }

    /// Whether a request for `host` (without its port) and `path` takes
    /// this route: the path prefix must end at a segment boundary.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        if !self.host.is_empty() && !self.host.eq_ignore_ascii_case(host) {
            return false;
        }
        let prefix = self.path.trim_end_matches('/');
        match path.strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
            None => false,
        }
    }
}

/// What a user declares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The component (uploaded or `oci://`; JSON `module`/`artifact`).
    #[serde(flatten)]
    pub source: MemberSource,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFrom>,
    /// Each instance's memory (all its linear memories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Bytes>,
    #[serde(flatten)]
    pub serve: HttpServe,
    /// Nodes hosting the function at least (0: none while idle) and at most.
    #[serde(default)]
    pub min_instances: u32,
    #[serde(default = "one")]
    pub max_instances: u32,
    /// With `min_instances = 0`: after this long without a request the
    /// function has no instance; the next request to a gateway brings
    /// one back.
    #[serde(default = "default_scale_to_zero_after")]
    pub scale_to_zero_after: Millis,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub node_selector: Labels,
    /// The port its pods listen on (behind the Service's port 80).
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Box<Canary>>,
    /// Host interfaces each request's instance may use (see
    /// [`crate::interfaces`]).
    /// (Boxed: most Functions ask for none, and it keeps `Object` small.)
    #[serde(default, skip_serializing_if = "crate::interfaces::boxed_is_default")]
    pub wasi: Box<crate::interfaces::HostInterfaces>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one() -> u32 {
    1
}

fn default_scale_to_zero_after() -> Millis {
    DEFAULT_SCALE_TO_ZERO_AFTER
}

fn default_port() -> u16 {
    DEFAULT_PORT
}

impl FunctionSpec {
    /// The checks the CLI and the API share.
    pub fn validate(&self) -> Result<(), String> {
        if matches!(self.source, MemberSource::Container { .. }) {
            return Err(
                "a function is a wasm component (wasm = \"./fn.wasm\" or \"oci://…\"), not a container image"
                    .into(),
            );
        }
        crate::object::validate_member(&self.member())?;
        if self.routes.len() > MAX_ROUTES {
            return Err(format!("at most {MAX_ROUTES} routes"));
        }
        for r in &self.routes {
            r.validate()?;
        }
        if self.max_instances == 0 || self.max_instances > MAX_INSTANCES {
            return Err(format!(
                "max_instances = {} must be between 1 and {MAX_INSTANCES}",
                self.max_instances
            ));
        }
        if self.min_instances > self.max_instances {
            return Err(format!(
                "min_instances = {} is more than max_instances = {}",
                self.min_instances, self.max_instances
            ));
        }
        if self.port == 0 {
            return Err("port must not be 0".into());
        }
        let idle = self.scale_to_zero_after;
        if idle.0 < MIN_SCALE_TO_ZERO_AFTER.0 || idle.0 > MAX_SCALE_TO_ZERO_AFTER.0 {
            return Err(format!(
                "scale_to_zero_after = {idle} must be between 1s and 24h"
            ));
        }
        if let Some(c) = &self.canary {
            if !(1..=99).contains(&c.weight) {
                return Err(format!(
                    "canary weight = {} must be between 1 and 99 (percent of the requests)",
                    c.weight
                ));
            }
            if self.routes.is_empty() {
                return Err("a canary splits the function's routes; give it routes".into());
            }
            crate::object::validate_member(&self.canary_member().expect("a canary"))
                .map_err(|e| format!("canary: {e}"))?;
        }
        for r in &self.routes {
            if r.weight != 100 {
                return Err(
                    "a function's routes carry no weight; split traffic with canary = { wasm = \"…\", weight = 10 }".into(),
                );
            }
        }
        Ok(())
    }

    /// The member of the canary's pods, if there is a canary: the stable
    /// member with the canary's component and variables.
    pub fn canary_member(&self) -> Option<crate::object::MemberSpec> {
        let c = self.canary.as_ref()?;
        let mut m = self.member();
        m.source = c.source.clone();
        m.env.extend(c.env.clone());
        Some(m)
    }

    /// The member its pods have: the component served per request on
    /// `port`, with the function's environment and per-request memory.
    pub fn member(&self) -> crate::object::MemberSpec {
        crate::object::MemberSpec {
            name: "function".into(),
            source: self.source.clone(),
            env: self.env.clone(),
            env_from: self.env_from.clone(),
            resources: crate::object::Resources {
                memory: self.memory,
                ..Default::default()
            },
            ports: vec![crate::object::Port {
                port: self.port,
                protocol: crate::object::Protocol::Tcp,
                name: "http".into(),
            }],
            http: Some(self.serve.clone()),
            wasi: (*self.wasi).clone(),
            ..Default::default()
        }
    }

    /// How many pods host it now, given `concurrency` — the mean number
    /// of its requests in flight over the last interval, all instances
    /// together: enough that each serves at most [`TARGET_UTILISATION`] of
    /// its `max_concurrency`, within `min_instances` and `max_instances`.
    /// A function that may scale to zero has at least one while `active`
    /// (it had a request within `scale_to_zero_after`, or a gateway holds
    /// one for it) and none otherwise.
    pub fn instances(&self, active: bool, concurrency: f64) -> u32 {
        let floor = match self.min_instances {
            0 => u32::from(active),
            n => n,
        };
        if floor == 0 {
            return 0;
        }
        let per_instance = f64::from(self.serve.max_concurrency.max(1)) * TARGET_UTILISATION;
        let wanted = (concurrency / per_instance).ceil();
        let wanted = if wanted.is_finite() && wanted > 0.0 {
            wanted.min(f64::from(u32::MAX)) as u32
        } else {
            0
        };
        wanted.clamp(floor, self.max_instances.max(floor))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionStatus {
    /// Pods hosting it that are ready.
    #[serde(default)]
    pub ready: u32,
    /// Pods hosting it.
    #[serde(default)]
    pub instances: u32,
    /// Its Deployment's current revision.
    #[serde(default)]
    pub revision: u64,
    /// When the scheduler last saw it asked for (a request counted on a
    /// node, or a gateway waking it), ms since the epoch; 0: not since the
    /// scheduler started. With `min_instances = 0` it has no instance once
    /// this is `scale_to_zero_after` ago.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_request_ms: u64,
    /// Why it is not served, when it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub observed_generation: u64,
    /// Its requests over the agents' last report interval, every instance
    /// together (none: no request in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
}

/// A Function's requests over one report interval of its nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// The interval, in ms.
    pub window_ms: u64,
    pub requests: u64,
    /// Of them, the ones answered 5xx.
    pub errors: u64,
    /// Time to the answer's head: the median and the 99th percentile, in
    /// µs (known to within a histogram bucket; [`crate::latency`]).
    pub p50_us: u64,
    pub p99_us: u64,
    /// The time its requests' instances lived, added up (ms): divided by
    /// `window_ms`, the mean number of requests in flight.
    #[serde(default)]
    pub busy_ms: u64,
}

impl Traffic {
    /// Requests per second over the interval.
    pub fn per_second(&self) -> f64 {
        if self.window_ms == 0 {
            return 0.0;
        }
        self.requests as f64 * 1000.0 / self.window_ms as f64
    }

    /// The mean number of requests in flight over the interval.
    pub fn concurrency(&self) -> f64 {
        if self.window_ms == 0 {
            return 0.0;
        }
        self.busy_ms as f64 / self.window_ms as f64
    }
}

/// A serverless HTTP function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub metadata: ObjectMeta,
    pub spec: FunctionSpec,
    #[serde(default)]
    pub status: FunctionStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FunctionSpec {
        let digest = format!("sha256:{}", "a".repeat(64));
        serde_json::from_value(serde_json::json!({"module": {"digest": digest, "size": 100}}))
            .unwrap()
    }

    #[test]
    fn instances_follow_concurrency_within_the_bounds() {
        let mut s = spec();
        s.serve.max_concurrency = 10;
        s.min_instances = 0;
        s.max_instances = 5;
        // 7 in flight is 70% of one instance: one is enough; 7.1 is not.
        assert_eq!(s.instances(true, 7.0), 1);
        assert_eq!(s.instances(true, 7.1), 2);
        assert_eq!(s.instances(true, 20.0), 3);
        assert_eq!(s.instances(true, 1e9), 5, "never past max_instances");
        assert_eq!(s.instances(true, f64::NAN), 1);
        // Idle and allowed to go to zero: none, whatever was measured last.
        assert_eq!(s.instances(false, 20.0), 0);
        s.min_instances = 2;
        assert_eq!(s.instances(false, 0.0), 2, "min_instances holds");
        assert_eq!(s.instances(true, 30.0), 5);
        let t = Traffic {
            window_ms: 2_000,
            requests: 40,
            busy_ms: 5_000,
            ..Default::default()
        };
        assert_eq!((t.per_second(), t.concurrency()), (20.0, 2.5));
    }

    #[test]
    fn defaults_and_checks() {
        let s = spec();
        assert_eq!(s.serve.timeout, DEFAULT_TIMEOUT);
        assert_eq!(s.serve.max_concurrency, DEFAULT_MAX_CONCURRENCY);
        assert_eq!((s.min_instances, s.max_instances, s.port), (0, 1, 8080));
        assert_eq!((s.instances(true, 0.0), s.instances(false, 0.0)), (1, 0));
        assert_eq!(s.scale_to_zero_after, DEFAULT_SCALE_TO_ZERO_AFTER);
        let mut bad = spec();
        bad.scale_to_zero_after = Millis(10);
        assert!(bad.validate().unwrap_err().contains("scale_to_zero_after"));
        s.validate().unwrap();

        let mut bad = spec();
        bad.min_instances = 3;
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("more than max_instances")
        );
        let mut bad = spec();
        bad.serve.max_concurrency = 0;
        assert!(bad.validate().unwrap_err().contains("max_concurrency"));
        let mut bad = spec();
        bad.serve.timeout = Millis(0);
        assert!(bad.validate().unwrap_err().contains("timeout"));
        let mut bad = spec();
        bad.source = MemberSource::container("busybox");
        assert!(bad.validate().unwrap_err().contains("not a container"));
        let mut bad = spec();
        bad.serve.allow_hosts = vec!["http://x/".into()];
        assert!(bad.validate().unwrap_err().contains("allow_hosts"));
        let mut bad = spec();
        bad.routes = vec![Route {
            host: String::new(),
            path: "api".into(),
            weight: 100,
        }];
        assert!(bad.validate().unwrap_err().contains("must start with '/'"));
    }

    #[test]
    fn routes_match_by_host_and_path_prefix_at_segment_boundaries() {
        let r = Route {
            host: "shop.example".into(),
            path: "/api/".into(),
            weight: 100,
        };
        assert!(r.matches("shop.example", "/api"));
        assert!(r.matches("SHOP.example", "/api/cart?x=1"));
        assert!(r.matches("shop.example", "/api?x=1"));
        assert!(!r.matches("shop.example", "/apis"));
        assert!(!r.matches("other.example", "/api"));
        let any = Route {
            host: String::new(),
            path: "/".into(),
            weight: 100,
        };
        assert!(any.matches("whatever", "/"));
        assert!(any.matches("whatever", "/deep/path"));
    }
}
