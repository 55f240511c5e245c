//! Enrollment and who may open a tunnel.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use controller::ca::fingerprint;
use controller::rules::TokenRecord;
use controller::tunnel::TunnelEvent;
use protocol::tunnel::{ControllerMessage, EnrollResponse, EnrollToken, JournalSummary};
use rcgen::{CertificateParams, DistinguishedName, DnType, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::time::Duration;

#[tokio::test]
async fn enrollment_issues_a_certificate_and_a_token_works_once() {
    let c = start().await;
    let token = c.token().await;
    // The token pins the CA the agent finds in the data directory.
    let parsed = EnrollToken::parse(&token).unwrap();
    assert_eq!(parsed.ca_sha256, fingerprint(&c.ca_der()));

    let (_key, csr) = key_and_csr();
    let resp = enroll(c.addr(), c.ca_der(), &token, &csr, "shelf 1").await;
    let EnrollResponse::Enrolled {
        agent_id,
        certificate,
    } = resp
    else {
        panic!("refused: {resp:?}")
    };
    assert!(agent_id.starts_with("agt-"));
    let ca_from_answer = CertificateDer::from_pem_slice(certificate.ca_pem.as_bytes()).unwrap();
    assert_eq!(fingerprint(&ca_from_answer), parsed.ca_sha256);
    let now = controller::unix_ms() / 1000;
    assert!(
        certificate.not_after > now + 29 * 24 * 3600,
        "30 days by default"
    );
    let record = c.tunnel.store().agent(&agent_id).unwrap().unwrap();
    assert_eq!(record.name, "shelf 1");

    // Same token again: refused, and it says why.
    let (_key2, csr2) = key_and_csr();
    match enroll(c.addr(), c.ca_der(), &token, &csr2, "shelf 2").await {
        EnrollResponse::Refused { reason } => assert!(reason.contains("already used"), "{reason}"),
        other => panic!("a reused token must be refused, got {other:?}"),
    }
    assert_eq!(c.tunnel.store().agents().unwrap().len(), 1);
}

#[tokio::test]
async fn expired_unknown_malformed_and_foreign_tokens_are_refused() {
    let c = start().await;
    let (_key, csr) = key_and_csr();

    // Expired: stored with an expiry in the past.
    let secret = [0x42u8; 16];
    let hash: [u8; 32] = Sha256::digest(secret).into();
    let now = controller::unix_ms();
    c.tunnel
        .store()
        .create_token(
            hash,
            TokenRecord {
                created_at: now - 10_000,
                expires_at: now - 1,
                used: None,
            },
        )
        .await
        .unwrap();
    let ca_sha256 = c.tunnel.ca().fingerprint();
    let expired = EnrollToken { secret, ca_sha256 }.encode();
    let unknown = EnrollToken {
        secret: [0x43; 16],
        ca_sha256,
    }
    .encode();
    let foreign = EnrollToken {
        secret,
        ca_sha256: [0; 32],
    }
    .encode();
    for (token, expect) in [
        (expired.as_str(), "expired"),
        (unknown.as_str(), "unknown"),
        ("kt1.nonsense", "malformed"),
        (foreign.as_str(), "another controller"),
    ] {
        match enroll(c.addr(), c.ca_der(), token, &csr, "x").await {
            EnrollResponse::Refused { reason } => assert!(reason.contains(expect), "{reason}"),
            other => panic!("{expect}: expected a refusal, got {other:?}"),
        }
    }
    // A bad CSR with a good token is refused and does not burn the token.
    let good = c.token().await;
    match enroll(c.addr(), c.ca_der(), &good, "not a csr", "x").await {
        EnrollResponse::Refused { reason } => {
            assert!(reason.contains("signing request"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        enroll(c.addr(), c.ca_der(), &good, &csr, "x").await,
        EnrollResponse::Enrolled { .. }
    ));
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let impostor = foreign_credentials();
    // connect() may succeed (TLS 1.3): the refusal shows on the first stream operation.
    if let Ok(mut a) = connect(c.addr(), c.ca_der(), Some(&impostor)).await {
        let sent = a
            .send(&hello(&impostor.agent_id, 1, JournalSummary::default()))
            .await;
        if sent.is_ok() {
            assert!(
                a.recv().await.is_err(),
                "the impostor must not get an answer"
            );
        }
    }
    let e = wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::ConnectionRejected { .. })
    })
    .await;
    let TunnelEvent::ConnectionRejected { reason, .. } = e else {
        unreachable!()
    };
    assert!(reason.contains("handshake"), "{reason}");
    assert!(c.tunnel.agents().is_empty());
}

#[tokio::test]
async fn a_tunnel_without_a_certificate_is_closed_with_a_reason() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let mut a = connect(c.addr(), c.ca_der(), None).await.unwrap();
    let _ = a
        .send(&hello("agt-nobody", 1, JournalSummary::default()))
        .await;
    let reason = a.closed_reason().await;
    assert!(reason.contains("no client certificate"), "{reason}");
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::ConnectionRejected { reason, .. } if reason.contains("no client certificate"))
    })
    .await;
}

#[tokio::test]
async fn an_expired_certificate_of_an_enrolled_agent_is_refused() {
    let c = start().await;
    let creds = c.enroll_agent("shelf").await;
    // Sign a certificate for the same agent that has already expired, with the real CA key, and
    // record it as the agent's: only the expiry is wrong.
    let key = KeyPair::try_from(creds.key_der.as_slice()).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(c.dir.path().join("ca.key.pem")).unwrap())
            .unwrap();
    let issuer = Issuer::from_ca_cert_der(&c.ca_der(), ca_key).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, creds.agent_id.as_str());
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(7200);
    params.not_after = now - Duration::from_secs(3600);
    let cert = params.signed_by(&key, &issuer).unwrap();
    c.tunnel
        .store()
        .add_certificate(&creds.agent_id, fingerprint(cert.der()), 0)
        .await
        .unwrap();
    let expired = Credentials {
        cert: cert.der().clone(),
        ..creds.clone()
    };

    let mut events = c.tunnel.subscribe();
    if let Ok(mut a) = connect(c.addr(), c.ca_der(), Some(&expired)).await {
        if a.send(&hello(&expired.agent_id, 1, JournalSummary::default()))
            .await
            .is_ok()
        {
            assert!(a.recv().await.is_err());
        }
    }
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::ConnectionRejected { .. })
    })
    .await;

    // The valid certificate still works.
    let mut ok = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    ok.hello(1, JournalSummary::default()).await;
}

#[tokio::test]
async fn renewal_issues_a_certificate_that_opens_the_tunnel() {
    let c = start().await;
    let creds = c.enroll_agent("shelf").await;
    let mut a = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    a.hello(1, JournalSummary::default()).await;
    let (key, csr) = key_and_csr();
    a.send(&protocol::tunnel::AgentMessage::Renew { csr_pem: csr })
        .await
        .unwrap();
    let issued = match a.recv().await.unwrap() {
        ControllerMessage::Renewed(Ok(i)) => i,
        other => panic!("expected a renewed certificate, got {other:?}"),
    };
    let renewed = Credentials {
        agent_id: creds.agent_id.clone(),
        cert: CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap(),
        key_der: key.serialize_der(),
    };
    let mut events = c.tunnel.subscribe();
    let mut b = connect(c.addr(), c.ca_der(), Some(&renewed)).await.unwrap();
    b.hello(1, JournalSummary::default()).await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::AgentConnected { agent } if *agent == creds.agent_id),
    )
    .await;
    // The first connection was superseded.
    let reason = a.closed_reason().await;
    assert!(reason.contains("superseded"), "{reason}");
}
