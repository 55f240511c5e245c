//! The admin API (tower `oneshot`, no sockets) and the command line (a real child process).
#![allow(clippy::unwrap_used)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use controller::admin::{self, AdminState, ADMIN_SECRET_FILE};
use controller::store::Store;
use protocol::tunnel::EnrollToken;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use tower::ServiceExt;

async fn setup() -> (tempfile::TempDir, axum::Router, String, [u8; 32]) {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("controller.redb")).unwrap();
    let ca = controller::ca::Ca::open_or_create(dir.path()).unwrap();
    let hash = admin::ensure_admin_secret(dir.path(), &store)
        .await
        .unwrap();
    let secret = std::fs::read_to_string(dir.path().join(ADMIN_SECRET_FILE))
        .unwrap()
        .trim()
        .to_owned();
    let app = admin::app(AdminState::new(
        store,
        ca.fingerprint(),
        hash,
        dir.path().to_owned(),
    ));
    (dir, app, secret, ca.fingerprint())
}

fn post(auth: Option<&str>, body: &str) -> Request<Body> {
    let mut r = Request::post("/admin/agent-tokens").header("content-type", "application/json");
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.body(Body::from(body.to_owned())).unwrap()
}

async fn json(resp: axum::response::Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn tokens_need_the_admin_credential() {
    let (dir, app, secret, ca_fp) = setup().await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ADMIN_SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for auth in [None, Some("Bearer wrong"), Some("Basic abc")] {
        let resp = app.clone().oneshot(post(auth, "")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let body = json(resp).await;
        assert!(
            body["error"].as_str().unwrap().contains("admin.secret"),
            "{body}"
        );
    }
    let bearer = format!("Bearer {secret}");
    let resp = app.clone().oneshot(post(Some(&bearer), "")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body = json(resp).await;
    let token = EnrollToken::parse(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(token.ca_sha256, ca_fp);

    let resp = app
        .clone()
        .oneshot(post(Some(&bearer), r#"{"ttlSeconds": 60}"#))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body = json(resp).await;
    let now = controller::unix_ms() / 1000;
    let exp = body["expiresAt"].as_u64().unwrap();
    assert!(exp >= now + 59 && exp <= now + 61, "{body}");

    for bad in [r#"{"ttlSeconds": 0}"#, "{not json", r#"{"ttl": 5}"#] {
        let resp = app.clone().oneshot(post(Some(&bearer), bad)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
    }

    // A restart keeps the same credential.
    drop(app);
}

/// Reads the child's stdout until the `<what> listening on ADDR` line.
fn listening(lines: &mut impl Iterator<Item = std::io::Result<String>>, what: &str) -> String {
    for line in lines {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix(&format!("{what} listening on ")) {
            return addr.to_owned();
        }
    }
    panic!("the controller exited before listening for {what}");
}

#[test]
fn the_command_line_serves_and_creates_tokens() {
    let exe = env!("CARGO_BIN_EXE_controller");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // No controller running: a clear error and a non-zero exit.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(ADMIN_SECRET_FILE), "x").unwrap();
    let out = Command::new(exe)
        .args(["agent-token", "create", "--data"])
        .arg(&data)
        .args(["--http", &port.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not reachable") && err.contains("controller serve"),
        "{err}"
    );
    std::fs::remove_file(data.join(ADMIN_SECRET_FILE)).unwrap();

    let mut child = Command::new(exe)
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let quic = listening(&mut lines, "quic");
    let http = listening(&mut lines, "http");
    assert!(quic.starts_with("127.0.0.1:"));

    let out = Command::new(exe)
        .args(["agent-token", "create", "--data"])
        .arg(&data)
        .args(["--http", &http, "--ttl-seconds", "120"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    EnrollToken::parse(last).unwrap();

    // Graceful stop on SIGTERM.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(data.join("ca.cert.pem").exists() && data.join("controller.redb").exists());
}
