//! For Flotilla plugin and workload authors.
//!
//! # Plugins
//!
//! A plugin is a WASI 0.2 component of one of the worlds in
//! `wit/plugin/plugin.wit` (`flotilla:plugin@0.1.0`), which the scheduler
//! loads from a `Plugin` object: `admission` plugins see client writes
//! (`validate`, `mutate`), `scheduler` plugins filter and score the nodes
//! a pod may go to. This crate carries the bindings of both worlds, the
//! objects as Rust types ([`Object`], [`Pod`], [`Node`], …) and two
//! attributes that export an impl as the world:
//!
//! ```no_run
//! use flotilla_sdk::{Admission, Object};
//!
//! struct RequireTeam;
//!
//! #[flotilla_sdk::admission]
//! impl Admission for RequireTeam {
//!     fn validate(obj: &Object) -> Result<(), String> {
//!         match obj.metadata().label("team") {
//!             Some(_) => Ok(()),
//!             None => Err(format!("{} \"{}\" has no label \"team\"", obj.kind_name(), obj.metadata().name)),
//!         }
//!     }
//! }
//! ```
//!
//! ```no_run
//! use flotilla_sdk::{Node, Pod, Scheduler};
//!
//! /// Prefers nodes with more free memory; refuses nodes without a zone.
//! struct Roomy;
//!
//! #[flotilla_sdk::scheduler]
//! impl Scheduler for Roomy {
//!     fn filter(_pod: &Pod, node: &Node) -> Result<(), String> {
//!         node.metadata.label("zone").map(drop).ok_or_else(|| "no zone".to_string())
//!     }
//!
//!     fn score(_pod: &Pod, node: &Node) -> u32 {
//!         let free = node.allocatable_memory.saturating_sub(node.requested_memory);
//!         (free * 100 / node.allocatable_memory.max(1)) as u32
//!     }
//! }
//! ```
//!
//! Build for `wasm32-wasip2` as a `cdylib` (`flotilla plugin new NAME`
//! writes such a project), then apply a manifest naming the `.wasm`:
//!
//! ```toml
//! kind = "Plugin"
//! name = "require-team"
//! wasm = "target/wasm32-wasip2/release/require_team.wasm"
//! hook = "admission"
//! selector = { kinds = ["Pod", "Deployment"], namespaces = ["prod"] }
//! failure_policy = "Fail"   # or "Ignore"
//! config = { REQUIRED = "team" }   # the plugin's environment
//! ```
//!
//! Each write gets a fresh instance of an admission plugin (its `mutate`,
//! then its `validate`; scheduler plugins: one instance per placement pass) within the plugin's `memory`, `timeout` and `fuel`; a
//! trap, a timeout or an out-of-memory fails that call only. A plugin's
//! `config` arrives as environment variables ([`std::env::var`]); it gets
//! no files and no network.
//!
//! # Workloads
//!
//! Pod members are ordinary WASI programs (preview 1 commands or preview 2
//! `wasi:cli/run` components); nothing here is required. A component
//! member may ask for host interfaces beyond WASI's in its manifest —
//! `wasi = { config = ["app-config"], keyvalue = ["counters"], logging =
//! true }` — and use them through [`config`], [`kv`] and [`log`]:
//!
//! ```no_run
//! let step: u64 = flotilla_sdk::config::get_or("step", 1);
//! let bucket = flotilla_sdk::kv::open("counters").expect("asked for in the manifest");
//! let n = flotilla_sdk::kv::increment(&bucket, "count", step).unwrap();
//! flotilla_sdk::log::info("counter", &format!("count={n}"));
//! ```
//!
//! A component importing an interface its member did not ask for is
//! refused when it would start, with the reason. A member sees
//! exactly the environment its manifest gives it; one that wants to know
//! where it runs asks for these variables, which [`identity`] reads:
//!
//! ```toml
//! env = { FLOTILLA_POD = { field = "pod.name" }, FLOTILLA_NAMESPACE = { field = "pod.namespace" },
//!         FLOTILLA_MEMBER = { field = "member.name" }, FLOTILLA_POD_UID = { field = "pod.uid" } }
//! ```
//!
//! ```
//! let me = flotilla_sdk::identity();
//! if let Some(pod) = &me.pod {
//!     println!("member {:?} of pod {pod}", me.member);
//! }
//! ```

mod plugin;
mod workload;

pub use plugin::*;
pub use workload::{bindings as workload_bindings, config, kv, log};

/// Where a member runs, as the agent told it. Fields are `None` outside Flotilla.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub member: Option<String>,
    pub pod_uid: Option<String>,
}

/// Reads the member's identity from its environment.
pub fn identity() -> Identity {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Identity {
        pod: var("FLOTILLA_POD"),
        namespace: var("FLOTILLA_NAMESPACE"),
        member: var("FLOTILLA_MEMBER"),
        pod_uid: var("FLOTILLA_POD_UID"),
    }
}

/// True when running as a Flotilla member.
pub fn in_flotilla() -> bool {
    identity().pod.is_some()
}
