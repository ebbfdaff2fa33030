//! Issue 16 item 5: Jobs run to completion — a diamond of `after` lists
//! runs in order, `parallelism` bounds the pods running at once, a failing
//! Job fails the ones after it, a cycle or an unknown name is refused at
//! apply with the names, and a scheduled Job runs at its times (every two
//! seconds, `Forbid`: never two runs at once).

mod common;

use common::{Up, wait_until};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);
const CRASHER: &str = flotilla_samples::CRASHER_P1;

/// A Job running the crasher: exits `code` after `delay_ms`.
fn job(name: &str, extra: &str, code: u32, delay_ms: u32) -> String {
    format!(
        "kind = \"Job\"\nname = \"{name}\"\n{extra}\n[template]\n[[template.members]]\nname = \"main\"\nwasm = \"{CRASHER}\"\nenv = {{ EXIT_CODE = \"{code}\", DELAY_MS = \"{delay_ms}\" }}\n"
    )
}

fn get_job(up: &Up, name: &str) -> serde_json::Value {
    serde_json::from_str(&up.ok(&["get", "job", name, "-o", "json"])).unwrap()
}

fn phase(up: &Up, name: &str) -> String {
    get_job(up, name)["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `(started, finished)` ms of each pod of job `name`.
fn runs(up: &Up, name: &str) -> Vec<(u64, u64)> {
    let pods: Vec<serde_json::Value> = serde_json::from_str(&up.ok(&[
        "get",
        "pods",
        "-l",
        &format!("flotilla.dev/job={name}"),
        "-o",
        "json",
    ]))
    .unwrap();
    pods.iter()
        .map(|p| {
            let st = &p["status"];
            (
                st["started_ms"].as_u64().unwrap_or(0),
                st["members"][0]["state"]["Terminated"]["finished_ms"]
                    .as_u64()
                    .unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// The most intervals covering one instant.
fn most_at_once(runs: &[(u64, u64)]) -> usize {
    runs.iter()
        .map(|&(s, _)| runs.iter().filter(|&&(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_diamond_of_jobs_runs_in_order_with_parallelism_and_failures_stop_dependants() {
    let up = Up::start();
    // Written out of order: the file order does not matter.
    let diamond = [
        job("d", "after = [\"b\", \"c\"]", 0, 200),
        job("b", "after = [\"a\"]", 0, 300),
        job(
            "c",
            "after = [\"a\"]\ncompletions = 4\nparallelism = 2",
            0,
            500,
        ),
        job("a", "", 0, 300),
    ]
    .join("---\n");
    let f = up.manifest("diamond.toml", &diamond);
    up.ok(&["apply", "-f", &f]);
    // d waits, naming what for.
    let d = get_job(&up, "d");
    assert!(
        d["status"]["phase"] == "Waiting" || d["status"]["phase"] == serde_json::Value::Null,
        "{d}"
    );
    wait_until(LONG, "d to succeed", || phase(&up, "d") == "Succeeded");
    let finished = |v: &[(u64, u64)]| v.iter().map(|r| r.1).max().unwrap();
    let started = |v: &[(u64, u64)]| v.iter().map(|r| r.0).min().unwrap();
    let (a, b, c, dd) = (
        runs(&up, "a"),
        runs(&up, "b"),
        runs(&up, "c"),
        runs(&up, "d"),
    );
    assert_eq!((a.len(), b.len(), c.len(), dd.len()), (1, 1, 4, 1));
    assert!(
        started(&b) >= finished(&a) && started(&c) >= finished(&a),
        "{a:?} {b:?} {c:?}"
    );
    assert!(
        started(&dd) >= finished(&b).max(finished(&c)),
        "{b:?} {c:?} {dd:?}"
    );
    assert!(most_at_once(&c) <= 2, "parallelism 2: {c:?}");
    let cj = get_job(&up, "c");
    assert_eq!(
        (
            cj["status"]["succeeded"].as_u64(),
            cj["status"]["failed"].as_u64()
        ),
        (Some(4), Some(0))
    );
    let table = up.ok(&["get", "jobs"]);
    let row = table.lines().find(|l| l.starts_with("c ")).unwrap();
    assert!(
        row.contains("Succeeded") && row.contains("4/4") && row.contains(" a "),
        "{table}"
    );

    // A failing job (two failed pods: backoff_limit 1) fails its dependant,
    // which never runs a pod.
    let failing = [
        job("bad", "backoff_limit = 1", 1, 0),
        job("next", "after = [\"bad\"]", 0, 0),
    ]
    .join("---\n");
    let f = up.manifest("failing.toml", &failing);
    up.ok(&["apply", "-f", &f]);
    wait_until(LONG, "next to fail", || phase(&up, "next") == "Failed");
    let bad = get_job(&up, "bad");
    assert_eq!(bad["status"]["reason"], "BackoffLimitExceeded", "{bad}");
    assert_eq!(runs(&up, "bad").len(), 2);
    let next = get_job(&up, "next");
    assert_eq!(next["status"]["reason"], "DependencyFailed", "{next}");
    assert!(
        next["status"]["message"]
            .as_str()
            .unwrap()
            .contains("job bad, which it comes after, failed (BackoffLimitExceeded)"),
        "{next}"
    );
    assert!(runs(&up, "next").is_empty());

    // A cycle and an unknown name are refused, naming them; nothing is made.
    let cycle = [
        job("p", "after = [\"q\"]", 0, 0),
        job("q", "after = [\"p\"]", 0, 0),
    ]
    .join("---\n");
    let f = up.manifest("cycle.toml", &cycle);
    let out = up.cli(&["apply", "-f", &f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("make a cycle: p → q → p"),
        "{err}"
    );
    assert!(!up.cli(&["get", "job", "p"]).status.success());
    let f = up.manifest("unknown.toml", &job("r", "after = [\"nosuch\"]", 0, 0));
    let out = up.cli(&["apply", "-f", &f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job \"r\" comes after \"nosuch\""), "{err}");
}

#[test]
fn a_scheduled_job_runs_at_its_times_and_forbid_keeps_runs_apart() {
    let up = Up::start();
    // Every two seconds; each run takes three: with Forbid, every other
    // time is skipped and no two runs overlap.
    let f = up.manifest(
        "tick.toml",
        &job(
            "tick",
            "schedule = \"*/2 * * * * *\"\nconcurrency = \"Forbid\"",
            0,
            3000,
        ),
    );
    up.ok(&["apply", "-f", &f]);
    wait_until(LONG, "three runs to succeed", || {
        get_job(&up, "tick")["status"]["succeeded"].as_u64() >= Some(3)
    });
    let jobs: Vec<serde_json::Value> =
        serde_json::from_str(&up.ok(&["get", "jobs", "-o", "json"])).unwrap();
    let mut children: Vec<(String, u64)> = jobs
        .iter()
        .filter(|j| j["metadata"]["owner"]["name"] == "tick")
        .map(|j| {
            let name = j["metadata"]["name"].as_str().unwrap().to_string();
            let secs: u64 = name.strip_prefix("tick-").unwrap().parse().unwrap();
            (name, secs)
        })
        .collect();
    children.sort_by_key(|c| c.1);
    assert!(children.len() >= 3, "{children:?}");
    // On the schedule's times: even seconds.
    assert!(children.iter().all(|(_, s)| s % 2 == 0), "{children:?}");
    let mut all = Vec::new();
    for (name, _) in &children {
        all.extend(runs(&up, name));
    }
    assert!(most_at_once(&all) <= 1, "Forbid: runs apart: {all:?}");
    let events = up.ok(&["events"]);
    assert!(
        events.contains("SkippedRun") && events.contains("ScheduledRun"),
        "{events}"
    );
    let table = up.ok(&["get", "jobs"]);
    assert!(table.contains("Scheduled (*/2 * * * * *)"), "{table}");
    // Deleting the schedule takes its runs and their pods with it.
    up.ok(&["delete", "job", "tick"]);
    wait_until(LONG, "runs and pods to go", || {
        let left: Vec<serde_json::Value> =
            serde_json::from_str(&up.ok(&["get", "jobs", "-o", "json"])).unwrap();
        left.is_empty() && up.pods().is_empty()
    });
}

/// The limits that end Jobs: `active_deadline` fails a Job still running
/// (its pod stopped), `ttl_after_finished` removes a finished one, and a
/// schedule with `concurrency = "Replace"` ends the running run when the
/// next one is due.
#[test]
fn deadlines_ttls_and_replace_end_jobs_as_declared() {
    let up = Up::start();
    let all = [
        // Would run for ten minutes.
        job("slow", "active_deadline = 2", 0, 600_000),
        job("brief", "ttl_after_finished = 2", 0, 100),
        job(
            "rep",
            "schedule = \"*/3 * * * * *\"\nconcurrency = \"Replace\"",
            0,
            600_000,
        ),
    ]
    .join("---\n");
    let f = up.manifest("limits.toml", &all);
    up.ok(&["apply", "-f", &f]);

    wait_until(LONG, "slow failed by its deadline", || {
        phase(&up, "slow") == "Failed"
    });
    let st = get_job(&up, "slow")["status"].clone();
    assert_eq!(st["reason"], "DeadlineExceeded", "{st}");
    assert_eq!(
        st["message"], "still running after active_deadline 2s",
        "{st}"
    );
    wait_until(LONG, "slow's pod stopped", || runs(&up, "slow").is_empty());

    // brief succeeds, then goes two seconds later.
    wait_until(LONG, "brief removed after its ttl", || {
        !up.cli(&["get", "job", "brief"]).status.success()
    });
    let events = up.ok(&["events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("brief") && l.contains("Completed")),
        "{events}"
    );

    // Replace: each run due ends the one still going; so runs never
    // overlap for long and only the newest is alive.
    let children = || -> Vec<String> {
        let jobs: Vec<serde_json::Value> =
            serde_json::from_str(&up.ok(&["get", "jobs", "-o", "json"])).unwrap();
        jobs.iter()
            .filter(|j| j["metadata"]["owner"]["name"] == "rep")
            .map(|j| j["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut first = Vec::new();
    wait_until(LONG, "rep's first run", || {
        first = children();
        !first.is_empty()
    });
    wait_until(LONG, "rep's first run replaced by a later one", || {
        let now = children();
        now.len() == 1 && now[0] != first[0]
    });
    let events = up.ok(&["events"]);
    assert!(
        events
            .lines()
            .filter(|l| l.contains("ScheduledRun"))
            .count()
            >= 2,
        "{events}"
    );
    up.ok(&["delete", "job", "rep"]);
}
