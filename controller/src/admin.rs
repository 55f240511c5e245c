//! The operator's admin API over HTTP, and the admin credential that guards it.
//!
//! At first start the controller writes a random credential to `<data>/admin.secret` (mode 0600)
//! and keeps only its SHA-256 in the store: whoever can read the data directory (the
//! controller's own machine) can run operator commands such as `controller agent-token create`.
//! The file is authoritative: to rotate the credential, delete it and restart the controller.
//!
//! Routes (all with `Authorization: Bearer <admin secret>`):
//! * `POST /admin/agent-tokens`, optional body `{"ttlSeconds": N}` → `{"token": "kt1....",
//!   "expiresAt": <unix seconds>}`.
//! * `POST /admin/accounts` `{"login", "password", "inns": [...]}` → the account with its
//!   callback secret (shown once here; it signs the account's callbacks).
//! * `GET /admin/accounts`, `/admin/agents`, `/admin/kkts`, `/admin/queue`,
//!   `/admin/jobs/in-doubt?olderThanSeconds=N`, `/admin/anomalies`: the fleet as operators see it.
//! * `POST /admin/kkts/{zn}/register` with the registration card (the register link's
//!   `RegistrationParams` JSON: RNM from the tax service, user INN, taxation systems, OFD, ...) →
//!   the registration report's fiscal result. The register must be online and not yet fiscal.

use crate::dispatcher::Dispatcher;
use crate::store::{Account, AccountRefusal, PasswordHash, Store, StoreError, PASSWORD_ROUNDS};
use crate::tunnel::Tunnel;
use crate::tunnel::{create_enroll_token, DEFAULT_TOKEN_TTL};
use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tracing::{error, info};

pub const ADMIN_SECRET_FILE: &str = "admin.secret";
/// Longest token lifetime an operator may ask for.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Admin requests are tiny; refuse anything larger before reading it.
const MAX_BODY: usize = 4 * 1024;

#[derive(Debug, Error)]
pub enum AdminSetupError {
    #[error(
        "cannot read or write {path}: {source}; check the --data directory and its permissions"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is empty; delete it and restart the controller to make a new admin credential")]
    Empty(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Makes sure `<data>/admin.secret` exists and the store holds its hash; returns the hash.
pub async fn ensure_admin_secret(data: &Path, store: &Store) -> Result<[u8; 32], AdminSetupError> {
    let path = data.join(ADMIN_SECRET_FILE);
    let io = |source| AdminSetupError::Io {
        path: path.clone(),
        source,
    };
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim().to_owned();
            if s.is_empty() {
                return Err(AdminSetupError::Empty(path));
            }
            s
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            rand::fill(&mut raw);
            let s = format!("adm1.{}", protocol::tunnel::hex(&raw));
            crate::ca::write_private(&path, format!("{s}\n").as_bytes(), 0o600).map_err(io)?;
            info!(path = %path.display(), "created the admin credential");
            s
        }
        Err(e) => return Err(io(e)),
    };
    let hash = sha256(secret.as_bytes());
    if store.admin_hash()? != Some(hash) {
        store.set_admin_hash(hash).await?;
    }
    Ok(hash)
}

/// What the admin handlers need.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<AdminInner>,
}

struct AdminInner {
    store: Store,
    ca_fingerprint: [u8; 32],
    admin_hash: [u8; 32],
    data_dir: PathBuf,
    fleet: Option<(Tunnel, Dispatcher)>,
}

impl AdminState {
    pub fn new(
        store: Store,
        ca_fingerprint: [u8; 32],
        admin_hash: [u8; 32],
        data_dir: PathBuf,
    ) -> Self {
        AdminState {
            inner: Arc::new(AdminInner {
                store,
                ca_fingerprint,
                admin_hash,
                data_dir,
                fleet: None,
            }),
        }
    }

    /// The same state with the fleet views (agents, registers, queue) enabled.
    pub fn with_fleet(self, tunnel: Tunnel, dispatcher: Dispatcher) -> Self {
        let inner = &self.inner;
        AdminState {
            inner: Arc::new(AdminInner {
                store: inner.store.clone(),
                ca_fingerprint: inner.ca_fingerprint,
                admin_hash: inner.admin_hash,
                data_dir: inner.data_dir.clone(),
                fleet: Some((tunnel, dispatcher)),
            }),
        }
    }
}

/// One error type for every admin answer: a status and a message saying what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        error!(error = %e, "admin request failed in the store");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the controller's store failed ({e}); retry, and check the controller's log"),
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    ttl_seconds: Option<u64>,
}

/// The answer to `POST /admin/agent-tokens`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// The admin router.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/admin/agent-tokens", post(create_token))
        .route("/admin/accounts", post(create_account).get(list_accounts))
        .route("/admin/agents", get(list_agents))
        .route("/admin/kkts", get(list_kkts))
        .route("/admin/queue", get(queue))
        .route("/admin/jobs/in-doubt", get(in_doubt))
        .route("/admin/anomalies", get(anomalies))
        .route("/admin/kkts/{zn}/register", post(register_kkt))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "missing or wrong admin credential: send `Authorization: Bearer <secret>` with the \
                 credential in {}",
                state.inner.data_dir.join(ADMIN_SECRET_FILE).display()
            ),
        )
    };
    let presented = crate::auth::bearer(headers).ok_or_else(unauthorized)?;
    // Constant time over the hash, so response timing says nothing about the secret.
    if crate::auth::same_digest(&sha256(presented.as_bytes()), &state.inner.admin_hash) {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

async fn create_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    authorize(&state, &headers)?;
    let request: TokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body must be JSON like {{\"ttlSeconds\": 3600}} or empty: {e}"),
            )
        })?
    };
    let ttl = match request.ttl_seconds {
        None => DEFAULT_TOKEN_TTL,
        Some(0) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ttlSeconds must be at least 1",
            ))
        }
        Some(s) if Duration::from_secs(s) > MAX_TOKEN_TTL => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("ttlSeconds may be at most {}", MAX_TOKEN_TTL.as_secs()),
            ))
        }
        Some(s) => Duration::from_secs(s),
    };
    let (token, expires_at_ms) =
        create_enroll_token(&state.inner.store, state.inner.ca_fingerprint, ttl).await?;
    info!(ttl_seconds = ttl.as_secs(), "enrollment token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse {
            token,
            expires_at: expires_at_ms / 1000,
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccountRequest {
    pub login: String,
    pub password: String,
    pub inns: Vec<String>,
}

/// An account as the admin API shows it (never the password hash).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountResponse {
    pub id: String,
    pub login: String,
    pub inns: Vec<String>,
    /// Only in the answer to the create call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_secret: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

async fn create_account(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<AccountResponse>), ApiError> {
    authorize(&state, &headers)?;
    let req: AccountRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "the body must be JSON like {{\"login\": \"shop\", \"password\": \"...\", \"inns\": [\"3245001416\"]}}: {e}"
        ))
    })?;
    let login = req.login.trim().to_owned();
    if login.is_empty() || login.chars().count() > 64 || login.chars().any(char::is_whitespace) {
        return Err(bad("login: 1 to 64 characters without spaces"));
    }
    if req.password.chars().count() < 4 {
        return Err(bad("password: at least 4 characters"));
    }
    if req.inns.is_empty() {
        return Err(bad(
            "inns: give at least one INN the account may fiscalize for",
        ));
    }
    for (i, inn) in req.inns.iter().enumerate() {
        protocol::checksum::validate_inn(inn)
            .map_err(|e| bad(format!("inns[{i}]: {inn:?} is not a valid INN: {e}")))?;
    }
    let password = req.password.clone();
    let hash = tokio::task::spawn_blocking(move || PasswordHash::new(&password, PASSWORD_ROUNDS))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("hashing failed: {e}"),
            )
        })?;
    let mut secret = [0u8; 24];
    rand::fill(&mut secret);
    let account = Account {
        id: format!("acc-{}", uuid::Uuid::new_v4().simple()),
        login,
        password: hash,
        inns: req.inns,
        callback_secret: protocol::tunnel::hex(&secret),
        created_at: crate::unix_ms(),
    };
    match state.inner.store.create_account(account).await? {
        Ok(a) => Ok((
            StatusCode::CREATED,
            Json(AccountResponse {
                id: a.id,
                login: a.login,
                inns: a.inns,
                callback_secret: Some(a.callback_secret),
            }),
        )),
        Err(r @ AccountRefusal::LoginTaken(_)) | Err(r @ AccountRefusal::InnTaken { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, r.to_string()))
        }
    }
}

async fn list_accounts(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Vec<AccountResponse>>, ApiError> {
    authorize(&state, &headers)?;
    let accounts = state.inner.store.accounts()?;
    Ok(Json(
        accounts
            .into_iter()
            .map(|a| AccountResponse {
                id: a.id,
                login: a.login,
                inns: a.inns,
                callback_secret: None,
            })
            .collect(),
    ))
}

fn fleet(state: &AdminState) -> Result<&(Tunnel, Dispatcher), ApiError> {
    state.inner.fleet.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this controller runs without a dispatcher; fleet views are not available",
        )
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentView {
    id: String,
    name: String,
    software: String,
    remote: String,
    connected_at_ms: u64,
    rtt_ms: Option<f64>,
    kkts: Vec<String>,
    journal_depth: Option<u64>,
    outbox_depth: Option<u64>,
    alarm: Option<String>,
}

async fn list_agents(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    authorize(&state, &headers)?;
    let (tunnel, _) = fleet(&state)?;
    Ok(Json(
        tunnel
            .agents()
            .into_iter()
            .map(|a| AgentView {
                id: a.id,
                name: a.name,
                software: a.software,
                remote: a.remote.to_string(),
                connected_at_ms: a.connected_at_ms,
                rtt_ms: a.rtt.map(|d| d.as_secs_f64() * 1000.0),
                kkts: a.kkts,
                journal_depth: a.health.as_ref().map(|h| h.journal_depth),
                outbox_depth: a.health.as_ref().map(|h| h.outbox_depth),
                alarm: a.health.and_then(|h| h.alarm),
            })
            .collect(),
    ))
}

async fn list_kkts(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Vec<crate::api::NativeKkt>>, ApiError> {
    authorize(&state, &headers)?;
    let (_, dispatcher) = fleet(&state)?;
    Ok(Json(crate::api::native_kkts_of(dispatcher, None)))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct QueueView {
    inn: String,
    waiting: usize,
}

async fn queue(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Vec<QueueView>>, ApiError> {
    authorize(&state, &headers)?;
    let (_, dispatcher) = fleet(&state)?;
    Ok(Json(
        dispatcher
            .depths()
            .into_iter()
            .map(|(inn, waiting)| QueueView { inn, waiting })
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InDoubtQuery {
    older_than_seconds: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct InDoubtView {
    job: String,
    state: String,
    kkt: Option<String>,
    agent: Option<String>,
    attempt: u32,
    since_ms: u64,
    agent_online: bool,
}

/// Jobs held by an agent that has not reported them: they may or may not have been fiscalized,
/// so they are never re-sent blindly (DESIGN.md §3). An operator reads the register's FN
/// archive, or waits for the agent to come back.
async fn in_doubt(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<InDoubtQuery>,
) -> Result<Json<Vec<InDoubtView>>, ApiError> {
    authorize(&state, &headers)?;
    let (tunnel, _) = fleet(&state)?;
    let online: std::collections::HashSet<String> =
        tunnel.agents().into_iter().map(|a| a.id).collect();
    let jobs = tunnel.jobs_in_doubt(Duration::from_secs(q.older_than_seconds.unwrap_or(60)))?;
    Ok(Json(
        jobs.into_iter()
            .map(|j| {
                let holder = j
                    .state
                    .holder()
                    .map(|(a, k, _)| (a.to_owned(), k.to_owned()));
                InDoubtView {
                    job: j.id.clone(),
                    state: j.state.name().to_owned(),
                    agent_online: holder.as_ref().is_some_and(|(a, _)| online.contains(a)),
                    kkt: holder.as_ref().map(|(_, k)| k.clone()),
                    agent: holder.map(|(a, _)| a),
                    attempt: j.attempt,
                    since_ms: j.updated_at,
                }
            })
            .collect(),
    ))
}

async fn anomalies(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers)?;
    let list = state.inner.store.anomalies()?;
    let out: Vec<serde_json::Value> = list
        .into_iter()
        .map(|a| {
            serde_json::json!({
                "id": a.id, "atMs": a.at, "agent": a.agent, "job": a.job,
                "kind": format!("{:?}", a.kind),
            })
        })
        .collect();
    Ok(Json(serde_json::Value::Array(out)))
}

/// Registers an online register (document 1). The card comes from the operator: the RNM is the
/// tax service's, and the register checks it against its ZN and the user INN.
async fn register_kkt(
    State(state): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path(zn): axum::extract::Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers)?;
    let (tunnel, _) = fleet(&state)?;
    let card: protocol::kkt::RegistrationParams = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "the body must be a registration card (rnm, userInn, userName, taxationSystems, internet, encryption, ofd{{name, inn, host, port}}, settlementAddress, settlementPlace, fnsSite): {e}"
        ))
    })?;
    protocol::checksum::validate_inn(&card.user_inn).map_err(|e| {
        bad(format!(
            "userInn: {:?} is not a valid INN: {e}",
            card.user_inn
        ))
    })?;
    let reply = tunnel
        .command(
            &zn,
            protocol::kkt::Call::Register(card),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| match e {
            crate::tunnel::CommandError::KktOffline(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                format!("register {zn} is not online; check its agent in GET /admin/kkts"),
            ),
            crate::tunnel::CommandError::Kkt(k) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("register {zn} refused the registration: {k}"),
            ),
            other => ApiError::new(StatusCode::GATEWAY_TIMEOUT, other.to_string()),
        })?;
    info!(kkt = zn, "register registered by an operator");
    Ok(Json(serde_json::to_value(reply).unwrap_or_default()))
}
