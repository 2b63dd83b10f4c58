//! Metrics: Prometheus metrics and the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Labels are low-cardinality only (pipeline, outcome, reason, topic, partition): never the
//! entity key, whose cardinality is the users' and unbounded. The registry is an explicit value,
//! not a global, so tests can run several daemons in one process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::{Deserialize, Serialize};

use crate::alert::EventKind;

/// `[http]`: the endpoint serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpConfig {
    /// Listen address; empty disables the endpoint.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}

fn default_listen() -> String {
    "0.0.0.0:9898".into()
}

/// Label values, defined once: [`Metrics::init_pipeline`] creates every series from these, and
/// the places that count use them.
pub mod label {
    /// `outcome` of `anomalyd_records_total`.
    pub const SCORED: &str = "scored";
    pub const WARMING: &str = "warming";
    pub const DEAD_LETTER: &str = "dead_letter";
    pub const OUTCOMES: [&str; 3] = [SCORED, WARMING, DEAD_LETTER];
    /// `sink` of `anomalyd_produce_errors_total`.
    pub const ALERTS: &str = "alerts";
    pub const SCORES: &str = "scores";
    pub const DENOISED: &str = "denoised";
    pub const DEAD_LETTERS: &str = "dead_letters";
    pub const STDOUT: &str = "stdout";
    pub const SINKS: [&str; 5] = [ALERTS, SCORES, DENOISED, DEAD_LETTERS, STDOUT];
    /// `result` of the push and write counters.
    pub const OK: &str = "ok";
    pub const ERROR: &str = "error";
    /// `result` of `anomalyd_candidates_total`.
    pub const PROMOTED: &str = "promoted";
    pub const REFUSED: &str = "refused";
    /// `phase` of `anomalyd_startup_seconds`, in the order they happen.
    pub const MODELS_LOADED: &str = "models_loaded";
    pub const ASSIGNED: &str = "assigned";
    pub const RESTORED: &str = "restored";
    pub const FIRST_JUDGED: &str = "first_judged";
    pub const PHASES: [&str; 4] = [MODELS_LOADED, ASSIGNED, RESTORED, FIRST_JUDGED];
    /// `role` of `anomalyd_model_info`.
    pub const SERVING: &str = "serving";
    pub const CANDIDATE: &str = "candidate";

    pub fn result<T, E>(r: &Result<T, E>) -> &'static str {
        if r.is_ok() {
            OK
        } else {
            ERROR
        }
    }
}

/// Every metric anomalyd exposes (documented in docs/OPERATIONS.md).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub records: IntCounterVec,
    pub anomalies: IntCounterVec,
    pub alerts: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub produce_errors: IntCounterVec,
    pub inference_seconds: HistogramVec,
    pub batch_size: HistogramVec,
    pub reconstruction_error: HistogramVec,
    pub anomaly_score: HistogramVec,
    pub consumer_lag: IntGaugeVec,
    pub partitions_assigned: IntGaugeVec,
    pub keys_tracked: IntGaugeVec,
    pub key_evictions: IntCounterVec,
    pub rebaselines: IntCounterVec,
    pub keys_firing: IntGaugeVec,
    pub score_drift: GaugeVec,
    pub drifts: IntCounterVec,
    pub offsets_committed: IntCounterVec,
    pub deliveries_in_flight: IntGaugeVec,
    pub outputs_dropped: IntCounterVec,
    pub model_info: IntGaugeVec,
    pub candidates: IntCounterVec,
    pub feedback: IntCounterVec,
    pub model_load_failures: IntCounterVec,
    pub model_reloads: IntCounterVec,
    pub startup_seconds: GaugeVec,
    pub model_swap_seconds: GaugeVec,
    pub build_info: IntGaugeVec,
    pub alertmanager_pushes: IntCounterVec,
    pub alertmanager_pending: IntGaugeVec,
    pub state_writes: IntCounterVec,
    pub state_records: IntCounterVec,
    pub state_restore_failures: IntCounterVec,
    pub keys_restored: IntCounterVec,
    pub ready: IntGauge,
    pub http_connections: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn float_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &["pipeline"],
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let exp = |start: f64, factor: f64, n: usize| {
            prometheus::exponential_buckets(start, factor, n).expect("valid buckets")
        };
        let m = Metrics {
            records: counter(&r, "anomalyd_records_total", "Input records by outcome: scored, warming (window not full yet) or dead_letter.", &["pipeline", "outcome"]),
            anomalies: counter(&r, "anomalyd_anomalies_total", "Scored records over their key's threshold.", &["pipeline"]),
            alerts: counter(&r, "anomalyd_alerts_total", "Alert events by state: firing or resolved.", &["pipeline", "state"]),
            dead_letters: counter(&r, "anomalyd_dead_letters_total", "Records that could not be scored, by reason.", &["pipeline", "reason"]),
            produce_errors: counter(&r, "anomalyd_produce_errors_total", "Failed deliveries to an output topic (each is retried).", &["pipeline", "sink"]),
            inference_seconds: histogram(&r, "anomalyd_inference_seconds", "Time to run one batch through the model.", exp(0.00005, 2.0, 16)),
            batch_size: histogram(&r, "anomalyd_batch_size", "Samples per inference batch.", exp(1.0, 2.0, 12)),
            reconstruction_error: histogram(&r, "anomalyd_reconstruction_error", "Score (mean squared reconstruction error, normalised units) of scored records.", exp(0.001, 2.0, 20)),
            anomaly_score: histogram(&r, "anomalyd_anomaly_score", "Anomaly score (0..1) of scored records.", vec![0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.95, 0.99, 0.999]),
            consumer_lag: gauge(&r, "anomalyd_consumer_lag", "Records between the consumer's position and the partition's end, from librdkafka statistics.", &["pipeline", "topic", "partition"]),
            partitions_assigned: gauge(&r, "anomalyd_partitions_assigned", "Input partitions currently assigned to this instance.", &["pipeline"]),
            keys_tracked: gauge(&r, "anomalyd_keys_tracked", "Entity keys with state held in memory.", &["pipeline"]),
            key_evictions: counter(&r, "anomalyd_key_evictions_total", "Keys evicted (least recently seen) to stay under max_keys.", &["pipeline"]),
            rebaselines: counter(&r, "anomalyd_rebaselines_total", "Episodes that outlasted rebaseline_after: a key's new level accepted as its normal.", &["pipeline"]),
            keys_firing: gauge(&r, "anomalyd_keys_firing", "Keys with an alert episode currently firing.", &["pipeline"]),
            score_drift: float_gauge(&r, "anomalyd_score_drift", "The drift detector's statistic over its threshold: 1 or more while the pipeline's scores have risen since its model started.", &["pipeline"]),
            drifts: counter(&r, "anomalyd_drift_detected_total", "Times a pipeline's scores were found to have risen since its model started (the drift detector crossing its threshold).", &["pipeline"]),
            offsets_committed: counter(&r, "anomalyd_offset_commits_total", "Offset positions stored for commit.", &["pipeline"]),
            deliveries_in_flight: gauge(&r, "anomalyd_deliveries_in_flight", "Records whose outputs await the broker's acknowledgement; consumption pauses at 10000.", &["pipeline"]),
            outputs_dropped: counter(&r, "anomalyd_outputs_dropped_total", "Outputs no broker would accept (too large, invalid) whose reduced dead letter could not be delivered either; dropped so that the partition moves on.", &["pipeline", "sink"]),
            model_info: gauge(&r, "anomalyd_model_info", "The model serving each pipeline (role serving) and the candidate scored in its shadow, if any (role candidate); value 1.", &["pipeline", "model", "version", "kind", "role"]),
            feedback: counter(&r, "anomalyd_feedback_total", "Operators' false-alarm verdicts read from the feedback topic: applied (the key's threshold raised), duplicate (that episode was marked before), pending (the key is not here yet), dropped (too many keys pending), invalid (not a feedback message).", &["pipeline", "result"]),
            candidates: counter(&r, "anomalyd_candidates_total", "Candidate models decided: promoted to serve, or refused (did not load, did not fit, or failed the promotion rule).", &["pipeline", "result"]),
            model_load_failures: counter(&r, "anomalyd_model_load_failures_total", "Models refused at start or on reload.", &["pipeline"]),
            model_reloads: counter(&r, "anomalyd_model_reloads_total", "New model versions swapped in while running.", &["pipeline"]),
            startup_seconds: float_gauge(&r, "anomalyd_startup_seconds", "Seconds from the daemon's start to each step of a pipeline's cold start: models_loaded, assigned (the group gave it partitions), restored (their keys' state read back), first_judged (its first record judged).", &["pipeline", "phase"]),
            model_swap_seconds: float_gauge(&r, "anomalyd_model_swap_seconds", "Seconds the last model swap took, from finding the new file to the new version serving (mostly loading it).", &["pipeline"]),
            alertmanager_pushes: counter(&r, "anomalyd_alertmanager_pushes_total", "Pushes to Alertmanager by result: ok or error.", &["pipeline", "result"]),
            alertmanager_pending: gauge(&r, "anomalyd_alertmanager_pending_alerts", "Alerts (firings, resolutions, resends) Alertmanager has not taken yet; retried until it does.", &["pipeline"]),
            state_writes: counter(&r, "anomalyd_state_writes_total", "Writes of changed key states to the state topic, by result: ok or error.", &["pipeline", "result"]),
            state_records: counter(&r, "anomalyd_state_records_total", "Key states (and tombstones of evicted keys) written to the state topic.", &["pipeline"]),
            state_restore_failures: counter(&r, "anomalyd_state_restore_failures_total", "Assignments whose keys' state could not be read from the state topic (they start from the calibration).", &["pipeline"]),
            keys_restored: counter(&r, "anomalyd_keys_restored_total", "Keys whose state was restored from the state topic as their partitions were assigned.", &["pipeline"]),
            build_info: gauge(&r, "anomalyd_build_info", "anomalyd's version (value 1).", &["version"]),
            ready: IntGauge::new("anomalyd_ready", "1 when models are loaded and every pipeline has partitions assigned.").expect("valid metric"),
            http_connections: IntGauge::new("anomalyd_http_connections", "Connections open to this HTTP endpoint (at most 128; idle ones close after 10 s).").expect("valid metric"),
            registry: r,
        };
        for g in [&m.ready, &m.http_connections] {
            m.registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        {
            let _ = m.registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        m
    }

    /// Creates a pipeline's labelled counters at zero, so that rules and dashboards see them
    /// (and `increase()` sees their first step) before the first event.
    pub fn init_pipeline(&self, pipeline: &str) {
        for outcome in label::OUTCOMES {
            self.records.with_label_values(&[pipeline, outcome]);
        }
        for reason in crate::decode::DecodeError::REASONS
            .iter()
            .chain(&["inference_failed", crate::detect::NON_FINITE_SCORE])
        {
            self.dead_letters.with_label_values(&[pipeline, reason]);
        }
        for sink in label::SINKS {
            self.produce_errors.with_label_values(&[pipeline, sink]);
            self.outputs_dropped.with_label_values(&[pipeline, sink]);
        }
        self.score_drift.with_label_values(&[pipeline]);
        for event in [EventKind::Firing, EventKind::Resolved] {
            self.alerts.with_label_values(&[pipeline, event.as_str()]);
        }
        for result in crate::feedback::FeedbackOutcome::LABELS {
            self.feedback.with_label_values(&[pipeline, result]);
        }
        for result in [label::PROMOTED, label::REFUSED] {
            self.candidates.with_label_values(&[pipeline, result]);
        }
        for result in [label::OK, label::ERROR] {
            self.alertmanager_pushes
                .with_label_values(&[pipeline, result]);
            self.state_writes.with_label_values(&[pipeline, result]);
        }
        for c in [
            &self.anomalies,
            &self.key_evictions,
            &self.rebaselines,
            &self.drifts,
            &self.offsets_committed,
            &self.model_load_failures,
            &self.model_reloads,
            &self.keys_restored,
            &self.state_records,
            &self.state_restore_failures,
        ] {
            c.with_label_values(&[pipeline]);
        }
    }

    /// Drops the lag series of partitions this instance no longer consumes, so that the lag
    /// (and an autoscaler reading it) does not count a revoked partition's last value.
    pub fn drop_lag(&self, pipeline: &str, partitions: &[(String, i32)]) {
        for (topic, p) in partitions {
            let _ = self
                .consumer_lag
                .remove_label_values(&[pipeline, topic, &p.to_string()]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    /// Sets the lag gauges of a pipeline from a librdkafka statistics report.
    pub fn set_lag(&self, pipeline: &str, stats: &rdkafka::Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                // Partition -1 is librdkafka's internal "unassigned" bucket; a lag of -1 means
                // unknown (not fetched yet, or not assigned here).
                if *p < 0 {
                    continue;
                }
                let p = p.to_string();
                let labels = [pipeline, topic.as_str(), p.as_str()];
                if part.consumer_lag < 0 {
                    let _ = self.consumer_lag.remove_label_values(&labels);
                    continue;
                }
                self.consumer_lag
                    .with_label_values(&labels)
                    .set(part.consumer_lag);
            }
        }
    }
}

/// What `/healthz` and `/readyz` report; mirrored in the `anomalyd_ready` gauge.
pub struct Health {
    /// Pipelines by name, and whether each has partitions assigned.
    pipelines: Mutex<BTreeMap<String, bool>>,
    models_loaded: AtomicBool,
    /// Set once the daemon has started draining: not ready for new work any more.
    stopping: AtomicBool,
    /// Why a pipeline died, once one has.
    failed: Mutex<Option<String>>,
    gauge: IntGauge,
}

impl Health {
    pub fn new(pipelines: impl IntoIterator<Item = String>, metrics: &Metrics) -> Health {
        Health {
            pipelines: Mutex::new(pipelines.into_iter().map(|p| (p, false)).collect()),
            models_loaded: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            failed: Mutex::new(None),
            gauge: metrics.ready.clone(),
        }
    }

    fn refresh(&self) {
        self.gauge.set(i64::from(self.readiness().is_ok()));
    }

    pub fn set_models_loaded(&self) {
        self.models_loaded.store(true, Ordering::SeqCst);
        self.refresh();
    }

    pub fn set_assigned(&self, pipeline: &str, assigned: bool) {
        if let Some(a) = self
            .pipelines
            .lock()
            .expect("health lock")
            .get_mut(pipeline)
        {
            *a = assigned;
        }
        self.refresh();
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.refresh();
    }

    /// A pipeline died: not ready from now on, saying why.
    pub fn set_failed(&self, why: String) {
        self.failed.lock().expect("health lock").get_or_insert(why);
        self.refresh();
    }

    /// `Ok` when ready, else the reasons it is not.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(why) = self.failed.lock().expect("health lock").as_ref() {
            return Err(why.clone());
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Err("shutting down".into());
        }
        if !self.models_loaded.load(Ordering::SeqCst) {
            return Err("models not loaded yet".into());
        }
        let waiting: Vec<String> = self
            .pipelines
            .lock()
            .expect("health lock")
            .iter()
            .filter(|(_, a)| !**a)
            .map(|(p, _)| p.clone())
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "no partitions assigned yet to pipeline(s): {}",
                waiting.join(", ")
            ))
        }
    }
}

/// Serves the endpoint until `shutdown` is cancelled. Binds before returning, so a bad address
/// or a port in use is reported at start-up.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::{http::StatusCode, routing::get, Router};

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let connections = metrics.http_connections.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let h = health.clone();
                async move {
                    match h.readiness() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        );
    let listener = Guarded {
        listener,
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS)),
        open: connections,
    };
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok((bound, handle))
}

/// Connections the HTTP endpoint serves at once; more wait in the kernel's backlog until one
/// closes. Prometheus and the probes need a handful; the limit keeps a flood of idle clients from
/// taking the file descriptors the pipelines need (a model reload, a broker connection).
pub const MAX_HTTP_CONNECTIONS: usize = 128;

/// A connection that moves no byte either way for this long is closed: it frees the slot of a
/// client that sent half a request, or sits idle between scrapes.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint's listener: at most [`MAX_HTTP_CONNECTIONS`] connections, each closed after
/// [`HTTP_IDLE_TIMEOUT`] without progress.
struct Guarded {
    listener: tokio::net::TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    open: IntGauge,
}

impl axum::serve::Listener for Guarded {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedStream, SocketAddr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    self.open.inc();
                    let stream = GuardedStream {
                        stream,
                        idle: Box::pin(tokio::time::sleep(HTTP_IDLE_TIMEOUT)),
                        _slot: slot,
                        open: self.open.clone(),
                    };
                    return (stream, addr);
                }
                // Out of file descriptors, or a connection reset before it was accepted: wait a
                // little rather than spin, as axum's own listener does.
                Err(e) => {
                    tracing::debug!("Accepting an HTTP connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection of the endpoint, holding its slot until it closes.
struct GuardedStream {
    stream: tokio::net::TcpStream,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    open: IntGauge,
}

impl GuardedStream {
    /// Restarts the idle timer after progress; fails the pending operation once it has run out.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        match poll {
            Poll::Ready(r) => {
                let deadline = tokio::time::Instant::now() + HTTP_IDLE_TIMEOUT;
                self.idle.as_mut().reset(deadline);
                Poll::Ready(r)
            }
            Poll::Pending => match std::future::Future::poll(self.idle.as_mut(), cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "idle HTTP connection",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl tokio::io::AsyncRead for GuardedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        self.watch(cx, poll)
    }
}

impl tokio::io::AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
