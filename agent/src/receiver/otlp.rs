//! `otlp`: OTLP/gRPC (`MetricsService/Export`) and OTLP/HTTP (`POST /v1/metrics`, protobuf
//! or JSON), gzip on both, with the Collector's status codes.
//!
//! Requests stay bytes: a lean walk validates and counts them, and they are decoded only when
//! a pipeline that changes data is listening.

use std::any::Any;
use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use metrics::Counter;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess;
use prost::Message;
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::watch;
use tonic::server::NamedService;

use super::{BoundReceiver, ReceiverConfig, ReceiverContext, ReceiverFactory, RunningReceiver};
use crate::config::{self, Issue};
use crate::otlp::codec::{ExportHandler, RawMetricsServer};
use crate::otlp::{self, wire, Batch, ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use crate::pipeline::DispatchError;
use crate::telemetry;

pub const FACTORY: ReceiverFactory = ReceiverFactory {
    type_name: "otlp",
    parse,
};

pub const DEFAULT_GRPC_ENDPOINT: &str = "127.0.0.1:4317";
pub const DEFAULT_HTTP_ENDPOINT: &str = "127.0.0.1:4318";
pub const DEFAULT_MAX_RECV_MSG_SIZE_MIB: usize = 4;
pub const DEFAULT_MAX_REQUEST_BODY_SIZE: usize = 20 * 1024 * 1024;
/// Seconds a client is told to wait when the pipelines are full.
const RETRY_AFTER_SECONDS: u64 = 1;

/// Config of the `otlp` receiver; keys as in the Collector.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpReceiverConfig {
    pub protocols: Protocols,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Protocols {
    /// OTLP/gRPC; `grpc:` alone enables it with defaults.
    #[serde(default, deserialize_with = "present")]
    pub grpc: Option<GrpcConfig>,
    /// OTLP/HTTP; `http:` alone enables it with defaults.
    #[serde(default, deserialize_with = "present")]
    pub http: Option<HttpConfig>,
}

/// A key that is present but empty (`grpc:`) means "on, with defaults".
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let value = Option::<T>::deserialize(deserializer)?;
    Ok(Some(value.unwrap_or_default()))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    #[serde(default = "default_grpc_endpoint")]
    pub endpoint: String,
    /// Largest accepted request after decompression, in MiB.
    #[serde(default = "default_max_recv")]
    pub max_recv_msg_size_mib: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            endpoint: default_grpc_endpoint(),
            max_recv_msg_size_mib: default_max_recv(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_http_endpoint")]
    pub endpoint: String,
    /// Largest accepted body, compressed or not, in bytes.
    #[serde(default = "default_max_body")]
    pub max_request_body_size: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            endpoint: default_http_endpoint(),
            max_request_body_size: default_max_body(),
        }
    }
}

fn default_grpc_endpoint() -> String {
    DEFAULT_GRPC_ENDPOINT.to_string()
}
fn default_http_endpoint() -> String {
    DEFAULT_HTTP_ENDPOINT.to_string()
}
fn default_max_recv() -> usize {
    DEFAULT_MAX_RECV_MSG_SIZE_MIB
}
fn default_max_body() -> usize {
    DEFAULT_MAX_REQUEST_BODY_SIZE
}

fn parse(value: Value) -> Result<Arc<dyn ReceiverConfig>, Vec<Issue>> {
    let config: OtlpReceiverConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    let p = &config.protocols;
    if p.grpc.is_none() && p.http.is_none() {
        issues.push(Issue::new("protocols", "enable at least one of grpc, http"));
    }
    if let Some(grpc) = &p.grpc {
        check_addr("protocols.grpc.endpoint", &grpc.endpoint, &mut issues);
        if grpc.max_recv_msg_size_mib == 0 {
            issues.push(Issue::new(
                "protocols.grpc.max_recv_msg_size_mib",
                "must be greater than 0",
            ));
        }
    }
    if let Some(http) = &p.http {
        check_addr("protocols.http.endpoint", &http.endpoint, &mut issues);
        if http.max_request_body_size == 0 {
            issues.push(Issue::new(
                "protocols.http.max_request_body_size",
                "must be greater than 0",
            ));
        }
    }
    if issues.is_empty() {
        Ok(Arc::new(config))
    } else {
        Err(issues)
    }
}

fn check_addr(key: &str, addr: &str, issues: &mut Vec<Issue>) {
    if resolve(addr).is_err() {
        issues.push(Issue::new(
            key,
            format!("invalid listen address {addr:?}: expected host:port, e.g. 0.0.0.0:4317"),
        ));
    }
}

fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

fn bind(addr: &str) -> Result<tokio::net::TcpListener, String> {
    let socket = resolve(addr).map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    let listener =
        std::net::TcpListener::bind(socket).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{addr}: {e}"))?;
    tokio::net::TcpListener::from_std(listener).map_err(|e| format!("{addr}: {e}"))
}

/// What can change without new sockets.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_grpc_message: usize,
    max_http_body: usize,
}

impl OtlpReceiverConfig {
    fn limits(&self) -> Limits {
        Limits {
            max_grpc_message: self
                .protocols
                .grpc
                .as_ref()
                .map_or(0, |g| g.max_recv_msg_size_mib.saturating_mul(1024 * 1024)),
            max_http_body: self
                .protocols
                .http
                .as_ref()
                .map_or(0, |h| h.max_request_body_size),
        }
    }

    fn endpoints(&self) -> (Option<&str>, Option<&str>) {
        (
            self.protocols.grpc.as_ref().map(|g| g.endpoint.as_str()),
            self.protocols.http.as_ref().map(|h| h.endpoint.as_str()),
        )
    }
}

impl ReceiverConfig for OtlpReceiverConfig {
    fn listen_addresses(&self) -> Vec<(String, String)> {
        let (grpc, http) = self.endpoints();
        let mut out = Vec::new();
        if let Some(addr) = grpc {
            out.push(("protocols.grpc.endpoint".to_string(), addr.to_string()));
        }
        if let Some(addr) = http {
            out.push(("protocols.http.endpoint".to_string(), addr.to_string()));
        }
        out
    }

    fn bind(&self) -> Result<Box<dyn BoundReceiver>, String> {
        let (grpc, http) = self.endpoints();
        Ok(Box::new(BoundOtlp {
            config: self.clone(),
            grpc: grpc.map(bind).transpose()?,
            http: http.map(bind).transpose()?,
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct BoundOtlp {
    config: OtlpReceiverConfig,
    grpc: Option<tokio::net::TcpListener>,
    http: Option<tokio::net::TcpListener>,
}

/// Per-transport counters, registered once.
struct TransportMetrics {
    accepted: Counter,
    requests_accepted: Counter,
    requests_refused: Counter,
    refused_malformed: Counter,
    refused_full: Counter,
    refused_invalid: Counter,
}

impl TransportMetrics {
    fn new(receiver: &str, transport: &'static str) -> Self {
        let r = receiver.to_string();
        let refused = |reason: &'static str| metrics::counter!(telemetry::RECEIVER_REFUSED, "receiver" => r.clone(), "transport" => transport, "reason" => reason);
        Self {
            accepted: metrics::counter!(telemetry::RECEIVER_ACCEPTED, "receiver" => r.clone(), "transport" => transport),
            requests_accepted: metrics::counter!(telemetry::RECEIVER_REQUESTS, "receiver" => r.clone(), "transport" => transport, "outcome" => "accepted"),
            requests_refused: metrics::counter!(telemetry::RECEIVER_REQUESTS, "receiver" => r.clone(), "transport" => transport, "outcome" => "refused"),
            refused_malformed: refused("malformed"),
            refused_full: refused("pipelines_full"),
            refused_invalid: refused("invalid"),
        }
    }
}

/// Why a request was not (fully) accepted.
#[derive(Debug)]
enum Refusal {
    Malformed(String),
    TooLarge(String),
    UnsupportedMediaType(String),
    PipelinesFull(String),
    Unavailable(String),
}

impl Refusal {
    fn http_status(&self) -> StatusCode {
        match self {
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::PipelinesFull(_) | Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn message(&self) -> &str {
        match self {
            Refusal::Malformed(m)
            | Refusal::TooLarge(m)
            | Refusal::UnsupportedMediaType(m)
            | Refusal::PipelinesFull(m)
            | Refusal::Unavailable(m) => m,
        }
    }

    fn grpc_status(&self) -> tonic::Status {
        let message = self.message().to_string();
        match self {
            Refusal::Malformed(_) | Refusal::UnsupportedMediaType(_) => {
                tonic::Status::invalid_argument(message)
            }
            Refusal::TooLarge(_) => tonic::Status::resource_exhausted(message),
            Refusal::PipelinesFull(_) | Refusal::Unavailable(_) => {
                tonic::Status::unavailable(message)
            }
        }
    }
}

/// What both transports share.
struct Inner {
    ctx: ReceiverContext,
    limits: ArcSwap<Limits>,
}

impl Inner {
    /// Validates, fans out and counts one request.
    async fn accept(
        &self,
        bytes: Bytes,
        metrics: &TransportMetrics,
    ) -> Result<ExportMetricsServiceResponse, Refusal> {
        let result = self.accept_inner(bytes, metrics).await;
        match &result {
            Ok(_) => metrics.requests_accepted.increment(1),
            Err(refusal) => {
                metrics.requests_refused.increment(1);
                tracing::debug!(receiver = %self.ctx.id, reason = refusal.message(), "refused request");
            }
        }
        result
    }

    async fn accept_inner(
        &self,
        bytes: Bytes,
        metrics: &TransportMetrics,
    ) -> Result<ExportMetricsServiceResponse, Refusal> {
        let counts = wire::count(&bytes).map_err(|e| {
            metrics.refused_malformed.increment(1);
            Refusal::Malformed(format!("request is not a valid OTLP metrics protobuf: {e}"))
        })?;
        let mut response = ExportMetricsServiceResponse::default();
        let batch = if counts.unnamed_metrics > 0 {
            // The data model requires a name; refuse those points and accept the rest.
            let mut request = ExportMetricsServiceRequest::decode(bytes.clone())
                .map_err(|e| Refusal::Malformed(format!("request does not decode: {e}")))?;
            let mut rejected = 0u64;
            for sm in request
                .resource_metrics
                .iter_mut()
                .flat_map(|rm| rm.scope_metrics.iter_mut())
            {
                sm.metrics.retain(|m| {
                    let keep = !m.name.is_empty();
                    if !keep {
                        rejected += otlp::metric_data_points(m.data.as_ref()) as u64;
                    }
                    keep
                });
            }
            otlp::prune_empty(&mut request);
            metrics.refused_invalid.increment(rejected);
            response.partial_success = Some(ExportMetricsPartialSuccess {
                rejected_data_points: rejected as i64,
                error_message: format!(
                    "{} metric(s) without a name were rejected",
                    counts.unnamed_metrics
                ),
            });
            Batch::from_request(request)
        } else {
            Batch::from_validated(bytes, counts.data_points)
        };
        let points = batch.data_points();
        if points == 0 {
            return Ok(response);
        }
        let pipelines = self.ctx.pipelines.load_full();
        let Some(route) = pipelines.route(self.ctx.id.as_str()) else {
            return Err(Refusal::Unavailable(
                "no pipeline is listening to this receiver".into(),
            ));
        };
        if route.needs_decoded() {
            // Decode once here, so a request that does not decode is refused to its sender
            // instead of failing later in a pipeline.
            batch.decoded().map_err(|e| {
                metrics.refused_malformed.increment(points);
                Refusal::Malformed(format!("request does not decode: {e}"))
            })?;
        }
        match route.dispatch(Arc::new(batch)).await {
            Ok(()) => {
                metrics.accepted.increment(points);
                Ok(response)
            }
            Err(DispatchError::Full { pipeline }) => {
                metrics.refused_full.increment(points);
                Err(Refusal::PipelinesFull(format!(
                    "pipeline {pipeline:?} is full; retry later"
                )))
            }
            Err(DispatchError::Closed { pipeline }) => {
                metrics.refused_full.increment(points);
                Err(Refusal::Unavailable(format!(
                    "pipeline {pipeline:?} is shutting down; retry later"
                )))
            }
        }
    }
}

impl BoundReceiver for BoundOtlp {
    fn start(self: Box<Self>, ctx: ReceiverContext) -> Box<dyn RunningReceiver> {
        let inner = Arc::new(Inner {
            limits: ArcSwap::from_pointee(self.config.limits()),
            ctx,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        if let Some(listener) = self.grpc {
            let service = GrpcService {
                inner: inner.clone(),
                metrics: Arc::new(TransportMetrics::new(inner.ctx.id.as_str(), "grpc")),
            };
            let mut stop = stop_rx.clone();
            let id = inner.ctx.id.clone();
            tasks.push(tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let served = tonic::transport::Server::builder()
                    .add_service(RawMetricsServer(service))
                    .add_service(Unsupported::<TracesName>::default())
                    .add_service(Unsupported::<LogsName>::default())
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(err) = served {
                    tracing::error!(receiver = %id, error = %err, "OTLP/gRPC server failed");
                }
            }));
        }
        if let Some(listener) = self.http {
            let state = HttpState {
                inner: inner.clone(),
                metrics: Arc::new(TransportMetrics::new(inner.ctx.id.as_str(), "http")),
            };
            let app = Router::new()
                .route("/v1/metrics", post(http_metrics))
                .route("/v1/traces", any(http_unsupported))
                .route("/v1/logs", any(http_unsupported))
                .with_state(state);
            let mut stop = stop_rx.clone();
            let id = inner.ctx.id.clone();
            tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(err) = served {
                    tracing::error!(receiver = %id, error = %err, "OTLP/HTTP server failed");
                }
            }));
        }
        Box::new(RunningOtlp {
            endpoints: (
                self.config.protocols.grpc.map(|g| g.endpoint),
                self.config.protocols.http.map(|h| h.endpoint),
            ),
            inner,
            stop: stop_tx,
            tasks,
        })
    }
}

struct RunningOtlp {
    endpoints: (Option<String>, Option<String>),
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningReceiver for RunningOtlp {
    fn reconfigure(&self, config: &dyn ReceiverConfig) -> bool {
        let Some(config) = config.as_any().downcast_ref::<OtlpReceiverConfig>() else {
            return false;
        };
        let (grpc, http) = config.endpoints();
        if (grpc, http) != (self.endpoints.0.as_deref(), self.endpoints.1.as_deref()) {
            return false;
        }
        self.inner.limits.store(Arc::new(config.limits()));
        true
    }

    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        let _ = self.stop.send(true);
        Box::pin(async move {
            for task in self.tasks {
                let _ = task.await;
            }
        })
    }
}

// ---- gRPC ----

#[derive(Clone)]
struct GrpcService {
    inner: Arc<Inner>,
    metrics: Arc<TransportMetrics>,
}

impl ExportHandler for GrpcService {
    fn max_message_size(&self) -> usize {
        self.inner.limits.load().max_grpc_message
    }

    fn export(
        &self,
        request: Bytes,
    ) -> BoxFuture<'static, Result<ExportMetricsServiceResponse, tonic::Status>> {
        let service = self.clone();
        Box::pin(async move {
            service
                .inner
                .accept(request, &service.metrics)
                .await
                .map_err(|refusal| refusal.grpc_status())
        })
    }
}

/// Answers traces and logs with a clear `UNIMPLEMENTED` instead of a hang or a bare 404.
#[derive(Clone, Default)]
struct Unsupported<N>(std::marker::PhantomData<N>);

trait SignalName: Send + Sync + 'static {
    const SERVICE: &'static str;
    const SIGNAL: &'static str;
}

#[derive(Clone, Default)]
struct TracesName;
impl SignalName for TracesName {
    const SERVICE: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const SIGNAL: &'static str = "traces";
}

#[derive(Clone, Default)]
struct LogsName;
impl SignalName for LogsName {
    const SERVICE: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const SIGNAL: &'static str = "logs";
}

impl<N: SignalName> NamedService for Unsupported<N> {
    const NAME: &'static str = N::SERVICE;
}

impl<N: SignalName, B: Send + 'static> tower::Service<http::Request<B>> for Unsupported<N> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unimplemented(format!(
            "phoenix-agent accepts metrics only; {} are not supported",
            N::SIGNAL
        ))
        .into_http()))
    }
}

// ---- HTTP ----

#[derive(Clone)]
struct HttpState {
    inner: Arc<Inner>,
    metrics: Arc<TransportMetrics>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Protobuf,
    Json,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Format::Protobuf => "application/x-protobuf",
            Format::Json => "application/json",
        }
    }
}

/// `google.rpc.Status`, the body of OTLP/HTTP error responses.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn error_response(refusal: &Refusal, format: Format) -> Response {
    let status = RpcStatus {
        code: refusal.grpc_status().code() as i32,
        message: refusal.message().to_string(),
    };
    let body = match format {
        Format::Protobuf => status.encode_to_vec(),
        Format::Json => serde_json::to_vec(&status).unwrap_or_default(),
    };
    let mut response = (
        refusal.http_status(),
        [(header::CONTENT_TYPE, format.content_type())],
        body,
    )
        .into_response();
    if matches!(refusal, Refusal::PipelinesFull(_) | Refusal::Unavailable(_)) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    response
}

async fn http_metrics(State(state): State<HttpState>, headers: HeaderMap, body: Body) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let format = match content_type.as_str() {
        "application/x-protobuf" | "application/protobuf" => Format::Protobuf,
        "application/json" => Format::Json,
        other => {
            let refusal = Refusal::UnsupportedMediaType(format!(
                "unsupported content type {other:?}: use application/x-protobuf or application/json"
            ));
            state.metrics.requests_refused.increment(1);
            return error_response(&refusal, Format::Json);
        }
    };
    match read_body(&state, &headers, body).await {
        Ok(bytes) => match to_protobuf(bytes, format) {
            Ok(bytes) => match state.inner.accept(bytes, &state.metrics).await {
                Ok(reply) => {
                    let body = match format {
                        Format::Protobuf => reply.encode_to_vec(),
                        // A full success is `{}`, as the Collector answers, not a null field.
                        Format::Json if reply.partial_success.is_none() => b"{}".to_vec(),
                        Format::Json => serde_json::to_vec(&reply).unwrap_or_default(),
                    };
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, format.content_type())],
                        body,
                    )
                        .into_response()
                }
                Err(refusal) => error_response(&refusal, format),
            },
            Err(refusal) => {
                state.metrics.requests_refused.increment(1);
                state.metrics.refused_malformed.increment(1);
                error_response(&refusal, format)
            }
        },
        Err(refusal) => {
            state.metrics.requests_refused.increment(1);
            error_response(&refusal, format)
        }
    }
}

/// Reads the body within the size limit and undoes gzip.
async fn read_body(state: &HttpState, headers: &HeaderMap, body: Body) -> Result<Bytes, Refusal> {
    let limit = state.inner.limits.load().max_http_body;
    let too_large = || {
        Refusal::TooLarge(format!(
            "request body is larger than max_request_body_size ({limit} bytes)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let raw = axum::body::to_bytes(body, limit).await.map_err(|err| {
        let limited = std::error::Error::source(&err)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if limited {
            too_large()
        } else {
            Refusal::Malformed(format!("cannot read request body: {err}"))
        }
    })?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => Ok(raw),
        "gzip" => {
            let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit));
            let read = flate2::read::GzDecoder::new(&raw[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out);
            match read {
                Ok(n) if n > limit => Err(too_large()),
                Ok(_) => Ok(Bytes::from(out)),
                Err(err) => Err(Refusal::Malformed(format!("invalid gzip body: {err}"))),
            }
        }
        other => Err(Refusal::UnsupportedMediaType(format!(
            "unsupported Content-Encoding {other:?}: use gzip or none"
        ))),
    }
}

fn to_protobuf(bytes: Bytes, format: Format) -> Result<Bytes, Refusal> {
    match format {
        Format::Protobuf => Ok(bytes),
        Format::Json => {
            let request: ExportMetricsServiceRequest = serde_json::from_slice(&bytes)
                .map_err(|e| Refusal::Malformed(format!("invalid OTLP/JSON: {e}")))?;
            Ok(Bytes::from(request.encode_to_vec()))
        }
    }
}

async fn http_unsupported(uri: http::Uri) -> Response {
    let signal = uri.path().trim_start_matches("/v1/");
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain")],
        format!(
            "phoenix-agent accepts metrics only (POST /v1/metrics); {signal} are not supported\n"
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(yaml: &str) -> Vec<Issue> {
        parse(serde_yaml::from_str(yaml).unwrap())
            .err()
            .unwrap_or_default()
    }

    #[test]
    fn empty_protocol_keys_mean_defaults() {
        let config = parse(serde_yaml::from_str("protocols: { grpc: , http: }").unwrap()).unwrap();
        let addrs = config.listen_addresses();
        assert_eq!(addrs[0].1, DEFAULT_GRPC_ENDPOINT);
        assert_eq!(addrs[1].1, DEFAULT_HTTP_ENDPOINT);
    }

    #[test]
    fn bad_settings_name_their_keys() {
        assert_eq!(issues("protocols: {}")[0].path, "protocols");
        assert_eq!(
            issues("protocols: { grpc: { endpoint: 'nohost' } }")[0].path,
            "protocols.grpc.endpoint"
        );
        let unknown = issues("protocols: { grpc: { endpiont: ':1' } }");
        assert_eq!(unknown[0].path, "protocols.grpc.endpiont");
        assert!(unknown[0].message.contains("endpiont"));
    }
}
