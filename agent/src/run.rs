//! Starting an agent: open the journal, load the identity, bind the register and health
//! listeners, start the tunnel. Used by the binary and by in-process tests alike.

use crate::agent::Agent;
use crate::identity;
use crate::journal;
use crate::store::Store;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub data: PathBuf,
    pub kkt_listen: SocketAddr,
    pub health: SocketAddr,
    pub serial: Vec<PathBuf>,
    pub baud: u32,
    /// Jobs + outbox entries held before new jobs are refused (see `journal`, invariant 5).
    pub journal_limit: usize,
    pub max_backoff: Duration,
    /// Tunnel idle timeout: how fast a dead link is noticed (keep-alives go at a third of it).
    pub idle_timeout: Duration,
}

pub struct Started {
    pub agent: Arc<Agent>,
    pub kkt_addr: SocketAddr,
    pub health_addr: SocketAddr,
}

pub async fn start(cfg: Config) -> anyhow::Result<Started> {
    use anyhow::Context;
    std::fs::create_dir_all(&cfg.data).with_context(|| format!("--data {}", cfg.data.display()))?;
    let id = identity::load(&cfg.data)?;
    let store = Store::open(&cfg.data.join("journal.redb"), rand::random::<u64>())?;
    let (journal, epoch) = journal::load(store.db(), cfg.journal_limit)?;
    let agent = Agent::new(journal, store, epoch, id.info, cfg.data.clone());
    let kkt = tokio::net::TcpListener::bind(cfg.kkt_listen)
        .await
        .with_context(|| format!("--kkt-listen {}", cfg.kkt_listen))?;
    let health = tokio::net::TcpListener::bind(cfg.health)
        .await
        .with_context(|| format!("--health {}", cfg.health))?;
    let kkt_addr = kkt.local_addr()?;
    let health_addr = health.local_addr()?;
    std::fs::write(cfg.data.join("health.addr"), health_addr.to_string())
        .context("writing health.addr")?;
    tokio::spawn(crate::kkt_link::serve_ws(agent.clone(), kkt));
    for path in cfg.serial {
        tokio::spawn(crate::kkt_link::serve_serial(agent.clone(), path, cfg.baud));
    }
    let app = crate::health::app(agent.clone());
    tokio::spawn(async move { axum::serve(health, app).await });
    tokio::spawn(crate::uplink::run(
        agent.clone(),
        cfg.max_backoff,
        cfg.idle_timeout,
    ));
    Ok(Started {
        agent,
        kkt_addr,
        health_addr,
    })
}
