//! The HTTP API: Ferma calls under `/api`, native `/v1`, `/metrics`, `/openapi.json` and the
//! operator's `/admin` routes. Most tests drive the routers with tower's `oneshot` over the state
//! of a real [`Server`] (tunnel, dispatcher, store in a temp dir); the callback tests go through
//! real sockets. No registers are connected: accepted receipts stay NEW in their INN's queue.
//! Nothing sleeps: waits are on channels or real requests, with [`WAIT`] as a safety net.
#![allow(clippy::unwrap_used)]

mod common;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use common::receipt;
use controller::admin::{self, AdminState, ADMIN_SECRET_FILE};
use controller::api::{self, ApiConfig, ApiState, MAX_BODY};
use controller::server::{Server, ServerConfig};
use controller::store::{Account, PasswordHash};
use protocol::ferma::{format_local, local_from_unix, parse_local, LocalSecs};
use protocol::tunnel::Work;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tower::ServiceExt;

/// Safety net for every wait; tests finish far sooner.
const WAIT: Duration = Duration::from_secs(20);

const INN_A: &str = "3245001416";
const INN_B: &str = "7704211201";
const INN_C: &str = "7707083893";
const INN_12: &str = "500100732259";
const PASSWORD: &str = "secret-password";

/// Every route of `api::app` and `admin::app`, with its method.
const ROUTES: &[(&str, &str)] = &[
    ("/api/Authorization/CreateAuthToken", "post"),
    ("/api/kkt/cloud/receipt", "post"),
    ("/api/kkt/cloud/status", "post"),
    ("/api/kkt/cloud/list", "post"),
    ("/api/kkt/cloud/list2", "post"),
    ("/v1/receipts/{id}", "get"),
    ("/v1/kkts", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
    ("/admin/agent-tokens", "post"),
    ("/admin/accounts", "post"),
    ("/admin/accounts", "get"),
    ("/admin/agents", "get"),
    ("/admin/kkts", "get"),
    ("/admin/queue", "get"),
    ("/admin/jobs/in-doubt", "get"),
    ("/admin/anomalies", "get"),
    ("/admin/kkts/{zn}/register", "post"),
];

// ---- harness ---------------------------------------------------------------------------------

/// A running controller and a router over its state (API + admin, as `Server` merges them).
struct Env {
    server: Server,
    app: Router,
    admin: String,
    _dir: tempfile::TempDir,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `Data` of a Ferma success envelope.
    fn data(&self) -> Value {
        let v = self.json();
        assert_eq!(self.status, StatusCode::OK, "{v}");
        assert_eq!(v["Status"], "Success", "{v}");
        assert!(v.get("Error").is_none(), "{v}");
        v["Data"].clone()
    }

    /// Asserts a Ferma failure envelope with `code` and a non-200 status; returns the message.
    fn failed(&self, code: i64) -> String {
        let v = self.json();
        assert_ne!(self.status, StatusCode::OK, "{v}");
        assert_eq!(v["Status"], "Failed", "{v}");
        assert_eq!(v["Error"]["Code"], code, "{v}");
        let msg = v["Error"]["Message"].as_str().unwrap().to_owned();
        assert!(!msg.is_empty());
        msg
    }
}

impl Env {
    async fn start() -> Env {
        Env::start_with(ApiConfig::default()).await
    }

    /// The shop servers of these tests listen on loopback, which production refuses.
    async fn local_callbacks() -> Env {
        Env::start_with(ApiConfig {
            allow_private_callbacks: true,
            ..ApiConfig::default()
        })
        .await
    }

    async fn start_with(api_config: ApiConfig) -> Env {
        controller::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        );
        config.api = api_config.clone();
        let server = Server::start(config).await.unwrap();
        let admin = std::fs::read_to_string(dir.path().join(ADMIN_SECRET_FILE))
            .unwrap()
            .trim()
            .to_owned();
        // The file and the store agree already: this only returns the hash.
        let admin_hash = admin::ensure_admin_secret(dir.path(), server.store())
            .await
            .unwrap();
        let state = ApiState {
            store: server.store().clone(),
            dispatcher: server.dispatcher.clone(),
            tunnel: server.tunnel.clone(),
            metrics: server.metrics.clone(),
            config: api_config,
            operator: Some(admin_hash),
        };
        let admin_state = AdminState::new(
            server.store().clone(),
            server.tunnel.ca().fingerprint(),
            admin_hash,
            dir.path().to_owned(),
        )
        .with_fleet(server.tunnel.clone(), server.dispatcher.clone());
        let app = api::app(state).merge(admin::app(admin_state));
        Env {
            server,
            app,
            admin,
            _dir: dir,
        }
    }

    async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn post_raw(&self, uri: &str, content_type: Option<&str>, body: impl Into<Body>) -> Resp {
        let mut r = Request::post(uri);
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        self.send(r.body(body.into()).unwrap()).await
    }

    async fn post(&self, uri: &str, body: &Value) -> Resp {
        self.post_raw(uri, Some("application/json"), body.to_string())
            .await
    }

    /// A Ferma call with `?AuthToken=`.
    async fn ferma(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.post(&format!("{path}?AuthToken={token}"), body).await
    }

    async fn get(&self, uri: &str, bearer: Option<&str>) -> Resp {
        let mut r = Request::get(uri);
        if let Some(b) = bearer {
            r = r.header(header::AUTHORIZATION, format!("Bearer {b}"));
        }
        self.send(r.body(Body::empty()).unwrap()).await
    }

    async fn admin_post(&self, uri: &str, bearer: Option<&str>, body: &Value) -> Resp {
        let mut r = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(b) = bearer {
            r = r.header(header::AUTHORIZATION, format!("Bearer {b}"));
        }
        self.send(r.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// Creates an account through `POST /admin/accounts`; returns its JSON (with the callback
    /// secret).
    async fn account(&self, login: &str, inns: &[&str]) -> Value {
        let r = self
            .admin_post(
                "/admin/accounts",
                Some(&self.admin),
                &json!({"login": login, "password": PASSWORD, "inns": inns}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
        let v = r.json();
        assert_eq!(v["login"], login);
        assert!(v["callbackSecret"].as_str().is_some_and(|s| !s.is_empty()));
        v
    }

    async fn login(&self, login: &str) -> String {
        let r = self
            .post(
                "/api/Authorization/CreateAuthToken",
                &json!({"Login": login, "Password": PASSWORD}),
            )
            .await;
        r.data()["AuthToken"].as_str().unwrap().to_owned()
    }

    /// Creates an account straight in the store, with a cheap password hash (1,000 PBKDF2
    /// rounds instead of 100,000: two CPUs hash for every parallel test). Same JSON shape as
    /// [`Env::account`].
    async fn quick_account(&self, login: &str, inns: &[&str]) -> Value {
        let account = Account {
            id: format!("acc-{}", uuid::Uuid::new_v4().simple()),
            login: login.to_owned(),
            password: PasswordHash::new(PASSWORD, 1000),
            inns: inns.iter().map(|i| (*i).to_owned()).collect(),
            callback_secret: uuid::Uuid::new_v4().simple().to_string(),
            created_at: controller::unix_ms(),
        };
        let a = self
            .server
            .store()
            .create_account(account)
            .await
            .unwrap()
            .unwrap();
        json!({"id": a.id, "login": a.login, "inns": a.inns, "callbackSecret": a.callback_secret})
    }

    /// An account owning `inns` and a token for it.
    async fn tenant(&self, login: &str, inns: &[&str]) -> (Value, String) {
        let account = self.quick_account(login, inns).await;
        let token = self.login(login).await;
        (account, token)
    }

    async fn create(&self, token: &str, body: &Value) -> Resp {
        self.ferma("/api/kkt/cloud/receipt", token, body).await
    }

    /// Creates a receipt that must be accepted; returns its id.
    async fn create_ok(&self, token: &str, body: &Value) -> String {
        let data = self.create(token, body).await.data();
        let id = data["ReceiptId"].as_str().unwrap().to_owned();
        uuid::Uuid::parse_str(&id).unwrap();
        id
    }

    async fn metrics(&self) -> String {
        let r = self.get("/metrics", Some(&self.admin)).await;
        assert_eq!(r.status, StatusCode::OK);
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    fn depth(&self, inn: &str) -> usize {
        self.server.dispatcher.depth(inn)
    }
}

/// What clients do with a 1019 message: the regex `--([a-f0-9-]+)--`, first match.
fn dashed_id(message: &str) -> Option<String> {
    let bytes = message.as_bytes();
    let allowed = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-';
    for start in 0..bytes.len() {
        if !bytes[start..].starts_with(b"--") {
            continue;
        }
        let body = start + 2;
        let run = bytes[body..].iter().take_while(|b| allowed(**b)).count();
        // Greedy with backtracking: the longest run that is followed by "--".
        for len in (1..=run).rev() {
            if bytes[body + len..].starts_with(b"--") {
                return Some(message[body..body + len].to_owned());
            }
        }
    }
    None
}

/// `YYYY-MM-DDTHH:MM:SS`, nothing more.
fn is_naive_local(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

fn now_local() -> LocalSecs {
    local_from_unix((controller::unix_ms() / 1000) as i64)
}

/// The value of an unlabelled-or-labelled sample line `name value`.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().unwrap())
    })
}

// ---- CreateAuthToken -------------------------------------------------------------------------

#[tokio::test]
async fn create_auth_token_answers_a_token_or_1002() {
    let env = Env::start().await;
    env.quick_account("shop", &[INN_A]).await;

    let r = env
        .post(
            "/api/Authorization/CreateAuthToken",
            &json!({"Login": "shop", "Password": PASSWORD}),
        )
        .await;
    let v = r.json();
    assert_eq!(v["Status"], "Success");
    let data = r.data();
    let token = data["AuthToken"].as_str().unwrap();
    assert!(!token.is_empty());
    let exp = data["ExpirationDateUtc"].as_str().unwrap();
    assert!(is_naive_local(exp), "{exp}");
    // A day from now, in Moscow wall-clock time.
    let ahead = parse_local(exp).unwrap() - now_local();
    assert!(
        (86_400 - 120..=86_400 + 5).contains(&ahead),
        "{exp}: {ahead}"
    );
    assert_eq!(data.as_object().unwrap().len(), 2, "{data}");

    // The token works.
    let id = env.create_ok(token, &receipt(INN_A, "order-1")).await;
    assert!(!id.is_empty());

    for (login, password) in [("shop", "wrong"), ("nobody", PASSWORD), ("shop", "")] {
        let r = env
            .post(
                "/api/Authorization/CreateAuthToken",
                &json!({"Login": login, "Password": password}),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        r.failed(1002);
    }

    // Lenient about the content type, and about the wrapper.
    let body = json!({"Login": "shop", "Password": PASSWORD}).to_string();
    for ct in [None, Some("text/plain"), Some("text/plain; charset=utf-8")] {
        let r = env
            .post_raw("/api/Authorization/CreateAuthToken", ct, body.clone())
            .await;
        assert!(r.data()["AuthToken"].is_string(), "{ct:?}");
    }
    let r = env
        .post(
            "/api/Authorization/CreateAuthToken",
            &json!({"Request": {"Login": "shop", "Password": PASSWORD}}),
        )
        .await;
    assert!(r.data()["AuthToken"].is_string());

    // An empty or broken body is a bad request, not a login failure.
    let r = env
        .post_raw("/api/Authorization/CreateAuthToken", None, "")
        .await;
    r.failed(1000);
    let r = env
        .post_raw("/api/Authorization/CreateAuthToken", None, "{\"Login\":")
        .await;
    r.failed(1000);
}

// ---- tokens ----------------------------------------------------------------------------------

const TOKEN_CALLS: [&str; 4] = [
    "/api/kkt/cloud/receipt",
    "/api/kkt/cloud/status",
    "/api/kkt/cloud/list",
    "/api/kkt/cloud/list2",
];

fn body_for(path: &str, receipt_id: &str) -> Value {
    match path {
        "/api/kkt/cloud/receipt" => receipt(INN_A, "token-test"),
        "/api/kkt/cloud/status" => json!({"Request": {"ReceiptId": receipt_id}}),
        _ => json!({"Request": {}}),
    }
}

#[tokio::test]
async fn missing_or_unknown_token_answers_1001() {
    let env = Env::start().await;
    let (_, token) = env.tenant("shop", &[INN_A]).await;
    let id = env.create_ok(&token, &receipt(INN_A, "order-1")).await;

    for path in TOKEN_CALLS {
        let body = body_for(path, &id);
        let r = env.post(path, &body).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        let msg = r.failed(1001);
        assert!(msg.contains("AuthToken"), "{msg}");

        let r = env.post(&format!("{path}?AuthToken="), &body).await;
        r.failed(1001);

        let unknown = uuid::Uuid::new_v4().to_string();
        let r = env.ferma(path, &unknown, &body).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        r.failed(1001);
    }
    // Nothing was created by the refused calls.
    assert_eq!(env.depth(INN_A), 1);
}

#[tokio::test]
async fn expired_token_answers_1001() {
    let env = Env::start_with(ApiConfig {
        session_ttl: Duration::ZERO,
        ..ApiConfig::default()
    })
    .await;
    env.quick_account("shop", &[INN_A]).await;
    // Login still succeeds; the session is born expired.
    let token = env.login("shop").await;
    for path in TOKEN_CALLS {
        let r = env.ferma(path, &token, &body_for(path, "x")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        let msg = r.failed(1001);
        assert!(msg.contains("expired"), "{msg}");
    }
    // The native API takes the same token and refuses it the same way.
    let r = env.get("/v1/kkts", Some(&token)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(env.depth(INN_A), 0);
}

// ---- create receipt --------------------------------------------------------------------------

#[tokio::test]
async fn minimal_receipt_is_accepted_and_stays_new() {
    let env = Env::start().await;
    let (account, token) = env.tenant("shop", &[INN_A]).await;
    let id = env.create_ok(&token, &receipt(INN_A, "order-1")).await;

    let r = env
        .ferma(
            "/api/kkt/cloud/status",
            &token,
            &json!({"Request": {"ReceiptId": id}}),
        )
        .await;
    let data = r.data();
    assert_eq!(data["ReceiptId"], id.as_str());
    assert_eq!(data["StatusCode"], 0);
    assert_eq!(data["StatusName"], "NEW");
    assert!(data["StatusMessage"].is_string());
    assert!(data["Device"].is_null());
    for f in ["ModifiedDateUtc", "ReceiptDateUtc"] {
        assert!(is_naive_local(data[f].as_str().unwrap()), "{data}");
    }
    for f in ["ModifiedDateTimeIso", "ReceiptDateTimeIso"] {
        assert!(data[f].as_str().unwrap().ends_with("+03:00"), "{data}");
    }

    // Durable and queued: the store has it, the dispatcher waits with it.
    let account_id = account["id"].as_str().unwrap();
    let view = env
        .server
        .store()
        .receipt_by_invoice(account_id, "order-1")
        .unwrap()
        .unwrap();
    assert_eq!(view.record.id, id);
    assert_eq!(view.record.inn, INN_A);
    assert_eq!(env.depth(INN_A), 1);

    let r = env.get(&format!("/v1/receipts/{id}"), Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    let native = r.json();
    assert_eq!(native["jobState"], "queued");
    assert_eq!(native["invoiceId"], "order-1");
    assert_eq!(native["inn"], INN_A);
    assert_eq!(native["status"]["StatusName"], "NEW");

    // Any content type, or none, as long as the body is JSON.
    for (i, ct) in [None, Some("text/plain")].into_iter().enumerate() {
        let r = env
            .post_raw(
                &format!("/api/kkt/cloud/receipt?AuthToken={token}"),
                ct,
                receipt(INN_A, &format!("order-ct-{i}")).to_string(),
            )
            .await;
        assert!(r.data()["ReceiptId"].is_string(), "{ct:?}");
    }
    assert_eq!(env.depth(INN_A), 3);

    // No registers: /v1/kkts is empty, not an error.
    let r = env.get("/v1/kkts", Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!([]));
}

#[tokio::test]
async fn every_receipt_type_is_accepted() {
    let env = Env::start().await;
    let (_, token) = env.tenant("shop", &[INN_12]).await;
    protocol::checksum::validate_inn(INN_12).unwrap();
    let plain = [
        "Income",
        "IncomeReturn",
        "IncomePrepayment",
        "IncomeReturnPrepayment",
        "Expense",
        "ExpenseReturn",
    ];
    let corrections = [
        "IncomeCorrection",
        "IncomeReturnCorrection",
        "BuyCorrection",
        "ExpenseReturnCorrection",
    ];
    for (i, kind) in plain.iter().chain(corrections.iter()).enumerate() {
        let mut body = receipt(INN_12, &format!("type-{i}"));
        body["Request"]["Type"] = json!(kind);
        let is_correction = corrections.contains(kind);
        if is_correction {
            body["Request"]["CustomerReceipt"]["CorrectionInfo"] = json!({
                "Type": if i % 2 == 0 { "SELF" } else { "INSTRUCTION" },
                "Description": "Чек не был пробит вовремя",
                "ReceiptDate": "01.12.26",
                "ReceiptId": "12-34/5"
            });
        }
        let id = env.create_ok(&token, &body).await;
        let job = env.server.store().job(&id).unwrap().unwrap();
        match (&job.work, is_correction) {
            (Work::Correction(p), true) => {
                let c = p.receipt.correction.as_ref().unwrap();
                assert_eq!((c.date.year, c.date.month, c.date.day), (2026, 12, 1));
            }
            (Work::Receipt(p), false) => assert!(p.receipt.correction.is_none()),
            (w, _) => panic!("{kind}: {w:?}"),
        }
    }
    assert_eq!(env.depth(INN_12), plain.len() + corrections.len());

    // A correction without CorrectionInfo is refused.
    let mut body = receipt(INN_12, "type-bad");
    body["Request"]["Type"] = json!("IncomeCorrection");
    let msg = env.create(&token, &body).await.failed(1010);
    assert!(msg.contains("CorrectionInfo"), "{msg}");
}

// ---- idempotency -----------------------------------------------------------------------------

#[tokio::test]
async fn repeated_invoice_answers_1019_with_the_first_id() {
    let env = Env::start().await;
    let (_, token) = env.tenant("shop", &[INN_A]).await;
    let body = receipt(INN_A, "order-42");
    let first = env.create_ok(&token, &body).await;

    for _ in 0..2 {
        let r = env.create(&token, &body).await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        let msg = r.failed(1019);
        assert!(msg.contains(&format!("--{first}--")), "{msg}");
        assert_eq!(dashed_id(&msg).as_deref(), Some(first.as_str()), "{msg}");
    }
    // Even a different receipt under the same InvoiceId names the first one.
    let mut other = receipt(INN_A, "order-42");
    other["Request"]["CustomerReceipt"]["Items"][0]["Label"] = json!("Кефир");
    let msg = env.create(&token, &other).await.failed(1019);
    assert_eq!(dashed_id(&msg).as_deref(), Some(first.as_str()), "{msg}");

    // InvoiceIds with double dashes cannot fool the clients' regex.
    let tricky = "abc--def--0";
    let id = env.create_ok(&token, &receipt(INN_A, tricky)).await;
    let msg = env
        .create(&token, &receipt(INN_A, tricky))
        .await
        .failed(1019);
    assert_eq!(dashed_id(&msg).as_deref(), Some(id.as_str()), "{msg}");

    assert_eq!(env.depth(INN_A), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_invoice_make_one_receipt() {
    let env = Env::start().await;
    let (account, token) = env.tenant("shop", &[INN_A]).await;
    let body = receipt(INN_A, "race-1").to_string();
    let uri = format!("/api/kkt/cloud/receipt?AuthToken={token}");
    let start = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let app = env.app.clone();
            let req = Request::post(&uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let resp = app.oneshot(req).await.unwrap();
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                Resp {
                    status,
                    headers,
                    body,
                }
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut named = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == StatusCode::OK {
            created.push(r.data()["ReceiptId"].as_str().unwrap().to_owned());
        } else {
            let msg = r.failed(1019);
            named.push(dashed_id(&msg).unwrap());
        }
    }
    assert_eq!(created.len(), 1, "exactly one success: {created:?}");
    assert_eq!(named.len(), 31);
    let id = &created[0];
    assert!(named.iter().all(|n| n == id), "{named:?} vs {id}");

    let store = env.server.store();
    let account_id = account["id"].as_str().unwrap();
    let view = store
        .receipt_by_invoice(account_id, "race-1")
        .unwrap()
        .unwrap();
    assert_eq!(&view.record.id, id);
    assert_eq!(
        store
            .receipts_between(account_id, 0, u64::MAX, 100)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(env.depth(INN_A), 1);
    let m = env.metrics().await;
    assert_eq!(sample(&m, "kkt_receipts_total{status=\"NEW\"}"), Some(1.0));
    assert_eq!(
        sample(&m, "kkt_api_refusals_total{reason=\"duplicate_invoice\"}"),
        Some(31.0)
    );
}

// ---- tenants ---------------------------------------------------------------------------------

#[tokio::test]
async fn accounts_see_only_their_own_receipts() {
    let env = Env::start().await;
    let (_, token_a) = env.tenant("shop-a", &[INN_A]).await;
    let (_, token_b) = env.tenant("shop-b", &[INN_B]).await;
    let id_a = env.create_ok(&token_a, &receipt(INN_A, "order-1")).await;
    let only_a = env.create_ok(&token_a, &receipt(INN_A, "only-a")).await;
    // InvoiceIds are per account: B may use the same one.
    let id_b = env.create_ok(&token_b, &receipt(INN_B, "order-1")).await;
    assert_ne!(id_a, id_b);

    // A's receipts are "not found" for B, by every way of asking.
    for body in [
        json!({"Request": {"ReceiptId": id_a}}),
        json!({"Request": {"InvoiceId": "only-a"}}),
    ] {
        let r = env.ferma("/api/kkt/cloud/status", &token_b, &body).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        r.failed(1018);
    }
    for path in ["/api/kkt/cloud/list", "/api/kkt/cloud/list2"] {
        let r = env
            .ferma(path, &token_b, &json!({"Request": {"ReceiptId": id_a}}))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        let foreign = r.failed(1018);
        // An id that exists nowhere answers the same: ids cannot be probed.
        let nowhere = uuid::Uuid::new_v4().to_string();
        let r = env
            .ferma(path, &token_b, &json!({"Request": {"ReceiptId": nowhere}}))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.failed(1018).replace(&nowhere, &id_a), foreign);
    }
    let r = env
        .get(&format!("/v1/receipts/{id_a}"), Some(&token_b))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = env
        .get(&format!("/v1/receipts/{id_a}"), Some(&token_a))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = env.get(&format!("/v1/receipts/{id_a}"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // "order-1" is each account's own receipt.
    for (token, own) in [(&token_a, &id_a), (&token_b, &id_b)] {
        let r = env
            .ferma(
                "/api/kkt/cloud/status",
                token,
                &json!({"Request": {"InvoiceId": "order-1"}}),
            )
            .await;
        assert_eq!(r.data()["ReceiptId"], own.as_str());
    }

    // B cannot fiscalize for A's INN, and nothing is created.
    let r = env.create(&token_b, &receipt(INN_A, "order-2")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let msg = r.failed(1020);
    assert!(msg.contains("Request.Inn"), "{msg}");
    assert_eq!(env.depth(INN_A), 2);
    // An INN nobody owns is refused the same way.
    env.create(&token_b, &receipt(INN_C, "order-3"))
        .await
        .failed(1020);
    assert_eq!(env.depth(INN_C), 0);

    // Registries hold only the account's own receipts.
    for (token, own) in [
        (&token_a, vec![id_a.as_str(), only_a.as_str()]),
        (&token_b, vec![id_b.as_str()]),
    ] {
        for path in ["/api/kkt/cloud/list", "/api/kkt/cloud/list2"] {
            let items = env.ferma(path, token, &json!({"Request": {}})).await.data();
            let mut ids: Vec<&str> = items
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["ReceiptId"].as_str().unwrap())
                .collect();
            ids.sort_unstable();
            let mut own = own.clone();
            own.sort_unstable();
            assert_eq!(ids, own, "{path}");
        }
    }
}

#[tokio::test]
async fn an_inn_has_one_owner() {
    let env = Env::start().await;
    env.account("shop-a", &[INN_A]).await;
    for (login, inns) in [
        ("shop-b", vec![INN_A]),
        ("shop-b", vec![INN_B, INN_A]),
        ("shop-a", vec![INN_C]),
    ] {
        let r = env
            .admin_post(
                "/admin/accounts",
                Some(&env.admin),
                &json!({"login": login, "password": PASSWORD, "inns": inns}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{login} {inns:?}");
        assert!(r.json()["error"].is_string());
    }
    // The refused calls left nothing behind: INN_B and INN_C are still free.
    env.account("shop-b", &[INN_B, INN_C]).await;
    let r = env.get("/admin/accounts", Some(&env.admin)).await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a.get("callbackSecret").is_none() && a.get("password").is_none()));
}

// ---- validation ------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_receipts_are_refused_and_create_nothing() {
    let env = Env::start().await;
    let (_, token) = env.tenant("shop", &[INN_A]).await;
    let items = |n: usize| -> Value {
        (0..n)
            .map(|i| json!({"Label": format!("Товар {i}"), "Price": 1, "Quantity": 1, "Amount": 1, "Vat": "VatNo"}))
            .collect()
    };
    fn with(f: impl FnOnce(&mut Value)) -> Value {
        let mut b = receipt(INN_A, "bad");
        f(&mut b);
        b
    }
    let cases: Vec<(&str, Value, i64, &str)> = vec![
        (
            "amount",
            with(|b| b["Request"]["CustomerReceipt"]["Items"][0]["Amount"] = json!(179.81)),
            1010,
            "Request.CustomerReceipt.Items[0].Amount",
        ),
        (
            "inn checksum",
            with(|b| b["Request"]["Inn"] = json!("3245001417")),
            1010,
            "Request.Inn",
        ),
        (
            "vat",
            with(|b| b["Request"]["CustomerReceipt"]["Items"][0]["Vat"] = json!("Vat33")),
            1010,
            "Request.CustomerReceipt.Items[0].Vat",
        ),
        (
            "no items",
            with(|b| b["Request"]["CustomerReceipt"]["Items"] = json!([])),
            1010,
            "Request.CustomerReceipt.Items",
        ),
        (
            "101 items",
            with(|b| b["Request"]["CustomerReceipt"]["Items"] = items(101)),
            1010,
            "Request.CustomerReceipt.Items",
        ),
        (
            "long label",
            with(|b| b["Request"]["CustomerReceipt"]["Items"][0]["Label"] = json!("Я".repeat(129))),
            1010,
            "Request.CustomerReceipt.Items[0].Label",
        ),
        (
            "unknown type",
            with(|b| b["Request"]["Type"] = json!("Refund")),
            1010,
            "Request.Type",
        ),
    ];
    for (name, body, code, field) in &cases {
        let r = env.create(&token, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{name}");
        let msg = r.failed(*code);
        assert!(msg.contains(field), "{name}: {msg}");
    }

    let r = env
        .post_raw(
            &format!("/api/kkt/cloud/receipt?AuthToken={token}"),
            Some("application/json"),
            "{\"Request\": {\"Inn\": \"3245001416\",",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let msg = r.failed(1000);
    assert!(msg.contains("JSON"), "{msg}");

    let r = env
        .post_raw(
            &format!("/api/kkt/cloud/receipt?AuthToken={token}"),
            Some("application/json"),
            vec![b' '; MAX_BODY + 1],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let msg = r.failed(1000);
    assert!(
        msg.contains(&format!("larger than {MAX_BODY} bytes")),
        "{msg}"
    );

    // Nothing was created by any of them.
    assert_eq!(env.depth(INN_A), 0);
    assert!(env.server.dispatcher.depths().iter().all(|(_, n)| *n == 0));
    let m = env.metrics().await;
    assert_eq!(sample(&m, "kkt_receipts_total{status=\"NEW\"}"), Some(0.0));
    assert_eq!(
        sample(&m, "kkt_api_refusals_total{reason=\"invalid\"}"),
        Some(cases.len() as f64 + 1.0)
    );

    // The edges are accepted: 100 items, a 128-character label (characters, not bytes).
    let mut body = receipt(INN_A, "edge-1");
    body["Request"]["CustomerReceipt"]["Items"] = items(100);
    env.create_ok(&token, &body).await;
    let mut body = receipt(INN_A, "edge-2");
    body["Request"]["CustomerReceipt"]["Items"][0]["Label"] = json!("Я".repeat(128));
    env.create_ok(&token, &body).await;
    // The server keeps serving, and "bad" is still a free InvoiceId.
    env.create_ok(&token, &receipt(INN_A, "bad")).await;
    assert_eq!(env.depth(INN_A), 3);
}

// ---- backpressure ----------------------------------------------------------------------------

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let env = Env::start_with(ApiConfig {
        max_queue: 3,
        retry_after_secs: 7,
        ..ApiConfig::default()
    })
    .await;
    let (_, token_a) = env.tenant("shop-a", &[INN_A]).await;
    let (_, token_b) = env.tenant("shop-b", &[INN_B]).await;
    let mut first = String::new();
    for i in 0..3 {
        let id = env
            .create_ok(&token_a, &receipt(INN_A, &format!("order-{i}")))
            .await;
        if i == 0 {
            first = id;
        }
    }
    assert_eq!(env.depth(INN_A), 3);

    for _ in 0..2 {
        let r = env.create(&token_a, &receipt(INN_A, "order-3")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap()),
            Some("7")
        );
        let msg = r.failed(1030);
        assert!(msg.contains(INN_A), "{msg}");
    }
    // A repeat is still told its id, not 503.
    let r = env.create(&token_a, &receipt(INN_A, "order-0")).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.headers.get(header::RETRY_AFTER).is_none());
    assert_eq!(dashed_id(&r.failed(1019)).as_deref(), Some(first.as_str()));
    // Another organisation's queue is its own.
    env.create_ok(&token_b, &receipt(INN_B, "order-0")).await;
    assert_eq!(env.depth(INN_A), 3);
    assert_eq!(env.depth(INN_B), 1);
    // Refused receipts were not written: "order-3" is unknown.
    let r = env
        .ferma(
            "/api/kkt/cloud/status",
            &token_a,
            &json!({"Request": {"InvoiceId": "order-3"}}),
        )
        .await;
    r.failed(1018);
    let m = env.metrics().await;
    assert_eq!(
        sample(&m, "kkt_api_refusals_total{reason=\"overloaded\"}"),
        Some(2.0)
    );
}

/// The queue limit must hold under concurrency too: that is when it matters. Receipts admitted
/// but not yet committed count against it (`Dispatcher::admit`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_limit_holds_under_concurrency() {
    let env = Env::start_with(ApiConfig {
        max_queue: 3,
        ..ApiConfig::default()
    })
    .await;
    let (_, token) = env.tenant("shop", &[INN_A]).await;
    let start = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let app = env.app.clone();
            let start = start.clone();
            let req = Request::post(format!("/api/kkt/cloud/receipt?AuthToken={token}"))
                .body(Body::from(
                    receipt(INN_A, &format!("burst-{i}")).to_string(),
                ))
                .unwrap();
            tokio::spawn(async move {
                start.wait().await;
                app.oneshot(req).await.unwrap().status()
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => accepted += 1,
            s => assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE),
        }
    }
    assert_eq!(accepted, 3);
    assert_eq!(env.depth(INN_A), 3);
}

// ---- status and registries -------------------------------------------------------------------

#[tokio::test]
async fn status_by_invoice_and_registries() {
    let env = Env::start().await;
    let (_, token) = env.tenant("shop", &[INN_A]).await;
    let before = now_local();
    let sent = receipt(INN_A, "order-77");
    let id = env.create_ok(&token, &sent).await;
    let after = now_local();

    // Status by InvoiceId, with or without the wrapper.
    for body in [
        json!({"Request": {"InvoiceId": "order-77"}}),
        json!({"InvoiceId": "order-77"}),
    ] {
        let data = env
            .ferma("/api/kkt/cloud/status", &token, &body)
            .await
            .data();
        assert_eq!(data["ReceiptId"], id.as_str());
        assert_eq!(data["StatusName"], "NEW");
    }
    env.ferma(
        "/api/kkt/cloud/status",
        &token,
        &json!({"Request": {"InvoiceId": "order-78"}}),
    )
    .await
    .failed(1018);
    env.ferma("/api/kkt/cloud/status", &token, &json!({"Request": {}}))
        .await
        .failed(1010);

    let mut echoed = sent["Request"].clone();
    echoed["cashboxInfoHolder"] = Value::Null;
    let check = |items: &Value, what: &str| {
        let items = items
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {items}"));
        assert_eq!(items.len(), 1, "{what}: {items:?}");
        let item = &items[0];
        assert_eq!(item["ReceiptId"], id.as_str(), "{what}");
        assert_eq!(item["InvoiceId"], "order-77", "{what}");
        assert_eq!(item["StatusCode"], 0, "{what}");
        assert_eq!(item["StatusName"], "NEW", "{what}");
        assert!(is_naive_local(item["ReceiptDateUtc"].as_str().unwrap()));
        assert_eq!(item["Receipt"], echoed, "{what}");
        assert!(item["Receipt"]
            .as_object()
            .unwrap()
            .contains_key("cashboxInfoHolder"));
    };

    // Moscow wall-clock bounds around the acceptance.
    let around = (format_local(before - 60), format_local(after + 60));
    let earlier = (format_local(before - 7200), format_local(before - 3600));
    let later = (format_local(after + 3600), format_local(after + 7200));
    // The same bounds read as UTC would be three hours off: they must not match.
    let as_if_utc = (
        format_local(before - 60 - 3 * 3600),
        format_local(after + 60 - 3 * 3600),
    );
    for (path, start, end) in [
        ("/api/kkt/cloud/list", "StartDateUtc", "EndDateUtc"),
        ("/api/kkt/cloud/list", "StartDateLocal", "EndDateLocal"),
        ("/api/kkt/cloud/list2", "StartDateLocal", "EndDateLocal"),
    ] {
        let what = format!("{path} {start}");
        let q = |(s, e): &(String, String)| json!({"Request": {start: s, end: e}});
        check(&env.ferma(path, &token, &q(&around)).await.data(), &what);
        for outside in [&earlier, &later, &as_if_utc] {
            let items = env.ferma(path, &token, &q(outside)).await.data();
            assert_eq!(items, json!([]), "{what} {outside:?}");
        }
        // Open-ended and unfiltered queries find it too.
        let open = json!({"Request": {start: around.0}});
        check(&env.ferma(path, &token, &open).await.data(), &what);
        check(
            &env.ferma(path, &token, &json!({"Request": {}}))
                .await
                .data(),
            &what,
        );
        check(
            &env.ferma(path, &token, &json!({"Request": {"ReceiptId": id}}))
                .await
                .data(),
            &what,
        );
        // Unwrapped and empty bodies are an unfiltered list.
        check(&env.ferma(path, &token, &json!({})).await.data(), &what);
        let r = env
            .post_raw(&format!("{path}?AuthToken={token}"), None, "")
            .await;
        check(&r.data(), &what);
        // End before start is a validation error naming the end.
        let r = env
            .ferma(
                path,
                &token,
                &json!({"Request": {start: around.1, end: around.0}}),
            )
            .await;
        let msg = r.failed(1010);
        assert!(msg.contains(end), "{msg}");
    }
}

// ---- metrics and OpenAPI ---------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_receipts_and_queues() {
    let env = Env::start().await;
    let (_, token) = env.tenant("shop", &[INN_A, INN_B]).await;
    let m = env.metrics().await;
    assert_eq!(sample(&m, "kkt_receipts_total{status=\"NEW\"}"), Some(0.0));
    assert!(!m.contains("kkt_queue_depth{inn="), "{m}");

    for i in 0..3 {
        env.create_ok(&token, &receipt(INN_A, &format!("a-{i}")))
            .await;
    }
    let b0 = env.create_ok(&token, &receipt(INN_B, "b-0")).await;
    env.create(&token, &receipt(INN_B, "b-0"))
        .await
        .failed(1019);

    // Metrics name every tenant's INN: a shop's token (or none) does not open them.
    assert_eq!(
        env.get("/metrics", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        env.get("/metrics", Some(&token)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = env.get("/metrics", Some(&env.admin)).await;
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = env.metrics().await;
    assert_eq!(sample(&m, "kkt_receipts_total{status=\"NEW\"}"), Some(4.0));
    assert_eq!(
        sample(&m, "kkt_receipts_total{status=\"KKT_ERROR\"}"),
        Some(0.0)
    );
    // Current statuses, from the store.
    for (status, n) in [
        ("NEW", 4.0),
        ("PROCESSED", 0.0),
        ("CONFIRMED", 0.0),
        ("KKT_ERROR", 0.0),
    ] {
        assert_eq!(
            sample(&m, &format!("kkt_receipts{{status=\"{status}\"}}")),
            Some(n),
            "{status}"
        );
    }
    assert_eq!(
        sample(&m, &format!("kkt_queue_depth{{inn=\"{INN_A}\"}}")),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, &format!("kkt_queue_depth{{inn=\"{INN_B}\"}}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "kkt_api_refusals_total{reason=\"duplicate_invoice\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&m, "kkt_agents_online"), Some(0.0));
    assert_eq!(sample(&m, "kkt_jobs_in_flight"), Some(0.0));
    assert_eq!(sample(&m, "kkt_callbacks_pending"), Some(0.0));
    assert!(env
        .server
        .store()
        .fail_job(&b0, "given up".into(), controller::unix_ms())
        .await
        .unwrap());
    let after = env.metrics().await;
    assert_eq!(sample(&after, "kkt_receipts{status=\"NEW\"}"), Some(3.0));
    assert_eq!(
        sample(&after, "kkt_receipts{status=\"KKT_ERROR\"}"),
        Some(1.0)
    );
    // Every sample line is `name[{labels}] number`, and every family is typed.
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        value.parse::<f64>().unwrap();
        let family = name.split('{').next().unwrap();
        let base = family
            .strip_suffix("_bucket")
            .or_else(|| family.strip_suffix("_sum"))
            .or_else(|| family.strip_suffix("_count"))
            .unwrap_or(family);
        assert!(m.contains(&format!("# TYPE {base} ")), "{line}");
    }
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let env = Env::start().await;
    let r = env.get("/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in ROUTES {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is missing from /openapi.json"));
        assert!(
            item.get(*method).is_some(),
            "{method} {path} is not described"
        );
    }
    // Nothing described that is not served.
    for path in paths.keys() {
        assert!(
            ROUTES.iter().any(|(p, _)| p == path),
            "{path} is described but not in ROUTES"
        );
    }
    // Every local $ref resolves.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(s)) => out.push(s),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let pointer = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
    // And each route really is served (not 404/405) by the merged router.
    for (path, method) in ROUTES {
        let uri = path
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{zn}", "0000000000000000");
        let req = match *method {
            "get" => Request::get(&uri),
            _ => Request::post(&uri),
        }
        .body(Body::empty())
        .unwrap();
        let r = env.send(req).await;
        assert!(
            r.status != StatusCode::NOT_FOUND || path.starts_with("/v1/receipts"),
            "{method} {path}: {}",
            r.status
        );
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
}

// ---- admin -----------------------------------------------------------------------------------

#[tokio::test]
async fn admin_routes_need_the_credential_and_check_inns() {
    let env = Env::start().await;
    let good = json!({"login": "shop", "password": PASSWORD, "inns": [INN_A]});
    for bearer in [None, Some("wrong"), Some("")] {
        let r = env.admin_post("/admin/accounts", bearer, &good).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bearer:?}");
        assert!(r.json()["error"].as_str().unwrap().contains("admin.secret"));
        for path in ["/admin/accounts", "/admin/queue", "/admin/kkts"] {
            let r = env.get(path, bearer).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path} {bearer:?}");
        }
    }
    // A shop's session token is not an admin credential.
    let (_, token) = env.tenant("shop", &[INN_A]).await;
    let r = env.get("/admin/queue", Some(&token)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let r = env
        .admin_post(
            "/admin/accounts",
            Some(&env.admin),
            &json!({"login": "shop-2", "password": PASSWORD, "inns": [INN_B, "3245001417"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let msg = r.json()["error"].as_str().unwrap().to_owned();
    assert!(msg.contains("inns[1]"), "{msg}");
    for bad in [
        json!({"login": "shop-2", "password": PASSWORD, "inns": []}),
        json!({"login": "", "password": PASSWORD, "inns": [INN_B]}),
        json!({"login": "shop-2", "password": "pw", "inns": [INN_B]}),
        json!({"login": "shop-2", "password": PASSWORD}),
    ] {
        let r = env
            .admin_post("/admin/accounts", Some(&env.admin), &bad)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // The refusals left INN_B free.
    env.account("shop-2", &[INN_B]).await;

    let r = env.get("/admin/queue", Some(&env.admin)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .all(|q| q["waiting"] == 0));
    for i in 0..2 {
        env.create_ok(&token, &receipt(INN_A, &format!("q-{i}")))
            .await;
    }
    let r = env.get("/admin/queue", Some(&env.admin)).await;
    let queue = r.json();
    let row = queue
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["inn"] == INN_A)
        .unwrap_or_else(|| panic!("{queue}"));
    assert_eq!(row["waiting"], 2, "{queue}");

    for path in [
        "/admin/kkts",
        "/admin/agents",
        "/admin/anomalies",
        "/admin/jobs/in-doubt",
    ] {
        let r = env.get(path, Some(&env.admin)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.json(), json!([]), "{path}");
    }
}

// ---- callbacks (real sockets) ----------------------------------------------------------------

type Received = (HeaderMap, Bytes);

/// A shop's server on 127.0.0.1:0 recording every POST to `/cb`; it answers 500 to the first
/// `fail_first` of them and 200 afterwards.
async fn shop_server(fail_first: usize) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel::<Received>();
    let failures = Arc::new(AtomicUsize::new(fail_first));
    let app = Router::new().route(
        "/cb",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            let failures = failures.clone();
            async move {
                let _ = tx.send((headers, body));
                let fail = failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if fail {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, rx)
}

/// A shop talking to the real HTTP listener of a running [`Server`].
struct Shop {
    client: reqwest::Client,
    base: String,
    token: String,
    callback_secret: String,
    /// The operator credential (metrics are an operator's).
    admin: String,
}

impl Shop {
    async fn new(env: &Env, login: &str, inns: &[&str]) -> Shop {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let base = format!("http://{}", env.server.http_addr);
        let account: Value = {
            let r = client
                .post(format!("{base}/admin/accounts"))
                .bearer_auth(&env.admin)
                .json(&json!({"login": login, "password": PASSWORD, "inns": inns}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::CREATED);
            r.json().await.unwrap()
        };
        let v: Value = client
            .post(format!("{base}/api/Authorization/CreateAuthToken"))
            .json(&json!({"Login": login, "Password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Shop {
            token: v["Data"]["AuthToken"].as_str().unwrap().to_owned(),
            callback_secret: account["callbackSecret"].as_str().unwrap().to_owned(),
            client,
            base,
            admin: env.admin.clone(),
        }
    }

    async fn call(&self, path: &str, body: &Value) -> Value {
        self.client
            .post(format!("{}{path}?AuthToken={}", self.base, self.token))
            .json(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits (by scraping /metrics, a real request each round) until `name` reads `value`.
    async fn until_metric(&self, name: &str, value: f64) {
        tokio::time::timeout(WAIT, async {
            loop {
                if sample(&self.metrics().await, name) == Some(value) {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} never reached {value}"));
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no callback arrived")
        .expect("the shop server stopped")
}

/// Checks one delivered callback; returns its body as JSON.
fn check_callback(shop: &Shop, (headers, body): &Received, id: &str, reason: &str) -> Value {
    let signature = headers["x-signature"].to_str().unwrap();
    assert_eq!(
        signature,
        format!(
            "sha256={}",
            controller::store::sign_callback(&shop.callback_secret, body)
        )
    );
    // Another key gives another signature: the header proves the sender.
    assert_ne!(
        signature,
        format!("sha256={}", controller::store::sign_callback("other", body))
    );
    assert_eq!(headers["x-receipt-id"], id);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let data: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(data["ReceiptId"], id);
    assert_eq!(data["StatusCode"], 3);
    assert_eq!(data["StatusName"], "KKT_ERROR");
    assert_eq!(data["StatusMessage"], reason);
    assert!(data["Device"].is_null());
    data
}

#[tokio::test]
async fn final_status_is_called_back_signed() {
    let env = Env::local_callbacks().await;
    let shop = Shop::new(&env, "shop", &[INN_A]).await;
    let (addr, mut rx) = shop_server(0).await;
    let mut body = receipt(INN_A, "cb-1");
    body["Request"]["CallbackUrl"] = json!(format!("http://{addr}/cb"));
    let v = shop.call("/api/kkt/cloud/receipt", &body).await;
    assert_eq!(v["Status"], "Success", "{v}");
    let id = v["Data"]["ReceiptId"].as_str().unwrap().to_owned();
    // A receipt without CallbackUrl owes nothing.
    let v = shop
        .call("/api/kkt/cloud/receipt", &receipt(INN_A, "cb-2"))
        .await;
    let quiet = v["Data"]["ReceiptId"].as_str().unwrap().to_owned();

    let reason = "ФН переполнен: чек не пробит";
    let store = env.server.store();
    assert!(store
        .fail_job(&id, reason.into(), controller::unix_ms())
        .await
        .unwrap());
    assert!(store
        .fail_job(&quiet, "no callback".into(), controller::unix_ms())
        .await
        .unwrap());
    // Failing it again changes nothing and owes no second callback.
    assert!(!store
        .fail_job(&id, "again".into(), controller::unix_ms())
        .await
        .unwrap());

    let got = next(&mut rx).await;
    let data = check_callback(&shop, &got, &id, reason);
    // The callback is the status answer's Data.
    let status = shop
        .call(
            "/api/kkt/cloud/status",
            &json!({"Request": {"ReceiptId": id}}),
        )
        .await;
    assert_eq!(status["Data"], data);

    shop.until_metric("kkt_callbacks_total{result=\"ok\"}", 1.0)
        .await;
    shop.until_metric("kkt_callbacks_pending", 0.0).await;
    assert!(store.callbacks().unwrap().is_empty());
    assert!(rx.try_recv().is_err(), "only one callback was owed");
}

#[tokio::test]
async fn failed_callback_is_retried() {
    let env = Env::local_callbacks().await;
    let shop = Shop::new(&env, "shop", &[INN_A]).await;
    let (addr, mut rx) = shop_server(1).await;
    let mut body = receipt(INN_A, "cb-retry");
    body["Request"]["CallbackUrl"] = json!(format!("http://{addr}/cb"));
    let v = shop.call("/api/kkt/cloud/receipt", &body).await;
    let id = v["Data"]["ReceiptId"].as_str().unwrap().to_owned();
    let reason = "касса недоступна";
    assert!(env
        .server
        .store()
        .fail_job(&id, reason.into(), controller::unix_ms())
        .await
        .unwrap());

    let first = next(&mut rx).await;
    let first_data = check_callback(&shop, &first, &id, reason);
    // Answered 500: the retry comes after backoff_ms(0) = 1 s.
    let second = next(&mut rx).await;
    let second_data = check_callback(&shop, &second, &id, reason);
    assert_eq!(first_data, second_data);

    shop.until_metric("kkt_callbacks_total{result=\"ok\"}", 1.0)
        .await;
    shop.until_metric("kkt_callbacks_pending", 0.0).await;
    let m = shop.metrics().await;
    assert_eq!(
        sample(&m, "kkt_callbacks_total{result=\"failed\"}"),
        Some(1.0)
    );
}

/// A shop's `CallbackUrl` must not reach into the operator's network: loopback, private and
/// link-local targets are refused at the door (1010 naming the field, nothing accepted) unless
/// the operator allowed them.
#[tokio::test]
async fn private_callback_urls_are_refused_unless_allowed() {
    let env = Env::start().await;
    let shop = Shop::new(&env, "shop", &[INN_A]).await;
    for (n, url) in [
        "http://127.0.0.1:9/cb",
        "http://localhost:8080/cb",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/cb",
        "http://[::1]/cb",
    ]
    .into_iter()
    .enumerate()
    {
        let invoice = format!("private-{n}");
        let mut body = receipt(INN_A, &invoice);
        body["Request"]["CallbackUrl"] = json!(url);
        let v = shop.call("/api/kkt/cloud/receipt", &body).await;
        assert_eq!(v["Error"]["Code"], 1010, "{url}: {v}");
        let message = v["Error"]["Message"].as_str().unwrap();
        assert!(message.starts_with("Request.CallbackUrl: "), "{message}");
        let v = shop
            .call(
                "/api/kkt/cloud/status",
                &json!({"Request": {"InvoiceId": invoice}}),
            )
            .await;
        assert_eq!(v["Error"]["Code"], 1018, "{url} was accepted: {v}");
    }
    let mut body = receipt(INN_A, "public");
    body["Request"]["CallbackUrl"] = json!("https://shop.example.ru/cb");
    let v = shop.call("/api/kkt/cloud/receipt", &body).await;
    assert_eq!(v["Status"], "Success", "{v}");

    let env = Env::local_callbacks().await;
    let shop = Shop::new(&env, "shop", &[INN_A]).await;
    let mut body = receipt(INN_A, "private-allowed");
    body["Request"]["CallbackUrl"] = json!("http://127.0.0.1:9/cb");
    let v = shop.call("/api/kkt/cloud/receipt", &body).await;
    assert_eq!(v["Status"], "Success", "{v}");
}

/// A shop server that accepts connections and never answers; counts them.
#[derive(Default)]
struct Hanging {
    open: AtomicUsize,
    most_open: AtomicUsize,
    closed: AtomicUsize,
}

async fn hanging_server() -> (SocketAddr, Arc<Hanging>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = Arc::new(Hanging::default());
    let counts = h.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
            counts.most_open.fetch_max(open, Ordering::SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                counts.open.fetch_sub(1, Ordering::SeqCst);
                counts.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, h)
}

/// One shop's server hanging (each attempt waits out the 10 s timeout) with a backlog of
/// callbacks holds at most `PER_HOST` of the sender's slots: another shop's callback, owed after
/// the whole backlog, arrives while every hanging attempt is still waiting.
#[tokio::test]
async fn a_hanging_shop_server_does_not_hold_up_other_shops_callbacks() {
    let env = Env::local_callbacks().await;
    let shop = Shop::new(&env, "shop", &[INN_A]).await;
    let (dead, hanging) = hanging_server().await;
    let (live, mut rx) = shop_server(0).await;
    let store = env.server.store();
    let owe = |invoice: String, url: String| {
        let (shop, store) = (&shop, store.clone());
        async move {
            let mut body = receipt(INN_A, &invoice);
            body["Request"]["CallbackUrl"] = json!(url);
            let v = shop.call("/api/kkt/cloud/receipt", &body).await;
            let id = v["Data"]["ReceiptId"].as_str().unwrap().to_owned();
            assert!(store
                .fail_job(&id, "касса недоступна".into(), controller::unix_ms())
                .await
                .unwrap());
            id
        }
    };
    for n in 0..2 * controller::callbacks::CONCURRENCY {
        owe(format!("dead-{n}"), format!("http://{dead}/cb")).await;
    }
    let id = owe("live".into(), format!("http://{live}/cb")).await;
    let got = next(&mut rx).await;
    assert_eq!(got.0["x-receipt-id"], id.as_str());
    assert_eq!(
        hanging.closed.load(Ordering::SeqCst),
        0,
        "the live callback waited for hanging attempts to time out"
    );
    assert!(
        hanging.most_open.load(Ordering::SeqCst) <= controller::callbacks::PER_HOST,
        "{} attempts at once to one host",
        hanging.most_open.load(Ordering::SeqCst)
    );
}

/// The body limit through hyper (the oneshot test above never touches a socket): the shop gets
/// the envelope, not a reset connection, and the server keeps serving.
#[tokio::test]
async fn oversized_body_over_real_http_is_refused_cleanly() {
    let env = Env::start().await;
    let shop = Shop::new(&env, "shop", &[INN_A]).await;
    for size in [MAX_BODY + 1, 2 * MAX_BODY] {
        let r = shop
            .client
            .post(format!(
                "{}/api/kkt/cloud/receipt?AuthToken={}",
                shop.base, shop.token
            ))
            .header("content-type", "application/json")
            .body(vec![b' '; size])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["Status"], "Failed", "{v}");
        assert_eq!(v["Error"]["Code"], 1000, "{v}");
        let msg = v["Error"]["Message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("larger than {MAX_BODY} bytes")),
            "{msg}"
        );
    }
    let v = shop
        .call("/api/kkt/cloud/receipt", &receipt(INN_A, "after"))
        .await;
    assert_eq!(v["Status"], "Success", "{v}");
    assert_eq!(env.depth(INN_A), 1);
}

// ---- the store behind its trait ----------------------------------------------------------------

/// The redb store with a disk that fails every receipt commit: the API must work against any
/// [`Ledger`], and a failed commit must never be acknowledged.
#[derive(Clone)]
struct DiskFull(controller::store::Store);

impl controller::store::Ledger for DiskFull {
    fn account(&self, id: &str) -> Result<Option<Account>, controller::store::StoreError> {
        self.0.account(id)
    }
    fn account_by_login(
        &self,
        login: &str,
    ) -> Result<Option<Account>, controller::store::StoreError> {
        self.0.account_by_login(login)
    }
    async fn create_session(
        &self,
        token_hash: [u8; 32],
        session: controller::store::Session,
    ) -> Result<(), controller::store::StoreError> {
        self.0.create_session(token_hash, session).await
    }
    fn session(
        &self,
        token_hash: &[u8; 32],
        now_ms: u64,
    ) -> Result<Option<controller::store::Session>, controller::store::StoreError> {
        self.0.session(token_hash, now_ms)
    }
    async fn create_receipt(
        &self,
        _receipt: controller::store::NewReceipt,
        _now_ms: u64,
    ) -> Result<controller::store::Created, controller::store::StoreError> {
        Err(controller::store::StoreError::Commit(
            "No space left on device".into(),
        ))
    }
    fn receipt(
        &self,
        id: &str,
    ) -> Result<Option<controller::store::ReceiptView>, controller::store::StoreError> {
        self.0.receipt(id)
    }
    fn receipt_by_invoice(
        &self,
        account: &str,
        invoice_id: &str,
    ) -> Result<Option<controller::store::ReceiptView>, controller::store::StoreError> {
        self.0.receipt_by_invoice(account, invoice_id)
    }
    fn receipts_between(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<controller::store::ReceiptView>, controller::store::StoreError> {
        self.0.receipts_between(account, from_ms, to_ms, limit)
    }
    fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
        take: &mut dyn FnMut(u64, &controller::store::Callback) -> bool,
    ) -> Result<Vec<(u64, controller::store::Callback)>, controller::store::StoreError> {
        self.0.due_callbacks(now_ms, limit, take)
    }
    fn pending_callbacks(&self) -> Result<usize, controller::store::StoreError> {
        Ok(self.0.callbacks()?.len())
    }
    fn receipt_counts(
        &self,
    ) -> Result<controller::store::ReceiptCounts, controller::store::StoreError> {
        self.0.receipt_counts()
    }
    async fn callback_delivered(&self, id: u64) -> Result<(), controller::store::StoreError> {
        self.0.callback_delivered(id).await
    }
    async fn callback_failed(
        &self,
        id: u64,
        next_at: u64,
        error: String,
    ) -> Result<(), controller::store::StoreError> {
        self.0.callback_failed(id, next_at, error).await
    }
}

#[tokio::test]
async fn a_failed_commit_is_never_acknowledged_and_the_retry_is_safe() {
    let env = Env::start().await;
    let (_, token) = env.tenant("shop", &[INN_A]).await;
    let failing = api::app(ApiState {
        store: DiskFull(env.server.store().clone()),
        dispatcher: env.server.dispatcher.clone(),
        tunnel: env.server.tunnel.clone(),
        metrics: env.server.metrics.clone(),
        config: ApiConfig::default(),
        operator: None,
    });
    let req = Request::post(format!("/api/kkt/cloud/receipt?AuthToken={token}"))
        .body(Body::from(receipt(INN_A, "inv-disk").to_string()))
        .unwrap();
    let resp = failing.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = serde_json::from_slice(
        &axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["Status"], "Failed");
    assert_eq!(body["Error"]["Code"], 1500);
    let message = body["Error"]["Message"].as_str().unwrap();
    assert!(message.contains("No space left on device"), "{message}");
    assert!(message.contains("same InvoiceId"), "{message}");
    assert_eq!(env.depth(INN_A), 0, "nothing queued for a failed commit");
    // The shop retries with the same InvoiceId once the disk is back: one receipt, no 1019.
    env.create_ok(&token, &receipt(INN_A, "inv-disk")).await;
    assert_eq!(env.depth(INN_A), 1);
}
