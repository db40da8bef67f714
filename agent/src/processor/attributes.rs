//! `attributes`: deletes, inserts, upserts, hashes, renames and keeps only some attributes of
//! resources and data points.
//!
//! Keys are compiled and values encoded once when the config is parsed. The processor works
//! on the encoded request (`otlp::rewrite`): no decode, no copy of a decoded request, no
//! re-encode. A resource or data point whose attributes no action changes is copied from the
//! input as part of a longer run. Actions that only remove attributes (`delete`,
//! `keep_only`, the usual case) leave out single `KeyValue`s in the same pass; other lists
//! that change are written again, the attributes the actions left alone copied as received.
//! Without data point actions, the processor does not look below the resources.

use std::sync::Arc;

use ahash::AHashSet;
use aho_corasick::AhoCorasick;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message;
use serde::Deserialize;
use serde_yaml::Value;

use super::{BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory};
use crate::config::{self, Issue};
use crate::otlp::rewrite::{
    self, begin_message, end_message, hash_hex, put_len_field, put_tag, put_varint, Attributes,
    Edit, KeyValueRef, MetricEdit, PointEdit, ResourceEdit, Spans, Value as WireValue,
};
use crate::otlp::wire::WireError;
use crate::otlp::Payload;
use crate::stats::SeriesSink;

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
    actions.resource.compile();
    actions.datapoint.compile();
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
    Insert { key: String, value: EncodedValue },
    Upsert { key: String, value: EncodedValue },
    Hash { key: String },
    Rename { key: String, new_key: String },
    KeepOnly { keys: KeySet },
}

/// The value of an insert or upsert, encoded once when the config is parsed.
#[derive(Debug, Clone)]
struct EncodedValue {
    /// The `AnyValue`, for an upsert that replaces the value of an attribute.
    any_value: Vec<u8>,
    /// The whole `KeyValue`, for an attribute that is added.
    key_value: Vec<u8>,
}

impl EncodedValue {
    fn new(key: &str, value: AnyValue) -> Self {
        let any_value = value.encode_to_vec();
        let key_value = KeyValue {
            key: key.to_string(),
            value: Some(value),
            ..Default::default()
        }
        .encode_to_vec();
        Self {
            any_value,
            key_value,
        }
    }
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
            (Insert, Some(key), Some(value), ..) => Some(Action::Insert {
                value: EncodedValue::new(&key, value),
                key,
            }),
            (Upsert, Some(key), Some(value), ..) => Some(Action::Upsert {
                value: EncodedValue::new(&key, value),
                key,
            }),
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

    /// Applies the action to one attribute list.
    fn apply<'a>(&'a self, attributes: &mut Vec<Attribute<'a>>) -> Result<(), WireError> {
        match self {
            Action::Delete { key } => attributes.retain(|kv| kv.key != key.as_bytes()),
            Action::Insert { key, value } => {
                if !attributes.iter().any(|kv| kv.key == key.as_bytes()) {
                    attributes.push(Attribute::added(key, value));
                }
            }
            Action::Upsert { key, value } => {
                let mut found = false;
                for kv in attributes.iter_mut().filter(|kv| kv.key == key.as_bytes()) {
                    kv.value = NewValue::Set(&value.any_value);
                    found = true;
                }
                if !found {
                    attributes.push(Attribute::added(key, value));
                }
            }
            Action::Hash { key } => {
                for kv in attributes.iter_mut().filter(|kv| kv.key == key.as_bytes()) {
                    let hash = match kv.value {
                        NewValue::Received => hash_hex(&kv.received().value()?),
                        NewValue::Set(any_value) => hash_hex(&WireValue::parse(any_value)?),
                        NewValue::Hashed(text) => hash_hex(&WireValue::String(&text)),
                    };
                    kv.value = NewValue::Hashed(hash);
                }
            }
            Action::Rename { key, new_key } => {
                if attributes.iter().any(|kv| kv.key == key.as_bytes()) {
                    attributes.retain(|kv| kv.key != new_key.as_bytes());
                    for kv in attributes.iter_mut().filter(|kv| kv.key == key.as_bytes()) {
                        kv.key = new_key.as_bytes();
                        kv.renamed = true;
                    }
                }
            }
            Action::KeepOnly { keys } => attributes.retain(|kv| keys.contains(kv.key)),
        }
        Ok(())
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

/// Keys to keep: a short list is scanned, a long one hashed.
#[derive(Debug, Clone)]
enum KeySet {
    Few(Vec<String>),
    Many(AHashSet<Vec<u8>>),
}

/// From this many keys on, they are looked up in a hash set.
const KEY_SET_MIN: usize = 8;

impl KeySet {
    fn new(keys: &[String]) -> Self {
        if keys.len() >= KEY_SET_MIN {
            KeySet::Many(keys.iter().map(|k| k.as_bytes().to_vec()).collect())
        } else {
            KeySet::Few(keys.to_vec())
        }
    }

    /// Keys are compared as bytes straight from the wire: a key that is not UTF-8 is in no set.
    fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeySet::Few(keys) => keys.iter().any(|k| k.as_bytes() == key),
            KeySet::Many(keys) => keys.contains(key),
        }
    }
}

/// The compiled actions, split by target, each list in config order.
#[derive(Debug, Default)]
pub(crate) struct Actions {
    resource: ActionList,
    datapoint: ActionList,
    /// Whether a resource action may add an attribute, so a missing resource is created.
    resource_adds: bool,
}

/// The actions that apply to one kind of attribute list, in config order.
#[derive(Debug, Default)]
struct ActionList {
    actions: Vec<Action>,
    /// Whether every list changes (an upsert sets or adds its key whatever the list holds).
    always_changes: bool,
    /// Bit `i` set: action `i` is an insert, which changes a list without its key.
    inserts: u64,
    /// Whether every action only removes attributes (`delete`, `keep_only`): the result is
    /// then the list as received less the attributes some action refuses, which the walk
    /// works out one attribute at a time, in one pass and without a list.
    removes_only: bool,
    /// When every action acts on one named key (`delete`, `hash`, `rename`): those keys, to
    /// find in encoded bytes. Bytes that hold none of them hold no attribute an action
    /// changes, which one substring search for all of them tells faster than reading the
    /// attributes.
    keys: Option<KeyFinder>,
}

impl ActionList {
    fn push(&mut self, action: Action) {
        self.actions.push(action);
    }

    fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Works out what [`ActionList::changes`] needs, once the list is complete.
    fn compile(&mut self) {
        let keys: Option<Vec<&str>> = self
            .actions
            .iter()
            .map(|action| match action {
                Action::Delete { key } | Action::Hash { key } | Action::Rename { key, .. } => {
                    Some(key.as_str())
                }
                _ => None,
            })
            .collect();
        self.keys = keys.and_then(|keys| KeyFinder::new(&keys));
        self.inserts = 0;
        self.always_changes = false;
        self.removes_only = !self.actions.is_empty()
            && self
                .actions
                .iter()
                .all(|a| matches!(a, Action::Delete { .. } | Action::KeepOnly { .. }));
        for (i, action) in self.actions.iter().enumerate() {
            match action {
                Action::Upsert { .. } => self.always_changes = true,
                Action::Insert { .. } => {
                    match u32::try_from(i).ok().and_then(|i| 1u64.checked_shl(i)) {
                        Some(bit) => self.inserts |= bit,
                        // Past 64 actions, take every list as changed: always correct, just slower.
                        None => self.always_changes = true,
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether the actions may change an attribute list somewhere in `bytes` (which holds
    /// encoded attribute lists, whole): false only when they act on named keys and none of
    /// those is in `bytes`.
    fn may_change(&self, bytes: &[u8]) -> bool {
        self.keys.as_ref().is_none_or(|keys| keys.finds(bytes))
    }

    /// For a list of [`ActionList::removes_only`]: whether the attribute with this key stays.
    #[inline]
    fn keeps(&self, key: &[u8]) -> bool {
        self.actions.iter().all(|action| match action {
            Action::Delete { key: k } => k.as_bytes() != key,
            Action::KeepOnly { keys } => keys.contains(key),
            _ => true,
        })
    }

    /// Whether the actions change `attributes`, found in one pass over their keys. Until
    /// the first action that changes the list, every action sees the list as received, so it
    /// is enough to ask each one about the received list.
    fn changes(&self, attributes: Attributes<'_>) -> Result<bool, WireError> {
        if self.always_changes {
            return Ok(true);
        }
        let mut inserts_present = 0u64;
        for kv in attributes.iter() {
            let key = kv?.key;
            for (i, action) in self.actions.iter().enumerate() {
                match action {
                    Action::Delete { key: k }
                    | Action::Hash { key: k }
                    | Action::Rename { key: k, .. }
                        if k.as_bytes() == key =>
                    {
                        return Ok(true)
                    }
                    Action::KeepOnly { keys } if !keys.contains(key) => return Ok(true),
                    Action::Insert { key: k, .. } if k.as_bytes() == key => {
                        inserts_present |= u32::try_from(i)
                            .ok()
                            .and_then(|i| 1u64.checked_shl(i))
                            .unwrap_or(0);
                    }
                    _ => {}
                }
            }
        }
        // An insert whose key is absent adds it.
        Ok(inserts_present != self.inserts)
    }

    /// Writes the body of `message` with its attributes (the fields numbered `field`) as the
    /// actions leave them. Its other fields are copied as they are; the attributes go where
    /// the first one was, or at the end.
    fn write<'a>(
        &'a self,
        message: &'a [u8],
        field: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let mut attributes = Vec::new();
        for kv in Attributes::new(message, field).iter() {
            attributes.push(Attribute::from(kv?));
        }
        for action in &self.actions {
            action.apply(&mut attributes)?;
        }
        let mut copied = 0;
        let mut written = false;
        for span in Spans::new(message) {
            let span = span?;
            if span.number != field {
                continue;
            }
            out.extend_from_slice(
                message
                    .get(copied..span.start)
                    .ok_or(WireError::Truncated("attribute"))?,
            );
            copied = span.end;
            if !written {
                for kv in &attributes {
                    kv.write(field, out)?;
                }
                written = true;
            }
        }
        out.extend_from_slice(
            message
                .get(copied..)
                .ok_or(WireError::Truncated("attribute"))?,
        );
        if !written {
            for kv in &attributes {
                kv.write(field, out)?;
            }
        }
        Ok(())
    }
}

/// Finds any of a few keys in bytes.
#[derive(Debug)]
enum KeyFinder {
    /// SIMD (Teddy), where the CPU has it: many bytes per step, where an automaton takes one.
    /// It looks for the last segment of each key (`pid` of `process.pid`), then checks the
    /// whole key around what it found: keys share their namespace with most metric names
    /// and other attributes (`process.`), and every place a searched prefix starts costs a
    /// check that stops the SIMD loop (2.6 times the time over process metrics).
    Packed {
        searcher: aho_corasick::packed::Searcher,
        /// Each key, and where its searched segment starts in it.
        keys: Vec<(Box<[u8]>, usize)>,
    },
    Automaton(AhoCorasick),
}

/// Searched segments shorter than this would start too many checks: the whole key is
/// searched instead.
const MIN_SEGMENT_LEN: usize = 3;

impl KeyFinder {
    /// `None` when no finder can be built (far beyond any config's size): only the shortcut
    /// is lost.
    fn new(keys: &[&str]) -> Option<Self> {
        let keys: Vec<(Box<[u8]>, usize)> = keys
            .iter()
            .map(|key| {
                let segment = key
                    .rfind('.')
                    .map(|dot| dot + 1)
                    .filter(|&start| key.len() - start >= MIN_SEGMENT_LEN)
                    .unwrap_or(0);
                (Box::from(key.as_bytes()), segment)
            })
            .collect();
        let segments = keys.iter().map(|(key, start)| &key[*start..]);
        match aho_corasick::packed::Searcher::new(segments) {
            Some(searcher) => Some(Self::Packed { searcher, keys }),
            None => AhoCorasick::new(keys.iter().map(|(key, _)| key))
                .ok()
                .map(Self::Automaton),
        }
    }

    fn finds(&self, bytes: &[u8]) -> bool {
        match self {
            Self::Packed { searcher, keys } => {
                let mut from = 0;
                while let Some(found) =
                    searcher.find_in(bytes, aho_corasick::Span::from(from..bytes.len()))
                {
                    // Any key whose segment starts here, not only the one reported: two
                    // segments may start at the same place.
                    let at = found.start();
                    let whole = |(key, start): &(Box<[u8]>, usize)| {
                        at.checked_sub(*start)
                            .and_then(|begin| bytes.get(begin..begin + key.len()))
                            .is_some_and(|candidate| candidate == &key[..])
                    };
                    if keys.iter().any(whole) {
                        return true;
                    }
                    from = at + 1;
                }
                false
            }
            Self::Automaton(automaton) => automaton.is_match(bytes),
        }
    }
}

/// One attribute of a list the actions are changing.
#[derive(Debug, Clone, Copy)]
struct Attribute<'a> {
    /// The encoded `KeyValue` it was: as received, or as an action adds it.
    encoded: &'a [u8],
    key: &'a [u8],
    /// Whether `key` replaces the key in `encoded` (a rename).
    renamed: bool,
    value: NewValue<'a>,
}

/// The value of an [`Attribute`].
#[derive(Debug, Clone, Copy)]
enum NewValue<'a> {
    /// The one in `encoded`.
    Received,
    /// An encoded `AnyValue` set by an upsert.
    Set(&'a [u8]),
    /// A hash, as a string.
    Hashed([u8; HASH_HEX_LEN]),
}

impl<'a> From<KeyValueRef<'a>> for Attribute<'a> {
    fn from(kv: KeyValueRef<'a>) -> Self {
        Self {
            encoded: kv.encoded,
            key: kv.key,
            renamed: false,
            value: NewValue::Received,
        }
    }
}

impl<'a> Attribute<'a> {
    fn added(key: &'a str, value: &'a EncodedValue) -> Self {
        Self {
            encoded: &value.key_value,
            key: key.as_bytes(),
            renamed: false,
            value: NewValue::Received,
        }
    }

    /// The `KeyValue` it started as.
    fn received(&self) -> KeyValueRef<'a> {
        KeyValueRef {
            encoded: self.encoded,
            key: self.key,
        }
    }

    /// Writes the attribute as field `field`: as it came when nothing changed it, otherwise
    /// its other fields (`key_strindex`, unknown ones) as they came plus its new key or value.
    fn write(&self, field: u32, out: &mut Vec<u8>) -> Result<(), WireError> {
        let new_value = !matches!(self.value, NewValue::Received);
        if !self.renamed && !new_value {
            put_len_field(out, field, self.encoded);
            return Ok(());
        }
        let placeholder = begin_message(out, field, self.encoded.len());
        let mut copied = 0;
        for span in Spans::new(self.encoded) {
            let span = span?;
            let replaced = match span.number {
                rewrite::KEY_VALUE_KEY => self.renamed,
                rewrite::KEY_VALUE_VALUE => new_value,
                _ => false,
            };
            if replaced {
                out.extend_from_slice(
                    self.encoded
                        .get(copied..span.start)
                        .ok_or(WireError::Truncated("attribute"))?,
                );
                copied = span.end;
            }
        }
        out.extend_from_slice(
            self.encoded
                .get(copied..)
                .ok_or(WireError::Truncated("attribute"))?,
        );
        if self.renamed {
            put_len_field(out, rewrite::KEY_VALUE_KEY, self.key);
        }
        match self.value {
            NewValue::Received => {}
            NewValue::Set(any_value) => put_len_field(out, rewrite::KEY_VALUE_VALUE, any_value),
            NewValue::Hashed(text) => {
                // An AnyValue holding one string.
                put_tag(out, rewrite::KEY_VALUE_VALUE, rewrite::WT_LEN);
                put_varint(out, 2 + text.len() as u64);
                put_len_field(out, rewrite::ANY_VALUE_STRING, &text);
            }
        }
        end_message(out, placeholder)
    }
}

/// The actions as the wire-level rewrite asks for them.
pub(crate) struct AttributesEdit<'a> {
    actions: &'a Actions,
}

impl<'a> AttributesEdit<'a> {
    pub(crate) fn new(actions: &'a Actions) -> Self {
        Self { actions }
    }
}

impl Edit for AttributesEdit<'_> {
    type Resource = ();
    type Point = ();

    /// The processor changes attributes, it never removes points: what was empty stays.
    const PRUNE: bool = false;

    fn resource(&mut self, resource: Option<&[u8]>) -> Result<ResourceEdit<()>, WireError> {
        let actions = &self.actions.resource;
        let changes = match resource {
            _ if actions.is_empty() => false,
            // Only an action that adds makes a resource where there was none.
            None => self.actions.resource_adds,
            Some(resource) if !actions.may_change(resource) => false,
            Some(_) if actions.removes_only => return Ok(ResourceEdit::FilterAttributes(())),
            Some(resource) => actions.changes(Attributes::of_resource(resource))?,
        };
        Ok(if changes {
            ResourceEdit::Rewrite(())
        } else {
            ResourceEdit::Keep(())
        })
    }

    fn write_resource(
        &mut self,
        resource: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        self.actions.resource.write(
            resource.unwrap_or_default(),
            rewrite::RESOURCE_ATTRIBUTES,
            out,
        )
    }

    fn descends(&self, _: ()) -> bool {
        !self.actions.datapoint.is_empty()
    }

    fn reads_metric_names(&self, _: ()) -> bool {
        false
    }

    fn metric(&mut self, _: (), _name: &str) -> MetricEdit<()> {
        if self.actions.datapoint.is_empty() {
            MetricEdit::KeepAll
        } else {
            MetricEdit::PerPoint(())
        }
    }

    fn may_change_scope(&mut self, _: (), scope_metrics: &[u8]) -> bool {
        self.actions.datapoint.may_change(scope_metrics)
    }

    fn point(&mut self, _: (), attributes: Attributes<'_>) -> Result<PointEdit, WireError> {
        if self.actions.datapoint.removes_only {
            return Ok(PointEdit::FilterAttributes);
        }
        Ok(if self.actions.datapoint.changes(attributes)? {
            PointEdit::Rewrite
        } else {
            PointEdit::Keep
        })
    }

    #[inline]
    fn keep_attribute(
        &mut self,
        on_resource: bool,
        attribute: KeyValueRef<'_>,
    ) -> Result<bool, WireError> {
        let actions = if on_resource {
            &self.actions.resource
        } else {
            &self.actions.datapoint
        };
        Ok(actions.keeps(attribute.key))
    }

    fn write_point(
        &mut self,
        _: (),
        point: &[u8],
        attribute_field: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        self.actions.datapoint.write(point, attribute_field, out)
    }
}

/// The parsed and compiled config of one `attributes` processor.
#[derive(Debug)]
pub struct AttributesConfig {
    actions: Arc<Actions>,
}

impl AttributesConfig {
    /// The compiled actions, for a processor that runs them fused with its own work.
    pub(crate) fn actions(&self) -> Arc<Actions> {
        Arc::clone(&self.actions)
    }
}

impl ProcessorConfig for AttributesConfig {
    /// The processor reads the wire, so receivers need not decode for it.
    fn reads_decoded(&self) -> bool {
        false
    }

    fn build(&self, _context: &mut BuildContext<'_>) -> Box<dyn Processor> {
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
        let mut edit = AttributesEdit {
            actions: &self.actions,
        };
        out.push(rewrite::rewrite_payload(input, &mut edit)?.payload);
        Ok(())
    }

    fn process_metered(
        &mut self,
        input: Payload,
        out: &mut Vec<Payload>,
        series: &mut SeriesSink<'_>,
    ) -> Result<bool, ProcessError> {
        let mut edit = AttributesEdit {
            actions: &self.actions,
        };
        let mut hasher = series.hasher(&input);
        let (output, observed) =
            rewrite::rewrite_payload_observed(input, &mut edit, Some(&mut hasher))?;
        out.push(output.payload);
        Ok(observed)
    }
}

/// The actions as they were written on decoded requests, kept as the reference the
/// wire-level processor is checked against.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod oracle {
    use std::fmt::{self, Write as _};

    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prost::Message;
    use sha2::{Digest, Sha256};

    use super::{Action, Actions, HASH_HEX_LEN};
    use crate::otlp::ExportMetricsServiceRequest;

    fn decoded(value: &super::EncodedValue) -> AnyValue {
        AnyValue::decode(&value.any_value[..]).unwrap()
    }

    fn apply_action(action: &Action, attributes: &mut Vec<KeyValue>) {
        match action {
            Action::Delete { key } => attributes.retain(|kv| kv.key != *key),
            Action::Insert { key, value } => {
                if !attributes.iter().any(|kv| kv.key == *key) {
                    attributes.push(new_attribute(key, &decoded(value)));
                }
            }
            Action::Upsert { key, value } => {
                let value = decoded(value);
                let mut found = false;
                for kv in attributes.iter_mut().filter(|kv| kv.key == *key) {
                    set_value(&mut kv.value, &value);
                    found = true;
                }
                if !found {
                    attributes.push(new_attribute(key, &value));
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
            Action::KeepOnly { keys } => attributes.retain(|kv| keys.contains(kv.key.as_bytes())),
        }
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
    pub fn hash_value(slot: &mut Option<AnyValue>) {
        let mut hasher = Sha256::new();
        // Writing to a DigestWriter cannot fail.
        match slot.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => hasher.update(s.as_bytes()),
            Some(any_value::Value::BoolValue(b)) => {
                hasher.update(if *b { "true" } else { "false" })
            }
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

    pub fn apply(actions: &Actions, request: &mut ExportMetricsServiceRequest) {
        for rm in &mut request.resource_metrics {
            if !actions.resource.is_empty() {
                if rm.resource.is_none() && actions.resource_adds {
                    rm.resource = Some(Resource::default());
                }
                if let Some(resource) = &mut rm.resource {
                    for action in &actions.resource.actions {
                        apply_action(action, &mut resource.attributes);
                    }
                }
            }
            if !actions.datapoint.is_empty() {
                let metrics = rm.scope_metrics.iter_mut().flat_map(|sm| &mut sm.metrics);
                for data in metrics.filter_map(|m| m.data.as_mut()) {
                    for_each_point_attributes(data, |attributes| {
                        for action in &actions.datapoint.actions {
                            apply_action(action, attributes);
                        }
                    });
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::otlp::testdata::{
        all_types, gauge_metric, int_attr, number_point, request, resource_metrics, string_attr,
    };
    use crate::otlp::{Batch, ExportMetricsServiceRequest};
    use crate::processor::test_util::{parse_issues, run};
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    /// What the `hash` action does to a value, on a decoded one.
    fn hash_value(slot: &mut Option<AnyValue>) {
        let encoded = slot
            .as_ref()
            .map(Message::encode_to_vec)
            .unwrap_or_default();
        let hash = hash_hex::<HASH_HEX_LEN>(&WireValue::parse(&encoded).unwrap());
        *slot = Some(AnyValue {
            value: Some(any_value::Value::StringValue(
                String::from_utf8(hash.to_vec()).unwrap(),
            )),
        });
    }

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

    /// The keys are looked for in the bytes before any attribute is read: a key found only
    /// inside a longer key, a value or a name is no attribute of that key.
    #[test]
    fn keys_found_only_inside_other_bytes_change_nothing() {
        for key in ["pid", "process", "alice", "node-1", "host"] {
            for action in ["delete", "hash", "rename"] {
                let extra = if action == "rename" {
                    ", new_key: x"
                } else {
                    ""
                };
                let yaml = format!("actions: [{{key: {key}, action: {action}{extra}}}]");
                assert_eq!(attributes(&yaml, one()), one(), "{yaml}");
            }
        }
    }

    #[test]
    fn both_key_finders_find_the_same() {
        use rand::{Rng, SeedableRng};
        // Keys that share a searched segment (`pid`), whose segments start alike (`pid`,
        // `pid_x`), without a dot, and shorter than a segment worth searching.
        let keys = [
            "process.pid",
            "process.parent_pid",
            "a.pid",
            "b.pid_x",
            "k",
            "x.y",
        ];
        let packed = KeyFinder::new(&keys).unwrap();
        assert!(
            matches!(packed, KeyFinder::Packed { .. }),
            "no SIMD here: {packed:?}"
        );
        let automaton = KeyFinder::Automaton(AhoCorasick::new(keys).unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Pieces of the keys, so that near misses are frequent.
        let pieces = [
            "process.", "process", "pid", "parent_", "a.", "b.", "_x", "x.", "y", ".", "s", "p",
            "k",
        ];
        let (mut found, mut found_without_k) = (0, 0);
        for _ in 0..5000 {
            let len = rng.random_range(0..12);
            let bytes: Vec<u8> = (0..len)
                .flat_map(|_| pieces[rng.random_range(0..pieces.len())].bytes())
                .collect();
            let holds = |k: &&str| bytes.windows(k.len()).any(|w| w == k.as_bytes());
            let expected = keys.iter().any(holds);
            assert_eq!(
                packed.finds(&bytes),
                expected,
                "{:?}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(automaton.finds(&bytes), expected, "{bytes:?}");
            found += usize::from(expected);
            found_without_k += usize::from(keys.iter().filter(|k| **k != "k").any(holds));
        }
        assert!(found > 1000 && found < 4000, "{found}");
        assert!(found_without_k > 300, "{found_without_k}");
    }

    #[test]
    fn requests_holding_none_of_the_keys_are_passed_on_as_they_came() {
        let batch = Arc::new(Batch::from_request(one()));
        let out = run(
            "attributes/x",
            "actions: [{key: absent, action: delete}, {key: nowhere, action: hash}]",
            vec![Payload::Shared(Arc::clone(&batch))],
        );
        assert!(matches!(&out[..], [Payload::Shared(b)] if Arc::ptr_eq(b, &batch)));
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

    /// A random action list drawn from what random requests hold. JSON is YAML.
    pub(crate) fn random_config(rng: &mut rand::rngs::StdRng) -> String {
        use crate::otlp::rewrite::tests::KEYS;
        use rand::seq::IndexedRandom;
        use rand::Rng;
        use serde_json::json;
        let values = [
            json!("x"),
            json!("node-1"),
            json!(7),
            json!(0.25),
            json!(true),
        ];
        let actions: Vec<serde_json::Value> = (0..rng.random_range(1..5))
            .map(|_| {
                let key = *KEYS.choose(rng).unwrap();
                let mut action = match rng.random_range(0..6) {
                    0 => json!({"action": "delete", "key": key}),
                    1 => json!({"action": "insert", "key": key, "value": values.choose(rng).unwrap()}),
                    2 => json!({"action": "upsert", "key": key, "value": values.choose(rng).unwrap()}),
                    3 => json!({"action": "hash", "key": key}),
                    4 => {
                        let new_key = KEYS.iter().copied().filter(|k| *k != key).collect::<Vec<_>>();
                        json!({"action": "rename", "key": key, "new_key": new_key.choose(rng).unwrap()})
                    }
                    _ => {
                        let mut keys: Vec<String> = (0..rng.random_range(1..4))
                            .map(|_| KEYS.choose(rng).unwrap().to_string())
                            .collect();
                        if rng.random_ratio(1, 3) {
                            // Enough keys for a hashed set.
                            keys.extend((0..10).map(|i| format!("other{i}")));
                        }
                        json!({"action": "keep_only", "keys": keys})
                    }
                };
                let on = ["both", "resource", "datapoint"].choose(rng).unwrap();
                action["on"] = json!(on);
                action
            })
            .collect();
        json!({ "actions": actions }).to_string()
    }

    /// As the last processor of a pipeline, the processor reports the series of its output
    /// as a meter walking it would find them, on random requests and action lists.
    #[test]
    fn metered_output_has_the_series_a_walk_finds() {
        use crate::otlp::rewrite::tests::{random_request, shared};
        use crate::processor::test_util::assert_metered_as_walked;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4d45_5441);
        let mut series = 0;
        for round in 0..3000 {
            let yaml = random_config(&mut rng);
            let request = random_request(&mut rng);
            let input = match round % 3 {
                0 => shared(&request),
                1 => Payload::Encoded {
                    bytes: bytes::Bytes::from(request.encode_to_vec()),
                    data_points: crate::otlp::data_points(&request),
                },
                _ => Payload::Decoded(request),
            };
            series += assert_metered_as_walked("attributes", &yaml, input);
        }
        assert!(series > 6_000, "{series} series");
    }

    /// Resources after their scopes, or given twice, are met as the walk of the output meets
    /// them, whether the resource is filtered or rewritten.
    #[test]
    fn metered_output_with_resources_out_of_order_or_repeated() {
        use crate::processor::test_util::assert_metered_as_walked;
        use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;
        use prost::encoding::encode_varint;
        let request = one();
        let rm = &request.resource_metrics[0];
        let resource = rm.resource.clone().unwrap().encode_to_vec();
        for copies in [1, 2] {
            let mut body = ResourceMetrics {
                resource: None,
                ..rm.clone()
            }
            .encode_to_vec();
            for _ in 0..copies {
                body.push(0x0a);
                encode_varint(resource.len() as u64, &mut body);
                body.extend_from_slice(&resource);
            }
            let mut bytes = vec![0x0a];
            encode_varint(body.len() as u64, &mut bytes);
            bytes.extend_from_slice(&body);
            for yaml in [
                "actions: [{key: process.pid, action: delete}]",
                "actions: [{key: process.pid, action: hash}]",
                "actions: [{key: env, value: prod, action: upsert, on: resource}]",
            ] {
                let data_points = crate::otlp::data_points(&request);
                let bytes = bytes::Bytes::from(bytes.clone());
                let batch = Arc::new(Batch::from_validated(bytes.clone(), data_points));
                for input in [
                    Payload::Encoded { bytes, data_points },
                    Payload::Shared(batch),
                ] {
                    let series = assert_metered_as_walked("attributes", yaml, input);
                    assert_eq!(series, data_points as usize);
                }
            }
        }
    }

    /// The wire-level processor gives what the struct-level one it replaced gives, on random
    /// requests and action lists, whatever form the payload comes in.
    #[test]
    fn wire_actions_equal_the_struct_actions() {
        use crate::otlp::rewrite::tests::{random_request, shared};
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4154_5452);
        let mut changed = 0;
        for round in 0..3000 {
            let yaml = random_config(&mut rng);
            let id = crate::config::ComponentId::parse("attributes").unwrap();
            let config = parse(serde_yaml::from_str(&yaml).unwrap()).unwrap();
            // The compiled actions, as the oracle needs them: parsed again the same way.
            let raw: RawAttributesConfig = serde_yaml::from_str(&yaml).unwrap();
            let mut issues = Vec::new();
            let mut reference = Actions::default();
            for (i, raw_action) in raw.actions.iter().enumerate() {
                let action =
                    Action::compile(raw_action, &format!("actions[{i}]"), &mut issues).unwrap();
                if matches!(raw_action.on, Target::Both | Target::Resource) {
                    reference.resource_adds |= action.adds();
                    reference.resource.push(action.clone());
                }
                if matches!(raw_action.on, Target::Both | Target::Datapoint) {
                    reference.datapoint.push(action);
                }
            }
            let request = random_request(&mut rng);
            let mut expected = request.clone();
            oracle::apply(&reference, &mut expected);

            let input = match round % 3 {
                0 => shared(&request),
                1 => Payload::Encoded {
                    bytes: bytes::Bytes::from(request.encode_to_vec()),
                    data_points: crate::otlp::data_points(&request),
                },
                _ => Payload::Decoded(request.clone()),
            };
            let mut processor = crate::processor::state::standalone(config.as_ref(), "test", &id);
            let mut out = Vec::new();
            processor.process(input, &mut out).unwrap();
            assert_eq!(out.len(), 1);
            let payload = out.pop().unwrap();
            let points = payload.data_points();
            let got = payload.into_request().unwrap();
            assert_eq!(got, expected, "{yaml}\n{request:?}");
            assert_eq!(points, crate::otlp::data_points(&got));
            changed += usize::from(got != request);
        }
        // The random configs do exercise the actions.
        assert!(changed > 1000, "{changed} changed");
    }

    #[test]
    fn untouched_points_are_copied_and_changed_ones_keep_their_other_fields() {
        // key_strindex survives a rename and a hash; a point no action touches is copied.
        let mut request = one();
        let point_attributes = vec![
            KeyValue {
                key_strindex: 5,
                ..string_attr("process.owner", "alice")
            },
            string_attr("state", "idle"),
        ];
        request.resource_metrics[0].scope_metrics[0]
            .metrics
            .push(gauge_metric(
                "other",
                vec![
                    number_point(point_attributes, 2.0),
                    number_point(vec![string_attr("x", "y")], 3.0),
                ],
            ));
        let out = attributes(
            "actions: [{key: process.owner, action: rename, new_key: user}, {key: user, action: hash}]",
            request,
        );
        let metrics = &out.resource_metrics[0].scope_metrics[0].metrics;
        let Some(Data::Gauge(gauge)) = &metrics[1].data else {
            panic!("a gauge")
        };
        let renamed = &gauge.data_points[0].attributes[0];
        assert_eq!(renamed.key, "user");
        assert_eq!(renamed.key_strindex, 5);
        assert_eq!(render(renamed.value.as_ref()), "2bd806c97f0e00af");
        assert_eq!(gauge.data_points[1].attributes, vec![string_attr("x", "y")]);
    }
}
