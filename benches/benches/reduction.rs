//! The reduction processors in steady state on the process workload: one node's scrape (300
//! processes, 2,700 data points) per batch, after a few windows have filled their state.
//! Also prints the memory each keeps per input series: the heap it still holds after one pass
//! over a fleet of 54,000 series (counted by an instrumented allocator), divided by them.

// The inputs are built by the bench itself; a failure is a bug worth a panic.
#![allow(clippy::expect_used)]

use std::alloc::System;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use phoenix_agent::otlp::{ExportMetricsServiceRequest, Payload};
use phoenix_agent::processor::Processor;
use phoenix_bench::{build_processor, ProcessWorkload};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

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
fn feed(processor: &mut Box<dyn Processor>, input: &[Payload]) {
    let mut out = Vec::new();
    for payload in input {
        processor
            .process(payload.clone(), &mut out)
            .expect("processes");
        if let Some(deadline) = processor.deadline() {
            processor.on_deadline(deadline, &mut out);
        }
        out.clear();
    }
}

/// Heap bytes `work` allocated and did not free: what the processor it builds keeps.
fn retained<T>(work: impl FnOnce() -> T) -> (T, i64) {
    let region = Region::new(GLOBAL);
    let kept = work();
    let stats = region.change();
    let net = stats.bytes_allocated as i64 - stats.bytes_deallocated as i64
        + stats.bytes_reallocated as i64;
    (kept, net)
}

/// Times `processor` on `inputs` in turn, after the first five have filled its windows; each
/// payload is copied outside the timing.
fn bench_batches(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    processor: &mut Box<dyn Processor>,
    inputs: &[Payload],
) {
    feed(processor, &inputs[..5]);
    let mut out = Vec::new();
    let mut next = 5;
    group.bench_function(id, |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for _ in 0..iterations {
                let payload = inputs[next % inputs.len()].clone();
                next += 1;
                let started = Instant::now();
                processor.process(payload, &mut out).expect("processes");
                spent += started.elapsed();
                out.clear();
            }
            spent
        })
    });
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
    let decoded: Vec<Payload> = node.iter().cloned().map(Payload::Decoded).collect();
    for (id, yaml) in CASES {
        let mut processor = build_processor(id, yaml).expect("valid config");
        bench_batches(&mut group, id, &mut processor, &decoded);
    }
    // The same processors on encoded input, as a pipeline hands them a received request:
    // classify and aggregate work on the bytes without decoding them.
    let encoded: Vec<Payload> = node
        .iter()
        .map(|r| Payload::Encoded {
            bytes: prost::Message::encode_to_vec(r).into(),
            data_points: phoenix_agent::otlp::data_points(r),
        })
        .collect();
    for (id, yaml) in CASES.iter().take(2) {
        let mut processor = build_processor(id, yaml).expect("valid config");
        bench_batches(
            &mut group,
            &format!("{id}/encoded"),
            &mut processor,
            &encoded,
        );
    }
    // deltatocumulative needs delta input: the workload through cumulativetodelta.
    let mut to_delta = build_processor("cumulativetodelta", "{}").expect("valid config");
    let mut deltas = Vec::new();
    for request in &node {
        let mut out = Vec::new();
        to_delta
            .process(Payload::Decoded(request.clone()), &mut out)
            .expect("processes");
        for payload in out {
            deltas.push(payload.into_request().expect("decodes"));
        }
    }
    let deltas: Vec<Payload> = deltas.into_iter().map(Payload::Decoded).collect();
    let mut to_cumulative = build_processor("deltatocumulative", "{}").expect("valid config");
    bench_batches(&mut group, "deltatocumulative", &mut to_cumulative, &deltas);
    group.finish();

    // Memory per input series: one pass over a 20-host fleet (54,000 input series).
    let fleet = rounds(20, 3);
    let series = phoenix_agent::otlp::data_points(&fleet[0]);
    let report = |id: &str, bytes: i64| {
        println!(
            "state {id}: {:.0} bytes per input series ({series} series, {:.1} MiB held)",
            bytes as f64 / series as f64,
            bytes as f64 / 1048576.0
        );
    };
    for (id, yaml) in CASES {
        let (processor, bytes) = retained(|| {
            let mut processor = build_processor(id, yaml).expect("valid config");
            let mut out = Vec::new();
            for request in &fleet {
                let input = Payload::Decoded(request.clone());
                processor.process(input, &mut out).expect("processes");
                out.clear();
            }
            processor
        });
        report(id, bytes);
        drop(processor);
    }
    // deltatocumulative keeps state for delta series: the fleet through cumulativetodelta
    // first, outside the measurement.
    let mut to_delta = build_processor("cumulativetodelta", "{}").expect("valid config");
    let mut fleet_deltas = Vec::new();
    for request in rounds(20, 4) {
        to_delta
            .process(Payload::Decoded(request), &mut fleet_deltas)
            .expect("processes");
    }
    let (processor, bytes) = retained(|| {
        let mut processor = build_processor("deltatocumulative", "{}").expect("valid config");
        let mut out = Vec::new();
        for payload in &fleet_deltas {
            processor
                .process(payload.clone(), &mut out)
                .expect("processes");
            out.clear();
        }
        processor
    });
    report("deltatocumulative", bytes);
    drop(processor);
}

criterion_group!(benches, reduction);
criterion_main!(benches);
