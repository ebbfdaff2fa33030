//! Helpers for programs that run as Flotilla pod members.
//!
//! Members are ordinary WASI programs (preview 1 commands or preview 2
//! `wasi:cli/run` components); nothing here is required. A member sees
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
