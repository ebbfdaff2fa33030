//! The control plane on etcd, through the real binary: `flotilla up
//! --store etcd://…` keeps its objects in etcd (Debian's `etcd-server`, on
//! loopback), `flotilla store migrate` moves a redb store there, and TLS
//! with client certificates to etcd works and fails clearly without one.

mod common;

use common::{Up, deployment, wait_until};
use flotilla_samples as samples;
use flotilla_scheduler::store::{LocalEtcd, MemberTls};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

fn running(up: &Up, prefix: &str) -> usize {
    up.pods()
        .iter()
        .filter(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
                && p["status"]["phase"] == "Running"
        })
        .count()
}

#[test]
fn a_cluster_on_etcd_keeps_its_objects_there_across_restarts() {
    let etcd_dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(etcd_dir.path());
    let url = etcd.url();
    let mut up = Up::start_with(&["--store", &url]);
    let m = up.manifest("web.toml", &deployment("web", 2, samples::COUNTER_P2, ""));
    up.ok(&["apply", "-f", &m]);
    up.ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal",
        "mode=fast",
    ]);
    up.ok(&["create", "configmap", "other", "--from-literal", "a=b"]);
    wait_until(LONG, "2 web pods Running", || running(&up, "web-") == 2);
    // Nothing went to the embedded store.
    assert!(!up.data_dir().join("store.redb").exists());

    // Restarted, the scheduler loads everything from etcd: the same pods
    // (same uids), still Running, and the ConfigMap.
    let uids = |up: &Up| {
        let mut u: Vec<String> = up
            .pods()
            .iter()
            .map(|p| p["metadata"]["uid"].as_str().unwrap().to_string())
            .collect();
        u.sort();
        u
    };
    let before = uids(&up);
    up.stop();
    up.spawn();
    wait_until(LONG, "2 web pods Running again", || {
        running(&up, "web-") == 2
    });
    assert_eq!(uids(&up), before);
    let out = up.ok(&["get", "configmaps"]);
    assert!(out.contains("settings") && out.contains("other"), "{out}");
}

#[test]
fn migrate_copies_a_redb_store_into_etcd_and_the_cluster_carries_on() {
    let etcd_dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(etcd_dir.path());
    let url = etcd.url();
    let mut up = Up::start();
    let m = up.manifest("web.toml", &deployment("web", 2, samples::COUNTER_P2, ""));
    up.ok(&["apply", "-f", &m]);
    up.ok(&[
        "create",
        "secret",
        "db",
        "--from-literal",
        "password=hunter2",
    ]);
    wait_until(LONG, "2 web pods Running", || running(&up, "web-") == 2);
    let deployment: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "deployment", "web", "-o", "json"])).unwrap();
    up.stop();

    let data = up.data_dir();
    let migrate = |up: &Up| {
        up.ok(&[
            "store",
            "migrate",
            "--data-dir",
            data.to_str().unwrap(),
            "--store",
            &url,
        ])
    };
    let out = migrate(&up);
    assert!(
        out.starts_with("copied ") && out.contains("(0 already there"),
        "{out}"
    );
    let copied: usize = out["copied ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(copied >= 5, "pods, deployment, secret, node, …: {out}");
    // Again: nothing left to copy.
    let out = migrate(&up);
    assert!(
        out.starts_with("copied 0 ") && out.contains(&format!("({copied} already there")),
        "{out}"
    );
    // Into etcd only: migrate refuses redb as a target.
    let bad = up.cli(&["store", "migrate", "--data-dir", data.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--store etcd://"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // The same data dir, now on etcd: the objects kept their identity.
    std::fs::rename(data.join("store.redb"), data.join("store.redb.migrated")).unwrap();
    up.set_extra(&["--store", &url]);
    up.spawn();
    wait_until(LONG, "2 web pods Running on etcd", || {
        running(&up, "web-") == 2
    });
    let after: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "deployment", "web", "-o", "json"])).unwrap();
    assert_eq!(after["metadata"]["uid"], deployment["metadata"]["uid"]);
    assert_eq!(
        after["metadata"]["created_ms"],
        deployment["metadata"]["created_ms"]
    );
    let secret = up.ok(&["get", "secret", "db", "-o", "json"]);
    assert!(secret.contains("hunter2"), "{secret}");
    assert!(!data.join("store.redb").exists());
}

#[test]
fn etcd_over_tls_needs_the_client_certificate_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // One CA signs the member's certificate (for 127.0.0.1) and the client's.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into()],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["flotilla".into()],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let ca_pem = write("ca.pem", &ca.pem());
    let tls = MemberTls {
        cert: write("server.pem", &server_cert),
        key: write("server.key", &server_key),
        client_ca: ca_pem.clone(),
    };
    let etcd_dir = dir.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let etcd = LocalEtcd::start_tls(&etcd_dir, tls);
    let url = etcd.url();
    let (cert, key) = (
        write("client.pem", &client_cert),
        write("client.key", &client_key),
    );

    // Without a client certificate the scheduler does not start, and says
    // why (etcd refused, at which address).
    let data = dir.path().join("refused");
    let out = std::process::Command::new(common::BIN)
        .args(["scheduler", "--api", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .args(["--store", &url, "--etcd-ca", ca_pem.to_str().unwrap()])
        .arg("--data-dir")
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot use the etcd store at {}", etcd.endpoint())),
        "{err}"
    );

    // With it, a whole cluster runs on the TLS store.
    let up = Up::start_with(&[
        "--store",
        &url,
        "--etcd-ca",
        ca_pem.to_str().unwrap(),
        "--etcd-cert",
        cert.to_str().unwrap(),
        "--etcd-key",
        key.to_str().unwrap(),
    ]);
    up.ok(&["create", "configmap", "over-tls", "--from-literal", "a=b"]);
    let out = up.ok(&["get", "configmaps"]);
    assert!(out.contains("over-tls"), "{out}");
}
