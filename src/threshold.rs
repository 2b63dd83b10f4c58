//! Adaptive thresholds, one per entity key.
//!
//! Each method is a [`Threshold`]: it judges a score against what it has learned of the key's
//! normal scores, then learns from the score, without letting an anomaly raise the bar. Every
//! method is warm-started from the model's calibration (the scores of held-back normal data), so
//! a key's first record is judged against what normal looks like rather than against nothing.
//! The warm state is computed once per pipeline ([`ThresholdConfig::build`]) and cloned for
//! every new key, which keeps a flood of new keys cheap.

use serde::{Deserialize, Serialize};

pub mod evt;

use crate::model::Calibration;
use evt::{Dspot, Spot, SpotConfig};

/// The judgement of one score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The threshold the score was compared with (before learning from it).
    pub threshold: f64,
    pub is_anomaly: bool,
    /// The calibrated anomaly score in [0, 1]: `1 − P(S ≥ score)` under the key's learned
    /// distribution of normal scores (for `static`, which learns nothing, `score / (score +
    /// threshold)`: 0.5 at the threshold).
    pub anomaly_score: f64,
}

impl Verdict {
    /// A verdict whose anomaly score is `1 − tail`.
    pub fn with_tail(score: f64, threshold: f64, tail: f64) -> Verdict {
        Verdict {
            threshold,
            is_anomaly: score > threshold,
            anomaly_score: (1.0 - tail).clamp(0.0, 1.0),
        }
    }

    /// A verdict without a distribution: the score relative to the threshold.
    fn new(score: f64, threshold: f64) -> Verdict {
        let anomaly_score = if threshold > 0.0 {
            (score / (score + threshold)).clamp(0.0, 1.0)
        } else if score > threshold {
            1.0
        } else {
            0.0
        };
        Verdict {
            threshold,
            is_anomaly: score > threshold,
            anomaly_score,
        }
    }
}

/// A per-key threshold.
pub trait Threshold: Send + Sync + std::fmt::Debug {
    /// Judges `score`, then updates the state with it.
    fn judge(&mut self, score: f64) -> Verdict;
    /// The current threshold.
    fn threshold(&self) -> f64;
    /// A copy, used to stamp out warm-started thresholds for new keys.
    fn clone_box(&self) -> Box<dyn Threshold>;
    /// What it has learned, for a checkpoint.
    fn snapshot(&self) -> ThresholdState;
    /// Takes over what a snapshot learned; false (and unchanged) if the snapshot is of another
    /// method. Parameters (q, alpha…) stay those of the running configuration.
    fn restore(&mut self, state: &ThresholdState) -> bool;
}

/// The learned state of a threshold, as checkpointed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum ThresholdState {
    Static,
    Ewma {
        mean: f64,
        var: f64,
    },
    Quantile {
        heights: [f64; 5],
        positions: [f64; 5],
        desired: [f64; 5],
        initialized: bool,
        startup: Vec<f64>,
        /// Scores since the last one over the threshold (at most [`LONE`]).
        #[serde(default = "lone")]
        quiet: u32,
    },
    Spot {
        t: f64,
        peaks: Vec<f64>,
        n: u64,
        n_peaks: u64,
        /// The fit it judges by (absent from older snapshots, which refit on restore).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fit: Option<evt::SpotFit>,
    },
    Dspot {
        spot: Box<ThresholdState>,
        recent: Vec<f64>,
    },
}

impl Clone for Box<dyn Threshold> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// Which threshold a pipeline uses, with its parameters (`[pipelines.NAME.threshold]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum ThresholdConfig {
    /// Exponentially weighted mean + k standard deviations of the key's normal scores.
    Ewma(EwmaConfig),
    /// A streaming estimate (P²) of the q-quantile of the key's scores.
    Quantile(QuantileConfig),
    /// A fixed threshold on the score.
    Static(StaticConfig),
    /// Extreme-value theory: a generalized Pareto tail fitted to the key's peaks (SPOT).
    Spot(SpotConfig),
    /// SPOT on the score minus a moving local level, for drifting baselines (DSPOT).
    Dspot(SpotConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EwmaConfig {
    /// Weight of each new score (1/alpha ≈ the memory, in points).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Standard deviations above the mean.
    #[serde(default = "default_k")]
    pub k: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuantileConfig {
    /// The quantile level, e.g. 0.999: about 1 normal point in 1000 is over the threshold.
    #[serde(default = "default_q")]
    pub q: f64,
    /// Roughly how many recent points the estimate reflects; older ones fade out.
    #[serde(default = "default_memory")]
    pub memory: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    /// The threshold on the score.
    pub value: f64,
}

fn default_alpha() -> f64 {
    0.01
}
fn default_k() -> f64 {
    4.0
}
fn default_q() -> f64 {
    0.999
}
fn default_memory() -> u64 {
    10_000
}

impl Default for ThresholdConfig {
    fn default() -> Self {
        ThresholdConfig::Quantile(QuantileConfig {
            q: default_q(),
            memory: default_memory(),
        })
    }
}

impl ThresholdConfig {
    /// The method's name, as in the configuration.
    pub fn method(&self) -> &'static str {
        match self {
            ThresholdConfig::Ewma(_) => "ewma",
            ThresholdConfig::Quantile(_) => "quantile",
            ThresholdConfig::Static(_) => "static",
            ThresholdConfig::Spot(_) => "spot",
            ThresholdConfig::Dspot(_) => "dspot",
        }
    }

    /// Problems with the parameters, as sentences.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match *self {
            ThresholdConfig::Ewma(EwmaConfig { alpha, k }) => {
                if !(alpha > 0.0 && alpha < 1.0) {
                    out.push(format!("alpha must be in (0, 1), found {alpha}"));
                }
                if !(k.is_finite() && k > 0.0) {
                    out.push(format!("k must be positive, found {k}"));
                }
            }
            ThresholdConfig::Quantile(QuantileConfig { q, memory }) => {
                if !(q > 0.5 && q < 1.0) {
                    out.push(format!("q must be in (0.5, 1), found {q}"));
                }
                if memory < 100 {
                    out.push(format!(
                        "memory must be at least 100 points, found {memory}"
                    ));
                }
            }
            ThresholdConfig::Static(StaticConfig { value }) => {
                if !value.is_finite() {
                    out.push(format!("value must be a finite number, found {value}"));
                }
            }
            ThresholdConfig::Spot(c) => out.extend(c.problems(false)),
            ThresholdConfig::Dspot(c) => out.extend(c.problems(true)),
        }
        out
    }

    /// The warm-started threshold every new key starts from.
    pub fn build(&self, calibration: &Calibration) -> Box<dyn Threshold> {
        match *self {
            ThresholdConfig::Ewma(EwmaConfig { alpha, k }) => {
                Box::new(Ewma::warm(alpha, k, calibration))
            }
            ThresholdConfig::Quantile(QuantileConfig { q, memory }) => {
                Box::new(P2Quantile::warm(q, memory, calibration))
            }
            ThresholdConfig::Static(StaticConfig { value }) => Box::new(Static(value)),
            ThresholdConfig::Spot(c) => Box::new(Spot::calibrate(&c, &calibration.sample)),
            ThresholdConfig::Dspot(c) => Box::new(Dspot::calibrate(&c, &calibration.sample)),
        }
    }
}

/// A fixed threshold.
#[derive(Debug, Clone)]
pub struct Static(pub f64);

impl Threshold for Static {
    fn judge(&mut self, score: f64) -> Verdict {
        Verdict::new(score, self.0)
    }
    fn threshold(&self) -> f64 {
        self.0
    }
    fn clone_box(&self) -> Box<dyn Threshold> {
        Box::new(self.clone())
    }
    fn snapshot(&self) -> ThresholdState {
        ThresholdState::Static
    }
    fn restore(&mut self, state: &ThresholdState) -> bool {
        matches!(state, ThresholdState::Static)
    }
}

/// Mean + k·σ, both exponentially weighted, learned from normal points only.
#[derive(Debug, Clone)]
pub struct Ewma {
    alpha: f64,
    k: f64,
    mean: f64,
    var: f64,
}

impl Ewma {
    pub fn warm(alpha: f64, k: f64, calibration: &Calibration) -> Ewma {
        let (mean, std) = if calibration.sample.is_empty() {
            (calibration.mean, calibration.std)
        } else {
            mean_std(&calibration.sample)
        };
        Ewma {
            alpha,
            k,
            mean,
            var: std * std,
        }
    }
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

impl Ewma {
    fn std(&self) -> f64 {
        // A floor on σ keeps a perfectly flat history from alarming on rounding noise.
        self.var.sqrt().max(self.mean.abs() * 1e-3 + 1e-12)
    }
}

/// P(Z ≥ z) for a standard normal Z.
pub fn normal_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

impl Threshold for Ewma {
    fn judge(&mut self, score: f64) -> Verdict {
        let tail = normal_tail((score - self.mean) / self.std());
        let verdict = Verdict::with_tail(score, self.threshold(), tail);
        if !verdict.is_anomaly {
            let delta = score - self.mean;
            self.mean += self.alpha * delta;
            self.var = (1.0 - self.alpha) * (self.var + self.alpha * delta * delta);
        }
        verdict
    }
    fn threshold(&self) -> f64 {
        self.mean + self.k * self.std()
    }
    fn clone_box(&self) -> Box<dyn Threshold> {
        Box::new(self.clone())
    }
    fn snapshot(&self) -> ThresholdState {
        ThresholdState::Ewma {
            mean: self.mean,
            var: self.var,
        }
    }
    fn restore(&mut self, state: &ThresholdState) -> bool {
        let ThresholdState::Ewma { mean, var } = *state else {
            return false;
        };
        (self.mean, self.var) = (mean, var);
        true
    }
}

/// Fewest calibration scores a tail is extrapolated from (10 peaks at [`TAIL_LEVEL`]).
const MIN_TAIL_SAMPLE: usize = 100;
/// The quantile of the calibration scores above which they are peaks of the extrapolated tail.
const TAIL_LEVEL: f64 = 0.9;

/// The upper tail of a small calibration sample: a generalized Pareto distribution fitted to
/// the excesses over its [`TAIL_LEVEL`] quantile, its shape held at 0 or above and its scale at
/// the upper end of its standard error. From a few dozen
/// peaks the fitted shape comes out negative (a bounded tail) more often than the scores' tail
/// is (reconstruction errors are sums of squares: an exponential tail or heavier), and a
/// bounded tail puts the extrapolated quantile too low; measured in docs/NOTES.md.
struct SmallTail {
    level: f64,
    /// Share of the sample above `level`.
    above: f64,
    gpd: evt::Gpd,
}

impl SmallTail {
    fn fit(sorted: &[f64]) -> SmallTail {
        let (level, excesses) = evt::excesses(sorted, TAIL_LEVEL);
        let mut gpd = evt::Gpd::fit(&excesses);
        if gpd.gamma < 0.0 {
            let mean = excesses.iter().sum::<f64>() / excesses.len().max(1) as f64;
            gpd = evt::Gpd {
                gamma: 0.0,
                sigma: mean.max(f64::MIN_POSITIVE),
            };
        }
        // The scale at the upper end of its standard error (σ/√k from k peaks): the false-alarm
        // rate grows faster with a threshold set too low than it falls with one set too high,
        // so on a few dozen peaks the unbiased scale alarms more often than asked, on average.
        gpd.sigma *= 1.0 + 1.0 / (excesses.len().max(1) as f64).sqrt();
        SmallTail {
            level,
            above: excesses.len() as f64 / sorted.len() as f64,
            gpd,
        }
    }

    /// The score exceeded with probability `1 - q`.
    fn quantile(&self, q: f64) -> f64 {
        if self.above <= 0.0 {
            return self.level;
        }
        self.level + self.gpd.excess_at(((1.0 - q) / self.above).min(1.0))
    }
}

/// The P² algorithm (Jain & Chlamtac, 1985): five markers track the minimum, the q/2, q and
/// (1+q)/2 quantiles and the maximum in constant memory.
///
/// Anomalies are fed *censored* at the threshold: they still count as exceeding it (so the
/// estimate of the q-quantile keeps its rank right and does not sink, which it would if they
/// were dropped), but their size never raises it. What counts as an anomaly here is a score
/// more than [`GROSS`] times the threshold, or one that follows another within [`LONE`]
/// scores (a run, or a burst of spikes). A lone exceedance
/// close to the threshold is fed as it is, like a normal score: that is how a threshold that
/// started too low (calibrated on a few hundred scores, narrower than live ones) shows, and it
/// rises to the live quantile, which it could not while every exceedance was capped at it. A
/// fault shows as a run or as scores far over the threshold, and leaves it where it was.
/// Positions are halved whenever the count passes twice `memory`, so old points fade and the
/// threshold follows slow drift.
#[derive(Debug, Clone)]
pub struct P2Quantile {
    heights: [f64; 5],
    positions: [f64; 5],
    desired: [f64; 5],
    increments: [f64; 5],
    memory: f64,
    /// False until five scores have placed the markers.
    initialized: bool,
    /// Scores seen before the markers exist (a cold start without calibration).
    startup: Vec<f64>,
    /// Scores since the last one over the threshold (at most [`LONE`]).
    quiet: u32,
}

impl P2Quantile {
    pub fn new(q: f64, memory: u64) -> P2Quantile {
        P2Quantile {
            heights: [0.0; 5],
            positions: [1.0, 2.0, 3.0, 4.0, 5.0],
            desired: [1.0, 1.0 + 2.0 * q, 1.0 + 4.0 * q, 3.0 + 2.0 * q, 5.0],
            increments: [0.0, q / 2.0, q, (1.0 + q) / 2.0, 1.0],
            memory: memory as f64,
            initialized: false,
            startup: Vec::new(),
            quiet: LONE,
        }
    }

    /// Starts with the markers placed on the calibration sample, as if it had been streamed in.
    pub fn warm(q: f64, memory: u64, calibration: &Calibration) -> P2Quantile {
        let mut p2 = P2Quantile::new(q, memory);
        let mut sample = calibration.sample.clone();
        sample.sort_by(f64::total_cmp);
        if sample.len() < 5 {
            for s in sample {
                p2.update(s);
            }
            return p2;
        }
        let n = sample.len() as f64;
        for i in 0..5 {
            let at = (n - 1.0) * p2.increments[i];
            p2.heights[i] = interpolate(&sample, at);
            p2.desired[i] = 1.0 + at;
            p2.positions[i] = (1.0 + at).round();
        }
        // Fewer than 1/(1-q) scores put the q-quantile at their maximum, which normal data
        // exceeds about once in n + 1 (a model calibrated on 400 rows alarms several times as
        // often as asked, and a censored quantile never rises). Extrapolate the two upper
        // markers from the tail of the sample instead.
        let count = calibration.count.max(sample.len() as u64) as f64;
        if count * (1.0 - q) < 1.0 && sample.len() >= MIN_TAIL_SAMPLE {
            let tail = SmallTail::fit(&sample);
            p2.heights[2] = p2.heights[2].max(tail.quantile(q));
            p2.heights[3] = p2.heights[3].max(tail.quantile(p2.increments[3]));
            p2.heights[4] = p2.heights[4].max(p2.heights[3]);
        }
        p2.fix_positions();
        p2.initialized = true;
        p2
    }

    /// Keeps marker positions strictly increasing integers ending at the count.
    fn fix_positions(&mut self) {
        let p = &mut self.positions;
        p[0] = 1.0;
        for i in 1..5 {
            p[i] = p[i].round().max(p[i - 1] + 1.0);
        }
        for i in (1..4).rev() {
            p[i] = p[i].min(p[i + 1] - 1.0);
        }
        for i in 0..4 {
            // Heights must not decrease either (duplicate scores can tie them).
            self.heights[i + 1] = self.heights[i + 1].max(self.heights[i]);
        }
    }

    fn update(&mut self, x: f64) {
        if !self.initialized {
            self.startup.push(x);
            if self.startup.len() == 5 {
                self.startup.sort_by(f64::total_cmp);
                self.heights.copy_from_slice(&self.startup);
                self.startup = Vec::new();
                self.initialized = true;
            }
            return;
        }
        let h = &mut self.heights;
        let k = if x < h[0] {
            h[0] = x;
            0
        } else if x >= h[4] {
            h[4] = x;
            3
        } else {
            (0..4).find(|&i| x < h[i + 1]).unwrap_or(3)
        };
        for i in k + 1..5 {
            self.positions[i] += 1.0;
        }
        for i in 0..5 {
            self.desired[i] += self.increments[i];
        }
        for i in 1..4 {
            let d = self.desired[i] - self.positions[i];
            let (n, q) = (&mut self.positions, &mut self.heights);
            if (d >= 1.0 && n[i + 1] - n[i] > 1.0) || (d <= -1.0 && n[i - 1] - n[i] < -1.0) {
                let d = d.signum();
                let parabolic = q[i]
                    + d / (n[i + 1] - n[i - 1])
                        * ((n[i] - n[i - 1] + d) * (q[i + 1] - q[i]) / (n[i + 1] - n[i])
                            + (n[i + 1] - n[i] - d) * (q[i] - q[i - 1]) / (n[i] - n[i - 1]));
                q[i] = if q[i - 1] < parabolic && parabolic < q[i + 1] {
                    parabolic
                } else {
                    let j = if d > 0.0 { i + 1 } else { i - 1 };
                    q[i] + d * (q[j] - q[i]) / (n[j] - n[i])
                };
                n[i] += d;
            }
        }
        if self.positions[4] > 2.0 * self.memory {
            for i in 0..5 {
                self.positions[i] = (self.positions[i] / 2.0).round();
                self.desired[i] /= 2.0;
            }
            self.fix_positions();
        }
    }
}

/// Linear interpolation in a sorted slice at fractional index `at`.
pub(crate) fn interpolate(sorted: &[f64], at: f64) -> f64 {
    let lo = at.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = at - lo as f64;
    sorted[lo] + frac * (sorted[hi] - sorted[lo])
}

impl P2Quantile {
    /// P(S ≥ x) read off the markers: the CDF is linear between the markers up to the
    /// q-quantile, and beyond it an exponential tail through the q and (1+q)/2 markers.
    fn tail_probability(&self, x: f64) -> f64 {
        if !self.initialized {
            return 1.0;
        }
        let (h, p) = (&self.heights, &self.increments);
        if x <= h[0] {
            return 1.0;
        }
        if x >= h[2] {
            let half_life = (h[3] - h[2]).max(1e-12 * h[2].abs() + f64::MIN_POSITIVE);
            return (1.0 - p[2]) * 0.5f64.powf((x - h[2]) / half_life);
        }
        let i = if x < h[1] { 0 } else { 1 };
        let frac = (x - h[i]) / (h[i + 1] - h[i]).max(f64::MIN_POSITIVE);
        1.0 - (p[i] + frac * (p[i + 1] - p[i]))
    }
}

/// A score more than this many times the quantile threshold is an anomaly whatever came before
/// it (censored). Measured on models trained on 400 rows (docs/NOTES.md): with exceedances fed
/// as they are up to twice the threshold, a threshold that starts too low reaches the live
/// quantile within its first 20,000 scores.
pub const GROSS: f64 = 2.0;

/// An exceedance is lone, and learned if under [`GROSS`] times the threshold, when none of the
/// previous this-many scores exceeded it. A threshold that starts too low is exceeded by a few
/// normal scores in a hundred, mostly lone; a fault's run or burst of spikes is not.
pub const LONE: u32 = 16;

fn lone() -> u32 {
    LONE
}

impl Threshold for P2Quantile {
    fn judge(&mut self, score: f64) -> Verdict {
        let threshold = self.threshold();
        let verdict = Verdict::with_tail(score, threshold, self.tail_probability(score));
        let censored = verdict.is_anomaly && (score > GROSS * threshold || self.quiet < LONE);
        self.quiet = if verdict.is_anomaly {
            0
        } else {
            (self.quiet + 1).min(LONE)
        };
        self.update(if censored { threshold } else { score });
        verdict
    }
    fn threshold(&self) -> f64 {
        if self.initialized {
            self.heights[2]
        } else {
            // Too few points to say anything: judge nothing anomalous yet.
            f64::INFINITY
        }
    }
    fn clone_box(&self) -> Box<dyn Threshold> {
        Box::new(self.clone())
    }
    fn snapshot(&self) -> ThresholdState {
        ThresholdState::Quantile {
            heights: self.heights,
            positions: self.positions,
            desired: self.desired,
            initialized: self.initialized,
            startup: self.startup.clone(),
            quiet: self.quiet,
        }
    }
    fn restore(&mut self, state: &ThresholdState) -> bool {
        let ThresholdState::Quantile {
            heights,
            positions,
            desired,
            initialized,
            startup,
            quiet,
        } = state
        else {
            return false;
        };
        self.heights = *heights;
        self.positions = *positions;
        self.desired = *desired;
        self.initialized = *initialized;
        self.startup = startup.clone();
        self.quiet = *quiet;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn exp_stream(seed: u64) -> impl Iterator<Item = f64> {
        let mut rng = SmallRng::seed_from_u64(seed);
        std::iter::repeat_with(move || -(1.0 - rng.random::<f64>()).ln())
    }

    #[test]
    fn p2_tracks_a_high_quantile() {
        let mut p2 = P2Quantile::new(0.99, 1_000_000);
        for x in exp_stream(1).take(200_000) {
            p2.update(x);
        }
        let truth = 100f64.ln();
        let est = p2.threshold();
        assert!(
            (est - truth).abs() / truth < 0.05,
            "estimate {est} vs {truth}"
        );
    }

    #[test]
    fn p2_false_alarm_rate_stays_near_1_minus_q_despite_censoring() {
        // Censoring anomalies must not make the threshold sink (which dropping them would).
        let mut t = ThresholdConfig::Quantile(QuantileConfig {
            q: 0.99,
            memory: 10_000,
        })
        .build(&Calibration::of_scores(exp_stream(2).take(2000).collect()));
        let n = 200_000;
        let flagged = exp_stream(3)
            .take(n)
            .filter(|&x| t.judge(x).is_anomaly)
            .count();
        let rate = flagged as f64 / n as f64;
        assert!((0.005..0.02).contains(&rate), "false alarm rate {rate}");
    }

    /// Calibrated on 400 scores, the 0.999-quantile cannot be read off the sample (its max is
    /// exceeded once in 401): extrapolated from the tail, the false-alarm rate on the same
    /// distribution is within 2x of 1e-3, averaged over calibrations; read off the max, it is not.
    #[test]
    fn a_small_calibration_extrapolates_the_quantile_from_its_tail() {
        let q = 0.999;
        let (mut alarms, mut at_max, mut points) = (0usize, 0usize, 0usize);
        for seed in 0..40 {
            let sample: Vec<f64> = exp_stream(100 + seed).take(400).collect();
            let max = sample.iter().fold(0.0f64, |m, &x| m.max(x));
            let mut t = P2Quantile::warm(q, 10_000, &Calibration::of_scores(sample));
            for x in exp_stream(200 + seed).take(25_000) {
                alarms += usize::from(t.judge(x).is_anomaly);
                at_max += usize::from(x > max);
                points += 1;
            }
        }
        let (rate, naive) = (alarms as f64 / points as f64, at_max as f64 / points as f64);
        eprintln!("false-alarm rate {rate:.2e} (q = {q}); above the sample's max {naive:.2e}");
        assert!((0.5e-3..=2e-3).contains(&rate), "false-alarm rate {rate}");
        assert!(naive > 2e-3, "the sample's max alone: {naive}");
    }

    #[test]
    fn warm_start_judges_the_first_points_without_alarming() {
        for cfg in [
            ThresholdConfig::Quantile(QuantileConfig {
                q: 0.999,
                memory: 10_000,
            }),
            ThresholdConfig::Ewma(EwmaConfig {
                alpha: 0.01,
                k: 6.0,
            }),
        ] {
            let template = cfg.build(&Calibration::of_scores(exp_stream(4).take(2000).collect()));
            // Many fresh keys, each judging its first few normal points.
            let mut alarms = 0;
            let mut points = exp_stream(5);
            for _ in 0..200 {
                let mut t = template.clone();
                alarms += (0..5)
                    .filter(|_| t.judge(points.next().unwrap()).is_anomaly)
                    .count();
            }
            assert!(
                alarms <= 5,
                "{cfg:?}: {alarms} alarms in 1000 normal first points"
            );
            assert!(template.threshold().is_finite());
        }
    }

    #[test]
    fn a_long_anomaly_does_not_raise_the_threshold() {
        for cfg in [
            ThresholdConfig::Quantile(QuantileConfig {
                q: 0.995,
                memory: 10_000,
            }),
            ThresholdConfig::Ewma(EwmaConfig {
                alpha: 0.01,
                k: 5.0,
            }),
        ] {
            let mut t = cfg.build(&Calibration::of_scores(exp_stream(6).take(2000).collect()));
            for x in exp_stream(7).take(1000) {
                t.judge(x);
            }
            let before = t.threshold();
            let flagged = (0..500).filter(|_| t.judge(50.0).is_anomaly).count();
            assert_eq!(
                flagged, 500,
                "{cfg:?}: every point of the anomaly is flagged"
            );
            let after = t.threshold();
            assert!(
                after <= before * 1.25,
                "{cfg:?}: threshold rose from {before} to {after}"
            );
        }
    }

    /// Calibrated on scores narrower than the live ones (as a model's few hundred held-back
    /// windows can be), the threshold rises to the live quantile: after a while the false-alarm
    /// rate is near 1 − q, where a threshold capped by its censored exceedances stayed too low.
    #[test]
    fn a_threshold_that_starts_too_low_rises_to_the_live_quantile() {
        let q = 0.999;
        let narrow: Vec<f64> = exp_stream(9).take(400).map(|x| 0.5 * x).collect();
        let mut t = P2Quantile::warm(q, 10_000, &Calibration::of_scores(narrow));
        let start = t.threshold();
        let mut live = exp_stream(10);
        let early = (0..5_000)
            .filter(|_| t.judge(live.next().unwrap()).is_anomaly)
            .count();
        let late = (0..100_000)
            .filter(|_| t.judge(live.next().unwrap()).is_anomaly)
            .count();
        let (early, late) = (early as f64 / 5e3, late as f64 / 1e5);
        let truth = 1000f64.ln();
        eprintln!("threshold {start:.3} -> {:.3} (live {truth:.3}); flagged {early:.2e} first, then {late:.2e}", t.threshold());
        assert!(
            start < 0.85 * truth,
            "the start is too low: {start} vs {truth}"
        );
        assert!(
            (0.5e-3..=2e-3).contains(&late),
            "false-alarm rate {late} after the start"
        );
    }

    /// A fault that stays just over the threshold (a run of exceedances under GROSS times it)
    /// does not raise it either: only lone exceedances are fed as they are.
    #[test]
    fn a_long_modest_anomaly_does_not_raise_the_quantile() {
        let mut t = P2Quantile::warm(
            0.999,
            10_000,
            &Calibration::of_scores(exp_stream(11).take(2000).collect()),
        );
        for x in exp_stream(12).take(1000) {
            t.judge(x);
        }
        let before = t.threshold();
        let flagged = (0..500)
            .filter(|_| t.judge(1.5 * before).is_anomaly)
            .count();
        assert_eq!(flagged, 500);
        assert!(
            t.threshold() <= before * 1.25,
            "{before} -> {}",
            t.threshold()
        );
    }

    #[test]
    fn cold_start_without_calibration_waits_for_five_points() {
        let mut t = ThresholdConfig::default().build(&Calibration::default());
        for x in [1.0, 2.0, 3.0, 4.0] {
            assert!(!t.judge(x).is_anomaly);
        }
        t.judge(5.0);
        assert!(t.threshold().is_finite());
    }

    #[test]
    fn static_verdicts_map_the_threshold_to_one_half() {
        let v = Verdict::new(2.0, 2.0);
        assert_eq!((v.is_anomaly, v.anomaly_score), (false, 0.5));
        assert!(Verdict::new(20.0, 2.0).anomaly_score > 0.9);
        assert!(Verdict::new(0.2, 2.0).anomaly_score < 0.1);
    }

    #[test]
    fn anomaly_scores_are_one_minus_the_tail_probability() {
        assert!((normal_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_tail(3.0) - 1.349_898e-3).abs() < 1e-8);
        assert!((normal_tail(-1.0) - 0.841_344_7).abs() < 1e-6);
        // On the quantile threshold, the anomaly score is about q; beyond it, higher.
        let cal = Calibration::of_scores(exp_stream(8).take(2000).collect());
        let mut t = ThresholdConfig::Quantile(QuantileConfig {
            q: 0.99,
            memory: 10_000,
        })
        .build(&cal);
        let at = t.threshold();
        let v = t.judge(at);
        assert!((v.anomaly_score - 0.99).abs() < 2e-3, "{v:?}");
        assert!(t.judge(at * 3.0).anomaly_score > 0.999);
        assert!(t.judge(0.01).anomaly_score < 0.05);
        let mut e = ThresholdConfig::Ewma(EwmaConfig {
            alpha: 0.01,
            k: 3.0,
        })
        .build(&cal);
        let v = e.judge(e.threshold());
        assert!(
            (v.anomaly_score - (1.0 - 1.349_898e-3)).abs() < 1e-4,
            "{v:?}"
        );
    }

    #[test]
    fn bad_parameters_are_reported() {
        assert_eq!(
            ThresholdConfig::Ewma(EwmaConfig {
                alpha: 1.5,
                k: -1.0
            })
            .problems()
            .len(),
            2
        );
        assert_eq!(
            ThresholdConfig::Quantile(QuantileConfig { q: 1.0, memory: 10 })
                .problems()
                .len(),
            2
        );
        assert!(ThresholdConfig::default().problems().is_empty());
    }
}
