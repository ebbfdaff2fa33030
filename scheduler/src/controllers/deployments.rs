//! The deployment controller: keeps `replicas` current pods per Deployment,
//! replaces finished ones, recreates pods of an outdated template, collects
//! orphans.

use super::{DEPLOYMENT_LABEL, TEMPLATE_HASH_LABEL, log_err, pods};
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::manifest::digest_of;
use flotilla_api::{Deployment, EventType, Labels, Object, OwnerRef, Pod, PodPhase, PodStatus};
use std::collections::HashMap;

/// Hash of a pod template, to tell pods of an older template apart.
pub fn template_hash(d: &Deployment) -> String {
    let json = serde_json::to_vec(&d.spec.template).expect("templates serialize");
    digest_of(&json)[7..17].to_string()
}

pub(super) fn deployments(cluster: &Cluster) {
    let store = &cluster.store;
    let all = store.list("pods/");
    let mut owned: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for p in pods(&all) {
        if let Some(o) = &p.metadata.owner {
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

fn reconcile_deployment(cluster: &Cluster, obj: &Object, d: &Deployment, pods: Vec<&Pod>) {
    let store = &cluster.store;
    let hash = template_hash(d);
    let mut current = Vec::new();
    for p in pods {
        let key = pod_key(p);
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
                store.delete(&key, Some(p.metadata.resource_version)),
            );
        } else if p.metadata.labels.get(TEMPLATE_HASH_LABEL) != Some(&hash) {
            log_err(
                "deleting outdated pod",
                store.delete(&key, Some(p.metadata.resource_version)),
            );
        } else {
            current.push(p);
        }
    }
    let want = d.spec.replicas as usize;
    if current.len() > want {
        // Remove the least advanced, then the newest.
        current.sort_by_key(|p| {
            let rank = match p.status.phase {
                PodPhase::Pending => 0,
                PodPhase::Scheduled => 1,
                _ => 2,
            };
            (rank, std::cmp::Reverse(p.metadata.created_ms))
        });
        for p in current.drain(..current.len() - want) {
            log_err(
                "scaling down",
                store.delete(&pod_key(p), Some(p.metadata.resource_version)),
            );
        }
    }
    // The missing replicas in one store transaction.
    let new: Vec<(Object, Expect)> = (current.len()..want)
        .map(|_| (Object::Pod(new_pod(d, &hash)), Expect::Absent))
        .collect();
    let created = new.len();
    for r in store.put_many(new, WriteDurability::Lazy) {
        match r {
            Ok(pod) => cluster.event(
                obj,
                EventType::Normal,
                "CreatedPod",
                format!("created pod {}", pod.meta().name),
            ),
            Err(e) => tracing::warn!("creating pod for {}: {e}", d.metadata.name),
        }
    }
    let ready = current
        .iter()
        .filter(|p| p.status.phase == PodPhase::Running)
        .count() as u32;
    let status = flotilla_api::DeploymentStatus {
        replicas: (current.len() + created) as u32,
        ready,
        observed_generation: d.metadata.generation,
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

fn new_pod(d: &Deployment, hash: &str) -> Pod {
    let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_string();
    let mut labels: Labels = d.spec.template.labels.clone();
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
        spec: d.spec.template.spec.clone(),
        status: PodStatus::default(),
    }
}
