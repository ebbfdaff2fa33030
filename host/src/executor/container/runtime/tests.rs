//! The container executor on a fake machine: bundles, the shim handshake,
//! exits, stop with grace (on virtual time), re-adoption after an agent
//! restart and orphan reaping — no root, runc or mounts.

use super::*;
use crate::executor::container::sys::fake::{FakeMachine, INIT_PID, Scenario};
use crate::image::{Blob, ImageKind, RegistryConfig};
use flotilla_api::{ContainerOptions, MemberSource};

struct Bed {
    dir: tempfile::TempDir,
    rt: ContainerRuntime,
    fake: Arc<FakeMachine>,
    prepared: Prepared,
    member: MemberSpec,
}

const ID: &str = "pod1-box";

fn bed(scenario: Scenario) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let images =
        Arc::new(ImageStore::open(dir.path().join("images"), RegistryConfig::default()).unwrap());
    let fake = Arc::new(FakeMachine::new(scenario));
    let rt = ContainerRuntime::with_sys(
        ContainerConfig {
            runc: "/nonexistent/runc".into(),
            shim_exe: "/nonexistent/flotilla".into(),
            root: dir.path().join("containers"),
            log_cap: 1 << 20,
            scratch_limit: crate::executor::container::runtime::DEFAULT_SCRATCH_LIMIT,
            user_namespaces: false,
        },
        images,
        fake.clone(),
    )
    .unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let prepared = Prepared {
        image: ImageRecord {
            reference: "127.0.0.1:5000/box:1".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            index_digest: None,
            kind: ImageKind::Container,
            config: Blob {
                digest: format!("sha256:{}", "b".repeat(64)),
                size: 10,
                media_type: "application/vnd.oci.image.config.v1+json".into(),
            },
            layers: Vec::new(),
            pulled_ms: 0,
        },
        run: RunConfig {
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
            workdir: "/".into(),
            user: String::new(),
        },
        rootfs,
    };
    let member = MemberSpec {
        name: "box".into(),
        source: MemberSource::Container {
            image: "127.0.0.1:5000/box:1".into(),
            digest: String::new(),
            options: ContainerOptions::default(),
        },
        args: vec!["sh".into(), "-c".into(), "exit 3".into()],
        ..MemberSpec::default()
    };
    Bed {
        dir,
        rt,
        fake,
        prepared,
        member,
    }
}

static NO_ENV: flotilla_api::Labels = flotilla_api::Labels::new();

impl Bed {
    fn spec(&self) -> StartSpec<'_> {
        StartSpec {
            pod_uid: "pod1",
            pod_name: "web",
            member: &self.member,
            log_dir: self.dir.path(),
            env: &NO_ENV,
            mounts: &[],
            restarts: 0,
            netns: None,
            resolv_conf: None,
            userns: None,
        }
    }

    fn container_dir(&self) -> PathBuf {
        self.dir.path().join("containers").join(ID)
    }
}

#[tokio::test]
async fn a_run_is_an_overlay_bundle_and_a_shim_and_ends_with_the_exit_it_records() {
    let b = bed(Scenario::Exits(3));
    let mut run = b.rt.start(&b.prepared, &b.spec()).await.unwrap();
    assert_eq!((run.id.as_str(), run.pid), (ID, INIT_PID));
    assert_eq!(
        b.fake.take_calls(),
        vec![
            format!("mount {ID}/bundle/rootfs lower=rootfs upper={ID}/upper"),
            format!("shim {ID}"),
        ]
    );
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.container_dir().join("bundle/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["sh", "-c", "exit 3"])
    );
    assert_eq!(config["hostname"], "web");

    let exit = run.wait().await;
    assert_eq!(
        exit,
        Exit {
            code: 3,
            reason: TerminationReason::Error,
            message: "exited with code 3".into()
        }
    );
    b.rt.remove(ID).await;
    // runc never registered it (no state under its root): no delete.
    assert_eq!(
        b.fake.take_calls(),
        vec![format!("unmount {ID}/bundle/rootfs")]
    );
    assert!(!b.container_dir().exists());
}

#[tokio::test]
async fn a_root_filesystem_that_cannot_be_mounted_is_a_start_error_that_leaves_nothing() {
    let b = bed(Scenario::Exits(0));
    *b.fake.mount_fails.lock().unwrap() = true;
    let Err(exit) = b.rt.start(&b.prepared, &b.spec()).await else {
        panic!("started without a root filesystem");
    };
    assert_eq!(exit.reason, TerminationReason::StartError);
    assert!(
        exit.message
            .starts_with("cannot mount the container's root filesystem"),
        "{}",
        exit.message
    );
    let calls = b.fake.take_calls();
    assert!(!calls.iter().any(|c| c.starts_with("shim")), "{calls:?}");
    assert!(!b.container_dir().exists());
}

#[tokio::test]
async fn a_shim_that_reports_a_runc_failure_is_a_start_error_and_runc_forgets_the_container() {
    let why = "runc run failed: exec: \"nope\": executable file not found in $PATH";
    let b = bed(Scenario::Handshake(format!("err {why}")));
    let Err(exit) = b.rt.start(&b.prepared, &b.spec()).await else {
        panic!("a failed handshake started");
    };
    assert_eq!(
        (exit.reason, exit.message.as_str()),
        (TerminationReason::StartError, why)
    );
    let calls = b.fake.take_calls();
    assert_eq!(
        &calls[1..],
        [
            format!("shim {ID}"),
            format!("unmount {ID}/bundle/rootfs"),
            format!("runc delete {ID}"),
        ]
    );
    assert!(!b.container_dir().exists());
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_once_the_grace_period_is_over() {
    let b = bed(Scenario::Runs { obeys_term: false });
    let mut run = b.rt.start(&b.prepared, &b.spec()).await.unwrap();
    b.fake.take_calls();
    // The grace period passes on virtual time.
    tokio::time::pause();
    let exit = run.stop(Duration::from_secs(30)).await;
    assert_eq!(
        b.fake.take_calls(),
        vec![
            format!("signal {INIT_PID} {:?}", Signal::TERM),
            format!("signal {INIT_PID} {:?}", Signal::KILL),
        ]
    );
    assert_eq!((exit.code, exit.reason), (137, TerminationReason::Stopped));
}

#[tokio::test]
async fn a_container_that_obeys_sigterm_gets_no_sigkill() {
    let b = bed(Scenario::Runs { obeys_term: true });
    let mut run = b.rt.start(&b.prepared, &b.spec()).await.unwrap();
    b.fake.take_calls();
    let exit = run.stop(Duration::from_secs(600)).await;
    assert_eq!(
        b.fake.take_calls(),
        vec![format!("signal {INIT_PID} {:?}", Signal::TERM)]
    );
    assert_eq!((exit.code, exit.reason), (143, TerminationReason::Stopped));
}

#[tokio::test]
async fn a_restarted_agent_readopts_live_shims_and_learns_how_the_others_ended() {
    let b = bed(Scenario::Exits(0));
    let dir = b.container_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let state = ShimState {
        shim_pid: 777,
        pid: 778,
        started_ms: 5,
        restarts: 2,
    };
    shim::write_json(&dir, STATE_FILE, &state).unwrap();

    // Its shim is gone and left no exit (the machine rebooted).
    let Found::Exited { exit, restarts } = b.rt.find("pod1", "box") else {
        panic!("a vanished shim was re-adopted");
    };
    assert_eq!(restarts, 2);
    assert_eq!(exit.message, "the container's shim disappeared");

    // Its shim runs: re-adopted with its PIDs and restart count.
    b.fake.shims.lock().unwrap().insert(777);
    let Found::Running(mut run) = b.rt.find("pod1", "box") else {
        panic!("a live shim was not re-adopted");
    };
    assert_eq!((run.pid, run.shim_pid, run.restarts), (778, 777, 2));
    // It ends: the exit file, then the shim goes.
    let exit = ShimExit {
        code: 0,
        signal: None,
        oom_killed: false,
        start_error: String::new(),
        finished_ms: 9,
    };
    shim::write_json(&dir, EXIT_FILE, &exit).unwrap();
    b.fake.shims.lock().unwrap().remove(&777);
    tokio::time::pause();
    assert_eq!(run.wait().await.reason, TerminationReason::Completed);

    // Found again later: it ended while the agent was away.
    let Found::Exited { exit, .. } = b.rt.find("pod1", "box") else {
        panic!("an ended container counted as running");
    };
    assert_eq!(exit.reason, TerminationReason::Completed);
    assert!(matches!(b.rt.find("pod2", "box"), Found::Nothing));
}

#[tokio::test]
async fn orphans_are_the_containers_of_pods_not_kept_by_exact_uid() {
    let b = bed(Scenario::Exits(0));
    let root = b.dir.path().join("containers");
    for id in ["keep-1-a", "keep-10-a", "gone-b"] {
        std::fs::create_dir_all(root.join(id)).unwrap();
    }
    b.rt.reap_orphans(&["keep-1".to_string()].into()).await;
    let mut left = b.rt.ids();
    left.sort();
    assert_eq!(left, vec!["keep-1-a".to_string()]);
}
