//! API access control, end to end: the real binary over HTTPS.

mod common;

use common::*;
use flotilla_samples as samples;
use flotilla_scheduler::pki::ClusterCa;
use std::time::Duration;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `flotilla --token T args…`
fn as_token(up: &Up, token: &str, args: &[&str]) -> std::process::Output {
    up.command()
        .arg("--token")
        .arg(token)
        .args(args)
        .output()
        .unwrap()
}

fn token(up: &Up, args: &[&str]) -> String {
    let mut a = vec!["token", "create"];
    a.extend_from_slice(args);
    up.ok(&a).trim().to_string()
}

/// Writes a client config with the given CA and client certificate.
fn config_with(
    up: &Up,
    name: &str,
    ca_pem: &str,
    cert: Option<(&str, &str)>,
) -> std::path::PathBuf {
    let mut ctx = format!(
        "current_context = \"c\"\n[[contexts]]\nname = \"c\"\nserver = \"{}\"\nca = '''\n{}'''\n",
        up.url, ca_pem
    );
    if let Some((c, k)) = cert {
        ctx.push_str(&format!(
            "client_cert = '''\n{c}'''\nclient_key = '''\n{k}'''\n"
        ));
    }
    let p = up.dir.path().join(name);
    std::fs::write(&p, ctx).unwrap();
    p
}

fn cli_with_config(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .env("FLOTILLA_CONFIG", config)
        .env_remove("FLOTILLA_SERVER")
        .env_remove("FLOTILLA_TOKEN")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn roles_allow_and_deny_representative_verbs() {
    let up = Up::start();
    let m = up.manifest(
        "p.toml",
        &pod("p", samples::HELLO_P1, "restart = \"Never\""),
    );
    let team = up.manifest(
        "t.toml",
        &pod("t", samples::HELLO_P1, "restart = \"Never\"")
            .replace("name = \"t\"\n", "name = \"t\"\nnamespace = \"team\"\n"),
    );
    up.ok(&["apply", "-f", &m]);

    let view = token(&up, &["--role", "view", "--ttl", "1h"]);
    let edit = token(&up, &["--role", "edit", "-n", "team"]);
    let admin = token(&up, &["--role", "admin"]);
    assert!(view.starts_with("flt_"));

    // view: reads, never writes.
    assert!(as_token(&up, &view, &["get", "pods"]).status.success());
    assert!(as_token(&up, &view, &["logs", "p"]).status.success());
    let o = as_token(&up, &view, &["apply", "-f", &team]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(
            "may not change pods in namespace team: needs role edit or admin (403 Forbidden)"
        ),
        "{}",
        stderr(&o)
    );
    let o = as_token(&up, &view, &["delete", "pod", "p"]);
    assert!(
        stderr(&o).contains("needs role edit or admin (403 Forbidden)"),
        "{}",
        stderr(&o)
    );
    let o = as_token(&up, &view, &["token", "list"]);
    assert!(stderr(&o).contains("403"), "{}", stderr(&o));

    // edit: workloads in its namespaces only.
    let o = as_token(&up, &edit, &["apply", "-f", &team]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        as_token(&up, &edit, &["-n", "team", "get", "pods"])
            .status
            .success()
    );
    let o = as_token(&up, &edit, &["delete", "pod", "p"]);
    assert!(
        stderr(&o).contains("cover namespaces team (403 Forbidden)"),
        "{}",
        stderr(&o)
    );
    let o = as_token(&up, &edit, &["get", "pods", "-n", "default"]);
    assert!(!o.status.success());
    assert!(
        as_token(&up, &edit, &["nodes"]).status.success(),
        "edit may read nodes"
    );
    let o = as_token(&up, &edit, &["delete", "node", "local"]);
    assert!(stderr(&o).contains("needs role admin"), "{}", stderr(&o));
    let o = as_token(&up, &edit, &["token", "create", "--role", "admin"]);
    assert!(stderr(&o).contains("403"), "{}", stderr(&o));

    // admin: everything, including tokens.
    let listed = String::from_utf8(as_token(&up, &admin, &["token", "list"]).stdout).unwrap();
    // Three tokens and `up`'s admin certificate, under a header.
    assert_eq!(listed.lines().count(), 5, "{listed}");
    assert_eq!(
        listed.matches("certificate of admin").count(),
        1,
        "{listed}"
    );
    assert!(
        !listed.contains(view.rsplit('_').next().unwrap()),
        "secrets never listed"
    );
    assert!(
        as_token(&up, &admin, &["delete", "pod", "p"])
            .status
            .success()
    );
}

#[test]
fn expired_revoked_and_missing_credentials_are_refused() {
    let up = Up::start();
    let short = token(&up, &["--role", "view", "--ttl", "1s"]);
    let revoked = token(&up, &["--role", "view"]);
    assert!(as_token(&up, &revoked, &["get", "pods"]).status.success());
    let id = revoked
        .trim_start_matches("flt_")
        .split('_')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        up.ok(&["token", "revoke", &id]),
        format!("token {id} revoked\n")
    );
    let o = as_token(&up, &revoked, &["get", "pods"]);
    assert!(
        stderr(&o).contains("has been revoked (401 Unauthorized)"),
        "{}",
        stderr(&o)
    );
    std::thread::sleep(Duration::from_millis(1500));
    let o = as_token(&up, &short, &["get", "pods"]);
    assert!(stderr(&o).contains("has expired"), "{}", stderr(&o));
    let list = up.ok(&["token", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains(&id) && l.contains("revoked")),
        "{list}"
    );
    assert!(list.lines().any(|l| l.contains("expired")), "{list}");

    // No credentials at all: a config with only the CA.
    let ca = std::fs::read_to_string(up.data_dir().join("pki/ca.pem")).unwrap();
    let bare = config_with(&up, "bare.toml", &ca, None);
    let o = cli_with_config(&bare, &["get", "pods"]);
    assert!(
        stderr(&o).contains("no credentials") && stderr(&o).contains("401"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn foreign_certificates_and_mismatched_servers_are_refused() {
    let up = Up::start();
    let dir = tempfile::tempdir().unwrap();
    let foreign = ClusterCa::load_or_create(dir.path()).unwrap();
    let ours = std::fs::read_to_string(up.data_dir().join("pki/ca.pem")).unwrap();

    // A client certificate from another CA: the TLS handshake fails.
    let cert = foreign
        .issue_user(
            "mallory",
            flotilla_api::Role::Admin,
            &[],
            Duration::from_secs(3600),
        )
        .unwrap();
    let cfg = config_with(
        &up,
        "foreign-cert.toml",
        &ours,
        Some((&cert.cert_pem, &cert.key_pem)),
    );
    let o = cli_with_config(&cfg, &["get", "pods"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("TLS") || stderr(&o).contains("connection"),
        "{}",
        stderr(&o)
    );

    // The CLI trusts only the CA in its config: another cluster's server is refused.
    let cfg = config_with(&up, "foreign-ca.toml", foreign.cert_pem(), None);
    let o = cli_with_config(&cfg, &["get", "pods"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("UnknownIssuer"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("signed by the CA in your client config"),
        "{}",
        stderr(&o)
    );

    // Certificates from our CA work, and carry their role.
    let ca = ClusterCa::load_or_create(&up.data_dir().join("pki")).unwrap();
    let viewer = ca
        .issue_user(
            "vera",
            flotilla_api::Role::View,
            &[],
            Duration::from_secs(3600),
        )
        .unwrap();
    let cfg = config_with(
        &up,
        "vera.toml",
        &ours,
        Some((&viewer.cert_pem, &viewer.key_pem)),
    );
    assert!(cli_with_config(&cfg, &["get", "pods"]).status.success());
    let o = cli_with_config(&cfg, &["delete", "pod", "x"]);
    assert!(
        stderr(&o).contains("vera (role view) may not change pods"),
        "{}",
        stderr(&o)
    );

    // An agent's identity is limited to its own node.
    let node = ca.issue_agent("local").unwrap();
    let cfg = config_with(
        &up,
        "node.toml",
        &ours,
        Some((&node.cert_pem, &node.key_pem)),
    );
    assert!(
        cli_with_config(&cfg, &["get", "node", "local"])
            .status
            .success()
    );
    let o = cli_with_config(&cfg, &["get", "pods"]);
    assert!(
        stderr(&o).contains("node local may only read its own Node"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn secret_values_are_hidden_from_view() {
    let up = Up::start();
    let s = up.manifest(
        "s.toml",
        "kind = \"Secret\"\nname = \"db\"\ndata = { password = \"hunter2\" }\n",
    );
    assert_eq!(up.ok(&["apply", "-f", &s]), "secret/db created\n");
    let admin_view = up.ok(&["get", "secret", "db", "-o", "json"]);
    assert!(admin_view.contains("hunter2"));
    let view = token(&up, &["--role", "view"]);
    let o = as_token(&up, &view, &["get", "secrets", "-o", "json"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("\"password\": \"<hidden>\""), "{text}");
}

#[test]
fn mutations_are_audited() {
    let up = Up::start();
    let m = up.manifest(
        "p.toml",
        &pod("p", samples::HELLO_P1, "restart = \"Never\""),
    );
    up.ok(&["apply", "-f", &m]);
    up.ok(&["delete", "pod", "p"]);
    let view = token(&up, &["--role", "view"]);
    let _ = as_token(&up, &view, &["apply", "-f", &m]);
    up.ok(&["get", "pods"]);
    up.ok(&["get", "secrets"]);
    let audit = std::fs::read_to_string(up.data_dir().join("audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |method: &str, path: &str, status: u64| {
        lines
            .iter()
            .find(|l| l["method"] == method && l["path"] == path && l["status"] == status)
            .cloned()
    };
    let applied = find("POST", "/v1/apply", 200).expect("apply audited");
    assert_eq!(applied["who"], "admin (role admin)");
    assert_eq!(applied["objects"], serde_json::json!(["pod default/p"]));
    assert!(applied["time_ms"].as_u64().unwrap() > 0);
    assert!(
        find("DELETE", "/v1/pods/default/p", 200).is_some(),
        "{audit}"
    );
    let denied = find("POST", "/v1/apply", 403).expect("denied apply audited");
    assert!(denied["who"].as_str().unwrap().starts_with("token:"));
    assert!(find("POST", "/v1/tokens", 200).is_some());
    assert!(
        !lines
            .iter()
            .any(|l| l["method"] == "GET" && l["path"] != "/v1/secrets"),
        "reads are not audited, but for secrets"
    );
    assert!(
        find("GET", "/v1/secrets", 200).is_some(),
        "secret reads are audited: {audit}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(up.data_dir().join("audit.log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn oversized_bodies_no_credentials_and_brute_force_over_plain_http() {
    let up = Up::start_with(&["--insecure-http"]);
    let auth = format!("Bearer {}", up.admin_token());
    // A body declared larger than the limit is answered 413 before it is
    // sent: the headers alone get the answer.
    let status = raw_post_head(&up.url, "/v1/apply", &auth, 9 << 20);
    assert!(
        status.starts_with("HTTP/1.1 413"),
        "expected 413 for a 9 MiB declared body, got {status:?}"
    );
    match ureq::get(&format!("{}/v1/pods", up.url)).call() {
        Err(ureq::Error::Status(401, r)) => {
            assert!(r.into_string().unwrap().contains("no credentials"))
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // Repeated bad tokens from one peer are slowed down.
    let mut codes = Vec::new();
    for _ in 0..12 {
        let r = ureq::get(&format!("{}/v1/pods", up.url))
            .set("authorization", "Bearer flt_0000_nope")
            .call();
        codes.push(match r {
            Err(ureq::Error::Status(c, _)) => c,
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(&codes[..10], &[401; 10]);
    assert_eq!(codes[11], 429);
    // Plain HTTP is refused off loopback.
    let o = std::process::Command::new(BIN)
        .args([
            "up",
            "--insecure-http",
            "--api",
            "0.0.0.0:0",
            "--quic",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(up.dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("plain HTTP is allowed on loopback only"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn client_config_contexts() {
    let up = Up::start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(up.config()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the admin config holds a key");
    let view = up.ok(&["config", "view"]);
    assert!(view.contains("client_key = \"REDACTED\""), "{view}");
    assert!(!view.contains("PRIVATE KEY"), "{view}");
    // A second context, switched to and back.
    let mut text = std::fs::read_to_string(up.config()).unwrap();
    text.push_str(
        "\n[[contexts]]\nname = \"other\"\nserver = \"https://127.0.0.1:1\"\nca = \"x\"\n",
    );
    std::fs::write(up.config(), text).unwrap();
    let contexts = up.ok(&["config", "get-contexts"]);
    assert!(
        contexts
            .lines()
            .any(|l| l.starts_with("*") && l.contains("local")),
        "{contexts}"
    );
    assert_eq!(
        up.ok(&["config", "use-context", "other"]),
        "switched to context other\n"
    );
    assert!(!up.cli(&["get", "pods"]).status.success());
    assert!(
        up.ok(&["--context", "local", "get", "nodes"])
            .contains("local")
    );
    up.ok(&["config", "use-context", "local"]);
    up.ok(&["get", "nodes"]);
    let o = up.cli(&["config", "use-context", "nope"]);
    assert!(
        stderr(&o).contains("no context named 'nope'"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn admins_issue_user_certificates_as_client_configs() {
    let up = Up::start();
    let out = up.dir.path().join("vera.toml");
    let msg = up.ok(&[
        "user",
        "create",
        "vera",
        "--role",
        "view",
        "--ttl",
        "1d",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        msg.contains("wrote a client config for vera (role view)"),
        "{msg}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(cli_with_config(&out, &["get", "pods"]).status.success());
    let o = cli_with_config(&out, &["delete", "pod", "x"]);
    assert!(
        stderr(&o).contains("vera (role view) may not change pods"),
        "{}",
        stderr(&o)
    );
    // Only admins mint credentials.
    let o = cli_with_config(
        &out,
        &[
            "user",
            "create",
            "eve",
            "--role",
            "admin",
            "--out",
            "/tmp/never-written.toml",
        ],
    );
    assert!(stderr(&o).contains("needs role admin"), "{}", stderr(&o));
    assert!(!std::path::Path::new("/tmp/never-written.toml").exists());

    // Issue 14 item 4: the certificate is recorded under its serial, listed,
    // and revocable; revoked, it is refused at the next request.
    let serial = msg
        .split("certificate ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    assert_eq!(serial.len(), 18, "{msg}");
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&up.ok(&["token", "list", "-o", "json"])).unwrap();
    let rec = list.iter().find(|t| t["id"] == serial.as_str()).unwrap();
    assert_eq!(rec["certificate_for"], "vera");
    assert_eq!(rec["role"], "view");
    assert!(up.ok(&["token", "list"]).contains("certificate of vera"));
    // `up`'s own admin certificate is recorded too.
    assert!(
        list.iter().any(|t| t["certificate_for"] == "admin"),
        "{list:?}"
    );
    // A record is no bearer token, whatever secret is guessed.
    let o = as_token(&up, &format!("flt_{serial}_guess"), &["get", "pods"]);
    assert!(stderr(&o).contains("unknown token"), "{}", stderr(&o));
    assert!(
        up.ok(&["token", "revoke", &serial])
            .contains(&format!("certificate {serial} of vera revoked"))
    );
    let o = cli_with_config(&out, &["get", "pods"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "client certificate {serial} of user vera has been revoked"
        )),
        "{}",
        stderr(&o)
    );
    // Other certificates (the admin's) are untouched.
    assert!(up.cli(&["get", "nodes"]).status.success());
}

/// Sends only the head of a POST declaring a `len`-byte body and returns the
/// status line of the answer.
fn raw_post_head(base: &str, path: &str, auth: &str, len: usize) -> String {
    use std::io::{BufRead, BufReader, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}
