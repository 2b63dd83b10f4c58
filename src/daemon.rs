//! The daemon: loads every model, serves metrics and health, and runs every pipeline until the
//! shutdown token is cancelled, then drains them within the grace period.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{self, Health, Metrics};
use crate::model::Model;
use crate::pipeline::{self, PipelineError, Shared};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{}", .0.join("\n"))]
    Models(Vec<String>),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Loads the model of every pipeline (once per file) and checks it fits its pipeline.
/// Returns every problem at once.
pub fn load_models(config: &Config) -> Result<BTreeMap<String, Arc<Model>>, Vec<String>> {
    let mut by_path: BTreeMap<PathBuf, Result<Arc<Model>, String>> = BTreeMap::new();
    let mut models = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, p) in &config.pipelines {
        let loaded = by_path.entry(p.model.clone()).or_insert_with(|| {
            Model::load(&p.model)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        match loaded {
            Ok(model) => match p.detector().fits(model) {
                Ok(()) => {
                    models.insert(name.clone(), model.clone());
                }
                Err(e) => problems.push(format!("pipelines.{name}.{e}")),
            },
            Err(e) => problems.push(format!("pipelines.{name}.model: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(models)
    } else {
        Err(problems)
    }
}

/// A running daemon.
pub struct Daemon {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// Where `/metrics` is served, if enabled.
    pub http_addr: Option<SocketAddr>,
    pipelines: JoinSet<Result<(), PipelineError>>,
    http: Option<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
    reload: Arc<tokio::sync::Notify>,
}

impl Daemon {
    /// Loads models, binds the HTTP endpoint and starts every pipeline.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Daemon, DaemonError> {
        let metrics = Metrics::new();
        let health = Arc::new(Health::new(config.pipelines.keys().cloned(), &metrics));
        let models = match load_models(&config) {
            Ok(m) => m,
            Err(problems) => {
                for name in config.pipelines.keys() {
                    metrics.model_load_failures.with_label_values(&[name]).inc();
                }
                return Err(DaemonError::Models(problems));
            }
        };
        health.set_models_loaded();
        let (http_addr, http) = if config.http.listen.is_empty() {
            (None, None)
        } else {
            let addr: SocketAddr = config.http.listen.parse().map_err(|e| DaemonError::Http {
                addr: config.http.listen.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
            let (bound, handle) =
                metrics::serve(addr, metrics.clone(), health.clone(), shutdown.clone())
                    .await
                    .map_err(|source| DaemonError::Http {
                        addr: config.http.listen.clone(),
                        source,
                    })?;
            tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz.");
            (Some(bound), Some(handle))
        };
        let reload = Arc::new(tokio::sync::Notify::new());
        let shared = Shared {
            kafka: config.kafka.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            inference: Arc::new(Semaphore::new(config.runtime.threads())),
            grace: config.runtime.shutdown_grace,
            reload: reload.clone(),
        };
        let mut pipelines = JoinSet::new();
        for (name, p) in config.pipelines {
            let model = models[&name].clone();
            pipelines.spawn(pipeline::run(
                name,
                p,
                model,
                shared.clone(),
                shutdown.clone(),
            ));
        }
        Ok(Daemon {
            metrics,
            health,
            http_addr,
            pipelines,
            http,
            shutdown,
            reload,
        })
    }

    /// Makes every pipeline check its model file for a new version now (what SIGHUP does).
    pub fn reload_models(&self) {
        self.reload.notify_waiters();
    }

    /// A handle to trigger model reloads from elsewhere (a signal handler).
    pub fn reload_handle(&self) -> Arc<tokio::sync::Notify> {
        self.reload.clone()
    }

    /// Waits for every pipeline to finish (after the shutdown token is cancelled). A pipeline
    /// that fails stops the others.
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        let mut first_error = None;
        while let Some(done) = self.pipelines.join_next().await {
            let result = match done {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("A pipeline task failed: {e}");
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::error!("{e}");
                self.shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        self.shutdown.cancel();
        if let Some(h) = self.http.take() {
            let _ = h.await;
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled and every pipeline has drained.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    Daemon::start(config, shutdown).await?.wait().await
}

/// A multi-threaded runtime with room for the blocking rebalance callbacks beside the tasks.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(4);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("anomalyd")
        .enable_all()
        .build()
}
