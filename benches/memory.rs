//! Memory per tracked key, and resident memory with a million keys.
//!
//!     cargo bench --bench memory
//!
//! Keys are created through the real detector (window, threshold and alert state), with each
//! shipped model and threshold method; the figure is the growth of resident memory divided by
//! the number of keys, after the allocator has settled.

use std::collections::HashMap;
use std::sync::Arc;

use anomalyd::config::Config;
use anomalyd::decode::Record;
use anomalyd::detect::{Detector, Origin};
use anomalyd::model::Model;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn detector(model: &str, method: &str, keys: usize) -> Detector {
    let toml = format!(
        "[pipelines.p]\ntopics = [\"in\"]\nmodel = \"{}/models/{model}\"\nkey_field = \"k\"\nmax_keys = {keys}\n[pipelines.p.threshold]\nmethod = \"{method}\"\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg = Config::from_toml(&toml, Some(HashMap::new())).expect("bench config");
    let p = &cfg.pipelines["p"];
    Detector::new(
        "p",
        p,
        Arc::new(Model::load(&p.model).expect("shipped model")),
    )
}

/// Feeds `rows` rows to each of `keys` keys; returns the detector.
fn fill(d: &mut Detector, keys: usize, rows: usize) {
    let topic: Arc<str> = Arc::from("in");
    let features = d.model().contract.features.len();
    for round in 0..rows {
        for chunk in (0..keys).collect::<Vec<_>>().chunks(4096) {
            let records: Vec<(Origin, Record)> = chunk
                .iter()
                .map(|&k| {
                    (
                        Origin {
                            topic: topic.clone(),
                            partition: 0,
                            offset: 0,
                        },
                        Record {
                            key: format!("host-{k:07}"),
                            timestamp: None,
                            values: (0..features).map(|f| 30.0 + (f + round) as f32).collect(),
                        },
                    )
                })
                .collect();
            let mut batch = d.prepare(records);
            let samples = std::mem::take(&mut batch.samples);
            let inference = batch
                .model
                .infer(&samples, batch.sample_count())
                .expect("inference");
            d.judge(batch, &inference);
        }
    }
}

fn main() {
    println!("| model | threshold | keys | rows per key | RSS growth | bytes per key |");
    println!("|---|---|---|---|---|---|");
    for (model, method, keys, rows) in [
        ("demo-dense.onnx", "quantile", 200_000, 1),
        ("demo-dense.onnx", "spot", 200_000, 1),
        ("demo-dense.onnx", "dspot", 200_000, 1),
        ("demo-dense.onnx", "ewma", 200_000, 1),
        ("demo-lstm.onnx", "quantile", 200_000, 16),
        ("demo-dense.onnx", "quantile", 1_000_000, 1),
    ] {
        let before = rss_bytes();
        let mut d = detector(model, method, keys);
        fill(&mut d, keys, rows);
        assert_eq!(d.keys(), keys);
        let growth = rss_bytes().saturating_sub(before);
        println!(
            "| {model} | {method} | {keys} | {rows} | {} MB | {} |",
            growth >> 20,
            growth / keys as u64
        );
        drop(d);
    }
    println!("\nresident memory now: {} MB", rss_bytes() >> 20);
}
