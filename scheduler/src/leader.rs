//! Which scheduler leads. Several schedulers may share one etcd store;
//! exactly one of them — the leader, elected with an etcd lease (see
//! `store::etcd::elect`) — runs the controllers, placement, IPAM and the
//! agents' links. The others serve reads of the store and send every other
//! request to the leader. A scheduler on redb is the only one and always
//! leads.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

/// A scheduler as the others reach it: what the leader key holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Unique per scheduler process.
    pub id: String,
    /// Base URL of its API (`https://10.0.0.11:7443`).
    pub api: String,
    /// Address of its QUIC endpoint, for agents (`10.0.0.11:7444`).
    pub quic: String,
}

/// This scheduler's part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// It leads. `term` orders leaderships: on etcd the leader key's
    /// creation revision, which every write of the leader compares (its
    /// fence); 0 for a scheduler that is the only one.
    Leader { term: u64 },
    /// Another one leads (`None`: none known right now, e.g. during an
    /// election).
    Follower { leader: Option<Candidate> },
}

/// The role, watched by whatever only the leader runs.
#[derive(Clone)]
pub struct Leadership {
    tx: Arc<watch::Sender<Role>>,
    since: Arc<Mutex<Option<Instant>>>,
}

impl Default for Leadership {
    /// The only scheduler: it leads from the start.
    fn default() -> Self {
        Leadership::new(Role::Leader { term: 0 })
    }
}

impl Leadership {
    pub fn new(role: Role) -> Leadership {
        let since = matches!(role, Role::Leader { .. }).then(Instant::now);
        Leadership {
            tx: Arc::new(watch::Sender::new(role)),
            since: Arc::new(Mutex::new(since)),
        }
    }

    /// One of several schedulers, before the first election.
    pub fn candidate() -> Leadership {
        Leadership::new(Role::Follower { leader: None })
    }

    pub fn role(&self) -> Role {
        self.tx.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        matches!(*self.tx.borrow(), Role::Leader { .. })
    }

    /// The leader another scheduler said it is, when this one follows.
    pub fn leader(&self) -> Option<Candidate> {
        match &*self.tx.borrow() {
            Role::Follower { leader } => leader.clone(),
            Role::Leader { .. } => None,
        }
    }

    /// When this scheduler became the leader (`None` while it follows).
    /// Nodes get a grace period from then before they can be NotReady:
    /// the new leader has not heard any of them yet.
    pub fn leading_since(&self) -> Option<Instant> {
        *self.since.lock().expect("poisoned")
    }

    pub fn set(&self, role: Role) {
        let leads = matches!(role, Role::Leader { .. });
        {
            let mut since = self.since.lock().expect("poisoned");
            match (leads, since.is_some()) {
                (true, false) => *since = Some(Instant::now()),
                (false, true) => *since = None,
                _ => {}
            }
        }
        self.tx.send_if_modified(|r| {
            if *r == role {
                return false;
            }
            *r = role;
            true
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.tx.subscribe()
    }

    /// Waits until this scheduler leads.
    pub async fn wait_leading(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|r| matches!(r, Role::Leader { .. })).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_since_is_set_on_winning_and_cleared_on_losing() {
        let l = Leadership::candidate();
        assert!(!l.is_leader());
        assert_eq!(l.leading_since(), None);
        let other = Candidate {
            id: "b".into(),
            api: "https://10.0.0.2:7443".into(),
            quic: "10.0.0.2:7444".into(),
        };
        l.set(Role::Follower {
            leader: Some(other.clone()),
        });
        assert_eq!(l.leader(), Some(other));
        l.set(Role::Leader { term: 7 });
        assert!(l.is_leader());
        let since = l.leading_since().expect("set on winning");
        // Winning again (a renewed term) keeps the first instant.
        l.set(Role::Leader { term: 7 });
        assert_eq!(l.leading_since(), Some(since));
        l.set(Role::Follower { leader: None });
        assert_eq!(l.leading_since(), None);
        assert_eq!(l.leader(), None);
    }
}
