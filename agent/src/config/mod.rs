//! Agent configuration: read, substitute, parse strictly, validate, and report every problem
//! with its key path.
//!
//! Raw YAML becomes typed, compiled component configs here; nothing downstream re-parses.

pub mod env;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use crate::control::ControlPlaneConfig;
use crate::exporter::{self, ExporterConfig};
use crate::processor::{self, ProcessorConfig};
use crate::receiver::{self, ReceiverConfig};
use crate::stats::meter::{MeterConfig, RawMeterConfig};

/// One problem in a configuration, at a key path such as
/// `processors.filter/x.include.metric_names[2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl Issue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The same issue under a parent key.
    pub fn under(mut self, parent: &str) -> Self {
        self.path = join_path(parent, &self.path);
        self
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

pub fn join_path(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_string(),
        (_, true) => parent.to_string(),
        _ if child.starts_with('[') => format!("{parent}{child}"),
        _ => format!("{parent}.{child}"),
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: invalid YAML: {message}")]
    Yaml { file: PathBuf, message: String },
    #[error("{file}: {} error(s) in config:\n{}", .issues.len(), IssueList(.issues))]
    Invalid { file: PathBuf, issues: Vec<Issue> },
}

impl ConfigError {
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid { issues, .. } => issues,
            _ => &[],
        }
    }
}

struct IssueList<'a>(&'a [Issue]);

impl fmt::Display for IssueList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {issue}")?;
        }
        Ok(())
    }
}

/// Deserializes a component's config, rejecting unknown keys, with the failing key's path.
/// An empty body (`blackhole:` or `blackhole: {}`) means all defaults.
pub fn deserialize<T: DeserializeOwned>(value: Value) -> Result<T, Issue> {
    let value = match value {
        Value::Null => Value::Mapping(Default::default()),
        other => other,
    };
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        Issue::new(path, err.into_inner().to_string())
    })
}

/// A component id: `type` or `type/name`, as in the OpenTelemetry Collector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentId(String);

impl ComponentId {
    pub fn parse(id: &str) -> Result<Self, String> {
        let (kind, name) = match id.split_once('/') {
            Some((kind, name)) => (kind, Some(name)),
            None => (id, None),
        };
        let kind_ok = !kind.is_empty()
            && kind
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !kind_ok {
            return Err(format!(
                "invalid component id {id:?}: the type must be lowercase letters, digits or '_'"
            ));
        }
        if name.is_some_and(|n| n.is_empty() || n.contains('/')) {
            return Err(format!(
                "invalid component id {id:?}: expected `type` or `type/name`"
            ));
        }
        Ok(Self(id.to_string()))
    }

    pub fn kind(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ComponentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed component with the raw value it came from, which reload compares to decide
/// whether a running instance can be kept.
#[derive(Debug)]
pub struct Component<C: ?Sized> {
    pub id: ComponentId,
    pub raw: Value,
    pub config: Arc<C>,
}

impl<C: ?Sized> Clone for Component<C> {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            raw: self.raw.clone(),
            config: self.config.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub receivers: Vec<String>,
    #[serde(default)]
    pub processors: Vec<String>,
    pub exporters: Vec<String>,
    /// A shadow pipeline drops and counts when its queue is full instead of pushing back on
    /// receivers, so it can never slow the baseline.
    #[serde(default)]
    pub shadow: bool,
    /// Batches the pipeline's input queue holds before it pushes back or, if shadow, drops.
    /// A full queue holds this many received requests in memory (64 × a 770 KB request is
    /// about 50 MB).
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
}

pub const DEFAULT_PIPELINE_QUEUE_SIZE: usize = 64;

fn default_queue_size() -> usize {
    DEFAULT_PIPELINE_QUEUE_SIZE
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_telemetry_listen")]
    pub listen: String,
}

pub const DEFAULT_TELEMETRY_LISTEN: &str = "127.0.0.1:8888";

fn default_telemetry_listen() -> String {
    DEFAULT_TELEMETRY_LISTEN.to_string()
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            listen: default_telemetry_listen(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    receivers: IndexMap<String, Value>,
    #[serde(default)]
    processors: IndexMap<String, Value>,
    #[serde(default)]
    exporters: IndexMap<String, Value>,
    pipelines: IndexMap<String, PipelineSpec>,
    #[serde(default)]
    telemetry: TelemetryConfig,
    /// How long shutdown may take to drain queues and batches to exporters.
    #[serde(default = "default_grace", with = "humantime_serde")]
    shutdown_grace_period: Duration,
    /// Optional connection to a Phoenix control plane.
    #[serde(default)]
    control_plane: Option<ControlPlaneConfig>,
    /// Optional experiment measurements on every pipeline's output.
    #[serde(default)]
    meter: Option<RawMeterConfig>,
}

pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(30);

fn default_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE_PERIOD
}

/// A complete, validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub source: PathBuf,
    pub receivers: IndexMap<ComponentId, Component<dyn ReceiverConfig>>,
    pub processors: IndexMap<ComponentId, Component<dyn ProcessorConfig>>,
    pub exporters: IndexMap<ComponentId, Component<dyn ExporterConfig>>,
    pub pipelines: IndexMap<String, PipelineSpec>,
    pub telemetry: TelemetryConfig,
    pub shutdown_grace_period: Duration,
    pub control_plane: Option<ControlPlaneConfig>,
    /// The `meter` section, compiled; every pipeline's output meter applies it.
    pub meter: Option<Arc<MeterConfig>>,
    /// SHA-256 of the effective (substituted) configuration, hex, first 16 bytes.
    pub hash: String,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses `text`; `source` names the file in errors.
    pub fn from_yaml(text: &str, source: &Path) -> Result<Self, ConfigError> {
        Self::from_value(parse_yaml(text, source)?, source)
    }

    /// Builds the config from a YAML value not yet substituted (a file's content, or a file
    /// merged with a control-plane offer); `source` names it in errors.
    pub fn from_value(mut value: Value, source: &Path) -> Result<Self, ConfigError> {
        let file = source.to_path_buf();
        let mut issues = Vec::new();
        env::substitute(&mut value, "", &mut issues);
        if !issues.is_empty() {
            return Err(ConfigError::Invalid { file, issues });
        }
        let hash = {
            let canonical = serde_yaml::to_string(&value).unwrap_or_default();
            hex::encode(&Sha256::digest(canonical.as_bytes())[..16])
        };
        let raw: RawConfig = deserialize(value).map_err(|issue| ConfigError::Invalid {
            file: file.clone(),
            issues: vec![issue],
        })?;
        let config = build(raw, file.clone(), hash, &mut issues);
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { file, issues })
        }
    }
}

/// Parses YAML text into a value, naming `source` in the error.
pub fn parse_yaml(text: &str, source: &Path) -> Result<Value, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml {
        file: source.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads and parses a config file's YAML, not yet substituted.
pub fn read_yaml(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse_yaml(&text, path)
}

fn parse_components<C: ?Sized>(
    section: &str,
    kind_label: &str,
    entries: IndexMap<String, Value>,
    parse: impl Fn(&ComponentId, Value) -> Result<Arc<C>, Vec<Issue>>,
    issues: &mut Vec<Issue>,
) -> IndexMap<ComponentId, Component<C>> {
    let mut out = IndexMap::new();
    for (key, raw) in entries {
        let path = format!("{section}.{key}");
        let id = match ComponentId::parse(&key) {
            Ok(id) => id,
            Err(message) => {
                issues.push(Issue::new(&path, message));
                continue;
            }
        };
        match parse(&id, raw.clone()) {
            Ok(config) => {
                out.insert(id.clone(), Component { id, raw, config });
            }
            Err(found) => {
                if found.is_empty() {
                    issues.push(Issue::new(&path, format!("invalid {kind_label}")));
                }
                issues.extend(found.into_iter().map(|i| i.under(&path)));
            }
        }
    }
    out
}

fn build(raw: RawConfig, source: PathBuf, hash: String, issues: &mut Vec<Issue>) -> AgentConfig {
    // Components that are defined but invalid are reported once, where they are defined,
    // not again at every pipeline that names them.
    let declared = |m: &IndexMap<String, Value>| m.keys().cloned().collect::<HashSet<String>>();
    let (declared_receivers, declared_processors, declared_exporters) = (
        declared(&raw.receivers),
        declared(&raw.processors),
        declared(&raw.exporters),
    );
    let receivers = parse_components(
        "receivers",
        "receiver",
        raw.receivers,
        receiver::parse,
        issues,
    );
    let processors = parse_components(
        "processors",
        "processor",
        raw.processors,
        processor::parse,
        issues,
    );
    let exporters = parse_components(
        "exporters",
        "exporter",
        raw.exporters,
        exporter::parse,
        issues,
    );

    if raw.pipelines.is_empty() {
        issues.push(Issue::new("pipelines", "at least one pipeline is required"));
    }
    let mut used_receivers = HashSet::new();
    for (name, pipeline) in &raw.pipelines {
        let path = format!("pipelines.{name}");
        if name.is_empty() || name.contains(['/', ' ', '"']) {
            issues.push(Issue::new(
                &path,
                "pipeline names may not be empty or contain '/', spaces or quotes",
            ));
        }
        if pipeline.receivers.is_empty() {
            issues.push(Issue::new(
                format!("{path}.receivers"),
                "a pipeline needs at least one receiver",
            ));
        }
        if pipeline.exporters.is_empty() {
            issues.push(Issue::new(
                format!("{path}.exporters"),
                "a pipeline needs at least one exporter",
            ));
        }
        if pipeline.queue_size == 0 {
            issues.push(Issue::new(
                format!("{path}.queue_size"),
                "must be greater than 0",
            ));
        }
        check_references(
            &path,
            "receivers",
            "receiver",
            &pipeline.receivers,
            &declared_receivers,
            issues,
        );
        check_references(
            &path,
            "processors",
            "processor",
            &pipeline.processors,
            &declared_processors,
            issues,
        );
        check_references(
            &path,
            "exporters",
            "exporter",
            &pipeline.exporters,
            &declared_exporters,
            issues,
        );
        used_receivers.extend(pipeline.receivers.iter().cloned());
    }
    for id in receivers.keys() {
        if !used_receivers.contains(id.as_str()) {
            issues.push(Issue::new(
                format!("receivers.{id}"),
                "receiver is not used by any pipeline",
            ));
        }
    }

    // Two listeners on one address would fail at bind time; say which keys collide instead.
    let mut listeners: HashMap<String, String> = HashMap::new();
    let mut endpoints: Vec<(String, String)> = receivers
        .iter()
        .flat_map(|(id, c)| {
            c.config
                .listen_addresses()
                .into_iter()
                .map(move |(key, addr)| (join_path(&format!("receivers.{id}"), &key), addr))
        })
        .collect();
    endpoints.push(("telemetry.listen".to_string(), raw.telemetry.listen.clone()));
    for (key, addr) in endpoints {
        if let Some(first) = listeners.get(&addr) {
            issues.push(Issue::new(
                &key,
                format!("address {addr} is already used by {first}"),
            ));
        } else {
            listeners.insert(addr, key);
        }
    }

    if let Some(control_plane) = &raw.control_plane {
        issues.extend(
            control_plane
                .validate()
                .into_iter()
                .map(|i| i.under("control_plane")),
        );
    }

    let meter = raw
        .meter
        .and_then(|m| MeterConfig::compile(m, "meter", issues))
        .map(Arc::new);

    AgentConfig {
        source,
        receivers,
        processors,
        exporters,
        pipelines: raw.pipelines,
        telemetry: raw.telemetry,
        shutdown_grace_period: raw.shutdown_grace_period,
        control_plane: raw.control_plane,
        meter,
        hash,
    }
}

fn check_references(
    pipeline_path: &str,
    list: &str,
    kind_label: &str,
    ids: &[String],
    defined: &HashSet<String>,
    issues: &mut Vec<Issue>,
) {
    let mut seen = HashSet::new();
    for (i, id) in ids.iter().enumerate() {
        let path = format!("{pipeline_path}.{list}[{i}]");
        if !defined.contains(id) {
            issues.push(Issue::new(
                path,
                format!("{kind_label} {id:?} is not defined in `{list}`"),
            ));
        } else if !seen.insert(id) {
            issues.push(Issue::new(
                path,
                format!("{kind_label} {id:?} is listed twice"),
            ));
        }
    }
}

/// The factory registered for `id`'s type, or an issue listing the types there are.
pub fn find_factory<'a, F>(
    factories: &'a [F],
    type_name: impl Fn(&F) -> &'static str,
    kind_label: &str,
    id: &ComponentId,
) -> Result<&'a F, Vec<Issue>> {
    factories
        .iter()
        .find(|f| type_name(f) == id.kind())
        .ok_or_else(|| {
            let known: Vec<&str> = factories.iter().map(type_name).collect();
            vec![Issue::new(
                "",
                format!(
                    "unknown {kind_label} type {:?}; known types: {}",
                    id.kind(),
                    known.join(", ")
                ),
            )]
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
receivers:
  otlp: { protocols: { grpc: { endpoint: "127.0.0.1:14317" } } }
processors:
  batch: { timeout: 1s }
exporters:
  blackhole: {}
pipelines:
  baseline: { receivers: [otlp], processors: [batch], exporters: [blackhole] }
"#;

    fn issues(yaml: &str) -> Vec<Issue> {
        match AgentConfig::from_yaml(yaml, Path::new("agent.yaml")) {
            Ok(_) => Vec::new(),
            Err(err) => err.issues().to_vec(),
        }
    }

    fn paths(yaml: &str) -> Vec<String> {
        issues(yaml).into_iter().map(|i| i.path).collect()
    }

    #[test]
    fn a_valid_config_parses_with_defaults() {
        let config = AgentConfig::from_yaml(VALID, Path::new("agent.yaml")).unwrap();
        assert_eq!(
            config.pipelines["baseline"].queue_size,
            DEFAULT_PIPELINE_QUEUE_SIZE
        );
        assert!(!config.pipelines["baseline"].shadow);
        assert_eq!(config.telemetry.listen, DEFAULT_TELEMETRY_LISTEN);
        assert_eq!(config.shutdown_grace_period, DEFAULT_SHUTDOWN_GRACE_PERIOD);
        assert_eq!(config.hash.len(), 32);
    }

    #[test]
    fn unknown_keys_are_named_with_the_expected_ones() {
        let found = issues(&format!("{VALID}\nservice: {{}}\n"));
        assert_eq!(found.len(), 1);
        assert!(found[0].message.contains("unknown field `service`"));
        assert!(found[0].message.contains("expected one of"));
        let found = issues(&VALID.replace("{ timeout: 1s }", "{ timeout: 1s, size: 3 }"));
        assert_eq!(found[0].path, "processors.batch.size");
    }

    #[test]
    fn unknown_types_undefined_references_and_unused_receivers() {
        let yaml = VALID
            .replace("  batch: { timeout: 1s }", "  batch: { timeout: 1s }\n  sample/cpu: { k: 1 }")
            .replace("processors: [batch]", "processors: [batch, filter/missing]")
            .replace(
                "  otlp: { protocols",
                "  otlp/spare: { protocols: { http: { endpoint: \"127.0.0.1:14318\" } } }\n  otlp: { protocols",
            );
        assert_eq!(
            paths(&yaml),
            vec![
                "processors.sample/cpu",
                "pipelines.baseline.processors[1]",
                "receivers.otlp/spare"
            ]
        );
        let found = issues(&yaml);
        assert!(found[0]
            .message
            .contains("unknown processor type \"sample\""));
        assert!(found[1]
            .message
            .contains("\"filter/missing\" is not defined"));
        assert!(found[2].message.contains("not used by any pipeline"));
    }

    #[test]
    fn duplicate_listen_addresses_name_both_keys() {
        let yaml = format!("{VALID}\ntelemetry: {{ listen: \"127.0.0.1:14317\" }}\n");
        let found = issues(&yaml);
        assert_eq!(found[0].path, "telemetry.listen");
        assert!(found[0]
            .message
            .contains("already used by receivers.otlp.protocols.grpc.endpoint"));
    }

    #[test]
    fn unparsable_durations_name_their_key() {
        let found = issues(&VALID.replace("timeout: 1s", "timeout: soon"));
        assert_eq!(found[0].path, "processors.batch.timeout");
        let found = issues(&format!("{VALID}\nshutdown_grace_period: forever\n"));
        assert_eq!(found[0].path, "shutdown_grace_period");
    }

    #[test]
    fn environment_references_are_substituted_before_parsing() {
        std::env::set_var("PHOENIX_TEST_QUEUE", "7");
        let yaml = VALID.replace(
            "exporters: [blackhole] }",
            "exporters: [blackhole], queue_size: \"${env:PHOENIX_TEST_QUEUE}\" }",
        );
        let config = AgentConfig::from_yaml(&yaml, Path::new("a.yaml")).unwrap();
        assert_eq!(config.pipelines["baseline"].queue_size, 7);
        let err = AgentConfig::from_yaml(
            &VALID.replace("1s", "\"${env:PHOENIX_TEST_UNSET_DURATION}\""),
            Path::new("a.yaml"),
        )
        .unwrap_err();
        assert_eq!(err.issues()[0].path, "processors.batch.timeout");
        assert!(err.to_string().starts_with("a.yaml: 1 error(s) in config"));
    }

    #[test]
    fn component_ids_are_type_slash_name() {
        assert!(ComponentId::parse("otlp/backend").is_ok());
        assert_eq!(ComponentId::parse("otlp/backend").unwrap().kind(), "otlp");
        assert!(ComponentId::parse("Otlp").is_err());
        assert!(ComponentId::parse("otlp/").is_err());
        assert!(ComponentId::parse("a/b/c").is_err());
    }

    #[test]
    fn meter_config_errors_name_their_key() {
        let meter = |body: &str| format!("{VALID}\nmeter: {body}\n");
        let ok = AgentConfig::from_yaml(
            &meter("{ critical: { metric_names: [\"process.cpu.*\", \"regex:^kube_.*\"], resource_attributes: { service.name: [checkout, \"pay*\"] }, attributes: { phoenix.priority: [critical] } }, conserve: [process.cpu.time, http.server.requests] }"),
            Path::new("a.yaml"),
        )
        .unwrap();
        assert!(ok.meter.is_some());
        assert!(AgentConfig::from_yaml(VALID, Path::new("a.yaml"))
            .unwrap()
            .meter
            .is_none());
        assert_eq!(
            paths(&meter("{ critical: { metric_names: [ok, \"regex:(\"] } }")),
            vec!["meter.critical.metric_names[1]"]
        );
        assert_eq!(paths(&meter("{ conserve: 3 }")), vec!["meter.conserve"]);
        assert_eq!(
            paths(&meter("{ conserve: [a], foo: 1 }")),
            vec!["meter.foo"]
        );
        assert_eq!(
            paths(&meter("{ critical: { names: [a] } }")),
            vec!["meter.critical.names"]
        );
        assert_eq!(
            paths(&meter("{ conserve: [a, a] }")),
            vec!["meter.conserve[1]"]
        );
        assert_eq!(paths(&meter("{ conserve: [] }")), vec!["meter.conserve"]);
        assert_eq!(paths(&meter("{ critical: {} }")), vec!["meter.critical"]);
        assert_eq!(paths(&meter("{}")), vec!["meter"]);
        assert_eq!(
            paths(&meter("{ critical: { attributes: { k: [\"[\"] } } }")),
            vec!["meter.critical.attributes.k[0]"]
        );
    }

    #[test]
    fn yaml_errors_name_the_file() {
        let err = AgentConfig::from_yaml("receivers: [", Path::new("x.yaml")).unwrap_err();
        assert!(err.to_string().starts_with("x.yaml: invalid YAML"));
    }
}
