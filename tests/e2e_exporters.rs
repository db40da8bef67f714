//! Exporters against real peers: agent A sends over OTLP/HTTP to agent B, which forwards
//! over OTLP/gRPC to the sink.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use phoenix_agent::otlp::testdata;
use support::*;

fn agent_b(sink: &Sink) -> String {
    format!(
        r#"
receivers:
  otlp: {{ protocols: {{ http: {{ endpoint: "{{HTTP}}" }} }} }}
exporters:
  otlp: {{ endpoint: "{}" }}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [otlp] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        sink.url()
    )
}

fn agent_a(b_http: std::net::SocketAddr) -> String {
    format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
exporters:
  otlphttp:
    endpoint: "http://{b_http}"
    compression: gzip
    headers: {{ x-phoenix-test: "yes" }}
    timeout: 2s
    retry_on_failure: {{ initial_interval: 100ms, max_interval: 200ms, max_elapsed_time: 60s }}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [otlphttp] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn otlphttp_delivers_through_a_second_agent_and_retries_until_it_is_up() {
    let sink = Sink::start().await;
    let b_ports = Ports::new();
    let a = Agent::start(&agent_a(b_ports.http)).await;

    // B is not running yet: A's sends fail with connection errors and are retried.
    let request = testdata::request(3, 2, 4); // 24 points
    let mut client = grpc_client(&a).await;
    for _ in 0..3 {
        client.export(request.clone()).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a
        .metric(
            "phoenix_exporter_retries_total",
            &[("exporter", "otlphttp")],
        )
        .await
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no retry:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sink.data_points(), 0);

    let b = Agent::start_with(&agent_b(&sink), b_ports).await;
    for _ in 0..2 {
        client.export(request.clone()).await.unwrap();
    }
    assert_eq!(sink.wait_for(120, Duration::from_secs(20)).await, 120);
    assert_eq!(flatten(&sink.requests()), flatten(&vec![request; 5]));
    assert_eq!(
        a.metric(
            "phoenix_exporter_sent_datapoints_total",
            &[("exporter", "otlphttp")]
        )
        .await,
        120.0
    );
    assert_eq!(
        b.metric(
            "phoenix_receiver_accepted_datapoints_total",
            &[("transport", "http")]
        )
        .await,
        120.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_rejection_is_dropped_and_counted_not_retried() {
    // B accepts gRPC only on a path A does not use: posting to B's telemetry port gets 404,
    // which OTLP/HTTP defines as permanent.
    let b_ports = Ports::new();
    let sink = Sink::start().await;
    let b = Agent::start_with(&agent_b(&sink), b_ports).await;
    let config = agent_a(b.telemetry);
    let a = Agent::start(&config).await;
    grpc_client(&a)
        .await
        .export(testdata::request(1, 1, 5))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let failed = a
            .metric(
                "phoenix_exporter_send_failed_datapoints_total",
                &[("exporter", "otlphttp"), ("reason", "permanent")],
            )
            .await;
        if failed == 5.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", a.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        a.metric(
            "phoenix_exporter_retries_total",
            &[("exporter", "otlphttp")]
        )
        .await,
        0.0
    );
    assert!(a.log().contains("HTTP 404"), "{}", a.log());
}
