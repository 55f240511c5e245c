//! The simulator's control API on loopback: fault knobs and the clock, for tests and operators.
//! `{zn}` may be `all` to act on every register of the process.
//!
//! * `GET  /devices`, `GET /devices/{zn}` — state summary;
//! * `POST /devices/{zn}/faults` — any of `latencyMs`, `paperOut`, `coverOpen`, `fnFull`,
//!   `fnExpired`, `dropConnection`, `crashNextReceipt` (`"reboot"` | `"abort"` | `null`),
//!   `ofdLinkDown`;
//! * `POST /devices/{zn}/clock` — `{"advanceSeconds": N}` moves the register's clock;
//! * `POST /devices/{zn}/replace-fn` — fits a new FN (allowed once the old one is in phase 15).

use crate::device::{host_now, CrashMode, Device, Faults, Fleet};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::kkt::Event;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tracing::info;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSummary {
    pub zn: String,
    pub fn_number: String,
    pub phase: u8,
    pub last_fd: u32,
    pub shift_number: u32,
    pub shift_open: bool,
    pub unsent: u32,
    pub connected: bool,
    pub paper_present: bool,
    pub cover_open: bool,
    /// The register's clock, Unix seconds.
    pub clock: u32,
    pub clock_offset: i64,
    pub faults: Faults,
    pub requests_served: u64,
}

fn summary(d: &Device) -> DeviceSummary {
    let faults = d.faults().clone();
    let r = d.register();
    DeviceSummary {
        zn: r.zn.clone(),
        fn_number: r.drive.fn_number().to_owned(),
        phase: r.drive.phase.code(),
        last_fd: r.drive.last_fd,
        shift_number: r.drive.shift.number,
        shift_open: r.drive.shift.open,
        unsent: r.drive.unsent.len() as u32,
        connected: d.is_connected(),
        paper_present: r.paper_present,
        cover_open: r.cover_open,
        clock: r.clock(host_now()),
        clock_offset: r.clock_offset,
        faults,
        requests_served: d.requests_served.load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// A partial update of fault knobs: absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultPatch {
    pub latency_ms: Option<u64>,
    pub paper_out: Option<bool>,
    pub cover_open: Option<bool>,
    /// Fill the FN archive now (irreversible, as on a real drive).
    pub fn_full: Option<bool>,
    /// End the FN's service life now (irreversible).
    pub fn_expired: Option<bool>,
    pub drop_connection: Option<bool>,
    #[serde(default, with = "double_option")]
    pub crash_next_receipt: Option<Option<CrashMode>>,
    pub ofd_link_down: Option<bool>,
}

/// Distinguishes an absent field (leave as is) from `null` (clear).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(inner) => inner.serialize(s),
        }
    }
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClockMove {
    pub advance_seconds: i64,
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn select(fleet: &Fleet, zn: &str) -> Result<Vec<Arc<Device>>, ApiError> {
    if zn == "all" {
        return Ok(fleet.devices.values().cloned().collect());
    }
    fleet
        .device(zn)
        .cloned()
        .map(|d| vec![d])
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no register with ZN {zn}")))
}

pub fn app(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route(
            "/devices",
            get(|State(f): State<Arc<Fleet>>| async move {
                Json(f.devices.values().map(|d| summary(d)).collect::<Vec<_>>())
            }),
        )
        .route("/devices/{zn}", get(get_device))
        .route("/devices/{zn}/faults", post(set_faults))
        .route("/devices/{zn}/clock", post(move_clock))
        .route("/devices/{zn}/replace-fn", post(replace_fn))
        .with_state(fleet)
}

async fn get_device(
    State(fleet): State<Arc<Fleet>>,
    Path(zn): Path<String>,
) -> Result<Json<Vec<DeviceSummary>>, ApiError> {
    Ok(Json(
        select(&fleet, &zn)?.iter().map(|d| summary(d)).collect(),
    ))
}

async fn persist(fleet: &Fleet, d: &Device) -> Result<(), ApiError> {
    let pending = fleet.queue_state(&d.register(), None);
    pending
        .durable()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn set_faults(
    State(fleet): State<Arc<Fleet>>,
    Path(zn): Path<String>,
    Json(p): Json<FaultPatch>,
) -> Result<Json<Vec<DeviceSummary>>, ApiError> {
    let devices = select(&fleet, &zn)?;
    for d in &devices {
        {
            let mut f = d.faults();
            if let Some(v) = p.latency_ms {
                f.latency_ms = v;
            }
            if let Some(v) = p.crash_next_receipt {
                f.crash_next_receipt = v;
            }
            if let Some(v) = p.ofd_link_down {
                f.ofd_link_down = v;
            }
        }
        let status = {
            let mut r = d.register();
            let now = r.clock(host_now());
            if let Some(v) = p.paper_out {
                r.paper_present = !v;
            }
            if let Some(v) = p.cover_open {
                r.cover_open = v;
            }
            if p.fn_full == Some(true) {
                r.drive.fill_archive();
            }
            if p.fn_expired == Some(true) {
                r.drive.expire(now);
            }
            r.status(now)
        };
        persist(&fleet, d).await?;
        d.publish(Event::StatusChanged(status));
        if p.drop_connection == Some(true) {
            d.drop_link();
        }
        d.wake_ofd();
    }
    info!(zn, patch = ?p, "faults set");
    Ok(Json(devices.iter().map(|d| summary(d)).collect()))
}

async fn move_clock(
    State(fleet): State<Arc<Fleet>>,
    Path(zn): Path<String>,
    Json(m): Json<ClockMove>,
) -> Result<Json<Vec<DeviceSummary>>, ApiError> {
    let devices = select(&fleet, &zn)?;
    for d in &devices {
        {
            let mut r = d.register();
            r.clock_offset = r.clock_offset.saturating_add(m.advance_seconds);
        }
        persist(&fleet, d).await?;
        d.wake_ofd();
    }
    info!(zn, seconds = m.advance_seconds, "clock moved");
    Ok(Json(devices.iter().map(|d| summary(d)).collect()))
}

async fn replace_fn(
    State(fleet): State<Arc<Fleet>>,
    Path(zn): Path<String>,
) -> Result<Json<Vec<DeviceSummary>>, ApiError> {
    let devices = select(&fleet, &zn)?;
    for d in &devices {
        let zn = d.register().zn.clone();
        fleet
            .replace_fn(&zn)
            .await
            .map_err(|e| ApiError(StatusCode::CONFLICT, format!("{zn}: {}", e.text)))?;
    }
    Ok(Json(devices.iter().map(|d| summary(d)).collect()))
}
