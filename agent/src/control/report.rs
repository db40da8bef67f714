//! Volume reports for the control plane, read from the agent's own self-metrics (the same
//! numbers `/metrics` serves) plus the process's CPU time and resident memory from `/proc`.

use std::collections::BTreeMap;

use phoenix_proto::v1::{PipelineVolume, VolumeReport};

use crate::telemetry;

/// Builds a report from Prometheus text as rendered by the agent's recorder.
pub fn from_prometheus_text(text: &str) -> VolumeReport {
    let mut pipelines: BTreeMap<String, PipelineVolume> = BTreeMap::new();
    let mut refused = 0u64;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(raw) = value.trim().parse::<f64>() else {
            continue;
        };
        let value = if raw.is_finite() && raw > 0.0 {
            raw as u64
        } else {
            0
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if name == telemetry::RECEIVER_REFUSED {
            refused += value;
            continue;
        }
        let Some(pipeline) = label(labels, "pipeline") else {
            continue;
        };
        let entry = || PipelineVolume {
            pipeline: pipeline.to_string(),
            ..Default::default()
        };
        let window = label(labels, "window");
        if name == telemetry::PIPELINE_OUTPUT_CONSERVED {
            let (Some(metric), true) = (label(labels, "metric"), raw.is_finite()) else {
                continue;
            };
            *pipelines
                .entry(pipeline.to_string())
                .or_insert_with(entry)
                .conserved
                .entry(metric.to_string())
                .or_default() += raw;
            continue;
        }
        let target = match name {
            telemetry::PIPELINE_OUTPUT_DATAPOINTS => {
                &mut pipelines
                    .entry(pipeline.to_string())
                    .or_insert_with(entry)
                    .datapoints
            }
            telemetry::PIPELINE_OUTPUT_BYTES => {
                &mut pipelines
                    .entry(pipeline.to_string())
                    .or_insert_with(entry)
                    .bytes
            }
            telemetry::PIPELINE_OUTPUT_SERIES if window == Some("total") => {
                &mut pipelines
                    .entry(pipeline.to_string())
                    .or_insert_with(entry)
                    .series_total
            }
            telemetry::PIPELINE_OUTPUT_SERIES => {
                &mut pipelines
                    .entry(pipeline.to_string())
                    .or_insert_with(entry)
                    .series_window
            }
            telemetry::PIPELINE_OUTPUT_CRITICAL_SERIES if window == Some("total") => {
                &mut pipelines
                    .entry(pipeline.to_string())
                    .or_insert_with(entry)
                    .critical_series_total
            }
            telemetry::PIPELINE_OUTPUT_CRITICAL_SERIES => {
                &mut pipelines
                    .entry(pipeline.to_string())
                    .or_insert_with(entry)
                    .critical_series_window
            }
            telemetry::PIPELINE_DROPPED | telemetry::PROCESSOR_DROPPED => {
                &mut pipelines
                    .entry(pipeline.to_string())
                    .or_insert_with(entry)
                    .dropped_datapoints
            }
            _ => continue,
        };
        *target += value;
    }
    let (cpu_seconds, rss_bytes) = process_usage();
    VolumeReport {
        pipelines: pipelines.into_values().collect(),
        refused_datapoints: refused,
        cpu_seconds,
        rss_bytes,
        unix_millis: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default(),
    }
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = labels.get(start..)?;
    rest.find('"').and_then(|end| rest.get(..end))
}

/// CPU seconds (user + system) and resident bytes of this process; zeros where `/proc` is
/// not there.
pub fn process_usage() -> (f64, u64) {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / CLOCK_TICKS_PER_SECOND)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0);
    (cpu, rss)
}

/// `sysconf(_SC_CLK_TCK)` is 100 on every Linux architecture Phoenix builds for.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pipeline_volumes_from_prometheus_text() {
        let text = "# TYPE x counter\n\
phoenix_pipeline_output_datapoints_total{pipeline=\"baseline\"} 120\n\
phoenix_pipeline_output_bytes_total{pipeline=\"baseline\"} 4096\n\
phoenix_pipeline_output_series{pipeline=\"baseline\",window=\"10s\"} 7\n\
phoenix_pipeline_output_series{pipeline=\"baseline\",window=\"total\"} 9\n\
phoenix_pipeline_output_critical_series{pipeline=\"baseline\",window=\"10s\"} 2\n\
phoenix_pipeline_output_critical_series{pipeline=\"baseline\",window=\"total\"} 3\n\
# TYPE phoenix_pipeline_output_conserved_total gauge\n\
phoenix_pipeline_output_conserved_total{pipeline=\"baseline\",metric=\"process.cpu.time\"} 12.5\n\
phoenix_pipeline_output_conserved_total{pipeline=\"candidate\",metric=\"process.cpu.time\"} 12.25\n\
phoenix_pipeline_output_conserved_total{pipeline=\"candidate\",metric=\"http.server.requests\"} 0\n\
phoenix_pipeline_dropped_datapoints_total{pipeline=\"candidate\",reason=\"queue_full\"} 3\n\
phoenix_receiver_refused_datapoints_total{receiver=\"otlp\",transport=\"grpc\",reason=\"malformed\"} 5\n\
phoenix_config_info{hash=\"abc\"} 1\n";
        let report = from_prometheus_text(text);
        assert_eq!(report.refused_datapoints, 5);
        assert_eq!(report.pipelines.len(), 2);
        let baseline = &report.pipelines[0];
        assert_eq!(
            (
                baseline.datapoints,
                baseline.bytes,
                baseline.series_window,
                baseline.series_total
            ),
            (120, 4096, 7, 9)
        );
        assert_eq!(
            (
                baseline.critical_series_window,
                baseline.critical_series_total
            ),
            (2, 3)
        );
        assert_eq!(baseline.conserved.len(), 1);
        assert_eq!(baseline.conserved["process.cpu.time"], 12.5);
        let candidate = &report.pipelines[1];
        assert_eq!(candidate.dropped_datapoints, 3);
        assert_eq!(candidate.conserved["process.cpu.time"], 12.25);
        assert_eq!(candidate.conserved["http.server.requests"], 0.0);
        assert_eq!(candidate.critical_series_total, 0);
        assert!(report.rss_bytes > 0);
    }
}
