//! The control plane end to end: the real `phoenix-control-plane`, `phoenixctl` and
//! `phoenix-agent` binaries on loopback ports, agents with different labels, rollouts that
//! reach only the selected agents, a config that fails on one agent and is rolled back
//! everywhere, a control plane killed mid-rollout, an agent restarted, and every role on
//! every route.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use phoenix_agent::otlp::testdata;
use serde_json::{json, Value};
use support::*;

const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_phoenix-control-plane");
const PHOENIXCTL: &str = env!("CARGO_BIN_EXE_phoenixctl");

/// A running control plane; its database lives in a directory that outlives restarts.
struct ControlPlane {
    child: KillOnDrop,
    addr: std::net::SocketAddr,
    db: String,
    log: PathBuf,
}

impl ControlPlane {
    /// Starts `serve` on `db` (a SQLite path or a PostgreSQL URL); logs go to `dir`.
    async fn start(dir: &Path, addr: std::net::SocketAddr, db: &str) -> ControlPlane {
        let db = db.to_string();
        let log = dir.join(format!(
            "cp-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(CONTROL_PLANE)
            .args(["serve", "--listen", &addr.to_string(), "--db"])
            .arg(&db)
            .args(["--ack-timeout", "20s", "--agent-lost-after", "10s"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start phoenix-control-plane");
        let cp = ControlPlane {
            child: KillOnDrop(child),
            addr,
            db,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/readyz", cp.url())).await {
                if r.status().is_success() {
                    return cp;
                }
            }
            assert!(
                Instant::now() < deadline,
                "control plane not ready:\n{}",
                cp.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

/// The agent binary comes from the shared target dir (see `support::agent_bin`); say so
/// plainly when it was built from a tree without the control-plane client.
fn check_agent_binary() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "receivers: { otlp: { protocols: { grpc: {} } } }\nexporters: { blackhole: {} }\npipelines: { baseline: { receivers: [otlp], exporters: [blackhole] } }\ncontrol_plane: { endpoint: \"http://127.0.0.1:1\" }\n",
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .args(["validate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} was built from a tree without the control-plane client (another build replaced it?): \
         run `cargo test -p phoenix-agent -p phoenix-control-plane` or `cargo test --workspace`\n{}",
        agent_bin().display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn token(db: &str, name: &str, role: &str) -> String {
    let out = Command::new(CONTROL_PLANE)
        .args(["token", "create", "--db"])
        .arg(db)
        .args(["--name", name, "--role", role])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A fleet test's shared state: the control plane's directory, store, address and tokens.
struct Fleet {
    dir: tempfile::TempDir,
    db: String,
    addr: std::net::SocketAddr,
    cp: Option<ControlPlane>,
    admin: String,
    operator: String,
    agent_token_file: PathBuf,
}

impl Fleet {
    /// A fleet whose control plane keeps its state in a SQLite file.
    async fn start() -> Fleet {
        Self::start_on(None).await
    }

    /// A fleet on `db` (a PostgreSQL URL), or on a SQLite file in its directory.
    async fn start_on(db: Option<String>) -> Fleet {
        check_agent_binary();
        let dir = tempfile::tempdir().unwrap();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let db = db.unwrap_or_else(|| dir.path().join("cp.db").display().to_string());
        let admin = token(&db, "admin", "admin");
        let operator = token(&db, "ops", "operator");
        let agent_token_file = dir.path().join("agent-token");
        std::fs::write(&agent_token_file, token(&db, "agents", "agent")).unwrap();
        let cp = ControlPlane::start(dir.path(), addr, &db).await;
        Fleet {
            dir,
            db,
            addr,
            cp: Some(cp),
            admin,
            operator,
            agent_token_file,
        }
    }

    fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().unwrap()
    }

    /// An agent config: the local file has receiver `receiver` and a baseline pipeline.
    fn agent_yaml(&self, node: &str, role: &str, receiver: &str, state_dir: &Path) -> String {
        format!(
            r#"
receivers:
  {receiver}: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
exporters:
  blackhole: {{}}
pipelines:
  baseline: {{ receivers: [{receiver}], exporters: [blackhole] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
control_plane:
  endpoint: "http://{addr}"
  token_file: "{token}"
  report_interval: 1s
  node_name: {node}
  labels: {{ role: {role}, node: {node} }}
  state_dir: "{state}"
"#,
            addr = self.addr,
            token = self.agent_token_file.display(),
            state = state_dir.display(),
        )
    }

    async fn agent(&self, node: &str, role: &str, receiver: &str) -> Agent {
        let state = self.dir.path().join(format!("state-{node}"));
        Agent::start(&self.agent_yaml(node, role, receiver, &state)).await
    }

    async fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        api(&self.cp().url(), method, path, token, body).await
    }

    async fn wait_connected(&self, nodes: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, agents) = self
                .api("GET", "/api/v1/agents", Some(&self.admin), None)
                .await;
            let connected: Vec<&str> = agents
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["connected"] == json!(true))
                .filter_map(|a| a["node"].as_str())
                .collect();
            if nodes.iter().all(|n| connected.contains(n)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agents {nodes:?} not connected: {agents}\n{}",
                self.cp().log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn create_rollout(&self, selector: &str, document: &str, wave_delay_ms: u64) -> i64 {
        let (status, body) = self
            .api(
                "POST",
                "/api/v1/rollouts",
                Some(&self.operator),
                Some(json!({ "selector": selector, "document": document, "max_unavailable": 1, "wave_delay_ms": wave_delay_ms })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_i64().unwrap()
    }

    /// Waits until the rollout is in `state`, and returns it.
    async fn wait_rollout(&self, id: i64, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let (_, rollout) = self
                .api(
                    "GET",
                    &format!("/api/v1/rollouts/{id}"),
                    Some(&self.admin),
                    None,
                )
                .await;
            if rollout["state"] == json!(state) {
                return rollout;
            }
            assert!(
                Instant::now() < deadline,
                "rollout {id} not {state}: {rollout:#}\n{}",
                self.cp().log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn api(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The hash the agent's `/metrics` says it runs.
async fn config_hash(agent: &Agent) -> String {
    let text = agent.metrics().await;
    text.lines()
        .filter(|l| l.starts_with("phoenix_config_info{") && l.ends_with(" 1"))
        .filter_map(|l| {
            l.split("hash=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_string)
        })
        .next()
        .unwrap_or_default()
}

async fn wait_hash(agent: &Agent, expected: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while config_hash(agent).await != expected {
        assert!(
            Instant::now() < deadline,
            "{what}: still {} not {expected}\n{}",
            config_hash(agent).await,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A candidate pipeline beside the local baseline, exporting to `sink`.
fn candidate(sink: &Sink, receiver: &str) -> String {
    format!(
        "exporters:\n  otlp/sink: {{ endpoint: \"{}\", compression: none }}\npipelines:\n  candidate: {{ receivers: [{receiver}], exporters: [otlp/sink] }}\n",
        sink.url()
    )
}

async fn send(agent: &Agent, points: usize) {
    let mut client = grpc_client(agent).await;
    client
        .export(testdata::request(1, 1, points))
        .await
        .expect("export");
}

fn ctl(fleet: &Fleet, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(PHOENIXCTL);
    cmd.args(["--server", &fleet.cp().url()])
        .args(args)
        .env_remove("PHOENIX_TOKEN")
        .env_remove("PHOENIX_CONFIG")
        .env("HOME", fleet.dir.path());
    if let Some(token) = token {
        cmd.env("PHOENIX_TOKEN", token);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_reaches_only_the_selected_agents_and_phoenixctl_shows_it() {
    let fleet = Fleet::start().await;
    let a = fleet.agent("a", "web", "otlp").await;
    let b = fleet.agent("b", "web", "otlp").await;
    let c = fleet.agent("c", "db", "otlp").await;
    fleet.wait_connected(&["a", "b", "c"]).await;
    assert_eq!(
        a.metric("phoenix_control_plane_connected", &[]).await,
        1.0,
        "the agent says it is connected"
    );
    let before = [
        config_hash(&a).await,
        config_hash(&b).await,
        config_hash(&c).await,
    ];

    let sink = Sink::start().await;
    let document = candidate(&sink, "otlp");
    let file = fleet.dir.path().join("candidate.yaml");
    std::fs::write(&file, &document).unwrap();
    let out = ctl(
        &fleet,
        None,
        &["config", "validate", file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = ctl(
        &fleet,
        Some(&fleet.operator),
        &[
            "rollout",
            "create",
            "--selector",
            "role=db",
            "-f",
            file.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["id"].as_i64().unwrap();
    let out = ctl(
        &fleet,
        Some(&fleet.operator),
        &["rollout", "watch", &id.to_string()],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("rollout {id}: succeeded")));

    // Only c changed: its hash on /metrics, what the control plane knows, what the sink gets.
    assert_eq!(config_hash(&a).await, before[0]);
    assert_eq!(config_hash(&b).await, before[1]);
    let c_hash = config_hash(&c).await;
    assert_ne!(c_hash, before[2]);
    let (_, agent_c) = fleet
        .api("GET", "/api/v1/agents/c", Some(&fleet.admin), None)
        .await;
    assert_eq!(agent_c["effective_config_hash"], json!(c_hash));
    assert_eq!(agent_c["applied_offer_hash"], created["config_hash"]);
    for agent in [&a, &b, &c] {
        send(agent, 5).await;
    }
    assert_eq!(
        sink.wait_for(5, Duration::from_secs(10)).await,
        5,
        "only c's candidate exports"
    );

    // phoenixctl: tables, JSON and exit codes.
    let out = ctl(
        &fleet,
        Some(&fleet.admin),
        &["fleet", "ls", "--selector", "role=web"],
    );
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    assert!(
        table.starts_with("NODE")
            && table.contains("\na ")
            && table.contains("\nb ")
            && !table.contains("\nc "),
        "{table}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ctl(
            &fleet,
            Some(&fleet.admin),
            &["fleet", "show", "c", "-o", "json"],
        );
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
        let pipelines = shown["last_report"]["pipelines"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if pipelines
            .iter()
            .any(|p| p["pipeline"] == json!("candidate") && p["datapoints"] == json!(5))
        {
            assert!(shown["last_report"]["rss_bytes"].as_u64().unwrap() > 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no volume report with the candidate: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = ctl(&fleet, Some(&fleet.admin), &["rollout", "ls"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));
    assert_eq!(
        ctl(&fleet, None, &["fleet", "ls"]).status.code(),
        Some(3),
        "no token"
    );
    assert_eq!(
        ctl(&fleet, Some("phx_wrong"), &["fleet", "ls"])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(
        ctl(&fleet, Some(&fleet.admin), &["fleet", "show", "zz"])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(
        ctl(&fleet, Some(&fleet.admin), &["rollout", "show", "999"])
            .status
            .code(),
        Some(4)
    );
    let bad = fleet.dir.path().join("bad.yaml");
    std::fs::write(&bad, "processors: { batch: { timeout: soon } }\n").unwrap();
    let out = ctl(&fleet, None, &["config", "validate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("processors.batch.timeout"));
    let out = Command::new(PHOENIXCTL)
        .args(["--server", "http://127.0.0.1:1", "fleet", "ls"])
        .env("PHOENIX_TOKEN", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "unreachable");

    // A manual rollback puts c back on its local file.
    let out = ctl(
        &fleet,
        Some(&fleet.operator),
        &["rollout", "rollback", &id.to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_rollout(id, "rolled_back").await;
    wait_hash(&c, &before[2], "c after the manual rollback").await;

    // Every mutating call is in the audit log with who made it.
    let (_, log) = fleet
        .api("GET", "/api/v1/audit", Some(&fleet.admin), None)
        .await;
    let actions: Vec<(String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["actor"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("rollout.create".into(), "ops".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("rollout.rollback".into(), "ops".into())),
        "{actions:?}"
    );

    let (_, metrics) = fleet.api("GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert_eq!(
        metric_value(&metrics, "phoenix_control_plane_agents_connected", &[]),
        3.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "phoenix_control_plane_rollouts",
            &[("state", "rolled_back")]
        ),
        1.0
    );
    assert!(
        metric_value(
            &metrics,
            "phoenix_control_plane_offers_total",
            &[("result", "applied")]
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_fails_on_one_agent_stops_the_rollout_and_rolls_back() {
    let fleet = Fleet::start().await;
    // a and b take the offer in that order; b's local file names its receiver otlp/b, so an
    // offer whose pipeline reads from `otlp` cannot build there.
    let a = fleet.agent("a", "web", "otlp").await;
    let b = fleet.agent("b", "web", "otlp/b").await;
    let c = fleet.agent("c", "web", "otlp").await;
    fleet.wait_connected(&["a", "b", "c"]).await;
    let before = [
        config_hash(&a).await,
        config_hash(&b).await,
        config_hash(&c).await,
    ];
    let sink = Sink::start().await;
    let id = fleet
        .create_rollout("role=web", &candidate(&sink, "otlp"), 0)
        .await;
    let rollout = fleet.wait_rollout(id, "failed").await;

    let deployments = rollout["deployments"].as_array().unwrap();
    let state = |node: &str| {
        deployments
            .iter()
            .find(|d| d["node"] == json!(node))
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state("a"), "rolled_back");
    assert_eq!(state("b"), "failed");
    assert_eq!(state("c"), "skipped");
    let b_message = deployments
        .iter()
        .find(|d| d["node"] == json!("b"))
        .unwrap()["message"]
        .as_str()
        .unwrap();
    assert!(
        b_message.contains("pipelines.candidate.receivers[0]: receiver \"otlp\" is not defined"),
        "{b_message}"
    );
    assert!(
        rollout["reason"].as_str().unwrap().starts_with("b failed"),
        "{rollout}"
    );

    // a is back on its local file, b never changed, c was never offered.
    wait_hash(&a, &before[0], "a after the rollback").await;
    assert_eq!(config_hash(&b).await, before[1]);
    assert_eq!(config_hash(&c).await, before[2]);
    assert!(b
        .log()
        .contains("reload rejected, the running configuration stays"));
    for agent in [&a, &b, &c] {
        send(agent, 3).await;
    }
    assert_eq!(
        sink.wait_for(1, Duration::from_secs(2)).await,
        0,
        "no candidate left anywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_mid_rollout_resumes_from_sqlite() {
    killed_mid_rollout_resumes(Fleet::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_on_postgresql_killed_mid_rollout_resumes() {
    let db = std::thread::spawn(postgres_database).join().unwrap();
    killed_mid_rollout_resumes(Fleet::start_on(Some(db)).await).await;
}

/// A fresh database on the server of `PHOENIX_TEST_POSTGRES_URL` (`./scripts/test` starts
/// one), as a URL. Runs the synchronous client, so call it off the async runtime.
fn postgres_database() -> String {
    let Ok(url) = std::env::var("PHOENIX_TEST_POSTGRES_URL") else {
        panic!(
            "PHOENIX_TEST_POSTGRES_URL is not set: run the tests with ./scripts/test, or \
             ./scripts/with-postgres cargo test ..., which start a throwaway PostgreSQL"
        );
    };
    let name = format!("phoenix_e2e_{}", std::process::id());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let (server, _) = url.rsplit_once('/').unwrap();
    format!("{server}/{name}")
}

async fn killed_mid_rollout_resumes(mut fleet: Fleet) {
    let a = fleet.agent("a", "web", "otlp").await;
    let b = fleet.agent("b", "web", "otlp").await;
    fleet.wait_connected(&["a", "b"]).await;
    let b_before = config_hash(&b).await;
    let sink = Sink::start().await;
    // Waves of one with 4 s between them: kill the control plane while b waits.
    let id = fleet
        .create_rollout("role=web", &candidate(&sink, "otlp"), 4000)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, rollout) = fleet
            .api(
                "GET",
                &format!("/api/v1/rollouts/{id}"),
                Some(&fleet.admin),
                None,
            )
            .await;
        if rollout["deployments"][0]["state"] == json!("applied") {
            assert_eq!(rollout["deployments"][1]["state"], json!("pending"));
            break;
        }
        assert!(Instant::now() < deadline, "{rollout}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.cp.take().unwrap().kill();
    assert_eq!(
        config_hash(&b).await,
        b_before,
        "b is untouched while the control plane is away"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.cp = Some(ControlPlane::start(fleet.dir.path(), fleet.addr, &fleet.db).await);

    let rollout = fleet.wait_rollout(id, "succeeded").await;
    assert!(
        rollout["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == json!("applied")),
        "{rollout}"
    );
    assert_ne!(config_hash(&b).await, b_before);
    for agent in [&a, &b] {
        send(agent, 2).await;
    }
    assert_eq!(sink.wait_for(4, Duration::from_secs(10)).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_comes_back_with_its_last_applied_config() {
    let mut fleet = Fleet::start().await;
    let state = fleet.dir.path().join("state-a");
    let yaml = fleet.agent_yaml("a", "web", "otlp", &state);
    let a = Agent::start(&yaml).await;
    fleet.wait_connected(&["a"]).await;
    let local = config_hash(&a).await;
    let sink = Sink::start().await;
    let id = fleet
        .create_rollout("role=web", &candidate(&sink, "otlp"), 0)
        .await;
    fleet.wait_rollout(id, "succeeded").await;
    let applied = config_hash(&a).await;
    assert_ne!(applied, local);

    // The control plane goes away for good; the agent restarts and runs the offer it had.
    fleet.cp.take().unwrap().kill();
    let ports = Ports {
        grpc: a.grpc,
        http: a.http,
        telemetry: a.telemetry,
    };
    let (status, _) = a.terminate();
    assert!(status.success());
    let a = Agent::start_with(&yaml, ports).await;
    assert_eq!(config_hash(&a).await, applied);
    assert!(
        a.log()
            .contains("running the last applied control-plane offer"),
        "{}",
        a.log()
    );
    send(&a, 3).await;
    assert_eq!(sink.wait_for(3, Duration::from_secs(10)).await, 3);

    // An edit of the local file is merged with the applied offer again.
    a.write_config(&format!("{yaml}shutdown_grace_period: 5s\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while config_hash(&a).await == applied {
        assert!(Instant::now() < deadline, "no reload:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send(&a, 2).await;
    assert_eq!(
        sink.wait_for(5, Duration::from_secs(10)).await,
        5,
        "the candidate is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_on_every_route() {
    let fleet = Fleet::start().await;
    let db = fleet.cp().db.clone();
    let tokens: Vec<(&str, String)> = vec![
        ("agent", token(&db, "an-agent", "agent")),
        ("viewer", token(&db, "a-viewer", "viewer")),
        ("operator", fleet.operator.clone()),
        ("admin", fleet.admin.clone()),
    ];
    for route in phoenix_control_plane::api::ROUTES {
        let path = route
            .path
            .replace("{node}", "nobody")
            .replace("{id}", "424242")
            .replace("{hash}", "nohash");
        let body = (route.method == "POST").then(|| json!({}));
        let Some(access) = route.access else {
            let (status, _) = fleet.api(route.method, &path, None, body.clone()).await;
            assert_eq!(status, 200, "{} {path} is open", route.method);
            continue;
        };
        let (status, _) = fleet.api(route.method, &path, None, body.clone()).await;
        assert_eq!(status, 401, "{} {path} without a token", route.method);
        let (status, _) = fleet
            .api(route.method, &path, Some("phx_unknown"), body.clone())
            .await;
        assert_eq!(status, 401, "{} {path} with an unknown token", route.method);
        for (role, token) in &tokens {
            let (status, answer) = fleet
                .api(route.method, &path, Some(token), body.clone())
                .await;
            let allowed = access.allows(phoenix_control_plane::auth::Role::parse(role).unwrap());
            if allowed {
                assert!(
                    status != 401 && status != 403,
                    "{role} on {} {path}: {status} {answer}",
                    route.method
                );
            } else {
                assert_eq!(status, 403, "{role} on {} {path}: {answer}", route.method);
            }
        }
    }

    // gRPC: only agent tokens open the agent stream; agent tokens cannot use the client API.
    use phoenix_proto::v1::agent_service_client::AgentServiceClient;
    use phoenix_proto::v1::fleet_service_client::FleetServiceClient;
    let channel = tonic::transport::Endpoint::from_shared(fleet.cp().url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let hello = phoenix_proto::v1::AgentMessage {
        body: Some(phoenix_proto::v1::agent_message::Body::Hello(
            phoenix_proto::v1::AgentHello {
                node: "x".into(),
                ..Default::default()
            },
        )),
    };
    let viewer = &tokens[1].1;
    let err = AgentServiceClient::new(channel.clone())
        .connect(with_token(viewer, tokio_stream::iter(vec![hello.clone()])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = AgentServiceClient::new(channel.clone())
        .connect(tokio_stream::iter(vec![hello]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = FleetServiceClient::new(channel.clone())
        .list_agents(with_token(
            &tokens[0].1,
            phoenix_proto::v1::ListAgentsRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let agents = FleetServiceClient::new(channel)
        .list_agents(with_token(
            viewer,
            phoenix_proto::v1::ListAgentsRequest::default(),
        ))
        .await
        .unwrap();
    assert!(agents.into_inner().agents.is_empty());
    use phoenix_proto::v1::rollout_service_client::RolloutServiceClient;
    let channel = tonic::transport::Endpoint::from_shared(fleet.cp().url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = RolloutServiceClient::new(channel.clone())
        .get_rollout(with_token(
            viewer,
            phoenix_proto::v1::GetRolloutRequest { id: 7 },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let create = phoenix_proto::v1::CreateRolloutRequest {
        document: "pipelines: {}".into(),
        ..Default::default()
    };
    let err = RolloutServiceClient::new(channel.clone())
        .create_rollout(with_token(viewer, create.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = RolloutServiceClient::new(channel)
        .create_rollout(with_token(&fleet.operator, create))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "no agent to target"
    );

    // The OpenAPI document lists every route.
    let (_, doc) = fleet.api("GET", "/api/v1/openapi.json", None, None).await;
    for route in phoenix_control_plane::api::ROUTES {
        assert!(
            doc["paths"][route.path][route.method.to_lowercase()].is_object(),
            "{} {}",
            route.method,
            route.path
        );
    }
}

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_agents_and_phoenixctl_when_a_certificate_is_configured() {
    check_agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let db = dir.path().join("cp.db").display().to_string();
    let admin = token(&db, "admin", "admin");
    let agent_token = dir.path().join("agent-token");
    std::fs::write(&agent_token, token(&db, "agents", "agent")).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.path().join("cp.log");
    let _cp = KillOnDrop(
        Command::new(CONTROL_PLANE)
            .args(["serve", "--listen", &addr.to_string(), "--db"])
            .arg(&db)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
        )
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !https
        .get(format!("https://{addr}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reqwest::get(format!("http://{addr}/readyz")).await.is_err(),
        "no plain HTTP on a TLS listener"
    );

    let agent = Agent::start(&format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "{{GRPC}}" }} }} }}
exporters:
  blackhole: {{}}
pipelines:
  baseline: {{ receivers: [otlp], exporters: [blackhole] }}
telemetry: {{ listen: "{{TELEMETRY}}" }}
control_plane:
  endpoint: "https://{addr}"
  ca_file: "{ca}"
  token_file: "{token}"
  node_name: secure
  state_dir: "{state}"
"#,
        ca = cert.display(),
        token = agent_token.display(),
        state = dir.path().join("state").display(),
    ))
    .await;

    let ctl = |args: &[&str]| {
        Command::new(PHOENIXCTL)
            .args(["--server", &format!("https://{addr}"), "--ca-file"])
            .arg(&cert)
            .args(args)
            .env("PHOENIX_TOKEN", &admin)
            .env("HOME", dir.path())
            .env_remove("PHOENIX_CONFIG")
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ctl(&["fleet", "ls", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let agents: Value = serde_json::from_slice(&out.stdout).unwrap();
        if agents[0]["node"] == json!("secure") && agents[0]["connected"] == json!(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent not connected over TLS:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sink = Sink::start().await;
    let file = dir.path().join("candidate.yaml");
    std::fs::write(&file, candidate(&sink, "otlp")).unwrap();
    let out = ctl(&[
        "rollout",
        "create",
        "--selector",
        "",
        "-f",
        file.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["rollout", "watch", "1", "--timeout", "30s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    send(&agent, 2).await;
    assert_eq!(sink.wait_for(2, Duration::from_secs(10)).await, 2);
    // Without the CA, phoenixctl refuses the server's certificate.
    let out = Command::new(PHOENIXCTL)
        .args(["--server", &format!("https://{addr}"), "fleet", "ls"])
        .env("PHOENIX_TOKEN", &admin)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lost_mid_rollout_stops_it_and_changed_nodes_roll_back() {
    let fleet = Fleet::start().await;
    let a = fleet.agent("a", "web", "otlp").await;
    let b = fleet.agent("b", "web", "otlp").await;
    fleet.wait_connected(&["a", "b"]).await;
    let a_before = config_hash(&a).await;
    let sink = Sink::start().await;
    let id = fleet
        .create_rollout("role=web", &candidate(&sink, "otlp"), 3000)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, rollout) = fleet
            .api(
                "GET",
                &format!("/api/v1/rollouts/{id}"),
                Some(&fleet.admin),
                None,
            )
            .await;
        if rollout["deployments"][0]["state"] == json!("applied") {
            break;
        }
        assert!(Instant::now() < deadline, "{rollout}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(config_hash(&a).await, a_before);
    // b dies before its wave: the control plane waits --agent-lost-after (10 s), then stops.
    drop(b);
    let rollout = fleet.wait_rollout(id, "failed").await;
    assert!(
        rollout["reason"]
            .as_str()
            .unwrap()
            .contains("agent b was lost mid-wave"),
        "{rollout}"
    );
    assert_eq!(rollout["deployments"][0]["state"], json!("rolled_back"));
    assert_eq!(rollout["deployments"][1]["state"], json!("skipped"));
    wait_hash(&a, &a_before, "a after the rollback").await;
}

// ---- experiments ----

/// Sends, every 50 ms until dropped, 10 `requests` counter series (cumulative, each growing
/// by its own step) and 10 `queue` gauge series to each agent.
fn steady_load(agents: &[&Agent]) -> tokio::task::JoinHandle<()> {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    let urls: Vec<String> = agents.iter().map(|a| a.grpc_url()).collect();
    tokio::spawn(async move {
        let mut clients = Vec::new();
        for url in &urls {
            clients.push(
                opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::connect(url.clone())
                    .await
                    .unwrap(),
            );
        }
        let start = 1_700_000_000_000_000_000u64;
        for tick in 1u64.. {
            for (n, client) in clients.iter_mut().enumerate() {
                let counters = (0..10)
                    .map(|i| {
                        let mut p = testdata::number_point(
                            vec![testdata::string_attr("endpoint", &format!("e{i}"))],
                            (tick * (i + 1)) as f64,
                        );
                        p.start_time_unix_nano = start;
                        p.time_unix_nano = start + tick * 50_000_000;
                        p
                    })
                    .collect();
                let gauges = (0..10)
                    .map(|i| {
                        testdata::number_point(
                            vec![testdata::string_attr("endpoint", &format!("e{i}"))],
                            (tick % 7) as f64,
                        )
                    })
                    .collect();
                let request = ExportMetricsServiceRequest {
                    resource_metrics: vec![testdata::resource_metrics(
                        vec![testdata::string_attr("service.name", &format!("svc-{n}"))],
                        vec![
                            testdata::sum_metric("requests", counters),
                            testdata::gauge_metric("queue", gauges),
                        ],
                    )],
                };
                let _ = client.export(request).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// A definition for role=web: the candidate drops `drop` (a metric name) and ships to `sink`.
fn experiment_yaml(sink: &Sink, drop: &str, duration: &str) -> String {
    format!(
        r#"
name: drop-{drop}
selector: role=web
baseline: {{ pipeline: baseline, exporters: [otlp/base] }}
candidate:
  processors:
    filter/exp: {{ exclude: {{ metric_names: [{drop}] }} }}
  exporters:
    otlp/cand: {{ endpoint: "{sink}", compression: none }}
  pipeline: {{ receivers: [otlp], processors: [filter/exp], exporters: [otlp/cand] }}
warmup: 20s
duration: {duration}
window: 2s
criteria:
  min_series_reduction: 40%
  min_datapoints_reduction: 40%
  min_bytes_reduction: 30%
  critical: {{ metric_names: [requests] }}
  conserve: [{{ metric: requests, tolerance: 5% }}]
"#,
        sink = sink.url()
    )
}

impl Fleet {
    /// An agent whose baseline ships to `sink` through the exporter `otlp/base`.
    async fn agent_to(&self, node: &str, role: &str, sink: &Sink) -> Agent {
        let state = self.dir.path().join(format!("state-{node}"));
        let yaml = self
            .agent_yaml(node, role, "otlp", &state)
            .replace(
                "exporters:\n  blackhole: {}",
                &format!(
                    "exporters:\n  otlp/base: {{ endpoint: \"{}\", compression: none }}",
                    sink.url()
                ),
            )
            .replace("exporters: [blackhole]", "exporters: [otlp/base]");
        Agent::start(&yaml).await
    }

    async fn experiment(&self, id: i64) -> Value {
        let (status, body) = self
            .api(
                "GET",
                &format!("/api/v1/experiments/{id}"),
                Some(&self.admin),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn experiment_action(&self, id: i64, action: &str) -> (u16, Value) {
        self.api(
            "POST",
            &format!("/api/v1/experiments/{id}/{action}"),
            Some(&self.operator),
            Some(json!({})),
        )
        .await
    }

    /// Waits until the experiment is in one of `states`, and returns it.
    async fn wait_experiment(&self, id: i64, states: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let e = self.experiment(id).await;
            if states.iter().any(|s| e["state"] == json!(s)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "experiment {id} not {states:?}: {e:#}\n{}",
                self.cp().log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn criterion<'a>(experiment: &'a Value, name: &str) -> &'a Value {
    experiment["progress"]["verdict"]["criteria"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["criterion"] == json!(name)))
        .unwrap_or_else(|| panic!("no criterion {name} in {experiment:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_runs_only_on_its_targets_reaches_a_verdict_and_is_promoted() {
    let fleet = Fleet::start().await;
    let (base_a, base_b, cand) = (
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    );
    let a = fleet.agent_to("a", "web", &base_a).await;
    let b = fleet.agent_to("b", "db", &base_b).await;
    fleet.wait_connected(&["a", "b"]).await;
    let original = config_hash(&a).await;
    let load = steady_load(&[&a, &b]);
    // What each sink has received, sampled with the wall clock the agents' reports carry.
    let (base_a, cand) = (std::sync::Arc::new(base_a), std::sync::Arc::new(cand));
    let counts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, u64, u64)>::new()));
    let counting = {
        let (base_a, cand, counts) = (base_a.clone(), cand.clone(), counts.clone());
        tokio::spawn(async move {
            loop {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64;
                let sample = (now, base_a.data_points(), cand.data_points());
                counts.lock().unwrap().push(sample);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // A bad definition names its field.
    let (status, body) = fleet
        .api(
            "POST",
            "/api/v1/experiments",
            Some(&fleet.operator),
            Some(
                json!({ "document": experiment_yaml(&cand, "queue", "6s").replace("40%", "lots") }),
            ),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("criteria.min_series_reduction"),
        "{body}"
    );

    let document = experiment_yaml(&cand, "queue", "6s");
    let file = fleet.dir.path().join("exp.yaml");
    std::fs::write(&file, &document).unwrap();
    let out = ctl(
        &fleet,
        Some(&fleet.operator),
        &[
            "-o",
            "json",
            "experiment",
            "create",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"]
        .as_i64()
        .unwrap();
    assert_eq!(fleet.experiment(id).await["state"], json!("draft"));
    // Invalid transitions are refused with the reason.
    let (status, body) = fleet.experiment_action(id, "promote").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("is draft"),
        "{body}"
    );

    let out = ctl(
        &fleet,
        Some(&fleet.operator),
        &["experiment", "start", &id.to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let running = fleet
        .wait_experiment(id, &["running"], Duration::from_secs(30))
        .await;
    assert_eq!(running["progress"]["targets"], json!(["a"]));
    // The candidate runs on the target only, beside its baseline.
    let pipeline = format!("experiment_{id}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .metric(
            "phoenix_pipeline_output_datapoints_total",
            &[("pipeline", &pipeline)],
        )
        .await
        <= 0.0
    {
        assert!(
            Instant::now() < deadline,
            "no candidate output on a:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !b.metrics().await.contains(&pipeline),
        "the candidate reached b"
    );
    let (status, _) = fleet.experiment_action(id, "start").await;
    assert_eq!(status, 409);

    // The experiment ends by itself, with a verdict, and the candidate is removed.
    let out = ctl(
        &fleet,
        Some(&fleet.admin),
        &["experiment", "watch", &id.to_string(), "--timeout", "60s"],
    );
    let watched = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{watched}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(watched.contains("verdict: PASSED"), "{watched}");
    let done = fleet.experiment(id).await;
    assert_eq!(done["state"], json!("succeeded"), "{done:#}");
    let windows = done["windows"].as_array().unwrap().len();
    assert!((2..=4).contains(&windows), "{windows} windows of 2s in 6s");
    let transitions: Vec<&str> = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        transitions,
        [
            "draft",
            "pending",
            "deploying",
            "running",
            "analyzing",
            "succeeded"
        ]
    );
    wait_hash(&a, &original, "the candidate is removed after the verdict").await;

    // The verdict's numbers match what the sinks counted on both pipelines between the first
    // window's start and the last one's end (edges: a batch or two): `queue` is half the
    // points, `requests` is all of the critical series and its total is conserved.
    counting.abort();
    let counts = counts.lock().unwrap().clone();
    let windows = done["windows"].as_array().unwrap();
    let (from, to) = (
        windows[0]["start"].as_i64().unwrap(),
        windows[windows.len() - 1]["end"].as_i64().unwrap(),
    );
    let at = |t: i64| *counts.iter().rev().find(|c| c.0 <= t).unwrap_or(&counts[0]);
    let (start, end) = (at(from), at(to));
    let totals = &done["progress"]["verdict"]["totals"];
    for (pipeline, sink_count) in [
        ("baseline", end.1 - start.1),
        ("candidate", end.2 - start.2),
    ] {
        let verdict_count = totals[pipeline]["datapoints"].as_u64().unwrap();
        let error = (verdict_count as f64 - sink_count as f64).abs();
        assert!(
            error <= 60.0 + 0.05 * sink_count as f64,
            "{pipeline}: verdict {verdict_count} data points, sink {sink_count} in the same span"
        );
    }
    let reduction = criterion(&done, "min_datapoints_reduction")["measured"]
        .as_f64()
        .unwrap();
    assert!((reduction - 0.5).abs() < 0.05, "verdict {reduction}");
    let series = criterion(&done, "min_series_reduction")["measured"]
        .as_f64()
        .unwrap();
    assert!((series - 0.5).abs() < 0.01, "series reduction {series}");
    assert_eq!(criterion(&done, "critical")["measured"], json!(1.0));
    assert_eq!(totals["baseline"]["series"], json!(20));
    assert_eq!(
        totals["baseline"]["critical_series"].as_u64().unwrap() % 10,
        0
    );
    let measured_points = totals["baseline"]["datapoints"].as_u64().unwrap();
    assert!(measured_points > 0 && measured_points <= base_a.data_points());
    let rate = totals["baseline"]["datapoints_per_second"]
        .as_f64()
        .unwrap();
    assert!(
        (250.0..=450.0).contains(&rate),
        "20 points per 50 ms, less send time: {rate}/s"
    );
    let conserved = criterion(&done, "conserve requests");
    assert!(conserved["passed"].as_bool().unwrap(), "{conserved}");
    assert!(
        done["progress"]["verdict"]["without_candidate"]["cpu_cores"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let ci = &criterion(&done, "min_datapoints_reduction")["per_window"];
    let (low, high) = (
        ci["ci95_low"].as_f64().unwrap(),
        ci["ci95_high"].as_f64().unwrap(),
    );
    assert!(
        low <= reduction && reduction <= high && high - low < 0.2,
        "{ci}"
    );

    let metrics = reqwest::get(format!("{}/metrics", fleet.cp().url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("phoenix_control_plane_experiments{state=\"succeeded\"} 1"),
        "{metrics}"
    );

    // Promote: the candidate's processing becomes a's baseline, shipping to the same sink.
    let (status, body) = fleet
        .api(
            "POST",
            &format!("/api/v1/experiments/{id}/promote"),
            Some(&fleet.operator),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], json!("promoted"));
    let promotion = body["progress"]["promotion_rollout_id"].as_i64().unwrap();
    fleet.wait_rollout(promotion, "succeeded").await;
    let promoted_hash = config_hash(&a).await;
    assert_ne!(promoted_hash, original);
    let before = base_a.requests().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after: Vec<String> = flatten(&base_a.requests()[before..]);
    assert!(!after.is_empty(), "a's baseline ships after the promotion");
    assert!(
        after.iter().all(|p| !p.contains("|queue|")),
        "queue still shipped: {:?}",
        &after[..3]
    );
    assert!(
        flatten(&base_b.requests()[base_b.requests().len().saturating_sub(4)..])
            .iter()
            .any(|p| p.contains("|queue|")),
        "b was not a target"
    );

    // Roll back: a runs its previous baseline again.
    let (status, body) = fleet.experiment_action(id, "rollback").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], json!("rolled_back"));
    wait_hash(&a, &original, "the previous baseline is restored").await;
    load.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_names_its_criterion_and_a_restart_mid_experiment_loses_nothing() {
    let mut fleet = Fleet::start().await;
    let (base, cand) = (Sink::start().await, Sink::start().await);
    let a = fleet.agent_to("a", "web", &base).await;
    fleet.wait_connected(&["a"]).await;
    let original = config_hash(&a).await;
    let load = steady_load(&[&a]);

    // Dropping `requests` loses the critical series and the counter's total.
    let (status, body) = fleet
        .api(
            "POST",
            "/api/v1/experiments",
            Some(&fleet.operator),
            Some(json!({ "document": experiment_yaml(&cand, "requests", "10s") })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_i64().unwrap();
    let (status, _) = fleet.experiment_action(id, "start").await;
    assert_eq!(status, 200);

    // Kill the control plane once a window was measured; a new one resumes from SQLite.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.experiment(id).await["windows"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "no window measured:\n{}",
            fleet.cp().log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let measured_before = fleet.experiment(id).await["windows"]
        .as_array()
        .unwrap()
        .len();
    fleet.cp.take().unwrap().kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.cp = Some(ControlPlane::start(fleet.dir.path(), fleet.addr, &fleet.db).await);

    let done = fleet
        .wait_experiment(id, &["failed", "succeeded"], Duration::from_secs(60))
        .await;
    assert_eq!(done["state"], json!("failed"), "{done:#}");
    let reason = done["events"].as_array().unwrap().last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("critical") && reason.contains("conserve requests"),
        "{reason}"
    );
    assert!(!criterion(&done, "critical")["passed"].as_bool().unwrap());
    assert!(criterion(&done, "min_datapoints_reduction")["passed"]
        .as_bool()
        .unwrap());
    // Windows measured before the restart are kept and the run went on after it.
    let windows = done["windows"].as_array().unwrap();
    assert!(
        windows.len() > measured_before,
        "{} windows, {measured_before} before the restart",
        windows.len()
    );
    let indexes: Vec<u64> = windows
        .iter()
        .map(|w| w["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, (0..windows.len() as u64).collect::<Vec<_>>());
    // Each window starts at the report the previous one ended with: nothing between them,
    // the restart included, goes uncounted.
    for pair in windows.windows(2) {
        assert_eq!(pair[1]["start"], pair[0]["end"], "{:#}", done["windows"]);
    }
    wait_hash(&a, &original, "the failed candidate is removed").await;
    // A failed experiment cannot be promoted.
    let (status, body) = fleet.experiment_action(id, "promote").await;
    assert_eq!(status, 409, "{body}");
    load.abort();
}
