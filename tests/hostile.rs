//! Hostile input: property tests of the record decoder and the config loader (bounded runs).
//! The flood of a million distinct keys is in tests/key_flood.rs.

mod common;

use std::collections::HashMap;

use anomalyd::config::Config;
use anomalyd::decode::{DecodeError, Decoder};
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
            let longest = r.key.len().max(r.timestamp.map_or(0, |t| t.len()));
            assert!(longest <= anomalyd::decode::MAX_TEXT_BYTES);
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
    fn arbitrary_config_trees_are_accepted_or_refused_with_problems(
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

    /// Misspelt keys anywhere in a working configuration are all refused at once, each by its
    /// full path, so an operator fixes them in one go.
    #[test]
    fn every_unknown_key_is_named_by_its_path(
        extra in prop::collection::btree_map(
            ("[a-z_]{1,10}", prop::sample::select(vec!["kafka", "http", "runtime", "pipelines.fleet", "pipelines.fleet.batch"])),
            prop_oneof!["\"[a-z0-9:._]{0,10}\"", "-?[1-9][0-9]{0,5}", "true"],
            1..6),
    ) {
        let mut text = config_toml("127.0.0.1:9092", "hostile", "");
        for ((key, section), value) in &extra {
            let header = format!("\n[{section}]\n");
            prop_assert!(text.contains(&header), "the base config has no [{}]", section);
            text = text.replacen(&header, &format!("{header}zz_{key} = {value}\n"), 1);
        }
        let problems = Config::from_toml(&text, Some(HashMap::new()))
            .err()
            .map(|e| e.problems)
            .unwrap_or_default();
        for (key, section) in extra.keys() {
            let path = format!("{section}.zz_{key}: unknown key");
            prop_assert!(
                problems.contains(&path),
                "{} not reported; problems: {:?}", path, problems
            );
        }
        prop_assert_eq!(problems.len(), extra.len(), "{:?}", problems);
    }
}

/// A value of the wrong type is refused naming its key, whichever section it is in.
#[test]
fn a_wrongly_typed_value_is_refused_by_its_key() {
    for (section, key, value) in [
        ("kafka", "drain_timeout", "true"),
        ("pipelines.fleet", "stdout", "\"maybe\""),
        ("pipelines.fleet", "reload_check", "[1]"),
        ("pipelines.fleet", "max_keys", "\"many\""),
        ("pipelines.fleet", "max_record_bytes", "-1"),
    ] {
        let header = format!("\n[{section}]\n");
        let text = config_toml("127.0.0.1:9092", "hostile", "").replacen(
            &header,
            &format!("{header}{key} = {value}\n"),
            1,
        );
        let problems = Config::from_toml(&text, Some(HashMap::new()))
            .err()
            .map(|e| e.problems)
            .unwrap_or_default();
        let path = format!("{section}.{key}");
        assert!(
            problems.iter().any(|p| p.contains(&path)),
            "{path} = {value} not refused by name: {problems:?}"
        );
    }
}

/// Values `run` cannot use are refused by `check` (`Config::validate`), naming the field: each
/// of these passed once and then panicked or aborted at run time (a channel of 2^64 slots, a
/// zero-length timer, a deadline past the clock's end, a preallocated table of 10^12 keys).
#[test]
fn values_run_cannot_use_are_refused_naming_the_field() {
    for (var, value, field) in [
        (
            "PIPELINES__FLEET__BATCH__MAX_SIZE",
            "4611686018427387904",
            "pipelines.fleet.batch.max_size",
        ),
        ("KAFKA__COMMIT_INTERVAL", "0s", "kafka.commit_interval"),
        ("KAFKA__DRAIN_TIMEOUT", "100000years", "kafka.drain_timeout"),
        (
            "RUNTIME__SHUTDOWN_GRACE",
            "1000000years",
            "runtime.shutdown_grace",
        ),
        (
            "RUNTIME__INFERENCE_THREADS",
            "100000000",
            "runtime.inference_threads",
        ),
        (
            "PIPELINES__FLEET__MAX_KEYS",
            "1000000000000",
            "pipelines.fleet.max_keys",
        ),
        (
            "PIPELINES__FLEET__RELOAD_CHECK",
            "100000years",
            "pipelines.fleet.reload_check",
        ),
        (
            "PIPELINES__FLEET__BATCH__MAX_WAIT",
            "100000years",
            "pipelines.fleet.batch.max_wait",
        ),
    ] {
        let env = HashMap::from([(format!("ANOMALYD__{var}"), value.to_string())]);
        let config = Config::from_toml(&config_toml("127.0.0.1:9092", "hostile", ""), Some(env))
            .unwrap_or_else(|e| panic!("{var}={value} should parse: {e}"));
        let problems = config
            .validate()
            .err()
            .map(|e| e.problems)
            .unwrap_or_default();
        assert!(
            problems.iter().any(|p| p.starts_with(field)),
            "{field} = {value} passed the checks: {problems:?}"
        );
    }
}

/// Issue 10, finding 8: a secret never reaches the output of `check` (nor, through the same
/// messages, the log of `run`): a misspelled or invalid librdkafka property is refused by
/// name without its value, and an Alertmanager URL's password is masked.
#[test]
fn secrets_in_the_configuration_are_never_echoed() {
    const SECRET: &str = "hunter2-s3cr3t";
    for (extra_kafka, extra_pipeline, field) in [
        (
            format!("\"sasl.passwrd\" = \"{SECRET}\""),
            String::new(),
            "kafka.properties.sasl.passwrd",
        ),
        (
            format!("\"security.protocol\" = \"{SECRET}\""),
            String::new(),
            "kafka.properties.security.protocol",
        ),
        (
            String::new(),
            format!(
                "[pipelines.fleet.alertmanager]\nurl = \"ftp://alice:{SECRET}@am.example:9093\""
            ),
            "pipelines.fleet.alertmanager",
        ),
    ] {
        let text = config_toml("127.0.0.1:9092", "hostile", "").replace(
            "[kafka.properties]\n",
            &format!("[kafka.properties]\n{extra_kafka}\n"),
        ) + &extra_pipeline;
        let config = Config::from_toml(&text, Some(HashMap::new())).unwrap();
        let problems = config.validate().expect_err(field).problems;
        assert!(
            problems.iter().any(|p| p.starts_with(field)),
            "{field} not refused: {problems:?}"
        );
        assert!(
            !problems.iter().any(|p| p.contains(SECRET)),
            "the secret is echoed: {problems:?}"
        );
    }
}

/// Issue 10, finding 9: a client that sends half a request, or a crowd of idle ones, held the
/// HTTP endpoint's connections (and file descriptors) for good. Now a connection that moves
/// nothing for 10 s is closed, at most 128 are open at once, and the probes still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_http_clients_cannot_hold_the_endpoint() {
    use anomalyd::metrics::{self, Health, Metrics, MAX_HTTP_CONNECTIONS};
    use std::io::{Read, Write};
    use std::time::Duration;
    let m = Metrics::new();
    let health = std::sync::Arc::new(Health::new(Vec::new(), &m));
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, server) = metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        m.clone(),
        health,
        stop.clone(),
    )
    .await
    .unwrap();
    let half_sent = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
            Err(e) => Err(e.kind()),
        }
    });
    assert_eq!(half_sent.await.unwrap(), Ok(0), "the server closed it");

    let crowd: Vec<std::net::TcpStream> = (0..MAX_HTTP_CONNECTIONS + 60)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let open = m.http_connections.clone();
    assert!(
        wait_for(Duration::from_secs(60), || open.get()
            == MAX_HTTP_CONNECTIONS as i64)
        .await
    );
    let probe = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).map(|_| text)
    });
    let answer = probe
        .await
        .unwrap()
        .expect("answered once idle connections were closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(open.get() <= MAX_HTTP_CONNECTIONS as i64);
    drop(crowd);
    stop.cancel();
    server.await.unwrap();
}
