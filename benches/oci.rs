//! Images and containers: pull throughput from a local docker-registry
//! against `skopeo copy` of the same image, container start against bare
//! `runc run -d` of the same bundle, and the shim's memory per container.

use crate::common::registry::{
    self, Auth, OCI_CONFIG, OCI_LAYER_GZIP, Registry, busybox_layer, image_config,
};
use flotilla_api::MemberSpec;
use flotilla_host::executor::container::runtime::{ContainerConfig, ContainerRuntime, StartSpec};
use flotilla_host::image::{ImageStore, Platform};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Sizes {
    /// Layers of the pull benchmark's image, and bytes per layer.
    pub layers: usize,
    pub layer_bytes: usize,
    pub pulls: usize,
    pub starts: usize,
    pub shims: usize,
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Incompressible bytes (xorshift), so gzip does not shrink the layer.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

pub fn oci(rt: &tokio::runtime::Runtime, sizes: &Sizes) {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root || flotilla_host::executor::container::runtime::find_runc().is_none() {
        println!("## Images and containers\n\nskipped: needs root and runc\n");
        return;
    }
    let reg = Registry::start(Auth::Anonymous);
    pull_throughput(rt, &reg, sizes);
    container_start(rt, &reg, sizes);
}

fn pull_throughput(rt: &tokio::runtime::Runtime, reg: &Registry, sizes: &Sizes) {
    let reference = format!("{}/bench/big:1", reg.addr);
    let work = tempfile::tempdir().unwrap();
    let pusher = ImageStore::open(work.path().join("push"), reg.config()).unwrap();
    let layers: Vec<(String, Vec<u8>)> = (0..sizes.layers)
        .map(|i| {
            let data = noise(sizes.layer_bytes, 0x9E37_79B9_7F4A_7C15 ^ i as u64);
            let layer = registry::Layer::new()
                .file(&format!("data/{i}.bin"), 0o644, &data)
                .gzip();
            (OCI_LAYER_GZIP.to_string(), layer)
        })
        .collect();
    let total: usize = layers.iter().map(|(_, l)| l.len()).sum();
    rt.block_on(pusher.push_layers(
        &reference,
        (OCI_CONFIG, image_config(&[], &["/bin/sh"], &[], "/")),
        layers,
    ))
    .unwrap();
    let skopeo = Path::new("/usr/bin/skopeo").exists();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..sizes.pulls {
        // Interleaved, each into an empty store / directory.
        let dir = work.path().join(format!("ours-{i}"));
        let s = ImageStore::open(&dir, reg.config()).unwrap();
        let t = Instant::now();
        rt.block_on(s.pull(&reference, &Platform::host(), &mut |_| {}))
            .unwrap();
        ours.push(t.elapsed());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
        if skopeo {
            let dest = work.path().join(format!("skopeo-{i}"));
            let t = Instant::now();
            let st = Command::new("skopeo")
                .args([
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                ])
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:bench", dest.display()))
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "skopeo copy failed");
            theirs.push(t.elapsed());
            let _ = std::fs::remove_dir_all(&dest);
        }
    }
    let mb = total as f64 / (1 << 20) as f64;
    let o = median(&mut ours);
    println!(
        "## Pull throughput ({} layers, {mb:.1} MiB compressed, {} pulls each into an empty store)\n",
        sizes.layers, sizes.pulls
    );
    println!("| | median | MiB/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| flotilla (oci-client → content store, verified) | {} | {:.0} | {} |",
        ms(o),
        mb / o.as_secs_f64(),
        if skopeo { "" } else { "–" }
    );
    if skopeo {
        let t = median(&mut theirs);
        println!(
            "| `skopeo copy` docker:// → oci: | {} | {:.0} | flotilla/skopeo time {:.2} |",
            ms(t),
            mb / t.as_secs_f64(),
            o.as_secs_f64() / t.as_secs_f64()
        );
    }
    println!();
}

fn container_start(rt: &tokio::runtime::Runtime, reg: &Registry, sizes: &Sizes) {
    let reference = format!("{}/bench/busybox:1", reg.addr);
    let work = tempfile::tempdir().unwrap();
    let images = Arc::new(ImageStore::open(work.path().join("images"), reg.config()).unwrap());
    rt.block_on(images.push_layers(
        &reference,
        (
            OCI_CONFIG,
            image_config(&[], &["/bin/sh"], &["PATH=/bin"], "/"),
        ),
        vec![(OCI_LAYER_GZIP.to_string(), busybox_layer())],
    ))
    .unwrap();
    let runc = flotilla_host::executor::container::runtime::find_runc().unwrap();
    let crt = ContainerRuntime::new(
        ContainerConfig {
            runc: runc.clone(),
            shim_exe: env!("CARGO_BIN_EXE_flotilla-shim").into(),
            root: work.path().join("containers"),
            log_cap: 1 << 20,
            scratch_limit: flotilla_host::executor::container::runtime::DEFAULT_SCRATCH_LIMIT,
            user_namespaces: false,
        },
        images.clone(),
    )
    .unwrap();
    let prepared = rt.block_on(crt.prepare(&reference)).unwrap();
    let member = MemberSpec {
        name: "box".into(),
        source: flotilla_api::MemberSource::container(&reference),
        args: vec!["sleep".into(), "1000".into()],
        ..MemberSpec::default()
    };
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    // The reference: the same bundle (rootfs + config.json as flotilla
    // writes them), started by bare `runc run -d`.
    let bare = work.path().join("bare");
    let bare_root = work.path().join("bare-runc");
    std::fs::create_dir_all(&bare_root).unwrap();
    let start = |uid: &str| {
        rt.block_on(crt.start(
            &prepared,
            &StartSpec {
                pod_uid: uid,
                pod_name: "bench",
                member: &member,
                log_dir: &logs,
                env: &Default::default(),
                mounts: &[],
                restarts: 0,
                netns: None,
                resolv_conf: None,
                userns: None,
            },
        ))
        .unwrap_or_else(|e| panic!("start: {}", e.message))
    };
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..sizes.starts {
        let uid = format!("bench{i:04}");
        let t = Instant::now();
        let mut running = start(&uid);
        ours.push(t.elapsed());
        if i == 0 {
            // Copy our bundle once: its config.json, and the image rootfs.
            let dir = running.dir().join("bundle");
            std::fs::create_dir_all(bare.join("rootfs")).unwrap();
            std::fs::copy(dir.join("config.json"), bare.join("config.json")).unwrap();
            let st = Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", prepared.rootfs.display()))
                .arg(bare.join("rootfs"))
                .status()
                .unwrap();
            assert!(st.success());
            // Its own cgroup path, so the two never share one.
            let cfg = std::fs::read_to_string(bare.join("config.json")).unwrap();
            std::fs::write(
                bare.join("config.json"),
                cfg.replace(&format!("/flotilla/{uid}-box"), "/flotilla-bench/bare"),
            )
            .unwrap();
        }
        rt.block_on(running.stop(Duration::ZERO));
        rt.block_on(crt.remove(&running.id));

        let t = Instant::now();
        let st = Command::new(&runc)
            .arg("--root")
            .arg(&bare_root)
            .args(["run", "-d", "--bundle"])
            .arg(&bare)
            .arg("bare")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        theirs.push(t.elapsed());
        assert!(st.success(), "bare runc run failed");
        let _ = Command::new(&runc)
            .arg("--root")
            .arg(&bare_root)
            .args(["delete", "--force", "bare"])
            .status();
    }
    println!(
        "## Container start to running ({} starts each, busybox `sleep`)\n",
        sizes.starts
    );
    println!(
        "Flotilla: overlay mount of the unpacked image, runtime spec, `flotilla shim` spawned,"
    );
    println!(
        "`runc run -d` by the shim, PID handed back. Reference: bare `runc run -d` of the same"
    );
    println!("config.json on a plain copy of the rootfs, in the same run (interleaved).\n");
    println!("| | p50 | p90 | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| flotilla | {} | {} | {} |",
        ms(p(&ours, 0.5)),
        ms(p(&ours, 0.9)),
        ms(p(&ours, 0.99))
    );
    println!(
        "| bare `runc run -d` | {} | {} | {} |",
        ms(p(&theirs, 0.5)),
        ms(p(&theirs, 0.9)),
        ms(p(&theirs, 0.99))
    );
    let delta = p(&ours, 0.5).as_secs_f64() - p(&theirs, 0.5).as_secs_f64();
    println!(
        "\ndifference at p50: {:+.2} ms (target ≤ +5 ms)\n",
        delta * 1e3
    );

    // Shim memory: several containers at once.
    let mut running = Vec::new();
    for i in 0..sizes.shims {
        running.push(start(&format!("rss{i:03}")));
    }
    std::thread::sleep(Duration::from_millis(300));
    let kib = |pid: i32, file: &str, key: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let rss: Vec<u64> = running
        .iter()
        .map(|r| kib(r.shim_pid, "status", "VmRSS:"))
        .collect();
    let pss: Vec<u64> = running
        .iter()
        .map(|r| kib(r.shim_pid, "smaps_rollup", "Pss:"))
        .collect();
    println!("## Shim memory ({} containers running)\n", sizes.shims);
    println!("| per shim | mean | max |");
    println!("|---|---|---|");
    println!(
        "| RSS | {} KiB | {} KiB |",
        rss.iter().sum::<u64>() / rss.len() as u64,
        rss.iter().max().unwrap()
    );
    println!(
        "| PSS (shared pages split) | {} KiB | {} KiB |",
        pss.iter().sum::<u64>() / pss.len() as u64,
        pss.iter().max().unwrap()
    );
    println!();
    for mut r in running {
        rt.block_on(r.stop(Duration::ZERO));
        rt.block_on(crt.remove(&r.id));
    }
}
