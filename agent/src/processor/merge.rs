//! The merge engine: folds many input series into fewer output series over an interval,
//! with the semantics of each OTLP metric type. `aggregate` drives it with a keep/drop
//! projection; `topk` (its "others" rollup) and `cardinality_limit` (its overflow series)
//! reuse it with their own [`Projection`].
//!
//! An *input series* (a member) is one original identity: resource attributes, scope name and
//! version, metric name, unit and type, point attributes. The projection maps it to an
//! *output series*. Cumulative inputs are turned into per-member deltas (with reset
//! detection), so that the output of a monotonic sum or a histogram is the sum of the
//! members' increases and never goes down when a member restarts or exits.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use ahash::{AHasher, RandomState};
use indexmap::IndexMap;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
    AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram,
    HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;

use super::pattern::Matcher;

mod wire;
use crate::telemetry;

/// Output temporality of monotonic sums and histograms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Temporality {
    #[default]
    Cumulative,
    Delta,
}

/// How the gauge points of one interval merge into one output point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GaugeFn {
    /// Sum of each member's latest value.
    Sum,
    /// Mean of each member's latest value.
    #[default]
    Avg,
    Min,
    Max,
    /// The value with the latest timestamp.
    Last,
    /// Number of members that reported.
    Count,
}

/// What happens to summary points, which cannot be merged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryPolicy {
    /// Left in place, counted as unmerged (reason `summary`).
    #[default]
    Pass,
    /// Removed, counted as dropped (reason `summary`).
    Drop,
}

/// A gauge function for the metrics whose name matches.
#[derive(Debug)]
pub struct GaugeOverride {
    pub metrics: Matcher,
    pub gauge: GaugeFn,
}

/// Settings for the metrics whose name matches an `overrides` pattern, as configured.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    pub gauge: GaugeFn,
}

/// Compiles the `overrides` of a merging processor's config, reporting bad patterns.
pub fn compile_overrides(
    raw: &IndexMap<String, RawOverride>,
    issues: &mut Vec<crate::config::Issue>,
) -> Vec<GaugeOverride> {
    let mut overrides = Vec::new();
    for (pattern, settings) in raw {
        let path = format!("overrides.{pattern}");
        let patterns = [super::pattern::PatternText(pattern.clone())];
        if let Some(metrics) = Matcher::compile(&patterns, &path, issues) {
            overrides.push(GaugeOverride {
                metrics,
                gauge: settings.gauge,
            });
        }
    }
    overrides
}

/// Everything that decides how series merge.
#[derive(Debug)]
pub struct MergeSettings {
    pub temporality: Temporality,
    pub gauge: GaugeFn,
    /// First match wins.
    pub overrides: Vec<GaugeOverride>,
    /// Members unseen this long stop counting and are forgotten.
    pub stale_after: Duration,
    /// Bound on tracked input plus output series.
    pub max_series: usize,
    /// Also emit `<metric>.series_count`: members merged into each output in the interval.
    pub count_series: bool,
    pub summaries: SummaryPolicy,
}

impl MergeSettings {
    fn gauge_for(&self, metric: &str) -> GaugeFn {
        self.overrides
            .iter()
            .find(|o| o.metrics.is_match(metric))
            .map_or(self.gauge, |o| o.gauge)
    }
}

/// Maps an input series' attributes to its output series' attributes.
///
/// It must be a function of its arguments: a member's output series is decided when the
/// member is first seen, and kept. Attributes may be borrowed from the input or from the
/// projection itself (a replacement value such as `_other`); their order does not matter.
pub trait Projection {
    /// The output resource attributes of a resource.
    fn resource<'a>(&'a self, attributes: &'a [KeyValue], out: &mut Vec<&'a KeyValue>);
    /// The output attributes of a data point under `resource` (the input resource's).
    fn point<'a>(
        &'a self,
        resource: &'a [KeyValue],
        attributes: &'a [KeyValue],
        out: &mut Vec<&'a KeyValue>,
    );
}

/// Data points the engine did not merge, by reason; also exported as self-metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeCounts {
    pub unmerged_bucket_mismatch: u64,
    pub unmerged_summary: u64,
    pub unmerged_state_full: u64,
    pub dropped_summary: u64,
    /// NaN or infinite values, negative monotonic values, malformed histograms.
    pub dropped_invalid: u64,
    /// A cumulative point older than the one already merged for its member.
    pub dropped_out_of_order: u64,
    /// Input and output series forgotten because unseen for `stale_after`.
    pub evicted_stale: u64,
}

/// The self-metric handles of one engine, labelled with its pipeline and processor.
pub struct MergeTelemetry {
    unmerged_bucket_mismatch: metrics::Counter,
    unmerged_summary: metrics::Counter,
    unmerged_state_full: metrics::Counter,
    dropped_summary: metrics::Counter,
    dropped_invalid: metrics::Counter,
    dropped_out_of_order: metrics::Counter,
    evicted_stale: metrics::Counter,
    series: metrics::Gauge,
}

impl MergeTelemetry {
    pub fn new(pipeline: &str, processor: &str) -> Self {
        let (p, c) = (pipeline.to_string(), processor.to_string());
        let unmerged = |reason: &'static str| metrics::counter!(telemetry::PROCESSOR_UNMERGED, "pipeline" => p.clone(), "processor" => c.clone(), "reason" => reason);
        let dropped = |reason: &'static str| metrics::counter!(telemetry::PROCESSOR_DROPPED, "pipeline" => p.clone(), "processor" => c.clone(), "reason" => reason);
        Self {
            unmerged_bucket_mismatch: unmerged("bucket_mismatch"),
            unmerged_summary: unmerged("summary"),
            unmerged_state_full: unmerged("state_full"),
            dropped_summary: dropped("summary"),
            dropped_invalid: dropped("invalid"),
            dropped_out_of_order: dropped("out_of_order"),
            evicted_stale: metrics::counter!(telemetry::PROCESSOR_STATE_EVICTIONS, "pipeline" => p.clone(), "processor" => c.clone(), "reason" => "stale"),
            series: metrics::gauge!(telemetry::PROCESSOR_STATE_SERIES, "pipeline" => p, "processor" => c),
        }
    }

    /// Adds what changed since `before`: counters are bumped once per batch, not per point.
    fn publish(&self, before: &MergeCounts, now: &MergeCounts, series: usize) {
        let pairs = [
            (
                &self.unmerged_bucket_mismatch,
                before.unmerged_bucket_mismatch,
                now.unmerged_bucket_mismatch,
            ),
            (
                &self.unmerged_summary,
                before.unmerged_summary,
                now.unmerged_summary,
            ),
            (
                &self.unmerged_state_full,
                before.unmerged_state_full,
                now.unmerged_state_full,
            ),
            (
                &self.dropped_summary,
                before.dropped_summary,
                now.dropped_summary,
            ),
            (
                &self.dropped_invalid,
                before.dropped_invalid,
                now.dropped_invalid,
            ),
            (
                &self.dropped_out_of_order,
                before.dropped_out_of_order,
                now.dropped_out_of_order,
            ),
            (&self.evicted_stale, before.evicted_stale, now.evicted_stale),
        ];
        for (counter, before, now) in pairs {
            if now > before {
                counter.increment(now - before);
            }
        }
        self.series.set(series as f64);
    }
}

/// A 128-bit series identity: two independently seeded 64-bit hashes, so that no attribute
/// bytes are stored per input series while a collision stays out of reach (about n²/2¹²⁹).
type Fp = u128;

/// A fingerprint is already a uniform hash: maps keyed by one use its low half as is, instead
/// of hashing it again on each of the several lookups a point costs.
#[derive(Default)]
struct FpKeyHasher(u64);

impl Hasher for FpKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

type FpMap<V> = std::collections::HashMap<Fp, V, std::hash::BuildHasherDefault<FpKeyHasher>>;

/// The output of a member that was only ever tracked (see [`Aggregator::track`]).
const NO_OUTPUT: Fp = 0;

struct Fingerprinter {
    a: RandomState,
    b: RandomState,
}

struct FpHasher {
    a: AHasher,
    b: AHasher,
}

impl Hasher for FpHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.a.write(bytes);
        self.b.write(bytes);
    }

    fn finish(&self) -> u64 {
        self.a.finish()
    }
}

impl Fingerprinter {
    fn new() -> Self {
        Self {
            a: RandomState::new(),
            b: RandomState::new(),
        }
    }

    fn of(&self, feed: impl FnOnce(&mut FpHasher)) -> Fp {
        let mut h = FpHasher {
            a: self.a.build_hasher(),
            b: self.b.build_hasher(),
        };
        feed(&mut h);
        (u128::from(h.a.finish()) << 64) | u128::from(h.b.finish())
    }

    /// Order-insensitive: a sum of per-attribute fingerprints, so no sorting and no buffer.
    fn attributes<'a>(&self, attributes: impl IntoIterator<Item = &'a KeyValue>) -> Fp {
        let mut fp: Fp = 0;
        let mut n = 0u64;
        for kv in attributes {
            fp = fp.wrapping_add(self.of(|h| {
                kv.key.hash(h);
                hash_value(h, kv.value.as_ref());
            }));
            n += 1;
        }
        self.attributes_total(fp, n)
    }

    /// The fingerprint of `n` attributes whose own fingerprints add up to `sum`.
    fn attributes_total(&self, sum: Fp, n: u64) -> Fp {
        self.of(|h| {
            h.write_u128(sum);
            h.write_u64(n);
        })
    }

    fn scope(&self, name: &str, version: &str) -> Fp {
        self.of(|h| {
            name.hash(h);
            version.hash(h);
        })
    }

    fn metric(&self, name: &str, unit: &str, kind: Kind) -> Fp {
        self.of(|h| {
            name.hash(h);
            unit.hash(h);
            kind.hash(h);
        })
    }

    fn base(&self, resource: Fp, scope: Fp, metric: Fp) -> Fp {
        self.of(|h| {
            h.write_u128(resource);
            h.write_u128(scope);
            h.write_u128(metric);
        })
    }

    fn member(&self, base: Fp, attributes: Fp) -> Fp {
        self.of(|h| {
            h.write_u128(base);
            h.write_u128(attributes);
        })
    }
}

/// An attribute value that is not an array or a map, decoded or read off the wire: both
/// paths hash it through [`hash_scalar`], so a series has one fingerprint whichever way its
/// request came in.
#[derive(Debug, Clone, Copy)]
enum Scalar<'a> {
    Empty,
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    Strindex(i32),
}

fn hash_scalar(h: &mut FpHasher, value: Scalar<'_>) {
    match value {
        Scalar::Empty => h.write_u8(0),
        Scalar::Str(s) => {
            h.write_u8(1);
            s.hash(h);
        }
        Scalar::Bool(b) => {
            h.write_u8(2);
            b.hash(h);
        }
        Scalar::Int(i) => {
            h.write_u8(3);
            i.hash(h);
        }
        Scalar::Double(d) => {
            h.write_u8(4);
            d.to_bits().hash(h);
        }
        Scalar::Bytes(b) => {
            h.write_u8(7);
            b.hash(h);
        }
        Scalar::Strindex(i) => {
            h.write_u8(8);
            i.hash(h);
        }
    }
}

fn hash_value(h: &mut FpHasher, value: Option<&AnyValue>) {
    use any_value::Value as V;
    match value.and_then(|v| v.value.as_ref()) {
        None => hash_scalar(h, Scalar::Empty),
        Some(V::StringValue(s)) => hash_scalar(h, Scalar::Str(s)),
        Some(V::BoolValue(b)) => hash_scalar(h, Scalar::Bool(*b)),
        Some(V::IntValue(i)) => hash_scalar(h, Scalar::Int(*i)),
        Some(V::DoubleValue(d)) => hash_scalar(h, Scalar::Double(*d)),
        Some(V::ArrayValue(a)) => {
            h.write_u8(5);
            h.write_usize(a.values.len());
            for v in &a.values {
                hash_value(h, Some(v));
            }
        }
        Some(V::KvlistValue(l)) => {
            h.write_u8(6);
            h.write_usize(l.values.len());
            for kv in &l.values {
                kv.key.hash(h);
                hash_value(h, kv.value.as_ref());
            }
        }
        Some(V::BytesValue(b)) => hash_scalar(h, Scalar::Bytes(b)),
        Some(V::StringValueStrindex(i)) => hash_scalar(h, Scalar::Strindex(*i)),
    }
}

/// What an output series is: one OTLP type with the semantics its merge needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Gauge,
    /// Monotonic sum.
    Counter,
    /// Non-monotonic sum: the sum of the members' levels.
    UpDown,
    Histogram,
    ExpHistogram,
}

#[derive(Debug)]
struct Descriptor {
    name: String,
    description: String,
    unit: String,
    kind: Kind,
}

/// A number as OTLP carries it; ints stay ints as long as every merged input is one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i64),
    Double(f64),
}

impl Num {
    fn of(point: &NumberDataPoint) -> Option<Self> {
        match point.value? {
            number_data_point::Value::AsInt(i) => Some(Num::Int(i)),
            number_data_point::Value::AsDouble(d) => Some(Num::Double(d)),
        }
    }

    fn f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Double(d) => d,
        }
    }

    fn value(self) -> number_data_point::Value {
        match self {
            Num::Int(i) => number_data_point::Value::AsInt(i),
            Num::Double(d) => number_data_point::Value::AsDouble(d),
        }
    }
}

/// What the engine reads of a `NumberDataPoint` besides its attributes.
#[derive(Debug, Clone, Copy)]
struct NumberParts {
    flags: u32,
    value: Option<Num>,
    start: u64,
    time: u64,
}

impl NumberParts {
    /// The value to merge, or why there is none: a "no recorded value" point is merged as
    /// nothing; no value, a non-finite one or a negative counter is invalid.
    fn mergeable(&self, kind: Kind) -> Result<Num, Outcome> {
        if self.flags & NO_RECORDED_VALUE != 0 {
            return Err(Outcome::Merged);
        }
        let Some(value) = self.value.filter(|v| v.f64().is_finite()) else {
            return Err(Outcome::Dropped(Dropped::Invalid));
        };
        if kind == Kind::Counter && value.f64() < 0.0 {
            return Err(Outcome::Dropped(Dropped::Invalid));
        }
        Ok(value)
    }
}

/// An exact running sum: ints in an `i128`, doubles apart, so that integer totals do not
/// lose precision and an int sum stays an int.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Total {
    int: i128,
    double: f64,
    has_double: bool,
}

impl Total {
    fn add(&mut self, n: Num) {
        match n {
            Num::Int(i) => self.int = self.int.saturating_add(i128::from(i)),
            Num::Double(d) => {
                self.double += d;
                self.has_double = true;
            }
        }
    }

    /// Adds `new - old`.
    fn add_difference(&mut self, new: Num, old: Num) {
        match (new, old) {
            (Num::Int(n), Num::Int(o)) => {
                self.int = self.int.saturating_add(i128::from(n) - i128::from(o))
            }
            _ => self.add(Num::Double(new.f64() - old.f64())),
        }
    }

    fn value(&self) -> number_data_point::Value {
        if self.has_double {
            number_data_point::Value::AsDouble(self.double + self.int as f64)
        } else {
            let int = self.int.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
            // Clamped into range just above.
            number_data_point::Value::AsInt(i64::try_from(int).unwrap_or_default())
        }
    }
}

/// The explicit-bucket part of a histogram, as counts since some start.
#[derive(Debug, Clone, Default, PartialEq)]
struct HistData {
    count: u64,
    sum: f64,
    /// False once a merged point had no sum: the output then has none either.
    has_sum: bool,
    buckets: Vec<u64>,
    min: Option<f64>,
    max: Option<f64>,
}

impl HistData {
    fn of(point: &HistogramDataPoint) -> Self {
        Self {
            count: point.count,
            sum: point.sum.unwrap_or(0.0),
            has_sum: point.sum.is_some(),
            buckets: point.bucket_counts.clone(),
            min: point.min.filter(|m| !m.is_nan()),
            max: point.max.filter(|m| !m.is_nan()),
        }
    }

    fn empty(buckets: usize) -> Self {
        Self {
            has_sum: true,
            buckets: vec![0; buckets],
            ..Self::default()
        }
    }

    /// `self - earlier`, or `None` when a count went down (a reset). Min and max do not
    /// subtract: a difference has none.
    fn since(&self, earlier: &HistData) -> Option<HistData> {
        if self.buckets.len() != earlier.buckets.len() {
            return None;
        }
        let buckets = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(now, before)| now.checked_sub(*before))
            .collect::<Option<Vec<u64>>>()?;
        Some(HistData {
            count: self.count.checked_sub(earlier.count)?,
            sum: self.sum - earlier.sum,
            has_sum: self.has_sum && earlier.has_sum,
            buckets,
            min: None,
            max: None,
        })
    }

    fn merge(&mut self, other: &HistData) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (b, o) in self.buckets.iter_mut().zip(&other.buckets) {
            *b = b.saturating_add(*o);
        }
        let was_empty = self.count == 0;
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.has_sum &= other.has_sum;
        if other.count > 0 {
            self.min = merge_extreme(self.min, other.min, was_empty, f64::min);
            self.max = merge_extreme(self.max, other.max, was_empty, f64::max);
        }
    }
}

/// Min or max of the merge: known only if known for every part holding observations.
fn merge_extreme(
    mine: Option<f64>,
    theirs: Option<f64>,
    mine_empty: bool,
    pick: fn(f64, f64) -> f64,
) -> Option<f64> {
    match (mine, theirs) {
        _ if mine_empty => theirs,
        (Some(a), Some(b)) => Some(pick(a, b)),
        _ => None,
    }
}

/// Exponential-histogram buckets at some scale: `counts[i]` is bucket `offset + i`.
#[derive(Debug, Clone, Default, PartialEq)]
struct ExpBuckets {
    offset: i64,
    counts: Vec<u64>,
}

/// Most buckets one side of a merged exponential histogram may hold; more and the scale
/// goes down. Twice the SDKs' default of 160, and a bound on memory per series.
const MAX_EXP_BUCKETS: i64 = 320;

/// OTLP's valid scales.
const EXP_SCALES: std::ops::RangeInclusive<i32> = -10..=20;

impl ExpBuckets {
    fn of(buckets: Option<&Buckets>) -> Self {
        buckets.map_or_else(Self::default, |b| Self {
            offset: i64::from(b.offset),
            counts: b.bucket_counts.clone(),
        })
    }

    /// First and last bucket index holding anything, if any.
    fn range(&self) -> Option<(i64, i64)> {
        let first = self.counts.iter().position(|c| *c > 0)?;
        let last = self.counts.iter().rposition(|c| *c > 0)?;
        Some((self.offset + first as i64, self.offset + last as i64))
    }

    /// Lowers the scale by `shift`: bucket `i` becomes bucket `i >> shift`.
    fn downscale(&mut self, shift: u32) {
        if shift == 0 {
            return;
        }
        let Some((lo, hi)) = self.range() else {
            *self = Self::default();
            return;
        };
        let (new_lo, new_hi) = (lo >> shift, hi >> shift);
        let mut counts = vec![0u64; (new_hi - new_lo + 1) as usize];
        for (i, c) in self.counts.iter().enumerate() {
            if *c > 0 {
                let index = ((self.offset + i as i64) >> shift) - new_lo;
                if let Some(slot) = counts.get_mut(index as usize) {
                    *slot = slot.saturating_add(*c);
                }
            }
        }
        *self = Self {
            offset: new_lo,
            counts,
        };
    }

    /// Adds `other` (same scale), or subtracts it; `None` when a count would go negative.
    fn combine(&self, other: &ExpBuckets, subtract: bool) -> Option<ExpBuckets> {
        let (lo, hi) = match (self.range(), other.range()) {
            (None, None) => return Some(Self::default()),
            (Some(r), None) | (None, Some(r)) => r,
            (Some(a), Some(b)) => (a.0.min(b.0), a.1.max(b.1)),
        };
        let mut counts = vec![0u64; (hi - lo + 1) as usize];
        for (i, c) in self.counts.iter().enumerate() {
            if let Some(slot) = counts.get_mut((self.offset + i as i64 - lo) as usize) {
                *slot = *c;
            }
        }
        for (i, c) in other.counts.iter().enumerate() {
            let Some(slot) = counts.get_mut((other.offset + i as i64 - lo) as usize) else {
                continue;
            };
            *slot = if subtract {
                slot.checked_sub(*c)?
            } else {
                slot.saturating_add(*c)
            };
        }
        Some(Self { offset: lo, counts })
    }

    fn to_proto(&self) -> Option<Buckets> {
        let (lo, hi) = self.range()?;
        let start = (lo - self.offset) as usize;
        let end = (hi - self.offset) as usize;
        Some(Buckets {
            offset: i32::try_from(lo).ok()?,
            bucket_counts: self.counts.get(start..=end)?.to_vec(),
        })
    }
}

/// An exponential histogram as counts since some start.
#[derive(Debug, Clone, Default, PartialEq)]
struct ExpData {
    scale: i32,
    zero_count: u64,
    zero_threshold: f64,
    positive: ExpBuckets,
    negative: ExpBuckets,
    hist: HistData,
}

impl ExpData {
    fn of(point: &ExponentialHistogramDataPoint) -> Self {
        Self {
            scale: point.scale,
            zero_count: point.zero_count,
            zero_threshold: if point.zero_threshold.is_finite() {
                point.zero_threshold.max(0.0)
            } else {
                0.0
            },
            positive: ExpBuckets::of(point.positive.as_ref()),
            negative: ExpBuckets::of(point.negative.as_ref()),
            hist: HistData {
                count: point.count,
                sum: point.sum.unwrap_or(0.0),
                has_sum: point.sum.is_some(),
                buckets: Vec::new(),
                min: point.min.filter(|m| !m.is_nan()),
                max: point.max.filter(|m| !m.is_nan()),
            },
        }
    }

    /// The scale at which `self` and `other` fit together in [`MAX_EXP_BUCKETS`] per side.
    fn common_scale(&self, other: &ExpData) -> i32 {
        let mut scale = self.scale.min(other.scale);
        let fits = |scale: i32| {
            [
                (&self.positive, &other.positive),
                (&self.negative, &other.negative),
            ]
            .iter()
            .all(|(a, b)| {
                let ranges = [
                    a.range().map(|r| shift_range(r, self.scale - scale)),
                    b.range().map(|r| shift_range(r, other.scale - scale)),
                ];
                let lo = ranges.iter().flatten().map(|r| r.0).min();
                let hi = ranges.iter().flatten().map(|r| r.1).max();
                match (lo, hi) {
                    (Some(lo), Some(hi)) => hi - lo < MAX_EXP_BUCKETS,
                    _ => true,
                }
            })
        };
        // Any index range fits in two buckets 64 scales down; the bound keeps this finite.
        while !fits(scale) && scale > self.scale.min(other.scale) - 64 {
            scale -= 1;
        }
        scale
    }

    fn downscale_to(&mut self, scale: i32) {
        let shift = (self.scale - scale).clamp(0, 63) as u32;
        self.positive.downscale(shift);
        self.negative.downscale(shift);
        self.scale = scale;
    }

    /// `self - earlier`, or `None` on a reset.
    fn since(&self, earlier: &ExpData) -> Option<ExpData> {
        let scale = self.common_scale(earlier);
        let (mut now, mut before) = (self.clone(), earlier.clone());
        now.downscale_to(scale);
        before.downscale_to(scale);
        Some(ExpData {
            scale,
            zero_count: now.zero_count.checked_sub(before.zero_count)?,
            zero_threshold: now.zero_threshold,
            positive: now.positive.combine(&before.positive, true)?,
            negative: now.negative.combine(&before.negative, true)?,
            hist: now.hist.since(&before.hist)?,
        })
    }

    fn merge(&mut self, other: &ExpData) {
        let scale = self.common_scale(other);
        let mut other = other.clone();
        self.downscale_to(scale);
        other.downscale_to(scale);
        self.zero_count = self.zero_count.saturating_add(other.zero_count);
        self.zero_threshold = self.zero_threshold.max(other.zero_threshold);
        // Same scale, so adding cannot fail.
        self.positive = self
            .positive
            .combine(&other.positive, false)
            .unwrap_or_default();
        self.negative = self
            .negative
            .combine(&other.negative, false)
            .unwrap_or_default();
        self.hist.merge(&other.hist);
    }
}

fn shift_range((lo, hi): (i64, i64), shift: i32) -> (i64, i64) {
    let shift = shift.clamp(0, 63) as u32;
    (lo >> shift, hi >> shift)
}

/// What a member remembers between its points.
#[derive(Debug)]
enum MemberState {
    /// Delta inputs: nothing.
    Stateless,
    /// A cumulative counter: its last value, to turn the next one into a delta.
    Counter { start: u64, time: u64, last: Num },
    /// A gauge's latest value, or an up-down counter's level.
    Level { time: u64, value: Num },
    // Boxed: a member is looked up once per point among tens of thousands, and the
    // histogram states would make every member, counters included, four times larger.
    Histogram {
        start: u64,
        time: u64,
        last: Box<HistData>,
    },
    ExpHistogram {
        start: u64,
        time: u64,
        last: Box<ExpData>,
    },
}

#[derive(Debug)]
struct Member {
    output: Fp,
    /// Merged into its output; false while only tracked. A detached member still keeps its
    /// output alive, so that the output's cumulative total goes on.
    attached: bool,
    /// The interval (generation) it last reported in.
    seen_generation: u64,
    /// End of the last interval it reported in, for staleness.
    last_seen: u64,
    state: MemberState,
}

/// What an output series accumulates over an interval (delta output) or forever
/// (cumulative output). Gauges and levels are computed from the members when emitted.
#[derive(Debug)]
enum Accumulated {
    FromMembers,
    Counter(Total),
    // Boxed, as in `MemberState`: every output would otherwise be as large as a histogram's.
    Histogram {
        bounds: Vec<f64>,
        data: Box<HistData>,
    },
    ExpHistogram(Option<Box<ExpData>>),
}

#[derive(Debug)]
struct Output {
    resource: (Fp, Arc<[KeyValue]>),
    scope: (Fp, Arc<InstrumentationScope>),
    metric: (Fp, Arc<Descriptor>),
    attributes: Vec<KeyValue>,
    gauge: GaugeFn,
    /// Creation order, so that output is deterministic.
    seq: u64,
    /// Start time of the cumulative output: fixed once emitted.
    start: u64,
    emitted: bool,
    /// Latest start time of a cumulative member forgotten as stale.
    evicted_start: u64,
    members: usize,
    /// Distinct members merged in this interval.
    contributors: u64,
    touched: bool,
    accumulated: Accumulated,
}

/// Why a data point was not merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Merged,
    Unmerged(Unmerged),
    Dropped(Dropped),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unmerged {
    BucketMismatch,
    StateFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    Invalid,
    OutOfOrder,
}

/// OTLP's "no recorded value" flag: a staleness marker with no value to merge.
const NO_RECORDED_VALUE: u32 = 1;

/// What one call of [`Aggregator::add`] knows about the metric it adds.
struct AddContext<'a> {
    resource: &'a [KeyValue],
    projection: &'a dyn Projection,
    kind: Kind,
    cumulative_input: bool,
    /// Fingerprint of the input resource, scope and metric: a member adds its attributes.
    base: Fp,
    scope: (Fp, &'a InstrumentationScope),
    metric: (Fp, &'a str, &'a str, &'a str),
    /// The projected resource, computed when a first new member needs it.
    output_resource: Option<(Fp, Arc<[KeyValue]>)>,
    /// [`Aggregator::track`]: keep baselines, do not merge.
    track: bool,
}

/// Merges series over aligned intervals; see the module docs.
///
/// Contract:
/// - [`Aggregator::add`] merges every point it can of one metric and leaves in the metric
///   exactly the points the caller must pass on unmerged, in place (bucket mismatches,
///   passed summaries, points of new series beyond `max_series`). Invalid points and
///   dropped summaries are removed and counted.
/// - [`Aggregator::emit`] closes the interval at `time_unix_nano` and returns one point per
///   output series that has something to say, timestamped `time_unix_nano`, grouped by
///   output resource then scope. A time not after the current interval's start emits nothing,
///   so two instances sharing one engine over a reload cannot emit an interval twice.
/// - Monotonic sums and histograms are emitted with the configured temporality; their
///   cumulative output starts at a stable time and never decreases. Non-monotonic sums are
///   the sum of their live members' levels, always cumulative (as OTLP SDKs keep
///   up-down counters cumulative under a delta preference). Gauges merge the latest value of
///   each member that reported in the interval.
/// - State is bounded by `max_series` (members plus outputs) and by `stale_after`.
pub struct Aggregator {
    settings: Arc<MergeSettings>,
    telemetry: MergeTelemetry,
    counts: MergeCounts,
    fingerprints: Fingerprinter,
    members: FpMap<Member>,
    outputs: FpMap<Output>,
    resources: FpMap<Arc<[KeyValue]>>,
    scopes: FpMap<Arc<InstrumentationScope>>,
    descriptors: FpMap<Arc<Descriptor>>,
    interval_start: u64,
    /// When the engine was made: no output starts before.
    created: u64,
    generation: u64,
    next_seq: u64,
}

impl Aggregator {
    /// An empty engine whose first interval starts at `start_unix_nano`.
    pub fn new(
        settings: Arc<MergeSettings>,
        telemetry: MergeTelemetry,
        start_unix_nano: u64,
    ) -> Self {
        Self {
            settings,
            telemetry,
            counts: MergeCounts::default(),
            fingerprints: Fingerprinter::new(),
            members: FpMap::default(),
            outputs: FpMap::default(),
            resources: FpMap::default(),
            scopes: FpMap::default(),
            descriptors: FpMap::default(),
            interval_start: start_unix_nano,
            created: start_unix_nano,
            generation: 0,
            next_seq: 0,
        }
    }

    /// Input plus output series held right now.
    pub fn tracked_series(&self) -> usize {
        self.members.len() + self.outputs.len()
    }

    /// Start of the interval being accumulated (the last emit time).
    pub fn interval_start(&self) -> u64 {
        self.interval_start
    }

    /// Totals of what was not merged, since the engine was made.
    pub fn counts(&self) -> &MergeCounts {
        &self.counts
    }

    /// Merges the points of `metric`, received under `resource` and `scope`; what is left
    /// in `metric` afterwards must be passed on by the caller, unchanged, in place.
    pub fn add(
        &mut self,
        resource: &Resource,
        scope: &InstrumentationScope,
        metric: &mut Metric,
        projection: &dyn Projection,
    ) {
        let before = self.counts;
        self.add_metric(resource, scope, metric, projection);
        self.telemetry
            .publish(&before, &self.counts, self.tracked_series());
    }

    /// Follows the points of `metric` without merging them, for a caller that passes them on
    /// as they are (the entities `topk` keeps, the series `cardinality_limit` admits).
    ///
    /// A series may move between being merged and being passed on, and no increase may be
    /// lost or counted twice when it does. So its cumulative counters and histograms keep
    /// their baseline here: when it is merged again later, only what it counts from then on
    /// is added. And a series merged until now adds its increase up to this point (it
    /// happened while the series was merged; a backend reads no increase from the first
    /// point of the series it now sees), then stops counting: its level leaves the sums of
    /// gauges and up-down counters.
    pub fn track(
        &mut self,
        resource: &Resource,
        scope: &InstrumentationScope,
        metric: &Metric,
        projection: &dyn Projection,
    ) {
        let Some(data) = &metric.data else { return };
        let Some((kind, cumulative_input)) = kind_of(data) else {
            return;
        };
        let mut ctx = self.context(resource, scope, metric, kind, cumulative_input, projection);
        ctx.track = true;
        let before = self.counts;
        match data {
            Data::Gauge(Gauge { data_points }) | Data::Sum(Sum { data_points, .. }) => {
                for point in data_points {
                    self.add_number(&mut ctx, point);
                }
            }
            Data::Histogram(h) => {
                for point in &h.data_points {
                    self.add_histogram(&mut ctx, point);
                }
            }
            Data::ExponentialHistogram(h) => {
                for point in &h.data_points {
                    self.add_exp_histogram(&mut ctx, point);
                }
            }
            Data::Summary(_) => {}
        }
        // The points stay with the caller: nothing of theirs was dropped or left unmerged.
        self.counts = before;
        self.telemetry
            .publish(&before, &self.counts, self.tracked_series());
    }

    /// What `add` and `track` know about one metric.
    fn context<'a>(
        &self,
        resource: &'a Resource,
        scope: &'a InstrumentationScope,
        metric: &'a Metric,
        kind: Kind,
        cumulative_input: bool,
        projection: &'a dyn Projection,
    ) -> AddContext<'a> {
        let fps = &self.fingerprints;
        let resource_fp = fps.attributes(&resource.attributes);
        let scope_fp = fps.scope(&scope.name, &scope.version);
        let metric_fp = fps.metric(&metric.name, &metric.unit, kind);
        let base = fps.base(resource_fp, scope_fp, metric_fp);
        AddContext {
            resource: &resource.attributes,
            projection,
            kind,
            cumulative_input,
            base,
            scope: (scope_fp, scope),
            metric: (metric_fp, &metric.name, &metric.description, &metric.unit),
            output_resource: None,
            track: false,
        }
    }

    /// Whether member `fp` exists and is merged into its output.
    fn is_attached(&self, fp: Fp) -> bool {
        self.members.get(&fp).is_some_and(|m| m.attached)
    }

    /// Records the baseline of a member that is only tracked, making it if need be.
    fn set_baseline(&mut self, fp: Fp, state: MemberState) {
        let generation = self.generation;
        let room = self.tracked_series() < self.settings.max_series;
        match self.members.get_mut(&fp) {
            Some(member) => {
                member.seen_generation = generation;
                member.state = state;
            }
            None if room => {
                self.members.insert(
                    fp,
                    Member {
                        output: NO_OUTPUT,
                        attached: false,
                        seen_generation: generation,
                        last_seen: self.interval_start,
                        state,
                    },
                );
            }
            None => {}
        }
    }

    /// Stops a member from counting in its output; it keeps its baseline.
    fn detach(&mut self, fp: Fp) {
        let Some(member) = self.members.get_mut(&fp) else {
            return;
        };
        member.attached = false;
        if matches!(member.state, MemberState::Level { .. }) {
            member.state = MemberState::Stateless;
        }
    }

    fn add_metric(
        &mut self,
        resource: &Resource,
        scope: &InstrumentationScope,
        metric: &mut Metric,
        projection: &dyn Projection,
    ) {
        let Some(data) = metric.data.as_mut() else {
            return;
        };
        let Some((kind, cumulative_input)) = kind_of(data) else {
            if let Data::Summary(s) = data {
                let n = s.data_points.len() as u64;
                match self.settings.summaries {
                    SummaryPolicy::Pass => self.counts.unmerged_summary += n,
                    SummaryPolicy::Drop => {
                        self.counts.dropped_summary += n;
                        s.data_points.clear();
                    }
                }
            }
            return;
        };
        // The points are taken out while the context borrows the metric's descriptor.
        let mut data = metric.data.take();
        let mut ctx = self.context(resource, scope, metric, kind, cumulative_input, projection);
        if let Some(data) = data.as_mut() {
            self.merge_points(&mut ctx, data);
        }
        metric.data = data;
    }

    fn merge_points(&mut self, ctx: &mut AddContext<'_>, data: &mut Data) {
        match data {
            Data::Gauge(Gauge { data_points }) | Data::Sum(Sum { data_points, .. }) => data_points
                .retain(|p| {
                    let outcome = self.add_number(ctx, p);
                    self.count(outcome)
                }),
            Data::Histogram(h) => h.data_points.retain(|p| {
                let outcome = self.add_histogram(ctx, p);
                self.count(outcome)
            }),
            Data::ExponentialHistogram(h) => h.data_points.retain(|p| {
                let outcome = self.add_exp_histogram(ctx, p);
                self.count(outcome)
            }),
            Data::Summary(_) => {}
        }
    }

    /// Counts an outcome; true when the point stays with the caller.
    fn count(&mut self, outcome: Outcome) -> bool {
        let c = &mut self.counts;
        match outcome {
            Outcome::Merged => return false,
            Outcome::Unmerged(Unmerged::BucketMismatch) => c.unmerged_bucket_mismatch += 1,
            Outcome::Unmerged(Unmerged::StateFull) => c.unmerged_state_full += 1,
            Outcome::Dropped(Dropped::Invalid) => c.dropped_invalid += 1,
            Outcome::Dropped(Dropped::OutOfOrder) => c.dropped_out_of_order += 1,
        }
        matches!(outcome, Outcome::Unmerged(_))
    }

    fn member_fp(&self, ctx: &AddContext<'_>, attributes: &[KeyValue]) -> Fp {
        let attributes = self.fingerprints.attributes(attributes);
        self.fingerprints.member(ctx.base, attributes)
    }

    /// The member `fp`, made on its first point: its output series is found or made, if
    /// `compatible` with it, within `max_series`. Returns whether the member is new.
    fn admit(
        &mut self,
        ctx: &mut AddContext<'_>,
        fp: Fp,
        attributes: &[KeyValue],
        start: u64,
        compatible: impl FnOnce(&Accumulated) -> bool,
        accumulated: impl FnOnce() -> Accumulated,
    ) -> Result<bool, Outcome> {
        let tracked = self.members.get(&fp).map(|m| (m.attached, m.output));
        if let Some((false, output)) = tracked {
            if self.outputs.contains_key(&output) {
                // Detached earlier: merged again into the output it still keeps alive.
                if let Some(member) = self.members.get_mut(&fp) {
                    member.attached = true;
                }
                return Ok(false);
            }
        }
        if let Some(member) = self.members.get(&fp).filter(|m| m.attached) {
            return match self.outputs.get(&member.output) {
                Some(output) if compatible(&output.accumulated) => Ok(false),
                Some(_) => Err(Outcome::Unmerged(Unmerged::BucketMismatch)),
                // Outputs outlive their members; a miss is a broken invariant, but the
                // point is still not lost.
                None => Err(Outcome::Unmerged(Unmerged::StateFull)),
            };
        }
        let (projection, input_resource) = (ctx.projection, ctx.resource);
        let (resource_fp, resource) = match &ctx.output_resource {
            Some(r) => r.clone(),
            None => {
                let mut projected = Vec::new();
                projection.resource(input_resource, &mut projected);
                let fp = self.fingerprints.attributes(projected.iter().copied());
                let resource = self
                    .resources
                    .entry(fp)
                    .or_insert_with(|| projected.into_iter().cloned().collect())
                    .clone();
                ctx.output_resource = Some((fp, resource.clone()));
                (fp, resource)
            }
        };
        let mut projected = Vec::new();
        projection.point(input_resource, attributes, &mut projected);
        let attributes_fp = self.fingerprints.attributes(projected.iter().copied());
        let output_fp = self.fingerprints.of(|h| {
            h.write_u128(resource_fp);
            h.write_u128(ctx.scope.0);
            h.write_u128(ctx.metric.0);
            h.write_u128(attributes_fp);
        });
        let output_exists = match self.outputs.get(&output_fp) {
            Some(output) if !compatible(&output.accumulated) => {
                return Err(Outcome::Unmerged(Unmerged::BucketMismatch))
            }
            Some(_) => true,
            None => false,
        };
        let needed = usize::from(tracked.is_none()) + usize::from(!output_exists);
        if self.tracked_series() + needed > self.settings.max_series {
            return Err(Outcome::Unmerged(Unmerged::StateFull));
        }
        if !output_exists {
            let (scope_fp, scope) = ctx.scope;
            let scope = self
                .scopes
                .entry(scope_fp)
                .or_insert_with(|| {
                    Arc::new(InstrumentationScope {
                        name: scope.name.clone(),
                        version: scope.version.clone(),
                        ..Default::default()
                    })
                })
                .clone();
            let (metric_fp, name, description, unit) = ctx.metric;
            let kind = ctx.kind;
            let metric = self
                .descriptors
                .entry(metric_fp)
                .or_insert_with(|| {
                    Arc::new(Descriptor {
                        name: name.to_string(),
                        description: description.to_string(),
                        unit: unit.to_string(),
                        kind,
                    })
                })
                .clone();
            let output = Output {
                resource: (resource_fp, resource),
                scope: (scope_fp, scope),
                metric: (metric_fp, metric),
                attributes: projected.into_iter().cloned().collect(),
                gauge: self.settings.gauge_for(name),
                seq: self.next_seq,
                // Unknown start: the output begins with this interval.
                start: if start == 0 {
                    self.interval_start
                } else {
                    start
                },
                emitted: false,
                evicted_start: 0,
                members: 0,
                contributors: 0,
                touched: false,
                accumulated: accumulated(),
            };
            self.next_seq += 1;
            self.outputs.insert(output_fp, output);
        }
        if let Some(output) = self.outputs.get_mut(&output_fp) {
            output.members += 1;
        }
        if tracked.is_some() {
            // A tracked member merged for the first time: its baseline makes its next delta.
            if let Some(member) = self.members.get_mut(&fp) {
                member.output = output_fp;
                member.attached = true;
            }
            return Ok(false);
        }
        self.members.insert(
            fp,
            Member {
                output: output_fp,
                attached: true,
                seen_generation: u64::MAX,
                last_seen: self.interval_start,
                state: MemberState::Stateless,
            },
        );
        Ok(true)
    }

    /// The member and its output, marking both as seen in this interval.
    fn member_and_output(&mut self, fp: Fp) -> Option<(&mut Member, &mut Output)> {
        let member = self.members.get_mut(&fp)?;
        let output = self.outputs.get_mut(&member.output)?;
        if member.seen_generation != self.generation {
            member.seen_generation = self.generation;
            output.contributors += 1;
        }
        output.touched = true;
        Some((member, output))
    }

    fn add_number(&mut self, ctx: &mut AddContext<'_>, point: &NumberDataPoint) -> Outcome {
        let parts = NumberParts {
            flags: point.flags,
            value: Num::of(point),
            start: point.start_time_unix_nano,
            time: point.time_unix_nano,
        };
        let value = match parts.mergeable(ctx.kind) {
            Ok(value) => value,
            Err(outcome) => return outcome,
        };
        let fp = self.member_fp(ctx, &point.attributes);
        self.merge_number(ctx, parts, value, fp, &point.attributes)
    }

    /// Merges one valid number point of member `fp`; `attributes` (the point's, decoded) are
    /// read only when the member is new or lost its output.
    fn merge_number(
        &mut self,
        ctx: &mut AddContext<'_>,
        parts: NumberParts,
        value: Num,
        fp: Fp,
        attributes: &[KeyValue],
    ) -> Outcome {
        let start = parts.start;
        if ctx.track && !self.is_attached(fp) {
            if ctx.kind == Kind::Counter && ctx.cumulative_input {
                let time = parts.time;
                let state = MemberState::Counter {
                    start,
                    time,
                    last: value,
                };
                self.set_baseline(fp, state);
            }
            return Outcome::Merged;
        }
        let accumulated = match ctx.kind {
            Kind::Counter => || Accumulated::Counter(Total::default()),
            _ => || Accumulated::FromMembers,
        };
        // Nearly every point is of a member already merged into a live output: admitting it
        // would change nothing (any output takes a number), so its lookups are skipped.
        let merged_already = !ctx.track
            && self
                .members
                .get(&fp)
                .is_some_and(|m| m.attached && self.outputs.contains_key(&m.output));
        let is_new = if merged_already {
            false
        } else {
            match self.admit(ctx, fp, attributes, start, |_| true, accumulated) {
                Ok(is_new) => is_new,
                Err(outcome) => return outcome,
            }
        };
        let (kind, cumulative_input) = (ctx.kind, ctx.cumulative_input);
        let time = parts.time;
        let Some((member, output)) = self.member_and_output(fp) else {
            return Outcome::Unmerged(Unmerged::StateFull);
        };
        let first_counts_in_full = kind == Kind::Counter
            && cumulative_input
            && matches!(member.state, MemberState::Stateless)
            && counts_in_full(is_new, start, output);
        match (
            kind,
            cumulative_input,
            &mut member.state,
            &mut output.accumulated,
        ) {
            (Kind::Counter, false, _, Accumulated::Counter(total)) => total.add(value),
            (Kind::Counter, true, MemberState::Stateless, Accumulated::Counter(total)) => {
                if first_counts_in_full {
                    total.add(value);
                }
                member.state = MemberState::Counter {
                    start,
                    time,
                    last: value,
                };
            }
            (
                Kind::Counter,
                true,
                MemberState::Counter {
                    start: last_start,
                    time: last_time,
                    last,
                },
                Accumulated::Counter(total),
            ) => {
                let restarted = start != 0 && *last_start != 0 && start != *last_start;
                if !restarted && time != 0 && time < *last_time {
                    return Outcome::Dropped(Dropped::OutOfOrder);
                }
                if restarted || value.f64() < last.f64() {
                    total.add(value);
                } else {
                    total.add_difference(value, *last);
                }
                if start != 0 {
                    *last_start = start;
                }
                *last_time = time;
                *last = value;
            }
            (Kind::UpDown, false, MemberState::Level { value: level, .. }, _) => {
                let mut sum = Total::default();
                sum.add(*level);
                sum.add(value);
                *level = match sum.value() {
                    number_data_point::Value::AsInt(i) => Num::Int(i),
                    number_data_point::Value::AsDouble(d) => Num::Double(d),
                };
            }
            (_, _, MemberState::Level { time: t, value: v }, _) => {
                if time >= *t {
                    (*t, *v) = (time, value);
                }
            }
            (_, _, state @ MemberState::Stateless, _) => {
                *state = MemberState::Level { time, value }
            }
            _ => return Outcome::Unmerged(Unmerged::StateFull),
        }
        if ctx.track {
            self.detach(fp);
        }
        Outcome::Merged
    }

    fn add_histogram(&mut self, ctx: &mut AddContext<'_>, point: &HistogramDataPoint) -> Outcome {
        let buckets = point.bucket_counts.len();
        let valid_shape = buckets == point.explicit_bounds.len() + 1
            || (buckets == 0 && point.explicit_bounds.is_empty());
        if point.flags & NO_RECORDED_VALUE != 0 {
            return Outcome::Merged;
        }
        if !valid_shape || point.sum.is_some_and(|s| !s.is_finite()) {
            return Outcome::Dropped(Dropped::Invalid);
        }
        let fp = self.member_fp(ctx, &point.attributes);
        let start = point.start_time_unix_nano;
        if ctx.track && !self.is_attached(fp) {
            if ctx.cumulative_input {
                let state = MemberState::Histogram {
                    start,
                    time: point.time_unix_nano,
                    last: Box::new(HistData::of(point)),
                };
                self.set_baseline(fp, state);
            }
            return Outcome::Merged;
        }
        let compatible = |a: &Accumulated| matches!(a, Accumulated::Histogram { bounds, .. } if *bounds == point.explicit_bounds);
        let accumulated = || Accumulated::Histogram {
            bounds: point.explicit_bounds.clone(),
            data: Box::new(HistData::empty(buckets)),
        };
        let is_new = match self.admit(ctx, fp, &point.attributes, start, compatible, accumulated) {
            Ok(is_new) => is_new,
            Err(outcome) => return outcome,
        };
        let cumulative_input = ctx.cumulative_input;
        let time = point.time_unix_nano;
        let Some((member, output)) = self.member_and_output(fp) else {
            return Outcome::Unmerged(Unmerged::StateFull);
        };
        let current = HistData::of(point);
        let increase = if !cumulative_input {
            Some(current)
        } else {
            let increase = match &member.state {
                MemberState::Histogram {
                    start: last_start,
                    time: last_time,
                    last,
                } => {
                    let restarted = start != 0 && *last_start != 0 && start != *last_start;
                    if !restarted && time != 0 && time < *last_time {
                        return Outcome::Dropped(Dropped::OutOfOrder);
                    }
                    let since = (!restarted).then(|| current.since(last)).flatten();
                    Some(since.unwrap_or_else(|| without_extremes(&current)))
                }
                _ => counts_in_full(is_new, start, output).then(|| without_extremes(&current)),
            };
            let kept_start = match &member.state {
                MemberState::Histogram { start: s, .. } if start == 0 => *s,
                _ => start,
            };
            member.state = MemberState::Histogram {
                start: kept_start,
                time,
                last: Box::new(current),
            };
            increase
        };
        if let (Some(increase), Accumulated::Histogram { data, .. }) =
            (increase, &mut output.accumulated)
        {
            data.merge(&increase);
        }
        if ctx.track {
            self.detach(fp);
        }
        Outcome::Merged
    }

    fn add_exp_histogram(
        &mut self,
        ctx: &mut AddContext<'_>,
        point: &ExponentialHistogramDataPoint,
    ) -> Outcome {
        if point.flags & NO_RECORDED_VALUE != 0 {
            return Outcome::Merged;
        }
        if !EXP_SCALES.contains(&point.scale) || point.sum.is_some_and(|s| !s.is_finite()) {
            return Outcome::Dropped(Dropped::Invalid);
        }
        let fp = self.member_fp(ctx, &point.attributes);
        let start = point.start_time_unix_nano;
        if ctx.track && !self.is_attached(fp) {
            if ctx.cumulative_input {
                let mut last = ExpData::of(point);
                let scale = last.common_scale(&last);
                last.downscale_to(scale);
                let state = MemberState::ExpHistogram {
                    start,
                    time: point.time_unix_nano,
                    last: Box::new(last),
                };
                self.set_baseline(fp, state);
            }
            return Outcome::Merged;
        }
        let is_new = match self.admit(
            ctx,
            fp,
            &point.attributes,
            start,
            |_| true,
            || Accumulated::ExpHistogram(None),
        ) {
            Ok(is_new) => is_new,
            Err(outcome) => return outcome,
        };
        let cumulative_input = ctx.cumulative_input;
        let time = point.time_unix_nano;
        let Some((member, output)) = self.member_and_output(fp) else {
            return Outcome::Unmerged(Unmerged::StateFull);
        };
        let mut current = ExpData::of(point);
        // Bound what one member keeps, whatever span its buckets claim.
        let scale = current.common_scale(&current);
        current.downscale_to(scale);
        let increase = if !cumulative_input {
            Some(current)
        } else {
            let increase = match &member.state {
                MemberState::ExpHistogram {
                    start: last_start,
                    time: last_time,
                    last,
                } => {
                    let restarted = start != 0 && *last_start != 0 && start != *last_start;
                    if !restarted && time != 0 && time < *last_time {
                        return Outcome::Dropped(Dropped::OutOfOrder);
                    }
                    let since = (!restarted).then(|| current.since(last)).flatten();
                    Some(since.unwrap_or_else(|| exp_without_extremes(&current)))
                }
                _ => counts_in_full(is_new, start, output).then(|| exp_without_extremes(&current)),
            };
            let kept_start = match &member.state {
                MemberState::ExpHistogram { start: s, .. } if start == 0 => *s,
                _ => start,
            };
            member.state = MemberState::ExpHistogram {
                start: kept_start,
                time,
                last: Box::new(current),
            };
            increase
        };
        if let (Some(increase), Accumulated::ExpHistogram(data)) =
            (increase, &mut output.accumulated)
        {
            match data {
                Some(data) => data.merge(&increase),
                None => *data = Some(Box::new(increase)),
            }
        }
        if ctx.track {
            self.detach(fp);
        }
        Outcome::Merged
    }

    /// Closes the interval now (on flush, between boundaries): at the wall clock, or just
    /// after the interval's start if the clock is behind it.
    pub fn emit_now(&mut self) -> Vec<ResourceMetrics> {
        let now = super::window::now_unix_nanos();
        self.emit(now.max(self.interval_start.saturating_add(1)))
    }

    /// Closes the interval at `time_unix_nano`: forgets stale series and returns one point
    /// per output series with something to report, grouped by output resource and scope.
    pub fn emit(&mut self, time_unix_nano: u64) -> Vec<ResourceMetrics> {
        let time = time_unix_nano;
        if time <= self.interval_start {
            return Vec::new();
        }
        let before = self.counts;
        let stale_after = u64::try_from(self.settings.stale_after.as_nanos()).unwrap_or(u64::MAX);
        let generation = self.generation;

        // Gauges and levels come from the members; stale members go first, so that they no
        // longer count.
        let mut from_members: FpMap<MemberValues> = FpMap::default();
        let outputs = &mut self.outputs;
        let mut evicted = 0;
        self.members.retain(|_, member| {
            let seen_now = member.seen_generation == generation;
            if seen_now {
                member.last_seen = time;
            } else if time.saturating_sub(member.last_seen) >= stale_after {
                if let Some(output) = outputs.get_mut(&member.output) {
                    output.members = output.members.saturating_sub(1);
                    if let MemberState::Counter { start, .. }
                    | MemberState::Histogram { start, .. }
                    | MemberState::ExpHistogram { start, .. } = member.state
                    {
                        output.evicted_start = output.evicted_start.max(start);
                    }
                }
                evicted += 1;
                return false;
            }
            if let MemberState::Level { time: t, value } = member.state {
                let is_level = outputs
                    .get(&member.output)
                    .is_some_and(|o| o.metric.1.kind == Kind::UpDown);
                if seen_now || is_level {
                    from_members.entry(member.output).or_default().add(t, value);
                }
            }
            true
        });

        let temporality = self.settings.temporality;
        let mut emitted: Vec<(&Output, Data)> = Vec::new();
        let interval_start = self.interval_start;
        for (fp, output) in self.outputs.iter_mut() {
            if !output.emitted {
                // A fresh engine (a new processor, or a changed config) begins new series:
                // a start before it would claim continuity with whatever was emitted before.
                output.start = output.start.max(self.created).min(time);
            }
            let start = match temporality {
                Temporality::Cumulative => output.start,
                Temporality::Delta => interval_start,
            };
            let live = output.members > 0;
            let emit_accumulated = match temporality {
                Temporality::Cumulative => live || output.touched,
                Temporality::Delta => output.touched,
            };
            let number = |value| NumberDataPoint {
                attributes: output.attributes.clone(),
                start_time_unix_nano: start,
                time_unix_nano: time,
                value: Some(value),
                ..Default::default()
            };
            let data = match (&mut output.accumulated, output.metric.1.kind) {
                (Accumulated::FromMembers, kind) => {
                    from_members.get(fp).and_then(|values| match kind {
                        Kind::UpDown => Some(Data::Sum(Sum {
                            data_points: vec![NumberDataPoint {
                                start_time_unix_nano: output.start,
                                ..number(values.total.value())
                            }],
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: false,
                        })),
                        _ => values.gauge(output.gauge).map(|value| {
                            Data::Gauge(Gauge {
                                data_points: vec![NumberDataPoint {
                                    start_time_unix_nano: 0,
                                    ..number(value)
                                }],
                            })
                        }),
                    })
                }
                (Accumulated::Counter(total), _) => emit_accumulated.then(|| {
                    let point = number(total.value());
                    if temporality == Temporality::Delta {
                        *total = Total::default();
                    }
                    Data::Sum(Sum {
                        data_points: vec![point],
                        aggregation_temporality: temporality_value(temporality),
                        is_monotonic: true,
                    })
                }),
                (Accumulated::Histogram { bounds, data }, _) => emit_accumulated.then(|| {
                    let point = HistogramDataPoint {
                        attributes: output.attributes.clone(),
                        start_time_unix_nano: start,
                        time_unix_nano: time,
                        count: data.count,
                        sum: data.has_sum.then_some(data.sum),
                        bucket_counts: data.buckets.clone(),
                        explicit_bounds: bounds.clone(),
                        min: data.min.filter(|_| data.count > 0),
                        max: data.max.filter(|_| data.count > 0),
                        ..Default::default()
                    };
                    if temporality == Temporality::Delta {
                        **data = HistData::empty(data.buckets.len());
                    }
                    Data::Histogram(Histogram {
                        data_points: vec![point],
                        aggregation_temporality: temporality_value(temporality),
                    })
                }),
                (Accumulated::ExpHistogram(data), _) => emit_accumulated.then(|| {
                    let empty = ExpData {
                        hist: HistData::empty(0),
                        ..ExpData::default()
                    };
                    let d = data.as_deref().unwrap_or(&empty);
                    let point = ExponentialHistogramDataPoint {
                        attributes: output.attributes.clone(),
                        start_time_unix_nano: start,
                        time_unix_nano: time,
                        count: d.hist.count,
                        sum: d.hist.has_sum.then_some(d.hist.sum),
                        scale: d.scale,
                        zero_count: d.zero_count,
                        positive: d.positive.to_proto(),
                        negative: d.negative.to_proto(),
                        min: d.hist.min.filter(|_| d.hist.count > 0),
                        max: d.hist.max.filter(|_| d.hist.count > 0),
                        zero_threshold: d.zero_threshold,
                        ..Default::default()
                    };
                    if temporality == Temporality::Delta {
                        *data = None;
                    }
                    Data::ExponentialHistogram(ExponentialHistogram {
                        data_points: vec![point],
                        aggregation_temporality: temporality_value(temporality),
                    })
                }),
            };
            if let Some(data) = data {
                output.emitted = true;
                emitted.push((output, data));
            }
        }
        let resource_metrics = group(emitted, self.settings.count_series);

        for output in self.outputs.values_mut() {
            output.touched = false;
            output.contributors = 0;
        }
        // An output goes with its last member, after its last interval was emitted.
        let before_outputs = self.outputs.len();
        self.outputs.retain(|_, output| output.members > 0);
        evicted += before_outputs - self.outputs.len();
        self.resources.retain(|_, r| Arc::strong_count(r) > 1);
        self.scopes.retain(|_, s| Arc::strong_count(s) > 1);
        self.descriptors.retain(|_, d| Arc::strong_count(d) > 1);

        self.counts.evicted_stale += evicted as u64;
        self.generation = self.generation.wrapping_add(1);
        self.interval_start = time;
        self.telemetry
            .publish(&before, &self.counts, self.tracked_series());
        resource_metrics
    }
}

/// Hands what an engine emitted on as one request, if it emitted anything.
pub fn push_emitted(resource_metrics: Vec<ResourceMetrics>, out: &mut Vec<crate::otlp::Payload>) {
    if !resource_metrics.is_empty() {
        out.push(crate::otlp::Payload::Decoded(
            crate::otlp::ExportMetricsServiceRequest { resource_metrics },
        ));
    }
}

/// The kind of a metric's data and whether it is cumulative; `None` for summaries.
fn kind_of(data: &Data) -> Option<(Kind, bool)> {
    let cumulative = |t: i32| t != AggregationTemporality::Delta as i32;
    Some(match data {
        Data::Gauge(_) => (Kind::Gauge, false),
        Data::Sum(s) if s.is_monotonic => (Kind::Counter, cumulative(s.aggregation_temporality)),
        Data::Sum(s) => (Kind::UpDown, cumulative(s.aggregation_temporality)),
        Data::Histogram(h) => (Kind::Histogram, cumulative(h.aggregation_temporality)),
        Data::ExponentialHistogram(h) => {
            (Kind::ExpHistogram, cumulative(h.aggregation_temporality))
        }
        Data::Summary(_) => return None,
    })
}

/// Whether a new member's first cumulative value counts in full rather than as a baseline:
/// when its output has not been emitted yet (everything counted so far is in it), or when
/// the member began after the output did (all it counted happened since) and after every
/// member the output forgot (a member silent past `stale_after` that comes back is not
/// counted twice). Otherwise its earlier increase predates what the output covers, and
/// counting it would make a jump.
fn counts_in_full(is_new: bool, start: u64, output: &mut Output) -> bool {
    if !is_new {
        return false;
    }
    if !output.emitted {
        if start != 0 && start < output.start {
            output.start = start;
        }
        return true;
    }
    start != 0 && start >= output.start && start > output.evicted_start
}

fn without_extremes(data: &HistData) -> HistData {
    HistData {
        min: None,
        max: None,
        ..data.clone()
    }
}

fn exp_without_extremes(data: &ExpData) -> ExpData {
    ExpData {
        hist: without_extremes(&data.hist),
        ..data.clone()
    }
}

fn temporality_value(temporality: Temporality) -> i32 {
    match temporality {
        Temporality::Cumulative => AggregationTemporality::Cumulative as i32,
        Temporality::Delta => AggregationTemporality::Delta as i32,
    }
}

/// The latest values of the members of one output, folded for every gauge function.
#[derive(Debug, Default)]
struct MemberValues {
    total: Total,
    n: u64,
    min: Option<Num>,
    max: Option<Num>,
    last: Option<(u64, Num)>,
}

impl MemberValues {
    fn add(&mut self, time: u64, value: Num) {
        self.total.add(value);
        self.n += 1;
        if self.min.is_none_or(|m| value.f64() < m.f64()) {
            self.min = Some(value);
        }
        if self.max.is_none_or(|m| value.f64() > m.f64()) {
            self.max = Some(value);
        }
        if self.last.is_none_or(|(t, _)| time >= t) {
            self.last = Some((time, value));
        }
    }

    fn gauge(&self, gauge: GaugeFn) -> Option<number_data_point::Value> {
        if self.n == 0 {
            return None;
        }
        // Mixed ints and doubles give a double.
        let typed = |n: Num| match n {
            Num::Int(_) if self.total.has_double => Num::Double(n.f64()).value(),
            n => n.value(),
        };
        Some(match gauge {
            GaugeFn::Sum => self.total.value(),
            GaugeFn::Avg => {
                let sum = match self.total.value() {
                    number_data_point::Value::AsInt(i) => i as f64,
                    number_data_point::Value::AsDouble(d) => d,
                };
                number_data_point::Value::AsDouble(sum / self.n as f64)
            }
            GaugeFn::Min => typed(self.min?),
            GaugeFn::Max => typed(self.max?),
            GaugeFn::Last => typed(self.last?.1),
            GaugeFn::Count => {
                number_data_point::Value::AsInt(i64::try_from(self.n).unwrap_or(i64::MAX))
            }
        })
    }
}

/// Groups emitted points into resources, scopes and metrics, in creation order.
fn group(mut emitted: Vec<(&Output, Data)>, count_series: bool) -> Vec<ResourceMetrics> {
    emitted.sort_by_key(|(output, _)| output.seq);
    type Metrics = IndexMap<(Fp, bool), Metric>;
    type Scopes = IndexMap<Fp, (Arc<InstrumentationScope>, Metrics)>;
    let mut resources: IndexMap<Fp, (Arc<[KeyValue]>, Scopes)> = IndexMap::new();
    for (output, data) in emitted {
        let (_, scopes) = resources
            .entry(output.resource.0)
            .or_insert_with(|| (output.resource.1.clone(), IndexMap::new()));
        let (_, metrics) = scopes
            .entry(output.scope.0)
            .or_insert_with(|| (output.scope.1.clone(), IndexMap::new()));
        let descriptor = &output.metric.1;
        let time = data_time(&data);
        let metric = metrics
            .entry((output.metric.0, false))
            .or_insert_with(|| Metric {
                name: descriptor.name.clone(),
                description: descriptor.description.clone(),
                unit: descriptor.unit.clone(),
                metadata: Vec::new(),
                data: None,
            });
        append(&mut metric.data, data);
        if count_series {
            let count = metrics
                .entry((output.metric.0, true))
                .or_insert_with(|| Metric {
                    name: format!("{}.series_count", descriptor.name),
                    description: "Input series merged into this series in the interval."
                        .to_string(),
                    unit: "{series}".to_string(),
                    metadata: Vec::new(),
                    data: None,
                });
            append(
                &mut count.data,
                Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        attributes: output.attributes.clone(),
                        time_unix_nano: time,
                        value: Some(number_data_point::Value::AsInt(
                            i64::try_from(output.contributors).unwrap_or(i64::MAX),
                        )),
                        ..Default::default()
                    }],
                }),
            );
        }
    }
    resources
        .into_values()
        .map(|(resource, scopes)| ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.to_vec(),
                ..Default::default()
            }),
            scope_metrics: scopes
                .into_values()
                .map(|(scope, metrics)| ScopeMetrics {
                    scope: Some((*scope).clone()),
                    metrics: metrics.into_values().collect(),
                    schema_url: String::new(),
                })
                .collect(),
            schema_url: String::new(),
        })
        .collect()
}

fn data_time(data: &Data) -> u64 {
    match data {
        Data::Gauge(g) => g.data_points.first().map_or(0, |p| p.time_unix_nano),
        Data::Sum(s) => s.data_points.first().map_or(0, |p| p.time_unix_nano),
        Data::Histogram(h) => h.data_points.first().map_or(0, |p| p.time_unix_nano),
        Data::ExponentialHistogram(h) => h.data_points.first().map_or(0, |p| p.time_unix_nano),
        Data::Summary(s) => s.data_points.first().map_or(0, |p| p.time_unix_nano),
    }
}

/// Appends the points of `more` to `data`, which holds the same type.
fn append(data: &mut Option<Data>, more: Data) {
    match (data.as_mut(), more) {
        (Some(Data::Gauge(a)), Data::Gauge(b)) => a.data_points.extend(b.data_points),
        (Some(Data::Sum(a)), Data::Sum(b)) => a.data_points.extend(b.data_points),
        (Some(Data::Histogram(a)), Data::Histogram(b)) => a.data_points.extend(b.data_points),
        (Some(Data::ExponentialHistogram(a)), Data::ExponentialHistogram(b)) => {
            a.data_points.extend(b.data_points)
        }
        (_, more) => *data = Some(more),
    }
}

/// Where one data point goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Passed on as it is, not tracked.
    Pass,
    /// Passed on as it is, and tracked (see [`Aggregator::track`]).
    Keep,
    /// Merged, or dropped.
    Other,
}

/// Splits `metric`'s points by `route`: `Pass` and `Keep` points stay in it, `Other` points
/// move to the first metric returned, and copies of the `Keep` points make the second.
pub fn split(
    metric: &mut Metric,
    route: &mut dyn FnMut(&[KeyValue]) -> Route,
) -> (Option<Metric>, Option<Metric>) {
    fn partition<T: Clone>(
        points: &mut Vec<T>,
        attributes: impl Fn(&T) -> &[KeyValue],
        route: &mut dyn FnMut(&[KeyValue]) -> Route,
    ) -> (Vec<T>, Vec<T>) {
        let mut others = Vec::new();
        let mut kept = Vec::new();
        for point in std::mem::take(points) {
            match route(attributes(&point)) {
                Route::Pass => points.push(point),
                Route::Keep => {
                    kept.push(point.clone());
                    points.push(point);
                }
                Route::Other => others.push(point),
            }
        }
        (others, kept)
    }
    let with = |data: Data| Metric {
        name: metric.name.clone(),
        description: metric.description.clone(),
        unit: metric.unit.clone(),
        metadata: metric.metadata.clone(),
        data: Some(data),
    };
    let (others, kept) = match &mut metric.data {
        None => return (None, None),
        Some(Data::Gauge(g)) => {
            let (o, k) = partition(&mut g.data_points, |p| &p.attributes, route);
            (
                Data::Gauge(Gauge { data_points: o }),
                Data::Gauge(Gauge { data_points: k }),
            )
        }
        Some(Data::Sum(s)) => {
            let (o, k) = partition(&mut s.data_points, |p| &p.attributes, route);
            let sum = |data_points| {
                Data::Sum(Sum {
                    data_points,
                    aggregation_temporality: s.aggregation_temporality,
                    is_monotonic: s.is_monotonic,
                })
            };
            (sum(o), sum(k))
        }
        Some(Data::Histogram(h)) => {
            let (o, k) = partition(&mut h.data_points, |p| &p.attributes, route);
            let hist = |data_points| {
                Data::Histogram(Histogram {
                    data_points,
                    aggregation_temporality: h.aggregation_temporality,
                })
            };
            (hist(o), hist(k))
        }
        Some(Data::ExponentialHistogram(h)) => {
            let (o, k) = partition(&mut h.data_points, |p| &p.attributes, route);
            let hist = |data_points| {
                Data::ExponentialHistogram(ExponentialHistogram {
                    data_points,
                    aggregation_temporality: h.aggregation_temporality,
                })
            };
            (hist(o), hist(k))
        }
        Some(Data::Summary(s)) => {
            let (o, k) = partition(&mut s.data_points, |p| &p.attributes, route);
            (
                Data::Summary(Summary { data_points: o }),
                Data::Summary(Summary { data_points: k }),
            )
        }
    };
    let non_empty = |data: Data| {
        let metric = with(data);
        (crate::otlp::metric_data_points(metric.data.as_ref()) > 0).then_some(metric)
    };
    (non_empty(others), non_empty(kept))
}

/// Moves the points of `extra` (of the same type) back into `metric`.
pub fn append_points(metric: &mut Metric, extra: Metric) {
    match (&mut metric.data, extra.data) {
        (Some(Data::Gauge(a)), Some(Data::Gauge(b))) => a.data_points.extend(b.data_points),
        (Some(Data::Sum(a)), Some(Data::Sum(b))) => a.data_points.extend(b.data_points),
        (Some(Data::Histogram(a)), Some(Data::Histogram(b))) => a.data_points.extend(b.data_points),
        (Some(Data::ExponentialHistogram(a)), Some(Data::ExponentialHistogram(b))) => {
            a.data_points.extend(b.data_points)
        }
        (Some(Data::Summary(a)), Some(Data::Summary(b))) => a.data_points.extend(b.data_points),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::testdata::{int_attr, string_attr};
    use crate::processor::aggregate::AttributeSelection;
    use ahash::AHashMap;
    use opentelemetry_proto::tonic::metrics::v1::{Summary, SummaryDataPoint};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;
    /// Boundary `k` of 10 s intervals from T0.
    fn t(k: u64) -> u64 {
        T0 + k * 10 * SEC
    }

    fn settings(temporality: Temporality) -> MergeSettings {
        MergeSettings {
            temporality,
            gauge: GaugeFn::Avg,
            overrides: Vec::new(),
            stale_after: Duration::from_secs(300),
            max_series: 1000,
            count_series: false,
            summaries: SummaryPolicy::Pass,
        }
    }

    fn engine(settings: MergeSettings) -> Aggregator {
        Aggregator::new(
            Arc::new(settings),
            MergeTelemetry::new("test", "aggregate"),
            T0,
        )
    }

    fn keep_host() -> AttributeSelection {
        AttributeSelection::new(&["host.name".to_string(), "state".to_string()], true)
    }

    fn resource(pid: i64) -> Resource {
        Resource {
            attributes: vec![string_attr("host.name", "h1"), int_attr("process.pid", pid)],
            ..Default::default()
        }
    }

    fn scope() -> InstrumentationScope {
        InstrumentationScope {
            name: "s".into(),
            version: "1".into(),
            ..Default::default()
        }
    }

    fn point(value: number_data_point::Value, start: u64, time: u64) -> NumberDataPoint {
        NumberDataPoint {
            start_time_unix_nano: start,
            time_unix_nano: time,
            value: Some(value),
            ..Default::default()
        }
    }

    fn int(v: i64) -> number_data_point::Value {
        number_data_point::Value::AsInt(v)
    }

    fn double(v: f64) -> number_data_point::Value {
        number_data_point::Value::AsDouble(v)
    }

    fn sum(
        points: Vec<NumberDataPoint>,
        monotonic: bool,
        temporality: AggregationTemporality,
    ) -> Metric {
        Metric {
            name: "m".into(),
            unit: "1".into(),
            data: Some(Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: temporality as i32,
                is_monotonic: monotonic,
            })),
            ..Default::default()
        }
    }

    fn counter(pid: i64, value: i64, start: u64, time: u64) -> (i64, Metric) {
        let p = point(int(value), start, time);
        (pid, sum(vec![p], true, AggregationTemporality::Cumulative))
    }

    /// Adds `metrics` (pid, metric) and returns what was left to pass through.
    fn add(agg: &mut Aggregator, metrics: Vec<(i64, Metric)>) -> Vec<Metric> {
        metrics
            .into_iter()
            .filter_map(|(pid, mut m)| {
                agg.add(&resource(pid), &scope(), &mut m, &keep_host());
                (otlp_points(&m) > 0).then_some(m)
            })
            .collect()
    }

    fn otlp_points(m: &Metric) -> usize {
        crate::otlp::metric_data_points(m.data.as_ref())
    }

    fn metrics(out: &[ResourceMetrics]) -> Vec<&Metric> {
        out.iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .collect()
    }

    /// The single number point of the single output metric named `name`.
    fn number(out: &[ResourceMetrics], name: &str) -> NumberDataPoint {
        let found: Vec<_> = metrics(out)
            .into_iter()
            .filter(|m| m.name == name)
            .collect();
        assert_eq!(found.len(), 1, "{name} in {out:?}");
        match &found[0].data {
            Some(Data::Sum(s)) if s.data_points.len() == 1 => s.data_points[0].clone(),
            Some(Data::Gauge(g)) if g.data_points.len() == 1 => g.data_points[0].clone(),
            other => panic!("{other:?}"),
        }
    }

    fn sum_meta(out: &[ResourceMetrics]) -> (i32, bool) {
        match &metrics(out)[0].data {
            Some(Data::Sum(s)) => (s.aggregation_temporality, s.is_monotonic),
            other => panic!("{other:?}"),
        }
    }

    fn track(agg: &mut Aggregator, pid: i64, value: i64, start: u64, time: u64) {
        let (pid, m) = counter(pid, value, start, time);
        agg.track(&resource(pid), &scope(), &m, &keep_host());
    }

    fn merged(agg: &mut Aggregator, pid: i64, value: i64, start: u64, time: u64) {
        assert!(add(agg, vec![counter(pid, value, start, time)]).is_empty());
    }

    fn total(out: &[ResourceMetrics]) -> i64 {
        match number(out, "m").value {
            Some(number_data_point::Value::AsInt(i)) => i,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_series_moving_between_merged_and_passed_on_is_counted_exactly_once() {
        let mut agg = engine(settings(Temporality::Cumulative));
        let old = T0 - 1000 * SEC;
        // pid 1 always merged; pid 2 passed on (tracked) first.
        merged(&mut agg, 1, 100, old, t(0) + SEC);
        track(&mut agg, 2, 500, old, t(0) + SEC);
        assert_eq!(total(&agg.emit(t(1))), 100);
        // pid 2 joins the merge: only its increase since its tracked point counts (+20),
        // not its history (500).
        merged(&mut agg, 1, 110, old, t(1) + SEC);
        merged(&mut agg, 2, 520, old, t(1) + SEC);
        assert_eq!(total(&agg.emit(t(2))), 100 + 10 + 20);
        // pid 2 is passed on again: its increase up to now (+30) happened while merged and
        // still counts here; afterwards it does not.
        merged(&mut agg, 1, 115, old, t(2) + SEC);
        track(&mut agg, 2, 550, old, t(2) + SEC);
        assert_eq!(total(&agg.emit(t(3))), 130 + 5 + 30);
        merged(&mut agg, 1, 120, old, t(3) + SEC);
        track(&mut agg, 2, 900, old, t(3) + SEC);
        assert_eq!(total(&agg.emit(t(4))), 165 + 5);
        // Back once more after a restart while tracked: the restart's value is its baseline.
        track(&mut agg, 2, 7, t(4), t(4) + SEC);
        merged(&mut agg, 1, 120, old, t(4) + 2 * SEC);
        merged(&mut agg, 2, 9, t(4), t(4) + 2 * SEC);
        assert_eq!(total(&agg.emit(t(5))), 170 + 2);
    }

    #[test]
    fn tracking_alone_makes_no_output_and_a_tracked_level_leaves_the_sum() {
        let mut agg = engine(settings(Temporality::Cumulative));
        track(&mut agg, 1, 100, T0 - SEC, t(0) + SEC);
        assert!(agg.emit(t(1)).is_empty());

        let level = |v: i64| {
            sum(
                vec![point(int(v), T0, t(1) + SEC)],
                false,
                AggregationTemporality::Cumulative,
            )
        };
        let mut a = level(10);
        let mut b = level(5);
        agg.add(&resource(1), &scope(), &mut a, &keep_host());
        agg.add(&resource(2), &scope(), &mut b, &keep_host());
        assert_eq!(total(&agg.emit(t(2))), 15);
        agg.track(&resource(2), &scope(), &level(6), &keep_host());
        assert_eq!(total(&agg.emit(t(3))), 10);
    }

    proptest! {
        /// Whatever the moves between merged and passed on, the merged output's increase
        /// plus the increases a backend reads from the passed-on points equal the inputs'
        /// increases.
        #[test]
        fn moving_series_conserve_counter_totals(
            steps in proptest::collection::vec((0i64..4, 0i64..50, any::<bool>(), 0u8..10), 1..80)
        ) {
            let mut agg = engine(settings(Temporality::Cumulative));
            let old = T0 - 1000 * SEC;
            let mut values = [1000i64; 4];
            // A series seen by the engine before: the first point of each is a baseline.
            for pid in 0..4 {
                track(&mut agg, pid, values[pid as usize], old, t(0));
            }
            let mut true_increase = 0i64;
            let mut passed_increase = 0i64;
            // The first points were passed on too.
            let mut last_passed: [Option<i64>; 4] = [Some(1000); 4];
            let mut last_total = 0i64;
            let mut merged_increase = 0i64;
            for (k, (pid, step, merge, close)) in steps.into_iter().enumerate() {
                let time = t(0) + (k as u64 + 1) * SEC;
                values[pid as usize] += step;
                true_increase += step;
                let value = values[pid as usize];
                if merge {
                    merged(&mut agg, pid, value, old, time);
                    last_passed[pid as usize] = None;
                } else {
                    // A backend reads an increase between consecutive passed-on points only.
                    if let Some(last) = last_passed[pid as usize] {
                        passed_increase += value - last;
                    }
                    last_passed[pid as usize] = Some(value);
                    track(&mut agg, pid, value, old, time);
                }
                if close == 0 {
                    let out = agg.emit(time + 1);
                    if !out.is_empty() {
                        let now = total(&out);
                        prop_assert!(now >= last_total);
                        merged_increase += now - last_total;
                        last_total = now;
                    }
                }
            }
            let out = agg.emit(t(100));
            if !out.is_empty() {
                merged_increase += total(&out) - last_total;
            }
            prop_assert_eq!(merged_increase + passed_increase, true_increase);
        }
    }

    /// Every output is valid OTLP: no empty resource or scope, start <= time.
    fn assert_valid(out: &[ResourceMetrics]) {
        for rm in out {
            assert!(!rm.scope_metrics.is_empty());
            for sm in &rm.scope_metrics {
                assert!(!sm.metrics.is_empty());
                for m in &sm.metrics {
                    assert!(otlp_points(m) > 0);
                    let times: Vec<(u64, u64)> = match &m.data {
                        Some(Data::Sum(s)) => {
                            assert_ne!(s.aggregation_temporality, 0);
                            s.data_points
                                .iter()
                                .map(|p| (p.start_time_unix_nano, p.time_unix_nano))
                                .collect()
                        }
                        Some(Data::Gauge(g)) => g
                            .data_points
                            .iter()
                            .map(|p| (p.start_time_unix_nano, p.time_unix_nano))
                            .collect(),
                        Some(Data::Histogram(h)) => {
                            assert_ne!(h.aggregation_temporality, 0);
                            h.data_points
                                .iter()
                                .map(|p| (p.start_time_unix_nano, p.time_unix_nano))
                                .collect()
                        }
                        Some(Data::ExponentialHistogram(h)) => {
                            assert_ne!(h.aggregation_temporality, 0);
                            h.data_points
                                .iter()
                                .map(|p| (p.start_time_unix_nano, p.time_unix_nano))
                                .collect()
                        }
                        other => panic!("{other:?}"),
                    };
                    for (start, time) in times {
                        assert!(start <= time, "{m:?}");
                    }
                }
            }
        }
    }

    /// The cumulative-counter story both temporalities are checked against. Output totals:
    /// 1: pid1 10 + pid2 5 (before the first emit, both count in full)       = 15
    /// 2: pid1 13 (+3), pid2 9 (+4)                                            = 22
    /// 3: pid1 restarts at 2 (+2), pid2 9 (+0), pid3 new since the output (+7) = 31
    /// 4: pid2 exited; pid1 4 (+2), pid3 7 (+0)                                = 33
    /// 5: pid4 running since before the output began, first seen: baseline    = 33
    /// 6: pid4 110 (+10)                                                       = 43
    fn counter_story(temporality: Temporality) -> Vec<NumberDataPoint> {
        let mut agg = engine(settings(temporality));
        let (s0, s1, s2) = (T0 - 100 * SEC, t(2) + SEC, t(2) + 2 * SEC);
        let steps = vec![
            vec![
                counter(1, 10, s0, t(0) + SEC),
                counter(2, 5, s0, t(0) + SEC),
            ],
            vec![
                counter(1, 13, s0, t(1) + SEC),
                counter(2, 9, s0, t(1) + SEC),
            ],
            vec![
                counter(1, 2, s1, t(2) + 5 * SEC),
                counter(2, 9, s0, t(2) + SEC),
                counter(3, 7, s2, t(2) + 5 * SEC),
            ],
            vec![counter(1, 4, s1, t(3) + SEC), counter(3, 7, s2, t(3) + SEC)],
            vec![counter(4, 100, s0 - SEC, t(4) + SEC)],
            vec![counter(4, 110, s0 - SEC, t(5) + SEC)],
        ];
        let mut points = Vec::new();
        for (k, step) in steps.into_iter().enumerate() {
            assert!(add(&mut agg, step).is_empty());
            let out = agg.emit(t(k as u64 + 1));
            assert_valid(&out);
            let expected = match temporality {
                Temporality::Cumulative => AggregationTemporality::Cumulative as i32,
                Temporality::Delta => AggregationTemporality::Delta as i32,
            };
            assert_eq!(sum_meta(&out), (expected, true));
            let p = number(&out, "m");
            // host.name is kept where it was, on the resource; process.pid is gone.
            assert!(p.attributes.is_empty());
            assert_eq!(out.len(), 1);
            let resource = out[0].resource.as_ref().unwrap();
            assert_eq!(resource.attributes, vec![string_attr("host.name", "h1")]);
            assert_eq!(p.time_unix_nano, t(k as u64 + 1));
            points.push(p);
        }
        points
    }

    #[test]
    fn cumulative_counter_output_survives_restarts_exits_and_late_joiners() {
        let points = counter_story(Temporality::Cumulative);
        let values: Vec<_> = points.iter().map(|p| p.value.unwrap()).collect();
        assert_eq!(values, [15, 22, 31, 33, 33, 43].map(int));
        // A stable start: the engine's (its members started earlier, before it existed).
        assert!(points.iter().all(|p| p.start_time_unix_nano == T0));
    }

    #[test]
    fn cumulative_counter_as_delta_output() {
        let points = counter_story(Temporality::Delta);
        let values: Vec<_> = points.iter().map(|p| p.value.unwrap()).collect();
        assert_eq!(values, [15, 7, 9, 2, 0, 10].map(int));
        let starts: Vec<_> = points.iter().map(|p| p.start_time_unix_nano).collect();
        assert_eq!(starts, (0..6).map(t).collect::<Vec<_>>());
    }

    #[test]
    fn a_member_silent_past_stale_after_is_not_counted_twice_when_it_returns() {
        let mut agg = engine(MergeSettings {
            stale_after: Duration::from_secs(20),
            ..settings(Temporality::Cumulative)
        });
        let s0 = T0 - 100 * SEC;
        add(
            &mut agg,
            vec![counter(1, 10, s0, t(0)), counter(2, 50, s0 + SEC, t(0))],
        );
        assert_eq!(number(&agg.emit(t(1)), "m").value, Some(int(60)));
        for k in 1..4 {
            add(&mut agg, vec![counter(1, 10 + k as i64, s0, t(k))]);
            agg.emit(t(k + 1));
        }
        assert_eq!(agg.counts().evicted_stale, 1, "pid2 forgotten");
        // pid2 comes back with the same start and a higher value: a baseline, then +5.
        add(&mut agg, vec![counter(2, 70, s0 + SEC, t(4))]);
        assert_eq!(number(&agg.emit(t(5)), "m").value, Some(int(63)));
        add(&mut agg, vec![counter(2, 75, s0 + SEC, t(5))]);
        assert_eq!(number(&agg.emit(t(6)), "m").value, Some(int(68)));
    }

    #[test]
    fn delta_counter_input_is_summed_per_interval() {
        for (temporality, expected) in [
            (Temporality::Cumulative, [int(7), int(8)]),
            (Temporality::Delta, [int(7), int(1)]),
        ] {
            let mut agg = engine(settings(temporality));
            let delta = |pid, v, time| {
                (
                    pid,
                    sum(
                        vec![point(int(v), time - SEC, time)],
                        true,
                        AggregationTemporality::Delta,
                    ),
                )
            };
            add(
                &mut agg,
                vec![delta(1, 3, t(0) + SEC), delta(2, 4, t(0) + SEC)],
            );
            let first = number(&agg.emit(t(1)), "m");
            add(&mut agg, vec![delta(1, 1, t(1) + SEC)]);
            let second = number(&agg.emit(t(2)), "m");
            assert_eq!([first.value.unwrap(), second.value.unwrap()], expected);
        }
    }

    #[test]
    fn ints_stay_ints_until_a_double_is_merged() {
        let mut agg = engine(settings(Temporality::Delta));
        let delta = |pid, v| {
            (
                pid,
                sum(
                    vec![point(v, t(0), t(0) + SEC)],
                    true,
                    AggregationTemporality::Delta,
                ),
            )
        };
        add(&mut agg, vec![delta(1, int(2)), delta(2, int(3))]);
        assert_eq!(number(&agg.emit(t(1)), "m").value, Some(int(5)));
        add(&mut agg, vec![delta(1, int(2)), delta(2, double(0.5))]);
        assert_eq!(number(&agg.emit(t(2)), "m").value, Some(double(2.5)));
    }

    #[test]
    fn up_down_counters_sum_the_latest_level_of_live_members() {
        let mut agg = engine(MergeSettings {
            stale_after: Duration::from_secs(30),
            ..settings(Temporality::Delta)
        });
        let level = |pid, v, time| {
            (
                pid,
                sum(
                    vec![point(int(v), T0 - SEC, time)],
                    false,
                    AggregationTemporality::Cumulative,
                ),
            )
        };
        add(
            &mut agg,
            vec![level(1, 100, t(0) + SEC), level(2, 50, t(0) + SEC)],
        );
        let out = agg.emit(t(1));
        // Up-down counters stay cumulative even under delta output.
        assert_eq!(
            sum_meta(&out),
            (AggregationTemporality::Cumulative as i32, false)
        );
        assert_eq!(number(&out, "m").value, Some(int(150)));
        // pid2 silent: its last level still counts.
        add(&mut agg, vec![level(1, 120, t(1) + SEC)]);
        assert_eq!(number(&agg.emit(t(2)), "m").value, Some(int(170)));
        add(&mut agg, vec![level(1, 130, t(2) + SEC)]);
        assert_eq!(number(&agg.emit(t(3)), "m").value, Some(int(180)));
        // 30 s after pid2 was last seen (t1) it is forgotten; pid1's level still counts.
        let out = agg.emit(t(4));
        assert_eq!(number(&out, "m").value, Some(int(130)));
        assert_eq!(agg.counts().evicted_stale, 1);
        assert_eq!(agg.tracked_series(), 2);
    }

    #[test]
    fn gauge_functions_use_each_members_latest_value() {
        let gauge = |name: &str, pid, points: Vec<(i64, u64)>| {
            (
                pid,
                Metric {
                    name: name.into(),
                    data: Some(Data::Gauge(Gauge {
                        data_points: points
                            .into_iter()
                            .map(|(v, time)| point(int(v), 0, time))
                            .collect(),
                    })),
                    ..Default::default()
                },
            )
        };
        for (gauge_fn, expected) in [
            (GaugeFn::Sum, int(7)),
            (GaugeFn::Avg, double(7.0 / 3.0)),
            (GaugeFn::Min, int(1)),
            (GaugeFn::Max, int(4)),
            (GaugeFn::Last, int(4)),
            (GaugeFn::Count, int(3)),
        ] {
            let mut agg = engine(MergeSettings {
                gauge: gauge_fn,
                overrides: vec![GaugeOverride {
                    metrics: Matcher::compile(
                        &[crate::processor::pattern::PatternText(
                            "process.memory.*".into(),
                        )],
                        "",
                        &mut Vec::new(),
                    )
                    .unwrap(),
                    gauge: GaugeFn::Sum,
                }],
                ..settings(Temporality::Cumulative)
            });
            // pid1 reports twice: only its latest value (1) counts.
            add(
                &mut agg,
                vec![
                    gauge("g", 1, vec![(10, t(0) + SEC), (1, t(0) + 2 * SEC)]),
                    gauge("g", 2, vec![(4, t(0) + 5 * SEC)]),
                    gauge("g", 3, vec![(2, t(0) + 3 * SEC)]),
                    gauge("process.memory.rss", 1, vec![(10, t(0) + SEC)]),
                    gauge("process.memory.rss", 2, vec![(20, t(0) + SEC)]),
                ],
            );
            let out = agg.emit(t(1));
            assert_valid(&out);
            assert_eq!(number(&out, "g").value, Some(expected), "{gauge_fn:?}");
            assert_eq!(
                number(&out, "process.memory.rss").value,
                Some(int(30)),
                "override"
            );
            // Gauges do not carry over into an interval without points.
            assert!(agg.emit(t(2)).is_empty());
        }
    }

    fn histogram(
        pid: i64,
        bounds: &[f64],
        buckets: &[u64],
        sum: f64,
        start: u64,
        time: u64,
        temporality: AggregationTemporality,
    ) -> (i64, Metric) {
        (
            pid,
            Metric {
                name: "h".into(),
                data: Some(Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint {
                        start_time_unix_nano: start,
                        time_unix_nano: time,
                        count: buckets.iter().sum(),
                        sum: Some(sum),
                        bucket_counts: buckets.to_vec(),
                        explicit_bounds: bounds.to_vec(),
                        min: Some(0.5),
                        max: Some(9.0),
                        ..Default::default()
                    }],
                    aggregation_temporality: temporality as i32,
                })),
                ..Default::default()
            },
        )
    }

    fn histogram_point(out: &[ResourceMetrics]) -> HistogramDataPoint {
        match &metrics(out)[0].data {
            Some(Data::Histogram(h)) => h.data_points[0].clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cumulative_histograms_merge_as_increases_with_reset_detection() {
        let b = [1.0, 5.0];
        let cumulative = AggregationTemporality::Cumulative;
        let s0 = T0 - 100 * SEC;
        for temporality in [Temporality::Cumulative, Temporality::Delta] {
            let mut agg = engine(settings(temporality));
            add(
                &mut agg,
                vec![
                    histogram(1, &b, &[1, 1, 1], 7.0, s0, t(0) + SEC, cumulative),
                    histogram(2, &b, &[0, 2, 0], 6.0, s0, t(0) + SEC, cumulative),
                ],
            );
            let first = histogram_point(&agg.emit(t(1)));
            assert_eq!(
                (first.count, first.sum, first.bucket_counts.clone()),
                (5, Some(13.0), vec![1, 3, 1])
            );
            // pid1 +[1,1,0] +3; pid2 resets (its count went down): its new point counts whole.
            // pid3's bounds differ: it passes through, counted.
            let left = add(
                &mut agg,
                vec![
                    histogram(1, &b, &[2, 2, 1], 10.0, s0, t(1) + SEC, cumulative),
                    histogram(2, &b, &[1, 0, 0], 0.5, s0, t(1) + SEC, cumulative),
                    histogram(3, &[2.0], &[1, 1], 3.0, s0, t(1) + SEC, cumulative),
                ],
            );
            assert_eq!(left.len(), 1);
            assert_eq!(agg.counts().unmerged_bucket_mismatch, 1);
            let out = agg.emit(t(2));
            assert_valid(&out);
            let second = histogram_point(&out);
            assert_eq!(second.explicit_bounds, b.to_vec());
            match temporality {
                Temporality::Cumulative => {
                    assert_eq!(
                        (second.count, second.sum, second.bucket_counts),
                        (8, Some(16.5), vec![3, 4, 1])
                    );
                    // The engine's start, after the members' (s0).
                    assert!(s0 < T0);
                    assert_eq!(second.start_time_unix_nano, T0);
                }
                Temporality::Delta => {
                    assert_eq!(
                        (second.count, second.sum, second.bucket_counts),
                        (3, Some(3.5), vec![2, 1, 0])
                    );
                    assert_eq!(second.start_time_unix_nano, t(1));
                }
            }
            // Differences of cumulative points have no min or max.
            assert_eq!((second.min, second.max), (None, None));
        }
    }

    #[test]
    fn delta_histograms_keep_min_and_max() {
        let mut agg = engine(settings(Temporality::Delta));
        let delta = AggregationTemporality::Delta;
        add(
            &mut agg,
            vec![
                histogram(1, &[1.0], &[1, 2], 4.0, t(0), t(0) + SEC, delta),
                histogram(2, &[1.0], &[3, 0], 1.0, t(0), t(0) + SEC, delta),
            ],
        );
        let p = histogram_point(&agg.emit(t(1)));
        assert_eq!(
            (p.count, p.bucket_counts, p.sum, p.min, p.max),
            (6, vec![4, 2], Some(5.0), Some(0.5), Some(9.0))
        );
    }

    fn exp(
        pid: i64,
        scale: i32,
        positive: (i32, Vec<u64>),
        negative: (i32, Vec<u64>),
        zero: u64,
        sum: f64,
        temporality: AggregationTemporality,
    ) -> (i64, Metric) {
        let count = zero + positive.1.iter().sum::<u64>() + negative.1.iter().sum::<u64>();
        (
            pid,
            Metric {
                name: "e".into(),
                data: Some(Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![ExponentialHistogramDataPoint {
                        start_time_unix_nano: T0 - SEC,
                        time_unix_nano: T0 + SEC,
                        count,
                        sum: Some(sum),
                        scale,
                        zero_count: zero,
                        positive: Some(Buckets {
                            offset: positive.0,
                            bucket_counts: positive.1,
                        }),
                        negative: Some(Buckets {
                            offset: negative.0,
                            bucket_counts: negative.1,
                        }),
                        ..Default::default()
                    }],
                    aggregation_temporality: temporality as i32,
                })),
                ..Default::default()
            },
        )
    }

    fn exp_point(out: &[ResourceMetrics]) -> ExponentialHistogramDataPoint {
        match &metrics(out)[0].data {
            Some(Data::ExponentialHistogram(h)) => h.data_points[0].clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exponential_histograms_merge_at_the_smaller_scale() {
        // pid1 at scale 1: positive buckets 0..=3 hold 1,2,3,4 → at scale 0, buckets 0,1
        // hold 3,7; negative buckets -2,-1 hold 1,1 → bucket -1 holds 2. pid2 at scale 0
        // adds 5 to positive bucket 1.
        for temporality in [
            AggregationTemporality::Delta,
            AggregationTemporality::Cumulative,
        ] {
            let mut agg = engine(settings(Temporality::Cumulative));
            add(
                &mut agg,
                vec![
                    exp(
                        1,
                        1,
                        (0, vec![1, 2, 3, 4]),
                        (-2, vec![1, 1]),
                        1,
                        20.0,
                        temporality,
                    ),
                    exp(2, 0, (1, vec![5]), (0, vec![]), 0, 10.0, temporality),
                ],
            );
            let p = exp_point(&agg.emit(t(1)));
            assert_eq!(p.scale, 0);
            assert_eq!(
                p.positive,
                Some(Buckets {
                    offset: 0,
                    bucket_counts: vec![3, 12]
                })
            );
            assert_eq!(
                p.negative,
                Some(Buckets {
                    offset: -1,
                    bucket_counts: vec![2]
                })
            );
            assert_eq!((p.count, p.zero_count, p.sum), (18, 1, Some(30.0)));
            if temporality == AggregationTemporality::Cumulative {
                // pid1 one more observation in its bucket 3: +1 in output bucket 1.
                add(
                    &mut agg,
                    vec![exp(
                        1,
                        1,
                        (0, vec![1, 2, 3, 5]),
                        (-2, vec![1, 1]),
                        1,
                        24.0,
                        temporality,
                    )],
                );
                let p = exp_point(&agg.emit(t(2)));
                assert_eq!(
                    p.positive,
                    Some(Buckets {
                        offset: 0,
                        bucket_counts: vec![3, 13]
                    })
                );
                assert_eq!((p.count, p.sum), (19, Some(34.0)));
            }
        }
    }

    #[test]
    fn far_apart_exponential_buckets_are_downscaled_not_allocated() {
        let mut agg = engine(settings(Temporality::Delta));
        let delta = AggregationTemporality::Delta;
        add(
            &mut agg,
            vec![
                exp(1, 20, (i32::MIN, vec![1]), (0, vec![]), 0, 1.0, delta),
                exp(2, 20, (i32::MAX - 1, vec![1]), (0, vec![]), 0, 1.0, delta),
            ],
        );
        let p = exp_point(&agg.emit(t(1)));
        assert_eq!(p.count, 2);
        let positive = p.positive.unwrap();
        assert!(positive.bucket_counts.len() as i64 <= MAX_EXP_BUCKETS);
        assert_eq!(positive.bucket_counts.iter().sum::<u64>(), 2);
    }

    #[test]
    fn summaries_pass_through_or_drop_counted() {
        for (policy, left) in [(SummaryPolicy::Pass, 1), (SummaryPolicy::Drop, 0)] {
            let mut agg = engine(MergeSettings {
                summaries: policy,
                ..settings(Temporality::Cumulative)
            });
            let summary = Metric {
                name: "s".into(),
                data: Some(Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint::default()],
                })),
                ..Default::default()
            };
            assert_eq!(add(&mut agg, vec![(1, summary)]).len(), left);
            let c = agg.counts();
            assert_eq!(
                (c.unmerged_summary, c.dropped_summary),
                (left as u64, 1 - left as u64)
            );
            assert!(agg.emit(t(1)).is_empty());
        }
    }

    #[test]
    fn beyond_max_series_new_series_pass_through_counted() {
        let mut agg = engine(MergeSettings {
            max_series: 3,
            ..settings(Temporality::Cumulative)
        });
        let s = T0 - SEC;
        // pid1: member + output (2); pid2 joins the same output (3).
        assert!(add(&mut agg, vec![counter(1, 1, s, T0), counter(2, 2, s, T0)]).is_empty());
        // Another metric would need 2 more: it passes through.
        let (_, mut other) = counter(3, 5, s, T0);
        other.name = "other".into();
        let left = add(&mut agg, vec![(3, other)]);
        assert_eq!(left.len(), 1);
        assert_eq!(agg.counts().unmerged_state_full, 1);
        assert_eq!(agg.tracked_series(), 3);
        assert_eq!(number(&agg.emit(t(1)), "m").value, Some(int(3)));
    }

    #[test]
    fn count_series_counts_members_per_output() {
        let mut agg = engine(MergeSettings {
            count_series: true,
            ..settings(Temporality::Cumulative)
        });
        let s = T0 - SEC;
        add(
            &mut agg,
            vec![
                counter(1, 1, s, T0),
                counter(2, 2, s, T0),
                counter(3, 3, s, T0),
            ],
        );
        let out = agg.emit(t(1));
        assert_valid(&out);
        assert_eq!(number(&out, "m.series_count").value, Some(int(3)));
        add(&mut agg, vec![counter(1, 2, s, t(1))]);
        assert_eq!(
            number(&agg.emit(t(2)), "m.series_count").value,
            Some(int(1))
        );
    }

    #[test]
    fn invalid_values_are_dropped_counted_and_never_poison_totals() {
        let mut agg = engine(settings(Temporality::Cumulative));
        let huge: Vec<KeyValue> = (0..10_000).map(|i| int_attr(&format!("k{i}"), i)).collect();
        let mut with_huge = point(int(1), 0, T0);
        with_huge.attributes = huge;
        let points = vec![
            point(double(f64::NAN), 0, T0),
            point(double(f64::INFINITY), 0, T0),
            point(int(-3), 0, T0),
            with_huge,
            NumberDataPoint {
                value: None,
                ..point(int(0), 0, T0)
            },
        ];
        let left = add(
            &mut agg,
            vec![(1, sum(points, true, AggregationTemporality::Cumulative))],
        );
        assert!(left.is_empty());
        assert_eq!(agg.counts().dropped_invalid, 4);
        let out = agg.emit(t(1));
        assert_valid(&out);
        // Zero start time: the output starts with the interval.
        let p = number(&out, "m");
        assert_eq!((p.value, p.start_time_unix_nano), (Some(int(1)), T0));
        // Emitting twice at one time (two instances over a reload) emits nothing more.
        assert!(agg.emit(t(1)).is_empty());
    }

    #[test]
    fn out_of_order_cumulative_points_are_not_resets() {
        let mut agg = engine(settings(Temporality::Cumulative));
        let s = T0 - SEC;
        add(
            &mut agg,
            vec![counter(1, 10, s, T0 + 2 * SEC), counter(1, 8, s, T0 + SEC)],
        );
        assert_eq!(agg.counts().dropped_out_of_order, 1);
        assert_eq!(number(&agg.emit(t(1)), "m").value, Some(int(10)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// The process increases its counter.
        Report {
            pid: i64,
            increase: i64,
        },
        /// The process restarts: a new start time, its counter from `value`.
        Restart {
            pid: i64,
            value: i64,
        },
        /// The process stops reporting (for good, or until it restarts).
        Exit {
            pid: i64,
        },
        Emit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1..6i64, 0..50i64).prop_map(|(pid, increase)| Op::Report { pid, increase }),
            1 => (1..6i64, 0..20i64).prop_map(|(pid, value)| Op::Restart { pid, value }),
            1 => (1..6i64).prop_map(|pid| Op::Exit { pid }),
            2 => Just(Op::Emit),
        ]
    }

    proptest! {
        /// Under churn, restarts and exits, the output's increase is the sum of the members'
        /// increases, and it never goes down. With eviction (members silent past
        /// `stale_after` lose what they counted while silent) it still never goes down and
        /// never counts more than happened.
        #[test]
        fn cumulative_output_conserves_increases_and_never_decreases(ops in prop::collection::vec(op(), 1..120)) {
            let mut exact = engine(MergeSettings { stale_after: Duration::from_secs(3600), ..settings(Temporality::Cumulative) });
            let mut evicting = engine(MergeSettings { stale_after: Duration::from_secs(20), ..settings(Temporality::Cumulative) });
            // pid 0 lives throughout, so the output series does too.
            let mut processes: AHashMap<i64, (u64, i64)> = AHashMap::new();
            processes.insert(0, (T0 - SEC, 0));
            let mut clock = 0u64;
            let mut expected: i64 = 0;
            let mut last = (0i64, 0i64);
            let mut interval = 0u64;
            for op in ops {
                clock += 1;
                let now = t(interval) + clock;
                let mut report = |pid: i64, start: u64, value: i64| {
                    for agg in [&mut exact, &mut evicting] {
                        assert!(add(agg, vec![counter(pid, value, start, now)]).is_empty());
                    }
                };
                match op {
                    Op::Report { pid, increase } => {
                        let (start, value) = processes.entry(pid).or_insert((now, 0));
                        *value += increase;
                        expected += increase;
                        report(pid, *start, *value);
                    }
                    Op::Restart { pid, value } => {
                        processes.insert(pid, (now, value));
                        expected += value;
                        report(pid, now, value);
                    }
                    Op::Exit { pid } => {
                        processes.remove(&pid);
                    }
                    Op::Emit => {
                        let (start, value) = processes[&0];
                        report(0, start, value);
                        interval += 1;
                        let total = |agg: &mut Aggregator| match number(&agg.emit(t(interval)), "m").value {
                            Some(number_data_point::Value::AsInt(total)) => total,
                            other => panic!("{other:?}"),
                        };
                        let now = (total(&mut exact), total(&mut evicting));
                        prop_assert_eq!(now.0, expected);
                        prop_assert!(now.0 >= last.0 && now.1 >= last.1, "went down: {:?} -> {:?}", last, now);
                        prop_assert!(now.1 <= expected, "counted twice: {} > {}", now.1, expected);
                        last = now;
                    }
                }
            }
        }
    }
}
