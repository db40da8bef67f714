//! Evaluates a candidate chain against the baseline on the `process` workload, in process and
//! in simulated time, the way `docs/strategies.md` reports it: volume per 10 s window (series,
//! data points, bytes), conservation of `process.cpu.time` and `process.memory.usage` totals,
//! and whether every protected process keeps its own series.
//!
//! One scrape round of the fleet is one window: its requests go through the chain, then every
//! processor deadline due by the end of the window fires, as the pipeline runner would fire it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use opentelemetry_proto::tonic::common::v1::{any_value::Value as AnyValueKind, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use phoenix_agent::config::AgentConfig;
use phoenix_agent::otlp::{ExportMetricsServiceRequest, Payload};
use phoenix_agent::processor::{self, Processor};
use prost::Message;

use crate::{ProcessWorkload, BASE_TIME_UNIX_S, SCRAPE_INTERVAL_S};

const NANOS: u64 = 1_000_000_000;

/// The processes the strategies protect (`phoenix.priority=critical` in their classify rules):
/// each must keep series of its own.
pub const PROTECTED: &[&str] = &["kubelet", "containerd", "postgres", "nginx"];

/// Volume of one pipeline's output, averaged over the measured windows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Volume {
    pub series: f64,
    pub points_per_s: f64,
    pub bytes_per_s: f64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub baseline: Volume,
    pub candidate: Volume,
    /// Increase of `process.cpu.time` over the measured windows, summed over all series.
    pub cpu_in: f64,
    pub cpu_out: f64,
    /// `process.memory.usage` summed over all series, averaged over the measured windows.
    pub memory_in: f64,
    pub memory_out: f64,
    /// Protected (host, executable) pairs in the input, and how many kept their own series.
    pub protected: usize,
    pub protected_kept: usize,
}

impl Report {
    pub fn series_reduction(&self) -> f64 {
        1.0 - self.candidate.series / self.baseline.series
    }
    pub fn points_reduction(&self) -> f64 {
        1.0 - self.candidate.points_per_s / self.baseline.points_per_s
    }
    pub fn bytes_reduction(&self) -> f64 {
        1.0 - self.candidate.bytes_per_s / self.baseline.bytes_per_s
    }
    pub fn cpu_error(&self) -> f64 {
        relative_error(self.cpu_in, self.cpu_out)
    }
    pub fn memory_error(&self) -> f64 {
        relative_error(self.memory_in, self.memory_out)
    }
}

fn relative_error(expected: f64, actual: f64) -> f64 {
    if expected == 0.0 {
        actual.abs()
    } else {
        ((actual - expected) / expected).abs()
    }
}

/// The fleet evaluated: hosts × processes, `rounds` scrapes of which the first `warm_up`
/// (the windows a ranking or an aggregation needs to settle) are not measured.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    pub seed: u64,
    pub hosts: usize,
    pub processes: usize,
    pub rounds: usize,
    pub warm_up: usize,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            seed: 1,
            hosts: 20,
            processes: 300,
            rounds: 18,
            warm_up: 3,
        }
    }
}

/// Runs the `candidate` pipeline of the agent config at `path` against the fleet.
/// `protected` lists the executable names whose processes must keep their own series.
pub fn evaluate(path: &Path, fleet: Fleet, protected: &[&str]) -> Result<Report> {
    let config = AgentConfig::load(path).map_err(|e| anyhow!("{e}"))?;
    let spec = config
        .pipelines
        .get("candidate")
        .with_context(|| format!("{}: no pipeline named candidate", path.display()))?;
    let mut stages: Vec<Box<dyn Processor>> = Vec::new();
    for name in &spec.processors {
        let (id, component) = config
            .processors
            .iter()
            .find(|(id, _)| id.as_str() == name)
            .with_context(|| format!("processor {name} is not defined"))?;
        stages.push(processor::state::standalone(
            component.config.as_ref(),
            "candidate",
            id,
        ));
    }
    if fleet.warm_up >= fleet.rounds {
        bail!("warm_up must leave at least one measured round");
    }

    let workload = ProcessWorkload::new(fleet.seed, fleet.hosts, fleet.processes, 2)?;
    let per_round = workload.requests_per_round();
    let clock = Instant::now();
    let mut baseline = Tally::default();
    let mut candidate = Tally::default();
    let mut protected_pairs = HashSet::new();
    let mut protected_seen = HashSet::new();
    for round in 0..fleet.rounds {
        let measured = round >= fleet.warm_up;
        let window_start = data_time(round.saturating_sub(1));
        let mut input = Vec::with_capacity(per_round);
        for group in 0..per_round {
            input.push(workload.request(round * per_round + group));
        }
        let mut output = Vec::new();
        for request in &input {
            output.extend(run_stages(
                &mut stages,
                vec![Payload::Decoded(request.clone())],
            )?);
        }
        // The window ends: fire whatever is due by then, once per due deadline.
        let window_end = clock + Duration::from_secs(SCRAPE_INTERVAL_S * (round as u64 + 1));
        for i in 0..stages.len() {
            for _ in 0..64 {
                let Some(deadline) = stages[i].deadline() else {
                    break;
                };
                if deadline > window_end {
                    break;
                }
                let mut out = Vec::new();
                stages[i].on_deadline(window_end, &mut out);
                output.extend(run_stages(&mut stages[i + 1..], out)?);
            }
        }
        let output: Vec<ExportMetricsServiceRequest> = output
            .into_iter()
            .map(Payload::into_request)
            .collect::<Result<_, _>>()
            .context("the chain emitted an undecodable request")?;
        baseline.window(&input, measured, window_start);
        candidate.window(&output, measured, window_start);
        if measured {
            for request in &input {
                for (host, exe) in executables(request) {
                    if protected.contains(&exe.as_str()) {
                        protected_pairs.insert((host, exe));
                    }
                }
            }
            for request in &output {
                for pair in executables(request) {
                    protected_seen.insert(pair);
                }
            }
        }
    }
    let windows = (fleet.rounds - fleet.warm_up) as f64;
    Ok(Report {
        baseline: baseline.volume(windows),
        candidate: candidate.volume(windows),
        cpu_in: baseline.cpu_increase,
        cpu_out: candidate.cpu_increase,
        memory_in: baseline.memory / windows,
        memory_out: candidate.memory / windows,
        protected: protected_pairs.len(),
        protected_kept: protected_pairs.intersection(&protected_seen).count(),
    })
}

/// The data time of scrape `round` in the workload's clock, in nanoseconds.
fn data_time(round: usize) -> u64 {
    (BASE_TIME_UNIX_S + round as u64 * SCRAPE_INTERVAL_S) * NANOS
}

fn run_stages(
    stages: &mut [Box<dyn Processor>],
    mut payloads: Vec<Payload>,
) -> Result<Vec<Payload>> {
    for stage in stages {
        let mut next = Vec::new();
        for payload in payloads {
            stage
                .process(payload, &mut next)
                .context("processor failed")?;
        }
        payloads = next;
    }
    Ok(payloads)
}

/// What one pipeline emitted, window by window.
#[derive(Default)]
struct Tally {
    series: usize,
    points: u64,
    bytes: u64,
    /// Last value and start time of every `process.cpu.time` series.
    cpu_last: HashMap<String, (f64, u64)>,
    cpu_increase: f64,
    memory: f64,
}

impl Tally {
    fn window(
        &mut self,
        requests: &[ExportMetricsServiceRequest],
        measured: bool,
        window_start: u64,
    ) {
        let mut series = HashSet::new();
        let mut points = 0;
        let mut bytes = 0;
        let mut memory = 0.0;
        for request in requests {
            bytes += request.encoded_len() as u64;
            for rm in &request.resource_metrics {
                let resource = rm
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.as_slice())
                    .unwrap_or(&[]);
                let resource_key = key(resource);
                for sm in &rm.scope_metrics {
                    for metric in &sm.metrics {
                        let Some(data) = &metric.data else { continue };
                        for (attributes, value, start) in number_points(data) {
                            let id = format!("{resource_key}|{}|{}", metric.name, key(attributes));
                            points += 1;
                            match metric.name.as_str() {
                                "process.cpu.time" => {
                                    let increase = self.cpu_step(&id, value, start, window_start);
                                    if measured {
                                        self.cpu_increase += increase;
                                    }
                                }
                                "process.memory.usage" => memory += value,
                                _ => {}
                            }
                            series.insert(id);
                        }
                        points += other_points(data);
                    }
                }
            }
        }
        if measured {
            self.series += series.len();
            self.points += points;
            self.bytes += bytes;
            self.memory += memory;
        }
    }

    /// The increase a backend sees from one cumulative point, as Prometheus' `increase()`
    /// reads a counter: the difference to the last point, the whole value after a reset, and
    /// for a new series the whole value only if it started within the window.
    fn cpu_step(&mut self, id: &str, value: f64, start: u64, window_start: u64) -> f64 {
        let previous = self.cpu_last.insert(id.to_string(), (value, start));
        match previous {
            Some((last, last_start)) if last_start == start && value >= last => value - last,
            Some(_) => value,
            None if start >= window_start => value,
            None => 0.0,
        }
    }

    fn volume(&self, windows: f64) -> Volume {
        let seconds = windows * SCRAPE_INTERVAL_S as f64;
        Volume {
            series: self.series as f64 / windows,
            points_per_s: self.points as f64 / seconds,
            bytes_per_s: self.bytes as f64 / seconds,
        }
    }
}

/// Attributes as one sorted, printable key.
fn key(attributes: &[KeyValue]) -> String {
    let sorted: BTreeMap<&str, String> = attributes
        .iter()
        .map(|kv| (kv.key.as_str(), text(kv)))
        .collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValueKind::StringValue(s)) => s.clone(),
        Some(AnyValueKind::IntValue(i)) => i.to_string(),
        Some(AnyValueKind::DoubleValue(d)) => d.to_string(),
        Some(AnyValueKind::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn number_points(data: &Data) -> Vec<(&[KeyValue], f64, u64)> {
    let points = match data {
        Data::Gauge(g) => &g.data_points,
        Data::Sum(s) => &s.data_points,
        _ => return Vec::new(),
    };
    points
        .iter()
        .map(|p| {
            let value = match p.value {
                Some(number_data_point::Value::AsDouble(d)) => d,
                Some(number_data_point::Value::AsInt(i)) => i as f64,
                None => 0.0,
            };
            (p.attributes.as_slice(), value, p.start_time_unix_nano)
        })
        .collect()
}

fn other_points(data: &Data) -> u64 {
    match data {
        Data::Histogram(h) => h.data_points.len() as u64,
        Data::ExponentialHistogram(h) => h.data_points.len() as u64,
        Data::Summary(s) => s.data_points.len() as u64,
        Data::Gauge(_) | Data::Sum(_) => 0,
    }
}

/// The (host, executable) pairs with series of their own in a request.
fn executables(request: &ExportMetricsServiceRequest) -> Vec<(String, String)> {
    request
        .resource_metrics
        .iter()
        .filter_map(|rm| {
            let attributes = &rm.resource.as_ref()?.attributes;
            let find = |k: &str| attributes.iter().find(|kv| kv.key == k).map(text);
            Some((find("host.name")?, find("process.executable.name")?))
        })
        .collect()
}
