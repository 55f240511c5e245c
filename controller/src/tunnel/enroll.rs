//! Enrollment: one request, one answer, on a connection with ALPN `kkt-enroll/1` and no client
//! certificate. The one-time token authenticates the agent; the CA fingerprint in the token lets
//! the agent authenticate us.
//!
//! Durable when: the token is marked used in the same transaction that registers the agent and
//! its certificate fingerprint, and the answer is sent only after that commit. A certificate
//! signed for a request whose token then turned out to be used is never sent and, not being
//! recorded, would not open a tunnel anyway.

use super::conn::{close_code, reject};
use super::frame::{read_frame, write_frame};
use super::{Inner, TunnelEvent};
use crate::rules::{TokenRecord, TokenRefusal};
use crate::store::{AgentRecord, FleetStore, Store, StoreError, TokenLookup};
use crate::unix_ms;
use protocol::tunnel::{
    EnrollRequest, EnrollResponse, EnrollToken, IssuedCertificate, TUNNEL_VERSION,
};
use quinn::Connection;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// A token not used within this time expires.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest name an agent may give itself (it shows in the cabinet).
const MAX_NAME: usize = 200;

/// Makes a one-time enrollment token valid for `ttl` and stores only the hash of its secret.
/// Returns the printable token and its expiry (Unix milliseconds).
pub async fn create_enroll_token(
    store: &Store,
    ca_fingerprint: [u8; 32],
    ttl: Duration,
) -> Result<(String, u64), StoreError> {
    let mut secret = [0u8; 16];
    rand::fill(&mut secret);
    let now = unix_ms();
    let expires_at = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    let hash: [u8; 32] = Sha256::digest(secret).into();
    store
        .create_token(
            hash,
            TokenRecord {
                created_at: now,
                expires_at,
                used: None,
            },
        )
        .await?;
    let token = EnrollToken {
        secret,
        ca_sha256: ca_fingerprint,
    };
    Ok((token.encode(), expires_at))
}

pub(super) async fn serve<S: FleetStore>(inner: Arc<Inner<S>>, conn: Connection) {
    let exchange = tokio::time::timeout(inner.config.hello_timeout, async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let request: EnrollRequest = read_frame(&mut recv, &mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let response = enroll(&inner, request).await;
        write_frame(&mut send, &response)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        // Wait until the agent has the answer before closing (closing discards unsent data).
        let _ = send.stopped().await;
        Ok::<_, String>(())
    })
    .await;
    match exchange {
        Ok(Ok(())) => conn.close(close_code::DONE, b"enrollment answered"),
        Ok(Err(e)) => reject(
            &inner,
            &conn,
            None,
            close_code::PROTOCOL,
            &format!("enrollment failed: {e}"),
        ),
        Err(_) => reject(
            &inner,
            &conn,
            None,
            close_code::PROTOCOL,
            "no enrollment request in time",
        ),
    }
}

fn refused(reason: impl Into<String>) -> EnrollResponse {
    let reason = reason.into();
    warn!(reason, "enrollment refused");
    EnrollResponse::Refused { reason }
}

async fn enroll<S: FleetStore>(inner: &Inner<S>, req: EnrollRequest) -> EnrollResponse {
    if req.version != TUNNEL_VERSION {
        return refused(format!(
            "enrollment version {} is not supported (this controller speaks {TUNNEL_VERSION}); update the agent",
            req.version
        ));
    }
    if req.name.chars().count() > MAX_NAME {
        return refused(format!(
            "the agent name is longer than {MAX_NAME} characters"
        ));
    }
    // The token is never logged: it is a credential until used.
    let token = match EnrollToken::parse(&req.token) {
        Ok(t) => t,
        Err(e) => return refused(e.to_string()),
    };
    if token.ca_sha256 != inner.ca.fingerprint() {
        return refused(
            "this token was made by another controller (its CA fingerprint differs); \
             create the token on the controller you enroll with",
        );
    }
    let hash: [u8; 32] = Sha256::digest(token.secret).into();
    let now = unix_ms();
    match inner.store.check_token(&hash, now) {
        Ok(()) => {}
        Err(TokenLookup::Refused(r)) => return refused(r.to_string()),
        Err(TokenLookup::Store(e)) => {
            error!(error = %e, "store read failed during enrollment");
            return refused("the controller cannot read its store right now; retry later");
        }
    }
    let mut id = [0u8; 8];
    rand::fill(&mut id);
    let agent_id = format!("agt-{}", protocol::tunnel::hex(&id));
    let issued =
        match inner
            .ca
            .issue_agent(&agent_id, &req.csr_pem, inner.config.agent_cert_validity)
        {
            Ok(i) => i,
            Err(e) => return refused(e.to_string()),
        };
    let record = AgentRecord {
        id: agent_id.clone(),
        name: req.name.clone(),
        enrolled_at: now,
        cert_fingerprint: issued.fingerprint,
        cert_not_after: issued.not_after,
        revoked: false,
        store_epoch: None,
        applied_upto: 0,
        last_seen: now,
    };
    match inner.store.enroll(hash, record, now).await {
        Ok(Ok(())) => {}
        Ok(Err(r @ (TokenRefusal::Used | TokenRefusal::Expired | TokenRefusal::Unknown))) => {
            return refused(r.to_string())
        }
        Err(e) => {
            error!(error = %e, "enrollment could not be recorded");
            return refused("the controller could not record the enrollment; retry later");
        }
    }
    info!(
        agent = agent_id,
        name = req.name,
        not_after = issued.not_after,
        "agent enrolled"
    );
    inner.emit(TunnelEvent::Enrolled {
        agent: agent_id.clone(),
        name: req.name,
    });
    EnrollResponse::Enrolled {
        agent_id,
        certificate: IssuedCertificate {
            cert_pem: issued.cert_pem,
            ca_pem: inner.ca.cert_pem().to_owned(),
            not_after: issued.not_after,
        },
    }
}
