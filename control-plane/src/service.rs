//! The service layer every API (gRPC, REST) calls: the fleet of connected agents, config
//! validation, rollouts and the engine that drives them, audit, tokens and metrics.
//!
//! All rollout state lives in the [`Store`]; what lives only in memory is which agents are
//! connected now and what was offered on their current stream, so a restarted control plane
//! picks every active rollout up from the store and re-offers on the agents' new streams.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use phoenix_proto::v1::{
    agent_message, server_message, AgentHello, AgentMessage, ConfigOffer, ConfigState, OfferRole,
    ServerMessage,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::auth::{self, Access, AuthError, Principal, Role};
use crate::rollout::{DeploymentState, RolloutState};
use crate::selector::Selector;
use crate::store::{
    now_millis, AgentRecord, AuditEntry, ConfigVersion, DeploymentRecord, NewDeployment,
    NewRollout, NodeConfig, RolloutEvent, RolloutRecord, Store, StoreError, TokenRecord,
};

/// The stream towards one agent.
pub type AgentSender = mpsc::Sender<Result<ServerMessage, tonic::Status>>;

#[derive(Debug, Clone)]
pub struct Settings {
    /// How long an offered agent may take to answer APPLIED or FAILED.
    pub ack_timeout: Duration,
    /// How long an agent of the current wave may stay disconnected (or, after a restart of
    /// the control plane, take to reconnect) before the rollout counts it lost.
    pub agent_lost_after: Duration,
    /// How often the engine looks at active rollouts besides when something happens.
    pub tick: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(60),
            agent_lost_after: Duration::from_secs(15),
            tick: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid config document:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("invalid experiment definition:\n{}", .0.join("\n"))]
    InvalidDefinition(Vec<String>),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

struct Session {
    id: u64,
    tx: AgentSender,
    labels: BTreeMap<String, String>,
    applied_offer_hash: String,
    /// The last FAILED status: offer hash and the agent's message.
    failed: Option<(String, String)>,
    /// What was offered on this stream, and when.
    offered: Option<(String, Instant)>,
}

#[derive(Default)]
struct Fleet {
    sessions: HashMap<String, Session>,
    disconnected_at: HashMap<String, Instant>,
    next_session: u64,
}

#[derive(Default)]
struct Counters {
    offers_sent: AtomicU64,
    offers_applied: AtomicU64,
    offers_failed: AtomicU64,
}

pub struct ControlPlane {
    store: Arc<dyn Store>,
    fleet: Mutex<Fleet>,
    settings: Settings,
    started: Instant,
    notify: Notify,
    counters: Counters,
    /// Whether the engine has looked for candidates left behind by finished experiments
    /// since this process started.
    experiments_swept: std::sync::atomic::AtomicBool,
}

/// An agent as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    #[serde(flatten)]
    pub record: AgentRecord,
    pub connected: bool,
}

/// A rollout with its deployments and events.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: RolloutRecord,
    pub deployments: Vec<DeploymentRecord>,
    pub events: Vec<RolloutEvent>,
}

fn default_max_unavailable() -> u32 {
    1
}

fn default_role() -> String {
    "candidate".into()
}

/// What a client asks for to start a rollout.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// Label selector (`role=web,zone!=b`); empty selects every connected agent.
    #[serde(default)]
    pub selector: String,
    /// YAML document offered to the agents.
    pub document: String,
    /// `candidate` (added beside the local pipelines) or `baseline` (replaces them).
    #[serde(default = "default_role")]
    pub role: String,
    /// Agents changed at once; the next wave starts when every agent of a wave acked APPLIED.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: u32,
    /// Minimum time a wave stays APPLIED before the next wave starts, in milliseconds.
    #[serde(default)]
    pub wave_delay_ms: u64,
}

impl ControlPlane {
    pub fn new(store: Arc<dyn Store>, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            store,
            fleet: Mutex::new(Fleet::default()),
            settings,
            started: Instant::now(),
            notify: Notify::new(),
            counters: Counters::default(),
            experiments_swept: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    fn fleet(&self) -> MutexGuard<'_, Fleet> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- auth and audit ----

    /// The principal behind an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let token = auth::bearer(header)?;
        match self.store.token_by_hash(&auth::token_hash(token)) {
            Ok(Some(record)) => Ok(Principal {
                name: record.name,
                role: record.role,
            }),
            Ok(None) => Err(AuthError::Invalid),
            Err(err) => Err(AuthError::Store(err.to_string())),
        }
    }

    /// Authenticates and checks the role in one step.
    pub fn authorize(&self, header: Option<&str>, needed: Access) -> Result<Principal, AuthError> {
        let principal = self.authenticate(header)?;
        auth::check(&principal, needed)?;
        Ok(principal)
    }

    pub fn audit(&self, who: &Principal, action: &str, target: &str, detail: &str) {
        let entry = AuditEntry {
            at: now_millis(),
            actor: who.name.clone(),
            role: who.role.as_str().to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        };
        if let Err(err) = self.store.audit(&entry) {
            tracing::error!(?entry, "cannot write the audit log: {err}");
        }
    }

    /// Creates a token and returns it; only its hash is kept.
    pub fn create_token(
        &self,
        who: Option<&Principal>,
        name: &str,
        role: Role,
    ) -> Result<String, ServiceError> {
        if name.trim().is_empty() {
            return Err(ServiceError::BadRequest("a token needs a name".into()));
        }
        let token = auth::new_token();
        self.store
            .add_token(name, role, &auth::token_hash(&token))
            .map_err(|e| match e {
                StoreError::Conflict(m) => ServiceError::Conflict(m),
                other => other.into(),
            })?;
        if let Some(who) = who {
            self.audit(who, "token.create", name, role.as_str());
        }
        Ok(token)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, ServiceError> {
        Ok(self.store.tokens()?)
    }

    pub fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, ServiceError> {
        Ok(self.store.audit_log(limit)?)
    }

    // ---- agents ----

    /// Registers an agent's stream; returns the session id the stream reports with.
    pub fn agent_connected(
        &self,
        hello: &AgentHello,
        tx: AgentSender,
    ) -> Result<u64, ServiceError> {
        if hello.node.trim().is_empty() {
            return Err(ServiceError::BadRequest(
                "the hello needs a node name".into(),
            ));
        }
        let now = now_millis();
        let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
        self.store.upsert_agent(&AgentRecord {
            node: hello.node.clone(),
            labels: labels.clone(),
            version: hello.version.clone(),
            capabilities: hello.capabilities.clone(),
            effective_config_hash: hello.effective_config_hash.clone(),
            applied_offer_hash: hello.applied_offer_hash.clone(),
            first_seen: now,
            last_seen: now,
            last_report: None,
        })?;
        let mut fleet = self.fleet();
        fleet.next_session += 1;
        let id = fleet.next_session;
        fleet.disconnected_at.remove(&hello.node);
        fleet.sessions.insert(
            hello.node.clone(),
            Session {
                id,
                tx,
                labels,
                applied_offer_hash: hello.applied_offer_hash.clone(),
                failed: None,
                offered: None,
            },
        );
        drop(fleet);
        tracing::info!(node = %hello.node, version = %hello.version, effective = %hello.effective_config_hash, offer = %hello.applied_offer_hash, "agent connected");
        self.notify.notify_one();
        Ok(id)
    }

    pub fn agent_message(&self, node: &str, session: u64, message: AgentMessage) {
        let now = now_millis();
        match message.body {
            Some(agent_message::Body::Status(status)) => {
                let state = ConfigState::try_from(status.state).unwrap_or(ConfigState::Unspecified);
                let mut fleet = self.fleet();
                let Some(s) = fleet.sessions.get_mut(node).filter(|s| s.id == session) else {
                    return;
                };
                match state {
                    ConfigState::Applied => {
                        self.counters.offers_applied.fetch_add(1, Ordering::Relaxed);
                        s.applied_offer_hash = status.offer_hash.clone();
                        s.failed = None;
                        let applied = s.applied_offer_hash.clone();
                        drop(fleet);
                        tracing::info!(%node, offer = %status.offer_hash, effective = %status.effective_config_hash, "agent applied an offer");
                        if let Err(err) = self.store.set_agent_hashes(
                            node,
                            &status.effective_config_hash,
                            &applied,
                            now,
                        ) {
                            tracing::error!(%node, "cannot record the agent's config: {err}");
                        }
                    }
                    ConfigState::Failed => {
                        self.counters.offers_failed.fetch_add(1, Ordering::Relaxed);
                        s.failed = Some((status.offer_hash.clone(), status.message.clone()));
                        drop(fleet);
                        tracing::warn!(%node, offer = %status.offer_hash, "agent rejected an offer: {}", status.message);
                    }
                    ConfigState::Applying | ConfigState::Unspecified => return,
                }
                self.notify.notify_one();
            }
            Some(agent_message::Body::Report(report)) => {
                let json = report_json(&report);
                if let Err(err) = self.store.set_agent_report(node, &json, now) {
                    tracing::error!(%node, "cannot record a volume report: {err}");
                }
            }
            Some(agent_message::Body::Heartbeat(_)) => {
                let fleet = self.fleet();
                if let Some(s) = fleet.sessions.get(node).filter(|s| s.id == session) {
                    let _ = s.tx.try_send(Ok(ServerMessage {
                        body: Some(server_message::Body::Heartbeat(
                            phoenix_proto::v1::Heartbeat { unix_millis: now },
                        )),
                    }));
                }
            }
            Some(agent_message::Body::Hello(_)) | None => {}
        }
    }

    pub fn agent_disconnected(&self, node: &str, session: u64) {
        let mut fleet = self.fleet();
        if fleet.sessions.get(node).is_some_and(|s| s.id == session) {
            fleet.sessions.remove(node);
            fleet
                .disconnected_at
                .insert(node.to_string(), Instant::now());
            tracing::warn!(%node, "agent disconnected");
        }
        drop(fleet);
        self.notify.notify_one();
    }

    pub fn agents(&self, selector: &str) -> Result<Vec<AgentView>, ServiceError> {
        let selector =
            Selector::parse(selector).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let records = self.store.agents()?;
        let fleet = self.fleet();
        Ok(records
            .into_iter()
            .filter(|r| selector.matches(&r.labels))
            .map(|record| AgentView {
                connected: fleet.sessions.contains_key(&record.node),
                record,
            })
            .collect())
    }

    pub fn agent(&self, node: &str) -> Result<AgentView, ServiceError> {
        let record = self
            .store
            .agent(node)?
            .ok_or_else(|| ServiceError::NotFound(format!("agent {node:?}")))?;
        Ok(AgentView {
            connected: self.fleet().sessions.contains_key(node),
            record,
        })
    }

    /// Connected agents whose labels match, sorted by node name.
    pub(crate) fn connected_matching(&self, selector: &Selector) -> Vec<String> {
        let fleet = self.fleet();
        let mut nodes: Vec<String> = fleet
            .sessions
            .iter()
            .filter(|(_, s)| selector.matches(&s.labels))
            .map(|(node, _)| node.clone())
            .collect();
        nodes.sort();
        nodes
    }

    pub(crate) fn experiments_swept(&self) -> bool {
        self.experiments_swept.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_experiments_swept(&self) {
        self.experiments_swept.store(true, Ordering::Relaxed);
    }

    /// Runs the engine now rather than at its next tick.
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    // ---- configs and rollouts ----

    /// Every problem of a config document that can be found without an agent's local file.
    pub fn validate(document: &str) -> Vec<String> {
        phoenix_agent::control::check_document(document)
            .into_iter()
            .map(|i| i.to_string())
            .collect()
    }

    pub fn create_rollout(
        &self,
        who: &Principal,
        request: CreateRollout,
    ) -> Result<RolloutView, ServiceError> {
        if request.role != "candidate" && request.role != "baseline" {
            return Err(ServiceError::BadRequest(format!(
                "role must be candidate or baseline, got {:?}",
                request.role
            )));
        }
        if request.max_unavailable == 0 {
            return Err(ServiceError::BadRequest(
                "max_unavailable must be at least 1".into(),
            ));
        }
        let selector = Selector::parse(&request.selector)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let problems = Self::validate(&request.document);
        if !problems.is_empty() {
            return Err(ServiceError::Invalid(problems));
        }
        let hash = phoenix_proto::document_hash(&request.document);
        self.store.put_config(&ConfigVersion {
            hash: hash.clone(),
            document: request.document.clone(),
            created_at: now_millis(),
            created_by: who.name.clone(),
        })?;

        // Holding the fleet lock keeps the engine out while the targets are chosen.
        let fleet = self.fleet();
        let mut targets: Vec<&String> = fleet
            .sessions
            .iter()
            .filter(|(_, s)| selector.matches(&s.labels))
            .map(|(node, _)| node)
            .collect();
        targets.sort();
        if targets.is_empty() {
            return Err(ServiceError::BadRequest(format!(
                "no connected agent matches the selector {:?}",
                request.selector
            )));
        }
        for active in self.store.active_rollouts()? {
            let busy: Vec<String> = self
                .store
                .deployments(active.id)?
                .into_iter()
                .filter(|d| targets.contains(&&d.node))
                .map(|d| d.node)
                .collect();
            if !busy.is_empty() {
                return Err(ServiceError::Conflict(format!(
                    "rollout {} is still {} on {}",
                    active.id,
                    active.state.as_str(),
                    busy.join(", ")
                )));
            }
        }
        let mut deployments = Vec::new();
        for (i, node) in targets.iter().enumerate() {
            deployments.push(NewDeployment {
                node: node.to_string(),
                wave: i as u32 / request.max_unavailable,
                previous: self.store.node_config(node)?,
            });
        }
        let id = self.store.create_rollout(
            &NewRollout {
                selector: request.selector.clone(),
                config_hash: hash.clone(),
                role: request.role.clone(),
                max_unavailable: request.max_unavailable,
                wave_delay_ms: request.wave_delay_ms,
                created_by: who.name.clone(),
            },
            &deployments,
        )?;
        drop(fleet);
        self.audit(
            who,
            "rollout.create",
            &id.to_string(),
            &format!(
                "selector {:?}, config {hash} as {}",
                request.selector, request.role
            ),
        );
        self.notify.notify_one();
        self.rollout(id)
    }

    pub fn rollouts(&self) -> Result<Vec<RolloutRecord>, ServiceError> {
        Ok(self.store.rollouts()?)
    }

    pub fn rollout(&self, id: i64) -> Result<RolloutView, ServiceError> {
        let rollout = self
            .store
            .rollout(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("rollout {id}")))?;
        Ok(RolloutView {
            deployments: self.store.deployments(id)?,
            events: self.store.events(id)?,
            rollout,
        })
    }

    pub fn config(&self, hash: &str) -> Result<ConfigVersion, ServiceError> {
        self.store
            .config(hash)?
            .ok_or_else(|| ServiceError::NotFound(format!("config {hash}")))
    }

    /// Rolls a running or succeeded rollout back: every node it changed gets its previous
    /// config again.
    pub fn rollback(&self, who: &Principal, id: i64) -> Result<RolloutView, ServiceError> {
        let mut fleet = self.fleet();
        let rollout = self
            .store
            .rollout(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("rollout {id}")))?;
        if !rollout.state.can_become(RolloutState::RollingBack) {
            return Err(ServiceError::Conflict(format!(
                "rollout {id} is {}; only a running or succeeded rollout can be rolled back",
                rollout.state.as_str()
            )));
        }
        self.start_rollback(
            &mut fleet,
            &rollout,
            &format!("manual rollback by {}", who.name),
            RolloutState::RolledBack,
        )?;
        drop(fleet);
        self.audit(who, "rollout.rollback", &id.to_string(), "");
        self.notify.notify_one();
        self.rollout(id)
    }

    // ---- the engine ----

    /// Drives every active rollout until `stop` turns true.
    pub async fn run_engine(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(err) = self.step() {
                tracing::error!("rollout engine: {err}");
            }
            if let Err(err) = self.step_experiments() {
                tracing::error!("experiment engine: {err}");
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(self.settings.tick) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One pass over the active rollouts.
    pub fn step(&self) -> Result<(), ServiceError> {
        let mut fleet = self.fleet();
        for rollout in self.store.active_rollouts()? {
            match rollout.state {
                RolloutState::Running => self.step_running(&mut fleet, &rollout)?,
                RolloutState::RollingBack => self.step_rolling_back(&mut fleet, &rollout)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn lost(&self, fleet: &Fleet, node: &str) -> bool {
        let since = fleet
            .disconnected_at
            .get(node)
            .copied()
            .unwrap_or(self.started);
        !fleet.sessions.contains_key(node) && since.elapsed() >= self.settings.agent_lost_after
    }

    fn offer(&self, hash: &str, role: &str) -> Result<ServerMessage, ServiceError> {
        let offer = if hash.is_empty() || role == "clear" {
            ConfigOffer {
                document: String::new(),
                hash: String::new(),
                role: OfferRole::Clear as i32,
            }
        } else {
            ConfigOffer {
                document: self.config(hash)?.document,
                hash: hash.to_string(),
                role: if role == "baseline" {
                    OfferRole::Baseline as i32
                } else {
                    OfferRole::Candidate as i32
                },
            }
        };
        Ok(ServerMessage {
            body: Some(server_message::Body::Offer(offer)),
        })
    }

    /// Offers `hash` on the session's stream unless it already was; a full stream is tried
    /// again at the next step, so a slow agent never blocks the engine.
    fn ensure_offered(
        &self,
        session: &mut Session,
        hash: &str,
        role: &str,
    ) -> Result<(), ServiceError> {
        if session.offered.as_ref().is_some_and(|(h, _)| h == hash) {
            return Ok(());
        }
        let message = self.offer(hash, role)?;
        if session.tx.try_send(Ok(message)).is_ok() {
            self.counters.offers_sent.fetch_add(1, Ordering::Relaxed);
            session.offered = Some((hash.to_string(), Instant::now()));
            session.failed = None;
        }
        Ok(())
    }

    fn step_running(&self, fleet: &mut Fleet, r: &RolloutRecord) -> Result<(), ServiceError> {
        let deployments = self.store.deployments(r.id)?;
        if let Some(d) = deployments
            .iter()
            .find(|d| d.state == DeploymentState::Failed)
        {
            let reason = format!("{} failed: {}", d.node, d.message);
            return self.start_rollback(fleet, r, &reason, RolloutState::Failed);
        }
        let mut waves: Vec<u32> = deployments.iter().map(|d| d.wave).collect();
        waves.dedup();
        let last_wave = waves.last().copied();
        for wave in waves.iter().copied() {
            let in_wave: Vec<&DeploymentRecord> =
                deployments.iter().filter(|d| d.wave == wave).collect();
            if in_wave.iter().all(|d| d.state == DeploymentState::Applied) {
                if Some(wave) != last_wave && r.wave_delay_ms > 0 {
                    let done_at = in_wave
                        .iter()
                        .map(|d| d.updated_at)
                        .max()
                        .unwrap_or_default();
                    if now_millis() - done_at < r.wave_delay_ms as i64 {
                        return Ok(());
                    }
                }
                continue;
            }
            if in_wave.iter().all(|d| d.state == DeploymentState::Pending) {
                let nodes: Vec<&str> = in_wave.iter().map(|d| d.node.as_str()).collect();
                self.store.add_event(
                    r.id,
                    "wave",
                    &format!(
                        "wave {} of {} started: {}",
                        wave + 1,
                        waves.len(),
                        nodes.join(", ")
                    ),
                )?;
            }
            for d in in_wave {
                let lost = self.lost(fleet, &d.node);
                let Some(session) = fleet.sessions.get_mut(&d.node) else {
                    if lost
                        && matches!(
                            d.state,
                            DeploymentState::Pending | DeploymentState::Applying
                        )
                    {
                        let reason = format!("agent {} was lost mid-wave", d.node);
                        return self.start_rollback(fleet, r, &reason, RolloutState::Failed);
                    }
                    continue;
                };
                match d.state {
                    DeploymentState::Pending => {
                        self.store.set_node_config(
                            &d.node,
                            Some(&NodeConfig {
                                node: d.node.clone(),
                                config_hash: r.config_hash.clone(),
                                role: r.role.clone(),
                                rollout_id: r.id,
                            }),
                        )?;
                        self.store.set_deployment_state(
                            r.id,
                            &d.node,
                            DeploymentState::Applying,
                            "",
                        )?;
                        if session.applied_offer_hash == r.config_hash {
                            self.store.set_deployment_state(
                                r.id,
                                &d.node,
                                DeploymentState::Applied,
                                "already running it",
                            )?;
                        } else {
                            self.ensure_offered(session, &r.config_hash, &r.role)?;
                        }
                    }
                    DeploymentState::Applying => {
                        if session.applied_offer_hash == r.config_hash {
                            self.store.set_deployment_state(
                                r.id,
                                &d.node,
                                DeploymentState::Applied,
                                "",
                            )?;
                            self.notify.notify_one();
                        } else if let Some((_, message)) =
                            session.failed.as_ref().filter(|(h, _)| *h == r.config_hash)
                        {
                            self.store.set_deployment_state(
                                r.id,
                                &d.node,
                                DeploymentState::Failed,
                                message,
                            )?;
                            self.notify.notify_one();
                        } else {
                            self.ensure_offered(session, &r.config_hash, &r.role)?;
                            let late = session
                                .offered
                                .as_ref()
                                .is_some_and(|(_, at)| at.elapsed() > self.settings.ack_timeout);
                            if late {
                                let reason = format!(
                                    "agent {} did not answer within {:?}",
                                    d.node, self.settings.ack_timeout
                                );
                                return self.start_rollback(
                                    fleet,
                                    r,
                                    &reason,
                                    RolloutState::Failed,
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        self.store
            .set_rollout_state(r.id, RolloutState::Succeeded, "every wave applied", None)?;
        tracing::info!(rollout = r.id, "rollout succeeded");
        Ok(())
    }

    fn start_rollback(
        &self,
        fleet: &mut Fleet,
        r: &RolloutRecord,
        reason: &str,
        outcome: RolloutState,
    ) -> Result<(), ServiceError> {
        tracing::warn!(rollout = r.id, "rolling back: {reason}");
        self.store
            .set_rollout_state(r.id, RolloutState::RollingBack, reason, Some(outcome))?;
        for d in self.store.deployments(r.id)? {
            match d.state {
                DeploymentState::Pending => self.store.set_deployment_state(
                    r.id,
                    &d.node,
                    DeploymentState::Skipped,
                    "the rollout stopped before this wave",
                )?,
                DeploymentState::Applying | DeploymentState::Applied => {
                    let owner = self.store.node_config(&d.node)?.map(|c| c.rollout_id);
                    if owner.is_some_and(|o| o != r.id) && d.state == DeploymentState::Applied {
                        let message =
                            format!("superseded by rollout {}", owner.unwrap_or_default());
                        self.store.set_deployment_state(
                            r.id,
                            &d.node,
                            DeploymentState::Skipped,
                            &message,
                        )?;
                        continue;
                    }
                    let previous = d.previous_rollout.map(|rollout_id| NodeConfig {
                        node: d.node.clone(),
                        config_hash: d.previous_hash.clone(),
                        role: d.previous_role.clone(),
                        rollout_id,
                    });
                    self.store.set_node_config(&d.node, previous.as_ref())?;
                    self.store.set_deployment_state(
                        r.id,
                        &d.node,
                        DeploymentState::RollingBack,
                        "",
                    )?;
                }
                _ => {}
            }
        }
        if let Some(rollout) = self.store.rollout(r.id)? {
            self.step_rolling_back(fleet, &rollout)?;
        }
        Ok(())
    }

    fn step_rolling_back(&self, fleet: &mut Fleet, r: &RolloutRecord) -> Result<(), ServiceError> {
        let mut remaining = 0;
        for d in self.store.deployments(r.id)? {
            if d.state != DeploymentState::RollingBack {
                continue;
            }
            let Some(session) = fleet.sessions.get_mut(&d.node) else {
                // Offered again when the agent reconnects.
                remaining += 1;
                continue;
            };
            if session.applied_offer_hash == d.previous_hash {
                self.store
                    .set_deployment_state(r.id, &d.node, DeploymentState::RolledBack, "")?;
            } else if let Some((_, message)) = session
                .failed
                .as_ref()
                .filter(|(h, _)| *h == d.previous_hash)
            {
                self.store.set_deployment_state(
                    r.id,
                    &d.node,
                    DeploymentState::RollbackFailed,
                    message,
                )?;
            } else {
                self.ensure_offered(session, &d.previous_hash, &d.previous_role)?;
                remaining += 1;
            }
        }
        if remaining == 0 {
            let outcome = r.rollback_outcome.unwrap_or(RolloutState::Failed);
            self.store.set_rollout_state(r.id, outcome, "", None)?;
            tracing::info!(
                rollout = r.id,
                state = outcome.as_str(),
                "rollback finished"
            );
        }
        Ok(())
    }

    // ---- metrics ----

    /// The control plane's own metrics, as Prometheus text.
    pub fn metrics_text(&self) -> String {
        let connected = self.fleet().sessions.len();
        let mut by_state: BTreeMap<&str, u64> =
            RolloutState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        if let Ok(counts) = self.store.rollout_counts() {
            for (state, count) in counts {
                by_state.insert(state.as_str(), count);
            }
        }
        let mut out = String::new();
        out.push_str("# HELP phoenix_control_plane_agents_connected Agents with an open stream.\n# TYPE phoenix_control_plane_agents_connected gauge\n");
        out.push_str(&format!(
            "phoenix_control_plane_agents_connected {connected}\n"
        ));
        out.push_str("# HELP phoenix_control_plane_offers_total Config offers sent to agents and their answers, by result (sent, applied, failed).\n# TYPE phoenix_control_plane_offers_total counter\n");
        for (result, counter) in [
            ("sent", &self.counters.offers_sent),
            ("applied", &self.counters.offers_applied),
            ("failed", &self.counters.offers_failed),
        ] {
            out.push_str(&format!(
                "phoenix_control_plane_offers_total{{result=\"{result}\"}} {}\n",
                counter.load(Ordering::Relaxed)
            ));
        }
        let mut experiments: BTreeMap<&str, u64> = crate::experiment::ExperimentState::ALL
            .iter()
            .map(|s| (s.as_str(), 0))
            .collect();
        if let Ok(counts) = self.store.experiment_counts() {
            for (state, count) in counts {
                experiments.insert(state.as_str(), count);
            }
        }
        out.push_str("# HELP phoenix_control_plane_experiments Experiments in the store, by state.\n# TYPE phoenix_control_plane_experiments gauge\n");
        for (state, count) in experiments {
            out.push_str(&format!(
                "phoenix_control_plane_experiments{{state=\"{state}\"}} {count}\n"
            ));
        }
        out.push_str("# HELP phoenix_control_plane_rollouts Rollouts in the store, by state.\n# TYPE phoenix_control_plane_rollouts gauge\n");
        for (state, count) in by_state {
            out.push_str(&format!(
                "phoenix_control_plane_rollouts{{state=\"{state}\"}} {count}\n"
            ));
        }
        out
    }
}

/// A volume report as JSON for the store and the API.
pub fn report_json(report: &phoenix_proto::v1::VolumeReport) -> serde_json::Value {
    // JSON has no NaN or infinity; a non-finite value would make the report unreadable.
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    serde_json::json!({
        "unix_millis": report.unix_millis,
        "refused_datapoints": report.refused_datapoints,
        "cpu_seconds": finite(report.cpu_seconds),
        "rss_bytes": report.rss_bytes,
        "pipelines": report.pipelines.iter().map(|p| serde_json::json!({
            "pipeline": p.pipeline,
            "datapoints": p.datapoints,
            "bytes": p.bytes,
            "series_window": p.series_window,
            "series_total": p.series_total,
            "dropped_datapoints": p.dropped_datapoints,
            "critical_series_window": p.critical_series_window,
            "critical_series_total": p.critical_series_total,
            "conserved": p.conserved.iter().map(|(k, v)| (k.clone(), finite(*v))).collect::<BTreeMap<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use phoenix_proto::v1::ConfigStatus;

    const DOC: &str = "exporters: { debug/c: {} }\npipelines: { candidate: { receivers: [otlp], exporters: [debug/c] } }\n";

    struct FakeAgent {
        node: String,
        session: u64,
        rx: mpsc::Receiver<Result<ServerMessage, tonic::Status>>,
    }

    fn connect(cp: &ControlPlane, node: &str, role: &str) -> FakeAgent {
        let (tx, rx) = mpsc::channel(16);
        let hello = AgentHello {
            node: node.into(),
            labels: [("role".to_string(), role.to_string())].into(),
            version: "test".into(),
            ..Default::default()
        };
        let session = cp.agent_connected(&hello, tx).unwrap();
        FakeAgent {
            node: node.into(),
            session,
            rx,
        }
    }

    impl FakeAgent {
        fn offer(&mut self) -> Option<ConfigOffer> {
            match self.rx.try_recv() {
                Ok(Ok(ServerMessage {
                    body: Some(server_message::Body::Offer(o)),
                })) => Some(o),
                _ => None,
            }
        }

        fn ack(&self, cp: &ControlPlane, hash: &str, state: ConfigState, message: &str) {
            let status = ConfigStatus {
                offer_hash: hash.into(),
                state: state as i32,
                message: message.into(),
                effective_config_hash: "e".into(),
            };
            cp.agent_message(
                &self.node,
                self.session,
                AgentMessage {
                    body: Some(agent_message::Body::Status(status)),
                },
            );
        }
    }

    fn setup(settings: Settings) -> (Arc<ControlPlane>, Principal) {
        let cp = ControlPlane::new(Arc::new(SqliteStore::in_memory().unwrap()), settings);
        (
            cp,
            Principal {
                name: "alice".into(),
                role: Role::Operator,
            },
        )
    }

    fn create(cp: &ControlPlane, who: &Principal, selector: &str) -> i64 {
        cp.create_rollout(
            who,
            CreateRollout {
                selector: selector.into(),
                document: DOC.into(),
                role: "candidate".into(),
                max_unavailable: 1,
                wave_delay_ms: 0,
            },
        )
        .unwrap()
        .rollout
        .id
    }

    fn states(cp: &ControlPlane, id: i64) -> Vec<(String, DeploymentState)> {
        cp.rollout(id)
            .unwrap()
            .deployments
            .into_iter()
            .map(|d| (d.node, d.state))
            .collect()
    }

    #[test]
    fn waves_go_one_after_the_other_and_only_to_the_selected_agents() {
        let (cp, who) = setup(Settings::default());
        let mut a = connect(&cp, "a", "web");
        let mut b = connect(&cp, "b", "web");
        let mut c = connect(&cp, "c", "db");
        let id = create(&cp, &who, "role=web");
        cp.step().unwrap();
        let offer = a.offer().expect("wave 1 offers a");
        assert_eq!(offer.hash, phoenix_proto::document_hash(DOC));
        assert!(b.offer().is_none(), "b waits for wave 2");
        a.ack(&cp, &offer.hash, ConfigState::Applied, "");
        cp.step().unwrap();
        cp.step().unwrap();
        let offer = b.offer().expect("wave 2 offers b");
        b.ack(&cp, &offer.hash, ConfigState::Applied, "");
        cp.step().unwrap();
        cp.step().unwrap();
        assert_eq!(
            cp.rollout(id).unwrap().rollout.state,
            RolloutState::Succeeded
        );
        assert!(c.offer().is_none());
        assert!(cp
            .metrics_text()
            .contains("phoenix_control_plane_rollouts{state=\"succeeded\"} 1"));
        // The nodes are busy no more: a second rollout may start, and a rollback of the first
        // puts a and b back on their local files.
        let rolled = cp.rollback(&who, id).unwrap();
        assert_eq!(rolled.rollout.state, RolloutState::RollingBack);
        let clear = a.offer().expect("a gets its previous config back");
        assert_eq!(clear.role, OfferRole::Clear as i32);
        a.ack(&cp, "", ConfigState::Applied, "");
        let _ = b.offer();
        b.ack(&cp, "", ConfigState::Applied, "");
        cp.step().unwrap();
        assert_eq!(
            cp.rollout(id).unwrap().rollout.state,
            RolloutState::RolledBack
        );
        assert_eq!(cp.audit_log(10).unwrap()[0].action, "rollout.rollback");
    }

    #[test]
    fn a_failed_ack_stops_the_rollout_and_rolls_changed_nodes_back() {
        let (cp, who) = setup(Settings::default());
        let mut a = connect(&cp, "a", "web");
        let mut b = connect(&cp, "b", "web");
        let mut c = connect(&cp, "c", "web");
        let id = create(&cp, &who, "role=web");
        cp.step().unwrap();
        let offer = a.offer().unwrap();
        a.ack(&cp, &offer.hash, ConfigState::Applied, "");
        cp.step().unwrap();
        cp.step().unwrap();
        let offer = b.offer().unwrap();
        b.ack(
            &cp,
            &offer.hash,
            ConfigState::Failed,
            "pipelines.candidate: boom",
        );
        cp.step().unwrap();
        cp.step().unwrap();
        let view = cp.rollout(id).unwrap();
        assert_eq!(view.rollout.state, RolloutState::RollingBack);
        assert!(view
            .rollout
            .reason
            .contains("b failed: pipelines.candidate: boom"));
        assert_eq!(a.offer().map(|o| o.role), Some(OfferRole::Clear as i32));
        assert!(c.offer().is_none(), "c's wave never started");
        a.ack(&cp, "", ConfigState::Applied, "");
        cp.step().unwrap();
        assert_eq!(cp.rollout(id).unwrap().rollout.state, RolloutState::Failed);
        assert_eq!(
            states(&cp, id),
            vec![
                ("a".into(), DeploymentState::RolledBack),
                ("b".into(), DeploymentState::Failed),
                ("c".into(), DeploymentState::Skipped)
            ]
        );
    }

    #[test]
    fn an_agent_lost_mid_wave_stops_the_rollout() {
        let (cp, who) = setup(Settings {
            agent_lost_after: Duration::ZERO,
            ..Settings::default()
        });
        let mut a = connect(&cp, "a", "web");
        let _b = connect(&cp, "b", "web");
        let id = create(&cp, &who, "role=web");
        cp.step().unwrap();
        assert!(a.offer().is_some());
        cp.agent_disconnected("a", a.session);
        cp.step().unwrap();
        let view = cp.rollout(id).unwrap();
        assert_eq!(
            view.rollout.state,
            RolloutState::RollingBack,
            "a is rolled back when it returns"
        );
        assert!(view.rollout.reason.contains("agent a was lost mid-wave"));
        // a comes back saying it runs no offer (it never applied this one): nothing to undo.
        let mut a = connect(&cp, "a", "web");
        cp.step().unwrap();
        assert!(a.offer().is_none());
        assert_eq!(cp.rollout(id).unwrap().rollout.state, RolloutState::Failed);
        assert_eq!(
            states(&cp, id)[0],
            ("a".into(), DeploymentState::RolledBack)
        );
    }

    #[test]
    fn overlapping_rollouts_conflict_and_bad_requests_are_refused() {
        let (cp, who) = setup(Settings::default());
        let _a = connect(&cp, "a", "web");
        create(&cp, &who, "role=web");
        let again = cp.create_rollout(
            &who,
            CreateRollout {
                selector: "role=web".into(),
                document: DOC.into(),
                role: "candidate".into(),
                max_unavailable: 1,
                wave_delay_ms: 0,
            },
        );
        assert!(matches!(again, Err(ServiceError::Conflict(_))));
        let none = cp.create_rollout(
            &who,
            CreateRollout {
                selector: "role=nothing".into(),
                document: DOC.into(),
                role: "candidate".into(),
                max_unavailable: 1,
                wave_delay_ms: 0,
            },
        );
        assert!(matches!(none, Err(ServiceError::BadRequest(_))));
        let invalid = cp.create_rollout(
            &who,
            CreateRollout {
                selector: String::new(),
                document: "processors: { batch: { timeout: soon } }".into(),
                role: "candidate".into(),
                max_unavailable: 1,
                wave_delay_ms: 0,
            },
        );
        assert!(
            matches!(invalid, Err(ServiceError::Invalid(p)) if p[0].starts_with("processors.batch.timeout"))
        );
    }
}
