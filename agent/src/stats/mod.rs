//! Volume accounting of a pipeline's output: data points, distinct series and encoded bytes,
//! per 10 s window and in total. This is what the control plane compares between baseline and
//! candidate, so it is measured on exactly what the exporters receive. With a `meter` config
//! ([`meter`]) the same walk also counts critical series and conserved counters.

pub mod meter;

use std::hash::BuildHasherDefault;

use hashbrown::HashTable;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperloglogplus::{HyperLogLog, HyperLogLogPF};
use metrics::{Counter, Gauge};

use crate::otlp::wire::{self, AttributeIter, Visitor};
use crate::otlp::{Batch, Payload};
use crate::telemetry;
use bytes::Bytes;

pub const WINDOW: Duration = Duration::from_secs(10);
/// Distinct series (since start) counted exactly before switching to a HyperLogLog estimate;
/// at that size the table holds 2^20 buckets of 9 bytes, about 9 MiB per pipeline.
pub const EXACT_SERIES_LIMIT: usize = 500_000;
const HLL_PRECISION: u8 = 14; // 16 KiB of registers, ~0.8% standard error

/// Series hashes are already uniformly distributed; hashing them again would be waste.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type IdentityBuild = BuildHasherDefault<IdentityHasher>;

type Hll = HyperLogLogPF<u64, IdentityBuild>;

fn new_hll() -> Option<Hll> {
    HyperLogLogPF::new(HLL_PRECISION, IdentityBuild::default()).ok()
}

/// Counts distinct series in the current window and since start, exactly up to a bound,
/// then by estimate.
///
/// One table of series answers both questions with a single probe per data point; with tens
/// of thousands of series every probe misses the cache, so the table is kept small: each
/// entry is one `u64`, the series hash's upper 56 bits and in the low 8 the stamp of the
/// window it was last seen in (half the size of a map from hash to window, so that a
/// pipeline's table stays in a core's L2 cache between requests). Two series whose hashes
/// agree in 56 bits count as one: among 500,000 series that happens with probability ~2e-6.
pub struct SeriesTracker {
    seen: HashTable<u64>,
    /// The stamp of the current window: 1 to 255; 0 marks "seen in none of the last 255".
    stamp: u8,
    in_window: u64,
    estimate: Option<(Hll, Hll)>,
    limit: usize,
}

const STAMP_BITS: u64 = 0xff;

/// Where an identity sits in the table: its 56 uniform bits spread over all 64, since the
/// table reads both the low bits (the bucket) and the high ones (a tag).
#[inline]
fn table_hash(identity: u64) -> u64 {
    (identity >> 8).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl SeriesTracker {
    pub fn new(limit: usize) -> Self {
        Self {
            seen: HashTable::new(),
            stamp: 1,
            in_window: 0,
            estimate: None,
            limit,
        }
    }

    pub fn insert(&mut self, series: u64) {
        if let Some((window, total)) = &mut self.estimate {
            window.insert(&series);
            total.insert(&series);
            return;
        }
        let identity = series & !STAMP_BITS;
        let hash = table_hash(identity);
        let stamp = u64::from(self.stamp);
        match self.seen.find_mut(hash, |e| *e & !STAMP_BITS == identity) {
            Some(entry) => {
                if *entry & STAMP_BITS != stamp {
                    *entry = identity | stamp;
                    self.in_window += 1;
                }
            }
            None => {
                self.seen
                    .insert_unique(hash, identity | stamp, |e| table_hash(*e & !STAMP_BITS));
                self.in_window += 1;
                if self.seen.len() > self.limit {
                    self.switch_to_estimates();
                }
            }
        }
    }

    fn switch_to_estimates(&mut self) {
        let (Some(mut window), Some(mut total)) = (new_hll(), new_hll()) else {
            return;
        };
        let stamp = u64::from(self.stamp);
        for entry in self.seen.drain() {
            let series = entry & !STAMP_BITS;
            total.insert(&series);
            if entry & STAMP_BITS == stamp {
                window.insert(&series);
            }
        }
        self.seen.shrink_to_fit(|e| table_hash(*e & !STAMP_BITS));
        self.estimate = Some((window, total));
    }

    /// Distinct series of the current window, and whether it is an estimate.
    pub fn window_count(&mut self) -> (u64, bool) {
        match &mut self.estimate {
            Some((window, _)) => (window.count().round() as u64, true),
            None => (self.in_window, false),
        }
    }

    /// Distinct series since start, and whether it is an estimate.
    pub fn total_count(&mut self) -> (u64, bool) {
        match &mut self.estimate {
            Some((_, total)) => (total.count().round() as u64, true),
            None => (self.seen.len() as u64, false),
        }
    }

    /// Starts a new window.
    pub fn next_window(&mut self) {
        if self.stamp == u8::MAX {
            // Stamps are about to be reused: older ones must not read as the new window's.
            for entry in self.seen.iter_mut() {
                *entry &= !STAMP_BITS;
            }
            self.stamp = 1;
        } else {
            self.stamp += 1;
        }
        self.in_window = 0;
        if let Some((window, _)) = &mut self.estimate {
            if let Some(fresh) = new_hll() {
                *window = fresh;
            }
        }
    }
}

/// Hashes series identity (resource, scope, metric name, data point attributes) off the wire.
/// Attribute order does not change a series' identity.
struct SeriesHasher<'a, F> {
    state: &'a ahash::RandomState,
    resource: u64,
    scope: u64,
    /// The resource, scope and name of the current metric, hashed together.
    metric: u64,
    sink: F,
    points: PointMemo,
}

impl<'a, F: FnMut(u64)> SeriesHasher<'a, F> {
    fn new(state: &'a ahash::RandomState, sink: F, points: PointMemo) -> Self {
        Self {
            state,
            resource: 0,
            scope: 0,
            metric: 0,
            sink,
            points,
        }
    }
}

/// Walks pipeline output, which is well formed by construction.
impl<F: FnMut(u64)> Visitor for SeriesHasher<'_, F> {
    const VALIDATE: bool = false;

    fn resource(&mut self, resource: &[u8]) {
        self.resource = resource_hash(self.state, resource);
    }
    fn scope(&mut self, scope: &[u8]) {
        self.scope = self.state.hash_one(scope);
    }
    fn metric(&mut self, name: &[u8]) {
        let name = name_hash(self.state, name);
        self.metric = metric_hash(self.state, self.resource, self.scope, name);
    }
    fn data_point(&mut self, attributes: AttributeIter<'_>) {
        let attributes = self.points.attribute_hash(self.state, attributes);
        (self.sink)(series_of_point(self.metric, attributes));
    }
}

/// The attribute hashes of the data points of one received batch, by where each point is
/// in its bytes. A point's attribute hash is the part of its series hash that depends on the
/// point alone, and the costly part: reading its fields. The meters of a baseline and of a
/// shadow candidate that keeps most points unchanged hash the same points; the first to walk
/// the batch leaves its hashes there, and the other reads them.
#[derive(Debug)]
pub struct PointHashes {
    /// Each point's `offset << 32 | len` in the batch, ascending, and its hash.
    points: Vec<(u64, u64)>,
}

/// A series hasher's use of a batch's [`PointHashes`].
pub(crate) enum PointMemo {
    /// No batch, or no other pipeline to share with.
    Off,
    /// Reads the hashes another meter left; `next` is where the last point was found.
    Read { batch: Arc<Batch>, next: usize },
    /// Records the hashes of the points found in the batch, left there when done.
    Record {
        batch: Arc<Batch>,
        points: Vec<(u64, u64)>,
    },
}

impl PointMemo {
    /// For a walk that meets points of `batch` (its own output, or a rewrite's observer):
    /// reads what another meter left, or records for the others while another pipeline
    /// still holds the batch; nothing when none does.
    pub(crate) fn for_batch(batch: &Arc<Batch>) -> Self {
        if batch.point_hashes().is_some() {
            Self::Read {
                batch: Arc::clone(batch),
                next: 0,
            }
        } else if Arc::strong_count(batch) > 1 {
            let points = usize::try_from(batch.data_points()).unwrap_or(0);
            Self::Record {
                batch: Arc::clone(batch),
                points: Vec::with_capacity(points),
            }
        } else {
            Self::Off
        }
    }

    pub(crate) fn for_payload(payload: &Payload) -> Self {
        match payload {
            Payload::Shared(batch) => Self::for_batch(batch),
            Payload::Decoded(_) | Payload::Encoded { .. } => Self::Off,
        }
    }

    #[inline]
    fn attribute_hash(&mut self, state: &ahash::RandomState, attributes: AttributeIter<'_>) -> u64 {
        match self {
            Self::Off => unordered_hash(state, attributes),
            Self::Read { batch, next } => {
                let found = span_in(batch, attributes.point()).and_then(|span| {
                    let memo = batch.point_hashes()?;
                    // Points come in the order of the bytes: the search goes on from the
                    // last one found, one step at a time (almost always none).
                    let mut at = *next;
                    while memo.points.get(at).is_some_and(|&(s, _)| s < span) {
                        at += 1;
                    }
                    *next = at;
                    match memo.points.get(at) {
                        Some(&(s, hash)) if s == span => Some(hash),
                        _ => None,
                    }
                });
                found.unwrap_or_else(|| unordered_hash(state, attributes))
            }
            Self::Record { batch, points } => {
                let span = span_in(batch, attributes.point());
                let hash = unordered_hash(state, attributes);
                if let Some(span) = span {
                    // Out-of-order points (hand-made requests) are left out: the list stays
                    // sorted for the readers.
                    if points.last().is_none_or(|&(last, _)| last < span) {
                        points.push((span, hash));
                    }
                }
                hash
            }
        }
    }
}

impl Drop for PointMemo {
    fn drop(&mut self) {
        if let Self::Record { batch, points } = self {
            if !points.is_empty() {
                batch.offer_point_hashes(PointHashes {
                    points: std::mem::take(points),
                });
            }
        }
    }
}

/// Where `point` is in `batch`'s bytes, as `offset << 32 | len`; `None` if it is elsewhere
/// (written by a rewrite).
#[inline]
fn span_in(batch: &Batch, point: &[u8]) -> Option<u64> {
    let bytes = batch.bytes();
    let offset = (point.as_ptr() as usize).checked_sub(bytes.as_ptr() as usize)?;
    if offset.checked_add(point.len())? > bytes.len() {
        return None;
    }
    let offset = u32::try_from(offset).ok()?;
    let len = u32::try_from(point.len()).ok()?;
    Some(u64::from(offset) << 32 | u64::from(len))
}

#[inline]
fn resource_hash(state: &ahash::RandomState, resource: &[u8]) -> u64 {
    unordered_hash(state, wire_attributes(resource))
}

/// The hash of a metric name, as of the `str` it is in valid output (the bytes are hashed
/// as `str` hashes them), without checking it is one: the receivers did.
#[inline]
fn name_hash(state: &ahash::RandomState, name: &[u8]) -> u64 {
    struct AsStr<'a>(&'a [u8]);
    impl std::hash::Hash for AsStr<'_> {
        fn hash<H: std::hash::Hasher>(&self, hasher: &mut H) {
            hasher.write(self.0);
            hasher.write_u8(0xff);
        }
    }
    state.hash_one(AsStr(name))
}

/// What the series of one metric have in common: its resource, scope and name, hashed once
/// per metric rather than once per point.
#[inline]
fn metric_hash(state: &ahash::RandomState, resource: u64, scope: u64, name: u64) -> u64 {
    state.hash_one((resource, scope, name))
}

/// A series' identity from its [`metric_hash`] and its point's attributes. The attribute
/// hash is a sum (order does not matter), so adding the two is as good as hashing them
/// together; the multiply-xorshift (murmur3's finalizer, a bijection) spreads the sum over
/// every bit the series table reads.
#[inline]
fn point_series(state: &ahash::RandomState, metric: u64, attributes: AttributeIter<'_>) -> u64 {
    series_of_point(metric, unordered_hash(state, attributes))
}

/// [`point_series`] from the point's attribute hash.
#[inline]
fn series_of_point(metric: u64, attributes: u64) -> u64 {
    let mut h = metric.wrapping_add(attributes);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn wire_attributes(resource: &[u8]) -> impl Iterator<Item = &[u8]> {
    wire::Fields::new(resource)
        .flatten()
        .filter(|f| f.number == 1 && f.wire_type == 2)
        .map(|f| f.bytes)
}

fn unordered_hash<'a>(state: &ahash::RandomState, items: impl Iterator<Item = &'a [u8]>) -> u64 {
    items.fold(0u64, |acc, item| acc.wrapping_add(state.hash_one(item)))
}

/// Fixed seeds, so a series has the same hash in every pipeline and every run.
pub fn series_hash_state() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x5048_4f45_4e49_5801,
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
    )
}

/// Visits every series in an encoded request, which must be well formed: it is not checked
/// (see [`Visitor::VALIDATE`]); a malformed one gives odd series or an error, never a panic.
pub fn for_each_series(
    state: &ahash::RandomState,
    request: &[u8],
    sink: impl FnMut(u64),
) -> Result<(), wire::WireError> {
    wire::walk(request, &mut SeriesHasher::new(state, sink, PointMemo::Off))
}

/// Where the last processor of a pipeline puts the series of the payload it writes, when it
/// can work them out as it writes (see `Processor::process_metered`): the meter then needs
/// no walk of its own over that payload.
pub struct SeriesSink<'a> {
    state: &'a ahash::RandomState,
    hashes: &'a mut Vec<u64>,
}

impl<'a> SeriesSink<'a> {
    /// A sink putting series hashed with `state` into `hashes`.
    pub fn new(state: &'a ahash::RandomState, hashes: &'a mut Vec<u64>) -> Self {
        Self { state, hashes }
    }

    /// Puts the series of `payload` in the sink by walking it, as a pipeline meter does.
    #[cfg(test)]
    pub(crate) fn walk_payload(&mut self, payload: &Payload) -> Result<(), wire::WireError> {
        let bytes = payload.clone().into_bytes();
        wire::walk(&bytes, &mut self.hasher(payload))
    }

    /// The visitor to tell about the output of a rewrite of `input`, as [`wire::walk`] would
    /// walk it. Points of a shared input it meets unchanged are hashed once for every
    /// pipeline (see [`PointHashes`]).
    pub fn hasher(&mut self, input: &Payload) -> impl Visitor + '_ {
        self.hashes.clear();
        let hashes = &mut *self.hashes;
        SeriesHasher::new(
            self.state,
            move |series| hashes.push(series),
            PointMemo::for_payload(input),
        )
    }
}

/// The meter on one pipeline's output.
pub struct VolumeMeter {
    state: ahash::RandomState,
    window_start: Instant,
    series: SeriesTracker,
    window_points: u64,
    window_bytes: u64,
    handles: MeterHandles,
    /// What a `meter` config adds; `None` skips all of it.
    extra: Option<meter::Extra>,
    pipeline: String,
    /// The series of the request being observed, reused.
    series_scratch: Vec<u64>,
}

struct MeterHandles {
    datapoints: Counter,
    bytes: Counter,
    window_series: Gauge,
    window_estimated: Gauge,
    total_series: Gauge,
    total_estimated: Gauge,
    window_points: Gauge,
    window_bytes: Gauge,
}

impl VolumeMeter {
    pub fn new(pipeline: &str) -> Self {
        let p = pipeline.to_string();
        let handles = MeterHandles {
            datapoints: metrics::counter!(telemetry::PIPELINE_OUTPUT_DATAPOINTS, "pipeline" => p.clone()),
            bytes: metrics::counter!(telemetry::PIPELINE_OUTPUT_BYTES, "pipeline" => p.clone()),
            window_series: metrics::gauge!(telemetry::PIPELINE_OUTPUT_SERIES, "pipeline" => p.clone(), "window" => "10s"),
            window_estimated: metrics::gauge!(telemetry::PIPELINE_OUTPUT_SERIES_ESTIMATED, "pipeline" => p.clone(), "window" => "10s"),
            total_series: metrics::gauge!(telemetry::PIPELINE_OUTPUT_SERIES, "pipeline" => p.clone(), "window" => "total"),
            total_estimated: metrics::gauge!(telemetry::PIPELINE_OUTPUT_SERIES_ESTIMATED, "pipeline" => p.clone(), "window" => "total"),
            window_points: metrics::gauge!(telemetry::PIPELINE_OUTPUT_WINDOW_DATAPOINTS, "pipeline" => p.clone()),
            window_bytes: metrics::gauge!(telemetry::PIPELINE_OUTPUT_WINDOW_BYTES, "pipeline" => p),
        };
        Self {
            state: series_hash_state(),
            window_start: Instant::now(),
            series: SeriesTracker::new(EXACT_SERIES_LIMIT),
            window_points: 0,
            window_bytes: 0,
            handles,
            extra: None,
            pipeline: pipeline.to_string(),
            series_scratch: Vec::new(),
        }
    }

    /// Applies the `meter` config. An equal config changes nothing; a changed one resets only
    /// the measurements whose part of it changed.
    pub fn set_config(&mut self, config: Option<Arc<meter::MeterConfig>>) {
        match (config, &mut self.extra) {
            (None, extra) => *extra = None,
            (Some(config), Some(extra)) => {
                if !Arc::ptr_eq(&config, extra.config()) && *config != **extra.config() {
                    extra.reconfigure(config, false);
                }
            }
            (Some(config), extra @ None) => {
                *extra = Some(meter::Extra::new(&self.pipeline, config));
            }
        }
    }

    /// Accounts one encoded output request.
    pub fn observe(&mut self, request: &[u8], data_points: u64) {
        self.observe_with(request, data_points, PointMemo::Off);
    }

    /// Accounts one output payload and returns its encoding. A batch as received, shared
    /// with other pipelines, has each point's attributes hashed once for all their meters.
    pub fn observe_payload(&mut self, payload: Payload) -> Bytes {
        // A `meter` config walks with a hasher of its own.
        let points = match self.extra {
            None => PointMemo::for_payload(&payload),
            Some(_) => PointMemo::Off,
        };
        let data_points = payload.data_points();
        let bytes = payload.into_bytes();
        self.observe_with(&bytes, data_points, points);
        bytes
    }

    fn observe_with(&mut self, request: &[u8], data_points: u64, points: PointMemo) {
        let tracker = &mut self.series;
        let walked = match &mut self.extra {
            None => {
                // Hashes first, then the inserts in a tight loop: with tens of thousands of
                // series each insert misses the cache, and only independent inserts close
                // together let the processor wait for several misses at once.
                let hashes = &mut self.series_scratch;
                hashes.clear();
                let mut hasher =
                    SeriesHasher::new(&self.state, |series| hashes.push(series), points);
                let walked = wire::walk(request, &mut hasher);
                drop(hasher);
                for &series in hashes.iter() {
                    tracker.insert(series);
                }
                walked
            }
            Some(extra) => extra.walk(&self.state, tracker, request),
        };
        if let Err(err) = walked {
            tracing::warn!(error = %err, "pipeline output could not be metered");
        }
        self.count(request.len(), data_points);
    }

    /// Where the last processor may put the series of the payload it writes next, or `None`
    /// when the meter needs more than series from it (a `meter` config).
    pub fn series_sink(&mut self) -> Option<SeriesSink<'_>> {
        if self.extra.is_some() {
            return None;
        }
        Some(SeriesSink {
            state: &self.state,
            hashes: &mut self.series_scratch,
        })
    }

    /// Accounts one output request of `bytes` bytes whose series the last processor put in
    /// [`VolumeMeter::series_sink`].
    pub fn observe_premetered(&mut self, bytes: usize, data_points: u64) {
        for &series in &self.series_scratch {
            self.series.insert(series);
        }
        self.count(bytes, data_points);
    }

    fn count(&mut self, bytes: usize, data_points: u64) {
        self.window_points += data_points;
        self.window_bytes += bytes as u64;
        self.handles.datapoints.increment(data_points);
        self.handles.bytes.increment(bytes as u64);
    }

    pub fn next_rotation(&self) -> Instant {
        self.window_start + WINDOW
    }

    /// Publishes the finished window once it is over.
    pub fn rotate_if_due(&mut self, now: Instant) {
        if now < self.next_rotation() {
            return;
        }
        let (series, estimated) = self.series.window_count();
        self.handles.window_series.set(series as f64);
        self.handles
            .window_estimated
            .set(f64::from(u8::from(estimated)));
        self.handles.window_points.set(self.window_points as f64);
        self.handles.window_bytes.set(self.window_bytes as f64);
        let (total, estimated) = self.series.total_count();
        self.handles.total_series.set(total as f64);
        self.handles
            .total_estimated
            .set(f64::from(u8::from(estimated)));
        self.series.next_window();
        if let Some(extra) = &mut self.extra {
            extra.rotate();
        }
        self.window_points = 0;
        self.window_bytes = 0;
        // Windows stay aligned to the first one even if a rotation was late.
        while self.window_start + WINDOW <= now {
            self.window_start += WINDOW;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::testdata;
    use prost::Message;

    fn series_of(
        request: &crate::otlp::ExportMetricsServiceRequest,
    ) -> std::collections::HashSet<u64> {
        let mut set = std::collections::HashSet::new();
        let bytes = request.encode_to_vec();
        for_each_series(&series_hash_state(), &bytes, |s| {
            set.insert(s);
        })
        .unwrap();
        set
    }

    #[test]
    fn every_distinct_point_identity_is_one_series() {
        // 3 resources x 4 metrics x 5 attribute values
        assert_eq!(series_of(&testdata::request(3, 4, 5)).len(), 60);
    }

    #[test]
    fn the_same_series_twice_counts_once_and_attribute_order_does_not_matter() {
        let mut request = testdata::request(1, 1, 1);
        let mut swapped = request.clone();
        let rm = &mut swapped.resource_metrics[0];
        rm.resource.as_mut().unwrap().attributes.reverse();
        request.resource_metrics.extend(swapped.resource_metrics);
        assert_eq!(series_of(&request).len(), 1);
    }

    #[test]
    fn point_hashes_are_left_for_other_pipelines_and_count_the_same() {
        let request = testdata::request(3, 4, 5);
        let bytes = bytes::Bytes::from(request.encode_to_vec());
        let batch = || Arc::new(Batch::from_validated(bytes.clone(), 60));

        let alone = batch();
        let only = PointMemo::for_batch(&alone);
        assert!(
            matches!(only, PointMemo::Off),
            "no other pipeline to leave them for"
        );
        let other = Arc::clone(&alone);
        let shared_with_other = PointMemo::for_batch(&alone);
        assert!(matches!(shared_with_other, PointMemo::Record { .. }));
        drop((shared_with_other, other));
        assert!(
            alone.point_hashes().is_none(),
            "nothing recorded, nothing left"
        );

        let shared = batch();
        let (mut baseline, mut candidate) = (VolumeMeter::new("a"), VolumeMeter::new("b"));
        let held = Arc::clone(&shared);
        baseline.observe_payload(Payload::Shared(Arc::clone(&shared)));
        let left = shared.point_hashes().expect("left for the candidate");
        assert_eq!(left.points.len(), 60);
        assert!(left.points.windows(2).all(|w| w[0].0 < w[1].0));
        candidate.observe_payload(Payload::Shared(held));
        for meter in [&mut baseline, &mut candidate] {
            assert_eq!(meter.series.window_count(), (60, false));
        }
    }

    #[test]
    fn windows_count_their_own_series_and_totals_accumulate() {
        let state = series_hash_state();
        let mut tracker = SeriesTracker::new(1000);
        for s in [1u64, 2, 3, 2, 1] {
            tracker.insert(state.hash_one(s));
        }
        assert_eq!(tracker.window_count(), (3, false));
        tracker.next_window();
        assert_eq!(tracker.window_count(), (0, false));
        for s in [3u64, 4, 3] {
            tracker.insert(state.hash_one(s));
        }
        assert_eq!(tracker.window_count(), (2, false));
        assert_eq!(tracker.total_count(), (4, false));
    }

    /// Window stamps are 8 bits: when they come round again, a series last seen 255 windows
    /// ago must not count as seen in the new window.
    #[test]
    fn reused_window_stamps_do_not_count_old_series() {
        let state = series_hash_state();
        let mut tracker = SeriesTracker::new(100_000);
        let (old, steady) = (state.hash_one(1u64), state.hash_one(2u64));
        tracker.insert(old);
        for window in 1..=600 {
            tracker.next_window();
            tracker.insert(steady);
            if window % 255 == 0 || window % 256 == 0 {
                tracker.insert(old);
                assert_eq!(tracker.window_count(), (2, false), "window {window}");
            } else {
                assert_eq!(tracker.window_count(), (1, false), "window {window}");
            }
        }
        assert_eq!(tracker.total_count(), (2, false));
        // Many series, across a wrap: exact.
        for i in 0..50_000u64 {
            tracker.insert(state.hash_one(i + 10));
        }
        assert_eq!(tracker.total_count(), (50_002, false));
    }

    #[test]
    fn exact_counting_switches_to_an_estimate_past_the_limit() {
        let mut tracker = SeriesTracker::new(1000);
        let state = series_hash_state();
        for i in 0..1000u64 {
            tracker.insert(state.hash_one(i));
        }
        assert_eq!(tracker.total_count(), (1000, false));
        tracker.next_window();
        for i in 500..20_000u64 {
            tracker.insert(state.hash_one(i));
        }
        let within = |(n, estimated): (u64, bool), expected: f64| {
            assert!(estimated);
            let error = (n as f64 - expected).abs() / expected;
            assert!(error < 0.05, "estimate {n} is {error:.3} off {expected}");
        };
        within(tracker.total_count(), 20_000.0);
        within(tracker.window_count(), 19_500.0);
        tracker.next_window();
        tracker.insert(state.hash_one(7u64));
        assert_eq!(tracker.window_count().0, 1);
    }
}
