//! Shadow evaluation: a candidate model scored on live traffic beside the serving one, without
//! alerting, then promoted or refused by one stated rule.
//!
//! The rule compares the two models' verdicts on the same records, so it needs no labels:
//! - **no new noise**: among the records the serving model judged normal, the candidate flags at
//!   most `max_new_anomalies` of them (a candidate that alarms where the serving model is quiet
//!   would page people for nothing);
//! - **no lost detections**: among the records the serving model flagged, the candidate flags
//!   at least `min_kept_anomalies` of them (a candidate that learned an ongoing fault as normal
//!   would silence it). An episode the pipeline accepted as a new level (`rebaseline_after`)
//!   stops being flagged by the serving model too, so a candidate trained on that level passes;
//!   with `rebaseline_after = "never"`, a candidate that silences the level is refused.
//!   Judged only when the serving model flagged enough records to say anything.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::decode::Record;
use crate::detect::{Batch, Detector, Origin, Outcome};
use crate::model::{Inference, Model};

/// `[pipelines.NAME.promotion]`: when a candidate model replaces the serving one.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionConfig {
    /// Records both models must have scored before the candidate is judged.
    #[serde(default = "default_records")]
    pub records: u64,
    /// Most the candidate may flag of the records the serving model judged normal.
    #[serde(default = "default_max_new_anomalies")]
    pub max_new_anomalies: f64,
    /// Least the candidate must flag of the records the serving model flagged.
    #[serde(default = "default_min_kept_anomalies")]
    pub min_kept_anomalies: f64,
}

fn default_records() -> u64 {
    10_000
}
fn default_max_new_anomalies() -> f64 {
    0.005
}
fn default_min_kept_anomalies() -> f64 {
    0.5
}

/// Fewest records flagged by the serving model for `min_kept_anomalies` to be judged: below it
/// one record more or less would swing the share by over 5%.
pub const MIN_FLAGGED: u64 = 20;

impl Default for PromotionConfig {
    fn default() -> Self {
        PromotionConfig {
            records: default_records(),
            max_new_anomalies: default_max_new_anomalies(),
            min_kept_anomalies: default_min_kept_anomalies(),
        }
    }
}

impl PromotionConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.records == 0 {
            out.push("records: must be at least 1".to_string());
        }
        for (field, v) in [
            ("max_new_anomalies", self.max_new_anomalies),
            ("min_kept_anomalies", self.min_kept_anomalies),
        ] {
            if !(0.0..=1.0).contains(&v) {
                out.push(format!("{field}: must be a share in [0, 1], found {v}"));
            }
        }
        out
    }
}

/// The two models' verdicts on the records both scored, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Comparison {
    pub records: u64,
    /// Records the serving model flagged.
    pub serving_flagged: u64,
    /// Of those, the ones the candidate flagged too.
    pub kept: u64,
    /// Records the serving model judged normal that the candidate flagged.
    pub new: u64,
}

/// What the rule says once enough records were compared.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Promote,
    /// Why not: the setting that refused it, or what failed.
    Refuse(String),
}

impl Comparison {
    /// Counts one record that both models scored.
    pub fn observe(&mut self, serving_anomalous: bool, candidate_anomalous: bool) {
        self.records += 1;
        if serving_anomalous {
            self.serving_flagged += 1;
            self.kept += u64::from(candidate_anomalous);
        } else {
            self.new += u64::from(candidate_anomalous);
        }
    }

    /// Share of the records the serving model judged normal that the candidate flagged.
    pub fn new_share(&self) -> f64 {
        self.new as f64 / (self.records - self.serving_flagged).max(1) as f64
    }

    /// Share of the records the serving model flagged that the candidate flagged too (1 when it
    /// flagged none).
    pub fn kept_share(&self) -> f64 {
        if self.serving_flagged == 0 {
            return 1.0;
        }
        self.kept as f64 / self.serving_flagged as f64
    }

    /// The figures the rule judged, for a log line.
    pub fn describe(&self) -> String {
        format!(
            "after {} records (new anomalies {:.4}, kept anomalies {:.4})",
            self.records,
            self.new_share(),
            self.kept_share()
        )
    }

    /// The rule, once `cfg.records` were compared; `None` before.
    pub fn decide(&self, cfg: &PromotionConfig) -> Option<Decision> {
        if self.records < cfg.records {
            return None;
        }
        Some(if self.new_share() > cfg.max_new_anomalies {
            Decision::Refuse("it flags more of what the serving model judged normal than promotion.max_new_anomalies allows".into())
        } else if self.serving_flagged >= MIN_FLAGGED && self.kept_share() < cfg.min_kept_anomalies
        {
            Decision::Refuse("it flags less of what the serving model flagged than promotion.min_kept_anomalies asks".into())
        } else {
            Decision::Promote
        })
    }
}

/// A candidate in the shadow of a serving detector: its own detector (windows and thresholds
/// learned on the same records, its alerts never sent) and the verdicts compared so far. The
/// daemon and `anomalyd score --candidate` drive it alike.
#[derive(Debug)]
pub struct Shadow {
    detector: Detector,
    comparison: Comparison,
}

impl Shadow {
    /// The shadow of `serving` for `candidate`, built by the same detector settings; refused
    /// when the candidate could not take over without a restart.
    pub fn new(serving: &Detector, candidate: Detector) -> Result<Shadow, String> {
        serving.can_serve(candidate.model())?;
        Ok(Shadow {
            detector: candidate,
            comparison: Comparison::default(),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        self.detector.model()
    }

    pub fn comparison(&self) -> &Comparison {
        &self.comparison
    }

    /// Step 1 on the records the serving detector prepares too.
    pub fn prepare(&mut self, records: Vec<(Origin, Record)>) -> Batch {
        self.detector.prepare(records)
    }

    /// Judges the candidate's batch, compares its verdicts with `serving`'s outcomes on the
    /// same records, and says what the rule decides once it can. A batch prepared for another
    /// candidate is ignored.
    pub fn compare(
        &mut self,
        serving: &[Outcome],
        batch: Batch,
        inference: &Inference,
        cfg: &PromotionConfig,
    ) -> Option<Decision> {
        if !Arc::ptr_eq(&batch.model, self.detector.model()) {
            return None;
        }
        let theirs = self.detector.judge(batch, inference);
        for (ours, theirs) in serving.iter().zip(&theirs) {
            if let (Outcome::Scored(a), Outcome::Scored(b)) = (ours, theirs) {
                self.comparison
                    .observe(a.verdict.is_anomaly, b.verdict.is_anomaly);
            }
        }
        self.comparison.decide(cfg)
    }

    /// Drops what the candidate learned of keys of revoked partitions (its episodes were
    /// never sent: nothing to resolve).
    pub fn forget_partitions(&mut self, partitions: &[(String, i32)]) {
        self.detector.forget_partitions(partitions);
    }

    /// Acts on the rule's `decision`: makes the candidate serve in `serving` (see
    /// [`Detector::promote`]), or says why it does not.
    pub fn conclude(self, decision: Decision, serving: &mut Detector) -> Result<(), String> {
        match decision {
            Decision::Promote => serving.promote(self.detector),
            Decision::Refuse(why) => Err(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compare(pairs: &[(bool, bool, u64)]) -> Comparison {
        let mut c = Comparison::default();
        for &(s, k, n) in pairs {
            for _ in 0..n {
                c.observe(s, k);
            }
        }
        c
    }

    #[test]
    fn nothing_is_decided_before_enough_records() {
        let cfg = PromotionConfig {
            records: 100,
            ..PromotionConfig::default()
        };
        assert_eq!(compare(&[(false, false, 99)]).decide(&cfg), None);
        assert_eq!(
            compare(&[(false, false, 100)]).decide(&cfg),
            Some(Decision::Promote)
        );
    }

    #[test]
    fn a_noisier_candidate_is_refused_and_a_quiet_one_promoted() {
        let cfg = PromotionConfig {
            records: 1000,
            ..PromotionConfig::default()
        };
        // 0.4% new anomalies: within 0.5%.
        let quiet = compare(&[(false, false, 996), (false, true, 4)]);
        assert_eq!(quiet.decide(&cfg), Some(Decision::Promote));
        let noisy = compare(&[(false, false, 990), (false, true, 10)]);
        assert!(matches!(
            noisy.decide(&cfg),
            Some(Decision::Refuse(why)) if why.contains("max_new_anomalies")
        ));
    }

    #[test]
    fn a_candidate_that_silences_what_the_serving_model_flags_is_refused() {
        let cfg = PromotionConfig {
            records: 1000,
            ..PromotionConfig::default()
        };
        // An ongoing fault: 100 flagged records, the candidate keeps 30.
        let silencing = compare(&[(false, false, 900), (true, false, 70), (true, true, 30)]);
        assert!((silencing.kept_share() - 0.3).abs() < 1e-12);
        assert!(matches!(
            silencing.decide(&cfg),
            Some(Decision::Refuse(why)) if why.contains("min_kept_anomalies")
        ));
        let keeping = compare(&[(false, false, 900), (true, false, 30), (true, true, 70)]);
        assert_eq!(keeping.decide(&cfg), Some(Decision::Promote));
        // Too few flagged records to say anything: not held against it.
        let few = compare(&[(false, false, 990), (true, false, 10)]);
        assert_eq!(few.decide(&cfg), Some(Decision::Promote));
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let bad = PromotionConfig {
            records: 0,
            max_new_anomalies: 1.5,
            min_kept_anomalies: -0.1,
        };
        let problems = bad.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[1].starts_with("max_new_anomalies"));
    }
}
