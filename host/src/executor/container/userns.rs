//! Host ID ranges for pods whose containers run in user namespaces
//! (issue 14 item 5): each such pod gets 65,536 host user and group IDs of
//! its own, so root in one pod's containers is an unprivileged ID on the
//! host and a different one from every other pod's.
//!
//! Ranges are taken from [`FIRST_HOST_ID`] upwards, [`SLOTS`] of them. A
//! pod keeps its range for its whole life on the node, across member
//! restarts and agent restarts (containers outlive the agent and are
//! re-adopted with the mapping they were started with): the choice is
//! recorded as a file `<containers>/.userns/<pod uid>` and removed only when
//! the pod ends on the node, or when the agent finds the pod gone.

use crate::executor::container::sys::IdMap;
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

/// The first host ID handed out: above the ranges distributions give
/// users (`/etc/subuid` from 100000) and below the IDs some software takes
/// for negative (2^31 and up).
pub const FIRST_HOST_ID: u32 = 1 << 30;
/// IDs per pod: the whole 16-bit range images expect (`nobody` is 65534).
pub const RANGE: u32 = 1 << 16;
/// Pods that can hold a range at once on one node.
pub const SLOTS: u32 = 4096;

/// The ranges pods on this node hold.
pub struct UserRanges {
    dir: PathBuf,
    /// Pod uid → slot.
    held: Mutex<BTreeMap<String, u32>>,
}

impl UserRanges {
    /// The ranges recorded under `dir` (made if missing).
    pub fn open(dir: PathBuf) -> io::Result<UserRanges> {
        std::fs::create_dir_all(&dir)?;
        let mut held = BTreeMap::new();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let slot = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|s| *s < SLOTS);
            match slot {
                Some(s) => {
                    held.insert(e.file_name().to_string_lossy().into_owned(), s);
                }
                // Half-written or foreign: not a record of ours.
                None => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(UserRanges {
            dir,
            held: Mutex::new(held),
        })
    }

    /// The mapping of slot `slot`.
    pub fn map(slot: u32) -> IdMap {
        IdMap {
            host: FIRST_HOST_ID + slot * RANGE,
            size: RANGE,
        }
    }

    /// The range of pod `uid`: the one it holds, else the lowest free one,
    /// recorded before it is returned.
    pub fn acquire(&self, uid: &str) -> io::Result<IdMap> {
        if uid.is_empty() || uid.contains(['/', '\0']) || uid.starts_with('.') {
            return Err(io::Error::other(format!("not a pod uid: {uid:?}")));
        }
        let mut held = self.held.lock().expect("poisoned");
        if let Some(s) = held.get(uid) {
            return Ok(Self::map(*s));
        }
        let used: HashSet<u32> = held.values().copied().collect();
        let slot = (0..SLOTS).find(|s| !used.contains(s)).ok_or_else(|| {
            io::Error::other(format!(
                "all {SLOTS} user-namespace ID ranges of this node are in use"
            ))
        })?;
        flotilla_api::fs::write_private(&self.dir.join(uid), slot.to_string().as_bytes())?;
        held.insert(uid.to_string(), slot);
        Ok(Self::map(slot))
    }

    /// Frees pod `uid`'s range (its containers are gone).
    pub fn release(&self, uid: &str) {
        if self.held.lock().expect("poisoned").remove(uid).is_some() {
            let _ = std::fs::remove_file(self.dir.join(uid));
        }
    }

    /// Frees the ranges of pods not in `keep` (gone while the agent was
    /// away).
    pub fn retain(&self, keep: &HashSet<String>) {
        let gone: Vec<String> = self
            .held
            .lock()
            .expect("poisoned")
            .keys()
            .filter(|uid| !keep.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.release(&uid);
        }
    }

    /// How many pods hold a range.
    pub fn len(&self) -> usize {
        self.held.lock().expect("poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pod_gets_its_own_range_and_keeps_it_across_agent_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join(".userns");
        let r = UserRanges::open(at.clone()).unwrap();
        let a = r.acquire("pod-a").unwrap();
        let b = r.acquire("pod-b").unwrap();
        assert_eq!(
            a,
            IdMap {
                host: FIRST_HOST_ID,
                size: 65536
            }
        );
        assert_eq!(b.host, FIRST_HOST_ID + 65536);
        // Asking again (a member restart) gives the same range.
        assert_eq!(r.acquire("pod-a").unwrap(), a);
        // A new agent process finds what the last one handed out.
        drop(r);
        let r = UserRanges::open(at.clone()).unwrap();
        assert_eq!(r.acquire("pod-b").unwrap(), b);
        assert_eq!(r.len(), 2);
        // A freed range is the next one given; the others stay.
        r.release("pod-a");
        assert!(!at.join("pod-a").exists());
        assert_eq!(r.acquire("pod-c").unwrap(), a);
        assert_eq!(r.acquire("pod-b").unwrap(), b);
        // Pods gone while the agent was away lose theirs.
        r.retain(&HashSet::from(["pod-c".to_string()]));
        assert_eq!(r.len(), 1);
        assert!(!at.join("pod-b").exists());
        // The last range ends below 2^31.
        let last = UserRanges::map(SLOTS - 1);
        assert!(u64::from(last.host) + u64::from(last.size) <= 1 << 31);
    }

    #[test]
    fn names_that_are_not_pod_uids_and_stray_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join("junk"), "not a slot").unwrap();
        std::fs::write(dir.path().join("far"), "99999").unwrap();
        let r = UserRanges::open(dir.path().to_path_buf()).unwrap();
        assert!(r.is_empty());
        assert!(!dir.path().join("junk").exists());
        for bad in ["", "../x", ".hidden", "a/b"] {
            assert!(r.acquire(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_full_node_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let r = UserRanges::open(dir.path().join("u")).unwrap();
        {
            let mut held = r.held.lock().unwrap();
            for s in 0..SLOTS {
                held.insert(format!("p{s}"), s);
            }
        }
        let e = r.acquire("one-more").unwrap_err().to_string();
        assert!(e.contains("all 4096 user-namespace ID ranges"), "{e}");
    }
}
