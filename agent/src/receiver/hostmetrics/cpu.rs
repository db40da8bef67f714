//! `cpu` scraper: `system.cpu.time` per logical CPU and state, from `/proc/stat`.

use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use serde_yaml::Value;

use super::encode::RequestWriter;
use super::metadata::{self, push_point, str_attr};
use super::procfs::{self, FileBuf};
use super::{MetricSwitches, Reason, ScrapeContext, Scraper, Toggle};
use crate::config::{self, Issue};

const NAME: &str = "cpu";

/// `/proc/stat` columns after `cpuN`, in order, and the Collector's state for each;
/// `guest` and `guest_nice` are already counted in `user` and `nice`, so they are left out.
const STATES: [&str; 8] = [
    "user",
    "nice",
    "system",
    "idle",
    "wait",
    "interrupt",
    "softirq",
    "steal",
];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawCpuConfig {
    #[serde(default)]
    metrics: IndexMap<String, Toggle>,
}

#[derive(Debug)]
pub struct CpuSettings {
    metrics: MetricSwitches,
}

pub fn parse(value: Value, issues: &mut Vec<Issue>) -> Option<CpuSettings> {
    let raw: RawCpuConfig = config::deserialize(value)
        .map_err(|i| issues.push(i))
        .ok()?;
    Some(CpuSettings {
        metrics: MetricSwitches::resolve(NAME, &raw.metrics, "metrics", issues),
    })
}

pub struct CpuScraper {
    settings: Arc<CpuSettings>,
    path: std::path::PathBuf,
    buf: FileBuf,
}

impl CpuScraper {
    pub fn new(settings: Arc<CpuSettings>, proc_dir: &Path) -> Self {
        Self {
            settings,
            path: proc_dir.join("stat"),
            buf: FileBuf::default(),
        }
    }
}

impl Scraper for CpuScraper {
    fn scrape(&mut self, ctx: &mut ScrapeContext<'_>, out: &mut RequestWriter) {
        let bytes = match self.buf.read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) => {
                let path = &self.path;
                ctx.errors.add(NAME, Reason::Read, false, || {
                    format!("{}: {err}", path.display())
                });
                return;
            }
        };
        let start = ctx.host_stat().btime.saturating_mul(1_000_000_000);
        let tick = ctx.kernel.clk_tck.max(1) as f64;
        let now = ctx.now;
        let def = &metadata::SYSTEM_CPU_TIME;
        let mut time = def.new_metric(0);
        let mut cpus = 0u64;
        for line in procfs::lines(bytes) {
            let mut fields = procfs::fields(line);
            let Some(cpu) = fields.next() else { continue };
            if !(cpu.starts_with(b"cpu") && cpu.get(3).is_some_and(|b| b.is_ascii_digit())) {
                continue;
            }
            cpus += 1;
            if !self.settings.metrics.on(def) {
                continue;
            }
            let cpu = String::from_utf8_lossy(cpu);
            for (state, value) in STATES.iter().zip(fields) {
                let Some(ticks) = procfs::parse_u64(value) else {
                    continue;
                };
                let attributes = vec![str_attr("cpu", cpu.as_ref()), str_attr("state", *state)];
                push_point(
                    &mut time,
                    def.point(start, now, ticks as f64 / tick, attributes),
                );
            }
        }
        let mut metrics = vec![time];
        let count = &metadata::SYSTEM_CPU_LOGICAL_COUNT;
        if self.settings.metrics.on(count) {
            let mut metric = count.new_metric(1);
            push_point(&mut metric, count.int_point(start, now, cpus, Vec::new()));
            metrics.push(metric);
        }
        if let Some(rm) = super::resource_metrics(NAME, Resource::default(), metrics) {
            out.push(&rm);
        }
    }
}
