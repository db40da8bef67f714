//! Workloads and helpers shared by `phoenix-loadsim`, `phoenix-sink` and the criterion benches, so
//! that every benchmark measures the same data.
//!
//! The `process` workload is what the OpenTelemetry Collector's hostmetrics `process` scraper
//! emits: one `ResourceMetrics` per process (host and process identity as resource
//! attributes), one scope, and six metrics holding nine data points. A fleet of `hosts` hosts
//! with `processes` processes each is scraped every 10 s; one request carries one scrape of
//! `hosts_per_request` hosts. Each host runs a few heavy long-lived processes (systemd,
//! kubelet, a JVM with a long command line...), kernel threads (kworker, ksoftirqd...) and a
//! long tail of small processes, some of which are short-lived and come back with a new PID
//! every few scrapes. Everything is derived from a seed: the same seed gives the same bytes.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use phoenix_agent::config::ComponentId;
use phoenix_agent::otlp::wire::{self, AttributeIter, Visitor};
use phoenix_agent::otlp::{Batch, ExportMetricsServiceRequest, Payload};
use phoenix_agent::processor::{self, Processor};
use phoenix_agent::stats::{SeriesSink, VolumeMeter};
use prost::Message;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// Data points one process contributes to a scrape.
pub const POINTS_PER_PROCESS: usize = 9;

/// Seconds between two scrapes of a host.
pub const SCRAPE_INTERVAL_S: u64 = 10;

/// Time of the first scrape (2025-06-15T15:06:40Z), fixed so that requests are reproducible.
pub const BASE_TIME_UNIX_S: u64 = 1_750_000_000;

const NANOS: u64 = 1_000_000_000;

const SCOPE_NAME: &str = "github.com/open-telemetry/opentelemetry-collector-contrib/receiver/hostmetricsreceiver/internal/scraper/processscraper";
const SCOPE_VERSION: &str = "0.120.0";
const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.9.0";

/// What kind of process a slot holds; decides its resource use and lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessKind {
    /// Long-lived daemons with large footprints (systemd, kubelet, a JVM...).
    Heavy,
    /// Kernel threads: no executable path or command line, no memory of their own.
    Kernel,
    /// Everything else; some of these are short-lived.
    Tail,
}

/// One process slot of a host. Short-lived tail processes are replaced every `lifetime`
/// scrapes by a new process (a new PID) running the same program.
#[derive(Debug, Clone)]
pub struct Process {
    pub kind: ProcessKind,
    pid: i64,
    parent_pid: i64,
    executable_name: String,
    executable_path: String,
    command: String,
    command_line: String,
    owner: String,
    /// Seconds the process had run at the first scrape.
    age_s: u64,
    /// Scrapes a process of this slot lives; `None`: for the whole run.
    lifetime: Option<u64>,
    /// CPU seconds per second, by state user, system, wait.
    cpu_rates: [f64; 3],
    rss_bytes: i64,
    vms_bytes: i64,
    /// Bytes per second read and written.
    io_rates: [f64; 2],
    threads: i64,
    fds: i64,
}

/// One host and its processes, in PID order as the scraper reads `/proc`.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub processes: Vec<Process>,
}

/// The fleet of the `process` workload.
#[derive(Debug, Clone)]
pub struct ProcessWorkload {
    hosts: Vec<Host>,
    hosts_per_request: usize,
    /// Time of the first scrape, in Unix seconds.
    base_time_s: u64,
}

/// One request, encoded once up front.
#[derive(Debug, Clone)]
pub struct EncodedRequest {
    pub bytes: Bytes,
    pub data_points: u64,
}

impl ProcessWorkload {
    /// A fleet of `hosts` × `processes`; one request carries `hosts_per_request` hosts.
    pub fn new(
        seed: u64,
        hosts: usize,
        processes: usize,
        hosts_per_request: usize,
    ) -> Result<Self> {
        Self::with_churn(seed, hosts, processes, hosts_per_request, DEFAULT_CHURN)
    }

    /// As [`ProcessWorkload::new`], with `churn` the share (0 to 1) of the long tail that is
    /// short-lived: replaced by a new process (a new PID) every 1 to 30 scrapes.
    pub fn with_churn(
        seed: u64,
        hosts: usize,
        processes: usize,
        hosts_per_request: usize,
        churn: f64,
    ) -> Result<Self> {
        if hosts == 0 || processes == 0 || hosts_per_request == 0 {
            return Err(anyhow!(
                "hosts, processes and hosts per request must all be at least 1"
            ));
        }
        if !(0.0..=1.0).contains(&churn) {
            return Err(anyhow!("churn must be between 0 and 1, not {churn}"));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let hosts = (0..hosts)
            .map(|h| build_host(&mut rng, h, processes, churn))
            .collect();
        Ok(Self {
            hosts,
            hosts_per_request,
            base_time_s: BASE_TIME_UNIX_S,
        })
    }

    /// The same fleet with its first scrape at `unix_s` instead of [`BASE_TIME_UNIX_S`].
    pub fn starting_at(mut self, unix_s: u64) -> Self {
        self.base_time_s = unix_s;
        self
    }

    pub fn base_time_s(&self) -> u64 {
        self.base_time_s
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Requests that make up one scrape of the whole fleet.
    pub fn requests_per_round(&self) -> usize {
        self.hosts.len().div_ceil(self.hosts_per_request)
    }

    /// Request `index` of the endless sequence: scrape round `index / requests_per_round`,
    /// host group `index % requests_per_round`.
    pub fn request(&self, index: usize) -> ExportMetricsServiceRequest {
        let per_round = self.requests_per_round();
        let round = (index / per_round) as u64;
        let group = index % per_round;
        let start = group * self.hosts_per_request;
        let end = (start + self.hosts_per_request).min(self.hosts.len());
        let resource_metrics = self.hosts[start..end]
            .iter()
            .flat_map(|host| {
                host.processes.iter().enumerate().map(move |(slot, p)| {
                    scrape_process(self.base_time_s, &host.name, slot, p, round)
                })
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    /// At least `min` requests, rounded up to whole scrapes of the fleet, encoded.
    pub fn pool(&self, min: usize) -> Vec<EncodedRequest> {
        let per_round = self.requests_per_round();
        let count = min.max(1).div_ceil(per_round) * per_round;
        (0..count).map(|i| encode(&self.request(i))).collect()
    }
}

/// Encodes a request and counts its data points.
pub fn encode(request: &ExportMetricsServiceRequest) -> EncodedRequest {
    EncodedRequest {
        bytes: Bytes::from(request.encode_to_vec()),
        data_points: phoenix_agent::otlp::data_points(request),
    }
}

/// One scrape of one host with enough processes for at least `min_points` data points: the
/// realistic request of the micro benchmarks.
pub fn process_request(seed: u64, min_points: usize) -> ExportMetricsServiceRequest {
    let processes = min_points.div_ceil(POINTS_PER_PROCESS).max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let host = build_host(&mut rng, 0, processes, DEFAULT_CHURN);
    ExportMetricsServiceRequest {
        resource_metrics: host
            .processes
            .iter()
            .enumerate()
            .map(|(slot, p)| scrape_process(BASE_TIME_UNIX_S, &host.name, slot, p, 0))
            .collect(),
    }
}

// ---- the fleet ----

struct Program {
    name: &'static str,
    path: &'static str,
    args: &'static str,
    owner: &'static str,
}

const fn program(
    name: &'static str,
    path: &'static str,
    args: &'static str,
    owner: &'static str,
) -> Program {
    Program {
        name,
        path,
        args,
        owner,
    }
}

const HEAVY: &[Program] = &[
    program("systemd", "/usr/lib/systemd/systemd", "--switched-root --system --deserialize 31", "root"),
    program("systemd-journald", "/usr/lib/systemd/systemd-journald", "", "root"),
    program("containerd", "/usr/bin/containerd", "--config /etc/containerd/config.toml --log-level info", "root"),
    program("kubelet", "/usr/bin/kubelet", "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf --config=/var/lib/kubelet/config.yaml --container-runtime-endpoint=unix:///run/containerd/containerd.sock --pod-infra-container-image=registry.k8s.io/pause:3.9 --node-ip=10.0.12.34 --node-labels=node.kubernetes.io/instance-type=m6i.2xlarge,topology.kubernetes.io/zone=eu-west-1a --cloud-provider=external --max-pods=110", "root"),
    program("java", "/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "-Xms4g -Xmx4g -XX:+UseG1GC -XX:MaxGCPauseMillis=200 -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath=/var/lib/app/heapdump.hprof -Dfile.encoding=UTF-8 -Djava.io.tmpdir=/var/lib/app/tmp -Dlog4j2.formatMsgNoLookups=true -cp /opt/app/lib/app.jar:/opt/app/lib/netty-all-4.1.100.Final.jar:/opt/app/lib/jackson-databind-2.15.2.jar:/opt/app/lib/jackson-core-2.15.2.jar:/opt/app/lib/slf4j-api-2.0.9.jar:/opt/app/lib/logback-classic-1.4.11.jar:/opt/app/lib/micrometer-core-1.11.4.jar:/opt/app/lib/kafka-clients-3.5.1.jar:/opt/app/lib/guava-32.1.2-jre.jar com.example.orders.OrderServiceApplication --spring.profiles.active=production --server.port=8080", "app"),
    program("postgres", "/usr/lib/postgresql/16/bin/postgres", "-D /var/lib/postgresql/16/main -c config_file=/etc/postgresql/16/main/postgresql.conf", "postgres"),
    program("otelcol-contrib", "/usr/bin/otelcol-contrib", "--config=/etc/otelcol-contrib/config.yaml", "otel"),
    program("node_exporter", "/usr/bin/node_exporter", "--path.rootfs=/host --collector.filesystem.mount-points-exclude=^/(dev|proc|sys|var/lib/docker/.+)($|/)", "nobody"),
    program("dockerd", "/usr/bin/dockerd", "-H fd:// --containerd=/run/containerd/containerd.sock", "root"),
    program("nginx", "/usr/sbin/nginx", "-g daemon on; master_process on;", "root"),
    program("sshd", "/usr/sbin/sshd", "-D", "root"),
    program("python3", "/usr/bin/python3.11", "/opt/app/venv/bin/gunicorn app.wsgi:application --workers 4 --bind 0.0.0.0:8000 --timeout 60", "app"),
];

const KERNEL: &[&str] = &[
    "kworker/{cpu}:{n}-events",
    "kworker/{cpu}:{n}H-kblockd",
    "kworker/u{n}:{cpu}-events_unbound",
    "kworker/{cpu}:{n}-mm_percpu_wq",
    "ksoftirqd/{cpu}",
    "migration/{cpu}",
    "cpuhp/{cpu}",
    "idle_inject/{cpu}",
    "rcu_preempt",
    "kswapd0",
    "jbd2/nvme0n1p1-8",
    "irq/{n}-nvme0q{cpu}",
    "watchdogd",
    "kcompactd0",
];

const TAIL: &[Program] = &[
    program("containerd-shim-runc-v2", "/usr/bin/containerd-shim-runc-v2", "-namespace k8s.io -id {hex} -address /run/containerd/containerd.sock", "root"),
    program("pause", "/pause", "", "65535"),
    program("bash", "/usr/bin/bash", "-c /opt/scripts/healthcheck.sh --target 10.0.{a}.{b} --timeout 5", "root"),
    program("sh", "/usr/bin/dash", "-c sleep {n}; /usr/local/bin/rotate-logs --keep 7", "root"),
    program("python3", "/usr/bin/python3.11", "/opt/app/worker.py --queue jobs-{n} --concurrency 4 --log-level info", "app"),
    program("node", "/usr/local/bin/node", "/srv/web/server.js --port 3{n} --max-old-space-size=512", "app"),
    program("nginx", "/usr/sbin/nginx", "nginx: worker process", "www-data"),
    program("php-fpm8.2", "/usr/sbin/php-fpm8.2", "php-fpm: pool www", "www-data"),
    program("postgres", "/usr/lib/postgresql/16/bin/postgres", "postgres: app appdb 10.0.{a}.{b}({n}) idle", "postgres"),
    program("sleep", "/usr/bin/sleep", "{n}", "root"),
    program("sshd", "/usr/sbin/sshd", "sshd: deploy@pts/{n}", "deploy"),
    program("cron", "/usr/sbin/cron", "-f", "root"),
    program("coredns", "/coredns", "-conf /etc/coredns/Corefile", "nonroot"),
    program("envoy", "/usr/local/bin/envoy", "-c /etc/envoy/envoy.yaml --service-cluster orders --service-node orders-{hex} --drain-time-s 45", "envoy"),
    program("gunicorn", "/opt/app/venv/bin/python3.11", "/opt/app/venv/bin/gunicorn app.wsgi:application --workers 4 --bind 0.0.0.0:8000", "app"),
    program("kube-proxy", "/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf --hostname-override=$(NODE_NAME)", "root"),
];

/// Share of each host's processes that are kernel threads.
const KERNEL_SHARE: f64 = 0.35;
/// Share of the long tail that is short-lived, by default.
pub const DEFAULT_CHURN: f64 = 0.5;

fn fill(template: &str, rng: &mut StdRng) -> String {
    let mut out = template.to_string();
    if out.contains("{hex}") {
        let hex: String = (0..64)
            .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16usize)]))
            .collect();
        out = out.replace("{hex}", &hex);
    }
    for (key, range) in [
        ("{cpu}", 0..8u32),
        ("{n}", 0..64),
        ("{a}", 0..255),
        ("{b}", 1..255),
    ] {
        if out.contains(key) {
            out = out.replace(key, &rng.random_range(range).to_string());
        }
    }
    out
}

fn build_host(rng: &mut StdRng, index: usize, processes: usize, churn: f64) -> Host {
    let name = format!(
        "ip-10-0-{}-{}.eu-west-1.compute.internal",
        index / 250,
        index % 250 + 1
    );
    let heavy = HEAVY.len().min(processes.div_ceil(10));
    let kernel = ((processes as f64 * KERNEL_SHARE) as usize).min(processes - heavy);
    let tail = processes - heavy - kernel;
    let mut out = Vec::with_capacity(processes);

    // Kernel threads have the lowest PIDs after init.
    for k in 0..kernel {
        let name = match KERNEL.choose(rng) {
            Some(template) => fill(template, rng),
            None => "kthreadd".to_string(),
        };
        out.push(Process {
            kind: ProcessKind::Kernel,
            pid: 2 + k as i64 * 3 + rng.random_range(0..3),
            parent_pid: 2,
            command: String::new(),
            command_line: String::new(),
            executable_path: String::new(),
            executable_name: name,
            owner: "root".to_string(),
            age_s: 3_000_000,
            lifetime: None,
            cpu_rates: [0.0, rng.random_range(0.0..0.002), 0.0],
            rss_bytes: 0,
            vms_bytes: 0,
            io_rates: [0.0, 0.0],
            threads: 1,
            fds: 0,
        });
    }
    let mut next_pid = 2 + kernel as i64 * 3 + 100;
    for (i, p) in HEAVY.iter().take(heavy).enumerate() {
        let pid = if i == 0 { 1 } else { next_pid };
        next_pid += rng.random_range(5..200);
        let scale = rng.random_range(0.5..2.0);
        out.push(Process {
            kind: ProcessKind::Heavy,
            pid,
            parent_pid: if i == 0 { 0 } else { 1 },
            executable_name: p.name.to_string(),
            executable_path: p.path.to_string(),
            command: p.path.to_string(),
            command_line: command_line(p, rng),
            owner: p.owner.to_string(),
            age_s: 3_000_000 - rng.random_range(0..100_000),
            lifetime: None,
            cpu_rates: [0.2 * scale, 0.05 * scale, 0.01 * scale],
            rss_bytes: (rng.random_range(100..2_000) as i64) << 20,
            vms_bytes: (rng.random_range(1_000..8_000) as i64) << 20,
            io_rates: [rng.random_range(1e4..5e6), rng.random_range(1e4..2e6)],
            threads: rng.random_range(8..200),
            fds: rng.random_range(20..2_000),
        });
    }
    for _ in 0..tail {
        let p = TAIL.choose(rng).unwrap_or(&TAIL[0]);
        next_pid += rng.random_range(1..500);
        // Part of the tail lives for the whole run; the rest is replaced every 1 to 30 scrapes.
        let lifetime = rng.random_bool(churn).then(|| rng.random_range(1..30));
        out.push(Process {
            kind: ProcessKind::Tail,
            pid: next_pid,
            parent_pid: rng.random_range(1..next_pid.max(2)),
            executable_name: p.name.to_string(),
            executable_path: p.path.to_string(),
            command: p.path.to_string(),
            command_line: command_line(p, rng),
            owner: p.owner.to_string(),
            age_s: rng.random_range(1..500_000),
            lifetime,
            cpu_rates: [
                rng.random_range(0.0..0.02),
                rng.random_range(0.0..0.01),
                rng.random_range(0.0..0.001),
            ],
            rss_bytes: (rng.random_range(1..200) as i64) << 20,
            vms_bytes: (rng.random_range(10..1_500) as i64) << 20,
            io_rates: [rng.random_range(0.0..5e4), rng.random_range(0.0..2e4)],
            threads: rng.random_range(1..16),
            fds: rng.random_range(3..64),
        });
    }
    out.sort_by_key(|p| p.pid);
    Host {
        name,
        processes: out,
    }
}

fn command_line(p: &Program, rng: &mut StdRng) -> String {
    if p.args.is_empty() {
        p.path.to_string()
    } else {
        format!("{} {}", p.path, fill(p.args, rng))
    }
}

// ---- one scrape ----

pub(crate) fn string_attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

pub(crate) fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

#[derive(Clone, Copy)]
enum Number {
    Double(f64),
    Int(i64),
}

fn point(attributes: Vec<KeyValue>, start: u64, time: u64, value: Number) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(match value {
            Number::Double(v) => number_data_point::Value::AsDouble(v),
            Number::Int(v) => number_data_point::Value::AsInt(v),
        }),
        ..Default::default()
    }
}

fn sum(
    name: &str,
    description: &str,
    unit: &str,
    monotonic: bool,
    points: Vec<NumberDataPoint>,
) -> Metric {
    Metric {
        name: name.to_string(),
        description: description.to_string(),
        unit: unit.to_string(),
        data: Some(Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: monotonic,
        })),
        ..Default::default()
    }
}

/// The PID of slot `slot`'s process at scrape `round`, and how long that process has run.
fn identity(slot: usize, p: &Process, round: u64) -> (i64, u64) {
    match p.lifetime {
        None => (p.pid, p.age_s + round * SCRAPE_INTERVAL_S),
        Some(lifetime) => {
            let generation = round / lifetime;
            let age = (round % lifetime) * SCRAPE_INTERVAL_S + p.age_s % SCRAPE_INTERVAL_S + 1;
            let pid = if generation == 0 {
                p.pid
            } else {
                // A later process of the same slot: a PID further on, wrapping like Linux.
                (p.pid + generation as i64 * 32_749 + slot as i64 * 7) % 4_194_304 + 300
            };
            (pid, age)
        }
    }
}

fn scrape_process(
    base_time_s: u64,
    host: &str,
    slot: usize,
    p: &Process,
    round: u64,
) -> ResourceMetrics {
    let (pid, age_s) = identity(slot, p, round);
    let time_s = base_time_s + round * SCRAPE_INTERVAL_S;
    let time = time_s * NANOS;
    let start = time_s.saturating_sub(age_s) * NANOS;
    let age = age_s as f64;
    let wobble = ((round + slot as u64) % 7) as i64;

    let resource = vec![
        string_attr("host.name", host),
        int_attr("process.pid", pid),
        int_attr("process.parent_pid", p.parent_pid),
        string_attr("process.executable.name", &p.executable_name),
        string_attr("process.executable.path", &p.executable_path),
        string_attr("process.command", &p.command),
        string_attr("process.command_line", &p.command_line),
        string_attr("process.owner", &p.owner),
    ];
    let state = |s: &str| vec![string_attr("state", s)];
    let direction = |d: &str| vec![string_attr("direction", d)];
    let metrics = vec![
        sum(
            "process.cpu.time",
            "Total CPU seconds broken down by different states.",
            "s",
            true,
            vec![
                point(
                    state("user"),
                    start,
                    time,
                    Number::Double(p.cpu_rates[0] * age),
                ),
                point(
                    state("system"),
                    start,
                    time,
                    Number::Double(p.cpu_rates[1] * age),
                ),
                point(
                    state("wait"),
                    start,
                    time,
                    Number::Double(p.cpu_rates[2] * age),
                ),
            ],
        ),
        sum(
            "process.memory.usage",
            "The amount of physical memory in use.",
            "By",
            false,
            vec![point(
                vec![],
                start,
                time,
                Number::Int(p.rss_bytes + wobble * 4096 * 16),
            )],
        ),
        sum(
            "process.memory.virtual",
            "Virtual memory size.",
            "By",
            false,
            vec![point(vec![], start, time, Number::Int(p.vms_bytes))],
        ),
        sum(
            "process.disk.io",
            "Disk bytes transferred.",
            "By",
            true,
            vec![
                point(
                    direction("read"),
                    start,
                    time,
                    Number::Int((p.io_rates[0] * age) as i64),
                ),
                point(
                    direction("write"),
                    start,
                    time,
                    Number::Int((p.io_rates[1] * age) as i64),
                ),
            ],
        ),
        sum(
            "process.threads",
            "Process threads count.",
            "{threads}",
            false,
            vec![point(vec![], start, time, Number::Int(p.threads))],
        ),
        sum(
            "process.open_file_descriptors",
            "Number of file descriptors in use by the process.",
            "{count}",
            false,
            vec![point(vec![], start, time, Number::Int(p.fds + wobble))],
        ),
    ];
    ResourceMetrics {
        resource: Some(Resource {
            attributes: resource,
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: SCOPE_NAME.to_string(),
                version: SCOPE_VERSION.to_string(),
                ..Default::default()
            }),
            metrics,
            schema_url: String::new(),
        }],
        schema_url: SCHEMA_URL.to_string(),
    }
}

// ---- processors and pipelines, as the agent runs them ----

/// Processor configs of the default agent config (`configs/agent.yaml`), used by the benches.
pub mod app;
pub mod strategies;

pub mod configs {
    /// `filter/no-kernel-threads`.
    pub const FILTER: &str = r#"
exclude:
  resource_attributes:
    process.executable.name: ["regex:^kworker", "regex:^ksoftirqd"]
"#;
    /// `attributes/strip`.
    pub const ATTRIBUTES: &str = r#"
actions:
  - { key: process.command_line, action: delete }
  - { key: process.pid, action: delete }
  - { key: process.parent_pid, action: delete }
"#;
    /// `batch`.
    pub const BATCH: &str = "{ send_batch_size: 8192, timeout: 1s }";
}

/// Builds a processor the way the agent does: parse the component's YAML, then build.
pub fn build_processor(id: &str, yaml: &str) -> Result<Box<dyn Processor>> {
    let (id, config) = parse_processor(id, yaml)?;
    Ok(processor::state::standalone(config.as_ref(), "bench", &id))
}

/// Builds processors in order the way the agent does, two that can share a pass over each
/// payload as one (see `ProcessorConfig::build_fused`).
fn build_processors(processors: &[(&str, &str)]) -> Result<Vec<Box<dyn Processor>>> {
    let parsed = processors
        .iter()
        .map(|(id, yaml)| parse_processor(id, yaml))
        .collect::<Result<Vec<_>>>()?;
    let mut built = Vec::with_capacity(parsed.len());
    let mut i = 0;
    while let Some((id, config)) = parsed.get(i) {
        let fused = parsed.get(i + 1).and_then(|(_, next)| {
            processor::state::standalone_fused(config.as_ref(), next.as_ref(), "bench", id)
        });
        match fused {
            Some(processor) => {
                built.push(processor);
                i += 2;
            }
            None => {
                built.push(processor::state::standalone(config.as_ref(), "bench", id));
                i += 1;
            }
        }
    }
    Ok(built)
}

fn parse_processor(
    id: &str,
    yaml: &str,
) -> Result<(ComponentId, Arc<dyn processor::ProcessorConfig>)> {
    let id = ComponentId::parse(id).map_err(|e| anyhow!(e))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(yaml).with_context(|| format!("processor {id}: YAML"))?;
    let config = processor::parse(&id, value).map_err(|issues| {
        anyhow!(
            "processor {id}: {}",
            issues
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    Ok((id, config))
}

/// One pipeline without its queue and exporters: the processors in order, then the volume
/// meter on what leaves them, as the agent's pipeline runner does for every batch.
pub struct Pipeline {
    stages: Vec<Box<dyn Processor>>,
    meter: VolumeMeter,
    /// Whether the last processor may meter what it writes, as in the agent.
    premeter: bool,
    /// Data points and bytes that left the pipeline.
    pub emitted_points: u64,
    pub emitted_bytes: u64,
}

impl Pipeline {
    /// `processors` as (component id, YAML config) pairs.
    pub fn new(name: &str, processors: &[(&str, &str)]) -> Result<Self> {
        let stages = build_processors(processors)?;
        Ok(Self {
            stages,
            meter: VolumeMeter::new(name),
            premeter: true,
            emitted_points: 0,
            emitted_bytes: 0,
        })
    }

    /// The meter walks everything that leaves the pipeline, as it did before the last
    /// processor could meter what it writes: the reference for what that saves.
    pub fn meter_by_walking(mut self) -> Self {
        self.premeter = false;
        self
    }

    /// Runs one shared batch through the processors and meters the output.
    pub fn process(&mut self, batch: Arc<Batch>) -> Result<()> {
        let series = if self.premeter {
            self.meter.series_sink()
        } else {
            None
        };
        let (payloads, premetered) =
            run_stages(&mut self.stages, vec![Payload::Shared(batch)], series)?;
        self.emit(payloads, premetered);
        Ok(())
    }

    /// Flushes every stage, each flush running through the stages after it.
    pub fn flush(&mut self) -> Result<()> {
        for i in 0..self.stages.len() {
            let mut out = Vec::new();
            self.stages[i].flush(&mut out);
            let (out, _) = run_stages(&mut self.stages[i + 1..], out, None)?;
            self.emit(out, false);
        }
        Ok(())
    }

    fn emit(&mut self, payloads: Vec<Payload>, premetered: bool) {
        let premetered = premetered && payloads.len() == 1;
        for payload in payloads {
            let points = payload.data_points();
            let bytes = if premetered {
                let bytes = payload.into_bytes();
                self.meter.observe_premetered(bytes.len(), points);
                bytes
            } else {
                self.meter.observe_payload(payload)
            };
            self.emitted_points += points;
            self.emitted_bytes += bytes.len() as u64;
        }
    }
}

/// As the agent's pipeline runner: the last processor may meter the one payload it writes.
fn run_stages(
    stages: &mut [Box<dyn Processor>],
    mut payloads: Vec<Payload>,
    mut series: Option<SeriesSink<'_>>,
) -> Result<(Vec<Payload>, bool)> {
    let mut premetered = false;
    let last = stages.len().checked_sub(1);
    for (i, stage) in stages.iter_mut().enumerate() {
        if payloads.is_empty() {
            break;
        }
        let mut sink = match series.as_mut() {
            Some(sink) if Some(i) == last && payloads.len() == 1 => Some(sink),
            _ => None,
        };
        let mut next = Vec::with_capacity(payloads.len());
        for payload in payloads {
            premetered = match sink.as_deref_mut() {
                Some(sink) => stage.process_metered(payload, &mut next, sink),
                None => stage.process(payload, &mut next).map(|()| false),
            }
            .context("processor failed")?;
        }
        payloads = next;
    }
    let premetered = premetered && payloads.len() == 1;
    Ok((payloads, premetered))
}

// ---- what the sink counts ----

/// Totals of what a sink received, from the lean wire walk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SinkCounts {
    pub resource_metrics: u64,
    /// `ResourceMetrics` whose resource is absent or empty: they lost their identity.
    pub resourceless_resource_metrics: u64,
    pub metrics: u64,
    pub data_points: u64,
}

impl Visitor for SinkCounts {
    fn resource(&mut self, resource: &[u8]) {
        self.resource_metrics += 1;
        if resource.is_empty() {
            self.resourceless_resource_metrics += 1;
        }
    }
    fn metric(&mut self, _name: &[u8]) {
        self.metrics += 1;
    }
    fn data_point(&mut self, _attributes: AttributeIter<'_>) {
        self.data_points += 1;
    }
}

impl SinkCounts {
    /// Validates and counts one encoded request.
    pub fn of(request: &[u8]) -> Result<Self, wire::WireError> {
        let mut counts = Self::default();
        wire::walk(request, &mut counts)?;
        Ok(counts)
    }

    pub fn add(&mut self, other: &Self) {
        self.resource_metrics += other.resource_metrics;
        self.resourceless_resource_metrics += other.resourceless_resource_metrics;
        self.metrics += other.metrics;
        self.data_points += other.data_points;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let a = ProcessWorkload::new(7, 4, 50, 2).unwrap().pool(4);
        let b = ProcessWorkload::new(7, 4, 50, 2).unwrap().pool(4);
        let c = ProcessWorkload::new(8, 4, 50, 2).unwrap().pool(4);
        assert_eq!(a.len(), 4);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.bytes, y.bytes);
        }
        assert_ne!(a[0].bytes, c[0].bytes);
    }

    #[test]
    fn default_shape_matches_the_documented_request() {
        let workload = ProcessWorkload::new(1, 20, 300, 2).unwrap();
        assert_eq!(workload.requests_per_round(), 10);
        let request = encode(&workload.request(0));
        assert_eq!(request.data_points, 2 * 300 * POINTS_PER_PROCESS as u64);
        let kb = request.bytes.len() / 1024;
        assert!((500..=900).contains(&kb), "{kb} KiB");
        let counts = wire::count(&request.bytes).unwrap();
        assert_eq!(counts.data_points, request.data_points);
        assert_eq!(counts.resources, 600);
    }

    #[test]
    fn short_lived_processes_change_pid_and_timestamps_advance() {
        let workload = ProcessWorkload::new(3, 1, 200, 1).unwrap();
        let pids = |round: usize| -> Vec<i64> {
            workload
                .request(round)
                .resource_metrics
                .iter()
                .filter_map(|rm| {
                    let attrs = &rm.resource.as_ref()?.attributes;
                    match attrs[1].value.as_ref()?.value.as_ref()? {
                        Value::IntValue(pid) => Some(*pid),
                        _ => None,
                    }
                })
                .collect()
        };
        let (first, later) = (pids(0), pids(40));
        assert_eq!(first.len(), 200);
        let changed = first.iter().zip(&later).filter(|(a, b)| a != b).count();
        assert!(changed > 10 && changed < 150, "{changed} PIDs changed");
    }

    #[test]
    fn the_candidate_drops_kernel_threads_and_strips_identity() {
        let request = process_request(1, 1000);
        let encoded = encode(&request);
        assert!(encoded.data_points >= 1000);
        let mut baseline = Pipeline::new("baseline", &[("batch", configs::BATCH)]).unwrap();
        let mut candidate = Pipeline::new(
            "candidate",
            &[
                ("filter/no-kernel-threads", configs::FILTER),
                ("attributes/strip", configs::ATTRIBUTES),
                ("batch", configs::BATCH),
            ],
        )
        .unwrap();
        let batch = Arc::new(Batch::from_validated(
            encoded.bytes.clone(),
            encoded.data_points,
        ));
        baseline.process(batch.clone()).unwrap();
        candidate.process(batch).unwrap();
        baseline.flush().unwrap();
        candidate.flush().unwrap();
        assert_eq!(baseline.emitted_points, encoded.data_points);
        assert!(candidate.emitted_points < encoded.data_points);
        assert!(candidate.emitted_points > encoded.data_points / 3);
        assert!(candidate.emitted_bytes < baseline.emitted_bytes);
    }

    #[test]
    fn the_sink_flags_resource_metrics_without_a_resource() {
        let mut request = process_request(1, 20);
        request.resource_metrics[1].resource = None;
        let counts = SinkCounts::of(&request.encode_to_vec()).unwrap();
        assert_eq!(counts.resource_metrics, 3);
        assert_eq!(counts.resourceless_resource_metrics, 1);
        assert_eq!(counts.data_points, 27);
    }
}
