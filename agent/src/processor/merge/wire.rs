//! The engine's entry for encoded requests: number points are merged straight off the wire.
//!
//! Decoding a request into prost's tree of small allocations, and freeing it, costs more
//! than merging its points (most of the decoded path's time goes to the allocator). Here a
//! member's fingerprint is computed from the encoded attributes, equal to the one the decoded
//! path computes from the decoded attributes ([`hash_scalar`] is shared), so a series is the
//! same member whichever way its request came in. Only what the engine must keep is decoded:
//! the resource, scope and point attributes of a member seen for the first time, and the
//! points it passes on unmerged.
//!
//! What the wire pass does not handle the way a decoder would is handed to the decoded path
//! at the smallest unit not yet merged: a metric that is not a gauge or a sum (histograms
//! and summaries), or whose fields are not laid out as one data field with well-typed points;
//! a scope message given twice or with a name that is not UTF-8; a resource given twice.

use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, Metric, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::{
    hash_scalar, AddContext, Aggregator, Fp, FpHasher, Kind, Num, NumberParts, Projection, Scalar,
};
use crate::otlp::rewrite::{
    KeyValueRef, Span, Spans, Value, DATA_POINTS, METRIC_EXPONENTIAL_HISTOGRAM, METRIC_GAUGE,
    METRIC_HISTOGRAM, METRIC_NAME, METRIC_SUM, METRIC_SUMMARY, REQUEST_RESOURCE_METRICS,
    RESOURCE_ATTRIBUTES, RESOURCE_METRICS_RESOURCE, RESOURCE_METRICS_SCOPE_METRICS,
    SCOPE_METRICS_METRICS, WT_I64, WT_LEN, WT_VARINT,
};
use crate::otlp::wire::WireError;

// Field numbers from opentelemetry/proto/{metrics,common}/v1 that `rewrite` does not name.
const SCOPE_METRICS_SCOPE: u32 = 1;
const SCOPE_NAME: u32 = 1;
const SCOPE_VERSION: u32 = 2;
const METRIC_DESCRIPTION: u32 = 2;
const METRIC_UNIT: u32 = 3;
const SUM_TEMPORALITY: u32 = 2;
const SUM_MONOTONIC: u32 = 3;
const POINT_START_TIME: u32 = 2;
const POINT_TIME: u32 = 3;
const POINT_AS_DOUBLE: u32 = 4;
const POINT_EXEMPLARS: u32 = 5;
const POINT_AS_INT: u32 = 6;
const POINT_ATTRIBUTES: u32 = 7;
const POINT_FLAGS: u32 = 8;
const ARRAY_VALUES: u32 = 1;
const KVLIST_VALUES: u32 = 1;
const TEMPORALITY_DELTA: u64 = 1;

/// Something the wire pass leaves to the decoded path (see the module docs).
struct Fallback;

impl From<WireError> for Fallback {
    fn from(_: WireError) -> Self {
        Fallback
    }
}

/// One number point of the metric being merged, read in a first pass.
struct WirePoint<'a> {
    /// The encoded `NumberDataPoint`, for its attributes if they must be decoded.
    encoded: &'a [u8],
    parts: NumberParts,
    fp: Fp,
    /// Its member and output existed when the scope was read. Members are never removed
    /// while merging, so `true` stays true; `false` may have become true since.
    present: bool,
}

/// One metric of a scope, as the first pass read it; `read` is `None` for a metric left to
/// the decoded path.
struct WireMetric<'a> {
    encoded: &'a [u8],
    read: Option<ReadMetric<'a>>,
}

/// What the merge needs of a gauge or sum read off the wire.
struct ReadMetric<'a> {
    name: &'a str,
    description: &'a str,
    unit: &'a str,
    kind: Kind,
    cumulative_input: bool,
    metric_fp: Fp,
    base: Fp,
    /// Its points in [`Work::points`].
    points: std::ops::Range<usize>,
}

/// Buffers reused from one scope to the next within a request.
#[derive(Default)]
struct Work<'a> {
    metrics: Vec<WireMetric<'a>>,
    points: Vec<WirePoint<'a>>,
}

/// Unmerged points of one `ResourceMetrics`, by scope index, in input order.
type Leftovers = Vec<(usize, Metric)>;

fn utf8(bytes: &[u8]) -> Result<&str, Fallback> {
    std::str::from_utf8(bytes).map_err(|_| Fallback)
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, WireError> {
    M::decode(bytes).map_err(|_| WireError::Truncated("message that does not decode"))
}

/// Hashes an encoded `AnyValue` as [`super::hash_value`] hashes the decoded one.
fn hash_wire_value(h: &mut FpHasher, value: Value<'_>) -> Result<(), Fallback> {
    use std::hash::{Hash, Hasher};
    match value {
        Value::Empty => hash_scalar(h, Scalar::Empty),
        Value::String(s) => hash_scalar(h, Scalar::Str(utf8(s)?)),
        Value::Bool(b) => hash_scalar(h, Scalar::Bool(b)),
        Value::Int(i) => hash_scalar(h, Scalar::Int(i)),
        Value::Double(d) => hash_scalar(h, Scalar::Double(d)),
        Value::Bytes(b) => hash_scalar(h, Scalar::Bytes(b)),
        Value::StringStrindex(i) => hash_scalar(h, Scalar::Strindex(i)),
        Value::Array(array) => {
            h.write_u8(5);
            h.write_usize(count_fields(array, ARRAY_VALUES)?);
            for field in Spans::new(array) {
                let field = field?;
                if field.number == ARRAY_VALUES {
                    field.expect_len()?;
                    hash_wire_value(h, Value::parse(field.body)?)?;
                }
            }
        }
        Value::Kvlist(list) => {
            h.write_u8(6);
            h.write_usize(count_fields(list, KVLIST_VALUES)?);
            for field in Spans::new(list) {
                let field = field?;
                if field.number == KVLIST_VALUES {
                    field.expect_len()?;
                    let kv = KeyValueRef::parse(field.body)?;
                    utf8(kv.key)?.hash(h);
                    hash_wire_value(h, kv.value()?)?;
                }
            }
        }
    }
    Ok(())
}

fn count_fields(message: &[u8], number: u32) -> Result<usize, Fallback> {
    let mut n = 0;
    for field in Spans::new(message) {
        n += usize::from(field?.number == number);
    }
    Ok(n)
}

/// The field with this number; `Fallback` if it appears more than once (a decoder would merge
/// the occurrences).
fn single<'a>(message: &'a [u8], number: u32) -> Result<Option<Span<'a>>, Fallback> {
    let mut found = None;
    for field in Spans::new(message) {
        let field = field?;
        if field.number == number {
            if found.is_some() {
                return Err(Fallback);
            }
            field.expect_len()?;
            found = Some(field);
        }
    }
    Ok(found)
}

/// The last occurrence of a string field, as a decoder keeps it.
fn last_string(message: &[u8], number: u32) -> Result<&str, Fallback> {
    let mut value: &[u8] = &[];
    for field in Spans::new(message) {
        let field = field?;
        if field.number == number {
            field.expect_len()?;
            value = field.body;
        }
    }
    utf8(value)
}

impl Aggregator {
    /// [`Aggregator::add`] for every metric of an encoded request, without decoding what
    /// merges. Returns the points the caller must pass on unmerged, under their resource and
    /// scope. An error means a part of the request did not decode; what came before it in
    /// the request is merged.
    pub fn add_encoded(
        &mut self,
        request: &[u8],
        projection: &dyn Projection,
    ) -> Result<Vec<ResourceMetrics>, WireError> {
        let before = self.counts;
        let mut leftovers = Vec::new();
        let mut work = Work::default();
        let mut result = Ok(());
        for field in Spans::new(request) {
            let added = field.and_then(|field| {
                if field.number != REQUEST_RESOURCE_METRICS {
                    return Ok(());
                }
                field.expect_len()?;
                self.add_resource_metrics(field.body, projection, &mut work, &mut leftovers)
            });
            if let Err(err) = added {
                result = Err(err);
                break;
            }
        }
        self.telemetry
            .publish(&before, &self.counts, self.tracked_series());
        result.map(|()| leftovers)
    }

    fn add_resource_metrics<'a>(
        &mut self,
        encoded: &'a [u8],
        projection: &dyn Projection,
        work: &mut Work<'a>,
        out: &mut Vec<ResourceMetrics>,
    ) -> Result<(), WireError> {
        let fingerprint = |this: &Self| -> Result<_, Fallback> {
            let resource = single(encoded, RESOURCE_METRICS_RESOURCE)?.map_or(&[][..], |f| f.body);
            Ok((
                resource,
                this.wire_attributes(resource, RESOURCE_ATTRIBUTES)?,
            ))
        };
        let Ok((resource, resource_fp)) = fingerprint(self) else {
            return self.add_decoded_resource_metrics(encoded, projection, out);
        };
        let mut decoded_resource: Option<Resource> = None;
        let mut leftovers: Leftovers = Vec::new();
        let mut scope_index = 0;
        for field in Spans::new(encoded) {
            let field = field?;
            if field.number != RESOURCE_METRICS_SCOPE_METRICS {
                continue;
            }
            field.expect_len()?;
            let scope = Scope {
                index: scope_index,
                encoded: field.body,
                resource,
                resource_fp,
            };
            scope_index += 1;
            self.add_scope_metrics(
                &scope,
                &mut decoded_resource,
                projection,
                work,
                &mut leftovers,
            )?;
        }
        if !leftovers.is_empty() {
            out.push(with_leftovers(decode(encoded)?, leftovers));
        }
        Ok(())
    }

    /// The decoded path for a whole `ResourceMetrics`.
    fn add_decoded_resource_metrics(
        &mut self,
        encoded: &[u8],
        projection: &dyn Projection,
        out: &mut Vec<ResourceMetrics>,
    ) -> Result<(), WireError> {
        let mut rm: ResourceMetrics = decode(encoded)?;
        let no_scope = InstrumentationScope::default();
        let resource = rm.resource.take().unwrap_or_default();
        for sm in &mut rm.scope_metrics {
            let scope = sm.scope.as_ref().unwrap_or(&no_scope);
            for metric in &mut sm.metrics {
                self.add_metric(&resource, scope, metric, projection);
            }
        }
        rm.resource = Some(resource);
        let mut request = crate::otlp::ExportMetricsServiceRequest {
            resource_metrics: vec![rm],
        };
        crate::otlp::prune_empty(&mut request);
        out.extend(request.resource_metrics);
        Ok(())
    }

    fn add_scope_metrics<'a>(
        &mut self,
        scope: &Scope<'a>,
        decoded_resource: &mut Option<Resource>,
        projection: &dyn Projection,
        work: &mut Work<'a>,
        leftovers: &mut Leftovers,
    ) -> Result<(), WireError> {
        let fingerprint = |this: &Self| -> Result<_, Fallback> {
            let encoded = single(scope.encoded, SCOPE_METRICS_SCOPE)?.map_or(&[][..], |f| f.body);
            let name = last_string(encoded, SCOPE_NAME)?;
            let version = last_string(encoded, SCOPE_VERSION)?;
            Ok((encoded, this.fingerprints.scope(name, version)))
        };
        let Ok((scope_encoded, scope_fp)) = fingerprint(self) else {
            let ScopeMetrics {
                scope: decoded_scope,
                metrics,
                ..
            } = decode(scope.encoded)?;
            let resource = resource_of(decoded_resource, scope.resource)?;
            let decoded_scope = decoded_scope.unwrap_or_default();
            for mut metric in metrics {
                self.add_metric(resource, &decoded_scope, &mut metric, projection);
                keep_if_any(scope.index, metric, leftovers);
            }
            return Ok(());
        };

        // First pass: read every metric of the scope and fingerprint its points. Nothing is
        // merged yet, so a metric the wire pass cannot read goes whole to the decoded path.
        work.metrics.clear();
        work.points.clear();
        for field in Spans::new(scope.encoded) {
            let field = field?;
            if field.number != SCOPE_METRICS_METRICS {
                continue;
            }
            field.expect_len()?;
            let first = work.points.len();
            let read = self
                .read_wire_metric(field.body, scope.resource_fp, scope_fp, &mut work.points)
                .ok();
            if read.is_none() {
                work.points.truncate(first);
            }
            work.metrics.push(WireMetric {
                encoded: field.body,
                read,
            });
        }

        // Second pass: look every member and its output up in a tight loop. With tens of
        // thousands of members each lookup misses the cache; independent lookups close
        // together wait for their misses at once, and the merge then finds them in cache.
        for point in &mut work.points {
            point.present = self
                .members
                .get(&point.fp)
                .is_some_and(|m| self.outputs.contains_key(&m.output));
        }

        // Third pass: merge, metric by metric, in order.
        let mut decoded_scope: Option<InstrumentationScope> = None;
        for metric in &work.metrics {
            let at = MetricAt {
                encoded: metric.encoded,
                scope_encoded,
                scope_fp,
            };
            match &metric.read {
                Some(read) => {
                    let points = work.points.get(read.points.clone()).unwrap_or_default();
                    self.merge_wire_metric(
                        scope,
                        &at,
                        read,
                        points,
                        (decoded_resource, &mut decoded_scope),
                        projection,
                        leftovers,
                    )?;
                }
                None => {
                    let mut decoded: Metric = decode(metric.encoded)?;
                    let resource = resource_of(decoded_resource, scope.resource)?;
                    let scope_ref = scope_of(&mut decoded_scope, scope_encoded)?;
                    self.add_metric(resource, scope_ref, &mut decoded, projection);
                    keep_if_any(scope.index, decoded, leftovers);
                }
            }
        }
        Ok(())
    }

    /// Reads one metric's header and points, pushing the points. `Fallback` when it is not
    /// a gauge or a sum, or not laid out as a decoder would read it the same way.
    fn read_wire_metric<'a>(
        &self,
        encoded: &'a [u8],
        resource_fp: Fp,
        scope_fp: Fp,
        points: &mut Vec<WirePoint<'a>>,
    ) -> Result<ReadMetric<'a>, Fallback> {
        let (mut name, mut description, mut unit): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
        let mut data: Option<Span<'a>> = None;
        for field in Spans::new(encoded) {
            let field = field?;
            match field.number {
                METRIC_NAME => name = len_body(&field)?,
                METRIC_DESCRIPTION => description = len_body(&field)?,
                METRIC_UNIT => unit = len_body(&field)?,
                METRIC_GAUGE | METRIC_SUM => {
                    if data.is_some() {
                        return Err(Fallback);
                    }
                    field.expect_len()?;
                    data = Some(field);
                }
                METRIC_HISTOGRAM | METRIC_EXPONENTIAL_HISTOGRAM | METRIC_SUMMARY => {
                    return Err(Fallback)
                }
                _ => {}
            }
        }
        let (name, description, unit) = (utf8(name)?, utf8(description)?, utf8(unit)?);
        let first = points.len();
        // A metric without data has nothing to merge; the decoded path would drop it empty.
        let Some(data) = data else {
            return Ok(ReadMetric {
                name,
                description,
                unit,
                kind: Kind::Gauge,
                cumulative_input: false,
                metric_fp: 0,
                base: 0,
                points: first..first,
            });
        };
        let (kind, cumulative_input) = if data.number == METRIC_GAUGE {
            (Kind::Gauge, false)
        } else {
            let (mut temporality, mut monotonic) = (0, false);
            for field in Spans::new(data.body) {
                let field = field?;
                match field.number {
                    SUM_TEMPORALITY | SUM_MONOTONIC if field.wire_type != WT_VARINT => {
                        return Err(Fallback)
                    }
                    // An enum is an int32: a decoder truncates.
                    SUM_TEMPORALITY => temporality = field.value as u32 as u64,
                    SUM_MONOTONIC => monotonic = field.value != 0,
                    _ => {}
                }
            }
            let kind = if monotonic {
                Kind::Counter
            } else {
                Kind::UpDown
            };
            (kind, temporality != TEMPORALITY_DELTA)
        };
        let metric_fp = self.fingerprints.metric(name, unit, kind);
        let base = self.fingerprints.base(resource_fp, scope_fp, metric_fp);
        for field in Spans::new(data.body) {
            let field = field?;
            if field.number != DATA_POINTS {
                continue;
            }
            field.expect_len()?;
            points.push(self.wire_point(field.body, base)?);
        }
        Ok(ReadMetric {
            name,
            description,
            unit,
            kind,
            cumulative_input,
            metric_fp,
            base,
            points: first..points.len(),
        })
    }

    /// Merges the points of one metric read by [`Aggregator::read_wire_metric`].
    #[allow(clippy::too_many_arguments)]
    fn merge_wire_metric(
        &mut self,
        scope: &Scope<'_>,
        metric: &MetricAt<'_>,
        read: &ReadMetric<'_>,
        points: &[WirePoint<'_>],
        decoded: (&mut Option<Resource>, &mut Option<InstrumentationScope>),
        projection: &dyn Projection,
        leftovers: &mut Leftovers,
    ) -> Result<(), WireError> {
        if points.is_empty() {
            return Ok(());
        }
        let present = |this: &Self, fp: &Fp| {
            this.members
                .get(fp)
                .is_some_and(|m| this.outputs.contains_key(&m.output))
        };
        // A member seen for the first time needs the decoded resource, scope and attributes
        // to make its output series.
        let decode_needed = points.iter().any(|p| !p.present);
        let no_scope = InstrumentationScope::default();
        let (decoded_resource, decoded_scope) = decoded;
        let (resource, scope_ref): (&[KeyValue], &InstrumentationScope) = if decode_needed {
            let resource = resource_of(decoded_resource, scope.resource)?;
            let scope_ref = scope_of(decoded_scope, metric.scope_encoded)?;
            (&resource.attributes, scope_ref)
        } else {
            (&[], &no_scope)
        };
        let mut ctx = AddContext {
            resource,
            projection,
            kind: read.kind,
            cumulative_input: read.cumulative_input,
            base: read.base,
            scope: (metric.scope_fp, scope_ref),
            metric: (read.metric_fp, read.name, read.description, read.unit),
            output_resource: None,
            track: false,
        };
        let mut unmerged: Vec<usize> = Vec::new();
        for (index, point) in points.iter().enumerate() {
            let outcome = match point.parts.mergeable(read.kind) {
                Err(outcome) => outcome,
                Ok(value) => {
                    // Members are never removed while merging: only a point whose member
                    // was absent when the scope was read can be new.
                    let attributes = if !point.present && !present(self, &point.fp) {
                        point_attributes(point.encoded)
                    } else {
                        Vec::new()
                    };
                    self.merge_number(&mut ctx, point.parts, value, point.fp, &attributes)
                }
            };
            if self.count(outcome) {
                unmerged.push(index);
            }
        }
        if !unmerged.is_empty() {
            // Rare (state full): decode the metric and keep the points left over.
            let mut decoded: Metric = decode(metric.encoded)?;
            retain_points(&mut decoded, &unmerged);
            keep_if_any(scope.index, decoded, leftovers);
        }
        Ok(())
    }

    /// Reads one encoded `NumberDataPoint` and fingerprints its member.
    fn wire_point<'a>(&self, encoded: &'a [u8], base: Fp) -> Result<WirePoint<'a>, Fallback> {
        let mut parts = NumberParts {
            flags: 0,
            value: None,
            start: 0,
            time: 0,
        };
        let mut sum: Fp = 0;
        let mut n = 0u64;
        for field in Spans::new(encoded) {
            let field = field?;
            let expected = match field.number {
                POINT_ATTRIBUTES | POINT_EXEMPLARS => WT_LEN,
                POINT_START_TIME | POINT_TIME | POINT_AS_DOUBLE | POINT_AS_INT => WT_I64,
                POINT_FLAGS => WT_VARINT,
                _ => continue,
            };
            if field.wire_type != expected {
                return Err(Fallback);
            }
            match field.number {
                POINT_ATTRIBUTES => {
                    sum = sum.wrapping_add(self.wire_attribute(field.body)?);
                    n += 1;
                }
                POINT_START_TIME => parts.start = field.value,
                POINT_TIME => parts.time = field.value,
                POINT_AS_DOUBLE => parts.value = Some(Num::Double(f64::from_bits(field.value))),
                POINT_AS_INT => parts.value = Some(Num::Int(field.value as i64)),
                // uint32 on the wire: a decoder truncates.
                POINT_FLAGS => parts.flags = field.value as u32,
                _ => {}
            }
        }
        let attributes = self.fingerprints.attributes_total(sum, n);
        Ok(WirePoint {
            encoded,
            parts,
            fp: self.fingerprints.member(base, attributes),
            present: false,
        })
    }

    /// [`super::Fingerprinter::attributes`] of the `KeyValue` fields numbered `field`.
    fn wire_attributes(&self, message: &[u8], field: u32) -> Result<Fp, Fallback> {
        let mut sum: Fp = 0;
        let mut n = 0u64;
        for span in Spans::new(message) {
            let span = span?;
            if span.number == field {
                span.expect_len()?;
                sum = sum.wrapping_add(self.wire_attribute(span.body)?);
                n += 1;
            }
        }
        Ok(self.fingerprints.attributes_total(sum, n))
    }

    /// One encoded `KeyValue`'s share of an attributes fingerprint.
    fn wire_attribute(&self, encoded: &[u8]) -> Result<Fp, Fallback> {
        use std::hash::Hash;
        let kv = KeyValueRef::parse(encoded)?;
        let key = utf8(kv.key)?;
        let value = kv.value()?;
        let mut result = Ok(());
        let fp = self.fingerprints.of(|h| {
            key.hash(h);
            result = hash_wire_value(h, value);
        });
        result.map(|()| fp)
    }
}

fn len_body<'a>(field: &Span<'a>) -> Result<&'a [u8], Fallback> {
    field.expect_len()?;
    Ok(field.body)
}

/// Where a `ScopeMetrics` sits and what its resource is.
struct Scope<'a> {
    index: usize,
    encoded: &'a [u8],
    resource: &'a [u8],
    resource_fp: Fp,
}

/// One encoded metric and its scope.
struct MetricAt<'a> {
    encoded: &'a [u8],
    scope_encoded: &'a [u8],
    scope_fp: Fp,
}

fn resource_of<'r>(
    decoded: &'r mut Option<Resource>,
    encoded: &[u8],
) -> Result<&'r Resource, WireError> {
    if decoded.is_none() {
        *decoded = Some(decode(encoded)?);
    }
    decoded.as_ref().ok_or(WireError::Truncated("resource"))
}

fn scope_of<'s>(
    decoded: &'s mut Option<InstrumentationScope>,
    encoded: &[u8],
) -> Result<&'s InstrumentationScope, WireError> {
    if decoded.is_none() {
        *decoded = Some(decode(encoded)?);
    }
    decoded.as_ref().ok_or(WireError::Truncated("scope"))
}

/// The attributes of an encoded point, decoded; an attribute that does not decode is left out
/// (its fingerprint was taken off the wire, so the member is the same either way).
fn point_attributes(encoded: &[u8]) -> Vec<KeyValue> {
    Spans::new(encoded)
        .map_while(Result::ok)
        .filter(|f| f.number == POINT_ATTRIBUTES && f.wire_type == WT_LEN)
        .filter_map(|f| KeyValue::decode(f.body).ok())
        .collect()
}

/// Keeps only the points at `indexes` (ascending) of a gauge or sum.
fn retain_points(metric: &mut Metric, indexes: &[usize]) {
    let mut keep = indexes.iter().copied().peekable();
    let mut index = 0;
    let mut retain = |_: &_| {
        let kept = keep.peek() == Some(&index);
        if kept {
            keep.next();
        }
        index += 1;
        kept
    };
    match metric.data.as_mut() {
        Some(Data::Gauge(g)) => g.data_points.retain(|p| retain(p)),
        Some(Data::Sum(s)) => s.data_points.retain(|p| retain(p)),
        _ => {}
    }
}

fn keep_if_any(scope_index: usize, metric: Metric, leftovers: &mut Leftovers) {
    if crate::otlp::metric_data_points(metric.data.as_ref()) > 0 {
        leftovers.push((scope_index, metric));
    }
}

/// `rm` (decoded) with, in each scope, only the metrics left over for it.
fn with_leftovers(mut rm: ResourceMetrics, leftovers: Leftovers) -> ResourceMetrics {
    let mut by_scope: Vec<Vec<Metric>> = vec![Vec::new(); rm.scope_metrics.len()];
    for (index, metric) in leftovers {
        if let Some(metrics) = by_scope.get_mut(index) {
            metrics.push(metric);
        }
    }
    for (sm, metrics) in rm.scope_metrics.iter_mut().zip(by_scope) {
        sm.metrics = metrics;
    }
    rm.scope_metrics.retain(|sm| !sm.metrics.is_empty());
    rm
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue};
    use opentelemetry_proto::tonic::metrics::v1::{
        number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
        NumberDataPoint, Sum, Summary, SummaryDataPoint,
    };
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::{GaugeFn, MergeSettings, MergeTelemetry, SummaryPolicy, Temporality};
    use super::*;
    use crate::otlp::testdata::{int_attr, string_attr};
    use crate::otlp::ExportMetricsServiceRequest;
    use crate::processor::aggregate::AttributeSelection;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn engine(max_series: usize, temporality: Temporality) -> Aggregator {
        let settings = MergeSettings {
            temporality,
            gauge: GaugeFn::Avg,
            overrides: Vec::new(),
            stale_after: Duration::from_secs(30),
            max_series,
            count_series: false,
            summaries: SummaryPolicy::Pass,
        };
        Aggregator::new(
            Arc::new(settings),
            MergeTelemetry::new("test", "aggregate"),
            T0,
        )
    }

    /// The decoded path, as the `aggregate` processor runs it on a decoded request.
    fn add_decoded(
        agg: &mut Aggregator,
        mut request: ExportMetricsServiceRequest,
        projection: &dyn Projection,
    ) -> Vec<ResourceMetrics> {
        let (no_resource, no_scope) = (Resource::default(), InstrumentationScope::default());
        for rm in &mut request.resource_metrics {
            let resource = rm.resource.as_ref().unwrap_or(&no_resource);
            for sm in &mut rm.scope_metrics {
                let scope = sm.scope.as_ref().unwrap_or(&no_scope);
                for metric in &mut sm.metrics {
                    agg.add(resource, scope, metric, projection);
                }
            }
        }
        crate::otlp::prune_empty(&mut request);
        request.resource_metrics
    }

    fn number(
        attributes: Vec<KeyValue>,
        value: number_data_point::Value,
        start: u64,
        time: u64,
    ) -> NumberDataPoint {
        NumberDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: time,
            value: Some(value),
            ..Default::default()
        }
    }

    fn metric(name: &str, data: Data) -> Metric {
        Metric {
            name: name.into(),
            unit: "1".into(),
            description: format!("about {name}"),
            data: Some(data),
            ..Default::default()
        }
    }

    /// A process-like request: counters that only go up except on restarts, gauges, deltas,
    /// odd values, array attributes, missing resources and scopes, and metric types the wire
    /// pass leaves to the decoded path.
    fn random_request(
        rng: &mut StdRng,
        step: u64,
        counters: &mut ahash::AHashMap<(i64, &'static str), (u64, i64)>,
    ) -> ExportMetricsServiceRequest {
        let time = T0 + step * SEC;
        let mut resource_metrics = Vec::new();
        for _ in 0..rng.random_range(1..4) {
            let pid: i64 = rng.random_range(1..8);
            let mut attributes = vec![
                string_attr("host.name", &format!("h{}", pid % 2)),
                int_attr("process.pid", pid),
            ];
            if pid % 3 == 0 {
                attributes.push(KeyValue {
                    key: "process.command_args".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::ArrayValue(ArrayValue {
                            values: vec![AnyValue {
                                value: Some(any_value::Value::StringValue(format!("--id={pid}"))),
                            }],
                        })),
                    }),
                    ..Default::default()
                });
            }
            let resource = (pid != 7).then(|| Resource {
                attributes,
                ..Default::default()
            });
            let scope = match rng.random_range(0..3) {
                0 => None,
                n => Some(InstrumentationScope {
                    name: format!("scope{n}"),
                    version: "1".into(),
                    ..Default::default()
                }),
            };
            let mut metrics = Vec::new();
            let mut cpu = Vec::new();
            for state in ["user", "system"] {
                let entry = counters.entry((pid, state)).or_insert((time, 0));
                if rng.random_bool(0.05) {
                    *entry = (time, rng.random_range(0..5));
                } else {
                    entry.1 += rng.random_range(0..10);
                }
                let value = if rng.random_bool(0.5) {
                    number_data_point::Value::AsInt(entry.1)
                } else {
                    number_data_point::Value::AsDouble(entry.1 as f64)
                };
                cpu.push(number(
                    vec![string_attr("state", state)],
                    value,
                    entry.0,
                    time,
                ));
            }
            metrics.push(metric(
                "process.cpu.time",
                Data::Sum(Sum {
                    data_points: cpu,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
            ));
            let memory = match rng.random_range(0..10) {
                0 => f64::NAN,
                _ => rng.random_range(0.0..100.0),
            };
            let mut gauge_point =
                number(vec![], number_data_point::Value::AsDouble(memory), 0, time);
            if rng.random_bool(0.05) {
                gauge_point.flags = 1;
            }
            metrics.push(metric(
                "process.memory.usage",
                Data::Gauge(Gauge {
                    data_points: vec![gauge_point],
                }),
            ));
            metrics.push(metric(
                "process.threads",
                Data::Sum(Sum {
                    data_points: vec![number(
                        vec![],
                        number_data_point::Value::AsInt(rng.random_range(1..20)),
                        0,
                        time,
                    )],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: false,
                }),
            ));
            metrics.push(metric(
                "requests",
                Data::Sum(Sum {
                    data_points: vec![number(
                        vec![int_attr("code", rng.random_range(200..202))],
                        number_data_point::Value::AsInt(rng.random_range(-1..5)),
                        time - SEC,
                        time,
                    )],
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    is_monotonic: true,
                }),
            ));
            if rng.random_bool(0.3) {
                let bounds = if rng.random_bool(0.8) {
                    vec![1.0, 5.0]
                } else {
                    vec![2.0]
                };
                let mut bucket_counts = vec![0; bounds.len() + 1];
                bucket_counts[0] = step;
                metrics.push(metric(
                    "latency",
                    Data::Histogram(Histogram {
                        data_points: vec![HistogramDataPoint {
                            start_time_unix_nano: T0,
                            time_unix_nano: time,
                            count: step,
                            sum: Some(step as f64),
                            bucket_counts,
                            explicit_bounds: bounds,
                            ..Default::default()
                        }],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    }),
                ));
            }
            if rng.random_bool(0.1) {
                metrics.push(metric(
                    "quantiles",
                    Data::Summary(Summary {
                        data_points: vec![SummaryDataPoint {
                            time_unix_nano: time,
                            count: 1,
                            ..Default::default()
                        }],
                    }),
                ));
            }
            resource_metrics.push(ResourceMetrics {
                resource,
                scope_metrics: vec![ScopeMetrics {
                    scope,
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        ExportMetricsServiceRequest { resource_metrics }
    }

    /// Emitted series in a canonical order: engines group them by fingerprint, which is
    /// seeded per engine.
    fn sorted(mut emitted: Vec<ResourceMetrics>) -> Vec<ResourceMetrics> {
        let key = |m: &dyn std::fmt::Debug| format!("{m:?}");
        for rm in &mut emitted {
            for sm in &mut rm.scope_metrics {
                for metric in &mut sm.metrics {
                    // Means and sums of doubles depend on the order members are visited in.
                    let round = |points: &mut Vec<NumberDataPoint>| {
                        for p in points.iter_mut() {
                            if let Some(number_data_point::Value::AsDouble(d)) = &mut p.value {
                                *d = (*d * 1e6).round() / 1e6;
                            }
                        }
                        points.sort_by_key(|p| key(&p.attributes));
                    };
                    match metric.data.as_mut() {
                        Some(Data::Sum(s)) => round(&mut s.data_points),
                        Some(Data::Gauge(g)) => round(&mut g.data_points),
                        Some(Data::Histogram(h)) => {
                            h.data_points.sort_by_key(|p| key(&p.attributes))
                        }
                        _ => {}
                    }
                }
                sm.metrics.sort_by_key(|m| m.name.clone());
            }
            rm.scope_metrics.sort_by_key(|sm| key(&sm.scope));
        }
        emitted.sort_by_key(|rm| key(&rm.resource));
        emitted
    }

    /// The wire pass and the decoded path make the same engine state: the same leftovers,
    /// counts and emitted series, interval after interval, also when state runs out.
    #[test]
    fn the_wire_pass_merges_exactly_as_the_decoded_path() {
        let projection =
            AttributeSelection::new(&["host.name".to_string(), "state".to_string()], true);
        let mut passed_on = 0;
        for seed in 0..60u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let max_series = if seed % 3 == 0 { 12 } else { 1000 };
            let temporality = if seed % 2 == 0 {
                Temporality::Cumulative
            } else {
                Temporality::Delta
            };
            let (mut decoded, mut wire) = (
                engine(max_series, temporality),
                engine(max_series, temporality),
            );
            let mut counters = ahash::AHashMap::new();
            for step in 1..80u64 {
                let request = random_request(&mut rng, step, &mut counters);
                let bytes = request.encode_to_vec();
                let from_decoded = add_decoded(&mut decoded, request, &projection);
                let from_wire = wire.add_encoded(&bytes, &projection).unwrap();
                assert_eq!(from_wire, from_decoded, "seed {seed} step {step}");
                passed_on += usize::from(!from_wire.is_empty());
                assert_eq!(wire.counts(), decoded.counts(), "seed {seed} step {step}");
                if step % 7 == 0 {
                    let at = T0 + step * SEC;
                    assert_eq!(
                        sorted(wire.emit(at)),
                        sorted(decoded.emit(at)),
                        "seed {seed} step {step}"
                    );
                }
            }
        }
        // Summaries, and points beyond `max_series`, were passed on.
        assert!(passed_on > 100, "{passed_on}");
    }

    /// Encodings a decoder merges (a resource or scope given twice, two data fields) go the
    /// decoded way and come out as the decoder reads them.
    #[test]
    fn repeated_messages_are_merged_as_a_decoder_merges_them() {
        use crate::otlp::rewrite::put_len_field;
        let projection = AttributeSelection::new(&["host.name".to_string()], true);
        let point = |v: i64| number(vec![], number_data_point::Value::AsInt(v), T0, T0 + SEC);
        let counter = |v: i64| {
            metric(
                "c",
                Data::Sum(Sum {
                    data_points: vec![point(v)],
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    is_monotonic: true,
                }),
            )
        };
        let host = Resource {
            attributes: vec![string_attr("host.name", "h")],
            ..Default::default()
        };
        let pid = Resource {
            attributes: vec![int_attr("process.pid", 1)],
            ..Default::default()
        };
        // ResourceMetrics { resource: host, resource: pid, scope_metrics: { metrics: c(2), c(3) } }
        let mut scope_metrics = Vec::new();
        put_len_field(
            &mut scope_metrics,
            SCOPE_METRICS_METRICS,
            &counter(2).encode_to_vec(),
        );
        put_len_field(
            &mut scope_metrics,
            SCOPE_METRICS_METRICS,
            &counter(3).encode_to_vec(),
        );
        // A metric whose data field comes twice: a decoder merges the points.
        let mut twice = counter(4).encode_to_vec();
        let Some(Data::Sum(sum)) = counter(5).data else {
            unreachable!()
        };
        put_len_field(&mut twice, METRIC_SUM, &sum.encode_to_vec());
        put_len_field(&mut scope_metrics, SCOPE_METRICS_METRICS, &twice);
        let mut rm = Vec::new();
        put_len_field(&mut rm, RESOURCE_METRICS_RESOURCE, &host.encode_to_vec());
        put_len_field(&mut rm, RESOURCE_METRICS_SCOPE_METRICS, &scope_metrics);
        put_len_field(&mut rm, RESOURCE_METRICS_RESOURCE, &pid.encode_to_vec());
        let mut request = Vec::new();
        put_len_field(&mut request, REQUEST_RESOURCE_METRICS, &rm);
        // The same scope metrics under a single resource: the wire pass proper.
        let mut single_rm = Vec::new();
        put_len_field(
            &mut single_rm,
            RESOURCE_METRICS_RESOURCE,
            &host.encode_to_vec(),
        );
        put_len_field(
            &mut single_rm,
            RESOURCE_METRICS_SCOPE_METRICS,
            &scope_metrics,
        );
        put_len_field(&mut request, REQUEST_RESOURCE_METRICS, &single_rm);

        let (mut decoded, mut wire) = (
            engine(1000, Temporality::Delta),
            engine(1000, Temporality::Delta),
        );
        let as_decoded = ExportMetricsServiceRequest::decode(&request[..]).unwrap();
        assert_eq!(
            as_decoded.resource_metrics[0]
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .len(),
            2
        );
        assert!(add_decoded(&mut decoded, as_decoded, &projection).is_empty());
        assert!(wire.add_encoded(&request, &projection).unwrap().is_empty());
        let (from_wire, from_decoded) = (
            sorted(wire.emit(T0 + 10 * SEC)),
            sorted(decoded.emit(T0 + 10 * SEC)),
        );
        assert_eq!(from_wire, from_decoded);
        let total = match &from_wire[0].scope_metrics[0].metrics[0].data {
            Some(Data::Sum(s)) => s.data_points[0].value,
            other => panic!("{other:?}"),
        };
        // 2 + 3 + 4 + 5 under each of the two resources, both projected to host.name=h.
        assert_eq!(total, Some(number_data_point::Value::AsInt(28)));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        use rand::SeedableRng;
        let projection = AttributeSelection::new(&["host.name".to_string()], true);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counters = ahash::AHashMap::new();
        let mut agg = engine(1000, Temporality::Cumulative);
        for step in 0..2000u64 {
            let mut bytes = random_request(&mut rng, step, &mut counters).encode_to_vec();
            crate::otlp::testdata::corrupt(&mut bytes, &mut rng);
            let _ = agg.add_encoded(&bytes, &projection);
        }
        agg.emit(T0 + 3000 * SEC);
    }
}
