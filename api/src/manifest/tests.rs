use super::*;
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
    assert!(Path::new(&m.wasm).is_absolute());
    assert!(m.digest.starts_with("sha256:"));
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
fn unknown_field_names_position_and_suggestion() {
    let dir = wasm_dir();
    let text = "kind = \"Deployment\"\nname = \"web\"\nreplcas = 3\n";
    let e = first_error(dir.path(), text);
    assert_eq!(
        e,
        "hello.toml:3:1: unknown field `replcas`, expected one of `kind`, `name`, `namespace`, `labels`, `replicas`, `template` — did you mean 'replicas'?"
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
