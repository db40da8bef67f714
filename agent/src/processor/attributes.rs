//! `attributes`: deletes, inserts, upserts, hashes, renames and keeps only some attributes of
//! resources and data points.
//!
//! Keys and values are compiled once when the config is parsed. On the hot path attributes
//! are changed in place: deletions use `retain`, a string value replaced by another or by a
//! hash reuses its buffer, and only an added attribute allocates.

use std::fmt::{self, Write as _};
use std::sync::Arc;

use ahash::AHashSet;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use serde::Deserialize;
use serde_yaml::Value;
use sha2::{Digest, Sha256};

use super::{ProcessError, Processor, ProcessorConfig, ProcessorFactory};
use crate::config::{self, ComponentId, Issue};
use crate::otlp::{ExportMetricsServiceRequest, Payload};

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "attributes",
    parse,
};

/// Hex digits kept of the SHA-256 of a hashed value.
pub const HASH_HEX_LEN: usize = 16;

/// Config of the `attributes` processor.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawAttributesConfig {
    /// The actions, at least one. They apply in order, to every resource and/or to every data
    /// point of every metric type (gauge, sum, histogram, exponential histogram, summary).
    #[serde(default)]
    pub actions: Vec<RawAction>,
}

/// One action. The keys it takes depend on `action`:
///
/// - `delete` (`key`): removes the attribute.
/// - `insert` (`key`, `value`): adds the attribute if it is absent.
/// - `upsert` (`key`, `value`): sets the attribute, adding it if absent.
/// - `hash` (`key`): replaces the value by the first 16 hex digits of the SHA-256 of its text
///   (strings as they are; integers, doubles and booleans as `1234`, `0.5`, `true`; bytes as
///   the raw bytes; arrays and maps as their protobuf encoding).
/// - `rename` (`key`, `new_key`): moves the value to `new_key`, overwriting an attribute
///   already there; does nothing if `key` is absent.
/// - `keep_only` (`keys`): removes every attribute whose key is not listed.
///
/// When attributes repeat a key, every one of them is acted on.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    /// What to do: `delete`, `insert`, `upsert`, `hash`, `rename` or `keep_only`.
    pub action: ActionKind,
    /// Whose attributes: `both` (the default), `resource` or `datapoint`.
    #[serde(default)]
    pub on: Target,
    /// The attribute acted on; required by every action except `keep_only`.
    #[serde(default)]
    pub key: Option<String>,
    /// For `insert` and `upsert`: the value, a string, integer, float or boolean.
    #[serde(default)]
    pub value: Option<Value>,
    /// For `rename`: the key the value moves to.
    #[serde(default)]
    pub new_key: Option<String>,
    /// For `keep_only`: the keys to keep.
    #[serde(default)]
    pub keys: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Delete,
    Insert,
    Upsert,
    Hash,
    Rename,
    KeepOnly,
}

impl ActionKind {
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Delete => "delete",
            ActionKind::Insert => "insert",
            ActionKind::Upsert => "upsert",
            ActionKind::Hash => "hash",
            ActionKind::Rename => "rename",
            ActionKind::KeepOnly => "keep_only",
        }
    }
}

/// Whose attributes an action changes.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[default]
    Both,
    Resource,
    Datapoint,
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let raw: RawAttributesConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    if raw.actions.is_empty() {
        issues.push(Issue::new("actions", "at least one action is required"));
    }
    let mut actions = Actions::default();
    for (i, raw_action) in raw.actions.iter().enumerate() {
        let Some(action) = Action::compile(raw_action, &format!("actions[{i}]"), &mut issues)
        else {
            continue;
        };
        if matches!(raw_action.on, Target::Both | Target::Resource) {
            actions.resource_adds |= action.adds();
            actions.resource.push(action.clone());
        }
        if matches!(raw_action.on, Target::Both | Target::Datapoint) {
            actions.datapoint.push(action);
        }
    }
    if issues.is_empty() {
        Ok(Arc::new(AttributesConfig {
            actions: Arc::new(actions),
        }))
    } else {
        Err(issues)
    }
}

/// A compiled action.
#[derive(Debug, Clone)]
enum Action {
    Delete { key: String },
    Insert { key: String, value: AnyValue },
    Upsert { key: String, value: AnyValue },
    Hash { key: String },
    Rename { key: String, new_key: String },
    KeepOnly { keys: KeySet },
}

impl Action {
    /// Validates the action at `path`, reporting every problem.
    fn compile(raw: &RawAction, path: &str, issues: &mut Vec<Issue>) -> Option<Self> {
        use ActionKind::*;
        let kind = raw.action;
        let name = kind.name();
        let issues_before = issues.len();
        let takes = [
            ("key", raw.key.is_some(), kind != KeepOnly),
            (
                "value",
                raw.value.is_some(),
                matches!(kind, Insert | Upsert),
            ),
            ("new_key", raw.new_key.is_some(), kind == Rename),
            ("keys", raw.keys.is_some(), kind == KeepOnly),
        ];
        for (field, present, taken) in takes {
            if present && !taken {
                let hint = if field == "key" {
                    "; list the keys to keep under `keys`"
                } else {
                    ""
                };
                issues.push(Issue::new(
                    format!("{path}.{field}"),
                    format!("not allowed for {name}{hint}"),
                ));
            }
        }

        let key = if kind == KeepOnly {
            None
        } else {
            required_key(raw.key.as_deref(), &format!("{path}.key"), name, issues)
        };
        let value = if matches!(kind, Insert | Upsert) {
            let field = format!("{path}.value");
            match &raw.value {
                None => {
                    issues.push(Issue::new(field, format!("required for {name}")));
                    None
                }
                Some(value) => match to_any_value(value) {
                    Ok(value) => Some(value),
                    Err(message) => {
                        issues.push(Issue::new(field, message));
                        None
                    }
                },
            }
        } else {
            None
        };
        let new_key = if kind == Rename {
            let new_key = required_key(
                raw.new_key.as_deref(),
                &format!("{path}.new_key"),
                name,
                issues,
            );
            if new_key.is_some() && new_key == key {
                issues.push(Issue::new(
                    format!("{path}.new_key"),
                    "must differ from key",
                ));
            }
            new_key
        } else {
            None
        };
        let keys = if kind == KeepOnly {
            match raw.keys.as_deref() {
                None | Some([]) => {
                    issues.push(Issue::new(path, "keep_only needs a non-empty keys list"));
                    None
                }
                Some(keys) => {
                    for (j, key) in keys.iter().enumerate() {
                        if key.is_empty() {
                            issues
                                .push(Issue::new(format!("{path}.keys[{j}]"), "must not be empty"));
                        }
                    }
                    Some(KeySet::new(keys))
                }
            }
        } else {
            None
        };
        if issues.len() > issues_before {
            return None;
        }

        match (kind, key, value, new_key, keys) {
            (Delete, Some(key), ..) => Some(Action::Delete { key }),
            (Insert, Some(key), Some(value), ..) => Some(Action::Insert { key, value }),
            (Upsert, Some(key), Some(value), ..) => Some(Action::Upsert { key, value }),
            (Hash, Some(key), ..) => Some(Action::Hash { key }),
            (Rename, Some(key), _, Some(new_key), _) => Some(Action::Rename { key, new_key }),
            (KeepOnly, _, _, _, Some(keys)) => Some(Action::KeepOnly { keys }),
            _ => {
                // Unreachable: every missing part was reported above.
                issues.push(Issue::new(path, format!("incomplete {name} action")));
                None
            }
        }
    }

    /// Whether the action can add an attribute where there was none.
    fn adds(&self) -> bool {
        matches!(self, Action::Insert { .. } | Action::Upsert { .. })
    }

    fn apply(&self, attributes: &mut Vec<KeyValue>) {
        match self {
            Action::Delete { key } => attributes.retain(|kv| kv.key != *key),
            Action::Insert { key, value } => {
                if !attributes.iter().any(|kv| kv.key == *key) {
                    attributes.push(new_attribute(key, value));
                }
            }
            Action::Upsert { key, value } => {
                let mut found = false;
                for kv in attributes.iter_mut().filter(|kv| kv.key == *key) {
                    set_value(&mut kv.value, value);
                    found = true;
                }
                if !found {
                    attributes.push(new_attribute(key, value));
                }
            }
            Action::Hash { key } => attributes
                .iter_mut()
                .filter(|kv| kv.key == *key)
                .for_each(|kv| hash_value(&mut kv.value)),
            Action::Rename { key, new_key } => {
                if attributes.iter().any(|kv| kv.key == *key) {
                    attributes.retain(|kv| kv.key != *new_key);
                    attributes
                        .iter_mut()
                        .filter(|kv| kv.key == *key)
                        .for_each(|kv| kv.key.clone_from(new_key));
                }
            }
            Action::KeepOnly { keys } => attributes.retain(|kv| keys.contains(&kv.key)),
        }
    }
}

fn required_key(
    key: Option<&str>,
    path: &str,
    action: &str,
    issues: &mut Vec<Issue>,
) -> Option<String> {
    match key {
        None => {
            issues.push(Issue::new(path, format!("required for {action}")));
            None
        }
        Some("") => {
            issues.push(Issue::new(path, "must not be empty"));
            None
        }
        Some(key) => Some(key.to_string()),
    }
}

/// A YAML scalar as an attribute value.
fn to_any_value(value: &Value) -> Result<AnyValue, String> {
    let value = match value {
        Value::String(s) => any_value::Value::StringValue(s.clone()),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                any_value::Value::IntValue(i)
            } else if n.is_u64() {
                return Err(format!(
                    "integer {n} is out of range: attribute integers are 64-bit signed"
                ));
            } else if let Some(f) = n.as_f64() {
                any_value::Value::DoubleValue(f)
            } else {
                return Err(format!("unsupported number {n}"));
            }
        }
        _ => return Err("must be a string, integer, float or boolean".to_string()),
    };
    Ok(AnyValue { value: Some(value) })
}

fn new_attribute(key: &str, value: &AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(value.clone()),
        ..Default::default()
    }
}

/// Sets `slot` to `value`, reusing the string buffer when both are strings.
fn set_value(slot: &mut Option<AnyValue>, value: &AnyValue) {
    if let (
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(old)),
        }),
        Some(any_value::Value::StringValue(new)),
    ) = (slot.as_mut(), &value.value)
    {
        old.clone_from(new);
        return;
    }
    *slot = Some(value.clone());
}

/// Feeds formatted text straight into a digest, without a buffer.
struct DigestWriter<'a>(&'a mut Sha256);

impl fmt::Write for DigestWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

/// Replaces `slot` by the truncated SHA-256 hex of its text, as a string value.
fn hash_value(slot: &mut Option<AnyValue>) {
    let mut hasher = Sha256::new();
    // Writing to a DigestWriter cannot fail.
    match slot.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => hasher.update(s.as_bytes()),
        Some(any_value::Value::BoolValue(b)) => hasher.update(if *b { "true" } else { "false" }),
        Some(any_value::Value::IntValue(i)) => {
            let _ = write!(DigestWriter(&mut hasher), "{i}");
        }
        Some(any_value::Value::DoubleValue(d)) => {
            let _ = write!(DigestWriter(&mut hasher), "{d}");
        }
        Some(any_value::Value::StringValueStrindex(i)) => {
            let _ = write!(DigestWriter(&mut hasher), "{i}");
        }
        Some(any_value::Value::BytesValue(b)) => hasher.update(b),
        Some(any_value::Value::ArrayValue(_) | any_value::Value::KvlistValue(_)) => {
            if let Some(value) = slot.as_ref() {
                hasher.update(value.encode_to_vec());
            }
        }
        None => {}
    }
    let digest = hasher.finalize();
    let digest = &digest[..HASH_HEX_LEN / 2];
    match slot.as_mut().and_then(|v| v.value.as_mut()) {
        Some(any_value::Value::StringValue(s)) => {
            s.clear();
            push_hex(s, digest);
        }
        _ => {
            let mut s = String::with_capacity(HASH_HEX_LEN);
            push_hex(&mut s, digest);
            *slot = Some(AnyValue {
                value: Some(any_value::Value::StringValue(s)),
            });
        }
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// Keys to keep: a short list is scanned, a long one hashed.
#[derive(Debug, Clone)]
enum KeySet {
    Few(Vec<String>),
    Many(AHashSet<String>),
}

/// From this many keys on, they are looked up in a hash set.
const KEY_SET_MIN: usize = 8;

impl KeySet {
    fn new(keys: &[String]) -> Self {
        if keys.len() >= KEY_SET_MIN {
            KeySet::Many(keys.iter().cloned().collect())
        } else {
            KeySet::Few(keys.to_vec())
        }
    }

    fn contains(&self, key: &str) -> bool {
        match self {
            KeySet::Few(keys) => keys.iter().any(|k| k == key),
            KeySet::Many(keys) => keys.contains(key),
        }
    }
}

/// The compiled actions, split by target, each list in config order.
#[derive(Debug, Default)]
struct Actions {
    resource: Vec<Action>,
    datapoint: Vec<Action>,
    /// Whether a resource action may add an attribute, so a missing resource is created.
    resource_adds: bool,
}

impl Actions {
    fn apply(&self, request: &mut ExportMetricsServiceRequest) {
        for rm in &mut request.resource_metrics {
            if !self.resource.is_empty() {
                if rm.resource.is_none() && self.resource_adds {
                    rm.resource = Some(Resource::default());
                }
                if let Some(resource) = &mut rm.resource {
                    for action in &self.resource {
                        action.apply(&mut resource.attributes);
                    }
                }
            }
            if !self.datapoint.is_empty() {
                let metrics = rm.scope_metrics.iter_mut().flat_map(|sm| &mut sm.metrics);
                for data in metrics.filter_map(|m| m.data.as_mut()) {
                    for_each_point_attributes(data, |attributes| {
                        for action in &self.datapoint {
                            action.apply(attributes);
                        }
                    });
                }
            }
        }
    }
}

/// Calls `f` on the attributes of every data point, of whatever type.
fn for_each_point_attributes(data: &mut Data, mut f: impl FnMut(&mut Vec<KeyValue>)) {
    match data {
        Data::Gauge(g) => g.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
        Data::Sum(s) => s.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
        Data::Histogram(h) => h.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
        Data::ExponentialHistogram(h) => {
            h.data_points.iter_mut().for_each(|p| f(&mut p.attributes))
        }
        Data::Summary(s) => s.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
    }
}

/// The parsed and compiled config of one `attributes` processor.
#[derive(Debug)]
pub struct AttributesConfig {
    actions: Arc<Actions>,
}

impl ProcessorConfig for AttributesConfig {
    fn build(&self, _id: &ComponentId) -> Box<dyn Processor> {
        Box::new(AttributesProcessor {
            actions: Arc::clone(&self.actions),
        })
    }
}

struct AttributesProcessor {
    actions: Arc<Actions>,
}

impl Processor for AttributesProcessor {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        let mut request = input.into_request()?;
        self.actions.apply(&mut request);
        out.push(Payload::Decoded(request));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::otlp::testdata::{
        all_types, gauge_metric, int_attr, number_point, request, resource_metrics, string_attr,
    };
    use crate::otlp::Batch;
    use crate::processor::test_util::{parse_issues, run};

    fn attributes(yaml: &str, request: ExportMetricsServiceRequest) -> ExportMetricsServiceRequest {
        let mut out = run("attributes", yaml, vec![Payload::Decoded(request)]);
        assert_eq!(out.len(), 1);
        out.pop().unwrap().into_request().unwrap()
    }

    fn render(value: Option<&AnyValue>) -> String {
        match value.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            Some(any_value::Value::IntValue(i)) => format!("{i}i"),
            Some(any_value::Value::DoubleValue(d)) => format!("{d:?}f"),
            Some(any_value::Value::BoolValue(b)) => format!("{b}b"),
            other => format!("{other:?}"),
        }
    }

    /// `k=v` pairs; ints render as `1i`, doubles as `1.0f`, bools as `trueb`.
    fn render_attributes(attributes: &[KeyValue]) -> Vec<String> {
        attributes
            .iter()
            .map(|kv| format!("{}={}", kv.key, render(kv.value.as_ref())))
            .collect()
    }

    fn resource_attributes(request: &ExportMetricsServiceRequest) -> Vec<Vec<String>> {
        request
            .resource_metrics
            .iter()
            .map(|rm| render_attributes(&rm.resource.as_ref().unwrap().attributes))
            .collect()
    }

    /// The attributes of every data point, of whatever type, in order.
    fn point_attributes(request: &ExportMetricsServiceRequest) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for metric in request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
        {
            let attributes: Vec<&[KeyValue]> = match metric.data.as_ref().unwrap() {
                Data::Gauge(g) => g.data_points.iter().map(|p| &p.attributes[..]).collect(),
                Data::Sum(s) => s.data_points.iter().map(|p| &p.attributes[..]).collect(),
                Data::Histogram(h) => h.data_points.iter().map(|p| &p.attributes[..]).collect(),
                Data::ExponentialHistogram(h) => {
                    h.data_points.iter().map(|p| &p.attributes[..]).collect()
                }
                Data::Summary(s) => s.data_points.iter().map(|p| &p.attributes[..]).collect(),
            };
            out.extend(attributes.into_iter().map(render_attributes));
        }
        out
    }

    /// One resource and one gauge point carrying the same attributes.
    fn same_attributes(attributes: Vec<KeyValue>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![resource_metrics(
                attributes.clone(),
                vec![gauge_metric("g", vec![number_point(attributes, 1.0)])],
            )],
        }
    }

    fn one() -> ExportMetricsServiceRequest {
        same_attributes(vec![
            string_attr("host.name", "node-1"),
            int_attr("process.pid", 42),
            string_attr("process.owner", "alice"),
        ])
    }

    #[test]
    fn delete_on_both_resource_and_datapoint() {
        let out = attributes("actions: [{key: process.pid, action: delete}]", one());
        let expected = vec![vec!["host.name=node-1", "process.owner=alice"]];
        assert_eq!(resource_attributes(&out), expected);
        assert_eq!(point_attributes(&out), expected);

        let out = attributes(
            "actions: [{key: process.pid, action: delete, on: resource}]",
            one(),
        );
        assert_eq!(resource_attributes(&out), expected);
        assert_eq!(
            point_attributes(&out),
            [["host.name=node-1", "process.pid=42i", "process.owner=alice"]]
        );

        let out = attributes(
            "actions: [{key: process.pid, action: delete, on: datapoint}]",
            one(),
        );
        assert_eq!(
            resource_attributes(&out),
            [["host.name=node-1", "process.pid=42i", "process.owner=alice"]]
        );
        assert_eq!(point_attributes(&out), expected);
    }

    #[test]
    fn delete_of_absent_key_changes_nothing() {
        let out = attributes("actions: [{key: nope, action: delete}]", one());
        assert_eq!(out, one());
    }

    #[test]
    fn insert_only_when_absent() {
        let out = attributes(
            r#"
actions:
  - {key: host.name, action: insert, value: other}
  - {key: env, action: insert, value: prod, on: resource}
"#,
            one(),
        );
        assert_eq!(
            resource_attributes(&out),
            [[
                "host.name=node-1",
                "process.pid=42i",
                "process.owner=alice",
                "env=prod"
            ]]
        );
        assert_eq!(
            point_attributes(&out),
            [["host.name=node-1", "process.pid=42i", "process.owner=alice"]]
        );
    }

    #[test]
    fn upsert_sets_or_adds() {
        let out = attributes(
            r#"
actions:
  - {key: host.name, action: upsert, value: node-2}
  - {key: process.pid, action: upsert, value: renamed}
  - {key: env, action: upsert, value: prod, on: datapoint}
"#,
            one(),
        );
        assert_eq!(
            resource_attributes(&out),
            [[
                "host.name=node-2",
                "process.pid=renamed",
                "process.owner=alice"
            ]]
        );
        assert_eq!(
            point_attributes(&out),
            [[
                "host.name=node-2",
                "process.pid=renamed",
                "process.owner=alice",
                "env=prod"
            ]]
        );
    }

    #[test]
    fn values_of_every_scalar_type() {
        let out = attributes(
            r#"
actions:
  - {key: s, action: upsert, value: "8080"}
  - {key: i, action: upsert, value: -8080}
  - {key: f, action: upsert, value: 0.25}
  - {key: whole, action: upsert, value: 2.0}
  - {key: b, action: upsert, value: false}
  - {key: host.name, action: upsert, value: 7}
"#,
            same_attributes(vec![string_attr("host.name", "node-1")]),
        );
        let expected = [[
            "host.name=7i",
            "s=8080",
            "i=-8080i",
            "f=0.25f",
            "whole=2.0f",
            "b=falseb",
        ]];
        assert_eq!(resource_attributes(&out), expected);
        assert_eq!(point_attributes(&out), expected);
    }

    #[test]
    fn hash_strings_and_numbers() {
        let request = same_attributes(vec![
            string_attr("owner", "alice"),
            int_attr("pid", 1234),
            KeyValue {
                key: "flag".to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                }),
                ..Default::default()
            },
            KeyValue {
                key: "ratio".to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::DoubleValue(0.5)),
                }),
                ..Default::default()
            },
            string_attr("other", "alice"),
        ]);
        let out = attributes(
            r#"
actions:
  - {key: owner, action: hash}
  - {key: pid, action: hash}
  - {key: flag, action: hash}
  - {key: ratio, action: hash, on: datapoint}
  - {key: absent, action: hash}
"#,
            request,
        );
        // `printf %s alice | sha256sum | cut -c1-16` and so on.
        let hashed = [
            "owner=2bd806c97f0e00af",
            "pid=03ac674216f3e15c",
            "flag=b5bea41b6c623f7c",
        ];
        assert_eq!(
            resource_attributes(&out),
            [[hashed[0], hashed[1], hashed[2], "ratio=0.5f", "other=alice"]]
        );
        assert_eq!(
            point_attributes(&out),
            [[
                hashed[0],
                hashed[1],
                hashed[2],
                "ratio=d2cbad71ff333de6",
                "other=alice"
            ]]
        );
    }

    #[test]
    fn hash_bytes_and_empty_values() {
        let mut slot = Some(AnyValue {
            value: Some(any_value::Value::BytesValue(b"alice".to_vec())),
        });
        hash_value(&mut slot);
        assert_eq!(render(slot.as_ref()), "2bd806c97f0e00af");
        // sha256 of nothing.
        let mut slot = None;
        hash_value(&mut slot);
        assert_eq!(render(slot.as_ref()), "e3b0c44298fc1c14");
    }

    #[test]
    fn rename_keeps_value_and_overwrites_new_key() {
        let request = same_attributes(vec![
            string_attr("process.exe", "old"),
            string_attr("process.executable.path", "/usr/bin/java"),
            int_attr("n", 1),
        ]);
        let out = attributes(
            r#"
actions:
  - {key: process.executable.path, action: rename, new_key: process.exe}
  - {key: absent, action: rename, new_key: n}
"#,
            request,
        );
        let expected = [["process.exe=/usr/bin/java", "n=1i"]];
        assert_eq!(resource_attributes(&out), expected);
        assert_eq!(point_attributes(&out), expected);
    }

    #[test]
    fn keep_only_listed_keys() {
        let out = attributes(
            "actions: [{action: keep_only, keys: [host.name, process.owner, absent], on: resource}]",
            one(),
        );
        assert_eq!(
            resource_attributes(&out),
            [["host.name=node-1", "process.owner=alice"]]
        );
        assert_eq!(
            point_attributes(&out),
            [["host.name=node-1", "process.pid=42i", "process.owner=alice"]]
        );

        // A long list is hashed; same result.
        let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        let out = attributes(
            &format!(
                "actions: [{{action: keep_only, keys: [{}, process.pid]}}]",
                keys.join(", ")
            ),
            one(),
        );
        assert_eq!(resource_attributes(&out), [["process.pid=42i"]]);
        assert_eq!(point_attributes(&out), [["process.pid=42i"]]);
    }

    #[test]
    fn actions_apply_in_order() {
        let out = attributes(
            r#"
actions:
  - {key: process.owner, action: rename, new_key: user}
  - {key: user, action: hash}
  - {key: process.owner, action: insert, value: redacted}
  - {action: keep_only, keys: [user, process.owner]}
"#,
            one(),
        );
        let expected = [["user=2bd806c97f0e00af", "process.owner=redacted"]];
        assert_eq!(resource_attributes(&out), expected);
        assert_eq!(point_attributes(&out), expected);
    }

    #[test]
    fn every_metric_type_and_every_point() {
        let out = attributes(
            r#"
actions:
  - {key: k, action: delete}
  - {key: env, action: insert, value: prod, on: datapoint}
"#,
            all_types(),
        );
        // g, s (two points), h, eh, sm.
        assert_eq!(point_attributes(&out), vec![vec!["env=prod"]; 6]);
        assert_eq!(resource_attributes(&out), [["host.name=n"]]);

        let out = attributes(
            "actions: [{key: k, action: upsert, value: w, on: datapoint}]",
            request(2, 2, 2),
        );
        let expected: Vec<Vec<&str>> = (0..4)
            .flat_map(|_| [vec!["state=s0", "k=w"], vec!["state=s1", "k=w"]])
            .collect();
        assert_eq!(point_attributes(&out), expected);
    }

    #[test]
    fn missing_resource_is_created_only_to_add() {
        let mut request = one();
        request.resource_metrics[0].resource = None;
        let out = attributes("actions: [{key: a, action: delete}]", request.clone());
        assert!(out.resource_metrics[0].resource.is_none());
        let out = attributes(
            "actions: [{key: a, action: upsert, value: 1, on: resource}]",
            request,
        );
        assert_eq!(resource_attributes(&out), [["a=1i"]]);
    }

    #[test]
    fn repeated_keys_are_all_acted_on() {
        let request = same_attributes(vec![
            string_attr("a", "1"),
            string_attr("b", "x"),
            string_attr("a", "2"),
        ]);
        let out = attributes(
            "actions: [{key: a, action: upsert, value: z}]",
            request.clone(),
        );
        assert_eq!(resource_attributes(&out), [["a=z", "b=x", "a=z"]]);
        let out = attributes("actions: [{key: a, action: delete}]", request);
        assert_eq!(resource_attributes(&out), [["b=x"]]);
    }

    #[test]
    fn shared_batch_is_copied_not_changed() {
        let batch = Arc::new(Batch::from_request(one()));
        let out = run(
            "attributes/x",
            "actions: [{key: host.name, action: delete}]",
            vec![Payload::Shared(Arc::clone(&batch))],
        );
        assert_eq!(out.len(), 1);
        let out = out.into_iter().next().unwrap().into_request().unwrap();
        assert_eq!(
            resource_attributes(&out),
            [["process.pid=42i", "process.owner=alice"]]
        );
        assert_eq!(batch.decoded().unwrap(), &one());
    }

    fn issues(yaml: &str) -> Vec<(String, String)> {
        parse_issues("attributes/x", yaml)
            .into_iter()
            .map(|i| (i.path, i.message))
            .collect()
    }

    fn paths(yaml: &str) -> Vec<String> {
        issues(yaml).into_iter().map(|(path, _)| path).collect()
    }

    #[test]
    fn missing_parts_are_reported_with_their_paths() {
        let found = issues(
            r#"
actions:
  - {key: a, action: delete}
  - {key: a, action: rename}
  - {action: keep_only}
  - {key: a, action: insert}
  - {action: hash}
  - {key: "", action: upsert, value: 1}
  - {action: keep_only, keys: []}
  - {action: keep_only, keys: [a, ""]}
  - {key: a, action: rename, new_key: a}
"#,
        );
        let expected = [
            ("actions[1].new_key", "required for rename"),
            ("actions[2]", "keep_only needs a non-empty keys list"),
            ("actions[3].value", "required for insert"),
            ("actions[4].key", "required for hash"),
            ("actions[5].key", "must not be empty"),
            ("actions[6]", "keep_only needs a non-empty keys list"),
            ("actions[7].keys[1]", "must not be empty"),
            ("actions[8].new_key", "must differ from key"),
        ];
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|(p, m)| (p.as_str(), m.as_str()))
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn fields_an_action_does_not_take_are_rejected() {
        assert_eq!(
            issues("actions: [{key: a, action: delete, value: x}]"),
            [(
                "actions[0].value".to_string(),
                "not allowed for delete".to_string()
            )]
        );
        assert_eq!(
            paths(
                r#"
actions:
  - {key: a, action: hash, new_key: b}
  - {key: a, action: keep_only, keys: [a]}
  - {key: a, action: upsert, value: 1, keys: [a]}
"#
            ),
            ["actions[0].new_key", "actions[1].key", "actions[2].keys"]
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        assert_eq!(
            paths(
                r#"
actions:
  - {key: a, action: insert, value: [1]}
  - {key: a, action: upsert, value: {x: 1}}
  - {key: a, action: upsert, value: 18446744073709551615}
  - {key: a, action: insert, value: ~}
"#
            ),
            [
                "actions[0].value",
                "actions[1].value",
                "actions[2].value",
                "actions[3].value"
            ]
        );
    }

    #[test]
    fn unknown_actions_targets_and_fields_are_rejected() {
        let found = issues("actions: [{key: a, action: foo}]");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "actions[0].action");
        assert!(
            found[0].1.contains("unknown variant `foo`"),
            "{}",
            found[0].1
        );

        assert_eq!(
            paths("actions: [{key: a, action: delete}, {key: a, action: delete, on: scope}]"),
            ["actions[1].on"]
        );
        assert_eq!(
            paths("actions: [{key: a, action: delete, foo: 1}]"),
            ["actions[0].foo"]
        );
        assert_eq!(paths("actions: [{key: a}]"), ["actions[0]"]);
        assert_eq!(paths("action: [{key: a, action: delete}]"), ["action"]);
    }

    #[test]
    fn at_least_one_action() {
        assert_eq!(paths("{}"), ["actions"]);
        assert_eq!(paths("actions: []"), ["actions"]);
    }

    #[test]
    fn valid_config_parses() {
        assert!(issues(
            r#"
actions:
  - { key: process.command_line, action: delete }
  - { key: process.pid, action: delete, on: resource }
  - { key: host.name, action: insert, value: "node-1" }
  - { key: env, action: upsert, value: prod }
  - { key: process.owner, action: hash }
  - { key: process.executable.path, action: rename, new_key: process.exe }
  - { action: keep_only, keys: [host.name, process.executable.name], on: resource }
"#
        )
        .is_empty());
    }
}
