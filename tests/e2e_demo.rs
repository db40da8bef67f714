//! `phoenix demo` end to end, as the README runs it but with short durations: the real
//! `phoenix` binary with its embedded control plane, a real `phoenix-agent` reading this
//! machine's processes, the sample experiment to its verdict, and nothing left running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

const PHOENIX: &str = env!("CARGO_BIN_EXE_phoenix");

#[test]
fn the_demo_reaches_a_verdict_on_this_machines_processes_and_leaves_nothing_running() {
    let agent = support::agent_bin();
    let out = Command::new(PHOENIX)
        .args([
            "demo",
            "--duration",
            "20s",
            "--warmup",
            "20s",
            "--window",
            "10s",
        ])
        .arg("--agent-bin")
        .arg(&agent)
        .output()
        .expect("run phoenix demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("experiment 1 \"process-balanced\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("verdict: PASSED") || stdout.contains("verdict: FAILED"),
        "{stdout}"
    );
    for criterion in [
        "min_series_reduction",
        "critical",
        "max_cpu_overhead",
        "conserve process.cpu.time",
    ] {
        assert!(stdout.contains(criterion), "{criterion} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("the candidate passed every criterion")
            || stdout.contains("the candidate failed"),
        "{stdout}"
    );
    // The agent it started is gone, and so is its temporary directory.
    let dir = stdout
        .lines()
        .find_map(|l| l.split("(SQLite in ").nth(1))
        .map(|d| d.trim_end_matches(')').to_string())
        .expect("the demo names its directory");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let running = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !running.contains(&dir),
        "a process of the demo still runs:\n{running}"
    );
}

#[test]
fn ctrl_c_stops_the_demo_and_everything_it_started() {
    use std::io::{BufRead, BufReader};
    let agent = support::agent_bin();
    let mut demo = Command::new(PHOENIX)
        .args(["demo", "--duration", "10m"])
        .arg("--agent-bin")
        .arg(&agent)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run phoenix demo");
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut dir = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(d) = line.split("(SQLite in ").nth(1) {
            dir = Some(d.trim_end_matches(')').to_string());
        }
        if line.contains("experiment 1 started") {
            break;
        }
    }
    let dir = dir.expect("the demo names its directory");
    let ps = || {
        String::from_utf8_lossy(
            &Command::new("ps")
                .args(["-eo", "args"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string()
    };
    assert!(ps().contains(&dir), "the agent runs while the demo does");
    let status = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = demo.wait().unwrap();
    assert!(exited.success(), "{exited}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    assert!(
        !ps().contains(&dir),
        "a process of the demo still runs:\n{}",
        ps()
    );
}
