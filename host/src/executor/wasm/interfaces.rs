//! The host interfaces a member may ask for (`flotilla:workload`, see
//! `wit/workload/`): `wasi:config/store` answered from the member's
//! ConfigMaps as they are now (the pod updates a shared cell when one
//! changes, so a running member reads the new value on its next call),
//! `wasi:keyvalue` store/atomics/batch on buckets of the pod's namespace,
//! each operation sent to the scheduler through a [`KvClient`], and
//! `wasi:logging` lines into the member's log.
//!
//! All three are in every component linker, so one compiled component
//! serves every member using it; what a member may use is checked when its
//! store is made ([`Workload::check`]: a component importing an interface
//! its manifest did not ask for is refused, naming it), and again on every
//! call (a bucket it did not name is `access-denied`).

use crate::logs::LogSink;
use flotilla_api::interfaces::{HostInterfaces, KvAnswer, KvError, KvOp, KvReply, KvRequest};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use wasmtime::component::{HasData, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/workload",
        world: "flotilla:workload/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::StoreError,
            "wasi:config/store.error" => super::ConfigError,
        },
    });
}

use bindings::wasi::config::store as config;
use bindings::wasi::keyvalue::{atomics, batch, store};
use bindings::wasi::logging::logging;

/// A key-value error on its way to the guest (or a trap).
pub enum StoreError {
    Guest(store::Error),
    Trap(wasmtime::Error),
}

impl From<wasmtime::component::ResourceTableError> for StoreError {
    fn from(e: wasmtime::component::ResourceTableError) -> Self {
        StoreError::Trap(e.into())
    }
}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> Self {
        StoreError::Guest(match e {
            KvError::AccessDenied(_) => store::Error::AccessDenied,
            other => store::Error::Other(other.to_string()),
        })
    }
}

/// `wasi:config` never fails here; the type is the interface's.
pub struct ConfigError(config::Error);

/// An open bucket: its name (the namespace and pod are the store's).
pub struct Bucket {
    name: String,
}

/// Sends key-value operations to where buckets are kept (the scheduler,
/// over the node's link; a map in unit tests).
pub trait KvClient: Send + Sync {
    fn call(&self, req: KvRequest) -> crate::executor::BoxFuture<'static, KvReply>;
}

/// The values `wasi:config/store` answers with, replaced as the member's
/// ConfigMaps change. Cheap to clone; clones share the values.
#[derive(Clone, Default)]
pub struct ConfigCell(Arc<RwLock<Arc<BTreeMap<String, String>>>>);

impl ConfigCell {
    pub fn new(values: BTreeMap<String, String>) -> ConfigCell {
        ConfigCell(Arc::new(RwLock::new(Arc::new(values))))
    }

    /// Replaces the values; whether they changed.
    pub fn set(&self, values: BTreeMap<String, String>) -> bool {
        let mut cur = self.0.write().expect("poisoned");
        if **cur == values {
            return false;
        }
        *cur = Arc::new(values);
        true
    }

    pub fn get(&self) -> Arc<BTreeMap<String, String>> {
        self.0.read().expect("poisoned").clone()
    }
}

/// Where a member's key-value operations go, and as whom.
#[derive(Clone)]
pub struct KvAccess {
    pub client: Arc<dyn KvClient>,
    pub namespace: String,
    pub pod: String,
}

/// What one member may use, and the providers behind it. Cheap to clone.
#[derive(Clone, Default)]
pub struct Workload {
    pub member: String,
    pub asked: HostInterfaces,
    pub config: ConfigCell,
    pub kv: Option<KvAccess>,
}

impl Workload {
    /// Whether a component importing `imports` may be instantiated for
    /// this member (see [`HostInterfaces::check_imports`]).
    pub fn check<'a>(&self, imports: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
        self.asked.check_imports(&self.member, imports)
    }
}

/// The view of a store the interfaces work on.
pub struct WorkloadView<'a> {
    pub workload: &'a Workload,
    pub table: &'a mut ResourceTable,
    pub log: &'a LogSink,
}

struct HasWorkload;

impl HasData for HasWorkload {
    type Data<'a> = WorkloadView<'a>;
}

/// Adds the three interfaces to a component linker.
pub fn add_to_linker<T: Send + 'static>(
    l: &mut wasmtime::component::Linker<T>,
    f: fn(&mut T) -> WorkloadView<'_>,
) -> wasmtime::Result<()> {
    config::add_to_linker::<_, HasWorkload>(l, f)?;
    store::add_to_linker::<_, HasWorkload>(l, f)?;
    atomics::add_to_linker::<_, HasWorkload>(l, f)?;
    batch::add_to_linker::<_, HasWorkload>(l, f)?;
    logging::add_to_linker::<_, HasWorkload>(l, f)?;
    Ok(())
}

/// The import names of a component that belong to interfaces a member must
/// ask for.
pub fn gated_imports(
    component: &wasmtime::component::Component,
    engine: &wasmtime::Engine,
) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .filter(|n| flotilla_api::interfaces::Interface::of_import(n).is_some())
        .collect()
}

fn denied(what: &str) -> wasmtime::Error {
    wasmtime::Error::msg(format!(
        "{what} was called, but the member did not ask for it (refused at instantiation otherwise)"
    ))
}

impl WorkloadView<'_> {
    async fn kv(&mut self, bucket: &str, op: KvOp) -> Result<KvAnswer, StoreError> {
        let Some(kv) = &self.workload.kv else {
            return Err(StoreError::Trap(denied("wasi:keyvalue")));
        };
        let req = KvRequest {
            namespace: kv.namespace.clone(),
            pod: kv.pod.clone(),
            bucket: bucket.to_string(),
            op,
        };
        Ok(kv.client.call(req).await?)
    }

    async fn bucket_op(&mut self, b: &Resource<Bucket>, op: KvOp) -> Result<KvAnswer, StoreError> {
        let name = self.table.get(b)?.name.clone();
        self.kv(&name, op).await
    }
}

fn unexpected(a: KvAnswer) -> StoreError {
    StoreError::Guest(store::Error::Other(format!(
        "the store answered {a:?} unexpectedly"
    )))
}

impl WorkloadView<'_> {
    /// The member's config values, if it asked for `wasi:config`.
    fn config(&self) -> Result<Arc<BTreeMap<String, String>>, ConfigError> {
        if self.workload.asked.config.is_empty() {
            return Err(ConfigError(config::Error::Io(
                "the member did not ask for wasi:config".into(),
            )));
        }
        Ok(self.workload.config.get())
    }
}

impl config::Host for WorkloadView<'_> {
    async fn get(&mut self, key: String) -> Result<Option<String>, ConfigError> {
        Ok(self.config()?.get(&key).cloned())
    }

    async fn get_all(&mut self) -> Result<Vec<(String, String)>, ConfigError> {
        Ok(self
            .config()?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn convert_error(&mut self, err: ConfigError) -> wasmtime::Result<config::Error> {
        Ok(err.0)
    }
}

impl store::Host for WorkloadView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, StoreError> {
        if self.workload.kv.is_none() {
            return Err(StoreError::Trap(denied("wasi:keyvalue/store.open")));
        }
        if !self.workload.asked.keyvalue.contains(&identifier) {
            return Err(StoreError::Guest(store::Error::NoSuchStore));
        }
        Ok(self.table.push(Bucket { name: identifier })?)
    }

    fn convert_error(&mut self, err: StoreError) -> wasmtime::Result<store::Error> {
        match err {
            StoreError::Guest(e) => Ok(e),
            StoreError::Trap(e) => Err(e),
        }
    }
}

impl store::HostBucket for WorkloadView<'_> {
    async fn get(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.bucket_op(&b, KvOp::Get { key }).await? {
            KvAnswer::Value(v) => Ok(v),
            a => Err(unexpected(a)),
        }
    }

    async fn set(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.bucket_op(&b, KvOp::Set { key, value }).await.map(drop)
    }

    async fn delete(&mut self, b: Resource<Bucket>, key: String) -> Result<(), StoreError> {
        self.bucket_op(&b, KvOp::Delete { key }).await.map(drop)
    }

    async fn exists(&mut self, b: Resource<Bucket>, key: String) -> Result<bool, StoreError> {
        match self.bucket_op(&b, KvOp::Exists { key }).await? {
            KvAnswer::Exists(e) => Ok(e),
            a => Err(unexpected(a)),
        }
    }

    async fn list_keys(
        &mut self,
        b: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, StoreError> {
        let op = KvOp::ListKeys {
            cursor: cursor.unwrap_or(0),
        };
        match self.bucket_op(&b, op).await? {
            KvAnswer::Keys { keys, cursor } => Ok(store::KeyResponse { keys, cursor }),
            a => Err(unexpected(a)),
        }
    }

    async fn drop(&mut self, b: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl atomics::Host for WorkloadView<'_> {
    async fn increment(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, StoreError> {
        match self.bucket_op(&b, KvOp::Increment { key, delta }).await? {
            KvAnswer::Count(n) => Ok(n),
            a => Err(unexpected(a)),
        }
    }
}

impl batch::Host for WorkloadView<'_> {
    async fn get_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, StoreError> {
        match self.bucket_op(&b, KvOp::GetMany { keys }).await? {
            KvAnswer::Values(v) => Ok(v.into_iter().map(|p| p.map(|p| (p.key, p.value))).collect()),
            a => Err(unexpected(a)),
        }
    }

    async fn set_many(
        &mut self,
        b: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let pairs = key_values
            .into_iter()
            .map(|(key, value)| flotilla_api::interfaces::KvPair { key, value })
            .collect();
        self.bucket_op(&b, KvOp::SetMany { pairs }).await.map(drop)
    }

    async fn delete_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), StoreError> {
        self.bucket_op(&b, KvOp::DeleteMany { keys })
            .await
            .map(drop)
    }
}

/// Longest `wasi:logging` line kept (the rest is cut, marked with `…`).
const MAX_LOG_LINE: usize = 16 * 1024;

impl logging::Host for WorkloadView<'_> {
    async fn log(
        &mut self,
        level: logging::Level,
        context: String,
        message: String,
    ) -> wasmtime::Result<()> {
        if !self.workload.asked.logging {
            return Err(denied("wasi:logging/logging.log"));
        }
        let level = match level {
            logging::Level::Trace => "TRACE",
            logging::Level::Debug => "DEBUG",
            logging::Level::Info => "INFO",
            logging::Level::Warn => "WARN",
            logging::Level::Error => "ERROR",
            logging::Level::Critical => "CRITICAL",
        };
        let mut line = if context.is_empty() {
            format!("[{level}] {message}")
        } else {
            format!("[{level}] {context}: {message}")
        };
        // One line per call: the guest's newlines do not start lines that
        // would look like they had no level.
        line = line.replace(['\n', '\r'], " ");
        if line.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        line.push('\n');
        // A full or failing log disk loses the line, as stdout would.
        let _ = self.log.write_all(line.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
