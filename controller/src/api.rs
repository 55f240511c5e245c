//! The shop-facing HTTP API: Ferma-compatible calls under `/api` (reference/ferma-api.md), the
//! account's native views under `/v1`, Prometheus `/metrics` and the OpenAPI document.
//!
//! # Promises kept here
//! * A `ReceiptId` is answered only after [`Store::create_receipt`] returned, i.e. after the
//!   commit holding the receipt is durable (DESIGN.md §3.1). One fsync serves every receipt that
//!   arrived meanwhile (the store's group commit), so concurrency, not the disk, sets throughput.
//! * One `InvoiceId` per account makes one receipt; a repeat answers 1019 with the first
//!   receipt's id between double dashes.
//! * An account sees only its own receipts and may send receipts only for its own INNs; another
//!   account's receipt id answers "not found", never "forbidden", so ids cannot be probed.
//! * Backpressure: when an INN's queue holds `max_queue` receipts, new ones are refused with 503
//!   and `Retry-After` before anything is written, rather than accepted and left to rot.

use crate::balancer::Waiting;
use crate::dispatcher::Dispatcher;
use crate::metrics::{Gauges, Metrics};
use crate::store::{
    secret_hash, Created, Ledger, NewReceipt, ReceiptRecord, ReceiptView, Session, Store,
    StoreError,
};
use crate::tunnel::Tunnel;
use crate::unix_ms;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::ferma::{self, codes, FermaError, StatusQuery};
use protocol::kkt::ReceiptParams;
use protocol::tunnel::Work;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Largest request body read. A receipt holds at most 100 items (`limits::ITEMS`), a few KiB
/// each at worst; anything bigger is refused before it is parsed.
pub const MAX_BODY: usize = 1024 * 1024;

/// Most receipts one `list`/`list2` answer carries; narrow the dates to see more.
pub const LIST_LIMIT: usize = 10_000;

/// How the API behaves.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Lifetime of a Ferma `AuthToken`.
    pub session_ttl: Duration,
    /// Receipts waiting per INN before new ones get 503.
    pub max_queue: usize,
    /// What 503 answers say in `Retry-After`.
    pub retry_after_secs: u32,
    /// Let `CallbackUrl` reach loopback and private networks (see `callbacks`): off in
    /// production, where a shop's URL must not reach into the operator's network.
    pub allow_private_callbacks: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            session_ttl: Duration::from_secs(24 * 3600),
            max_queue: 100_000,
            retry_after_secs: 1,
            allow_private_callbacks: false,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState<L = Store> {
    /// The shop-facing store ([`Ledger`]); redb by default.
    pub store: L,
    pub dispatcher: Dispatcher,
    pub tunnel: Tunnel,
    pub metrics: Arc<Metrics>,
    pub config: ApiConfig,
    /// SHA-256 of the credential `/metrics` asks for (the admin secret): the metrics name every
    /// organisation's INN and every register, which no shop may see. None serves them to anyone
    /// who can reach the port.
    pub operator: Option<[u8; 32]>,
}

/// The router. `state` is cheap to clone.
pub fn app<L: Ledger>(state: ApiState<L>) -> Router {
    Router::new()
        .route(
            "/api/Authorization/CreateAuthToken",
            post(create_token::<L>),
        )
        .route("/api/kkt/cloud/receipt", post(create_receipt::<L>))
        .route("/api/kkt/cloud/status", post(status::<L>))
        .route("/api/kkt/cloud/list", post(list::<L>))
        .route("/api/kkt/cloud/list2", post(list2::<L>))
        .route("/v1/receipts/{id}", get(native_receipt::<L>))
        .route("/v1/kkts", get(native_kkts::<L>))
        .route("/metrics", get(metrics::<L>))
        .route("/openapi.json", get(openapi))
        // Only the routes above get this one (axum applies it to routes already added), so the
        // operator's routes merged in later keep their own answers.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state)
}

// ---- wrong method, unknown path ----------------------------------------------------------------

/// At most this much of a request path is echoed in an error.
const PATH_SHOWN: usize = 200;

fn shown_path(uri: &Uri) -> String {
    let path = uri.path();
    match path.char_indices().nth(PATH_SHOWN) {
        Some((at, _)) => format!("{}…", &path[..at]),
        None => path.to_owned(),
    }
}

/// A refusal in the shape the caller reads: Ferma's envelope (code 1000) under `/api`, the
/// native `{"error"}` elsewhere.
fn routing_error(status: StatusCode, uri: &Uri, message: String) -> Response {
    let path = uri.path();
    if path == "/api" || path.starts_with("/api/") {
        let err = FermaError::new(codes::BAD_REQUEST, message);
        (status, Json(ferma::failure(&err))).into_response()
    } else {
        NativeError { status, message }.into_response()
    }
}

/// A known path asked with another method (axum adds the `Allow` header).
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allowed = if uri.path().starts_with("/api/") {
        "POST"
    } else {
        "GET"
    };
    let message = format!(
        "{method} is not allowed on {}; use {allowed}",
        shown_path(&uri)
    );
    routing_error(StatusCode::METHOD_NOT_ALLOWED, &uri, message)
}

/// No route: name what was asked and where the calls are.
async fn not_found(method: Method, uri: Uri) -> Response {
    let path = shown_path(&uri);
    let message = if uri.path() == "/api" || uri.path().starts_with("/api/") {
        format!(
            "no such call: {method} {path}; the calls are POST /api/Authorization/CreateAuthToken, \
             /api/kkt/cloud/receipt, /api/kkt/cloud/status, /api/kkt/cloud/list and \
             /api/kkt/cloud/list2"
        )
    } else {
        format!("no such path: {method} {path}; the API is described in /openapi.json")
    };
    routing_error(StatusCode::NOT_FOUND, &uri, message)
}

// ---- Ferma envelope --------------------------------------------------------------------------

fn ok(data: impl Serialize) -> Response {
    (StatusCode::OK, Json(ferma::success(data))).into_response()
}

fn fail(err: FermaError, retry_after: Option<u32>) -> Response {
    let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut resp = (status, Json(ferma::failure(&err))).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn internal(e: &StoreError) -> FermaError {
    error!(error = %e, "request failed in the store");
    FermaError::new(
        codes::INTERNAL,
        format!("the controller's store failed ({e}); retry with the same InvoiceId (it is safe)"),
    )
}

/// Reads the body whatever its content type (clients send none, or text/plain), bounded.
async fn read_body(body: Body) -> Result<axum::body::Bytes, FermaError> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        FermaError::new(
            codes::BAD_REQUEST,
            format!("the request body is larger than {MAX_BODY} bytes or was cut off; send one receipt per request"),
        )
    })
}

/// The account behind `?AuthToken=`.
fn session<L: Ledger>(
    state: &ApiState<L>,
    query: &HashMap<String, String>,
) -> Result<Session, FermaError> {
    let token = query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("AuthToken"))
        .map(|(_, v)| v.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            FermaError::new(
                codes::AUTH,
                "AuthToken is missing: add ?AuthToken=<token from /api/Authorization/CreateAuthToken>",
            )
        })?;
    match state.store.session(&secret_hash(token), unix_ms()) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(FermaError::new(
            codes::AUTH,
            "AuthToken is expired or unknown: get a new one from /api/Authorization/CreateAuthToken and resend",
        )),
        Err(e) => Err(internal(&e)),
    }
}

// ---- Ferma calls -----------------------------------------------------------------------------

async fn create_token<L: Ledger>(State(state): State<ApiState<L>>, body: Body) -> Response {
    match create_token_inner(&state, body).await {
        Ok(data) => ok(data),
        Err(e) => fail(e, None),
    }
}

async fn create_token_inner<L: Ledger>(
    state: &ApiState<L>,
    body: Body,
) -> Result<ferma::AuthTokenData, FermaError> {
    let body = read_body(body).await?;
    let creds = ferma::parse_credentials(&body)?;
    let wrong = || {
        FermaError::new(
            codes::LOGIN,
            "wrong Login or Password; check them with the service operator",
        )
    };
    let account = state
        .store
        .account_by_login(&creds.login)
        .map_err(|e| internal(&e))?;
    let Some(account) = account else {
        // Spend the same time as a real check, so timing does not reveal which logins exist.
        // Off the async workers, like the real check: PBKDF2 takes tens of milliseconds.
        let password = creds.password.clone();
        let _ = tokio::task::spawn_blocking(move || {
            crate::store::PasswordHash::new("", crate::store::PASSWORD_ROUNDS).verify(&password)
        })
        .await;
        return Err(wrong());
    };
    let hash = account.password.clone();
    let password = creds.password;
    let good = tokio::task::spawn_blocking(move || hash.verify(&password))
        .await
        .unwrap_or(false);
    if !good {
        warn!(login = account.login, "login refused: wrong password");
        return Err(wrong());
    }
    let token = uuid::Uuid::new_v4().to_string();
    let now = unix_ms();
    let ttl = u64::try_from(state.config.session_ttl.as_millis()).unwrap_or(u64::MAX);
    let expires_at = now.saturating_add(ttl);
    state
        .store
        .create_session(
            secret_hash(&token),
            Session {
                account: account.id.clone(),
                created_at: now,
                expires_at,
            },
        )
        .await
        .map_err(|e| internal(&e))?;
    info!(account = account.id, "API session created");
    Ok(ferma::AuthTokenData::new(
        &token,
        ferma::local_from_unix((expires_at / 1000) as i64),
    ))
}

async fn create_receipt<L: Ledger>(
    State(state): State<ApiState<L>>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    match create_receipt_inner(&state, &query, body).await {
        Ok(id) => ok(ferma::ReceiptCreated { receipt_id: id }),
        Err((e, retry)) => fail(e, retry),
    }
}

async fn create_receipt_inner<L: Ledger>(
    state: &ApiState<L>,
    query: &HashMap<String, String>,
    body: Body,
) -> Result<String, (FermaError, Option<u32>)> {
    let plain = |e| (e, None);
    let session = session(state, query).map_err(plain)?;
    let body = read_body(body).await.map_err(plain)?;
    let parsed = match ferma::parse_create_receipt(&body) {
        Ok(p) => p,
        Err(e) => {
            state.metrics.rejected_invalid();
            return Err((e, None));
        }
    };
    let account = state
        .store
        .account(&session.account)
        .map_err(|e| plain(internal(&e)))?
        .ok_or_else(|| {
            plain(FermaError::new(
                codes::AUTH,
                "the account of this AuthToken no longer exists",
            ))
        })?;
    if !account.owns(&parsed.inn) {
        return Err(plain(FermaError::at(
            codes::FORBIDDEN_INN,
            "Request.Inn",
            format!(
                "{} is not an organisation of this account (it has {}); ask the operator to add it",
                parsed.inn,
                account.inns.join(", ")
            ),
        )));
    }
    // A repeat is answered before the queue limit: it costs nothing to tell the shop its id.
    if let Some(existing) = state
        .store
        .receipt_by_invoice(&account.id, &parsed.invoice_id)
        .map_err(|e| plain(internal(&e)))?
    {
        state.metrics.duplicate();
        return Err(plain(FermaError::invoice_exists(
            &parsed.invoice_id,
            &existing.record.id,
        )));
    }
    if let Some(why) = parsed
        .callback_url
        .as_deref()
        .filter(|_| !state.config.allow_private_callbacks)
        .and_then(crate::callbacks::refusal)
    {
        return Err(plain(FermaError::validation(
            "Request.CallbackUrl",
            format!("{why}; give a public URL or leave CallbackUrl out"),
        )));
    }
    let needs = parsed.receipt.requirements();
    if let Some(m) = state.dispatcher.unservable(&parsed.inn, &needs) {
        return Err(plain(ferma::unservable(&parsed.inn, &m)));
    }
    let admission = match state.dispatcher.admit(&parsed.inn, state.config.max_queue) {
        Ok(a) => a,
        Err(depth) => {
            state.metrics.rejected_overload();
            return Err((
                FermaError::new(
                    codes::OVERLOADED,
                    format!(
                        "{depth} receipts of INN {} are waiting for a register, the limit is {}; retry after {} s with the same InvoiceId",
                        parsed.inn, state.config.max_queue, state.config.retry_after_secs
                    ),
                ),
                Some(state.config.retry_after_secs),
            ));
        }
    };
    let id = uuid::Uuid::new_v4().to_string();
    let params = ReceiptParams {
        receipt: parsed.receipt,
        additional_attribute: None,
    };
    let work = if params.receipt.kind.is_correction() {
        Work::Correction(params)
    } else {
        Work::Receipt(params)
    };
    let now = unix_ms();
    let record = ReceiptRecord {
        id: id.clone(),
        account: account.id.clone(),
        inn: parsed.inn,
        invoice_id: parsed.invoice_id.clone(),
        callback_url: parsed.callback_url,
        request_json: parsed.request.to_string(),
        created_at: now,
    };
    // The commit and the enqueue run in a task of their own: if the shop's client gives up
    // (and the request is dropped) once the write is handed over, the receipt still reaches the
    // queue — its commit may succeed, and the shop's retry is then told 1019 with this id.
    let (store, dispatcher, job_id) = (state.store.clone(), state.dispatcher.clone(), id.clone());
    let created = tokio::spawn(async move {
        let created = store.create_receipt(NewReceipt { record, work }, now).await;
        if let Ok(Created::New(place)) = &created {
            dispatcher.enqueue(
                place.clone(),
                Waiting {
                    job: job_id,
                    needs,
                    avoid: None,
                },
            );
        }
        drop(admission);
        created
    })
    .await
    .map_err(|e| {
        plain(FermaError::new(
            codes::INTERNAL,
            format!("the receipt's commit task failed ({e}); retry with the same InvoiceId"),
        ))
    })?
    .map_err(|e| plain(internal(&e)))?;
    match created {
        Created::New(_) => {
            state.metrics.accepted();
            Ok(id)
        }
        Created::Existing(existing) => {
            state.metrics.duplicate();
            Err(plain(FermaError::invoice_exists(
                &parsed.invoice_id,
                &existing,
            )))
        }
    }
}

async fn status<L: Ledger>(
    State(state): State<ApiState<L>>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let run = async {
        let session = session(&state, &query)?;
        let body = read_body(body).await?;
        let q = ferma::parse_status_request(&body)?;
        let view = match &q {
            StatusQuery::ReceiptId(id) => state.store.receipt(id),
            StatusQuery::InvoiceId(inv) => state.store.receipt_by_invoice(&session.account, inv),
        }
        .map_err(|e| internal(&e))?
        .filter(|v| v.record.account == session.account);
        let view = view.ok_or_else(|| {
            let what = match &q {
                StatusQuery::ReceiptId(id) => format!("ReceiptId {id}"),
                StatusQuery::InvoiceId(inv) => format!("InvoiceId {inv}"),
            };
            FermaError::new(
                codes::NOT_FOUND,
                format!(
                    "no receipt with {what} in this account; check the id the create call returned"
                ),
            )
        })?;
        Ok::<_, FermaError>(status_data(&view))
    };
    match run.await {
        Ok(d) => ok(d),
        Err(e) => fail(e, None),
    }
}

/// Registry by server (acceptance) time.
async fn list<L: Ledger>(
    State(state): State<ApiState<L>>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    registry(state, query, body, false).await
}

/// Registry by receipt (fiscal document) time.
async fn list2<L: Ledger>(
    State(state): State<ApiState<L>>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    registry(state, query, body, true).await
}

async fn registry<L: Ledger>(
    state: ApiState<L>,
    query: HashMap<String, String>,
    body: Body,
    by_receipt_time: bool,
) -> Response {
    let run = async {
        let session = session(&state, &query)?;
        let body = read_body(body).await?;
        let q = ferma::parse_list_request(&body)?;
        let views: Vec<ReceiptView> = if let Some(id) = &q.receipt_id {
            // Like `status`: one receipt asked for by id is found or "not found" (1018), and
            // another account's receipt answers exactly as an id that exists nowhere.
            let view = state
                .store
                .receipt(id)
                .map_err(|e| internal(&e))?
                .filter(|v| v.record.account == session.account)
                .ok_or_else(|| {
                    FermaError::new(
                        codes::NOT_FOUND,
                        format!("no receipt with ReceiptId {id} in this account; check the id the create call returned"),
                    )
                })?;
            vec![view]
        } else {
            let to_ms = |t: ferma::LocalSecs| {
                u64::try_from(t - ferma::MOSCOW_OFFSET_SECS).unwrap_or(0) * 1000
            };
            let (from, to) = if by_receipt_time {
                // A receipt is dated by its register after it was accepted; a register clock
                // running up to a week behind is still found.
                (
                    q.start
                        .map_or(0, |s| to_ms(s).saturating_sub(7 * 86_400_000)),
                    u64::MAX,
                )
            } else {
                (
                    q.start.map_or(0, to_ms),
                    q.end.map_or(u64::MAX, |e| to_ms(e) + 999),
                )
            };
            let scan = if by_receipt_time {
                LIST_LIMIT * 10
            } else {
                LIST_LIMIT
            };
            let mut views = state
                .store
                .receipts_between(&session.account, from, to, scan)
                .map_err(|e| internal(&e))?;
            if by_receipt_time {
                views.retain(|v| {
                    let t = receipt_time(v);
                    q.start.is_none_or(|s| t >= s) && q.end.is_none_or(|e| t <= e)
                });
            }
            views.truncate(LIST_LIMIT);
            views
        };
        let items: Vec<ferma::RegistryItem> = views.iter().map(registry_item).collect();
        Ok::<_, FermaError>(items)
    };
    match run.await {
        Ok(items) => ok(items),
        Err(e) => fail(e, None),
    }
}

// ---- shapes ----------------------------------------------------------------------------------

/// The receipt's date: its document's time by the register's clock, or its acceptance.
fn receipt_time(view: &ReceiptView) -> ferma::LocalSecs {
    match view.result() {
        Some((_, r)) => ferma::local_from_unix(i64::from(r.date_time)),
        None => ferma::local_from_unix((view.record.created_at / 1000) as i64),
    }
}

/// A stable number for a register (Ferma's `DeviceId` is numeric): its factory number when that
/// is digits, else a hash of it.
fn device_id(zn: &str) -> u64 {
    zn.parse().unwrap_or_else(|_| {
        let h = secret_hash(zn);
        u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], 0]) >> 8
    })
}

fn device(view: &ReceiptView) -> Option<ferma::Device> {
    let (_, r) = view.result()?;
    Some(ferma::Device {
        device_id: device_id(&r.zn),
        rnm: r.rnm.clone(),
        zn: r.zn.clone(),
        fn_number: r.fn_number.clone(),
        fdn: r.fd_number.to_string(),
        fpd: r.fpd.to_string(),
        shift_number: r.shift_number,
        receipt_num_in_shift: r.receipt_number,
        device_type: protocol::kkt::MODEL.to_owned(),
        ofd_receipt_url: format!(
            "https://check.ofd.ru/rec/{}/{}/{}/{}/{}",
            view.record.inn, r.rnm, r.fn_number, r.fd_number, r.fpd
        ),
    })
}

pub fn status_data(view: &ReceiptView) -> ferma::StatusData {
    let message = match &view.job.state {
        crate::rules::JobState::Failed { reason } => Some(reason.clone()),
        _ => None,
    };
    ferma::StatusData::new(
        &view.record.id,
        view.status(),
        message,
        ferma::local_from_unix((view.modified_at() / 1000) as i64),
        receipt_time(view),
        device(view),
    )
}

fn registry_item(view: &ReceiptView) -> ferma::RegistryItem {
    let status = status_data(view);
    let request: serde_json::Value =
        serde_json::from_str(&view.record.request_json).unwrap_or(serde_json::Value::Null);
    let cashbox = status.device.as_ref().map(|d| {
        let total = view
            .result()
            .and_then(|(_, r)| r.total)
            .or_else(|| view.job.work.params().receipt.total())
            .unwrap_or_default();
        ferma::CashboxInfo::from_device(d, total)
    });
    ferma::registry_item(&status, &view.record.invoice_id, &request, cashbox)
}

// ---- native API ------------------------------------------------------------------------------

/// Native calls take the same session token as a bearer header.
fn bearer_session<L: Ledger>(
    state: &ApiState<L>,
    headers: &HeaderMap,
) -> Result<Session, NativeError> {
    let token = crate::auth::bearer(headers).ok_or_else(NativeError::unauthorized)?;
    match state.store.session(&secret_hash(token), unix_ms()) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(NativeError::unauthorized()),
        Err(e) => Err(NativeError::store(&e)),
    }
}

/// Errors of the native API: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct NativeError {
    status: StatusCode,
    message: String,
}

impl NativeError {
    fn unauthorized() -> Self {
        NativeError {
            status: StatusCode::UNAUTHORIZED,
            message: "send `Authorization: Bearer <AuthToken>` with a token from /api/Authorization/CreateAuthToken".into(),
        }
    }
    fn store(e: &StoreError) -> Self {
        error!(error = %e, "native request failed in the store");
        NativeError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the controller's store failed ({e}); retry"),
        }
    }
}

impl IntoResponse for NativeError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// A receipt with everything the controller knows of it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NativeReceipt {
    pub status: ferma::StatusData,
    pub invoice_id: String,
    pub inn: String,
    /// queued, assigned, accepted, completed, failed.
    pub job_state: String,
    /// Register and attempt holding the job while it is in flight.
    pub held_by: Option<String>,
    pub attempt: u32,
    /// The last attempt's setback, if the receipt came back from a register.
    pub last_error: Option<String>,
    pub history: Vec<NativeHistory>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NativeHistory {
    pub at_ms: u64,
    pub state: String,
    pub attempt: u32,
    pub kkt: Option<String>,
}

async fn native_receipt<L: Ledger>(
    State(state): State<ApiState<L>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<NativeReceipt>, NativeError> {
    let session = bearer_session(&state, &headers)?;
    let view = state
        .store
        .receipt(&id)
        .map_err(|e| NativeError::store(&e))?
        .filter(|v| v.record.account == session.account)
        .ok_or_else(|| NativeError {
            status: StatusCode::NOT_FOUND,
            message: format!("no receipt {id} in this account"),
        })?;
    Ok(Json(NativeReceipt {
        status: status_data(&view),
        invoice_id: view.record.invoice_id.clone(),
        inn: view.record.inn.clone(),
        job_state: view.job.state.name().to_owned(),
        held_by: view.job.state.holder().map(|(_, k, _)| k.to_owned()),
        attempt: view.job.attempt,
        last_error: view
            .job
            .last_error
            .as_ref()
            .map(|e| format!("{:?} on {}", e.kind, e.kkt)),
        history: view
            .job
            .history
            .iter()
            .map(|h| NativeHistory {
                at_ms: h.at,
                state: h.state.clone(),
                attempt: h.attempt,
                kkt: h.kkt.clone(),
            })
            .collect(),
    }))
}

/// A register as its account (or an operator) sees it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NativeKkt {
    pub zn: String,
    pub agent: String,
    pub inn: Option<String>,
    pub rnm: Option<String>,
    pub fn_number: Option<String>,
    /// ready, or why the register takes no receipts now.
    pub pool: String,
    pub in_flight: usize,
    pub shift: Option<String>,
    pub shift_number: Option<u32>,
    pub fn_documents_left: Option<u32>,
    pub fn_valid_until: Option<u32>,
    /// Documents not yet delivered to the OFD.
    pub unsent: Option<u32>,
    /// Age of the oldest of them, seconds (register clock).
    pub oldest_unsent_secs: Option<i64>,
}

pub fn native_kkts_of(dispatcher: &Dispatcher, inn_filter: Option<&[String]>) -> Vec<NativeKkt> {
    dispatcher
        .registers()
        .into_iter()
        .filter(|r| match (inn_filter, &r.inn) {
            (None, _) => true,
            (Some(inns), Some(inn)) => inns.contains(inn),
            (Some(_), None) => false,
        })
        .map(|r| {
            let s = r.state.as_ref();
            NativeKkt {
                zn: r.zn.clone(),
                agent: r.agent.clone(),
                inn: r.inn.clone(),
                rnm: s.and_then(|s| s.fn_info.registration.as_ref().map(|g| g.rnm.clone())),
                fn_number: s.map(|s| s.fn_info.fn_number.clone()),
                pool: pool_name(&r.pool),
                in_flight: r.in_flight,
                shift: s.map(|s| format!("{:?}", s.device.shift).to_lowercase()),
                shift_number: s.map(|s| s.shift.number),
                fn_documents_left: s.map(|s| {
                    s.fn_info
                        .documents_capacity
                        .saturating_sub(s.fn_info.documents_used)
                }),
                fn_valid_until: s.map(|s| s.fn_info.valid_until),
                unsent: s.map(|s| s.ofd.unsent_count),
                oldest_unsent_secs: r.oldest_unsent_secs(unix_ms()),
            }
        })
        .collect()
}

pub fn pool_name(p: &crate::balancer::PoolState) -> String {
    use crate::balancer::PoolState as P;
    match p {
        P::Ready => "ready".into(),
        P::Unknown => "unknown: waiting for its first status".into(),
        P::NotFiscal => "not fiscal: register it".into(),
        P::FnRetired(why) => format!("fn retired: {why}"),
        P::DeviceFault(why) => format!("device fault: {why}"),
        P::ShiftClosed => "shift closed".into(),
        P::Rotating => "rotating its shift".into(),
        P::Busy(k) => format!("busy: {k:?}"),
    }
}

fn pool_key(p: &crate::balancer::PoolState) -> &'static str {
    use crate::balancer::PoolState as P;
    match p {
        P::Ready => "ready",
        P::Unknown => "unknown",
        P::NotFiscal => "not_fiscal",
        P::FnRetired(_) => "fn_retired",
        P::DeviceFault(_) => "device_fault",
        P::ShiftClosed => "shift_closed",
        P::Rotating => "rotating",
        P::Busy(_) => "busy",
    }
}

async fn native_kkts<L: Ledger>(
    State(state): State<ApiState<L>>,
    headers: HeaderMap,
) -> Result<Json<Vec<NativeKkt>>, NativeError> {
    let session = bearer_session(&state, &headers)?;
    let account = state
        .store
        .account(&session.account)
        .map_err(|e| NativeError::store(&e))?
        .ok_or_else(NativeError::unauthorized)?;
    Ok(Json(native_kkts_of(&state.dispatcher, Some(&account.inns))))
}

// ---- operations ------------------------------------------------------------------------------

async fn metrics<L: Ledger>(State(state): State<ApiState<L>>, headers: HeaderMap) -> Response {
    if let Some(expected) = state.operator {
        let same = crate::auth::bearer(&headers)
            .is_some_and(|t| crate::auth::same_digest(&secret_hash(t), &expected));
        if !same {
            return NativeError {
                status: StatusCode::UNAUTHORIZED,
                message: "metrics name every organisation and register: scrape with `Authorization: Bearer <admin.secret>`".into(),
            }
            .into_response();
        }
    }
    let now = unix_ms();
    let regs = state.dispatcher.registers();
    let mut by_state: HashMap<&'static str, usize> = HashMap::new();
    for r in &regs {
        *by_state.entry(pool_key(&r.pool)).or_default() += 1;
    }
    let mut registers: Vec<(String, usize)> = by_state
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    registers.sort();
    let unsent = regs
        .iter()
        .filter_map(|r| {
            let s = r.state.as_ref()?;
            Some((r.zn.clone(), s.ofd.unsent_count, r.oldest_unsent_secs(now)))
        })
        .collect();
    let gauges = Gauges {
        receipts: state.store.receipt_counts().unwrap_or_default(),
        queue_depth: state.dispatcher.depths(),
        in_flight: state.dispatcher.held(),
        registers,
        unsent,
        agents_online: state.tunnel.agents().len(),
        callbacks_pending: state.store.pending_callbacks().unwrap_or(0),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}
