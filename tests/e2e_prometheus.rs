//! A real Prometheus scrapes the agent's `/metrics`: the exposition must parse, and the
//! pipeline counters Prometheus stores must equal what was sent through each pipeline.
//!
//! Needs a Prometheus binary: `$PHOENIX_TEST_PROMETHEUS`, else `prometheus` on the PATH.
//! `./scripts/test` installs one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use phoenix_agent::otlp::testdata;
use serde_json::Value as Json;
use support::*;

const JOB: &str = "phoenix-agent";

/// Baseline forwards everything to the sink; the shadow candidate drops one metric of three.
const CONFIG: &str = r#"
receivers:
  otlp:
    protocols:
      grpc: { endpoint: "{GRPC}" }
processors:
  filter/no-metric-1:
    exclude: { metric_names: ["process.metric.1"] }
exporters:
  otlp: { endpoint: "{SINK}" }
  blackhole: {}
pipelines:
  baseline:
    receivers: [otlp]
    exporters: [otlp]
  candidate:
    receivers: [otlp]
    processors: [filter/no-metric-1]
    exporters: [blackhole]
    shadow: true
telemetry: { listen: "{TELEMETRY}" }
"#;

/// The Prometheus binary; panics (the test fails) when there is none.
fn prometheus_binary() -> String {
    let binary = std::env::var("PHOENIX_TEST_PROMETHEUS")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "prometheus".to_string());
    match Command::new(&binary).arg("--version").output() {
        Ok(out) if out.status.success() => binary,
        Ok(out) => panic!(
            "{binary:?} --version failed ({}): run the tests with ./scripts/test, which \
             installs Prometheus (or set PHOENIX_TEST_PROMETHEUS)\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) => panic!(
            "cannot run Prometheus {binary:?} ({err}): run the tests with ./scripts/test, which \
             installs it (or set PHOENIX_TEST_PROMETHEUS to its path)"
        ),
    }
}

/// A Prometheus on a loopback port, scraping `target` every second.
struct Prometheus {
    // Dropped first: the process dies before its directory is removed.
    process: KillOnDrop,
    dir: tempfile::TempDir,
    url: String,
    http: reqwest::Client,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let binary = prometheus_binary();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: {JOB}
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"#
            ),
        )
        .unwrap_or_else(|e| panic!("write prometheus.yml: {e}"));
        let listen = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("log"))
            .unwrap_or_else(|e| panic!("prometheus log file: {e}"));
        let mut command = Command::new(binary);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key
                .to_string_lossy()
                .to_ascii_lowercase()
                .ends_with("_proxy")
            {
                command.env_remove(&key);
            }
        }
        let process = KillOnDrop(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("start prometheus: {e}")),
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|e| panic!("HTTP client: {e}"));
        Prometheus {
            process,
            dir,
            url: format!("http://{listen}"),
            http,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer, or why there is none yet.
    async fn api(&mut self, path: &str, params: &[(&str, &str)]) -> Result<Json, String> {
        if let Ok(Some(status)) = self.process.0.try_wait() {
            panic!("prometheus exited with {status}:\n{}", self.log());
        }
        let resp = self
            .http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| e.to_string())?;
        let json: Json = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if !status.is_success() || json["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(json["data"].clone())
    }

    /// Instant query: label set (without `__name__`, `job`, `instance`) → value.
    async fn query(&mut self, promql: &str) -> Result<BTreeMap<String, f64>, String> {
        let data = self.api("query", &[("query", promql)]).await?;
        let mut out = BTreeMap::new();
        for series in data["result"].as_array().into_iter().flatten() {
            let labels: Vec<String> = series["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !matches!(k.as_str(), "__name__" | "job" | "instance"))
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("bad sample in {series}"))?;
            out.insert(labels.join(","), value);
        }
        Ok(out)
    }

    /// Polls `promql` until `done` holds for its result; panics after `timeout`.
    async fn wait_for(
        &mut self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> BTreeMap<String, f64> {
        let deadline = Instant::now() + timeout;
        let mut last = Err("no answer yet".to_string());
        while Instant::now() < deadline {
            last = self.query(promql).await;
            if let Ok(result) = &last {
                if done(result) {
                    return result.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "Prometheus never answered `{promql}` as expected in {timeout:?}; last: {last:?}\n{}",
            self.log()
        );
    }
}

/// Waits until the agent's own `/metrics` shows `value` for `name{labels}`.
async fn wait_for_self_metric(agent: &Agent, name: &str, labels: &[(&str, &str)], value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = agent.metric(name, labels).await;
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {now}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `count` copies of `request` and waits until both pipelines have output them.
async fn send(
    agent: &Agent,
    sink: &Sink,
    request: &phoenix_agent::otlp::ExportMetricsServiceRequest,
    count: u64,
    baseline_total: u64,
    candidate_total: u64,
) {
    let mut client = grpc_client(agent).await;
    for _ in 0..count {
        if let Err(status) = client.export(request.clone()).await {
            panic!("gRPC export refused: {status}");
        }
    }
    assert_eq!(
        sink.wait_for(baseline_total, Duration::from_secs(10)).await,
        baseline_total
    );
    wait_for_self_metric(
        agent,
        "phoenix_pipeline_output_datapoints_total",
        &[("pipeline", "candidate")],
        candidate_total as f64,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_exact_pipeline_counters() {
    // Fail early, before anything starts, when Prometheus is missing.
    prometheus_binary();
    let sink = Sink::start().await;
    let agent = Agent::start(&CONFIG.replace("{SINK}", &sink.url())).await;

    // 4 resources x 3 metrics x 5 points = 60 points a request, 40 without process.metric.1.
    let request = testdata::request(4, 3, 5);
    send(&agent, &sink, &request, 5, 300, 200).await;

    let mut prometheus = Prometheus::start(agent.telemetry);
    let wait = Duration::from_secs(30);
    let both = |r: &BTreeMap<String, f64>| r.len() >= 2;
    let outputs = prometheus
        .wait_for("phoenix_pipeline_output_datapoints_total", wait, both)
        .await;
    assert_eq!(
        outputs,
        BTreeMap::from([
            ("pipeline=baseline".to_string(), 300.0),
            ("pipeline=candidate".to_string(), 200.0),
        ])
    );

    // The scrape itself is healthy: up, no error, samples ingested.
    let up = prometheus
        .query(&format!("up{{job=\"{JOB}\"}}"))
        .await
        .expect("query up");
    assert_eq!(up, BTreeMap::from([(String::new(), 1.0)]));
    let targets = prometheus
        .api("targets", &[("state", "active")])
        .await
        .expect("targets");
    let active = targets["activeTargets"].as_array().expect("activeTargets");
    assert_eq!(active.len(), 1, "{targets}");
    assert_eq!(active[0]["health"], "up", "{targets}");
    assert_eq!(active[0]["lastError"], "", "{targets}");
    assert_eq!(
        active[0]["scrapeUrl"],
        format!("http://{}/metrics", agent.telemetry)
    );

    // Other counters agree.
    let accepted = prometheus
        .query("phoenix_receiver_accepted_datapoints_total")
        .await
        .expect("query accepted");
    assert_eq!(
        accepted,
        BTreeMap::from([("receiver=otlp,transport=grpc".to_string(), 300.0)])
    );
    let sent = prometheus
        .query("phoenix_exporter_sent_datapoints_total")
        .await
        .expect("query sent");
    assert_eq!(
        sent,
        BTreeMap::from([
            ("exporter=blackhole".to_string(), 200.0),
            ("exporter=otlp".to_string(), 300.0),
        ])
    );

    // Prometheus took the metadata: counters are typed as counters, with their help text.
    let metadata = prometheus
        .api(
            "metadata",
            &[("metric", "phoenix_pipeline_output_datapoints_total")],
        )
        .await
        .expect("metadata");
    let entry = &metadata["phoenix_pipeline_output_datapoints_total"][0];
    assert_eq!(entry["type"], "counter", "{metadata}");
    assert!(
        entry["help"]
            .as_str()
            .is_some_and(|h| h.contains("leaving a pipeline")),
        "{metadata}"
    );

    // Later scrapes follow the counters as they grow.
    send(&agent, &sink, &request, 3, 480, 320).await;
    let grown = prometheus
        .wait_for("phoenix_pipeline_output_datapoints_total", wait, |r| {
            r.get("pipeline=baseline") == Some(&480.0)
                && r.get("pipeline=candidate") == Some(&320.0)
        })
        .await;
    assert_eq!(
        grown,
        BTreeMap::from([
            ("pipeline=baseline".to_string(), 480.0),
            ("pipeline=candidate".to_string(), 320.0),
        ])
    );
}
