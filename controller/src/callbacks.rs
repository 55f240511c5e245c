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
//!
//! # Limits, and why
//! * At most [`CONCURRENCY`] callbacks in flight, and at most [`PER_HOST`] to one host: a shop
//!   whose server hangs holds each attempt for [`TIMEOUT`], and without the per-host cap its
//!   backlog would fill every slot and hold up every other shop's callbacks.
//! * The URL is the shop's, and the controller sits inside an operator's network: unless the
//!   operator allows it (`allow_private`), a callback goes only to public addresses. Names are
//!   resolved by a resolver that drops private, loopback and link-local answers (so a name cannot
//!   be re-pointed at the inside between check and connect), IP literals are checked before the
//!   request, redirects are not followed, and no proxy from the environment is used.

use crate::metrics::Metrics;
use crate::store::{sign_callback, Callback, Ledger};
use crate::unix_ms;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Callbacks in flight at once.
pub const CONCURRENCY: usize = 32;
/// Callbacks in flight to one host (name and port) at once.
pub const PER_HOST: usize = 2;
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

/// Whether a callback may be sent to `ip` when private targets are not allowed: only addresses
/// on the public internet, not loopback, private, link-local, shared (CGNAT), documentation,
/// benchmarking, reserved, multicast or unspecified ones, in IPv4 or IPv6 (IPv4-mapped and NAT64
/// forms are judged by the IPv4 address inside).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::from(0u128))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

/// Why a callback URL is refused when private targets are not allowed, judged without DNS (an
/// IP literal or `localhost`); names are judged again when they are resolved.
pub fn refusal(url: &str) -> Option<String> {
    let parsed = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return Some(format!("is not a URL ({e})")),
    };
    let Some(host) = parsed.host_str() else {
        return Some("has no host".into());
    };
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let private = match literal.parse::<IpAddr>() {
        Ok(ip) => !is_public(ip),
        Err(_) => {
            let d = host.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
    };
    private.then(|| {
        "points at a loopback, private or reserved address; callbacks go only to the shop's \
         public server"
            .into()
    })
}

/// The host (and port) a callback goes to: the unit of [`PER_HOST`].
fn host_key(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or_default().to_ascii_lowercase(),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_owned(),
    }
}

/// A resolver that answers only public addresses (see the module docs).
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address; callbacks go only to the shop's public \
                     server (an operator can allow private ones with --allow-private-callbacks)"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

fn client(allow_private: bool) -> reqwest::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if allow_private {
        builder.build()
    } else {
        builder.dns_resolver(Arc::new(PublicOnly)).build()
    }
}

/// Starts the sender; `wake` is notified when new callbacks may be owed. `allow_private` lets
/// callbacks reach loopback and private networks (a shop's server inside the operator's network,
/// the demo, tests).
pub fn start<L: Ledger + Clone + 'static>(
    store: L,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    allow_private: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = match client(allow_private) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot build the HTTP client; callbacks are not sent");
                return;
            }
        };
        let mut running: JoinSet<()> = JoinSet::new();
        // Task → (callback, host), so that a send that panicked frees its slots too.
        let mut tasks: HashMap<tokio::task::Id, (u64, String)> = HashMap::new();
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut per_host: HashMap<String, usize> = HashMap::new();
        loop {
            let free = CONCURRENCY - running.len();
            if free > 0 {
                let now = unix_ms();
                // Hosts this pass fills up count too, so one pass never exceeds PER_HOST.
                let mut planned = per_host.clone();
                let due = store.due_callbacks(now, free, &mut |id, cb| {
                    if in_flight.contains(&id) {
                        return false;
                    }
                    let n = planned.entry(host_key(&cb.url)).or_default();
                    if *n >= PER_HOST {
                        return false;
                    }
                    *n += 1;
                    true
                });
                match due {
                    Ok(due) => {
                        for (id, cb) in due {
                            let host = host_key(&cb.url);
                            *per_host.entry(host.clone()).or_default() += 1;
                            in_flight.insert(id);
                            let (client, store, metrics) =
                                (client.clone(), store.clone(), metrics.clone());
                            let task = running.spawn(async move {
                                send(&client, &store, &metrics, allow_private, id, cb).await;
                            });
                            tasks.insert(task.id(), (id, host));
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot read owed callbacks"),
                }
            }
            tokio::select! {
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    let task = match &done {
                        Ok((task, ())) => *task,
                        Err(e) => {
                            warn!(error = %e, "a callback send failed unexpectedly; it will be retried");
                            e.id()
                        }
                    };
                    if let Some((id, host)) = tasks.remove(&task) {
                        in_flight.remove(&id);
                        if let Some(n) = per_host.get_mut(&host) {
                            *n -= 1;
                            if *n == 0 {
                                per_host.remove(&host);
                            }
                        }
                    }
                }
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE) => {}
            }
        }
    })
}

async fn send<L: Ledger>(
    client: &reqwest::Client,
    store: &L,
    metrics: &Metrics,
    allow_private: bool,
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
    let error = match refusal(&cb.url).filter(|_| !allow_private) {
        Some(why) => Some(format!("the callback URL {why}")),
        None => {
            let signature = format!("sha256={}", sign_callback(&secret, &body));
            let result = client
                .post(&cb.url)
                .header("content-type", "application/json")
                .header("x-signature", signature)
                .header("x-receipt-id", &cb.receipt)
                .body(body)
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("the shop's server answered {}", r.status())),
                Err(e) => Some(format!("cannot reach the shop's server: {}", chain(&e))),
            }
        }
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

/// An error with its causes, so that the resolver's refusal reaches the log and the stored
/// `last_error` instead of reqwest's bare "error sending request".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} is not public");
        }
        for ip in [
            "8.8.8.8",
            "77.88.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "198.20.0.1",
            "2a02:6b8::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn literal_and_localhost_urls_are_refused_without_dns() {
        for url in [
            "http://127.0.0.1:8080/cb",
            "https://[::1]/cb",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost/cb",
            "http://LOCALHOST./cb",
            "http://shop.localhost/cb",
            "http://[::ffff:192.168.0.1]/cb",
        ] {
            assert!(refusal(url).is_some(), "{url}");
        }
        for url in ["https://shop.example.ru/cb", "http://8.8.8.8/cb"] {
            assert_eq!(refusal(url), None, "{url}");
        }
    }

    #[test]
    fn hosts_are_keyed_by_name_and_port() {
        assert_eq!(host_key("https://Shop.example.ru/a"), "shop.example.ru:443");
        assert_eq!(
            host_key("http://shop.example.ru/b?x=1"),
            "shop.example.ru:80"
        );
        assert_eq!(
            host_key("http://shop.example.ru:8080/"),
            "shop.example.ru:8080"
        );
    }

    #[tokio::test]
    async fn names_that_resolve_inside_are_refused() {
        let e = match PublicOnly.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("no public address"), "{e}");
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff_ms(0), 1000);
        assert_eq!(backoff_ms(1), 2000);
        assert_eq!(backoff_ms(11), 2_048_000);
        assert_eq!(backoff_ms(12), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(u32::MAX), MAX_BACKOFF_MS);
    }
}
