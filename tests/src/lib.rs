//! Whole-system tests and the benchmark harness. Shared helpers for spawning the project's
//! binaries live here.

use std::path::PathBuf;

/// Path of a workspace binary built with the same profile as the running executable.
pub fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe
        .parent()
        .ok_or("the running executable has no directory")?;
    // Test executables live one level deeper, in deps/.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "{name} is not built next to {}: run `cargo build --release --workspace` first",
        exe.display()
    ))
}

/// Resident and peak memory of a process, in KiB, from /proc.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A loopback UDP relay between QUIC peers that a test can cut and restore, so that a link outage
/// needs no root and no firewall.
pub mod relay {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    use tokio::sync::Mutex;

    #[derive(Clone)]
    pub struct Relay {
        pub addr: SocketAddr,
        cut: Arc<AtomicBool>,
    }

    impl Relay {
        /// Listens on 127.0.0.1 (OS-chosen port) and forwards to `target`.
        pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
            let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
            let addr = front.local_addr()?;
            let cut = Arc::new(AtomicBool::new(false));
            let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
            let relay = Relay {
                addr,
                cut: cut.clone(),
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Ok((n, client)) = front.recv_from(&mut buf).await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let up = {
                        let mut map = upstreams.lock().await;
                        if let Some(u) = map.get(&client) {
                            u.clone()
                        } else {
                            let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                                continue;
                            };
                            if u.connect(target).await.is_err() {
                                continue;
                            }
                            let u = Arc::new(u);
                            map.insert(client, u.clone());
                            let (back, front2, cut2) = (u.clone(), front.clone(), cut.clone());
                            tokio::spawn(async move {
                                let mut b = vec![0u8; 65_536];
                                while let Ok(n) = back.recv(&mut b).await {
                                    if !cut2.load(Ordering::SeqCst) {
                                        let _ = front2.send_to(&b[..n], client).await;
                                    }
                                }
                            });
                            u
                        }
                    };
                    let _ = up.send(&buf[..n]).await;
                }
            });
            Ok(relay)
        }

        /// Drops every datagram in both directions until [`Relay::restore`].
        pub fn cut(&self) {
            self.cut.store(true, Ordering::SeqCst);
        }

        pub fn restore(&self) {
            self.cut.store(false, Ordering::SeqCst);
        }
    }
}
