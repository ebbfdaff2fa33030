//! Nodes register themselves (cordon and uncordon are their own routes);
//! events are written by the scheduler. Clients read both.

use super::{KindRules, Update};
use flotilla_api::{Kind, Object};

pub struct Nodes;

impl KindRules for Nodes {
    fn kind(&self) -> Kind {
        Kind::Node
    }

    fn client_writable(&self) -> Result<(), &'static str> {
        Err("nodes register themselves; they cannot be applied")
    }

    fn update(&self, _: &Object, _: Object) -> Result<Update, String> {
        Err("nodes register themselves; they cannot be applied".into())
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, false)
    }
}

pub struct Events;

impl KindRules for Events {
    fn kind(&self) -> Kind {
        Kind::Event
    }

    fn client_writable(&self) -> Result<(), &'static str> {
        Err("events are recorded by the scheduler")
    }

    fn update(&self, _: &Object, _: Object) -> Result<Update, String> {
        Err("events are recorded by the scheduler".into())
    }

    fn edit_role(&self) -> (bool, bool) {
        (true, false)
    }
}
