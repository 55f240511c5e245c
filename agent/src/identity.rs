//! The agent's identity: its key (made here, never sent anywhere), its certificate signed by the
//! controller's CA, and the CA certificate it trusts. Enrollment turns a one-time token into that
//! identity; from then on the tunnel is mutual TLS only.
//!
//! Files in the data directory: `agent.key.pem` (0600), `agent.cert.pem`, `ca.cert.pem`,
//! `identity.json` (agent id, controller address, certificate expiry).

use protocol::tunnel::{
    decode_frame, encode_frame, frame_len, EnrollRequest, EnrollResponse, EnrollToken,
    IssuedCertificate, ALPN_ENROLL, ALPN_TUNNEL, TUNNEL_VERSION,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("{0}")]
    Token(#[from] protocol::tunnel::TokenError),
    #[error("cannot resolve controller address {0:?}: give HOST:PORT")]
    Address(String),
    #[error("cannot reach the controller at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the controller refused enrollment: {0}; ask the operator for a new token")]
    Refused(String),
    #[error("the controller's CA does not match the fingerprint in the token: wrong controller or a tampered token")]
    CaMismatch,
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("this agent is not enrolled ({0} missing): run `agent enroll --controller HOST:PORT --token TOKEN --data DIR` first")]
    NotEnrolled(String),
    #[error("key or certificate: {0}")]
    Crypto(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// What `identity.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub agent_id: String,
    pub controller: String,
    pub name: String,
    /// Certificate expiry, Unix seconds.
    pub not_after: u64,
}

pub struct Identity {
    pub info: IdentityInfo,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn paths(data: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        data.join("agent.key.pem"),
        data.join("agent.cert.pem"),
        data.join("ca.cert.pem"),
        data.join("identity.json"),
    )
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A new key and a CSR for it; the key stays with the caller.
pub fn new_key_and_csr(name: &str) -> Result<(rcgen::KeyPair, String), IdentityError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    Ok((key, csr))
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Trusts the server only if its chain contains the CA whose fingerprint the token pins, and the
/// server certificate verifies against that CA. Used once, for enrollment.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256(c.as_ref()) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General("the controller did not present the pinned CA".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Idle timeout of the tunnel unless configured otherwise; QUIC uses the smaller of both sides'.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn transport(idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Keep-alive well below the idle timeout so a quiet but healthy link stays up; a dead one is
    // noticed within the idle timeout.
    t.keep_alive_interval(Some(idle / 3));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t
}

fn quic_client(
    mut tls: rustls::ClientConfig,
    alpn: &[u8],
    idle: Duration,
) -> Result<quinn::ClientConfig, IdentityError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport(idle)));
    Ok(cfg)
}

/// Resolves `HOST:PORT` and the TLS server name (the host part).
pub async fn resolve(controller: &str) -> Result<(SocketAddr, String), IdentityError> {
    let host = controller
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .ok_or_else(|| IdentityError::Address(controller.to_owned()))?;
    let addr = tokio::net::lookup_host(controller)
        .await
        .map_err(|_| IdentityError::Address(controller.to_owned()))?
        .next()
        .ok_or_else(|| IdentityError::Address(controller.to_owned()))?;
    Ok((addr, host))
}

/// A client endpoint on an ephemeral local port of the right address family.
pub fn endpoint_for(addr: SocketAddr) -> Result<quinn::Endpoint, IdentityError> {
    let local: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| IdentityError::Address("[::]:0".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| IdentityError::Address("0.0.0.0:0".into()))?
    };
    quinn::Endpoint::client(local).map_err(|e| IdentityError::Connect {
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// Enrolls: makes a key and CSR here, sends the CSR with the token, stores what comes back.
pub async fn enroll(
    controller: &str,
    token: &str,
    data: &Path,
    name: &str,
) -> Result<IdentityInfo, IdentityError> {
    let token_parsed = EnrollToken::parse(token)?;
    std::fs::create_dir_all(data).map_err(|e| file_err(data, e))?;
    let (key, csr_pem) = new_key_and_csr(name)?;
    let (addr, host) = resolve(controller).await?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Crypto(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin: token_parsed.ca_sha256,
            provider: provider(),
        }))
        .with_no_client_auth();
    let endpoint = endpoint_for(addr)?;
    let connect_err = |e: String| IdentityError::Connect {
        addr: controller.to_owned(),
        reason: e,
    };
    let conn = endpoint
        .connect_with(
            quic_client(tls, ALPN_ENROLL, DEFAULT_IDLE_TIMEOUT)?,
            addr,
            &host,
        )
        .map_err(|e| connect_err(e.to_string()))?
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let req = EnrollRequest {
        version: TUNNEL_VERSION,
        token: token.trim().to_owned(),
        csr_pem,
        name: name.to_owned(),
    };
    let frame = encode_frame(&req).map_err(|e| IdentityError::Protocol(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let _ = send.finish();
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let len = frame_len(prefix).map_err(|e| IdentityError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let resp: EnrollResponse =
        decode_frame(&body).map_err(|e| IdentityError::Protocol(e.to_string()))?;
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    match resp {
        EnrollResponse::Refused { reason } => Err(IdentityError::Refused(reason)),
        EnrollResponse::Enrolled {
            agent_id,
            certificate,
        } => {
            let info = IdentityInfo {
                agent_id,
                controller: controller.to_owned(),
                name: name.to_owned(),
                not_after: certificate.not_after,
            };
            store(
                data,
                &info,
                &key.serialize_pem(),
                &certificate,
                Some(token_parsed.ca_sha256),
            )?;
            Ok(info)
        }
    }
}

/// Writes the identity files. With `pin`, the CA must match it.
pub fn store(
    data: &Path,
    info: &IdentityInfo,
    key_pem: &str,
    cert: &IssuedCertificate,
    pin: Option<[u8; 32]>,
) -> Result<(), IdentityError> {
    let ca = CertificateDer::from_pem_slice(cert.ca_pem.as_bytes())
        .map_err(|e| IdentityError::Crypto(format!("CA certificate: {e}")))?;
    if let Some(pin) = pin {
        if sha256(ca.as_ref()) != pin {
            return Err(IdentityError::CaMismatch);
        }
    }
    let (key_path, cert_path, ca_path, info_path) = paths(data);
    write_private(&key_path, key_pem)?;
    std::fs::write(&cert_path, &cert.cert_pem).map_err(|e| file_err(&cert_path, e))?;
    std::fs::write(&ca_path, &cert.ca_pem).map_err(|e| file_err(&ca_path, e))?;
    let json = serde_json::to_string_pretty(info).map_err(|e| file_err(&info_path, e))?;
    std::fs::write(&info_path, json).map_err(|e| file_err(&info_path, e))?;
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> Result<(), IdentityError> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| file_err(path, e))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| file_err(path, e))
}

/// Loads the identity written by [`enroll`].
pub fn load(data: &Path) -> Result<Identity, IdentityError> {
    let (key_path, cert_path, ca_path, info_path) = paths(data);
    for p in [&key_path, &cert_path, &ca_path, &info_path] {
        if !p.exists() {
            return Err(IdentityError::NotEnrolled(p.display().to_string()));
        }
    }
    let info: IdentityInfo = serde_json::from_str(
        &std::fs::read_to_string(&info_path).map_err(|e| file_err(&info_path, e))?,
    )
    .map_err(|e| file_err(&info_path, e))?;
    let cert_chain = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| file_err(&cert_path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(&cert_path, e))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
    let ca = CertificateDer::from_pem_file(&ca_path).map_err(|e| file_err(&ca_path, e))?;
    Ok(Identity {
        info,
        cert_chain,
        key,
        ca,
    })
}

/// The mutual-TLS client configuration of the tunnel.
pub fn tunnel_config(id: &Identity, idle: Duration) -> Result<quinn::ClientConfig, IdentityError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(id.ca.clone())
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Crypto(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    quic_client(tls, ALPN_TUNNEL, idle)
}
