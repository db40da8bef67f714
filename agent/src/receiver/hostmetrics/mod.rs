//! `hostmetrics`: host and per-process metrics read from `/proc`, with the OpenTelemetry
//! Collector's scraper names, config keys and metric metadata.
//!
//! Every `collection_interval` the enabled scrapers run together on a blocking thread and
//! their output becomes one request, dispatched like an OTLP request. A scraper cannot push
//! back: when the pipelines are full, that scrape is counted as refused and dropped.

pub mod cpu;
pub mod encode;
pub mod fixture;
pub mod load;
pub mod memory;
pub mod metadata;
pub mod network;
pub mod process;
pub mod procfs;

use std::any::Any;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use indexmap::IndexMap;
use metrics::Counter;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::{Metric, ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use regex::RegexSet;
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{BoundReceiver, ReceiverConfig, ReceiverContext, ReceiverFactory, RunningReceiver};
use crate::config::{self, Issue};
use crate::otlp::{Batch, ExportMetricsServiceRequest};
use crate::pipeline::DispatchError;
use crate::telemetry;
use metadata::MetricDef;

pub const FACTORY: ReceiverFactory = ReceiverFactory {
    type_name: "hostmetrics",
    parse,
};

/// The Collector's default.
pub const DEFAULT_COLLECTION_INTERVAL: Duration = Duration::from_secs(60);
/// The Collector's default: the first scrape comes this long after start.
pub const DEFAULT_INITIAL_DELAY: Duration = Duration::from_secs(1);
/// The `transport` label of this receiver's `phoenix_receiver_*` self-metrics.
const TRANSPORT: &str = "scrape";
/// The Collector's semantic-conventions schema for these metrics.
pub const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.9.0";

/// Scrapers that exist, in the order of the reference docs.
pub const SCRAPERS: &[&str] = &["cpu", "memory", "load", "network", "process"];
/// Collector scrapers phoenix-agent does not have, named in the error for them.
const NOT_SUPPORTED: &[&str] = &["disk", "filesystem", "paging", "processes", "system"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_interval", with = "humantime_serde")]
    collection_interval: Duration,
    #[serde(default = "default_initial_delay", with = "humantime_serde")]
    initial_delay: Duration,
    /// Where the host's root file system is mounted, e.g. `/hostfs`; `/proc` and
    /// `/etc/passwd` are read below it.
    #[serde(default = "default_root")]
    root_path: String,
    #[serde(default)]
    scrapers: IndexMap<String, Value>,
}

fn default_interval() -> Duration {
    DEFAULT_COLLECTION_INTERVAL
}
fn default_initial_delay() -> Duration {
    DEFAULT_INITIAL_DELAY
}
fn default_root() -> String {
    "/".to_string()
}

/// A validated `hostmetrics` config.
#[derive(Debug, Clone)]
pub struct HostmetricsConfig {
    pub collection_interval: Duration,
    pub initial_delay: Duration,
    pub root_path: PathBuf,
    pub scrapers: Vec<ScraperSpec>,
}

/// One configured scraper: its compiled settings and the raw value they came from, which
/// a reload compares to decide whether the running scraper (and its state) can stay.
#[derive(Debug, Clone)]
pub struct ScraperSpec {
    pub name: &'static str,
    pub raw: Value,
    settings: Settings,
}

#[derive(Debug, Clone)]
enum Settings {
    Cpu(Arc<cpu::CpuSettings>),
    Memory(Arc<memory::MemorySettings>),
    Load(Arc<load::LoadSettings>),
    Network(Arc<network::NetworkSettings>),
    Process(Arc<process::ProcessSettings>),
}

/// `{ enabled: bool }`, the Collector's switch for a metric or resource attribute.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Toggle {
    pub enabled: bool,
}

/// The metrics a scraper emits: its defaults with the `metrics:` overrides applied.
#[derive(Debug, Clone)]
pub struct MetricSwitches(Vec<&'static str>);

impl MetricSwitches {
    /// Resolves `overrides` (at `path`) against `scraper`'s metrics; unknown names are issues.
    pub fn resolve(
        scraper: &str,
        overrides: &IndexMap<String, Toggle>,
        path: &str,
        issues: &mut Vec<Issue>,
    ) -> Self {
        for name in overrides.keys() {
            if !metadata::of_scraper(scraper).any(|d| d.name == name) {
                let known: Vec<&str> = metadata::of_scraper(scraper).map(|d| d.name).collect();
                issues.push(Issue::new(
                    format!("{path}.{name}"),
                    format!(
                        "unknown metric of the {scraper} scraper; known: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Self(
            metadata::of_scraper(scraper)
                .filter(|d| {
                    overrides
                        .get(d.name)
                        .map_or(d.enabled_by_default, |t| t.enabled)
                })
                .map(|d| d.name)
                .collect(),
        )
    }

    pub fn on(&self, def: &MetricDef) -> bool {
        self.0.contains(&def.name)
    }
}

/// `match_type` of an include/exclude filter, as in the Collector's filterset.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MatchType {
    #[default]
    Strict,
    /// Go-style: a name matches when the expression matches anywhere in it.
    Regexp,
}

/// A compiled name filter.
#[derive(Debug)]
pub enum NameFilter {
    Strict(HashSet<String>),
    Regexp(RegexSet),
}

impl NameFilter {
    pub fn compile(
        names: &[String],
        match_type: MatchType,
        path: &str,
        issues: &mut Vec<Issue>,
    ) -> Option<Self> {
        if names.is_empty() {
            issues.push(Issue::new(path, "must list at least one name"));
            return None;
        }
        match match_type {
            MatchType::Strict => Some(Self::Strict(names.iter().cloned().collect())),
            MatchType::Regexp => {
                let before = issues.len();
                for (i, name) in names.iter().enumerate() {
                    if let Err(err) = regex::Regex::new(name) {
                        issues.push(Issue::new(
                            format!("{path}[{i}]"),
                            format!("invalid regexp {name:?}: {err}"),
                        ));
                    }
                }
                if issues.len() > before {
                    return None;
                }
                match RegexSet::new(names) {
                    Ok(set) => Some(Self::Regexp(set)),
                    Err(err) => {
                        issues.push(Issue::new(path, format!("invalid regexps: {err}")));
                        None
                    }
                }
            }
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Strict(set) => set.contains(name),
            Self::Regexp(set) => set.is_match(name),
        }
    }
}

pub fn parse(value: Value) -> Result<Arc<dyn ReceiverConfig>, Vec<Issue>> {
    parse_config(value).map(|c| c as Arc<dyn ReceiverConfig>)
}

/// Parses and validates a `hostmetrics` config body.
pub fn parse_config(value: Value) -> Result<Arc<HostmetricsConfig>, Vec<Issue>> {
    let raw: RawConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    if raw.collection_interval.is_zero() {
        issues.push(Issue::new("collection_interval", "must be greater than 0"));
    }
    if !raw.root_path.starts_with('/') {
        issues.push(Issue::new(
            "root_path",
            format!("{:?} is not an absolute path", raw.root_path),
        ));
    }
    if raw.scrapers.is_empty() {
        issues.push(Issue::new(
            "scrapers",
            format!("enable at least one scraper: {}", SCRAPERS.join(", ")),
        ));
    }
    let mut scrapers = Vec::new();
    for (key, body) in raw.scrapers {
        let path = format!("scrapers.{key}");
        let Some(&name) = SCRAPERS.iter().find(|s| **s == key) else {
            let message = if NOT_SUPPORTED.contains(&key.as_str()) {
                format!(
                    "the {key} scraper is not supported by phoenix-agent; supported: {}",
                    SCRAPERS.join(", ")
                )
            } else {
                format!("unknown scraper; known: {}", SCRAPERS.join(", "))
            };
            issues.push(Issue::new(path, message));
            continue;
        };
        let mut found = Vec::new();
        let settings = match name {
            "cpu" => cpu::parse(body.clone(), &mut found).map(|s| Settings::Cpu(Arc::new(s))),
            "memory" => {
                memory::parse(body.clone(), &mut found).map(|s| Settings::Memory(Arc::new(s)))
            }
            "load" => load::parse(body.clone(), &mut found).map(|s| Settings::Load(Arc::new(s))),
            "network" => {
                network::parse(body.clone(), &mut found).map(|s| Settings::Network(Arc::new(s)))
            }
            _ => process::parse(body.clone(), &mut found).map(|s| Settings::Process(Arc::new(s))),
        };
        issues.extend(found.into_iter().map(|i| i.under(&path)));
        if let Some(settings) = settings {
            scrapers.push(ScraperSpec {
                name,
                raw: body,
                settings,
            });
        }
    }
    if issues.is_empty() {
        Ok(Arc::new(HostmetricsConfig {
            collection_interval: raw.collection_interval,
            initial_delay: raw.initial_delay,
            root_path: PathBuf::from(raw.root_path),
            scrapers,
        }))
    } else {
        Err(issues)
    }
}

impl ReceiverConfig for HostmetricsConfig {
    fn listen_addresses(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn bind(&self) -> Result<Box<dyn BoundReceiver>, String> {
        Ok(Box::new(BoundHostmetrics {
            config: Arc::new(self.clone()),
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl HostmetricsConfig {
    pub fn proc_dir(&self) -> PathBuf {
        self.root_path.join("proc")
    }
}

/// Values of the running kernel the scrapers convert with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConstants {
    /// `USER_HZ`: the unit of CPU times in `/proc`.
    pub clk_tck: u64,
    pub page_size: u64,
}

impl KernelConstants {
    /// The running kernel's, from this process's auxiliary vector.
    pub fn current() -> Self {
        let (clk_tck, page_size) = procfs::kernel_constants(Path::new("/proc"));
        Self { clk_tck, page_size }
    }
}

/// Why a scraper skipped a process, a metric or an attribute; the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The process exited between listing and reading; never logged.
    Vanished,
    /// `/proc/PID/stat` unreadable or malformed: the process is skipped.
    Name,
    /// `/proc/PID/exe` unreadable: `process.executable.path` is left out.
    Exe,
    /// `/proc/PID/io` unreadable: the disk metrics are left out.
    Io,
    /// The owner's uid is unknown or `status` unreadable: `process.owner` is left out.
    User,
    /// `/proc/PID/status` unreadable: the metrics read from it are left out.
    Status,
    /// `/proc/PID/fd` unreadable: `process.open_file_descriptors` is left out.
    Fd,
    /// A host-wide file (`/proc/stat`, `/proc/meminfo`, ...) unreadable or malformed.
    Read,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Vanished => "vanished",
            Reason::Name => "name",
            Reason::Exe => "exe",
            Reason::Io => "io",
            Reason::User => "user",
            Reason::Status => "status",
            Reason::Fd => "fd",
            Reason::Read => "read",
        }
    }
}

/// What one scrape skipped, by scraper and reason, with one example message each.
#[derive(Debug, Default)]
pub struct ScrapeErrors {
    pub counts: BTreeMap<(&'static str, Reason), ErrorCount>,
}

#[derive(Debug, Default)]
pub struct ErrorCount {
    pub count: u64,
    /// `mute_process_*_error` asked not to log it; it is counted anyway.
    pub muted: bool,
    pub example: String,
}

impl ScrapeErrors {
    pub fn add(
        &mut self,
        scraper: &'static str,
        reason: Reason,
        muted: bool,
        example: impl FnOnce() -> String,
    ) {
        let entry = self.counts.entry((scraper, reason)).or_default();
        if entry.count == 0 {
            entry.example = example();
            entry.muted = muted;
        }
        entry.count += 1;
    }

    pub fn count(&self, scraper: &str, reason: Reason) -> u64 {
        self.counts
            .iter()
            .filter(|((s, r), _)| *s == scraper && *r == reason)
            .map(|(_, c)| c.count)
            .sum()
    }
}

/// What every scraper of one scrape shares.
pub struct ScrapeContext<'a> {
    pub proc_dir: &'a Path,
    pub root: &'a Path,
    pub kernel: KernelConstants,
    /// Scrape time, ns since the epoch.
    pub now: u64,
    pub errors: &'a mut ScrapeErrors,
    /// `/proc` files the scrapers keep open after this scrape.
    pub open_files: u64,
    /// Processes read with files opened and closed in this scrape because keeping them
    /// open would exceed `max_open_files`.
    pub uncached_processes: u64,
    /// Processes written from their last full read, not having run since it.
    pub idle_processes: u64,
    host_stat: Option<procfs::HostStat>,
}

impl ScrapeContext<'_> {
    /// Boot time and CPU count from `<proc>/stat`, read at most once per scrape.
    pub fn host_stat(&mut self) -> procfs::HostStat {
        if let Some(stat) = self.host_stat {
            return stat;
        }
        let stat = match std::fs::read(self.proc_dir.join("stat")) {
            Ok(bytes) => procfs::parse_host_stat(&bytes),
            Err(err) => {
                let path = self.proc_dir.join("stat");
                self.errors.add("host", Reason::Read, false, || {
                    format!("{}: {err}", path.display())
                });
                procfs::HostStat::default()
            }
        };
        self.host_stat = Some(stat);
        stat
    }

    /// Boot time in ns since the epoch: the start time of host-wide cumulative metrics.
    pub fn boot_time_nanos(&mut self) -> u64 {
        self.host_stat().btime.saturating_mul(1_000_000_000)
    }
}

/// A scraper: appends what it read to the request being encoded.
pub trait Scraper: Send {
    fn scrape(&mut self, ctx: &mut ScrapeContext<'_>, out: &mut encode::RequestWriter);

    /// Makes only the system calls a steady-state [`Scraper::scrape`] makes, without parsing
    /// or building anything: the kernel floor the benches report next to a scrape's cost.
    /// Host scrapers, one small file each, do nothing here.
    fn read_only(&mut self, _ctx: &mut ScrapeContext<'_>) {}
}

/// The instrumentation scope of `scraper`'s metrics: the Collector's, so queries written
/// against its output keep working.
pub fn scope(scraper: &str) -> InstrumentationScope {
    InstrumentationScope {
        name: format!(
            "github.com/open-telemetry/opentelemetry-collector-contrib/receiver/hostmetricsreceiver/internal/scraper/{scraper}scraper"
        ),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    }
}

/// A resource holding one scope's metrics; empty metric lists are dropped.
pub fn resource_metrics(
    scraper: &str,
    resource: Resource,
    mut metrics: Vec<Metric>,
) -> Option<ResourceMetrics> {
    metrics.retain(|m| crate::otlp::metric_data_points(m.data.as_ref()) > 0);
    if metrics.is_empty() {
        return None;
    }
    Some(ResourceMetrics {
        resource: Some(resource),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(scope(scraper)),
            metrics,
            schema_url: SCHEMA_URL.to_string(),
        }],
        schema_url: SCHEMA_URL.to_string(),
    })
}

/// The running scrapers of one config, with their state (buffers, previous CPU times).
pub struct Scrapers {
    root: PathBuf,
    proc_dir: PathBuf,
    kernel: KernelConstants,
    running: Vec<(ScraperSpec, Box<dyn Scraper>)>,
    /// Size of the last scrape's request: the next one's buffer starts that large.
    last_len: usize,
}

/// One scrape's output.
#[derive(Debug)]
pub struct ScrapeOutput {
    /// The encoded `ExportMetricsServiceRequest`: every scraper's resources, in order.
    pub bytes: Vec<u8>,
    pub data_points: u64,
    pub errors: ScrapeErrors,
    /// See [`ScrapeContext::open_files`].
    pub open_files: u64,
    /// See [`ScrapeContext::uncached_processes`].
    pub uncached_processes: u64,
    /// See [`ScrapeContext::idle_processes`].
    pub idle_processes: u64,
    decoded: OnceLock<Result<ExportMetricsServiceRequest, prost::DecodeError>>,
}

impl ScrapeOutput {
    /// The request decoded (once), for tests and benches; the receiver dispatches the bytes.
    pub fn request(&self) -> Result<&ExportMetricsServiceRequest, prost::DecodeError> {
        self.decoded
            .get_or_init(|| prost::Message::decode(self.bytes.as_slice()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Scrapers {
    pub fn new(config: &HostmetricsConfig, kernel: KernelConstants) -> Self {
        let mut scrapers = Self {
            root: config.root_path.clone(),
            proc_dir: config.proc_dir(),
            kernel,
            running: Vec::new(),
            last_len: 0,
        };
        scrapers.reconfigure(config);
        scrapers
    }

    /// Keeps the scrapers whose config is unchanged (and their state), builds the rest.
    pub fn reconfigure(&mut self, config: &HostmetricsConfig) {
        let same_root = config.root_path == self.root;
        self.root = config.root_path.clone();
        self.proc_dir = config.proc_dir();
        let mut old = std::mem::take(&mut self.running);
        for spec in &config.scrapers {
            let kept = old
                .iter()
                .position(|(s, _)| same_root && s.name == spec.name && s.raw == spec.raw);
            let scraper = match kept {
                Some(i) => old.swap_remove(i).1,
                None => self.build(spec),
            };
            self.running.push((spec.clone(), scraper));
        }
    }

    fn build(&self, spec: &ScraperSpec) -> Box<dyn Scraper> {
        let proc_dir = &self.proc_dir;
        match &spec.settings {
            Settings::Cpu(s) => Box::new(cpu::CpuScraper::new(s.clone(), proc_dir)),
            Settings::Memory(s) => Box::new(memory::MemoryScraper::new(s.clone(), proc_dir)),
            Settings::Load(s) => Box::new(load::LoadScraper::new(s.clone(), proc_dir)),
            Settings::Network(s) => Box::new(network::NetworkScraper::new(s.clone(), proc_dir)),
            Settings::Process(s) => Box::new(process::ProcessScraper::new(
                s.clone(),
                proc_dir,
                &self.root,
            )),
        }
    }

    /// Runs every scraper once. Blocking: reads files.
    pub fn scrape(&mut self, now: SystemTime) -> ScrapeOutput {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut errors = ScrapeErrors::default();
        // A little more than last time, so a steady state grows the buffer at most rarely.
        let mut out = encode::RequestWriter::with_capacity(self.last_len + self.last_len / 8);
        let mut ctx = ScrapeContext {
            proc_dir: &self.proc_dir,
            root: &self.root,
            kernel: self.kernel,
            now,
            errors: &mut errors,
            open_files: 0,
            uncached_processes: 0,
            idle_processes: 0,
            host_stat: None,
        };
        for (_, scraper) in &mut self.running {
            scraper.scrape(&mut ctx, &mut out);
        }
        let (open_files, uncached_processes, idle_processes) =
            (ctx.open_files, ctx.uncached_processes, ctx.idle_processes);
        let (bytes, data_points) = out.into_parts();
        self.last_len = bytes.len();
        ScrapeOutput {
            bytes,
            data_points,
            errors,
            open_files,
            uncached_processes,
            idle_processes,
            decoded: OnceLock::new(),
        }
    }
}

impl Scrapers {
    /// [`Scraper::read_only`] of every scraper: the system calls of a scrape after the
    /// first, and nothing else. For the benches' kernel floor.
    pub fn read_only(&mut self) {
        let mut errors = ScrapeErrors::default();
        let mut ctx = ScrapeContext {
            proc_dir: &self.proc_dir,
            root: &self.root,
            kernel: self.kernel,
            now: 0,
            errors: &mut errors,
            open_files: 0,
            uncached_processes: 0,
            idle_processes: 0,
            host_stat: None,
        };
        for (_, scraper) in &mut self.running {
            scraper.read_only(&mut ctx);
        }
    }
}

struct BoundHostmetrics {
    config: Arc<HostmetricsConfig>,
}

impl BoundReceiver for BoundHostmetrics {
    fn start(self: Box<Self>, ctx: ReceiverContext) -> Box<dyn RunningReceiver> {
        let (config_tx, config_rx) = watch::channel(self.config);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(ctx, config_rx, stop.clone()));
        Box::new(RunningHostmetrics {
            config: config_tx,
            stop,
            task,
        })
    }
}

struct RunningHostmetrics {
    config: watch::Sender<Arc<HostmetricsConfig>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningReceiver for RunningHostmetrics {
    fn reconfigure(&self, config: &dyn ReceiverConfig) -> bool {
        let Some(config) = config.as_any().downcast_ref::<HostmetricsConfig>() else {
            return false;
        };
        // Nothing is bound, so every change applies in place.
        self.config.send_replace(Arc::new(config.clone()));
        true
    }

    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.stop.cancel();
        Box::pin(async move {
            let _ = self.task.await;
        })
    }
}

/// Self-metric handles, registered once per receiver.
struct ReceiverMetrics {
    accepted: Counter,
    requests_accepted: Counter,
    requests_refused: Counter,
    refused_full: Counter,
    duration: metrics::Gauge,
    open_files: metrics::Gauge,
    uncached: Counter,
    idle: Counter,
}

impl ReceiverMetrics {
    fn new(receiver: &str) -> Self {
        let r = receiver.to_string();
        Self {
            accepted: metrics::counter!(telemetry::RECEIVER_ACCEPTED, "receiver" => r.clone(), "transport" => TRANSPORT),
            requests_accepted: metrics::counter!(telemetry::RECEIVER_REQUESTS, "receiver" => r.clone(), "transport" => TRANSPORT, "outcome" => "accepted"),
            requests_refused: metrics::counter!(telemetry::RECEIVER_REQUESTS, "receiver" => r.clone(), "transport" => TRANSPORT, "outcome" => "refused"),
            refused_full: metrics::counter!(telemetry::RECEIVER_REFUSED, "receiver" => r.clone(), "transport" => TRANSPORT, "reason" => "pipelines_full"),
            duration: metrics::gauge!(telemetry::RECEIVER_SCRAPE_DURATION, "receiver" => r.clone()),
            open_files: metrics::gauge!(telemetry::RECEIVER_SCRAPE_OPEN_FILES, "receiver" => r.clone()),
            uncached: metrics::counter!(telemetry::RECEIVER_SCRAPE_UNCACHED, "receiver" => r.clone()),
            idle: metrics::counter!(telemetry::RECEIVER_SCRAPE_IDLE, "receiver" => r),
        }
    }
}

fn interval(period: Duration, first_in: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + first_in, period);
    // A scrape that overruns its interval delays the next one instead of bursting.
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    interval
}

async fn run(
    ctx: ReceiverContext,
    mut config_rx: watch::Receiver<Arc<HostmetricsConfig>>,
    stop: CancellationToken,
) {
    let metrics = ReceiverMetrics::new(ctx.id.as_str());
    let kernel = KernelConstants::current();
    let mut config = config_rx.borrow_and_update().clone();
    let mut scrapers = Some(Scrapers::new(&config, kernel));
    let mut ticks = interval(config.collection_interval, config.initial_delay);
    // (scraper, reason) pairs already logged at warn level; later ones go to debug.
    let mut warned = HashSet::new();
    let mut warned_uncached = false;
    tracing::info!(receiver = %ctx.id, interval = ?config.collection_interval, scrapers = ?config.scrapers.iter().map(|s| s.name).collect::<Vec<_>>(), "hostmetrics receiver started");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = config_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let new = config_rx.borrow_and_update().clone();
                if new.collection_interval != config.collection_interval {
                    ticks = interval(new.collection_interval, new.collection_interval);
                }
                match scrapers.as_mut() {
                    Some(s) => s.reconfigure(&new),
                    None => scrapers = Some(Scrapers::new(&new, kernel)),
                }
                config = new;
                tracing::info!(receiver = %ctx.id, interval = ?config.collection_interval, "hostmetrics receiver reconfigured");
            }
            _ = ticks.tick() => {
                let Some(mut set) = scrapers.take() else { continue };
                let started = std::time::Instant::now();
                let joined = tokio::task::spawn_blocking(move || {
                    let output = set.scrape(SystemTime::now());
                    (set, output)
                })
                .await;
                metrics.duration.set(started.elapsed().as_secs_f64());
                match joined {
                    Ok((set, output)) => {
                        scrapers = Some(set);
                        metrics.open_files.set(output.open_files as f64);
                        metrics.uncached.increment(output.uncached_processes);
                        metrics.idle.increment(output.idle_processes);
                        if output.uncached_processes > 0 && !warned_uncached {
                            warned_uncached = true;
                            tracing::warn!(receiver = %ctx.id, open_files = output.open_files, uncached = output.uncached_processes, "scrapers.process.max_open_files reached: the other processes' files are opened and closed every scrape, at a higher CPU cost (counted in phoenix_receiver_scrape_uncached_processes_total; logged once)");
                        }
                        record_errors(&ctx, &output.errors, &mut warned);
                        dispatch(&ctx, &metrics, output.bytes, output.data_points).await;
                    }
                    Err(err) => {
                        // A panic is a bug in a parser; start over with fresh state.
                        tracing::error!(receiver = %ctx.id, error = %err, "scrape failed; scrapers rebuilt");
                        scrapers = Some(Scrapers::new(&config, kernel));
                    }
                }
            }
        }
    }
    tracing::info!(receiver = %ctx.id, "hostmetrics receiver stopped");
}

fn record_errors(
    ctx: &ReceiverContext,
    errors: &ScrapeErrors,
    warned: &mut HashSet<(&'static str, Reason)>,
) {
    for (&(scraper, reason), count) in &errors.counts {
        metrics::counter!(telemetry::RECEIVER_SCRAPE_ERRORS, "receiver" => ctx.id.as_str().to_string(), "scraper" => scraper, "reason" => reason.as_str())
            .increment(count.count);
        let quiet = count.muted || reason == Reason::Vanished;
        if !quiet && warned.insert((scraper, reason)) {
            tracing::warn!(receiver = %ctx.id, scraper, reason = reason.as_str(), count = count.count, example = %count.example, "scrape skipped data (counted in phoenix_receiver_scrape_errors_total; logged once)");
        } else {
            tracing::debug!(receiver = %ctx.id, scraper, reason = reason.as_str(), count = count.count, example = %count.example, "scrape skipped data");
        }
    }
}

async fn dispatch(ctx: &ReceiverContext, metrics: &ReceiverMetrics, bytes: Vec<u8>, points: u64) {
    if points == 0 {
        return;
    }
    // Encoded by the scrapers: the pipelines decode it only where a processor needs it.
    let batch = Batch::from_validated(bytes::Bytes::from(bytes), points);
    let pipelines = ctx.pipelines.load_full();
    let Some(route) = pipelines.route(ctx.id.as_str()) else {
        return;
    };
    match route.dispatch(Arc::new(batch)).await {
        Ok(()) => {
            metrics.accepted.increment(points);
            metrics.requests_accepted.increment(1);
        }
        Err(err @ (DispatchError::Full { .. } | DispatchError::Closed { .. })) => {
            metrics.refused_full.increment(points);
            metrics.requests_refused.increment(1);
            tracing::debug!(receiver = %ctx.id, error = %err, points, "scrape dropped");
        }
    }
}

#[cfg(test)]
mod tests;
