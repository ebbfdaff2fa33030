use super::*;
use crate::object::MemberSource;
use std::io::Write;

fn wasm_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(dir.path().join("hello.wasm")).unwrap();
    f.write_all(b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(dir.path().join("notwasm.wasm"), b"hello world").unwrap();
    dir
}

fn parse_in(dir: &Path, text: &str) -> Result<Vec<Object>, ManifestErrors> {
    parse(&Source {
        name: "hello.toml",
        text,
        base_dir: dir,
    })
}

fn first_error(dir: &Path, text: &str) -> String {
    parse_in(dir, text).unwrap_err().0[0].to_string()
}

const POD: &str = r#"kind = "Pod"
name = "hello"
labels = { app = "hello" }

[[members]]
wasm = "hello.wasm"
args = ["--greet"]
env = { GREETING = "hi" }
resources = { cpu = 100, memory = "32Mi", cpu_time = "10s" }
restart = "OnFailure"
"#;

#[test]
fn parses_a_pod_and_resolves_its_module() {
    let dir = wasm_dir();
    let objs = parse_in(dir.path(), POD).unwrap();
    let Object::Pod(p) = &objs[0] else { panic!() };
    assert_eq!(p.metadata.name, "hello");
    assert_eq!(p.metadata.namespace, "default");
    let m = &p.spec.members[0];
    assert_eq!(m.name, "hello");
    // The member carries the module's digest and size, never a path; the
    // file to upload is reported beside the objects.
    let MemberSource::Module { digest, size } = &m.source else {
        panic!("{:?}", m.source)
    };
    assert!(digest.starts_with("sha256:") && *size >= 8);
    let parsed = parse_with_files(&Source {
        name: "hello.toml",
        text: POD,
        base_dir: dir.path(),
    })
    .unwrap();
    let file = &parsed.files[digest];
    assert!(
        file.is_absolute() || file.starts_with(dir.path()),
        "{file:?}"
    );
    assert_eq!(std::fs::metadata(file).unwrap().len(), *size);
    let json = serde_json::to_value(m).unwrap();
    assert_eq!(json["module"]["digest"], digest.as_str(), "{json}");
    assert_eq!(m.resources.memory.unwrap().0, 32 << 20);
    assert_eq!(m.resources.cpu_time.unwrap().0, 10_000);
    assert_eq!(m.restart, RestartPolicy::OnFailure);
}

#[test]
fn several_resources_in_one_file() {
    let dir = wasm_dir();
    let text = format!(
        "{POD}---\nkind = \"Deployment\"\nname = \"web\"\nreplicas = 3\n[template]\nlabels = {{ app = \"web\" }}\n[[template.members]]\nwasm = \"hello.wasm\"\n"
    );
    let objs = parse_in(dir.path(), &text).unwrap();
    assert_eq!(objs.len(), 2);
    let Object::Deployment(d) = &objs[1] else {
        panic!()
    };
    assert_eq!(d.spec.replicas, 3);
    assert_eq!(
        d.spec.template.spec.members[0].restart,
        RestartPolicy::Always
    );
}

#[test]
fn a_deployment_names_its_rollout_strategy_and_deadline_and_their_mistakes_point_at_them() {
    let dir = wasm_dir();
    let head = "kind = \"Deployment\"\nname = \"web\"\nreplicas = 4\n";
    let tail = "[template]\n[[template.members]]\nwasm = \"hello.wasm\"\n";
    let objs = parse_in(
        dir.path(),
        &format!("{head}strategy = {{ max_surge = 1, max_unavailable = \"50%\" }}\nprogress_deadline = \"2m\"\n{tail}"),
    )
    .unwrap();
    let Object::Deployment(d) = &objs[0] else {
        panic!()
    };
    assert_eq!(d.spec.strategy.limits(4), (1, 2));
    assert_eq!(d.spec.progress_deadline, crate::probe::Millis(120_000));
    // Unsaid: 25% each way and ten minutes.
    let objs = parse_in(dir.path(), &format!("{head}{tail}")).unwrap();
    let Object::Deployment(d) = &objs[0] else {
        panic!()
    };
    assert_eq!(d.spec.strategy, crate::rollout::Strategy::default());
    assert_eq!(
        d.spec.progress_deadline,
        crate::rollout::DEFAULT_PROGRESS_DEADLINE
    );
    let e = first_error(
        dir.path(),
        &format!("{head}strategy = {{ max_surge = 0, max_unavailable = 0 }}\n{tail}"),
    );
    assert!(
        e.starts_with("hello.toml:4:12: max_surge and max_unavailable are both 0"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        &format!("{head}strategy = {{ max_surge = \"150%\" }}\n{tail}"),
    );
    assert!(
        e.starts_with("hello.toml:4:") && e.contains("more than 100%"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        &format!("{head}progress_deadline = \"10ms\"\n{tail}"),
    );
    assert!(
        e.starts_with("hello.toml:4:21: progress_deadline = 10ms is too short"),
        "{e}"
    );
    // `paused` belongs to `rollout pause`, not to manifests.
    let e = first_error(dir.path(), &format!("{head}paused = true\n{tail}"));
    assert!(e.contains("unknown field `paused`"), "{e}");
}

#[test]
fn unknown_field_names_position_and_suggestion() {
    let dir = wasm_dir();
    let text = "kind = \"Deployment\"\nname = \"web\"\nreplcas = 3\n";
    let e = first_error(dir.path(), text);
    assert_eq!(
        e,
        "hello.toml:3:1: unknown field `replcas`, expected one of `kind`, `name`, `namespace`, `labels`, `replicas`, `strategy`, `progress_deadline`, `template` — did you mean 'replicas'?"
    );
}

#[test]
fn positions_count_from_the_start_of_the_file_across_documents() {
    let dir = wasm_dir();
    let text = format!(
        "{POD}---\nkind = \"Pod\"\nname = \"b\"\n[[members]]\nwasm = \"hello.wasm\"\n  restrat = \"Never\"\n"
    );
    let errs = parse_in(dir.path(), &text).unwrap_err();
    let e = &errs.0[0];
    assert_eq!((e.line, e.col), (16, 3), "{e}");
    assert_eq!(e.hint.as_deref(), Some("did you mean 'restart'?"));
}

#[test]
fn bad_values_are_errors_with_hints() {
    let dir = wasm_dir();
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"a\"\n[[members]]\nwasm = \"hello.wasm\"\nrestart = \"Sometimes\"\n",
    );
    assert!(
        e.starts_with("hello.toml:5:11: unknown variant `Sometimes`"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"a\"\n[[members]]\nwasm = \"hello.wasm\"\nresources = { memory = \"12Q\" }\n",
    );
    assert!(e.contains("hello.toml:5:"), "{e}");
    assert!(e.contains("use Ki, Mi, Gi"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"Bad_Name\"\nmembers = []\n",
    );
    assert!(
        e.starts_with("hello.toml:2:8: name 'Bad_Name' contains 'B'"),
        "{e}"
    );
    let e = first_error(dir.path(), "kind = \"Pd\"\nname = \"a\"\n");
    assert_eq!(e, "hello.toml:1:8: unknown kind 'Pd' — did you mean 'Pod'?");
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"a\"\n[[members]]\nwasm = \"hello.wasm\"\nargs = 3\n",
    );
    assert!(e.starts_with("hello.toml:5:8: invalid type"), "{e}");
    let e = first_error(dir.path(), "kind = \"Pod\"\nname = \"a\"\nmembers = [\n");
    assert!(e.starts_with("hello.toml:"), "{e}");
}

#[test]
fn missing_or_bogus_module_is_an_apply_time_error() {
    let dir = wasm_dir();
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"a\"\n[[members]]\nwasm = \"nope.wasm\"\n",
    );
    assert!(e.starts_with("hello.toml:4:8: module file "), "{e}");
    assert!(e.contains("not found"), "{e}");
    assert!(
        e.contains("resolved against the manifest's directory"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"a\"\n[[members]]\nwasm = \"notwasm.wasm\"\n",
    );
    assert!(e.contains("bad magic number"), "{e}");
}

#[test]
fn duplicate_members_and_empty_pods_are_refused() {
    let dir = wasm_dir();
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"a\"\n[[members]]\nwasm = \"hello.wasm\"\n[[members]]\nwasm = \"hello.wasm\"\n",
    );
    assert!(e.contains("two members are named 'hello'"), "{e}");
    let e = first_error(dir.path(), "kind = \"Pod\"\nname = \"a\"\nmembers = []\n");
    assert!(e.contains("at least one member"), "{e}");
    let e = first_error(dir.path(), "# nothing\n");
    assert!(e.contains("no resources"), "{e}");
}

#[test]
fn suggestions_only_for_near_misses() {
    assert_eq!(
        suggest("replcas", &["replicas", "template"]),
        Some("replicas")
    );
    assert_eq!(suggest("zzzzzz", &["replicas", "template"]), None);
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

#[test]
fn on_disconnect_is_keep_unless_asked_and_misspellings_are_refused() {
    let dir = wasm_dir();
    let objs = parse_in(dir.path(), POD).unwrap();
    let Object::Pod(p) = &objs[0] else { panic!() };
    assert_eq!(p.spec.on_disconnect, OnDisconnect::Keep);
    let pod = POD.replace(
        "labels = { app = \"hello\" }",
        "labels = { app = \"hello\" }\non_disconnect = \"Stop\"",
    );
    let objs = parse_in(dir.path(), &pod).unwrap();
    let Object::Pod(p) = &objs[0] else { panic!() };
    assert_eq!(p.spec.on_disconnect, OnDisconnect::Stop);
    let d = "kind = \"Deployment\"\nname = \"web\"\nreplicas = 1\n[template]\non_disconnect = \"Stop\"\n[[template.members]]\nwasm = \"hello.wasm\"\n";
    let objs = parse_in(dir.path(), d).unwrap();
    let Object::Deployment(d) = &objs[0] else {
        panic!()
    };
    assert_eq!(d.spec.template.spec.on_disconnect, OnDisconnect::Stop);
    let bad = POD.replace(
        "labels = { app = \"hello\" }",
        "labels = { app = \"hello\" }\non_disconnect = \"Halt\"",
    );
    let e = first_error(dir.path(), &bad);
    assert!(e.contains("hello.toml:4:"), "{e}");
    assert!(e.contains("Keep") && e.contains("Stop"), "{e}");
}

const MIXED: &str = r#"kind = "Pod"
name = "mixed"

[[members]]
wasm = "hello.wasm"

[[members]]
image = "127.0.0.1:5000/tools/busybox:1.36"
args = ["sh", "-c", "echo hi"]
command = ["/bin/env"]
workdir = "/srv"
user = "65534:65534"
read_only = true
capabilities = ["net_raw", "CAP_SYS_TIME"]
grace_period = 3

[[members]]
name = "artifact"
wasm = "oci://registry.example:5000/wasm/hello@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
"#;

#[test]
fn parses_container_members_and_oci_wasm_members() {
    let dir = wasm_dir();
    let objs = parse_in(dir.path(), MIXED).unwrap();
    let Object::Pod(p) = &objs[0] else { panic!() };
    let [wasm, image, artifact] = p.spec.members.as_slice() else {
        panic!("{:?}", p.spec.members)
    };
    assert!(!wasm.is_container());
    assert!(image.is_container());
    assert_eq!(image.name, "busybox", "named after the repository");
    let MemberSource::Container {
        image: reference,
        options: c,
        ..
    } = &image.source
    else {
        panic!("{:?}", image.source)
    };
    assert_eq!(reference, "127.0.0.1:5000/tools/busybox:1.36");
    assert_eq!(c.command, ["/bin/env"]);
    assert_eq!(c.workdir, "/srv");
    assert_eq!(c.user, "65534:65534");
    assert!(c.read_only);
    assert_eq!(c.capabilities, ["NET_RAW", "SYS_TIME"]);
    assert_eq!(c.grace_period, Some(3));
    assert!(
        matches!(&artifact.source, MemberSource::Artifact { reference, digest } if !reference.starts_with("oci://") && digest.is_empty()),
        "{:?}",
        artifact.source
    );
    assert_eq!(p.spec.runtimes(), ["runc", "wasm"]);
}

#[test]
fn container_member_mistakes_point_at_the_field() {
    let dir = wasm_dir();
    let pod = |member: &str| format!("kind = \"Pod\"\nname = \"p\"\n\n[[members]]\n{member}\n");
    let e = first_error(
        dir.path(),
        &pod("wasm = \"hello.wasm\"\nimage = \"h.io/a:1\""),
    );
    assert!(
        e.contains("hello.toml:6:9") && e.contains("not both"),
        "{e}"
    );
    let e = first_error(dir.path(), &pod("args = [\"x\"]"));
    assert!(
        e.contains("hello.toml:4:1") && e.contains("image = "),
        "{e}"
    );
    let e = first_error(dir.path(), &pod("wasm = \"hello.wasm\"\nread_only = true"));
    assert!(
        e.contains("hello.toml:6:13") && e.contains("container members only"),
        "{e}"
    );
    for (bad, why) in [
        ("busybox:1", "no registry host"),
        ("h.io/Busybox:1", "invalid repository"),
        ("h.io/busybox", "needs a :TAG"),
        ("h.io/busybox:bad tag", "invalid tag"),
        ("h.io/busybox@sha256:abc", "malformed sha256"),
    ] {
        let e = first_error(dir.path(), &pod(&format!("image = \"{bad}\"")));
        assert!(
            e.contains("hello.toml:5:9") && e.contains(why),
            "{bad}: {e}"
        );
        assert!(e.contains("HOST[:PORT]/REPO"), "{e}");
    }
    let e = first_error(dir.path(), &pod("wasm = \"oci://nohost\""));
    assert!(
        e.contains("no registry host") && e.contains("oci://HOST"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        &pod("image = \"h.io/a:1\"\ncapabilities = [\"FLY\"]"),
    );
    assert!(e.contains("'FLY' is not a Linux capability"), "{e}");
    let e = first_error(
        dir.path(),
        &pod("image = \"h.io/a:1\"\ngrace_period = 3600"),
    );
    assert!(
        e.contains("grace_period of 3600 s is over the cluster's maximum of 300 s"),
        "{e}"
    );
    let e = first_error(dir.path(), &pod("image = \"h.io/a:1\"\ngrace = 3"));
    assert!(
        e.contains("unknown field") && e.contains("grace_period"),
        "{e}"
    );
}

#[test]
fn ports_in_three_forms_and_their_mistakes() {
    let dir = wasm_dir();
    let text = "kind = \"Pod\"\nname = \"p\"\n\n[[members]]\nwasm = \"hello.wasm\"\nports = [8080, \"53/udp\", { port = 9090, name = \"metrics\" }]\n";
    let objs = parse_in(dir.path(), text).unwrap();
    let Object::Pod(p) = &objs[0] else { panic!() };
    let ports: Vec<(u16, Protocol, &str)> = p.spec.members[0]
        .ports
        .iter()
        .map(|p| (p.port, p.protocol, p.name.as_str()))
        .collect();
    assert_eq!(
        ports,
        [
            (8080, Protocol::Tcp, ""),
            (53, Protocol::Udp, ""),
            (9090, Protocol::Tcp, "metrics")
        ]
    );
    assert!(p.spec.needs_network(), "a pod with ports gets a network");
    let plain = parse_in(
        dir.path(),
        "kind = \"Pod\"\nname = \"p\"\n[[members]]\nwasm = \"hello.wasm\"\n",
    )
    .unwrap();
    let Object::Pod(plain) = &plain[0] else {
        panic!()
    };
    assert!(
        !plain.spec.needs_network(),
        "socket-free wasm pods get none"
    );

    let pod = |ports: &str| {
        format!(
            "kind = \"Pod\"\nname = \"p\"\n\n[[members]]\nwasm = \"hello.wasm\"\nports = {ports}\n"
        )
    };
    let e = first_error(dir.path(), &pod("[70000]"));
    assert!(
        e.contains("hello.toml:6:10") && e.contains("out of range"),
        "{e}"
    );
    let e = first_error(dir.path(), &pod("[80, \"80/sctp\"]"));
    assert!(
        e.contains("hello.toml:6:14") && e.contains("unknown protocol 'sctp'"),
        "{e}"
    );
    let e = first_error(dir.path(), &pod("[{ port = 80, proto = \"udp\" }]"));
    assert!(e.contains("hello.toml:6:10") && e.contains("proto"), "{e}");
    let e = first_error(dir.path(), &pod("[true]"));
    assert!(
        e.contains("not a boolean") && e.contains("write ports = ["),
        "{e}"
    );
    // Members share the namespace: one port, one member.
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"p\"\n\n[[members]]\nname = \"a\"\nwasm = \"hello.wasm\"\nports = [80]\n\n[[members]]\nname = \"b\"\nwasm = \"hello.wasm\"\nports = [\"80/tcp\"]\n",
    );
    assert!(
        e.contains("hello.toml:12:10") && e.contains("declared twice"),
        "{e}"
    );
}

#[test]
fn services_parse_and_their_mistakes_point_at_the_field() {
    let dir = wasm_dir();
    let text = "kind = \"Service\"\nname = \"web\"\nselector = { app = \"web\" }\nports = [80, \"53/udp\", { port = 8443, target_port = 443, node_port = 30443, name = \"tls\" }]\n";
    let objs = parse_in(dir.path(), text).unwrap();
    let Object::Service(s) = &objs[0] else {
        panic!("{objs:?}")
    };
    assert_eq!(s.metadata.namespace, "default");
    assert_eq!(s.spec.selector["app"], "web");
    let p: Vec<(u16, u16, Protocol, Option<u16>)> = s
        .spec
        .ports
        .iter()
        .map(|p| (p.port, p.target(), p.protocol, p.node_port))
        .collect();
    assert_eq!(
        p,
        [
            (80, 80, Protocol::Tcp, None),
            (53, 53, Protocol::Udp, None),
            (8443, 443, Protocol::Tcp, Some(30443))
        ]
    );
    let e = first_error(
        dir.path(),
        "kind = \"Service\"\nname = \"web\"\nports = [80]\n",
    );
    assert!(
        e.contains("hello.toml:1:8") && e.contains("needs a selector"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Service\"\nname = \"web\"\nselector = { app = \"web\" }\nports = [{ port = 80, target_port = 0 }]\n",
    );
    assert!(
        e.contains("hello.toml:4:10") && e.contains("out of range"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Service\"\nname = \"web\"\nselector = { app = \"web\" }\nports = [80, \"80/tcp\"]\n",
    );
    assert!(
        e.contains("hello.toml:4:14") && e.contains("listed twice"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Service\"\nname = \"web\"\nselector = { app = \"web\" }\nports = []\n",
    );
    assert!(e.contains("at least one port"), "{e}");
    let e = first_error(dir.path(), "kind = \"Servcie\"\nname = \"web\"\n");
    assert!(e.contains("did you mean 'Service'"), "{e}");
}

#[test]
fn configmaps_volumes_mounts_and_env_references_parse_with_positions() {
    use crate::config::{EnvValue, Medium, VolumeSource};
    let dir = wasm_dir();
    let objs = parse_in(
        dir.path(),
        r#"kind = "ConfigMap"
name = "app"
data = { mode = "fast" }
binary_data = { logo = "AAEC" }
---
kind = "Pod"
name = "web"
service_links = false
[[volumes]]
name = "cfg"
config = { name = "app", items = [{ key = "mode", path = "conf/mode", mode = 0o600 }] }
[[volumes]]
name = "tmp"
empty_dir = { medium = "memory", size_limit = "8Mi" }
[[volumes]]
name = "tls"
secret = "certs"
[[members]]
wasm = "hello.wasm"
env = { A = "x", B = { secret = "db", key = "password" }, C = { field = "pod.ip" } }
env_from = [{ config = "app", prefix = "APP_" }]
mounts = [{ volume = "cfg", path = "/etc/app" }, { volume = "tmp", path = "/tmp", read_only = true }]
"#,
    )
    .unwrap();
    let Object::ConfigMap(c) = &objs[0] else {
        panic!("{:?}", objs[0])
    };
    assert_eq!(c.data["mode"], "fast");
    assert_eq!(c.binary_data["logo"], "AAEC");
    let Object::Pod(p) = &objs[1] else {
        panic!("{:?}", objs[1])
    };
    assert!(!p.spec.service_links);
    assert_eq!(p.spec.volumes.len(), 3);
    match &p.spec.volumes[0].source {
        VolumeSource::Config(o) => {
            assert_eq!(o.items[0].path, "conf/mode");
            assert_eq!(o.items[0].mode, Some(0o600));
        }
        other => panic!("{other:?}"),
    }
    match &p.spec.volumes[1].source {
        VolumeSource::EmptyDir(e) => {
            assert_eq!(e.medium, Medium::Memory);
            assert_eq!(e.size_limit.as_ref().map(|b| b.0), Some(8 << 20));
        }
        other => panic!("{other:?}"),
    }
    let m = &p.spec.members[0];
    assert_eq!(m.env["A"], EnvValue::Value("x".into()));
    assert!(matches!(&m.env["B"], EnvValue::From(r) if r.secret.as_deref() == Some("db")));
    assert_eq!(m.env_from[0].prefix, "APP_");
    assert!(m.mounts[1].read_only);
}

#[test]
fn bad_volumes_and_references_point_at_their_line() {
    let dir = wasm_dir();
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"web\"\n[[volumes]]\nname = \"v\"\nempty_dir = {}\nconfig = \"app\"\n[[members]]\nwasm = \"hello.wasm\"\n",
    );
    assert!(e.starts_with("hello.toml:3:"), "{e}");
    assert!(e.contains("exactly one of"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"web\"\n[[members]]\nwasm = \"hello.wasm\"\nenv = { PORT = 8080 }\n",
    );
    assert!(e.starts_with("hello.toml:5:"), "{e}");
    assert!(e.contains("quote it"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"ConfigMap\"\nname = \"c\"\ndata = { \"../x\" = \"1\" }\n",
    );
    assert!(e.starts_with("hello.toml:3:"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Pod\"\nname = \"web\"\n[[members]]\nwasm = \"hello.wasm\"\nenv = { X = { field = \"pod.secret\" } }\n",
    );
    assert!(e.contains("unknown field 'pod.secret'"), "{e}");
}

#[test]
fn quotas_parse_and_their_mistakes_are_placed() {
    let dir = wasm_dir();
    let objs = parse_in(
        dir.path(),
        "kind = \"Quota\"\nname = \"team\"\nnamespace = \"shop\"\npods = 10\ncpu = 2000\nmemory = \"1Gi\"\nobjects = 50\ndefault_memory = \"64Mi\"\ndefault_cpu = 100\n",
    )
    .unwrap();
    let Object::Quota(q) = &objs[0] else {
        panic!("{objs:?}")
    };
    assert_eq!(q.metadata.namespace, "shop");
    assert_eq!(q.spec.pods, Some(10));
    assert_eq!(q.spec.memory, Some(crate::quantity::Bytes(1 << 30)));
    assert_eq!(q.spec.default_cpu, Some(100));
    let e = first_error(dir.path(), "kind = \"Quota\"\nname = \"team\"\npod = 10\n");
    assert!(
        e.contains("hello.toml:3:1") && e.contains("unknown field"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Quota\"\nname = \"team\"\nmemory = \"lots\"\n",
    );
    assert!(e.contains("hello.toml:3:10"), "{e}");
}

#[test]
fn autoscalers_parse_and_their_mistakes_are_named() {
    let dir = wasm_dir();
    let objs = parse_in(
        dir.path(),
        "kind = \"Autoscaler\"\nname = \"web\"\ntarget = \"web\"\nmin = 2\nmax = 8\ncpu = 60\nscale_down_window = \"1m\"\n",
    )
    .unwrap();
    let Object::Autoscaler(a) = &objs[0] else {
        panic!()
    };
    assert_eq!((a.spec.min, a.spec.max, a.spec.cpu), (2, 8, Some(60)));
    assert_eq!(a.spec.scale_down_window, crate::probe::Millis(60_000));
    assert_eq!(a.spec.scale_up_window, crate::probe::Millis(0));
    let e = first_error(
        dir.path(),
        "kind = \"Autoscaler\"\nname = \"web\"\ntarget = \"web\"\nmin = 3\nmax = 2\ncpu = 60\n",
    );
    assert!(
        e.starts_with("hello.toml:2:8: autoscaler web: max (2) is less than min (3)"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Autoscaler\"\nname = \"web\"\ntarget = \"web\"\nmin = 1\nmax = 2\ncpus = 60\n",
    );
    assert!(
        e.contains("unknown field `cpus`") && e.contains("did you mean 'cpu'"),
        "{e}"
    );
}

#[test]
fn a_function_is_parsed_with_defaults_and_its_mistakes_point_at_them() {
    let dir = wasm_dir();
    let objs = parse_in(
        dir.path(),
        r#"kind = "Function"
name = "hello"
wasm = "hello.wasm"
routes = [{ host = "shop.example", path = "/api" }, { path = "/hello" }]
env = { GREETING = "hi" }
memory = "16Mi"
timeout = "5s"
allow_hosts = ["api.internal:8443"]
reuse_instances = true
"#,
    )
    .unwrap();
    let Object::Function(f) = &objs[0] else {
        panic!("{objs:?}")
    };
    assert!(f.spec.serve.reuse_instances);
    assert!(matches!(f.spec.source, MemberSource::Module { .. }));
    assert_eq!(f.spec.routes.len(), 2);
    assert_eq!(f.spec.routes[1].host, "");
    assert_eq!(f.spec.serve.timeout.0, 5000);
    assert_eq!(f.spec.serve.max_concurrency, 100);
    assert_eq!((f.spec.min_instances, f.spec.max_instances), (0, 1));
    assert_eq!(f.spec.port, 8080);
    let m = f.spec.member();
    assert_eq!(m.ports[0].port, 8080);
    assert_eq!(m.http.as_ref().unwrap().allow_hosts, ["api.internal:8443"]);

    let e = first_error(
        dir.path(),
        "kind = \"Function\"\nname = \"f\"\nwasm = \"hello.wasm\"\nroutes = [{ path = \"api\" }]\n",
    );
    assert!(e.starts_with("hello.toml:4:10"), "{e}");
    assert!(e.contains("must start with '/'"), "{e}");
    let e = first_error(dir.path(), "kind = \"Function\"\nname = \"f\"\n");
    assert!(e.contains("needs wasm"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Function\"\nname = \"f\"\nwasm = \"hello.wasm\"\nmin_instances = 2\n",
    );
    assert!(
        e.contains("min_instances = 2 is more than max_instances = 1"),
        "{e}"
    );
    let e = first_error(
        dir.path(),
        "kind = \"Function\"\nname = \"f\"\nwasm = \"hello.wasm\"\nroute = []\n",
    );
    assert!(e.contains("routes"), "{e}");
}

#[test]
fn a_plugin_is_cluster_scoped_and_its_mistakes_point_at_them() {
    let dir = wasm_dir();
    let objs = parse_in(
        dir.path(),
        r#"kind = "Plugin"
name = "require-labels"
wasm = "hello.wasm"
hook = "admission"
selector = { kinds = ["pods", "Deployment"], namespaces = ["prod"] }
failure_policy = "Ignore"
timeout = "50ms"
config = { REQUIRED = "team" }
"#,
    )
    .unwrap();
    let Object::Plugin(p) = &objs[0] else {
        panic!("{objs:?}")
    };
    assert_eq!(p.metadata.namespace, "");
    assert_eq!(objs[0].key(), "plugins/require-labels");
    assert_eq!(p.spec.hook, crate::plugin::Hook::Admission);
    assert_eq!(
        p.spec.selector.kinds,
        [crate::Kind::Pod, crate::Kind::Deployment]
    );
    assert_eq!(p.spec.failure_policy, crate::plugin::FailurePolicy::Ignore);
    assert_eq!(p.spec.timeout.0, 50);
    assert_eq!(p.spec.fuel, crate::plugin::DEFAULT_FUEL);
    assert_eq!(p.spec.config["REQUIRED"], "team");

    let e = first_error(
        dir.path(),
        "kind = \"Plugin\"\nname = \"p\"\nnamespace = \"prod\"\nwasm = \"hello.wasm\"\nhook = \"admission\"\n",
    );
    assert!(e.starts_with("hello.toml:3:13"), "{e}");
    assert!(e.contains("cluster-scoped"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Plugin\"\nname = \"p\"\nwasm = \"hello.wasm\"\nhook = \"admission\"\nselector = { kinds = [\"pods\", \"widgets\"] }\n",
    );
    assert!(e.starts_with("hello.toml:5:31"), "{e}");
    assert!(e.contains("unknown kind 'widgets'"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Plugin\"\nname = \"p\"\nwasm = \"hello.wasm\"\nhook = \"scheduler\"\nselector = { kinds = [\"Service\"] }\n",
    );
    assert!(e.starts_with("hello.toml:5:12"), "{e}");
    assert!(e.contains("places pods"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Plugin\"\nname = \"p\"\nhook = \"admission\"\n",
    );
    assert!(e.contains("needs wasm"), "{e}");
    let e = first_error(
        dir.path(),
        "kind = \"Plugin\"\nname = \"p\"\nwasm = \"hello.wasm\"\nhook = \"webhook\"\n",
    );
    assert!(e.starts_with("hello.toml:4:8"), "{e}");
}

#[test]
fn a_member_asks_for_host_interfaces_and_their_mistakes_point_at_the_field() {
    let dir = wasm_dir();
    let text = r#"kind = "Pod"
name = "tally"

[[members]]
wasm = "hello.wasm"
wasi = { config = ["counter-config"], keyvalue = ["counters"], logging = true }
"#;
    let objs = parse_in(dir.path(), text).unwrap();
    let Object::Pod(p) = &objs[0] else { panic!() };
    let w = &p.spec.members[0].wasi;
    assert_eq!(w.config, ["counter-config"]);
    assert_eq!(w.keyvalue, ["counters"]);
    assert!(w.logging);
    // Its ConfigMap is an input the node is sent and the pod waits for.
    assert!(
        crate::config::input_keys(&p.spec, "default").contains("configmaps/default/counter-config")
    );
    let bad = text.replace("[\"counters\"]", "[\"Counters\"]");
    let e = first_error(dir.path(), &bad);
    assert!(
        e.starts_with("hello.toml:6:") && e.contains("bucket name 'Counters'"),
        "{e}"
    );
    let unknown = text.replace("logging = true", "logs = true");
    let e = first_error(dir.path(), &unknown);
    assert!(e.starts_with("hello.toml:6:") && e.contains("logs"), "{e}");
    let container = r#"kind = "Pod"
name = "c"

[[members]]
image = "127.0.0.1:5000/busybox:1"
wasi = { logging = true }
"#;
    let e = first_error(dir.path(), container);
    assert!(
        e.starts_with("hello.toml:6:") && e.contains("for wasm members"),
        "{e}"
    );
}
