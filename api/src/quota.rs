//! Quotas: what the objects of one namespace may claim together (pods,
//! CPU, memory, objects), and the limits members get when they declare
//! none. A write that would take a namespace past one of its quotas is
//! refused at the API with the figures; nothing already running is
//! touched.

use crate::meta::ObjectMeta;
use crate::object::{Object, PodSpec};
use crate::quantity::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub metadata: ObjectMeta,
    pub spec: QuotaSpec,
}

/// Caps (unset: no cap) and defaults of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Pods not finished, counting each Deployment's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<u64>,
    /// Millicores of those pods' members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u64>,
    /// Memory limits of those pods' members (with a memory cap, every
    /// member must have a limit, its own or `default_memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Bytes>,
    /// Objects of every kind in the namespace (pods a Deployment made are
    /// its, not counted apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    /// The memory limit of a member that declares none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_memory: Option<Bytes>,
    /// The `cpu` of a member that declares none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_cpu: Option<u32>,
    /// Keys each key-value bucket of the namespace may hold (default
    /// [`crate::interfaces::DEFAULT_BUCKET_KEYS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_keys: Option<u64>,
    /// Bytes of keys and values each bucket may hold (default
    /// [`crate::interfaces::DEFAULT_BUCKET_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_bytes: Option<Bytes>,
}

/// What each key-value bucket of a namespace with `quotas` may hold: the
/// smallest cap any of them sets, else the defaults.
pub fn bucket_limits<'a>(
    quotas: impl IntoIterator<Item = &'a QuotaSpec>,
) -> crate::interfaces::BucketLimits {
    let mut l = crate::interfaces::BucketLimits::default();
    let (mut keys, mut bytes) = (None::<u64>, None::<u64>);
    for q in quotas {
        if let Some(k) = q.bucket_keys {
            keys = Some(keys.map_or(k, |c| c.min(k)));
        }
        if let Some(b) = q.bucket_bytes {
            bytes = Some(bytes.map_or(b.0, |c| c.min(b.0)));
        }
    }
    if let Some(k) = keys {
        l.keys = k;
    }
    if let Some(b) = bytes {
        l.bytes = b;
    }
    l
}

/// What objects claim against a quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    pub pods: u64,
    pub cpu: u64,
    pub memory: u64,
    pub objects: u64,
    /// A member counted here has no memory limit.
    pub unlimited_memory: bool,
}

impl std::ops::AddAssign for Claim {
    fn add_assign(&mut self, o: Claim) {
        self.pods += o.pods;
        self.cpu += o.cpu;
        self.memory += o.memory;
        self.objects += o.objects;
        self.unlimited_memory |= o.unlimited_memory;
    }
}

fn pods_claim(spec: &PodSpec, replicas: u64) -> Claim {
    Claim {
        pods: replicas,
        cpu: replicas * spec.cpu(),
        memory: replicas * spec.memory(),
        objects: 0,
        unlimited_memory: replicas > 0 && spec.members.iter().any(|m| m.resources.memory.is_none()),
    }
}

/// What one stored or applied object claims: a pod not finished (unless a
/// Deployment made it), a Deployment's replicas of its template, and one
/// object for anything but a Deployment's pods.
pub fn claim_of(obj: &Object) -> Claim {
    match obj {
        // A Deployment's pod (its owner is set by the scheduler, never by a
        // client): the Deployment claims it.
        Object::Pod(p)
            if p.metadata
                .owner
                .as_ref()
                .is_some_and(|o| o.kind == "Deployment") =>
        {
            Claim::default()
        }
        Object::Pod(p) => {
            let mut c = if p.status.phase.is_terminal() {
                Claim::default()
            } else {
                pods_claim(&p.spec, 1)
            };
            c.objects = 1;
            c
        }
        Object::Deployment(d) => {
            let mut c = pods_claim(&d.spec.template.spec, u64::from(d.spec.replicas));
            c.objects = 1;
            c
        }
        _ => Claim {
            objects: 1,
            ..Claim::default()
        },
    }
}

/// Fills in the limits of members that declare none. A member the stored
/// object (`stored`, when this write updates one) already has keeps what
/// it has there — the default it got then, or none if it predates the
/// quota — so re-applying a manifest changes nothing and a quota added
/// later restarts nothing.
pub fn apply_defaults(q: &QuotaSpec, spec: &mut PodSpec, stored: Option<&PodSpec>) {
    for m in &mut spec.members {
        let before = stored.and_then(|s| s.members.iter().find(|o| o.name == m.name));
        if m.resources.memory.is_none() {
            m.resources.memory = match before {
                Some(b) => b.resources.memory,
                None => q.default_memory,
            };
        }
        if m.resources.cpu == 0 {
            m.resources.cpu = match (before, q.default_cpu) {
                (Some(b), _) => b.resources.cpu,
                (None, Some(c)) => c,
                (None, None) => 0,
            };
        }
    }
}

/// Whether the namespace may hold `used` (its objects without the one
/// being written) plus `new` (that object, which claimed `old` before):
/// `Err` names the quota, what would be used and the cap. Only what grows
/// is checked, so a namespace over a cap set later may still shrink.
pub fn check(name: &str, q: &QuotaSpec, used: Claim, old: Claim, new: Claim) -> Result<(), String> {
    let total = {
        let mut t = used;
        t += new;
        t
    };
    let over = |what: &str, want: String, cap: String| {
        Err(format!(
            "quota '{name}' allows {cap} {what} in this namespace; this would make it {want}"
        ))
    };
    if let Some(cap) = q.pods
        && new.pods > old.pods
        && total.pods > cap
    {
        return over("pods", total.pods.to_string(), cap.to_string());
    }
    if let Some(cap) = q.cpu
        && new.cpu > old.cpu
        && total.cpu > cap
    {
        return over(
            "millicores of cpu",
            format!("{}m", total.cpu),
            format!("{cap}m"),
        );
    }
    if let Some(cap) = q.memory {
        if new.unlimited_memory && !old.unlimited_memory {
            return Err(format!(
                "quota '{name}' caps memory in this namespace: every member needs a memory limit (resources.memory, or the quota's default_memory)"
            ));
        }
        if new.memory > old.memory && total.memory > cap.0 {
            return over(
                "of memory",
                Bytes(total.memory).to_string(),
                cap.to_string(),
            );
        }
    }
    if let Some(cap) = q.objects
        && new.objects > old.objects
        && total.objects > cap
    {
        return over("objects", total.objects.to_string(), cap.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{Deployment, MemberSpec, Pod, PodPhase};

    fn pod(cpu: u32, memory: Option<u64>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = "p".into();
        p.spec.members.push(MemberSpec {
            name: "m".into(),
            ..Default::default()
        });
        p.spec.members[0].resources.cpu = cpu;
        p.spec.members[0].resources.memory = memory.map(Bytes);
        p
    }

    #[test]
    fn claims_count_pods_deployments_and_objects() {
        let p = pod(100, Some(64 << 20));
        assert_eq!(
            claim_of(&Object::Pod(p.clone())),
            Claim {
                pods: 1,
                cpu: 100,
                memory: 64 << 20,
                objects: 1,
                unlimited_memory: false
            }
        );
        // A finished pod claims only its object; a Deployment's pod nothing.
        let mut done = p.clone();
        done.status.phase = PodPhase::Succeeded;
        assert_eq!(claim_of(&Object::Pod(done)).pods, 0);
        let mut owned = p.clone();
        owned.metadata.owner = Some(crate::meta::OwnerRef {
            kind: "Deployment".into(),
            name: "web".into(),
            uid: "u".into(),
        });
        assert_eq!(claim_of(&Object::Pod(owned)), Claim::default());
        // A label proves nothing: a client may set any.
        let mut labelled = p.clone();
        labelled
            .metadata
            .labels
            .insert("flotilla.dev/deployment".into(), "web".into());
        assert_eq!(claim_of(&Object::Pod(labelled)).pods, 1);
        let mut d = Deployment::default();
        d.spec.replicas = 3;
        d.spec.template.spec = p.spec.clone();
        let c = claim_of(&Object::Deployment(d));
        assert_eq!(
            (c.pods, c.cpu, c.memory, c.objects),
            (3, 300, 3 * (64 << 20), 1)
        );
    }

    #[test]
    fn writes_past_a_cap_are_refused_with_the_figures() {
        let q = QuotaSpec {
            pods: Some(2),
            cpu: Some(500),
            memory: Some(Bytes(256 << 20)),
            objects: Some(5),
            ..Default::default()
        };
        let one = claim_of(&Object::Pod(pod(200, Some(64 << 20))));
        assert_eq!(check("q", &q, one, Claim::default(), one), Ok(()));
        let mut two = one;
        two += one;
        let e = check("q", &q, two, Claim::default(), one).unwrap_err();
        assert_eq!(
            e,
            "quota 'q' allows 2 pods in this namespace; this would make it 3"
        );
        let big = claim_of(&Object::Pod(pod(400, Some(64 << 20))));
        let e = check("q", &q, one, Claim::default(), big).unwrap_err();
        assert!(
            e.contains("allows 500m millicores of cpu") && e.contains("600m"),
            "{e}"
        );
        let e = check(
            "q",
            &q,
            Claim::default(),
            Claim::default(),
            claim_of(&Object::Pod(pod(1, None))),
        )
        .unwrap_err();
        assert!(e.contains("every member needs a memory limit"), "{e}");
        // A service is an object, nothing else.
        let svc = claim_of(&Object::Service(Default::default()));
        let five = Claim {
            objects: 5,
            ..Default::default()
        };
        let e = check("q", &q, five, Claim::default(), svc).unwrap_err();
        assert!(e.contains("allows 5 objects"), "{e}");
        // Shrinking is allowed, even over a cap set later.
        let mut four = two;
        four += two;
        assert_eq!(check("q", &q, four, two, one), Ok(()));
        assert!(check("q", &q, four, one, two).is_err(), "growing is not");
    }

    #[test]
    fn defaults_fill_only_what_members_leave_out() {
        let q = QuotaSpec {
            default_memory: Some(Bytes(32 << 20)),
            default_cpu: Some(50),
            ..Default::default()
        };
        let mut spec = pod(0, None).spec;
        spec.members.push(MemberSpec {
            name: "n".into(),
            ..Default::default()
        });
        spec.members[1].resources.cpu = 300;
        spec.members[1].resources.memory = Some(Bytes(1 << 30));
        let sent = spec.clone();
        apply_defaults(&q, &mut spec, None);
        assert_eq!(spec.members[0].resources.memory, Some(Bytes(32 << 20)));
        assert_eq!(spec.members[0].resources.cpu, 50);
        assert_eq!(spec.members[1].resources.memory, Some(Bytes(1 << 30)));
        assert_eq!(spec.members[1].resources.cpu, 300);
        // Re-applied: the stored defaults stay (nothing changes).
        let stored = spec.clone();
        let mut again = sent.clone();
        apply_defaults(&q, &mut again, Some(&stored));
        assert_eq!(again, stored);
        // Stored before the quota existed: left as it was (no restart).
        let mut old = sent.clone();
        apply_defaults(&q, &mut old, Some(&sent));
        assert_eq!(old, sent);
    }
}
