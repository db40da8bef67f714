//! `deltatocumulative`: turns delta sums, histograms and exponential histograms into running
//! totals, as the Collector's `deltatocumulativeprocessor` does.
//!
//! Each stream keeps its total since its first point; every point is replaced by the total
//! so far, with the stream's first start time. As in the Collector:
//! - a point whose start is before the stream's start, or whose time is not after the
//!   stream's last, is dropped (`reason="out_of_order"`);
//! - a histogram whose bounds changed restarts its stream from that point;
//! - exponential histograms are brought to a common scale (at most 160 buckets a side) and
//!   zero threshold before they are added;
//! - sum, min and max are kept only while every point has them;
//! - monotonicity is kept; cumulative metrics, gauges and summaries pass through unchanged;
//! - at `max_streams`, points of new streams are dropped (`reason="stream_limit"`); a stream
//!   unseen for `max_stale` is forgotten.
//!
//! Beyond the Collector: points flagged "no recorded value" or holding NaN or no value are
//! dropped (`reason="no_value"`) instead of turning the total into NaN for good.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, ExponentialHistogramDataPoint,
    HistogramDataPoint, Metric, NumberDataPoint,
};
use serde::Deserialize;
use serde_yaml::Value;

use super::streams::{
    self, add_buckets, halvings_to_fit, DropReason, ExpoBuckets, KeyHasher, PointFields,
    StreamTable, StreamTelemetry, Tally,
};
use super::{
    BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory, SharedState,
};
use crate::config::{self, Issue};
use crate::otlp::{ExportMetricsServiceRequest, Payload};

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "deltatocumulative",
    parse,
};

pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(300);

/// Config of `deltatocumulative`: the Collector's keys and defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaToCumulativeConfig {
    /// How long a stream unseen is remembered; must be greater than 0.
    #[serde(default = "default_max_stale", with = "humantime_serde")]
    pub max_stale: Duration,
    /// Most streams tracked; 0 (the default) for no bound other than `max_stale`.
    #[serde(default)]
    pub max_streams: usize,
}

fn default_max_stale() -> Duration {
    DEFAULT_MAX_STALE
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let config: DeltaToCumulativeConfig = config::deserialize(value).map_err(|i| vec![i])?;
    if config.max_stale.is_zero() {
        return Err(vec![Issue::new("max_stale", "must be greater than 0")]);
    }
    Ok(Arc::new(config))
}

impl ProcessorConfig for DeltaToCumulativeConfig {
    fn build(&self, context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        Box::new(DeltaToCumulative::new(self.clone(), context))
    }
}

/// The running total of one stream.
#[derive(Debug, Clone)]
struct Total {
    start: u64,
    time: u64,
    value: Accumulated,
}

#[derive(Debug, Clone)]
enum Accumulated {
    Int(i64),
    Double(f64),
    Histogram(HistogramTotal),
    Exponential(ExponentialTotal),
}

#[derive(Debug, Clone)]
struct HistogramTotal {
    count: u64,
    sum: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    buckets: Vec<u64>,
    bounds: Vec<f64>,
}

#[derive(Debug, Clone)]
struct ExponentialTotal {
    count: u64,
    sum: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    scale: i32,
    zero_count: u64,
    zero_threshold: f64,
    positive: ExpoBuckets,
    negative: ExpoBuckets,
}

/// What survives a reload when the config is unchanged.
#[derive(Default)]
pub struct DeltaToCumulativeState {
    streams: StreamTable<Total>,
}

pub struct DeltaToCumulative {
    config: DeltaToCumulativeConfig,
    state: SharedState<DeltaToCumulativeState>,
    telemetry: StreamTelemetry,
    next_sweep: Instant,
}

impl DeltaToCumulative {
    fn new(config: DeltaToCumulativeConfig, context: &mut BuildContext<'_>) -> Self {
        let next_sweep = Instant::now() + streams::sweep_interval(config.max_stale);
        Self {
            config,
            state: context.state(),
            telemetry: StreamTelemetry::new(context),
            next_sweep,
        }
    }

    /// Accumulates `request` in place as of `now`; returns whether anything is left of it.
    fn accumulate(&mut self, request: &mut ExportMetricsServiceRequest, now: Instant) -> bool {
        let mut tally = Tally::default();
        let mut state = self.state.lock();
        if now >= self.next_sweep {
            tally.evicted_stale += state.streams.evict_stale(now, self.config.max_stale) as u64;
            self.next_sweep = now + streams::sweep_interval(self.config.max_stale);
        }
        let mut pass = Pass {
            streams: &mut state.streams,
            max_streams: self.config.max_streams,
            now,
            tally: &mut tally,
        };
        let hasher = pass.streams.hasher();
        let delta = AggregationTemporality::Delta as i32;
        let cumulative = AggregationTemporality::Cumulative as i32;
        for rm in &mut request.resource_metrics {
            let resource = hasher.clone().resource(rm.resource.as_ref());
            for sm in &mut rm.scope_metrics {
                let scope = resource.clone().scope(sm.scope.as_ref());
                for metric in &mut sm.metrics {
                    let monotonic = matches!(&metric.data, Some(Data::Sum(s)) if s.is_monotonic);
                    let (name, unit) = (&metric.name, &metric.unit);
                    let stream = |kind| scope.clone().metric(name, unit, kind, monotonic);
                    match &mut metric.data {
                        Some(Data::Sum(s)) if s.aggregation_temporality == delta => {
                            pass.points(&mut s.data_points, &stream(1));
                            s.aggregation_temporality = cumulative;
                        }
                        Some(Data::Histogram(h)) if h.aggregation_temporality == delta => {
                            pass.points(&mut h.data_points, &stream(2));
                            h.aggregation_temporality = cumulative;
                        }
                        Some(Data::ExponentialHistogram(h))
                            if h.aggregation_temporality == delta =>
                        {
                            pass.points(&mut h.data_points, &stream(3));
                            h.aggregation_temporality = cumulative;
                        }
                        _ => {}
                    }
                }
            }
        }
        let series = state.streams.len();
        drop(state);
        let kept = !tally.any_dropped() || prune_emptied(request);
        self.telemetry.record(&tally, series);
        kept
    }
}

/// Removes what dropping points emptied: metrics this processor made cumulative and left
/// without points, then scopes and resources left without metrics. Returns whether anything
/// is left.
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

fn converted(metric: &Metric) -> bool {
    let cumulative = AggregationTemporality::Cumulative as i32;
    match &metric.data {
        Some(Data::Sum(s)) => s.aggregation_temporality == cumulative,
        Some(Data::Histogram(h)) => h.aggregation_temporality == cumulative,
        Some(Data::ExponentialHistogram(h)) => h.aggregation_temporality == cumulative,
        _ => false,
    }
}

impl Processor for DeltaToCumulative {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        let mut request = input.into_request()?;
        if self.accumulate(&mut request, Instant::now()) {
            out.push(Payload::Decoded(request));
        }
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        Some(self.next_sweep)
    }

    fn on_deadline(&mut self, now: Instant, _out: &mut Vec<Payload>) {
        let mut tally = Tally::default();
        let series = {
            let mut state = self.state.lock();
            tally.evicted_stale = state.streams.evict_stale(now, self.config.max_stale) as u64;
            state.streams.len()
        };
        self.next_sweep = now + streams::sweep_interval(self.config.max_stale);
        self.telemetry.record(&tally, series);
    }
}

/// One batch's walk over the streams.
struct Pass<'a> {
    streams: &'a mut StreamTable<Total>,
    max_streams: usize,
    now: Instant,
    tally: &'a mut Tally,
}

impl Pass<'_> {
    fn points<P: DeltaPoint>(&mut self, points: &mut Vec<P>, stream: &KeyHasher) {
        points.retain_mut(|point| match self.point(point, stream) {
            Ok(()) => true,
            Err(reason) => {
                self.tally.count_drop(reason);
                false
            }
        });
    }

    /// Replaces one delta point by its stream's total, or says why it is dropped.
    fn point<P: DeltaPoint>(
        &mut self,
        point: &mut P,
        stream: &KeyHasher,
    ) -> Result<(), DropReason> {
        if streams::has_no_value(point.flags()) {
            return Err(DropReason::NoValue);
        }
        let Some(value) = point.value() else {
            return Err(DropReason::NoValue);
        };
        let key = stream.point(point.attributes());
        let (start, time) = (point.start(), point.time());
        let Some(total) = self.streams.get_mut(key, self.now) else {
            // A new stream: its total is the point itself, which goes out as it came.
            let total = Total { start, time, value };
            return self
                .streams
                .insert(key, total, self.now, self.max_streams)
                .map_err(|streams::Full| DropReason::StreamLimit);
        };
        if start < total.start || time <= total.time {
            return Err(DropReason::OutOfOrder);
        }
        if total.value.add(value.clone()) {
            total.time = time;
        } else {
            // Totals that cannot be added to (histogram bounds changed): start over here.
            *total = Total { start, time, value };
        }
        point.write(&total.value, total.start);
        Ok(())
    }
}

fn add_optional(total: Option<f64>, delta: Option<f64>, add: fn(f64, f64) -> f64) -> Option<f64> {
    match (total, delta) {
        (Some(t), Some(d)) => Some(add(t, d)),
        _ => None,
    }
}

/// A histogram sum as a total can use: a NaN one is as good as none.
fn real(sum: Option<f64>) -> Option<f64> {
    sum.filter(|s| !s.is_nan())
}

impl Accumulated {
    /// Adds `delta` into the total; false when the two cannot be added.
    fn add(&mut self, delta: Accumulated) -> bool {
        match (self, delta) {
            (Accumulated::Int(t), Accumulated::Int(d)) => *t = t.saturating_add(d),
            (Accumulated::Double(t), Accumulated::Double(d)) => *t += d,
            (Accumulated::Histogram(t), Accumulated::Histogram(d)) => {
                let same_bounds = t.bounds.len() == d.bounds.len()
                    && t.bounds
                        .iter()
                        .zip(&d.bounds)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                if !same_bounds || t.buckets.len() != d.buckets.len() {
                    return false;
                }
                t.count = t.count.saturating_add(d.count);
                for (a, b) in t.buckets.iter_mut().zip(&d.buckets) {
                    *a = a.saturating_add(*b);
                }
                t.sum = add_optional(t.sum, d.sum, |a, b| a + b);
                t.min = add_optional(t.min, d.min, f64::min);
                t.max = add_optional(t.max, d.max, f64::max);
            }
            (Accumulated::Exponential(t), Accumulated::Exponential(d)) => return t.add(d),
            _ => return false,
        }
        true
    }
}

impl ExponentialTotal {
    fn add(&mut self, mut d: ExponentialTotal) -> bool {
        // Both to the coarser scale, then coarser still until the union fits.
        let common = self.scale.min(d.scale);
        let halvings = |from: i32| u32::try_from(i64::from(from) - i64::from(common)).unwrap_or(0);
        self.rescale(halvings(self.scale));
        d.rescale(halvings(d.scale));
        let fit = halvings_to_fit(&self.positive, &d.positive)
            .max(halvings_to_fit(&self.negative, &d.negative));
        let Ok(scale) = i32::try_from(i64::from(common) - i64::from(fit)) else {
            return false;
        };
        self.rescale(fit);
        d.rescale(fit);
        self.scale = scale;
        // Both to the wider zero bucket.
        if d.zero_threshold > self.zero_threshold {
            self.widen_zero(d.zero_threshold);
        } else if self.zero_threshold > d.zero_threshold {
            d.widen_zero(self.zero_threshold);
        }
        add_buckets(&mut self.positive, &d.positive);
        add_buckets(&mut self.negative, &d.negative);
        self.zero_count = self.zero_count.saturating_add(d.zero_count);
        self.count = self.count.saturating_add(d.count);
        self.sum = add_optional(self.sum, d.sum, |a, b| a + b);
        self.min = add_optional(self.min, d.min, f64::min);
        self.max = add_optional(self.max, d.max, f64::max);
        true
    }

    fn rescale(&mut self, halvings: u32) {
        self.positive.downscale(halvings);
        self.negative.downscale(halvings);
        self.scale = i32::try_from(i64::from(self.scale) - i64::from(halvings)).unwrap_or(i32::MIN);
    }

    fn widen_zero(&mut self, threshold: f64) {
        let moved = self
            .positive
            .take_below(threshold, self.scale)
            .saturating_add(self.negative.take_below(threshold, self.scale));
        self.zero_count = self.zero_count.saturating_add(moved);
        self.zero_threshold = threshold;
    }
}

/// The three delta point types, as the accumulation sees them.
trait DeltaPoint: PointFields {
    /// The point as a total, `None` when it holds no usable value.
    fn value(&self) -> Option<Accumulated>;
    /// Replaces the point's values by `total`, accumulated since `start`.
    fn write(&mut self, total: &Accumulated, start: u64);
}

impl DeltaPoint for NumberDataPoint {
    fn value(&self) -> Option<Accumulated> {
        match self.value? {
            number_data_point::Value::AsInt(i) => Some(Accumulated::Int(i)),
            number_data_point::Value::AsDouble(d) if d.is_nan() => None,
            number_data_point::Value::AsDouble(d) => Some(Accumulated::Double(d)),
        }
    }

    fn write(&mut self, total: &Accumulated, start: u64) {
        self.start_time_unix_nano = start;
        match total {
            Accumulated::Int(i) => self.value = Some(number_data_point::Value::AsInt(*i)),
            Accumulated::Double(d) => self.value = Some(number_data_point::Value::AsDouble(*d)),
            _ => {}
        }
    }
}

impl DeltaPoint for HistogramDataPoint {
    fn value(&self) -> Option<Accumulated> {
        Some(Accumulated::Histogram(HistogramTotal {
            count: self.count,
            sum: real(self.sum),
            min: real(self.min),
            max: real(self.max),
            buckets: self.bucket_counts.clone(),
            bounds: self.explicit_bounds.clone(),
        }))
    }

    fn write(&mut self, total: &Accumulated, start: u64) {
        let Accumulated::Histogram(total) = total else {
            return;
        };
        self.start_time_unix_nano = start;
        self.count = total.count;
        self.sum = total.sum;
        self.min = total.min;
        self.max = total.max;
        self.bucket_counts.clone_from(&total.buckets);
        self.explicit_bounds.clone_from(&total.bounds);
    }
}

impl DeltaPoint for ExponentialHistogramDataPoint {
    fn value(&self) -> Option<Accumulated> {
        Some(Accumulated::Exponential(ExponentialTotal {
            count: self.count,
            sum: real(self.sum),
            min: real(self.min),
            max: real(self.max),
            scale: self.scale,
            zero_count: self.zero_count,
            // A NaN threshold would compare as neither wider nor narrower, forever.
            zero_threshold: if self.zero_threshold.is_nan() {
                0.0
            } else {
                self.zero_threshold
            },
            positive: ExpoBuckets::from_proto(self.positive.as_ref()),
            negative: ExpoBuckets::from_proto(self.negative.as_ref()),
        }))
    }

    fn write(&mut self, total: &Accumulated, start: u64) {
        let Accumulated::Exponential(total) = total else {
            return;
        };
        self.start_time_unix_nano = start;
        self.count = total.count;
        self.sum = total.sum;
        self.min = total.min;
        self.max = total.max;
        self.scale = total.scale;
        self.zero_count = total.zero_count;
        self.zero_threshold = total.zero_threshold;
        self.positive = total.positive.to_proto();
        self.negative = total.negative.to_proto();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ComponentId;
    use crate::processor::cumulativetodelta::tests::{
        double, hist_point, histogram, int, numbers, request, sum, SEC, T0,
    };
    use crate::processor::state::StateRegistry;
    use crate::processor::test_util::parse_issues;
    use opentelemetry_proto::tonic::metrics::v1::{
        exponential_histogram_data_point::Buckets, ExponentialHistogram,
    };

    fn build_in(
        yaml: &str,
        previous: Option<&StateRegistry>,
        registry: &mut StateRegistry,
    ) -> DeltaToCumulative {
        let raw: Value = serde_yaml::from_str(yaml).unwrap();
        let config: DeltaToCumulativeConfig = config::deserialize(raw.clone()).unwrap();
        let id = ComponentId::parse("deltatocumulative").unwrap();
        let mut context = BuildContext::new("test", &id, &raw, previous, registry);
        DeltaToCumulative::new(config, &mut context)
    }

    struct Harness {
        processor: DeltaToCumulative,
        now: Instant,
    }

    impl Harness {
        fn new(yaml: &str) -> Self {
            Self {
                processor: build_in(yaml, None, &mut StateRegistry::default()),
                now: Instant::now(),
            }
        }

        fn run(&mut self, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
            let mut request = request(metrics);
            self.processor.accumulate(&mut request, self.now);
            request
        }

        fn sums(&mut self, monotonic: bool, points: Vec<NumberDataPoint>) -> Vec<(u64, u64, f64)> {
            numbers(&self.run(vec![sum(
                "requests",
                AggregationTemporality::Delta,
                monotonic,
                points,
            )]))
        }

        fn dropped(&self, reason: DropReason) -> u64 {
            self.processor.telemetry.total.dropped(reason)
        }
    }

    #[test]
    fn delta_sums_become_running_totals_from_the_first_start() {
        let mut h = Harness::new("{}");
        let out = h.sums(
            true,
            vec![
                int(T0, T0 + SEC, 3),
                int(T0 + SEC, T0 + 2 * SEC, 4),
                int(T0 + 2 * SEC, T0 + 3 * SEC, 0),
            ],
        );
        assert_eq!(
            out,
            vec![
                (T0, T0 + SEC, 3.0),
                (T0, T0 + 2 * SEC, 7.0),
                (T0, T0 + 3 * SEC, 7.0)
            ]
        );
        let request = h.run(vec![sum(
            "requests",
            AggregationTemporality::Delta,
            true,
            vec![int(T0 + 3 * SEC, T0 + 4 * SEC, 1)],
        )]);
        let Some(Data::Sum(s)) = &request.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("a sum")
        };
        assert_eq!(
            s.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert!(s.is_monotonic, "monotonic stays monotonic");
        assert_eq!(
            s.data_points[0].value,
            Some(number_data_point::Value::AsInt(8))
        );
    }

    #[test]
    fn non_monotonic_double_sums_accumulate_down_as_well() {
        let mut h = Harness::new("{}");
        let out = h.sums(
            false,
            vec![
                double(T0, T0 + SEC, 2.5),
                double(T0 + SEC, T0 + 2 * SEC, -1.0),
                double(T0 + 2 * SEC, T0 + 3 * SEC, f64::NAN),
                double(T0 + 3 * SEC, T0 + 4 * SEC, 0.25),
            ],
        );
        assert_eq!(
            out,
            vec![
                (T0, T0 + SEC, 2.5),
                (T0, T0 + 2 * SEC, 1.5),
                (T0, T0 + 4 * SEC, 1.75)
            ]
        );
        assert_eq!(h.dropped(DropReason::NoValue), 1);
    }

    #[test]
    fn late_duplicate_and_older_start_points_are_dropped() {
        let mut h = Harness::new("{}");
        let out = h.sums(
            true,
            vec![
                int(T0 + SEC, T0 + 2 * SEC, 5),
                int(T0 + SEC, T0 + 2 * SEC, 5),
                int(T0, T0 + 3 * SEC, 1),
                int(T0 + 2 * SEC, T0 + 3 * SEC, 2),
            ],
        );
        assert_eq!(
            out,
            vec![(T0 + SEC, T0 + 2 * SEC, 5.0), (T0 + SEC, T0 + 3 * SEC, 7.0)]
        );
        assert_eq!(h.dropped(DropReason::OutOfOrder), 2);
    }

    #[test]
    fn histograms_add_bucket_wise_and_restart_when_bounds_change() {
        let mut h = Harness::new("{}");
        let request = h.run(vec![histogram(
            AggregationTemporality::Delta,
            vec![
                hist_point(T0, T0 + SEC, 3.0, vec![1, 2, 0], vec![1.0, 5.0]),
                HistogramDataPoint {
                    min: Some(0.1),
                    max: Some(20.0),
                    ..hist_point(T0 + SEC, T0 + 2 * SEC, 30.0, vec![0, 1, 1], vec![1.0, 5.0])
                },
                hist_point(T0 + 2 * SEC, T0 + 3 * SEC, 7.0, vec![4, 0], vec![2.0]),
            ],
        )]);
        let Some(Data::Histogram(hist)) =
            &request.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("a histogram")
        };
        assert_eq!(
            hist.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let second = &hist.data_points[1];
        assert_eq!(
            (
                second.start_time_unix_nano,
                second.count,
                second.sum,
                second.min,
                second.max,
                &second.bucket_counts
            ),
            (T0, 5, Some(33.0), Some(0.1), Some(20.0), &vec![1, 3, 1])
        );
        let third = &hist.data_points[2];
        assert_eq!(
            (
                third.start_time_unix_nano,
                third.count,
                &third.bucket_counts,
                &third.explicit_bounds
            ),
            (T0 + 2 * SEC, 4, &vec![4, 0], &vec![2.0])
        );
    }

    #[test]
    fn exponential_histograms_are_added_at_the_coarser_scale() {
        let mut h = Harness::new("{}");
        let point =
            |start, time, scale, offset, counts: Vec<u64>, zero| ExponentialHistogramDataPoint {
                start_time_unix_nano: start,
                time_unix_nano: time,
                count: counts.iter().sum::<u64>() + zero,
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
                aggregation_temporality: AggregationTemporality::Delta as i32,
                data_points: vec![
                    point(T0, T0 + SEC, 1, 0, vec![1, 1, 1, 1], 1),
                    point(T0 + SEC, T0 + 2 * SEC, 0, 1, vec![5], 0),
                ],
            })),
            ..Default::default()
        }]);
        let Some(Data::ExponentialHistogram(e)) =
            &request.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("an exponential histogram")
        };
        let total = &e.data_points[1];
        // Scale 1 indexes 0..=3 are scale 0 indexes 0, 0, 1, 1.
        assert_eq!(total.scale, 0);
        assert_eq!(
            total.positive,
            Some(Buckets {
                offset: 0,
                bucket_counts: vec![2, 7]
            })
        );
        assert_eq!(
            (total.count, total.zero_count, total.start_time_unix_nano),
            (10, 1, T0)
        );
    }

    #[test]
    fn stream_limit_drops_new_streams_and_staleness_frees_room() {
        let mut h = Harness::new("{max_streams: 1, max_stale: 10s}");
        let metric = |name: &str, time| {
            sum(
                name,
                AggregationTemporality::Delta,
                true,
                vec![int(T0, time, 1)],
            )
        };
        let out = h.run(vec![metric("a", T0 + SEC), metric("b", T0 + SEC)]);
        assert_eq!(numbers(&out).len(), 1);
        assert_eq!(
            out.resource_metrics[0].scope_metrics[0].metrics.len(),
            1,
            "emptied metric pruned"
        );
        assert_eq!(h.dropped(DropReason::StreamLimit), 1);
        h.now += Duration::from_secs(11);
        h.processor.next_sweep = h.now;
        let out = h.run(vec![metric("b", T0 + 2 * SEC)]);
        assert_eq!(numbers(&out), vec![(T0, T0 + 2 * SEC, 1.0)]);
        assert_eq!(h.processor.telemetry.total.evicted_stale, 1);
    }

    #[test]
    fn state_survives_a_reload_with_an_unchanged_config() {
        let point = |time| {
            request(vec![sum(
                "a",
                AggregationTemporality::Delta,
                true,
                vec![int(T0, time, 2)],
            )])
        };
        let mut first = StateRegistry::default();
        let mut old = build_in("max_stale: 1m", None, &mut first);
        old.accumulate(&mut point(T0 + SEC), Instant::now());
        let mut second = StateRegistry::default();
        let mut new = build_in("max_stale: 1m", Some(&first), &mut second);
        drop(old);
        let mut request = point(T0 + 2 * SEC);
        new.accumulate(&mut request, Instant::now());
        assert_eq!(numbers(&request), vec![(T0, T0 + 2 * SEC, 4.0)]);
        let mut third = StateRegistry::default();
        let mut changed = build_in("max_stale: 2m", Some(&second), &mut third);
        let mut request = point(T0 + 3 * SEC);
        changed.accumulate(&mut request, Instant::now());
        assert_eq!(numbers(&request), vec![(T0, T0 + 3 * SEC, 2.0)]);
    }

    #[test]
    fn config_errors_name_their_keys() {
        let paths = |yaml| {
            parse_issues("deltatocumulative", yaml)
                .into_iter()
                .map(|i| i.path)
                .collect::<Vec<_>>()
        };
        assert_eq!(paths("max_stale: 0s"), vec!["max_stale"]);
        assert_eq!(paths("max_stale: often"), vec!["max_stale"]);
        assert_eq!(paths("max_streams: -1"), vec!["max_streams"]);
        assert!(paths("{}").is_empty());
    }

    mod garbage {
        use super::*;
        use opentelemetry_proto::tonic::metrics::v1::{Gauge, Histogram, Sum};
        use proptest::prelude::*;

        fn float() -> impl Strategy<Value = f64> {
            prop_oneof![
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                Just(0.0),
                -10.0..10.0f64,
                any::<f64>()
            ]
        }

        fn time() -> impl Strategy<Value = u64> {
            prop_oneof![0..4u64, Just(u64::MAX), any::<u64>()]
        }

        fn counts() -> impl Strategy<Value = Vec<u64>> {
            proptest::collection::vec(prop_oneof![0..5u64, Just(u64::MAX)], 0..5)
        }

        fn number() -> impl Strategy<Value = NumberDataPoint> {
            (
                time(),
                time(),
                prop_oneof![
                    any::<i64>().prop_map(number_data_point::Value::AsInt),
                    float().prop_map(number_data_point::Value::AsDouble)
                ],
                0..2u32,
                0..3i64,
            )
                .prop_map(|(start, time, value, flags, attr)| NumberDataPoint {
                    start_time_unix_nano: start,
                    time_unix_nano: time,
                    value: (attr != 2).then_some(value),
                    flags,
                    attributes: vec![crate::otlp::testdata::int_attr("k", attr)],
                    ..Default::default()
                })
        }

        fn histogram_point() -> impl Strategy<Value = HistogramDataPoint> {
            (
                time(),
                time(),
                any::<u64>(),
                proptest::option::of(float()),
                counts(),
                proptest::collection::vec(float(), 0..4),
                proptest::option::of(float()),
            )
                .prop_map(
                    |(start, time, count, sum, bucket_counts, explicit_bounds, min)| {
                        HistogramDataPoint {
                            start_time_unix_nano: start,
                            time_unix_nano: time,
                            count,
                            sum,
                            bucket_counts,
                            explicit_bounds,
                            min,
                            max: min,
                            ..Default::default()
                        }
                    },
                )
        }

        fn exponential_point() -> impl Strategy<Value = ExponentialHistogramDataPoint> {
            let scale = prop_oneof![-3..4i32, Just(i32::MIN), Just(i32::MAX), any::<i32>()];
            let offset = prop_oneof![-5..5i32, Just(i32::MIN), Just(i32::MAX - 2), any::<i32>()];
            (
                time(),
                time(),
                any::<u64>(),
                scale,
                offset.clone(),
                counts(),
                offset,
                counts(),
                float(),
                0..4u64,
            )
                .prop_map(
                    |(
                        start,
                        time,
                        count,
                        scale,
                        pos_offset,
                        pos,
                        neg_offset,
                        neg,
                        zero_threshold,
                        zero_count,
                    )| ExponentialHistogramDataPoint {
                        start_time_unix_nano: start,
                        time_unix_nano: time,
                        count,
                        scale,
                        zero_count,
                        zero_threshold,
                        positive: Some(Buckets {
                            offset: pos_offset,
                            bucket_counts: pos,
                        }),
                        negative: Some(Buckets {
                            offset: neg_offset,
                            bucket_counts: neg,
                        }),
                        ..Default::default()
                    },
                )
        }

        fn metric() -> impl Strategy<Value = Metric> {
            let temporality = prop_oneof![Just(0), Just(1), Just(2), any::<i32>()];
            prop_oneof![
                (
                    proptest::collection::vec(number(), 0..4),
                    temporality.clone(),
                    any::<bool>()
                )
                    .prop_map(
                        |(data_points, aggregation_temporality, is_monotonic)| Data::Sum(Sum {
                            data_points,
                            aggregation_temporality,
                            is_monotonic
                        })
                    ),
                (
                    proptest::collection::vec(histogram_point(), 0..4),
                    temporality.clone()
                )
                    .prop_map(|(data_points, aggregation_temporality)| {
                        Data::Histogram(Histogram {
                            data_points,
                            aggregation_temporality,
                        })
                    }),
                (
                    proptest::collection::vec(exponential_point(), 0..4),
                    temporality
                )
                    .prop_map(|(data_points, aggregation_temporality)| {
                        Data::ExponentialHistogram(ExponentialHistogram {
                            data_points,
                            aggregation_temporality,
                        })
                    }),
                proptest::collection::vec(number(), 0..2)
                    .prop_map(|data_points| Data::Gauge(Gauge { data_points })),
            ]
            .prop_map(|data| Metric {
                name: "m".into(),
                data: Some(data),
                ..Default::default()
            })
        }

        proptest! {
            #[test]
            fn garbage_never_panics_either_processor(batches in proptest::collection::vec(proptest::collection::vec(metric(), 0..4), 1..6)) {
                let processors: Vec<(&str, &str)> = vec![
                    ("cumulativetodelta", "{initial_value: keep, max_streams: 3}"),
                    ("cumulativetodelta", "{}"),
                    ("deltatocumulative", "{max_streams: 3}"),
                ];
                for (kind, yaml) in processors {
                    let id = ComponentId::parse(kind).unwrap();
                    let config = crate::processor::parse(&id, serde_yaml::from_str(yaml).unwrap()).unwrap();
                    let mut processor = crate::processor::state::standalone(config.as_ref(), "test", &id);
                    let mut out = Vec::new();
                    for metrics in &batches {
                        processor.process(Payload::Decoded(request(metrics.clone())), &mut out).unwrap();
                        // And its own output again: deltas fed back, totals fed back.
                        let again: Vec<Payload> = std::mem::take(&mut out);
                        for payload in again {
                            processor.process(payload, &mut out).unwrap();
                        }
                    }
                    processor.on_deadline(Instant::now() + Duration::from_secs(3600), &mut out);
                }
            }
        }
    }
}
