//! Phoenix node agent.
//!
//! Receivers turn OTLP requests into shared [`otlp::Batch`]es and fan them out to every
//! pipeline that lists them; each pipeline runs its processors and meters its output before
//! its exporters send it. See `docs/architecture.md`.

pub mod cli;
pub mod config;
pub mod control;
pub mod exporter;
pub mod otlp;
pub mod pipeline;
pub mod processor;
pub mod receiver;
pub mod reload;
pub mod service;
pub mod stats;
pub mod telemetry;
