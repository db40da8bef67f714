//! `load` scraper: `system.cpu.load_average.{1m,5m,15m}` from `/proc/loadavg`.

use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use serde_yaml::Value;

use super::encode::RequestWriter;
use super::metadata::{self, push_point};
use super::procfs::{self, FileBuf};
use super::{MetricSwitches, Reason, ScrapeContext, Scraper, Toggle};
use crate::config::{self, Issue};

const NAME: &str = "load";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawLoadConfig {
    /// Divide the load averages by the number of logical CPUs, as the Collector's option.
    #[serde(default)]
    cpu_average: bool,
    #[serde(default)]
    metrics: IndexMap<String, Toggle>,
}

#[derive(Debug)]
pub struct LoadSettings {
    cpu_average: bool,
    metrics: MetricSwitches,
}

pub fn parse(value: Value, issues: &mut Vec<Issue>) -> Option<LoadSettings> {
    let raw: RawLoadConfig = config::deserialize(value)
        .map_err(|i| issues.push(i))
        .ok()?;
    Some(LoadSettings {
        cpu_average: raw.cpu_average,
        metrics: MetricSwitches::resolve(NAME, &raw.metrics, "metrics", issues),
    })
}

pub struct LoadScraper {
    settings: Arc<LoadSettings>,
    path: std::path::PathBuf,
    buf: FileBuf,
}

impl LoadScraper {
    pub fn new(settings: Arc<LoadSettings>, proc_dir: &Path) -> Self {
        Self {
            settings,
            path: proc_dir.join("loadavg"),
            buf: FileBuf::default(),
        }
    }
}

impl Scraper for LoadScraper {
    fn scrape(&mut self, ctx: &mut ScrapeContext<'_>, out: &mut RequestWriter) {
        let averages = self.buf.read(&self.path).ok().and_then(|bytes| {
            let mut fields = procfs::fields(bytes).map(procfs::parse_f64);
            Some([fields.next()??, fields.next()??, fields.next()??])
        });
        let Some(mut averages) = averages else {
            let path = &self.path;
            ctx.errors.add(NAME, Reason::Read, false, || {
                format!("{}: unreadable or malformed", path.display())
            });
            return;
        };
        if self.settings.cpu_average {
            let cpus = ctx.host_stat().logical_cpus.max(1) as f64;
            for value in &mut averages {
                *value /= cpus;
            }
        }
        let defs = [
            &metadata::SYSTEM_LOAD_1M,
            &metadata::SYSTEM_LOAD_5M,
            &metadata::SYSTEM_LOAD_15M,
        ];
        let mut metrics = Vec::new();
        for (def, value) in defs.into_iter().zip(averages) {
            if self.settings.metrics.on(def) {
                let mut metric = def.new_metric(1);
                push_point(&mut metric, def.point(0, ctx.now, value, Vec::new()));
                metrics.push(metric);
            }
        }
        if let Some(rm) = super::resource_metrics(NAME, Resource::default(), metrics) {
            out.push(&rm);
        }
    }
}
