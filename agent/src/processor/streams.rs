//! What `cumulativetodelta` and `deltatocumulative` share: the identity of a stream, a table
//! of per-stream state bounded in size and age, their self-telemetry, and the arithmetic of
//! exponential histogram buckets.
//!
//! A stream is one resource + scope + metric (name, unit, type, monotonicity) + point
//! attributes. Its identity is a 128-bit hash: keeping the attributes themselves would cost
//! more memory than the state it keys.

use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHasher, RandomState};
use metrics::{Counter, Gauge};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::DataPointFlags;
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::BuildContext;
use crate::telemetry;

/// The fields of a number or histogram data point that stream processing reads, shared by
/// `cumulativetodelta` and `deltatocumulative`.
pub trait PointFields {
    fn attributes(&self) -> &[opentelemetry_proto::tonic::common::v1::KeyValue];
    fn flags(&self) -> u32;
    fn start(&self) -> u64;
    fn time(&self) -> u64;
    fn set_start(&mut self, start: u64);
}

macro_rules! point_fields {
    ($($point:ty),*) => {$(
        impl PointFields for $point {
            fn attributes(&self) -> &[opentelemetry_proto::tonic::common::v1::KeyValue] {
                &self.attributes
            }
            fn flags(&self) -> u32 {
                self.flags
            }
            fn start(&self) -> u64 {
                self.start_time_unix_nano
            }
            fn time(&self) -> u64 {
                self.time_unix_nano
            }
            fn set_start(&mut self, start: u64) {
                self.start_time_unix_nano = start;
            }
        }
    )*};
}

point_fields!(
    opentelemetry_proto::tonic::metrics::v1::NumberDataPoint,
    opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint,
    opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint
);

/// Whether a point carries the "no recorded value" flag (a staleness marker): it has no
/// value to convert.
pub fn has_no_value(flags: u32) -> bool {
    flags & DataPointFlags::NoRecordedValueMask as u32 != 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamKey(u64, u64);

/// Two independently seeded hashers fed the same bytes: a 128-bit identity.
#[derive(Clone)]
pub struct KeyHasher(AHasher, AHasher);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
        self.1.write(bytes);
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

impl KeyHasher {
    pub fn resource(mut self, resource: Option<&Resource>) -> Self {
        hash_attributes(resource.map_or(&[], |r| &r.attributes[..]), &mut self);
        self
    }

    pub fn scope(mut self, scope: Option<&InstrumentationScope>) -> Self {
        let (name, version, attributes) = scope.map_or(("", "", &[][..]), |s| {
            (s.name.as_str(), s.version.as_str(), &s.attributes[..])
        });
        name.hash(&mut self);
        version.hash(&mut self);
        hash_attributes(attributes, &mut self);
        self
    }

    /// The metric's identity; `kind` tells the data types apart.
    pub fn metric(mut self, name: &str, unit: &str, kind: u8, monotonic: bool) -> Self {
        name.hash(&mut self);
        unit.hash(&mut self);
        kind.hash(&mut self);
        monotonic.hash(&mut self);
        self
    }

    pub fn point(&self, attributes: &[KeyValue]) -> StreamKey {
        let mut hasher = self.clone();
        hash_attributes(attributes, &mut hasher);
        StreamKey(hasher.0.finish(), hasher.1.finish())
    }
}

/// Hashes attributes independently of their order, as the Collector's identity does.
fn hash_attributes(attributes: &[KeyValue], hasher: &mut impl Hasher) {
    let mut sorted: Vec<&KeyValue> = attributes.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    sorted.len().hash(hasher);
    for kv in sorted {
        kv.key.hash(hasher);
        hash_value(kv.value.as_ref(), hasher);
    }
}

fn hash_value(value: Option<&AnyValue>, hasher: &mut impl Hasher) {
    use any_value::Value;
    match value.and_then(|v| v.value.as_ref()) {
        None => 0u8.hash(hasher),
        Some(Value::StringValue(s)) => (1u8, s).hash(hasher),
        Some(Value::BoolValue(b)) => (2u8, b).hash(hasher),
        Some(Value::IntValue(i)) => (3u8, i).hash(hasher),
        Some(Value::DoubleValue(d)) => (4u8, d.to_bits()).hash(hasher),
        Some(Value::ArrayValue(array)) => {
            (5u8, array.values.len()).hash(hasher);
            for value in &array.values {
                hash_value(Some(value), hasher);
            }
        }
        Some(Value::KvlistValue(list)) => {
            6u8.hash(hasher);
            hash_attributes(&list.values, hasher);
        }
        Some(Value::BytesValue(b)) => (7u8, b).hash(hasher),
        Some(Value::StringValueStrindex(i)) => (8u8, i).hash(hasher),
    }
}

struct Entry<V> {
    value: V,
    last_seen: Instant,
}

/// Per-stream state, bounded in count (`max_streams`, 0 for no bound) and in age.
pub struct StreamTable<V> {
    streams: AHashMap<StreamKey, Entry<V>>,
    seeds: (RandomState, RandomState),
}

impl<V> Default for StreamTable<V> {
    fn default() -> Self {
        Self {
            streams: AHashMap::new(),
            seeds: (RandomState::new(), RandomState::new()),
        }
    }
}

/// A new stream found the table full.
pub struct Full;

impl<V> StreamTable<V> {
    pub fn hasher(&self) -> KeyHasher {
        KeyHasher(self.seeds.0.build_hasher(), self.seeds.1.build_hasher())
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The state of stream `key`, which was just seen.
    pub fn get_mut(&mut self, key: StreamKey, now: Instant) -> Option<&mut V> {
        self.streams.get_mut(&key).map(|entry| {
            entry.last_seen = now;
            &mut entry.value
        })
    }

    pub fn insert(
        &mut self,
        key: StreamKey,
        value: V,
        now: Instant,
        max_streams: usize,
    ) -> Result<(), Full> {
        if max_streams != 0 && self.streams.len() >= max_streams && !self.streams.contains_key(&key)
        {
            return Err(Full);
        }
        self.streams.insert(
            key,
            Entry {
                value,
                last_seen: now,
            },
        );
        Ok(())
    }

    /// Forgets the streams unseen for `max_stale`; returns how many.
    pub fn evict_stale(&mut self, now: Instant, max_stale: Duration) -> usize {
        let before = self.streams.len();
        self.streams
            .retain(|_, entry| now.saturating_duration_since(entry.last_seen) < max_stale);
        before - self.streams.len()
    }
}

/// Why a processor did not emit a point it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The first point of a stream, whose increase before it is unknown (`initial_value`).
    Initial,
    /// A cumulative value below the previous one without a new start time.
    Reset,
    /// Histogram buckets that differ from the previous point's.
    BucketMismatch,
    /// A timestamp not after the stream's last, or a start before the stream's start.
    OutOfOrder,
    /// A new stream while `max_streams` are tracked.
    StreamLimit,
    /// A point without a usable value: the no-recorded-value flag, NaN, or none at all.
    NoValue,
}

impl DropReason {
    const ALL: [DropReason; 6] = [
        DropReason::Initial,
        DropReason::Reset,
        DropReason::BucketMismatch,
        DropReason::OutOfOrder,
        DropReason::StreamLimit,
        DropReason::NoValue,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::Initial => "initial",
            DropReason::Reset => "reset",
            DropReason::BucketMismatch => "bucket_mismatch",
            DropReason::OutOfOrder => "out_of_order",
            DropReason::StreamLimit => "stream_limit",
            DropReason::NoValue => "no_value",
        }
    }
}

/// Counts of one batch, added to the self-metrics once per batch rather than per point.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub dropped: [u64; DropReason::ALL.len()],
    pub evicted_stale: u64,
}

impl Tally {
    pub fn count_drop(&mut self, reason: DropReason) {
        self.dropped[reason as usize] += 1;
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    pub fn any_dropped(&self) -> bool {
        self.dropped.iter().any(|&n| n > 0)
    }
}

/// The self-metrics of one stateful temporality processor.
pub struct StreamTelemetry {
    series: Gauge,
    evicted_stale: Counter,
    dropped: Vec<Counter>,
    /// Everything counted so far by this instance, for tests.
    pub total: Tally,
}

impl StreamTelemetry {
    pub fn new(context: &BuildContext<'_>) -> Self {
        let (p, c) = (context.pipeline().to_string(), context.id().to_string());
        Self {
            series: metrics::gauge!(telemetry::PROCESSOR_STATE_SERIES, "pipeline" => p.clone(), "processor" => c.clone()),
            evicted_stale: metrics::counter!(telemetry::PROCESSOR_STATE_EVICTIONS, "pipeline" => p.clone(), "processor" => c.clone(), "reason" => "stale"),
            dropped: DropReason::ALL
                .iter()
                .map(|r| metrics::counter!(telemetry::PROCESSOR_DROPPED, "pipeline" => p.clone(), "processor" => c.clone(), "reason" => r.label()))
                .collect(),
            total: Tally::default(),
        }
    }

    pub fn record(&mut self, tally: &Tally, series: usize) {
        self.series.set(series as f64);
        self.evicted_stale.increment(tally.evicted_stale);
        self.total.evicted_stale += tally.evicted_stale;
        for ((counter, total), &n) in self
            .dropped
            .iter()
            .zip(self.total.dropped.iter_mut())
            .zip(&tally.dropped)
        {
            if n > 0 {
                counter.increment(n);
                *total += n;
            }
        }
    }
}

/// How often stale streams are looked for: often enough that a stream is forgotten soon after
/// `max_stale`, rarely enough that the scan of the table costs nothing.
pub fn sweep_interval(max_stale: Duration) -> Duration {
    (max_stale / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Most buckets a merged exponential histogram side may span; wider ones are downscaled, as
/// the Collector does. Also what keeps garbage offsets from allocating gigabytes.
pub const MAX_EXPO_BUCKETS: i64 = 160;

/// One side of an exponential histogram with indexes widened so no offset arithmetic
/// overflows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpoBuckets {
    pub offset: i64,
    pub counts: Vec<u64>,
}

impl ExpoBuckets {
    pub fn from_proto(buckets: Option<&Buckets>) -> Self {
        buckets.map_or_else(Self::default, |b| Self {
            offset: i64::from(b.offset),
            counts: b.bucket_counts.clone(),
        })
    }

    /// `None` when the offset no longer fits the wire type.
    pub fn to_proto(&self) -> Option<Buckets> {
        Some(Buckets {
            offset: i32::try_from(self.offset).ok()?,
            bucket_counts: self.counts.clone(),
        })
    }

    /// The index range holding non-zero counts, if any.
    pub fn span(&self) -> Option<(i64, i64)> {
        let first = self.counts.iter().position(|&c| c != 0)?;
        let last = self.counts.iter().rposition(|&c| c != 0)?;
        Some((self.offset + first as i64, self.offset + last as i64))
    }

    /// Halves the resolution `by` times: bucket `i` becomes bucket `i >> by`.
    pub fn downscale(&mut self, by: u32) {
        if by == 0 {
            return;
        }
        let Some((lo, hi)) = self.span() else {
            *self = Self::default();
            return;
        };
        let by = by.min(63);
        let new_lo = lo >> by;
        let mut counts = vec![0u64; ((hi >> by) - new_lo + 1) as usize];
        for (i, &count) in self.counts.iter().enumerate() {
            if count != 0 {
                let index = (self.offset + i as i64) >> by;
                let slot = &mut counts[(index - new_lo) as usize];
                *slot = slot.saturating_add(count);
            }
        }
        self.offset = new_lo;
        self.counts = counts;
    }

    pub fn count_at(&self, index: i64) -> u64 {
        usize::try_from(index - self.offset)
            .ok()
            .and_then(|i| self.counts.get(i).copied())
            .unwrap_or(0)
    }

    /// Removes the buckets entirely at or below `threshold` at `scale`, returning their
    /// total: they now belong in the zero bucket.
    pub fn take_below(&mut self, threshold: f64, scale: i32) -> u64 {
        let mut taken = 0u64;
        for (i, count) in self.counts.iter_mut().enumerate() {
            // Bucket `index` spans (base^index, base^(index+1)], base = 2^(2^-scale).
            let index = self.offset + i as i64;
            let upper = ((index + 1) as f64 * (-f64::from(scale)).exp2()).exp2();
            if upper <= threshold {
                taken = taken.saturating_add(*count);
                *count = 0;
            }
        }
        taken
    }
}

/// How many halvings make the union of `a` and `b` span at most [`MAX_EXPO_BUCKETS`].
pub fn halvings_to_fit(a: &ExpoBuckets, b: &ExpoBuckets) -> u32 {
    let (lo, hi) = match (a.span(), b.span()) {
        (Some((alo, ahi)), Some((blo, bhi))) => (alo.min(blo), ahi.max(bhi)),
        (Some(span), None) | (None, Some(span)) => span,
        (None, None) => return 0,
    };
    let mut by = 0;
    while (hi >> by) - (lo >> by) + 1 > MAX_EXPO_BUCKETS {
        by += 1;
    }
    by
}

/// Adds `b` into `a`, both at the same scale and fitting [`MAX_EXPO_BUCKETS`] together.
pub fn add_buckets(a: &mut ExpoBuckets, b: &ExpoBuckets) {
    let (lo, hi) = match (a.span(), b.span()) {
        (Some((alo, ahi)), Some((blo, bhi))) => (alo.min(blo), ahi.max(bhi)),
        (Some(span), None) | (None, Some(span)) => span,
        (None, None) => {
            *a = ExpoBuckets::default();
            return;
        }
    };
    let counts = (lo..=hi)
        .map(|i| a.count_at(i).saturating_add(b.count_at(i)))
        .collect();
    *a = ExpoBuckets { offset: lo, counts };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_order_does_not_change_the_identity() {
        use crate::otlp::testdata::{int_attr, string_attr};
        let table = StreamTable::<()>::default();
        let hasher = table.hasher();
        let a = hasher.point(&[string_attr("a", "1"), int_attr("b", 2)]);
        let b = hasher.point(&[int_attr("b", 2), string_attr("a", "1")]);
        let c = hasher.point(&[string_attr("a", "1"), string_attr("b", "2")]);
        assert_eq!(a, b);
        assert_ne!(
            a, c,
            "an int and a string of the same text are different values"
        );
    }

    #[test]
    fn downscale_merges_buckets_by_halving_their_index() {
        // Indexes -3..=2 at scale 1 become -2, -1, -1, 0, 0, 1 at scale 0.
        let mut b = ExpoBuckets {
            offset: -3,
            counts: vec![1, 2, 3, 4, 5, 6],
        };
        b.downscale(1);
        assert_eq!(
            b,
            ExpoBuckets {
                offset: -2,
                counts: vec![1, 5, 9, 6]
            }
        );
    }

    #[test]
    fn far_apart_garbage_offsets_are_downscaled_to_a_bounded_width() {
        let a = ExpoBuckets {
            offset: i64::from(i32::MIN),
            counts: vec![1],
        };
        let b = ExpoBuckets {
            offset: i64::from(i32::MAX),
            counts: vec![1],
        };
        let by = halvings_to_fit(&a, &b);
        let (mut a, mut b) = (a, b);
        a.downscale(by);
        b.downscale(by);
        add_buckets(&mut a, &b);
        assert!(a.counts.len() as i64 <= MAX_EXPO_BUCKETS);
        assert_eq!(a.counts.iter().sum::<u64>(), 2);
    }
}
