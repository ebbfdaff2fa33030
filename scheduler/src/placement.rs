//! Placement: a pure function from a cluster snapshot and pending pods to a
//! plan. No I/O, no clocks; tested with fixtures. Scheduler plugins come
//! in through [`Extension`].

use flotilla_api::{Capacity, Labels};
use std::collections::BTreeMap;
use std::fmt;

/// What placement needs to know about a node.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub name: String,
    pub labels: Labels,
    pub ready: bool,
    pub unschedulable: bool,
    pub allocatable: Capacity,
    /// Sum of requests of pods already bound to the node.
    pub allocated: Capacity,
    /// Pods bound to the node (spreads pods that request nothing).
    pub pods: usize,
    /// The runtimes the node advertises (`wasm`, `runc`).
    pub runtimes: Vec<String>,
    /// Pod addresses left in the node's block.
    pub free_ips: usize,
}

/// What placement needs to know about a pod.
#[derive(Clone, Debug)]
pub struct PodRequest {
    pub id: String,
    pub cpu: u64,
    pub memory: u64,
    /// Pod slots it takes (`PodSpec::slots`).
    pub slots: u64,
    pub node_selector: Labels,
    /// The runtimes its members need (known at apply, before placement).
    pub runtimes: Vec<&'static str>,
    /// The pod needs an address (it has a network).
    pub needs_ip: bool,
    /// The node its persistent volumes are bound to, if any.
    pub on_node: Option<String>,
}

/// Why a node was ruled out; order is the order filters run in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unfit {
    NotReady,
    Cordoned,
    /// Its persistent volumes are on another node.
    VolumeElsewhere,
    SelectorMismatch,
    /// The node lacks a runtime the pod needs (the first one missing).
    MissingRuntime(&'static str),
    NoPodIps,
    TooManyPods,
    InsufficientCpu,
    InsufficientMemory,
    /// A scheduler plugin (by name) refused it.
    Plugin(String),
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfit::MissingRuntime(r) => return write!(f, "missing runtime {r}"),
            Unfit::Plugin(name) => return f.write_str(name),
            _ => {}
        }
        f.write_str(match self {
            Unfit::NotReady => "not ready",
            Unfit::Cordoned => "cordoned",
            Unfit::VolumeElsewhere => "not holding the pod's volumes",
            Unfit::SelectorMismatch => "node_selector mismatch",
            Unfit::MissingRuntime(_) | Unfit::Plugin(_) => unreachable!("written above"),
            Unfit::NoPodIps => "no free pod addresses",
            Unfit::TooManyPods => "too many pods",
            Unfit::InsufficientCpu => "insufficient cpu",
            Unfit::InsufficientMemory => "insufficient memory",
        })
    }
}

/// The outcome for pods that fit nowhere: counts of nodes per cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    pub id: String,
    pub nodes: usize,
    pub causes: BTreeMap<Unfit, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return f.write_str("0/0 nodes are available: no nodes have joined the cluster");
        }
        write!(f, "0/{} nodes fit: ", self.nodes)?;
        let parts: Vec<String> = self
            .causes
            .iter()
            .map(|(c, n)| format!("{n} {c}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Bindings and refusals for one round of placement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (pod id, node name)
    pub bindings: Vec<(String, String)>,
    pub unschedulable: Vec<Unschedulable>,
}

fn check(node: &NodeView, pod: &PodRequest) -> Result<(), Unfit> {
    if !node.ready {
        return Err(Unfit::NotReady);
    }
    if node.unschedulable {
        return Err(Unfit::Cordoned);
    }
    if pod.on_node.as_ref().is_some_and(|n| *n != node.name) {
        return Err(Unfit::VolumeElsewhere);
    }
    if pod
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Err(Unfit::SelectorMismatch);
    }
    if let Some(r) = pod
        .runtimes
        .iter()
        .find(|r| !node.runtimes.iter().any(|n| n == *r))
    {
        return Err(Unfit::MissingRuntime(r));
    }
    if pod.needs_ip && node.free_ips == 0 {
        return Err(Unfit::NoPodIps);
    }
    if node.allocatable.pods > 0 && node.allocated.pods + pod.slots > node.allocatable.pods {
        return Err(Unfit::TooManyPods);
    }
    if node.allocated.cpu + pod.cpu > node.allocatable.cpu {
        return Err(Unfit::InsufficientCpu);
    }
    if node.allocated.memory + pod.memory > node.allocatable.memory {
        return Err(Unfit::InsufficientMemory);
    }
    Ok(())
}

/// The scheduler's own score, 0–100: the share of cpu and memory the
/// node has free after the pod, averaged (higher is emptier).
fn score(node: &NodeView, pod: &PodRequest) -> f64 {
    let free = |alloc: u64, used: u64| {
        if alloc == 0 {
            0.0
        } else {
            1.0 - (used as f64 / alloc as f64)
        }
    };
    50.0 * (free(node.allocatable.cpu, node.allocated.cpu + pod.cpu)
        + free(node.allocatable.memory, node.allocated.memory + pod.memory))
}

/// The most a plugin's score counts for.
pub const MAX_PLUGIN_SCORE: u32 = 100;

/// What scheduler plugins add to placement.
pub trait Extension {
    /// For each of `candidates` (indices into `nodes`, the nodes given to
    /// [`place_with`] as they are now; all passed the built-in checks), in
    /// order: `Ok(score)` (the plugins' scores summed) or `Err(plugin)`,
    /// the name of the first plugin that refused the node.
    fn judge(
        &mut self,
        pod: &PodRequest,
        candidates: &[usize],
        nodes: &[NodeView],
    ) -> Vec<Result<u32, String>>;

    /// The pod was bound to `nodes[index]` (as it is now) in this pass.
    fn bound(&mut self, pod: &PodRequest, index: usize, node: &NodeView);
}

/// Places pods in order, spreading them over the least-allocated fitting nodes.
/// Each binding counts against the node for the pods after it.
pub fn place(nodes: &[NodeView], pods: &[PodRequest]) -> Plan {
    place_with(nodes, pods, None)
}

/// [`place`] with scheduler plugins filtering and scoring the nodes that
/// passed the built-in checks.
pub fn place_with(
    nodes: &[NodeView],
    pods: &[PodRequest],
    mut ext: Option<&mut dyn Extension>,
) -> Plan {
    let mut nodes: Vec<NodeView> = nodes.to_vec();
    let mut plan = Plan::default();
    let mut fit: Vec<usize> = Vec::with_capacity(nodes.len());
    for pod in pods {
        let mut best: Option<(usize, f64, usize)> = None;
        let mut causes = BTreeMap::new();
        fit.clear();
        for (i, node) in nodes.iter().enumerate() {
            match check(node, pod) {
                Ok(()) => fit.push(i),
                Err(why) => *causes.entry(why).or_insert(0) += 1,
            }
        }
        let extra: Vec<Result<u32, String>> = match ext.as_deref_mut() {
            Some(e) if !fit.is_empty() => e.judge(pod, &fit, &nodes),
            _ => Vec::new(),
        };
        for (k, &i) in fit.iter().enumerate() {
            let node = &nodes[i];
            let added = match extra.get(k) {
                Some(Err(plugin)) => {
                    *causes.entry(Unfit::Plugin(plugin.clone())).or_insert(0) += 1;
                    continue;
                }
                Some(Ok(s)) => f64::from(*s),
                None => 0.0,
            };
            let s = score(node, pod) + added;
            let better = best
                .is_none_or(|(_, b, bp)| s > b + 1e-9 || ((s - b).abs() <= 1e-9 && node.pods < bp));
            if better {
                best = Some((i, s, node.pods));
            }
        }
        match best {
            Some((i, _, _)) => {
                if pod.needs_ip {
                    nodes[i].free_ips -= 1;
                }
                nodes[i].allocated.cpu += pod.cpu;
                nodes[i].allocated.memory += pod.memory;
                nodes[i].allocated.pods += pod.slots;
                nodes[i].pods += 1;
                plan.bindings.push((pod.id.clone(), nodes[i].name.clone()));
                if let Some(e) = ext.as_deref_mut() {
                    e.bound(pod, i, &nodes[i]);
                }
            }
            None => plan.unschedulable.push(Unschedulable {
                id: pod.id.clone(),
                nodes: nodes.len(),
                causes,
            }),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: u64, mem: u64) -> NodeView {
        NodeView {
            name: name.into(),
            labels: Labels::new(),
            ready: true,
            unschedulable: false,
            allocatable: Capacity {
                cpu,
                memory: mem,
                ..Default::default()
            },
            allocated: Capacity::default(),
            pods: 0,
            runtimes: vec!["wasm".into()],
            free_ips: 253,
        }
    }

    fn pod(id: &str, cpu: u64, mem: u64) -> PodRequest {
        PodRequest {
            id: id.into(),
            cpu,
            memory: mem,
            slots: 1,
            node_selector: Labels::new(),
            runtimes: vec!["wasm"],
            needs_ip: false,
            on_node: None,
        }
    }

    #[test]
    fn a_node_takes_no_more_pods_than_its_slots() {
        let mut a = node("a", 100_000, 1 << 40);
        a.allocatable.pods = 3;
        let pods: Vec<_> = (0..3).map(|i| pod(&format!("p{i}"), 0, 0)).collect();
        // A pod of two wasm members takes two slots.
        let mut two = pod("two", 0, 0);
        two.slots = 2;
        let plan = place(&[a.clone()], &[pods[0].clone(), two, pods[1].clone()]);
        assert_eq!(plan.bindings.len(), 2);
        assert_eq!(plan.unschedulable.len(), 1);
        assert_eq!(
            plan.unschedulable[0].to_string(),
            "0/1 nodes fit: 1 too many pods"
        );
        // Unset (0): not limited.
        a.allocatable.pods = 0;
        assert_eq!(place(&[a], &pods).bindings.len(), 3);
    }

    #[test]
    fn spreads_over_the_least_allocated_nodes() {
        let nodes = [node("a", 1000, 1000), node("b", 1000, 1000)];
        let pods: Vec<_> = (0..4).map(|i| pod(&format!("p{i}"), 100, 100)).collect();
        let plan = place(&nodes, &pods);
        let on: Vec<&str> = plan.bindings.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(on, ["a", "b", "a", "b"]);
        // Pods that request nothing spread by count.
        let free: Vec<_> = (0..4).map(|i| pod(&format!("f{i}"), 0, 0)).collect();
        let plan = place(&nodes, &free);
        let on: Vec<&str> = plan.bindings.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(on, ["a", "b", "a", "b"]);
    }

    #[test]
    fn requests_count_against_capacity_within_one_round() {
        let nodes = [node("a", 1000, 1000)];
        let pods = [pod("p1", 600, 10), pod("p2", 600, 10), pod("p3", 400, 10)];
        let plan = place(&nodes, &pods);
        assert_eq!(
            plan.bindings,
            [("p1".into(), "a".into()), ("p3".into(), "a".into())]
        );
        assert_eq!(plan.unschedulable[0].id, "p2");
        assert_eq!(
            plan.unschedulable[0].to_string(),
            "0/1 nodes fit: 1 insufficient cpu"
        );
    }

    #[test]
    fn reasons_count_nodes_per_cause() {
        let mut small = node("small", 1000, 100);
        small.labels.insert("zone".into(), "a".into());
        let mut down = node("down", 1000, 1000);
        down.ready = false;
        let mut cordoned = node("cordoned", 1000, 1000);
        cordoned.unschedulable = true;
        let mut other = node("other", 1000, 1000);
        other.labels.insert("zone".into(), "b".into());
        let mut small2 = small.clone();
        small2.name = "small2".into();
        let mut p = pod("p", 10, 500);
        p.node_selector.insert("zone".into(), "a".into());
        let plan = place(&[small, down, cordoned, other, small2], &[p]);
        assert!(plan.bindings.is_empty());
        assert_eq!(
            plan.unschedulable[0].to_string(),
            "0/5 nodes fit: 1 not ready, 1 cordoned, 1 node_selector mismatch, 2 insufficient memory"
        );
        assert_eq!(
            place(&[], &[pod("x", 0, 0)]).unschedulable[0].to_string(),
            "0/0 nodes are available: no nodes have joined the cluster"
        );
    }

    #[test]
    fn node_selector_picks_matching_nodes() {
        let mut edge = node("edge", 1000, 1000);
        edge.labels.insert("role".into(), "edge".into());
        let mut p = pod("p", 1, 1);
        p.node_selector.insert("role".into(), "edge".into());
        let plan = place(&[node("core", 100_000, 100_000), edge], &[p]);
        assert_eq!(plan.bindings, [("p".into(), "edge".into())]);
    }

    #[test]
    fn pods_go_only_to_nodes_with_every_runtime_they_need() {
        let mut with = node("with-runc", 1000, 1000);
        with.runtimes.push("runc".into());
        let nodes = [node("a", 1000, 1000), with, node("b", 1000, 1000)];
        let mut c = pod("c", 100, 100);
        c.runtimes = vec!["runc", "wasm"];
        let plan = place(&nodes, &[c.clone(), pod("w", 100, 100), c.clone()]);
        assert_eq!(plan.bindings[0], ("c".to_string(), "with-runc".to_string()));
        assert_eq!(plan.bindings[2], ("c".to_string(), "with-runc".to_string()));
        let plan = place(&nodes[..1], &[c]);
        assert!(plan.bindings.is_empty());
        assert_eq!(
            plan.unschedulable[0].to_string(),
            "0/1 nodes fit: 1 missing runtime runc"
        );
        // A node that runs only containers cannot take a wasm pod.
        let mut only_runc = node("r", 1000, 1000);
        only_runc.runtimes = vec!["runc".into()];
        let plan = place(&[only_runc, node("a", 1, 1)], &[pod("w", 100, 100)]);
        assert_eq!(
            plan.unschedulable[0].to_string(),
            "0/2 nodes fit: 1 missing runtime wasm, 1 insufficient cpu"
        );
    }

    #[test]
    fn pods_with_a_network_need_a_free_address_on_the_node() {
        let mut a = node("a", 1000, 1000);
        a.free_ips = 1;
        let b = node("b", 10, 10);
        let mut p1 = pod("p1", 0, 0);
        p1.needs_ip = true;
        let mut p2 = p1.clone();
        p2.id = "p2".into();
        let mut p3 = p1.clone();
        p3.id = "p3".into();
        // b is full of cpu for these pods; a has one address left.
        p1.cpu = 100;
        p2.cpu = 100;
        p3.cpu = 0;
        let plan = place(&[a, b], &[p1, p2, p3]);
        assert_eq!(plan.bindings[0], ("p1".to_string(), "a".to_string()));
        assert_eq!(plan.bindings[1], ("p3".to_string(), "b".to_string()));
        assert_eq!(plan.unschedulable.len(), 1);
        assert_eq!(
            plan.unschedulable[0].to_string(),
            "0/2 nodes fit: 1 no free pod addresses, 1 insufficient cpu"
        );
        // Socket-free pods do not count against addresses.
        let mut full = node("full", 1000, 1000);
        full.free_ips = 0;
        let plan = place(&[full], &[pod("w", 0, 0)]);
        assert_eq!(plan.bindings.len(), 1);
    }

    #[test]
    fn pods_go_where_their_volumes_are() {
        let nodes: Vec<NodeView> = ["a", "b"]
            .iter()
            .map(|n| NodeView {
                name: n.to_string(),
                labels: Labels::new(),
                ready: true,
                unschedulable: false,
                allocatable: Capacity {
                    cpu: 1000,
                    memory: 1 << 30,
                    ..Default::default()
                },
                allocated: Capacity::default(),
                pods: if *n == "a" { 0 } else { 5 },
                runtimes: vec!["wasm".into()],
                free_ips: 10,
            })
            .collect();
        let pod = PodRequest {
            id: "p".into(),
            cpu: 0,
            memory: 0,
            slots: 1,
            node_selector: Labels::new(),
            runtimes: vec!["wasm"],
            needs_ip: false,
            on_node: Some("b".into()),
        };
        let plan = place(&nodes, std::slice::from_ref(&pod));
        assert_eq!(plan.bindings, vec![("p".to_string(), "b".to_string())]);
        let plan = place(&nodes[..1], &[pod]);
        assert_eq!(
            plan.unschedulable[0].to_string(),
            "0/1 nodes fit: 1 not holding the pod's volumes"
        );
    }

    /// Refuses nodes named in `refuse` and scores `favourite` high.
    struct Fake {
        refuse: Vec<&'static str>,
        favourite: &'static str,
        bound: Vec<(String, String)>,
    }

    impl Extension for Fake {
        fn judge(
            &mut self,
            _pod: &PodRequest,
            candidates: &[usize],
            nodes: &[NodeView],
        ) -> Vec<Result<u32, String>> {
            candidates
                .iter()
                .map(|&i| match nodes[i].name.as_str() {
                    r if self.refuse.contains(&r) => Err("fake".to_string()),
                    f if f == self.favourite => Ok(MAX_PLUGIN_SCORE),
                    _ => Ok(0),
                })
                .collect()
        }

        fn bound(&mut self, pod: &PodRequest, _index: usize, node: &NodeView) {
            self.bound.push((pod.id.clone(), node.name.clone()));
        }
    }

    #[test]
    fn plugins_refuse_nodes_by_name_and_their_scores_add_to_placements() {
        let mut busy = node("busy", 1000, 1000);
        busy.allocated.cpu = 500;
        let nodes = [node("a", 1000, 1000), busy, node("down", 1000, 1000)];
        let mut fake = Fake {
            refuse: vec!["a"],
            favourite: "busy",
            bound: Vec::new(),
        };
        let plan = place_with(&nodes, &[pod("p", 100, 100)], Some(&mut fake));
        // Without the plugin the emptier node wins; its score outweighs that.
        assert_eq!(place(&nodes, &[pod("p", 100, 100)]).bindings[0].1, "a");
        assert_eq!(plan.bindings, [("p".into(), "busy".into())]);
        assert_eq!(fake.bound, [("p".into(), "busy".into())]);
        fake.refuse = vec!["a", "busy", "down"];
        let plan = place_with(&nodes, &[pod("q", 100, 100)], Some(&mut fake));
        assert_eq!(plan.unschedulable[0].to_string(), "0/3 nodes fit: 3 fake");
    }
}
