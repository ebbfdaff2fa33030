//! What pods are fed besides their code: ConfigMaps, references from a
//! member's environment to ConfigMaps, Secrets and the pod's own identity,
//! and volumes (scratch directories, ConfigMap/Secret keys as files, host
//! directories) mounted into members.
//!
//! Everything here is pure: the scheduler validates with it, the agent
//! resolves environments and volume files with it, and both are unit-tested
//! without a cluster.

use crate::meta::ObjectMeta;
use crate::object::{Kind, Object, PodSpec};
use crate::quantity::Bytes;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Non-secret settings for pods, as text (`data`) or bytes (`binary_data`,
/// base64 in JSON). Readers with the `view` role see them whole.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigMap {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    /// Values that are not UTF-8 text, base64-encoded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub binary_data: BTreeMap<String, String>,
}

/// A node-local directory that outlives the pods using it: bound to a node
/// when a pod first uses it, after which its pods are placed there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentVolume {
    pub metadata: ObjectMeta,
    pub spec: PersistentVolumeSpec,
    #[serde(default)]
    pub status: PersistentVolumeStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistentVolumeSpec {
    /// What its data may grow to; a pod whose volume holds more is
    /// evicted.
    pub capacity: Bytes,
}

/// Set by the scheduler.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentVolumeStatus {
    /// The node holding its data (none until a pod first uses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Checks a ConfigMap's or Secret's key: it becomes a file name and an
/// environment variable suffix.
pub fn check_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.len() > 253 {
        return Err(format!("key '{k}' must be 1-253 characters"));
    }
    if !k
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!(
            "key '{k}' may only hold letters, digits, '-', '_' and '.'"
        ));
    }
    if k == "." || k.starts_with("..") {
        return Err(format!(
            "key '{k}' may not be '.' or start with '..' (reserved for volume bookkeeping)"
        ));
    }
    Ok(())
}

/// Checks the keys and base64 values of a ConfigMap's or Secret's data.
pub fn check_data(
    data: &BTreeMap<String, String>,
    binary: &BTreeMap<String, String>,
) -> Result<(), String> {
    for k in data.keys().chain(binary.keys()) {
        check_key(k)?;
    }
    if let Some(k) = data.keys().find(|k| binary.contains_key(*k)) {
        return Err(format!("key '{k}' is in both data and binary_data"));
    }
    for (k, v) in binary {
        base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|e| format!("binary_data key '{k}' is not base64: {e}"))?;
    }
    Ok(())
}

/// Base64 of bytes, as `binary_data` holds them.
pub fn encode_binary(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The keys and values of a ConfigMap or Secret (binary values decoded).
pub fn entries(obj: &Object) -> BTreeMap<String, Vec<u8>> {
    let (data, binary) = match obj {
        Object::ConfigMap(c) => (&c.data, &c.binary_data),
        Object::Secret(s) => (&s.data, &s.binary_data),
        _ => return BTreeMap::new(),
    };
    let mut out: BTreeMap<String, Vec<u8>> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect();
    for (k, v) in binary {
        if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(v) {
            out.insert(k.clone(), b);
        }
    }
    out
}

/// A value in a member's `env`: text, or taken from elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    Value(String),
    From(EnvRef),
}

impl From<&str> for EnvValue {
    fn from(s: &str) -> EnvValue {
        EnvValue::Value(s.to_string())
    }
}

impl From<String> for EnvValue {
    fn from(s: String) -> EnvValue {
        EnvValue::Value(s)
    }
}

/// `{ secret = "db", key = "password" }`, `{ config = "app", key = "mode",
/// optional = true }` or `{ field = "pod.name" }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// A missing object or key leaves the variable unset instead of
    /// keeping the pod from starting.
    #[serde(default, skip_serializing_if = "is_false")]
    pub optional: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The identity fields a member may ask for (`{ field = "pod.name" }`).
pub const FIELDS: [&str; 6] = [
    "pod.name",
    "pod.namespace",
    "pod.uid",
    "pod.ip",
    "node.name",
    "member.name",
];

/// Every key of a ConfigMap or Secret as variables: `env_from = [{ config =
/// "app" }, { secret = "db", prefix = "DB_" }]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub optional: bool,
}

/// A ConfigMap or Secret a pod refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputKind {
    Config,
    Secret,
    /// A persistent Volume (its capacity is what the node needs).
    Volume,
}

impl InputKind {
    pub fn kind(self) -> Kind {
        match self {
            InputKind::Config => Kind::ConfigMap,
            InputKind::Secret => Kind::Secret,
            InputKind::Volume => Kind::Volume,
        }
    }

    /// How messages name it (`config "app"`, `secret "db"`).
    pub fn word(self) -> &'static str {
        match self {
            InputKind::Config => "config",
            InputKind::Secret => "secret",
            InputKind::Volume => "volume",
        }
    }
}

fn one_source<'a>(
    config: &'a Option<String>,
    secret: &'a Option<String>,
) -> Result<(InputKind, &'a str), String> {
    match (config, secret) {
        (Some(c), None) => Ok((InputKind::Config, c)),
        (None, Some(s)) => Ok((InputKind::Secret, s)),
        (Some(_), Some(_)) => Err("name either a config or a secret, not both".into()),
        (None, None) => Err("name a config = \"...\" or a secret = \"...\"".into()),
    }
}

/// What an env reference reads.
pub enum EnvSource<'a> {
    Key {
        from: InputKind,
        name: &'a str,
        key: &'a str,
        optional: bool,
    },
    Field(&'a str),
}

impl EnvRef {
    /// Its source, or why it names none (or too many).
    pub fn source(&self) -> Result<EnvSource<'_>, String> {
        if let Some(f) = &self.field {
            if self.config.is_some() || self.secret.is_some() || self.key.is_some() {
                return Err("a field reference takes only field = \"...\"".into());
            }
            if !FIELDS.contains(&f.as_str()) {
                return Err(format!(
                    "unknown field '{f}'; the fields are {}",
                    FIELDS.join(", ")
                ));
            }
            return Ok(EnvSource::Field(f));
        }
        let (from, name) = one_source(&self.config, &self.secret)
            .map_err(|e| format!("{e}, with key = \"...\" (or field = \"pod.name\")"))?;
        let Some(key) = &self.key else {
            return Err(format!(
                "which key of {} \"{name}\"? add key = \"...\"",
                from.word()
            ));
        };
        Ok(EnvSource::Key {
            from,
            name,
            key,
            optional: self.optional,
        })
    }
}

impl EnvFrom {
    pub fn source(&self) -> Result<(InputKind, &str), String> {
        one_source(&self.config, &self.secret)
    }
}

/// A volume of a pod, which members mount by its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    #[serde(flatten)]
    pub source: VolumeSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeSource {
    /// A scratch directory made with the pod, shared by its members and
    /// removed with it.
    EmptyDir(EmptyDir),
    /// A ConfigMap's keys as files, updated in place when it changes.
    Config(ObjectVolume),
    /// A Secret's keys as files (memory-backed on the node).
    Secret(ObjectVolume),
    /// A directory of the node (admins only).
    HostPath(HostPath),
    /// A `Volume` object's directory on the node it is bound to.
    Persistent(PersistentRef),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistentRef {
    /// The Volume's name (same namespace as the pod).
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyDir {
    #[serde(default, skip_serializing_if = "Medium::is_disk")]
    pub medium: Medium,
    /// Disk: the pod is failed (evicted) when its data grows past this.
    /// Memory: the filesystem's size, writes past it get ENOSPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Bytes>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Medium {
    #[default]
    Disk,
    Memory,
}

impl Medium {
    pub fn is_disk(&self) -> bool {
        *self == Medium::Disk
    }
}

/// Default mode of files made from ConfigMap and Secret keys.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectVolume {
    /// The ConfigMap's or Secret's name (same namespace as the pod).
    pub name: String,
    /// Only these keys, under these file names (default: every key, named
    /// by the key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// File mode (default 0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub optional: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyToPath {
    pub key: String,
    /// Relative file path inside the volume (default: the key).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPath {
    /// An absolute directory on the node.
    pub path: String,
    /// Read-only unless asked for.
    #[serde(default, skip_serializing_if = "is_false")]
    pub writable: bool,
}

/// A volume mounted into a member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub volume: String,
    /// Absolute path in the member (`/` works for wasm members).
    pub path: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

impl Volume {
    /// Whether a member sees it read-only, whatever the mount says.
    pub fn always_read_only(&self) -> bool {
        match &self.source {
            VolumeSource::Config(_) | VolumeSource::Secret(_) => true,
            VolumeSource::HostPath(h) => !h.writable,
            VolumeSource::EmptyDir(_) | VolumeSource::Persistent(_) => false,
        }
    }

    /// The ConfigMap or Secret it shows, if any.
    pub fn input(&self) -> Option<(InputKind, &ObjectVolume)> {
        match &self.source {
            VolumeSource::Config(o) => Some((InputKind::Config, o)),
            VolumeSource::Secret(o) => Some((InputKind::Secret, o)),
            _ => None,
        }
    }
}

/// Checks a relative path inside a volume: no `..`, not absolute, no
/// component starting with `..` (the bookkeeping names).
pub fn check_relative_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.starts_with('/') {
        return Err(format!("path '{p}' must be relative and not empty"));
    }
    for c in p.split('/') {
        if c.is_empty() || c == "." || c.starts_with("..") {
            return Err(format!("path '{p}' may not have empty, '.' or '..' parts"));
        }
    }
    Ok(())
}

fn check_mode(mode: Option<u32>) -> Result<(), String> {
    match mode {
        Some(m) if m > 0o777 => Err(format!("mode {m:#o} is more than 0o777")),
        _ => Ok(()),
    }
}

/// Checks a pod's volumes, its members' mounts and environment references
/// (the one check the CLI and the API share, beside `validate_member`).
pub fn validate_pod(spec: &PodSpec) -> Result<(), String> {
    let mut names = BTreeSet::new();
    for v in &spec.volumes {
        crate::meta::check_dns_label(&v.name)
            .map_err(|w| format!("volume name '{}' {w}", v.name))?;
        if !names.insert(v.name.as_str()) {
            return Err(format!("two volumes are named '{}'", v.name));
        }
        let at = |e: String| format!("volume '{}': {e}", v.name);
        match &v.source {
            VolumeSource::EmptyDir(e) => {
                if e.size_limit.as_ref().is_some_and(|b| b.0 == 0) {
                    return Err(at("size_limit must be more than 0".into()));
                }
            }
            VolumeSource::Config(o) | VolumeSource::Secret(o) => {
                crate::meta::check_dns_label(&o.name)
                    .map_err(|w| at(format!("name '{}' {w}", o.name)))?;
                check_mode(o.mode).map_err(at)?;
                let mut paths = BTreeSet::new();
                for i in &o.items {
                    check_key(&i.key).map_err(at)?;
                    let p = if i.path.is_empty() { &i.key } else { &i.path };
                    check_relative_path(p).map_err(at)?;
                    check_mode(i.mode).map_err(at)?;
                    if !paths.insert(p.as_str()) {
                        return Err(at(format!("two items are written to '{p}'")));
                    }
                }
            }
            VolumeSource::Persistent(r) => {
                crate::meta::check_dns_label(&r.name)
                    .map_err(|w| at(format!("name '{}' {w}", r.name)))?;
            }
            VolumeSource::HostPath(h) => {
                if !h.path.starts_with('/') || h.path.split('/').any(|c| c == "..") {
                    return Err(at(format!(
                        "host_path '{}' must be an absolute path without '..'",
                        h.path
                    )));
                }
            }
        }
    }
    for m in &spec.members {
        let at = |e: String| format!("member '{}': {e}", m.name);
        let mut paths = BTreeSet::new();
        for mount in &m.mounts {
            if !names.contains(mount.volume.as_str()) {
                return Err(at(format!(
                    "mounts volume '{}', which the pod does not declare",
                    mount.volume
                )));
            }
            if !mount.path.starts_with('/') || mount.path.split('/').any(|c| c == "..") {
                return Err(at(format!(
                    "mount path '{}' must be absolute, without '..'",
                    mount.path
                )));
            }
            if !paths.insert(mount.path.trim_end_matches('/')) {
                return Err(at(format!("two mounts at '{}'", mount.path)));
            }
        }
        for (k, v) in &m.env {
            check_env_name(k).map_err(at)?;
            if let EnvValue::From(r) = v {
                let src = r.source().map_err(|e| at(format!("env {k}: {e}")))?;
                if let EnvSource::Key { name, key, .. } = src {
                    crate::meta::check_dns_label(name)
                        .map_err(|w| at(format!("env {k}: name '{name}' {w}")))?;
                    check_key(key).map_err(|e| at(format!("env {k}: {e}")))?;
                }
            }
        }
        for f in &m.env_from {
            let (_, name) = f.source().map_err(|e| at(format!("env_from: {e}")))?;
            crate::meta::check_dns_label(name)
                .map_err(|w| at(format!("env_from: name '{name}' {w}")))?;
        }
    }
    Ok(())
}

/// Variable names: anything printable without `=` (as POSIX allows; the
/// conventional `[A-Z_][A-Z0-9_]*` is not required).
pub fn check_env_name(k: &str) -> Result<(), String> {
    if k.is_empty() || k.contains('=') || k.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!(
            "'{k}' is not a variable name (not empty, no '=' or control characters)"
        ));
    }
    Ok(())
}

/// The ConfigMaps and Secrets a pod refers to (environment and volumes).
pub fn inputs_of(spec: &PodSpec) -> BTreeSet<(InputKind, String)> {
    let mut out = BTreeSet::new();
    for v in &spec.volumes {
        if let Some((k, o)) = v.input() {
            out.insert((k, o.name.clone()));
        }
        if let VolumeSource::Persistent(r) = &v.source {
            out.insert((InputKind::Volume, r.name.clone()));
        }
    }
    for m in &spec.members {
        for v in m.env.values() {
            if let EnvValue::From(r) = v
                && let Ok(EnvSource::Key { from, name, .. }) = r.source()
            {
                out.insert((from, name.to_string()));
            }
        }
        for f in &m.env_from {
            if let Ok((k, name)) = f.source() {
                out.insert((k, name.to_string()));
            }
        }
        for c in &m.wasi.config {
            out.insert((InputKind::Config, c.clone()));
        }
    }
    out
}

/// What `wasi:config/store` answers a member with: every key of the
/// ConfigMaps it names in `wasi.config` (a later one's key wins), or the
/// first missing one.
pub fn config_values(
    member: &crate::object::MemberSpec,
    inputs: &dyn Inputs,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for name in &member.wasi.config {
        let Some(obj) = inputs.input(InputKind::Config, name) else {
            return Err(format!("{} \"{name}\" not found", InputKind::Config.word()));
        };
        for (k, v) in entries(obj) {
            let v = String::from_utf8(v).map_err(|_| {
                format!("configmap \"{name}\" key \"{k}\" is not UTF-8 text, so wasi:config cannot give it")
            })?;
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// The store keys of [`inputs_of`] for a pod in `namespace`.
pub fn input_keys(spec: &PodSpec, namespace: &str) -> BTreeSet<String> {
    inputs_of(spec)
        .into_iter()
        .map(|(k, name)| crate::object::key(k.kind(), namespace, &name))
        .collect()
}

/// Who a member is, for `{ field = "…" }` references.
pub struct Identity<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub ip: &'a str,
    pub node: &'a str,
    pub member: &'a str,
}

impl Identity<'_> {
    fn field(&self, f: &str) -> Option<&str> {
        Some(match f {
            "pod.name" => self.pod,
            "pod.namespace" => self.namespace,
            "pod.uid" => self.uid,
            "pod.ip" => self.ip,
            "node.name" => self.node,
            "member.name" => self.member,
            _ => return None,
        })
    }
}

/// Looks up a pod's ConfigMaps and Secrets by kind and name.
pub trait Inputs {
    fn input(&self, kind: InputKind, name: &str) -> Option<&Object>;
}

/// A pod's inputs among objects held by store key.
pub struct ByKey<'a> {
    pub namespace: &'a str,
    pub objects: &'a std::collections::HashMap<String, std::sync::Arc<Object>>,
}

impl Inputs for ByKey<'_> {
    fn input(&self, kind: InputKind, name: &str) -> Option<&Object> {
        self.objects
            .get(&crate::object::key(kind.kind(), self.namespace, name))
            .map(|o| &**o)
    }
}

fn text(kind: InputKind, name: &str, key: &str, v: Vec<u8>) -> Result<String, String> {
    String::from_utf8(v).map_err(|_| {
        format!(
            "{} \"{name}\" key \"{key}\" is not UTF-8 text, so it cannot be a variable",
            kind.word()
        )
    })
}

/// A member's whole environment: `env_from` in order, then `env`
/// (overriding), nothing else. `Err` names the first missing object or key
/// (`secret "db" has no key "password"`).
pub fn resolve_env(
    member: &crate::object::MemberSpec,
    inputs: &dyn Inputs,
    who: &Identity<'_>,
) -> Result<Vec<(String, String)>, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |k: String, v: String| {
        if out.insert(k.clone(), v).is_none() {
            order.push(k);
        }
    };
    for f in &member.env_from {
        let (kind, name) = f.source()?;
        let Some(obj) = inputs.input(kind, name) else {
            if f.optional {
                continue;
            }
            return Err(format!("{} \"{name}\" not found", kind.word()));
        };
        for (k, v) in entries(obj) {
            let var = format!("{}{k}", f.prefix);
            if check_env_name(&var).is_err() {
                continue;
            }
            set(var, text(kind, name, &k, v)?);
        }
    }
    for (k, v) in &member.env {
        match v {
            EnvValue::Value(s) => set(k.clone(), s.clone()),
            EnvValue::From(r) => match r.source()? {
                EnvSource::Field(f) => {
                    set(k.clone(), who.field(f).unwrap_or_default().to_string());
                }
                EnvSource::Key {
                    from,
                    name,
                    key,
                    optional,
                } => {
                    let Some(obj) = inputs.input(from, name) else {
                        if optional {
                            continue;
                        }
                        return Err(format!("{} \"{name}\" not found", from.word()));
                    };
                    match entries(obj).remove(key) {
                        Some(v) => set(k.clone(), text(from, name, key, v)?),
                        None if optional => {}
                        None => {
                            return Err(format!("{} \"{name}\" has no key \"{key}\"", from.word()));
                        }
                    }
                }
            },
        }
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = out.remove(&k).unwrap_or_default();
            (k, v)
        })
        .collect())
}

/// One file of a ConfigMap or Secret volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeFile {
    /// Relative path inside the volume.
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// The files a ConfigMap or Secret volume shows, or why it cannot be made
/// (`Ok(empty)` for an optional object that is missing).
pub fn volume_files(
    kind: InputKind,
    vol: &ObjectVolume,
    obj: Option<&Object>,
) -> Result<Vec<VolumeFile>, String> {
    let Some(obj) = obj else {
        if vol.optional {
            return Ok(Vec::new());
        }
        return Err(format!("{} \"{}\" not found", kind.word(), vol.name));
    };
    let mut entries = entries(obj);
    let mode = vol.mode.unwrap_or(DEFAULT_FILE_MODE);
    if vol.items.is_empty() {
        return Ok(entries
            .into_iter()
            .map(|(path, bytes)| VolumeFile { path, bytes, mode })
            .collect());
    }
    let mut out = Vec::with_capacity(vol.items.len());
    for i in &vol.items {
        let Some(bytes) = entries.remove(&i.key) else {
            if vol.optional {
                continue;
            }
            return Err(format!(
                "{} \"{}\" has no key \"{}\"",
                kind.word(),
                vol.name,
                i.key
            ));
        };
        out.push(VolumeFile {
            path: if i.path.is_empty() {
                i.key.clone()
            } else {
                i.path.clone()
            },
            bytes,
            mode: i.mode.unwrap_or(mode),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
