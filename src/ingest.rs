//! Ingest: one pipeline's Kafka consumer, polled on a thread of its own.
//!
//! librdkafka runs a consumer's rebalance callbacks inside `poll`, on the polling thread, and
//! the revoked partitions are let go when the callback returns. So the consumer is polled by a
//! dedicated thread, never a tokio worker, which may block there:
//! - each record is decoded and handed, in partition order, to the pipeline's detector task
//!   through a bounded channel (a slow model slows the polling down instead of buffering);
//! - a rebalance is forwarded on the same channel, so the detector task sees it after every
//!   record consumed before it (stream order). On assignment the thread first reads the
//!   partitions' state from the changelog, so it reaches the detector before their first
//!   record. On revocation it waits (bounded) for the detector's answer, the positions up to
//!   which everything is delivered and its state durable, and commits them before returning;
//! - the positions the detector sends back as barriers complete are committed here, so that
//!   every call on the consumer is made from this thread.
//!
//! At shutdown the thread revokes everything it holds the same way, then closes the consumer
//! (leaving the group) and, by dropping its end of the channel, tells the detector task that
//! no more input comes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::changelog::Changelog;
use crate::decode::{DecodeError, Decoder, Record};
use crate::detect::Origin;
use crate::kafka::{consumer_config, log_kafka, log_kafka_error, KafkaConfig};
use crate::metrics::{Health, Metrics};
use crate::model::Model;
use crate::offsets::{Offset, Partition};
use crate::state::StateRecord;

/// The detector's answer to a revocation.
#[derive(Debug)]
pub struct Settled {
    /// Where everything before is delivered and its state durable: the positions to commit.
    pub positions: Positions,
    /// Whether every record received got there in time (false: the drain timed out, and the
    /// records after `positions` will be processed again by the partitions' next owner).
    pub complete: bool,
}

/// How a handing-back of partitions ended (a rebalance's, or the final one at shutdown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drained {
    /// No partition had a position to commit: nothing was assigned, or nothing consumed.
    NothingToCommit,
    /// The detector settled the partitions and their positions (this many) were committed.
    Committed { positions: usize },
    /// The drain timed out: the positions reached (this many) were committed, and the records
    /// after them will be processed again by the partitions' next owner.
    CommittedInPart { positions: usize },
    /// The positions were not committed, for this reason: the records since the last commit
    /// will be processed again by the partitions' next owner.
    NotCommitted(String),
}

/// What reaches a pipeline's detector task, in stream order.
#[derive(Debug)]
pub enum Input {
    Record(Origin, Record),
    /// A record that could not be decoded: a dead letter.
    Undecodable {
        origin: Origin,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        error: DecodeError,
    },
    /// Partitions are ours now, with the state of their keys and how long reading it took.
    Assigned {
        partitions: Vec<Partition>,
        states: Vec<StateRecord>,
        restore_took: Duration,
    },
    /// Partitions are taken away. Unless they were lost (the group moved on without us), the
    /// detector settles them within `within` and answers with the positions to commit.
    Revoked {
        partitions: Vec<Partition>,
        within: Duration,
        reply: Option<std::sync::mpsc::SyncSender<Settled>>,
    },
    /// A new version of the model, to swap in between batches, and when its file was found.
    Reload {
        model: Arc<Model>,
        found: Instant,
    },
    /// A message of the feedback topic: an operator's verdict on an episode, or why it is not one.
    Feedback(Result<crate::feedback::Feedback, crate::feedback::FeedbackError>),
    /// A candidate model, to score in the shadow of the serving one; `decided` hears whether it
    /// was promoted.
    Candidate {
        model: Arc<Model>,
        decided: tokio::sync::oneshot::Sender<bool>,
    },
}

/// Commit positions: per partition, the offset of the next record to read.
pub type Positions = Vec<(Partition, Offset)>;

/// Raised by the ingest thread while a rebalance waits to enter the detector's channel. The
/// detector task stops taking input while its deliveries are at their bound (backpressure);
/// this makes it take input anyway, so that a rebalance is never stuck behind a failing
/// output. What it takes then is bounded by the channel's capacity.
#[derive(Default)]
pub struct Rebalancing {
    raised: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Rebalancing {
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Resolves after the next raise (or at once if one happened since the last wait).
    pub async fn raised(&self) {
        self.notify.notified().await
    }

    /// Sends `input` with the flag raised.
    fn send(&self, input: &mpsc::Sender<Input>, message: Input) -> bool {
        self.raised.store(true, Ordering::SeqCst);
        self.notify.notify_one();
        let sent = input.blocking_send(message).is_ok();
        self.raised.store(false, Ordering::SeqCst);
        sent
    }
}

/// What the ingest thread of one pipeline needs.
pub struct Ingest {
    pub pipeline: String,
    pub group: String,
    pub topics: Vec<String>,
    pub kafka: KafkaConfig,
    pub decoder: Decoder,
    pub changelog: Option<Changelog>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// How long the final revocation may take at shutdown.
    pub grace: Duration,
    pub rebalancing: Arc<Rebalancing>,
}

impl Ingest {
    /// Creates and subscribes the consumer, and starts polling it on a thread of its own until
    /// `shutdown`. Records and rebalances go to `input`; positions to commit come from
    /// `commits`.
    pub fn start(
        self,
        input: mpsc::Sender<Input>,
        commits: std::sync::mpsc::Receiver<Positions>,
        shutdown: CancellationToken,
    ) -> Result<std::thread::JoinHandle<Drained>, KafkaError> {
        let context = Context {
            pipeline: self.pipeline.clone(),
            input,
            changelog: self.changelog,
            metrics: self.metrics,
            health: self.health,
            drain_timeout: self.kafka.drain_timeout,
            closing: AtomicBool::new(false),
            rebalancing: self.rebalancing,
        };
        let consumer: BaseConsumer<Context> =
            consumer_config(&self.kafka, &self.group).create_with_context(context)?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let poller = Poller {
            consumer,
            decoder: self.decoder,
            commits,
            grace: self.grace,
            topic_names: Vec::new(),
        };
        std::thread::Builder::new()
            .name(format!("ingest-{}", self.pipeline))
            .spawn(move || poller.run(shutdown))
            .map_err(|e| KafkaError::Subscription(format!("cannot start the ingest thread: {e}")))
    }
}

struct Poller {
    consumer: BaseConsumer<Context>,
    decoder: Decoder,
    commits: std::sync::mpsc::Receiver<Positions>,
    grace: Duration,
    /// Topic names, shared by every record's origin.
    topic_names: Vec<Arc<str>>,
}

impl Poller {
    /// Polls until `shutdown`, then hands back every partition held; returns how that ended.
    fn run(self, shutdown: CancellationToken) -> Drained {
        let Poller {
            consumer,
            decoder,
            commits,
            grace,
            mut topic_names,
        } = self;
        let ctx = consumer.context();
        let mut consecutive_errors = 0u32;
        while !shutdown.is_cancelled() {
            for positions in commits.try_iter() {
                if let Err(e) = ctx.commit(&consumer, &positions, CommitMode::Async) {
                    tracing::debug!(pipeline = %ctx.pipeline, "Committing offsets: {e}");
                }
            }
            let input = match consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Ok(m)) => {
                    consecutive_errors = 0;
                    decode(&decoder, &mut topic_names, &m)
                }
                Some(Err(e)) => {
                    consecutive_errors += 1;
                    log_kafka_error(Some(&ctx.pipeline), format_args!("Consumer error: {e}"));
                    // Back off a little while the broker is unreachable, instead of spinning on
                    // errors. This is the ingest thread: nothing else waits on it.
                    std::thread::sleep(Duration::from_millis(
                        50 * u64::from(consecutive_errors.min(20)),
                    ));
                    continue;
                }
            };
            if ctx.input.blocking_send(input).is_err() {
                tracing::error!(pipeline = %ctx.pipeline, "The detector task is gone; stopping consumption.");
                break;
            }
        }
        ctx.health.set_stopping();
        tracing::info!(pipeline = %ctx.pipeline, "Stopped consuming; draining in-flight records.");
        let assigned = consumer
            .assignment()
            .map(|a| partitions_of(&a))
            .unwrap_or_default();
        let drained = ctx.revoke(&consumer, assigned, grace);
        ctx.closing.store(true, Ordering::SeqCst);
        consumer.unsubscribe();
        // Dropping the consumer closes it (leaving the group) and, with it, its end of the
        // detector's channel.
        drained
    }
}

/// Decodes a consumed record into the detector's input; `topic_names` shares every record's
/// topic name.
fn decode(
    decoder: &Decoder,
    topic_names: &mut Vec<Arc<str>>,
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> Input {
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
    let payload = m.payload().unwrap_or_default();
    match decoder.decode_json(payload) {
        Ok(mut record) => {
            if record.timestamp.is_none() {
                record.timestamp = m.timestamp().to_millis().map(crate::time::rfc3339_millis);
            }
            Input::Record(origin, record)
        }
        Err(error) => Input::Undecodable {
            origin,
            key: m.key().map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            error,
        },
    }
}

/// The consumer context: forwards rebalances to the detector task.
struct Context {
    pipeline: String,
    input: mpsc::Sender<Input>,
    changelog: Option<Changelog>,
    metrics: Metrics,
    health: Arc<Health>,
    drain_timeout: Duration,
    /// Set once the final revocation is done: closing the consumer revokes again, with nothing
    /// left to settle.
    closing: AtomicBool,
    rebalancing: Arc<Rebalancing>,
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// How long reading the state of newly assigned partitions may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

impl Context {
    /// Hands `partitions` back: the detector settles them (within `within`) and answers with
    /// their positions, committed here before the callback returns. The caller logs the outcome.
    fn revoke(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: Vec<Partition>,
        within: Duration,
    ) -> Drained {
        if partitions.is_empty() {
            return Drained::NothingToCommit;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let message = Input::Revoked {
            partitions,
            within,
            reply: Some(tx),
        };
        if !self.rebalancing.send(&self.input, message) {
            return Drained::NotCommitted("the detector task is gone".into());
        }
        // The detector keeps its own deadline; this one only guards against a detector that
        // is gone or stuck.
        match rx.recv_timeout(within + Duration::from_secs(5)) {
            Ok(settled) => match self.commit(consumer, &settled.positions, CommitMode::Sync) {
                Ok(0) => Drained::NothingToCommit,
                Ok(positions) if settled.complete => Drained::Committed { positions },
                Ok(positions) => Drained::CommittedInPart { positions },
                Err(e) => Drained::NotCommitted(format!("committing offsets failed: {e}")),
            },
            Err(_) => Drained::NotCommitted("the detector did not answer".into()),
        }
    }

    /// Stores and commits positions; returns how many.
    fn commit(
        &self,
        consumer: &BaseConsumer<Self>,
        positions: &Positions,
        mode: CommitMode,
    ) -> Result<usize, KafkaError> {
        if positions.is_empty() {
            return Ok(0);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), pos) in positions {
            let _ = tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*pos));
        }
        // A partition revoked a moment ago cannot be stored or committed any more; its next
        // owner starts from the position committed on revoke.
        consumer
            .store_offsets(&tpl)
            .and_then(|()| consumer.commit(&tpl, mode))?;
        self.metrics
            .offsets_committed
            .with_label_values(&[&self.pipeline])
            .inc_by(positions.len() as u64);
        Ok(positions.len())
    }

    /// The state of the keys of newly assigned partitions, from the changelog (created, if
    /// missing, with as many partitions as the largest input topic).
    fn restore(&self, consumer: &BaseConsumer<Self>, partitions: &[Partition]) -> Vec<StateRecord> {
        let Some(changelog) = &self.changelog else {
            return Vec::new();
        };
        let mut needed = partitions.iter().map(|(_, p)| p + 1).max().unwrap_or(1);
        let topics: std::collections::BTreeSet<&str> =
            partitions.iter().map(|(t, _)| t.as_str()).collect();
        for topic in topics {
            if let Ok(md) = consumer.fetch_metadata(Some(topic), RESTORE_TIMEOUT) {
                let n = md.topics().first().map_or(0, |t| t.partitions().len());
                needed = needed.max(n as i32);
            }
        }
        let read = changelog
            .ensure(needed, RESTORE_TIMEOUT)
            .and_then(|_| changelog.read(partitions, RESTORE_TIMEOUT));
        match read {
            Ok((states, skipped)) => {
                if skipped > 0 {
                    tracing::warn!(pipeline = %self.pipeline, topic = changelog.topic(), skipped, "Skipped state records anomalyd cannot read; their keys start from the calibration.");
                }
                states
            }
            Err(e) => {
                self.metrics
                    .state_restore_failures
                    .with_label_values(&[&self.pipeline])
                    .inc();
                tracing::error!(pipeline = %self.pipeline, "Cannot restore the state of the assigned partitions; their keys start from the calibration: {e}");
                Vec::new()
            }
        }
    }

    fn update_assignment(&self, consumer: &BaseConsumer<Self>) {
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics
            .partitions_assigned
            .with_label_values(&[&self.pipeline])
            .set(assigned as i64);
        self.health.set_assigned(&self.pipeline, assigned > 0);
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_kafka(level, fac, message);
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.metrics.set_lag(&self.pipeline, &statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_kafka_error(
            Some(&self.pipeline),
            format_args!("Kafka consumer error: {error}: {reason}"),
        );
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = partitions_of(tpl);
        self.metrics.drop_lag(&self.pipeline, &partitions);
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        if consumer.assignment_lost() {
            tracing::warn!(pipeline = %self.pipeline, ?partitions, "Partitions were lost (the group moved on without us); their in-flight records will be processed again by their new owner.");
            let message = Input::Revoked {
                partitions,
                within: Duration::ZERO,
                reply: None,
            };
            self.rebalancing.send(&self.input, message);
        } else if let Drained::NotCommitted(why) =
            self.revoke(consumer, partitions, self.drain_timeout)
        {
            tracing::warn!(pipeline = %self.pipeline, "Revoked partitions were not committed ({why}); their records since the last commit will be processed again by their next owner.");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) if !self.closing.load(Ordering::SeqCst) => {
                let partitions = partitions_of(tpl);
                if !partitions.is_empty() {
                    let started = Instant::now();
                    let states = self.restore(consumer, &partitions);
                    let message = Input::Assigned {
                        partitions,
                        states,
                        restore_took: started.elapsed(),
                    };
                    self.rebalancing.send(&self.input, message);
                }
            }
            Rebalance::Error(e) => {
                tracing::warn!(pipeline = %self.pipeline, "Rebalance error: {e}");
            }
            _ => {}
        }
        self.update_assignment(consumer);
    }
}

/// Reads a pipeline's feedback topic ([`crate::feedback`]) into the pipeline's input, in order
/// with its records: from the beginning, then as it grows, until `stop`. Every replica reads all
/// of it, because a verdict applies wherever its key lives, and marking twice changes nothing, so
/// reading it again after a restart is harmless. A topic that cannot be read yet is retried
/// every 10 s. Blocking: run it on a thread of its own.
pub fn read_feedback(
    kafka: &KafkaConfig,
    topic: &str,
    pipeline: &str,
    input: mpsc::Sender<Input>,
    stop: CancellationToken,
) {
    let pause = |d: Duration| {
        let until = std::time::Instant::now() + d;
        while !stop.is_cancelled() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut warned = false;
    let consumer = loop {
        match feedback_consumer(kafka, topic, pipeline) {
            Ok(c) => break c,
            Err(why) => {
                if !warned {
                    tracing::warn!(
                        pipeline,
                        topic,
                        "Cannot read the feedback topic yet (retrying every 10 s): {why}."
                    );
                    warned = true;
                }
                pause(Duration::from_secs(10));
                if stop.is_cancelled() {
                    return;
                }
            }
        }
    };
    tracing::info!(pipeline, topic, "Reading operators' feedback.");
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let parsed = crate::feedback::Feedback::parse(m.payload().unwrap_or_default());
                if input.blocking_send(Input::Feedback(parsed)).is_err() {
                    return; // the pipeline has stopped
                }
            }
            Some(Err(e)) => tracing::debug!(pipeline, topic, "Reading the feedback topic: {e}"),
            None => {}
        }
    }
}

/// A consumer assigned every partition of `topic` from its beginning (no group: nothing is
/// committed, and every replica reads everything).
fn feedback_consumer(
    kafka: &KafkaConfig,
    topic: &str,
    pipeline: &str,
) -> Result<BaseConsumer, String> {
    let mut c = crate::kafka::client_config(kafka);
    c.set(
        "group.id",
        format!("{}.{pipeline}.feedback", kafka.group_id),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = c.create().map_err(|e| e.to_string())?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("topic {topic} does not exist"));
    }
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(consumer)
}
