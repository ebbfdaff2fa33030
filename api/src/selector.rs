//! Label selectors as written on the command line: `app=web,tier!=db,env`.

use crate::Labels;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
}

/// A conjunction of requirements; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let key = match &req {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k) => k,
            };
            if key.is_empty() {
                return Err(format!("selector term '{part}' has no label key"));
            }
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects() {
        let labels: Labels = [("app".into(), "web".into()), ("env".into(), "prod".into())].into();
        assert!(Selector::parse("app=web").unwrap().matches(&labels));
        assert!(Selector::parse("app=web,env").unwrap().matches(&labels));
        assert!(!Selector::parse("app!=web").unwrap().matches(&labels));
        assert!(!Selector::parse("tier").unwrap().matches(&labels));
        assert!(Selector::parse("").unwrap().matches(&labels));
        assert!(Selector::parse("=x").is_err());
    }
}
