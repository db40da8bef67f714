//! `phoenix demo`: Phoenix's main job on this machine, from nothing. An embedded control plane
//! (SQLite in a temporary directory), an agent reading this machine's own processes
//! (hostmetrics) and, optionally, the load simulator; then the sample experiment
//! (`configs/experiments/process-balanced.yaml`: baseline vs the balanced candidate) with a live
//! comparison, ending with its verdict. Everything listens on 127.0.0.1 only; Ctrl-C or the
//! end stops every process it started and removes the directory.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::auth::Role;
use crate::ctl::{experiment_outcome, Client, Output};
use crate::service::{ControlPlane, Settings};

/// The sample experiment the demo runs.
pub const SAMPLE_EXPERIMENT: &str = include_str!("../../configs/experiments/process-balanced.yaml");

#[derive(Debug, Parser)]
#[command(
    name = "phoenix",
    version,
    about = "Phoenix: cut metrics cost, and prove it first"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: DemoCommand,
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Runs an embedded control plane and an agent on this machine's processes, and an
    /// experiment (baseline vs the balanced candidate) to its verdict.
    Demo(DemoArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long windows are measured.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time after the candidate is deployed before windows count.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// One measured window (also the host-metrics scrape interval).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Also send synthetic process metrics at this many data points per second
    /// (phoenix-loadsim), beside this machine's own.
    #[arg(long)]
    pub load: Option<u64>,
    /// The experiment definition (default: the embedded process-balanced sample). Its
    /// selector should match the demo agent's label `demo=true`.
    #[arg(long, short = 'f')]
    pub experiment: Option<PathBuf>,
    /// The phoenix-agent binary (default: next to this one).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let DemoCommand::Demo(args) = cli.command;
    match runtime.block_on(demo(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = StdListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

fn sibling(name: &str, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
    // Test binaries live one level down, in deps/.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {} (build it: cargo build --release -p phoenix-agent -p phoenix-bench)",
        exe.display()
    )
}

/// The demo agent: this machine's processes (and OTLP for the load simulator), a baseline
/// that ships to a blackhole, connected to the embedded control plane.
fn agent_config(
    cp: SocketAddr,
    otlp: SocketAddr,
    telemetry: SocketAddr,
    dir: &Path,
    window: Duration,
) -> String {
    let interval = humantime::format_duration(window);
    format!(
        r#"receivers:
  hostmetrics:
    collection_interval: {interval}
    initial_delay: 0s
    scrapers: {{ process: {{ mute_process_all_errors: true }}, cpu: {{}}, memory: {{}} }}
  otlp:
    protocols: {{ grpc: {{ endpoint: "{otlp}" }} }}
processors:
  batch: {{ send_batch_size: 8192, timeout: 1s }}
exporters:
  blackhole: {{}}
pipelines:
  baseline: {{ receivers: [hostmetrics, otlp], processors: [batch], exporters: [blackhole] }}
control_plane:
  endpoint: "http://{cp}"
  token_file: "{token}"
  labels: {{ demo: "true" }}
  node_name: demo-node
  state_dir: "{state}"
  report_interval: 1s
telemetry:
  listen: "{telemetry}"
"#,
        token = dir.join("agent-token").display(),
        state = dir.join("agent-state").display(),
    )
}

/// Sets the demo's durations on the definition.
fn tune(definition: &str, args: &DemoArgs) -> anyhow::Result<String> {
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(definition).context("reading the experiment definition")?;
    let mapping = value
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("the experiment definition is not a mapping"))?;
    for (key, duration) in [
        ("duration", args.duration),
        ("warmup", args.warmup),
        ("window", args.window),
    ] {
        mapping.insert(
            key.into(),
            humantime::format_duration(duration).to_string().into(),
        );
    }
    Ok(serde_yaml::to_string(&value)?)
}

struct Children(Vec<Child>);

impl Children {
    async fn stop(&mut self) {
        for child in &mut self.0 {
            // SIGTERM first: the agent flushes and exits by itself.
            let pid = child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .and_then(rustix::process::Pid::from_raw);
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for child in &mut self.0 {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("phoenix-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let agent_bin = sibling("phoenix-agent", args.agent_bin.as_deref())?;
    let definition = match &args.experiment {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => SAMPLE_EXPERIMENT.to_string(),
    };
    let definition = tune(&definition, &args)?;

    // The embedded control plane.
    let store = crate::store::open(&dir.path().join("control-plane.db").to_string_lossy())
        .context("opening the demo store")?;
    let cp = ControlPlane::new(store, Settings::default());
    let admin = cp.create_token(None, "demo", Role::Admin)?;
    let agent_token = cp.create_token(None, "demo-agent", Role::Agent)?;
    std::fs::write(dir.path().join("agent-token"), &agent_token)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cp_addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let engine = tokio::spawn(cp.clone().run_engine(stop_rx.clone()));
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(crate::server::serve(
        listener,
        Arc::clone(&cp),
        async move {
            let _ = server_stop.wait_for(|s| *s).await;
        },
    ));

    let mut children = Children(Vec::new());
    let result = tokio::select! {
        result = run(&args, &cp, cp_addr, &admin, dir.path(), &agent_bin, &definition, &mut children) => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: stopping");
            Ok(())
        }
    };
    children.stop().await;
    let _ = stop_tx.send(true);
    let _ = engine.await;
    let _ = server.await;
    if result.is_err() {
        if let Ok(log) = std::fs::read_to_string(dir.path().join("agent.log")) {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("agent log (last lines):");
            for line in tail.into_iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &DemoArgs,
    cp: &ControlPlane,
    cp_addr: SocketAddr,
    admin: &str,
    dir: &Path,
    agent_bin: &Path,
    definition: &str,
    children: &mut Children,
) -> anyhow::Result<()> {
    let (otlp, telemetry) = (free_port()?, free_port()?);
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        agent_config(cp_addr, otlp, telemetry, dir, args.window),
    )?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    println!(
        "phoenix demo: control plane on http://{cp_addr} (SQLite in {})",
        dir.display()
    );
    println!(
        "phoenix demo: agent reading this machine's processes (config {})",
        config.display()
    );
    children.0.push(
        Command::new(agent_bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", agent_bin.display()))?,
    );
    if let Some(rate) = args.load {
        let loadsim = sibling("phoenix-loadsim", None)?;
        println!("phoenix demo: phoenix-loadsim sending {rate} data points/s to the agent");
        children.0.push(
            Command::new(&loadsim)
                .args([
                    "--endpoint",
                    &format!("http://{otlp}"),
                    "--rate",
                    &rate.to_string(),
                ])
                .args(["--duration", "24h", "--retry-unavailable"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", loadsim.display()))?,
        );
    }

    // Wait for the agent's first report, so the experiment has something to measure.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(child) = children.0.first_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("the agent exited ({status}) before connecting");
            }
        }
        let reported = cp
            .agents("demo=true")?
            .iter()
            .any(|a| a.connected && a.record.last_report.is_some());
        if reported {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the agent did not connect to the control plane within 30s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let client = Client::plain(format!("http://{cp_addr}"), Some(admin.to_string()))
        .map_err(|f| anyhow!(f.message))?;
    let created = client
        .post("/api/v1/experiments", json!({ "document": definition }))
        .await
        .map_err(|f| anyhow!("creating the experiment: {}", f.message))?;
    let id = created["id"]
        .as_i64()
        .ok_or_else(|| anyhow!("no experiment id in {created}"))?;
    client
        .post(&format!("/api/v1/experiments/{id}/start"), json!({}))
        .await
        .map_err(|f| anyhow!("starting the experiment: {}", f.message))?;
    println!(
        "phoenix demo: experiment {id} started: {} without the candidate, then the candidate in shadow, {} warm-up, {} measured in {} windows\n",
        humantime::format_duration(args.window),
        humantime::format_duration(args.warmup),
        humantime::format_duration(args.duration),
        humantime::format_duration(args.window),
    );
    let timeout = args.duration + args.warmup + args.window * 4 + Duration::from_secs(120);
    let watched = crate::ctl::watch_experiment(&client, Output::Table, id, timeout).await;
    let view = client
        .get(&format!("/api/v1/experiments/{id}"))
        .await
        .map_err(|f| anyhow!(f.message))?;
    let state = view["state"].as_str().unwrap_or("");
    match (
        experiment_outcome(state),
        view["progress"]["verdict"].is_object(),
    ) {
        (Some(_), true) => {
            if state == "succeeded" {
                println!(
                    "\nphoenix demo: the candidate passed every criterion. On a fleet, `phoenixctl experiment promote ID` makes it the baseline through a waved rollout (docs/experiments.md)."
                );
            } else {
                println!(
                    "\nphoenix demo: the candidate {state}; the table above names each criterion it missed."
                );
            }
            Ok(())
        }
        _ => Err(anyhow!(
            "the experiment ended without a verdict: {}",
            watched
                .err()
                .map(|f| f.message)
                .unwrap_or_else(|| state.to_string())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_experiment_is_valid_and_tuned_by_the_flags() {
        let args = DemoArgs {
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(20),
            window: Duration::from_secs(5),
            load: None,
            experiment: None,
            agent_bin: None,
        };
        let tuned = tune(SAMPLE_EXPERIMENT, &args).unwrap();
        let definition = crate::experiment::definition::parse(&tuned).unwrap();
        assert_eq!(definition.duration, Duration::from_secs(20));
        assert_eq!(definition.window, Duration::from_secs(5));
        assert_eq!(definition.selector, "demo=true");
    }

    #[test]
    fn the_demo_agent_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let path = dir.path().join("agent.yaml");
        let config = agent_config(
            addr(1),
            addr(2),
            addr(3),
            dir.path(),
            Duration::from_secs(5),
        );
        std::fs::write(&path, config).unwrap();
        phoenix_agent::config::AgentConfig::load(&path).unwrap();
    }
}
