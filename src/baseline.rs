//! Baseline: a slow per-key level subtracted from drifting features before the model sees them
//! (the model contract's `anomalyd.baseline`, docs/MODEL-CONTRACT.md).
//!
//! A temperature that follows the ambient drifts further from the training rows every day; fed
//! its distance from the key's own recent level instead of its value, the model sees what stays
//! stationary, and a step, spike or fast ramp still stands out. For each listed feature and key,
//! in record order, with `n` the key's records before this one:
//!
//! ```text
//! r = x - b                                  (0 for the key's first record, where b = x)
//! b = b + max(alpha, 1/(n+1)) * clamp(r, -clip, +clip)
//! ```
//!
//! `clip` bounds how far one record moves the level, so a fault keeps standing out for its whole
//! length instead of being learned. The toolkit computes exactly this on the training data
//! (`models/anomalyd_train/baseline.py`), in f64 as here: training and serving agree.

use serde::{Deserialize, Serialize};

/// The baseline as the model file states it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    pub features: Vec<String>,
    pub half_life: f64,
    pub clip: Vec<f64>,
}

/// A checked baseline over a model's features (serialized as the file states it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Baseline {
    /// The baselined features' names, in the file's order.
    pub features: Vec<String>,
    half_life: f64,
    clip: Vec<f64>,
    /// The features' indices among the model's features.
    #[serde(skip)]
    indices: Vec<usize>,
    #[serde(skip)]
    alpha: f64,
}

/// One key's levels, one per baselined feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Level {
    levels: Vec<f64>,
    /// Records of the key seen so far.
    seen: u64,
}

impl Baseline {
    /// Checks `spec` against the model's `features`; the error completes "anomalyd.baseline ...".
    pub fn new(spec: BaselineSpec, features: &[String]) -> Result<Baseline, String> {
        if spec.features.is_empty() {
            return Err("lists no feature".into());
        }
        if spec.clip.len() != spec.features.len() {
            return Err(format!(
                "has {} clip values for {} features",
                spec.clip.len(),
                spec.features.len()
            ));
        }
        if !(spec.half_life.is_finite() && spec.half_life >= 1.0) {
            return Err(format!(
                "half_life must be at least 1 record, found {}",
                spec.half_life
            ));
        }
        if let Some(c) = spec.clip.iter().find(|c| !(c.is_finite() && **c > 0.0)) {
            return Err(format!("clip values must be positive, found {c}"));
        }
        let mut indices = Vec::with_capacity(spec.features.len());
        for (i, name) in spec.features.iter().enumerate() {
            if spec.features[..i].contains(name) {
                return Err(format!("lists {name:?} twice"));
            }
            let j = features.iter().position(|f| f == name).ok_or_else(|| {
                format!("names {name:?}, which is not one of the model's features {features:?}")
            })?;
            indices.push(j);
        }
        Ok(Baseline {
            features: spec.features,
            half_life: spec.half_life,
            clip: spec.clip,
            indices,
            alpha: 1.0 - (-1.0 / spec.half_life).exp2(),
        })
    }

    /// Records after which a value weighs half in a level.
    pub fn half_life(&self) -> f64 {
        self.half_life
    }

    /// A new key's levels: set by its first record.
    pub fn start(&self) -> Level {
        Level {
            levels: vec![0.0; self.indices.len()],
            seen: 0,
        }
    }

    /// Whether `level` holds this baseline's levels (a restored one is reused only if it does).
    pub fn fits(&self, level: &Level) -> bool {
        level.levels.len() == self.indices.len()
    }

    /// Replaces the baselined values of `row` (one record, in the model's feature order) by their
    /// distance from the key's level, and moves the level.
    pub fn apply(&self, level: &mut Level, row: &mut [f32]) {
        let n = level.seen;
        let weight = self.alpha.max(1.0 / (n as f64 + 1.0));
        for ((&j, b), &clip) in self.indices.iter().zip(&mut level.levels).zip(&self.clip) {
            let x = row[j] as f64;
            if n == 0 {
                *b = x;
                row[j] = 0.0;
                continue;
            }
            let r = x - *b;
            row[j] = r as f32;
            *b += weight * r.clamp(-clip, clip);
        }
        level.seen = n.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline(half_life: f64, clip: f64) -> Baseline {
        let spec = BaselineSpec {
            features: vec!["t".into()],
            half_life,
            clip: vec![clip],
        };
        Baseline::new(spec, &["a".into(), "t".into()]).unwrap()
    }

    fn run(b: &Baseline, xs: impl IntoIterator<Item = f32>) -> Vec<f32> {
        let mut level = b.start();
        xs.into_iter()
            .map(|x| {
                let mut row = [7.0, x];
                b.apply(&mut level, &mut row);
                assert_eq!(row[0], 7.0, "a feature not listed is left alone");
                row[1]
            })
            .collect()
    }

    #[test]
    fn early_records_are_measured_from_the_running_mean() {
        let out = run(&baseline(1000.0, 100.0), [10.0, 12.0, 14.0, 4.0]);
        // levels: 10, then mean(10, 12) = 11, then mean(10, 12, 14) = 12.
        assert_eq!(out, [0.0, 2.0, 3.0, -8.0]);
    }

    #[test]
    fn a_slow_drift_is_followed_and_a_step_keeps_standing_out() {
        let b = baseline(50.0, 1.0);
        // 2000 records drifting by 0.001 each: the residual settles near slope / alpha.
        let drift: Vec<f32> = (0..2000).map(|i| 20.0 + 0.001 * i as f32).collect();
        let out = run(&b, drift.iter().copied());
        let lag = 0.001 / (1.0 - (-1.0f64 / 50.0).exp2());
        assert!(
            (out[1999] as f64 - lag).abs() < 0.01,
            "{} vs {lag}",
            out[1999]
        );
        // A step of 10 (ten clips) for 100 records: the level moves by at most alpha * clip
        // per record, so the step still reads above 8 at its end.
        let mut stepped = drift.clone();
        stepped.extend((0..100).map(|i| 32.0 + 0.001 * i as f32));
        let out = run(&b, stepped);
        assert!(out[2000..].iter().all(|&r| r > 8.0), "{:?}", &out[2095..]);
    }

    #[test]
    fn specs_that_cannot_work_are_refused() {
        let features = ["a".to_string(), "t".to_string()];
        let spec = |f: &[&str], half_life: f64, clip: &[f64]| BaselineSpec {
            features: f.iter().map(|s| s.to_string()).collect(),
            half_life,
            clip: clip.to_vec(),
        };
        for (s, expected) in [
            (
                spec(&["x"], 50.0, &[1.0]),
                "not one of the model's features",
            ),
            (spec(&["t", "t"], 50.0, &[1.0, 1.0]), "twice"),
            (spec(&["t"], 0.5, &[1.0]), "half_life"),
            (spec(&["t"], 50.0, &[0.0]), "positive"),
            (spec(&["t"], 50.0, &[]), "clip values for"),
            (spec(&[], 50.0, &[]), "no feature"),
        ] {
            let e = Baseline::new(s, &features).unwrap_err();
            assert!(e.contains(expected), "{e}");
        }
    }
}
