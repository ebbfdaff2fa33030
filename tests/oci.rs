//! Images against a real registry (Debian's docker-registry on 127.0.0.1):
//! pulls by tag and digest, basic and token auth, platform indexes, corrupt
//! and oversized blobs, hostile layers.

mod common;

use common::registry::{
    Auth, Layer, OCI_CONFIG, OCI_LAYER_GZIP, PASSWORD, Registry, USER, busybox_layer, image_config,
};
use flotilla_host::image::{
    ImageError, ImageKind, ImageStore, Platform, Progress, RegistryConfig, RegistryCreds,
};
use std::collections::HashSet;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A store as `flotilla pull|push` opens it (the operator names the
/// reference, so an unlisted loopback registry is reachable), with `creds`
/// for one registry.
fn store(dir: &std::path::Path, creds: Option<(&str, RegistryCreds)>) -> ImageStore {
    let mut cfg = RegistryConfig {
        trust_loopback: true,
        ..RegistryConfig::default()
    };
    if let Some((host, c)) = creds {
        cfg.registry.insert(host.to_string(), c);
    }
    ImageStore::open(dir, cfg).unwrap()
}

/// Issue 14 item 12: a node's store (as `flotilla host` and `up` open it)
/// pulls from a loopback registry only when its registry config lists it —
/// a manifest naming `127.0.0.1:PORT/…` or `localhost:PORT/…` cannot point
/// the node at its own local services — and nothing is requested then.
#[test]
fn a_node_pulls_from_a_loopback_registry_only_when_its_config_lists_it() {
    let reg = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let pusher = store(&dir.path().join("push"), None);
    let port = reg.addr.rsplit_once(':').unwrap().1.to_string();
    rt().block_on(async {
        let reference = format!("{}/tools/busybox:1", reg.addr);
        push_busybox(&pusher, &reference, None).await;
        let before = reg.log().matches("/v2/tools/busybox/manifests/").count();

        let node = ImageStore::open(dir.path().join("node"), RegistryConfig::default()).unwrap();
        for r in [
            reference.clone(),
            format!("localhost:{port}/tools/busybox:1"),
        ] {
            let e = refusal(&node, &r).await;
            assert!(
                e.contains("is on loopback; a manifest cannot name a registry on the node itself")
                    && e.contains("--registry-config"),
                "{r}: {e}"
            );
        }
        assert_eq!(
            reg.log().matches("/v2/tools/busybox/manifests/").count(),
            before,
            "no request reached the registry"
        );
        assert!(node.content().list().unwrap().is_empty());

        let listed = ImageStore::open(dir.path().join("listed"), reg.config()).unwrap();
        let rec = listed
            .pull(&reference, &Platform::host(), &mut no_progress())
            .await
            .unwrap();
        assert_eq!(rec.kind, ImageKind::Container);
        assert!(reg.log().matches("/v2/tools/busybox/manifests/").count() > before);
    });
}

fn basic(user: &str, pass: &str) -> RegistryCreds {
    RegistryCreds {
        username: Some(user.into()),
        password: Some(pass.into()),
        ..Default::default()
    }
}

/// Pulls `reference`, which must fail; returns the error's text.
async fn refusal(s: &ImageStore, reference: &str) -> String {
    s.pull(reference, &Platform::host(), &mut no_progress())
        .await
        .unwrap_err()
        .to_string()
}

fn no_progress() -> impl FnMut(Progress) + Send {
    |_| {}
}

async fn push_busybox(s: &ImageStore, reference: &str, extra: Option<Vec<u8>>) -> String {
    let mut layers = vec![(OCI_LAYER_GZIP.to_string(), busybox_layer())];
    if let Some(l) = extra {
        layers.push((OCI_LAYER_GZIP.to_string(), l));
    }
    s.push_layers(
        reference,
        (
            OCI_CONFIG,
            image_config(&[], &["/bin/sh"], &["PATH=/bin"], "/"),
        ),
        layers,
    )
    .await
    .unwrap()
}

#[test]
fn pull_by_tag_and_digest_stores_shared_layers_once() {
    let reg = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let pusher = store(&dir.path().join("push"), None);
    let s = store(&dir.path().join("pull"), None);
    rt().block_on(async {
        let a = format!("{}/tools/busybox:1", reg.addr);
        let b = format!("{}/tools/app:2", reg.addr);
        let digest_a = push_busybox(&pusher, &a, None).await;
        let app_layer = Layer::new().file("app/hello.txt", 0o644, b"hello\n").gzip();
        let digest_b = push_busybox(&pusher, &b, Some(app_layer)).await;

        let mut events = Vec::new();
        let rec = s
            .pull(&a, &Platform::host(), &mut |p| events.push(p))
            .await
            .unwrap();
        assert_eq!(rec.digest, digest_a);
        assert_eq!(rec.kind, ImageKind::Container);
        assert_eq!(rec.layers.len(), 1);
        assert!(
            events.iter().any(|e| matches!(e, Progress::Blob { done, size, .. } if done == size && *size > 1_000_000)),
            "progress reported the busybox layer"
        );
        let blobs_after_a = s.content().list().unwrap();
        // manifest + config + layer
        assert_eq!(blobs_after_a.len(), 3);

        // By digest, from another tag's repository path: same record.
        let by_digest = format!("{}/tools/busybox@{digest_a}", reg.addr);
        let rec2 = s.pull(&by_digest, &Platform::host(), &mut no_progress()).await.unwrap();
        assert_eq!(rec2.digest, digest_a);
        assert!(s.local(&by_digest).unwrap().is_some());

        // The second image shares the busybox layer: it is not fetched again.
        let mut cached = Vec::new();
        let rec_b = s
            .pull(&b, &Platform::host(), &mut |p| {
                if let Progress::Cached { digest, .. } = p {
                    cached.push(digest)
                }
            })
            .await
            .unwrap();
        assert_eq!(rec_b.digest, digest_b);
        // Same config and busybox layer: stored once.
        assert_eq!(cached, vec![rec.config.digest.clone(), rec.layers[0].digest.clone()]);
        assert_eq!(s.content().list().unwrap().len(), 5, "+ b's manifest and app layer");

        let root = s.rootfs(&rec_b).unwrap();
        assert!(root.join("bin/busybox").is_file());
        assert_eq!(std::fs::read(root.join("app/hello.txt")).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
        let rc = s.run_config(&rec_b).unwrap();
        assert_eq!(rc.cmd, vec!["/bin/sh"]);
        assert_eq!(rc.env, vec!["PATH=/bin"]);

        // A tag that does not exist.
        let err = s
            .pull(&format!("{}/tools/busybox:nope", reg.addr), &Platform::host(), &mut no_progress())
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::Registry { .. }), "{err}");

        // Prune keeps what is in use and frees the rest.
        let pruned = s.prune(&HashSet::from([a.clone()])).unwrap();
        assert_eq!(pruned.images, vec![b.clone()]);
        assert_eq!(pruned.blobs, 2, "b's manifest and app layer");
        assert!(s.local(&a).unwrap().is_some());
        assert!(s.local(&b).unwrap().is_none());
        assert!(!root.exists(), "b's unpacked filesystem went with it");
    });
}

#[test]
fn htpasswd_auth_accepts_the_right_password_and_refuses_others() {
    let reg = Registry::start(Auth::Htpasswd);
    let dir = tempfile::tempdir().unwrap();
    let reference = format!("{}/private/busybox:1", reg.addr);
    rt().block_on(async {
        let good = store(
            &dir.path().join("good"),
            Some((&reg.addr, basic(USER, PASSWORD))),
        );
        let digest = push_busybox(&good, &reference, None).await;
        let rec = good
            .pull(&reference, &Platform::host(), &mut no_progress())
            .await
            .unwrap();
        assert_eq!(rec.digest, digest);

        let anon = store(&dir.path().join("anon"), None);
        let err = refusal(&anon, &reference).await;
        assert!(err.contains("refused"), "{err}");
        let wrong = store(
            &dir.path().join("wrong"),
            Some((&reg.addr, basic(USER, "guess"))),
        );
        let err = refusal(&wrong, &reference).await;
        assert!(err.contains("refused"), "{err}");
        assert!(!err.contains("guess"), "the password is never shown: {err}");
        assert!(wrong.content().list().unwrap().is_empty());
    });
}

#[test]
fn token_auth_gets_a_bearer_token_and_refuses_bad_credentials() {
    let reg = Registry::start(Auth::Token);
    let dir = tempfile::tempdir().unwrap();
    let reference = format!("{}/team/busybox:1", reg.addr);
    rt().block_on(async {
        let good = store(
            &dir.path().join("good"),
            Some((&reg.addr, basic(USER, PASSWORD))),
        );
        let digest = push_busybox(&good, &reference, None).await;
        let other = store(
            &dir.path().join("other"),
            Some((&reg.addr, basic(USER, PASSWORD))),
        );
        let rec = other
            .pull(&reference, &Platform::host(), &mut no_progress())
            .await
            .unwrap();
        assert_eq!(rec.digest, digest);
        let (issued, _) = reg.token_counts();
        assert!(issued >= 2, "push and pull each got a token ({issued})");

        let wrong = store(
            &dir.path().join("wrong"),
            Some((&reg.addr, basic(USER, "nope"))),
        );
        let err = refusal(&wrong, &reference).await;
        assert!(err.contains("refused"), "{err}");
        assert!(!err.contains("nope"), "{err}");
        assert!(reg.token_counts().1 >= 1, "the token endpoint refused it");
        // A forged bearer token is refused by the registry itself.
        let forged = store(
            &dir.path().join("forged"),
            Some((
                &reg.addr,
                RegistryCreds {
                    token: Some("eyJhbGciOiJFUzI1NiJ9.e30.AAAA".into()),
                    ..Default::default()
                },
            )),
        );
        let err = refusal(&forged, &reference).await;
        assert!(err.contains("refused"), "{err}");
    });
}

#[test]
fn a_multi_platform_index_yields_the_wanted_platform() {
    let reg = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let pusher = store(&dir.path().join("push"), None);
    let s = store(&dir.path().join("pull"), None);
    let reference = format!("{}/multi/app:1", reg.addr);
    rt().block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut entries = Vec::new();
        for (arch, variant) in [("amd64", None), ("arm64", Some("v8")), ("arm", Some("v7"))] {
            let layer = Layer::new()
                .file(
                    "arch",
                    0o644,
                    format!("{arch}{}", variant.unwrap_or("")).as_bytes(),
                )
                .gzip();
            let tag = format!("{}/multi/app:{arch}", reg.addr);
            let d = pusher
                .push_layers(
                    &tag,
                    (OCI_CONFIG, image_config(&[], &["/arch"], &[], "/")),
                    vec![(OCI_LAYER_GZIP.to_string(), layer)],
                )
                .await
                .unwrap();
            // The manifest's size, from the registry.
            let client = oci_client::Client::new(oci_client::client::ClientConfig {
                protocol: oci_client::client::ClientProtocol::Http,
                ..Default::default()
            });
            let (raw, _) = client
                .pull_manifest_raw(
                    &tag.parse().unwrap(),
                    &oci_client::secrets::RegistryAuth::Anonymous,
                    &["application/vnd.oci.image.manifest.v1+json"],
                )
                .await
                .unwrap();
            let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
            if let Some(v) = variant {
                platform["variant"] = v.into();
            }
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": d, "size": raw.len(), "platform": platform,
            }));
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        });
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        });
        client
            .push_manifest_raw(
                &reference.parse().unwrap(),
                serde_json::to_vec(&index).unwrap(),
                "application/vnd.oci.image.index.v1+json".parse().unwrap(),
            )
            .await
            .unwrap();

        let arch_of = |rec: &flotilla_host::image::ImageRecord| {
            std::fs::read_to_string(s.rootfs(rec).unwrap().join("arch")).unwrap()
        };
        let pull_for = |platform: &'static str| {
            let (s, reference) = (&s, &reference);
            async move {
                s.pull(
                    reference,
                    &Platform::parse(platform).unwrap(),
                    &mut no_progress(),
                )
                .await
            }
        };
        let host = pull_for("linux/amd64").await.unwrap();
        assert_eq!(arch_of(&host), "amd64");
        assert!(host.index_digest.is_some());
        assert_eq!(
            arch_of(&pull_for("linux/arm64/v8").await.unwrap()),
            "arm64v8"
        );
        assert_eq!(arch_of(&pull_for("linux/arm/v7").await.unwrap()), "armv7");
        let err = pull_for("linux/s390x").await.unwrap_err();
        match err {
            ImageError::NoPlatform { available, .. } => {
                assert_eq!(available, "linux/amd64, linux/arm64/v8, linux/arm/v7")
            }
            other => panic!("{other}"),
        }
        let err = pull_for("linux/arm/v6").await.unwrap_err();
        assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
    });
}

#[test]
fn corrupt_and_wrong_size_blobs_are_refused_and_leave_nothing() {
    let reg = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let pusher = store(&dir.path().join("push"), None);
    let s = store(&dir.path().join("pull"), None);
    rt().block_on(async {
        // Corrupt: same length, different bytes.
        let corrupt = format!("{}/bad/corrupt:1", reg.addr);
        let layer = Layer::new().file("data", 0o644, &[7u8; 4096]).gzip();
        let layer_digest = flotilla_host::executor::wasm::runtime::digest_of(&layer);
        push_layers(&pusher, &corrupt, layer.clone()).await;
        let f = reg.blob_file(&layer_digest);
        let mut bytes = std::fs::read(&f).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        std::fs::write(&f, &bytes).unwrap();
        let err = s
            .pull(&corrupt, &Platform::host(), &mut no_progress())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("corrupt") || msg.contains("does not match"),
            "{msg}"
        );
        assert!(!s.content().has(&layer_digest));
        assert!(s.local(&corrupt).unwrap().is_none());

        // Wrong size: the registry serves more bytes than the manifest says.
        let long = format!("{}/bad/long:1", reg.addr);
        let layer = Layer::new().file("data", 0o644, &[9u8; 4096]).gzip();
        let layer_digest = flotilla_host::executor::wasm::runtime::digest_of(&layer);
        push_layers(&pusher, &long, layer.clone()).await;
        let f = reg.blob_file(&layer_digest);
        let mut bytes = std::fs::read(&f).unwrap();
        bytes.extend_from_slice(&[0u8; 512]);
        std::fs::write(&f, &bytes).unwrap();
        let err = s
            .pull(&long, &Platform::host(), &mut no_progress())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("expected") && msg.contains("bytes"), "{msg}");
        assert!(!s.content().has(&layer_digest));

        // Oversized: a layer above the image cap is refused before download.
        let mut small = store(&dir.path().join("small"), None);
        small.limits.image_bytes = 1000;
        let big = format!("{}/bad/big:1", reg.addr);
        push_layers(&pusher, &big, vec![1u8; 5000]).await;
        let err = small
            .pull(&big, &Platform::host(), &mut no_progress())
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
        assert!(small.content().list().unwrap().is_empty());
        // Nothing partial anywhere in the pulling store.
        let tmp = dir.path().join("pull/blobs/tmp");
        assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
    });
}

async fn push_layers(s: &ImageStore, reference: &str, layer: Vec<u8>) -> String {
    s.push_layers(
        reference,
        (OCI_CONFIG, image_config(&[], &["/bin/sh"], &[], "/")),
        vec![(OCI_LAYER_GZIP.to_string(), layer)],
    )
    .await
    .unwrap()
}

#[test]
fn hostile_layers_pull_but_never_unpack_outside_the_root() {
    let reg = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let pusher = store(&dir.path().join("push"), None);
    let s = store(&dir.path().join("pull"), None);
    let outside = dir.path().join("pwned");
    rt().block_on(async {
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            (
                "dotdot",
                vec![Layer::new().raw_file("../../../../pwned", b"x").gzip()],
            ),
            (
                "absolute",
                vec![
                    Layer::new()
                        .raw_file(&outside.display().to_string(), b"x")
                        .gzip(),
                ],
            ),
            (
                "symlink-then-write",
                vec![
                    Layer::new()
                        .symlink("etc", dir.path().to_str().unwrap())
                        .gzip(),
                    Layer::new().raw_file("etc/pwned", b"x").gzip(),
                ],
            ),
        ];
        for (name, layers) in cases {
            let reference = format!("{}/hostile/{name}:1", reg.addr);
            s_push(&pusher, &reference, layers).await;
            let rec = s
                .pull(&reference, &Platform::host(), &mut no_progress())
                .await
                .unwrap();
            match s.rootfs(&rec) {
                Err(err) => assert!(matches!(err, ImageError::Unpack { .. }), "{name}: {err}"),
                // A symlink is resolved as if the root were `/`: the write
                // lands inside the image's filesystem, where it names.
                Ok(root) => {
                    assert_eq!(name, "symlink-then-write", "{name} was not refused");
                    let inside = root
                        .join(dir.path().strip_prefix("/").unwrap())
                        .join("pwned");
                    assert!(inside.is_file(), "confined to {}", inside.display());
                    let _ = s.prune(&HashSet::new());
                }
            }
            assert!(!outside.exists(), "{name} wrote outside the root");
        }
        // Nothing half-unpacked is left for the next start.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("pull/rootfs"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    });
}

async fn s_push(s: &ImageStore, reference: &str, layers: Vec<Vec<u8>>) {
    s.push_layers(
        reference,
        (OCI_CONFIG, image_config(&[], &["/bin/sh"], &[], "/")),
        layers
            .into_iter()
            .map(|l| (OCI_LAYER_GZIP.to_string(), l))
            .collect(),
    )
    .await
    .unwrap();
}

#[test]
fn unused_images_are_collected_only_above_the_threshold() {
    let reg = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let pusher = store(&dir.path().join("push"), None);
    let s = std::sync::Arc::new(store(&dir.path().join("pull"), None));
    rt().block_on(async {
        let a = format!("{}/gc/a:1", reg.addr);
        let b = format!("{}/gc/b:1", reg.addr);
        push_layers(
            &pusher,
            &a,
            Layer::new().file("a", 0o644, &[1; 3000]).gzip(),
        )
        .await;
        push_layers(
            &pusher,
            &b,
            Layer::new().file("b", 0o644, &[2; 3000]).gzip(),
        )
        .await;
        for r in [&a, &b] {
            s.pull(r, &Platform::host(), &mut no_progress())
                .await
                .unwrap();
        }
        let used = s.usage().unwrap();
        let keep_a = a.clone();
        // Below the threshold: nothing goes.
        let gc = tokio::spawn(flotilla_host::image::gc_loop(
            s.clone(),
            used,
            std::time::Duration::from_millis(20),
            move || HashSet::from([keep_a.clone()]),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        gc.abort();
        assert_eq!(s.list().unwrap().len(), 2);
        // Above it: the image no pod uses goes, the one in use stays.
        let keep_a = a.clone();
        let gc = tokio::spawn(flotilla_host::image::gc_loop(
            s.clone(),
            used - 1,
            std::time::Duration::from_millis(20),
            move || HashSet::from([keep_a.clone()]),
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // The record goes first, then its blobs.
        while s.local(&b).unwrap().is_some() || s.usage().unwrap() >= used {
            assert!(std::time::Instant::now() < deadline, "b was not collected");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        gc.abort();
        assert!(s.local(&a).unwrap().is_some());
        assert!(s.usage().unwrap() < used);
    });
}
