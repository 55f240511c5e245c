//! The controller's certificate authority: one ECDSA P-256 key and self-signed certificate kept in
//! the data directory (`ca.key.pem`, `ca.cert.pem`), made at first start.
//!
//! It issues the controller's own QUIC server certificate (fresh key at every start; nothing to
//! keep) and the agents' client certificates from their CSRs (the agent's key never leaves it).
//! The agent id is the certificate's common name; the controller additionally keeps the SHA-256 of
//! every certificate it issued, so a certificate is recognised by its fingerprint, not by trusting
//! a name.
//!
//! Losing `ca.key.pem` means every agent must enroll again; it is written with mode 0600.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use time::OffsetDateTime;

pub const CA_KEY_FILE: &str = "ca.key.pem";
pub const CA_CERT_FILE: &str = "ca.cert.pem";

/// Agent certificates live this long unless configured otherwise; agents renew before expiry.
pub const DEFAULT_AGENT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// The CA itself: long, because replacing it means re-enrolling every agent.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// The server certificate is re-issued at every start; this only bounds a very long uptime.
const SERVER_VALIDITY: Duration = Duration::from_secs(397 * 24 * 3600);
/// Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

#[derive(Debug, Error)]
pub enum CaError {
    #[error(
        "cannot read or write {path}: {source}; check the --data directory and its permissions"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{present} exists but {missing} does not; restore {missing} from a backup, or move both files away to create a new CA (every agent must then enroll again)")]
    HalfPresent { present: PathBuf, missing: PathBuf },
    #[error("{path} is not a usable CA file ({reason}); restore it from a backup")]
    Unreadable { path: PathBuf, reason: String },
    #[error("the certificate signing request is not valid ({0}); make a new one")]
    BadCsr(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate issued to an agent.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub fingerprint: [u8; 32],
    /// Unix seconds.
    pub not_after: u64,
}

/// The controller's QUIC identity.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The CA: its key, its certificate, and the issuer built from them.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &protocol::tunnel::hex(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a certificate's DER: how the controller and the enrollment token name a
/// certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn offset_time(t: std::time::SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    // A positive integer in DER: clear the top bit.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Writes a file atomically (temporary file, then rename), with `mode` on Unix.
pub(crate) fn write_private(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = options.open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Make the rename durable; not every platform can open a directory, so best effort.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Ca {
    /// Loads the CA from `data`, or creates it there when neither file exists.
    pub fn open_or_create(data: &Path) -> Result<Ca, CaError> {
        let key_path = data.join(CA_KEY_FILE);
        let cert_path = data.join(CA_CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Self::load(&key_path, &cert_path),
            (false, false) => {
                std::fs::create_dir_all(data).map_err(io_err(data))?;
                let ca = Self::generate()?;
                // Key first: a crash in between leaves a key without a certificate, which the
                // next start reports instead of silently making a second CA.
                write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes(), 0o600)
                    .map_err(io_err(&key_path))?;
                write_private(&cert_path, ca.cert_pem.as_bytes(), 0o644)
                    .map_err(io_err(&cert_path))?;
                tracing::info!(
                    fingerprint = %protocol::tunnel::hex(&ca.fingerprint),
                    "created a new agent CA in the data directory"
                );
                Ok(ca)
            }
            (true, false) => Err(CaError::HalfPresent {
                present: key_path,
                missing: cert_path,
            }),
            (false, true) => Err(CaError::HalfPresent {
                present: cert_path,
                missing: key_path,
            }),
        }
    }

    fn generate() -> Result<Ca, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "KKT cloud balancer agent CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = std::time::SystemTime::now();
        params.not_before = offset_time(now - CLOCK_SKEW);
        params.not_after = offset_time(now + CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(Ca {
            fingerprint: fingerprint(&cert_der),
            cert_pem: cert.pem(),
            cert_der,
            issuer: Issuer::new(params, key),
        })
    }

    fn load(key_path: &Path, cert_path: &Path) -> Result<Ca, CaError> {
        let key_pem = std::fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Unreadable {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
        let unreadable = |reason: String| CaError::Unreadable {
            path: cert_path.to_owned(),
            reason,
        };
        use rustls_pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| unreadable(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| unreadable(e.to_string()))?;
        Ok(Ca {
            fingerprint: fingerprint(&cert_der),
            cert_pem,
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate DER: what enrollment tokens pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// A fresh key and certificate for the controller's QUIC endpoint, valid for `localhost`,
    /// the loopback addresses and `extra_names` (host names or IP addresses agents dial).
    pub fn server_identity(&self, extra_names: &[String]) -> Result<ServerIdentity, CaError> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
        for n in extra_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "KKT cloud balancer controller");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = std::time::SystemTime::now();
        params.not_before = offset_time(now - CLOCK_SKEW);
        params.not_after = offset_time(now + SERVER_VALIDITY);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerIdentity {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Signs an agent's CSR. Only the CSR's public key is used: the name, usages and validity are
    /// the controller's choice, so an agent cannot ask for another agent's name or a CA bit.
    pub fn issue_agent(
        &self,
        agent_id: &str,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = std::time::SystemTime::now();
        let not_after = now + validity;
        params.not_before = offset_time(now - CLOCK_SKEW);
        params.not_after = offset_time(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let cert_der = cert.der().clone();
        Ok(Issued {
            fingerprint: fingerprint(&cert_der),
            cert_pem: cert.pem(),
            cert_der,
            not_after: not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn created_once_and_loaded_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ca::open_or_create(dir.path()).unwrap();
        let b = Ca::open_or_create(dir.path()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), fingerprint(b.cert_der()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A loaded CA still issues.
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = b
            .issue_agent("agent-1", &csr, Duration::from_secs(60))
            .unwrap();
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn half_a_ca_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        Ca::open_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let e = Ca::open_or_create(dir.path()).unwrap_err();
        assert!(e.to_string().contains("restore"), "{e}");
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(dir.path()).unwrap();
        assert!(matches!(
            ca.issue_agent("a", "not a csr", DEFAULT_AGENT_VALIDITY),
            Err(CaError::BadCsr(_))
        ));
    }
}
