//! Key-value buckets for `wasi:keyvalue`: kept by the scheduler in a redb
//! file of their own (`<data>/kv.redb`, apart from the object store, so a
//! member's writes never wake the controllers), one table keyed by
//! (namespace, bucket, key). Members reach them through their node's link
//! (`serve_node` authorizes: the pod is bound to the node and names the
//! bucket); people through the API (`flotilla kv`). A write is one
//! transaction, synced before it is answered, and refused — nothing of it
//! kept — when it would take its bucket past its quota (the namespace's
//! `bucket_keys`/`bucket_bytes`, else the defaults). Because the state is
//! the scheduler's, it is the same on whatever node the pod runs next and
//! survives pod and node restarts.

use crate::cluster::Cluster;
use flotilla_api::interfaces::{
    BucketLimits, BucketUsage, KvAnswer, KvError, KvOp, KvPair, KvReply, KvRequest, LIST_PAGE,
    MAX_VALUE_BYTES, check_key,
};
use flotilla_api::{Object, PodPhase};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

const KV: TableDefinition<'_, (&str, &str, &str), &[u8]> = TableDefinition::new("kv");

/// The buckets of every namespace.
pub struct KvStore {
    db: Database,
    /// What each (namespace, bucket) holds; the lock also serializes
    /// writers, so a quota check and its write cannot interleave.
    usage: Mutex<HashMap<(String, String), BucketUsage>>,
}

fn backend(e: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(format!("the key-value store failed: {e}"))
}

/// What an entry costs against a bucket's byte quota.
fn cost(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl KvStore {
    /// Opens (or creates) the store and counts what each bucket holds.
    pub fn open(path: &Path) -> Result<KvStore, String> {
        let db = Database::builder()
            .set_cache_size(16 << 20)
            .create(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let w = db.begin_write().map_err(|e| e.to_string())?;
        w.open_table(KV).map_err(|e| e.to_string())?;
        w.commit().map_err(|e| e.to_string())?;
        let mut usage: HashMap<(String, String), BucketUsage> = HashMap::new();
        let r = db.begin_read().map_err(|e| e.to_string())?;
        let t = r.open_table(KV).map_err(|e| e.to_string())?;
        for entry in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = entry.map_err(|e| e.to_string())?;
            let (ns, bucket, key) = k.value();
            let u = usage
                .entry((ns.to_string(), bucket.to_string()))
                .or_default();
            u.keys += 1;
            u.bytes += cost(key, v.value());
        }
        drop(t);
        drop(r);
        Ok(KvStore {
            db,
            usage: Mutex::new(usage),
        })
    }

    /// What `bucket` of `ns` holds now.
    pub fn usage(&self, ns: &str, bucket: &str) -> BucketUsage {
        self.usage
            .lock()
            .expect("poisoned")
            .get(&(ns.to_string(), bucket.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// Runs one operation on `bucket` of `ns`, writes within `limits`.
    pub fn run(&self, ns: &str, bucket: &str, op: KvOp, limits: BucketLimits) -> KvReply {
        match op {
            KvOp::Get { key } => Ok(KvAnswer::Value(self.get(ns, bucket, &key)?)),
            KvOp::Exists { key } => Ok(KvAnswer::Exists(self.get(ns, bucket, &key)?.is_some())),
            KvOp::GetMany { keys } => {
                let r = self.db.begin_read().map_err(backend)?;
                let t = r.open_table(KV).map_err(backend)?;
                let mut out = Vec::with_capacity(keys.len());
                for key in keys {
                    let v = t.get((ns, bucket, key.as_str())).map_err(backend)?;
                    out.push(v.map(|v| KvPair {
                        value: v.value().to_vec(),
                        key,
                    }));
                }
                Ok(KvAnswer::Values(out))
            }
            KvOp::ListKeys { cursor } => self.list(ns, bucket, cursor),
            KvOp::Set { key, value } => {
                self.write(ns, bucket, limits, |t, u| {
                    put(t, u, ns, bucket, &key, &value)
                })?;
                Ok(KvAnswer::Done)
            }
            KvOp::SetMany { pairs } => {
                self.write(ns, bucket, limits, |t, u| {
                    pairs
                        .iter()
                        .try_for_each(|p| put(t, u, ns, bucket, &p.key, &p.value))
                })?;
                Ok(KvAnswer::Done)
            }
            KvOp::Delete { key } => {
                self.write(ns, bucket, limits, |t, u| remove(t, u, ns, bucket, &key))?;
                Ok(KvAnswer::Done)
            }
            KvOp::DeleteMany { keys } => {
                self.write(ns, bucket, limits, |t, u| {
                    keys.iter().try_for_each(|k| remove(t, u, ns, bucket, k))
                })?;
                Ok(KvAnswer::Done)
            }
            KvOp::Increment { key, delta } => {
                let mut n = 0;
                self.write(ns, bucket, limits, |t, u| {
                    check_key(&key).map_err(KvError::Refused)?;
                    let cur = match t.get((ns, bucket, key.as_str())).map_err(backend)? {
                        None => 0,
                        Some(v) => std::str::from_utf8(v.value())
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .ok_or_else(|| {
                                KvError::Refused(format!(
                                    "key \"{key}\" holds a value that is not a decimal number, so it cannot be incremented"
                                ))
                            })?,
                    };
                    n = cur.checked_add(delta).ok_or_else(|| {
                        KvError::Refused(format!("incrementing key \"{key}\" by {delta} overflows"))
                    })?;
                    put(t, u, ns, bucket, &key, n.to_string().as_bytes())
                })?;
                Ok(KvAnswer::Count(n))
            }
        }
    }

    fn get(&self, ns: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let r = self.db.begin_read().map_err(backend)?;
        let t = r.open_table(KV).map_err(backend)?;
        Ok(t.get((ns, bucket, key))
            .map_err(backend)?
            .map(|v| v.value().to_vec()))
    }

    /// A page of the bucket's keys in order, from the `cursor`-th.
    fn list(&self, ns: &str, bucket: &str, cursor: u64) -> KvReply {
        let r = self.db.begin_read().map_err(backend)?;
        let t = r.open_table(KV).map_err(backend)?;
        let mut keys = Vec::new();
        let mut more = false;
        let range = t.range((ns, bucket, "")..).map_err(backend)?;
        for entry in range.skip(usize::try_from(cursor).unwrap_or(usize::MAX)) {
            let (k, _) = entry.map_err(backend)?;
            let (n, b, key) = k.value();
            if n != ns || b != bucket {
                break;
            }
            if keys.len() == LIST_PAGE {
                more = true;
                break;
            }
            keys.push(key.to_string());
        }
        let next = more.then(|| cursor + keys.len() as u64);
        Ok(KvAnswer::Keys { keys, cursor: next })
    }

    /// One write transaction: `f` changes the table and the bucket's usage;
    /// committed (synced) only if the usage stays within `limits` or
    /// shrinks, else nothing is kept.
    fn write(
        &self,
        ns: &str,
        bucket: &str,
        limits: BucketLimits,
        f: impl FnOnce(
            &mut redb::Table<'_, (&str, &str, &str), &[u8]>,
            &mut BucketUsage,
        ) -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        let mut all = self.usage.lock().expect("poisoned");
        let id = (ns.to_string(), bucket.to_string());
        let before = all.get(&id).copied().unwrap_or_default();
        let mut after = before;
        let mut w = self.db.begin_write().map_err(backend)?;
        w.set_durability(Durability::Immediate).map_err(backend)?;
        {
            let mut t = w.open_table(KV).map_err(backend)?;
            f(&mut t, &mut after)?;
        }
        let grows = after.keys > before.keys || after.bytes > before.bytes;
        if grows {
            limits.check(bucket, after)?;
        }
        w.commit().map_err(backend)?;
        if after.keys == 0 {
            all.remove(&id);
        } else {
            all.insert(id, after);
        }
        Ok(())
    }
}

fn put(
    t: &mut redb::Table<'_, (&str, &str, &str), &[u8]>,
    u: &mut BucketUsage,
    ns: &str,
    bucket: &str,
    key: &str,
    value: &[u8],
) -> Result<(), KvError> {
    check_key(key).map_err(KvError::Refused)?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::Refused(format!(
            "a value is at most {MAX_VALUE_BYTES} bytes; the one for key \"{key}\" has {}",
            value.len()
        )));
    }
    let old = t.insert((ns, bucket, key), value).map_err(backend)?;
    match old {
        Some(old) => u.bytes = u.bytes - cost(key, old.value()) + cost(key, value),
        None => {
            u.keys += 1;
            u.bytes += cost(key, value);
        }
    }
    Ok(())
}

fn remove(
    t: &mut redb::Table<'_, (&str, &str, &str), &[u8]>,
    u: &mut BucketUsage,
    ns: &str,
    bucket: &str,
    key: &str,
) -> Result<(), KvError> {
    if let Some(old) = t.remove((ns, bucket, key)).map_err(backend)? {
        u.keys -= 1;
        u.bytes -= cost(key, old.value());
    }
    Ok(())
}

/// The store, opened at first use (`<data>/kv.redb`).
pub struct Buckets {
    path: PathBuf,
    store: OnceLock<Result<Arc<KvStore>, String>>,
}

impl Buckets {
    pub fn new(path: PathBuf) -> Buckets {
        Buckets {
            path,
            store: OnceLock::new(),
        }
    }

    pub fn store(&self) -> Result<Arc<KvStore>, KvError> {
        self.store
            .get_or_init(|| KvStore::open(&self.path).map(Arc::new))
            .clone()
            .map_err(|e| KvError::Unavailable(format!("the key-value store cannot open: {e}")))
    }
}

/// What each bucket of `ns` may hold, from its quotas.
pub fn limits(cluster: &Cluster, ns: &str) -> BucketLimits {
    let quotas = crate::kinds::quota::quotas_of(cluster, ns);
    flotilla_api::quota::bucket_limits(quotas.iter().map(|q| &q.spec))
}

/// Runs `op` on a bucket of `ns` (the store is synced: off the runtime).
pub async fn run(cluster: &Arc<Cluster>, ns: &str, bucket: &str, op: KvOp) -> KvReply {
    flotilla_api::interfaces::check_bucket(bucket).map_err(KvError::Refused)?;
    let store = cluster.kv.store()?;
    // Only writes are held to the quotas (reading them lists the store).
    let limits = match op.writes() {
        true => limits(cluster, ns),
        false => BucketLimits::default(),
    };
    let (ns, bucket) = (ns.to_string(), bucket.to_string());
    tokio::task::spawn_blocking(move || store.run(&ns, &bucket, op, limits))
        .await
        .map_err(backend)?
}

/// Whether `node` may use `bucket` for a member of the pod the request
/// names: the pod is bound to it (and not Lost) and a member names the
/// bucket in `wasi.keyvalue`.
pub fn authorize(cluster: &Cluster, node: &str, req: &KvRequest) -> Result<(), KvError> {
    let key = flotilla_api::object::key(flotilla_api::Kind::Pod, &req.namespace, &req.pod);
    let Some(obj) = cluster.store.get(&key) else {
        return Err(KvError::AccessDenied(format!(
            "pod {}/{} does not exist",
            req.namespace, req.pod
        )));
    };
    let Object::Pod(p) = &*obj else {
        return Err(KvError::AccessDenied("not a pod".into()));
    };
    if p.status.node.as_deref() != Some(node) || p.status.phase == PodPhase::Lost {
        tracing::warn!(%node, pod = %key, "refused a key-value operation for a pod not bound to the node");
        return Err(KvError::AccessDenied(format!(
            "pod {}/{} is not bound to node {node}",
            req.namespace, req.pod
        )));
    }
    if !p
        .spec
        .members
        .iter()
        .any(|m| m.wasi.keyvalue.contains(&req.bucket))
    {
        return Err(KvError::AccessDenied(format!(
            "no member of pod {}/{} names bucket \"{}\" in wasi.keyvalue",
            req.namespace, req.pod, req.bucket
        )));
    }
    Ok(())
}

/// Answers a member's operation that came on a stream of `node`'s link.
pub async fn serve(cluster: &Arc<Cluster>, node: &str, req: KvRequest) -> KvReply {
    authorize(cluster, node, &req)?;
    run(cluster, &req.namespace, &req.bucket, req.op).await
}

#[cfg(test)]
mod tests;
