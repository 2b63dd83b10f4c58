//! The demo's generated fleet: hosts with four correlated metrics following a daily-like cycle,
//! with incidents injected into chosen hosts at chosen times.
//!
//! Every host has one latent load `l(t)` (a sine over a 288-tick "day" with a per-host phase and
//! a little noise). All four metrics are driven by it, so they move together; incidents either
//! push one metric off its usual value (spike, level shift) or break the relation between metrics
//! (stuck sensor, broken correlation), which a per-metric threshold would miss but a model that
//! learned the joint shape catches.
//!
//! The same generator, with incidents off, writes the normal data the shipped demo models were
//! trained on (`anomalyd demo --write-training-data`), so the model and the stream agree.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Metric names, in the order the shipped demo models expect them.
pub const FEATURES: [&str; 4] = ["cpu_pct", "requests_per_s", "latency_ms", "net_out_mbps"];
/// Ticks per simulated day; one tick is five simulated minutes.
pub const TICKS_PER_DAY: u64 = 288;
/// Simulated seconds per tick.
pub const TICK_SECONDS: u64 = 300;
/// 2026-01-01T00:00:00Z, the first tick's time.
const START_EPOCH: u64 = 1_767_225_600;

/// What goes wrong during an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    /// Latency jumps to several times its usual value for a few ticks.
    Spike,
    /// CPU sits 25 points above what the traffic explains.
    LevelShift,
    /// The requests sensor repeats its last reading while the host keeps moving.
    StuckSensor,
    /// Traffic (requests and network) collapses while CPU keeps burning.
    BrokenCorrelation,
}

impl IncidentKind {
    const ALL: [IncidentKind; 4] = [
        IncidentKind::Spike,
        IncidentKind::LevelShift,
        IncidentKind::StuckSensor,
        IncidentKind::BrokenCorrelation,
    ];

    fn duration(self) -> u64 {
        match self {
            IncidentKind::Spike => 6,
            IncidentKind::LevelShift => 60,
            IncidentKind::StuckSensor => 80,
            IncidentKind::BrokenCorrelation => 40,
        }
    }
}

/// One injected incident: `host` misbehaves during ticks `start..end`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Incident {
    pub host: usize,
    pub kind: IncidentKind,
    pub start: u64,
    pub end: u64,
}

/// One generated row.
#[derive(Debug, Clone)]
pub struct Row {
    pub host: usize,
    pub tick: u64,
    pub values: [f64; 4],
}

impl Row {
    pub fn key(&self) -> String {
        host_name(self.host)
    }

    /// The row's time as RFC 3339 text.
    pub fn timestamp(&self) -> String {
        crate::time::rfc3339((START_EPOCH + self.tick * TICK_SECONDS) as i64)
    }

    /// The row as the JSON record the demo produces to Kafka.
    pub fn to_json(&self) -> String {
        let mut obj = serde_json::Map::new();
        obj.insert("host".into(), self.key().into());
        obj.insert("ts".into(), self.timestamp().into());
        for (name, v) in FEATURES.iter().zip(self.values) {
            obj.insert((*name).into(), ((v * 1000.0).round() / 1000.0).into());
        }
        serde_json::Value::Object(obj).to_string()
    }
}

pub fn host_name(host: usize) -> String {
    format!("host-{host:02}")
}

/// A fleet of hosts and the incidents planned for it.
pub struct Fleet {
    hosts: Vec<HostState>,
    incidents: Vec<Incident>,
    rng: SmallRng,
    tick: u64,
}

struct HostState {
    phase: f64,
    scale: f64,
    /// The reading a stuck requests sensor repeats.
    stuck_at: Option<f64>,
}

impl Fleet {
    /// `hosts` hosts from `seed`; `incidents` incidents spread over `ticks` ticks after a warm-up
    /// of one simulated day (so every host's threshold has settled before the first one).
    pub fn new(hosts: usize, ticks: u64, incidents: usize, seed: u64) -> Fleet {
        let mut rng = SmallRng::seed_from_u64(seed);
        let states = (0..hosts)
            .map(|_| HostState {
                phase: rng.random_range(0.0..0.6),
                scale: rng.random_range(0.7..1.3),
                stuck_at: None,
            })
            .collect();
        let mut planned = Vec::new();
        let warmup = TICKS_PER_DAY.min(ticks / 3);
        if incidents > 0 && ticks > warmup + 100 {
            // Incidents are spaced evenly, each on a different host, cycling through the kinds.
            let span = (ticks - warmup - 90) / incidents as u64;
            for i in 0..incidents {
                let kind = IncidentKind::ALL[i % IncidentKind::ALL.len()];
                let start = warmup + i as u64 * span + rng.random_range(0..span.max(1) / 2 + 1);
                planned.push(Incident {
                    host: (i * 7 + 3) % hosts,
                    kind,
                    start,
                    end: (start + kind.duration()).min(ticks),
                });
            }
        }
        Fleet {
            hosts: states,
            incidents: planned,
            rng,
            tick: 0,
        }
    }

    pub fn incidents(&self) -> &[Incident] {
        &self.incidents
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// One row per host for the next tick.
    pub fn next_tick(&mut self) -> Vec<Row> {
        let tick = self.tick;
        self.tick += 1;
        let noise = Normal::new(0.0, 1.0).expect("unit normal");
        let mut rows = Vec::with_capacity(self.hosts.len());
        for host in 0..self.hosts.len() {
            let mut n = || noise.sample(&mut self.rng);
            let h = &self.hosts[host];
            let angle = std::f64::consts::TAU * tick as f64 / TICKS_PER_DAY as f64 + h.phase;
            let load = 0.55 + 0.35 * angle.sin() + 0.03 * n();
            let requests = h.scale * (50.0 + 450.0 * load);
            let mut v = [
                8.0 + 75.0 * load + 1.5 * n(),
                requests + 8.0 * n(),
                25.0 + 40.0 * load * load + 1.5 * n(),
                0.1 * requests + 2.0 * n(),
            ];
            let active = self
                .incidents
                .iter()
                .find(|i| i.host == host && (i.start..i.end).contains(&tick))
                .map(|i| i.kind);
            let h = &mut self.hosts[host];
            match active {
                Some(IncidentKind::Spike) => v[2] *= 4.0,
                Some(IncidentKind::LevelShift) => v[0] += 25.0,
                Some(IncidentKind::StuckSensor) => v[1] = *h.stuck_at.get_or_insert(v[1]),
                Some(IncidentKind::BrokenCorrelation) => {
                    v[1] *= 0.2;
                    v[3] *= 0.2;
                }
                None => h.stuck_at = None,
            }
            rows.push(Row {
                host,
                tick,
                values: v,
            });
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Fleet::new(3, 500, 2, 7);
        let mut b = Fleet::new(3, 500, 2, 7);
        for _ in 0..50 {
            let (ra, rb) = (a.next_tick(), b.next_tick());
            assert_eq!(ra[1].values, rb[1].values);
        }
    }

    #[test]
    fn incidents_change_the_affected_host_only() {
        let mut fleet = Fleet::new(4, 1000, 4, 1);
        let incidents = fleet.incidents().to_vec();
        assert_eq!(incidents.len(), 4);
        let spike = incidents
            .iter()
            .find(|i| i.kind == IncidentKind::Spike)
            .unwrap();
        let mut during = None;
        for _ in 0..=spike.start {
            during = Some(fleet.next_tick());
        }
        let rows = during.unwrap();
        // A normal host's latency stays under 25 + 40 + noise; the spiking one is far above.
        assert!(rows[spike.host].values[2] > 90.0, "{:?}", rows[spike.host]);
    }
}
