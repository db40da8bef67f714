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
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::{AgentConfig, ComponentId};
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
    pipelines: Arc<ArcSwap<Pipelines>>,
    receivers: IndexMap<ComponentId, ReceiverSlot>,
    tracker: TaskTracker,
}

/// Loads `config_path`, runs until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Arc::new(AgentConfig::load(config_path)?);
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
    let (stop_tx, stop_rx) = watch::channel(false);
    let telemetry_task = tokio::spawn(telemetry::server::serve(
        telemetry_listener,
        prometheus,
        ready.clone(),
        stop_rx,
    ));

    let tracker = TaskTracker::new();
    let pipelines = Pipelines::build(config.clone(), None, &tracker)?;
    let mut agent = Agent {
        config_path: config_path.to_path_buf(),
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

    let mut watcher = Watcher::new(config_path.to_path_buf()).context("watching SIGHUP")?;
    let mut sigterm = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    loop {
        tokio::select! {
            trigger = watcher.next() => agent.reload(&trigger.to_string()).await,
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
        }
    }

    ready.store(false, Ordering::Relaxed);
    let grace = agent.pipelines.load().config.shutdown_grace_period;
    let drained = agent.shutdown(grace).await;
    let _ = stop_tx.send(true);
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

    async fn try_reload(&mut self) -> anyhow::Result<Option<String>> {
        let config = Arc::new(AgentConfig::load(&self.config_path)?);
        let current = self.pipelines.load_full();
        if config.hash == current.config.hash {
            return Ok(None);
        }
        if config.telemetry != current.config.telemetry {
            tracing::warn!("telemetry settings change at the next restart; the rest applies now");
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
