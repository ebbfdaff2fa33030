//! TOML manifests: parsing with positions, strict fields, and checks that help.
//!
//! A file holds one or more resources separated by lines consisting of `---`.
//! Each resource is a plain TOML document with `kind` and `name` at the top.
//! Every error names the file, line and column, and says what to do.

use crate::meta::{DEFAULT_NAMESPACE, Labels, ObjectMeta, check_dns_label, check_label};
use crate::object::{
    Deployment, DeploymentSpec, MemberSpec, Object, OnDisconnect, Pod, PodSpec, PodTemplate, Port,
    Protocol, Resources, RestartPolicy,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Largest module file accepted (bytes).
pub const MAX_MODULE_BYTES: u64 = 256 << 20;
/// Largest replica count accepted for one Deployment.
pub const MAX_REPLICAS: u32 = 100_000;

/// One problem in a manifest, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )?;
        if let Some(h) = &self.hint {
            write!(f, " — {h}")?;
        }
        Ok(())
    }
}

/// All problems found in one file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn port_number(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("port {n} is out of range (1-65535)")),
    }
}

/// A port as manifests write it: a number, `"PORT/PROTOCOL"` (both made into
/// `T` by `short`) or a table of `T`'s fields, whose port numbers
/// (`numbers`) are range-checked.
fn port_value<T: serde::de::DeserializeOwned>(
    v: toml::Value,
    short: impl FnOnce(Port) -> T,
    numbers: impl Fn(&T) -> Vec<u16>,
) -> Result<T, String> {
    match v {
        toml::Value::Integer(n) => port_number(n).map(|port| {
            short(Port {
                port,
                protocol: Protocol::Tcp,
                name: String::new(),
            })
        }),
        toml::Value::String(s) => parse_port(&s).map(short),
        v @ toml::Value::Table(_) => T::deserialize(v)
            .map_err(|e| format!("bad port: {}", e.message().trim()))
            .and_then(|p| {
                for n in numbers(&p) {
                    port_number(i64::from(n))?;
                }
                Ok(p)
            }),
        other => Err(format!(
            "a port is a number, \"PORT/PROTOCOL\" or a table, not a {}",
            other.type_str()
        )),
    }
}

/// `8080`, `8080/tcp` or `53/udp`.
fn parse_port(s: &str) -> Result<Port, String> {
    let (num, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let port = num
        .parse::<i64>()
        .map_err(|_| format!("'{s}' is not a port"))
        .and_then(port_number)?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return Err(format!("unknown protocol '{proto}' (tcp or udp)")),
    };
    Ok(Port {
        port,
        protocol,
        name: String::new(),
    })
}

/// Where a manifest came from: its name for messages and the directory that
/// relative module paths are resolved against.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
    pub base_dir: &'a Path,
}

const WASI_HINT: &str =
    "e.g. wasi = { config = [\"app-config\"], keyvalue = [\"counters\"], logging = true }";

#[derive(Deserialize)]
struct KindOnly {
    kind: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberDoc {
    name: Option<Spanned<String>>,
    wasm: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    workdir: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    read_only: Option<Spanned<bool>>,
    capabilities: Option<Spanned<Vec<String>>>,
    grace_period: Option<Spanned<u32>>,
    /// `[8080, "53/udp", { port = 9090, protocol = "tcp", name = "metrics" }]`
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    #[serde(default)]
    args: Vec<String>,
    /// `{ K = "v", S = { secret = "db", key = "password" }, P = { field = "pod.name" } }`
    env: Option<Spanned<std::collections::BTreeMap<String, Spanned<toml::Value>>>>,
    env_from: Option<Spanned<Vec<crate::config::EnvFrom>>>,
    mounts: Option<Spanned<Vec<crate::config::Mount>>>,
    #[serde(default)]
    resources: Resources,
    restart: Option<RestartPolicy>,
    /// `{ http = { port = 8080, path = "/healthz" }, period = 1 }` (see
    /// [`crate::probe`]).
    liveness: Option<Spanned<crate::probe::Probe>>,
    readiness: Option<Spanned<crate::probe::Probe>>,
    startup: Option<Spanned<crate::probe::Probe>>,
    /// `{ exec = [..] }` or `{ http = { port = 8080, path = "/drain" } }`.
    pre_stop: Option<Spanned<crate::probe::Hook>>,
    /// `{ config = ["app"], keyvalue = ["counters"], logging = true }`
    wasi: Option<Spanned<crate::interfaces::HostInterfaces>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeDoc {
    name: Spanned<String>,
    empty_dir: Option<crate::config::EmptyDir>,
    /// `"app"` or `{ name = "app", items = [...], mode = 0o640, optional = true }`
    config: Option<Spanned<toml::Value>>,
    secret: Option<Spanned<toml::Value>>,
    /// `"/srv/data"` or `{ path = "/srv/data", writable = true }`
    host_path: Option<Spanned<toml::Value>>,
    /// The name of a `Volume`.
    persistent: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    wasm: Option<Spanned<String>>,
    hook: Option<Spanned<crate::plugin::Hook>>,
    selector: Option<Spanned<PluginSelectorDoc>>,
    failure_policy: Option<crate::plugin::FailurePolicy>,
    memory: Option<crate::quantity::Bytes>,
    timeout: Option<crate::probe::Millis>,
    fuel: Option<u64>,
    config: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginSelectorDoc {
    kinds: Option<Vec<Spanned<String>>>,
    namespaces: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    completions: Option<u32>,
    parallelism: Option<u32>,
    backoff_limit: Option<u32>,
    active_deadline: Option<crate::probe::Millis>,
    ttl_after_finished: Option<crate::probe::Millis>,
    after: Option<Vec<String>>,
    schedule: Option<Spanned<String>>,
    concurrency: Option<crate::job::Concurrency>,
    template: TemplateDoc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoscalerDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    target: String,
    min: u32,
    max: u32,
    cpu: Option<u32>,
    memory: Option<crate::quantity::Bytes>,
    metric: Option<crate::autoscale::MetricTarget>,
    scale_up_window: Option<crate::probe::Millis>,
    scale_down_window: Option<crate::probe::Millis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    wasm: Option<Spanned<String>>,
    routes: Option<Spanned<Vec<crate::function::Route>>>,
    env: Option<Spanned<std::collections::BTreeMap<String, Spanned<toml::Value>>>>,
    env_from: Option<Spanned<Vec<crate::config::EnvFrom>>>,
    memory: Option<crate::quantity::Bytes>,
    timeout: Option<crate::probe::Millis>,
    max_concurrency: Option<u32>,
    allow_hosts: Option<Vec<String>>,
    reuse_instances: Option<bool>,
    min_instances: Option<u32>,
    max_instances: Option<u32>,
    scale_to_zero_after: Option<crate::probe::Millis>,
    node_selector: Option<Spanned<Labels>>,
    port: Option<u16>,
    /// `{ wasm = "./v2.wasm", weight = 10, env = { … } }`
    canary: Option<Spanned<CanaryDoc>>,
    /// `{ config = ["app"], keyvalue = ["counters"], logging = true }`
    wasi: Option<Spanned<crate::interfaces::HostInterfaces>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CanaryDoc {
    wasm: Spanned<String>,
    weight: u32,
    env: Option<Spanned<std::collections::BTreeMap<String, Spanned<toml::Value>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    pods: Option<u64>,
    cpu: Option<u64>,
    memory: Option<crate::quantity::Bytes>,
    objects: Option<u64>,
    default_memory: Option<crate::quantity::Bytes>,
    default_cpu: Option<u32>,
    bucket_keys: Option<u64>,
    bucket_bytes: Option<crate::quantity::Bytes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeObjectDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    capacity: Spanned<crate::quantity::Bytes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    node_selector: Option<Spanned<Labels>>,
    restart: Option<RestartPolicy>,
    on_disconnect: Option<OnDisconnect>,
    volumes: Option<Spanned<Vec<Spanned<VolumeDoc>>>>,
    service_links: Option<bool>,
    user_namespace: Option<bool>,
    members: Spanned<Vec<Spanned<MemberDoc>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    data: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    binary_data: Option<Spanned<std::collections::BTreeMap<String, String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    selector: Option<Spanned<Labels>>,
    /// `[80, "53/udp", { port = 80, target_port = 8080, node_port = 30080 }]`
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateDoc {
    labels: Option<Spanned<Labels>>,
    node_selector: Option<Spanned<Labels>>,
    restart: Option<RestartPolicy>,
    on_disconnect: Option<OnDisconnect>,
    volumes: Option<Spanned<Vec<Spanned<VolumeDoc>>>>,
    service_links: Option<bool>,
    user_namespace: Option<bool>,
    members: Spanned<Vec<Spanned<MemberDoc>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentDoc {
    #[allow(dead_code)]
    kind: String,
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    labels: Option<Spanned<Labels>>,
    replicas: Spanned<u32>,
    strategy: Option<Spanned<crate::rollout::Strategy>>,
    progress_deadline: Option<Spanned<crate::probe::Millis>>,
    template: TemplateDoc,
}

/// A manifest file's resources and the local module files they name.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    /// Module files named by path (`wasm = "./app.wasm"`): digest → file.
    /// The members carry only the digest and size; the client uploads these
    /// (`PUT /v1/blobs/DIGEST`) before applying.
    pub files: std::collections::BTreeMap<String, PathBuf>,
}

/// Parses and checks every resource in one manifest file.
pub fn parse(src: &Source<'_>) -> Result<Vec<Object>, ManifestErrors> {
    parse_with_files(src).map(|p| p.objects)
}

/// [`parse`], also returning the module files to upload.
pub fn parse_with_files(src: &Source<'_>) -> Result<Parsed, ManifestErrors> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut files = std::collections::BTreeMap::new();
    for (offset, doc) in split_documents(src.text) {
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let mut cx = Checker {
            src,
            offset,
            errors: Vec::new(),
            files: std::collections::BTreeMap::new(),
        };
        if let Some(obj) = cx.document(doc) {
            out.push(obj);
        }
        errors.extend(cx.errors);
        files.extend(cx.files);
    }
    if !errors.is_empty() {
        return Err(ManifestErrors(errors));
    }
    if out.is_empty() {
        return Err(ManifestErrors(vec![ManifestError {
            file: src.name.to_string(),
            line: 1,
            col: 1,
            message: "no resources in this file".into(),
            hint: Some("a resource starts with kind = \"Pod\" or kind = \"Deployment\"".into()),
        }]));
    }
    Ok(Parsed {
        objects: out,
        files,
    })
}

/// Splits on lines that are exactly `---`, returning each document with its byte offset.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push((start, &text[start..pos]));
            start = pos + line.len();
        }
        pos += line.len();
    }
    docs.push((start, &text[start..]));
    docs
}

struct Checker<'a, 's> {
    src: &'a Source<'s>,
    offset: usize,
    errors: Vec<ManifestError>,
    /// Module files named by path: digest → the file (for the CLI to upload).
    files: std::collections::BTreeMap<String, PathBuf>,
}

impl Checker<'_, '_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) {
        let (line, col) = line_col(self.src.text, self.offset + span.start);
        self.errors.push(ManifestError {
            file: self.src.name.to_string(),
            line,
            col,
            message: message.into(),
            hint,
        });
    }

    fn toml_error(&mut self, e: toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim().to_string();
        let hint = hint_for(&message);
        self.error(span, message, hint);
    }

    fn document(&mut self, doc: &str) -> Option<Object> {
        let kind = match toml::from_str::<KindOnly>(doc) {
            Ok(k) => k.kind,
            Err(e) => {
                self.toml_error(e);
                return None;
            }
        };
        let Some(kind) = kind else {
            self.error(
                0..0,
                "this resource has no 'kind'",
                Some("add kind = \"Pod\" or kind = \"Deployment\" at the top".into()),
            );
            return None;
        };
        match kind.get_ref().as_str() {
            "Pod" => match toml::from_str::<PodDoc>(doc) {
                Ok(d) => self.pod(d).map(Object::Pod),
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Deployment" => match toml::from_str::<DeploymentDoc>(doc) {
                Ok(d) => self.deployment(d).map(Object::Deployment),
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Secret" | "ConfigMap" => match toml::from_str::<SecretDoc>(doc) {
                Ok(d) => {
                    let metadata = self.meta(&d.name, &d.namespace, &d.labels);
                    let span =
                        |v: &Option<Spanned<_>>| v.as_ref().map_or(d.name.span(), Spanned::span);
                    let (data_at, binary_at) = (span(&d.data), span(&d.binary_data));
                    let data = d.data.map(Spanned::into_inner).unwrap_or_default();
                    let binary_data = d.binary_data.map(Spanned::into_inner).unwrap_or_default();
                    if let Err(why) = crate::config::check_data(&data, &binary_data) {
                        let at = if why.contains("binary_data") {
                            binary_at
                        } else {
                            data_at
                        };
                        self.error(at, why, None);
                    }
                    self.errors.is_empty().then(|| {
                        if kind.get_ref() == "Secret" {
                            Object::Secret(crate::Secret {
                                metadata,
                                data,
                                binary_data,
                            })
                        } else {
                            Object::ConfigMap(crate::config::ConfigMap {
                                metadata,
                                data,
                                binary_data,
                            })
                        }
                    })
                }
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Volume" => match toml::from_str::<VolumeObjectDoc>(doc) {
                Ok(d) => {
                    let metadata = self.meta(&d.name, &d.namespace, &d.labels);
                    if d.capacity.get_ref().0 == 0 {
                        self.error(
                            d.capacity.span(),
                            "capacity must be more than 0",
                            Some("e.g. capacity = \"1Gi\"".into()),
                        );
                    }
                    self.errors.is_empty().then(|| {
                        Object::Volume(crate::config::PersistentVolume {
                            metadata,
                            spec: crate::config::PersistentVolumeSpec {
                                capacity: d.capacity.into_inner(),
                            },
                            status: Default::default(),
                        })
                    })
                }
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Quota" => match toml::from_str::<QuotaDoc>(doc) {
                Ok(d) => {
                    let metadata = self.meta(&d.name, &d.namespace, &d.labels);
                    self.errors.is_empty().then_some({
                        Object::Quota(crate::quota::Quota {
                            metadata,
                            spec: crate::quota::QuotaSpec {
                                pods: d.pods,
                                cpu: d.cpu,
                                memory: d.memory,
                                objects: d.objects,
                                default_memory: d.default_memory,
                                default_cpu: d.default_cpu,
                                bucket_keys: d.bucket_keys,
                                bucket_bytes: d.bucket_bytes,
                            },
                        })
                    })
                }
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Plugin" => match toml::from_str::<PluginDoc>(doc) {
                Ok(d) => self.plugin(d, kind.span()).map(Object::Plugin),
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Job" => match toml::from_str::<JobDoc>(doc) {
                Ok(d) => self.job(d).map(Object::Job),
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Autoscaler" => match toml::from_str::<AutoscalerDoc>(doc) {
                Ok(d) => {
                    let metadata = self.meta(&d.name, &d.namespace, &d.labels);
                    let defaults: crate::autoscale::AutoscalerSpec =
                        toml::from_str("target = \"\"\nmin = 1\nmax = 1").expect("defaults");
                    let spec = crate::autoscale::AutoscalerSpec {
                        target: d.target,
                        min: d.min,
                        max: d.max,
                        cpu: d.cpu,
                        memory: d.memory,
                        metric: d.metric,
                        scale_up_window: d.scale_up_window.unwrap_or(defaults.scale_up_window),
                        scale_down_window: d
                            .scale_down_window
                            .unwrap_or(defaults.scale_down_window),
                    };
                    if let Err(why) = spec.validate() {
                        self.error(
                            d.name.span(),
                            format!("autoscaler {}: {why}", d.name.get_ref()),
                            Some("e.g. target = \"web\", min = 1, max = 10, cpu = 60".into()),
                        );
                    }
                    self.errors.is_empty().then_some({
                        Object::Autoscaler(crate::autoscale::Autoscaler {
                            metadata,
                            spec,
                            status: Default::default(),
                        })
                    })
                }
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Function" => match toml::from_str::<FunctionDoc>(doc) {
                Ok(d) => self.function(d, kind.span()).map(Object::Function),
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            "Service" => match toml::from_str::<ServiceDoc>(doc) {
                Ok(d) => self.service(d, kind.span()).map(Object::Service),
                Err(e) => {
                    self.toml_error(e);
                    None
                }
            },
            other => {
                let hint = suggest(
                    other,
                    &[
                        "Pod",
                        "Deployment",
                        "Secret",
                        "ConfigMap",
                        "Service",
                        "Volume",
                        "Quota",
                        "Autoscaler",
                        "Job",
                        "Function",
                        "Plugin",
                    ],
                )
                .map(|s| format!("did you mean '{s}'?"))
                .or_else(|| {
                    Some(
                        "the kinds are Pod, Deployment, Job, Function, Secret, ConfigMap, Service, Volume, Quota, Autoscaler and Plugin"
                            .into(),
                    )
                });
                self.error(kind.span(), format!("unknown kind '{other}'"), hint);
                None
            }
        }
    }

    fn meta(
        &mut self,
        name: &Spanned<String>,
        namespace: &Option<Spanned<String>>,
        labels: &Option<Spanned<Labels>>,
    ) -> ObjectMeta {
        if let Err(why) = check_dns_label(name.get_ref()) {
            self.error(
                name.span(),
                format!("name '{}' {why}", name.get_ref()),
                None,
            );
        }
        if let Some(ns) = namespace
            && let Err(why) = check_dns_label(ns.get_ref())
        {
            self.error(
                ns.span(),
                format!("namespace '{}' {why}", ns.get_ref()),
                None,
            );
        }
        let labels = self.labels(labels);
        ObjectMeta {
            name: name.get_ref().clone(),
            namespace: namespace
                .as_ref()
                .map_or(DEFAULT_NAMESPACE.to_string(), |n| n.get_ref().clone()),
            labels,
            ..ObjectMeta::default()
        }
    }

    fn labels(&mut self, labels: &Option<Spanned<Labels>>) -> Labels {
        let Some(labels) = labels else {
            return Labels::new();
        };
        for (k, v) in labels.get_ref() {
            if let Err(why) = check_label(k, false) {
                self.error(labels.span(), format!("label key '{k}' {why}"), None);
            }
            if let Err(why) = check_label(v, true) {
                self.error(labels.span(), format!("label value '{v}' {why}"), None);
            }
        }
        labels.get_ref().clone()
    }

    fn pod(&mut self, d: PodDoc) -> Option<Pod> {
        let metadata = self.meta(&d.name, &d.namespace, &d.labels);
        let mut spec = self.pod_spec(d.members, &d.node_selector, d.restart);
        spec.on_disconnect = d.on_disconnect.unwrap_or_default();
        spec.service_links = d.service_links.unwrap_or(true);
        spec.user_namespace = d.user_namespace;
        self.volumes(&mut spec, d.volumes, d.name.span());
        self.errors.is_empty().then_some(Pod {
            metadata,
            spec,
            status: Default::default(),
        })
    }

    fn function(
        &mut self,
        d: FunctionDoc,
        kind_at: std::ops::Range<usize>,
    ) -> Option<crate::function::Function> {
        use crate::function::{FunctionSpec, HttpServe};
        let metadata = self.meta(&d.name, &d.namespace, &d.labels);
        let node_selector = self.labels(&d.node_selector);
        let Some(wasm) = d.wasm else {
            self.error(
                kind_at,
                format!("function {} needs wasm = \"...\"", d.name.get_ref()),
                Some(
                    "wasm = \"./fn.wasm\" (a wasi:http component) or \"oci://HOST/REPO:TAG\""
                        .into(),
                ),
            );
            return None;
        };
        if d.name.get_ref().len() > crate::function::MAX_NAME {
            self.error(
                d.name.span(),
                format!(
                    "a function's name is at most {} characters (its canary is NAME-canary)",
                    crate::function::MAX_NAME
                ),
                None,
            );
        }
        let errors_before = self.errors.len();
        let source = self.module(&wasm);
        let canary_at = d.canary.as_ref().map(|c| c.span());
        let canary = d.canary.map(|c| {
            let c = c.into_inner();
            Box::new(crate::function::Canary {
                source: self.module(&c.wasm),
                weight: c.weight,
                env: c.env.map(|e| self.env(e)).unwrap_or_default(),
            })
        });
        let defaults = HttpServe::default();
        let routes_at = d.routes.as_ref().map(|r| r.span());
        let spec = FunctionSpec {
            source,
            routes: d.routes.map(Spanned::into_inner).unwrap_or_default(),
            env: d.env.map(|e| self.env(e)).unwrap_or_default(),
            env_from: d.env_from.map(Spanned::into_inner).unwrap_or_default(),
            memory: d.memory,
            serve: HttpServe {
                timeout: d.timeout.unwrap_or(defaults.timeout),
                max_concurrency: d.max_concurrency.unwrap_or(defaults.max_concurrency),
                allow_hosts: d.allow_hosts.unwrap_or_default(),
                reuse_instances: d.reuse_instances.unwrap_or(false),
            },
            min_instances: d.min_instances.unwrap_or(0),
            max_instances: d.max_instances.unwrap_or(1),
            scale_to_zero_after: d
                .scale_to_zero_after
                .unwrap_or(crate::function::DEFAULT_SCALE_TO_ZERO_AFTER),
            node_selector,
            port: d.port.unwrap_or(crate::function::DEFAULT_PORT),
            canary,
            wasi: match d.wasi {
                Some(w) => {
                    if let Err(why) = w.get_ref().validate() {
                        self.error(w.span(), why, Some(WASI_HINT.into()));
                    }
                    Box::new(w.into_inner())
                }
                None => Default::default(),
            },
        };
        if self.errors.len() == errors_before
            && let Err(why) = spec.validate()
        {
            let at = match (why.starts_with("route"), routes_at, canary_at) {
                (true, Some(r), _) => r,
                (false, _, Some(c)) if why.contains("canary") => c,
                _ => wasm.span(),
            };
            self.error(
                at,
                format!("function {}: {why}", d.name.get_ref()),
                Some("e.g. routes = [{ host = \"shop.example\", path = \"/api\" }], timeout = \"10s\", max_concurrency = 50".into()),
            );
        }
        self.errors.is_empty().then_some(crate::function::Function {
            metadata,
            spec,
            status: Default::default(),
        })
    }

    fn plugin(
        &mut self,
        d: PluginDoc,
        kind_at: std::ops::Range<usize>,
    ) -> Option<crate::plugin::Plugin> {
        use crate::plugin::{Hook, PluginSelector, PluginSpec};
        if let Some(ns) = &d.namespace {
            self.error(
                ns.span(),
                "a plugin is cluster-scoped: it has no namespace",
                Some(
                    "select the namespaces it sees with selector = { namespaces = [\"prod\"] }"
                        .into(),
                ),
            );
        }
        let mut metadata = self.meta(&d.name, &None, &d.labels);
        metadata.namespace.clear();
        let (Some(wasm), Some(hook)) = (d.wasm, d.hook) else {
            self.error(
                kind_at,
                format!("plugin {} needs wasm = \"...\" and hook = \"admission\" or \"scheduler\"", d.name.get_ref()),
                Some("wasm = \"./plugin.wasm\" (a component of a flotilla:plugin world, wit/plugin/plugin.wit) or \"oci://HOST/REPO:TAG\"".into()),
            );
            return None;
        };
        let errors_before = self.errors.len();
        let source = self.module(&wasm);
        let mut selector = PluginSelector::default();
        let selector_at = d.selector.as_ref().map(|s| s.span());
        if let Some(s) = d.selector.map(Spanned::into_inner) {
            for k in s.kinds.unwrap_or_default() {
                match crate::Kind::from_user(k.get_ref()) {
                    Some(kind) => selector.kinds.push(kind),
                    None => self.error(
                        k.span(),
                        format!("unknown kind '{}'", k.get_ref()),
                        Some("e.g. kinds = [\"Pod\", \"Deployment\"]".into()),
                    ),
                }
            }
            selector.namespaces = s.namespaces.unwrap_or_default();
        }
        let mut spec = PluginSpec::new(source, *hook.get_ref());
        spec.selector = selector;
        spec.failure_policy = d.failure_policy.unwrap_or_default();
        spec.memory = d.memory.unwrap_or(spec.memory);
        spec.timeout = d.timeout.unwrap_or(spec.timeout);
        spec.fuel = d.fuel.unwrap_or(spec.fuel);
        spec.config = d.config.unwrap_or_default();
        if self.errors.len() == errors_before
            && let Err(why) = spec.validate()
        {
            let at = match selector_at {
                Some(s) if why.contains("selector") || why.contains("kinds") => s,
                _ if why.contains("places pods") => hook.span(),
                _ => wasm.span(),
            };
            let hint = match spec.hook {
                Hook::Admission => {
                    "e.g. hook = \"admission\", selector = { kinds = [\"Pod\"], namespaces = [\"prod\"] }, failure_policy = \"Fail\", timeout = \"100ms\""
                }
                Hook::Scheduler => {
                    "e.g. hook = \"scheduler\", selector = { namespaces = [\"prod\"] }, failure_policy = \"Ignore\""
                }
            };
            self.error(
                at,
                format!("plugin {}: {why}", d.name.get_ref()),
                Some(hint.into()),
            );
        }
        self.errors
            .is_empty()
            .then_some(crate::plugin::Plugin { metadata, spec })
    }

    fn job(&mut self, d: JobDoc) -> Option<crate::job::Job> {
        let metadata = self.meta(&d.name, &d.namespace, &d.labels);
        let template_labels = self.labels(&d.template.labels);
        // A job's members run once unless the template says otherwise.
        let mut spec = self.pod_spec(
            d.template.members,
            &d.template.node_selector,
            Some(d.template.restart.unwrap_or(RestartPolicy::Never)),
        );
        spec.on_disconnect = d.template.on_disconnect.unwrap_or_default();
        spec.service_links = d.template.service_links.unwrap_or(true);
        spec.user_namespace = d.template.user_namespace;
        self.volumes(&mut spec, d.template.volumes, d.name.span());
        if let Some(s) = &d.schedule
            && let Err(why) = crate::job::Cron::parse(s.get_ref())
        {
            self.error(
                s.span(),
                why,
                Some("e.g. schedule = \"*/5 * * * *\" (every five minutes)".into()),
            );
        }
        let job = crate::job::JobSpec {
            template: PodTemplate {
                labels: template_labels,
                spec,
            },
            completions: d.completions.unwrap_or(1),
            parallelism: d.parallelism.unwrap_or(1),
            backoff_limit: d.backoff_limit.unwrap_or(6),
            active_deadline: d.active_deadline,
            ttl_after_finished: d.ttl_after_finished,
            after: d.after.unwrap_or_default(),
            schedule: d.schedule.map(|s| s.into_inner()),
            concurrency: d.concurrency.unwrap_or_default(),
        };
        if self.errors.is_empty()
            && let Err(why) = job.validate()
        {
            self.error(
                d.name.span(),
                format!("job {}: {why}", d.name.get_ref()),
                None,
            );
        }
        self.errors.is_empty().then_some(crate::job::Job {
            metadata,
            spec: job,
            status: Default::default(),
        })
    }

    fn deployment(&mut self, d: DeploymentDoc) -> Option<Deployment> {
        let metadata = self.meta(&d.name, &d.namespace, &d.labels);
        if *d.replicas.get_ref() > MAX_REPLICAS {
            self.error(
                d.replicas.span(),
                format!(
                    "replicas = {} is more than {MAX_REPLICAS}",
                    d.replicas.get_ref()
                ),
                None,
            );
        }
        let template_labels = self.labels(&d.template.labels);
        let mut spec = self.pod_spec(
            d.template.members,
            &d.template.node_selector,
            d.template.restart,
        );
        spec.on_disconnect = d.template.on_disconnect.unwrap_or_default();
        spec.service_links = d.template.service_links.unwrap_or(true);
        spec.user_namespace = d.template.user_namespace;
        self.volumes(&mut spec, d.template.volumes, d.name.span());
        let strategy = match d.strategy {
            Some(s) => {
                if let Err(why) = s.get_ref().validate() {
                    self.error(
                        s.span(),
                        why,
                        Some("e.g. strategy = { max_surge = \"25%\", max_unavailable = 1 }".into()),
                    );
                }
                s.into_inner()
            }
            None => Default::default(),
        };
        let progress_deadline = match d.progress_deadline {
            Some(p) => {
                if p.get_ref().0 < 1000 {
                    self.error(
                        p.span(),
                        format!("progress_deadline = {} is too short", p.get_ref()),
                        Some("at least 1 s, e.g. progress_deadline = \"5m\"".into()),
                    );
                }
                p.into_inner()
            }
            None => crate::rollout::DEFAULT_PROGRESS_DEADLINE,
        };
        self.errors.is_empty().then_some(Deployment {
            metadata,
            spec: DeploymentSpec {
                replicas: *d.replicas.get_ref(),
                template: PodTemplate {
                    labels: template_labels,
                    spec,
                },
                strategy,
                progress_deadline,
                ..Default::default()
            },
            status: Default::default(),
        })
    }

    fn pod_spec(
        &mut self,
        members: Spanned<Vec<Spanned<MemberDoc>>>,
        node_selector: &Option<Spanned<Labels>>,
        restart: Option<RestartPolicy>,
    ) -> PodSpec {
        let node_selector = self.labels(node_selector);
        let span = members.span();
        let members = members.into_inner();
        if members.is_empty() {
            self.error(
                span,
                "a pod needs at least one member",
                Some("add a [[members]] table with wasm = \"path/to/module.wasm\"".into()),
            );
        }
        let mut seen = BTreeSet::new();
        let mut pod_ports = BTreeSet::new();
        let mut out = Vec::new();
        for m in members {
            let table = m.span();
            let m = m.into_inner();
            let source = match (&m.wasm, &m.image) {
                (Some(w), None) => SourceField::Wasm(w),
                (None, Some(i)) => SourceField::Image(i),
                (Some(_), Some(i)) => {
                    self.error(
                        i.span(),
                        "a member runs either wasm or an image, not both",
                        Some("split it into two members".into()),
                    );
                    continue;
                }
                (None, None) => {
                    self.error(
                        table,
                        "a member needs wasm = \"...\" or image = \"...\"",
                        Some(
                            "wasm = \"path/to/module.wasm\" (or \"oci://HOST/REPO:TAG\") runs wasm; image = \"HOST/REPO:TAG\" runs a container"
                                .into(),
                        ),
                    );
                    continue;
                }
            };
            let name = match &m.name {
                Some(n) => {
                    if let Err(why) = check_dns_label(n.get_ref()) {
                        self.error(
                            n.span(),
                            format!("member name '{}' {why}", n.get_ref()),
                            None,
                        );
                    }
                    n.get_ref().clone()
                }
                None => match source {
                    SourceField::Wasm(w) => default_member_name(w.get_ref()),
                    SourceField::Image(i) => default_member_name(image_repo(i.get_ref())),
                },
            };
            if !seen.insert(name.clone()) {
                let span = m.name.as_ref().map_or(table, |n| n.span());
                self.error(
                    span,
                    format!("two members are named '{name}'"),
                    Some("give each member a distinct name = \"...\"".into()),
                );
            }
            let ports = m
                .ports
                .map(|p| self.ports(p, &mut pod_ports))
                .unwrap_or_default();
            let mut spec = MemberSpec {
                ports,
                name,
                args: m.args,
                env: m.env.map(|e| self.env(e)).unwrap_or_default(),
                env_from: m.env_from.map(|v| v.into_inner()).unwrap_or_default(),
                mounts: m.mounts.map(|v| v.into_inner()).unwrap_or_default(),
                resources: m.resources,
                restart: m.restart.or(restart).unwrap_or_default(),
                ..MemberSpec::default()
            };
            let field_span = match source {
                SourceField::Wasm(w) | SourceField::Image(w) => w.span(),
            };
            let errors_before = self.errors.len();
            let container = matches!(source, SourceField::Image(_));
            for (kind, probe, slot) in [
                (crate::probe::Kind::Liveness, m.liveness, &mut spec.liveness),
                (
                    crate::probe::Kind::Readiness,
                    m.readiness,
                    &mut spec.readiness,
                ),
                (crate::probe::Kind::Startup, m.startup, &mut spec.startup),
            ] {
                let Some(p) = probe else { continue };
                if let Err(why) = p.get_ref().validate(kind, container) {
                    self.error(
                        p.span(),
                        why,
                        Some("e.g. { http = { port = 8080, path = \"/healthz\" }, period = 1 } or { tcp = { port = 8080 } }".into()),
                    );
                }
                *slot = Some(p.into_inner());
            }
            if let Some(h) = m.pre_stop {
                if let Err(why) = h.get_ref().validate(container) {
                    self.error(
                        h.span(),
                        why,
                        Some("e.g. pre_stop = { exec = [\"sh\", \"-c\", \"nginx -s quit\"] } or { http = { port = 8080, path = \"/drain\" } }".into()),
                    );
                }
                spec.pre_stop = Some(h.into_inner());
            }
            if let Some(w) = m.wasi {
                if container {
                    self.error(
                        w.span(),
                        "wasi host interfaces are for wasm members",
                        Some("a container reads its configuration from env or mounts".into()),
                    );
                } else if let Err(why) = w.get_ref().validate() {
                    self.error(w.span(), why, Some(WASI_HINT.into()));
                }
                spec.wasi = w.into_inner();
            }
            match source {
                SourceField::Wasm(w) => {
                    spec.source = self.module(w);
                    let container_only = [
                        m.command.as_ref().map(|v| ("command", v.span())),
                        m.workdir.as_ref().map(|v| ("workdir", v.span())),
                        m.user.as_ref().map(|v| ("user", v.span())),
                        m.read_only.as_ref().map(|v| ("read_only", v.span())),
                        m.capabilities.as_ref().map(|v| ("capabilities", v.span())),
                        m.grace_period.as_ref().map(|v| ("grace_period", v.span())),
                    ];
                    for (field, span) in container_only.into_iter().flatten() {
                        self.error(
                            span,
                            format!("'{field}' applies to container members only"),
                            Some("remove it, or run an image = \"...\" instead".into()),
                        );
                    }
                }
                SourceField::Image(i) => {
                    if let Err(why) = check_image_ref(i.get_ref()) {
                        self.error(
                            i.span(),
                            format!("'{}' {why}", i.get_ref()),
                            Some("write HOST[:PORT]/REPO[:TAG][@sha256:DIGEST], e.g. 127.0.0.1:5000/tools/busybox:1".into()),
                        );
                    }
                    if let Some(caps) = &m.capabilities {
                        for c in caps.get_ref() {
                            if let Err(why) = crate::object::check_capability(c) {
                                self.error(caps.span(), why, None);
                            }
                        }
                    }
                    let options = crate::object::ContainerOptions {
                        command: m.command.map(|v| v.into_inner()).unwrap_or_default(),
                        workdir: m.workdir.map(|v| v.into_inner()).unwrap_or_default(),
                        user: m.user.map(|v| v.into_inner()).unwrap_or_default(),
                        read_only: m.read_only.is_some_and(|v| *v.get_ref()),
                        capabilities: m
                            .capabilities
                            .map(|v| v.into_inner())
                            .unwrap_or_default()
                            .iter()
                            .map(|c| crate::object::normalize_capability(c))
                            .collect(),
                        grace_period: m.grace_period.map(|v| v.into_inner()),
                    };
                    spec.source = crate::object::MemberSource::Container {
                        image: i.get_ref().trim_start_matches("oci://").to_string(),
                        digest: String::new(),
                        options,
                    };
                }
            }
            // The checks the API makes too (one function for both), mapped
            // to the member's source field when nothing above caught it.
            if self.errors.len() == errors_before
                && let Err(why) = crate::object::validate_member(&spec)
            {
                self.error(field_span, why, None);
            }
            out.push(spec);
        }
        PodSpec {
            members: out,
            node_selector,
            ..PodSpec::default()
        }
    }

    /// A member's `env` table: text values as they are, tables as
    /// references.
    fn env(
        &mut self,
        env: Spanned<std::collections::BTreeMap<String, Spanned<toml::Value>>>,
    ) -> std::collections::BTreeMap<String, crate::config::EnvValue> {
        use crate::config::{EnvRef, EnvValue};
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in env.into_inner() {
            let span = v.span();
            match v.into_inner() {
                toml::Value::String(s) => {
                    out.insert(k, EnvValue::Value(s));
                }
                t @ toml::Value::Table(_) => match EnvRef::deserialize(t) {
                    Ok(r) => {
                        if let Err(why) = r.source() {
                            self.error(span, format!("env {k}: {why}"), None);
                        }
                        out.insert(k, EnvValue::From(r));
                    }
                    Err(e) => self.error(
                        span,
                        format!("env {k}: {}", e.message().trim()),
                        Some(
                            "a reference is { secret = \"NAME\", key = \"KEY\" }, { config = \"NAME\", key = \"KEY\" } or { field = \"pod.name\" }"
                                .into(),
                        ),
                    ),
                },
                other => self.error(
                    span,
                    format!("env {k} is a {}, not text", other.type_str()),
                    Some(format!("quote it: {k} = \"{other}\"")),
                ),
            }
        }
        out
    }

    /// The pod's `[[volumes]]`, then the checks of volumes, mounts and
    /// references the API makes too.
    fn volumes(
        &mut self,
        spec: &mut PodSpec,
        volumes: Option<Spanned<Vec<Spanned<VolumeDoc>>>>,
        at: Range<usize>,
    ) {
        use crate::config::{HostPath, ObjectVolume, Volume, VolumeSource};
        let span = volumes.as_ref().map_or(at, |v| v.span());
        for v in volumes.map(|v| v.into_inner()).unwrap_or_default() {
            let table = v.span();
            let v = v.into_inner();
            let object = |me: &mut Self, val: Spanned<toml::Value>| {
                let span = val.span();
                match val.into_inner() {
                    toml::Value::String(name) => Some(ObjectVolume {
                        name,
                        ..ObjectVolume::default()
                    }),
                    t => match ObjectVolume::deserialize(t) {
                        Ok(o) => Some(o),
                        Err(e) => {
                            me.error(span, e.message().trim().to_string(), None);
                            None
                        }
                    },
                }
            };
            let mut sources = Vec::new();
            if let Some(e) = v.empty_dir {
                sources.push(VolumeSource::EmptyDir(e));
            }
            if let Some(c) = v.config
                && let Some(o) = object(self, c)
            {
                sources.push(VolumeSource::Config(o));
            }
            if let Some(c) = v.secret
                && let Some(o) = object(self, c)
            {
                sources.push(VolumeSource::Secret(o));
            }
            if let Some(h) = v.host_path {
                let span = h.span();
                match h.into_inner() {
                    toml::Value::String(path) => sources.push(VolumeSource::HostPath(HostPath {
                        path,
                        writable: false,
                    })),
                    t => match HostPath::deserialize(t) {
                        Ok(h) => sources.push(VolumeSource::HostPath(h)),
                        Err(e) => self.error(span, e.message().trim().to_string(), None),
                    },
                }
            }
            if let Some(name) = v.persistent {
                sources.push(VolumeSource::Persistent(crate::config::PersistentRef {
                    name,
                }));
            }
            if sources.len() != 1 {
                self.error(
                    table,
                    format!(
                        "volume '{}' needs exactly one of empty_dir, config, secret, host_path or persistent",
                        v.name.get_ref()
                    ),
                    Some("e.g. empty_dir = {}, config = \"app\", secret = \"db\" or host_path = \"/srv\"".into()),
                );
                continue;
            }
            spec.volumes.push(Volume {
                name: v.name.into_inner(),
                source: sources.remove(0),
            });
        }
        if self.errors.is_empty()
            && let Err(why) = crate::config::validate_pod(spec)
        {
            self.error(span, why, None);
        }
    }

    fn service(&mut self, d: ServiceDoc, at: Range<usize>) -> Option<crate::Service> {
        let metadata = self.meta(&d.name, &d.namespace, &d.labels);
        let selector = match &d.selector {
            Some(sel) if !sel.get_ref().is_empty() => self.labels(&d.selector),
            other => {
                let span = other.as_ref().map_or(at.clone(), |s| s.span());
                self.error(
                    span,
                    "a service needs a selector naming its pods' labels",
                    Some("write selector = { app = \"web\" }".into()),
                );
                Labels::new()
            }
        };
        const HINT: &str =
            "write ports = [80, { port = 80, target_port = 8080, node_port = 30080 }]";
        let mut ports: Vec<crate::ServicePort> = Vec::new();
        match d.ports {
            Some(list) if !list.get_ref().is_empty() => {
                for p in list.into_inner() {
                    let span = p.span();
                    let parsed = port_value(
                        p.into_inner(),
                        |p| crate::ServicePort {
                            port: p.port,
                            target_port: None,
                            protocol: p.protocol,
                            node_port: None,
                            name: String::new(),
                        },
                        |p: &crate::ServicePort| {
                            [Some(p.port), p.target_port, p.node_port]
                                .into_iter()
                                .flatten()
                                .collect()
                        },
                    );
                    match parsed {
                        Ok(p) => {
                            if ports
                                .iter()
                                .any(|q| q.port == p.port && q.protocol == p.protocol)
                            {
                                self.error(
                                    span,
                                    format!("port {}/{} is listed twice", p.port, p.protocol),
                                    None,
                                );
                            } else if p.node_port.is_some()
                                && ports
                                    .iter()
                                    .any(|q| q.node_port == p.node_port && q.protocol == p.protocol)
                            {
                                self.error(
                                    span,
                                    format!(
                                        "node_port {} is listed twice",
                                        p.node_port.unwrap_or(0)
                                    ),
                                    None,
                                );
                            } else {
                                ports.push(p);
                            }
                        }
                        Err(why) => self.error(span, why, Some(HINT.into())),
                    }
                }
            }
            other => {
                let span = other.as_ref().map_or(at, |s| s.span());
                self.error(span, "a service needs at least one port", Some(HINT.into()));
            }
        }
        self.errors.is_empty().then_some(crate::Service {
            metadata,
            spec: crate::ServiceSpec {
                selector,
                ports,
                routes: Vec::new(),
            },
            status: Default::default(),
        })
    }

    /// A member's ports; `pod_ports` catches one port declared twice in the
    /// pod (its members share one network namespace).
    fn ports(
        &mut self,
        ports: Spanned<Vec<Spanned<toml::Value>>>,
        pod_ports: &mut BTreeSet<(u16, Protocol)>,
    ) -> Vec<Port> {
        const HINT: &str = "write ports = [8080, \"53/udp\", { port = 9090, protocol = \"tcp\", name = \"metrics\" }]";
        let mut out = Vec::new();
        for p in ports.into_inner() {
            let span = p.span();
            let parsed = port_value(p.into_inner(), |p| p, |p: &Port| vec![p.port]);
            match parsed {
                Ok(port) => {
                    if !port.name.is_empty()
                        && let Err(why) = check_dns_label(&port.name)
                    {
                        self.error(
                            span.clone(),
                            format!("port name '{}' {why}", port.name),
                            None,
                        );
                    }
                    if !pod_ports.insert((port.port, port.protocol)) {
                        self.error(
                            span,
                            format!("port {}/{} is declared twice in this pod", port.port, port.protocol),
                            Some("members share one network namespace, so each port belongs to one member".into()),
                        );
                    } else {
                        out.push(port);
                    }
                }
                Err(why) => self.error(span, why, Some(HINT.into())),
            }
        }
        out
    }

    /// Resolves a module path against the manifest's directory and checks the
    /// file (recorded for upload); `oci://` references are checked for form
    /// only (the node pulls).
    fn module(&mut self, wasm: &Spanned<String>) -> crate::object::MemberSource {
        let raw = wasm.get_ref();
        if let Some(reference) = raw.strip_prefix("oci://") {
            if let Err(why) = check_image_ref(reference) {
                self.error(
                    wasm.span(),
                    format!("'{raw}' {why}"),
                    Some("write oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]".into()),
                );
            }
            return crate::object::MemberSource::artifact(reference);
        }
        let path = if Path::new(raw).is_absolute() {
            PathBuf::from(raw)
        } else {
            self.src.base_dir.join(raw)
        };
        match check_module_file(&path) {
            Ok((digest, size)) => {
                self.files.insert(digest.clone(), path);
                crate::object::MemberSource::Module { digest, size }
            }
            Err(why) => {
                self.error(wasm.span(), why.message, Some(why.hint));
                crate::object::MemberSource::default()
            }
        }
    }
}

/// Why a module file cannot be used.
#[derive(Debug)]
pub struct ModuleFileError {
    pub message: String,
    pub hint: String,
}

/// Checks that `path` is a readable wasm module or component of acceptable size
/// and returns its `sha256:` digest and size.
pub fn check_module_file(path: &Path) -> Result<(String, u64), ModuleFileError> {
    let shown = path.display();
    let bytes = match std::fs::metadata(path) {
        Ok(md) if !md.is_file() => {
            return Err(ModuleFileError {
                message: format!("module path {shown} is not a file"),
                hint: "point wasm at a .wasm file".into(),
            });
        }
        Ok(md) if md.len() > MAX_MODULE_BYTES => {
            return Err(ModuleFileError {
                message: format!(
                    "module {shown} is {} bytes, more than the {MAX_MODULE_BYTES}-byte limit",
                    md.len()
                ),
                hint: "strip debug info (wasm-opt --strip-debug) or split the workload".into(),
            });
        }
        Ok(_) => std::fs::read(path).map_err(|e| ModuleFileError {
            message: format!("cannot read module {shown}: {e}"),
            hint: "check the file's permissions".into(),
        })?,
        Err(e) => {
            return Err(ModuleFileError {
                message: format!("module file {shown} not found ({e})"),
                hint: "relative paths are resolved against the manifest's directory; build the module or fix the path".into(),
            });
        }
    };
    if !is_wasm(&bytes) {
        return Err(ModuleFileError {
            message: format!("{shown} is not a wasm module or component (bad magic number)"),
            hint: "give the compiled .wasm file, not source or text format".into(),
        });
    }
    Ok((digest_of(&bytes), bytes.len() as u64))
}

/// Whether `bytes` start like a wasm module or component (magic number and
/// a version word).
pub fn is_wasm(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..4] == b"\0asm"
}

/// The `sha256:<hex>` digest of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

enum SourceField<'a> {
    Wasm(&'a Spanned<String>),
    Image(&'a Spanned<String>),
}

/// The repository part of an image reference (`tools/busybox` of
/// `host:5000/tools/busybox:1@sha256:…`).
fn image_repo(reference: &str) -> &str {
    let r = reference.trim_start_matches("oci://");
    let r = r.split('@').next().unwrap_or(r);
    let last = r.rsplit('/').next().unwrap_or(r);
    last.split(':').next().unwrap_or(last)
}

/// Checks the form of an image reference: `HOST[:PORT]/REPO[:TAG][@DIGEST]`
/// (a registry host is required: nodes never guess one).
pub fn check_image_ref(reference: &str) -> Result<(), String> {
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    if let Some(d) = digest {
        let hex = d
            .strip_prefix("sha256:")
            .ok_or("has a digest that is not sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("has a malformed sha256 digest (64 lowercase hex digits)".into());
        }
    }
    let (host, path) = name
        .split_once('/')
        .ok_or("names no registry host (HOST/REPO)")?;
    if host.is_empty() || !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err("names no registry host (HOST/REPO); Flotilla never assumes one".into());
    }
    let (repo, tag) = match path.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t)),
        _ => (path, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        return Err(format!("has an invalid tag '{t}'"));
    }
    if tag.is_none() && digest.is_none() {
        return Err("needs a :TAG or @sha256:DIGEST".into());
    }
    let ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    };
    if !repo.split('/').all(ok) {
        return Err("has an invalid repository (lowercase letters, digits, . _ - and /)".into());
    }
    Ok(())
}

fn default_member_name(wasm: &str) -> String {
    let stem = Path::new(wasm)
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let cleaned: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cleaned = cleaned.trim_matches('-');
    if cleaned.is_empty() {
        "main".into()
    } else {
        cleaned.chars().take(63).collect()
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

/// Turns serde's "unknown field `x`, expected one of `a`, `b`" into a suggestion.
fn hint_for(message: &str) -> Option<String> {
    let ticks: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    let (&got, candidates) = ticks.split_first()?;
    if message.starts_with("unknown field") || message.starts_with("unknown variant") {
        if let Some(s) = suggest(got, candidates) {
            return Some(format!("did you mean '{s}'?"));
        }
        if !candidates.is_empty() {
            return Some(format!("expected one of: {}", candidates.join(", ")));
        }
    }
    if message.starts_with("missing field") {
        return Some(format!("add {got} = ..."));
    }
    None
}

/// The candidate closest to `got`, if it is close enough to be a typo.
pub fn suggest<'c>(got: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let limit = (got.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(&got.to_lowercase(), &c.to_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests;
