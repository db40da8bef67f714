//! Receivers: turn what arrives into shared batches and hand them to every pipeline that
//! lists the receiver, through the current [`Pipelines`].
//!
//! Starting is two steps, bind then start, so a reload can claim its sockets before it swaps
//! pipelines and give up cleanly if a socket is taken.

pub mod hostmetrics;
pub mod otlp;

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use serde_yaml::Value;

use crate::config::{self, ComponentId, Issue};
use crate::pipeline::Pipelines;

/// The parsed config of one receiver.
pub trait ReceiverConfig: Send + Sync + Debug + Any {
    /// `(key path, address)` of every socket the receiver listens on, for duplicate checks.
    fn listen_addresses(&self) -> Vec<(String, String)>;

    /// Claims the receiver's sockets.
    fn bind(&self) -> Result<Box<dyn BoundReceiver>, String>;

    fn as_any(&self) -> &dyn Any;
}

/// A receiver whose sockets are bound but which serves nothing yet.
pub trait BoundReceiver: Send {
    fn start(self: Box<Self>, ctx: ReceiverContext) -> Box<dyn RunningReceiver>;
}

/// A serving receiver.
pub trait RunningReceiver: Send + Sync {
    /// Applies `config` in place if that needs no new sockets; says whether it did.
    fn reconfigure(&self, config: &dyn ReceiverConfig) -> bool;

    /// Stops accepting, finishes the requests in flight, closes the sockets.
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// What a running receiver needs from the agent.
#[derive(Clone)]
pub struct ReceiverContext {
    pub id: ComponentId,
    pub pipelines: Arc<ArcSwap<Pipelines>>,
}

/// Parses, validates and compiles one component's config; issues carry key paths
/// relative to the component.
pub type ParseReceiver = fn(Value) -> Result<Arc<dyn ReceiverConfig>, Vec<Issue>>;

pub struct ReceiverFactory {
    pub type_name: &'static str,
    pub parse: ParseReceiver,
}

/// Every receiver type, in the order of the reference docs.
pub const FACTORIES: &[ReceiverFactory] = &[otlp::FACTORY, hostmetrics::FACTORY];

pub fn parse(id: &ComponentId, value: Value) -> Result<Arc<dyn ReceiverConfig>, Vec<Issue>> {
    let factory = config::find_factory(FACTORIES, |f| f.type_name, "receiver", id)?;
    (factory.parse)(value)
}
