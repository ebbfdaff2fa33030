//! Services: spec and labels are the client's; the virtual IP and the
//! endpoints (status) are the services controller's, which a write wakes.

use super::{Checks, KindRules, Update, take_spec_and_labels};
use flotilla_api::{Kind, Object, Service};

pub struct Services;

impl KindRules for Services {
    fn kind(&self) -> Kind {
        Kind::Service
    }

    /// Node ports inside the cluster's range, each (port, protocol) once.
    /// (Uniqueness across services is checked with the store, at the write:
    /// see `api::claim_node_ports`.)
    fn validate(&self, obj: &Object, cx: &Checks<'_>) -> Result<(), String> {
        let Object::Service(s) = obj else {
            return Err("not a service".into());
        };
        if s.spec.routes.len() > flotilla_api::function::MAX_ROUTES {
            return Err(format!(
                "at most {} routes",
                flotilla_api::function::MAX_ROUTES
            ));
        }
        for r in &s.spec.routes {
            r.validate()?;
        }
        let mut seen = std::collections::HashSet::new();
        for p in &s.spec.ports {
            let Some(np) = p.node_port else { continue };
            if !cx.node_ports.contains(np) {
                return Err(format!(
                    "node_port {np} is outside the node port range {} (the scheduler's --node-port-range)",
                    cx.node_ports
                ));
            }
            if !seen.insert((np, p.protocol)) {
                return Err(format!("node_port {np}/{} is listed twice", p.protocol));
            }
        }
        Ok(())
    }

    fn strip_owned(&self, obj: &mut Object) {
        if let Object::Service(s) = obj {
            s.status = Default::default();
        }
    }

    fn update(&self, current: &Object, new: Object) -> Result<Update, String> {
        let (Object::Service(cur), Object::Service(new)) = (current, new) else {
            return Err("not a service".into());
        };
        Ok(take_spec_and_labels(
            cur,
            new,
            |s: &mut Service| &mut s.metadata,
            |a, b| a.spec == b.spec,
            |s, n| s.spec = n.spec,
            Object::Service,
        ))
    }

    fn wakes_controllers(&self) -> bool {
        true
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, true)
    }
}
