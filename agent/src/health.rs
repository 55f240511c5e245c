//! The technician's view on loopback: `/health` (JSON) and `/` (a small HTML page), and what
//! `agent status` prints. Bound to loopback only: it shows registers and journal state, which is
//! nobody's business off the box.

use crate::agent::{now_secs, Agent, LinkStatus, VERSION};
use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentHealth {
    pub agent_id: String,
    pub version: String,
    pub link: LinkView,
    pub kkts: Vec<KktView>,
    pub journal_depth: u64,
    pub outbox_depth: u64,
    pub oldest_unacked_secs: Option<u64>,
    pub certificate_not_after: u64,
    pub certificate_days_left: i64,
    pub alarm: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkView {
    pub up: bool,
    pub controller: String,
    pub since: Option<u64>,
    pub rtt_micros: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KktView {
    pub zn: String,
    pub fn_number: String,
    pub model: String,
    pub transport: String,
    pub attached_since: u64,
    pub shift: Option<String>,
    pub last_fd: Option<u32>,
    pub unsent: Option<u32>,
    pub paper: Option<bool>,
    pub blocked: Option<bool>,
}

pub fn snapshot(agent: &Agent) -> AgentHealth {
    let h = agent.health();
    let link: LinkStatus = agent.link.lock().map(|l| l.clone()).unwrap_or_default();
    let id = agent.identity.lock().map(|i| i.clone()).ok();
    let not_after = id.as_ref().map(|i| i.not_after).unwrap_or(0);
    let mut kkts: Vec<KktView> = agent
        .attached()
        .into_iter()
        .map(|(hello, transport, since, state)| KktView {
            zn: hello.zn,
            fn_number: hello.fn_number,
            model: hello.model,
            transport,
            attached_since: since,
            shift: state.as_ref().map(|s| format!("{:?}", s.shift.state)),
            last_fd: state.as_ref().map(|s| s.fn_info.last_fd_number),
            unsent: state.as_ref().map(|s| s.ofd.unsent_count),
            paper: state.as_ref().map(|s| s.device.paper_present),
            blocked: state.as_ref().map(|s| s.device.blocked),
        })
        .collect();
    kkts.sort_by(|a, b| a.zn.cmp(&b.zn));
    AgentHealth {
        agent_id: id.map(|i| i.agent_id).unwrap_or_default(),
        version: VERSION.to_owned(),
        link: LinkView {
            up: link.up,
            controller: link.controller,
            since: link.since,
            rtt_micros: link.rtt_micros,
            last_error: link.last_error,
        },
        kkts,
        journal_depth: h.journal_depth,
        outbox_depth: h.outbox_depth,
        oldest_unacked_secs: h.oldest_unacked_secs,
        certificate_not_after: not_after,
        certificate_days_left: (not_after as i64 - now_secs() as i64) / 86_400,
        alarm: h.alarm,
    }
}

pub fn app(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|State(a): State<Arc<Agent>>| async move { Json(snapshot(&a)) }),
        )
        .route(
            "/",
            get(|State(a): State<Arc<Agent>>| async move { Html(page(&snapshot(&a))) }),
        )
        .with_state(agent)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Plain text for `agent status` and the HTML page share this wording.
pub fn text(h: &AgentHealth) -> String {
    let mut out = String::new();
    out.push_str(&format!("agent {} (version {})\n", h.agent_id, h.version));
    out.push_str(&format!(
        "link: {} to {}{}{}\n",
        if h.link.up { "UP" } else { "DOWN" },
        h.link.controller,
        h.link
            .rtt_micros
            .map(|r| format!(", rtt {:.2} ms", r as f64 / 1000.0))
            .unwrap_or_default(),
        h.link
            .last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    ));
    out.push_str(&format!(
        "journal: {} jobs, outbox {} unacknowledged{}\n",
        h.journal_depth,
        h.outbox_depth,
        h.oldest_unacked_secs
            .map(|s| format!(", oldest {s} s"))
            .unwrap_or_default()
    ));
    out.push_str(&format!(
        "certificate: expires in {} days\n",
        h.certificate_days_left
    ));
    if let Some(a) = &h.alarm {
        out.push_str(&format!("ALARM: {a}\n"));
    }
    out.push_str(&format!("registers: {}\n", h.kkts.len()));
    for k in &h.kkts {
        out.push_str(&format!(
            "  {} FN {} via {} shift {} last FD {} unsent {}{}{}\n",
            k.zn,
            k.fn_number,
            k.transport,
            k.shift.as_deref().unwrap_or("?"),
            k.last_fd.map(|f| f.to_string()).unwrap_or("?".into()),
            k.unsent.map(|f| f.to_string()).unwrap_or("?".into()),
            if k.paper == Some(false) {
                " NO PAPER"
            } else {
                ""
            },
            if k.blocked == Some(true) {
                " BLOCKED"
            } else {
                ""
            },
        ));
    }
    out
}

fn page(h: &AgentHealth) -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <title>Agent {id}</title><style>body{{font-family:sans-serif;margin:2em}}\
         pre{{background:#f4f4f4;padding:1em}} .down{{color:#b00}} .up{{color:#070}}</style></head>\
         <body><h1>Agent {id}</h1><p class={cls}>Link {state}</p><pre>{body}</pre>\
         <p><a href=/health>JSON</a></p></body></html>",
        id = esc(&h.agent_id),
        cls = if h.link.up { "up" } else { "down" },
        state = if h.link.up { "UP" } else { "DOWN" },
        body = esc(&text(h)),
    )
}

/// `agent status`: asks the running agent through its health address (the running agent holds
/// the journal, so the files cannot be read directly).
pub async fn fetch(addr: &str) -> Result<AgentHealth, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("the agent is not answering at {addr} ({e}); is `agent run` up?"))?;
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("malformed answer from the agent")?;
    serde_json::from_str(body).map_err(|e| format!("malformed health JSON: {e}"))
}
