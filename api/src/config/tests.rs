use super::*;
use crate::object::{MemberSpec, Secret};
use std::collections::HashMap;
use std::sync::Arc;

fn config(name: &str, kv: &[(&str, &str)]) -> Object {
    Object::ConfigMap(ConfigMap {
        metadata: ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            ..ObjectMeta::default()
        },
        data: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        binary_data: BTreeMap::new(),
    })
}

fn secret(name: &str, kv: &[(&str, &str)], binary: &[(&str, &[u8])]) -> Object {
    Object::Secret(Secret {
        metadata: ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            ..ObjectMeta::default()
        },
        data: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        binary_data: binary
            .iter()
            .map(|(k, v)| (k.to_string(), encode_binary(v)))
            .collect(),
    })
}

fn held(objs: Vec<Object>) -> HashMap<String, Arc<Object>> {
    objs.into_iter().map(|o| (o.key(), Arc::new(o))).collect()
}

fn who() -> Identity<'static> {
    Identity {
        pod: "web",
        namespace: "default",
        uid: "u-1",
        ip: "10.88.0.5",
        node: "edge-1",
        member: "app",
    }
}

fn member(env: &[(&str, EnvValue)], env_from: Vec<EnvFrom>) -> MemberSpec {
    MemberSpec {
        name: "app".into(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        env_from,
        ..MemberSpec::default()
    }
}

fn key_ref(secret: bool, name: &str, key: &str, optional: bool) -> EnvValue {
    EnvValue::From(EnvRef {
        secret: secret.then(|| name.to_string()),
        config: (!secret).then(|| name.to_string()),
        key: Some(key.into()),
        optional,
        ..EnvRef::default()
    })
}

#[test]
fn env_is_env_from_in_order_then_env_and_nothing_else() {
    let objects = held(vec![
        config("app", &[("mode", "fast"), ("level", "3")]),
        secret("db", &[("password", "hunter2"), ("user", "root")], &[]),
    ]);
    let inputs = ByKey {
        namespace: "default",
        objects: &objects,
    };
    let m = member(
        &[
            ("MODE", "override".into()),
            ("PASS", key_ref(true, "db", "password", false)),
            (
                "POD",
                EnvValue::From(EnvRef {
                    field: Some("pod.name".into()),
                    ..EnvRef::default()
                }),
            ),
            (
                "NODE",
                EnvValue::From(EnvRef {
                    field: Some("node.name".into()),
                    ..EnvRef::default()
                }),
            ),
        ],
        vec![
            EnvFrom {
                config: Some("app".into()),
                ..EnvFrom::default()
            },
            EnvFrom {
                secret: Some("db".into()),
                prefix: "DB_".into(),
                ..EnvFrom::default()
            },
        ],
    );
    let env = resolve_env(&m, &inputs, &who()).unwrap();
    let want: Vec<(String, String)> = [
        ("level", "3"),
        ("mode", "fast"),
        ("DB_password", "hunter2"),
        ("DB_user", "root"),
        ("MODE", "override"),
        ("NODE", "edge-1"),
        ("PASS", "hunter2"),
        ("POD", "web"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, want);
}

#[test]
fn missing_objects_and_keys_are_named_unless_optional() {
    let objects = held(vec![secret(
        "db",
        &[("user", "root")],
        &[("blob", &[0xff, 0xfe])],
    )]);
    let inputs = ByKey {
        namespace: "default",
        objects: &objects,
    };
    let e = resolve_env(
        &member(&[("P", key_ref(true, "db", "password", false))], vec![]),
        &inputs,
        &who(),
    )
    .unwrap_err();
    assert_eq!(e, "secret \"db\" has no key \"password\"");
    let e = resolve_env(
        &member(&[("M", key_ref(false, "app", "mode", false))], vec![]),
        &inputs,
        &who(),
    )
    .unwrap_err();
    assert_eq!(e, "config \"app\" not found");
    let e = resolve_env(
        &member(&[("B", key_ref(true, "db", "blob", false))], vec![]),
        &inputs,
        &who(),
    )
    .unwrap_err();
    assert!(e.contains("not UTF-8"), "{e}");
    // Optional: left unset.
    let env = resolve_env(
        &member(
            &[
                ("P", key_ref(true, "db", "password", true)),
                ("M", key_ref(false, "app", "mode", true)),
            ],
            vec![EnvFrom {
                config: Some("gone".into()),
                optional: true,
                ..EnvFrom::default()
            }],
        ),
        &inputs,
        &who(),
    )
    .unwrap();
    assert!(env.is_empty(), "{env:?}");
}

#[test]
fn volume_files_pick_items_with_modes_and_decode_binary() {
    let obj = secret("tls", &[("crt", "CERT")], &[("key", &[0, 1, 2, 255])]);
    let all = ObjectVolume {
        name: "tls".into(),
        ..ObjectVolume::default()
    };
    let files = volume_files(InputKind::Secret, &all, Some(&obj)).unwrap();
    assert_eq!(
        files,
        vec![
            VolumeFile {
                path: "crt".into(),
                bytes: b"CERT".to_vec(),
                mode: 0o644
            },
            VolumeFile {
                path: "key".into(),
                bytes: vec![0, 1, 2, 255],
                mode: 0o644
            },
        ]
    );
    let picked = ObjectVolume {
        name: "tls".into(),
        items: vec![KeyToPath {
            key: "key".into(),
            path: "private/tls.key".into(),
            mode: Some(0o400),
        }],
        mode: Some(0o440),
        optional: false,
    };
    let files = volume_files(InputKind::Secret, &picked, Some(&obj)).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(
        (files[0].path.as_str(), files[0].mode),
        ("private/tls.key", 0o400)
    );
    let missing_key = ObjectVolume {
        items: vec![KeyToPath {
            key: "nope".into(),
            ..KeyToPath::default()
        }],
        ..picked.clone()
    };
    assert_eq!(
        volume_files(InputKind::Secret, &missing_key, Some(&obj)).unwrap_err(),
        "secret \"tls\" has no key \"nope\""
    );
    assert_eq!(
        volume_files(InputKind::Config, &all, None).unwrap_err(),
        "config \"tls\" not found"
    );
    let optional = ObjectVolume {
        optional: true,
        ..all
    };
    assert!(
        volume_files(InputKind::Config, &optional, None)
            .unwrap()
            .is_empty()
    );
}

fn pod(volumes: Vec<Volume>, mounts: Vec<Mount>) -> PodSpec {
    PodSpec {
        members: vec![MemberSpec {
            name: "app".into(),
            mounts,
            ..MemberSpec::default()
        }],
        volumes,
        ..PodSpec::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        source: VolumeSource::EmptyDir(EmptyDir::default()),
    }
}

fn mount(volume: &str, path: &str) -> Mount {
    Mount {
        volume: volume.into(),
        path: path.into(),
        read_only: false,
    }
}

#[test]
fn pods_with_bad_volumes_mounts_or_references_are_refused() {
    assert!(validate_pod(&pod(vec![empty_dir("data")], vec![mount("data", "/data")])).is_ok());
    let e = validate_pod(&pod(vec![empty_dir("data")], vec![mount("cache", "/c")])).unwrap_err();
    assert!(
        e.contains("volume 'cache', which the pod does not declare"),
        "{e}"
    );
    let e = validate_pod(&pod(vec![empty_dir("data"), empty_dir("data")], vec![])).unwrap_err();
    assert!(e.contains("two volumes are named 'data'"), "{e}");
    let e = validate_pod(&pod(vec![empty_dir("data")], vec![mount("data", "rel")])).unwrap_err();
    assert!(e.contains("must be absolute"), "{e}");
    let items = Volume {
        name: "cfg".into(),
        source: VolumeSource::Config(ObjectVolume {
            name: "app".into(),
            items: vec![KeyToPath {
                key: "a".into(),
                path: "../../etc/passwd".into(),
                mode: None,
            }],
            ..ObjectVolume::default()
        }),
    };
    let e = validate_pod(&pod(vec![items], vec![])).unwrap_err();
    assert!(e.contains("'..' parts"), "{e}");
    let host = Volume {
        name: "h".into(),
        source: VolumeSource::HostPath(HostPath {
            path: "relative/dir".into(),
            writable: false,
        }),
    };
    assert!(validate_pod(&pod(vec![host], vec![])).is_err());
    let mut bad_ref = pod(vec![], vec![]);
    bad_ref.members[0].env.insert(
        "X".into(),
        EnvValue::From(EnvRef {
            secret: Some("db".into()),
            ..EnvRef::default()
        }),
    );
    let e = validate_pod(&bad_ref).unwrap_err();
    assert!(e.contains("add key = "), "{e}");
    bad_ref.members[0].env.insert(
        "X".into(),
        EnvValue::From(EnvRef {
            field: Some("pod.secret".into()),
            ..EnvRef::default()
        }),
    );
    assert!(
        validate_pod(&bad_ref)
            .unwrap_err()
            .contains("unknown field")
    );
}

#[test]
fn keys_are_file_names_that_cannot_escape() {
    for ok in ["a", "app.conf", "tls_key-1"] {
        check_key(ok).unwrap();
    }
    for bad in ["", ".", "..", "..data", "a/b", "a b", &"x".repeat(254)] {
        assert!(check_key(bad).is_err(), "{bad}");
    }
    let mut b = BTreeMap::new();
    b.insert("k".to_string(), "!!!".to_string());
    assert!(
        check_data(&BTreeMap::new(), &b)
            .unwrap_err()
            .contains("base64")
    );
}

#[test]
fn inputs_of_a_pod_are_its_env_and_volume_references() {
    let mut spec = pod(
        vec![Volume {
            name: "tls".into(),
            source: VolumeSource::Secret(ObjectVolume {
                name: "certs".into(),
                ..ObjectVolume::default()
            }),
        }],
        vec![],
    );
    spec.members[0]
        .env
        .insert("M".into(), key_ref(false, "app", "mode", false));
    spec.members[0].env_from.push(EnvFrom {
        secret: Some("db".into()),
        ..EnvFrom::default()
    });
    let keys: Vec<String> = input_keys(&spec, "team").into_iter().collect();
    assert_eq!(
        keys,
        vec![
            "configmaps/team/app",
            "secrets/team/certs",
            "secrets/team/db"
        ]
    );
}

#[test]
fn env_values_keep_their_json_shape() {
    let m = member(
        &[
            ("A", "x".into()),
            ("B", key_ref(true, "db", "password", false)),
        ],
        vec![],
    );
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["env"]["A"], "x");
    assert_eq!(json["env"]["B"]["secret"], "db");
    let back: MemberSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back, m);
}
