//! Baseline and candidate on the same input, end to end through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use phoenix_agent::otlp::testdata;
use prost::Message;
use support::*;

const SHADOW_CONFIG: &str = r#"
receivers:
  otlp:
    protocols:
      grpc: { endpoint: "{GRPC}" }
      http: { endpoint: "{HTTP}" }
processors:
  filter/no-metric-2:
    exclude: { metric_names: ["process.metric.2"] }
  attributes/strip:
    actions:
      - { key: process.pid, action: delete, on: resource }
      - { key: env, action: upsert, value: test, on: datapoint }
  batch: { send_batch_size: 100, timeout: 100ms }
exporters:
  otlp/baseline: { endpoint: "{BASELINE}", compression: none }
  otlp/candidate: { endpoint: "{CANDIDATE}", compression: gzip }
pipelines:
  baseline:
    receivers: [otlp]
    processors: [batch]
    exporters: [otlp/baseline]
  candidate:
    receivers: [otlp]
    processors: [filter/no-metric-2, attributes/strip, batch]
    exporters: [otlp/candidate]
    shadow: true
telemetry: { listen: "{TELEMETRY}" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn baseline_and_candidate_each_receive_exactly_their_data() {
    let baseline = Sink::start().await;
    let candidate = Sink::start().await;
    let config = SHADOW_CONFIG
        .replace("{BASELINE}", &baseline.url())
        .replace("{CANDIDATE}", &candidate.url());
    let agent = Agent::start(&config).await;

    // 5 processes x 3 metrics x 4 points = 60 points a request; 10 over gRPC, 10 over HTTP.
    let request = testdata::request(5, 3, 4);
    let mut client = grpc_client(&agent).await;
    for _ in 0..10 {
        client.export(request.clone()).await.expect("gRPC export");
    }
    let http = reqwest::Client::new();
    for _ in 0..10 {
        let resp = http
            .post(agent.http_url())
            .header("content-type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .expect("HTTP export");
        assert_eq!(resp.status(), 200);
    }

    assert_eq!(baseline.wait_for(1200, Duration::from_secs(10)).await, 1200);
    assert_eq!(candidate.wait_for(800, Duration::from_secs(10)).await, 800);

    // The baseline forwards exactly what was sent.
    let sent = vec![request.clone(); 20];
    assert_eq!(flatten(&baseline.requests()), flatten(&sent));

    // The candidate: metric 2 filtered out, pid gone from resources, env=test on every point.
    let mut expected = request.clone();
    for rm in &mut expected.resource_metrics {
        rm.resource
            .as_mut()
            .unwrap()
            .attributes
            .retain(|kv| kv.key != "process.pid");
        for sm in &mut rm.scope_metrics {
            sm.metrics.retain(|m| m.name != "process.metric.2");
            for m in &mut sm.metrics {
                if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s)) =
                    &mut m.data
                {
                    for p in &mut s.data_points {
                        p.attributes.push(testdata::string_attr("env", "test"));
                    }
                }
            }
        }
    }
    assert_eq!(flatten(&candidate.requests()), flatten(&vec![expected; 20]));

    // Self-telemetry agrees with what the sinks counted.
    let metrics = agent.metrics().await;
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&metrics, name, labels);
    assert_eq!(
        value(
            "phoenix_receiver_accepted_datapoints_total",
            &[("transport", "grpc")]
        ),
        600.0
    );
    assert_eq!(
        value(
            "phoenix_receiver_accepted_datapoints_total",
            &[("transport", "http")]
        ),
        600.0
    );
    assert_eq!(
        value(
            "phoenix_pipeline_output_datapoints_total",
            &[("pipeline", "baseline")]
        ),
        1200.0
    );
    assert_eq!(
        value(
            "phoenix_pipeline_output_datapoints_total",
            &[("pipeline", "candidate")]
        ),
        800.0
    );
    assert_eq!(
        value(
            "phoenix_exporter_sent_datapoints_total",
            &[("exporter", "otlp/candidate")]
        ),
        800.0
    );
    let baseline_bytes = value(
        "phoenix_pipeline_output_bytes_total",
        &[("pipeline", "baseline")],
    );
    let candidate_bytes = value(
        "phoenix_pipeline_output_bytes_total",
        &[("pipeline", "candidate")],
    );
    assert!(candidate_bytes > 0.0 && candidate_bytes < baseline_bytes);
    assert!(metrics.contains("phoenix_build_info"));
    assert!(metrics.contains("phoenix_queue_size{queue=\"pipeline/baseline\"}"));

    // The series gauge is published when its 10 s window closes: 5 x 3 x 4 = 60 baseline
    // series, 5 x 2 x 4 = 40 candidate series (pid removal does not merge: names differ).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = agent.metrics().await;
        let b = metric_value(
            &m,
            "phoenix_pipeline_output_series",
            &[("pipeline", "baseline"), ("window", "total")],
        );
        let c = metric_value(
            &m,
            "phoenix_pipeline_output_series",
            &[("pipeline", "candidate"), ("window", "total")],
        );
        if b > 0.0 {
            assert_eq!((b, c), (60.0, 40.0));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "series gauge never published"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batching_never_separates_metrics_from_their_resource_or_scope() {
    let sink = Sink::start().await;
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
processors:
  batch: {{ send_batch_size: 50, send_batch_max_size: 50, timeout: 100ms }}
exporters:
  otlp: {{ endpoint: "{}" }}
pipelines:
  baseline: {{ receivers: [otlp], processors: [batch], exporters: [otlp] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        sink.url()
    );
    let agent = Agent::start(&config).await;
    // One large request of 40 resources x 6 metrics x 7 points = 1680 points, split into
    // pieces of 50 that cut through metrics and resources.
    let request = testdata::request(40, 6, 7);
    grpc_client(&agent)
        .await
        .export(request.clone())
        .await
        .expect("export");
    assert_eq!(sink.wait_for(1680, Duration::from_secs(10)).await, 1680);
    let received = sink.requests();
    assert!(received.len() >= 1680 / 50, "the batch was split");
    for piece in &received {
        assert!(phoenix_agent::otlp::data_points(piece) <= 50);
        for rm in &piece.resource_metrics {
            let resource = rm
                .resource
                .as_ref()
                .expect("every piece keeps its resource");
            assert_eq!(resource.attributes.len(), 3, "resource attributes kept");
            assert!(attr(&resource.attributes, "process.pid").is_some());
            for sm in &rm.scope_metrics {
                assert_eq!(sm.scope.as_ref().expect("scope kept").name, "phoenix-test");
            }
        }
    }
    assert_eq!(flatten(&received), flatten(&[request]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_shadow_pipeline_never_slows_the_baseline() {
    let baseline = Sink::start().await;
    let stuck = Sink::start_mode(SinkMode::Stall).await;
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
processors:
  attributes/x: {{ actions: [ {{ key: process.pid, action: delete }} ] }}
exporters:
  otlp/baseline: {{ endpoint: "{}" }}
  otlp/stuck:
    endpoint: "{}"
    timeout: 60s
    sending_queue: {{ num_consumers: 1, queue_size: 1 }}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [otlp/baseline], queue_size: 4 }}
  candidate: {{ receivers: [otlp], processors: [attributes/x], exporters: [otlp/stuck], shadow: true, queue_size: 2 }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        baseline.url(),
        stuck.url()
    );
    let agent = Agent::start(&config).await;
    let request = testdata::request(2, 2, 5); // 20 points
    let mut client = grpc_client(&agent).await;
    for i in 0..300 {
        client.export(request.clone()).await.unwrap_or_else(|s| {
            panic!("request {i} refused although only the shadow is stuck: {s}")
        });
    }
    assert_eq!(baseline.wait_for(6000, Duration::from_secs(20)).await, 6000);
    let metrics = agent.metrics().await;
    let dropped = metric_value(
        &metrics,
        "phoenix_pipeline_dropped_datapoints_total",
        &[("pipeline", "candidate"), ("reason", "queue_full")],
    ) + metric_value(
        &metrics,
        "phoenix_exporter_enqueue_failed_datapoints_total",
        &[("exporter", "otlp/stuck")],
    );
    assert!(
        dropped >= 6000.0 - 20.0 * 8.0,
        "shadow drops counted: {dropped}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "phoenix_pipeline_dropped_datapoints_total",
            &[("pipeline", "baseline")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_baseline_pushes_back_on_senders() {
    let stuck = Sink::start_mode(SinkMode::Stall).await;
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "{{GRPC}}" }}
      http: {{ endpoint: "{{HTTP}}" }}
exporters:
  otlp: {{ endpoint: "{}", timeout: 60s, sending_queue: {{ num_consumers: 1, queue_size: 1 }} }}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [otlp], queue_size: 1 }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        stuck.url()
    );
    let agent = Agent::start(&config).await;
    let request = testdata::request(1, 1, 1);
    let mut client = grpc_client(&agent).await;
    let mut refused = None;
    for _ in 0..10 {
        if let Err(status) = client.export(request.clone()).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("a full baseline must refuse");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("baseline"),
        "{}",
        status.message()
    );

    let resp = reqwest::Client::new()
        .post(agent.http_url())
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .expect("HTTP");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    for transport in ["grpc", "http"] {
        let refused = agent
            .metric(
                "phoenix_receiver_refused_datapoints_total",
                &[("transport", transport), ("reason", "pipelines_full")],
            )
            .await;
        assert!(refused >= 1.0, "{transport}: {refused}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_and_logs_get_a_clear_not_supported() {
    let sink = Sink::start().await;
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "{{GRPC}}" }}
      http: {{ endpoint: "{{HTTP}}" }}
exporters:
  otlp: {{ endpoint: "{}" }}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [otlp] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        sink.url()
    );
    let agent = Agent::start(&config).await;
    // A traces client: the same framing, another service path.
    let channel = tonic::transport::Endpoint::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(bytes::Bytes::new()),
            http::uri::PathAndQuery::from_static(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            ),
            phoenix_agent::otlp::codec::RawClientCodec::<
                phoenix_agent::otlp::ExportMetricsServiceResponse,
            >::default(),
        )
        .await
        .expect_err("traces are not supported");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(status.message().contains("metrics only"));

    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/logs", agent.http))
        .header("content-type", "application/x-protobuf")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("metrics only"));

    // Metrics still flow.
    grpc_client(&agent)
        .await
        .export(testdata::request(1, 1, 3))
        .await
        .unwrap();
    assert_eq!(sink.wait_for(3, Duration::from_secs(10)).await, 3);
}
