//! The daemon: loads every model, serves metrics and health, and runs every pipeline until the
//! shutdown token is cancelled, then drains them within the grace period.

use std::collections::{BTreeMap, HashMap};
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
    #[error("pipeline {pipeline} {reason}")]
    Failed { pipeline: String, reason: String },
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
    /// Pipeline names by task id, to say which one failed.
    names: HashMap<tokio::task::Id, String>,
    http: Option<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
    reload: Arc<tokio::sync::Notify>,
}

impl Daemon {
    /// Loads models, binds the HTTP endpoint and starts every pipeline.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Daemon, DaemonError> {
        let started = std::time::Instant::now();
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
        let models_loaded = started.elapsed();
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
            started,
            models_loaded,
        };
        let mut pipelines = JoinSet::new();
        let mut names = HashMap::new();
        for (name, p) in config.pipelines {
            let model = models[&name].clone();
            let task = pipelines.spawn(pipeline::run(
                name.clone(),
                p,
                model,
                shared.clone(),
                shutdown.clone(),
            ));
            names.insert(task.id(), name);
        }
        Ok(Daemon {
            metrics,
            health,
            http_addr,
            pipelines,
            names,
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
    /// that fails or panics makes the daemon unready at once and stops the others (they drain);
    /// the daemon then ends with its error, so that the process exits non-zero and its
    /// supervisor restarts it.
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        let result =
            join_pipelines(self.pipelines, &self.names, &self.health, &self.shutdown).await;
        self.shutdown.cancel();
        if let Some(mut h) = self.http.take() {
            // The endpoint finishes the requests it is answering; a client that keeps a
            // connection open (idle, or a request half sent) does not hold the exit up.
            if tokio::time::timeout(HTTP_CLOSE, &mut h).await.is_err() {
                h.abort();
            }
        }
        result
    }
}

/// How long the HTTP endpoint may take to close its connections at shutdown.
const HTTP_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// Joins pipeline tasks (`names` by task id); see [`Daemon::wait`].
async fn join_pipelines(
    mut pipelines: JoinSet<Result<(), PipelineError>>,
    names: &HashMap<tokio::task::Id, String>,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let mut first_error = None;
    while let Some(done) = pipelines.join_next_with_id().await {
        let failure = match done {
            Ok((_, Ok(()))) => continue,
            Ok((_, Err(e))) => DaemonError::Pipeline(e),
            Err(e) => {
                let pipeline = names.get(&e.id()).cloned().unwrap_or_default();
                let reason = if e.is_panic() {
                    let panic = e.into_panic();
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    format!("panicked: {text}")
                } else {
                    "was cancelled".into()
                };
                DaemonError::Failed { pipeline, reason }
            }
        };
        tracing::error!("{failure}; stopping the other pipelines.");
        health.set_failed(failure.to_string());
        shutdown.cancel();
        first_error.get_or_insert(failure);
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs the daemon until `shutdown` is cancelled and every pipeline has drained.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    Daemon::start(config, shutdown).await?.wait().await
}

/// The multi-threaded runtime, one worker per core: nothing blocks its workers (each consumer
/// polls on a thread of its own, inference runs on blocking threads).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("anomalyd")
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_pipeline_fails_the_daemon_and_its_readiness_at_once() {
        let metrics = Metrics::new();
        let health = Health::new(["good".to_string(), "bad".to_string()], &metrics);
        health.set_models_loaded();
        health.set_assigned("good", true);
        health.set_assigned("bad", true);
        assert!(health.readiness().is_ok());
        let shutdown = CancellationToken::new();
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        let stop = shutdown.clone();
        let good = set.spawn(async move {
            stop.cancelled().await;
            Ok(())
        });
        names.insert(good.id(), "good".to_string());
        let bad = set.spawn(async { panic!("broken pipe") });
        names.insert(bad.id(), "bad".to_string());
        let result = join_pipelines(set, &names, &health, &shutdown).await;
        let err = result.expect_err("a panic is not a clean exit").to_string();
        assert_eq!(err, "pipeline bad panicked: broken pipe");
        assert!(shutdown.is_cancelled(), "the other pipelines are stopped");
        assert_eq!(health.readiness(), Err(err));
    }
}
