//! Pods: immutable once created (only labels change); the status is the
//! scheduler's and the agents'; members are checked by the shared pure
//! check and their uploaded modules must be in the content store.

use super::{Checks, KindRules, Update};
use flotilla_api::meta::check_dns_label;
use flotilla_api::object::validate_member;
use flotilla_api::{Kind, MemberSource, Object, PodSpec};

pub struct Pods;

/// Checks a pod spec (a pod's, or a Deployment's template).
pub fn validate_spec(spec: &PodSpec, cx: &Checks<'_>) -> Result<(), String> {
    if spec.members.is_empty() {
        return Err("a pod needs at least one member".into());
    }
    let mut names = std::collections::HashSet::new();
    for m in &spec.members {
        check_dns_label(&m.name).map_err(|w| format!("member name '{}' {w}", m.name))?;
        if !names.insert(&m.name) {
            return Err(format!("two members are named '{}'", m.name));
        }
        validate_member(m).map_err(|e| format!("member {}: {e}", m.name))?;
        if let MemberSource::Module { digest, size } = &m.source {
            crate::blobs::check_uploaded(cx.blobs, digest, *size)
                .map_err(|e| format!("member {}: {e}", m.name))?;
            // A `health` probe calls an export the module must have.
            if let Some((kind, _)) = m.probes().find(|(_, p)| p.calls_health()) {
                crate::blobs::check_health_export(cx.blobs, digest)
                    .map_err(|e| format!("member {}: {kind} probe: {e}", m.name))?;
            }
        }
    }
    flotilla_api::config::validate_pod(spec)
}

impl KindRules for Pods {
    fn kind(&self) -> Kind {
        Kind::Pod
    }

    fn validate(&self, obj: &Object, cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::Pod(p) => validate_spec(&p.spec, cx),
            _ => Ok(()),
        }
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Pod(p) = obj {
            p.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Pod(cur), Object::Pod(new)) = (current, new) else {
            return Err("not a pod".into());
        };
        if cur.spec != new.spec {
            return Err(format!(
                "pod {ns}/{n} already exists with a different spec, and pods are immutable: only labels can change; delete it first (flotilla delete pod {n} -n {ns}) or run it from a Deployment, which replaces its pods",
                ns = cur.metadata.namespace,
                n = cur.metadata.name,
            ));
        }
        if cur.metadata.labels == new.metadata.labels {
            return Ok(Update::Unchanged);
        }
        let mut p = cur.clone();
        p.metadata.labels = new.metadata.labels;
        Ok(Update::Write(Box::new(Object::Pod(p))))
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
