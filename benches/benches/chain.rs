//! The whole per-batch cost of the default agent config: one shared batch through the
//! baseline (`[batch]`) and the candidate (`[filter, attributes, batch]`), each metered on its
//! output as the pipeline runner does. Queues and exporters are left out.

// The inputs are built by the bench itself; a failure is a bug worth a panic.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use phoenix_agent::otlp::Batch;
use phoenix_bench::{configs, encode, process_request, Pipeline};

const CANDIDATE: &[(&str, &str)] = &[
    ("filter/no-kernel-threads", configs::FILTER),
    ("attributes/strip", configs::ATTRIBUTES),
    ("batch", configs::BATCH),
];

fn chain(c: &mut Criterion) {
    let request = process_request(1, 1000);
    let encoded = encode(&request);
    let fresh = || {
        Arc::new(Batch::from_validated(
            encoded.bytes.clone(),
            encoded.data_points,
        ))
    };

    let mut group = c.benchmark_group("chain");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(encoded.data_points));

    let mut passthrough = Pipeline::new("passthrough", &[]).expect("valid");
    group.bench_function("passthrough", |b| {
        b.iter(|| passthrough.process(fresh()).expect("processes"))
    });
    let mut baseline = Pipeline::new("baseline", &[("batch", configs::BATCH)]).expect("valid");
    group.bench_function("baseline", |b| {
        b.iter(|| baseline.process(fresh()).expect("processes"))
    });
    let mut candidate = Pipeline::new("candidate", CANDIDATE).expect("valid");
    group.bench_function("candidate", |b| {
        b.iter(|| candidate.process(fresh()).expect("processes"))
    });
    // The candidate of the end-to-end bench (benches/e2e/candidate.yaml): no batch processor,
    // so the attributes processor is last and meters what it writes; and the same with the
    // meter walking the output instead.
    let e2e = &CANDIDATE[..2];
    let mut candidate = Pipeline::new("candidate", e2e).expect("valid");
    group.bench_function("e2e_candidate", |b| {
        b.iter(|| candidate.process(fresh()).expect("processes"))
    });
    let mut candidate = Pipeline::new("candidate", e2e)
        .expect("valid")
        .meter_by_walking();
    group.bench_function("e2e_candidate_meter_walks", |b| {
        b.iter(|| candidate.process(fresh()).expect("processes"))
    });
    // Both pipelines of the end-to-end bench on one shared batch: the second meter reads the
    // point hashes the first left (`stats::PointHashes`).
    let mut passthrough = Pipeline::new("passthrough", &[]).expect("valid");
    let mut candidate = Pipeline::new("candidate", e2e).expect("valid");
    group.bench_function("e2e_passthrough+candidate", |b| {
        b.iter(|| {
            let batch = fresh();
            passthrough.process(batch.clone()).expect("processes");
            candidate.process(batch).expect("processes");
        })
    });
    let mut baseline = Pipeline::new("baseline", &[("batch", configs::BATCH)]).expect("valid");
    let mut candidate = Pipeline::new("candidate", CANDIDATE).expect("valid");
    group.bench_function("baseline+candidate", |b| {
        b.iter(|| {
            let batch = fresh();
            baseline.process(batch.clone()).expect("processes");
            candidate.process(batch).expect("processes");
        })
    });
    group.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
