//! Control-plane client: the `control_plane:` config section, config offers and how they merge
//! with the local file, the persisted last applied offer, and the connection itself
//! ([`client`]).
//!
//! The effective configuration is always *the local file merged with at most one offer*:
//!
//! * role `candidate`: the offer's `receivers`, `processors`, `exporters` and `pipelines` are
//!   added beside the local file's; a name the local file already defines is an error.
//! * role `baseline`: the offer's `pipelines` replace the local file's `pipelines`; the offer's
//!   components are added and replace local components of the same id; local receivers that no
//!   pipeline uses any more are left out.
//! * role `clear`: the local file alone.
//!
//! With role `candidate` or `baseline`, a `meter` key in the offer replaces the local file's
//! `meter` (the experiment decides what is measured); `clear` returns to the local one.
//!
//! A new offer replaces the previous one; it goes through the same validated build and swap
//! as a file reload, so a bad offer never replaces the running config.

pub mod client;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use crate::config::{self, AgentConfig, ConfigError, Issue};

pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_STATE_DIR: &str = "/var/lib/phoenix-agent";
/// The file in `state_dir` holding the last applied offer.
pub const STATE_FILE: &str = "applied-offer.json";
/// Top-level keys an offer may carry.
pub const OFFER_SECTIONS: [&str; 5] = ["receivers", "processors", "exporters", "pipelines", METER];
/// The offer key that replaces the local `meter` instead of adding entries.
const METER: &str = "meter";

/// `control_plane:`: where the agent connects and how it introduces itself.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// `http://host:port`, or `https://host:port` with `ca_file`, of the control plane's
    /// listener (gRPC and REST share it).
    pub endpoint: String,
    /// PEM file of the CA (or self-signed certificate) that signed the control plane's
    /// certificate; required with `https://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// File holding the agent's bearer token (an `agent` role token); read at each connect,
    /// so a rotated token is picked up. Without it the agent connects unauthenticated.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How often the agent sends a volume report.
    #[serde(default = "default_report_interval", with = "humantime_serde")]
    pub report_interval: Duration,
    /// Labels the control plane selects agents by (`role: web`, `zone: eu-1`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the last applied offer is kept so a restart comes back with it.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The agent's name in the fleet; defaults to the host name. `${env:NODE_NAME}` is the
    /// usual value in a DaemonSet.
    #[serde(default)]
    pub node_name: Option<String>,
}

fn default_report_interval() -> Duration {
    DEFAULT_REPORT_INTERVAL
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

impl ControlPlaneConfig {
    pub fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        let scheme = self
            .endpoint
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.host().is_some())
            .and_then(|u| u.scheme_str().map(str::to_string));
        match scheme.as_deref() {
            Some("http") => {}
            Some("https") if self.ca_file.is_none() => issues.push(Issue::new(
                "ca_file",
                "an https:// endpoint needs ca_file, the CA that signed the control plane's certificate",
            )),
            Some("https") => {}
            _ => issues.push(Issue::new(
                "endpoint",
                format!(
                    "expected http://host:port or https://host:port, got {:?}",
                    self.endpoint
                ),
            )),
        }
        if self.report_interval.is_zero() {
            issues.push(Issue::new("report_interval", "must be greater than 0"));
        }
        if self
            .node_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            issues.push(Issue::new("node_name", "may not be empty"));
        }
        for key in self.labels.keys() {
            if key.is_empty() || key.contains([',', '=', '!', ' ']) {
                issues.push(Issue::new(
                    format!("labels.{key}"),
                    "label keys may not be empty or contain ',', '=', '!' or spaces",
                ));
            }
        }
        issues
    }

    /// `node_name`, else the host name, else "unknown".
    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".to_string())
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfferRole {
    Candidate,
    Baseline,
    Clear,
}

impl OfferRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OfferRole::Candidate => "candidate",
            OfferRole::Baseline => "baseline",
            OfferRole::Clear => "clear",
        }
    }
}

/// A config offer from the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub hash: String,
    pub role: OfferRole,
    pub document: String,
}

/// Checks an offer document on its own: YAML, allowed sections, every component's config and
/// every pipeline's keys. References to components of an agent's local file can only be
/// checked on the agent.
pub fn check_document(document: &str) -> Vec<Issue> {
    let value: Value = match serde_yaml::from_str(document) {
        Ok(value) => value,
        Err(err) => return vec![Issue::new("", format!("invalid YAML: {err}"))],
    };
    let mapping = match value {
        Value::Mapping(m) => m,
        Value::Null => return vec![Issue::new("", "the document is empty")],
        _ => return vec![Issue::new("", "expected a mapping of sections")],
    };
    let mut issues = Vec::new();
    for (key, section) in mapping {
        let key = key.as_str().unwrap_or_default().to_string();
        if !OFFER_SECTIONS.contains(&key.as_str()) {
            issues.push(Issue::new(
                &key,
                format!("an offer may only hold {}", OFFER_SECTIONS.join(", ")),
            ));
            continue;
        }
        if key == METER {
            issues.extend(check_meter(section).into_iter().map(|i| i.under(METER)));
            continue;
        }
        let entries = match section {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                issues.push(Issue::new(&key, "expected a mapping"));
                continue;
            }
        };
        for (name, body) in entries {
            let name = name.as_str().unwrap_or_default().to_string();
            let path = format!("{key}.{name}");
            let id = if key == "pipelines" {
                None
            } else {
                match config::ComponentId::parse(&name) {
                    Ok(id) => Some(id),
                    Err(message) => {
                        issues.push(Issue::new(&path, message));
                        continue;
                    }
                }
            };
            let found = match (key.as_str(), id) {
                ("pipelines", _) => config::deserialize::<config::PipelineSpec>(body)
                    .err()
                    .into_iter()
                    .collect(),
                ("receivers", Some(id)) => {
                    crate::receiver::parse(&id, body).err().unwrap_or_default()
                }
                ("processors", Some(id)) => {
                    crate::processor::parse(&id, body).err().unwrap_or_default()
                }
                ("exporters", Some(id)) => {
                    crate::exporter::parse(&id, body).err().unwrap_or_default()
                }
                _ => Vec::new(),
            };
            issues.extend(found.into_iter().map(|i| i.under(&path)));
        }
    }
    issues
}

/// Checks an offered `meter` section; an empty one means no meter.
fn check_meter(section: Value) -> Vec<Issue> {
    if section.is_null() {
        return Vec::new();
    }
    let raw = match config::deserialize::<crate::stats::meter::RawMeterConfig>(section) {
        Ok(raw) => raw,
        Err(issue) => return vec![issue],
    };
    let mut issues = Vec::new();
    crate::stats::meter::MeterConfig::compile(raw, "", &mut issues);
    issues
}

/// Merges `offer` into the local file's YAML value (not yet substituted), by the rules in the
/// module docs. Problems are reported under `offer.<section>.<name>`.
pub fn merge(local: Value, offer: Option<&Offer>) -> Result<Value, Vec<Issue>> {
    let Some(offer) = offer else {
        return Ok(local);
    };
    if offer.role == OfferRole::Clear {
        return Ok(local);
    }
    let mut local = match local {
        Value::Mapping(m) => m,
        _ => return Err(vec![Issue::new("", "the local config is not a mapping")]),
    };
    let document: Value = serde_yaml::from_str(&offer.document)
        .map_err(|e| vec![Issue::new("offer", format!("invalid YAML: {e}"))])?;
    let document = match document {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => return Err(vec![Issue::new("offer", "expected a mapping of sections")]),
    };
    let mut issues = Vec::new();
    let mut offered_pipelines = None;
    for (key, section) in document {
        let key_name = key.as_str().unwrap_or_default().to_string();
        if !OFFER_SECTIONS.contains(&key_name.as_str()) {
            issues.push(Issue::new(
                format!("offer.{key_name}"),
                format!("an offer may only hold {}", OFFER_SECTIONS.join(", ")),
            ));
            continue;
        }
        if key_name == METER {
            // Validated with the rest of the merged config.
            local.insert(key, section);
            continue;
        }
        let entries = match section {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                issues.push(Issue::new(
                    format!("offer.{key_name}"),
                    "expected a mapping",
                ));
                continue;
            }
        };
        if offer.role == OfferRole::Baseline && key_name == "pipelines" {
            offered_pipelines = Some(entries);
            continue;
        }
        let target = local
            .entry(key.clone())
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if target.is_null() {
            *target = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(target) = target else {
            issues.push(Issue::new(&key_name, "expected a mapping"));
            continue;
        };
        for (name, body) in entries {
            if offer.role == OfferRole::Candidate && target.contains_key(&name) {
                issues.push(Issue::new(
                    format!("offer.{key_name}.{}", name.as_str().unwrap_or_default()),
                    "already defined by the local config; a candidate offer only adds",
                ));
                continue;
            }
            target.insert(name, body);
        }
    }
    if offer.role == OfferRole::Baseline {
        let Some(pipelines) = offered_pipelines else {
            issues.push(Issue::new(
                "offer.pipelines",
                "a baseline offer needs pipelines",
            ));
            return Err(issues);
        };
        let used: std::collections::HashSet<String> = pipelines
            .values()
            .filter_map(|p| p.get("receivers"))
            .filter_map(Value::as_sequence)
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect();
        if let Some(Value::Mapping(receivers)) = local.get_mut("receivers") {
            receivers.retain(|id, _| id.as_str().is_some_and(|id| used.contains(id)));
        }
        local.insert(Value::from("pipelines"), Value::Mapping(pipelines));
    }
    if issues.is_empty() {
        Ok(Value::Mapping(local))
    } else {
        Err(issues)
    }
}

/// Loads the local file at `path`, merges `offer` and builds the effective configuration.
pub fn effective_config(path: &Path, offer: Option<&Offer>) -> Result<AgentConfig, ConfigError> {
    let local = config::read_yaml(path)?;
    let merged = merge(local, offer).map_err(|issues| ConfigError::Invalid {
        file: path.to_path_buf(),
        issues,
    })?;
    AgentConfig::from_value(merged, path)
}

/// The last applied offer kept in `state_dir`, if any.
pub fn load_state(state_dir: &Path) -> std::io::Result<Option<Offer>> {
    let path = state_dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Keeps `offer` (or, for `None`, nothing) as the last applied offer: written to a temporary
/// file and renamed, so a crash leaves the old or the new state, never half of one.
pub fn save_state(state_dir: &Path, offer: Option<&Offer>) -> std::io::Result<()> {
    let path = state_dir.join(STATE_FILE);
    match offer {
        None => match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        },
        Some(offer) => {
            std::fs::create_dir_all(state_dir)?;
            let tmp = state_dir.join(format!("{STATE_FILE}.tmp"));
            let bytes = serde_json::to_vec_pretty(offer)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = r#"
receivers:
  otlp: { protocols: { grpc: { endpoint: "127.0.0.1:14417" } } }
exporters:
  blackhole: {}
pipelines:
  baseline: { receivers: [otlp], exporters: [blackhole] }
"#;

    fn offer(role: OfferRole, document: &str) -> Offer {
        Offer {
            hash: phoenix_hash(document),
            role,
            document: document.to_string(),
        }
    }

    fn phoenix_hash(document: &str) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(&Sha256::digest(document.as_bytes())[..16])
    }

    fn build(offer: Option<&Offer>) -> Result<AgentConfig, Vec<Issue>> {
        let local = config::parse_yaml(LOCAL, Path::new("a.yaml")).unwrap();
        let merged = merge(local, offer)?;
        AgentConfig::from_value(merged, Path::new("a.yaml")).map_err(|e| e.issues().to_vec())
    }

    #[test]
    fn a_candidate_offer_adds_beside_the_local_pipelines() {
        let doc = "exporters: { debug/c: {} }\npipelines: { candidate: { receivers: [otlp], exporters: [debug/c] } }\n";
        let config = build(Some(&offer(OfferRole::Candidate, doc))).unwrap();
        assert_eq!(
            config.pipelines.keys().collect::<Vec<_>>(),
            vec!["baseline", "candidate"]
        );
        assert_ne!(config.hash, build(None).unwrap().hash);
    }

    #[test]
    fn a_candidate_offer_may_not_redefine_local_names() {
        let doc = "pipelines: { baseline: { receivers: [otlp], exporters: [blackhole] } }\n";
        let issues = build(Some(&offer(OfferRole::Candidate, doc))).unwrap_err();
        assert_eq!(issues[0].path, "offer.pipelines.baseline");
    }

    #[test]
    fn a_baseline_offer_replaces_the_pipelines_and_drops_unused_receivers() {
        let doc = "receivers: { otlp/new: { protocols: { http: { endpoint: \"127.0.0.1:14418\" } } } }\nexporters: { debug: {} }\npipelines: { main: { receivers: [otlp/new], exporters: [debug] } }\n";
        let config = build(Some(&offer(OfferRole::Baseline, doc))).unwrap();
        assert_eq!(config.pipelines.keys().collect::<Vec<_>>(), vec!["main"]);
        assert_eq!(config.receivers.len(), 1);
        let issues = build(Some(&offer(
            OfferRole::Baseline,
            "exporters: { debug: {} }",
        )))
        .unwrap_err();
        assert_eq!(issues[0].path, "offer.pipelines");
    }

    #[test]
    fn offers_are_validated_like_files_and_clear_means_local_only() {
        let doc = "pipelines: { candidate: { receivers: [otlp], exporters: [nope] } }\n";
        let issues = build(Some(&offer(OfferRole::Candidate, doc))).unwrap_err();
        assert_eq!(issues[0].path, "pipelines.candidate.exporters[0]");
        let issues = build(Some(&offer(OfferRole::Candidate, "telemetry: {}"))).unwrap_err();
        assert_eq!(issues[0].path, "offer.telemetry");
        let cleared = build(Some(&offer(OfferRole::Clear, ""))).unwrap();
        assert_eq!(cleared.hash, build(None).unwrap().hash);
    }

    #[test]
    fn an_offered_meter_replaces_the_local_one_and_clear_restores_it() {
        let local = format!("{LOCAL}meter: {{ conserve: [local.counter] }}\n");
        let build = |offer: Option<&Offer>| {
            let value = config::parse_yaml(&local, Path::new("a.yaml")).unwrap();
            let merged = merge(value, offer)?;
            AgentConfig::from_value(merged, Path::new("a.yaml")).map_err(|e| e.issues().to_vec())
        };
        let local_meter = build(None).unwrap().meter.unwrap();
        let doc = "meter: { critical: { metric_names: [\"process.cpu.*\"] }, conserve: [process.cpu.time] }\nexporters: { debug/c: {} }\npipelines: { candidate: { receivers: [otlp], exporters: [debug/c] } }\n";
        for role in [OfferRole::Candidate, OfferRole::Baseline] {
            let merged = build(Some(&offer(role, doc))).unwrap();
            let meter = merged.meter.unwrap();
            assert_ne!(*meter, *local_meter, "{role:?}");
            let expected = AgentConfig::from_yaml(
                &format!("{LOCAL}meter: {{ critical: {{ metric_names: [\"process.cpu.*\"] }}, conserve: [process.cpu.time] }}\n"),
                Path::new("a.yaml"),
            )
            .unwrap()
            .meter
            .unwrap();
            assert_eq!(*meter, *expected, "{role:?}");
        }
        let cleared = build(Some(&offer(OfferRole::Clear, doc))).unwrap();
        assert_eq!(*cleared.meter.unwrap(), *local_meter);
        // A bad offered meter is refused with its path; other unknown sections still are.
        let issues = build(Some(&offer(
            OfferRole::Candidate,
            "meter: { conserve: [a], foo: 1 }",
        )))
        .unwrap_err();
        assert_eq!(issues[0].path, "meter.foo");
        let issues = build(Some(&offer(OfferRole::Candidate, "telemetry: {}"))).unwrap_err();
        assert_eq!(issues[0].path, "offer.telemetry");
        assert!(check_document("meter: { conserve: [a] }").is_empty());
        let paths: Vec<_> = check_document("meter: { critical: { metric_names: [\"regex:(\"] } }")
            .into_iter()
            .map(|i| i.path)
            .collect();
        assert_eq!(paths, vec!["meter.critical.metric_names[0]"]);
    }

    #[test]
    fn check_document_reports_component_errors_with_paths() {
        assert!(check_document("processors: { batch: { timeout: 1s } }").is_empty());
        let issues = check_document("processors: { batch: { timeout: soon } }\nservice: {}");
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, vec!["processors.batch.timeout", "service"]);
        assert_eq!(check_document("a: [").len(), 1);
    }

    #[test]
    fn state_round_trips_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_state(dir.path()).unwrap(), None);
        let o = offer(OfferRole::Candidate, "pipelines: {}");
        save_state(dir.path(), Some(&o)).unwrap();
        assert_eq!(load_state(dir.path()).unwrap(), Some(o));
        save_state(dir.path(), None).unwrap();
        assert_eq!(load_state(dir.path()).unwrap(), None);
    }

    #[test]
    fn https_needs_a_ca_file() {
        let yaml = format!("{LOCAL}control_plane: {{ endpoint: \"https://cp:4320\" }}\n");
        let err = AgentConfig::from_yaml(&yaml, Path::new("a.yaml")).unwrap_err();
        assert_eq!(err.issues()[0].path, "control_plane.ca_file");
        let yaml =
            format!("{LOCAL}control_plane: {{ endpoint: \"https://cp:4320\", ca_file: ca.pem }}\n");
        assert!(AgentConfig::from_yaml(&yaml, Path::new("a.yaml")).is_ok());
    }

    #[test]
    fn control_plane_section_is_validated() {
        let yaml = format!("{LOCAL}control_plane: {{ endpoint: \"localhost:1\", report_interval: 0s, labels: {{ \"a=b\": x }} }}\n");
        let err = AgentConfig::from_yaml(&yaml, Path::new("a.yaml")).unwrap_err();
        let paths: Vec<_> = err.issues().iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "control_plane.endpoint",
                "control_plane.report_interval",
                "control_plane.labels.a=b"
            ]
        );
    }
}
