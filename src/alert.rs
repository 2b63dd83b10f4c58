//! Alert: hysteresis per key, and the alert events it produces.
//!
//! A key fires after `fire_after` consecutive anomalous points and resolves after
//! `resolve_after` consecutive normal ones, so one noisy point neither pages nor ends a page.
//! Each episode yields exactly one `firing` and one `resolved` event.
//!
//! An episode that never resolves is a level shift or a persistent fault, and only the operator
//! knows which: `rebaseline_after` says whether to accept the new level after that many points
//! (the episode resolves as `rebaselined` and the detector relearns the key's normal scores
//! from the episode's last ones) or `never` (it keeps firing until the values come back).

use serde::{Deserialize, Serialize};

use crate::feedback::Marks;

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
    /// What to do with an episode that does not resolve: accept the new level after this many
    /// points of the episode, or `"never"`.
    #[serde(default)]
    pub rebaseline_after: Rebaseline,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            fire_after: default_fire_after(),
            resolve_after: default_resolve_after(),
            critical_above: default_critical_above(),
            rebaseline_after: Rebaseline::default(),
        }
    }
}

/// `rebaseline_after`: a number of points, or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RebaselineText", into = "RebaselineText")]
pub enum Rebaseline {
    /// Keep firing for as long as the values stay anomalous (a fault that must be fixed).
    Never,
    /// Accept the new level once the episode has lasted this many points.
    After(u32),
}

/// 350 points: on NAB (three seeds), accepting a level after 250, 350 or 500 points all
/// scored above never accepting it, 350 best (docs/BENCHMARKS.md).
impl Default for Rebaseline {
    fn default() -> Self {
        Rebaseline::After(350)
    }
}

impl Rebaseline {
    /// The episode length at which to accept the new level, if ever.
    pub fn points(self) -> Option<u64> {
        match self {
            Rebaseline::Never => None,
            Rebaseline::After(n) => Some(n.into()),
        }
    }
}

/// How `rebaseline_after` is written in the configuration.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RebaselineText {
    Points(u32),
    Word(String),
}

impl TryFrom<RebaselineText> for Rebaseline {
    type Error = String;
    fn try_from(text: RebaselineText) -> Result<Rebaseline, String> {
        match text {
            RebaselineText::Word(w) if w == "never" => Ok(Rebaseline::Never),
            RebaselineText::Points(n) if n > 0 => Ok(Rebaseline::After(n)),
            RebaselineText::Points(_) => Err("a number of points must be at least 1".into()),
            RebaselineText::Word(w) => Err(format!(
                "expected a number of points or \"never\", found {w:?}"
            )),
        }
    }
}

impl From<Rebaseline> for RebaselineText {
    fn from(r: Rebaseline) -> RebaselineText {
        match r {
            Rebaseline::Never => RebaselineText::Word("never".into()),
            Rebaseline::After(n) => RebaselineText::Points(n),
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
    /// The source offset of the run's first point, while not firing.
    #[serde(default)]
    run_started_offset: Option<i64>,
    firing: Option<Episode>,
    /// Operators' false-alarm marks on the key's episodes (the feedback topic).
    #[serde(default, skip_serializing_if = "Marks::is_empty")]
    marks: Marks,
}

/// One firing-to-resolved stretch of one key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Episode {
    /// The timestamp of the first anomalous point of the episode.
    pub started_at: Option<String>,
    /// The source offset of that point (in the partition of the event's `source`): with the
    /// resolving event's offset it bounds the key's records the episode covers, which is what a
    /// retrain leaves out. Absent in state written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_offset: Option<i64>,
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
    /// The episode lasted `rebaseline_after` points: its level is accepted as the new normal.
    Rebaselined(Episode),
}

impl AlertState {
    pub fn is_firing(&self) -> bool {
        self.firing.is_some()
    }

    /// The episode in progress, if the key is firing.
    pub fn episode(&self) -> Option<&Episode> {
        self.firing.as_ref()
    }

    /// The false-alarm marks on the key's episodes.
    pub fn marks(&self) -> &Marks {
        &self.marks
    }

    pub fn marks_mut(&mut self) -> &mut Marks {
        &mut self.marks
    }

    /// Feeds one judged point, with its timestamp and source offset.
    pub fn observe(
        &mut self,
        cfg: &AlertConfig,
        is_anomaly: bool,
        score: f64,
        anomaly_score: f64,
        timestamp: Option<&str>,
        offset: i64,
    ) -> Option<Transition> {
        match &mut self.firing {
            None if is_anomaly => {
                if self.anomalous_run == 0 {
                    self.run_started_at = timestamp.map(str::to_string);
                    self.run_started_offset = Some(offset);
                }
                self.anomalous_run += 1;
                if self.anomalous_run < cfg.fire_after {
                    return None;
                }
                let episode = Episode {
                    started_at: self.run_started_at.take(),
                    started_offset: self.run_started_offset.take(),
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
                self.run_started_offset = None;
                None
            }
            Some(ep) => {
                ep.points += 1;
                if is_anomaly {
                    ep.anomalous_points += 1;
                    ep.normal_run = 0;
                    ep.max_score = ep.max_score.max(score);
                    ep.max_anomaly_score = ep.max_anomaly_score.max(anomaly_score);
                } else {
                    ep.normal_run += 1;
                    if ep.normal_run >= cfg.resolve_after {
                        return self.firing.take().map(Transition::Resolved);
                    }
                }
                if cfg
                    .rebaseline_after
                    .points()
                    .is_some_and(|n| ep.points >= n)
                {
                    return self.firing.take().map(Transition::Rebaselined);
                }
                None
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
    /// `rebaselined` (it lasted `rebaseline_after` points), `evicted` (the key was dropped to
    /// stay under `max_keys`), `revoked` or `adopted` (its partition moved).
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
            rebaseline_after: Rebaseline::Never,
        }
    }

    /// Feeds a pattern ('A' anomalous, '.' normal) and returns the transitions with their index.
    fn run(c: &AlertConfig, pattern: &str) -> Vec<(usize, &'static str)> {
        let mut s = AlertState::default();
        pattern
            .chars()
            .enumerate()
            .filter_map(|(i, ch)| {
                let t = s.observe(c, ch == 'A', 1.0, 0.9, Some(&i.to_string()), i as i64)?;
                Some((
                    i,
                    match t {
                        Transition::Fired(_) => "fired",
                        Transition::Resolved(_) => "resolved",
                        Transition::Rebaselined(_) => "rebaselined",
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
        // A run that does not reach fire_after leaves no trace of its start.
        assert_eq!(s.observe(&c, true, 3.0, 0.7, Some("t-2"), 8), None);
        assert_eq!(s.observe(&c, false, 0.1, 0.1, Some("t-1"), 9), None);
        assert_eq!(s.observe(&c, true, 3.0, 0.7, Some("t0"), 10), None);
        let Some(Transition::Fired(ep)) = s.observe(&c, true, 5.0, 0.8, Some("t1"), 13) else {
            panic!("should fire")
        };
        assert_eq!(ep.started_at.as_deref(), Some("t0"));
        assert_eq!(ep.started_offset, Some(10));
        s.observe(&c, true, 9.0, 0.95, Some("t2"), 14);
        let Some(Transition::Resolved(ep)) = s.observe(&c, false, 0.1, 0.1, Some("t3"), 20) else {
            panic!("should resolve")
        };
        assert_eq!(ep.started_offset, Some(10));
        assert_eq!((ep.points, ep.anomalous_points, ep.max_score), (3, 2, 9.0));
        assert!(!s.is_firing());
    }

    #[test]
    fn an_episode_that_does_not_resolve_is_rebaselined_after_n_points_or_never() {
        let never = cfg(2, 2);
        let after = AlertConfig {
            rebaseline_after: Rebaseline::After(4),
            ..never
        };
        // Fires at 1; its points are 1..: the 4th (index 4) accepts the level, and the key can
        // fire again after fire_after more anomalous points.
        assert_eq!(
            run(&after, "AAAAAAAA"),
            vec![(1, "fired"), (4, "rebaselined"), (6, "fired")]
        );
        assert_eq!(run(&never, "AAAAAAAA"), vec![(1, "fired")]);
        // Normal points inside the episode count towards its length too...
        assert_eq!(
            run(&after, "AAA.A.A.A"),
            vec![(1, "fired"), (4, "rebaselined")]
        );
        // ...but a normal resolution in time wins.
        assert_eq!(run(&after, "AAA.."), vec![(1, "fired"), (4, "resolved")]);
    }

    #[test]
    fn rebaseline_after_reads_a_count_or_never() {
        #[derive(Deserialize)]
        struct T {
            r: Rebaseline,
        }
        let read = |s: &str| {
            serde_json::from_str::<T>(s)
                .map(|t| t.r)
                .map_err(|e| e.to_string())
        };
        assert_eq!(read(r#"{"r": 500}"#), Ok(Rebaseline::After(500)));
        assert_eq!(read(r#"{"r": "never"}"#), Ok(Rebaseline::Never));
        assert!(read(r#"{"r": 0}"#).unwrap_err().contains("at least 1"));
        assert!(read(r#"{"r": "always"}"#)
            .unwrap_err()
            .contains("\"never\""));
        assert_eq!(
            AlertConfig::default().rebaseline_after,
            Rebaseline::After(350)
        );
    }
}
