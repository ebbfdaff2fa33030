//! One module per resource kind: how the API validates it, which fields a
//! client's write may change (the update rule), what the scheduler and
//! agents own (stripped from clients' writes), and what an edit role may do
//! with it. A new kind is a module here and one line in [`rules`].

mod autoscaler;
mod configmap;
mod deployment;
mod function;
pub mod job;
mod node;
mod plugin;
mod pod;
pub mod quota;
mod secret;
mod service;
mod token;
pub mod volume;

use flotilla_api::content::ContentStore;
use flotilla_api::{Kind, Object};

/// What kind-specific checks may consult.
pub struct Checks<'a> {
    /// Uploaded modules (members must name ones that are there).
    pub blobs: &'a ContentStore,
    /// The node ports services may ask for.
    pub node_ports: flotilla_api::net::PortRange,
    /// Plugins' components must compile and link as their hook says.
    pub plugins: &'a crate::plugins::Plugins,
}

/// The outcome of a client's write over a stored object.
#[derive(Debug)]
pub enum Update {
    /// Nothing a client may change changed.
    Unchanged,
    /// The object to store.
    Write(Box<Object>),
}

/// The rules of one kind.
pub trait KindRules: Sync {
    fn kind(&self) -> Kind;

    /// `Err(how it is made instead)` for kinds clients do not write
    /// through apply or replace.
    fn client_writable(&self) -> Result<(), &'static str> {
        Ok(())
    }

    /// Kind-specific checks of an object as a client sent it (names are
    /// checked for every kind).
    fn validate(&self, _obj: &Object, _cx: &Checks<'_>) -> Result<(), String> {
        Ok(())
    }

    /// Clears what the scheduler and agents own (status), so no client
    /// write can set it.
    fn strip_owned(&self, _obj: &mut Object) {}

    /// The stored object after a client writes `new` over `current` (same
    /// kind): the update rule.
    fn update(&self, current: &Object, new: Object) -> Result<Update, String>;

    /// Whether a write should wake the controllers at once.
    fn wakes_controllers(&self) -> bool {
        false
    }

    /// What an `edit` role may do with this kind (admins may do anything,
    /// viewers only read): `(read, write)`.
    fn edit_role(&self) -> (bool, bool);
}

/// The rules of `kind` — the one registration of every kind.
pub fn rules(kind: Kind) -> &'static dyn KindRules {
    match kind {
        Kind::Pod => &pod::Pods,
        Kind::Deployment => &deployment::Deployments,
        Kind::Service => &service::Services,
        Kind::Secret => &secret::Secrets,
        Kind::ConfigMap => &configmap::ConfigMaps,
        Kind::Volume => &volume::Volumes,
        Kind::Node => &node::Nodes,
        Kind::Token => &token::Tokens,
        Kind::Event => &node::Events,
        Kind::Quota => &quota::Quotas,
        Kind::Autoscaler => &autoscaler::Autoscalers,
        Kind::Job => &job::Jobs,
        Kind::Function => &function::Functions,
        Kind::Plugin => &plugin::Plugins,
    }
}

/// The update rule most kinds share: a changed spec (or data) and labels
/// are taken, and the generation counts spec changes.
fn take_spec_and_labels<T: Clone>(
    current: &T,
    new: T,
    meta: fn(&mut T) -> &mut flotilla_api::ObjectMeta,
    same_spec: fn(&T, &T) -> bool,
    take_spec: fn(&mut T, T),
    wrap: fn(T) -> Object,
) -> Update {
    let mut cur = current.clone();
    let mut new = new;
    let labels_same = meta(&mut cur).labels == meta(&mut new).labels;
    let spec_same = same_spec(&cur, &new);
    if spec_same && labels_same {
        return Update::Unchanged;
    }
    let labels = std::mem::take(&mut meta(&mut new).labels);
    if !spec_same {
        meta(&mut cur).generation += 1;
        take_spec(&mut cur, new);
    }
    meta(&mut cur).labels = labels;
    Update::Write(Box::new(wrap(cur)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_registered_under_its_own_name() {
        for k in [
            Kind::Pod,
            Kind::Deployment,
            Kind::Service,
            Kind::Secret,
            Kind::ConfigMap,
            Kind::Volume,
            Kind::Node,
            Kind::Token,
            Kind::Event,
            Kind::Quota,
            Kind::Autoscaler,
            Kind::Job,
            Kind::Function,
            Kind::Plugin,
        ] {
            assert_eq!(rules(k).kind(), k);
        }
    }

    fn deployment(replicas: u32, label: &str) -> Object {
        let mut d = flotilla_api::Deployment::default();
        d.metadata.name = "web".into();
        d.metadata.generation = 1;
        d.metadata.labels.insert("tier".into(), label.into());
        d.spec.replicas = replicas;
        d.status.replicas = 7;
        Object::Deployment(d)
    }

    #[test]
    fn update_rules_take_what_clients_own_and_keep_the_rest() {
        let r = rules(Kind::Deployment);
        let cur = deployment(2, "a");
        assert!(matches!(
            r.update(&cur, deployment(2, "a")),
            Ok(Update::Unchanged)
        ));
        // Labels only: no new generation; the status stays the controller's.
        let Ok(Update::Write(o)) = r.update(&cur, deployment(2, "b")) else {
            panic!()
        };
        let Object::Deployment(d) = *o else { panic!() };
        assert_eq!((d.metadata.generation, d.status.replicas), (1, 7));
        assert_eq!(d.metadata.labels["tier"], "b");
        // A spec change is a new generation.
        let Ok(Update::Write(o)) = r.update(&cur, deployment(3, "a")) else {
            panic!()
        };
        assert_eq!(o.meta().generation, 2);

        // Pods: labels may change, the spec may not.
        let mut pod = flotilla_api::Pod::default();
        pod.metadata.name = "p".into();
        let cur = Object::Pod(pod.clone());
        let mut relabelled = pod.clone();
        relabelled.metadata.labels.insert("x".into(), "y".into());
        assert!(matches!(
            rules(Kind::Pod).update(&cur, Object::Pod(relabelled)),
            Ok(Update::Write(_))
        ));
        let mut changed = pod;
        changed.spec.node_selector.insert("a".into(), "b".into());
        let err = rules(Kind::Pod)
            .update(&cur, Object::Pod(changed))
            .unwrap_err();
        assert!(err.contains("immutable"), "{err}");

        // Kinds clients do not write say how they are made.
        assert!(rules(Kind::Node).client_writable().is_err());
        assert!(
            rules(Kind::Token)
                .client_writable()
                .unwrap_err()
                .contains("token create")
        );
        // What an edit role may do, per kind.
        assert_eq!(rules(Kind::Secret).edit_role(), (true, true));
        assert_eq!(rules(Kind::Node).edit_role(), (true, false));
        assert_eq!(rules(Kind::Token).edit_role(), (false, false));
    }
}
