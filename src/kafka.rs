//! Kafka plumbing: client configuration, and the consumer context that keeps offsets and
//! per-key state right across rebalances.
//!
//! On revoke, the context waits (up to `drain_timeout`) for the revoked partitions' in-flight
//! records to finish, commits their contiguous-prefix positions synchronously, and drops their
//! keys' state: the partition's next owner starts from the committed position and rebuilds it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::checkpoint::KeyCheckpoint;
use crate::detect::Detector;
use crate::metrics::{Health, Metrics};
use crate::offsets::{OffsetTracker, Partition};

/// `[kafka]`: the brokers and the consumer group, shared by every pipeline.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list (librdkafka `bootstrap.servers`).
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer group prefix; pipeline `P` consumes as group `<group_id>.<P>`.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Where a group with no committed offset starts: `earliest` or `latest`.
    #[serde(default = "default_offset_reset")]
    pub auto_offset_reset: String,
    /// How often stored offsets are committed.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long to wait for outputs to be acknowledged before giving up a batch of partitions on
    /// revoke. Records still in flight then are processed again by the partition's next owner.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Extra librdkafka properties passed as they are to every client (SASL/SSL, tuning), e.g.
    /// `"security.protocol" = "SASL_SSL"`. They override anomalyd's own defaults, except the
    /// offset-management ones that at-least-once delivery depends on.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: default_brokers(),
            group_id: default_group_id(),
            auto_offset_reset: default_offset_reset(),
            commit_interval: default_commit_interval(),
            drain_timeout: default_drain_timeout(),
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.brokers.trim().is_empty() {
            problems.push("brokers: must name at least one broker".into());
        }
        if !matches!(self.auto_offset_reset.as_str(), "earliest" | "latest") {
            problems.push(format!(
                "auto_offset_reset: {:?} is neither `earliest` nor `latest`",
                self.auto_offset_reset
            ));
        }
        for key in self.properties.keys() {
            if RESERVED_PROPERTIES.contains(&key.as_str()) {
                problems.push(format!(
                    "properties.{key}: anomalyd manages this property itself (at-least-once delivery depends on it)"
                ));
            }
        }
        problems
    }
}

fn default_brokers() -> String {
    "localhost:9092".into()
}
fn default_group_id() -> String {
    "anomalyd".into()
}
fn default_offset_reset() -> String {
    "earliest".into()
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

/// librdkafka properties anomalyd sets itself; at-least-once delivery depends on them.
pub const RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
];

fn base_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers);
    c
}

fn with_user_properties(mut c: ClientConfig, kafka: &KafkaConfig) -> ClientConfig {
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// The consumer's configuration: offsets are stored by anomalyd only once a record's outputs are
/// acknowledged, and committed from the stored positions.
pub fn consumer_config(kafka: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = base_config(kafka);
    c.set("group.id", group)
        .set("auto.offset.reset", &kafka.auto_offset_reset)
        .set("statistics.interval.ms", "5000")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("topic.metadata.refresh.interval.ms", "10000");
    let mut c = with_user_properties(c, kafka);
    c.set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            kafka.commit_interval.as_millis().max(1).to_string(),
        )
        .set("enable.auto.offset.store", "false");
    c
}

/// The producer's configuration for every output topic: acknowledged by all in-sync replicas.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(kafka);
    c.set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .set("compression.type", "lz4");
    with_user_properties(c, kafka)
}

/// Maps librdkafka's log lines onto tracing.
pub fn log_kafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}")
        }
    }
}

/// Client context of the producers: routes logs and errors to tracing.
pub struct ProducerContext;

impl ClientContext for ProducerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_kafka(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "Kafka producer error: {error}: {reason}");
    }
}

/// The consumer context of one pipeline.
pub struct PipelineContext {
    pub pipeline: String,
    /// Checkpointed key states waiting for their partition to be assigned.
    pub restore: Mutex<PendingRestore>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub detector: Arc<Mutex<Detector>>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub drain_timeout: Duration,
}

impl ClientContext for PipelineContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_kafka(level, fac, message);
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.metrics.set_lag(&self.pipeline, &statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", pipeline = %self.pipeline, "Kafka consumer error: {error}: {reason}");
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl PipelineContext {
    /// Waits until no record of `partitions` is in flight, or the drain timeout passes.
    fn drain(&self, partitions: &[Partition]) -> usize {
        let deadline = Instant::now() + self.drain_timeout;
        loop {
            let left = self
                .tracker
                .lock()
                .expect("tracker lock")
                .in_flight(Some(partitions));
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The commit positions of `partitions`, as a list librdkafka takes.
    pub fn positions(&self, partitions: &[Partition]) -> TopicPartitionList {
        let tracker = self.tracker.lock().expect("tracker lock");
        let mut tpl = TopicPartitionList::new();
        for (topic, p) in partitions {
            if let Some(pos) = tracker.position(topic, *p) {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(pos));
            }
        }
        tpl
    }

    /// Restores the checkpointed keys of newly assigned partitions.
    fn restore_state(&self, partitions: &[Partition]) -> usize {
        let mut pending = self.restore.lock().expect("restore lock");
        let keys: Vec<KeyCheckpoint> = partitions
            .iter()
            .filter_map(|p| pending.keys.remove(p))
            .flatten()
            .collect();
        if keys.is_empty() {
            return 0;
        }
        let restored = self
            .detector
            .lock()
            .expect("detector lock")
            .restore(keys, pending.thresholds);
        self.metrics
            .keys_restored
            .with_label_values(&[&self.pipeline])
            .inc_by(restored as u64);
        restored
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

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = partitions_of(tpl);
        if partitions.is_empty() {
            return;
        }
        if consumer.assignment_lost() {
            tracing::warn!(pipeline = %self.pipeline, ?partitions, "Partitions were lost (the group moved on without us); their in-flight records will be processed again by their new owner.");
        } else {
            let left = self.drain(&partitions);
            if left > 0 {
                tracing::warn!(pipeline = %self.pipeline, in_flight = left, "Drain timeout on revoke: records still in flight will be processed again by the partitions' next owner.");
            }
            let tpl = self.positions(&partitions);
            if tpl.count() > 0 {
                if let Err(e) = consumer.store_offsets(&tpl) {
                    tracing::debug!(pipeline = %self.pipeline, "Storing offsets on revoke: {e}");
                }
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => self
                        .metrics
                        .offsets_committed
                        .with_label_values(&[&self.pipeline])
                        .inc_by(tpl.count() as u64),
                    Err(e) => {
                        tracing::warn!(pipeline = %self.pipeline, "Committing offsets of revoked partitions failed: {e}; their records since the last commit will be processed again.")
                    }
                }
            }
        }
        self.tracker
            .lock()
            .expect("tracker lock")
            .remove(&partitions);
        let dropped = self
            .detector
            .lock()
            .expect("detector lock")
            .forget_partitions(&partitions);
        self.metrics.drop_lag(&self.pipeline, &partitions);
        tracing::info!(pipeline = %self.pipeline, ?partitions, keys_dropped = dropped, "Partitions revoked.");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = partitions_of(tpl);
                let restored = self.restore_state(&partitions);
                tracing::info!(pipeline = %self.pipeline, ?partitions, keys_restored = restored, "Partitions assigned.");
            }
            Rebalance::Error(e) => {
                tracing::warn!(pipeline = %self.pipeline, "Rebalance error: {e}");
            }
            Rebalance::Revoke(_) => {}
        }
        self.update_assignment(consumer);
    }
}

/// Key states from a checkpoint, by partition, until the partition is assigned.
#[derive(Debug, Default)]
pub struct PendingRestore {
    pub keys: std::collections::HashMap<Partition, Vec<KeyCheckpoint>>,
    /// Whether their thresholds still apply (same model and method).
    pub thresholds: bool,
}
