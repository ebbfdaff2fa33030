//! The api crate's objects as the records of `flotilla:plugin/types`
//! (`wit/plugin/plugin.wit`), and a mutated record back onto the object it
//! came from. Lowering is total (kinds without a record of their own go as
//! `other`); lifting takes only the fields the WIT says a plugin may
//! change and refuses a change to anything else, naming it.

use super::wit;
use flotilla_api::config::{EnvRef, EnvValue};
use flotilla_api::meta::{Labels, ObjectMeta, check_label};
use flotilla_api::quantity::Bytes;
use flotilla_api::{MemberSource, MemberSpec, Object, PodSpec};
use std::collections::BTreeMap;

fn labels(l: &Labels) -> Vec<(String, String)> {
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn meta(m: &ObjectMeta) -> wit::Metadata {
    wit::Metadata {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: labels(&m.labels),
        uid: m.uid.clone(),
        generation: m.generation,
    }
}

fn source(s: &MemberSource) -> wit::Source {
    match s {
        MemberSource::Module { digest, .. } => wit::Source::Module(digest.clone()),
        MemberSource::Artifact { reference, digest } => {
            wit::Source::Artifact(pinned(reference, digest))
        }
        MemberSource::Container { image, digest, .. } => wit::Source::Image(pinned(image, digest)),
    }
}

fn pinned(reference: &str, digest: &str) -> String {
    if digest.is_empty() || reference.contains('@') {
        reference.to_string()
    } else {
        format!("{reference}@{digest}")
    }
}

/// `configmap/NAME/KEY`, `secret/NAME/KEY` or `field/PATH`.
fn reference(r: &EnvRef) -> String {
    let key = r.key.as_deref().unwrap_or("");
    match (&r.config, &r.secret, &r.field) {
        (Some(c), _, _) => format!("configmap/{c}/{key}"),
        (_, Some(s), _) => format!("secret/{s}/{key}"),
        (_, _, Some(f)) => format!("field/{f}"),
        _ => String::new(),
    }
}

fn env(e: &BTreeMap<String, EnvValue>) -> Vec<(String, wit::EnvValue)> {
    e.iter()
        .map(|(k, v)| {
            let v = match v {
                EnvValue::Value(s) => wit::EnvValue::Value(s.clone()),
                EnvValue::From(r) => wit::EnvValue::Reference(reference(r)),
            };
            (k.clone(), v)
        })
        .collect()
}

fn member(m: &MemberSpec) -> wit::Member {
    wit::Member {
        name: m.name.clone(),
        source: source(&m.source),
        args: m.args.clone(),
        env: env(&m.env),
        cpu: m.resources.cpu,
        memory: m.resources.memory.map(|b| b.0),
        ports: m.ports.iter().map(|p| p.port).collect(),
    }
}

pub fn pod_spec(s: &PodSpec) -> wit::PodSpec {
    wit::PodSpec {
        members: s.members.iter().map(member).collect(),
        node_selector: labels(&s.node_selector),
    }
}

/// `obj` as a plugin sees it.
pub fn lower(obj: &Object) -> wit::Object {
    match obj {
        Object::Pod(p) => wit::Object::Pod(wit::Pod {
            metadata: meta(&p.metadata),
            spec: pod_spec(&p.spec),
        }),
        Object::Deployment(d) => wit::Object::Deployment(wit::Deployment {
            metadata: meta(&d.metadata),
            replicas: d.spec.replicas,
            template_labels: labels(&d.spec.template.labels),
            template: pod_spec(&d.spec.template.spec),
        }),
        Object::Job(j) => wit::Object::Job(wit::Job {
            metadata: meta(&j.metadata),
            template_labels: labels(&j.spec.template.labels),
            template: pod_spec(&j.spec.template.spec),
        }),
        Object::Function(f) => wit::Object::Function(wit::Function {
            metadata: meta(&f.metadata),
            source: source(&f.spec.source),
            routes: f
                .spec
                .routes
                .iter()
                .map(|r| wit::Route {
                    host: r.host.clone(),
                    path: r.path.clone(),
                })
                .collect(),
            env: env(&f.spec.env),
            memory: f.spec.memory.map(|b| b.0),
            min_instances: f.spec.min_instances,
            max_instances: f.spec.max_instances,
            node_selector: labels(&f.spec.node_selector),
        }),
        other => wit::Object::Other(wit::Other {
            kind: other.kind().to_string(),
            metadata: meta(other.meta()),
        }),
    }
}

/// A plugin's labels, checked as a manifest's are.
fn lift_labels(what: &str, l: Vec<(String, String)>) -> Result<Labels, String> {
    let mut out = Labels::new();
    for (k, v) in l {
        check_label(&k, false).map_err(|why| format!("{what} key '{k}' {why}"))?;
        check_label(&v, true).map_err(|why| format!("{what} value '{v}' {why}"))?;
        out.insert(k, v);
    }
    Ok(out)
}

fn lift_meta(m: &mut ObjectMeta, new: wit::Metadata) -> Result<(), String> {
    if new.name != m.name || new.namespace != m.namespace {
        return Err(format!(
            "mutate may not rename the object ({}/{} became {}/{})",
            m.namespace, m.name, new.namespace, new.name
        ));
    }
    m.labels = lift_labels("label", new.labels)?;
    Ok(())
}

fn lift_env(
    what: &str,
    current: &mut BTreeMap<String, EnvValue>,
    new: Vec<(String, wit::EnvValue)>,
) -> Result<(), String> {
    let mut out = BTreeMap::new();
    for (k, v) in new {
        let v = match v {
            wit::EnvValue::Value(s) => EnvValue::Value(s),
            wit::EnvValue::Reference(r) => match current.get(&k) {
                Some(EnvValue::From(old)) if reference(old) == r => EnvValue::From(old.clone()),
                _ => {
                    return Err(format!(
                        "{what} env {k}: mutate may set values, not references ({r})"
                    ));
                }
            },
        };
        out.insert(k, v);
    }
    *current = out;
    Ok(())
}

fn lift_pod_spec(spec: &mut PodSpec, new: wit::PodSpec) -> Result<(), String> {
    spec.node_selector = lift_labels("node selector", new.node_selector)?;
    if new.members.len() != spec.members.len() {
        return Err("mutate may not add or remove members".into());
    }
    for (m, n) in spec.members.iter_mut().zip(new.members) {
        if n.name != m.name || !same_source(&source(&m.source), &n.source) {
            return Err(format!(
                "mutate may not rename a member or change its source (member {})",
                m.name
            ));
        }
        let ports: Vec<u16> = m.ports.iter().map(|p| p.port).collect();
        if ports != n.ports {
            return Err(format!("mutate may not change member {}'s ports", m.name));
        }
        m.args = n.args;
        lift_env(&format!("member {}:", m.name), &mut m.env, n.env)?;
        m.resources.cpu = n.cpu;
        m.resources.memory = n.memory.map(Bytes);
    }
    Ok(())
}

fn same_source(a: &wit::Source, b: &wit::Source) -> bool {
    match (a, b) {
        (wit::Source::Module(a), wit::Source::Module(b))
        | (wit::Source::Artifact(a), wit::Source::Artifact(b))
        | (wit::Source::Image(a), wit::Source::Image(b)) => a == b,
        _ => false,
    }
}

/// `obj` with what a plugin's `mutate` returned, or why that return is
/// refused.
pub fn lift(obj: &Object, new: wit::Object) -> Result<Object, String> {
    let mut out = obj.clone();
    match (&mut out, new) {
        (Object::Pod(p), wit::Object::Pod(n)) => {
            lift_meta(&mut p.metadata, n.metadata)?;
            lift_pod_spec(&mut p.spec, n.spec)?;
        }
        (Object::Deployment(d), wit::Object::Deployment(n)) => {
            lift_meta(&mut d.metadata, n.metadata)?;
            d.spec.replicas = n.replicas;
            d.spec.template.labels = lift_labels("template label", n.template_labels)?;
            lift_pod_spec(&mut d.spec.template.spec, n.template)?;
        }
        (Object::Job(j), wit::Object::Job(n)) => {
            lift_meta(&mut j.metadata, n.metadata)?;
            j.spec.template.labels = lift_labels("template label", n.template_labels)?;
            lift_pod_spec(&mut j.spec.template.spec, n.template)?;
        }
        (Object::Function(f), wit::Object::Function(n)) => {
            lift_meta(&mut f.metadata, n.metadata)?;
            if !same_source(&source(&f.spec.source), &n.source) {
                return Err("mutate may not change a function's source".into());
            }
            let routes: Vec<(String, String)> = f
                .spec
                .routes
                .iter()
                .map(|r| (r.host.clone(), r.path.clone()))
                .collect();
            let new_routes: Vec<(String, String)> =
                n.routes.into_iter().map(|r| (r.host, r.path)).collect();
            if routes != new_routes {
                return Err("mutate may not change a function's routes".into());
            }
            lift_env("function", &mut f.spec.env, n.env)?;
            f.spec.memory = n.memory.map(Bytes);
            f.spec.min_instances = n.min_instances;
            f.spec.max_instances = n.max_instances;
            f.spec.node_selector = lift_labels("node selector", n.node_selector)?;
        }
        (o, wit::Object::Other(n)) if n.kind == o.kind().to_string() => {
            lift_meta(o.meta_mut(), n.metadata)?;
        }
        (o, _) => {
            return Err(format!(
                "mutate returned another kind of object than the {} it was given",
                o.kind()
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::config::EnvRef;

    fn pod() -> Object {
        let mut p = flotilla_api::Pod::default();
        p.metadata.name = "web".into();
        p.metadata.namespace = "prod".into();
        p.metadata.labels.insert("app".into(), "web".into());
        let mut m = MemberSpec {
            name: "app".into(),
            source: MemberSource::Container {
                image: "127.0.0.1:5000/web:1".into(),
                digest: "sha256:ab".into(),
                options: Default::default(),
            },
            ..Default::default()
        };
        m.env.insert("MODE".into(), EnvValue::Value("fast".into()));
        m.env.insert(
            "PASSWORD".into(),
            EnvValue::From(EnvRef {
                secret: Some("db".into()),
                key: Some("password".into()),
                ..Default::default()
            }),
        );
        p.spec.members.push(m);
        Object::Pod(p)
    }

    #[test]
    fn an_object_lifted_unchanged_is_the_object_it_was() {
        let obj = pod();
        let lowered = lower(&obj);
        let wit::Object::Pod(p) = &lowered else {
            panic!()
        };
        assert!(matches!(&p.spec.members[0].source,
            wit::Source::Image(i) if i == "127.0.0.1:5000/web:1@sha256:ab"));
        assert!(matches!(&p.spec.members[0].env[1].1,
            wit::EnvValue::Reference(r) if r == "secret/db/password"));
        assert_eq!(lift(&obj, lowered).unwrap(), obj);
    }

    #[test]
    fn a_mutation_takes_labels_env_values_and_resources() {
        let obj = pod();
        let wit::Object::Pod(mut p) = lower(&obj) else {
            panic!()
        };
        p.metadata.labels.push(("team".into(), "shop".into()));
        p.spec.members[0].env[0].1 = wit::EnvValue::Value("slow".into());
        p.spec.members[0].memory = Some(64 << 20);
        p.spec.node_selector.push(("zone".into(), "a".into()));
        let Object::Pod(out) = lift(&obj, wit::Object::Pod(p)).unwrap() else {
            panic!()
        };
        assert_eq!(out.metadata.labels["team"], "shop");
        assert_eq!(out.spec.node_selector["zone"], "a");
        let m = &out.spec.members[0];
        assert_eq!(m.env["MODE"], EnvValue::Value("slow".into()));
        assert!(
            matches!(&m.env["PASSWORD"], EnvValue::From(r) if r.secret.as_deref() == Some("db"))
        );
        assert_eq!(m.resources.memory, Some(Bytes(64 << 20)));
    }

    #[test]
    fn a_mutation_of_what_is_not_the_plugins_is_refused_naming_it() {
        let obj = pod();
        let change = |f: &dyn Fn(&mut wit::Pod)| {
            let wit::Object::Pod(mut p) = lower(&obj) else {
                panic!()
            };
            f(&mut p);
            lift(&obj, wit::Object::Pod(p)).unwrap_err()
        };
        assert!(change(&|p| p.metadata.name = "x".into()).contains("rename"));
        assert!(
            change(&|p| p.spec.members[0].source = wit::Source::Image("evil/x".into()))
                .contains("source")
        );
        assert!(
            change(&|p| p.spec.members[0].env[1].1 =
                wit::EnvValue::Reference("secret/other/key".into()))
            .contains("not references")
        );
        assert!(
            change(&|p| p.metadata.labels.push(("bad key!".into(), "v".into())))
                .contains("bad key!")
        );
        assert!(change(&|p| p.spec.members.clear()).contains("members"));
        let other = wit::Object::Other(wit::Other {
            kind: "Service".into(),
            metadata: wit::Metadata {
                name: "web".into(),
                namespace: "prod".into(),
                labels: vec![],
                uid: String::new(),
                generation: 0,
            },
        });
        assert!(lift(&obj, other).unwrap_err().contains("another kind"));
    }
}
