//! Callbacks: POSTs of a receipt's final status (CONFIRMED or KKT_ERROR) to the shop's
//! `CallbackUrl`.
//!
//! # Invariants
//! * A callback is owed from the same transaction that makes its receipt final (see
//!   `store::ledger`), so a crash never loses one; it is forgotten only after the shop's server
//!   answered 2xx. A callback may therefore arrive twice (crash between the 2xx and our commit);
//!   shops deduplicate by `ReceiptId`, which every callback carries.
//! * The body is exactly the status answer's `Data`; `X-Signature: sha256=<hex>` is the
//!   HMAC-SHA256 of the body with the account's callback secret, so a shop can tell our calls from
//!   forged ones (Ferma's own callbacks are unsigned).
//! * Retries back off exponentially from 1 s to an hour; after a week the callback is dropped
//!   with a warning (the status stays available through `status` for the life of the account).

use crate::metrics::Metrics;
use crate::store::{sign_callback, Callback, Ledger};
use crate::unix_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

/// Callbacks sent at once.
const BATCH: usize = 32;
/// How long the shop's server may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two attempts.
const MAX_BACKOFF_MS: u64 = 3_600_000;
/// Give up after this long.
const GIVE_UP_MS: u64 = 7 * 86_400_000;
/// Look at the table at least this often even when nobody wakes us (retries come due).
const IDLE: Duration = Duration::from_secs(1);

/// Delay before attempt `attempts + 1`.
pub fn backoff_ms(attempts: u32) -> u64 {
    1000u64
        .saturating_mul(1u64 << attempts.min(20))
        .min(MAX_BACKOFF_MS)
}

/// Starts the sender; `wake` is notified when new callbacks may be owed.
pub fn start<L: Ledger>(
    store: L,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot build the HTTP client; callbacks are not sent");
                return;
            }
        };
        loop {
            let now = unix_ms();
            let due = match store.due_callbacks(now, BATCH) {
                Ok(due) => due,
                Err(e) => {
                    warn!(error = %e, "cannot read owed callbacks");
                    Vec::new()
                }
            };
            let busy = !due.is_empty();
            let sends = due
                .into_iter()
                .map(|(id, cb)| send(&client, &store, &metrics, id, cb));
            futures_util::future::join_all(sends).await;
            if !busy {
                let _ = tokio::time::timeout(IDLE, wake.notified()).await;
            }
        }
    })
}

async fn send<L: Ledger>(
    client: &reqwest::Client,
    store: &L,
    metrics: &Metrics,
    id: u64,
    cb: Callback,
) {
    let now = unix_ms();
    let body = match (store.receipt(&cb.receipt), store.account(&cb.account)) {
        (Ok(Some(view)), Ok(Some(account))) => {
            let data = crate::api::status_data(&view);
            match serde_json::to_vec(&data) {
                Ok(b) => Some((b, account.callback_secret)),
                Err(_) => None,
            }
        }
        _ => None,
    };
    let Some((body, secret)) = body else {
        warn!(
            receipt = cb.receipt,
            "callback for a receipt or account that is gone; dropped"
        );
        let _ = store.callback_delivered(id).await;
        return;
    };
    let signature = format!("sha256={}", sign_callback(&secret, &body));
    let result = client
        .post(&cb.url)
        .header("content-type", "application/json")
        .header("x-signature", signature)
        .header("x-receipt-id", &cb.receipt)
        .body(body)
        .send()
        .await;
    let error = match result {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some(format!("the shop's server answered {}", r.status())),
        Err(e) => Some(format!("cannot reach the shop's server: {e}")),
    };
    match error {
        None => {
            metrics.callback(true);
            info!(receipt = cb.receipt, "callback delivered");
            if let Err(e) = store.callback_delivered(id).await {
                warn!(receipt = cb.receipt, error = %e, "cannot forget a delivered callback; it will be sent again");
            }
        }
        Some(err) if now.saturating_sub(cb.created_at) > GIVE_UP_MS => {
            metrics.callback(false);
            warn!(
                receipt = cb.receipt,
                url = cb.url,
                error = err,
                "callback given up after a week; the status stays available"
            );
            let _ = store.callback_delivered(id).await;
        }
        Some(err) => {
            metrics.callback(false);
            let next = now + backoff_ms(cb.attempts);
            warn!(
                receipt = cb.receipt,
                attempts = cb.attempts + 1,
                error = err,
                "callback failed; retrying later"
            );
            if let Err(e) = store.callback_failed(id, next, err).await {
                warn!(receipt = cb.receipt, error = %e, "cannot record a callback attempt");
            }
        }
    }
}
