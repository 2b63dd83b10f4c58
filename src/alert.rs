//! Alert: hysteresis per key, and the alert events it produces.
//!
//! A key fires after `fire_after` consecutive anomalous points and resolves after
//! `resolve_after` consecutive normal ones, so one noisy point neither pages nor ends a page.
//! Each episode yields exactly one `firing` and one `resolved` event.

use serde::{Deserialize, Serialize};

/// `[pipelines.NAME.alert]`: when an episode fires, resolves, and how severe it is.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct AlertConfig {
    /// Consecutive anomalous points of a key before an episode fires.
    #[serde(default = "default_fire_after")]
    pub fire_after: u32,
    /// Consecutive normal points before a firing episode resolves.
    #[serde(default = "default_resolve_after")]
    pub resolve_after: u32,
    /// Anomaly score (0..1) from which an alert's severity is `critical` rather than `warning`;
    /// the default, 0.99999, is a tail probability of 1e-5.
    #[serde(default = "default_critical_above")]
    pub critical_above: f64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            fire_after: default_fire_after(),
            resolve_after: default_resolve_after(),
            critical_above: default_critical_above(),
        }
    }
}

impl AlertConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.fire_after == 0 {
            problems.push("fire_after: must be at least 1".to_string());
        }
        if self.resolve_after == 0 {
            problems.push("resolve_after: must be at least 1".to_string());
        }
        if !(0.0..=1.0).contains(&self.critical_above) {
            problems.push("critical_above: must be in [0, 1]".to_string());
        }
        problems
    }
}

fn default_fire_after() -> u32 {
    3
}
fn default_resolve_after() -> u32 {
    5
}
fn default_critical_above() -> f64 {
    0.99999
}

/// The alert state of one key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    /// Consecutive anomalous points while not firing.
    anomalous_run: u32,
    /// When the current anomalous run started (timestamp text), while not firing.
    run_started_at: Option<String>,
    firing: Option<Episode>,
}

/// One firing-to-resolved stretch of one key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Episode {
    /// The timestamp of the first anomalous point of the episode.
    pub started_at: Option<String>,
    /// Points observed since the episode started firing.
    pub points: u64,
    /// Anomalous points among them.
    pub anomalous_points: u64,
    pub max_score: f64,
    pub max_anomaly_score: f64,
    /// Decided when the episode fires and kept to its end, so the resolution names the alert the
    /// firing raised (Alertmanager identifies an alert by its labels, severity among them).
    #[serde(default)]
    pub severity: Severity,
    /// Consecutive normal points at the end (resets on an anomalous one).
    #[serde(skip)]
    normal_run: u32,
}

/// What one observation did to a key's alert state.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Fired(Episode),
    Resolved(Episode),
}

impl AlertState {
    pub fn is_firing(&self) -> bool {
        self.firing.is_some()
    }

    /// The episode in progress, if the key is firing.
    pub fn episode(&self) -> Option<&Episode> {
        self.firing.as_ref()
    }

    /// Feeds one judged point.
    pub fn observe(
        &mut self,
        cfg: &AlertConfig,
        is_anomaly: bool,
        score: f64,
        anomaly_score: f64,
        timestamp: Option<&str>,
    ) -> Option<Transition> {
        match &mut self.firing {
            None if is_anomaly => {
                if self.anomalous_run == 0 {
                    self.run_started_at = timestamp.map(str::to_string);
                }
                self.anomalous_run += 1;
                if self.anomalous_run < cfg.fire_after {
                    return None;
                }
                let episode = Episode {
                    started_at: self.run_started_at.take(),
                    points: 1,
                    anomalous_points: 1,
                    max_score: score,
                    max_anomaly_score: anomaly_score,
                    severity: if anomaly_score >= cfg.critical_above {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                    normal_run: 0,
                };
                self.anomalous_run = 0;
                self.firing = Some(episode.clone());
                Some(Transition::Fired(episode))
            }
            None => {
                self.anomalous_run = 0;
                self.run_started_at = None;
                None
            }
            Some(ep) => {
                ep.points += 1;
                if is_anomaly {
                    ep.anomalous_points += 1;
                    ep.normal_run = 0;
                    ep.max_score = ep.max_score.max(score);
                    ep.max_anomaly_score = ep.max_anomaly_score.max(anomaly_score);
                    return None;
                }
                ep.normal_run += 1;
                if ep.normal_run < cfg.resolve_after {
                    return None;
                }
                self.firing.take().map(Transition::Resolved)
            }
        }
    }
}

/// `firing` or `resolved`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Firing,
    Resolved,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Firing => "firing",
            EventKind::Resolved => "resolved",
        }
    }
}

/// How urgent an episode is: `critical` when its anomaly score at firing reached
/// `alert.critical_above`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One feature's contribution to the reconstruction error.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureError {
    pub name: String,
    /// Squared reconstruction error of the feature, in normalised units.
    pub error: f64,
    /// The feature's raw value (`None` for image models).
    pub value: Option<f64>,
    /// The model's reconstruction of it (what normal would have looked like).
    pub expected: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

/// Where the record that triggered an event came from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The JSON event on the alerts topic (schema: docs/ALERTS.md).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertEvent {
    pub event: EventKind,
    pub pipeline: String,
    pub key: String,
    /// The triggering record's timestamp.
    pub timestamp: Option<String>,
    pub score: f64,
    pub threshold: f64,
    pub anomaly_score: f64,
    /// The episode's severity (the same in its firing and its resolution).
    pub severity: Severity,
    pub top_features: Vec<FeatureError>,
    pub model: ModelRef,
    pub source: SourceRef,
    pub episode: Episode,
    /// Why a `resolved` event ended its episode when not by `resolve_after` normal points:
    /// `evicted` (the key was dropped to stay under `max_keys`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(fire: u32, resolve: u32) -> AlertConfig {
        AlertConfig {
            fire_after: fire,
            resolve_after: resolve,
            critical_above: 0.99,
        }
    }

    /// Feeds a pattern ('A' anomalous, '.' normal) and returns the transitions with their index.
    fn run(c: &AlertConfig, pattern: &str) -> Vec<(usize, &'static str)> {
        let mut s = AlertState::default();
        pattern
            .chars()
            .enumerate()
            .filter_map(|(i, ch)| {
                let t = s.observe(c, ch == 'A', 1.0, 0.9, Some(&i.to_string()))?;
                Some((
                    i,
                    if matches!(t, Transition::Fired(_)) {
                        "fired"
                    } else {
                        "resolved"
                    },
                ))
            })
            .collect()
    }

    #[test]
    fn fires_after_n_consecutive_and_resolves_after_m_normal() {
        let c = cfg(3, 2);
        assert_eq!(run(&c, "AA.AA.A"), vec![]);
        assert_eq!(run(&c, "AAA"), vec![(2, "fired")]);
        assert_eq!(run(&c, "AAA.A.A..A"), vec![(2, "fired"), (8, "resolved")]);
        assert_eq!(
            run(&c, "AAA..AAAA.."),
            vec![
                (2, "fired"),
                (4, "resolved"),
                (7, "fired"),
                (10, "resolved")
            ]
        );
    }

    #[test]
    fn one_event_each_way_per_episode() {
        let c = cfg(1, 1);
        assert_eq!(
            run(&c, "AAAAA.AAAA."),
            vec![
                (0, "fired"),
                (5, "resolved"),
                (6, "fired"),
                (10, "resolved")
            ]
        );
    }

    #[test]
    fn episode_carries_its_start_and_peak() {
        let c = cfg(2, 1);
        let mut s = AlertState::default();
        assert_eq!(s.observe(&c, true, 3.0, 0.7, Some("t0")), None);
        let Some(Transition::Fired(ep)) = s.observe(&c, true, 5.0, 0.8, Some("t1")) else {
            panic!("should fire")
        };
        assert_eq!(ep.started_at.as_deref(), Some("t0"));
        s.observe(&c, true, 9.0, 0.95, Some("t2"));
        let Some(Transition::Resolved(ep)) = s.observe(&c, false, 0.1, 0.1, Some("t3")) else {
            panic!("should resolve")
        };
        assert_eq!((ep.points, ep.anomalous_points, ep.max_score), (3, 2, 9.0));
        assert!(!s.is_firing());
    }
}
