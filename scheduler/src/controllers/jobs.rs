//! The jobs controller. A Job runs pods of its template to completion:
//! once every Job in its `after` list succeeded (one failing fails it too),
//! at most `parallelism` at once, until `completions` succeeded, failing
//! after more than `backoff_limit` failed pods or past `active_deadline`;
//! a finished Job is removed `ttl_after_finished` later. A Job with a
//! `schedule` makes a Job of its own at each time the schedule fires (the
//! latest missed time only), as its `concurrency` allows, keeping the last
//! three finished runs. Pods and runs whose Job is gone are collected.

use super::{log_err, pods};
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::job::{Concurrency, Cron, Job, JobPhase, JobSpec, JobStatus};
use flotilla_api::time::now_ms;
use flotilla_api::{EventType, Labels, Object, ObjectMeta, OwnerRef, Pod, PodPhase, PodStatus};
use std::collections::HashMap;

/// Label naming the Job that owns a pod.
pub const JOB_LABEL: &str = "flotilla.dev/job";
/// Finished runs a schedule keeps.
const RUNS_KEPT: usize = 3;

pub(super) fn jobs(cluster: &Cluster) {
    let store = &cluster.store;
    let jobs = store.list("jobs/");
    let listed = store.list("pods/");
    let mut owned: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for p in pods(&listed) {
        if let Some(o) = &p.metadata.owner
            && o.kind == "Job"
        {
            owned.entry(o.uid.as_str()).or_default().push(p);
        }
    }
    let by_name: HashMap<(&str, &str), &Job> = jobs
        .iter()
        .filter_map(|o| match &**o {
            Object::Job(j) => Some(((j.metadata.namespace.as_str(), j.metadata.name.as_str()), j)),
            _ => None,
        })
        .collect();
    let mut runs: HashMap<&str, Vec<&Job>> = HashMap::new();
    for j in by_name.values() {
        if let Some(o) = &j.metadata.owner
            && o.kind == "Job"
        {
            runs.entry(o.uid.as_str()).or_default().push(j);
        }
    }
    for obj in &jobs {
        let Object::Job(j) = &**obj else { continue };
        let mine = owned.remove(j.metadata.uid.as_str()).unwrap_or_default();
        if j.spec.schedule.is_some() {
            let children = runs.remove(j.metadata.uid.as_str()).unwrap_or_default();
            schedule(cluster, obj, j, children);
        } else {
            run(cluster, obj, j, &mine, &by_name);
        }
    }
    // Pods and runs whose Job is gone.
    for p in owned.into_values().flatten() {
        log_err(
            "collecting a job's pod",
            store.delete(&p.metadata_key(), Some(p.metadata.resource_version)),
        );
    }
    for j in runs.into_values().flatten() {
        log_err(
            "collecting a scheduled run",
            store.delete(&key(j), Some(j.metadata.resource_version)),
        );
    }
}

trait Keyed {
    fn metadata_key(&self) -> String;
}

impl Keyed for Pod {
    fn metadata_key(&self) -> String {
        flotilla_api::object::key(
            flotilla_api::Kind::Pod,
            &self.metadata.namespace,
            &self.metadata.name,
        )
    }
}

fn key(j: &Job) -> String {
    flotilla_api::object::key(
        flotilla_api::Kind::Job,
        &j.metadata.namespace,
        &j.metadata.name,
    )
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..5].to_string()
}

fn new_pod(j: &Job) -> Pod {
    let mut labels: Labels = j.spec.template.labels.clone();
    labels.insert(JOB_LABEL.into(), j.metadata.name.clone());
    Pod {
        metadata: ObjectMeta {
            name: format!("{}-{}", j.metadata.name, suffix()),
            namespace: j.metadata.namespace.clone(),
            labels,
            owner: Some(OwnerRef {
                kind: "Job".into(),
                name: j.metadata.name.clone(),
                uid: j.metadata.uid.clone(),
            }),
            ..Default::default()
        },
        spec: j.spec.template.spec.clone(),
        status: PodStatus::default(),
    }
}

fn write_status(cluster: &Cluster, j: &Job, status: JobStatus) {
    if status == j.status {
        return;
    }
    let mut nj = j.clone();
    nj.status = status;
    log_err(
        "job status",
        cluster.store.put(
            Object::Job(nj),
            Expect::Version(j.metadata.resource_version),
            WriteDurability::Lazy,
        ),
    );
}

fn stop_pods(cluster: &Cluster, pods: &[&Pod]) {
    for p in pods.iter().filter(|p| !p.status.phase.is_terminal()) {
        log_err(
            "stopping a job's pod",
            cluster
                .store
                .delete(&p.metadata_key(), Some(p.metadata.resource_version)),
        );
    }
}

fn run(
    cluster: &Cluster,
    obj: &Object,
    j: &Job,
    pods: &[&Pod],
    jobs: &HashMap<(&str, &str), &Job>,
) {
    let now = now_ms();
    let mut st = j.status.clone();
    st.active = pods
        .iter()
        .filter(|p| !p.status.phase.is_terminal())
        .count() as u32;
    st.succeeded = pods
        .iter()
        .filter(|p| p.status.phase == PodPhase::Succeeded)
        .count() as u32;
    st.failed = pods
        .iter()
        .filter(|p| matches!(p.status.phase, PodPhase::Failed | PodPhase::Lost))
        .count() as u32;
    if st.phase.finished() {
        stop_pods(cluster, pods);
        if let Some(ttl) = j.spec.ttl_after_finished
            && now >= st.finished_ms + ttl.0
        {
            log_err(
                "removing a finished job",
                cluster
                    .store
                    .delete(&key(j), Some(j.metadata.resource_version)),
            );
            return;
        }
        write_status(cluster, j, st);
        return;
    }
    let finish = |st: &mut JobStatus, phase: JobPhase, reason: &str, message: String| {
        st.phase = phase;
        st.reason = reason.into();
        st.message = message;
        st.finished_ms = now;
    };
    // The Jobs it comes after.
    let mut waiting = Vec::new();
    for dep in &j.spec.after {
        match jobs.get(&(j.metadata.namespace.as_str(), dep.as_str())) {
            Some(d) if d.status.phase == JobPhase::Succeeded => {}
            Some(d) if d.status.phase == JobPhase::Failed => {
                finish(
                    &mut st,
                    JobPhase::Failed,
                    "DependencyFailed",
                    format!(
                        "job {dep}, which it comes after, failed ({})",
                        d.status.reason
                    ),
                );
                cluster.event(
                    obj,
                    EventType::Warning,
                    "DependencyFailed",
                    st.message.clone(),
                );
                write_status(cluster, j, st);
                return;
            }
            Some(_) => waiting.push(dep.as_str()),
            None => waiting.push(dep.as_str()),
        }
    }
    if !waiting.is_empty() {
        st.phase = JobPhase::Waiting;
        st.message = format!("waiting for job(s) {}", waiting.join(", "));
        write_status(cluster, j, st);
        return;
    }
    if st.phase != JobPhase::Running {
        st.phase = JobPhase::Running;
        st.message.clear();
        st.started_ms = now;
        cluster.event(obj, EventType::Normal, "Started", "running".into());
    }
    if st.succeeded >= j.spec.completions {
        let message = format!("{} of {} pods succeeded", st.succeeded, j.spec.completions);
        finish(&mut st, JobPhase::Succeeded, "", message);
        stop_pods(cluster, pods);
        cluster.event(obj, EventType::Normal, "Completed", st.message.clone());
    } else if st.failed > j.spec.backoff_limit {
        let message = format!(
            "{} pods failed (backoff_limit {})",
            st.failed, j.spec.backoff_limit
        );
        finish(&mut st, JobPhase::Failed, "BackoffLimitExceeded", message);
        stop_pods(cluster, pods);
        cluster.event(obj, EventType::Warning, "Failed", st.message.clone());
    } else if let Some(limit) = j.spec.active_deadline
        && now.saturating_sub(st.started_ms) > limit.0
    {
        finish(
            &mut st,
            JobPhase::Failed,
            "DeadlineExceeded",
            format!("still running after active_deadline {limit}"),
        );
        stop_pods(cluster, pods);
        cluster.event(obj, EventType::Warning, "Failed", st.message.clone());
    } else {
        let want = j.spec.parallelism.min(j.spec.completions - st.succeeded);
        let start = want.saturating_sub(st.active);
        let made: Vec<(Object, Expect)> = (0..start)
            .map(|_| (Object::Pod(new_pod(j)), Expect::Absent))
            .collect();
        for r in cluster.store.put_many(made, WriteDurability::Lazy) {
            match r {
                Ok(_) => st.active += 1,
                Err(e) => tracing::warn!("creating a pod for job {}: {e}", j.metadata.name),
            }
        }
    }
    write_status(cluster, j, st);
}

/// The latest time at or before `now` the schedule fired after `last`.
fn due(cron: &Cron, last: u64, now: u64) -> Option<u64> {
    let mut fire = cron.next_after(last).filter(|&t| t <= now)?;
    // Missed several (the scheduler was down): only the latest runs.
    for _ in 0..10_000 {
        match cron.next_after(fire) {
            Some(t) if t <= now => fire = t,
            _ => break,
        }
    }
    Some(fire)
}

fn schedule(cluster: &Cluster, obj: &Object, j: &Job, mut children: Vec<&Job>) {
    let now = now_ms();
    let mut st = j.status.clone();
    st.phase = JobPhase::Scheduled;
    let Some(text) = &j.spec.schedule else { return };
    let cron = match Cron::parse(text) {
        Ok(c) => c,
        Err(e) => {
            st.message = e;
            write_status(cluster, j, st);
            return;
        }
    };
    children.sort_by_key(|c| c.metadata.created_ms);
    let active: Vec<&Job> = children
        .iter()
        .copied()
        .filter(|c| !c.status.phase.finished())
        .collect();
    let last = if st.last_schedule_ms == 0 {
        j.metadata.created_ms
    } else {
        st.last_schedule_ms
    };
    if let Some(fire) = due(&cron, last, now) {
        st.last_schedule_ms = fire;
        let go = match j.spec.concurrency {
            Concurrency::Forbid if !active.is_empty() => {
                st.message = format!(
                    "skipped the run due at {}: run {} is still going (concurrency Forbid)",
                    flotilla_api::time::rfc3339(fire),
                    active[0].metadata.name
                );
                cluster.event(obj, EventType::Normal, "SkippedRun", st.message.clone());
                false
            }
            Concurrency::Replace => {
                for a in &active {
                    log_err(
                        "replacing a run",
                        cluster
                            .store
                            .delete(&key(a), Some(a.metadata.resource_version)),
                    );
                }
                true
            }
            _ => true,
        };
        if go {
            let run = Job {
                metadata: ObjectMeta {
                    name: format!("{}-{}", j.metadata.name, fire / 1000),
                    namespace: j.metadata.namespace.clone(),
                    labels: j.metadata.labels.clone(),
                    owner: Some(OwnerRef {
                        kind: "Job".into(),
                        name: j.metadata.name.clone(),
                        uid: j.metadata.uid.clone(),
                    }),
                    ..Default::default()
                },
                spec: JobSpec {
                    schedule: None,
                    after: Vec::new(),
                    ..j.spec.clone()
                },
                status: JobStatus::default(),
            };
            let name = run.metadata.name.clone();
            match cluster
                .store
                .put(Object::Job(run), Expect::Absent, WriteDurability::Lazy)
            {
                Ok(_) => {
                    st.message.clear();
                    cluster.event(
                        obj,
                        EventType::Normal,
                        "ScheduledRun",
                        format!("started job {name}"),
                    );
                }
                Err(e) => tracing::warn!("starting a run of {}: {e}", j.metadata.name),
            }
        }
    }
    // The newest finished runs are kept.
    let finished: Vec<&Job> = children
        .iter()
        .copied()
        .filter(|c| c.status.phase.finished())
        .collect();
    if finished.len() > RUNS_KEPT {
        for old in &finished[..finished.len() - RUNS_KEPT] {
            log_err(
                "dropping an old run",
                cluster
                    .store
                    .delete(&key(old), Some(old.metadata.resource_version)),
            );
        }
    }
    st.active = active.len() as u32;
    st.succeeded = finished
        .iter()
        .filter(|c| c.status.phase == JobPhase::Succeeded)
        .count() as u32;
    st.failed = finished
        .iter()
        .filter(|c| c.status.phase == JobPhase::Failed)
        .count() as u32;
    write_status(cluster, j, st);
}
