use super::fake::FakeMounts;
use super::*;
use flotilla_api::config::{
    ByKey, ConfigMap, EmptyDir, HostPath, KeyToPath, Mount, ObjectVolume, Volume,
};
use flotilla_api::quantity::Bytes;
use flotilla_api::{Object, ObjectMeta, Secret};
use std::collections::HashMap;

fn config(kv: &[(&str, &str)]) -> Object {
    Object::ConfigMap(ConfigMap {
        metadata: ObjectMeta {
            name: "app".into(),
            namespace: "default".into(),
            ..ObjectMeta::default()
        },
        data: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        binary_data: Default::default(),
    })
}

fn secret() -> Object {
    Object::Secret(Secret {
        metadata: ObjectMeta {
            name: "db".into(),
            namespace: "default".into(),
            ..ObjectMeta::default()
        },
        data: [("password".to_string(), "hunter2".to_string())].into(),
        binary_data: Default::default(),
    })
}

fn held(objs: Vec<Object>) -> HashMap<String, Arc<Object>> {
    objs.into_iter().map(|o| (o.key(), Arc::new(o))).collect()
}

fn spec(volumes: Vec<Volume>) -> PodSpec {
    PodSpec {
        members: vec![MemberSpec {
            name: "app".into(),
            mounts: volumes
                .iter()
                .map(|v| Mount {
                    volume: v.name.clone(),
                    path: format!("/{}", v.name),
                    read_only: v.name == "scratch-ro",
                })
                .collect(),
            ..MemberSpec::default()
        }],
        volumes,
        ..PodSpec::default()
    }
}

fn vol(name: &str, source: VolumeSource) -> Volume {
    Volume {
        name: name.into(),
        source,
    }
}

fn object_volume(name: &str) -> ObjectVolume {
    ObjectVolume {
        name: name.into(),
        ..ObjectVolume::default()
    }
}

#[test]
fn volumes_are_made_mounted_where_needed_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pod-1");
    let sys = Arc::new(FakeMounts::default());
    let objects = held(vec![config(&[("mode", "fast")]), secret()]);
    let inputs = ByKey {
        namespace: "default",
        objects: &objects,
    };
    let s = spec(vec![
        vol("scratch", VolumeSource::EmptyDir(EmptyDir::default())),
        vol("scratch-ro", VolumeSource::EmptyDir(EmptyDir::default())),
        vol(
            "mem",
            VolumeSource::EmptyDir(EmptyDir {
                medium: Medium::Memory,
                size_limit: Some(Bytes(8 << 20)),
            }),
        ),
        vol("cfg", VolumeSource::Config(object_volume("app"))),
        vol("creds", VolumeSource::Secret(object_volume("db"))),
        vol(
            "host",
            VolumeSource::HostPath(HostPath {
                path: dir.path().display().to_string(),
                writable: false,
            }),
        ),
    ]);
    let mut pv = PodVolumes::make(
        sys.clone(),
        (root.clone(), dir.path().join("pv")),
        &s,
        &inputs,
    )
    .unwrap();
    // Only the memory-backed ones are tmpfs mounts, sized.
    assert_eq!(
        *sys.mounted.lock().unwrap(),
        vec![
            (root.join("mem"), 8 << 20),
            (root.join("creds"), SECRET_TMPFS_BYTES)
        ]
    );
    assert_eq!(
        std::fs::read_to_string(root.join("cfg/mode")).unwrap(),
        "fast"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("creds/password")).unwrap(),
        "hunter2"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("scratch"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o777);
    let mounts = pv.mounts(&s.members[0], &s);
    let ro: HashMap<&str, bool> = mounts
        .iter()
        .map(|m| (m.guest.as_str(), m.read_only))
        .collect();
    assert!(!ro["/scratch"]);
    assert!(ro["/scratch-ro"], "the mount asked for it");
    assert!(ro["/cfg"], "config volumes are always read-only");
    assert!(ro["/creds"]);
    assert!(ro["/host"], "host paths are read-only unless writable");
    let host = mounts.iter().find(|m| m.guest == "/host").unwrap();
    assert_eq!(host.host, dir.path());
    pv.remove();
    assert!(!root.exists());
    assert!(dir.path().exists(), "a host path is never removed");
    let unmounted = sys.unmounted.lock().unwrap().clone();
    assert_eq!(unmounted, vec![root.join("mem"), root.join("creds")]);
}

#[test]
fn a_missing_object_or_host_path_makes_nothing_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pod-1");
    let sys = Arc::new(FakeMounts::default());
    let objects = held(vec![secret()]);
    let inputs = ByKey {
        namespace: "default",
        objects: &objects,
    };
    let s = spec(vec![
        vol("creds", VolumeSource::Secret(object_volume("db"))),
        vol("cfg", VolumeSource::Config(object_volume("app"))),
    ]);
    let e = PodVolumes::make(
        sys.clone(),
        (root.clone(), dir.path().join("pv")),
        &s,
        &inputs,
    )
    .err()
    .unwrap();
    assert_eq!(e, "volume cfg: config \"app\" not found");
    assert!(!root.exists(), "nothing left behind");
    assert_eq!(
        sys.unmounted.lock().unwrap().clone(),
        vec![root.join("creds")],
        "the secret's tmpfs made before the failure is unmounted"
    );
    let s = spec(vec![vol(
        "h",
        VolumeSource::HostPath(HostPath {
            path: "/nonexistent/flotilla-test".into(),
            writable: true,
        }),
    )]);
    let e = PodVolumes::make(sys, (root, dir.path().join("pv")), &s, &inputs)
        .err()
        .unwrap();
    assert!(e.contains("is not a directory on this node"), "{e}");
}

#[test]
fn a_changed_config_is_swapped_in_atomically_and_old_files_go() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pod-1");
    let sys = Arc::new(FakeMounts::default());
    let mut ov = object_volume("app");
    ov.items = vec![
        KeyToPath {
            key: "mode".into(),
            path: "conf/mode.txt".into(),
            mode: Some(0o600),
        },
        KeyToPath {
            key: "level".into(),
            path: String::new(),
            mode: None,
        },
    ];
    ov.optional = true;
    let s = spec(vec![vol("cfg", VolumeSource::Config(ov))]);
    let v1 = held(vec![config(&[("mode", "fast"), ("level", "1")])]);
    let mut pv = PodVolumes::make(
        sys.clone(),
        (root.clone(), dir.path().join("pv")),
        &s,
        &ByKey {
            namespace: "default",
            objects: &v1,
        },
    )
    .unwrap();
    let cfg = root.join("cfg");
    assert_eq!(
        std::fs::read_to_string(cfg.join("conf/mode.txt")).unwrap(),
        "fast"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cfg.join("conf/mode.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let first = std::fs::read_link(cfg.join("..data")).unwrap();
    // The same data: nothing rewritten.
    assert!(
        pv.refresh(&ByKey {
            namespace: "default",
            objects: &v1,
        })
        .is_empty()
    );
    // New value, one key gone (optional volume: the item is skipped).
    let v2 = held(vec![config(&[("mode", "slow")])]);
    let changed = pv.refresh(&ByKey {
        namespace: "default",
        objects: &v2,
    });
    assert_eq!(changed, vec!["cfg".to_string()]);
    assert_eq!(
        std::fs::read_to_string(cfg.join("conf/mode.txt")).unwrap(),
        "slow"
    );
    assert!(
        std::fs::symlink_metadata(cfg.join("level")).is_err(),
        "a key that went away leaves"
    );
    let second = std::fs::read_link(cfg.join("..data")).unwrap();
    assert_ne!(first, second);
    assert!(!cfg.join(&first).exists(), "the old generation is removed");
    let visible: Vec<String> = std::fs::read_dir(&cfg)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".."))
        .collect();
    assert_eq!(visible, vec!["conf".to_string()]);
    // The object deleted: the last files stay.
    let none = held(vec![]);
    let _ = pv.refresh(&ByKey {
        namespace: "default",
        objects: &none,
    });
    pv.remove();
}

#[test]
fn disk_scratch_over_its_size_limit_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pod-1");
    let objects = held(vec![]);
    let inputs = ByKey {
        namespace: "default",
        objects: &objects,
    };
    let s = spec(vec![
        vol(
            "scratch",
            VolumeSource::EmptyDir(EmptyDir {
                medium: Medium::Disk,
                size_limit: Some(Bytes(64 << 10)),
            }),
        ),
        vol("free", VolumeSource::EmptyDir(EmptyDir::default())),
    ]);
    let mut pv = PodVolumes::make(
        Arc::new(FakeMounts::default()),
        (root.clone(), dir.path().join("pv")),
        &s,
        &inputs,
    )
    .unwrap();
    assert!(pv.has_disk_limits());
    std::fs::write(root.join("free/big"), vec![1u8; 1 << 20]).unwrap();
    assert_eq!(pv.over_limit(), None, "unlimited volumes are not counted");
    std::fs::create_dir(root.join("scratch/sub")).unwrap();
    std::fs::write(root.join("scratch/sub/big"), vec![1u8; 128 << 10]).unwrap();
    let why = pv.over_limit().unwrap();
    assert!(why.starts_with("empty_dir \"scratch\" holds"), "{why}");
    assert!(why.contains("over its size_limit of 64Ki"), "{why}");
    pv.remove();
}

#[test]
fn a_restarted_agent_keeps_scratch_data_and_takes_over_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pod-1");
    let sys = Arc::new(FakeMounts::default());
    let objects = held(vec![secret()]);
    let inputs = ByKey {
        namespace: "default",
        objects: &objects,
    };
    let s = spec(vec![
        vol("scratch", VolumeSource::EmptyDir(EmptyDir::default())),
        vol("creds", VolumeSource::Secret(object_volume("db"))),
    ]);
    let first = PodVolumes::make(
        sys.clone(),
        (root.clone(), dir.path().join("pv")),
        &s,
        &inputs,
    )
    .unwrap();
    std::fs::write(root.join("scratch/state"), "kept").unwrap();
    // The agent process ends without removing anything.
    std::mem::forget(first);
    let mut again = PodVolumes::make(
        sys.clone(),
        (root.clone(), dir.path().join("pv")),
        &s,
        &inputs,
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("scratch/state")).unwrap(),
        "kept"
    );
    assert_eq!(sys.mounted.lock().unwrap().len(), 1, "no second tmpfs");
    again.remove();
    // Volumes of a pod that is not coming back.
    let stale = dir.path().join("pod-2");
    std::fs::create_dir_all(stale.join("creds")).unwrap();
    sys.mount_tmpfs(&stale.join("creds"), 1).unwrap();
    PodVolumes::remove_stale(sys.as_ref(), &stale);
    assert!(!stale.exists());
    assert!(!sys.is_mount(&stale.join("creds")));
}
