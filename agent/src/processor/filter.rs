//! `filter`: keeps or drops whole resources, whole metrics and single data points by metric
//! name and attribute value, then prunes the scopes and resources left empty.
//!
//! Every pattern is compiled once when the config is parsed. The filter works on the encoded
//! request (`otlp::rewrite`): no decode, no copy of a decoded request, no re-encode. What it
//! keeps is copied from the input in runs; only the messages around what it drops are
//! re-framed. Nothing is allocated per data point: string attribute values are matched as
//! `&str` straight from the input, and numbers and booleans are rendered into one reused
//! buffer. A batch the filter does not change is passed on as is (a shared batch stays
//! shared, not copied), and so is a resource under which the criteria cannot drop anything
//! (with resource criteria only, the filter does not look below the resources).

use std::sync::Arc;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_yaml::Value;

use super::pattern::{all_match, present, AttributeCriterion, Criteria, PatternText};
use super::{BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory};
use crate::config::{self, Issue};
use crate::otlp::rewrite::{
    self, Attributes, Edit, KeyValueRef, MetricEdit, PointEdit, ResourceEdit,
};
use crate::otlp::rewrite::{Then, Unobserved};
use crate::otlp::wire::{Visitor, WireError};
use crate::otlp::Payload;
use crate::processor::attributes::{Actions, AttributesConfig, AttributesEdit};
use crate::stats::SeriesSink;

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "filter",
    parse,
};

/// Config of the `filter` processor.
///
/// A data point is kept when it matches `include` (or there is none) and does not match
/// `exclude` (or there is none): exclude wins over include. A block matches when all of its
/// criteria do (they are ANDed); a criterion left out does not constrain. Resource criteria
/// decide whole `ResourceMetrics` (a resource failing `include.resource_attributes` is
/// dropped with everything in it), metric-name criteria decide whole metrics, and data point
/// criteria decide single points. Scopes and resources left without data points are then
/// removed.
///
/// Patterns: a plain string matches exactly; a string holding a glob metacharacter (`*`, `?`
/// or `[`) is a glob over the whole value; `regex:` followed by a regular expression matches
/// wherever the expression matches, so anchor it (`regex:^system\.`) to match a prefix. To
/// match a literal `*`, `?` or `[`, use a regex.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawFilterConfig {
    /// What to keep: if present, a data point must match it to be kept.
    #[serde(default, deserialize_with = "present")]
    pub include: Option<RawCriteria>,
    /// What to drop: a data point matching it is dropped, even if it matches `include`.
    #[serde(default, deserialize_with = "present")]
    pub exclude: Option<RawCriteria>,
}

/// The criteria of one `include` or `exclude` block, ANDed; at least one is required.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCriteria {
    /// Patterns for the metric name; a metric matches when any one of them does.
    #[serde(default, deserialize_with = "present")]
    pub metric_names: Option<Vec<PatternText>>,
    /// Resource attribute key to value patterns. A resource matches when every listed key is
    /// present with a value that matches one of its patterns. String values are matched as
    /// they are; integer, double and boolean values by their text (`1234`, `0.5`, `true`);
    /// other values never match.
    #[serde(default, deserialize_with = "present")]
    pub resource_attributes: Option<IndexMap<String, Vec<PatternText>>>,
    /// Data point attribute key to value patterns, matched like `resource_attributes` but
    /// against each data point's own attributes, so points are kept or dropped one by one.
    #[serde(default, deserialize_with = "present")]
    pub datapoint_attributes: Option<IndexMap<String, Vec<PatternText>>>,
}

impl RawCriteria {
    fn compile(&self, path: &str, issues: &mut Vec<Issue>) -> Option<Criteria> {
        Criteria::compile(
            self.metric_names.as_deref(),
            self.resource_attributes.as_ref(),
            ("datapoint_attributes", self.datapoint_attributes.as_ref()),
            path,
            issues,
        )
    }
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let raw: RawFilterConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    if raw.include.is_none() && raw.exclude.is_none() {
        issues.push(Issue::new(
            "",
            "needs `include`, `exclude` or both; a filter without either would keep everything",
        ));
    }
    let include = raw
        .include
        .as_ref()
        .and_then(|c| c.compile("include", &mut issues));
    let exclude = raw
        .exclude
        .as_ref()
        .and_then(|c| c.compile("exclude", &mut issues));
    if issues.is_empty() {
        Ok(Arc::new(FilterConfig {
            filter: Arc::new(Filter { include, exclude }),
        }))
    } else {
        Err(issues)
    }
}

/// The compiled filter, shared by every instance built from one config.
#[derive(Debug)]
struct Filter {
    include: Option<Criteria>,
    exclude: Option<Criteria>,
}

/// What the resource and name criteria decided for one metric.
enum MetricVerdict<'a> {
    Drop,
    KeepAll,
    PerPoint(PointRule<'a>),
}

/// The data point criteria left to check on each point of one metric.
#[derive(Clone, Copy)]
struct PointRule<'a> {
    /// Must all match (include); empty when include has none.
    require: &'a [AttributeCriterion],
    /// If present, drops the points they all match (exclude).
    reject: Option<&'a [AttributeCriterion]>,
}

impl PointRule<'_> {
    fn keep(&self, attributes: Attributes<'_>, scratch: &mut String) -> Result<bool, WireError> {
        if !all_match(self.require, attributes, scratch)? {
            return Ok(false);
        }
        match self.reject {
            Some(reject) => Ok(!all_match(reject, attributes, scratch)?),
            None => Ok(true),
        }
    }
}

impl Filter {
    /// `None` drops the resource with everything in it; `Some(exclude_live)` keeps it and
    /// says whether `exclude` still applies to its metrics (its resource criteria matched).
    /// `all_match` says whether the resource's attributes match every criterion given.
    fn resource_verdict<E>(
        &self,
        mut all_match: impl FnMut(&[AttributeCriterion]) -> Result<bool, E>,
    ) -> Result<Option<bool>, E> {
        if let Some(include) = &self.include {
            if !all_match(&include.resource_attributes)? {
                return Ok(None);
            }
        }
        let Some(exclude) = &self.exclude else {
            return Ok(Some(false));
        };
        let exclude_live = all_match(&exclude.resource_attributes)?;
        if exclude_live && exclude.metric_names.is_none() && exclude.datapoint_attributes.is_empty()
        {
            return Ok(None);
        }
        Ok(Some(exclude_live))
    }

    /// Whether [`Filter::metric_verdict`] depends on the metric name.
    fn reads_metric_names(&self, exclude_live: bool) -> bool {
        let names = |c: &Option<Criteria>| c.as_ref().is_some_and(|c| c.metric_names.is_some());
        names(&self.include) || (exclude_live && names(&self.exclude))
    }

    /// Whether anything under a resource the filter keeps can be dropped: if not, the
    /// resource is passed on whole, as received.
    fn descends(&self, exclude_live: bool) -> bool {
        self.reads_metric_names(exclude_live)
            || !matches!(
                self.metric_verdict(exclude_live, ""),
                MetricVerdict::KeepAll
            )
    }

    fn metric_verdict(&self, exclude_live: bool, name: &str) -> MetricVerdict<'_> {
        let mut require: &[AttributeCriterion] = &[];
        if let Some(include) = &self.include {
            if !include.name_matches(name) {
                return MetricVerdict::Drop;
            }
            require = &include.datapoint_attributes;
        }
        let mut reject = None;
        if let Some(exclude) = &self.exclude {
            if exclude_live && exclude.name_matches(name) {
                if exclude.datapoint_attributes.is_empty() {
                    return MetricVerdict::Drop;
                }
                reject = Some(&exclude.datapoint_attributes[..]);
            }
        }
        if require.is_empty() && reject.is_none() {
            MetricVerdict::KeepAll
        } else {
            MetricVerdict::PerPoint(PointRule { require, reject })
        }
    }
}

/// The filter as the wire-level rewrite asks for it.
struct FilterEdit<'a> {
    filter: &'a Filter,
    scratch: &'a mut String,
}

impl<'a> Edit for FilterEdit<'a> {
    /// Whether `exclude` still applies to the resource's metrics.
    type Resource = bool;
    type Point = PointRule<'a>;

    const PRUNE: bool = true;

    fn resource(&mut self, resource: Option<&[u8]>) -> Result<ResourceEdit<bool>, WireError> {
        let attributes = Attributes::of_resource(resource.unwrap_or_default());
        let scratch = &mut *self.scratch;
        let verdict = self
            .filter
            .resource_verdict(|criteria| all_match(criteria, attributes, scratch))?;
        Ok(match verdict {
            None => ResourceEdit::Drop,
            Some(exclude_live) => ResourceEdit::Keep(exclude_live),
        })
    }

    fn write_resource(&mut self, _: Option<&[u8]>, _: &mut Vec<u8>) -> Result<(), WireError> {
        // Never asked for: the filter keeps or drops resources, it does not change them.
        Ok(())
    }

    fn descends(&self, exclude_live: bool) -> bool {
        self.filter.descends(exclude_live)
    }

    fn reads_metric_names(&self, exclude_live: bool) -> bool {
        self.filter.reads_metric_names(exclude_live)
    }

    fn metric(&mut self, exclude_live: bool, name: &str) -> MetricEdit<PointRule<'a>> {
        match self.filter.metric_verdict(exclude_live, name) {
            MetricVerdict::Drop => MetricEdit::Drop,
            MetricVerdict::KeepAll => MetricEdit::KeepAll,
            MetricVerdict::PerPoint(rule) => MetricEdit::PerPoint(rule),
        }
    }

    fn point(
        &mut self,
        rule: PointRule<'a>,
        attributes: Attributes<'_>,
    ) -> Result<PointEdit, WireError> {
        Ok(if rule.keep(attributes, self.scratch)? {
            PointEdit::Keep
        } else {
            PointEdit::Drop
        })
    }

    fn keep_attribute(&mut self, _: bool, _: KeyValueRef<'_>) -> Result<bool, WireError> {
        // Never asked for: the filter does not change attributes.
        Ok(true)
    }

    fn write_point(
        &mut self,
        _: PointRule<'a>,
        _: &[u8],
        _: u32,
        _: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        // Never asked for: points are kept or dropped whole.
        Ok(())
    }
}

/// The parsed and compiled config of one `filter` processor.
#[derive(Debug)]
pub struct FilterConfig {
    filter: Arc<Filter>,
}

impl ProcessorConfig for FilterConfig {
    /// The filter reads the wire, so receivers need not decode for it.
    fn reads_decoded(&self) -> bool {
        false
    }

    fn build(&self, _context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        Box::new(FilterProcessor {
            filter: Arc::clone(&self.filter),
            scratch: String::new(),
            then: None,
        })
    }

    /// A filter and the `attributes` processor after it rewrite each request in one walk:
    /// the filter only drops, the attributes processor never does.
    fn build_fused(
        &self,
        next: &dyn ProcessorConfig,
        _context: &mut BuildContext<'_>,
    ) -> Option<Box<dyn Processor>> {
        let next: &dyn std::any::Any = next;
        let attributes = next.downcast_ref::<AttributesConfig>()?;
        Some(Box::new(FilterProcessor {
            filter: Arc::clone(&self.filter),
            scratch: String::new(),
            then: Some(attributes.actions()),
        }))
    }
}

struct FilterProcessor {
    filter: Arc<Filter>,
    /// Where non-string attribute values are rendered for matching, reused.
    scratch: String,
    /// The actions of an `attributes` processor fused after the filter.
    then: Option<Arc<Actions>>,
}

impl Processor for FilterProcessor {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        self.filter_payload(input, out, None::<&mut Unobserved>)?;
        Ok(())
    }

    fn process_metered(
        &mut self,
        input: Payload,
        out: &mut Vec<Payload>,
        series: &mut SeriesSink<'_>,
    ) -> Result<bool, ProcessError> {
        let mut hasher = series.hasher(&input);
        self.filter_payload(input, out, Some(&mut hasher))
    }
}

impl FilterProcessor {
    /// Filters one payload, telling `observer` about the output; returns whether it saw all.
    fn filter_payload<V: Visitor>(
        &mut self,
        input: Payload,
        out: &mut Vec<Payload>,
        observer: Option<&mut V>,
    ) -> Result<bool, ProcessError> {
        let filter = FilterEdit {
            filter: &self.filter,
            scratch: &mut self.scratch,
        };
        let (output, observed) = match &self.then {
            None => rewrite::rewrite_payload_observed(input, &mut { filter }, observer)?,
            Some(actions) => {
                let mut both = Then {
                    first: filter,
                    second: AttributesEdit::new(actions),
                };
                rewrite::rewrite_payload_observed(input, &mut both, observer)?
            }
        };
        // Nothing left is nothing to send.
        if output.resources > 0 {
            out.push(output.payload);
        }
        Ok(observed)
    }
}

/// The filter as it was written on decoded requests, kept as the reference the wire-level
/// filter is checked against.
#[cfg(test)]
mod oracle {
    use std::convert::Infallible;

    use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    use super::{AttributeCriterion, Filter, MetricVerdict, PointRule};
    use crate::otlp::{prune_empty, ExportMetricsServiceRequest};

    fn matches(
        criterion: &AttributeCriterion,
        attributes: &[KeyValue],
        scratch: &mut String,
    ) -> bool {
        let value = attributes
            .iter()
            .find(|kv| kv.key == criterion.key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref());
        match value {
            Some(any_value::Value::StringValue(s)) => criterion.values.is_match(s),
            Some(any_value::Value::BoolValue(b)) => {
                criterion.values.is_match(if *b { "true" } else { "false" })
            }
            Some(any_value::Value::IntValue(i)) => {
                criterion.rendered_matches(scratch, format_args!("{i}"))
            }
            Some(any_value::Value::DoubleValue(d)) => {
                criterion.rendered_matches(scratch, format_args!("{d}"))
            }
            _ => false,
        }
    }

    fn all_match(
        criteria: &[AttributeCriterion],
        attributes: &[KeyValue],
        scratch: &mut String,
    ) -> bool {
        criteria.iter().all(|c| matches(c, attributes, scratch))
    }

    fn keep(rule: &PointRule<'_>, attributes: &[KeyValue], scratch: &mut String) -> bool {
        all_match(rule.require, attributes, scratch)
            && !rule
                .reject
                .is_some_and(|reject| all_match(reject, attributes, scratch))
    }

    /// Filters `request` in place and prunes what became empty.
    ///
    /// One change from the struct filter: a resource nothing under which can be dropped
    /// ([`Filter::descends`]) is kept as received, where the struct filter pruned any empty
    /// scope or metric in it when it changed something else in the request (and kept them
    /// when it changed nothing).
    pub fn apply(filter: &Filter, request: &mut ExportMetricsServiceRequest) {
        let mut scratch = String::new();
        let scratch = &mut scratch;
        let mut whole = Vec::new();
        request.resource_metrics.retain_mut(|rm| {
            let attributes = rm.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
            let verdict = filter.resource_verdict(|criteria| {
                Ok::<_, Infallible>(all_match(criteria, attributes, scratch))
            });
            let Ok(Some(exclude_live)) = verdict else {
                return false;
            };
            whole.push(!filter.descends(exclude_live));
            for sm in &mut rm.scope_metrics {
                sm.metrics.retain_mut(|metric| {
                    match filter.metric_verdict(exclude_live, &metric.name) {
                        MetricVerdict::Drop => false,
                        MetricVerdict::KeepAll => true,
                        MetricVerdict::PerPoint(rule) => {
                            if let Some(data) = &mut metric.data {
                                retain_points(data, |attributes| keep(&rule, attributes, scratch));
                            }
                            true
                        }
                    }
                });
            }
            true
        });
        // Pruned one resource at a time, to leave those kept whole as they are.
        let mut whole = whole.into_iter();
        request.resource_metrics.retain_mut(|rm| {
            if whole.next().unwrap_or(false) {
                return true;
            }
            let mut one = ExportMetricsServiceRequest {
                resource_metrics: vec![std::mem::take(rm)],
            };
            prune_empty(&mut one);
            match one.resource_metrics.pop() {
                Some(pruned) => {
                    *rm = pruned;
                    true
                }
                None => false,
            }
        });
    }

    /// Keeps the data points, of whatever type, whose attributes satisfy `keep`.
    fn retain_points(data: &mut Data, mut keep: impl FnMut(&[KeyValue]) -> bool) {
        match data {
            Data::Gauge(g) => g.data_points.retain(|p| keep(&p.attributes)),
            Data::Sum(s) => s.data_points.retain(|p| keep(&p.attributes)),
            Data::Histogram(h) => h.data_points.retain(|p| keep(&p.attributes)),
            Data::ExponentialHistogram(h) => h.data_points.retain(|p| keep(&p.attributes)),
            Data::Summary(s) => s.data_points.retain(|p| keep(&p.attributes)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::otlp::testdata::{
        all_types, gauge_metric, int_attr, number_point, request, resource_metrics, string_attr,
        sum_metric,
    };
    use crate::otlp::{Batch, ExportMetricsServiceRequest};
    use crate::processor::test_util::{parse_issues, run};
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    /// Runs one request through a filter built from `yaml`; `None` if it dropped everything.
    fn filter(
        yaml: &str,
        request: ExportMetricsServiceRequest,
    ) -> Option<ExportMetricsServiceRequest> {
        let mut out = run("filter", yaml, vec![Payload::Decoded(request)]);
        assert!(out.len() <= 1, "one payload in, at most one out");
        out.pop().map(|p| p.into_request().unwrap())
    }

    fn render(value: Option<&AnyValue>) -> String {
        match value.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            Some(any_value::Value::IntValue(i)) => i.to_string(),
            Some(any_value::Value::DoubleValue(d)) => d.to_string(),
            Some(any_value::Value::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        }
    }

    fn render_attributes(attributes: &[KeyValue]) -> String {
        attributes
            .iter()
            .map(|kv| format!("{}={}", kv.key, render(kv.value.as_ref())))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn point_attributes(data: &Data) -> Vec<&[KeyValue]> {
        match data {
            Data::Gauge(g) => g.data_points.iter().map(|p| &p.attributes[..]).collect(),
            Data::Sum(s) => s.data_points.iter().map(|p| &p.attributes[..]).collect(),
            Data::Histogram(h) => h.data_points.iter().map(|p| &p.attributes[..]).collect(),
            Data::ExponentialHistogram(h) => {
                h.data_points.iter().map(|p| &p.attributes[..]).collect()
            }
            Data::Summary(s) => s.data_points.iter().map(|p| &p.attributes[..]).collect(),
        }
    }

    /// `resource-label metric point-attributes` for every data point, in order. The label is
    /// the `process.executable.name` of the resource, or its `host.name`.
    fn points(request: &ExportMetricsServiceRequest) -> Vec<String> {
        let mut out = Vec::new();
        for rm in &request.resource_metrics {
            let attributes = rm.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
            let label = ["process.executable.name", "host.name"]
                .iter()
                .find_map(|k| attributes.iter().find(|kv| kv.key == *k))
                .map_or("-".to_string(), |kv| render(kv.value.as_ref()));
            for metric in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
                for attributes in point_attributes(metric.data.as_ref().unwrap()) {
                    out.push(format!(
                        "{label} {} {}",
                        metric.name,
                        render_attributes(attributes)
                    ));
                }
            }
        }
        out
    }

    fn metric_names(request: &ExportMetricsServiceRequest) -> Vec<&str> {
        request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .map(|m| m.name.as_str())
            .collect()
    }

    /// One resource with one single-point sum per name.
    fn named(names: &[&str]) -> ExportMetricsServiceRequest {
        let metrics = names
            .iter()
            .map(|n| sum_metric(n, vec![number_point(vec![], 1.0)]))
            .collect();
        ExportMetricsServiceRequest {
            resource_metrics: vec![resource_metrics(
                vec![string_attr("host.name", "n")],
                metrics,
            )],
        }
    }

    const NAMES: &[&str] = &[
        "process.cpu.time",
        "process.cpu.time.total",
        "process.memory.usage",
        "process.memory",
        "system.cpu.load",
        "my.system.cpu",
        "other",
    ];

    #[test]
    fn include_metric_names_exact_glob_and_regex() {
        let out = filter(
            r#"
include:
  metric_names: ["process.cpu.time", "process.memory.*", "regex:^system\\."]
"#,
            named(NAMES),
        )
        .unwrap();
        assert_eq!(
            metric_names(&out),
            [
                "process.cpu.time",
                "process.memory.usage",
                "system.cpu.load"
            ]
        );
    }

    #[test]
    fn regex_is_unanchored_unless_anchored() {
        let out = filter("include: {metric_names: ['regex:system']}", named(NAMES)).unwrap();
        assert_eq!(metric_names(&out), ["system.cpu.load", "my.system.cpu"]);
        let out = filter("include: {metric_names: ['regex:cpu$']}", named(NAMES)).unwrap();
        assert_eq!(metric_names(&out), ["my.system.cpu"]);
    }

    #[test]
    fn glob_question_mark_and_class() {
        let out = filter(
            "include: {metric_names: ['process.memor?', '[os]*']}",
            named(NAMES),
        )
        .unwrap();
        assert_eq!(
            metric_names(&out),
            ["process.memory", "system.cpu.load", "other"]
        );
    }

    #[test]
    fn many_exact_names_use_a_set() {
        let many: Vec<String> = (0..20).map(|i| format!("'m{i}'")).collect();
        let yaml = format!(
            "include: {{metric_names: [{}, 'process.cpu.time']}}",
            many.join(", ")
        );
        let out = filter(&yaml, named(NAMES)).unwrap();
        assert_eq!(metric_names(&out), ["process.cpu.time"]);
    }

    #[test]
    fn exclude_metric_names() {
        let out = filter(
            "exclude: {metric_names: ['process.*', 'other']}",
            named(NAMES),
        )
        .unwrap();
        assert_eq!(metric_names(&out), ["system.cpu.load", "my.system.cpu"]);
    }

    #[test]
    fn exclude_wins_over_include() {
        let out = filter(
            r#"
include: {metric_names: ["process.*"]}
exclude: {metric_names: ["process.cpu.time.*", "regex:usage"]}
"#,
            named(NAMES),
        )
        .unwrap();
        assert_eq!(metric_names(&out), ["process.cpu.time", "process.memory"]);
    }

    #[test]
    fn include_resource_attributes_drops_whole_resources() {
        let out = filter(
            "include: {resource_attributes: {process.executable.name: [proc-1, 'regex:^proc-3$']}}",
            request(4, 1, 1),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-1 process.metric.0 state=s0",
                "proc-3 process.metric.0 state=s0"
            ]
        );
    }

    #[test]
    fn resource_attributes_need_every_key() {
        // proc-0 has pid 1, proc-1 pid 2, proc-2 pid 3.
        let yaml = r#"
include:
  resource_attributes:
    process.executable.name: ["proc-*"]
    process.pid: [2, 3]
    host.name: [node-1]
"#;
        let out = filter(yaml, request(3, 1, 1)).unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-1 process.metric.0 state=s0",
                "proc-2 process.metric.0 state=s0"
            ]
        );
        // A key the resource lacks never matches.
        let out = filter(
            "include: {resource_attributes: {process.executable.name: ['*'], k8s.pod.name: ['*']}}",
            request(3, 1, 1),
        );
        assert!(out.is_none());
    }

    #[test]
    fn non_string_values_match_by_their_text() {
        let resource = |name: &str, value: AnyValue| {
            resource_metrics(
                vec![
                    string_attr("host.name", name),
                    KeyValue {
                        key: "v".to_string(),
                        value: Some(value),
                        ..Default::default()
                    },
                ],
                vec![gauge_metric("g", vec![number_point(vec![], 1.0)])],
            )
        };
        let value = |v: any_value::Value| AnyValue { value: Some(v) };
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![
                resource("int", value(any_value::Value::IntValue(-12))),
                resource("bool", value(any_value::Value::BoolValue(true))),
                resource("double", value(any_value::Value::DoubleValue(0.5))),
                resource("whole-double", value(any_value::Value::DoubleValue(2.0))),
                resource(
                    "bytes",
                    value(any_value::Value::BytesValue(b"-12".to_vec())),
                ),
                resource("string", value(any_value::Value::StringValue("x".into()))),
            ],
        };
        let out = filter(
            "include: {resource_attributes: {v: [-12, true, 0.5, '2', 'regex:^x$']}}",
            request.clone(),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "int g ",
                "bool g ",
                "double g ",
                "whole-double g ",
                "string g "
            ]
        );
        let out = filter(
            "exclude: {resource_attributes: {v: ['regex:^-?1']}}",
            request,
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "bool g ",
                "double g ",
                "whole-double g ",
                "bytes g ",
                "string g "
            ]
        );
    }

    #[test]
    fn exclude_resource_attributes_drops_whole_resources() {
        let out = filter(
            "exclude: {resource_attributes: {process.executable.name: [proc-0, proc-2]}}",
            request(3, 2, 1),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-1 process.metric.0 state=s0",
                "proc-1 process.metric.1 state=s0"
            ]
        );
    }

    #[test]
    fn include_datapoint_attributes_keeps_matching_points() {
        let out = filter(
            "include: {datapoint_attributes: {state: [s1, 'regex:2']}}",
            request(1, 2, 4),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-0 process.metric.0 state=s1",
                "proc-0 process.metric.0 state=s2",
                "proc-0 process.metric.1 state=s1",
                "proc-0 process.metric.1 state=s2",
            ]
        );
    }

    #[test]
    fn exclude_datapoint_attributes_drops_matching_points() {
        let out = filter(
            "exclude: {datapoint_attributes: {state: ['s[01]']}}",
            request(1, 1, 4),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-0 process.metric.0 state=s2",
                "proc-0 process.metric.0 state=s3"
            ]
        );
    }

    #[test]
    fn datapoint_attributes_need_every_key() {
        let metric = gauge_metric(
            "g",
            vec![
                number_point(vec![string_attr("a", "1"), int_attr("b", 2)], 1.0),
                number_point(vec![string_attr("a", "1")], 1.0),
                number_point(vec![int_attr("b", 2)], 1.0),
                number_point(vec![string_attr("a", "1"), int_attr("b", 3)], 1.0),
            ],
        );
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![resource_metrics(
                vec![string_attr("host.name", "n")],
                vec![metric],
            )],
        };
        let yaml = "datapoint_attributes: {a: ['1'], b: [2]}";
        let out = filter(&format!("include: {{{yaml}}}"), request.clone()).unwrap();
        assert_eq!(points(&out), ["n g a=1,b=2"]);
        let out = filter(&format!("exclude: {{{yaml}}}"), request).unwrap();
        assert_eq!(points(&out), ["n g a=1", "n g b=2", "n g a=1,b=3"]);
    }

    #[test]
    fn datapoint_criteria_reach_every_metric_type() {
        let out = filter("include: {datapoint_attributes: {k: [v]}}", all_types()).unwrap();
        assert_eq!(
            points(&out),
            ["n g k=v", "n s k=v", "n h k=v", "n eh k=v", "n sm k=v"]
        );
        // Only the attribute-less point of the sum survives the exclude.
        let out = filter("exclude: {datapoint_attributes: {k: [v]}}", all_types()).unwrap();
        assert_eq!(points(&out), ["n s "]);
        assert_eq!(out.resource_metrics.len(), 1);
        assert_eq!(out.resource_metrics[0].scope_metrics.len(), 1);
        assert_eq!(out.resource_metrics[0].scope_metrics[0].metrics.len(), 1);
    }

    #[test]
    fn exclude_criteria_are_anded() {
        // Only the s0 points of metric 0 match both exclude criteria.
        let out = filter(
            r#"
exclude:
  metric_names: [process.metric.0]
  datapoint_attributes: {state: [s0]}
"#,
            request(1, 2, 2),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-0 process.metric.0 state=s1",
                "proc-0 process.metric.1 state=s0",
                "proc-0 process.metric.1 state=s1",
            ]
        );
        // Only metric 1 of proc-0 matches both.
        let out = filter(
            r#"
exclude:
  resource_attributes: {process.executable.name: [proc-0]}
  metric_names: [process.metric.1]
"#,
            request(2, 2, 1),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-0 process.metric.0 state=s0",
                "proc-1 process.metric.0 state=s0",
                "proc-1 process.metric.1 state=s0",
            ]
        );
        // Resource and data point criteria: s1 points of proc-1 only.
        let out = filter(
            r#"
exclude:
  resource_attributes: {process.executable.name: [proc-1]}
  datapoint_attributes: {state: [s1]}
"#,
            request(2, 1, 2),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-0 process.metric.0 state=s0",
                "proc-0 process.metric.0 state=s1",
                "proc-1 process.metric.0 state=s0",
            ]
        );
    }

    #[test]
    fn include_criteria_are_anded() {
        let out = filter(
            r#"
include:
  resource_attributes: {process.executable.name: [proc-1]}
  metric_names: [process.metric.0]
  datapoint_attributes: {state: [s1]}
"#,
            request(2, 2, 2),
        )
        .unwrap();
        assert_eq!(points(&out), ["proc-1 process.metric.0 state=s1"]);
    }

    #[test]
    fn include_and_exclude_at_different_levels() {
        let out = filter(
            r#"
include:
  resource_attributes: {process.executable.name: [proc-0, proc-1]}
exclude:
  datapoint_attributes: {state: [s0]}
"#,
            request(3, 1, 2),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-0 process.metric.0 state=s1",
                "proc-1 process.metric.0 state=s1"
            ]
        );
        let out = filter(
            r#"
include:
  datapoint_attributes: {state: [s0, s1]}
exclude:
  metric_names: [process.metric.1]
  datapoint_attributes: {state: [s1]}
"#,
            request(1, 2, 3),
        )
        .unwrap();
        assert_eq!(
            points(&out),
            [
                "proc-0 process.metric.0 state=s0",
                "proc-0 process.metric.0 state=s1",
                "proc-0 process.metric.1 state=s0",
            ]
        );
    }

    #[test]
    fn prunes_emptied_scopes_and_resources() {
        // proc-1 loses every point: its resource goes, proc-0 stays whole.
        let out = filter(
            r#"
exclude:
  resource_attributes: {process.executable.name: [proc-1]}
  datapoint_attributes: {state: ["*"]}
"#,
            request(2, 2, 2),
        )
        .unwrap();
        assert_eq!(out.resource_metrics.len(), 1);
        assert_eq!(out.resource_metrics[0].scope_metrics.len(), 1);
        assert_eq!(out.resource_metrics[0].scope_metrics[0].metrics.len(), 2);
        assert_eq!(crate::otlp::data_points(&out), 4);

        // A metric whose every point is dropped is removed, not left empty.
        let out = filter(
            "include: {datapoint_attributes: {state: [s0]}}",
            ExportMetricsServiceRequest {
                resource_metrics: vec![resource_metrics(
                    vec![],
                    vec![
                        sum_metric(
                            "a",
                            vec![number_point(vec![string_attr("state", "s0")], 1.0)],
                        ),
                        sum_metric(
                            "b",
                            vec![number_point(vec![string_attr("state", "s1")], 1.0)],
                        ),
                    ],
                )],
            },
        )
        .unwrap();
        assert_eq!(metric_names(&out), ["a"]);
    }

    #[test]
    fn resources_nothing_below_can_be_dropped_from_are_passed_on_whole() {
        // proc-1 carries an empty scope and a metric without points.
        let mut request = request(3, 1, 2);
        let rm = &mut request.resource_metrics[1];
        let mut empty = rm.scope_metrics[0].clone();
        empty.metrics.clear();
        rm.scope_metrics.push(empty);
        rm.scope_metrics[0]
            .metrics
            .push(gauge_metric("no points", vec![]));

        // Resource criteria only: proc-1 is kept as received, empty parts and all.
        let yaml = "exclude: {resource_attributes: {process.executable.name: [proc-0]}}";
        let out = run("filter", yaml, vec![Payload::Decoded(request.clone())]);
        assert_eq!(out[0].data_points(), 4);
        let out = out[0].clone().into_request().unwrap();
        let mut expected = request.clone();
        expected.resource_metrics.remove(0);
        assert_eq!(out, expected);

        // A data point criterion reaches into every resource: empty parts go.
        let yaml = "exclude: {datapoint_attributes: {state: [s9]}}";
        let out = filter(yaml, request.clone()).unwrap();
        assert_eq!(out.resource_metrics[1].scope_metrics.len(), 1);
        assert_eq!(metric_names(&out), ["process.metric.0"; 3]);
    }

    #[test]
    fn emits_nothing_when_everything_is_dropped() {
        let out = run(
            "filter/none",
            "include: {metric_names: [nothing]}",
            vec![
                Payload::Decoded(request(2, 2, 2)),
                Payload::Decoded(all_types()),
            ],
        );
        assert!(out.is_empty());
    }

    #[test]
    fn resource_without_resource_message() {
        let mut request = request(1, 1, 1);
        request.resource_metrics[0].resource = None;
        // No attributes: an include on them drops it, an exclude on them keeps it.
        assert!(filter(
            "include: {resource_attributes: {host.name: ['*']}}",
            request.clone()
        )
        .is_none());
        let out = filter(
            "exclude: {resource_attributes: {host.name: ['*']}}",
            request,
        )
        .unwrap();
        assert_eq!(points(&out), ["- process.metric.0 state=s0"]);
    }

    #[test]
    fn shared_batch_is_passed_on_untouched_when_nothing_is_dropped() {
        let batch = Arc::new(Batch::from_request(request(2, 2, 2)));
        let yaml = "exclude: {metric_names: [nothing]}";
        let out = run("filter", yaml, vec![Payload::Shared(Arc::clone(&batch))]);
        assert_eq!(out.len(), 1);
        match &out[0] {
            Payload::Shared(shared) => assert!(Arc::ptr_eq(shared, &batch)),
            other => panic!("expected the shared batch, got {other:?}"),
        }

        // Something dropped: a private, filtered copy; the shared batch is untouched.
        let out = run(
            "filter",
            "exclude: {datapoint_attributes: {state: [s1]}}",
            vec![Payload::Shared(Arc::clone(&batch))],
        );
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Payload::Encoded { .. }));
        assert_eq!(out[0].data_points(), 4);
        assert_eq!(batch.decoded().unwrap(), &request(2, 2, 2));
    }

    #[test]
    fn encoded_payloads_are_decoded_and_filtered() {
        let request = request(1, 3, 1);
        let bytes = bytes::Bytes::from(prost::Message::encode_to_vec(&request));
        let out = run(
            "filter",
            "exclude: {metric_names: [process.metric.1]}",
            vec![Payload::Encoded {
                bytes,
                data_points: 3,
            }],
        );
        assert_eq!(out.len(), 1);
        let out = out.into_iter().next().unwrap().into_request().unwrap();
        assert_eq!(metric_names(&out), ["process.metric.0", "process.metric.2"]);
    }

    #[test]
    fn undecodable_payload_is_an_error() {
        let id = crate::config::ComponentId::parse("filter").unwrap();
        let config = parse(serde_yaml::from_str("exclude: {metric_names: [x]}").unwrap()).unwrap();
        let mut processor = crate::processor::state::standalone(config.as_ref(), "test", &id);
        let mut out = Vec::new();
        let garbage = Payload::Encoded {
            bytes: bytes::Bytes::from_static(&[0xff, 0xff, 0xff]),
            data_points: 1,
        };
        assert!(matches!(
            processor.process(garbage, &mut out),
            Err(ProcessError::Wire(_))
        ));
        assert!(out.is_empty());
    }

    fn paths(yaml: &str) -> Vec<String> {
        parse_issues("filter/x", yaml)
            .into_iter()
            .map(|i| i.path)
            .collect()
    }

    #[test]
    fn bad_patterns_are_reported_with_their_paths() {
        let issues = parse_issues(
            "filter/x",
            r#"
include:
  metric_names: ["ok", "ok.*", "regex:(", "[z-a]"]
exclude:
  resource_attributes:
    process.executable.name: ["regex:[", "fine"]
  datapoint_attributes:
    state: ["regex:^ok$", "a[b"]
"#,
        );
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "include.metric_names[2]",
                "include.metric_names[3]",
                "exclude.resource_attributes.process.executable.name[0]",
                "exclude.datapoint_attributes.state[1]",
            ]
        );
        assert!(
            issues[0].message.starts_with("invalid regex \"(\": "),
            "{}",
            issues[0].message
        );
        assert!(
            issues[1].message.starts_with("invalid glob \"[z-a]\": "),
            "{}",
            issues[1].message
        );
    }

    #[test]
    fn empty_configs_and_lists_are_rejected() {
        assert_eq!(paths("{}"), [""]);
        assert_eq!(paths("include:"), ["include"]);
        assert_eq!(paths("include: {}\nexclude: {}"), ["include", "exclude"]);
        assert_eq!(
            paths("include: {metric_names: []}\nexclude: {metric_names: ~}"),
            ["include.metric_names", "exclude.metric_names"]
        );
        assert_eq!(
            paths("include: {resource_attributes: {}, datapoint_attributes: {state: []}}"),
            [
                "include.resource_attributes",
                "include.datapoint_attributes.state"
            ]
        );
        assert_eq!(
            paths("exclude: {resource_attributes: {'': [x]}}"),
            ["exclude.resource_attributes"]
        );
    }

    #[test]
    fn unknown_and_mistyped_keys_are_rejected() {
        let issues = parse_issues("filter/x", "include: {metric_name: [x]}");
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].path, "include.metric_name");
        assert!(
            issues[0].message.contains("unknown field"),
            "{}",
            issues[0].message
        );

        assert_eq!(paths("includes: {metric_names: [x]}"), ["includes"]);
        assert_eq!(
            paths("include: {metric_names: [x, [y]]}"),
            ["include.metric_names[1]"]
        );
        assert_eq!(
            paths("include: {metric_names: x}"),
            ["include.metric_names"]
        );
    }

    #[test]
    fn valid_config_parses() {
        assert!(paths(
            r#"
include:
  metric_names: ["process.cpu.time", "process.memory.*", "regex:^system\\."]
  resource_attributes: { process.executable.name: ["kubelet", "regex:^java"] }
  datapoint_attributes: { state: ["user", "system"] }
exclude:
  metric_names: ["process.cpu.time"]
"#
        )
        .is_empty());
    }

    fn random_patterns(rng: &mut rand::rngs::StdRng, pool: &[&str]) -> serde_json::Value {
        use rand::seq::IndexedRandom;
        use rand::Rng;
        (0..rng.random_range(1..3))
            .map(|_| serde_json::Value::from(*pool.choose(rng).unwrap()))
            .collect()
    }

    /// A random `include` or `exclude` block with a non-empty random set of criteria drawn
    /// from what random requests hold.
    fn random_block(rng: &mut rand::rngs::StdRng) -> serde_json::Value {
        use crate::otlp::rewrite::tests::{KEYS, NAMES, STRINGS};
        use rand::seq::IndexedRandom;
        use rand::Rng;
        let names: Vec<&str> = NAMES
            .iter()
            .copied()
            .chain([
                "cpu.*",
                "*",
                "m?m.rss",
                "regex:^cpu",
                "regex:rss$",
                "regex:^$",
            ])
            .collect();
        let values: Vec<&str> = STRINGS
            .iter()
            .copied()
            .chain([
                "-12",
                "1234",
                "0.5",
                "2",
                "inf",
                "false",
                "s*",
                "node-?",
                "regex:^node",
                "regex:1",
                "*",
            ])
            .collect();
        let mut block = serde_json::Map::new();
        while block.is_empty() {
            if rng.random_ratio(1, 2) {
                block.insert("metric_names".into(), random_patterns(rng, &names));
            }
            for criterion in ["resource_attributes", "datapoint_attributes"] {
                if rng.random_ratio(1, 2) {
                    let mut keys = serde_json::Map::new();
                    for _ in 0..rng.random_range(1..3) {
                        let key = KEYS.choose(rng).unwrap().to_string();
                        keys.insert(key, random_patterns(rng, &values));
                    }
                    block.insert(criterion.into(), keys.into());
                }
            }
        }
        serde_json::Value::Object(block)
    }

    /// A random filter config: include, exclude or both. JSON is YAML.
    fn random_config(rng: &mut rand::rngs::StdRng) -> String {
        use rand::Rng;
        let mut config = serde_json::Map::new();
        // Include blocks ANDing several random criteria keep little: exclude-only configs
        // are drawn more often, so that as many requests change as are emptied.
        let which = rng.random_range(0..4);
        if which == 0 || which == 3 {
            config.insert("include".into(), random_block(rng));
        }
        if which != 0 {
            config.insert("exclude".into(), random_block(rng));
        }
        serde_json::Value::Object(config).to_string()
    }

    /// As the last processor of a pipeline, the filter reports the series of its output as a
    /// meter walking it would find them, on random requests and configs.
    #[test]
    fn metered_output_has_the_series_a_walk_finds() {
        use crate::otlp::rewrite::tests::{random_request, shared};
        use crate::processor::test_util::assert_metered_as_walked;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4d45_5445);
        let mut series = 0;
        for round in 0..3000 {
            let yaml = random_config(&mut rng);
            let request = random_request(&mut rng);
            let input = match round % 3 {
                0 => shared(&request),
                1 => Payload::Encoded {
                    bytes: bytes::Bytes::from(prost::Message::encode_to_vec(&request)),
                    data_points: crate::otlp::data_points(&request),
                },
                _ => Payload::Decoded(request),
            };
            series += assert_metered_as_walked("filter", &yaml, input);
        }
        assert!(series > 3_000, "{series} series");
    }

    /// A filter fused with the `attributes` processor after it gives what the two give one
    /// after the other, and meters its output exactly, on random configs and requests.
    #[test]
    fn fused_with_attributes_equals_one_after_the_other() {
        use crate::otlp::rewrite::tests::{random_request, shared};
        use crate::processor::test_util::fused;
        use crate::stats::{for_each_series, series_hash_state, SeriesSink};
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4655_5345);
        let state = series_hash_state();
        let (mut changed, mut emptied) = (0, 0);
        for round in 0..3000 {
            let yaml = random_config(&mut rng);
            let then_yaml = crate::processor::attributes::tests::random_config(&mut rng);
            let request = random_request(&mut rng);
            let expected: Vec<_> = run(
                "attributes",
                &then_yaml,
                run("filter", &yaml, vec![shared(&request)]),
            )
            .into_iter()
            .map(|p| p.into_request().unwrap())
            .collect();
            let mut processor = fused("filter", &yaml, "attributes", &then_yaml).unwrap();
            let input = match round % 2 {
                0 => shared(&request),
                _ => Payload::Decoded(request.clone()),
            };
            let mut reported = Vec::new();
            let mut out = Vec::new();
            let metered = processor
                .process_metered(input, &mut out, &mut SeriesSink::new(&state, &mut reported))
                .unwrap();
            assert!(metered);
            let mut walked = Vec::new();
            let got: Vec<_> = out
                .into_iter()
                .map(|p| {
                    for_each_series(&state, &p.clone().into_bytes(), |s| walked.push(s)).unwrap();
                    let points = p.data_points();
                    let got = p.into_request().unwrap();
                    assert_eq!(points, crate::otlp::data_points(&got));
                    got
                })
                .collect();
            assert_eq!(got, expected, "{yaml}\n{then_yaml}\n{request:?}");
            reported.sort_unstable();
            walked.sort_unstable();
            assert_eq!(reported, walked, "{yaml}\n{then_yaml}");
            match got.first() {
                None => emptied += 1,
                Some(got) => changed += usize::from(*got != request),
            }
        }
        assert!(
            changed > 500 && emptied > 300,
            "{changed} changed, {emptied} emptied"
        );
    }

    /// The wire-level filter gives what the struct-level filter it replaced gives, on random
    /// requests and configs, whatever form the payload comes in.
    #[test]
    fn wire_filter_equals_the_struct_filter() {
        use crate::otlp::rewrite::tests::{random_request, shared};
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4649_4c54);
        let mut changed = 0;
        let mut emptied = 0;
        for round in 0..6000 {
            let yaml = random_config(&mut rng);
            let raw: RawFilterConfig = serde_yaml::from_str(&yaml).unwrap();
            let mut issues = Vec::new();
            let reference = Filter {
                include: raw
                    .include
                    .as_ref()
                    .and_then(|c| c.compile("include", &mut issues)),
                exclude: raw
                    .exclude
                    .as_ref()
                    .and_then(|c| c.compile("exclude", &mut issues)),
            };
            assert!(issues.is_empty(), "{yaml}: {issues:?}");
            let request = random_request(&mut rng);
            let mut expected = request.clone();
            oracle::apply(&reference, &mut expected);

            let input = match round % 3 {
                0 => shared(&request),
                1 => Payload::Encoded {
                    bytes: bytes::Bytes::from(prost::Message::encode_to_vec(&request)),
                    data_points: crate::otlp::data_points(&request),
                },
                _ => Payload::Decoded(request.clone()),
            };
            let mut out = run("filter", &yaml, vec![input]);
            assert!(out.len() <= 1);
            match out.pop() {
                None => {
                    assert!(expected.resource_metrics.is_empty(), "{yaml}\n{request:?}");
                    emptied += 1;
                }
                Some(payload) => {
                    let points = payload.data_points();
                    let got = payload.into_request().unwrap();
                    assert_eq!(got, expected, "{yaml}\n{request:?}");
                    assert_eq!(points, crate::otlp::data_points(&got));
                    changed += usize::from(got != request);
                }
            }
        }
        // The random configs do exercise the filter.
        assert!(
            changed > 500 && emptied > 500,
            "{changed} changed, {emptied} emptied"
        );
    }
}
