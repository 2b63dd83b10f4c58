//! Drift: has a pipeline's score stream moved away from what it was when its model started?
//!
//! A model goes stale when the data moves under it (a new kind of host, a software upgrade, a
//! season): its scores rise across many keys at once, long before any one key's episode says
//! so. The detector watches one number per scored record: whether its score exceeds the
//! `quantile` of the model's first `reference` scores (the level it started at). Without
//! drift that happens at rate `p0 = 1 − quantile`; a CUSUM of the log-likelihood ratio of
//! `p1 = ratio × p0` against `p0` (Page's test, the family Page-Hinkley belongs to) crosses
//! `threshold` when the rate has risen. With the defaults (p0 = 1%, ratio 3, threshold 20) a
//! stationary stream crosses it about once in e^20 ≈ 5·10^8 records, and a tripled exceedance
//! rate is found within about 1,500 records (`tests/` below measure both). The reference
//! restarts with every new model (its scores are on another scale).

use serde::{Deserialize, Serialize};

/// `[pipelines.NAME.drift]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    /// Scores, from the model's start, that set the reference level.
    #[serde(default = "default_reference")]
    pub reference: u64,
    /// The quantile of the reference scores whose exceedance rate is watched.
    #[serde(default = "default_quantile")]
    pub quantile: f64,
    /// The rise of the exceedance rate, as a multiple of `1 − quantile`, that is drift.
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// The CUSUM statistic (log-likelihood ratio) at which drift is declared.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
}

fn default_reference() -> u64 {
    10_000
}
fn default_quantile() -> f64 {
    0.99
}
fn default_ratio() -> f64 {
    3.0
}
fn default_threshold() -> f64 {
    20.0
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            reference: default_reference(),
            quantile: default_quantile(),
            ratio: default_ratio(),
            threshold: default_threshold(),
        }
    }
}

impl DriftConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.reference < 100 {
            out.push(format!(
                "reference: must be at least 100 scores, found {}",
                self.reference
            ));
        }
        if !(self.quantile > 0.5 && self.quantile < 1.0) {
            out.push(format!(
                "quantile: must be in (0.5, 1), found {}",
                self.quantile
            ));
        }
        if !(self.ratio > 1.0 && self.ratio * (1.0 - self.quantile) < 1.0) {
            out.push(format!(
                "ratio: must be above 1, and ratio × (1 − quantile) below 1, found {}",
                self.ratio
            ));
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            out.push(format!(
                "threshold: must be positive, found {}",
                self.threshold
            ));
        }
        out
    }
}

/// A change of a pipeline's drift state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftChange {
    /// The statistic crossed the threshold.
    Started,
    /// It fell back to 0: the exceedance rate is the reference's again.
    Ended,
}

/// The drift detector of one pipeline's score stream.
#[derive(Debug, Clone)]
pub struct Drift {
    cfg: DriftConfig,
    /// The first scores, until there are `reference` of them.
    reference: Vec<f64>,
    /// The reference quantile, once set.
    level: Option<f64>,
    /// The CUSUM increments for a score above and below the level.
    up: f64,
    down: f64,
    statistic: f64,
    drifting: bool,
}

impl Drift {
    pub fn new(cfg: DriftConfig) -> Drift {
        let p0 = 1.0 - cfg.quantile;
        let p1 = cfg.ratio * p0;
        Drift {
            cfg,
            reference: Vec::new(),
            level: None,
            up: (p1 / p0).ln(),
            down: ((1.0 - p1) / (1.0 - p0)).ln(),
            statistic: 0.0,
            drifting: false,
        }
    }

    /// Starts over, for a new model.
    pub fn restart(&mut self) {
        *self = Drift::new(self.cfg);
    }

    /// The CUSUM statistic over its threshold: 1 or more while drifting; 0 while the reference
    /// is still being set.
    pub fn statistic(&self) -> f64 {
        self.statistic / self.cfg.threshold
    }

    pub fn is_drifting(&self) -> bool {
        self.drifting
    }

    /// Takes one score; says when the drift state changes.
    pub fn observe(&mut self, score: f64) -> Option<DriftChange> {
        let Some(level) = self.level else {
            self.reference.push(score);
            if self.reference.len() as u64 >= self.cfg.reference {
                let mut sorted = std::mem::take(&mut self.reference);
                sorted.sort_by(f64::total_cmp);
                let at = (sorted.len() - 1) as f64 * self.cfg.quantile;
                self.level = Some(crate::threshold::interpolate(&sorted, at));
            }
            return None;
        };
        let step = if score > level { self.up } else { self.down };
        self.statistic = (self.statistic + step).max(0.0);
        if !self.drifting && self.statistic >= self.cfg.threshold {
            self.drifting = true;
            return Some(DriftChange::Started);
        }
        if self.drifting && self.statistic == 0.0 {
            self.drifting = false;
            return Some(DriftChange::Ended);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    fn exp(rng: &mut SmallRng) -> f64 {
        -(1.0 - rng.random::<f64>()).ln()
    }

    #[test]
    fn a_stationary_stream_never_drifts_and_a_risen_one_is_found_within_thousands() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut d = Drift::new(DriftConfig::default());
        for _ in 0..1_000_000 {
            assert_eq!(d.observe(exp(&mut rng)), None);
        }
        assert!(d.statistic() < 1.0);
        // Scores scaled so that exceeding the reference's 0.99 quantile (ln 100) is three times
        // as likely: e^(-ln 100 / c) = 3%.
        let c = 100f64.ln() / (100.0f64 / 3.0).ln();
        let found = (1..=20_000).find(|_| d.observe(c * exp(&mut rng)).is_some());
        let found = found.expect("drift found");
        eprintln!("a threefold exceedance rate found after {found} records");
        assert!(found < 3_000, "after {found} records");
        assert!(d.is_drifting() && d.statistic() >= 1.0);
        // Back to the reference: it ends.
        let ended = (1..=100_000).find(|_| d.observe(exp(&mut rng)) == Some(DriftChange::Ended));
        assert!(ended.is_some());
        assert!(!d.is_drifting());
    }

    #[test]
    fn nothing_is_judged_before_the_reference_and_a_restart_sets_it_again() {
        let mut d = Drift::new(DriftConfig {
            reference: 100,
            ..DriftConfig::default()
        });
        for i in 0..100 {
            assert_eq!(d.observe(i as f64), None);
        }
        assert_eq!(d.level, Some(98.01));
        d.restart();
        assert_eq!(d.level, None);
        assert_eq!(d.statistic(), 0.0);
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let bad = DriftConfig {
            reference: 10,
            quantile: 1.0,
            ratio: 1.0,
            threshold: 0.0,
        };
        let p = bad.problems();
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("reference"));
    }
}
