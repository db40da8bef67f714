//! The experiment operations the APIs call, and the engine step that moves live experiments
//! on: measure the targets without the candidate, deploy it through a rollout, measure
//! windows, judge, remove the candidate; promote or roll back on request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::analysis::{self, NodeSample, Usage, Verdict, Window};
use super::definition::{self, Definition};
use super::ExperimentState;
use crate::auth::{Principal, Role};
use crate::rollout::RolloutState;
use crate::selector::Selector;
use crate::service::{ControlPlane, CreateRollout, ServiceError};
use crate::store::{now_millis, ExperimentEvent, ExperimentRecord, Millis, StoreError};

/// Who the engine's own transitions are recorded as.
const ENGINE: &str = "engine";

/// Where a live experiment is; stored as the experiment's progress JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    pub started_by: String,
    pub targets: Vec<String>,
    /// When the measurement without the candidate began, and the samples it began with.
    pub pending_since: Option<Millis>,
    pub usage_from: BTreeMap<String, NodeSample>,
    pub without_candidate: Option<Usage>,
    /// The rollout that added the candidate in shadow.
    pub rollout_id: Option<i64>,
    pub running_since: Option<Millis>,
    pub measure_from: Option<Millis>,
    pub measure_until: Option<Millis>,
    pub next_window_at: Option<Millis>,
    /// Each target's report at the last window edge.
    pub edge: Option<BTreeMap<String, NodeSample>>,
    pub windows: u32,
    pub verdict: Option<Verdict>,
    /// The rollout that made the candidate the baseline.
    pub promotion_rollout_id: Option<i64>,
}

/// An experiment as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentView {
    pub id: i64,
    pub name: String,
    pub state: ExperimentState,
    pub created_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub document: String,
    pub definition: Option<Definition>,
    pub candidate_pipeline: String,
    pub progress: Progress,
    pub events: Vec<ExperimentEvent>,
    pub windows: Vec<Window>,
}

fn progress_of(record: &ExperimentRecord) -> Progress {
    serde_json::from_value(record.progress.clone()).unwrap_or_default()
}

fn json<T: Serialize>(value: &T) -> Result<serde_json::Value, ServiceError> {
    serde_json::to_value(value).map_err(|e| ServiceError::Store(StoreError::Corrupt(e.to_string())))
}

fn conflict(err: StoreError) -> ServiceError {
    match err {
        StoreError::Conflict(message) => ServiceError::Conflict(message),
        other => other.into(),
    }
}

/// Refuses a transition the experiment's state does not allow, with the reason (409).
fn may_become(record: &ExperimentRecord, next: ExperimentState) -> Result<(), ServiceError> {
    if record.state.can_become(next) {
        Ok(())
    } else {
        Err(conflict(crate::store::experiment_conflict(
            record.id,
            record.state,
            next,
        )))
    }
}

/// The principal the engine acts as for an experiment's rollouts.
fn acting_for(id: i64, who: &str) -> Principal {
    Principal {
        name: format!("experiment {id} ({who})"),
        role: Role::Operator,
    }
}

impl ControlPlane {
    pub fn create_experiment(
        &self,
        who: &Principal,
        document: &str,
    ) -> Result<ExperimentView, ServiceError> {
        let definition = definition::parse(document).map_err(ServiceError::InvalidDefinition)?;
        let id = self
            .store()
            .create_experiment(&definition.name, document, &who.name)?;
        self.audit(who, "experiment.create", &id.to_string(), &definition.name);
        self.experiment(id)
    }

    pub fn experiments(&self) -> Result<Vec<ExperimentView>, ServiceError> {
        self.store()
            .experiments()?
            .into_iter()
            .map(|record| self.view(record, false))
            .collect()
    }

    pub fn experiment(&self, id: i64) -> Result<ExperimentView, ServiceError> {
        let record = self.experiment_record(id)?;
        self.view(record, true)
    }

    fn experiment_record(&self, id: i64) -> Result<ExperimentRecord, ServiceError> {
        self.store()
            .experiment(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("experiment {id}")))
    }

    fn view(&self, record: ExperimentRecord, full: bool) -> Result<ExperimentView, ServiceError> {
        let (events, windows) = if full {
            let windows = self
                .store()
                .experiment_windows(record.id)?
                .into_iter()
                .filter_map(|w| serde_json::from_value(w).ok())
                .collect();
            (self.store().experiment_events(record.id)?, windows)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(ExperimentView {
            id: record.id,
            name: record.name.clone(),
            state: record.state,
            created_by: record.created_by.clone(),
            created_at: record.created_at,
            updated_at: record.updated_at,
            definition: definition::parse(&record.document).ok(),
            candidate_pipeline: Definition::candidate_pipeline(record.id),
            progress: progress_of(&record),
            document: record.document,
            events,
            windows,
        })
    }

    fn definition_of(record: &ExperimentRecord) -> Result<Definition, ServiceError> {
        definition::parse(&record.document).map_err(ServiceError::InvalidDefinition)
    }

    /// `draft → pending`: the targets are the connected agents matching the selector now.
    pub fn start_experiment(
        &self,
        who: &Principal,
        id: i64,
    ) -> Result<ExperimentView, ServiceError> {
        let record = self.experiment_record(id)?;
        let definition = Self::definition_of(&record)?;
        may_become(&record, ExperimentState::Pending)?;
        let selector = Selector::parse(&definition.selector)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let targets = self.connected_matching(&selector);
        if targets.is_empty() {
            return Err(ServiceError::BadRequest(format!(
                "no connected agent matches the selector {:?}",
                definition.selector
            )));
        }
        self.check_targets_free(id, &targets)?;
        let now = now_millis();
        let progress = Progress {
            started_by: who.name.clone(),
            usage_from: self.samples(&targets, &[]),
            targets,
            pending_since: Some(now),
            ..Default::default()
        };
        self.store()
            .transition_experiment(
                id,
                ExperimentState::Pending,
                &who.name,
                "started",
                Some(&json(&progress)?),
            )
            .map_err(conflict)?;
        self.audit(who, "experiment.start", &id.to_string(), "");
        self.wake();
        self.experiment(id)
    }

    /// Cancels a live experiment; the candidate, if deployed, is removed.
    pub fn stop_experiment(
        &self,
        who: &Principal,
        id: i64,
    ) -> Result<ExperimentView, ServiceError> {
        let record = self.experiment_record(id)?;
        may_become(&record, ExperimentState::Cancelled)?;
        self.store()
            .transition_experiment(
                id,
                ExperimentState::Cancelled,
                &who.name,
                &format!("stopped by {}", who.name),
                None,
            )
            .map_err(conflict)?;
        // Read after the change: the engine may have deployed the candidate since `record`.
        let progress = progress_of(&self.experiment_record(id)?);
        self.remove_candidate(id, &progress, "the experiment was cancelled");
        self.audit(who, "experiment.stop", &id.to_string(), "");
        self.experiment(id)
    }

    /// `succeeded → promoted`: the candidate becomes the baseline of the targets (or of every
    /// agent) through a waved rollout that rolls back by itself if an agent fails.
    pub fn promote_experiment(
        &self,
        who: &Principal,
        id: i64,
        everywhere: bool,
    ) -> Result<ExperimentView, ServiceError> {
        let record = self.experiment_record(id)?;
        let definition = Self::definition_of(&record)?;
        may_become(&record, ExperimentState::Promoted)?;
        let document = definition
            .promotion_offer()
            .map_err(|e| ServiceError::Conflict(format!("cannot promote: {e}")))?;
        let rollout = self.create_rollout(
            &acting_for(id, &who.name),
            CreateRollout {
                selector: if everywhere {
                    String::new()
                } else {
                    definition.selector.clone()
                },
                document,
                role: "baseline".into(),
                max_unavailable: definition.max_unavailable,
                wave_delay_ms: 0,
            },
        )?;
        let mut progress = progress_of(&record);
        progress.promotion_rollout_id = Some(rollout.rollout.id);
        let reason = format!(
            "promoted by {} through rollout {}{}",
            who.name,
            rollout.rollout.id,
            if everywhere { " to every agent" } else { "" }
        );
        let promoted = self.store().transition_experiment(
            id,
            ExperimentState::Promoted,
            &who.name,
            &reason,
            Some(&json(&progress)?),
        );
        if let Err(err) = promoted {
            // Another promote or a rollback came first: this rollout belongs to nobody.
            let _ = self.rollback(&acting_for(id, &who.name), rollout.rollout.id);
            return Err(conflict(err));
        }
        self.audit(who, "experiment.promote", &id.to_string(), &reason);
        self.experiment(id)
    }

    /// `promoted → rolled_back` restores the previous baseline (the promotion's rollout is
    /// rolled back); after `succeeded` or `failed` it sets the candidate aside.
    pub fn rollback_experiment(
        &self,
        who: &Principal,
        id: i64,
    ) -> Result<ExperimentView, ServiceError> {
        let record = self.experiment_record(id)?;
        may_become(&record, ExperimentState::RolledBack)?;
        let progress = progress_of(&record);
        let reason = match progress.promotion_rollout_id {
            Some(rollout) if record.state == ExperimentState::Promoted => {
                let state = self.rollout_record(rollout)?.state;
                if state.can_become(RolloutState::RollingBack) {
                    self.rollback(&acting_for(id, &who.name), rollout)?;
                    format!(
                        "rolled back by {}: rollout {rollout} restores the previous baseline",
                        who.name
                    )
                } else {
                    format!(
                        "recorded by {}: the promotion's rollout {rollout} is already {}",
                        who.name,
                        state.as_str()
                    )
                }
            }
            _ => format!("set aside by {}", who.name),
        };
        self.store()
            .transition_experiment(id, ExperimentState::RolledBack, &who.name, &reason, None)
            .map_err(conflict)?;
        self.audit(who, "experiment.rollback", &id.to_string(), &reason);
        self.experiment(id)
    }

    // ---- the engine ----

    /// One pass over the live experiments. An error in one is logged and the others go on.
    pub fn step_experiments(&self) -> Result<(), ServiceError> {
        if !self.experiments_swept() {
            self.sweep_finished_experiments()?;
        }
        for record in self.store().live_experiments()? {
            let id = record.id;
            let definition = match Self::definition_of(&record) {
                Ok(d) => d,
                Err(err) => {
                    self.end(
                        id,
                        ExperimentState::Failed,
                        &format!("definition: {err}"),
                        None,
                    )?;
                    continue;
                }
            };
            let result = match record.state {
                ExperimentState::Pending => self.step_experiment_pending(&record, &definition),
                ExperimentState::Deploying => self.step_experiment_deploying(&record, &definition),
                ExperimentState::Running => self.step_experiment_running(&record, &definition),
                ExperimentState::Analyzing => self.step_experiment_analyzing(&record, &definition),
                _ => Ok(()),
            };
            match result {
                // Another actor (a stop) moved it first: nothing to do.
                Ok(()) | Err(ServiceError::Store(StoreError::Conflict(_))) => {}
                Err(err) => tracing::error!(experiment = id, "experiment engine: {err}"),
            }
        }
        Ok(())
    }

    /// After a restart: a finished experiment whose candidate is still deployed (the control
    /// plane stopped between the verdict and the removal) gets it removed.
    fn sweep_finished_experiments(&self) -> Result<(), ServiceError> {
        for record in self.store().experiments()? {
            if !record.state.is_live() {
                self.remove_candidate(record.id, &progress_of(&record), "the experiment had ended");
            }
        }
        self.mark_experiments_swept();
        Ok(())
    }

    /// Refuses targets that another live experiment measures, or that run a baseline offer
    /// (an agent holds one offer: the candidate's would replace it for the experiment).
    fn check_targets_free(&self, id: i64, targets: &[String]) -> Result<(), ServiceError> {
        for other in self.store().live_experiments()? {
            let other_targets = progress_of(&other).targets;
            let busy: Vec<&str> = other_targets
                .iter()
                .filter(|n| targets.contains(n))
                .map(String::as_str)
                .collect();
            if other.id != id && !busy.is_empty() {
                return Err(ServiceError::Conflict(format!(
                    "experiment {} is {} on {}",
                    other.id,
                    other.state.as_str(),
                    busy.join(", ")
                )));
            }
        }
        for node in targets {
            if let Some(config) = self.store().node_config(node)? {
                if config.role == "baseline" {
                    return Err(ServiceError::Conflict(format!(
                        "{node} runs a baseline offer (rollout {}); an experiment's candidate would replace it while it runs, so promote or roll that back first",
                        config.rollout_id
                    )));
                }
            }
        }
        Ok(())
    }

    fn end(
        &self,
        id: i64,
        state: ExperimentState,
        reason: &str,
        progress: Option<&Progress>,
    ) -> Result<(), ServiceError> {
        tracing::info!(experiment = id, state = state.as_str(), "{reason}");
        let stored = progress.map(json).transpose()?;
        self.store()
            .transition_experiment(id, state, ENGINE, reason, stored.as_ref())?;
        if !state.is_live() {
            let progress = match progress {
                Some(p) => p.clone(),
                None => progress_of(&self.experiment_record(id)?),
            };
            self.remove_candidate(id, &progress, "the experiment ended");
        }
        Ok(())
    }

    /// Each target's last report, trimmed to `pipelines` (none kept when it is empty: CPU
    /// and memory only).
    fn samples(&self, targets: &[String], pipelines: &[&str]) -> BTreeMap<String, NodeSample> {
        let mut samples = BTreeMap::new();
        for node in targets {
            let Ok(Some(agent)) = self.store().agent(node) else {
                continue;
            };
            let Some(mut sample) = agent.last_report.as_ref().and_then(NodeSample::from_report)
            else {
                continue;
            };
            sample
                .pipelines
                .retain(|name, _| pipelines.contains(&name.as_str()));
            samples.insert(node.clone(), sample);
        }
        samples
    }

    fn step_experiment_pending(
        &self,
        record: &ExperimentRecord,
        d: &Definition,
    ) -> Result<(), ServiceError> {
        let mut progress = progress_of(record);
        let now = now_millis();
        let since = progress.pending_since.unwrap_or(now);
        let window = d.window.as_millis().min(i64::MAX as u128) as Millis;
        if now < since + window {
            return Ok(());
        }
        let current = self.samples(&progress.targets, &[]);
        match analysis::usage(&progress.usage_from, &current) {
            Some(usage) => progress.without_candidate = Some(usage),
            None if now < since + 5 * window => {
                // No two reports yet: measure again from these.
                if progress.usage_from.is_empty() && !current.is_empty() {
                    progress.usage_from = current;
                    progress.pending_since = Some(now);
                    self.store().set_experiment_progress(record.id, &json(&progress)?)?;
                }
                return Ok(());
            }
            None => {
                return self.end(
                    record.id,
                    ExperimentState::Failed,
                    "the targets sent no volume reports (is the agents' control_plane.report_interval shorter than the window?)",
                    Some(&progress),
                )
            }
        }
        let offer = d
            .candidate_offer(record.id)
            .map_err(ServiceError::BadRequest)?;
        let rollout = self.create_rollout(
            &acting_for(record.id, &progress.started_by),
            CreateRollout {
                selector: d.selector.clone(),
                document: offer,
                role: "candidate".into(),
                max_unavailable: d.max_unavailable,
                wave_delay_ms: 0,
            },
        );
        match rollout {
            Ok(rollout) => {
                progress.rollout_id = Some(rollout.rollout.id);
                progress.targets = rollout.deployments.iter().map(|d| d.node.clone()).collect();
                let reason = format!(
                    "rollout {} adds the candidate on {}",
                    rollout.rollout.id,
                    progress.targets.join(", ")
                );
                match self.end(
                    record.id,
                    ExperimentState::Deploying,
                    &reason,
                    Some(&progress),
                ) {
                    // Stopped while the rollout was being created: take the candidate away.
                    Err(ServiceError::Store(StoreError::Conflict(_))) => {
                        self.remove_candidate(record.id, &progress, "the experiment was cancelled");
                        Ok(())
                    }
                    other => other,
                }
            }
            Err(err) => self.end(
                record.id,
                ExperimentState::Failed,
                &format!("cannot deploy the candidate: {err}"),
                Some(&progress),
            ),
        }
    }

    fn step_experiment_deploying(
        &self,
        record: &ExperimentRecord,
        d: &Definition,
    ) -> Result<(), ServiceError> {
        let mut progress = progress_of(record);
        let Some(rollout_id) = progress.rollout_id else {
            return self.end(
                record.id,
                ExperimentState::Failed,
                "no candidate rollout",
                None,
            );
        };
        let rollout = self.rollout_record(rollout_id)?;
        match rollout.state {
            RolloutState::Running => Ok(()),
            RolloutState::Succeeded => {
                let now = now_millis();
                let from = now + d.warmup.as_millis().min(i64::MAX as u128) as Millis;
                progress.running_since = Some(now);
                progress.measure_from = Some(from);
                progress.measure_until =
                    Some(from + d.duration.as_millis().min(i64::MAX as u128) as Millis);
                progress.next_window_at = Some(from);
                let reason = format!(
                    "the candidate runs on {}; windows count after the {} warm-up",
                    progress.targets.join(", "),
                    humantime::format_duration(d.warmup)
                );
                self.end(
                    record.id,
                    ExperimentState::Running,
                    &reason,
                    Some(&progress),
                )
            }
            _ => self.end(
                record.id,
                ExperimentState::Failed,
                &format!(
                    "the candidate's rollout {rollout_id} ended {}: {}",
                    rollout.state.as_str(),
                    rollout.reason
                ),
                Some(&progress),
            ),
        }
    }

    fn step_experiment_running(
        &self,
        record: &ExperimentRecord,
        d: &Definition,
    ) -> Result<(), ServiceError> {
        let mut progress = progress_of(record);
        if let Some(reason) = self.candidate_gone(&progress)? {
            return self.end(record.id, ExperimentState::Failed, &reason, Some(&progress));
        }
        let now = now_millis();
        let (Some(next), Some(until)) = (progress.next_window_at, progress.measure_until) else {
            return self.end(
                record.id,
                ExperimentState::Failed,
                "lost its schedule",
                None,
            );
        };
        if now < next {
            return Ok(());
        }
        let candidate = Definition::candidate_pipeline(record.id);
        let pipelines = [d.baseline.pipeline.as_str(), candidate.as_str()];
        let current = self.samples(&progress.targets, &pipelines);
        let window_ms = d.window.as_millis().min(i64::MAX as u128) as Millis;
        let mut following = next + window_ms;
        while following <= now {
            following += window_ms;
        }
        progress.next_window_at = Some(following);
        let mut measured = None;
        match progress.edge.take() {
            None => progress.edge = Some(current),
            Some(edge) => {
                let w = analysis::window(
                    progress.windows,
                    &edge,
                    &current,
                    &d.baseline.pipeline,
                    &candidate,
                    &d.cost,
                );
                if w.nodes > 0 {
                    progress.windows += 1;
                    progress.edge = Some(current);
                    measured = Some(w);
                } else {
                    // No target reported since the last edge: the next window spans both.
                    progress.edge = Some(edge);
                }
            }
        }
        match measured {
            Some(w) => self.store().add_experiment_window(
                record.id,
                w.index,
                &json(&w)?,
                &json(&progress)?,
            )?,
            None => self
                .store()
                .set_experiment_progress(record.id, &json(&progress)?)?,
        }
        if following > until && progress.edge.is_some() && now >= until {
            let reason = format!("{} windows measured", progress.windows);
            return self.end(
                record.id,
                ExperimentState::Analyzing,
                &reason,
                Some(&progress),
            );
        }
        Ok(())
    }

    /// A rollout's own row: the engine's checks need neither its deployments nor events.
    fn rollout_record(&self, id: i64) -> Result<crate::store::RolloutRecord, ServiceError> {
        self.store()
            .rollout(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("rollout {id}")))
    }

    /// Why the candidate no longer runs on every target, if it does not: its rollout was
    /// rolled back, or a later rollout replaced it on a node. Checked every tick from the
    /// stored rollout and node rows (no deployments or events are read).
    fn candidate_gone(&self, progress: &Progress) -> Result<Option<String>, ServiceError> {
        let Some(rollout_id) = progress.rollout_id else {
            return Ok(None);
        };
        let rollout = self.rollout_record(rollout_id)?;
        if rollout.state != RolloutState::Succeeded {
            return Ok(Some(format!(
                "the candidate was removed: rollout {rollout_id} is {} ({})",
                rollout.state.as_str(),
                rollout.reason
            )));
        }
        for node in &progress.targets {
            let owner = self.store().node_config(node)?.map(|c| c.rollout_id);
            if owner != Some(rollout_id) {
                let by = owner.map_or("its local file".to_string(), |r| format!("rollout {r}"));
                return Ok(Some(format!(
                    "the candidate on {node} was replaced by {by}"
                )));
            }
        }
        Ok(None)
    }

    fn step_experiment_analyzing(
        &self,
        record: &ExperimentRecord,
        d: &Definition,
    ) -> Result<(), ServiceError> {
        let mut progress = progress_of(record);
        let windows: Vec<Window> = self
            .store()
            .experiment_windows(record.id)?
            .into_iter()
            .filter_map(|w| serde_json::from_value(w).ok())
            .collect();
        let verdict = analysis::verdict(d, &windows, progress.without_candidate.clone());
        let (state, reason) = if verdict.passed {
            (
                ExperimentState::Succeeded,
                format!(
                    "all {} criteria passed over {} windows",
                    verdict.criteria.len(),
                    windows.len()
                ),
            )
        } else if windows.is_empty() {
            (
                ExperimentState::Failed,
                "no window was measured".to_string(),
            )
        } else {
            let failed: Vec<String> = verdict
                .criteria
                .iter()
                .filter(|c| !c.passed)
                .map(|c| {
                    format!(
                        "{} (measured {:.4}, needs {})",
                        c.criterion, c.measured, c.threshold
                    )
                })
                .collect();
            (
                ExperimentState::Failed,
                format!("failed: {}", failed.join("; ")),
            )
        };
        progress.verdict = Some(verdict);
        self.end(record.id, state, &reason, Some(&progress))
    }

    /// Rolls the candidate's rollout back, so the targets run their baseline alone again.
    fn remove_candidate(&self, id: i64, progress: &Progress, why: &str) {
        let Some(rollout_id) = progress.rollout_id else {
            return;
        };
        let active = matches!(
            self.store().rollout(rollout_id),
            Ok(Some(r)) if r.state.can_become(RolloutState::RollingBack)
        );
        if active {
            let who = acting_for(id, why);
            if let Err(err) = self.rollback(&who, rollout_id) {
                tracing::warn!(
                    experiment = id,
                    rollout = rollout_id,
                    "cannot remove the candidate: {err}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use phoenix_proto::v1::{
        agent_message, server_message, AgentHello, AgentMessage, ConfigState, ConfigStatus,
        ServerMessage, VolumeReport,
    };
    use tokio::sync::mpsc;

    use super::*;
    use crate::service::Settings;
    use crate::store::sqlite::SqliteStore;

    const DEFINITION: &str = r#"
name: t
selector: role=web
candidate: { pipeline: { receivers: [otlp] } }
warmup: 20s
duration: 1s
window: 1s
"#;

    struct Agent {
        node: String,
        session: u64,
        rx: mpsc::Receiver<Result<ServerMessage, tonic::Status>>,
    }

    impl Agent {
        fn connect(cp: &ControlPlane, node: &str, role: &str) -> Agent {
            let (tx, rx) = mpsc::channel(16);
            let hello = AgentHello {
                node: node.into(),
                labels: [("role".to_string(), role.to_string())].into(),
                ..Default::default()
            };
            let session = cp.agent_connected(&hello, tx).unwrap();
            Agent {
                node: node.into(),
                session,
                rx,
            }
        }

        fn send(&self, cp: &ControlPlane, body: agent_message::Body) {
            cp.agent_message(&self.node, self.session, AgentMessage { body: Some(body) });
        }

        fn report(&self, cp: &ControlPlane, cpu_seconds: f64) {
            let report = VolumeReport {
                cpu_seconds,
                unix_millis: now_millis(),
                ..Default::default()
            };
            self.send(cp, agent_message::Body::Report(report));
        }

        /// Acks APPLIED whatever was offered; returns the offers' roles.
        fn apply_offers(&mut self, cp: &ControlPlane) -> Vec<i32> {
            let mut roles = Vec::new();
            while let Ok(Ok(ServerMessage {
                body: Some(server_message::Body::Offer(offer)),
            })) = self.rx.try_recv()
            {
                roles.push(offer.role);
                let status = ConfigStatus {
                    offer_hash: offer.hash,
                    state: ConfigState::Applied as i32,
                    ..Default::default()
                };
                self.send(cp, agent_message::Body::Status(status));
            }
            roles
        }
    }

    fn setup() -> (Arc<ControlPlane>, Principal) {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let who = Principal {
            name: "alice".into(),
            role: Role::Operator,
        };
        (ControlPlane::new(store, Settings::default()), who)
    }

    /// Starts an experiment on `a` and drives it until its candidate is deployed.
    fn deployed(cp: &ControlPlane, who: &Principal, a: &mut Agent) -> i64 {
        a.report(cp, 1.0);
        let id = cp.create_experiment(who, DEFINITION).unwrap().id;
        cp.start_experiment(who, id).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        a.report(cp, 1.5);
        cp.step_experiments().unwrap();
        assert_eq!(cp.experiment(id).unwrap().state, ExperimentState::Deploying);
        cp.step().unwrap();
        assert_eq!(
            a.apply_offers(cp),
            vec![phoenix_proto::v1::OfferRole::Candidate as i32]
        );
        cp.step().unwrap();
        cp.step().unwrap();
        cp.step_experiments().unwrap();
        assert_eq!(cp.experiment(id).unwrap().state, ExperimentState::Running);
        id
    }

    #[test]
    fn stopping_a_running_experiment_removes_its_candidate() {
        let (cp, who) = setup();
        let mut a = Agent::connect(&cp, "a", "web");
        let id = deployed(&cp, &who, &mut a);
        let rollout = cp.experiment(id).unwrap().progress.rollout_id.unwrap();
        let stopped = cp.stop_experiment(&who, id).unwrap();
        assert_eq!(stopped.state, ExperimentState::Cancelled);
        assert_eq!(
            cp.rollout(rollout).unwrap().rollout.state,
            RolloutState::RollingBack
        );
        assert_eq!(
            a.apply_offers(&cp),
            vec![phoenix_proto::v1::OfferRole::Clear as i32]
        );
        // Ended: a second stop, a start or a promote is refused with the reason.
        for result in [
            cp.stop_experiment(&who, id),
            cp.start_experiment(&who, id),
            cp.promote_experiment(&who, id, false),
        ] {
            assert!(
                matches!(&result, Err(ServiceError::Conflict(m)) if m.contains("is cancelled")),
                "{result:?}"
            );
        }
    }

    #[test]
    fn a_candidate_replaced_by_a_later_rollout_fails_the_experiment_and_targets_are_exclusive() {
        let (cp, who) = setup();
        let mut a = Agent::connect(&cp, "a", "web");
        let id = deployed(&cp, &who, &mut a);
        // A second experiment on the same node is refused while the first runs.
        let second = cp.create_experiment(&who, DEFINITION).unwrap().id;
        let refused = cp.start_experiment(&who, second);
        assert!(
            matches!(&refused, Err(ServiceError::Conflict(m)) if m.contains(&format!("experiment {id} is running on a"))),
            "{refused:?}"
        );
        // Another rollout replaces the candidate's offer on a: measuring it would compare
        // the baseline with nothing.
        let request = CreateRollout {
            selector: "role=web".into(),
            document: "exporters: { debug/x: {} }\npipelines: { x: { receivers: [otlp], exporters: [debug/x] } }\n".into(),
            role: "candidate".into(),
            max_unavailable: 1,
            wave_delay_ms: 0,
        };
        cp.create_rollout(&who, request).unwrap();
        cp.step().unwrap();
        cp.step_experiments().unwrap();
        let failed = cp.experiment(id).unwrap();
        assert_eq!(failed.state, ExperimentState::Failed);
        let reason = &failed.events.last().unwrap().reason;
        assert!(
            reason.contains("the candidate on a was replaced by rollout"),
            "{reason}"
        );
    }
}
