//! TLS for the tunnel: TLS 1.3 only, ring as the only provider, the controller's CA as the only
//! trust root on both sides.
//!
//! The server asks for a client certificate but admits connections without one
//! (`allow_unauthenticated`), because enrollment happens before the agent has a certificate. The
//! rule "the tunnel ALPN needs a verified certificate of an enrolled agent" is enforced by the
//! connection handler right after the handshake. A certificate that does not chain to our CA (or
//! has expired) fails the handshake itself; with TLS 1.3 the client learns it only on its first
//! stream operation.

use crate::ca::{Ca, CaError};
use protocol::tunnel::{ALPN_ENROLL, ALPN_TUNNEL};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Both sides drop a connection silent for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// QUIC keep-alive, well below the idle timeout so a few lost packets do not kill the link.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC does not accept this TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings shared by both sides (mini-redis style: limits set where they are decided).
pub fn transport(max_bidi_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    // 30 s fits in a VarInt; the fallback never triggers.
    t.max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // One bidirectional stream per connection carries the whole tunnel; refuse more.
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

/// The controller's QUIC server configuration.
pub fn server_config(ca: &Ca, server_names: &[String]) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let identity = ca.server_identity(server_names)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN_TUNNEL.to_vec(), ALPN_ENROLL.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport(1)));
    Ok(config)
}

/// A client configuration trusting only `ca`, with an optional client certificate. Used by the
/// tests' fake agents; the real agent builds the same.
pub fn client_config(
    ca: CertificateDer<'static>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport(0)));
    Ok(config)
}
