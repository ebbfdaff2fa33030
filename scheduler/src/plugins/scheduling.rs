//! Scheduler plugins in placement: a [`Pass`] is the
//! [`Extension`](crate::placement::Extension) one placement pass runs
//! with. Each plugin's instance is made at its first call of the pass,
//! given the pass's nodes once (`begin`), and reused for the pass's later
//! calls, which name nodes by index (fuel and deadline are reset before
//! each call); a call that fails drops the instance, so the next call
//! starts fresh (with `begin` again). Reuse within a pass is safe because nothing crosses a tenant
//! boundary through it: every call of a pass comes from the scheduler's
//! own placement loop, the plugin is an admin's and sees every pod it
//! selects anyway, and its answers are only filter verdicts and scores —
//! what one call leaves in the instance can change later verdicts of the
//! same pass, never reach a workload or a client.

use super::{Call, Plugins, wit};
use crate::cluster::Cluster;
use crate::placement::{Extension, MAX_PLUGIN_SCORE, NodeView, PodRequest};
use flotilla_api::meta::{ARCH_LABEL, Labels};
use flotilla_api::plugin::{FailurePolicy, Hook, Plugin};
use flotilla_api::{Kind, Object, Pod};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wasmtime::Store;

pub(super) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/plugin",
        world: "scheduler",
        with: { "flotilla:plugin/types": crate::plugins::wit },
    });
}

/// What `count-pods` counts over: the pods bound to each node, including
/// those bound earlier in the pass.
#[derive(Default)]
pub struct Topology {
    node_labels: HashMap<String, Labels>,
    /// (node, namespace, labels) of each bound pod.
    pods: Vec<(String, String, Labels)>,
    /// The namespace of the pod being placed.
    namespace: String,
}

impl Topology {
    pub fn count(&self, key: &str, value: &str, selector: &[(String, String)]) -> u32 {
        let on = |node: &str| {
            self.node_labels
                .get(node)
                .and_then(|l| l.get(key))
                .is_some_and(|v| v == value)
        };
        self.pods
            .iter()
            .filter(|(node, ns, labels)| {
                *ns == self.namespace
                    && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                    && on(node)
            })
            .count() as u32
    }
}

impl bindings::flotilla::plugin::placement::Host for Call {
    fn count_pods(&mut self, key: String, value: String, selector: Vec<(String, String)>) -> u32 {
        match &self.topology {
            Some(t) => t.lock().expect("poisoned").count(&key, &value, &selector),
            None => 0,
        }
    }
}

/// One plugin in a pass, with its instance once made.
struct Active {
    object: Arc<Object>,
    instance: Option<(Store<Call>, bindings::Scheduler)>,
}

impl Active {
    fn plugin(&self) -> &Plugin {
        match &*self.object {
            Object::Plugin(p) => p,
            _ => unreachable!("only plugins are made active"),
        }
    }
}

/// The scheduler plugins of one placement pass.
pub struct Pass<'a> {
    plugins: &'a Plugins,
    cluster: &'a Cluster,
    active: Vec<Active>,
    /// The pending pods as plugins see them (namespace, record), by uid.
    pods: HashMap<String, Arc<(String, wit::Pod)>>,
    /// Every node as plugins see them, in placement's order.
    nodes: Vec<wit::Node>,
    topology: Arc<Mutex<Topology>>,
    /// Keeps the epoch ticker going for the pass.
    _busy: Option<super::Busy>,
}

fn lower_node(n: &NodeView) -> wit::Node {
    wit::Node {
        metadata: wit::Metadata {
            name: n.name.clone(),
            namespace: String::new(),
            labels: n
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            uid: String::new(),
            generation: 0,
        },
        unschedulable: n.unschedulable,
        ready: n.ready,
        arch: n.labels.get(ARCH_LABEL).cloned().unwrap_or_default(),
        runtimes: n.runtimes.clone(),
        allocatable_cpu: n.allocatable.cpu,
        allocatable_memory: n.allocatable.memory,
        requested_cpu: n.allocated.cpu,
        requested_memory: n.allocated.memory,
    }
}

impl<'a> Pass<'a> {
    /// A pass over `nodes` for `pending`, with the scheduler plugins
    /// stored now; `None` when there are none (placement runs as if
    /// plugins did not exist).
    pub fn new(
        cluster: &'a Cluster,
        nodes: &[NodeView],
        pending: &[&Pod],
        bound: &[&Pod],
    ) -> Option<Pass<'a>> {
        let active: Vec<Active> = cluster
            .store
            .list("plugins/")
            .into_iter()
            .filter(|o| matches!(&**o, Object::Plugin(p) if p.spec.hook == Hook::Scheduler))
            .map(|object| Active {
                object,
                instance: None,
            })
            .collect();
        if active.is_empty() {
            return None;
        }
        let topology = Topology {
            node_labels: nodes
                .iter()
                .map(|n| (n.name.clone(), n.labels.clone()))
                .collect(),
            pods: bound
                .iter()
                .filter_map(|p| {
                    let node = p.status.node.clone()?;
                    Some((
                        node,
                        p.metadata.namespace.clone(),
                        p.metadata.labels.clone(),
                    ))
                })
                .collect(),
            namespace: String::new(),
        };
        Some(Pass {
            plugins: &cluster.plugins,
            cluster,
            active,
            pods: pending
                .iter()
                .map(|p| {
                    let lowered = wit::Pod {
                        metadata: super::convert::meta(&p.metadata),
                        spec: super::convert::pod_spec(&p.spec),
                    };
                    (
                        p.metadata.uid.clone(),
                        Arc::new((p.metadata.namespace.clone(), lowered)),
                    )
                })
                .collect(),
            nodes: nodes.iter().map(lower_node).collect(),
            topology: Arc::new(Mutex::new(topology)),
            _busy: cluster.plugins.busy().ok(),
        })
    }

    /// Calls `f` on plugin `k`'s instance (made if needed) within the
    /// plugin's per-call limits.
    fn call<R>(
        &mut self,
        k: usize,
        f: impl FnOnce(&bindings::Scheduler, &mut Store<Call>) -> wasmtime::Result<R>,
    ) -> Result<R, String> {
        let plugins = self.plugins;
        let topology = self.topology.clone();
        let blobs = &self.cluster.blobs;
        let nodes = &self.nodes;
        let a = &mut self.active[k];
        let plugin = match &*a.object {
            Object::Plugin(p) => p,
            _ => unreachable!("only plugins are made active"),
        };
        if a.instance.is_none() {
            let pre = plugins.prepare_scheduler(blobs, plugin)?;
            let mut store = plugins.store(plugin, Some(topology))?;
            let instance = plugins
                .guarded(&mut store, plugin, |s| {
                    let instance = pre.instantiate(&mut *s)?;
                    instance.call_begin(&mut *s, nodes)?;
                    Ok(instance)
                })
                .map_err(|e| e.0)?;
            a.instance = Some((store, instance));
        }
        let (store, instance) = a.instance.as_mut().expect("made above");
        let out = plugins
            .guarded(store, plugin, |s| f(instance, s))
            .map_err(|e| e.0);
        if out.is_err() {
            a.instance = None;
        }
        out
    }

    /// A failed call, recorded; `true` if the plugin's policy refuses the
    /// nodes it was asked about.
    fn failed(&self, k: usize, why: &str) -> bool {
        let a = &self.active[k];
        let plugin = a.plugin();
        let refuse = plugin.spec.failure_policy == FailurePolicy::Fail;
        let policy = match refuse {
            true => "the nodes it was asked about are not a fit (failure_policy = Fail)",
            false => "placement went on without it (failure_policy = Ignore)",
        };
        tracing::warn!(plugin = %plugin.metadata.name, "scheduler plugin call failed: {why}; {policy}");
        self.cluster.event(
            &a.object,
            flotilla_api::EventType::Warning,
            "CallFailed",
            format!("{why}; {policy}"),
        );
        refuse
    }
}

impl Pass<'_> {
    /// Plugin `k`'s say on the nodes at `indices`, added into `out` (one
    /// slot per index): a refused node's slot becomes `Err(name)`, a
    /// passed one's gains its score. `Err` when a call failed (then `out`
    /// is as it was).
    fn ask(
        &mut self,
        k: usize,
        pod: &wit::Pod,
        indices: &[u32],
        out: &mut [&mut Result<u32, String>],
    ) -> Result<(), String> {
        let refusals = self.call(k, |inst, s| inst.call_filter(s, pod, indices))?;
        // The usual case, nothing refused: score every index as given.
        let mut refused = Vec::new();
        if !refusals.is_empty() {
            refused = vec![false; indices.len()];
            for r in &refusals {
                // Indices are ascending: find the call's position of each.
                match indices.binary_search(&r.node) {
                    Ok(at) => refused[at] = true,
                    Err(_) => {
                        return Err(format!(
                            "filter refused node {}, which it was not asked about",
                            r.node
                        ));
                    }
                }
            }
        }
        let passed: Vec<u32>;
        let asked = match refused.is_empty() {
            true => indices,
            false => {
                passed = indices
                    .iter()
                    .zip(&refused)
                    .filter(|(_, r)| !**r)
                    .map(|(&i, _)| i)
                    .collect();
                &passed
            }
        };
        let scores = match asked.is_empty() {
            true => Vec::new(),
            false => self.call(k, |inst, s| inst.call_score(s, pod, asked))?,
        };
        if scores.len() != asked.len() {
            return Err(format!(
                "score answered for {} nodes, not the {} it was given",
                scores.len(),
                asked.len()
            ));
        }
        let name = self.active[k].plugin().metadata.name.as_str();
        let mut scores = scores.into_iter();
        for (at, slot) in out.iter_mut().enumerate() {
            if refused.get(at).copied().unwrap_or(false) {
                **slot = Err(name.to_string());
            } else if let (Some(s), Ok(total)) = (scores.next(), &mut **slot) {
                *total += s.min(MAX_PLUGIN_SCORE);
            }
        }
        Ok(())
    }
}

impl Extension for Pass<'_> {
    fn judge(
        &mut self,
        pod: &PodRequest,
        candidates: &[usize],
        _nodes: &[NodeView],
    ) -> Vec<Result<u32, String>> {
        let mut out: Vec<Result<u32, String>> = vec![Ok(0); candidates.len()];
        let Some(entry) = self.pods.get(&pod.id).cloned() else {
            return out;
        };
        let (namespace, wit_pod) = &*entry;
        namespace.clone_into(&mut self.topology.lock().expect("poisoned").namespace);
        for k in 0..self.active.len() {
            let plugin = self.active[k].plugin();
            if !plugin.spec.selector.selects(Kind::Pod, namespace) {
                continue;
            }
            // The nodes still in the running (placement's node list is
            // the one this pass was made with).
            let (indices, mut open): (Vec<u32>, Vec<&mut Result<u32, String>>) = out
                .iter_mut()
                .zip(candidates)
                .filter(|(o, _)| o.is_ok())
                .map(|(o, &i)| (i as u32, o))
                .unzip();
            if indices.is_empty() {
                break;
            }
            if let Err(why) = self.ask(k, wit_pod, &indices, &mut open)
                && self.failed(k, &why)
            {
                let name = self.active[k].plugin().metadata.name.clone();
                open.into_iter().for_each(|o| *o = Err(name.clone()));
            }
        }
        out
    }

    fn bound(&mut self, pod: &PodRequest, index: usize, node: &NodeView) {
        if let Some(i) = (index < self.nodes.len()).then_some(index) {
            self.nodes[i].requested_cpu = node.allocated.cpu;
            self.nodes[i].requested_memory = node.allocated.memory;
            // Instances of this pass hear of it; one that fails is
            // dropped and gets the nodes afresh with its next `begin`.
            let updated = self.nodes[i].clone();
            for k in 0..self.active.len() {
                if self.active[k].instance.is_some()
                    && let Err(why) =
                        self.call(k, |inst, s| inst.call_update_node(s, i as u32, &updated))
                {
                    self.failed(k, &why);
                }
            }
        }
        if let Some(entry) = self.pods.get(&pod.id) {
            let (ns, p) = &**entry;
            let labels = p.metadata.labels.iter().cloned().collect();
            self.topology.lock().expect("poisoned").pods.push((
                node.name.clone(),
                ns.clone(),
                labels,
            ));
        }
    }
}
