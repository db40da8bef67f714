//! Phoenix control plane: the fleet of agents (connected over the agent-initiated
//! `phoenix.v1.AgentService.Connect` stream), content-addressed config versions, rollouts to
//! label selectors in waves with automatic rollback, bearer-token roles and an audit log,
//! experiments that compare a shadow candidate with the baseline and judge it, all kept in
//! SQLite (or PostgreSQL). See `docs/control-plane.md` and `docs/experiments.md`.

pub mod api;
pub mod auth;
pub mod ctl;
pub mod demo;
pub mod experiment;
pub mod grpc;
pub mod rollout;
pub mod selector;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
