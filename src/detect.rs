//! Detect: the per-pipeline state machine between decoding and the sinks, shared by the daemon
//! and by `anomalyd score`, so a replayed file gives exactly what the daemon would.
//!
//! Work on a batch happens in three steps, so that inference (the expensive, stateless part) can
//! run on other threads while the next batch is being prepared:
//! 1. [`Detector::prepare`], in record order: push each record into its key's window and collect
//!    the samples to infer;
//! 2. [`Model::infer`] on the batch, anywhere;
//! 3. [`Detector::judge`], in record order: score each sample, judge it against its key's
//!    threshold, and run the alert hysteresis.
//!
//! Per-key state (window, threshold, alert state) lives in one LRU map bounded by `max_keys`: a
//! key-cardinality explosion evicts the least recently seen keys (counted) instead of exhausting
//! memory. An evicted key that comes back starts again from the warm-started threshold.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use crate::alert::{
    AlertEvent, AlertState, EventKind, FeatureError, ModelRef, SourceRef, Transition,
};
use crate::config::{AlertConfig, PipelineConfig};
use crate::decode::{Decoder, Record};
use crate::model::{Inference, Model};
use crate::threshold::{Threshold, Verdict};
use crate::window::Ring;

/// Where a record came from: a Kafka topic-partition-offset, or a file and row number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// How many of the highest-error features an alert or score row lists.
pub const TOP_FEATURES: usize = 3;

#[derive(Debug)]
struct KeyState {
    window: Option<Ring>,
    threshold: Box<dyn Threshold>,
    alert: AlertState,
    /// The partition the key's records arrive on, so a revoked partition's keys can be dropped.
    topic: Arc<str>,
    partition: i32,
}

/// A prepared batch: the samples to run through the model, and every record of the batch in
/// order, each with the index of its sample if it has one.
#[derive(Debug, Default)]
pub struct Batch {
    pub samples: Vec<f32>,
    pub entries: Vec<Entry>,
}

#[derive(Debug)]
pub struct Entry {
    pub origin: Origin,
    pub record: Record,
    /// Index of the record's sample in the batch, or `None` while its key's window fills up.
    pub sample: Option<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Number of samples to infer.
    pub fn sample_count(&self) -> usize {
        self.entries.iter().filter(|e| e.sample.is_some()).count()
    }
}

/// The outcome of one record.
#[derive(Debug)]
pub enum Outcome {
    /// Its key's window is not full yet, so it was not scored.
    Warming {
        origin: Origin,
        key: String,
    },
    Scored(Box<Scored>),
}

/// A scored record.
#[derive(Debug)]
pub struct Scored {
    pub origin: Origin,
    pub key: String,
    pub timestamp: Option<String>,
    /// The reconstruction error: the mean of the model's per-feature `error`.
    pub score: f64,
    pub verdict: Verdict,
    pub top_features: Vec<FeatureError>,
    /// The firing or resolved event, when this record changed the key's alert state.
    pub event: Option<AlertEvent>,
    /// The model's reconstruction of the record (for sequence models, of the window's last
    /// row): the denoised values.
    pub reconstruction: Vec<f32>,
}

/// Per-pipeline detection state.
#[derive(Debug)]
pub struct Detector {
    pipeline: String,
    model: Arc<Model>,
    decoder: Decoder,
    alert: AlertConfig,
    /// The warm-started threshold every new key is cloned from.
    template: Box<dyn Threshold>,
    keys: LruCache<String, KeyState>,
    evictions: u64,
}

impl Detector {
    pub fn new(name: &str, cfg: &PipelineConfig, model: Arc<Model>) -> Detector {
        let c = &model.contract;
        let fields = c
            .features
            .iter()
            .map(|f| cfg.field_map.get(f).cloned().unwrap_or_else(|| f.clone()))
            .collect();
        let per_field = match &c.shape {
            Some(chw) => chw[1] * chw[2],
            None => 1,
        };
        let decoder = Decoder::new(
            &cfg.key_field,
            &cfg.timestamp_field,
            fields,
            per_field,
            cfg.max_record_bytes,
        );
        Detector {
            pipeline: name.to_string(),
            template: cfg.threshold.build(&c.calibration),
            decoder,
            alert: cfg.alert,
            keys: LruCache::new(NonZeroUsize::new(cfg.max_keys.max(1)).expect("max_keys >= 1")),
            evictions: 0,
            model,
        }
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Keys currently tracked.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Keys evicted so far to stay under `max_keys`.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Step 1: windows the records and collects the samples to infer.
    pub fn prepare(&mut self, records: impl IntoIterator<Item = (Origin, Record)>) -> Batch {
        let contract = &self.model.contract;
        let window = contract.is_sequence().then_some(contract.window);
        let features = contract.features.len();
        let mut batch = Batch::default();
        let mut n = 0;
        for (origin, record) in records {
            let state = self.state(&record.key, &origin);
            let ready = match (&mut state.window, window) {
                (_, None) => {
                    batch.samples.extend_from_slice(&record.values);
                    true
                }
                (slot, Some(t)) => slot
                    .get_or_insert_with(|| Ring::new(t, features))
                    .push(&record.values, &mut batch.samples),
            };
            let sample = ready.then(|| {
                n += 1;
                n - 1
            });
            batch.entries.push(Entry {
                origin,
                record,
                sample,
            });
        }
        batch
    }

    /// Returns the key's state, creating it (and evicting the least recent key if full).
    fn state(&mut self, key: &str, origin: &Origin) -> &mut KeyState {
        if !self.keys.contains(key) {
            let fresh = KeyState {
                window: None,
                threshold: self.template.clone(),
                alert: AlertState::default(),
                topic: origin.topic.clone(),
                partition: origin.partition,
            };
            if let Some((evicted, _)) = self.keys.push(key.to_string(), fresh) {
                if evicted != key {
                    self.evictions += 1;
                }
            }
        }
        self.keys.get_mut(key).expect("just inserted")
    }

    /// Step 3: scores, judges and alerts, in record order.
    pub fn judge(&mut self, batch: Batch, inference: &Inference) -> Vec<Outcome> {
        let model = self.model.clone();
        let c = &model.contract;
        let alert_cfg = self.alert;
        let f = c.features.len();
        let per_sample = c.sample_len();
        let row_len = per_sample / c.window.max(1);
        let model_ref = ModelRef {
            name: c.name.clone(),
            version: c.version.clone(),
        };
        let mut out = Vec::with_capacity(batch.entries.len());
        for entry in batch.entries {
            let Some(i) = entry.sample else {
                out.push(Outcome::Warming {
                    origin: entry.origin,
                    key: entry.record.key,
                });
                continue;
            };
            let errors = &inference.errors[i * f..(i + 1) * f];
            let score = errors.iter().map(|&e| e as f64).sum::<f64>() / f as f64;
            // The reconstruction of the sample's last row: the record's own values.
            let sample = &inference.reconstructions[i * per_sample..(i + 1) * per_sample];
            let reconstruction = sample[per_sample - row_len..].to_vec();
            let top_features = top_features(
                &c.features,
                errors,
                &entry.record.values,
                &reconstruction,
                c.shape.is_some(),
            );
            let state = self.state(&entry.record.key, &entry.origin);
            let verdict = state.threshold.judge(score);
            let transition = state.alert.observe(
                &alert_cfg,
                verdict.is_anomaly,
                score,
                verdict.anomaly_score,
                entry.record.timestamp.as_deref(),
            );
            let event = transition.map(|t| {
                let (kind, episode) = match t {
                    Transition::Fired(e) => (EventKind::Firing, e),
                    Transition::Resolved(e) => (EventKind::Resolved, e),
                };
                AlertEvent {
                    event: kind,
                    pipeline: self.pipeline.clone(),
                    key: entry.record.key.clone(),
                    timestamp: entry.record.timestamp.clone(),
                    score,
                    threshold: verdict.threshold,
                    anomaly_score: verdict.anomaly_score,
                    severity: if episode.max_anomaly_score >= alert_cfg.critical_above {
                        "critical"
                    } else {
                        "warning"
                    },
                    top_features: top_features.clone(),
                    model: model_ref.clone(),
                    source: SourceRef {
                        topic: entry.origin.topic.to_string(),
                        partition: entry.origin.partition,
                        offset: entry.origin.offset,
                    },
                    episode,
                }
            });
            out.push(Outcome::Scored(Box::new(Scored {
                origin: entry.origin,
                key: entry.record.key,
                timestamp: entry.record.timestamp,
                score,
                verdict,
                top_features,
                event,
                reconstruction,
            })));
        }
        out
    }

    /// Drops the state of every key seen on the given partitions (they were revoked: their next
    /// owner rebuilds it).
    pub fn forget_partitions(&mut self, partitions: &[(String, i32)]) -> usize {
        let doomed: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, s)| {
                partitions
                    .iter()
                    .any(|(t, p)| *p == s.partition && **t == *s.topic)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &doomed {
            self.keys.pop(k);
        }
        doomed.len()
    }

    /// Number of keys currently firing.
    pub fn firing(&self) -> usize {
        self.keys
            .iter()
            .filter(|(_, s)| s.alert.is_firing())
            .count()
    }
}

/// The `TOP_FEATURES` features with the largest error, largest first.
fn top_features(
    names: &[String],
    errors: &[f32],
    values: &[f32],
    reconstruction: &[f32],
    image: bool,
) -> Vec<FeatureError> {
    let mut order: Vec<usize> = (0..errors.len()).collect();
    order.sort_by(|&a, &b| errors[b].total_cmp(&errors[a]));
    order
        .into_iter()
        .take(TOP_FEATURES)
        .map(|i| FeatureError {
            name: names[i].clone(),
            error: errors[i] as f64,
            // Images have no single value per channel to show.
            value: (!image).then(|| values[i] as f64),
            expected: (!image).then(|| reconstruction[i] as f64),
        })
        .collect()
}
