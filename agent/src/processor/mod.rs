//! Processors: plain batch functions that the pipeline runner drives.
//!
//! A processor is one file holding its config (serde, unknown keys rejected), the parse
//! function that validates and compiles it, the runtime type and its tests. Adding one means
//! that file plus one line in [`FACTORIES`]. The runner, not the processor, counts data points
//! in and out, delivers deadlines and flushes on shutdown or reload.

pub mod aggregate;
pub mod attributes;
pub mod batch;
pub mod cardinality_limit;
pub mod classify;
pub mod cumulativetodelta;
pub mod deltatocumulative;
pub mod filter;
pub mod merge;
pub mod pattern;
pub mod state;
pub mod streams;
pub mod topk;
pub mod window;

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use serde_yaml::Value;
use thiserror::Error;

use crate::config::{self, ComponentId, Issue};
use crate::otlp::Payload;
use crate::stats::SeriesSink;
pub use state::{BuildContext, SharedState, StateRegistry};

/// The parsed, validated and compiled config of one processor.
pub trait ProcessorConfig: Send + Sync + Debug + Any {
    /// A runtime instance. Cannot fail: everything that can was checked when parsing.
    /// Stateful processors take their state from `context`, which carries it over a reload.
    fn build(&self, context: &mut BuildContext<'_>) -> Box<dyn Processor>;

    /// Whether the processor reads the decoded form. Receivers decode up front for such
    /// pipelines, so a request that does not decode is refused to its sender.
    fn reads_decoded(&self) -> bool {
        true
    }

    /// Whether every payload it passes on is of its own making (merged series, points it
    /// decoded itself), so that the processors after it never read a received request.
    fn replaces_input(&self) -> bool {
        false
    }

    /// A processor doing this one's work and then `next`'s in one pass over each payload,
    /// when the two can share it (a `filter` then an `attributes`: one walk of the request
    /// and one copy, not two); `None` when they cannot. `next` comes right after this one.
    fn build_fused(
        &self,
        _next: &dyn ProcessorConfig,
        _context: &mut BuildContext<'_>,
    ) -> Option<Box<dyn Processor>> {
        None
    }
}

/// A processor instance, owned by one pipeline runner.
pub trait Processor: Send {
    /// Processes one payload, pushing whatever it emits onto `out`.
    fn process(&mut self, input: Payload, out: &mut Vec<Payload>) -> Result<(), ProcessError>;

    /// [`Processor::process`] as the last stage of a pipeline. A processor that writes the
    /// one payload it emits in a walk (a rewrite) can work out that payload's series on the
    /// way: it puts them in `series` and returns true, and the meter then does not walk the
    /// payload again. Returns false when it did not.
    fn process_metered(
        &mut self,
        input: Payload,
        out: &mut Vec<Payload>,
        _series: &mut SeriesSink<'_>,
    ) -> Result<bool, ProcessError> {
        self.process(input, out)?;
        Ok(false)
    }

    /// When the runner must next call [`Processor::on_deadline`], if ever.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// Called by the runner once `now` has passed [`Processor::deadline`].
    fn on_deadline(&mut self, _now: Instant, _out: &mut Vec<Payload>) {}

    /// Emits everything held, on shutdown and when a reload retires the pipeline.
    fn flush(&mut self, _out: &mut Vec<Payload>) {}
}

#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("batch is not a decodable OTLP metrics request: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("batch is not a well-formed OTLP metrics request: {0}")]
    Wire(#[from] crate::otlp::wire::WireError),
}

/// How a processor type is known to the config: its type name and its parser.
/// Parses, validates and compiles one component's config; issues carry key paths
/// relative to the component.
pub type ParseProcessor = fn(Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>>;

pub struct ProcessorFactory {
    pub type_name: &'static str,
    pub parse: ParseProcessor,
}

/// Every processor type, in the order the reference docs list them.
pub const FACTORIES: &[ProcessorFactory] = &[
    filter::FACTORY,
    attributes::FACTORY,
    batch::FACTORY,
    classify::FACTORY,
    aggregate::FACTORY,
    cumulativetodelta::FACTORY,
    deltatocumulative::FACTORY,
    topk::FACTORY,
    cardinality_limit::FACTORY,
];

/// Parses the config of processor `id` with the factory its type names.
pub fn parse(id: &ComponentId, value: Value) -> Result<Arc<dyn ProcessorConfig>, Vec<Issue>> {
    let factory = config::find_factory(FACTORIES, |f| f.type_name, "processor", id)?;
    (factory.parse)(value)
}

#[cfg(test)]
pub mod test_util {
    use super::*;

    /// Runs `payloads` through a processor built from `yaml` and flushes it.
    pub fn run(kind: &str, yaml: &str, payloads: Vec<Payload>) -> Vec<Payload> {
        let id = ComponentId::parse(kind).unwrap();
        let config = parse(&id, serde_yaml::from_str(yaml).unwrap()).unwrap();
        let mut processor = state::standalone(config.as_ref(), "test", &id);
        let mut out = Vec::new();
        for payload in payloads {
            processor.process(payload, &mut out).unwrap();
        }
        processor.flush(&mut out);
        out
    }

    /// Runs `input` through processor `kind` built from `yaml` as the last stage of a
    /// pipeline, and checks that the series it reports for what it emits are those a walk of
    /// that output finds. Returns how many series that is.
    ///
    /// A shared batch is also run as one that another pipeline holds, twice: once with no
    /// point hashes left in it (the processor's walk leaves them, and a meter walking the
    /// batch after it must find the same series as without), once with the hashes another
    /// pipeline's meter left (which the processor's walk reads).
    pub fn assert_metered_as_walked(kind: &str, yaml: &str, input: Payload) -> usize {
        let shared = match &input {
            Payload::Shared(batch) => Some((batch.bytes().clone(), batch.data_points())),
            Payload::Decoded(_) | Payload::Encoded { .. } => None,
        };
        let series = metered_as_walked(kind, yaml, input);
        if let Some((bytes, data_points)) = shared {
            let state = crate::stats::series_hash_state();
            let mut plain = Vec::new();
            crate::stats::for_each_series(&state, &bytes, |s| plain.push(s)).unwrap();
            plain.sort_unstable();
            let fresh = || {
                Arc::new(crate::otlp::Batch::from_validated(
                    bytes.clone(),
                    data_points,
                ))
            };
            let series_of = |batch: &Arc<crate::otlp::Batch>| {
                let mut sink = Vec::new();
                crate::stats::SeriesSink::new(&state, &mut sink)
                    .walk_payload(&Payload::Shared(Arc::clone(batch)))
                    .unwrap();
                sink.sort_unstable();
                sink
            };

            // The processor's walk leaves the hashes; the other pipeline reads them.
            let recorded = fresh();
            let other = Arc::clone(&recorded);
            assert_eq!(
                metered_as_walked(kind, yaml, Payload::Shared(Arc::clone(&recorded))),
                series,
                "{yaml}"
            );
            assert_eq!(series_of(&other), plain, "{yaml}: read after the processor");

            // Another pipeline's meter left them; the processor's walk reads them.
            let read = fresh();
            let other = Arc::clone(&read);
            assert_eq!(series_of(&other), plain, "{yaml}: recorded by a meter");
            assert!(read.point_hashes().is_some() || plain.is_empty(), "{yaml}");
            assert_eq!(
                metered_as_walked(kind, yaml, Payload::Shared(read)),
                series,
                "{yaml}"
            );
        }
        series
    }

    fn metered_as_walked(kind: &str, yaml: &str, input: Payload) -> usize {
        let id = ComponentId::parse(kind).unwrap();
        let config = parse(&id, serde_yaml::from_str(yaml).unwrap()).unwrap();
        let mut processor = state::standalone(config.as_ref(), "test", &id);
        let state = crate::stats::series_hash_state();
        let mut reported = Vec::new();
        let mut out = Vec::new();
        let metered = processor
            .process_metered(input, &mut out, &mut SeriesSink::new(&state, &mut reported))
            .unwrap();
        assert!(metered, "{yaml}");
        assert!(out.len() <= 1);
        let mut walked = Vec::new();
        for payload in out {
            crate::stats::for_each_series(&state, &payload.into_bytes(), |s| walked.push(s))
                .unwrap();
        }
        reported.sort_unstable();
        walked.sort_unstable();
        assert_eq!(reported, walked, "{yaml}");
        walked.len()
    }

    /// Processor `kind` fused with processor `then` after it, if they fuse.
    pub fn fused(
        kind: &str,
        yaml: &str,
        then: &str,
        then_yaml: &str,
    ) -> Option<Box<dyn Processor>> {
        let id = ComponentId::parse(kind).unwrap();
        let config = parse(&id, serde_yaml::from_str(yaml).unwrap()).unwrap();
        let then_id = ComponentId::parse(then).unwrap();
        let then_config = parse(&then_id, serde_yaml::from_str(then_yaml).unwrap()).unwrap();
        let mut registry = state::StateRegistry::default();
        let mut context = BuildContext::new("test", &id, &Value::Null, None, &mut registry);
        config.build_fused(then_config.as_ref(), &mut context)
    }

    /// The issues that parsing `yaml` as processor `kind` reports.
    pub fn parse_issues(kind: &str, yaml: &str) -> Vec<Issue> {
        let id = ComponentId::parse(kind).unwrap();
        match parse(&id, serde_yaml::from_str(yaml).unwrap()) {
            Ok(_) => Vec::new(),
            Err(issues) => issues,
        }
    }
}
