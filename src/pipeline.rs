//! Pipeline: one configured flow, Kafka topic(s) → decode → window → batch → infer → score →
//! threshold → alert → sinks, as a few owners joined by channels:
//!
//! ```text
//! ingest thread ──Input──▶ detector task ──▶ inference threads (spawn_blocking, in parallel)
//! (consumer, decode,       (Detector, offsets,      │
//!  rebalances, commits)     barriers)  ◀── judged in order ──┘
//!        ▲                      │ emit ──▶ deliveries (tasks) ──▶ finished offsets
//!        └──── positions ───────┘ state ──▶ changelog
//! ```
//!
//! The detector task owns the [`Detector`] (windows, thresholds, alert states) and the
//! [`OffsetTracker`]; nothing else touches them, so there is no lock. Everything that changes
//! them reaches it as an [`Input`] in stream order: records, assignments with their restored
//! state, revocations, model reloads. Inference runs on blocking threads (at most
//! `runtime.inference_threads` batches at once, across all pipelines) while the task prepares
//! the next batch; finished batches are judged strictly in the order they were prepared, so
//! per-key state sees a key's records in partition order.
//!
//! # Barriers
//! Every `kafka.commit_interval`, a barrier enters the queue of batches behind the last one
//! prepared. When it reaches the front (everything before it judged), it takes the state of
//! the keys changed since the previous barrier and the position of every partition. Once every
//! output of the records before those positions is acknowledged, the state is written to the
//! changelog; once that is acknowledged, the positions are committed (see [`crate::changelog`]
//! for why this order). Without a changelog a barrier simply commits. A revocation (and the
//! shutdown) runs one last barrier and answers with the positions it reached.
//!
//! Completion is a channel closing: the ingest thread drops its sender after its final
//! revocation, and the detector task then ends, aborting deliveries still retrying.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::Producer;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::alertmanager::{AlertmanagerSink, AmInput};
use crate::batch::MicroBatcher;
use crate::changelog::{Changelog, ChangelogError};
use crate::config::PipelineConfig;
use crate::decode::Record;
use crate::detect::{Batch, Detector, DetectorConfig, Origin, Outcome};
use crate::feedback::FeedbackOutcome;
use crate::ingest::{Drained, Ingest, Input, Positions, Rebalancing, Settled};
use crate::kafka::{producer_config, KafkaConfig, ProducerContext};
use crate::metrics::{label, Health, Metrics};
use crate::model::{Inference, Model, ModelError};
use crate::offsets::{OffsetTracker, Partition};
use crate::shadow::{Decision, PromotionConfig, Shadow};
use crate::sink::{Outputs, Sent};
use crate::state::Change;

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
    #[error("pipelines.{pipeline}.state_topic: {source}")]
    State {
        pipeline: String,
        source: Box<ChangelogError>,
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
    /// When the daemon started (the origin of `anomalyd_startup_seconds`), and how long after
    /// it every model was loaded.
    pub started: std::time::Instant,
    pub models_loaded: Duration,
    /// Notified (SIGHUP) to check every model file for a new version at once.
    pub reload: Arc<Notify>,
}

/// A batch's inference and how long it took, and the candidate's on the same records when
/// one is in the shadow.
type Inferred = (
    Result<Inference, ModelError>,
    Duration,
    Option<Result<Inference, ModelError>>,
);

/// Batches being inferred, and barriers, in stream order.
const MAX_QUEUED: usize = 4;
/// Records whose outputs may wait for acknowledgement at once: beyond, consumption pauses
/// (a failing output must not turn a backlog into memory).
const MAX_DELIVERIES: usize = 10_000;

/// Runs one pipeline until `shutdown` is cancelled, then drains it: stops consuming, finishes
/// the records in flight, writes their state, commits, and returns (within the grace period).
pub async fn run(
    name: String,
    cfg: PipelineConfig,
    model: Arc<Model>,
    shared: Shared,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let (parts, detector) = Parts::build(&name, &cfg, model.clone(), &shared)?;
    let (input_tx, input_rx) = mpsc::channel::<Input>(cfg.batch.max_size * 4);
    let (commit_tx, commit_rx) = std::sync::mpsc::channel();
    let rebalancing = Arc::new(Rebalancing::default());
    let ingest = Ingest {
        pipeline: name.clone(),
        group: parts.group.clone(),
        topics: cfg.topics.clone(),
        kafka: shared.kafka.clone(),
        decoder: detector.decoder().clone(),
        changelog: parts.changelog.clone(),
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
        grace: shared.grace,
        rebalancing: rebalancing.clone(),
    }
    .start(input_tx.clone(), commit_rx, shutdown.clone())
    .map_err(|source| PipelineError::Client {
        pipeline: name.clone(),
        what: "consumer",
        source: crate::kafka::redact_error(source),
    })?;
    let feedback = (!cfg.feedback.topic.is_empty()).then(|| {
        let (kafka, topic, name, input) = (
            shared.kafka.clone(),
            cfg.feedback.topic.clone(),
            name.clone(),
            input_tx.clone(),
        );
        let stop = shutdown.clone();
        tokio::task::spawn_blocking(move || {
            crate::ingest::read_feedback(&kafka, &topic, &name, input, stop)
        })
    });
    let reloader = tokio::spawn(reload_loop(
        name.clone(),
        (cfg.model.clone(), cfg.candidate_path()),
        cfg.reload_check,
        input_tx,
        shared.clone(),
        shutdown.clone(),
    ));
    shared.metrics.init_pipeline(&name);
    set_model_info(&shared.metrics, &name, &model, Some(label::SERVING));
    tracing::info!(pipeline = %name, group = %parts.group, topics = ?cfg.topics, model = %model.path.display(), state_topic = parts.changelog.as_ref().map(|c| c.topic()), "Pipeline started.");

    let took = DetectorTask::new(
        &name,
        &cfg,
        detector,
        &parts,
        &shared,
        commit_tx,
        rebalancing,
    )
    .run(input_rx, shutdown)
    .await;
    // The detector task ended: the ingest thread has revoked everything and is closing.
    let drained = tokio::task::spawn_blocking(move || ingest.join()).await;
    let _ = reloader.await;
    if let Some(feedback) = feedback {
        let _ = feedback.await;
    }
    parts.close().await;
    let elapsed_ms = took.as_millis() as u64;
    match drained {
        Ok(Ok(Drained::Committed { positions })) => {
            tracing::info!(pipeline = %name, elapsed_ms, positions, "Pipeline drained and committed.")
        }
        Ok(Ok(Drained::NothingToCommit)) => {
            tracing::info!(pipeline = %name, elapsed_ms, "Pipeline stopped; it had no position to commit (no partition, or nothing consumed).")
        }
        Ok(Ok(Drained::CommittedInPart { positions })) => {
            tracing::warn!(pipeline = %name, elapsed_ms, positions, "Pipeline drained in part: the drain timed out; the positions reached were committed, and the records after them will be processed again.")
        }
        Ok(Ok(Drained::NotCommitted(why))) => {
            tracing::warn!(pipeline = %name, elapsed_ms, "Pipeline stopped without committing ({why}); its records since the last commit will be processed again.")
        }
        Ok(Err(_)) | Err(_) => {
            tracing::error!(pipeline = %name, elapsed_ms, "Pipeline stopped without committing: its ingest thread panicked; its records since the last commit will be processed again.")
        }
    }
    Ok(())
}

/// What a pipeline is built from its configuration before it starts, besides its detector.
struct Parts {
    group: String,
    changelog: Option<Changelog>,
    outputs: Arc<Outputs>,
    alertmanager: Option<(JoinHandle<()>, CancellationToken)>,
}

impl Parts {
    fn build(
        name: &str,
        cfg: &PipelineConfig,
        model: Arc<Model>,
        shared: &Shared,
    ) -> Result<(Parts, Detector), PipelineError> {
        let pipeline = name.to_string();
        let mut detector = cfg
            .detector()
            .build(name, model.clone())
            .map_err(|source| PipelineError::Detector {
                pipeline: pipeline.clone(),
                source,
            })?;
        let group = format!("{}.{name}", shared.kafka.group_id);
        let changelog = cfg
            .state_topic(&group)
            .map(|topic| Changelog::new(&shared.kafka, &topic))
            .transpose()
            .map_err(|source| PipelineError::State {
                pipeline: pipeline.clone(),
                source: Box::new(source),
            })?;
        if changelog.is_some() {
            detector.record_changes();
        }
        let producer = producer_config(&shared.kafka)
            .create_with_context(ProducerContext)
            .map_err(|source| PipelineError::Client {
                pipeline,
                what: "producer",
                source: crate::kafka::redact_error(source),
            })?;
        let (alertmanager_tx, alertmanager) = match cfg.alertmanager.clone() {
            Some(am) => {
                // Unbounded: the sink drains it at once into per-key state (bounded by the keys).
                let (tx, rx) = mpsc::unbounded_channel();
                let stop = CancellationToken::new();
                let sink = AlertmanagerSink::new(am, name, shared.metrics.clone());
                (
                    Some(tx),
                    Some((tokio::spawn(sink.run(rx, stop.clone())), stop)),
                )
            }
            None => (None, None),
        };
        let outputs = Arc::new(Outputs::new(
            name,
            cfg,
            model.contract.features.clone(),
            producer,
            shared.metrics.clone(),
            alertmanager_tx,
        ));
        let parts = Parts {
            group,
            changelog,
            outputs,
            alertmanager,
        };
        Ok((parts, detector))
    }

    /// Flushes the producers and stops the Alertmanager sink.
    async fn close(self) {
        let (outputs, changelog) = (self.outputs, self.changelog);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = outputs.producer().flush(Duration::from_secs(5));
            if let Some(c) = changelog {
                c.flush(Duration::from_secs(5));
            }
        })
        .await;
        if let Some((task, stop)) = self.alertmanager {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// One entry of the detector task's queue.
enum Queued {
    /// A batch whose inference runs on a blocking thread, with the candidate's batch of the same
    /// records when one is in the shadow.
    Batch(Batch, Option<Batch>, JoinHandle<Inferred>),
    /// A barrier, with the positions just past every record received before it.
    Barrier(Positions),
}

/// Where the (single) barrier in progress is.
enum BarrierState {
    Idle,
    /// In the queue behind the batches before it.
    Queued,
    /// Judged: waiting for the outputs of the records before `positions` to be acknowledged.
    Delivering {
        positions: Positions,
        changes: Vec<Change>,
    },
    /// Writing `changes` to the changelog.
    Writing {
        positions: Positions,
    },
}

/// What a finished background task reports.
enum Done {
    /// Every output of the record is acknowledged.
    Delivered(Origin),
    /// A barrier's state write finished.
    Written {
        result: Result<(), ChangelogError>,
        changes: Vec<Change>,
    },
}

/// The task that owns a pipeline's detection state (see the module doc).
struct DetectorTask {
    name: String,
    detector: Detector,
    outputs: Arc<Outputs>,
    changelog: Option<Changelog>,
    shared: Shared,
    commit_interval: Duration,
    batcher: MicroBatcher<(Origin, Record)>,
    queue: VecDeque<Queued>,
    /// Deliveries and state writes in progress.
    tasks: JoinSet<Done>,
    tracker: OffsetTracker,
    /// The positions last sent to be committed.
    committed: HashMap<Partition, i64>,
    barrier: BarrierState,
    /// Changes whose write failed, written again with the next barrier's.
    unwritten: Vec<Change>,
    commits: std::sync::mpsc::Sender<Positions>,
    rebalancing: Arc<Rebalancing>,
    /// The daemon's shutdown: the delivery bound no longer pauses input after it.
    shutdown: CancellationToken,
    /// `anomalyd_deliveries_in_flight` of this pipeline.
    deliveries: prometheus::IntGauge,
    evictions_seen: u64,
    /// What candidate detectors are built from, and the rule that promotes them.
    detector_cfg: DetectorConfig,
    promotion: PromotionConfig,
    /// The candidate model scored in the shadow of the serving one, if any, and who waits for
    /// the decision (the reload loop, which replaces the model file on a promotion).
    shadow: Option<(Shadow, oneshot::Sender<bool>)>,
    /// The steps of the cold start seen so far (`phase` of `anomalyd_startup_seconds`).
    cold_start: Vec<(&'static str, Duration)>,
}

/// What woke the detector task up.
enum Event {
    Done(Result<Done, tokio::task::JoinError>),
    Front(Option<Inferred>),
    BatchDue,
    Tick,
    Input(Option<Input>),
    /// A rebalance is waiting to come in, or the shutdown began: input is taken again.
    Rebalancing,
}

/// Waits for the front of the queue: a batch's inference, or a barrier (at once).
async fn front(queue: &mut VecDeque<Queued>) -> Option<Inferred> {
    match queue.front_mut() {
        Some(Queued::Batch(_, _, handle)) => Some(handle.await.unwrap_or_else(|e| {
            let failed = ModelError::Inference {
                path: Default::default(),
                reason: format!("inference thread failed: {e}"),
            };
            (Err(failed), Duration::ZERO, None)
        })),
        Some(Queued::Barrier(_)) => None,
        None => std::future::pending().await,
    }
}

impl DetectorTask {
    /// The task of pipeline `name`, owning `detector`, sharing the outputs and the changelog.
    fn new(
        name: &str,
        cfg: &PipelineConfig,
        detector: Detector,
        parts: &Parts,
        shared: &Shared,
        commits: std::sync::mpsc::Sender<Positions>,
        rebalancing: Arc<Rebalancing>,
    ) -> DetectorTask {
        let mut task = DetectorTask {
            name: name.to_string(),
            detector,
            outputs: parts.outputs.clone(),
            changelog: parts.changelog.clone(),
            shared: shared.clone(),
            commit_interval: shared.kafka.commit_interval,
            batcher: cfg.batch.build(),
            queue: VecDeque::new(),
            tasks: JoinSet::new(),
            tracker: OffsetTracker::new(),
            committed: HashMap::new(),
            barrier: BarrierState::Idle,
            unwritten: Vec::new(),
            commits,
            rebalancing,
            shutdown: CancellationToken::new(),
            deliveries: shared
                .metrics
                .deliveries_in_flight
                .with_label_values(&[name]),
            evictions_seen: 0,
            detector_cfg: cfg.detector(),
            promotion: cfg.promotion,
            shadow: None,
            cold_start: Vec::new(),
        };
        task.cold_start(label::MODELS_LOADED, shared.models_loaded);
        task
    }

    /// Runs until `input` closes; returns how long the shutdown took from then. Once
    /// `shutdown` is cancelled, input is taken whatever the deliveries in flight, so that the
    /// ingest thread gets to its final revocation even while an output fails.
    async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        shutdown: CancellationToken,
    ) -> Duration {
        self.shutdown = shutdown;
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = self.next_event(Some(&mut input), &mut tick).await;
            match event {
                Event::Input(None) => break,
                Event::Input(Some(i)) => {
                    self.on_input(i).await;
                    // Take what is already queued without going back to the timers.
                    while self.taking_input() {
                        match input.try_recv() {
                            Ok(i) => self.on_input(i).await,
                            Err(_) => break,
                        }
                    }
                }
                other => self.on_event(other).await,
            }
        }
        let started = Instant::now();
        // The ingest thread revoked everything before closing; what is left are deliveries
        // that did not succeed within the grace period.
        self.flush_batch().await;
        let deadline = Instant::now() + self.shared.grace;
        self.settle(deadline).await;
        let left = self.tasks.len();
        if left > 0 {
            tracing::warn!(pipeline = %self.name, deliveries = left, "Grace period over with deliveries still retrying; their records will be processed again after the restart.");
            self.tasks.abort_all();
        }
        started.elapsed()
    }

    async fn next_event(
        &mut self,
        input: Option<&mut mpsc::Receiver<Input>>,
        tick: &mut tokio::time::Interval,
    ) -> Event {
        let deadline = self.batcher.deadline();
        let (take_input, input) = match input {
            Some(i) => (self.taking_input(), Some(i)),
            None => (false, None),
        };
        let paused = input.is_some() && !take_input;
        tokio::select! {
            biased;
            Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => Event::Done(done),
            inferred = front(&mut self.queue), if !self.queue.is_empty() => Event::Front(inferred),
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => Event::BatchDue,
            _ = tick.tick() => Event::Tick,
            i = async { input.expect("enabled only with an input").recv().await }, if take_input => Event::Input(i),
            _ = self.rebalancing.raised(), if paused => Event::Rebalancing,
            _ = self.shutdown.cancelled(), if paused => Event::Rebalancing,
        }
    }

    /// Whether to take input now: room in the queue, and deliveries under their bound (or a
    /// rebalance waiting to come in).
    fn taking_input(&self) -> bool {
        self.queue.len() < MAX_QUEUED
            && (self.tasks.len() < MAX_DELIVERIES
                || self.rebalancing.is_raised()
                || self.shutdown.is_cancelled())
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Done(Ok(Done::Delivered(origin))) => {
                self.deliveries.set(self.tasks.len() as i64);
                self.tracker
                    .finish(&origin.topic, origin.partition, origin.offset);
                self.advance_barrier();
            }
            Event::Done(Ok(Done::Written { result, changes })) => self.written(result, changes),
            Event::Done(Err(e)) => {
                if !e.is_cancelled() {
                    tracing::error!(pipeline = %self.name, "A delivery task failed: {e}");
                }
            }
            Event::Front(inferred) => match self.queue.pop_front() {
                Some(Queued::Batch(batch, shadow, _)) => {
                    self.judge(batch, shadow, inferred.expect("a batch's inference"))
                }
                Some(Queued::Barrier(positions)) => self.barrier_reached(positions),
                None => {}
            },
            Event::BatchDue => self.flush_batch().await,
            Event::Tick => self.start_barrier().await,
            Event::Input(_) => unreachable!("inputs are handled by the main loop"),
            Event::Rebalancing => {}
        }
    }

    async fn on_input(&mut self, input: Input) {
        match input {
            Input::Record(origin, record) => {
                self.tracker
                    .begin(&origin.topic, origin.partition, origin.offset);
                if let Some(full) = self.batcher.push((origin, record)) {
                    self.dispatch(full).await;
                }
            }
            Input::Undecodable {
                origin,
                key,
                payload,
                error,
            } => {
                self.tracker
                    .begin(&origin.topic, origin.partition, origin.offset);
                let sent = self.outputs.undecodable(origin, key, payload, &error);
                self.track(sent);
            }
            Input::Assigned {
                partitions,
                states,
                restore_took,
            } => {
                let now = self.shared.started.elapsed();
                self.cold_start(label::ASSIGNED, now.saturating_sub(restore_took));
                self.cold_start(label::RESTORED, now);
                let restored = self.detector.restore(states);
                self.shared
                    .metrics
                    .keys_restored
                    .with_label_values(&[&self.name])
                    .inc_by(restored.keys as u64);
                if let Some(why) = restored.partly {
                    tracing::warn!(pipeline = %self.name, "Restored only part of the keys' state: {why}.");
                }
                for episode in restored.firing {
                    self.outputs
                        .to_alertmanager(AmInput::Event(Box::new(episode)));
                }
                self.outputs.resolve_dropped(restored.evicted);
                tracing::info!(pipeline = %self.name, ?partitions, keys_restored = restored.keys, restore_ms = restore_took.as_millis() as u64, "Partitions assigned.");
                self.report_feedback(); // marks that waited for the restored keys
            }
            Input::Revoked {
                partitions,
                within,
                reply,
            } => self.revoke(partitions, within, reply).await,
            Input::Reload { model, found } => self.reload(model, found),
            Input::Feedback(Ok(f)) => {
                self.detector.feedback(f);
                self.report_feedback();
            }
            Input::Feedback(Err(why)) => {
                self.count_feedback("invalid");
                tracing::warn!(pipeline = %self.name, "A message on the feedback topic is not feedback: {why}.");
            }
            Input::Candidate { model, decided } => self.shadow(model, decided),
        }
    }

    /// Prepares a batch and starts its inference.
    async fn dispatch(&mut self, records: Vec<(Origin, Record)>) {
        let mut shadow = self
            .shadow
            .as_mut()
            .map(|(s, _)| s.prepare(records.clone()));
        let shadow_input = shadow.as_mut().map(|b| {
            let samples = std::mem::take(&mut b.samples);
            (b.model.clone(), samples, b.sample_count())
        });
        let mut batch = self.detector.prepare(records);
        let model = batch.model.clone();
        let n = batch.sample_count();
        self.shared
            .metrics
            .batch_size
            .with_label_values(&[&self.name])
            .observe(n as f64);
        let samples = std::mem::take(&mut batch.samples);
        let permit = self
            .shared
            .inference
            .clone()
            .acquire_owned()
            .await
            .expect("the inference semaphore is never closed");
        let handle = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let t = std::time::Instant::now();
            let result = model.infer(&samples, n);
            let elapsed = t.elapsed();
            let shadow = shadow_input.map(|(m, samples, n)| m.infer(&samples, n));
            (result, elapsed, shadow)
        });
        self.queue.push_back(Queued::Batch(batch, shadow, handle));
    }

    async fn flush_batch(&mut self) {
        let pending = self.batcher.take();
        if !pending.is_empty() {
            self.dispatch(pending).await;
        }
    }

    /// Judges a batch whose inference finished, and emits its outcomes.
    fn judge(
        &mut self,
        batch: Batch,
        shadow: Option<Batch>,
        (result, elapsed, shadowed): Inferred,
    ) {
        let m = &self.shared.metrics;
        match result {
            Ok(inference) => {
                m.inference_seconds
                    .with_label_values(&[&self.name])
                    .observe(elapsed.as_secs_f64());
                let outcomes = self.detector.judge(batch, &inference);
                m.keys_tracked
                    .with_label_values(&[&self.name])
                    .set(self.detector.keys() as i64);
                m.keys_firing
                    .with_label_values(&[&self.name])
                    .set(self.detector.firing() as i64);
                m.score_drift
                    .with_label_values(&[&self.name])
                    .set(self.detector.drift().statistic());
                let evictions = self.detector.evictions();
                m.key_evictions
                    .with_label_values(&[&self.name])
                    .inc_by(evictions - self.evictions_seen);
                self.evictions_seen = evictions;
                match (shadow, shadowed) {
                    (Some(batch), Some(Ok(inference))) => {
                        self.compare(&outcomes, batch, &inference)
                    }
                    // (Unless the batch was for a candidate since replaced.)
                    (Some(batch), Some(Err(e)))
                        if self
                            .shadow
                            .as_ref()
                            .is_some_and(|(s, _)| Arc::ptr_eq(&batch.model, s.model())) =>
                    {
                        self.decide(Decision::Refuse(format!("its inference failed: {e}")))
                    }
                    _ => {}
                }
                if self.cold_start(label::FIRST_JUDGED, self.shared.started.elapsed()) {
                    let steps = self
                        .cold_start
                        .iter()
                        .map(|(phase, at)| format!("{phase} {:.3} s", at.as_secs_f64()));
                    tracing::info!(pipeline = %self.name, "Judged the first record; the cold start took {}.", steps.collect::<Vec<_>>().join(", "));
                }
                for outcome in outcomes {
                    let sent = self.outputs.emit(outcome);
                    self.track(sent);
                }
            }
            Err(e) => {
                tracing::error!(pipeline = %self.name, "Inference failed; the batch's records go to the dead-letter topic: {e}");
                for entry in batch.entries {
                    let sent = self.outputs.unscored(
                        entry.origin,
                        entry.record,
                        "inference_failed",
                        e.to_string(),
                    );
                    self.track(sent);
                }
            }
        }
        self.report_feedback(); // marks that waited for keys seen in this batch
    }

    /// Records a step of the pipeline's cold start `at` its time from the daemon's start, the
    /// first time it happens only; says whether it did.
    fn cold_start(&mut self, phase: &'static str, at: Duration) -> bool {
        if self.cold_start.iter().any(|(seen, _)| *seen == phase) {
            return false;
        }
        self.cold_start.push((phase, at));
        self.shared
            .metrics
            .startup_seconds
            .with_label_values(&[&self.name, phase])
            .set(at.as_secs_f64());
        true
    }

    /// Finishes a record with nothing to wait for, or waits for its deliveries in a task.
    fn track(&mut self, sent: Sent) {
        if sent.is_done() {
            let o = &sent.origin;
            self.tracker.finish(&o.topic, o.partition, o.offset);
        } else {
            let outputs = self.outputs.clone();
            self.tasks
                .spawn(async move { Done::Delivered(outputs.delivered(sent).await) });
            self.deliveries.set(self.tasks.len() as i64);
        }
    }

    /// On a tick: queues a barrier behind what was received, unless one is in progress or
    /// nothing moved.
    async fn start_barrier(&mut self) {
        if !matches!(self.barrier, BarrierState::Idle) {
            return;
        }
        let positions: Positions = self
            .tracker
            .fronts()
            .into_iter()
            .filter(|(p, pos)| self.committed.get(p) != Some(pos))
            .collect();
        if positions.is_empty() && self.unwritten.is_empty() {
            return;
        }
        self.flush_batch().await;
        self.queue.push_back(Queued::Barrier(positions));
        self.barrier = BarrierState::Queued;
    }

    /// The barrier reached the front of the queue: everything before it is judged.
    fn barrier_reached(&mut self, positions: Positions) {
        let mut changes = std::mem::take(&mut self.unwritten);
        changes.extend(self.detector.take_changes());
        self.barrier = BarrierState::Delivering { positions, changes };
        self.advance_barrier();
    }

    /// Moves the barrier on once the outputs before it are acknowledged.
    fn advance_barrier(&mut self) {
        let BarrierState::Delivering { positions, .. } = &self.barrier else {
            return;
        };
        let delivered = positions.iter().all(|((topic, p), pos)| {
            self.tracker
                .position(topic, *p)
                .is_none_or(|done| done >= *pos)
        });
        if !delivered {
            return;
        }
        let BarrierState::Delivering { positions, changes } =
            std::mem::replace(&mut self.barrier, BarrierState::Idle)
        else {
            unreachable!()
        };
        match &self.changelog {
            Some(changelog) if !changes.is_empty() => {
                let changelog = changelog.clone();
                self.barrier = BarrierState::Writing { positions };
                self.tasks.spawn(async move {
                    let result = changelog.write(&changes).await;
                    Done::Written { result, changes }
                });
            }
            _ => self.commit(positions),
        }
    }

    /// A barrier's state write finished: commit its positions, or keep its changes for the
    /// next one.
    fn written(&mut self, result: Result<(), ChangelogError>, changes: Vec<Change>) {
        let BarrierState::Writing { positions } =
            std::mem::replace(&mut self.barrier, BarrierState::Idle)
        else {
            return;
        };
        let m = &self.shared.metrics;
        match result {
            Ok(()) => {
                m.state_writes
                    .with_label_values(&[&self.name, label::OK])
                    .inc();
                m.state_records
                    .with_label_values(&[&self.name])
                    .inc_by(changes.len() as u64);
                self.commit(positions);
            }
            Err(e) => {
                m.state_writes
                    .with_label_values(&[&self.name, label::ERROR])
                    .inc();
                tracing::error!(pipeline = %self.name, keys = changes.len(), "Writing state failed; offsets are not committed past it and it is written again with the next barrier: {e}");
                self.unwritten = changes;
            }
        }
    }

    fn commit(&mut self, positions: Positions) {
        if positions.is_empty() {
            return;
        }
        for (p, pos) in &positions {
            self.committed.insert(p.clone(), *pos);
        }
        let _ = self.commits.send(positions);
    }

    /// Handles events other than input until the queue is empty and no barrier is in
    /// progress, or `deadline`.
    async fn settle(&mut self, deadline: Instant) -> bool {
        let mut never = tokio::time::interval(Duration::from_secs(3600));
        never.tick().await;
        loop {
            if self.queue.is_empty() && matches!(self.barrier, BarrierState::Idle) {
                return true;
            }
            tokio::select! {
                event = self.next_event(None, &mut never) => self.on_event(event).await,
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Settles revoked partitions: a last barrier behind their records, then their positions
    /// back to the ingest thread, and their keys forgotten (their state is in the changelog).
    async fn revoke(
        &mut self,
        partitions: Vec<Partition>,
        within: Duration,
        reply: Option<std::sync::mpsc::SyncSender<Settled>>,
    ) {
        let started = Instant::now();
        let mut settled = true;
        if let Some(reply) = reply {
            let deadline = started + within;
            self.flush_batch().await;
            // Let a barrier in progress finish, then run one behind everything received.
            settled = self.settle(deadline).await;
            if settled {
                self.start_barrier().await;
                settled = self.settle(deadline).await;
            }
            let positions: Positions = partitions
                .iter()
                .filter_map(|p| self.committed.get(p).map(|pos| (p.clone(), *pos)))
                .collect();
            let _ = reply.send(Settled {
                positions,
                complete: settled,
            });
        }
        self.tracker.remove(&partitions);
        for p in &partitions {
            self.committed.remove(p);
        }
        if let BarrierState::Delivering { positions, .. } | BarrierState::Writing { positions } =
            &mut self.barrier
        {
            positions.retain(|(p, _)| !partitions.contains(p));
        }
        let forgotten = self.detector.forget_partitions(&partitions);
        if let Some((shadow, _)) = &mut self.shadow {
            shadow.forget_partitions(&partitions);
        }
        if self.changelog.is_some() {
            self.outputs
                .to_alertmanager(AmInput::HandedOver(partitions.clone()));
        } else {
            // Nobody carries these episodes on: they end here, at every sink.
            self.outputs.resolve_dropped(forgotten.resolved);
        }
        if !settled {
            tracing::warn!(pipeline = %self.name, "Drain timeout on revoke: records still in flight will be processed again by the partitions' next owner.");
        }
        tracing::info!(pipeline = %self.name, ?partitions, keys_dropped = forgotten.keys, elapsed_ms = started.elapsed().as_millis() as u64, "Partitions revoked.");
    }

    /// Starts scoring `model` in the shadow of the serving model (replacing any candidate
    /// before it), or refuses it at once if it cannot take over without a restart.
    fn shadow(&mut self, model: Arc<Model>, decided: oneshot::Sender<bool>) {
        let path = model.path.display().to_string();
        let built = self
            .detector_cfg
            .build(&self.name, model.clone())
            .map_err(|e| e.to_string())
            .and_then(|candidate| Shadow::new(&self.detector, candidate));
        match built {
            Ok(shadow) => {
                if let Some((old, _)) = self.shadow.take() {
                    set_model_info(&self.shared.metrics, &self.name, old.model(), None);
                }
                set_model_info(
                    &self.shared.metrics,
                    &self.name,
                    &model,
                    Some(label::CANDIDATE),
                );
                tracing::info!(pipeline = %self.name, candidate = %path, version = %model.contract.version, records = self.promotion.records, "Scoring a candidate model in the shadow of the serving one.");
                self.shadow = Some((shadow, decided));
            }
            Err(why) => {
                candidate_refused(
                    &self.shared.metrics,
                    &self.name,
                    &format!("candidate {path}: {why}"),
                );
                let _ = decided.send(false);
            }
        }
    }

    /// Compares the candidate's verdicts on a batch with the serving model's, and once the
    /// rule can decide, promotes or refuses it.
    fn compare(&mut self, outcomes: &[Outcome], batch: Batch, inference: &Inference) {
        let Some((shadow, _)) = self.shadow.as_mut() else {
            return;
        };
        if let Some(decision) = shadow.compare(outcomes, batch, inference, &self.promotion) {
            self.decide(decision);
        }
    }

    /// Ends the candidate's time in the shadow: promotes it, or refuses it.
    fn decide(&mut self, decision: Decision) {
        let Some((shadow, decided)) = self.shadow.take() else {
            return;
        };
        let figures = shadow.comparison().describe();
        let m = &self.shared.metrics;
        let (old, new) = (self.detector.model().clone(), shadow.model().clone());
        set_model_info(m, &self.name, &new, None);
        match shadow.conclude(decision, &mut self.detector) {
            Ok(()) => {
                set_model_info(m, &self.name, &old, None);
                set_model_info(m, &self.name, &new, Some(label::SERVING));
                m.candidates
                    .with_label_values(&[&self.name, label::PROMOTED])
                    .inc();
                tracing::info!(pipeline = %self.name, from = %old.contract.version, to = %new.contract.version, "Promoted the candidate model {figures}: it serves now, with the thresholds it learned in the shadow.");
                let _ = decided.send(true);
            }
            Err(why) => {
                candidate_refused(
                    m,
                    &self.name,
                    &format!("candidate {} {figures}: {why}", new.path.display()),
                );
                // (Had the candidate the serving model's name and version, its series was it.)
                set_model_info(m, &self.name, self.detector.model(), Some(label::SERVING));
                let _ = decided.send(false);
            }
        }
    }

    /// Logs and counts what feedback did (the one place that does): marks applied now, or
    /// when their key appeared.
    fn report_feedback(&mut self) {
        for (f, outcome) in self.detector.take_feedback() {
            self.count_feedback(outcome.label());
            let by = f.by.as_deref().unwrap_or("-");
            match outcome {
                FeedbackOutcome::Applied { relax } => {
                    tracing::info!(pipeline = %self.name, key = %f.key, partition = f.partition, started_offset = f.started_offset, by, "An episode was marked as a false alarm: the key's threshold is raised by {:.0}% in all.", relax * 100.0)
                }
                FeedbackOutcome::Duplicate => {
                    tracing::info!(pipeline = %self.name, key = %f.key, started_offset = f.started_offset, by, "An episode marked as a false alarm was marked before: nothing changes.")
                }
                FeedbackOutcome::Pending => {
                    tracing::debug!(pipeline = %self.name, key = %f.key, started_offset = f.started_offset, by, "A false-alarm mark waits for its key.")
                }
                FeedbackOutcome::Dropped => {
                    tracing::warn!(pipeline = %self.name, key = %f.key, started_offset = f.started_offset, by, "A false-alarm mark was dropped: too many keys' marks wait for their key.")
                }
            }
        }
    }

    fn count_feedback(&self, result: &str) {
        self.shared
            .metrics
            .feedback
            .with_label_values(&[&self.name, result])
            .inc();
    }

    fn reload(&mut self, model: Arc<Model>, found: std::time::Instant) {
        let old = self.detector.model().clone();
        let path = model.path.clone();
        let m = &self.shared.metrics;
        match self.detector.set_model(model.clone()) {
            Ok(()) => {
                set_model_info(m, &self.name, &old, None);
                set_model_info(m, &self.name, &model, Some(label::SERVING));
                m.model_reloads.with_label_values(&[&self.name]).inc();
                let took = found.elapsed();
                m.model_swap_seconds
                    .with_label_values(&[&self.name])
                    .set(took.as_secs_f64());
                tracing::info!(pipeline = %self.name, from = %old.contract.version, to = %model.contract.version, swap_ms = took.as_millis() as u64, "Swapped in a new model; every key's threshold restarts from its calibration.");
            }
            Err(why) => model_refused(m, &self.name, &format!("model {}: {why}", path.display())),
        }
    }
}

/// Shows `model` in `anomalyd_model_info` in `role` (serving or candidate), or takes it out of
/// both roles.
fn set_model_info(metrics: &Metrics, pipeline: &str, model: &Model, role: Option<&str>) {
    let c = &model.contract;
    let kind = format!("{:?}", c.kind).to_lowercase();
    let labels = |role| {
        [
            pipeline,
            c.name.as_str(),
            c.version.as_str(),
            kind.as_str(),
            role,
        ]
    };
    match role {
        Some(role) => metrics.model_info.with_label_values(&labels(role)).set(1),
        None => {
            for role in [label::SERVING, label::CANDIDATE] {
                let _ = metrics.model_info.remove_label_values(&labels(role));
            }
        }
    }
}

fn candidate_refused(metrics: &Metrics, pipeline: &str, why: &str) {
    metrics
        .candidates
        .with_label_values(&[pipeline, label::REFUSED])
        .inc();
    tracing::warn!(pipeline = %pipeline, "Refused a candidate model, the serving model keeps serving: {why}");
}

fn model_refused(metrics: &Metrics, pipeline: &str, why: &str) {
    metrics
        .model_load_failures
        .with_label_values(&[pipeline])
        .inc();
    tracing::error!(pipeline = %pipeline, "Refused a new model file, the running model keeps serving: {why}");
}

/// The identity of a file's current version: its modification time and length.
type Stamp = Option<(std::time::SystemTime, u64)>;

fn file_stamp(path: &std::path::Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Which version of the model file to load next.
#[derive(Debug, Default)]
struct ModelWatch {
    /// The version loaded last (or at start).
    serving: Stamp,
    /// A version whose load failed: not retried by the periodic check (it would fail and log
    /// every few seconds), but retried on SIGHUP (the failure may have been transient: no file
    /// descriptor, a read error).
    refused: Option<Stamp>,
}

impl ModelWatch {
    /// Whether the file, now at `stamp`, should be loaded; `asked` on SIGHUP.
    fn due(&self, stamp: Stamp, asked: bool) -> bool {
        stamp != self.serving && (asked || self.refused != Some(stamp))
    }

    fn loaded(&mut self, stamp: Stamp) {
        self.serving = stamp;
        self.refused = None;
    }

    fn failed(&mut self, stamp: Stamp) {
        self.refused = Some(stamp);
    }
}

/// Watches the model file and the candidate file (every `every`, and at once on SIGHUP).
///
/// A new version of the model that loads goes to the detector task, which swaps it in between
/// batches (or refuses it if it does not fit). A new candidate that loads goes there too, to be
/// scored in the shadow; when the detector promotes it, the candidate file is renamed over the
/// model file (so a restart serves it too) and that version counts as loaded. A file that does
/// not load is refused, logged and counted here, and the running model keeps serving. Replace
/// model files atomically (write, then rename): a half-written file is refused, then picked up
/// once complete.
async fn reload_loop(
    name: String,
    files: (std::path::PathBuf, std::path::PathBuf),
    every: Duration,
    input: mpsc::Sender<Input>,
    shared: Shared,
    stop: CancellationToken,
) {
    let (path, candidate) = files;
    let mut watch = ModelWatch {
        serving: file_stamp(&path),
        refused: None,
    };
    let mut candidates = ModelWatch::default();
    // The decision on the candidate in the shadow, with its file's version.
    let mut pending: Option<(oneshot::Receiver<bool>, Stamp)> = None;
    loop {
        let asked = tokio::select! {
            // A decision first: a promoted candidate's file replaces the model's even when the
            // pipeline stops right after promoting it.
            biased;
            decided = async { (&mut pending.as_mut().expect("enabled only when pending").0).await }, if pending.is_some() => {
                let (_, stamp) = pending.take().expect("pending");
                match decided {
                    Ok(true) => match std::fs::rename(&candidate, &path) {
                        Ok(()) => watch.loaded(file_stamp(&path)),
                        Err(e) => tracing::warn!(pipeline = %name, "The promoted candidate serves, but {} could not replace {}: {e}; a restart would serve the model before it.", candidate.display(), path.display()),
                    },
                    Ok(false) => candidates.failed(stamp),
                    Err(_) => {} // replaced by a newer candidate, or the pipeline is stopping
                }
                continue;
            }
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every), if !every.is_zero() => false,
            _ = shared.reload.notified() => true,
        };
        for (file, watching, is_candidate) in [
            (&path, &mut watch, false),
            (&candidate, &mut candidates, true),
        ] {
            let stamp = file_stamp(file);
            if (is_candidate && stamp.is_none()) || !watching.due(stamp, asked) {
                continue;
            }
            let (load_path, found) = (file.clone(), std::time::Instant::now());
            let loaded = tokio::task::spawn_blocking(move || Model::load(&load_path)).await;
            match &loaded {
                Ok(Ok(_)) => watching.loaded(stamp),
                _ => watching.failed(stamp),
            }
            let refused = |why: &str| {
                if is_candidate {
                    candidate_refused(&shared.metrics, &name, why);
                } else {
                    model_refused(&shared.metrics, &name, why);
                }
            };
            let model = match loaded {
                Ok(Ok(model)) => Arc::new(model),
                Ok(Err(e)) => {
                    refused(&e.to_string());
                    continue;
                }
                Err(e) => {
                    refused(&format!("model {}: loading failed: {e}", file.display()));
                    continue;
                }
            };
            let message = if is_candidate {
                let (tx, rx) = oneshot::channel();
                pending = Some((rx, stamp));
                Input::Candidate { model, decided: tx }
            } else {
                Input::Reload { model, found }
            };
            tokio::select! {
                sent = input.send(message) => if sent.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_version_that_failed_to_load_is_retried_on_sighup_not_every_check() {
        let v = |n: u64| Some((SystemTime::UNIX_EPOCH + Duration::from_secs(n), n));
        let mut w = ModelWatch {
            serving: v(1),
            refused: None,
        };
        assert!(
            !w.due(v(1), true),
            "the serving version is never loaded again"
        );
        assert!(w.due(v(2), false));
        w.failed(v(2));
        assert!(!w.due(v(2), false), "not retried by the periodic check");
        assert!(w.due(v(2), true), "retried on SIGHUP");
        w.loaded(v(2));
        assert!(!w.due(v(2), true));
        assert!(w.due(v(3), false), "a newer version is loaded");
    }
}
