//! Shared harness of the end-to-end tests: the real `phoenix-agent` binary on loopback
//! ephemeral ports, an OTLP gRPC sink that records what it receives, and OTLP clients.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tokio::sync::oneshot;

/// The agent binary Cargo built for this test, when the test belongs to the agent crate.
pub const AGENT: &str = match option_env!("CARGO_BIN_EXE_phoenix-agent") {
    Some(path) => path,
    None => "",
};

/// The agent binary: [`AGENT`] in the agent crate's tests; for another crate's tests (the
/// control plane's), the `phoenix-agent` beside the test executable's `deps/` folder, which
/// `cargo test --workspace` (or `-p phoenix-agent -p phoenix-control-plane`) builds from the
/// same tree first. That one is pinned at the first call: hard-linked (or copied) beside the
/// test executable, so a build of another tree into a shared target dir later in the run
/// cannot swap it under the remaining tests.
pub fn agent_bin() -> PathBuf {
    if !AGENT.is_empty() {
        return PathBuf::from(AGENT);
    }
    static PINNED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PINNED
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            let shared = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("target dir")
                .join("phoenix-agent");
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let pinned = exe.with_file_name(format!("{name}-phoenix-agent"));
            let _ = std::fs::remove_file(&pinned);
            if std::fs::hard_link(&shared, &pinned).is_ok()
                || std::fs::copy(&shared, &pinned).is_ok()
            {
                pinned
            } else {
                shared
            }
        })
        .clone()
}

/// A free loopback port, not handed out before by this test binary (see [`free_ports`]).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` free loopback ports, none handed out before by this test binary: its tests run in
/// parallel, and a port picked and released could otherwise be picked again by another test
/// before the first one's agent binds it. All are held until all are picked.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    // A port handed out before stays held as well, so the OS picks another.
    let mut held = Vec::new();
    let mut picked = Vec::with_capacity(N);
    while picked.len() < N {
        let listener = TcpListener::bind("127.0.0.1:0").expect("no free port");
        let port = listener.local_addr().expect("no free port").port();
        if handed_out.insert(port) {
            picked.push(port);
        }
        held.push(listener);
    }
    std::array::from_fn(|i| picked[i])
}

/// A child process (a peer such as Prometheus or a Python client) killed and reaped when
/// dropped, whatever the test's outcome.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running agent whose stderr goes to `log` in its temp dir.
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub telemetry: SocketAddr,
}

/// Placeholders in test configs: `{GRPC}`, `{HTTP}`, `{TELEMETRY}` become free addresses.
pub struct Ports {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub telemetry: SocketAddr,
}

impl Ports {
    pub fn new() -> Self {
        let addr = |p| SocketAddr::from(([127, 0, 0, 1], p));
        let [grpc, http, telemetry] = free_ports();
        Self {
            grpc: addr(grpc),
            http: addr(http),
            telemetry: addr(telemetry),
        }
    }

    pub fn fill(&self, yaml: &str) -> String {
        yaml.replace("{GRPC}", &self.grpc.to_string())
            .replace("{HTTP}", &self.http.to_string())
            .replace("{TELEMETRY}", &self.telemetry.to_string())
    }
}

impl Agent {
    /// Starts the agent on `yaml` (placeholders filled) and waits until `/readyz` says ready.
    pub async fn start(yaml: &str) -> Agent {
        Self::start_with(yaml, Ports::new()).await
    }

    pub async fn start_with(yaml: &str, ports: Ports) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("agent.yaml");
        std::fs::write(&config, ports.fill(yaml)).expect("write config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start phoenix-agent");
        let mut agent = Agent {
            child,
            dir,
            config,
            grpc: ports.grpc,
            http: ports.http,
            telemetry: ports.telemetry,
        };
        agent.wait_ready().await;
        agent
    }

    async fn wait_ready(&mut self) {
        let url = format!("http://{}/readyz", self.telemetry);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited with {status} before ready:\n{}", self.log());
            }
            if let Ok(resp) = reqwest::get(&url).await {
                if resp.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Rewrites the config file (placeholders filled with this agent's addresses).
    pub fn write_config(&self, yaml: &str) {
        let ports = Ports {
            grpc: self.grpc,
            http: self.http,
            telemetry: self.telemetry,
        };
        // Write then rename, as a config management tool would, so the poller never reads
        // half a file.
        let tmp = self.dir.path().join("agent.yaml.tmp");
        std::fs::write(&tmp, ports.fill(yaml)).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("replace config");
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.telemetry))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of the sample `name{labels}` (labels as written by the exporter, in any
    /// order), or 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/metrics", self.http)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds `name{labels}` in Prometheus text; every given label must match.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        let all = labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")));
        if all {
            return value.trim().parse().unwrap_or(f64::NAN);
        }
    }
    0.0
}

/// How a sink answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SinkMode {
    Accept,
    /// Never answers: an exporter stuck on a dead backend.
    Stall,
}

#[derive(Clone)]
struct SinkService {
    received: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    mode: SinkMode,
}

#[tonic::async_trait]
impl MetricsService for SinkService {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if self.mode == SinkMode::Stall {
            std::future::pending::<()>().await;
        }
        self.received
            .lock()
            .expect("sink lock")
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// An OTLP/gRPC server that records every request.
pub struct Sink {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    _stop: oneshot::Sender<()>,
}

impl Sink {
    pub async fn start() -> Sink {
        Self::start_mode(SinkMode::Accept).await
    }

    pub async fn start_mode(mode: SinkMode) -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("sink bind");
        let addr = listener.local_addr().expect("sink addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let service = SinkService {
            received: received.clone(),
            mode,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(
                    MetricsServiceServer::new(service)
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                        .max_decoding_message_size(256 * 1024 * 1024),
                )
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Sink {
            addr,
            received,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.received.lock().expect("sink lock").clone()
    }

    pub fn data_points(&self) -> u64 {
        self.requests()
            .iter()
            .map(phoenix_agent::otlp::data_points)
            .sum()
    }

    /// Waits until at least `n` data points arrived, then a little longer to catch extras.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.data_points() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.data_points()
    }
}

pub async fn grpc_client(agent: &Agent) -> MetricsServiceClient<tonic::transport::Channel> {
    MetricsServiceClient::connect(agent.grpc_url())
        .await
        .expect("connect to agent")
}

/// Every data point as `resource attrs | metric | point attrs | value`, sorted: two requests
/// sets hold the same data exactly when these lists are equal.
pub fn flatten(requests: &[ExportMetricsServiceRequest]) -> Vec<String> {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let mut out = Vec::new();
    for request in requests {
        for rm in &request.resource_metrics {
            let resource = rm
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    let points: Vec<String> = match &m.data {
                        Some(Data::Sum(s)) => s
                            .data_points
                            .iter()
                            .map(|p| format!("{}={:?}", attrs(&p.attributes), p.value))
                            .collect(),
                        Some(Data::Gauge(g)) => g
                            .data_points
                            .iter()
                            .map(|p| format!("{}={:?}", attrs(&p.attributes), p.value))
                            .collect(),
                        other => vec![format!("{other:?}")],
                    };
                    for p in points {
                        out.push(format!("{resource}|{}|{p}", m.name));
                    }
                }
            }
        }
    }
    out.sort();
    out
}

pub fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> String {
    let mut parts: Vec<String> = kvs
        .iter()
        .map(|kv| {
            let value = kv
                .value
                .as_ref()
                .and_then(|v| v.value.as_ref())
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            format!("{}:{}", kv.key, value)
        })
        .collect();
    parts.sort();
    parts.join(",")
}

/// Attribute lookup on a decoded attribute list.
pub fn attr<'a>(
    kvs: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<&'a opentelemetry_proto::tonic::common::v1::any_value::Value> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

/// Counts by key, for readable assertion failures.
pub fn histogram<I: IntoIterator<Item = String>>(items: I) -> HashMap<String, usize> {
    let mut map = HashMap::new();
    for item in items {
        *map.entry(item).or_default() += 1;
    }
    map
}
