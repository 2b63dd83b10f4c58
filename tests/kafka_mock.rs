//! The daemon against librdkafka's in-process mock cluster: real Kafka clients, real wire
//! protocol, consumer groups and commits; no broker process to start.

mod common;

use std::time::Duration;

use anomalyd::daemon::Daemon;
use anomalyd::demo::MockKafka;
use common::*;
use tokio_util::sync::CancellationToken;

const TOPICS: &[(&str, i32)] = &[
    ("metrics", 4),
    ("alerts", 1),
    ("dead-letters", 1),
    ("scores", 2),
    (STATE_TOPIC, 4),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_incidents_become_alerts() {
    let kafka = MockKafka::start(TOPICS).unwrap();
    let stream = fleet_stream(8, 720, 4, 11);
    produce(&kafka.bootstrap, "metrics", &stream.records).await;

    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(
        config(&kafka.bootstrap, "alerts-test", ""),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let total = stream.records.len() as u64;
    let metrics = daemon.metrics.clone();
    assert!(
        wait_for(Duration::from_secs(60), || consumed(&metrics, "fleet")
            >= total)
        .await,
        "consumed only {} of {total}",
        consumed(&metrics, "fleet")
    );
    shutdown.cancel();
    daemon.wait().await.unwrap();

    let alerts = drain_topic(
        &kafka.bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(20),
    );
    let missed = missed_incidents(&stream, &firing(&alerts));
    assert!(missed.is_empty(), "missed incidents: {missed:?}");
    // The daemon and `anomalyd score` share their code: on the same records they fire alike.
    let mut fired = firing(&alerts);
    let mut reference = reference_firing(&stream);
    fired.sort();
    reference.sort();
    assert_eq!(
        fired, reference,
        "the daemon's alerts differ from a replay of the same stream"
    );
    // Per key, events alternate firing, resolved, firing…, keyed by the entity.
    let mut state: std::collections::HashMap<String, bool> = Default::default();
    for a in &alerts {
        let v = a.json();
        let key = v["key"].as_str().unwrap().to_string();
        assert_eq!(
            a.key.as_deref(),
            Some(key.as_str()),
            "alerts are keyed by entity"
        );
        let firing = v["event"] == "firing";
        let was = state.insert(key.clone(), firing).unwrap_or(false);
        assert_ne!(was, firing, "{key}: two {} events in a row", v["event"]);
        assert_eq!(v["top_features"].as_array().unwrap().len(), 3);
        assert_eq!(v["model"]["name"], "demo-dense");
        assert!(v["source"]["offset"].as_i64().unwrap() >= 0);
    }
    let fired = alerts
        .iter()
        .filter(|a| a.json()["event"] == "firing")
        .count();
    assert!(
        fired <= stream.incidents.len() + 3,
        "{fired} firing events for {} incidents: too many false alarms",
        stream.incidents.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_records_become_dead_letters_and_good_ones_are_still_scored() {
    let kafka = MockKafka::start(TOPICS).unwrap();
    let stream = fleet_stream(4, 60, 0, 12);
    let bad: Vec<(&str, &str)> = vec![
        ("invalid_json", "{\"host\": \"host-01\", \"cpu_pct\": "),
        ("not_an_object", "[1, 2, 3]"),
        (
            "missing_key",
            r#"{"ts":"t","cpu_pct":1,"requests_per_s":1,"latency_ms":1,"net_out_mbps":1}"#,
        ),
        (
            "missing_field",
            r#"{"host":"host-01","cpu_pct":1,"requests_per_s":1,"latency_ms":1}"#,
        ),
        (
            "not_a_number",
            r#"{"host":"host-01","cpu_pct":"high","requests_per_s":1,"latency_ms":1,"net_out_mbps":1}"#,
        ),
        (
            "non_finite",
            r#"{"host":"host-01","cpu_pct":1e300,"requests_per_s":1,"latency_ms":1,"net_out_mbps":1}"#,
        ),
        (
            "wrong_dimensions",
            r#"{"host":"host-01","cpu_pct":[1,2],"requests_per_s":1,"latency_ms":1,"net_out_mbps":1}"#,
        ),
        ("too_large", ""),
    ];
    let too_large = format!(
        r#"{{"host":"host-01","cpu_pct":1,"requests_per_s":1,"latency_ms":1,"net_out_mbps":1,"pad":"{}"}}"#,
        "x".repeat(5000)
    );
    let mut records = Vec::new();
    for (i, good) in stream.records.iter().enumerate() {
        records.push(good.clone());
        if i % 25 == 7 {
            let (reason, payload) = bad[(i / 25) % bad.len()];
            let payload = if reason == "too_large" {
                too_large.clone()
            } else {
                payload.to_string()
            };
            records.push((format!("bad-{reason}"), payload));
        }
    }
    let bad_sent: Vec<&(String, String)> = records
        .iter()
        .filter(|(k, _)| k.starts_with("bad-"))
        .collect();
    produce(&kafka.bootstrap, "metrics", &records).await;

    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(
        config(&kafka.bootstrap, "dlq-test", "max_record_bytes = 4096"),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let metrics = daemon.metrics.clone();
    let total = records.len() as u64;
    assert!(
        wait_for(Duration::from_secs(60), || consumed(&metrics, "fleet")
            >= total)
        .await
    );
    shutdown.cancel();
    daemon.wait().await.unwrap();

    let scored = metrics
        .records
        .with_label_values(&["fleet", "scored"])
        .get();
    assert_eq!(
        scored,
        stream.records.len() as u64,
        "every good record is scored"
    );
    let dead = drain_topic(
        &kafka.bootstrap,
        "dead-letters",
        Duration::from_secs(2),
        Duration::from_secs(20),
    );
    assert_eq!(dead.len(), bad_sent.len());
    // Dead letters keep the order of their input partition; match them by key and payload.
    for (key, payload) in &bad_sent {
        let got = dead
            .iter()
            .find(|g| g.key.as_deref() == Some(key.as_str()) && g.payload == payload.as_bytes())
            .unwrap_or_else(|| panic!("no dead letter for {key}"));
        let reason = key.trim_start_matches("bad-");
        assert_eq!(header(got, "anomalyd.reason"), reason, "{key}");
        assert_eq!(
            got.payload,
            payload.as_bytes(),
            "the original payload is kept"
        );
        assert_eq!(got.key.as_deref(), Some(key.as_str()));
        assert_eq!(header(got, "anomalyd.source.topic"), "metrics");
        assert!(!header(got, "anomalyd.error").is_empty());
        assert_eq!(
            metrics
                .dead_letters
                .with_label_values(&["fleet", reason])
                .get() as usize,
            bad_sent.iter().filter(|(k, _)| k == key).count()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_pipeline_scores_every_record_at_least_once_and_loses_no_alert() {
    let kafka = MockKafka::start(TOPICS).unwrap();
    let stream = fleet_stream(10, 720, 4, 13);
    let total = stream.records.len() as u64;

    // The stream keeps arriving while the pipeline is stopped and restarted: its first half
    // during the first run, its second half from the stop on (so the first run stops
    // mid-stream whatever the machine's speed).
    let (first_half, second_half) = stream.records.split_at(stream.records.len() / 2);
    let streaming = |records: &[(String, String)]| {
        produce_paced(
            &kafka.bootstrap,
            "metrics",
            records,
            200,
            Duration::from_millis(40),
        )
    };
    let producer = streaming(first_half);

    // First run: stopped mid-stream, with records in flight.
    let shutdown = CancellationToken::new();
    let first = Daemon::start(
        config(&kafka.bootstrap, "restart-test", ""),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let m1 = first.metrics.clone();
    assert!(
        wait_for(Duration::from_secs(60), || consumed(&m1, "fleet")
            >= total / 4)
        .await
    );
    shutdown.cancel();
    let rest = streaming(second_half);
    first.wait().await.unwrap();
    let first_run = consumed(&m1, "fleet");
    assert!(first_run < total, "the first run must stop mid-stream");

    // Second run, same group: picks up at the committed offsets.
    let shutdown = CancellationToken::new();
    let second = Daemon::start(
        config(&kafka.bootstrap, "restart-test", ""),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let mut offsets = producer.await.unwrap();
    offsets.extend(rest.await.unwrap());
    let m2 = second.metrics.clone();
    assert!(
        wait_for(Duration::from_secs(60), || first_run
            + consumed(&m2, "fleet")
            >= total)
        .await,
        "second run consumed {} after {first_run}",
        consumed(&m2, "fleet")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    second.wait().await.unwrap();

    let scores = drain_topic(
        &kafka.bootstrap,
        "scores",
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    let (scored, duplicates) = scored_offsets(&scores);
    let missing: Vec<_> = offsets.difference(&scored).take(10).collect();
    assert!(missing.is_empty(), "records never scored, e.g. {missing:?}");
    eprintln!(
        "restart: {total} records, first run {first_run}, second run {}, {duplicates} scored twice",
        consumed(&m2, "fleet")
    );
    let alerts = drain_topic(
        &kafka.bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(20),
    );
    assert_no_alert_lost(&stream, &alerts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_health_are_served_without_entity_keys_as_labels() {
    let kafka = MockKafka::start(TOPICS).unwrap();
    let stream = fleet_stream(8, 100, 0, 14);
    produce(&kafka.bootstrap, "metrics", &stream.records).await;
    let mut cfg = config(&kafka.bootstrap, "metrics-test", "");
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.kafka
        .properties
        .insert("statistics.interval.ms".into(), "300".into());
    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(cfg, shutdown.clone()).await.unwrap();
    let addr = daemon.http_addr.expect("http enabled");
    assert_eq!(http_get(addr, "/healthz").0, 200);
    let metrics = daemon.metrics.clone();
    let total = stream.records.len() as u64;
    assert!(
        wait_for(Duration::from_secs(60), || consumed(&metrics, "fleet")
            >= total)
        .await
    );
    assert!(
        wait_for(Duration::from_secs(60), || http_get(addr, "/readyz").0
            == 200)
        .await,
        "{:?}",
        http_get(addr, "/readyz")
    );
    // Lag comes from librdkafka's statistics, every 300 ms here: wait until they say the
    // partition is consumed to its end (a report from before that can still be the latest).
    let caught_up = r#"anomalyd_consumer_lag{partition="0",pipeline="fleet",topic="metrics"} 0"#;
    assert!(
        wait_for(Duration::from_secs(30), || http_get(addr, "/metrics")
            .1
            .contains(caught_up))
        .await,
        "{}",
        http_get(addr, "/metrics").1
    );
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    for needle in [
        &format!(r#"anomalyd_records_total{{outcome="scored",pipeline="fleet"}} {total}"#),
        r#"anomalyd_keys_tracked{pipeline="fleet"} 8"#,
        r#"anomalyd_model_info{kind="dense",model="demo-dense",pipeline="fleet",role="serving",version="1.0.0"} 1"#,
        r#"anomalyd_partitions_assigned{pipeline="fleet"} 4"#,
        "anomalyd_build_info{version=",
        "anomalyd_inference_seconds_bucket{",
        "anomalyd_batch_size_bucket{",
        "anomalyd_reconstruction_error_bucket{",
        "anomalyd_anomaly_score_bucket{",
        "anomalyd_ready 1",
    ] {
        assert!(body.contains(needle), "/metrics lacks {needle}:\n{body}");
    }
    assert!(
        !body.contains("host-0"),
        "an entity key appears as a label:\n{body}"
    );
    // The cold start, step by step, each after the one before.
    let startup: Vec<f64> = anomalyd::metrics::label::PHASES
        .iter()
        .map(|phase| {
            metrics
                .startup_seconds
                .with_label_values(&["fleet", phase])
                .get()
        })
        .collect();
    assert!(
        startup[0] > 0.0 && startup.windows(2).all(|w| w[0] <= w[1]),
        "cold start steps out of order: {startup:?}\n{body}"
    );
    shutdown.cancel();
    daemon.wait().await.unwrap();
}

/// Rewrites the model's `anomalyd.version` metadata in place (same length, so the protobuf
/// stays valid): a real, loadable new version of the same model.
fn with_version(model: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = model
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("version string in the model");
    let mut out = model.to_vec();
    out[at..at + to.len()].copy_from_slice(to.as_bytes());
    out
}

/// Replaces a file atomically, as operators are told to.
fn replace(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A copy of the demo model in `dir` (its path and bytes), and a configuration serving it,
/// checked for new versions every 50 ms, with `extra` settings of the pipeline.
fn served_copy(
    dir: &std::path::Path,
    bootstrap: &str,
    group: &str,
    extra: &str,
) -> (std::path::PathBuf, Vec<u8>, anomalyd::config::Config) {
    let model_path = dir.join("model.onnx");
    let original = std::fs::read(demo_model()).unwrap();
    std::fs::write(&model_path, &original).unwrap();
    let toml = config_toml(
        bootstrap,
        group,
        &format!("reload_check = \"50ms\"\n{extra}"),
    )
    .replace(
        &demo_model().display().to_string(),
        &model_path.display().to_string(),
    );
    let cfg = anomalyd::config::Config::from_toml(&toml, Some(Default::default())).unwrap();
    (model_path, original, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_model_is_swapped_in_without_dropping_or_double_scoring_and_a_bad_one_is_refused() {
    let kafka = MockKafka::start(TOPICS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (model_path, original, cfg) = served_copy(dir.path(), &kafka.bootstrap, "reload-test", "");

    // Streamed in three parts: before the bad files, between them and the good one, and after
    // it, so that each step has records to show what it did whatever the machine's speed.
    let stream = fleet_stream(10, 600, 0, 15);
    let total = stream.records.len() as u64;
    let (first, rest) = stream.records.split_at(stream.records.len() / 2);
    let (second, third) = rest.split_at(rest.len() / 2);
    let streaming = |records: &[(String, String)]| {
        produce_paced(
            &kafka.bootstrap,
            "metrics",
            records,
            300,
            Duration::from_millis(100),
        )
    };
    let producer = streaming(first);
    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(cfg, shutdown.clone()).await.unwrap();
    let m = daemon.metrics.clone();
    let failures = || m.model_load_failures.with_label_values(&["fleet"]).get();
    let reloads = || m.model_reloads.with_label_values(&["fleet"]).get();

    assert!(
        wait_for(Duration::from_secs(30), || consumed(&m, "fleet")
            >= total / 5)
        .await
    );
    // A corrupt file, then a model reading other features (the sequence model): both refused.
    replace(&model_path, b"not an onnx model");
    assert!(wait_for(Duration::from_secs(60), || failures() == 1).await);
    replace(
        &model_path,
        &std::fs::read(repo().join("models/demo-lstm.onnx")).unwrap(),
    );
    assert!(wait_for(Duration::from_secs(60), || failures() == 2).await);
    let mut offsets = producer.await.unwrap();
    let before = consumed(&m, "fleet");
    let producer = streaming(second);
    assert!(
        wait_for(Duration::from_secs(60), || consumed(&m, "fleet") > before).await,
        "the old model keeps serving"
    );
    // A real new version of the model: swapped in.
    replace(&model_path, &with_version(&original, "1.0.0", "1.0.1"));
    assert!(wait_for(Duration::from_secs(60), || reloads() == 1).await);
    let swap = m.model_swap_seconds.with_label_values(&["fleet"]).get();
    assert!(swap > 0.0, "the swap's time is reported: {swap}");
    offsets.extend(producer.await.unwrap());
    let producer = streaming(third);
    daemon.reload_models(); // SIGHUP with nothing new: nothing happens
    offsets.extend(producer.await.unwrap());
    assert!(wait_for(Duration::from_secs(60), || consumed(&m, "fleet") >= total).await);
    shutdown.cancel();
    daemon.wait().await.unwrap();
    assert_eq!((failures(), reloads()), (2, 1));

    let scores = drain_topic(
        &kafka.bootstrap,
        "scores",
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    let (scored, duplicates) = scored_offsets(&scores);
    assert_eq!(scored, offsets, "every record scored");
    assert_eq!(duplicates, 0, "no record scored twice");
    // Per partition, the version switches once, from the old to the new.
    let mut by_partition: std::collections::BTreeMap<i32, Vec<(i64, String)>> = Default::default();
    for s in &scores {
        let v = s.json();
        by_partition
            .entry(v["partition"].as_i64().unwrap() as i32)
            .or_default()
            .push((
                v["offset"].as_i64().unwrap(),
                v["model_version"].as_str().unwrap().to_string(),
            ));
    }
    let mut switched = 0;
    for rows in by_partition.values_mut() {
        rows.sort();
        let versions: Vec<&str> = rows.iter().map(|(_, v)| v.as_str()).collect();
        let first_new = versions
            .iter()
            .position(|v| *v == "1.0.1")
            .unwrap_or(versions.len());
        assert!(versions[..first_new].iter().all(|v| *v == "1.0.0"));
        assert!(
            versions[first_new..].iter().all(|v| *v == "1.0.1"),
            "{versions:?}"
        );
        switched += usize::from(first_new < versions.len());
    }
    assert!(switched > 0, "the new version scored records");
}

/// Issue 12, item 2: a candidate beside the model is scored in its shadow and promoted once the
/// rule holds (the candidate file then replaces the model file, and no alert bursts out of the
/// swap); candidates that do not load or do not fit are refused while the model serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_is_shadowed_then_promoted_and_one_that_cannot_serve_is_refused() {
    let kafka = MockKafka::start(TOPICS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (model_path, original, cfg) = served_copy(
        dir.path(),
        &kafka.bootstrap,
        "shadow-test",
        "[pipelines.fleet.promotion]\nrecords = 500",
    );
    let candidate = dir.path().join("model.candidate.onnx");
    assert_eq!(cfg.pipelines["fleet"].candidate_path(), candidate);

    let stream = fleet_stream(10, 600, 0, 16);
    let total = stream.records.len() as u64;
    let (first, rest) = stream.records.split_at(stream.records.len() / 3);
    let streaming = |records: &[(String, String)]| {
        produce_paced(
            &kafka.bootstrap,
            "metrics",
            records,
            300,
            Duration::from_millis(100),
        )
    };
    let producer = streaming(first);
    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(cfg, shutdown.clone()).await.unwrap();
    let m = daemon.metrics.clone();
    let candidates = |result: &str| m.candidates.with_label_values(&["fleet", result]).get();

    assert!(
        wait_for(Duration::from_secs(30), || consumed(&m, "fleet")
            >= total / 10)
        .await
    );
    replace(&candidate, b"not an onnx model");
    assert!(wait_for(Duration::from_secs(60), || candidates("refused") == 1).await);
    replace(
        &candidate,
        &std::fs::read(repo().join("models/demo-lstm.onnx")).unwrap(),
    );
    assert!(wait_for(Duration::from_secs(60), || candidates("refused") == 2).await);
    producer.await.unwrap();
    // A real new version: scored in the shadow over 500 records, then promoted.
    replace(&candidate, &with_version(&original, "1.0.0", "1.0.2"));
    let producer = streaming(rest);
    assert!(wait_for(Duration::from_secs(60), || candidates("promoted") == 1).await);
    // The detector counts the promotion, then the reload task renames the file.
    assert!(
        wait_for(Duration::from_secs(30), || !candidate.exists()).await,
        "the candidate file became the model file"
    );
    assert_eq!(
        std::fs::read(&model_path).unwrap(),
        with_version(&original, "1.0.0", "1.0.2")
    );
    producer.await.unwrap();
    assert!(wait_for(Duration::from_secs(60), || consumed(&m, "fleet") >= total).await);
    let body = m.render();
    assert!(
        body.contains(r#"anomalyd_model_info{kind="dense",model="demo-dense",pipeline="fleet",role="serving",version="1.0.2"} 1"#),
        "{body}"
    );
    assert!(!body.contains(r#"role="candidate""#), "{body}");
    assert!(!body.contains(r#"version="1.0.0""#), "{body}");
    shutdown.cancel();
    daemon.wait().await.unwrap();
    assert_eq!(
        m.model_reloads.with_label_values(&["fleet"]).get(),
        0,
        "the renamed file is not reloaded as a new version (its thresholds would restart)"
    );

    // The fleet has no incident: nothing fires, before, during or after the promotion.
    let alerts = drain_topic(
        &kafka.bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    assert!(alerts.is_empty(), "{} alert events", alerts.len());
    let scores = drain_topic(
        &kafka.bootstrap,
        "scores",
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    assert!(scores.iter().any(|s| s.json()["model_version"] == "1.0.2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_daemon_restores_learned_state_and_does_not_re_alert() {
    let kafka = MockKafka::start(TOPICS).unwrap();
    let dspot = "[pipelines.fleet.threshold]\nmethod = \"dspot\"";
    let cfg = || config(&kafka.bootstrap, "state-test", dspot);
    let hosts = 4;
    let stream = ramp_stream(hosts, 1100, 17);
    let split = 900 * hosts;
    let host0_firing = |alerts: &[Got]| {
        firing(alerts)
            .into_iter()
            .filter(|(k, _)| k == "host-00")
            .count()
    };

    // First run: host-00's latency ramps up to a new level, which DSPOT learns as drift.
    produce(&kafka.bootstrap, "metrics", &stream.records[..split]).await;
    let shutdown = CancellationToken::new();
    let first = Daemon::start(cfg(), shutdown.clone()).await.unwrap();
    let m1 = first.metrics.clone();
    assert!(
        wait_for(Duration::from_secs(60), || consumed(&m1, "fleet")
            >= split as u64)
        .await
    );
    shutdown.cancel();
    first.wait().await.unwrap();
    let alerts = drain_topic(
        &kafka.bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(20),
    );
    assert_eq!(
        host0_firing(&alerts),
        0,
        "the ramp is learned, not alerted on"
    );
    assert!(
        m1.state_writes.with_label_values(&["fleet", "ok"]).get() >= 1,
        "the state reached the state topic"
    );
    assert_eq!(
        m1.state_writes.with_label_values(&["fleet", "error"]).get(),
        0
    );

    // Second run on the same state: the new level is still known.
    produce(&kafka.bootstrap, "metrics", &stream.records[split..]).await;
    let shutdown = CancellationToken::new();
    let second = Daemon::start(cfg(), shutdown.clone()).await.unwrap();
    let m2 = second.metrics.clone();
    let rest = (stream.records.len() - split) as u64;
    assert!(wait_for(Duration::from_secs(60), || consumed(&m2, "fleet") >= rest).await);
    shutdown.cancel();
    second.wait().await.unwrap();
    assert_eq!(
        m2.keys_restored.with_label_values(&["fleet"]).get(),
        hosts as u64
    );
    let alerts = drain_topic(
        &kafka.bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(20),
    );
    assert_eq!(
        host0_firing(&alerts),
        0,
        "no re-alert on the learned level after the restart"
    );

    // What the restart would have done without the state topic: re-learn from the calibration
    // and alert on the level it had already accepted.
    let fresh = replay_rows(&stream.records[split..], dspot);
    let refired = fresh
        .iter()
        .filter(|r| r["key"] == "host-00" && r["event"] == "firing")
        .count();
    assert!(
        refired > 0,
        "the control replay should alert on host-00's level"
    );
}

/// The state topic on its own: the last state of a key wins, a tombstone removes it, and a
/// partition's reader gets only the keys of its input partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_topic_gives_back_the_last_state_of_each_key_of_a_partition() {
    use anomalyd::changelog::Changelog;
    use anomalyd::state::{Change, KeySnapshot, ModelIdentity, StateRecord};
    let kafka = MockKafka::start(&[("state", 2)]).unwrap();
    let cfg = anomalyd::kafka::KafkaConfig {
        brokers: kafka.bootstrap.clone(),
        ..Default::default()
    };
    let changelog = Changelog::new(&cfg, "state").unwrap();
    assert_eq!(changelog.ensure(2, Duration::from_secs(10)).unwrap(), 2);
    let change = |topic: &str, partition: i32, key: &str, version: &str, gone: bool| Change {
        topic: topic.into(),
        partition,
        key: key.into(),
        state: (!gone).then(|| StateRecord {
            model: ModelIdentity {
                name: "m".into(),
                version: version.into(),
                features: vec!["a".into()],
                window: 1,
                baseline: vec![],
            },
            method: "ewma".into(),
            state: KeySnapshot {
                key: key.into(),
                topic: topic.into(),
                partition,
                window: None,
                level: None,
                threshold: None,
                alert: None,
            },
        }),
    };
    changelog
        .write(&[
            change("metrics", 0, "a", "1", false),
            change("metrics", 1, "b", "1", false),
            change("metrics", 0, "c", "1", false),
            change("other", 0, "a", "1", false),
        ])
        .await
        .unwrap();
    changelog
        .write(&[
            change("metrics", 0, "a", "2", false),
            change("metrics", 0, "c", "1", true),
        ])
        .await
        .unwrap();
    let read = |partitions: &[(&str, i32)]| {
        let partitions: Vec<(String, i32)> = partitions
            .iter()
            .map(|(t, p)| (t.to_string(), *p))
            .collect();
        let (states, skipped) = changelog
            .read(&partitions, Duration::from_secs(20))
            .unwrap();
        assert_eq!(skipped, 0);
        states
            .into_iter()
            .map(|r| {
                (
                    r.state.topic,
                    r.state.partition,
                    r.state.key,
                    r.model.version,
                )
            })
            .collect::<Vec<_>>()
    };
    let s = |t: &str, p: i32, k: &str, v: &str| (t.to_string(), p, k.to_string(), v.to_string());
    assert_eq!(read(&[("metrics", 0)]), vec![s("metrics", 0, "a", "2")]);
    let mut both = read(&[("metrics", 0), ("metrics", 1), ("other", 0)]);
    both.sort();
    assert_eq!(
        both,
        vec![
            s("metrics", 0, "a", "2"),
            s("metrics", 1, "b", "1"),
            s("other", 0, "a", "1")
        ]
    );
    // Read twice: the markers of the first read are not states.
    assert_eq!(read(&[("metrics", 0)]), vec![s("metrics", 0, "a", "2")]);
}

/// Issue 10, finding 9 (shutdown): a client holding a connection to the HTTP endpoint open
/// (here, a request half sent) kept the process alive after its pipelines had drained. The
/// daemon now ends a short while after its pipelines, whatever its HTTP clients do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_half_sent_http_request_does_not_hold_the_shutdown() {
    use std::io::Write;
    let kafka = MockKafka::start(TOPICS).unwrap();
    let mut cfg = config(&kafka.bootstrap, "http-test", "");
    cfg.http.listen = "127.0.0.1:0".into();
    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(cfg, shutdown.clone()).await.unwrap();
    let addr = daemon.http_addr.expect("http enabled");
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let _keep_alive = std::net::TcpStream::connect(addr).unwrap();
    shutdown.cancel();
    let waited = tokio::time::timeout(Duration::from_secs(60), daemon.wait()).await;
    assert!(
        matches!(waited, Ok(Ok(()))),
        "the daemon did not end while a client held a connection: {waited:?}"
    );
    drop(idle);
}
