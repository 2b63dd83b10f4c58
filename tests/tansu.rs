//! End to end against a separate broker process (tansu) with the `anomalyd run` binary as a
//! child process: produce, read alerts and scores back, SIGTERM, restart, nothing lost.
//!
//! The test command (scripts/test.sh) installs tansu and sets ANOMALYD_REQUIRE_TANSU=1, so in
//! CI a missing broker fails the test; a developer running `cargo test` without tansu gets a
//! message instead.

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn tansu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return Some(PathBuf::from(p));
    }
    let home = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
    home.is_file().then_some(home)
}

/// A tansu broker process on a free loopback port, with in-memory storage.
pub struct Tansu {
    child: Child,
    bin: PathBuf,
    pub bootstrap: String,
}

impl Tansu {
    pub fn start() -> Option<Tansu> {
        let Some(bin) = tansu_binary() else {
            assert!(
                std::env::var("ANOMALYD_REQUIRE_TANSU").is_err(),
                "tansu is required (ANOMALYD_REQUIRE_TANSU is set) but was not found: set TANSU_BIN or install it with scripts/test.sh"
            );
            eprintln!(
                "tansu not found (set TANSU_BIN, or run scripts/test.sh): not running this test"
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Tansu {
            child,
            bin,
            bootstrap: format!("127.0.0.1:{port}"),
        })
    }

    /// The topics of `config_toml`'s pipeline: input (3 partitions), alerts, dead letters, scores.
    pub fn create_pipeline_topics(&self) {
        for (t, p) in [
            ("metrics", 3),
            ("alerts", 1),
            ("dead-letters", 1),
            ("scores", 1),
        ] {
            self.create_topic(t, p);
        }
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(&self.bin)
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
                "--broker",
                &format!("tcp://{}", self.bootstrap),
            ])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "creating topic {name}");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(config: &std::path::Path, log: &std::path::Path) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
            .args(["run", "-c", config.to_str().unwrap()])
            .env(
                "RUST_LOG",
                std::env::var("ANOMALYD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start anomalyd");
        Daemon { child }
    }

    /// SIGTERM, then the exit status (within 30 s).
    fn terminate(mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "anomalyd did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_on_a_real_broker_survives_sigterm_and_restart_without_loss() {
    let Some(tansu) = Tansu::start() else { return };
    tansu.create_pipeline_topics();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("anomalyd.toml");
    std::fs::write(&config, config_toml(&tansu.bootstrap, "e2e", "")).unwrap();
    let log = dir.path().join("anomalyd.log");

    let stream = fleet_stream(8, 720, 4, 21);
    let half = stream.records.len() / 2;
    let mut offsets: BTreeSet<(i32, i64)> = BTreeSet::new();

    let first = Daemon::start(&config, &log);
    offsets.extend(produce(&tansu.bootstrap, "metrics", &stream.records[..half]).await);
    let scores = read_topic(&tansu.bootstrap, "scores", Duration::from_secs(90), |got| {
        got.len() >= half
    });
    assert!(
        scores.len() >= half,
        "only {} of {half} scored before SIGTERM; log:\n{}",
        scores.len(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let status = first.terminate();
    assert!(status.success(), "exit status {status:?} after SIGTERM");

    // The rest arrives while the daemon is down.
    offsets.extend(produce(&tansu.bootstrap, "metrics", &stream.records[half..]).await);
    let second = Daemon::start(&config, &log);
    let total = offsets.len();
    let scores = read_topic(&tansu.bootstrap, "scores", Duration::from_secs(90), |got| {
        scored_offsets(got).0.len() >= total
    });
    let status = second.terminate();
    assert!(
        status.success(),
        "exit status {status:?} after the second SIGTERM"
    );

    let (scored, duplicates) = scored_offsets(&scores);
    let missing: Vec<_> = offsets.difference(&scored).take(10).collect();
    assert!(missing.is_empty(), "records never scored, e.g. {missing:?}");
    eprintln!("tansu e2e: {total} records scored, {duplicates} scored twice across the restart");
    let alerts = drain_topic(
        &tansu.bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    assert_no_alert_lost(&stream, &alerts);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log_text.matches("Pipeline drained and committed").count(),
        2,
        "{log_text}"
    );
}

/// Collects the (partition, offset) of every record on a topic, in the background.
struct Collector {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(i32, i64)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn scores(bootstrap: &str) -> Collector {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        let seen: std::sync::Arc<std::sync::Mutex<Vec<(i32, i64)>>> = Default::default();
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "collector")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset("scores", 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    let v: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                    s.lock().unwrap().push((
                        v["partition"].as_i64().unwrap() as i32,
                        v["offset"].as_i64().unwrap(),
                    ));
                }
            }
        });
        Collector {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn distinct(&self) -> BTreeSet<(i32, i64)> {
        self.seen.lock().unwrap().iter().copied().collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Daemon {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Records taken in by the running daemon, from its /metrics.
fn consumed_by(addr: std::net::SocketAddr) -> u64 {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    drop(s.set_read_timeout(Some(Duration::from_secs(2))));
    use std::io::{Read, Write};
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("anomalyd_records_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_five_random_points_loses_no_record_and_no_alert() {
    use rand::{Rng, SeedableRng};
    let Some(tansu) = Tansu::start() else { return };
    tansu.create_pipeline_topics();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // A shorter session, so a killed member's partitions move on after 6 s rather than 10.
    let toml = config_toml(&tansu.bootstrap, "crash", "")
        .replace(
            "[kafka.properties]",
            "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"",
        )
        .replace("listen = \"\"", &format!("listen = \"{addr}\""))
        .replace(
            "[runtime]",
            &format!(
                "[runtime]\nstate_dir = \"{}\"\ncheckpoint_interval = \"1s\"",
                dir.path().join("state").display()
            ),
        );
    let config = dir.path().join("anomalyd.toml");
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("anomalyd.log");

    // 100,000 records (20 hosts × 5000 ticks, 10 incidents), streamed at about 4,000 a second
    // while the daemon is killed at five random moments and restarted.
    let stream = fleet_stream(20, 5000, 10, 41);
    let bootstrap = tansu.bootstrap.clone();
    let records = stream.records.clone();
    let producer = tokio::spawn(async move {
        let mut offsets = BTreeSet::new();
        for chunk in records.chunks(400) {
            offsets.extend(produce(&bootstrap, "metrics", chunk).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        offsets
    });
    let collector = Collector::scores(&tansu.bootstrap);

    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut kills = Vec::new();
    for _ in 0..5 {
        let daemon = Daemon::start(&config, &log);
        // Killed at a random moment once it is consuming.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while consumed_by(addr) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..3000))).await;
        kills.push(consumed_by(addr));
        daemon.kill();
    }
    let offsets = producer.await.unwrap();
    let total = offsets.len();
    assert_eq!(total, 100_000);
    let daemon = Daemon::start(&config, &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while collector.distinct().len() < total && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status:?} after SIGTERM");
    std::thread::sleep(Duration::from_millis(500));

    let scored = collector.distinct();
    let deliveries = collector.seen.lock().unwrap().len();
    let missing: Vec<_> = offsets.difference(&scored).take(10).collect();
    assert!(missing.is_empty(), "records never scored, e.g. {missing:?}");
    eprintln!(
        "SIGKILL ×5 after {kills:?} records each: {total} records all scored, {} scored again after a kill ({:.1} %)",
        deliveries - scored.len(),
        100.0 * (deliveries - scored.len()) as f64 / total as f64
    );
    let alerts = drain_topic(
        &tansu.bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    assert_no_alert_lost(&stream, &alerts);
}
