//! OTLP itself: the shared batch that fans out to pipelines, the payload a processor sees,
//! the lean wire walk and a gRPC codec that keeps requests as bytes.

pub mod codec;
pub mod rewrite;
pub mod testdata;
pub mod wire;

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
pub use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;

use crate::stats::PointHashes;

/// One received request, shared read-only by every pipeline it fans out to.
///
/// The encoded bytes always exist; the decoded form is made at most once, when the first
/// pipeline that changes data asks for it.
#[derive(Debug)]
pub struct Batch {
    bytes: Bytes,
    data_points: u64,
    decoded: OnceLock<Result<ExportMetricsServiceRequest, prost::DecodeError>>,
    /// The attribute hash of each data point, left by the first pipeline meter to walk the
    /// batch for the meters of the others.
    point_hashes: OnceLock<PointHashes>,
}

impl Batch {
    /// A batch from bytes already validated by [`wire::count`].
    pub fn from_validated(bytes: Bytes, data_points: u64) -> Self {
        Self {
            bytes,
            data_points,
            decoded: OnceLock::new(),
            point_hashes: OnceLock::new(),
        }
    }

    /// A batch from a decoded request, for receivers that produce structs.
    pub fn from_request(request: ExportMetricsServiceRequest) -> Self {
        let bytes = Bytes::from(request.encode_to_vec());
        let data_points = data_points(&request);
        let decoded = OnceLock::new();
        let _ = decoded.set(Ok(request));
        Self {
            bytes,
            data_points,
            decoded,
            point_hashes: OnceLock::new(),
        }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn data_points(&self) -> u64 {
        self.data_points
    }

    /// Decodes once; later callers share the result.
    /// The decoded request, taken if already decoded, decoded otherwise.
    pub fn into_request(self) -> Result<ExportMetricsServiceRequest, prost::DecodeError> {
        match self.decoded.into_inner() {
            Some(decoded) => decoded,
            None => ExportMetricsServiceRequest::decode(self.bytes),
        }
    }

    /// The hashes of its points a pipeline meter left, if one did.
    pub fn point_hashes(&self) -> Option<&PointHashes> {
        self.point_hashes.get()
    }

    /// Leaves the hashes of its points for the other pipelines; the first offer stays.
    pub fn offer_point_hashes(&self, hashes: PointHashes) {
        let _ = self.point_hashes.set(hashes);
    }

    pub fn decoded(&self) -> Result<&ExportMetricsServiceRequest, prost::DecodeError> {
        self.decoded
            .get_or_init(|| ExportMetricsServiceRequest::decode(self.bytes.clone()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// What flows between the stages of one pipeline.
///
/// Fan-out shares a batch; a processor that changes data takes a private copy of the decoded
/// form (copy on write), and a processor that only regroups bytes never decodes.
#[derive(Debug, Clone)]
pub enum Payload {
    Shared(Arc<Batch>),
    Decoded(ExportMetricsServiceRequest),
    Encoded { bytes: Bytes, data_points: u64 },
}

impl Payload {
    pub fn data_points(&self) -> u64 {
        match self {
            Payload::Shared(batch) => batch.data_points(),
            Payload::Decoded(request) => data_points(request),
            Payload::Encoded { data_points, .. } => *data_points,
        }
    }

    /// The decoded request, owned: a copy when the batch is shared.
    pub fn into_request(self) -> Result<ExportMetricsServiceRequest, prost::DecodeError> {
        match self {
            // The last holder of a batch (the other pipelines are done with it) takes its
            // decoded form instead of copying it: a large tree's copy and drop are most of a
            // decoding pipeline's allocations.
            Payload::Shared(batch) => match Arc::try_unwrap(batch) {
                Ok(batch) => batch.into_request(),
                Err(shared) => shared.decoded().cloned(),
            },
            Payload::Decoded(request) => Ok(request),
            Payload::Encoded { bytes, .. } => ExportMetricsServiceRequest::decode(bytes),
        }
    }

    /// The request as OTLP protobuf bytes: free unless the payload was changed.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Shared(batch) => batch.bytes().clone(),
            Payload::Decoded(request) => Bytes::from(request.encode_to_vec()),
            Payload::Encoded { bytes, .. } => bytes,
        }
    }

    /// Appends the encoded request to `buf`. Concatenated `ExportMetricsServiceRequest`s are
    /// one valid request holding all their resources, which is what makes batching cheap.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        match self {
            Payload::Shared(batch) => buf.extend_from_slice(batch.bytes()),
            Payload::Decoded(request) => {
                buf.reserve(request.encoded_len());
                // Encoding into a BytesMut with reserved room cannot fail.
                let _ = request.encode(buf);
            }
            Payload::Encoded { bytes, .. } => buf.extend_from_slice(bytes),
        }
    }
}

/// Number of data points in a decoded request.
pub fn data_points(request: &ExportMetricsServiceRequest) -> u64 {
    request
        .resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .map(|m| metric_data_points(m.data.as_ref()) as u64)
        .sum()
}

/// Number of data points of one metric.
pub fn metric_data_points(data: Option<&Data>) -> usize {
    match data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

/// Drops scopes without metrics and resources without scopes, as the Collector's filter does.
pub fn prune_empty(request: &mut ExportMetricsServiceRequest) {
    for rm in &mut request.resource_metrics {
        for sm in &mut rm.scope_metrics {
            sm.metrics
                .retain(|m| metric_data_points(m.data.as_ref()) > 0);
        }
        rm.scope_metrics.retain(|sm| !sm.metrics.is_empty());
    }
    request
        .resource_metrics
        .retain(|rm| !rm.scope_metrics.is_empty());
}
