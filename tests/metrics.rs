//! Issue 16 item 3: what members use, measured by the agent and reported to
//! the scheduler — `flotilla top` against what the kernel says (a
//! container's cgroup; for a wasm spinner held to 800m, the CPU time
//! of the `up` process it runs in; for a wasm member holding 64 MiB, that size) — and
//! the Prometheus text on the scheduler's API (a view credential) and on
//! the agent's metrics port.

mod common;

use common::registry::registry_with_busybox;
use common::{Up, wait_until};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);

fn apply(up: &Up, name: &str, text: &str) {
    let f = up.manifest(&format!("{name}.toml"), text);
    up.ok(&["apply", "-f", &f]);
}

fn top_pods(up: &Up) -> Vec<serde_json::Value> {
    serde_json::from_str(&up.ok(&["top", "pods", "-o", "json"])).unwrap()
}

/// `(cpu millicores, memory bytes, cpu ns so far)` of `pod`'s first
/// member in a `top pods` answer, once it has a rate.
fn top_of(top: &[serde_json::Value], pod: &str) -> Option<(u64, u64, u64)> {
    top.iter().find_map(|p| {
        let m = &p["members"][0];
        (p["name"] == pod).then(|| {
            Some((
                m["cpu_millis"].as_u64()?,
                m["memory_bytes"].as_u64()?,
                (m["cpu_seconds"].as_f64()? * 1e9) as u64,
            ))
        })?
    })
}

/// Rates over one measuring window, in millicores.
#[derive(Debug)]
struct Window {
    /// Mean of `top`'s rates for the container and the spinner.
    box_top: f64,
    spin_top: f64,
    /// The container's cgroup and the `up` process, by the kernel.
    box_kernel: f64,
    process: f64,
}

/// Polls `top pods` once a second until five new samples came in; the
/// kernel's counters are read at both ends.
fn window(up: &Up, pid: u32, id: &str, spin: Option<&str>) -> Window {
    let (k0, p0, t0) = (cgroup(id).0, process_cpu_ns(pid), Instant::now());
    let (mut boxes, mut spins) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    wait_until(LONG, "five new samples", || {
        std::thread::sleep(Duration::from_secs(1));
        let top = top_pods(up);
        if let Some(b) = top_of(&top, "box")
            && seen.insert(b.2)
        {
            boxes.push(b.0 as f64);
            spins.push(
                spin.and_then(|s| top_of(&top, s))
                    .map_or(0.0, |s| s.0 as f64),
            );
        }
        boxes.len() >= 5
    });
    let wall = t0.elapsed().as_nanos() as f64;
    let (k1, p1) = (cgroup(id).0, process_cpu_ns(pid));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Window {
        box_top: mean(&boxes),
        spin_top: mean(&spins),
        box_kernel: (k1 - k0) as f64 / wall * 1000.0,
        process: (p1 - p0) as f64 / wall * 1000.0,
    }
}

/// CPU time in nanoseconds of a process (user + system), from /proc.
fn process_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * 1_000_000_000 / hz
}

/// CPU nanoseconds and working-set bytes of a container's cgroup, read
/// from the kernel's files (v2 or v1).
fn cgroup(id: &str) -> (u64, u64) {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let stat = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    if root.join("cgroup.controllers").exists() {
        let d = root.join("flotilla").join(id);
        let cpu = stat(&read(d.join("cpu.stat")), "usage_usec") * 1000;
        let mem: u64 = read(d.join("memory.current")).trim().parse().unwrap();
        (
            cpu,
            mem - stat(&read(d.join("memory.stat")), "inactive_file"),
        )
    } else {
        let cpu: u64 = read(root.join("cpuacct/flotilla").join(id).join("cpuacct.usage"))
            .trim()
            .parse()
            .unwrap();
        let d = root.join("memory/flotilla").join(id);
        let mem: u64 = read(d.join("memory.usage_in_bytes"))
            .trim()
            .parse()
            .unwrap();
        (
            cpu,
            mem - stat(&read(d.join("memory.stat")), "total_inactive_file"),
        )
    }
}

fn within(what: &str, got: f64, want: f64, share: f64) {
    assert!(
        (got - want).abs() <= want * share,
        "{what}: top says {got:.1}, the reference {want:.1} (more than {}% apart)",
        share * 100.0
    );
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn top_agrees_with_the_kernel_and_metrics_are_served() {
    let (reg, image) = registry_with_busybox();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let up = Up::start_with(&[
        "--insecure-http",
        "--registry-config",
        &reg.config_file(),
        "--metrics-interval",
        "1s",
        "--metrics-addr",
        &addr,
    ]);
    apply(
        &up,
        "hold",
        &format!(
            "kind = \"Pod\"\nname = \"hold\"\n[[members]]\nname = \"hog\"\nwasm = \"{}\"\nargs = [\"64\"]\n",
            flotilla_samples::MEMHOG_P1
        ),
    );
    apply(
        &up,
        "box",
        &format!(
            "kind = \"Pod\"\nname = \"box\"\n[[members]]\nname = \"loop\"\nimage = \"{image}\"\nargs = [\"sh\", \"-c\", \"while :; do :; done\"]\nresources = {{ cpu = 500 }}\n"
        ),
    );
    let figures = |pods: &[&str]| {
        wait_until(LONG, &format!("figures for {pods:?}"), || {
            let top = top_pods(&up);
            pods.iter().all(|p| top_of(&top, p).is_some())
        })
    };
    figures(&["hold", "box"]);
    let uid = up.pod("box").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let id = format!("{uid}-loop");
    let pid = up.child.as_ref().unwrap().id();
    // The `up` process without the wasm spinner (its agent, scheduler and
    // the API answering these polls), then with it: the difference is
    // what the spinner used, measured by the kernel.
    let baseline = window(&up, pid, &id, None);
    apply(
        &up,
        "spin",
        &format!(
            "kind = \"Pod\"\nname = \"spin\"\n[[members]]\nname = \"spin\"\nwasm = \"{}\"\nresources = {{ cpu = 800 }}\n",
            flotilla_samples::SPINNER_P1
        ),
    );
    figures(&["spin"]);
    let spun = window(&up, pid, &id, Some("spin"));
    let spinner = spun.process - baseline.process;
    eprintln!(
        "container: top {:.1}m, cgroup {:.1}m (and {:.1}m / {:.1}m); wasm spinner: top {:.1}m, process {:.1}m less {:.1}m without it",
        spun.box_top,
        spun.box_kernel,
        baseline.box_top,
        baseline.box_kernel,
        spun.spin_top,
        spun.process,
        baseline.process
    );
    within(
        "container CPU (millicores)",
        baseline.box_top,
        baseline.box_kernel,
        0.2,
    );
    within(
        "container CPU (millicores)",
        spun.box_top,
        spun.box_kernel,
        0.2,
    );
    within("wasm spinner CPU (millicores)", spun.spin_top, spinner, 0.2);
    // The limits held them near their shares (500m and 800m).
    assert!(
        spun.box_kernel < 600.0 && spun.spin_top < 900.0,
        "{:?}",
        (spun.box_kernel, spun.spin_top)
    );

    // Memory: the container's working set as the kernel counts it now, and
    // the 64 MiB the wasm member holds.
    let kernel_mem = cgroup(&id).1 as f64;
    let top_mem = top_of(&top_pods(&up), "box").unwrap().1 as f64;
    within("container memory (bytes)", top_mem, kernel_mem, 0.2);
    let held = top_of(&top_pods(&up), "hold").unwrap().1 as f64;
    eprintln!(
        "memory: container top {top_mem} B, cgroup {kernel_mem} B; wasm holding 64 MiB: top {held} B"
    );
    within("wasm memory (bytes)", held, (64u64 << 20) as f64, 0.2);

    // The tables.
    let nodes = up.ok(&["top", "nodes"]);
    let row: Vec<&str> = nodes.lines().nth(1).unwrap().split_whitespace().collect();
    assert!(row[1].ends_with('m') && row[3].ends_with("Mi"), "{nodes}");
    let pods = up.ok(&["top", "pods", "--containers"]);
    assert!(
        pods.starts_with("NAME") && pods.contains("MEMBER"),
        "{pods}"
    );
    let hog = pods.lines().find(|l| l.starts_with("hold ")).unwrap();
    assert!(
        hog.contains(" hog ") && hog.trim_end().ends_with("Mi"),
        "{pods}"
    );

    // The scheduler's /metrics: a view credential reads it, nobody else.
    let view = up
        .ok(&["token", "create", "--role", "view"])
        .trim()
        .to_string();
    let url = format!("{}/metrics", up.url);
    let text = ureq::get(&url)
        .set("authorization", &format!("Bearer {view}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains("# TYPE flotilla_member_cpu_seconds_total counter"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| {
            l.starts_with(
                "flotilla_member_memory_bytes{namespace=\"default\",pod=\"hold\",member=\"hog\"",
            )
        })
        .unwrap_or_else(|| panic!("{text}"));
    let bytes: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    within("/metrics memory (bytes)", bytes, (64u64 << 20) as f64, 0.2);
    assert!(
        text.contains("flotilla_pods{namespace=\"default\",phase=\"Running\"} 3"),
        "{text}"
    );
    match ureq::get(&url).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("anonymous /metrics: {other:?}"),
    }

    // The agent's own port.
    let agent = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        agent.contains(
            "flotilla_member_cpu_seconds_total{namespace=\"default\",pod=\"spin\",member=\"spin\",node=\""
        ),
        "{agent}"
    );
    assert!(agent.contains("flotilla_node_members{node="), "{agent}");
    match ureq::get(&format!("http://{addr}/other")).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("{other:?}"),
    }
    drop(reg);
}
