//! `anomalyd demo`: the whole daemon on an embedded default.
//!
//! An in-process Kafka cluster (librdkafka's mock broker: the real wire protocol on a loopback
//! port), a generated fleet with injected incidents ([`stream`]) produced into a topic, the real
//! daemon with the shipped dense model consuming it, and a viewer reading the alerts topic and
//! printing alerts as they fire and resolve. At the end, every alert is matched against the
//! incidents that were injected.

pub mod mock;
pub mod stream;

pub use mock::MockKafka;

/// `println!` for the demo's narration: a reader that went away (`anomalyd demo | head`) is not
/// the demo's failure, so write errors are ignored instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::Daemon;
use crate::metrics::label;
use stream::{Fleet, Incident, FEATURES};

/// The shipped demo model, embedded so the demo runs from any directory.
const DEMO_MODEL: &[u8] = include_bytes!("../../models/demo-dense.onnx");

const INPUT_TOPIC: &str = "metrics";
const ALERTS_TOPIC: &str = "anomalyd-alerts";
const DEAD_LETTER_TOPIC: &str = "anomalyd-dead-letters";
const STATE_TOPIC: &str = "anomalyd-demo-state";
const PIPELINE: &str = "fleet";
/// Ticks after an incident ends during which an alert still counts as catching it.
const CATCH_GRACE_TICKS: u64 = 12;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Hosts in the generated fleet.
    #[arg(long, default_value_t = 20)]
    pub hosts: usize,
    /// Ticks of five simulated minutes to stream (288 make a simulated day; the first day has no incident).
    #[arg(long, default_value_t = 1152)]
    pub ticks: u64,
    /// Incidents to inject (cycling through spike, level shift, stuck sensor, broken correlation).
    #[arg(long, default_value_t = 8)]
    pub incidents: usize,
    /// Ticks produced per second of wall time; 0 streams as fast as possible.
    #[arg(long, default_value_t = 48)]
    pub rate: u64,
    /// Seed of the generated fleet.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// An ONNX model to use instead of the shipped demo model (same four features).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz while the demo runs (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9898")]
    pub listen: String,
    /// Log level of the daemon's own logs (on stderr).
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// Write the incident-free fleet data the shipped models are trained on to this CSV, and exit.
    #[arg(long, value_name = "PATH")]
    pub write_training_data: Option<PathBuf>,
}

/// The result of a demo run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub incidents: usize,
    pub caught: usize,
    pub false_alarms: usize,
    pub records: u64,
    pub dead_letters: u64,
}

pub fn main(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    if let Some(path) = &args.write_training_data {
        write_training_data(path, args.hosts, args.ticks, args.seed)?;
        eprintln!(
            "wrote {} rows of incident-free fleet data to {}",
            args.hosts as u64 * args.ticks,
            path.display()
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    crate::log::init(crate::log::LogFormat::Text, &args.log_level);
    let rt = crate::daemon::runtime()?;
    rt.block_on(async {
        // A container's PID 1 gets no default action for signals: without handlers, Ctrl-C
        // (`docker run -it … demo`) and `docker stop` would be ignored. Exit as if killed by them.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            report = run(args) => report.map(|_| std::process::ExitCode::SUCCESS),
            _ = term.recv() => Ok(std::process::ExitCode::from(128 + 15)),
            _ = int.recv() => Ok(std::process::ExitCode::from(128 + 2)),
        }
    })
}

/// Writes `hosts × ticks` rows of normal data (CSV: host, ts, the four metrics).
pub fn write_training_data(
    path: &std::path::Path,
    hosts: usize,
    ticks: u64,
    seed: u64,
) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut header = vec!["host", "ts"];
    header.extend(FEATURES);
    w.write_record(&header)?;
    // A different seed from the demo's stream: the model must generalise, not memorise.
    let mut fleet = Fleet::new(hosts, ticks, 0, seed.wrapping_add(1_000_003));
    for _ in 0..ticks {
        for row in fleet.next_tick() {
            let mut rec = vec![row.key(), row.timestamp()];
            rec.extend(row.values.iter().map(|v| format!("{v:.3}")));
            w.write_record(&rec)?;
        }
    }
    w.flush()?;
    Ok(())
}

fn demo_config(bootstrap: &str, model: &std::path::Path, listen: &str) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "anomalyd-demo"
[kafka.properties]
# Consumer lag in /metrics within a second rather than five: the demo is short.
"statistics.interval.ms" = "1000"
[http]
listen = "{listen}"
[runtime]
shutdown_grace = "10s"
[pipelines.{PIPELINE}]
topics = ["{INPUT_TOPIC}"]
model = "{model}"
key_field = "host"
timestamp_field = "ts"
alerts_topic = "{ALERTS_TOPIC}"
dead_letter_topic = "{DEAD_LETTER_TOPIC}"
state_topic = "{STATE_TOPIC}"
[pipelines.{PIPELINE}.batch]
max_size = 64
max_wait = "10ms"
[pipelines.{PIPELINE}.alert]
fire_after = 3
resolve_after = 6
"#,
        model = model.display()
    );
    let config = Config::from_toml(&text, Some(HashMap::new()))
        .map_err(|e| anyhow!("demo configuration: {e}"))?;
    config
        .validate()
        .map_err(|e| anyhow!("demo configuration: {e}"))?;
    Ok(config)
}

/// Runs the demo and prints its live alerts and summary.
pub async fn run(args: DemoArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let cluster = MockKafka::start(&[
        (INPUT_TOPIC, 4),
        (ALERTS_TOPIC, 1),
        (DEAD_LETTER_TOPIC, 1),
        (STATE_TOPIC, 4),
    ])?;
    let scratch = tempfile_dir()?;
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let p = scratch.join("demo-dense.onnx");
            std::fs::write(&p, DEMO_MODEL).with_context(|| format!("writing {}", p.display()))?;
            p
        }
    };
    let config = demo_config(&cluster.bootstrap, &model_path, &args.listen)?;
    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(config, shutdown.clone())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut fleet = Fleet::new(args.hosts, args.ticks, args.incidents, args.seed);
    let incidents = fleet.incidents().to_vec();
    say!(
        "anomalyd demo: {} hosts × {} ticks (5 simulated minutes each) with {} injected incidents",
        fleet.hosts(),
        args.ticks,
        incidents.len()
    );
    say!("  Kafka (in-process): {}", cluster.bootstrap);
    if let Some(addr) = daemon.http_addr {
        say!("  metrics:            http://{addr}/metrics");
    }
    say!("  model:              {}", model_path.display());
    say!("  alerts as they fire and resolve:\n");

    let events: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let viewer_stop = CancellationToken::new();
    let viewer = tokio::spawn(view_alerts(
        cluster.bootstrap.clone(),
        events.clone(),
        viewer_stop.clone(),
    ));

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("linger.ms", "5")
        .create()
        .context("creating the demo producer")?;
    let mut tick_of: HashMap<String, u64> = HashMap::new();
    let mut produced = 0u64;
    let mut deliveries = Vec::new();
    let pace = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut next = tokio::time::Instant::now();
    for tick in 0..args.ticks {
        let rows = fleet.next_tick();
        if let Some(first) = rows.first() {
            tick_of.insert(first.timestamp(), tick);
        }
        for row in rows {
            let key = row.key();
            let payload = row.to_json();
            deliveries.push(
                producer
                    .send_result(FutureRecord::to(INPUT_TOPIC).key(&key).payload(&payload))
                    .map_err(|(e, _)| anyhow!("producing to the demo topic: {e}"))?,
            );
            produced += 1;
        }
        // A few records that cannot be scored, to show the dead-letter topic at work.
        if tick == args.ticks / 2 {
            for bad in [
                "this is not JSON".to_string(),
                r#"{"host":"host-05","ts":"x","cpu_pct":"high","requests_per_s":1,"latency_ms":1,"net_out_mbps":1}"#.to_string(),
                r#"{"host":"host-06","cpu_pct":50}"#.to_string(),
            ] {
                deliveries.push(producer.send_result(
                    FutureRecord::to(INPUT_TOPIC).key("bad").payload(&bad),
                ).map_err(|(e, _)| anyhow!("producing to the demo topic: {e}"))?);
                produced += 1;
            }
        }
        if let Some(pace) = pace {
            next += pace;
            tokio::time::sleep_until(next).await;
        } else if deliveries.len() > 10_000 {
            for d in deliveries.drain(..) {
                d.await.ok();
            }
        }
    }
    for d in deliveries {
        d.await
            .map_err(|_| anyhow!("a demo record was not delivered"))?
            .map_err(|(e, _)| anyhow!("a demo record was not delivered: {e}"))?;
    }

    // Wait until the daemon has taken in every record, then give the last alerts a moment.
    let wait_until = Instant::now() + Duration::from_secs(60);
    while consumed_of(&daemon.metrics) < produced && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let metrics = daemon.metrics.clone();
    drop(producer);
    shutdown.cancel();
    daemon.wait().await.map_err(|e| anyhow!("{e}"))?;
    viewer_stop.cancel();
    let _ = viewer.await;
    drop(cluster);

    let events = events.lock().expect("events lock").clone();
    let report = summarise(
        &incidents,
        &events,
        &tick_of,
        consumed_of(&metrics),
        metrics
            .records
            .with_label_values(&[PIPELINE, label::DEAD_LETTER])
            .get(),
        started.elapsed(),
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(report)
}

fn consumed_of(m: &crate::metrics::Metrics) -> u64 {
    label::OUTCOMES
        .iter()
        .map(|o| m.records.with_label_values(&[PIPELINE, o]).get())
        .sum()
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("anomalyd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Reads the alerts topic and prints each event as it arrives.
async fn view_alerts(
    bootstrap: String,
    events: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "anomalyd-demo-viewer")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[ALERTS_TOPIC])?;
    loop {
        let m = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.cancelled() => return Ok(()),
        };
        let Ok(m) = m else { continue };
        let Some(Ok(event)) = m.payload().map(serde_json::from_slice::<serde_json::Value>) else {
            continue;
        };
        say!("{}", describe(&event));
        if let Ok(seen) = serde_json::from_value::<Seen>(event) {
            events.lock().expect("events lock").push(seen);
        }
    }
}

/// The parts of an alert event the demo matches against its incidents.
#[derive(Debug, Clone, serde::Deserialize)]
struct Seen {
    event: String,
    key: String,
    timestamp: Option<String>,
}

/// One line for an alert event.
fn describe(e: &serde_json::Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("?").to_string();
    let f = |k: &str| e[k].as_f64().unwrap_or(f64::NAN);
    let when = s("timestamp")
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string();
    let top: Vec<String> = e["top_features"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    format!(
                        "{} {} (expected {})",
                        t["name"].as_str().unwrap_or("?"),
                        fmt_num(t["value"].as_f64()),
                        fmt_num(t["expected"].as_f64())
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if s("event") == "firing" {
        format!(
            "  \x1b[1;31mFIRING\x1b[0m   {}  {}  score {:.3} > threshold {:.3}  [{}]\n           top: {}",
            s("key"),
            when,
            f("score"),
            f("threshold"),
            s("severity"),
            top.join(", ")
        )
    } else {
        format!(
            "  \x1b[32mresolved\x1b[0m {}  {}  after {} points, peak score {:.3}",
            s("key"),
            when,
            e["episode"]["points"].as_u64().unwrap_or(0),
            e["episode"]["max_score"].as_f64().unwrap_or(f64::NAN)
        )
    }
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
        None => "?".into(),
    }
}

/// Matches firing events against the injected incidents and prints the summary.
fn summarise(
    incidents: &[Incident],
    events: &[Seen],
    tick_of: &HashMap<String, u64>,
    records: u64,
    dead_letters: u64,
    elapsed: Duration,
) -> Report {
    let firing: Vec<(&str, u64)> = events
        .iter()
        .filter(|e| e.event == "firing")
        .filter_map(|e| {
            let tick = tick_of.get(e.timestamp.as_deref()?)?;
            Some((e.key.as_str(), *tick))
        })
        .collect();
    let covers = |i: &Incident, key: &str, tick: u64| {
        key == stream::host_name(i.host) && tick >= i.start && tick <= i.end + CATCH_GRACE_TICKS
    };
    say!("\nincidents:");
    let mut caught = 0;
    for i in incidents {
        let first = firing
            .iter()
            .filter(|(k, t)| covers(i, k, *t))
            .map(|(_, t)| *t)
            .min();
        match first {
            Some(t) => {
                caught += 1;
                say!(
                    "  caught  {:<18} {} ticks {}..{}: alert after {} tick(s)",
                    format!("{:?}", i.kind),
                    stream::host_name(i.host),
                    i.start,
                    i.end,
                    t - i.start + 1
                );
            }
            None => say!(
                "  MISSED  {:<18} {} ticks {}..{}",
                format!("{:?}", i.kind),
                stream::host_name(i.host),
                i.start,
                i.end
            ),
        }
    }
    let false_alarms = firing
        .iter()
        .filter(|(k, t)| !incidents.iter().any(|i| covers(i, k, *t)))
        .count();
    say!(
        "\n{records} records scored in {:.1}s, {dead_letters} sent to the dead-letter topic, {} alert events",
        elapsed.as_secs_f64(),
        events.len()
    );
    say!(
        "incidents caught {caught}/{}, false alarms {false_alarms}",
        incidents.len()
    );
    Report {
        incidents: incidents.len(),
        caught,
        false_alarms,
        records,
        dead_letters,
    }
}
