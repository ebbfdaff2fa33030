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
//!
//! Scale to zero: a Function with `min_instances = 0` has one instance
//! while it is asked for and none once `scale_to_zero_after` has passed
//! without a request. What counts as asked for ([`Activity`], in memory):
//! its pods' request counters moving or requests in flight (agents report
//! them with their usage), a gateway waking it ([`wake`]: a request is
//! waiting at a node whose table has no ready instance), and — so that a
//! slow start is not mistaken for idleness — an instance being brought up.
//! A restarted scheduler counts every Function as just asked for.

use super::log_err;
use crate::cluster::Cluster;
use crate::store::{Expect, WriteDurability};
use crate::usage::PodTraffic;
use flotilla_api::function::{
    FUNCTION_LABEL, Function, FunctionStatus, Route, SERVICE_PORT, TRACK_LABEL, Traffic,
    canary_name,
};
use flotilla_api::object::key;
use flotilla_api::{
    Deployment, DeploymentSpec, Kind, Labels, MemberSpec, Object, ObjectMeta, OwnerRef, PodSpec,
    PodTemplate, Protocol, Service, ServicePort, ServiceSpec,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

const OWNER_KIND: &str = "Function";

/// When each Function (by uid) was last asked for, and its pods' request
/// counters as last seen.
#[derive(Default)]
pub struct Activity {
    seen: HashMap<String, Seen>,
}

struct Seen {
    /// Its pods' requests so far (summed), as last seen.
    requests: u64,
    last: Instant,
    last_ms: u64,
    /// Instance counts wanted within the last [`SCALE_DOWN_AFTER`].
    wanted: std::collections::VecDeque<(Instant, u32)>,
}

/// A function scales up as soon as its concurrency asks, and down only to
/// the most it wanted over this long, so a dip between bursts does not
/// stop instances a burst will want again.
pub const SCALE_DOWN_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Activity {
    fn entry(&mut self, uid: &str, now: Instant) -> &mut Seen {
        self.seen.entry(uid.to_string()).or_insert_with(|| Seen {
            requests: 0,
            last: now,
            last_ms: 0,
            wanted: Default::default(),
        })
    }

    /// The instances to run, from the count wanted now: the most wanted
    /// within [`SCALE_DOWN_AFTER`], except that none (scale to zero, or
    /// no floor) is none at once.
    fn stabilise(&mut self, uid: &str, wanted: u32, now: Instant) -> u32 {
        let e = self.entry(uid, now);
        if wanted == 0 {
            e.wanted.clear();
            return 0;
        }
        e.wanted.push_back((now, wanted));
        while e
            .wanted
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > SCALE_DOWN_AFTER)
        {
            e.wanted.pop_front();
        }
        e.wanted.iter().map(|&(_, n)| n).max().unwrap_or(wanted)
    }

    fn mark(&mut self, uid: &str) {
        let e = self.entry(uid, Instant::now());
        e.last = Instant::now();
        e.last_ms = flotilla_api::time::now_ms();
    }

    /// Takes in the function's request counters `(requests, in_flight)`
    /// and whether an instance is being brought up; returns how long ago
    /// it was last asked for and when (ms since the epoch, 0: unknown).
    fn observe(
        &mut self,
        uid: &str,
        counters: (u64, u64),
        starting: bool,
        now: Instant,
    ) -> (std::time::Duration, u64) {
        let e = self.entry(uid, now);
        // Only a rise counts: the sum falls when a pod goes (scaled down,
        // replaced), and that is no request.
        let moved = counters.0 > e.requests;
        e.requests = counters.0;
        if moved || counters.1 > 0 {
            e.last = now;
            e.last_ms = flotilla_api::time::now_ms();
        } else if starting {
            e.last = now;
        }
        (now.saturating_duration_since(e.last), e.last_ms)
    }
}

/// A gateway holds a request for Service `namespace/service`, which has
/// no ready instance: its Function is asked for now.
pub fn wake(cluster: &Cluster, namespace: &str, service: &str) {
    let Some(svc) = cluster.store.get(&key(Kind::Service, namespace, service)) else {
        return;
    };
    let Some(owner) = &svc.meta().owner else {
        return;
    };
    if owner.kind != OWNER_KIND {
        return;
    }
    cluster
        .function_activity
        .lock()
        .expect("poisoned")
        .mark(&owner.uid);
    cluster.kick.notify_one();
}

pub(super) fn functions(cluster: &Cluster) {
    let store = &cluster.store;
    let functions = store.list("functions/");
    let mut live: HashSet<String> = HashSet::new();
    if !functions.is_empty() {
        // Each function's request counters: its pods' (by the label they
        // carry), from what their nodes last reported.
        let reported = cluster.usage.requests();
        let traffic = cluster.usage.traffic();
        let mut counters: HashMap<(String, String), (u64, u64)> = HashMap::new();
        let mut served: HashMap<(String, String), PodTraffic> = HashMap::new();
        for p in super::pods(&store.list("pods/")) {
            let Some(f) = p.metadata.labels.get(FUNCTION_LABEL) else {
                continue;
            };
            let key = (p.metadata.namespace.clone(), f.clone());
            if let Some(c) = reported.get(&p.metadata.uid) {
                let e = counters.entry(key.clone()).or_default();
                e.0 += c.0;
                e.1 += c.1;
            }
            if let Some(t) = traffic.get(&p.metadata.uid) {
                served.entry(key).or_default().add(t);
            }
        }
        for obj in &functions {
            let Object::Function(f) = &**obj else {
                continue;
            };
            live.insert(f.metadata.uid.clone());
            let key = (f.metadata.namespace.clone(), f.metadata.name.clone());
            let c = counters.get(&key).copied().unwrap_or_default();
            let t = served.get(&key).and_then(PodTraffic::summary);
            reconcile(cluster, f, c, t);
        }
    }
    cluster
        .function_activity
        .lock()
        .expect("poisoned")
        .seen
        .retain(|uid, _| live.contains(uid));
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

fn reconcile(cluster: &Cluster, f: &Function, counters: (u64, u64), traffic: Option<Traffic>) {
    let store = &cluster.store;
    // Instances wanted but none ready yet: it is being brought up.
    let starting = f.status.instances > 0 && f.status.ready == 0;
    let now = Instant::now();
    let mut activity = cluster.function_activity.lock().expect("poisoned");
    let (idle, last_ms) = activity.observe(&f.metadata.uid, counters, starting, now);
    let active = idle < f.spec.scale_to_zero_after.duration();
    let concurrency = traffic.as_ref().map_or(0.0, Traffic::concurrency);
    let instances = activity.stabilise(&f.metadata.uid, f.spec.instances(active, concurrency), now);
    drop(activity);
    let mut status = FunctionStatus {
        observed_generation: f.metadata.generation,
        last_request_ms: last_ms.max(f.status.last_request_ms),
        traffic,
        ..Default::default()
    };
    let (stable, canary) = tracks(f);
    if let Some(d) = keep_track(cluster, f, &stable, instances, &mut status.message) {
        status.ready += d.status.ready;
        status.instances += d.status.replicas;
        status.revision = d.status.revision;
    }
    match &canary {
        Some(t) => {
            if let Some(d) = keep_track(cluster, f, t, instances, &mut status.message) {
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
    instances: u32,
    message: &mut String,
) -> Option<Deployment> {
    let deployment = Object::Deployment(Deployment {
        metadata: meta(f, t),
        spec: DeploymentSpec {
            replicas: instances,
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

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::probe::Millis;
    use std::time::Duration;

    #[test]
    fn only_rising_counters_in_flight_requests_and_starts_count_as_asked_for() {
        let mut a = Activity::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // First seen: asked for now (a new function, a restarted scheduler).
        assert_eq!(a.observe("f", (0, 0), false, at(0)).0, Duration::ZERO);
        assert_eq!(
            a.observe("f", (0, 0), false, at(5)).0,
            Duration::from_secs(5)
        );
        // Requests counted on a node.
        assert_eq!(a.observe("f", (7, 0), false, at(6)).0, Duration::ZERO);
        assert_eq!(
            a.observe("f", (7, 0), false, at(9)).0,
            Duration::from_secs(3)
        );
        // The pods went (scaled down): the sum falls, which is no request.
        assert_eq!(
            a.observe("f", (0, 0), false, at(10)).0,
            Duration::from_secs(4)
        );
        // A request in flight for long keeps it asked for.
        assert_eq!(a.observe("f", (0, 1), false, at(20)).0, Duration::ZERO);
        // Being brought up too, but that names no request.
        let (idle, ms) = a.observe("f", (0, 0), true, at(30));
        assert_eq!(idle, Duration::ZERO);
        let (_, ms_before) = a.observe("f", (0, 0), false, at(30));
        assert_eq!(ms, ms_before);
        assert_eq!(
            a.observe("f", (0, 0), false, at(42)).0,
            Duration::from_secs(12)
        );
    }

    #[test]
    fn scaling_up_is_at_once_and_down_only_after_the_window() {
        let mut a = Activity::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(a.stabilise("f", 1, at(0)), 1);
        assert_eq!(a.stabilise("f", 4, at(1)), 4, "up at once");
        assert_eq!(a.stabilise("f", 2, at(2)), 4, "down waits");
        assert_eq!(a.stabilise("f", 1, at(1 + SCALE_DOWN_AFTER.as_secs())), 4);
        // The 4 is older than the window now: the most since, 2.
        assert_eq!(a.stabilise("f", 1, at(2 + SCALE_DOWN_AFTER.as_secs())), 2);
        assert_eq!(a.stabilise("f", 1, at(3 + SCALE_DOWN_AFTER.as_secs())), 1);
        // To zero (idle, min 0) at once, and a new start from there.
        assert_eq!(a.stabilise("f", 5, at(100)), 5);
        assert_eq!(a.stabilise("f", 0, at(101)), 0);
        assert_eq!(a.stabilise("f", 1, at(102)), 1);
    }

    fn cluster(dir: &std::path::Path) -> Arc<Cluster> {
        let store = crate::store::RedbStore::open(&dir.join("s.redb")).unwrap();
        crate::cluster::for_tests(Arc::new(store), dir)
    }

    fn replicas(c: &Cluster, name: &str) -> u32 {
        match c
            .store
            .get(&key(Kind::Deployment, "default", name))
            .as_deref()
        {
            Some(Object::Deployment(d)) => d.spec.replicas,
            other => panic!("no deployment {name}: {other:?}"),
        }
    }

    #[test]
    fn an_idle_function_goes_to_zero_and_a_gateway_wakes_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(dir.path());
        let digest = format!("sha256:{}", "a".repeat(64));
        let mut spec: flotilla_api::function::FunctionSpec =
            serde_json::from_value(serde_json::json!({"module": {"digest": digest, "size": 100}}))
                .unwrap();
        spec.scale_to_zero_after = Millis(1_000);
        let f = Function {
            metadata: ObjectMeta {
                name: "hello".into(),
                namespace: "default".into(),
                uid: "u-hello".into(),
                ..Default::default()
            },
            spec: spec.clone(),
            status: Default::default(),
        };
        let pinned = Function {
            metadata: ObjectMeta {
                name: "pinned".into(),
                namespace: "default".into(),
                uid: "u-pinned".into(),
                ..Default::default()
            },
            spec: flotilla_api::function::FunctionSpec {
                min_instances: 1,
                ..spec
            },
            status: Default::default(),
        };
        for f in [f, pinned] {
            c.store
                .put(Object::Function(f), Expect::Absent, WriteDurability::Lazy)
                .unwrap();
        }
        functions(&c);
        assert_eq!((replicas(&c, "hello"), replicas(&c, "pinned")), (1, 1));

        // Idle past scale_to_zero_after (its clock moved back for the test).
        let past = Instant::now() - Duration::from_secs(5);
        for e in c.function_activity.lock().unwrap().seen.values_mut() {
            e.last = past;
        }
        functions(&c);
        assert_eq!((replicas(&c, "hello"), replicas(&c, "pinned")), (0, 1));
        functions(&c);
        assert_eq!(replicas(&c, "hello"), 0, "it stays at zero");

        // A gateway holds a request for its Service: one instance again.
        wake(&c, "default", "hello");
        functions(&c);
        assert_eq!(replicas(&c, "hello"), 1);
        // Waking a Service no Function owns, or none at all, does nothing.
        wake(&c, "default", "nothing");

        // Deleting the function forgets its activity.
        let stored = c
            .store
            .get(&key(Kind::Function, "default", "hello"))
            .unwrap();
        c.store
            .delete(&stored.key(), Some(stored.meta().resource_version))
            .unwrap();
        functions(&c);
        assert!(
            !c.function_activity
                .lock()
                .unwrap()
                .seen
                .contains_key("u-hello")
        );
        assert!(
            c.function_activity
                .lock()
                .unwrap()
                .seen
                .contains_key("u-pinned")
        );
    }
}
