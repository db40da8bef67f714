//! `phoenix-loadsim`: sends a seeded, realistic OTLP metrics workload over gRPC or HTTP at a
//! fixed rate of data points per second, or as fast as the receiver takes it.
//!
//! A pool of requests is built and encoded (and gzipped, with `--gzip`) up front and sent as
//! raw bytes, so the sender spends its CPU on the transport only. `UNAVAILABLE` (gRPC) and
//! 429/503 (HTTP) answers count as refused requests; with `--retry-unavailable` the same
//! request is sent again after 100 ms. A scenario file (`--scenario`, see `configs/loadsim/`)
//! sets any option; options given on the command line win.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::{Parser, ValueEnum};
use http::uri::PathAndQuery;
use phoenix_agent::otlp::codec::RawClientCodec;
use phoenix_agent::otlp::codec::METRICS_EXPORT_PATH;
use phoenix_agent::otlp::ExportMetricsServiceResponse;
use phoenix_bench::app::AppWorkload;
use phoenix_bench::{EncodedRequest, ProcessWorkload, DEFAULT_CHURN};
use prost::Message;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Workload {
    /// What a hostmetrics process scraper emits: 9 data points per process.
    Process,
    /// Services instrumented with an OpenTelemetry SDK: histograms, counters, gauges.
    App,
}

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    /// OTLP/gRPC `MetricsService/Export`.
    Grpc,
    /// OTLP/HTTP `POST /v1/metrics`, protobuf.
    Http,
}

#[derive(Debug, Parser)]
#[command(
    name = "phoenix-loadsim",
    about = "Sends a realistic OTLP metrics workload at a fixed rate or as fast as possible",
    args_override_self = true
)]
struct Args {
    /// A scenario file (YAML): a map of these options' long names (with `-` or `_`) to
    /// values; options given on the command line win.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Endpoint to send to: `http://127.0.0.1:4317` for gRPC, `http://127.0.0.1:4318` for
    /// HTTP (the `/v1/metrics` path is added).
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Protocol,
    #[arg(long, value_enum, default_value = "process")]
    workload: Workload,
    /// `process`: hosts in the simulated fleet.
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    /// `process`: processes per host.
    #[arg(long, default_value_t = 300)]
    processes: usize,
    /// `process`: hosts whose scrape one request carries (2 × 300 processes ≈ 5,400 data
    /// points).
    #[arg(long, default_value_t = 2)]
    hosts_per_request: usize,
    /// `process`: share (0 to 1) of the long tail of processes that is short-lived and comes
    /// back with a new PID every 1 to 30 scrapes.
    #[arg(long, default_value_t = DEFAULT_CHURN)]
    churn: f64,
    /// `app`: services in the fleet.
    #[arg(long, default_value_t = 5)]
    services: usize,
    /// `app`: instances per service (about 50 series each).
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Target data points per second; 0 sends as fast as the receiver answers.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// How long to send, e.g. 30s or 2m; ignored with --requests.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Send exactly this many requests instead of sending for --duration.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Compress requests with gzip.
    #[arg(long)]
    gzip: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct requests encoded up front (rounded up to whole scrapes of the fleet); they
    /// advance in time and counters, and are sent in a loop.
    #[arg(long, default_value_t = 8)]
    pool: usize,
    /// Deadline of one request.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Send a request refused with UNAVAILABLE again after 100 ms (until the run ends).
    #[arg(long)]
    retry_unavailable: bool,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    ok: u64,
    refused: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    points_ok: u64,
    bytes_ok: u64,
    points_refused: u64,
    points_failed: u64,
    rejected_points: u64,
    retries: u64,
    latencies_us: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct Summary {
    workload: Workload,
    protocol: Protocol,
    endpoint: String,
    hosts: usize,
    processes: usize,
    hosts_per_request: usize,
    churn: f64,
    services: usize,
    instances: usize,
    /// Distinct series in one round of the workload (one scrape of the whole fleet).
    series_per_round: u64,
    seed: u64,
    gzip: bool,
    concurrency: usize,
    target_rate: f64,
    pool_requests: usize,
    data_points_per_request: f64,
    bytes_per_request: f64,
    /// Requests sent, retries not included.
    requests: u64,
    requests_ok: u64,
    /// Refused with UNAVAILABLE (after retries, with --retry-unavailable).
    requests_refused: u64,
    /// Failed with any other error.
    requests_failed: u64,
    /// Every failed attempt by gRPC code, retries included.
    errors_by_code: BTreeMap<String, u64>,
    retries: u64,
    data_points_ok: u64,
    data_points_refused: u64,
    data_points_failed: u64,
    /// Data points the receiver rejected in a partial success.
    data_points_rejected: u64,
    bytes_ok: u64,
    elapsed_s: f64,
    requests_per_s: f64,
    data_points_per_s: f64,
    megabytes_per_s: f64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
}

type Shared = Arc<Mutex<Tally>>;

fn with_tally(tally: &Shared, f: impl FnOnce(&mut Tally)) {
    match tally.lock() {
        Ok(mut t) => f(&mut t),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

enum Outcome {
    Ok { rejected: u64 },
    Refused,
    Failed,
}

/// Where requests go.
#[derive(Clone)]
enum Transport {
    Grpc {
        channel: Channel,
        gzip: bool,
    },
    Http {
        client: reqwest::Client,
        url: String,
        gzip: bool,
    },
}

/// Why a request was not accepted: the status it got, and whether the receiver asked to come
/// back later (gRPC `UNAVAILABLE`, HTTP 429/502/503/504).
struct SendError {
    code: String,
    retryable: bool,
}

impl Transport {
    /// Sends one request; on success, the data points the receiver rejected.
    async fn send(&self, timeout: Duration, request: &EncodedRequest) -> Result<u64, SendError> {
        match self {
            Transport::Grpc { channel, gzip } => {
                send_grpc(channel.clone(), *gzip, timeout, request)
                    .await
                    .map_err(|status| SendError {
                        code: format!("{:?}", status.code()),
                        retryable: status.code() == Code::Unavailable,
                    })
            }
            Transport::Http { client, url, gzip } => {
                let mut post = client
                    .post(url)
                    .timeout(timeout)
                    .header("content-type", "application/x-protobuf")
                    .body(request.bytes.clone());
                if *gzip {
                    post = post.header("content-encoding", "gzip");
                }
                let response = post.send().await.map_err(|e| SendError {
                    code: if e.is_timeout() {
                        "timeout"
                    } else {
                        "transport"
                    }
                    .to_string(),
                    retryable: false,
                })?;
                let status = response.status().as_u16();
                if status != 200 {
                    return Err(SendError {
                        code: format!("HTTP {status}"),
                        retryable: matches!(status, 429 | 502 | 503 | 504),
                    });
                }
                let body = response.bytes().await.map_err(|_| SendError {
                    code: "body".to_string(),
                    retryable: false,
                })?;
                let rejected = ExportMetricsServiceResponse::decode(body)
                    .ok()
                    .and_then(|r| r.partial_success)
                    .map_or(0, |p| p.rejected_data_points.max(0) as u64);
                Ok(rejected)
            }
        }
    }
}

async fn send_grpc(
    channel: Channel,
    gzip: bool,
    timeout: Duration,
    request: &EncodedRequest,
) -> Result<u64, tonic::Status> {
    let mut client = tonic::client::Grpc::new(channel);
    if gzip {
        client = client.send_compressed(CompressionEncoding::Gzip);
    }
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    let mut grpc_request = tonic::Request::new(request.bytes.clone());
    grpc_request.set_timeout(timeout);
    let call = client.unary(
        grpc_request,
        PathAndQuery::from_static(METRICS_EXPORT_PATH),
        RawClientCodec::<ExportMetricsServiceResponse>::default(),
    );
    let response = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer within --timeout"))??;
    Ok(response
        .into_inner()
        .partial_success
        .map_or(0, |p| p.rejected_data_points.max(0) as u64))
}

struct Sender {
    transport: Transport,
    timeout: Duration,
    retry_unavailable: bool,
    deadline: Option<Instant>,
    tally: Shared,
}

impl Sender {
    async fn send(self: Arc<Self>, request: EncodedRequest, _permit: OwnedSemaphorePermit) {
        let started = Instant::now();
        let outcome = loop {
            match self.transport.send(self.timeout, &request).await {
                Ok(rejected) => break Outcome::Ok { rejected },
                Err(error) => {
                    with_tally(&self.tally, |t| {
                        *t.errors.entry(error.code).or_default() += 1
                    });
                    if !error.retryable {
                        break Outcome::Failed;
                    }
                    let retry_at = Instant::now() + Duration::from_millis(100);
                    let in_time = self.deadline.is_none_or(|d| retry_at < d);
                    if !(self.retry_unavailable && in_time) {
                        break Outcome::Refused;
                    }
                    with_tally(&self.tally, |t| t.retries += 1);
                    tokio::time::sleep_until(retry_at.into()).await;
                }
            }
        };
        let latency = started.elapsed().as_micros() as u64;
        with_tally(&self.tally, |t| match outcome {
            Outcome::Ok { rejected } => {
                t.ok += 1;
                t.points_ok += request.data_points;
                t.bytes_ok += request.bytes.len() as u64;
                t.rejected_points += rejected;
                t.latencies_us.push(latency);
            }
            Outcome::Refused => {
                t.refused += 1;
                t.points_refused += request.data_points;
            }
            Outcome::Failed => {
                t.failed += 1;
                t.points_failed += request.data_points;
            }
        });
    }
}

fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_us.len() - 1) as f64 * p).round() as usize;
    sorted_us[rank.min(sorted_us.len() - 1)] as f64 / 1000.0
}

async fn run(args: &Args) -> Result<Summary> {
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err(anyhow!(
            "--rate must be a number of data points per second, 0 or more"
        ));
    }
    if args.concurrency == 0 {
        return Err(anyhow!("--concurrency must be at least 1"));
    }
    let (mut pool, per_round) = match args.workload {
        Workload::Process => {
            let workload = ProcessWorkload::with_churn(
                args.seed,
                args.hosts,
                args.processes,
                args.hosts_per_request,
                args.churn,
            )
            .context("building the process workload")?;
            (workload.pool(args.pool), workload.requests_per_round())
        }
        Workload::App => {
            let workload = AppWorkload::new(args.seed, args.services, args.instances, 1)
                .context("building the app workload")?;
            (workload.pool(args.pool), workload.requests_per_round())
        }
    };
    let pool_points: u64 = pool.iter().map(|r| r.data_points).sum();
    let pool_bytes: usize = pool.iter().map(|r| r.bytes.len()).sum();
    let series = series_per_round(&pool[..per_round.min(pool.len())])?;
    eprintln!(
        "phoenix-loadsim: {} requests pre-encoded, {:.0} data points and {:.0} KB each on average; {series} series per round",
        pool.len(),
        pool_points as f64 / pool.len() as f64,
        pool_bytes as f64 / pool.len() as f64 / 1000.0
    );

    let transport = match args.protocol {
        Protocol::Grpc => Transport::Grpc {
            channel: Endpoint::from_shared(args.endpoint.clone())
                .with_context(|| format!("invalid --endpoint {}", args.endpoint))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| format!("cannot connect to {}", args.endpoint))?,
            gzip: args.gzip,
        },
        Protocol::Http => {
            if args.gzip {
                // Compressed once up front, like the encoding, so the sender stays cheap.
                for request in &mut pool {
                    request.bytes = gzip(&request.bytes)?;
                }
            }
            Transport::Http {
                client: reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5))
                    .build()
                    .context("building the HTTP client")?,
                url: format!("{}/v1/metrics", args.endpoint.trim_end_matches('/')),
                gzip: args.gzip,
            }
        }
    };

    let tally: Shared = Arc::default();
    let start = Instant::now();
    let deadline = match args.requests {
        Some(_) => None,
        None => Some(start + args.duration),
    };
    let sender = Arc::new(Sender {
        transport,
        timeout: args.timeout,
        retry_unavailable: args.retry_unavailable,
        deadline,
        tally: tally.clone(),
    });
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = JoinSet::new();
    let mut scheduled_points = 0u64;
    let mut index = 0usize;
    loop {
        if args.requests.is_some_and(|n| index as u64 >= n) {
            break;
        }
        if args.rate > 0.0 {
            let at = start + Duration::from_secs_f64(scheduled_points as f64 / args.rate);
            if deadline.is_some_and(|d| at >= d) {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .context("request slots closed")?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let request = pool[index % pool.len()].clone();
        scheduled_points += request.data_points;
        with_tally(&tally, |t| t.requests += 1);
        tasks.spawn(sender.clone().send(request, permit));
        index += 1;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    // A timed run is measured over its whole window, even if the last request went out early.
    let elapsed = match deadline {
        Some(_) => start.elapsed().max(args.duration),
        None => start.elapsed(),
    }
    .as_secs_f64();

    let mut t = std::mem::take(&mut *tally.lock().map_err(|_| anyhow!("tally poisoned"))?);
    t.latencies_us.sort_unstable();
    Ok(Summary {
        workload: args.workload,
        protocol: args.protocol,
        endpoint: args.endpoint.clone(),
        hosts: args.hosts,
        processes: args.processes,
        hosts_per_request: args.hosts_per_request,
        churn: args.churn,
        services: args.services,
        instances: args.instances,
        series_per_round: series,
        seed: args.seed,
        gzip: args.gzip,
        concurrency: args.concurrency,
        target_rate: args.rate,
        pool_requests: pool.len(),
        data_points_per_request: pool_points as f64 / pool.len() as f64,
        bytes_per_request: pool_bytes as f64 / pool.len() as f64,
        requests: t.requests,
        requests_ok: t.ok,
        requests_refused: t.refused,
        requests_failed: t.failed,
        errors_by_code: t.errors,
        retries: t.retries,
        data_points_ok: t.points_ok,
        data_points_refused: t.points_refused,
        data_points_failed: t.points_failed,
        data_points_rejected: t.rejected_points,
        bytes_ok: t.bytes_ok,
        elapsed_s: elapsed,
        requests_per_s: t.ok as f64 / elapsed,
        data_points_per_s: t.points_ok as f64 / elapsed,
        megabytes_per_s: t.bytes_ok as f64 / elapsed / 1e6,
        latency_ms_p50: percentile_ms(&t.latencies_us, 0.5),
        latency_ms_p99: percentile_ms(&t.latencies_us, 0.99),
        latency_ms_max: percentile_ms(&t.latencies_us, 1.0),
    })
}

fn print_summary(s: &Summary) {
    eprintln!(
        "phoenix-loadsim: {} requests in {:.2} s: {} ok, {} refused (UNAVAILABLE), {} failed, {} retries",
        s.requests, s.elapsed_s, s.requests_ok, s.requests_refused, s.requests_failed, s.retries
    );
    if !s.errors_by_code.is_empty() {
        let codes: Vec<String> = s
            .errors_by_code
            .iter()
            .map(|(code, n)| format!("{code}={n}"))
            .collect();
        eprintln!("phoenix-loadsim: errors by gRPC code: {}", codes.join(", "));
    }
    eprintln!(
        "phoenix-loadsim: {} data points, {} bytes accepted; {:.0} data points/s (target {}), {:.1} MB/s, {:.1} req/s; latency p50 {:.1} ms, p99 {:.1} ms",
        s.data_points_ok,
        s.bytes_ok,
        s.data_points_per_s,
        if s.target_rate > 0.0 {
            format!("{:.0}", s.target_rate)
        } else {
            "max".to_string()
        },
        s.megabytes_per_s,
        s.requests_per_s,
        s.latency_ms_p50,
        s.latency_ms_p99
    );
}

/// Distinct series in `requests`, hashed as the agent's volume meter does.
fn series_per_round(requests: &[EncodedRequest]) -> Result<u64> {
    let state = phoenix_agent::stats::series_hash_state();
    let mut seen = std::collections::HashSet::new();
    for request in requests {
        phoenix_agent::stats::for_each_series(&state, &request.bytes, |s| {
            seen.insert(s);
        })
        .map_err(|e| anyhow!("the workload built an invalid request: {e}"))?;
    }
    Ok(seen.len() as u64)
}

fn gzip(bytes: &[u8]) -> Result<bytes::Bytes> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).context("compressing a request")?;
    Ok(encoder.finish().context("compressing a request")?.into())
}

/// The command line, with a scenario file's options put before the ones given: the
/// command line wins, since a later occurrence of an option overrides an earlier one.
fn parse_args() -> Result<Args> {
    let given: Vec<String> = std::env::args().collect();
    let args = Args::parse_from(&given);
    let Some(path) = &args.scenario else {
        return Ok(args);
    };
    let mut argv = vec![given.first().cloned().unwrap_or_default()];
    argv.extend(scenario_args(path)?);
    argv.extend(given.into_iter().skip(1));
    Args::try_parse_from(argv).with_context(|| format!("scenario {}", path.display()))
}

fn scenario_args(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read scenario {}", path.display()))?;
    let map: BTreeMap<String, serde_yaml::Value> =
        serde_yaml::from_str(&text).with_context(|| {
            format!(
                "scenario {}: expected a map of option to value",
                path.display()
            )
        })?;
    let mut out = Vec::new();
    for (key, value) in map {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            serde_yaml::Value::Bool(true) => out.push(flag),
            serde_yaml::Value::Bool(false) => {}
            serde_yaml::Value::String(s) => out.extend([flag, s]),
            serde_yaml::Value::Number(n) => out.extend([flag, n.to_string()]),
            other => {
                return Err(anyhow!(
                    "scenario {}: {key}: expected a string, number or boolean, not {other:?}",
                    path.display()
                ))
            }
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let summary = runtime.block_on(run(&args))?;
    print_summary(&summary);
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&summary).context("encoding the summary")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if summary.requests > 0 && summary.requests_ok == 0 {
        return Err(anyhow!("the receiver accepted none of the requests"));
    }
    Ok(())
}
