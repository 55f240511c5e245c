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

    /// Where a child's stderr goes: `$FAULT_LOGS/<name>.log` (appended across restarts) when
    /// that variable names a directory, so a failing seed can be read afterwards; else nowhere.
    pub fn child_log(name: &str) -> anyhow::Result<Stdio> {
        let Some(dir) = std::env::var_os("FAULT_LOGS") else {
            return Ok(Stdio::null());
        };
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&dir).join(format!("{name}.log")))?;
        Ok(Stdio::from(file))
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
                .stderr(child_log("agent")?);
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
                ffd: protocol::kkt::FfdVersion::V1_2,
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

/// The whole product in one process, as `controller demo` runs it: simulated OFD, controller
/// (tunnel, dispatcher, HTTP API), one agent, simulated registers registered for the demo INN with
/// their shifts open, and an account that owns the INN. Plus a small Ferma client and the checks
/// the system tests and the benchmark share (every receipt found exactly once in the FN archives).
///
/// Everything listens on 127.0.0.1 with OS-chosen ports and keeps its state in one temporary
/// directory; waits are on the tunnel's events (with a short re-check interval for state that
/// the dispatcher applies after an event is published), never on fixed sleeps.
pub mod stack {
    use anyhow::{bail, Context};
    use controller::api::ApiConfig;
    use controller::balancer::{BalancerConfig, PoolState, RegisterReport};
    use controller::server::{Server, ServerConfig};
    use controller::store::{Account, PasswordHash};
    use controller::tunnel::{Tunnel, TunnelEvent};
    use firmware_sim::device::{host_now, Device, Fleet, FleetOptions};
    use firmware_sim::fixtures::{self, DEMO_INN};
    use firmware_sim::ofd::Ofd;
    use firmware_sim::register::archived_document;
    use protocol::ferma::{RegistryItem, StatusData};
    use protocol::kkt::{
        Call, Event, FfdVersion, FiscalResult, OfdEndpoint, Operator, RegistrationParams, Reply,
        ShiftState,
    };
    use serde_json::{json, Value};
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::broadcast;

    pub const LOGIN: &str = "shop";
    pub const PASSWORD: &str = "shop-password";
    /// How long a register command issued by the harness may take.
    const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
    /// How long the registers may take to come online and be ready.
    const READY_TIMEOUT: Duration = Duration::from_secs(20);
    /// State the dispatcher applies after the tunnel published the event is re-checked this often.
    const RECHECK: Duration = Duration::from_millis(50);

    /// What to start.
    #[derive(Debug, Clone)]
    pub struct StackOptions {
        pub registers: usize,
        /// Service time of every register request, ms.
        pub latency_ms: u64,
        /// FN archive capacity of the registers (documents); `None` is the simulator's default.
        pub capacity: Option<u32>,
        pub balancer: BalancerConfig,
        pub api: ApiConfig,
    }

    impl Default for StackOptions {
        fn default() -> Self {
            StackOptions {
                registers: 2,
                latency_ms: 0,
                capacity: None,
                balancer: BalancerConfig::default(),
                api: ApiConfig::default(),
            }
        }
    }

    /// What registers [`Stack::add_registers_like`] adds.
    #[derive(Debug, Clone)]
    pub struct RegisterKind {
        pub latency_ms: u64,
        /// FN archive capacity (documents); `None` is the simulator's default.
        pub capacity: Option<u32>,
        pub ffd: FfdVersion,
        /// Registered for internet settlements only (tag 1108): prints nothing, so it takes only
        /// receipts with the buyer's contact.
        pub internet: bool,
    }

    impl Default for RegisterKind {
        fn default() -> Self {
            RegisterKind {
                latency_ms: 0,
                capacity: None,
                ffd: FfdVersion::V1_2,
                internet: true,
            }
        }
    }

    /// A running system. Dropping it (with the test's runtime) stops everything.
    pub struct Stack {
        pub server: Server,
        pub ofd: Arc<Ofd>,
        pub ofd_addr: SocketAddr,
        pub agent: agent::run::Started,
        /// The registers, in process: one fleet per [`Stack::add_registers`] call.
        pub fleets: Vec<Arc<Fleet>>,
        /// ZNs of every register, in the order they were added.
        pub zns: Vec<String>,
        pub dir: tempfile::TempDir,
    }

    impl Stack {
        /// Starts OFD, controller, account, agent and `options.registers` registers (registered
        /// for [`DEMO_INN`], shift open, in the balancer's pool).
        pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
            crate::system::install_crypto();
            init_logging();
            let dir = tempfile::tempdir()?;
            let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
            let ofd = Ofd::open(&dir.path().join("ofd"))?;
            let l = tokio::net::TcpListener::bind(loopback).await?;
            let ofd_addr = l.local_addr()?;
            tokio::spawn(ofd.clone().serve_tcp(l));

            let mut config = ServerConfig::new(dir.path().join("controller"), loopback, loopback);
            config.balancer = options.balancer.clone();
            config.api = options.api.clone();
            let server = Server::start(config).await?;
            create_account(&server, LOGIN, PASSWORD, DEMO_INN).await?;

            let agent_dir = dir.path().join("agent");
            let (token, _) = controller::tunnel::create_enroll_token(
                server.store(),
                server.tunnel.ca().fingerprint(),
                Duration::from_secs(600),
            )
            .await?;
            agent::identity::enroll(
                &server.quic_addr().to_string(),
                &token,
                &agent_dir,
                "test-shelf",
            )
            .await?;
            let agent = start_agent(&agent_dir).await?;
            let mut stack = Stack {
                server,
                ofd,
                ofd_addr,
                agent,
                fleets: Vec::new(),
                zns: Vec::new(),
                dir,
            };
            if options.registers > 0 {
                stack
                    .add_registers(options.registers, options.latency_ms, options.capacity)
                    .await?;
            }
            Ok(stack)
        }

        /// Adds `count` registers (a fleet of their own, so it may have its own FN capacity),
        /// registers them, opens their shifts and waits until the balancer counts them ready.
        pub async fn add_registers(
            &mut self,
            count: usize,
            latency_ms: u64,
            capacity: Option<u32>,
        ) -> anyhow::Result<Vec<String>> {
            self.add_registers_like(
                count,
                RegisterKind {
                    latency_ms,
                    capacity,
                    ..RegisterKind::default()
                },
            )
            .await
        }

        /// [`Stack::add_registers`] with the FN's FFD and the registration's internet mode chosen.
        pub async fn add_registers_like(
            &mut self,
            count: usize,
            kind: RegisterKind,
        ) -> anyhow::Result<Vec<String>> {
            let RegisterKind {
                latency_ms,
                capacity,
                ffd,
                internet,
            } = kind;
            let mut events = self.server.tunnel.subscribe();
            let state = self
                .dir
                .path()
                .join(format!("registers-{}", self.fleets.len()));
            let fleet = Arc::new(Fleet::open(
                &state,
                count,
                FleetOptions {
                    connect: format!("ws://{}/kkt", self.agent.kkt_addr),
                    latency_ms,
                    default_ofd: Some(self.ofd_endpoint()),
                    capacity,
                    ffd,
                    max_backoff: Duration::from_millis(200),
                },
            )?);
            fleet.start();
            let zns: Vec<String> = fleet.devices.keys().cloned().collect();
            let tunnel = &self.server.tunnel;
            wait_until(&mut events, READY_TIMEOUT, "registers online", || {
                zns.iter()
                    .all(|zn| tunnel.online_kkt(zn).and_then(|k| k.state).is_some())
                    .then_some(())
            })
            .await?;
            // All at once: a benchmark's hundreds of registers each take a few round trips.
            let mut preparing = tokio::task::JoinSet::new();
            for zn in &zns {
                let (tunnel, zn, ofd) = (tunnel.clone(), zn.clone(), self.ofd_endpoint());
                preparing.spawn(async move { prepare_as(&tunnel, &zn, &ofd, internet).await });
            }
            while let Some(done) = preparing.join_next().await {
                done??;
            }
            self.fleets.push(fleet);
            self.zns.extend(zns.iter().cloned());
            let dispatcher = &self.server.dispatcher;
            wait_until(&mut events, READY_TIMEOUT, "registers ready", || {
                let regs = dispatcher.registers();
                zns.iter()
                    .all(|zn| {
                        regs.iter()
                            .any(|r| &r.zn == zn && r.pool == PoolState::Ready)
                    })
                    .then_some(())
            })
            .await?;
            Ok(zns)
        }

        pub fn ofd_endpoint(&self) -> OfdEndpoint {
            fixtures::ofd_endpoint(self.ofd_addr)
        }

        pub fn tunnel(&self) -> &Tunnel {
            &self.server.tunnel
        }

        pub fn events(&self) -> broadcast::Receiver<TunnelEvent> {
            self.server.tunnel.subscribe()
        }

        pub fn base_url(&self) -> String {
            format!("http://{}", self.server.http_addr)
        }

        /// The controller's data directory (its `admin.secret` is there).
        pub fn controller_dir(&self) -> std::path::PathBuf {
            self.dir.path().join("controller")
        }

        /// A logged-in Ferma client of the stack's account.
        pub async fn shop(&self) -> anyhow::Result<Ferma> {
            Ferma::login(&self.base_url(), LOGIN, PASSWORD).await
        }

        pub fn fleet_of(&self, zn: &str) -> Option<&Arc<Fleet>> {
            self.fleets.iter().find(|f| f.device(zn).is_some())
        }

        pub fn device(&self, zn: &str) -> Option<&Arc<Device>> {
            self.fleets.iter().find_map(|f| f.device(zn))
        }

        /// The balancer's view of register `zn`.
        pub fn register_report(&self, zn: &str) -> Option<RegisterReport> {
            self.server
                .dispatcher
                .registers()
                .into_iter()
                .find(|r| r.zn == zn)
        }

        /// Every receipt document in every FN archive, by the job id in its tag 1192.
        pub fn archived_receipts(&self) -> BTreeMap<String, Vec<FiscalResult>> {
            let mut out: BTreeMap<String, Vec<FiscalResult>> = BTreeMap::new();
            for fleet in &self.fleets {
                for (job, docs) in archived_receipts(fleet) {
                    out.entry(job).or_default().extend(docs);
                }
            }
            out
        }

        /// `GET` on the admin API with the controller's admin credential.
        pub async fn admin_get(&self, path: &str) -> anyhow::Result<Value> {
            admin_get(&self.base_url(), &self.controller_dir(), path).await
        }
    }

    /// Logs to the test's output when `RUST_LOG` is set (e.g. `RUST_LOG=info,agent=debug`).
    pub fn init_logging() {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    }

    /// Creates an account owning `inn` directly in the store (cheap password hashing).
    pub async fn create_account(
        server: &Server,
        login: &str,
        password: &str,
        inn: &str,
    ) -> anyhow::Result<()> {
        let account = Account {
            id: format!("acc-{login}"),
            login: login.into(),
            password: PasswordHash::new(password, 1000),
            inns: vec![inn.into()],
            callback_secret: "test-callback-secret".into(),
            created_at: controller::unix_ms(),
        };
        if let Err(refusal) = server.store().create_account(account).await? {
            bail!("account {login}: {refusal}");
        }
        Ok(())
    }

    /// Starts an enrolled agent in process on loopback ports.
    pub async fn start_agent(data: &Path) -> anyhow::Result<agent::run::Started> {
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        agent::run::start(agent::run::Config {
            data: data.to_path_buf(),
            kkt_listen: loopback,
            health: loopback,
            serial: Vec::new(),
            baud: 115_200,
            journal_limit: 100_000,
            max_backoff: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(10),
        })
        .await
    }

    /// What the demo does to a fresh register: register it for [`DEMO_INN`] (if it is not yet),
    /// point it at `ofd`, open its shift, and make its agent report the new state.
    pub async fn prepare(tunnel: &Tunnel, zn: &str, ofd: &OfdEndpoint) -> anyhow::Result<()> {
        prepare_as(tunnel, zn, ofd, true).await
    }

    /// [`prepare`] with the registration's internet mode chosen.
    pub async fn prepare_as(
        tunnel: &Tunnel,
        zn: &str,
        ofd: &OfdEndpoint,
        internet: bool,
    ) -> anyhow::Result<()> {
        let state = tunnel
            .online_kkt(zn)
            .and_then(|k| k.state)
            .with_context(|| format!("register {zn} is not online"))?;
        if !state.device.fiscal {
            let params = RegistrationParams {
                internet,
                ..fixtures::registration(zn, DEMO_INN, ofd.clone())?
            };
            match tunnel
                .command(zn, Call::Register(params), COMMAND_TIMEOUT)
                .await?
            {
                Reply::Fiscal(_) => {}
                other => bail!("{zn}: register answered {other:?}"),
            }
        } else {
            tunnel
                .command(zn, Call::SetOfd(ofd.clone()), COMMAND_TIMEOUT)
                .await?;
        }
        if state.device.shift == ShiftState::Expired {
            tunnel
                .command(zn, Call::CloseShift(Operator::default()), COMMAND_TIMEOUT)
                .await?;
        }
        if state.device.shift != ShiftState::Opened {
            match tunnel
                .command(zn, Call::OpenShift(Operator::default()), COMMAND_TIMEOUT)
                .await?
            {
                Reply::Fiscal(_) => {}
                other => bail!("{zn}: open shift answered {other:?}"),
            }
        }
        tunnel
            .command(zn, Call::GetDeviceStatus, COMMAND_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Registers a register that is not running (its fleet not started) straight through the
    /// simulator's core, as a register arrives from the tax service already registered: the
    /// registration report is stored in its archive and owed to `ofd`. Its shift stays closed.
    pub async fn register_offline(
        fleet: &Fleet,
        zn: &str,
        inn: &str,
        ofd: OfdEndpoint,
    ) -> anyhow::Result<()> {
        let device = fleet
            .device(zn)
            .with_context(|| format!("no register {zn}"))?;
        let params = fixtures::registration(zn, inn, ofd)?;
        let pending = {
            let mut reg = device.register();
            let now = reg.clock(host_now());
            let outcome = reg.handle(&Call::Register(params), now);
            if let Err(e) = outcome.reply {
                bail!("{zn}: registration refused: {e}");
            }
            let formed = outcome.formed.context("registration formed no document")?;
            fleet.queue_state(
                &reg,
                Some((
                    formed.result.fn_number.clone(),
                    formed.result.fd_number,
                    formed.bytes,
                )),
            )
        };
        pending.durable().await?;
        device.wake_ofd();
        Ok(())
    }

    /// What the simulator's control API does for `paperOut` (firmware-sim `control.rs`): change
    /// the paper, persist, and — when `announce` — push a `statusChanged` event to the agent (a
    /// register that does not announce it is found out by its next refused receipt). Returns the
    /// FN's last document number at that instant.
    pub async fn set_paper(
        fleet: &Fleet,
        zn: &str,
        present: bool,
        announce: bool,
    ) -> anyhow::Result<u32> {
        let device = fleet
            .device(zn)
            .with_context(|| format!("no register {zn}"))?;
        let (status, last_fd, pending) = {
            let mut r = device.register();
            let now = r.clock(host_now());
            r.paper_present = present;
            let pending = fleet.queue_state(&r, None);
            (r.status(now), r.drive.last_fd, pending)
        };
        pending.durable().await?;
        if announce {
            device.publish(Event::StatusChanged(status));
        }
        device.wake_ofd();
        Ok(last_fd)
    }

    /// What the control API's `clock` call does: move the register's clock by `seconds`.
    pub async fn move_clock(fleet: &Fleet, zn: &str, seconds: i64) -> anyhow::Result<()> {
        let device = fleet
            .device(zn)
            .with_context(|| format!("no register {zn}"))?;
        let pending = {
            let mut r = device.register();
            r.clock_offset = r.clock_offset.saturating_add(seconds);
            fleet.queue_state(&r, None)
        };
        pending.durable().await?;
        device.wake_ofd();
        Ok(())
    }

    /// Every receipt document in the fleet's FN archives (current FNs), by the job id in tag
    /// 1192 — read from the simulator's own store, not through any link.
    pub fn archived_receipts(fleet: &Fleet) -> BTreeMap<String, Vec<FiscalResult>> {
        let mut out: BTreeMap<String, Vec<FiscalResult>> = BTreeMap::new();
        for (zn, device) in &fleet.devices {
            let (fn_number, last) = {
                let r = device.register();
                (r.drive.fn_number().to_owned(), r.drive.last_fd)
            };
            for (_, bytes) in fleet
                .store
                .archive_range(&fn_number, 1, last)
                .unwrap_or_default()
            {
                let Ok(doc) = archived_document(&bytes, zn, false) else {
                    continue;
                };
                if let Some(job) = doc.result.additional_attribute.clone() {
                    out.entry(job).or_default().push(doc.result);
                }
            }
        }
        out
    }

    /// Re-checks `check` whenever the tunnel reports something, and at least every 50 ms (the
    /// dispatcher applies an event after it is published, so state can change with no event
    /// after it), until it answers `Some` or `limit` passes.
    pub async fn wait_until<T>(
        events: &mut broadcast::Receiver<TunnelEvent>,
        limit: Duration,
        what: &str,
        mut check: impl FnMut() -> Option<T>,
    ) -> anyhow::Result<T> {
        let run = async {
            loop {
                if let Some(t) = check() {
                    return t;
                }
                let _ = tokio::time::timeout(RECHECK, events.recv()).await;
            }
        };
        tokio::time::timeout(limit, run)
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {limit:?} waiting for {what}"))
    }

    /// [`wait_until`] with an async check (HTTP calls).
    pub async fn wait_until_async<T, F, Fut>(
        events: &mut broadcast::Receiver<TunnelEvent>,
        limit: Duration,
        what: &str,
        mut check: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<T>>>,
    {
        let run = async {
            loop {
                if let Some(t) = check().await? {
                    return Ok::<T, anyhow::Error>(t);
                }
                let _ = tokio::time::timeout(RECHECK, events.recv()).await;
            }
        };
        tokio::time::timeout(limit, run)
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {limit:?} waiting for {what}"))?
    }

    /// `GET` on a controller's admin API with the credential in its data directory.
    pub async fn admin_get(base: &str, controller_dir: &Path, path: &str) -> anyhow::Result<Value> {
        let secret =
            std::fs::read_to_string(controller_dir.join(controller::admin::ADMIN_SECRET_FILE))?;
        let resp = reqwest::Client::new()
            .get(format!("{base}{path}"))
            .bearer_auth(secret.trim())
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    /// A Ferma create-receipt request for [`DEMO_INN`]: one item, 301.00 ₽ (the demo's receipt).
    pub fn receipt_request(invoice: &str) -> Value {
        json!({"Request": {
            "Inn": DEMO_INN,
            "Type": "Income",
            "InvoiceId": invoice,
            "CustomerReceipt": {
                "TaxationSystem": "Common",
                "Email": "buyer@example.ru",
                "Items": [{"Label": "Чай зелёный", "Price": 150.50, "Quantity": 2,
                           "Amount": 301.00, "Vat": "Vat20"}]
            }
        }})
    }

    /// A shop's Ferma client: the calls a CMS module makes.
    #[derive(Clone)]
    pub struct Ferma {
        http: reqwest::Client,
        pub base: String,
        pub token: String,
    }

    /// A Ferma answer that is not `Success`.
    #[derive(Debug, Clone)]
    pub struct FermaFailure {
        pub http_status: u16,
        pub code: Option<i64>,
        pub message: String,
    }

    impl std::fmt::Display for FermaFailure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "HTTP {} code {:?}: {}",
                self.http_status, self.code, self.message
            )
        }
    }

    impl std::error::Error for FermaFailure {}

    impl Ferma {
        pub async fn login(base: &str, login: &str, password: &str) -> anyhow::Result<Ferma> {
            let mut f = Ferma::with_token(base, "");
            let data = f
                .call(
                    "/api/Authorization/CreateAuthToken",
                    &json!({"Login": login, "Password": password}),
                )
                .await?;
            f.token = data["AuthToken"]
                .as_str()
                .with_context(|| format!("no AuthToken in {data}"))?
                .to_owned();
            Ok(f)
        }

        /// A client with a token got elsewhere (the demo's shell lines).
        pub fn with_token(base: &str, token: &str) -> Ferma {
            Ferma {
                http: reqwest::Client::new(),
                base: base.trim_end_matches('/').to_owned(),
                token: token.to_owned(),
            }
        }

        /// POSTs `body` to `path` (with `?AuthToken=` once logged in) and returns `Data` of a
        /// `Success` answer; a `Failed` answer is a [`FermaFailure`].
        pub async fn call(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
            let url = if self.token.is_empty() {
                format!("{}{path}", self.base)
            } else {
                format!("{}{path}?AuthToken={}", self.base, self.token)
            };
            let resp = self
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await?;
            let status = resp.status();
            let answer: Value = resp.json().await?;
            if answer["Status"] == "Success" {
                return Ok(answer["Data"].clone());
            }
            Err(FermaFailure {
                http_status: status.as_u16(),
                code: answer["Error"]["Code"].as_i64(),
                message: answer["Error"]["Message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            }
            .into())
        }

        /// Creates the receipt of [`receipt_request`]; returns its `ReceiptId`.
        pub async fn create(&self, invoice: &str) -> anyhow::Result<String> {
            let data = self
                .call("/api/kkt/cloud/receipt", &receipt_request(invoice))
                .await?;
            Ok(data["ReceiptId"]
                .as_str()
                .with_context(|| format!("no ReceiptId in {data}"))?
                .to_owned())
        }

        pub async fn status(&self, receipt: &str) -> anyhow::Result<StatusData> {
            let data = self
                .call(
                    "/api/kkt/cloud/status",
                    &json!({"Request": {"ReceiptId": receipt}}),
                )
                .await?;
            Ok(serde_json::from_value(data)?)
        }

        /// The registry by receipt time; `request` is the `Request` object (filters).
        pub async fn list2(&self, request: Value) -> anyhow::Result<Vec<RegistryItem>> {
            let data = self
                .call("/api/kkt/cloud/list2", &json!({ "Request": request }))
                .await?;
            Ok(serde_json::from_value(data)?)
        }

        /// The registry by acceptance time.
        pub async fn list(&self, request: Value) -> anyhow::Result<Vec<RegistryItem>> {
            let data = self
                .call("/api/kkt/cloud/list", &json!({ "Request": request }))
                .await?;
            Ok(serde_json::from_value(data)?)
        }
    }
}
