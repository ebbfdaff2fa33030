//! The etcd backend against a real etcd (Debian's `etcd-server`) on
//! loopback.

use super::local::LocalEtcd;
use super::*;
use crate::store::tests::pod;
use flotilla_api::ObjectMeta;
use std::time::Instant;

/// Deadline of every wait for an event (generous: a loaded machine).
const WITHIN: Duration = Duration::from_secs(60);

fn labelled(name: &str, value: &str) -> Object {
    let mut p = pod(name);
    p.meta_mut().labels.insert("v".into(), value.into());
    p
}

fn open(e: &LocalEtcd) -> EtcdStore {
    EtcdStore::connect(&EtcdConfig::parse(&e.url()).unwrap(), None).unwrap()
}

/// The next event of `rx`, waiting up to [`WITHIN`].
fn next(rx: &mut broadcast::Receiver<WatchEvent>) -> WatchEvent {
    let began = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(ev) => return ev,
            Err(broadcast::error::TryRecvError::Empty) => {
                assert!(began.elapsed() < WITHIN, "no event within {WITHIN:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("watch: {e}"),
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let began = Instant::now();
    while !f() {
        assert!(began.elapsed() < WITHIN, "not within {WITHIN:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn addresses_parse_and_bad_ones_say_why() {
    let c = EtcdConfig::parse("etcd://10.0.0.1:2379,10.0.0.2:2379").unwrap();
    assert_eq!(c.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
    assert_eq!(c.prefix, "/flotilla/");
    assert_eq!(
        EtcdConfig::parse("etcd://h:2379/site-a").unwrap().prefix,
        "/site-a/"
    );
    let e = EtcdConfig::parse("http://h:2379").unwrap_err();
    assert!(e.contains("etcd://HOST:PORT"), "{e}");
    let e = EtcdConfig::parse("etcd://h1:2379,h2").unwrap_err();
    assert!(e.contains("\"h2\" is not HOST:PORT"), "{e}");
    assert_eq!(range_end("/flotilla/"), b"/flotilla0");
}

#[test]
fn versions_are_etcd_revisions_and_stale_writes_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let s = open(&e);
    let a = s
        .put(pod("a"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    let v1 = a.meta().resource_version;
    assert!(v1 > 0);
    assert_eq!(s.revision(), v1, "a write returns once the cache has it");
    let uid = a.meta().uid.clone();
    assert!(!uid.is_empty());
    assert!(matches!(
        s.put(pod("a"), Expect::Absent, WriteDurability::Sync),
        Err(StoreError::AlreadyExists(_))
    ));
    let b = s
        .put(
            labelled("a", "2"),
            Expect::Version(v1),
            WriteDurability::Sync,
        )
        .unwrap();
    let v2 = b.meta().resource_version;
    assert!(v2 > v1);
    assert_eq!(b.meta().uid, uid, "uid survives updates");
    assert_eq!(s.get("pods/default/a").unwrap(), b);
    let err = s
        .put(pod("a"), Expect::Version(v1), WriteDurability::Sync)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { expected, actual, .. } if *expected == v1 && *actual == v2),
        "{err}"
    );
    assert!(matches!(
        s.put(pod("zz"), Expect::Version(3), WriteDurability::Sync),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.delete("pods/default/a", Some(v1)),
        Err(StoreError::Conflict { .. })
    ));
    s.put(pod("b"), Expect::Absent, WriteDurability::Lazy)
        .unwrap();
    s.put(pod("c"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    let gone = s.delete("pods/default/c", None).unwrap();
    assert_eq!(gone.meta().name, "c");
    assert!(matches!(
        s.delete("pods/default/c", None),
        Err(StoreError::NotFound(_))
    ));
    let rev = s.revision();
    drop(s);
    // Another scheduler (or this one restarted) sees the same objects at
    // the same versions.
    let s = open(&e);
    assert_eq!(s.revision(), rev);
    let keys: Vec<String> = s.list("pods/").iter().map(|o| o.key()).collect();
    assert_eq!(keys, ["pods/default/a", "pods/default/b"]);
    let a = s.get("pods/default/a").unwrap();
    assert_eq!(
        (a.meta().uid.as_str(), a.meta().resource_version),
        (uid.as_str(), v2)
    );
}

#[test]
fn two_schedulers_see_each_others_writes_and_race_with_409() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let (one, two) = (open(&e), open(&e));
    let (_, mut rx) = two.watch_from(two.revision()).unwrap();
    let a = one
        .put(pod("a"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    let ev = next(&mut rx);
    assert_eq!(
        (ev.object.key(), ev.deleted),
        ("pods/default/a".into(), false)
    );
    assert_eq!(ev.revision, a.meta().resource_version);
    assert_eq!(two.get("pods/default/a").unwrap(), a);
    // Both read version v; the first write wins, the second is a conflict.
    let v = a.meta().resource_version;
    one.put(
        labelled("a", "one"),
        Expect::Version(v),
        WriteDurability::Sync,
    )
    .unwrap();
    let err = two
        .put(
            labelled("a", "two"),
            Expect::Version(v),
            WriteDurability::Sync,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    wait_until("two sees one's update", || {
        two.get("pods/default/a")
            .is_some_and(|o| o.meta().labels.get("v").map(String::as_str) == Some("one"))
    });
}

#[test]
fn batches_larger_than_a_transaction_commit_and_only_stale_items_fail() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let s = open(&e);
    let existing = s
        .put(pod("p-0007"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    let items: Vec<(Object, Expect)> = (0..150)
        .map(|i| (pod(&format!("p-{i:04}")), Expect::Absent))
        .collect();
    let out = s.put_many(items, WriteDurability::Lazy);
    assert_eq!(out.len(), 150);
    for (i, r) in out.iter().enumerate() {
        match i {
            7 => assert!(matches!(r, Err(StoreError::AlreadyExists(_))), "{r:?}"),
            _ => assert!(r.is_ok(), "item {i}: {r:?}"),
        }
    }
    assert_eq!(s.list("pods/").len(), 150);
    assert_eq!(s.get("pods/default/p-0007").unwrap(), existing);
    // The same key twice in one batch: the second sees the first written.
    let v = existing.meta().resource_version;
    let out = s.put_many(
        vec![
            (labelled("p-0007", "x"), Expect::Version(v)),
            (labelled("p-0007", "y"), Expect::Version(v)),
        ],
        WriteDurability::Sync,
    );
    assert!(out[0].is_ok());
    assert!(
        matches!(out[1], Err(StoreError::Conflict { .. })),
        "{:?}",
        out[1]
    );
}

#[test]
fn the_watch_resumes_after_etcd_restarts_without_missing_or_repeating_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = LocalEtcd::start(dir.path());
    let follower = open(&e);
    let (_, mut rx) = follower.watch_from(follower.revision()).unwrap();
    let writer = open(&e);
    writer
        .put(pod("before"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    assert_eq!(next(&mut rx).object.meta().name, "before");

    e.kill();
    let err = writer
        .put(pod("during"), Expect::Absent, WriteDurability::Sync)
        .unwrap_err();
    assert!(err.to_string().contains("etcd"), "{err}");
    e.resume();

    // Writes after the outage (the client reconnects on its own).
    let mut written = Vec::new();
    for i in 0..20 {
        let name = format!("after-{i:02}");
        let began = Instant::now();
        let obj = loop {
            match writer.put(pod(&name), Expect::Absent, WriteDurability::Sync) {
                Ok(o) => break o,
                Err(StoreError::AlreadyExists(_)) => {
                    break writer.get(&format!("pods/default/{name}")).unwrap();
                }
                Err(e) => {
                    assert!(
                        began.elapsed() < WITHIN,
                        "etcd is back but writes fail: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        written.push((obj.meta().name.clone(), obj.meta().resource_version));
    }
    let sentinel = writer
        .put(pod("sentinel"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    // The follower gets each write once, in order, then the sentinel: none
    // missed, none repeated.
    let mut seen = Vec::new();
    loop {
        let ev = next(&mut rx);
        if ev.object.meta().name == "sentinel" {
            assert_eq!(ev.revision, sentinel.meta().resource_version);
            break;
        }
        seen.push((ev.object.meta().name.clone(), ev.revision));
    }
    assert_eq!(seen, written);
    assert_eq!(follower.list("pods/").len(), 22);
}

#[test]
fn a_feed_behind_a_compaction_lists_again_and_publishes_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let behind = open(&e);
    let other = open(&e);
    let kept = other
        .put(pod("kept"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    other
        .put(pod("removed"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    let changed = other
        .put(pod("changed"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    wait_until("behind has all three", || behind.list("pods/").len() == 3);
    let old = behind.revision();
    let (_, mut rx) = behind.watch_from(old).unwrap();

    behind.pause_feed(true);
    other.delete("pods/default/removed", None).unwrap();
    let changed = other
        .put(
            labelled("changed", "2"),
            Expect::Version(changed.meta().resource_version),
            WriteDurability::Sync,
        )
        .unwrap();
    other
        .put(pod("added"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    other.compact(other.revision()).unwrap();
    behind.pause_feed(false);

    let mut events: Vec<(String, bool)> = (0..3)
        .map(|_| {
            let ev = next(&mut rx);
            (ev.object.meta().name.clone(), ev.deleted)
        })
        .collect();
    events.sort();
    assert_eq!(
        events,
        [
            ("added".to_string(), false),
            ("changed".to_string(), false),
            ("removed".to_string(), true)
        ]
    );
    assert_eq!(behind.get("pods/default/changed").unwrap(), changed);
    assert_eq!(behind.get("pods/default/kept").unwrap(), kept);
    assert!(behind.get("pods/default/removed").is_none());
    // A watcher from before the relist must list again.
    assert!(matches!(behind.watch_from(old), Err(StoreError::TooOld(_))));
}

#[test]
fn secrets_are_sealed_in_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let sealer = Arc::new(Sealer::load_or_create(&dir.path().join("k")).unwrap());
    let cfg = EtcdConfig::parse(&e.url()).unwrap();
    let s = EtcdStore::connect(&cfg, Some(sealer.clone())).unwrap();
    let secret = Object::Secret(flotilla_api::Secret {
        metadata: ObjectMeta {
            name: "db".into(),
            namespace: "default".into(),
            ..ObjectMeta::default()
        },
        data: [("password".to_string(), "hunter2-in-etcd".to_string())].into(),
        binary_data: Default::default(),
    });
    s.put(secret, Expect::Absent, WriteDurability::Sync)
        .unwrap();
    let raw = {
        let mut c = s.client.clone();
        s.run(async move { c.get("/flotilla/secrets/default/db", None).await })
            .unwrap()
    };
    let value = raw.kvs()[0].value();
    assert!(!value.windows(7).any(|w| w == b"hunter2"), "stored sealed");
    // Without the key a scheduler refuses to start, naming the object.
    let err = EtcdStore::connect(&cfg, None).err().unwrap();
    assert!(err.to_string().contains("secrets/default/db"), "{err}");
    let again = EtcdStore::connect(&cfg, Some(sealer)).unwrap();
    match &*again.get("secrets/default/db").unwrap() {
        Object::Secret(s) => assert_eq!(s.data["password"], "hunter2-in-etcd"),
        o => panic!("{o:?}"),
    }
}

fn candidate(id: &str) -> crate::leader::Candidate {
    crate::leader::Candidate {
        id: id.into(),
        api: format!("https://{id}:7443"),
        quic: format!("{id}:7444"),
    }
}

fn term(l: &crate::leader::Leadership) -> Option<u64> {
    match l.role() {
        crate::leader::Role::Leader { term } => Some(term),
        crate::leader::Role::Follower { .. } => None,
    }
}

#[test]
fn one_of_two_candidates_leads_the_other_follows_it_and_takes_over_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let (a, b) = (open(&e), open(&e));
    let (la, lb) = (
        crate::leader::Leadership::candidate(),
        crate::leader::Leadership::candidate(),
    );
    let (stop_a, rx_a) = watch::channel(false);
    let (_stop_b, rx_b) = watch::channel(false);
    a.campaign(candidate("a"), la.clone(), rx_a);
    wait_until("a leads", || la.is_leader());
    b.campaign(candidate("b"), lb.clone(), rx_b);
    wait_until("b follows a", || lb.leader() == Some(candidate("a")));
    assert!(!lb.is_leader());
    let first = term(&la).unwrap();

    // The leader's writes carry its fence and land; a follower's too (it
    // writes unfenced, as the API does).
    a.put(pod("by-a"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    b.put(pod("by-b"), Expect::Absent, WriteDurability::Sync)
        .unwrap();

    // A graceful stop hands over at once (the lease is revoked).
    stop_a.send(true).unwrap();
    wait_until("b leads", || lb.is_leader());
    wait_until("a follows", || !la.is_leader());
    let second = term(&lb).unwrap();
    assert!(second > first, "terms grow: {first} then {second}");

    // b dies without a word (its runtime and lease renewals stop): a new
    // candidate takes over once etcd expires the lease, never before.
    let c = open(&e);
    let lc = crate::leader::Leadership::candidate();
    let (_stop_c, rx_c) = watch::channel(false);
    c.campaign(candidate("c"), lc.clone(), rx_c);
    wait_until("c follows b", || lc.leader() == Some(candidate("b")));
    drop(b);
    let died = Instant::now();
    wait_until("c leads", || lc.is_leader());
    let took = died.elapsed();
    assert!(
        took >= elect::LEASE_TTL - Duration::from_millis(600),
        "c led {took:?} after b died, before b's lease could expire"
    );
    assert!(term(&lc).unwrap() > second);
}

#[test]
fn a_deposed_leaders_writes_and_deletes_are_fenced_and_nothing_lands() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let a = open(&e);
    let la = crate::leader::Leadership::candidate();
    let (stop, rx) = watch::channel(false);
    let election = a.campaign(candidate("a"), la.clone(), rx);
    wait_until("a leads", || la.is_leader());
    a.put(pod("kept"), Expect::Absent, WriteDurability::Sync)
        .unwrap();
    let term = term(&la).unwrap() as i64;
    // a believes it still leads in a term that is over (the leader key is
    // another term's now): here, the term its fence compares is an old one.
    let stale = || {
        *a.fence.lock().unwrap() = Some(Fence {
            key: elect::leader_key(&a.prefix),
            term: term - 1,
        })
    };
    stale();
    let r = a.put(pod("late"), Expect::Absent, WriteDurability::Sync);
    assert!(
        matches!(r, Err(StoreError::Fenced(t)) if t == (term - 1) as u64),
        "{r:?}"
    );
    // The election heard of it: a stepped down (and may have won a new
    // term since). It is stopped here, so that it does not replace the
    // stale fence again.
    wait_until("a's term ends", || self::term(&la) != Some(term as u64));
    stop.send(true).unwrap();
    wait_until("the election stops", || election.is_finished());
    assert!(!la.is_leader());
    stale();
    let r = a.put_many(
        vec![
            (pod("late2"), Expect::Absent),
            (pod("late3"), Expect::Absent),
        ],
        WriteDurability::Sync,
    );
    assert!(
        r.iter().all(|r| matches!(r, Err(StoreError::Fenced(_)))),
        "{r:?}"
    );
    stale();
    let r = a.delete(&pod("kept").key(), None);
    assert!(matches!(r, Err(StoreError::Fenced(_))), "{r:?}");
    // Nothing landed, as another store (etcd's view) shows.
    let other = open(&e);
    assert!(other.get(&pod("late").key()).is_none());
    assert!(other.get(&pod("late2").key()).is_none());
    assert!(other.get(&pod("kept").key()).is_some());
}

#[test]
fn schedulers_of_one_store_must_share_the_ca_and_secrets_key() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let key = |n: &str| {
        Arc::new(flotilla_api::seal::Sealer::load_or_create(&dir.path().join(n)).unwrap())
    };
    let cfg = EtcdConfig::parse(&e.url()).unwrap();
    let first = EtcdStore::connect(&cfg, Some(key("k1"))).unwrap();
    first.check_identity("CA-ONE").unwrap();
    // The same CA and key (copied): accepted, again and again.
    let copy = dir.path().join("k1-copy");
    std::fs::copy(dir.path().join("k1"), &copy).unwrap();
    let second = EtcdStore::connect(&cfg, Some(key("k1-copy"))).unwrap();
    second.check_identity("CA-ONE").unwrap();
    second.check_identity("CA-ONE\n").unwrap();
    let e1 = second.check_identity("CA-TWO").unwrap_err().to_string();
    assert!(
        e1.contains("cluster CA is not the one") && e1.contains("copy pki/"),
        "{e1}"
    );
    let third = EtcdStore::connect(&cfg, Some(key("k2"))).unwrap();
    let e2 = third.check_identity("CA-ONE").unwrap_err().to_string();
    assert!(
        e2.contains("Secrets key cannot open") && e2.contains("secrets.key"),
        "{e2}"
    );
}

#[test]
fn a_sync_waits_for_writes_of_other_stores_even_outside_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path());
    let (a, b) = (open(&e), open(&e));
    a.pause_feed(false);
    // b writes; a read at a after a sync sees it, whatever the feed's pace.
    for i in 0..20 {
        let p = pod(&format!("p{i}"));
        b.put(p.clone(), Expect::Absent, WriteDurability::Sync)
            .unwrap();
        a.sync().unwrap();
        assert!(a.get(&p.key()).is_some(), "p{i} not at a after sync");
    }
    // A write outside the prefix moves etcd's revision past every object's;
    // the sync still returns (a progress notice covers it).
    let l = crate::leader::Leadership::candidate();
    let (_stop, rx) = watch::channel(false);
    b.campaign(candidate("b"), l.clone(), rx);
    wait_until("b leads", || l.is_leader());
    let began = Instant::now();
    a.sync().unwrap();
    assert!(
        began.elapsed() < APPLY_WAIT,
        "the sync waited out its whole limit"
    );
}
