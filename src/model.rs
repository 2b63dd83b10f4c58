//! Models: ONNX files under the model contract (`docs/MODEL-CONTRACT.md`), loaded by tract.
//!
//! A [`Model`] is loaded once, checked against the contract, optimised into one tract plan and
//! shared (through `Arc`) by every inference thread: `run` spawns a fresh, cheap execution state
//! per call, so concurrent batches never contend on a lock.
//!
//! Every error names the file, so an operator with ten pipelines knows which model to fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod affine;
mod recurrent;

use crate::baseline::Baseline;
use serde::{Deserialize, Serialize};
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

/// What went wrong loading or running a model. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {path}: cannot read the file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model {path}: not a model tract can load: {reason}")]
    Onnx { path: PathBuf, reason: String },
    #[error("model {path}: metadata `{key}` {reason}")]
    Metadata {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("model {path}: {reason}")]
    Contract { path: PathBuf, reason: String },
    #[error("model {path}: inference failed: {reason}")]
    Inference { path: PathBuf, reason: String },
}

/// The model families the training toolkit produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Pca,
    Dense,
    Conv,
    Vae,
    Sparse,
    Stacked,
    Denoising,
    Lstm,
    Gru,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!("unknown kind {s:?} (expected pca, dense, conv, vae, sparse, stacked, denoising, lstm or gru)")
        })
    }
}

/// A summary of the model's scores on held-back normal data, used to warm-start thresholds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Calibration {
    /// Number of held-back samples the summary was computed from.
    pub count: u64,
    pub mean: f64,
    pub std: f64,
    /// Selected quantiles of the score, keyed by level ("0.99").
    #[serde(default)]
    pub quantiles: BTreeMap<String, f64>,
    /// Up to a few thousand held-back scores, sorted ascending.
    #[serde(default)]
    pub sample: Vec<f64>,
    /// Mean `error` per feature on the held-back data.
    #[serde(default)]
    pub feature_mean: Vec<f64>,
}

impl Calibration {
    /// The calibration of scores seen elsewhere than on held-back data (a key's scores at a
    /// level accepted as its new normal; a test's draws), summarised as the toolkit would.
    pub fn of_scores(mut sample: Vec<f64>) -> Calibration {
        sample.sort_by(f64::total_cmp);
        let n = sample.len().max(1) as f64;
        let mean = sample.iter().sum::<f64>() / n;
        let var = sample.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Calibration {
            count: sample.len() as u64,
            mean,
            std: var.sqrt(),
            sample,
            ..Calibration::default()
        }
    }
}

/// Everything the daemon reads from a model file.
#[derive(Debug, Clone, Serialize)]
pub struct Contract {
    pub name: String,
    pub kind: Kind,
    pub features: Vec<String>,
    /// Rows per sample: 1 for point models, T for sequence models.
    pub window: usize,
    /// `[C, H, W]` for image models.
    pub shape: Option<Vec<usize>>,
    /// Input dimensions after the batch dimension.
    pub sample_shape: Vec<usize>,
    pub version: String,
    pub trained_at: Option<String>,
    pub training_data: Option<serde_json::Value>,
    pub calibration: Calibration,
    /// Features measured from a slow per-key level (`anomalyd.baseline`), if any.
    pub baseline: Option<Baseline>,
}

impl Contract {
    /// Number of f32 values in one sample.
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// True for models that score a window of an entity's last rows rather than one record.
    pub fn is_sequence(&self) -> bool {
        self.shape.is_none() && self.window > 1
    }
}

/// The outputs of one batch: `errors[i * F + f]` and `reconstructions[i * sample_len + j]`.
#[derive(Debug, Default)]
pub struct Inference {
    pub errors: Vec<f32>,
    pub reconstructions: Vec<f32>,
}

/// A loaded, optimised model.
#[derive(Debug)]
pub struct Model {
    pub path: PathBuf,
    pub contract: Contract,
    /// Each call runs in a fresh state of the plan (≈ 1.4 µs). Reusing states would save that,
    /// but a reused state of a recurrent model keeps the batch size of its first call
    /// (tract 0.23: "Clashing resolution for expression. batch=1 != 2" in the `Scan`).
    plan: Arc<TypedRunnableModel>,
}

const META_PREFIX: &str = "anomalyd.";

/// Keeps the buffers freed after an inference for the next one, process-wide (glibc on Linux;
/// elsewhere nothing). tract allocates every intermediate tensor of a call afresh, and glibc
/// serves blocks from 128 KiB up (the threshold adapts, but only so far) by `mmap`, and returns
/// a heap top of more than twice that to the kernel: every call then faults its buffers in
/// again, zeroed. The demo-lstm at batch 256 (buffers of 512 KiB) faulted ~65k pages a second
/// and spent 17 % of its time in the kernel; it ran at 1.9-2.5 ms a call against 1.5 ms with
/// the thresholds below, the gap varying with the machine's memory pressure (docs/NOTES.md).
/// The cost: a heap top of up to 64 MiB that the peak load touched stays resident. `unsafe`
/// because it is FFI: glibc reads its `MALLOC_*_` variables before `main`, so only `mallopt`
/// can set this from inside the process.
#[allow(unsafe_code)]
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; both are valid options and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

impl Model {
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(&path, &bytes)
    }

    /// Loads a model from its bytes; `path` is only used to name it in errors and as the
    /// default model name.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Model, ModelError> {
        let onnx_err = |e: TractError| ModelError::Onnx {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        };
        let contract_err = |reason: String| ModelError::Contract {
            path: path.to_path_buf(),
            reason,
        };
        let mut onnx = tract_onnx::onnx();
        recurrent::register(&mut onnx);
        let proto: ModelProto = onnx.proto_model_for_read(&mut &*bytes).map_err(onnx_err)?;
        let meta: BTreeMap<&str, &str> = proto
            .metadata_props
            .iter()
            .filter_map(|e| Some((e.key.strip_prefix(META_PREFIX)?, e.value.as_str())))
            .collect();
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| contract_err("the file has no graph".into()))?;
        let input_names: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
        if input_names != ["input"] {
            return Err(contract_err(format!(
                "expected exactly one input named `input`, found {input_names:?}"
            )));
        }
        let output_names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        for wanted in ["error", "reconstruction"] {
            if !output_names.contains(&wanted) {
                return Err(contract_err(format!(
                    "expected outputs `error` and `reconstruction`, found {output_names:?}"
                )));
            }
        }

        let mut contract = parse_metadata(path, &meta)?;

        let mut model = onnx.model_for_proto_model(&proto).map_err(onnx_err)?;
        model
            .select_outputs_by_name(["error", "reconstruction"])
            .map_err(onnx_err)?;
        let typed = model.into_typed().map_err(onnx_err)?;
        // Without it, tract cannot prove that a tensor of `batch` x n elements is big enough for
        // its vectorised element-wise kernels, and runs such Adds and Muls in its generic
        // broadcasting loop (docs/NOTES.md, "tract 0.23.9 and the model designs").
        if let Some(TDim::Sym(batch)) = typed.input_fact(0).map_err(onnx_err)?.shape.dims().first()
        {
            let assertion = format!("{batch} >= 1");
            typed.symbols.add_assertion(assertion).map_err(onnx_err)?;
        }
        let mut typed = typed.into_decluttered().map_err(onnx_err)?;
        affine::fuse(&mut typed).map_err(onnx_err)?;
        let typed = typed.into_optimized().map_err(onnx_err)?;
        let input = typed.input_fact(0).map_err(onnx_err)?.clone();
        if input.datum_type != f32::datum_type() {
            return Err(contract_err(format!(
                "input must be float32, found {:?}",
                input.datum_type
            )));
        }
        let dims = input.shape.dims();
        let sample_shape: Option<Vec<usize>> =
            dims.iter().skip(1).map(|d| d.to_usize().ok()).collect();
        let Some(sample_shape) = sample_shape.filter(|_| dims.len() >= 2) else {
            return Err(contract_err(format!(
                "input shape {input:?} must be [batch, ...] with every dimension but the batch fixed"
            )));
        };
        let f = contract.features.len();
        let expected: Vec<usize> = match &contract.shape {
            Some(chw) => chw.clone(),
            None if sample_shape.len() == 1 && contract.window == 1 => vec![f],
            None => vec![contract.window, f],
        };
        if sample_shape != expected {
            return Err(contract_err(format!(
                "input is [batch, {}] but the metadata (window {}, {} features{}) implies [batch, {}]",
                join(&sample_shape),
                contract.window,
                f,
                contract
                    .shape
                    .as_ref()
                    .map(|s| format!(", shape {s:?}"))
                    .unwrap_or_default(),
                join(&expected)
            )));
        }
        if !contract.calibration.feature_mean.is_empty()
            && contract.calibration.feature_mean.len() != f
        {
            return Err(ModelError::Metadata {
                path: path.to_path_buf(),
                key: "calibration",
                reason: format!(
                    "has {} feature means for {f} features",
                    contract.calibration.feature_mean.len()
                ),
            });
        }
        contract.sample_shape = sample_shape;
        let plan = typed.into_runnable().map_err(onnx_err)?;
        let model = Model {
            path: path.to_path_buf(),
            contract,
            plan,
        };
        // Run one sample through the plan now, so a model that loads but cannot run (or whose
        // outputs have the wrong shape) is refused at start-up rather than on the first record.
        // A model whose weights went NaN in training passes every other check and then judges
        // nothing (every record a `non_finite_score` dead letter): refuse it here too.
        let probe = vec![0.0f32; model.contract.sample_len()];
        let out = model.infer(&probe, 1)?;
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&out.errors) || !finite(&out.reconstructions) {
            return Err(ModelError::Contract {
                path: path.to_path_buf(),
                reason: "its outputs on a probe sample (all zeros) are not finite numbers \
                         (NaN or infinity): its weights are probably broken"
                    .into(),
            });
        }
        Ok(model)
    }

    /// The optimised tract plan, for tools that time or profile it directly (benches/).
    pub fn plan(&self) -> &Arc<TypedRunnableModel> {
        &self.plan
    }

    /// Runs `n` samples (`input.len() == n * sample_len`) through the model.
    pub fn infer(&self, input: &[f32], n: usize) -> Result<Inference, ModelError> {
        let fail = |reason: String| ModelError::Inference {
            path: self.path.clone(),
            reason,
        };
        let per = self.contract.sample_len();
        if input.len() != n * per {
            return Err(fail(format!(
                "batch of {n} samples needs {} values, got {}",
                n * per,
                input.len()
            )));
        }
        if n == 0 {
            return Ok(Inference::default());
        }
        let mut shape = vec![n];
        shape.extend(&self.contract.sample_shape);
        let tensor = Tensor::from_shape(&shape, input).map_err(|e| fail(format!("{e:#}")))?;
        let outputs = self
            .plan
            .run(tvec![tensor.into()])
            .map_err(|e| fail(format!("{e:#}")))?;
        clear_upper_vector_state();
        let f = self.contract.features.len();
        let errors = read_output(&outputs[0], n * f, "error").map_err(fail)?;
        let reconstructions = read_output(&outputs[1], n * per, "reconstruction").map_err(fail)?;
        Ok(Inference {
            errors,
            reconstructions,
        })
    }
}

/// tract's AVX-512 kernels return with the upper halves of the vector registers dirty, and on
/// Intel cores every SSE instruction after them in the same thread (decode, thresholds, output:
/// the crate is built for baseline x86-64) then pays for it: SPOT judged 12x slower after a
/// model had run (`benches/hot_path.rs`, docs/NOTES.md). `vzeroupper` makes the state clean.
fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, which is all the intrinsic requires; vzeroupper zeroes only
        // bits 128 and up of ymm0-15, which code built without AVX never holds values in.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm256_zeroupper()
        };
    }
}

fn read_output(value: &TValue, expected_len: usize, name: &str) -> Result<Vec<f32>, String> {
    let view = value
        .to_plain_array_view::<f32>()
        .map_err(|e| format!("output `{name}` is not float32: {e:#}"))?;
    if view.len() != expected_len {
        return Err(format!(
            "output `{name}` has shape {:?}, expected {expected_len} values",
            view.shape()
        ));
    }
    Ok(match view.as_slice() {
        Some(contiguous) => contiguous.to_vec(),
        None => view.iter().copied().collect(),
    })
}

fn join(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The longest window a model may read.
pub const MAX_WINDOW: usize = 10_000;
/// The most values in one sample (window × features, or C × H × W): 4 MiB of float32.
pub const MAX_SAMPLE_VALUES: usize = 1 << 20;

fn parse_metadata(path: &Path, meta: &BTreeMap<&str, &str>) -> Result<Contract, ModelError> {
    let bad = |key: &'static str, reason: String| ModelError::Metadata {
        path: path.to_path_buf(),
        key,
        reason,
    };
    let required = |key: &'static str| -> Result<&str, ModelError> {
        meta.get(key).copied().ok_or_else(|| {
            bad(
                key,
                "is missing: train the model with anomalyd-train, or add it (see docs/MODEL-CONTRACT.md)".into(),
            )
        })
    };
    fn json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
        serde_json::from_str(text).map_err(|e| format!("is not valid: {e}"))
    }

    let kind: Kind = required("kind")?
        .parse()
        .map_err(|e: String| bad("kind", e))?;
    let features: Vec<String> = json(required("features")?).map_err(|e| bad("features", e))?;
    if features.is_empty() {
        return Err(bad("features", "lists no feature".into()));
    }
    for (i, f) in features.iter().enumerate() {
        if features[..i].contains(f) {
            return Err(bad("features", format!("lists {f:?} twice")));
        }
    }
    let window: usize = required("window")?
        .trim()
        .parse()
        .map_err(|_| bad("window", "must be a positive integer".into()))?;
    if !(1..=MAX_WINDOW).contains(&window) {
        return Err(bad(
            "window",
            format!("must be between 1 and {MAX_WINDOW} rows, found {window}"),
        ));
    }
    let shape: Option<Vec<usize>> = meta
        .get("shape")
        .map(|s| json(s).map_err(|e| bad("shape", e)))
        .transpose()?;
    if let Some(s) = &shape {
        if s.len() != 3 || s[0] != features.len() {
            return Err(bad(
                "shape",
                format!(
                    "must be [C, H, W] with C = {} features, found {s:?}",
                    features.len()
                ),
            ));
        }
    }
    // Each key holds a window of rows, and each sample is one allocation per inference: both
    // are bounded before anything is allocated for them.
    let values = match &shape {
        Some(s) => s.iter().try_fold(1usize, |n, d| n.checked_mul(*d)),
        None => window.checked_mul(features.len()),
    };
    if values.is_none_or(|n| n > MAX_SAMPLE_VALUES) {
        return Err(bad(
            if shape.is_some() { "shape" } else { "window" },
            format!(
                "makes samples of more than {MAX_SAMPLE_VALUES} values ({})",
                values.map_or("overflow".into(), |n| n.to_string())
            ),
        ));
    }
    // Every new key's threshold starts from the calibration: without it (or with an empty or
    // all-zero sample) every record of normal data can be judged anomalous.
    let calibration: Calibration =
        json(required("calibration")?).map_err(|e| bad("calibration", e))?;
    if calibration.sample.iter().any(|v| !v.is_finite()) {
        return Err(bad(
            "calibration",
            "has a non-finite score in `sample`".into(),
        ));
    }
    if calibration.count == 0 || !calibration.sample.iter().any(|v| *v > 0.0) {
        return Err(bad(
            "calibration",
            "has no held-back score above zero (`count` 0, or `sample` empty or all zero): recalibrate the model on held-back normal data".into(),
        ));
    }
    let baseline = meta
        .get("baseline")
        .map(|s| {
            if shape.is_some() {
                return Err("applies to tabular features, not to image-shaped records".to_string());
            }
            Baseline::new(json(s)?, &features)
        })
        .transpose()
        .map_err(|e| bad("baseline", e))?;
    let version = required("version")?.trim();
    if version.is_empty() {
        return Err(bad("version", "is empty".into()));
    }
    let trained_at = required("trained_at")?;
    let training_data: serde_json::Value =
        json(required("training_data")?).map_err(|e| bad("training_data", e))?;
    let name = meta
        .get("name")
        .map(|s| s.to_string())
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    Ok(Contract {
        name,
        kind,
        features,
        window,
        shape,
        sample_shape: Vec::new(),
        version: version.to_string(),
        trained_at: Some(trained_at.to_string()),
        training_data: Some(training_data),
        calibration,
        baseline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes that would allocate without bound, and features named twice, are refused from the
    /// metadata alone, before tract or the probe allocates anything.
    #[test]
    fn metadata_that_would_allocate_without_bound_is_refused_naming_the_key() {
        let path = Path::new("m.onnx");
        let parse = |changes: &[(&'static str, &'static str)]| {
            let mut meta: BTreeMap<&str, &str> = [
                ("kind", "dense"),
                ("features", r#"["a", "b", "c"]"#),
                ("window", "1"),
                (
                    "calibration",
                    r#"{"count": 10, "mean": 0.1, "std": 0.01, "sample": [0.05, 0.1, 0.2]}"#,
                ),
                ("version", "1.0.0"),
                ("trained_at", "2026-11-28T00:00:00Z"),
                (
                    "training_data",
                    r#"{"sha256": "00", "rows": 10, "file": "t.csv"}"#,
                ),
            ]
            .into_iter()
            .collect();
            meta.extend(changes.iter().copied());
            meta.retain(|_, v| *v != "<absent>");
            parse_metadata(path, &meta)
                .map(|_| ())
                .map_err(|e| match e {
                    ModelError::Metadata { key, .. } => key,
                    other => panic!("{other}"),
                })
        };
        assert_eq!(parse(&[]), Ok(()));
        assert_eq!(parse(&[("window", "50000000")]), Err("window"));
        assert_eq!(parse(&[("window", "10000")]), Ok(()));
        assert_eq!(
            parse(&[("kind", "conv"), ("shape", "[3, 100000, 100000]")]),
            Err("shape")
        );
        assert_eq!(
            parse(&[("shape", "[3, 18446744073709551615, 2]")]),
            Err("shape")
        );
        assert_eq!(
            parse(&[("features", r#"["a", "b", "a"]"#)]),
            Err("features")
        );
        // Issue 10, finding 11: the contract's required metadata, and a calibration that can
        // warm-start a threshold (1500/1500 normal points flagged without one).
        for key in ["calibration", "version", "trained_at", "training_data"] {
            assert_eq!(parse(&[(key, "<absent>")]), Err(key));
        }
        let zeros = r#"{"count": 10, "mean": 0.0, "std": 0.0, "sample": [0.0, 0.0]}"#;
        let empty = r#"{"count": 0, "mean": 0.1, "std": 0.01, "sample": []}"#;
        assert_eq!(parse(&[("calibration", zeros)]), Err("calibration"));
        assert_eq!(parse(&[("calibration", empty)]), Err("calibration"));
    }

    /// A call sees nothing of the one before (the recurrent model's hidden state included),
    /// whatever the batch sizes.
    #[test]
    fn a_call_sees_nothing_of_the_one_before() {
        for name in ["demo-dense.onnx", "demo-lstm.onnx"] {
            let model = Model::load(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("models")
                    .join(name),
            )
            .unwrap();
            let per = model.contract.sample_len();
            let sample = |seed: f32| -> Vec<f32> {
                (0..per)
                    .map(|i| ((i as f32 + seed) * 0.37).sin() * 3.0)
                    .collect()
            };
            let (a, b) = (sample(0.0), sample(11.0));
            let first = model.infer(&a, 1).unwrap();
            let two = [b.clone(), b].concat();
            model.infer(&two, 2).unwrap();
            let again = model.infer(&a, 1).unwrap();
            assert_eq!(first.errors, again.errors, "{name}");
            assert_eq!(first.reconstructions, again.reconstructions, "{name}");
        }
    }
}
