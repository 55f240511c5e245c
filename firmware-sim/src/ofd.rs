//! The simulated OFD (fiscal data operator): receives containers over TCP, checks them, stores every
//! document durably per FN and answers each with document 7 — the acknowledgement the FN needs to
//! mark the document delivered. An HTTP JSON API lists what was received, for reconciliation.
//!
//! Rules it enforces (reference/fiscal.md): valid session header and container CRC; the session's
//! FN is the container's FN; the document parses and carries a fiscal sign; its date is not more than
//! 24 h in the future; documents of one FN arrive in FD order (a gap is refused so that the KKT
//! resends from the oldest). A repeated (FN, FD) is acknowledged again without being stored twice:
//! a KKT that lost an ack resends, and must not be blocked for it.
//!
//! Durability: the acknowledgement is sent only after the document is committed (group commit).

use crate::exchange::{self, container_for, sign8};
use crate::store::{Store, StoreError};
use axum::extract::{Path as AxPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use protocol::document::{Document, FiscalDocument, OfdAck};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// Received documents: (FN, FD) → postcard of [`Received`].
const DOCS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("ofd_documents");

/// Result codes in the acknowledgement (tag 1022).
pub mod result_code {
    pub const OK: u8 = 0;
    /// Rejected by the operator (fault knob): the KKT keeps the document and retries.
    pub const REJECTED: u8 = 1;
    pub const MALFORMED: u8 = 2;
    pub const FROM_THE_FUTURE: u8 = 3;
    pub const OUT_OF_ORDER: u8 = 4;
    /// A different document under an (FN, FD) already stored: two drives claim one number, or the
    /// FN's archive was tampered with. Never acknowledged.
    pub const CONFLICT: u8 = 5;
}

/// A connection that sends nothing for this long is closed, so idle or stalled peers cannot hold
/// sockets forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Accepts of one FN are serialized (check, store, answer) so that a resend racing a slow original
/// is seen as the duplicate it is; FNs hash onto this many locks so that different FNs proceed in
/// parallel.
const FN_LOCK_STRIPES: usize = 64;

/// One stored document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    pub received_at: u64,
    pub tlv: Vec<u8>,
}

/// Fault knobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfdFaults {
    /// Answer every document with result code 1 (and store nothing).
    #[serde(default)]
    pub reject: bool,
    /// Wait this long before answering.
    #[serde(default)]
    pub delay_ms: u64,
}

#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    connections: AtomicU64,
}

/// Our INN as an operator; it goes into every acknowledgement.
pub const OFD_INN: &str = "7704211201";

pub struct Ofd {
    store: Store,
    key: [u8; 32],
    faults: Mutex<OfdFaults>,
    stats: Stats,
    clock: fn() -> u64,
    fn_locks: Vec<tokio::sync::Mutex<()>>,
}

impl Ofd {
    pub fn open(data: &Path) -> Result<Arc<Ofd>, StoreError> {
        std::fs::create_dir_all(data)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", data.display())))?;
        let store = Store::open(&data.join("ofd.redb"), |txn| {
            txn.open_table(DOCS)?;
            Ok(())
        })?;
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        Ok(Arc::new(Ofd {
            store,
            key,
            faults: Mutex::new(OfdFaults::default()),
            stats: Stats::default(),
            clock: crate::device::host_now,
            fn_locks: (0..FN_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }))
    }

    pub fn faults(&self) -> OfdFaults {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_faults(&self, f: OfdFaults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Accepts KKT connections until the listener fails.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.stats.connections.fetch_add(1, Ordering::Relaxed);
                    let ofd = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = ofd.connection(stream).await {
                            debug!(%peer, error = %e, "OFD connection ended");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(&self, mut stream: TcpStream) -> Result<(), exchange::ExchangeError> {
        stream.set_nodelay(true)?;
        // A KKT may send several documents over one connection, one answer each.
        loop {
            let Ok(message) =
                tokio::time::timeout(IDLE_TIMEOUT, exchange::read_message(&mut stream)).await
            else {
                debug!("closing an idle OFD connection");
                return Ok(());
            };
            let Some((_, container)) = message? else {
                return Ok(());
            };
            let fn_number = container.header.fn_number.clone();
            let fd = container.header.fd_number;
            let faults = self.faults();
            if faults.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
            }
            let code = if faults.reject {
                result_code::REJECTED
            } else {
                self.accept(&fn_number, fd, container.document).await
            };
            if code != result_code::OK {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            let ack = OfdAck {
                ofd_inn: OFD_INN.to_owned(),
                fn_number: fn_number.clone(),
                fd_number: fd,
                date_time: u32::try_from((self.clock)()).unwrap_or(u32::MAX),
                result_code: code,
                fpo: sign8(&self.key, &fd.to_le_bytes()).to_vec(),
            };
            let doc = ack.to_document();
            let bytes = doc.encode().unwrap_or_default();
            let sign = sign8(&self.key, &bytes);
            let answer = container_for(&fn_number, fd, doc.doc_type.tag(), bytes, sign);
            exchange::write_message(&mut stream, &answer).await?;
        }
    }

    /// Checks and stores one document; returns the result code for the acknowledgement.
    async fn accept(&self, fn_number: &str, fd: u32, tlv: Vec<u8>) -> u8 {
        let doc = match Document::decode(&tlv) {
            Ok(d) => d,
            Err(e) => {
                warn!(fn_number, fd, error = %e, "refused: document does not parse");
                return result_code::MALFORMED;
            }
        };
        if doc.fd_number() != Some(fd)
            || doc.fn_number().as_deref() != Some(fn_number)
            || doc.fpd().is_none()
        {
            warn!(
                fn_number,
                fd, "refused: FN, FD or fiscal sign missing or not the container's"
            );
            return result_code::MALFORMED;
        }
        let now = (self.clock)();
        if doc
            .date_time()
            .is_some_and(|t| u64::from(t) > now + 24 * 3600)
        {
            warn!(
                fn_number,
                fd, "refused: document dated more than 24 h ahead"
            );
            return result_code::FROM_THE_FUTURE;
        }
        let stripe = fn_number.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        let _serial = self.fn_locks[stripe % FN_LOCK_STRIPES].lock().await;
        match self.last_fd(fn_number) {
            Ok(last) if fd <= last => {
                return match self.stored(fn_number, fd) {
                    Ok(Some(rec)) if rec.tlv == tlv => {
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        result_code::OK
                    }
                    Ok(Some(_)) => {
                        warn!(
                            fn_number,
                            fd, "refused: differs from the document stored under this number"
                        );
                        result_code::CONFLICT
                    }
                    Ok(None) => result_code::OUT_OF_ORDER,
                    Err(e) => {
                        warn!(error = %e, "store read failed");
                        result_code::REJECTED
                    }
                };
            }
            // The first document from an FN may have any number: a KKT that switched to this OFD
            // (re-registration, reason "OFD changed") continues its FN's numbering here.
            Ok(last) if last != 0 && fd != last + 1 => {
                warn!(
                    fn_number,
                    fd, last, "refused: documents must arrive in FD order"
                );
                return result_code::OUT_OF_ORDER;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "store read failed");
                return result_code::REJECTED;
            }
        }
        let record = postcard::to_allocvec(&Received {
            received_at: now,
            tlv,
        })
        .unwrap_or_default();
        let key_fn = fn_number.to_owned();
        let stored = self
            .store
            .commit(move |txn| {
                txn.open_table(DOCS)?
                    .insert((key_fn.as_str(), fd), record.as_slice())?;
                Ok(())
            })
            .await;
        match stored {
            Ok(()) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                result_code::OK
            }
            Err(e) => {
                warn!(error = %e, "store write failed; the KKT will resend");
                result_code::REJECTED
            }
        }
    }

    fn stored(&self, fn_number: &str, fd: u32) -> Result<Option<Received>, StoreError> {
        let txn = self.store.read()?;
        let t = txn.open_table(DOCS)?;
        let Some(v) = t.get((fn_number, fd))? else {
            return Ok(None);
        };
        postcard::from_bytes(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn last_fd(&self, fn_number: &str) -> Result<u32, StoreError> {
        let txn = self.store.read()?;
        let t = txn.open_table(DOCS)?;
        let last = t
            .range((fn_number, 0)..=(fn_number, u32::MAX))?
            .next_back()
            .transpose()?
            .map(|(k, _)| k.value().1);
        Ok(last.unwrap_or(0))
    }

    /// Documents received from one FN, filtered by FD and document date.
    pub fn documents(
        &self,
        fn_number: &str,
        q: &DocumentQuery,
    ) -> Result<Vec<DocumentView>, StoreError> {
        let txn = self.store.read()?;
        let t = txn.open_table(DOCS)?;
        let from = q.from_fd.unwrap_or(0);
        let to = q.to_fd.unwrap_or(u32::MAX);
        let mut out = Vec::new();
        for row in t.range((fn_number, from)..=(fn_number, to))? {
            let (k, v) = row?;
            let rec: Received =
                postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let view = DocumentView::new(k.value().1, rec);
            let t = u64::from(view.date_time);
            if q.from.is_some_and(|f| t < f) || q.to.is_some_and(|e| t > e) {
                continue;
            }
            out.push(view);
        }
        Ok(out)
    }

    /// Every FN that sent something, with its count and last FD.
    pub fn drives(&self) -> Result<Vec<DriveSummary>, StoreError> {
        let txn = self.store.read()?;
        let t = txn.open_table(DOCS)?;
        let mut out: Vec<DriveSummary> = Vec::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let (fn_number, fd) = k.value();
            match out.last_mut() {
                Some(d) if d.fn_number == fn_number => {
                    d.documents += 1;
                    d.last_fd = fd;
                }
                _ => out.push(DriveSummary {
                    fn_number: fn_number.to_owned(),
                    documents: 1,
                    last_fd: fd,
                }),
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> OfdStats {
        OfdStats {
            accepted: self.stats.accepted.load(Ordering::Relaxed),
            duplicates: self.stats.duplicates.load(Ordering::Relaxed),
            refused: self.stats.refused.load(Ordering::Relaxed),
            connections: self.stats.connections.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentQuery {
    pub from_fd: Option<u32>,
    pub to_fd: Option<u32>,
    /// Document date-time bounds, Unix seconds.
    pub from: Option<u64>,
    pub to: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentView {
    pub fd_number: u32,
    pub date_time: u32,
    pub fpd: Option<u32>,
    pub received_at: u64,
    pub document: Option<FiscalDocument>,
    pub tlv_hex: String,
}

impl DocumentView {
    fn new(fd_number: u32, rec: Received) -> Self {
        let doc = Document::decode(&rec.tlv).ok();
        DocumentView {
            fd_number,
            date_time: doc.as_ref().and_then(|d| d.date_time()).unwrap_or(0),
            fpd: doc.as_ref().and_then(|d| d.fpd()).map(|f| f.printed()),
            received_at: rec.received_at,
            document: doc.and_then(|d| FiscalDocument::from_document(&d).ok()),
            tlv_hex: rec.tlv.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriveSummary {
    pub fn_number: String,
    pub documents: u64,
    pub last_fd: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfdStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub connections: u64,
}

struct ApiError(StoreError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": self.0.to_string() })),
        )
            .into_response()
    }
}

/// The OFD's HTTP API (reconciliation and fault knobs).
pub fn app(ofd: Arc<Ofd>) -> Router {
    Router::new()
        .route("/api/fn", get(list_drives))
        .route("/api/fn/{fn_number}/documents", get(list_documents))
        .route(
            "/api/stats",
            get(|State(o): State<Arc<Ofd>>| async move { Json(o.stats()) }),
        )
        .route(
            "/api/faults",
            get(|State(o): State<Arc<Ofd>>| async move { Json(o.faults()) }).put(
                |State(o): State<Arc<Ofd>>, Json(f): Json<OfdFaults>| async move {
                    info!(?f, "OFD faults set");
                    o.set_faults(f.clone());
                    Json(f)
                },
            ),
        )
        .with_state(ofd)
}

async fn list_drives(State(ofd): State<Arc<Ofd>>) -> Result<Json<Vec<DriveSummary>>, ApiError> {
    Ok(Json(ofd.drives().map_err(ApiError)?))
}

async fn list_documents(
    State(ofd): State<Arc<Ofd>>,
    AxPath(fn_number): AxPath<String>,
    Query(q): Query<DocumentQuery>,
) -> Result<Json<Vec<DocumentView>>, ApiError> {
    Ok(Json(ofd.documents(&fn_number, &q).map_err(ApiError)?))
}
