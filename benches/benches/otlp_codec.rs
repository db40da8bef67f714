//! The floor: what decoding and encoding a realistic request costs with prost, against the
//! lean wire walk the agent uses to validate, count and meter without decoding.

// The inputs are built by the bench itself; a failure is a bug worth a panic.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use phoenix_agent::otlp::{wire, ExportMetricsServiceRequest};
use phoenix_agent::stats::meter::{MeterConfig, RawMeterConfig};
use phoenix_agent::stats::{self, VolumeMeter};
use phoenix_bench::{encode, process_request};
use prost::Message;

fn otlp_codec(c: &mut Criterion) {
    let request = process_request(1, 1000);
    let encoded = encode(&request);
    let bytes = encoded.bytes.clone();

    let mut group = c.benchmark_group("otlp_codec");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(encoded.data_points));

    group.bench_function("prost_decode", |b| {
        b.iter(|| ExportMetricsServiceRequest::decode(black_box(bytes.clone())).expect("decodes"))
    });
    group.bench_function("prost_encode", |b| {
        b.iter(|| black_box(&request).encode_to_vec())
    });
    group.bench_function("prost_decode_encode", |b| {
        b.iter(|| {
            ExportMetricsServiceRequest::decode(black_box(bytes.clone()))
                .expect("decodes")
                .encode_to_vec()
        })
    });
    group.bench_function("prost_clone_decoded", |b| {
        b.iter(|| black_box(&request).clone())
    });
    group.bench_function("wire_count", |b| {
        b.iter(|| wire::count(black_box(&bytes)).expect("valid"))
    });
    let state = stats::series_hash_state();
    group.bench_function("for_each_series", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            stats::for_each_series(&state, black_box(&bytes), |s| acc ^= s).expect("valid");
            acc
        })
    });
    // The same series come back every scrape: a warm meter only looks them up.
    let mut warm = VolumeMeter::new("warm");
    group.bench_function("volume_meter_observe", |b| {
        b.iter(|| warm.observe(black_box(&bytes), encoded.data_points))
    });
    // The same, with a `meter` config: a critical selector and two conserved counters.
    let mut metered = VolumeMeter::new("metered");
    metered.set_config(Some(meter_config()));
    group.bench_function("volume_meter_observe_with_meter", |b| {
        b.iter(|| metered.observe(black_box(&bytes), encoded.data_points))
    });
    // A meter seeing every series for the first time inserts them all.
    group.bench_function("volume_meter_observe_cold", |b| {
        b.iter_batched_ref(
            || VolumeMeter::new("cold"),
            |meter| meter.observe(black_box(&bytes), encoded.data_points),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn meter_config() -> std::sync::Arc<MeterConfig> {
    let raw: RawMeterConfig = serde_yaml::from_str(
        "critical: { metric_names: [\"process.cpu.*\", \"regex:^process\\\\.memory\"], resource_attributes: { process.owner: [root, \"app*\"] }, attributes: { state: [user, system] } }\nconserve: [process.cpu.time, process.disk.io]",
    )
    .expect("meter config");
    let mut issues = Vec::new();
    let config = MeterConfig::compile(raw, "meter", &mut issues).expect("compiles");
    std::sync::Arc::new(config)
}

criterion_group!(benches, otlp_codec);
criterion_main!(benches);
