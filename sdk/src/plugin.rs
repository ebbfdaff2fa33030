//! The `flotilla:plugin` worlds: bindings, the traits plugins implement,
//! and the glue that exports them.

/// Bindings generated from `wit/plugin/plugin.wit` by wit-bindgen.
pub mod bindings {
    /// The `admission` world.
    pub mod admission {
        wit_bindgen::generate!({
            path: "../wit/plugin",
            world: "flotilla:plugin/admission",
            pub_export_macro: true,
            export_macro_name: "__admission_world_export",
            default_bindings_module: "::flotilla_sdk::bindings::admission",
        });
    }

    /// The `scheduler` world (its types are the admission world's).
    // The generated export of `update-node` takes a node record flattened
    // into its fields.
    #[allow(clippy::too_many_arguments)]
    pub mod scheduler {
        wit_bindgen::generate!({
            path: "../wit/plugin",
            world: "flotilla:plugin/scheduler",
            with: { "flotilla:plugin/types@0.1.0": crate::bindings::admission::flotilla::plugin::types },
            pub_export_macro: true,
            export_macro_name: "__scheduler_world_export",
            default_bindings_module: "::flotilla_sdk::bindings::scheduler",
        });
    }
}

pub use bindings::admission::flotilla::plugin::types::{
    Deployment, EnvValue, Function, Job, Member, Metadata, Node, Object, Other, Pod, PodSpec,
    Route, Source,
};
pub use flotilla_sdk_macros::{admission, scheduler};

/// How many pods in the namespace of the pod being placed, whose labels
/// include all of `selector`, are bound to nodes whose label `key` is
/// `value` — pods placed earlier in the same pass included. Only for
/// scheduler plugins, during a call.
pub fn count_pods(key: &str, value: &str, selector: &[(String, String)]) -> u32 {
    bindings::scheduler::flotilla::plugin::placement::count_pods(key, value, selector)
}

/// An admission plugin: called on client writes of the kinds and
/// namespaces its `Plugin` selects. Both have defaults (admit, change
/// nothing); implement what the plugin needs and export it with
/// `#[flotilla_sdk::admission]`.
pub trait Admission {
    /// `Err(reason)` refuses the write; the client sees
    /// `admission plugin "NAME" denied: REASON`.
    fn validate(obj: &Object) -> Result<(), String> {
        let _ = obj;
        Ok(())
    }

    /// The object to store instead. Labels, node selectors, members'
    /// args, env values, cpu and memory may change; the kind, name,
    /// namespace, members' names, sources and ports may not (the write
    /// fails, per the plugin's failure policy, if they do).
    fn mutate(obj: Object) -> Result<Object, String> {
        Ok(obj)
    }
}

/// A scheduler plugin: asked about the nodes a pending pod may go to (in
/// the namespaces its `Plugin` selects). Implement the per-node
/// functions; the `*_all` ones, which the world's exports call with the
/// candidate nodes, call them for each node and may be replaced by
/// batch-aware versions. (The world passes the nodes once per placement
/// pass and names them by index afterwards; the SDK keeps them.)
pub trait Scheduler {
    /// `Err(reason)` rules the node out; the pod's Pending reason counts
    /// such nodes under the plugin's name.
    fn filter(pod: &Pod, node: &Node) -> Result<(), String> {
        let _ = (pod, node);
        Ok(())
    }

    /// 0–100 (more counts as 100), added to the scheduler's own 0–100.
    fn score(pod: &Pod, node: &Node) -> u32 {
        let _ = (pod, node);
        0
    }

    fn filter_all(pod: &Pod, nodes: &[&Node]) -> Vec<Result<(), String>> {
        nodes.iter().map(|n| Self::filter(pod, n)).collect()
    }

    fn score_all(pod: &Pod, nodes: &[&Node]) -> Vec<u32> {
        nodes.iter().map(|n| Self::score(pod, n)).collect()
    }
}

/// The nodes of the current placement pass, kept for the calls that name
/// them by index (used by [`export_scheduler!`]).
#[doc(hidden)]
pub mod __pass {
    use super::Node;
    use std::cell::RefCell;

    thread_local! {
        static NODES: RefCell<Vec<Node>> = const { RefCell::new(Vec::new()) };
    }

    pub fn begin(nodes: Vec<Node>) {
        NODES.with(|n| *n.borrow_mut() = nodes);
    }

    pub fn update(index: u32, node: Node) {
        NODES.with(|n| {
            if let Some(slot) = n.borrow_mut().get_mut(index as usize) {
                *slot = node;
            }
        });
    }

    /// `f` over each node at `indices`, in order, keeping what it returns
    /// (no list of the nodes is made: this runs for every candidate of
    /// every pod).
    pub fn each<R>(indices: &[u32], mut f: impl FnMut(u32, &Node) -> Option<R>) -> Vec<R> {
        NODES.with(|n| {
            let n = n.borrow();
            indices
                .iter()
                .filter_map(|&i| f(i, n.get(i as usize)?))
                .collect()
        })
    }

    /// `f`'s score of each node at `indices`, in order: the hot path of a
    /// scoring plugin (one push per candidate into a list made once at its
    /// full size). An unknown index ends the list early, which makes its
    /// length wrong and the host say so.
    pub fn scores(indices: &[u32], mut f: impl FnMut(&Node) -> u32) -> Vec<u32> {
        NODES.with(|n| {
            let n = n.borrow();
            let mut out = Vec::with_capacity(indices.len());
            for &i in indices {
                match n.get(i as usize) {
                    Some(node) => out.push(f(node)),
                    None => break,
                }
            }
            out
        })
    }

    /// `f` over the nodes at `indices` (unknown indices left out, which
    /// makes the answer's length wrong and the host say so).
    pub fn with<R>(indices: &[u32], f: impl FnOnce(&[&Node]) -> R) -> R {
        NODES.with(|n| {
            let n = n.borrow();
            let picked: Vec<&Node> = indices.iter().filter_map(|&i| n.get(i as usize)).collect();
            f(&picked)
        })
    }
}

/// Exports `T: Admission` as the component's admission world (what
/// `#[flotilla_sdk::admission]` expands to).
#[macro_export]
macro_rules! export_admission {
    ($t:ty) => {
        const _: () = {
            struct __FlotillaAdmission;
            impl $crate::bindings::admission::Guest for __FlotillaAdmission {
                fn validate(
                    obj: $crate::Object,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    <$t as $crate::Admission>::validate(&obj)
                }
                fn mutate(
                    obj: $crate::Object,
                ) -> ::core::result::Result<$crate::Object, ::std::string::String> {
                    <$t as $crate::Admission>::mutate(obj)
                }
            }
            $crate::bindings::admission::__admission_world_export!(
                __FlotillaAdmission with_types_in $crate::bindings::admission
            );
        };
    };
}

/// Exports `T: Scheduler` as the component's scheduler world (what
/// `#[flotilla_sdk::scheduler]` expands to).
#[macro_export]
macro_rules! export_scheduler {
    (@filter none, $t:ty, $pod:ident, $nodes:ident) => {{
        let _ = (&$pod, &$nodes);
        ::std::vec::Vec::new()
    }};
    (@filter each, $t:ty, $pod:ident, $nodes:ident) => {
        $crate::__pass::each(&$nodes, |node, n| {
            <$t as $crate::Scheduler>::filter(&$pod, n)
                .err()
                .map(|reason| $crate::bindings::scheduler::Refusal { node, reason })
        })
    };
    (@filter batch, $t:ty, $pod:ident, $nodes:ident) => {{
        let verdicts = $crate::__pass::with(&$nodes, |n| {
            <$t as $crate::Scheduler>::filter_all(&$pod, n)
        });
        $nodes
            .iter()
            .zip(verdicts)
            .filter_map(|(&node, v)| {
                v.err()
                    .map(|reason| $crate::bindings::scheduler::Refusal { node, reason })
            })
            .collect()
    }};
    (@score none, $t:ty, $pod:ident, $nodes:ident) => {{
        let _ = &$pod;
        ::std::vec![0; $nodes.len()]
    }};
    (@score each, $t:ty, $pod:ident, $nodes:ident) => {
        $crate::__pass::scores(&$nodes, |n| <$t as $crate::Scheduler>::score(&$pod, n))
    };
    (@score batch, $t:ty, $pod:ident, $nodes:ident) => {
        $crate::__pass::with(&$nodes, |n| <$t as $crate::Scheduler>::score_all(&$pod, n))
    };
    // What `#[flotilla_sdk::scheduler]` writes: how the impl provides each
    // hook — `batch` (its `*_all`), `each` (its per-node function only:
    // called per candidate with no list of nodes made) or `none` (the
    // trait's default: a filter that refuses nothing, a score of 0,
    // answered without looking at the nodes).
    ($t:ty, filter = $f:ident, score = $s:ident) => {
        const _: () = {
            struct __FlotillaScheduler;
            impl $crate::bindings::scheduler::Guest for __FlotillaScheduler {
                fn begin(nodes: ::std::vec::Vec<$crate::Node>) {
                    $crate::__pass::begin(nodes)
                }
                fn update_node(index: u32, node: $crate::Node) {
                    $crate::__pass::update(index, node)
                }
                fn filter(
                    pod: $crate::Pod,
                    nodes: ::std::vec::Vec<u32>,
                ) -> ::std::vec::Vec<$crate::bindings::scheduler::Refusal> {
                    $crate::export_scheduler!(@filter $f, $t, pod, nodes)
                }
                fn score(pod: $crate::Pod, nodes: ::std::vec::Vec<u32>) -> ::std::vec::Vec<u32> {
                    $crate::export_scheduler!(@score $s, $t, pod, nodes)
                }
            }
            $crate::bindings::scheduler::__scheduler_world_export!(
                __FlotillaScheduler with_types_in $crate::bindings::scheduler
            );
        };
    };
    ($t:ty) => {
        $crate::export_scheduler!($t, filter = batch, score = batch);
    };
}

impl Metadata {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets label `key` (keeping the labels sorted by key).
    pub fn set_label(&mut self, key: &str, value: &str) {
        match self.labels.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_string(),
            None => {
                self.labels.push((key.to_string(), value.to_string()));
                self.labels.sort();
            }
        }
    }
}

impl Object {
    pub fn metadata(&self) -> &Metadata {
        match self {
            Object::Pod(p) => &p.metadata,
            Object::Deployment(d) => &d.metadata,
            Object::Job(j) => &j.metadata,
            Object::Function(f) => &f.metadata,
            Object::Other(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Object::Pod(p) => &mut p.metadata,
            Object::Deployment(d) => &mut d.metadata,
            Object::Job(j) => &mut j.metadata,
            Object::Function(f) => &mut f.metadata,
            Object::Other(o) => &mut o.metadata,
        }
    }

    /// The kind as people write it in messages: `pod`, `deployment`,
    /// `configmap`, …
    pub fn kind_name(&self) -> String {
        match self {
            Object::Pod(_) => "pod".into(),
            Object::Deployment(_) => "deployment".into(),
            Object::Job(_) => "job".into(),
            Object::Function(_) => "function".into(),
            Object::Other(o) => o.kind.to_lowercase(),
        }
    }

    /// The pod specs of a pod, Deployment or Job (none for other kinds).
    pub fn pod_spec(&self) -> Option<&PodSpec> {
        match self {
            Object::Pod(p) => Some(&p.spec),
            Object::Deployment(d) => Some(&d.template),
            Object::Job(j) => Some(&j.template),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            name: "web".into(),
            namespace: "prod".into(),
            labels: vec![("app".into(), "web".into())],
            uid: String::new(),
            generation: 0,
        }
    }

    #[test]
    fn labels_are_read_and_set_in_key_order() {
        let mut m = meta();
        assert_eq!(m.label("app"), Some("web"));
        m.set_label("team", "shop");
        m.set_label("app", "api");
        m.set_label("a", "1");
        assert_eq!(
            m.labels,
            [
                ("a".to_string(), "1".to_string()),
                ("app".into(), "api".into()),
                ("team".into(), "shop".into())
            ]
        );
        let obj = Object::Other(Other {
            kind: "ConfigMap".into(),
            metadata: m,
        });
        assert_eq!(obj.kind_name(), "configmap");
        assert!(obj.pod_spec().is_none());
    }
}
