//! State that outlives one processor instance.
//!
//! A reload rebuilds every pipeline whose config changed, but a stateful processor whose own
//! config did not change must keep its state: counters must not restart, windows must not
//! reset. The new instance therefore asks its [`BuildContext`] for its state, and gets the
//! very state the instance it replaces is using, or a fresh one when the processor is new to
//! the pipeline or its config changed.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use serde_yaml::Value;

use crate::config::ComponentId;

type StateKey = (String, ComponentId);

/// The states of the processors of one set of running pipelines, by pipeline and processor.
/// Weak references: a state lives exactly as long as some processor instance uses it.
#[derive(Default)]
pub struct StateRegistry {
    states: HashMap<StateKey, (Value, Weak<dyn Any + Send + Sync>)>,
}

impl StateRegistry {
    /// Records the states of `pipeline` from `previous`: the pipeline keeps running as it
    /// is, and a later reload must still find them.
    pub fn keep_pipeline(&mut self, previous: &StateRegistry, pipeline: &str) {
        for (key, entry) in &previous.states {
            if key.0 == pipeline {
                self.states.insert(key.clone(), entry.clone());
            }
        }
    }
}

/// What building one processor instance may use: where it runs, and the state of the
/// instance it replaces.
pub struct BuildContext<'a> {
    pipeline: &'a str,
    id: &'a ComponentId,
    raw: &'a Value,
    previous: Option<&'a StateRegistry>,
    registry: &'a mut StateRegistry,
}

impl<'a> BuildContext<'a> {
    /// A context for processor `id` of `pipeline`, whose config is `raw`; states are taken
    /// from `previous` when their config matches and recorded in `registry`.
    pub fn new(
        pipeline: &'a str,
        id: &'a ComponentId,
        raw: &'a Value,
        previous: Option<&'a StateRegistry>,
        registry: &'a mut StateRegistry,
    ) -> Self {
        Self {
            pipeline,
            id,
            raw,
            previous,
            registry,
        }
    }

    pub fn pipeline(&self) -> &str {
        self.pipeline
    }

    pub fn id(&self) -> &ComponentId {
        self.id
    }

    /// The state of this processor: the one the replaced instance uses if it ran in the same
    /// pipeline with the same config, a fresh `S::default()` otherwise.
    pub fn state<S: Default + Send + 'static>(&mut self) -> SharedState<S> {
        let key = (self.pipeline.to_string(), self.id.clone());
        let carried = self
            .previous
            .and_then(|previous| previous.states.get(&key))
            .filter(|(raw, _)| raw == self.raw)
            .and_then(|(_, weak)| weak.upgrade())
            .and_then(|any| any.downcast::<Mutex<S>>().ok());
        let state = carried.unwrap_or_else(|| Arc::new(Mutex::new(S::default())));
        let any: Arc<dyn Any + Send + Sync> = state.clone();
        self.registry
            .states
            .insert(key, (self.raw.clone(), Arc::downgrade(&any)));
        SharedState(state)
    }
}

/// A processor's state, possibly shared with the instance it replaced or the one replacing it.
pub struct SharedState<S>(Arc<Mutex<S>>);

impl<S> SharedState<S> {
    pub fn lock(&self) -> MutexGuard<'_, S> {
        // A panic while holding the lock leaves state that is still memory-safe to use.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether another instance uses this state too. A retired instance's flush must then
    /// leave what it holds to its successor instead of emitting it.
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

/// Builds processors outside any running pipeline (tests and benchmarks): nothing carried.
pub fn standalone(
    config: &dyn super::ProcessorConfig,
    pipeline: &str,
    id: &ComponentId,
) -> Box<dyn super::Processor> {
    let mut registry = StateRegistry::default();
    config.build(&mut BuildContext::new(
        pipeline,
        id,
        &Value::Null,
        None,
        &mut registry,
    ))
}

/// [`super::ProcessorConfig::build_fused`] outside any pipeline, as [`standalone`] builds.
pub fn standalone_fused(
    config: &dyn super::ProcessorConfig,
    next: &dyn super::ProcessorConfig,
    pipeline: &str,
    id: &ComponentId,
) -> Option<Box<dyn super::Processor>> {
    let mut registry = StateRegistry::default();
    config.build_fused(
        next,
        &mut BuildContext::new(pipeline, id, &Value::Null, None, &mut registry),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_state(
        raw: &str,
        previous: Option<&StateRegistry>,
        registry: &mut StateRegistry,
    ) -> SharedState<u64> {
        let id = ComponentId::parse("aggregate/x").unwrap();
        let raw: Value = serde_yaml::from_str(raw).unwrap();
        BuildContext::new("candidate", &id, &raw, previous, registry).state()
    }

    #[test]
    fn unchanged_config_carries_the_state_over() {
        let mut first = StateRegistry::default();
        let old = build_state("interval: 10s", None, &mut first);
        *old.lock() = 42;
        let mut second = StateRegistry::default();
        let new = build_state("interval: 10s", Some(&first), &mut second);
        assert_eq!(*new.lock(), 42);
        assert!(old.is_shared() && new.is_shared());
        drop(old);
        assert!(!new.is_shared());
    }

    #[test]
    fn changed_config_starts_fresh() {
        let mut first = StateRegistry::default();
        let old = build_state("interval: 10s", None, &mut first);
        *old.lock() = 42;
        let mut second = StateRegistry::default();
        let new = build_state("interval: 20s", Some(&first), &mut second);
        assert_eq!(*new.lock(), 0);
        assert!(!old.is_shared());
    }

    #[test]
    fn a_state_no_instance_uses_any_more_is_not_revived() {
        let mut first = StateRegistry::default();
        *build_state("{}", None, &mut first).lock() = 7;
        let mut second = StateRegistry::default();
        assert_eq!(*build_state("{}", Some(&first), &mut second).lock(), 0);
    }
}
