//! The arithmetic of a rollout, apart from the store: given a Deployment's
//! pods split into those of the current revision (`new`) and of older ones
//! (`old`), which to make and which to remove in this pass. Level-triggered:
//! each pass looks at what is there now and takes the next allowed step,
//! so a pass that sees a pod become ready makes the next move.
//!
//! A rolling update keeps at most `replicas + surge` pods and at least
//! `replicas - unavailable` ready ones; readiness (`Pod::is_ready`, so
//! readiness probes) gates every removal of an older pod.

use flotilla_api::{MemberState, Pod, PodPhase};

/// One pod as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct Replica {
    pub ready: bool,
    /// 0 Pending, 1 Scheduled, 2 further along: the least advanced go first.
    pub rank: u8,
    pub created_ms: u64,
}

impl Replica {
    pub fn of(p: &Pod) -> Replica {
        Replica {
            ready: p.is_ready(),
            rank: match p.status.phase {
                PodPhase::Pending => 0,
                PodPhase::Scheduled => 1,
                _ => 2,
            },
            created_ms: p.metadata.created_ms,
        }
    }
}

/// What one pass does: pods of the current revision to make, and indices
/// into `new` and `old` of pods to remove.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub create: u32,
    pub remove_new: Vec<usize>,
    pub remove_old: Vec<usize>,
}

/// The limits of a rolling update.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub replicas: u32,
    pub surge: u32,
    pub unavailable: u32,
}

/// Indices of `pods` in the order to remove them: unready before ready,
/// least advanced first, newest first.
fn removal_order(pods: &[Replica]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..pods.len()).collect();
    idx.sort_by_key(|&i| {
        let p = &pods[i];
        (p.ready, p.rank, std::cmp::Reverse(p.created_ms))
    });
    idx
}

/// Pods of the current revision beyond `replicas` go, the least useful first.
fn trim_new(l: &Limits, new: &[Replica], plan: &mut Plan) {
    let want = l.replicas as usize;
    if new.len() > want {
        plan.remove_new = removal_order(new)[..new.len() - want].to_vec();
    }
}

/// The next step of a rolling update.
pub fn rolling(l: &Limits, new: &[Replica], old: &[Replica]) -> Plan {
    let mut plan = Plan::default();
    let want = l.replicas as usize;
    trim_new(l, new, &mut plan);
    let new_kept = new.len().min(want);
    let total = new_kept + old.len();
    // Up: new pods while the total stays within the surge.
    let ceiling = want + l.surge as usize;
    if new_kept < want && total < ceiling {
        plan.create = (want - new_kept).min(ceiling - total) as u32;
    }
    if old.is_empty() {
        return plan;
    }
    // Down: older pods while enough stay ready. Unready new pods count
    // against what may go (they may never become ready); unready old pods
    // go first, as they serve nothing.
    let min_ready = want.saturating_sub(l.unavailable as usize);
    let new_ready = new.iter().filter(|p| p.ready).count().min(want);
    let new_unready = new_kept - new_ready;
    let mut budget = total.saturating_sub(min_ready + new_unready);
    let order = removal_order(old);
    let (unready, ready): (Vec<usize>, Vec<usize>) =
        order.into_iter().partition(|&i| !old[i].ready);
    for i in unready {
        if budget == 0 {
            break;
        }
        plan.remove_old.push(i);
        budget -= 1;
    }
    let ready_now = new_ready + ready.len();
    let mut spare = budget.min(ready_now.saturating_sub(min_ready));
    for i in ready {
        if spare == 0 {
            break;
        }
        plan.remove_old.push(i);
        spare -= 1;
    }
    plan
}

/// `Recreate`: every older pod goes; new ones are made once none is left.
pub fn recreate(l: &Limits, new: &[Replica], old: &[Replica]) -> Plan {
    let mut plan = Plan::default();
    trim_new(l, new, &mut plan);
    if old.is_empty() {
        plan.create = (l.replicas as usize).saturating_sub(new.len()) as u32;
    } else {
        plan.remove_old = (0..old.len()).collect();
    }
    plan
}

/// Paused or halted: nothing is replaced; only the count is kept — a
/// missing pod is made of the current revision, and beyond what the
/// rollout may hold (`replicas`, plus the surge while older pods remain)
/// older pods go first.
pub fn hold(l: &Limits, new: &[Replica], old: &[Replica]) -> Plan {
    let mut plan = Plan::default();
    let want = l.replicas as usize;
    let total = new.len() + old.len();
    let ceiling = if old.is_empty() {
        want
    } else {
        want + l.surge as usize
    };
    if total < want {
        plan.create = (want - total) as u32;
    } else if total > ceiling {
        let mut extra = total - ceiling;
        for i in removal_order(old) {
            if extra == 0 {
                break;
            }
            plan.remove_old.push(i);
            extra -= 1;
        }
        plan.remove_new = removal_order(new)[..extra].to_vec();
    }
    plan
}

/// Why a pod of the new revision is not ready, for the halted condition:
/// the first thing a person would look at.
pub fn why_unready(p: &Pod) -> String {
    let name = &p.metadata.name;
    match p.status.phase {
        PodPhase::Pending => {
            let why = if p.status.message.is_empty() {
                "waiting for a node".to_string()
            } else {
                p.status.message.clone()
            };
            return format!("pod {name} is not placed: {why}");
        }
        PodPhase::Scheduled => return format!("pod {name} has not started on its node"),
        _ => {}
    }
    for m in &p.status.members {
        if let Some(t) = &m.last_termination
            && m.restarts > 0
        {
            let how = if t.message.is_empty() {
                format!("{} (exit code {})", t.reason, t.exit_code)
            } else {
                format!("{} (exit code {}): {}", t.reason, t.exit_code, t.message)
            };
            return format!(
                "member {} of pod {name} restarted {} times; last: {how}",
                m.name, m.restarts
            );
        }
        match &m.state {
            MemberState::Waiting { reason } => {
                return format!("member {} of pod {name} is waiting: {reason}", m.name);
            }
            MemberState::Terminated(t) => {
                return format!(
                    "member {} of pod {name} ended: {} (exit code {})",
                    m.name, t.reason, t.exit_code
                );
            }
            MemberState::Running { .. } if m.ready == Some(false) => {
                return format!(
                    "member {} of pod {name} is running but not ready (its readiness probe has not passed)",
                    m.name
                );
            }
            MemberState::Running { .. } => {}
        }
    }
    if p.status.reason.is_empty() {
        format!("pod {name} is {}", p.status.phase)
    } else {
        format!("pod {name} is {} ({})", p.status.phase, p.status.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(ready: usize, unready: usize) -> Vec<Replica> {
        (0..ready + unready)
            .map(|i| Replica {
                ready: i < ready,
                rank: 2,
                created_ms: i as u64,
            })
            .collect()
    }

    /// Runs passes, making new pods ready (or not) as they appear, until
    /// nothing changes; returns the passes' (new, old, ready) counts.
    fn simulate(l: Limits, old: usize, new_become_ready: bool) -> Vec<(usize, usize, usize)> {
        let mut new: Vec<Replica> = Vec::new();
        let mut old = pods(old, 0);
        let mut trace = Vec::new();
        for pass in 0..100 {
            let plan = rolling(&l, &new, &old);
            let mut gone = plan.remove_old.clone();
            gone.sort_unstable_by(|a, b| b.cmp(a));
            for i in gone {
                old.remove(i);
            }
            // New pods become ready one pass after they are made.
            let mut changed = false;
            for p in new.iter_mut() {
                changed |= p.ready != new_become_ready;
                p.ready = new_become_ready;
            }
            for _ in 0..plan.create {
                new.push(Replica {
                    ready: false,
                    rank: 2,
                    created_ms: 1000 + pass,
                });
            }
            let ready = new.iter().chain(&old).filter(|p| p.ready).count();
            trace.push((new.len(), old.len(), ready));
            if plan == Plan::default() && !changed {
                break;
            }
        }
        trace
    }

    #[test]
    fn a_rolling_update_stays_within_its_surge_and_keeps_enough_ready() {
        let l = Limits {
            replicas: 4,
            surge: 1,
            unavailable: 1,
        };
        let trace = simulate(l, 4, true);
        for &(new, old, ready) in &trace {
            assert!(new + old <= 5, "over the surge: {trace:?}");
            assert!(ready >= 3, "too few ready: {trace:?}");
        }
        assert_eq!(*trace.last().unwrap(), (4, 0, 4), "{trace:?}");
    }

    #[test]
    fn a_never_ready_revision_halts_at_max_unavailable_with_old_pods_serving() {
        let l = Limits {
            replicas: 4,
            surge: 1,
            unavailable: 1,
        };
        let trace = simulate(l, 4, false);
        // It stops moving with 3 old pods (all ready) and 2 new ones.
        assert_eq!(*trace.last().unwrap(), (2, 3, 3), "{trace:?}");
        // With no unavailability allowed, not one old pod goes.
        let l = Limits {
            replicas: 4,
            surge: 1,
            unavailable: 0,
        };
        assert_eq!(*simulate(l, 4, false).last().unwrap(), (1, 4, 4));
    }

    #[test]
    fn unready_old_pods_go_first_and_a_surge_of_zero_removes_before_it_adds() {
        let l = Limits {
            replicas: 3,
            surge: 0,
            unavailable: 1,
        };
        // Old: two ready, one not. Nothing new may be made yet (no surge).
        let old = pods(2, 1);
        let plan = rolling(&l, &[], &old);
        assert_eq!(plan.create, 0);
        // Budget: 3 - 2 = 1; the unready one goes.
        assert_eq!(plan.remove_old, [2]);
        // Next pass: two ready old pods, the least that may be: one is
        // made, none goes until it is ready.
        let old = pods(2, 0);
        let plan = rolling(&l, &[], &old);
        assert_eq!((plan.create, plan.remove_old.len()), (1, 0));
        let trace = simulate(l, 3, true);
        assert_eq!(*trace.last().unwrap(), (3, 0, 3), "{trace:?}");
        assert!(trace.iter().all(|&(n, o, _)| n + o <= 3), "{trace:?}");
    }

    #[test]
    fn scaling_without_a_new_revision_and_scaling_down_mid_rollout() {
        let l = Limits {
            replicas: 2,
            surge: 1,
            unavailable: 0,
        };
        // No old pods: plain scaling, least useful first.
        let mut new = pods(3, 0);
        new[1].rank = 0;
        let plan = rolling(&l, &new, &[]);
        assert_eq!(plan.remove_new, [1]);
        assert_eq!(rolling(&l, &pods(1, 0), &[]).create, 1);
        // 3 new ready + 2 old while replicas dropped to 2: one new and both
        // old go (two ready new pods are enough).
        let plan = rolling(&l, &pods(3, 0), &pods(2, 0));
        assert_eq!(plan.remove_new.len(), 1);
        assert_eq!(plan.remove_old.len(), 2);
        assert_eq!(plan.create, 0);
    }

    #[test]
    fn recreate_and_hold() {
        let l = Limits {
            replicas: 3,
            surge: 1,
            unavailable: 1,
        };
        assert_eq!(
            recreate(&l, &[], &pods(3, 0)),
            Plan {
                create: 0,
                remove_new: vec![],
                remove_old: vec![0, 1, 2]
            }
        );
        assert_eq!(recreate(&l, &pods(1, 0), &[]).create, 2);
        // Held mid-rollout: nothing moves while the count is right…
        assert_eq!(hold(&l, &pods(1, 1), &pods(2, 0)), Plan::default());
        // …a missing pod is made, and beyond the surge older ones go first.
        assert_eq!(hold(&l, &pods(1, 0), &pods(1, 0)).create, 1);
        let plan = hold(&l, &pods(2, 0), &pods(3, 0));
        assert_eq!((plan.remove_old.len(), plan.remove_new.len()), (1, 0));
        let plan = hold(&l, &pods(4, 0), &[]);
        assert_eq!(plan.remove_new.len(), 1);
    }
}
