//! gRPC: `AgentService.Connect` (agent tokens only), and `FleetService`/`RolloutService`
//! over the same service layer as REST.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use phoenix_proto::v1::agent_message::Body;
use phoenix_proto::v1::agent_service_server::AgentService;
use phoenix_proto::v1::fleet_service_server::FleetService;
use phoenix_proto::v1::rollout_service_server::RolloutService;
use phoenix_proto::v1::{self as pb, AgentMessage, ServerMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, AuthError, Principal};
use crate::service::{AgentView, ControlPlane, CreateRollout, RolloutView, ServiceError};

/// How long a new stream may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// An agent stream with no message (agents send a heartbeat every 15 s) for this long is
/// closed: its host may have vanished without closing the connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Messages queued towards one agent before offers wait for the next engine step.
pub const AGENT_QUEUE: usize = 16;

#[derive(Clone)]
pub struct Grpc {
    pub cp: Arc<ControlPlane>,
}

fn auth_status(err: AuthError) -> Status {
    match err {
        AuthError::Missing | AuthError::Invalid => Status::unauthenticated(err.to_string()),
        AuthError::Forbidden { .. } => Status::permission_denied(err.to_string()),
        AuthError::Store(_) => Status::unavailable(err.to_string()),
    }
}

fn service_status(err: ServiceError) -> Status {
    match err {
        ServiceError::BadRequest(_)
        | ServiceError::Invalid(_)
        | ServiceError::InvalidDefinition(_) => Status::invalid_argument(err.to_string()),
        ServiceError::NotFound(_) => Status::not_found(err.to_string()),
        ServiceError::Conflict(_) => Status::failed_precondition(err.to_string()),
        ServiceError::Auth(a) => auth_status(a),
        ServiceError::Store(_) => Status::internal(err.to_string()),
    }
}

impl Grpc {
    fn authorize<T>(&self, request: &Request<T>, needed: Access) -> Result<Principal, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.cp.authorize(header, needed).map_err(auth_status)
    }
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Grpc {
    type ConnectStream = ServerStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let who = self.authorize(&request, Access::Agent)?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                body: Some(Body::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no hello")),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ))
            }
        };
        let (tx, rx) = mpsc::channel(AGENT_QUEUE);
        let node = hello.node.clone();
        let session = self
            .cp
            .agent_connected(&hello, tx)
            .map_err(service_status)?;
        tracing::debug!(%node, token = %who.name, "agent stream open");
        let cp = self.cp.clone();
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(IDLE_TIMEOUT, inbound.message()).await {
                    Ok(Ok(Some(message))) => cp.agent_message(&node, session, message),
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        tracing::debug!(%node, "agent stream error: {status}");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(%node, "agent silent for {IDLE_TIMEOUT:?}: closing its stream");
                        break;
                    }
                }
            }
            cp.agent_disconnected(&node, session);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn agent_pb(view: AgentView) -> pb::Agent {
    pb::Agent {
        node: view.record.node,
        labels: view.record.labels.into_iter().collect(),
        version: view.record.version,
        capabilities: view.record.capabilities,
        connected: view.connected,
        effective_config_hash: view.record.effective_config_hash,
        applied_offer_hash: view.record.applied_offer_hash,
        last_seen_unix_millis: view.record.last_seen,
        last_report_json: view
            .record
            .last_report
            .map(|r| r.to_string())
            .unwrap_or_default(),
    }
}

fn rollout_pb(view: RolloutView) -> pb::Rollout {
    let r = view.rollout;
    pb::Rollout {
        id: r.id,
        selector: r.selector,
        config_hash: r.config_hash,
        role: r.role,
        state: r.state.as_str().to_string(),
        max_unavailable: r.max_unavailable,
        wave_delay_millis: r.wave_delay_ms,
        created_by: r.created_by,
        created_unix_millis: r.created_at,
        reason: r.reason,
        deployments: view
            .deployments
            .into_iter()
            .map(|d| pb::Deployment {
                node: d.node,
                wave: d.wave,
                state: d.state.as_str().to_string(),
                previous_hash: d.previous_hash,
                message: d.message,
            })
            .collect(),
        events: view
            .events
            .into_iter()
            .map(|e| pb::RolloutEvent {
                unix_millis: e.at,
                kind: e.kind,
                message: e.message,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl FleetService for Grpc {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let agents = self
            .cp
            .agents(&request.get_ref().selector)
            .map_err(service_status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.into_iter().map(agent_pb).collect(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.authorize(&request, Access::Read)?;
        let agent = self
            .cp
            .agent(&request.get_ref().node)
            .map_err(service_status)?;
        Ok(Response::new(agent_pb(agent)))
    }
}

#[tonic::async_trait]
impl RolloutService for Grpc {
    async fn create_rollout(
        &self,
        request: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let who = self.authorize(&request, Access::Write)?;
        let r = request.into_inner();
        let view = self
            .cp
            .create_rollout(
                &who,
                CreateRollout {
                    selector: r.selector,
                    document: r.document,
                    role: if r.role.is_empty() {
                        "candidate".into()
                    } else {
                        r.role
                    },
                    max_unavailable: r.max_unavailable.max(1),
                    wave_delay_ms: r.wave_delay_millis,
                },
            )
            .map_err(service_status)?;
        Ok(Response::new(rollout_pb(view)))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let mut rollouts = Vec::new();
        for r in self.cp.rollouts().map_err(service_status)? {
            rollouts.push(rollout_pb(self.cp.rollout(r.id).map_err(service_status)?));
        }
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.authorize(&request, Access::Read)?;
        let view = self
            .cp
            .rollout(request.get_ref().id)
            .map_err(service_status)?;
        Ok(Response::new(rollout_pb(view)))
    }

    async fn rollback_rollout(
        &self,
        request: Request<pb::RollbackRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let who = self.authorize(&request, Access::Write)?;
        let view = self
            .cp
            .rollback(&who, request.get_ref().id)
            .map_err(service_status)?;
        Ok(Response::new(rollout_pb(view)))
    }
}
