//! The metrics the hostmetrics scrapers emit, declared once with the Collector's names,
//! units, types and attributes. The scrapers build their metrics from these definitions,
//! the tests check decoded output against them, and `docs/hostmetrics.md` holds the table
//! [`reference_markdown`] renders (a test fails when it is stale).

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Gauge, Metric, NumberDataPoint, Sum,
};

/// How a metric aggregates; every sum the scrapers emit is cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sum { monotonic: bool },
    Gauge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Int,
    Double,
}

/// One emitted metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub scraper: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
    pub value: ValueType,
    /// Data point attribute keys.
    pub attributes: &'static [&'static str],
    pub enabled_by_default: bool,
}

impl MetricDef {
    /// An empty metric of this definition, ready for data points.
    pub fn new_metric(&self, points: usize) -> Metric {
        let data_points = Vec::with_capacity(points);
        let data = match self.kind {
            Kind::Sum { monotonic } => Data::Sum(Sum {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: monotonic,
            }),
            Kind::Gauge => Data::Gauge(Gauge { data_points }),
        };
        Metric {
            name: self.name.to_string(),
            description: self.description.to_string(),
            unit: self.unit.to_string(),
            data: Some(data),
            ..Default::default()
        }
    }

    /// A data point of this metric's value type; `value` is converted when the type is int.
    pub fn point(
        &self,
        start: u64,
        time: u64,
        value: f64,
        attributes: Vec<KeyValue>,
    ) -> NumberDataPoint {
        let value = match self.value {
            ValueType::Double => number_data_point::Value::AsDouble(value),
            ValueType::Int => number_data_point::Value::AsInt(value as i64),
        };
        NumberDataPoint {
            attributes,
            start_time_unix_nano: match self.kind {
                Kind::Sum { .. } => start,
                Kind::Gauge => 0,
            },
            time_unix_nano: time,
            value: Some(value),
            ..Default::default()
        }
    }

    /// An int data point without going through `f64`, for counters that may exceed 2^53.
    pub fn int_point(
        &self,
        start: u64,
        time: u64,
        value: u64,
        attributes: Vec<KeyValue>,
    ) -> NumberDataPoint {
        let mut point = self.point(start, time, 0.0, attributes);
        point.value = Some(match self.value {
            ValueType::Int => {
                number_data_point::Value::AsInt(i64::try_from(value).unwrap_or(i64::MAX))
            }
            ValueType::Double => number_data_point::Value::AsDouble(value as f64),
        });
        point
    }
}

/// Appends `point` to `metric`'s data points.
pub fn push_point(metric: &mut Metric, point: NumberDataPoint) {
    match metric.data.as_mut() {
        Some(Data::Sum(sum)) => sum.data_points.push(point),
        Some(Data::Gauge(gauge)) => gauge.data_points.push(point),
        _ => {}
    }
}

pub fn str_attr(key: &'static str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

pub fn int_attr(key: &'static str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

const fn sum(monotonic: bool) -> Kind {
    Kind::Sum { monotonic }
}

macro_rules! defs {
    ($($const:ident = $scraper:literal, $name:literal, $unit:literal, $kind:expr, $value:ident, [$($attr:literal),*], $enabled:literal, $desc:literal;)*) => {
        $(pub const $const: MetricDef = MetricDef {
            scraper: $scraper,
            name: $name,
            description: $desc,
            unit: $unit,
            kind: $kind,
            value: ValueType::$value,
            attributes: &[$($attr),*],
            enabled_by_default: $enabled,
        };)*
        /// Every metric, in the order of the reference table.
        pub const METRICS: &[MetricDef] = &[$($const),*];
    };
}

defs! {
    SYSTEM_CPU_TIME = "cpu", "system.cpu.time", "s", sum(true), Double, ["cpu", "state"], true,
        "Total seconds each logical CPU spent on each mode.";
    SYSTEM_CPU_LOGICAL_COUNT = "cpu", "system.cpu.logical.count", "{cpu}", sum(false), Int, [], false,
        "Number of available logical CPUs.";
    SYSTEM_MEMORY_USAGE = "memory", "system.memory.usage", "By", sum(false), Int, ["state"], true,
        "Bytes of memory in use.";
    SYSTEM_MEMORY_UTILIZATION = "memory", "system.memory.utilization", "1", Kind::Gauge, Double, ["state"], false,
        "Percentage of memory bytes in use.";
    SYSTEM_LOAD_1M = "load", "system.cpu.load_average.1m", "{thread}", Kind::Gauge, Double, [], true,
        "Average CPU Load over 1 minute.";
    SYSTEM_LOAD_5M = "load", "system.cpu.load_average.5m", "{thread}", Kind::Gauge, Double, [], true,
        "Average CPU Load over 5 minutes.";
    SYSTEM_LOAD_15M = "load", "system.cpu.load_average.15m", "{thread}", Kind::Gauge, Double, [], true,
        "Average CPU Load over 15 minutes.";
    SYSTEM_NETWORK_IO = "network", "system.network.io", "By", sum(true), Int, ["device", "direction"], true,
        "The number of bytes transmitted and received.";
    SYSTEM_NETWORK_PACKETS = "network", "system.network.packets", "{packets}", sum(true), Int, ["device", "direction"], true,
        "The number of packets transferred.";
    SYSTEM_NETWORK_ERRORS = "network", "system.network.errors", "{errors}", sum(true), Int, ["device", "direction"], true,
        "The number of errors encountered.";
    SYSTEM_NETWORK_DROPPED = "network", "system.network.dropped", "{packets}", sum(true), Int, ["device", "direction"], true,
        "The number of packets dropped.";
    PROCESS_CPU_TIME = "process", "process.cpu.time", "s", sum(true), Double, ["state"], true,
        "Total CPU seconds broken down by different states.";
    PROCESS_CPU_UTILIZATION = "process", "process.cpu.utilization", "1", Kind::Gauge, Double, ["state"], false,
        "Percentage of total CPU time used by the process since last scrape, expressed as a value between 0 and 1. On the first scrape, no data point is emitted for this metric.";
    PROCESS_MEMORY_USAGE = "process", "process.memory.usage", "By", sum(false), Int, [], true,
        "The amount of physical memory in use.";
    PROCESS_MEMORY_VIRTUAL = "process", "process.memory.virtual", "By", sum(false), Int, [], true,
        "Virtual memory size.";
    PROCESS_MEMORY_UTILIZATION = "process", "process.memory.utilization", "1", Kind::Gauge, Double, [], false,
        "Percentage of total physical memory that is used by the process.";
    PROCESS_DISK_IO = "process", "process.disk.io", "By", sum(true), Int, ["direction"], true,
        "Disk bytes transferred.";
    PROCESS_DISK_OPERATIONS = "process", "process.disk.operations", "{operations}", sum(true), Int, ["direction"], false,
        "Number of disk operations performed by the process.";
    PROCESS_PAGING_FAULTS = "process", "process.paging.faults", "{faults}", sum(true), Int, ["type"], false,
        "Number of page faults the process has made.";
    PROCESS_SIGNALS_PENDING = "process", "process.signals_pending", "{signals}", sum(false), Int, [], false,
        "Number of pending signals for the process.";
    PROCESS_THREADS = "process", "process.threads", "{threads}", sum(false), Int, [], false,
        "Process threads count.";
    PROCESS_OPEN_FILE_DESCRIPTORS = "process", "process.open_file_descriptors", "{count}", sum(false), Int, [], false,
        "Number of file descriptors in use by the process.";
    PROCESS_CONTEXT_SWITCHES = "process", "process.context_switches", "{count}", sum(true), Int, ["type"], false,
        "Number of times the process has been context switched.";
    PROCESS_UPTIME = "process", "process.uptime", "s", Kind::Gauge, Double, [], false,
        "The time the process has been running.";
}

/// The metrics of one scraper.
pub fn of_scraper(scraper: &str) -> impl Iterator<Item = &'static MetricDef> + '_ {
    METRICS.iter().filter(move |d| d.scraper == scraper)
}

pub fn find(name: &str) -> Option<&'static MetricDef> {
    METRICS.iter().find(|d| d.name == name)
}

/// The process scraper's resource attributes: `(key, type, on by default)`.
pub const PROCESS_RESOURCE_ATTRIBUTES: &[(&str, &str, bool)] = &[
    ("process.pid", "int", true),
    ("process.parent_pid", "int", true),
    ("process.executable.name", "string", true),
    ("process.executable.path", "string", true),
    ("process.command", "string", true),
    ("process.command_line", "string", true),
    ("process.owner", "string", true),
];

pub const TABLE_BEGIN: &str =
    "<!-- metrics table: generated from agent/src/receiver/hostmetrics/metadata.rs -->\n";
pub const TABLE_END: &str = "<!-- end of metrics table -->\n";

/// The metrics table of `docs/hostmetrics.md`, between its markers.
pub fn reference_markdown() -> String {
    let mut out = String::from(TABLE_BEGIN);
    out.push_str("| scraper | metric | unit | type | value | monotonic | temporality | attributes | default |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for def in METRICS {
        let (kind, monotonic, temporality) = match def.kind {
            Kind::Sum { monotonic } => ("sum", if monotonic { "yes" } else { "no" }, "cumulative"),
            Kind::Gauge => ("gauge", "", ""),
        };
        let attributes = def
            .attributes
            .iter()
            .map(|a| format!("`{a}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| {} | `{}` | `{}` | {} | {} | {} | {} | {} | {} |\n",
            def.scraper,
            def.name,
            def.unit,
            kind,
            match def.value {
                ValueType::Int => "int",
                ValueType::Double => "double",
            },
            monotonic,
            temporality,
            attributes,
            if def.enabled_by_default { "on" } else { "off" },
        ));
    }
    out.push_str(TABLE_END);
    out
}
