//! The agent's side of `phoenix.v1.AgentService.Connect`: connect out, say hello, apply
//! offers through the agent's reload path and ack them, send volume reports and heartbeats,
//! and reconnect with jittered exponential backoff whenever the stream ends.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use phoenix_proto::v1::agent_message::Body as AgentBody;
use phoenix_proto::v1::agent_service_client::AgentServiceClient;
use phoenix_proto::v1::server_message::Body as ServerBody;
use phoenix_proto::v1::{
    AgentHello, AgentMessage, ConfigOffer, ConfigState, ConfigStatus, Heartbeat,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{report, ControlPlaneConfig, Offer, OfferRole};
use crate::telemetry;

pub const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent runs now, for the hello and for acks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    pub effective_config_hash: String,
    pub applied_offer_hash: String,
}

/// An offer handed to the agent's main loop; the reply is `Err(error text)` when the offer
/// was rejected and the running config stays.
pub struct ApplyRequest {
    pub offer: Offer,
    pub reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("cannot connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("control plane answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("cannot read the token file {file}: {source}")]
    Token {
        file: String,
        source: std::io::Error,
    },
    #[error("cannot read the CA file {file}: {source}")]
    Ca {
        file: String,
        source: std::io::Error,
    },
    #[error("the token is not a valid header value")]
    BadToken,
    #[error("the stream to the control plane closed")]
    Closed,
    #[error("the agent is shutting down")]
    Stopping,
}

pub const CAPABILITIES: [&str; 4] = [
    "offers.candidate",
    "offers.baseline",
    "offers.clear",
    "reports.volume",
];

/// Runs the client until `stop` turns true.
pub async fn run(
    config: ControlPlaneConfig,
    state: watch::Receiver<AgentState>,
    apply: mpsc::Sender<ApplyRequest>,
    metrics: PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = session(&config, &state, &apply, &metrics) => r,
            _ = stop.wait_for(|s| *s) => Err(SessionError::Stopping),
        };
        metrics::gauge!(telemetry::CONTROL_PLANE_CONNECTED).set(0.0);
        match result {
            Err(SessionError::Stopping) => return,
            Ok(()) => {
                tracing::warn!(endpoint = %config.endpoint, "control plane closed the stream")
            }
            Err(err) => {
                tracing::warn!(endpoint = %config.endpoint, "control plane session ended: {err}")
            }
        }
        // A session that lasted is a fresh start; a connect that keeps failing backs off.
        if started.elapsed() > MAX_BACKOFF {
            backoff = INITIAL_BACKOFF;
        }
        let jittered = backoff.mul_f64(0.5 + rand::random::<f64>());
        tracing::info!(retry_in = ?jittered, "reconnecting to the control plane");
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn read_token(config: &ControlPlaneConfig) -> Result<Option<String>, SessionError> {
    let Some(file) = &config.token_file else {
        return Ok(None);
    };
    std::fs::read_to_string(file)
        .map(|t| Some(t.trim().to_string()))
        .map_err(|source| SessionError::Token {
            file: file.display().to_string(),
            source,
        })
}

fn message(body: AgentBody) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

async fn session(
    config: &ControlPlaneConfig,
    state: &watch::Receiver<AgentState>,
    apply: &mpsc::Sender<ApplyRequest>,
    metrics: &PrometheusHandle,
) -> Result<(), SessionError> {
    let token = read_token(config)?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())?;
    if let Some(ca_file) = &config.ca_file {
        let pem = std::fs::read(ca_file).map_err(|source| SessionError::Ca {
            file: ca_file.display().to_string(),
            source,
        })?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(HEARTBEAT_INTERVAL)
        .keep_alive_timeout(CONNECT_TIMEOUT)
        .connect()
        .await?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(32);
    let current = state.borrow().clone();
    let hello = AgentHello {
        node: config.node(),
        labels: config.labels.clone().into_iter().collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        effective_config_hash: current.effective_config_hash,
        applied_offer_hash: current.applied_offer_hash,
    };
    tx.send(message(AgentBody::Hello(hello)))
        .await
        .map_err(|_| SessionError::Closed)?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| SessionError::BadToken)?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut inbound = client.connect(request).await?.into_inner();
    metrics::gauge!(telemetry::CONTROL_PLANE_CONNECTED).set(1.0);
    tracing::info!(endpoint = %config.endpoint, node = %config.node(), "connected to the control plane");

    let mut reports = tokio::time::interval(config.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let send = |body: AgentBody| {
        let tx = tx.clone();
        async move {
            tx.send(message(body))
                .await
                .map_err(|_| SessionError::Closed)
        }
    };
    loop {
        tokio::select! {
            received = inbound.message() => match received? {
                None => return Ok(()),
                Some(msg) => match msg.body {
                    Some(ServerBody::Offer(offer)) => {
                        let status = handle_offer(offer, state, apply, &send).await?;
                        send(AgentBody::Status(status)).await?;
                    }
                    Some(ServerBody::Heartbeat(_)) | None => {}
                },
            },
            _ = reports.tick() => {
                let report = report::from_prometheus_text(&metrics.render());
                send(AgentBody::Report(report)).await?;
            }
            _ = heartbeats.tick() => {
                send(AgentBody::Heartbeat(Heartbeat { unix_millis: unix_millis() })).await?;
            }
        }
    }
}

/// Validates the offer's envelope, acks APPLYING, has the main loop apply it and returns the
/// final status.
async fn handle_offer<F, Fut>(
    offer: ConfigOffer,
    state: &watch::Receiver<AgentState>,
    apply: &mpsc::Sender<ApplyRequest>,
    send: &F,
) -> Result<ConfigStatus, SessionError>
where
    F: Fn(AgentBody) -> Fut,
    Fut: std::future::Future<Output = Result<(), SessionError>>,
{
    let failed = |message: String| {
        metrics::counter!(telemetry::CONFIG_OFFERS, "result" => "failed").increment(1);
        tracing::error!(offer = %offer.hash, "config offer rejected, the running configuration stays: {message}");
        ConfigStatus {
            offer_hash: offer.hash.clone(),
            state: ConfigState::Failed as i32,
            message,
            effective_config_hash: state.borrow().effective_config_hash.clone(),
        }
    };
    let role = match phoenix_proto::v1::OfferRole::try_from(offer.role) {
        Ok(phoenix_proto::v1::OfferRole::Candidate) => OfferRole::Candidate,
        Ok(phoenix_proto::v1::OfferRole::Baseline) => OfferRole::Baseline,
        Ok(phoenix_proto::v1::OfferRole::Clear) => OfferRole::Clear,
        _ => return Ok(failed(format!("unknown offer role {}", offer.role))),
    };
    if role != OfferRole::Clear && phoenix_proto::document_hash(&offer.document) != offer.hash {
        return Ok(failed(format!(
            "offer hash {} does not match its document",
            offer.hash
        )));
    }
    let applying = ConfigStatus {
        offer_hash: offer.hash.clone(),
        state: ConfigState::Applying as i32,
        message: String::new(),
        effective_config_hash: state.borrow().effective_config_hash.clone(),
    };
    send(AgentBody::Status(applying)).await?;
    let (reply, result) = oneshot::channel();
    let request = ApplyRequest {
        offer: Offer {
            hash: offer.hash.clone(),
            role,
            document: offer.document.clone(),
        },
        reply,
    };
    apply
        .send(request)
        .await
        .map_err(|_| SessionError::Stopping)?;
    match result.await {
        Ok(Ok(())) => {
            metrics::counter!(telemetry::CONFIG_OFFERS, "result" => "applied").increment(1);
            Ok(ConfigStatus {
                offer_hash: offer.hash.clone(),
                state: ConfigState::Applied as i32,
                message: String::new(),
                effective_config_hash: state.borrow().effective_config_hash.clone(),
            })
        }
        Ok(Err(message)) => Ok(failed(message)),
        Err(_) => Err(SessionError::Stopping),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Sent = Arc<Mutex<Vec<AgentBody>>>;

    fn recorder() -> (
        Sent,
        impl Fn(AgentBody) -> std::future::Ready<Result<(), SessionError>>,
    ) {
        let sent: Sent = Arc::default();
        let sink = sent.clone();
        (sent, move |body| {
            sink.lock().unwrap().push(body);
            std::future::ready(Ok(()))
        })
    }

    fn offer(document: &str, role: phoenix_proto::v1::OfferRole) -> ConfigOffer {
        ConfigOffer {
            document: document.into(),
            hash: phoenix_proto::document_hash(document),
            role: role as i32,
        }
    }

    fn state() -> watch::Receiver<AgentState> {
        let (tx, rx) = watch::channel(AgentState {
            effective_config_hash: "before".into(),
            applied_offer_hash: String::new(),
        });
        std::mem::forget(tx);
        rx
    }

    #[tokio::test]
    async fn an_applied_offer_is_acked_applying_then_applied() {
        let (apply, mut requests) = mpsc::channel::<ApplyRequest>(1);
        tokio::spawn(async move {
            if let Some(request) = requests.recv().await {
                assert_eq!(request.offer.role, OfferRole::Candidate);
                let _ = request.reply.send(Ok(()));
            }
        });
        let (sent, send) = recorder();
        let o = offer("pipelines: {}", phoenix_proto::v1::OfferRole::Candidate);
        let status = handle_offer(o.clone(), &state(), &apply, &send)
            .await
            .unwrap();
        assert_eq!(status.state, ConfigState::Applied as i32);
        assert_eq!(status.offer_hash, o.hash);
        let sent = sent.lock().unwrap();
        assert!(
            matches!(&sent[..], [AgentBody::Status(s)] if s.state == ConfigState::Applying as i32)
        );
    }

    #[tokio::test]
    async fn a_rejected_offer_is_failed_with_the_agents_error_text() {
        let (apply, mut requests) = mpsc::channel::<ApplyRequest>(1);
        tokio::spawn(async move {
            if let Some(request) = requests.recv().await {
                let _ = request.reply.send(Err("pipelines.x: boom".into()));
            }
        });
        let (_, send) = recorder();
        let o = offer("pipelines: {}", phoenix_proto::v1::OfferRole::Baseline);
        let status = handle_offer(o, &state(), &apply, &send).await.unwrap();
        assert_eq!(status.state, ConfigState::Failed as i32);
        assert_eq!(status.message, "pipelines.x: boom");
        assert_eq!(status.effective_config_hash, "before");
    }

    #[tokio::test]
    async fn bad_envelopes_fail_without_reaching_the_agent() {
        let (apply, _requests) = mpsc::channel::<ApplyRequest>(1);
        let (sent, send) = recorder();
        let mut tampered = offer("pipelines: {}", phoenix_proto::v1::OfferRole::Candidate);
        tampered.document.push(' ');
        let status = handle_offer(tampered, &state(), &apply, &send)
            .await
            .unwrap();
        assert_eq!(status.state, ConfigState::Failed as i32);
        assert!(status.message.contains("does not match its document"));
        let mut unknown = offer("pipelines: {}", phoenix_proto::v1::OfferRole::Candidate);
        unknown.role = 42;
        let status = handle_offer(unknown, &state(), &apply, &send)
            .await
            .unwrap();
        assert!(status.message.contains("unknown offer role 42"));
        assert!(sent.lock().unwrap().is_empty(), "not even APPLYING");
    }
}
