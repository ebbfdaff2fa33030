//! The ConfigMaps and Secrets this node's pods use, as the scheduler sent
//! them (`SchedulerMsg::Input`), dropped when no pod here refers to them.
//! For restarts without the scheduler (edge autonomy) they are also kept
//! on disk, sealed (AES-256-GCM) with the node's own key: a Secret is never
//! written plain. Pods watch for changes: waiting pods start once what they
//! miss arrives, running pods rewrite their ConfigMap and Secret volumes.

use flotilla_api::Object;
use flotilla_api::seal::Sealer;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The name the sealed file is bound to.
const SEALED_NAME: &str = "agent-inputs";

pub struct InputStore {
    objects: Mutex<HashMap<String, Arc<Object>>>,
    changed: watch::Sender<u64>,
    /// Where they are kept sealed across restarts (none: memory only).
    disk: Option<(PathBuf, Arc<Sealer>)>,
}

impl Default for InputStore {
    fn default() -> Self {
        InputStore {
            objects: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            disk: None,
        }
    }
}

impl InputStore {
    /// A store kept sealed in `file` with the key in `key_file` (made on
    /// first use), holding what the previous agent process kept.
    pub fn persistent(file: &Path, key_file: &Path) -> Result<InputStore, String> {
        let sealer = Arc::new(Sealer::load_or_create(key_file).map_err(|e| e.to_string())?);
        let mut objects = HashMap::new();
        match std::fs::read(file) {
            Ok(bytes) => match sealer
                .open(SEALED_NAME, &bytes)
                .map_err(|e| e.to_string())
                .and_then(|plain| {
                    serde_json::from_slice::<Vec<Object>>(&plain).map_err(|e| e.to_string())
                }) {
                Ok(list) => {
                    for o in list {
                        objects.insert(o.key(), Arc::new(o));
                    }
                }
                Err(e) => tracing::warn!("ignoring unreadable {}: {e}", file.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot read {}: {e}", file.display()),
        }
        Ok(InputStore {
            objects: Mutex::new(objects),
            changed: watch::channel(0).0,
            disk: Some((file.to_path_buf(), sealer)),
        })
    }

    /// Writes what is held, sealed (called with the lock held, so writes
    /// happen in the order of changes).
    fn save(&self, objects: &HashMap<String, Arc<Object>>) {
        let Some((file, sealer)) = &self.disk else {
            return;
        };
        let list: Vec<&Object> = objects.values().map(|o| &**o).collect();
        let res = serde_json::to_vec(&list)
            .map_err(|e| e.to_string())
            .and_then(|plain| sealer.seal(SEALED_NAME, &plain).map_err(|e| e.to_string()))
            .and_then(|sealed| {
                flotilla_api::fs::write_private(file, &sealed).map_err(|e| e.to_string())
            });
        if let Err(e) = res {
            tracing::error!("cannot keep pod inputs in {}: {e}", file.display());
        }
    }

    /// Takes a new or changed object.
    pub fn put(&self, obj: Object) {
        let key = obj.key();
        {
            let mut objects = self.objects.lock().expect("poisoned");
            if objects.get(&key).is_some_and(|o| **o == obj) {
                return;
            }
            objects.insert(key, Arc::new(obj));
            self.save(&objects);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Keeps only the objects named in `keys` (store keys).
    pub fn retain(&self, keys: &HashSet<String>) {
        let mut objects = self.objects.lock().expect("poisoned");
        let before = objects.len();
        objects.retain(|k, _| keys.contains(k));
        if objects.len() != before {
            self.save(&objects);
        }
    }

    /// The objects held now, by store key.
    pub fn snapshot(&self) -> HashMap<String, Arc<Object>> {
        self.objects.lock().expect("poisoned").clone()
    }

    /// Store keys of the objects held.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .objects
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    }

    /// Changes whenever an object arrives or changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::{ObjectMeta, Secret};

    fn secret(name: &str, value: &str) -> Object {
        Object::Secret(Secret {
            metadata: ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                ..ObjectMeta::default()
            },
            data: [("v".to_string(), value.to_string())].into(),
            binary_data: Default::default(),
        })
    }

    #[test]
    fn inputs_survive_a_restart_sealed_and_leave_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let (file, key) = (dir.path().join("inputs"), dir.path().join("key"));
        let s = InputStore::persistent(&file, &key).unwrap();
        let mut changed = s.subscribe();
        s.put(secret("a", "value-of-a"));
        s.put(secret("b", "value-of-b"));
        assert!(changed.has_changed().unwrap());
        changed.borrow_and_update();
        s.put(secret("a", "value-of-a"));
        assert!(
            !changed.has_changed().unwrap(),
            "the same object is no change"
        );
        let bytes = std::fs::read(&file).unwrap();
        assert!(!bytes.windows(10).any(|w| w == b"value-of-a"));
        s.retain(&["secrets/default/a".to_string()].into());
        drop(s);
        let again = InputStore::persistent(&file, &key).unwrap();
        assert_eq!(again.keys(), vec!["secrets/default/a".to_string()]);
        // Without its key the file is useless, and the store starts empty.
        std::fs::remove_file(&key).unwrap();
        let fresh = InputStore::persistent(&file, &key).unwrap();
        assert!(fresh.keys().is_empty());
    }
}
