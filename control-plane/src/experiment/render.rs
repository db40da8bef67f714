//! The human view of an experiment (a JSON `ExperimentView`), shared by `phoenixctl
//! experiment show|watch` and `phoenix demo`: progress, baseline vs candidate for the last
//! window and the whole run, and the verdict with each criterion.

use serde_json::Value;

use crate::ctl::table;

fn f64_at(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, key| v.get(key))?.as_f64()
}

fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// 1234567 -> "1,234,567".
pub fn grouped(value: f64) -> String {
    let rounded = value.round();
    let digits = format!("{:.0}", rounded.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

fn change(baseline: f64, candidate: f64) -> String {
    if baseline > 0.0 {
        let percent = ((candidate / baseline - 1.0) * 1000.0).round() / 10.0 + 0.0;
        format!("{percent:+.1}%")
    } else {
        "-".into()
    }
}

fn pct(fraction: f64) -> String {
    // `+ 0.0` turns a negative zero (a rounding remainder) into "0.0%", not "-0.0%".
    format!("{:.1}%", (fraction * 1000.0).round() / 10.0 + 0.0)
}

/// Rows of baseline vs candidate for one KPI pair (a window, or the totals).
fn kpi_rows(baseline: &Value, candidate: &Value, conserved: &[String]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = |name: &str, key: &str, format: &dyn Fn(f64) -> String| {
        let (b, c) = (
            f64_at(baseline, &[key]).unwrap_or(0.0),
            f64_at(candidate, &[key]).unwrap_or(0.0),
        );
        rows.push(vec![name.to_string(), format(b), format(c), change(b, c)]);
    };
    row("series", "series", &grouped);
    row("datapoints/s", "datapoints_per_second", &grouped);
    row("bytes/s", "bytes_per_second", &grouped);
    row("cost/month", "cost_per_month", &|v| format!("{v:.2}"));
    row("critical series", "critical_series", &grouped);
    for metric in conserved {
        let (b, c) = (
            f64_at(baseline, &["conserved", metric]).unwrap_or(0.0),
            f64_at(candidate, &["conserved", metric]).unwrap_or(0.0),
        );
        rows.push(vec![
            format!("{metric} (increase)"),
            format!("{b:.3}"),
            format!("{c:.3}"),
            change(b, c),
        ]);
    }
    rows
}

pub fn render(view: &Value) -> String {
    let mut out = String::new();
    let progress = &view["progress"];
    let state = str_at(view, "state");
    let definition = &view["definition"];
    let duration_ms = progress
        .get("measure_until")
        .and_then(Value::as_f64)
        .zip(progress.get("measure_from").and_then(Value::as_f64))
        .map(|(until, from)| until - from);
    let windows = view["windows"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!(
        "experiment {} {:?}: {}",
        view["id"],
        str_at(view, "name"),
        state
    ));
    if let Some(duration) = duration_ms {
        let window = windows.last().map(|w| {
            f64_at(w, &["end"]).unwrap_or(0.0) - progress["measure_from"].as_f64().unwrap_or(0.0)
        });
        out.push_str(&format!(
            " ({} window(s), {:.0}s of {:.0}s measured)",
            windows.len(),
            window.unwrap_or(0.0).clamp(0.0, duration) / 1000.0,
            duration / 1000.0
        ));
    }
    out.push('\n');
    let targets: Vec<&str> = progress["targets"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "targets: {}   baseline pipeline: {}   candidate pipeline: {}\n",
        if targets.is_empty() {
            "-".to_string()
        } else {
            targets.join(", ")
        },
        definition["baseline"]["pipeline"]
            .as_str()
            .unwrap_or("baseline"),
        str_at(view, "candidate_pipeline"),
    ));
    if let Some(last) = view["events"].as_array().and_then(|e| e.last()) {
        out.push_str(&format!(
            "last change: {} -> {}: {}\n",
            str_at(last, "from"),
            str_at(last, "to"),
            str_at(last, "reason")
        ));
    }
    let conserved: Vec<String> = definition["criteria"]["conserve"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["metric"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let header = ["", "baseline", "candidate", "change"];
    if let Some(last) = windows.last() {
        out.push_str(&format!(
            "\nlast window ({:.0}s, {} agent(s)):\n",
            (f64_at(last, &["end"]).unwrap_or(0.0) - f64_at(last, &["start"]).unwrap_or(0.0))
                / 1000.0,
            last["nodes"]
        ));
        let mut rows = kpi_rows(&last["baseline"], &last["candidate"], &conserved);
        let without = f64_at(progress, &["without_candidate", "cpu_cores"]);
        let with = f64_at(last, &["cpu_cores"]).unwrap_or(0.0);
        rows.push(vec![
            "agent CPU (cores)".into(),
            without
                .map(|w| format!("{w:.4} without"))
                .unwrap_or_else(|| "-".into()),
            format!("{with:.4} with"),
            without
                .map(|w| change(w, with))
                .unwrap_or_else(|| "-".into()),
        ]);
        let rss_without = f64_at(progress, &["without_candidate", "rss_bytes"]);
        let rss_with = f64_at(last, &["rss_bytes"]).unwrap_or(0.0);
        let mib = |b: f64| format!("{:.1} MiB", b / (1024.0 * 1024.0));
        rows.push(vec![
            "agent RSS".into(),
            rss_without
                .map(|w| format!("{} without", mib(w)))
                .unwrap_or_else(|| "-".into()),
            format!("{} with", mib(rss_with)),
            rss_without
                .map(|w| change(w, rss_with))
                .unwrap_or_else(|| "-".into()),
        ]);
        out.push_str(&table(&header, &rows));
    } else if state == "pending" {
        out.push_str("\nmeasuring the agents without the candidate...\n");
    } else if matches!(state, "deploying" | "running") {
        out.push_str("\nwaiting for the first window (warm-up)...\n");
    }
    if let Some(verdict) = progress.get("verdict").filter(|v| !v.is_null()) {
        let totals = &verdict["totals"];
        out.push_str(&format!(
            "\nwhole run ({:.0}s; counters summed, series and rates averaged over windows):\n",
            f64_at(totals, &["seconds"]).unwrap_or(0.0)
        ));
        out.push_str(&table(
            &header,
            &kpi_rows(&totals["baseline"], &totals["candidate"], &conserved),
        ));
        let passed = verdict["passed"].as_bool().unwrap_or(false);
        out.push_str(&format!(
            "\nverdict: {}\n",
            if passed { "PASSED" } else { "FAILED" }
        ));
        let rows: Vec<Vec<String>> = verdict["criteria"]
            .as_array()
            .map(|criteria| {
                criteria
                    .iter()
                    .map(|c| {
                        let measured = c["measured"].as_f64().unwrap_or(0.0);
                        let per_window = match (
                            f64_at(c, &["per_window", "mean"]),
                            f64_at(c, &["per_window", "ci95_low"]),
                            f64_at(c, &["per_window", "ci95_high"]),
                        ) {
                            (Some(m), Some(l), Some(h)) => {
                                format!("{} [{}, {}]", pct(m), pct(l), pct(h))
                            }
                            _ => "-".into(),
                        };
                        vec![
                            str_at(c, "criterion").to_string(),
                            str_at(c, "threshold").to_string(),
                            pct(measured),
                            per_window,
                            if c["passed"].as_bool().unwrap_or(false) {
                                "pass"
                            } else {
                                "FAIL"
                            }
                            .to_string(),
                            str_at(c, "note").to_string(),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&table(
            &[
                "criterion",
                "threshold",
                "measured",
                "per window: mean [95% CI]",
                "result",
                "note",
            ],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_and_changes_signed() {
        assert_eq!(grouped(1_234_567.4), "1,234,567");
        assert_eq!(grouped(-1000.0), "-1,000");
        assert_eq!(grouped(12.0), "12");
        assert_eq!(change(200.0, 50.0), "-75.0%");
        assert_eq!(change(0.0, 50.0), "-");
        assert_eq!(pct(-0.000_01), "0.0%");
        assert_eq!(change(100.0, 99.999), "+0.0%");
        assert_eq!(pct(0.9549), "95.5%");
    }

    #[test]
    fn a_finished_experiment_shows_windows_and_every_criterion() {
        let view = serde_json::json!({
            "id": 3, "name": "balanced", "state": "succeeded", "candidate_pipeline": "experiment_3",
            "definition": { "baseline": { "pipeline": "baseline" }, "criteria": { "conserve": [{ "metric": "process.cpu.time" }] } },
            "events": [{ "from": "analyzing", "to": "succeeded", "reason": "all 1 criteria passed" }],
            "progress": {
                "targets": ["node-a"], "measure_from": 0, "measure_until": 20000,
                "without_candidate": { "cpu_cores": 0.01, "rss_bytes": 1 },
                "verdict": { "passed": true, "totals": { "seconds": 20, "baseline": { "series": 1000 }, "candidate": { "series": 50 } },
                    "criteria": [{ "criterion": "min_series_reduction", "threshold": ">= 50.0%", "measured": 0.95, "passed": true,
                        "per_window": { "mean": 0.95, "ci95_low": 0.94, "ci95_high": 0.96, "windows": 2 } }] }
            },
            "windows": [{ "start": 10000, "end": 20000, "nodes": 1, "cpu_cores": 0.012,
                "baseline": { "series": 1000, "datapoints_per_second": 100.0, "conserved": { "process.cpu.time": 2.0 } },
                "candidate": { "series": 50, "datapoints_per_second": 5.0, "conserved": { "process.cpu.time": 2.0 } } }]
        });
        let text = render(&view);
        assert!(
            text.contains(
                "experiment 3 \"balanced\": succeeded (1 window(s), 20s of 20s measured)"
            ),
            "{text}"
        );
        assert!(text.contains("series  "), "{text}");
        assert!(text.contains("-95.0%"), "{text}");
        assert!(text.contains("process.cpu.time (increase)"), "{text}");
        assert!(text.contains("verdict: PASSED"), "{text}");
        assert!(text.contains("95.0% [94.0%, 96.0%]"), "{text}");
        assert!(text.contains("+20.0%"), "{text}");
    }
}
