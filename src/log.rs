//! Logging: where log lines go and how they look (`[log]`).

use std::io::IsTerminal;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`: the format and level of the log on stderr.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogConfig {
    /// `text` (for people) or `json` (for log shippers).
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `anomalyd=debug,rdkafka=warn`; `RUST_LOG` wins if set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

impl LogConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        match tracing_subscriber::EnvFilter::try_new(&self.level) {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("level: {e}")],
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// Sets up logging on stderr. `RUST_LOG` wins over the configured level.
pub fn init(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
