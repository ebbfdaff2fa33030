//! A scheduler plugin (`flotilla:plugin/scheduler`, wit/plugin/plugin.wit):
//! spreads the pods of an app over zones. A pod with the label
//! `$SPREAD_BY` (default `app`) may go only to nodes with the label
//! `$ZONE_LABEL` (default `zone`); a zone holding `$MAX_PER_ZONE` pods of
//! the same app (same namespace, same value of that label) takes no more
//! (0 or unset: no cap); among the rest, the zones with fewer of them
//! score higher. Pods without the label are left alone.

wit_bindgen::generate!({
    path: "../../wit/plugin",
    world: "flotilla:plugin/scheduler",
});

use flotilla::plugin::placement::count_pods;

struct ZoneSpread;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The pod's app (its `$SPREAD_BY` label), or `None` to leave it alone.
fn app(pod: &Pod) -> Option<(String, String)> {
    let key = var("SPREAD_BY", "app");
    let value = label(&pod.metadata.labels, &key)?.to_string();
    Some((key, value))
}

/// How many pods of `app` the node's zone holds, or why the node is out.
fn in_zone(node: &Node, app: &(String, String)) -> Result<u32, String> {
    let zone_key = var("ZONE_LABEL", "zone");
    let Some(zone) = label(&node.metadata.labels, &zone_key) else {
        return Err(format!("node {} has no label {zone_key}", node.metadata.name));
    };
    Ok(count_pods(&zone_key, zone, std::slice::from_ref(app)))
}

impl Guest for ZoneSpread {
    fn filter(pod: Pod, nodes: Vec<Node>) -> Vec<Result<(), String>> {
        let Some(app) = app(&pod) else {
            return nodes.iter().map(|_| Ok(())).collect();
        };
        let cap: u32 = var("MAX_PER_ZONE", "0").parse().unwrap_or(0);
        nodes
            .iter()
            .map(|n| {
                let held = in_zone(n, &app)?;
                if cap > 0 && held >= cap {
                    return Err(format!(
                        "zone of node {} holds {held} pods of {}={}",
                        n.metadata.name, app.0, app.1
                    ));
                }
                Ok(())
            })
            .collect()
    }

    fn score(pod: Pod, nodes: Vec<Node>) -> Vec<u32> {
        let Some(app) = app(&pod) else {
            return vec![0; nodes.len()];
        };
        nodes
            .iter()
            .map(|n| in_zone(n, &app).map_or(0, |held| 100 / (1 + held)))
            .collect()
    }
}

export!(ZoneSpread);

/// Built as a binary with the other samples; the scheduler calls the
/// exports, never `main`.
fn main() {}
