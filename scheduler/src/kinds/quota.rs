//! Quotas: set by admins (an edit role may read them, not write them);
//! no status. What they allow is checked at every write of a pod,
//! Deployment or other object of their namespace (`enforce`), under one
//! lock so that two writes cannot both take the last of a quota.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use crate::cluster::Cluster;
use flotilla_api::quota::{Claim, Quota, apply_defaults, check, claim_of};
use flotilla_api::{Kind, Object};

pub struct Quotas;

impl KindRules for Quotas {
    fn kind(&self) -> Kind {
        Kind::Quota
    }

    fn validate(&self, obj: &Object, _cx: &Checks<'_>) -> Result<(), String> {
        match obj {
            Object::Quota(q) => {
                if let (Some(d), Some(cap)) = (q.spec.default_memory, q.spec.memory)
                    && d.0 > cap.0
                {
                    return Err(format!(
                        "default_memory {d} is more than the quota's memory {cap}"
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Quota(cur), Object::Quota(new)) = (current, new) else {
            return Err("not a quota".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |q: &mut Quota| &mut q.metadata,
            |a, b| a.spec == b.spec,
            |q, n| q.spec = n.spec,
            Object::Quota,
        ))
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, false)
    }
}

/// The quotas of a namespace.
fn quotas_of(cluster: &Cluster, ns: &str) -> Vec<Quota> {
    cluster
        .store
        .list(&format!("{}/{ns}/", Kind::Quota.plural()))
        .iter()
        .filter_map(|o| match &**o {
            Object::Quota(q) => Some(q.clone()),
            _ => None,
        })
        .collect()
}

/// Fills in the namespace's default limits on `obj` (a pod or a
/// Deployment's template), then checks the namespace's quotas would hold
/// it: `Err` says which and by how much. The caller holds
/// `Cluster::quota_claims` until its write is done.
pub fn enforce(cluster: &Cluster, obj: &mut Object) -> Result<(), String> {
    let kind = obj.kind();
    if !kind.namespaced() || kind == Kind::Quota || kind == Kind::Event {
        return Ok(());
    }
    let ns = obj.meta().namespace.clone();
    let quotas = quotas_of(cluster, &ns);
    if quotas.is_empty() {
        return Ok(());
    }
    let key = obj.key();
    let current = cluster.store.get(&key);
    let stored = current.as_deref().and_then(|c| match c {
        Object::Pod(p) => Some(&p.spec),
        Object::Deployment(d) => Some(&d.spec.template.spec),
        _ => None,
    });
    for q in &quotas {
        match obj {
            Object::Pod(p) => apply_defaults(&q.spec, &mut p.spec, stored),
            Object::Deployment(d) => apply_defaults(&q.spec, &mut d.spec.template.spec, stored),
            _ => {}
        }
    }
    let mut used = Claim::default();
    let mut old = Claim::default();
    // Quotas themselves are not counted (an admin's, not the tenant's).
    for k in Kind::ALL
        .into_iter()
        .filter(|k| k.namespaced() && !matches!(k, Kind::Event | Kind::Quota))
    {
        for o in cluster.store.list(&format!("{}/{ns}/", k.plural())) {
            if o.key() == key {
                old = claim_of(&o);
            } else {
                used += claim_of(&o);
            }
        }
    }
    // A pod's spec never changes after it is made: what it claims is what
    // the stored one claims (a finished pod re-applied claims nothing).
    let new = match (&*obj, current.as_deref()) {
        (Object::Pod(_), Some(cur)) => claim_of(cur),
        _ => claim_of(obj),
    };
    for q in &quotas {
        check(&q.metadata.name, &q.spec, used, old, new)?;
    }
    Ok(())
}
