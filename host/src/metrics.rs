//! What each running member uses, measured on the node: CPU time and memory.
//!
//! - wasm members: the CPU time of the thread while the member's future is
//!   polled (its wasm and the host calls it makes inline; see
//!   [`Metered`]), and the size of its linear memories (the store's
//!   limiter keeps it);
//! - containers: their cgroup's counters (cgroup v2 `cpu.stat` /
//!   `memory.current`, or v1 `cpuacct.usage` / `memory.usage_in_bytes`),
//!   less inactive file cache (the working set, as kubelet counts it).
//!
//! Runs register a [`Meter`] with the node's [`Meters`] while they run;
//! the link samples them at a low rate and sends them to the scheduler,
//! and the node's metrics port serves them in the Prometheus text format.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// A wasm run's counters, shared with the run.
#[derive(Debug, Default)]
pub struct Usage {
    pub cpu_ns: AtomicU64,
    pub memory_bytes: AtomicU64,
    /// A function's requests so far and those being answered now.
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    /// A function's requests answered 5xx so far.
    pub errors: AtomicU64,
    /// The time its requests' instances lived, added up, in µs: over an
    /// interval, divided by it, the mean number of requests in flight.
    pub busy_us: AtomicU64,
    /// A function's requests by time to the answer's head.
    pub latency: flotilla_api::latency::Histogram,
    /// Set when the run serves HTTP (a function): its request figures are
    /// reported even while they are zero.
    pub serves_http: std::sync::atomic::AtomicBool,
}

/// How a run is measured.
#[derive(Clone, Debug)]
pub enum Meter {
    Wasm(Arc<Usage>),
    /// The container's cgroup, relative to the hierarchy root
    /// (`flotilla/<id>`).
    Cgroup(String),
}

/// One member's figures at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    pub pod_uid: String,
    pub member: String,
    /// Total CPU time of the current run, in nanoseconds.
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    /// A function's requests so far and in flight (0 for other members).
    pub requests: u64,
    pub in_flight: u64,
    /// A function's figures: its requests answered 5xx, and all its
    /// requests per latency bucket with their total time (empty and 0 for
    /// other members).
    pub errors: u64,
    pub latency: Vec<u64>,
    pub latency_sum_us: u64,
    pub busy_us: u64,
}

/// Where cgroup counters are read: `/sys/fs/cgroup`, v2 or v1 (a test
/// passes a directory of its own).
#[derive(Clone, Debug)]
pub struct Cgroups {
    root: PathBuf,
    v2: bool,
}

impl Cgroups {
    pub fn system() -> Cgroups {
        Cgroups::at(Path::new("/sys/fs/cgroup"))
    }

    pub fn at(root: &Path) -> Cgroups {
        Cgroups {
            root: root.to_path_buf(),
            v2: root.join("cgroup.controllers").exists(),
        }
    }

    fn read(&self, path: PathBuf) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    /// `key value` lines of a stat file.
    fn stat(text: &str, key: &str) -> Option<u64> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// CPU time in nanoseconds and working-set memory in bytes of `group`.
    pub fn usage(&self, group: &str) -> Option<(u64, u64)> {
        if self.v2 {
            let dir = self.root.join(group);
            let cpu = Self::stat(&self.read(dir.join("cpu.stat"))?, "usage_usec")? * 1000;
            let mem: u64 = self.read(dir.join("memory.current"))?.trim().parse().ok()?;
            let inactive = self
                .read(dir.join("memory.stat"))
                .and_then(|s| Self::stat(&s, "inactive_file"))
                .unwrap_or(0);
            Some((cpu, mem.saturating_sub(inactive)))
        } else {
            let cpu: u64 = self
                .read(self.root.join("cpuacct").join(group).join("cpuacct.usage"))?
                .trim()
                .parse()
                .ok()?;
            let dir = self.root.join("memory").join(group);
            let mem: u64 = self
                .read(dir.join("memory.usage_in_bytes"))?
                .trim()
                .parse()
                .ok()?;
            let inactive = self
                .read(dir.join("memory.stat"))
                .and_then(|s| Self::stat(&s, "total_inactive_file"))
                .unwrap_or(0);
            Some((cpu, mem.saturating_sub(inactive)))
        }
    }
}

/// The meters of every member running on the node.
pub struct Meters {
    cgroups: Cgroups,
    running: Mutex<HashMap<(String, String), Meter>>,
}

/// Keeps a run's meter registered; dropping it removes the meter.
pub struct Registered {
    meters: Arc<Meters>,
    key: (String, String),
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.meters
            .running
            .lock()
            .expect("poisoned")
            .remove(&self.key);
    }
}

impl Meters {
    pub fn new(cgroups: Cgroups) -> Arc<Meters> {
        Arc::new(Meters {
            cgroups,
            running: Mutex::default(),
        })
    }

    /// Measures `member` of pod `pod_uid` with `meter` until the guard drops.
    pub fn register(self: &Arc<Self>, pod_uid: &str, member: &str, meter: Meter) -> Registered {
        let key = (pod_uid.to_string(), member.to_string());
        self.running
            .lock()
            .expect("poisoned")
            .insert(key.clone(), meter);
        Registered {
            meters: self.clone(),
            key,
        }
    }

    /// Every running member's figures now (a container whose cgroup cannot
    /// be read is left out).
    pub fn read(&self) -> Vec<Reading> {
        let running: Vec<((String, String), Meter)> = self
            .running
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        let mut out: Vec<Reading> = running
            .into_iter()
            .filter_map(|((pod_uid, member), meter)| {
                Some(match meter {
                    Meter::Wasm(u) => {
                        let http = u.serves_http.load(Ordering::Relaxed);
                        Reading {
                            pod_uid,
                            member,
                            cpu_ns: u.cpu_ns.load(Ordering::Relaxed),
                            memory_bytes: u.memory_bytes.load(Ordering::Relaxed),
                            requests: u.requests.load(Ordering::Relaxed),
                            in_flight: u.in_flight.load(Ordering::Relaxed),
                            errors: u.errors.load(Ordering::Relaxed),
                            latency: if http { u.latency.counts() } else { Vec::new() },
                            latency_sum_us: u.latency.sum_us(),
                            busy_us: u.busy_us.load(Ordering::Relaxed),
                        }
                    }
                    Meter::Cgroup(group) => {
                        let (cpu_ns, memory_bytes) = self.cgroups.usage(&group)?;
                        Reading {
                            pod_uid,
                            member,
                            cpu_ns,
                            memory_bytes,
                            requests: 0,
                            in_flight: 0,
                            errors: 0,
                            latency: Vec::new(),
                            latency_sum_us: 0,
                            busy_us: 0,
                        }
                    }
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.pod_uid, &a.member).cmp(&(&b.pod_uid, &b.member)));
        out
    }
}

/// Busy CPU time of the machine in nanoseconds, from `/proc/stat`'s first
/// line (everything but idle and iowait).
pub fn busy_cpu_ns(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy: u64 = f.iter().take(8).sum::<u64>() - f[3] - f.get(4).copied().unwrap_or(0);
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(busy * 1_000_000_000 / hz)
}

/// Memory in use in bytes (`MemTotal - MemAvailable`) from `/proc/meminfo`.
pub fn used_memory(meminfo: &str) -> Option<u64> {
    let kib = |key: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.trim();
            rest.trim_end_matches("kB").trim().parse::<u64>().ok()
        })
    };
    Some(kib("MemTotal:")?.saturating_sub(kib("MemAvailable:")?) * 1024)
}

/// A sample of the machine and every running member, for the scheduler.
pub fn sample(meters: &Meters) -> flotilla_api::proto::UsageReport {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    flotilla_api::proto::UsageReport {
        at_ms: flotilla_api::time::now_ms(),
        node_cpu_ns: busy_cpu_ns(&read("/proc/stat")).unwrap_or(0),
        node_memory_bytes: used_memory(&read("/proc/meminfo")).unwrap_or(0),
        members: meters
            .read()
            .into_iter()
            .map(|r| flotilla_api::proto::MemberUsage {
                pod_uid: r.pod_uid,
                member: r.member,
                cpu_ns: r.cpu_ns,
                memory_bytes: r.memory_bytes,
                requests: r.requests,
                in_flight: r.in_flight,
                errors: r.errors,
                latency: r.latency,
                busy_us: r.busy_us,
            })
            .collect(),
    }
}

/// Names the pods of the node: `uid → (namespace, name)`.
pub type PodNames = Arc<dyn Fn() -> HashMap<String, (String, String)> + Send + Sync>;

/// Serves `GET /metrics` (the Prometheus text format) on `listener`; any
/// other request gets 404. A request head over 8 KiB, or slower than 5 s,
/// is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    meters: Arc<Meters>,
    node: String,
    names: PodNames,
    routes: Option<RouteFigures>,
) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (meters, node, names, routes) =
            (meters.clone(), node.clone(), names.clone(), routes.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                answer(conn, &meters, &node, &names, routes.as_ref()),
            )
            .await;
        });
    }
}

/// The gateway's figures per route (none: the node runs no gateway).
pub type RouteFigures = Arc<dyn Fn() -> Vec<crate::net::gateway::RouteReading> + Send + Sync>;

async fn answer(
    mut conn: tokio::net::TcpStream,
    meters: &Meters,
    node: &str,
    names: &PodNames,
    routes: Option<&RouteFigures>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) =
        if line.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
            let pods = names();
            let members = meters
                .read()
                .into_iter()
                .map(|r| {
                    let (ns, pod) = pods
                        .get(&r.pod_uid)
                        .cloned()
                        .unwrap_or_else(|| (String::new(), r.pod_uid.clone()));
                    (ns, pod, r)
                })
                .collect();
            let routes = routes.map(|r| r()).unwrap_or_default();
            (
                "200 OK",
                prometheus(&Exposed {
                    node,
                    members,
                    routes,
                }),
            )
        } else {
            (
                "404 Not Found",
                "only GET /metrics is served here\n".to_string(),
            )
        };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await
}

/// CPU time the calling thread has used, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A future whose polls are charged to `usage`: the thread's CPU time
/// across each poll (a wasm guest runs only inside its future's polls).
pub struct Metered<F> {
    inner: Pin<Box<F>>,
    usage: Arc<Usage>,
}

impl<F> Metered<F> {
    pub fn new(inner: F, usage: Arc<Usage>) -> Metered<F> {
        Metered {
            inner: Box::pin(inner),
            usage,
        }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let at = thread_cpu_ns();
        let r = self.inner.as_mut().poll(cx);
        let spent = thread_cpu_ns().saturating_sub(at);
        self.usage.cpu_ns.fetch_add(spent, Ordering::Relaxed);
        r
    }
}

/// A node's figures for the Prometheus text format: each member's
/// counters, with its pod's namespace and name.
pub struct Exposed<'a> {
    pub node: &'a str,
    /// `(namespace, pod name, reading)`.
    pub members: Vec<(String, String, Reading)>,
    /// The gateway's routes.
    pub routes: Vec<crate::net::gateway::RouteReading>,
}

/// The node's metrics in the Prometheus text exposition format.
pub fn prometheus<'a>(e: &'a Exposed<'a>) -> String {
    use flotilla_api::prometheus::{Exposition, MemberRow, Type};
    let mut out = Exposition::new();
    let rows: Vec<MemberRow<'_>> = e
        .members
        .iter()
        .map(|(ns, pod, r)| MemberRow {
            namespace: ns,
            pod,
            member: &r.member,
            node: e.node,
            cpu_seconds: r.cpu_ns as f64 / 1e9,
            memory_bytes: r.memory_bytes,
        })
        .collect();
    out.members(&rows);
    let functions: Vec<(&str, &str, &Reading)> = e
        .members
        .iter()
        .filter(|(_, _, r)| !r.latency.is_empty())
        .map(|(ns, pod, r)| (ns.as_str(), pod.as_str(), r))
        .collect();
    if !functions.is_empty() {
        let labels = |(ns, pod, r): &(&'a str, &'a str, &'a Reading)| {
            [
                ("namespace", *ns),
                ("pod", *pod),
                ("member", r.member.as_str()),
                ("node", e.node),
            ]
        };
        /// A family: its name, type, help and the figure it takes.
        type Family = (&'static str, Type, &'static str, fn(&Reading) -> u64);
        let counters: [Family; 3] = [
            (
                "flotilla_function_requests_total",
                Type::Counter,
                "Requests a function instance took (its current run).",
                |r| r.requests,
            ),
            (
                "flotilla_function_errors_total",
                Type::Counter,
                "Of those, the ones answered 5xx (a trap, memory, timeout, overload, or the function's own).",
                |r| r.errors,
            ),
            (
                "flotilla_function_in_flight",
                Type::Gauge,
                "Requests a function instance is serving now.",
                |r| r.in_flight,
            ),
        ];
        for (name, ty, help, value) in counters {
            out.family(name, ty, help);
            for f in &functions {
                out.sample(name, &labels(f), value(f.2));
            }
        }
        let name = "flotilla_function_request_duration_seconds";
        out.family(
            name,
            Type::Histogram,
            "Time from a request's arrival to its answer's head.",
        );
        for f in &functions {
            out.histogram(name, &labels(f), &f.2.latency, f.2.latency_sum_us);
        }
    }
    if !e.routes.is_empty() {
        let labels = |r: &'a crate::net::gateway::RouteReading| {
            [
                ("namespace", r.namespace.as_str()),
                ("service", r.service.as_str()),
                ("host", r.host.as_str()),
                ("path", r.path.as_str()),
                ("node", e.node),
            ]
        };
        let name = "flotilla_gateway_requests_total";
        out.family(
            name,
            Type::Counter,
            "Requests the node's gateway answered per route, by status class.",
        );
        for r in &e.routes {
            for (i, n) in r.answers.iter().enumerate() {
                let code = format!("{}xx", i + 1);
                let mut l = labels(r).to_vec();
                l.push(("code", &code));
                out.sample(name, &l, n);
            }
        }
        let name = "flotilla_gateway_request_duration_seconds";
        out.family(
            name,
            Type::Histogram,
            "Time from a request's arrival at the gateway to its answer's head, per route.",
        );
        for r in &e.routes {
            out.histogram(name, &labels(r), &r.latency, r.latency_sum_us);
        }
    }
    out.family(
        "flotilla_node_members",
        Type::Gauge,
        "Members running on the node.",
    )
    .sample(
        "flotilla_node_members",
        &[("node", e.node)],
        e.members.len(),
    );
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v1_and_v2_counters_give_cpu_and_the_working_set() {
        let v1 = tempfile::tempdir().unwrap();
        let g = "flotilla/pod-box";
        std::fs::create_dir_all(v1.path().join("cpuacct").join(g)).unwrap();
        std::fs::create_dir_all(v1.path().join("memory").join(g)).unwrap();
        std::fs::write(
            v1.path().join("cpuacct").join(g).join("cpuacct.usage"),
            "2500000000\n",
        )
        .unwrap();
        std::fs::write(
            v1.path()
                .join("memory")
                .join(g)
                .join("memory.usage_in_bytes"),
            "10485760\n",
        )
        .unwrap();
        std::fs::write(
            v1.path().join("memory").join(g).join("memory.stat"),
            "cache 100\ntotal_inactive_file 1048576\n",
        )
        .unwrap();
        let c = Cgroups::at(v1.path());
        assert_eq!(c.usage(g), Some((2_500_000_000, 9 * 1048576)));
        assert_eq!(c.usage("flotilla/gone"), None);

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::create_dir_all(v2.path().join(g)).unwrap();
        std::fs::write(
            v2.path().join(g).join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\n",
        )
        .unwrap();
        std::fs::write(v2.path().join(g).join("memory.current"), "4096\n").unwrap();
        assert_eq!(Cgroups::at(v2.path()).usage(g), Some((1_500_000, 4096)));
    }

    #[test]
    fn meters_read_while_registered_and_polls_are_charged() {
        let dir = tempfile::tempdir().unwrap();
        let meters = Meters::new(Cgroups::at(dir.path()));
        let usage = Arc::new(Usage::default());
        usage.memory_bytes.store(65536, Ordering::Relaxed);
        let guard = meters.register("u1", "app", Meter::Wasm(usage.clone()));
        // A container whose cgroup is not there is left out.
        let _c = meters.register("u2", "box", Meter::Cgroup("flotilla/none".into()));
        // A future that burns 20 ms of its thread's CPU time in one poll
        // (however busy the machine is).
        let spin = Metered::new(
            async {
                let t = thread_cpu_ns();
                let mut x = 1u64;
                while thread_cpu_ns() - t < 20_000_000 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                x
            },
            usage.clone(),
        );
        futures_lite(spin);
        let got = meters.read();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].pod_uid.as_str(), got[0].member.as_str()),
            ("u1", "app")
        );
        assert!(got[0].cpu_ns >= 20_000_000, "{got:?}");
        assert_eq!(got[0].memory_bytes, 65536);
        drop(guard);
        assert!(meters.read().is_empty());
        let text = prometheus(&Exposed {
            node: "n1",
            members: vec![("default".into(), "web-\"x\"".into(), got[0].clone())],
            routes: Vec::new(),
        });
        assert!(
            text.contains("flotilla_member_memory_bytes{namespace=\"default\",pod=\"web-\\\"x\\\"\",member=\"app\",node=\"n1\"} 65536"),
            "{text}"
        );
        assert!(text.contains("# TYPE flotilla_member_cpu_seconds_total counter"));
    }

    #[test]
    fn function_and_gateway_route_figures_are_exposed_as_counters_and_histograms() {
        let mut latency = vec![0; flotilla_api::latency::BUCKETS];
        latency[0] = 1;
        latency[2] = 1;
        latency[flotilla_api::latency::BUCKETS - 1] = 1;
        let r = Reading {
            pod_uid: "u".into(),
            member: "fn".into(),
            cpu_ns: 0,
            memory_bytes: 0,
            requests: 3,
            in_flight: 1,
            errors: 1,
            latency,
            latency_sum_us: 40_000_900,
            busy_us: 0,
        };
        let plain = Reading {
            member: "other".into(),
            latency: Vec::new(),
            ..r.clone()
        };
        let text = prometheus(&Exposed {
            node: "n1",
            members: vec![
                ("default".into(), "fn-1".into(), r),
                ("default".into(), "job".into(), plain),
            ],
            routes: vec![crate::net::gateway::RouteReading {
                namespace: "default".into(),
                service: "hello".into(),
                host: "hello.example".into(),
                path: "/api".into(),
                answers: [0, 7, 0, 1, 2],
                latency: {
                    let mut l = vec![0; flotilla_api::latency::BUCKETS];
                    l[3] = 10;
                    l
                },
                latency_sum_us: 20_000,
            }],
        });
        let l = r#"namespace="default",pod="fn-1",member="fn",node="n1""#;
        let g = r#"namespace="default",service="hello",host="hello.example",path="/api",node="n1""#;
        for line in [
            "# TYPE flotilla_function_request_duration_seconds histogram".to_string(),
            format!("flotilla_function_requests_total{{{l}}} 3"),
            format!("flotilla_function_errors_total{{{l}}} 1"),
            format!("flotilla_function_in_flight{{{l}}} 1"),
            format!("flotilla_function_request_duration_seconds_bucket{{{l},le=\"0.00025\"}} 1"),
            format!("flotilla_function_request_duration_seconds_bucket{{{l},le=\"0.0005\"}} 1"),
            format!("flotilla_function_request_duration_seconds_bucket{{{l},le=\"0.001\"}} 2"),
            format!("flotilla_function_request_duration_seconds_bucket{{{l},le=\"30\"}} 2"),
            format!("flotilla_function_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("flotilla_function_request_duration_seconds_sum{{{l}}} 40.000900"),
            format!("flotilla_function_request_duration_seconds_count{{{l}}} 3"),
            format!("flotilla_gateway_requests_total{{{g},code=\"2xx\"}} 7"),
            format!("flotilla_gateway_requests_total{{{g},code=\"5xx\"}} 2"),
            format!("flotilla_gateway_request_duration_seconds_bucket{{{g},le=\"0.001\"}} 0"),
            format!("flotilla_gateway_request_duration_seconds_bucket{{{g},le=\"0.0025\"}} 10"),
            format!("flotilla_gateway_request_duration_seconds_count{{{g}}} 10"),
        ] {
            assert!(text.lines().any(|t| t == line), "{line} not in\n{text}");
        }
        // A member that serves no HTTP has no function figures.
        assert!(
            !text
                .lines()
                .any(|t| t.starts_with("flotilla_function") && t.contains("member=\"other\"")),
            "{text}"
        );
    }

    #[test]
    fn the_machine_figures_come_from_proc() {
        // SAFETY: sysconf with a constant name.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        // 100 user + 20 system + 5 irq busy; 1000 idle and 50 iowait not.
        let stat = "cpu  100 0 20 1000 50 5 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(busy_cpu_ns(stat), Some(125 * 1_000_000_000 / hz));
        assert_eq!(busy_cpu_ns("intr 1 2"), None);
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(used_memory(meminfo), Some(4_000_000 * 1024));
        assert_eq!(used_memory("MemTotal: 1 kB\n"), None);
    }

    /// Polls a future that never waits to its end.
    fn futures_lite<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }
}
