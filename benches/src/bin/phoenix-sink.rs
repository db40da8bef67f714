//! `phoenix-sink`: an OTLP/gRPC metrics server that only counts.
//!
//! Requests stay bytes (the agent's raw codec) and are validated and counted with the agent's
//! lean wire walk, so the sink costs little CPU. Besides requests, bytes and data points it
//! counts `ResourceMetrics` that arrive without a resource, which a forwarder that splits
//! requests carelessly produces. Totals are printed as JSON on SIGTERM or SIGINT, and written
//! to `--report` periodically and at exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use futures_util::future::BoxFuture;
use phoenix_agent::otlp::codec::{ExportHandler, RawMetricsServer};
use phoenix_agent::otlp::ExportMetricsServiceResponse;
use phoenix_bench::SinkCounts;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "phoenix-sink",
    about = "OTLP/gRPC metrics sink that counts requests, data points and resource-less ResourceMetrics"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4327")]
    listen: SocketAddr,
    /// JSON totals written here every --report-interval and at exit.
    #[arg(long)]
    report: Option<PathBuf>,
    /// How often --report is rewritten.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// Largest accepted request after decompression, in MiB.
    #[arg(long, default_value_t = 64)]
    max_message_mib: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Totals {
    requests: u64,
    /// Encoded request bytes after decompression.
    bytes: u64,
    malformed_requests: u64,
    #[serde(flatten)]
    counts: SinkCounts,
    first_request_unix_ms: Option<u64>,
    last_request_unix_ms: Option<u64>,
}

type Shared = Arc<Mutex<Totals>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn snapshot(totals: &Shared) -> Totals {
    match totals.lock() {
        Ok(t) => t.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn record(totals: &Shared, f: impl FnOnce(&mut Totals)) {
    let mut guard = match totals.lock() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    };
    let now = now_ms();
    guard.first_request_unix_ms.get_or_insert(now);
    guard.last_request_unix_ms = Some(now);
    f(&mut guard);
}

#[derive(Clone)]
struct Sink {
    totals: Shared,
    max_message: usize,
}

impl ExportHandler for Sink {
    fn max_message_size(&self) -> usize {
        self.max_message
    }

    fn export(
        &self,
        bytes: Bytes,
    ) -> BoxFuture<'static, Result<ExportMetricsServiceResponse, tonic::Status>> {
        let result = match SinkCounts::of(&bytes) {
            Ok(counts) => {
                record(&self.totals, |t| {
                    t.requests += 1;
                    t.bytes += bytes.len() as u64;
                    t.counts.add(&counts);
                });
                Ok(ExportMetricsServiceResponse::default())
            }
            Err(err) => {
                record(&self.totals, |t| t.malformed_requests += 1);
                Err(tonic::Status::invalid_argument(format!(
                    "not an OTLP metrics request: {err}"
                )))
            }
        };
        Box::pin(std::future::ready(result))
    }
}

fn write_report(path: &Path, totals: &Totals) -> Result<()> {
    let json = serde_json::to_vec_pretty(totals).context("encoding the report")?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

async fn run(args: Args) -> Result<()> {
    let totals: Shared = Arc::default();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("local address")?;
    eprintln!("phoenix-sink: listening on {local}");
    let sink = Sink {
        totals: totals.clone(),
        max_message: args.max_message_mib.saturating_mul(1024 * 1024),
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RawMetricsServer(sink))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                },
            )
            .await
    });

    let mut sigterm = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut tick = tokio::time::interval(args.report_interval.max(Duration::from_millis(50)));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick() => {
                if let Some(path) = &args.report {
                    write_report(path, &snapshot(&totals))?;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    // Answer what is in flight, but do not wait for clients that keep connections open.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    let final_totals = snapshot(&totals);
    if let Some(path) = &args.report {
        write_report(path, &final_totals)?;
    }
    println!(
        "{}",
        serde_json::to_string(&final_totals).context("encoding the totals")?
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(args))
}
