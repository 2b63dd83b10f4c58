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
    p.detector()
        .build("p", Arc::new(Model::load(&p.model).expect("shipped model")))
        .expect("the bench's settings fit the model")
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

/// One measurement, in a process of its own: memory freed by an earlier one would otherwise be
/// reused and hide the growth.
fn measure(model: &str, method: &str, keys: usize, rows: usize) {
    let before = rss_bytes();
    let mut d = detector(model, method, keys);
    fill(&mut d, keys, rows);
    assert_eq!(d.keys(), keys);
    let after = rss_bytes();
    let growth = after.saturating_sub(before);
    println!(
        "BENCH {}",
        serde_json::json!({
            "bench": "memory",
            "model": model,
            "threshold": method,
            "keys": keys,
            "rows_per_key": rows,
            "rss_mb": after as f64 / (1 << 20) as f64,
            "growth_mb": growth as f64 / (1 << 20) as f64,
            "bytes_per_key": growth as f64 / keys as f64,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, model, method, keys, rows] = args.as_slice() {
        if flag == "--one" {
            measure(model, method, keys.parse().unwrap(), rows.parse().unwrap());
            return;
        }
    }
    println!("| model | threshold | keys | rows per key | RSS | RSS growth | bytes per key |");
    println!("|---|---|---|---|---|---|---|");
    let me = std::env::current_exe().expect("own path");
    for (model, method, keys, rows) in [
        ("demo-dense.onnx", "quantile", 200_000, 1),
        ("demo-dense.onnx", "ewma", 200_000, 1),
        ("demo-dense.onnx", "spot", 200_000, 1),
        ("demo-dense.onnx", "dspot", 200_000, 1),
        ("demo-lstm.onnx", "quantile", 200_000, 16),
        ("demo-dense.onnx", "quantile", 1_000_000, 1),
        ("demo-dense.onnx", "spot", 1_000_000, 1),
    ] {
        let out = std::process::Command::new(&me)
            .args(["--one", model, method, &keys.to_string(), &rows.to_string()])
            .output()
            .expect("run a measurement");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).expect("utf-8");
        let line = line.trim();
        eprintln!("{line}");
        let r: serde_json::Value =
            serde_json::from_str(line.trim_start_matches("BENCH ")).expect("a BENCH line");
        println!(
            "| {model} | {method} | {keys} | {rows} | {:.0} MB | {:.0} MB | {:.0} |",
            r["rss_mb"].as_f64().unwrap(),
            r["growth_mb"].as_f64().unwrap(),
            r["bytes_per_key"].as_f64().unwrap()
        );
    }
}
