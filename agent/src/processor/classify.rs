//! `classify`: ordered rules that set one attribute (e.g. `phoenix.priority`) from the values
//! of others, so that filters, top-k and aggregation can protect a class of processes by one
//! name instead of repeating the same patterns in each.
//!
//! The first rule whose patterns all match decides the value; `default` applies when none
//! does. Rules see resource attributes (`on: resource`, the default: process identity lives
//! there) or each data point's attributes with its resource's as fallback (`on: datapoint`).
//!
//! On resources the processor works on the encoded request ([`rewrite`]): only the
//! resources it changes are re-encoded, the rest is copied, and nothing is decoded.

use std::sync::Arc;

use indexmap::IndexMap;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use serde::Deserialize;
use serde_yaml::Value;

use super::pattern::{
    self, find_attribute as find, value_text, AttributeCriterion, Matcher, PatternText,
};
use super::{BuildContext, ProcessError, Processor, ProcessorConfig, ProcessorFactory};
use crate::config::{self, Issue};
use crate::otlp::rewrite::{
    self, put_len_field, Attributes, Edit, KeyValueRef, MetricEdit, PointEdit, ResourceEdit, Spans,
    Value as WireValue,
};
use crate::otlp::wire::WireError;
use crate::otlp::Payload;

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "classify",
    parse,
};

/// Config of the `classify` processor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassifyConfig {
    /// The attribute the matching rule sets (overwriting any value it had).
    attribute: String,
    /// Tried in order; the first whose patterns all match sets the attribute.
    rules: Vec<RawRule>,
    /// The value when no rule matches; without it the attribute is left as it is.
    #[serde(default)]
    default: Option<PatternText>,
    /// Whose attributes the rules read and which ones get the attribute.
    #[serde(default)]
    on: Target,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    /// Attribute key to pattern(s); all keys must match, a key with several patterns
    /// matches when any of them does.
    #[serde(rename = "match")]
    matches: IndexMap<String, OneOrMany>,
    value: PatternText,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a pattern or a list of patterns")]
enum OneOrMany {
    One(PatternText),
    Many(Vec<PatternText>),
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Target {
    #[default]
    Resource,
    Datapoint,
}

#[derive(Debug)]
struct Rule {
    criteria: Vec<AttributeCriterion>,
    value: String,
}

#[derive(Debug)]
struct ClassifyConfig {
    attribute: String,
    rules: Vec<Rule>,
    default: Option<String>,
    on: Target,
}

fn parse(value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let raw: RawClassifyConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    if raw.attribute.is_empty() {
        issues.push(Issue::new("attribute", "must not be empty"));
    }
    if raw.rules.is_empty() {
        issues.push(Issue::new("rules", "must list at least one rule"));
    }
    let mut rules = Vec::new();
    for (i, rule) in raw.rules.iter().enumerate() {
        let path = format!("rules[{i}].match");
        if rule.matches.is_empty() {
            issues.push(Issue::new(&path, "must name at least one attribute"));
        }
        let mut criteria = Vec::new();
        for (key, patterns) in &rule.matches {
            let patterns = match patterns {
                OneOrMany::One(p) => std::slice::from_ref(p),
                OneOrMany::Many(list) => list.as_slice(),
            };
            if let Some(matcher) = Matcher::compile(patterns, &format!("{path}.{key}"), &mut issues)
            {
                criteria.push(AttributeCriterion {
                    key: key.clone(),
                    values: matcher,
                });
            }
        }
        rules.push(Rule {
            criteria,
            value: rule.value.0.clone(),
        });
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Arc::new(Shared(Arc::new(ClassifyConfig {
        attribute: raw.attribute,
        rules,
        default: raw.default.map(|d| d.0),
        on: raw.on,
    }))))
}

impl ProcessorConfig for Shared {
    /// Only `on: datapoint` reads the decoded form.
    fn reads_decoded(&self) -> bool {
        self.0.on == Target::Datapoint
    }

    fn build(&self, _context: &mut BuildContext<'_>) -> Box<dyn Processor> {
        Box::new(Classifier {
            config: Arc::clone(&self.0),
            scratch: String::new(),
        })
    }
}

/// The compiled config, shared by every instance built from it.
#[derive(Debug)]
struct Shared(Arc<ClassifyConfig>);

struct Classifier {
    config: Arc<ClassifyConfig>,
    scratch: String,
}

impl ClassifyConfig {
    /// The value for attributes `primary`, falling back to `fallback` for absent keys.
    fn classify(
        &self,
        primary: &[KeyValue],
        fallback: &[KeyValue],
        scratch: &mut String,
    ) -> Option<&str> {
        let rule = self.rules.iter().find(|rule| {
            rule.criteria.iter().all(|criterion| {
                let key = &criterion.key;
                let value = find(primary, key).or_else(|| find(fallback, key));
                value_text(value, scratch).is_some_and(|text| criterion.values.is_match(text))
            })
        });
        rule.map(|r| r.value.as_str()).or(self.default.as_deref())
    }

    /// [`ClassifyConfig::classify`] of an encoded resource's attributes.
    fn classify_encoded(
        &self,
        attributes: Attributes<'_>,
        scratch: &mut String,
    ) -> Result<Option<&str>, WireError> {
        for rule in &self.rules {
            if pattern::all_match(&rule.criteria, attributes, scratch)? {
                return Ok(Some(&rule.value));
            }
        }
        Ok(self.default.as_deref())
    }
}

fn upsert(attributes: &mut Vec<KeyValue>, key: &str, value: &str) {
    let value = Some(AnyValue {
        value: Some(any_value::Value::StringValue(value.to_string())),
    });
    match attributes.iter_mut().find(|kv| kv.key == key) {
        Some(kv) => kv.value = value,
        None => attributes.push(KeyValue {
            key: key.to_string(),
            value,
            ..Default::default()
        }),
    }
}

fn point_attributes(data: &mut Data) -> Vec<&mut Vec<KeyValue>> {
    match data {
        Data::Gauge(g) => g
            .data_points
            .iter_mut()
            .map(|p| &mut p.attributes)
            .collect(),
        Data::Sum(s) => s
            .data_points
            .iter_mut()
            .map(|p| &mut p.attributes)
            .collect(),
        Data::Histogram(h) => h
            .data_points
            .iter_mut()
            .map(|p| &mut p.attributes)
            .collect(),
        Data::ExponentialHistogram(h) => h
            .data_points
            .iter_mut()
            .map(|p| &mut p.attributes)
            .collect(),
        Data::Summary(s) => s
            .data_points
            .iter_mut()
            .map(|p| &mut p.attributes)
            .collect(),
    }
}

/// `on: resource` as the wire-level rewrite asks for it: a resource whose value changes is
/// rewritten with the attribute set in place (or added last), everything else is copied.
struct ClassifyEdit<'a> {
    config: &'a ClassifyConfig,
    scratch: &'a mut String,
    /// The value the resource being rewritten gets.
    value: &'a str,
    /// Reused for encoding the new attribute.
    any_value: Vec<u8>,
    key_value: Vec<u8>,
}

impl ClassifyEdit<'_> {
    fn put_attribute(&mut self, out: &mut Vec<u8>) {
        self.any_value.clear();
        put_len_field(
            &mut self.any_value,
            rewrite::ANY_VALUE_STRING,
            self.value.as_bytes(),
        );
        self.key_value.clear();
        put_len_field(
            &mut self.key_value,
            rewrite::KEY_VALUE_KEY,
            self.config.attribute.as_bytes(),
        );
        put_len_field(
            &mut self.key_value,
            rewrite::KEY_VALUE_VALUE,
            &self.any_value,
        );
        put_len_field(out, rewrite::RESOURCE_ATTRIBUTES, &self.key_value);
    }
}

impl Edit for ClassifyEdit<'_> {
    type Resource = ();
    type Point = ();
    const PRUNE: bool = false;

    fn resource(&mut self, resource: Option<&[u8]>) -> Result<ResourceEdit<()>, WireError> {
        let attributes = Attributes::of_resource(resource.unwrap_or_default());
        let Some(value) = self.config.classify_encoded(attributes, self.scratch)? else {
            return Ok(ResourceEdit::Keep(()));
        };
        // Already set so (a second classify, a resend): nothing to rewrite.
        if let Some(current) = attributes.find(self.config.attribute.as_bytes())? {
            if current.value()? == WireValue::String(value.as_bytes()) {
                return Ok(ResourceEdit::Keep(()));
            }
        }
        self.value = value;
        Ok(ResourceEdit::Rewrite(()))
    }

    fn write_resource(
        &mut self,
        resource: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let resource = resource.unwrap_or_default();
        let key = self.config.attribute.as_bytes();
        let mut replaced = false;
        for field in Spans::new(resource) {
            let field = field?;
            let is_it = !replaced
                && field.number == rewrite::RESOURCE_ATTRIBUTES
                && field.wire_type == rewrite::WT_LEN
                && KeyValueRef::parse(field.body)?.key == key;
            if is_it {
                // The first attribute of that key gets the value, as the decoded path does.
                self.put_attribute(out);
                replaced = true;
            } else {
                let bytes = resource
                    .get(field.start..field.end)
                    .ok_or(WireError::Truncated("resource"))?;
                out.extend_from_slice(bytes);
            }
        }
        if !replaced {
            self.put_attribute(out);
        }
        Ok(())
    }

    fn descends(&self, _: ()) -> bool {
        false
    }

    fn reads_metric_names(&self, _: ()) -> bool {
        false
    }

    fn metric(&mut self, _: (), _name: &str) -> MetricEdit<()> {
        MetricEdit::KeepAll
    }

    fn point(&mut self, _: (), _attributes: Attributes<'_>) -> Result<PointEdit, WireError> {
        Ok(PointEdit::Keep)
    }

    fn keep_attribute(&mut self, _: bool, _: KeyValueRef<'_>) -> Result<bool, WireError> {
        Ok(true)
    }

    fn write_point(
        &mut self,
        _: (),
        point: &[u8],
        _attribute_field: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        out.extend_from_slice(point);
        Ok(())
    }
}

impl Processor for Classifier {
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError> {
        if self.config.on == Target::Resource && !matches!(input, Payload::Decoded(_)) {
            let mut edit = ClassifyEdit {
                config: &self.config,
                scratch: &mut self.scratch,
                value: "",
                any_value: Vec::new(),
                key_value: Vec::new(),
            };
            out.push(rewrite::rewrite_payload(input, &mut edit)?.payload);
            return Ok(());
        }
        let mut request = input.into_request()?;
        let config = &self.config;
        for rm in &mut request.resource_metrics {
            let resource = rm.resource.get_or_insert_with(Default::default);
            match config.on {
                Target::Resource => {
                    if let Some(value) =
                        config.classify(&resource.attributes, &[], &mut self.scratch)
                    {
                        let value = value.to_string();
                        upsert(&mut resource.attributes, &config.attribute, &value);
                    }
                }
                Target::Datapoint => {
                    let resource_attributes = &resource.attributes;
                    for sm in &mut rm.scope_metrics {
                        for metric in &mut sm.metrics {
                            let Some(data) = metric.data.as_mut() else {
                                continue;
                            };
                            for attributes in point_attributes(data) {
                                if let Some(value) = config.classify(
                                    attributes,
                                    resource_attributes,
                                    &mut self.scratch,
                                ) {
                                    let value = value.to_string();
                                    upsert(attributes, &config.attribute, &value);
                                }
                            }
                        }
                    }
                }
            }
        }
        out.push(Payload::Decoded(request));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::testdata::{
        gauge_metric, int_attr, number_point, resource_metrics, string_attr,
    };
    use crate::otlp::ExportMetricsServiceRequest;
    use crate::processor::test_util::{parse_issues, run};

    const PRIORITY: &str = r#"
attribute: phoenix.priority
rules:
  - { match: { process.executable.name: "regex:^(kubelet|containerd|postgres|nginx)$" }, value: critical }
  - { match: { process.executable.name: "java*", process.owner: [app, svc] }, value: high }
  - { match: { process.pid: 1 }, value: init }
default: normal
"#;

    fn process(name: &str, owner: &str, pid: i64) -> Vec<KeyValue> {
        vec![
            string_attr("process.executable.name", name),
            string_attr("process.owner", owner),
            int_attr("process.pid", pid),
        ]
    }

    fn request(resources: Vec<Vec<KeyValue>>) -> Payload {
        Payload::Decoded(ExportMetricsServiceRequest {
            resource_metrics: resources
                .into_iter()
                .map(|attrs| {
                    resource_metrics(
                        attrs,
                        vec![gauge_metric(
                            "process.threads",
                            vec![number_point(vec![string_attr("state", "running")], 1.0)],
                        )],
                    )
                })
                .collect(),
        })
    }

    fn resource_values(out: Vec<Payload>, key: &str) -> Vec<Option<String>> {
        let request = out.into_iter().next().unwrap().into_request().unwrap();
        request
            .resource_metrics
            .iter()
            .map(|rm| {
                let attrs = &rm.resource.as_ref().unwrap().attributes;
                let mut scratch = String::new();
                value_text(find(attrs, key), &mut scratch).map(str::to_string)
            })
            .collect()
    }

    #[test]
    fn the_first_matching_rule_wins_and_default_covers_the_rest() {
        let out = run(
            "classify/priority",
            PRIORITY,
            vec![request(vec![
                process("kubelet", "root", 812),
                process("java-app", "app", 4000),
                process("java-app", "root", 4001), // owner does not match: not high
                process("postgres", "app", 1),     // critical comes before init
                process("systemd", "root", 1),
                process("bash", "me", 777),
            ])],
        );
        let values: Vec<_> = resource_values(out, "phoenix.priority")
            .into_iter()
            .map(Option::unwrap)
            .collect();
        assert_eq!(
            values,
            ["critical", "high", "normal", "critical", "init", "normal"]
        );
    }

    #[test]
    fn without_default_unmatched_resources_are_left_alone_and_existing_values_are_overwritten() {
        let yaml =
            "attribute: tier\nrules: [{ match: { process.executable.name: nginx }, value: edge }]";
        let mut nginx = process("nginx", "www", 10);
        nginx.push(string_attr("tier", "old"));
        let out = run(
            "classify",
            yaml,
            vec![request(vec![nginx, process("bash", "me", 2)])],
        );
        assert_eq!(
            resource_values(out, "tier"),
            [Some("edge".to_string()), None]
        );
    }

    #[test]
    fn on_datapoint_reads_point_attributes_then_the_resource() {
        let yaml = r#"
attribute: phoenix.class
on: datapoint
rules:
  - { match: { state: running, process.executable.name: nginx }, value: busy-edge }
  - { match: { state: running }, value: busy }
"#;
        let out = run(
            "classify",
            yaml,
            vec![request(vec![
                process("nginx", "www", 10),
                process("bash", "me", 2),
            ])],
        );
        let request = out.into_iter().next().unwrap().into_request().unwrap();
        let classes: Vec<String> = request
            .resource_metrics
            .iter()
            .map(|rm| {
                assert!(find(&rm.resource.as_ref().unwrap().attributes, "phoenix.class").is_none());
                let Some(Data::Gauge(g)) = &rm.scope_metrics[0].metrics[0].data else {
                    panic!("gauge expected")
                };
                let mut scratch = String::new();
                value_text(
                    find(&g.data_points[0].attributes, "phoenix.class"),
                    &mut scratch,
                )
                .unwrap()
                .to_string()
            })
            .collect();
        assert_eq!(classes, ["busy-edge", "busy"]);
    }

    /// Encoded input takes the wire path, and decodes to what the decoded path makes.
    #[test]
    fn encoded_requests_are_classified_as_decoded_ones_are() {
        use prost::Message;
        let mut relabelled = process("nginx", "www", 10);
        relabelled.insert(0, string_attr("phoenix.priority", "normal"));
        let mut already = process("kubelet", "root", 5);
        already.push(string_attr("phoenix.priority", "critical"));
        let Payload::Decoded(mut input) = request(vec![
            process("kubelet", "root", 812),
            process("java-app", "app", 4000),
            process("bash", "me", 777),
            relabelled,
            already,
            vec![],
        ]) else {
            unreachable!()
        };
        // A ResourceMetrics without a resource gets one holding the default.
        input.resource_metrics[5].resource = None;
        let encoded = Payload::Encoded {
            bytes: input.encode_to_vec().into(),
            data_points: 6,
        };
        let from_decoded = run("classify/priority", PRIORITY, vec![Payload::Decoded(input)]);
        let from_encoded = run("classify/priority", PRIORITY, vec![encoded]);
        assert!(matches!(from_encoded[..], [Payload::Encoded { .. }]));
        let decoded = |out: &[Payload]| out[0].clone().into_request().unwrap();
        assert_eq!(decoded(&from_encoded), decoded(&from_decoded));
        assert_eq!(
            resource_values(from_encoded, "phoenix.priority"),
            ["critical", "high", "normal", "critical", "critical", "normal"]
                .map(|v| Some(v.to_string()))
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let issues = parse_issues(
            "classify",
            "attribute: p\nrules: [{ match: { a: \"regex:(\" }, value: x }, { match: {}, value: y }]",
        );
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["rules[0].match.a[0]", "rules[1].match"],
            "{issues:?}"
        );
        let issues = parse_issues("classify", "attribute: p\nrules: []\nbogus: 1");
        assert!(issues[0].to_string().contains("bogus"), "{issues:?}");
        let issues = parse_issues("classify", "attribute: ''\nrules: []");
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["attribute", "rules"]);
        let issues = parse_issues(
            "classify",
            "attribute: p\non: everywhere\nrules: [{ match: { a: b }, value: c }]",
        );
        assert!(issues[0].path.starts_with("on"), "{issues:?}");
    }
}
