//! Issue 18: host interfaces for workloads through the real binary — the
//! `kv_counter` sample counting in a `wasi:keyvalue` bucket, configured
//! through `wasi:config` from a ConfigMap (a change seen while it runs),
//! logging through `wasi:logging` (`logs --level`); its count surviving a
//! pod restart and a restart of the node (and scheduler) process; `flotilla
//! kv`; a bucket's quota; a member that did not ask for an interface its
//! component imports refused with the reason.

mod common;

use common::{Up, wait_until};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

fn counter_pod(name: &str, ns: &str, wasi: &str) -> String {
    format!(
        "kind = \"Pod\"\nname = \"{name}\"\nnamespace = \"{ns}\"\n\n[[members]]\nname = \"counter\"\nwasm = \"{}\"\nrestart = \"Always\"\nwasi = {wasi}\n",
        flotilla_samples::KV_COUNTER_P2
    )
}

fn config_map(ns: &str, name: &str, data: &str) -> String {
    format!("kind = \"ConfigMap\"\nname = \"{name}\"\nnamespace = \"{ns}\"\ndata = {{ {data} }}\n")
}

/// The counts the member printed (`count=N step=S`), in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("count="))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

fn logs(up: &Up, args: &[&str]) -> String {
    let out = up.cli(&[&["logs"], args].concat());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stored_count(up: &Up, ns: &str) -> u64 {
    let v = up.ok(&["kv", "get", "counters", "count", "-n", ns]);
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {v:?}"))
}

#[test]
fn a_counter_keeps_its_state_in_a_bucket_across_restarts_and_follows_its_config() {
    let mut up = Up::start();
    let ns = "shop";
    let wasi = r#"{ config = ["counter-config"], keyvalue = ["counters"], logging = true }"#;
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "cm.toml",
            &config_map(ns, "counter-config", r#"interval_ms = "100", step = "1""#),
        ),
    ]);
    up.ok(&[
        "apply",
        "-f",
        &up.manifest("tally.toml", &counter_pod("tally", ns, wasi)),
    ]);
    wait_until(LONG, "the counter to count to 3", || {
        counts(&logs(&up, &["tally", "-n", ns])).contains(&3)
    });
    assert!(stored_count(&up, ns) >= 3);

    // The ConfigMap changes; the running member reads the new step.
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "cm.toml",
            &config_map(ns, "counter-config", r#"interval_ms = "100", step = "10""#),
        ),
    ]);
    wait_until(LONG, "the counter to step by 10", || {
        logs(&up, &["tally", "-n", ns]).contains(" step=10\n")
    });

    // wasi:logging lines, by level; the plain output is left out.
    let info = logs(&up, &["tally", "-n", ns, "--level", "info"]);
    assert!(
        info.lines().next() == Some("[INFO] counter: counting in bucket counters"),
        "{info}"
    );
    assert!(!info.contains("count="), "{info}");
    let debug = logs(&up, &["tally", "-n", ns, "--level", "debug"]);
    assert!(debug.contains("[DEBUG] counter: count="), "{debug}");
    assert!(logs(&up, &["tally", "-n", ns, "--level", "error"]).is_empty());

    // A pod restart: the new pod goes on from the stored count.
    up.ok(&["delete", "pod", "tally", "-n", ns]);
    wait_until(LONG, "the pod to be gone", || {
        !up.cli(&["get", "pod", "tally", "-n", ns]).status.success()
    });
    let before = stored_count(&up, ns);
    up.ok(&[
        "apply",
        "-f",
        &up.manifest("tally.toml", &counter_pod("tally", ns, wasi)),
    ]);
    wait_until(LONG, "the new pod to count", || {
        !counts(&logs(&up, &["tally", "-n", ns])).is_empty()
    });
    let first = counts(&logs(&up, &["tally", "-n", ns]))[0];
    assert_eq!(
        first,
        before + 10,
        "the new pod starts from the bucket's count"
    );

    // `flotilla kv put`: the member goes on from what a person stored.
    up.ok(&["kv", "put", "counters", "count", "1000", "-n", ns]);
    wait_until(LONG, "the counter to pass 1000", || {
        counts(&logs(&up, &["tally", "-n", ns]))
            .iter()
            .any(|&n| n > 1000)
    });

    // The whole node (and its scheduler) killed and started again: the
    // count survives, and the member goes on from it.
    up.kill9();
    let at_kill = stored_count_offline(&up);
    up.spawn();
    wait_until(LONG, "the counter to count after the restart", || {
        counts(&logs(&up, &["tally", "-n", ns]))
            .iter()
            .any(|&n| n > at_kill)
    });
    let list = up.ok(&["kv", "list", "counters", "-n", ns]);
    assert!(list.starts_with("KEY\ncount\n"), "{list}");
    assert!(list.contains("1 keys of at most 100000"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&up.ok(&["kv", "list", "counters", "-n", ns, "-o", "json"])).unwrap();
    assert_eq!(json["keys"], serde_json::json!(["count"]));
    // Another namespace's bucket of the same name is another bucket.
    let out = up.cli(&["kv", "get", "counters", "count"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no key \"count\""),
        "{out:?}"
    );
}

/// The count as the bucket file holds it, read while nothing runs (the
/// process was killed): what it acknowledged before dying.
fn stored_count_offline(up: &Up) -> u64 {
    let store = flotilla_scheduler::kv::KvStore::open(&up.data_dir().join("kv.redb")).unwrap();
    match store
        .run(
            "shop",
            "counters",
            flotilla_api::interfaces::KvOp::Get {
                key: "count".into(),
            },
            Default::default(),
        )
        .unwrap()
    {
        flotilla_api::interfaces::KvAnswer::Value(Some(v)) => {
            String::from_utf8(v).unwrap().parse().unwrap()
        }
        a => panic!("{a:?}"),
    }
}

#[test]
fn quotas_and_interfaces_not_asked_for() {
    let up = Up::start();
    // A member whose component imports wasi:config and wasi:logging but
    // asks only for a bucket: refused when it would start, saying why.
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "partial.toml",
            &counter_pod("partial", "default", r#"{ keyvalue = ["counters"] }"#),
        ),
    ]);
    wait_until(LONG, "the refusal in the pod's status", || {
        up.ok(&["get", "pod", "partial", "-o", "json"])
            .contains("which member \\\"counter\\\" does not ask for")
    });
    let v: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "pod", "partial", "-o", "json"])).unwrap();
    let text = v["status"].to_string();
    assert!(
        text.contains("the component imports wasi:") && text.contains("add wasi = {"),
        "{text}"
    );
    assert!(
        up.cli(&["kv", "get", "counters", "count"]).status.code() == Some(1),
        "it never ran, so it counted nothing"
    );

    // A namespace whose buckets may hold 5 keys: the counter's payloads
    // stop at the cap with the quota's message, and so does a person.
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "quota.toml",
            "kind = \"Quota\"\nname = \"small\"\nnamespace = \"tight\"\nbucket_keys = 5\n",
        ),
    ]);
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "cm.toml",
            &config_map(
                "tight",
                "fill",
                r#"interval_ms = "50", payload_bytes = "16""#,
            ),
        ),
    ]);
    up.ok(&[
        "apply",
        "-f",
        &up.manifest(
            "filler.toml",
            &counter_pod(
                "filler",
                "tight",
                r#"{ config = ["fill"], keyvalue = ["counters"], logging = true }"#,
            ),
        ),
    ]);
    let refused = "bucket \"counters\" is over its quota: 6 keys of at most 5";
    wait_until(LONG, "a payload refused over the quota", || {
        logs(&up, &["filler", "-n", "tight"]).contains(refused)
    });
    let errors = logs(&up, &["filler", "-n", "tight", "--level", "error"]);
    assert!(errors.contains("[ERROR] counter: payload/"), "{errors}");
    let list = up.ok(&["kv", "list", "counters", "-n", "tight"]);
    assert!(list.contains("5 keys of at most 5"), "{list}");
    let out = up.cli(&["kv", "put", "counters", "one-more", "x", "-n", "tight"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(refused),
        "{out:?}"
    );
    // The counter itself goes on: its one key only changes.
    let n = stored_count(&up, "tight");
    wait_until(LONG, "the count to move on at the cap", || {
        stored_count(&up, "tight") > n
    });
}
