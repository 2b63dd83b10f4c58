//! A key-cardinality explosion: a million distinct keys through the detector. In a test binary
//! of its own, because it measures the process's resident memory, which tests running beside
//! it in the same process would change.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use anomalyd::config::Config;
use anomalyd::detect::Origin;
use anomalyd::model::Model;
use common::*;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A million distinct keys through the detector with a cap of 10,000: the cap holds, every
/// eviction is counted, and memory stays flat once the cap is reached.
#[test]
fn a_flood_of_a_million_distinct_keys_stays_under_the_key_cap() {
    let cap = 10_000;
    let toml = format!(
        "[pipelines.p]\ntopics = [\"in\"]\nmodel = \"{}\"\nkey_field = \"host\"\nmax_keys = {cap}\n",
        demo_model().display()
    );
    let cfg = Config::from_toml(&toml, Some(HashMap::new())).unwrap();
    let p = &cfg.pipelines["p"];
    let mut d = p
        .detector()
        .build("p", Arc::new(Model::load(&p.model).unwrap()))
        .unwrap();
    let topic: Arc<str> = Arc::from("in");
    let total = 1_000_000usize;
    let mut rss_at_cap = 0;
    for chunk in 0..total / 1000 {
        let records = (0..1000).map(|i| {
            let n = chunk * 1000 + i;
            (
                Origin {
                    topic: topic.clone(),
                    partition: 0,
                    offset: n as i64,
                },
                anomalyd::decode::Record {
                    key: format!("flood-{n}"),
                    timestamp: None,
                    values: vec![50.0, 300.0, 35.0, 30.0],
                },
            )
        });
        let mut batch = d.prepare(records);
        let samples = std::mem::take(&mut batch.samples);
        let inference = batch.model.infer(&samples, batch.sample_count()).unwrap();
        d.judge(batch, &inference);
        assert!(d.keys() <= cap);
        if (chunk + 1) * 1000 == 4 * cap {
            rss_at_cap = rss_bytes();
        }
    }
    assert_eq!(d.keys(), cap);
    assert_eq!(d.evictions(), (total - cap) as u64);
    let growth = rss_bytes().saturating_sub(rss_at_cap);
    eprintln!(
        "key flood: {total} keys, {} kept, {} evicted; RSS {} MB at 4x the cap, grew {} MB over the next {} keys",
        d.keys(),
        d.evictions(),
        rss_at_cap >> 20,
        growth >> 20,
        total - 4 * cap
    );
    assert!(
        growth < 64 << 20,
        "memory grew by {} MB after the cap was reached",
        growth >> 20
    );
}
