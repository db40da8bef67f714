//! The scrapers against a fixture `/proc` written into a temp dir at test time (see
//! [`fixture`]), with exact expected values.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, NumberDataPoint, ResourceMetrics,
};

use super::fixture::{self, Process};
use super::metadata::{self, Kind, ValueType};
use super::*;
use rustix::thread::CapabilitySet;

const KERNEL: KernelConstants = KernelConstants {
    clk_tck: 100,
    page_size: 4096,
};
/// Scrape time: 1,000 s after the fixture's boot.
const NOW_SECS: u64 = fixture::BTIME + 1000;

fn config(root: &Path, scrapers: &str) -> Arc<HostmetricsConfig> {
    let yaml = format!(
        "collection_interval: 1s\nroot_path: {}\nscrapers:\n{scrapers}",
        root.display()
    );
    parse_config(serde_yaml::from_str(&yaml).unwrap()).unwrap()
}

fn scrape_once(root: &Path, scrapers: &str) -> ScrapeOutput {
    Scrapers::new(&config(root, scrapers), KERNEL)
        .scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS))
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn resource_attr(rm: &ResourceMetrics, key: &str) -> Option<String> {
    rm.resource
        .as_ref()?
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(text)
}

fn points(rm: &ResourceMetrics) -> Vec<(&str, &NumberDataPoint)> {
    let mut out = Vec::new();
    for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
        let list = match &m.data {
            Some(Data::Sum(s)) => &s.data_points,
            Some(Data::Gauge(g)) => &g.data_points,
            _ => continue,
        };
        out.extend(list.iter().map(|p| (m.name.as_str(), p)));
    }
    out
}

fn value(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => f64::NAN,
    }
}

/// `metric{attr=value,...}` → value for one resource.
fn values(rm: &ResourceMetrics) -> BTreeMap<String, f64> {
    points(rm)
        .into_iter()
        .map(|(name, p)| {
            let attrs: Vec<String> = p
                .attributes
                .iter()
                .map(|kv| format!("{}={}", kv.key, text(kv)))
                .collect();
            (format!("{name}{{{}}}", attrs.join(",")), value(p))
        })
        .collect()
}

fn by_pid(output: &ScrapeOutput) -> BTreeMap<i64, &ResourceMetrics> {
    output
        .request()
        .unwrap()
        .resource_metrics
        .iter()
        .filter_map(|rm| Some((resource_attr(rm, "process.pid")?.parse().ok()?, rm)))
        .collect()
}

const ALL_PROCESS_METRICS: &str = "  process:
    metrics:
      process.cpu.utilization: { enabled: true }
      process.memory.utilization: { enabled: true }
      process.disk.operations: { enabled: true }
      process.paging.faults: { enabled: true }
      process.signals_pending: { enabled: true }
      process.threads: { enabled: true }
      process.open_file_descriptors: { enabled: true }
      process.context_switches: { enabled: true }
      process.uptime: { enabled: true }
";

fn odd_processes() -> Vec<Process> {
    let plain = Process::new(100, "sleep", &["300"]);
    let mut spaces = Process::new(101, "my app", &["--title", "a b  c"]);
    spaces.comm = b"my (app) x".to_vec();
    let mut empty = Process::new(102, "kworker/0:1", &[]);
    empty.cmdline.clear();
    empty.exe = None;
    empty.flags |= procfs::PF_KTHREAD;
    let mut binary = Process::new(103, "bin", &[]);
    binary.cmdline = b"/opt/b\xffin\0--x=\xfe\0".to_vec();
    binary.comm = b"b\xffin".to_vec();
    let mut no_io = Process::new(104, "secret", &["--quiet"]);
    no_io.io = None;
    no_io.exe = None;
    let mut long = Process::new(105, "containerd-shim-runc-v2", &["-namespace", "k8s.io"]);
    long.shared_pending = 0b101;
    vec![plain, spaces, empty, binary, no_io, long]
}

#[test]
fn every_process_metric_has_its_exact_value() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), &odd_processes()).unwrap();
    let output = scrape_once(dir.path(), ALL_PROCESS_METRICS);
    let procs = by_pid(&output);
    assert_eq!(
        procs.keys().copied().collect::<Vec<_>>(),
        vec![100, 101, 102, 103, 104, 105]
    );

    let sleep = procs[&100];
    let expected: BTreeMap<String, f64> = [
        ("process.cpu.time{state=user}", 2.5),
        ("process.cpu.time{state=system}", 1.25),
        ("process.cpu.time{state=wait}", 0.05),
        ("process.memory.usage{}", 300.0 * 4096.0),
        ("process.memory.virtual{}", 10.0 * 1024.0 * 1024.0),
        (
            "process.memory.utilization{}",
            100.0 * 300.0 * 4096.0 / (fixture::MEM_TOTAL_KB as f64 * 1024.0),
        ),
        ("process.disk.io{direction=read}", 4096.0),
        ("process.disk.io{direction=write}", 8192.0),
        ("process.disk.operations{direction=read}", 7.0),
        ("process.disk.operations{direction=write}", 9.0),
        ("process.paging.faults{type=major}", 3.0),
        ("process.paging.faults{type=minor}", 11.0),
        ("process.signals_pending{}", 0.0),
        ("process.threads{}", 4.0),
        ("process.open_file_descriptors{}", 3.0),
        ("process.context_switches{type=involuntary}", 2.0),
        ("process.context_switches{type=voluntary}", 21.0),
        // Started 100 s after boot (10,000 ticks), scraped 1,000 s after boot.
        ("process.uptime{}", 900.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // No utilization on the first scrape, as in the Collector.
    assert_eq!(values(sleep), expected);
    let attr = |pid: i64, key: &str| resource_attr(procs[&pid], key);
    assert_eq!(attr(100, "process.parent_pid").as_deref(), Some("1"));
    assert_eq!(
        attr(100, "process.executable.name").as_deref(),
        Some("sleep")
    );
    assert_eq!(
        attr(100, "process.executable.path").as_deref(),
        Some("/usr/bin/sleep")
    );
    assert_eq!(
        attr(100, "process.command").as_deref(),
        Some("/usr/bin/sleep")
    );
    assert_eq!(
        attr(100, "process.command_line").as_deref(),
        Some("/usr/bin/sleep 300")
    );
    assert_eq!(attr(100, "process.owner").as_deref(), Some("app"));
    let start = (fixture::BTIME + 100) * 1_000_000_000;
    for (name, p) in points(sleep) {
        let def = metadata::find(name).unwrap();
        let expected_start = if matches!(def.kind, Kind::Gauge) {
            0
        } else {
            start
        };
        assert_eq!(p.start_time_unix_nano, expected_start, "{name}");
        assert_eq!(p.time_unix_nano, NOW_SECS * 1_000_000_000, "{name}");
    }

    // Spaces and parentheses in the name, spaces inside an argument.
    assert_eq!(
        attr(101, "process.executable.name").as_deref(),
        Some("my (app) x")
    );
    assert_eq!(
        attr(101, "process.command_line").as_deref(),
        Some("/usr/bin/my app --title a b  c")
    );
    // A kernel thread: empty command line, no executable, not an error.
    assert_eq!(attr(102, "process.command_line").as_deref(), Some(""));
    assert_eq!(attr(102, "process.command").as_deref(), Some(""));
    assert_eq!(attr(102, "process.executable.path"), None);
    // Bytes that are not UTF-8 become U+FFFD.
    assert_eq!(
        attr(103, "process.command_line").as_deref(),
        Some("/opt/b\u{fffd}in --x=\u{fffd}")
    );
    assert_eq!(
        attr(103, "process.executable.name").as_deref(),
        Some("b\u{fffd}in")
    );
    // Unreadable io and exe: those are left out, the rest is there.
    let secret = values(procs[&104]);
    assert!(
        !secret.keys().any(|k| k.starts_with("process.disk.")),
        "{secret:?}"
    );
    assert_eq!(secret["process.cpu.time{state=user}"], 2.5);
    assert_eq!(attr(104, "process.executable.path"), None);
    assert_eq!(attr(104, "process.owner").as_deref(), Some("app"));
    assert_eq!(
        attr(104, "process.command_line").as_deref(),
        Some("/usr/bin/secret --quiet")
    );
    // A name the kernel truncated to 15 bytes is completed from the command.
    assert_eq!(
        attr(105, "process.executable.name").as_deref(),
        Some("containerd-shim-runc-v2")
    );
    assert_eq!(values(procs[&105])["process.signals_pending{}"], 2.0);

    let e = &output.errors;
    assert_eq!(e.count("process", Reason::Io), 1);
    assert_eq!(e.count("process", Reason::Exe), 1);
    assert_eq!(e.count("process", Reason::Vanished), 0);
    assert_eq!(e.counts.len(), 2, "{e:?}");
}

#[test]
fn an_owner_missing_from_passwd_is_left_out_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(
        dir.path(),
        &[Process::new(100, "a", &[]), Process::new(101, "b", &[])],
    )
    .unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        "nobody:x:65534:65534::/:/bin/false\n",
    )
    .unwrap();
    let output = scrape_once(dir.path(), "  process: { mute_process_user_error: true }\n");
    for rm in &output.request().unwrap().resource_metrics {
        assert_eq!(resource_attr(rm, "process.owner"), None);
        assert!(resource_attr(rm, "process.command_line").is_some());
    }
    assert_eq!(output.errors.count("process", Reason::User), 2);
    assert!(output.errors.counts.values().all(|c| c.muted));
}

#[test]
fn a_vanished_process_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), &[Process::new(100, "sleep", &["1"])]).unwrap();
    // Listed, but its files are gone: it exited between the listing and the read.
    std::fs::create_dir_all(dir.path().join("proc/200")).unwrap();
    // Its exe link and io went away after its stat was read.
    let mut late = Process::new(300, "late", &[]);
    late.io = None;
    fixture::write(dir.path(), &[late]).unwrap();
    std::fs::remove_dir(dir.path().join("proc/300/io")).unwrap();
    let output = scrape_once(dir.path(), "  process: {}\n");
    assert_eq!(
        by_pid(&output).keys().copied().collect::<Vec<_>>(),
        vec![100]
    );
    assert_eq!(output.errors.count("process", Reason::Vanished), 2);
    assert!(output.errors.counts.values().all(|c| c.muted));
}

#[test]
fn cpu_utilization_comes_from_the_second_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::new(100, "busy", &[]);
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    let config = config(
        dir.path(),
        "  process: { metrics: { process.cpu.utilization: { enabled: true } } }\n",
    );
    let mut scrapers = Scrapers::new(&config, KERNEL);
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let first = scrapers.scrape(at(NOW_SECS));
    assert!(!values(by_pid(&first)[&100])
        .keys()
        .any(|k| k.contains("utilization")));
    // 10 s later: +5 s user, +1 s system on 2 CPUs.
    p.utime += 500;
    p.stime += 100;
    fixture::write(dir.path(), &[p]).unwrap();
    let second = scrapers.scrape(at(NOW_SECS + 10));
    let v = values(by_pid(&second)[&100]);
    assert_eq!(v["process.cpu.utilization{state=user}"], 0.25);
    assert_eq!(v["process.cpu.utilization{state=system}"], 0.05);
    assert_eq!(v["process.cpu.utilization{state=wait}"], 0.0);
}

#[test]
fn include_exclude_and_switches() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(
        dir.path(),
        &[
            Process::new(1, "systemd", &[]),
            Process::new(2, "java", &[]),
            Process::new(3, "javac", &[]),
        ],
    )
    .unwrap();
    let pids = |scrapers: &str| -> Vec<i64> {
        by_pid(&scrape_once(dir.path(), scrapers))
            .keys()
            .copied()
            .collect()
    };
    assert_eq!(
        pids("  process: { include: { names: [java], match_type: strict } }\n"),
        vec![2]
    );
    assert_eq!(
        pids("  process: { include: { names: [java], match_type: regexp } }\n"),
        vec![2, 3]
    );
    assert_eq!(
        pids("  process: { exclude: { names: ['^java'], match_type: regexp } }\n"),
        vec![1]
    );
    let output = scrape_once(
        dir.path(),
        "  process:
    resource_attributes: { process.pid: { enabled: false }, process.command_line: { enabled: false } }
    metrics: { process.disk.io: { enabled: false }, process.threads: { enabled: true } }
",
    );
    let rm = &output.request().unwrap().resource_metrics[0];
    assert_eq!(resource_attr(rm, "process.pid"), None);
    assert_eq!(resource_attr(rm, "process.command_line"), None);
    assert!(resource_attr(rm, "process.owner").is_some());
    let names: Vec<&str> = points(rm).iter().map(|(n, _)| *n).collect();
    assert!(names.contains(&"process.threads"));
    assert!(!names.contains(&"process.disk.io"));
}

#[test]
fn host_scrapers_read_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), &[]).unwrap();
    let output = scrape_once(
        dir.path(),
        "  cpu: { metrics: { system.cpu.logical.count: { enabled: true } } }
  memory: {}
  load: {}
  network: { exclude: { interfaces: [lo], match_type: strict } }
",
    );
    let all: BTreeMap<String, f64> = output
        .request()
        .unwrap()
        .resource_metrics
        .iter()
        .flat_map(values)
        .collect();
    assert_eq!(all["system.cpu.time{cpu=cpu0,state=user}"], 1.5);
    assert_eq!(all["system.cpu.time{cpu=cpu1,state=steal}"], 0.02);
    assert_eq!(all["system.cpu.time{cpu=cpu0,state=wait}"], 0.2);
    assert_eq!(all["system.cpu.time{cpu=cpu1,state=idle}"], 25.0);
    assert_eq!(all["system.cpu.logical.count{}"], 2.0);
    assert_eq!(
        all.keys()
            .filter(|k| k.starts_with("system.cpu.time"))
            .count(),
        16
    );
    let kb = 1024.0;
    assert_eq!(all["system.memory.usage{state=free}"], 1_000_000.0 * kb);
    assert_eq!(all["system.memory.usage{state=cached}"], 2_200_000.0 * kb);
    assert_eq!(
        all["system.memory.usage{state=used}"],
        (fixture::MEM_TOTAL_KB as f64 - 1_000_000.0 - 100_000.0 - 2_200_000.0) * kb
    );
    assert_eq!(
        all["system.memory.usage{state=slab_unreclaimable}"],
        50_000.0 * kb
    );
    assert_eq!(all["system.cpu.load_average.1m{}"], 0.5);
    assert_eq!(all["system.cpu.load_average.15m{}"], 2.0);
    assert_eq!(
        all["system.network.io{device=eth0,direction=receive}"],
        50000.0
    );
    assert_eq!(
        all["system.network.packets{device=eth0,direction=transmit}"],
        300.0
    );
    assert_eq!(
        all["system.network.errors{device=eth0,direction=transmit}"],
        3.0
    );
    assert_eq!(
        all["system.network.dropped{device=eth0,direction=receive}"],
        2.0
    );
    assert!(!all.keys().any(|k| k.contains("device=lo")));
    assert!(output.errors.counts.is_empty(), "{:?}", output.errors);

    let averaged = scrape_once(dir.path(), "  load: { cpu_average: true }\n");
    let v: BTreeMap<String, f64> = averaged
        .request()
        .unwrap()
        .resource_metrics
        .iter()
        .flat_map(values)
        .collect();
    assert_eq!(v["system.cpu.load_average.15m{}"], 1.0);
}

/// Every metric in the output carries the metadata of the one table, which is also the
/// table in docs/hostmetrics.md.
#[test]
fn output_has_the_collectors_metadata() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), &odd_processes()).unwrap();
    let config = config(
        dir.path(),
        &format!(
            "  cpu: {{ metrics: {{ system.cpu.logical.count: {{ enabled: true }} }} }}\n  memory: {{ metrics: {{ system.memory.utilization: {{ enabled: true }} }} }}\n  load: {{}}\n  network: {{}}\n{ALL_PROCESS_METRICS}"
        ),
    );
    let mut scrapers = Scrapers::new(&config, KERNEL);
    scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS));
    let output = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS + 10));
    let mut seen = std::collections::BTreeSet::new();
    for rm in &output.request().unwrap().resource_metrics {
        assert_eq!(rm.schema_url, SCHEMA_URL);
        for sm in &rm.scope_metrics {
            let scope = sm.scope.as_ref().unwrap();
            for m in &sm.metrics {
                let def =
                    metadata::find(&m.name).unwrap_or_else(|| panic!("{} undeclared", m.name));
                assert!(
                    scope.name.ends_with(&format!("/{}scraper", def.scraper)),
                    "{}",
                    m.name
                );
                assert_eq!(m.unit, def.unit, "{}", m.name);
                assert_eq!(m.description, def.description, "{}", m.name);
                let points = match (&m.data, def.kind) {
                    (Some(Data::Sum(s)), Kind::Sum { monotonic }) => {
                        assert_eq!(s.is_monotonic, monotonic, "{}", m.name);
                        assert_eq!(
                            s.aggregation_temporality,
                            AggregationTemporality::Cumulative as i32,
                            "{}",
                            m.name
                        );
                        &s.data_points
                    }
                    (Some(Data::Gauge(g)), Kind::Gauge) => &g.data_points,
                    (data, kind) => panic!("{}: {kind:?} declared, {data:?} emitted", m.name),
                };
                for p in points {
                    let ok = matches!(
                        (p.value, def.value),
                        (Some(number_data_point::Value::AsInt(_)), ValueType::Int)
                            | (
                                Some(number_data_point::Value::AsDouble(_)),
                                ValueType::Double
                            )
                    );
                    assert!(ok, "{}: value type", m.name);
                    let keys: Vec<&str> = p.attributes.iter().map(|kv| kv.key.as_str()).collect();
                    assert_eq!(keys, def.attributes, "{}", m.name);
                }
                seen.insert(m.name.clone());
            }
        }
    }
    let declared: std::collections::BTreeSet<String> = metadata::METRICS
        .iter()
        .map(|d| d.name.to_string())
        .collect();
    assert_eq!(seen, declared, "every declared metric was emitted");
}

#[test]
fn docs_metrics_table_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/hostmetrics.md");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let table = metadata::reference_markdown();
    let current = doc
        .split_once(metadata::TABLE_BEGIN)
        .and_then(|(before, rest)| {
            let (_, after) = rest.split_once(metadata::TABLE_END)?;
            Some((before.to_string(), after.to_string()))
        });
    if std::env::var_os("PHOENIX_BLESS").is_some() {
        if let Some((before, after)) = &current {
            std::fs::write(path, format!("{before}{table}{after}")).unwrap();
        }
    }
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        doc.contains(&table),
        "docs/hostmetrics.md's metrics table is stale: run `PHOENIX_BLESS=1 cargo test -p phoenix-agent --lib docs_metrics_table_is_current`"
    );
}

fn issues(yaml: &str) -> Vec<Issue> {
    parse_config(serde_yaml::from_str(yaml).unwrap())
        .err()
        .unwrap_or_default()
}

#[test]
fn config_defaults_and_errors_name_their_keys() {
    let config = parse_config(serde_yaml::from_str("scrapers: { process: }").unwrap()).unwrap();
    assert_eq!(config.collection_interval, DEFAULT_COLLECTION_INTERVAL);
    assert_eq!(config.initial_delay, DEFAULT_INITIAL_DELAY);
    assert_eq!(config.proc_dir(), Path::new("/proc"));
    let hostfs =
        parse_config(serde_yaml::from_str("root_path: /hostfs\nscrapers: { load: }").unwrap())
            .unwrap();
    assert_eq!(hostfs.proc_dir(), Path::new("/hostfs/proc"));

    let paths = |yaml: &str| issues(yaml).into_iter().map(|i| i.path).collect::<Vec<_>>();
    assert_eq!(paths("scrapers: {}"), vec!["scrapers"]);
    assert_eq!(
        paths("collection_interval: 0s\nscrapers: { cpu: }"),
        vec!["collection_interval"]
    );
    assert_eq!(
        paths("root_path: hostfs\nscrapers: { cpu: }"),
        vec!["root_path"]
    );
    let found = issues("scrapers: { disk: {}, gpu: {} }");
    assert_eq!(found[0].path, "scrapers.disk");
    assert!(found[0].message.contains("not supported"));
    assert!(found[1].message.contains("unknown scraper"));
    assert_eq!(
        paths("scrapers: { process: { metrics: { process.cpu.tim: { enabled: true } } } }"),
        vec!["scrapers.process.metrics.process.cpu.tim"]
    );
    assert_eq!(
        paths(
            "scrapers: { process: { resource_attributes: { process.cgroup: { enabled: true } } } }"
        ),
        vec!["scrapers.process.resource_attributes.process.cgroup"]
    );
    assert_eq!(
        paths("scrapers: { process: { include: { names: ['('], match_type: regexp } } }"),
        vec!["scrapers.process.include.names[0]"]
    );
    assert_eq!(
        paths("scrapers: { process: { include: { names: [a], match_type: glob } } }"),
        vec!["scrapers.process.include.match_type"]
    );
    assert_eq!(
        paths("scrapers: { network: { include: { interfaces: [] } } }"),
        vec!["scrapers.network.include.interfaces"]
    );
    assert_eq!(
        paths("scrapers: { cpu: { percpu: true } }"),
        vec!["scrapers.cpu.percpu"]
    );
    // The Collector's keys are accepted.
    assert!(issues(
        "collection_interval: 10s
root_path: /hostfs
scrapers:
  process:
    include: { names: [java], match_type: strict }
    exclude: { names: ['^k'], match_type: regexp }
    mute_process_name_error: true
    mute_process_exe_error: true
    mute_process_io_error: true
    mute_process_user_error: true
    scrape_process_delay: 10s
    resource_attributes: { process.pid: { enabled: false } }
    metrics: { process.threads: { enabled: true } }
"
    )
    .is_empty());
}

#[test]
fn reconfigure_keeps_unchanged_scrapers() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), &[Process::new(100, "busy", &[])]).unwrap();
    let util = "  process: { metrics: { process.cpu.utilization: { enabled: true } } }\n";
    let mut scrapers = Scrapers::new(&config(dir.path(), util), KERNEL);
    scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS));
    // Adding a scraper keeps the process scraper and its previous CPU times.
    scrapers.reconfigure(&config(dir.path(), &format!("{util}  load: {{}}\n")));
    let out = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS + 10));
    let all: BTreeMap<String, f64> = out
        .request()
        .unwrap()
        .resource_metrics
        .iter()
        .flat_map(values)
        .collect();
    assert!(all.contains_key("process.cpu.utilization{state=user}"));
    assert!(all.contains_key("system.cpu.load_average.1m{}"));
}

/// Descriptors of this test process open on files under `dir`.
fn fds_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

#[test]
fn a_reused_pid_reports_the_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let old = Process::new(100, "old", &["--v1"]);
    fixture::write(dir.path(), &[old, Process::new(101, "other", &[])]).unwrap();
    let config = config(
        dir.path(),
        "  process: { metrics: { process.cpu.utilization: { enabled: true }, process.uptime: { enabled: true } } }\n",
    );
    let mut scrapers = Scrapers::new(&config, KERNEL);
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    scrapers.scrape(at(NOW_SECS));

    // PID 100 exits and a new process gets it: a new directory, a later start time. The
    // old one's files, still open, keep their old content.
    std::fs::remove_dir_all(dir.path().join("proc/100")).unwrap();
    let mut new = Process::new(100, "new", &["--v2"]);
    new.starttime = 90_000;
    new.utime = 7;
    fixture::write(dir.path(), &[new]).unwrap();
    let second = scrapers.scrape(at(NOW_SECS + 10));
    let procs = by_pid(&second);
    let rm = procs[&100];
    assert_eq!(
        resource_attr(rm, "process.executable.name").as_deref(),
        Some("new")
    );
    assert_eq!(
        resource_attr(rm, "process.command_line").as_deref(),
        Some("/usr/bin/new --v2")
    );
    let v = values(rm);
    assert_eq!(v["process.cpu.time{state=user}"], 0.07);
    // Started 900 s after boot, scraped at 1,010 s; no utilization for a new process.
    assert_eq!(v["process.uptime{}"], 110.0);
    assert!(!v.keys().any(|k| k.contains("utilization")));
    assert!(values(procs[&101])
        .keys()
        .any(|k| k.contains("utilization")));

    // Same directory, another start time (files rewritten in place): also a new process.
    let mut third = Process::new(100, "third", &[]);
    third.starttime = 95_000;
    fixture::write(dir.path(), &[third]).unwrap();
    let output = scrapers.scrape(at(NOW_SECS + 20));
    let rm = by_pid(&output)[&100];
    assert_eq!(
        resource_attr(rm, "process.executable.name").as_deref(),
        Some("third")
    );
    assert_eq!(values(rm)["process.uptime{}"], 70.0);
    assert!(output.errors.counts.is_empty(), "{:?}", output.errors);
}

#[test]
fn files_of_vanished_processes_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let procs = [100, 101, 102].map(|pid| Process::new(pid, "sleep", &["9"]));
    fixture::write(dir.path(), &procs).unwrap();
    let mut scrapers = Scrapers::new(&config(dir.path(), "  process: {}\n"), KERNEL);
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let first = scrapers.scrape(at(NOW_SECS));
    // Per process with the defaults: its directory, stat, statm, cmdline and io (`exe` is
    // read through the directory, once).
    assert_eq!(first.open_files, 15);
    assert_eq!(fds_under(dir.path()), 15);

    std::fs::remove_dir_all(dir.path().join("proc/101")).unwrap();
    let second = scrapers.scrape(at(NOW_SECS + 10));
    assert_eq!(
        by_pid(&second).keys().copied().collect::<Vec<_>>(),
        vec![100, 102]
    );
    assert_eq!(second.open_files, 10);
    assert_eq!(fds_under(dir.path()), 10);
    drop(scrapers);
    assert_eq!(fds_under(dir.path()), 0);
}

#[test]
fn beyond_max_open_files_every_process_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), &odd_processes()).unwrap();
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let scrape_twice = |extra: &str| {
        let mut scrapers = Scrapers::new(
            &config(dir.path(), &format!("{ALL_PROCESS_METRICS}{extra}")),
            KERNEL,
        );
        [
            scrapers.scrape(at(NOW_SECS)),
            scrapers.scrape(at(NOW_SECS + 10)),
        ]
    };
    let counts = |o: &ScrapeOutput| -> Vec<((&str, Reason), u64)> {
        o.errors.counts.iter().map(|(k, c)| (*k, c.count)).collect()
    };
    let unlimited = scrape_twice("");
    for (budget, kept_at_most) in [
        ("    max_open_files: 10\n", 10),
        ("    max_open_files: 0\n", 0),
    ] {
        let limited = scrape_twice(budget);
        for (all, some) in unlimited.iter().zip(&limited) {
            assert_eq!(all.uncached_processes, 0);
            assert!(some.uncached_processes > 0, "{budget}");
            assert!(some.open_files <= kept_at_most, "{budget}");
            assert_eq!(some.request().unwrap(), all.request().unwrap(), "{budget}");
            assert_eq!(counts(some), counts(all), "{budget}");
        }
    }
    assert_eq!(by_pid(&unlimited[1]).len(), 6);
    // The directory, stat, statm, status, cmdline, io and fd directory of each process;
    // 104's io is unreadable (not kept), 102 is a kernel thread (no cmdline read).
    assert_eq!(unlimited[1].open_files, 6 * 7 - 2);
}

/// The `hostmetrics` example of docs/configuration.md (which shows `max_open_files`) is a
/// complete, valid agent config.
#[test]
fn the_configuration_reference_example_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let text = std::fs::read_to_string(path).unwrap();
    let section = text.split("### `hostmetrics`").nth(1).unwrap();
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    assert!(block.contains("max_open_files"));
    let parsed = crate::config::AgentConfig::from_yaml(block, Path::new("docs/configuration.md"));
    assert!(
        parsed.is_ok(),
        "{block}\n{:?}",
        parsed.err().map(|e| e.to_string())
    );
}

/// `process.executable.path` of PID 100 in each of `outputs`.
fn exe_paths(outputs: &[ScrapeOutput]) -> Vec<Option<String>> {
    outputs
        .iter()
        .map(|o| resource_attr(by_pid(o)[&100], "process.executable.path"))
        .collect()
}

#[test]
fn the_exe_link_is_read_again_when_comm_changes() {
    for budget in ["{}", "{ max_open_files: 0 }"] {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Process::new(100, "app", &[]);
        fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
        let mut scrapers = Scrapers::new(
            &config(dir.path(), &format!("  process: {budget}\n")),
            KERNEL,
        );
        let mut scrape = |s: u64| scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS + s));
        let first = scrape(0);

        // Another target under the same `comm` (the binary replaced in place, or an exec of
        // a program of the same name): not seen, the link is not read again.
        p.exe = Some("/opt/app/bin/app".into());
        fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
        let same_comm = scrape(10);

        // An exec sets `comm` to the new program's name: the link is read again.
        p.comm = b"app2".to_vec();
        p.exe = Some("/usr/bin/app2".into());
        fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
        let exec = scrape(20);

        // A new process under the PID (a later start time), same `comm`: read again.
        p.starttime += 1000;
        p.exe = Some("/usr/local/bin/app2".into());
        fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
        let new_process = scrape(30);

        assert_eq!(
            exe_paths(&[first, same_comm, exec, new_process]),
            [
                Some("/usr/bin/app"),
                Some("/usr/bin/app"),
                Some("/usr/bin/app2"),
                Some("/usr/local/bin/app2"),
            ]
            .map(|p| p.map(String::from)),
            "{budget}"
        );
    }
}

#[test]
fn an_exe_link_that_failed_is_read_again_next_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::new(100, "app", &[]);
    p.exe = None;
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    let mut scrapers = Scrapers::new(&config(dir.path(), "  process: {}\n"), KERNEL);
    let first = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS));
    assert_eq!(first.errors.count("process", Reason::Exe), 1);

    // Readable now, `comm` unchanged: the failure was not kept.
    std::fs::remove_dir(dir.path().join("proc/100/exe")).unwrap();
    p.exe = Some("/usr/bin/app".into());
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    let second = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS + 10));
    assert!(second.errors.counts.is_empty(), "{:?}", second.errors);
    assert_eq!(
        exe_paths(&[first, second]),
        [None, Some("/usr/bin/app".to_string())]
    );
}

#[test]
fn a_kernel_threads_cmdline_and_exe_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut kthread = Process::new(100, "kworker/0:1-events_unbound", &[]);
    kthread.comm = b"kworker/0:1-events_unbound".to_vec();
    kthread.flags |= procfs::PF_KTHREAD;
    // The kernel answers an empty `cmdline` for a process without memory; this one would
    // show if it were read.
    kthread.cmdline = b"never\0read\0".to_vec();
    fixture::write(dir.path(), &[kthread]).unwrap();
    let output = scrape_once(dir.path(), "  process: {}\n");
    let rm = by_pid(&output)[&100];
    assert_eq!(
        resource_attr(rm, "process.command_line").as_deref(),
        Some("")
    );
    assert_eq!(resource_attr(rm, "process.command").as_deref(), Some(""));
    assert_eq!(
        resource_attr(rm, "process.executable.name").as_deref(),
        Some("kworker/0:1-events_unbound")
    );
    assert_eq!(resource_attr(rm, "process.executable.path"), None);
    // Its directory, stat, statm and io.
    assert_eq!(output.open_files, 4);
    assert!(output.errors.counts.is_empty(), "{:?}", output.errors);
}

#[test]
fn open_file_descriptors_are_listed_afresh_through_the_kept_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::new(100, "app", &[]);
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    let config = config(
        dir.path(),
        "  process: { metrics: { process.open_file_descriptors: { enabled: true } } }\n",
    );
    let mut scrapers = Scrapers::new(&config, KERNEL);
    let mut fds = |s: u64| {
        let output = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS + s));
        values(by_pid(&output)[&100])["process.open_file_descriptors{}"]
    };
    assert_eq!(fds(0), 3.0);
    p.fds = 7;
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    assert_eq!(fds(10), 7.0);
    std::fs::remove_file(dir.path().join("proc/100/fd/6")).unwrap();
    assert_eq!(fds(20), 6.0);
}

/// A plain fixture process's resource with the default metrics, built as prost structs the
/// way the process scraper built it before it encoded its output itself: the reference the
/// encoded output must decode to.
fn reference_process(p: &Process, owner: &str, now_secs: u64) -> ResourceMetrics {
    use metadata::{int_attr, push_point, str_attr};
    let tick = KERNEL.clk_tck as f64;
    let start = u64::try_from(
        u128::from(fixture::BTIME) * 1_000_000_000
            + u128::from(p.starttime) * 1_000_000_000 / u128::from(KERNEL.clk_tck),
    )
    .unwrap();
    let now = now_secs * 1_000_000_000;
    let attributes = vec![
        int_attr("process.pid", i64::from(p.pid)),
        int_attr("process.parent_pid", p.ppid),
        str_attr(
            "process.executable.name",
            String::from_utf8(p.comm.clone()).unwrap(),
        ),
        str_attr("process.executable.path", p.exe.clone().unwrap()),
        str_attr("process.command", procfs::command(&p.cmdline)),
        str_attr("process.command_line", procfs::command_line(&p.cmdline)),
        str_attr("process.owner", owner),
    ];
    let metric = |def: &metadata::MetricDef,
                  points: &[(f64, Option<(&'static str, &'static str)>)]| {
        let mut metric = def.new_metric(points.len());
        for &(value, attr) in points {
            let attributes = attr.map(|(k, v)| vec![str_attr(k, v)]).unwrap_or_default();
            push_point(&mut metric, def.point(start, now, value, attributes));
        }
        metric
    };
    let io = p.io.as_ref().unwrap();
    let metrics = vec![
        metric(
            &metadata::PROCESS_CPU_TIME,
            &[
                (p.utime as f64 / tick, Some(("state", "user"))),
                (p.stime as f64 / tick, Some(("state", "system"))),
                (p.blkio_ticks as f64 / tick, Some(("state", "wait"))),
            ],
        ),
        metric(
            &metadata::PROCESS_MEMORY_USAGE,
            &[((p.rss_pages * KERNEL.page_size) as f64, None)],
        ),
        metric(&metadata::PROCESS_MEMORY_VIRTUAL, &[(p.vsize as f64, None)]),
        metric(
            &metadata::PROCESS_DISK_IO,
            &[
                (io.read_bytes as f64, Some(("direction", "read"))),
                (io.write_bytes as f64, Some(("direction", "write"))),
            ],
        ),
    ];
    let resource = opentelemetry_proto::tonic::resource::v1::Resource {
        attributes,
        ..Default::default()
    };
    resource_metrics("process", resource, metrics).unwrap()
}

#[test]
fn the_encoded_request_is_the_prost_built_one() {
    let dir = tempfile::tempdir().unwrap();
    let processes = vec![
        Process::new(100, "app", &["--config", "/etc/app.yaml"]),
        Process::new(101, "db", &["a  b", "", "(x)"]),
        Process::new(102, "worker", &[]),
    ];
    fixture::write(dir.path(), &processes).unwrap();
    let mut scrapers = Scrapers::new(&config(dir.path(), "  process: {}\n"), KERNEL);
    // The first scrape encodes each resource, the second copies the kept encoding.
    for now in [NOW_SECS, NOW_SECS + 10] {
        let output = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(now));
        let request = output.request().unwrap();
        // In the order of the listing, which the scraper keeps.
        let expected = ExportMetricsServiceRequest {
            resource_metrics: request
                .resource_metrics
                .iter()
                .map(|rm| resource_attr(rm, "process.pid").unwrap())
                .map(|pid| processes.iter().find(|p| p.pid.to_string() == pid).unwrap())
                .map(|p| reference_process(p, "app", now))
                .collect(),
        };
        assert_eq!(expected.resource_metrics.len(), 3);
        assert_eq!(request, &expected);
        // Byte for byte what prost encodes from the reference.
        assert_eq!(output.bytes, prost::Message::encode_to_vec(&expected));
        assert_eq!(output.data_points, crate::otlp::data_points(&expected));
    }
}

#[test]
fn every_scrapers_encoding_is_what_prost_encodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut processes = odd_processes();
    processes.extend(fixture::many(40));
    fixture::write(dir.path(), &processes).unwrap();
    let all = format!(
        "  cpu: {{}}\n  memory: {{}}\n  load: {{}}\n  network: {{}}\n{ALL_PROCESS_METRICS}"
    );
    let mut scrapers = Scrapers::new(&config(dir.path(), &all), KERNEL);
    for s in [0, 10, 20] {
        let output = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS + s));
        let request = output.request().unwrap();
        assert!(request.resource_metrics.len() > 40);
        assert_eq!(output.bytes, prost::Message::encode_to_vec(request));
        assert_eq!(output.data_points, crate::otlp::data_points(request));
        let counts = crate::otlp::wire::count(&output.bytes).unwrap();
        assert_eq!(counts.data_points, output.data_points);
    }
}

#[test]
fn a_process_whose_attributes_change_gets_a_fresh_resource() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::new(100, "app", &["--one"]);
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    let mut scrapers = Scrapers::new(&config(dir.path(), "  process: {}\n"), KERNEL);
    let mut s = 0;
    let mut scrape = |scrapers: &mut Scrapers| {
        s += 10;
        let output = scrapers.scrape(UNIX_EPOCH + Duration::from_secs(NOW_SECS + s));
        let rm = &output.request().unwrap().resource_metrics[0];
        [
            "process.parent_pid",
            "process.executable.name",
            "process.executable.path",
            "process.command_line",
            "process.owner",
        ]
        .map(|k| resource_attr(rm, k).unwrap_or_default())
    };
    let first = scrape(&mut scrapers);
    assert_eq!(
        first,
        ["1", "app", "/usr/bin/app", "/usr/bin/app --one", "app"]
    );
    assert_eq!(scrape(&mut scrapers), first);

    // `setproctitle`, or arguments rewritten in place.
    p.cmdline = b"/usr/bin/app\0--two\0".to_vec();
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    let cmdline = scrape(&mut scrapers);
    assert_eq!(cmdline[3], "/usr/bin/app --two");

    // The owner's name changes in passwd (the uid is the same).
    let uid = std::fs::metadata(dir.path().join("proc")).unwrap().uid();
    std::fs::write(
        dir.path().join("etc/passwd"),
        format!("service:x:{uid}:{uid}::/home/service:/bin/sh\n"),
    )
    .unwrap();
    assert_eq!(scrape(&mut scrapers)[4], "service");

    // An exec: another `comm` and executable.
    p.comm = b"app2".to_vec();
    p.exe = Some("/usr/bin/app2".into());
    p.cmdline = b"/usr/bin/app2\0".to_vec();
    p.ppid = 7;
    fixture::write(dir.path(), std::slice::from_ref(&p)).unwrap();
    // `write` rewrote passwd as the fixture's.
    assert_eq!(
        scrape(&mut scrapers),
        ["7", "app2", "/usr/bin/app2", "/usr/bin/app2", "app"]
    );
}

// Against this machine's `/proc`: processes that do not run between scrapes are written from
// their last full read (`ProcessScraper::read_idle`), and must read exactly as a full read.

/// Perl sets its own title (`comm` and the command line, as `setproctitle` does) to each
/// line it reads, and answers "ok"; between lines it waits without running. Its parent is a
/// `sh` waiting for it, so that the parent does not run either.
const RETITLER: &str =
    r#"$| = 1; print "$$\n"; while (my $l = <STDIN>) { chomp $l; $0 = $l; print "ok\n" }"#;

/// Kills a process when dropped (a test that fails leaves none behind).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Returns once the CPU clocks of `pids` stay the same over 50 ms: each is blocked, waiting,
/// and will not run until the test makes it.
fn wait_until_idle(pids: &[u32]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let before: Vec<_> = pids.iter().map(|&p| procfs::process_cpu_ns(p)).collect();
        std::thread::sleep(Duration::from_millis(50));
        let after: Vec<_> = pids.iter().map(|&p| procfs::process_cpu_ns(p)).collect();
        if before == after && after.iter().all(Option::is_some) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes {pids:?} kept running"
        );
    }
}

struct Retitler {
    shell: std::process::Child,
    pid: u32,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    _kill: KillOnDrop,
}

impl Retitler {
    fn spawn(title: &str) -> Self {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let mut shell = Command::new("/bin/sh")
            .args(["-c", "perl -e \"$PHX_RETITLER\"; exit 0"])
            .env("PHX_RETITLER", RETITLER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh and perl (Debian's essential perl-base) run");
        let stdin = shell.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(shell.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let pid = line.trim().parse().expect("perl prints its pid");
        let mut retitler = Self {
            shell,
            pid,
            stdin,
            stdout,
            _kill: KillOnDrop(pid),
        };
        retitler.retitle(title);
        retitler
    }

    /// Returns once the title is set and perl and its `sh` wait again.
    fn retitle(&mut self, title: &str) {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{title}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ok\n");
        wait_until_idle(&[self.pid, self.shell.id()]);
    }
}

impl Drop for Retitler {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = self.shell.wait();
    }
}

fn real_kernel() -> KernelConstants {
    let (clk_tck, page_size) = procfs::kernel_constants(Path::new("/proc"));
    KernelConstants { clk_tck, page_size }
}

/// A scraper of this machine's `/proc` keeping files (so idle processes are not read again),
/// and one keeping none (every process read in full, every scrape). `process` is the body of
/// the `process:` scraper's config.
fn real_scrapers(process: &str) -> (Scrapers, Scrapers) {
    assert!(
        procfs::is_own_pid_namespace(Path::new("/proc")),
        "the tests run in the PID namespace of /proc"
    );
    // As the agent does at start: a budget of half a soft limit of 1024 would leave the
    // test's processes, the newest, beyond it on a busy machine.
    procfs::raise_open_files_limit().unwrap();
    let kept = config(Path::new("/"), &format!("  process:\n{process}"));
    let full = format!("  process:\n{process}    max_open_files: 0\n");
    let full = config(Path::new("/"), &full);
    (
        Scrapers::new(&kept, real_kernel()),
        Scrapers::new(&full, real_kernel()),
    )
}

/// Every process metric on, as the body of a `process:` config, followed by `rest`.
fn all_process_metrics(rest: &str) -> String {
    let metrics = ALL_PROCESS_METRICS.strip_prefix("  process:\n").unwrap();
    format!("{metrics}{rest}")
}

fn stat_ppid(pid: u32) -> i64 {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
    procfs::parse_pid_stat(&stat).unwrap().ppid
}

#[test]
fn processes_that_did_not_run_are_written_as_a_full_read_writes_them() {
    // Names unique to this test run, so that another run at the same time is not counted.
    let prefix = format!("phx-i{}", std::process::id());
    let include = format!("    include: {{ names: ['^{prefix}'], match_type: regexp }}\n");
    let (mut kept, mut full) = real_scrapers(&all_process_metrics(&include));
    let mut helpers = [
        Retitler::spawn(&format!("{prefix}-one")),
        Retitler::spawn(&format!("{prefix}-two --with arguments")),
        Retitler::spawn(&format!("{prefix}-three")),
    ];
    let start = std::time::SystemTime::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let rm = |o: &ScrapeOutput, pid: u32| by_pid(o)[&i64::from(pid)].clone();
    let command_line = |o: &ScrapeOutput, pid: u32| {
        resource_attr(by_pid(o)[&i64::from(pid)], "process.command_line")
    };
    // A process is reused from its second scrape when its parent was read before it in the
    // first (listed first: a lower PID), else from its third, once its parent is known.
    assert_eq!(kept.scrape(at(0)).idle_processes, 0);
    kept.scrape(at(10));
    full.scrape(at(10));
    let idle = kept.scrape(at(20));
    let reference = full.scrape(at(20));
    assert_eq!(idle.uncached_processes, 0, "all kept within max_open_files");
    assert_eq!(idle.idle_processes, 3);
    assert_eq!(reference.idle_processes, 0);
    assert!(idle.errors.counts.is_empty(), "{:?}", idle.errors);
    for helper in &helpers {
        let written = rm(&idle, helper.pid);
        assert_eq!(written, rm(&reference, helper.pid));
        let values = values(&written);
        assert!(values["process.memory.usage{}"] > 0.0);
        assert!(values["process.memory.virtual{}"] > 0.0);
        assert!(values["process.threads{}"] >= 1.0);
        assert!(values["process.open_file_descriptors{}"] >= 3.0);
        assert_eq!(values["process.cpu.utilization{state=user}"], 0.0);
    }
    assert_eq!(
        command_line(&idle, helpers[1].pid),
        Some(format!("{prefix}-two --with arguments"))
    );

    // A process that runs (here, to change its title) is read afresh; one that exits is
    // no longer written.
    helpers[1].retitle(&format!("{prefix}-renamed"));
    let exited = helpers[2].pid;
    let [first, second, third] = helpers;
    drop(third);
    let after = kept.scrape(at(30));
    let reference = full.scrape(at(30));
    assert_eq!(after.idle_processes, 1);
    assert!(!by_pid(&after).contains_key(&i64::from(exited)));
    assert_eq!(
        command_line(&after, second.pid),
        Some(format!("{prefix}-renamed"))
    );
    assert_eq!(
        resource_attr(&rm(&after, second.pid), "process.executable.name"),
        Some(format!("{prefix}-renamed"))
    );
    for helper in [&first, &second] {
        assert_eq!(rm(&after, helper.pid), rm(&reference, helper.pid));
    }
    // The renamed one is reused again from the next scrape.
    assert_eq!(kept.scrape(at(40)).idle_processes, 2);
}

#[test]
fn a_process_whose_parent_exited_is_read_afresh() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    // Unique to this test run; short enough for `comm` (15 bytes).
    let name = format!("phx-o{}", std::process::id());
    let sleeper = dir.path().join(&name);
    std::fs::copy("/bin/sleep", &sleeper).unwrap();
    // The parent `sh` waits for a line, then exits and leaves its `sleep` to be adopted.
    let mut shell = Command::new("/bin/sh")
        .args(["-c", "\"$0\" 300 </dev/null >/dev/null & echo $!; read x"])
        .arg(&sleeper)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(shell.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let orphan: u32 = line.trim().parse().unwrap();
    let _kill = KillOnDrop(orphan);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read(format!("/proc/{orphan}/comm")).ok() != Some(format!("{name}\n").into()) {
        assert!(std::time::Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_until_idle(&[orphan, shell.id()]);

    let include = format!("    include: {{ names: [{name}], match_type: strict }}\n");
    let (mut kept, mut full) = real_scrapers(&include);
    let start = std::time::SystemTime::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let parent_pid = |o: &ScrapeOutput| {
        let rm = by_pid(o)[&i64::from(orphan)];
        rm.resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .find(|kv| kv.key == "process.parent_pid")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::IntValue(i) => Some(*i),
                _ => None,
            })
            .unwrap()
    };
    kept.scrape(at(0));
    let second = kept.scrape(at(10));
    if shell.id() < orphan {
        // The parent, listed first, had its clock read before the child's `stat`.
        assert_eq!(second.idle_processes, 1);
    }
    let idle = kept.scrape(at(20));
    assert_eq!(idle.uncached_processes, 0, "all kept within max_open_files");
    assert_eq!(idle.idle_processes, 1);
    assert_eq!(parent_pid(&idle), i64::from(shell.id()));

    // The parent exits without the child running: the child's `ppid` changes all the same.
    writeln!(shell.stdin.take().unwrap(), "exit").unwrap();
    shell.wait().unwrap();
    let adopted = kept.scrape(at(30));
    let reference = full.scrape(at(30));
    assert_eq!(adopted.idle_processes, 0);
    assert_ne!(parent_pid(&adopted), i64::from(shell.id()));
    assert_eq!(parent_pid(&adopted), stat_ppid(orphan));
    let pid = i64::from(orphan);
    assert_eq!(by_pid(&adopted)[&pid], by_pid(&reference)[&pid]);
}

#[test]
fn clocks_are_read_only_in_this_pid_namespaces_proc() {
    assert!(procfs::is_own_pid_namespace(Path::new("/proc")));
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), &[Process::new(100, "sleep", &["9"])]).unwrap();
    assert!(!procfs::is_own_pid_namespace(&dir.path().join("proc")));

    let own = std::process::id();
    let before = procfs::process_cpu_ns(own).unwrap();
    let spin = std::time::Instant::now();
    while spin.elapsed() < Duration::from_millis(30) {
        std::hint::black_box(procfs::parse_u64(b"12345"));
    }
    assert!(procfs::process_cpu_ns(own).unwrap() > before);
    // A process that exited and was reaped has no clock.
    let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
    let reaped = child.id();
    child.wait().unwrap();
    assert_eq!(procfs::process_cpu_ns(reaped), None);
}

/// A Perl process (of root's) that runs between any two scrapes, so that each reads it in
/// full (no idle reuse), under a name of its own: `<prefix>-PID`.
fn spawn_runner(prefix: &str) -> (std::process::Child, KillOnDrop, String) {
    let runner = std::process::Command::new("perl")
        .args([
            "-e",
            &format!(r#"$0 = "{prefix}-$$"; select(undef, undef, undef, 0.001) while 1"#),
        ])
        .spawn()
        .expect("perl (Debian's essential perl-base) runs");
    let kill = KillOnDrop(runner.id());
    let (pid, name) = (runner.id(), format!("{prefix}-{}", runner.id()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() != format!("{name}\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "perl did not rename itself"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (runner, kill, name)
}

/// What docs/hostmetrics.md says a non-root agent reads of another user's process with each
/// capability: `exe` is behind the kernel's ptrace check alone, `fd/` behind its mode alone
/// (0500, the process's owner), `io` behind both (0400, and the ptrace check).
#[test]
fn what_a_non_root_agent_reads_with_each_capability() {
    assert_root_to_be_refused();
    let (mut runner, _kill, name) = spawn_runner("phxcap");
    let pid = runner.id();
    let include = format!("    include: {{ names: [{name}], match_type: strict }}\n{FDS}");
    // Whether `io`, `exe` and `fd/` are read.
    let cases = [
        (CapabilitySet::empty(), [false, false, false]),
        (CapabilitySet::SYS_PTRACE, [false, true, false]),
        (CapabilitySet::DAC_READ_SEARCH, [false, false, true]),
        (
            CapabilitySet::SYS_PTRACE | CapabilitySet::DAC_READ_SEARCH,
            [true, true, true],
        ),
    ];
    for (caps, read) in cases {
        let (mut scrapers, _) = real_scrapers(&include);
        let got = in_a_thread_of_its_own(|| {
            set_thread_creds(Creds::Nobody(caps));
            Refused::scrape(&mut scrapers, pid)
        });
        assert_eq!(got.read, read, "{caps:?}");
        assert_eq!(got.errors, read.map(|r| u64::from(!r)), "{caps:?}");
    }
    runner.kill().unwrap();
    runner.wait().unwrap();
}

#[test]
fn a_refused_io_exe_or_fd_is_counted_again_and_asked_again_when_due() {
    assert_root_to_be_refused();
    let (mut runner, _kill, name) = spawn_runner("phxref");
    let pid = runner.id();
    let fd_alone = "    metrics: { process.disk.io: { enabled: false }, \
                    process.open_file_descriptors: { enabled: true } }\n    \
                    resource_attributes: { process.owner: { enabled: false }, \
                    process.executable.path: { enabled: false } }\n";
    // With the owner attribute off, the owner is read only to tell whether a refusal stands,
    // also when `fd/` is the only one.
    let cases = [
        (FDS.to_string(), Refused::ALL, Refused::NONE),
        (
            format!("{FDS}    resource_attributes: {{ process.owner: {{ enabled: false }} }}\n"),
            Refused::ALL,
            Refused::NONE,
        ),
        (
            fd_alone.to_string(),
            Refused {
                read: [false; 3],
                errors: [0, 0, 1],
                idle: false,
            },
            Refused {
                read: [false, false, true],
                errors: [0; 3],
                idle: false,
            },
        ),
    ];
    for (config, refused, read) in cases {
        let include = format!("    include: {{ names: [{name}], match_type: strict }}\n{config}");
        let (mut scrapers, _) = real_scrapers(&include);
        refused_then_asked_again(pid, &mut scrapers, refused, read);
    }
    runner.kill().unwrap();
    runner.wait().unwrap();
}

const FDS: &str = "    metrics: { process.open_file_descriptors: { enabled: true } }\n";

/// What one scrape got of process `pid`: whether its `io`, `exe` and `fd` count were read,
/// the refusals of them counted, and whether it was reused as not having run.
#[derive(Debug, PartialEq)]
struct Refused {
    read: [bool; 3],
    errors: [u64; 3],
    idle: bool,
}

impl Refused {
    const ALL: Self = Self {
        read: [false; 3],
        errors: [1; 3],
        idle: false,
    };
    const NONE: Self = Self {
        read: [true; 3],
        errors: [0; 3],
        idle: false,
    };

    fn scrape(scrapers: &mut Scrapers, pid: u32) -> Self {
        let output = scrapers.scrape(std::time::SystemTime::now());
        let rm = by_pid(&output)[&i64::from(pid)].clone();
        let values = values(&rm);
        Self {
            read: [
                values.keys().any(|k| k.starts_with("process.disk.io")),
                resource_attr(&rm, "process.executable.path").is_some(),
                values.contains_key("process.open_file_descriptors{}"),
            ],
            errors: [Reason::Io, Reason::Exe, Reason::Fd]
                .map(|r| output.errors.count("process", r)),
            idle: output.idle_processes == 1,
        }
    }
}

fn assert_root_to_be_refused() {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root: a thread takes uid nobody, so that root's processes refuse it"
    );
}

/// Credentials for [`set_thread_creds`].
enum Creds {
    Root,
    /// Uid nobody, with these capabilities.
    Nobody(CapabilitySet),
}

const NOBODY: Creds = Creds::Nobody(CapabilitySet::empty());

/// Gives the calling thread `creds`. Credentials are per thread, so a test thread of its own
/// (`in_a_thread_of_its_own`) can change them and leave the rest of the test binary root's.
fn set_thread_creds(creds: Creds) {
    use rustix::process::Uid;
    use rustix::thread::{set_capabilities, set_thread_res_uid};
    match creds {
        // Root's capabilities come back with it (the permitted set becomes the effective).
        Creds::Root => set_thread_res_uid(None, Uid::ROOT, None).unwrap(),
        Creds::Nobody(caps) => {
            // The effective uid alone: leaving root clears the effective capabilities but
            // keeps the permitted, from which `caps` are raised; the saved uid (root's)
            // allows coming back.
            set_thread_res_uid(None, Uid::from_raw(65534), None).unwrap();
            let mut sets = rustix::thread::capabilities(None).unwrap();
            sets.effective = caps;
            set_capabilities(None, sets).unwrap();
        }
    }
}

fn in_a_thread_of_its_own<T: Send>(test: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| scope.spawn(test).join().unwrap())
}

/// Scrapes running process `pid` of root's, which `scrapers` alone reads: `refused` as nobody,
/// then counted as refused again without asking while the refusal stands, then `read` when
/// asked again.
fn refused_then_asked_again(pid: u32, scrapers: &mut Scrapers, refused: Refused, read: Refused) {
    let mut scrape = || {
        std::thread::sleep(Duration::from_millis(20));
        Refused::scrape(scrapers, pid)
    };
    in_a_thread_of_its_own(|| {
        set_thread_creds(NOBODY);
        assert_eq!(scrape(), refused, "refused");
        // Root again: readable now, but the refusal stands (the process's owner is the
        // same) until it is due to be asked again.
        set_thread_creds(Creds::Root);
        let stands_for = process::refusal_stands_for(pid);
        assert!((10..20).contains(&stands_for));
        for n in 1..stands_for {
            assert_eq!(scrape(), refused, "scrape {n}");
        }
        assert_eq!(scrape(), read, "asked again");
    });
}

#[test]
fn refusals_of_one_scrape_are_asked_again_in_different_scrapes() {
    let due: std::collections::BTreeSet<u64> =
        (1000..1010).map(process::refusal_stands_for).collect();
    assert_eq!(due, (10..20).collect());
}

#[test]
fn a_process_that_did_not_run_keeps_its_io_and_exe_refusals_and_is_asked_for_fd_when_due() {
    assert_root_to_be_refused();
    let prefix = format!("phx-r{}", std::process::id());
    let include = format!("    include: {{ names: ['^{prefix}'], match_type: regexp }}\n{FDS}");
    let (mut scrapers, _) = real_scrapers(&include);
    let mut helper = Retitler::spawn(&format!("{prefix}-idle"));
    let pid = helper.pid;
    in_a_thread_of_its_own(|| {
        set_thread_creds(NOBODY);
        assert_eq!(Refused::scrape(&mut scrapers, pid), Refused::ALL, "refused");
        set_thread_creds(Creds::Root);
        // Reused from the next scrape (its parent `sh`, listed first, did not run either),
        // refusals and all, until its `fd/`, listed again for a reuse, is due.
        let idle = Refused {
            idle: true,
            ..Refused::ALL
        };
        let stands_for = process::refusal_stands_for(pid);
        for scrape in 1..stands_for {
            assert_eq!(Refused::scrape(&mut scrapers, pid), idle, "scrape {scrape}");
        }
        let fd_asked = Refused {
            read: [false, false, true],
            errors: [1, 1, 0],
            idle: true,
        };
        for scrape in stands_for..stands_for + 3 {
            assert_eq!(
                Refused::scrape(&mut scrapers, pid),
                fd_asked,
                "scrape {scrape}"
            );
        }
        // Once it ran, read in full: `io` and `exe`, long due, asked again.
        helper.retitle(&format!("{prefix}-ran"));
        assert_eq!(Refused::scrape(&mut scrapers, pid), Refused::NONE, "asked");
    });
}
