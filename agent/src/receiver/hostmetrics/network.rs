//! `network` scraper: `system.network.{io,packets,errors,dropped}` by device and direction,
//! from `/proc/net/dev`.

use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use serde_yaml::Value;

use super::encode::RequestWriter;
use super::metadata::{self, push_point, str_attr};
use super::procfs::{self, FileBuf};
use super::{MatchType, MetricSwitches, NameFilter, Reason, ScrapeContext, Scraper, Toggle};
use crate::config::{self, Issue};

const NAME: &str = "network";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawNetworkConfig {
    #[serde(default)]
    include: Option<InterfaceMatch>,
    #[serde(default)]
    exclude: Option<InterfaceMatch>,
    #[serde(default)]
    metrics: IndexMap<String, Toggle>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct InterfaceMatch {
    interfaces: Vec<String>,
    #[serde(default)]
    match_type: MatchType,
}

#[derive(Debug)]
pub struct NetworkSettings {
    include: Option<NameFilter>,
    exclude: Option<NameFilter>,
    metrics: MetricSwitches,
}

pub fn parse(value: Value, issues: &mut Vec<Issue>) -> Option<NetworkSettings> {
    let raw: RawNetworkConfig = config::deserialize(value)
        .map_err(|i| issues.push(i))
        .ok()?;
    let filter = |m: &Option<InterfaceMatch>, path: &str, issues: &mut Vec<Issue>| {
        m.as_ref()
            .and_then(|m| NameFilter::compile(&m.interfaces, m.match_type, path, issues))
    };
    Some(NetworkSettings {
        include: filter(&raw.include, "include.interfaces", issues),
        exclude: filter(&raw.exclude, "exclude.interfaces", issues),
        metrics: MetricSwitches::resolve(NAME, &raw.metrics, "metrics", issues),
    })
}

pub struct NetworkScraper {
    settings: Arc<NetworkSettings>,
    path: std::path::PathBuf,
    buf: FileBuf,
}

impl NetworkScraper {
    pub fn new(settings: Arc<NetworkSettings>, proc_dir: &Path) -> Self {
        Self {
            settings,
            path: proc_dir.join("net/dev"),
            buf: FileBuf::default(),
        }
    }
}

/// `/proc/net/dev` columns: receive bytes, packets, errs, drop, fifo, frame, compressed,
/// multicast, then transmit bytes, packets, errs, drop, ...
const RX_BYTES: usize = 0;
const TX_BYTES: usize = 8;

impl Scraper for NetworkScraper {
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
        let now = ctx.now;
        // (metric, offset of its column from the direction's first column)
        let defs = [
            (&metadata::SYSTEM_NETWORK_IO, 0),
            (&metadata::SYSTEM_NETWORK_PACKETS, 1),
            (&metadata::SYSTEM_NETWORK_ERRORS, 2),
            (&metadata::SYSTEM_NETWORK_DROPPED, 3),
        ];
        let mut metrics: Vec<_> = defs.iter().map(|(d, _)| d.new_metric(0)).collect();
        let s = &self.settings;
        for line in procfs::lines(bytes) {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let device = String::from_utf8_lossy(line[..colon].trim_ascii());
            if s.include.as_ref().is_some_and(|f| !f.matches(&device))
                || s.exclude.as_ref().is_some_and(|f| f.matches(&device))
            {
                continue;
            }
            let mut columns = [0u64; 16];
            let mut n = 0;
            for (slot, field) in columns.iter_mut().zip(procfs::fields(&line[colon + 1..])) {
                *slot = procfs::parse_u64(field).unwrap_or(0);
                n += 1;
            }
            if n < columns.len() {
                continue;
            }
            for ((def, offset), metric) in defs.iter().zip(metrics.iter_mut()) {
                if !s.metrics.on(def) {
                    continue;
                }
                for (direction, base) in [("receive", RX_BYTES), ("transmit", TX_BYTES)] {
                    let value = columns.get(base + offset).copied().unwrap_or(0);
                    let attributes = vec![
                        str_attr("device", device.as_ref()),
                        str_attr("direction", direction),
                    ];
                    push_point(metric, def.int_point(start, now, value, attributes));
                }
            }
        }
        if let Some(rm) = super::resource_metrics(NAME, Resource::default(), metrics) {
            out.push(&rm);
        }
    }
}
