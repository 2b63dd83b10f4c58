//! Kafka end to end on the tansu broker (a separate process), with the release `anomalyd run`
//! binary as a child process, and the Python baseline (`benches/python_consumer.py`: a
//! confluent-kafka consumer + onnxruntime) on the same broker and the same records, side by side.
//!
//! ```sh
//! taskset -c 1 cargo bench --bench kafka_e2e -- [--records 1000000] [--python-records 300000] \
//!     [--repeats 3] [--consumer-cpus 0] [--python target/venv/bin/python] [--latency-seconds 15]
//! ```
//!
//! 1. **Throughput**: `--records` demo-fleet records (1000 hosts × 4 metrics, JSON as the demo
//!    produces them, a few incidents) are produced to a topic before anything consumes it. Then,
//!    `--repeats` times, alternately: the daemon (a fresh consumer group, the shipped
//!    `models/demo-dense.onnx`, default pipeline settings, alerts to a topic) until its
//!    `anomalyd_records_total` on `/metrics` reaches `--records`; and the Python consumer (a fresh
//!    group, the same model) until it has scored, alerted and committed `--python-records`.
//!    Rates are measured from the first record consumed (group join and model load excluded) to
//!    the last; the daemon's rate over its first `--python-records` records is reported too, so
//!    the ratio compares the same amount of work. CPU time of the consumer process over the same
//!    span gives CPU µs per record.
//! 2. **Latency**: a fresh daemon on a fresh topic (`fire_after = 1`, `resolve_after = 1`: every
//!    latency spike fires and the next normal point resolves), records produced at half the
//!    daemon's median throughput for `--latency-seconds`, 4 % of them spikes; each record's send
//!    time is kept by (partition, offset) from its delivery report, each alert event's arrival
//!    on the alerts topic is timed, matched through its `source.partition`/`source.offset`, and
//!    the p50/p99 of arrival − send are reported.
//!
//! CPU: with `--consumer-cpus 0` (scripts/bench.sh's default on a machine with 2+ cores) the
//! consumer under test (daemon or Python) runs under `taskset -c 0`, and everything else (this
//! harness, its producer and alert reader, tansu) on the CPUs this harness was started on; run it
//! as `taskset -c 1 …` so they do not share. `--consumer-cpus ""` pins nothing.
//!
//! Lines starting with `BENCH ` are JSON for scripts/bench.sh.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomalyd::demo::stream::Fleet;
use anomalyd::metrics::label::PHASES;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

struct Args {
    records: usize,
    python_records: usize,
    hosts: usize,
    partitions: u32,
    repeats: usize,
    consumer_cpus: String,
    python: Option<PathBuf>,
    latency_seconds: u64,
    latency_repeats: usize,
    /// Latency at this rate (records/s) instead of half the measured throughput.
    latency_rate: Option<f64>,
    /// Skip the throughput runs (with --latency-rate).
    latency_only: bool,
    /// librdkafka properties for the daemon's `[kafka.properties]` (KEY=VALUE).
    daemon_properties: Vec<(String, String)>,
    /// TOML lines appended to the pipeline's table in every daemon config (e.g.
    /// `batch.max_wait = "5ms"`), to measure pipeline settings as `--daemon-property` does
    /// client properties.
    pipeline_toml: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench kafka_e2e -- [--records N] [--python-records N] [--hosts N] \
         [--partitions N] [--repeats N] [--consumer-cpus LIST] [--python PYTHON] \
         [--latency-seconds S] [--latency-repeats N] [--latency-rate R] [--latency-only] [--daemon-property KEY=VALUE]... [--pipeline-toml LINE]...\n\
         needs tansu (TANSU_BIN, or ~/.cargo/bin/tansu: scripts/test.sh installs it); \
         --python needs a Python with confluent-kafka and onnxruntime (scripts/bench.sh installs them)"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        records: 1_000_000,
        python_records: 300_000,
        hosts: 1000,
        partitions: 4,
        repeats: 3,
        consumer_cpus: String::new(),
        python: None,
        latency_seconds: 10,
        latency_repeats: 3,
        latency_rate: None,
        latency_only: false,
        daemon_properties: Vec::new(),
        pipeline_toml: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        fn num<T: std::str::FromStr>(s: String) -> T {
            s.parse().unwrap_or_else(|_| usage())
        }
        match arg.as_str() {
            "--bench" => {}
            "--records" => a.records = num(value()),
            "--python-records" => a.python_records = num(value()),
            "--hosts" => a.hosts = num(value()),
            "--partitions" => a.partitions = num(value()),
            "--repeats" => a.repeats = num(value()),
            "--consumer-cpus" => a.consumer_cpus = value(),
            "--python" => a.python = Some(PathBuf::from(value())),
            "--latency-seconds" => a.latency_seconds = num(value()),
            "--latency-repeats" => a.latency_repeats = num(value()),
            "--latency-rate" => a.latency_rate = Some(num(value())),
            "--latency-only" => a.latency_only = true,
            "--daemon-property" => {
                let kv = value();
                let (k, v) = kv.split_once('=').unwrap_or_else(|| usage());
                a.daemon_properties.push((k.to_string(), v.to_string()));
            }
            "--pipeline-toml" => {
                a.pipeline_toml.push_str(&value());
                a.pipeline_toml.push('\n');
            }
            _ => usage(),
        }
    }
    if a.records == 0
        || a.hosts == 0
        || a.repeats == 0
        || a.partitions == 0
        || a.latency_repeats == 0
    {
        usage()
    }
    if a.latency_only && a.latency_rate.is_none() {
        eprintln!("--latency-only needs --latency-rate");
        usage()
    }
    a.python_records = a.python_records.min(a.records);
    a
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process killed (and reaped) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmd` under `taskset -c cpus` when `cpus` is not empty.
fn pinned(cpus: &str, program: &Path) -> Command {
    if cpus.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpus).arg(program);
        c
    }
}

struct Tansu {
    _proc: Proc,
    bin: PathBuf,
    bootstrap: String,
}

impl Tansu {
    fn start() -> Tansu {
        let bin = std::env::var_os("TANSU_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
                p.is_file().then_some(p)
            })
            .unwrap_or_else(|| {
                eprintln!(
                    "tansu not found: set TANSU_BIN, or install it (scripts/test.sh does: \
                     cargo install tansu --locked --version 0.6.0 --features dynostore)"
                );
                std::process::exit(2)
            });
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Tansu {
            _proc: proc,
            bin,
            bootstrap: format!("127.0.0.1:{port}"),
        }
    }

    fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(&self.bin)
            .args(["topic", "create", name, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &format!("tcp://{}", self.bootstrap)])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "creating topic {name}");
    }
}

/// Delivery reports: counts, and optionally each record's (partition, offset) → its index.
#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
    track: bool,
    offsets: Mutex<HashMap<(i32, i64), usize>>,
}

struct Ctx(Arc<Deliveries>);

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        match result {
            Ok(m) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
                if self.0.track {
                    self.0
                        .offsets
                        .lock()
                        .unwrap()
                        .insert((m.partition(), m.offset()), index);
                }
            }
            Err(_) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn producer(bootstrap: &str, linger_ms: &str, track: bool) -> (BaseProducer<Ctx>, Arc<Deliveries>) {
    let d = Arc::new(Deliveries {
        track,
        ..Default::default()
    });
    let p = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", linger_ms)
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2097151")
        .set("message.timeout.ms", "60000")
        .create_with_context(Ctx(d.clone()))
        .expect("producer");
    (p, d)
}

fn send(p: &BaseProducer<Ctx>, topic: &str, key: &str, payload: &str, index: usize) {
    let mut record = BaseRecord::with_opaque_to(topic, index)
        .key(key)
        .payload(payload);
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) => {
                record = r;
                p.poll(Duration::from_millis(5));
            }
            Err((e, _)) => panic!("produce to {topic}: {e}"),
        }
    }
}

/// Demo-fleet records: `hosts` hosts × enough ticks for `n` records.
fn fleet_records(
    n: usize,
    hosts: usize,
    seed: u64,
    spike_every: Option<u64>,
) -> Vec<(String, String)> {
    let ticks = n.div_ceil(hosts) as u64;
    let incidents = if spike_every.is_some() { 0 } else { hosts / 20 };
    let mut fleet = Fleet::new(hosts, ticks, incidents, seed);
    let mut out = Vec::with_capacity(n);
    'ticks: for _ in 0..ticks {
        for mut row in fleet.next_tick() {
            if let Some(every) = spike_every {
                // A latency spike (4×) on a staggered subset of hosts each tick.
                if (row.tick + row.host as u64).is_multiple_of(every) {
                    row.values[2] *= 4.0;
                }
            }
            out.push((row.key(), row.to_json()));
            if out.len() == n {
                break 'ticks;
            }
        }
    }
    out
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn records_total(addr: SocketAddr) -> Option<u64> {
    let (_, body) = http_get(addr, "/metrics")?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("anomalyd_records_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

fn startup_phases(addr: SocketAddr) -> Vec<f64> {
    let body = http_get(addr, "/metrics").map(|r| r.1).unwrap_or_default();
    PHASES
        .iter()
        .map(|phase| {
            let series =
                format!("anomalyd_startup_seconds{{phase=\"{phase}\",pipeline=\"fleet\"}} ");
            body.lines()
                .find_map(|l| l.strip_prefix(&series)?.parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or_else(|| {
            eprintln!("getconf CLK_TCK failed: CPU times unavailable");
            f64::NAN
        })
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32, tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / tck
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

struct DaemonCfg<'a> {
    properties: &'a [(String, String)],
    bootstrap: &'a str,
    group: &'a str,
    topic: &'a str,
    alerts: &'a str,
    listen: SocketAddr,
    threads: usize,
    pipeline_toml: &'a str,
    extra_pipeline: &'a str,
}

fn daemon_config(dir: &Path, c: &DaemonCfg) -> PathBuf {
    let model = repo().join("models/demo-dense.onnx");
    let text = format!(
        r#"[kafka]
brokers = "{bootstrap}"
group_id = "{group}"
[kafka.properties]
{properties}
[http]
listen = "{listen}"
[log]
level = "warn"
[runtime]
inference_threads = {threads}
[pipelines.fleet]
topics = ["{topic}"]
model = "{model}"
key_field = "host"
timestamp_field = "ts"
alerts_topic = "{alerts}"
dead_letter_topic = "bench-dead-letters"
{pipeline_toml}{extra}
"#,
        bootstrap = c.bootstrap,
        group = c.group,
        listen = c.listen,
        threads = c.threads,
        topic = c.topic,
        alerts = c.alerts,
        model = model.display(),
        pipeline_toml = c.pipeline_toml,
        extra = c.extra_pipeline,
        properties = c
            .properties
            .iter()
            .map(|(k, v)| format!("{k:?} = {v:?}\n"))
            .collect::<String>(),
    );
    let path = dir.join(format!("{}.toml", c.group));
    std::fs::write(&path, text).expect("write the daemon's config");
    path
}

fn start_daemon(cpus: &str, config: &Path, log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("daemon log");
    let bin = Path::new(env!("CARGO_BIN_EXE_anomalyd"));
    Proc(
        pinned(cpus, bin)
            .args(["run", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start anomalyd"),
    )
}

fn sigterm(proc: &mut Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = proc.0.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("anomalyd did not exit within 40 s of SIGTERM; killing it");
}

/// A taskset-wrapped child's own pid is taskset's until it execs, which is immediate; the pid
/// stays the same, so /proc/<pid> is the daemon's.
fn pid_of(p: &Proc) -> u32 {
    p.0.id()
}

struct Run {
    /// Records per second, first record to `--records`.
    rate: f64,
    /// Records per second, first record to `--python-records`.
    rate_prefix: f64,
    cpu_us_per_record: f64,
    peak_rss_mb: f64,
    startup_s: f64,
    /// The cold start's [`PHASES`], seconds from the daemon's start, as it reports them.
    phases: Vec<f64>,
}

fn daemon_throughput(a: &Args, tansu: &Tansu, dir: &Path, group: &str, tck: f64) -> Run {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let threads = cpu_count(&a.consumer_cpus);
    let config = daemon_config(
        dir,
        &DaemonCfg {
            properties: &a.daemon_properties,
            bootstrap: &tansu.bootstrap,
            group,
            topic: "bench-in",
            alerts: "bench-alerts",
            listen,
            threads,
            pipeline_toml: &a.pipeline_toml,
            extra_pipeline: "",
        },
    );
    let log = dir.join(format!("{group}.log"));
    let spawned = Instant::now();
    let mut proc = start_daemon(&a.consumer_cpus, &config, &log);
    let pid = pid_of(&proc);
    let n = a.records as u64;
    let timeout = Duration::from_secs(120 + a.records as u64 / 5_000);
    let mut first: Option<(Instant, u64, f64)> = None;
    let mut at_prefix: Option<(Instant, u64)> = None;
    let end;
    loop {
        if spawned.elapsed() > timeout {
            panic!(
                "anomalyd took in only {:?} of {n} records in {timeout:?}; log {}:\n{}",
                records_total(listen),
                log.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if let Ok(Some(status)) = proc.0.try_wait() {
            panic!(
                "anomalyd exited ({status}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let now = Instant::now();
        let count = records_total(listen).unwrap_or(0);
        let cpu = cpu_seconds(pid, tck);
        if count > 0 && first.is_none() {
            first = Some((now, count, cpu));
        }
        if count >= a.python_records as u64 && at_prefix.is_none() {
            at_prefix = Some((now, count));
        }
        if count >= n {
            end = (now, count, cpu);
            break;
        }
        // Each scrape costs the daemon a little CPU (5 % of its one core when scraped every
        // 10 ms): 20 a second keeps that small and the rate within 1 % on runs of seconds.
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss = peak_rss_mb(pid);
    let phases = startup_phases(listen);
    sigterm(&mut proc);
    let (t0, c0, cpu0) = first.expect("a first count");
    let (tp, cp) = at_prefix.expect("prefix reached");
    let rate = (end.1 - c0) as f64 / (end.0 - t0).as_secs_f64();
    let rate_prefix = (cp - c0) as f64 / (tp - t0).as_secs_f64().max(1e-3);
    Run {
        rate,
        rate_prefix,
        cpu_us_per_record: (end.2 - cpu0) / (end.1 - c0) as f64 * 1e6,
        peak_rss_mb: rss,
        startup_s: (t0 - spawned).as_secs_f64(),
        phases,
    }
}

fn cpu_count(cpus: &str) -> usize {
    if cpus.is_empty() {
        return std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    cpus.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
                b.saturating_sub(a) + 1
            }
            None => 1,
        })
        .sum()
}

fn python_throughput(a: &Args, python: &Path, tansu: &Tansu, group: &str) -> Run {
    let script = repo().join("benches/python_consumer.py");
    let spawned = Instant::now();
    let out = pinned(&a.consumer_cpus, python)
        .arg(&script)
        .args(["--bootstrap", &tansu.bootstrap, "--topic", "bench-in"])
        .args(["--group", group, "--alerts-topic", "py-alerts"])
        .arg("--model")
        .arg(repo().join("models/demo-dense.onnx"))
        .args(["--count", &a.python_records.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .expect("start the Python consumer");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python consumer failed ({}):\n{text}",
        out.status
    );
    let v: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary from the Python consumer:\n{text}"));
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Run {
        rate: f("records_per_s"),
        rate_prefix: f("records_per_s"),
        cpu_us_per_record: f("cpu_s") / f("records") * 1e6,
        peak_rss_mb: f("max_rss_mb"),
        startup_s: spawned.elapsed().as_secs_f64() - f("seconds"),
        phases: Vec::new(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Latency {
    rate: f64,
    sent: usize,
    alerts: usize,
    matched: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// From the record's send to the daemon's produce of its alert (the alert's CreateTime,
    /// millisecond resolution): the input hop through the broker plus the daemon. The rest of
    /// `p50_ms` is the alert's own hop to the reader.
    produced_p50_ms: f64,
    produced_p99_ms: f64,
}

/// An alert event read back: when it arrived, its CreateTime (ms since the epoch), and the
/// partition and offset of the record that raised it.
type Arrival = (Instant, i64, i32, i64);

/// One latency run on fresh topics `lat-in-{run}` and `lat-alerts-{run}`, the daemon with
/// `--daemon-property` values as its `[kafka.properties]`.
fn latency(a: &Args, tansu: &Tansu, dir: &Path, rate: f64, run: usize) -> Latency {
    let (topic, alerts, group) = (
        format!("lat-in-{run}"),
        format!("lat-alerts-{run}"),
        format!("latency-{run}"),
    );
    tansu.create_topic(&topic, a.partitions);
    tansu.create_topic(&alerts, 1);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = daemon_config(
        dir,
        &DaemonCfg {
            properties: &a.daemon_properties,
            bootstrap: &tansu.bootstrap,
            group: &group,
            topic: &topic,
            alerts: &alerts,
            listen,
            threads: cpu_count(&a.consumer_cpus),
            pipeline_toml: &a.pipeline_toml,
            extra_pipeline: "[pipelines.fleet.alert]\nfire_after = 1\nresolve_after = 1\n",
        },
    );
    let log = dir.join(format!("{group}.log"));
    let mut proc = start_daemon(&a.consumer_cpus, &config, &log);
    // Ready = model loaded and partitions assigned.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(listen, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "anomalyd not ready within 60 s; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The alerts reader: every event's arrival time and its source record.
    let stop = Arc::new(AtomicBool::new(false));
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Default::default();
    let reader = {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &tansu.bootstrap)
            .set("group.id", format!("{group}-reader"))
            .set("enable.auto.commit", "false")
            // The instrument should add as little as it can: tansu holds every fetch this long.
            .set("fetch.wait.max.ms", "1")
            .create()
            .expect("alerts reader");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&alerts, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).expect("assign the alerts topic");
        let (stop, arrivals) = (stop.clone(), arrivals.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
                    let at = Instant::now();
                    let created = m.timestamp().to_millis().unwrap_or(-1);
                    let v: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
                    let src = &v["source"];
                    if let (Some(p), Some(o)) = (src["partition"].as_i64(), src["offset"].as_i64())
                    {
                        arrivals.lock().unwrap().push((at, created, p as i32, o));
                    }
                }
            }
        })
    };
    // Give the reader its assignment before anything is sent.
    std::thread::sleep(Duration::from_millis(500));

    let n = (rate * a.latency_seconds as f64) as usize;
    let records = fleet_records(n, a.hosts, 99, Some(25));
    // linger.ms 5, librdkafka's default: what a service producing metrics would use. One
    // millisecond made tansu, which shares its core with this producer, the bottleneck (one
    // produce request per partition per millisecond) and doubled the p99.
    let (p, deliveries) = producer(&tansu.bootstrap, "5", true);
    let mut sent_at: Vec<Instant> = Vec::with_capacity(n);
    let start = Instant::now();
    // Instants mapped onto the wall clock of the alerts' CreateTime.
    let start_epoch_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1e3;
    let epoch_ms = |t: Instant| start_epoch_ms + t.duration_since(start).as_secs_f64() * 1e3;
    let mut i = 0;
    while i < n {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(n);
        if due == i {
            p.poll(Duration::from_micros(200));
            continue;
        }
        while i < due {
            sent_at.push(Instant::now());
            send(&p, &topic, &records[i].0, &records[i].1, i);
            i += 1;
        }
        p.poll(Duration::ZERO);
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    p.flush(Duration::from_secs(30)).expect("flush");
    // Stragglers: wait until no alert arrived for 3 s.
    let mut last = (0, Instant::now());
    while last.1.elapsed() < Duration::from_secs(3) {
        let len = arrivals.lock().unwrap().len();
        if len != last.0 {
            last = (len, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    sigterm(&mut proc);
    assert_eq!(
        deliveries.failed.load(Ordering::Relaxed),
        0,
        "records failed delivery"
    );

    let offsets = deliveries.offsets.lock().unwrap();
    let arrivals = arrivals.lock().unwrap();
    // Records sent in the first second (group join, warm-up) are left out.
    let warm = start + Duration::from_secs(1);
    let (mut ms, mut produced): (Vec<f64>, Vec<f64>) = arrivals
        .iter()
        .filter_map(|(at, created, p, o)| {
            let sent = sent_at[*offsets.get(&(*p, *o))?];
            (sent >= warm).then(|| {
                (
                    at.duration_since(sent).as_secs_f64() * 1e3,
                    *created as f64 - epoch_ms(sent),
                )
            })
        })
        .unzip();
    ms.sort_by(|a, b| a.total_cmp(b));
    produced.sort_by(|a, b| a.total_cmp(b));
    Latency {
        rate: achieved,
        sent: n,
        alerts: arrivals.len(),
        matched: ms.len(),
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
        produced_p50_ms: percentile(&produced, 0.5),
        produced_p99_ms: percentile(&produced, 0.99),
    }
}

fn pinning(a: &Args) -> String {
    if a.consumer_cpus.is_empty() {
        "unpinned".to_string()
    } else {
        format!("consumer on CPU {}", a.consumer_cpus)
    }
}

fn properties(a: &Args) -> serde_json::Value {
    a.daemon_properties
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The throughput runs (anomalyd and Python, side by side); prints their BENCH line and returns
/// the daemon's rates.
fn throughput(a: &Args, tansu: &Tansu, dir: &Path, tck: f64) -> Vec<f64> {
    eprintln!("kafka_e2e: generating and producing {} records", a.records);
    let records = fleet_records(a.records, a.hosts, 42, None);
    let bytes: usize = records.iter().map(|r| r.1.len()).sum();
    let (p, deliveries) = producer(&tansu.bootstrap, "20", false);
    let start = Instant::now();
    for (i, (k, v)) in records.iter().enumerate() {
        send(&p, "bench-in", k, v, i);
        if i % 1000 == 0 {
            p.poll(Duration::ZERO);
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
    let produce_s = start.elapsed().as_secs_f64();
    assert_eq!(
        deliveries.ok.load(Ordering::Relaxed) as usize,
        a.records,
        "not every record was delivered"
    );
    drop(p);
    drop(records);
    eprintln!(
        "kafka_e2e: produced {} records ({:.0} bytes each) in {produce_s:.1} s ({:.0}/s)",
        a.records,
        bytes as f64 / a.records as f64,
        a.records as f64 / produce_s
    );

    let mut daemon_runs = Vec::new();
    let mut python_runs = Vec::new();
    for r in 0..a.repeats {
        let d = daemon_throughput(a, tansu, dir, &format!("anomalyd-{r}"), tck);
        eprintln!(
            "kafka_e2e: anomalyd run {r}: {:.0} records/s ({:.0}/s over the first {}), {:.2} CPU µs/record, peak RSS {:.0} MB, first record after {:.1} s",
            d.rate, d.rate_prefix, a.python_records, d.cpu_us_per_record, d.peak_rss_mb, d.startup_s
        );
        daemon_runs.push(d);
        if let Some(py) = &a.python {
            let p = python_throughput(a, py, tansu, &format!("python-{r}"));
            eprintln!(
                "kafka_e2e: python run {r}: {:.0} records/s, {:.2} CPU µs/record, peak RSS {:.0} MB",
                p.rate, p.cpu_us_per_record, p.peak_rss_mb
            );
            python_runs.push(p);
        }
    }
    let col = |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let d_rate = col(&daemon_runs, |r| r.rate);
    let d_prefix = col(&daemon_runs, |r| r.rate_prefix);
    let d_cpu = col(&daemon_runs, |r| r.cpu_us_per_record);
    let d_rss = col(&daemon_runs, |r| r.peak_rss_mb);
    let d_startup = col(&daemon_runs, |r| r.startup_s);
    let p_rate = col(&python_runs, |r| r.rate);
    let p_cpu = col(&python_runs, |r| r.cpu_us_per_record);
    let p_rss = col(&python_runs, |r| r.peak_rss_mb);
    // Ratios per side-by-side pair, then their median.
    let ratio =
        |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
    let pinning = pinning(a);
    println!(
        "BENCH {}",
        serde_json::json!({
            "bench": "kafka_throughput",
            "records": a.records,
            "python_records": a.python_records,
            "partitions": a.partitions,
            "hosts": a.hosts,
            "pinning": pinning,
            "daemon_properties": properties(a),
            "pipeline_toml": a.pipeline_toml,
            "produce_records_per_s": a.records as f64 / produce_s,
            "anomalyd_records_per_s": d_rate,
            "anomalyd_prefix_records_per_s": d_prefix,
            "anomalyd_cpu_us_per_record": d_cpu,
            "anomalyd_peak_rss_mb": d_rss,
            "anomalyd_startup_s": d_startup,
            // In the order they happen (a JSON object would sort them by name).
            "anomalyd_startup_phases": PHASES
                .iter()
                .enumerate()
                .map(|(i, phase)| serde_json::json!({
                    "phase": phase,
                    "seconds": daemon_runs.iter().map(|r| r.phases[i]).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>(),
            "python_records_per_s": p_rate,
            "python_cpu_us_per_record": p_cpu,
            "python_peak_rss_mb": p_rss,
            "ratio_throughput": ratio(&d_prefix, &p_rate),
            "ratio_cpu": ratio(&p_cpu, &d_cpu),
        })
    );

    d_rate
}

fn main() {
    let a = parse_args();
    let tck = clock_ticks();
    if let Some(py) = &a.python {
        let ok = Command::new(py)
            .args(["-c", "import confluent_kafka, onnxruntime, numpy"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "{} cannot import confluent_kafka, onnxruntime and numpy: run scripts/bench.sh \
                 (it installs confluent-kafka into target/venv), or leave out --python",
                py.display()
            );
            std::process::exit(2)
        }
    }
    if !a.consumer_cpus.is_empty() && Command::new("taskset").arg("-V").output().is_err() {
        eprintln!("--consumer-cpus needs taskset (util-linux)");
        std::process::exit(2)
    }
    let dir = std::env::temp_dir().join(format!("anomalyd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let tansu = Tansu::start();
    for (t, p) in [
        ("bench-in", a.partitions),
        ("bench-alerts", 1),
        ("py-alerts", 1),
        ("bench-dead-letters", 1),
    ] {
        tansu.create_topic(t, p);
    }

    let rate = match a.latency_only {
        true => a.latency_rate.expect("checked in parse_args"),
        false => {
            let d_rate = throughput(&a, &tansu, &dir, tck);
            a.latency_rate.unwrap_or(median(&d_rate) / 2.0)
        }
    };
    // The shipped defaults (and whatever --daemon-property / --pipeline-toml add): the figure
    // issue 13 asks for. Other settings are compared by running the bench again with them.
    let runs: Vec<Latency> = (0..a.latency_repeats)
        .map(|run| {
            eprintln!(
                "kafka_e2e: latency at {rate:.0} records/s for {} s, daemon properties {:?}",
                a.latency_seconds, a.daemon_properties
            );
            let l = latency(&a, &tansu, &dir, rate, run);
            eprintln!(
                "kafka_e2e: latency p50 {:.1} ms, p99 {:.1} ms over {} alert events \
                 (to the alert's produce: p50 {:.1} ms, p99 {:.1} ms)",
                l.p50_ms, l.p99_ms, l.matched, l.produced_p50_ms, l.produced_p99_ms
            );
            l
        })
        .collect();
    let col = |f: fn(&Latency) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    println!(
        "BENCH {}",
        serde_json::json!({
            "bench": "kafka_latency",
            "target_rate": rate,
            "seconds": a.latency_seconds,
            "achieved_rate": col(|l| l.rate),
            "records": col(|l| l.sent as f64),
            "alert_events": col(|l| l.alerts as f64),
            "matched": col(|l| l.matched as f64),
            "p50_ms": col(|l| l.p50_ms),
            "p99_ms": col(|l| l.p99_ms),
            "max_ms": col(|l| l.max_ms),
            "produced_p50_ms": col(|l| l.produced_p50_ms),
            "produced_p99_ms": col(|l| l.produced_p99_ms),
            "pinning": pinning(&a),
            "daemon_properties": properties(&a),
            "pipeline_toml": a.pipeline_toml,
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
}
