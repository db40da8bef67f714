//! `phoenix-agent validate`: exit codes and messages that name the file and key path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

#[test]
fn validate_accepts_the_shipped_configs() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs");
    let mut checked = 0;
    let shipped = std::fs::read_dir(root)
        .unwrap()
        .chain(std::fs::read_dir(format!("{root}/strategies")).unwrap());
    for entry in shipped {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = Command::new(support::AGENT)
            .args(["validate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", path.display());
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid; pipelines: baseline"));
        checked += 1;
    }
    assert!(checked >= 4, "the default config and the three strategies");
}

#[test]
fn validate_lists_every_problem_with_its_key_path_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        r#"
receivers:
  otlp: { protocols: { grpc: { endpoint: "127.0.0.1:4317" } } }
processors:
  filter/x: { include: { metric_names: ["a", "b", "regex:("] } }
exporters:
  blackhole: {}
pipelines:
  baseline: { receivers: [otlp], processors: [filter/x, topk/cpu], exporters: [blackhole] }
"#,
    )
    .unwrap();
    let out = Command::new(support::AGENT)
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml: 2 error(s)"), "{stderr}");
    assert!(
        stderr.contains("processors.filter/x.include.metric_names[2]: invalid regex"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pipelines.baseline.processors[1]: processor \"topk/cpu\" is not defined"),
        "{stderr}"
    );
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = Command::new(support::AGENT)
        .args(["validate", "--config", "/nonexistent/agent.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/agent.yaml: cannot read config"));
}

#[test]
fn every_example_in_the_configuration_reference_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let text = std::fs::read_to_string(path).unwrap();
    let blocks: Vec<&str> = text
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect();
    assert!(blocks.len() >= 8, "found {} examples", blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        let parsed = phoenix_agent::config::AgentConfig::from_yaml(
            block,
            std::path::Path::new("docs/configuration.md"),
        );
        assert!(
            parsed.is_ok(),
            "example {i}:\n{block}\n{}",
            parsed.unwrap_err()
        );
    }
}
