//! PostgreSQL store, for when one control-plane file is not enough (several replicas, managed
//! backups). Same tables and migrations as SQLite, in PostgreSQL's dialect; the schema
//! version is kept in `phoenix_schema_version`.
//!
//! `postgres::Client` drives its own small runtime, which must not run inside the control
//! plane's async workers, so one dedicated thread owns the connection and runs each call;
//! callers wait for the answer (calls are as short as SQLite's). A closed connection is opened
//! again at the next call.

use std::sync::mpsc;

use postgres::{Client, NoTls, Row};

use super::{
    corrupt, now_millis, state_count, AgentRecord, AuditEntry, ConfigVersion, DeploymentRecord,
    ExperimentEvent, ExperimentRecord, Millis, NewDeployment, NewRollout, NodeConfig, Result,
    RolloutEvent, RolloutRecord, Store, StoreError, TokenRecord,
};
use crate::auth::Role;
use crate::experiment::ExperimentState;
use crate::rollout::{DeploymentState, RolloutState};

/// Schema migrations, as for SQLite: never edit one that has shipped, add the next.
pub const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE agents (
        node TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        version TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        effective_config_hash TEXT NOT NULL,
        applied_offer_hash TEXT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        last_report TEXT
    );
    CREATE TABLE config_versions (
        hash TEXT PRIMARY KEY,
        document TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL
    );
    CREATE TABLE rollouts (
        id BIGSERIAL PRIMARY KEY,
        selector TEXT NOT NULL,
        config_hash TEXT NOT NULL REFERENCES config_versions(hash),
        role TEXT NOT NULL,
        state TEXT NOT NULL,
        max_unavailable BIGINT NOT NULL,
        wave_delay_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        rollback_outcome TEXT
    );
    CREATE TABLE deployments (
        rollout_id BIGINT NOT NULL REFERENCES rollouts(id),
        node TEXT NOT NULL,
        wave BIGINT NOT NULL,
        state TEXT NOT NULL,
        previous_hash TEXT NOT NULL,
        previous_role TEXT NOT NULL,
        previous_rollout BIGINT,
        message TEXT NOT NULL DEFAULT '',
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (rollout_id, node)
    );
    CREATE TABLE rollout_events (
        id BIGSERIAL PRIMARY KEY,
        rollout_id BIGINT NOT NULL REFERENCES rollouts(id),
        at BIGINT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX rollout_events_by_rollout ON rollout_events(rollout_id, id);
    CREATE INDEX rollouts_by_state ON rollouts(state);
    CREATE TABLE node_configs (
        node TEXT PRIMARY KEY,
        config_hash TEXT NOT NULL,
        role TEXT NOT NULL,
        rollout_id BIGINT NOT NULL REFERENCES rollouts(id)
    );
    CREATE TABLE audit_log (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
"#,
    r#"
    CREATE TABLE experiments (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        document TEXT NOT NULL,
        progress TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE INDEX experiments_by_state ON experiments(state);
    CREATE TABLE experiment_events (
        id BIGSERIAL PRIMARY KEY,
        experiment_id BIGINT NOT NULL REFERENCES experiments(id),
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        from_state TEXT NOT NULL,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX experiment_events_by_experiment ON experiment_events(experiment_id, id);
    CREATE TABLE experiment_windows (
        experiment_id BIGINT NOT NULL REFERENCES experiments(id),
        idx BIGINT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (experiment_id, idx)
    );
"#,
];

type Job = Box<dyn FnOnce(&mut Option<Client>) + Send>;

pub struct PostgresStore {
    jobs: mpsc::Sender<Job>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and brings the schema up to date.
    pub fn connect(url: &str) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::sync_channel::<Result<()>>(1);
        let url = url.to_string();
        // Even the first connection is made on the store's thread: the caller may be an async
        // worker, where the client's own runtime must not run.
        std::thread::Builder::new()
            .name("phoenix-store".into())
            .spawn(move || {
                let first = Client::connect(&url, NoTls)
                    .map_err(StoreError::from)
                    .and_then(|mut client| migrate(&mut client).map(|()| client));
                let mut client = match first {
                    Ok(client) => {
                        let _ = ready.send(Ok(()));
                        Some(client)
                    }
                    Err(err) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                };
                for job in queue {
                    if client.as_ref().is_none_or(Client::is_closed) {
                        client = Client::connect(&url, NoTls)
                            .map_err(|e| tracing::error!("store: reconnecting to PostgreSQL: {e}"))
                            .ok();
                    }
                    job(&mut client);
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?;
        started
            .recv()
            .map_err(|_| StoreError::Unavailable("the store thread stopped".into()))??;
        Ok(Self { jobs })
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |client| {
            let result = match client {
                Some(client) => f(client),
                None => Err(StoreError::Unavailable(
                    "no connection to PostgreSQL".into(),
                )),
            };
            let _ = reply.send(result);
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable("the store thread stopped".into()))?;
        answer
            .recv()
            .map_err(|_| StoreError::Unavailable("the store thread stopped".into()))?
    }

    pub fn schema_version(&self) -> Result<i64> {
        self.call(version)
    }
}

fn version(client: &mut Client) -> Result<i64> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS phoenix_schema_version (version BIGINT NOT NULL)",
    )?;
    let row = client.query_opt("SELECT version FROM phoenix_schema_version", &[])?;
    Ok(row.map(|r| r.get(0)).unwrap_or(0))
}

/// Applies every migration newer than the stored version, each in a transaction.
pub fn migrate(client: &mut Client) -> Result<()> {
    let current = version(client)?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::TooNew {
            found: current,
            known,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let mut tx = client.transaction()?;
        tx.batch_execute(sql)?;
        tx.execute("DELETE FROM phoenix_schema_version", &[])?;
        tx.execute(
            "INSERT INTO phoenix_schema_version (version) VALUES ($1)",
            &[&(index as i64 + 1)],
        )?;
        tx.commit()?;
        tracing::info!(version = index + 1, "store schema migrated");
    }
    Ok(())
}

fn u32_of(row: &Row, i: usize, what: &str) -> Result<u32> {
    let v: i64 = row.get(i);
    u32::try_from(v).map_err(|_| corrupt(what, &v.to_string()))
}

fn agent_of(row: &Row) -> Result<AgentRecord> {
    let labels: String = row.get(1);
    let capabilities: String = row.get(3);
    let report: Option<String> = row.get(8);
    Ok(AgentRecord {
        node: row.get(0),
        labels: serde_json::from_str(&labels).map_err(|_| corrupt("agent labels", &labels))?,
        version: row.get(2),
        capabilities: serde_json::from_str(&capabilities)
            .map_err(|_| corrupt("agent capabilities", &capabilities))?,
        effective_config_hash: row.get(4),
        applied_offer_hash: row.get(5),
        first_seen: row.get(6),
        last_seen: row.get(7),
        last_report: report.and_then(|r| serde_json::from_str(&r).ok()),
    })
}

fn rollout_of(row: &Row) -> Result<RolloutRecord> {
    let state: String = row.get(4);
    let outcome: Option<String> = row.get(11);
    Ok(RolloutRecord {
        id: row.get(0),
        selector: row.get(1),
        config_hash: row.get(2),
        role: row.get(3),
        state: RolloutState::parse(&state).ok_or_else(|| corrupt("rollout state", &state))?,
        max_unavailable: u32_of(row, 5, "max_unavailable")?,
        wave_delay_ms: row.get::<_, i64>(6).max(0) as u64,
        created_by: row.get(7),
        created_at: row.get(8),
        updated_at: row.get(9),
        reason: row.get(10),
        rollback_outcome: match outcome {
            Some(o) => {
                Some(RolloutState::parse(&o).ok_or_else(|| corrupt("rollback outcome", &o))?)
            }
            None => None,
        },
    })
}

fn token_of(row: &Row) -> Result<TokenRecord> {
    let role: String = row.get(1);
    Ok(TokenRecord {
        name: row.get(0),
        role: Role::parse(&role).ok_or_else(|| corrupt("token role", &role))?,
        created_at: row.get(2),
    })
}

fn event(
    tx: &mut postgres::Transaction<'_>,
    rollout_id: i64,
    kind: &str,
    message: &str,
    at: Millis,
) -> Result<()> {
    tx.execute(
        "INSERT INTO rollout_events (rollout_id, at, kind, message) VALUES ($1, $2, $3, $4)",
        &[&rollout_id, &at, &kind, &message],
    )?;
    Ok(())
}

const EXPERIMENT_COLUMNS: &str =
    "id, name, state, document, progress, created_by, created_at, updated_at";

fn experiment_of(row: &Row) -> Result<ExperimentRecord> {
    let state: String = row.get(2);
    let progress: String = row.get(4);
    Ok(ExperimentRecord {
        id: row.get(0),
        name: row.get(1),
        state: ExperimentState::parse(&state).ok_or_else(|| corrupt("experiment state", &state))?,
        document: row.get(3),
        progress: serde_json::from_str(&progress)
            .map_err(|_| corrupt("experiment progress", &progress))?,
        created_by: row.get(5),
        created_at: row.get(6),
        updated_at: row.get(7),
    })
}

const AGENT_COLUMNS: &str = "node, labels, version, capabilities, effective_config_hash, applied_offer_hash, first_seen, last_seen, last_report";
const ROLLOUT_COLUMNS: &str = "id, selector, config_hash, role, state, max_unavailable, wave_delay_ms, created_by, created_at, updated_at, reason, rollback_outcome";

impl Store for PostgresStore {
    fn upsert_agent(&self, agent: &AgentRecord) -> Result<()> {
        let labels =
            serde_json::to_string(&agent.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let capabilities = serde_json::to_string(&agent.capabilities)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let a = agent.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO agents (node, labels, version, capabilities, effective_config_hash, applied_offer_hash, first_seen, last_seen)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (node) DO UPDATE SET labels = $2, version = $3, capabilities = $4,
                   effective_config_hash = $5, applied_offer_hash = $6, last_seen = $8",
                &[&a.node, &labels, &a.version, &capabilities, &a.effective_config_hash, &a.applied_offer_hash, &a.first_seen, &a.last_seen],
            )?;
            Ok(())
        })
    }

    fn set_agent_report(&self, node: &str, report: &serde_json::Value, at: Millis) -> Result<()> {
        let (node, report) = (node.to_string(), report.to_string());
        self.call(move |c| {
            c.execute(
                "UPDATE agents SET last_report = $2, last_seen = $3 WHERE node = $1",
                &[&node, &report, &at],
            )?;
            Ok(())
        })
    }

    fn set_agent_hashes(
        &self,
        node: &str,
        effective: &str,
        applied_offer: &str,
        at: Millis,
    ) -> Result<()> {
        let (node, effective, applied) = (
            node.to_string(),
            effective.to_string(),
            applied_offer.to_string(),
        );
        self.call(move |c| {
            c.execute(
                "UPDATE agents SET effective_config_hash = $2, applied_offer_hash = $3, last_seen = $4 WHERE node = $1",
                &[&node, &effective, &applied, &at],
            )?;
            Ok(())
        })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.call(|c| {
            c.query(
                &format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY node"),
                &[],
            )?
            .iter()
            .map(agent_of)
            .collect()
        })
    }

    fn agent(&self, node: &str) -> Result<Option<AgentRecord>> {
        let node = node.to_string();
        self.call(move |c| {
            c.query_opt(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE node = $1"),
                &[&node],
            )?
            .as_ref()
            .map(agent_of)
            .transpose()
        })
    }

    fn put_config(&self, config: &ConfigVersion) -> Result<()> {
        let v = config.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO config_versions (hash, document, created_at, created_by) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (hash) DO NOTHING",
                &[&v.hash, &v.document, &v.created_at, &v.created_by],
            )?;
            Ok(())
        })
    }

    fn config(&self, hash: &str) -> Result<Option<ConfigVersion>> {
        let hash = hash.to_string();
        self.call(move |c| {
            Ok(c
                .query_opt(
                    "SELECT hash, document, created_at, created_by FROM config_versions WHERE hash = $1",
                    &[&hash],
                )?
                .map(|r| ConfigVersion {
                    hash: r.get(0),
                    document: r.get(1),
                    created_at: r.get(2),
                    created_by: r.get(3),
                }))
        })
    }

    fn create_rollout(&self, rollout: &NewRollout, deployments: &[NewDeployment]) -> Result<i64> {
        let (r, deployments) = (rollout.clone(), deployments.to_vec());
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let now = now_millis();
            let row = tx.query_one(
                "INSERT INTO rollouts (selector, config_hash, role, state, max_unavailable, wave_delay_ms, created_by, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id",
                &[&r.selector, &r.config_hash, &r.role, &RolloutState::Running.as_str(), &i64::from(r.max_unavailable), &(r.wave_delay_ms as i64), &r.created_by, &now],
            )?;
            let id: i64 = row.get(0);
            for d in &deployments {
                let (previous_hash, previous_role, previous_rollout) = match &d.previous {
                    Some(p) => (p.config_hash.as_str(), p.role.as_str(), Some(p.rollout_id)),
                    None => ("", "clear", None),
                };
                tx.execute(
                    "INSERT INTO deployments (rollout_id, node, wave, state, previous_hash, previous_role, previous_rollout, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[&id, &d.node, &i64::from(d.wave), &DeploymentState::Pending.as_str(), &previous_hash, &previous_role, &previous_rollout, &now],
                )?;
            }
            let message = format!(
                "by {} for {} node(s) matching {:?}: config {} as {}",
                r.created_by,
                deployments.len(),
                r.selector,
                r.config_hash,
                r.role
            );
            event(&mut tx, id, "created", &message, now)?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        self.call(|c| {
            c.query(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id"),
                &[],
            )?
            .iter()
            .map(rollout_of)
            .collect()
        })
    }

    fn active_rollouts(&self) -> Result<Vec<RolloutRecord>> {
        self.call(|c| {
            c.query(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state IN ('running', 'rolling_back') ORDER BY id"),
                &[],
            )?
            .iter()
            .map(rollout_of)
            .collect()
        })
    }

    fn rollout_counts(&self) -> Result<Vec<(RolloutState, u64)>> {
        self.call(|c| {
            c.query("SELECT state, COUNT(*) FROM rollouts GROUP BY state", &[])?
                .iter()
                .map(|r| state_count(RolloutState::parse, "rollout state", r.get(0), r.get(1)))
                .collect()
        })
    }

    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>> {
        self.call(move |c| {
            c.query_opt(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"),
                &[&id],
            )?
            .as_ref()
            .map(rollout_of)
            .transpose()
        })
    }

    fn set_rollout_state(
        &self,
        id: i64,
        state: RolloutState,
        reason: &str,
        rollback_outcome: Option<RolloutState>,
    ) -> Result<()> {
        let reason = reason.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let current: String = tx
                .query_one(
                    "SELECT state FROM rollouts WHERE id = $1 FOR UPDATE",
                    &[&id],
                )?
                .get(0);
            let current =
                RolloutState::parse(&current).ok_or_else(|| corrupt("rollout state", &current))?;
            if !current.can_become(state) {
                return Err(StoreError::Conflict(format!(
                    "rollout {id} is {} and cannot become {}",
                    current.as_str(),
                    state.as_str()
                )));
            }
            let now = now_millis();
            tx.execute(
                "UPDATE rollouts SET state = $2, updated_at = $3,
                   reason = CASE WHEN $4 = '' THEN reason ELSE $4 END,
                   rollback_outcome = COALESCE($5, rollback_outcome)
                 WHERE id = $1",
                &[
                    &id,
                    &state.as_str(),
                    &now,
                    &reason,
                    &rollback_outcome.map(RolloutState::as_str),
                ],
            )?;
            let message = if reason.is_empty() {
                format!("{} -> {}", current.as_str(), state.as_str())
            } else {
                format!("{} -> {}: {reason}", current.as_str(), state.as_str())
            };
            event(&mut tx, id, "state", &message, now)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn deployments(&self, rollout_id: i64) -> Result<Vec<DeploymentRecord>> {
        self.call(move |c| {
            c.query(
                "SELECT rollout_id, node, wave, state, previous_hash, previous_role, previous_rollout, message, updated_at
                 FROM deployments WHERE rollout_id = $1 ORDER BY wave, node",
                &[&rollout_id],
            )?
            .iter()
            .map(|r| {
                let state: String = r.get(3);
                Ok(DeploymentRecord {
                    rollout_id: r.get(0),
                    node: r.get(1),
                    wave: u32_of(r, 2, "wave")?,
                    state: DeploymentState::parse(&state)
                        .ok_or_else(|| corrupt("deployment state", &state))?,
                    previous_hash: r.get(4),
                    previous_role: r.get(5),
                    previous_rollout: r.get(6),
                    message: r.get(7),
                    updated_at: r.get(8),
                })
            })
            .collect()
        })
    }

    fn set_deployment_state(
        &self,
        rollout_id: i64,
        node: &str,
        state: DeploymentState,
        message: &str,
    ) -> Result<()> {
        let (node, message) = (node.to_string(), message.to_string());
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let current: String = tx
                .query_one(
                    "SELECT state FROM deployments WHERE rollout_id = $1 AND node = $2 FOR UPDATE",
                    &[&rollout_id, &node],
                )?
                .get(0);
            let current = DeploymentState::parse(&current)
                .ok_or_else(|| corrupt("deployment state", &current))?;
            if !current.can_become(state) {
                return Err(StoreError::Conflict(format!(
                    "deployment of rollout {rollout_id} to {node} is {} and cannot become {}",
                    current.as_str(),
                    state.as_str()
                )));
            }
            let now = now_millis();
            tx.execute(
                "UPDATE deployments SET state = $3, message = $4, updated_at = $5 WHERE rollout_id = $1 AND node = $2",
                &[&rollout_id, &node, &state.as_str(), &message, &now],
            )?;
            let text = if message.is_empty() {
                format!("{node}: {} -> {}", current.as_str(), state.as_str())
            } else {
                format!("{node}: {} -> {}: {message}", current.as_str(), state.as_str())
            };
            event(&mut tx, rollout_id, "deployment", &text, now)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn add_event(&self, rollout_id: i64, kind: &str, message: &str) -> Result<()> {
        let (kind, message) = (kind.to_string(), message.to_string());
        self.call(move |c| {
            let mut tx = c.transaction()?;
            event(&mut tx, rollout_id, &kind, &message, now_millis())?;
            tx.commit()?;
            Ok(())
        })
    }

    fn events(&self, rollout_id: i64) -> Result<Vec<RolloutEvent>> {
        self.call(move |c| {
            Ok(c.query(
                "SELECT at, kind, message FROM rollout_events WHERE rollout_id = $1 ORDER BY id",
                &[&rollout_id],
            )?
            .iter()
            .map(|r| RolloutEvent {
                at: r.get(0),
                kind: r.get(1),
                message: r.get(2),
            })
            .collect())
        })
    }

    fn node_config(&self, node: &str) -> Result<Option<NodeConfig>> {
        let node = node.to_string();
        self.call(move |c| {
            Ok(c.query_opt(
                "SELECT node, config_hash, role, rollout_id FROM node_configs WHERE node = $1",
                &[&node],
            )?
            .map(|r| NodeConfig {
                node: r.get(0),
                config_hash: r.get(1),
                role: r.get(2),
                rollout_id: r.get(3),
            }))
        })
    }

    fn set_node_config(&self, node: &str, config: Option<&NodeConfig>) -> Result<()> {
        let (node, config) = (node.to_string(), config.cloned());
        self.call(move |c| {
            match config {
                None => c.execute("DELETE FROM node_configs WHERE node = $1", &[&node])?,
                Some(n) => c.execute(
                    "INSERT INTO node_configs (node, config_hash, role, rollout_id) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (node) DO UPDATE SET config_hash = $2, role = $3, rollout_id = $4",
                    &[&node, &n.config_hash, &n.role, &n.rollout_id],
                )?,
            };
            Ok(())
        })
    }

    fn audit(&self, entry: &AuditEntry) -> Result<()> {
        let e = entry.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO audit_log (at, actor, role, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&e.at, &e.actor, &e.role, &e.action, &e.target, &e.detail],
            )?;
            Ok(())
        })
    }

    fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        self.call(move |c| {
            Ok(c
                .query(
                    "SELECT at, actor, role, action, target, detail FROM audit_log ORDER BY id DESC LIMIT $1",
                    &[&i64::from(limit)],
                )?
                .iter()
                .map(|r| AuditEntry {
                    at: r.get(0),
                    actor: r.get(1),
                    role: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    detail: r.get(5),
                })
                .collect())
        })
    }

    fn create_experiment(&self, name: &str, document: &str, created_by: &str) -> Result<i64> {
        let (name, document, created_by) = (
            name.to_string(),
            document.to_string(),
            created_by.to_string(),
        );
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let now = now_millis();
            let draft = ExperimentState::Draft.as_str();
            let id: i64 = tx
                .query_one(
                    "INSERT INTO experiments (name, state, document, progress, created_by, created_at, updated_at)
                     VALUES ($1, $2, $3, '{}', $4, $5, $5) RETURNING id",
                    &[&name, &draft, &document, &created_by, &now],
                )?
                .get(0);
            tx.execute(
                "INSERT INTO experiment_events (experiment_id, at, actor, from_state, to_state, reason)
                 VALUES ($1, $2, $3, '', $4, 'created')",
                &[&id, &now, &created_by, &draft],
            )?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn experiments(&self) -> Result<Vec<ExperimentRecord>> {
        self.call(|c| {
            c.query(
                &format!("SELECT {EXPERIMENT_COLUMNS} FROM experiments ORDER BY id"),
                &[],
            )?
            .iter()
            .map(experiment_of)
            .collect()
        })
    }

    fn experiment(&self, id: i64) -> Result<Option<ExperimentRecord>> {
        self.call(move |c| {
            c.query_opt(
                &format!("SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE id = $1"),
                &[&id],
            )?
            .as_ref()
            .map(experiment_of)
            .transpose()
        })
    }

    fn live_experiments(&self) -> Result<Vec<ExperimentRecord>> {
        let live = super::live_experiment_states_sql();
        self.call(move |c| {
            c.query(
                &format!("SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE state IN ({live}) ORDER BY id"),
                &[],
            )?
            .iter()
            .map(experiment_of)
            .collect()
        })
    }

    fn experiment_counts(&self) -> Result<Vec<(ExperimentState, u64)>> {
        self.call(|c| {
            c.query(
                "SELECT state, COUNT(*) FROM experiments GROUP BY state",
                &[],
            )?
            .iter()
            .map(|r| {
                state_count(
                    ExperimentState::parse,
                    "experiment state",
                    r.get(0),
                    r.get(1),
                )
            })
            .collect()
        })
    }

    fn transition_experiment(
        &self,
        id: i64,
        to: ExperimentState,
        actor: &str,
        reason: &str,
        progress: Option<&serde_json::Value>,
    ) -> Result<()> {
        let (actor, reason) = (actor.to_string(), reason.to_string());
        let progress = progress.map(|p| p.to_string());
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let current: String = tx
                .query_one("SELECT state FROM experiments WHERE id = $1 FOR UPDATE", &[&id])?
                .get(0);
            let from = super::experiment_transition(id, &current, to)?;
            let now = now_millis();
            tx.execute(
                "UPDATE experiments SET state = $2, updated_at = $3, progress = COALESCE($4, progress) WHERE id = $1",
                &[&id, &to.as_str(), &now, &progress],
            )?;
            tx.execute(
                "INSERT INTO experiment_events (experiment_id, at, actor, from_state, to_state, reason)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &now, &actor, &from.as_str(), &to.as_str(), &reason],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn set_experiment_progress(&self, id: i64, progress: &serde_json::Value) -> Result<()> {
        let progress = progress.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE experiments SET progress = $2, updated_at = $3 WHERE id = $1",
                &[&id, &progress, &now_millis()],
            )?;
            Ok(())
        })
    }

    fn experiment_events(&self, id: i64) -> Result<Vec<ExperimentEvent>> {
        self.call(move |c| {
            Ok(c.query(
                "SELECT at, actor, from_state, to_state, reason FROM experiment_events
                 WHERE experiment_id = $1 ORDER BY id",
                &[&id],
            )?
            .iter()
            .map(|r| ExperimentEvent {
                at: r.get(0),
                actor: r.get(1),
                from: r.get(2),
                to: r.get(3),
                reason: r.get(4),
            })
            .collect())
        })
    }

    fn add_experiment_window(
        &self,
        id: i64,
        index: u32,
        window: &serde_json::Value,
        progress: &serde_json::Value,
    ) -> Result<()> {
        let (window, progress) = (window.to_string(), progress.to_string());
        self.call(move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO experiment_windows (experiment_id, idx, body) VALUES ($1, $2, $3)",
                &[&id, &i64::from(index), &window],
            )?;
            tx.execute(
                "UPDATE experiments SET progress = $2, updated_at = $3 WHERE id = $1",
                &[&id, &progress, &now_millis()],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn experiment_windows(&self, id: i64) -> Result<Vec<serde_json::Value>> {
        self.call(move |c| {
            c.query(
                "SELECT body FROM experiment_windows WHERE experiment_id = $1 ORDER BY idx",
                &[&id],
            )?
            .iter()
            .map(|r| {
                let body: String = r.get(0);
                serde_json::from_str(&body).map_err(|_| corrupt("experiment window", &body))
            })
            .collect()
        })
    }

    fn add_token(&self, name: &str, role: Role, hash: &str) -> Result<()> {
        let (name, hash) = (name.to_string(), hash.to_string());
        self.call(move |c| {
            let result = c.execute(
                "INSERT INTO tokens (hash, name, role, created_at) VALUES ($1, $2, $3, $4)",
                &[&hash, &name, &role.as_str(), &now_millis()],
            );
            match result {
                Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => Err(
                    StoreError::Conflict(format!("a token named {name:?} exists")),
                ),
                other => other.map(|_| ()).map_err(Into::into),
            }
        })
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let hash = hash.to_string();
        self.call(move |c| {
            c.query_opt(
                "SELECT name, role, created_at FROM tokens WHERE hash = $1",
                &[&hash],
            )?
            .as_ref()
            .map(token_of)
            .transpose()
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.call(|c| {
            c.query(
                "SELECT name, role, created_at FROM tokens ORDER BY name",
                &[],
            )?
            .iter()
            .map(token_of)
            .collect()
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::conformance;

    /// A fresh database on the server of `PHOENIX_TEST_POSTGRES_URL` (`./scripts/test` and
    /// `./scripts/with-postgres` start one), as a URL.
    pub fn fresh_database() -> String {
        let Ok(url) = std::env::var("PHOENIX_TEST_POSTGRES_URL") else {
            panic!(
                "PHOENIX_TEST_POSTGRES_URL is not set: run the tests with ./scripts/test, or \
                 ./scripts/with-postgres cargo test ..., which start a throwaway PostgreSQL"
            );
        };
        let name = format!("phoenix_test_{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut admin = Client::connect(&url, NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        match url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("unexpected URL {url}"),
        }
    }

    #[test]
    fn migrations_run_once_and_reconnecting_keeps_data() {
        let url = fresh_database();
        {
            let store = PostgresStore::connect(&url).unwrap();
            assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
            store.upsert_agent(&conformance::agent("a")).unwrap();
        }
        let store = PostgresStore::connect(&url).unwrap();
        assert_eq!(store.agents().unwrap(), vec![conformance::agent("a")]);
        let mut client = Client::connect(&url, NoTls).unwrap();
        client
            .execute("UPDATE phoenix_schema_version SET version = 99", &[])
            .unwrap();
        assert!(matches!(
            migrate(&mut client),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn conformance_agents() {
        conformance::agents_upsert_and_report(&PostgresStore::connect(&fresh_database()).unwrap());
    }

    #[test]
    fn conformance_rollouts() {
        conformance::rollouts_deployments_and_events(
            &PostgresStore::connect(&fresh_database()).unwrap(),
        );
    }

    #[test]
    fn conformance_node_configs_audit_tokens() {
        conformance::node_configs_audit_and_tokens(
            &PostgresStore::connect(&fresh_database()).unwrap(),
        );
    }

    #[test]
    fn conformance_experiments() {
        conformance::experiments_states_events_windows(
            &PostgresStore::connect(&fresh_database()).unwrap(),
        );
    }
}
