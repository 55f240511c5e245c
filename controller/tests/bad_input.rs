//! The bad-input suite (issue 5): every kind of malformed, hostile or misdirected input the
//! controller can be sent, over its real sockets — the HTTP listener of a running [`Server`] and
//! its QUIC tunnel — each in a test of its own. Every case checks three things:
//!
//! 1. the refusal is clear and names the problem (for JSON, the field's Ferma path, e.g.
//!    `Request.CustomerReceipt.Items[0].Amount`; for the tunnel, the close code and reason);
//! 2. the process keeps serving: a valid request right after succeeds, and the well-behaved
//!    agent's link still answers;
//! 3. nothing already accepted changed: a [`Snapshot`] taken before (an accepted receipt in
//!    flight on a register of a well-behaved agent, a queued receipt, their Ferma status, `list`
//!    and `list2`, native views, queue depths, the register's stored and live state, jobs,
//!    anomalies) equals one taken after.
//!
//! Every [`Env`] has the same accepted state: account "shop" (INN_A, INN_B) with receipt `held`
//! (INN_A) dispatched to register K1 of the good agent, which accepted (journaled) it, and receipt
//! `queued` (INN_B, no register) waiting in its queue. Register probes are switched off so that
//! nothing but the test talks to the good agent. Nothing sleeps: waits are on events, frames and
//! real requests, with [`WAIT`] as a safety net.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use controller::server::{Server, ServerConfig};
use controller::store::{Account, KktRecord, PasswordHash};
use controller::tunnel::{KktInfo, TunnelEvent};
use protocol::kkt::{
    Call, ErrorCode, Event, KktError, OfdAckEvent, OfdEndpoint, RegistrationSummary, Reply,
};
use protocol::receipt::TaxationSystem;
use protocol::tunnel::{
    encode_frame, AgentMessage, ControllerMessage, Health, JournalSummary, KktState, OutboxBody,
    MAX_FRAME,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

const INN_A: &str = "3245001416";
const INN_B: &str = "7704211201";
const INN_C: &str = "7707083893";
const PASSWORD: &str = "secret-password";
/// The good agent's register.
const K1: &str = "K1";
/// Largest body the API reads (`controller::api::MAX_BODY`).
const MAX_BODY: usize = controller::api::MAX_BODY;
/// `close_code::PROTOCOL` of the tunnel (private to the controller): the peer broke the rules.
const CLOSE_PROTOCOL: u64 = 1;

// ---- harness ---------------------------------------------------------------------------------

struct Resp {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {:?}", self.status, self.text()))
    }

    /// `Data` of a Ferma success envelope.
    fn data(&self) -> Value {
        let v = self.json();
        assert_eq!(self.status, StatusCode::OK, "{v}");
        assert_eq!(v["Status"], "Success", "{v}");
        v["Data"].clone()
    }

    /// A Ferma failure envelope with HTTP `status` and `code`; returns the message.
    fn failed(&self, status: StatusCode, code: i64) -> String {
        let v = self.json();
        assert_eq!(self.status, status, "{v}");
        assert_eq!(v["Status"], "Failed", "{v}");
        assert_eq!(v["Error"]["Code"], code, "{v}");
        assert!(v.get("Data").is_none(), "{v}");
        let msg = v["Error"]["Message"].as_str().unwrap().to_owned();
        assert!(!msg.is_empty(), "{v}");
        eprintln!("refused {status} {code}: {msg}");
        msg
    }

    /// A refusal whose message contains every one of `needles`.
    fn refused(&self, status: StatusCode, code: i64, needles: &[&str]) -> String {
        let msg = self.failed(status, code);
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in {msg:?}");
        }
        msg
    }

    /// A native-API error (`{"error": "..."}`) with `status`; returns the message.
    fn native_error(&self, status: StatusCode) -> String {
        let v = self.json();
        assert_eq!(self.status, status, "{v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_owned();
        assert!(!msg.is_empty());
        eprintln!("refused {status}: {msg}");
        msg
    }
}

/// Everything the bad input must not change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    held_native: Value,
    queued_native: Value,
    held_status: Value,
    queued_status: Value,
    list: Value,
    list2: Value,
    kkts_native: Value,
    depths: Vec<(String, usize)>,
    held_job: controller::rules::Job,
    queued_job: controller::rules::Job,
    k1_record: Option<KktRecord>,
    k1_online: Option<KktInfo>,
    anomalies: usize,
    in_doubt: usize,
}

/// A running controller with one well-behaved agent and two accepted receipts (module docs).
struct Env {
    server: Server,
    ctl: Controller,
    http: reqwest::Client,
    base: String,
    token: String,
    good: FakeAgent,
    held: String,
    queued: String,
    /// Counter for fresh InvoiceIds and heartbeat stamps.
    n: u64,
}

fn unix_secs() -> u32 {
    u32::try_from(controller::unix_ms() / 1000).unwrap()
}

/// A register the balancer takes receipts on: fiscal, registered for `inn` (common taxation),
/// shift opened a minute ago by its own clock (now), FN valid for 300 days.
fn ready_state(zn: &str, inn: &str) -> KktState {
    let now = unix_secs();
    let mut s = kkt_state(zn);
    s.device.date_time = now;
    s.fn_info.valid_until = now + 300 * 86_400;
    s.fn_info.registration = Some(RegistrationSummary {
        rnm: "0000000001012345".into(),
        user_inn: inn.into(),
        user_name: "ООО Ромашка".into(),
        taxation_systems: vec![TaxationSystem::Common],
        internet: true,
        ofd: OfdEndpoint {
            name: "ofd".into(),
            inn: "7704211201".into(),
            host: "127.0.0.1".into(),
            port: 1,
        },
    });
    s.shift.opened_at = Some(now - 60);
    s.shift.expires_at = Some(now - 60 + 86_400);
    s
}

/// Collects events until one matches `last` (included).
async fn events_until(
    rx: &mut broadcast::Receiver<TunnelEvent>,
    mut last: impl FnMut(&TunnelEvent) -> bool,
) -> Vec<TunnelEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let done = last(&e);
                    seen.push(e);
                    if done {
                        return;
                    }
                }
                Err(e) => panic!("event channel: {e} (events would be missed)"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the expected event did not come; saw {seen:?}"));
    seen
}

impl Env {
    async fn start() -> Env {
        init();
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        );
        // No status probes: only the test talks to the good agent.
        config.balancer.probe_every_ms = u64::MAX;
        config.balancer.probe_faulty_every_ms = u64::MAX;
        let server = Server::start(config).await.unwrap();
        let ctl = Controller {
            dir,
            tunnel: server.tunnel.clone(),
            store: server.store().clone(),
        };
        // The good agent: K1 attached and ready for INN_A.
        let mut events = ctl.tunnel.subscribe();
        let (_, mut good) = online_agent(&ctl, "good", K1).await;
        good.send(&AgentMessage::Status(Box::new(ready_state(K1, INN_A))))
            .await
            .unwrap();
        wait_for(
            &mut events,
            |e| matches!(e, TunnelEvent::KktStatus { kkt, .. } if kkt == K1),
        )
        .await;

        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let base = format!("http://{}", server.http_addr);
        let mut env = Env {
            server,
            ctl,
            http,
            base,
            token: String::new(),
            good,
            held: String::new(),
            queued: String::new(),
            n: 0,
        };
        env.quick_account("shop", &[INN_A, INN_B]).await;
        env.token = env.login("shop").await;

        // `held`: dispatched to K1, journaled by the good agent.
        let held = env.create_ok(&receipt(INN_A, "held-1")).await;
        let d = match env.good.recv().await.unwrap() {
            ControllerMessage::Dispatch(d) => d,
            other => panic!("expected the dispatch of {held}, got {other:?}"),
        };
        assert_eq!(
            (d.job.as_str(), d.kkt.as_str(), d.attempt),
            (held.as_str(), K1, 1)
        );
        env.good
            .send(&AgentMessage::Accepted {
                job: d.job.clone(),
                attempt: d.attempt,
            })
            .await
            .unwrap();
        wait_for(
            &mut events,
            |e| matches!(e, TunnelEvent::JobAccepted { job, .. } if *job == held),
        )
        .await;
        // `queued`: no register for INN_B, it waits.
        let queued = env.create_ok(&receipt(INN_B, "queued-1")).await;
        assert_eq!(env.server.dispatcher.depth(INN_B), 1);
        assert_eq!(env.server.dispatcher.depth(INN_A), 0);
        env.held = held;
        env.queued = queued;

        let native = env
            .native(Method::GET, &format!("/v1/receipts/{}", env.held))
            .await;
        let v = native.json();
        assert_eq!(v["jobState"], "accepted", "{v}");
        assert_eq!(v["heldBy"], K1, "{v}");
        assert_eq!(v["status"]["StatusName"], "NEW", "{v}");
        env
    }

    // -- HTTP ----------------------------------------------------------------------------------

    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = tokio::time::timeout(WAIT, r.send())
            .await
            .expect("the server did not answer in time")
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        Resp {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.unwrap().to_vec(),
        }
    }

    /// A Ferma call with `?AuthToken=` and a raw body.
    async fn ferma_raw(&self, path: &str, token: &str, body: impl Into<reqwest::Body>) -> Resp {
        self.request(
            Method::POST,
            &format!("{path}?AuthToken={token}"),
            &[("content-type", "application/json")],
            body,
        )
        .await
    }

    async fn ferma(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.ferma_raw(path, token, body.to_string()).await
    }

    async fn create(&self, body: &Value) -> Resp {
        self.ferma("/api/kkt/cloud/receipt", &self.token, body)
            .await
    }

    async fn create_raw(&self, body: impl Into<reqwest::Body>) -> Resp {
        self.ferma_raw("/api/kkt/cloud/receipt", &self.token, body)
            .await
    }

    async fn create_ok(&self, body: &Value) -> String {
        let data = self.create(body).await.data();
        data["ReceiptId"].as_str().unwrap().to_owned()
    }

    async fn native(&self, method: Method, path: &str) -> Resp {
        let bearer = format!("Bearer {}", self.token);
        self.request(method, path, &[("authorization", &bearer)], "")
            .await
    }

    /// An account straight in the store with a cheap password hash (1,000 PBKDF2 rounds).
    async fn quick_account(&self, login: &str, inns: &[&str]) {
        let account = Account {
            id: format!("acc-{}", uuid::Uuid::new_v4().simple()),
            login: login.to_owned(),
            password: PasswordHash::new(PASSWORD, 1000),
            inns: inns.iter().map(|i| (*i).to_owned()).collect(),
            callback_secret: uuid::Uuid::new_v4().simple().to_string(),
            created_at: controller::unix_ms(),
        };
        self.server
            .store()
            .create_account(account)
            .await
            .unwrap()
            .unwrap();
    }

    async fn login(&self, login: &str) -> String {
        let r = self
            .request(
                Method::POST,
                "/api/Authorization/CreateAuthToken",
                &[],
                json!({"Login": login, "Password": PASSWORD}).to_string(),
            )
            .await;
        r.data()["AuthToken"].as_str().unwrap().to_owned()
    }

    // -- the three checks ----------------------------------------------------------------------

    async fn snapshot(&self) -> Snapshot {
        let status = |id: &str| {
            let id = id.to_owned();
            async move {
                self.ferma(
                    "/api/kkt/cloud/status",
                    &self.token,
                    &json!({"Request": {"ReceiptId": id}}),
                )
                .await
                .data()
            }
        };
        let native = |id: &str| {
            let path = format!("/v1/receipts/{id}");
            async move {
                let r = self.native(Method::GET, &path).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                r.json()
            }
        };
        let kkts = self.native(Method::GET, "/v1/kkts").await;
        assert_eq!(kkts.status, StatusCode::OK);
        let mut depths = self.server.dispatcher.depths();
        depths.sort();
        let tunnel = &self.server.tunnel;
        Snapshot {
            held_native: native(&self.held).await,
            queued_native: native(&self.queued).await,
            held_status: status(&self.held).await,
            queued_status: status(&self.queued).await,
            list: self
                .ferma("/api/kkt/cloud/list", &self.token, &json!({"Request": {}}))
                .await
                .data(),
            list2: self
                .ferma("/api/kkt/cloud/list2", &self.token, &json!({"Request": {}}))
                .await
                .data(),
            kkts_native: kkts.json(),
            depths,
            held_job: tunnel.job(&self.held).unwrap().unwrap(),
            queued_job: tunnel.job(&self.queued).unwrap().unwrap(),
            k1_record: tunnel.store().kkt(K1).unwrap(),
            k1_online: tunnel.online_kkt(K1),
            anomalies: tunnel.anomalies().unwrap().len(),
            in_doubt: tunnel.jobs_in_doubt(Duration::ZERO).unwrap().len(),
        }
    }

    /// Check (c): nothing accepted changed since `before`.
    async fn unchanged(&self, before: &Snapshot, case: &str) {
        let after = self.snapshot().await;
        assert_eq!(&after, before, "{case}: accepted state changed");
        // And it is the state the Env was built with.
        assert_eq!(after.held_native["jobState"], "accepted", "{case}");
        assert_eq!(after.held_native["heldBy"], K1, "{case}");
        assert_eq!(after.held_status["StatusName"], "NEW", "{case}");
        assert_eq!(after.queued_native["jobState"], "queued", "{case}");
        assert_eq!(after.kkts_native[0]["pool"], "ready", "{case}");
        assert_eq!(after.kkts_native[0]["inFlight"], 1, "{case}");
        assert_eq!(after.anomalies, 0, "{case}");
    }

    /// Check (b): a valid request right after is served, and the good agent's link answers.
    /// The valid receipt goes to INN_B (no register), so it only queues; `before` is taken
    /// again to include it.
    async fn still_serving(&mut self, before: &mut Snapshot, case: &str) {
        self.n += 1;
        let depth = self.server.dispatcher.depth(INN_B);
        let id = self
            .create_ok(&receipt(INN_B, &format!("after-{}", self.n)))
            .await;
        let st = self
            .ferma(
                "/api/kkt/cloud/status",
                &self.token,
                &json!({"Request": {"ReceiptId": id}}),
            )
            .await
            .data();
        assert_eq!(st["StatusName"], "NEW", "{case}: {st}");
        assert_eq!(self.server.dispatcher.depth(INN_B), depth + 1, "{case}");
        self.good_agent_alive(case).await;
        *before = self.snapshot().await;
    }

    /// The good agent's link is up: a heartbeat is answered with its pong, and nothing else
    /// (no dispatch, no command) arrived meanwhile.
    async fn good_agent_alive(&mut self, case: &str) {
        self.n += 1;
        let stamp = self.n;
        self.good
            .send(&AgentMessage::Heartbeat(Health {
                sent_at_micros: stamp,
                version: "good".into(),
                ..Health::default()
            }))
            .await
            .unwrap_or_else(|e| panic!("{case}: the good agent's link is gone: {e}"));
        match self.good.recv().await {
            Ok(ControllerMessage::Pong { sent_at_micros }) => assert_eq!(sent_at_micros, stamp),
            other => panic!("{case}: the good agent expected its pong, got {other:?}"),
        }
        let online = self.server.tunnel.online_kkt(K1).expect("K1 went offline");
        assert_eq!(online.in_flight, 1, "{case}");
    }

    /// A refused request: the three checks around it.
    async fn after_refusal(&mut self, before: &mut Snapshot, case: &str) {
        self.unchanged(before, case).await;
        self.still_serving(before, case).await;
    }
}

/// A receipt with `f` applied.
fn with(f: impl FnOnce(&mut Value)) -> Value {
    let mut b = receipt(INN_A, "bad-1");
    f(&mut b);
    b
}

fn item(f: impl FnOnce(&mut Value)) -> Value {
    with(|b| f(&mut b["Request"]["CustomerReceipt"]["Items"][0]))
}

/// Runs table `cases` of receipt bodies against the create call: each must be refused with HTTP
/// 400, `code` and its field path in the message, with the three checks after each.
async fn refuse_all(env: &mut Env, cases: Vec<(&str, Value, i64, &str)>) {
    let mut before = env.snapshot().await;
    for (name, body, code, field) in cases {
        let r = env.create(&body).await;
        let msg = r.refused(StatusCode::BAD_REQUEST, code, &[field]);
        assert!(msg.starts_with(&format!("{field}: ")), "{name}: {msg}");
        env.after_refusal(&mut before, name).await;
    }
}

// ---- HTTP: malformed JSON --------------------------------------------------------------------

/// The four calls that read a JSON body with a token.
const TOKEN_CALLS: [&str; 4] = [
    "/api/kkt/cloud/receipt",
    "/api/kkt/cloud/status",
    "/api/kkt/cloud/list",
    "/api/kkt/cloud/list2",
];

/// Sends `body` to every body-reading call (login included) and expects 1000 naming the JSON
/// problem with `needles`.
async fn malformed_everywhere(env: &mut Env, case: &str, body: &[u8], needles: &[&str]) {
    let mut before = env.snapshot().await;
    for path in TOKEN_CALLS {
        let r = env.ferma_raw(path, &env.token, body.to_vec()).await;
        let msg = r.refused(StatusCode::BAD_REQUEST, 1000, needles);
        assert!(msg.contains("not valid JSON"), "{case} {path}: {msg}");
        env.after_refusal(&mut before, &format!("{case} {path}"))
            .await;
    }
    let r = env
        .request(
            Method::POST,
            "/api/Authorization/CreateAuthToken",
            &[],
            body.to_vec(),
        )
        .await;
    r.refused(StatusCode::BAD_REQUEST, 1000, needles);
    env.after_refusal(&mut before, &format!("{case} login"))
        .await;
}

#[tokio::test]
async fn truncated_json_is_refused_naming_where_it_ends() {
    let mut env = Env::start().await;
    let full = receipt(INN_A, "cut").to_string();
    for cut in [1, full.len() / 3, full.len() / 2, full.len() - 1] {
        let body = &full.as_bytes()[..cut];
        malformed_everywhere(
            &mut env,
            &format!("cut at {cut}"),
            body,
            &["EOF while parsing", "line 1 column"],
        )
        .await;
    }
}

#[tokio::test]
async fn trailing_garbage_after_the_json_is_refused() {
    let mut env = Env::start().await;
    let good = receipt(INN_A, "trailing").to_string();
    for tail in ["}", " x", "{\"Request\":{}}", "\0", ",", "\u{feff}"] {
        let body = format!("{good}{tail}");
        malformed_everywhere(
            &mut env,
            &format!("tail {tail:?}"),
            body.as_bytes(),
            &["trailing characters"],
        )
        .await;
    }
    // Nothing was created under that InvoiceId.
    let r = env
        .ferma(
            "/api/kkt/cloud/status",
            &env.token,
            &json!({"Request": {"InvoiceId": "trailing"}}),
        )
        .await;
    r.refused(StatusCode::NOT_FOUND, 1018, &["InvoiceId trailing"]);
}

#[tokio::test]
async fn a_body_that_is_not_an_object_is_refused() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    // The body itself.
    for (body, got) in [
        ("[]", "an array"),
        ("[{\"Request\":{}}]", "an array"),
        ("\"Request\"", "a string"),
        ("42", "a number"),
        ("true", "true/false"),
        ("null", "null"),
    ] {
        for path in TOKEN_CALLS {
            let r = env.ferma_raw(path, &env.token, body).await;
            r.refused(
                StatusCode::BAD_REQUEST,
                1000,
                &["must be a JSON object", got],
            );
            env.after_refusal(&mut before, &format!("{body} to {path}"))
                .await;
        }
    }
    // The wrapper and the receipt's objects.
    for (name, body, field) in [
        ("Request array", json!({"Request": [1]}), "Request"),
        ("Request string", json!({"Request": "x"}), "Request"),
        (
            "CustomerReceipt string",
            with(|b| b["Request"]["CustomerReceipt"] = json!("receipt")),
            "Request.CustomerReceipt",
        ),
        (
            "CustomerReceipt array",
            with(|b| b["Request"]["CustomerReceipt"] = json!([])),
            "Request.CustomerReceipt",
        ),
        (
            "item a number",
            with(|b| b["Request"]["CustomerReceipt"]["Items"] = json!([1])),
            "Request.CustomerReceipt.Items[0]",
        ),
        (
            "ClientInfo string",
            with(|b| b["Request"]["CustomerReceipt"]["ClientInfo"] = json!("Иванов")),
            "Request.CustomerReceipt.ClientInfo",
        ),
    ] {
        let r = env.create(&body).await;
        let msg = r.refused(
            StatusCode::BAD_REQUEST,
            1000,
            &[field, "must be a JSON object"],
        );
        assert!(msg.starts_with(&format!("{field}: ")), "{name}: {msg}");
        env.after_refusal(&mut before, name).await;
    }
}

#[tokio::test]
async fn invalid_utf8_is_refused() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let good = receipt(INN_A, "utf8").to_string();
    let label = "Молоко 3,2%";
    let at = good.find(label).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // Inside a string: a lone continuation byte, a truncated sequence, an overlong '/'.
        (
            "lone 0xff in a label",
            [&good.as_bytes()[..at], b"\xff", &good.as_bytes()[at..]].concat(),
            "invalid unicode code point",
        ),
        (
            "truncated sequence",
            [&good.as_bytes()[..at], b"\xd0", &good.as_bytes()[at + 2..]].concat(),
            "invalid unicode code point",
        ),
        (
            "overlong encoding",
            [&good.as_bytes()[..at], b"\xc0\xaf", &good.as_bytes()[at..]].concat(),
            "invalid unicode code point",
        ),
        // A lone surrogate escape is not a character either.
        (
            "lone surrogate",
            good.replace(label, "\\ud800").into_bytes(),
            "escape",
        ),
        (
            "lone trailing surrogate",
            good.replace(label, "\\udc00x").into_bytes(),
            "escape",
        ),
        // Outside a string.
        (
            "latin-1 body",
            b"{\"Request\"\xa0: {}}".to_vec(),
            "line 1 column",
        ),
        // UTF-16 (what some Windows clients send by mistake).
        (
            "utf-16",
            good.encode_utf16().flat_map(u16::to_le_bytes).collect(),
            "line 1 column",
        ),
    ];
    for (name, body, needle) in cases {
        let r = env.create_raw(body).await;
        let msg = r.refused(StatusCode::BAD_REQUEST, 1000, &["not valid JSON", needle]);
        assert!(msg.contains("UTF-8"), "{name}: {msg}");
        env.after_refusal(&mut before, name).await;
    }
    // The BOM some Windows clients prepend is forgiven: that receipt is accepted.
    let mut body = b"\xef\xbb\xbf".to_vec();
    body.extend_from_slice(receipt(INN_B, "bom").to_string().as_bytes());
    env.create_raw(body).await.data();
}

// ---- HTTP: wrong types -----------------------------------------------------------------------

#[tokio::test]
async fn wrong_json_types_are_refused_naming_the_field() {
    let mut env = Env::start().await;
    let cases: Vec<(&str, Value, i64, &str)> = vec![
        // The ones the issue names.
        (
            "Inn array",
            with(|b| b["Request"]["Inn"] = json!([INN_A])),
            1000,
            "Request.Inn",
        ),
        (
            "Items object",
            with(|b| b["Request"]["CustomerReceipt"]["Items"] = json!({"0": {}})),
            1000,
            "Request.CustomerReceipt.Items",
        ),
        (
            "Price abc",
            item(|i| i["Price"] = json!("abc")),
            1010,
            "Request.CustomerReceipt.Items[0].Price",
        ),
        (
            "Quantity negative",
            item(|i| i["Quantity"] = json!(-2)),
            1010,
            "Request.CustomerReceipt.Items[0].Quantity",
        ),
        // Every other important field.
        (
            "Inn object",
            with(|b| b["Request"]["Inn"] = json!({"v": INN_A})),
            1000,
            "Request.Inn",
        ),
        (
            "Inn bool",
            with(|b| b["Request"]["Inn"] = json!(true)),
            1000,
            "Request.Inn",
        ),
        (
            "Type number out of names",
            with(|b| b["Request"]["Type"] = json!(["Income"])),
            1000,
            "Request.Type",
        ),
        (
            "InvoiceId object",
            with(|b| b["Request"]["InvoiceId"] = json!({})),
            1000,
            "Request.InvoiceId",
        ),
        (
            "InvoiceId bool",
            with(|b| b["Request"]["InvoiceId"] = json!(false)),
            1000,
            "Request.InvoiceId",
        ),
        (
            "CallbackUrl array",
            with(|b| b["Request"]["CallbackUrl"] = json!(["http://x"])),
            1000,
            "Request.CallbackUrl",
        ),
        (
            "CallbackUrl number",
            with(|b| b["Request"]["CallbackUrl"] = json!(5)),
            1010,
            "Request.CallbackUrl",
        ),
        (
            "LocalDate object",
            with(|b| b["Request"]["LocalDate"] = json!({})),
            1000,
            "Request.LocalDate",
        ),
        (
            "TaxationSystem array",
            with(|b| b["Request"]["CustomerReceipt"]["TaxationSystem"] = json!([0])),
            1000,
            "Request.CustomerReceipt.TaxationSystem",
        ),
        (
            "Email number",
            with(|b| b["Request"]["CustomerReceipt"]["Email"] = json!(12)),
            1010,
            "Request.CustomerReceipt.Email",
        ),
        (
            "Phone object",
            with(|b| b["Request"]["CustomerReceipt"]["Phone"] = json!({})),
            1000,
            "Request.CustomerReceipt.Phone",
        ),
        (
            "Label array",
            item(|i| i["Label"] = json!(["a"])),
            1000,
            "Request.CustomerReceipt.Items[0].Label",
        ),
        (
            "Price object",
            item(|i| i["Price"] = json!({"rub": 1})),
            1000,
            "Request.CustomerReceipt.Items[0].Price",
        ),
        (
            "Price bool",
            item(|i| i["Price"] = json!(true)),
            1000,
            "Request.CustomerReceipt.Items[0].Price",
        ),
        (
            "Price negative",
            item(|i| i["Price"] = json!(-89.9)),
            1010,
            "Request.CustomerReceipt.Items[0].Price",
        ),
        (
            "Price 1e400",
            item(|i| i["Price"] = json!("1e400")),
            1010,
            "Request.CustomerReceipt.Items[0].Price",
        ),
        (
            "Price too precise",
            item(|i| i["Price"] = json!(89.901)),
            1010,
            "Request.CustomerReceipt.Items[0].Price",
        ),
        (
            "Quantity string",
            item(|i| i["Quantity"] = json!("two")),
            1010,
            "Request.CustomerReceipt.Items[0].Quantity",
        ),
        (
            "Quantity array",
            item(|i| i["Quantity"] = json!([2])),
            1000,
            "Request.CustomerReceipt.Items[0].Quantity",
        ),
        (
            "Quantity zero",
            item(|i| {
                i["Quantity"] = json!(0);
                i["Amount"] = json!(0)
            }),
            1010,
            "Request.CustomerReceipt.Items[0].Quantity",
        ),
        (
            "Amount string",
            item(|i| i["Amount"] = json!("lots")),
            1010,
            "Request.CustomerReceipt.Items[0].Amount",
        ),
        (
            "Amount negative",
            item(|i| i["Amount"] = json!(-179.8)),
            1010,
            "Request.CustomerReceipt.Items[0].Amount",
        ),
        (
            "Vat number",
            item(|i| i["Vat"] = json!(10)),
            1010,
            "Request.CustomerReceipt.Items[0].Vat",
        ),
        (
            "Vat object",
            item(|i| i["Vat"] = json!({})),
            1000,
            "Request.CustomerReceipt.Items[0].Vat",
        ),
        (
            "Measure array",
            item(|i| i["Measure"] = json!([])),
            1000,
            "Request.CustomerReceipt.Items[0].Measure",
        ),
        (
            "PaymentMethod string",
            item(|i| i["PaymentMethod"] = json!("full")),
            1010,
            "Request.CustomerReceipt.Items[0].PaymentMethod",
        ),
        (
            "PaymentItems object",
            with(|b| b["Request"]["CustomerReceipt"]["PaymentItems"] = json!({"Sum": 1})),
            1000,
            "Request.CustomerReceipt.PaymentItems",
        ),
        (
            "PaymentItems Sum array",
            with(|b| {
                b["Request"]["CustomerReceipt"]["PaymentItems"] =
                    json!([{"PaymentType": 1, "Sum": [179.8]}])
            }),
            1000,
            "Request.CustomerReceipt.PaymentItems[0].Sum",
        ),
        (
            "PaymentItems PaymentType string",
            with(|b| {
                b["Request"]["CustomerReceipt"]["PaymentItems"] =
                    json!([{"PaymentType": "card", "Sum": 179.8}])
            }),
            1010,
            "Request.CustomerReceipt.PaymentItems[0].PaymentType",
        ),
        (
            "ClientInfo Inn array",
            with(|b| {
                b["Request"]["CustomerReceipt"]["ClientInfo"] =
                    json!({"Name": "Иванов", "Inn": [1]})
            }),
            1000,
            "Request.CustomerReceipt.ClientInfo.Inn",
        ),
        // Missing required fields are named too.
        (
            "no Inn",
            with(|b| {
                b["Request"].as_object_mut().unwrap().remove("Inn");
            }),
            1010,
            "Request.Inn",
        ),
        (
            "no Price",
            item(|i| {
                i.as_object_mut().unwrap().remove("Price");
            }),
            1010,
            "Request.CustomerReceipt.Items[0].Price",
        ),
        (
            "no CustomerReceipt",
            with(|b| {
                b["Request"]
                    .as_object_mut()
                    .unwrap()
                    .remove("CustomerReceipt");
            }),
            1010,
            "Request.CustomerReceipt",
        ),
    ];
    refuse_all(&mut env, cases).await;
}

// ---- HTTP: huge and deep bodies --------------------------------------------------------------

#[tokio::test]
async fn a_body_over_the_limit_is_refused_on_every_call() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    // A receipt that would be valid but for its size (whitespace padding inside the JSON).
    let pad = |body: String, size: usize| -> Vec<u8> {
        let mut b = body.into_bytes();
        let close = b.pop().unwrap();
        b.resize(size - 1, b' ');
        b.push(close);
        b
    };
    for size in [MAX_BODY + 1, 4 * MAX_BODY] {
        for path in TOKEN_CALLS {
            let body = pad(receipt(INN_A, "huge").to_string(), size);
            assert_eq!(body.len(), size);
            let r = env.ferma_raw(path, &env.token, body).await;
            r.refused(
                StatusCode::BAD_REQUEST,
                1000,
                &[&format!("larger than {MAX_BODY} bytes")],
            );
            env.after_refusal(&mut before, &format!("{size} bytes to {path}"))
                .await;
        }
        let r = env
            .request(
                Method::POST,
                "/api/Authorization/CreateAuthToken",
                &[],
                pad(
                    json!({"Login": "shop", "Password": PASSWORD}).to_string(),
                    size,
                ),
            )
            .await;
        r.refused(StatusCode::BAD_REQUEST, 1000, &["larger than"]);
        env.after_refusal(&mut before, "huge login").await;
    }
    // Exactly the limit is read (and this one is a valid receipt).
    let body = pad(receipt(INN_B, "at-the-limit").to_string(), MAX_BODY);
    env.create_raw(body).await.data();
    before = env.snapshot().await;

    // Without a Content-Length (chunked), the limit holds as the bytes arrive.
    let mut tcp = tokio::net::TcpStream::connect(env.server.http_addr)
        .await
        .unwrap();
    let head = format!(
        "POST /api/kkt/cloud/receipt?AuthToken={} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        env.token
    );
    let body = pad(receipt(INN_A, "chunked").to_string(), 2 * MAX_BODY);
    let (mut rd, mut wr) = tcp.split();
    let write = async {
        wr.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(16 * 1024) {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            wr.write_all(chunk).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await
    };
    let read = async {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the JSON envelope is complete (the server closes or keeps the connection).
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if answer.ends_with(b"}}") {
                break;
            }
        }
        answer
    };
    let (_, answer) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("no answer to the chunked body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"Code\":1000"), "{answer}");
    assert!(
        answer.contains(&format!("larger than {MAX_BODY} bytes")),
        "{answer}"
    );
    env.after_refusal(&mut before, "chunked").await;
}

#[tokio::test]
async fn deeply_nested_json_is_refused_without_exhausting_the_stack() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    const DEPTH: usize = 100_000;
    let arrays = "[".repeat(DEPTH);
    let closed = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let objects = "{\"a\":".repeat(DEPTH);
    let inside = format!(
        "{{\"Request\":{{\"Inn\":\"{INN_A}\",\"CustomerReceipt\":{{\"Items\":{closed}}}}}}}"
    );
    for (name, body) in [
        ("100k '['", arrays),
        ("100k balanced []", closed.clone()),
        ("100k {\"a\":", objects),
        ("100k [] inside Items", inside),
    ] {
        assert!(body.len() < MAX_BODY, "{name} must pass the size limit");
        for path in TOKEN_CALLS {
            let r = env.ferma_raw(path, &env.token, body.clone()).await;
            r.refused(
                StatusCode::BAD_REQUEST,
                1000,
                &["not valid JSON", "recursion limit exceeded"],
            );
            env.after_refusal(&mut before, &format!("{name} to {path}"))
                .await;
        }
        let r = env
            .request(
                Method::POST,
                "/api/Authorization/CreateAuthToken",
                &[],
                body.clone(),
            )
            .await;
        r.refused(StatusCode::BAD_REQUEST, 1000, &["recursion limit exceeded"]);
        env.after_refusal(&mut before, &format!("{name} login"))
            .await;
    }
}

// ---- HTTP: values ----------------------------------------------------------------------------

#[tokio::test]
async fn unknown_enum_values_are_refused_listing_the_allowed_ones() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "Type",
            with(|b| b["Request"]["Type"] = json!("Refund")),
            "Request.Type",
            "IncomeReturn",
        ),
        (
            "Type 99",
            with(|b| b["Request"]["Type"] = json!(99)),
            "Request.Type",
            "Income",
        ),
        (
            "Vat",
            item(|i| i["Vat"] = json!("Vat99")),
            "Request.CustomerReceipt.Items[0].Vat",
            "Vat20",
        ),
        (
            "Vat empty",
            item(|i| i["Vat"] = json!("")),
            "Request.CustomerReceipt.Items[0].Vat",
            "VatNo",
        ),
        (
            "TaxationSystem",
            with(|b| b["Request"]["CustomerReceipt"]["TaxationSystem"] = json!("Barter")),
            "Request.CustomerReceipt.TaxationSystem",
            "Common",
        ),
        (
            "TaxationSystem 99",
            with(|b| b["Request"]["CustomerReceipt"]["TaxationSystem"] = json!(99)),
            "Request.CustomerReceipt.TaxationSystem",
            "0..5",
        ),
        (
            "Measure",
            item(|i| i["Measure"] = json!("FURLONG")),
            "Request.CustomerReceipt.Items[0].Measure",
            "PIECE",
        ),
        (
            "Measure 99",
            item(|i| i["Measure"] = json!(99)),
            "Request.CustomerReceipt.Items[0].Measure",
            "PIECE",
        ),
        (
            "PaymentMethod 99",
            item(|i| i["PaymentMethod"] = json!(99)),
            "Request.CustomerReceipt.Items[0].PaymentMethod",
            "1..7",
        ),
        (
            "PaymentMethod 0",
            item(|i| i["PaymentMethod"] = json!(0)),
            "Request.CustomerReceipt.Items[0].PaymentMethod",
            "1..7",
        ),
        (
            "PaymentType 99",
            item(|i| i["PaymentType"] = json!(99)),
            "Request.CustomerReceipt.Items[0].PaymentType",
            "1..=33",
        ),
        (
            "PaymentItems PaymentType 9",
            with(|b| {
                b["Request"]["CustomerReceipt"]["PaymentItems"] =
                    json!([{"PaymentType": 9, "Sum": 179.8}])
            }),
            "Request.CustomerReceipt.PaymentItems[0].PaymentType",
            "0..4",
        ),
        (
            "CorrectionInfo Type",
            with(|b| {
                b["Request"]["Type"] = json!("IncomeCorrection");
                b["Request"]["CustomerReceipt"]["CorrectionInfo"] =
                    json!({"Type": "SOMETIMES", "Description": "x", "ReceiptDate": "01.12.26"});
            }),
            "Request.CustomerReceipt.CorrectionInfo.Type",
            "SELF or INSTRUCTION",
        ),
    ];
    for (name, body, field, allowed) in cases {
        let r = env.create(&body).await;
        let msg = r.refused(StatusCode::BAD_REQUEST, 1010, &[field, allowed]);
        assert!(msg.starts_with(&format!("{field}: ")), "{name}: {msg}");
        env.after_refusal(&mut before, name).await;
    }
}

#[tokio::test]
async fn an_invalid_inn_is_refused() {
    let mut env = Env::start().await;
    let cases: Vec<(&str, Value, i64, &str)> = vec![
        (
            "checksum",
            with(|b| b["Request"]["Inn"] = json!("3245001417")),
            1010,
            "Request.Inn",
        ),
        (
            "12-digit checksum",
            with(|b| b["Request"]["Inn"] = json!("500100732258")),
            1010,
            "Request.Inn",
        ),
        (
            "11 digits",
            with(|b| b["Request"]["Inn"] = json!("32450014160")),
            1010,
            "Request.Inn",
        ),
        (
            "letters",
            with(|b| b["Request"]["Inn"] = json!("32450O1416")),
            1010,
            "Request.Inn",
        ),
        (
            "empty",
            with(|b| b["Request"]["Inn"] = json!("")),
            1010,
            "Request.Inn",
        ),
        (
            "as a number",
            with(|b| b["Request"]["Inn"] = json!(3245001417_u64)),
            1010,
            "Request.Inn",
        ),
        (
            "buyer's",
            with(|b| {
                b["Request"]["CustomerReceipt"]["ClientInfo"] =
                    json!({"Name": "ООО Покупатель", "Inn": "7707083894"})
            }),
            1010,
            "Request.CustomerReceipt.ClientInfo.Inn",
        ),
        (
            "cashier's",
            with(|b| b["Request"]["Cashier"] = json!({"Name": "Кассир", "Inn": "500100732258"})),
            1010,
            "Request.Cashier.Inn",
        ),
    ];
    for (_, body, _, _) in &cases {
        // The seller's INN is checked before ownership: never 1020 for a malformed INN.
        assert!(body["Request"]["Inn"] != json!(INN_C));
    }
    refuse_all(&mut env, cases).await;
}

#[tokio::test]
async fn amount_not_price_times_quantity_is_refused() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    for (name, body, got, expected) in [
        (
            "a kopeck more",
            item(|i| i["Amount"] = json!(179.81)),
            "179.81",
            "179.80",
        ),
        (
            "a kopeck less",
            item(|i| i["Amount"] = json!(179.79)),
            "179.79",
            "179.80",
        ),
        (
            "as strings",
            item(|i| {
                i["Price"] = json!("10.00");
                i["Quantity"] = json!("1.5");
                i["Amount"] = json!("16")
            }),
            "16.00",
            "15.00",
        ),
        ("zero", item(|i| i["Amount"] = json!(0)), "0.00", "179.80"),
    ] {
        let r = env.create(&body).await;
        let field = "Request.CustomerReceipt.Items[0].Amount";
        let msg = r.refused(StatusCode::BAD_REQUEST, 1010, &[field, got, expected]);
        assert!(msg.starts_with(&format!("{field}: ")), "{name}: {msg}");
        env.after_refusal(&mut before, name).await;
    }
    // On the third item of three, the path says so.
    let mut body = receipt(INN_A, "third");
    let line = json!({"Label": "x", "Price": 1, "Quantity": 1, "Amount": 1, "Vat": "VatNo"});
    let mut bad = line.clone();
    bad["Amount"] = json!(2);
    body["Request"]["CustomerReceipt"]["Items"] = json!([line.clone(), line, bad]);
    let r = env.create(&body).await;
    r.refused(
        StatusCode::BAD_REQUEST,
        1010,
        &["Request.CustomerReceipt.Items[2].Amount"],
    );
    env.after_refusal(&mut before, "third item").await;
    // Payments that do not add up to the items are named too.
    let body = with(|b| {
        b["Request"]["CustomerReceipt"]["PaymentItems"] = json!([{"PaymentType": 1, "Sum": 100}])
    });
    let r = env.create(&body).await;
    r.refused(
        StatusCode::BAD_REQUEST,
        1010,
        &["Request.CustomerReceipt.PaymentItems", "100.00", "179.80"],
    );
    env.after_refusal(&mut before, "payments").await;
}

#[tokio::test]
async fn a_too_long_label_is_refused() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    for (name, label, len) in [
        ("129 Cyrillic", "Я".repeat(129), 129),
        ("129 ASCII", "x".repeat(129), 129),
        ("100k characters", "Ж".repeat(100_000), 100_000),
    ] {
        let r = env.create(&item(|i| i["Label"] = json!(label))).await;
        let field = "Request.CustomerReceipt.Items[0].Label";
        let msg = r.refused(
            StatusCode::BAD_REQUEST,
            1010,
            &[field, &format!("is {len} characters long"), "at most 128"],
        );
        assert!(
            msg.len() < 1000,
            "the message does not echo the label: {msg}"
        );
        env.after_refusal(&mut before, name).await;
    }
    // Other texts with limits.
    for (name, body, field) in [
        (
            "InvoiceId",
            with(|b| b["Request"]["InvoiceId"] = json!("i".repeat(129))),
            "Request.InvoiceId",
        ),
        (
            "Cashier name",
            with(|b| b["Request"]["Cashier"] = json!({"Name": "к".repeat(257)})),
            "Request.Cashier.Name",
        ),
        (
            "BillAddress",
            with(|b| b["Request"]["CustomerReceipt"]["BillAddress"] = json!("a".repeat(257))),
            "Request.CustomerReceipt.BillAddress",
        ),
        (
            "CallbackUrl",
            with(|b| {
                b["Request"]["CallbackUrl"] = json!(format!("https://x/{}", "p".repeat(2100)))
            }),
            "Request.CallbackUrl",
        ),
    ] {
        let r = env.create(&body).await;
        r.refused(StatusCode::BAD_REQUEST, 1010, &[field, "characters long"]);
        env.after_refusal(&mut before, name).await;
    }
}

#[tokio::test]
async fn thousands_of_items_are_refused() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let line =
        json!({"Label": "Гвоздь", "Price": 0.5, "Quantity": 1, "Amount": 0.5, "Vat": "Vat20"});
    for n in [101, 5_000] {
        let mut body = receipt(INN_A, &format!("items-{n}"));
        body["Request"]["CustomerReceipt"]["Items"] = Value::Array(vec![line.clone(); n]);
        let text = body.to_string();
        assert!(text.len() < MAX_BODY, "{n} items must pass the size limit");
        let r = env.create_raw(text).await;
        r.refused(
            StatusCode::BAD_REQUEST,
            1010,
            &[
                "Request.CustomerReceipt.Items: ",
                &format!("has {n} entries; at most 100"),
                "split the order",
            ],
        );
        env.after_refusal(&mut before, &format!("{n} items")).await;
    }
    // 100 is the limit and is accepted.
    let mut body = receipt(INN_B, "items-100");
    body["Request"]["CustomerReceipt"]["Items"] = Value::Array(vec![line; 100]);
    env.create_ok(&body).await;
}

// ---- HTTP: tokens ----------------------------------------------------------------------------

#[tokio::test]
async fn another_accounts_token_sees_and_sends_nothing_of_this_one() {
    let mut env = Env::start().await;
    env.quick_account("other", &[INN_C]).await;
    let other = env.login("other").await;
    let mut before = env.snapshot().await;
    let held = env.held.clone();

    // status by ReceiptId and by InvoiceId: "not found", exactly as for an id that exists nowhere.
    let nowhere = uuid::Uuid::new_v4().to_string();
    for (body, what) in [
        (
            json!({"Request": {"ReceiptId": held}}),
            format!("ReceiptId {held}"),
        ),
        (
            json!({"Request": {"InvoiceId": "held-1"}}),
            "InvoiceId held-1".to_owned(),
        ),
    ] {
        let r = env.ferma("/api/kkt/cloud/status", &other, &body).await;
        let msg = r.refused(StatusCode::NOT_FOUND, 1018, &[&what, "in this account"]);
        let r = env
            .ferma(
                "/api/kkt/cloud/status",
                &other,
                &json!({"Request": {"ReceiptId": nowhere}}),
            )
            .await;
        if what.starts_with("ReceiptId") {
            assert_eq!(
                r.failed(StatusCode::NOT_FOUND, 1018)
                    .replace(&nowhere, &held),
                msg
            );
        }
        env.after_refusal(&mut before, &format!("status {what}"))
            .await;
    }
    // list / list2: by id "not found"; unfiltered, only the other account's own (none).
    for path in ["/api/kkt/cloud/list", "/api/kkt/cloud/list2"] {
        let r = env
            .ferma(path, &other, &json!({"Request": {"ReceiptId": held}}))
            .await;
        r.refused(StatusCode::NOT_FOUND, 1018, &[&held]);
        env.after_refusal(&mut before, path).await;
        for body in [
            json!({"Request": {}}),
            json!({"Request": {"StartDateLocal": "2000-01-01T00:00:00", "EndDateLocal": "2100-01-01T00:00:00"}}),
        ] {
            let data = env.ferma(path, &other, &body).await.data();
            assert_eq!(data, json!([]), "{path}");
        }
        env.after_refusal(&mut before, path).await;
    }
    // create for this account's INN: 1020 naming Request.Inn, even with an InvoiceId this
    // account used (no 1019: that would tell the other account the InvoiceId exists).
    for invoice in ["held-1", "fresh"] {
        let r = env
            .ferma("/api/kkt/cloud/receipt", &other, &receipt(INN_A, invoice))
            .await;
        let msg = r.refused(StatusCode::FORBIDDEN, 1020, &["Request.Inn", INN_A]);
        assert!(!msg.contains(&held), "{msg}");
        env.after_refusal(&mut before, &format!("create {invoice}"))
            .await;
    }
    // The native views: the receipt is not found, the register is not listed.
    let bearer = format!("Bearer {other}");
    let r = env
        .request(
            Method::GET,
            &format!("/v1/receipts/{held}"),
            &[("authorization", &bearer)],
            "",
        )
        .await;
    r.native_error(StatusCode::NOT_FOUND);
    let r = env
        .request(Method::GET, "/v1/kkts", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!([]));
    env.after_refusal(&mut before, "native").await;
    // The other account itself is served normally.
    let r = env
        .ferma("/api/kkt/cloud/receipt", &other, &receipt(INN_C, "held-1"))
        .await;
    r.data();
}

#[tokio::test]
async fn a_missing_or_garbage_auth_token_is_refused() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let admin = std::fs::read_to_string(
        env.ctl
            .dir
            .path()
            .join(controller::admin::ADMIN_SECRET_FILE),
    )
    .unwrap();
    let long = "a".repeat(4096);
    let queries: Vec<(&str, String, &str)> = vec![
        ("no query", String::new(), "AuthToken is missing"),
        ("empty", "?AuthToken=".into(), "AuthToken is missing"),
        ("blank", "?AuthToken=%20%20".into(), "AuthToken is missing"),
        (
            "other parameter",
            "?Token=abc".into(),
            "AuthToken is missing",
        ),
        (
            "garbage",
            "?AuthToken=not-a-token".into(),
            "expired or unknown",
        ),
        (
            "invalid percent-encoding",
            "?AuthToken=%ff%fe%zz".into(),
            "expired or unknown",
        ),
        ("4 KiB", format!("?AuthToken={long}"), "expired or unknown"),
        (
            "sql",
            "?AuthToken=%27%20OR%201%3D1%20--".into(),
            "expired or unknown",
        ),
        (
            "the operator's secret",
            format!("?AuthToken={}", admin.trim()),
            "expired or unknown",
        ),
        (
            "repeated",
            format!("?AuthToken=x&AuthToken={}", "y"),
            "expired or unknown",
        ),
    ];
    for (name, query, needle) in &queries {
        for path in TOKEN_CALLS {
            let body = match path {
                "/api/kkt/cloud/receipt" => receipt(INN_A, "tokenless"),
                "/api/kkt/cloud/status" => json!({"Request": {"ReceiptId": env.held}}),
                _ => json!({"Request": {}}),
            };
            let r = env
                .request(
                    Method::POST,
                    &format!("{path}{query}"),
                    &[("content-type", "application/json")],
                    body.to_string(),
                )
                .await;
            r.refused(StatusCode::UNAUTHORIZED, 1001, &[needle, "CreateAuthToken"]);
            env.after_refusal(&mut before, &format!("{name} on {path}"))
                .await;
        }
    }
    // The native API: the same token as a bearer header.
    let held_path = format!("/v1/receipts/{}", env.held);
    for (name, header) in [
        ("none", None),
        ("garbage", Some("Bearer not-a-token".to_owned())),
        ("not bearer", Some(format!("Basic {}", env.token))),
        ("empty bearer", Some("Bearer ".to_owned())),
        ("lowercase scheme", Some(format!("bearer{}", env.token))),
    ] {
        for path in [held_path.as_str(), "/v1/kkts"] {
            let headers: Vec<(&str, &str)> = header
                .as_deref()
                .map(|h| vec![("authorization", h)])
                .unwrap_or_default();
            let r = env.request(Method::GET, path, &headers, "").await;
            let msg = r.native_error(StatusCode::UNAUTHORIZED);
            assert!(msg.contains("Authorization: Bearer"), "{name}: {msg}");
        }
        env.after_refusal(&mut before, &format!("native {name}"))
            .await;
    }
    // A header value that is not text at all.
    let r = env
        .http
        .get(format!("{}/v1/kkts", env.base))
        .header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    env.after_refusal(&mut before, "binary header").await;
}

// ---- HTTP: routing ---------------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_http_method_is_refused_naming_the_allowed_one() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let held = format!("/v1/receipts/{}", env.held);
    let cases: Vec<(Method, &str, &str)> = vec![
        (Method::GET, "/api/kkt/cloud/receipt", "POST"),
        (Method::PUT, "/api/kkt/cloud/receipt", "POST"),
        (Method::DELETE, "/api/kkt/cloud/receipt", "POST"),
        (Method::PATCH, "/api/kkt/cloud/status", "POST"),
        (Method::GET, "/api/kkt/cloud/list2", "POST"),
        (Method::GET, "/api/Authorization/CreateAuthToken", "POST"),
        (Method::POST, "/v1/kkts", "GET"),
        (Method::DELETE, held.as_str(), "GET"),
        (Method::PUT, "/metrics", "GET"),
    ];
    for (method, path, allowed) in cases {
        let uri = if path.starts_with("/api/kkt") {
            format!("{path}?AuthToken={}", env.token)
        } else {
            path.to_owned()
        };
        let bearer = format!("Bearer {}", env.token);
        let r = env
            .request(
                method.clone(),
                &uri,
                &[
                    ("authorization", &bearer),
                    ("content-type", "application/json"),
                ],
                receipt(INN_A, "by-get").to_string(),
            )
            .await;
        let case = format!("{method} {path}");
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{case}");
        let allow = r
            .headers
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            allow.as_deref().is_some_and(|a| a.contains(allowed)),
            "{case}: Allow {allow:?}"
        );
        let msg = if path.starts_with("/api/") {
            r.failed(StatusCode::METHOD_NOT_ALLOWED, 1000)
        } else {
            r.native_error(StatusCode::METHOD_NOT_ALLOWED)
        };
        for needle in [method.as_str(), path, allowed] {
            assert!(msg.contains(needle), "{case}: {needle:?} not in {msg:?}");
        }
        env.after_refusal(&mut before, &case).await;
    }
}

#[tokio::test]
async fn an_unknown_path_is_refused_naming_it() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    for (method, path, ferma) in [
        (Method::POST, "/api/kkt/cloud/receipts", true),
        (Method::POST, "/api/kkt/cloud/Receipt", true),
        (Method::POST, "/api/kkt/cloud/receipt/", true),
        (Method::POST, "/api/v2/kkt/cloud/receipt", true),
        (Method::POST, "/api", true),
        (Method::GET, "/", false),
        (Method::GET, "/v1/receipts", false),
        (Method::GET, "/v1/receipts/a/b", false),
        (Method::GET, "/v2/kkts", false),
        (Method::GET, "/../../etc/passwd", false),
        (Method::GET, "/%00", false),
    ] {
        let case = format!("{method} {path}");
        let r = env
            .request(
                method.clone(),
                &format!("{path}?AuthToken={}", env.token),
                &[("content-type", "application/json")],
                receipt(INN_A, "lost").to_string(),
            )
            .await;
        let msg = if ferma {
            r.failed(StatusCode::NOT_FOUND, 1000)
        } else {
            r.native_error(StatusCode::NOT_FOUND)
        };
        // Clients normalise "/../" away; the rest is named as sent.
        if !path.contains("..") {
            assert!(msg.contains(path), "{case}: {msg}");
        }
        assert!(msg.contains(method.as_str()), "{case}: {msg}");
        if ferma {
            assert!(msg.contains("/api/kkt/cloud/receipt"), "{case}: {msg}");
        } else {
            assert!(msg.contains("/openapi.json"), "{case}: {msg}");
        }
        env.after_refusal(&mut before, &case).await;
    }
}

// ---- tunnel ----------------------------------------------------------------------------------

/// The seed of this run's random bytes: `BAD_INPUT_SEED` to replay one, else from the clock.
fn seed() -> u64 {
    let seed = std::env::var("BAD_INPUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(controller::unix_ms);
    eprintln!("BAD_INPUT_SEED={seed}");
    seed
}

/// Drives `agent` until the controller closes the connection; returns its close code and
/// reason. Panics if the connection ended any other way.
async fn closed_by_controller(agent: &mut FakeAgent) -> (u64, String) {
    agent.closed_reason().await;
    match agent.conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected the controller to close the connection, got {other:?}"),
    }
}

/// A bad peer's connection was closed with `PROTOCOL` and a reason accepted by `check`; the
/// same reason was announced as a rejection of that agent, and (after a hello) its
/// disconnection was announced. Returns the reason.
async fn rejected(
    env: &Env,
    events: &mut broadcast::Receiver<TunnelEvent>,
    agent: &mut FakeAgent,
    after_hello: bool,
    check: impl FnOnce(&str) -> bool,
) -> String {
    let (code, reason) = closed_by_controller(agent).await;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    assert!(check(&reason), "unexpected reason: {reason}");
    let id = agent.id.clone();
    let seen = events_until(events, |e| match e {
        TunnelEvent::AgentDisconnected { agent, .. } if after_hello => *agent == id,
        TunnelEvent::ConnectionRejected { agent, .. } if !after_hello => {
            agent.as_deref() == Some(id.as_str())
        }
        _ => false,
    })
    .await;
    let announced: Vec<&String> = seen
        .iter()
        .filter_map(|e| match e {
            TunnelEvent::ConnectionRejected {
                agent: Some(a),
                reason,
                ..
            } if *a == id => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(announced, vec![&reason], "{seen:?}");
    if after_hello {
        assert!(seen.iter().any(|e| matches!(e,
            TunnelEvent::AgentDisconnected { agent, reason: r } if *agent == id && *r == reason)));
    }
    // Nothing about the good agent's register or jobs happened meanwhile.
    assert!(!seen.iter().any(|e| mentions(e, K1, &env.held)), "{seen:?}");
    assert!(!env.server.tunnel.agents().iter().any(|a| a.id == id));
    reason
}

/// Whether `e` is about register `kkt` or job `job`.
fn mentions(e: &TunnelEvent, kkt: &str, job: &str) -> bool {
    match e {
        TunnelEvent::KktAttached { kkt: k, .. }
        | TunnelEvent::KktDetached { kkt: k, .. }
        | TunnelEvent::KktStatus { kkt: k, .. }
        | TunnelEvent::KktEvent { kkt: k, .. } => k == kkt,
        TunnelEvent::JobDispatched { job: j, kkt: k, .. }
        | TunnelEvent::JobAccepted { job: j, kkt: k, .. }
        | TunnelEvent::JobRefused { job: j, kkt: k, .. }
        | TunnelEvent::JobCompleted { job: j, kkt: k, .. }
        | TunnelEvent::JobNotFiscalized { job: j, kkt: k, .. }
        | TunnelEvent::JobReleased { job: j, kkt: k, .. } => k == kkt || j == job,
        TunnelEvent::AnomalyRecorded { job: j, .. } => j == job,
        TunnelEvent::ReceiptsConfirmed { jobs } => jobs.iter().any(|j| j == job),
        _ => false,
    }
}

/// A frame whose body cannot decode: its first byte is an enum variant no message has.
fn undecodable(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut body = vec![0u8; len];
    rng.fill(&mut body[..]);
    body[0] = 0x7f;
    let mut frame = u32::try_from(len).unwrap().to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// After a bad peer: the good agent and the API are unaffected, and the bad agent's own
/// credentials still work for a well-behaved connection (it was not blacklisted).
async fn tunnel_after(env: &mut Env, before: &mut Snapshot, creds: &Credentials, case: &str) {
    env.unchanged(before, case).await;
    env.still_serving(before, case).await;
    let mut again = connect(env.ctl.addr(), env.ctl.ca_der(), Some(creds))
        .await
        .unwrap();
    again.hello(1, JournalSummary::default()).await;
    // Closed and forgotten before the next case looks at events.
    let mut events = env.server.tunnel.subscribe();
    again.conn.close(0u32.into(), b"bye");
    let id = creds.agent_id.clone();
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::AgentDisconnected { agent, .. } if *agent == id),
    )
    .await;
}

#[tokio::test]
async fn random_bytes_from_an_enrolled_peer_close_only_its_connection() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let creds = env.ctl.enroll_agent("noisy").await;

    for round in 0..4 {
        // 1. Random bytes instead of a hello.
        let mut events = env.server.tunnel.subscribe();
        let mut noisy = connect(env.ctl.addr(), env.ctl.ca_der(), Some(&creds))
            .await
            .unwrap();
        let mut blob = vec![0u8; rng.random_range(4..64 * 1024)];
        rng.fill(&mut blob[..]);
        let _ = noisy.send_raw(&blob).await;
        let _ = noisy.send.finish();
        let len = u32::from_le_bytes(blob[..4].try_into().unwrap()) as usize;
        rejected(&env, &mut events, &mut noisy, false, |r| {
            if len > MAX_FRAME {
                r == format!("no hello: frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")
            } else {
                // 1 in 16,000: a plausible length; whatever follows, it is no hello.
                r.starts_with("no hello: ")
            }
        })
        .await;
        tunnel_after(
            &mut env,
            &mut before,
            &creds,
            &format!("round {round}: random first frame"),
        )
        .await;

        // 2. A well-framed first frame of random bytes.
        let mut events = env.server.tunnel.subscribe();
        let mut noisy = connect(env.ctl.addr(), env.ctl.ca_der(), Some(&creds))
            .await
            .unwrap();
        let n = rng.random_range(1..4096);
        noisy.send_raw(&undecodable(&mut rng, n)).await.unwrap();
        rejected(&env, &mut events, &mut noisy, false, |r| {
            r.starts_with("no hello: frame does not decode: ")
        })
        .await;
        tunnel_after(
            &mut env,
            &mut before,
            &creds,
            &format!("round {round}: random hello"),
        )
        .await;

        // 3. After a good hello: random bytes with a random length prefix, then well-framed
        //    random bytes.
        for framed in [false, true] {
            let mut events = env.server.tunnel.subscribe();
            let mut noisy = connect(env.ctl.addr(), env.ctl.ca_der(), Some(&creds))
                .await
                .unwrap();
            noisy.hello(1, JournalSummary::default()).await;
            // The bytes, and the exact reason when it can be told in advance.
            let (bytes, exact) = if framed {
                let n = rng.random_range(1..4096);
                (undecodable(&mut rng, n), None)
            } else {
                let mut blob = vec![0u8; rng.random_range(4..64 * 1024)];
                rng.fill(&mut blob[..]);
                // Make the prefix too large (as 99.99 % of random prefixes are).
                blob[3] |= 0x80;
                let len = u32::from_le_bytes(blob[..4].try_into().unwrap()) as usize;
                let want = format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit");
                (blob, Some(want))
            };
            let _ = noisy.send_raw(&bytes).await;
            rejected(&env, &mut events, &mut noisy, true, |r| match &exact {
                Some(want) => r == want,
                None => r.starts_with("frame does not decode: "),
            })
            .await;
            tunnel_after(
                &mut env,
                &mut before,
                &creds,
                &format!("round {round}: random frame after hello (framed {framed})"),
            )
            .await;
        }
    }
}

#[tokio::test]
async fn a_truncated_frame_then_close_is_not_applied() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let creds = env.ctl.enroll_agent("cut").await;
    // A frame that would matter if applied: a result for the held job (cut, it must not be).
    let frame = encode_frame(&AgentMessage::Outbox(protocol::tunnel::OutboxEntry {
        seq: 1,
        body: completed(&env.held, K1, 1, 11),
    }))
    .unwrap();
    let hello_frame = encode_frame(&hello(&creds.agent_id, 1, JournalSummary::default())).unwrap();

    // Stream finished inside a frame: before the hello (inside the prefix and the body), and
    // after it.
    for (case, cut_hello, bytes) in [
        ("hello prefix cut", true, &hello_frame[..2]),
        (
            "hello body cut",
            true,
            &hello_frame[..hello_frame.len() - 3],
        ),
        ("frame prefix cut", false, &frame[..3]),
        ("frame body cut", false, &frame[..frame.len() / 2]),
    ] {
        let mut events = env.server.tunnel.subscribe();
        let mut cut = connect(env.ctl.addr(), env.ctl.ca_der(), Some(&creds))
            .await
            .unwrap();
        if !cut_hello {
            cut.hello(1, JournalSummary::default()).await;
        }
        cut.send_raw(bytes).await.unwrap();
        cut.send.finish().unwrap();
        let want = if cut_hello {
            "no hello: the stream ended inside a frame"
        } else {
            "the stream ended inside a frame"
        };
        rejected(&env, &mut events, &mut cut, !cut_hello, |r| r == want).await;
        tunnel_after(&mut env, &mut before, &creds, case).await;
    }

    // The connection closed (not the stream finished) inside a frame: that is a lost link, not
    // a protocol breach — the controller forgets the connection without a rejection, and
    // applies nothing of the partial frame.
    let mut events = env.server.tunnel.subscribe();
    let mut cut = connect(env.ctl.addr(), env.ctl.ca_der(), Some(&creds))
        .await
        .unwrap();
    cut.hello(1, JournalSummary::default()).await;
    cut.send_raw(&frame[..frame.len() / 2]).await.unwrap();
    cut.conn.close(0u32.into(), b"cut");
    let id = creds.agent_id.clone();
    let seen = events_until(
        &mut events,
        |e| matches!(e, TunnelEvent::AgentDisconnected { agent, .. } if *agent == id),
    )
    .await;
    match seen.last() {
        Some(TunnelEvent::AgentDisconnected { reason, .. }) => {
            assert!(reason.starts_with("connection lost: "), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, TunnelEvent::ConnectionRejected { .. })),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|e| mentions(e, K1, &env.held)), "{seen:?}");
    tunnel_after(&mut env, &mut before, &creds, "connection closed mid-frame").await;
    // A reconnect starts from scratch: nothing of the cut frame was applied.
    let mut again = connect(env.ctl.addr(), env.ctl.ca_der(), Some(&creds))
        .await
        .unwrap();
    assert_eq!(
        again.hello(1, JournalSummary::default()).await.applied_upto,
        0
    );
}

#[tokio::test]
async fn a_frame_longer_than_max_frame_closes_only_its_connection() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let creds = env.ctl.enroll_agent("big").await;
    for (case, after_hello, len) in [
        ("hello of MAX_FRAME + 1", false, MAX_FRAME + 1),
        ("hello of 4 GiB", false, u32::MAX as usize),
        ("frame of MAX_FRAME + 1", true, MAX_FRAME + 1),
        ("frame of 4 GiB", true, u32::MAX as usize),
    ] {
        let mut events = env.server.tunnel.subscribe();
        let mut big = connect(env.ctl.addr(), env.ctl.ca_der(), Some(&creds))
            .await
            .unwrap();
        if after_hello {
            big.hello(1, JournalSummary::default()).await;
        }
        let mut bytes = u32::try_from(len).unwrap().to_le_bytes().to_vec();
        // The start of a body the controller never reads.
        bytes.resize(4 + 64 * 1024, 0xab);
        let _ = big.send_raw(&bytes).await;
        let want = format!(
            "{}frame of {len} bytes exceeds the {MAX_FRAME}-byte limit",
            if after_hello { "" } else { "no hello: " }
        );
        rejected(&env, &mut events, &mut big, after_hello, |r| r == want).await;
        tunnel_after(&mut env, &mut before, &creds, case).await;
    }
}

/// An enrolled agent with register K2 of its own reports about K1, which is attached to the
/// good agent: a status, register events, a result and a not-fiscalized for K1's job (and for a
/// queued job), an accepted and a refusal for K1's job, a detach of K1, and an answer to a
/// command sent to K1. Each is ignored: K1's stored and live state, its jobs and the receipts
/// are unchanged, no event about K1 or its job is published, and the good agent still gets the
/// command's real answer. As `store::apply_reports` does for reports it ignores, the offending
/// connection is not closed: outbox entries are acknowledged (so the agent does not resend them
/// forever) and the agent keeps its link and its own register.
#[tokio::test]
async fn reports_about_another_agents_register_are_ignored() {
    let mut env = Env::start().await;
    let mut before = env.snapshot().await;
    let mut events = env.server.tunnel.subscribe();
    let (creds, mut intruder) = online_agent(&env.ctl, "intruder", "K2").await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktAttached { kkt, .. } if kkt == "K2"),
    )
    .await;
    // K2 is not registered for any INN of the shop: nothing of the shop's state changed.
    env.unchanged(&before, "intruder attached").await;

    // A command to K1 is in flight; the intruder will try to answer it.
    let tunnel = env.server.tunnel.clone();
    let call = tokio::spawn(async move { tunnel.command(K1, Call::GetDeviceStatus, WAIT).await });
    let (cmd_id, cmd_kkt) = match env.good.recv().await.unwrap() {
        ControllerMessage::Command { id, kkt, call } => {
            assert_eq!(call, Call::GetDeviceStatus);
            (id, kkt)
        }
        other => panic!("expected the command, got {other:?}"),
    };
    assert_eq!(cmd_kkt, K1);

    let k1 = ready_state(K1, INN_A);
    let mut paper_out = k1.device.clone();
    paper_out.paper_present = false;
    paper_out.cover_open = true;
    let mut bad_state = k1.clone();
    bad_state.device = paper_out.clone();
    bad_state.fn_info.registration = None;
    let held = env.held.clone();
    let queued = env.queued.clone();
    let fn_k1 = k1.fn_info.fn_number.clone();
    let mut events = env.server.tunnel.subscribe();

    let frames = vec![
        AgentMessage::Status(Box::new(bad_state)),
        AgentMessage::Outbox(protocol::tunnel::OutboxEntry {
            seq: 1,
            body: OutboxBody::Event {
                kkt: K1.into(),
                event: Event::StatusChanged(paper_out),
            },
        }),
        AgentMessage::Outbox(protocol::tunnel::OutboxEntry {
            seq: 2,
            body: OutboxBody::Event {
                kkt: K1.into(),
                event: Event::OfdAck(OfdAckEvent {
                    fn_number: fn_k1,
                    fd_number: 1_000,
                    acked_at: unix_secs(),
                    unsent_count: 0,
                }),
            },
        }),
        AgentMessage::Outbox(protocol::tunnel::OutboxEntry {
            seq: 3,
            body: completed(&held, K1, 1, 11),
        }),
        AgentMessage::Outbox(protocol::tunnel::OutboxEntry {
            seq: 4,
            body: completed(&queued, K1, 1, 12),
        }),
        AgentMessage::Outbox(protocol::tunnel::OutboxEntry {
            seq: 5,
            body: OutboxBody::NotFiscalized {
                job: held.clone(),
                attempt: 1,
                kkt: K1.into(),
                error: KktError::new(ErrorCode::NO_PAPER, "no paper"),
            },
        }),
        AgentMessage::Accepted {
            job: held.clone(),
            attempt: 1,
        },
        AgentMessage::Refused {
            job: held.clone(),
            attempt: 1,
            reason: "journal full".into(),
        },
        AgentMessage::Detached { kkt: K1.into() },
        AgentMessage::CommandResult {
            id: cmd_id,
            kkt: K1.into(),
            outcome: Err(KktError::new(ErrorCode::COVER_OPEN, "spoofed")),
        },
        // The barrier: a report about its own register, applied after all of the above.
        AgentMessage::Status(Box::new(ready_state("K2", INN_C))),
    ];
    for f in &frames {
        intruder.send(f).await.unwrap();
    }
    let intruder_id = creds.agent_id.clone();
    let seen = events_until(&mut events, |e| {
        matches!(e, TunnelEvent::KktStatus { agent, kkt } if *agent == intruder_id && kkt == "K2")
    })
    .await;
    assert!(
        !seen
            .iter()
            .any(|e| mentions(e, K1, &held) || mentions(e, K1, &queued)),
        "an ignored report was published: {seen:?}"
    );
    assert!(
        !seen.iter().any(|e| matches!(
            e,
            TunnelEvent::ConnectionRejected { .. } | TunnelEvent::AgentDisconnected { .. }
        )),
        "{seen:?}"
    );
    // Every outbox entry is acknowledged (cumulatively), and the link stays up.
    loop {
        match intruder.recv().await.unwrap() {
            ControllerMessage::Ack { upto: 5 } => break,
            ControllerMessage::Ack { upto } => assert!(upto < 5),
            other => panic!("the intruder expected acks, got {other:?}"),
        }
    }
    intruder
        .send(&AgentMessage::Heartbeat(Health {
            sent_at_micros: 7,
            ..Health::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        intruder.recv().await.unwrap(),
        ControllerMessage::Pong { sent_at_micros: 7 }
    );
    let agents = env.server.tunnel.agents();
    let me = agents.iter().find(|a| a.id == creds.agent_id).unwrap();
    assert_eq!(me.kkts, vec!["K2".to_string()]);
    assert_eq!(
        env.server.tunnel.online_kkt("K2").unwrap().agent,
        creds.agent_id
    );
    let k2 = env.server.tunnel.store().kkt("K2").unwrap().unwrap();
    assert_eq!(k2.agent, creds.agent_id);

    // Nothing of the shop's changed: receipts, jobs, K1 stored and live, queues, anomalies.
    env.unchanged(&before, "reports about K1 from the intruder")
        .await;
    let k1_record = env.server.tunnel.store().kkt(K1).unwrap().unwrap();
    assert!(k1_record.last_ofd_ack.is_none());
    assert!(k1_record.detached_at.is_none());
    // (`k1` was rebuilt now; the stored one is the good agent's, from setup.)
    let stored = k1_record.state.as_ref().unwrap();
    assert!(stored.device.paper_present && !stored.device.cover_open);
    assert_eq!(stored.fn_info.registration, k1.fn_info.registration);

    // The command's answer is the good agent's, not the intruder's.
    assert!(
        !call.is_finished(),
        "the spoofed answer completed the command"
    );
    env.good
        .send(&AgentMessage::CommandResult {
            id: cmd_id,
            kkt: K1.into(),
            outcome: Ok(Reply::DeviceStatus(k1.device.clone())),
        })
        .await
        .unwrap();
    assert_eq!(
        call.await.unwrap().unwrap(),
        Reply::DeviceStatus(k1.device.clone())
    );
    env.still_serving(&mut before, "after the intruder").await;

    // The good agent still finishes its job end to end: the receipt becomes PROCESSED with the
    // good agent's document.
    let mut events = env.server.tunnel.subscribe();
    env.good.outbox(1, completed(&held, K1, 1, 21)).await;
    match env.good.recv().await.unwrap() {
        ControllerMessage::Ack { upto } => assert_eq!(upto, 1),
        other => panic!("expected the ack, got {other:?}"),
    }
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::JobCompleted { job, kkt, .. } if *job == held && kkt == K1),
    )
    .await;
    let st = env
        .ferma(
            "/api/kkt/cloud/status",
            &env.token,
            &json!({"Request": {"ReceiptId": held}}),
        )
        .await
        .data();
    assert_eq!(st["StatusName"], "PROCESSED", "{st}");
    assert_eq!(st["Device"]["FDN"], "21", "{st}");
    assert_eq!(st["Device"]["ZN"], K1, "{st}");
    let queued_job = env.server.tunnel.job(&queued).unwrap().unwrap();
    assert_eq!(queued_job.state, controller::rules::JobState::Queued);
}
