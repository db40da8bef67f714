//! What an operator submits (`phoenixctl experiment create -f exp.yaml`, `POST
//! /api/v1/experiments`), its checks, and the offers built from it: the shadow candidate
//! added beside the targets' baseline, and the baseline that replaces it on promotion.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml::{Mapping, Value};

use crate::selector::Selector;

/// A percentage, written `50%` or `50`; kept as a fraction (0.5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(into = "String")]
pub struct Percent(pub f64);

impl From<Percent> for String {
    fn from(p: Percent) -> String {
        format!("{}%", p.0 * 100.0)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let value = match Raw::deserialize(deserializer)? {
            Raw::Number(n) => n,
            Raw::Text(t) => t
                .trim()
                .strip_suffix('%')
                .unwrap_or(t.trim())
                .trim()
                .parse::<f64>()
                .map_err(|_| {
                    serde::de::Error::custom(format!("expected a percentage like 50%, got {t:?}"))
                })?,
        };
        if !value.is_finite() || value < 0.0 {
            return Err(serde::de::Error::custom(format!(
                "expected a percentage of 0 or more, got {value}"
            )));
        }
        Ok(Percent(value / 100.0))
    }
}

/// Two of the agents' 10 s meter windows: the first complete series count of a pipeline
/// started (or a meter reconfigured) mid-window is the second one.
pub const MIN_WARMUP: Duration = Duration::from_secs(20);
/// Longer than any experiment needs, and short enough for millisecond arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn default_baseline_pipeline() -> String {
    "baseline".into()
}
fn default_warmup() -> Duration {
    Duration::from_secs(30)
}
fn default_window() -> Duration {
    Duration::from_secs(10)
}
fn default_max_unavailable() -> u32 {
    1
}
fn default_tolerance() -> Percent {
    Percent(0.01)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Label selector of the target agents (`role=web,zone!=b`); empty: every agent.
    #[serde(default)]
    pub selector: String,
    #[serde(default)]
    pub baseline: BaselineSpec,
    pub candidate: CandidateSpec,
    /// Time after the candidate is deployed before windows count (state settling, first
    /// aggregation intervals).
    #[serde(default = "default_warmup", with = "humantime_serde")]
    pub warmup: Duration,
    /// How long windows are measured after the warm-up.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Length of one measured window; also how long the targets are measured without the
    /// candidate before it is deployed.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    #[serde(default)]
    pub criteria: Criteria,
    #[serde(default)]
    pub cost: CostModel,
    /// Agents changed at once by the candidate's and the promotion's rollouts.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    /// The agents' pipeline the candidate is compared with.
    #[serde(default = "default_baseline_pipeline")]
    pub pipeline: String,
    /// Where the promoted pipeline ships (exporters of the agents' local files, or defined in
    /// `candidate.exporters`); promotion needs them.
    #[serde(default)]
    pub exporters: Vec<String>,
}

impl Default for BaselineSpec {
    fn default() -> Self {
        Self {
            pipeline: default_baseline_pipeline(),
            exporters: Vec::new(),
        }
    }
}

/// The candidate, in agent config syntax: components and one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateSpec {
    #[serde(default)]
    pub processors: Mapping,
    #[serde(default)]
    pub exporters: Mapping,
    pub pipeline: CandidatePipeline,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidatePipeline {
    /// Receivers of the agents' local files: the candidate reads the same input as the
    /// baseline, from the same receivers (one scrape, no double collection).
    pub receivers: Vec<String>,
    #[serde(default)]
    pub processors: Vec<String>,
    /// Empty: a blackhole; the candidate's output is measured, not shipped.
    #[serde(default)]
    pub exporters: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criteria {
    pub min_series_reduction: Option<Percent>,
    pub min_datapoints_reduction: Option<Percent>,
    pub min_bytes_reduction: Option<Percent>,
    /// Series the candidate must keep, all of them: the agents' `meter.critical` selector
    /// (`metric_names`, `resource_attributes`, `attributes`).
    pub critical: Option<Value>,
    /// Extra agent CPU of running the candidate, relative to the agents without it.
    pub max_cpu_overhead: Option<Percent>,
    /// Counters whose totals the candidate must keep.
    #[serde(default)]
    pub conserve: Vec<Conserve>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conserve {
    pub metric: String,
    #[serde(default = "default_tolerance")]
    pub tolerance: Percent,
}

/// Prices for the cost estimate, in any currency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    #[serde(default = "CostModel::default_per_million_datapoints")]
    pub per_million_datapoints: f64,
    /// Per active series and month.
    #[serde(default = "CostModel::default_per_series")]
    pub per_series: f64,
}

impl CostModel {
    fn default_per_million_datapoints() -> f64 {
        0.05
    }
    fn default_per_series() -> f64 {
        0.008
    }
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            per_million_datapoints: Self::default_per_million_datapoints(),
            per_series: Self::default_per_series(),
        }
    }
}

/// Parses and checks a definition (YAML or JSON); every problem names its field.
pub fn parse(document: &str) -> Result<Definition, Vec<String>> {
    let deserializer = serde_yaml::Deserializer::from_str(document);
    let definition: Definition = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            vec![inner]
        } else {
            vec![format!("{path}: {inner}")]
        }
    })?;
    let problems = definition.problems();
    if problems.is_empty() {
        Ok(definition)
    } else {
        Err(problems)
    }
}

impl Definition {
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: &str| problems.push(format!("{field}: {message}"));
        if self.name.trim().is_empty() {
            problem("name", "must not be empty");
        }
        if let Err(err) = Selector::parse(&self.selector) {
            problem("selector", &err.to_string());
        }
        if self.baseline.pipeline.trim().is_empty() {
            problem("baseline.pipeline", "must not be empty");
        }
        if self.warmup < MIN_WARMUP {
            problem(
                "warmup",
                "must be at least 20s: agents count series per 10 s window, and the first one after the candidate starts may be partial",
            );
        }
        if self.duration.is_zero() {
            problem("duration", "must be longer than 0s");
        } else if self.duration > MAX_DURATION {
            problem("duration", "must be at most 30 days");
        }
        if self.warmup > MAX_DURATION {
            problem("warmup", "must be at most 30 days");
        }
        if self.window < Duration::from_secs(1) {
            problem("window", "must be at least 1s");
        } else if self.window > self.duration && !self.duration.is_zero() {
            problem("window", "must not be longer than duration");
        }
        if self.max_unavailable == 0 {
            problem("max_unavailable", "must be at least 1");
        }
        if self.candidate.pipeline.receivers.is_empty() {
            problem(
                "candidate.pipeline.receivers",
                "must name at least one receiver of the agents",
            );
        }
        for (field, value) in [
            (
                "criteria.min_series_reduction",
                self.criteria.min_series_reduction,
            ),
            (
                "criteria.min_datapoints_reduction",
                self.criteria.min_datapoints_reduction,
            ),
            (
                "criteria.min_bytes_reduction",
                self.criteria.min_bytes_reduction,
            ),
        ] {
            if value.is_some_and(|p| p.0 > 1.0) {
                problem(field, "a reduction can be at most 100%");
            }
        }
        for (i, conserve) in self.criteria.conserve.iter().enumerate() {
            if conserve.metric.trim().is_empty() {
                problem(
                    &format!("criteria.conserve[{i}].metric"),
                    "must not be empty",
                );
            }
        }
        for (field, price) in [
            (
                "cost.per_million_datapoints",
                self.cost.per_million_datapoints,
            ),
            ("cost.per_series", self.cost.per_series),
        ] {
            if !price.is_finite() || price < 0.0 {
                problem(field, "must be a price of 0 or more");
            }
        }
        // The offers are checked as the agents will check them (components, meter); the
        // promotion's only when it is possible (promote says why it is not).
        let mut offers = vec![("candidate", self.candidate_offer(0))];
        if !self.baseline.exporters.is_empty() {
            offers.push(("baseline", self.promotion_offer()));
        }
        for (what, offer) in offers {
            match offer {
                Ok(document) => {
                    for issue in phoenix_agent::control::check_document(&document) {
                        problems.push(format!("{what} offer: {issue}"));
                    }
                }
                Err(err) => problems.push(format!("{what}: {err}")),
            }
        }
        problems
    }

    /// The candidate pipeline's name on the agents.
    pub fn candidate_pipeline(id: i64) -> String {
        format!("experiment_{id}")
    }

    /// The offer that adds the candidate in shadow beside the baseline (role `candidate`),
    /// with the meter settings the criteria need.
    pub fn candidate_offer(&self, id: i64) -> Result<String, String> {
        let mut exporters = self.candidate.exporters.clone();
        let mut pipeline_exporters = self.candidate.pipeline.exporters.clone();
        if pipeline_exporters.is_empty() {
            let blackhole = format!("blackhole/experiment_{id}");
            exporters.insert(
                Value::from(blackhole.clone()),
                Value::Mapping(Mapping::new()),
            );
            pipeline_exporters.push(blackhole);
        }
        let mut document = Mapping::new();
        if !self.candidate.processors.is_empty() {
            document.insert(
                "processors".into(),
                Value::Mapping(self.candidate.processors.clone()),
            );
        }
        document.insert("exporters".into(), Value::Mapping(exporters));
        let pipeline = serde_yaml::to_value(CandidatePipelineWithShadow {
            receivers: &self.candidate.pipeline.receivers,
            processors: &self.candidate.pipeline.processors,
            exporters: &pipeline_exporters,
            shadow: true,
        })
        .map_err(|e| e.to_string())?;
        let mut pipelines = Mapping::new();
        pipelines.insert(Self::candidate_pipeline(id).into(), pipeline);
        document.insert("pipelines".into(), Value::Mapping(pipelines));
        if let Some(meter) = self.meter() {
            document.insert("meter".into(), meter);
        }
        serde_yaml::to_string(&document).map_err(|e| e.to_string())
    }

    /// What the agents' meters must count for the criteria: critical series and conserved
    /// counters, on every pipeline.
    fn meter(&self) -> Option<Value> {
        let mut meter = Mapping::new();
        if let Some(critical) = &self.criteria.critical {
            meter.insert("critical".into(), critical.clone());
        }
        if !self.criteria.conserve.is_empty() {
            let names: Vec<Value> = self
                .criteria
                .conserve
                .iter()
                .map(|c| Value::from(c.metric.clone()))
                .collect();
            meter.insert("conserve".into(), Value::Sequence(names));
        }
        (!meter.is_empty()).then_some(Value::Mapping(meter))
    }

    /// The offer that makes the candidate the targets' baseline (role `baseline`): the
    /// candidate's processing under the baseline pipeline's name, shipping to
    /// `baseline.exporters`.
    pub fn promotion_offer(&self) -> Result<String, String> {
        if self.baseline.exporters.is_empty() {
            return Err("baseline.exporters must name where the promoted pipeline ships".into());
        }
        let mut document = Mapping::new();
        if !self.candidate.processors.is_empty() {
            document.insert(
                "processors".into(),
                Value::Mapping(self.candidate.processors.clone()),
            );
        }
        // Only the exporters the promoted pipeline ships to: the candidate's own (a test sink,
        // a blackhole) are not carried into the baseline.
        let exporters: Mapping = self
            .candidate
            .exporters
            .iter()
            .filter(|(id, _)| {
                id.as_str()
                    .is_some_and(|id| self.baseline.exporters.iter().any(|e| e == id))
            })
            .map(|(id, body)| (id.clone(), body.clone()))
            .collect();
        if !exporters.is_empty() {
            document.insert("exporters".into(), Value::Mapping(exporters));
        }
        let pipeline = serde_yaml::to_value(CandidatePipelineWithShadow {
            receivers: &self.candidate.pipeline.receivers,
            processors: &self.candidate.pipeline.processors,
            exporters: &self.baseline.exporters,
            shadow: false,
        })
        .map_err(|e| e.to_string())?;
        let mut pipelines = Mapping::new();
        pipelines.insert(self.baseline.pipeline.clone().into(), pipeline);
        document.insert("pipelines".into(), Value::Mapping(pipelines));
        serde_yaml::to_string(&document).map_err(|e| e.to_string())
    }
}

#[derive(Serialize)]
struct CandidatePipelineWithShadow<'a> {
    receivers: &'a [String],
    processors: &'a [String],
    exporters: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadow: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"
name: balanced
selector: role=web
baseline: { pipeline: baseline, exporters: [otlp/backend] }
candidate:
  processors:
    aggregate/exp: { interval: 10s, keep: [host.name, process.executable.name] }
  pipeline: { receivers: [otlp], processors: [aggregate/exp] }
warmup: 20s
duration: 1m
window: 10s
criteria:
  min_series_reduction: 50%
  min_datapoints_reduction: 40
  critical: { attributes: { phoenix.priority: [critical] } }
  max_cpu_overhead: 200%
  conserve: [{ metric: process.cpu.time, tolerance: 2% }]
cost: { per_million_datapoints: 0.1, per_series: 0.01 }
"#;

    #[test]
    fn a_full_definition_parses_with_percentages_as_fractions() {
        let d = parse(SAMPLE).unwrap();
        assert_eq!(d.criteria.min_series_reduction, Some(Percent(0.5)));
        assert_eq!(d.criteria.min_datapoints_reduction, Some(Percent(0.4)));
        assert_eq!(d.criteria.conserve[0].tolerance, Percent(0.02));
        assert_eq!(d.duration, Duration::from_secs(60));
        assert_eq!(d.baseline.exporters, vec!["otlp/backend"]);
    }

    #[test]
    fn the_candidate_offer_adds_a_shadow_pipeline_a_blackhole_and_the_meter() {
        let d = parse(SAMPLE).unwrap();
        let offer: Value = serde_yaml::from_str(&d.candidate_offer(7).unwrap()).unwrap();
        let pipeline = &offer["pipelines"]["experiment_7"];
        assert_eq!(pipeline["shadow"], Value::Bool(true));
        assert_eq!(
            pipeline["exporters"][0],
            Value::from("blackhole/experiment_7")
        );
        assert!(offer["exporters"]["blackhole/experiment_7"].is_mapping());
        assert!(offer["processors"]["aggregate/exp"].is_mapping());
        assert_eq!(
            offer["meter"]["conserve"][0],
            Value::from("process.cpu.time")
        );
        assert!(offer["meter"]["critical"]["attributes"].is_mapping());
    }

    #[test]
    fn the_promotion_offer_runs_the_candidate_under_the_baseline_name() {
        let d = parse(SAMPLE).unwrap();
        let offer: Value = serde_yaml::from_str(&d.promotion_offer().unwrap()).unwrap();
        let pipeline = &offer["pipelines"]["baseline"];
        assert_eq!(pipeline["processors"][0], Value::from("aggregate/exp"));
        assert_eq!(pipeline["exporters"][0], Value::from("otlp/backend"));
        assert!(pipeline.get("shadow").is_none());
        assert!(offer.get("meter").is_none());
    }

    fn problems(document: &str) -> Vec<String> {
        parse(document).unwrap_err()
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let p =
            problems(&SAMPLE.replace("min_series_reduction: 50%", "min_series_reduction: lots"));
        assert!(p[0].starts_with("criteria.min_series_reduction:"), "{p:?}");
        let p = problems(&SAMPLE.replace("duration: 1m", "duration: soon"));
        assert!(p[0].starts_with("duration:"), "{p:?}");
        let p = problems(&SAMPLE.replace("warmup: 20s", "warmup: 20s\ncolour: red"));
        assert!(p[0].contains("colour"), "{p:?}");
        let p =
            problems(&SAMPLE.replace("min_series_reduction: 50%", "min_series_reduction: 150%"));
        assert_eq!(
            p,
            vec!["criteria.min_series_reduction: a reduction can be at most 100%"]
        );
        let p = problems(&SAMPLE.replace("selector: role=web", "selector: '=web'"));
        assert!(p[0].starts_with("selector:"), "{p:?}");
        let p = problems(&SAMPLE.replace("warmup: 20s", "warmup: 5s"));
        assert!(p[0].starts_with("warmup: must be at least 20s"), "{p:?}");
        let p = problems(&SAMPLE.replace("window: 10s", "window: 5m"));
        assert_eq!(p, vec!["window: must not be longer than duration"]);
        let p = problems(&SAMPLE.replace("receivers: [otlp]", "receivers: []"));
        assert!(p[0].starts_with("candidate.pipeline.receivers:"), "{p:?}");
        let p = problems(&SAMPLE.replace("interval: 10s,", "interval: often,"));
        assert!(
            p.iter()
                .any(|p| p.contains("processors.aggregate/exp") && p.contains("interval")),
            "{p:?}"
        );
        let p = problems("name: x\n");
        assert!(p[0].contains("candidate"), "{p:?}");
    }
}
