//! Pipelines: the compiled, immutable graph that receivers dispatch into.
//!
//! A [`Pipelines`] value is built completely from a validated config, then swapped in whole
//! (arc-swap). Running pieces whose config did not change are carried into the new value
//! untouched, so their state and queues survive a reload; the rest drain on the old value.

mod runner;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use indexmap::IndexMap;
use metrics::{Counter, Gauge};
use serde_yaml::Value;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::config::{AgentConfig, Component, ComponentId, PipelineSpec};
use crate::exporter::ExporterHandle;
use crate::otlp::Batch;
use crate::processor::{BuildContext, StateRegistry};
use crate::stats::meter::MeterConfig;
use crate::telemetry;

/// How long a receiver waits for room in a full pipeline before refusing the request.
pub const BACKPRESSURE_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("exporters.{id}: {message}")]
    Exporter { id: ComponentId, message: String },
}

/// Why a batch could not be handed to every pipeline that must take it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DispatchError {
    #[error("pipeline {pipeline:?} is full")]
    Full { pipeline: String },
    #[error("pipeline {pipeline:?} is closed")]
    Closed { pipeline: String },
}

/// The input side of one running pipeline.
pub struct PipelineInput {
    pub name: String,
    pub shadow: bool,
    tx: mpsc::Sender<Arc<Batch>>,
    incoming: Counter,
    dropped_queue_full: Counter,
    queue_size: Gauge,
}

impl PipelineInput {
    fn record_queue(&self) {
        self.queue_size
            .set((self.tx.max_capacity() - self.tx.capacity()) as f64);
    }
}

/// The `meter` config a running pipeline's output meter applies; a reload stores the new
/// one here instead of restarting the pipeline.
pub type MeterSlot = Arc<ArcSwapOption<MeterConfig>>;

/// A running pipeline and the config it runs, for reload diffs.
pub struct RunningPipeline {
    pub input: Arc<PipelineInput>,
    fingerprint: Fingerprint,
    meter: MeterSlot,
}

/// Everything a pipeline's runtime depends on; equal fingerprints mean it can be kept.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    processors: Vec<(ComponentId, Value)>,
    exporters: Vec<(ComponentId, Value)>,
    shadow: bool,
    queue_size: usize,
}

/// Where one receiver's batches go.
pub struct Route {
    targets: Vec<Arc<PipelineInput>>,
    needs_decoded: bool,
}

impl Route {
    /// Whether a pipeline downstream changes data and so needs the decoded form.
    pub fn needs_decoded(&self) -> bool {
        self.needs_decoded
    }

    /// Hands `batch` to every pipeline. Pipelines that are not shadow must all take it, or
    /// none does (the sender retries the whole request, so nothing is delivered twice);
    /// a full shadow pipeline drops its copy and counts it.
    pub async fn dispatch(&self, batch: Arc<Batch>) -> Result<(), DispatchError> {
        let points = batch.data_points();
        let deadline = tokio::time::Instant::now() + BACKPRESSURE_WAIT;
        let mut permits = Vec::with_capacity(self.targets.len());
        for target in self.targets.iter().filter(|t| !t.shadow) {
            let permit = match target.tx.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    return Err(DispatchError::Closed {
                        pipeline: target.name.clone(),
                    })
                }
                Err(mpsc::error::TrySendError::Full(())) => {
                    match tokio::time::timeout_at(deadline, target.tx.reserve()).await {
                        Ok(Ok(permit)) => permit,
                        Ok(Err(_)) => {
                            return Err(DispatchError::Closed {
                                pipeline: target.name.clone(),
                            })
                        }
                        Err(_) => {
                            return Err(DispatchError::Full {
                                pipeline: target.name.clone(),
                            })
                        }
                    }
                }
            };
            permits.push((target, permit));
        }
        let shadows = self.targets.iter().filter(|t| t.shadow).count();
        let mut references = references(batch, permits.len() + shadows);
        for (target, permit) in permits {
            let Some(batch) = references.next() else {
                break;
            };
            permit.send(batch);
            target.incoming.increment(points);
            target.record_queue();
        }
        for target in self.targets.iter().filter(|t| t.shadow) {
            let Some(batch) = references.next() else {
                break;
            };
            if target.tx.try_send(batch).is_ok() {
                target.incoming.increment(points);
            } else {
                target.dropped_queue_full.increment(points);
            }
            target.record_queue();
        }
        Ok(())
    }
}

/// `n` references to `batch` for `n` pipelines, the last one `batch` itself: once all are
/// handed out the sender holds none, and a pipeline that finds itself a batch's only holder
/// knows no other will walk it (see `stats::PointMemo::for_batch`).
fn references(batch: Arc<Batch>, n: usize) -> impl Iterator<Item = Arc<Batch>> {
    let mut batch = Some(batch);
    (0..n).rev().filter_map(move |left| {
        if left == 0 {
            batch.take()
        } else {
            batch.clone()
        }
    })
}

/// The running pipelines of one config.
pub struct Pipelines {
    pub config: Arc<AgentConfig>,
    routes: HashMap<String, Route>,
    running: IndexMap<String, Arc<RunningPipeline>>,
    exporters: HashMap<ComponentId, (Value, Arc<ExporterHandle>)>,
    states: StateRegistry,
}

impl Pipelines {
    /// A value with no pipelines: what is left once shutdown has let go of the last one.
    pub fn empty(config: Arc<AgentConfig>) -> Self {
        Self {
            config,
            routes: HashMap::new(),
            running: IndexMap::new(),
            exporters: HashMap::new(),
            states: StateRegistry::default(),
        }
    }

    pub fn route(&self, receiver: &str) -> Option<&Route> {
        self.routes.get(receiver)
    }

    /// Builds the pipelines of `config`, keeping whatever of `previous` is unchanged.
    /// New runners and exporters are spawned on `tracker`, which shutdown waits on.
    pub fn build(
        config: Arc<AgentConfig>,
        previous: Option<&Pipelines>,
        tracker: &TaskTracker,
    ) -> Result<Self, BuildError> {
        let mut exporters = HashMap::new();
        for spec in config.pipelines.values() {
            for name in &spec.exporters {
                let Some(component) = config.exporters.iter().find(|(id, _)| id.as_str() == name)
                else {
                    continue; // validation guarantees every reference resolves
                };
                let (id, component) = component;
                if exporters.contains_key(id) {
                    continue;
                }
                let kept = previous
                    .and_then(|p| p.exporters.get(id))
                    .filter(|(raw, _)| *raw == component.raw)
                    .map(|(_, handle)| handle.clone());
                let handle =
                    match kept {
                        Some(handle) => handle,
                        None => {
                            let exporter = component.config.build(id).map_err(|message| {
                                BuildError::Exporter {
                                    id: id.clone(),
                                    message,
                                }
                            })?;
                            ExporterHandle::start(
                                id.clone(),
                                exporter,
                                component.config.delivery(),
                                tracker,
                            )
                        }
                    };
                exporters.insert(id.clone(), (component.raw.clone(), handle));
            }
        }

        let mut running = IndexMap::new();
        let mut states = StateRegistry::default();
        let previous_states = previous.map(|p| &p.states);
        for (name, spec) in &config.pipelines {
            let fingerprint = fingerprint(&config, spec);
            let kept = previous
                .and_then(|p| p.running.get(name))
                .filter(|r| r.fingerprint == fingerprint)
                .cloned();
            let pipeline = match kept {
                Some(pipeline) => {
                    if let Some(previous_states) = previous_states {
                        states.keep_pipeline(previous_states, name);
                    }
                    pipeline.meter.store(config.meter.clone());
                    pipeline
                }
                None => {
                    let stages = build_stages(name, spec, &config, previous_states, &mut states);
                    let meter = Arc::new(ArcSwapOption::new(config.meter.clone()));
                    start_pipeline(name, spec, stages, &exporters, fingerprint, meter, tracker)
                }
            };
            running.insert(name.clone(), pipeline);
        }

        let mut routes: HashMap<String, Route> = HashMap::new();
        for (name, spec) in &config.pipelines {
            // Up to the first processor that passes on payloads of its own making: the ones
            // after it never read the received request.
            let mut needs_decoded = false;
            for p in &spec.processors {
                let Some((_, c)) = config.processors.iter().find(|(id, _)| id.as_str() == p) else {
                    continue;
                };
                if c.config.reads_decoded() {
                    needs_decoded = true;
                    break;
                }
                if c.config.replaces_input() {
                    break;
                }
            }
            for receiver in &spec.receivers {
                let route = routes.entry(receiver.clone()).or_insert_with(|| Route {
                    targets: Vec::new(),
                    needs_decoded: false,
                });
                if let Some(pipeline) = running.get(name) {
                    route.targets.push(pipeline.input.clone());
                }
                route.needs_decoded |= needs_decoded;
            }
        }

        Ok(Self {
            config,
            routes,
            running,
            exporters,
            states,
        })
    }
}

fn fingerprint(config: &AgentConfig, spec: &PipelineSpec) -> Fingerprint {
    Fingerprint {
        processors: raw_configs(&config.processors, &spec.processors),
        exporters: raw_configs(&config.exporters, &spec.exporters),
        shadow: spec.shadow,
        queue_size: spec.queue_size,
    }
}

/// The ids and raw configs of the components a pipeline lists, in its order.
fn raw_configs<C: ?Sized>(
    defined: &IndexMap<ComponentId, Component<C>>,
    ids: &[String],
) -> Vec<(ComponentId, Value)> {
    ids.iter()
        .filter_map(|id| defined.iter().find(|(k, _)| k.as_str() == id))
        .map(|(k, c)| (k.clone(), c.raw.clone()))
        .collect()
}

/// The processors of a pipeline being (re)started, each with its state carried over from
/// `previous` where its config is unchanged.
fn build_stages(
    name: &str,
    spec: &PipelineSpec,
    config: &AgentConfig,
    previous: Option<&StateRegistry>,
    states: &mut StateRegistry,
) -> Vec<runner::Stage> {
    let processors: Vec<_> = spec
        .processors
        .iter()
        .filter_map(|p| config.processors.iter().find(|(id, _)| id.as_str() == p))
        .collect();
    let mut stages = Vec::with_capacity(processors.len());
    let mut i = 0;
    while let Some((id, c)) = processors.get(i) {
        let mut context = BuildContext::new(name, id, &c.raw, previous, states);
        // Two processors that can share one pass over each payload run as one stage.
        let fused = processors.get(i + 1).and_then(|(next_id, next)| {
            let fused = c.config.build_fused(next.config.as_ref(), &mut context)?;
            Some(runner::Stage::fused(name, id, next_id, fused))
        });
        match fused {
            Some(stage) => {
                stages.push(stage);
                i += 2;
            }
            None => {
                stages.push(runner::Stage::new(name, id, c.config.build(&mut context)));
                i += 1;
            }
        }
    }
    stages
}

fn start_pipeline(
    name: &str,
    spec: &PipelineSpec,
    stages: Vec<runner::Stage>,
    exporters: &HashMap<ComponentId, (Value, Arc<ExporterHandle>)>,
    fingerprint: Fingerprint,
    meter: MeterSlot,
    tracker: &TaskTracker,
) -> Arc<RunningPipeline> {
    let (tx, rx) = mpsc::channel(spec.queue_size);
    let queue_label = format!("pipeline/{name}");
    metrics::gauge!(telemetry::QUEUE_CAPACITY, "queue" => queue_label.clone())
        .set(spec.queue_size as f64);
    let input = Arc::new(PipelineInput {
        name: name.to_string(),
        shadow: spec.shadow,
        tx,
        incoming: metrics::counter!(telemetry::PIPELINE_INCOMING, "pipeline" => name.to_string()),
        dropped_queue_full: metrics::counter!(telemetry::PIPELINE_DROPPED, "pipeline" => name.to_string(), "reason" => "queue_full"),
        queue_size: metrics::gauge!(telemetry::QUEUE_SIZE, "queue" => queue_label),
    });
    let outputs = spec
        .exporters
        .iter()
        .filter_map(|e| {
            exporters
                .iter()
                .find(|(id, _)| id.as_str() == e)
                .map(|(_, (_, h))| h.clone())
        })
        .collect();
    tracker.spawn(runner::run(
        name.to_string(),
        rx,
        stages,
        outputs,
        spec.shadow,
        input.queue_size.clone(),
        meter.clone(),
    ));
    Arc::new(RunningPipeline {
        input,
        fingerprint,
        meter,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Once every pipeline has its reference, the sender holds none.
    #[test]
    fn the_last_pipeline_gets_the_senders_own_reference() {
        for n in 1..4 {
            let batch = Arc::new(Batch::from_request(crate::otlp::testdata::request(1, 1, 1)));
            let mut references = references(batch, n);
            let handed: Vec<_> = references.by_ref().take(n).collect();
            assert!(handed.iter().all(|b| Arc::strong_count(b) == n), "{n}");
            assert!(references.next().is_none());
        }
    }

    /// A `filter` followed by an `attributes` processor runs as one stage; any other order or
    /// neighbour does not.
    #[test]
    fn a_filter_then_attributes_run_as_one_stage() {
        let cases = [
            ("[filter, attributes]", 1),
            ("[filter, attributes, attributes/2, filter/2]", 3),
            ("[attributes, filter]", 2),
            ("[filter, filter/2, attributes]", 2),
            ("[filter, batch, attributes]", 3),
        ];
        for (processors, stages) in cases {
            let yaml = format!(
                r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:0" }} }} }}
processors:
  filter: {{ exclude: {{ metric_names: [x] }} }}
  filter/2: {{ exclude: {{ metric_names: [y] }} }}
  attributes: {{ actions: [{{ key: a, action: delete }}] }}
  attributes/2: {{ actions: [{{ key: b, action: delete }}] }}
  batch: {{}}
exporters:
  blackhole: {{}}
pipelines:
  p:
    receivers: [otlp]
    processors: {processors}
    exporters: [blackhole]
"#
            );
            let config = AgentConfig::from_yaml(&yaml, std::path::Path::new("a.yaml")).unwrap();
            let spec = &config.pipelines["p"];
            let mut states = StateRegistry::default();
            let built = build_stages("p", spec, &config, None, &mut states);
            assert_eq!(built.len(), stages, "{processors}");
        }
    }

    /// Receivers decode a request up front only for a pipeline whose processors read the
    /// received request decoded; what comes after `aggregate` reads only its output.
    #[tokio::test]
    async fn receivers_decode_only_for_processors_that_read_the_request_decoded() {
        let cases = [
            ("[classify/resource, aggregate, topk]", false),
            ("[filter, attributes]", false),
            ("[topk]", true),
            ("[classify/datapoint, aggregate]", true),
            ("[aggregate, classify/datapoint]", false),
        ];
        for (processors, decoded) in cases {
            let yaml = format!(
                r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:0" }} }} }}
processors:
  classify/resource: {{ attribute: p, rules: [{{ match: {{ a: x }}, value: y }}] }}
  classify/datapoint: {{ attribute: p, on: datapoint, rules: [{{ match: {{ a: x }}, value: y }}] }}
  aggregate: {{ keep: [a] }}
  topk: {{ k: 1, entity: [a], rank_by: m }}
  filter: {{ exclude: {{ metric_names: [x] }} }}
  attributes: {{ actions: [{{ key: a, action: delete }}] }}
exporters:
  blackhole: {{}}
pipelines:
  p:
    receivers: [otlp]
    processors: {processors}
    exporters: [blackhole]
"#
            );
            let config =
                Arc::new(AgentConfig::from_yaml(&yaml, std::path::Path::new("a.yaml")).unwrap());
            let tracker = TaskTracker::new();
            let pipelines = Pipelines::build(config, None, &tracker).unwrap();
            let route = pipelines.route("otlp").unwrap();
            assert_eq!(route.needs_decoded(), decoded, "{processors}");
        }
    }
}
