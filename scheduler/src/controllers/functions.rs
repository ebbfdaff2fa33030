//! The functions controller: each Function is hosted by pods of a
//! Deployment it owns (same name; one member, the component served per
//! request — [`flotilla_api::function::FunctionSpec::member`]) behind a
//! Service it owns (same name, port 80 → the pods' port). So placement,
//! rolling updates (a new revision takes traffic only once ready, the old
//! pods drain), replacement when a node dies, Services and node ports are
//! the pods' machinery. Objects a Function owns go with it; a Deployment or
//! Service of the same name that it does not own is left alone, and the
//! Function's status says so.

use super::log_err;
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use flotilla_api::function::{FUNCTION_LABEL, Function, FunctionStatus, SERVICE_PORT};
use flotilla_api::object::key;
use flotilla_api::{
    Deployment, DeploymentSpec, Kind, Labels, Object, ObjectMeta, OwnerRef, PodSpec, PodTemplate,
    Protocol, Service, ServicePort, ServiceSpec,
};
use std::collections::HashSet;

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

fn labels(f: &Function) -> Labels {
    [(FUNCTION_LABEL.to_string(), f.metadata.name.clone())].into()
}

fn meta(f: &Function) -> ObjectMeta {
    ObjectMeta {
        name: f.metadata.name.clone(),
        namespace: f.metadata.namespace.clone(),
        labels: labels(f),
        owner: Some(owner(f)),
        ..Default::default()
    }
}

/// The pods' template a Function asks for now.
pub fn template(f: &Function) -> PodTemplate {
    PodTemplate {
        labels: labels(f),
        spec: PodSpec {
            members: vec![f.spec.member()],
            node_selector: f.spec.node_selector.clone(),
            // A function reads no service variables.
            service_links: false,
            ..Default::default()
        },
    }
}

fn service_spec(f: &Function) -> ServiceSpec {
    ServiceSpec {
        selector: labels(f),
        ports: vec![ServicePort {
            port: SERVICE_PORT,
            target_port: Some(f.spec.port),
            protocol: Protocol::Tcp,
            node_port: None,
            name: "http".into(),
        }],
        routes: f.spec.routes.clone(),
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
    let ns = &f.metadata.namespace;
    let name = &f.metadata.name;
    let mut status = FunctionStatus {
        observed_generation: f.metadata.generation,
        ..Default::default()
    };
    let want = template(f);
    let replicas = f.spec.instances();
    match store.get(&key(Kind::Deployment, ns, name)).as_deref() {
        None => {
            let d = Deployment {
                metadata: meta(f),
                spec: DeploymentSpec {
                    replicas,
                    template: want,
                    ..Default::default()
                },
                status: Default::default(),
            };
            log_err(
                "creating a function's deployment",
                store.put(Object::Deployment(d), Expect::Absent, WriteDurability::Sync),
            );
        }
        Some(Object::Deployment(d)) => match mine(f, Kind::Deployment, &d.metadata) {
            Err(why) => status.message = why,
            Ok(()) => {
                if d.spec.template != want || d.spec.replicas != replicas {
                    let mut nd = d.clone();
                    nd.spec.template = want;
                    nd.spec.replicas = replicas;
                    nd.metadata.generation += 1;
                    log_err(
                        "updating a function's deployment",
                        store.put(
                            Object::Deployment(nd),
                            Expect::Version(d.metadata.resource_version),
                            WriteDurability::Sync,
                        ),
                    );
                }
                status.ready = d.status.ready;
                status.instances = d.status.replicas;
                status.revision = d.status.revision;
            }
        },
        Some(_) => {}
    }
    let svc = service_spec(f);
    match store.get(&key(Kind::Service, ns, name)).as_deref() {
        None => {
            let s = Service {
                metadata: meta(f),
                spec: svc,
                status: Default::default(),
            };
            log_err(
                "creating a function's service",
                store.put(Object::Service(s), Expect::Absent, WriteDurability::Sync),
            );
        }
        Some(Object::Service(s)) => match mine(f, Kind::Service, &s.metadata) {
            Err(why) => {
                if status.message.is_empty() {
                    status.message = why;
                }
            }
            Ok(()) if s.spec != svc => {
                let mut ns = s.clone();
                ns.spec = svc;
                ns.metadata.generation += 1;
                log_err(
                    "updating a function's service",
                    store.put(
                        Object::Service(ns),
                        Expect::Version(s.metadata.resource_version),
                        WriteDurability::Sync,
                    ),
                );
            }
            Ok(()) => {}
        },
        Some(_) => {}
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
