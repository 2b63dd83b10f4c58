//! Extreme-value thresholds: SPOT and DSPOT (Siffer, Fouque, Termier, Largouët, "Anomaly
//! Detection in Streams with Extreme Value Theory", KDD 2017).
//!
//! The tail of the normal scores above a high initial level `t` (the peaks) follows a
//! generalized Pareto distribution (GPD, Pickands–Balkema–de Haan). Fitting it (Grimshaw's
//! maximum-likelihood method) gives the threshold `z_q` a normal score exceeds with probability
//! `q` (the risk), however far in the tail that is, and the tail probability of any score above
//! `t`, which is the calibrated anomaly score: `1 − P(S ≥ s)`.
//!
//! SPOT: a score above `z_q` is an anomaly; a score above `t` is a peak and the GPD is refitted
//! (past the 32nd peak of a run of consecutive peaks, a sustained shift, only every 16th peak
//! and at the run's end, so that its cost stays bounded; a refit follows the last fit's root on
//! running sums over the peaks, without a pass over them, and searches for every root only
//! every 256th time); anything else only counts. DSPOT does
//! the same on the score minus a local level (the mean of the last `depth` normal scores), so it
//! follows a drifting baseline instead of alarming on it.
//!
//! One departure from the paper: an anomaly is kept out of the peaks only when it is *gross*,
//! beyond `z_{q·exclude}` (by default a hundred times rarer than the threshold). Dropping every
//! flagged score truncates the very tail the GPD is fitted on: the refit comes out lighter, the
//! threshold lower, more scores are dropped, and the threshold runs away downwards (measured
//! here: a false-alarm rate of 1.7e-2 instead of 1e-3 on a stationary Gaussian stream with a
//! window of 200 peaks). Scores between the two thresholds are flagged but still learned, which
//! keeps the fit unbiased; gross anomalies, the ones that matter, never feed it.
//!
//! Warm start: the model's calibration sample (held-back normal scores) sets `t` and the first
//! peaks. The fitted template is shared by every new key until the key's own first peak, so a
//! key costs a few dozen bytes until its tail actually moves.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::Calibration;
use crate::threshold::{interpolate, Threshold, ThresholdState, Verdict};

/// A fitted generalized Pareto distribution of the excesses over `t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpd {
    /// Shape (ξ): > 0 heavy tail, 0 exponential, < 0 bounded.
    pub gamma: f64,
    /// Scale (σ).
    pub sigma: f64,
}

impl Gpd {
    /// Survival function of an excess `y ≥ 0`: P(Y > y).
    pub fn survival(&self, y: f64) -> f64 {
        if self.gamma.abs() < 1e-9 {
            (-y / self.sigma).exp()
        } else {
            let base = 1.0 + self.gamma * y / self.sigma;
            if base <= 0.0 {
                0.0
            } else {
                base.powf(-1.0 / self.gamma)
            }
        }
    }

    /// The excess exceeded with probability `p`.
    pub fn excess_at(&self, p: f64) -> f64 {
        if self.gamma.abs() < 1e-9 {
            -self.sigma * p.ln()
        } else {
            self.sigma / self.gamma * (p.powf(-self.gamma) - 1.0)
        }
    }

    /// Log-likelihood of `peaks` under this distribution (−∞ outside its support).
    pub fn log_likelihood(&self, peaks: &[f64]) -> f64 {
        let n = peaks.len() as f64;
        if self.sigma <= 0.0 {
            return f64::NEG_INFINITY;
        }
        if self.gamma.abs() < 1e-9 {
            return -n * self.sigma.ln() - peaks.iter().sum::<f64>() / self.sigma;
        }
        let tau = self.gamma / self.sigma;
        let mut sum = 0.0;
        for &y in peaks {
            let s = 1.0 + tau * y;
            if s <= 0.0 {
                return f64::NEG_INFINITY;
            }
            sum += s.ln();
        }
        -n * self.sigma.ln() - (1.0 + 1.0 / self.gamma) * sum
    }

    /// Grimshaw's maximum-likelihood fit. With `x = γ/σ`, the likelihood equations reduce to
    /// one equation in `x`, `w(x) = u(x)·v(x) − 1 = 0` with `u = 1 + mean ln(1 + xY)` and
    /// `v = mean 1/(1 + xY)`; its roots lie in `(−1/max Y, 0)` and `(0, 2(Ȳ − min Y)/(min Y)²)`.
    /// Each root gives `γ = u − 1`, `σ = γ/x`; the best likelihood among them and the
    /// exponential fit (γ = 0, σ = Ȳ) wins.
    pub fn fit(peaks: &[f64]) -> Gpd {
        Gpd::search(peaks).0
    }

    /// [`Gpd::fit`], with the root of Grimshaw's equation of the likeliest non-exponential
    /// candidate (to [`Gpd::refine`] from later), if there is one.
    pub fn search(peaks: &[f64]) -> (Gpd, Option<f64>) {
        let n = peaks.len() as f64;
        let mean = peaks.iter().sum::<f64>() / n.max(1.0);
        let exponential = Gpd {
            gamma: 0.0,
            sigma: mean.max(f64::MIN_POSITIVE),
        };
        if peaks.len() < 3 {
            return (exponential, None);
        }
        let (min, max) = peaks.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &y| {
            (lo.min(y), hi.max(y))
        });
        if max <= 0.0 || max - min <= 1e-12 * max {
            return (exponential, None);
        }
        let w = |x: f64| {
            let (mut u, mut v) = (0.0, 0.0);
            for &y in peaks {
                let s = 1.0 + x * y;
                u += s.ln();
                v += 1.0 / s;
            }
            (1.0 + u / n) * (v / n) - 1.0
        };
        // Left: x = -u/max for u in (0, 1), the grid dense near both ends. Right: x in
        // (0, 2(Ȳ - min)/min²), the grid geometric. x = 0 itself is a trivial (double) root of
        // w, covered by the exponential fit, so both grids stay clear of it.
        let left: Vec<f64> = (0..GRID)
            .map(|i| {
                let a = -14.0 + 28.0 * i as f64 / (GRID - 1) as f64;
                -1.0 / (1.0 + (-a).exp()) / max
            })
            .collect();
        let min = min.max(1e-9 * max);
        let upper = 2.0 * (mean - min) / (min * min);
        let lower = 1e-6 / max;
        let right: Vec<f64> = (0..GRID)
            .map(|i| lower * (upper / lower).powf(i as f64 / (GRID - 1) as f64))
            .collect();
        let mut root: Option<(f64, Gpd, f64)> = None;
        for grid in [left, right] {
            for x in roots(&w, &grid) {
                if let Some((candidate, ll)) = Gpd::at_root(peaks, x) {
                    if root.is_none_or(|(_, _, best)| ll > best) {
                        root = Some((x, candidate, ll));
                    }
                }
            }
        }
        match root {
            Some((x, candidate, ll)) if ll > exponential.log_likelihood(peaks) => {
                (candidate, Some(x))
            }
            _ => (exponential, root.map(|(x, _, _)| x)),
        }
    }

    /// The GPD a root `x` of Grimshaw's equation gives, with its log-likelihood, if valid.
    /// One pass over the peaks: with τ = γ/σ = x, the log-likelihood's sum of ln(1 + τY) is
    /// the n·γ just summed.
    fn at_root(peaks: &[f64], x: f64) -> Option<(Gpd, f64)> {
        let n = peaks.len() as f64;
        let gamma = peaks.iter().map(|y| (1.0 + x * y).ln()).sum::<f64>() / n;
        Gpd::with_shape(n, x, gamma)
    }

    /// The GPD of root `x` whose shape, the mean of ln(1 + xY) over `n` peaks, is `gamma`.
    fn with_shape(n: f64, x: f64, gamma: f64) -> Option<(Gpd, f64)> {
        let candidate = Gpd {
            gamma,
            sigma: gamma / x,
        };
        let ll = -n * candidate.sigma.ln() - n * (1.0 + gamma);
        (candidate.sigma > 0.0 && ll.is_finite()).then_some((candidate, ll))
    }
}

/// The peaks a key fits its tail to (excesses over `t`, newest last), with running sums that
/// let a refit follow its root without a pass over them.
#[derive(Debug, Clone, PartialEq)]
struct Tail {
    peaks: VecDeque<f64>,
    sums: Sums,
}

/// Running sums over a tail's peaks: their sum (the exponential fit), and Grimshaw's equation
/// as a power series about a point, which a refit evaluates near that point in `O(POWERS)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sums {
    pub sum: f64,
    /// `None` until a refit anchors it (and after a search, or a peak outside its domain).
    pub series: Option<Series>,
}

/// Terms kept of each power series: within [`RADIUS`], the first left out is below 1e-16.
const POWERS: usize = 16;

/// How far from its anchor a series is evaluated: `|x − x0| · max z`, the ratio of its
/// geometric terms. 0.05^14 times the largest binomial factor (120) is ~1e-16.
const RADIUS: f64 = 0.05;

/// Grimshaw's sums over peaks `y` at `x = x0 + h`, from sums at `x0` alone. With `s = 1 + x0·y`
/// and `z = y/s`, `1 + x·y = s·(1 + h·z)` and `1/s = 1 − x0·z`, so `ln(1 + x·y)` and the
/// powers of `1/(1 + x·y)` Grimshaw's `w` and its derivatives take are series in `h·z`, whose
/// coefficients are the power sums `Σ z^k`. Adding or removing a peak updates them in one
/// logarithm and [`POWERS`] products, where evaluating `w` directly is a logarithm per peak:
/// a refit after one new peak costs as much as a few scores, not a few passes over 200 peaks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub x0: f64,
    /// `Σ ln s`.
    pub log: f64,
    /// `Σ z^k` for k = 1..=POWERS.
    pub powers: [f64; POWERS],
    /// The largest `z` added since anchoring (kept when that peak leaves, so that the rounding
    /// its removal leaves in the high powers stays within [`RADIUS`]'s bound).
    pub z_max: f64,
}

impl Series {
    /// The sums of `peaks` about `x0`, or `None` if some `1 + x0·y` is not positive.
    fn anchor<'a>(peaks: impl IntoIterator<Item = &'a f64>, x0: f64) -> Option<Series> {
        let mut series = Series {
            x0,
            log: 0.0,
            powers: [0.0; POWERS],
            z_max: 0.0,
        };
        for &y in peaks {
            if !series.add(y, 1.0) {
                return None;
            }
        }
        Some(series)
    }

    /// Adds (`sign` 1) or removes (−1) peak `y`; false when `1 + x0·y` is not positive.
    fn add(&mut self, y: f64, sign: f64) -> bool {
        let s = 1.0 + self.x0 * y;
        // NaN counts as outside too.
        if s.is_nan() || s <= 0.0 {
            return false;
        }
        let z = y / s;
        self.log += sign * s.ln();
        let mut power = z;
        for sum in &mut self.powers {
            *sum += sign * power;
            power *= z;
        }
        if sign > 0.0 {
            self.z_max = self.z_max.max(z);
        }
        true
    }

    /// Whether `x` is close enough to the anchor for [`Series::at`] to be exact.
    fn covers(&self, x: f64) -> bool {
        (x - self.x0).abs() * self.z_max <= RADIUS
    }

    /// Means over the `n` peaks at `x`: `[ln(1 + xY), 1/(1 + xY)]` and their first and second
    /// derivatives in `x`, `[u, v, u', v', u'', v'']` without `u`'s leading 1.
    fn at(&self, n: f64, x: f64) -> [f64; 6] {
        let h = x - self.x0;
        // P(k) = Σ z^k, P(0) = n.
        let p = |k: usize| if k == 0 { n } else { self.powers[k - 1] };
        let (x0, mut sums, mut hj) = (self.x0, [0.0; 6], 1.0);
        sums[0] = self.log;
        // Term j of each series, (−h)^j times: 1/(1 + hz)^m has coefficients C(j + m − 1, j),
        // and ln(1 + hz) is h·z·(1/(j + 1))(−hz)^j.
        for j in 0..POWERS - 2 {
            let (c2, c3) = ((j + 1) as f64, ((j + 1) * (j + 2) / 2) as f64);
            sums[0] += hj * h * p(j + 1) / (j + 1) as f64;
            sums[1] += hj * (p(j) - x0 * p(j + 1));
            sums[2] += hj * p(j + 1);
            sums[3] -= hj * c2 * (p(j + 1) - x0 * p(j + 2));
            sums[4] -= hj * c2 * p(j + 2);
            sums[5] += hj * 2.0 * c3 * (p(j + 2) - x0 * p(j + 3));
            hj *= -h;
        }
        sums.map(|s| s / n)
    }
}

impl Sums {
    /// The sums of `peaks` afresh (rounding does not pile up), the series left to anchor.
    fn of(peaks: &VecDeque<f64>) -> Sums {
        Sums {
            sum: peaks.iter().sum(),
            series: None,
        }
    }
}

impl Tail {
    fn new(peaks: VecDeque<f64>) -> Tail {
        let sums = Sums::of(&peaks);
        Tail { peaks, sums }
    }

    /// Appends peak `y`, the oldest leaving once there are `max` of them.
    fn push(&mut self, y: f64, max: usize) {
        if self.peaks.len() == max {
            if let Some(old) = self.peaks.pop_front() {
                self.count(old, -1.0);
            }
        }
        self.peaks.push_back(y);
        self.count(y, 1.0);
    }

    fn count(&mut self, y: f64, sign: f64) {
        self.sums.sum += sign * y;
        if let Some(series) = &mut self.sums.series {
            if !series.add(y, sign) {
                self.sums.series = None;
            }
        }
    }

    /// [`Gpd::search`] on the peaks, their sums taken afresh.
    fn search(&mut self) -> (Gpd, Option<f64>) {
        self.sums = Sums::of(&self.peaks);
        Gpd::search(self.peaks.make_contiguous())
    }

    /// The sums' series about `x`: the one kept if it covers `x`, else anchored there anew
    /// (a pass over the peaks); `None` outside the domain of Grimshaw's equation.
    fn series_at(&mut self, x: f64) -> Option<Series> {
        if !self.sums.series.is_some_and(|s| s.covers(x)) {
            self.sums.series = Series::anchor(&self.peaks, x);
        }
        self.sums.series
    }

    /// The fit [`Gpd::search`] would make, found from the root `x` of a fit of nearly the same
    /// peaks by Halley's method on the kept [`Series`], without a pass over the peaks unless
    /// the root has moved out of its reach. After one new peak the root moves little, so this
    /// finds the same fit unless another root has become the likeliest (the caller searches in
    /// full now and then for that). Without a root (the search found none) the fit stays
    /// exponential. `None` when the iteration leaves the domain or does not settle.
    fn refine(&mut self, x: Option<f64>) -> Option<(Gpd, Option<f64>)> {
        if self.peaks.len() < 3 {
            return None;
        }
        let n = self.peaks.len() as f64;
        let exponential = Gpd {
            gamma: 0.0,
            sigma: (self.sums.sum / n).max(f64::MIN_POSITIVE),
        };
        let Some(mut x) = x else {
            return Some((exponential, None));
        };
        let mut last_step = f64::INFINITY;
        for _ in 0..REFINE_STEPS {
            if !(x != 0.0 && x.is_finite()) {
                return None;
            }
            let series = self.series_at(x)?;
            let [u, v, du, dv, d2u, d2v] = series.at(n, x);
            let u = 1.0 + u;
            // Halley's method on g(x) = w(x) / x², not on w = u·v − 1 itself: w has a double
            // root at 0 for any peaks (w(0) = w'(0) = 0), and near it, where the root of a
            // near-exponential tail lies, Newton on w converges slowly. In terms of w (all
            // scaled by powers of x): g·x² = w, g'·x³ = w'·x − 2w, g''·x⁴ = w''·x² − 4w'·x + 6w.
            // Halley converges cubically, so after a new peak one step usually lands the root
            // to rounding, where Newton took three.
            let (w, dw, d2w) = (
                u * v - 1.0,
                du * v + u * dv,
                d2u * v + 2.0 * du * dv + u * d2v,
            );
            let (g1, g2) = (dw * x - 2.0 * w, d2w * x * x - 4.0 * dw * x + 6.0 * w);
            let newton = w * x / g1;
            let halley = 2.0 * w * g1 * x / (2.0 * g1 * g1 - w * g2);
            // Halley's step where it agrees in direction and size with Newton's (near the root
            // it is Newton's corrected by a small factor), else Newton's.
            let step = if halley.is_finite()
                && halley.signum() == newton.signum()
                && halley.abs() <= 2.0 * newton.abs()
            {
                halley
            } else {
                newton
            };
            if !step.is_finite() {
                return None;
            }
            x -= step;
            // Settled: the step is negligible, or it has stopped shrinking at the rounding noise
            // of w, which near 0 is a small difference of two numbers near 1. Such a root used
            // to alternate by ~1e-12 until the steps ran out, and the key then searched in full:
            // on one peak in seven of a long-running key with an exponential tail, 6× its cost.
            let scale = x.abs().max(1.0 / series.z_max);
            let noise = step.abs() >= last_step && step.abs() <= 1e-8 * scale;
            last_step = step.abs();
            if step.abs() <= SETTLED * x.abs() || noise {
                let gamma = self.series_at(x)?.at(n, x)[0];
                let (candidate, ll) = Gpd::with_shape(n, x, gamma)?;
                let ll_exponential =
                    -n * exponential.sigma.ln() - self.sums.sum / exponential.sigma;
                let best = if ll > ll_exponential {
                    candidate
                } else {
                    exponential
                };
                return Some((best, Some(x)));
            }
        }
        None
    }
}

/// A step of [`Tail::refine`] at most this fraction of the root ends it: Halley's next step would
/// be ~its cube, below 1e-12 of the root.
const SETTLED: f64 = 1e-4;
/// Steps [`Tail::refine`] takes at most before giving up.
const REFINE_STEPS: usize = 12;

/// Points per search grid of Grimshaw's equation.
const GRID: usize = 64;

/// Roots of `f` between consecutive points of an increasing `grid`: each sign change is refined
/// by [`bracketed_root`].
fn roots(f: &impl Fn(f64) -> f64, grid: &[f64]) -> Vec<f64> {
    let values: Vec<f64> = grid.iter().map(|&x| f(x)).collect();
    (1..grid.len())
        .filter(|&i| {
            let (fa, fb) = (values[i - 1], values[i]);
            fa.is_finite() && fb.is_finite() && fa.signum() != fb.signum()
        })
        .map(|i| bracketed_root(f, (grid[i - 1], values[i - 1]), (grid[i], values[i])))
        .collect()
}

/// The root of `f` in `[a, b]`, where `f` changes sign, to the last few bits: the Illinois
/// variant of regula falsi, which keeps the bracket and converges superlinearly, falling back to
/// a bisection step whenever the bracket fails to halve: about 20 evaluations a root (a unit
/// test). Each evaluation of Grimshaw's `w` is a pass over the peaks (a logarithm each); the 60
/// bisection steps a root this replaced made most of a full search's ~250 passes, and a key
/// searched in full every 32nd fit spent 60 % of its time there (`hot_path`, a long-running key).
fn bracketed_root(f: &impl Fn(f64) -> f64, mut a: (f64, f64), mut b: (f64, f64)) -> f64 {
    // The end the last step replaced (1: `b`, -1: `a`): when the same end moves twice in a row,
    // the other end's value is halved (Illinois), so that it cannot stay put.
    let mut last = 0i8;
    for _ in 0..BRACKET_STEPS {
        let width = (b.0 - a.0).abs();
        if width <= 4.0 * f64::EPSILON * a.0.abs().max(b.0.abs()) {
            break;
        }
        let secant = (a.0 * b.1 - b.0 * a.1) / (b.1 - a.1);
        let c = if secant > a.0.min(b.0) && secant < a.0.max(b.0) {
            secant
        } else {
            0.5 * (a.0 + b.0)
        };
        let Some(side) = narrow(f, &mut a, &mut b, c) else {
            return c;
        };
        if side == last {
            if side == 1 {
                a.1 *= 0.5;
            } else {
                b.1 *= 0.5;
            }
        }
        last = side;
        // A bracket that did not halve is bisected at once.
        if (b.0 - a.0).abs() > 0.5 * width {
            let mid = 0.5 * (a.0 + b.0);
            if narrow(f, &mut a, &mut b, mid).is_none() {
                return mid;
            }
            last = 0;
        }
    }
    0.5 * (a.0 + b.0)
}

/// Evaluates `f` at `c`, inside the bracket `(a, b)` of (point, value) pairs, and replaces the
/// end whose value has the sign of `f(c)`: `Some(1)` when that is `b`, `Some(-1)` when `a`;
/// `None` when `c` is the root (or `f` is not finite there).
fn narrow(f: &impl Fn(f64) -> f64, a: &mut (f64, f64), b: &mut (f64, f64), c: f64) -> Option<i8> {
    let fc = f(c);
    if fc == 0.0 || !fc.is_finite() {
        None
    } else if fc.signum() == b.1.signum() {
        *b = (c, fc);
        Some(1)
    } else {
        *a = (c, fc);
        Some(-1)
    }
}

/// At most this many steps of [`bracketed_root`] (each halves the bracket at least every other
/// evaluation, so 60 reach the last bit of any bracket).
const BRACKET_STEPS: usize = 60;

/// `[pipelines.NAME.threshold]` with `method = "spot"` or `"dspot"`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpotConfig {
    /// Risk: the probability with which a normal score exceeds the threshold.
    #[serde(default = "default_risk")]
    pub q: f64,
    /// Quantile of the calibration scores above which scores are peaks (the initial level t).
    #[serde(default = "default_level")]
    pub level: f64,
    /// Most recent peaks the GPD is fitted on, per key.
    #[serde(default = "default_max_peaks")]
    pub max_peaks: usize,
    /// DSPOT only: how many recent normal scores make the local level.
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// Anomalies rarer than `q × exclude` are kept out of the peaks; rarer than `q` only, they
    /// are flagged but still learned (see the module documentation).
    #[serde(default = "default_exclude")]
    pub exclude: f64,
}

fn default_exclude() -> f64 {
    0.01
}

fn default_risk() -> f64 {
    1e-4
}
fn default_level() -> f64 {
    0.98
}
fn default_max_peaks() -> usize {
    200
}
fn default_depth() -> usize {
    10
}

impl Default for SpotConfig {
    fn default() -> Self {
        SpotConfig {
            q: default_risk(),
            level: default_level(),
            max_peaks: default_max_peaks(),
            depth: default_depth(),
            exclude: default_exclude(),
        }
    }
}

impl SpotConfig {
    pub fn problems(&self, drifting: bool) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.q > 0.0 && self.q < 0.1) {
            out.push(format!(
                "q (the risk) must be in (0, 0.1), found {}",
                self.q
            ));
        }
        if !(self.level > 0.5 && self.level < 1.0) {
            out.push(format!("level must be in (0.5, 1), found {}", self.level));
        }
        if self.q >= 1.0 - self.level {
            out.push(format!(
                "q ({}) must be below 1 - level ({}): the threshold lies beyond the peaks",
                self.q,
                1.0 - self.level
            ));
        }
        if self.max_peaks < 10 {
            out.push(format!(
                "max_peaks must be at least 10, found {}",
                self.max_peaks
            ));
        }
        if !(self.exclude > 0.0 && self.exclude <= 1.0) {
            out.push(format!("exclude must be in (0, 1], found {}", self.exclude));
        }
        if drifting && self.depth == 0 {
            out.push("depth must be at least 1".into());
        }
        out
    }
}

/// The `level` quantile `t` of sorted scores (0 for none) and the scores' excesses over it, in
/// ascending order: the peaks a tail is fitted to.
pub fn excesses(sorted: &[f64], level: f64) -> (f64, Vec<f64>) {
    if sorted.is_empty() {
        return (0.0, Vec::new());
    }
    let t = interpolate(sorted, (sorted.len() - 1) as f64 * level);
    (
        t,
        sorted.iter().filter(|&&s| s > t).map(|s| s - t).collect(),
    )
}

/// The tail fit a SPOT key judges by, in its snapshot: inside a run of peaks it can be some
/// peaks old ([`Spot::judge`]), and a key restored from the snapshot must judge exactly as the
/// one it was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpotFit {
    pub gamma: f64,
    pub sigma: f64,
    pub root: Option<f64>,
    /// `n` and `n_peaks` when it was fitted, which weigh its tail (the thresholds are derived
    /// again on restore, so that a configuration reloaded with another `q` applies).
    pub n: u64,
    pub n_peaks: u64,
    pub refined: usize,
    pub run: usize,
    /// The peaks' running sums, which a refit follows its root on: without them (an older
    /// version's snapshot) they are taken afresh, and the key's next fits can differ from the
    /// original's in the last bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sums: Option<Sums>,
}

/// SPOT's state for one key (DSPOT adds the local level around it).
#[derive(Debug, Clone)]
pub struct Spot {
    q: f64,
    exclude: f64,
    max_peaks: usize,
    /// The peaks level.
    t: f64,
    /// Excesses over `t`; shared with the template until this key's first peak.
    tail: Arc<Tail>,
    /// Observations and peaks ever counted (the tail's weight is `n_peaks / n`).
    n: u64,
    n_peaks: u64,
    gpd: Gpd,
    z: f64,
    /// Beyond this, anomalies are not learned.
    z_far: f64,
    /// Fits since the last full search (the others refine its root, see [`Tail::refine`]).
    refined: usize,
    /// The root of Grimshaw's equation of the last fit, if it had one.
    root: Option<f64>,
    /// `n` and `n_peaks` at the last fit: peaks learned since (inside a run, see
    /// [`Spot::judge`]) make `n_peaks` differ.
    fitted: (u64, u64),
    /// Consecutive peaks learned, the last one included (0 after a score below `t`).
    run: usize,
}

/// A run of consecutive peaks longer than [`RUN_REFIT_ALL`] is a sustained shift: from there on
/// the tail is refitted every this many peaks of the run, and once more when the run ends. Runs
/// up to that length (bursts, the onset of an anomaly) refit on every peak as lone peaks do.
/// Refitting on every peak of a shift, where every score is a peak, made SPOT's cost a fit per
/// score: 165× the quantile's on such a stretch (`hot_path` bench), 18× with this.
const RUN_REFIT_EVERY: usize = 16;

/// Peaks of a run that each refit the tail (see [`RUN_REFIT_EVERY`]). On a stationary stream a
/// peak is one score in 50 to 100, so such a run does not happen; on NAB (runs where anomalies
/// are) 32 left two of three seeds' scores unchanged and cost one 0.20 (64: 0.25; refitting
/// only a run's 1st, 2nd, 4th, 8th, 16th… peak: 0.27 on the mean), docs/NOTES.md.
const RUN_REFIT_ALL: usize = 32;

/// A fit may leave out the window's last 1/`LAG_SHARE` lone peaks (8 of 200; none below 50
/// peaks, while each weighs more): they join the next fit. Such a peak moves the fit by about
/// 1/200 of its weight, far less than the fit's own sampling error (~1/√200), and a score near
/// the threshold ([`NEAR`]) refits first, so verdicts near it are by a fit of every peak;
/// below it the fit only shades the reported anomaly score. A refit after every lone peak was
/// ~70 % of a long-running key's cost (`hot_path -- threshold`: 2.7 ms per 65,536 scores
/// against 0.5 ms without refits; with this 1.17 ms, the quantile's 1.17), and the alarm counts
/// of `tests/evt_statistics.rs` and NAB's line stayed as they were (docs/NOTES.md).
const LAG_SHARE: usize = 25;

/// A score above `t + NEAR · (z − t)` is judged by a fit of every peak learned: a fit some lone
/// peaks old cannot have moved `z` by half its height over `t`.
const NEAR: f64 = 0.5;

/// The tail is fitted in full (every root of Grimshaw's equation searched) every this many
/// fits, in case another root than the one followed has become the likeliest; in between, a new
/// peak moves the root it has ([`Tail::refine`]: no pass over the peaks, where the search makes
/// ~150). On a sustained shift, where every score is a peak, the full search on each
/// (~1 ms over 200 peaks) cost 1.7 ms per record. On a stationary stream, searching in full on
/// every peak until the window of peaks was full made SPOT's judge 1.89 µs a score, 155× the
/// quantile's; following the root from the first fit on, 0.14 µs (12×), with the stationary
/// alarm counts of `tests/evt_statistics.rs` unchanged and NAB's line up on all three seeds
/// (docs/NOTES.md). The followed root differed from a full search's at most once in 3,000 fits,
/// so with Halley's refine (~2 passes a fit) the search every 32nd fit (~4.7 passes a fit) was
/// the bigger cost; every 256th it is ~0.6. A search that comes due inside a run of peaks (past
/// [`RUN_REFIT_ALL`], a sustained shift) waits for the run's end, whose catch-up fit makes it:
/// the run's own peaks are replacing the window meanwhile, so a search mid-run is soon out of
/// date, and the refits follow the root in between (a refine that fails searches at once, as
/// anywhere). Mid-run, a search (~90 µs over 200 peaks) every 4,096 peaks had cost more than
/// the rest of SPOT's judge (`hot_path -- threshold`, level shift: docs/NOTES.md).
const FULL_FIT_EVERY: usize = 256;

impl Spot {
    /// Calibrates on normal scores (any order).
    pub fn calibrate(cfg: &SpotConfig, scores: &[f64]) -> Spot {
        let mut sorted: Vec<f64> = scores.iter().copied().filter(|s| s.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let (t, excesses) = excesses(&sorted, cfg.level);
        // More peaks than we keep: keep evenly spaced order statistics, which preserve the
        // shape of the excess distribution (the largest ones alone would not).
        let keep = excesses.len().min(cfg.max_peaks);
        let peaks: VecDeque<f64> = (0..keep)
            .map(|i| excesses[i * excesses.len() / keep])
            .collect();
        let mut spot = Spot {
            q: cfg.q,
            exclude: cfg.exclude,
            max_peaks: cfg.max_peaks,
            t,
            n_peaks: excesses.len() as u64,
            n: sorted.len() as u64,
            tail: Arc::new(Tail::new(peaks)),
            gpd: Gpd {
                gamma: 0.0,
                sigma: 1.0,
            },
            z: f64::INFINITY,
            z_far: f64::INFINITY,
            // Searched in full first.
            refined: FULL_FIT_EVERY,
            root: None,
            fitted: (0, 0),
            run: 0,
        };
        spot.refit();
        spot
    }

    /// Fits the tail to the peaks: follows the last root, or searches for every root when one is
    /// due (see [`FULL_FIT_EVERY`]) and the key is not inside a sustained run, which defers it.
    fn refit(&mut self) {
        self.fitted = (self.n, self.n_peaks);
        if self.tail.peaks.is_empty() || self.n == 0 {
            self.z = f64::INFINITY;
            self.z_far = f64::INFINITY;
            return;
        }
        // A key refits only after its own first peak, so this does not copy a template's.
        let tail = Arc::make_mut(&mut self.tail);
        let refined = if self.refined < FULL_FIT_EVERY || self.run > RUN_REFIT_ALL {
            tail.refine(self.root)
        } else {
            None
        };
        let (gpd, root) = match refined {
            Some(fit) => {
                self.refined = self.refined.saturating_add(1);
                fit
            }
            None => {
                self.refined = 0;
                tail.search()
            }
        };
        (self.gpd, self.root) = (gpd, root);
        self.derive_thresholds();
    }

    /// Peaks were learned since the last fit.
    fn stale(&self) -> bool {
        self.n_peaks != self.fitted.1
    }

    /// `z` and `z_far` from the fit and the weight of its tail.
    fn derive_thresholds(&mut self) {
        let (n, n_peaks) = self.fitted;
        let ratio = self.q * n as f64 / n_peaks as f64;
        self.z = self.t + self.gpd.excess_at(ratio.min(1.0));
        self.z_far = self.t + self.gpd.excess_at((ratio * self.exclude).min(1.0));
    }

    /// P(S ≥ x) under the fitted tail; a linear ramp from 1 at 0 to the peaks' weight at `t`
    /// below it, where no tail model applies.
    pub fn tail_probability(&self, x: f64) -> f64 {
        let weight = if self.n == 0 {
            1.0
        } else {
            self.n_peaks as f64 / self.n as f64
        };
        if x > self.t {
            weight * self.gpd.survival(x - self.t)
        } else if self.t > 0.0 {
            weight + (1.0 - weight) * (1.0 - (x / self.t).clamp(0.0, 1.0))
        } else {
            1.0
        }
    }

    /// Judges `x`, then learns from it unless it is a gross anomaly. A peak refits the tail,
    /// with two exceptions that keep a fit's cost off most records: past the first
    /// [`RUN_REFIT_ALL`] peaks of a run every [`RUN_REFIT_EVERY`]th does and the run's end
    /// catches up; and a lone peak joins the next fit (at most 1/[`LAG_SHARE`] of the window's
    /// peaks later), unless a score near the threshold, which the fit decides, comes first.
    pub fn judge(&mut self, x: f64) -> Verdict {
        if self.run <= RUN_REFIT_ALL && self.stale() && x > self.t + NEAR * (self.z - self.t) {
            self.refit();
        }
        let verdict = Verdict::with_tail(x, self.z, self.tail_probability(x));
        if x > self.z_far || !x.is_finite() {
            return verdict;
        }
        self.n += 1;
        if x > self.t {
            self.n_peaks += 1;
            Arc::make_mut(&mut self.tail).push(x - self.t, self.max_peaks);
            self.run += 1;
            let due = match self.run {
                1 => self.n_peaks - self.fitted.1 >= self.lag(),
                run => run <= RUN_REFIT_ALL || run.is_multiple_of(RUN_REFIT_EVERY),
            };
            if due {
                self.refit();
            }
        } else {
            // The run is over: its catch-up fit may search.
            let ended = self.run > RUN_REFIT_ALL;
            self.run = 0;
            if ended && self.stale() {
                self.refit();
            }
        }
        verdict
    }

    /// Lone peaks a fit may leave out: 1/[`LAG_SHARE`] of the window, at least 1 (none left out).
    fn lag(&self) -> u64 {
        (self.tail.peaks.len() / LAG_SHARE).max(1) as u64
    }

    pub fn threshold(&self) -> f64 {
        self.z
    }

    pub fn gpd(&self) -> Gpd {
        self.gpd
    }
}

impl Threshold for Spot {
    fn judge(&mut self, score: f64) -> Verdict {
        Spot::judge(self, score)
    }
    fn threshold(&self) -> f64 {
        self.z
    }
    fn clone_box(&self) -> Box<dyn Threshold> {
        Box::new(self.clone())
    }
    fn snapshot(&self) -> ThresholdState {
        ThresholdState::Spot {
            t: self.t,
            peaks: self.tail.peaks.iter().copied().collect(),
            n: self.n,
            n_peaks: self.n_peaks,
            // JSON has no infinity: without a finite fit (no peaks yet) the restore refits, to
            // the same result.
            fit: [self.gpd.gamma, self.gpd.sigma, self.z, self.z_far]
                .iter()
                .all(|v| v.is_finite())
                .then_some(SpotFit {
                    gamma: self.gpd.gamma,
                    sigma: self.gpd.sigma,
                    root: self.root,
                    n: self.fitted.0,
                    n_peaks: self.fitted.1,
                    refined: self.refined,
                    run: self.run,
                    sums: Some(self.tail.sums),
                }),
        }
    }
    fn restore(&mut self, state: &ThresholdState) -> bool {
        let ThresholdState::Spot {
            t,
            peaks,
            n,
            n_peaks,
            fit,
        } = state
        else {
            return false;
        };
        self.t = *t;
        let keep = peaks.len().saturating_sub(self.max_peaks);
        let mut tail = Tail::new(peaks[keep..].iter().copied().collect());
        (self.n, self.n_peaks) = (*n, *n_peaks);
        match fit {
            // The same window: judge by the fit the key had, exactly as it would have.
            Some(f) if keep == 0 => {
                tail.sums = f.sums.unwrap_or(tail.sums);
                self.tail = Arc::new(tail);
                self.gpd = Gpd {
                    gamma: f.gamma,
                    sigma: f.sigma,
                };
                (self.root, self.fitted) = (f.root, (f.n, f.n_peaks));
                (self.refined, self.run) = (f.refined, f.run);
                self.derive_thresholds();
            }
            // An older version's snapshot, or a smaller window now: fit it afresh.
            _ => {
                self.tail = Arc::new(tail);
                self.refined = FULL_FIT_EVERY;
                self.run = 0;
                self.refit();
            }
        }
        true
    }
}

/// DSPOT: SPOT on the score minus its local level, the mean of the last `depth` normal scores.
#[derive(Debug, Clone)]
pub struct Dspot {
    spot: Spot,
    recent: VecDeque<f64>,
    depth: usize,
    sum: f64,
}

impl Dspot {
    /// Calibrates on normal scores. The calibration sample has no time order, so its residuals
    /// are taken around its mean, and the local level starts at that mean.
    pub fn calibrate(cfg: &SpotConfig, scores: &[f64]) -> Dspot {
        let n = scores.len().max(1) as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let residuals: Vec<f64> = scores.iter().map(|s| s - mean).collect();
        let recent: VecDeque<f64> = std::iter::repeat_n(mean, cfg.depth).collect();
        Dspot {
            spot: Spot::calibrate(cfg, &residuals),
            sum: mean * cfg.depth as f64,
            recent,
            depth: cfg.depth,
        }
    }

    fn level(&self) -> f64 {
        self.sum / self.recent.len().max(1) as f64
    }
}

impl Threshold for Dspot {
    fn judge(&mut self, score: f64) -> Verdict {
        let level = self.level();
        let mut v = self.spot.judge(score - level);
        v.threshold += level;
        if !v.is_anomaly && score.is_finite() {
            if self.recent.len() == self.depth {
                self.sum -= self.recent.pop_front().unwrap_or(0.0);
            }
            self.recent.push_back(score);
            self.sum += score;
        }
        v
    }
    fn threshold(&self) -> f64 {
        self.spot.threshold() + self.level()
    }
    fn clone_box(&self) -> Box<dyn Threshold> {
        Box::new(self.clone())
    }
    fn snapshot(&self) -> ThresholdState {
        ThresholdState::Dspot {
            spot: Box::new(self.spot.snapshot()),
            recent: self.recent.iter().copied().collect(),
        }
    }
    fn restore(&mut self, state: &ThresholdState) -> bool {
        let ThresholdState::Dspot { spot, recent } = state else {
            return false;
        };
        if recent.is_empty() || !self.spot.restore(spot) {
            return false;
        }
        let keep = recent.len().saturating_sub(self.depth);
        self.recent = recent[keep..].iter().copied().collect();
        self.sum = self.recent.iter().sum();
        true
    }
}

/// The scores of a calibration, as a slice to calibrate on.
pub fn calibration_scores(c: &Calibration) -> &[f64] {
    &c.sample
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Exp, Pareto};

    /// `n` seeded scores of the unit exponential distribution.
    fn exponential(seed: u64, n: usize) -> Vec<f64> {
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..n)
            .map(|_| Exp::new(1.0).unwrap().sample(&mut rng))
            .collect()
    }

    #[test]
    fn grimshaw_recovers_known_shapes() {
        let mut rng = SmallRng::seed_from_u64(1);
        // Exponential excesses: γ ≈ 0, σ ≈ mean.
        let exp: Vec<f64> = (0..5000)
            .map(|_| Exp::new(0.5).unwrap().sample(&mut rng))
            .collect();
        let g = Gpd::fit(&exp);
        assert!(
            g.gamma.abs() < 0.05 && (g.sigma - 2.0).abs() < 0.15,
            "{g:?}"
        );
        // Pareto(scale 1, α = 4) minus 1 is GPD with γ = 1/4, σ = 1/4.
        let par: Vec<f64> = (0..5000)
            .map(|_| Pareto::new(1.0, 4.0).unwrap().sample(&mut rng) - 1.0)
            .collect();
        let g = Gpd::fit(&par);
        assert!(
            (g.gamma - 0.25).abs() < 0.06 && (g.sigma - 0.25).abs() < 0.03,
            "{g:?}"
        );
        // A bounded tail, γ = -0.3, σ = 1, by inverting the survival function.
        let truth = Gpd {
            gamma: -0.3,
            sigma: 1.0,
        };
        let bounded: Vec<f64> = (0..5000)
            .map(|_| truth.excess_at(1.0 - rng.random::<f64>()))
            .collect();
        let g = Gpd::fit(&bounded);
        assert!(
            (g.gamma + 0.3).abs() < 0.05 && (g.sigma - 1.0).abs() < 0.06,
            "{g:?}"
        );
    }

    /// Two fits put every threshold from the peaks' scale out to a risk of 1e-6 within 1e-8 of
    /// each other. (Their shapes can differ more near γ = 0, where Grimshaw's `w` has a double
    /// root and its rounding noise leaves a root's last digits undetermined; the thresholds
    /// barely depend on γ there.)
    fn same_tail(a: &Gpd, b: &Gpd) -> bool {
        [0.5, 1e-2, 1e-4, 1e-6].iter().all(|&p| {
            let (x, y) = (a.excess_at(p), b.excess_at(p));
            (x - y).abs() <= 1e-8 * y.abs()
        })
    }

    /// Refining the last fit's root after each new peak finds the fit a full search finds, for
    /// heavy, light and bounded tails alike.
    #[test]
    fn refining_after_a_new_peak_finds_the_full_fit() {
        let mut rng = SmallRng::seed_from_u64(4);
        let truth = Gpd {
            gamma: -0.3,
            sigma: 1.0,
        };
        type Draw = Box<dyn FnMut(&mut SmallRng) -> f64>;
        let tails: [Draw; 3] = [
            Box::new(|r| Exp::new(2.0).unwrap().sample(r)),
            Box::new(|r| Pareto::new(1.0, 3.0).unwrap().sample(r) - 1.0),
            Box::new(move |r| truth.excess_at(1.0 - r.random::<f64>())),
        ];
        for mut draw in tails {
            let mut tail = Tail::new((0..200).map(|_| draw(&mut rng)).collect());
            let mut root = tail.search().1;
            let mut refined = 0;
            for _ in 0..300 {
                tail.push(draw(&mut rng), 200);
                let (full, full_root) =
                    Gpd::search(&tail.peaks.iter().copied().collect::<Vec<_>>());
                if let Some((r, _)) = root.and_then(|x| tail.refine(Some(x))) {
                    refined += 1;
                    assert!(same_tail(&r, &full), "{r:?} vs {full:?}");
                }
                root = full_root;
            }
            assert!(refined > 250, "refined {refined} of 300");
        }
    }

    /// Grimshaw's means at `x` ([`Series::at`]'s six), summed directly over `peaks`.
    fn exact_sums(peaks: &VecDeque<f64>, x: f64) -> [f64; 6] {
        let n = peaks.len() as f64;
        let mut sums = [0.0; 6];
        for &y in peaks {
            let s = 1.0 + x * y;
            sums[0] += s.ln();
            sums[1] += 1.0 / s;
            sums[2] += y / s;
            sums[3] -= y / (s * s);
            sums[4] -= y * y / (s * s);
            sums[5] += 2.0 * y * y / (s * s * s);
        }
        sums.map(|v| v / n)
    }

    /// The series a tail keeps, updated peak by peak as its window slides, gives the sums a
    /// pass over the peaks gives wherever it claims to cover, about roots of heavy, light and
    /// bounded tails; and it claims to cover a neighbourhood of its anchor, not just the anchor.
    #[test]
    fn the_series_sums_are_the_direct_sums_wherever_they_cover() {
        let mut rng = SmallRng::seed_from_u64(11);
        let mut checked = 0;
        for gamma in [-0.3, -0.05, 0.0, 0.1, 0.5] {
            let truth = Gpd { gamma, sigma: 2.0 };
            let mut draw = || truth.excess_at(1.0 - rng.random::<f64>());
            let mut tail = Tail::new((0..200).map(|_| draw()).collect());
            let (_, root) = tail.search();
            let x0 = root.unwrap_or(-0.01);
            let series = tail.series_at(x0).expect("anchored at a root");
            assert!(series.covers(x0 + 0.5 * RADIUS / series.z_max));
            for _ in 0..1000 {
                tail.push(draw(), 200);
            }
            let Some(series) = tail.sums.series else {
                // A bounded tail's new peak can leave the anchor's domain; it re-anchors then.
                assert!(x0 < 0.0, "lost the series of γ = {gamma}");
                continue;
            };
            assert!(
                (tail.sums.sum - tail.peaks.iter().sum::<f64>()).abs() <= 1e-12 * tail.sums.sum
            );
            checked += 1;
            for f in [-0.99, -0.5, 0.0, 0.3, 0.99] {
                let x = x0 + f * RADIUS / series.z_max;
                assert!(series.covers(x));
                let (got, want) = (series.at(200.0, x), exact_sums(&tail.peaks, x));
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() <= 1e-12 * w.abs().max(1e-3),
                        "γ = {gamma}, x = {x}: {got:?} vs {want:?}"
                    );
                }
            }
        }
        assert!(checked >= 4, "{checked} tails kept their series");
    }

    /// The bracketed root search finds the root 60 bisection steps find, to rounding, in far
    /// fewer evaluations of Grimshaw's `w` (each a pass over the peaks), on heavy, light and
    /// bounded tails.
    #[test]
    fn the_bracketed_root_is_the_bisected_one_in_fewer_evaluations() {
        let mut rng = SmallRng::seed_from_u64(9);
        let (mut brackets, mut evaluations) = (0, 0);
        for (i, tail) in [-0.3, 0.0, 0.25, 1.0]
            .into_iter()
            .cycle()
            .take(40)
            .enumerate()
        {
            let truth = Gpd {
                gamma: tail,
                sigma: 1.0 + i as f64,
            };
            let peaks: Vec<f64> = (0..200)
                .map(|_| truth.excess_at(1.0 - rng.random::<f64>()))
                .collect();
            let n = peaks.len() as f64;
            let count = std::cell::Cell::new(0);
            let w = |x: f64| {
                count.set(count.get() + 1);
                let (u, v) = peaks.iter().fold((0.0, 0.0), |(u, v), &y| {
                    let s = 1.0 + x * y;
                    (u + s.ln(), v + 1.0 / s)
                });
                (1.0 + u / n) * (v / n) - 1.0
            };
            let max = peaks.iter().fold(0.0f64, |m, &y| m.max(y));
            let grid: Vec<f64> = (1..64)
                .map(|k| -(k as f64) / 64.0 / max)
                .chain((0..64).map(|k| 1e-6 / max * 1e7f64.powf(k as f64 / 63.0)))
                .collect();
            for k in 1..grid.len() {
                let (a, b) = (grid[k - 1], grid[k]);
                let (fa, fb) = (w(a), w(b));
                if !(fa.is_finite() && fb.is_finite()) || fa.signum() == fb.signum() {
                    continue;
                }
                let (mut x0, mut x1, mut f0) = (a, b, fa);
                for _ in 0..60 {
                    let mid = 0.5 * (x0 + x1);
                    let fm = w(mid);
                    if fm.signum() == f0.signum() {
                        (x0, f0) = (mid, fm);
                    } else {
                        x1 = mid;
                    }
                }
                let bisected = 0.5 * (x0 + x1);
                count.set(0);
                let found = bracketed_root(&w, (a, fa), (b, fb));
                brackets += 1;
                evaluations += count.get();
                let fit = |x: f64| Gpd::at_root(&peaks, x).map(|(g, _)| g);
                let (Some(p), Some(q)) = (fit(found), fit(bisected)) else {
                    assert_eq!(fit(found), fit(bisected));
                    continue;
                };
                // Near x = 0 (γ ≈ 1e-7 here) both land somewhere in w's rounding noise around
                // its trivial double root, an exponential tail either way: their thresholds
                // still agree to 1e-5.
                let near = [0.5, 1e-4, 1e-6].iter().all(|&r| {
                    let (x, y) = (p.excess_at(r), q.excess_at(r));
                    (x - y).abs() <= 1e-5 * y.abs()
                });
                let noise = p.gamma.abs().max(q.gamma.abs()) < 1e-5;
                assert!(
                    same_tail(&p, &q) || (noise && near),
                    "{found} vs {bisected}: {p:?} vs {q:?}"
                );
            }
        }
        assert!(brackets >= 20, "{brackets} sign changes");
        // About 20 a root here (940 for 47), against 60 bisection steps.
        assert!(
            evaluations <= brackets * 25,
            "{evaluations} evaluations for {brackets} roots"
        );
    }

    #[test]
    fn the_threshold_has_the_requested_tail_probability() {
        let scores = exponential(2, 20_000);
        let cfg = SpotConfig {
            q: 1e-3,
            ..SpotConfig::default()
        };
        let spot = Spot::calibrate(&cfg, &scores);
        let truth = -(1e-3f64).ln(); // exponential: P(S > z) = e^-z
        assert!(
            (spot.threshold() - truth).abs() / truth < 0.1,
            "{} vs {truth}",
            spot.threshold()
        );
        assert!((spot.tail_probability(truth) - 1e-3).abs() < 3e-4);
        assert!(spot.tail_probability(0.0) == 1.0);
    }

    /// A key calibrated on exponential scores with `q = 1e-3`, and a sustained shift of scores
    /// between its threshold and its far limit.
    fn key_and_shift() -> (Spot, impl Fn(usize) -> f64) {
        let cfg = SpotConfig {
            q: 1e-3,
            ..SpotConfig::default()
        };
        let key = Spot::calibrate(&cfg, &exponential(3, 5000));
        let (z, z_far) = (key.z, key.z_far);
        (key, move |i| z + 0.3 * (z_far - z) + 0.01 * (i % 7) as f64)
    }

    /// The policy on a sustained shift: flagged scores below `z_far` are learned, so a shift
    /// the tail can reach is absorbed and its alarms stop; one beyond `z_far` is never learned
    /// and keeps alarming. Between full searches, fits follow their root.
    #[test]
    fn a_sustained_shift_within_reach_is_absorbed_and_one_beyond_keeps_alarming() {
        let (mut near, shifted) = key_and_shift();
        let mut far = near.clone();
        let (z, z_far) = (near.threshold(), near.z_far);
        let mut alarms = 0;
        for i in 0..600 {
            alarms += usize::from(near.judge(shifted(i)).is_anomaly);
            if i == 400 {
                assert!(
                    near.refined > 0,
                    "fits follow their root between full searches"
                );
            }
        }
        assert!(alarms < 50, "absorbed after {alarms} alarms");
        assert!(!near.judge(shifted(0)).is_anomaly);

        let beyond = 2.0 * z_far;
        assert!((0..600).all(|_| far.judge(beyond).is_anomaly));
        assert_eq!(far.threshold(), z, "nothing beyond z_far is learned");
    }

    /// On a sustained shift every score is a peak; the tail is refitted on each of a run's first
    /// 32 peaks and on every 16th after, so the threshold moves at most that often; the run's
    /// end refits. Lone peaks low in the tail then join every [`Spot::lag`]th one's fit, and a
    /// score near the threshold is judged by a fit of every peak learned.
    #[test]
    fn a_run_of_peaks_refits_every_sixteenth_peak_and_lone_peaks_join_the_next_fit() {
        let (mut key, shifted) = key_and_shift();
        let mut moves = Vec::new();
        for i in 1..=1000usize {
            let before = key.threshold();
            key.judge(shifted(i));
            if key.threshold() != before {
                moves.push(i);
            }
        }
        assert!(
            moves
                .iter()
                .all(|&i| i <= RUN_REFIT_ALL || i.is_multiple_of(RUN_REFIT_EVERY)),
            "moved at {moves:?}"
        );
        assert!(
            moves.len() >= (1000 - RUN_REFIT_ALL) / RUN_REFIT_EVERY,
            "the tail followed: {moves:?}"
        );
        assert!(key.stale(), "the run's last 8 peaks are not fitted yet");
        let before = key.threshold();
        key.judge(0.0);
        assert!(
            !key.stale() && key.threshold() != before,
            "the run's end refits"
        );
        let (before, low) = (key.threshold(), key.t + 0.01);
        assert_eq!(key.lag(), 8, "a full window of 200 peaks");
        for _ in 1..key.lag() {
            key.judge(low);
            key.judge(0.0);
        }
        assert!(
            key.stale() && key.threshold() == before,
            "low lone peaks wait"
        );
        key.judge(low);
        assert!(!key.stale() && key.threshold() != before, "the 8th refits");
        key.judge(0.0);
        key.judge(low);
        key.judge(0.0);
        let (before, near) = (key.threshold(), 0.9 * key.threshold() + 0.1 * key.t);
        let verdict = key.judge(near);
        assert!(verdict.threshold != before, "judged by a fresh fit");
    }

    /// A long-running key with a near-exponential tail (its root of Grimshaw's equation close
    /// to 0) follows its root from peak to peak and searches in full only on schedule
    /// ([`FULL_FIT_EVERY`]). (Newton on w itself stalled there: on this stream 161 full searches
    /// in 1,049 fits.)
    #[test]
    fn a_near_exponential_tail_is_followed_without_full_searches() {
        let mut key = Spot::calibrate(&SpotConfig::default(), &exponential(14, 2000));
        let (mut fits, mut searches) = (0, 0);
        for (i, &x) in exponential(2, 60_000).iter().enumerate() {
            let before = key.fitted;
            key.judge(x);
            if i > 10_000 && key.fitted != before {
                fits += 1;
                searches += usize::from(key.refined == 0);
            }
        }
        assert_eq!(key.tail.peaks.len(), key.max_peaks);
        assert!(fits > 150, "{fits} fits");
        let near_zero = key.root.is_some_and(|x| x.abs() * key.gpd.sigma < 0.2);
        assert!(near_zero, "root {:?}, {:?}", key.root, key.gpd);
        assert!(
            searches <= fits / FULL_FIT_EVERY + 1,
            "{searches} full searches in {fits} fits"
        );
    }

    /// A full search that comes due inside a sustained run waits for the run's end: over a run
    /// of 16 × 16 × [`FULL_FIT_EVERY`] peaks (a search due every 4,096 without the deferral) the
    /// fits follow their root, and the first fit after the run searches.
    #[test]
    fn a_full_search_due_inside_a_run_is_made_when_the_run_ends() {
        let (mut key, shifted) = key_and_shift();
        let (mut fits, mut searches) = (0, 0);
        let run = 16 * RUN_REFIT_EVERY * FULL_FIT_EVERY;
        // One peak past a refit, so that the run's end has a fit to catch up.
        for i in 1..=run + 1 {
            let before = key.fitted;
            key.judge(shifted(i));
            if i > RUN_REFIT_ALL && key.fitted != before {
                fits += 1;
                searches += usize::from(key.refined == 0);
            }
        }
        assert!(fits >= run / RUN_REFIT_EVERY - 4, "{fits} fits in the run");
        // A refine that fails (the root moving out of reach while the shift fills the window)
        // still searches at once; the schedule alone would have made 16.
        assert!(
            searches <= 2,
            "{searches} full searches in {fits} fits inside the run"
        );
        assert!(key.refined >= FULL_FIT_EVERY, "a search is due");
        key.judge(0.0);
        assert_eq!(key.refined, 0, "the run's end searched");
    }

    /// Inside a run a key judges by a fit some peaks old; its snapshot carries that fit, so a
    /// key restored from it (through JSON, as the state topic stores it) judges exactly alike.
    /// A snapshot without the fit (an older version's) still restores, refitting.
    #[test]
    fn a_key_restored_inside_a_run_judges_by_the_fit_of_the_key_it_was_taken_from() {
        let (template, shifted) = key_and_shift();
        let mut key = template.clone();
        for i in 0..203 {
            key.judge(shifted(i));
        }
        assert!(key.stale());
        let json = serde_json::to_string(&key.snapshot()).unwrap();
        let state: ThresholdState = serde_json::from_str(&json).unwrap();
        let mut restored = template.clone();
        assert!(restored.restore(&state));
        let mut stream = exponential(4, 2000);
        stream.splice(0..0, (203..400).map(shifted));
        for x in stream {
            let (a, b) = (key.judge(x), restored.judge(x));
            assert_eq!(a.threshold.to_bits(), b.threshold.to_bits());
            assert_eq!(a.is_anomaly, b.is_anomaly);
        }

        let ThresholdState::Spot {
            t,
            peaks,
            n,
            n_peaks,
            ..
        } = key.snapshot()
        else {
            unreachable!()
        };
        let old = serde_json::json!({"method": "spot", "t": t, "peaks": peaks, "n": n, "n_peaks": n_peaks});
        let old: ThresholdState = serde_json::from_value(old).unwrap();
        let mut refitted = template.clone();
        assert!(refitted.restore(&old));
        assert!(refitted.threshold().is_finite());
    }

    #[test]
    fn a_key_shares_the_template_peaks_until_its_own_first_peak() {
        let scores: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        let template = Spot::calibrate(&SpotConfig::default(), &scores);
        let mut key = template.clone();
        assert!(Arc::ptr_eq(&key.tail, &template.tail));
        key.judge(0.1);
        assert!(Arc::ptr_eq(&key.tail, &template.tail));
        key.judge(0.985);
        assert!(!Arc::ptr_eq(&key.tail, &template.tail));
    }
}
