"""Sends known metrics to a Phoenix agent with the real OpenTelemetry Python SDK.

Usage: send_metrics.py grpc|http HOST:PORT [gzip]

Records, under a Resource with service.name=phoenix-e2e-<transport>:
  - Counter phoenix.test.requests: 42 with route=/a, 8 with route=/b
  - UpDownCounter phoenix.test.inflight: +10 then -3 (= 7), queue=q1
  - Histogram phoenix.test.latency (ms): 5, 15, 250 (count 3, sum 270)
  - observable Gauge phoenix.test.temperature: 21.5 with sensor=s1

then force-flushes and shuts down. Exits 0 only if every export the SDK attempted succeeded;
prints `exports=<n> datapoints=<n>` on stdout and any error on stderr.
"""

import logging
import sys

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource


def make_exporter(transport, address, gzip):
    if transport == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter,
        )

        compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
        return OTLPMetricExporter(
            endpoint=f"http://{address}", insecure=True, timeout=10, compression=compression
        )
    if transport == "http":
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )

        compression = Compression.Gzip if gzip else Compression.NoCompression
        return OTLPMetricExporter(
            endpoint=f"http://{address}/v1/metrics", timeout=10, compression=compression
        )
    raise SystemExit(f"unknown transport {transport!r}: use grpc or http")


def count_points(metrics_data):
    return sum(
        len(metric.data.data_points)
        for rm in metrics_data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )


def main():
    if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["gzip"]):
        print(__doc__, file=sys.stderr)
        return 2
    transport, address, gzip = sys.argv[1], sys.argv[2], sys.argv[3:] == ["gzip"]
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    exporter = make_exporter(transport, address, gzip)
    # The periodic reader ignores the exporter's result: record it here.
    results = []
    points = [0]
    real_export = exporter.export

    def export(metrics_data, *args, **kwargs):
        try:
            result = real_export(metrics_data, *args, **kwargs)
        except Exception as error:  # pylint: disable=broad-exception-caught
            print(f"export raised: {error!r}", file=sys.stderr)
            result = MetricExportResult.FAILURE
        results.append(result)
        if result is MetricExportResult.SUCCESS:
            points[0] += count_points(metrics_data)
        else:
            print(f"export failed: {result}", file=sys.stderr)
        return result

    exporter.export = export

    # A long interval: only force_flush and shutdown export.
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        resource=Resource.create({"service.name": f"phoenix-e2e-{transport}"}),
        metric_readers=[reader],
    )
    meter = provider.get_meter("phoenix-e2e")

    requests = meter.create_counter("phoenix.test.requests", unit="1")
    requests.add(42, {"route": "/a"})
    requests.add(8, {"route": "/b"})

    inflight = meter.create_up_down_counter("phoenix.test.inflight", unit="1")
    inflight.add(10, {"queue": "q1"})
    inflight.add(-3, {"queue": "q1"})

    latency = meter.create_histogram("phoenix.test.latency", unit="ms")
    for value in (5, 15, 250):
        latency.record(value, {"route": "/a"})

    def temperature(_options: CallbackOptions):
        yield Observation(21.5, {"sensor": "s1"})

    meter.create_observable_gauge("phoenix.test.temperature", callbacks=[temperature])

    ok = True
    try:
        if not provider.force_flush(timeout_millis=15_000):
            print("force_flush returned False", file=sys.stderr)
            ok = False
    except Exception as error:  # pylint: disable=broad-exception-caught
        print(f"force_flush failed: {error!r}", file=sys.stderr)
        ok = False
    if not results:
        print("force_flush exported nothing", file=sys.stderr)
        ok = False
    provider.shutdown(timeout_millis=15_000)

    ok = ok and all(r is MetricExportResult.SUCCESS for r in results)
    print(f"exports={len(results)} datapoints={points[0]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
