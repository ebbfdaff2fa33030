//! The kinds Flotilla stores: pods, deployments, nodes and events.

use crate::meta::{Labels, ObjectMeta};
use crate::quantity::{Bytes, Millis};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The kinds of stored object, with their names on the command line and in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Pod,
    Deployment,
    Node,
    Event,
    Secret,
    Token,
    Service,
    ConfigMap,
    Volume,
    Quota,
    Autoscaler,
    Job,
    Function,
    Plugin,
}

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::Pod,
        Kind::Deployment,
        Kind::Node,
        Kind::Event,
        Kind::Secret,
        Kind::Token,
        Kind::Service,
        Kind::ConfigMap,
        Kind::Volume,
        Kind::Quota,
        Kind::Autoscaler,
        Kind::Job,
        Kind::Function,
        Kind::Plugin,
    ];

    /// The plural, lowercase name used in URLs and store keys.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Deployment => "deployments",
            Kind::Node => "nodes",
            Kind::Event => "events",
            Kind::Secret => "secrets",
            Kind::Token => "tokens",
            Kind::Service => "services",
            Kind::ConfigMap => "configmaps",
            Kind::Volume => "volumes",
            Kind::Quota => "quotas",
            Kind::Autoscaler => "autoscalers",
            Kind::Job => "jobs",
            Kind::Function => "functions",
            Kind::Plugin => "plugins",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Token | Kind::Plugin)
    }

    /// Accepts the singular, plural and short names people type (`po`, `deploy`, …).
    pub fn from_user(s: &str) -> Option<Kind> {
        Some(match s.to_ascii_lowercase().as_str() {
            "pod" | "pods" | "po" => Kind::Pod,
            "deployment" | "deployments" | "deploy" => Kind::Deployment,
            "node" | "nodes" | "no" => Kind::Node,
            "event" | "events" | "ev" => Kind::Event,
            "secret" | "secrets" => Kind::Secret,
            "token" | "tokens" => Kind::Token,
            "service" | "services" | "svc" => Kind::Service,
            "configmap" | "configmaps" | "cm" | "config" | "configs" => Kind::ConfigMap,
            "volume" | "volumes" | "vol" | "pv" => Kind::Volume,
            "quota" | "quotas" => Kind::Quota,
            "autoscaler" | "autoscalers" | "hpa" => Kind::Autoscaler,
            "job" | "jobs" | "cronjob" | "cronjobs" => Kind::Job,
            "function" | "functions" | "fn" | "fns" => Kind::Function,
            "plugin" | "plugins" => Kind::Plugin,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Pod => "Pod",
            Kind::Deployment => "Deployment",
            Kind::Node => "Node",
            Kind::Event => "Event",
            Kind::Secret => "Secret",
            Kind::Token => "Token",
            Kind::Service => "Service",
            Kind::ConfigMap => "ConfigMap",
            Kind::Volume => "Volume",
            Kind::Quota => "Quota",
            Kind::Autoscaler => "Autoscaler",
            Kind::Job => "Job",
            Kind::Function => "Function",
            Kind::Plugin => "Plugin",
        })
    }
}

/// Any stored object, tagged by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Object {
    Pod(Pod),
    Deployment(Deployment),
    Node(Node),
    Secret(Secret),
    Token(Token),
    Service(Service),
    ConfigMap(crate::config::ConfigMap),
    Volume(crate::config::PersistentVolume),
    Quota(crate::quota::Quota),
    Autoscaler(crate::autoscale::Autoscaler),
    Job(crate::job::Job),
    Function(crate::function::Function),
    Plugin(crate::plugin::Plugin),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::Deployment(_) => Kind::Deployment,
            Object::Node(_) => Kind::Node,
            Object::Secret(_) => Kind::Secret,
            Object::Token(_) => Kind::Token,
            Object::Service(_) => Kind::Service,
            Object::ConfigMap(_) => Kind::ConfigMap,
            Object::Volume(_) => Kind::Volume,
            Object::Quota(_) => Kind::Quota,
            Object::Autoscaler(_) => Kind::Autoscaler,
            Object::Job(_) => Kind::Job,
            Object::Function(_) => Kind::Function,
            Object::Plugin(_) => Kind::Plugin,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Pod(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
            Object::Token(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::Volume(o) => &o.metadata,
            Object::Quota(o) => &o.metadata,
            Object::Autoscaler(o) => &o.metadata,
            Object::Job(o) => &o.metadata,
            Object::Function(o) => &o.metadata,
            Object::Plugin(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Pod(o) => &mut o.metadata,
            Object::Deployment(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
            Object::Secret(o) => &mut o.metadata,
            Object::Token(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::ConfigMap(o) => &mut o.metadata,
            Object::Volume(o) => &mut o.metadata,
            Object::Quota(o) => &mut o.metadata,
            Object::Autoscaler(o) => &mut o.metadata,
            Object::Job(o) => &mut o.metadata,
            Object::Function(o) => &mut o.metadata,
            Object::Plugin(o) => &mut o.metadata,
        }
    }

    /// The store key: `pods/default/web`, `nodes/edge-1`.
    pub fn key(&self) -> String {
        key(self.kind(), &self.meta().namespace, &self.meta().name)
    }
}

/// The store key of an object of `kind` named `name` in `namespace`.
pub fn key(kind: Kind, namespace: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{}/{namespace}/{name}", kind.plural())
    } else {
        format!("{}/{name}", kind.plural())
    }
}

/// What to do when a member exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether a member that exited with `success` should run again.
    pub fn restarts(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

/// Requested resources of one member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in millicores (1000 = one core): reserved at placement and the
    /// most the member may use (a container's CFS quota; a wasm member is
    /// held back at its epoch ticks). 0: no limit, nothing reserved.
    #[serde(default)]
    pub cpu: u32,
    /// Memory limit; the member's linear memories may not grow past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Bytes>,
    /// CPU time one run of the member may use before it is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time: Option<Millis>,
    /// Disk a container member may write to its own filesystem (its
    /// writable layer; volumes count against their own limits). Over it,
    /// the pod is evicted. Default: the node's `--container-scratch-limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Bytes>,
}

/// One member of a pod: a wasm module (WASI preview 1 command) or component
/// (wasi:cli/run), uploaded to the scheduler or from an OCI registry; or a
/// container image run through runc.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    pub name: String,
    /// What the member runs (`module`, `artifact` or `container` in JSON).
    #[serde(flatten)]
    pub source: MemberSource,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Variables: text, `{ secret|config = NAME, key = K }` or
    /// `{ field = "pod.name" }`. A member sees exactly these and `env_from`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, crate::config::EnvValue>,
    /// Every key of ConfigMaps and Secrets as variables (before `env`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<crate::config::EnvFrom>,
    /// The pod's volumes this member sees, and where.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::config::Mount>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Ports the member listens on inside the pod's network namespace. A pod
    /// with ports (or with containers) gets a namespace and an address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Restarts the member when it fails (reason `Unhealthy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<crate::probe::Probe>,
    /// Keeps the pod out of service endpoints while it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<crate::probe::Probe>,
    /// Holds the other two until it passes once; failing, restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<crate::probe::Probe>,
    /// Runs before the member is stopped (within its grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_stop: Option<crate::probe::Hook>,
    /// Served per request instead of run: a `wasi:http` component answering
    /// on the member's first port, a fresh instance for each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<crate::function::HttpServe>,
    /// Host interfaces beyond WASI's CLI, sockets and HTTP (wasm only):
    /// `wasi:config`, `wasi:keyvalue`, `wasi:logging`; each off unless asked.
    #[serde(
        default,
        skip_serializing_if = "crate::interfaces::HostInterfaces::is_default"
    )]
    pub wasi: crate::interfaces::HostInterfaces,
}

impl MemberSpec {
    /// The member's probes, by kind.
    pub fn probes(&self) -> impl Iterator<Item = (crate::probe::Kind, &crate::probe::Probe)> {
        use crate::probe::Kind;
        [
            (Kind::Startup, &self.startup),
            (Kind::Liveness, &self.liveness),
            (Kind::Readiness, &self.readiness),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.as_ref().map(|p| (k, p)))
    }
}

/// Where a member's code comes from: a contract the scheduler checks at
/// apply and every node can fulfil without the client's filesystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberSource {
    /// A wasm module or component uploaded to the scheduler's content store
    /// (`PUT /v1/blobs/DIGEST`; the CLI does it for `wasm = "./file"`).
    /// Nodes fetch it from the scheduler, verified by digest and size.
    Module { digest: String, size: u64 },
    /// A wasm artifact in an OCI registry (`wasm = "oci://…"`), or a
    /// single-layer image holding one `.wasm`. `reference` has no scheme.
    Artifact {
        reference: String,
        /// The manifest digest, once resolved (empty: the node resolves).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        digest: String,
    },
    /// A container image run through runc.
    Container {
        image: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        digest: String,
        #[serde(default, skip_serializing_if = "ContainerOptions::is_default")]
        options: ContainerOptions,
    },
}

impl Default for MemberSource {
    fn default() -> Self {
        MemberSource::Module {
            digest: String::new(),
            size: 0,
        }
    }
}

impl MemberSource {
    /// A module uploaded with these bytes' digest and size.
    pub fn module(bytes: &[u8]) -> MemberSource {
        MemberSource::Module {
            digest: crate::manifest::digest_of(bytes),
            size: bytes.len() as u64,
        }
    }

    /// A wasm artifact from a registry (`oci://` prefix optional).
    pub fn artifact(reference: &str) -> MemberSource {
        MemberSource::Artifact {
            reference: reference.trim_start_matches("oci://").to_string(),
            digest: String::new(),
        }
    }

    /// A container image with default options.
    pub fn container(image: &str) -> MemberSource {
        MemberSource::Container {
            image: image.to_string(),
            digest: String::new(),
            options: ContainerOptions::default(),
        }
    }

    /// How people see it: `sha256:…` (uploaded), `oci://REF`, or the image.
    pub fn label(&self) -> String {
        match self {
            MemberSource::Module { digest, .. } => digest.clone(),
            MemberSource::Artifact { reference, .. } => format!("oci://{reference}"),
            MemberSource::Container { image, .. } => image.clone(),
        }
    }
}

/// Checks a member's source and settings: the one validation the CLI (after
/// reading a manifest) and the API (on every write) share. Pure: it reads
/// no file and asks no registry.
pub fn validate_member(m: &MemberSpec) -> Result<(), String> {
    let container = matches!(m.source, MemberSource::Container { .. });
    for (kind, p) in m.probes() {
        p.validate(kind, container)?;
    }
    if let Some(h) = &m.pre_stop {
        h.validate(container)?;
    }
    if let Some(h) = &m.http {
        if container {
            return Err(
                "http serves a wasm component per request; a container serves its own port".into(),
            );
        }
        if !m.ports.iter().any(|p| p.protocol == Protocol::Tcp) {
            return Err(
                "a member with http needs a tcp port to be served on, e.g. ports = [8080]".into(),
            );
        }
        h.validate()?;
    }
    if !m.wasi.is_default() {
        if container {
            return Err(
                "wasi host interfaces (config, keyvalue, logging) are for wasm members; a container reads files and talks to services"
                    .into(),
            );
        }
        m.wasi.validate()?;
    }
    if m.resources.disk.is_some() && !matches!(m.source, MemberSource::Container { .. }) {
        return Err(
            "resources.disk caps a container's writable layer; a wasm member writes only to volumes (give those a size_limit)"
                .into(),
        );
    }
    match &m.source {
        MemberSource::Module { digest, size } => {
            crate::content::digest_hex(digest).map_err(|e| format!("module: {e}"))?;
            if *size < 8 {
                return Err(format!(
                    "module {digest} has size {size}; a wasm module is at least 8 bytes"
                ));
            }
            if *size > crate::manifest::MAX_MODULE_BYTES {
                return Err(format!(
                    "module {digest} is {size} bytes, more than the {}-byte limit",
                    crate::manifest::MAX_MODULE_BYTES
                ));
            }
        }
        MemberSource::Artifact { reference, digest } => {
            crate::manifest::check_image_ref(reference)
                .map_err(|w| format!("'oci://{reference}' {w}"))?;
            if !digest.is_empty() {
                crate::content::digest_hex(digest).map_err(|e| format!("artifact: {e}"))?;
            }
        }
        MemberSource::Container {
            image,
            digest,
            options,
        } => {
            crate::manifest::check_image_ref(image).map_err(|w| format!("image '{image}' {w}"))?;
            if !digest.is_empty() {
                crate::content::digest_hex(digest).map_err(|e| format!("image: {e}"))?;
            }
            for c in &options.capabilities {
                check_capability(c)?;
            }
            if let Some(g) = options.grace_period
                && g > MAX_GRACE_PERIOD_SECS
            {
                return Err(format!(
                    "grace_period of {g} s is over the cluster's maximum of {MAX_GRACE_PERIOD_SECS} s"
                ));
            }
        }
    }
    Ok(())
}

/// The longest `grace_period` a container may ask for. A deleted pod's
/// address is not handed out again before its node confirms the pod gone,
/// or before this long (and a margin) has passed.
pub const MAX_GRACE_PERIOD_SECS: u32 = 300;

/// A port a member serves on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Optional name services may refer to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl MemberSpec {
    /// Whether the member runs as a container (through runc).
    pub fn is_container(&self) -> bool {
        matches!(self.source, MemberSource::Container { .. })
    }

    /// The registry reference the member runs, if any: its image, or its
    /// wasm artifact's reference.
    pub fn registry_ref(&self) -> Option<&str> {
        match &self.source {
            MemberSource::Container { image, .. } => Some(image),
            MemberSource::Artifact { reference, .. } => Some(reference),
            MemberSource::Module { .. } => None,
        }
    }

    /// What a node pulls for a registry source: the reference, pinned to
    /// the digest resolved at apply (`REPO:TAG@sha256:…`) when there is one.
    pub fn pull_ref(&self) -> Option<String> {
        let (reference, digest) = match &self.source {
            MemberSource::Container { image, digest, .. } => (image, digest),
            MemberSource::Artifact { reference, digest } => (reference, digest),
            MemberSource::Module { .. } => return None,
        };
        Some(if digest.is_empty() || reference.contains('@') {
            reference.clone()
        } else {
            format!("{reference}@{digest}")
        })
    }

    /// The uploaded module's digest, for members that run one.
    pub fn module_digest(&self) -> Option<&str> {
        match &self.source {
            MemberSource::Module { digest, .. } => Some(digest),
            _ => None,
        }
    }

    /// The container settings of a container member.
    pub fn container_options(&self) -> Option<&ContainerOptions> {
        match &self.source {
            MemberSource::Container { options, .. } => Some(options),
            _ => None,
        }
    }

    /// The runtime a node needs for this member: `wasm` or `runc`.
    pub fn runtime(&self) -> &'static str {
        if self.is_container() {
            RUNTIME_RUNC
        } else {
            RUNTIME_WASM
        }
    }
}

/// Runtime names nodes report and pods need.
pub const RUNTIME_WASM: &str = "wasm";
pub const RUNTIME_RUNC: &str = "runc";

/// How a container member runs, beyond what its image config says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerOptions {
    /// Replaces the image's entrypoint (`args` replace its cmd).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Working directory (default: the image's, else `/`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workdir: String,
    /// `UID[:GID]` or a user name from the image's /etc/passwd.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Mount the root filesystem read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Capabilities added to the default set (e.g. `NET_RAW`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL when stopping (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<u32>,
}

impl ContainerOptions {
    pub fn is_default(&self) -> bool {
        *self == ContainerOptions::default()
    }
}

/// Linux capabilities by name (without `CAP_`), in bit order.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Capabilities any role that may write pods may add to a container
/// (Docker's default set): none reaches past the container. The others —
/// SYS_ADMIN, NET_ADMIN, SYS_TIME, SYS_PTRACE, … — only the admin role may
/// grant.
pub const SAFE_CAPABILITIES: [&str; 14] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The first capability a pod's containers add that is not in
/// [`SAFE_CAPABILITIES`], with its member.
pub fn privileged_capability(spec: &PodSpec) -> Option<(&str, String)> {
    spec.members.iter().find_map(|m| {
        m.container_options()?
            .capabilities
            .iter()
            .map(|c| normalize_capability(c))
            .find(|c| !SAFE_CAPABILITIES.contains(&c.as_str()))
            .map(|c| (m.name.as_str(), c))
    })
}

/// `net_raw`, `CAP_NET_RAW` → `NET_RAW`.
pub fn normalize_capability(name: &str) -> String {
    let up = name.trim().to_ascii_uppercase();
    up.strip_prefix("CAP_").unwrap_or(&up).to_string()
}

/// Checks that `name` is a Linux capability.
pub fn check_capability(name: &str) -> Result<(), String> {
    let n = normalize_capability(name);
    if CAPABILITIES.contains(&n.as_str()) {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a Linux capability (e.g. NET_RAW, NET_BIND_SERVICE, SYS_TIME)"
        ))
    }
}

/// The desired state of a pod. Immutable once created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub members: Vec<MemberSpec>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub node_selector: Labels,
    /// What the node does with the pod when it loses the scheduler for
    /// longer than its lease.
    #[serde(default, skip_serializing_if = "OnDisconnect::is_keep")]
    pub on_disconnect: OnDisconnect,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::config::Volume>,
    /// Whether members get `NAME_SERVICE_HOST`/`_PORT` variables for the
    /// services of their namespace (as Kubernetes does; on by default).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub service_links: bool,
    /// Whether the pod's containers run in a user namespace of their own,
    /// their root mapped to an unprivileged range of host IDs (`None`: the
    /// node's default, `--user-namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_namespace: Option<bool>,
}

impl Default for PodSpec {
    fn default() -> PodSpec {
        PodSpec {
            members: Vec::new(),
            node_selector: Labels::new(),
            on_disconnect: OnDisconnect::Keep,
            volumes: Vec::new(),
            service_links: true,
            user_namespace: None,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl PodSpec {
    /// Whether the pod gets a network namespace and an address: it declares
    /// ports or has container members. Socket-free wasm pods get neither.
    pub fn needs_network(&self) -> bool {
        self.members.iter().any(|m| {
            m.is_container()
                || !m.ports.is_empty()
                || m.probes().any(|(_, p)| p.http.is_some() || p.tcp.is_some())
        })
    }

    /// The runtimes a node needs to run every member.
    pub fn runtimes(&self) -> Vec<&'static str> {
        let mut r: Vec<&'static str> = self.members.iter().map(|m| m.runtime()).collect();
        r.sort_unstable();
        r.dedup();
        r
    }
}

/// A pod's side of the availability/fencing trade-off when its node is cut
/// off from the scheduler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnDisconnect {
    /// Keep running (edge autonomy). If the scheduler did move the pod, the
    /// old copy stops when the node reconnects and resyncs.
    #[default]
    Keep,
    /// Stop when the node's lease runs out, before the scheduler may start a
    /// replacement: two copies never overlap. The pod runs again only once
    /// the node holds a lease (registered) and the pod is still its.
    Stop,
}

impl OnDisconnect {
    pub fn is_keep(&self) -> bool {
        *self == OnDisconnect::Keep
    }
}

impl PodSpec {
    /// Total requested CPU in millicores.
    pub fn cpu(&self) -> u64 {
        self.members.iter().map(|m| m.resources.cpu as u64).sum()
    }

    /// The node's pod slots this pod takes: one per wasm member (each is an
    /// instance of the node's pool), at least one.
    pub fn slots(&self) -> u64 {
        (self.members.iter().filter(|m| !m.is_container()).count() as u64).max(1)
    }

    /// Total requested memory in bytes.
    pub fn memory(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.resources.memory.map_or(0, |b| b.0))
            .sum()
    }
}

/// Where a pod is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodPhase {
    /// Not yet placed on a node.
    #[default]
    Pending,
    /// Placed; the agent has not reported it running yet.
    Scheduled,
    Running,
    /// Every member exited 0 and none will restart.
    Succeeded,
    /// A member failed and will not restart, or the pod could not start.
    Failed,
    /// Its node stopped responding; the pod is not run again here or elsewhere
    /// (a Deployment replaces it). If the node comes back, it stops the pod.
    Lost,
}

impl PodPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PodPhase::Succeeded | PodPhase::Failed | PodPhase::Lost
        )
    }
}

impl fmt::Display for PodPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a member's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TerminationReason {
    /// Exited with code 0.
    Completed,
    /// Exited with a non-zero code.
    Error,
    /// Trapped (unreachable, out-of-bounds access, stack overflow …).
    Trap,
    /// Tried to grow memory past its limit.
    OOMKilled,
    /// Used up its CPU time budget.
    Timeout,
    /// Stopped because the pod was deleted or is shutting down.
    Stopped,
    /// Could not be started (bad module, missing imports …).
    StartError,
    /// Stopped by its node for using more than the pod may (an
    /// `empty_dir` past its `size_limit`).
    Evicted,
    /// Stopped because its liveness (or startup) probe failed.
    Unhealthy,
}

impl fmt::Display for TerminationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The end of one run of a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termination {
    pub exit_code: i32,
    pub reason: TerminationReason,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub finished_ms: u64,
}

/// What a member is doing now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    Waiting { reason: String },
    Running { since_ms: u64 },
    Terminated(Termination),
}

/// Observed state of one member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub state: MemberState,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_termination: Option<Termination>,
    /// What its readiness probe last concluded (`None`: it has none, and is
    /// ready while running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

/// Observed state of a pod, written only by the scheduler's controllers and agents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub phase: PodPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Epoch of the node when the pod was assigned to it.
    #[serde(default)]
    pub node_epoch: u64,
    /// One-word reason for the phase (`Unschedulable`, `CrashLoopBackOff`, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    #[serde(default)]
    pub started_ms: u64,
    /// The pod's address in its node's pod CIDR (pods with a network only),
    /// given at binding and kept for as long as the pod exists.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_ip: String,
}

impl PodStatus {
    pub fn restarts(&self) -> u32 {
        self.members.iter().map(|m| m.restarts).sum()
    }

    /// This status with an agent's report applied: the fields the agent
    /// owns (phase, reason, message, members, start time) come from the
    /// report; the scheduler's own (node, epoch, pod address) are kept. The
    /// one place a report meets a stored status.
    pub fn with_report(&self, r: &AgentReport) -> PodStatus {
        PodStatus {
            phase: r.phase,
            reason: r.reason.clone(),
            message: r.message.clone(),
            members: r.members.clone(),
            started_ms: r.started_ms,
            node: self.node.clone(),
            node_epoch: self.node_epoch,
            pod_ip: self.pod_ip.clone(),
        }
    }
}

/// What an agent says about one of its pods: only what the agent observes.
/// It has no field for anything the scheduler owns (node, epoch, pod
/// address), so no report, however late or hostile, can change those.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub phase: PodPhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    #[serde(default)]
    pub started_ms: u64,
}

impl AgentReport {
    /// The agent-owned part of a status the agent keeps.
    pub fn of(status: &PodStatus) -> AgentReport {
        AgentReport {
            phase: status.phase,
            reason: status.reason.clone(),
            message: status.message.clone(),
            members: status.members.clone(),
            started_ms: status.started_ms,
        }
    }
}

/// A group of wasm members that are placed, started and stopped together.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

/// The pod a Deployment stamps out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodTemplate {
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    pub spec: PodSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub replicas: u32,
    pub template: PodTemplate,
    #[serde(default)]
    pub strategy: crate::rollout::Strategy,
    /// A rollout without progress for this long halts (default 10 minutes).
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline: crate::probe::Millis,
    /// Set by `rollout pause`, cleared by `rollout resume`; a manifest does
    /// not set it (an apply keeps what is stored).
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,
    /// When `rollout restart` last asked for every pod to be replaced (ms
    /// since the epoch): part of what makes a revision, kept by an apply.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarted_ms: u64,
}

impl Default for DeploymentSpec {
    fn default() -> Self {
        DeploymentSpec {
            replicas: 0,
            template: PodTemplate::default(),
            strategy: Default::default(),
            progress_deadline: default_progress_deadline(),
            paused: false,
            restarted_ms: 0,
        }
    }
}

fn default_progress_deadline() -> crate::probe::Millis {
    crate::rollout::DEFAULT_PROGRESS_DEADLINE
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    /// Pods that exist and are not finished.
    pub replicas: u32,
    /// Pods that are ready (Running, every member passing its readiness probe).
    pub ready: u32,
    pub observed_generation: u64,
    /// Pods of the current revision.
    #[serde(default)]
    pub updated: u32,
    /// Pods of the current revision that are ready.
    #[serde(default)]
    pub updated_ready: u32,
    /// The current revision's number (0 before the first pass).
    #[serde(default)]
    pub revision: u64,
    /// The revisions kept, oldest first; the last is the current one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<crate::rollout::Revision>,
    #[serde(default)]
    pub rollout: crate::rollout::RolloutState,
}

/// Keeps `replicas` copies of a pod template running.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub metadata: ObjectMeta,
    pub spec: DeploymentSpec,
    #[serde(default)]
    pub status: DeploymentStatus,
}

/// Resources a node offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Millicores.
    pub cpu: u64,
    /// Bytes.
    pub memory: u64,
    /// Pod slots: wasm member instances, of which a pod takes one per wasm
    /// member and at least one ([`PodSpec::slots`]). A node offers as many
    /// as its instance pool holds (`--max-instances`); 0: not limited (a
    /// node that does not say).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pods: u64,
}

pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub ready: bool,
    pub allocatable: Capacity,
    pub arch: String,
    pub version: String,
    #[serde(default)]
    pub runtimes: Vec<String>,
    pub last_heartbeat_ms: u64,
    /// Bumped every time the node (re)registers; assignments carry it (fencing).
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// The node's block of pod addresses, assigned by the scheduler at its
    /// first registration and kept while the Node exists.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_cidr: String,
    /// How the node networks pods (`bridge`, `loopback`, `host`); pods get
    /// addresses only on `bridge` nodes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_network: String,
    /// Set while the node's link keeps dropping (`flapping: …`, with the
    /// count and the last reason): a node can answer heartbeats between
    /// drops and still receive no work.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link: String,
    /// Addresses of pods deleted from this node that the node has not yet
    /// confirmed gone: none is handed out again until then (or until the
    /// quarantine runs out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releasing: Vec<ReleasingAddress>,
}

/// A pod address held after its pod left the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasingAddress {
    pub ip: String,
    /// `namespace/name` of the pod that held it.
    pub pod: String,
    pub uid: String,
    pub since_ms: u64,
}

/// A host agent as the scheduler sees it. The labels are the node's labels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub unschedulable: bool,
    #[serde(default)]
    pub status: NodeStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

/// Something that happened to an object, for people reading `describe` and `events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(rename = "type")]
    pub type_: EventType,
    pub reason: String,
    pub message: String,
    pub count: u32,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// Named secret values for pods. Readers with the `view` role see the keys only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: Labels,
    /// Values that are not UTF-8 text, base64-encoded.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub binary_data: Labels,
}

/// What an API credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read and change workloads (pods, deployments, secrets) in its namespaces.
    Edit,
    /// Read-only; secret values stay hidden.
    View,
    /// Not an API role: a join token, which admits nodes and nothing else.
    Join,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "edit" => Some(Role::Edit),
            "view" => Some(Role::View),
            "join" => Some(Role::Join),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Edit => "edit",
            Role::View => "view",
            Role::Join => "join",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bearer token for the API. The name is the token's public id; only a hash
/// of its secret part is stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub metadata: ObjectMeta,
    pub role: Option<Role>,
    /// Namespaces the token is limited to; empty means all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub expires_ms: u64,
    /// Hex SHA-256 of the secret part; never sent to clients.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_sha256: String,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub created_by: String,
    /// Joins a join token still admits (`None`: any number until it expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// Set on the record of a user's client certificate (its name is the
    /// certificate's serial number in hex): the user it was issued to. Such
    /// a record is no bearer token; revoking it revokes the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_for: Option<String>,
}

/// A stable address for the ready pods a selector picks: a virtual IP and
/// a name, balanced by every node's proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
    #[serde(default)]
    pub status: ServiceStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Pods with all these labels (in the service's namespace) back it.
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
    /// HTTP routes every node's function gateway sends to the service's
    /// first port (a Function's Service carries the Function's routes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::function::Route>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The port on the service's virtual IP.
    pub port: u16,
    /// The pods' port (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Also served on every node's own address at this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// Written by the scheduler.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The virtual IP, from the service CIDR (kept for the service's life).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_ip: String,
    /// Ready pods behind it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
}

/// One ready pod behind a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: String,
    pub pod: String,
    pub node: String,
}

impl Pod {
    /// Running with every member running: it may take traffic.
    pub fn is_ready(&self) -> bool {
        self.status.phase == PodPhase::Running
            && !self.status.members.is_empty()
            && self
                .status
                .members
                .iter()
                .all(|m| matches!(m.state, MemberState::Running { .. }) && m.ready != Some(false))
    }
}
