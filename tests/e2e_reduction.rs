//! The reduction processors in the real agent: a stateful processor keeps its state over a
//! reload that rebuilds its pipeline but leaves its own config unchanged, and starts afresh
//! when its config changes; its output is valid cumulative OTLP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality,
};
use phoenix_agent::otlp::testdata;
use support::*;

fn config(sink: &Sink, interval: &str, extra_processor: bool) -> String {
    let chain = if extra_processor {
        "[aggregate/host, batch]"
    } else {
        "[aggregate/host]"
    };
    format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
processors:
  aggregate/host: {{ interval: {interval}, keep: [host.name] }}
  batch: {{ timeout: 50ms }}
exporters:
  otlp: {{ endpoint: "{url}" }}
pipelines:
  baseline: {{ receivers: [otlp], processors: {chain}, exporters: [otlp] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        url = sink.url()
    )
}

/// A monotonic cumulative `process.cpu.time` point of process `pid` on host h1.
fn cpu(pid: i64, value: f64) -> ExportMetricsServiceRequest {
    let mut point = testdata::number_point(vec![], value);
    point.start_time_unix_nano = 1_700_000_000_000_000_000 + pid as u64;
    point.time_unix_nano = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut metric = testdata::sum_metric("process.cpu.time", vec![point]);
    if let Some(Data::Sum(s)) = metric.data.as_mut() {
        s.is_monotonic = true;
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![testdata::resource_metrics(
            vec![
                testdata::string_attr("host.name", "h1"),
                testdata::int_attr("process.pid", pid),
            ],
            vec![metric],
        )],
    }
}

/// Every (value, start time) the sink got for the merged counter, checking each point is
/// valid cumulative monotonic output of the kept attributes only.
fn outputs(sink: &Sink) -> Vec<(f64, u64)> {
    let mut found = Vec::new();
    for request in sink.requests() {
        for rm in &request.resource_metrics {
            let attributes = &rm.resource.as_ref().unwrap().attributes;
            assert_eq!(
                attributes.len(),
                1,
                "only host.name is kept: {attributes:?}"
            );
            for m in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
                let Some(Data::Sum(sum)) = &m.data else {
                    panic!("a sum stays a sum: {m:?}")
                };
                assert!(sum.is_monotonic);
                assert_eq!(
                    sum.aggregation_temporality,
                    AggregationTemporality::Cumulative as i32
                );
                for p in &sum.data_points {
                    assert!(
                        p.start_time_unix_nano > 0 && p.start_time_unix_nano <= p.time_unix_nano
                    );
                    let value = match p.value {
                        Some(number_data_point::Value::AsDouble(d)) => d,
                        other => panic!("{other:?}"),
                    };
                    found.push((value, p.start_time_unix_nano));
                }
            }
        }
    }
    found
}

/// Waits until the sink's latest merged value is `expected`.
async fn wait_for_total(sink: &Sink, expected: f64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((value, start)) = outputs(sink).last().copied() {
            if value == expected {
                return start;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no merged value {expected}; got {:?}",
            outputs(sink)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reload(agent: &Agent, yaml: &str, successes: f64) {
    agent.write_config(yaml);
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent
        .metric("phoenix_config_reloads_total", &[("result", "success")])
        .await
        < successes
    {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Multi-threaded: `terminate` blocks its thread while the agent flushes to the test's sink,
// which must keep answering.
#[tokio::test(flavor = "multi_thread")]
async fn aggregate_state_survives_a_reload_of_its_pipeline_and_resets_when_its_config_changes() {
    let sink = Sink::start().await;
    let agent = Agent::start(&config(&sink, "1s", false)).await;
    let mut client = grpc_client(&agent).await;

    // One request, so both are in the output's first interval: a series first seen after the
    // output was emitted would count from a baseline (its start predates the processor's).
    let mut both = cpu(1, 10.0);
    both.resource_metrics.extend(cpu(2, 20.0).resource_metrics);
    client.export(both).await.unwrap();
    let start = wait_for_total(&sink, 30.0).await;

    // The pipeline gains a processor: it is rebuilt, the aggregate's config is unchanged.
    reload(&agent, &config(&sink, "1s", true), 1.0).await;
    client.export(cpu(1, 15.0)).await.unwrap();
    // Carried over: 30 + 5. A fresh aggregate would have emitted 15.
    assert_eq!(
        wait_for_total(&sink, 35.0).await,
        start,
        "same series, same start"
    );

    // The aggregate's own config changes: it starts afresh, as a new series (new start).
    reload(&agent, &config(&sink, "2s", true), 2.0).await;
    client.export(cpu(1, 16.0)).await.unwrap();
    assert!(wait_for_total(&sink, 16.0).await > start);

    // Never a decrease within one series (one start time).
    let points = outputs(&sink);
    for pair in points.windows(2) {
        if pair[0].1 == pair[1].1 {
            assert!(pair[1].0 >= pair[0].0, "{points:?}");
        }
    }
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
}
