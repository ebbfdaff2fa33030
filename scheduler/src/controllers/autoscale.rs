//! The autoscale controller: at most once a second, for each Autoscaler,
//! what the target Deployment's running pods use (the agents' figures,
//! `crate::usage`) against its targets → a recommendation per target
//! (`flotilla_api::autoscale::recommend`), the highest of them, clamped
//! to `min..=max`, stabilised over the windows (`stabilise`; the recent
//! recommendations are kept in memory, as a restarted scheduler starts
//! its windows afresh) → the Deployment scaled, an event, and the
//! decision in the Autoscaler's status.

use super::log_err;
use crate::api::{PodTop, pod_figures_of, scale_blocking};
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::autoscale::{
    Autoscaler, AutoscalerStatus, Decision, METRIC_CPU, recommend, stabilise,
};
use flotilla_api::time::now_ms;
use flotilla_api::{EventType, Kind, Object, Pod, PodPhase};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often autoscalers are evaluated (figures arrive at the agents'
/// `--metrics-interval`, 15 s by default).
const EVERY: Duration = Duration::from_secs(1);

pub(super) fn autoscale(cluster: &Cluster) {
    let all = cluster.store.list("autoscalers/");
    if all.is_empty() {
        return;
    }
    {
        let mut state = cluster.autoscale.lock().expect("poisoned");
        if state.0.is_some_and(|at| at.elapsed() < EVERY) {
            return;
        }
        state.0 = Some(Instant::now());
        // Forget autoscalers that are gone.
        let live: std::collections::HashSet<&str> =
            all.iter().map(|o| o.meta().uid.as_str()).collect();
        state.1.retain(|uid, _| live.contains(uid.as_str()));
    }
    // Pods listed once, for the figures and for every autoscaler.
    let listed = cluster.store.list("pods/");
    let figures = pod_figures_of(cluster, &listed, None);
    let by_pod: HashMap<(&str, &str), &PodTop> = figures
        .iter()
        .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
        .collect();
    for obj in &all {
        if let Object::Autoscaler(a) = &**obj {
            one(cluster, obj, a, &listed, &by_pod);
        }
    }
}

/// What the measured pods use, summed.
#[derive(Debug, Default)]
struct Measured {
    pods: u32,
    cpu_used: u64,
    cpu_requested: u64,
    memory: u64,
    metric: u64,
}

fn measure(a: &Autoscaler, pods: &[&Pod], by_pod: &HashMap<(&str, &str), &PodTop>) -> Measured {
    let mut m = Measured::default();
    for p in pods {
        let Some(top) = by_pod.get(&(p.metadata.namespace.as_str(), p.metadata.name.as_str()))
        else {
            continue;
        };
        // A pod counts once it has a rate (two samples of its run).
        let Some(cpu) = top.cpu_millis else { continue };
        m.pods += 1;
        m.cpu_used += cpu;
        m.cpu_requested += p
            .spec
            .members
            .iter()
            .map(|x| u64::from(x.resources.cpu))
            .sum::<u64>();
        m.memory += top.memory_bytes;
        if let Some(t) = &a.spec.metric {
            for member in top
                .members
                .iter()
                .filter(|x| t.member.as_ref().is_none_or(|want| *want == x.name))
            {
                m.metric += if t.name == METRIC_CPU {
                    member.cpu_millis.unwrap_or(0)
                } else {
                    member.memory_bytes
                };
            }
        }
    }
    m
}

fn one(
    cluster: &Cluster,
    obj: &Object,
    a: &Autoscaler,
    listed: &[std::sync::Arc<Object>],
    by_pod: &HashMap<(&str, &str), &PodTop>,
) {
    let ns = &a.metadata.namespace;
    let now = now_ms();
    let mut status = AutoscalerStatus {
        last_decision: a.status.last_decision.clone(),
        decisions: a.status.decisions,
        ..Default::default()
    };
    let target_key = flotilla_api::object::key(Kind::Deployment, ns, &a.spec.target);
    let Some(dobj) = cluster.store.get(&target_key) else {
        status.message = format!("deployment {} not found", a.spec.target);
        write_status(cluster, a, status);
        return;
    };
    let Object::Deployment(d) = &*dobj else {
        return;
    };
    let current = d.spec.replicas;
    status.current_replicas = current;
    let pods: Vec<&Pod> = super::pods(listed)
        .filter(|p| {
            p.metadata.namespace == *ns
                && p.metadata
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.uid == d.metadata.uid)
                && p.status.phase == PodPhase::Running
        })
        .collect();
    let m = measure(a, &pods, by_pod);
    // Each target's recommendation, with the words for a decision.
    let mut recs: Vec<(u32, String)> = Vec::new();
    if m.pods > 0 {
        if let Some(target) = a.spec.cpu {
            if m.cpu_requested == 0 {
                status.message = format!(
                    "a cpu target needs the members of deployment {} to request cpu (resources.cpu)",
                    a.spec.target
                );
            } else {
                let util = m.cpu_used as f64 * 100.0 / m.cpu_requested as f64;
                status.cpu = Some(util.round() as u32);
                recs.push((
                    recommend(current, m.pods, util, f64::from(target)),
                    format!("cpu {util:.0}% of requests (target {target}%)"),
                ));
            }
        }
        if let Some(target) = a.spec.memory {
            let avg = m.memory / u64::from(m.pods);
            status.memory = Some(avg);
            recs.push((
                recommend(current, m.pods, avg as f64, target.0 as f64),
                format!(
                    "memory {} per pod (target {})",
                    flotilla_api::quantity::Bytes(avg).human(),
                    target.human()
                ),
            ));
        }
        if let Some(t) = &a.spec.metric {
            let avg = m.metric / u64::from(m.pods);
            status.metric = Some(avg);
            recs.push((
                recommend(current, m.pods, avg as f64, t.average.0 as f64),
                format!("{} {avg} per pod (target {})", t.name, t.average.0),
            ));
        }
    } else {
        status.message = format!(
            "waiting for figures from the pods of deployment {}",
            a.spec.target
        );
    }
    let (rec, why) = recs
        .into_iter()
        .max_by_key(|(r, _)| *r)
        .unwrap_or((current, String::new()));
    let rec = rec.clamp(a.spec.min, a.spec.max);
    let wanted = {
        let mut state = cluster.autoscale.lock().expect("poisoned");
        let history = state.1.entry(a.metadata.uid.clone()).or_default();
        history.push((now, rec));
        let keep = a.spec.scale_up_window.0.max(a.spec.scale_down_window.0);
        history.retain(|(at, _)| now.saturating_sub(*at) <= keep);
        stabilise(
            current,
            history,
            now,
            a.spec.scale_up_window,
            a.spec.scale_down_window,
        )
        .clamp(a.spec.min, a.spec.max)
    };
    status.desired_replicas = wanted;
    if wanted != current {
        let reason = if why.is_empty() {
            format!("held within min {} and max {}", a.spec.min, a.spec.max)
        } else {
            format!("{why} over {} measured pod(s)", m.pods)
        };
        match scale_blocking(cluster, ns, &a.spec.target, wanted) {
            Ok(_) => {
                cluster.event(
                    obj,
                    EventType::Normal,
                    "Scaled",
                    format!(
                        "deployment/{}: {current} → {wanted}: {reason}",
                        a.spec.target
                    ),
                );
                status.current_replicas = wanted;
                status.decisions += 1;
                status.last_decision = Some(Decision {
                    at_ms: now,
                    from: current,
                    to: wanted,
                    reason,
                });
            }
            Err(e) => {
                status.message =
                    format!("cannot scale deployment {}: {}", a.spec.target, e.message);
                cluster.event(
                    obj,
                    EventType::Warning,
                    "ScaleFailed",
                    status.message.clone(),
                );
            }
        }
    }
    write_status(cluster, a, status);
}

fn write_status(cluster: &Cluster, a: &Autoscaler, status: AutoscalerStatus) {
    if status == a.status {
        return;
    }
    let mut na = a.clone();
    na.status = status;
    log_err(
        "autoscaler status",
        cluster.store.put(
            Object::Autoscaler(na),
            Expect::Version(a.metadata.resource_version),
            WriteDurability::Lazy,
        ),
    );
}
