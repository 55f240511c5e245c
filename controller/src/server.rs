//! The whole controller in one value: tunnel, dispatcher, callbacks and the HTTP API, started
//! and stopped together. `controller serve`, `controller demo` and the tests all start it here.
//!
//! # Shutdown
//! [`Server::shutdown`] stops accepting HTTP requests and waits for the ones in progress (each
//! waits for its own commit, so every `ReceiptId` already promised is durable), stops the
//! dispatcher, closes the agents' tunnels and flushes the store. Agents resend whatever was not
//! acknowledged; jobs in flight stay assigned and are reconciled when their agents return.

use crate::admin::{self, AdminState};
use crate::api::{self, ApiConfig, ApiState};
use crate::balancer::BalancerConfig;
use crate::dispatcher::Dispatcher;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tunnel::{StartError, Tunnel, TunnelConfig, TunnelEvent};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::Notify;
use tracing::info;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub tunnel: TunnelConfig,
    pub http: SocketAddr,
    pub balancer: BalancerConfig,
    pub api: ApiConfig,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, http: SocketAddr, quic: SocketAddr) -> Self {
        ServerConfig {
            tunnel: TunnelConfig::new(data_dir, quic),
            http,
            balancer: BalancerConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Tunnel(#[from] StartError),
    #[error(transparent)]
    Admin(#[from] admin::AdminSetupError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("--http {addr}: cannot listen ({source}); is the port in use?")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running controller.
pub struct Server {
    pub tunnel: Tunnel,
    pub dispatcher: Dispatcher,
    pub metrics: Arc<Metrics>,
    pub http_addr: SocketAddr,
    stop_http: Arc<Notify>,
    http_task: tokio::task::JoinHandle<()>,
    callbacks: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let data = config.tunnel.data_dir.clone();
        let tunnel = Tunnel::start(config.tunnel).await?;
        let admin_hash = admin::ensure_admin_secret(&data, tunnel.store()).await?;
        let metrics = Arc::new(Metrics::default());
        let dispatcher = Dispatcher::start(tunnel.clone(), config.balancer, metrics.clone())?;

        let wake = tunnel.store().callbacks_owed();
        let callbacks = crate::callbacks::start(
            tunnel.store().clone(),
            metrics.clone(),
            wake.clone(),
            config.api.allow_private_callbacks,
        );
        let mut events = tunnel.subscribe();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(TunnelEvent::ReceiptsConfirmed { .. }) | Err(RecvError::Lagged(_)) => {
                        wake.notify_one()
                    }
                    Ok(_) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        });

        let state = ApiState {
            store: tunnel.store().clone(),
            dispatcher: dispatcher.clone(),
            tunnel: tunnel.clone(),
            metrics: metrics.clone(),
            config: config.api,
            operator: Some(admin_hash),
        };
        let admin_state = AdminState::new(
            tunnel.store().clone(),
            tunnel.ca().fingerprint(),
            admin_hash,
            data,
        )
        .with_fleet(tunnel.clone(), dispatcher.clone());
        let app = api::app(state).merge(admin::app(admin_state));
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.http,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.http,
            source,
        })?;
        let stop_http = Arc::new(Notify::new());
        let stop = stop_http.clone();
        let http_task = tokio::spawn(async move {
            let shutdown = async move { stop.notified().await };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        info!(http = %http_addr, quic = %tunnel.local_addr(), "controller started");
        Ok(Server {
            tunnel,
            dispatcher,
            metrics,
            http_addr,
            stop_http,
            http_task,
            callbacks,
        })
    }

    pub fn store(&self) -> &Store {
        self.tunnel.store()
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.tunnel.local_addr()
    }

    /// See the module doc.
    pub async fn shutdown(self) {
        self.stop_http.notify_one();
        let _ = self.http_task.await;
        self.dispatcher.stop();
        self.callbacks.abort();
        self.tunnel.shutdown().await;
        info!("controller stopped");
    }
}
