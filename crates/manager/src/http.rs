//! The `/v1` HTTP API: routing, authentication, audit of refusals, error
//! bodies and the OpenAPI document.
//!
//! Every request needs `Authorization: Bearer <token>`. Agent tokens reach
//! only `/v1/agent/*`. Successful mutations write their audit record in the
//! same store transaction as the change (see [`crate::core`]); refused
//! mutations — bad token, bad input, conflicts — are audited here.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drove_api::{
    AgentCallKind, AuditRecord, AuditVerification, CallOutcome, CallResult, CloneGuestRequest, ConsoleLog,
    CreateGuestRequest, CreateSnapshotRequest, CreateVlanRequest, DpmRound, DrainRequest, DrsRound, ErrorBody,
    ErrorResponse, ExecRequest, ExecResponse, FailoverPlanView, GuestInterface, GuestView, HaSettings, HaStatus,
    HeartbeatRequest, HeartbeatResponse, HostView, HotplugRequest, ImportImageRequest, MaintenanceRequest,
    MigrateRequest, MoveStorageRequest, OperationAccepted, PoolView, RegisterRequest, RegisterResponse,
    SetLimitsRequest, SetTemplateRequest, SnapshotList, StopGuestRequest, VlanView,
};
use drove_model::image::Image;
use drove_model::{Operation, OperationId};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::auth::{Principal, Role};
use crate::core::{ApiError, Ctx, GuestAction, Manager};

/// The error message of a failed response, for the audit middleware.
#[derive(Debug, Clone)]
struct Failure(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorResponse {
            error: ErrorBody { code: self.code.to_owned(), message: self.message.clone(), field: self.field },
        };
        let mut resp = (status, Json(body)).into_response();
        resp.extensions_mut().insert(Failure(self.message));
        resp
    }
}

/// A JSON body whose parse errors become one-line 400s naming the field.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rej) => Err(json_error(rej)),
        }
    }
}

fn json_error(rej: JsonRejection) -> ApiError {
    let text = rej.body_text();
    // axum reports "Failed to deserialize ...: <path>: <serde message>".
    let detail = text.split_once("target type: ").map_or(text.as_str(), |(_, d)| d);
    let field = detail.split_once(": ").map(|(path, _)| path).filter(|p| !p.contains(' ')).map(str::to_owned);
    ApiError { field, ..ApiError::invalid("body", format!("invalid request body: {detail}")) }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        Ok(Ctx { principal, action: format!("{} {}", parts.method, parts.uri.path()) })
    }
}

fn is_mutation(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

async fn authenticate(State(m): State<Arc<Manager>>, mut req: Request, next: Next) -> Response {
    m.http_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mutation = is_mutation(req.method());
    let action = format!("{} {}", req.method(), req.uri().path());
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let principal = match token {
        None => Err(ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)")),
        Some(t) => m.authenticate(t).ok_or_else(|| ApiError::unauthorized("invalid bearer token")),
    };
    let principal = match principal {
        Ok(p) if p.role == Role::Agent && !req.uri().path().starts_with("/v1/agent/") => {
            Err((ApiError::forbidden(format!("token {:?} may only use the agent protocol", p.name)), p))
        }
        Ok(p) => Ok(p),
        Err(e) => Err((e, Principal { name: "anonymous".into(), role: Role::Agent })),
    };
    let principal = match principal {
        Ok(p) => p,
        Err((e, who)) => {
            if mutation {
                m.audit_event(&Ctx { principal: who, action }, None, &e.message, e.status).await;
            }
            return e.into_response();
        }
    };
    req.extensions_mut().insert(principal.clone());
    let resp = next.run(req).await;
    if mutation && !resp.status().is_success() {
        let message = resp.extensions().get::<Failure>().map_or_else(|| resp.status().to_string(), |f| f.0.clone());
        m.audit_event(&Ctx { principal, action }, None, &message, resp.status().as_u16()).await;
    }
    resp
}

pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/pools", get(list_pools))
        .route("/v1/drs", get(drs_status))
        .route("/v1/dpm", get(dpm_status))
        .route("/v1/hosts/{host}/standby", post(standby_host))
        .route("/v1/hosts/{host}/wake", post(wake_host))
        .route("/v1/hosts/{host}", get(get_host))
        .route("/v1/hosts/{host}/maintenance", post(set_maintenance))
        .route("/v1/hosts/{host}/drain", post(drain_host))
        .route("/v1/hosts/{host}/failover-plan", get(failover_plan))
        .route("/v1/settings/ha", get(get_ha).put(set_ha))
        .route("/v1/guests", get(list_guests).post(create_guest))
        .route("/v1/guests/{guest}", get(get_guest).delete(delete_guest))
        .route("/v1/guests/{guest}/start", post(start_guest))
        .route("/v1/guests/{guest}/stop", post(stop_guest))
        .route("/v1/guests/{guest}/reset", post(reset_guest))
        .route("/v1/guests/{guest}/clone", post(clone_guest))
        .route("/v1/guests/{guest}/template", post(set_template))
        .route("/v1/vlans", get(list_vlans).post(create_vlan))
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/images/{image}", axum::routing::delete(delete_image))
        .route("/v1/vlans/{vlan}", axum::routing::delete(delete_vlan))
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/operations/{id}/cancel", post(cancel_operation))
        .route("/v1/guests/{guest}/migrate", post(migrate_guest))
        .route("/v1/guests/{guest}/storage", post(move_storage))
        .route("/v1/audit", get(list_audit))
        .route("/v1/audit/verify", get(verify_audit))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/results", post(call_result))
        .route("/v1/agent/console/{session}", post(agent_console))
        .route("/v1/guests/{guest}/log", get(console_log))
        .route("/v1/guests/{guest}/exec", post(exec))
        .route("/v1/guests/{guest}/hotplug", post(hotplug))
        .route("/v1/guests/{guest}/limits", post(set_limits))
        .route("/v1/guests/{guest}/interfaces", get(interfaces))
        .route("/v1/guests/{guest}/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/v1/guests/{guest}/snapshots/{snapshot}", axum::routing::delete(delete_snapshot))
        .route("/v1/guests/{guest}/snapshots/{snapshot}/restore", post(restore_snapshot))
        .route("/v1/guests/{guest}/console", get(console))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError { status: 404, code: "not_found", message: "no such API path".into(), field: None }
        })
        .layer(middleware::from_fn_with_state(m.clone(), authenticate))
        .with_state(m)
}

type Res<T> = Result<T, ApiError>;

/// The OpenAPI document, as served and as checked in at `openapi/drove.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", responses((status = 200, description = "This document")))]
async fn openapi() -> Response {
    let mut resp = openapi_json().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, body = [HostView]), (status = 401, body = ErrorResponse)))]
async fn list_hosts(State(m): State<Arc<Manager>>) -> Res<Json<Vec<HostView>>> {
    m.list_hosts().await.map(Json)
}

#[utoipa::path(get, path = "/v1/pools", tag = "storage",
    description = "The storage pools: the shared one every host sees and each host's local one, with their space as the hosts last reported it and what their guests' disks are provisioned to.",
    responses((status = 200, body = [PoolView]), (status = 401, body = ErrorResponse)))]
async fn list_pools(State(m): State<Arc<Manager>>) -> Res<Json<Vec<PoolView>>> {
    m.list_pools().await.map(Json)
}

#[utoipa::path(get, path = "/v1/drs", tag = "hosts",
    description = "The rebalancer's (DRS) last round: the migrations it recommended to relieve hot hosts, each with its reason, and in full mode the operations it started. The mode and thresholds are manager settings (`drove manager --drs ...`).",
    responses((status = 200, body = DrsRound), (status = 401, body = ErrorResponse)))]
async fn drs_status(State(m): State<Arc<Manager>>) -> Res<Json<DrsRound>> {
    Ok(Json(m.drs_status()))
}

#[utoipa::path(get, path = "/v1/dpm", tag = "hosts",
    description = "Power management's (DPM) last round: hosts to wake ahead of the load of the hours ahead, or hosts to empty (the migrations, each with its reason) and put into standby; the estimated watts now and saved; and what went wrong carrying out earlier rounds. The mode, thresholds and power driver are manager settings (`drove manager --dpm ... --power-driver ...`).",
    responses((status = 200, body = DpmRound), (status = 401, body = ErrorResponse)))]
async fn dpm_status(State(m): State<Arc<Manager>>) -> Res<Json<DpmRound>> {
    Ok(Json(m.dpm_status()))
}

#[utoipa::path(post, path = "/v1/hosts/{host}/standby", tag = "hosts", params(("host" = String, Path, description = "Host name or id")),
    description = "Put an empty, up host into standby and power it off through the power driver. Refused while guests are placed on or migrating to it (drain it first) or when HA would lose its reserve. If the driver fails the host stays on (it goes through `waking` back to `up`) and the answer says why.",
    responses((status = 200, body = HostView), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse), (status = 502, body = ErrorResponse)))]
async fn standby_host(State(m): State<Arc<Manager>>, ctx: Ctx, Path(host): Path<String>) -> Res<Json<HostView>> {
    m.standby_host(&ctx, &host).await.map(Json)
}

#[utoipa::path(post, path = "/v1/hosts/{host}/wake", tag = "hosts", params(("host" = String, Path, description = "Host name or id")),
    description = "Power a host in standby (or down) on through the power driver. It is `waking` until its agent registers, then `up`; `down` if it does not within the wake timeout.",
    responses((status = 200, body = HostView), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse), (status = 502, body = ErrorResponse)))]
async fn wake_host(State(m): State<Arc<Manager>>, ctx: Ctx, Path(host): Path<String>) -> Res<Json<HostView>> {
    m.wake_host(&ctx, &host).await.map(Json)
}

#[utoipa::path(get, path = "/v1/hosts/{host}", tag = "hosts", params(("host" = String, Path, description = "Host name or id")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorResponse)))]
async fn get_host(State(m): State<Arc<Manager>>, Path(host): Path<String>) -> Res<Json<HostView>> {
    m.get_host(&host).await.map(Json)
}

#[utoipa::path(post, path = "/v1/hosts/{host}/maintenance", tag = "hosts", params(("host" = String, Path, description = "Host name or id")),
    request_body = MaintenanceRequest,
    responses((status = 200, body = HostView), (status = 404, body = ErrorResponse)))]
async fn set_maintenance(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(host): Path<String>,
    Body(req): Body<MaintenanceRequest>,
) -> Res<Json<HostView>> {
    m.set_maintenance(&ctx, &host, req.enabled).await.map(Json)
}

#[utoipa::path(get, path = "/v1/guests", tag = "guests",
    responses((status = 200, body = [GuestView]), (status = 401, body = ErrorResponse)))]
async fn list_guests(State(m): State<Arc<Manager>>) -> Res<Json<Vec<GuestView>>> {
    m.list_guests().await.map(Json)
}

#[utoipa::path(post, path = "/v1/guests", tag = "guests", request_body = CreateGuestRequest,
    responses((status = 202, description = "Creation started", body = OperationAccepted),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 409, description = "Name taken or no room", body = ErrorResponse)))]
async fn create_guest(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Body(req): Body<CreateGuestRequest>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.create_guest(&ctx, req).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(get, path = "/v1/guests/{guest}", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    responses((status = 200, body = GuestView), (status = 404, body = ErrorResponse)))]
async fn get_guest(State(m): State<Arc<Manager>>, Path(guest): Path<String>) -> Res<Json<GuestView>> {
    m.get_guest(&guest).await.map(Json)
}

#[utoipa::path(post, path = "/v1/guests/{guest}/start", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    responses((status = 202, body = OperationAccepted), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse)))]
async fn start_guest(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.guest_action(&ctx, &guest, GuestAction::Start).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(post, path = "/v1/guests/{guest}/stop", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    request_body = StopGuestRequest,
    responses((status = 202, body = OperationAccepted), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse)))]
async fn stop_guest(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<StopGuestRequest>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.guest_action(&ctx, &guest, GuestAction::Stop { force: req.force }).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct DeleteGuestQuery {
    /// Delete a guest others depend on (its thin clones, clones being
    /// copied from it) together with them, each by its own delete operation.
    force: Option<bool>,
}

#[utoipa::path(delete, path = "/v1/guests/{guest}", tag = "guests", params(("guest" = String, Path, description = "Guest name or id"), DeleteGuestQuery),
    responses((status = 202, body = OperationAccepted), (status = 404, body = ErrorResponse),
        (status = 409, description = "Other guests depend on it (without force)", body = ErrorResponse)))]
async fn delete_guest(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Query(q): Query<DeleteGuestQuery>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.delete_guest(&ctx, &guest, q.force.unwrap_or(false)).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(post, path = "/v1/guests/{guest}/clone", tag = "guests", params(("guest" = String, Path, description = "Guest name or id of the source")),
    request_body = CloneGuestRequest,
    description = "Clone a running or stopped guest or a template: copies of its disks (from one instant, or at a snapshot: restore as a copy), or thin overlays on a template's, on the source's pool; each clone gets a fresh identity (name, MACs, addresses) and is created by its own create operation. Clones go on the source's host, or, for a source on the shared pool that does not run (a template or a stopped guest), on `host` or a host per clone chosen as for a create.",
    responses((status = 202, description = "One create operation per clone", body = [OperationAccepted]), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 409, description = "Name taken, source not clonable now, not clonable on the host asked for (local disks, or it runs), or no room", body = ErrorResponse)))]
async fn clone_guest(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<CloneGuestRequest>,
) -> Res<(StatusCode, Json<Vec<OperationAccepted>>)> {
    m.clone_guest(&ctx, &guest, req).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(post, path = "/v1/guests/{guest}/template", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    request_body = SetTemplateRequest,
    description = "Mark a stopped guest as a template (read-only, never started; clones of it are thin overlays), or a template without clones as a plain guest.",
    responses((status = 200, body = GuestView), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse)))]
async fn set_template(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<SetTemplateRequest>,
) -> Res<Json<GuestView>> {
    m.set_template(&ctx, &guest, req.template).await.map(Json)
}

#[utoipa::path(get, path = "/v1/vlans", tag = "vlans", responses((status = 200, body = [VlanView])))]
async fn list_vlans(State(m): State<Arc<Manager>>) -> Res<Json<Vec<VlanView>>> {
    m.list_vlans().await.map(Json)
}

#[utoipa::path(post, path = "/v1/vlans", tag = "vlans", request_body = CreateVlanRequest,
    responses((status = 201, body = VlanView), (status = 400, body = ErrorResponse), (status = 409, body = ErrorResponse)))]
async fn create_vlan(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Body(req): Body<CreateVlanRequest>,
) -> Res<(StatusCode, Json<VlanView>)> {
    m.create_vlan(&ctx, req).await.map(|v| (StatusCode::CREATED, Json(v)))
}

#[utoipa::path(delete, path = "/v1/vlans/{vlan}", tag = "vlans", params(("vlan" = String, Path, description = "VLAN name or id")),
    responses((status = 204), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse)))]
async fn delete_vlan(State(m): State<Arc<Manager>>, ctx: Ctx, Path(vlan): Path<String>) -> Res<StatusCode> {
    m.delete_vlan(&ctx, &vlan).await.map(|()| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/images", tag = "images", responses((status = 200, body = [Image])))]
async fn list_images(State(m): State<Arc<Manager>>) -> Res<Json<Vec<Image>>> {
    m.list_images().await.map(Json)
}

#[utoipa::path(post, path = "/v1/images", tag = "images", request_body = ImportImageRequest,
    responses((status = 201, body = Image), (status = 400, description = "Not a usable qcow2 file", body = ErrorResponse), (status = 409, body = ErrorResponse)))]
async fn import_image(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Body(req): Body<ImportImageRequest>,
) -> Res<(StatusCode, Json<Image>)> {
    m.import_image(&ctx, req).await.map(|i| (StatusCode::CREATED, Json(i)))
}

#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", params(("image" = String, Path, description = "Image name")),
    responses((status = 204), (status = 404, body = ErrorResponse), (status = 409, description = "Guests are built on it", body = ErrorResponse)))]
async fn delete_image(State(m): State<Arc<Manager>>, ctx: Ctx, Path(image): Path<String>) -> Res<StatusCode> {
    m.delete_image(&ctx, &image).await.map(|()| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/operations", tag = "operations", responses((status = 200, body = [Operation])))]
async fn list_operations(State(m): State<Arc<Manager>>) -> Res<Json<Vec<Operation>>> {
    m.list_operations().await.map(Json)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct WaitQuery {
    /// Wait up to this many seconds (max 300) for the operation to finish.
    wait: Option<u64>,
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations", params(("id" = String, Path, description = "Operation id"), WaitQuery),
    responses((status = 200, body = Operation), (status = 404, body = ErrorResponse)))]
async fn get_operation(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Res<Json<Operation>> {
    let id: OperationId = id.parse().map_err(|_| ApiError::invalid("id", format!("{id:?} is not an operation id")))?;
    match q.wait {
        Some(s) => m.wait_operation(id, Duration::from_secs(s.min(300))).await.map(Json),
        None => m.get_operation(id).await.map(Json),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct AuditQuery {
    /// Only records with a sequence number above this.
    after: Option<u64>,
    /// At most this many records (default 1000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery), responses((status = 200, body = [AuditRecord])))]
async fn list_audit(State(m): State<Arc<Manager>>, Query(q): Query<AuditQuery>) -> Res<Json<Vec<AuditRecord>>> {
    m.audit_records(q.after.unwrap_or(0), q.limit.unwrap_or(1000)).await.map(Json)
}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    description = "Recompute the audit log's hash chain from the store.",
    responses((status = 200, body = AuditVerification)))]
async fn verify_audit(State(m): State<Arc<Manager>>) -> Res<Json<AuditVerification>> {
    m.verify_audit().await.map(Json)
}

#[utoipa::path(post, path = "/v1/agent/register", tag = "agent", request_body = RegisterRequest,
    responses((status = 200, body = RegisterResponse), (status = 400, body = ErrorResponse)))]
async fn register(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Body(req): Body<RegisterRequest>,
) -> Res<Json<RegisterResponse>> {
    m.register(&ctx, req).await.map(Json)
}

#[utoipa::path(post, path = "/v1/agent/heartbeat", tag = "agent", request_body = HeartbeatRequest,
    responses((status = 200, body = HeartbeatResponse), (status = 404, description = "Unknown host: register again", body = ErrorResponse)))]
async fn heartbeat(State(m): State<Arc<Manager>>, Body(req): Body<HeartbeatRequest>) -> Res<Json<HeartbeatResponse>> {
    m.heartbeat(req).await.map(Json)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct LogQuery {
    /// At most this many bytes from the end of the history (default 64 KiB).
    bytes: Option<u64>,
}

#[utoipa::path(get, path = "/v1/guests/{guest}/log", tag = "guests", params(("guest" = String, Path, description = "Guest name or id"), LogQuery),
    responses((status = 200, body = ConsoleLog), (status = 404, body = ErrorResponse), (status = 504, description = "The host did not answer", body = ErrorResponse)))]
async fn console_log(
    State(m): State<Arc<Manager>>,
    Path(guest): Path<String>,
    Query(q): Query<LogQuery>,
) -> Res<Json<ConsoleLog>> {
    let max_bytes = q.bytes.unwrap_or(64 * 1024).min(16 * 1024 * 1024);
    match m.relay(&guest, AgentCallKind::ConsoleLog { max_bytes }).await? {
        (id, CallOutcome::ConsoleLog { text }) => Ok(Json(ConsoleLog { guest: id, text })),
        (_, other) => Err(unexpected(other)),
    }
}

/// An agent's answer of the wrong kind, or its error, as an API error.
fn unexpected(outcome: CallOutcome) -> ApiError {
    match outcome {
        CallOutcome::Error { message } => ApiError::conflict(message),
        other => ApiError::unavailable(format!("the host answered with {other:?}")),
    }
}

#[utoipa::path(post, path = "/v1/guests/{guest}/exec", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    request_body = ExecRequest,
    responses((status = 200, body = ExecResponse), (status = 400, body = ErrorResponse), (status = 409, description = "No guest agent, or not running", body = ErrorResponse), (status = 504, body = ErrorResponse)))]
async fn exec(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<ExecRequest>,
) -> Res<Json<ExecResponse>> {
    if req.command.first().is_none_or(String::is_empty) {
        return Err(ApiError::invalid("command", "the command must name a program"));
    }
    let timeout_secs = req.timeout_secs.unwrap_or(60);
    if !(1..=600).contains(&timeout_secs) {
        return Err(ApiError::invalid("timeout_secs", format!("timeout must be 1..=600 seconds, got {timeout_secs}")));
    }
    let kind = AgentCallKind::Exec { command: req.command.clone(), input: req.input, timeout_secs };
    let result = match m.relay(&guest, kind).await? {
        (_, CallOutcome::Exec(r)) => r,
        (_, other) => return Err(unexpected(other)),
    };
    m.audit_event(
        &ctx,
        Some(format!("guest/{guest}")),
        &format!("ran {:?}: exit {}", req.command, result.exit_code),
        200,
    )
    .await;
    Ok(Json(result))
}

#[utoipa::path(post, path = "/v1/guests/{guest}/reset", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    description = "Reset a running guest, like its reset button: it reboots at once in the same process, losing what it had not written to disk.",
    responses((status = 200, description = "Reset; the guest as it is now", body = GuestView), (status = 404, body = ErrorResponse),
        (status = 409, description = "Not running, or an operation is in progress", body = ErrorResponse), (status = 504, body = ErrorResponse)))]
async fn reset_guest(State(m): State<Arc<Manager>>, ctx: Ctx, Path(guest): Path<String>) -> Res<Json<GuestView>> {
    m.reset_guest(&ctx, &guest).await.map(Json)
}

#[utoipa::path(post, path = "/v1/guests/{guest}/hotplug", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    request_body = HotplugRequest,
    responses((status = 200, description = "Added; the guest as it is now", body = GuestView), (status = 400, body = ErrorResponse),
        (status = 409, description = "Not running, no room, or the host refused (with the reason)", body = ErrorResponse), (status = 504, body = ErrorResponse)))]
async fn hotplug(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<HotplugRequest>,
) -> Res<Json<GuestView>> {
    m.hotplug(&ctx, &guest, req).await.map(Json)
}

#[utoipa::path(post, path = "/v1/guests/{guest}/limits", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    description = "Change the guest's resource limits (a merge patch of `limits`: a field left out keeps its value, `null` removes the limit). \
        A running guest gets them at once, without a restart; a stopped or crashed one at its next start. Stored only once its host applied them; \
        if the host cannot apply one, the others are put back and nothing changes.",
    request_body = SetLimitsRequest,
    responses((status = 200, description = "Changed; the guest as it is now", body = GuestView), (status = 400, body = ErrorResponse),
        (status = 409, description = "Busy, in a state without a host definition, no room on the uplink, or the host refused (with the reason)", body = ErrorResponse),
        (status = 504, body = ErrorResponse)))]
async fn set_limits(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<SetLimitsRequest>,
) -> Res<Json<GuestView>> {
    m.set_limits(&ctx, &guest, req).await.map(Json)
}

#[utoipa::path(get, path = "/v1/guests/{guest}/interfaces", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    responses((status = 200, body = [GuestInterface]), (status = 409, body = ErrorResponse), (status = 504, body = ErrorResponse)))]
async fn interfaces(State(m): State<Arc<Manager>>, Path(guest): Path<String>) -> Res<Json<Vec<GuestInterface>>> {
    match m.relay(&guest, AgentCallKind::Interfaces).await? {
        (_, CallOutcome::Interfaces { interfaces }) => Ok(Json(interfaces)),
        (_, other) => Err(unexpected(other)),
    }
}

#[utoipa::path(get, path = "/v1/guests/{guest}/snapshots", tag = "snapshots", params(("guest" = String, Path, description = "Guest name or id")),
    responses((status = 200, body = SnapshotList), (status = 404, body = ErrorResponse)))]
async fn list_snapshots(State(m): State<Arc<Manager>>, Path(guest): Path<String>) -> Res<Json<SnapshotList>> {
    m.list_snapshots(&guest).await.map(Json)
}

#[utoipa::path(post, path = "/v1/guests/{guest}/snapshots", tag = "snapshots", params(("guest" = String, Path, description = "Guest name or id")),
    request_body = CreateSnapshotRequest,
    description = "Take a snapshot of all the guest's disks (crash-consistent, the guest is not paused) or, with `memory`, of its disks and memory (the guest must run).",
    responses((status = 202, description = "Snapshot started", body = OperationAccepted), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 409, description = "Name taken, guest not in a state for it, or another operation in progress", body = ErrorResponse)))]
async fn create_snapshot(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<CreateSnapshotRequest>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.create_snapshot(&ctx, &guest, req).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(post, path = "/v1/hosts/{host}/drain", tag = "hosts", params(("host" = String, Path, description = "Host name or id")),
    request_body = DrainRequest,
    description = "Put the host into maintenance and live-migrate all its guests away, `parallel` at a time, each to the host placement picks (so they spread by free capacity). Guests that cannot move are named with the reason and fail the drain. Returns the drain operation (the one under way if there is one).",
    responses((status = 202, description = "Drain started", body = Operation), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse)))]
async fn drain_host(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(host): Path<String>,
    Body(req): Body<DrainRequest>,
) -> Res<(StatusCode, Json<Operation>)> {
    m.drain_host(&ctx, &host, req.parallel).await.map(|op| (StatusCode::ACCEPTED, Json(op)))
}

#[utoipa::path(get, path = "/v1/hosts/{host}/failover-plan", tag = "hosts", params(("host" = String, Path, description = "Host name or id")),
    description = "What would happen if the host failed now: where each of its guests on shared storage would restart (highest priority first, spread over the survivors, in waves), and which guests would not restart, with the reason.",
    responses((status = 200, body = FailoverPlanView), (status = 404, body = ErrorResponse)))]
async fn failover_plan(State(m): State<Arc<Manager>>, Path(host): Path<String>) -> Res<Json<FailoverPlanView>> {
    m.failover_plan(&host).map(Json)
}

#[utoipa::path(get, path = "/v1/settings/ha", tag = "settings",
    description = "The high-availability settings and whether the reserve holds: could every guest that restarts after a failure restart after `tolerate_failures` hosts fail?",
    responses((status = 200, body = HaStatus)))]
async fn get_ha(State(m): State<Arc<Manager>>) -> Res<Json<HaStatus>> {
    Ok(Json(m.ha_status()))
}

#[utoipa::path(put, path = "/v1/settings/ha", tag = "settings", request_body = HaSettings,
    description = "Set how many host failures the cluster keeps room for, and whether a create or start that eats into that reserve is refused or only warned about.",
    responses((status = 200, body = HaStatus), (status = 400, body = ErrorResponse)))]
async fn set_ha(State(m): State<Arc<Manager>>, ctx: Ctx, Body(req): Body<HaSettings>) -> Res<Json<HaStatus>> {
    m.set_ha(&ctx, req).await.map(Json)
}

#[utoipa::path(post, path = "/v1/guests/{guest}/migrate", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    request_body = MigrateRequest,
    description = "Live-migrate a running guest to another host (`to`, or one placement picks): its disks are mirrored and its memory copied over the migration network, encrypted, then it pauses for the final round and resumes on the target. The operation shows the progress; the guest's `last_migration` the measured pause.",
    responses((status = 202, description = "Migration started", body = OperationAccepted), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 409, description = "Guest not running, busy, or no host can take it", body = ErrorResponse)))]
async fn migrate_guest(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<MigrateRequest>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.migrate_guest(&ctx, &guest, req).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(post, path = "/v1/guests/{guest}/storage", tag = "storage", params(("guest" = String, Path, description = "Guest name or id")),
    request_body = MoveStorageRequest,
    description = "Move every disk of the guest to another pool: `local` (its host's own) or `shared` (the pool every host sees). \
        A running guest keeps running on the same process: its disks are mirrored under it and switched over once in sync. A stopped one is copied. \
        The copies stand alone (a disk that was an overlay on a base image no longer depends on it). The spec's `storage` changes once the host \
        has switched; a move that fails leaves the guest on its old files with nothing of the new ones left. The operation's step and the guest's \
        `last_storage_move` say how much was copied in how long.",
    responses((status = 202, description = "Move started", body = OperationAccepted), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 409, description = "Already on that pool, no shared pool on its host, migrating or busy, a template, with snapshots, or in a state without disks to move", body = ErrorResponse)))]
async fn move_storage(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    Body(req): Body<MoveStorageRequest>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.move_storage(&ctx, &guest, req).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(post, path = "/v1/operations/{id}/cancel", tag = "operations", params(("id" = String, Path, description = "Operation id")),
    description = "Cancel an operation in flight. Only migrations can be cancelled, and only before their commit: the guest then keeps running on its source.",
    responses((status = 202, description = "Cancel requested; wait for the operation to end", body = Operation), (status = 404, body = ErrorResponse),
        (status = 409, description = "Not cancellable (kind, finished, past its commit)", body = ErrorResponse)))]
async fn cancel_operation(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Res<(StatusCode, Json<Operation>)> {
    let id: OperationId = id.parse().map_err(|_| ApiError::invalid("id", format!("{id:?} is not an operation id")))?;
    m.cancel_migration(id).await?;
    m.audit_event(&ctx, Some(format!("operation/{id}")), "cancel requested", 202).await;
    Ok((StatusCode::ACCEPTED, Json(m.get_operation(id).await?)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct DeleteSnapshotQuery {
    /// Delete a snapshot that has children; they are re-parented to its parent.
    force: Option<bool>,
}

#[utoipa::path(delete, path = "/v1/guests/{guest}/snapshots/{snapshot}", tag = "snapshots",
    params(("guest" = String, Path, description = "Guest name or id"), ("snapshot" = String, Path, description = "Snapshot name"), DeleteSnapshotQuery),
    responses((status = 202, body = OperationAccepted), (status = 404, body = ErrorResponse), (status = 409, description = "It has children (without force), or another operation is in progress", body = ErrorResponse)))]
async fn delete_snapshot(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path((guest, snapshot)): Path<(String, String)>,
    Query(q): Query<DeleteSnapshotQuery>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.delete_snapshot(&ctx, &guest, &snapshot, q.force.unwrap_or(false)).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

#[utoipa::path(post, path = "/v1/guests/{guest}/snapshots/{snapshot}/restore", tag = "snapshots",
    params(("guest" = String, Path, description = "Guest name or id"), ("snapshot" = String, Path, description = "Snapshot name")),
    description = "Roll the guest back to the snapshot: a memory snapshot resumes a running guest live; a disk snapshot of a running guest stops it, rolls the disks back and starts it; a stopped guest gets the disks back and stays stopped.",
    responses((status = 202, body = OperationAccepted), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse)))]
async fn restore_snapshot(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path((guest, snapshot)): Path<(String, String)>,
) -> Res<(StatusCode, Json<OperationAccepted>)> {
    m.restore_snapshot(&ctx, &guest, &snapshot).await.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

/// The protocol name of console upgrades.
pub const CONSOLE_PROTOCOL: &str = "drove-console";

fn wants_upgrade(req: &Request) -> bool {
    req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()) == Some(CONSOLE_PROTOCOL)
}

fn switching_protocols() -> Response {
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(CONSOLE_PROTOCOL));
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp
}

/// Splice two upgraded connections until either side closes.
async fn splice(a: hyper::upgrade::OnUpgrade, b: hyper::upgrade::OnUpgrade) {
    let (Ok(a), Ok(b)) = (a.await, b.await) else {
        tracing::warn!("a console connection failed to upgrade");
        return;
    };
    let (mut a, mut b) = (hyper_util::rt::TokioIo::new(a), hyper_util::rt::TokioIo::new(b));
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

#[utoipa::path(get, path = "/v1/guests/{guest}/console", tag = "guests", params(("guest" = String, Path, description = "Guest name or id")),
    description = "Interactive serial console: send `Connection: upgrade` and `Upgrade: drove-console`; after 101 the connection carries the console's bytes both ways.",
    responses((status = 101, description = "Connected to the console"), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse), (status = 504, body = ErrorResponse)))]
async fn console(
    State(m): State<Arc<Manager>>,
    ctx: Ctx,
    Path(guest): Path<String>,
    mut req: Request,
) -> Res<Response> {
    if !wants_upgrade(&req) {
        return Err(ApiError::invalid(
            "upgrade",
            format!("the console needs `Connection: upgrade` and `Upgrade: {CONSOLE_PROTOCOL}`"),
        ));
    }
    let client = hyper::upgrade::on(&mut req);
    let (session, rendezvous) = m.open_console(&guest)?;
    let agent = match tokio::time::timeout(crate::core::CALL_TIMEOUT, rendezvous).await {
        Ok(Ok(Ok(conn))) => conn,
        Ok(Ok(Err(message))) => return Err(ApiError::conflict(message)),
        _ => {
            m.close_console(&session);
            return Err(ApiError {
                status: 504,
                code: "host_timeout",
                message: format!("the host of guest {guest} did not open its console"),
                field: None,
            });
        }
    };
    m.audit_event(&ctx, Some(format!("guest/{guest}")), "console opened", 101).await;
    tokio::spawn(splice(client, agent));
    Ok(switching_protocols())
}

#[utoipa::path(post, path = "/v1/agent/results", tag = "agent", request_body = CallResult, responses((status = 204)))]
async fn call_result(State(m): State<Arc<Manager>>, Body(result): Body<CallResult>) -> StatusCode {
    m.complete_call(result);
    StatusCode::NO_CONTENT
}

#[utoipa::path(post, path = "/v1/agent/console/{session}", tag = "agent", params(("session" = String, Path, description = "Console session id")),
    responses((status = 101, description = "Connected"), (status = 404, body = ErrorResponse)))]
async fn agent_console(State(m): State<Arc<Manager>>, Path(session): Path<String>, mut req: Request) -> Res<Response> {
    if !wants_upgrade(&req) {
        return Err(ApiError::invalid("upgrade", format!("needs `Upgrade: {CONSOLE_PROTOCOL}`")));
    }
    m.join_console(&session, hyper::upgrade::on(&mut req))?;
    Ok(switching_protocols())
}

/// Prometheus text exposition.
async fn metrics(State(m): State<Arc<Manager>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let counts = m.counts();
    let (hosts, guests, ops) = (counts.hosts, counts.guests, counts.active_operations);
    let stats = &m.persister().stats;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP drove_hosts Hosts by state.\n# TYPE drove_hosts gauge");
    for (s, n) in hosts {
        let _ = writeln!(out, "drove_hosts{{state=\"{s}\"}} {n}");
    }
    let dpm = m.dpm_status();
    if !dpm.at.is_empty() {
        let _ = writeln!(
            out,
            "# HELP drove_power_watts Estimated wall power of the hosts (power management's last round).\n# TYPE drove_power_watts gauge\ndrove_power_watts {:.1}",
            dpm.watts_now
        );
        let _ = writeln!(
            out,
            "# HELP drove_power_saved_watts What hosts in standby save against being on and idle.\n# TYPE drove_power_saved_watts gauge\ndrove_power_saved_watts {:.1}",
            dpm.watts_saved
        );
    }
    let _ = writeln!(out, "# HELP drove_guests Guests by state.\n# TYPE drove_guests gauge");
    for (s, n) in guests {
        let _ = writeln!(out, "drove_guests{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP drove_operations_active Operations in progress.\n# TYPE drove_operations_active gauge\ndrove_operations_active {ops}"
    );
    let _ = writeln!(
        out,
        "# HELP drove_http_requests_total HTTP requests served.\n# TYPE drove_http_requests_total counter\ndrove_http_requests_total {}",
        m.http_requests.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP drove_store_commits_total Store transactions committed.\n# TYPE drove_store_commits_total counter\ndrove_store_commits_total {}",
        stats.commits.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP drove_store_ops_total Store writes committed.\n# TYPE drove_store_ops_total counter\ndrove_store_ops_total {}",
        stats.ops.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP drove_store_commit_seconds_total Time spent committing.\n# TYPE drove_store_commit_seconds_total counter\ndrove_store_commit_seconds_total {}",
        stats.commit_micros.load(Relaxed) as f64 / 1e6
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[derive(Debug)]
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "drove", description = "drove manager API: hosts, guests, snapshots, VLANs, operations, audit, and the agent protocol."),
    paths(openapi, list_hosts, list_pools, drs_status, dpm_status, standby_host, wake_host, get_host, set_maintenance, drain_host, failover_plan, get_ha, set_ha, list_guests, create_guest, get_guest, start_guest, stop_guest, reset_guest, delete_guest, clone_guest, set_template, console_log, exec, hotplug, set_limits, interfaces, console, list_snapshots, create_snapshot, delete_snapshot, restore_snapshot, migrate_guest, move_storage, cancel_operation, call_result, agent_console,
        list_vlans, create_vlan, delete_vlan, list_images, import_image, delete_image, list_operations, get_operation, list_audit, verify_audit, register, heartbeat),
    modifiers(&BearerAuth),
    tags((name = "hosts"), (name = "guests"), (name = "vlans"), (name = "images"), (name = "snapshots"), (name = "storage"), (name = "operations"), (name = "audit"), (name = "settings"), (name = "agent"), (name = "meta"))
)]
pub struct ApiDoc;
