//! Bad input gets the right status, the agent keeps serving, and nothing accepted is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use phoenix_agent::otlp::testdata;
use prost::Message;
use support::*;

fn config(sink: &Sink) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "{{GRPC}}" }}
      http: {{ endpoint: "{{HTTP}}" }}
processors:
  attributes/x: {{ actions: [ {{ key: process.pid, action: delete }} ] }}
exporters:
  otlp: {{ endpoint: "{}" }}
  blackhole: {{}}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [otlp] }}
  candidate: {{ receivers: [otlp], processors: [attributes/x], exporters: [blackhole], shadow: true }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
"#,
        sink.url()
    )
}

async fn post(
    agent: &Agent,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(agent.http_url())
        .header("content-type", content_type)
        .body(body);
    if let Some(encoding) = encoding {
        request = request.header("content-encoding", encoding);
    }
    request.send().await.expect("HTTP request")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_collectors_statuses_and_accepted_data_survives() {
    let sink = Sink::start().await;
    let agent = Agent::start(&config(&sink)).await;
    let good = testdata::request(2, 2, 3); // 12 points
    let good_bytes = good.encode_to_vec();

    // Accepted before the bad input.
    grpc_client(&agent)
        .await
        .export(good.clone())
        .await
        .unwrap();

    // gRPC: garbage and truncation are INVALID_ARGUMENT; a message over
    // max_recv_msg_size_mib is refused without being read.
    let channel = tonic::transport::Endpoint::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let raw_export = |body: Vec<u8>| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.unwrap();
            grpc.unary(
                tonic::Request::new(bytes::Bytes::from(body)),
                http::uri::PathAndQuery::from_static(
                    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                ),
                phoenix_agent::otlp::codec::RawClientCodec::<ExportMetricsServiceResponse>::default(
                ),
            )
            .await
        }
    };
    let status = raw_export(b"\xff\xff\xff garbage \x00\x01".to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = raw_export(good_bytes[..good_bytes.len() - 5].to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = raw_export(vec![0u8; 8 * 1024 * 1024]).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );

    // HTTP: 400 for undecodable, 413 for too large, 415 for a wrong content type.
    let resp = post(
        &agent,
        "application/x-protobuf",
        None,
        b"not protobuf\xff\xff".to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body = resp.bytes().await.unwrap();
    let rpc_status = RpcStatus::decode(body).expect("a google.rpc.Status body");
    assert!(
        rpc_status
            .message
            .contains("not a valid OTLP metrics protobuf"),
        "{}",
        rpc_status.message
    );

    let resp = post(
        &agent,
        "application/x-protobuf",
        None,
        good_bytes[..good_bytes.len() / 2 + 3].to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 400);

    // The agent answers 413 without reading 64 MiB; the client may see that answer or, if
    // it was still writing, a reset. Either way the request was refused and counted.
    let refused_before = agent
        .metric(
            "phoenix_receiver_requests_total",
            &[("transport", "http"), ("outcome", "refused")],
        )
        .await;
    let huge = reqwest::Client::new()
        .post(agent.http_url())
        .header("content-type", "application/x-protobuf")
        .body(vec![0u8; 64 * 1024 * 1024])
        .send()
        .await;
    if let Ok(resp) = huge {
        assert_eq!(resp.status(), 413);
    }
    let refused_after = agent
        .metric(
            "phoenix_receiver_requests_total",
            &[("transport", "http"), ("outcome", "refused")],
        )
        .await;
    assert_eq!(refused_after, refused_before + 1.0);

    let resp = post(&agent, "text/plain", None, good_bytes.clone()).await;
    assert_eq!(resp.status(), 415);

    let resp = post(
        &agent,
        "application/json",
        None,
        br#"{"resourceMetrics": "nope"}"#.to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("invalid OTLP/JSON"));
    let resp = post(
        &agent,
        "application/json",
        None,
        br#"{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": 7}]}]}]}"#.to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 400);

    let resp = post(
        &agent,
        "application/x-protobuf",
        Some("gzip"),
        b"not gzip".to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 400);
    // A gzip bomb is cut at the body limit, not inflated in full.
    let bomb = gzip(&vec![0u8; 64 * 1024 * 1024]);
    let resp = post(&agent, "application/x-protobuf", Some("gzip"), bomb).await;
    assert_eq!(resp.status(), 413);

    // Still serving: gzip protobuf and JSON are accepted.
    let resp = post(
        &agent,
        "application/x-protobuf",
        Some("gzip"),
        gzip(&good_bytes),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let json = serde_json::to_vec(&good).unwrap();
    let resp = post(&agent, "application/json", None, json).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.unwrap(), "{}");

    // Exactly the three good requests arrive, with the first one's content intact.
    assert_eq!(sink.wait_for(36, Duration::from_secs(10)).await, 36);
    assert_eq!(
        flatten(&sink.requests()),
        flatten(&[good.clone(), good.clone(), good])
    );
    let refused = agent
        .metric(
            "phoenix_receiver_refused_datapoints_total",
            &[("reason", "malformed")],
        )
        .await;
    assert!(refused >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_without_a_name_are_rejected_as_a_partial_success() {
    let sink = Sink::start().await;
    let agent = Agent::start(&config(&sink)).await;
    let mut request = testdata::request(1, 3, 2); // 6 points
    request.resource_metrics[0].scope_metrics[0].metrics[1]
        .name
        .clear();
    let reply = grpc_client(&agent)
        .await
        .export(request)
        .await
        .unwrap()
        .into_inner();
    let partial = reply.partial_success.expect("partial success");
    assert_eq!(partial.rejected_data_points, 2);
    assert!(partial.error_message.contains("without a name"));
    assert_eq!(sink.wait_for(4, Duration::from_secs(10)).await, 4);
    assert!(sink
        .requests()
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .all(|m| !m.name.is_empty()));
}

/// `google.rpc.Status`, as OTLP/HTTP error bodies carry it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}
