//! The object store: a trait with optimistic concurrency and watch, and the
//! embedded redb backend.
//!
//! Every write bumps one store-wide revision, which becomes the written
//! object's `resource_version`. A write names the version it expects; a stale
//! one is refused with [`StoreError::Conflict`] (HTTP 409), never merged.

use flotilla_api::Object;
use flotilla_api::time::now_ms;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::broadcast;

mod etcd;
#[doc(hidden)]
pub use etcd::local::{LocalEtcd, MemberTls};
pub use etcd::{EtcdConfig, EtcdStore};

const OBJECTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// redb page cache size.
const CACHE_BYTES: usize = 4 << 20;
/// Watch events kept in memory for `watch_from`.
const HISTORY: usize = 1024;

/// What a write expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Creation: the key must not exist.
    Absent,
    /// Update: the object must be at exactly this resource version.
    Version(u64),
}

/// How soon a write must be on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteDurability {
    /// On disk when the call returns (user intent: applies, deletes, scales).
    Sync,
    /// On disk with the next synced write or flush (status updates from
    /// controllers and agents, which are re-derived after a crash anyway).
    Lazy,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error(
        "{key} was modified (resource version {actual}, your write expected {expected}); read it again and retry"
    )]
    Conflict {
        key: String,
        expected: u64,
        actual: u64,
    },
    #[error("store backend: {0}")]
    Backend(String),
    #[error("stored object {key} is corrupt: {why}")]
    Corrupt { key: String, why: String },
    #[error("watch revision {0} is no longer in history; list again")]
    TooOld(u64),
    /// The write was fenced: this scheduler wrote as the leader, and its
    /// leadership (term) is over. Nothing was written; try again (the
    /// request goes to the new leader).
    #[error(
        "this scheduler is no longer the leader (term {0} ended); nothing was written, try again"
    )]
    Fenced(u64),
    /// The store did not answer in time (e.g. etcd electing a leader of
    /// its own): the write may or may not have been made; try again.
    #[error("the store is unavailable right now ({0}); try again")]
    Unavailable(String),
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A change seen by watchers.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub revision: u64,
    pub deleted: bool,
    pub object: Arc<Object>,
}

/// The store interface controllers and the API use.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Option<Arc<Object>>;
    /// Objects whose key starts with `prefix` (`pods/`, `pods/default/`), in key order.
    fn list(&self, prefix: &str) -> Vec<Arc<Object>>;
    /// Writes `obj` if the stored version matches `expect`; returns the stored object.
    fn put(
        &self,
        obj: Object,
        expect: Expect,
        durability: WriteDurability,
    ) -> Result<Arc<Object>, StoreError> {
        self.put_many(vec![(obj, expect)], durability)
            .pop()
            .expect("one result per item")
    }
    /// Writes several objects in one transaction. Each is checked against
    /// its `Expect` on its own: the ones that fail are left out and the rest
    /// commit together (or, if the commit fails, none do).
    fn put_many(
        &self,
        items: Vec<(Object, Expect)>,
        durability: WriteDurability,
    ) -> Vec<Result<Arc<Object>, StoreError>>;
    /// Deletes the object if its version matches (`None`: any version).
    fn delete(&self, key: &str, expect: Option<u64>) -> Result<Arc<Object>, StoreError>;
    /// Current revision.
    fn revision(&self) -> u64;
    /// The objects under `prefix` and the revision they are current at.
    fn snapshot(&self, prefix: &str) -> (u64, Vec<Arc<Object>>);
    /// Events after `revision`, then a receiver of the ones to come.
    fn watch_from(
        &self,
        revision: u64,
    ) -> Result<(Vec<WatchEvent>, broadcast::Receiver<WatchEvent>), StoreError>;
    /// Makes every lazy write durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Waits until the in-memory copy holds every write committed before
    /// the call, whoever made it (a follower's reads do this first, so no
    /// read goes back behind one a client already saw). A store only this
    /// process writes is always there.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Writes every Secret to disk again, sealed with the current key (after
    /// a key rotation); returns how many. Stores that keep nothing on disk
    /// have nothing to do.
    fn reseal(&self) -> Result<usize, StoreError> {
        Ok(0)
    }
}

/// What a backend holds in memory: every object, the revision they are
/// current at, and the last [`HISTORY`] events for `watch_from`. Reads
/// never leave the process.
struct Cache {
    objects: BTreeMap<String, Arc<Object>>,
    revision: u64,
    history: VecDeque<WatchEvent>,
    /// The history holds every event after this revision (revisions need
    /// not be contiguous: etcd's count writes outside the store's prefix).
    since: u64,
}

impl Cache {
    fn new(objects: BTreeMap<String, Arc<Object>>, revision: u64) -> Cache {
        Cache {
            objects,
            revision,
            history: VecDeque::new(),
            since: revision,
        }
    }

    /// Watchers from before `revision` can no longer be served from the
    /// history (the objects were replaced wholesale).
    fn forget_before(&mut self, revision: u64) {
        self.since = self.since.max(revision);
    }

    fn range(&self, prefix: &str) -> Vec<Arc<Object>> {
        self.objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Records `ev` in the history and sends it to watchers.
    fn publish(&mut self, tx: &broadcast::Sender<WatchEvent>, ev: WatchEvent) {
        if self.history.len() == HISTORY
            && let Some(first) = self.history.pop_front()
        {
            self.since = self.since.max(first.revision);
        }
        self.history.push_back(ev.clone());
        let _ = tx.send(ev);
    }

    /// The events after `revision` from the history, and a receiver of the
    /// ones to come (subscribed under the same lock, so none falls between).
    fn watch_from(
        &self,
        tx: &broadcast::Sender<WatchEvent>,
        revision: u64,
    ) -> Result<(Vec<WatchEvent>, broadcast::Receiver<WatchEvent>), StoreError> {
        let rx = tx.subscribe();
        if revision >= self.revision {
            return Ok((Vec::new(), rx));
        }
        if revision < self.since {
            return Err(StoreError::TooOld(revision));
        }
        Ok((
            self.history
                .iter()
                .filter(|e| e.revision > revision)
                .cloned()
                .collect(),
            rx,
        ))
    }
}

/// The bytes `obj` is stored as under `key`: JSON, sealed for Secrets.
fn encode(
    sealer: Option<&flotilla_api::seal::Sealer>,
    key: &str,
    obj: &Object,
) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(obj).map_err(backend)?;
    match (sealer, obj) {
        (Some(s), Object::Secret(_)) => s.seal(key, &json).map_err(backend),
        _ => Ok(json),
    }
}

/// The object stored as `bytes` under `key`, and whether it is a Secret
/// stored plain although a sealer is in use (an older store).
fn decode(
    sealer: Option<&flotilla_api::seal::Sealer>,
    key: &str,
    bytes: &[u8],
) -> Result<(Object, bool), StoreError> {
    let corrupt = |why: String| StoreError::Corrupt {
        key: key.to_string(),
        why,
    };
    if flotilla_api::seal::Sealer::is_sealed(bytes) {
        let sealer = sealer
            .ok_or_else(|| corrupt("a sealed secret, and no secret key to open it".into()))?;
        let plain = sealer
            .open(key, bytes)
            .map_err(|e| corrupt(e.to_string()))?;
        let obj = serde_json::from_slice(&plain).map_err(|e| corrupt(e.to_string()))?;
        Ok((obj, false))
    } else {
        let obj: Object = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        let plain_secret = matches!(obj, Object::Secret(_)) && sealer.is_some();
        Ok((obj, plain_secret))
    }
}

/// Sets the identity a write keeps or gets: on creation a uid (unless the
/// writer chose one), the creation time and generation 1; on update the
/// stored object's uid and creation time.
fn stamp(obj: &mut Object, current: Option<&Object>) {
    let meta = obj.meta_mut();
    match current {
        None => {
            if meta.uid.is_empty() {
                meta.uid = uuid::Uuid::new_v4().to_string();
            }
            meta.created_ms = now_ms();
            meta.generation = meta.generation.max(1);
        }
        Some(cur) => {
            meta.uid = cur.meta().uid.clone();
            meta.created_ms = cur.meta().created_ms;
        }
    }
}

/// The embedded store: one redb file, with every object also held in memory
/// (reads never touch the disk or parse JSON).
pub struct RedbStore {
    db: Database,
    cache: RwLock<Cache>,
    /// Serializes writers so revisions and events are published in order.
    write: Mutex<()>,
    tx: broadcast::Sender<WatchEvent>,
    /// Seals Secrets on disk (`None`: stored plain, for tests and tools).
    sealer: Option<Arc<flotilla_api::seal::Sealer>>,
}

impl RedbStore {
    /// Opens (or creates) the store file and loads every object; Secrets
    /// are kept plain on disk.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        Self::open_sealed(path, None)
    }

    /// Opens the store with Secrets sealed on disk by `sealer`; any found
    /// plain (an older store) are sealed at once.
    pub fn open_sealed(
        path: &Path,
        sealer: Option<Arc<flotilla_api::seal::Sealer>>,
    ) -> Result<RedbStore, StoreError> {
        // Every object is also held in memory above, so redb's own page cache
        // only needs to serve writes; keep it small (the default is 1 GiB).
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(backend)?;
        let w = db.begin_write().map_err(backend)?;
        w.open_table(OBJECTS).map_err(backend)?;
        w.open_table(META).map_err(backend)?;
        w.commit().map_err(backend)?;

        let r = db.begin_read().map_err(backend)?;
        let revision = r
            .open_table(META)
            .map_err(backend)?
            .get(REVISION)
            .map_err(backend)?
            .map_or(0, |v| v.value());
        let mut objects = BTreeMap::new();
        let mut plain_secrets = 0usize;
        for entry in r
            .open_table(OBJECTS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = entry.map_err(backend)?;
            let key = k.value().to_string();
            let (obj, plain_secret) = decode(sealer.as_deref(), &key, v.value())?;
            plain_secrets += usize::from(plain_secret);
            objects.insert(key, Arc::new(obj));
        }
        drop(r);
        let (tx, _) = broadcast::channel(1 << 16);
        let store = RedbStore {
            db,
            cache: RwLock::new(Cache::new(objects, revision)),
            write: Mutex::new(()),
            tx,
            sealer,
        };
        if plain_secrets > 0 {
            let n = store.reseal()?;
            tracing::info!(secrets = n, "sealed secrets found stored plain");
        }
        Ok(store)
    }

    fn encode(&self, key: &str, obj: &Object) -> Result<Vec<u8>, StoreError> {
        encode(self.sealer.as_deref(), key, obj)
    }

    fn commit(
        &self,
        key: &str,
        value: Option<&[u8]>,
        revision: u64,
        durability: WriteDurability,
    ) -> Result<(), StoreError> {
        self.commit_many(&[(key, value)], revision, durability)
    }

    /// One transaction writing (or with `None`, removing) every key.
    fn commit_many(
        &self,
        writes: &[(&str, Option<&[u8]>)],
        revision: u64,
        durability: WriteDurability,
    ) -> Result<(), StoreError> {
        let mut w = self.db.begin_write().map_err(backend)?;
        w.set_durability(match durability {
            WriteDurability::Sync => Durability::Immediate,
            WriteDurability::Lazy => Durability::None,
        })
        .map_err(backend)?;
        {
            let mut t = w.open_table(OBJECTS).map_err(backend)?;
            for (key, value) in writes {
                match value {
                    Some(v) => {
                        t.insert(*key, *v).map_err(backend)?;
                    }
                    None => {
                        t.remove(*key).map_err(backend)?;
                    }
                }
            }
            w.open_table(META)
                .map_err(backend)?
                .insert(REVISION, revision)
                .map_err(backend)?;
        }
        w.commit().map_err(backend)
    }

    fn publish(&self, cache: &mut Cache, ev: WatchEvent) {
        cache.publish(&self.tx, ev);
    }
}

impl Store for RedbStore {
    fn get(&self, key: &str) -> Option<Arc<Object>> {
        self.cache
            .read()
            .expect("poisoned")
            .objects
            .get(key)
            .cloned()
    }

    fn list(&self, prefix: &str) -> Vec<Arc<Object>> {
        self.cache.read().expect("poisoned").range(prefix)
    }

    fn put_many(
        &self,
        items: Vec<(Object, Expect)>,
        durability: WriteDurability,
    ) -> Vec<Result<Arc<Object>, StoreError>> {
        let _w = self.write.lock().expect("poisoned");
        let mut revision = self.revision();
        // Objects written earlier in this batch count as current for later ones.
        let mut written: HashMap<String, Arc<Object>> = HashMap::new();
        let mut results = Vec::with_capacity(items.len());
        let mut staged: Vec<(String, Vec<u8>, Arc<Object>)> = Vec::new();
        for (mut obj, expect) in items {
            let key = obj.key();
            let current = written.get(&key).cloned().or_else(|| self.get(&key));
            let check = match (expect, &current) {
                (Expect::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.clone())),
                (Expect::Version(_), None) => Err(StoreError::NotFound(key.clone())),
                (Expect::Version(v), Some(cur)) if cur.meta().resource_version != v => {
                    Err(StoreError::Conflict {
                        key: key.clone(),
                        expected: v,
                        actual: cur.meta().resource_version,
                    })
                }
                _ => Ok(()),
            };
            if let Err(e) = check {
                results.push(Err(e));
                continue;
            }
            obj.meta_mut().resource_version = revision + 1;
            stamp(&mut obj, current.as_deref());
            let bytes = match self.encode(&key, &obj) {
                Ok(b) => b,
                Err(e) => {
                    results.push(Err(backend(e)));
                    continue;
                }
            };
            revision += 1;
            let obj = Arc::new(obj);
            written.insert(key.clone(), obj.clone());
            staged.push((key, bytes, obj.clone()));
            results.push(Ok(obj));
        }
        if staged.is_empty() {
            return results;
        }
        let writes: Vec<(&str, Option<&[u8]>)> = staged
            .iter()
            .map(|(k, b, _)| (k.as_str(), Some(b.as_slice())))
            .collect();
        if let Err(e) = self.commit_many(&writes, revision, durability) {
            let why = e.to_string();
            return results
                .into_iter()
                .map(|r| r.and(Err(StoreError::Backend(why.clone()))))
                .collect();
        }
        let mut c = self.cache.write().expect("poisoned");
        c.revision = revision;
        for (key, _, obj) in staged {
            c.objects.insert(key, obj.clone());
            let revision = obj.meta().resource_version;
            self.publish(
                &mut c,
                WatchEvent {
                    revision,
                    deleted: false,
                    object: obj,
                },
            );
        }
        results
    }

    fn delete(&self, key: &str, expect: Option<u64>) -> Result<Arc<Object>, StoreError> {
        let _w = self.write.lock().expect("poisoned");
        let current = self
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if let Some(v) = expect
            && current.meta().resource_version != v
        {
            return Err(StoreError::Conflict {
                key: key.to_string(),
                expected: v,
                actual: current.meta().resource_version,
            });
        }
        let revision = self.revision() + 1;
        self.commit(key, None, revision, WriteDurability::Sync)?;
        let mut c = self.cache.write().expect("poisoned");
        c.objects.remove(key);
        c.revision = revision;
        self.publish(
            &mut c,
            WatchEvent {
                revision,
                deleted: true,
                object: current.clone(),
            },
        );
        Ok(current)
    }

    fn revision(&self) -> u64 {
        self.cache.read().expect("poisoned").revision
    }

    fn snapshot(&self, prefix: &str) -> (u64, Vec<Arc<Object>>) {
        let c = self.cache.read().expect("poisoned");
        (c.revision, c.range(prefix))
    }

    fn watch_from(
        &self,
        revision: u64,
    ) -> Result<(Vec<WatchEvent>, broadcast::Receiver<WatchEvent>), StoreError> {
        self.cache
            .read()
            .expect("poisoned")
            .watch_from(&self.tx, revision)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let _w = self.write.lock().expect("poisoned");
        let mut w = self.db.begin_write().map_err(backend)?;
        w.set_durability(Durability::Immediate).map_err(backend)?;
        w.commit().map_err(backend)
    }

    fn reseal(&self) -> Result<usize, StoreError> {
        if self.sealer.is_none() {
            return Ok(0);
        }
        let _w = self.write.lock().expect("poisoned");
        let cache = self.cache.read().expect("poisoned");
        let mut staged = Vec::new();
        for (key, obj) in &cache.objects {
            if matches!(**obj, Object::Secret(_)) {
                staged.push((key.as_str(), self.encode(key, obj)?));
            }
        }
        let writes: Vec<(&str, Option<&[u8]>)> = staged
            .iter()
            .map(|(k, b)| (*k, Some(b.as_slice())))
            .collect();
        self.commit_many(&writes, cache.revision, WriteDurability::Sync)?;
        Ok(staged.len())
    }
}

/// Stores for tests.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// Which write a [`Racing`] store is about to make.
    #[derive(Clone, Copy, Debug)]
    pub enum Write<'a> {
        One(&'a Object, Expect),
        Many,
    }

    /// A redb store in which another writer acts just before writes:
    /// `before` runs ahead of each `put` and `put_many`, with the store to
    /// write to itself — a controller or an API call racing the caller.
    pub struct Racing<F> {
        pub inner: RedbStore,
        pub before: F,
    }

    impl<F: Fn(&RedbStore, Write<'_>) + Send + Sync + 'static> Store for Racing<F> {
        fn get(&self, key: &str) -> Option<Arc<Object>> {
            self.inner.get(key)
        }
        fn list(&self, prefix: &str) -> Vec<Arc<Object>> {
            self.inner.list(prefix)
        }
        fn put(
            &self,
            obj: Object,
            expect: Expect,
            durability: WriteDurability,
        ) -> Result<Arc<Object>, StoreError> {
            (self.before)(&self.inner, Write::One(&obj, expect));
            self.inner.put(obj, expect, durability)
        }
        fn put_many(
            &self,
            items: Vec<(Object, Expect)>,
            durability: WriteDurability,
        ) -> Vec<Result<Arc<Object>, StoreError>> {
            (self.before)(&self.inner, Write::Many);
            self.inner.put_many(items, durability)
        }
        fn delete(&self, key: &str, expect: Option<u64>) -> Result<Arc<Object>, StoreError> {
            self.inner.delete(key, expect)
        }
        fn revision(&self) -> u64 {
            self.inner.revision()
        }
        fn snapshot(&self, prefix: &str) -> (u64, Vec<Arc<Object>>) {
            self.inner.snapshot(prefix)
        }
        fn watch_from(
            &self,
            revision: u64,
        ) -> Result<(Vec<WatchEvent>, broadcast::Receiver<WatchEvent>), StoreError> {
            self.inner.watch_from(revision)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use flotilla_api::{ObjectMeta, Pod};

    pub(super) fn pod(name: &str) -> Object {
        Object::Pod(Pod {
            metadata: ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[test]
    fn versions_conflicts_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let uid;
        {
            let s = RedbStore::open(&path).unwrap();
            let a = s
                .put(pod("a"), Expect::Absent, WriteDurability::Sync)
                .unwrap();
            assert_eq!(a.meta().resource_version, 1);
            uid = a.meta().uid.clone();
            assert!(!uid.is_empty());
            assert!(matches!(
                s.put(pod("a"), Expect::Absent, WriteDurability::Sync),
                Err(StoreError::AlreadyExists(_))
            ));
            let b = s
                .put(pod("a"), Expect::Version(1), WriteDurability::Sync)
                .unwrap();
            assert_eq!(b.meta().resource_version, 2);
            assert_eq!(b.meta().uid, uid, "uid survives updates");
            // A writer that read version 1 is refused.
            let err = s
                .put(pod("a"), Expect::Version(1), WriteDurability::Sync)
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Conflict {
                        expected: 1,
                        actual: 2,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(matches!(
                s.delete("pods/default/a", Some(1)),
                Err(StoreError::Conflict { .. })
            ));
            s.put(pod("b"), Expect::Absent, WriteDurability::Lazy)
                .unwrap();
            s.put(pod("c"), Expect::Absent, WriteDurability::Sync)
                .unwrap();
            s.delete("pods/default/c", None).unwrap();
            assert_eq!(s.list("pods/").len(), 2);
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.revision(), 5);
        let keys: Vec<String> = s.list("pods/").iter().map(|o| o.key()).collect();
        assert_eq!(keys, ["pods/default/a", "pods/default/b"]);
        assert_eq!(s.get("pods/default/a").unwrap().meta().uid, uid);
    }

    #[test]
    fn watch_replays_history_then_streams() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        s.put(pod("a"), Expect::Absent, WriteDurability::Lazy)
            .unwrap();
        s.put(pod("b"), Expect::Absent, WriteDurability::Lazy)
            .unwrap();
        let (past, mut rx) = s.watch_from(1).unwrap();
        assert_eq!(past.len(), 1);
        assert_eq!(past[0].object.meta().name, "b");
        s.delete("pods/default/a", None).unwrap();
        let ev = rx.try_recv().unwrap();
        assert!(ev.deleted);
        assert_eq!(ev.revision, 3);
        assert!(s.watch_from(0).is_ok());
        assert!(s.list("nodes/").is_empty());
    }

    fn secret(value: &str) -> Object {
        Object::Secret(flotilla_api::Secret {
            metadata: ObjectMeta {
                name: "db".into(),
                namespace: "default".into(),
                ..ObjectMeta::default()
            },
            data: [("password".to_string(), value.to_string())].into(),
            binary_data: Default::default(),
        })
    }

    fn file_has(path: &Path, needle: &[u8]) -> bool {
        std::fs::read(path)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    #[test]
    fn secrets_are_sealed_on_disk_and_open_after_a_restart_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let sealer =
            Arc::new(flotilla_api::seal::Sealer::load_or_create(&dir.path().join("k")).unwrap());
        {
            let s = RedbStore::open_sealed(&path, Some(sealer.clone())).unwrap();
            s.put(
                secret("hunter2-sealed"),
                Expect::Absent,
                WriteDurability::Sync,
            )
            .unwrap();
            s.put(pod("a"), Expect::Absent, WriteDurability::Sync)
                .unwrap();
            assert!(!file_has(&path, b"hunter2-sealed"));
            assert!(file_has(&path, b"pods/default/a"), "other kinds stay plain");
        }
        // Without the key the store refuses to start, naming the object.
        let err = RedbStore::open(&path).err().unwrap();
        assert!(err.to_string().contains("secrets/default/db"), "{err}");
        let s = RedbStore::open_sealed(&path, Some(sealer.clone())).unwrap();
        let Some(obj) = s.get("secrets/default/db") else {
            panic!("secret gone")
        };
        assert_eq!(*obj, {
            let mut want = secret("hunter2-sealed");
            want.meta_mut().clone_from(obj.meta());
            want
        });
        // Rotation: sealed again with the new key, the old one forgotten.
        sealer.rotate().unwrap();
        assert_eq!(s.reseal().unwrap(), 1);
        sealer.forget_old().unwrap();
        drop(s);
        let s = RedbStore::open_sealed(&path, Some(sealer)).unwrap();
        assert!(s.get("secrets/default/db").is_some());
    }

    #[test]
    fn plain_secrets_of_an_older_store_are_sealed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.put(secret("old-plain"), Expect::Absent, WriteDurability::Sync)
                .unwrap();
        }
        let sealer =
            Arc::new(flotilla_api::seal::Sealer::load_or_create(&dir.path().join("k")).unwrap());
        drop(RedbStore::open_sealed(&path, Some(sealer.clone())).unwrap());
        // Readable only with the key now.
        assert!(RedbStore::open(&path).is_err());
        let s = RedbStore::open_sealed(&path, Some(sealer)).unwrap();
        assert!(s.get("secrets/default/db").is_some());
    }
}
