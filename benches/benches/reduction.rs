//! The reduction processors in steady state on the process workload: one node's scrape (300
//! processes, 2,700 data points) per batch, after a few windows have filled their state.
//! Also prints the memory each keeps per tracked input series (RSS growth over a fleet of
//! 54,000 series, divided by them, after a warm-up pass: an estimate, to a few tens of bytes).

// The inputs are built by the bench itself; a failure is a bug worth a panic.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use phoenix_agent::otlp::{ExportMetricsServiceRequest, Payload};
use phoenix_agent::processor::Processor;
use phoenix_bench::{build_processor, ProcessWorkload};

const CASES: &[(&str, &str)] = &[
    (
        "classify/priority",
        r#"{ attribute: phoenix.priority, rules: [{ match: { process.executable.name: "regex:^(kubelet|containerd|postgres|nginx)$" }, value: critical }], default: normal }"#,
    ),
    (
        "aggregate/process",
        "{ interval: 10s, drop: [process.pid, process.parent_pid, process.command, process.command_line, process.executable.path], stale_after: 10s }",
    ),
    (
        "topk/cpu",
        "{ k: 20, window: 10s, entity: [host.name, process.executable.name], rank_by: process.cpu.time, min_windows_in_top: 3 }",
    ),
    ("cardinality_limit/all", "{ max_series_per_metric: 500, window: 10s }"),
    ("cumulativetodelta", "{}"),
];

/// Rounds of the workload, one request each; counters go up from one to the next.
fn rounds(hosts: usize, count: usize) -> Vec<ExportMetricsServiceRequest> {
    let workload = ProcessWorkload::new(1, hosts, 300, hosts).expect("valid workload");
    (0..count).map(|i| workload.request(i)).collect()
}

/// Feeds `input` once, closing a window after each request when the processor has one.
fn feed(processor: &mut Box<dyn Processor>, input: &[ExportMetricsServiceRequest]) {
    let mut out = Vec::new();
    for request in input {
        processor
            .process(Payload::Decoded(request.clone()), &mut out)
            .expect("processes");
        if let Some(deadline) = processor.deadline() {
            processor.on_deadline(deadline, &mut out);
        }
        out.clear();
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn reduction(c: &mut Criterion) {
    let node = rounds(1, 40);
    let points = phoenix_agent::otlp::data_points(&node[0]);
    let mut group = c.benchmark_group("reduction");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(points));
    for (id, yaml) in CASES {
        let mut processor = build_processor(id, yaml).expect("valid config");
        feed(&mut processor, &node[..5]);
        let mut out = Vec::new();
        let mut next = 5;
        group.bench_function(*id, |b| {
            b.iter_custom(|iterations| {
                let mut spent = Duration::ZERO;
                for _ in 0..iterations {
                    let request = Payload::Decoded(node[next % node.len()].clone());
                    next += 1;
                    let started = Instant::now();
                    processor.process(request, &mut out).expect("processes");
                    spent += started.elapsed();
                    out.clear();
                }
                spent
            })
        });
    }
    group.finish();

    // Memory per tracked series: one pass over a 20-host fleet (54,000 input series).
    let fleet = rounds(20, 3);
    let series = phoenix_agent::otlp::data_points(&fleet[0]);
    // Kept alive, so that what one frees is not counted again for the next.
    let mut alive = Vec::new();
    // A first pass through the stateless classify grows the heap by what a pass needs
    // anyway (request copies), so that what follows is state only.
    let (warm_id, warm_yaml) = CASES[0];
    let mut warm = build_processor(warm_id, warm_yaml).expect("valid config");
    let mut out = Vec::new();
    for request in &fleet {
        warm.process(Payload::Decoded(request.clone()), &mut out)
            .expect("processes");
        out.clear();
    }
    for (id, yaml) in CASES {
        let before = rss_bytes();
        let mut processor = build_processor(id, yaml).expect("valid config");
        let mut out = Vec::new();
        for request in &fleet {
            processor
                .process(Payload::Decoded(request.clone()), &mut out)
                .expect("processes");
            out.clear();
        }
        let grown = rss_bytes().saturating_sub(before);
        println!(
            "state {id}: {:.0} bytes per input series ({series} series, RSS +{:.1} MiB)",
            grown as f64 / series as f64,
            grown as f64 / 1048576.0
        );
        alive.push(processor);
    }
}

criterion_group!(benches, reduction);
criterion_main!(benches);
