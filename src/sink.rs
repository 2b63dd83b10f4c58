//! Sinks: where a pipeline's outputs go (alerts, scores and denoised topics, dead letters,
//! stdout), and the JSON shapes they are written in.
//!
//! Emitting a record's outcome counts it and queues its messages in the producer, in record
//! order, and returns them as [`Sent`]; [`Outputs::delivered`] then waits for their
//! acknowledgements, retrying a failed delivery with backoff for as long as it is allowed to
//! run (the pipeline aborts it at the end of the shutdown grace period). The pipeline releases
//! the input record's offset only once it returns, so a record whose alert never reached Kafka
//! is read again.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, IntCounter};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::alert::AlertEvent;
use crate::alertmanager::AmInput;
use crate::config::PipelineConfig;
use crate::decode::DecodeError;
use crate::detect::{Origin, Outcome, Scored};
use crate::drift::DriftChange;
use crate::kafka::ProducerContext;
use crate::metrics::{label, Metrics};

/// One message to deliver.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub sink: &'static str,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    /// Already the reduced dead letter of an undeliverable message.
    pub reduced: bool,
}

/// A record of the scores topic: the record's score, threshold and verdict, and where it came from.
#[derive(Debug, Serialize)]
pub struct ScoreRow<'a> {
    pub key: &'a str,
    pub timestamp: Option<&'a str>,
    pub score: f64,
    pub threshold: f64,
    pub anomaly_score: f64,
    pub is_anomaly: bool,
    pub top_features: Vec<&'a str>,
    /// The record's topic (a pipeline may read several), partition and offset.
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub model_version: &'a str,
}

impl<'a> ScoreRow<'a> {
    pub fn of(s: &'a Scored) -> ScoreRow<'a> {
        ScoreRow {
            key: &s.key,
            timestamp: s.timestamp.as_deref(),
            score: s.score,
            threshold: s.verdict.threshold,
            anomaly_score: s.verdict.anomaly_score,
            is_anomaly: s.verdict.is_anomaly,
            top_features: s.top.names(&s.model.contract.features).collect(),
            topic: &s.origin.topic,
            partition: s.origin.partition,
            offset: s.origin.offset,
            model_version: &s.model.contract.version,
        }
    }
}

/// The series [`Outputs::emit`] updates for every record.
struct Series {
    scored: IntCounter,
    warming: IntCounter,
    anomalies: IntCounter,
    reconstruction_error: Histogram,
    anomaly_score: Histogram,
}

impl Series {
    fn of(m: &Metrics, pipeline: &str) -> Series {
        Series {
            scored: m.records.with_label_values(&[pipeline, label::SCORED]),
            warming: m.records.with_label_values(&[pipeline, label::WARMING]),
            anomalies: m.anomalies.with_label_values(&[pipeline]),
            reconstruction_error: m.reconstruction_error.with_label_values(&[pipeline]),
            anomaly_score: m.anomaly_score.with_label_values(&[pipeline]),
        }
    }
}

/// The outputs of one pipeline.
pub struct Outputs {
    pub pipeline: String,
    producer: FutureProducer<ProducerContext>,
    alerts_topic: String,
    scores_topic: String,
    denoised_topic: String,
    dead_letter_topic: String,
    stdout: bool,
    features: Vec<String>,
    metrics: Metrics,
    /// This pipeline's per-record series, looked up once: a labelled lookup per record costs a
    /// hash and a lock.
    series: Series,
    /// Throttles the log lines of failed deliveries.
    failures: crate::log::Throttle,
    /// Alert events for the Alertmanager sink, if the pipeline has one.
    alertmanager: Option<mpsc::UnboundedSender<AmInput>>,
}

impl Outputs {
    pub fn new(
        pipeline: &str,
        cfg: &PipelineConfig,
        features: Vec<String>,
        producer: FutureProducer<ProducerContext>,
        metrics: Metrics,
        alertmanager: Option<mpsc::UnboundedSender<AmInput>>,
    ) -> Outputs {
        Outputs {
            pipeline: pipeline.to_string(),
            producer,
            alerts_topic: cfg.alerts_topic.clone(),
            scores_topic: cfg.scores_topic.clone(),
            denoised_topic: cfg.denoised_topic.clone(),
            dead_letter_topic: cfg.dead_letter_topic.clone(),
            stdout: cfg.stdout,
            features,
            series: Series::of(&metrics, pipeline),
            metrics,
            failures: crate::log::Throttle::new(Duration::from_secs(10)),
            alertmanager,
        }
    }

    /// Tells the Alertmanager sink, if the pipeline has one.
    pub fn to_alertmanager(&self, input: AmInput) {
        if let Some(am) = &self.alertmanager {
            // Fails only once the sink has stopped, at shutdown.
            let _ = am.send(input);
        }
    }

    pub fn producer(&self) -> &FutureProducer<ProducerContext> {
        &self.producer
    }

    /// Counts an outcome and queues its outputs.
    pub fn emit(&self, outcome: Outcome) -> Sent {
        let m = &self.series;
        match outcome {
            Outcome::Warming { origin, .. } => {
                m.warming.inc();
                self.send(origin, Vec::new())
            }
            Outcome::NonFinite { origin, record } => self.unscored(
                origin,
                record,
                crate::detect::NON_FINITE_SCORE,
                "the model's reconstruction error on it is not a finite number".into(),
            ),
            Outcome::Scored(s) => {
                m.scored.inc();
                m.reconstruction_error.observe(s.score);
                m.anomaly_score.observe(s.verdict.anomaly_score);
                if s.verdict.is_anomaly {
                    m.anomalies.inc();
                }
                match s.drift {
                    Some(DriftChange::Started) => {
                        self.metrics
                            .drifts
                            .with_label_values(&[&self.pipeline])
                            .inc();
                        tracing::warn!(pipeline = %self.pipeline, model = %s.model.contract.name, version = %s.model.contract.version, "The pipeline's scores have risen since its model started: the data is drifting from what the model learned; retrain it on recent data (docs/OPERATIONS.md).");
                    }
                    Some(DriftChange::Ended) => {
                        tracing::info!(pipeline = %self.pipeline, "The pipeline's scores are back at the level its model started at.");
                    }
                    None => {}
                }
                let messages = self.messages_for(&s);
                self.send(s.origin.clone(), messages)
            }
        }
    }

    /// Counts an alert event, prints it and tells Alertmanager; returns its alerts-topic message.
    fn alert(&self, event: &AlertEvent) -> Option<OutMessage> {
        self.metrics
            .alerts
            .with_label_values(&[&self.pipeline, event.event.as_str()])
            .inc();
        if event.reason == Some(crate::detect::REBASELINED) {
            self.metrics
                .rebaselines
                .with_label_values(&[&self.pipeline])
                .inc();
            tracing::info!(pipeline = %self.pipeline, key = %event.key, points = event.episode.points, "Level accepted as the key's normal: its episode outlasted rebaseline_after");
        }
        let json = serde_json::to_vec(event).expect("alert events serialise");
        if self.stdout {
            self.print(&json);
        }
        self.to_alertmanager(AmInput::Event(Box::new(event.clone())));
        (!self.alerts_topic.is_empty()).then(|| OutMessage {
            sink: label::ALERTS,
            topic: self.alerts_topic.clone(),
            key: Some(event.key.as_bytes().to_vec()),
            payload: json,
            headers: vec![("anomalyd.event", event.event.as_str().to_string())],
            reduced: false,
        })
    }

    /// Sends the resolutions of episodes whose keys were dropped with a revoked partition. No
    /// offset waits on them (the partition is gone); they are delivered in the background, as
    /// persistently as any output, and flushed at shutdown.
    pub fn resolve_dropped(self: &Arc<Self>, events: Vec<AlertEvent>) {
        for event in events {
            let origin = Origin {
                topic: Arc::from(event.source.topic.as_str()),
                partition: event.source.partition,
                offset: event.source.offset,
            };
            let sent = self.send(origin, self.alert(&event).into_iter().collect());
            tokio::spawn(self.clone().delivered(sent));
        }
    }

    fn messages_for(&self, s: &Scored) -> Vec<OutMessage> {
        let mut out = Vec::new();
        let key = Some(s.key.as_bytes().to_vec());
        for event in s.evicted.iter().chain(&s.event) {
            out.extend(self.alert(event));
        }
        if !self.scores_topic.is_empty() {
            out.push(OutMessage {
                sink: label::SCORES,
                topic: self.scores_topic.clone(),
                key: key.clone(),
                payload: serde_json::to_vec(&ScoreRow::of(s)).expect("scores serialise"),
                headers: Vec::new(),
                reduced: false,
            });
        }
        // The detector keeps reconstructions only when the pipeline has a denoised topic.
        if let Some(values) = &s.reconstruction {
            out.push(OutMessage {
                sink: label::DENOISED,
                topic: self.denoised_topic.clone(),
                key,
                payload: denoised_json(&s.key, s.timestamp.as_deref(), &self.features, values),
                headers: Vec::new(),
                reduced: false,
            });
        }
        out
    }

    /// Prints an alert event on stdout, one line. Stdout is a convenience, not a delivery: a
    /// failed write (the reader went away: EPIPE) is counted and logged (throttled), and the
    /// pipeline goes on.
    fn print(&self, json: &[u8]) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let written = out
            .write_all(json)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        if let Err(e) = written {
            self.metrics
                .produce_errors
                .with_label_values(&[self.pipeline.as_str(), label::STDOUT])
                .inc();
            if let Some(held) = self.failures.allow() {
                tracing::warn!(pipeline = %self.pipeline, similar_since_last_report = held, "Printing an alert on stdout failed; it reached its other sinks: {e}");
            }
        }
    }

    /// Sends a record that cannot be scored to the dead-letter topic, with its reason in headers.
    pub fn dead_letter(
        &self,
        origin: Origin,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        reason: &'static str,
        detail: String,
    ) -> Sent {
        self.metrics
            .records
            .with_label_values(&[&self.pipeline, label::DEAD_LETTER])
            .inc();
        self.metrics
            .dead_letters
            .with_label_values(&[&self.pipeline, reason])
            .inc();
        tracing::debug!(pipeline = %self.pipeline, topic = %origin.topic, partition = origin.partition, offset = origin.offset, reason, "Dead letter: {detail}");
        let messages = if self.dead_letter_topic.is_empty() {
            Vec::new()
        } else {
            vec![OutMessage {
                sink: label::DEAD_LETTERS,
                topic: self.dead_letter_topic.clone(),
                key,
                payload,
                headers: self.dead_letter_headers(&origin, reason, detail),
                reduced: false,
            }]
        };
        self.send(origin, messages)
    }

    /// Dead-letters a decoded record that could not be scored; its payload is the record as
    /// decoded (key, timestamp, values), the original bytes being gone by then.
    pub fn unscored(
        &self,
        origin: Origin,
        record: crate::decode::Record,
        reason: &'static str,
        detail: String,
    ) -> Sent {
        let payload = serde_json::json!({
            "key": record.key,
            "timestamp": record.timestamp,
            "values": record.values,
        });
        let key = Some(record.key.into_bytes());
        self.dead_letter(
            origin,
            key,
            payload.to_string().into_bytes(),
            reason,
            detail,
        )
    }

    /// Dead-letters a record that failed to decode.
    pub fn undecodable(
        &self,
        origin: Origin,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        error: &DecodeError,
    ) -> Sent {
        self.dead_letter(origin, key, payload, error.reason(), error.to_string())
    }

    /// Queues a record's messages now, in record order, so that a key's events reach their
    /// topic in the order they happened; only the wait for acknowledgements (and any retry) is
    /// left for [`Outputs::delivered`].
    fn send(&self, origin: Origin, messages: Vec<OutMessage>) -> Sent {
        let pending = messages
            .into_iter()
            .map(|m| {
                let queued = self.enqueue(&m);
                (m, queued)
            })
            .collect();
        Sent { origin, pending }
    }

    /// Waits until every message of `sent` is delivered (see [`Outputs::deliver`] for what is
    /// retried and what is not), for as long as it runs; returns the record's origin, whose
    /// offset may then be released.
    pub async fn delivered(self: Arc<Self>, sent: Sent) -> Origin {
        for (m, queued) in sent.pending {
            let first = match queued {
                Ok(f) => acked(f).await,
                Err(e) => Err(e),
            };
            if let Err(e) = first {
                self.deliver(m, e, &sent.origin).await;
            }
        }
        sent.origin
    }

    /// Delivers a message whose last attempt failed with `error`. A transient failure (the
    /// broker unreachable, a topic missing, no authorisation yet) is retried with backoff until
    /// the message is acknowledged. A message no broker will ever accept (too large, invalid) is
    /// not retried: it is replaced, once, by its reduced dead letter (the reason, the error, the
    /// source's coordinates, the payload cut to 64 KiB and the key to 1 KiB), and if that cannot
    /// be delivered either (or there is no dead-letter topic) it is dropped and counted, so that
    /// the record's partition moves on.
    async fn deliver(&self, mut m: OutMessage, mut error: KafkaError, origin: &Origin) {
        let mut backoff = Duration::from_millis(100);
        loop {
            self.failed(&m, &error);
            if is_permanent(&error) {
                if m.reduced || self.dead_letter_topic.is_empty() {
                    self.metrics
                        .outputs_dropped
                        .with_label_values(&[self.pipeline.as_str(), m.sink])
                        .inc();
                    tracing::error!(pipeline = %self.pipeline, topic = %m.topic, source_topic = %origin.topic, source_partition = origin.partition, source_offset = origin.offset, "Dropped an output no broker will accept: {error}");
                    return;
                }
                m = self.reduced(m, &error, origin);
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            error = match self.enqueue(&m) {
                Ok(queued) => match acked(queued).await {
                    Ok(()) => return,
                    Err(e) => e,
                },
                Err(e) => e,
            };
        }
    }

    /// The reduced dead letter of a message that cannot be delivered as it is.
    fn reduced(&self, m: OutMessage, error: &KafkaError, origin: &Origin) -> OutMessage {
        const PAYLOAD: usize = 64 * 1024;
        const KEY: usize = 1024;
        let mut headers = if m.sink == label::DEAD_LETTERS {
            m.headers
        } else {
            self.dead_letter_headers(
                origin,
                "undeliverable",
                format!("its {} output: {error}", m.sink),
            )
        };
        headers.push(("anomalyd.original_bytes", m.payload.len().to_string()));
        OutMessage {
            sink: label::DEAD_LETTERS,
            topic: self.dead_letter_topic.clone(),
            key: m.key.map(|mut k| {
                k.truncate(KEY);
                k
            }),
            payload: m.payload[..m.payload.len().min(PAYLOAD)].to_vec(),
            headers,
            reduced: true,
        }
    }

    fn dead_letter_headers(
        &self,
        origin: &Origin,
        reason: &'static str,
        detail: String,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("anomalyd.reason", reason.to_string()),
            ("anomalyd.error", detail),
            ("anomalyd.pipeline", self.pipeline.clone()),
            ("anomalyd.source.topic", origin.topic.to_string()),
            ("anomalyd.source.partition", origin.partition.to_string()),
            ("anomalyd.source.offset", origin.offset.to_string()),
        ]
    }

    /// Hands one message to the producer's queue.
    fn enqueue(&self, m: &OutMessage) -> Result<DeliveryFuture, KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&m.topic)
            .payload(&m.payload)
            .headers(headers);
        if let Some(k) = &m.key {
            record = record.key(k);
        }
        self.producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Counts a failed delivery, and logs it, at most one line per 10 s.
    fn failed(&self, m: &OutMessage, error: &KafkaError) {
        self.metrics
            .produce_errors
            .with_label_values(&[self.pipeline.as_str(), m.sink])
            .inc();
        if let Some(held) = self.failures.allow() {
            tracing::warn!(pipeline = %self.pipeline, topic = %m.topic, similar_since_last_report = held, "Delivery failed: {error}");
        }
    }
}

/// Waits for one queued message's acknowledgement.
async fn acked(queued: DeliveryFuture) -> Result<(), KafkaError> {
    match queued.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Whether no broker will ever accept the message as it is, however often it is retried.
fn is_permanent(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | MessageBatchTooLarge
                | InvalidRecord
        )
    )
}

/// The outputs of one record, queued in the producer, awaiting their acknowledgements.
pub struct Sent {
    pub origin: Origin,
    pending: Vec<(OutMessage, Result<DeliveryFuture, KafkaError>)>,
}

impl Sent {
    /// Whether the record had no output to wait for.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The denoised record: the model's reconstruction of the record's values, by feature name.
pub fn denoised_json(
    key: &str,
    timestamp: Option<&str>,
    features: &[String],
    values: &[f32],
) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("key".into(), key.into());
    obj.insert("timestamp".into(), timestamp.into());
    let per = values.len() / features.len().max(1);
    for (i, name) in features.iter().enumerate() {
        let v: serde_json::Value = if per == 1 {
            (values[i] as f64).into()
        } else {
            values[i * per..(i + 1) * per]
                .iter()
                .map(|&x| x as f64)
                .collect::<Vec<_>>()
                .into()
        };
        obj.insert(name.clone(), v);
    }
    serde_json::to_vec(&obj).expect("denoised records serialise")
}
