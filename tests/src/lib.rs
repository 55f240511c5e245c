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

/// A whole system on loopback for tests and benchmarks: the controller's tunnel in process (the
/// test drives it through its library API), agents as real child processes or in process,
/// simulated registers and OFD in process.
pub mod system {
    use controller::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
    use firmware_sim::device::{Fleet, FleetOptions};
    use firmware_sim::fixtures;
    use firmware_sim::ofd::Ofd;
    use protocol::kkt::{Call, Operator, Reply};
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::broadcast;

    pub struct System {
        pub tunnel: Tunnel,
        pub events: broadcast::Receiver<TunnelEvent>,
        pub ofd: Arc<Ofd>,
        pub ofd_addr: SocketAddr,
        pub dir: tempfile::TempDir,
    }

    pub fn install_crypto() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    impl System {
        pub async fn start() -> anyhow::Result<System> {
            Self::start_with(|_| {}).await
        }

        /// Starts with a tunnel configuration adjusted by `tune` (short certificate life, ...).
        pub async fn start_with(tune: impl FnOnce(&mut TunnelConfig)) -> anyhow::Result<System> {
            install_crypto();
            let dir = tempfile::tempdir()?;
            let ofd = Ofd::open(&dir.path().join("ofd"))?;
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let ofd_addr = l.local_addr()?;
            tokio::spawn(ofd.clone().serve_tcp(l));
            let mut cfg = TunnelConfig::new(dir.path().join("controller"), "127.0.0.1:0".parse()?);
            tune(&mut cfg);
            let tunnel = Tunnel::start(cfg).await?;
            let events = tunnel.subscribe();
            Ok(System {
                tunnel,
                events,
                ofd,
                ofd_addr,
                dir,
            })
        }

        pub fn quic_addr(&self) -> String {
            self.tunnel.local_addr().to_string()
        }

        pub async fn token(&self) -> anyhow::Result<String> {
            let (t, _) = controller::tunnel::create_enroll_token(
                self.tunnel.store(),
                self.tunnel.ca().fingerprint(),
                Duration::from_secs(600),
            )
            .await?;
            Ok(t)
        }

        /// Waits for the first event matching `pred` (events before the call are not seen unless
        /// still queued in this receiver).
        pub async fn wait(&mut self, mut pred: impl FnMut(&TunnelEvent) -> bool) -> TunnelEvent {
            loop {
                match self.events.recv().await {
                    Ok(e) if pred(&e) => return e,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("tunnel stopped"),
                }
            }
        }

        /// Enrolls an agent data directory with the real `agent enroll` command.
        pub async fn enroll(&self, data: &Path) -> anyhow::Result<()> {
            let token = self.token().await?;
            let out = agent_command()?
                .args([
                    "enroll",
                    "--controller",
                    &self.quic_addr(),
                    "--token",
                    &token,
                ])
                .arg("--data")
                .arg(data)
                .args(["--name", "test-shelf"])
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "agent enroll failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        }

        /// Registers every attached register for the demo INN and opens its shift.
        pub async fn prepare(&self, kkt: &str) -> anyhow::Result<()> {
            let reg = fixtures::registration(
                kkt,
                fixtures::DEMO_INN,
                fixtures::ofd_endpoint(self.ofd_addr),
            )?;
            let t = Duration::from_secs(30);
            match self.tunnel.command(kkt, Call::Register(reg), t).await? {
                Reply::Fiscal(_) => {}
                other => anyhow::bail!("register answered {other:?}"),
            }
            match self
                .tunnel
                .command(kkt, Call::OpenShift(Operator::default()), t)
                .await?
            {
                Reply::Fiscal(_) => Ok(()),
                other => anyhow::bail!("open shift answered {other:?}"),
            }
        }
    }

    pub fn agent_command() -> anyhow::Result<Command> {
        Ok(Command::new(
            crate::sibling_binary("agent").map_err(anyhow::Error::msg)?,
        ))
    }

    /// A running `agent run` child process.
    pub struct AgentProcess {
        pub child: Child,
        pub kkt_addr: SocketAddr,
        pub health_addr: SocketAddr,
        pub data: PathBuf,
    }

    impl AgentProcess {
        /// Starts `agent run`; `kkt_listen` keeps the register port across restarts.
        pub fn spawn(
            data: &Path,
            kkt_listen: Option<SocketAddr>,
            env: &[(&str, &str)],
        ) -> anyhow::Result<AgentProcess> {
            let listen = kkt_listen.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
            let mut cmd = agent_command()?;
            cmd.args(["run", "--kkt-listen", &listen, "--health", "127.0.0.1:0"])
                .args(["--max-backoff-ms", "300", "--idle-timeout-ms", "1500"])
                .arg("--data")
                .arg(data)
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn()?;
            let out = child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
            let mut lines = BufReader::new(out).lines();
            let mut addr = |prefix: &str| -> anyhow::Result<SocketAddr> {
                let line = lines
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("agent exited before listening"))??;
                Ok(line
                    .strip_prefix(prefix)
                    .ok_or_else(|| anyhow::anyhow!("unexpected line {line:?}"))?
                    .parse()?)
            };
            let kkt_addr = addr("kkt listening on ")?;
            let health_addr = addr("health listening on ")?;
            Ok(AgentProcess {
                child,
                kkt_addr,
                health_addr,
                data: data.to_path_buf(),
            })
        }

        pub fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for AgentProcess {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// `count` simulated registers connecting to `agent_kkt`.
    pub fn registers(
        agent_kkt: SocketAddr,
        count: usize,
        state: &Path,
        latency_ms: u64,
    ) -> anyhow::Result<Arc<Fleet>> {
        let fleet = Arc::new(Fleet::open(
            state,
            count,
            FleetOptions {
                connect: format!("ws://{agent_kkt}/kkt"),
                latency_ms,
                default_ofd: None,
                capacity: None,
                max_backoff: Duration::from_millis(200),
            },
        )?);
        fleet.start();
        Ok(fleet)
    }

    /// How many documents in a register's FN archive carry `job` in tag 1192 — read from the
    /// simulator's own store, not through any link.
    pub fn documents_for_job(fleet: &Fleet, kkt: &str, job: &str) -> usize {
        let Some(device) = fleet.device(kkt) else {
            return 0;
        };
        let (fn_number, last) = {
            let r = device.register();
            (r.drive.fn_number().to_owned(), r.drive.last_fd)
        };
        fleet
            .store
            .archive_range(&fn_number, 1, last)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, bytes)| protocol::document::Document::decode(&bytes).ok())
            .filter_map(|d| protocol::document::ReceiptRecord::from_document(&d).ok())
            .filter(|r| r.additional_attribute.as_deref() == Some(job))
            .count()
    }
}
