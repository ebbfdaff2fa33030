//! Member executors: the one contract between the pod supervisor
//! ([`crate::pod`]) and the runtimes that run members — wasmtime
//! ([`wasm`]) and runc through the shim ([`container`]).
//!
//! A member is *prepared* once per pod (compiled, pulled, unpacked: every
//! member of a pod is prepared before any starts), then *started* for each
//! run; a run is *waited* for or *stopped*; a run an earlier agent left
//! behind is *recovered* (containers outlive the agent, wasm runs do not).
//! The supervisor knows nothing else about runtimes, so its restart
//! policies, backoff and stop order are unit-tested on fakes.

pub mod container;
pub mod wasm;

use crate::executor::wasm::runtime::Exit;
use crate::logs::LogPaths;
use flotilla_api::{Labels, MemberSpec};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future (the traits are used as objects: a pod mixes runtimes).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one run of a member is started with.
pub struct RunCx<'a> {
    pub pod_uid: &'a str,
    pub pod_name: &'a str,
    pub member: &'a MemberSpec,
    /// The member's whole environment: what its manifest gives it
    /// (resolved) and the service links.
    pub env: &'a Labels,
    /// The pod's volumes it mounts.
    pub mounts: &'a [crate::volume::ResolvedMount],
    pub log: &'a LogPaths,
    pub log_dir: &'a Path,
    pub log_cap: u64,
    /// Runs before this one (recorded so a re-adopted run keeps the count).
    pub restarts: u32,
    /// The host interfaces a wasm member asked for, and their providers.
    pub workload: &'a crate::executor::wasm::interfaces::Workload,
}

/// A run left by an earlier agent process.
pub enum Recovered {
    Nothing,
    /// Still running: adopted, with its restart count.
    Running {
        run: Box<dyn Run>,
        restarts: u32,
    },
    /// It ended while the agent was away: that run counts.
    Exited {
        exit: Exit,
        restarts: u32,
    },
}

/// One run of a member.
pub trait Run: Send {
    /// When it started (ms since the epoch).
    fn started_ms(&self) -> u64;
    /// Resolves when the run ends by itself.
    fn wait(&mut self) -> BoxFuture<'_, Exit>;
    /// Ends the run (containers: SIGTERM, `grace`, SIGKILL; wasm:
    /// interrupted at once) and releases what it held.
    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()>;
    /// Releases what an ended run held.
    fn finish(self: Box<Self>) -> BoxFuture<'static, ()>;
    /// How its CPU and memory are measured (`None`: they are not).
    fn meter(&self) -> Option<crate::metrics::Meter> {
        None
    }
}

/// A member ready to run (its code compiled or its image unpacked).
pub trait Prepared: Send + Sync {
    /// The runtime it needs on the node (`wasm`, `runc`).
    fn runtime(&self) -> &'static str;
    /// Finds a run an earlier agent process left.
    fn recover<'a>(&'a self, _pod_uid: &'a str, _member: &'a str) -> BoxFuture<'a, Recovered> {
        Box::pin(async { Recovered::Nothing })
    }
    /// Starts a run (its log was already moved aside by the supervisor);
    /// `Err` is a run that ended before it began.
    fn start<'a>(&'a self, cx: RunCx<'a>) -> BoxFuture<'a, Result<Box<dyn Run>, Exit>>;
    /// Where a run of this member keeps what it writes to its own
    /// filesystem (a container's writable layer), and the node's default
    /// cap on it; `None`: it has no such place (wasm members write only to
    /// volumes).
    fn scratch(&self, _pod_uid: &str, _member: &str) -> Option<(std::path::PathBuf, u64)> {
        None
    }
    /// Runs `cmd` inside the member's current run (an `exec` probe):
    /// `Ok` when it exits 0.
    fn exec<'a>(
        &'a self,
        _pod_uid: &'a str,
        _member: &'a str,
        _cmd: &'a [String],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("exec runs in containers only".to_string()) })
    }
    /// Calls the component's `flotilla:health/check` beside the member's
    /// current run (a `health` probe): `Ok` when it answers `ok`.
    fn health<'a>(
        &'a self,
        _pod_uid: &'a str,
        _member: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("health probes call a wasm component's export".to_string()) })
    }
}
