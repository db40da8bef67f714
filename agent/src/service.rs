//! The running agent: starts receivers and pipelines, applies reloads, shuts down in order.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use arc_swap::ArcSwap;
use indexmap::IndexMap;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_yaml::Value;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::config::{AgentConfig, ComponentId};
use crate::control::client::{AgentState, ApplyRequest};
use crate::control::{self, Offer, OfferRole};
use crate::pipeline::Pipelines;
use crate::receiver::{BoundReceiver, ReceiverContext, RunningReceiver};
use crate::reload::Watcher;
use crate::telemetry;

struct ReceiverSlot {
    raw: Value,
    addresses: Vec<(String, String)>,
    running: Box<dyn RunningReceiver>,
}

pub struct Agent {
    config_path: PathBuf,
    /// The control-plane offer merged into the local file, if any.
    offer: Option<Offer>,
    state: watch::Sender<AgentState>,
    pipelines: Arc<ArcSwap<Pipelines>>,
    receivers: IndexMap<ComponentId, ReceiverSlot>,
    tracker: TaskTracker,
}

/// Loads `config_path`, runs until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let local = AgentConfig::load(config_path)?;
    // A restart comes back with the last applied offer, unless the local file changed so
    // that the two no longer build together: then the local file alone runs.
    let mut offer = None;
    let mut config = local;
    if let Some(control_plane) = &config.control_plane {
        match control::load_state(&control_plane.state_dir) {
            Ok(Some(saved)) => match control::effective_config(config_path, Some(&saved)) {
                Ok(merged) => {
                    tracing::info!(offer = %saved.hash, role = saved.role.as_str(), "running the last applied control-plane offer");
                    config = merged;
                    offer = Some(saved);
                }
                Err(err) => {
                    tracing::error!(offer = %saved.hash, "the last applied offer no longer builds with the local file; running the local file alone: {err:#}")
                }
            },
            Ok(None) => {}
            Err(err) => {
                tracing::error!(state_dir = %control_plane.state_dir.display(), "cannot read the last applied offer: {err}")
            }
        }
    }
    let config = Arc::new(config);
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    telemetry::describe_all();
    metrics::gauge!(telemetry::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    let telemetry_listener = tokio::net::TcpListener::bind(&config.telemetry.listen)
        .await
        .with_context(|| {
            format!(
                "telemetry.listen: cannot listen on {}",
                config.telemetry.listen
            )
        })?;
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_telemetry_tx, stop_rx) = watch::channel(false);
    let (stop_tx, stop_rx_control) = watch::channel(false);
    let prometheus_handle = prometheus.clone();
    let telemetry_task = tokio::spawn(telemetry::server::serve(
        telemetry_listener,
        prometheus,
        ready.clone(),
        stop_rx,
    ));

    let tracker = TaskTracker::new();
    let pipelines = Pipelines::build(config.clone(), None, &tracker)?;
    let (state, state_rx) = watch::channel(AgentState {
        effective_config_hash: config.hash.clone(),
        applied_offer_hash: offer.as_ref().map(|o| o.hash.clone()).unwrap_or_default(),
    });
    let mut agent = Agent {
        config_path: config_path.to_path_buf(),
        offer,
        state,
        pipelines: Arc::new(ArcSwap::from_pointee(pipelines)),
        receivers: IndexMap::new(),
        tracker,
    };
    for (id, component) in &config.receivers {
        let bound = component
            .config
            .bind()
            .map_err(|e| anyhow!("receivers.{id}: {e}"))?;
        agent.start_receiver(
            id,
            component.raw.clone(),
            component.config.listen_addresses(),
            bound,
        );
    }
    set_config_info(None, &config.hash);
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        config = %config_path.display(),
        hash = %config.hash,
        pipelines = ?config.pipelines.keys().collect::<Vec<_>>(),
        receivers = ?agent.receivers.values().flat_map(|r| r.addresses.iter().map(|a| a.1.clone())).collect::<Vec<_>>(),
        telemetry = %config.telemetry.listen,
        "phoenix-agent started"
    );

    let (apply_tx, mut apply_rx) = mpsc::channel::<ApplyRequest>(1);
    let control_task = config.control_plane.clone().map(|control_plane| {
        tokio::spawn(control::client::run(
            control_plane,
            state_rx,
            apply_tx.clone(),
            prometheus_handle.clone(),
            stop_rx_control.clone(),
        ))
    });

    let mut watcher = Watcher::new(config_path.to_path_buf()).context("watching SIGHUP")?;
    let mut sigterm = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    loop {
        tokio::select! {
            trigger = watcher.next() => agent.reload(&trigger.to_string()).await,
            Some(request) = apply_rx.recv() => {
                let result = agent.apply_offer(request.offer).await;
                let _ = request.reply.send(result);
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
        }
    }

    ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    if let Some(task) = control_task {
        let _ = task.await;
    }
    drop(apply_tx);
    let grace = agent.pipelines.load().config.shutdown_grace_period;
    let drained = agent.shutdown(grace).await;
    let _ = stop_telemetry_tx.send(true);
    let _ = telemetry_task.await;
    if drained {
        tracing::info!("phoenix-agent stopped; every queue drained");
    } else {
        tracing::warn!(grace_period = ?grace, "phoenix-agent stopped before every queue drained");
    }
    Ok(())
}

fn set_config_info(previous: Option<&str>, hash: &str) {
    if let Some(previous) = previous {
        metrics::gauge!(telemetry::CONFIG_INFO, "hash" => previous.to_string()).set(0.0);
    }
    metrics::gauge!(telemetry::CONFIG_INFO, "hash" => hash.to_string()).set(1.0);
}

impl Agent {
    fn start_receiver(
        &mut self,
        id: &ComponentId,
        raw: Value,
        addresses: Vec<(String, String)>,
        bound: Box<dyn BoundReceiver>,
    ) {
        let running = bound.start(ReceiverContext {
            id: id.clone(),
            pipelines: self.pipelines.clone(),
        });
        self.receivers.insert(
            id.clone(),
            ReceiverSlot {
                raw,
                addresses,
                running,
            },
        );
    }

    /// Applies the config file again; on any error the running config stays.
    pub async fn reload(&mut self, trigger: &str) {
        match self.try_reload().await {
            Ok(Some(hash)) => {
                metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "success").increment(1);
                tracing::info!(%trigger, %hash, "configuration reloaded");
            }
            Ok(None) => tracing::info!(%trigger, "configuration unchanged"),
            Err(err) => {
                metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "failure").increment(1);
                tracing::error!(%trigger, "reload rejected, the running configuration stays: {err:#}");
            }
        }
    }

    /// Applies a control-plane offer through the same path as a file reload; on success it
    /// becomes the offer kept in the state dir. Returns the error text on failure.
    pub async fn apply_offer(&mut self, offer: Offer) -> Result<(), String> {
        let trigger = format!("control-plane offer {}", offer.hash);
        let result = match control::effective_config(&self.config_path, Some(&offer)) {
            Ok(config) => self.apply_config(Arc::new(config)).await,
            Err(err) => Err(err.into()),
        };
        match result {
            Ok(changed) => {
                if let Some(hash) = changed {
                    metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "success")
                        .increment(1);
                    tracing::info!(%trigger, %hash, role = offer.role.as_str(), "configuration reloaded");
                } else {
                    tracing::info!(%trigger, "configuration unchanged");
                }
                let kept = (offer.role != OfferRole::Clear).then_some(offer);
                let state_dir = self
                    .pipelines
                    .load()
                    .config
                    .control_plane
                    .as_ref()
                    .map(|c| c.state_dir.clone());
                if let Some(dir) = state_dir {
                    if let Err(err) = control::save_state(&dir, kept.as_ref()) {
                        tracing::error!(state_dir = %dir.display(), "cannot keep the applied offer; a restart runs the previous one: {err}");
                    }
                }
                self.offer = kept;
                self.publish_state();
                Ok(())
            }
            Err(err) => {
                metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "failure").increment(1);
                tracing::error!(%trigger, "reload rejected, the running configuration stays: {err:#}");
                Err(format!("{err:#}"))
            }
        }
    }

    fn publish_state(&self) {
        let state = AgentState {
            effective_config_hash: self.pipelines.load().config.hash.clone(),
            applied_offer_hash: self
                .offer
                .as_ref()
                .map(|o| o.hash.clone())
                .unwrap_or_default(),
        };
        self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }

    async fn try_reload(&mut self) -> anyhow::Result<Option<String>> {
        let config = Arc::new(control::effective_config(
            &self.config_path,
            self.offer.as_ref(),
        )?);
        let changed = self.apply_config(config).await;
        self.publish_state();
        changed
    }

    /// Builds `config` beside the running one, then swaps; on any error the running config
    /// stays. Returns the new hash, or `None` when the config is unchanged.
    async fn apply_config(&mut self, config: Arc<AgentConfig>) -> anyhow::Result<Option<String>> {
        let current = self.pipelines.load_full();
        if config.hash == current.config.hash {
            return Ok(None);
        }
        if config.telemetry != current.config.telemetry {
            tracing::warn!("telemetry settings change at the next restart; the rest applies now");
        }
        if config.control_plane != current.config.control_plane {
            tracing::warn!(
                "control_plane settings change at the next restart; the rest applies now"
            );
        }
        let pipelines = Pipelines::build(config.clone(), Some(&current), &self.tracker)?;

        // Claim new sockets before anything changes, so a taken port rejects the reload.
        let mut bound = Vec::new();
        let mut restart = Vec::new();
        for (id, component) in &config.receivers {
            let addresses = component.config.listen_addresses();
            match self.receivers.get(id) {
                Some(slot) if slot.addresses == addresses => {}
                Some(_) => restart.push((id.clone(), component.raw.clone(), addresses)),
                None => {
                    let socket = component
                        .config
                        .bind()
                        .map_err(|e| anyhow!("receivers.{id}: {e}"))?;
                    bound.push((id.clone(), component.raw.clone(), addresses, socket));
                }
            }
        }

        let previous_hash = current.config.hash.clone();
        self.pipelines.store(Arc::new(pipelines));
        drop(current);

        let removed: Vec<ComponentId> = self
            .receivers
            .keys()
            .filter(|id| !config.receivers.contains_key(*id))
            .cloned()
            .collect();
        for id in removed {
            if let Some(slot) = self.receivers.shift_remove(&id) {
                slot.running.shutdown().await;
            }
        }
        for (id, component) in &config.receivers {
            if let Some(slot) = self.receivers.get_mut(id) {
                if slot.raw != component.raw
                    && slot.addresses == component.config.listen_addresses()
                {
                    slot.running.reconfigure(component.config.as_ref());
                    slot.raw = component.raw.clone();
                }
            }
        }
        for (id, raw, addresses) in restart {
            // A receiver that moves address gives its old sockets up first.
            if let Some(slot) = self.receivers.shift_remove(&id) {
                slot.running.shutdown().await;
            }
            let Some(component) = config.receivers.get(&id) else {
                continue;
            };
            let socket = component
                .config
                .bind()
                .map_err(|e| anyhow!("receivers.{id}: {e} (the receiver is stopped)"))?;
            self.start_receiver(&id, raw, addresses, socket);
        }
        for (id, raw, addresses, socket) in bound {
            self.start_receiver(&id, raw, addresses, socket);
        }
        set_config_info(Some(&previous_hash), &config.hash);
        Ok(Some(config.hash.clone()))
    }

    /// Receivers first, then pipelines (queues, processor flushes), then exporters.
    /// Returns whether everything drained within `grace`.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        for (_, slot) in self.receivers.drain(..) {
            if tokio::time::timeout_at(deadline, slot.running.shutdown())
                .await
                .is_err()
            {
                return false;
            }
        }
        let config = self.pipelines.load().config.clone();
        self.pipelines.store(Arc::new(Pipelines::empty(config)));
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}
