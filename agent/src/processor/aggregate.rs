//! `aggregate`: merges the series that become identical once attributes are kept or
//! dropped, over intervals aligned to the wall clock, and emits one point per output series
//! at each interval boundary.
//!
//! The merging itself is the [`merge`](super::merge) engine, shared with the processors that
//! roll series up; this file holds the config, the keep/drop projection and the timing. The
//! engine's state lives in the processor's [`SharedState`], so a reload that leaves this
//! processor's config unchanged carries running totals over instead of resetting counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashSet;
use indexmap::IndexMap;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use serde_yaml::Value;

use super::merge::{
    compile_overrides, push_emitted, Aggregator, GaugeFn, MergeSettings, MergeTelemetry,
    Projection, RawOverride, SummaryPolicy, Temporality,
};
use super::window::{now_unix_nanos, Windows};
use super::{
    BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory, SharedState,
};
use crate::config::{self, Issue};
use crate::otlp::{self, ExportMetricsServiceRequest, Payload};

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "aggregate",
    parse,
};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_SERIES: usize = 100_000;

/// Config of the `aggregate` processor.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawAggregateConfig {
    /// Length of an interval; boundaries fall on wall-clock multiples of it.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Attributes (resource or data point) to keep; all others are dropped.
    #[serde(default)]
    pub keep: Option<Vec<String>>,
    /// Attributes (resource or data point) to drop; all others are kept.
    #[serde(default)]
    pub drop: Option<Vec<String>>,
    /// Output temporality of monotonic sums and histograms.
    #[serde(default)]
    pub temporality: Temporality,
    /// How gauges merge.
    #[serde(default)]
    pub gauge: GaugeFn,
    /// Metric-name pattern to settings; the first matching pattern wins.
    #[serde(default)]
    pub overrides: IndexMap<String, RawOverride>,
    /// Input series unseen this long stop counting and are forgotten.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// Bound on tracked input plus output series.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// Also emit `<metric>.series_count`.
    #[serde(default)]
    pub count_series: bool,
    /// `pass` or `drop` summaries, which cannot be merged.
    #[serde(default)]
    pub summaries: SummaryPolicy,
}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

fn default_stale_after() -> Duration {
    DEFAULT_STALE_AFTER
}

fn default_max_series() -> usize {
    DEFAULT_MAX_SERIES
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let raw: RawAggregateConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    let selection = match (&raw.keep, &raw.drop) {
        (Some(keys), None) => Some(AttributeSelection::new(keys, true)),
        (None, Some(keys)) => Some(AttributeSelection::new(keys, false)),
        (Some(_), Some(_)) => {
            issues.push(Issue::new("drop", "cannot be set together with `keep`"));
            None
        }
        (None, None) => {
            issues.push(Issue::new(
                "",
                "needs `keep` or `drop`: the attributes that identify an output series",
            ));
            None
        }
    };
    if raw.interval.is_zero() {
        issues.push(Issue::new("interval", "must be greater than 0"));
    }
    if raw.stale_after < raw.interval {
        issues.push(Issue::new(
            "stale_after",
            format!(
                "must be at least interval ({}): a series reporting once per interval would be forgotten between its points",
                humantime::format_duration(raw.interval)
            ),
        ));
    }
    if raw.max_series < 2 {
        issues.push(Issue::new(
            "max_series",
            "must be at least 2 (one input and one output series)",
        ));
    }
    let overrides = compile_overrides(&raw.overrides, &mut issues);
    let Some(selection) = selection.filter(|_| issues.is_empty()) else {
        return Err(issues);
    };
    Ok(Arc::new(AggregateConfig {
        interval: raw.interval,
        selection: Arc::new(selection),
        settings: Arc::new(MergeSettings {
            temporality: raw.temporality,
            gauge: raw.gauge,
            overrides,
            stale_after: raw.stale_after,
            max_series: raw.max_series,
            count_series: raw.count_series,
            summaries: raw.summaries,
        }),
    }))
}

/// Keeps only the listed attributes, or drops them, wherever they live.
#[derive(Debug)]
pub struct AttributeSelection {
    keys: AHashSet<String>,
    keep: bool,
}

impl AttributeSelection {
    pub fn new(keys: &[String], keep: bool) -> Self {
        Self {
            keys: keys.iter().cloned().collect(),
            keep,
        }
    }

    fn select<'a>(&self, attributes: &'a [KeyValue], out: &mut Vec<&'a KeyValue>) {
        out.extend(
            attributes
                .iter()
                .filter(|kv| self.keys.contains(&kv.key) == self.keep),
        );
    }
}

impl Projection for AttributeSelection {
    fn resource<'a>(&'a self, attributes: &'a [KeyValue], out: &mut Vec<&'a KeyValue>) {
        self.select(attributes, out);
    }

    fn point<'a>(
        &'a self,
        _resource: &'a [KeyValue],
        attributes: &'a [KeyValue],
        out: &mut Vec<&'a KeyValue>,
    ) {
        self.select(attributes, out);
    }
}

/// The compiled config.
#[derive(Debug)]
pub struct AggregateConfig {
    interval: Duration,
    selection: Arc<AttributeSelection>,
    settings: Arc<MergeSettings>,
}

impl ProcessorConfig for AggregateConfig {
    /// Encoded input is merged off the wire ([`Aggregator::add_encoded`]).
    fn reads_decoded(&self) -> bool {
        false
    }

    /// It passes on merged series and the points it could not merge, decoded by itself.
    fn replaces_input(&self) -> bool {
        true
    }

    fn build(&self, context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        let state = context.state::<Option<Aggregator>>();
        state.lock().get_or_insert_with(|| {
            Aggregator::new(
                self.settings.clone(),
                MergeTelemetry::new(context.pipeline(), context.id().as_str()),
                now_unix_nanos(),
            )
        });
        Box::new(Aggregate {
            selection: self.selection.clone(),
            state,
            windows: Windows::new(self.interval),
        })
    }
}

pub struct Aggregate {
    selection: Arc<AttributeSelection>,
    state: SharedState<Option<Aggregator>>,
    windows: Windows,
}

impl Aggregate {
    fn emit(&self, time: u64, out: &mut Vec<Payload>) {
        let resource_metrics = match self.state.lock().as_mut() {
            Some(aggregator) => aggregator.emit(time),
            None => return,
        };
        push_emitted(resource_metrics, out);
    }
}

impl Processor for Aggregate {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        let encoded = match &input {
            Payload::Shared(batch) => Some(batch.bytes().clone()),
            Payload::Encoded { bytes, .. } => Some(bytes.clone()),
            Payload::Decoded(_) => None,
        };
        if let Some(bytes) = encoded {
            // Merged off the wire: nothing is decoded but what must be kept.
            let leftovers = {
                let mut state = self.state.lock();
                let Some(aggregator) = state.as_mut() else {
                    out.push(input);
                    return Ok(());
                };
                aggregator.add_encoded(&bytes, self.selection.as_ref())?
            };
            if !leftovers.is_empty() {
                out.push(Payload::Decoded(ExportMetricsServiceRequest {
                    resource_metrics: leftovers,
                }));
            }
            return Ok(());
        }
        let mut request = input.into_request()?;
        {
            let mut state = self.state.lock();
            let Some(aggregator) = state.as_mut() else {
                out.push(Payload::Decoded(request));
                return Ok(());
            };
            let no_resource = Resource::default();
            let no_scope = InstrumentationScope::default();
            for rm in &mut request.resource_metrics {
                let resource = rm.resource.as_ref().unwrap_or(&no_resource);
                for sm in &mut rm.scope_metrics {
                    let scope = sm.scope.as_ref().unwrap_or(&no_scope);
                    for metric in &mut sm.metrics {
                        aggregator.add(resource, scope, metric, self.selection.as_ref());
                    }
                }
            }
        }
        // What is left could not be merged and goes on as it came.
        otlp::prune_empty(&mut request);
        if !request.resource_metrics.is_empty() {
            out.push(Payload::Decoded(request));
        }
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        Some(self.windows.deadline())
    }

    fn on_deadline(&mut self, _now: Instant, out: &mut Vec<Payload>) {
        let boundary = self.windows.advance();
        self.emit(boundary, out);
    }

    fn flush(&mut self, out: &mut Vec<Payload>) {
        // A successor instance holds the same state and emits it at its boundaries.
        if self.state.is_shared() {
            return;
        }
        let resource_metrics = match self.state.lock().as_mut() {
            Some(aggregator) => aggregator.emit_now(),
            None => return,
        };
        push_emitted(resource_metrics, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ComponentId;
    use crate::otlp::testdata::{
        int_attr, number_point, resource_metrics, string_attr, sum_metric,
    };
    use crate::otlp::ExportMetricsServiceRequest;
    use crate::processor::test_util::{parse_issues, run};
    use crate::processor::StateRegistry;
    use opentelemetry_proto::tonic::metrics::v1::{
        metric::Data, Histogram, HistogramDataPoint, Metric,
    };

    const CONFIG: &str = "{interval: 10s, keep: [host.name]}";

    fn request(pid: i64, value: f64) -> Payload {
        let rm = resource_metrics(
            vec![string_attr("host.name", "h1"), int_attr("process.pid", pid)],
            vec![sum_metric(
                "process.cpu.time",
                vec![number_point(vec![], value)],
            )],
        );
        Payload::Decoded(ExportMetricsServiceRequest {
            resource_metrics: vec![rm],
        })
    }

    fn total(out: &[Payload]) -> Vec<f64> {
        out.iter()
            .flat_map(|p| p.clone().into_request().unwrap().resource_metrics)
            .flat_map(|rm| rm.scope_metrics)
            .flat_map(|sm| sm.metrics)
            .flat_map(|m| match m.data {
                Some(Data::Sum(s)) => s.data_points,
                other => panic!("{other:?}"),
            })
            .map(|p| match p.value {
                Some(
                    opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d),
                ) => d,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn merges_what_it_can_and_passes_the_rest_through_in_place() {
        let mismatched = |bounds: Vec<f64>| {
            let mut bucket_counts = vec![0; bounds.len() + 1];
            bucket_counts[0] = 1;
            Metric {
                name: "h".into(),
                data: Some(Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint {
                        count: 1,
                        bucket_counts,
                        explicit_bounds: bounds,
                        start_time_unix_nano: 1,
                        time_unix_nano: 2,
                        ..Default::default()
                    }],
                    aggregation_temporality: 1,
                })),
                ..Default::default()
            }
        };
        let mut first = request(1, 10.0).into_request().unwrap();
        first.resource_metrics[0].scope_metrics[0]
            .metrics
            .push(mismatched(vec![1.0]));
        let mut second = request(2, 5.0).into_request().unwrap();
        second.resource_metrics[0].scope_metrics[0]
            .metrics
            .push(mismatched(vec![2.0]));
        let out = run(
            "aggregate",
            CONFIG,
            vec![Payload::Decoded(first), Payload::Decoded(second)],
        );
        // Pass-through of pid2's histogram (bounds mismatch), then the flushed merge.
        assert_eq!(out.len(), 2);
        let passed = out[0].clone().into_request().unwrap();
        let rm = &passed.resource_metrics[0];
        assert_eq!(
            rm.resource.as_ref().unwrap().attributes.len(),
            2,
            "passed as it came"
        );
        assert_eq!(rm.scope_metrics[0].metrics.len(), 1);
        assert_eq!(rm.scope_metrics[0].metrics[0].name, "h");
        let merged = out[1].clone().into_request().unwrap();
        let names: Vec<_> = merged.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(names, vec!["process.cpu.time", "h"]);
    }

    fn build(
        raw: &str,
        previous: Option<&StateRegistry>,
        registry: &mut StateRegistry,
    ) -> Box<dyn Processor> {
        let id = ComponentId::parse("aggregate/entities").unwrap();
        let value: Value = serde_yaml::from_str(raw).unwrap();
        let config = parse(value.clone()).unwrap();
        config.build(&mut BuildContext::new(
            "candidate",
            &id,
            &value,
            previous,
            registry,
        ))
    }

    #[test]
    fn an_unchanged_config_carries_the_totals_over_a_reload() {
        let mut first = StateRegistry::default();
        let mut old = build(CONFIG, None, &mut first);
        let mut out = Vec::new();
        old.process(request(1, 10.0), &mut out).unwrap();
        let mut second = StateRegistry::default();
        let mut new = build(CONFIG, Some(&first), &mut second);
        // The retired instance leaves its state to the new one.
        old.flush(&mut out);
        assert!(out.is_empty());
        drop(old);
        new.process(request(1, 15.0), &mut out).unwrap();
        new.flush(&mut out);
        assert_eq!(total(&out), vec![15.0], "one running total, not two");
    }

    #[test]
    fn a_changed_config_starts_afresh_and_the_old_instance_flushes() {
        let mut first = StateRegistry::default();
        let mut old = build(CONFIG, None, &mut first);
        let mut out = Vec::new();
        old.process(request(1, 10.0), &mut out).unwrap();
        let mut second = StateRegistry::default();
        let mut new = build(
            "{interval: 20s, keep: [host.name]}",
            Some(&first),
            &mut second,
        );
        old.flush(&mut out);
        assert_eq!(total(&out), vec![10.0]);
        out.clear();
        new.flush(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn deadlines_fall_on_interval_boundaries() {
        let mut registry = StateRegistry::default();
        let mut p = build(CONFIG, None, &mut registry);
        let deadline = p.deadline().unwrap();
        assert!(deadline <= Instant::now() + Duration::from_secs(10));
        let mut out = Vec::new();
        p.process(request(1, 3.0), &mut out).unwrap();
        assert!(out.is_empty(), "merged, held until the boundary");
        p.on_deadline(deadline, &mut out);
        assert_eq!(total(&out), vec![3.0]);
        let next = p.deadline().unwrap();
        assert!(next > deadline);
    }

    #[test]
    fn config_errors_name_their_key_paths() {
        let paths = |yaml| -> Vec<String> {
            parse_issues("aggregate", yaml)
                .into_iter()
                .map(|i| i.path)
                .collect()
        };
        assert_eq!(paths("{keep: [a], drop: [b]}"), vec!["drop"]);
        assert_eq!(paths("{}"), vec![""]);
        assert_eq!(
            paths("{keep: [a], overrides: {\"process.memory.*\": {gauge: median}}}"),
            vec!["overrides.process.memory.*.gauge"]
        );
        assert_eq!(
            paths("{keep: [a], overrides: {\"regex:(\": {gauge: sum}}}"),
            vec!["overrides.regex:([0]"]
        );
        assert_eq!(paths("{keep: [a], interval: 0s}"), vec!["interval"]);
        assert_eq!(paths("{keep: [a], interval: 10m}"), vec!["stale_after"]);
        assert_eq!(paths("{keep: [a], max_series: 0}"), vec!["max_series"]);
        assert_eq!(paths("{keep: [a], temporality: both}"), vec!["temporality"]);
        assert_eq!(paths("{keep: [a], summaries: keep}"), vec!["summaries"]);
        let issues = parse_issues("aggregate", "{keep: [a], gauge: median}");
        assert!(
            issues[0].message.contains("unknown variant `median`"),
            "{issues:?}"
        );
        assert!(parse_issues("aggregate", "{keep: [a], kep: 1}")[0]
            .message
            .contains("unknown field `kep`"));
        assert!(paths(
            "{interval: 10s, drop: [process.pid], temporality: delta, gauge: max, overrides: {\"regex:^process\\\\.memory\": {gauge: sum}}, stale_after: 1m, max_series: 10, count_series: true, summaries: drop}"
        )
        .is_empty());
    }

    #[test]
    fn the_reference_example_is_a_valid_config() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let text = std::fs::read_to_string(path).unwrap();
        let section = text
            .split("### `aggregate`")
            .nth(1)
            .expect("aggregate section");
        let block = section
            .split("```yaml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .unwrap();
        let parsed = crate::config::AgentConfig::from_yaml(
            block,
            std::path::Path::new("docs/configuration.md"),
        );
        assert!(
            parsed.is_ok(),
            "{block}\n{}",
            parsed.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
}
