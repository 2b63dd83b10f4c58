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
    ///
    /// A bare word that is not a level is a valid filter to tracing (every event of the target
    /// of that name, which none of ours is), so `level = "verbose"` would silence the daemon
    /// without a word: it is refused here instead.
    pub fn problems(&self) -> Vec<String> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return vec![format!("level: {e}")];
        }
        self.level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && !d.contains(['=', '[']) && !is_level(d))
            .map(|d| {
                format!(
                    "level: {d:?} is not a level (trace, debug, info, warn, error, off) \
                     nor a `target=level` directive"
                )
            })
            .collect()
    }
}

fn is_level(word: &str) -> bool {
    word.parse::<tracing_subscriber::filter::LevelFilter>()
        .is_ok()
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

/// Lets one log line of a repeated event through per period, and says how many were held back
/// since: a failing output retried by thousands of deliveries must not flood the log (every
/// occurrence is still counted in its metric).
#[derive(Debug)]
pub struct Throttle {
    started: std::time::Instant,
    every: std::time::Duration,
    /// When the last line went through, in ms since `started`, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub fn new(every: std::time::Duration) -> Throttle {
        Throttle {
            started: std::time::Instant::now(),
            every,
            last: Default::default(),
            held: Default::default(),
        }
    }

    /// `Some(lines held back since the last one)` if this line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(self.started.elapsed())
    }

    fn allow_at(&self, now: std::time::Duration) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = now.as_millis() as u64 + 1;
        let last = self.last.load(SeqCst);
        let due = last == 0 || now.saturating_sub(last) >= self.every.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, SeqCst, SeqCst)
                .is_ok()
        {
            return Some(self.held.swap(0, SeqCst));
        }
        self.held.fetch_add(1, SeqCst);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(10));
        let at = |s: u64| t.allow_at(Duration::from_secs(s));
        assert_eq!(at(0), Some(0));
        assert_eq!((at(1), at(5), at(9)), (None, None, None));
        assert_eq!(at(10), Some(3));
        assert_eq!(at(11), None);
        assert_eq!(at(30), Some(1));
    }

    #[test]
    fn a_level_that_would_silence_the_daemon_is_refused_by_name() {
        let problems = |level: &str| {
            LogConfig {
                format: LogFormat::Text,
                level: level.into(),
            }
            .problems()
        };
        for ok in [
            "info",
            "WARN",
            "anomalyd=debug,rdkafka=warn",
            "off",
            "3",
            "info,anomalyd=trace",
        ] {
            assert!(problems(ok).is_empty(), "{ok}: {:?}", problems(ok));
        }
        let bad = problems("verbose");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].starts_with("level: \"verbose\" is not a level"),
            "{bad:?}"
        );
        assert_eq!(problems("info,verbos").len(), 1);
        assert_eq!(
            problems("anomalyd=loud").len(),
            1,
            "tracing's own parse error"
        );
    }
}
