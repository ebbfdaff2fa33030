//! A scheduler plugin built with flotilla-sdk: spreads the pods of an app
//! over zones. A pod with the label `$SPREAD_BY` (default `app`) may go
//! only to nodes with the label `$ZONE_LABEL` (default `zone`); a zone
//! holding `$MAX_PER_ZONE` pods of the same app (same namespace, same
//! value of that label) takes no more (0 or unset: no cap); among the
//! rest, the zones with fewer of them score higher. Pods without the label
//! are left alone.

use flotilla_sdk::{Node, Pod, Scheduler, count_pods};

struct ZoneSpread;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The pod's app (its `$SPREAD_BY` label), or `None` to leave it alone.
fn app(pod: &Pod) -> Option<(String, String)> {
    let key = var("SPREAD_BY", "app");
    let value = pod.metadata.label(&key)?.to_string();
    Some((key, value))
}

/// How many pods of `app` the node's zone holds, or why the node is out.
fn in_zone(node: &Node, app: &(String, String)) -> Result<u32, String> {
    let zone_key = var("ZONE_LABEL", "zone");
    let Some(zone) = node.metadata.label(&zone_key) else {
        return Err(format!("node {} has no label {zone_key}", node.metadata.name));
    };
    Ok(count_pods(&zone_key, zone, std::slice::from_ref(app)))
}

#[flotilla_sdk::scheduler]
impl Scheduler for ZoneSpread {
    fn filter(pod: &Pod, node: &Node) -> Result<(), String> {
        let Some(app) = app(pod) else {
            return Ok(());
        };
        let cap: u32 = var("MAX_PER_ZONE", "0").parse().unwrap_or(0);
        let held = in_zone(node, &app)?;
        if cap > 0 && held >= cap {
            return Err(format!(
                "zone of node {} holds {held} pods of {}={}",
                node.metadata.name, app.0, app.1
            ));
        }
        Ok(())
    }

    fn score(pod: &Pod, node: &Node) -> u32 {
        match app(pod) {
            Some(app) => in_zone(node, &app).map_or(0, |held| 100 / (1 + held)),
            None => 0,
        }
    }
}

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
