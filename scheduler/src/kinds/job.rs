//! Jobs: the spec and labels are the client's (the template is checked as
//! a Deployment's is); the status is the jobs controller's. The graph of
//! `after` lists is checked across a namespace's Jobs at apply
//! ([`check_after`]).

use super::{Checks, KindRules, Update, take_spec_and_labels};
use crate::cluster::Cluster;
use flotilla_api::job::Job;
use flotilla_api::{Kind, Object};
use std::collections::BTreeMap;

pub struct Jobs;

impl KindRules for Jobs {
    fn kind(&self) -> Kind {
        Kind::Job
    }

    fn validate(&self, obj: &Object, cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::Job(j) => {
                j.spec.validate()?;
                super::pod::validate_spec(&j.spec.template.spec, cx)
            }
            _ => Ok(()),
        }
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Job(j) = obj {
            j.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Job(cur), Object::Job(new)) = (current, new) else {
            return Err("not a job".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |j: &mut Job| &mut j.metadata,
            |a, b| a.spec == b.spec,
            |j, n| j.spec = n.spec,
            Object::Job,
        ))
    }

    fn wakes_controllers(&self) -> bool {
        true
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}

/// Checks the `after` lists of the Jobs in `objects` together with the
/// stored Jobs of their namespaces (the request's replace stored ones of
/// the same name): every name a Job, no cycle.
pub fn check_after(cluster: &Cluster, objects: &[Object]) -> Result<(), String> {
    let mut namespaces: BTreeMap<&str, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for o in objects {
        if let Object::Job(j) = o {
            namespaces.entry(&j.metadata.namespace).or_default();
        }
    }
    for (ns, graph) in namespaces.iter_mut() {
        for stored in cluster.store.list(&format!("jobs/{ns}/")) {
            if let Object::Job(j) = &*stored {
                graph.insert(j.metadata.name.clone(), j.spec.after.clone());
            }
        }
        for o in objects {
            if let Object::Job(j) = o
                && j.metadata.namespace == *ns
            {
                graph.insert(j.metadata.name.clone(), j.spec.after.clone());
            }
        }
        flotilla_api::job::check_graph(graph).map_err(|e| format!("namespace {ns}: {e}"))?;
    }
    Ok(())
}
