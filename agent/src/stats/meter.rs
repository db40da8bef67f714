//! The experiment measurements on a pipeline's output, configured by the top-level `meter`
//! key: distinct *critical* series (those a selector picks out) and the running increase of
//! *conserved* counters. Both are read off the wire in the same walk as the series count, and
//! none of it runs without a `meter` config.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use ahash::AHashMap;
use metrics::Gauge;
use serde::Deserialize;

use super::{
    metric_hash, name_hash, point_series, resource_hash, IdentityBuild, SeriesTracker,
    EXACT_SERIES_LIMIT,
};
use crate::config::{join_path, Issue};
use crate::otlp::rewrite::Attributes;
use crate::otlp::wire::{
    self, AttributeIter, DataKind, MetricData, Visitor, TEMPORALITY_CUMULATIVE, TEMPORALITY_DELTA,
};
use crate::processor::pattern::{all_match, present, Criteria, PatternText, RawAttributes};
use crate::telemetry;

/// Cumulative series whose last value the conserved meter remembers, per pipeline.
pub const CONSERVED_SERIES_LIMIT: usize = 100_000;
/// Windows (of [`super::WINDOW`]) a cumulative series may go unseen before it is forgotten:
/// 5 minutes.
pub const CONSERVED_STALE_WINDOWS: u32 = 30;

/// `meter:` as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawMeterConfig {
    /// Which series are critical; every condition given must hold.
    #[serde(default, deserialize_with = "present")]
    pub critical: Option<RawCritical>,
    /// Names of the counters whose total increase is metered.
    #[serde(default, deserialize_with = "present")]
    pub conserve: Option<Vec<String>>,
}

/// `meter.critical`: the filter's criteria, under the names the meter uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCritical {
    #[serde(default, deserialize_with = "present")]
    pub metric_names: Option<Vec<PatternText>>,
    #[serde(default, deserialize_with = "present")]
    pub resource_attributes: Option<RawAttributes>,
    #[serde(default, deserialize_with = "present")]
    pub attributes: Option<RawAttributes>,
}

/// The compiled `meter:` config, shared by every pipeline's meter.
#[derive(Debug)]
pub struct MeterConfig {
    raw: RawMeterConfig,
    critical: Option<Criteria>,
    conserve: Vec<String>,
}

/// Configs are equal when written the same: that is what decides whether a reload resets.
impl PartialEq for MeterConfig {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl MeterConfig {
    /// Compiles `raw`, reporting every problem under `path`.
    pub fn compile(raw: RawMeterConfig, path: &str, issues: &mut Vec<Issue>) -> Option<Self> {
        if raw.critical.is_none() && raw.conserve.is_none() {
            issues.push(Issue::new(path, "needs `critical`, `conserve` or both"));
            return None;
        }
        let issues_before = issues.len();
        let critical = raw.critical.as_ref().and_then(|c| {
            Criteria::compile(
                c.metric_names.as_deref(),
                c.resource_attributes.as_ref(),
                ("attributes", c.attributes.as_ref()),
                &join_path(path, "critical"),
                issues,
            )
        });
        let mut conserve: Vec<String> = Vec::new();
        if let Some(names) = &raw.conserve {
            let list = join_path(path, "conserve");
            if names.is_empty() {
                issues.push(Issue::new(&list, "must list at least one metric name"));
            }
            for (i, name) in names.iter().enumerate() {
                if name.is_empty() {
                    issues.push(Issue::new(format!("{list}[{i}]"), "may not be empty"));
                } else if conserve.contains(name) {
                    issues.push(Issue::new(
                        format!("{list}[{i}]"),
                        format!("{name:?} is listed twice"),
                    ));
                } else {
                    conserve.push(name.clone());
                }
            }
        }
        (issues.len() == issues_before).then_some(Self {
            raw,
            critical,
            conserve,
        })
    }
}

/// Critical series of one pipeline and the gauges they are published on.
struct CriticalCount {
    tracker: SeriesTracker,
    window: Gauge,
    total: Gauge,
}

/// What a cumulative series last reported.
struct Cumulative {
    last: f64,
    start: u64,
    seen: u32,
}

/// Conserved counter totals of one pipeline, and the state cumulative series need.
struct Conserved {
    index: AHashMap<String, usize>,
    totals: Vec<(f64, Gauge)>,
    series: HashMap<u64, Cumulative, IdentityBuild>,
    /// Unix nanoseconds when this state began: a cumulative series that started before it
    /// has an unknown past, so its first point only sets the baseline.
    since: u64,
    window: u32,
    limit: usize,
    warned_full: bool,
}

impl Conserved {
    fn new(pipeline: &str, names: &[String], since: u64, previous: Option<Conserved>) -> Self {
        let mut carried: AHashMap<String, (f64, Gauge)> = AHashMap::new();
        if let Some(previous) = previous {
            for (name, i) in previous.index {
                if let Some(total) = previous.totals.get(i) {
                    carried.insert(name, total.clone());
                }
            }
        }
        let mut index = AHashMap::new();
        let mut totals = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            index.insert(name.clone(), i);
            // A name that stays listed keeps its total: the gauge only goes up.
            totals.push(carried.remove(name).unwrap_or_else(|| {
                (
                    0.0,
                    metrics::gauge!(telemetry::PIPELINE_OUTPUT_CONSERVED, "pipeline" => pipeline.to_string(), "metric" => name.clone()),
                )
            }));
        }
        Self {
            index,
            totals,
            series: HashMap::default(),
            since,
            window: 0,
            limit: CONSERVED_SERIES_LIMIT,
            warned_full: false,
        }
    }

    fn add(&mut self, metric: usize, temporality: i32, series: u64, point: wire::NumberPoint) {
        // A counter's increase is never negative or infinite; such a value is not counted.
        let Some(value) = point.value.filter(|v| v.is_finite() && *v >= 0.0) else {
            return;
        };
        let increase = match temporality {
            TEMPORALITY_DELTA => value,
            TEMPORALITY_CUMULATIVE => self.cumulative(series, value, point.start_time_unix_nano),
            _ => return,
        };
        if let Some((total, _)) = self.totals.get_mut(metric) {
            *total += increase;
        }
    }

    fn cumulative(&mut self, series: u64, value: f64, start: u64) -> f64 {
        let window = self.window;
        let tracked = self.series.len();
        match self.series.entry(series) {
            Entry::Occupied(mut slot) => {
                let state = slot.get_mut();
                let increase = if value >= state.last && start == state.start {
                    value - state.last
                } else {
                    value // a reset: the counter restarted from zero
                };
                *state = Cumulative {
                    last: value,
                    start,
                    seen: window,
                };
                increase
            }
            Entry::Vacant(slot) => {
                if tracked >= self.limit {
                    if !self.warned_full {
                        self.warned_full = true;
                        tracing::warn!(
                            limit = self.limit,
                            "conserved counter meter is full; new cumulative series are not counted"
                        );
                    }
                    return 0.0;
                }
                slot.insert(Cumulative {
                    last: value,
                    start,
                    seen: window,
                });
                if start >= self.since {
                    value
                } else {
                    0.0
                }
            }
        }
    }

    fn publish(&self) {
        for (total, gauge) in &self.totals {
            gauge.set(*total);
        }
    }

    fn next_window(&mut self) {
        self.window = self.window.wrapping_add(1);
        let window = self.window;
        self.series
            .retain(|_, s| window.wrapping_sub(s.seen) < CONSERVED_STALE_WINDOWS);
    }
}

/// The measurements a `meter` config adds to one pipeline's meter.
pub(super) struct Extra {
    pipeline: String,
    config: Arc<MeterConfig>,
    critical: Option<CriticalCount>,
    conserved: Option<Conserved>,
    /// Where non-string attribute values are rendered for matching, reused.
    scratch: String,
    /// Verdicts of the config on metric names seen, by name hash; cleared on a new config.
    names: NameCache,
}

fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Extra {
    pub(super) fn new(pipeline: &str, config: Arc<MeterConfig>) -> Self {
        let mut extra = Self {
            pipeline: pipeline.to_string(),
            config: Arc::clone(&config),
            critical: None,
            conserved: None,
            scratch: String::new(),
            names: HashMap::default(),
        };
        extra.reconfigure(config, true);
        extra
    }

    pub(super) fn config(&self) -> &Arc<MeterConfig> {
        &self.config
    }

    /// Takes a new config, keeping the critical tracker and conserved state when their part
    /// of the config is unchanged.
    pub(super) fn reconfigure(&mut self, config: Arc<MeterConfig>, fresh: bool) {
        let p = &self.pipeline;
        self.names.clear();
        if fresh || config.raw.critical != self.config.raw.critical {
            self.critical = config.critical.as_ref().map(|_| CriticalCount {
                tracker: SeriesTracker::new(EXACT_SERIES_LIMIT),
                window: metrics::gauge!(telemetry::PIPELINE_OUTPUT_CRITICAL_SERIES, "pipeline" => p.clone(), "window" => "10s"),
                total: metrics::gauge!(telemetry::PIPELINE_OUTPUT_CRITICAL_SERIES, "pipeline" => p.clone(), "window" => "total"),
            });
        }
        if fresh || config.raw.conserve != self.config.raw.conserve {
            let previous = self.conserved.take();
            self.conserved = (!config.conserve.is_empty())
                .then(|| Conserved::new(p, &config.conserve, unix_nanos_now(), previous));
            if let Some(conserved) = &self.conserved {
                conserved.publish();
            }
        }
        self.config = config;
    }

    /// Walks one request, counting series into `series` and everything else here.
    pub(super) fn walk(
        &mut self,
        state: &ahash::RandomState,
        series: &mut SeriesTracker,
        request: &[u8],
    ) -> Result<(), wire::WireError> {
        let mut walk = MeterWalk {
            state,
            resource: 0,
            scope: 0,
            metric: 0,
            series_base: 0,
            series,
            selector: self.config.critical.as_ref(),
            critical: self.critical.as_mut().map(|c| &mut c.tracker),
            conserved: self.conserved.as_mut(),
            scratch: &mut self.scratch,
            names: &mut self.names,
            resource_critical: false,
            metric_critical: false,
            metric_conserved: None,
            point_rule: None,
        };
        let walked = wire::walk(request, &mut walk);
        if let Some(conserved) = &self.conserved {
            conserved.publish();
        }
        walked
    }

    pub(super) fn rotate(&mut self) {
        if let Some(critical) = &mut self.critical {
            critical
                .window
                .set(critical.tracker.window_count().0 as f64);
            critical.total.set(critical.tracker.total_count().0 as f64);
            critical.tracker.next_window();
        }
        if let Some(conserved) = &mut self.conserved {
            conserved.publish();
            conserved.next_window();
        }
    }

    #[cfg(test)]
    pub(super) fn critical_counts(&mut self) -> Option<(u64, u64)> {
        self.critical
            .as_mut()
            .map(|c| (c.tracker.window_count().0, c.tracker.total_count().0))
    }

    #[cfg(test)]
    pub(super) fn conserved_total(&self, name: &str) -> Option<f64> {
        let conserved = self.conserved.as_ref()?;
        conserved
            .index
            .get(name)
            .and_then(|i| conserved.totals.get(*i))
            .map(|(total, _)| *total)
    }

    #[cfg(test)]
    pub(super) fn set_since(&mut self, since: u64) {
        if let Some(conserved) = &mut self.conserved {
            conserved.since = since;
        }
    }
}

/// What the config says about one metric name.
#[derive(Clone, Copy)]
struct NameVerdict {
    critical: bool,
    conserved: Option<usize>,
}

/// A name's verdict, with the name to rule out a hash collision.
struct CachedName {
    name: Box<str>,
    verdict: NameVerdict,
}

/// Metric names whose verdict is remembered: the same few names repeat under every resource,
/// and matching globs and regexes costs more than the rest of a metric.
const NAME_CACHE_LIMIT: usize = 4096;

type NameCache = HashMap<u64, CachedName, IdentityBuild>;

/// The series walk with the critical and conserved measurements on top.
struct MeterWalk<'a> {
    state: &'a ahash::RandomState,
    resource: u64,
    scope: u64,
    /// The hash of the current metric's name.
    metric: u64,
    /// [`metric_hash`] of the current metric.
    series_base: u64,
    series: &'a mut SeriesTracker,
    selector: Option<&'a Criteria>,
    critical: Option<&'a mut SeriesTracker>,
    conserved: Option<&'a mut Conserved>,
    scratch: &'a mut String,
    names: &'a mut NameCache,
    resource_critical: bool,
    metric_critical: bool,
    /// The conserve list index of the current metric's name.
    metric_conserved: Option<usize>,
    /// The index and temporality of the current metric if its points are counted.
    point_rule: Option<(usize, i32)>,
}

impl Visitor for MeterWalk<'_> {
    const DETAIL: bool = true;
    /// Pipeline output is well formed by construction.
    const VALIDATE: bool = false;

    fn resource(&mut self, resource: &[u8]) {
        self.resource = resource_hash(self.state, resource);
        // A malformed attribute matches nothing; the walk reports the error itself.
        self.resource_critical = self.selector.is_some_and(|s| {
            all_match(
                &s.resource_attributes,
                Attributes::of_resource(resource),
                self.scratch,
            )
            .unwrap_or(false)
        });
    }

    fn scope(&mut self, scope: &[u8]) {
        self.scope = self.state.hash_one(scope);
    }

    fn metric(&mut self, name: &[u8]) {
        self.metric = name_hash(self.state, name);
        self.series_base = metric_hash(self.state, self.resource, self.scope, self.metric);
        let verdict = match self.names.get(&self.metric) {
            Some(cached) if cached.name.as_bytes() == name => cached.verdict,
            _ => {
                // Not UTF-8 (the walk does not check output): it matches no name.
                let name = std::str::from_utf8(name).unwrap_or_default();
                let verdict = NameVerdict {
                    critical: self.selector.is_some_and(|s| s.name_matches(name)),
                    conserved: self
                        .conserved
                        .as_ref()
                        .and_then(|c| c.index.get(name).copied()),
                };
                if self.names.len() >= NAME_CACHE_LIMIT {
                    self.names.clear();
                }
                self.names.insert(
                    self.metric,
                    CachedName {
                        name: name.into(),
                        verdict,
                    },
                );
                verdict
            }
        };
        self.metric_critical = self.resource_critical && verdict.critical;
        self.metric_conserved = verdict.conserved;
    }

    fn data(&mut self, data: MetricData<'_>) {
        // Only monotonic sums are counters; an up-down counter's drops are not resets. The
        // kind costs a look through the Sum's points: only conserved names need it.
        let kind = match self.metric_conserved {
            Some(_) => data.kind(),
            None => DataKind::Empty,
        };
        self.point_rule = match (self.metric_conserved, kind) {
            (
                Some(index),
                DataKind::Sum {
                    temporality,
                    monotonic: true,
                },
            ) => Some((index, temporality)),
            _ => None,
        };
    }

    fn data_point(&mut self, attributes: AttributeIter<'_>) {
        let series = point_series(self.state, self.series_base, attributes.clone());
        self.series.insert(series);
        if self.metric_critical {
            if let (Some(selector), Some(tracker)) = (self.selector, self.critical.as_deref_mut()) {
                let point = Attributes::new(attributes.point(), attributes.attribute_field());
                if all_match(&selector.datapoint_attributes, point, self.scratch).unwrap_or(false) {
                    tracker.insert(series);
                }
            }
        }
        if let (Some((index, temporality)), Some(conserved)) =
            (self.point_rule, self.conserved.as_deref_mut())
        {
            conserved.add(index, temporality, series, attributes.number());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::otlp::testdata::{
        gauge_metric, int_attr, number_point, resource_metrics, string_attr, sum_metric,
    };
    use crate::otlp::ExportMetricsServiceRequest;
    use crate::stats::VolumeMeter;
    use opentelemetry_proto::tonic::metrics::v1::{
        metric::Data, number_data_point, Metric, NumberDataPoint, ResourceMetrics,
    };
    use prost::Message;
    use std::time::Instant;

    const SINCE: u64 = 1_800_000_000_000_000_000;

    fn config(yaml: &str) -> Arc<MeterConfig> {
        let raw: RawMeterConfig = serde_yaml::from_str(yaml).unwrap();
        let mut issues = Vec::new();
        let config = MeterConfig::compile(raw, "meter", &mut issues);
        assert!(issues.is_empty(), "{issues:?}");
        Arc::new(config.unwrap())
    }

    fn meter(yaml: &str) -> VolumeMeter {
        let mut meter = VolumeMeter::new("test");
        meter.set_config(Some(config(yaml)));
        meter.extra.as_mut().unwrap().set_since(SINCE);
        meter
    }

    fn observe(meter: &mut VolumeMeter, resource_metrics: Vec<ResourceMetrics>) {
        let request = ExportMetricsServiceRequest { resource_metrics };
        meter.observe(&request.encode_to_vec(), 0);
    }

    fn rotate(meter: &mut VolumeMeter) {
        let due = meter.next_rotation();
        meter.rotate_if_due(due);
    }

    fn extra(meter: &mut VolumeMeter) -> &mut Extra {
        meter.extra.as_mut().unwrap()
    }

    const CRITICAL: &str = r#"
critical:
  metric_names: ["process.cpu.*", "regex:^kube_"]
  resource_attributes: { service.name: [checkout, "pay*"] }
  attributes: { phoenix.priority: [critical] }
"#;

    fn priority(value: &str, cpu: i64) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
        vec![string_attr("phoenix.priority", value), int_attr("cpu", cpu)]
    }

    fn service(name: &str) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
        vec![string_attr("service.name", name)]
    }

    #[test]
    fn critical_series_need_name_resource_and_point_attributes_to_match() {
        let mut meter = meter(CRITICAL);
        let checkout = resource_metrics(
            service("checkout"),
            vec![
                sum_metric(
                    "process.cpu.time",
                    vec![
                        number_point(priority("critical", 0), 1.0),
                        number_point(priority("critical", 1), 1.0),
                        number_point(priority("low", 2), 1.0),
                        number_point(priority("critical", 0), 2.0), // the same series again
                    ],
                ),
                gauge_metric("memory", vec![number_point(priority("critical", 0), 1.0)]),
                gauge_metric(
                    "kube_pod_ready",
                    vec![number_point(priority("critical", 0), 1.0)],
                ),
            ],
        );
        let payments = resource_metrics(
            service("payments"),
            vec![gauge_metric(
                "process.cpu.utilization",
                vec![number_point(priority("critical", 0), 0.5)],
            )],
        );
        let web = resource_metrics(
            service("web"),
            vec![gauge_metric(
                "process.cpu.utilization",
                vec![number_point(priority("critical", 0), 0.5)],
            )],
        );
        observe(&mut meter, vec![checkout.clone(), payments, web]);
        assert_eq!(extra(&mut meter).critical_counts(), Some((4, 4)));
        assert_eq!(meter.series.total_count(), (7, false));

        rotate(&mut meter);
        assert_eq!(extra(&mut meter).critical_counts(), Some((0, 4)));
        let mut one = checkout;
        one.scope_metrics[0].metrics.truncate(1);
        observe(&mut meter, vec![one.clone()]);
        assert_eq!(extra(&mut meter).critical_counts(), Some((2, 4)));
        let Some(Data::Sum(sum)) = &mut one.scope_metrics[0].metrics[0].data else {
            unreachable!()
        };
        sum.data_points = vec![number_point(priority("critical", 7), 1.0)];
        observe(&mut meter, vec![one]);
        assert_eq!(extra(&mut meter).critical_counts(), Some((3, 5)));
    }

    #[test]
    fn the_series_count_is_the_same_with_or_without_a_meter_config() {
        let request = crate::otlp::testdata::request(3, 4, 5).encode_to_vec();
        let mut plain = VolumeMeter::new("plain");
        let mut metered = meter(CRITICAL);
        plain.observe(&request, 0);
        metered.observe(&request, 0);
        assert_eq!(plain.series.total_count(), metered.series.total_count());
        assert_eq!(plain.series.total_count(), (60, false));
    }

    fn point(attributes: &str, start: u64, value: f64) -> NumberDataPoint {
        NumberDataPoint {
            start_time_unix_nano: start,
            ..number_point(vec![string_attr("k", attributes)], value)
        }
    }

    fn int_point(attributes: &str, start: u64, value: i64) -> NumberDataPoint {
        NumberDataPoint {
            value: Some(number_data_point::Value::AsInt(value)),
            ..point(attributes, start, 0.0)
        }
    }

    fn sum(name: &str, temporality: i32, monotonic: bool, points: Vec<NumberDataPoint>) -> Metric {
        let mut metric = sum_metric(name, points);
        if let Some(Data::Sum(sum)) = &mut metric.data {
            sum.aggregation_temporality = temporality;
            sum.is_monotonic = monotonic;
        }
        metric
    }

    fn send(meter: &mut VolumeMeter, metrics: Vec<Metric>) {
        observe(meter, vec![resource_metrics(service("a"), metrics)]);
    }

    const CONSERVE: &str = "conserve: [process.cpu.time, http.server.requests]";

    fn total(meter: &mut VolumeMeter, name: &str) -> f64 {
        extra(meter).conserved_total(name).unwrap()
    }

    #[test]
    fn delta_sums_add_every_point() {
        let mut meter = meter(CONSERVE);
        let delta = |points| sum("process.cpu.time", TEMPORALITY_DELTA, true, points);
        send(
            &mut meter,
            vec![delta(vec![point("a", 1, 1.5), point("b", 1, 2.5)])],
        );
        assert_eq!(total(&mut meter, "process.cpu.time"), 4.0);
        send(
            &mut meter,
            vec![delta(vec![point("a", 2, 3.0), int_point("c", 2, 2)])],
        );
        assert_eq!(total(&mut meter, "process.cpu.time"), 9.0);
        assert_eq!(total(&mut meter, "http.server.requests"), 0.0);
    }

    #[test]
    fn cumulative_sums_count_increases_resets_and_series_born_after_the_meter() {
        let mut meter = meter(CONSERVE);
        let cumulative = |points| sum("http.server.requests", TEMPORALITY_CUMULATIVE, true, points);
        let old = SINCE - 1_000;
        // Started before the meter: the first point only sets the baseline.
        send(&mut meter, vec![cumulative(vec![point("a", old, 10.0)])]);
        assert_eq!(total(&mut meter, "http.server.requests"), 0.0);
        send(&mut meter, vec![cumulative(vec![point("a", old, 15.0)])]);
        assert_eq!(total(&mut meter, "http.server.requests"), 5.0);
        // Dropped: a reset counts its new value.
        send(&mut meter, vec![cumulative(vec![point("a", old, 3.0)])]);
        assert_eq!(total(&mut meter, "http.server.requests"), 8.0);
        // A new start time is a reset even if the value grew.
        send(
            &mut meter,
            vec![cumulative(vec![point("a", SINCE + 5, 20.0)])],
        );
        assert_eq!(total(&mut meter, "http.server.requests"), 28.0);
        // Born after the meter started: its first point counts whole.
        send(&mut meter, vec![cumulative(vec![point("b", SINCE, 4.0)])]);
        assert_eq!(total(&mut meter, "http.server.requests"), 32.0);
        send(&mut meter, vec![cumulative(vec![int_point("b", SINCE, 6)])]);
        assert_eq!(total(&mut meter, "http.server.requests"), 34.0);
    }

    #[test]
    fn gauges_unlisted_and_non_monotonic_sums_are_not_counted() {
        let mut meter = meter(CONSERVE);
        send(
            &mut meter,
            vec![
                gauge_metric("process.cpu.time", vec![point("a", SINCE, 5.0)]),
                sum(
                    "process.cpu.time",
                    TEMPORALITY_DELTA,
                    false,
                    vec![point("b", SINCE, 5.0)],
                ),
                sum(
                    "other",
                    TEMPORALITY_DELTA,
                    true,
                    vec![point("c", SINCE, 5.0)],
                ),
                sum("process.cpu.time", 0, true, vec![point("d", SINCE, 5.0)]),
                sum(
                    "process.cpu.time",
                    TEMPORALITY_DELTA,
                    true,
                    vec![point("e", SINCE, f64::NAN)],
                ),
            ],
        );
        assert_eq!(total(&mut meter, "process.cpu.time"), 0.0);
        assert_eq!(extra(&mut meter).conserved_total("other"), None);
        assert_eq!(extra(&mut meter).critical_counts(), None);
    }

    #[test]
    fn temporality_is_read_wherever_it_sits_in_the_sum() {
        // Temporality first, points after: the reverse of what prost writes.
        let mut body = Vec::new();
        body.extend_from_slice(&[0x10, 0x01, 0x18, 0x01]); // delta, monotonic
        let point = point("a", SINCE, 2.0).encode_to_vec();
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut body);
        prost::encoding::encode_varint(point.len() as u64, &mut body);
        body.extend_from_slice(&point);
        let mut metric = Vec::new();
        prost::encoding::string::encode(1, &"process.cpu.time".to_string(), &mut metric);
        prost::encoding::encode_key(7, prost::encoding::WireType::LengthDelimited, &mut metric);
        prost::encoding::encode_varint(body.len() as u64, &mut metric);
        metric.extend_from_slice(&body);
        let metric = Metric::decode(&metric[..]).unwrap();
        let mut meter = meter(CONSERVE);
        send(&mut meter, vec![metric.clone(), metric]);
        assert_eq!(total(&mut meter, "process.cpu.time"), 4.0);
    }

    #[test]
    fn cumulative_state_is_bounded_and_forgets_stale_series() {
        let mut meter = meter(CONSERVE);
        let cumulative = |points| sum("http.server.requests", TEMPORALITY_CUMULATIVE, true, points);
        extra(&mut meter).conserved.as_mut().unwrap().limit = 2;
        send(
            &mut meter,
            vec![cumulative(vec![
                point("a", SINCE, 1.0),
                point("b", SINCE, 1.0),
                point("c", SINCE, 1.0),
            ])],
        );
        // The third series is beyond the bound: not tracked, not counted.
        assert_eq!(total(&mut meter, "http.server.requests"), 2.0);
        for _ in 0..CONSERVED_STALE_WINDOWS - 1 {
            rotate(&mut meter);
        }
        send(&mut meter, vec![cumulative(vec![point("a", SINCE, 2.0)])]);
        assert_eq!(
            extra(&mut meter).conserved.as_ref().unwrap().series.len(),
            2
        );
        rotate(&mut meter);
        // "b" went unseen for 5 minutes; "a" was seen a window ago.
        assert_eq!(
            extra(&mut meter).conserved.as_ref().unwrap().series.len(),
            1
        );
        assert_eq!(total(&mut meter, "http.server.requests"), 3.0);
    }

    #[test]
    fn corrupted_requests_never_panic_the_meter() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4d45_5445);
        let mut meter = meter(&format!(
            "{CRITICAL}conserve: [process.metric.0, process.metric.1, g, s]\n"
        ));
        let seeds = [
            crate::otlp::testdata::request(3, 2, 2).encode_to_vec(),
            crate::otlp::testdata::all_types().encode_to_vec(),
        ];
        for round in 0..10_000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            crate::otlp::testdata::corrupt(&mut bytes, &mut rng);
            meter.observe(&bytes, 0);
            if round % 1000 == 0 {
                rotate(&mut meter);
            }
        }
        for name in ["process.metric.0", "g", "s"] {
            assert!(total(&mut meter, name) >= 0.0);
        }
    }

    #[test]
    fn a_changed_config_resets_only_what_changed() {
        let both = format!("{CRITICAL}{CONSERVE}\n");
        let mut meter = meter(&both);
        let started = Instant::now();
        let delta = |points| sum("process.cpu.time", TEMPORALITY_DELTA, true, points);
        observe(
            &mut meter,
            vec![resource_metrics(
                service("checkout"),
                vec![delta(vec![number_point(priority("critical", 0), 2.0)])],
            )],
        );
        let counts = |meter: &mut VolumeMeter| {
            (
                extra(meter).critical_counts().unwrap().1,
                total(meter, "process.cpu.time"),
            )
        };
        assert_eq!(counts(&mut meter), (1, 2.0));
        // An equal config, parsed again, keeps everything.
        meter.set_config(Some(config(&both)));
        assert_eq!(counts(&mut meter), (1, 2.0));
        // A new selector resets the critical tracker only.
        meter.set_config(Some(config(&both.replace("checkout", "shop"))));
        assert_eq!(counts(&mut meter), (0, 2.0));
        // A longer conserve list keeps the totals of the names still listed.
        meter.set_config(Some(config(&format!(
            "{CRITICAL}conserve: [process.cpu.time, other]\n"
        ))));
        assert_eq!(total(&mut meter, "process.cpu.time"), 2.0);
        assert_eq!(total(&mut meter, "other"), 0.0);
        meter.set_config(None);
        assert!(meter.extra.is_none());
        assert!(started.elapsed() < crate::stats::WINDOW);
    }
}
