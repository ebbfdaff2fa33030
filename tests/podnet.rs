//! Pod networking on test networks the tests create (each test host its own
//! namespace, pod CIDRs only inside them): wasm and container members on one
//! localhost, pod to pod through the node bridge, addresses in `get -o wide`
//! and `describe`, and no namespaces, veths or mounts left after deletes and
//! agent restarts. Needs root, iproute2, runc, docker-registry, busybox.

mod common;

use common::lab::*;
use common::registry::{Auth, Registry};
use common::*;
use flotilla_host::image::{ImageStore, Platform};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// The tcp guest (WASI sockets), built for wasip2.
const TCP: &str = flotilla_samples::TCP_P2;

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Pushes busybox to a loopback registry and stores it in each host's image
/// store, so agents inside the test namespaces find it without a registry.
fn busybox_for(lab: &Lab, hosts: &[&str]) -> String {
    let reg = Registry::start(Auth::Anonymous);
    let reference = reg.push_busybox("test/busybox:1");
    for h in hosts {
        let store = ImageStore::open(lab.data(h).join("images"), reg.config()).unwrap();
        block_on(store.ensure(&reference, &Platform::host(), &mut |_| {})).unwrap();
    }
    reference
}

/// Runs a command inside host `i`'s network namespace.
fn in_host(lab: &Lab, i: usize, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.net.ns(i)))
        .args(args)
        .output()
        .unwrap()
}

fn pod(lab: &Lab, name: &str) -> Option<serde_json::Value> {
    lab.pods()
        .into_iter()
        .find(|p| p["metadata"]["name"] == name)
}

fn wait_running(lab: &Lab, name: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let p = pod(lab, name);
        if let Some(p) = &p
            && p["status"]["phase"] == "Running"
        {
            return p.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pod {name} not Running: {p:?}\n{}",
            dump(lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn logs(lab: &Lab, pod: &str, member: &str) -> String {
    let o = lab.cli_raw(&["logs", pod, "-c", member]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits until the member's log contains `want`.
fn wait_log(lab: &Lab, pod: &str, member: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let l = logs(lab, pod, member);
        if l.contains(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pod}/{member} never logged {want:?}; log:\n{l}\n{}",
            dump(lab)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a failed wait shows: every pod described, the agents' logs.
fn dump(lab: &Lab) -> String {
    // FLOTILLA_TEST_PAUSE=SECONDS leaves the failed state up for a look.
    if let Some(secs) = std::env::var("FLOTILLA_TEST_PAUSE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("pausing {secs} s; namespaces: {}", lab.net.ns(0));
        std::thread::sleep(Duration::from_secs(secs));
    }
    let mut out =
        String::from_utf8_lossy(&lab.cli_raw(&["get", "pods", "-o", "json"]).stdout).into_owned();
    if let Ok(entries) = std::fs::read_dir(lab.dir.path()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".log") && !name.starts_with("sched") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                out.push_str(&format!("\n== {name}\n{text}"));
            }
        }
    }
    out
}

/// Waits for `f`, showing the cluster on timeout.
fn wait_for(lab: &Lab, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            dump(lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node's block of pod addresses.
fn pod_cidr(lab: &Lab, node: &str) -> String {
    lab.nodes()
        .into_iter()
        .find(|n| n["metadata"]["name"] == node)
        .unwrap()["status"]["pod_cidr"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every interface in host `i`'s namespace, sorted.
fn links(lab: &Lab, i: usize) -> Vec<String> {
    let o = in_host(lab, i, &["ip", "-o", "link"]);
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Host ends of pod veths in host `i`'s namespace.
fn pod_veths(lab: &Lab, i: usize) -> Vec<String> {
    links(lab, i)
        .into_iter()
        .filter(|n| n.starts_with("vf"))
        .collect()
}

/// The addresses on host `i`'s node bridge.
fn bridge_addrs(lab: &Lab, i: usize) -> String {
    let o = in_host(lab, i, &["ip", "-o", "-4", "addr", "show", "dev", "flt0"]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Namespace mounts under an agent's data dir.
fn ns_mounts(data: &Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = data.join("netns");
    // Spare namespaces (at most two, kept ready for the next pods) are the
    // node's, not a pod's.
    info.lines()
        .filter(|l| l.contains(dir.to_str().unwrap()) && !l.contains("/.spare-"))
        .count()
}

fn ns_files(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("netns"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "node-cidr" && n != "direct-routes" && !n.starts_with(".spare-"))
                .collect()
        })
        .unwrap_or_default()
}

/// An HTTP GET of `/` from host `i`'s namespace; the body.
fn fetch_from_node(lab: &Lab, i: usize, addr: &str) -> String {
    let reply = tcp_exchange(&lab.net, i, addr, "GET / HTTP/1.0\r\n\r\n");
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// A one-container busybox pod running `script` (then sleeping), pinned to
/// `node` if given.
fn box_pod(name: &str, node: Option<&str>, image: &str, script: &str) -> String {
    let pin = node
        .map(|n| format!("node_selector = {{ \"flotilla.dev/hostname\" = \"{n}\" }}\n"))
        .unwrap_or_default();
    format!(
        "kind = \"Pod\"\nname = \"{name}\"\n{pin}[[members]]\nname = \"box\"\nimage = \"{image}\"\ngrace_period = 1\nargs = [\"sh\", \"-c\", '''\n{script}\nexec sleep 100000\n''']\n"
    )
}

fn mixed_pod(image: &str) -> String {
    format!(
        r#"kind = "Pod"
name = "mixed"

[[members]]
name = "srv"
wasm = "{TCP}"
args = ["serve", "8080"]
ports = [8080]

[[members]]
name = "fetch"
wasm = "{TCP}"
args = ["send", "127.0.0.1:8081", "GET / HTTP/1.0\r\n\r\n"]
restart = "OnFailure"

[[members]]
name = "box"
image = "{image}"
ports = [8081]
grace_period = 1
args = ["sh", "-c", '''
mkdir -p /www && echo container-here > /www/index.html && httpd -p 8081 -h /www
until out=$( (echo hi-from-box; sleep 1) | nc 127.0.0.1 8080) && [ -n "$out" ]; do sleep 0.2; done
echo "$out"
exec sleep 100000
''']
"#
    )
}

#[test]
fn wasm_and_containers_share_localhost_and_pods_reach_each_other() {
    let lab = Lab::start(&["a"], &[]);
    let image = busybox_for(&lab, &["a"]);
    let _agent = lab.agent(0);
    wait_until(Duration::from_secs(20), "node a ready", || lab.ready("a"));
    // Before any pod with a network the node's namespace is as the test
    // made it: loopback and the test link.
    let before = links(&lab, 0);
    assert_eq!(before.len(), 2, "{before:?}");
    lab.apply("mixed.toml", &mixed_pod(&image));
    let p = wait_running(&lab, "mixed");
    let ip = p["status"]["pod_ip"].as_str().unwrap().to_string();
    let cidr = &pod_cidr(&lab, "a");
    assert!(
        cidr.starts_with("10.88.") && cidr.ends_with(".0/24"),
        "{cidr}"
    );
    assert_eq!(
        ip,
        cidr.replace(".0/24", ".2"),
        "the first pod address of the node's block"
    );

    // One localhost: the container reached the wasm server on :8080, the
    // wasm client reached the container's httpd on :8081.
    wait_log(&lab, "mixed", "box", "wasm got: hi-from-box");
    wait_log(&lab, "mixed", "fetch", "reply: container-here");

    // The node reaches both members at the pod's address.
    assert_eq!(
        fetch_from_node(&lab, 0, &format!("{ip}:8081")).trim(),
        "container-here"
    );

    // Another pod reaches them through the bridge.
    lab.apply(
        "client.toml",
        &box_pod(
            "client",
            None,
            &image,
            &format!(
                r#"until out=$( (printf 'GET / HTTP/1.0\r\n\r\n'; sleep 1) | nc {ip} 8081) && [ -n "$out" ]; do sleep 0.2; done
echo "$out"
(echo from-client; sleep 1) | nc {ip} 8080
ip=$(ip -4 -o addr show eth0 | awk '{{print $4}}')
echo "my address $ip""#
            ),
        ),
    );
    let c = wait_running(&lab, "client");
    let client_ip = c["status"]["pod_ip"].as_str().unwrap().to_string();
    assert_ne!(client_ip, ip, "addresses are never handed out twice");
    wait_log(&lab, "client", "box", "container-here");
    wait_log(&lab, "client", "box", "wasm got: from-client");
    wait_log(&lab, "client", "box", &format!("my address {client_ip}/24"));

    // Addresses in the table and in describe.
    let wide = lab.cli(&["get", "pods", "-o", "wide"]);
    let header = wide.lines().next().unwrap();
    assert!(header.contains("IP") && header.ends_with("NODE"), "{wide}");
    assert!(
        wide.lines()
            .any(|l| l.starts_with("mixed") && l.contains(&ip) && l.trim_end().ends_with('a')),
        "{wide}"
    );
    let described = lab.cli(&["describe", "pod", "mixed"]);
    assert!(
        described.contains(&format!("IP:           {ip}")),
        "{described}"
    );
    assert!(described.contains("Ports:      8080/TCP"), "{described}");

    // Two sandboxes now; none after the deletes.
    assert_eq!(pod_veths(&lab, 0).len(), 2);
    assert_eq!(ns_files(&lab.data("a")).len(), 2);
    assert_eq!(ns_mounts(&lab.data("a")), 2);
    lab.cli(&["delete", "pod", "mixed"]);
    lab.cli(&["delete", "pod", "client"]);
    // What stays is the node's: the bridge and the tunnel.
    let mut after = before.clone();
    after.extend(["flt0".to_string(), "flttun".to_string()]);
    after.sort();
    wait_until(Duration::from_secs(20), "sandboxes released", || {
        links(&lab, 0) == after
            && ns_files(&lab.data("a")).is_empty()
            && ns_mounts(&lab.data("a")) == 0
    });
    // Spare namespaces kept ready for the next pods stay bounded.
    let spares = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "{}/.spare-",
                lab.data("a").join("netns").display()
            ))
        })
        .count();
    assert!((1..=2).contains(&spares), "{spares} spare namespaces");
    // A new pod may get a released address again.
    lab.apply(
        "again.toml",
        &format!(
            "kind = \"Pod\"\nname = \"again\"\n[[members]]\nwasm = \"{TCP}\"\nargs = [\"serve\", \"9000\"]\nports = [9000]\n"
        ),
    );
    let again = wait_running(&lab, "again");
    assert_eq!(again["status"]["pod_ip"], ip.as_str());
}

#[test]
fn socket_free_wasm_pods_get_no_namespace() {
    let lab = Lab::start(&["a"], &[]);
    let _agent = lab.agent(0);
    wait_until(Duration::from_secs(20), "node a ready", || lab.ready("a"));
    lab.apply(
        "quiet.toml",
        &format!(
            "kind = \"Pod\"\nname = \"quiet\"\n[[members]]\nwasm = \"{}\"\n",
            flotilla_samples::COUNTER_P1
        ),
    );
    let p = wait_running(&lab, "quiet");
    assert!(p["status"].get("pod_ip").is_none(), "{p}");
    assert!(ns_files(&lab.data("a")).is_empty());
    // Nothing in the node's network changed: no bridge, no tunnel.
    assert_eq!(links(&lab, 0).len(), 2, "{:?}", links(&lab, 0));
    // Without a namespace the guest has no sockets at all.
    lab.apply(
        "nosock.toml",
        &format!(
            "kind = \"Pod\"\nname = \"nosock\"\n[[members]]\nname = \"main\"\nwasm = \"{TCP}\"\nargs = [\"send\", \"127.0.0.1:1\", \"x\"]\nrestart = \"Never\"\n"
        ),
    );
    wait_until(Duration::from_secs(45), "nosock fails", || {
        pod(&lab, "nosock").is_some_and(|p| p["status"]["phase"] == "Failed")
    });
    let l = logs(&lab, "nosock", "main");
    assert!(l.contains("connect 127.0.0.1:1"), "{l}");
}

#[test]
fn an_agent_restart_keeps_pod_networking_and_leaks_nothing() {
    let lab = Lab::start(&["a"], &[]);
    let image = busybox_for(&lab, &["a"]);
    let mut agent = lab.agent(0);
    wait_until(Duration::from_secs(20), "node a ready", || lab.ready("a"));
    lab.apply(
        "web.toml",
        &format!(
            r#"kind = "Pod"
name = "web"
[[members]]
name = "box"
image = "{image}"
ports = [80]
grace_period = 1
args = ["sh", "-c", "mkdir -p /www && echo served-by-web > /www/index.html && exec httpd -f -p 80 -h /www"]
"#
        ),
    );
    let p = wait_running(&lab, "web");
    let ip = p["status"]["pod_ip"].as_str().unwrap().to_string();
    let url = format!("{ip}:80");
    wait_for(&lab, "web serves", || {
        fetch_from_node(&lab, 0, &url).contains("served-by-web")
    });
    // A service whose address the agent puts on its bridge; it is deleted
    // while the agent is down.
    lab.apply(
        "svc.toml",
        "kind = \"Service\"\nname = \"web\"\nselector = { app = \"web\" }\nports = [80]\n",
    );
    let mut vip = String::new();
    wait_for(&lab, "the service's address on flt0", || {
        vip = service(&lab, "web")["status"]["cluster_ip"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !vip.is_empty() && bridge_addrs(&lab, 0).contains(&vip)
    });
    let data = lab.data("a");
    let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
    let ns_inode = std::fs::metadata(data.join("netns").join(&uid))
        .unwrap()
        .ino();
    let veths = pod_veths(&lab, 0);
    assert_eq!(veths.len(), 1);

    // The agent dies: the container and its network keep serving.
    agent.kill9();
    assert!(fetch_from_node(&lab, 0, &url).contains("served-by-web"));
    lab.cli(&["delete", "service", "web"]);
    let _agent = lab.agent(0);
    wait_until(Duration::from_secs(20), "node a ready again", || {
        lab.ready("a")
    });
    std::thread::sleep(Duration::from_millis(500));
    wait_running(&lab, "web");
    assert!(fetch_from_node(&lab, 0, &url).contains("served-by-web"));
    assert_eq!(
        std::fs::metadata(data.join("netns").join(&uid))
            .unwrap()
            .ino(),
        ns_inode,
        "the same namespace, not a new one"
    );
    assert_eq!(pod_veths(&lab, 0), veths, "no second veth");
    assert_eq!(ns_mounts(&data), 1);
    wait_for(&lab, "the deleted service's address removed", || {
        !bridge_addrs(&lab, 0).contains(&vip)
    });

    lab.cli(&["delete", "pod", "web"]);
    wait_until(Duration::from_secs(20), "web's network released", || {
        pod_veths(&lab, 0).is_empty() && ns_files(&data).is_empty() && ns_mounts(&data) == 0
    });
}

/// A container pod on node a sends `msg` to the echo server at `ip`:7000
/// until it answers; waits for the answer in its log.
fn send_from_a(lab: &Lab, image: &str, ip: &str, msg: &str) {
    lab.apply(
        "client.toml",
        &box_pod(
            "client",
            Some("a"),
            image,
            &format!(
                r#"until out=$( (echo {msg}; sleep 1) | nc {ip} 7000) && [ -n "$out" ]; do sleep 0.2; done
echo "$out""#
            ),
        ),
    );
    wait_log(lab, "client", "box", &format!("wasm got: {msg}"));
}

/// A wasm echo server pinned to `node`.
fn echo_pod(name: &str, node: &str, port: u16) -> String {
    format!(
        "kind = \"Pod\"\nname = \"{name}\"\nnode_selector = {{ \"flotilla.dev/hostname\" = \"{node}\" }}\n[[members]]\nname = \"srv\"\nwasm = \"{TCP}\"\nargs = [\"serve\", \"{port}\"]\nports = [{port}]\n"
    )
}

#[test]
fn pods_reach_pods_on_other_nodes_through_the_quic_tunnel() {
    let lab = Lab::start(&["a", "b"], &[]);
    let image = busybox_for(&lab, &["a"]);
    let _a = lab.agent(0);
    let _b = lab.agent(1);
    wait_until(Duration::from_secs(20), "nodes ready", || {
        lab.ready("a") && lab.ready("b")
    });
    lab.apply("echo-b.toml", &echo_pod("echo-b", "b", 7000));
    let p = wait_running(&lab, "echo-b");
    let ip_b = p["status"]["pod_ip"].as_str().unwrap().to_string();
    let cidr_of = |n: &str| pod_cidr(&lab, n);
    assert_ne!(cidr_of("a"), cidr_of("b"));
    assert!(
        ip_b.starts_with(cidr_of("b").trim_end_matches("0/24")),
        "{ip_b}"
    );

    // From a container pod on a.
    send_from_a(&lab, &image, &ip_b, "from-pod-on-a");
    // From node a's own namespace (source: a's bridge address), now that a
    // takes part in pod networking (its first networked pod made the bridge
    // and the tunnel).
    let addr = format!("{ip_b}:7000");
    wait_for(&lab, "node a reaches the pod on b", || {
        tcp_exchange(&lab.net, 0, &addr, "from-node-a\n").contains("wasm got: from-node-a")
    });
    // The packets went through the tunnel devices, not the test network.
    for i in 0..2 {
        let o = in_host(&lab, i, &["ip", "route", "show", "10.88.0.0/16"]);
        let route = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(route.contains("dev flttun"), "host {i}: {route}");
    }
}

fn service(lab: &Lab, name: &str) -> serde_json::Value {
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&lab.cli(&["get", "services", "-o", "json"])).unwrap();
    all.into_iter()
        .find(|s| s["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

fn endpoint_pods(lab: &Lab, name: &str) -> Vec<String> {
    let s = service(lab, name);
    let mut v: Vec<String> = s["status"]["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["pod"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A busybox httpd answering with its pod's name on :8080, pinned to `node`.
fn named_web(name: &str, node: &str, image: &str, restart: &str) -> String {
    format!(
        r#"kind = "Pod"
name = "{name}"
labels = {{ app = "web" }}
node_selector = {{ "flotilla.dev/hostname" = "{node}" }}
[[members]]
name = "box"
image = "{image}"
ports = [8080]
restart = "{restart}"
grace_period = 1
env = {{ FLOTILLA_POD = {{ field = "pod.name" }} }}
args = ["sh", "-c", "mkdir -p /www && echo $FLOTILLA_POD > /www/index.html && exec httpd -f -p 8080 -h /www"]
"#
    )
}

/// A DNS query for `name` (type A) sent from host `i` to `server`; the
/// addresses in the answer.
fn dns_lookup(lab: &Lab, i: usize, server: &str, name: &str) -> Vec<String> {
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let server: std::net::SocketAddr = server.parse().unwrap();
    let reply = in_netns(&format!("/run/netns/{}", lab.net.ns(i)), move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(&q, server).unwrap();
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap_or(0);
        buf[..n].to_vec()
    });
    if reply.len() < 12 || reply[3] & 0x0f != 0 {
        return Vec::new();
    }
    // Answers are 16-byte A records at the end (name pointer, type, class,
    // ttl, length, address).
    let answers = u16::from_be_bytes([reply[6], reply[7]]) as usize;
    (0..answers)
        .map(|k| {
            let at = reply.len() - (answers - k) * 16 + 12;
            format!(
                "{}.{}.{}.{}",
                reply[at],
                reply[at + 1],
                reply[at + 2],
                reply[at + 3]
            )
        })
        .collect()
}

#[test]
fn services_balance_across_nodes_by_address_name_and_node_port() {
    // c runs no agent: a client outside the cluster.
    let lab = Lab::start(&["a", "b", "c"], &[]);
    let image = busybox_for(&lab, &["a", "b"]);
    let _a = lab.agent(0);
    let _b = lab.agent(1);
    wait_until(Duration::from_secs(20), "nodes ready", || {
        lab.ready("a") && lab.ready("b")
    });
    lab.apply("web-a.toml", &named_web("web-a", "a", &image, "Always"));
    lab.apply("web-b.toml", &named_web("web-b", "b", &image, "Never"));
    lab.apply(
        "svc.toml",
        "kind = \"Service\"\nname = \"web\"\nselector = { app = \"web\" }\nports = [{ port = 80, target_port = 8080, node_port = 30080 }]\n",
    );
    wait_for(&lab, "two endpoints", || {
        endpoint_pods(&lab, "web") == ["web-a", "web-b"]
    });
    let svc = service(&lab, "web");
    let vip = svc["status"]["cluster_ip"].as_str().unwrap().to_string();
    assert!(vip.starts_with("10.96."), "{vip}");
    let table = lab.cli(&["get", "services"]);
    assert!(
        table.contains(&vip) && table.contains("80:8080/TCP (node 30080)"),
        "{table}"
    );

    // From node a: through the virtual IP, both pods answer in turn.
    let mut seen = std::collections::BTreeMap::new();
    wait_for(&lab, "the proxy to answer", || {
        !fetch_from_node(&lab, 0, &format!("{vip}:80")).is_empty()
    });
    for _ in 0..10 {
        let body = fetch_from_node(&lab, 0, &format!("{vip}:80"));
        *seen.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["web-a", "web-b"],
        "{seen:?}"
    );
    assert!(seen.values().all(|&n| n >= 3), "balanced: {seen:?}");

    // By name from the node's DNS responder, and from a pod: the name and
    // the environment variables.
    let cidr_a = pod_cidr(&lab, "a");
    let dns = format!("{}:53", cidr_a.replace(".0/24", ".1"));
    assert_eq!(dns_lookup(&lab, 0, &dns, "web.default.svc"), [vip.as_str()]);
    assert_eq!(dns_lookup(&lab, 0, &dns, "web.default"), [vip.as_str()]);
    // A bare name names no namespace: pods find their own through their
    // search list; nothing falls back to `default`.
    assert!(dns_lookup(&lab, 0, &dns, "web").is_empty());
    assert!(dns_lookup(&lab, 0, &dns, "example.com").is_empty());
    lab.apply(
        "client.toml",
        &box_pod(
            "client",
            Some("a"),
            &image,
            r#"echo "env $WEB_SERVICE_HOST:$WEB_SERVICE_PORT"
nslookup web.default.svc
for i in 1 2 3 4 5 6; do
  (printf 'GET / HTTP/1.0\r\n\r\n'; sleep 0.5) | nc $WEB_SERVICE_HOST $WEB_SERVICE_PORT | tail -n 1
done
echo done"#,
        ),
    );
    wait_log(&lab, "client", "box", "done");
    let log = logs(&lab, "client", "box");
    assert!(log.contains(&format!("env {vip}:80")), "{log}");
    assert!(log.contains(&vip), "nslookup answered: {log}");
    assert!(log.contains("web-a") && log.contains("web-b"), "{log}");

    // From outside the cluster, on node a's own address.
    let node_a = format!("{}:30080", lab.net.addr(0));
    let mut outside = std::collections::BTreeSet::new();
    for _ in 0..6 {
        outside.insert(fetch_from_node(&lab, 2, &node_a).trim().to_string());
    }
    assert_eq!(outside.into_iter().collect::<Vec<_>>(), ["web-a", "web-b"]);

    // web-b dies (its container is killed; restart = Never): its endpoint
    // goes, and every request lands on web-a.
    let uid_b = pod(&lab, "web-b").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let state = std::fs::read_to_string(
        lab.data("b")
            .join("containers")
            .join(format!("{uid_b}-box"))
            .join("state.json"),
    )
    .unwrap();
    let pid = serde_json::from_str::<serde_json::Value>(&state).unwrap()["pid"]
        .as_i64()
        .unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    wait_for(&lab, "web-b's endpoint removed", || {
        endpoint_pods(&lab, "web") == ["web-a"]
    });
    wait_for(&lab, "only web-a answers", || {
        (0..4).all(|_| fetch_from_node(&lab, 0, &format!("{vip}:80")).trim() == "web-a")
    });
    // web-a is deleted: no endpoints, connections are refused or closed.
    lab.cli(&["delete", "pod", "web-a"]);
    wait_for(&lab, "no endpoints", || {
        endpoint_pods(&lab, "web").is_empty()
    });
    wait_for(&lab, "nothing answers", || {
        fetch_from_node(&lab, 0, &format!("{vip}:80")).is_empty()
    });
    // Deleting the service removes its address and listeners from the node.
    lab.cli(&["delete", "service", "web"]);
    wait_for(&lab, "the virtual IP gone from flt0", || {
        !bridge_addrs(&lab, 0).contains(&vip)
    });
}

#[test]
fn nodes_on_one_network_can_route_pods_directly() {
    let lab = Lab::start(&["a", "b"], &[]);
    let image = busybox_for(&lab, &["a"]);
    let _a = lab.agent_with(0, &["--direct-routes"]);
    let _b = lab.agent_with(1, &["--direct-routes"]);
    wait_until(Duration::from_secs(20), "nodes ready", || {
        lab.ready("a") && lab.ready("b")
    });
    lab.apply("echo-b.toml", &echo_pod("echo-b", "b", 7000));
    let p = wait_running(&lab, "echo-b");
    let ip_b = p["status"]["pod_ip"].as_str().unwrap().to_string();
    send_from_a(&lab, &image, &ip_b, "direct-from-a");
    // The packets to b's block take the test network to b's address, not
    // the tunnel.
    let o = in_host(&lab, 0, &["ip", "route", "get", &ip_b]);
    let route = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        route.contains(&format!("via {}", lab.net.addr(1))) && !route.contains("flttun"),
        "{route}"
    );
}

/// Issue 14 item 3: a pod whose container ignores SIGTERM keeps its
/// address through its whole grace period: a pod placed on the node
/// meanwhile gets another one, and the address returns to the pool only
/// once the agent reports the old pod gone with its network.
#[test]
fn a_pod_ignoring_sigterm_never_shares_its_address() {
    let lab = Lab::start(&["a"], &[]);
    let image = busybox_for(&lab, &["a"]);
    let _agent = lab.agent(0);
    wait_until(Duration::from_secs(20), "node a ready", || lab.ready("a"));
    // busybox sleep as the container's PID 1 ignores SIGTERM: it stops
    // only when killed, 30 s after being asked.
    let stubborn = |name: &str| {
        box_pod(name, Some("a"), &image, "trap '' TERM")
            .replace("grace_period = 1", "grace_period = 30")
    };
    lab.apply("old.toml", &stubborn("old"));
    let old_ip = wait_running(&lab, "old")["status"]["pod_ip"]
        .as_str()
        .unwrap()
        .to_string();
    lab.cli(&["delete", "pod", "old"]);
    let releasing = || -> Vec<String> {
        lab.nodes()
            .iter()
            .filter(|n| n["metadata"]["name"] == "a")
            .flat_map(|n| {
                n["status"]["releasing"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|r| r["ip"].as_str().map(str::to_string))
            .collect()
    };
    wait_until(
        Duration::from_secs(20),
        "old's address held as releasing",
        || releasing().contains(&old_ip),
    );
    lab.apply("next.toml", &stubborn("next"));
    let next_ip = wait_running(&lab, "next")["status"]["pod_ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(
        next_ip,
        old_ip,
        "two pods shared an address\n{}",
        dump(&lab)
    );
    // Killed after its grace period, its network gone: the agent says so
    // and the address is free again (the lowest free one comes first).
    wait_until(Duration::from_secs(90), "old's address released", || {
        releasing().is_empty()
    });
    lab.apply("third.toml", &stubborn("third"));
    let third = wait_running(&lab, "third");
    assert_eq!(third["status"]["pod_ip"], old_ip.as_str(), "{third}");
}

/// Issue 14 item 13: an agent restarting with an orphan container (its pod
/// deleted while the agent was down and gone from the agent's saved state,
/// as after a crash before saving) stops it before removing the networks
/// left from before; a networked pod the scheduler sends meanwhile keeps
/// the network it got and serves throughout.
#[test]
fn an_orphan_container_at_restart_does_not_cost_a_new_pod_its_network() {
    let lab = Lab::start(&["a"], &[]);
    let image = busybox_for(&lab, &["a"]);
    let mut agent = lab.agent(0);
    wait_until(Duration::from_secs(20), "node a ready", || lab.ready("a"));
    // The orphan-to-be ignores SIGTERM: stopping it takes its grace period.
    lab.apply(
        "orphan.toml",
        &box_pod("orphan", Some("a"), &image, "trap '' TERM")
            .replace("grace_period = 1", "grace_period = 5"),
    );
    let orphan = wait_running(&lab, "orphan");
    let orphan_uid = orphan["metadata"]["uid"].as_str().unwrap().to_string();
    let data = lab.data("a");
    assert!(ns_files(&data).contains(&orphan_uid));
    agent.kill9();
    lab.cli(&["delete", "pod", "orphan"]);
    std::fs::write(data.join("pods.json"), "[]").unwrap();
    lab.apply(
        "fresh.toml",
        &format!(
            r#"kind = "Pod"
name = "fresh"
node_selector = {{ "flotilla.dev/hostname" = "a" }}
[[members]]
name = "box"
image = "{image}"
ports = [80]
grace_period = 1
args = ["sh", "-c", "mkdir -p /www && echo served-by-fresh > /www/index.html && exec httpd -f -p 80 -h /www"]
"#
        ),
    );
    let _agent = lab.agent(0);
    let fresh = wait_running(&lab, "fresh");
    let fresh_uid = fresh["metadata"]["uid"].as_str().unwrap().to_string();
    let url = format!("{}:80", fresh["status"]["pod_ip"].as_str().unwrap());
    wait_for(&lab, "fresh serves", || {
        fetch_from_node(&lab, 0, &url).contains("served-by-fresh")
    });
    // The orphan stopped and the start-up reap ran (it removes the orphan's
    // network last) …
    wait_until(
        Duration::from_secs(60),
        "the orphan's network reaped",
        || !ns_files(&data).contains(&orphan_uid),
    );
    // … and left the new pod's alone.
    assert!(
        ns_files(&data).contains(&fresh_uid),
        "{:?}",
        ns_files(&data)
    );
    assert!(
        fetch_from_node(&lab, 0, &url).contains("served-by-fresh"),
        "{}",
        dump(&lab)
    );
}

/// Connects to `addr` from host `i`'s namespace: `Ok` once connected, else
/// the OS error number (`ETIMEDOUT` when nothing answered in 10 s).
fn connect_from(lab: &Lab, i: usize, addr: &str) -> Result<(), i32> {
    in_netns(&format!("/run/netns/{}", lab.net.ns(i)), || {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map(drop)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => libc::ETIMEDOUT,
                _ => e.raw_os_error().unwrap_or(-1),
            })
    })
}

/// Host `i`'s `Ip: InAddrErrors` (/proc/net/snmp): packets the kernel
/// dropped for their destination, which includes those it would not
/// forward from the interface they came in on.
fn in_addr_errors(lab: &Lab, i: usize) -> u64 {
    let o = in_host(lab, i, &["cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InAddrErrors")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// The packets an nftables counter of the pod filter has seen on host `i`.
fn refused(lab: &Lab, i: usize, counter: &str) -> u64 {
    let o = in_host(
        lab,
        i,
        &["nft", "list", "counter", "inet", "flotilla", counter],
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter {counter}: {text} {o:?}"))
}

/// Issue 14 item 9: forwarding is on for the bridge and the tunnel only,
/// and the node's filter keeps a neighbour on the test network out of the
/// pods (even once the host forwards on its own link), and keeps pods off
/// the node's own services except DNS and service addresses.
#[test]
fn neighbours_cannot_route_into_pods_and_pods_reach_only_dns_and_services() {
    // n runs no agent: a neighbour on a's network.
    let lab = Lab::start(&["a", "n"], &[]);
    let image = busybox_for(&lab, &["a"]);
    let _a = lab.agent(0);
    wait_until(Duration::from_secs(20), "node ready", || lab.ready("a"));
    lab.apply("echo-a.toml", &echo_pod("echo-a", "a", 7000));
    let p = wait_running(&lab, "echo-a");
    let pod_ip = p["status"]["pod_ip"].as_str().unwrap().to_string();
    let pod_addr = format!("{pod_ip}:7000");
    let cidr_a = pod_cidr(&lab, "a");
    let gateway = cidr_a.replace(".0/24", ".1");
    // Node a itself reaches its pod.
    wait_for(&lab, "node a reaches its pod", || {
        tcp_exchange(&lab.net, 0, &pod_addr, "from-a\n").contains("wasm got: from-a")
    });
    // Forwarding is per interface: on for the bridge, off for a's link to
    // the test network (and the host-wide switch untouched).
    let sysctl = |key: &str| {
        let o = in_host(&lab, 0, &["cat", &format!("/proc/sys/net/ipv4/{key}")]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let route = String::from_utf8_lossy(
        &in_host(&lab, 0, &["ip", "-o", "route", "get", &lab.net.addr(1)]).stdout,
    )
    .into_owned();
    let lan = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(sysctl("conf/flt0/forwarding"), "1");
    assert_eq!(sysctl(&format!("conf/{lan}/forwarding")), "0", "{lan}");
    assert_eq!(sysctl("ip_forward"), "0");

    // The neighbour routes a's pod block via a: the kernel does not
    // forward from a's link (a silent drop, counted as an address error).
    let via = lab.net.addr(0);
    let o = in_host(&lab, 1, &["ip", "route", "add", &cidr_a, "via", &via]);
    assert!(o.status.success(), "{o:?}");
    // A node service on all addresses, which the neighbour may reach.
    let listener = in_netns(&format!("/run/netns/{}", lab.net.ns(0)), || {
        std::net::TcpListener::bind("0.0.0.0:9099").unwrap()
    });
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let _ = std::io::Write::write_all(&mut s, b"node-secret\n");
        }
    });
    assert_eq!(connect_from(&lab, 1, &format!("{via}:9099")), Ok(()));
    let dropped = in_addr_errors(&lab, 0);
    assert_eq!(
        connect_from(&lab, 1, &pod_addr),
        Err(libc::ETIMEDOUT),
        "the neighbour reached a pod"
    );
    assert!(in_addr_errors(&lab, 0) > dropped);
    // An admin turns forwarding on for that link (a router, say): the
    // filter refuses instead, and counts it.
    let before = refused(&lab, 0, "forward_refused");
    let o = in_host(
        &lab,
        0,
        &["sysctl", "-w", &format!("net.ipv4.conf.{lan}.forwarding=1")],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        connect_from(&lab, 1, &pod_addr),
        Err(libc::EHOSTUNREACH),
        "the neighbour reached a pod through a forwarding host"
    );
    assert!(refused(&lab, 0, "forward_refused") > before);

    // From a pod: the node's service on the gateway and on a's own address
    // is refused; DNS and a service's virtual IP answer.
    lab.apply(
        "svc.toml",
        "kind = \"Service\"\nname = \"echo\"\nselector = { app = \"echo\" }\nports = [{ port = 80, target_port = 7000 }]\n",
    );
    lab.apply(
        "echo-svc.toml",
        &echo_pod("echo-svc", "a", 7000).replace(
            "name = \"echo-svc\"\n",
            "name = \"echo-svc\"\nlabels = { app = \"echo\" }\n",
        ),
    );
    wait_for(&lab, "the service's endpoint", || {
        endpoint_pods(&lab, "echo") == ["echo-svc"]
    });
    let vip = service(&lab, "echo")["status"]["cluster_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let before = refused(&lab, 0, "input_refused");
    lab.apply(
        "probe.toml",
        &box_pod(
            "probe",
            Some("a"),
            &image,
            &format!(
                r#"for t in {gateway} {via}; do
  if out=$(nc -w 5 $t 9099 </dev/null 2>&1); then echo "to $t: open $out"; else echo "to $t: shut $out"; fi
done
nslookup echo.default.svc {gateway} 2>&1
until out=$( (echo via-service; sleep 1) | nc {vip} 80) && [ -n "$out" ]; do sleep 0.2; done
echo "service: $out""#
            ),
        ),
    );
    wait_log(&lab, "probe", "box", "service: wasm got: via-service");
    let log = logs(&lab, "probe", "box");
    for t in [&gateway, &via] {
        assert!(
            log.contains(&format!("to {t}: shut")) && log.contains("No route to host"),
            "{log}"
        );
        assert!(!log.contains(&format!("to {t}: open")), "{log}");
    }
    assert!(log.contains(&vip), "DNS answered: {log}");
    assert!(refused(&lab, 0, "input_refused") >= before + 2);
}
