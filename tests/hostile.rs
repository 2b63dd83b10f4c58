//! Hostile input: property tests of the record decoder and the config loader (bounded runs), and
//! a flood of a million distinct keys.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use anomalyd::config::Config;
use anomalyd::decode::{DecodeError, Decoder};
use anomalyd::detect::{Detector, Origin};
use anomalyd::model::Model;
use common::*;
use proptest::prelude::*;

const FIELDS: [&str; 4] = ["cpu_pct", "requests_per_s", "latency_ms", "net_out_mbps"];

fn decoder(per_field: usize) -> Decoder {
    Decoder::new(
        "host",
        "ts",
        FIELDS.iter().map(|f| f.to_string()).collect(),
        per_field,
        4096,
    )
}

/// Arbitrary JSON, nested up to a few levels.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Object keys: mostly the ones the decoder looks for, so the interesting paths are hit.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["host", "ts", "cpu_pct", "requests_per_s", "latency_ms", "net_out_mbps"]).prop_map(String::from),
        1 => "[a-z_]{1,8}",
    ]
}

fn check(result: Result<anomalyd::decode::Record, DecodeError>, per_field: usize) {
    match result {
        Ok(r) => {
            assert_eq!(r.values.len(), FIELDS.len() * per_field);
            assert!(r.values.iter().all(|v| v.is_finite()), "{r:?}");
            assert!(!r.key.is_empty());
        }
        Err(e) => assert!(
            DecodeError::REASONS.contains(&e.reason()),
            "unlisted reason {}",
            e.reason()
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_crash_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
        check(decoder(1).decode_json(&bytes), 1);
        check(decoder(3).decode_json(&bytes), 3);
    }

    #[test]
    fn arbitrary_json_is_decoded_or_refused_with_a_reason(v in json()) {
        let text = v.to_string();
        check(decoder(1).decode_json(text.as_bytes()), 1);
        check(decoder(2).decode_json(text.as_bytes()), 2);
    }

    #[test]
    fn valid_records_decode_to_their_values(
        host in "[a-z0-9-]{1,20}",
        values in prop::collection::vec(-1e30f32..1e30f32, 4),
        noise in prop::collection::vec(("[a-z]{1,6}", json()), 0..4),
    ) {
        let mut obj = serde_json::Map::new();
        for (k, v) in noise {
            obj.insert(format!("x_{k}"), v);
        }
        obj.insert("host".into(), host.clone().into());
        for (f, v) in FIELDS.iter().zip(&values) {
            obj.insert((*f).into(), (*v as f64).into());
        }
        let text = serde_json::Value::Object(obj).to_string();
        prop_assume!(text.len() <= 4096);
        let r = decoder(1).decode_json(text.as_bytes()).unwrap();
        prop_assert_eq!(r.key, host);
        prop_assert_eq!(r.values, values);
    }

    #[test]
    fn arbitrary_config_text_never_crashes_the_loader(text in "\\PC{0,400}") {
        if let Err(e) = Config::from_toml(&text, Some(HashMap::new())) {
            prop_assert!(!e.problems.is_empty());
        }
    }

    #[test]
    fn arbitrary_config_trees_are_accepted_or_every_problem_named(
        sections in prop::collection::vec(
            (prop::sample::select(vec!["kafka", "http", "log", "runtime", "pipelines.p", "pipelines.p.batch", "pipelines.p.threshold", "pipelines.p.alert", "bogus"]),
             prop::collection::vec(("[a-z_]{1,12}", prop_oneof!["\"[a-z0-9:._]{0,10}\"", "-?[0-9]{1,6}", "true", "[0-9]\\.[0-9]{1,3}"]), 0..5)),
            0..6),
        env in prop::collection::vec(("ANOMALYD__[A-Z_]{1,20}", "[a-z0-9,.:]{0,10}"), 0..4),
    ) {
        let mut text = String::new();
        let mut seen = std::collections::HashSet::new();
        for (section, pairs) in sections {
            if !seen.insert(section) {
                continue;
            }
            text.push_str(&format!("[{section}]\n"));
            let mut keys = std::collections::HashSet::new();
            for (k, v) in pairs {
                if keys.insert(k.clone()) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
        }
        let env: HashMap<String, String> = env.into_iter().collect();
        match Config::from_toml(&text, Some(env)) {
            Ok(c) => {
                // Parsed: validation either passes or names its problems.
                if let Err(e) = c.validate() {
                    prop_assert!(!e.problems.is_empty());
                }
            }
            Err(e) => prop_assert!(!e.problems.is_empty()),
        }
    }
}

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
    let mut d = Detector::new("p", p, Arc::new(Model::load(&p.model).unwrap()));
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
