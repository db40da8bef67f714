//! Label selectors: `key=value` terms separated by commas, all of which must hold
//! (`role=web,zone=eu-1`); `key!=value` excludes. An empty selector selects everything.

use std::collections::BTreeMap;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid selector term {term:?}: expected key=value or key!=value")]
pub struct SelectorError {
    pub term: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let bad = || SelectorError {
                term: raw.to_string(),
            };
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = raw.split_once('=') {
                Term::Equals(k.trim().to_string(), v.trim().to_string())
            } else {
                return Err(bad());
            };
            let (Term::Equals(k, _) | Term::NotEquals(k, _)) = &term;
            if k.is_empty() {
                return Err(bad());
            }
            terms.push(term);
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_term_must_hold() {
        let s = Selector::parse("role=web, zone!=b").unwrap();
        assert!(s.matches(&labels(&[("role", "web"), ("zone", "a")])));
        assert!(s.matches(&labels(&[("role", "web")])));
        assert!(!s.matches(&labels(&[("role", "web"), ("zone", "b")])));
        assert!(!s.matches(&labels(&[("role", "db")])));
        assert!(Selector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn malformed_terms_are_named() {
        assert_eq!(
            Selector::parse("role").unwrap_err().term,
            "role".to_string()
        );
        assert!(Selector::parse("=web").is_err());
    }
}
