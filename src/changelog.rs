//! Changelog: each pipeline's per-key state (windows, thresholds, alert states) in a compacted
//! Kafka topic, so that the state follows its partition from replica to replica: after a
//! rebalance, a deploy or a crash, the partition's next owner resumes with what every key had
//! learned instead of re-learning it from the model's calibration (and re-alerting on levels
//! already accepted).
//!
//! # Layout
//! The topic is co-partitioned with the input: the state of a key whose records arrive on input
//! partition `p` is written to changelog partition `p` (whatever the input topic; the record's
//! key is `<input topic>/<entity>`, its value a [`StateRecord`], a tombstone when the key was
//! evicted). A partition's next owner therefore reads one changelog partition per input
//! partition, start to end, and keeps the last record per key. The topic is created on first
//! use (`cleanup.policy=compact`, as many partitions as the input's largest); compaction keeps
//! it at about one record per live key.
//!
//! # Consistency with the committed offsets
//! The pipeline writes state at barriers (see `pipeline`): a barrier takes, in stream order, the
//! state of every key changed since the last one, together with the position just past the last
//! record judged on each partition. The barrier's state is written only once every output of the
//! records before those positions is acknowledged, and the positions are committed only once
//! the state is acknowledged. So, per partition: committed ≤ durable state ≤ delivered outputs.
//! After a crash the next owner restores the last durable state and resumes from the committed
//! position: no record is skipped, no alert is lost (a state that says "firing" was written
//! after its firing event was delivered); the records between the commit and the state (at most
//! those of one commit interval) are judged again, so their outputs are duplicated and a key's
//! threshold learns them twice, which a statistical estimate over thousands of points absorbs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{KafkaConfig, ProducerContext};
use crate::offsets::Partition;
use crate::state::{Change, StateRecord};

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("state topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("state topic {topic}: {source}")]
    Kafka { topic: String, source: KafkaError },
    #[error("state topic {topic}: reading partitions {partitions:?} took longer than {timeout:?}")]
    Timeout {
        topic: String,
        partitions: Vec<i32>,
        timeout: Duration,
    },
}

/// Most changes queued in the producer at once.
const WRITE_CHUNK: usize = 10_000;

/// The record key of an input topic's entity.
fn record_key(topic: &str, key: &str) -> String {
    format!("{topic}/{key}")
}

/// The state topic of one pipeline: writes changes, reads partitions back.
#[derive(Clone)]
pub struct Changelog {
    topic: String,
    kafka: KafkaConfig,
    producer: FutureProducer<ProducerContext>,
    /// Reads partitions back and looks the topic up: one client for the pipeline's life,
    /// assigned only while it reads (a new client per assignment cost 250 ms on tansu:
    /// connecting, then closing).
    reader: Arc<std::sync::Mutex<BaseConsumer>>,
    /// The topic's partition count, once [`Changelog::ensure`] found it.
    partitions: Arc<AtomicI32>,
}

impl Changelog {
    /// A writer to `topic`. Writes to one partition keep their order (one request in flight),
    /// so that the last record of a key is its newest state.
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Changelog, ChangelogError> {
        let err = |source| ChangelogError::Kafka {
            topic: topic.to_string(),
            source: crate::kafka::redact_error(source),
        };
        let producer = crate::kafka::producer_config(kafka)
            .set("max.in.flight.requests.per.connection", "1")
            .create_with_context(ProducerContext)
            .map_err(err)?;
        let mut reader = crate::kafka::client_config(kafka);
        reader
            .set("group.id", format!("{topic}.reader"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // It reads to a marker it has just written: no reason to let the broker hold a
            // fetch for more.
            .set("fetch.wait.max.ms", "10");
        let reader = reader.create().map_err(err)?;
        Ok(Changelog {
            topic: topic.to_string(),
            kafka: kafka.clone(),
            producer,
            reader: Arc::new(std::sync::Mutex::new(reader)),
            partitions: Arc::new(AtomicI32::new(0)),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes changes and waits for every acknowledgement. Changes of input partitions the
    /// topic has no partition for are left out (see [`Changelog::ensure`]).
    pub async fn write(&self, changes: &[Change]) -> Result<(), ChangelogError> {
        let partitions = self.partitions.load(Ordering::Relaxed);
        let changes: Vec<&Change> = changes
            .iter()
            .filter(|c| c.partition < partitions)
            .collect();
        // In chunks, so that a barrier after a model swap (every key changed) does not overflow
        // the producer's queue.
        for chunk in changes.chunks(WRITE_CHUNK) {
            self.write_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn write_chunk(&self, changes: &[&Change]) -> Result<(), ChangelogError> {
        let err = |source| ChangelogError::Kafka {
            topic: self.topic.clone(),
            source,
        };
        let mut acks = Vec::with_capacity(changes.len());
        for c in changes {
            let key = record_key(&c.topic, &c.key);
            let value = c
                .state
                .as_ref()
                .map(|s| serde_json::to_vec(s).expect("state records serialise"));
            let mut record = FutureRecord::to(&self.topic)
                .key(&key)
                .partition(c.partition);
            if let Some(v) = &value {
                record = record.payload(v);
            }
            acks.push(self.producer.send_result(record).map_err(|(e, _)| err(e))?);
        }
        for ack in acks {
            match ack.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(err(e)),
                Err(_) => return Err(err(KafkaError::Canceled)),
            }
        }
        Ok(())
    }

    /// Makes sure the topic exists, creating it compacted with `partitions` partitions if it
    /// does not; returns how many it has. If it has fewer, the keys of the input partitions
    /// beyond them keep their state in memory only (warned here). Blocking.
    pub fn ensure(&self, partitions: i32, timeout: Duration) -> Result<i32, ChangelogError> {
        let n = self.find_or_create(partitions, timeout)?;
        if n < partitions && self.partitions.load(Ordering::Relaxed) != n {
            tracing::warn!(topic = %self.topic, partitions = n, needed = partitions, "The state topic has fewer partitions than the input; the keys of the input partitions beyond them keep their state in memory only. Add partitions to the state topic.");
        }
        self.partitions.store(n, Ordering::Relaxed);
        Ok(n)
    }

    fn find_or_create(&self, partitions: i32, timeout: Duration) -> Result<i32, ChangelogError> {
        let topic_err = |reason: String| ChangelogError::Topic {
            topic: self.topic.clone(),
            reason,
        };
        let existing = self.partition_count(timeout)?;
        if existing > 0 {
            return Ok(existing);
        }
        let admin: AdminClient<DefaultClientContext> = crate::kafka::client_config(&self.kafka)
            .create()
            .map_err(|source| ChangelogError::Kafka {
                topic: self.topic.clone(),
                source,
            })?;
        let new = NewTopic::new(&self.topic, partitions, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact");
        let options = AdminOptions::new().operation_timeout(Some(timeout));
        let created = block_on(admin.create_topics(&[new], &options));
        match created {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | None => {}
                Some(Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))) => {}
                Some(Err((_, code))) => {
                    return Err(topic_err(format!(
                        "cannot create it ({code}); create it yourself, compacted, with {partitions} partitions, or set the pipeline's state_topic = \"\" to keep state in memory only"
                    )))
                }
            },
            Err(e) => {
                return Err(topic_err(format!(
                    "cannot create it ({e}); create it yourself, compacted, with {partitions} partitions"
                )))
            }
        }
        match self.partition_count(timeout)? {
            0 => Err(topic_err("created, but the broker does not list it".into())),
            n => Ok(n),
        }
    }

    /// The topic's partition count; 0 if it does not exist.
    fn partition_count(&self, timeout: Duration) -> Result<i32, ChangelogError> {
        let md = self
            .reader
            .lock()
            .expect("the reader's lock is never poisoned")
            .fetch_metadata(Some(&self.topic), timeout)
            .map_err(|source| ChangelogError::Kafka {
                topic: self.topic.clone(),
                source,
            })?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32))
    }

    /// Reads the state of the keys of `partitions` (input topic, partition): every record of
    /// their changelog partitions, the last one per key winning, tombstones removing. Blocking.
    /// Returns the states and how many records could not be read (skipped).
    pub fn read(
        &self,
        partitions: &[Partition],
        timeout: Duration,
    ) -> Result<(Vec<StateRecord>, usize), ChangelogError> {
        let err = |source| ChangelogError::Kafka {
            topic: self.topic.clone(),
            source,
        };
        let numbers: Vec<i32> = {
            let set: HashSet<i32> = partitions.iter().map(|(_, p)| *p).collect();
            let mut v: Vec<i32> = set.into_iter().collect();
            v.sort();
            v
        };
        // Where each partition ends: a marker written now, after everything the partition's
        // previous owner wrote (its writes were acknowledged before it let the partition go).
        // Not the high watermark, which some brokers (tansu 0.6) count in batches.
        let marker = format!("\u{0}end/{}", rand::random::<u64>());
        let mut acks = Vec::new();
        for &p in &numbers {
            let record = FutureRecord::<str, [u8]>::to(&self.topic)
                .key(&marker)
                .partition(p);
            acks.push(self.producer.send_result(record).map_err(|(e, _)| err(e))?);
        }
        for ack in acks {
            match block_on(ack) {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(err(e)),
                Err(_) => return Err(err(KafkaError::Canceled)),
            }
        }
        let reader = self
            .reader
            .lock()
            .expect("the reader's lock is never poisoned");
        // Partitions' leaders known before they are assigned: librdkafka retries the offset
        // query of a partition without a known leader only after 500 ms, which was half of a
        // cold start (timed on tansu: 514 ms from assign to the markers, 15 ms with this).
        reader
            .fetch_metadata(Some(&self.topic), timeout)
            .map_err(err)?;
        let mut tpl = TopicPartitionList::new();
        for &p in &numbers {
            tpl.add_partition_offset(&self.topic, p, Offset::Beginning)
                .map_err(err)?;
        }
        reader.assign(&tpl).map_err(err)?;
        let latest = self.read_to_markers(&reader, &numbers, &marker, timeout);
        // Unassigned whatever happened: assigned, it would go on fetching in the background.
        let _ = reader.unassign();
        let latest = latest?;
        let wanted: HashSet<(&str, i32)> =
            partitions.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        let mut states = Vec::new();
        let mut skipped = 0;
        for value in latest.into_values().flatten() {
            match serde_json::from_slice::<StateRecord>(&value) {
                Ok(r) if wanted.contains(&(r.state.topic.as_str(), r.state.partition)) => {
                    states.push(r)
                }
                Ok(_) => {}
                Err(_) => skipped += 1,
            }
        }
        states.sort_by(|a, b| a.state.key.cmp(&b.state.key));
        Ok((states, skipped))
    }

    /// Polls the assigned `reader` until it has read `marker` in each of `partitions`: the
    /// last value of each key before it (`None` for a tombstone).
    fn read_to_markers(
        &self,
        reader: &BaseConsumer,
        partitions: &[i32],
        marker: &str,
        timeout: Duration,
    ) -> Result<HashMap<Vec<u8>, Option<Vec<u8>>>, ChangelogError> {
        let mut remaining: HashSet<i32> = partitions.iter().copied().collect();
        let mut latest = HashMap::new();
        let deadline = Instant::now() + timeout;
        while !remaining.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChangelogError::Timeout {
                    topic: self.topic.clone(),
                    partitions: remaining.into_iter().collect(),
                    timeout,
                });
            }
            match reader.poll(left.min(Duration::from_millis(200))) {
                Some(Ok(m)) => match m.key() {
                    Some(k) if k == marker.as_bytes() => {
                        remaining.remove(&m.partition());
                    }
                    Some(k) => {
                        latest.insert(k.to_vec(), m.payload().map(<[u8]>::to_vec));
                    }
                    None => {}
                },
                Some(Err(e)) => {
                    tracing::debug!(topic = %self.topic, "Reading the state topic: {e}")
                }
                None => {}
            }
        }
        Ok(latest)
    }

    /// Waits (up to `timeout`) for queued writes to be acknowledged.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// Runs an admin future to completion on the calling (non-async) thread: the admin client's
/// futures are driven by its own background thread, so a plain park/unpark executor suffices.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_key_names_its_topic_and_entity() {
        // Topic names cannot hold a '/', so the first one separates them.
        let k = record_key("metrics", "rack/host-1");
        assert_eq!(k.split_once('/'), Some(("metrics", "rack/host-1")));
    }
}
