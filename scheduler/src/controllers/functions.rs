//! The functions controller: each Function is hosted by pods of a
//! Deployment it owns (same name; one member, the component served per
//! request — [`flotilla_api::function::FunctionSpec::member`]) behind a
//! Service it owns (same name, port 80 → the pods' port). So placement,
//! rolling updates (a new revision takes traffic only once ready, the old
//! pods drain), replacement when a node dies, Services and node ports are
//! the pods' machinery. A canary (`canary = { wasm, weight }`) is a second
//! Deployment and Service, `NAME-canary`, whose Service carries the same
//! routes with the canary's weight (the stable one's with the rest), so
//! every node's gateway splits each route's requests between the two.
//! Objects a Function owns go with it; a Deployment or
//! Service of the same name that it does not own is left alone, and the
//! Function's status says so.

use super::log_err;
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::function::{
    FUNCTION_LABEL, Function, FunctionStatus, Route, SERVICE_PORT, TRACK_LABEL, canary_name,
};
use flotilla_api::object::key;
use flotilla_api::{
    Deployment, DeploymentSpec, Kind, Labels, MemberSpec, Object, ObjectMeta, OwnerRef, PodSpec,
    PodTemplate, Protocol, Service, ServicePort, ServiceSpec,
};
use std::collections::HashSet;
use std::sync::Arc;

const OWNER_KIND: &str = "Function";

pub(super) fn functions(cluster: &Cluster) {
    let store = &cluster.store;
    let mut live: HashSet<String> = HashSet::new();
    for obj in store.list("functions/") {
        let Object::Function(f) = &*obj else {
            continue;
        };
        live.insert(f.metadata.uid.clone());
        reconcile(cluster, f);
    }
    // What a gone Function owned goes too (its pods with the Deployment).
    for prefix in ["deployments/", "services/"] {
        for obj in store.list(prefix) {
            let m = obj.meta();
            if let Some(o) = &m.owner
                && o.kind == OWNER_KIND
                && !live.contains(&o.uid)
            {
                log_err(
                    "collecting a gone function's object",
                    store.delete(&obj.key(), Some(m.resource_version)),
                );
            }
        }
    }
}

fn owner(f: &Function) -> OwnerRef {
    OwnerRef {
        kind: OWNER_KIND.into(),
        name: f.metadata.name.clone(),
        uid: f.metadata.uid.clone(),
    }
}

/// One revision a Function serves: the stable one (objects named as the
/// Function) or its canary (`NAME-canary`), with its share of the routes.
struct Track {
    object: String,
    label: &'static str,
    member: MemberSpec,
    weight: u32,
}

fn tracks(f: &Function) -> (Track, Option<Track>) {
    let canary_weight = f.spec.canary.as_ref().map_or(0, |c| c.weight);
    let stable = Track {
        object: f.metadata.name.clone(),
        label: "stable",
        member: f.spec.member(),
        weight: 100 - canary_weight,
    };
    let canary = f.spec.canary_member().map(|member| Track {
        object: canary_name(&f.metadata.name),
        label: "canary",
        member,
        weight: canary_weight,
    });
    (stable, canary)
}

fn labels(f: &Function, t: &Track) -> Labels {
    [
        (FUNCTION_LABEL.to_string(), f.metadata.name.clone()),
        (TRACK_LABEL.to_string(), t.label.to_string()),
    ]
    .into()
}

fn meta(f: &Function, t: &Track) -> ObjectMeta {
    ObjectMeta {
        name: t.object.clone(),
        namespace: f.metadata.namespace.clone(),
        labels: labels(f, t),
        owner: Some(owner(f)),
        ..Default::default()
    }
}

/// The pods' template of one of the Function's revisions.
fn template(f: &Function, t: &Track) -> PodTemplate {
    PodTemplate {
        labels: labels(f, t),
        spec: PodSpec {
            members: vec![t.member.clone()],
            node_selector: f.spec.node_selector.clone(),
            // A function reads no service variables.
            service_links: false,
            ..Default::default()
        },
    }
}

fn service_spec(f: &Function, t: &Track) -> ServiceSpec {
    ServiceSpec {
        selector: labels(f, t),
        ports: vec![ServicePort {
            port: SERVICE_PORT,
            target_port: Some(f.spec.port),
            protocol: Protocol::Tcp,
            node_port: None,
            name: "http".into(),
        }],
        routes: f
            .spec
            .routes
            .iter()
            .map(|r| Route {
                weight: t.weight,
                ..r.clone()
            })
            .collect(),
    }
}

/// Whether `m` is an object this Function owns; `Err` names who has it.
fn mine(f: &Function, kind: Kind, m: &ObjectMeta) -> Result<(), String> {
    match &m.owner {
        Some(o) if o.kind == OWNER_KIND && o.uid == f.metadata.uid => Ok(()),
        _ => Err(format!(
            "{} {} exists and is not this function's; rename one of them",
            kind.to_string().to_lowercase(),
            m.name
        )),
    }
}

fn reconcile(cluster: &Cluster, f: &Function) {
    let store = &cluster.store;
    let mut status = FunctionStatus {
        observed_generation: f.metadata.generation,
        ..Default::default()
    };
    let (stable, canary) = tracks(f);
    if let Some(d) = keep_track(cluster, f, &stable, &mut status.message) {
        status.ready += d.status.ready;
        status.instances += d.status.replicas;
        status.revision = d.status.revision;
    }
    match &canary {
        Some(t) => {
            if let Some(d) = keep_track(cluster, f, t, &mut status.message) {
                status.ready += d.status.ready;
                status.instances += d.status.replicas;
            }
        }
        None => {
            // A canary that is over: its objects go (only if ours).
            let name = canary_name(&f.metadata.name);
            for kind in [Kind::Deployment, Kind::Service] {
                let k = key(kind, &f.metadata.namespace, &name);
                if let Some(o) = store.get(&k)
                    && mine(f, kind, o.meta()).is_ok()
                {
                    log_err(
                        "removing a function's canary",
                        store.delete(&k, Some(o.meta().resource_version)),
                    );
                }
            }
        }
    }
    if status != f.status {
        let mut nf = f.clone();
        nf.status = status;
        log_err(
            "writing a function's status",
            store.put(
                Object::Function(nf),
                Expect::Version(f.metadata.resource_version),
                WriteDurability::Lazy,
            ),
        );
    }
}

/// Keeps one revision's Deployment and Service as the Function asks;
/// returns the Deployment as stored (when it is the Function's).
fn keep_track(
    cluster: &Cluster,
    f: &Function,
    t: &Track,
    message: &mut String,
) -> Option<Deployment> {
    let deployment = Object::Deployment(Deployment {
        metadata: meta(f, t),
        spec: DeploymentSpec {
            replicas: f.spec.instances(),
            template: template(f, t),
            ..Default::default()
        },
        status: Default::default(),
    });
    let service = Object::Service(Service {
        metadata: meta(f, t),
        spec: service_spec(f, t),
        status: Default::default(),
    });
    let stored = keep(cluster, f, deployment, message);
    keep(cluster, f, service, message);
    match stored.as_deref() {
        Some(Object::Deployment(d)) => Some(d.clone()),
        _ => None,
    }
}

/// Makes the stored object at `want`'s key `want` (its labels and what the
/// Function decides: a Deployment's replicas and template, a Service's
/// spec), creating it if absent; one the Function does not own is left
/// alone and named in `message`. Returns the object as stored, if ours.
fn keep(
    cluster: &Cluster,
    f: &Function,
    want: Object,
    message: &mut String,
) -> Option<Arc<Object>> {
    let store = &cluster.store;
    let kind = want.kind();
    let Some(cur) = store.get(&want.key()) else {
        log_err(
            "creating a function's object",
            store.put(want, Expect::Absent, WriteDurability::Sync),
        );
        return None;
    };
    if let Err(why) = mine(f, kind, cur.meta()) {
        if message.is_empty() {
            *message = why;
        }
        return None;
    }
    let mut next = (*cur).clone();
    match (&mut next, &want) {
        (Object::Deployment(n), Object::Deployment(w)) => {
            n.spec.replicas = w.spec.replicas;
            n.spec.template = w.spec.template.clone();
        }
        (Object::Service(n), Object::Service(w)) => n.spec = w.spec.clone(),
        _ => return None,
    }
    next.meta_mut().labels = want.meta().labels.clone();
    if next != *cur {
        next.meta_mut().generation += 1;
        log_err(
            "updating a function's object",
            store.put(
                next,
                Expect::Version(cur.meta().resource_version),
                WriteDurability::Sync,
            ),
        );
    }
    Some(cur)
}
