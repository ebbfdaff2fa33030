//! What nodes and members use, as their agents report it (`AgentMsg::Usage`,
//! every few seconds): kept in memory only, the last two samples per node,
//! from which rates are computed — CPU in millicores over the interval
//! between them, memory as last sampled. Serves `flotilla top`
//! (`GET /v1/metrics`), the scheduler's `/metrics` and the autoscaler.

use flotilla_api::proto::UsageReport;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

/// The last two samples of each node.
#[derive(Default)]
pub struct UsageBook {
    nodes: Mutex<HashMap<String, (Option<UsageReport>, UsageReport)>>,
}

/// A function pod's requests over its node's last report interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodTraffic {
    pub window_ms: u64,
    pub requests: u64,
    pub errors: u64,
    /// Per latency bucket ([`flotilla_api::latency`]).
    pub latency: Vec<u64>,
    /// The time its requests' instances lived, added up (µs).
    pub busy_us: u64,
}

impl PodTraffic {
    /// Adds another pod's figures (of the same function).
    pub fn add(&mut self, other: &PodTraffic) {
        self.window_ms = self.window_ms.max(other.window_ms);
        self.requests += other.requests;
        self.errors += other.errors;
        self.busy_us += other.busy_us;
        flotilla_api::latency::merge(&mut self.latency, &other.latency);
    }

    /// As a Function's status has it; `None` without requests.
    pub fn summary(&self) -> Option<flotilla_api::function::Traffic> {
        use flotilla_api::latency::quantile;
        (self.requests > 0).then(|| flotilla_api::function::Traffic {
            window_ms: self.window_ms,
            requests: self.requests,
            errors: self.errors,
            p50_us: quantile(&self.latency, 0.5).unwrap_or(0),
            p99_us: quantile(&self.latency, 0.99).unwrap_or(0),
            busy_ms: self.busy_us / 1000,
        })
    }
}

/// One member's use over the last interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberFigures {
    pub pod_uid: String,
    pub member: String,
    /// Millicores over the last interval (`None`: one sample so far, or
    /// the member restarted between the two).
    pub cpu_millis: Option<u64>,
    pub memory_bytes: u64,
    /// Its CPU time so far (current run), in seconds.
    pub cpu_seconds: f64,
}

/// One node's use over the last interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeFigures {
    pub node: String,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: u64,
    pub cpu_seconds: f64,
    /// When the last sample was taken (node clock, ms since the epoch).
    pub at_ms: u64,
    pub members: Vec<MemberFigures>,
}

/// CPU nanoseconds over milliseconds of wall time, in millicores.
fn millicores(cpu_ns: u64, wall_ms: u64) -> Option<u64> {
    (wall_ms > 0).then(|| cpu_ns / wall_ms / 1000)
}

impl UsageBook {
    /// Keeps `report` as the node's newest sample.
    pub fn record(&self, node: &str, report: UsageReport) {
        let mut nodes = self.nodes.lock().expect("poisoned");
        match nodes.remove(node) {
            // An older sample arriving late (a reconnect) is dropped.
            Some((prev, last)) if report.at_ms <= last.at_ms => {
                nodes.insert(node.to_string(), (prev, last));
            }
            Some((_, last)) => {
                nodes.insert(node.to_string(), (Some(last), report));
            }
            None => {
                nodes.insert(node.to_string(), (None, report));
            }
        }
    }

    /// Each function pod's request counters as last reported:
    /// `pod uid → (requests so far, in flight)`.
    pub fn requests(&self) -> HashMap<String, (u64, u64)> {
        let nodes = self.nodes.lock().expect("poisoned");
        let mut out: HashMap<String, (u64, u64)> = HashMap::new();
        for (_, last) in nodes.values() {
            for m in last
                .members
                .iter()
                .filter(|m| m.requests > 0 || m.in_flight > 0)
            {
                let e = out.entry(m.pod_uid.clone()).or_default();
                e.0 += m.requests;
                e.1 += m.in_flight;
            }
        }
        out
    }

    /// Each function pod's requests between its node's last two samples:
    /// `pod uid → traffic` (members that restarted in between, or that
    /// one sample does not have, are left out).
    pub fn traffic(&self) -> HashMap<String, PodTraffic> {
        let nodes = self.nodes.lock().expect("poisoned");
        let mut out: HashMap<String, PodTraffic> = HashMap::new();
        for (prev, last) in nodes.values() {
            let Some(prev) = prev else { continue };
            let window_ms = last.at_ms.saturating_sub(prev.at_ms);
            let before: HashMap<(&str, &str), &flotilla_api::proto::MemberUsage> = prev
                .members
                .iter()
                .map(|m| ((m.pod_uid.as_str(), m.member.as_str()), m))
                .collect();
            for m in last.members.iter().filter(|m| !m.latency.is_empty()) {
                let Some(b) = before.get(&(m.pod_uid.as_str(), m.member.as_str())) else {
                    continue;
                };
                let (Some(requests), Some(errors), Some(latency), Some(busy_us)) = (
                    m.requests.checked_sub(b.requests),
                    m.errors.checked_sub(b.errors),
                    flotilla_api::latency::delta(&m.latency, &b.latency),
                    m.busy_us.checked_sub(b.busy_us),
                ) else {
                    continue;
                };
                out.entry(m.pod_uid.clone()).or_default().add(&PodTraffic {
                    window_ms,
                    requests,
                    errors,
                    latency,
                    busy_us,
                });
            }
        }
        out
    }

    /// Forgets a node (deleted).
    pub fn forget(&self, node: &str) {
        self.nodes.lock().expect("poisoned").remove(node);
    }

    /// Every node's figures, by name.
    pub fn figures(&self) -> Vec<NodeFigures> {
        let nodes = self.nodes.lock().expect("poisoned");
        let mut out: Vec<NodeFigures> = nodes
            .iter()
            .map(|(name, (prev, last))| figures(name, prev.as_ref(), last))
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

fn figures(node: &str, prev: Option<&UsageReport>, last: &UsageReport) -> NodeFigures {
    let wall = prev
        .map(|p| last.at_ms.saturating_sub(p.at_ms))
        .unwrap_or(0);
    let earlier: HashMap<(&str, &str), u64> = prev
        .map(|p| {
            p.members
                .iter()
                .map(|m| ((m.pod_uid.as_str(), m.member.as_str()), m.cpu_ns))
                .collect()
        })
        .unwrap_or_default();
    NodeFigures {
        node: node.to_string(),
        cpu_millis: prev
            .filter(|p| last.node_cpu_ns >= p.node_cpu_ns)
            .and_then(|p| millicores(last.node_cpu_ns - p.node_cpu_ns, wall)),
        memory_bytes: last.node_memory_bytes,
        cpu_seconds: last.node_cpu_ns as f64 / 1e9,
        at_ms: last.at_ms,
        members: last
            .members
            .iter()
            .map(|m| MemberFigures {
                pod_uid: m.pod_uid.clone(),
                member: m.member.clone(),
                cpu_millis: earlier
                    .get(&(m.pod_uid.as_str(), m.member.as_str()))
                    .filter(|&&before| m.cpu_ns >= before)
                    .and_then(|before| millicores(m.cpu_ns - before, wall)),
                memory_bytes: m.memory_bytes,
                cpu_seconds: m.cpu_ns as f64 / 1e9,
            })
            .collect(),
    }
}

/// The scheduler's `/metrics`: the cluster's objects and what the agents
/// last reported, in the Prometheus text exposition format. The names are
/// listed in README.md ("Metrics").
pub fn prometheus(c: &crate::cluster::Cluster, pods: &[crate::api::PodTop]) -> String {
    use flotilla_api::Object;
    use flotilla_api::prometheus::{Exposition, MemberRow, Type};
    let mut e = Exposition::new();
    let objects = c.store.list("");
    let (mut ready, mut not_ready) = (0, 0);
    let mut phases: std::collections::BTreeMap<(String, String), u64> = Default::default();
    let mut deployments = Vec::new();
    let mut functions = Vec::new();
    for o in &objects {
        match &**o {
            Object::Function(f) => functions.push(f),
            Object::Node(n) if n.status.ready => ready += 1,
            Object::Node(_) => not_ready += 1,
            Object::Pod(p) => {
                *phases
                    .entry((p.metadata.namespace.clone(), p.status.phase.to_string()))
                    .or_default() += 1
            }
            Object::Deployment(d) => deployments.push(d),
            _ => {}
        }
    }
    e.family("flotilla_nodes", Type::Gauge, "Nodes by readiness.")
        .sample("flotilla_nodes", &[("ready", "true")], ready)
        .sample("flotilla_nodes", &[("ready", "false")], not_ready);
    e.family("flotilla_pods", Type::Gauge, "Pods by namespace and phase.");
    for ((ns, phase), n) in &phases {
        e.sample("flotilla_pods", &[("namespace", ns), ("phase", phase)], n);
    }
    type Figure = fn(&flotilla_api::Deployment) -> u64;
    let per_deployment: [(&str, &str, Figure); 4] = [
        (
            "flotilla_deployment_replicas",
            "Replicas a Deployment asks for.",
            |d| u64::from(d.spec.replicas),
        ),
        (
            "flotilla_deployment_ready_replicas",
            "Ready pods of a Deployment.",
            |d| u64::from(d.status.ready),
        ),
        (
            "flotilla_deployment_updated_replicas",
            "Pods of a Deployment's current revision.",
            |d| u64::from(d.status.updated),
        ),
        (
            "flotilla_deployment_revision",
            "A Deployment's current revision.",
            |d| d.status.revision,
        ),
    ];
    for (name, help, figure) in per_deployment {
        e.family(name, Type::Gauge, help);
        for d in &deployments {
            let labels = [
                ("namespace", d.metadata.namespace.as_str()),
                ("deployment", d.metadata.name.as_str()),
            ];
            e.sample(name, &labels, figure(d));
        }
    }
    functions_exposed(&mut e, &functions);
    let nodes = c.usage.figures();
    e.family(
        "flotilla_node_cpu_seconds_total",
        Type::Counter,
        "Busy CPU time of a node's machine since boot, as its agent last reported.",
    );
    for n in &nodes {
        let v = format!("{:.3}", n.cpu_seconds);
        e.sample("flotilla_node_cpu_seconds_total", &[("node", &n.node)], v);
    }
    e.family(
        "flotilla_node_memory_bytes",
        Type::Gauge,
        "Memory in use on a node's machine.",
    );
    for n in &nodes {
        e.sample(
            "flotilla_node_memory_bytes",
            &[("node", &n.node)],
            n.memory_bytes,
        );
    }
    let rows: Vec<MemberRow<'_>> = pods
        .iter()
        .flat_map(|p| {
            p.members.iter().map(move |m| MemberRow {
                namespace: &p.namespace,
                pod: &p.name,
                member: &m.name,
                node: &p.node,
                cpu_seconds: m.cpu_seconds,
                memory_bytes: m.memory_bytes,
            })
        })
        .collect();
    e.members(&rows);
    e.family(
        "flotilla_store_revision",
        Type::Gauge,
        "The store's revision (one per write).",
    )
    .sample("flotilla_store_revision", &[], c.store.revision());
    e.finish()
}

/// Each Function's instances and, over the agents' last report interval,
/// its requests per second, errors per second, mean requests in flight and
/// latency quantiles (as its status has them).
fn functions_exposed(
    e: &mut flotilla_api::prometheus::Exposition,
    functions: &[&flotilla_api::function::Function],
) {
    use flotilla_api::function::{Function, Traffic};
    use flotilla_api::prometheus::Type;
    type Figure = fn(&Function) -> f64;
    /// A figure of its traffic; 0 without a request in the interval.
    fn of(f: &Function, g: fn(&Traffic) -> f64) -> f64 {
        f.status.traffic.as_ref().map_or(0.0, g)
    }
    let figures: [(&str, &str, Figure); 5] = [
        (
            "flotilla_function_instances",
            "Pods hosting a Function.",
            |f| f64::from(f.status.instances),
        ),
        (
            "flotilla_function_ready_instances",
            "Ready pods hosting a Function.",
            |f| f64::from(f.status.ready),
        ),
        (
            "flotilla_function_requests_per_second",
            "A Function's requests per second over its nodes' last report interval.",
            |f| of(f, Traffic::per_second),
        ),
        (
            "flotilla_function_errors_per_second",
            "Of those, the ones answered 5xx, per second.",
            |f| {
                of(f, |t| {
                    t.per_second() * t.errors as f64 / t.requests.max(1) as f64
                })
            },
        ),
        (
            "flotilla_function_concurrency",
            "A Function's mean requests in flight over that interval (what it autoscales on).",
            |f| of(f, Traffic::concurrency),
        ),
    ];
    for (name, help, figure) in figures {
        e.family(name, Type::Gauge, help);
        for f in functions {
            let labels = [
                ("namespace", f.metadata.namespace.as_str()),
                ("function", f.metadata.name.as_str()),
            ];
            e.sample(name, &labels, format!("{:.3}", figure(f)));
        }
    }
    let name = "flotilla_function_latency_seconds";
    e.family(
        name,
        Type::Gauge,
        "Time to the answer's head over that interval: p50 and p99 (within a histogram bucket).",
    );
    for f in functions {
        let Some(t) = &f.status.traffic else { continue };
        for (q, us) in [("0.5", t.p50_us), ("0.99", t.p99_us)] {
            let labels = [
                ("namespace", f.metadata.namespace.as_str()),
                ("function", f.metadata.name.as_str()),
                ("quantile", q),
            ];
            e.sample(name, &labels, format!("{:.6}", us as f64 / 1e6));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::proto::MemberUsage;

    fn report(at_ms: u64, node_cpu_ns: u64, members: &[(&str, u64, u64)]) -> UsageReport {
        UsageReport {
            at_ms,
            node_cpu_ns,
            node_memory_bytes: 1 << 30,
            members: members
                .iter()
                .map(|&(uid, cpu_ns, memory_bytes)| MemberUsage {
                    pod_uid: uid.into(),
                    member: "app".into(),
                    cpu_ns,
                    memory_bytes,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn served(uid: &str, requests: u64, errors: u64, latency: &[(usize, u64)]) -> MemberUsage {
        let busy_us = requests * 3_000;
        let mut l = vec![0; flotilla_api::latency::BUCKETS];
        for &(i, n) in latency {
            l[i] = n;
        }
        MemberUsage {
            pod_uid: uid.into(),
            member: "fn".into(),
            requests,
            errors,
            latency: l,
            busy_us,
            ..Default::default()
        }
    }

    #[test]
    fn a_functions_traffic_is_what_its_pods_counted_between_two_samples() {
        let book = UsageBook::default();
        let sample = |at_ms, members: Vec<MemberUsage>| UsageReport {
            at_ms,
            members,
            ..Default::default()
        };
        book.record("n1", sample(10_000, vec![served("a", 100, 1, &[(0, 100)])]));
        assert!(book.traffic().is_empty(), "one sample: nothing between");
        // 15 s later: a took 1000 more (2 of them errors), 990 fast, 10
        // slow; b restarted (its counters fell) and c is new: left out.
        book.record(
            "n1",
            sample(
                25_000,
                vec![
                    served("a", 1_100, 3, &[(0, 1_090), (10, 10)]),
                    served("c", 5, 0, &[(0, 5)]),
                ],
            ),
        );
        book.record("n2", sample(1_000, vec![served("b", 50, 0, &[(0, 50)])]));
        book.record("n2", sample(16_000, vec![served("b", 3, 0, &[(0, 3)])]));
        let t = book.traffic();
        assert_eq!(t.len(), 1, "{t:?}");
        let a = &t["a"];
        assert_eq!((a.window_ms, a.requests, a.errors), (15_000, 1_000, 2));
        let s = a.summary().unwrap();
        // The median lies halfway into the first bucket (≤250µs): 500/990 of it.
        assert_eq!((s.p50_us, s.p99_us), (126, 250));
        assert_eq!(s.per_second(), 1_000.0 / 15.0);
        // 1000 requests of 3 ms each in 15 s: 0.2 in flight on average.
        assert_eq!((s.busy_ms, s.concurrency()), (3_000, 0.2));
        // Two pods of one function add up.
        let mut both = a.clone();
        both.add(a);
        assert_eq!(both.summary().unwrap().requests, 2_000);
        assert_eq!(PodTraffic::default().summary(), None);
    }

    #[test]
    fn functions_are_exposed_with_their_traffic() {
        let mut f = flotilla_api::function::Function {
            metadata: flotilla_api::ObjectMeta {
                name: "hello".into(),
                namespace: "default".into(),
                ..Default::default()
            },
            spec: serde_json::from_value(serde_json::json!({
                "module": {"digest": format!("sha256:{}", "a".repeat(64)), "size": 1}
            }))
            .unwrap(),
            status: Default::default(),
        };
        f.status.instances = 2;
        f.status.traffic = Some(flotilla_api::function::Traffic {
            window_ms: 10_000,
            requests: 1_000,
            errors: 10,
            p50_us: 1_500,
            p99_us: 25_000,
            busy_ms: 30_000,
        });
        let idle = flotilla_api::function::Function {
            metadata: flotilla_api::ObjectMeta {
                name: "idle".into(),
                ..f.metadata.clone()
            },
            status: Default::default(),
            ..f.clone()
        };
        let mut e = flotilla_api::prometheus::Exposition::new();
        functions_exposed(&mut e, &[&f, &idle]);
        let text = e.finish();
        for line in [
            r#"flotilla_function_instances{namespace="default",function="hello"} 2.000"#,
            r#"flotilla_function_requests_per_second{namespace="default",function="hello"} 100.000"#,
            r#"flotilla_function_errors_per_second{namespace="default",function="hello"} 1.000"#,
            r#"flotilla_function_concurrency{namespace="default",function="hello"} 3.000"#,
            r#"flotilla_function_latency_seconds{namespace="default",function="hello",quantile="0.99"} 0.025000"#,
            r#"flotilla_function_requests_per_second{namespace="default",function="idle"} 0.000"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains(r#"function="idle",quantile"#), "{text}");
    }

    #[test]
    fn rates_come_from_two_samples_and_restarts_and_late_samples_give_none() {
        let book = UsageBook::default();
        book.record(
            "n1",
            report(10_000, 5_000_000_000, &[("a", 1_000_000_000, 64 << 20)]),
        );
        let f = book.figures();
        assert_eq!(f[0].cpu_millis, None, "one sample: no rate yet");
        assert_eq!(f[0].members[0].cpu_millis, None);
        assert_eq!(f[0].members[0].memory_bytes, 64 << 20);
        // 2 s later: the node used 1.5 s of CPU (750m), member a 1 s (500m);
        // b is new, c's counter went back (a new run).
        book.record(
            "n1",
            report(
                12_000,
                6_500_000_000,
                &[("a", 2_000_000_000, 65 << 20), ("b", 10, 1)],
            ),
        );
        let f = book.figures();
        assert_eq!(f[0].cpu_millis, Some(750));
        assert_eq!(f[0].members[0].cpu_millis, Some(500));
        assert_eq!(f[0].members[0].memory_bytes, 65 << 20);
        assert_eq!(f[0].members[1].cpu_millis, None);
        book.record("n1", report(14_000, 7_000_000_000, &[("a", 100, 1)]));
        assert_eq!(book.figures()[0].members[0].cpu_millis, None, "restarted");
        // A sample older than the newest is ignored.
        book.record("n1", report(13_000, 1, &[]));
        assert_eq!(book.figures()[0].at_ms, 14_000);
        book.forget("n1");
        assert!(book.figures().is_empty());
    }
}
