//! The real OpenTelemetry Python SDK exports to the agent over OTLP/gRPC and OTLP/HTTP
//! (`tests/python/send_metrics.py`); the baseline must forward exactly what it recorded, and
//! the self-metrics must count it on the right transport and on the shadow candidate.
//!
//! Needs a Python with `opentelemetry-sdk` and the OTLP gRPC and HTTP exporters:
//! `$PHOENIX_TEST_PYTHON`, else `python3`. `./scripts/test` installs one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, Metric};
use support::*;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/python/send_metrics.py"
);

const PROBE: &str = "import opentelemetry.sdk.metrics, \
    opentelemetry.exporter.otlp.proto.grpc.metric_exporter, \
    opentelemetry.exporter.otlp.proto.http.metric_exporter";

/// Baseline forwards to the sink; the shadow candidate drops `route` and discards.
const CONFIG: &str = r#"
receivers:
  otlp:
    protocols:
      grpc: { endpoint: "{GRPC}" }
      http: { endpoint: "{HTTP}" }
processors:
  attributes/no-route:
    actions:
      - { key: route, action: delete }
exporters:
  otlp: { endpoint: "{SINK}" }
  blackhole: {}
pipelines:
  baseline:
    receivers: [otlp]
    exporters: [otlp]
  candidate:
    receivers: [otlp]
    processors: [attributes/no-route]
    exporters: [blackhole]
    shadow: true
telemetry: { listen: "{TELEMETRY}" }
"#;

/// Environment variables that would change what the SDK does or route loopback traffic
/// through a proxy.
fn scrub_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().to_string();
        let lower = key.to_ascii_lowercase();
        if key.starts_with("OTEL_") || lower.ends_with("_proxy") {
            command.env_remove(&key);
        }
    }
    command
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PYTHONDONTWRITEBYTECODE", "1");
}

/// The Python to use; panics (the test fails) when it lacks the SDK.
fn python() -> String {
    let python = std::env::var("PHOENIX_TEST_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string());
    let mut probe = Command::new(&python);
    probe.args(["-c", PROBE]);
    scrub_env(&mut probe);
    match probe.output() {
        Err(err) => panic!(
            "cannot run {python:?} ({err}): set PHOENIX_TEST_PYTHON to a Python with the \
             OpenTelemetry SDK, or run the tests with ./scripts/test, which installs one"
        ),
        Ok(out) if !out.status.success() => panic!(
            "{python:?} lacks opentelemetry-sdk / opentelemetry-exporter-otlp-proto-grpc / \
             opentelemetry-exporter-otlp-proto-http: run the tests with ./scripts/test, which \
             installs them (or set PHOENIX_TEST_PYTHON)\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => python,
    }
}

fn create(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

/// What the script reported: successful exports and the data points they carried.
struct Sent {
    exports: u64,
    datapoints: u64,
}

/// Runs the script against `address` over `transport`; panics unless it exits 0.
async fn send_with_python_sdk(
    python: &str,
    transport: &str,
    gzip: bool,
    address: &str,
    dir: &Path,
) -> Sent {
    let stdout_path = dir.join(format!("{transport}.stdout"));
    let stderr_path = dir.join(format!("{transport}.stderr"));
    let mut command = Command::new(python);
    command.args([SCRIPT, transport, address]);
    if gzip {
        command.arg("gzip");
    }
    command
        .stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path));
    scrub_env(&mut command);
    let mut child = KillOnDrop(
        command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python:?} {SCRIPT}: {e}")),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child
            .0
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for the Python script: {e}"))
        {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the Python script did not finish in 60 s:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "send_metrics.py {transport} failed ({status}):\nstdout: {stdout}\nstderr: {stderr}"
    );
    let field = |name: &str| -> u64 {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in the script's output: {stdout}"))
    };
    Sent {
        exports: field("exports"),
        datapoints: field("datapoints"),
    }
}

fn string(value: Option<&Value>) -> Option<&str> {
    match value {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

async fn python_sdk_end_to_end(transport: &str, gzip: bool) {
    // Fail before starting anything when the SDK is missing.
    let python = python();
    let sink = Sink::start().await;
    let agent = Agent::start(&CONFIG.replace("{SINK}", &sink.url())).await;
    let address = match transport {
        "grpc" => agent.grpc.to_string(),
        _ => agent.http.to_string(),
    };
    let sent = send_with_python_sdk(&python, transport, gzip, &address, agent.dir.path()).await;
    // force_flush and shutdown each export once; 5 points each: 2 counter points, 1 up-down
    // counter point, 1 histogram point, 1 gauge point.
    assert_eq!(sent.exports, 2, "exports of the script");
    assert_eq!(sent.datapoints, 10, "data points of the script");

    assert_eq!(
        sink.wait_for(sent.datapoints, Duration::from_secs(10))
            .await,
        sent.datapoints,
        "the baseline forwards every point, once\n{}",
        agent.log()
    );
    let requests = sink.requests();
    assert_eq!(
        requests.len() as u64,
        sent.exports,
        "one request per export"
    );

    let service = format!("phoenix-e2e-{transport}");
    let mut metrics: Vec<&Metric> = Vec::new();
    for request in &requests {
        assert_eq!(request.resource_metrics.len(), 1);
        let rm = &request.resource_metrics[0];
        let Some(resource) = rm.resource.as_ref() else {
            panic!("resource lost: {rm:?}")
        };
        assert_eq!(
            string(attr(&resource.attributes, "service.name")),
            Some(service.as_str()),
            "resource: {}",
            attrs(&resource.attributes)
        );
        assert_eq!(
            string(attr(&resource.attributes, "telemetry.sdk.language")),
            Some("python")
        );
        for sm in &rm.scope_metrics {
            assert_eq!(
                sm.scope.as_ref().map(|s| s.name.as_str()),
                Some("phoenix-e2e")
            );
            metrics.extend(&sm.metrics);
        }
    }
    let named = |name: &str| -> Vec<&Metric> {
        let found: Vec<&Metric> = metrics.iter().copied().filter(|m| m.name == name).collect();
        assert_eq!(
            found.len() as u64,
            sent.exports,
            "{name} once per export, got {:?}",
            metrics.iter().map(|m| &m.name).collect::<Vec<_>>()
        );
        found
    };

    // Counter: cumulative monotonic integer sums, one point per route.
    for m in named("phoenix.test.requests") {
        let Some(Data::Sum(sum)) = &m.data else {
            panic!("phoenix.test.requests is not a sum: {:?}", m.data)
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let mut points: Vec<(String, Option<Number>)> = sum
            .data_points
            .iter()
            .map(|p| {
                assert_eq!(p.attributes.len(), 1, "{}", attrs(&p.attributes));
                let Some(route) = string(attr(&p.attributes, "route")) else {
                    panic!("no route: {}", attrs(&p.attributes))
                };
                (route.to_string(), p.value)
            })
            .collect();
        points.sort_by(|a, b| a.0.cmp(&b.0));
        // The SDK sends integer measurements as as_int.
        assert_eq!(
            points,
            vec![
                ("/a".to_string(), Some(Number::AsInt(42))),
                ("/b".to_string(), Some(Number::AsInt(8))),
            ]
        );
    }

    // UpDownCounter: a non-monotonic cumulative sum, 10 - 3.
    for m in named("phoenix.test.inflight") {
        let Some(Data::Sum(sum)) = &m.data else {
            panic!("phoenix.test.inflight is not a sum: {:?}", m.data)
        };
        assert!(!sum.is_monotonic);
        assert_eq!(sum.data_points.len(), 1);
        let p = &sum.data_points[0];
        assert_eq!(string(attr(&p.attributes, "queue")), Some("q1"));
        assert_eq!(p.value, Some(Number::AsInt(7)));
    }

    // Histogram: 5, 15 and 250 ms.
    for m in named("phoenix.test.latency") {
        assert_eq!(m.unit, "ms");
        let Some(Data::Histogram(h)) = &m.data else {
            panic!("phoenix.test.latency is not a histogram: {:?}", m.data)
        };
        assert_eq!(h.data_points.len(), 1);
        let p = &h.data_points[0];
        assert_eq!(string(attr(&p.attributes, "route")), Some("/a"));
        assert_eq!(p.count, 3);
        assert_eq!(p.sum, Some(270.0));
        assert_eq!((p.min, p.max), (Some(5.0), Some(250.0)));
        assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
        let mut expected = vec![0u64; p.bucket_counts.len()];
        for value in [5.0, 15.0, 250.0] {
            // Buckets are upper-inclusive.
            let i = p
                .explicit_bounds
                .iter()
                .position(|&bound| value <= bound)
                .unwrap_or(p.explicit_bounds.len());
            expected[i] += 1;
        }
        assert_eq!(p.bucket_counts, expected, "bounds {:?}", p.explicit_bounds);
    }

    // Observable gauge: the callback's double.
    for m in named("phoenix.test.temperature") {
        let Some(Data::Gauge(g)) = &m.data else {
            panic!("phoenix.test.temperature is not a gauge: {:?}", m.data)
        };
        assert_eq!(g.data_points.len(), 1);
        let p = &g.data_points[0];
        assert_eq!(string(attr(&p.attributes, "sensor")), Some("s1"));
        assert_eq!(p.value, Some(Number::AsDouble(21.5)));
    }
    assert_eq!(metrics.len() as u64, 4 * sent.exports, "no other metrics");

    // Self-metrics: the shadow candidate runs asynchronously, and an exporter counts a
    // delivery once the answer is back, so wait until both exporters have counted.
    let n = sent.datapoints as f64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = agent.metrics().await;
        let done = ["otlp", "blackhole"].iter().all(|exporter| {
            metric_value(
                &text,
                "phoenix_exporter_sent_datapoints_total",
                &[("exporter", exporter)],
            ) >= n
        });
        if done || Instant::now() >= deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    let other = if transport == "grpc" { "http" } else { "grpc" };
    assert_eq!(
        value(
            "phoenix_receiver_accepted_datapoints_total",
            &[("transport", transport)]
        ),
        n,
        "{text}"
    );
    assert_eq!(
        value(
            "phoenix_receiver_accepted_datapoints_total",
            &[("transport", other)]
        ),
        0.0
    );
    assert_eq!(
        value(
            "phoenix_receiver_requests_total",
            &[("transport", transport), ("outcome", "accepted")]
        ),
        sent.exports as f64
    );
    assert_eq!(
        value(
            "phoenix_receiver_requests_total",
            &[("transport", transport), ("outcome", "refused")]
        ),
        0.0
    );
    for pipeline in ["baseline", "candidate"] {
        assert_eq!(
            value(
                "phoenix_pipeline_output_datapoints_total",
                &[("pipeline", pipeline)]
            ),
            n,
            "{pipeline} output\n{text}"
        );
    }
    for exporter in ["otlp", "blackhole"] {
        assert_eq!(
            value(
                "phoenix_exporter_sent_datapoints_total",
                &[("exporter", exporter)]
            ),
            n,
            "{exporter} sent\n{text}"
        );
    }
    // The candidate really ran its processor: without `route` its output is smaller.
    let baseline_bytes = value(
        "phoenix_pipeline_output_bytes_total",
        &[("pipeline", "baseline")],
    );
    let candidate_bytes = value(
        "phoenix_pipeline_output_bytes_total",
        &[("pipeline", "candidate")],
    );
    assert!(
        candidate_bytes > 0.0 && candidate_bytes < baseline_bytes,
        "candidate {candidate_bytes} bytes, baseline {baseline_bytes}"
    );
    assert_eq!(
        value(
            "phoenix_processor_outgoing_datapoints_total",
            &[
                ("pipeline", "candidate"),
                ("processor", "attributes/no-route")
            ]
        ),
        n
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_over_grpc_is_forwarded_exactly() {
    python_sdk_end_to_end("grpc", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_over_http_is_forwarded_exactly() {
    python_sdk_end_to_end("http", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_over_grpc_with_gzip_is_forwarded_exactly() {
    python_sdk_end_to_end("grpc", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_over_http_with_gzip_is_forwarded_exactly() {
    python_sdk_end_to_end("http", true).await;
}
