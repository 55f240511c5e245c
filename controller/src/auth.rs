//! The two checks every guarded route makes: read a bearer credential, and compare digests of
//! secrets without leaking through timing how much of them matched.

use axum::http::{header, HeaderMap};

/// The credential of an `Authorization: Bearer <credential>` header, trimmed.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Equality of two digests in constant time.
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}
