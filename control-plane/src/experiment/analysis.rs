//! From the agents' volume reports to per-window KPIs, and from windows to a verdict.
//!
//! Agents report counters since they started (data points, bytes, conserved counters' total
//! increases, CPU seconds) and gauges of the last 10 s meter window (distinct series,
//! critical series). A window here is the difference between each target's report at the
//! window's end and its report at the previous window's end, so window totals add up
//! exactly to the whole measured period; rates use the reports' own timestamps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::definition::{CostModel, Definition, Percent};
use crate::store::Millis;

const SECONDS_PER_MONTH: f64 = 30.0 * 24.0 * 3600.0;

/// One pipeline in an agent's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineSample {
    pub datapoints: u64,
    pub bytes: u64,
    pub series_window: u64,
    pub critical_series_window: u64,
    pub conserved: BTreeMap<String, f64>,
}

/// What a window needs of one agent's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeSample {
    pub at: Millis,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub pipelines: BTreeMap<String, PipelineSample>,
}

impl NodeSample {
    /// Reads the report JSON the control plane stores (`service::report_json`).
    pub fn from_report(report: &serde_json::Value) -> Option<Self> {
        #[derive(Deserialize)]
        struct Report {
            unix_millis: Millis,
            #[serde(default)]
            cpu_seconds: f64,
            #[serde(default)]
            rss_bytes: u64,
            #[serde(default)]
            pipelines: Vec<Named>,
        }
        #[derive(Deserialize)]
        struct Named {
            pipeline: String,
            #[serde(flatten)]
            sample: PipelineSample,
        }
        let report: Report = serde_json::from_value(report.clone()).ok()?;
        Some(Self {
            at: report.unix_millis,
            cpu_seconds: report.cpu_seconds,
            rss_bytes: report.rss_bytes,
            pipelines: report
                .pipelines
                .into_iter()
                .map(|p| (p.pipeline, p.sample))
                .collect(),
        })
    }
}

/// One pipeline's output over a window, summed over the targets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Kpi {
    pub series: u64,
    pub critical_series: u64,
    pub datapoints: u64,
    pub bytes: u64,
    pub datapoints_per_second: f64,
    pub bytes_per_second: f64,
    /// Estimated cost per month at this window's rate and series.
    pub cost_per_month: f64,
    /// Increase of each conserved counter.
    pub conserved: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub index: u32,
    pub start: Millis,
    pub end: Millis,
    /// Targets with a new report in this window.
    pub nodes: u32,
    pub baseline: Kpi,
    pub candidate: Kpi,
    /// Agent CPU (cores, summed over the targets) and resident memory (summed) with the
    /// candidate running.
    pub cpu_cores: f64,
    pub rss_bytes: u64,
    #[serde(default)]
    pub cpu_by_node: BTreeMap<String, f64>,
}

/// CPU and memory of the targets before the candidate was deployed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_cores: f64,
    pub rss_bytes: u64,
    /// CPU cores per node, so that windows compare the same nodes.
    #[serde(default)]
    pub cpu_by_node: BTreeMap<String, f64>,
}

/// The span between two reports of one node, when there is one: its seconds, and whether
/// the agent restarted in between (its CPU time went down), so every counter starts at zero.
fn span(start: &NodeSample, end: &NodeSample) -> Option<(f64, bool)> {
    let seconds = end.at.saturating_sub(start.at) as f64 / 1000.0;
    (seconds > 0.0).then_some((seconds, end.cpu_seconds < start.cpu_seconds))
}

/// Usage between two samples per node, summed over nodes.
pub fn usage(
    from: &BTreeMap<String, NodeSample>,
    to: &BTreeMap<String, NodeSample>,
) -> Option<Usage> {
    let mut usage = Usage::default();
    for (node, end) in to {
        let Some(start) = from.get(node) else {
            continue;
        };
        let Some((seconds, restarted)) = span(start, end) else {
            continue;
        };
        let before = if restarted { 0.0 } else { start.cpu_seconds };
        let cores = (end.cpu_seconds - before).max(0.0) / seconds;
        usage.cpu_cores += cores;
        usage.rss_bytes = usage.rss_bytes.saturating_add(end.rss_bytes);
        usage.cpu_by_node.insert(node.clone(), cores);
    }
    (!usage.cpu_by_node.is_empty()).then_some(usage)
}

fn add_pipeline(kpi: &mut Kpi, start: &PipelineSample, end: &PipelineSample, seconds: f64) {
    let points = end.datapoints.saturating_sub(start.datapoints);
    let bytes = end.bytes.saturating_sub(start.bytes);
    kpi.datapoints = kpi.datapoints.saturating_add(points);
    kpi.bytes = kpi.bytes.saturating_add(bytes);
    kpi.datapoints_per_second += points as f64 / seconds;
    kpi.bytes_per_second += bytes as f64 / seconds;
    kpi.series = kpi.series.saturating_add(end.series_window);
    kpi.critical_series = kpi
        .critical_series
        .saturating_add(end.critical_series_window);
    for (metric, total) in &end.conserved {
        let before = start.conserved.get(metric).copied().unwrap_or(0.0);
        // A total that went down was restarted (the meter's settings changed): count anew.
        let increase = if *total >= before {
            total - before
        } else {
            *total
        };
        *kpi.conserved.entry(metric.clone()).or_default() += increase;
    }
}

/// The window between two sets of samples. A node is left out when it has no newer report,
/// or when either pipeline is missing from one of its reports (a candidate that is not
/// running must not count as one that emits nothing).
pub fn window(
    index: u32,
    from: &BTreeMap<String, NodeSample>,
    to: &BTreeMap<String, NodeSample>,
    baseline: &str,
    candidate: &str,
    cost: &CostModel,
) -> Window {
    let mut w = Window {
        index,
        ..Default::default()
    };
    let zero = PipelineSample::default();
    for (node, end) in to {
        let Some(start) = from.get(node) else {
            continue;
        };
        let Some((seconds, restarted)) = span(start, end) else {
            continue;
        };
        let pipeline = |sample: &NodeSample, name: &str| sample.pipelines.get(name).cloned();
        let (Some(base_end), Some(cand_end)) = (pipeline(end, baseline), pipeline(end, candidate))
        else {
            continue;
        };
        let (base_start, cand_start) = if restarted {
            (zero.clone(), zero.clone())
        } else {
            match (pipeline(start, baseline), pipeline(start, candidate)) {
                (Some(b), Some(c)) => (b, c),
                _ => continue,
            }
        };
        w.nodes += 1;
        w.start = if w.start == 0 {
            start.at
        } else {
            w.start.min(start.at)
        };
        w.end = w.end.max(end.at);
        add_pipeline(&mut w.baseline, &base_start, &base_end, seconds);
        add_pipeline(&mut w.candidate, &cand_start, &cand_end, seconds);
        let before = if restarted { 0.0 } else { start.cpu_seconds };
        let cores = (end.cpu_seconds - before).max(0.0) / seconds;
        w.cpu_cores += cores;
        w.cpu_by_node.insert(node.clone(), cores);
        w.rss_bytes = w.rss_bytes.saturating_add(end.rss_bytes);
    }
    for kpi in [&mut w.baseline, &mut w.candidate] {
        kpi.cost_per_month = kpi.datapoints_per_second * SECONDS_PER_MONTH / 1e6
            * cost.per_million_datapoints
            + kpi.series as f64 * cost.per_series;
    }
    w
}

/// A window's CPU against the same nodes' CPU without the candidate: the relative
/// overhead, when both are known.
pub fn cpu_overhead(w: &Window, without: &Usage) -> Option<f64> {
    let (mut with_cores, mut without_cores) = (0.0, 0.0);
    for (node, cores) in &w.cpu_by_node {
        if let Some(before) = without.cpu_by_node.get(node) {
            with_cores += cores;
            without_cores += before;
        }
    }
    (without_cores > 0.0).then(|| with_cores / without_cores - 1.0)
}

/// Mean of per-window values with a 95% confidence interval (Student's t).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub windows: u32,
}

/// Two-sided 95% quantiles of Student's t for 1..=30 degrees of freedom.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

pub fn estimate(values: &[f64]) -> Option<Estimate> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let half = if n < 2 {
        0.0
    } else {
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let t = T95.get(n - 2).copied().unwrap_or(1.960);
        t * variance.sqrt() / (n as f64).sqrt()
    };
    Some(Estimate {
        mean,
        ci95_low: mean - half,
        ci95_high: mean + half,
        windows: n as u32,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriterionResult {
    pub criterion: String,
    /// The threshold as written, e.g. `>= 50%`.
    pub threshold: String,
    /// Over the whole measured period.
    pub measured: f64,
    pub passed: bool,
    /// Per-window values, so noise is visible.
    pub per_window: Option<Estimate>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub baseline: Kpi,
    pub candidate: Kpi,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    pub criteria: Vec<CriterionResult>,
    /// Sums (counters) and means (series, rates, cost) over the measured windows.
    pub totals: Totals,
    pub without_candidate: Option<Usage>,
    pub with_candidate: Usage,
    pub windows: u32,
}

impl Verdict {
    /// The failed criteria, by name.
    pub fn failed(&self) -> Vec<&str> {
        self.criteria
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.criterion.as_str())
            .collect()
    }
}

fn ratio_reduction(candidate: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        1.0 - candidate / baseline
    } else {
        0.0
    }
}

fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

/// Judges the measured windows against the definition's criteria.
pub fn verdict(definition: &Definition, windows: &[Window], without: Option<Usage>) -> Verdict {
    let n = windows.len().max(1) as f64;
    let mut totals = Totals {
        baseline: Kpi::default(),
        candidate: Kpi::default(),
        seconds: 0.0,
    };
    let mut with = Usage::default();
    for w in windows {
        totals.seconds += (w.end - w.start).max(0) as f64 / 1000.0;
        for (total, kpi) in [
            (&mut totals.baseline, &w.baseline),
            (&mut totals.candidate, &w.candidate),
        ] {
            total.datapoints += kpi.datapoints;
            total.bytes += kpi.bytes;
            total.series += kpi.series;
            total.critical_series += kpi.critical_series;
            total.datapoints_per_second += kpi.datapoints_per_second / n;
            total.bytes_per_second += kpi.bytes_per_second / n;
            total.cost_per_month += kpi.cost_per_month / n;
            for (metric, increase) in &kpi.conserved {
                *total.conserved.entry(metric.clone()).or_default() += increase;
            }
        }
        with.cpu_cores += w.cpu_cores / n;
        with.rss_bytes += w.rss_bytes / windows.len().max(1) as u64;
    }
    // Series are per-window gauges: their totals above are sums; report means.
    let series_sums = (totals.baseline.series, totals.candidate.series);
    totals.baseline.series = (series_sums.0 as f64 / n).round() as u64;
    totals.candidate.series = (series_sums.1 as f64 / n).round() as u64;

    let per_window =
        |f: &dyn Fn(&Window) -> f64| estimate(&windows.iter().map(f).collect::<Vec<_>>());
    let mut criteria = Vec::new();
    let c = &definition.criteria;
    /// Name, threshold, candidate and baseline over the run, the value of one window.
    type Reduction<'a> = (
        &'a str,
        Option<Percent>,
        f64,
        f64,
        &'a dyn Fn(&Window) -> f64,
    );
    let reductions: [Reduction; 3] = [
        (
            "min_series_reduction",
            c.min_series_reduction,
            series_sums.1 as f64,
            series_sums.0 as f64,
            &|w| ratio_reduction(w.candidate.series as f64, w.baseline.series as f64),
        ),
        (
            "min_datapoints_reduction",
            c.min_datapoints_reduction,
            totals.candidate.datapoints as f64,
            totals.baseline.datapoints as f64,
            &|w| ratio_reduction(w.candidate.datapoints as f64, w.baseline.datapoints as f64),
        ),
        (
            "min_bytes_reduction",
            c.min_bytes_reduction,
            totals.candidate.bytes as f64,
            totals.baseline.bytes as f64,
            &|w| ratio_reduction(w.candidate.bytes as f64, w.baseline.bytes as f64),
        ),
    ];
    for (name, threshold, candidate, baseline, of_window) in reductions {
        let Some(threshold) = threshold else { continue };
        let measured = ratio_reduction(candidate, baseline);
        let mut note = String::new();
        if baseline <= 0.0 {
            note = "the baseline shipped nothing in the measured windows".into();
        }
        criteria.push(CriterionResult {
            criterion: name.into(),
            threshold: format!(">= {}", percent(threshold.0)),
            measured,
            passed: baseline > 0.0 && measured >= threshold.0,
            per_window: per_window(of_window),
            note,
        });
    }
    if c.critical.is_some() {
        let (kept, seen) = (
            totals.candidate.critical_series as f64,
            totals.baseline.critical_series as f64,
        );
        let measured = if seen > 0.0 {
            (kept / seen).min(1.0)
        } else {
            0.0
        };
        criteria.push(CriterionResult {
            criterion: "critical".into(),
            threshold: "100% of the baseline's critical series".into(),
            measured,
            passed: seen > 0.0 && kept >= seen,
            per_window: per_window(&|w| {
                if w.baseline.critical_series > 0 {
                    w.candidate.critical_series as f64 / w.baseline.critical_series as f64
                } else {
                    1.0
                }
            }),
            note: if seen > 0.0 {
                format!(
                    "critical series per window: baseline {:.1}, candidate {:.1}",
                    seen / n,
                    kept / n
                )
            } else {
                "no series matched the critical selector in the baseline: nothing was proven".into()
            },
        });
    }
    if let Some(max) = c.max_cpu_overhead {
        let overheads: Vec<f64> = match &without {
            Some(without) => windows
                .iter()
                .filter_map(|w| cpu_overhead(w, without))
                .collect(),
            None => Vec::new(),
        };
        let estimate = estimate(&overheads);
        let (measured, passed, note) = match (&without, estimate) {
            (Some(without), Some(e)) => (
                e.mean,
                e.mean <= max.0,
                format!(
                    "the same agents used {:.4} cores without the candidate, {:.4} with it",
                    without.cpu_cores, with.cpu_cores
                ),
            ),
            _ => (
                0.0,
                false,
                "no CPU measurement of these agents without the candidate".to_string(),
            ),
        };
        criteria.push(CriterionResult {
            criterion: "max_cpu_overhead".into(),
            threshold: format!("<= {}", percent(max.0)),
            measured,
            passed,
            per_window: estimate,
            note,
        });
    }
    for conserve in &c.conserve {
        let base = totals
            .baseline
            .conserved
            .get(&conserve.metric)
            .copied()
            .unwrap_or(0.0);
        let cand = totals
            .candidate
            .conserved
            .get(&conserve.metric)
            .copied()
            .unwrap_or(0.0);
        let error = if base > 0.0 {
            (cand - base).abs() / base
        } else {
            1.0
        };
        let metric = conserve.metric.clone();
        criteria.push(CriterionResult {
            criterion: format!("conserve {}", conserve.metric),
            threshold: format!("within {}", percent(conserve.tolerance.0)),
            measured: error,
            passed: base > 0.0 && error <= conserve.tolerance.0,
            per_window: per_window(&|w| {
                let b = w.baseline.conserved.get(&metric).copied().unwrap_or(0.0);
                let c = w.candidate.conserved.get(&metric).copied().unwrap_or(0.0);
                if b > 0.0 {
                    (c - b) / b
                } else {
                    0.0
                }
            }),
            note: if base > 0.0 {
                format!("baseline total {base:.3}, candidate total {cand:.3}")
            } else {
                format!(
                    "{} did not increase in the baseline: nothing was proven",
                    conserve.metric
                )
            },
        });
    }
    let passed = !windows.is_empty() && criteria.iter().all(|c| c.passed);
    Verdict {
        passed,
        criteria,
        totals,
        without_candidate: without,
        with_candidate: with,
        windows: windows.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::definition::parse;

    fn sample(
        at: Millis,
        cpu: f64,
        base: (u64, u64, u64, u64, f64),
        cand: (u64, u64, u64, u64, f64),
    ) -> NodeSample {
        let pipeline =
            |(datapoints, bytes, series, critical, conserved): (u64, u64, u64, u64, f64)| {
                PipelineSample {
                    datapoints,
                    bytes,
                    series_window: series,
                    critical_series_window: critical,
                    conserved: [("c".to_string(), conserved)].into(),
                }
            };
        NodeSample {
            at,
            cpu_seconds: cpu,
            rss_bytes: 1000,
            pipelines: [
                ("baseline".to_string(), pipeline(base)),
                ("experiment_1".to_string(), pipeline(cand)),
            ]
            .into(),
        }
    }

    const DEFINITION: &str = r#"
name: t
candidate: { pipeline: { receivers: [otlp] } }
duration: 20s
window: 10s
criteria:
  min_series_reduction: 50%
  min_datapoints_reduction: 50%
  min_bytes_reduction: 90%
  critical: { attributes: { k: [v] } }
  max_cpu_overhead: 50%
  conserve: [{ metric: c, tolerance: 1% }]
"#;

    #[test]
    fn reads_the_stored_report_json() {
        let report = serde_json::json!({
            "unix_millis": 5, "cpu_seconds": 1.5, "rss_bytes": 7, "refused_datapoints": 0,
            "pipelines": [{ "pipeline": "baseline", "datapoints": 10, "bytes": 20,
                "series_window": 3, "series_total": 4, "dropped_datapoints": 0,
                "critical_series_window": 1, "critical_series_total": 1,
                "conserved": { "c": 2.5 } }]
        });
        let s = NodeSample::from_report(&report).unwrap();
        assert_eq!(s.at, 5);
        assert_eq!(s.pipelines["baseline"].datapoints, 10);
        assert_eq!(s.pipelines["baseline"].conserved["c"], 2.5);
        // Reports of agents without the experiment meter still read.
        let old = serde_json::json!({ "unix_millis": 1, "pipelines": [{ "pipeline": "b", "datapoints": 1 }] });
        assert_eq!(
            NodeSample::from_report(&old).unwrap().pipelines["b"].datapoints,
            1
        );
        assert!(NodeSample::from_report(&serde_json::json!({"x": 1})).is_none());
    }

    #[test]
    fn windows_difference_counters_per_node_and_sum_over_nodes() {
        let cost = CostModel {
            per_million_datapoints: 1.0,
            per_series: 0.0,
        };
        let from: BTreeMap<_, _> = [
            (
                "a".to_string(),
                sample(0, 1.0, (100, 1000, 10, 2, 5.0), (10, 50, 2, 2, 5.0)),
            ),
            (
                "b".to_string(),
                sample(0, 7.0, (900, 9000, 5, 0, 40.0), (90, 450, 1, 0, 40.0)),
            ),
            // c has no candidate yet: it is left out rather than counted as emitting nothing.
            (
                "c".to_string(),
                sample(0, 1.0, (0, 0, 0, 0, 0.0), (0, 0, 0, 0, 0.0)),
            ),
        ]
        .into();
        let to: BTreeMap<_, _> = [
            (
                "a".to_string(),
                sample(
                    10_000,
                    2.0,
                    (1100, 11_000, 10, 2, 15.0),
                    (110, 550, 2, 2, 15.0),
                ),
            ),
            // b restarted (its CPU time went down): every counter begins again from zero,
            // also those that already passed their old value.
            (
                "b".to_string(),
                sample(10_000, 0.5, (950, 9500, 5, 0, 41.0), (95, 475, 1, 0, 41.0)),
            ),
            ("c".to_string(), {
                let mut c = sample(10_000, 2.0, (100, 1000, 10, 2, 5.0), (0, 0, 0, 0, 0.0));
                c.pipelines.remove("experiment_1");
                c
            }),
        ]
        .into();
        let w = window(0, &from, &to, "baseline", "experiment_1", &cost);
        assert_eq!(w.nodes, 2);
        assert_eq!(w.baseline.datapoints, 1950);
        assert_eq!(w.candidate.datapoints, 195);
        assert_eq!(w.baseline.series, 15);
        assert_eq!(w.baseline.conserved["c"], 51.0);
        assert!((w.baseline.datapoints_per_second - 195.0).abs() < 1e-9);
        assert!((w.cpu_cores - 0.15).abs() < 1e-9);
        assert!((w.baseline.cost_per_month - 195.0 * SECONDS_PER_MONTH / 1e6).abs() < 1e-6);
        assert_eq!(w.cpu_by_node.len(), 2);
        // A node without a newer report is left out.
        let w = window(1, &to, &to, "baseline", "experiment_1", &cost);
        assert_eq!(w.nodes, 0);
    }

    fn windows(candidate_points: u64, candidate_critical: u64, conserved: f64) -> Vec<Window> {
        let cost = CostModel::default();
        let mut samples = vec![];
        for i in 0..4u64 {
            samples.push(
                [(
                    "a".to_string(),
                    sample(
                        (i * 10_000) as Millis,
                        i as f64 * 1.2,
                        (i * 1000, i * 10_000, 100, 4, i as f64 * 10.0),
                        (
                            i * candidate_points,
                            i * 500,
                            20,
                            candidate_critical,
                            i as f64 * conserved,
                        ),
                    ),
                )]
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            );
        }
        samples
            .windows(2)
            .enumerate()
            .map(|(i, pair)| {
                window(
                    i as u32,
                    &pair[0],
                    &pair[1],
                    "baseline",
                    "experiment_1",
                    &cost,
                )
            })
            .collect()
    }

    fn usage_of(cores: f64) -> Usage {
        Usage {
            cpu_cores: cores,
            rss_bytes: 0,
            cpu_by_node: [("a".to_string(), cores)].into(),
        }
    }

    #[test]
    fn a_candidate_meeting_every_criterion_passes_with_its_numbers() {
        let d = parse(DEFINITION).unwrap();
        let without = Some(usage_of(0.1));
        let v = verdict(&d, &windows(100, 4, 10.0), without.clone());
        assert!(v.passed, "{:?}", v.criteria);
        assert_eq!(v.windows, 3);
        let by_name = |n: &str| {
            v.criteria
                .iter()
                .find(|c| c.criterion == n)
                .unwrap()
                .clone()
        };
        assert!((by_name("min_datapoints_reduction").measured - 0.9).abs() < 1e-9);
        assert!((by_name("min_series_reduction").measured - 0.8).abs() < 1e-9);
        assert!((by_name("min_bytes_reduction").measured - 0.95).abs() < 1e-9);
        assert_eq!(by_name("critical").measured, 1.0);
        assert!((by_name("max_cpu_overhead").measured - 0.2).abs() < 1e-9);
        assert!(by_name("conserve c").measured < 1e-12);
        let e = by_name("min_datapoints_reduction").per_window.unwrap();
        assert_eq!(e.windows, 3);
        // Every window has the same reduction: the interval is the point.
        assert!((e.mean - 0.9).abs() < 1e-9 && (e.ci95_high - e.ci95_low).abs() < 1e-9);
        // CPU of nodes never measured without the candidate does not count.
        let other_node = Usage {
            cpu_by_node: [("z".to_string(), 0.1)].into(),
            ..usage_of(0.1)
        };
        let v = verdict(&d, &windows(100, 4, 10.0), Some(other_node));
        assert_eq!(v.failed(), vec!["max_cpu_overhead"]);
        assert_eq!(v.totals.baseline.datapoints, 3000);
    }

    #[test]
    fn a_candidate_losing_critical_series_or_totals_fails_on_those_criteria() {
        let d = parse(DEFINITION).unwrap();
        let without = Some(usage_of(0.1));
        let v = verdict(&d, &windows(100, 3, 9.0), without.clone());
        assert!(!v.passed);
        assert_eq!(v.failed(), vec!["critical", "conserve c"]);
        let v = verdict(&d, &windows(100, 4, 10.0), Some(usage_of(0.05)));
        assert_eq!(v.failed(), vec!["max_cpu_overhead"]);
        // No windows at all proves nothing.
        assert!(!verdict(&d, &[], without).passed);
    }

    #[test]
    fn confidence_intervals_follow_students_t() {
        let e = estimate(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(e.mean, 2.0);
        // sd = 1, t(0.975, 2) = 4.303
        assert!((e.ci95_high - (2.0 + 4.303 / 3f64.sqrt())).abs() < 1e-9);
        let one = estimate(&[5.0]).unwrap();
        assert_eq!((one.ci95_low, one.ci95_high), (5.0, 5.0));
        assert!(estimate(&[]).is_none());
    }
}
