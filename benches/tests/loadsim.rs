//! `phoenix-loadsim` against real receivers: `phoenix-sink` over gRPC, with a scenario file
//! whose options the command line overrides, and an OTLP/HTTP server over HTTP with gzip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;

const LOADSIM: &str = env!("CARGO_BIN_EXE_phoenix-loadsim");
const SINK: &str = env!("CARGO_BIN_EXE_phoenix-sink");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn grpc_with_a_scenario_file_and_a_command_line_override() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let report = dir.path().join("sink.json");
    let mut sink = Command::new(SINK)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--report-interval",
            "100ms",
        ])
        .arg("--report")
        .arg(&report)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let scenario = dir.path().join("node.yaml");
    // The scenario's endpoint is wrong on purpose: the command line's wins.
    std::fs::write(
        &scenario,
        "workload: process\nendpoint: http://127.0.0.1:9\nhosts: 2\nprocesses: 50\nhosts_per_request: 1\nchurn: 0.9\nrequests: 6\npool: 6\n",
    )
    .unwrap();
    let summary = dir.path().join("load.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sink did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new(LOADSIM)
        .arg("--scenario")
        .arg(&scenario)
        .args(["--endpoint", &format!("http://127.0.0.1:{port}")])
        .arg("--json")
        .arg(&summary)
        .status()
        .unwrap();
    assert!(status.success());
    let load = json(&summary);
    assert_eq!(load["requests_ok"], 6);
    assert_eq!(load["hosts"], 2);
    assert_eq!(load["processes"], 50);
    assert_eq!(load["churn"], 0.9);
    // 2 hosts × 50 processes × 9 points per scrape.
    assert_eq!(load["series_per_round"], 900);
    let sent = load["data_points_ok"].as_u64().unwrap();
    assert_eq!(sent, 6 * 450);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if report.exists() && json(&report)["data_points"].as_u64() == Some(sent) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sink did not count {sent} points"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sink.kill().unwrap();
    sink.wait().unwrap();
}

#[test]
fn a_bad_scenario_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("bad.yaml");
    std::fs::write(&scenario, "hostz: 3\n").unwrap();
    let out = Command::new(LOADSIM)
        .arg("--scenario")
        .arg(&scenario)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("hostz"),
        "{stderr}"
    );
}

#[tokio::test]
async fn http_with_gzip_and_the_app_workload() {
    let points = Arc::new(AtomicU64::new(0));
    let histograms = Arc::new(AtomicU64::new(0));
    let (p, h) = (points.clone(), histograms.clone());
    let app = axum::Router::new().route(
        "/v1/metrics",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (points, histograms) = (p.clone(), h.clone());
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                assert_eq!(headers["content-encoding"], "gzip");
                let mut raw = Vec::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut raw)
                    .unwrap();
                let request = ExportMetricsServiceRequest::decode(&raw[..]).unwrap();
                points.fetch_add(phoenix_agent::otlp::data_points(&request), Ordering::SeqCst);
                for m in request
                    .resource_metrics
                    .iter()
                    .flat_map(|rm| &rm.scope_metrics)
                    .flat_map(|sm| &sm.metrics)
                {
                    if let Some(Data::Histogram(hist)) = &m.data {
                        histograms.fetch_add(hist.data_points.len() as u64, Ordering::SeqCst);
                    }
                }
                (
                    StatusCode::OK,
                    ExportMetricsServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("load.json");
    let status = tokio::process::Command::new(LOADSIM)
        .args([
            "--workload",
            "app",
            "--protocol",
            "http",
            "--gzip",
            "--endpoint",
            &format!("http://127.0.0.1:{port}"),
            "--requests",
            "10",
        ])
        .arg("--json")
        .arg(&summary)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let load = json(&summary);
    assert_eq!(load["requests_ok"], 10);
    assert_eq!(load["protocol"], "http");
    assert_eq!(
        load["data_points_ok"].as_u64().unwrap(),
        points.load(Ordering::SeqCst)
    );
    assert!(histograms.load(Ordering::SeqCst) > 0);
}
