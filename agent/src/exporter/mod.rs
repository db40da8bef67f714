//! Exporters send one encoded request and classify the outcome; the delivery helper here owns
//! everything around that: the bounded sending queue, concurrency, timeout, retry with
//! exponential backoff, and the counters.

pub mod blackhole;
pub mod debug;
pub mod otlp;
pub mod otlphttp;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use metrics::{Counter, Gauge};
use rand::Rng;
use serde::Deserialize;
use serde_yaml::Value;
use thiserror::Error;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{self, ComponentId, Issue};
use crate::telemetry;

/// One encoded `ExportMetricsServiceRequest` on its way out.
#[derive(Debug, Clone)]
pub struct ExportItem {
    pub bytes: Bytes,
    pub data_points: u64,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ExportError {
    /// Worth another try, after `retry_after` if the server said so.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request will never be accepted; retrying would only repeat the failure.
    #[error("{0}")]
    Permanent(String),
}

/// The parsed config of one exporter.
pub trait ExporterConfig: Send + Sync + Debug {
    /// Builds the sender. Fails only on what cannot be checked before start.
    fn build(&self, id: &ComponentId) -> Result<Arc<dyn Exporter>, String>;

    /// Queue, retry and timeout; exporters that cannot fail need no retry.
    fn delivery(&self) -> DeliverySettings {
        DeliverySettings::default()
    }
}

/// Sends one request.
pub trait Exporter: Send + Sync + 'static {
    fn export(&self, item: ExportItem) -> BoxFuture<'static, Result<(), ExportError>>;
}

/// Parses, validates and compiles one component's config; issues carry key paths
/// relative to the component.
pub type ParseExporter = fn(Value) -> Result<Arc<dyn ExporterConfig>, Vec<Issue>>;

pub struct ExporterFactory {
    pub type_name: &'static str,
    pub parse: ParseExporter,
}

/// Every exporter type, in the order of the reference docs.
pub const FACTORIES: &[ExporterFactory] = &[
    otlp::FACTORY,
    otlphttp::FACTORY,
    debug::FACTORY,
    blackhole::FACTORY,
];

pub fn parse(id: &ComponentId, value: Value) -> Result<Arc<dyn ExporterConfig>, Vec<Issue>> {
    let factory = config::find_factory(FACTORIES, |f| f.type_name, "exporter", id)?;
    (factory.parse)(value)
}

/// `sending_queue`, as in the Collector's exporterhelper.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// Requests sent at once.
    #[serde(default = "default_consumers")]
    pub num_consumers: usize,
    /// Requests waiting to be sent. When full, a shadow pipeline drops and counts; any other
    /// pipeline waits, and its own queue then pushes back on receivers.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
}

fn default_consumers() -> usize {
    10
}
fn default_queue_size() -> usize {
    1000
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            num_consumers: default_consumers(),
            queue_size: default_queue_size(),
        }
    }
}

/// `retry_on_failure`, as in the Collector's exporterhelper.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_initial", with = "humantime_serde")]
    pub initial_interval: Duration,
    #[serde(default = "default_max_interval", with = "humantime_serde")]
    pub max_interval: Duration,
    /// Give up on a request after this long; 0 retries forever.
    #[serde(default = "default_max_elapsed", with = "humantime_serde")]
    pub max_elapsed_time: Duration,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
}

fn yes() -> bool {
    true
}
fn default_initial() -> Duration {
    Duration::from_secs(5)
}
fn default_max_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_max_elapsed() -> Duration {
    Duration::from_secs(300)
}
fn default_multiplier() -> f64 {
    1.5
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            initial_interval: default_initial(),
            max_interval: default_max_interval(),
            max_elapsed_time: default_max_elapsed(),
            multiplier: default_multiplier(),
        }
    }
}

impl RetrySettings {
    pub fn validate(&self, issues: &mut Vec<Issue>) {
        if self.initial_interval.is_zero() {
            issues.push(Issue::new(
                "retry_on_failure.initial_interval",
                "must be greater than 0",
            ));
        }
        if self.max_interval < self.initial_interval {
            issues.push(Issue::new(
                "retry_on_failure.max_interval",
                "must be at least initial_interval",
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            issues.push(Issue::new(
                "retry_on_failure.multiplier",
                "must be a number of at least 1",
            ));
        }
    }
}

impl QueueSettings {
    pub fn validate(&self, issues: &mut Vec<Issue>) {
        if self.num_consumers == 0 {
            issues.push(Issue::new(
                "sending_queue.num_consumers",
                "must be greater than 0",
            ));
        }
        if self.queue_size == 0 {
            issues.push(Issue::new(
                "sending_queue.queue_size",
                "must be greater than 0",
            ));
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    pub queue: QueueSettings,
    pub retry: RetrySettings,
    pub timeout: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            queue: QueueSettings::default(),
            retry: RetrySettings {
                enabled: false,
                ..RetrySettings::default()
            },
            timeout: Duration::from_secs(5),
        }
    }
}

struct DeliveryMetrics {
    sent: Counter,
    failed_permanent: Counter,
    failed_exhausted: Counter,
    enqueue_failed: Counter,
    retries: Counter,
    queue_size: Gauge,
}

/// A running exporter: its queue, its consumers and its counters. Shared by every pipeline
/// that lists the exporter; the consumers stop once the last pipeline lets go and the queue
/// is drained.
pub struct ExporterHandle {
    pub id: ComponentId,
    tx: mpsc::Sender<ExportItem>,
    metrics: Arc<DeliveryMetrics>,
}

impl ExporterHandle {
    pub fn start(
        id: ComponentId,
        exporter: Arc<dyn Exporter>,
        settings: DeliverySettings,
        tracker: &TaskTracker,
    ) -> Arc<Self> {
        let label = id.to_string();
        let queue_label = format!("exporter/{id}");
        let metrics = Arc::new(DeliveryMetrics {
            sent: metrics::counter!(telemetry::EXPORTER_SENT, "exporter" => label.clone()),
            failed_permanent: metrics::counter!(telemetry::EXPORTER_SEND_FAILED, "exporter" => label.clone(), "reason" => "permanent"),
            failed_exhausted: metrics::counter!(telemetry::EXPORTER_SEND_FAILED, "exporter" => label.clone(), "reason" => "retries_exhausted"),
            enqueue_failed: metrics::counter!(telemetry::EXPORTER_ENQUEUE_FAILED, "exporter" => label.clone()),
            retries: metrics::counter!(telemetry::EXPORTER_RETRIES, "exporter" => label),
            queue_size: metrics::gauge!(telemetry::QUEUE_SIZE, "queue" => queue_label.clone()),
        });
        metrics::gauge!(telemetry::QUEUE_CAPACITY, "queue" => queue_label)
            .set(settings.queue.queue_size as f64);
        let (tx, mut rx) = mpsc::channel::<ExportItem>(settings.queue.queue_size);
        let consumers = Arc::new(Semaphore::new(settings.queue.num_consumers));
        let worker_metrics = metrics.clone();
        let worker_tracker = tracker.clone();
        let worker_id = id.clone();
        tracker.spawn(async move {
            while let Some(item) = rx.recv().await {
                worker_metrics.queue_size.set(rx.len() as f64);
                let Ok(permit) = consumers.clone().acquire_owned().await else {
                    break;
                };
                let exporter = exporter.clone();
                let settings = settings.clone();
                let metrics = worker_metrics.clone();
                let id = worker_id.clone();
                worker_tracker.spawn(async move {
                    deliver(&id, exporter.as_ref(), item, &settings, &metrics).await;
                    drop(permit);
                });
            }
        });
        Arc::new(Self { id, tx, metrics })
    }

    /// Queues `item`. With `wait`, waits for room (backpressure); without, drops and counts
    /// when the queue is full. Returns whether the item was queued.
    pub async fn submit(&self, item: ExportItem, wait: bool) -> bool {
        let points = item.data_points;
        let queued = if wait {
            self.tx.send(item).await.is_ok()
        } else {
            self.tx.try_send(item).is_ok()
        };
        if !queued {
            self.metrics.enqueue_failed.increment(points);
        }
        self.metrics
            .queue_size
            .set((self.tx.max_capacity() - self.tx.capacity()) as f64);
        queued
    }
}

async fn deliver(
    id: &ComponentId,
    exporter: &dyn Exporter,
    item: ExportItem,
    settings: &DeliverySettings,
    metrics: &DeliveryMetrics,
) {
    let points = item.data_points;
    let started = Instant::now();
    let mut backoff = settings.retry.initial_interval;
    loop {
        let attempt = tokio::time::timeout(settings.timeout, exporter.export(item.clone())).await;
        let error = match attempt {
            Ok(Ok(())) => {
                metrics.sent.increment(points);
                return;
            }
            Ok(Err(error)) => error,
            Err(_) => ExportError::Retryable {
                message: format!("no answer within {:?}", settings.timeout),
                retry_after: None,
            },
        };
        let retry_after = match &error {
            ExportError::Permanent(message) => {
                tracing::error!(exporter = %id, data_points = points, error = %message, "export failed permanently, dropping");
                metrics.failed_permanent.increment(points);
                return;
            }
            ExportError::Retryable { retry_after, .. } => *retry_after,
        };
        // The server's throttle delay wins over our own backoff.
        let delay = retry_after.unwrap_or_else(|| jittered(backoff));
        let budget = settings.retry.max_elapsed_time;
        let exhausted = !budget.is_zero() && started.elapsed() + delay > budget;
        if !settings.retry.enabled || exhausted {
            tracing::error!(exporter = %id, data_points = points, error = %error, "export failed, no retries left, dropping");
            metrics.failed_exhausted.increment(points);
            return;
        }
        tracing::warn!(exporter = %id, error = %error, retry_in = ?delay, "export failed, will retry");
        metrics.retries.increment(1);
        tokio::time::sleep(delay).await;
        backoff = backoff
            .mul_f64(settings.retry.multiplier)
            .min(settings.retry.max_interval);
    }
}

/// ±50% randomisation, as the Collector's backoff does, so retrying agents spread out.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Checks the settings every network exporter shares: endpoint, headers, timeout, queue
/// and retry.
pub fn validate_network_settings(
    endpoint: &str,
    headers: &indexmap::IndexMap<String, String>,
    timeout: Duration,
    queue: &QueueSettings,
    retry: &RetrySettings,
    issues: &mut Vec<Issue>,
) {
    validate_endpoint("endpoint", endpoint, issues);
    validate_headers(headers, issues);
    if timeout.is_zero() {
        issues.push(Issue::new("timeout", "must be greater than 0"));
    }
    queue.validate(issues);
    retry.validate(issues);
}

/// Parses `headers:`-style maps, checking every name and value can go on the wire.
pub fn validate_headers(headers: &indexmap::IndexMap<String, String>, issues: &mut Vec<Issue>) {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            issues.push(Issue::new(
                format!("headers.{name}"),
                "not a valid HTTP header name",
            ));
        } else if http::HeaderValue::from_str(value).is_err() {
            issues.push(Issue::new(
                format!("headers.{name}"),
                "not a valid HTTP header value",
            ));
        }
    }
}

/// Checks an `http://host:port` endpoint.
pub fn validate_endpoint(key: &str, endpoint: &str, issues: &mut Vec<Issue>) {
    match endpoint.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
        Ok(uri) if uri.scheme_str() == Some("https") => issues.push(Issue::new(
            key,
            "https endpoints are not supported yet; use http:// (TLS is on the roadmap)",
        )),
        _ => issues.push(Issue::new(
            key,
            format!("invalid endpoint {endpoint:?}: expected http://host:port"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Flaky {
        calls: Arc<AtomicUsize>,
        fail_first: usize,
        error: ExportError,
    }

    impl Exporter for Flaky {
        fn export(&self, _item: ExportItem) -> BoxFuture<'static, Result<(), ExportError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let result = if n < self.fail_first {
                Err(self.error.clone())
            } else {
                Ok(())
            };
            Box::pin(async move { result })
        }
    }

    fn settings() -> DeliverySettings {
        DeliverySettings {
            queue: QueueSettings::default(),
            retry: RetrySettings {
                initial_interval: Duration::from_millis(1),
                max_interval: Duration::from_millis(4),
                max_elapsed_time: Duration::from_secs(5),
                ..RetrySettings::default()
            },
            timeout: Duration::from_secs(1),
        }
    }

    async fn run(fail_first: usize, error: ExportError) -> usize {
        let calls = Arc::new(AtomicUsize::new(0));
        let tracker = TaskTracker::new();
        let exporter = Arc::new(Flaky {
            calls: calls.clone(),
            fail_first,
            error,
        });
        let handle = ExporterHandle::start(
            ComponentId::parse("test").unwrap(),
            exporter,
            settings(),
            &tracker,
        );
        assert!(
            handle
                .submit(
                    ExportItem {
                        bytes: Bytes::new(),
                        data_points: 1
                    },
                    true
                )
                .await
        );
        drop(handle);
        tracker.close();
        tracker.wait().await;
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_until_success() {
        let calls = run(
            3,
            ExportError::Retryable {
                message: "unavailable".into(),
                retry_after: None,
            },
        )
        .await;
        assert_eq!(calls, 4);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        assert_eq!(
            run(3, ExportError::Permanent("bad request".into())).await,
            1
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_only_when_not_waiting() {
        struct Never;
        impl Exporter for Never {
            fn export(&self, _: ExportItem) -> BoxFuture<'static, Result<(), ExportError>> {
                Box::pin(std::future::pending())
            }
        }
        let tracker = TaskTracker::new();
        let mut s = settings();
        s.queue = QueueSettings {
            num_consumers: 1,
            queue_size: 1,
        };
        let handle = ExporterHandle::start(
            ComponentId::parse("x").unwrap(),
            Arc::new(Never),
            s,
            &tracker,
        );
        let item = || ExportItem {
            bytes: Bytes::new(),
            data_points: 1,
        };
        // One in flight, one queued; the consumer holds the only permit.
        assert!(handle.submit(item(), true).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(handle.submit(item(), false).await);
        assert!(!handle.submit(item(), false).await, "third must be dropped");
    }
}
