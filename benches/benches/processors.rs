//! Each processor of the default agent config alone, on the same realistic request: as it
//! arrives from the receiver (a shared, encoded batch: the usual case) and as a decoded
//! request left by an earlier struct processor (for `filter` and `attributes`, which rewrite
//! bytes, that includes one encode).

// The inputs are built by the bench itself; a failure is a bug worth a panic.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use phoenix_agent::otlp::{Batch, Payload};
use phoenix_agent::processor::Processor;
use phoenix_bench::{build_processor, configs, encode, process_request};

fn processors(c: &mut Criterion) {
    let request = process_request(1, 1000);
    let encoded = encode(&request);

    let mut group = c.benchmark_group("processors");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(encoded.data_points));

    let cases = [
        ("filter", "filter/no-kernel-threads", configs::FILTER),
        ("attributes", "attributes/strip", configs::ATTRIBUTES),
        ("batch", "batch", configs::BATCH),
    ];
    for (name, id, yaml) in cases {
        let mut processor: Box<dyn Processor> = build_processor(id, yaml).expect("valid config");
        let mut out = Vec::new();
        group.bench_function(format!("{name}/shared"), |b| {
            b.iter(|| {
                let batch = Batch::from_validated(encoded.bytes.clone(), encoded.data_points);
                processor
                    .process(Payload::Shared(Arc::new(batch)), &mut out)
                    .expect("processes");
                out.clear();
            })
        });
        group.bench_function(format!("{name}/decoded"), |b| {
            b.iter_batched(
                || Payload::Decoded(request.clone()),
                |payload| {
                    processor.process(payload, &mut out).expect("processes");
                    std::mem::take(&mut out)
                },
                BatchSize::SmallInput,
            )
        });
        processor.flush(&mut out);
    }
    group.finish();
}

criterion_group!(benches, processors);
criterion_main!(benches);
