//! The OCI runtime spec (`config.json`) of a container member, built with
//! `oci-spec`: the image config and the pod's overrides, cgroup limits, and
//! the hardening every container gets — a minimal capability set,
//! no-new-privileges, a seccomp profile, masked and read-only kernel paths.

use crate::image::RunConfig;
use flotilla_api::MemberSpec;
use oci_spec::runtime::{
    Arch, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscallBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};
use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;

/// Capabilities a container keeps unless its member asks for more: enough
/// to run ordinary images as root (change file owners, switch users, bind
/// low ports, signal its own processes) and nothing that reaches the host.
pub const DEFAULT_CAPABILITIES: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
];

/// Syscalls the default seccomp profile refuses with EPERM: kernel modules
/// and images, reboot, swap, accounting, keyrings, BPF and perf, tracing
/// other processes, namespaces and mounts, raw I/O ports, handles that
/// bypass path checks, io_uring (its operations escape this filter).
/// Besides: the clock syscalls of [`TIME_SYSCALLS`] unless the member was
/// granted SYS_TIME, `clone3` answers ENOSYS (so libcs fall back to
/// `clone`, whose flags a filter can see) and `clone` with any namespace
/// flag is refused. Everything else is allowed (capabilities and
/// namespaces fence the rest).
pub const SECCOMP_DENIED: [&str; 41] = [
    "acct",
    "add_key",
    "bpf",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "swapoff",
    "swapon",
    "umount2",
    "unshare",
    "userfaultfd",
];

/// Syscalls that set the host's clocks (the 32-bit `*64` forms included).
pub const TIME_SYSCALLS: [&str; 7] = [
    "adjtimex",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_settime",
    "clock_settime64",
    "settimeofday",
    "stime",
];

/// `clone` flags that make new namespaces.
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("unknown capability '{0}'")]
    Capability(String),
    #[error("user '{user}': {why}")]
    User { user: String, why: String },
    #[error("nothing to run: the image has no entrypoint or cmd and the member gives no command")]
    NoCommand,
    #[error("building the runtime spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

/// Everything the spec is built from.
pub struct SpecInput<'a> {
    pub member: &'a MemberSpec,
    pub image: &'a RunConfig,
    /// The container's root filesystem (for user names in /etc/passwd).
    pub rootfs: &'a Path,
    /// The member's whole environment (resolved from its manifest, with
    /// the service links), over the image's.
    pub env: &'a flotilla_api::Labels,
    /// The pod's volumes this member mounts (bind mounts, nosuid, nodev).
    pub mounts: &'a [crate::volume::ResolvedMount],
    pub hostname: &'a str,
    /// Cgroup path, e.g. `/flotilla/<id>`.
    pub cgroup: &'a str,
    /// The pod's network namespace (a bind-mounted namespace file); `None`:
    /// the node's network (agents that run pods on the host network).
    pub netns: Option<&'a Path>,
    /// A file bind-mounted read-only at /etc/resolv.conf (the node's DNS
    /// responder for pods with a network).
    pub resolv_conf: Option<&'a Path>,
    /// A user namespace of the container's own with this mapping (`None`:
    /// host IDs).
    pub userns: Option<crate::executor::container::sys::IdMap>,
}

/// The process arguments: the member's command (else the image entrypoint),
/// then the member's args (else the image cmd, only when the entrypoint is
/// the image's).
pub fn argv(member: &MemberSpec, image: &RunConfig) -> Vec<String> {
    let default = flotilla_api::ContainerOptions::default();
    let c = member.container_options().unwrap_or(&default);
    let mut v = if c.command.is_empty() {
        image.entrypoint.clone()
    } else {
        c.command.clone()
    };
    if !member.args.is_empty() {
        v.extend(member.args.iter().cloned());
    } else if c.command.is_empty() {
        v.extend(image.cmd.iter().cloned());
    }
    v
}

/// `KEY=VALUE` list: the image's, then the member's (overriding).
fn environment(input: &SpecInput<'_>) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match out.iter_mut().find(|(ek, _)| ek == k) {
        Some(e) => e.1 = v.to_string(),
        None => out.push((k.to_string(), v.to_string())),
    };
    for kv in &input.image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    if !input.image.env.iter().any(|kv| kv.starts_with("PATH=")) {
        set(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    for (k, v) in input.env {
        set(k, v);
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Resolves `uid[:gid]` or `name[:group]` against the image's passwd/group.
pub fn resolve_user(spec: &str, rootfs: &Path) -> Result<(u32, u32), SpecError> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let err = |why: String| SpecError::User {
        user: spec.to_string(),
        why,
    };
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // /etc/passwd: name:x:uid:gid:...  /etc/group: name:x:gid:...
    // Read only as plain files inside the image: a symlink on the way (an
    // image's /etc/passwd pointing at the host's files) is not followed.
    let lookup = |file: &str, name: &str, field: usize, count: usize| -> Option<Vec<u32>> {
        let mut at = rootfs.to_path_buf();
        for part in file.split('/') {
            at.push(part);
            if std::fs::symlink_metadata(&at)
                .ok()?
                .file_type()
                .is_symlink()
            {
                return None;
            }
        }
        let text = std::fs::read_to_string(&at).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&name) {
                let ids: Option<Vec<u32>> = (field..f.len().min(field + count))
                    .map(|i| f[i].parse().ok())
                    .collect();
                ids
            } else {
                None
            }
        })
    };
    let (uid, passwd_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => {
            let ids = lookup("etc/passwd", u, 2, 2)
                .ok_or_else(|| err(format!("no user '{u}' in the image's /etc/passwd")))?;
            (ids[0], ids.get(1).copied())
        }
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("etc/group", g, 2, 1)
                .and_then(|v| v.first().copied())
                .ok_or_else(|| err(format!("no group '{g}' in the image's /etc/group")))?,
        },
        None => passwd_gid.unwrap_or(uid),
    };
    Ok((uid, gid))
}

/// The capability set: the default plus the member's additions.
pub fn capabilities(extra: &[String]) -> Result<HashSet<Capability>, SpecError> {
    DEFAULT_CAPABILITIES
        .iter()
        .map(|c| c.to_string())
        .chain(extra.iter().cloned())
        .map(|c| {
            let n = flotilla_api::object::normalize_capability(&c);
            Capability::from_str(&n).map_err(|_| SpecError::Capability(c))
        })
        .collect()
}

/// Builds the container's runtime spec.
pub fn build(input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    let member = input.member;
    let default = flotilla_api::ContainerOptions::default();
    let c = member.container_options().unwrap_or(&default);
    let args = argv(member, input.image);
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let user_spec = if c.user.is_empty() {
        input.image.user.as_str()
    } else {
        c.user.as_str()
    };
    let (uid, gid) = resolve_user(user_spec, input.rootfs)?;
    let cwd = if !c.workdir.is_empty() {
        c.workdir.clone()
    } else if !input.image.workdir.is_empty() {
        input.image.workdir.clone()
    } else {
        "/".into()
    };
    let caps = capabilities(&c.capabilities)?;
    // A non-root user keeps no effective capabilities (as with execve).
    let effective = if uid == 0 {
        caps.clone()
    } else {
        HashSet::new()
    };
    // Open files: up to 65536, never above the agent's own hard limit
    // (raising it needs CAP_SYS_RESOURCE, which containers lack).
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX)
        .min(65_536);
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(uid).gid(gid).build()?)
        .args(args)
        .env(environment(input))
        .cwd(cwd)
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .permitted(caps.clone())
                .effective(effective)
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()?,
        )
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(nofile)
                .soft(nofile)
                .build()?,
        ])
        .build()?;
    let mut resources =
        LinuxResourcesBuilder::default().pids(LinuxPidsBuilder::default().limit(4096i64).build()?);
    if let Some(mem) = member.resources.memory {
        let bytes = mem.0 as i64;
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                // No swap beyond the limit: the limit is the limit.
                .swap(bytes)
                .build()?,
        );
    }
    if member.resources.cpu > 0 {
        let period: u64 = 100_000;
        let quota = (u64::from(member.resources.cpu) * period / 1000).max(1000);
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota as i64)
                .period(period)
                .build()?,
        );
    }
    let mut linux = oci_spec::runtime::Linux::default();
    // The container joins the pod's network namespace (shared with the
    // other members); the other namespaces are its own.
    let mut namespaces: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Network)
        .collect();
    if let Some(path) = input.netns {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(path)
                .build()?,
        );
    }
    let mut mappings = Vec::new();
    if let Some(map) = input.userns {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()?,
        );
        // Its own cgroup namespace, owned by its user namespace, so that
        // /sys/fs/cgroup can be mounted inside it.
        if !namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Cgroup)
        {
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::Cgroup)
                    .build()?,
            );
        }
        mappings.push(
            LinuxIdMappingBuilder::default()
                .container_id(0u32)
                .host_id(map.host)
                .size(map.size)
                .build()?,
        );
    }
    linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .uid_mappings(mappings.clone())
        .gid_mappings(mappings)
        .resources(resources.build()?)
        .cgroups_path(input.cgroup)
        .masked_paths(linux.masked_paths().clone().unwrap_or_default())
        .readonly_paths(linux.readonly_paths().clone().unwrap_or_default())
        .seccomp(seccomp(caps.contains(&Capability::SysTime))?)
        .build()?;
    let mut spec = Spec::default();
    spec.set_hostname(Some(input.hostname.to_string()));
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(c.read_only)
            .build()?,
    ));
    spec.set_linux(Some(linux));
    spec.set_annotations(None);
    if input.userns.is_some() {
        // sysfs can be mounted only by the user namespace owning the
        // network namespace, and the pod's (or the node's) belongs to the
        // host's: the node's /sys is bound read-only instead, as rootless
        // runtimes do.
        let mounts = spec
            .mounts()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                if m.destination() != Path::new("/sys") {
                    return Ok(m);
                }
                oci_spec::runtime::MountBuilder::default()
                    .destination("/sys")
                    .typ("none")
                    .source("/sys")
                    .options(
                        ["rbind", "nosuid", "noexec", "nodev", "ro"]
                            .map(String::from)
                            .to_vec(),
                    )
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        spec.set_mounts(Some(mounts));
    }
    if !input.mounts.is_empty() {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for m in input.mounts {
            let mut options = vec![
                "rbind".to_string(),
                "nosuid".to_string(),
                "nodev".to_string(),
                "rprivate".to_string(),
            ];
            options.push(if m.read_only { "ro" } else { "rw" }.to_string());
            mounts.push(
                oci_spec::runtime::MountBuilder::default()
                    .destination(&m.guest)
                    .typ("bind")
                    .source(&m.host)
                    .options(options)
                    .build()?,
            );
        }
        spec.set_mounts(Some(mounts));
    }
    if let Some(file) = input.resolv_conf {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination("/etc/resolv.conf")
                .typ("bind")
                .source(file)
                .options(vec!["rbind".to_string(), "ro".to_string()])
                .build()?,
        );
        spec.set_mounts(Some(mounts));
    }
    Ok(spec)
}

/// The default seccomp profile (see [`SECCOMP_DENIED`]); `sys_time`: the
/// member was granted SYS_TIME, so the clocks are its to set.
fn seccomp(sys_time: bool) -> Result<oci_spec::runtime::LinuxSeccomp, SpecError> {
    let arches = match std::env::consts::ARCH {
        "x86_64" => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "aarch64" => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        _ => vec![Arch::ScmpArchNative],
    };
    let eperm = |names: Vec<String>| {
        LinuxSyscallBuilder::default()
            .names(names)
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(1u32)
            .build()
    };
    let mut denied: Vec<String> = SECCOMP_DENIED.iter().map(|s| s.to_string()).collect();
    if !sys_time {
        denied.extend(TIME_SYSCALLS.iter().map(|s| s.to_string()));
    }
    let mut rules = vec![
        eperm(denied)?,
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_string()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(38u32) // ENOSYS
            .build()?,
    ];
    // One rule per flag: (flags & FLAG) == FLAG → EPERM.
    for flag in CLONE_NAMESPACE_FLAGS {
        rules.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone".to_string()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(1u32)
                .args(vec![
                    LinuxSeccompArgBuilder::default()
                        .index(0usize)
                        .value(flag)
                        .value_two(flag)
                        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                        .build()?,
                ])
                .build()?,
        );
    }
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(arches)
        .syscalls(rules)
        .build()?)
}

/// The capability bit mask `/proc/self/status` shows for a set.
pub fn cap_mask(caps: &[&str]) -> u64 {
    caps.iter()
        .filter_map(|c| {
            flotilla_api::object::CAPABILITIES
                .iter()
                .position(|k| k == c)
        })
        .fold(0, |m, bit| m | 1 << bit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::{ContainerOptions, quantity::Bytes};

    fn member(c: ContainerOptions, args: &[&str]) -> MemberSpec {
        MemberSpec {
            name: "app".into(),
            source: flotilla_api::MemberSource::Container {
                image: "127.0.0.1:5000/app:1".into(),
                digest: String::new(),
                options: c,
            },
            args: args.iter().map(|s| s.to_string()).collect(),
            ..MemberSpec::default()
        }
    }

    fn image() -> RunConfig {
        RunConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into(), "MODE=image".into()],
            workdir: "/srv".into(),
            user: String::new(),
        }
    }

    #[test]
    fn command_and_args_override_the_image_like_kubernetes() {
        let img = image();
        assert_eq!(
            argv(&member(Default::default(), &[]), &img),
            ["/bin/app", "--serve"]
        );
        assert_eq!(
            argv(&member(Default::default(), &["-v"]), &img),
            ["/bin/app", "-v"]
        );
        let cmd = ContainerOptions {
            command: vec!["/bin/sh".into()],
            ..Default::default()
        };
        assert_eq!(argv(&member(cmd.clone(), &[]), &img), ["/bin/sh"]);
        assert_eq!(
            argv(&member(cmd, &["-c", "x"]), &img),
            ["/bin/sh", "-c", "x"]
        );
    }

    #[test]
    fn users_resolve_from_numbers_and_the_image_passwd() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:1000:1001::/home:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let r = |s| resolve_user(s, dir.path());
        assert_eq!(r("").unwrap(), (0, 0));
        assert_eq!(r("65534").unwrap(), (65534, 65534));
        assert_eq!(r("7:8").unwrap(), (7, 8));
        assert_eq!(r("web").unwrap(), (1000, 1001));
        assert_eq!(r("web:staff").unwrap(), (1000, 50));
        let e = r("ghost").unwrap_err().to_string();
        assert!(e.contains("no user 'ghost'"), "{e}");
        assert!(r("web:ghosts").is_err());

        // An image whose /etc/passwd (or /etc) is a symlink out of it: the
        // host's files are not read.
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir(host.path().join("etc")).unwrap();
        std::fs::write(
            host.path().join("etc/passwd"),
            "hostuser:x:4242:4242::/:/bin/sh
",
        )
        .unwrap();
        let image = tempfile::tempdir().unwrap();
        std::fs::create_dir(image.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(
            host.path().join("etc/passwd"),
            image.path().join("etc/passwd"),
        )
        .unwrap();
        assert!(resolve_user("hostuser", image.path()).is_err());
        let image = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(host.path().join("etc"), image.path().join("etc")).unwrap();
        assert!(resolve_user("hostuser", image.path()).is_err());
        // Numeric ids need no file.
        assert_eq!(resolve_user("4242", image.path()).unwrap(), (4242, 4242));
    }

    #[test]
    fn the_spec_is_hardened_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = member(
            ContainerOptions {
                read_only: true,
                capabilities: vec!["net_raw".into()],
                ..Default::default()
            },
            &[],
        );
        m.resources.memory = Some(Bytes(64 << 20));
        m.resources.cpu = 250;
        let img = image();
        // The resolved environment overrides the image's.
        let env: flotilla_api::Labels = [("MODE", "member"), ("POD", "web")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mounts = [
            crate::volume::ResolvedMount {
                host: "/var/lib/flotilla/volumes/u/data".into(),
                guest: "/data".into(),
                read_only: false,
            },
            crate::volume::ResolvedMount {
                host: "/var/lib/flotilla/volumes/u/cfg".into(),
                guest: "/etc/app".into(),
                read_only: true,
            },
        ];
        let spec = build(&SpecInput {
            member: &m,
            image: &img,
            rootfs: dir.path(),
            env: &env,
            mounts: &mounts,
            hostname: "web",
            cgroup: "/flotilla/x",
            netns: Some(Path::new("/var/lib/flotilla/netns/uid")),
            resolv_conf: Some(Path::new("/var/lib/flotilla/c/resolv.conf")),
            userns: None,
        })
        .unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.cwd(), Path::new("/srv"));
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"MODE=member".to_string()), "{env:?}");
        assert!(env.contains(&"POD=web".to_string()));
        assert!(!env.contains(&"MODE=image".to_string()), "{env:?}");
        assert!(env.contains(&"PATH=/bin".to_string()));
        let caps = p.capabilities().as_ref().unwrap();
        let bounding = caps.bounding().as_ref().unwrap();
        assert_eq!(bounding.len(), DEFAULT_CAPABILITIES.len() + 1);
        assert!(bounding.contains(&Capability::NetRaw));
        assert!(!bounding.contains(&Capability::SysAdmin));
        assert!(spec.root().as_ref().unwrap().readonly().unwrap());
        let linux = spec.linux().as_ref().unwrap();
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(25_000));
        let ns = linux.namespaces().as_ref().unwrap();
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Pid));
        // Its own namespaces, but the pod's network namespace, by path.
        let net: Vec<_> = ns
            .iter()
            .filter(|n| n.typ() == LinuxNamespaceType::Network)
            .collect();
        assert_eq!(net.len(), 1);
        assert_eq!(
            net[0].path().as_deref(),
            Some(Path::new("/var/lib/flotilla/netns/uid"))
        );
        let resolv = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
            .expect("resolv.conf mounted");
        assert_eq!(
            resolv.source().as_deref(),
            Some(Path::new("/var/lib/flotilla/c/resolv.conf"))
        );
        assert!(
            resolv
                .options()
                .as_ref()
                .unwrap()
                .contains(&"ro".to_string())
        );
        // Volumes: bind mounts, never setuid or devices; read-only honoured.
        let bind = |dest: &str| {
            spec.mounts()
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.destination() == Path::new(dest))
                .unwrap_or_else(|| panic!("{dest} mounted"))
                .clone()
        };
        let data = bind("/data");
        assert_eq!(
            data.source().as_deref(),
            Some(Path::new("/var/lib/flotilla/volumes/u/data"))
        );
        let opts = data.options().clone().unwrap();
        for o in ["rbind", "nosuid", "nodev", "rw"] {
            assert!(opts.contains(&o.to_string()), "{opts:?}");
        }
        assert!(
            bind("/etc/app")
                .options()
                .as_ref()
                .unwrap()
                .contains(&"ro".to_string())
        );
        assert!(
            linux
                .masked_paths()
                .as_ref()
                .unwrap()
                .contains(&"/proc/kcore".to_string())
        );
        let sc = linux.seccomp().as_ref().unwrap();
        assert_eq!(sc.default_action(), LinuxSeccompAction::ScmpActAllow);
        let rules = sc.syscalls().as_ref().unwrap();
        let names = rules[0].names();
        for n in [
            "mount",
            "bpf",
            "io_uring_setup",
            "adjtimex",
            "clock_settime64",
        ] {
            assert!(names.contains(&n.to_string()), "{n} is not denied");
        }
        // clone3 answers ENOSYS; clone with each namespace flag, EPERM.
        assert_eq!(rules[1].names(), &["clone3".to_string()]);
        assert_eq!(rules[1].errno_ret(), Some(38));
        let clone_flags: Vec<u64> = rules[2..]
            .iter()
            .map(|r| {
                assert_eq!(r.names(), &["clone".to_string()]);
                let a = &r.args().as_ref().unwrap()[0];
                assert_eq!(a.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
                assert_eq!(a.value(), a.value_two().unwrap());
                a.value()
            })
            .collect();
        assert_eq!(clone_flags.iter().fold(0, |m, f| m | f), 0x7e02_0000);
        // Granted SYS_TIME (by an admin), the member may set the clocks.
        let timekeeper = member(
            ContainerOptions {
                capabilities: vec!["SYS_TIME".into()],
                ..Default::default()
            },
            &[],
        );
        let spec = build(&SpecInput {
            member: &timekeeper,
            image: &img,
            rootfs: dir.path(),
            env: &Default::default(),
            mounts: &[],
            hostname: "t",
            cgroup: "/flotilla/t",
            netns: None,
            resolv_conf: None,
            userns: None,
        })
        .unwrap();
        let sc = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        let names = sc.syscalls().as_ref().unwrap()[0].names();
        assert!(!names.contains(&"clock_settime".to_string()));
        assert!(names.contains(&"mount".to_string()));
        // Bad capabilities and users are refused with the name.
        let bad = member(
            ContainerOptions {
                capabilities: vec!["FLY".into()],
                ..Default::default()
            },
            &[],
        );
        let e = build(&SpecInput {
            member: &bad,
            ..SpecInput {
                member: &m,
                image: &img,
                rootfs: dir.path(),
                env: &Default::default(),
                mounts: &[],
                hostname: "web",
                cgroup: "/flotilla/x",
                netns: None,
                resolv_conf: None,
                userns: None,
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("FLY"));
    }

    #[test]
    fn cap_masks_match_the_kernel_bit_order() {
        assert_eq!(cap_mask(&["CHOWN"]), 1);
        assert_eq!(
            cap_mask(&["NET_BIND_SERVICE", "KILL"]),
            (1 << 10) | (1 << 5)
        );
        assert_eq!(cap_mask(&DEFAULT_CAPABILITIES), 0x4fb);
    }

    #[test]
    fn a_user_namespace_maps_root_and_binds_sys_instead_of_mounting_it() {
        let dir = tempfile::tempdir().unwrap();
        let (m, img) = (member(Default::default(), &[]), image());
        let input = SpecInput {
            member: &m,
            image: &img,
            rootfs: dir.path(),
            env: &Default::default(),
            mounts: &[],
            hostname: "web",
            cgroup: "/flotilla/x",
            netns: Some(Path::new("/var/lib/flotilla/netns/uid")),
            resolv_conf: None,
            userns: Some(crate::executor::container::sys::IdMap {
                host: 1 << 30,
                size: 65536,
            }),
        };
        let spec = build(&input).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let ns = linux.namespaces().as_ref().unwrap();
        for t in [LinuxNamespaceType::User, LinuxNamespaceType::Cgroup] {
            assert_eq!(ns.iter().filter(|n| n.typ() == t).count(), 1, "{t:?}");
        }
        for maps in [linux.uid_mappings(), linux.gid_mappings()] {
            let maps = maps.as_ref().unwrap();
            assert_eq!(maps.len(), 1);
            assert_eq!(
                (maps[0].container_id(), maps[0].host_id(), maps[0].size()),
                (0, 1 << 30, 65536)
            );
        }
        let sys = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert_eq!(sys.source().as_deref(), Some(Path::new("/sys")));
        let opts = sys.options().clone().unwrap();
        for o in ["rbind", "ro", "nosuid", "noexec", "nodev"] {
            assert!(opts.contains(&o.to_string()), "{opts:?}");
        }
        // Without one: host IDs, sysfs mounted as usual.
        let plain = build(&SpecInput {
            userns: None,
            ..input
        })
        .unwrap();
        let linux = plain.linux().as_ref().unwrap();
        assert!(
            !linux
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::User)
        );
        assert!(linux.uid_mappings().as_ref().is_none_or(|m| m.is_empty()));
        let sys = plain
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert_eq!(sys.typ().as_deref(), Some("sysfs"));
    }
}
