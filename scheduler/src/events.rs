//! Recent events, kept in memory (bounded) rather than in the store: they are
//! for people reading `describe` and `events`, and writing them to flash on
//! every scheduling decision would wear small devices for little gain.

use flotilla_api::time::now_ms;
use flotilla_api::{Event, EventType, Kind};
use std::collections::VecDeque;
use std::sync::Mutex;

/// The object an event is about.
pub struct Subject<'a> {
    pub kind: Kind,
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

pub struct EventLog {
    inner: Mutex<VecDeque<Event>>,
    cap: usize,
}

impl EventLog {
    pub fn new(cap: usize) -> EventLog {
        EventLog {
            inner: Mutex::new(VecDeque::new()),
            cap,
        }
    }

    /// Records an event; a repeat of the latest same event for the object bumps its count.
    pub fn record(&self, s: &Subject<'_>, type_: EventType, reason: &str, message: String) {
        let now = now_ms();
        let mut q = self.inner.lock().expect("poisoned");
        if let Some(e) = q
            .iter_mut()
            .rev()
            .take(64)
            .find(|e| e.uid == s.uid && e.reason == reason && e.message == message)
        {
            e.count += 1;
            e.last_ms = now;
            return;
        }
        if q.len() == self.cap {
            q.pop_front();
        }
        q.push_back(Event {
            kind: s.kind,
            namespace: s.namespace.to_string(),
            name: s.name.to_string(),
            uid: s.uid.to_string(),
            type_,
            reason: reason.to_string(),
            message,
            count: 1,
            first_ms: now,
            last_ms: now,
        });
    }

    /// Events matching the filters (None matches all), oldest first by last occurrence.
    pub fn list(
        &self,
        namespace: Option<&str>,
        kind: Option<Kind>,
        name: Option<&str>,
    ) -> Vec<Event> {
        let q = self.inner.lock().expect("poisoned");
        let mut out: Vec<Event> = q
            .iter()
            .filter(|e| namespace.is_none_or(|n| e.namespace == n || e.kind == Kind::Node))
            .filter(|e| kind.is_none_or(|k| e.kind == k))
            .filter(|e| name.is_none_or(|n| e.name == n))
            .cloned()
            .collect();
        out.sort_by_key(|e| e.last_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedups_and_bounds() {
        let log = EventLog::new(3);
        let s = Subject {
            kind: Kind::Pod,
            namespace: "default",
            name: "a",
            uid: "u1",
        };
        log.record(
            &s,
            EventType::Warning,
            "FailedScheduling",
            "0/1 nodes fit".into(),
        );
        log.record(
            &s,
            EventType::Warning,
            "FailedScheduling",
            "0/1 nodes fit".into(),
        );
        assert_eq!(log.list(None, None, None)[0].count, 2);
        for i in 0..5 {
            log.record(&s, EventType::Normal, "R", format!("m{i}"));
        }
        let all = log.list(Some("default"), Some(Kind::Pod), Some("a"));
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].message, "m4");
        assert!(log.list(Some("other"), None, None).is_empty());
    }
}
