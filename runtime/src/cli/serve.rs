//! `refract run`: start the runtime and serve its HTTP API.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use refract::cluster::Cluster;
use refract::config::Config;
use refract::runtime::Runtime;

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The configuration file (default: ./refract.yaml if it exists, else built-in defaults).
    #[arg(long, short, env = "REFRACT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override `data-dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Override `plugins-dir`.
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
    /// Override `listen` (host:port).
    #[arg(long)]
    pub listen: Option<String>,
}

impl RunArgs {
    pub(crate) fn config(&self) -> anyhow::Result<Config> {
        let path = self.config.clone().or_else(|| {
            let default = PathBuf::from("refract.yaml");
            default.exists().then_some(default)
        });
        let mut config = match &path {
            Some(p) => {
                tracing::info!(config = %p.display(), "reading configuration");
                Config::load(p)?
            }
            None => Config::default(),
        };
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(d) = &self.plugins_dir {
            config.plugins_dir = d.clone();
        }
        if let Some(l) = &self.listen {
            config.listen = l.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

/// Start the runtime and serve until Ctrl-C or SIGTERM; with `demo`, also feed it sample events.
pub(crate) fn run(config: Config, demo: Option<usize>) -> anyhow::Result<()> {
    let runtime = Runtime::start(&config)?;
    let tokio = tokio::runtime::Runtime::new()?;
    let listener = tokio
        .block_on(tokio::net::TcpListener::bind(&config.listen))
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, data_dir = %config.data_dir.display(), plugins_dir = %config.plugins_dir.display(), projections = runtime.projections().len(), "refract is serving");
    if let Some(events) = demo {
        let url = format!("http://{address}");
        std::thread::spawn(move || {
            if let Err(e) = super::demo::feed(&url, events) {
                tracing::error!(error = %e, "the demo could not append its events");
            }
        });
    }
    let mut state = refract::api::AppState::new(runtime.clone(), &config);
    let cluster = match &config.cluster {
        Some(c) => {
            let listen = address.to_string();
            let joined = Cluster::join(c, &config.kafka, &listen, &config.data_dir, runtime.clone())?;
            Some(Arc::new(joined))
        }
        None => None,
    };
    if let Some(c) = &cluster {
        state = state.with_cluster(c.clone());
        // Standbys are chosen among the members the control topic lists.
        runtime.set_membership(c.clone());
    }
    let served = tokio.block_on(refract::api::serve(state, listener, shutdown_signal()));
    // The shards stop first, while this instance is still a member: each
    // records, as it stops publishing, what it published, and their next
    // owners wait for that record while the instance is live.
    runtime.shutdown();
    if let Some(c) = cluster {
        c.leave();
    }
    served.context("serving HTTP")
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
