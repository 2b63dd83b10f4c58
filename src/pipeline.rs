//! Pipeline: one configured flow, Kafka topic(s) → decode → window → batch → infer → score →
//! threshold → alert → sinks, as four tasks joined by bounded channels:
//!
//! ```text
//! ingest (consumer, decode) ─▶ batcher (window, micro-batch) ─▶ inference threads ─▶ judge (in order) ─▶ sinks
//!                                                                                    committer (stored offsets)
//! ```
//!
//! Inference runs on blocking threads (at most `runtime.inference_threads` batches at once,
//! across all pipelines); the judge takes finished batches strictly in the order they were
//! prepared, so per-key state always sees a key's records in partition order. Bounded channels
//! make a slow model slow the consumer down rather than buffer without limit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::alertmanager::AlertmanagerSink;
use crate::batch::MicroBatcher;
use crate::checkpoint::{self, Checkpoint};
use crate::config::PipelineConfig;
use crate::decode::Record;
use crate::detect::{Batch, Detector, Origin};
use crate::kafka::{
    consumer_config, producer_config, KafkaConfig, PendingRestore, PipelineContext, ProducerContext,
};
use crate::metrics::{Health, Metrics};
use crate::model::{Inference, Model, ModelError};
use crate::offsets::OffsetTracker;
use crate::sink::Outputs;

/// What can stop a pipeline from starting.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("pipelines.{pipeline}.{source}")]
    Detector {
        pipeline: String,
        source: crate::detect::DetectorError,
    },
    #[error("pipeline {pipeline}: cannot create the Kafka {what}: {source}")]
    Client {
        pipeline: String,
        what: &'static str,
        source: rdkafka::error::KafkaError,
    },
}

/// What every pipeline of a daemon shares.
#[derive(Clone)]
pub struct Shared {
    pub kafka: KafkaConfig,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// One permit per inference thread.
    pub inference: Arc<Semaphore>,
    /// How long shutdown may take once it starts.
    pub grace: Duration,
    /// Notified (SIGHUP) to check every model file for a new version at once.
    pub reload: Arc<Notify>,
    /// Where per-key state is checkpointed, if anywhere.
    pub state_dir: Option<std::path::PathBuf>,
    pub checkpoint_interval: Duration,
}

type Inferred = (Result<Inference, ModelError>, Duration);

/// Runs one pipeline until `shutdown` is cancelled, then drains it: stops consuming, finishes
/// the records in flight, commits, and returns (within the grace period).
pub async fn run(
    name: String,
    cfg: PipelineConfig,
    model: Arc<Model>,
    shared: Shared,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let client_err = |what, source| PipelineError::Client {
        pipeline: name.clone(),
        what,
        source,
    };
    let detector = cfg
        .detector()
        .build(&name, model.clone())
        .map_err(|source| PipelineError::Detector {
            pipeline: name.clone(),
            source,
        })?;
    let detector = Arc::new(Mutex::new(detector));
    let decoder = detector.lock().expect("detector lock").decoder().clone();
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let checkpoint_path = shared
        .state_dir
        .as_ref()
        .map(|dir| checkpoint::path(dir, &name));
    let restore = match &checkpoint_path {
        Some(path) => pending_restore(&name, path, &detector.lock().expect("detector lock")),
        None => PendingRestore::default(),
    };
    let context = PipelineContext {
        pipeline: name.clone(),
        restore: Mutex::new(restore),
        tracker: tracker.clone(),
        detector: detector.clone(),
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
        drain_timeout: shared.kafka.drain_timeout,
    };
    let group = format!("{}.{}", shared.kafka.group_id, name);
    let consumer: Arc<StreamConsumer<PipelineContext>> = Arc::new(
        consumer_config(&shared.kafka, &group)
            .create_with_context(context)
            .map_err(|e| client_err("consumer", e))?,
    );
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| client_err("consumer", e))?;
    let producer = producer_config(&shared.kafka)
        .create_with_context::<_, rdkafka::producer::FutureProducer<ProducerContext>>(
            ProducerContext,
        )
        .map_err(|e| client_err("producer", e))?;
    let give_up = CancellationToken::new();
    let alertmanager = cfg.alertmanager.clone().map(|am| {
        let (tx, rx) = mpsc::channel(1024);
        let sink = AlertmanagerSink::new(am, &name, shared.metrics.clone());
        (tx, tokio::spawn(sink.run(rx, give_up.clone())))
    });
    let (alertmanager_tx, alertmanager_task) = alertmanager.unzip();
    let outputs = Arc::new(Outputs::new(
        &name,
        &cfg,
        model.contract.features.clone(),
        producer,
        shared.metrics.clone(),
        tracker.clone(),
        give_up.clone(),
        alertmanager_tx,
    ));
    shared.metrics.init_pipeline(&name);
    set_model_info(&shared.metrics, &name, &model, true);
    let checkpointer = checkpoint_path.clone().map(|path| {
        tokio::spawn(checkpoint_loop(
            name.clone(),
            path,
            shared.checkpoint_interval,
            detector.clone(),
            shared.metrics.clone(),
            give_up.clone(),
        ))
    });
    let reloader = tokio::spawn(reload_loop(
        name.clone(),
        cfg.model.clone(),
        cfg.reload_check,
        detector.clone(),
        shared.clone(),
        give_up.clone(),
    ));
    tracing::info!(pipeline = %name, group = %group, topics = ?cfg.topics, model = %model.path.display(), "Pipeline started.");

    let (record_tx, record_rx) = mpsc::channel::<(Origin, Record)>(cfg.batch.max_size * 4);
    let (judge_tx, judge_rx) = mpsc::channel::<(Batch, JoinHandle<Inferred>)>(4);
    let batcher = tokio::spawn(batch_loop(
        record_rx,
        judge_tx,
        detector.clone(),
        cfg.clone(),
        shared.clone(),
        name.clone(),
    ));
    let judge = tokio::spawn(judge_loop(
        judge_rx,
        detector.clone(),
        outputs.clone(),
        shared.metrics.clone(),
    ));
    let stop_committer = CancellationToken::new();
    let committer = tokio::spawn(commit_loop(
        consumer.clone(),
        tracker.clone(),
        shared.kafka.commit_interval,
        shared.metrics.clone(),
        name.clone(),
        stop_committer.clone(),
    ));

    // Ingest: consume, decode, hand over. Nothing here waits on inference except through the
    // bounded channel (backpressure).
    let mut topic_names: Vec<Arc<str>> = Vec::new();
    let mut consecutive_errors = 0u32;
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let m = match message {
            Ok(m) => {
                consecutive_errors = 0;
                m
            }
            Err(e) => {
                consecutive_errors += 1;
                tracing::warn!(pipeline = %name, "Consumer error: {e}");
                // Back off a little while the broker is unreachable, so the log stays readable.
                let pause = Duration::from_millis(50 * u64::from(consecutive_errors.min(20)));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let topic = match topic_names.iter().find(|t| ***t == *m.topic()) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(m.topic());
                topic_names.push(t.clone());
                t
            }
        };
        let origin = Origin {
            topic,
            partition: m.partition(),
            offset: m.offset(),
        };
        tracker
            .lock()
            .expect("tracker lock")
            .begin(&origin.topic, origin.partition, origin.offset);
        let payload = m.payload().unwrap_or_default();
        match decoder.decode_json(payload) {
            Ok(mut record) => {
                if record.timestamp.is_none() {
                    record.timestamp = m.timestamp().to_millis().map(crate::time::rfc3339_millis);
                }
                drop(m);
                if record_tx.send((origin, record)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                let key = m.key().map(<[u8]>::to_vec);
                let payload = payload.to_vec();
                drop(m);
                outputs.undecodable(origin, key, payload, &e);
            }
        }
    }

    // Drain: no more records come in; let the batches in flight finish, then commit.
    shared.health.set_stopping();
    let started = Instant::now();
    tracing::info!(pipeline = %name, "Stopped consuming; draining in-flight records.");
    drop(record_tx);
    let deadline = tokio::time::Instant::now() + shared.grace;
    let _ = tokio::time::timeout_at(deadline, batcher).await;
    let _ = tokio::time::timeout_at(deadline, judge).await;
    while tracker.lock().expect("tracker lock").in_flight(None) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    give_up.cancel();
    stop_committer.cancel();
    let _ = reloader.await;
    if let Some(task) = checkpointer {
        let _ = task.await;
    }
    if let Some(task) = alertmanager_task {
        let _ = task.await;
    }
    let _ = committer.await;
    let left = tracker.lock().expect("tracker lock").in_flight(None);
    if left > 0 {
        tracing::warn!(pipeline = %name, in_flight = left, "Grace period over with records in flight; they will be processed again after the restart.");
    }
    let final_positions = {
        let t = tracker.lock().expect("tracker lock");
        let mut tpl = TopicPartitionList::new();
        if let Ok(assigned) = consumer.assignment() {
            for e in assigned.elements() {
                if let Some(pos) = t.position(e.topic(), e.partition()) {
                    let _ = tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(pos));
                }
            }
        }
        tpl
    };
    if final_positions.count() > 0 {
        let _ = consumer.store_offsets(&final_positions);
        if let Err(e) = consumer.commit(&final_positions, CommitMode::Sync) {
            tracing::warn!(pipeline = %name, "Final commit failed: {e}; records since the last commit will be processed again.");
        }
    }
    let _ = outputs.producer().flush(Duration::from_secs(5));
    if let Some(path) = &checkpoint_path {
        let snapshot = detector.lock().expect("detector lock").checkpoint();
        write_checkpoint(&name, path, &snapshot, &shared.metrics);
    }
    consumer.unsubscribe();
    tracing::info!(pipeline = %name, elapsed_ms = started.elapsed().as_millis() as u64, "Pipeline drained and committed.");
    Ok(())
}

/// Collects records into micro-batches (max size or max wait), windows them, and starts their
/// inference.
async fn batch_loop(
    mut records: mpsc::Receiver<(Origin, Record)>,
    judge: mpsc::Sender<(Batch, JoinHandle<Inferred>)>,
    detector: Arc<Mutex<Detector>>,
    cfg: PipelineConfig,
    shared: Shared,
    name: String,
) {
    let mut batcher = MicroBatcher::new(cfg.batch.max_size, cfg.batch.max_wait);
    while let Some(batch) = batcher.next(&mut records).await {
        dispatch(batch, &judge, &detector, &shared, &name).await;
    }
}

async fn dispatch(
    records: Vec<(Origin, Record)>,
    judge: &mpsc::Sender<(Batch, JoinHandle<Inferred>)>,
    detector: &Arc<Mutex<Detector>>,
    shared: &Shared,
    name: &str,
) {
    let mut batch = detector.lock().expect("detector lock").prepare(records);
    let model = batch.model.clone();
    let n = batch.sample_count();
    shared
        .metrics
        .batch_size
        .with_label_values(&[name])
        .observe(n as f64);
    let samples = std::mem::take(&mut batch.samples);
    let permit = shared
        .inference
        .clone()
        .acquire_owned()
        .await
        .expect("the inference semaphore is never closed");
    let handle = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let t = Instant::now();
        let result = model.infer(&samples, n);
        (result, t.elapsed())
    });
    let _ = judge.send((batch, handle)).await;
}

/// Takes inferred batches in order, judges them, and emits their outcomes.
async fn judge_loop(
    mut batches: mpsc::Receiver<(Batch, JoinHandle<Inferred>)>,
    detector: Arc<Mutex<Detector>>,
    outputs: Arc<Outputs>,
    metrics: Metrics,
) {
    let name = outputs.pipeline.clone();
    let mut evictions_seen = 0;
    while let Some((batch, handle)) = batches.recv().await {
        let (result, elapsed) = match handle.await {
            Ok(r) => r,
            Err(e) => (
                Err(ModelError::Inference {
                    path: Default::default(),
                    reason: format!("inference thread failed: {e}"),
                }),
                Duration::ZERO,
            ),
        };
        match result {
            Ok(inference) => {
                metrics
                    .inference_seconds
                    .with_label_values(&[&name])
                    .observe(elapsed.as_secs_f64());
                let (outcomes, keys, evictions, firing) = {
                    let mut d = detector.lock().expect("detector lock");
                    let o = d.judge(batch, &inference);
                    (o, d.keys(), d.evictions(), d.firing())
                };
                metrics
                    .keys_tracked
                    .with_label_values(&[&name])
                    .set(keys as i64);
                metrics
                    .keys_firing
                    .with_label_values(&[&name])
                    .set(firing as i64);
                metrics
                    .key_evictions
                    .with_label_values(&[&name])
                    .inc_by(evictions - evictions_seen);
                evictions_seen = evictions;
                for outcome in outcomes {
                    outputs.emit(outcome);
                }
            }
            Err(e) => {
                tracing::error!(pipeline = %name, "Inference failed; the batch's records go to the dead-letter topic: {e}");
                for entry in batch.entries {
                    let payload = serde_json::json!({
                        "key": entry.record.key,
                        "timestamp": entry.record.timestamp,
                        "values": entry.record.values,
                    });
                    outputs.dead_letter(
                        entry.origin,
                        Some(entry.record.key.into_bytes()),
                        payload.to_string().into_bytes(),
                        "inference_failed",
                        e.to_string(),
                    );
                }
            }
        }
    }
}

/// Every `every`, stores the positions whose contiguous prefix moved and commits them at once
/// (asynchronously), so the committed position trails the finished records by one interval
/// rather than two; librdkafka's own auto-commit of the stored offsets stays on as a backstop
/// (and commits on close).
async fn commit_loop(
    consumer: Arc<StreamConsumer<PipelineContext>>,
    tracker: Arc<Mutex<OffsetTracker>>,
    every: Duration,
    metrics: Metrics,
    name: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let moved = tracker.lock().expect("tracker lock").take_committable();
        if moved.is_empty() {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), pos) in &moved {
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*pos));
        }
        // A partition revoked a moment ago cannot be stored or committed any more; its next
        // owner starts from the position committed on revoke.
        let stored = consumer
            .store_offsets(&tpl)
            .and_then(|()| consumer.commit(&tpl, CommitMode::Async));
        match stored {
            Ok(()) => metrics
                .offsets_committed
                .with_label_values(&[&name])
                .inc_by(moved.len() as u64),
            Err(e) => tracing::debug!(pipeline = %name, "Committing offsets: {e}"),
        }
    }
}

fn set_model_info(metrics: &Metrics, pipeline: &str, model: &Model, serving: bool) {
    let c = &model.contract;
    let kind = format!("{:?}", c.kind).to_lowercase();
    let labels = [pipeline, c.name.as_str(), c.version.as_str(), kind.as_str()];
    if serving {
        metrics.model_info.with_label_values(&labels).set(1);
    } else {
        let _ = metrics.model_info.remove_label_values(&labels);
    }
}

/// The identity of a file's current version: its modification time and length.
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Watches the model file (every `every`, and at once on SIGHUP) and swaps in a new version
/// between batches. A file that does not load or does not fit is refused, logged and counted,
/// and the running model keeps serving. Replace model files atomically (write, then rename):
/// a half-written file is refused, then picked up once complete.
async fn reload_loop(
    name: String,
    path: std::path::PathBuf,
    every: Duration,
    detector: Arc<Mutex<Detector>>,
    shared: Shared,
    stop: CancellationToken,
) {
    let mut seen = file_stamp(&path);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every), if !every.is_zero() => {}
            _ = shared.reload.notified() => {}
            _ = stop.cancelled() => return,
        }
        let stamp = file_stamp(&path);
        if stamp == seen {
            continue;
        }
        seen = stamp;
        let load_path = path.clone();
        let loaded = tokio::task::spawn_blocking(move || Model::load(&load_path)).await;
        let result = match loaded {
            Ok(Ok(model)) => {
                let model = Arc::new(model);
                let mut d = detector.lock().expect("detector lock");
                let old = d.model().clone();
                let swapped = d.set_model(model.clone());
                swapped
                    .map(|()| (old, model))
                    .map_err(|why| format!("model {}: {why}", path.display()))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("model {}: loading failed: {e}", path.display())),
        };
        match result {
            Ok((old, new)) => {
                set_model_info(&shared.metrics, &name, &old, false);
                set_model_info(&shared.metrics, &name, &new, true);
                shared
                    .metrics
                    .model_reloads
                    .with_label_values(&[&name])
                    .inc();
                tracing::info!(pipeline = %name, from = %old.contract.version, to = %new.contract.version, "Swapped in a new model; every key's threshold restarts from its calibration.");
            }
            Err(e) => {
                shared
                    .metrics
                    .model_load_failures
                    .with_label_values(&[&name])
                    .inc();
                tracing::error!(pipeline = %name, "Refused a new model file, the running model keeps serving: {e}");
            }
        }
    }
}

/// Reads a pipeline's checkpoint and sorts its keys by partition, to restore on assignment.
fn pending_restore(name: &str, path: &std::path::Path, detector: &Detector) -> PendingRestore {
    let checkpoint = match checkpoint::load(path) {
        Ok(Some(c)) => c,
        Ok(None) => return PendingRestore::default(),
        Err(e) => {
            tracing::warn!(pipeline = %name, "Ignoring the checkpoint; every key starts from the calibration: {e}");
            return PendingRestore::default();
        }
    };
    let (usable, thresholds, why) = detector.restorable(&checkpoint);
    if let Some(why) = why {
        tracing::warn!(pipeline = %name, path = %path.display(), "Restoring only part of the checkpoint: {why}.");
    }
    let mut pending = PendingRestore {
        thresholds,
        ..PendingRestore::default()
    };
    if usable {
        tracing::info!(pipeline = %name, keys = checkpoint.keys.len(), written_at = %checkpoint.written_at, "Loaded the checkpoint; keys are restored as their partitions are assigned.");
        for k in checkpoint.keys {
            pending
                .keys
                .entry((k.topic.clone(), k.partition))
                .or_default()
                .push(k);
        }
    }
    pending
}

fn write_checkpoint(name: &str, path: &std::path::Path, snapshot: &Checkpoint, metrics: &Metrics) {
    let result = checkpoint::save(path, snapshot);
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics
        .checkpoints
        .with_label_values(&[name, outcome])
        .inc();
    match result {
        Ok(()) => {
            tracing::debug!(pipeline = %name, keys = snapshot.keys.len(), "Checkpoint written.")
        }
        Err(e) => {
            tracing::error!(pipeline = %name, "Writing the checkpoint failed; a restart would re-learn every key: {e}")
        }
    }
}

/// Writes the pipeline's checkpoint every `every` until `stop`.
async fn checkpoint_loop(
    name: String,
    path: std::path::PathBuf,
    every: Duration,
    detector: Arc<Mutex<Detector>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let snapshot = detector.lock().expect("detector lock").checkpoint();
        let (name2, path2, metrics2) = (name.clone(), path.clone(), metrics.clone());
        let _ = tokio::task::spawn_blocking(move || {
            write_checkpoint(&name2, &path2, &snapshot, &metrics2)
        })
        .await;
    }
}
