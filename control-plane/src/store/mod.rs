//! The control plane's state behind one small trait: agents, content-addressed config
//! versions, rollouts with their deployments and events, what each node should run, the audit
//! log and tokens. [`sqlite::SqliteStore`] is the implementation.

#[cfg(test)]
pub(crate) mod conformance;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use serde::Serialize;
use thiserror::Error;

use crate::auth::Role;
use crate::experiment::ExperimentState;
use crate::rollout::{DeploymentState, RolloutState};

/// Unix time in milliseconds.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or_default()
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("cannot migrate the schema: the database is at version {found}, newer than this build's {known}")]
    TooNew { found: i64, known: i64 },
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Conflict(String),
}

/// Opens the store named by `spec`: a `postgres://` or `postgresql://` URL, else a SQLite
/// file path.
pub fn open(spec: &str) -> Result<std::sync::Arc<dyn Store>> {
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(postgres::PostgresStore::connect(spec)?))
    } else {
        Ok(std::sync::Arc::new(sqlite::SqliteStore::open(
            std::path::Path::new(spec),
        )?))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRecord {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub capabilities: Vec<String>,
    pub effective_config_hash: String,
    pub applied_offer_hash: String,
    pub first_seen: Millis,
    pub last_seen: Millis,
    /// The last volume report, as JSON.
    pub last_report: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigVersion {
    pub hash: String,
    pub document: String,
    pub created_at: Millis,
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewRollout {
    pub selector: String,
    pub config_hash: String,
    pub role: String,
    pub max_unavailable: u32,
    pub wave_delay_ms: u64,
    pub created_by: String,
}

/// A node a new rollout will change, its wave, and what it runs now (`None`: its local file
/// alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeployment {
    pub node: String,
    pub wave: u32,
    pub previous: Option<NodeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRecord {
    pub id: i64,
    pub selector: String,
    pub config_hash: String,
    /// `candidate` or `baseline`.
    pub role: String,
    pub state: RolloutState,
    pub max_unavailable: u32,
    pub wave_delay_ms: u64,
    pub created_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Why the rollout stopped or was rolled back.
    pub reason: String,
    /// The state a rollback ends in: `failed` (automatic) or `rolled_back` (manual).
    pub rollback_outcome: Option<RolloutState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeploymentRecord {
    pub rollout_id: i64,
    pub node: String,
    pub wave: u32,
    pub state: DeploymentState,
    /// What the node ran before (config hash, empty for its local file alone) and its role.
    pub previous_hash: String,
    pub previous_role: String,
    /// The rollout that had set the previous config, if any.
    pub previous_rollout: Option<i64>,
    /// The agent's error text for a FAILED ack, or why the node was skipped.
    pub message: String,
    pub updated_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutEvent {
    pub at: Millis,
    pub kind: String,
    pub message: String,
}

/// The remote config a node should run, and the rollout that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    pub node: String,
    pub config_hash: String,
    pub role: String,
    pub rollout_id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub at: Millis,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    pub created_at: Millis,
}

/// An experiment: its definition as submitted and the engine's progress (phase times,
/// rollouts, counters at the last window edge, the verdict), as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentRecord {
    pub id: i64,
    pub name: String,
    pub state: ExperimentState,
    pub document: String,
    pub progress: serde_json::Value,
    pub created_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A state change of an experiment: when, who (a token name, or `engine`), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExperimentEvent {
    pub at: Millis,
    pub actor: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Stored text that does not parse back into what it was written from.
pub(crate) fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} {value:?}"))
}

/// One row of `SELECT state, COUNT(*) ... GROUP BY state`.
pub(crate) fn state_count<S>(
    parse: impl Fn(&str) -> Option<S>,
    what: &str,
    state: &str,
    count: i64,
) -> Result<(S, u64)> {
    let state = parse(state).ok_or_else(|| corrupt(what, state))?;
    Ok((state, count.max(0) as u64))
}

/// Checks, inside the transaction that read `current`, that experiment `id` may become
/// `to`; returns the state it leaves.
pub(crate) fn experiment_transition(
    id: i64,
    current: &str,
    to: ExperimentState,
) -> Result<ExperimentState> {
    let from =
        ExperimentState::parse(current).ok_or_else(|| corrupt("experiment state", current))?;
    if from.can_become(to) {
        Ok(from)
    } else {
        Err(experiment_conflict(id, from, to))
    }
}

/// The states the engine drives, as an SQL list: `'pending', 'deploying', ...`.
pub fn live_experiment_states_sql() -> String {
    ExperimentState::ALL
        .iter()
        .filter(|s| s.is_live())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The conflict error of a refused experiment transition.
pub fn experiment_conflict(id: i64, from: ExperimentState, to: ExperimentState) -> StoreError {
    let next = from.next_states();
    StoreError::Conflict(format!(
        "experiment {id} is {}; it cannot become {} (it can become: {})",
        from.as_str(),
        to.as_str(),
        if next.is_empty() {
            "nothing, it has ended".to_string()
        } else {
            next.join(", ")
        }
    ))
}

/// Everything the control plane keeps. Calls are short and synchronous; each mutating call
/// is one transaction.
pub trait Store: Send + Sync {
    fn upsert_agent(&self, agent: &AgentRecord) -> Result<()>;
    fn set_agent_report(&self, node: &str, report: &serde_json::Value, at: Millis) -> Result<()>;
    fn set_agent_hashes(
        &self,
        node: &str,
        effective: &str,
        applied_offer: &str,
        at: Millis,
    ) -> Result<()>;
    fn agents(&self) -> Result<Vec<AgentRecord>>;
    fn agent(&self, node: &str) -> Result<Option<AgentRecord>>;

    /// Stores a config version; storing the same hash again is a no-op.
    fn put_config(&self, config: &ConfigVersion) -> Result<()>;
    fn config(&self, hash: &str) -> Result<Option<ConfigVersion>>;

    /// Creates a rollout with its deployments and its `created` event, in one transaction.
    fn create_rollout(&self, rollout: &NewRollout, deployments: &[NewDeployment]) -> Result<i64>;
    fn rollouts(&self) -> Result<Vec<RolloutRecord>>;
    /// Rollouts the engine still drives (`running`, `rolling_back`), oldest first.
    fn active_rollouts(&self) -> Result<Vec<RolloutRecord>>;
    /// How many rollouts are in each state (states with none are left out).
    fn rollout_counts(&self) -> Result<Vec<(RolloutState, u64)>>;
    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>>;
    /// Moves a rollout to `state` if the transition is valid; records an event.
    fn set_rollout_state(
        &self,
        id: i64,
        state: RolloutState,
        reason: &str,
        rollback_outcome: Option<RolloutState>,
    ) -> Result<()>;
    fn deployments(&self, rollout_id: i64) -> Result<Vec<DeploymentRecord>>;
    /// Moves a deployment to `state` if the transition is valid; records an event.
    fn set_deployment_state(
        &self,
        rollout_id: i64,
        node: &str,
        state: DeploymentState,
        message: &str,
    ) -> Result<()>;
    fn add_event(&self, rollout_id: i64, kind: &str, message: &str) -> Result<()>;
    fn events(&self, rollout_id: i64) -> Result<Vec<RolloutEvent>>;

    fn node_config(&self, node: &str) -> Result<Option<NodeConfig>>;
    /// Sets (or, with `None`, clears) what `node` should run.
    fn set_node_config(&self, node: &str, config: Option<&NodeConfig>) -> Result<()>;

    fn audit(&self, entry: &AuditEntry) -> Result<()>;
    /// The newest `limit` entries, newest first.
    fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>>;

    /// Stores a new experiment in `draft`, with its `created` event.
    fn create_experiment(&self, name: &str, document: &str, created_by: &str) -> Result<i64>;
    fn experiments(&self) -> Result<Vec<ExperimentRecord>>;
    fn experiment(&self, id: i64) -> Result<Option<ExperimentRecord>>;
    /// Experiments the engine drives (pending, deploying, running, analyzing), oldest first.
    fn live_experiments(&self) -> Result<Vec<ExperimentRecord>>;
    /// How many experiments are in each state (states with none are left out).
    fn experiment_counts(&self) -> Result<Vec<(ExperimentState, u64)>>;
    /// Moves an experiment to `to` if the transition is valid (else `Conflict` with the
    /// reason), records the event, and replaces the progress when one is given.
    fn transition_experiment(
        &self,
        id: i64,
        to: ExperimentState,
        actor: &str,
        reason: &str,
        progress: Option<&serde_json::Value>,
    ) -> Result<()>;
    fn set_experiment_progress(&self, id: i64, progress: &serde_json::Value) -> Result<()>;
    fn experiment_events(&self, id: i64) -> Result<Vec<ExperimentEvent>>;
    /// Stores a measured window and the progress after it, in one transaction.
    fn add_experiment_window(
        &self,
        id: i64,
        index: u32,
        window: &serde_json::Value,
        progress: &serde_json::Value,
    ) -> Result<()>;
    fn experiment_windows(&self, id: i64) -> Result<Vec<serde_json::Value>>;

    fn add_token(&self, name: &str, role: Role, hash: &str) -> Result<()>;
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
}
