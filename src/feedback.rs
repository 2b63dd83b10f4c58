//! Operators' verdicts on alert episodes, read from a pipeline's feedback topic.
//!
//! An operator who finds that an episode was a false alarm sends its alert event back on the
//! feedback topic with `"verdict": "false_alarm"` (docs/ALERTS.md, "Feedback"). Two things follow:
//! - the daemon raises that key's threshold by `relax` (a share of it), at most `max_relax` in
//!   total, so a key that keeps alarming on what its owner calls normal alarms less; the bound
//!   keeps feedback from silencing a key;
//! - `anomalyd-train retrain` keeps the episode's records in the data it trains on instead of
//!   leaving them out as anomalous, so the next model learns them as normal.
//!
//! An episode is named by the source partition of its key and the offset of its first anomalous
//! record (`episode.started_offset`), so marking it again (a resend, a replay of the topic after
//! a restart) changes nothing. The marks live in the key's alert state, checkpointed with it.
//! The topic is read by [`crate::ingest::read_feedback`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::threshold::Verdict;

/// `[pipelines.NAME.feedback]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    /// The topic operators' verdicts arrive on; empty: no feedback.
    #[serde(default)]
    pub topic: String,
    /// How much each episode marked as a false alarm raises its key's threshold, as a share of
    /// the threshold.
    #[serde(default = "default_relax")]
    pub relax: f64,
    /// The most that marks can raise a key's threshold in total, as a share of it.
    #[serde(default = "default_max_relax")]
    pub max_relax: f64,
}

fn default_relax() -> f64 {
    0.1
}
fn default_max_relax() -> f64 {
    0.5
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            topic: String::new(),
            relax: default_relax(),
            max_relax: default_max_relax(),
        }
    }
}

impl FeedbackConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.relax >= 0.0 && self.relax <= 1.0) {
            out.push(format!("relax: must be in [0, 1], found {}", self.relax));
        }
        if !(self.max_relax >= 0.0 && self.max_relax <= 2.0) {
            out.push(format!(
                "max_relax: must be in [0, 2], found {}",
                self.max_relax
            ));
        }
        out
    }
}

/// The verdict a feedback message gives; the only one there is.
pub const FALSE_ALARM: &str = "false_alarm";

/// One operator's verdict on one episode.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub pipeline: String,
    pub key: String,
    pub topic: String,
    pub partition: i32,
    /// The offset of the episode's first anomalous record, in `topic`/`partition`.
    pub started_offset: i64,
    /// Who marked it, if the message says (`by`), for the audit log.
    pub by: Option<String>,
}

/// Why a feedback message was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeedbackError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("no `{0}`: a feedback message is the episode's alert event with a `verdict`")]
    Missing(&'static str),
    #[error("`verdict` is {0:?}; the one verdict there is is \"false_alarm\"")]
    Verdict(String),
}

#[derive(Deserialize)]
struct Message {
    pipeline: Option<String>,
    key: Option<String>,
    verdict: Option<String>,
    by: Option<String>,
    source: Option<SourcePart>,
    episode: Option<EpisodePart>,
}

#[derive(Deserialize)]
struct SourcePart {
    topic: Option<String>,
    partition: Option<i32>,
}

#[derive(Deserialize)]
struct EpisodePart {
    started_offset: Option<i64>,
}

impl Feedback {
    /// Reads a feedback message: an alert event (`firing` or `resolved`) of the episode, with
    /// `"verdict": "false_alarm"` and optionally `"by"` added.
    pub fn parse(payload: &[u8]) -> Result<Feedback, FeedbackError> {
        let m: Message =
            serde_json::from_slice(payload).map_err(|e| FeedbackError::NotJson(e.to_string()))?;
        let verdict = m.verdict.ok_or(FeedbackError::Missing("verdict"))?;
        if verdict != FALSE_ALARM {
            return Err(FeedbackError::Verdict(verdict));
        }
        let source = m.source.ok_or(FeedbackError::Missing("source"))?;
        Ok(Feedback {
            pipeline: m.pipeline.ok_or(FeedbackError::Missing("pipeline"))?,
            key: m.key.ok_or(FeedbackError::Missing("key"))?,
            topic: source.topic.ok_or(FeedbackError::Missing("source.topic"))?,
            partition: source
                .partition
                .ok_or(FeedbackError::Missing("source.partition"))?,
            started_offset: m
                .episode
                .and_then(|e| e.started_offset)
                .ok_or(FeedbackError::Missing("episode.started_offset"))?,
            by: m.by,
        })
    }
}

/// The marks on one key's episodes, and what they relaxed its threshold by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Marks {
    /// The share the key's threshold is raised by (at most `max_relax`).
    pub relax: f64,
    /// The episodes marked, by the offset of their first record (the last [`REMEMBERED`]).
    episodes: VecDeque<i64>,
}

/// Episodes remembered per key, so that marking one again changes nothing.
pub const REMEMBERED: usize = 32;

/// What became of one feedback message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeedbackOutcome {
    /// Marked now; the key's threshold is raised by `relax` in total.
    Applied { relax: f64 },
    /// It was marked before: nothing changes.
    Duplicate,
    /// The key is not here (yet): applied when its state is restored or it is next seen (keys
    /// on other replicas' partitions stay pending here).
    Pending,
    /// The key is not here, and too many others are pending.
    Dropped,
}

impl FeedbackOutcome {
    /// Every `result` label of `anomalyd_feedback_total` (with `invalid`, for messages that are
    /// not feedback), for metrics to start at zero.
    pub const LABELS: [&'static str; 5] = ["applied", "duplicate", "pending", "dropped", "invalid"];

    pub fn label(&self) -> &'static str {
        match self {
            FeedbackOutcome::Applied { .. } => "applied",
            FeedbackOutcome::Duplicate => "duplicate",
            FeedbackOutcome::Pending => "pending",
            FeedbackOutcome::Dropped => "dropped",
        }
    }
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.episodes.is_empty()
    }

    /// Marks the episode that started at `started_offset` as a false alarm.
    pub fn mark(&mut self, started_offset: i64, cfg: &FeedbackConfig) -> FeedbackOutcome {
        if self.episodes.contains(&started_offset) {
            return FeedbackOutcome::Duplicate;
        }
        if self.episodes.len() == REMEMBERED {
            self.episodes.pop_front();
        }
        self.episodes.push_back(started_offset);
        self.relax = (self.relax + cfg.relax).min(cfg.max_relax);
        FeedbackOutcome::Applied { relax: self.relax }
    }

    /// The verdict against the key's threshold raised by the marks.
    pub fn judge(&self, verdict: Verdict, score: f64) -> Verdict {
        if self.relax <= 0.0 {
            return verdict;
        }
        let threshold = verdict.threshold * (1.0 + self.relax);
        Verdict {
            threshold,
            is_anomaly: score > threshold,
            ..verdict
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(verdict: &str) -> String {
        format!(
            r#"{{"event":"firing","pipeline":"fleet","key":"host-03","score":3.2,
            "source":{{"topic":"metrics","partition":2,"offset":18342}},
            "episode":{{"started_at":"t","started_offset":18340,"points":1}},
            "verdict":"{verdict}","by":"alice"}}"#
        )
    }

    #[test]
    fn a_feedback_message_is_the_episodes_alert_event_with_a_verdict() {
        let f = Feedback::parse(event("false_alarm").as_bytes()).unwrap();
        assert_eq!(
            f,
            Feedback {
                pipeline: "fleet".into(),
                key: "host-03".into(),
                topic: "metrics".into(),
                partition: 2,
                started_offset: 18340,
                by: Some("alice".into()),
            }
        );
        assert_eq!(
            Feedback::parse(event("real").as_bytes()),
            Err(FeedbackError::Verdict("real".into()))
        );
        let no_start = event("false_alarm").replace(r#","started_offset":18340"#, "");
        assert_eq!(
            Feedback::parse(no_start.as_bytes()),
            Err(FeedbackError::Missing("episode.started_offset"))
        );
        assert!(matches!(
            Feedback::parse(b"[1, 2]"),
            Err(FeedbackError::NotJson(_))
        ));
    }

    #[test]
    fn each_episode_relaxes_once_and_the_total_is_bounded() {
        let cfg = FeedbackConfig::default();
        let mut m = Marks::default();
        assert_eq!(m.mark(10, &cfg), FeedbackOutcome::Applied { relax: 0.1 });
        assert_eq!(m.mark(10, &cfg), FeedbackOutcome::Duplicate);
        let mut last = 0.0;
        for start in 20..(20 + REMEMBERED as i64) {
            if let FeedbackOutcome::Applied { relax } = m.mark(start, &cfg) {
                last = relax;
            }
        }
        assert_eq!(last, cfg.max_relax);
        // The oldest marks are forgotten beyond REMEMBERED; the relax stays at its bound.
        assert_eq!(m.mark(10, &cfg), FeedbackOutcome::Applied { relax: 0.5 });
    }

    #[test]
    fn a_relaxed_key_is_judged_against_its_raised_threshold() {
        let cfg = FeedbackConfig::default();
        let mut m = Marks::default();
        let v = Verdict {
            threshold: 1.0,
            is_anomaly: true,
            anomaly_score: 0.9995,
        };
        assert_eq!(m.judge(v, 1.05), v);
        m.mark(1, &cfg);
        let relaxed = m.judge(v, 1.05);
        assert!((relaxed.threshold - 1.1).abs() < 1e-12);
        assert!(!relaxed.is_anomaly);
        assert!(m.judge(v, 1.2).is_anomaly);
        assert_eq!(relaxed.anomaly_score, v.anomaly_score);
    }
}
