//! `phoenixctl`: the command line over the REST API.
//!
//! Exit codes: 0 success; 1 the operation failed (invalid config, rollout ended failed or
//! rolled back, request refused); 2 usage; 3 missing or refused token (401/403); 4 not
//! found; 5 the control plane cannot be reached or answered 5xx.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::{json, Value};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:4320";

#[derive(Debug, Parser)]
#[command(
    name = "phoenixctl",
    version,
    about = "Phoenix control plane command line"
)]
pub struct Cli {
    /// Control plane URL (else $PHOENIX_SERVER, the config file, or http://127.0.0.1:4320).
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Output: human tables, or the API's JSON.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Config file with `server:` and `token:` (else $PHOENIX_CONFIG, else
    /// ~/.config/phoenix/phoenixctl.yaml). The token comes from $PHOENIX_TOKEN first.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// PEM CA certificate to trust for an https:// server (else $PHOENIX_CA_FILE, else the
    /// config file's `ca_file`).
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Agents.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Config documents.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Rollouts.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Experiments: a candidate in shadow beside the baseline, measured and judged.
    Experiment {
        #[command(subcommand)]
        command: ExperimentCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Creates an experiment (in draft) from a definition file (docs/experiments.md).
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Lists experiments.
    Ls,
    /// Shows an experiment: progress, last window, verdict.
    Show { id: i64 },
    /// Starts a draft experiment.
    Start { id: i64 },
    /// Cancels a live experiment and removes its candidate.
    Stop { id: i64 },
    /// Makes a succeeded experiment's candidate the baseline of its targets.
    Promote {
        id: i64,
        /// On every agent, not only the experiment's targets.
        #[arg(long)]
        everywhere: bool,
    },
    /// Restores the previous baseline after a promotion (or sets the candidate aside).
    Rollback { id: i64 },
    /// A live table of baseline vs candidate until the verdict; exit 0 if it succeeded.
    Watch {
        id: i64,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Lists agents.
    Ls {
        /// Label selector, e.g. role=web,zone!=b.
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
    },
    /// Shows one agent with its last volume report.
    Show { node: String },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Checks a config document locally (no server needed); exit 1 with every problem if it
    /// is invalid.
    Validate { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Starts a rollout of a pipelines document to the agents matching a selector.
    Create {
        #[arg(long, short = 'l')]
        selector: String,
        /// The pipelines document (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// candidate (beside the local pipelines) or baseline (replacing them).
        #[arg(long, default_value = "candidate")]
        role: String,
        /// Agents changed per wave.
        #[arg(long, default_value_t = 1)]
        max_unavailable: u32,
        /// Minimum time between a wave's last APPLIED and the next wave.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wave_delay: Duration,
    },
    /// Lists rollouts.
    Ls,
    /// Shows a rollout with its deployments and events.
    Show { id: i64 },
    /// Rolls a rollout back.
    Rollback { id: i64 },
    /// Follows a rollout until it ends; exit 0 if it succeeded, 1 if not.
    Watch {
        id: i64,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    server: Option<String>,
    token: Option<String>,
    ca_file: Option<PathBuf>,
}

/// A failure with its exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// The REST client `phoenixctl` (and `phoenix demo`) talks through.
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

impl Client {
    /// A plain-HTTP client for `server` (the embedded control plane of `phoenix demo`).
    pub fn plain(server: String, token: Option<String>) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| fail(5, e.to_string()))?;
        Ok(Self {
            http,
            server,
            token,
        })
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{}", self.server.trim_end_matches('/'), path);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| {
            fail(
                5,
                format!("cannot reach the control plane at {}: {e}", self.server),
            )
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| fail(5, format!("reading the answer: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let mut message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        if let Some(problems) = value.get("problems").and_then(Value::as_array) {
            for p in problems {
                message.push_str(&format!("\n  - {}", p.as_str().unwrap_or_default()));
            }
        }
        let code = match status.as_u16() {
            401 | 403 => 3,
            404 => 4,
            500..=599 => 5,
            _ => 1,
        };
        Err(fail(code, format!("{status}: {message}")))
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn num_of(v: &Value, key: &str) -> String {
    v.get(key).map(|n| n.to_string()).unwrap_or_default()
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn labels_text(v: &Value) -> String {
    v.get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn agents_table(agents: &Value) -> String {
    let rows: Vec<Vec<String>> = agents
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            vec![
                str_of(a, "node").to_string(),
                if a.get("connected").and_then(Value::as_bool).unwrap_or(false) {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
                labels_text(a),
                str_of(a, "version").to_string(),
                str_of(a, "effective_config_hash").to_string(),
                str_of(a, "applied_offer_hash").to_string(),
            ]
        })
        .collect();
    table(
        &["NODE", "CONNECTED", "LABELS", "VERSION", "CONFIG", "OFFER"],
        &rows,
    )
}

fn agent_text(a: &Value) -> String {
    let mut out = agents_table(&json!([a]));
    if let Some(report) = a.get("last_report").filter(|r| !r.is_null()) {
        out.push_str(&format!(
            "\nlast report: cpu {}s, rss {} bytes, refused {}\n",
            num_of(report, "cpu_seconds"),
            num_of(report, "rss_bytes"),
            num_of(report, "refused_datapoints")
        ));
        let rows: Vec<Vec<String>> = report
            .get("pipelines")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| {
                vec![
                    str_of(p, "pipeline").to_string(),
                    num_of(p, "datapoints"),
                    num_of(p, "bytes"),
                    num_of(p, "series_window"),
                    num_of(p, "series_total"),
                    num_of(p, "dropped_datapoints"),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "PIPELINE",
                "DATAPOINTS",
                "BYTES",
                "SERIES(10s)",
                "SERIES(total)",
                "DROPPED",
            ],
            &rows,
        ));
    }
    out
}

fn rollouts_table(rollouts: &Value) -> String {
    let rows: Vec<Vec<String>> = rollouts
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                num_of(r, "id"),
                str_of(r, "state").to_string(),
                str_of(r, "selector").to_string(),
                str_of(r, "role").to_string(),
                str_of(r, "config_hash").to_string(),
                str_of(r, "created_by").to_string(),
                str_of(r, "reason").to_string(),
            ]
        })
        .collect();
    table(
        &["ID", "STATE", "SELECTOR", "ROLE", "CONFIG", "BY", "REASON"],
        &rows,
    )
}

fn rollout_text(r: &Value) -> String {
    let mut out = rollouts_table(&json!([r]));
    let rows: Vec<Vec<String>> = r
        .get("deployments")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|d| {
            vec![
                str_of(d, "node").to_string(),
                num_of(d, "wave"),
                str_of(d, "state").to_string(),
                str_of(d, "previous_hash").to_string(),
                str_of(d, "message")
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["NODE", "WAVE", "STATE", "PREVIOUS", "MESSAGE"],
        &rows,
    ));
    out.push('\n');
    for e in r
        .get("events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "{}  {}  {}\n",
            time_text(e, "at"),
            str_of(e, "kind"),
            str_of(e, "message")
        ));
    }
    out
}

/// Unix milliseconds as RFC 3339 UTC, for tables.
fn time_text(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_u64) {
        Some(ms) => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        }
        None => String::new(),
    }
}

fn print(output: Output, value: &Value, human: impl Fn(&Value) -> String) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Table => print!("{}", human(value)),
    }
}

fn load_file_config(path: Option<PathBuf>) -> Result<FileConfig, Failure> {
    let explicit = path.is_some() || std::env::var_os("PHOENIX_CONFIG").is_some();
    let path = path
        .or_else(|| std::env::var_os("PHOENIX_CONFIG").map(PathBuf::from))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".config/phoenix/phoenixctl.yaml"))
        });
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_yaml::from_str(&text).map_err(|e| fail(2, format!("{}: {e}", path.display())))
        }
        Err(_) if !explicit => Ok(FileConfig::default()),
        Err(e) => Err(fail(2, format!("{}: {e}", path.display()))),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let output = cli.output;
    if let Command::Config {
        command: ConfigCommand::Validate { file },
    } = &cli.command
    {
        let document = std::fs::read_to_string(file)
            .map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
        let problems = crate::service::ControlPlane::validate(&document);
        let hash = phoenix_proto::document_hash(&document);
        let value = json!({ "valid": problems.is_empty(), "hash": hash, "problems": problems });
        print(output, &value, |_| {
            if problems.is_empty() {
                format!("{}: valid; hash {hash}\n", file.display())
            } else {
                format!(
                    "{}: {} problem(s):\n{}\n",
                    file.display(),
                    problems.len(),
                    problems
                        .iter()
                        .map(|p| format!("  - {p}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            }
        });
        return if problems.is_empty() {
            Ok(())
        } else {
            Err(fail(1, ""))
        };
    }

    let file_config = load_file_config(cli.config)?;
    let server = cli
        .server
        .or_else(|| std::env::var("PHOENIX_SERVER").ok())
        .or(file_config.server)
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let token = std::env::var("PHOENIX_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or(file_config.token);
    let ca_file = cli
        .ca_file
        .or_else(|| std::env::var_os("PHOENIX_CA_FILE").map(PathBuf::from))
        .or(file_config.ca_file);
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(ca_file) = ca_file {
        let pem =
            std::fs::read(&ca_file).map_err(|e| fail(2, format!("{}: {e}", ca_file.display())))?;
        let certificate = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| fail(2, format!("{}: {e}", ca_file.display())))?;
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(certificate);
    }
    let client = Client {
        http: builder.build().map_err(|e| fail(5, e.to_string()))?,
        server,
        token,
    };

    match cli.command {
        Command::Config { .. } => Ok(()),
        Command::Fleet {
            command: FleetCommand::Ls { selector },
        } => {
            let path = format!("/api/v1/agents?selector={}", urlencode(&selector));
            let agents = client.get(&path).await?;
            print(output, &agents, agents_table);
            Ok(())
        }
        Command::Fleet {
            command: FleetCommand::Show { node },
        } => {
            let agent = client
                .get(&format!("/api/v1/agents/{}", urlencode(&node)))
                .await?;
            print(output, &agent, agent_text);
            Ok(())
        }
        Command::Rollout { command } => match command {
            RolloutCommand::Create {
                selector,
                file,
                role,
                max_unavailable,
                wave_delay,
            } => {
                let document = std::fs::read_to_string(&file)
                    .map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
                let body = json!({
                    "selector": selector,
                    "document": document,
                    "role": role,
                    "max_unavailable": max_unavailable,
                    "wave_delay_ms": wave_delay.as_millis() as u64,
                });
                let rollout = client.post("/api/v1/rollouts", body).await?;
                print(output, &rollout, rollout_text);
                Ok(())
            }
            RolloutCommand::Ls => {
                let rollouts = client.get("/api/v1/rollouts").await?;
                print(output, &rollouts, rollouts_table);
                Ok(())
            }
            RolloutCommand::Show { id } => {
                let rollout = client.get(&format!("/api/v1/rollouts/{id}")).await?;
                print(output, &rollout, rollout_text);
                Ok(())
            }
            RolloutCommand::Rollback { id } => {
                let rollout = client
                    .post(&format!("/api/v1/rollouts/{id}/rollback"), json!({}))
                    .await?;
                print(output, &rollout, rollout_text);
                Ok(())
            }
            RolloutCommand::Watch { id, timeout } => watch(&client, output, id, timeout).await,
        },
        Command::Experiment { command } => experiment(&client, output, command).await,
    }
}

fn experiments_table(experiments: &Value) -> String {
    let rows: Vec<Vec<String>> = experiments
        .as_array()
        .map(|list| {
            list.iter()
                .map(|e| {
                    let verdict = &e["progress"]["verdict"];
                    vec![
                        num_of(e, "id"),
                        str_of(e, "name").to_string(),
                        str_of(e, "state").to_string(),
                        e["definition"]["selector"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        match verdict["passed"].as_bool() {
                            Some(true) => "passed".into(),
                            Some(false) => "failed".into(),
                            None => "-".into(),
                        },
                        time_text(e, "created_at"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["ID", "NAME", "STATE", "SELECTOR", "VERDICT", "CREATED"],
        &rows,
    )
}

async fn experiment(
    client: &Client,
    output: Output,
    command: ExperimentCommand,
) -> Result<(), Failure> {
    use crate::experiment::render::render;
    let (path, body) = match command {
        ExperimentCommand::Create { file } => {
            let document = std::fs::read_to_string(&file)
                .map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
            (
                "/api/v1/experiments".to_string(),
                json!({ "document": document }),
            )
        }
        ExperimentCommand::Ls => {
            let list = client.get("/api/v1/experiments").await?;
            print(output, &list, experiments_table);
            return Ok(());
        }
        ExperimentCommand::Show { id } => {
            let view = client.get(&format!("/api/v1/experiments/{id}")).await?;
            print(output, &view, render);
            return Ok(());
        }
        ExperimentCommand::Start { id } => (format!("/api/v1/experiments/{id}/start"), json!({})),
        ExperimentCommand::Stop { id } => (format!("/api/v1/experiments/{id}/stop"), json!({})),
        ExperimentCommand::Promote { id, everywhere } => (
            format!("/api/v1/experiments/{id}/promote"),
            json!({ "everywhere": everywhere }),
        ),
        ExperimentCommand::Rollback { id } => {
            (format!("/api/v1/experiments/{id}/rollback"), json!({}))
        }
        ExperimentCommand::Watch { id, timeout } => {
            return watch_experiment(client, output, id, timeout).await
        }
    };
    let view = client.post(&path, body).await?;
    print(output, &view, render);
    Ok(())
}

/// Whether an experiment state is final for `watch`, and whether it counts as success.
pub fn experiment_outcome(state: &str) -> Option<bool> {
    match state {
        "succeeded" | "promoted" => Some(true),
        "failed" | "cancelled" | "rolled_back" => Some(false),
        _ => None,
    }
}

/// Redraws the experiment in place on a terminal (a new block per change otherwise) until it
/// ends.
pub async fn watch_experiment(
    client: &Client,
    output: Output,
    id: i64,
    timeout: Duration,
) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let deadline = tokio::time::Instant::now() + timeout;
    let terminal = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let view = client.get(&format!("/api/v1/experiments/{id}")).await?;
        let state = str_of(&view, "state").to_string();
        let text = crate::experiment::render::render(&view);
        if output == Output::Table && text != last {
            if terminal {
                // Home and clear, so the table refreshes in place.
                print!("\x1b[H\x1b[2J{text}");
            } else {
                println!("{text}");
            }
            last = text;
        }
        if let Some(success) = experiment_outcome(&state) {
            if output == Output::Json {
                print(output, &view, |_| String::new());
            }
            return if success {
                Ok(())
            } else {
                let reason = view["events"]
                    .as_array()
                    .and_then(|e| e.last())
                    .map(|e| str_of(e, "reason").to_string())
                    .unwrap_or_default();
                Err(fail(1, format!("experiment {id} {state}: {reason}")))
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(
                1,
                format!("experiment {id} still {state} after {timeout:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn watch(client: &Client, output: Output, id: i64, timeout: Duration) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut printed = 0usize;
    loop {
        let rollout = client.get(&format!("/api/v1/rollouts/{id}")).await?;
        let events = rollout
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if output == Output::Table {
            for e in events.iter().skip(printed) {
                println!(
                    "{}  {}  {}",
                    time_text(e, "at"),
                    str_of(e, "kind"),
                    str_of(e, "message")
                );
            }
        }
        printed = events.len();
        let state = str_of(&rollout, "state").to_string();
        let done = matches!(state.as_str(), "succeeded" | "failed" | "rolled_back");
        if done {
            if output == Output::Json {
                print(output, &rollout, rollout_text);
            } else {
                println!("rollout {id}: {state}");
            }
            return if state == "succeeded" {
                Ok(())
            } else {
                Err(fail(
                    1,
                    format!("rollout {id} {state}: {}", str_of(&rollout, "reason")),
                ))
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(
                1,
                format!("rollout {id} still {state} after {timeout:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::from(5);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("error: {}", failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let out = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(out, "A    LONGER\nxyz  1\n");
    }

    #[test]
    fn selectors_are_url_encoded() {
        assert_eq!(urlencode("role=web,zone!=b"), "role%3Dweb%2Czone%21%3Db");
    }
}
