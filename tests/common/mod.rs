//! Helpers shared by the integration tests: real Kafka clients against a real broker (the
//! in-process mock cluster or the tansu process), the shipped model, the demo's fleet.
#![allow(dead_code)]

pub mod ports;
pub mod tansu;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anomalyd::demo::stream::{Fleet, Incident};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped dense model of the demo (trained by the real toolkit on the demo's data).
pub fn demo_model() -> PathBuf {
    repo().join("models/demo-dense.onnx")
}

/// A generated stream: every record with its key, payload and tick, and the incidents in it.
pub struct Stream {
    pub records: Vec<(String, String)>,
    pub tick_of: HashMap<String, u64>,
    pub incidents: Vec<Incident>,
}

pub fn fleet_stream(hosts: usize, ticks: u64, incidents: usize, seed: u64) -> Stream {
    let mut fleet = Fleet::new(hosts, ticks, incidents, seed);
    let incidents = fleet.incidents().to_vec();
    let mut records = Vec::new();
    let mut tick_of = HashMap::new();
    for tick in 0..ticks {
        for row in fleet.next_tick() {
            tick_of.insert(row.timestamp(), tick);
            records.push((row.key(), row.to_json()));
        }
    }
    Stream {
        records,
        tick_of,
        incidents,
    }
}

/// Produces records and returns each one's (partition, offset).
///
/// Each record is a record batch of its own. tansu 0.6 serves a fetch from the first batch that
/// *starts* at or after the fetch offset, where Kafka serves the batch that contains it: a
/// consumer resuming inside a batch (after a SIGTERM, a crash or a rebalance mid-stream, with
/// the position committed after the last record it finished) is handed the next batch, and the
/// rest of its batch is never delivered; inside a partition's last batch it gets nothing at all.
/// With one record per batch every position is a batch boundary, which Kafka does not need and
/// does not mind. `tests/tansu.rs` checks that the quirk is still there (and so this still
/// needed), and that a daemon resuming mid-batch scores everything from there.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    records: &[(String, String)],
) -> Vec<(i32, i64)> {
    produce_batched(bootstrap, topic, records, 1).await
}

/// Streams records in the background, `chunk` at a time with `pause` between chunks (a live
/// topic rather than a backlog); the task returns each record's (partition, offset).
pub fn produce_paced(
    bootstrap: &str,
    topic: &str,
    records: &[(String, String)],
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<BTreeSet<(i32, i64)>> {
    let (bootstrap, topic, records) = (bootstrap.to_string(), topic.to_string(), records.to_vec());
    tokio::spawn(async move {
        let mut offsets = BTreeSet::new();
        for part in records.chunks(chunk) {
            offsets.extend(produce(&bootstrap, &topic, part).await);
            tokio::time::sleep(pause).await;
        }
        offsets
    })
}

/// Produces records in batches of up to `batch` records per partition; returns each one's
/// (partition, offset).
pub async fn produce_batched(
    bootstrap: &str,
    topic: &str,
    records: &[(String, String)],
    batch: usize,
) -> Vec<(i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("batch.num.messages", batch.to_string())
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(5000) {
        let futures: Vec<_> = chunk
            .iter()
            .map(|(k, v)| {
                producer
                    .send_result(FutureRecord::to(topic).key(k).payload(v))
                    .map_err(|(e, _)| e)
                    .expect("enqueue")
            })
            .collect();
        for f in futures {
            let delivery = f.await.expect("delivery future").expect("delivered");
            out.push((delivery.partition, delivery.offset));
        }
    }
    out
}

/// A consumed message, owned.
#[derive(Debug, Clone)]
pub struct Got {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub partition: i32,
    pub offset: i64,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("JSON payload")
    }
}

/// Reads a topic from the start until `done` says enough or `timeout` passes.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Got]) -> bool,
) -> Vec<Got> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-reader-{topic}-{}", rand_suffix()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    // Assign every partition from the beginning: no group join to wait for.
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !done(&got) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|hd| {
                            (
                                hd.key.to_string(),
                                String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            got.push(Got {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
                partition: m.partition(),
                offset: m.offset(),
            });
        }
    }
    got
}

/// Reads a topic until no message has arrived for `idle`.
pub fn drain_topic(bootstrap: &str, topic: &str, idle: Duration, timeout: Duration) -> Vec<Got> {
    let mut last_len = 0;
    let mut last_change = Instant::now();
    read_topic(bootstrap, topic, timeout, |got| {
        if got.len() != last_len {
            last_len = got.len();
            last_change = Instant::now();
        }
        last_change.elapsed() > idle
    })
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ (N.fetch_add(1, Ordering::Relaxed) << 48) ^ u64::from(std::process::id())
}

/// The (partition, offset) pairs of score records, and how many were seen more than once.
pub fn scored_offsets(scores: &[Got]) -> (BTreeSet<(i32, i64)>, usize) {
    let mut seen = BTreeSet::new();
    let mut duplicates = 0;
    for s in scores {
        let v = s.json();
        assert!(
            v["topic"].as_str().is_some_and(|t| !t.is_empty()),
            "a score names its record's topic: {v}"
        );
        let key = (
            v["partition"].as_i64().expect("partition") as i32,
            v["offset"].as_i64().expect("offset"),
        );
        if !seen.insert(key) {
            duplicates += 1;
        }
    }
    (seen, duplicates)
}

/// The (key, timestamp) of every firing event on an alerts topic.
pub fn firing(alerts: &[Got]) -> Vec<(String, String)> {
    alerts
        .iter()
        .map(Got::json)
        .filter(|a| a["event"] == "firing")
        .map(|a| {
            (
                a["key"].as_str().unwrap_or_default().to_string(),
                a["timestamp"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The firing events an uninterrupted run gives on the stream: the same detector, through
/// `anomalyd score`'s code path, with the test pipeline's settings.
pub fn reference_firing(stream: &Stream) -> Vec<(String, String)> {
    replay_rows(&stream.records, "")
        .into_iter()
        .filter(|r| r["event"] == "firing")
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["timestamp"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Incidents with no firing event for their host during the incident (plus a grace of 12 ticks).
pub fn missed_incidents(stream: &Stream, firing: &[(String, String)]) -> Vec<Incident> {
    let at: Vec<(&str, u64)> = firing
        .iter()
        .filter_map(|(k, ts)| Some((k.as_str(), *stream.tick_of.get(ts)?)))
        .collect();
    stream
        .incidents
        .iter()
        .filter(|i| {
            let host = anomalyd::demo::stream::host_name(i.host);
            !at.iter()
                .any(|(k, t)| *k == host && *t >= i.start && *t <= i.end + 12)
        })
        .cloned()
        .collect()
}

/// No alert lost: every incident an uninterrupted replay of the stream alerts on has a firing
/// alert in `alerts` too (after a restart per-key state starts afresh, so the alerts themselves
/// need not be identical), and the replay misses at most one incident.
pub fn assert_no_alert_lost(stream: &Stream, alerts: &[Got]) {
    let missed = missed_incidents(stream, &firing(alerts));
    let missed_by_reference = missed_incidents(stream, &reference_firing(stream));
    let lost: Vec<_> = missed
        .iter()
        .filter(|i| {
            !missed_by_reference
                .iter()
                .any(|r| r.start == i.start && r.host == i.host)
        })
        .collect();
    assert!(
        lost.is_empty(),
        "incidents alerted on by an uninterrupted replay but not here: {lost:?}"
    );
    assert!(
        missed_by_reference.len() <= 1,
        "the reference replay itself misses {missed_by_reference:?}"
    );
}

/// The state topic of `config_toml`'s pipeline. The in-process cluster cannot create topics
/// (it has no CreateTopics), so tests on it create this one with the others.
pub const STATE_TOPIC: &str = "fleet-state";

/// A pipeline configuration for the demo model against `bootstrap`.
pub fn config_toml(bootstrap: &str, group: &str, extra_pipeline: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "{group}"
commit_interval = "200ms"
[kafka.properties]
"message.timeout.ms" = "10000"
[http]
listen = ""
[runtime]
shutdown_grace = "15s"
inference_threads = 2
[pipelines.fleet]
topics = ["metrics"]
model = "{model}"
key_field = "host"
timestamp_field = "ts"
alerts_topic = "alerts"
dead_letter_topic = "dead-letters"
scores_topic = "scores"
state_topic = "{STATE_TOPIC}"
{extra_pipeline}
[pipelines.fleet.batch]
max_size = 64
max_wait = "5ms"
"#,
        model = demo_model().display()
    )
}

pub fn config(bootstrap: &str, group: &str, extra_pipeline: &str) -> anomalyd::config::Config {
    let c = anomalyd::config::Config::from_toml(
        &config_toml(bootstrap, group, extra_pipeline),
        Some(HashMap::new()),
    )
    .expect("test config parses");
    c.validate().expect("test config is valid");
    c
}

/// Records taken in by a pipeline so far (scored, warming or dead-lettered).
pub fn consumed(metrics: &anomalyd::metrics::Metrics, pipeline: &str) -> u64 {
    ["scored", "warming", "dead_letter"]
        .iter()
        .map(|o| metrics.records.with_label_values(&[pipeline, o]).get())
        .sum()
}

/// Waits until `f` is true or the timeout passes; returns whether it became true.
pub async fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

pub fn header(got: &Got, name: &str) -> String {
    got.headers.get(name).cloned().unwrap_or_default()
}

/// A plain HTTP/1.1 GET: (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The fleet stream with host-00's latency ramping up by 40 ms between ticks 300 and 700 and
/// staying there: a new level reached slowly enough for a drift-following threshold to learn.
pub fn ramp_stream(hosts: usize, ticks: u64, seed: u64) -> Stream {
    shifted_stream(hosts, ticks, seed, |tick| {
        40.0 * ((tick as f64 - 300.0) / 400.0).clamp(0.0, 1.0)
    })
}

/// The fleet stream with `shift(tick)` ms added to host-00's latency.
pub fn shifted_stream(hosts: usize, ticks: u64, seed: u64, shift: impl Fn(u64) -> f64) -> Stream {
    let mut s = fleet_stream(hosts, ticks, 0, seed);
    for (i, (_, v)) in s.records.iter_mut().enumerate() {
        let mut j: serde_json::Value = serde_json::from_str(v).unwrap();
        if j["host"] == "host-00" {
            let by = shift((i / hosts) as u64);
            j["latency_ms"] = (j["latency_ms"].as_f64().unwrap() + by).into();
            *v = j.to_string();
        }
    }
    s
}

/// Replays records through a fresh detector (no state) with the test pipeline and extra
/// settings; returns the NDJSON rows.
pub fn replay_rows(records: &[(String, String)], extra_pipeline: &str) -> Vec<serde_json::Value> {
    let cfg = config("unused:9092", "replay", extra_pipeline);
    let pipeline = &cfg.pipelines["fleet"];
    let model = std::sync::Arc::new(anomalyd::model::Model::load(&pipeline.model).unwrap());
    let input: String = records.iter().map(|(_, v)| format!("{v}\n")).collect();
    let mut out = Vec::new();
    let input = anomalyd::replay::Input {
        reader: input.as_bytes(),
        format: anomalyd::replay::Format::Ndjson,
        series: None,
    };
    anomalyd::replay::replay(
        "fleet",
        pipeline,
        model,
        input,
        &mut out,
        anomalyd::replay::Format::Ndjson,
    )
    .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
