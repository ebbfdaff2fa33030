//! Plugins: WASI components the scheduler runs in its own wasmtime engine
//! (`wit/plugin/plugin.wit`). Each write gets a fresh instance of each
//! admission plugin (its `mutate` and then its `validate`) from a
//! pre-linked `InstancePre` (compiled once per digest); every call runs
//! within the plugin's memory, fuel and wall-clock limits; a call that traps, spins or runs
//! out of memory fails alone, and its plugin's failure policy says what
//! that means for the write. Plugins are read from the store on every
//! write, so a new revision is used from the next write on.

pub mod artifact;
pub mod convert;
pub mod scheduling;

use crate::cluster::Cluster;
use flotilla_api::content::ContentStore;
use flotilla_api::plugin::{FailurePolicy, Hook, Plugin};
use flotilla_api::{EventType, Object};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/plugin",
        world: "admission",
    });
}

use bindings::AdmissionPre;
/// The records of `flotilla:plugin/types`.
pub use bindings::flotilla::plugin::types as wit;

/// How often the epoch advances while a call runs: the granularity of
/// the plugins' timeouts.
const TICK: Duration = Duration::from_millis(5);
/// Plugin calls at once; more wait. The pooling allocator has twice as
/// many instance slots: scheduler plugins keep theirs for a placement pass.
const SLOTS: u32 = 32;
/// Prepared components kept, by digest.
const PREPARED_KEPT: usize = 64;
/// The end of a failed plugin's stderr kept for the failure message.
const STDERR_KEPT: usize = 2048;

/// What one call's store holds.
pub struct Call {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limits,
    /// What the plugin wrote to stdout and stderr (the end of it).
    output: MemoryOutputPipe,
    /// For a scheduler plugin: what `count-pods` counts.
    topology: Option<Arc<Mutex<scheduling::Topology>>>,
}

impl WasiView for Call {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A call's memory limit over all its linear memories.
struct Limits {
    memory: usize,
    used: usize,
    hit: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self.used + desired.saturating_sub(current);
        if after > self.memory {
            self.hit = true;
            wasmtime::bail!("memory limit reached");
        }
        self.used = after;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 16)
    }
}

/// Counts the spans of plugin calls under way (a write's admission, a
/// placement pass), so the epoch ticker sleeps while none is.
#[derive(Default)]
struct Running {
    n: Mutex<u32>,
    changed: Condvar,
}

impl Running {
    /// Waits for a free slot and takes it.
    fn enter(&self) {
        let mut n = self.n.lock().expect("poisoned");
        while *n >= SLOTS {
            n = self.changed.wait(n).expect("poisoned");
        }
        *n += 1;
        self.changed.notify_all();
    }

    fn leave(&self) {
        *self.n.lock().expect("poisoned") -= 1;
        self.changed.notify_all();
    }
}

/// A span of plugin calls: while one is held the epoch ticker runs (so
/// deadlines fire), and at most [`SLOTS`] are held at once.
pub struct Busy(Arc<Running>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.leave();
    }
}

struct Runtime {
    engine: Engine,
    linker: Linker<Call>,
    running: Arc<Running>,
}

impl Runtime {
    fn new() -> Result<Runtime, String> {
        let err = |e: wasmtime::Error| format!("plugin engine: {e:#}");
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(SLOTS * 2)
            .total_core_instances(SLOTS * 8)
            .total_memories(SLOTS * 2)
            .total_tables(SLOTS * 8)
            .total_stacks(SLOTS)
            .max_memory_size(flotilla_api::plugin::MAX_MEMORY.0 as usize);
        let mut cfg = Config::new();
        cfg.epoch_interruption(true)
            .consume_fuel(true)
            .memory_reservation(flotilla_api::plugin::MAX_MEMORY.0)
            .memory_guard_size(64 << 10)
            .max_wasm_stack(512 << 10)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        // `FLOTILLA_PERF_MAP=1`: name plugins' compiled functions in
        // /tmp/perf-PID.map, so `perf` shows where a plugin spends its time.
        if std::env::var_os("FLOTILLA_PERF_MAP").is_some_and(|v| v == "1") {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&cfg).map_err(err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(err)?;
        scheduling::bindings::flotilla::plugin::placement::add_to_linker::<
            Call,
            wasmtime::component::HasSelf<Call>,
        >(&mut linker, |c| c)
        .map_err(err)?;
        let running = Arc::new(Running::default());
        let (e, r) = (engine.clone(), running.clone());
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let mut n = r.n.lock().expect("poisoned");
                        while *n == 0 {
                            n = r.changed.wait(n).expect("poisoned");
                        }
                    }
                    std::thread::sleep(TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| format!("plugin engine: {e}"))?;
        Ok(Runtime {
            engine,
            linker,
            running,
        })
    }
}

/// Why a call did not answer.
#[derive(Debug)]
pub struct CallFailed(pub String);

/// The scheduler's plugin host.
#[derive(Default)]
pub struct Plugins {
    runtime: OnceLock<Result<Runtime, String>>,
    prepared: Mutex<HashMap<String, AdmissionPre<Call>>>,
    prepared_scheduler: Mutex<HashMap<String, scheduling::bindings::SchedulerPre<Call>>>,
}

/// Why a write was refused by admission.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A plugin said no (403).
    Denied(String),
    /// A plugin failed under the `Fail` policy, or made the object
    /// invalid (500 and 422).
    Failed(String),
    Invalid(String),
}

impl Plugins {
    fn runtime(&self) -> Result<&Runtime, String> {
        self.runtime
            .get_or_init(Runtime::new)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Starts a span of calls (see [`Busy`]); every call runs inside one.
    pub fn busy(&self) -> Result<Busy, String> {
        let rt = self.runtime()?;
        rt.running.enter();
        Ok(Busy(rt.running.clone()))
    }

    /// The plugin's component compiled and pre-linked, or why it cannot be.
    fn compile(
        &self,
        blobs: &ContentStore,
        plugin: &Plugin,
    ) -> Result<(String, wasmtime::component::InstancePre<Call>), String> {
        let (digest, bytes) = artifact::component(blobs, &plugin.spec.source)?;
        let digest = &digest;
        let rt = self.runtime()?;
        let component = Component::new(&rt.engine, &bytes).map_err(|e| {
            format!("module {digest} is not a component this scheduler can run: {e:#}")
        })?;
        let pre = rt.linker.instantiate_pre(&component).map_err(|e| {
            format!("module {digest} cannot be linked as a plugin: {e:#} (plugins are given the WASI 0.2 cli, clocks, random, io, filesystem and sockets interfaces, with no files or network, and flotilla:plugin/placement; nothing else)")
        })?;
        Ok((digest.clone(), pre))
    }

    fn not_of_world(digest: &str, hook: Hook, e: wasmtime::Error) -> String {
        format!(
            "module {digest} is not a flotilla:plugin/{hook}@{} component: {e:#} (see wit/plugin/plugin.wit)",
            flotilla_api::plugin::WIT_VERSION
        )
    }

    /// An admission plugin's component ready to instantiate (kept by
    /// digest): what an apply of a Plugin checks, and calls start from.
    fn prepare(&self, blobs: &ContentStore, plugin: &Plugin) -> Result<AdmissionPre<Call>, String> {
        if let Some(digest) = artifact::key_of(&plugin.spec.source)
            && let Some(p) = self.prepared.lock().expect("poisoned").get(digest)
        {
            return Ok(p.clone());
        }
        let (digest, pre) = self.compile(blobs, plugin)?;
        let pre =
            AdmissionPre::new(pre).map_err(|e| Self::not_of_world(&digest, Hook::Admission, e))?;
        let mut kept = self.prepared.lock().expect("poisoned");
        if kept.len() >= PREPARED_KEPT {
            kept.clear();
        }
        kept.insert(digest, pre.clone());
        Ok(pre)
    }

    /// A scheduler plugin's component ready to instantiate (kept by digest).
    fn prepare_scheduler(
        &self,
        blobs: &ContentStore,
        plugin: &Plugin,
    ) -> Result<scheduling::bindings::SchedulerPre<Call>, String> {
        if let Some(digest) = artifact::key_of(&plugin.spec.source)
            && let Some(p) = self
                .prepared_scheduler
                .lock()
                .expect("poisoned")
                .get(digest)
        {
            return Ok(p.clone());
        }
        let (digest, pre) = self.compile(blobs, plugin)?;
        let pre = scheduling::bindings::SchedulerPre::new(pre)
            .map_err(|e| Self::not_of_world(&digest, Hook::Scheduler, e))?;
        let mut kept = self.prepared_scheduler.lock().expect("poisoned");
        if kept.len() >= PREPARED_KEPT {
            kept.clear();
        }
        kept.insert(digest, pre.clone());
        Ok(pre)
    }

    /// Checks that a Plugin's component can be run as its hook says.
    pub fn check(&self, blobs: &ContentStore, plugin: &Plugin) -> Result<(), String> {
        match plugin.spec.hook {
            Hook::Admission => self.prepare(blobs, plugin).map(drop),
            Hook::Scheduler => self.prepare_scheduler(blobs, plugin).map(drop),
        }
    }

    /// A store for calls of `plugin`: its config as environment, its
    /// memory limit, nothing else of the host's.
    fn store(
        &self,
        plugin: &Plugin,
        topology: Option<Arc<Mutex<scheduling::Topology>>>,
    ) -> Result<Store<Call>, String> {
        let rt = self.runtime()?;
        let output = MemoryOutputPipe::new(STDERR_KEPT);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stderr(output.clone()).stdout(output.clone());
        for (k, v) in &plugin.spec.config {
            wasi.env(k, v);
        }
        let call = Call {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: Limits {
                memory: plugin.spec.memory.0 as usize,
                used: 0,
                hit: false,
            },
            output,
            topology,
        };
        let mut store = Store::new(&rt.engine, call);
        store.limiter(|c| &mut c.limits);
        Ok(store)
    }

    /// Runs `f` (an instantiation or a call) within the plugin's per-call
    /// fuel and time (inside a [`Busy`] span, so the deadline fires); a
    /// failure says why in words.
    fn guarded<R>(
        &self,
        store: &mut Store<Call>,
        plugin: &Plugin,
        f: impl FnOnce(&mut Store<Call>) -> wasmtime::Result<R>,
    ) -> Result<R, CallFailed> {
        let spec = &plugin.spec;
        store
            .set_fuel(spec.fuel)
            .map_err(|e| CallFailed(e.to_string()))?;
        let ticks = spec.timeout.0.div_ceil(TICK.as_millis() as u64) + 1;
        store.set_epoch_deadline(ticks);
        let out = f(store);
        out.map_err(|e| {
            let why = if store.data().limits.hit {
                format!("ran out of memory (memory = {})", spec.memory)
            } else {
                match e.downcast_ref::<Trap>() {
                    Some(Trap::OutOfFuel) => format!("ran out of fuel (fuel = {})", spec.fuel),
                    Some(Trap::Interrupt) => format!("ran past its timeout ({})", spec.timeout),
                    _ => format!("{e:#}"),
                }
            };
            let said = String::from_utf8_lossy(&store.data().output.contents())
                .trim()
                .to_string();
            match said.is_empty() {
                true => CallFailed(why),
                false => CallFailed(format!("{why}; its output: {said}")),
            }
        })
    }

    /// A fresh instance of admission plugin `plugin`.
    fn instance(
        &self,
        blobs: &ContentStore,
        plugin: &Plugin,
    ) -> Result<(Store<Call>, bindings::Admission), CallFailed> {
        let pre = self.prepare(blobs, plugin).map_err(CallFailed)?;
        let mut store = self.store(plugin, None).map_err(CallFailed)?;
        let instance = self.guarded(&mut store, plugin, |s| pre.instantiate(s))?;
        Ok((store, instance))
    }

    /// The admission plugins that see `obj`, in name order. Plugins are
    /// never admitted by plugins: a broken plugin that refuses every
    /// write can still be replaced or deleted.
    fn selecting(cluster: &Cluster, obj: &Object) -> Vec<Arc<Object>> {
        let (kind, ns) = (obj.kind(), obj.meta().namespace.as_str());
        if kind == flotilla_api::Kind::Plugin {
            return Vec::new();
        }
        cluster
            .store
            .list("plugins/")
            .into_iter()
            .filter(|p| {
                matches!(&**p, Object::Plugin(p)
                    if p.spec.hook == Hook::Admission && p.spec.selector.selects(kind, ns))
            })
            .collect()
    }

    /// Runs the admission plugins that select `obj`: every `mutate`, then
    /// `builtin` (the API's own checks) on the result, then every
    /// `validate`. The object to store, or why the write is refused.
    pub fn admit(
        &self,
        cluster: &Cluster,
        obj: Object,
        builtin: impl Fn(&Object) -> Result<(), String>,
    ) -> Result<Object, Refusal> {
        let plugins = Self::selecting(cluster, &obj);
        if plugins.is_empty() {
            return Ok(obj);
        }
        // Without a runtime every call fails alone, below, per its policy.
        let _busy = self.busy().ok();
        let mut obj = obj;
        // Each plugin's instance serves this write's `mutate` and then its
        // `validate` (nothing else ever reaches it); one whose call failed
        // is dropped, and `validate` gets a fresh one.
        let mut kept: Vec<Option<(Store<Call>, bindings::Admission)>> =
            plugins.iter().map(|_| None).collect();
        for (k, p) in plugins.iter().enumerate() {
            let Object::Plugin(plugin) = &**p else {
                continue;
            };
            let lowered = convert::lower(&obj);
            let out = self
                .instance(&cluster.blobs, plugin)
                .and_then(|(mut store, instance)| {
                    let out =
                        self.guarded(&mut store, plugin, |s| instance.call_mutate(s, &lowered))?;
                    kept[k] = Some((store, instance));
                    Ok(out)
                });
            match out {
                Ok(Ok(new)) => match convert::lift(&obj, new) {
                    Ok(mutated) => obj = mutated,
                    Err(why) => {
                        let why = format!("its mutation was refused: {why}");
                        let r = self.failed(cluster, p, plugin, &why);
                        if plugin.spec.failure_policy == FailurePolicy::Fail {
                            return Err(r);
                        }
                    }
                },
                Ok(Err(why)) => return Err(denied(plugin, &why)),
                Err(CallFailed(why)) => {
                    let r = self.failed(cluster, p, plugin, &why);
                    if plugin.spec.failure_policy == FailurePolicy::Fail {
                        return Err(r);
                    }
                }
            }
        }
        builtin(&obj).map_err(Refusal::Invalid)?;
        for (k, p) in plugins.iter().enumerate() {
            let Object::Plugin(plugin) = &**p else {
                continue;
            };
            let lowered = convert::lower(&obj);
            let instance = match kept[k].take() {
                Some(i) => Ok(i),
                None => self.instance(&cluster.blobs, plugin),
            };
            let out = instance.and_then(|(mut store, instance)| {
                self.guarded(&mut store, plugin, |s| instance.call_validate(s, &lowered))
            });
            match out {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(denied(plugin, &why)),
                Err(CallFailed(why)) => {
                    let r = self.failed(cluster, p, plugin, &why);
                    if plugin.spec.failure_policy == FailurePolicy::Fail {
                        return Err(r);
                    }
                }
            }
        }
        Ok(obj)
    }

    /// Records a failed call (a warning event on the plugin) and what the
    /// client sees if the policy is `Fail`.
    fn failed(&self, cluster: &Cluster, obj: &Object, plugin: &Plugin, why: &str) -> Refusal {
        let policy = match plugin.spec.failure_policy {
            FailurePolicy::Fail => "the write was refused (failure_policy = Fail)",
            FailurePolicy::Ignore => "the write went on (failure_policy = Ignore)",
        };
        tracing::warn!(plugin = %plugin.metadata.name, "plugin call failed: {why}; {policy}");
        cluster.event(
            obj,
            EventType::Warning,
            "CallFailed",
            format!("{why}; {policy}"),
        );
        Refusal::Failed(format!(
            "admission plugin \"{}\" failed: {why}",
            plugin.metadata.name
        ))
    }
}

#[cfg(test)]
mod tests;

fn denied(plugin: &Plugin, why: &str) -> Refusal {
    Refusal::Denied(format!(
        "admission plugin \"{}\" denied: {why}",
        plugin.metadata.name
    ))
}
