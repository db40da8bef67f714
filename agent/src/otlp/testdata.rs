//! Small hand-built OTLP requests for tests and benchmarks.

use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
    summary_data_point::ValueAtQuantile, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::ExportMetricsServiceRequest;

pub use super::data_points;

pub fn string_attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

pub fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

pub fn number_point(attributes: Vec<KeyValue>, value: f64) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: 1_700_000_000_000_000_000,
        time_unix_nano: 1_700_000_010_000_000_000,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

pub fn sum_metric(name: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.to_string(),
        unit: "s".to_string(),
        data: Some(Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

pub fn gauge_metric(name: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.to_string(),
        data: Some(Data::Gauge(Gauge {
            data_points: points,
        })),
        ..Default::default()
    }
}

pub fn resource_metrics(resource: Vec<KeyValue>, metrics: Vec<Metric>) -> ResourceMetrics {
    ResourceMetrics {
        resource: Some(Resource {
            attributes: resource,
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: "phoenix-test".to_string(),
                ..Default::default()
            }),
            metrics,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

/// `resources` process resources, each with `metrics` cumulative sums of `points` points.
pub fn request(resources: usize, metrics: usize, points: usize) -> ExportMetricsServiceRequest {
    let resource_metrics = (0..resources)
        .map(|r| {
            let metrics = (0..metrics)
                .map(|m| {
                    let points = (0..points)
                        .map(|p| {
                            number_point(vec![string_attr("state", &format!("s{p}"))], p as f64)
                        })
                        .collect();
                    sum_metric(&format!("process.metric.{m}"), points)
                })
                .collect();
            resource_metrics(
                vec![
                    string_attr("host.name", "node-1"),
                    int_attr("process.pid", r as i64 + 1),
                    string_attr("process.executable.name", &format!("proc-{r}")),
                ],
                metrics,
            )
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

/// One resource with one metric of every OTLP type.
pub fn all_types() -> ExportMetricsServiceRequest {
    let attrs = || vec![string_attr("k", "v")];
    let metrics = vec![
        gauge_metric("g", vec![number_point(attrs(), 1.0)]),
        sum_metric(
            "s",
            vec![number_point(attrs(), 2.0), number_point(vec![], 3.0)],
        ),
        Metric {
            name: "h".to_string(),
            data: Some(Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: attrs(),
                    count: 3,
                    bucket_counts: vec![1, 2],
                    explicit_bounds: vec![1.0],
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Delta as i32,
            })),
            ..Default::default()
        },
        Metric {
            name: "eh".to_string(),
            data: Some(Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![ExponentialHistogramDataPoint {
                    attributes: attrs(),
                    count: 2,
                    positive: Some(Buckets {
                        offset: 0,
                        bucket_counts: vec![2],
                    }),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Delta as i32,
            })),
            ..Default::default()
        },
        Metric {
            name: "sm".to_string(),
            data: Some(Data::Summary(Summary {
                data_points: vec![SummaryDataPoint {
                    attributes: attrs(),
                    count: 1,
                    sum: 1.0,
                    quantile_values: vec![ValueAtQuantile {
                        quantile: 0.5,
                        value: 1.0,
                    }],
                    ..Default::default()
                }],
            })),
            ..Default::default()
        },
    ];
    ExportMetricsServiceRequest {
        resource_metrics: vec![resource_metrics(
            vec![string_attr("host.name", "n")],
            metrics,
        )],
    }
}

/// Applies one to three random corruptions (bit flip, byte overwrite, truncation,
/// insertion) to a non-empty encoded message: the input of the no-panic tests that stand in
/// for a fuzzer.
pub fn corrupt(bytes: &mut Vec<u8>, rng: &mut impl rand::Rng) {
    for _ in 0..rng.random_range(1..4) {
        if bytes.is_empty() {
            return;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..4) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = rng.random(),
            2 => bytes.truncate(at.max(1)),
            _ => bytes.insert(at, rng.random()),
        }
    }
}
