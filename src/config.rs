//! Configuration: a TOML file plus `ANOMALYD__SECTION__KEY` environment overrides, read into
//! typed structs (every field documented in `docs/CONFIG.md`).
//!
//! Loading reports every problem at once: unknown keys (anywhere in the tree), then the checks
//! of [`Config::validate`]. A key-value map can stand in for the environment, so tests build
//! configs without touching the process environment.
//!
//! A section's type lives with the component it configures and says what is wrong with itself
//! (`problems()`, each `field: reason`): `[kafka]` in [`crate::kafka`], `[log]` in [`crate::log`], `[http]` in [`crate::metrics`],
//! `[pipelines.P.batch]` in [`crate::batch`],
//! `[pipelines.P.alert]` in [`crate::alert`], `[pipelines.P.threshold]` in [`crate::threshold`],
//! `[pipelines.P.alertmanager]` in [`crate::alertmanager`]. This module composes them, prefixes
//! each problem with its section, and holds the pipeline section, where the components meet and
//! which the pipeline's runtime (pipeline, sink, replay) reads. The sections' components do not
//! depend on this module, so there is no import cycle through it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alert::AlertConfig;
use crate::alertmanager::AlertmanagerConfig;
use crate::batch::BatchConfig;
use crate::detect::DetectorConfig;
use crate::drift::DriftConfig;
use crate::feedback::FeedbackConfig;
use crate::kafka::KafkaConfig;
use crate::log::LogConfig;
use crate::metrics::HttpConfig;
use crate::shadow::PromotionConfig;
use crate::threshold::ThresholdConfig;
use crate::time::duration_problem;

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> ConfigError {
        ConfigError {
            problems: vec![problem.into()],
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    /// How to reach Kafka (shared by every pipeline).
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Inference threads and shutdown.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// The pipelines, by name.
    #[serde(default)]
    pub pipelines: BTreeMap<String, PipelineConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RuntimeConfig {
    /// Threads running inference (outside the async runtime); 0 means one per core.
    #[serde(default)]
    pub inference_threads: usize,
    /// On SIGTERM/SIGINT: how long to drain in-flight records and commit before exiting anyway.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            inference_threads: 0,
            shutdown_grace: default_grace(),
        }
    }
}

impl RuntimeConfig {
    pub fn threads(&self) -> usize {
        if self.inference_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.inference_threads
        }
    }
}

/// One flow: input topic(s) → one model → sinks.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PipelineConfig {
    /// Input topics (a list, or one comma-separated string).
    #[serde(deserialize_with = "string_or_list")]
    pub topics: Vec<String>,
    /// Path of the ONNX model (relative paths are relative to the config file).
    pub model: PathBuf,
    /// How often the model file is checked for a new version to swap in (0s: never; SIGHUP
    /// checks at once).
    #[serde(default = "default_reload_check", with = "humantime_serde")]
    pub reload_check: Duration,
    /// A candidate model, scored in the shadow of the serving one (checked as often as the
    /// model) and promoted or refused by `promotion`. Absent: the model's path with
    /// `.candidate` before its extension (`fleet.onnx` → `fleet.candidate.onnx`).
    #[serde(default)]
    pub candidate: Option<PathBuf>,
    /// When a candidate replaces the serving model.
    #[serde(default)]
    pub promotion: PromotionConfig,
    /// The drift detector on the pipeline's scores.
    #[serde(default)]
    pub drift: DriftConfig,
    /// Operators' verdicts on episodes (false alarms).
    #[serde(default)]
    pub feedback: FeedbackConfig,
    /// Record field holding the entity key (host, sensor…). Records without it are dead letters.
    #[serde(default = "default_key_field")]
    pub key_field: String,
    /// Record field holding the timestamp, echoed in outputs; when absent the Kafka timestamp is used.
    #[serde(default = "default_timestamp_field")]
    pub timestamp_field: String,
    /// Record field names for the model's features, when they differ from the model's names:
    /// `{ model_feature = "record_field" }`.
    #[serde(default)]
    pub field_map: BTreeMap<String, String>,
    /// Topic for alert events (firing / resolved); empty: none.
    #[serde(default = "default_alerts_topic")]
    pub alerts_topic: String,
    /// Topic for one score record per scored input; empty: none.
    #[serde(default)]
    pub scores_topic: String,
    /// Topic for reconstructions (the denoised values); empty: none.
    #[serde(default)]
    pub denoised_topic: String,
    /// Topic for records that cannot be scored, with the reason in headers; empty: counted and dropped.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Also print alert events on stdout, one JSON object per line.
    #[serde(default)]
    pub stdout: bool,
    /// Largest accepted record, in bytes; larger ones are dead letters.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Most entity keys whose state is kept; the least recently seen key is evicted beyond it.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Micro-batching.
    #[serde(default)]
    pub batch: BatchConfig,
    /// The adaptive threshold, per key.
    #[serde(default)]
    pub threshold: ThresholdConfig,
    /// Alert hysteresis.
    #[serde(default)]
    pub alert: AlertConfig,
    /// Push episodes to Alertmanager as well (absent: no push).
    #[serde(default)]
    pub alertmanager: Option<AlertmanagerConfig>,
    /// The compacted topic holding every key's state (see `changelog`), so that it follows its
    /// partition across restarts and replicas. Absent: `<group_id>.<pipeline>.state`; empty:
    /// state is kept in memory only.
    #[serde(default)]
    pub state_topic: Option<String>,
}

impl PipelineConfig {
    /// Where a candidate model for this pipeline is looked for.
    pub fn candidate_path(&self) -> PathBuf {
        self.candidate.clone().unwrap_or_else(|| {
            let stem = self.model.file_stem().unwrap_or_default().to_string_lossy();
            let name = match self.model.extension() {
                Some(ext) => format!("{stem}.candidate.{}", ext.to_string_lossy()),
                None => format!("{stem}.candidate"),
            };
            self.model.with_file_name(name)
        })
    }

    /// The state topic of this pipeline consuming as `group`, if state is kept in Kafka.
    pub fn state_topic(&self, group: &str) -> Option<String> {
        match &self.state_topic {
            None => Some(format!("{group}.state")),
            Some(t) if t.is_empty() => None,
            Some(t) => Some(t.clone()),
        }
    }

    /// The detection settings of this pipeline.
    pub fn detector(&self) -> DetectorConfig {
        DetectorConfig {
            field_map: self.field_map.clone(),
            key_field: self.key_field.clone(),
            timestamp_field: self.timestamp_field.clone(),
            max_record_bytes: self.max_record_bytes,
            max_keys: self.max_keys,
            threshold: self.threshold.clone(),
            alert: self.alert,
            keep_reconstructions: !self.denoised_topic.is_empty(),
            drift: self.drift,
            feedback: self.feedback.clone(),
        }
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_reload_check() -> Duration {
    Duration::from_secs(10)
}
fn default_key_field() -> String {
    "key".into()
}
fn default_timestamp_field() -> String {
    "ts".into()
}
fn default_alerts_topic() -> String {
    "anomalyd-alerts".into()
}
fn default_dead_letter_topic() -> String {
    "anomalyd-dead-letters".into()
}
fn default_max_record_bytes() -> usize {
    1 << 20
}
fn default_max_keys() -> usize {
    100_000
}

fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

/// Fills in `method = "quantile"` (the documented default) in every `[pipelines.P.threshold]`
/// that leaves it out. The section's type is tagged by its method, so without this a section
/// holding only `q`, or the override `ANOMALYD__PIPELINES__P__THRESHOLD__Q` alone, would be
/// refused for a missing `method`.
fn default_threshold_methods(raw: config::Config) -> Result<config::Config, config::ConfigError> {
    let Ok(pipelines) = raw.get_table("pipelines") else {
        return Ok(raw);
    };
    let missing: Vec<String> = pipelines
        .into_iter()
        .filter_map(|(name, pipeline)| {
            let threshold = pipeline.into_table().ok()?.remove("threshold")?;
            let has_method = threshold.into_table().ok()?.contains_key("method");
            (!has_method).then(|| format!("pipelines.{name}.threshold.method"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(raw);
    }
    missing
        .into_iter()
        .try_fold(config::Config::builder().add_source(raw), |b, key| {
            b.set_override(key, ThresholdConfig::default().method())
        })?
        .build()
}

/// The type errors of a configuration, section by section. Serde stops at the first error of
/// the whole file, so each section (and each pipeline, and its threshold) is read again on its
/// own. A threshold is an internally tagged enum, whose errors lose the field's name (serde
/// buffers its content before it knows the method), so it is read again as its method's type.
fn type_problems(raw: &config::Config) -> Vec<String> {
    let section = |key: &str| raw.get::<config::Value>(key).ok();
    let mut out: Vec<String> = [
        section("kafka").and_then(|v| read_as::<KafkaConfig>("kafka", v)),
        section("http").and_then(|v| read_as::<HttpConfig>("http", v)),
        section("log").and_then(|v| read_as::<LogConfig>("log", v)),
        section("runtime").and_then(|v| read_as::<RuntimeConfig>("runtime", v)),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (name, pipeline) in raw.get_table("pipelines").unwrap_or_default() {
        let at = format!("pipelines.{name}");
        let Ok(mut table) = pipeline.clone().into_table() else {
            out.extend(read_as::<PipelineConfig>(&at, pipeline));
            continue;
        };
        // A threshold with a problem of its own is reported by it, and the rest of the pipeline
        // is read without it (the section has a default), so that its errors show too.
        let threshold = table.get("threshold").cloned();
        if let Some(problem) =
            threshold.and_then(|t| threshold_problem(&format!("{at}.threshold"), t))
        {
            out.push(problem);
            table.remove("threshold");
        }
        out.extend(read_as::<PipelineConfig>(&at, config::Value::from(table)));
    }
    out
}

/// A type error in the threshold section `value` (at `key`), read as its method's own type.
fn threshold_problem(key: &str, value: config::Value) -> Option<String> {
    use crate::threshold::evt::SpotConfig;
    use crate::threshold::{EwmaConfig, QuantileConfig, StaticConfig};
    let mut table = value.into_table().ok()?;
    let method = table.remove("method")?.into_string().ok()?;
    let table = config::Value::from(table);
    match method.as_str() {
        "ewma" => read_as::<EwmaConfig>(key, table),
        "quantile" => read_as::<QuantileConfig>(key, table),
        "static" => read_as::<StaticConfig>(key, table),
        "spot" | "dspot" => read_as::<SpotConfig>(key, table),
        _ => None, // an unknown method: the pipeline's own error lists the methods
    }
}

/// The error of reading the section `value` (at `key`) as a `T`, as `key.field: what`.
fn read_as<T: serde::de::DeserializeOwned>(key: &str, value: config::Value) -> Option<String> {
    let source = |origin: &Option<String>| match origin {
        Some(origin) => format!(" (from {origin})"),
        None => String::new(),
    };
    Some(match value.try_deserialize::<T>().err()? {
        config::ConfigError::Type {
            unexpected,
            expected,
            key: Some(field),
            origin,
        } => format!(
            "{key}.{field}: invalid type: {unexpected}, expected {expected}{}",
            source(&origin)
        ),
        config::ConfigError::At {
            error,
            key: Some(field),
            origin,
        } => format!("{key}.{field}: {error}{}", source(&origin)),
        other => format!("{key}: {other}"),
    })
}

/// Most keys a pipeline may hold (about 0.5 KB each for a dense model).
pub const MAX_KEYS: usize = 10_000_000;
/// Most inference threads.
pub const MAX_INFERENCE_THREADS: usize = 1024;

/// The prefix of environment overrides: `ANOMALYD__KAFKA__BROKERS=…`.
pub const ENV_PREFIX: &str = "ANOMALYD";

impl Config {
    /// Reads `path` and overrides it with `env` (`None`: the process environment).
    /// Relative model paths are resolved against the file's directory.
    pub fn load(path: &Path, env: Option<HashMap<String, String>>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("cannot read config {}: {e}", path.display())))?;
        let mut config = Self::from_toml(&text, env)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in config.pipelines.values_mut() {
            if p.model.is_relative() {
                p.model = base.join(&p.model);
            }
            if let Some(c) = p.candidate.as_mut().filter(|c| c.is_relative()) {
                *c = base.join(&*c);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text plus overrides, without validating (see [`Config::validate`]).
    pub fn from_toml(
        text: &str,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        if env.is_some() {
            environment = environment.source(env);
        }
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .and_then(default_threshold_methods)
            .map_err(|e| ConfigError::one(format!("config: {e}")))?;
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> =
            serde_ignored::deserialize(raw.clone(), |path| unknown.push(path.to_string()));
        let mut problems: Vec<String> = unknown
            .into_iter()
            .map(|k| format!("{k}: unknown key"))
            .collect();
        match parsed {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError { problems }),
            Err(e) => {
                let each = type_problems(&raw);
                if each.is_empty() {
                    problems.push(format!("config: {e}"));
                } else {
                    problems.extend(each);
                }
                Err(ConfigError { problems })
            }
        }
    }

    /// Checks everything that can be checked without loading models, and reports it all at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.pipelines.is_empty() {
            problems.push("pipelines: no pipeline is configured".to_string());
        }
        problems.extend(
            self.kafka
                .problems()
                .into_iter()
                .map(|e| format!("kafka.{e}")),
        );
        if self.runtime.inference_threads > MAX_INFERENCE_THREADS {
            problems.push(format!(
                "runtime.inference_threads: must be at most {MAX_INFERENCE_THREADS}"
            ));
        }
        problems.extend(duration_problem(
            "runtime.shutdown_grace",
            self.runtime.shutdown_grace,
            Duration::ZERO,
        ));
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!(
                "http.listen: {:?} is not an address like 0.0.0.0:9898",
                self.http.listen
            ));
        }
        problems.extend(self.log.problems().into_iter().map(|e| format!("log.{e}")));
        for (name, p) in &self.pipelines {
            let at = |field: &str| format!("pipelines.{name}.{field}");
            if !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "pipelines.{name}: a pipeline name uses lowercase letters, digits, - and _ only (it is a metric label and an environment key)"
                ));
            }
            if p.topics.is_empty() {
                problems.push(format!("{}: lists no topic", at("topics")));
            }
            for out in [
                &p.alerts_topic,
                &p.scores_topic,
                &p.denoised_topic,
                &p.dead_letter_topic,
            ] {
                if p.topics.contains(out) {
                    problems.push(format!(
                        "{}: topic {out:?} is both an input and an output of the pipeline",
                        at("topics")
                    ));
                }
            }
            let group = format!("{}.{name}", self.kafka.group_id);
            if let Some(state) = p.state_topic(&group) {
                let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
                if state.len() > 249 || !state.chars().all(legal) {
                    problems.push(format!(
                        "{}: {state:?} is not a Kafka topic name (letters, digits, '.', '_' and '-', at most 249)",
                        at("state_topic")
                    ));
                }
                if p.topics.contains(&state)
                    || [
                        &p.alerts_topic,
                        &p.scores_topic,
                        &p.denoised_topic,
                        &p.dead_letter_topic,
                    ]
                    .contains(&&state)
                {
                    problems.push(format!(
                        "{}: topic {state:?} is also an input or an output of the pipeline",
                        at("state_topic")
                    ));
                }
            }
            if !p.model.is_file() {
                problems.push(format!(
                    "{}: no model file at {}",
                    at("model"),
                    p.model.display()
                ));
            }
            if p.key_field.is_empty() {
                problems.push(format!("{}: must not be empty", at("key_field")));
            }
            if !(1..=MAX_KEYS).contains(&p.max_keys) {
                problems.push(format!(
                    "{}: must be between 1 and {MAX_KEYS} (each key's state is held in memory)",
                    at("max_keys")
                ));
            }
            if p.max_record_bytes == 0 {
                problems.push(format!("{}: must be at least 1", at("max_record_bytes")));
            }
            problems.extend(duration_problem(
                &at("reload_check"),
                p.reload_check,
                Duration::ZERO,
            ));
            // The sections whose problems come as `field: reason`.
            for (section, found) in [
                ("batch", p.batch.problems()),
                ("alert", p.alert.problems()),
                ("promotion", p.promotion.problems()),
                ("drift", p.drift.problems()),
                ("feedback", p.feedback.problems()),
            ] {
                problems.extend(found.into_iter().map(|e| format!("{}.{e}", at(section))));
            }
            if p.candidate_path() == p.model {
                problems.push(format!("{}: must not be the model itself", at("candidate")));
            }
            if let Some(am) = &p.alertmanager {
                problems.extend(
                    am.problems()
                        .into_iter()
                        .map(|e| format!("{}: {e}", at("alertmanager"))),
                );
            }
            problems.extend(
                p.threshold
                    .problems()
                    .into_iter()
                    .map(|e| format!("{}: {e}", at("threshold"))),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [pipelines.fleet]
        topics = ["metrics"]
        model = "m.onnx"
        key_field = "host"
    "#;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_fill_in_a_minimal_config() {
        let c = Config::from_toml(MINIMAL, env(&[])).unwrap();
        let p = &c.pipelines["fleet"];
        assert_eq!(p.topics, ["metrics"]);
        assert_eq!(p.alerts_topic, "anomalyd-alerts");
        assert_eq!(p.batch.max_size, 256);
        assert_eq!(c.kafka.brokers, "localhost:9092");
        assert_eq!(c.runtime.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::from_toml(
            MINIMAL,
            env(&[
                ("ANOMALYD__KAFKA__BROKERS", "b1:9092,b2:9092"),
                ("ANOMALYD__PIPELINES__FLEET__TOPICS", "a,b"),
                ("ANOMALYD__PIPELINES__FLEET__BATCH__MAX_SIZE", "64"),
                ("ANOMALYD__RUNTIME__SHUTDOWN_GRACE", "5s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "b1:9092,b2:9092");
        assert_eq!(c.pipelines["fleet"].topics, ["a", "b"]);
        assert_eq!(c.pipelines["fleet"].batch.max_size, 64);
        assert_eq!(c.runtime.shutdown_grace, Duration::from_secs(5));
    }

    #[test]
    fn a_threshold_section_without_a_method_is_the_quantile() {
        use crate::threshold::QuantileConfig;
        let quantile = |q: f64| ThresholdConfig::Quantile(QuantileConfig { q, memory: 10_000 });
        let text = format!("{MINIMAL}\n[pipelines.fleet.threshold]\nq = 0.9995\n");
        let c = Config::from_toml(&text, env(&[])).unwrap();
        assert_eq!(c.pipelines["fleet"].threshold, quantile(0.9995));
        // docs/CONFIG.md's example: the override alone, on a file without the section.
        let q = ("ANOMALYD__PIPELINES__FLEET__THRESHOLD__Q", "0.9995");
        let c = Config::from_toml(MINIMAL, env(&[q])).unwrap();
        assert_eq!(c.pipelines["fleet"].threshold, quantile(0.9995));
        // A method said in the file stays, and its own parameters are still checked.
        let spot = format!("{MINIMAL}\n[pipelines.fleet.threshold]\nmethod = \"spot\"\n");
        let c = Config::from_toml(&spot, env(&[])).unwrap();
        assert_eq!(c.pipelines["fleet"].threshold.method(), "spot");
        let wrong = format!("{MINIMAL}\n[pipelines.fleet.threshold]\nalpha = 0.1\n");
        assert!(
            Config::from_toml(&wrong, env(&[])).is_err(),
            "alpha is not the quantile's"
        );
    }

    #[test]
    fn every_unknown_key_is_reported_at_once() {
        let text = format!("{MINIMAL}\nbogus = 1\n[kafka]\nbrokerz = \"x\"\n");
        let e = Config::from_toml(&text, env(&[])).unwrap_err();
        let all = e.to_string();
        assert!(all.contains("kafka.brokerz: unknown key"), "{all}");
        assert!(all.contains("pipelines.fleet.bogus: unknown key"), "{all}");
    }

    #[test]
    fn validation_names_each_bad_field() {
        let text = r#"
            [kafka]
            auto_offset_reset = "middle"
            [kafka.properties]
            "enable.auto.offset.store" = "true"
            [pipelines.Fleet]
            topics = ["m"]
            model = "/nonexistent.onnx"
            alerts_topic = "m"
            candidate = "/nonexistent.onnx"
            [pipelines.Fleet.batch]
            max_size = 0
            [pipelines.Fleet.alert]
            rebaseline_after = "sometimes"
            [pipelines.Fleet.promotion]
            max_new_anomalies = 2
            [pipelines.Fleet.drift]
            ratio = 0.5
        "#;
        let e = Config::from_toml(text, env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("rebaseline_after") && e.contains("\"never\""),
            "{e}"
        );
        let c = Config::from_toml(&text.replace("\"sometimes\"", "500"), env(&[])).unwrap();
        let e = c.validate().unwrap_err();
        let all = e.to_string();
        for needle in [
            "kafka.auto_offset_reset",
            "kafka.properties.enable.auto.offset.store",
            "pipelines.Fleet: a pipeline name",
            "pipelines.Fleet.topics: topic \"m\" is both",
            "pipelines.Fleet.model: no model file",
            "pipelines.Fleet.batch.max_size",
            "pipelines.Fleet.promotion.max_new_anomalies",
            "pipelines.Fleet.drift.ratio",
            "pipelines.Fleet.candidate: must not be the model itself",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(e.problems.len(), 9, "{all}");
    }

    #[test]
    fn every_wrong_type_is_reported_by_its_field() {
        let text = format!(
            "{MINIMAL}\nmax_keys = \"many\"\n[pipelines.fleet.threshold]\nmethod = \"spot\"\nq = \"small\"\n\
             [pipelines.other]\ntopics = [\"o\"]\nmodel = \"m.onnx\"\n[pipelines.other.alert]\nfire_after = \"soon\"\n"
        );
        let threads = ("ANOMALYD__RUNTIME__INFERENCE_THREADS", "all");
        let e = Config::from_toml(&text, env(&[threads])).unwrap_err();
        let all = e.to_string();
        for needle in [
            "runtime.inference_threads: invalid type: string \"all\", expected an integer",
            // Inside a threshold (an internally tagged enum), serde alone names only the section;
            // and the pipeline's other error shows too.
            "pipelines.fleet.threshold.q: invalid type",
            "pipelines.fleet.max_keys: invalid type",
            "pipelines.other.alert.fire_after: invalid type",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(e.problems.len(), 4, "{all}");
        let unknown = format!("{MINIMAL}\n[pipelines.fleet.threshold]\nmethod = \"magic\"\n");
        let e = Config::from_toml(&unknown, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pipelines.fleet.threshold.method: unknown variant `magic`"),
            "{e}"
        );
    }
}
