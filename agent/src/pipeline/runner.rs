//! The task that drives one pipeline: takes batches off its queue, runs them through the
//! processors in order, meters the output and hands it to the exporters. It also delivers
//! processor deadlines, and flushes everything once its queue is closed and empty.

use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge};
use tokio::sync::mpsc;

use super::MeterSlot;
use crate::config::ComponentId;
use crate::exporter::{ExportItem, ExporterHandle};
use crate::otlp::{Batch, Payload};
use crate::processor::Processor;
use crate::stats::meter::MeterConfig;
use crate::stats::{SeriesSink, VolumeMeter};
use crate::telemetry;

pub struct Stage {
    id: ComponentId,
    processor: Box<dyn Processor>,
    incoming: Counter,
    outgoing: Counter,
    dropped: Counter,
    /// The counters of a second processor whose work this one does too (see
    /// `ProcessorConfig::build_fused`); it drops nothing, so what it takes in is what this
    /// stage passes on.
    fused: Option<(Counter, Counter)>,
}

fn processor_counters(pipeline: &str, id: &ComponentId) -> (Counter, Counter) {
    let (p, c) = (pipeline.to_string(), id.to_string());
    (
        metrics::counter!(telemetry::PROCESSOR_INCOMING, "pipeline" => p.clone(), "processor" => c.clone()),
        metrics::counter!(telemetry::PROCESSOR_OUTGOING, "pipeline" => p, "processor" => c),
    )
}

impl Stage {
    pub fn new(pipeline: &str, id: &ComponentId, processor: Box<dyn Processor>) -> Self {
        let (incoming, outgoing) = processor_counters(pipeline, id);
        Self {
            id: id.clone(),
            processor,
            incoming,
            outgoing,
            dropped: metrics::counter!(telemetry::PIPELINE_DROPPED, "pipeline" => pipeline.to_string(), "reason" => "processor_error"),
            fused: None,
        }
    }

    /// A stage doing the work of processors `id` and `then`, in that order.
    pub fn fused(
        pipeline: &str,
        id: &ComponentId,
        then: &ComponentId,
        processor: Box<dyn Processor>,
    ) -> Self {
        Self {
            fused: Some(processor_counters(pipeline, then)),
            ..Self::new(pipeline, id, processor)
        }
    }
}

/// Runs `payloads` through `stages`, returning what leaves the last one, and whether the last
/// processor put the series of the one payload it wrote into `series` (see
/// [`Processor::process_metered`](crate::processor::Processor::process_metered)).
fn run_stages(
    stages: &mut [Stage],
    mut payloads: Vec<Payload>,
    mut series: Option<SeriesSink<'_>>,
) -> (Vec<Payload>, bool) {
    let mut premetered = false;
    let last = stages.len().checked_sub(1);
    for (i, stage) in stages.iter_mut().enumerate() {
        if payloads.is_empty() {
            break;
        }
        let mut sink = match series.as_mut() {
            Some(sink) if Some(i) == last && payloads.len() == 1 => Some(sink),
            _ => None,
        };
        let mut next = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let points = payload.data_points();
            stage.incoming.increment(points);
            let processed = match sink.as_deref_mut() {
                Some(sink) => stage.processor.process_metered(payload, &mut next, sink),
                None => stage.processor.process(payload, &mut next).map(|()| false),
            };
            premetered = match processed {
                Ok(metered) => metered,
                Err(err) => {
                    tracing::warn!(processor = %stage.id, error = %err, "processor dropped a batch");
                    stage.dropped.increment(points);
                    false
                }
            };
        }
        let passed_on = next.iter().map(Payload::data_points).sum();
        stage.outgoing.increment(passed_on);
        if let Some((incoming, outgoing)) = &stage.fused {
            incoming.increment(passed_on);
            outgoing.increment(passed_on);
        }
        payloads = next;
    }
    let premetered = premetered && payloads.len() == 1;
    (payloads, premetered)
}

struct Output {
    meter: VolumeMeter,
    /// The `meter` config as last stored by a reload, and the one the meter applies.
    meter_config: MeterSlot,
    applied: Option<Arc<MeterConfig>>,
    exporters: Vec<Arc<ExporterHandle>>,
    /// A shadow pipeline never waits for its exporters: it drops and counts instead.
    shadow: bool,
}

impl Output {
    /// Picks up a `meter` config a reload stored; one atomic load when nothing changed.
    fn refresh_meter_config(&mut self) {
        let current = self.meter_config.load();
        let same = match (&*current, &self.applied) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.applied = current.clone();
            self.meter.set_config(self.applied.clone());
        }
    }

    /// Meters and exports what left the processors; `premetered`: the series of the one
    /// payload are in the meter's series sink already.
    async fn emit(&mut self, payloads: Vec<Payload>, premetered: bool) {
        if payloads.is_empty() {
            return;
        }
        let premetered = premetered && payloads.len() == 1;
        if !premetered {
            self.refresh_meter_config();
        }
        for payload in payloads {
            let data_points = payload.data_points();
            let bytes = if premetered {
                let bytes = payload.into_bytes();
                self.meter.observe_premetered(bytes.len(), data_points);
                bytes
            } else {
                self.meter.observe_payload(payload)
            };
            for exporter in &self.exporters {
                let item = ExportItem {
                    bytes: bytes.clone(),
                    data_points,
                };
                exporter.submit(item, !self.shadow).await;
            }
        }
    }
}

pub async fn run(
    name: String,
    mut rx: mpsc::Receiver<Arc<Batch>>,
    mut stages: Vec<Stage>,
    exporters: Vec<Arc<ExporterHandle>>,
    shadow: bool,
    queue_size: Gauge,
    meter_config: MeterSlot,
) {
    let mut output = Output {
        meter: VolumeMeter::new(&name),
        meter_config,
        applied: None,
        exporters,
        shadow,
    };
    output.refresh_meter_config();
    loop {
        let next_deadline = stages
            .iter()
            .filter_map(|s| s.processor.deadline())
            .fold(output.meter.next_rotation(), Instant::min);
        tokio::select! {
            received = rx.recv() => {
                let Some(batch) = received else { break };
                queue_size.set(rx.len() as f64);
                // The meter config is picked up before the processors run: whether the last
                // one may meter its output depends on it.
                output.refresh_meter_config();
                let series = output.meter.series_sink();
                let (out, premetered) =
                    run_stages(&mut stages, vec![Payload::Shared(batch)], series);
                output.emit(out, premetered).await;
            }
            () = tokio::time::sleep_until(next_deadline.into()) => {
                let now = Instant::now();
                for i in 0..stages.len() {
                    if stages[i].processor.deadline().is_some_and(|d| d <= now) {
                        let mut out = Vec::new();
                        stages[i].processor.on_deadline(now, &mut out);
                        let (out, _) = run_stages(&mut stages[i + 1..], out, None);
                        output.emit(out, false).await;
                    }
                }
                output.refresh_meter_config();
                output.meter.rotate_if_due(now);
            }
        }
    }
    // The queue is closed and empty: every sender is gone. Flush stage by stage, each
    // flush running through the stages after it.
    for i in 0..stages.len() {
        let mut out = Vec::new();
        stages[i].processor.flush(&mut out);
        let (out, _) = run_stages(&mut stages[i + 1..], out, None);
        output.emit(out, false).await;
    }
    output.meter.rotate_if_due(output.meter.next_rotation());
    tracing::debug!(pipeline = %name, "pipeline drained");
}
