//! `cardinality_limit`: at most `max_series_per_metric` distinct series per metric per window.
//! Points of series beyond the limit are merged into one series per metric carrying
//! `otel.metric.overflow=true` (the OpenTelemetry SDK's cardinality-limit convention), with
//! the `aggregate` semantics, so counters are conserved.
//!
//! A series admitted in a window keeps its slot as long as it reports in every window; the
//! slots of series silent for a whole window are freed at its end, for new series to take.
//! A series moving from the overflow to a slot of its own loses no increase and counts none
//! twice (see `merge::Aggregator::track`).

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHashSet, RandomState};
use indexmap::IndexMap;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use serde_yaml::Value;

use super::aggregate::{DEFAULT_MAX_SERIES, DEFAULT_STALE_AFTER};
use super::merge::{
    append_points, compile_overrides, push_emitted, split, Aggregator, GaugeFn, MergeSettings,
    MergeTelemetry, Projection, RawOverride, Route, SummaryPolicy, Temporality,
};
use super::pattern::attributes_hash;
use super::window::{now_unix_nanos, Windows};
use super::{
    BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory, SharedState,
};
use crate::config::{self, Issue};
use crate::otlp::{self, Payload};
use crate::telemetry;

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "cardinality_limit",
    parse,
};

/// The attribute of the overflow series, as OpenTelemetry SDKs name it.
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawCardinalityLimitConfig {
    /// Distinct series one metric may have per window.
    max_series_per_metric: usize,
    /// Length of a window; boundaries fall on wall-clock multiples of it.
    #[serde(default = "default_window", with = "humantime_serde")]
    window: Duration,
    /// Attributes (resource or data point) the overflow series keeps, e.g. `host.name`; all
    /// others are dropped from it.
    #[serde(default)]
    overflow_keep: Vec<String>,
    // How overflow points merge, as in `aggregate`.
    #[serde(default)]
    temporality: Temporality,
    #[serde(default)]
    gauge: GaugeFn,
    #[serde(default)]
    overrides: IndexMap<String, RawOverride>,
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    stale_after: Duration,
    #[serde(default = "default_max_series")]
    max_series: usize,
}

fn default_window() -> Duration {
    DEFAULT_WINDOW
}
fn default_stale_after() -> Duration {
    DEFAULT_STALE_AFTER
}
fn default_max_series() -> usize {
    DEFAULT_MAX_SERIES
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let raw: RawCardinalityLimitConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    if raw.max_series_per_metric == 0 {
        issues.push(Issue::new("max_series_per_metric", "must be at least 1"));
    }
    if raw.window.is_zero() {
        issues.push(Issue::new("window", "must be greater than 0"));
    }
    if raw.stale_after < raw.window {
        issues.push(Issue::new(
            "stale_after",
            "must be at least window: a series reporting once per window would be forgotten between its points",
        ));
    }
    if raw.max_series < 2 {
        issues.push(Issue::new("max_series", "must be at least 2"));
    }
    let overrides = compile_overrides(&raw.overrides, &mut issues);
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Arc::new(LimitConfig {
        max_series_per_metric: raw.max_series_per_metric,
        window: raw.window,
        projection: Arc::new(OverflowProjection {
            keep: raw.overflow_keep.into_iter().collect(),
            marker: KeyValue {
                key: OVERFLOW_ATTRIBUTE.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                }),
                ..Default::default()
            },
        }),
        settings: Arc::new(MergeSettings {
            temporality: raw.temporality,
            gauge: raw.gauge,
            overrides,
            stale_after: raw.stale_after,
            max_series: raw.max_series,
            count_series: false,
            summaries: SummaryPolicy::Pass,
        }),
    }))
}

#[derive(Debug)]
struct LimitConfig {
    max_series_per_metric: usize,
    window: Duration,
    projection: Arc<OverflowProjection>,
    settings: Arc<MergeSettings>,
}

/// The overflow series of a metric: `otel.metric.overflow=true` and the `overflow_keep`
/// attributes, wherever they were.
#[derive(Debug)]
struct OverflowProjection {
    keep: AHashSet<String>,
    marker: KeyValue,
}

impl Projection for OverflowProjection {
    fn resource<'a>(&'a self, attributes: &'a [KeyValue], out: &mut Vec<&'a KeyValue>) {
        out.extend(attributes.iter().filter(|kv| self.keep.contains(&kv.key)));
    }

    fn point<'a>(
        &'a self,
        _resource: &'a [KeyValue],
        attributes: &'a [KeyValue],
        out: &mut Vec<&'a KeyValue>,
    ) {
        out.extend(attributes.iter().filter(|kv| self.keep.contains(&kv.key)));
        out.push(&self.marker);
    }
}

/// Admitted series, by metric, with the window each last reported in.
struct Slots {
    by_metric: AHashMap<String, AHashMap<u64, u64>>,
    window: u64,
    overflow: Aggregator,
}

impl ProcessorConfig for LimitConfig {
    fn build(&self, context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        let state = context.state::<Option<Slots>>();
        let (pipeline, id) = (context.pipeline().to_string(), context.id().to_string());
        state.lock().get_or_insert_with(|| Slots {
            by_metric: AHashMap::new(),
            window: 0,
            overflow: Aggregator::new(
                self.settings.clone(),
                MergeTelemetry::new(&pipeline, &id),
                now_unix_nanos(),
            ),
        });
        Box::new(CardinalityLimit {
            max_series_per_metric: self.max_series_per_metric,
            projection: self.projection.clone(),
            state,
            windows: Windows::new(self.window),
            hasher: RandomState::with_seeds(5, 6, 7, 8),
            scratch: String::new(),
            overflowed: metrics::counter!(telemetry::PROCESSOR_OVERFLOW, "pipeline" => pipeline.clone(), "processor" => id.clone()),
            freed: metrics::counter!(telemetry::PROCESSOR_STATE_EVICTIONS, "pipeline" => pipeline, "processor" => id, "reason" => "stale"),
        })
    }
}

struct CardinalityLimit {
    max_series_per_metric: usize,
    projection: Arc<OverflowProjection>,
    state: SharedState<Option<Slots>>,
    windows: Windows,
    hasher: RandomState,
    scratch: String,
    overflowed: metrics::Counter,
    freed: metrics::Counter,
}

impl Processor for CardinalityLimit {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        let mut request = input.into_request()?;
        let mut guard = self.state.lock();
        let Some(slots) = guard.as_mut() else {
            out.push(Payload::Decoded(request));
            return Ok(());
        };
        let (hasher, scratch) = (&self.hasher, &mut self.scratch);
        let limit = self.max_series_per_metric;
        let no_resource = Resource::default();
        let no_scope = InstrumentationScope::default();
        let mut overflowed = 0u64;
        for rm in &mut request.resource_metrics {
            let resource = rm.resource.as_ref().unwrap_or(&no_resource);
            let resource_hash = attributes_hash(hasher, scratch, &resource.attributes);
            for sm in &mut rm.scope_metrics {
                let scope = sm.scope.as_ref().unwrap_or(&no_scope);
                let mut scope_hasher = hasher.build_hasher();
                resource_hash.hash(&mut scope_hasher);
                scope.name.hash(&mut scope_hasher);
                scope.version.hash(&mut scope_hasher);
                let scope_hash = scope_hasher.finish();
                for metric in &mut sm.metrics {
                    let window = slots.window;
                    let admitted = slots.by_metric.entry(metric.name.clone()).or_default();
                    let (over, kept) = split(metric, &mut |point: &[KeyValue]| {
                        let series = scope_hash ^ attributes_hash(hasher, scratch, point);
                        if let Some(seen) = admitted.get_mut(&series) {
                            *seen = window;
                            Route::Keep
                        } else if admitted.len() < limit {
                            admitted.insert(series, window);
                            Route::Keep
                        } else {
                            Route::Other
                        }
                    });
                    if let Some(kept) = kept {
                        slots
                            .overflow
                            .track(resource, scope, &kept, self.projection.as_ref());
                    }
                    if let Some(mut over) = over {
                        overflowed += otlp::metric_data_points(over.data.as_ref()) as u64;
                        slots
                            .overflow
                            .add(resource, scope, &mut over, self.projection.as_ref());
                        // What could not merge goes on in place.
                        append_points(metric, over);
                    }
                }
            }
        }
        drop(guard);
        self.overflowed.increment(overflowed);
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
        let end = self.windows.advance();
        let mut guard = self.state.lock();
        let Some(slots) = guard.as_mut() else {
            return;
        };
        let resource_metrics = slots.overflow.emit(end);
        // Series silent for the whole closing window give their slot up.
        let window = slots.window;
        let mut freed = 0u64;
        slots.by_metric.retain(|_, admitted| {
            let before = admitted.len();
            admitted.retain(|_, seen| *seen >= window);
            freed += (before - admitted.len()) as u64;
            !admitted.is_empty()
        });
        slots.window = window + 1;
        drop(guard);
        self.freed.increment(freed);
        push_emitted(resource_metrics, out);
    }

    fn flush(&mut self, out: &mut Vec<Payload>) {
        if self.state.is_shared() {
            return;
        }
        let resource_metrics = match self.state.lock().as_mut() {
            Some(slots) => slots.overflow.emit_now(),
            None => return,
        };
        push_emitted(resource_metrics, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ComponentId;
    use crate::otlp::testdata::{number_point, resource_metrics, string_attr, sum_metric};
    use crate::otlp::ExportMetricsServiceRequest;
    use crate::processor::test_util::parse_issues;
    use crate::processor::{state, StateRegistry};
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
    use proptest::prelude::*;
    use std::collections::HashMap;

    const START: u64 = 1_700_000_000_000_000_000;

    fn limiter(max: usize) -> Box<dyn Processor> {
        let id = ComponentId::parse("cardinality_limit").unwrap();
        let yaml =
            format!("{{max_series_per_metric: {max}, window: 10s, overflow_keep: [host.name]}}");
        let config = parse(serde_yaml::from_str(&yaml).unwrap()).unwrap();
        state::standalone(config.as_ref(), "candidate", &id)
    }

    /// Request counter `http.requests{path}` of host h1 at `round` for each (path, value).
    fn requests(round: u64, series: &[(String, f64)]) -> Payload {
        let points = series
            .iter()
            .map(|(path, value)| {
                let mut p = number_point(vec![string_attr("path", path)], *value);
                p.start_time_unix_nano = START;
                p.time_unix_nano = START + (round + 1) * 10_000_000_000;
                p
            })
            .collect();
        let mut metric = sum_metric("http.requests", points);
        if let Some(Data::Sum(s)) = metric.data.as_mut() {
            s.is_monotonic = true;
        }
        Payload::Decoded(ExportMetricsServiceRequest {
            resource_metrics: vec![resource_metrics(
                vec![string_attr("host.name", "h1"), string_attr("pod", "p-1")],
                vec![metric],
            )],
        })
    }

    /// (series label, value): `path` of admitted series, `overflow` for the overflow one.
    fn points(out: &[Payload]) -> Vec<(String, f64)> {
        let mut found = Vec::new();
        for payload in out {
            for rm in payload.clone().into_request().unwrap().resource_metrics {
                for m in rm.scope_metrics.into_iter().flat_map(|sm| sm.metrics) {
                    let Some(Data::Sum(s)) = m.data else { continue };
                    for p in s.data_points {
                        let label = p
                            .attributes
                            .iter()
                            .find_map(|kv| match kv.key.as_str() {
                                "path" => {
                                    Some(format!("{:?}", kv.value.clone().unwrap().value.unwrap()))
                                }
                                OVERFLOW_ATTRIBUTE => Some("overflow".to_string()),
                                _ => None,
                            })
                            .unwrap();
                        let value = match p.value {
                            Some(number_data_point::Value::AsDouble(d)) => d,
                            Some(number_data_point::Value::AsInt(i)) => i as f64,
                            None => f64::NAN,
                        };
                        found.push((label, value));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    fn close(p: &mut Box<dyn Processor>, out: &mut Vec<Payload>) {
        let deadline = p.deadline().unwrap();
        p.on_deadline(deadline, out);
    }

    fn series(names: &[&str], value: f64) -> Vec<(String, f64)> {
        names.iter().map(|n| (n.to_string(), value)).collect()
    }

    #[test]
    fn series_beyond_the_limit_merge_into_the_overflow_series() {
        let mut p = limiter(2);
        let mut out = Vec::new();
        p.process(
            requests(0, &series(&["a", "b", "c", "d", "e"], 10.0)),
            &mut out,
        )
        .unwrap();
        let passed = points(&out);
        assert_eq!(passed.len(), 2, "{passed:?}");
        out.clear();
        close(&mut p, &mut out);
        assert_eq!(points(&out), vec![("overflow".to_string(), 30.0)]);
        // The overflow series keeps host.name and nothing else of the resource.
        let rm = &out[0].clone().into_request().unwrap().resource_metrics[0];
        let keys: Vec<_> = rm
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
        assert_eq!(keys, ["host.name"]);
    }

    #[test]
    fn a_silent_series_frees_its_slot_and_nothing_is_lost_in_the_move() {
        let mut p = limiter(1);
        let mut out = Vec::new();
        p.process(requests(0, &series(&["a", "b"], 10.0)), &mut out)
            .unwrap();
        close(&mut p, &mut out);
        out.clear();
        // Window 2: a is silent, b still overflows (its slot is freed only at the end).
        p.process(requests(1, &series(&["b"], 15.0)), &mut out)
            .unwrap();
        assert!(points(&out).is_empty());
        close(&mut p, &mut out);
        assert_eq!(points(&out), vec![("overflow".to_string(), 15.0)]);
        out.clear();
        // Window 3: b takes the freed slot; its increase up to now still counted in overflow.
        p.process(requests(2, &series(&["b"], 22.0)), &mut out)
            .unwrap();
        assert_eq!(points(&out).len(), 1);
        out.clear();
        close(&mut p, &mut out);
        assert_eq!(points(&out), vec![("overflow".to_string(), 22.0)]);
    }

    #[test]
    fn config_errors_name_the_key() {
        let issues = parse_issues(
            "cardinality_limit",
            "{max_series_per_metric: 0, window: 0s}",
        );
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["max_series_per_metric", "window"], "{issues:?}");
        let issues = parse_issues("cardinality_limit", "{}");
        assert!(
            issues[0].to_string().contains("max_series_per_metric"),
            "{issues:?}"
        );
    }

    #[test]
    fn state_is_carried_over_a_reload_with_the_same_config() {
        let id = ComponentId::parse("cardinality_limit").unwrap();
        let raw: Value = serde_yaml::from_str("{max_series_per_metric: 1, window: 10s}").unwrap();
        let config = parse(raw.clone()).unwrap();
        let mut first = StateRegistry::default();
        let mut old = config.build(&mut BuildContext::new("c", &id, &raw, None, &mut first));
        let mut out = Vec::new();
        old.process(requests(0, &series(&["a"], 1.0)), &mut out)
            .unwrap();
        let mut second = StateRegistry::default();
        let mut new = config.build(&mut BuildContext::new(
            "c",
            &id,
            &raw,
            Some(&first),
            &mut second,
        ));
        out.clear();
        new.process(requests(0, &series(&["b"], 1.0)), &mut out)
            .unwrap();
        assert!(points(&out).is_empty(), "a still holds the only slot");
    }

    proptest! {
        /// Every increase of every input series between two of its points is counted exactly
        /// once: in its own series when both points were passed on, in the overflow series
        /// otherwise; whatever series come, go and come back.
        #[test]
        fn counters_are_conserved(
            rounds in proptest::collection::vec(proptest::collection::vec(proptest::option::of(0u32..50), 5), 2..10),
            limit in 1usize..4,
        ) {
            let mut p = limiter(limit);
            let names = ["a", "b", "c", "d", "e"];
            let mut values = [100.0f64; 5];
            let mut truth = 0.0;
            let mut counted = 0.0;
            // Whether each series' last point was passed on as its own series.
            let mut passed = [false; 5];
            let mut overflow_last: Option<f64> = None;
            let mut out = Vec::new();
            let mut input = series(&names, 100.0);
            for (round, step) in rounds.iter().enumerate() {
                if round > 0 {
                    input.clear();
                    for (i, increase) in step.iter().enumerate() {
                        if let Some(increase) = increase {
                            values[i] += f64::from(*increase);
                            truth += f64::from(*increase);
                            input.push((names[i].to_string(), values[i]));
                        }
                    }
                }
                p.process(requests(round as u64, &input), &mut out).unwrap();
                close(&mut p, &mut out);
                let output: HashMap<String, f64> = points(&out).into_iter().collect();
                for (name, _) in &input {
                    let i = names.iter().position(|n| n == name).unwrap();
                    let own = output.contains_key(&format!("{:?}", any_value::Value::StringValue(name.clone())));
                    if own && passed[i] && round > 0 {
                        counted += f64::from(step[i].unwrap_or(0));
                    }
                    passed[i] = own;
                }
                if let Some(value) = output.get("overflow") {
                    counted += value - overflow_last.unwrap_or(*value);
                    overflow_last = Some(*value);
                }
                out.clear();
            }
            prop_assert!((counted - truth).abs() < 1e-6, "counted {} truth {}", counted, truth);
        }
    }
}
