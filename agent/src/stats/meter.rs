//! The experiment measurements on a pipeline's output, configured by the top-level `meter`
//! key: distinct *critical* series (those a selector picks out) and the running increase of
//! *conserved* counters. Both are read off the wire in the same walk as the series count, and
//! none of it runs without a `meter` config.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use ahash::AHashMap;
use metrics::Gauge;
use serde::Deserialize;

use super::{point_series, resource_hash, IdentityBuild, SeriesTracker, EXACT_SERIES_LIMIT};
use crate::config::{join_path, Issue};
use crate::otlp::rewrite::Attributes;
use crate::otlp::wire::{
    self, AttributeIter, DataKind, Visitor, TEMPORALITY_CUMULATIVE, TEMPORALITY_DELTA,
};
use crate::processor::pattern::{all_match, present, Criteria, PatternText, RawAttributes};
use crate::telemetry;

/// Cumulative series whose last value the conserved meter remembers, per pipeline.
pub const CONSERVED_SERIES_LIMIT: usize = 100_000;
/// Windows (of [`super::WINDOW`]) a cumulative series may go unseen before it is forgotten:
/// 5 minutes.
pub const CONSERVED_STALE_WINDOWS: u32 = 30;

/// `meter:` as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawMeterConfig {
    /// Which series are critical; every condition given must hold.
    #[serde(default, deserialize_with = "present")]
    pub critical: Option<RawCritical>,
    /// Names of the counters whose total increase is metered.
    #[serde(default, deserialize_with = "present")]
    pub conserve: Option<Vec<String>>,
}

/// `meter.critical`: the filter's criteria, under the names the meter uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCritical {
    #[serde(default, deserialize_with = "present")]
    pub metric_names: Option<Vec<PatternText>>,
    #[serde(default, deserialize_with = "present")]
    pub resource_attributes: Option<RawAttributes>,
    #[serde(default, deserialize_with = "present")]
    pub attributes: Option<RawAttributes>,
}

/// The compiled `meter:` config, shared by every pipeline's meter.
#[derive(Debug)]
pub struct MeterConfig {
    raw: RawMeterConfig,
    critical: Option<Criteria>,
    conserve: Vec<String>,
}

/// Configs are equal when written the same: that is what decides whether a reload resets.
impl PartialEq for MeterConfig {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl MeterConfig {
    /// Compiles `raw`, reporting every problem under `path`.
    pub fn compile(raw: RawMeterConfig, path: &str, issues: &mut Vec<Issue>) -> Option<Self> {
        if raw.critical.is_none() && raw.conserve.is_none() {
            issues.push(Issue::new(path, "needs `critical`, `conserve` or both"));
            return None;
        }
        let issues_before = issues.len();
        let critical = raw.critical.as_ref().and_then(|c| {
            Criteria::compile(
                c.metric_names.as_deref(),
                c.resource_attributes.as_ref(),
                ("attributes", c.attributes.as_ref()),
                &join_path(path, "critical"),
                issues,
            )
        });
        let mut conserve: Vec<String> = Vec::new();
        if let Some(names) = &raw.conserve {
            let list = join_path(path, "conserve");
            if names.is_empty() {
                issues.push(Issue::new(&list, "must list at least one metric name"));
            }
            for (i, name) in names.iter().enumerate() {
                if name.is_empty() {
                    issues.push(Issue::new(format!("{list}[{i}]"), "may not be empty"));
                } else if conserve.contains(name) {
                    issues.push(Issue::new(
                        format!("{list}[{i}]"),
                        format!("{name:?} is listed twice"),
                    ));
                } else {
                    conserve.push(name.clone());
                }
            }
        }
        (issues.len() == issues_before).then_some(Self {
            raw,
            critical,
            conserve,
        })
    }
}

/// Critical series of one pipeline and the gauges they are published on.
struct CriticalCount {
    tracker: SeriesTracker,
    window: Gauge,
    total: Gauge,
}

/// What a cumulative series last reported.
struct Cumulative {
    last: f64,
    start: u64,
    seen: u32,
}

/// Conserved counter totals of one pipeline, and the state cumulative series need.
struct Conserved {
    index: AHashMap<String, usize>,
    totals: Vec<(f64, Gauge)>,
    series: HashMap<u64, Cumulative, IdentityBuild>,
    /// Unix nanoseconds when this state began: a cumulative series that started before it
    /// has an unknown past, so its first point only sets the baseline.
    since: u64,
    window: u32,
    limit: usize,
    warned_full: bool,
}

impl Conserved {
    fn new(pipeline: &str, names: &[String], since: u64, previous: Option<Conserved>) -> Self {
        let mut carried: AHashMap<String, (f64, Gauge)> = AHashMap::new();
        if let Some(previous) = previous {
            for (name, i) in previous.index {
                if let Some(total) = previous.totals.get(i) {
                    carried.insert(name, total.clone());
                }
            }
        }
        let mut index = AHashMap::new();
        let mut totals = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            index.insert(name.clone(), i);
            // A name that stays listed keeps its total: the gauge only goes up.
            totals.push(carried.remove(name).unwrap_or_else(|| {
                (
                    0.0,
                    metrics::gauge!(telemetry::PIPELINE_OUTPUT_CONSERVED, "pipeline" => pipeline.to_string(), "metric" => name.clone()),
                )
            }));
        }
        Self {
            index,
            totals,
            series: HashMap::default(),
            since,
            window: 0,
            limit: CONSERVED_SERIES_LIMIT,
            warned_full: false,
        }
    }

    fn add(&mut self, metric: usize, temporality: i32, series: u64, point: wire::NumberPoint) {
        // A counter's increase is never negative or infinite; such a value is not counted.
        let Some(value) = point.value.filter(|v| v.is_finite() && *v >= 0.0) else {
            return;
        };
        let increase = match temporality {
            TEMPORALITY_DELTA => value,
            TEMPORALITY_CUMULATIVE => self.cumulative(series, value, point.start_time_unix_nano),
            _ => return,
        };
        if let Some((total, _)) = self.totals.get_mut(metric) {
            *total += increase;
        }
    }

    fn cumulative(&mut self, series: u64, value: f64, start: u64) -> f64 {
        let window = self.window;
        let tracked = self.series.len();
        match self.series.entry(series) {
            Entry::Occupied(mut slot) => {
                let state = slot.get_mut();
                let increase = if value >= state.last && start == state.start {
                    value - state.last
                } else {
                    value // a reset: the counter restarted from zero
                };
                *state = Cumulative {
                    last: value,
                    start,
                    seen: window,
                };
                increase
            }
            Entry::Vacant(slot) => {
                if tracked >= self.limit {
                    if !self.warned_full {
                        self.warned_full = true;
                        tracing::warn!(
                            limit = self.limit,
                            "conserved counter meter is full; new cumulative series are not counted"
                        );
                    }
                    return 0.0;
                }
                slot.insert(Cumulative {
                    last: value,
                    start,
                    seen: window,
                });
                if start >= self.since {
                    value
                } else {
                    0.0
                }
            }
        }
    }

    fn publish(&self) {
        for (total, gauge) in &self.totals {
            gauge.set(*total);
        }
    }

    fn next_window(&mut self) {
        self.window = self.window.wrapping_add(1);
        let window = self.window;
        self.series
            .retain(|_, s| window.wrapping_sub(s.seen) < CONSERVED_STALE_WINDOWS);
    }
}

/// The measurements a `meter` config adds to one pipeline's meter.
pub(super) struct Extra {
    pipeline: String,
    config: Arc<MeterConfig>,
    critical: Option<CriticalCount>,
    conserved: Option<Conserved>,
    /// Where non-string attribute values are rendered for matching, reused.
    scratch: String,
}

fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Extra {
    pub(super) fn new(pipeline: &str, config: Arc<MeterConfig>) -> Self {
        let mut extra = Self {
            pipeline: pipeline.to_string(),
            config: Arc::clone(&config),
            critical: None,
            conserved: None,
            scratch: String::new(),
        };
        extra.reconfigure(config, true);
        extra
    }

    pub(super) fn config(&self) -> &Arc<MeterConfig> {
        &self.config
    }

    /// Takes a new config, keeping the critical tracker and conserved state when their part
    /// of the config is unchanged.
    pub(super) fn reconfigure(&mut self, config: Arc<MeterConfig>, fresh: bool) {
        let p = &self.pipeline;
        if fresh || config.raw.critical != self.config.raw.critical {
            self.critical = config.critical.as_ref().map(|_| CriticalCount {
                tracker: SeriesTracker::new(EXACT_SERIES_LIMIT),
                window: metrics::gauge!(telemetry::PIPELINE_OUTPUT_CRITICAL_SERIES, "pipeline" => p.clone(), "window" => "10s"),
                total: metrics::gauge!(telemetry::PIPELINE_OUTPUT_CRITICAL_SERIES, "pipeline" => p.clone(), "window" => "total"),
            });
        }
        if fresh || config.raw.conserve != self.config.raw.conserve {
            let previous = self.conserved.take();
            self.conserved = (!config.conserve.is_empty())
                .then(|| Conserved::new(p, &config.conserve, unix_nanos_now(), previous));
            if let Some(conserved) = &self.conserved {
                conserved.publish();
            }
        }
        self.config = config;
    }

    /// Walks one request, counting series into `series` and everything else here.
    pub(super) fn walk(
        &mut self,
        state: &ahash::RandomState,
        series: &mut SeriesTracker,
        request: &[u8],
    ) -> Result<(), wire::WireError> {
        let mut walk = MeterWalk {
            state,
            resource: 0,
            scope: 0,
            metric: 0,
            series,
            selector: self.config.critical.as_ref(),
            critical: self.critical.as_mut().map(|c| &mut c.tracker),
            conserved: self.conserved.as_mut(),
            scratch: &mut self.scratch,
            resource_critical: false,
            metric_critical: false,
            metric_conserved: None,
            point_rule: None,
        };
        let walked = wire::walk(request, &mut walk);
        if let Some(conserved) = &self.conserved {
            conserved.publish();
        }
        walked
    }

    pub(super) fn rotate(&mut self) {
        if let Some(critical) = &mut self.critical {
            critical
                .window
                .set(critical.tracker.window_count().0 as f64);
            critical.total.set(critical.tracker.total_count().0 as f64);
            critical.tracker.next_window();
        }
        if let Some(conserved) = &mut self.conserved {
            conserved.publish();
            conserved.next_window();
        }
    }

    #[cfg(test)]
    pub(super) fn critical_counts(&mut self) -> Option<(u64, u64)> {
        self.critical
            .as_mut()
            .map(|c| (c.tracker.window_count().0, c.tracker.total_count().0))
    }

    #[cfg(test)]
    pub(super) fn conserved_total(&self, name: &str) -> Option<f64> {
        let conserved = self.conserved.as_ref()?;
        conserved
            .index
            .get(name)
            .and_then(|i| conserved.totals.get(*i))
            .map(|(total, _)| *total)
    }

    #[cfg(test)]
    pub(super) fn set_since(&mut self, since: u64) {
        if let Some(conserved) = &mut self.conserved {
            conserved.since = since;
        }
    }
}

/// The series walk with the critical and conserved measurements on top.
struct MeterWalk<'a> {
    state: &'a ahash::RandomState,
    resource: u64,
    scope: u64,
    metric: u64,
    series: &'a mut SeriesTracker,
    selector: Option<&'a Criteria>,
    critical: Option<&'a mut SeriesTracker>,
    conserved: Option<&'a mut Conserved>,
    scratch: &'a mut String,
    resource_critical: bool,
    metric_critical: bool,
    /// The conserve list index of the current metric's name.
    metric_conserved: Option<usize>,
    /// The index and temporality of the current metric if its points are counted.
    point_rule: Option<(usize, i32)>,
}

impl Visitor for MeterWalk<'_> {
    const DETAIL: bool = true;

    fn resource(&mut self, resource: &[u8]) {
        self.resource = resource_hash(self.state, resource);
        // A malformed attribute matches nothing; the walk reports the error itself.
        self.resource_critical = self.selector.is_some_and(|s| {
            all_match(
                &s.resource_attributes,
                Attributes::of_resource(resource),
                self.scratch,
            )
            .unwrap_or(false)
        });
    }

    fn scope(&mut self, scope: &[u8]) {
        self.scope = self.state.hash_one(scope);
    }

    fn metric(&mut self, name: &str) {
        self.metric = self.state.hash_one(name);
        self.metric_critical =
            self.resource_critical && self.selector.is_some_and(|s| s.name_matches(name));
        self.metric_conserved = self
            .conserved
            .as_ref()
            .and_then(|c| c.index.get(name).copied());
    }

    fn data(&mut self, kind: DataKind) {
        // Only monotonic sums are counters; an up-down counter's drops are not resets.
        self.point_rule = match (self.metric_conserved, kind) {
            (
                Some(index),
                DataKind::Sum {
                    temporality,
                    monotonic: true,
                },
            ) => Some((index, temporality)),
            _ => None,
        };
    }

    fn data_point(&mut self, attributes: AttributeIter<'_>) {
        let series = point_series(
            self.state,
            self.resource,
            self.scope,
            self.metric,
            attributes.clone(),
        );
        self.series.insert(series);
        if self.metric_critical {
            if let (Some(selector), Some(tracker)) = (self.selector, self.critical.as_deref_mut()) {
                let point = Attributes::new(attributes.point(), attributes.attribute_field());
                if all_match(&selector.datapoint_attributes, point, self.scratch).unwrap_or(false) {
                    tracker.insert(series);
                }
            }
        }
        if let (Some((index, temporality)), Some(conserved)) =
            (self.point_rule, self.conserved.as_deref_mut())
        {
            conserved.add(index, temporality, series, attributes.number());
        }
    }
}
