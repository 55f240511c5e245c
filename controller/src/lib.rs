//! The controller (DESIGN.md §4). This crate holds, so far, the controller's side of the edge link
//! (issue 3): the agent CA, the durable store of agents, registers and jobs, the QUIC tunnel with
//! enrollment, and the operator's admin API for enrollment tokens. The REST API and the balancer
//! (issue 4) drive [`tunnel::Tunnel`].
//!
//! Layout follows the "pure core, thin async shell" rule: [`rules`] decides (the pure core), [`store`] makes the
//! decisions durable in one transaction each, [`tunnel`] moves bytes.

pub mod admin;
pub mod api;
pub mod auth;
pub mod balancer;
pub mod ca;
pub mod callbacks;
pub mod dispatcher;
pub mod metrics;
pub mod openapi;
pub mod rules;
pub mod server;
pub mod store;
pub mod tunnel;

/// Wall-clock time in Unix milliseconds, the unit of every timestamp the controller stores.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Installs ring as the process's TLS provider; call once at the top of `main` and in tests.
/// A second call (another test in the same process) is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
