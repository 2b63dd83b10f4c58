//! Several `anomalyd run` processes in one consumer group on tansu: a replica killed under
//! load, and a scale-out and back. The per-key state follows its partition through the state
//! topic, so the partitions' new owners continue with what every key learned: no record lost,
//! no re-alert on a level the keys had accepted.
//!
//! Every host's latency ramps up by 40 ms over ticks 300–700 and stays there; DSPOT learns the
//! new level as drift. A daemon that took a partition over without its keys' state would judge
//! the new level against the model's calibration and alert on most hosts (the control replay
//! below shows it does).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::tansu::*;
use common::*;

const PARTITIONS: u32 = 6;
const HOSTS: usize = 12;
const TICKS: u64 = 1100;
/// The learning phase: up to the end of the ramp and some.
const LEARN_TICKS: usize = 900;
const DSPOT: &str = "[pipelines.fleet.threshold]\nmethod = \"dspot\"";

/// Every host ramps, so that every partition holds keys at a learned level.
fn ramped_fleet() -> Stream {
    let mut s = fleet_stream(HOSTS, TICKS, 0, 77);
    for (i, (_, v)) in s.records.iter_mut().enumerate() {
        let tick = (i / HOSTS) as f64;
        let mut j: serde_json::Value = serde_json::from_str(v).unwrap();
        let ramp = 40.0 * ((tick - 300.0) / 400.0).clamp(0.0, 1.0);
        j["latency_ms"] = (j["latency_ms"].as_f64().unwrap() + ramp).into();
        *v = j.to_string();
    }
    s
}

struct Setup {
    tansu: Tansu,
    _dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
}

impl Setup {
    /// The learning phase, produced at once and waited for until every record is scored.
    async fn learn(
        &self,
        collector: &Collector,
        records: &[(String, String)],
    ) -> BTreeSet<(i32, i64)> {
        let produced: BTreeSet<(i32, i64)> = produce(&self.tansu.bootstrap, "metrics", records)
            .await
            .into_iter()
            .collect();
        wait_scored(collector, &produced, Duration::from_secs(120)).await;
        assert!(
            produced.is_subset(&collector.distinct()),
            "learning phase not scored"
        );
        produced
    }

    /// Records streamed in the background (600 a second), as a live topic.
    fn stream(
        &self,
        records: &[(String, String)],
    ) -> tokio::task::JoinHandle<BTreeSet<(i32, i64)>> {
        produce_paced(
            &self.tansu.bootstrap,
            "metrics",
            records,
            60,
            Duration::from_millis(100),
        )
    }
}

fn setup(group: &str) -> Option<Setup> {
    let tansu = Tansu::start()?;
    for (t, p) in [
        ("metrics", PARTITIONS),
        ("alerts", 1),
        ("dead-letters", 1),
        ("scores", 1),
    ] {
        tansu.create_topic(t, p);
    }
    // The state topic is left to the daemons to create. Sessions of 10 s: tansu evicts live
    // members in rebalances longer than the session (docs/NOTES.md).
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(&tansu.bootstrap, group, DSPOT)
        .replace(
            "[kafka.properties]",
            "[kafka.properties]\n\"session.timeout.ms\" = \"10000\"",
        )
        .replace("listen = \"\"", "listen = \"127.0.0.1:0\"");
    let config = dir.path().join("anomalyd.toml");
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("anomalyd.log");
    Some(Setup {
        tansu,
        _dir: dir,
        config,
        log,
    })
}

/// The value of a daemon's un-labelled-by-partition series `name{pipeline="fleet"…}`.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr)
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the live daemons' assignments cover every input partition once, each daemon
/// holding some, and stay so for 3 s.
async fn wait_for_coverage(daemons: &[SocketAddr], within: Duration) -> Vec<f64> {
    let deadline = Instant::now() + within;
    let mut stable_since: Option<Instant> = None;
    loop {
        let held: Vec<f64> = daemons
            .iter()
            .map(|a| metric(*a, "anomalyd_partitions_assigned"))
            .collect();
        let covered =
            held.iter().sum::<f64>() == f64::from(PARTITIONS) && held.iter().all(|h| *h > 0.0);
        match (covered, stable_since) {
            (true, None) => stable_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() >= Duration::from_secs(3) => return held,
            (false, _) => stable_since = None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the group's assignment did not settle within {within:?}: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_scored(collector: &Collector, offsets: &BTreeSet<(i32, i64)>, within: Duration) {
    let deadline = Instant::now() + within;
    while !offsets.is_subset(&collector.distinct()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the scores and alerts say once all is done.
struct Outcome {
    lost: Vec<(i32, i64)>,
    duplicates: usize,
    /// Hosts that fired on records of the second phase.
    refired: BTreeSet<String>,
    /// Per host, the largest relative step of its threshold between consecutive scores.
    largest_step: f64,
}

fn outcome(
    bootstrap: &str,
    produced: &BTreeSet<(i32, i64)>,
    second_phase: &BTreeSet<(i32, i64)>,
) -> Outcome {
    let scores = drain_topic(
        bootstrap,
        "scores",
        Duration::from_secs(2),
        Duration::from_secs(60),
    );
    let (scored, duplicates) = scored_offsets(&scores);
    let lost = produced.difference(&scored).copied().collect();
    let mut last: BTreeMap<String, f64> = BTreeMap::new();
    let mut largest_step: f64 = 0.0;
    for s in &scores {
        let v = s.json();
        let (key, t) = (
            v["key"].as_str().unwrap().to_string(),
            v["threshold"].as_f64().unwrap(),
        );
        if let Some(prev) = last.insert(key, t) {
            largest_step = largest_step.max((t - prev).abs() / prev.abs().max(1e-9));
        }
    }
    let alerts = drain_topic(
        bootstrap,
        "alerts",
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    let refired = alerts
        .iter()
        .map(Got::json)
        .filter(|a| a["event"] == "firing")
        .filter(|a| {
            let src = &a["source"];
            second_phase.contains(&(
                src["partition"].as_i64().unwrap() as i32,
                src["offset"].as_i64().unwrap(),
            ))
        })
        .map(|a| a["key"].as_str().unwrap().to_string())
        .collect();
    Outcome {
        lost,
        duplicates,
        refired,
        largest_step,
    }
}

impl Outcome {
    /// The figures both tests print.
    fn summary(&self, records: usize, control_fired: &BTreeSet<String>, cold_step: f64) -> String {
        format!(
            "{records} records, {} lost, {} scored twice; hosts firing on the learned level: {:?} \
             (from the calibration: {} of {HOSTS}); largest threshold step {:.3} (a cold start: \
             ≥ {cold_step:.3})",
            self.lost.len(),
            self.duplicates,
            self.refired,
            control_fired.len(),
            self.largest_step,
        )
    }

    /// Nothing lost, and the keys' state followed their partitions: no re-alert on the learnt
    /// level, and no threshold step like a cold start's, where the control (no state) shows
    /// both.
    fn assert_state_followed(&self, control_fired: &BTreeSet<String>, cold_step: f64) {
        assert!(
            self.lost.is_empty(),
            "records never scored, e.g. {:?}",
            &self.lost[..self.lost.len().min(10)]
        );
        assert!(
            control_fired.len() >= HOSTS / 2,
            "the control should alert on the learned level: {control_fired:?}"
        );
        assert!(
            self.refired.is_empty(),
            "re-alerts on the learned level: {:?}",
            self.refired
        );
        assert!(
            self.largest_step < cold_step / 2.0,
            "a threshold jumped by {:.3}, like a cold start ({cold_step:.3})",
            self.largest_step
        );
    }
}

/// The control: the second phase judged from the calibration (no state), as a replica without
/// the state topic would. It must alert on the learned level, or the test proves nothing.
fn control(stream: &Stream) -> (BTreeSet<String>, f64) {
    let all = replay_rows(&stream.records, DSPOT);
    let fresh = replay_rows(&stream.records[LEARN_TICKS * HOSTS..], DSPOT);
    let fired: BTreeSet<String> = fresh
        .iter()
        .filter(|r| r["event"] == "firing")
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    // The step a cold start makes: from each host's learned threshold to its calibration one.
    let learned: BTreeMap<&str, f64> = all[..LEARN_TICKS * HOSTS]
        .iter()
        .filter_map(|r| Some((r["key"].as_str()?, r["threshold"].as_f64()?)))
        .collect();
    let mut cold_step: f64 = f64::INFINITY;
    for r in &fresh {
        let (Some(k), Some(t)) = (r["key"].as_str(), r["threshold"].as_f64()) else {
            continue;
        };
        if let Some(l) = learned.get(k) {
            cold_step = cold_step.min((t - l).abs() / l.abs().max(1e-9));
        }
    }
    (fired, cold_step)
}

fn restored(addr: SocketAddr) -> f64 {
    metric(addr, "anomalyd_keys_restored_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_hands_its_keys_learned_state_to_the_survivor() {
    let Some(s) = setup("kill") else { return };
    let stream = ramped_fleet();
    let (learn, rest) = stream.records.split_at(LEARN_TICKS * HOSTS);
    let collector = Collector::scores(&s.tansu.bootstrap);

    let first = Daemon::start(&s.config, &s.log);
    let a1 = first.http_addr();
    wait_for_coverage(&[a1], Duration::from_secs(60)).await;
    let second = Daemon::start(&s.config, &s.log);
    let a2 = second.http_addr();
    let held = wait_for_coverage(&[a1, a2], Duration::from_secs(60)).await;

    let mut produced = s.learn(&collector, learn).await;

    // Under load: the second phase streams in while the second replica is killed.
    let streaming = s.stream(rest);
    let deadline = Instant::now() + Duration::from_secs(60);
    while collector.distinct().len() < produced.len() + rest.len() / 5 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.kill();
    let second_phase = streaming.await.unwrap();
    produced.extend(second_phase.iter().copied());
    wait_scored(&collector, &produced, Duration::from_secs(120)).await;
    let restored_by_survivor = restored(a1);
    first.terminate();

    let o = outcome(&s.tansu.bootstrap, &produced, &second_phase);
    let (control_fired, cold_step) = control(&stream);
    eprintln!(
        "SIGKILL of 1 of 2 replicas (partitions {held:?}): the survivor restored \
         {restored_by_survivor} keys; {}",
        o.summary(produced.len(), &control_fired, cold_step)
    );
    o.assert_state_followed(&control_fired, cold_step);
    assert!(
        restored_by_survivor >= 1.0,
        "the survivor restored no key of the killed replica's partitions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_from_one_replica_to_three_and_back_keeps_every_key_s_state() {
    let Some(s) = setup("scale") else { return };
    let stream = ramped_fleet();
    let (learn, rest) = stream.records.split_at(LEARN_TICKS * HOSTS);
    let (during, after) = rest.split_at(rest.len() / 2);
    let collector = Collector::scores(&s.tansu.bootstrap);

    let one = Daemon::start(&s.config, &s.log);
    let a1 = one.http_addr();
    wait_for_coverage(&[a1], Duration::from_secs(60)).await;
    let mut produced = s.learn(&collector, learn).await;

    // 1 → 3 while records stream in.
    let streaming = s.stream(during);
    let two = Daemon::start(&s.config, &s.log);
    let three = Daemon::start(&s.config, &s.log);
    let (a2, a3) = (two.http_addr(), three.http_addr());
    let held = wait_for_coverage(&[a1, a2, a3], Duration::from_secs(90)).await;
    let second_phase_a = streaming.await.unwrap();
    produced.extend(second_phase_a.iter().copied());
    wait_scored(&collector, &produced, Duration::from_secs(120)).await;
    let restored_on_scale_out = (restored(a2), restored(a3));
    let restored_before = restored(a1);

    // 3 → 1, cleanly (a scale-in sends SIGTERM), while records stream in.
    let streaming = s.stream(after);
    assert!(two.terminate().success());
    assert!(three.terminate().success());
    wait_for_coverage(&[a1], Duration::from_secs(90)).await;
    let second_phase_b = streaming.await.unwrap();
    produced.extend(second_phase_b.iter().copied());
    wait_scored(&collector, &produced, Duration::from_secs(120)).await;
    let restored_on_scale_in = restored(a1) - restored_before;
    assert!(one.terminate().success());

    let second_phase: BTreeSet<(i32, i64)> =
        second_phase_a.union(&second_phase_b).copied().collect();
    let o = outcome(&s.tansu.bootstrap, &produced, &second_phase);
    let (control_fired, cold_step) = control(&stream);
    eprintln!(
        "scale 1 → 3 (partitions {held:?}) → 1: keys restored on scale-out \
         {restored_on_scale_out:?}, on scale-in {restored_on_scale_in}; {}",
        o.summary(produced.len(), &control_fired, cold_step)
    );
    o.assert_state_followed(&control_fired, cold_step);
    assert!(
        restored_on_scale_out.0 >= 1.0 && restored_on_scale_out.1 >= 1.0,
        "new replicas started their partitions cold: {restored_on_scale_out:?}"
    );
    assert!(
        restored_on_scale_in >= 1.0,
        "the remaining replica took the partitions back cold"
    );
}
