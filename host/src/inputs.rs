//! The ConfigMaps and Secrets this node's pods use, as the scheduler sent
//! them (`SchedulerMsg::Input`). Held in memory only — a Secret never
//! reaches the agent's disk from here — and dropped when no pod here
//! refers to them. Pods watch for changes: waiting pods start once what
//! they miss arrives, running pods rewrite their ConfigMap and Secret
//! volumes.

use flotilla_api::Object;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub struct InputStore {
    objects: Mutex<HashMap<String, Arc<Object>>>,
    changed: watch::Sender<u64>,
}

impl Default for InputStore {
    fn default() -> Self {
        InputStore {
            objects: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl InputStore {
    /// Takes a new or changed object.
    pub fn put(&self, obj: Object) {
        let key = obj.key();
        {
            let mut objects = self.objects.lock().expect("poisoned");
            if objects.get(&key).is_some_and(|o| **o == obj) {
                return;
            }
            objects.insert(key, Arc::new(obj));
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Keeps only the objects named in `keys` (store keys).
    pub fn retain(&self, keys: &HashSet<String>) {
        self.objects
            .lock()
            .expect("poisoned")
            .retain(|k, _| keys.contains(k));
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
