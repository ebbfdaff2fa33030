//! Quotas: set by admins (an edit role may read them, not write them);
//! no status. What they allow is checked at every write of a pod,
//! Deployment or other object of their namespace (`enforce`), under one
//! lock so that two writes cannot both take the last of a quota.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use crate::cluster::Cluster;
use flotilla_api::quota::{Claim, Quota, apply_defaults, check, claim_of};
use flotilla_api::{Kind, Object};
use std::collections::HashMap;

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
pub(crate) fn quotas_of(cluster: &Cluster, ns: &str) -> Vec<Quota> {
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

/// What each namespace's objects claim, kept current from the store's
/// change history so a quota check costs the writes since the last check,
/// not a scan of the namespace. Lives in `Cluster::quota_claims`, whose
/// lock is held from the check to the write.
#[derive(Default)]
pub struct Usage {
    /// The store revision the tallies are current at (`None`: never built).
    revision: Option<u64>,
    /// Per namespace.
    tallies: HashMap<String, Tally>,
    /// What each counted object claims now, by key.
    claims: HashMap<String, Claim>,
}

/// A namespace's claims summed; members without a memory limit are
/// counted, so removing one is exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    pods: u64,
    cpu: u64,
    memory: u64,
    objects: u64,
    unlimited: u64,
}

impl Tally {
    fn add(&mut self, c: Claim) {
        self.pods += c.pods;
        self.cpu += c.cpu;
        self.memory += c.memory;
        self.objects += c.objects;
        self.unlimited += u64::from(c.unlimited_memory);
    }

    fn sub(&mut self, c: Claim) {
        self.pods -= c.pods;
        self.cpu -= c.cpu;
        self.memory -= c.memory;
        self.objects -= c.objects;
        self.unlimited -= u64::from(c.unlimited_memory);
    }

    fn claim(self) -> Claim {
        Claim {
            pods: self.pods,
            cpu: self.cpu,
            memory: self.memory,
            objects: self.objects,
            unlimited_memory: self.unlimited > 0,
        }
    }
}

/// Whether objects of this kind count against quotas (quotas themselves
/// are an admin's, not the tenant's; events are the system's).
fn counted(kind: Kind) -> bool {
    kind.namespaced() && !matches!(kind, Kind::Event | Kind::Quota)
}

impl Usage {
    /// Brings the tallies up to the store's current revision: the changes
    /// since the last call from the store's history, or every object again
    /// when the history no longer reaches back that far.
    fn catch_up(&mut self, store: &dyn crate::store::Store) {
        if let Some(rev) = self.revision
            && let Ok((events, _)) = store.watch_from(rev)
        {
            for e in events {
                let obj = &*e.object;
                if !counted(obj.kind()) {
                    continue;
                }
                let key = obj.key();
                let ns = &obj.meta().namespace;
                let tally = self.tallies.entry(ns.clone()).or_default();
                if let Some(old) = self.claims.remove(&key) {
                    tally.sub(old);
                }
                if !e.deleted {
                    let c = claim_of(obj);
                    tally.add(c);
                    self.claims.insert(key, c);
                }
                self.revision = Some(e.revision);
            }
            return;
        }
        self.tallies.clear();
        self.claims.clear();
        let (rev, all) = store.snapshot("");
        for o in all.iter().filter(|o| counted(o.kind())) {
            let c = claim_of(o);
            self.tallies
                .entry(o.meta().namespace.clone())
                .or_default()
                .add(c);
            self.claims.insert(o.key(), c);
        }
        self.revision = Some(rev);
    }

    /// What namespace `ns` claims without the object at `key`, and what
    /// that object claims now.
    fn without(&self, ns: &str, key: &str) -> (Claim, Claim) {
        let mut t = self.tallies.get(ns).copied().unwrap_or_default();
        let old = self.claims.get(key).copied().unwrap_or_default();
        if self.claims.contains_key(key) {
            t.sub(old);
        }
        (t.claim(), old)
    }
}

/// Fills in the namespace's default limits on `obj` (a pod or a
/// Deployment's template), then checks the namespace's quotas would hold
/// it: `Err` says which and by how much. `usage` is the guard of
/// `Cluster::quota_claims`, held by the caller until its write is done.
pub fn enforce(cluster: &Cluster, usage: &mut Usage, obj: &mut Object) -> Result<(), String> {
    let kind = obj.kind();
    if !counted(kind) {
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
    usage.catch_up(&*cluster.store);
    let (used, old) = usage.without(&ns, &key);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Expect, RedbStore, Store, WriteDurability};
    use flotilla_api::{MemberSpec, ObjectMeta, Pod, PodPhase};

    fn pod(ns: &str, name: &str, cpu: u32) -> Object {
        let mut p = Pod {
            metadata: ObjectMeta {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut m = MemberSpec {
            name: "m".into(),
            ..Default::default()
        };
        m.resources.cpu = cpu;
        p.spec.members.push(m);
        Object::Pod(p)
    }

    /// The tallies the index keeps must equal a scan of the store.
    fn scanned(store: &dyn Store, ns: &str) -> Claim {
        let mut c = Claim::default();
        for o in store.list("") {
            if counted(o.kind()) && o.meta().namespace == ns {
                c += claim_of(&o);
            }
        }
        c
    }

    #[test]
    fn usage_follows_writes_deletes_and_a_history_it_fell_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let put = |o: Object| {
            let expect = match store.get(&o.key()) {
                Some(cur) => Expect::Version(cur.meta().resource_version),
                None => Expect::Absent,
            };
            store.put(o, expect, WriteDurability::Lazy).unwrap()
        };
        put(pod("a", "p1", 100));
        put(pod("a", "p2", 200));
        put(pod("b", "p1", 50));
        let mut u = Usage::default();
        u.catch_up(&store);
        assert_eq!(u.without("a", "pods/a/none").0, scanned(&store, "a"));
        let (rest, old) = u.without("a", "pods/a/p2");
        assert_eq!((rest.cpu, rest.pods, old.cpu), (100, 1, 200));

        // Changes since: a delete, a finished pod, a new pod elsewhere.
        store.delete("pods/a/p1", None).unwrap();
        let Object::Pod(mut p2) = (*store.get("pods/a/p2").unwrap()).clone() else {
            unreachable!()
        };
        p2.status.phase = PodPhase::Succeeded;
        put(Object::Pod(p2));
        put(pod("a", "p3", 7));
        u.catch_up(&store);
        for ns in ["a", "b"] {
            assert_eq!(u.without(ns, "-").0, scanned(&store, ns), "{ns}");
        }
        assert_eq!(u.without("a", "-").0.cpu, 7);
        assert_eq!(u.without("a", "-").0.objects, 2);

        // More writes than the store's history holds: rebuilt from a
        // snapshot, still exact.
        for i in 0..1100 {
            put(pod("b", &format!("q{}", i % 40), 1));
        }
        u.catch_up(&store);
        for ns in ["a", "b"] {
            assert_eq!(u.without(ns, "-").0, scanned(&store, ns), "{ns}");
        }
        assert_eq!(u.without("b", "-").0.pods, 41);
    }
}
