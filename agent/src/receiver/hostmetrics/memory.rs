//! `memory` scraper: `system.memory.usage` (and `.utilization`) by state, from
//! `/proc/meminfo`, computed as gopsutil does for the Collector.

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

const NAME: &str = "memory";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawMemoryConfig {
    #[serde(default)]
    metrics: IndexMap<String, Toggle>,
}

#[derive(Debug)]
pub struct MemorySettings {
    metrics: MetricSwitches,
}

pub fn parse(value: Value, issues: &mut Vec<Issue>) -> Option<MemorySettings> {
    let raw: RawMemoryConfig = config::deserialize(value)
        .map_err(|i| issues.push(i))
        .ok()?;
    Some(MemorySettings {
        metrics: MetricSwitches::resolve(NAME, &raw.metrics, "metrics", issues),
    })
}

/// Memory by the Collector's states, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStates {
    pub total: u64,
    pub used: u64,
    pub free: u64,
    pub buffered: u64,
    /// `Cached + SReclaimable`, as gopsutil (and `free`) count it.
    pub cached: u64,
    pub slab_reclaimable: u64,
    pub slab_unreclaimable: u64,
}

pub fn parse_meminfo(bytes: &[u8]) -> Option<MemoryStates> {
    let get = |key: &[u8]| procfs::meminfo_bytes(bytes, key);
    let total = get(b"MemTotal")?;
    let free = get(b"MemFree")?;
    let buffered = get(b"Buffers").unwrap_or(0);
    let slab_reclaimable = get(b"SReclaimable").unwrap_or(0);
    let slab_unreclaimable = get(b"SUnreclaim").unwrap_or(0);
    let cached = get(b"Cached").unwrap_or(0).saturating_add(slab_reclaimable);
    let used = total
        .saturating_sub(free)
        .saturating_sub(buffered)
        .saturating_sub(cached);
    Some(MemoryStates {
        total,
        used,
        free,
        buffered,
        cached,
        slab_reclaimable,
        slab_unreclaimable,
    })
}

pub struct MemoryScraper {
    settings: Arc<MemorySettings>,
    path: std::path::PathBuf,
    buf: FileBuf,
}

impl MemoryScraper {
    pub fn new(settings: Arc<MemorySettings>, proc_dir: &Path) -> Self {
        Self {
            settings,
            path: proc_dir.join("meminfo"),
            buf: FileBuf::default(),
        }
    }
}

impl Scraper for MemoryScraper {
    fn scrape(&mut self, ctx: &mut ScrapeContext<'_>, out: &mut RequestWriter) {
        let states = match self.buf.read(&self.path) {
            Ok(bytes) => parse_meminfo(bytes),
            Err(_) => None,
        };
        let Some(m) = states else {
            let path = &self.path;
            ctx.errors.add(NAME, Reason::Read, false, || {
                format!("{}: unreadable or without MemTotal/MemFree", path.display())
            });
            return;
        };
        let start = ctx.boot_time_nanos();
        let now = ctx.now;
        let states = [
            ("used", m.used),
            ("free", m.free),
            ("buffered", m.buffered),
            ("cached", m.cached),
            ("slab_reclaimable", m.slab_reclaimable),
            ("slab_unreclaimable", m.slab_unreclaimable),
        ];
        let mut metrics = Vec::new();
        let usage = &metadata::SYSTEM_MEMORY_USAGE;
        if self.settings.metrics.on(usage) {
            let mut metric = usage.new_metric(states.len());
            for (state, bytes) in states {
                push_point(
                    &mut metric,
                    usage.int_point(start, now, bytes, vec![str_attr("state", state)]),
                );
            }
            metrics.push(metric);
        }
        let utilization = &metadata::SYSTEM_MEMORY_UTILIZATION;
        if self.settings.metrics.on(utilization) && m.total > 0 {
            let mut metric = utilization.new_metric(states.len());
            for (state, bytes) in states {
                let ratio = bytes as f64 / m.total as f64;
                push_point(
                    &mut metric,
                    utilization.point(start, now, ratio, vec![str_attr("state", state)]),
                );
            }
            metrics.push(metric);
        }
        if let Some(rm) = super::resource_metrics(NAME, Resource::default(), metrics) {
            out.push(&rm);
        }
    }
}
