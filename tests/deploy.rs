//! The deployment files in deploy/, checked with the real tools and, end to end, with a real
//! Prometheus and Alertmanager:
//!
//! - Prometheus rules: `promtool check rules` and `promtool test rules` (the unit tests beside them);
//! - Alertmanager example: `amtool check-config` and `amtool config routes test`;
//! - systemd unit: `systemd-analyze verify` and `systemd-analyze security --offline`, and the
//!   daemon speaking the sd_notify protocol the unit relies on (READY, WATCHDOG, STOPPING);
//! - Kubernetes: `kubectl kustomize` renders, `kubernetes-validate --strict` validates offline,
//!   and the rendered objects fit together (probes, security context, grace period, selectors,
//!   the ConfigMap's configuration passes `anomalyd check`, the PrometheusRule is rules.yml);
//! - Dockerfile: hadolint, and what it copies exists;
//! - Grafana dashboard: every metric its queries use is one a running daemon exposes;
//! - end to end, from nothing to a paged anomaly: `anomalyd run` on Kafka pushes its anomalies to
//!   a real Alertmanager routed by the shipped example; a real Prometheus scrapes it, evaluates the
//!   shipped rules, and their dead-letter and daemon-down alerts reach that Alertmanager too.
//!
//! The tools come from scripts/deploy-tools.sh. A test whose tool is missing prints a note and
//! passes, unless ANOMALYD_REQUIRE_TOOLS=1 (scripts/test.sh sets it), when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/ports.rs"]
mod ports;
#[path = "common/tansu.rs"]
#[allow(dead_code)]
mod tansu;

// ---- helpers ------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn anomalyd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_anomalyd"))
}

fn venv_bin(name: &str) -> PathBuf {
    repo().join("target/venv/bin").join(name)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds each tool (on PATH, or a path to an executable): `Some` with their paths, or `None`
/// after a note when one is missing. With ANOMALYD_REQUIRE_TOOLS=1 a missing tool fails the test.
fn tools(test: &str, names: &[&str]) -> Option<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        // Alternatives separated by '|': Debian names Alertmanager prometheus-alertmanager.
        let hit = name.split('|').find_map(|n| {
            let p = Path::new(n);
            if p.is_absolute() {
                p.is_file().then(|| p.to_path_buf())
            } else {
                on_path(n)
            }
        });
        match hit {
            Some(p) => found.push(p),
            None => missing.push(*name),
        }
    }
    if missing.is_empty() {
        return Some(found);
    }
    let msg = format!(
        "{test}: missing {} (scripts/deploy-tools.sh installs them)",
        missing.join(", ")
    );
    if std::env::var("ANOMALYD_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{msg}; ANOMALYD_REQUIRE_TOOLS=1, so this is a failure");
    }
    eprintln!("note: skipping {msg}");
    None
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{shown} failed ({}):\n{}",
        o.status,
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A duration as written in configs and units: `30s`, `2m`, `500ms`, `45` (seconds).
fn seconds(s: &str) -> f64 {
    let s = s.trim().trim_matches('"');
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a duration: {s:?}"));
    n * match unit {
        "" | "s" | "sec" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => panic!("unknown duration unit {other:?} in {s:?}"),
    }
}

/// YAML (several documents) or TOML to JSON, with the venv's Python (PyYAML comes with
/// kubernetes-validate; tomllib is in the standard library).
fn to_json(python: &Path, path: &Path) -> Value {
    let script = r#"
import json, sys
p = sys.argv[1]
if p.endswith(".toml"):
    import tomllib
    out = tomllib.load(open(p, "rb"))
else:
    import yaml
    out = [d for d in yaml.safe_load_all(open(p)) if d is not None]
json.dump(out, sys.stdout)
"#;
    let out = ok(Command::new(python).arg("-c").arg(script).arg(path));
    serde_json::from_str(&out).expect("the converter prints JSON")
}

/// A child process killed (and reaped) when dropped, with its output in a log file.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        Proc {
            name: name.into(),
            child: spawn_logged(name, cmd, &log),
            log,
        }
    }

    /// A server that takes its port on its command line, started on a free port without a port
    /// race (`ports::spawn_listening`); returns it and its port.
    fn spawn_listening(name: &str, dir: &Path, mut cmd: impl FnMut(u16) -> Command) -> (Proc, u16) {
        let log = dir.join(format!("{name}.log"));
        let (child, port) =
            ports::spawn_listening(name, Duration::from_secs(60), Some(&log), |port| {
                spawn_logged(name, &mut cmd(port), &log)
            });
        let proc = Proc {
            name: name.into(),
            child,
            log,
        };
        (proc, port)
    }

    /// The loopback port our own daemon reports having bound (it is given port 0): from the
    /// first line of its log that contains `marker`.
    fn logged_port(&mut self, marker: &str) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let port = text
                .lines()
                .find(|l| l.contains(marker))
                .and_then(|l| l.split("127.0.0.1:").nth(1))
                .and_then(|rest| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().ok()
                });
            if let Some(port) = port {
                return port;
            }
            assert!(
                self.running() && Instant::now() < deadline,
                "{} reported no address (a line with {marker:?})\n{}",
                self.name,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The end of its log, for failure messages.
    fn tail(&self) -> String {
        tail(&self.name, &self.log)
    }
}

fn tail(name: &str, log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(40);
    format!("--- last lines of {name} ---\n{}", lines[from..].join("\n"))
}

/// Starts `cmd` with its stdout and stderr in `log` (created anew).
fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("create a log file");
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone the log file"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"))
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 200 ms until it returns `Some`, or panics with `what` and `context()`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
fn http_get(port: u16, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn get_json(port: u16, path_and_query: &str) -> Option<Value> {
    match http_get(port, path_and_query) {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Metric names in a Prometheus text exposition.
fn exposed_names(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The metric names a PromQL expression selects: identifiers outside label matchers, ranges and
/// strings that are not functions, aggregations, keywords or the label lists of by/without/on/
/// ignoring/group_left/group_right. Grafana variables ($job, $__rate_interval) are skipped.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "atan2",
        "inf",
        "nan",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    let skip_group = |j: usize, open: char, close: char| {
        // From an opening bracket to just after its closing one (strings inside skipped).
        let mut depth = 0;
        let mut k = j;
        let mut quote: Option<char> = None;
        while k < chars.len() {
            let c = chars[k];
            match quote {
                Some(_) if c == '\\' => k += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == open => depth += 1,
                None if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return k + 1;
                    }
                }
                None => {}
            }
            k += 1;
        }
        chars.len()
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            let mut k = i + 1;
            while k < chars.len() && chars[k] != c {
                if chars[k] == '\\' {
                    k += 1;
                }
                k += 1;
            }
            i = k + 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, a number or a duration.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            let is_call = after < chars.len() && chars[after] == '(';
            if LABEL_LISTS.contains(&word.as_str()) && is_call {
                i = skip_group(after, '(', ')');
            } else if !is_call && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_names_finds_the_selectors_only() {
    let got = promql_metric_names(
        r#"sum by (pipeline, le) (rate(anomalyd_inference_seconds_bucket{job=~"$job", pipeline=~"a|b"}[$__rate_interval])) / on (pipeline) group_left(model) max without (instance) (anomalyd_model_info offset 5m) > bool 0.5 unless absent(up{job="x"})"#,
    );
    let want: BTreeSet<String> = [
        "anomalyd_inference_seconds_bucket",
        "anomalyd_model_info",
        "up",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
}

// ---- Prometheus rules and Alertmanager routing ---------------------------------------------------

#[test]
fn prometheus_rules_pass_promtool_check_and_unit_tests() {
    let Some(t) = tools("prometheus rules", &["promtool"]) else {
        return;
    };
    let dir = deploy("prometheus");
    let out = ok(Command::new(&t[0])
        .current_dir(&dir)
        .args(["check", "rules", "rules.yml"]));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = ok(Command::new(&t[0])
        .current_dir(&dir)
        .args(["test", "rules", "rules.test.yml"]));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = ok(Command::new(&t[0]).current_dir(&dir).args([
        "check",
        "config",
        "prometheus.example.yml",
    ]));
    assert!(out.contains("is valid prometheus config"), "{out}");
    // Every alert of rules.yml has unit tests, and a section in OPERATIONS.md that its runbook
    // annotation points at.
    let rules = read(&dir.join("rules.yml"));
    let tests = read(&dir.join("rules.test.yml"));
    let operations = read(&repo().join("docs/OPERATIONS.md"));
    let mut alerts = 0;
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert:") {
            let name = name.trim();
            alerts += 1;
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "rules.test.yml does not test the alert {name}"
            );
            assert!(
                operations.contains(&format!("\n### {name}\n")),
                "docs/OPERATIONS.md has no section ### {name}"
            );
            let runbook = format!("runbook: \"docs/OPERATIONS.md#{}\"", name.to_lowercase());
            assert!(
                rules.contains(&runbook),
                "the alert {name} lacks the annotation {runbook}"
            );
        }
    }
    assert!(alerts >= 8, "only {alerts} alerts in rules.yml");
}

#[test]
fn alertmanager_example_is_valid_and_routes_each_kind_of_alert() {
    let Some(t) = tools("alertmanager example", &["amtool"]) else {
        return;
    };
    let config = deploy("alertmanager/alertmanager.yml");
    let out = ok(Command::new(&t[0]).arg("check-config").arg(&config));
    assert!(out.contains("SUCCESS"), "{out}");
    for (labels, receiver) in [
        (
            "alertname=AnomalyDetected severity=critical pipeline=fleet key=host-03 model=demo-dense",
            "data-owners-page",
        ),
        (
            "alertname=AnomalyDetected severity=warning pipeline=fleet key=host-03 model=demo-dense",
            "data-owners",
        ),
        (
            "alertname=AnomalydDown service=anomalyd severity=critical job=anomalyd",
            "anomalyd-operators-page",
        ),
        (
            "alertname=AnomalydDeadLetters service=anomalyd severity=warning pipeline=fleet",
            "anomalyd-operators",
        ),
        ("alertname=SomethingElse severity=critical", "default"),
    ] {
        let o = run(Command::new(&t[0])
            .args(["config", "routes", "test"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--verify.receivers={receiver}"))
            .args(labels.split(' ')));
        assert!(
            o.status.success(),
            "{labels} should route to {receiver}:\n{}",
            text(&o)
        );
    }
}

// ---- systemd -----------------------------------------------------------------------------------

/// `key=value` settings of a unit file (the last one wins, as in systemd).
fn unit_settings(unit: &str) -> BTreeMap<String, String> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `runtime.shutdown_grace` of a TOML configuration, read line by line (default 30s).
fn shutdown_grace(toml: &str) -> f64 {
    toml.lines()
        .filter_map(|l| l.trim().strip_prefix("shutdown_grace"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(seconds)
        .next_back()
        .unwrap_or(30.0)
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let Some(t) = tools("systemd unit", &["systemd-analyze"]) else {
        return;
    };
    let unit = read(&deploy("systemd/anomalyd.service"));
    let s = unit_settings(&unit);
    let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(get("Type"), "notify");
    assert!(seconds(get("WatchdogSec")) > 0.0, "no WatchdogSec");
    assert_eq!(get("NoNewPrivileges"), "yes");
    assert_eq!(get("ProtectSystem"), "strict");
    assert!(
        get("DynamicUser") == "yes" || !get("User").is_empty(),
        "neither DynamicUser nor a dedicated User"
    );
    assert_eq!(get("StateDirectory"), "anomalyd");
    // `systemctl reload` = SIGHUP, which the daemon handles (checked below by the sd_notify test).
    assert!(
        get("ExecReload").contains("-HUP $MAINPID"),
        "ExecReload: {}",
        get("ExecReload")
    );
    assert!(
        get("ExecStart").contains("run --config /etc/anomalyd/anomalyd.toml"),
        "ExecStart: {}",
        get("ExecStart")
    );
    // systemd must wait longer than the daemon's drain before it kills it.
    let grace = shutdown_grace(&read(&deploy("anomalyd.example.toml")));
    assert!(
        seconds(get("TimeoutStopSec")) > grace,
        "TimeoutStopSec {} is not longer than shutdown_grace {grace}s",
        get("TimeoutStopSec")
    );

    // `verify` checks that the executables exist: point them at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("anomalyd.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/anomalyd", anomalyd_bin().to_str().unwrap()),
    )
    .unwrap();
    let o = run(Command::new(&t[0]).arg("verify").arg(&copy));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {}\n{}",
        o.status,
        text(&o)
    );
    // Exposure 0 (sandboxed) .. 10 (nothing restricted); 2.0 or less is systemd's "OK".
    let o = run(Command::new(&t[0])
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&copy));
    assert!(
        o.status.success(),
        "systemd-analyze security: exposure above 2.0:\n{}",
        text(&o)
    );
}

/// Runs the toolkit's `anomalyd-train` with a deploy file's arguments, `--config` pointed at
/// `config`, and the brokers at a closed port: it must get past its arguments, the
/// configuration and the serving model, and stop at Kafka (exit 2, saying so).
fn retrain_reaches_kafka(what: &str, args: &[String], config: &Path, env: &[(String, String)]) {
    let Some(t) = tools(what, &[venv_bin("anomalyd-train").to_str().unwrap()]) else {
        return;
    };
    let mut args = args.to_vec();
    let at = args.iter().position(|a| a == "--config").expect("--config") + 1;
    args[at] = config.to_str().unwrap().to_string();
    let o = run(Command::new(&t[0])
        .args(&args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("ANOMALYD__KAFKA__BROKERS", "127.0.0.1:1"));
    let out = text(&o);
    assert!(
        o.status.code() == Some(2) && out.contains("error: Kafka"),
        "{what}: anomalyd-train {args:?} should fail only at the (absent) broker:\n{out}"
    );
}

/// The nightly retrain: a timer starting a oneshot `anomalyd-train retrain` of pipeline %i, as
/// the daemon's own (dynamic) user with its state directory, where the models live.
#[test]
fn systemd_retrain_timer_runs_the_toolkit_as_the_daemons_user() {
    let Some(t) = tools("systemd retrain units", &["systemd-analyze"]) else {
        return;
    };
    let service = read(&deploy("systemd/anomalyd-retrain@.service"));
    let timer = read(&deploy("systemd/anomalyd-retrain@.timer"));
    let s = unit_settings(&service);
    let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("");
    let daemon = unit_settings(&read(&deploy("systemd/anomalyd.service")));
    assert_eq!(get("Type"), "oneshot");
    // The daemon's DynamicUser is named after its unit, anomalyd: the same user (and state
    // directory) lets the daemon rename the candidate this unit writes.
    assert_eq!((get("DynamicUser"), get("User")), ("yes", "anomalyd"));
    assert_eq!(get("StateDirectory"), daemon["StateDirectory"]);
    assert_eq!(get("ProtectSystem"), "strict");
    let timer_settings = unit_settings(&timer);
    assert!(timer_settings.contains_key("OnCalendar"), "{timer}");
    assert_eq!(timer_settings["Persistent"], "true");

    const TOOLKIT: &str = "/opt/anomalyd-train/bin/anomalyd-train";
    let exec = get("ExecStart");
    assert!(exec.starts_with(TOOLKIT), "ExecStart: {exec}");
    let dir = tempfile::tempdir().unwrap();
    let local = service.replace(TOOLKIT, venv_bin("anomalyd-train").to_str().unwrap());
    std::fs::write(dir.path().join("anomalyd-retrain@fleet.service"), &local).unwrap();
    std::fs::write(dir.path().join("anomalyd-retrain@fleet.timer"), &timer).unwrap();
    let o = run(Command::new(&t[0]).current_dir(dir.path()).args([
        "verify",
        "./anomalyd-retrain@fleet.service",
        "./anomalyd-retrain@fleet.timer",
    ]));
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stderr).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&o)
    );
    let o = run(Command::new(&t[0])
        .current_dir(dir.path())
        .args(["security", "--offline=true", "--threshold=20"])
        .arg("./anomalyd-retrain@fleet.service"));
    assert!(o.status.success(), "exposure above 2.0:\n{}", text(&o));

    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|a| a.replace("%i", "fleet"))
        .collect();
    retrain_reaches_kafka(
        "systemd retrain",
        &args,
        &deploy("anomalyd.example.toml"),
        &[],
    );
}

/// The daemon, as `Type=notify` runs it: READY=1 once started, WATCHDOG=1 at half of
/// WatchdogSec, STOPPING=1 on SIGTERM, then a clean exit. Needs no systemd: the test is the
/// service manager's end of the socket.
#[test]
fn daemon_speaks_the_sd_notify_protocol_the_unit_relies_on() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let config = dir.path().join("anomalyd.toml");
    // Kafka is a closed loopback port: the daemon starts (and keeps retrying) without a broker.
    // The port is held (bound, never listening) so that nothing else can take it meanwhile.
    let no_kafka = tokio::net::TcpSocket::new_v4().unwrap();
    no_kafka.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:{}"
[http]
listen = "127.0.0.1:0"
[log]
level = "warn,anomalyd::cli=info,librdkafka=off,anomalyd::pipeline=off"
[runtime]
shutdown_grace = "5s"
[pipelines.fleet]
topics = ["metrics"]
model = "{}"
key_field = "host"
"#,
            no_kafka.local_addr().unwrap().port(),
            repo().join("models/demo-dense.onnx").display()
        ),
    )
    .unwrap();
    let mut daemon = Proc::spawn(
        "anomalyd-run",
        Command::new(anomalyd_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "400000"),
        dir.path(),
    );
    let mut got: Vec<(Duration, String)> = Vec::new();
    let started = Instant::now();
    let recv = |got: &mut Vec<(Duration, String)>| {
        let mut buf = [0u8; 4096];
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).trim().to_string();
            got.push((started.elapsed(), msg));
        }
    };
    let watchdogs = |got: &Vec<(Duration, String)>| {
        got.iter()
            .filter(|(_, m)| m.split('\n').any(|l| l == "WATCHDOG=1"))
            .count()
    };
    while started.elapsed() < Duration::from_secs(30) && watchdogs(&got) < 6 && daemon.running() {
        recv(&mut got);
    }
    let ready = got
        .iter()
        .position(|(_, m)| m.split('\n').any(|l| l == "READY=1"));
    assert!(
        ready.is_some(),
        "no READY=1 (got {got:?})\n{}",
        daemon.tail()
    );
    assert!(
        watchdogs(&got) >= 6,
        "fewer than 6 WATCHDOG=1 pings in 30 s with WatchdogSec=400ms (got {got:?})\n{}",
        daemon.tail()
    );
    // Pings at half of the watchdog period (200 ms, not 400), as the daemon says it set up:
    // read from its log rather than timed, so a busy machine cannot fail the test.
    assert!(
        std::fs::read_to_string(&daemon.log)
            .unwrap_or_default()
            .contains("The systemd watchdog is on: pinging it twice per period. every_ms=200"),
        "no watchdog set up at 200 ms for WATCHDOG_USEC=400000\n{}",
        daemon.tail()
    );

    // `systemctl reload` (ExecReload) sends SIGHUP: the daemon checks its model files and keeps
    // running (and pinging).
    let before = watchdogs(&got);
    ok(Command::new("sh")
        .args(["-c", "kill -HUP \"$1\"", "sh"])
        .arg(daemon.child.id().to_string()));
    let hup = Instant::now();
    while hup.elapsed() < Duration::from_secs(1) {
        recv(&mut got);
    }
    assert!(
        daemon.running(),
        "SIGHUP stopped anomalyd\n{}",
        daemon.tail()
    );
    assert!(
        watchdogs(&got) > before + 1,
        "no watchdog pings after SIGHUP: {got:?}"
    );

    ok(Command::new("sh")
        .args(["-c", "kill -TERM \"$1\"", "sh"])
        .arg(daemon.child.id().to_string()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        recv(&mut got);
        if let Ok(Some(status)) = daemon.child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "anomalyd did not exit within 20 s of SIGTERM\n{}",
            daemon.tail()
        );
    };
    // Messages sent just before the exit are still queued on the socket.
    socket.set_nonblocking(true).unwrap();
    recv(&mut got);
    recv(&mut got);
    assert!(
        got.iter()
            .any(|(_, m)| m.split('\n').any(|l| l == "STOPPING=1")),
        "no STOPPING=1 after SIGTERM (got {got:?})\n{}",
        daemon.tail()
    );
    assert!(
        status.success(),
        "anomalyd exited with {status} after SIGTERM\n{}",
        daemon.tail()
    );
}

// ---- Kubernetes ----------------------------------------------------------------------------------

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// `selector` (a label map) matches `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The tools the Kubernetes tests need: kubectl, kubernetes-validate and the venv's Python.
fn kubernetes_tools(test: &str) -> Option<Vec<PathBuf>> {
    tools(
        test,
        &[
            "kubectl",
            venv_bin("kubernetes-validate").to_str().unwrap(),
            venv_bin("python").to_str().unwrap(),
        ],
    )
}

/// `kubectl kustomize deploy/<overlay>`, validated offline and strictly (unknown fields are
/// errors) against the oldest and the newest Kubernetes the package knows here; its objects.
/// The Prometheus Operator's kinds have no schema there: the caller checks them.
fn render_and_validate(t: &[PathBuf], overlay: &str, dir: &Path) -> Vec<Value> {
    let (kubectl, validate, python) = (&t[0], &t[1], &t[2]);
    let rendered = dir.join(format!("{overlay}.yaml"));
    let yaml = ok(Command::new(kubectl).arg("kustomize").arg(deploy(overlay)));
    std::fs::write(&rendered, &yaml).unwrap();
    let objects: Vec<Value> = to_json(python, &rendered).as_array().unwrap().clone();
    const CRDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];
    let core = objects
        .iter()
        .filter(|o| !CRDS.contains(&o["kind"].as_str().unwrap_or("")))
        .count();
    for version in ["1.28.0", "1.37.0"] {
        let o = run(Command::new(validate)
            .args(["--strict", "--kubernetes-version", version])
            .arg(&rendered));
        let out = text(&o);
        assert!(o.status.success(), "kubernetes-validate {version}:\n{out}");
        let passed = out.lines().filter(|l| l.starts_with("INFO")).count();
        assert_eq!(passed, core, "not every resource validated:\n{out}");
        for l in out.lines().filter(|l| !l.starts_with("INFO")) {
            assert!(
                l.starts_with("WARN") && CRDS.iter().any(|k| l.contains(&format!("kind {k} "))),
                "unexpected kubernetes-validate output: {l}\n{out}"
            );
        }
    }
    objects
}

#[test]
fn kubernetes_manifests_render_validate_and_fit_together() {
    let Some(t) = kubernetes_tools("kubernetes manifests") else {
        return;
    };
    let python = &t[2];
    let dir = tempfile::tempdir().unwrap();
    let objects = render_and_validate(&t, "k8s", dir.path());

    let deployment = of_kind(&objects, "Deployment");
    let service = of_kind(&objects, "Service");
    let configmap = of_kind(&objects, "ConfigMap");
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));

    // Probes on the container's named port.
    let port_names: Vec<&str> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        let port = c[probe]["httpGet"]["port"].as_str().unwrap_or("");
        assert!(port_names.contains(&port), "{probe} port {port:?}");
    }
    // Resources, non-root and read-only.
    for k in ["cpu", "memory"] {
        assert!(c["resources"]["requests"][k].is_string(), "requests.{k}");
    }
    assert!(c["resources"]["limits"]["memory"].is_string());
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert!(spec["securityContext"]["runAsUser"].as_u64().unwrap_or(0) > 0);

    // The ConfigMap is the one mounted, and its configuration is valid: `anomalyd check` with
    // the model directory of the image pointed at the repository's models/.
    let cm_name = configmap["metadata"]["name"].as_str().unwrap();
    let config_volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm_name)
        .unwrap_or_else(|| panic!("no volume mounts the ConfigMap {cm_name}"));
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == config_volume["name"])
        .expect("the config volume is mounted");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = format!("{}/anomalyd.toml", mount["mountPath"].as_str().unwrap());
    assert!(
        args.windows(2)
            .any(|w| (w[0] == "--config" || w[0] == "-c") && w[1] == config_path),
        "the container does not run with --config {config_path}: {args:?}"
    );
    let toml = configmap["data"]["anomalyd.toml"].as_str().unwrap();
    const IMAGE_MODELS: &str = "/usr/local/share/anomalyd/models/";
    assert!(
        toml.contains(IMAGE_MODELS),
        "the configuration does not use the image's models"
    );
    let local = dir.path().join("anomalyd.toml");
    std::fs::write(
        &local,
        toml.replace(
            IMAGE_MODELS,
            &format!("{}/", repo().join("models").display()),
        ),
    )
    .unwrap();
    let checked = ok(Command::new(anomalyd_bin())
        .args(["check", "--config"])
        .arg(&local));
    assert!(checked.contains("valid"), "{checked}");

    // Kubernetes waits longer than the drain before it kills the pod.
    let grace = to_json(python, &local)["runtime"]["shutdown_grace"]
        .as_str()
        .map(seconds)
        .unwrap_or(30.0);
    let termination = spec["terminationGracePeriodSeconds"]
        .as_f64()
        .unwrap_or(30.0);
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds {termination} is not longer than shutdown_grace {grace}s"
    );

    // Service → pods, ServiceMonitor → Service port, PDB → pods, HPA → Deployment.
    assert!(selects(&service["spec"]["selector"], pod_labels));
    let service_ports: Vec<&str> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let monitor = of_kind(&objects, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    for e in monitor["spec"]["endpoints"].as_array().unwrap() {
        assert!(service_ports.contains(&e["port"].as_str().unwrap_or("")));
        assert_eq!(e["path"], "/metrics");
    }
    // The rules expect job="anomalyd": the ServiceMonitor's job is the Service's name.
    assert_eq!(service["metadata"]["name"], "anomalyd");
    let pdb = of_kind(&objects, "PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));
    let hpa = of_kind(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(
        hpa["spec"]["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["type"] == "External"
                && m["external"]["metric"]["name"] == "anomalyd_consumer_lag"),
        "the HPA does not scale on consumer lag"
    );

    // The PrometheusRule is deploy/prometheus/rules.yml.
    let rule = of_kind(&objects, "PrometheusRule");
    let rules = to_json(python, &deploy("prometheus/rules.yml"));
    assert_eq!(
        rule["spec"]["groups"], rules[0]["groups"],
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/rules.yml"
    );

    // Everything lands in one namespace.
    for o in &objects {
        if o["kind"] != "Namespace" {
            assert_eq!(o["metadata"]["namespace"], "anomalyd", "{}", o["kind"]);
        }
    }
}

/// deploy/k8s-learning: the base plus the models' volume and the nightly retrain. The CronJob
/// runs the toolkit with the daemon's ConfigMap, as the daemon's user, on the volume the
/// daemon's pods serve the model from (seeded from the toolkit's image), with the same model
/// path; and its pods are not the daemon's (no Service, PDB or HPA picks them up).
#[test]
fn kubernetes_learning_overlay_shares_the_models_volume_with_the_retrain_cronjob() {
    let Some(t) = kubernetes_tools("kubernetes learning overlay") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let objects = render_and_validate(&t, "k8s-learning", dir.path());
    let deployment = of_kind(&objects, "Deployment");
    let cron = of_kind(&objects, "CronJob");
    let configmap = of_kind(&objects, "ConfigMap");
    let claim = of_kind(&objects, "PersistentVolumeClaim");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");

    let daemon_pod = &deployment["spec"]["template"]["spec"];
    let job_pod = &cron["spec"]["jobTemplate"]["spec"]["template"];
    assert!(
        !selects(
            &deployment["spec"]["selector"]["matchLabels"],
            &job_pod["metadata"]["labels"]
        ),
        "the retrain pods carry the daemon's labels"
    );
    let job_pod = &job_pod["spec"];
    for k in ["runAsUser", "runAsGroup", "fsGroup"] {
        assert_eq!(
            job_pod["securityContext"][k], daemon_pod["securityContext"][k],
            "{k}: the daemon renames the candidate the job writes"
        );
    }
    // Where each pod mounts a volume of `source` (a key of the volume: configMap or
    // persistentVolumeClaim) naming `name`, and whether read-only.
    let mount = |pod: &Value, container: &Value, source: &str, name: &Value| -> (String, bool) {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| &v[source]["name"] == name || &v[source]["claimName"] == name)
            .unwrap_or_else(|| panic!("no {source} volume {name}"));
        let m = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("{name} is not mounted"));
        (
            m["mountPath"].as_str().unwrap().to_string(),
            m["readOnly"] == true,
        )
    };
    let daemon = &daemon_pod["containers"][0];
    let job = &job_pod["containers"][0];
    let seed = &daemon_pod["initContainers"][0];
    let claim_name = &claim["metadata"]["name"];
    let models = mount(daemon_pod, daemon, "persistentVolumeClaim", claim_name);
    assert!(
        !models.1,
        "the daemon renames promoted candidates: its models' mount is writable"
    );
    assert_eq!(
        mount(job_pod, job, "persistentVolumeClaim", claim_name),
        models
    );
    assert_eq!(
        mount(daemon_pod, seed, "persistentVolumeClaim", claim_name),
        models
    );
    assert_eq!(
        seed["image"], job["image"],
        "the seed comes from the toolkit's image"
    );

    // The same model path in both, on the volume, seeded by the init container.
    let env = |c: &Value| -> Vec<(String, String)> {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().unwrap().starts_with("ANOMALYD__"))
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let (daemon_env, job_env) = (env(daemon), env(job));
    assert_eq!(daemon_env, job_env);
    let (_, model) = daemon_env
        .iter()
        .find(|(k, _)| k.ends_with("__MODEL"))
        .expect("the model path is overridden to the volume");
    let file = model
        .strip_prefix(&format!("{}/", models.0))
        .unwrap_or_else(|| panic!("{model} is not on the models' volume {}", models.0));
    let seeded: Vec<&str> = seed["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        seeded.contains(&"-n") && seeded.contains(&models.0.as_str()),
        "the seed must copy onto the volume without overwriting: {seeded:?}"
    );
    assert!(
        seeded.iter().any(|a| a.ends_with(&format!("/{file}"))),
        "{seeded:?} does not seed {file}"
    );

    // The job reads the daemon's ConfigMap, and its command runs (up to the absent broker) with
    // that configuration and the model it names.
    let (config_dir, read_only) = mount(job_pod, job, "configMap", &configmap["metadata"]["name"]);
    assert!(read_only);
    let args: Vec<String> = job["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args[0], "retrain");
    let at = args.iter().position(|a| a == "--config").unwrap();
    assert_eq!(args[at + 1], format!("{config_dir}/anomalyd.toml"));
    let local = dir.path().join("anomalyd.toml");
    std::fs::write(&local, configmap["data"]["anomalyd.toml"].as_str().unwrap()).unwrap();
    let env: Vec<(String, String)> = job_env
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.replace(&models.0, repo().join("models").to_str().unwrap()),
            )
        })
        .collect();
    retrain_reaches_kafka("retrain CronJob", &args, &local, &env);
}

// ---- Dockerfile ----------------------------------------------------------------------------------

/// What every image's Dockerfile must do: a non-root last stage, COPY only what exists and
/// its `<name>.dockerignore` lets through, and pass hadolint. Returns its text.
fn check_dockerfile(name: &str) -> String {
    let dockerfile = deploy(name);
    let text_ = read(&dockerfile);
    let last = text_.rsplit("\nFROM ").next().unwrap();
    let user = last
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .unwrap_or_else(|| panic!("{name}: the last stage sets no USER"));
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()) && !user.starts_with("0:"),
        "{name}: the image runs as root"
    );
    let ignore = read(&deploy(&format!("{name}.dockerignore")));
    // A source may name a build argument (`COPY ${PREBUILT} …`): its default is checked.
    let defaults: Vec<(String, &str)> = text_
        .lines()
        .filter_map(|l| l.strip_prefix("ARG ")?.split_once('='))
        .map(|(k, v)| (format!("${{{k}}}"), v))
        .collect();
    for line in text_.lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        for src in &words[..words.len() - 1] {
            let src = &defaults
                .iter()
                .fold(src.to_string(), |s, (k, v)| s.replace(k, v));
            if let Some((dir, pattern)) = src.split_once("/*") {
                let n = std::fs::read_dir(repo().join(dir))
                    .unwrap()
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .ends_with(pattern)
                    })
                    .count();
                assert!(n > 0, "{name}: COPY {src} matches nothing");
            } else if !src.starts_with("target/") {
                // (target/…: a build product, there once built)
                assert!(
                    repo().join(src).exists(),
                    "{name}: COPY {src}: no such path"
                );
            }
            let allowed = ignore.lines().any(|l| {
                l.strip_prefix('!')
                    .is_some_and(|a| a.trim_end_matches('/') == src.trim_end_matches('/'))
            });
            assert!(allowed, "{name}.dockerignore excludes {src}");
        }
    }
    if let Some(t) = tools("Dockerfile lint", &[venv_bin("hadolint").to_str().unwrap()]) {
        let o = run(Command::new(&t[0]).arg("--no-color").arg(&dockerfile));
        assert!(o.status.success(), "hadolint {name}:\n{}", text(&o));
    }
    text_
}

#[test]
fn dockerfile_passes_hadolint_and_copies_what_exists() {
    let text_ = check_dockerfile("Dockerfile");
    // Multi-stage: the runtime stage takes the binary and the models from the stage that
    // BINARY_FROM names, and both candidates lay the files out alike.
    let stages: Vec<&str> = text_.split("\nFROM ").skip(1).collect();
    assert!(stages.len() >= 2, "not a multi-stage build");
    assert!(stages
        .last()
        .unwrap()
        .contains("COPY --from=binary /out/ /"));
    for stage in ["build", "prebuilt"] {
        let body = stages
            .iter()
            .find(|s| s.lines().next().unwrap().ends_with(&format!(" AS {stage}")))
            .unwrap_or_else(|| panic!("no stage {stage}"));
        assert!(body.contains("/out/usr/local/bin/anomalyd"), "{stage}");
        assert!(body.contains("RUN ./image-layout.sh /out"), "{stage}");
    }
    // The model the Kubernetes configuration names is one the image ships.
    let k8s_config = read(&deploy("k8s/anomalyd.toml"));
    for line in k8s_config
        .lines()
        .filter(|l| l.trim_start().starts_with("model"))
    {
        let path = line.split('"').nth(1).unwrap();
        let name = path
            .strip_prefix("/usr/local/share/anomalyd/models/")
            .unwrap_or_else(|| panic!("{path} is not in the image's model directory"));
        assert!(
            repo().join("models").join(name).is_file(),
            "models/{name} is not in the repository"
        );
    }
}

/// The toolkit's image: `anomalyd-train` as the entry point (what the retrain CronJob runs) and
/// the shipped models where the CronJob's overlay seeds the models' volume from.
#[test]
fn the_toolkits_dockerfile_passes_hadolint_and_ships_the_entry_point_and_models() {
    let text_ = check_dockerfile("Dockerfile.train");
    assert!(text_.contains("ENTRYPOINT [\"anomalyd-train\"]"), "{text_}");
    assert!(
        text_.contains("/usr/local/share/anomalyd/models/"),
        "{text_}"
    );
}

// ---- the container image ------------------------------------------------------------------------

/// podman configured by scripts/container-tools.sh (state under target/podman, local bases).
struct Podman {
    bin: PathBuf,
    state: PathBuf,
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("CONTAINERS_CONF", self.state.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.state.join("storage.conf"))
            .env("TMPDIR", self.state.join("tmp"));
        c
    }

    /// The local base images the script made: (BUILD_BASE, RUNTIME_BASE).
    fn bases(&self) -> (String, String) {
        let env = read(&self.state.join("bases.env"));
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in bases.env"))
                .to_string()
        };
        (get("BUILD_BASE"), get("RUNTIME_BASE"))
    }
}

/// The image users get, built from deploy/Dockerfile with its runtime stage as is: only the base
/// images are local look-alikes made of Debian's packages (no registry is reachable here) and
/// the binary is the one cargo built for these tests, stripped (no Rust toolchain image either;
/// a release build for this one test would add ~9 minutes to the test command). Then run the
/// way the Kubernetes manifests run it: their user, read-only root, dropped capabilities,
/// volumes, arguments and configuration, against a real broker (tansu) on the host.
#[test]
fn the_container_image_builds_and_runs_as_the_kubernetes_manifests_expect() {
    let state = repo().join("target/podman");
    let (Some(t), Some(k)) = (
        tools(
            "container image",
            &["podman", "strip", state.join("bases.env").to_str().unwrap()],
        ),
        kubernetes_tools("container image"),
    ) else {
        return;
    };
    // The build context is the repository (deploy/Dockerfile.dockerignore lets this path in).
    const PREBUILT: &str = "target/image/anomalyd";
    std::fs::create_dir_all(repo().join("target/image")).unwrap();
    ok(Command::new(&t[1])
        .arg("-o")
        .arg(repo().join(PREBUILT))
        .arg(anomalyd_bin()));
    let Some(broker) = tansu::Tansu::start() else {
        return;
    };
    let podman = Podman {
        bin: t[0].clone(),
        state,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const IMAGE: &str = "localhost/anomalyd:test";

    // Build.
    let (build_base, runtime_base) = podman.bases();
    let started = Instant::now();
    ok(podman
        .cmd()
        .args(["build", "--pull=never", "--network=none", "-f"])
        .arg(deploy("Dockerfile"))
        .args(["--build-arg", "BINARY_FROM=prebuilt"])
        .arg(format!("--build-arg=PREBUILT={PREBUILT}"))
        .arg(format!("--build-arg=BUILD_BASE={build_base}"))
        .arg(format!("--build-arg=RUNTIME_BASE={runtime_base}"))
        .args(["-t", IMAGE])
        .arg(repo()));
    let built = started.elapsed();
    let inspect: Value =
        serde_json::from_str(&ok(podman.cmd().args(["image", "inspect", IMAGE]))).unwrap();
    let image = &inspect[0];
    let size = image["Size"].as_u64().unwrap();
    eprintln!(
        "container image: built in {:.1} s, {:.1} MB",
        built.as_secs_f64(),
        size as f64 / 1e6
    );
    assert!(size < 100_000_000, "the image is {size} bytes, over 100 MB");
    let config = &image["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/anomalyd"])
    );
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_path = env
        .iter()
        .find_map(|e| e.strip_prefix("ANOMALYD_CONFIG="))
        .expect("the image sets ANOMALYD_CONFIG");

    // What the manifests ask of it.
    let objects = render_and_validate(&k, "k8s", d);
    let deployment = of_kind(&objects, "Deployment");
    let configmap = of_kind(&objects, "ConfigMap");
    let spec = &deployment["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let pod_sc = &spec["securityContext"];
    let user = format!("{}:{}", pod_sc["runAsUser"], pod_sc["runAsGroup"]);
    assert_eq!(
        config["User"],
        user.as_str(),
        "the image's user is not the pod's"
    );
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(
        config["ExposedPorts"].get(format!("{port}/tcp")).is_some(),
        "the image does not expose {port}: {}",
        config["ExposedPorts"]
    );
    let toml = configmap["data"]["anomalyd.toml"].as_str().unwrap();
    assert!(
        toml.contains(&format!("listen = \"0.0.0.0:{port}\"")),
        "the configuration does not listen on the container's port {port}"
    );
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--config" && w[1] == config_path),
        "the container's arguments {args:?} do not name the image's {config_path}"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    // The volumes: the ConfigMap's files in a directory mounted read-only; the others (emptyDir)
    // as tmpfs; nothing else is writable.
    let mut run_flags: Vec<String> = [
        "run",
        "--rm",
        "--pull=never",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
    ]
    .map(String::from)
    .to_vec();
    run_flags.push(format!("--user={user}"));
    let config_dir = d.join("configmap");
    std::fs::create_dir(&config_dir).unwrap();
    for (file, content) in configmap["data"].as_object().unwrap() {
        std::fs::write(config_dir.join(file), content.as_str().unwrap()).unwrap();
    }
    for m in c["volumeMounts"].as_array().unwrap() {
        let path = m["mountPath"].as_str().unwrap();
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        if volume["configMap"].is_object() {
            run_flags.push(format!("--volume={}:{path}:ro", config_dir.display()));
        } else {
            assert!(volume["emptyDir"].is_object(), "volume {volume}");
            run_flags.push(format!("--tmpfs={path}"));
        }
    }
    // podman's flags (the manifest's, then `extra`), the image, its arguments.
    let podman_run = |extra: &[String], args: &[&str]| {
        let mut cmd = podman.cmd();
        cmd.args(&run_flags).args(extra).arg(IMAGE).args(args);
        cmd
    };
    let offline = ["--network=none".to_string()];

    // Containers removed however the test ends (killing `podman run` would leave them running).
    let name = format!("anomalyd-test-{}", std::process::id());
    let demo_name = format!("{name}-demo");
    struct Removed<'a>(&'a Podman, [&'a str; 2]);
    impl Drop for Removed<'_> {
        fn drop(&mut self) {
            let mut rm = self.0.cmd();
            let _ = rm
                .args(["rm", "--force", "--time", "0"])
                .args(self.1)
                .output();
        }
    }
    let _removed = Removed(&podman, [&name, &demo_name]);

    // The binary, the configurations, the demo; no network at all.
    let version = ok(Command::new(anomalyd_bin()).arg("--version"));
    assert_eq!(ok(&mut podman_run(&offline, &["--version"])), version);
    let example = "/usr/local/share/anomalyd/examples/anomalyd.toml";
    for path in [config_path, example] {
        let checked = ok(&mut podman_run(&offline, &["check", "--config", path]));
        assert!(checked.contains(": valid"), "{checked}");
    }
    let demo = ok(&mut podman_run(
        &offline,
        &["demo", "--hosts", "4", "--ticks", "400", "--rate", "0"],
    ));
    assert!(
        demo.lines()
            .last()
            .unwrap_or("")
            .starts_with("incidents caught "),
        "{demo}"
    );
    // `docker stop` (SIGTERM to PID 1, which has no default signal actions) ends the demo at
    // once, not with the SIGKILL at the end of the stop timeout.
    let mut demo = Proc::spawn(
        "demo-container",
        &mut podman_run(
            &[offline[0].clone(), format!("--name={demo_name}")],
            &["demo", "--listen", "127.0.0.1:0"],
        ),
        d,
    );
    demo.logged_port("metrics:");
    ok(podman.cmd().args(["stop", "--time", "60", &demo_name]));
    let exit = demo.child.wait().unwrap();
    assert_eq!(
        exit.code(),
        Some(143),
        "the demo's exit on SIGTERM\n{}",
        demo.tail()
    );

    // `run` with the manifest's arguments, against tansu on the host (host network). The
    // broker's address, reading from the start and an ephemeral HTTP port are the only settings
    // changed, by environment as the configuration suggests.
    for (topic, partitions) in [
        ("metrics", 3),
        ("anomalyd-alerts", 1),
        ("anomalyd-dead-letters", 1),
    ] {
        broker.create_topic(topic, partitions);
    }
    let extra = [
        "--network=host".to_string(),
        format!("--name={name}"),
        format!("--env=ANOMALYD__KAFKA__BROKERS={}", broker.bootstrap),
        "--env=ANOMALYD__KAFKA__AUTO_OFFSET_RESET=earliest".into(),
        "--env=ANOMALYD__HTTP__LISTEN=127.0.0.1:0".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Proc::spawn("anomalyd-container", &mut podman_run(&extra, &args), d);
    let http = daemon.logged_port("Serving /metrics");
    let pid = ok(podman
        .cmd()
        .args(["inspect", "--format", "{{.State.Pid}}", &name]));
    let status = read(Path::new(&format!("/proc/{}/status", pid.trim())));
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65532"),
        "the daemon does not run as 65532: {uid}"
    );
    for path in ["/healthz", "/readyz"] {
        wait_for(
            &format!("{path} answering 200"),
            Duration::from_secs(60),
            || matches!(http_get(http, path), Ok((200, _))).then_some(()),
            || daemon.tail(),
        );
    }
    produce_fleet(&broker.bootstrap, "metrics");
    let scored = wait_for(
        "records scored in the container",
        Duration::from_secs(120),
        || {
            let (_, body) = http_get(http, "/metrics").ok()?;
            body.lines()
                .find(|l| {
                    l.starts_with("anomalyd_records_total{") && l.contains("outcome=\"scored\"")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .filter(|n| *n >= 1000.0)
        },
        || daemon.tail(),
    );
    eprintln!("container image: {scored} records scored by the container");

    // SIGTERM to the container's PID 1: the daemon drains and exits 0 (Kubernetes' stop).
    ok(podman.cmd().args(["stop", "--time", "30", &name]));
    let exit = daemon.child.wait().unwrap();
    assert!(
        exit.success(),
        "the container exited with {exit}\n{}",
        daemon.tail()
    );
}

// ---- Grafana -------------------------------------------------------------------------------------

/// Every `expr` of the dashboard's panels (rows included), with the panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&read(&deploy("grafana/anomalyd.json")))
        .expect("anomalyd.json is JSON");
    let mut out = Vec::new();
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("?").to_string(), e.into()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dash["panels"], &mut out);
    assert!(
        out.len() >= 10,
        "the dashboard has only {} queries",
        out.len()
    );
    out
}

/// Runs `anomalyd demo` serving /metrics on `port`, scraping it until it exits: the union of the
/// metric names seen.
fn demo_metric_names(dir: &Path) -> BTreeSet<String> {
    let mut demo = Proc::spawn(
        "demo",
        Command::new(anomalyd_bin()).args([
            "demo",
            "--rate",
            "100",
            "--ticks",
            "800",
            "--listen",
            "127.0.0.1:0",
        ]),
        dir,
    );
    let port = demo.logged_port("metrics:");
    let mut names = BTreeSet::new();
    let mut scrapes = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while demo.running() {
        assert!(Instant::now() < deadline, "the demo ran for over 90 s");
        if let Ok((200, body)) = http_get(port, "/metrics") {
            names.extend(exposed_names(&body));
            scrapes += 1;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = demo.child.wait().unwrap();
    assert!(status.success(), "the demo failed\n{}", demo.tail());
    assert!(
        scrapes >= 5,
        "only {scrapes} scrapes of the demo\n{}",
        demo.tail()
    );
    names
}

#[test]
fn grafana_dashboard_queries_only_metrics_the_daemon_exposes() {
    let dir = tempfile::tempdir().unwrap();
    let exposed = demo_metric_names(dir.path());
    // Prometheus adds `up` for every target.
    let known = |n: &str| n == "up" || exposed.contains(n);
    let mut unknown = Vec::new();
    for (title, expr) in dashboard_queries() {
        let names = promql_metric_names(&expr);
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
        for n in names.into_iter().filter(|n| !known(n)) {
            unknown.push(format!("panel {title:?}: {n}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics anomalyd does not expose:\n  {}\nexposed: {exposed:?}",
        unknown.join("\n  ")
    );
    // And OPERATIONS.md explains every one of anomalyd's own metrics.
    let operations = read(&repo().join("docs/OPERATIONS.md"));
    let undocumented: BTreeSet<&str> = exposed
        .iter()
        .filter(|n| n.starts_with("anomalyd_"))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .filter(|family| {
            !operations.contains(&format!("`{family}{{"))
                && !operations.contains(&format!("`{family}`"))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/OPERATIONS.md does not document {undocumented:?}"
    );
}

// ---- end to end: Prometheus → rules → Alertmanager ------------------------------------------------

/// Records the webhook notifications Alertmanager sends: (path, body).
struct Webhook {
    port: u16,
    got: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Webhook {
    fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Some(req) = Webhook::serve(conn) {
                            g.lock().unwrap().push(req);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Webhook {
            port,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn serve(mut conn: TcpStream) -> Option<(String, String)> {
        conn.set_nonblocking(false).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut reader = BufReader::new(conn.try_clone().ok()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).ok()?;
        let path = request_line.split_whitespace().nth(1)?.to_string();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok()?;
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .ok()?;
        Some((path, String::from_utf8_lossy(&body).into_owned()))
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Rewrites lines `<indent>key: …` (the key at the start of the line, after `- ` if any) with
/// `f(indent + "- "?, old value)`; returns the text and how many lines changed.
fn rewrite_yaml_key(text: &str, key: &str, f: impl Fn(&str) -> String) -> (String, usize) {
    let mut n = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let body = l.trim_start();
            let (dash, rest) = match body.strip_prefix("- ") {
                Some(r) => ("- ", r),
                None => ("", body),
            };
            match rest.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
                Some(value) => {
                    n += 1;
                    let indent = &l[..l.len() - body.len()];
                    format!("{indent}{dash}{key}: {}", f(value.trim()))
                }
                None => l.to_string(),
            }
        })
        .collect();
    (out.join("\n") + "\n", n)
}

/// Alerts named `name` in Alertmanager's v2 API.
fn am_alerts(port: u16, name: &str) -> Vec<Value> {
    let filter = urlencode(&format!("alertname=\"{name}\""));
    get_json(port, &format!("/api/v2/alerts?filter={filter}"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Metrics anomalyd registers but exports only after a failure (a counter vector has no series
/// until its first increment), so a healthy run never shows them. Each must still be
/// registered under this name in src/metrics.rs.
const FAILURE_ONLY_METRICS: &[&str] = &[
    "anomalyd_model_load_failures_total",
    "anomalyd_produce_errors_total",
];

/// Produces the demo's fleet (20 hosts, two incidents after a quiet simulated day) and three
/// records that cannot be scored into `topic`, stopping halfway through the last incident so
/// that its episode is still firing; returns that incident's host.
fn produce_fleet(bootstrap: &str, topic: &str) -> String {
    use anomalyd::demo::stream::{host_name, Fleet};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("a Kafka producer");
    let mut fleet = Fleet::new(20, 600, 2, 7);
    let last = fleet
        .incidents()
        .iter()
        .max_by_key(|i| i.start)
        .expect("the fleet has incidents")
        .clone();
    assert!(last.end - last.start >= 20, "{last:?} is too short");
    let ticks = last.start + (last.end - last.start) / 2;
    let send = |key: &str, payload: &str| loop {
        match producer.send(BaseRecord::to(topic).key(key).payload(payload)) {
            Ok(()) => break,
            Err((e, _)) => {
                // Queue full: let deliveries drain.
                assert!(
                    matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ),
                    "producing to {topic}: {e}"
                );
                producer.poll(Duration::from_millis(50));
            }
        }
    };
    for tick in 0..ticks {
        for row in fleet.next_tick() {
            send(&row.key(), &row.to_json());
        }
        if tick == 200 {
            for bad in [
                "this is not JSON",
                r#"{"host":"host-05","ts":"x","cpu_pct":"high","requests_per_s":1,"latency_ms":1,"net_out_mbps":1}"#,
                r#"{"host":"host-06","cpu_pct":50}"#,
            ] {
                send("bad", bad);
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("every record delivered to the in-process Kafka");
    host_name(last.host)
}

/// The whole alerting path, from nothing to a paged anomaly: `anomalyd run` consumes a fleet with
/// incidents and a few undecodable records from Kafka (librdkafka's in-process mock cluster),
/// and pushes its anomaly episodes to a real Alertmanager routed by the shipped example; a real
/// Prometheus scrapes it and evaluates the shipped rules, whose alerts reach that Alertmanager
/// too; Alertmanager notifies the webhook receivers of the example's routes.
#[test]
fn prometheus_evaluates_the_shipped_rules_and_alerts_reach_alertmanager() {
    let Some(t) = tools(
        "end to end with Prometheus and Alertmanager",
        &["prometheus", "alertmanager|prometheus-alertmanager"],
    ) else {
        return;
    };
    let (prometheus, alertmanager) = (&t[0], &t[1]);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Alertmanager with the shipped routing, its receivers pointed at a local webhook, and a
    // short group_wait.
    let webhook = Webhook::start();
    let shipped = read(&deploy("alertmanager/alertmanager.yml"));
    let (am_config, urls) = rewrite_yaml_key(&shipped, "url", |old| {
        let url = old.trim_matches('"');
        let path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or("/");
        format!("\"http://127.0.0.1:{}{path}\"", webhook.port)
    });
    assert!(urls >= 2, "no receiver url to rewrite in alertmanager.yml");
    let (am_config, waits) = rewrite_yaml_key(&am_config, "group_wait", |_| "1s".into());
    assert!(waits >= 1, "no group_wait in alertmanager.yml");
    std::fs::write(d.join("alertmanager.yml"), am_config).unwrap();
    std::fs::create_dir(d.join("am-data")).unwrap();
    let (am, am_port) = Proc::spawn_listening("alertmanager", d, |port| {
        let mut cmd = Command::new(alertmanager);
        cmd.arg(format!(
            "--config.file={}",
            d.join("alertmanager.yml").display()
        ))
        .arg(format!("--storage.path={}", d.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .arg("--log.level=warn");
        cmd
    });

    // Kafka, and the daemon pushing to Alertmanager.
    let kafka = anomalyd::demo::MockKafka::start(&[
        ("metrics", 4),
        ("anomalyd-alerts", 1),
        ("anomalyd-dead-letters", 1),
        ("deploy-e2e.fleet.state", 4),
    ])
    .expect("the in-process Kafka cluster");
    std::fs::write(
        d.join("anomalyd.toml"),
        format!(
            r#"
[kafka]
brokers = "{}"
group_id = "deploy-e2e"
[http]
listen = "127.0.0.1:0"
[log]
level = "warn,anomalyd::daemon=info,librdkafka=error"
[runtime]
shutdown_grace = "10s"
[pipelines.fleet]
topics = ["metrics"]
model = "{}"
key_field = "host"
timestamp_field = "ts"
[pipelines.fleet.alertmanager]
url = "http://127.0.0.1:{am_port}"
"#,
            kafka.bootstrap,
            repo().join("models/demo-dense.onnx").display()
        ),
    )
    .unwrap();
    let mut daemon = Proc::spawn(
        "anomalyd",
        Command::new(anomalyd_bin())
            .args(["run", "--config"])
            .arg(d.join("anomalyd.toml")),
        d,
    );
    let daemon_port = daemon.logged_port("Serving /metrics");

    // Prometheus with the shipped rules, `for:` shortened to 2 s, scraping and evaluating every
    // second.
    let (rules, fors) = rewrite_yaml_key(&read(&deploy("prometheus/rules.yml")), "for", |_| {
        "2s".into()
    });
    assert!(fors >= 3, "rules.yml has only {fors} `for:`");
    std::fs::write(d.join("rules.yml"), rules).unwrap();
    std::fs::write(
        d.join("prometheus.yml"),
        format!(
            r#"
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["127.0.0.1:{am_port}"]
scrape_configs:
  - job_name: anomalyd
    static_configs:
      - targets: ["127.0.0.1:{daemon_port}"]
"#
        ),
    )
    .unwrap();
    std::fs::create_dir(d.join("tsdb")).unwrap();
    let (prom, prom_port) = Proc::spawn_listening("prometheus", d, |port| {
        let mut cmd = Command::new(prometheus);
        cmd.current_dir(d)
            .arg(format!(
                "--config.file={}",
                d.join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        cmd
    });
    let daemon_log = daemon.log.clone();
    let logs = || {
        let metrics = http_get(daemon_port, "/metrics")
            .map(|(_, body)| {
                body.lines()
                    .filter(|l| l.starts_with("anomalyd_") && !l.contains("_bucket"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| format!("(no /metrics: {e})"));
        format!(
            "{}\n{}\n{}\n--- anomalyd's metrics ---\n{metrics}",
            prom.tail(),
            am.tail(),
            tail("anomalyd", &daemon_log)
        )
    };

    wait_for(
        "Alertmanager, Prometheus and anomalyd to be ready",
        Duration::from_secs(60),
        || {
            (matches!(http_get(am_port, "/-/ready"), Ok((200, _)))
                && matches!(http_get(prom_port, "/-/ready"), Ok((200, _)))
                && matches!(http_get(daemon_port, "/readyz"), Ok((200, _))))
            .then_some(())
        },
        logs,
    );
    let firing_host = produce_fleet(&kafka.bootstrap, "metrics");

    // 1. The anomalies: the daemon pushes each episode; Alertmanager routes them to the data's
    //    owners (critical ones to their pager) and notifies that receiver.
    let anomaly = wait_for(
        &format!(
            "the AnomalyDetected alert of {firing_host}, whose incident lasts, in Alertmanager"
        ),
        Duration::from_secs(60),
        || {
            am_alerts(am_port, "AnomalyDetected")
                .into_iter()
                .find(|a| a["status"]["state"] == "active" && a["labels"]["key"] == *firing_host)
        },
        || {
            format!(
                "Alertmanager has {:?}\n{}",
                am_alerts(am_port, "AnomalyDetected"),
                logs()
            )
        },
    );
    let labels = &anomaly["labels"];
    assert_eq!(labels["pipeline"], "fleet", "{anomaly}");
    assert_eq!(labels["model"], "demo-dense", "{anomaly}");
    let severity = labels["severity"].as_str().unwrap_or("");
    let receiver = match severity {
        "critical" => "data-owners-page",
        "warning" => "data-owners",
        other => panic!("AnomalyDetected with severity {other:?}: {anomaly}"),
    };
    for a in ["summary", "score", "threshold", "top_features"] {
        assert!(
            !anomaly["annotations"][a].as_str().unwrap_or("").is_empty(),
            "AnomalyDetected without the annotation {a}: {anomaly}"
        );
    }
    assert_eq!(anomaly["receivers"][0]["name"], receiver, "{anomaly}");
    let key = labels["key"].as_str().unwrap().to_string();
    wait_for(
        &format!("the notification of {key}'s anomaly at the {receiver} webhook"),
        Duration::from_secs(30),
        || {
            webhook.got.lock().unwrap().iter().find_map(|(path, body)| {
                (path == &format!("/hooks/{receiver}")
                    && body.contains("AnomalyDetected")
                    && body.contains(&format!("\"key\":\"{key}\"")))
                .then_some(())
            })
        },
        || format!("webhook got {:?}\n{}", webhook.got.lock().unwrap(), logs()),
    );

    // 2. The dead letters (3 records, each reason a new counter series) fire the shipped
    //    AnomalydDeadLetters, routed to the operators' receiver.
    let alert = wait_for(
        "AnomalydDeadLetters in Alertmanager",
        Duration::from_secs(60),
        || {
            am_alerts(am_port, "AnomalydDeadLetters")
                .into_iter()
                .find(|a| a["status"]["state"] == "active")
        },
        || {
            format!(
                "Prometheus alerts: {}\n{}",
                get_json(prom_port, "/api/v1/alerts").unwrap_or_default(),
                logs()
            )
        },
    );
    let labels = &alert["labels"];
    assert_eq!(labels["pipeline"], "fleet", "{alert}");
    assert_eq!(labels["job"], "anomalyd", "{alert}");
    assert_eq!(labels["severity"], "warning", "{alert}");
    assert_eq!(labels["service"], "anomalyd", "{alert}");
    let description = alert["annotations"]["description"].as_str().unwrap_or("");
    assert!(
        ["About 1 ", "About 2 ", "About 3 "]
            .iter()
            .any(|p| description.starts_with(p))
            && description.contains("records of pipeline fleet could not be scored"),
        "{alert}"
    );
    assert_eq!(
        alert["receivers"][0]["name"], "anomalyd-operators",
        "{alert}"
    );
    wait_for(
        "the dead-letter notification at the anomalyd-operators webhook",
        Duration::from_secs(30),
        || {
            webhook.got.lock().unwrap().iter().find_map(|(path, body)| {
                (path == "/hooks/anomalyd-operators" && body.contains("AnomalydDeadLetters"))
                    .then_some(())
            })
        },
        || format!("webhook got {:?}\n{}", webhook.got.lock().unwrap(), logs()),
    );

    // 3. Every rule evaluates without error, on metrics the daemon exposes (Prometheus has
    //    scraped the consumer lag once librdkafka's statistics, every 5 s, have reported it).
    wait_for(
        "Prometheus to have scraped anomalyd_consumer_lag",
        Duration::from_secs(30),
        || {
            get_json(prom_port, "/api/v1/query?query=anomalyd_consumer_lag")
                .filter(|v| !v["data"]["result"].as_array().is_none_or(|r| r.is_empty()))
        },
        logs,
    );
    let rules = get_json(prom_port, "/api/v1/rules").expect("GET /api/v1/rules");
    let names: BTreeSet<String> = get_json(prom_port, "/api/v1/label/__name__/values")
        .expect("GET /api/v1/label/__name__/values")["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str().map(String::from))
        .collect();
    let metrics_rs = read(&repo().join("src/metrics.rs"));
    for m in FAILURE_ONLY_METRICS {
        assert!(
            metrics_rs.contains(&format!("\"{m}\"")),
            "{m} is no longer registered in src/metrics.rs"
        );
    }
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            evaluated += 1;
            assert_eq!(rule["health"], "ok", "rule {} failed: {rule}", rule["name"]);
            for m in promql_metric_names(rule["query"].as_str().unwrap()) {
                assert!(
                    names.contains(&m) || FAILURE_ONLY_METRICS.contains(&m.as_str()),
                    "rule {} uses {m}, which the daemon does not expose (exposed: {names:?})",
                    rule["name"]
                );
            }
        }
    }
    assert!(evaluated >= 9, "only {evaluated} rules loaded: {rules}");

    // 4. Every dashboard query is valid PromQL with data.
    for (title, expr) in dashboard_queries() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", ".+")
            .replace("$pipeline", ".+");
        let v = get_json(
            prom_port,
            &format!("/api/v1/query?query={}", urlencode(&expr)),
        )
        .unwrap_or_else(|| panic!("panel {title:?}: Prometheus rejected {expr}"));
        assert_eq!(v["status"], "success", "panel {title:?}: {v}");
        assert!(
            !v["data"]["result"].as_array().unwrap().is_empty(),
            "panel {title:?}: no data for {expr}"
        );
    }

    // 5. When the daemon stops (SIGTERM: drain, commit, exit 0), AnomalydDown pages the operators.
    ok(Command::new("sh")
        .args(["-c", "kill -TERM \"$1\"", "sh"])
        .arg(daemon.child.id().to_string()));
    let status = wait_for(
        "anomalyd to exit after SIGTERM",
        Duration::from_secs(30),
        || daemon.child.try_wait().ok().flatten(),
        logs,
    );
    assert!(
        status.success(),
        "anomalyd exited with {status}\n{}",
        logs()
    );
    let down = wait_for(
        "AnomalydDown in Alertmanager",
        Duration::from_secs(60),
        || {
            am_alerts(am_port, "AnomalydDown")
                .into_iter()
                .find(|a| a["status"]["state"] == "active")
        },
        logs,
    );
    assert_eq!(down["labels"]["severity"], "critical", "{down}");
    assert_eq!(
        down["labels"]["instance"],
        format!("127.0.0.1:{daemon_port}"),
        "{down}"
    );
    assert_eq!(
        down["receivers"][0]["name"], "anomalyd-operators-page",
        "{down}"
    );
    eprintln!(
        "end to end: every alert delivered in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
