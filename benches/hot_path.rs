//! The hot path, stage by stage: decode, window + batch (prepare), inference, judge
//! (score + threshold + hysteresis), and a whole replay, per record.
//!
//!     cargo bench --bench hot_path
//!
//! Uses the shipped demo models and generated demo records, so it runs without any set-up.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use anomalyd::config::Config;
use anomalyd::demo::stream::Fleet;
use anomalyd::detect::{Detector, Origin};
use anomalyd::model::Model;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const BATCH: usize = 256;

fn detector(model: &str, method: &str) -> Detector {
    let toml = format!(
        "[pipelines.p]\ntopics = [\"in\"]\nmodel = \"{}/models/{model}\"\nkey_field = \"host\"\n[pipelines.p.threshold]\nmethod = \"{method}\"\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg = Config::from_toml(&toml, Some(HashMap::new())).unwrap();
    let p = &cfg.pipelines["p"];
    p.detector()
        .build("p", Arc::new(Model::load(&p.model).unwrap()))
        .unwrap()
}

/// 20 hosts' records, as the JSON the daemon consumes.
fn records(n: usize) -> Vec<String> {
    let mut fleet = Fleet::new(20, (n / 20 + 1) as u64, 0, 1);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.extend(fleet.next_tick().into_iter().map(|r| r.to_json()));
    }
    out.truncate(n);
    out
}

fn stages(c: &mut Criterion) {
    let json = records(BATCH);
    let topic: Arc<str> = Arc::from("in");
    for (model, method) in [
        ("demo-dense.onnx", "quantile"),
        ("demo-dense.onnx", "spot"),
        ("demo-lstm.onnx", "quantile"),
    ] {
        let mut g = c.benchmark_group(format!("{model}/{method}"));
        g.throughput(Throughput::Elements(BATCH as u64));
        let mut d = detector(model, method);
        let decoder = d.decoder().clone();
        g.bench_function("decode", |b| {
            b.iter(|| {
                for j in &json {
                    black_box(decoder.decode_json(j.as_bytes()).unwrap());
                }
            })
        });
        let decoded: Vec<_> = json
            .iter()
            .map(|j| {
                (
                    Origin {
                        topic: topic.clone(),
                        partition: 0,
                        offset: 0,
                    },
                    decoder.decode_json(j.as_bytes()).unwrap(),
                )
            })
            .collect();
        // Fill every window first, so every record is scored.
        for _ in 0..20 {
            let mut batch = d.prepare(decoded.clone());
            let samples = std::mem::take(&mut batch.samples);
            let inf = batch.model.infer(&samples, batch.sample_count()).unwrap();
            d.judge(batch, &inf);
        }
        g.bench_function("prepare", |b| {
            b.iter_batched(
                || decoded.clone(),
                |recs| d.prepare(recs),
                BatchSize::SmallInput,
            )
        });
        let mut batch = d.prepare(decoded.clone());
        let samples = std::mem::take(&mut batch.samples);
        let n = batch.sample_count();
        let model = batch.model.clone();
        g.bench_function("infer", |b| b.iter(|| model.infer(&samples, n).unwrap()));
        let inference = model.infer(&samples, n).unwrap();
        let d = std::cell::RefCell::new(d);
        g.bench_function("judge", |b| {
            b.iter_batched(
                || {
                    let mut batch = d.borrow_mut().prepare(decoded.clone());
                    batch.samples.clear();
                    batch
                },
                |batch| d.borrow_mut().judge(batch, &inference),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

fn replay(c: &mut Criterion) {
    let n = 20_000;
    let input: String = records(n).into_iter().map(|j| j + "\n").collect();
    let toml = format!(
        "[pipelines.p]\ntopics = [\"in\"]\nmodel = \"{}/models/demo-dense.onnx\"\nkey_field = \"host\"\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg = Config::from_toml(&toml, Some(HashMap::new())).unwrap();
    let p = &cfg.pipelines["p"];
    let model = Arc::new(Model::load(&p.model).unwrap());
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(20);
    for (name, format) in [
        ("ndjson->csv", anomalyd::replay::Format::Csv),
        ("ndjson->ndjson", anomalyd::replay::Format::Ndjson),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(n * 120);
                anomalyd::replay::replay(
                    "p",
                    p,
                    model.clone(),
                    anomalyd::replay::Input {
                        reader: input.as_bytes(),
                        format: anomalyd::replay::Format::Ndjson,
                        series: None,
                    },
                    &mut out,
                    format,
                )
                .unwrap();
                out.len()
            })
        });
    }
    g.finish();
}

/// SPOT's judgement alone, per score: on a stationary stream (a peak every 50 scores) and on a
/// sustained level shift (every score a peak, each refitting the tail), beside the quantile.
fn thresholds(c: &mut Criterion) {
    use anomalyd::model::Calibration;
    use anomalyd::threshold::evt::{Spot, SpotConfig};
    use anomalyd::threshold::{Threshold, ThresholdConfig};
    use rand::{rngs::SmallRng, SeedableRng};
    use rand_distr::{Distribution, Exp};

    let mut rng = SmallRng::seed_from_u64(5);
    let exp = Exp::new(1.0).unwrap();
    let calibration: Vec<f64> = (0..2000).map(|_| exp.sample(&mut rng)).collect();
    let n = 4096;
    let stationary: Vec<f64> = (0..n).map(|_| exp.sample(&mut rng)).collect();
    // A long-running key searches for every root of its tail's fit only every 256th fit (a peak
    // in 50 scores): over 4,096 scores it may search once or not at all, so it is judged on
    // 65,536, where the searches come at their share.
    let long: Vec<f64> = (0..16 * n).map(|_| exp.sample(&mut rng)).collect();
    let spot = Spot::calibrate(&SpotConfig::default(), &calibration);
    // A shift to between the threshold and the far limit: flagged, and learned.
    let shifted: Vec<f64> = (0..n)
        .map(|_| 1.2 * spot.threshold() + 0.1 * exp.sample(&mut rng))
        .collect();
    let mut sorted = calibration.clone();
    sorted.sort_by(f64::total_cmp);
    let quantile = ThresholdConfig::default().build(&Calibration {
        count: sorted.len() as u64,
        sample: sorted,
        ..Default::default()
    });
    // A long-running key: 50,000 scores in, its window of peaks full (a key whose window is
    // still filling refits on every peak; this is what it costs from then on).
    let (mut steady_spot, mut steady_quantile) = (spot.clone(), quantile.clone());
    for _ in 0..50_000 {
        let x = exp.sample(&mut rng);
        steady_spot.judge(x);
        steady_quantile.judge(x);
    }
    let methods: [(&str, Box<dyn Threshold>); 2] =
        [("spot", Box::new(spot)), ("quantile", quantile)];
    let steady: [(&str, Box<dyn Threshold>); 2] = [
        ("spot", Box::new(steady_spot)),
        ("quantile", steady_quantile),
    ];
    let mut g = c.benchmark_group("threshold");
    g.sample_size(10);
    for (name, scores, methods) in [
        ("stationary", &stationary, &methods),
        ("stationary, long-running key", &long, &steady),
        ("level shift", &shifted, &methods),
    ] {
        g.throughput(Throughput::Elements(scores.len() as u64));
        for (method, template) in methods {
            g.bench_function(format!("{method}/{name}"), |b| {
                b.iter_batched(
                    || template.clone(),
                    |mut t| scores.iter().filter(|&&x| t.judge(x).is_anomaly).count(),
                    BatchSize::LargeInput,
                )
            });
        }
    }
    g.finish();
}

// The thresholds first: the model stages run tract's AVX-512 kernels, which leave the upper
// halves of the vector registers dirty, and scalar SSE code after them in the same thread ran
// 6-12x slower here (SPOT over 65,536 scores: 62 ms after them, 3.0 ms before; docs/NOTES.md).
criterion_group!(benches, thresholds, stages, replay);
criterion_main!(benches);
