//! SQLite store: one file, created and upgraded by versioned migrations at open
//! (`PRAGMA user_version` holds the version), WAL journal, foreign keys on.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{
    corrupt, now_millis, state_count, AgentRecord, AuditEntry, ConfigVersion, DeploymentRecord,
    ExperimentEvent, ExperimentRecord, Millis, NewDeployment, NewRollout, NodeConfig, Result,
    RolloutEvent, RolloutRecord, Store, StoreError, TokenRecord,
};
use crate::auth::Role;
use crate::experiment::ExperimentState;
use crate::rollout::{DeploymentState, RolloutState};

/// Schema migrations; migration `i` brings the schema from version `i` to `i + 1`. Never
/// edit one that has shipped: add the next.
pub const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE agents (
        node TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        version TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        effective_config_hash TEXT NOT NULL,
        applied_offer_hash TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        last_report TEXT
    );
    CREATE TABLE config_versions (
        hash TEXT PRIMARY KEY,
        document TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        selector TEXT NOT NULL,
        config_hash TEXT NOT NULL REFERENCES config_versions(hash),
        role TEXT NOT NULL,
        state TEXT NOT NULL,
        max_unavailable INTEGER NOT NULL,
        wave_delay_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        rollback_outcome TEXT
    );
    CREATE TABLE deployments (
        rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
        node TEXT NOT NULL,
        wave INTEGER NOT NULL,
        state TEXT NOT NULL,
        previous_hash TEXT NOT NULL,
        previous_role TEXT NOT NULL,
        previous_rollout INTEGER,
        message TEXT NOT NULL DEFAULT '',
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (rollout_id, node)
    );
    CREATE TABLE rollout_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX rollout_events_by_rollout ON rollout_events(rollout_id, id);
    CREATE INDEX rollouts_by_state ON rollouts(state);
    CREATE TABLE node_configs (
        node TEXT PRIMARY KEY,
        config_hash TEXT NOT NULL,
        role TEXT NOT NULL,
        rollout_id INTEGER NOT NULL REFERENCES rollouts(id)
    );
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
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
        created_at INTEGER NOT NULL
    );
    "#,
    // 2: experiments.
    r#"
    CREATE TABLE experiments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        document TEXT NOT NULL,
        progress TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX experiments_by_state ON experiments(state);
    CREATE TABLE experiment_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        experiment_id INTEGER NOT NULL REFERENCES experiments(id),
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        from_state TEXT NOT NULL,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX experiment_events_by_experiment ON experiment_events(experiment_id, id);
    CREATE TABLE experiment_windows (
        experiment_id INTEGER NOT NULL REFERENCES experiments(id),
        idx INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (experiment_id, idx)
    );
    "#,
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        Self::init(Connection::open(path)?)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back);
        // the connection stays usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}

/// Applies every migration newer than the database's `user_version`, each in a transaction.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::TooNew {
            found: current,
            known,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = index + 1, "store schema migrated");
    }
    Ok(())
}

fn agent_from_row(
    row: &Row<'_>,
) -> rusqlite::Result<(AgentRecord, String, String, Option<String>)> {
    Ok((
        AgentRecord {
            node: row.get(0)?,
            labels: Default::default(),
            version: row.get(2)?,
            capabilities: Vec::new(),
            effective_config_hash: row.get(4)?,
            applied_offer_hash: row.get(5)?,
            first_seen: row.get(6)?,
            last_seen: row.get(7)?,
            last_report: None,
        },
        row.get(1)?,
        row.get(3)?,
        row.get(8)?,
    ))
}

fn finish_agent(raw: (AgentRecord, String, String, Option<String>)) -> Result<AgentRecord> {
    let (mut agent, labels, capabilities, report) = raw;
    agent.labels = serde_json::from_str(&labels).map_err(|_| corrupt("agent labels", &labels))?;
    agent.capabilities = serde_json::from_str(&capabilities)
        .map_err(|_| corrupt("agent capabilities", &capabilities))?;
    agent.last_report = report.and_then(|r| serde_json::from_str(&r).ok());
    Ok(agent)
}

const AGENT_COLUMNS: &str = "node, labels, version, capabilities, effective_config_hash, applied_offer_hash, first_seen, last_seen, last_report";
const ROLLOUT_COLUMNS: &str = "id, selector, config_hash, role, state, max_unavailable, wave_delay_ms, created_by, created_at, updated_at, reason, rollback_outcome";

type RawRollout = (RolloutRecord, String, Option<String>);

fn rollout_from_row(row: &Row<'_>) -> rusqlite::Result<RawRollout> {
    Ok((
        RolloutRecord {
            id: row.get(0)?,
            selector: row.get(1)?,
            config_hash: row.get(2)?,
            role: row.get(3)?,
            state: RolloutState::Running,
            max_unavailable: row.get(5)?,
            wave_delay_ms: row.get::<_, i64>(6)?.max(0) as u64,
            created_by: row.get(7)?,
            created_at: row.get(8)?,
            updated_at: row.get(9)?,
            reason: row.get(10)?,
            rollback_outcome: None,
        },
        row.get(4)?,
        row.get(11)?,
    ))
}

fn finish_rollout(raw: RawRollout) -> Result<RolloutRecord> {
    let (mut rollout, state, outcome) = raw;
    rollout.state = RolloutState::parse(&state).ok_or_else(|| corrupt("rollout state", &state))?;
    rollout.rollback_outcome = match outcome {
        Some(o) => Some(RolloutState::parse(&o).ok_or_else(|| corrupt("rollback outcome", &o))?),
        None => None,
    };
    Ok(rollout)
}

fn event(conn: &Connection, rollout_id: i64, kind: &str, message: &str, at: Millis) -> Result<()> {
    conn.execute(
        "INSERT INTO rollout_events (rollout_id, at, kind, message) VALUES (?1, ?2, ?3, ?4)",
        params![rollout_id, at, kind, message],
    )?;
    Ok(())
}

impl SqliteStore {
    /// Experiments matching `filter` (an SQL condition with at most one parameter, `param`).
    fn query_experiments(&self, filter: &str, param: Option<i64>) -> Result<Vec<ExperimentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, name, state, document, progress, created_by, created_at, updated_at
             FROM experiments WHERE {filter} ORDER BY id"
        ))?;
        let params: Vec<i64> = param.into_iter().collect();
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        rows.map(|row| {
            let (id, name, state, document, progress, created_by, created_at, updated_at) = row?;
            Ok(ExperimentRecord {
                id,
                name,
                state: ExperimentState::parse(&state)
                    .ok_or_else(|| corrupt("experiment state", &state))?,
                document,
                progress: serde_json::from_str(&progress)
                    .map_err(|_| corrupt("experiment progress", &progress))?,
                created_by,
                created_at,
                updated_at,
            })
        })
        .collect()
    }
}

impl Store for SqliteStore {
    fn upsert_agent(&self, agent: &AgentRecord) -> Result<()> {
        let labels =
            serde_json::to_string(&agent.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let capabilities = serde_json::to_string(&agent.capabilities)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO agents (node, labels, version, capabilities, effective_config_hash, applied_offer_hash, first_seen, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(node) DO UPDATE SET labels = ?2, version = ?3, capabilities = ?4,
               effective_config_hash = ?5, applied_offer_hash = ?6, last_seen = ?8",
            params![
                agent.node,
                labels,
                agent.version,
                capabilities,
                agent.effective_config_hash,
                agent.applied_offer_hash,
                agent.first_seen,
                agent.last_seen
            ],
        )?;
        Ok(())
    }

    fn set_agent_report(&self, node: &str, report: &serde_json::Value, at: Millis) -> Result<()> {
        self.conn().execute(
            "UPDATE agents SET last_report = ?2, last_seen = ?3 WHERE node = ?1",
            params![node, report.to_string(), at],
        )?;
        Ok(())
    }

    fn set_agent_hashes(
        &self,
        node: &str,
        effective: &str,
        applied_offer: &str,
        at: Millis,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE agents SET effective_config_hash = ?2, applied_offer_hash = ?3, last_seen = ?4 WHERE node = ?1",
            params![node, effective, applied_offer, at],
        )?;
        Ok(())
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY node"))?;
        let rows = stmt.query_map([], agent_from_row)?;
        rows.map(|r| finish_agent(r?)).collect()
    }

    fn agent(&self, node: &str) -> Result<Option<AgentRecord>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE node = ?1"),
                [node],
                agent_from_row,
            )
            .optional()?;
        raw.map(finish_agent).transpose()
    }

    fn put_config(&self, config: &ConfigVersion) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO config_versions (hash, document, created_at, created_by) VALUES (?1, ?2, ?3, ?4)",
            params![config.hash, config.document, config.created_at, config.created_by],
        )?;
        Ok(())
    }

    fn config(&self, hash: &str) -> Result<Option<ConfigVersion>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT hash, document, created_at, created_by FROM config_versions WHERE hash = ?1",
                [hash],
                |r| {
                    Ok(ConfigVersion {
                        hash: r.get(0)?,
                        document: r.get(1)?,
                        created_at: r.get(2)?,
                        created_by: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    fn create_rollout(&self, rollout: &NewRollout, deployments: &[NewDeployment]) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_millis();
        tx.execute(
            "INSERT INTO rollouts (selector, config_hash, role, state, max_unavailable, wave_delay_ms, created_by, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            params![
                rollout.selector,
                rollout.config_hash,
                rollout.role,
                RolloutState::Running.as_str(),
                rollout.max_unavailable,
                rollout.wave_delay_ms as i64,
                rollout.created_by,
                now
            ],
        )?;
        let id = tx.last_insert_rowid();
        for d in deployments {
            let (previous_hash, previous_role, previous_rollout) = match &d.previous {
                Some(p) => (p.config_hash.as_str(), p.role.as_str(), Some(p.rollout_id)),
                None => ("", "clear", None),
            };
            tx.execute(
                "INSERT INTO deployments (rollout_id, node, wave, state, previous_hash, previous_role, previous_rollout, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    d.node,
                    d.wave,
                    DeploymentState::Pending.as_str(),
                    previous_hash,
                    previous_role,
                    previous_rollout,
                    now
                ],
            )?;
        }
        event(
            &tx,
            id,
            "created",
            &format!(
                "by {} for {} node(s) matching {:?}: config {} as {}",
                rollout.created_by,
                deployments.len(),
                rollout.selector,
                rollout.config_hash,
                rollout.role
            ),
            now,
        )?;
        tx.commit()?;
        Ok(id)
    }

    fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id"
        ))?;
        let rows = stmt.query_map([], rollout_from_row)?;
        rows.map(|r| finish_rollout(r?)).collect()
    }

    fn active_rollouts(&self) -> Result<Vec<RolloutRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state IN ('running', 'rolling_back') ORDER BY id"
        ))?;
        let rows = stmt.query_map([], rollout_from_row)?;
        rows.map(|r| finish_rollout(r?)).collect()
    }

    fn rollout_counts(&self) -> Result<Vec<(RolloutState, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM rollouts GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|r| {
            let (state, count) = r?;
            state_count(RolloutState::parse, "rollout state", &state, count)
        })
        .collect()
    }

    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
                [id],
                rollout_from_row,
            )
            .optional()?;
        raw.map(finish_rollout).transpose()
    }

    fn set_rollout_state(
        &self,
        id: i64,
        state: RolloutState,
        reason: &str,
        rollback_outcome: Option<RolloutState>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let current: String =
            tx.query_row("SELECT state FROM rollouts WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
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
            "UPDATE rollouts SET state = ?2, updated_at = ?3,
               reason = CASE WHEN ?4 = '' THEN reason ELSE ?4 END,
               rollback_outcome = COALESCE(?5, rollback_outcome)
             WHERE id = ?1",
            params![
                id,
                state.as_str(),
                now,
                reason,
                rollback_outcome.map(RolloutState::as_str)
            ],
        )?;
        let message = if reason.is_empty() {
            format!("{} -> {}", current.as_str(), state.as_str())
        } else {
            format!("{} -> {}: {reason}", current.as_str(), state.as_str())
        };
        event(&tx, id, "state", &message, now)?;
        tx.commit()?;
        Ok(())
    }

    fn deployments(&self, rollout_id: i64) -> Result<Vec<DeploymentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT rollout_id, node, wave, state, previous_hash, previous_role, previous_rollout, message, updated_at
             FROM deployments WHERE rollout_id = ?1 ORDER BY wave, node",
        )?;
        let rows = stmt.query_map([rollout_id], |r| {
            Ok((
                DeploymentRecord {
                    rollout_id: r.get(0)?,
                    node: r.get(1)?,
                    wave: r.get(2)?,
                    state: DeploymentState::Pending,
                    previous_hash: r.get(4)?,
                    previous_role: r.get(5)?,
                    previous_rollout: r.get(6)?,
                    message: r.get(7)?,
                    updated_at: r.get(8)?,
                },
                r.get::<_, String>(3)?,
            ))
        })?;
        rows.map(|r| {
            let (mut d, state) = r?;
            d.state = DeploymentState::parse(&state)
                .ok_or_else(|| corrupt("deployment state", &state))?;
            Ok(d)
        })
        .collect()
    }

    fn set_deployment_state(
        &self,
        rollout_id: i64,
        node: &str,
        state: DeploymentState,
        message: &str,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let current: String = tx.query_row(
            "SELECT state FROM deployments WHERE rollout_id = ?1 AND node = ?2",
            params![rollout_id, node],
            |r| r.get(0),
        )?;
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
            "UPDATE deployments SET state = ?3, message = ?4, updated_at = ?5 WHERE rollout_id = ?1 AND node = ?2",
            params![rollout_id, node, state.as_str(), message, now],
        )?;
        let text = if message.is_empty() {
            format!("{node}: {} -> {}", current.as_str(), state.as_str())
        } else {
            format!(
                "{node}: {} -> {}: {message}",
                current.as_str(),
                state.as_str()
            )
        };
        event(&tx, rollout_id, "deployment", &text, now)?;
        tx.commit()?;
        Ok(())
    }

    fn add_event(&self, rollout_id: i64, kind: &str, message: &str) -> Result<()> {
        event(&self.conn(), rollout_id, kind, message, now_millis())
    }

    fn events(&self, rollout_id: i64) -> Result<Vec<RolloutEvent>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, kind, message FROM rollout_events WHERE rollout_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([rollout_id], |r| {
            Ok(RolloutEvent {
                at: r.get(0)?,
                kind: r.get(1)?,
                message: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn node_config(&self, node: &str) -> Result<Option<NodeConfig>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT node, config_hash, role, rollout_id FROM node_configs WHERE node = ?1",
                [node],
                |r| {
                    Ok(NodeConfig {
                        node: r.get(0)?,
                        config_hash: r.get(1)?,
                        role: r.get(2)?,
                        rollout_id: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    fn set_node_config(&self, node: &str, config: Option<&NodeConfig>) -> Result<()> {
        let conn = self.conn();
        match config {
            None => conn.execute("DELETE FROM node_configs WHERE node = ?1", [node])?,
            Some(c) => conn.execute(
                "INSERT INTO node_configs (node, config_hash, role, rollout_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(node) DO UPDATE SET config_hash = ?2, role = ?3, rollout_id = ?4",
                params![node, c.config_hash, c.role, c.rollout_id],
            )?,
        };
        Ok(())
    }

    fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.conn().execute(
            "INSERT INTO audit_log (at, actor, role, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![entry.at, entry.actor, entry.role, entry.action, entry.target, entry.detail],
        )?;
        Ok(())
    }

    fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, actor, role, action, target, detail FROM audit_log ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(AuditEntry {
                at: r.get(0)?,
                actor: r.get(1)?,
                role: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn create_experiment(&self, name: &str, document: &str, created_by: &str) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_millis();
        tx.execute(
            "INSERT INTO experiments (name, state, document, progress, created_by, created_at, updated_at)
             VALUES (?1, ?2, ?3, '{}', ?4, ?5, ?5)",
            params![name, ExperimentState::Draft.as_str(), document, created_by, now],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO experiment_events (experiment_id, at, actor, from_state, to_state, reason)
             VALUES (?1, ?2, ?3, '', ?4, 'created')",
            params![id, now, created_by, ExperimentState::Draft.as_str()],
        )?;
        tx.commit()?;
        Ok(id)
    }

    fn experiments(&self) -> Result<Vec<ExperimentRecord>> {
        self.query_experiments("1 = 1", None)
    }

    fn experiment(&self, id: i64) -> Result<Option<ExperimentRecord>> {
        Ok(self
            .query_experiments("id = ?1", Some(id))?
            .into_iter()
            .next())
    }

    fn live_experiments(&self) -> Result<Vec<ExperimentRecord>> {
        let live = super::live_experiment_states_sql();
        self.query_experiments(&format!("state IN ({live})"), None)
    }

    fn experiment_counts(&self) -> Result<Vec<(ExperimentState, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM experiments GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|row| {
            let (state, count) = row?;
            state_count(ExperimentState::parse, "experiment state", &state, count)
        })
        .collect()
    }

    fn transition_experiment(
        &self,
        id: i64,
        to: ExperimentState,
        actor: &str,
        reason: &str,
        progress: Option<&serde_json::Value>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let current: String =
            tx.query_row("SELECT state FROM experiments WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        let from = super::experiment_transition(id, &current, to)?;
        let now = now_millis();
        tx.execute(
            "UPDATE experiments SET state = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, to.as_str(), now],
        )?;
        if let Some(progress) = progress {
            tx.execute(
                "UPDATE experiments SET progress = ?2 WHERE id = ?1",
                params![id, progress.to_string()],
            )?;
        }
        tx.execute(
            "INSERT INTO experiment_events (experiment_id, at, actor, from_state, to_state, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, now, actor, from.as_str(), to.as_str(), reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn set_experiment_progress(&self, id: i64, progress: &serde_json::Value) -> Result<()> {
        self.conn().execute(
            "UPDATE experiments SET progress = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, progress.to_string(), now_millis()],
        )?;
        Ok(())
    }

    fn experiment_events(&self, id: i64) -> Result<Vec<ExperimentEvent>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, actor, from_state, to_state, reason FROM experiment_events
             WHERE experiment_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(ExperimentEvent {
                at: r.get(0)?,
                actor: r.get(1)?,
                from: r.get(2)?,
                to: r.get(3)?,
                reason: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn add_experiment_window(
        &self,
        id: i64,
        index: u32,
        window: &serde_json::Value,
        progress: &serde_json::Value,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO experiment_windows (experiment_id, idx, body) VALUES (?1, ?2, ?3)",
            params![id, index, window.to_string()],
        )?;
        tx.execute(
            "UPDATE experiments SET progress = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, progress.to_string(), now_millis()],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn experiment_windows(&self, id: i64) -> Result<Vec<serde_json::Value>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT body FROM experiment_windows WHERE experiment_id = ?1 ORDER BY idx")?;
        let rows = stmt.query_map([id], |r| r.get::<_, String>(0))?;
        rows.map(|body| {
            let body = body?;
            serde_json::from_str(&body).map_err(|_| corrupt("experiment window", &body))
        })
        .collect()
    }

    fn add_token(&self, name: &str, role: Role, hash: &str) -> Result<()> {
        let result = self.conn().execute(
            "INSERT INTO tokens (hash, name, role, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![hash, name, role.as_str(), now_millis()],
        );
        match result {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!(
                    "a token named {name:?} exists"
                )))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let raw: Option<(String, String, Millis)> = self
            .conn()
            .query_row(
                "SELECT name, role, created_at FROM tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        raw.map(|(name, role, created_at)| {
            Ok(TokenRecord {
                name,
                role: Role::parse(&role).ok_or_else(|| corrupt("token role", &role))?,
                created_at,
            })
        })
        .transpose()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, role, created_at FROM tokens ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        rows.map(|r| {
            let (name, role, created_at) = r?;
            Ok(TokenRecord {
                name,
                role: Role::parse(&role).ok_or_else(|| corrupt("token role", &role))?,
                created_at,
            })
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[test]
    fn migrations_run_once_and_reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
            store.upsert_agent(&conformance::agent("a")).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.agents().unwrap(), vec![conformance::agent("a")]);
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn conformance_agents() {
        conformance::agents_upsert_and_report(&SqliteStore::in_memory().unwrap());
    }

    #[test]
    fn conformance_rollouts() {
        conformance::rollouts_deployments_and_events(&SqliteStore::in_memory().unwrap());
    }

    #[test]
    fn conformance_node_configs_audit_tokens() {
        conformance::node_configs_audit_and_tokens(&SqliteStore::in_memory().unwrap());
    }

    #[test]
    fn conformance_experiments() {
        conformance::experiments_states_events_windows(&SqliteStore::in_memory().unwrap());
    }
}
