//! Value patterns shared by the processors and the output meter: exact strings, globs and
//! `regex:` expressions, compiled once when the config is parsed, and attribute criteria
//! matched on the wire.
//!
//! A plain string matches exactly; a string holding a glob metacharacter (`*`, `?` or `[`) is
//! a glob over the whole value; `regex:` followed by a regular expression matches wherever the
//! expression matches, so anchor it (`regex:^system\\.`) to match a prefix.

use std::fmt::{self, Write as _};

use ahash::AHashSet;
use globset::{Glob, GlobSet, GlobSetBuilder};
use indexmap::IndexMap;
use regex::Regex;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::config::Issue;
use crate::otlp::rewrite::{Attributes, Value as WireValue};
use crate::otlp::wire::WireError;

/// The prefix that makes a pattern a regular expression.
pub const REGEX_PREFIX: &str = "regex:";

/// A pattern as written. YAML numbers and booleans are accepted as their text, so
/// `process.pid: [1234]` needs no quotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternText(pub String);

impl<'de> Deserialize<'de> for PatternText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PatternVisitor;

        impl Visitor<'_> for PatternVisitor {
            type Value = PatternText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pattern: a string, number or boolean")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<PatternText, E> {
                Ok(PatternText(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }
        }

        deserializer.deserialize_any(PatternVisitor)
    }
}

/// Compiled patterns: a value matches when any one of them does.
#[derive(Debug)]
pub struct Matcher {
    exact: Exact,
    globs: Option<GlobSet>,
    regexes: Vec<Regex>,
}

/// Exact patterns: a short list is scanned, a long one hashed.
#[derive(Debug)]
enum Exact {
    Few(Vec<String>),
    Many(AHashSet<String>),
}

/// From this many exact patterns on, they are looked up in a hash set.
const EXACT_SET_MIN: usize = 8;

impl Matcher {
    /// Compiles the patterns listed at `path`, reporting every bad one.
    pub fn compile(patterns: &[PatternText], path: &str, issues: &mut Vec<Issue>) -> Option<Self> {
        if patterns.is_empty() {
            issues.push(Issue::new(path, "must list at least one pattern"));
            return None;
        }
        let issues_before = issues.len();
        let mut exact = Vec::new();
        let mut globs = GlobSetBuilder::new();
        let mut glob_count = 0;
        let mut regexes = Vec::new();
        for (i, PatternText(pattern)) in patterns.iter().enumerate() {
            if let Some(regex) = pattern.strip_prefix(REGEX_PREFIX) {
                match Regex::new(regex) {
                    Ok(regex) => regexes.push(regex),
                    Err(err) => issues.push(Issue::new(
                        format!("{path}[{i}]"),
                        format!("invalid regex {regex:?}: {err}"),
                    )),
                }
            } else if pattern.contains(['*', '?', '[']) {
                match Glob::new(pattern) {
                    Ok(glob) => {
                        globs.add(glob);
                        glob_count += 1;
                    }
                    Err(err) => issues.push(Issue::new(
                        format!("{path}[{i}]"),
                        format!("invalid glob {pattern:?}: {err}"),
                    )),
                }
            } else {
                exact.push(pattern.clone());
            }
        }
        let globs = if glob_count == 0 {
            None
        } else {
            match globs.build() {
                Ok(set) => Some(set),
                Err(err) => {
                    issues.push(Issue::new(path, format!("invalid globs: {err}")));
                    None
                }
            }
        };
        if issues.len() > issues_before {
            return None;
        }
        let exact = if exact.len() >= EXACT_SET_MIN {
            Exact::Many(exact.into_iter().collect())
        } else {
            Exact::Few(exact)
        };
        Some(Self {
            exact,
            globs,
            regexes,
        })
    }

    pub fn is_match(&self, value: &str) -> bool {
        let exact = match &self.exact {
            Exact::Few(list) => list.iter().any(|e| e == value),
            Exact::Many(set) => set.contains(value),
        };
        exact
            || self.globs.as_ref().is_some_and(|g| g.is_match(value))
            || self.regexes.iter().any(|r| r.is_match(value))
    }
}

/// A key that is present counts even with an empty value (`include:`), so that it is
/// validated instead of silently ignored.
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
}

/// One attribute key whose value must match.
#[derive(Debug)]
pub struct AttributeCriterion {
    pub key: String,
    pub values: Matcher,
}

impl AttributeCriterion {
    /// Compiles a key-to-patterns map at `path`, reporting every bad key and pattern.
    pub fn compile_all(
        raw: &IndexMap<String, Vec<PatternText>>,
        path: &str,
        issues: &mut Vec<Issue>,
    ) -> Vec<Self> {
        if raw.is_empty() {
            issues.push(Issue::new(path, "must list at least one attribute key"));
        }
        raw.iter()
            .filter_map(|(key, patterns)| {
                if key.is_empty() {
                    issues.push(Issue::new(path, "attribute keys must not be empty"));
                    return None;
                }
                Matcher::compile(patterns, &format!("{path}.{key}"), issues).map(|values| Self {
                    key: key.clone(),
                    values,
                })
            })
            .collect()
    }

    /// Whether `attributes` holds this key (its first occurrence) with a matching value.
    pub fn matches(
        &self,
        attributes: Attributes<'_>,
        scratch: &mut String,
    ) -> Result<bool, WireError> {
        let Some(kv) = attributes.find(self.key.as_bytes())? else {
            return Ok(false);
        };
        Ok(match kv.value()? {
            // A string that is not UTF-8 (a decoder would refuse it) matches no pattern.
            WireValue::String(s) => std::str::from_utf8(s).is_ok_and(|s| self.values.is_match(s)),
            WireValue::Bool(b) => self.values.is_match(if b { "true" } else { "false" }),
            WireValue::Int(i) => self.rendered_matches(scratch, format_args!("{i}")),
            WireValue::Double(d) => self.rendered_matches(scratch, format_args!("{d}")),
            _ => false,
        })
    }

    pub fn rendered_matches(&self, scratch: &mut String, value: fmt::Arguments<'_>) -> bool {
        scratch.clear();
        // Writing to a String cannot fail.
        let _ = scratch.write_fmt(value);
        self.values.is_match(scratch)
    }
}

/// Whether every criterion matches; true when there are none.
pub fn all_match(
    criteria: &[AttributeCriterion],
    attributes: Attributes<'_>,
    scratch: &mut String,
) -> Result<bool, WireError> {
    for criterion in criteria {
        if !criterion.matches(attributes, scratch)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Criteria on a metric's resource, name and data point attributes, all ANDed; a criterion
/// left out does not constrain.
#[derive(Debug)]
pub struct Criteria {
    pub metric_names: Option<Matcher>,
    pub resource_attributes: Vec<AttributeCriterion>,
    pub datapoint_attributes: Vec<AttributeCriterion>,
}

/// A key-to-patterns map as written.
pub type RawAttributes = IndexMap<String, Vec<PatternText>>;

impl Criteria {
    /// Compiles the criteria under `path`; `point_attributes` names the data point key as
    /// the config spells it. At least one criterion is required.
    pub fn compile(
        metric_names: Option<&[PatternText]>,
        resource_attributes: Option<&RawAttributes>,
        point_attributes: (&str, Option<&RawAttributes>),
        path: &str,
        issues: &mut Vec<Issue>,
    ) -> Option<Self> {
        let (point_key, point_attributes) = point_attributes;
        if metric_names.is_none() && resource_attributes.is_none() && point_attributes.is_none() {
            issues.push(Issue::new(
                path,
                format!("needs at least one of metric_names, resource_attributes, {point_key}"),
            ));
            return None;
        }
        let issues_before = issues.len();
        let metric_names =
            metric_names.and_then(|p| Matcher::compile(p, &format!("{path}.metric_names"), issues));
        let resource_attributes = resource_attributes
            .map(|r| {
                AttributeCriterion::compile_all(r, &format!("{path}.resource_attributes"), issues)
            })
            .unwrap_or_default();
        let datapoint_attributes = point_attributes
            .map(|r| AttributeCriterion::compile_all(r, &format!("{path}.{point_key}"), issues))
            .unwrap_or_default();
        (issues.len() == issues_before).then_some(Self {
            metric_names,
            resource_attributes,
            datapoint_attributes,
        })
    }

    pub fn name_matches(&self, name: &str) -> bool {
        self.metric_names.as_ref().is_none_or(|m| m.is_match(name))
    }
}

/// The text a pattern is matched against for a decoded attribute value: strings as they are,
/// integers, doubles and booleans as written (`1234`, `0.5`, `true`); other values have none.
pub fn value_text<'a>(
    value: Option<&'a opentelemetry_proto::tonic::common::v1::AnyValue>,
    scratch: &'a mut String,
) -> Option<&'a str> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use std::fmt::Write as _;
    scratch.clear();
    // Writing to a String cannot fail.
    let _ = match value?.value.as_ref()? {
        Value::StringValue(s) => return Some(s),
        Value::BoolValue(b) => return Some(if *b { "true" } else { "false" }),
        Value::IntValue(i) => write!(scratch, "{i}"),
        Value::DoubleValue(d) => write!(scratch, "{d}"),
        _ => return None,
    };
    Some(scratch)
}

/// The value of the first attribute named `key`.
pub fn find_attribute<'a>(
    attributes: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<&'a opentelemetry_proto::tonic::common::v1::AnyValue> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

/// An order-independent hash of attributes, by key and value text (other values by their
/// debug form).
pub fn attributes_hash(
    hasher: &ahash::RandomState,
    scratch: &mut String,
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> u64 {
    let mut sum = 0u64;
    for kv in attributes {
        let one = match value_text(kv.value.as_ref(), scratch) {
            Some(text) => hasher.hash_one((&kv.key, text)),
            None => hasher.hash_one((&kv.key, format!("{:?}", kv.value))),
        };
        sum = sum.wrapping_add(one);
    }
    sum
}
