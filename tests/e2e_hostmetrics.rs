//! The `hostmetrics` receiver against the real `/proc`, through the real binary: child
//! processes with known names and command lines are scraped every second and arrive at a
//! sink over OTLP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point, ResourceMetrics};
use support::*;

const CONFIG: &str = r#"
receivers:
  hostmetrics:
    collection_interval: 1s
    initial_delay: 100ms
    scrapers:
      process:
        include: { names: ["^phxhm_"], match_type: regexp }
        metrics: { process.threads: { enabled: true } }
      load: {}
exporters:
  otlp/sink: { endpoint: "{SINK}", compression: none }
pipelines:
  baseline: { receivers: [hostmetrics], exporters: [otlp/sink] }
telemetry: { listen: "{TELEMETRY}" }
"#;

/// Copies `/bin/<tool>` to `dir/<name>` so the child's executable name is `name`.
fn tool_copy(dir: &Path, tool: &str, name: &str) -> std::path::PathBuf {
    let source = ["/bin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {tool}"));
    let target = dir.join(name);
    std::fs::copy(source, &target).unwrap();
    target
}

fn str_attr<'a>(rm: &'a ResourceMetrics, key: &str) -> Option<&'a str> {
    match attr(&rm.resource.as_ref()?.attributes, key)? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int_attr(rm: &ResourceMetrics, key: &str) -> Option<i64> {
    match attr(&rm.resource.as_ref()?.attributes, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// `metric{attrs}` → (value, start time) of one resource.
fn points(rm: &ResourceMetrics) -> BTreeMap<String, (f64, u64)> {
    let mut out = BTreeMap::new();
    for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
        let list = match &m.data {
            Some(Data::Sum(s)) => &s.data_points,
            Some(Data::Gauge(g)) => &g.data_points,
            _ => continue,
        };
        for p in list {
            let value = match p.value {
                Some(number_data_point::Value::AsDouble(d)) => d,
                Some(number_data_point::Value::AsInt(i)) => i as f64,
                None => f64::NAN,
            };
            out.insert(
                format!("{}{{{}}}", m.name, attrs(&p.attributes)),
                (value, p.start_time_unix_nano),
            );
        }
    }
    out
}

/// The resource of `pid` in each request (scrape) that has it.
fn scrapes_of(requests: &[ExportMetricsServiceRequest], pid: u32) -> Vec<ResourceMetrics> {
    requests
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .filter(|rm| int_attr(rm, "process.pid") == Some(i64::from(pid)))
        .cloned()
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn child_processes_are_scraped_with_their_names_command_lines_and_metrics() {
    let bin = tempfile::tempdir().unwrap();
    let sleeper = tool_copy(bin.path(), "sleep", "phxhm_sleep");
    let shell = tool_copy(bin.path(), "sh", "phxhm_sh");
    let churn = tool_copy(bin.path(), "sleep", "phxhm_churn");

    let mut sleep = KillOnDrop(Command::new(&sleeper).arg("300").spawn().unwrap());
    // A distinctive argument with double spaces, which must arrive byte for byte.
    // `read` blocks on the open stdin pipe, so the shell has no child to leave behind.
    let script = "read line; echo 'phoenix  marker'";
    let mut sh = KillOnDrop(
        Command::new(&shell)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (sleep_pid, sh_pid) = (sleep.0.id(), sh.0.id());
    // A process that does not run between scrapes, under a parent that does not either:
    // written from its last full read (`phoenix_receiver_scrape_idle_processes_total`).
    let idler = tool_copy(bin.path(), "sleep", "phxhm_idle");
    let mut waiter = KillOnDrop(
        Command::new("/bin/sh")
            .args(["-c", "\"$0\" 300 </dev/null >/dev/null & echo $!; read x"])
            .arg(&idler)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let idle_pid: u32 = {
        let mut line = String::new();
        let stdout = waiter.0.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        line.trim().parse().unwrap()
    };
    let _idle = KillPidOnDrop(idle_pid);

    let sink = Sink::start().await;
    let agent = Agent::start(&CONFIG.replace("{SINK}", &sink.url())).await;

    // Processes that live 20 ms, started all the time: many exit between the listing of
    // /proc and the reading of their files, which must not fail a scrape.
    let stop_churn = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churner = {
        let stop = stop_churn.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut child) = Command::new(&churn).arg("0.02").spawn() {
                    let _ = child.wait();
                }
            }
        })
    };

    wait_until(
        "four scrapes of the sleeper",
        Duration::from_secs(20),
        || scrapes_of(&sink.requests(), sleep_pid).len() >= 4,
    )
    .await;

    let requests = sink.requests();
    let scrapes = scrapes_of(&requests, sleep_pid);
    let first = &scrapes[0];
    assert_eq!(
        str_attr(first, "process.executable.name"),
        Some("phxhm_sleep")
    );
    assert_eq!(
        str_attr(first, "process.executable.path"),
        Some(sleeper.to_str().unwrap())
    );
    assert_eq!(str_attr(first, "process.command"), sleeper.to_str());
    let expected_line = format!("{} 300", sleeper.display());
    assert_eq!(
        str_attr(first, "process.command_line"),
        Some(expected_line.as_str())
    );
    assert_eq!(
        int_attr(first, "process.parent_pid"),
        Some(i64::from(std::process::id()))
    );
    if is_root() {
        assert_eq!(str_attr(first, "process.owner"), Some("root"));
    }
    let mut previous_cpu = 0.0;
    let mut start_times = std::collections::BTreeSet::new();
    for rm in &scrapes {
        let p = points(rm);
        for state in ["user", "system", "wait"] {
            assert!(
                p.contains_key(&format!(
                    "process.cpu.time{{state:StringValue(\"{state}\")}}"
                )),
                "{p:?}"
            );
        }
        let cpu: f64 = p
            .iter()
            .filter(|(k, _)| k.starts_with("process.cpu.time"))
            .map(|(_, (v, _))| v)
            .sum();
        assert!(
            cpu >= previous_cpu,
            "cpu time went back: {cpu} < {previous_cpu}"
        );
        previous_cpu = cpu;
        assert!(p["process.memory.usage{}"].0 > 0.0);
        assert!(p["process.memory.virtual{}"].0 > 0.0);
        assert!(p["process.threads{}"].0 >= 1.0);
        assert!(p.contains_key("process.disk.io{direction:StringValue(\"read\")}"));
        start_times.insert(p["process.memory.usage{}"].1);
    }
    // The start time is the process's, the same in every scrape, and before now.
    assert_eq!(start_times.len(), 1, "{start_times:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let start = *start_times.iter().next().unwrap();
    assert!(
        start < now && now - start < 120_000_000_000,
        "start {start}, now {now}"
    );

    let shell_scrapes = scrapes_of(&requests, sh_pid);
    assert!(!shell_scrapes.is_empty());
    let expected_line = format!("{} -c {script}", shell.display());
    assert_eq!(
        str_attr(&shell_scrapes[0], "process.command_line"),
        Some(expected_line.as_str())
    );
    // The include filter let through only our processes (the agent itself is not one).
    for rm in requests.iter().flat_map(|r| &r.resource_metrics) {
        if let Some(name) = str_attr(rm, "process.executable.name") {
            assert!(name.starts_with("phxhm_"), "{name}");
        }
    }
    // Host scraper output shares the scrapes.
    assert!(requests.iter().flat_map(|r| &r.resource_metrics).any(|rm| {
        rm.scope_metrics
            .iter()
            .flat_map(|s| &s.metrics)
            .any(|m| m.name == "system.cpu.load_average.1m")
    }));

    // Killed between scrapes: gone from the next scrapes, which go on for the others.
    sh.0.kill().unwrap();
    sh.0.wait().unwrap();
    let seen = sink.requests().len();
    wait_until("three more scrapes", Duration::from_secs(10), || {
        sink.requests().len() >= seen + 3
    })
    .await;
    let later = sink.requests()[seen + 1..].to_vec();
    assert!(scrapes_of(&later, sh_pid).is_empty());
    assert_eq!(scrapes_of(&later, sleep_pid).len(), later.len());

    stop_churn.store(true, std::sync::atomic::Ordering::Relaxed);
    churner.join().unwrap();
    let accepted = agent
        .metric(
            "phoenix_receiver_accepted_datapoints_total",
            &[("receiver", "hostmetrics"), ("transport", "scrape")],
        )
        .await;
    assert!(accepted > 0.0);
    assert_eq!(
        agent
            .metric(
                "phoenix_receiver_requests_total",
                &[("receiver", "hostmetrics"), ("outcome", "refused")],
            )
            .await,
        0.0
    );
    let vanished = agent
        .metric(
            "phoenix_receiver_scrape_errors_total",
            &[("scraper", "process"), ("reason", "vanished")],
        )
        .await;
    eprintln!("processes that vanished mid-scrape: {vanished}");
    let idle_scrapes = scrapes_of(&sink.requests(), idle_pid);
    assert!(idle_scrapes.len() >= 4, "{}", idle_scrapes.len());
    let last = idle_scrapes.last().unwrap();
    assert_eq!(
        str_attr(last, "process.executable.name"),
        Some("phxhm_idle")
    );
    assert_eq!(
        int_attr(last, "process.parent_pid"),
        Some(i64::from(waiter.0.id()))
    );
    assert!(points(last)["process.memory.usage{}"].0 > 0.0);
    let reused = agent
        .metric(
            "phoenix_receiver_scrape_idle_processes_total",
            &[("receiver", "hostmetrics")],
        )
        .await;
    assert!(reused > 0.0, "no process written from its last read");
    sleep.0.kill().unwrap();
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// Kills a process that is not the test's child when dropped.
struct KillPidOnDrop(u32);

impl Drop for KillPidOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
