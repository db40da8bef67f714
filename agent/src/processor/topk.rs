//! `topk`: keeps every metric of the `k` entities that rank highest by one metric in each
//! window, plus the entities `always_keep` protects, and rolls all other entities into one
//! whose key attributes are `_other` (`others: aggregate`, with the `aggregate` semantics, so
//! totals are conserved) or drops them (`others: drop`).
//!
//! An entity is the tuple of the `entity` attributes' values, each looked up on the data
//! point, then on its resource. Points with none of them are not entity data and pass as they
//! are. The ranking of a window decides what the following windows keep: an entity that makes
//! the top `k` stays kept for `min_windows_in_top` windows, so membership does not flap when
//! ranks are close; in the first window nothing is ranked yet and only protected entities are
//! kept. Scores are exact up to `max_entities` entities per window and come from a
//! Space-Saving sketch beyond, so memory stays bounded however many entities there are.
//!
//! An entity moving between kept and rolled up loses no increase and counts none twice: the
//! rollup engine tracks the counters of kept entities too (see `merge::Aggregator::track`).

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{AHashMap, RandomState};
use indexmap::IndexMap;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::{
    number_data_point, AggregationTemporality, Metric, NumberDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use serde_yaml::Value;

use super::aggregate::{DEFAULT_MAX_SERIES, DEFAULT_STALE_AFTER};
use super::merge::{
    append_points, compile_overrides, push_emitted, split, Aggregator, GaugeFn, MergeSettings,
    MergeTelemetry, Projection, RawOverride, Route, SummaryPolicy, Temporality,
};
use super::pattern::{attributes_hash, find_attribute as find, value_text, Matcher, PatternText};
use super::window::{duration_nanos, now_unix_nanos, Windows};
use super::{
    BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory, SharedState,
};
use crate::config::{self, Issue};
use crate::otlp::{self, Payload};
use crate::telemetry;

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "topk",
    parse,
};

/// The value of every key attribute of the rolled-up entity.
pub const OTHER: &str = "_other";

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_ENTITIES: usize = 10_000;

/// Config of the `topk` processor.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawTopkConfig {
    /// How many entities keep their own series.
    k: usize,
    /// Length of a ranking window; boundaries fall on wall-clock multiples of it.
    #[serde(default = "default_window", with = "humantime_serde")]
    window: Duration,
    /// The attributes whose values identify an entity.
    entity: Vec<String>,
    /// The metric entities are ranked by: the increase of a cumulative sum over the window
    /// (its rate), the sum of a delta sum's points, or a gauge's values.
    rank_by: String,
    /// Attribute to patterns: an entity with any of these attributes matching one of its
    /// patterns is always kept.
    #[serde(default)]
    always_keep: IndexMap<String, Vec<PatternText>>,
    /// What becomes of the entities not kept.
    #[serde(default)]
    others: Others,
    /// Windows an entity stays kept after it last made the top `k`.
    #[serde(default = "default_min_windows")]
    min_windows_in_top: u64,
    /// Entities scored exactly per window; beyond, a Space-Saving sketch of this size.
    #[serde(default = "default_max_entities")]
    max_entities: usize,
    // How the "_other" entity merges, as in `aggregate`.
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Others {
    #[default]
    Aggregate,
    Drop,
}

fn default_window() -> Duration {
    DEFAULT_WINDOW
}
fn default_min_windows() -> u64 {
    1
}
fn default_max_entities() -> usize {
    DEFAULT_MAX_ENTITIES
}
fn default_stale_after() -> Duration {
    DEFAULT_STALE_AFTER
}
fn default_max_series() -> usize {
    DEFAULT_MAX_SERIES
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let raw: RawTopkConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    if raw.k == 0 {
        issues.push(Issue::new("k", "must be at least 1"));
    }
    if raw.window.is_zero() {
        issues.push(Issue::new("window", "must be greater than 0"));
    }
    if raw.entity.is_empty() {
        issues.push(Issue::new("entity", "must name at least one attribute"));
    }
    for (i, key) in raw.entity.iter().enumerate() {
        if key.is_empty() {
            issues.push(Issue::new(format!("entity[{i}]"), "must not be empty"));
        }
    }
    if raw.rank_by.is_empty() {
        issues.push(Issue::new("rank_by", "must name a metric"));
    }
    if raw.min_windows_in_top == 0 {
        issues.push(Issue::new("min_windows_in_top", "must be at least 1"));
    }
    if raw.max_entities < raw.k {
        issues.push(Issue::new(
            "max_entities",
            format!("must be at least k ({})", raw.k),
        ));
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
    let mut always_keep = Vec::new();
    for (key, patterns) in &raw.always_keep {
        if let Some(matcher) =
            Matcher::compile(patterns, &format!("always_keep.{key}"), &mut issues)
        {
            always_keep.push((key.clone(), matcher));
        }
    }
    let overrides = compile_overrides(&raw.overrides, &mut issues);
    if !issues.is_empty() {
        return Err(issues);
    }
    let others = OthersProjection::new(&raw.entity);
    Ok(Arc::new(TopkConfig {
        rules: Arc::new(Rules {
            k: raw.k,
            entity: raw.entity,
            rank_by: raw.rank_by,
            always_keep,
            others: raw.others,
            min_windows_in_top: raw.min_windows_in_top,
            max_entities: raw.max_entities,
            window: raw.window,
            projection: others,
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

/// The compiled config.
#[derive(Debug)]
struct Rules {
    k: usize,
    entity: Vec<String>,
    rank_by: String,
    always_keep: Vec<(String, Matcher)>,
    others: Others,
    min_windows_in_top: u64,
    max_entities: usize,
    window: Duration,
    projection: OthersProjection,
}

#[derive(Debug)]
struct TopkConfig {
    rules: Arc<Rules>,
    settings: Arc<MergeSettings>,
}

/// The "_other" entity: its key attributes set to `_other` wherever they were, and nothing
/// else of the resource (the rest of a resource identifies what was rolled up).
#[derive(Debug)]
struct OthersProjection {
    keys: Vec<KeyValue>,
}

impl OthersProjection {
    fn new(entity: &[String]) -> Self {
        let keys = entity
            .iter()
            .map(|key| KeyValue {
                key: key.clone(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(OTHER.to_string())),
                }),
                ..Default::default()
            })
            .collect();
        Self { keys }
    }

    fn replacement(&self, key: &str) -> Option<&KeyValue> {
        self.keys.iter().find(|kv| kv.key == key)
    }
}

impl Projection for OthersProjection {
    fn resource<'a>(&'a self, attributes: &'a [KeyValue], out: &mut Vec<&'a KeyValue>) {
        out.extend(attributes.iter().filter_map(|kv| self.replacement(&kv.key)));
    }

    fn point<'a>(
        &'a self,
        _resource: &'a [KeyValue],
        attributes: &'a [KeyValue],
        out: &mut Vec<&'a KeyValue>,
    ) {
        out.extend(
            attributes
                .iter()
                .map(|kv| self.replacement(&kv.key).unwrap_or(kv)),
        );
    }
}

impl ProcessorConfig for TopkConfig {
    fn build(&self, context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        let state = context.state::<Option<Ranking>>();
        let (pipeline, id) = (context.pipeline().to_string(), context.id().to_string());
        state.lock().get_or_insert_with(|| Ranking {
            scores: Scores::new(self.rules.max_entities),
            kept_until: AHashMap::new(),
            window: 0,
            rates: AHashMap::new(),
            rollup: Aggregator::new(
                self.settings.clone(),
                MergeTelemetry::new(&pipeline, &id),
                now_unix_nanos(),
            ),
        });
        Box::new(Topk {
            keys: Keys {
                rules: self.rules.clone(),
                hasher: RandomState::with_seeds(1, 2, 3, 4),
                scratch: String::new(),
            },
            state,
            windows: Windows::new(self.rules.window),
            dropped_others: metrics::counter!(telemetry::PROCESSOR_DROPPED, "pipeline" => pipeline.clone(), "processor" => id.clone(), "reason" => "others"),
            evicted: metrics::counter!(telemetry::PROCESSOR_STATE_EVICTIONS, "pipeline" => pipeline, "processor" => id, "reason" => "stale"),
        })
    }
}

/// What a window's ranking knows, carried over a reload that leaves the config unchanged.
struct Ranking {
    scores: Scores,
    /// Entity to the first window it is no longer kept in.
    kept_until: AHashMap<u64, u64>,
    /// Index of the current window.
    window: u64,
    /// The last point of every `rank_by` cumulative series, to turn it into an increase.
    rates: AHashMap<u64, RatePoint>,
    rollup: Aggregator,
}

#[derive(Debug, Clone, Copy)]
struct RatePoint {
    value: f64,
    start: u64,
    window: u64,
}

struct Topk {
    keys: Keys,
    state: SharedState<Option<Ranking>>,
    windows: Windows,
    dropped_others: metrics::Counter,
    evicted: metrics::Counter,
}

/// What reads entities and scores off data points.
struct Keys {
    rules: Arc<Rules>,
    hasher: RandomState,
    scratch: String,
}

impl Keys {
    /// The entity of a point, or `None` when none of the key attributes is present.
    fn entity(&mut self, resource: &[KeyValue], point: &[KeyValue]) -> Option<u64> {
        let mut hasher = self.hasher.build_hasher();
        let mut found = false;
        for (i, key) in self.rules.entity.iter().enumerate() {
            let value = find(point, key).or_else(|| find(resource, key));
            i.hash(&mut hasher);
            match value_text(value, &mut self.scratch) {
                Some(text) => {
                    found = true;
                    text.hash(&mut hasher);
                }
                None => 0xffu8.hash(&mut hasher),
            }
        }
        found.then(|| hasher.finish())
    }

    fn protected(&mut self, resource: &[KeyValue], point: &[KeyValue]) -> bool {
        let scratch = &mut self.scratch;
        self.rules.always_keep.iter().any(|(key, matcher)| {
            let value = find(point, key).or_else(|| find(resource, key));
            value_text(value, scratch).is_some_and(|text| matcher.is_match(text))
        })
    }

    fn route(&mut self, ranking: &Ranking, resource: &[KeyValue], point: &[KeyValue]) -> Route {
        let Some(entity) = self.entity(resource, point) else {
            return Route::Pass;
        };
        let kept = ranking
            .kept_until
            .get(&entity)
            .is_some_and(|until| *until > ranking.window);
        if kept || self.protected(resource, point) {
            Route::Keep
        } else {
            Route::Other
        }
    }

    fn attributes_hash(&mut self, attributes: &[KeyValue]) -> u64 {
        attributes_hash(&self.hasher, &mut self.scratch, attributes)
    }

    /// Adds the `rank_by` points of `metric` to their entities' scores.
    fn score(
        &mut self,
        ranking: &mut Ranking,
        resource: &[KeyValue],
        resource_hash: u64,
        metric: &Metric,
    ) {
        let (points, cumulative, gauge) = match &metric.data {
            Some(Data::Sum(s)) => (
                &s.data_points,
                s.aggregation_temporality != AggregationTemporality::Delta as i32,
                false,
            ),
            Some(Data::Gauge(g)) => (&g.data_points, false, true),
            // Histograms and summaries do not rank: the config reference says so.
            _ => return,
        };
        for point in points {
            let Some(entity) = self.entity(resource, &point.attributes) else {
                continue;
            };
            let series = resource_hash ^ self.attributes_hash(&point.attributes).rotate_left(1);
            let weight = self.weight(ranking, series, point, cumulative, gauge);
            ranking.scores.add(entity, weight);
        }
    }

    /// The score a `rank_by` point adds to its entity.
    fn weight(
        &self,
        ranking: &mut Ranking,
        series: u64,
        point: &NumberDataPoint,
        cumulative: bool,
        gauge: bool,
    ) -> f64 {
        let value = match point.value {
            Some(number_data_point::Value::AsDouble(d)) => d,
            Some(number_data_point::Value::AsInt(i)) => i as f64,
            None => return 0.0,
        };
        if gauge || !cumulative {
            return value;
        }
        let start = point.start_time_unix_nano;
        let window = ranking.window;
        let previous = ranking.rates.insert(
            series,
            RatePoint {
                value,
                start,
                window,
            },
        );
        match previous {
            Some(last) if last.start == start && value >= last.value => value - last.value,
            Some(_) => value,
            // First sight: its average rate since it started, over one window.
            None => {
                let time = point.time_unix_nano;
                let length = duration_nanos(self.rules.window) as f64;
                if start == 0 || time <= start {
                    0.0
                } else {
                    value * length / ((time - start) as f64).max(length)
                }
            }
        }
    }
}

impl Processor for Topk {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        let mut request = input.into_request()?;
        let Topk {
            keys,
            state,
            dropped_others,
            ..
        } = self;
        let mut guard = state.lock();
        let Some(ranking) = guard.as_mut() else {
            out.push(Payload::Decoded(request));
            return Ok(());
        };
        let rules = keys.rules.clone();
        let no_resource = Resource::default();
        let no_scope = InstrumentationScope::default();
        let mut dropped = 0u64;
        for rm in &mut request.resource_metrics {
            let resource = rm.resource.as_ref().unwrap_or(&no_resource);
            let resource_hash = keys.attributes_hash(&resource.attributes);
            for sm in &mut rm.scope_metrics {
                let scope = sm.scope.as_ref().unwrap_or(&no_scope);
                for metric in &mut sm.metrics {
                    // Scored before routing: the ranking sees every point, kept or not.
                    if metric.name == rules.rank_by {
                        keys.score(ranking, &resource.attributes, resource_hash, metric);
                    }
                    let (others, kept) = split(metric, &mut |point: &[KeyValue]| {
                        keys.route(ranking, &resource.attributes, point)
                    });
                    if rules.others == Others::Aggregate {
                        if let Some(kept) = kept {
                            ranking
                                .rollup
                                .track(resource, scope, &kept, &rules.projection);
                        }
                    }
                    let Some(mut others) = others else { continue };
                    match rules.others {
                        Others::Drop => {
                            dropped += otlp::metric_data_points(others.data.as_ref()) as u64;
                        }
                        Others::Aggregate => {
                            ranking
                                .rollup
                                .add(resource, scope, &mut others, &rules.projection);
                            // What could not merge goes on in place.
                            append_points(metric, others);
                        }
                    }
                }
            }
        }
        drop(guard);
        dropped_others.increment(dropped);
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
        let Some(ranking) = guard.as_mut() else {
            return;
        };
        let resource_metrics = ranking.rollup.emit(end);
        // The closing window's top k are kept through the next `min_windows_in_top` windows.
        let window = ranking.window;
        let until = window + 1 + self.keys.rules.min_windows_in_top;
        for entity in ranking.scores.top(self.keys.rules.k) {
            let kept = ranking.kept_until.entry(entity).or_insert(until);
            *kept = (*kept).max(until);
        }
        ranking.kept_until.retain(|_, until| *until > window + 1);
        ranking.scores.clear();
        ranking.window = window + 1;
        let before = ranking.rates.len();
        // A rank series silent for two windows starts over from its next point.
        ranking.rates.retain(|_, p| p.window + 2 > window);
        self.evicted
            .increment((before - ranking.rates.len()) as u64);
        drop(guard);
        push_emitted(resource_metrics, out);
    }

    fn flush(&mut self, out: &mut Vec<Payload>) {
        if self.state.is_shared() {
            return;
        }
        let resource_metrics = match self.state.lock().as_mut() {
            Some(ranking) => ranking.rollup.emit_now(),
            None => return,
        };
        push_emitted(resource_metrics, out);
    }
}

/// Entity scores of one window: exact up to `capacity` entities, then a Space-Saving sketch
/// (Metwally et al.), which keeps the heaviest entities of an unbounded stream in bounded
/// memory: a new entity replaces the lightest one and inherits its score, so an entity's
/// score is over-, never under-estimated and every entity heavier than total/capacity stays.
struct Scores {
    capacity: usize,
    scores: AHashMap<u64, f64>,
    /// (score bits, entity), only once the sketch is on: finds the lightest entity.
    lightest: Option<BTreeSet<(u64, u64)>>,
}

impl Scores {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            scores: AHashMap::new(),
            lightest: None,
        }
    }

    /// Adds `weight` (finite, not negative) to `entity`'s score.
    fn add(&mut self, entity: u64, weight: f64) {
        // Scores only grow, and +0.0 keeps the bit order of floats equal to their order.
        let weight = if weight.is_finite() {
            weight.max(0.0) + 0.0
        } else {
            0.0
        };
        if let Some(score) = self.scores.get_mut(&entity) {
            let old = *score;
            *score += weight;
            if let Some(index) = &mut self.lightest {
                index.remove(&(old.to_bits(), entity));
                index.insert((score.to_bits(), entity));
            }
            return;
        }
        if self.scores.len() < self.capacity {
            self.scores.insert(entity, weight);
            if let Some(index) = &mut self.lightest {
                index.insert((weight.to_bits(), entity));
            }
            return;
        }
        let index = self.lightest.get_or_insert_with(|| {
            self.scores
                .iter()
                .map(|(&entity, &score)| (score.to_bits(), entity))
                .collect()
        });
        let Some((bits, lightest)) = index.pop_first() else {
            return;
        };
        self.scores.remove(&lightest);
        let score = f64::from_bits(bits) + weight;
        self.scores.insert(entity, score);
        index.insert((score.to_bits(), entity));
    }

    /// The `k` highest scores' entities, highest first; ties broken by entity for stability.
    fn top(&self, k: usize) -> Vec<u64> {
        let mut ranked: Vec<(f64, u64)> = self.scores.iter().map(|(&e, &s)| (s, e)).collect();
        ranked.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        ranked.into_iter().take(k).map(|(_, e)| e).collect()
    }

    fn clear(&mut self) {
        self.scores.clear();
        self.lightest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ComponentId;
    use crate::otlp::testdata::{gauge_metric, number_point, resource_metrics, string_attr};
    use crate::otlp::ExportMetricsServiceRequest;
    use crate::processor::test_util::parse_issues;
    use crate::processor::StateRegistry;
    use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const START: u64 = 1_700_000_000_000_000_000;
    const CONFIG: &str = "{k: 2, window: 10s, entity: [host.name, process.executable.name], rank_by: process.cpu.time, always_keep: {process.executable.name: [kubelet]}}";

    fn build(
        yaml: &str,
        previous: Option<&StateRegistry>,
        registry: &mut StateRegistry,
    ) -> Box<dyn Processor> {
        let id = ComponentId::parse("topk/cpu").unwrap();
        let raw: Value = serde_yaml::from_str(yaml).unwrap();
        let config = parse(raw.clone()).unwrap();
        config.build(&mut BuildContext::new(
            "candidate",
            &id,
            &raw,
            previous,
            registry,
        ))
    }

    fn standalone(yaml: &str) -> Box<dyn Processor> {
        build(yaml, None, &mut StateRegistry::default())
    }

    /// One process: its cumulative CPU seconds at scrape `round` (10 s apart).
    fn process(exe: &str, pid: i64, cpu: f64, round: u64) -> ResourceMetrics {
        let mut point = number_point(vec![string_attr("state", "user")], cpu);
        point.start_time_unix_nano = START;
        point.time_unix_nano = START + (round + 1) * 10_000_000_000;
        let mut rm = resource_metrics(
            vec![
                string_attr("host.name", "h1"),
                string_attr("process.executable.name", exe),
                crate::otlp::testdata::int_attr("process.pid", pid),
            ],
            vec![crate::otlp::testdata::sum_metric(
                "process.cpu.time",
                vec![point],
            )],
        );
        if let Some(Data::Sum(s)) = rm.scope_metrics[0].metrics[0].data.as_mut() {
            s.is_monotonic = true;
        }
        rm
    }

    fn payload(rms: Vec<ResourceMetrics>) -> Payload {
        Payload::Decoded(ExportMetricsServiceRequest {
            resource_metrics: rms,
        })
    }

    /// (executable name, value) of every cpu point in `out`.
    fn points(out: &[Payload]) -> Vec<(String, f64)> {
        let mut found = Vec::new();
        for payload in out {
            for rm in payload.clone().into_request().unwrap().resource_metrics {
                let attrs = rm.resource.unwrap_or_default().attributes;
                let mut scratch = String::new();
                let exe = value_text(find(&attrs, "process.executable.name"), &mut scratch)
                    .unwrap_or("")
                    .to_string();
                for m in rm.scope_metrics.into_iter().flat_map(|sm| sm.metrics) {
                    if let Some(Data::Sum(s)) = m.data {
                        for p in s.data_points {
                            let v = match p.value {
                                Some(number_data_point::Value::AsDouble(d)) => d,
                                Some(number_data_point::Value::AsInt(i)) => i as f64,
                                None => f64::NAN,
                            };
                            found.push((exe.clone(), v));
                        }
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

    /// Cumulative cpu seconds at `round` of five programs started together: a and b busy
    /// (5 and 4 CPU seconds per second), c, d and kubelet nearly idle.
    fn fleet(round: u64) -> Vec<ResourceMetrics> {
        let seconds = 10.0 * (round + 1) as f64;
        vec![
            process("a", 10, 5.0 * seconds, round),
            process("b", 11, 4.0 * seconds, round),
            process("c", 12, 0.3 * seconds, round),
            process("d", 13, 0.2 * seconds, round),
            process("kubelet", 14, 0.1 * seconds, round),
        ]
    }

    #[test]
    fn the_top_k_keep_their_series_and_the_rest_roll_up_into_other() {
        let mut p = standalone(CONFIG);
        let mut out = Vec::new();
        // Window 1: nothing ranked yet; only the protected kubelet passes.
        p.process(payload(fleet(0)), &mut out).unwrap();
        assert_eq!(points(&out), vec![("kubelet".to_string(), 1.0)]);
        out.clear();
        close(&mut p, &mut out);
        // a, b, c, d merged into one _other counter: 95 at the first emission.
        assert_eq!(points(&out), vec![(OTHER.to_string(), 95.0)]);
        out.clear();
        // Window 2: a and b ranked first by their rate (first sight: value over age).
        p.process(payload(fleet(1)), &mut out).unwrap();
        assert_eq!(
            points(&out),
            vec![
                ("a".to_string(), 100.0),
                ("b".to_string(), 80.0),
                ("kubelet".to_string(), 2.0)
            ]
        );
        out.clear();
        close(&mut p, &mut out);
        // _other: 95 + the increases of c and d (3 + 2) + those of a and b up to the point
        // they left it (50 + 40): nothing lost while moving out.
        assert_eq!(points(&out), vec![(OTHER.to_string(), 190.0)]);
    }

    #[test]
    fn an_entity_stays_kept_for_min_windows_in_top() {
        let yaml = "{k: 1, window: 10s, entity: [process.executable.name], rank_by: process.cpu.time, min_windows_in_top: 2}";
        let mut p = standalone(yaml);
        let mut out = Vec::new();
        let rates = [(10.0, 1.0), (1.0, 10.0), (1.0, 10.0), (1.0, 10.0)];
        let (mut a, mut b) = (1000.0, 1000.0);
        let mut kept = Vec::new();
        for (round, (ra, rb)) in rates.iter().enumerate() {
            a += ra * 10.0;
            b += rb * 10.0;
            let input = vec![
                process("a", 1, a, round as u64),
                process("b", 2, b, round as u64),
            ];
            p.process(payload(input), &mut out).unwrap();
            let names: Vec<String> = points(&out).into_iter().map(|(n, _)| n).collect();
            kept.push(names);
            out.clear();
            close(&mut p, &mut out);
            out.clear();
        }
        // a tops window 1 and is kept in windows 2 and 3 though b overtook it in window 2;
        // b, top from window 2, is kept from window 3 on.
        assert_eq!(kept[0], Vec::<String>::new());
        assert_eq!(kept[1], vec!["a"]);
        assert_eq!(kept[2], vec!["a", "b"]);
        assert_eq!(kept[3], vec!["b"]);
    }

    #[test]
    fn others_drop_drops_and_non_entity_data_passes() {
        let yaml = "{k: 1, window: 10s, entity: [process.executable.name], rank_by: process.cpu.time, others: drop}";
        let mut p = standalone(yaml);
        let mut out = Vec::new();
        let host = resource_metrics(
            vec![string_attr("host.name", "h1")],
            vec![gauge_metric(
                "system.memory.usage",
                vec![number_point(vec![], 5.0)],
            )],
        );
        let mut input = fleet(0);
        input.push(host);
        p.process(payload(input), &mut out).unwrap();
        let request = out[0].clone().into_request().unwrap();
        assert_eq!(
            request.resource_metrics.len(),
            1,
            "only the host metric is left"
        );
        assert_eq!(
            request.resource_metrics[0].scope_metrics[0].metrics[0].name,
            "system.memory.usage"
        );
        out.clear();
        close(&mut p, &mut out);
        assert!(out.is_empty(), "nothing rolled up");
    }

    #[test]
    fn space_saving_finds_the_heavy_entities_among_many() {
        let mut scores = Scores::new(8);
        for round in 0..50u64 {
            for light in 0..100u64 {
                scores.add(1000 + round * 100 + light, 1.0);
            }
            scores.add(1, 500.0);
            scores.add(2, 400.0);
        }
        assert_eq!(scores.top(2), vec![1, 2]);
        assert!(scores.scores.len() <= 8);
    }

    #[test]
    fn state_is_carried_over_a_reload_with_the_same_config() {
        let mut first = StateRegistry::default();
        let mut old = build(CONFIG, None, &mut first);
        let mut out = Vec::new();
        old.process(payload(fleet(0)), &mut out).unwrap();
        close(&mut old, &mut out);
        out.clear();
        let mut second = StateRegistry::default();
        let mut new = build(CONFIG, Some(&first), &mut second);
        old.flush(&mut out);
        assert!(out.is_empty(), "the successor owns the state");
        new.process(payload(fleet(1)), &mut out).unwrap();
        let names: Vec<String> = points(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["a", "b", "kubelet"], "the ranking survived");
        let mut third = StateRegistry::default();
        let changed = CONFIG.replace("k: 2", "k: 3");
        let mut fresh = build(&changed, Some(&second), &mut third);
        out.clear();
        fresh.process(payload(fleet(2)), &mut out).unwrap();
        let names: Vec<String> = points(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["kubelet"], "a changed config ranks afresh");
    }

    #[test]
    fn config_errors_name_the_key() {
        let issues = parse_issues(
            "topk",
            "{k: 0, entity: [], rank_by: x, always_keep: {a: [\"regex:(\"]}}",
        );
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["k", "entity", "always_keep.a[0]"], "{issues:?}");
        let issues = parse_issues("topk", "{k: 1, entity: [a], rank_by: x, others: keep}");
        assert!(issues[0].path.starts_with("others"), "{issues:?}");
        let issues = parse_issues("topk", "{k: 1, entity: [a]}");
        assert!(issues[0].to_string().contains("rank_by"), "{issues:?}");
    }

    proptest! {
        /// Whatever the ranking does, the increase a backend reads from the kept entities'
        /// own series plus the increase of the "_other" series equal the inputs' increases.
        #[test]
        fn kept_and_rolled_up_increases_add_up_to_the_input(
            rates in proptest::collection::vec(proptest::collection::vec(0u32..100, 6), 2..12),
            k in 1usize..4,
        ) {
            let yaml = format!("{{k: {k}, window: 10s, entity: [process.executable.name], rank_by: process.cpu.time}}");
            let mut p = standalone(&yaml);
            let names = ["p0", "p1", "p2", "p3", "p4", "p5"];
            let mut values = [1000.0f64; 6];
            let mut truth = 0.0;
            let mut backend = 0.0;
            let mut last_seen: HashMap<String, f64> = HashMap::new();
            let mut out = Vec::new();
            for (round, step) in rates.iter().enumerate() {
                let mut input = Vec::new();
                for (i, rate) in step.iter().enumerate() {
                    let increase = f64::from(*rate);
                    values[i] += increase;
                    if round > 0 {
                        truth += increase;
                    }
                    input.push(process(names[i], i as i64, values[i], round as u64));
                }
                p.process(payload(input), &mut out).unwrap();
                close(&mut p, &mut out);
                // A backend sees each series' consecutive points; a series' first point
                // carries no increase.
                let mut present = HashMap::new();
                for (name, value) in points(&out) {
                    present.insert(name, value);
                }
                for (name, value) in &present {
                    if let Some(last) = last_seen.get(name) {
                        backend += value - last;
                    }
                }
                last_seen = present;
                out.clear();
            }
            prop_assert!((backend - truth).abs() < 1e-6, "backend {backend} truth {truth}");
        }
    }
}
