//! The `app` workload: what a fleet of services instrumented with an OpenTelemetry SDK exports
//! every 10 s. Per instance: an HTTP server request-duration histogram (explicit buckets) per
//! route, method and status code, a counter of processed orders by outcome, an up-down counter
//! of active requests, and runtime memory gauges — about 50 series per instance, a few hundred
//! for the default fleet of 5 services × 2 instances. Cumulative
//! temporality; counters and bucket counts only go up. Seeded: the same seed gives the same
//! bytes, and request `i` can be built without the ones before it.

use anyhow::{anyhow, Result};
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{encode, int_attr, string_attr, EncodedRequest, BASE_TIME_UNIX_S, SCRAPE_INTERVAL_S};
use phoenix_agent::otlp::ExportMetricsServiceRequest;

const NANOS: u64 = 1_000_000_000;

/// The SDK's default explicit bucket bounds for `http.server.request.duration`, in seconds.
pub const DURATION_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

const SERVICES: &[(&str, &[&str])] = &[
    (
        "checkout",
        &["/cart", "/cart/{id}", "/checkout", "/payment", "/health"],
    ),
    (
        "orders",
        &["/orders", "/orders/{id}", "/orders/{id}/items", "/health"],
    ),
    (
        "catalog",
        &[
            "/products",
            "/products/{id}",
            "/search",
            "/categories",
            "/health",
        ],
    ),
    ("users", &["/users/{id}", "/login", "/logout", "/health"]),
    ("shipping", &["/quotes", "/shipments/{id}", "/health"]),
];
const METHODS: &[&str] = &["GET", "POST"];
const STATUSES: &[i64] = &[200, 201, 400, 404, 500];
const MEMORY_POOLS: &[(&str, &str)] = &[
    ("heap", "G1 Eden Space"),
    ("heap", "G1 Old Gen"),
    ("heap", "G1 Survivor Space"),
    ("non_heap", "Metaspace"),
    ("non_heap", "CodeHeap 'non-nmethods'"),
    ("non_heap", "Compressed Class Space"),
];

/// One HTTP series: its attributes, request rate and latency distribution.
#[derive(Debug, Clone)]
struct Route {
    route: &'static str,
    method: &'static str,
    status: i64,
    /// Requests per second.
    rate: f64,
    /// Share of requests per bucket (bounds plus the overflow bucket), summing to 1.
    shares: Vec<f64>,
}

#[derive(Debug, Clone)]
struct Instance {
    service: &'static str,
    id: String,
    host: String,
    routes: Vec<Route>,
    orders_rate: [f64; 2],
    heap_bytes: Vec<f64>,
}

/// The fleet of the `app` workload: `services` × `instances` instances.
#[derive(Debug, Clone)]
pub struct AppWorkload {
    instances: Vec<Instance>,
    instances_per_request: usize,
}

impl AppWorkload {
    pub fn new(
        seed: u64,
        services: usize,
        instances: usize,
        instances_per_request: usize,
    ) -> Result<Self> {
        if services == 0 || instances == 0 || instances_per_request == 0 {
            return Err(anyhow!(
                "services, instances and instances per request must all be at least 1"
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut all = Vec::with_capacity(services * instances);
        for s in 0..services {
            let (name, routes) = SERVICES[s % SERVICES.len()];
            for i in 0..instances {
                all.push(build_instance(&mut rng, name, s, i, routes));
            }
        }
        Ok(Self {
            instances: all,
            instances_per_request,
        })
    }

    pub fn requests_per_round(&self) -> usize {
        self.instances.len().div_ceil(self.instances_per_request)
    }

    /// Request `index`: export round `index / requests_per_round` of one group of instances.
    pub fn request(&self, index: usize) -> ExportMetricsServiceRequest {
        let per_round = self.requests_per_round();
        let round = (index / per_round) as u64;
        let start = (index % per_round) * self.instances_per_request;
        let end = (start + self.instances_per_request).min(self.instances.len());
        ExportMetricsServiceRequest {
            resource_metrics: self.instances[start..end]
                .iter()
                .map(|instance| export(instance, round))
                .collect(),
        }
    }

    /// At least `min` requests, rounded up to whole rounds, encoded.
    pub fn pool(&self, min: usize) -> Vec<EncodedRequest> {
        let per_round = self.requests_per_round();
        let count = min.max(1).div_ceil(per_round) * per_round;
        (0..count).map(|i| encode(&self.request(i))).collect()
    }
}

fn build_instance(
    rng: &mut StdRng,
    service: &'static str,
    service_index: usize,
    instance: usize,
    routes: &[&'static str],
) -> Instance {
    let mut series = Vec::new();
    for &route in routes {
        for &method in METHODS {
            if route == "/health" && method == "POST" {
                continue;
            }
            for &status in STATUSES {
                // Most traffic succeeds; errors are rarer but present on every route.
                let weight = match status {
                    200 => 1.0,
                    201 => 0.2,
                    400 => 0.02,
                    404 => 0.05,
                    _ => 0.005,
                };
                let median = rng.random_range(0.005..0.3);
                series.push(Route {
                    route,
                    method,
                    status,
                    rate: rng.random_range(1.0..50.0) * weight,
                    shares: latency_shares(median),
                });
            }
        }
    }
    Instance {
        service,
        id: format!("{service}-{:08x}", rng.random::<u32>()),
        host: format!(
            "ip-10-1-{}-{}.eu-west-1.compute.internal",
            service_index,
            instance + 1
        ),
        routes: series,
        orders_rate: [rng.random_range(1.0..20.0), rng.random_range(0.0..0.5)],
        heap_bytes: MEMORY_POOLS
            .iter()
            .map(|_| rng.random_range(16.0..512.0) * 1024.0 * 1024.0)
            .collect(),
    }
}

/// Bucket shares of a latency distribution centred on `median` seconds, with a long tail.
fn latency_shares(median: f64) -> Vec<f64> {
    let mut weights: Vec<f64> = (0..=DURATION_BOUNDS.len())
        .map(|i| {
            let upper = DURATION_BOUNDS.get(i).copied().unwrap_or(20.0);
            let distance = (upper.ln() - median.ln()).abs();
            (-distance).exp()
        })
        .collect();
    let total: f64 = weights.iter().sum();
    for w in &mut weights {
        *w /= total;
    }
    weights
}

fn export(instance: &Instance, round: u64) -> ResourceMetrics {
    let start = BASE_TIME_UNIX_S * NANOS;
    let time = (BASE_TIME_UNIX_S + (round + 1) * SCRAPE_INTERVAL_S) * NANOS;
    let elapsed = ((round + 1) * SCRAPE_INTERVAL_S) as f64;
    let wobble = (round % 5) as f64;

    let durations = instance
        .routes
        .iter()
        .map(|r| {
            // Each bucket's count is its own monotonic function of time, so every count and
            // the total only go up.
            let bucket_counts: Vec<u64> = r
                .shares
                .iter()
                .map(|share| (r.rate * elapsed * share).floor() as u64)
                .collect();
            let count = bucket_counts.iter().sum();
            let sum = bucket_counts
                .iter()
                .enumerate()
                .map(|(i, &c)| c as f64 * DURATION_BOUNDS.get(i).copied().unwrap_or(20.0) * 0.7)
                .sum();
            HistogramDataPoint {
                attributes: vec![
                    string_attr("http.route", r.route),
                    string_attr("http.request.method", r.method),
                    int_attr("http.response.status_code", r.status),
                ],
                start_time_unix_nano: start,
                time_unix_nano: time,
                count,
                sum: Some(sum),
                bucket_counts,
                explicit_bounds: DURATION_BOUNDS.to_vec(),
                min: None,
                max: None,
                ..Default::default()
            }
        })
        .collect();

    let number = |attributes: Vec<KeyValue>, value: number_data_point::Value| NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(value),
        ..Default::default()
    };
    let orders = ["success", "failure"]
        .iter()
        .zip(instance.orders_rate)
        .map(|(outcome, rate)| {
            number(
                vec![string_attr("outcome", outcome)],
                number_data_point::Value::AsInt((rate * elapsed) as i64),
            )
        })
        .collect();
    let active = METHODS
        .iter()
        .map(|m| {
            number(
                vec![string_attr("http.request.method", m)],
                number_data_point::Value::AsInt(3 + wobble as i64),
            )
        })
        .collect();
    let memory = MEMORY_POOLS
        .iter()
        .zip(&instance.heap_bytes)
        .map(|((kind, pool), bytes)| {
            number(
                vec![
                    string_attr("jvm.memory.type", kind),
                    string_attr("jvm.memory.pool.name", pool),
                ],
                number_data_point::Value::AsInt((bytes * (1.0 + wobble * 0.02)) as i64),
            )
        })
        .collect();

    let metrics = vec![
        Metric {
            name: "http.server.request.duration".to_string(),
            description: "Duration of HTTP server requests.".to_string(),
            unit: "s".to_string(),
            data: Some(Data::Histogram(Histogram {
                data_points: durations,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        },
        Metric {
            name: "app.orders.processed".to_string(),
            description: "Orders processed, by outcome.".to_string(),
            unit: "{order}".to_string(),
            data: Some(Data::Sum(Sum {
                data_points: orders,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        },
        Metric {
            name: "http.server.active_requests".to_string(),
            description: "Number of active HTTP server requests.".to_string(),
            unit: "{request}".to_string(),
            data: Some(Data::Sum(Sum {
                data_points: active,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: false,
            })),
            ..Default::default()
        },
        Metric {
            name: "jvm.memory.used".to_string(),
            description: "Measure of memory used.".to_string(),
            unit: "By".to_string(),
            data: Some(Data::Gauge(Gauge {
                data_points: memory,
            })),
            ..Default::default()
        },
    ];
    ResourceMetrics {
        resource: Some(Resource {
            attributes: vec![
                string_attr("service.name", instance.service),
                string_attr("service.instance.id", &instance.id),
                string_attr("service.version", "1.42.0"),
                string_attr("host.name", &instance.host),
                string_attr("deployment.environment.name", "production"),
            ],
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: "io.opentelemetry.spring-webmvc-6.0".to_string(),
                version: "2.10.0-alpha".to_string(),
                ..Default::default()
            }),
            metrics,
            schema_url: "https://opentelemetry.io/schemas/1.27.0".to_string(),
        }],
        schema_url: "https://opentelemetry.io/schemas/1.27.0".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_agent::otlp::data_points;

    #[test]
    fn counters_and_buckets_only_go_up_and_histograms_are_consistent() {
        let workload = AppWorkload::new(3, 2, 2, 2).unwrap();
        let per_round = workload.requests_per_round();
        let mut previous: Option<ExportMetricsServiceRequest> = None;
        for round in 0..4 {
            let request = workload.request(round * per_round);
            for rm in &request.resource_metrics {
                let Some(Data::Histogram(h)) = &rm.scope_metrics[0].metrics[0].data else {
                    panic!("histogram first");
                };
                for p in &h.data_points {
                    assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
                    assert_eq!(p.count, p.bucket_counts.iter().sum::<u64>());
                }
            }
            if let Some(prev) = &previous {
                for (a, b) in prev.resource_metrics.iter().zip(&request.resource_metrics) {
                    let (Some(Data::Histogram(ha)), Some(Data::Histogram(hb))) = (
                        &a.scope_metrics[0].metrics[0].data,
                        &b.scope_metrics[0].metrics[0].data,
                    ) else {
                        panic!("histogram first");
                    };
                    for (pa, pb) in ha.data_points.iter().zip(&hb.data_points) {
                        for (ca, cb) in pa.bucket_counts.iter().zip(&pb.bucket_counts) {
                            assert!(cb >= ca);
                        }
                    }
                }
            }
            previous = Some(request);
        }
    }

    #[test]
    fn a_few_hundred_series_and_the_same_seed_gives_the_same_bytes() {
        let workload = AppWorkload::new(1, 5, 2, 2).unwrap();
        let round: u64 = (0..workload.requests_per_round())
            .map(|i| data_points(&workload.request(i)))
            .sum();
        assert!((200..800).contains(&round), "{round} series in the fleet");
        let again = AppWorkload::new(1, 5, 2, 2).unwrap().pool(5);
        let pool = workload.pool(5);
        assert_eq!(pool.len(), 5);
        for (a, b) in pool.iter().zip(&again) {
            assert_eq!(a.bytes, b.bytes);
        }
    }
}
