//! `phoenix-fleetsim`: a fleet of simulated agents against a real `phoenix-control-plane`.
//!
//! Starts `phoenix-control-plane serve` on 127.0.0.1 with a temporary SQLite database (tokens
//! made with its own `token create`), or uses one given with `--endpoint`. Opens `--agents`
//! `AgentService.Connect` streams that speak the protocol as `phoenix-agent` does: hello
//! (node `sim-NNNN`, labels `fleet=sim`, `group=a|b`), a volume report every
//! `--report-interval` and a heartbeat every 15 s from the moment the stream is open, and on
//! an offer `APPLYING`, then `APPLIED` after `--apply-delay`. Then, for each value of
//! `--max-unavailable`, it creates a rollout through the REST API targeting every simulated
//! agent and measures the time from the create request to each agent's APPLIED (as the agent
//! sends it) and to the rollout reported `succeeded`. Last, a report phase of `--reports`
//! reports from every agent: the control plane's CPU time (utime + stime of
//! `/proc/PID/stat`) per report received, and its RSS (`VmRSS`, `VmHWM`).
//!
//! Everything stays on 127.0.0.1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use phoenix_proto::v1::agent_message::Body as AgentBody;
use phoenix_proto::v1::agent_service_client::AgentServiceClient;
use phoenix_proto::v1::server_message::Body as ServerBody;
use phoenix_proto::v1::{
    AgentHello, AgentMessage, ConfigOffer, ConfigState, ConfigStatus, Heartbeat, OfferRole,
    PipelineVolume, VolumeReport,
};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// hyper's default `SETTINGS_MAX_CONCURRENT_STREAMS` for an HTTP/2 server connection.
const MAX_STREAMS_PER_CONNECTION: usize = 200;
/// As `phoenix-agent` (`agent/src/control/client.rs`).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
const CAPABILITIES: [&str; 4] = [
    "offers.candidate",
    "offers.baseline",
    "offers.clear",
    "reports.volume",
];
/// Linux `USER_HZ`: the unit of utime and stime in `/proc/PID/stat`.
const CLOCK_TICKS_PER_S: f64 = 100.0;

#[derive(Debug, Parser)]
#[command(
    name = "phoenix-fleetsim",
    about = "Simulated agents against a real control plane: rollout time to APPLIED, control-plane CPU per report and RSS"
)]
struct Args {
    /// Simulated agents (one `AgentService.Connect` stream each).
    #[arg(long, default_value_t = 2000)]
    agents: usize,
    /// Agent streams per HTTP/2 connection. 1 is what a real fleet looks like (one host, one
    /// connection); up to 200 (hyper's default stream limit per connection).
    #[arg(long, default_value_t = 1)]
    agents_per_connection: usize,
    /// Connections being opened at once while the fleet connects.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Time between two volume reports of one agent.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// Simulated time an agent takes to apply an offer (between APPLYING and APPLIED).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    apply_delay: Duration,
    /// One rollout per value, one after the other: agents changed at once (`all` = every
    /// agent in one wave; 1 is the API's default).
    #[arg(long, value_delimiter = ',', default_value = "all,1")]
    max_unavailable: Vec<String>,
    /// Reports from every agent in the report phase (0 skips it).
    #[arg(long, default_value_t = 3)]
    reports: u64,
    /// Give up on a rollout (or the report phase) after this long.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Use a running control plane at this URL instead of starting one (then give
    /// `--agent-token`, `--admin-token` and, for CPU and RSS, `--control-plane-pid`).
    #[arg(long, requires_all = ["agent_token", "admin_token"])]
    endpoint: Option<String>,
    #[arg(long)]
    agent_token: Option<String>,
    #[arg(long)]
    admin_token: Option<String>,
    /// PID of the control plane given with `--endpoint`, to read its CPU and RSS.
    #[arg(long)]
    control_plane_pid: Option<u32>,
    /// The `phoenix-control-plane` binary; by default the one next to this binary.
    #[arg(long)]
    control_plane: Option<PathBuf>,
    /// Directory for the temporary database and the control plane's log (a fresh temporary
    /// directory by default, removed at the end unless `--keep`).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the temporary directory (database, control-plane log).
    #[arg(long)]
    keep: bool,
    /// `RUST_LOG` of the started control plane.
    #[arg(long, default_value = "info")]
    control_plane_log: String,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------
// Measurements

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ProcSample {
    cpu_s: f64,
    rss_bytes: u64,
    hwm_bytes: u64,
}

fn proc_sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat:?}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the paren: field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let tick = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64 / CLOCK_TICKS_PER_S)
            .ok_or_else(|| anyhow!("no CPU field {i} in /proc/{pid}/stat"))
    };
    let cpu_s = tick(11)? + tick(12)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_default()
            * 1024
    };
    Ok(ProcSample {
        cpu_s,
        rss_bytes: kb("VmRSS:"),
        hwm_bytes: kb("VmHWM:"),
    })
}

#[derive(Debug, Clone, Default, Serialize)]
struct Percentiles {
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn percentiles(mut values: Vec<Duration>) -> Percentiles {
    values.sort();
    let at = |q: f64| -> f64 {
        if values.is_empty() {
            return 0.0;
        }
        // Nearest rank.
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1].as_secs_f64() * 1e3
    };
    Percentiles {
        count: values.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// What the simulated agents share with the coordinator.
struct Shared {
    /// (agent index, offer hash, when APPLIED was handed to the stream).
    applied: mpsc::UnboundedSender<(usize, String, Instant)>,
    /// Reports sent, per agent.
    reports: Vec<AtomicU64>,
    heartbeats: AtomicU64,
    /// Streams that ended or failed before the end of the run (with the first error).
    lost: mpsc::UnboundedSender<(usize, String)>,
}

// ---------------------------------------------------------------------------------------
// One simulated agent

struct AgentSpec {
    index: usize,
    node: String,
    labels: HashMap<String, String>,
    token: String,
    report_interval: Duration,
    apply_delay: Duration,
}

fn message(body: AgentBody) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn report(index: usize, n: u64) -> VolumeReport {
    // Two pipelines of a host scraping ~5,400 data points every 10 s (the `process` workload).
    let points = 5_400 * (n + 1);
    VolumeReport {
        pipelines: vec![
            PipelineVolume {
                pipeline: "metrics".into(),
                datapoints: points,
                bytes: points * 140,
                series_window: 5_400,
                series_total: 5_400 + 30 * n,
                dropped_datapoints: 0,
                ..Default::default()
            },
            PipelineVolume {
                pipeline: "candidate".into(),
                datapoints: points / 3,
                bytes: points * 45,
                series_window: 1_800,
                series_total: 1_800 + 10 * n,
                dropped_datapoints: 0,
                ..Default::default()
            },
        ],
        refused_datapoints: 0,
        cpu_seconds: 0.02 * (n + 1) as f64,
        rss_bytes: 40 * 1024 * 1024 + (index as u64 % 7) * 1024 * 1024,
        unix_millis: unix_millis(),
    }
}

/// Opens the agent's stream (returns once the control plane registered it) and spawns the
/// loop that runs it until `stop`.
async fn open_agent(
    channel: Channel,
    spec: AgentSpec,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(32);
    let hello = AgentHello {
        node: spec.node.clone(),
        labels: spec.labels.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        effective_config_hash: phoenix_proto::document_hash("local"),
        applied_offer_hash: String::new(),
    };
    tx.send(message(AgentBody::Hello(hello)))
        .await
        .map_err(|_| anyhow!("{}: stream closed before the hello", spec.node))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let value = format!("Bearer {}", spec.token)
        .parse()
        .map_err(|_| anyhow!("the agent token is not a valid header value"))?;
    request.metadata_mut().insert("authorization", value);
    let inbound = client
        .connect(request)
        .await
        .map_err(|s| {
            anyhow!(
                "{}: Connect answered {}: {}",
                spec.node,
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    tokio::spawn(async move {
        let index = spec.index;
        let node = spec.node.clone();
        let result = run_agent(spec, inbound, tx, &shared, stop).await;
        if let Err(err) = result {
            let _ = shared.lost.send((index, format!("{node}: {err:#}")));
        }
    });
    Ok(())
}

async fn run_agent(
    spec: AgentSpec,
    mut inbound: tonic::Streaming<phoenix_proto::v1::ServerMessage>,
    tx: mpsc::Sender<AgentMessage>,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let send = |body: AgentBody| {
        let tx = tx.clone();
        async move {
            tx.send(message(body))
                .await
                .map_err(|_| anyhow!("the stream closed"))
        }
    };
    let mut effective = phoenix_proto::document_hash("local");
    let mut reports = tokio::time::interval(spec.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_reports = 0u64;
    loop {
        tokio::select! {
            received = inbound.message() => match received {
                Err(status) => bail!("stream error {}: {}", status.code(), status.message()),
                Ok(None) => bail!("the control plane closed the stream"),
                Ok(Some(msg)) => match msg.body {
                    Some(ServerBody::Offer(offer)) => {
                        let status = handle_offer(&offer, &mut effective, spec.apply_delay, &send).await?;
                        let applied = status.state == ConfigState::Applied as i32;
                        send(AgentBody::Status(status)).await?;
                        if applied {
                            let _ = shared.applied.send((spec.index, offer.hash.clone(), Instant::now()));
                        }
                    }
                    Some(ServerBody::Heartbeat(_)) | None => {}
                },
            },
            _ = reports.tick() => {
                send(AgentBody::Report(report(spec.index, sent_reports))).await?;
                sent_reports += 1;
                if let Some(counter) = shared.reports.get(spec.index) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = heartbeats.tick() => {
                send(AgentBody::Heartbeat(Heartbeat { unix_millis: unix_millis() })).await?;
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return Ok(()),
        }
    }
}

/// As the real agent: check the envelope, APPLYING, apply (here: wait), APPLIED.
async fn handle_offer<F, Fut>(
    offer: &ConfigOffer,
    effective: &mut String,
    apply_delay: Duration,
    send: &F,
) -> Result<ConfigStatus>
where
    F: Fn(AgentBody) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let role = OfferRole::try_from(offer.role).ok();
    let failed = |message: String| ConfigStatus {
        offer_hash: offer.hash.clone(),
        state: ConfigState::Failed as i32,
        message,
        effective_config_hash: effective.clone(),
    };
    match role {
        Some(OfferRole::Candidate | OfferRole::Baseline | OfferRole::Clear) => {}
        _ => return Ok(failed(format!("unknown offer role {}", offer.role))),
    }
    if role != Some(OfferRole::Clear) && phoenix_proto::document_hash(&offer.document) != offer.hash
    {
        return Ok(failed(format!(
            "offer hash {} does not match its document",
            offer.hash
        )));
    }
    send(AgentBody::Status(ConfigStatus {
        offer_hash: offer.hash.clone(),
        state: ConfigState::Applying as i32,
        message: String::new(),
        effective_config_hash: effective.clone(),
    }))
    .await?;
    if !apply_delay.is_zero() {
        tokio::time::sleep(apply_delay).await;
    }
    *effective = phoenix_proto::document_hash(&format!("local+{}", offer.hash));
    Ok(ConfigStatus {
        offer_hash: offer.hash.clone(),
        state: ConfigState::Applied as i32,
        message: String::new(),
        effective_config_hash: effective.clone(),
    })
}

// ---------------------------------------------------------------------------------------
// The control plane

struct StartedControlPlane {
    child: Child,
    log: PathBuf,
}

impl Drop for StartedControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn control_plane_binary(args: &Args) -> Result<PathBuf> {
    if let Some(path) = &args.control_plane {
        return Ok(path.clone());
    }
    let me = std::env::current_exe().context("cannot find this binary's path")?;
    let candidate = me
        .parent()
        .map(|dir| dir.join("phoenix-control-plane"))
        .ok_or_else(|| anyhow!("{} has no parent directory", me.display()))?;
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "no phoenix-control-plane next to this binary ({}): build it (cargo build --release -p phoenix-control-plane) or give --control-plane PATH",
            candidate.display()
        )
    }
}

fn create_token(binary: &Path, db: &Path, name: &str, role: &str) -> Result<String> {
    let out = Command::new(binary)
        .args(["token", "create", "--db"])
        .arg(db)
        .args(["--name", name, "--role", role])
        .output()
        .with_context(|| format!("running {} token create", binary.display()))?;
    if !out.status.success() {
        bail!(
            "token create --role {role} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if token.is_empty() {
        bail!("token create --role {role} printed nothing");
    }
    Ok(token)
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

async fn wait_ready(http: &reqwest::Client, url: &str, cp: &mut StartedControlPlane) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = cp.child.try_wait() {
            bail!(
                "the control plane exited ({status}); its log {}:\n{}",
                cp.log.display(),
                tail(&cp.log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the control plane was not ready within 30 s; its log {}:\n{}",
                cp.log.display(),
                tail(&cp.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// REST

async fn api(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut request = http
        .request(method.clone(), &url)
        .header("authorization", format!("Bearer {token}"));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .with_context(|| format!("{method} {url}: reading the answer"))?;
    if !status.is_success() {
        bail!(
            "{method} {url} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{method} {url}: answer is not JSON"))
}

#[derive(Debug, Clone, Serialize)]
struct RolloutResult {
    max_unavailable: u32,
    waves: usize,
    rollout_id: i64,
    state: String,
    /// Time the create request took (the control plane picks targets and stores deployments).
    create_ms: f64,
    /// Per agent: create request sent → the agent sent APPLIED.
    applied: Percentiles,
    /// Create request sent → the control plane lists the rollout `succeeded` (polled every 50 ms).
    finished_ms: f64,
    /// Control-plane CPU during the rollout.
    cpu_s: f64,
}

#[allow(clippy::too_many_arguments)]
async fn run_rollout(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    max_unavailable: u32,
    n: usize,
    seq: usize,
    applied_rx: &mut mpsc::UnboundedReceiver<(usize, String, Instant)>,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<RolloutResult> {
    let name = format!("fleetsim-{}-{seq}", unix_millis());
    let document = format!(
        "exporters:\n  blackhole/{name}: {{}}\npipelines:\n  {name}: {{ receivers: [otlp], exporters: [blackhole/{name}], shadow: true }}\n"
    );
    let hash = phoenix_proto::document_hash(&document);
    // Acks of an earlier rollout that arrived late are not this one's.
    while applied_rx.try_recv().is_ok() {}
    let cpu0 = pid.map(proc_sample).transpose()?;
    let t0 = Instant::now();
    let created = api(
        http,
        reqwest::Method::POST,
        format!("{url}/api/v1/rollouts"),
        admin,
        Some(serde_json::json!({
            "selector": "fleet=sim",
            "document": document,
            "role": "candidate",
            "max_unavailable": max_unavailable,
        })),
    )
    .await
    .context("creating the rollout")?;
    let create_ms = t0.elapsed().as_secs_f64() * 1e3;
    let id = created
        .get("id")
        .and_then(Value::as_i64)
        .ok_or_else(|| anyhow!("the created rollout has no id: {created}"))?;
    let targets = created
        .get("deployments")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or_default();
    if targets != n {
        bail!("rollout {id} targets {targets} agents, expected {n}");
    }
    let deadline = t0 + timeout;
    let mut applied: Vec<Option<Duration>> = vec![None; n];
    let mut applied_count = 0;
    let mut finished: Option<(Duration, String)> = None;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    while applied_count < n || finished.is_none() {
        if Instant::now() > deadline {
            bail!(
                "rollout {id} (max_unavailable {max_unavailable}): after {timeout:?}, {applied_count} of {n} agents acked APPLIED, state {}",
                finished.as_ref().map(|(_, s)| s.as_str()).unwrap_or("running")
            );
        }
        tokio::select! {
            event = applied_rx.recv() => {
                let Some((agent, offer, at)) = event else { bail!("every agent stopped") };
                if offer == hash {
                    if let Some(slot) = applied.get_mut(agent) {
                        if slot.is_none() {
                            *slot = Some(at.saturating_duration_since(t0));
                            applied_count += 1;
                        }
                    }
                }
            }
            _ = poll.tick(), if finished.is_none() => {
                let list = api(http, reqwest::Method::GET, format!("{url}/api/v1/rollouts"), admin, None).await?;
                let state = list
                    .as_array()
                    .and_then(|rs| rs.iter().find(|r| r.get("id").and_then(Value::as_i64) == Some(id)))
                    .and_then(|r| r.get("state"))
                    .and_then(Value::as_str)
                    .unwrap_or("missing")
                    .to_string();
                match state.as_str() {
                    "running" => {}
                    "succeeded" => finished = Some((t0.elapsed(), state)),
                    other => {
                        let detail = api(http, reqwest::Method::GET, format!("{url}/api/v1/rollouts/{id}"), admin, None).await?;
                        bail!(
                            "rollout {id} ended {other}: {}",
                            detail.get("reason").and_then(Value::as_str).unwrap_or("")
                        );
                    }
                }
            }
        }
    }
    let cpu1 = pid.map(proc_sample).transpose()?;
    let (finished_at, state) = finished.unwrap_or_default();
    Ok(RolloutResult {
        max_unavailable,
        waves: n.div_ceil(max_unavailable.max(1) as usize),
        rollout_id: id,
        state,
        create_ms,
        applied: percentiles(applied.into_iter().flatten().collect()),
        finished_ms: finished_at.as_secs_f64() * 1e3,
        cpu_s: match (cpu0, cpu1) {
            (Some(a), Some(b)) => b.cpu_s - a.cpu_s,
            _ => 0.0,
        },
    })
}

// ---------------------------------------------------------------------------------------

#[derive(Debug, Default, Serialize)]
struct Summary {
    agents: usize,
    connections: usize,
    report_interval_s: f64,
    apply_delay_ms: f64,
    /// All streams opened (hello answered, agent registered by the control plane).
    connect_all_ms: f64,
    /// Per agent: its connection and stream open, from the start of the connect phase.
    connect: Percentiles,
    rss_after_connect_bytes: u64,
    rollouts: Vec<RolloutResult>,
    report_phase: Option<ReportPhase>,
    control_plane_end: Option<ProcSample>,
    simulator_cpu_s: f64,
}

#[derive(Debug, Default, Serialize)]
struct ReportPhase {
    reports_per_agent: u64,
    reports: u64,
    heartbeats: u64,
    seconds: f64,
    reports_per_s: f64,
    cpu_s: f64,
    /// Control-plane CPU over the phase divided by the reports received in it (the
    /// phase's heartbeats, about 1 for every 1.5 reports at 10 s, are included).
    cpu_us_per_report: f64,
    /// Control-plane CPU share of one core over the phase.
    cpu_cores: f64,
    rss_bytes: u64,
    hwm_bytes: u64,
}

fn parse_max_unavailable(values: &[String], n: usize) -> Result<Vec<u32>> {
    values
        .iter()
        .map(|v| match v.trim() {
            "all" => u32::try_from(n).map_err(|_| anyhow!("too many agents")),
            v => match v.parse::<u32>() {
                Ok(0) | Err(_) => bail!("--max-unavailable: {v:?} is not `all` or a number ≥ 1"),
                Ok(m) => Ok(m),
            },
        })
        .collect()
}

async fn run(args: Args) -> Result<Summary> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if args.agents_per_connection == 0 || args.agents_per_connection > MAX_STREAMS_PER_CONNECTION {
        bail!(
            "--agents-per-connection must be 1 to {MAX_STREAMS_PER_CONNECTION} (the control plane's HTTP/2 stream limit per connection)"
        );
    }
    if args.report_interval < Duration::from_millis(10) {
        bail!("--report-interval must be at least 10ms");
    }
    let waves = parse_max_unavailable(&args.max_unavailable, args.agents)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .context("HTTP client")?;

    // The control plane: started here, or given.
    let mut tempdir: Option<PathBuf> = None;
    let mut started: Option<StartedControlPlane> = None;
    let (url, agent_token, admin_token, pid) = match &args.endpoint {
        Some(endpoint) => (
            endpoint.trim_end_matches('/').to_string(),
            args.agent_token.clone().unwrap_or_default(),
            args.admin_token.clone().unwrap_or_default(),
            args.control_plane_pid,
        ),
        None => {
            let binary = control_plane_binary(&args)?;
            let dir = match &args.work_dir {
                Some(dir) => dir.clone(),
                None => {
                    let dir = std::env::temp_dir()
                        .join(format!("phoenix-fleetsim-{}", std::process::id()));
                    tempdir = Some(dir.clone());
                    dir
                }
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let db = dir.join("cp.db");
            let agent_token = create_token(&binary, &db, "fleetsim-agents", "agent")?;
            let admin_token = create_token(&binary, &db, "fleetsim", "admin")?;
            let port = free_port()?;
            let log = dir.join("control-plane.log");
            let child = Command::new(&binary)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
                .arg(&db)
                .env("RUST_LOG", &args.control_plane_log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(&log)
                        .with_context(|| format!("creating {}", log.display()))?,
                )
                .spawn()
                .with_context(|| format!("starting {} serve", binary.display()))?;
            let pid = child.id();
            let mut cp = StartedControlPlane { child, log };
            let url = format!("http://127.0.0.1:{port}");
            wait_ready(&http, &url, &mut cp).await?;
            eprintln!(
                "control plane {} (pid {pid}) on {url}, db {}",
                binary.display(),
                db.display()
            );
            started = Some(cp);
            (url, agent_token, admin_token, Some(pid))
        }
    };
    if !url.starts_with("http://127.0.0.1") && !url.starts_with("http://localhost") {
        bail!("--endpoint must be an http://127.0.0.1 address, got {url}");
    }

    let result = simulate(&args, &http, &url, &agent_token, &admin_token, pid, &waves).await;
    // On failure, the end of the control plane's log (read before its directory goes).
    let log_tail = match (&result, &started) {
        (Err(_), Some(cp)) => Some((cp.log.clone(), tail(&cp.log))),
        _ => None,
    };
    drop(started);
    if let (Some(dir), false) = (&tempdir, args.keep) {
        let _ = std::fs::remove_dir_all(dir);
    }
    match (result, log_tail) {
        (Err(err), Some((log, tail))) => Err(anyhow!(
            "{err:#}\ncontrol-plane log {} ends with:\n{tail}",
            log.display()
        )),
        (result, _) => result,
    }
}

#[allow(clippy::too_many_arguments)]
async fn simulate(
    args: &Args,
    http: &reqwest::Client,
    url: &str,
    agent_token: &str,
    admin_token: &str,
    pid: Option<u32>,
    waves: &[u32],
) -> Result<Summary> {
    let n = args.agents;
    let (applied_tx, mut applied_rx) = mpsc::unbounded_channel();
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        applied: applied_tx,
        reports: (0..n).map(|_| AtomicU64::new(0)).collect(),
        heartbeats: AtomicU64::new(0),
        lost: lost_tx,
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Connect phase: connections opened `connect_concurrency` at a time; each connection
    // carries `agents_per_connection` streams.
    eprintln!(
        "connecting {n} agents over {} connection(s)...",
        n.div_ceil(args.agents_per_connection)
    );
    let endpoint = Endpoint::from_shared(url.to_string())
        .context("the control plane URL")?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(HEARTBEAT_INTERVAL)
        .keep_alive_timeout(Duration::from_secs(10));
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let t_connect = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let connections = n.div_ceil(args.agents_per_connection);
    for c in 0..connections {
        let endpoint = endpoint.clone();
        let gate = gate.clone();
        let shared = shared.clone();
        let stop = stop_rx.clone();
        let token = agent_token.to_string();
        let first = c * args.agents_per_connection;
        let last = (first + args.agents_per_connection).min(n);
        let report_interval = args.report_interval;
        let apply_delay = args.apply_delay;
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("connection {c}: cannot connect"))?;
            let mut opened = Vec::new();
            let mut streams = tokio::task::JoinSet::new();
            for index in first..last {
                let spec = AgentSpec {
                    index,
                    node: format!("sim-{index:04}"),
                    labels: HashMap::from([
                        ("fleet".to_string(), "sim".to_string()),
                        (
                            "group".to_string(),
                            if index % 2 == 0 { "a" } else { "b" }.to_string(),
                        ),
                    ]),
                    token: token.clone(),
                    report_interval,
                    apply_delay,
                };
                streams.spawn(open_agent(
                    channel.clone(),
                    spec,
                    shared.clone(),
                    stop.clone(),
                ));
            }
            while let Some(done) = streams.join_next().await {
                done??;
                opened.push(t_connect.elapsed());
            }
            anyhow::Ok(opened)
        });
    }
    let mut connect_times = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        connect_times.extend(done.context("a connect task panicked")??);
    }
    let connect_all = t_connect.elapsed();
    let connect = percentiles(connect_times);
    eprintln!(
        "{n} agents connected in {:.2} s (per agent p50 {:.0} ms, p99 {:.0} ms)",
        connect_all.as_secs_f64(),
        connect.p50_ms,
        connect.p99_ms
    );
    let listed = api(
        http,
        reqwest::Method::GET,
        format!("{url}/api/v1/agents?selector=fleet%3Dsim"),
        admin_token,
        None,
    )
    .await?;
    let connected = listed
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x.get("connected").and_then(Value::as_bool) == Some(true))
                .count()
        })
        .unwrap_or_default();
    if connected != n {
        bail!("the control plane lists {connected} simulated agents connected, expected {n}");
    }
    let after_connect = pid.map(proc_sample).transpose()?;

    let mut summary = Summary {
        agents: n,
        connections,
        report_interval_s: args.report_interval.as_secs_f64(),
        apply_delay_ms: args.apply_delay.as_secs_f64() * 1e3,
        connect_all_ms: connect_all.as_secs_f64() * 1e3,
        connect,
        rss_after_connect_bytes: after_connect.map(|s| s.rss_bytes).unwrap_or_default(),
        ..Summary::default()
    };

    let check_lost = |lost_rx: &mut mpsc::UnboundedReceiver<(usize, String)>| -> Result<()> {
        let mut lost = Vec::new();
        while let Ok((_, why)) = lost_rx.try_recv() {
            lost.push(why);
        }
        if lost.is_empty() {
            Ok(())
        } else {
            bail!(
                "{} agent stream(s) ended early, e.g. {}",
                lost.len(),
                lost.first().map(String::as_str).unwrap_or_default()
            )
        }
    };

    for (seq, &max_unavailable) in waves.iter().enumerate() {
        eprintln!("rollout with max_unavailable {max_unavailable}...");
        let result = run_rollout(
            http,
            url,
            admin_token,
            max_unavailable,
            n,
            seq,
            &mut applied_rx,
            pid,
            args.timeout,
        )
        .await?;
        check_lost(&mut lost_rx)?;
        eprintln!(
            "  APPLIED p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; succeeded after {:.0} ms",
            result.applied.p50_ms, result.applied.p99_ms, result.applied.max_ms, result.finished_ms
        );
        summary.rollouts.push(result);
    }

    if args.reports > 0 {
        eprintln!(
            "report phase: {} reports from every agent (~{:.0} s)...",
            args.reports,
            args.report_interval.as_secs_f64() * args.reports as f64
        );
        let counts = |shared: &Shared| -> Vec<u64> {
            shared
                .reports
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect()
        };
        // Start right after a report of the agent that reported last, so every agent's
        // next `reports` reports fall in the phase.
        let start_counts = counts(&shared);
        let start_heartbeats = shared.heartbeats.load(Ordering::Relaxed);
        let s0 = pid.map(proc_sample).transpose()?;
        let t0 = Instant::now();
        let deadline = t0 + args.timeout;
        loop {
            let now = counts(&shared);
            if now
                .iter()
                .zip(&start_counts)
                .all(|(a, b)| a.saturating_sub(*b) >= args.reports)
            {
                break;
            }
            check_lost(&mut lost_rx)?;
            if Instant::now() > deadline {
                bail!("the report phase did not end within {:?}", args.timeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = t0.elapsed().as_secs_f64();
        // Let the last reports reach the control plane and be processed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s1 = pid.map(proc_sample).transpose()?;
        let reports: u64 = counts(&shared)
            .iter()
            .zip(&start_counts)
            .map(|(a, b)| a.saturating_sub(*b))
            .sum();
        let heartbeats = shared.heartbeats.load(Ordering::Relaxed) - start_heartbeats;
        let cpu_s = match (s0, s1) {
            (Some(a), Some(b)) => b.cpu_s - a.cpu_s,
            _ => 0.0,
        };
        let wall = seconds + 0.2;
        summary.report_phase = Some(ReportPhase {
            reports_per_agent: args.reports,
            reports,
            heartbeats,
            seconds,
            reports_per_s: reports as f64 / seconds,
            cpu_s,
            cpu_us_per_report: cpu_s * 1e6 / reports.max(1) as f64,
            cpu_cores: cpu_s / wall,
            rss_bytes: s1.map(|s| s.rss_bytes).unwrap_or_default(),
            hwm_bytes: s1.map(|s| s.hwm_bytes).unwrap_or_default(),
        });
    }
    check_lost(&mut lost_rx)?;
    summary.control_plane_end = pid.map(proc_sample).transpose()?;
    summary.simulator_cpu_s = proc_sample(std::process::id())
        .map(|s| s.cpu_s)
        .unwrap_or_default();
    let _ = stop_tx.send(true);
    Ok(summary)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_summary(s: &Summary) {
    println!(
        "phoenix-fleetsim: {} agents over {} connection(s), report every {} s, apply delay {} ms",
        s.agents, s.connections, s.report_interval_s, s.apply_delay_ms
    );
    println!(
        "connect: all {} agents in {:.2} s (per agent p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms); control-plane RSS after connect {:.1} MiB",
        s.agents,
        s.connect_all_ms / 1e3,
        s.connect.p50_ms,
        s.connect.p99_ms,
        s.connect.max_ms,
        mib(s.rss_after_connect_bytes)
    );
    for r in &s.rollouts {
        println!(
            "rollout {} (max_unavailable {}, {} wave(s)): create {:.0} ms; APPLIED per agent p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} after {:.0} ms; control-plane CPU {:.2} s",
            r.rollout_id,
            r.max_unavailable,
            r.waves,
            r.create_ms,
            r.applied.p50_ms,
            r.applied.p99_ms,
            r.applied.max_ms,
            r.state,
            r.finished_ms,
            r.cpu_s
        );
    }
    if let Some(p) = &s.report_phase {
        println!(
            "reports: {} ({} per agent, {:.0}/s) and {} heartbeats in {:.1} s: control-plane CPU {:.2} s = {:.0} µs per report ({:.2} cores); RSS {:.1} MiB",
            p.reports,
            p.reports_per_agent,
            p.reports_per_s,
            p.heartbeats,
            p.seconds,
            p.cpu_s,
            p.cpu_us_per_report,
            p.cpu_cores,
            mib(p.rss_bytes)
        );
    }
    if let Some(end) = &s.control_plane_end {
        println!(
            "control plane at the end: CPU {:.2} s in total, RSS {:.1} MiB, peak RSS (VmHWM) {:.1} MiB",
            end.cpu_s,
            mib(end.rss_bytes),
            mib(end.hwm_bytes)
        );
    }
    println!("simulator CPU {:.2} s", s.simulator_cpu_s);
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let json = args.json.clone();
    match run(args).await {
        Ok(summary) => {
            print_summary(&summary);
            if let Some(path) = json {
                let written = serde_json::to_vec_pretty(&summary)
                    .map_err(anyhow::Error::from)
                    .and_then(|bytes| {
                        std::fs::write(&path, bytes)
                            .with_context(|| format!("writing {}", path.display()))
                    });
                if let Err(err) = written {
                    eprintln!("error: {err:#}");
                    return std::process::ExitCode::FAILURE;
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
