//! Self-telemetry: every metric the agent exposes is declared here once, with its help text
//! and labels; components take handles at build time and add per batch.
//!
//! `docs/telemetry.md` is generated from [`METRICS`] and a test fails when it is stale.

pub mod server;

use metrics::Unit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One declared self-metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! metric_defs {
    ($($const:ident = $name:literal, $kind:ident, $unit:ident, [$($label:literal),*], $help:literal;)*) => {
        $(pub const $const: &str = $name;)*
        /// All self-metrics, in the order of the reference docs.
        pub const METRICS: &[MetricDef] = &[
            $(MetricDef { name: $name, kind: Kind::$kind, unit: Unit::$unit, labels: &[$($label),*], help: $help },)*
        ];
    };
}

metric_defs! {
    RECEIVER_ACCEPTED = "phoenix_receiver_accepted_datapoints_total", Counter, Count, ["receiver", "transport"],
        "Data points accepted by a receiver and handed to its pipelines (transport: grpc, http, or scrape for hostmetrics).";
    RECEIVER_REFUSED = "phoenix_receiver_refused_datapoints_total", Counter, Count, ["receiver", "transport", "reason"],
        "Data points refused by a receiver (reason: malformed, pipelines_full, invalid). Requests refused before their points can be counted (too large, wrong content type) count only in phoenix_receiver_requests_total{outcome=\"refused\"}.";
    RECEIVER_REQUESTS = "phoenix_receiver_requests_total", Counter, Count, ["receiver", "transport", "outcome"],
        "Export requests handled by a receiver, by outcome (accepted, refused).";
    RECEIVER_SCRAPE_ERRORS = "phoenix_receiver_scrape_errors_total", Counter, Count, ["receiver", "scraper", "reason"],
        "What a hostmetrics scrape skipped: reason=vanished (a process exited while being read; skipped), name (its stat unreadable; skipped), exe, io, user, status, fd (one attribute or metric left out, usually for lack of CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH), read (a host-wide file unreadable). Counted even when a mute_process_*_error option silences the log.";
    RECEIVER_SCRAPE_DURATION = "phoenix_receiver_scrape_duration_seconds", Gauge, Seconds, ["receiver"],
        "Wall time of a hostmetrics receiver's last scrape (reading /proc and building the request).";
    RECEIVER_SCRAPE_OPEN_FILES = "phoenix_receiver_scrape_open_files", Gauge, Count, ["receiver"],
        "/proc files a hostmetrics receiver keeps open between scrapes (re-read in place instead of reopened), at most scrapers.process.max_open_files.";
    RECEIVER_SCRAPE_UNCACHED = "phoenix_receiver_scrape_uncached_processes_total", Counter, Count, ["receiver"],
        "Processes a hostmetrics scrape read by opening and closing their files because keeping them open would exceed scrapers.process.max_open_files.";
    RECEIVER_SCRAPE_IDLE = "phoenix_receiver_scrape_idle_processes_total", Counter, Count, ["receiver"],
        "Processes a hostmetrics scrape wrote from their last full read because their CPU clock showed they had not run since (only their memory re-read); processes filtered out by include/exclude are not counted.";
    PIPELINE_INCOMING = "phoenix_pipeline_incoming_datapoints_total", Counter, Count, ["pipeline"],
        "Data points that entered a pipeline's queue.";
    PIPELINE_DROPPED = "phoenix_pipeline_dropped_datapoints_total", Counter, Count, ["pipeline", "reason"],
        "Data points a shadow pipeline dropped because its queue was full, or a processor could not handle.";
    PIPELINE_OUTPUT_DATAPOINTS = "phoenix_pipeline_output_datapoints_total", Counter, Count, ["pipeline"],
        "Data points leaving a pipeline's last processor, towards its exporters.";
    PIPELINE_OUTPUT_BYTES = "phoenix_pipeline_output_bytes_total", Counter, Bytes, ["pipeline"],
        "Bytes of OTLP protobuf leaving a pipeline (uncompressed encoded ExportMetricsServiceRequest).";
    PIPELINE_OUTPUT_SERIES = "phoenix_pipeline_output_series", Gauge, Count, ["pipeline", "window"],
        "Distinct series leaving a pipeline: window=\"10s\" is the last complete 10 s window, window=\"total\" counts since start.";
    PIPELINE_OUTPUT_SERIES_ESTIMATED = "phoenix_pipeline_output_series_estimated", Gauge, Count, ["pipeline", "window"],
        "1 when phoenix_pipeline_output_series of the same labels is a HyperLogLog estimate (more series than the exact bound), 0 when exact.";
    PIPELINE_OUTPUT_CRITICAL_SERIES = "phoenix_pipeline_output_critical_series", Gauge, Count, ["pipeline", "window"],
        "Distinct critical series (matching meter.critical) leaving a pipeline: window=\"10s\" is the last complete 10 s window, window=\"total\" counts since start (or since meter.critical last changed). Only with a meter config.";
    PIPELINE_OUTPUT_CONSERVED = "phoenix_pipeline_output_conserved_total", Gauge, Count, ["pipeline", "metric"],
        "Total increase of a counter listed in meter.conserve leaving a pipeline (monotonic sums only: delta points added, cumulative series by their increase). A gauge because it is fractional; it only goes up while the name stays listed. Only with a meter config.";
    PIPELINE_OUTPUT_WINDOW_DATAPOINTS = "phoenix_pipeline_output_window_datapoints", Gauge, Count, ["pipeline"],
        "Data points a pipeline emitted in the last complete 10 s window.";
    PIPELINE_OUTPUT_WINDOW_BYTES = "phoenix_pipeline_output_window_bytes", Gauge, Bytes, ["pipeline"],
        "Bytes a pipeline emitted in the last complete 10 s window.";
    PROCESSOR_INCOMING = "phoenix_processor_incoming_datapoints_total", Counter, Count, ["pipeline", "processor"],
        "Data points handed to a processor.";
    PROCESSOR_OUTGOING = "phoenix_processor_outgoing_datapoints_total", Counter, Count, ["pipeline", "processor"],
        "Data points a processor emitted.";
    PROCESSOR_STATE_SERIES = "phoenix_processor_state_series", Gauge, Count, ["pipeline", "processor"],
        "Series a stateful processor (aggregate, topk, cardinality_limit, cumulativetodelta, deltatocumulative) tracks right now.";
    PROCESSOR_STATE_EVICTIONS = "phoenix_processor_state_evictions_total", Counter, Count, ["pipeline", "processor", "reason"],
        "Series a stateful processor forgot (reason: stale, unseen for its staleness bound; limit, pushed out by its memory bound).";
    PROCESSOR_UNMERGED = "phoenix_processor_unmerged_datapoints_total", Counter, Count, ["pipeline", "processor", "reason"],
        "Data points a merging processor passed through as they were instead of merging them (reason: bucket_mismatch, summary, ...).";
    PROCESSOR_DROPPED = "phoenix_processor_dropped_datapoints_total", Counter, Count, ["pipeline", "processor", "reason"],
        "Data points a processor dropped as configured or because its state was full (reason: others, summary, state_full, ...).";
    PROCESSOR_OVERFLOW = "phoenix_processor_overflow_datapoints_total", Counter, Count, ["pipeline", "processor"],
        "Data points cardinality_limit merged into the otel.metric.overflow=true series of their metric.";
    EXPORTER_SENT = "phoenix_exporter_sent_datapoints_total", Counter, Count, ["exporter"],
        "Data points an exporter delivered.";
    EXPORTER_SEND_FAILED = "phoenix_exporter_send_failed_datapoints_total", Counter, Count, ["exporter", "reason"],
        "Data points an exporter gave up on (reason: permanent, retries_exhausted).";
    EXPORTER_ENQUEUE_FAILED = "phoenix_exporter_enqueue_failed_datapoints_total", Counter, Count, ["exporter"],
        "Data points dropped because an exporter's sending queue was full (shadow pipelines only; others wait).";
    EXPORTER_RETRIES = "phoenix_exporter_retries_total", Counter, Count, ["exporter"],
        "Export attempts retried after a retryable failure.";
    QUEUE_SIZE = "phoenix_queue_size", Gauge, Count, ["queue"],
        "Batches waiting in a bounded queue (queue=\"pipeline/<name>\" or \"exporter/<id>\").";
    QUEUE_CAPACITY = "phoenix_queue_capacity", Gauge, Count, ["queue"],
        "Capacity of a bounded queue, in batches.";
    CONFIG_RELOADS = "phoenix_config_reloads_total", Counter, Count, ["result"],
        "Configuration reloads by result (success, failure).";
    CONFIG_INFO = "phoenix_config_info", Gauge, Count, ["hash"],
        "1 for the hash of the configuration that is running.";
    CONTROL_PLANE_CONNECTED = "phoenix_control_plane_connected", Gauge, Count, [],
        "1 while the agent's stream to the control plane is open, 0 otherwise.";
    CONFIG_OFFERS = "phoenix_config_offers_total", Counter, Count, ["result"],
        "Config offers received from the control plane, by result (applied, failed).";
    BUILD_INFO = "phoenix_build_info", Gauge, Count, ["version"],
        "1, labelled with the agent's version.";
}

/// Registers help texts and units with the installed recorder.
pub fn describe_all() {
    for def in METRICS {
        match def.kind {
            Kind::Counter => metrics::describe_counter!(def.name, def.unit, def.help),
            Kind::Gauge => metrics::describe_gauge!(def.name, def.unit, def.help),
        }
    }
}

/// The reference table for `docs/telemetry.md`.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# Self-telemetry reference\n\nGenerated from `agent/src/telemetry/mod.rs` (a test fails when this file is stale).\nServed as Prometheus text at `telemetry.listen` + `/metrics`.\n\n| metric | type | labels | description |\n|---|---|---|---|\n",
    );
    for def in METRICS {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            def.name,
            match def.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            },
            def.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", "),
            def.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        for def in METRICS {
            assert!(def.name.starts_with("phoenix_"), "{}", def.name);
            // A fractional running total can only be a gauge: counters count integers.
            if def.name == PIPELINE_OUTPUT_CONSERVED {
                assert_eq!(def.kind, Kind::Gauge);
                continue;
            }
            assert_eq!(
                def.kind == Kind::Counter,
                def.name.ends_with("_total"),
                "{}",
                def.name
            );
        }
    }

    #[test]
    fn docs_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/telemetry.md");
        let expected = reference_markdown();
        if std::env::var_os("PHOENIX_BLESS").is_some() {
            std::fs::write(path, &expected).unwrap();
        }
        let actual = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            actual == expected,
            "docs/telemetry.md is stale: run `PHOENIX_BLESS=1 cargo test -p phoenix-agent docs_reference_is_current`"
        );
    }
}
