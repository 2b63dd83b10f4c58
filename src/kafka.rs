//! Kafka plumbing: the `[kafka]` section and the client configurations built from it, the same
//! for every client of every pipeline (the consumer of `ingest`, the producers of `sink` and
//! `changelog`).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use serde::{Deserialize, Serialize};

use crate::time::duration_problem;

/// `[kafka]`: the brokers and the consumer group, shared by every pipeline.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list (librdkafka `bootstrap.servers`).
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer group prefix; pipeline `P` consumes as group `<group_id>.<P>`.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Where a group with no committed offset starts: `earliest` or `latest`.
    #[serde(default = "default_offset_reset")]
    pub auto_offset_reset: String,
    /// How often stored offsets are committed.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long to wait for outputs to be acknowledged before giving up a batch of partitions on
    /// revoke. Records still in flight then are processed again by the partition's next owner.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Extra librdkafka properties passed as they are to every client (SASL/SSL, tuning), e.g.
    /// `"security.protocol" = "SASL_SSL"`. They override anomalyd's own defaults, except the
    /// offset-management ones that at-least-once delivery depends on.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: default_brokers(),
            group_id: default_group_id(),
            auto_offset_reset: default_offset_reset(),
            commit_interval: default_commit_interval(),
            drain_timeout: default_drain_timeout(),
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = [
            duration_problem(
                "commit_interval",
                self.commit_interval,
                Duration::from_millis(10),
            ),
            duration_problem("drain_timeout", self.drain_timeout, Duration::ZERO),
        ]
        .into_iter()
        .flatten()
        .collect();
        // librdkafka skips empty entries (a trailing comma from a templated variable).
        let brokers: Vec<&str> = self
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        if brokers.is_empty() {
            problems.push("brokers: must name at least one broker".into());
        }
        let protocol = self
            .properties
            .get("security.protocol")
            .map_or("plaintext", String::as_str);
        problems.extend(
            brokers
                .into_iter()
                .filter_map(|b| broker_problem(b, protocol))
                .map(|p| format!("brokers: {p}")),
        );
        if !matches!(self.auto_offset_reset.as_str(), "earliest" | "latest") {
            problems.push(format!(
                "auto_offset_reset: {:?} is neither `earliest` nor `latest`",
                self.auto_offset_reset
            ));
        }
        for (key, value) in &self.properties {
            if RESERVED_PROPERTIES.contains(&key.as_str()) {
                problems.push(format!(
                    "properties.{key}: anomalyd manages this property itself (at-least-once delivery depends on it)"
                ));
                continue;
            }
            // librdkafka's own check of the name and value, reported without the value (it may
            // be a password).
            let mut one = ClientConfig::new();
            one.set(key, value);
            if let Err(e) = one.create_native_config() {
                problems.push(format!("properties.{key}: {}", redact_error(e)));
            }
        }
        problems
    }
}

/// What is wrong with one entry of `brokers`, as librdkafka reads it: `host`, `host:port` or
/// `[v6-address]:port` (port 9092 when left out), optionally behind the `security.protocol` in
/// use (`SASL_SSL://host:port`; librdkafka refuses any other). Without this check a typo
/// (`kafka:909`, `http://kafka:9092`, a space for a comma) passes `check` and the daemon then
/// retries a broker that cannot exist, forever.
fn broker_problem(entry: &str, protocol: &str) -> Option<String> {
    let address = match entry.split_once("://") {
        Some((scheme, _)) if !scheme.eq_ignore_ascii_case(protocol) => {
            return Some(format!(
                "{entry:?}: `{scheme}://` is not the security.protocol in use ({protocol}); write host:port"
            ))
        }
        Some((_, rest)) => rest,
        None => entry,
    };
    let port = match address.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((_, "")) => None,
            Some((_, rest)) => Some(rest.strip_prefix(':').unwrap_or(rest)),
            None => {
                return Some(format!(
                    "{entry:?}: an IPv6 address without its closing `]`"
                ))
            }
        },
        None if address.parse::<std::net::Ipv6Addr>().is_ok() => return None,
        None if address.matches(':').count() > 1 => {
            return Some(format!(
                "{entry:?}: more than one `:` (a missing comma? an IPv6 address goes in brackets, [::1]:9092)"
            ))
        }
        None if address.contains(char::is_whitespace) => {
            return Some(format!("{entry:?}: a space (brokers are separated by commas)"))
        }
        None => address.split_once(':').map(|(_, port)| port),
    };
    if address.is_empty() || address.starts_with(':') {
        return Some(format!("{entry:?}: no host"));
    }
    match port.map(str::parse::<u16>) {
        Some(Ok(0)) | Some(Err(_)) => Some(format!(
            "{entry:?}: the port must be a number from 1 to 65535"
        )),
        _ => None,
    }
}

fn default_brokers() -> String {
    "localhost:9092".into()
}
fn default_group_id() -> String {
    "anomalyd".into()
}
fn default_offset_reset() -> String {
    "earliest".into()
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A client-configuration error as it may be shown: without the property's value, which may be
/// a password.
pub fn redact_error(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(res, description, key, value) => {
            let description = if value.is_empty() {
                description
            } else {
                description.replace(&value, "***")
            };
            KafkaError::ClientConfig(res, description, key, "(value not shown)".into())
        }
        other => other,
    }
}

/// librdkafka properties anomalyd sets itself; at-least-once delivery depends on them.
pub const RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
];

fn base_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers);
    c
}

fn with_user_properties(mut c: ClientConfig, kafka: &KafkaConfig) -> ClientConfig {
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// A plain client's configuration (admin, metadata, reading the state topic): the brokers and
/// the user's properties (SASL/SSL).
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    with_user_properties(base_config(kafka), kafka)
}

/// The consumer's configuration: offsets are stored by anomalyd only once a record's outputs are
/// acknowledged, and committed from the stored positions.
pub fn consumer_config(kafka: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = base_config(kafka);
    c.set("group.id", group)
        .set("auto.offset.reset", &kafka.auto_offset_reset)
        .set("statistics.interval.ms", "5000")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("topic.metadata.refresh.interval.ms", "10000")
        // A record waits in the broker for at most this long before the consumer sees it on
        // brokers that hold a fetch for its full wait (tansu does; Kafka answers once one byte
        // is there). librdkafka's 500 ms put p50 record-to-alert at 450 ms on tansu
        // (docs/BENCHMARKS.md); an idle consumer pays 200 empty fetches a second per broker.
        .set("fetch.wait.max.ms", "5");
    let mut c = with_user_properties(c, kafka);
    c.set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            kafka.commit_interval.as_millis().max(1).to_string(),
        )
        .set("enable.auto.offset.store", "false");
    c
}

/// The producer's configuration for every output topic: acknowledged by all in-sync replicas.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(kafka);
    c.set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000")
        .set("compression.type", "lz4");
    with_user_properties(c, kafka)
}

/// librdkafka reports an unreachable or failing broker many times over: an error line per
/// client and connection attempt, then each client's error callback. With the brokers down that
/// was ~30 lines a second from one pipeline. One line per 10 s, saying how many were held back,
/// tells the operator as much; a broker that recovers stops the lines by itself.
static ERRORS: std::sync::LazyLock<crate::log::Throttle> =
    std::sync::LazyLock::new(|| crate::log::Throttle::new(std::time::Duration::from_secs(10)));

/// Maps librdkafka's log lines onto tracing; its errors are throttled (see [`ERRORS`]).
pub fn log_kafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            if let Some(held) = ERRORS.allow() {
                tracing::error!(target: "librdkafka", facility = fac, held_back = held, "{message}")
            }
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}")
        }
    }
}

/// A Kafka client's error (its error callback, a failed poll), throttled with librdkafka's
/// error lines: with the brokers down these mostly repeat them.
pub fn log_kafka_error(pipeline: Option<&str>, what: std::fmt::Arguments) {
    if let Some(held) = ERRORS.allow() {
        tracing::warn!(target: "librdkafka", pipeline, held_back = held, "{what}");
    }
}

/// Client context of the producers: routes logs and errors to tracing.
pub struct ProducerContext;

impl ClientContext for ProducerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_kafka(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        log_kafka_error(
            None,
            format_args!("Kafka producer error: {error}: {reason}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_are_checked_as_librdkafka_reads_them() {
        for good in [
            "kafka",
            "kafka:9092",
            "10.0.0.1:19092",
            "PLAINTEXT://kafka.example.com:9093",
            "[::1]:9092",
            "::1",
        ] {
            assert_eq!(broker_problem(good, "plaintext"), None, "{good}");
        }
        assert_eq!(broker_problem("sasl_ssl://k:9093", "SASL_SSL"), None);
        for (bad, says) in [
            ("kafka:90x2", "port"),
            ("kafka:0", "port"),
            ("kafka:", "port"),
            ("http://kafka:9092", "not the security.protocol in use"),
            ("SSL://kafka:9093", "not the security.protocol in use"),
            (":9092", "no host"),
            ("[::1:9092", "closing"),
            ("k1:9092 k2:9092", "more than one `:`"),
            ("k1 k2:9092", "a space"),
        ] {
            let problem = broker_problem(bad, "plaintext").unwrap_or_default();
            assert!(problem.contains(says), "{bad:?} gave {problem:?}");
        }
        let cfg = |brokers: &str| KafkaConfig {
            brokers: brokers.into(),
            ..KafkaConfig::default()
        };
        // Empty entries are skipped, as librdkafka does; the bad port is one problem.
        let problems = cfg("b1:9092,,b2:99999,").problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("brokers: \"b2:99999\""),
            "{problems:?}"
        );
        assert_eq!(cfg(" , ").problems().len(), 1);
    }
}
