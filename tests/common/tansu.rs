//! The tansu broker process and `anomalyd run` child processes, for the tests that run the
//! binary against a real broker (tests/tansu.rs, tests/scale.rs).
//!
//! The test command (scripts/test.sh) installs tansu and sets ANOMALYD_REQUIRE_TANSU=1, so in
//! CI a missing broker fails the test; a developer running `cargo test` without tansu gets a
//! message instead.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ports::spawn_listening;

pub fn tansu_binary() -> Option<PathBuf> {
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
        let (child, port) = spawn_listening("tansu", Duration::from_secs(60), None, |port| {
            let url = format!("tcp://127.0.0.1:{port}");
            Command::new(&bin)
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
                .expect("start tansu")
        });
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

pub struct Daemon {
    child: Child,
    log: PathBuf,
    /// Where this daemon's lines start in the log (daemons of one test append to one file).
    log_from: usize,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Daemon {
        let log_from = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
        let file = std::fs::OpenOptions::new()
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
            .stderr(file)
            .spawn()
            .expect("start anomalyd");
        Daemon {
            child,
            log: log.to_path_buf(),
            log_from,
        }
    }

    /// This daemon's log lines so far.
    pub fn log(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&text[self.log_from.min(text.len())..]).into_owned()
    }

    /// The address its HTTP endpoint bound (configured as port 0), from its log.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            let addr = log
                .lines()
                .filter(|l| l.contains("Serving /metrics"))
                .find_map(|l| {
                    l.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                });
            if let Some(addr) = addr {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "no \"Serving /metrics\" line in the daemon's log within 60 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (within 30 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
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

/// A client of `group`'s committed offsets (and for assigned reads) that never joins the group.
pub fn offsets_client(bootstrap: &str, group: &str) -> rdkafka::consumer::BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a Kafka client")
}

/// Records taken in by the running daemon, from its /metrics.
pub fn consumed_by(addr: std::net::SocketAddr) -> u64 {
    scrape(addr)
        .lines()
        .filter(|l| l.starts_with("anomalyd_records_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The text of a daemon's /metrics (empty if it does not answer).
pub fn scrape(addr: std::net::SocketAddr) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    use std::io::{Read, Write};
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// Collects the (partition, offset) of every record on a topic, in the background.
pub struct Collector {
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<(i32, i64)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    pub fn scores(bootstrap: &str) -> Collector {
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

    pub fn distinct(&self) -> BTreeSet<(i32, i64)> {
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
