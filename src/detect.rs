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
//! Per-key state lives in LRU maps bounded by `max_keys`, one per step so that each step owns
//! its state: the inputs (windows of sequence models, levels of baselined features) for step 1,
//! the threshold and alert state for step 3. A key-cardinality explosion evicts the least
//! recently seen keys (counted) instead of exhausting memory; an evicted key that comes back
//! starts again from the warm-started threshold, an empty window and no level.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use crate::alert::AlertConfig;
use crate::alert::{
    AlertEvent, AlertState, EventKind, FeatureError, ModelRef, SourceRef, Transition,
};
use crate::baseline::{Baseline, Level};
use crate::decode::{Decoder, Record};
use crate::drift::{Drift, DriftChange, DriftConfig};
use crate::feedback::{Feedback, FeedbackConfig, FeedbackOutcome};
use crate::model::{Calibration, Contract, Inference, Model};
use crate::state::{Change, KeySnapshot, ModelIdentity, StateRecord};
use crate::threshold::{Threshold, ThresholdConfig, Verdict};
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

/// The partition a key's records arrive on, so a revoked partition's keys can be dropped.
#[derive(Debug, Clone)]
struct Source {
    topic: Arc<str>,
    partition: i32,
}

impl Source {
    fn of(origin: &Origin) -> Source {
        Source {
            topic: origin.topic.clone(),
            partition: origin.partition,
        }
    }

    fn is_in(&self, partitions: &[(String, i32)]) -> bool {
        partitions
            .iter()
            .any(|(t, p)| *p == self.partition && **t == *self.topic)
    }
}

#[derive(Debug)]
struct KeyState {
    threshold: Box<dyn Threshold>,
    alert: AlertState,
    /// While firing, with `rebaseline_after` set: the episode's last scores, which calibrate the
    /// key's threshold if its level is accepted. Not checkpointed: after a restore it refills.
    episode_scores: VecDeque<f64>,
    source: Source,
    /// Changed since the last [`Detector::take_changes`].
    dirty: bool,
}

#[derive(Debug)]
struct WindowState {
    /// The key's last rows as the model sees them (one row for a point model with a baseline).
    ring: Ring,
    /// The key's levels, for a model with a baseline.
    level: Option<Level>,
    source: Source,
    dirty: bool,
}

/// A prepared batch: the model it was prepared for, the samples to run through it, and every
/// record of the batch in order, each with the index of its sample if it has one. The batch
/// carries its model so that a model swapped in meanwhile never judges samples it did not see.
#[derive(Debug)]
pub struct Batch {
    pub model: Arc<Model>,
    pub samples: Vec<f32>,
    pub entries: Vec<Entry>,
}

#[derive(Debug)]
pub struct Entry {
    pub origin: Origin,
    pub record: Record,
    /// Index of the record's sample in the batch, or `None` while its key's window fills up.
    pub sample: Option<usize>,
    /// For a model with a baseline: what was subtracted from each of the record's values before
    /// the model saw them (the key's levels; 0 for features not baselined).
    pub levels: Option<Box<[f32]>>,
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
        timestamp: Option<String>,
    },
    Scored(Box<Scored>),
    /// The model's error on it is not a finite number (values at the edge of f32, or a model
    /// that outputs NaN): it is not judged, so that its key's threshold stays sound.
    NonFinite {
        origin: Origin,
        record: Record,
    },
}

/// The dead-letter reason of [`Outcome::NonFinite`].
pub const NON_FINITE_SCORE: &str = "non_finite_score";

/// A scored record.
#[derive(Debug)]
pub struct Scored {
    pub origin: Origin,
    pub key: String,
    pub timestamp: Option<String>,
    /// The reconstruction error: the mean of the model's per-feature `error`.
    pub score: f64,
    pub verdict: Verdict,
    /// The features with the largest errors.
    pub top: Top,
    /// The firing or resolved event, when this record changed the key's alert state. (Boxed,
    /// as `evicted`: most records have neither, and a `Scored` with both inline was 784 bytes
    /// to build and move for each record.)
    pub event: Option<Box<AlertEvent>>,
    /// The resolution of another key's episode, when this record's new key evicted that key
    /// while it was firing (every episode that fires resolves, at every sink).
    pub evicted: Option<Box<AlertEvent>>,
    /// The model's reconstruction of the record (for sequence models, of the window's last
    /// row): the denoised values, when the pipeline emits them.
    pub reconstruction: Option<Vec<f32>>,
    /// The model that scored it.
    pub model: Arc<Model>,
    /// When this record's score changed the pipeline's drift state.
    pub drift: Option<DriftChange>,
}

/// The `reason` of the resolution of an episode that lasted `rebaseline_after` points.
pub const REBASELINED: &str = "rebaselined";
/// The `reason` of the resolution of a firing key evicted to stay under `max_keys`.
pub const EVICTED: &str = "evicted";
/// The `reason` of a firing episode taken over with its partition's state.
pub const ADOPTED: &str = "adopted";
/// The `reason` of the resolution of a firing episode whose partition was revoked from a
/// pipeline without a state topic (nobody carries it on).
pub const REVOKED: &str = "revoked";

/// What [`Detector::forget_partitions`] dropped.
#[derive(Debug)]
pub struct Forgotten {
    pub keys: usize,
    /// The resolutions of the episodes that were firing, for a pipeline whose state does not
    /// follow its partitions to send (with a state topic, the next owner carries them on).
    pub resolved: Vec<AlertEvent>,
}

/// A key's episode in progress, for an event no record of the key triggered.
struct KeyEpisode {
    key: String,
    episode: crate::alert::Episode,
    threshold: f64,
    /// The partition of the key's records.
    source: Source,
}

impl KeyState {
    /// The episode of `key`, if it is firing.
    fn episode(&self, key: &str) -> Option<KeyEpisode> {
        self.alert.episode().map(|episode| KeyEpisode {
            key: key.to_string(),
            episode: episode.clone(),
            threshold: self.threshold.threshold(),
            source: self.source.clone(),
        })
    }
}

/// What a detector is built from: the detection settings of its pipeline's section
/// (`config::PipelineConfig::detector`), so that this module does not depend on the file's
/// layout.
#[derive(Debug, Clone)]
pub struct DetectorConfig {
    /// Record field names of the model's features, where they differ.
    pub field_map: BTreeMap<String, String>,
    pub key_field: String,
    pub timestamp_field: String,
    pub max_record_bytes: usize,
    /// Keys kept (least recently seen evicted beyond).
    pub max_keys: usize,
    pub threshold: ThresholdConfig,
    pub alert: AlertConfig,
    /// Whether scored records keep their reconstruction (for a denoised output).
    pub keep_reconstructions: bool,
    /// The drift detector on the pipeline's scores.
    pub drift: DriftConfig,
    /// What operators' false-alarm marks do to a key's threshold.
    pub feedback: FeedbackConfig,
}

/// Why a detector cannot be built for a model.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(
        "field_map: {unknown:?} are not features of model {path} (its features: {features:?})"
    )]
    UnknownFields {
        unknown: Vec<String>,
        path: String,
        features: Vec<String>,
    },
    #[error("field_map: features {first:?} and {second:?} of model {path} would both read record field {field:?}")]
    SharedField {
        first: String,
        second: String,
        field: String,
        path: String,
    },
    #[error(
        "{setting}: {field:?} is also the record field of feature {feature:?} of model {path}"
    )]
    KeyIsAFeature {
        setting: &'static str,
        field: String,
        feature: String,
        path: String,
    },
}

impl DetectorConfig {
    /// Checks that these settings fit `model`: every mapped feature is one of its features.
    pub fn fits(&self, model: &Model) -> Result<(), DetectorError> {
        let features = &model.contract.features;
        let unknown: Vec<String> = self
            .field_map
            .keys()
            .filter(|f| !features.contains(f))
            .cloned()
            .collect();
        let path = || model.path.display().to_string();
        if !unknown.is_empty() {
            return Err(DetectorError::UnknownFields {
                unknown,
                path: path(),
                features: features.clone(),
            });
        }
        let fields: Vec<(&String, &String)> = features
            .iter()
            .map(|f| (f, self.field_map.get(f).unwrap_or(f)))
            .collect();
        for (i, (feature, field)) in fields.iter().enumerate() {
            if let Some((first, _)) = fields[..i].iter().find(|(_, other)| other == field) {
                return Err(DetectorError::SharedField {
                    first: first.to_string(),
                    second: feature.to_string(),
                    field: field.to_string(),
                    path: path(),
                });
            }
            for (setting, value) in [
                ("key_field", &self.key_field),
                ("timestamp_field", &self.timestamp_field),
            ] {
                if value == *field {
                    return Err(DetectorError::KeyIsAFeature {
                        setting,
                        field: value.clone(),
                        feature: feature.to_string(),
                        path: path(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The detector of pipeline `name` serving `model`: the one build step that `run`, `score`,
    /// `check` and `demo` share.
    pub fn build(&self, name: &str, model: Arc<Model>) -> Result<Detector, DetectorError> {
        self.fits(&model)?;
        Ok(Detector::new(name, self, model))
    }
}

/// Per-pipeline detection state.
#[derive(Debug)]
pub struct Detector {
    pipeline: String,
    model: Arc<Model>,
    decoder: Decoder,
    alert: AlertConfig,
    threshold: ThresholdConfig,
    /// The warm-started threshold every new key is cloned from.
    template: Box<dyn Threshold>,
    /// Windows of sequence models and levels of baselined features (step 1).
    windows: LruCache<String, WindowState>,
    /// A record's row with its baselined features made relative (reused).
    row: Vec<f32>,
    /// Thresholds and alert states (step 3).
    keys: LruCache<String, KeyState>,
    evictions: u64,
    /// Whether scored records keep their reconstruction (for the denoised topic).
    keep_reconstructions: bool,
    /// Keys evicted since the last [`Detector::take_changes`], when changes are recorded.
    evicted: Option<Vec<(Source, String)>>,
    /// Whether the pipeline's scores have moved since the model started.
    drift: Drift,
    feedback: FeedbackConfig,
    /// Feedback on keys not here, by key: applied when the key's state appears.
    pending: HashMap<String, Vec<Feedback>>,
    /// What feedback did since the last [`Detector::take_feedback`].
    feedback_done: Vec<(Feedback, FeedbackOutcome)>,
}

/// Keys whose feedback waits for them at most (per pipeline).
const MAX_PENDING: usize = 10_000;

/// Marks a key's episodes with the feedback waiting for it.
fn apply_pending(
    waiting: Vec<Feedback>,
    state: &mut KeyState,
    cfg: &FeedbackConfig,
    done: &mut Vec<(Feedback, FeedbackOutcome)>,
) {
    for f in waiting {
        let outcome = state.alert.marks_mut().mark(f.started_offset, cfg);
        state.dirty = true;
        done.push((f, outcome));
    }
}

impl Detector {
    fn new(name: &str, cfg: &DetectorConfig, model: Arc<Model>) -> Detector {
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
        let cap = NonZeroUsize::new(cfg.max_keys.max(1)).expect("max_keys >= 1");
        Detector {
            pipeline: name.to_string(),
            template: cfg.threshold.build(&c.calibration),
            threshold: cfg.threshold.clone(),
            decoder,
            alert: cfg.alert,
            windows: LruCache::new(cap),
            row: Vec::new(),
            keys: LruCache::new(cap),
            evictions: 0,
            keep_reconstructions: cfg.keep_reconstructions,
            evicted: None,
            drift: Drift::new(cfg.drift),
            feedback: cfg.feedback.clone(),
            pending: HashMap::new(),
            feedback_done: Vec::new(),
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

    /// Swaps in a new model (a hot reload). It must read the same features with the same
    /// window, shape and baselined features, so that windows, levels and records stay valid (a
    /// new half-life or clip applies from the next record on); its errors are on a new scale,
    /// so every key's threshold restarts from the new calibration (alert states are kept, so a
    /// firing episode still resolves). Batches already prepared finish with the old model.
    pub fn set_model(&mut self, model: Arc<Model>) -> Result<(), String> {
        self.can_serve(&model)?;
        self.template = self.threshold.build(&model.contract.calibration);
        for (_, state) in self.keys.iter_mut() {
            state.threshold = self.template.clone();
            state.dirty = true;
        }
        self.model = model;
        self.drift.restart();
        Ok(())
    }

    /// Swaps in the model of `candidate`, a detector that scored the same records in the shadow
    /// of this one: as [`Detector::set_model`], except that each key takes the threshold the
    /// candidate learned for it on live traffic (keys it has not seen start from its
    /// calibration), so the swap brings no burst of alerts from thresholds starting afresh.
    pub fn promote(&mut self, mut candidate: Detector) -> Result<(), String> {
        self.can_serve(&candidate.model)?;
        self.template = candidate.template;
        for (key, state) in self.keys.iter_mut() {
            state.threshold = match candidate.keys.pop(key) {
                Some(learned) => learned.threshold,
                None => self.template.clone(),
            };
            state.dirty = true;
        }
        self.model = candidate.model;
        self.drift = candidate.drift;
        Ok(())
    }

    /// Whether `model` can take over from the running model without a restart.
    pub fn can_serve(&self, model: &Model) -> Result<(), String> {
        let (old, new) = (&self.model.contract, &model.contract);
        if (&old.features, old.window, &old.shape) != (&new.features, new.window, &new.shape) {
            return Err(format!(
                "it reads features {:?} with window {} (shape {:?}), the running model reads {:?} with window {} (shape {:?}); change those with a restart",
                new.features, new.window, new.shape, old.features, old.window, old.shape
            ));
        }
        if baselined(old) != baselined(new) {
            return Err(format!(
                "it measures {:?} from a per-key baseline, the running model {:?}; change that with a restart",
                baselined(new),
                baselined(old)
            ));
        }
        Ok(())
    }

    /// Keys currently tracked (every key seen has a window, for sequence models and baselines,
    /// or a threshold, or both).
    pub fn keys(&self) -> usize {
        self.keys.len().max(self.windows.len())
    }

    /// The drift detector on the pipeline's scores.
    pub fn drift(&self) -> &Drift {
        &self.drift
    }

    /// An operator's verdict on one of the pipeline's episodes (messages about other pipelines'
    /// episodes, on a shared feedback topic, are passed over). Applied to the key at once if it
    /// is here, else when its state appears; what it did comes out of [`Detector::take_feedback`].
    pub fn feedback(&mut self, f: Feedback) {
        if f.pipeline != self.pipeline {
            return;
        }
        let outcome = match self.keys.peek_mut(&f.key) {
            Some(state) => {
                state.dirty = true;
                state
                    .alert
                    .marks_mut()
                    .mark(f.started_offset, &self.feedback)
            }
            None if self.pending.len() < MAX_PENDING || self.pending.contains_key(&f.key) => {
                self.pending
                    .entry(f.key.clone())
                    .or_default()
                    .push(f.clone());
                FeedbackOutcome::Pending
            }
            None => FeedbackOutcome::Dropped,
        };
        self.feedback_done.push((f, outcome));
    }

    /// What feedback did since the last call, to log and count.
    pub fn take_feedback(&mut self) -> Vec<(Feedback, FeedbackOutcome)> {
        std::mem::take(&mut self.feedback_done)
    }

    /// Keys evicted so far to stay under `max_keys`.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Step 1: windows the records and collects the samples to infer.
    pub fn prepare(&mut self, records: impl IntoIterator<Item = (Origin, Record)>) -> Batch {
        let contract = &self.model.contract;
        let rows = input_rows(contract);
        let baseline = contract.baseline.as_ref();
        let features = contract.features.len();
        let mut batch = Batch {
            model: self.model.clone(),
            samples: Vec::new(),
            entries: Vec::new(),
        };
        let mut n = 0;
        for (origin, record) in records {
            let mut levels = None;
            let ready = match rows {
                None => {
                    batch.samples.extend_from_slice(&record.values);
                    true
                }
                Some(t) => {
                    // Evictions are counted once, on the threshold map, which every key has.
                    let w =
                        self.windows
                            .get_or_insert_mut_ref(record.key.as_str(), || WindowState {
                                ring: Ring::new(t, features),
                                level: baseline.map(Baseline::start),
                                source: Source::of(&origin),
                                dirty: false,
                            });
                    w.dirty = true;
                    match (baseline, &mut w.level) {
                        (Some(b), Some(level)) => {
                            self.row.clear();
                            self.row.extend_from_slice(&record.values);
                            b.apply(level, &mut self.row);
                            let subtracted = record.values.iter().zip(&self.row);
                            levels = Some(subtracted.map(|(v, x)| v - x).collect());
                            w.ring.push(&self.row, &mut batch.samples)
                        }
                        _ => w.ring.push(&record.values, &mut batch.samples),
                    }
                }
            };
            let sample = ready.then(|| {
                n += 1;
                n - 1
            });
            batch.entries.push(Entry {
                origin,
                record,
                sample,
                levels,
            });
        }
        batch
    }

    /// Returns the key's threshold and alert state, creating it (and evicting the least recent
    /// key if full): one hash lookup for a known key. Also returns the key evicted, if it was
    /// firing, with its episode and last threshold.
    fn state(&mut self, key: &str, origin: &Origin) -> (&mut KeyState, Option<KeyEpisode>) {
        let known = self.keys.contains(key);
        let full = self.keys.len() == self.keys.cap().get() && !known;
        // Who goes if this key is new: a key flood, not the steady state.
        let mut evicted = None;
        if full {
            if let Some((gone, s)) = self.keys.peek_lru() {
                if let Some(recorded) = &mut self.evicted {
                    recorded.push((s.source.clone(), gone.clone()));
                }
                evicted = s.episode(gone);
            }
            self.evictions += 1;
        }
        let template = &self.template;
        let state = self.keys.get_or_insert_mut_ref(key, || KeyState {
            threshold: template.clone(),
            alert: AlertState::default(),
            episode_scores: VecDeque::new(),
            source: Source::of(origin),
            dirty: false,
        });
        state.dirty = true;
        if !known {
            if let Some(waiting) = self.pending.remove(key) {
                apply_pending(waiting, state, &self.feedback, &mut self.feedback_done);
            }
        }
        (state, evicted)
    }

    /// Step 3: scores, judges and alerts, in record order.
    pub fn judge(&mut self, batch: Batch, inference: &Inference) -> Vec<Outcome> {
        let model = batch.model;
        let c = &model.contract;
        let alert_cfg = self.alert;
        // A rebaselined key's threshold is calibrated on the second half of its episode: the
        // new level, without the shift into it.
        let relearn_from = alert_cfg
            .rebaseline_after
            .points()
            .map(|n| n.div_ceil(2) as usize);
        let threshold_cfg = self.threshold.clone();
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
                    timestamp: entry.record.timestamp,
                });
                continue;
            };
            let errors = &inference.errors[i * f..(i + 1) * f];
            let score = errors.iter().map(|&e| e as f64).sum::<f64>() / f as f64;
            if !score.is_finite() {
                out.push(Outcome::NonFinite {
                    origin: entry.origin,
                    record: entry.record,
                });
                continue;
            }
            // The reconstruction of the sample's last row: the record's own values.
            let last = (i + 1) * per_sample - row_len..(i + 1) * per_sample;
            let mut reconstruction = Cow::Borrowed(&inference.reconstructions[last]);
            if let Some(levels) = &entry.levels {
                // The model saw baselined values relative to the key's level: what it expects
                // of the record is the level plus the reconstruction.
                let shifted = levels.iter().zip(reconstruction.iter());
                reconstruction = Cow::Owned(shifted.map(|(l, r)| l + r).collect());
            }
            let top = Top::of(errors);
            // Built only for an event: most records make none, and its topic is a new String.
            let source = || SourceRef {
                topic: entry.origin.topic.to_string(),
                partition: entry.origin.partition,
                offset: entry.origin.offset,
            };
            let (state, evicted) = self.state(&entry.record.key, &entry.origin);
            let verdict = state
                .alert
                .marks()
                .judge(state.threshold.judge(score), score);
            let transition = state.alert.observe(
                &alert_cfg,
                verdict.is_anomaly,
                score,
                verdict.anomaly_score,
                entry.record.timestamp.as_deref(),
                entry.origin.offset,
            );
            let rebaselined = matches!(transition, Some(Transition::Rebaselined(_)));
            if let Some(keep) = relearn_from {
                let scores = &mut state.episode_scores;
                if state.alert.is_firing() || rebaselined {
                    if scores.len() == keep {
                        scores.pop_front();
                    }
                    scores.push_back(score);
                } else {
                    scores.clear();
                }
            }
            if rebaselined {
                // The new level is the key's normal from now on: its threshold learns it from
                // the episode's scores, and its baselined levels restart from the next record.
                let scores = std::mem::take(&mut state.episode_scores);
                state.threshold = threshold_cfg.build(&Calibration::of_scores(scores.into()));
                if let (Some(w), Some(b)) = (
                    self.windows.peek_mut(&entry.record.key),
                    c.baseline.as_ref(),
                ) {
                    w.level = Some(b.start());
                }
            }
            let evicted = evicted.map(|gone| {
                Box::new(self.episode_event(EventKind::Resolved, gone, Some(source()), EVICTED))
            });
            let event = transition.map(|t| {
                let (kind, episode, reason) = match t {
                    Transition::Fired(e) => (EventKind::Firing, e, None),
                    Transition::Resolved(e) => (EventKind::Resolved, e, None),
                    Transition::Rebaselined(e) => (EventKind::Resolved, e, Some(REBASELINED)),
                };
                let image = c.shape.is_some();
                Box::new(AlertEvent {
                    event: kind,
                    pipeline: self.pipeline.clone(),
                    key: entry.record.key.clone(),
                    timestamp: entry.record.timestamp.clone(),
                    score,
                    threshold: verdict.threshold,
                    anomaly_score: verdict.anomaly_score,
                    severity: episode.severity,
                    top_features: top
                        .iter()
                        .map(|i| FeatureError {
                            name: c.features[i].clone(),
                            error: errors[i] as f64,
                            // Images have no single value per channel to show.
                            value: (!image).then(|| entry.record.values[i] as f64),
                            expected: (!image).then(|| reconstruction[i] as f64),
                        })
                        .collect(),
                    model: model_ref.clone(),
                    source: source(),
                    episode,
                    reason,
                })
            });
            out.push(Outcome::Scored(Box::new(Scored {
                origin: entry.origin,
                key: entry.record.key,
                timestamp: entry.record.timestamp,
                score,
                verdict,
                top,
                event,
                evicted,
                reconstruction: self.keep_reconstructions.then(|| reconstruction.to_vec()),
                model: model.clone(),
                drift: self.drift.observe(score),
            })));
        }
        out
    }

    /// Drops the state of every key seen on the given partitions (they were revoked: their next
    /// owner restores it from the state topic, or rebuilds it).
    pub fn forget_partitions(&mut self, partitions: &[(String, i32)]) -> Forgotten {
        let mut doomed: std::collections::BTreeSet<String> = self
            .keys
            .iter()
            .filter(|(_, s)| s.source.is_in(partitions))
            .map(|(k, _)| k.clone())
            .collect();
        doomed.extend(
            self.windows
                .iter()
                .filter(|(_, w)| w.source.is_in(partitions))
                .map(|(k, _)| k.clone()),
        );
        let mut resolved = Vec::new();
        for k in &doomed {
            self.windows.pop(k);
            let Some(s) = self.keys.pop(k) else { continue };
            if let Some(firing) = s.episode(k) {
                resolved.push(self.episode_event(EventKind::Resolved, firing, None, REVOKED));
            }
        }
        Forgotten {
            keys: doomed.len(),
            resolved,
        }
    }

    /// From now on, remember which keys change, for [`Detector::take_changes`].
    pub fn record_changes(&mut self) {
        self.evicted.get_or_insert_with(Vec::new);
    }

    /// The keys changed (their new state) or evicted (a tombstone) since the last call, in
    /// key order per partition. Only when [`Detector::record_changes`] is on.
    pub fn take_changes(&mut self) -> Vec<Change> {
        if self.evicted.is_none() {
            return Vec::new();
        }
        let (model, method) = (self.identity(), self.threshold.method().to_string());
        let mut changed: BTreeMap<&str, KeySnapshot> = BTreeMap::new();
        for (key, w) in self.windows.iter_mut().filter(|(_, w)| w.dirty) {
            w.dirty = false;
            changed.insert(
                key,
                KeySnapshot {
                    key: key.clone(),
                    topic: w.source.topic.to_string(),
                    partition: w.source.partition,
                    window: Some(w.ring.clone()),
                    level: w.level.clone(),
                    threshold: None,
                    alert: None,
                },
            );
        }
        for (key, state) in self.keys.iter_mut().filter(|(_, s)| s.dirty) {
            state.dirty = false;
            let snapshot = changed.entry(key).or_insert_with(|| KeySnapshot {
                key: key.clone(),
                topic: state.source.topic.to_string(),
                partition: state.source.partition,
                window: None,
                level: None,
                threshold: None,
                alert: None,
            });
            snapshot.threshold = Some(state.threshold.snapshot());
            snapshot.alert = Some(state.alert.clone());
        }
        let evicted = self
            .evicted
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut changes: Vec<Change> = evicted
            .into_iter()
            .map(|(source, key)| Change {
                topic: source.topic,
                partition: source.partition,
                key,
                state: None,
            })
            .collect();
        changes.extend(changed.into_values().map(|snapshot| Change {
            topic: Arc::from(snapshot.topic.as_str()),
            partition: snapshot.partition,
            key: snapshot.key.clone(),
            state: Some(StateRecord {
                model: model.clone(),
                method: method.clone(),
                state: snapshot,
            }),
        }));
        changes
    }

    fn identity(&self) -> ModelIdentity {
        let c = &self.model.contract;
        ModelIdentity {
            name: c.name.clone(),
            version: c.version.clone(),
            features: c.features.clone(),
            window: c.window,
            baseline: baselined(c).to_vec(),
        }
    }

    /// What of a key's state learned under `model` and `method` can be restored under the
    /// running model and method: everything for the same model and method; the window and the
    /// alert state for another version of it (its scores are on another scale) or another
    /// method; nothing for a model reading other features. Returns (keep the window and alert
    /// state, keep the threshold) and why not everything.
    fn restorable(&self, model: &ModelIdentity, method: &str) -> (bool, bool, Option<String>) {
        let me = self.identity();
        if (model.features.as_slice(), model.window) != (me.features.as_slice(), me.window) {
            return (false, false, Some(format!("it was learned with a model reading {:?} over {} rows; the running one reads {:?} over {}", model.features, model.window, me.features, me.window)));
        }
        if model.baseline != me.baseline {
            return (false, false, Some(format!("it was learned with a model measuring {:?} from a per-key baseline; the running one measures {:?}", model.baseline, me.baseline)));
        }
        if (model.name.as_str(), model.version.as_str()) != (me.name.as_str(), me.version.as_str())
        {
            return (
                true,
                false,
                Some(format!(
                    "it was learned with model {} {}; thresholds restart from {} {}'s calibration",
                    model.name, model.version, me.name, me.version
                )),
            );
        }
        if method != self.threshold.method() {
            return (
                true,
                false,
                Some(format!(
                    "it holds {method} thresholds; the pipeline now uses {}",
                    self.threshold.method()
                )),
            );
        }
        (true, true, None)
    }

    /// Restores keys' states (see [`Detector::restorable`] for what of each is kept).
    pub fn restore(&mut self, records: Vec<StateRecord>) -> Restored {
        let c = &self.model.contract;
        let (rows, features) = (input_rows(c), c.features.len());
        let baseline = c.baseline.clone();
        let mut done = Restored::default();
        for r in records {
            let (usable, thresholds, why) = self.restorable(&r.model, &r.method);
            if let Some(why) = why {
                done.partly = Some(why);
            }
            if !usable {
                continue;
            }
            let k = r.state;
            let source = Source {
                topic: Arc::from(k.topic.as_str()),
                partition: k.partition,
            };
            let ring = k
                .window
                .filter(|r| rows.is_some_and(|t| r.fits(t, features)));
            let level = match (&baseline, k.level) {
                (None, _) => Some(None),
                (Some(b), Some(level)) if b.fits(&level) => Some(Some(level)),
                _ => None,
            };
            if let (Some(ring), Some(level)) = (ring, level) {
                let w = WindowState {
                    ring,
                    level,
                    source: source.clone(),
                    dirty: false,
                };
                let _ = self.windows.push(k.key.clone(), w);
            }
            if k.threshold.is_some() || k.alert.is_some() {
                let mut threshold = self.template.clone();
                if let (true, Some(state)) = (thresholds, &k.threshold) {
                    if !threshold.restore(state) {
                        threshold = self.template.clone();
                    }
                }
                let state = KeyState {
                    threshold,
                    alert: k.alert.unwrap_or_default(),
                    episode_scores: VecDeque::new(),
                    source,
                    dirty: false,
                };
                if let Some(firing) = state.episode(&k.key) {
                    let event = self.episode_event(EventKind::Firing, firing, None, ADOPTED);
                    done.firing.push(event);
                }
                let key = k.key.clone();
                if let Some((gone_key, gone)) = self.keys.push(k.key, state) {
                    if gone_key != key {
                        self.evicted_to_restore(gone_key, gone, &mut done);
                    }
                }
                if let (Some(waiting), Some(state)) =
                    (self.pending.remove(&key), self.keys.peek_mut(&key))
                {
                    apply_pending(waiting, state, &self.feedback, &mut self.feedback_done);
                }
            }
            done.keys += 1;
        }
        done
    }

    /// A key evicted to make room for a restored one: counted, tombstoned like any eviction, and
    /// its episode, if firing, resolved.
    fn evicted_to_restore(&mut self, key: String, gone: KeyState, done: &mut Restored) {
        self.evictions += 1;
        if let Some(recorded) = &mut self.evicted {
            recorded.push((gone.source.clone(), key.clone()));
        }
        if let Some(firing) = gone.episode(&key) {
            let event = self.episode_event(EventKind::Resolved, firing, None, EVICTED);
            done.evicted.push(event);
        }
    }

    /// An event about a key's episode that no record of the key triggered (an eviction, a
    /// handover): the episode's peaks stand for the scores, and no features are named. Its
    /// `source` is the record that caused it, if one did, else the key's partition at offset −1.
    fn episode_event(
        &self,
        kind: EventKind,
        gone: KeyEpisode,
        source: Option<SourceRef>,
        reason: &'static str,
    ) -> AlertEvent {
        let c = &self.model.contract;
        AlertEvent {
            event: kind,
            pipeline: self.pipeline.clone(),
            key: gone.key,
            timestamp: None,
            score: gone.episode.max_score,
            threshold: gone.threshold,
            anomaly_score: gone.episode.max_anomaly_score,
            severity: gone.episode.severity,
            top_features: Vec::new(),
            model: ModelRef {
                name: c.name.clone(),
                version: c.version.clone(),
            },
            source: source.unwrap_or_else(|| SourceRef {
                topic: gone.source.topic.to_string(),
                partition: gone.source.partition,
                offset: -1,
            }),
            episode: gone.episode,
            reason: Some(reason),
        }
    }

    /// Number of keys currently firing.
    pub fn firing(&self) -> usize {
        self.keys
            .iter()
            .filter(|(_, s)| s.alert.is_firing())
            .count()
    }
}

/// Rows of a key's input state: the window of a sequence model, one row for a point model with a
/// baseline; `None` when the model keeps no input state per key.
fn input_rows(c: &Contract) -> Option<usize> {
    if c.is_sequence() {
        Some(c.window)
    } else {
        c.baseline.as_ref().map(|_| 1)
    }
}

/// The features a model measures from a per-key baseline.
fn baselined(c: &Contract) -> &[String] {
    c.baseline.as_ref().map_or(&[], |b| b.features.as_slice())
}

/// What [`Detector::restore`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    /// Keys restored (in part or whole).
    pub keys: usize,
    /// Why some state was restored only in part, or not at all.
    pub partly: Option<String>,
    /// The episodes firing in the restored state (`reason` `adopted`), for the Alertmanager
    /// sink to keep pushing: the previous owner stopped when the partition was revoked.
    pub firing: Vec<AlertEvent>,
    /// The resolutions (`reason` `evicted`) of firing keys evicted to make room for restored
    /// ones, beyond `max_keys`.
    pub evicted: Vec<AlertEvent>,
}

/// The `TOP_FEATURES` features with the largest error, largest first, as indices into the
/// model's features: a fixed-size value, so scoring a record allocates nothing for it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Top {
    idx: [u16; TOP_FEATURES],
    len: u8,
}

impl Top {
    pub fn of(errors: &[f32]) -> Top {
        let mut top = Top::default();
        for (i, e) in errors.iter().enumerate() {
            // Insertion into the short sorted list; ties keep the earlier feature first.
            let len = top.len as usize;
            let at = (0..len)
                .find(|&j| errors[top.idx[j] as usize] < *e)
                .unwrap_or(len);
            if at >= TOP_FEATURES {
                continue;
            }
            let end = len.min(TOP_FEATURES - 1);
            top.idx.copy_within(at..end, at + 1);
            top.idx[at] = i as u16;
            top.len = (len + 1).min(TOP_FEATURES) as u8;
        }
        top
    }

    /// Feature indices, largest error first.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.idx[..self.len as usize].iter().map(|&i| i as usize)
    }

    /// Their names, given the model's features.
    pub fn names<'a>(&'a self, features: &'a [String]) -> impl Iterator<Item = &'a str> + 'a {
        self.iter().map(|i| features[i].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn detector(model: &str, max_keys: usize) -> Detector {
        let toml = format!(
            "[pipelines.p]\ntopics = [\"in\"]\nmodel = \"{}/models/{model}\"\nkey_field = \"host\"\nmax_keys = {max_keys}\n",
            env!("CARGO_MANIFEST_DIR")
        );
        let cfg = Config::from_toml(&toml, Some(Default::default())).unwrap();
        let p = &cfg.pipelines["p"];
        p.detector()
            .build("p", Arc::new(Model::load(&p.model).unwrap()))
            .unwrap()
    }

    fn record(key: &str, values: Vec<f32>) -> (Origin, Record) {
        (
            Origin {
                topic: Arc::from("in"),
                partition: 0,
                offset: 0,
            },
            Record {
                key: key.into(),
                timestamp: None,
                values,
            },
        )
    }

    fn run(d: &mut Detector, records: Vec<(Origin, Record)>) -> Vec<Outcome> {
        let mut batch = d.prepare(records);
        let samples = std::mem::take(&mut batch.samples);
        let inference = batch.model.infer(&samples, batch.sample_count()).unwrap();
        d.judge(batch, &inference)
    }

    const NORMAL: [f32; 4] = [50.0, 300.0, 35.0, 30.0];
    /// Far from anything the demo model saw: three in a row fire the key.
    const WILD: [f32; 4] = [5000.0, 30.0, 99.0, 0.0];

    /// The states a detector recorded since the last take (tombstones left out).
    fn states_of(d: &mut Detector) -> Vec<StateRecord> {
        d.take_changes()
            .into_iter()
            .filter_map(|c| c.state)
            .collect()
    }

    /// Issue 10, finding 11 (field mapping): two features reading one field, or the key or
    /// timestamp field being a feature's, made every JSON record a dead letter and every CSV
    /// row garbage; they are refused with the detector's settings, wherever it is built.
    #[test]
    fn field_mappings_that_cannot_work_are_refused() {
        let model = Arc::new(
            Model::load(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-dense.onnx"),
            )
            .unwrap(),
        );
        let features = model.contract.features.clone();
        let base = || {
            let cfg = Config::from_toml(
                "[pipelines.p]\ntopics = [\"in\"]\nmodel = \"m.onnx\"\nkey_field = \"host\"\n",
                Some(Default::default()),
            )
            .unwrap();
            cfg.pipelines["p"].detector()
        };
        assert!(base().fits(&model).is_ok());
        let mut shared = base();
        shared
            .field_map
            .insert(features[0].clone(), features[1].clone());
        assert!(matches!(
            shared.fits(&model),
            Err(DetectorError::SharedField { .. })
        ));
        let mut key = base();
        key.key_field = features[2].clone();
        assert!(matches!(
            key.fits(&model),
            Err(DetectorError::KeyIsAFeature {
                setting: "key_field",
                ..
            })
        ));
        let mut ts = base();
        ts.field_map.insert(features[0].clone(), "ts".into());
        assert!(matches!(
            ts.build("p", model.clone()),
            Err(DetectorError::KeyIsAFeature {
                setting: "timestamp_field",
                ..
            })
        ));
    }

    #[test]
    fn revoking_a_partition_drops_exactly_its_keys() {
        let mut d = detector("demo-lstm.onnx", 100);
        let mut recs = Vec::new();
        for (key, partition) in [("a", 0), ("b", 1), ("c", 1)] {
            let (mut origin, record) = record(key, NORMAL.to_vec());
            origin.partition = partition;
            recs.push((origin, record));
        }
        run(&mut d, recs);
        assert_eq!(d.forget_partitions(&[("in".into(), 1)]).keys, 2);
        assert_eq!(d.keys(), 1);
        assert_eq!((d.windows.len(), d.windows.contains("a")), (1, true));
    }

    #[test]
    fn keys_beyond_the_cap_evict_the_least_recent() {
        let mut d = detector("demo-dense.onnx", 3);
        let recs = ["a", "b", "c", "a", "d", "e"]
            .iter()
            .map(|k| record(k, NORMAL.to_vec()))
            .collect();
        run(&mut d, recs);
        // "b" and "c" were the least recently seen when "d" and "e" arrived.
        assert_eq!((d.keys(), d.evictions()), (3, 2));
    }

    /// Issue 10, finding 3: a firing key evicted by `max_keys` used to vanish without a
    /// resolution, so Alertmanager and the alerts topic kept it firing.
    #[test]
    fn evicting_a_firing_key_resolves_its_episode() {
        let mut d = detector("demo-dense.onnx", 2);
        let out = run(&mut d, (0..3).map(|_| record("a", WILD.to_vec())).collect());
        let fired: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Outcome::Scored(s) => s.event.clone(),
                _ => None,
            })
            .collect();
        assert_eq!(fired.len(), 1, "fires after the default 3 anomalous points");
        let out = run(
            &mut d,
            vec![record("b", NORMAL.to_vec()), record("c", NORMAL.to_vec())],
        );
        let Outcome::Scored(c) = &out[1] else {
            panic!("scored")
        };
        let resolved = c.evicted.as_ref().expect("c evicted the firing a");
        assert_eq!(
            (resolved.key.as_str(), resolved.event, resolved.reason),
            ("a", EventKind::Resolved, Some(EVICTED))
        );
        assert_eq!(resolved.severity, fired[0].severity);
        assert_eq!(
            resolved.episode, fired[0].episode,
            "the episode as it was when evicted"
        );
        let Outcome::Scored(b) = &out[0] else {
            panic!("scored")
        };
        assert!(b.evicted.is_none(), "b filled a free slot");
        assert_eq!(d.evictions(), 1);
    }

    #[test]
    fn changes_are_the_keys_touched_since_the_last_take_and_evicted_keys_become_tombstones() {
        let mut d = detector("demo-dense.onnx", 2);
        assert!(d.take_changes().is_empty(), "not recorded until asked");
        d.record_changes();
        run(
            &mut d,
            vec![record("a", NORMAL.to_vec()), record("b", NORMAL.to_vec())],
        );
        let keys = |c: &[Change]| -> Vec<(String, bool)> {
            c.iter()
                .map(|c| (c.key.clone(), c.state.is_some()))
                .collect()
        };
        let changes = d.take_changes();
        assert_eq!(keys(&changes), [("a".into(), true), ("b".into(), true)]);
        assert!(d.take_changes().is_empty(), "nothing changed since");
        // "c" evicts "a", the least recently seen.
        run(&mut d, vec![record("c", NORMAL.to_vec())]);
        assert_eq!(
            keys(&d.take_changes()),
            [("a".into(), false), ("c".into(), true)]
        );
    }

    /// The demo model, told that it measures latency from a per-key level (half-life 10,
    /// clip 5 ms): the detector's side of the baseline, whatever the model learned.
    fn baselined_detector() -> Detector {
        let mut d = detector("demo-dense.onnx", 10);
        let mut model = Model::load(&d.model().path).unwrap();
        let spec = crate::baseline::BaselineSpec {
            features: vec!["latency_ms".into()],
            half_life: 10.0,
            clip: vec![5.0],
        };
        model.contract.baseline = Some(Baseline::new(spec, &model.contract.features).unwrap());
        d.model = Arc::new(model);
        // The demo model fires on latency measured from a level: levels are under test here,
        // not what a long episode does to them.
        d.alert.rebaseline_after = crate::alert::Rebaseline::Never;
        d
    }

    fn scored(outcomes: Vec<Outcome>) -> Box<Scored> {
        match outcomes.into_iter().next() {
            Some(Outcome::Scored(s)) => s,
            other => panic!("not scored: {other:?}"),
        }
    }

    #[test]
    fn a_baselined_feature_is_judged_against_its_level_and_expected_in_raw_units() {
        let (mut d, mut plain) = (baselined_detector(), detector("demo-dense.onnx", 10));
        d.record_changes();
        d.keep_reconstructions = true;
        // Latency drifts up by 0.1 ms per record: once the level has caught up, the baselined
        // model sees the same input record after record, the plain one an ever larger latency.
        let at = |i: usize| [50.0, 300.0, 35.0 + 0.1 * i as f32, 30.0];
        let mut scores = (Vec::new(), Vec::new());
        for i in 0..400 {
            scores
                .0
                .push(scored(run(&mut d, vec![record("a", at(i).to_vec())])).score);
            scores
                .1
                .push(scored(run(&mut plain, vec![record("a", at(i).to_vec())])).score);
        }
        let ratio = |s: &[f64]| s[399] / s[100];
        assert!(
            (ratio(&scores.0) - 1.0).abs() < 0.01,
            "{}",
            ratio(&scores.0)
        );
        assert!(ratio(&scores.1) > 2.0, "{}", ratio(&scores.1));

        // The model saw latency less the key's level (which lags the drift by about
        // 0.1 / alpha); what is expected of the record is that level plus the reconstruction.
        let states = states_of(&mut d);
        assert!(
            states[0].state.level.is_some(),
            "the level is part of the key's state"
        );
        let mut batch = d.prepare(vec![record("a", at(400).to_vec())]);
        let input = std::mem::take(&mut batch.samples);
        let levels = batch.entries[0].levels.clone().unwrap();
        assert_eq!(levels[..2], [0.0, 0.0]);
        let lag = 0.1 / (1.0 - (-0.1f64).exp2());
        assert!((levels[2] as f64 - (75.0 - lag)).abs() < 0.01, "{levels:?}");
        let inference = batch.model.infer(&input, 1).unwrap();
        let s = scored(d.judge(batch, &inference));
        let expected = s.reconstruction.unwrap();
        assert_eq!(expected[2], levels[2] + inference.reconstructions[2]);
        assert_eq!(expected[0], inference.reconstructions[0]);

        // A detector restored from the state topic scores the next record exactly as the one
        // it was taken from; one restored without levels cannot, and re-warms.
        let next = || vec![record("a", at(401).to_vec())];
        let states = states_of(&mut d);
        let mut fresh = baselined_detector();
        fresh.restore(states.clone());
        let (a, b) = (scored(run(&mut d, next())), scored(run(&mut fresh, next())));
        assert_eq!(a.score, b.score);
        let mut without = states;
        without.iter_mut().for_each(|r| r.state.level = None);
        let mut rewarmed = baselined_detector();
        rewarmed.restore(without);
        assert!(
            matches!(run(&mut rewarmed, next())[0], Outcome::Scored(ref s) if s.score != a.score)
        );

        // A model measuring other features from a baseline is refused on reload.
        let e = d.set_model(plain.model().clone()).unwrap_err();
        assert!(e.contains("baseline"), "{e}");
    }

    /// Issue 12, item 4: an episode that outlasts `rebaseline_after` points resolves as
    /// `rebaselined`, and the key then judges the new level as normal (its threshold learned
    /// from the episode) while a further shift fires again; with `never` the episode goes on.
    #[test]
    fn a_level_that_outlasts_rebaseline_after_becomes_the_keys_normal_unless_never() {
        use crate::alert::Rebaseline;
        // CPU jumps from 50 to 90 and stays there, jittering (the demo model knows no jitter).
        let at = |i: usize, cpu: f32| {
            let jitter = if cpu == 50.0 {
                0.0
            } else {
                (i % 7) as f32 * 0.3
            };
            [cpu + jitter, 300.0, 35.0, 30.0]
        };
        let events = |d: &mut Detector, from: usize, to: usize, cpu: f32| {
            (from..to)
                .filter_map(|i| {
                    let s = scored(run(d, vec![record("a", at(i, cpu).to_vec())]));
                    s.event.map(|e| (i, e.event, e.reason))
                })
                .collect::<Vec<_>>()
        };
        let (mut accept, mut never) = (
            detector("demo-dense.onnx", 10),
            detector("demo-dense.onnx", 10),
        );
        accept.alert.rebaseline_after = Rebaseline::After(60);
        never.alert.rebaseline_after = Rebaseline::Never;
        for d in [&mut accept, &mut never] {
            assert_eq!(events(d, 0, 50, 50.0), [], "normal");
        }
        assert_eq!(
            events(&mut accept, 50, 400, 90.0),
            [
                (52, EventKind::Firing, None),
                (111, EventKind::Resolved, Some(REBASELINED))
            ],
            "fires after 3 points, accepts the level on the episode's 60th, quiet after"
        );
        assert_eq!(
            events(&mut never, 50, 400, 90.0),
            [(52, EventKind::Firing, None)]
        );
        let further = events(&mut accept, 400, 420, 500.0);
        assert_eq!(
            further.first().map(|e| e.1),
            Some(EventKind::Firing),
            "{further:?}"
        );
    }

    /// A rebaselined key's baselined levels restart: the record after the rebaseline is its own
    /// level (before, the level lagged a drifting latency).
    #[test]
    fn a_rebaseline_restarts_the_keys_levels() {
        let mut d = baselined_detector();
        d.alert.rebaseline_after = crate::alert::Rebaseline::After(20);
        let at = |i: usize| [50.0, 300.0, 35.0 + 0.1 * i as f32, 30.0];
        let level = |d: &mut Detector, i: usize| {
            let mut batch = d.prepare(vec![record("a", at(i).to_vec())]);
            let input = std::mem::take(&mut batch.samples);
            let latency_level = batch.entries[0].levels.as_ref().unwrap()[2];
            let inference = batch.model.infer(&input, 1).unwrap();
            (latency_level, scored(d.judge(batch, &inference)).event)
        };
        let mut rebaselined = None;
        for i in 0..200 {
            let (l, event) = level(&mut d, i);
            if let Some(r) = rebaselined {
                assert_eq!(l, at(i)[2], "record {i}, after the rebaseline at {r}");
                return;
            }
            assert!(i < 10 || l < at(i)[2] - 0.5, "record {i}: the level lags");
            if event.is_some_and(|e| e.reason == Some(REBASELINED)) {
                rebaselined = Some(i);
            }
        }
        panic!("never rebaselined");
    }

    /// Issue 12, item 2: a promoted candidate brings the thresholds it learned in the shadow
    /// (not its calibration's), and the serving detector's alert states stay.
    #[test]
    fn a_promoted_candidate_brings_the_thresholds_it_learned_and_keeps_the_alert_states() {
        let (mut serving, mut candidate) = (
            detector("demo-dense.onnx", 10),
            detector("demo-dense.onnx", 10),
        );
        let normal = |i: usize| {
            let mut v = NORMAL.to_vec();
            v[0] += (i % 5) as f32;
            record("b", v)
        };
        for i in 0..40 {
            run(&mut serving, vec![normal(i)]);
            run(&mut candidate, vec![normal(i)]);
        }
        run(
            &mut serving,
            (0..3).map(|_| record("a", WILD.to_vec())).collect(),
        );
        assert_eq!(serving.firing(), 1);
        let learned = candidate.keys.peek("b").unwrap().threshold.snapshot();
        let fresh = candidate.template.snapshot();
        assert_ne!(
            learned, fresh,
            "40 records moved the candidate's threshold for b"
        );
        serving.promote(candidate).unwrap();
        assert_eq!(
            serving.keys.peek("b").unwrap().threshold.snapshot(),
            learned
        );
        assert_eq!(serving.keys.peek("a").unwrap().threshold.snapshot(), fresh);
        assert_eq!(
            serving.firing(),
            1,
            "a still fires: its episode resolves as usual"
        );
        // A candidate that cannot take over is refused, as a reload would be.
        let lstm = detector("demo-lstm.onnx", 10);
        assert!(serving.promote(lstm).unwrap_err().contains("window"));
    }

    #[test]
    fn a_restored_key_judges_as_the_key_it_was_taken_from() {
        let mut learned = detector("demo-dense.onnx", 10);
        learned.record_changes();
        let mut spiky = NORMAL;
        for i in 0..300 {
            spiky[0] = 50.0 + (i % 7) as f32 * 3.0;
            run(&mut learned, vec![record("a", spiky.to_vec())]);
        }
        let states = states_of(&mut learned);
        let mut fresh = detector("demo-dense.onnx", 10);
        assert_eq!(fresh.restore(states).keys, 1);
        let mut cold = detector("demo-dense.onnx", 10);
        let next = || vec![record("a", [80.0, 300.0, 35.0, 30.0].to_vec())];
        let verdict = |d: &mut Detector| match run(d, next()).pop() {
            Some(Outcome::Scored(s)) => s.verdict.threshold,
            other => panic!("not scored: {other:?}"),
        };
        let (l, f, c) = (
            verdict(&mut learned),
            verdict(&mut fresh),
            verdict(&mut cold),
        );
        assert_eq!(l, f, "the restored threshold is the learned one");
        assert_ne!(l, c, "and not the calibration's");
    }

    /// Feedback: a mark raises its key's threshold once (a resend changes nothing), waits for
    /// a key not here until it is seen or restored, goes with the key's state, and marks of
    /// another pipeline's episodes are passed over.
    #[test]
    fn a_false_alarm_mark_relaxes_its_key_once_wherever_the_key_turns_up() {
        use crate::feedback::{Feedback, FeedbackOutcome};
        let mark = |key: &str, pipeline: &str, started_offset: i64| Feedback {
            pipeline: pipeline.into(),
            key: key.into(),
            topic: "in".into(),
            partition: 0,
            started_offset,
            by: Some("alice".into()),
        };
        let threshold =
            |d: &mut Detector, key: &str| match run(d, vec![record(key, NORMAL.to_vec())]).pop() {
                Some(Outcome::Scored(s)) => s.verdict.threshold,
                other => panic!("not scored: {other:?}"),
            };
        let outcomes = |d: &mut Detector| -> Vec<FeedbackOutcome> {
            d.take_feedback().into_iter().map(|(_, o)| o).collect()
        };
        let mut d = detector("demo-dense.onnx", 10);
        d.record_changes();
        let before = threshold(&mut d, "a");
        d.feedback(mark("a", "p", 7));
        d.feedback(mark("a", "p", 7));
        d.feedback(mark("a", "other", 8));
        assert_eq!(
            outcomes(&mut d),
            [
                FeedbackOutcome::Applied { relax: 0.1 },
                FeedbackOutcome::Duplicate
            ]
        );
        let after = threshold(&mut d, "a");
        assert!((after / before - 1.1).abs() < 1e-3, "{before} -> {after}");

        // A key not seen yet: the mark waits, then applies on its first record.
        d.feedback(mark("b", "p", 3));
        assert_eq!(outcomes(&mut d), [FeedbackOutcome::Pending]);
        let b = threshold(&mut d, "b");
        assert_eq!(outcomes(&mut d), [FeedbackOutcome::Applied { relax: 0.1 }]);
        assert!((b / before - 1.1).abs() < 1e-3, "{before} -> {b}");

        // The marks go with the key's state: restored elsewhere, it judges the same, and a mark
        // that waited there for the restore applies once, not twice.
        let states = states_of(&mut d);
        let mut other = detector("demo-dense.onnx", 10);
        other.feedback(mark("a", "p", 7));
        other.feedback(mark("a", "p", 9));
        assert_eq!(other.restore(states).keys, 2);
        assert_eq!(
            outcomes(&mut other),
            [
                FeedbackOutcome::Pending,
                FeedbackOutcome::Pending,
                FeedbackOutcome::Duplicate,
                FeedbackOutcome::Applied { relax: 0.2 }
            ]
        );
        let moved = threshold(&mut other, "a");
        assert!((moved / before - 1.2).abs() < 2e-3, "{before} -> {moved}");
    }

    /// Issue 10, finding 3: a firing key dropped on revoke never resolved. Its resolution now
    /// comes with the drop, for a pipeline without a state topic to send.
    #[test]
    fn forgetting_a_firing_key_resolves_its_episode() {
        let mut d = detector("demo-dense.onnx", 10);
        let mut on_1 = record("a", WILD.to_vec());
        on_1.0.partition = 1;
        run(&mut d, vec![on_1.clone(), on_1.clone(), on_1]);
        run(&mut d, (0..3).map(|_| record("b", WILD.to_vec())).collect());
        assert_eq!(d.firing(), 2);
        let gone = d.forget_partitions(&[("in".into(), 1)]);
        assert_eq!(gone.keys, 1);
        let resolved: Vec<_> = gone
            .resolved
            .iter()
            .map(|e| (e.key.as_str(), e.event, e.reason, e.source.partition))
            .collect();
        assert_eq!(resolved, [("a", EventKind::Resolved, Some(REVOKED), 1)]);
        assert_eq!(d.firing(), 1, "b, on partition 0, fires on");
    }

    /// Issue 10, finding 3: the next owner of a partition takes its firing episodes over, so
    /// that its Alertmanager sink keeps them alive until they resolve.
    #[test]
    fn a_restored_firing_episode_is_adopted() {
        let mut old = detector("demo-dense.onnx", 10);
        old.record_changes();
        run(
            &mut old,
            (0..3).map(|_| record("a", WILD.to_vec())).collect(),
        );
        run(&mut old, vec![record("b", NORMAL.to_vec())]);
        let states = states_of(&mut old);
        let restored = detector("demo-dense.onnx", 10).restore(states);
        assert_eq!(restored.keys, 2);
        let keys: Vec<_> = restored
            .firing
            .iter()
            .map(|e| (e.key.as_str(), e.event, e.reason))
            .collect();
        assert_eq!(keys, [("a", EventKind::Firing, Some(ADOPTED))]);
    }

    /// A firing key evicted to make room for restored ones (more keys than `max_keys` after a
    /// rebalance) resolves, like any eviction, instead of vanishing.
    #[test]
    fn a_firing_key_evicted_by_a_restore_resolves() {
        let mut old = detector("demo-dense.onnx", 10);
        old.record_changes();
        run(
            &mut old,
            vec![record("x", NORMAL.to_vec()), record("y", NORMAL.to_vec())],
        );
        let states = states_of(&mut old);
        let mut d = detector("demo-dense.onnx", 2);
        run(&mut d, (0..3).map(|_| record("a", WILD.to_vec())).collect());
        let restored = d.restore(states);
        let evicted: Vec<_> = restored
            .evicted
            .iter()
            .map(|e| (e.key.as_str(), e.event, e.reason))
            .collect();
        assert_eq!(evicted, [("a", EventKind::Resolved, Some(EVICTED))]);
        assert_eq!((d.keys(), d.evictions()), (2, 1));
    }

    #[test]
    fn a_record_without_a_finite_score_is_not_judged_and_leaves_its_key_as_it_was() {
        let threshold_after = |extreme: bool| {
            let mut d = detector("demo-dense.onnx", 10);
            let mut recs: Vec<_> = (0..50).map(|_| record("a", NORMAL.to_vec())).collect();
            if extreme {
                recs.push(record("a", vec![3.0e38, -3.0e38, 3.0e38, 3.0e38]));
            }
            let outcomes = run(&mut d, recs);
            if extreme {
                assert!(
                    matches!(outcomes.last(), Some(Outcome::NonFinite { .. })),
                    "{:?}",
                    outcomes.last()
                );
            }
            match run(&mut d, vec![record("a", NORMAL.to_vec())]).pop() {
                Some(Outcome::Scored(s)) => (s.verdict.threshold, s.score),
                other => panic!("not scored: {other:?}"),
            }
        };
        let (with, without) = (threshold_after(true), threshold_after(false));
        assert!(with.0.is_finite() && with.1.is_finite());
        assert_eq!(with, without);
    }

    #[test]
    fn a_sequence_model_warms_up_per_key_then_scores_every_row() {
        let mut d = detector("demo-lstm.onnx", 100);
        let window = d.model().contract.window;
        assert!(window > 1);
        let recs = (0..window + 2)
            .flat_map(|_| [record("a", NORMAL.to_vec()), record("b", NORMAL.to_vec())])
            .collect();
        let outcomes = run(&mut d, recs);
        let scored: Vec<bool> = outcomes
            .iter()
            .map(|o| matches!(o, Outcome::Scored(_)))
            .collect();
        // Each key's first window-1 rows only fill its window.
        let warming = scored.iter().filter(|s| !**s).count();
        assert_eq!(warming, 2 * (window - 1));
        assert!(scored[2 * (window - 1)..].iter().all(|s| *s));
    }

    #[test]
    fn scores_are_the_mean_error_and_the_top_feature_is_the_broken_one() {
        let mut d = detector("demo-dense.onnx", 10);
        let mut spiked = NORMAL.to_vec();
        spiked[2] *= 6.0; // latency
        let out = run(
            &mut d,
            vec![record("a", NORMAL.to_vec()), record("a", spiked)],
        );
        let Outcome::Scored(normal) = &out[0] else {
            panic!()
        };
        let Outcome::Scored(spike) = &out[1] else {
            panic!()
        };
        assert!(
            spike.score > 10.0 * normal.score,
            "{} vs {}",
            spike.score,
            normal.score
        );
        let names = &d.model().contract.features;
        assert_eq!(names[spike.top.iter().next().unwrap()], "latency_ms");
        assert!(spike.verdict.is_anomaly && !normal.verdict.is_anomaly);
    }

    #[test]
    fn top_keeps_the_largest_errors_in_order() {
        let t = Top::of(&[0.5, 3.0, 0.1, 2.0, 3.0, 0.7]);
        assert_eq!(t.iter().collect::<Vec<_>>(), [1, 4, 3]);
        assert_eq!(Top::of(&[1.0, 2.0]).iter().collect::<Vec<_>>(), [1, 0]);
        assert_eq!(Top::of(&[]).iter().count(), 0);
    }
}
