use super::*;
use crate::store::{Expect, RedbStore, Store, WriteDurability};
use flotilla_api::interfaces::HostInterfaces;
use flotilla_api::{MemberSpec, ObjectMeta, Pod, PodSpec};

fn ok(r: KvReply) -> KvAnswer {
    r.unwrap_or_else(|e| panic!("refused: {e}"))
}

fn set(s: &KvStore, bucket: &str, key: &str, value: &[u8], l: BucketLimits) -> KvReply {
    s.run(
        "shop",
        bucket,
        KvOp::Set {
            key: key.into(),
            value: value.to_vec(),
        },
        l,
    )
}

fn get(s: &KvStore, bucket: &str, key: &str) -> Option<Vec<u8>> {
    match ok(s.run(
        "shop",
        bucket,
        KvOp::Get { key: key.into() },
        BucketLimits::default(),
    )) {
        KvAnswer::Value(v) => v,
        a => panic!("{a:?}"),
    }
}

#[test]
fn operations_on_a_bucket_and_its_state_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.redb");
    let l = BucketLimits::default();
    {
        let s = KvStore::open(&path).unwrap();
        ok(set(&s, "b", "a", b"1", l));
        ok(set(&s, "b", "a", b"22", l));
        ok(set(&s, "other", "a", b"elsewhere", l));
        assert_eq!(get(&s, "b", "a").as_deref(), Some(&b"22"[..]));
        assert_eq!(get(&s, "b", "missing"), None);
        let inc = |delta| {
            ok(s.run(
                "shop",
                "b",
                KvOp::Increment {
                    key: "n".into(),
                    delta,
                },
                l,
            ))
        };
        assert_eq!(inc(5), KvAnswer::Count(5));
        assert_eq!(inc(2), KvAnswer::Count(7));
        ok(set(&s, "b", "t", b"text", l));
        let e = s
            .run(
                "shop",
                "b",
                KvOp::Increment {
                    key: "t".into(),
                    delta: 1,
                },
                l,
            )
            .unwrap_err();
        ok(s.run("shop", "b", KvOp::Delete { key: "t".into() }, l));
        assert!(
            matches!(e, KvError::Refused(ref m) if m.contains("not a decimal number")),
            "{e}"
        );
        ok(s.run(
            "shop",
            "b",
            KvOp::SetMany {
                pairs: (0..3)
                    .map(|i| KvPair {
                        key: format!("k{i}"),
                        value: vec![b'v'; i],
                    })
                    .collect(),
            },
            l,
        ));
        let many = ok(s.run(
            "shop",
            "b",
            KvOp::GetMany {
                keys: vec!["k1".into(), "nope".into()],
            },
            l,
        ));
        assert_eq!(
            many,
            KvAnswer::Values(vec![
                Some(KvPair {
                    key: "k1".into(),
                    value: b"v".to_vec()
                }),
                None
            ])
        );
        ok(s.run("shop", "b", KvOp::Delete { key: "k0".into() }, l));
        ok(s.run(
            "shop",
            "b",
            KvOp::DeleteMany {
                keys: vec!["k1".into(), "never".into()],
            },
            l,
        ));
        assert_eq!(
            ok(s.run("shop", "b", KvOp::Exists { key: "k1".into() }, l)),
            KvAnswer::Exists(false)
        );
        // a = "22", n = "7", k2 = "vv"
        assert_eq!(
            s.usage("shop", "b"),
            BucketUsage {
                keys: 3,
                bytes: 3 + 2 + 4
            }
        );
    }
    // Another process later: the same data and the same usage.
    let s = KvStore::open(&path).unwrap();
    assert_eq!(get(&s, "b", "n").as_deref(), Some(&b"7"[..]));
    assert_eq!(s.usage("shop", "b"), BucketUsage { keys: 3, bytes: 9 });
    assert_eq!(s.usage("shop", "other").keys, 1);
    let KvAnswer::Keys { keys, cursor } = ok(s.run("shop", "b", KvOp::ListKeys { cursor: 0 }, l))
    else {
        panic!()
    };
    assert_eq!(
        (keys, cursor),
        (vec!["a".into(), "k2".into(), "n".into()], None)
    );
}

#[test]
fn keys_are_listed_in_pages_within_their_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let s = KvStore::open(&dir.path().join("kv.redb")).unwrap();
    let l = BucketLimits::default();
    let pairs = (0..LIST_PAGE + 5)
        .map(|i| KvPair {
            key: format!("{i:05}"),
            value: vec![],
        })
        .collect();
    ok(s.run("shop", "b", KvOp::SetMany { pairs }, l));
    ok(set(&s, "c", "zzz", b"", l));
    ok(set(&s, "a", "000", b"", l));
    let KvAnswer::Keys { keys, cursor } = ok(s.run("shop", "b", KvOp::ListKeys { cursor: 0 }, l))
    else {
        panic!()
    };
    assert_eq!(keys.len(), LIST_PAGE);
    assert_eq!(cursor, Some(LIST_PAGE as u64));
    let KvAnswer::Keys { keys, cursor } = ok(s.run(
        "shop",
        "b",
        KvOp::ListKeys {
            cursor: LIST_PAGE as u64,
        },
        l,
    )) else {
        panic!()
    };
    assert_eq!(keys.first().map(String::as_str), Some("01000"));
    assert_eq!(keys.len(), 5, "none of bucket c's: {keys:?}");
    assert_eq!(cursor, None);
}

#[test]
fn a_write_past_the_quota_is_refused_whole_and_shrinking_is_always_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let s = KvStore::open(&dir.path().join("kv.redb")).unwrap();
    let l = BucketLimits { keys: 3, bytes: 20 };
    ok(set(&s, "b", "a", b"0123456789", l)); // 11 bytes
    let e = set(&s, "b", "b", b"0123456789", l).unwrap_err();
    assert_eq!(
        e.to_string(),
        "bucket \"b\" is over its quota: 22 bytes of at most 20 bytes",
        "{e}"
    );
    assert_eq!(
        get(&s, "b", "b"),
        None,
        "nothing of a refused write is kept"
    );
    // A batch that would pass the key cap keeps none of its keys.
    let pairs = ["x", "y", "z"]
        .iter()
        .map(|k| KvPair {
            key: k.to_string(),
            value: vec![],
        })
        .collect();
    let e = s.run("shop", "b", KvOp::SetMany { pairs }, l).unwrap_err();
    assert!(e.to_string().contains("4 keys of at most 3"), "{e}");
    assert_eq!(get(&s, "b", "x"), None);
    assert_eq!(s.usage("shop", "b"), BucketUsage { keys: 1, bytes: 11 });
    // A lower quota later: the bucket is over it, but may still shrink.
    let tight = BucketLimits { keys: 3, bytes: 5 };
    ok(set(&s, "b", "a", b"012", tight));
    assert!(set(&s, "b", "a", b"01234", tight).is_err());
    ok(s.run("shop", "b", KvOp::Delete { key: "a".into() }, tight));
    assert_eq!(s.usage("shop", "b"), BucketUsage::default());
    // Oversized values and bad keys are refused with the figures.
    let big = vec![0u8; MAX_VALUE_BYTES + 1];
    let e = set(&s, "b", "big", &big, BucketLimits::default()).unwrap_err();
    assert!(e.to_string().contains("at most 1048576 bytes"), "{e}");
    assert!(set(&s, "b", "", b"", l).is_err());
}

fn pod(name: &str, node: &str, buckets: &[&str]) -> Object {
    let mut p = Pod {
        metadata: ObjectMeta {
            name: name.into(),
            namespace: "shop".into(),
            ..Default::default()
        },
        spec: PodSpec {
            members: vec![MemberSpec {
                name: "m".into(),
                wasi: HostInterfaces {
                    keyvalue: buckets.iter().map(|b| b.to_string()).collect(),
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    p.status.node = Some(node.into());
    p.status.phase = PodPhase::Running;
    Object::Pod(p)
}

#[tokio::test]
async fn a_node_may_use_only_the_buckets_its_own_pods_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    for p in [pod("web", "n1", &["carts"]), pod("api", "n2", &["carts"])] {
        store.put(p, Expect::Absent, WriteDurability::Sync).unwrap();
    }
    let cluster = crate::cluster::for_tests(Arc::new(store), dir.path());
    let req = |pod: &str, bucket: &str, op| KvRequest {
        namespace: "shop".into(),
        pod: pod.into(),
        bucket: bucket.into(),
        op,
    };
    let put = KvOp::Set {
        key: "k".into(),
        value: b"v".to_vec(),
    };
    assert_eq!(
        serve(&cluster, "n1", req("web", "carts", put.clone())).await,
        Ok(KvAnswer::Done)
    );
    // Another node's pod, a bucket the pod does not name, a pod that is
    // not there: refused, naming why.
    for (node, p, b, why) in [
        ("n1", "api", "carts", "not bound to node n1"),
        ("n1", "web", "orders", "names bucket \"orders\""),
        ("n1", "gone", "carts", "does not exist"),
    ] {
        let e = serve(&cluster, node, req(p, b, put.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, KvError::AccessDenied(m) if m.contains(why)),
            "{e}"
        );
    }
    // The other node's pod reads what the first wrote: one bucket per
    // namespace, whichever node asks.
    assert_eq!(
        serve(
            &cluster,
            "n2",
            req("api", "carts", KvOp::Get { key: "k".into() })
        )
        .await,
        Ok(KvAnswer::Value(Some(b"v".to_vec())))
    );
}
