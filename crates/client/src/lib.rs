//! A typed client for the manager's `/v1` API, used by the CLI, the agents
//! and the tests. Callers never build URLs themselves.

use std::time::Duration;

use drove_api::{
    AuditRecord, CreateGuestRequest, CreateVlanRequest, ErrorResponse, GuestView, HeartbeatRequest, HeartbeatResponse,
    HostView, OperationAccepted, RegisterRequest, RegisterResponse, StopGuestRequest, VlanView,
};
use drove_model::{Operation, OperationId};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The manager refused the request; `message` says why.
    #[error("{message}")]
    Api { status: u16, code: String, message: String, field: Option<String> },
    #[error("cannot reach the manager at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from the manager ({status}) to {what}")]
    Decode {
        what: String,
        status: u16,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    token: String,
}

impl Client {
    /// `endpoint` like `http://127.0.0.1:7300`.
    pub fn new(endpoint: &str, token: &str) -> Client {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            .build()
            .unwrap_or_default();
        Client { http, endpoint: endpoint.trim_end_matches('/').to_owned(), token: token.trim().to_owned() }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let resp = self.send(method.clone(), path, body, timeout).await?;
        let status = resp.status().as_u16();
        resp.json::<T>().await.map_err(|source| ClientError::Decode {
            what: format!("{method} {path}"),
            status,
            source,
        })
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{}", self.endpoint, path))
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp =
            req.send().await.map_err(|source| ClientError::Connect { endpoint: self.endpoint.clone(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Err(api_error(method, path, status, &text))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None, DEFAULT_TIMEOUT).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body), DEFAULT_TIMEOUT).await
    }

    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/openapi.json").await
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostView>, ClientError> {
        self.get("/v1/hosts").await
    }

    pub async fn list_pools(&self) -> Result<Vec<drove_api::PoolView>, ClientError> {
        self.get("/v1/pools").await
    }

    /// The rebalancer's (DRS) last round.
    pub async fn drs_status(&self) -> Result<drove_api::DrsRound, ClientError> {
        self.get("/v1/drs").await
    }

    pub async fn get_host(&self, host: &str) -> Result<HostView, ClientError> {
        self.get(&format!("/v1/hosts/{}", seg(host))).await
    }

    pub async fn dpm_status(&self) -> Result<drove_api::DpmRound, ClientError> {
        self.get("/v1/dpm").await
    }

    pub async fn standby_host(&self, host: &str) -> Result<HostView, ClientError> {
        self.post(&format!("/v1/hosts/{}/standby", seg(host)), &serde_json::json!({})).await
    }

    pub async fn wake_host(&self, host: &str) -> Result<HostView, ClientError> {
        self.post(&format!("/v1/hosts/{}/wake", seg(host)), &serde_json::json!({})).await
    }

    pub async fn set_maintenance(&self, host: &str, enabled: bool) -> Result<HostView, ClientError> {
        self.post(&format!("/v1/hosts/{}/maintenance", seg(host)), &drove_api::MaintenanceRequest { enabled }).await
    }

    /// What would happen to `host`'s guests if it failed now.
    pub async fn failover_plan(&self, host: &str) -> Result<drove_api::FailoverPlanView, ClientError> {
        self.get(&format!("/v1/hosts/{}/failover-plan", seg(host))).await
    }

    pub async fn ha(&self) -> Result<drove_api::HaStatus, ClientError> {
        self.get("/v1/settings/ha").await
    }

    pub async fn set_ha(&self, settings: &drove_api::HaSettings) -> Result<drove_api::HaStatus, ClientError> {
        self.call(Method::PUT, "/v1/settings/ha", Some(settings), DEFAULT_TIMEOUT).await
    }

    /// Start draining `host` (or get the drain under way).
    pub async fn drain_host(&self, host: &str, parallel: Option<u32>) -> Result<Operation, ClientError> {
        self.post(&format!("/v1/hosts/{}/drain", seg(host)), &drove_api::DrainRequest { parallel }).await
    }

    pub async fn list_guests(&self) -> Result<Vec<GuestView>, ClientError> {
        self.get("/v1/guests").await
    }

    pub async fn get_guest(&self, guest: &str) -> Result<GuestView, ClientError> {
        self.get(&format!("/v1/guests/{}", seg(guest))).await
    }

    pub async fn create_guest(&self, req: &CreateGuestRequest) -> Result<OperationAccepted, ClientError> {
        self.post("/v1/guests", req).await
    }

    pub async fn start_guest(&self, guest: &str) -> Result<OperationAccepted, ClientError> {
        self.post(&format!("/v1/guests/{}/start", seg(guest)), &serde_json::json!({})).await
    }

    pub async fn stop_guest(&self, guest: &str, force: bool) -> Result<OperationAccepted, ClientError> {
        self.post(&format!("/v1/guests/{}/stop", seg(guest)), &StopGuestRequest { force }).await
    }

    pub async fn delete_guest(&self, guest: &str) -> Result<OperationAccepted, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/guests/{}", seg(guest)), None, DEFAULT_TIMEOUT).await
    }

    pub async fn list_vlans(&self) -> Result<Vec<VlanView>, ClientError> {
        self.get("/v1/vlans").await
    }

    pub async fn create_vlan(&self, req: &CreateVlanRequest) -> Result<VlanView, ClientError> {
        self.post("/v1/vlans", req).await
    }

    pub async fn delete_vlan(&self, vlan: &str) -> Result<(), ClientError> {
        self.send::<()>(Method::DELETE, &format!("/v1/vlans/{}", seg(vlan)), None, DEFAULT_TIMEOUT).await.map(|_| ())
    }

    pub async fn list_images(&self) -> Result<Vec<drove_model::image::Image>, ClientError> {
        self.get("/v1/images").await
    }

    /// Copy a qcow2 file (a path on the manager's machine) into the image pool.
    pub async fn import_image(
        &self,
        req: &drove_api::ImportImageRequest,
    ) -> Result<drove_model::image::Image, ClientError> {
        // Copying a large image takes its time.
        self.call(Method::POST, "/v1/images", Some(req), Duration::from_secs(3600)).await
    }

    pub async fn delete_image(&self, image: &str) -> Result<(), ClientError> {
        self.send::<()>(Method::DELETE, &format!("/v1/images/{}", seg(image)), None, DEFAULT_TIMEOUT).await.map(|_| ())
    }

    pub async fn list_operations(&self) -> Result<Vec<Operation>, ClientError> {
        self.get("/v1/operations").await
    }

    pub async fn get_operation(&self, id: OperationId) -> Result<Operation, ClientError> {
        self.get(&format!("/v1/operations/{id}")).await
    }

    /// Long-poll until the operation is final or `wait` passes.
    pub async fn wait_operation(&self, id: OperationId, wait: Duration) -> Result<Operation, ClientError> {
        let secs = wait.as_secs().clamp(1, 300);
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/operations/{id}?wait={secs}"),
            None,
            Duration::from_secs(secs + 30),
        )
        .await
    }

    pub async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, ClientError> {
        self.get(&format!("/v1/audit?after={after}&limit={limit}")).await
    }

    /// Recompute the audit log's hash chain on the manager.
    pub async fn verify_audit(&self) -> Result<drove_api::AuditVerification, ClientError> {
        self.get("/v1/audit/verify").await
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        let resp = self.send::<()>(Method::GET, "/metrics", None, DEFAULT_TIMEOUT).await?;
        let status = resp.status().as_u16();
        resp.text().await.map_err(|source| ClientError::Decode { what: "GET /metrics".into(), status, source })
    }

    /// The last `bytes` of a guest's console history.
    pub async fn console_log(&self, guest: &str, bytes: u64) -> Result<drove_api::ConsoleLog, ClientError> {
        self.get(&format!("/v1/guests/{}/log?bytes={bytes}", seg(guest))).await
    }

    /// Run a command inside a guest through its guest agent.
    pub async fn exec(
        &self,
        guest: &str,
        req: &drove_api::ExecRequest,
    ) -> Result<drove_api::ExecResponse, ClientError> {
        let wait = Duration::from_secs(req.timeout_secs.unwrap_or(60) + 60);
        self.call(Method::POST, &format!("/v1/guests/{}/exec", seg(guest)), Some(req), wait).await
    }

    /// Reset a running guest: it reboots at once.
    pub async fn reset_guest(&self, guest: &str) -> Result<GuestView, ClientError> {
        self.post(&format!("/v1/guests/{}/reset", seg(guest)), &serde_json::json!({})).await
    }

    /// Add hardware to a running guest.
    pub async fn hotplug(&self, guest: &str, req: &drove_api::HotplugRequest) -> Result<GuestView, ClientError> {
        self.post(&format!("/v1/guests/{}/hotplug", seg(guest)), req).await
    }

    /// Changes the guest's resource limits: only the fields `req` names.
    pub async fn set_limits(&self, guest: &str, req: &drove_api::SetLimitsRequest) -> Result<GuestView, ClientError> {
        self.post(&format!("/v1/guests/{}/limits", seg(guest)), req).await
    }

    pub async fn list_snapshots(&self, guest: &str) -> Result<drove_api::SnapshotList, ClientError> {
        self.get(&format!("/v1/guests/{}/snapshots", seg(guest))).await
    }

    /// Take a snapshot (disks only, or with `memory`).
    pub async fn migrate_guest(
        &self,
        guest: &str,
        req: &drove_api::MigrateRequest,
    ) -> Result<OperationAccepted, ClientError> {
        self.post(&format!("/v1/guests/{}/migrate", seg(guest)), req).await
    }

    /// Move all of a guest's disks to another pool (live while it runs).
    pub async fn move_storage(
        &self,
        guest: &str,
        req: &drove_api::MoveStorageRequest,
    ) -> Result<OperationAccepted, ClientError> {
        self.post(&format!("/v1/guests/{}/storage", seg(guest)), req).await
    }

    /// Cancel an operation in flight (a migration before its commit).
    pub async fn cancel_operation(&self, id: OperationId) -> Result<Operation, ClientError> {
        self.post(&format!("/v1/operations/{id}/cancel"), &serde_json::json!({})).await
    }

    pub async fn create_snapshot(
        &self,
        guest: &str,
        req: &drove_api::CreateSnapshotRequest,
    ) -> Result<OperationAccepted, ClientError> {
        self.post(&format!("/v1/guests/{}/snapshots", seg(guest)), req).await
    }

    pub async fn delete_snapshot(
        &self,
        guest: &str,
        snapshot: &str,
        force: bool,
    ) -> Result<OperationAccepted, ClientError> {
        let path = format!("/v1/guests/{}/snapshots/{}?force={force}", seg(guest), seg(snapshot));
        self.call::<(), _>(Method::DELETE, &path, None, DEFAULT_TIMEOUT).await
    }

    /// Clone `guest` (see [`drove_api::CloneGuestRequest`]): one accepted
    /// create operation per clone.
    pub async fn clone_guest(
        &self,
        guest: &str,
        req: &drove_api::CloneGuestRequest,
    ) -> Result<Vec<OperationAccepted>, ClientError> {
        self.post(&format!("/v1/guests/{}/clone", seg(guest)), req).await
    }

    /// Mark a stopped guest as a template (`on`), or make it a plain guest.
    pub async fn set_template(&self, guest: &str, on: bool) -> Result<GuestView, ClientError> {
        self.post(&format!("/v1/guests/{}/template", seg(guest)), &drove_api::SetTemplateRequest { template: on }).await
    }

    /// Delete a guest that others depend on (see
    /// [`drove_api::GuestView::dependents`]) together with them.
    pub async fn delete_guest_forced(&self, guest: &str) -> Result<OperationAccepted, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/guests/{}?force=true", seg(guest)), None, DEFAULT_TIMEOUT)
            .await
    }

    pub async fn restore_snapshot(&self, guest: &str, snapshot: &str) -> Result<OperationAccepted, ClientError> {
        self.post(&format!("/v1/guests/{}/snapshots/{}/restore", seg(guest), seg(snapshot)), &serde_json::json!({}))
            .await
    }

    /// The guest's network interfaces and addresses, as its agent sees them.
    pub async fn guest_interfaces(&self, guest: &str) -> Result<Vec<drove_api::GuestInterface>, ClientError> {
        self.get(&format!("/v1/guests/{}/interfaces", seg(guest))).await
    }

    /// Attach to a guest's serial console: a byte stream both ways.
    pub async fn console(&self, guest: &str) -> Result<reqwest::Upgraded, ClientError> {
        self.upgrade(Method::GET, &format!("/v1/guests/{}/console", seg(guest))).await
    }

    /// The agent's side of a console session.
    pub async fn agent_console(&self, session: &str) -> Result<reqwest::Upgraded, ClientError> {
        self.upgrade(Method::POST, &format!("/v1/agent/console/{}", seg(session))).await
    }

    pub async fn post_result(&self, result: &drove_api::CallResult) -> Result<(), ClientError> {
        self.send(Method::POST, "/v1/agent/results", Some(result), DEFAULT_TIMEOUT).await.map(|_| ())
    }

    async fn upgrade(&self, method: Method, path: &str) -> Result<reqwest::Upgraded, ClientError> {
        let resp = self
            .http
            .request(method.clone(), format!("{}{}", self.endpoint, path))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, CONSOLE_PROTOCOL)
            .send()
            .await
            .map_err(|source| ClientError::Connect { endpoint: self.endpoint.clone(), source })?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            return Err(api_error(method, path, status, &resp.text().await.unwrap_or_default()));
        }
        resp.upgrade().await.map_err(|source| ClientError::Decode {
            what: format!("{method} {path}"),
            status: status.as_u16(),
            source,
        })
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.post("/v1/agent/register", req).await
    }

    pub async fn heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, ClientError> {
        self.post("/v1/agent/heartbeat", req).await
    }

    /// Whether an error means "the manager does not know this host".
    pub fn is_unknown_host(err: &ClientError) -> bool {
        err.status() == Some(StatusCode::NOT_FOUND.as_u16())
    }
}

/// The `Upgrade` protocol of console connections.
pub const CONSOLE_PROTOCOL: &str = "drove-console";

fn api_error(method: Method, path: &str, status: StatusCode, text: &str) -> ClientError {
    match serde_json::from_str::<ErrorResponse>(text) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.error.code,
            message: e.error.message,
            field: e.error.field,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: "http".into(),
            message: format!("{method} {path}: {status} {}", text.lines().next().unwrap_or("")),
            field: None,
        },
    }
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Percent-encode a path segment (names are restricted, but ids and user
/// typos may not be).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
