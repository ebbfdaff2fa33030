//! Admission through the real sample plugins (samples/guests), called by
//! the API's own write path.

use crate::api::apply_one;
use crate::cluster::Cluster;
use axum::http::StatusCode;
use flotilla_api::plugin::{FailurePolicy, Hook, Plugin, PluginSpec};
use flotilla_api::{Kind, MemberSource, Object, ObjectMeta};
use std::sync::Arc;

fn cluster(dir: &std::path::Path) -> Arc<Cluster> {
    let store = crate::store::RedbStore::open(&dir.join("s.redb")).unwrap();
    crate::cluster::for_tests(Arc::new(store), dir)
}

/// Uploads `path` and returns a spec running it as an admission plugin.
fn spec(c: &Cluster, path: &str) -> PluginSpec {
    let bytes = std::fs::read(path).unwrap();
    let source = MemberSource::module(&bytes);
    let MemberSource::Module { digest, .. } = &source else {
        unreachable!()
    };
    c.blobs.put(digest, &bytes, u64::MAX).unwrap();
    PluginSpec::new(source, Hook::Admission)
}

fn plugin(name: &str, spec: PluginSpec) -> Object {
    Object::Plugin(Plugin {
        metadata: ObjectMeta {
            name: name.into(),
            ..Default::default()
        },
        spec,
    })
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Object {
    let mut p = flotilla_api::Pod::default();
    p.metadata.name = name.into();
    p.metadata.namespace = ns.into();
    for (k, v) in labels {
        p.metadata.labels.insert((*k).into(), (*v).into());
    }
    p.spec.members.push(flotilla_api::MemberSpec {
        name: "app".into(),
        source: MemberSource::Container {
            image: "127.0.0.1:5000/web:1".into(),
            digest: format!("sha256:{}", "b".repeat(64)),
            options: Default::default(),
        },
        ..Default::default()
    });
    Object::Pod(p)
}

fn stored_labels(c: &Cluster, key: &str) -> Vec<(String, String)> {
    let obj = c.store.get(key).expect("stored");
    obj.meta()
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn require_labels_denies_in_the_namespaces_it_selects_and_fills_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let mut s = spec(&c, flotilla_samples::REQUIRE_LABELS_P2);
    s.selector.kinds = vec![Kind::Pod];
    s.selector.namespaces = vec!["prod".into()];
    s.config.insert("REQUIRED".into(), "team".into());
    s.config.insert("DEFAULTS".into(), "tier=web".into());
    assert_eq!(
        apply_one(&c, plugin("require-labels", s.clone()), false).unwrap(),
        "created"
    );
    assert_eq!(
        c.store
            .get("plugins/require-labels")
            .unwrap()
            .meta()
            .namespace,
        ""
    );

    let err = apply_one(&c, pod("prod", "web", &[]), false).unwrap_err();
    assert_eq!(err.status, StatusCode::FORBIDDEN);
    assert_eq!(
        err.message,
        "admission plugin \"require-labels\" denied: pod \"web\" has no label \"team\""
    );
    assert!(c.store.get("pods/prod/web").is_none());

    // Admitted, with the default label the plugin's mutate added.
    apply_one(&c, pod("prod", "web", &[("team", "shop")]), false).unwrap();
    assert_eq!(
        stored_labels(&c, "pods/prod/web"),
        [
            ("team".into(), "shop".into()),
            ("tier".into(), "web".into())
        ]
    );
    // Another namespace, or another kind, is not the plugin's.
    apply_one(&c, pod("dev", "web", &[]), false).unwrap();
    assert!(stored_labels(&c, "pods/dev/web").is_empty());
    let mut cm = flotilla_api::config::ConfigMap::default();
    cm.metadata.name = "settings".into();
    cm.metadata.namespace = "prod".into();
    apply_one(&c, Object::ConfigMap(cm), false).unwrap();

    // A new revision is used from the next write on, without a restart.
    s.config.insert("REQUIRED".into(), "team,owner".into());
    assert_eq!(
        apply_one(&c, plugin("require-labels", s), false).unwrap(),
        "configured"
    );
    let err = apply_one(&c, pod("prod", "api", &[("team", "shop")]), false).unwrap_err();
    assert!(
        err.message.ends_with("has no label \"owner\""),
        "{}",
        err.message
    );
}

#[test]
fn a_failing_plugin_fails_only_its_call_as_its_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let mut s = spec(&c, flotilla_samples::PLUGIN_CHAOS_P2);
    s.timeout = flotilla_api::probe::Millis(300);
    s.fuel = flotilla_api::plugin::MAX_FUEL;
    s.memory = flotilla_api::quantity::Bytes(32 << 20);
    apply_one(&c, plugin("chaos", s.clone()), false).unwrap();

    let refused = |name: &str, chaos: &str| {
        let err = apply_one(&c, pod("default", name, &[("chaos", chaos)]), false).unwrap_err();
        assert!(c.store.get(&format!("pods/default/{name}")).is_none());
        (err.status, err.message)
    };
    let (status, msg) = refused("t", "trap");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        msg.starts_with("admission plugin \"chaos\" failed: "),
        "{msg}"
    );
    assert!(msg.contains("chaos: trap requested"), "{msg}");
    let (status, msg) = refused("s", "spin");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(msg.contains("ran past its timeout (300ms)"), "{msg}");
    let (_, msg) = refused("h", "hog");
    assert!(msg.contains("ran out of memory (memory = 32Mi)"), "{msg}");
    let (status, msg) = refused("d", "deny");
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(msg, "admission plugin \"chaos\" denied: chaos denies \"d\"");
    let (_, msg) = refused("r", "rename");
    assert!(msg.contains("mutate may not rename"), "{msg}");

    // The calls after them are served as if nothing happened: a fresh
    // instance each, with its mutation.
    apply_one(&c, pod("default", "ok", &[]), false).unwrap();
    assert_eq!(
        stored_labels(&c, "pods/default/ok"),
        [("chaos-seen".into(), "yes".into())]
    );
    let events = c.events.list(None, Some(Kind::Plugin), Some("chaos"));
    assert!(
        events.iter().any(|e| e.reason == "CallFailed"),
        "{events:?}"
    );

    // Fuel bounds a call too.
    let mut low = s.clone();
    low.fuel = 1_000_000;
    low.timeout = flotilla_api::plugin::MAX_TIMEOUT;
    apply_one(&c, plugin("chaos", low), false).unwrap();
    let (_, msg) = refused("f", "spin");
    assert!(msg.contains("ran out of fuel (fuel = 1000000)"), "{msg}");

    // Ignore: the write goes on without the failed plugin's say.
    s.failure_policy = FailurePolicy::Ignore;
    apply_one(&c, plugin("chaos", s), false).unwrap();
    for (name, chaos) in [("t", "trap"), ("s", "spin"), ("h", "hog")] {
        apply_one(&c, pod("default", name, &[("chaos", chaos)]), false).unwrap();
    }
    // A denial is not a failure: Ignore does not admit it.
    assert_eq!(refused("d", "deny").0, StatusCode::FORBIDDEN);
}

#[test]
fn a_component_of_another_world_is_refused_when_the_plugin_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let s = spec(&c, flotilla_samples::HEALTH_P2);
    let err = apply_one(&c, plugin("health", s), false).unwrap_err();
    assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        err.message
            .contains("is not a flotilla:plugin/admission@0.1.0 component"),
        "{}",
        err.message
    );
    // A function imports wasi:http, which plugins are not given.
    let s = spec(&c, flotilla_samples::HTTP_P2);
    let err = apply_one(&c, plugin("web", s), false).unwrap_err();
    assert!(
        err.message.contains("cannot be linked as a plugin")
            && err.message.contains("wasi:http/types"),
        "{}",
        err.message
    );
    let s = spec(&c, flotilla_samples::HELLO_P1);
    let err = apply_one(&c, plugin("core", s), false).unwrap_err();
    assert!(err.message.contains("not a component"), "{}", err.message);
    assert!(c.store.list("plugins/").is_empty());
}

fn zoned_node(c: &Cluster, name: &str, zone: Option<&str>) {
    let mut n = flotilla_api::Node::default();
    n.metadata.name = name.into();
    if let Some(z) = zone {
        n.metadata.labels.insert("zone".into(), z.into());
    }
    n.status.ready = true;
    n.status.allocatable = flotilla_api::Capacity {
        cpu: 4000,
        memory: 8 << 30,
        ..Default::default()
    };
    n.status.runtimes = vec!["wasm".into(), "runc".into()];
    c.store
        .put(
            Object::Node(n),
            crate::store::Expect::Absent,
            crate::store::WriteDurability::Lazy,
        )
        .unwrap();
}

/// The node each named pod is bound to, or its Pending message.
fn placed(c: &Cluster, ns: &str, name: &str) -> Result<String, String> {
    let Some(obj) = c.store.get(&format!("pods/{ns}/{name}")) else {
        panic!("pod {name} is gone")
    };
    let Object::Pod(p) = &*obj else {
        unreachable!()
    };
    p.status
        .node
        .clone()
        .ok_or_else(|| p.status.message.clone())
}

#[test]
fn zone_spread_places_an_apps_pods_in_different_zones_and_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    zoned_node(&c, "a", Some("z1"));
    zoned_node(&c, "b", Some("z2"));
    zoned_node(&c, "c", None);
    let mut s = spec(&c, flotilla_samples::ZONE_SPREAD_P2);
    s.hook = Hook::Scheduler;
    s.config.insert("MAX_PER_ZONE".into(), "1".into());
    s.selector.namespaces = vec!["prod".into()];
    apply_one(&c, plugin("zone-spread", s.clone()), false).unwrap();

    apply_one(&c, pod("prod", "web-1", &[("app", "web")]), false).unwrap();
    apply_one(&c, pod("prod", "web-2", &[("app", "web")]), false).unwrap();
    crate::controllers::reconcile(&c);
    let mut on = [
        placed(&c, "prod", "web-1").unwrap(),
        placed(&c, "prod", "web-2").unwrap(),
    ];
    on.sort();
    assert_eq!(on, ["a", "b"]);
    // Both zones hold one; the third node has no zone.
    apply_one(&c, pod("prod", "web-3", &[("app", "web")]), false).unwrap();
    // Another app, and the same app in a namespace the plugin does not
    // select, are placed as if there were no plugin.
    apply_one(&c, pod("prod", "db", &[("app", "db")]), false).unwrap();
    apply_one(&c, pod("dev", "web", &[("app", "web")]), false).unwrap();
    crate::controllers::reconcile(&c);
    assert_eq!(
        placed(&c, "prod", "web-3"),
        Err("0/3 nodes fit: 3 zone-spread".into())
    );
    assert!(["a", "b"].contains(&placed(&c, "prod", "db").unwrap().as_str()));
    assert!(placed(&c, "dev", "web").is_ok());

    // A plugin that fails every call: Fail keeps pods off every node it
    // was asked about; Ignore places them without it.
    s.fuel = 1;
    apply_one(&c, plugin("zone-spread", s.clone()), false).unwrap();
    apply_one(&c, pod("prod", "api", &[("app", "api")]), false).unwrap();
    crate::controllers::reconcile(&c);
    assert_eq!(
        placed(&c, "prod", "api"),
        Err("0/3 nodes fit: 3 zone-spread".into())
    );
    let events = c.events.list(None, Some(Kind::Plugin), Some("zone-spread"));
    assert!(
        events
            .iter()
            .any(|e| e.reason == "CallFailed" && e.message.contains("ran out of fuel")),
        "{events:?}"
    );
    s.failure_policy = FailurePolicy::Ignore;
    apply_one(&c, plugin("zone-spread", s), false).unwrap();
    crate::controllers::reconcile(&c);
    assert!(placed(&c, "prod", "api").is_ok());
    // An admission component is not a scheduler plugin.
    let mut wrong = spec(&c, flotilla_samples::REQUIRE_LABELS_P2);
    wrong.hook = Hook::Scheduler;
    let err = apply_one(&c, plugin("wrong", wrong), false).unwrap_err();
    assert!(
        err.message
            .contains("is not a flotilla:plugin/scheduler@0.1.0 component"),
        "{}",
        err.message
    );
}

#[test]
fn a_python_plugin_built_from_the_wit_alone_admits_and_mutates() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let path = flotilla_samples::python_plugin().unwrap();
    let mut s = spec(&c, path.to_str().unwrap());
    s.memory = flotilla_api::quantity::Bytes(128 << 20);
    s.timeout = flotilla_api::probe::Millis(5_000);
    s.fuel = flotilla_api::plugin::MAX_FUEL;
    apply_one(&c, plugin("require-team", s), false).unwrap();
    let err = apply_one(&c, pod("default", "web", &[]), false).unwrap_err();
    assert_eq!(err.status, StatusCode::FORBIDDEN);
    assert_eq!(
        err.message,
        "admission plugin \"require-team\" denied: pod \"web\" has no label \"team\" (said Python)"
    );
    apply_one(&c, pod("default", "web", &[("team", "shop")]), false).unwrap();
    assert_eq!(
        stored_labels(&c, "pods/default/web"),
        [
            ("checked-by".into(), "python".into()),
            ("team".into(), "shop".into())
        ]
    );
}
