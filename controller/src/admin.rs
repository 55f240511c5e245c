//! The operator's admin API over HTTP, and the admin credential that guards it.
//!
//! At first start the controller writes a random credential to `<data>/admin.secret` (mode 0600)
//! and keeps only its SHA-256 in the store: whoever can read the data directory (the
//! controller's own machine) can run operator commands such as `controller agent-token create`.
//! The file is authoritative: to rotate the credential, delete it and restart the controller.
//!
//! Routes:
//! * `POST /admin/agent-tokens` with `Authorization: Bearer <admin secret>` and an optional JSON
//!   body `{"ttlSeconds": N}` → `{"token": "kt1....", "expiresAt": <unix seconds>}`.

use crate::store::{Store, StoreError};
use crate::tunnel::{create_enroll_token, DEFAULT_TOKEN_TTL};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
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
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(unauthorized)?;
    let hash = sha256(presented.as_bytes());
    // Constant time over the hash, so response timing says nothing about the secret.
    let diff = hash
        .iter()
        .zip(state.inner.admin_hash.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff == 0 {
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
