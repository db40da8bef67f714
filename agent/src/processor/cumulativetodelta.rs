//! `cumulativetodelta`: turns cumulative monotonic sums, histograms and exponential
//! histograms into deltas, as the Collector's `cumulativetodeltaprocessor` does.
//!
//! Each stream remembers its last cumulative point; the next point becomes the difference,
//! starting at the previous point's time. Where the Collector's rules are followed:
//! - non-monotonic sums, gauges, summaries and delta metrics pass through unchanged;
//! - the first point of a stream goes by `initial_value` (`auto`, `keep`, `drop`);
//! - a new start time starts the stream over, through `initial_value` again (the Collector
//!   keys streams by start time; replacing the state keeps it bounded);
//! - a value or count below the previous one (a reset without a new start time) and a
//!   histogram whose buckets changed are dropped and become the new baseline;
//! - a NaN sum value passes through unconverted; a histogram's NaN sum stays NaN;
//! - points flagged "no recorded value" are dropped; min and max are removed from
//!   histogram deltas, since the cumulative extremes are not the interval's.
//!
//! Beyond the Collector: a point not later than its stream's last one (out of order or a
//! duplicate) is dropped without touching the state, and `max_streams` bounds the state: at
//! the bound, points of new streams are dropped and counted (`reason="stream_limit"`) rather
//! than passed on cumulative, which would mix temporalities within one metric.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ahash::AHashSet;
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, ExponentialHistogramDataPoint,
    HistogramDataPoint, NumberDataPoint,
};
use regex::Regex;
use serde::Deserialize;
use serde_yaml::Value;

use super::streams::{
    self, DropReason, ExpoBuckets, KeyHasher, PointFields, StreamKey, StreamTable, StreamTelemetry,
    Tally,
};
use super::{
    BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory, SharedState,
};
use crate::config::{self, Issue};
use crate::otlp::{ExportMetricsServiceRequest, Payload};

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "cumulativetodelta",
    parse,
};

pub const DEFAULT_MAX_STREAMS: usize = 100_000;

/// Config of `cumulativetodelta`: the Collector's keys, plus `max_streams`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Metrics to convert; all when absent.
    #[serde(default)]
    include: Option<RawMatch>,
    /// Metrics not to convert; wins over `include`.
    #[serde(default)]
    exclude: Option<RawMatch>,
    /// How long a stream unseen is remembered; 0 keeps it until `max_streams` matters.
    #[serde(default, with = "humantime_serde")]
    max_staleness: Duration,
    #[serde(default)]
    initial_value: InitialValue,
    /// Most streams tracked; 0 for no bound.
    #[serde(default = "default_max_streams")]
    max_streams: usize,
}

fn default_max_streams() -> usize {
    DEFAULT_MAX_STREAMS
}

/// A Collector `filterset` block: metric names and how they match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    metrics: Vec<String>,
    #[serde(default)]
    match_type: Option<MatchType>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum MatchType {
    Strict,
    Regexp,
}

/// What to do with the first point of a stream, whose increase before it is unknown.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InitialValue {
    /// Emit it only if the stream started after the processor did (its whole value is then
    /// new) and the point is not its own start.
    #[default]
    Auto,
    /// Emit it as the delta since its start time.
    Keep,
    /// Only remember it.
    Drop,
}

/// Compiled metric-name patterns.
#[derive(Debug)]
enum NameFilter {
    Strict(AHashSet<String>),
    /// Unanchored, as the Collector's `regexp` match type.
    Regexp(Vec<Regex>),
}

impl NameFilter {
    fn compile(raw: &RawMatch, path: &str, issues: &mut Vec<Issue>) -> Option<Self> {
        match (raw.match_type, raw.metrics.is_empty()) {
            (None, true) => None,
            (None, false) => {
                issues.push(Issue::new(
                    format!("{path}.match_type"),
                    "must be set (strict or regexp) when metrics are listed",
                ));
                None
            }
            (Some(_), true) => {
                issues.push(Issue::new(
                    format!("{path}.metrics"),
                    "must list at least one metric name when match_type is set",
                ));
                None
            }
            (Some(MatchType::Strict), false) => {
                Some(Self::Strict(raw.metrics.iter().cloned().collect()))
            }
            (Some(MatchType::Regexp), false) => {
                let mut regexes = Vec::new();
                for (i, pattern) in raw.metrics.iter().enumerate() {
                    match Regex::new(pattern) {
                        Ok(regex) => regexes.push(regex),
                        Err(err) => issues.push(Issue::new(
                            format!("{path}.metrics[{i}]"),
                            format!("invalid regex {pattern:?}: {err}"),
                        )),
                    }
                }
                Some(Self::Regexp(regexes))
            }
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Strict(names) => names.contains(name),
            Self::Regexp(regexes) => regexes.iter().any(|r| r.is_match(name)),
        }
    }
}

#[derive(Debug)]
struct Settings {
    include: Option<NameFilter>,
    exclude: Option<NameFilter>,
    max_staleness: Duration,
    initial_value: InitialValue,
    max_streams: usize,
}

impl Settings {
    fn converts(&self, name: &str) -> bool {
        self.include.as_ref().is_none_or(|f| f.matches(name))
            && !self.exclude.as_ref().is_some_and(|f| f.matches(name))
    }
}

#[derive(Debug)]
pub struct CumulativeToDeltaConfig {
    settings: Arc<Settings>,
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    Ok(Arc::new(CumulativeToDeltaConfig {
        settings: Arc::new(compile(value)?),
    }))
}

fn compile(value: Value) -> Result<Settings, Vec<Issue>> {
    let raw: RawConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    let include = raw
        .include
        .as_ref()
        .and_then(|m| NameFilter::compile(m, "include", &mut issues));
    let exclude = raw
        .exclude
        .as_ref()
        .and_then(|m| NameFilter::compile(m, "exclude", &mut issues));
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Settings {
        include,
        exclude,
        max_staleness: raw.max_staleness,
        initial_value: raw.initial_value,
        max_streams: raw.max_streams,
    })
}

impl ProcessorConfig for CumulativeToDeltaConfig {
    fn build(&self, context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        Box::new(CumulativeToDelta::new(self.settings.clone(), context))
    }
}

/// The last cumulative point of one stream.
#[derive(Debug, Clone)]
struct Last {
    start: u64,
    time: u64,
    value: Cumulative,
}

#[derive(Debug, Clone)]
enum Cumulative {
    Int(i64),
    Double(f64),
    Histogram(HistogramValue),
    Exponential(ExponentialValue),
}

#[derive(Debug, Clone)]
struct HistogramValue {
    count: u64,
    sum: Option<f64>,
    buckets: Vec<u64>,
    bounds: Vec<f64>,
}

#[derive(Debug, Clone)]
struct ExponentialValue {
    count: u64,
    sum: Option<f64>,
    scale: i32,
    zero_count: u64,
    zero_threshold: f64,
    positive: ExpoBuckets,
    negative: ExpoBuckets,
}

/// What survives a reload when the config is unchanged: the streams, and when the processor
/// first started, which `initial_value: auto` compares start times with.
pub struct CumulativeToDeltaState {
    streams: StreamTable<Last>,
    started_at: u64,
}

impl Default for CumulativeToDeltaState {
    fn default() -> Self {
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            streams: StreamTable::default(),
            started_at,
        }
    }
}

pub struct CumulativeToDelta {
    settings: Arc<Settings>,
    state: SharedState<CumulativeToDeltaState>,
    telemetry: StreamTelemetry,
    next_sweep: Instant,
}

impl CumulativeToDelta {
    fn new(settings: Arc<Settings>, context: &mut BuildContext<'_>) -> Self {
        let next_sweep = Instant::now() + streams::sweep_interval(settings.max_staleness);
        Self {
            settings,
            state: context.state(),
            telemetry: StreamTelemetry::new(context),
            next_sweep,
        }
    }

    /// Converts `request` in place as of `now`; returns whether anything is left of it.
    fn convert(&mut self, request: &mut ExportMetricsServiceRequest, now: Instant) -> bool {
        let mut tally = Tally::default();
        let mut state = self.state.lock();
        let state = &mut *state;
        if !self.settings.max_staleness.is_zero() && now >= self.next_sweep {
            tally.evicted_stale +=
                state.streams.evict_stale(now, self.settings.max_staleness) as u64;
            self.next_sweep = now + streams::sweep_interval(self.settings.max_staleness);
        }
        let mut pass = Pass {
            settings: &self.settings,
            streams: &mut state.streams,
            started_at: state.started_at,
            now,
            tally: &mut tally,
        };
        let hasher = pass.streams.hasher();
        for rm in &mut request.resource_metrics {
            let resource = hasher.clone().resource(rm.resource.as_ref());
            for sm in &mut rm.scope_metrics {
                let scope = resource.clone().scope(sm.scope.as_ref());
                for metric in &mut sm.metrics {
                    if !pass.settings.converts(&metric.name) {
                        continue;
                    }
                    let (name, unit) = (&metric.name, &metric.unit);
                    let cumulative = AggregationTemporality::Cumulative as i32;
                    let delta = AggregationTemporality::Delta as i32;
                    match &mut metric.data {
                        Some(Data::Sum(sum))
                            if sum.aggregation_temporality == cumulative && sum.is_monotonic =>
                        {
                            let stream = scope.clone().metric(name, unit, 1, true);
                            pass.points(&mut sum.data_points, &stream);
                            sum.aggregation_temporality = delta;
                        }
                        Some(Data::Histogram(h)) if h.aggregation_temporality == cumulative => {
                            let stream = scope.clone().metric(name, unit, 2, true);
                            pass.points(&mut h.data_points, &stream);
                            h.aggregation_temporality = delta;
                        }
                        Some(Data::ExponentialHistogram(h))
                            if h.aggregation_temporality == cumulative =>
                        {
                            let stream = scope.clone().metric(name, unit, 3, true);
                            pass.points(&mut h.data_points, &stream);
                            h.aggregation_temporality = delta;
                        }
                        _ => {}
                    }
                }
            }
        }
        let series = state.streams.len();
        let kept = !tally.any_dropped() || prune_emptied(request);
        self.telemetry.record(&tally, series);
        kept
    }
}

/// Removes what dropping points emptied: metrics, then scopes and resources left without
/// metrics. Returns whether anything is left.
fn prune_emptied(request: &mut ExportMetricsServiceRequest) -> bool {
    let had_resources = !request.resource_metrics.is_empty();
    request.resource_metrics.retain_mut(|rm| {
        let had_scopes = !rm.scope_metrics.is_empty();
        rm.scope_metrics.retain_mut(|sm| {
            let had_metrics = !sm.metrics.is_empty();
            sm.metrics
                .retain(|m| crate::otlp::metric_data_points(m.data.as_ref()) > 0 || !converted(m));
            !had_metrics || !sm.metrics.is_empty()
        });
        !had_scopes || !rm.scope_metrics.is_empty()
    });
    !had_resources || !request.resource_metrics.is_empty()
}

/// Whether the metric is one this processor turned into a delta (and may have emptied).
fn converted(metric: &opentelemetry_proto::tonic::metrics::v1::Metric) -> bool {
    let delta = AggregationTemporality::Delta as i32;
    match &metric.data {
        Some(Data::Sum(s)) => s.aggregation_temporality == delta,
        Some(Data::Histogram(h)) => h.aggregation_temporality == delta,
        Some(Data::ExponentialHistogram(h)) => h.aggregation_temporality == delta,
        _ => false,
    }
}

impl Processor for CumulativeToDelta {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        let mut request = input.into_request()?;
        if self.convert(&mut request, Instant::now()) {
            out.push(Payload::Decoded(request));
        }
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        (!self.settings.max_staleness.is_zero()).then_some(self.next_sweep)
    }

    fn on_deadline(&mut self, now: Instant, _out: &mut Vec<Payload>) {
        if self.settings.max_staleness.is_zero() {
            return;
        }
        let mut tally = Tally::default();
        let series = {
            let mut state = self.state.lock();
            tally.evicted_stale =
                state.streams.evict_stale(now, self.settings.max_staleness) as u64;
            state.streams.len()
        };
        self.next_sweep = now + streams::sweep_interval(self.settings.max_staleness);
        self.telemetry.record(&tally, series);
    }
}

/// One batch's walk over the streams.
struct Pass<'a> {
    settings: &'a Settings,
    streams: &'a mut StreamTable<Last>,
    started_at: u64,
    now: Instant,
    tally: &'a mut Tally,
}

impl Pass<'_> {
    fn points<P: CumulativePoint>(&mut self, points: &mut Vec<P>, stream: &KeyHasher) {
        points.retain_mut(|point| match self.point(point, stream) {
            Ok(()) => true,
            Err(reason) => {
                self.tally.count_drop(reason);
                false
            }
        });
    }

    /// Rewrites one point as a delta, or says why it is dropped.
    fn point<P: CumulativePoint>(
        &mut self,
        point: &mut P,
        stream: &KeyHasher,
    ) -> Result<(), DropReason> {
        if streams::has_no_value(point.flags()) {
            return Err(DropReason::NoValue);
        }
        let key: StreamKey = stream.point(point.attributes());
        let (start, time) = (point.start(), point.time());
        let Some(last) = self.streams.get_mut(key, self.now) else {
            // A NaN or missing value passes through as it came, as in the Collector.
            let Some(value) = point.value(None) else {
                return Ok(());
            };
            self.streams
                .insert(
                    key,
                    Last { start, time, value },
                    self.now,
                    self.settings.max_streams,
                )
                .map_err(|streams::Full| DropReason::StreamLimit)?;
            return self.initial(start, time);
        };
        if time <= last.time {
            return Err(DropReason::OutOfOrder);
        }
        let Some(value) = point.value(Some(&last.value)) else {
            return Ok(());
        };
        let previous = std::mem::replace(last, Last { start, time, value });
        if start != previous.start || !last.value.same_kind(&previous.value) {
            return self.initial(start, time);
        }
        point.subtract(&previous.value)?;
        point.set_start(previous.time);
        Ok(())
    }

    /// Whether the first point of a stream is emitted, as its own delta since its start.
    fn initial(&self, start: u64, time: u64) -> Result<(), DropReason> {
        let emit = match self.settings.initial_value {
            InitialValue::Keep => true,
            InitialValue::Drop => false,
            InitialValue::Auto => start != 0 && start >= self.started_at && start != time,
        };
        if emit {
            Ok(())
        } else {
            Err(DropReason::Initial)
        }
    }
}

impl Cumulative {
    fn same_kind(&self, other: &Cumulative) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// The three cumulative point types, as the conversion sees them.
trait CumulativePoint: PointFields {
    /// The value to remember, `None` when there is none to convert. Where the point lacks
    /// a part (a NaN histogram sum), `previous` supplies it.
    fn value(&self, previous: Option<&Cumulative>) -> Option<Cumulative>;
    /// Rewrites the point as its increase over `previous`, of the same kind.
    fn subtract(&mut self, previous: &Cumulative) -> Result<(), DropReason>;
}

impl CumulativePoint for NumberDataPoint {
    fn value(&self, _previous: Option<&Cumulative>) -> Option<Cumulative> {
        match self.value? {
            number_data_point::Value::AsInt(i) => Some(Cumulative::Int(i)),
            number_data_point::Value::AsDouble(d) if d.is_nan() => None,
            number_data_point::Value::AsDouble(d) => Some(Cumulative::Double(d)),
        }
    }

    fn subtract(&mut self, previous: &Cumulative) -> Result<(), DropReason> {
        use number_data_point::Value;
        self.value = match (self.value, previous) {
            (Some(Value::AsInt(v)), Cumulative::Int(p)) if v >= *p => {
                Some(Value::AsInt(v.saturating_sub(*p)))
            }
            (Some(Value::AsDouble(v)), Cumulative::Double(p)) if v >= *p => {
                Some(Value::AsDouble(v - p))
            }
            _ => return Err(DropReason::Reset),
        };
        Ok(())
    }
}

/// Compares float lists by their bits, so that NaN bounds compare equal to themselves.
fn same_floats(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The delta of a histogram sum: unknown (removed) unless both sums are known; a NaN sum
/// stays NaN.
fn sum_delta(current: Option<f64>, previous: Option<f64>) -> Option<f64> {
    match (current, previous) {
        (Some(c), _) if c.is_nan() => Some(c),
        (Some(c), Some(p)) => Some(c - p),
        _ => None,
    }
}

/// The sum to remember: this point's, unless it is NaN or absent.
fn remembered_sum(current: Option<f64>, previous: Option<&Cumulative>) -> Option<f64> {
    match current {
        Some(c) if !c.is_nan() => Some(c),
        _ => match previous {
            Some(Cumulative::Histogram(h)) => h.sum,
            Some(Cumulative::Exponential(e)) => e.sum,
            _ => None,
        },
    }
}

impl CumulativePoint for HistogramDataPoint {
    fn value(&self, previous: Option<&Cumulative>) -> Option<Cumulative> {
        Some(Cumulative::Histogram(HistogramValue {
            count: self.count,
            sum: remembered_sum(self.sum, previous),
            buckets: self.bucket_counts.clone(),
            bounds: self.explicit_bounds.clone(),
        }))
    }

    fn subtract(&mut self, previous: &Cumulative) -> Result<(), DropReason> {
        let Cumulative::Histogram(previous) = previous else {
            return Err(DropReason::BucketMismatch);
        };
        if !same_floats(&self.explicit_bounds, &previous.bounds)
            || self.bucket_counts.len() != previous.buckets.len()
        {
            return Err(DropReason::BucketMismatch);
        }
        if self.count < previous.count
            || self
                .bucket_counts
                .iter()
                .zip(&previous.buckets)
                .any(|(c, p)| c < p)
        {
            return Err(DropReason::Reset);
        }
        self.count -= previous.count;
        for (c, p) in self.bucket_counts.iter_mut().zip(&previous.buckets) {
            *c -= p;
        }
        self.sum = sum_delta(self.sum, previous.sum);
        self.min = None;
        self.max = None;
        Ok(())
    }
}

impl CumulativePoint for ExponentialHistogramDataPoint {
    fn value(&self, previous: Option<&Cumulative>) -> Option<Cumulative> {
        Some(Cumulative::Exponential(ExponentialValue {
            count: self.count,
            sum: remembered_sum(self.sum, previous),
            scale: self.scale,
            zero_count: self.zero_count,
            zero_threshold: self.zero_threshold,
            positive: ExpoBuckets::from_proto(self.positive.as_ref()),
            negative: ExpoBuckets::from_proto(self.negative.as_ref()),
        }))
    }

    fn subtract(&mut self, previous: &Cumulative) -> Result<(), DropReason> {
        let Cumulative::Exponential(previous) = previous else {
            return Err(DropReason::BucketMismatch);
        };
        // A cumulative histogram only ever coarsens: its scale can drop and its zero
        // threshold grow, never the reverse (as the Collector checks).
        if self.count < previous.count
            || self.scale > previous.scale
            || self.zero_threshold.partial_cmp(&previous.zero_threshold)
                == Some(std::cmp::Ordering::Less)
        {
            return Err(DropReason::Reset);
        }
        let mut base = previous.clone();
        let halvings = u32::try_from(i64::from(base.scale) - i64::from(self.scale)).unwrap_or(0);
        base.positive.downscale(halvings);
        base.negative.downscale(halvings);
        if self.zero_threshold > base.zero_threshold {
            let widened = base
                .positive
                .take_below(self.zero_threshold, self.scale)
                .saturating_add(base.negative.take_below(self.zero_threshold, self.scale));
            base.zero_count = base.zero_count.saturating_add(widened);
        }
        if self.zero_count < base.zero_count {
            return Err(DropReason::Reset);
        }
        let positive = bucket_delta(self.positive.as_ref(), &base.positive)?;
        let negative = bucket_delta(self.negative.as_ref(), &base.negative)?;
        self.positive = positive;
        self.negative = negative;
        self.count -= previous.count;
        self.zero_count -= base.zero_count;
        self.sum = sum_delta(self.sum, previous.sum);
        self.min = None;
        self.max = None;
        Ok(())
    }
}

type ProtoBuckets =
    opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;

/// `current` minus `previous` (already at `current`'s scale), in `current`'s layout. A
/// previous count the current one lacks or exceeds means the histogram was reset.
fn bucket_delta(
    current: Option<&ProtoBuckets>,
    previous: &ExpoBuckets,
) -> Result<Option<ProtoBuckets>, DropReason> {
    let current_wide = ExpoBuckets::from_proto(current);
    if let Some((lo, hi)) = previous.span() {
        let covered = |i: i64| {
            i >= current_wide.offset && i < current_wide.offset + current_wide.counts.len() as i64
        };
        if !covered(lo) || !covered(hi) {
            return Err(DropReason::Reset);
        }
    }
    let Some(current) = current else {
        return Ok(None);
    };
    let mut delta = current.clone();
    for (i, count) in delta.bucket_counts.iter_mut().enumerate() {
        let previous = previous.count_at(current_wide.offset + i as i64);
        *count = count.checked_sub(previous).ok_or(DropReason::Reset)?;
    }
    Ok(Some(delta))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::ComponentId;
    use crate::otlp::testdata::{resource_metrics, string_attr};
    use crate::processor::state::StateRegistry;
    use crate::processor::test_util::parse_issues;
    use opentelemetry_proto::tonic::metrics::v1::{
        exponential_histogram_data_point::Buckets, ExponentialHistogram, Gauge, Histogram, Metric,
        Sum,
    };

    pub const T0: u64 = 1_700_000_000_000_000_000;
    pub const SEC: u64 = 1_000_000_000;

    pub fn int(start: u64, time: u64, v: i64) -> NumberDataPoint {
        NumberDataPoint {
            start_time_unix_nano: start,
            time_unix_nano: time,
            value: Some(number_data_point::Value::AsInt(v)),
            ..Default::default()
        }
    }

    pub fn double(start: u64, time: u64, v: f64) -> NumberDataPoint {
        NumberDataPoint {
            value: Some(number_data_point::Value::AsDouble(v)),
            ..int(start, time, 0)
        }
    }

    pub fn sum(
        name: &str,
        temporality: AggregationTemporality,
        monotonic: bool,
        points: Vec<NumberDataPoint>,
    ) -> Metric {
        Metric {
            name: name.to_string(),
            data: Some(Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: temporality as i32,
                is_monotonic: monotonic,
            })),
            ..Default::default()
        }
    }

    pub fn histogram(
        temporality: AggregationTemporality,
        points: Vec<HistogramDataPoint>,
    ) -> Metric {
        Metric {
            name: "latency".to_string(),
            data: Some(Data::Histogram(Histogram {
                data_points: points,
                aggregation_temporality: temporality as i32,
            })),
            ..Default::default()
        }
    }

    pub fn hist_point(
        start: u64,
        time: u64,
        sum: f64,
        buckets: Vec<u64>,
        bounds: Vec<f64>,
    ) -> HistogramDataPoint {
        HistogramDataPoint {
            start_time_unix_nano: start,
            time_unix_nano: time,
            count: buckets.iter().sum(),
            sum: Some(sum),
            bucket_counts: buckets,
            explicit_bounds: bounds,
            min: Some(0.5),
            max: Some(9.0),
            ..Default::default()
        }
    }

    pub fn request(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![resource_metrics(
                vec![string_attr("host.name", "a")],
                metrics,
            )],
        }
    }

    /// (start, time, value) of every number point, in order.
    pub fn numbers(request: &ExportMetricsServiceRequest) -> Vec<(u64, u64, f64)> {
        request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .flat_map(|m| match &m.data {
                Some(Data::Sum(s)) => s.data_points.clone(),
                Some(Data::Gauge(g)) => g.data_points.clone(),
                _ => Vec::new(),
            })
            .map(|p| {
                let v = match p.value {
                    Some(number_data_point::Value::AsInt(i)) => i as f64,
                    Some(number_data_point::Value::AsDouble(d)) => d,
                    None => f64::NAN,
                };
                (p.start_time_unix_nano, p.time_unix_nano, v)
            })
            .collect()
    }

    fn build_in(
        yaml: &str,
        previous: Option<&StateRegistry>,
        registry: &mut StateRegistry,
    ) -> CumulativeToDelta {
        let raw: Value = serde_yaml::from_str(yaml).unwrap();
        let settings = Arc::new(compile(raw.clone()).unwrap());
        let id = ComponentId::parse("cumulativetodelta").unwrap();
        let mut context = BuildContext::new("test", &id, &raw, previous, registry);
        CumulativeToDelta::new(settings, &mut context)
    }

    struct Harness {
        processor: CumulativeToDelta,
        now: Instant,
    }

    impl Harness {
        fn new(yaml: &str) -> Self {
            let processor = build_in(yaml, None, &mut StateRegistry::default());
            // Streams in these tests start at T0 or later: after the processor, for `auto`.
            processor.state.lock().started_at = T0;
            Self {
                processor,
                now: Instant::now(),
            }
        }

        fn run(&mut self, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
            let mut request = request(metrics);
            self.processor.convert(&mut request, self.now);
            request
        }

        fn sums(&mut self, points: Vec<NumberDataPoint>) -> Vec<(u64, u64, f64)> {
            numbers(&self.run(vec![sum(
                "requests",
                AggregationTemporality::Cumulative,
                true,
                points,
            )]))
        }

        fn dropped(&self, reason: DropReason) -> u64 {
            self.processor.telemetry.total.dropped(reason)
        }
    }

    fn histograms(request: &ExportMetricsServiceRequest) -> Vec<HistogramDataPoint> {
        request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .flat_map(|m| match &m.data {
                Some(Data::Histogram(h)) => h.data_points.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn monotonic_int_sum_becomes_deltas_starting_at_the_previous_point() {
        let mut h = Harness::new("initial_value: keep");
        let out = h.sums(vec![
            int(T0, T0 + SEC, 10),
            int(T0, T0 + 2 * SEC, 15),
            int(T0, T0 + 3 * SEC, 15),
            int(T0, T0 + 4 * SEC, 22),
        ]);
        assert_eq!(
            out,
            vec![
                (T0, T0 + SEC, 10.0),
                (T0 + SEC, T0 + 2 * SEC, 5.0),
                (T0 + 2 * SEC, T0 + 3 * SEC, 0.0),
                (T0 + 3 * SEC, T0 + 4 * SEC, 7.0),
            ]
        );
        let request = h.run(vec![sum(
            "requests",
            AggregationTemporality::Cumulative,
            true,
            vec![int(T0, T0 + 5 * SEC, 23)],
        )]);
        let Some(Data::Sum(s)) = &request.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("a sum")
        };
        assert_eq!(
            s.aggregation_temporality,
            AggregationTemporality::Delta as i32
        );
        assert!(s.is_monotonic);
    }

    #[test]
    fn double_sum_deltas_and_nan_passes_unconverted() {
        let mut h = Harness::new("initial_value: drop");
        let out = h.sums(vec![
            double(T0, T0 + SEC, 1.5),
            double(T0, T0 + 2 * SEC, 4.0),
            double(T0, T0 + 3 * SEC, f64::NAN),
            double(T0, T0 + 4 * SEC, 4.25),
        ]);
        assert_eq!(h.dropped(DropReason::Initial), 1);
        assert_eq!(out[0], (T0 + SEC, T0 + 2 * SEC, 2.5));
        assert!(out[1].2.is_nan() && out[1].0 == T0, "NaN left as it came");
        assert_eq!(out[2], (T0 + 2 * SEC, T0 + 4 * SEC, 0.25));
    }

    #[test]
    fn non_monotonic_delta_gauge_and_unmatched_metrics_pass_through_unchanged() {
        let mut h = Harness::new(
            "{initial_value: keep, exclude: {match_type: strict, metrics: [skipped]}}",
        );
        let metrics = vec![
            sum(
                "queue",
                AggregationTemporality::Cumulative,
                false,
                vec![int(T0, T0 + SEC, 5)],
            ),
            sum(
                "delta",
                AggregationTemporality::Delta,
                true,
                vec![int(T0, T0 + SEC, 5)],
            ),
            sum(
                "skipped",
                AggregationTemporality::Cumulative,
                true,
                vec![int(T0, T0 + SEC, 5)],
            ),
            Metric {
                name: "temp".into(),
                data: Some(Data::Gauge(Gauge {
                    data_points: vec![double(0, T0, 21.5)],
                })),
                ..Default::default()
            },
        ];
        let expected = request(metrics.clone());
        assert_eq!(h.run(metrics), expected);
        assert_eq!(h.processor.state.lock().streams.len(), 0);
    }

    #[test]
    fn a_decrease_is_dropped_and_becomes_the_new_baseline() {
        let mut h = Harness::new("initial_value: keep");
        let out = h.sums(vec![
            int(T0, T0 + SEC, 100),
            int(T0, T0 + 2 * SEC, 3),
            int(T0, T0 + 3 * SEC, 8),
        ]);
        assert_eq!(
            out,
            vec![(T0, T0 + SEC, 100.0), (T0 + 2 * SEC, T0 + 3 * SEC, 5.0)]
        );
        assert_eq!(h.dropped(DropReason::Reset), 1);
    }

    #[test]
    fn a_new_start_time_restarts_the_stream_through_initial_value() {
        let restart = T0 + 10 * SEC;
        let points = || {
            vec![
                int(T0, T0 + SEC, 10),
                int(restart, restart + SEC, 4),
                int(restart, restart + 2 * SEC, 6),
            ]
        };
        // auto: the restarted stream began after the processor, so its first value is new.
        let out = Harness::new("initial_value: auto").sums(points());
        assert_eq!(
            out,
            vec![
                (T0, T0 + SEC, 10.0),
                (restart, restart + SEC, 4.0),
                (restart + SEC, restart + 2 * SEC, 2.0)
            ]
        );
        let mut h = Harness::new("initial_value: drop");
        assert_eq!(
            h.sums(points()),
            vec![(restart + SEC, restart + 2 * SEC, 2.0)]
        );
        assert_eq!(h.dropped(DropReason::Initial), 2);
    }

    #[test]
    fn auto_drops_streams_older_than_the_processor_or_without_start() {
        let mut h = Harness::new("{}");
        let before = T0 - 60 * SEC;
        let out = h.sums(vec![
            int(before, T0 + SEC, 50),
            int(before, T0 + 2 * SEC, 51),
        ]);
        assert_eq!(out, vec![(T0 + SEC, T0 + 2 * SEC, 1.0)]);
        let out = numbers(&h.run(vec![sum(
            "other",
            AggregationTemporality::Cumulative,
            true,
            vec![int(0, T0 + SEC, 50), int(T0 + SEC, T0 + SEC, 0)],
        )]));
        assert!(
            out.is_empty(),
            "no start time, or the point is its own start"
        );
        assert_eq!(h.dropped(DropReason::Initial), 2);
    }

    #[test]
    fn out_of_order_and_duplicate_points_are_dropped_without_changing_the_state() {
        let mut h = Harness::new("initial_value: keep");
        let out = h.sums(vec![
            int(T0, T0 + 2 * SEC, 10),
            int(T0, T0 + SEC, 5),
            int(T0, T0 + 2 * SEC, 10),
            int(T0, T0 + 3 * SEC, 12),
        ]);
        assert_eq!(
            out,
            vec![(T0, T0 + 2 * SEC, 10.0), (T0 + 2 * SEC, T0 + 3 * SEC, 2.0)]
        );
        assert_eq!(h.dropped(DropReason::OutOfOrder), 2);
    }

    #[test]
    fn streams_are_told_apart_by_resource_scope_and_attributes() {
        let mut h = Harness::new("initial_value: keep");
        let point = |attr: &str, time, v| NumberDataPoint {
            attributes: vec![string_attr("path", attr)],
            ..int(T0, time, v)
        };
        let out = h.sums(vec![
            point("/a", T0 + SEC, 10),
            point("/b", T0 + SEC, 100),
            point("/a", T0 + 2 * SEC, 11),
            point("/b", T0 + 2 * SEC, 130),
        ]);
        let values: Vec<f64> = out.iter().map(|p| p.2).collect();
        assert_eq!(values, vec![10.0, 100.0, 1.0, 30.0]);
        // Same metric and attributes under another resource: another stream.
        let mut other = request(vec![sum(
            "requests",
            AggregationTemporality::Cumulative,
            true,
            vec![point("/a", T0 + 3 * SEC, 1000)],
        )]);
        other.resource_metrics[0].resource = None;
        h.processor.convert(&mut other, h.now);
        assert_eq!(numbers(&other)[0].2, 1000.0);
    }

    #[test]
    fn histogram_buckets_count_and_sum_become_deltas() {
        let mut h = Harness::new("initial_value: keep");
        let bounds = vec![1.0, 5.0];
        let out = histograms(&h.run(vec![histogram(
            AggregationTemporality::Cumulative,
            vec![
                hist_point(T0, T0 + SEC, 10.0, vec![1, 2, 0], bounds.clone()),
                hist_point(T0, T0 + 2 * SEC, 25.5, vec![2, 4, 1], bounds.clone()),
                // Bounds changed: dropped, then the new baseline.
                hist_point(T0, T0 + 3 * SEC, 30.0, vec![2, 4, 1], vec![2.0, 5.0]),
                hist_point(T0, T0 + 4 * SEC, 31.0, vec![2, 5, 1], vec![2.0, 5.0]),
                // Fewer in a bucket: a reset, dropped.
                hist_point(T0, T0 + 5 * SEC, 1.0, vec![0, 1, 0], vec![2.0, 5.0]),
            ],
        )]));
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].bucket_counts, vec![1, 2, 0]);
        let second = &out[1];
        assert_eq!(
            (
                second.start_time_unix_nano,
                second.count,
                second.sum,
                &second.bucket_counts
            ),
            (T0 + SEC, 4, Some(15.5), &vec![1, 2, 1])
        );
        assert_eq!(
            (second.min, second.max),
            (None, None),
            "cumulative extremes removed"
        );
        assert_eq!((out[2].count, out[2].sum), (1, Some(1.0)));
        assert_eq!(h.dropped(DropReason::BucketMismatch), 1);
        assert_eq!(h.dropped(DropReason::Reset), 1);
    }

    #[test]
    fn histogram_nan_sum_stays_nan_and_the_next_delta_uses_the_last_real_sum() {
        let mut h = Harness::new("initial_value: drop");
        let out = histograms(&h.run(vec![histogram(
            AggregationTemporality::Cumulative,
            vec![
                hist_point(T0, T0 + SEC, 10.0, vec![1, 1], vec![1.0]),
                hist_point(T0, T0 + 2 * SEC, f64::NAN, vec![2, 1], vec![1.0]),
                hist_point(T0, T0 + 3 * SEC, 14.0, vec![2, 2], vec![1.0]),
            ],
        )]));
        assert!(out[0].sum.is_some_and(f64::is_nan));
        assert_eq!(out[0].count, 1);
        assert_eq!(out[1].sum, Some(4.0));
    }

    #[test]
    fn exponential_histogram_deltas_follow_a_scale_drop() {
        let mut h = Harness::new("initial_value: drop");
        let point = |time, scale, offset, counts: Vec<u64>, zero| ExponentialHistogramDataPoint {
            start_time_unix_nano: T0,
            time_unix_nano: time,
            count: counts.iter().sum::<u64>() + zero,
            sum: Some(counts.iter().sum::<u64>() as f64),
            scale,
            zero_count: zero,
            positive: Some(Buckets {
                offset,
                bucket_counts: counts,
            }),
            ..Default::default()
        };
        let request = h.run(vec![Metric {
            name: "size".into(),
            data: Some(Data::ExponentialHistogram(ExponentialHistogram {
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                data_points: vec![
                    // Scale 1, indexes 0..=3.
                    point(T0 + SEC, 1, 0, vec![1, 1, 1, 1], 1),
                    // Scale 0, indexes 0..=1: the previous becomes [2, 2].
                    point(T0 + 2 * SEC, 0, 0, vec![3, 5], 2),
                ],
            })),
            ..Default::default()
        }]);
        let Some(Data::ExponentialHistogram(e)) =
            &request.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("an exponential histogram")
        };
        assert_eq!(
            e.aggregation_temporality,
            AggregationTemporality::Delta as i32
        );
        let delta = &e.data_points[0];
        assert_eq!(delta.positive.as_ref().unwrap().bucket_counts, vec![1, 3]);
        assert_eq!((delta.count, delta.zero_count, delta.scale), (5, 1, 0));
        assert_eq!(delta.start_time_unix_nano, T0 + SEC);
    }

    #[test]
    fn include_and_exclude_pick_metrics_by_name() {
        let mut h = Harness::new(
            "{initial_value: keep, include: {match_type: regexp, metrics: ['^http\\.']}, exclude: {match_type: strict, metrics: [http.errors]}}",
        );
        let metric = |name: &str| {
            sum(
                name,
                AggregationTemporality::Cumulative,
                true,
                vec![int(T0, T0 + SEC, 1)],
            )
        };
        let request = h.run(vec![
            metric("http.requests"),
            metric("http.errors"),
            metric("db.calls"),
        ]);
        let temporalities: Vec<(String, i32)> = request.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .map(|m| match &m.data {
                Some(Data::Sum(s)) => (m.name.clone(), s.aggregation_temporality),
                _ => panic!(),
            })
            .collect();
        let (cumulative, delta) = (
            AggregationTemporality::Cumulative as i32,
            AggregationTemporality::Delta as i32,
        );
        assert_eq!(
            temporalities,
            vec![
                ("http.requests".into(), delta),
                ("http.errors".into(), cumulative),
                ("db.calls".into(), cumulative)
            ]
        );
    }

    #[test]
    fn stale_streams_are_forgotten() {
        let mut h = Harness::new("{initial_value: drop, max_staleness: 10s}");
        h.sums(vec![int(T0, T0 + SEC, 10)]);
        h.now += Duration::from_secs(11);
        h.processor.next_sweep = h.now;
        // Forgotten, so this is a first point again: remembered, not emitted.
        assert!(h.sums(vec![int(T0, T0 + 2 * SEC, 12)]).is_empty());
        assert_eq!(h.processor.telemetry.total.evicted_stale, 1);
        assert_eq!(h.dropped(DropReason::Initial), 2);
        // Swept on a deadline too, with no data arriving.
        h.processor
            .on_deadline(h.now + Duration::from_secs(20), &mut Vec::new());
        assert_eq!(h.processor.state.lock().streams.len(), 0);
    }

    #[test]
    fn new_streams_beyond_max_streams_are_dropped_and_emptied_metrics_pruned() {
        let mut h = Harness::new("{initial_value: keep, max_streams: 1}");
        let metric = |name: &str, v| {
            sum(
                name,
                AggregationTemporality::Cumulative,
                true,
                vec![int(T0, T0 + SEC, v)],
            )
        };
        let request = h.run(vec![metric("a", 1), metric("b", 2)]);
        let names: Vec<&str> = request.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(names, vec!["a"]);
        assert_eq!(h.dropped(DropReason::StreamLimit), 1);
        // A request with nothing left is not passed on at all.
        let mut only_b = request_of("b", 3);
        assert!(!h.processor.convert(&mut only_b, h.now));
    }

    fn request_of(name: &str, v: i64) -> ExportMetricsServiceRequest {
        request(vec![sum(
            name,
            AggregationTemporality::Cumulative,
            true,
            vec![int(T0, T0 + 2 * SEC, v)],
        )])
    }

    #[test]
    fn state_survives_a_reload_with_an_unchanged_config() {
        let yaml = "initial_value: keep";
        let mut first = StateRegistry::default();
        let mut old = build_in(yaml, None, &mut first);
        old.convert(&mut request_of("a", 10), Instant::now());
        let mut second = StateRegistry::default();
        let mut new = build_in(yaml, Some(&first), &mut second);
        drop(old);
        let mut request = request(vec![sum(
            "a",
            AggregationTemporality::Cumulative,
            true,
            vec![int(T0, T0 + 3 * SEC, 14)],
        )]);
        new.convert(&mut request, Instant::now());
        assert_eq!(numbers(&request), vec![(T0 + 2 * SEC, T0 + 3 * SEC, 4.0)]);
        // A changed config starts fresh: the same point is a first point again.
        let mut third = StateRegistry::default();
        let mut changed = build_in("initial_value: drop", Some(&second), &mut third);
        let mut request = request_of("a", 20);
        changed.convert(&mut request, Instant::now());
        assert!(numbers(&request).is_empty());
    }

    #[test]
    fn config_errors_name_their_keys() {
        let path = |yaml| {
            parse_issues("cumulativetodelta", yaml)
                .into_iter()
                .map(|i| i.path)
                .collect::<Vec<_>>()
        };
        assert_eq!(path("include: {metrics: [a]}"), vec!["include.match_type"]);
        assert_eq!(
            path("exclude: {match_type: strict}"),
            vec!["exclude.metrics"]
        );
        assert_eq!(
            path("include: {match_type: regexp, metrics: [ok, '(']}"),
            vec!["include.metrics[1]"]
        );
        assert_eq!(
            path("include: {match_type: glob, metrics: [a]}"),
            vec!["include.match_type"]
        );
        assert_eq!(path("initial_value: sometimes"), vec!["initial_value"]);
        assert_eq!(path("max_staleness: soon"), vec!["max_staleness"]);
        assert_eq!(path("max_stale: 1m"), vec!["max_stale"]);
        assert!(path("{}").is_empty());
    }

    /// One step of a well-behaved cumulative source.
    #[derive(Debug, Clone)]
    enum Step {
        /// The counter grew by this much.
        Grow(u32),
        /// The source restarted (a new start time) and has counted this much since.
        Restart(u32),
    }

    fn steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
        use proptest::prelude::*;
        proptest::collection::vec(
            prop_oneof![4 => (0u32..1000).prop_map(Step::Grow), 1 => (0u32..1000).prop_map(Step::Restart)],
            1..40,
        )
    }

    fn run_boxed(
        processor: &mut dyn Processor,
        request: ExportMetricsServiceRequest,
    ) -> Vec<ExportMetricsServiceRequest> {
        let mut out = Vec::new();
        processor
            .process(Payload::Decoded(request), &mut out)
            .unwrap();
        out.into_iter().map(|p| p.into_request().unwrap()).collect()
    }

    proptest::proptest! {
        #[test]
        fn deltas_then_totals_reproduce_the_increase(steps in steps(), as_double: bool) {
            let mut to_delta = Harness::new("{}");
            let id = ComponentId::parse("deltatocumulative").unwrap();
            let d2c_config = crate::processor::parse(&id, Value::Null).unwrap();
            let mut to_total = crate::processor::state::standalone(d2c_config.as_ref(), "test", &id);
            let point = |start, time, v: u64| if as_double { double(start, time, v as f64) } else { int(start, time, v as i64) };
            // The stream starts after the processor (`auto` keeps its first value) with 0.
            let (mut start, mut value, mut increase) = (T0 + 1, 0u64, 0u64);
            let mut deltas = 0.0;
            let mut last_total = None;
            for (i, step) in steps.iter().enumerate() {
                let time = T0 + (i as u64 + 1) * SEC;
                match step {
                    Step::Grow(n) => value += u64::from(*n),
                    Step::Restart(n) => {
                        start = time - 1;
                        value = u64::from(*n);
                    }
                }
                increase += match step { Step::Grow(n) | Step::Restart(n) => u64::from(*n) };
                let out = to_delta.sums(vec![point(start, time, value)]);
                for &(_, _, delta) in &out {
                    proptest::prop_assert!(delta >= 0.0);
                    deltas += delta;
                }
                let delta_request = request(vec![sum("requests", AggregationTemporality::Delta, true,
                    out.iter().map(|&(s, t, v)| point(s, t, v as u64)).collect())]);
                for totals in run_boxed(to_total.as_mut(), delta_request) {
                    for (_, _, total) in numbers(&totals) {
                        proptest::prop_assert!(last_total.is_none_or(|last| total >= last), "totals never go down");
                        last_total = Some(total);
                    }
                }
            }
            proptest::prop_assert_eq!(deltas, increase as f64);
            proptest::prop_assert_eq!(last_total.unwrap_or(0.0), increase as f64);
        }
    }
}
