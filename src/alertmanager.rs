//! The Alertmanager sink: each anomaly episode becomes an alert pushed to Alertmanager's v2 API.
//!
//! Alertmanager resolves an alert by itself when it stops hearing about it (after its
//! `resolve_timeout`), so a firing episode is pushed again every `resend_interval` for as long
//! as it lasts, and pushed once more with `endsAt` = now when it resolves. Pushes are idempotent
//! (Alertmanager deduplicates on the labels), so a retry after a failure is harmless.
//!
//! This sink is best effort: the alerts topic is the at-least-once record of every episode;
//! offsets never wait on Alertmanager, and an episode pushed while Alertmanager is down reaches
//! it with the next resend.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
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
        labels.insert("severity".into(), event.severity.into());
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

/// Pushes episodes of one pipeline to Alertmanager; fed with alert events through a channel.
pub struct AlertmanagerSink {
    cfg: AlertmanagerConfig,
    pipeline: String,
    client: reqwest::Client,
    metrics: Metrics,
    /// Firing episodes by key, as last pushed (`startsAt` kept from the first push).
    firing: BTreeMap<String, AmAlert>,
}

impl AlertmanagerSink {
    pub fn new(cfg: AlertmanagerConfig, pipeline: &str, metrics: Metrics) -> AlertmanagerSink {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .expect("an HTTP client with a timeout");
        AlertmanagerSink {
            cfg,
            pipeline: pipeline.to_string(),
            client,
            metrics,
            firing: BTreeMap::new(),
        }
    }

    /// Runs until `events` closes or `stop` is cancelled.
    pub async fn run(mut self, mut events: mpsc::Receiver<AlertEvent>, stop: CancellationToken) {
        let mut resend = tokio::time::interval(self.cfg.resend_interval);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                e = events.recv() => match e {
                    Some(e) => self.on_event(&e).await,
                    None => return,
                },
                _ = resend.tick() => {
                    if !self.firing.is_empty() {
                        let alerts: Vec<AmAlert> = self.firing.values().cloned().collect();
                        self.push(&alerts).await;
                    }
                }
                _ = stop.cancelled() => {
                    // Deliver what the drain produced (resolutions above all), then stop.
                    while let Ok(e) = events.try_recv() {
                        self.on_event(&e).await;
                    }
                    return;
                }
            }
        }
    }

    async fn on_event(&mut self, event: &AlertEvent) {
        let now = crate::time::now_rfc3339();
        let mut alert = AmAlert::from_event(event, &self.cfg.labels, &now);
        match event.event {
            EventKind::Firing => {
                self.firing.insert(event.key.clone(), alert.clone());
            }
            EventKind::Resolved => {
                if let Some(first) = self.firing.remove(&event.key) {
                    alert.starts_at = first.starts_at;
                }
            }
        }
        self.push(&[alert]).await;
    }

    async fn push(&self, alerts: &[AmAlert]) {
        let url = format!("{}/api/v2/alerts", self.cfg.url.trim_end_matches('/'));
        let result = match self.client.post(&url).json(alerts).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("Alertmanager answered {}", r.status())),
            // Without the URL, which may hold credentials; the log line names it, redacted.
            Err(e) => Err(e.without_url().to_string()),
        };
        let outcome = crate::metrics::label::result(&result);
        self.metrics
            .alertmanager_pushes
            .with_label_values(&[self.pipeline.as_str(), outcome])
            .inc();
        if let Err(e) = result {
            tracing::warn!(pipeline = %self.pipeline, url = %redact_url(&url), "Pushing {} alert(s) to Alertmanager failed (firing ones are pushed again within {:?}): {e}", alerts.len(), self.cfg.resend_interval);
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
            severity: "critical",
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
}
