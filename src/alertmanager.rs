//! The Alertmanager sink: each anomaly episode becomes an alert pushed to Alertmanager's v2 API.
//!
//! The sink keeps, per key, the alert Alertmanager should know (the latest state of the key's
//! episode) and pushes what changed. So a slow or absent Alertmanager costs memory bounded by
//! the number of keys, never an event: a resolution that could not be pushed is retried (with
//! backoff, 100 ms doubling up to `resend_interval`) until Alertmanager takes it, and only then
//! forgotten. A firing episode is pushed again every `resend_interval`, as Alertmanager resolves
//! an alert by itself when it stops hearing about it. Pushes are idempotent (Alertmanager
//! deduplicates on the labels), so a retry after a failure is harmless.
//!
//! The alerts topic, not this sink, is the at-least-once record of every episode: offsets never
//! wait on Alertmanager.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::alert::{AlertEvent, EventKind};
use crate::metrics::Metrics;

/// `[pipelines.NAME.alertmanager]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Base URL of Alertmanager, e.g. `http://alertmanager:9093`.
    pub url: String,
    /// How often the alerts of firing episodes are pushed again.
    #[serde(default = "default_resend", with = "humantime_serde")]
    pub resend_interval: Duration,
    /// Timeout of one push.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra labels on every alert (e.g. `team = "sre"`), for routing.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_resend() -> Duration {
    Duration::from_secs(60)
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl AlertmanagerConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            out.push(format!(
                "url {:?} must start with http:// or https://",
                redact_url(&self.url)
            ));
        }
        out.extend(crate::time::duration_problem(
            "resend_interval",
            self.resend_interval,
            Duration::from_secs(1),
        ));
        out.extend(crate::time::duration_problem(
            "timeout",
            self.timeout,
            Duration::from_millis(1),
        ));
        out
    }
}

/// A URL as it may be shown: the password of its userinfo (`user:password@`) replaced.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

/// One alert in Alertmanager's v2 API (`POST /api/v2/alerts`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AmAlert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
}

impl AmAlert {
    /// The alert of an episode's event, as of `now` (RFC 3339).
    pub fn from_event(event: &AlertEvent, extra: &BTreeMap<String, String>, now: &str) -> AmAlert {
        let mut labels = extra.clone();
        labels.insert("alertname".into(), "AnomalyDetected".into());
        labels.insert("pipeline".into(), event.pipeline.clone());
        labels.insert("key".into(), event.key.clone());
        labels.insert("severity".into(), event.severity.as_str().into());
        labels.insert("model".into(), event.model.name.clone());
        let top: Vec<&str> = event.top_features.iter().map(|f| f.name.as_str()).collect();
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "summary".into(),
            format!(
                "{} of pipeline {} looks anomalous: reconstruction error {:.4} over threshold {:.4}, mostly {}",
                event.key,
                event.pipeline,
                event.episode.max_score,
                event.threshold,
                top.join(", ")
            ),
        );
        annotations.insert("score".into(), format!("{:.6}", event.score));
        annotations.insert(
            "max_score".into(),
            format!("{:.6}", event.episode.max_score),
        );
        annotations.insert("threshold".into(), format!("{:.6}", event.threshold));
        annotations.insert(
            "anomaly_score".into(),
            format!("{:.4}", event.anomaly_score),
        );
        annotations.insert("top_features".into(), top.join(","));
        annotations.insert("model_version".into(), event.model.version.clone());
        if let Some(t) = &event.episode.started_at {
            annotations.insert("started_at".into(), t.clone());
        }
        AmAlert {
            labels,
            annotations,
            starts_at: now.to_string(),
            ends_at: (event.event == EventKind::Resolved).then(|| now.to_string()),
        }
    }
}

/// What the pipeline tells its Alertmanager sink, in stream order.
#[derive(Debug)]
pub enum AmInput {
    /// A firing or resolved event, or an episode adopted with its partition's state.
    Event(Box<AlertEvent>),
    /// Partitions revoked from a pipeline whose state follows its partitions: their firing
    /// episodes now belong to the next owner, who pushes them from now on.
    HandedOver(Vec<(String, i32)>),
}

/// Alerts in one push at most, so one request stays small whatever the backlog.
const MAX_PER_PUSH: usize = 500;
/// The first retry's delay after a failed push; it doubles up to `resend_interval`.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The alert of one key, as Alertmanager should know it.
struct Tracked {
    alert: AmAlert,
    /// The partition of the key's records.
    partition: (String, i32),
    /// Bumped on every change, so a push that carried an older state does not clear a newer one.
    version: u64,
}

/// What a push carried and how it went.
type PushOutcome = (Vec<(String, u64)>, Result<(), String>);

/// Pushes episodes of one pipeline to Alertmanager; fed with alert events through a channel that
/// it drains at once (pushes run beside it), so the pipeline never waits on Alertmanager.
pub struct AlertmanagerSink {
    cfg: AlertmanagerConfig,
    pipeline: String,
    url: String,
    client: reqwest::Client,
    metrics: Metrics,
    /// Keys with a firing episode or a resolution not yet pushed.
    alerts: BTreeMap<String, Tracked>,
    /// Keys whose alert Alertmanager has not taken yet.
    due: BTreeSet<String>,
    version: u64,
    /// The delay before the next retry, while pushes fail.
    backoff: Option<Duration>,
}

impl AlertmanagerSink {
    pub fn new(cfg: AlertmanagerConfig, pipeline: &str, metrics: Metrics) -> AlertmanagerSink {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .expect("an HTTP client with a timeout");
        AlertmanagerSink {
            url: format!("{}/api/v2/alerts", cfg.url.trim_end_matches('/')),
            cfg,
            pipeline: pipeline.to_string(),
            client,
            metrics,
            alerts: BTreeMap::new(),
            due: BTreeSet::new(),
            version: 0,
            backoff: None,
        }
    }

    /// Runs until `events` closes or `stop` is cancelled, then makes one last attempt to push
    /// what Alertmanager has not taken (resolutions above all).
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<AmInput>,
        stop: CancellationToken,
    ) {
        let mut resend = tokio::time::interval(self.cfg.resend_interval);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight: Option<JoinHandle<PushOutcome>> = None;
        let mut retry_at = Instant::now();
        loop {
            if in_flight.is_none() && !self.due.is_empty() && Instant::now() >= retry_at {
                in_flight = Some(tokio::spawn(self.push_due()));
            }
            let waiting_to_retry = in_flight.is_none() && !self.due.is_empty();
            // Biased, the rare branches first: a flood of events must not starve the push's
            // completion or the resend.
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                done = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    if let Some(delay) = self.pushed(done.expect("a push does not panic")) {
                        retry_at = Instant::now() + delay;
                    }
                }
                _ = resend.tick() => {
                    let firing = self.alerts.iter().filter(|(_, t)| t.alert.ends_at.is_none());
                    self.due.extend(firing.map(|(k, _)| k.clone()));
                }
                input = events.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                _ = tokio::time::sleep_until(retry_at), if waiting_to_retry => {}
            }
            self.metrics
                .alertmanager_pending
                .with_label_values(&[&self.pipeline])
                .set(self.due.len() as i64);
        }
        // Deliver what the drain produced, then stop.
        while let Ok(input) = events.try_recv() {
            self.on_input(input);
        }
        // Bounded, so that a slow Alertmanager cannot hold the shutdown up: what is still due
        // after one push timeout is left to Alertmanager's own resolve_timeout.
        let timeout = self.cfg.timeout;
        let last_chance = async {
            if let Some(push) = in_flight {
                if let Ok(done) = push.await {
                    self.pushed(done);
                }
            }
            while !self.due.is_empty() {
                let done = self.push_due().await;
                if self.pushed(done).is_some() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, last_chance).await;
    }

    fn on_input(&mut self, input: AmInput) {
        match input {
            AmInput::Event(event) => self.on_event(&event),
            AmInput::HandedOver(partitions) => {
                let theirs: Vec<String> = self
                    .alerts
                    .iter()
                    .filter(|(_, t)| t.alert.ends_at.is_none() && partitions.contains(&t.partition))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in theirs {
                    self.alerts.remove(&key);
                    self.due.remove(&key);
                }
            }
        }
    }

    fn on_event(&mut self, event: &AlertEvent) {
        let now = crate::time::now_rfc3339();
        let mut alert = AmAlert::from_event(event, &self.cfg.labels, &now);
        if let Some(before) = self.alerts.get(&event.key) {
            if event.event == EventKind::Resolved && before.alert.ends_at.is_none() {
                // End the alert the firing raised: the same labels, its start.
                alert.labels = before.alert.labels.clone();
                alert.starts_at = before.alert.starts_at.clone();
            }
        }
        self.version += 1;
        self.alerts.insert(
            event.key.clone(),
            Tracked {
                alert,
                partition: (event.source.topic.clone(), event.source.partition),
                version: self.version,
            },
        );
        self.due.insert(event.key.clone());
    }

    /// Takes up to [`MAX_PER_PUSH`] due alerts and returns the push that sends them.
    fn push_due(&mut self) -> impl std::future::Future<Output = PushOutcome> + 'static {
        let mut carried = Vec::new();
        let mut alerts = Vec::new();
        while carried.len() < MAX_PER_PUSH {
            let Some(key) = self.due.pop_first() else {
                break;
            };
            if let Some(t) = self.alerts.get(&key) {
                alerts.push(t.alert.clone());
                carried.push((key, t.version));
            }
        }
        let request = self.client.post(&self.url).json(&alerts);
        async move {
            let result = match request.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("Alertmanager answered {}", r.status())),
                // Without the URL, which may hold credentials; the log line names it, redacted.
                Err(e) => Err(e.without_url().to_string()),
            };
            (carried, result)
        }
    }

    /// Settles a finished push: resolutions Alertmanager took are forgotten; after a failure the
    /// alerts are due again and the delay before the retry is returned.
    fn pushed(&mut self, (carried, result): PushOutcome) -> Option<Duration> {
        let outcome = crate::metrics::label::result(&result);
        self.metrics
            .alertmanager_pushes
            .with_label_values(&[self.pipeline.as_str(), outcome])
            .inc();
        match result {
            Ok(()) => {
                self.backoff = None;
                for (key, version) in carried {
                    let settled = self
                        .alerts
                        .get(&key)
                        .is_some_and(|t| t.version == version && t.alert.ends_at.is_some());
                    if settled {
                        self.alerts.remove(&key);
                    }
                }
                None
            }
            Err(e) => {
                let delay = self
                    .backoff
                    .map_or(FIRST_RETRY, |d| (d * 2).min(self.cfg.resend_interval));
                self.backoff = Some(delay);
                tracing::warn!(pipeline = %self.pipeline, url = %redact_url(&self.url), "Pushing {} alert(s) to Alertmanager failed (retrying in {delay:?}): {e}", carried.len());
                self.due.extend(carried.into_iter().map(|(key, _)| key));
                Some(delay)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Episode, FeatureError, ModelRef, SourceRef};

    fn event(kind: EventKind) -> AlertEvent {
        AlertEvent {
            event: kind,
            pipeline: "fleet".into(),
            key: "host-03".into(),
            timestamp: Some("2026-01-01T00:00:00Z".into()),
            score: 2.0,
            threshold: 0.1,
            anomaly_score: 0.95,
            severity: crate::alert::Severity::Critical,
            top_features: vec![FeatureError {
                name: "latency_ms".into(),
                error: 7.5,
                value: Some(200.0),
                expected: Some(50.0),
            }],
            model: ModelRef {
                name: "demo-dense".into(),
                version: "1.0.0".into(),
            },
            source: SourceRef {
                topic: "metrics".into(),
                partition: 0,
                offset: 1,
            },
            episode: Episode::default(),
            reason: None,
        }
    }

    #[test]
    fn an_episode_maps_to_labels_and_annotations() {
        let extra = BTreeMap::from([("team".to_string(), "sre".to_string())]);
        let a = AmAlert::from_event(&event(EventKind::Firing), &extra, "2026-11-28T00:00:00Z");
        assert_eq!(a.labels["alertname"], "AnomalyDetected");
        assert_eq!(a.labels["key"], "host-03");
        assert_eq!(a.labels["severity"], "critical");
        assert_eq!(a.labels["model"], "demo-dense");
        assert_eq!(a.labels["team"], "sre");
        assert_eq!(a.annotations["top_features"], "latency_ms");
        assert_eq!(a.ends_at, None);
        let json = serde_json::to_value([&a]).unwrap();
        assert_eq!(json[0]["startsAt"], "2026-11-28T00:00:00Z");
        assert!(json[0].get("endsAt").is_none());
        let r = AmAlert::from_event(&event(EventKind::Resolved), &extra, "2026-11-28T00:05:00Z");
        assert_eq!(r.ends_at.as_deref(), Some("2026-11-28T00:05:00Z"));
        assert_eq!(
            r.labels, a.labels,
            "the same labels, so Alertmanager resolves that alert"
        );
    }

    fn sink() -> AlertmanagerSink {
        let cfg = AlertmanagerConfig {
            url: "http://127.0.0.1:9".into(),
            resend_interval: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
            labels: BTreeMap::new(),
        };
        AlertmanagerSink::new(cfg, "fleet", Metrics::new())
    }

    fn firing_on(key: &str, partition: i32) -> AmInput {
        let mut e = event(EventKind::Firing);
        e.key = key.into();
        e.source.partition = partition;
        AmInput::Event(Box::new(e))
    }

    /// Issue 10, finding 3: a firing key dropped on revoke was pushed firing by its old owner
    /// forever, even after the next owner resolved it. Its episode now goes with the
    /// partition's state to the next owner, and this one stops pushing it.
    #[test]
    fn handed_over_episodes_are_no_longer_pushed() {
        let mut s = sink();
        s.on_input(firing_on("a", 0));
        s.on_input(firing_on("b", 1));
        s.on_input(AmInput::HandedOver(vec![("metrics".into(), 0)]));
        assert!(!s.alerts.contains_key("a") && !s.due.contains("a"));
        assert!(
            s.alerts.contains_key("b"),
            "another partition's key keeps firing"
        );
    }

    /// A resolution ends the alert its firing raised (same labels, same start), and is kept
    /// until a push of that very state succeeds.
    #[test]
    fn a_resolution_is_forgotten_only_once_pushed() {
        let mut s = sink();
        s.on_input(firing_on("a", 0));
        let firing = s.alerts["a"].alert.clone();
        let mut resolved = event(EventKind::Resolved);
        resolved.key = "a".into();
        resolved.severity = crate::alert::Severity::Warning;
        s.on_input(AmInput::Event(Box::new(resolved)));
        let t = &s.alerts["a"];
        assert_eq!(
            (&t.alert.labels, &t.alert.starts_at),
            (&firing.labels, &firing.starts_at)
        );
        let version = t.version;
        let carried = vec![("a".to_string(), version)];
        s.due.clear();
        assert!(s.pushed((carried.clone(), Err("timeout".into()))).is_some());
        assert!(s.due.contains("a"), "due again after a failed push");
        assert!(s
            .pushed((vec![("a".to_string(), version - 1)], Ok(())))
            .is_none());
        assert!(
            s.alerts.contains_key("a"),
            "an older state's push does not settle it"
        );
        s.pushed((carried, Ok(())));
        assert!(!s.alerts.contains_key("a"));
    }
}
