//! REST/JSON under `/api/v1/`, plus `/healthz`, `/readyz`, `/metrics` and the OpenAPI
//! document at `/api/v1/openapi.json`. Handlers are thin over [`ControlPlane`].
//!
//! [`ROUTES`] lists every route once with the access it needs; the OpenAPI document is built
//! from it and the tests try every role on every route.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{Access, AuthError, Principal, Role};
use crate::service::{ControlPlane, CreateRollout, ServiceError};

/// One REST route: method, path (axum syntax), the access it needs (`None`: open), summary.
pub struct RouteDef {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Option<Access>,
    pub summary: &'static str,
}

pub const ROUTES: &[RouteDef] = &[
    RouteDef {
        method: "GET",
        path: "/healthz",
        access: None,
        summary: "Liveness: 200 while the process serves.",
    },
    RouteDef {
        method: "GET",
        path: "/readyz",
        access: None,
        summary: "Readiness: 200 when the store answers.",
    },
    RouteDef {
        method: "GET",
        path: "/metrics",
        access: None,
        summary: "The control plane's own metrics, Prometheus text.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/openapi.json",
        access: None,
        summary: "This document.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/agents",
        access: Some(Access::Read),
        summary: "Agents, optionally filtered by ?selector=k=v,k2!=v2.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/agents/{node}",
        access: Some(Access::Read),
        summary: "One agent with its last volume report.",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/configs/validate",
        access: Some(Access::Read),
        summary: "Checks a config document ({\"document\": yaml}); answers {valid, problems}.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/configs/{hash}",
        access: Some(Access::Read),
        summary: "A stored config version by its hash.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/rollouts",
        access: Some(Access::Read),
        summary: "Every rollout.",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/rollouts",
        access: Some(Access::Write),
        summary: "Starts a rollout ({selector, document, role, max_unavailable, wave_delay_ms}).",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/rollouts/{id}",
        access: Some(Access::Read),
        summary: "One rollout with its deployments and events.",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/rollouts/{id}/rollback",
        access: Some(Access::Write),
        summary: "Rolls a running or succeeded rollout back.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/experiments",
        access: Some(Access::Read),
        summary: "Every experiment, with its state and progress.",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/experiments",
        access: Some(Access::Write),
        summary: "Creates an experiment in draft ({\"document\": yaml definition}); 422 names every bad field.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/experiments/{id}",
        access: Some(Access::Read),
        summary: "One experiment with its transitions, measured windows and verdict.",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/experiments/{id}/start",
        access: Some(Access::Write),
        summary: "draft -> pending; 409 with the reason from any other state.",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/experiments/{id}/stop",
        access: Some(Access::Write),
        summary: "Cancels a live experiment and removes its candidate.",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/experiments/{id}/promote",
        access: Some(Access::Write),
        summary: "succeeded -> promoted: the candidate becomes the baseline by a waved rollout ({\"everywhere\": bool}, optional).",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/experiments/{id}/rollback",
        access: Some(Access::Write),
        summary: "Restores the previous baseline after a promotion, or sets a finished candidate aside.",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/audit",
        access: Some(Access::Admin),
        summary: "The audit log, newest first (?limit=, default 100).",
    },
    RouteDef {
        method: "GET",
        path: "/api/v1/tokens",
        access: Some(Access::Admin),
        summary: "Token names and roles (never the tokens).",
    },
    RouteDef {
        method: "POST",
        path: "/api/v1/tokens",
        access: Some(Access::Admin),
        summary: "Creates a token ({name, role}); the answer holds it, once.",
    },
];

pub struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let status = match err {
            AuthError::Missing | AuthError::Invalid => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
            AuthError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, json!({ "error": err.to_string() }))
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        let status = match &err {
            ServiceError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServiceError::Invalid(problems) => {
                return ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "error": "invalid config document", "problems": problems }),
                )
            }
            ServiceError::InvalidDefinition(problems) => {
                return ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "error": "invalid experiment definition", "problems": problems }),
                )
            }
            ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::Conflict(_) => StatusCode::CONFLICT,
            ServiceError::Auth(a) => return a.clone().into(),
            ServiceError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, json!({ "error": err.to_string() }))
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn to_json<T: serde::Serialize>(value: T) -> ApiResult {
    serde_json::to_value(value).map(Json).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "error": e.to_string() }),
        )
    })
}

fn authorize(
    cp: &ControlPlane,
    headers: &HeaderMap,
    needed: Access,
) -> Result<Principal, ApiError> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(cp.authorize(header, needed)?)
}

/// A JSON body, with a 400 naming the problem when it does not parse.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("invalid request body: {e}") }),
        )
    })
}

type Cp = State<Arc<ControlPlane>>;

#[derive(Deserialize)]
struct SelectorQuery {
    #[serde(default)]
    selector: String,
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateBody {
    document: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: String,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(cp): Cp) -> Response {
    match cp.store().rollouts() {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {err}\n")).into_response(),
    }
}

async fn metrics(State(cp): Cp) -> Response {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        cp.metrics_text(),
    )
        .into_response()
}

async fn openapi_json() -> Json<Value> {
    Json(openapi())
}

async fn list_agents(
    State(cp): Cp,
    headers: HeaderMap,
    Query(q): Query<SelectorQuery>,
) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    to_json(cp.agents(&q.selector)?)
}

async fn get_agent(State(cp): Cp, headers: HeaderMap, Path(node): Path<String>) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    to_json(cp.agent(&node)?)
}

async fn validate(State(cp): Cp, headers: HeaderMap, bytes: axum::body::Bytes) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    let request: ValidateBody = body(&bytes)?;
    let problems = ControlPlane::validate(&request.document);
    Ok(Json(json!({
        "valid": problems.is_empty(),
        "hash": phoenix_proto::document_hash(&request.document),
        "problems": problems,
    })))
}

async fn get_config(State(cp): Cp, headers: HeaderMap, Path(hash): Path<String>) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    to_json(cp.config(&hash)?)
}

async fn list_rollouts(State(cp): Cp, headers: HeaderMap) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    to_json(cp.rollouts()?)
}

async fn create_rollout(
    State(cp): Cp,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let who = authorize(&cp, &headers, Access::Write)?;
    let request: CreateRollout = body(&bytes)?;
    let view = cp.create_rollout(&who, request)?;
    Ok((StatusCode::CREATED, to_json(view)?).into_response())
}

async fn get_rollout(State(cp): Cp, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    to_json(cp.rollout(parse_id(&id)?)?)
}

async fn rollback(State(cp): Cp, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let who = authorize(&cp, &headers, Access::Write)?;
    to_json(cp.rollback(&who, parse_id(&id)?)?)
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| {
        ApiError(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("rollout {id:?} not found") }),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentBody {
    document: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    #[serde(default)]
    everywhere: bool,
}

async fn list_experiments(State(cp): Cp, headers: HeaderMap) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    to_json(cp.experiments()?)
}

async fn create_experiment(
    State(cp): Cp,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let who = authorize(&cp, &headers, Access::Write)?;
    let request: ExperimentBody = body(&bytes)?;
    let view = cp.create_experiment(&who, &request.document)?;
    Ok((StatusCode::CREATED, to_json(view)?).into_response())
}

async fn get_experiment(State(cp): Cp, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&cp, &headers, Access::Read)?;
    to_json(cp.experiment(parse_experiment_id(&id)?)?)
}

async fn experiment_action(
    State(cp): Cp,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> ApiResult {
    let who = authorize(&cp, &headers, Access::Write)?;
    let id = parse_experiment_id(&id)?;
    let view = match action.as_str() {
        "start" => cp.start_experiment(&who, id)?,
        "stop" => cp.stop_experiment(&who, id)?,
        "promote" => {
            let request: PromoteBody = if bytes.is_empty() {
                PromoteBody::default()
            } else {
                body(&bytes)?
            };
            cp.promote_experiment(&who, id, request.everywhere)?
        }
        "rollback" => cp.rollback_experiment(&who, id)?,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                json!({ "error": format!("no experiment action {other:?}: start, stop, promote or rollback") }),
            ))
        }
    };
    to_json(view)
}

fn parse_experiment_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| {
        ApiError(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("experiment {id:?} not found") }),
        )
    })
}

async fn audit(State(cp): Cp, headers: HeaderMap, Query(q): Query<LimitQuery>) -> ApiResult {
    authorize(&cp, &headers, Access::Admin)?;
    to_json(cp.audit_log(q.limit.unwrap_or(100).min(10_000))?)
}

async fn list_tokens(State(cp): Cp, headers: HeaderMap) -> ApiResult {
    authorize(&cp, &headers, Access::Admin)?;
    to_json(cp.tokens()?)
}

async fn create_token(
    State(cp): Cp,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let who = authorize(&cp, &headers, Access::Admin)?;
    let request: TokenBody = body(&bytes)?;
    let role = Role::parse(&request.role).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("unknown role {:?}: agent, viewer, operator or admin", request.role) }),
        )
    })?;
    let token = cp.create_token(Some(&who), &request.name, role)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": request.name, "role": role, "token": token })),
    )
        .into_response())
}

/// The REST router.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{node}", get(get_agent))
        .route("/api/v1/configs/validate", post(validate))
        .route("/api/v1/configs/{hash}", get(get_config))
        .route("/api/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route("/api/v1/rollouts/{id}", get(get_rollout))
        .route("/api/v1/rollouts/{id}/rollback", post(rollback))
        .route(
            "/api/v1/experiments",
            get(list_experiments).post(create_experiment),
        )
        .route("/api/v1/experiments/{id}", get(get_experiment))
        .route("/api/v1/experiments/{id}/{action}", post(experiment_action))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .with_state(cp)
}

/// The JSON body a route takes, by its schema name in the OpenAPI document.
fn request_schema(method: &str, path: &str) -> Option<&'static str> {
    match (method, path) {
        ("POST", "/api/v1/rollouts") => Some("CreateRollout"),
        ("POST", "/api/v1/configs/validate") => Some("Validate"),
        ("POST", "/api/v1/tokens") => Some("CreateToken"),
        ("POST", "/api/v1/experiments") => Some("CreateExperiment"),
        ("POST", "/api/v1/experiments/{id}/promote") => Some("PromoteExperiment"),
        _ => None,
    }
}

/// The OpenAPI 3.1 document, built from [`ROUTES`].
pub fn openapi() -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut op = json!({
            "summary": route.summary,
            "parameters": params,
            "responses": {
                "200": { "description": "OK" },
                "400": { "description": "Bad request" },
                "404": { "description": "Not found" },
            },
        });
        if let Some(access) = route.access {
            op["security"] = json!([{ "bearer": [] }]);
            op["x-phoenix-access"] = json!(access);
            op["responses"]["401"] = json!({ "description": "Missing or unknown token" });
            op["responses"]["403"] = json!({ "description": "The token's role may not do this" });
        }
        if let Some(schema) = request_schema(route.method, route.path) {
            op["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } },
            });
        }
        if let Some(map) = entry.as_object_mut() {
            map.insert(route.method.to_lowercase(), op);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Phoenix control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Fleet of agents, config rollouts and experiments. Roles: viewer (read), operator (read, write), admin (all). Fleet and rollout operations are also served over gRPC as phoenix.v1.FleetService and phoenix.v1.RolloutService; experiments only here.",
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "CreateRollout": {
                    "type": "object",
                    "required": ["document"],
                    "additionalProperties": false,
                    "properties": {
                        "selector": { "type": "string", "description": "Label selector, k=v,k2!=v2; empty selects every connected agent." },
                        "document": { "type": "string", "description": "YAML with any of receivers, processors, exporters, pipelines." },
                        "role": { "type": "string", "enum": ["candidate", "baseline"], "default": "candidate" },
                        "max_unavailable": { "type": "integer", "minimum": 1, "default": 1 },
                        "wave_delay_ms": { "type": "integer", "minimum": 0, "default": 0 },
                    },
                },
                "Validate": {
                    "type": "object",
                    "required": ["document"],
                    "additionalProperties": false,
                    "properties": { "document": { "type": "string" } },
                },
                "CreateToken": {
                    "type": "object",
                    "required": ["name", "role"],
                    "additionalProperties": false,
                    "properties": {
                        "name": { "type": "string" },
                        "role": { "type": "string", "enum": ["agent", "viewer", "operator", "admin"] },
                    },
                },
                "CreateExperiment": {
                    "type": "object",
                    "required": ["document"],
                    "additionalProperties": false,
                    "properties": {
                        "document": { "type": "string", "description": "The experiment definition, YAML (docs/experiments.md)." },
                    },
                },
                "PromoteExperiment": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "everywhere": { "type": "boolean", "default": false, "description": "Promote on every agent, not only the experiment's targets." },
                    },
                },
            },
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Settings;
    use crate::store::sqlite::SqliteStore;
    use tower::ServiceExt;

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut request = http::Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = app
            .clone()
            .oneshot(
                request
                    .body(axum::body::Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn every_listed_route_is_routed_and_in_the_openapi_document() {
        let cp = ControlPlane::new(
            Arc::new(SqliteStore::in_memory().unwrap()),
            Settings::default(),
        );
        let admin = cp.create_token(None, "admin", Role::Admin).unwrap();
        let app = router(cp);
        let doc = openapi();
        for route in ROUTES {
            let path = route
                .path
                .replace("{node}", "n")
                .replace("{id}", "7")
                .replace("{hash}", "h");
            let (status, body) = call(&app, route.method, &path, Some(&admin), "{}").await;
            // A route the router does not know answers 404 or 405 with no JSON body.
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED
                    && (status != StatusCode::NOT_FOUND || body.get("error").is_some()),
                "{} {path}: {status} {body}",
                route.method
            );
            let op = &doc["paths"][route.path][route.method.to_lowercase()];
            assert!(op.is_object());
            let takes_no_body = ["/rollback", "/start", "/stop"]
                .iter()
                .any(|action| route.path.ends_with(action));
            if route.method == "POST" && !takes_no_body {
                let schema = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                    .as_str()
                    .unwrap();
                let name = schema.trim_start_matches("#/components/schemas/");
                assert!(doc["components"]["schemas"][name].is_object(), "{schema}");
            }
        }
    }

    #[tokio::test]
    async fn errors_are_json_with_the_right_status() {
        let cp = ControlPlane::new(
            Arc::new(SqliteStore::in_memory().unwrap()),
            Settings::default(),
        );
        let operator = cp.create_token(None, "ops", Role::Operator).unwrap();
        let app = router(cp.clone());
        let (status, body) = call(&app, "GET", "/api/v1/agents", None, "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("missing bearer token"))
        );
        let (status, _) = call(&app, "GET", "/api/v1/audit", Some(&operator), "").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, body) = call(
            &app,
            "POST",
            "/api/v1/rollouts",
            Some(&operator),
            "{\"document\": 1}",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let bad = json!({ "document": "processors: { batch: { timeout: soon } }" }).to_string();
        let (status, body) = call(&app, "POST", "/api/v1/rollouts", Some(&operator), &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("processors.batch.timeout"));
        let ok = json!({ "document": "processors: { batch: {} }" }).to_string();
        let (status, body) = call(&app, "POST", "/api/v1/rollouts", Some(&operator), &ok).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "no agent is connected: {body}"
        );
        let (status, body) = call(
            &app,
            "POST",
            "/api/v1/configs/validate",
            Some(&operator),
            &ok,
        )
        .await;
        assert_eq!(
            (status, body["valid"].as_bool()),
            (StatusCode::OK, Some(true))
        );
        let (status, _) = call(&app, "GET", "/api/v1/rollouts/abc", Some(&operator), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
