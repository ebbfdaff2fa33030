//! The deployment controller: keeps `replicas` pods per Deployment,
//! replaces finished ones, rolls a changed template out revision by
//! revision (the steps are `rollout`'s), records the history and the
//! rollout's condition, and collects orphans.

use super::rollout::{self, Limits, Replica};
use super::{DEPLOYMENT_LABEL, TEMPLATE_HASH_LABEL, log_err, pods};
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::manifest::digest_of;
use flotilla_api::rollout::{REVISION_HISTORY, Revision, RolloutPhase, RolloutState, StrategyType};
use flotilla_api::time::now_ms;
use flotilla_api::{
    Deployment, DeploymentStatus, EventType, Labels, Object, OwnerRef, Pod, PodStatus, PodTemplate,
};
use std::collections::HashMap;

/// Hash of a pod template (and of a `rollout restart`), to tell pods of
/// one revision from another's.
pub fn template_hash(template: &PodTemplate, restarted_ms: u64) -> String {
    let mut json = serde_json::to_vec(template).expect("templates serialize");
    if restarted_ms != 0 {
        json.extend_from_slice(format!("\nrestarted {restarted_ms}").as_bytes());
    }
    digest_of(&json)[7..17].to_string()
}

pub(super) fn deployments(cluster: &Cluster) {
    let store = &cluster.store;
    let all = store.list("pods/");
    let mut owned: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for p in pods(&all) {
        if let Some(o) = &p.metadata.owner
            && o.kind == "Deployment"
        {
            owned.entry(o.uid.as_str()).or_default().push(p);
        }
    }
    for obj in store.list("deployments/") {
        let Object::Deployment(d) = &*obj else {
            continue;
        };
        let mine = owned.remove(d.metadata.uid.as_str()).unwrap_or_default();
        reconcile_deployment(cluster, &obj, d, mine);
    }
    // Pods whose owner is gone are garbage.
    for p in owned.into_values().flatten() {
        log_err(
            "collecting orphan",
            store.delete(&pod_key(p), Some(p.metadata.resource_version)),
        );
    }
}

fn pod_key(p: &Pod) -> String {
    flotilla_api::object::key(
        flotilla_api::Kind::Pod,
        &p.metadata.namespace,
        &p.metadata.name,
    )
}

/// The revision pods are made of now, and the history with it: a template
/// not yet in the history becomes the newest revision (one already there,
/// e.g. after `rollout undo`, is renumbered as the newest); while paused,
/// the newest recorded revision stays current.
fn current_revision(d: &Deployment, now: u64) -> (Vec<Revision>, bool) {
    let mut revs = d.status.revisions.clone();
    let hash = template_hash(&d.spec.template, d.spec.restarted_ms);
    if d.spec.paused && !revs.is_empty() {
        return (revs, false);
    }
    if revs.last().is_some_and(|r| r.hash == hash) {
        return (revs, false);
    }
    let number = revs.iter().map(|r| r.number).max().unwrap_or(0) + 1;
    revs.retain(|r| r.hash != hash);
    revs.push(Revision {
        number,
        hash,
        template: d.spec.template.clone(),
        restarted_ms: d.spec.restarted_ms,
        created_ms: now,
    });
    if revs.len() > REVISION_HISTORY {
        revs.drain(..revs.len() - REVISION_HISTORY);
    }
    (revs, true)
}

fn reconcile_deployment(cluster: &Cluster, obj: &Object, d: &Deployment, pods: Vec<&Pod>) {
    let store = &cluster.store;
    let now = now_ms();
    let (revisions, started) = current_revision(d, now);
    let current = revisions.last().expect("a current revision");
    let mut new: Vec<&Pod> = Vec::new();
    let mut old: Vec<&Pod> = Vec::new();
    for p in pods {
        if p.status.phase.is_terminal() {
            cluster.event(
                obj,
                EventType::Normal,
                "ReplacingPod",
                format!(
                    "pod {} ended {} ({}); replacing it",
                    p.metadata.name, p.status.phase, p.status.reason
                ),
            );
            log_err(
                "deleting finished pod",
                store.delete(&pod_key(p), Some(p.metadata.resource_version)),
            );
        } else if p.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(&current.hash) {
            new.push(p);
        } else {
            old.push(p);
        }
    }
    let (surge, unavailable) = d.spec.strategy.limits(d.spec.replicas);
    let limits = Limits {
        replicas: d.spec.replicas,
        surge,
        unavailable,
    };
    let prev = &d.status.rollout;
    let halted = !started && prev.phase == RolloutPhase::Halted;
    let replicas = |v: &[&Pod]| v.iter().map(|p| Replica::of(p)).collect::<Vec<_>>();
    let (new_r, old_r) = (replicas(&new), replicas(&old));
    let plan = if d.spec.paused || halted {
        rollout::hold(&limits, &new_r, &old_r)
    } else if d.spec.strategy.kind == StrategyType::Recreate {
        rollout::recreate(&limits, &new_r, &old_r)
    } else {
        rollout::rolling(&limits, &new_r, &old_r)
    };
    let removed_old = plan.remove_old.len();
    for (i, what) in plan
        .remove_new
        .iter()
        .map(|&i| (new[i], "scaling down"))
        .chain(
            plan.remove_old
                .iter()
                .map(|&i| (old[i], "replacing an older revision")),
        )
    {
        log_err(
            what,
            store.delete(&pod_key(i), Some(i.metadata.resource_version)),
        );
    }
    let gone_new: std::collections::HashSet<usize> = plan.remove_new.iter().copied().collect();
    let gone_old: std::collections::HashSet<usize> = plan.remove_old.iter().copied().collect();
    let new: Vec<&Pod> = new
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| (!gone_new.contains(&i)).then_some(p))
        .collect();
    let old: Vec<&Pod> = old
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| (!gone_old.contains(&i)).then_some(p))
        .collect();
    // The missing pods in one store transaction.
    let made: Vec<(Object, Expect)> = (0..plan.create)
        .map(|_| {
            (
                Object::Pod(new_pod(d, &current.template, &current.hash)),
                Expect::Absent,
            )
        })
        .collect();
    let mut created = 0;
    for r in store.put_many(made, WriteDurability::Lazy) {
        match r {
            Ok(_) => created += 1,
            Err(e) => tracing::warn!("creating pod for {}: {e}", d.metadata.name),
        }
    }
    if created > 0 || removed_old > 0 {
        let mut what = Vec::new();
        if created > 0 {
            what.push(format!("made {created} pod(s)"));
        }
        if removed_old > 0 {
            what.push(format!("removed {removed_old} of older revisions"));
        }
        cluster.event(
            obj,
            EventType::Normal,
            "ScalingRevision",
            format!("revision {}: {}", current.number, what.join(", ")),
        );
    }
    let updated_ready = new.iter().filter(|p| p.is_ready()).count() as u32;
    let ready = updated_ready + old.iter().filter(|p| p.is_ready()).count() as u32;
    let updated = new.len() as u32 + created;
    let replicas_now = updated + old.len() as u32;
    let rollout = next_state(
        d,
        Observed {
            started,
            updated,
            updated_ready,
            old: old.len() as u32,
            replicas: replicas_now,
        },
        now,
        || {
            new.iter()
                .find(|p| !p.is_ready())
                .map(|p| rollout::why_unready(p))
                .unwrap_or_else(|| format!("{} older pod(s) left", old.len()))
        },
    );
    if rollout.phase != prev.phase && !started {
        let (kind, reason) = match rollout.phase {
            RolloutPhase::Halted => (EventType::Warning, "RolloutHalted"),
            RolloutPhase::Complete => (EventType::Normal, "RolloutComplete"),
            RolloutPhase::Paused => (EventType::Normal, "RolloutPaused"),
            RolloutPhase::Progressing => (EventType::Normal, "RolloutResumed"),
        };
        cluster.event(obj, kind, reason, rollout.message.clone());
    } else if started && d.status.revision != 0 {
        cluster.event(
            obj,
            EventType::Normal,
            "RolloutStarted",
            format!(
                "revision {} (template {}) replaces revision {}",
                current.number, current.hash, d.status.revision
            ),
        );
    }
    let status = DeploymentStatus {
        replicas: replicas_now,
        ready,
        observed_generation: d.metadata.generation,
        updated,
        updated_ready,
        revision: current.number,
        revisions: revisions.clone(),
        rollout,
    };
    if status != d.status {
        let mut nd = d.clone();
        nd.status = status;
        log_err(
            "deployment status",
            store.put(
                Object::Deployment(nd),
                Expect::Version(d.metadata.resource_version),
                WriteDurability::Lazy,
            ),
        );
    }
}

/// The counts a pass leaves behind.
struct Observed {
    /// A new revision started in this pass.
    started: bool,
    updated: u32,
    updated_ready: u32,
    old: u32,
    replicas: u32,
}

/// The rollout's condition after a pass: `Complete` when every pod is of
/// the current revision and ready; `Paused` while paused; `Halted` when no
/// progress was made within the deadline (and it stays so until a new
/// revision or `rollout resume`); otherwise `Progressing`.
fn next_state(
    d: &Deployment,
    o: Observed,
    now: u64,
    cause: impl FnOnce() -> String,
) -> RolloutState {
    let prev = &d.status.rollout;
    let want = d.spec.replicas;
    let moved = o.started
        || prev.phase != RolloutPhase::Progressing
        || o.updated_ready > d.status.updated_ready
        || o.updated > d.status.updated
        || o.old < d.status.replicas.saturating_sub(d.status.updated);
    // The deadline counts while progressing, from the last move.
    let progress_ms = if moved { now } else { prev.progress_ms };
    let (phase, message) = if d.spec.paused {
        (
            RolloutPhase::Paused,
            format!("paused; {} of {want} pods updated", o.updated),
        )
    } else if o.updated == want && o.updated_ready == want && o.old == 0 && o.replicas == want {
        (
            RolloutPhase::Complete,
            format!("{want} of {want} pods updated and ready"),
        )
    } else if prev.phase == RolloutPhase::Halted && !o.started {
        (RolloutPhase::Halted, prev.message.clone())
    } else if !moved && now.saturating_sub(progress_ms) > d.spec.progress_deadline.0 {
        (
            RolloutPhase::Halted,
            format!(
                "no progress for {} (progress_deadline): {} of {want} updated pods ready; {}",
                d.spec.progress_deadline,
                o.updated_ready,
                cause()
            ),
        )
    } else {
        (
            RolloutPhase::Progressing,
            format!(
                "{} of {want} updated pods ready, {} older pod(s) left",
                o.updated_ready, o.old
            ),
        )
    };
    let since_ms = if phase == prev.phase && !o.started {
        prev.since_ms
    } else {
        now
    };
    // Only a rollout in progress keeps its clock (a settled one is not
    // rewritten on every pass).
    let progress_ms = if phase == RolloutPhase::Progressing {
        progress_ms
    } else {
        prev.progress_ms
    };
    RolloutState {
        phase,
        message,
        since_ms,
        progress_ms,
    }
}

fn new_pod(d: &Deployment, template: &PodTemplate, hash: &str) -> Pod {
    let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_string();
    let mut labels: Labels = template.labels.clone();
    labels.insert(DEPLOYMENT_LABEL.into(), d.metadata.name.clone());
    labels.insert(TEMPLATE_HASH_LABEL.into(), hash.to_string());
    Pod {
        metadata: flotilla_api::ObjectMeta {
            name: format!("{}-{suffix}", d.metadata.name),
            namespace: d.metadata.namespace.clone(),
            labels,
            owner: Some(OwnerRef {
                kind: "Deployment".into(),
                name: d.metadata.name.clone(),
                uid: d.metadata.uid.clone(),
            }),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: PodStatus::default(),
    }
}
