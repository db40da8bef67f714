//! Wire contracts between the Phoenix agent, control plane and CLI.
//!
//! The `phoenix.v1` control-plane contracts land here with the control-plane work; the agent's
//! data plane speaks OTLP, whose types come from `opentelemetry-proto`.
