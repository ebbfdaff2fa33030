//! How objects look to people: `get` tables and `describe` pages.

use crate::table::Table;
use flotilla_api::latency;
use flotilla_api::time::{age, now_ms};
use flotilla_api::{Event, MemberState, Object, Pod};
use std::fmt::Write;

/// Members of the pod that are running now.
fn running_members(p: &Pod) -> usize {
    p.status
        .members
        .iter()
        .filter(|m| matches!(m.state, MemberState::Running { .. }))
        .count()
}

/// Ready members (running, and passing their readiness probe if they
/// have one) of all.
fn pod_ready(p: &Pod) -> String {
    let ready = p
        .status
        .members
        .iter()
        .filter(|m| matches!(m.state, MemberState::Running { .. }) && m.ready != Some(false))
        .count();
    format!("{ready}/{}", p.spec.members.len())
}

fn pod_status(p: &Pod) -> String {
    if p.status.reason.is_empty() {
        p.status.phase.to_string()
    } else {
        p.status.reason.clone()
    }
}

/// The `get` table for a list of objects of one kind.
pub fn table(objs: &[Object], all_namespaces: bool, wide: bool) -> String {
    let now = now_ms();
    let ns = |o: &Object| o.meta().namespace.clone();
    let Some(first) = objs.first() else {
        return String::new();
    };
    let mut headers: Vec<&str> = match first {
        Object::Pod(_) => vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        Object::Deployment(_) => vec!["NAME", "READY", "UP-TO-DATE", "REVISION", "ROLLOUT", "AGE"],
        Object::Node(_) => vec!["NAME", "STATUS", "EPOCH", "VERSION", "AGE"],
        Object::Secret(_) | Object::ConfigMap(_) => vec!["NAME", "KEYS", "AGE"],
        Object::Volume(_) => vec!["NAME", "CAPACITY", "NODE", "AGE"],
        Object::Token(_) => vec!["ID", "AGE"],
        Object::Service(_) => vec!["NAME", "CLUSTER-IP", "PORTS", "ENDPOINTS", "AGE"],
        Object::Quota(_) => vec!["NAME", "PODS", "CPU", "MEMORY", "OBJECTS", "AGE"],
        Object::Job(_) => vec![
            "NAME",
            "STATUS",
            "COMPLETIONS",
            "ACTIVE",
            "FAILED",
            "AFTER",
            "AGE",
        ],
        Object::Plugin(_) => vec!["NAME", "HOOK", "KINDS", "NAMESPACES", "FAILURE", "AGE"],
        Object::Function(_) => vec![
            "NAME",
            "ROUTES",
            "READY",
            "REVISION",
            "REQ/S",
            "P50",
            "P99",
            "ERRORS",
            "LAST REQUEST",
            "AGE",
        ],
        Object::Autoscaler(_) => vec![
            "NAME",
            "TARGET",
            "MIN",
            "MAX",
            "REPLICAS",
            "CPU",
            "MEMORY",
            "LAST DECISION",
        ],
    };
    if wide && first.kind() == flotilla_api::Kind::Pod {
        headers.extend(["IP", "NODE"]);
    }
    let with_ns = all_namespaces && first.kind().namespaced();
    if with_ns {
        headers.insert(0, "NAMESPACE");
    }
    let mut t = Table::new(&headers);
    let cap = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for o in objs {
        let mut row = match o {
            Object::Plugin(p) => vec![
                p.metadata.name.clone(),
                p.spec.hook.to_string(),
                plugin_kinds(&p.spec.selector),
                match p.spec.selector.namespaces.as_slice() {
                    [] => "*".into(),
                    ns => ns.join(","),
                },
                format!("{:?}", p.spec.failure_policy),
                age(p.metadata.created_ms, now),
            ],
            Object::Function(f) => vec![
                f.metadata.name.clone(),
                function_routes(&f.spec.routes),
                format!("{}/{}", f.status.ready, f.status.instances),
                f.status.revision.to_string(),
                cap(f
                    .status
                    .traffic
                    .as_ref()
                    .map(|t| format!("{:.1}", t.per_second()))),
                cap(f.status.traffic.as_ref().map(|t| latency::human(t.p50_us))),
                cap(f.status.traffic.as_ref().map(|t| latency::human(t.p99_us))),
                cap(f.status.traffic.as_ref().map(error_share)),
                match f.status.last_request_ms {
                    0 => "-".into(),
                    t => format!("{} ago", age(t, now)),
                },
                age(f.metadata.created_ms, now),
            ],
            Object::Job(j) => vec![
                j.metadata.name.clone(),
                match &j.spec.schedule {
                    Some(s) => format!("Scheduled ({s})"),
                    None if j.status.reason.is_empty() => j.status.phase.to_string(),
                    None => format!("{} ({})", j.status.phase, j.status.reason),
                },
                if j.spec.schedule.is_some() {
                    "-".into()
                } else {
                    format!("{}/{}", j.status.succeeded, j.spec.completions)
                },
                j.status.active.to_string(),
                j.status.failed.to_string(),
                if j.spec.after.is_empty() {
                    "-".into()
                } else {
                    j.spec.after.join(",")
                },
                age(j.metadata.created_ms, now),
            ],
            Object::Autoscaler(a) => {
                let st = &a.status;
                let vs = |cur: Option<String>, target: Option<String>| match target {
                    Some(t) => format!("{}/{t}", cur.unwrap_or_else(|| "-".into())),
                    None => "-".into(),
                };
                vec![
                    a.metadata.name.clone(),
                    format!("deployment/{}", a.spec.target),
                    a.spec.min.to_string(),
                    a.spec.max.to_string(),
                    format!("{}→{}", st.current_replicas, st.desired_replicas),
                    vs(
                        st.cpu.map(|c| format!("{c}%")),
                        a.spec.cpu.map(|c| format!("{c}%")),
                    ),
                    vs(
                        st.memory.map(|m| flotilla_api::quantity::Bytes(m).human()),
                        a.spec.memory.map(|m| m.human()),
                    ),
                    match &st.last_decision {
                        Some(d) => format!(
                            "{} ago: {}→{} ({})",
                            age(d.at_ms, now),
                            d.from,
                            d.to,
                            d.reason
                        ),
                        None if !st.message.is_empty() => st.message.clone(),
                        None => "none yet".into(),
                    },
                ]
            }
            Object::Quota(q) => vec![
                q.metadata.name.clone(),
                cap(q.spec.pods.map(|v| v.to_string())),
                cap(q.spec.cpu.map(|v| format!("{v}m"))),
                cap(q.spec.memory.map(|v| v.to_string())),
                cap(q.spec.objects.map(|v| v.to_string())),
                age(q.metadata.created_ms, now),
            ],
            Object::Pod(p) => {
                let mut r = vec![
                    p.metadata.name.clone(),
                    pod_ready(p),
                    pod_status(p),
                    p.status.restarts().to_string(),
                    age(p.metadata.created_ms, now),
                ];
                if wide {
                    r.push(if p.status.pod_ip.is_empty() {
                        "<none>".into()
                    } else {
                        p.status.pod_ip.clone()
                    });
                    r.push(p.status.node.clone().unwrap_or_else(|| "<none>".into()));
                }
                r
            }
            Object::Deployment(d) => vec![
                d.metadata.name.clone(),
                format!("{}/{}", d.status.ready, d.spec.replicas),
                d.status.updated.to_string(),
                d.status.revision.to_string(),
                d.status.rollout.phase.to_string(),
                age(d.metadata.created_ms, now),
            ],
            Object::Node(n) => vec![
                n.metadata.name.clone(),
                node_state(n),
                n.status.epoch.to_string(),
                n.status.version.clone(),
                age(n.metadata.created_ms, now),
            ],
            Object::Service(svc) => vec![
                svc.metadata.name.clone(),
                if svc.status.cluster_ip.is_empty() {
                    "<pending>".into()
                } else {
                    svc.status.cluster_ip.clone()
                },
                service_ports(svc),
                svc.status.endpoints.len().to_string(),
                age(svc.metadata.created_ms, now),
            ],
            Object::Secret(sec) => vec![
                sec.metadata.name.clone(),
                (sec.data.len() + sec.binary_data.len()).to_string(),
                age(sec.metadata.created_ms, now),
            ],
            Object::ConfigMap(c) => vec![
                c.metadata.name.clone(),
                (c.data.len() + c.binary_data.len()).to_string(),
                age(c.metadata.created_ms, now),
            ],
            Object::Volume(v) => vec![
                v.metadata.name.clone(),
                v.spec.capacity.human(),
                v.status.node.clone().unwrap_or_else(|| "<unbound>".into()),
                age(v.metadata.created_ms, now),
            ],
            Object::Token(t) => vec![t.metadata.name.clone(), age(t.metadata.created_ms, now)],
        };
        if with_ns {
            row.insert(0, ns(o));
        }
        t.row(row);
    }
    t.render()
}

pub fn node_state(n: &flotilla_api::Node) -> String {
    let mut s = if n.status.ready { "Ready" } else { "NotReady" }.to_string();
    if n.unschedulable {
        s.push_str(",SchedulingDisabled");
    }
    if !n.status.link.is_empty() {
        s.push_str(",LinkFlapping");
    }
    s
}

/// The `events` table.
pub fn events_table(events: &[Event]) -> String {
    let now = now_ms();
    let mut t = Table::new(&["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]);
    for e in events {
        let seen = if e.count > 1 {
            format!("{} (x{})", age(e.last_ms, now), e.count)
        } else {
            age(e.last_ms, now)
        };
        t.row(vec![
            seen,
            format!("{:?}", e.type_),
            e.reason.clone(),
            format!("{}/{}", e.kind.to_string().to_lowercase(), e.name),
            e.message.clone(),
        ]);
    }
    t.render()
}

/// The `describe` page.
pub fn describe(obj: &Object, events: &[Event], related: &[Object]) -> String {
    let now = now_ms();
    let m = obj.meta();
    let mut s = String::new();
    let _ = writeln!(s, "Name:         {}", m.name);
    if obj.kind().namespaced() {
        let _ = writeln!(s, "Namespace:    {}", m.namespace);
    }
    let _ = writeln!(s, "Kind:         {}", obj.kind());
    let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        s,
        "Labels:       {}",
        if labels.is_empty() {
            "<none>".into()
        } else {
            labels.join(",")
        }
    );
    let _ = writeln!(s, "UID:          {}", m.uid);
    let _ = writeln!(s, "Created:      {} ago", age(m.created_ms, now));
    let _ = writeln!(
        s,
        "Generation:   {}   Resource version: {}",
        m.generation, m.resource_version
    );
    if let Some(o) = &m.owner {
        let _ = writeln!(s, "Controlled by: {}/{}", o.kind, o.name);
    }
    match obj {
        Object::Plugin(p) => {
            let sp = &p.spec;
            let _ = writeln!(s, "Component:    {}", sp.source.label());
            let _ = writeln!(s, "Hook:         {}", sp.hook);
            let _ = writeln!(
                s,
                "Selects:      kinds {}, namespaces {}",
                plugin_kinds(&sp.selector),
                match sp.selector.namespaces.as_slice() {
                    [] => "*".into(),
                    ns => ns.join(","),
                }
            );
            let _ = writeln!(
                s,
                "Per call:     memory {}, timeout {}, fuel {}   Failure policy: {:?}",
                sp.memory, sp.timeout, sp.fuel, sp.failure_policy
            );
            if !sp.config.is_empty() {
                let _ = writeln!(
                    s,
                    "Config:       {}",
                    sp.config
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        Object::Function(f) => {
            let sp = &f.spec;
            let _ = writeln!(s, "Component:    {}", sp.source.label());
            let _ = writeln!(s, "Routes:       {}", function_routes(&sp.routes));
            let _ = writeln!(
                s,
                "Instances:    {} ready of {} (min {}, max {})   Revision: {}",
                f.status.ready,
                f.status.instances,
                sp.min_instances,
                sp.max_instances,
                f.status.revision
            );
            let idle = match (sp.min_instances, f.status.last_request_ms) {
                (0, 0) => format!("after {} without requests", sp.scale_to_zero_after),
                (0, t) => format!(
                    "after {} without requests (last request {} ago)",
                    sp.scale_to_zero_after,
                    age(t, now)
                ),
                _ => "no (min_instances > 0)".into(),
            };
            let _ = writeln!(s, "Scale to 0:   {idle}");
            let traffic = match &f.status.traffic {
                Some(t) => format!(
                    "{:.1} requests/s over the last {:.0}s, {:.1} in flight on average, p50 {}, p99 {}, {} errors ({})",
                    t.per_second(),
                    t.window_ms as f64 / 1000.0,
                    t.concurrency(),
                    latency::human(t.p50_us),
                    latency::human(t.p99_us),
                    t.errors,
                    error_share(t)
                ),
                None => "no requests in the last report interval".into(),
            };
            let _ = writeln!(s, "Traffic:      {traffic}");
            let _ = writeln!(
                s,
                "Per request:  timeout {}, memory {}, {} at once per node",
                sp.serve.timeout,
                sp.memory.map_or("node default".into(), |m| m.human()),
                sp.serve.max_concurrency
            );
            let _ = writeln!(
                s,
                "Reached at:   service {} port {} (pods listen on {})",
                f.metadata.name,
                flotilla_api::function::SERVICE_PORT,
                sp.port
            );
            if !sp.serve.allow_hosts.is_empty() {
                let _ = writeln!(s, "Outgoing:     {}", sp.serve.allow_hosts.join(", "));
            }
            if !f.status.message.is_empty() {
                let _ = writeln!(s, "Message:      {}", f.status.message);
            }
        }
        Object::Pod(p) => describe_pod(&mut s, p, now),
        Object::Deployment(d) => {
            let _ = writeln!(
                s,
                "Replicas:     {} desired | {} current | {} ready",
                d.spec.replicas, d.status.replicas, d.status.ready
            );
            let _ = writeln!(
                s,
                "Rollout:      {} (revision {}, {} updated, {} of them ready){}",
                d.status.rollout.phase,
                d.status.revision,
                d.status.updated,
                d.status.updated_ready,
                if d.status.rollout.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.status.rollout.message)
                }
            );
            let st = &d.spec.strategy;
            let _ = writeln!(
                s,
                "Strategy:     {:?} (max_surge {}, max_unavailable {}), progress_deadline {}",
                st.kind, st.max_surge, st.max_unavailable, d.spec.progress_deadline
            );
            let _ = writeln!(s, "Pod template:");
            for mem in &d.spec.template.spec.members {
                let _ = writeln!(
                    s,
                    "  {}: {} (restart {:?})",
                    mem.name,
                    mem.source.label(),
                    mem.restart
                );
            }
            if !related.is_empty() {
                let _ = writeln!(s, "Pods:");
                for r in related {
                    if let Object::Pod(p) = r {
                        let _ = writeln!(
                            s,
                            "  {}   {}   {}",
                            p.metadata.name,
                            pod_status(p),
                            p.status.node.as_deref().unwrap_or("<none>")
                        );
                    }
                }
            }
        }
        Object::Node(n) => {
            let _ = writeln!(s, "Status:       {}", node_state(n));
            if !n.status.link.is_empty() {
                let _ = writeln!(s, "Link:         {}", n.status.link);
            }
            for r in &n.status.releasing {
                let _ = writeln!(
                    s,
                    "Releasing:    {} (pod {} gone {} ago; held until the node confirms it stopped)",
                    r.ip,
                    r.pod,
                    age(r.since_ms, now_ms())
                );
            }
            let _ = writeln!(s, "Address:      {}", n.status.address);
            let _ = writeln!(
                s,
                "Arch:         {}   Version: {}   Epoch: {}",
                n.status.arch, n.status.version, n.status.epoch
            );
            let _ = writeln!(s, "Runtimes:     {}", n.status.runtimes.join(", "));
            if !n.status.pod_cidr.is_empty() {
                let _ = writeln!(s, "Pod CIDR:     {}", n.status.pod_cidr);
            }
            if !n.status.pod_network.is_empty() {
                let _ = writeln!(s, "Pod network:  {}", n.status.pod_network);
            }
            let _ = writeln!(
                s,
                "Allocatable:  cpu {}m, memory {}",
                n.status.allocatable.cpu,
                flotilla_api::quantity::Bytes(n.status.allocatable.memory).human()
            );
            let _ = writeln!(s, "Pods:         {}", related.len());
        }
        Object::Volume(v) => {
            let _ = writeln!(s, "Capacity:     {}", v.spec.capacity.human());
            let _ = writeln!(
                s,
                "Node:         {}",
                v.status
                    .node
                    .as_deref()
                    .unwrap_or("<unbound: placed with its first pod>")
            );
            if !related.is_empty() {
                let _ = writeln!(s, "Used by:");
                for r in related {
                    let _ = writeln!(s, "  pod {}", r.meta().name);
                }
            }
        }
        Object::Job(j) => {
            let st = &j.status;
            let _ = writeln!(
                s,
                "Status:       {}{}",
                st.phase,
                if st.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", st.message)
                }
            );
            let _ = writeln!(
                s,
                "Pods:         {} succeeded of {} | {} active (at most {}) | {} failed (backoff limit {})",
                st.succeeded,
                j.spec.completions,
                st.active,
                j.spec.parallelism,
                st.failed,
                j.spec.backoff_limit
            );
            if !j.spec.after.is_empty() {
                let _ = writeln!(s, "After:        {}", j.spec.after.join(", "));
            }
            if let Some(sched) = &j.spec.schedule {
                let _ = writeln!(
                    s,
                    "Schedule:     {sched} ({:?}); last run {}",
                    j.spec.concurrency,
                    if st.last_schedule_ms == 0 {
                        "never".to_string()
                    } else {
                        format!("{} ago", age(st.last_schedule_ms, now))
                    }
                );
            }
            for r in related {
                if let Object::Pod(p) = r {
                    let _ = writeln!(s, "  pod {}   {}", p.metadata.name, pod_status(p));
                }
            }
        }
        Object::Autoscaler(a) => {
            let st = &a.status;
            let _ = writeln!(
                s,
                "Target:       deployment/{} ({}..{} replicas; now {}, wanted {})",
                a.spec.target, a.spec.min, a.spec.max, st.current_replicas, st.desired_replicas
            );
            if let Some(c) = a.spec.cpu {
                let _ = writeln!(
                    s,
                    "CPU:          {} of requests (target {c}%)",
                    st.cpu.map_or("-".into(), |v| format!("{v}%"))
                );
            }
            if let Some(m) = a.spec.memory {
                let _ = writeln!(
                    s,
                    "Memory:       {} per pod (target {})",
                    st.memory
                        .map_or("-".into(), |v| flotilla_api::quantity::Bytes(v).human()),
                    m.human()
                );
            }
            if let Some(m) = &a.spec.metric {
                let _ = writeln!(
                    s,
                    "Metric:       {} = {} per pod (target {})",
                    m.name,
                    st.metric.map_or("-".into(), |v| v.to_string()),
                    m.average.0
                );
            }
            let _ = writeln!(
                s,
                "Windows:      up {}, down {}; {} scalings so far",
                a.spec.scale_up_window, a.spec.scale_down_window, st.decisions
            );
            if let Some(d) = &st.last_decision {
                let _ = writeln!(
                    s,
                    "Last:         {}→{} {} ago: {}",
                    d.from,
                    d.to,
                    age(d.at_ms, now),
                    d.reason
                );
            }
            if !st.message.is_empty() {
                let _ = writeln!(s, "Message:      {}", st.message);
            }
        }
        Object::Quota(q) => {
            // `related`: every object of the namespace.
            let mut used = flotilla_api::quota::Claim::default();
            for o in related {
                used += flotilla_api::quota::claim_of(o);
            }
            let _ = writeln!(s, "Resource     Used      Hard");
            let row = |s: &mut String, what: &str, used: String, hard: Option<String>| {
                if let Some(h) = hard {
                    let _ = writeln!(s, "{what:<12} {used:<9} {h}");
                }
            };
            row(
                &mut s,
                "pods",
                used.pods.to_string(),
                q.spec.pods.map(|v| v.to_string()),
            );
            row(
                &mut s,
                "cpu",
                format!("{}m", used.cpu),
                q.spec.cpu.map(|v| format!("{v}m")),
            );
            row(
                &mut s,
                "memory",
                flotilla_api::quantity::Bytes(used.memory).to_string(),
                q.spec.memory.map(|v| v.to_string()),
            );
            row(
                &mut s,
                "objects",
                used.objects.to_string(),
                q.spec.objects.map(|v| v.to_string()),
            );
            if let Some(m) = q.spec.default_memory {
                let _ = writeln!(s, "Default memory: {m}");
            }
            if let Some(c) = q.spec.default_cpu {
                let _ = writeln!(s, "Default cpu:    {c}m");
            }
        }
        Object::ConfigMap(c) => {
            let _ = writeln!(s, "Data:");
            for (k, v) in &c.data {
                let _ = writeln!(s, "  {k}: {} bytes", v.len());
            }
            for (k, v) in &c.binary_data {
                let _ = writeln!(s, "  {k}: binary, {} bytes base64", v.len());
            }
        }
        Object::Secret(sec) => {
            let _ = writeln!(s, "Data:");
            for (k, v) in sec.data.iter().chain(&sec.binary_data) {
                let _ = writeln!(
                    s,
                    "  {k}: {}",
                    if v == "<hidden>" {
                        "<hidden>".to_string()
                    } else {
                        format!("{} bytes", v.len())
                    }
                );
            }
        }
        Object::Service(svc) => {
            let sel: Vec<String> = svc
                .spec
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "Selector:     {}", sel.join(","));
            let _ = writeln!(
                s,
                "Cluster IP:   {}",
                if svc.status.cluster_ip.is_empty() {
                    "<pending>"
                } else {
                    &svc.status.cluster_ip
                }
            );
            let _ = writeln!(s, "DNS name:     {}.{}.svc", m.name, m.namespace);
            let _ = writeln!(s, "Ports:        {}", service_ports(svc));
            let _ = writeln!(s, "Endpoints:");
            if svc.status.endpoints.is_empty() {
                let _ = writeln!(s, "  <none>");
            }
            for e in &svc.status.endpoints {
                let _ = writeln!(s, "  {:<16} {:<24} {}", e.ip, e.pod, e.node);
            }
        }
        Object::Token(_) => {}
    }
    let _ = writeln!(s, "Events:");
    if events.is_empty() {
        let _ = writeln!(s, "  <none>");
    } else {
        for line in events_table(events).lines() {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}

fn describe_pod(s: &mut String, p: &Pod, now: u64) {
    let _ = writeln!(
        s,
        "Node:         {}",
        p.status.node.as_deref().unwrap_or("<none>")
    );
    let _ = writeln!(s, "Status:       {}", p.status.phase);
    if !p.status.pod_ip.is_empty() {
        let _ = writeln!(s, "IP:           {}", p.status.pod_ip);
    }
    if !p.status.reason.is_empty() {
        let _ = writeln!(s, "Reason:       {}", p.status.reason);
    }
    if !p.status.message.is_empty() {
        let _ = writeln!(s, "Message:      {}", p.status.message);
    }
    if !p.spec.node_selector.is_empty() {
        let sel: Vec<String> = p
            .spec
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "Node selector: {}", sel.join(","));
    }
    let _ = writeln!(s, "Conditions:");
    for (name, ok, why) in conditions(p) {
        let _ = writeln!(s, "  {name:<14}{ok:<7}{why}");
    }
    let _ = writeln!(s, "Members:");
    for m in &p.spec.members {
        let _ = writeln!(s, "  {}:", m.name);
        if !m.ports.is_empty() {
            let ports: Vec<String> = m
                .ports
                .iter()
                .map(|p| {
                    let named = if p.name.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", p.name)
                    };
                    format!("{}/{}{named}", p.port, p.protocol)
                })
                .collect();
            let _ = writeln!(s, "    Ports:      {}", ports.join(", "));
        }
        let w = &m.wasi;
        if !w.is_default() {
            let mut asked = Vec::new();
            if !w.config.is_empty() {
                asked.push(format!("config from {}", w.config.join(", ")));
            }
            if !w.keyvalue.is_empty() {
                asked.push(format!("keyvalue buckets {}", w.keyvalue.join(", ")));
            }
            if w.logging {
                asked.push("logging".to_string());
            }
            let _ = writeln!(s, "    WASI:       {}", asked.join("; "));
        }
        if let flotilla_api::MemberSource::Container {
            image, options: c, ..
        } = &m.source
        {
            let _ = writeln!(s, "    Image:      {image}");
            if !c.command.is_empty() {
                let _ = writeln!(s, "    Command:    {}", c.command.join(" "));
            }
            if !c.user.is_empty() {
                let _ = writeln!(s, "    User:       {}", c.user);
            }
            if c.read_only || !c.capabilities.is_empty() {
                let _ = writeln!(
                    s,
                    "    Security:   {}root filesystem, capabilities: default{}",
                    if c.read_only {
                        "read-only "
                    } else {
                        "writable "
                    },
                    c.capabilities
                        .iter()
                        .map(|c| format!(" +{c}"))
                        .collect::<String>()
                );
            }
        } else if let flotilla_api::MemberSource::Module { digest, size } = &m.source {
            let _ = writeln!(s, "    Module:     {digest} ({size} bytes, uploaded)");
        } else {
            let _ = writeln!(s, "    Wasm:       {}", m.source.label());
        }
        if !m.args.is_empty() {
            let _ = writeln!(s, "    Args:       {}", m.args.join(" "));
        }
        let r = &m.resources;
        let _ = writeln!(
            s,
            "    Resources:  cpu {}m, memory {}, cpu time {}",
            r.cpu,
            r.memory.map_or("unlimited".into(), |b| b.to_string()),
            r.cpu_time.map_or("unlimited".into(), |t| t.to_string())
        );
        let _ = writeln!(s, "    Restart:    {:?}", m.restart);
        if let Some(st) = p.status.members.iter().find(|x| x.name == m.name) {
            let state = match &st.state {
                MemberState::Waiting { reason } => format!("Waiting ({reason})"),
                MemberState::Running { since_ms } => format!("Running for {}", age(*since_ms, now)),
                MemberState::Terminated(t) => {
                    format!("Terminated ({}, exit code {})", t.reason, t.exit_code)
                }
            };
            let _ = writeln!(s, "    State:      {state}");
            if let Some(t) = &st.last_termination {
                let msg = if t.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", t.message)
                };
                let _ = writeln!(
                    s,
                    "    Last exit:  {} with code {}, {} ago{msg}",
                    t.reason,
                    t.exit_code,
                    age(t.finished_ms, now)
                );
            }
            let _ = writeln!(s, "    Restarts:   {}", st.restarts);
        }
    }
}

/// Pod conditions, derived from the status (kubectl's PodScheduled / Ready).
fn conditions(p: &Pod) -> Vec<(&'static str, &'static str, String)> {
    let scheduled = match &p.status.node {
        Some(n) => ("PodScheduled", "True", format!("on node {n}")),
        None if p.status.reason.is_empty() => {
            ("PodScheduled", "False", "waiting for placement".into())
        }
        None => (
            "PodScheduled",
            "False",
            format!("{}: {}", p.status.reason, p.status.message),
        ),
    };
    let running = running_members(p);
    let ready = if running == p.spec.members.len() && running > 0 {
        ("Ready", "True", "all members running".to_string())
    } else {
        (
            "Ready",
            "False",
            format!("{running}/{} members running", p.spec.members.len()),
        )
    };
    vec![scheduled, ready]
}

/// `80/TCP`, `8443:443/TCP` (port:target), with `,node 30443` when exposed.
fn service_ports(svc: &flotilla_api::Service) -> String {
    svc.spec
        .ports
        .iter()
        .map(|p| {
            let mut out = if p.target() == p.port {
                format!("{}/{}", p.port, p.protocol)
            } else {
                format!("{}:{}/{}", p.port, p.target(), p.protocol)
            };
            if let Some(n) = p.node_port {
                out.push_str(&format!(" (node {n})"));
            }
            out
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A function's routes as `host/path` (any host: just the path).
/// `wasi:logging` levels from least to most severe, as the agent writes
/// them (`[WARN] context: message`).
const LEVELS: [&str; 6] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"];

/// Passes on only the whole log lines `keep` says yes to (the last line
/// is judged at `flush` even without its newline).
pub struct LineFilter<W> {
    out: W,
    keep: Box<dyn FnMut(&str) -> bool>,
    line: Vec<u8>,
}

impl<W: std::io::Write> LineFilter<W> {
    pub fn new(out: W, keep: impl FnMut(&str) -> bool + 'static) -> LineFilter<W> {
        LineFilter {
            out,
            keep: Box::new(keep),
            line: Vec::new(),
        }
    }

    /// Only the `wasi:logging` lines at `level` or above (after a function
    /// request's `[req ID] ` tag, if any); other lines are left out.
    pub fn levels(out: W, level: &str) -> anyhow::Result<LineFilter<W>> {
        let min = LEVELS
            .iter()
            .position(|l| l.eq_ignore_ascii_case(level))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown level '{level}'; one of trace, debug, info, warn, error, critical"
                )
            })?;
        Ok(LineFilter::new(out, move |line| {
            level_of(line).is_some_and(|l| l >= min)
        }))
    }

    /// Only the lines of one function request: the ones its instance
    /// wrote (`[req ID] …`) and the agent's notes on it (`[flotilla]
    /// request ID: …`).
    pub fn request(out: W, id: &str) -> LineFilter<W> {
        let marks = [format!("[req {id}] "), format!("] request {id}: ")];
        LineFilter::new(out, move |line| {
            marks.iter().any(|m| line.contains(m.as_str()))
        })
    }

    fn pass(&mut self) -> std::io::Result<()> {
        let text = String::from_utf8_lossy(&self.line);
        if (self.keep)(&text) {
            self.out.write_all(&self.line)?;
        }
        self.line.clear();
        Ok(())
    }
}

/// The level of a log line, if it is a `wasi:logging` line.
fn level_of(line: &str) -> Option<usize> {
    let rest = match line.strip_prefix("[req ") {
        Some(r) => &r[r.find("] ")? + 2..],
        None => line,
    };
    let tag = rest.strip_prefix('[')?.split_once("] ")?.0;
    LEVELS.iter().position(|l| *l == tag)
}

impl<W: std::io::Write> std::io::Write for LineFilter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' {
                self.pass()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.pass()?;
        }
        self.out.flush()
    }
}

/// A function's errors as a share of its requests: `0%`, `0.2%`, `12%`.
fn error_share(t: &flotilla_api::function::Traffic) -> String {
    if t.requests == 0 || t.errors == 0 {
        return "0%".into();
    }
    let pct = t.errors as f64 * 100.0 / t.requests as f64;
    if pct < 10.0 {
        format!("{pct:.1}%")
    } else {
        format!("{pct:.0}%")
    }
}

fn function_routes(routes: &[flotilla_api::function::Route]) -> String {
    if routes.is_empty() {
        return "-".into();
    }
    routes
        .iter()
        .map(|r| format!("{}{}", r.host, r.path))
        .collect::<Vec<_>>()
        .join(",")
}

/// A plugin selector's kinds, `*` for all.
fn plugin_kinds(s: &flotilla_api::plugin::PluginSelector) -> String {
    match s.kinds.as_slice() {
        [] => "*".into(),
        kinds => kinds
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(","),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn level_lines_keep_levelled_lines_at_or_above_the_level() {
        use std::io::Write;
        let mut w = LineFilter::levels(Vec::new(), "warn").unwrap();
        w.write_all(b"plain stdout\n[INFO] counter: count=1\n[WARN] counter: slow\n[req ab-1] [ERROR] h: boom\n[req ab-2] [DEBUG] h: x\n[CRITICAL] down")
            .unwrap();
        w.flush().unwrap();
        assert_eq!(
            String::from_utf8(w.out).unwrap(),
            "[WARN] counter: slow\n[req ab-1] [ERROR] h: boom\n[CRITICAL] down"
        );
        assert!(LineFilter::levels(Vec::new(), "loud").is_err());
    }

    #[test]
    fn request_lines_keep_one_requests_output_and_notes() {
        let mut got = Vec::new();
        {
            let mut w = LineFilter::request(&mut got, "ab-1");
            w.write_all(b"[req ab-1] one\n[req ab-12] other\n[req ab")
                .unwrap();
            w.write_all(b"-1] two\n[flotilla] request ab-1: trapped: x\nplain\n")
                .unwrap();
            w.write_all(b"[req ab-1] no newline").unwrap();
            w.flush().unwrap();
        }
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "[req ab-1] one\n[req ab-1] two\n[flotilla] request ab-1: trapped: x\n[req ab-1] no newline"
        );
    }
}
