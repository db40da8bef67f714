//! `batch`: groups payloads into larger requests by data-point count, with a timeout.
//!
//! Concatenated encoded `ExportMetricsServiceRequest`s are one valid request, so batching
//! forwarded data costs a memcpy and no decode. Only a batch above `send_batch_max_size` is
//! decoded, to be split between metrics or data points; every piece keeps its resource and
//! scope.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, Metric, ResourceMetrics, ScopeMetrics,
};
use serde::Deserialize;
use serde_yaml::Value;

use super::{BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory};
use crate::config::{self, Issue};
use crate::otlp::{self, ExportMetricsServiceRequest, Payload};

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "batch",
    parse,
};

pub const DEFAULT_SEND_BATCH_SIZE: u64 = 8192;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

/// Config of the `batch` processor; the keys and defaults of the Collector's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Data points that trigger a send.
    #[serde(default = "default_send_batch_size")]
    pub send_batch_size: u64,
    /// Longest a data point waits before its batch is sent, full or not.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Upper bound on the data points of one sent request; 0 means no bound. Must be at least
    /// `send_batch_size`.
    #[serde(default)]
    pub send_batch_max_size: u64,
}

fn default_send_batch_size() -> u64 {
    DEFAULT_SEND_BATCH_SIZE
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let config: BatchConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    if config.send_batch_size == 0 {
        issues.push(Issue::new("send_batch_size", "must be greater than 0"));
    }
    if config.timeout.is_zero() {
        issues.push(Issue::new("timeout", "must be greater than 0"));
    }
    if config.send_batch_max_size != 0 && config.send_batch_max_size < config.send_batch_size {
        issues.push(Issue::new(
            "send_batch_max_size",
            format!(
                "must be 0 (no bound) or at least send_batch_size ({})",
                config.send_batch_size
            ),
        ));
    }
    if issues.is_empty() {
        Ok(Arc::new(config))
    } else {
        Err(issues)
    }
}

impl ProcessorConfig for BatchConfig {
    fn reads_decoded(&self) -> bool {
        false
    }

    fn build(&self, _context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        Box::new(Batcher {
            config: self.clone(),
            pending: Vec::new(),
            pending_points: 0,
            oldest: None,
        })
    }
}

pub struct Batcher {
    config: BatchConfig,
    pending: Vec<Payload>,
    pending_points: u64,
    oldest: Option<Instant>,
}

impl Batcher {
    fn emit(&mut self, out: &mut Vec<Payload>) {
        self.oldest = None;
        let points = std::mem::take(&mut self.pending_points);
        let pending = std::mem::take(&mut self.pending);
        let payload = match pending.len() {
            0 => return,
            1 => pending.into_iter().next(),
            _ => {
                let mut buf = BytesMut::new();
                for payload in &pending {
                    payload.encode_into(&mut buf);
                }
                Some(Payload::Encoded {
                    bytes: buf.freeze(),
                    data_points: points,
                })
            }
        };
        let Some(payload) = payload else { return };
        let max = self.config.send_batch_max_size;
        if max == 0 || points <= max {
            out.push(payload);
            return;
        }
        match payload.into_request() {
            Ok(request) => out.extend(split(request, max).into_iter().map(Payload::Decoded)),
            // Every input was validated upstream; a batch that no longer decodes cannot be
            // split, so it goes out whole rather than being lost.
            Err(err) => tracing::error!(error = %err, "batch cannot be decoded for splitting"),
        }
    }
}

impl Processor for Batcher {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        let points = input.data_points();
        self.pending.push(input);
        self.pending_points += points;
        self.oldest.get_or_insert_with(Instant::now);
        if self.pending_points >= self.config.send_batch_size {
            self.emit(out);
        }
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.config.timeout)
    }

    fn on_deadline(&mut self, _now: Instant, out: &mut Vec<Payload>) {
        self.emit(out);
    }

    fn flush(&mut self, out: &mut Vec<Payload>) {
        self.emit(out);
    }
}

/// Splits `request` into requests of at most `max` data points. Each piece repeats the
/// resource and scope of the metrics it holds, so no metric ever loses its identity.
pub fn split(request: ExportMetricsServiceRequest, max: u64) -> Vec<ExportMetricsServiceRequest> {
    let max = max.max(1) as usize;
    let mut chunks = Vec::new();
    let mut current = ExportMetricsServiceRequest::default();
    let mut room = max;
    for rm in request.resource_metrics {
        let mut out_rm = ResourceMetrics {
            resource: rm.resource.clone(),
            scope_metrics: Vec::new(),
            schema_url: rm.schema_url.clone(),
        };
        for sm in rm.scope_metrics {
            let mut out_sm = ScopeMetrics {
                scope: sm.scope.clone(),
                metrics: Vec::new(),
                schema_url: sm.schema_url.clone(),
            };
            for mut metric in sm.metrics {
                loop {
                    let points = otlp::metric_data_points(metric.data.as_ref());
                    if points <= room {
                        room -= points;
                        out_sm.metrics.push(metric);
                        break;
                    }
                    if room > 0 {
                        out_sm.metrics.push(take_points(&mut metric, room));
                    }
                    // Close the full chunk, then continue the same resource and scope.
                    let next_sm = ScopeMetrics {
                        metrics: Vec::new(),
                        ..out_sm.clone_header()
                    };
                    let next_rm = ResourceMetrics {
                        scope_metrics: Vec::new(),
                        ..out_rm.clone_header()
                    };
                    if !out_sm.metrics.is_empty() {
                        out_rm
                            .scope_metrics
                            .push(std::mem::replace(&mut out_sm, next_sm));
                    } else {
                        out_sm = next_sm;
                    }
                    if !out_rm.scope_metrics.is_empty() {
                        current
                            .resource_metrics
                            .push(std::mem::replace(&mut out_rm, next_rm));
                    }
                    if !current.resource_metrics.is_empty() {
                        chunks.push(std::mem::take(&mut current));
                    }
                    room = max;
                }
            }
            if !out_sm.metrics.is_empty() {
                out_rm.scope_metrics.push(out_sm);
            }
        }
        if !out_rm.scope_metrics.is_empty() {
            current.resource_metrics.push(out_rm);
        }
    }
    if !current.resource_metrics.is_empty() {
        chunks.push(current);
    }
    chunks
}

trait CloneHeader {
    fn clone_header(&self) -> Self;
}

impl CloneHeader for ScopeMetrics {
    fn clone_header(&self) -> Self {
        ScopeMetrics {
            scope: self.scope.clone(),
            metrics: Vec::new(),
            schema_url: self.schema_url.clone(),
        }
    }
}

impl CloneHeader for ResourceMetrics {
    fn clone_header(&self) -> Self {
        ResourceMetrics {
            resource: self.resource.clone(),
            scope_metrics: Vec::new(),
            schema_url: self.schema_url.clone(),
        }
    }
}

/// Moves the first `n` data points of `metric` into a new metric with the same identity.
fn take_points(metric: &mut Metric, n: usize) -> Metric {
    fn head<T>(points: &mut Vec<T>, n: usize) -> Vec<T> {
        let rest = points.split_off(n.min(points.len()));
        std::mem::replace(points, rest)
    }
    let data = match metric.data.as_mut() {
        Some(Data::Gauge(g)) => Some(Data::Gauge(
            opentelemetry_proto::tonic::metrics::v1::Gauge {
                data_points: head(&mut g.data_points, n),
            },
        )),
        Some(Data::Sum(s)) => Some(Data::Sum(opentelemetry_proto::tonic::metrics::v1::Sum {
            data_points: head(&mut s.data_points, n),
            aggregation_temporality: s.aggregation_temporality,
            is_monotonic: s.is_monotonic,
        })),
        Some(Data::Histogram(h)) => Some(Data::Histogram(
            opentelemetry_proto::tonic::metrics::v1::Histogram {
                data_points: head(&mut h.data_points, n),
                aggregation_temporality: h.aggregation_temporality,
            },
        )),
        Some(Data::ExponentialHistogram(h)) => Some(Data::ExponentialHistogram(
            opentelemetry_proto::tonic::metrics::v1::ExponentialHistogram {
                data_points: head(&mut h.data_points, n),
                aggregation_temporality: h.aggregation_temporality,
            },
        )),
        Some(Data::Summary(s)) => Some(Data::Summary(
            opentelemetry_proto::tonic::metrics::v1::Summary {
                data_points: head(&mut s.data_points, n),
            },
        )),
        None => None,
    };
    Metric {
        name: metric.name.clone(),
        description: metric.description.clone(),
        unit: metric.unit.clone(),
        metadata: metric.metadata.clone(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::testdata;
    use crate::processor::test_util::{parse_issues, run};
    use prost::Message;
    use std::sync::Arc as StdArc;

    fn shared(request: ExportMetricsServiceRequest) -> Payload {
        Payload::Shared(StdArc::new(otlp::Batch::from_request(request)))
    }

    #[test]
    fn batches_by_size_without_decoding_and_flushes_the_rest() {
        let inputs: Vec<Payload> = (0..5).map(|_| shared(testdata::request(1, 2, 5))).collect();
        let out = run("batch", "send_batch_size: 20", inputs);
        // 10 points each: two full batches of 20 and a flushed remainder of 10.
        let sizes: Vec<u64> = out.iter().map(Payload::data_points).collect();
        assert_eq!(sizes, vec![20, 20, 10]);
        assert!(matches!(out[0], Payload::Encoded { .. }));
        let first = out[0].clone().into_request().unwrap();
        assert_eq!(first.resource_metrics.len(), 2);
        assert_eq!(otlp::data_points(&first), 20);
    }

    #[test]
    fn max_size_splits_keep_resource_and_scope_on_every_piece() {
        let request = testdata::request(3, 4, 10); // 120 points, 40 per resource
        let total = otlp::data_points(&request);
        let out = run(
            "batch",
            "{send_batch_size: 7, send_batch_max_size: 7}",
            vec![shared(request.clone())],
        );
        let mut seen = 0;
        for payload in &out {
            let piece = payload.clone().into_request().unwrap();
            let points = otlp::data_points(&piece);
            assert!(points <= 7 && points > 0);
            seen += points;
            for rm in &piece.resource_metrics {
                let resource = rm.resource.as_ref().expect("resource kept");
                assert_eq!(resource.attributes.len(), 3, "resource attributes kept");
                for sm in &rm.scope_metrics {
                    assert_eq!(sm.scope.as_ref().unwrap().name, "phoenix-test");
                    assert!(!sm.metrics.is_empty());
                }
            }
        }
        assert_eq!(seen, total);
        // Reassembled, the pieces hold exactly the original points in order.
        let values: Vec<String> = out
            .iter()
            .flat_map(|p| {
                let r = p.clone().into_request().unwrap();
                r.resource_metrics
                    .iter()
                    .flat_map(|rm| {
                        let pid = format!("{:?}", rm.resource.as_ref().unwrap().attributes[1]);
                        rm.scope_metrics
                            .iter()
                            .flat_map(|sm| sm.metrics.iter())
                            .flat_map(move |m| {
                                let pid = pid.clone();
                                let Some(Data::Sum(s)) = &m.data else {
                                    panic!()
                                };
                                s.data_points
                                    .iter()
                                    .map(move |dp| format!("{pid}/{}/{:?}", m.name, dp.value))
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(values.len() as u64, total);
        let mut dedup = values.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), values.len(), "no point duplicated");
    }

    #[test]
    fn split_of_every_type_conserves_points() {
        let request = testdata::all_types();
        for max in 1..=7 {
            let pieces = split(request.clone(), max);
            let total: u64 = pieces.iter().map(otlp::data_points).sum();
            assert_eq!(total, otlp::data_points(&request), "max {max}");
            assert!(pieces.iter().all(|p| otlp::data_points(p) <= max));
        }
    }

    #[test]
    fn concatenated_bytes_decode_to_the_union() {
        let a = testdata::request(1, 1, 1);
        let b = testdata::request(2, 1, 1);
        let out = run(
            "batch",
            "send_batch_size: 3",
            vec![shared(a.clone()), shared(b.clone())],
        );
        assert_eq!(out.len(), 1);
        let bytes = out[0].clone().into_bytes();
        let merged = ExportMetricsServiceRequest::decode(bytes).unwrap();
        let mut expected = a;
        expected.resource_metrics.extend(b.resource_metrics);
        assert_eq!(merged, expected);
    }

    #[test]
    fn deadline_follows_the_oldest_pending_point() {
        let id = crate::config::ComponentId::parse("batch").unwrap();
        let config = parse(serde_yaml::from_str("timeout: 50ms").unwrap()).unwrap();
        let mut p = crate::processor::state::standalone(config.as_ref(), "test", &id);
        assert!(p.deadline().is_none());
        let mut out = Vec::new();
        p.process(shared(testdata::request(1, 1, 1)), &mut out)
            .unwrap();
        assert!(out.is_empty());
        let deadline = p.deadline().unwrap();
        p.on_deadline(deadline, &mut out);
        assert_eq!(out.len(), 1);
        assert!(p.deadline().is_none());
    }

    #[test]
    fn invalid_sizes_name_their_keys() {
        let issues = parse_issues("batch", "{send_batch_size: 100, send_batch_max_size: 10}");
        assert_eq!(issues[0].path, "send_batch_max_size");
        let issues = parse_issues("batch", "{send_batch_size: 0, timeout: 0s}");
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, vec!["send_batch_size", "timeout"]);
        let issues = parse_issues("batch", "{timeout: soon}");
        assert_eq!(issues[0].path, "timeout");
        let issues = parse_issues("batch", "{send_batch_sise: 1}");
        assert!(issues[0]
            .message
            .contains("unknown field `send_batch_sise`"));
    }
}
