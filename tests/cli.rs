//! The `anomalyd` binary end to end: help, check, inspect, score and the demo.

mod common;

use std::process::{Command, Output};

use common::*;

fn anomalyd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anomalyd"))
        .args(args)
        .output()
        .expect("run anomalyd")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_command_and_each_explains_itself() {
    let (out, _) = text(&anomalyd(&["--help"]));
    for cmd in ["run", "demo", "score", "check", "inspect"] {
        assert!(
            out.contains(&format!("  {cmd} ")),
            "--help lacks {cmd}:\n{out}"
        );
        let o = anomalyd(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help failed");
        assert!(text(&o).0.len() > 300, "{cmd} --help says too little");
    }
}

#[test]
fn the_example_config_is_valid() {
    let o = anomalyd(&[
        "check",
        "-c",
        repo()
            .join("deploy/anomalyd.example.toml")
            .to_str()
            .unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("pipeline fleet"), "{out}");
}

#[test]
fn check_reports_every_problem_at_once_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
brokerz = "typo"
[pipelines.good]
topics = ["a"]
model = "{model}"
key_field = "host"
[pipelines.good.field_map]
no_such_feature = "x"
[pipelines.broken]
topics = ["b"]
model = "missing.onnx"
[pipelines.broken.threshold]
method = "quantile"
q = 2.0
"#,
            model = demo_model().display()
        ),
    )
    .unwrap();
    let o = anomalyd(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    let (_, err) = text(&o);
    assert!(err.contains("kafka.brokerz: unknown key"), "{err}");

    // Without the typo, the semantic problems are all listed together.
    let fixed = std::fs::read_to_string(&path)
        .unwrap()
        .replace("brokerz", "brokers");
    std::fs::write(&path, fixed).unwrap();
    let o = anomalyd(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    let (_, err) = text(&o);
    assert!(
        err.contains("pipelines.broken.model: no model file"),
        "{err}"
    );
    assert!(
        err.contains("pipelines.broken.threshold: q must be"),
        "{err}"
    );

    // A bad model is named by its file, and a field map naming no feature by its field.
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"not a model").unwrap();
    let text2 = std::fs::read_to_string(&path)
        .unwrap()
        .replace("missing.onnx", garbage.to_str().unwrap())
        .replace("q = 2.0", "q = 0.99");
    std::fs::write(&path, text2).unwrap();
    let o = anomalyd(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    let (_, err) = text(&o);
    assert!(
        err.contains(&format!("model {}", garbage.display())),
        "{err}"
    );
    assert!(err.contains("pipelines.good.field_map"), "{err}");

    // `score` builds its detector the same way: the field map is refused there too.
    let o = anomalyd(&[
        "score",
        "-c",
        path.to_str().unwrap(),
        "--pipeline",
        "good",
        "--input",
        "unread.csv",
    ]);
    assert_eq!(o.status.code(), Some(64));
    let (_, err) = text(&o);
    assert!(
        err.contains("pipelines.good.field_map: [\"no_such_feature\"] are not features"),
        "{err}"
    );
}

#[test]
fn inspect_prints_the_shipped_models_contract() {
    let o = anomalyd(&["inspect", demo_model().to_str().unwrap(), "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "dense");
    assert_eq!(v["window"], 1);
    assert_eq!(
        v["features"],
        serde_json::json!(["cpu_pct", "requests_per_s", "latency_ms", "net_out_mbps"])
    );
    assert!(v["calibration"]["sample"].as_array().unwrap().len() >= 100);
    let human = text(&anomalyd(&["inspect", demo_model().to_str().unwrap()])).0;
    assert!(human.contains("kind         dense"), "{human}");
}

#[test]
fn score_replays_a_file_one_row_per_input_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fleet.csv");
    let o = anomalyd(&[
        "demo",
        "--write-training-data",
        data.to_str().unwrap(),
        "--hosts",
        "3",
        "--ticks",
        "200",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    // Broken rows at the end: a NaN, an unclosed quote, bytes that are not UTF-8, a line over
    // max_record_bytes; then a good row, which must still be scored.
    let good = std::fs::read_to_string(&data).unwrap();
    let mut csv = good.clone().into_bytes();
    csv.extend_from_slice(b"host-01,2026-02-01T00:00:00Z,NaN,1,1,1\n");
    csv.extend_from_slice(b"host-01,\"2026-02-01T00:01:00Z,1,1,1,1\n");
    csv.extend_from_slice(b"host-01,2026-02-01T00:02:00Z,\xff,1,1,1\n");
    csv.extend_from_slice(format!("host-01,{}\n", "9".repeat(20_000)).as_bytes());
    let last_good = good.lines().last().unwrap();
    csv.extend_from_slice(format!("{last_good}\n").as_bytes());
    std::fs::write(&data, &csv).unwrap();
    let input_rows = csv.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() - 1;

    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pipelines.fleet]\ntopics = [\"metrics\"]\nmodel = \"{}\"\nkey_field = \"host\"\nmax_record_bytes = 10000\n",
            demo_model().display()
        ),
    )
    .unwrap();
    let out = dir.path().join("scores.csv");
    let o = anomalyd(&[
        "score",
        "-c",
        cfg.to_str().unwrap(),
        "--pipeline",
        "fleet",
        "--input",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("of {input_rows} rows")), "{err}");
    let mut reader = csv::Reader::from_path(&out).unwrap();
    let header = reader.headers().unwrap().clone();
    assert_eq!(
        header.iter().collect::<Vec<_>>(),
        [
            "key",
            "timestamp",
            "score",
            "threshold",
            "anomaly_score",
            "is_anomaly",
            "top_features",
            "event",
            "error"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), input_rows);
    let errors: Vec<&str> = rows[rows.len() - 5..]
        .iter()
        .map(|r| r.get(8).unwrap())
        .collect();
    assert!(errors[0].starts_with("non_finite"), "{errors:?}");
    assert!(errors[1].starts_with("malformed_csv"), "{errors:?}");
    assert!(errors[2].starts_with("malformed_csv"), "{errors:?}");
    assert!(errors[3].starts_with("too_large"), "{errors:?}");
    assert_eq!(errors[4], "", "the row after them is scored");
    // A row that could be split into cells says whose record it was; a broken line cannot.
    let whose = |r: &csv::StringRecord| (r[0].to_string(), r[1].to_string());
    let nan_row = &rows[rows.len() - 5];
    assert_eq!(
        whose(nan_row),
        ("host-01".into(), "2026-02-01T00:00:00Z".into())
    );
    assert_eq!(whose(&rows[rows.len() - 4]), (String::new(), String::new()));
    let anomalous = rows.iter().filter(|r| &r[5] == "true").count();
    // Normal data, warm-started thresholds at q = 0.999: very few points over the threshold.
    assert!(
        anomalous * 100 < rows.len(),
        "{anomalous} of {} normal rows flagged",
        rows.len()
    );

    // The same through stdin and NDJSON out.
    let o = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
        .args([
            "score",
            "-c",
            cfg.to_str().unwrap(),
            "--pipeline",
            "fleet",
            "--input",
            "-",
            "--output-format",
            "ndjson",
        ])
        .stdin(std::fs::File::open(&data).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), input_rows);
    assert_eq!(lines[0]["key"], rows[0][0].to_string());
    let first_csv: f64 = rows[0][2].parse().unwrap();
    assert!((lines[0]["score"].as_f64().unwrap() - first_csv).abs() < 1e-9);
}

#[test]
fn the_demo_catches_its_injected_incidents() {
    let o = anomalyd(&["demo", "--rate", "0", "--listen", "127.0.0.1:0"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "demo failed:\n{out}\n{err}");
    let last = out.lines().last().unwrap_or_default();
    // "incidents caught X/Y, false alarms Z"
    let nums: Vec<usize> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(last.starts_with("incidents caught"), "{out}");
    let (caught, total, false_alarms) = (nums[0], nums[1], nums[2]);
    assert!(total >= 8, "{last}");
    assert!(caught * 4 >= total * 3, "caught too few: {last}\n{out}");
    assert!(false_alarms <= 3, "too many false alarms: {last}\n{out}");
    assert!(out.contains("FIRING") && out.contains("resolved"), "{out}");
}

/// Issue 10, finding 13: `anomalyd inspect MODEL | head` panicked on the broken pipe. A
/// command's output into a pipe whose reader is gone ends quietly, with success.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let model = repo().join("models/demo-dense.onnx");
    let config = repo().join("deploy/anomalyd.example.toml");
    for args in [
        vec!["inspect", model.to_str().unwrap()],
        vec!["inspect", "--json", model.to_str().unwrap()],
        vec!["check", "-c", config.to_str().unwrap()],
        vec!["demo", "--rate", "0", "--ticks", "60"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
            .args(&args)
            .stdout(writer)
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {:?}\n{err}", o.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Issue 10, finding 13: a SIGTERM that arrived while the daemon started (its models loading)
/// killed it with an empty log. The handlers now come first: the signal is logged and drains.
#[test]
fn a_signal_during_start_up_is_logged_and_stops_cleanly() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:9\"\ngroup_id = \"start-up\"\n[http]\nlisten = \"\"\n\
             [pipelines.fleet]\ntopics = [\"metrics\"]\nmodel = \"{}\"\nkey_field = \"host\"\n",
            demo_model().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
        .args(["run", "-c", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("Starting anomalyd") {
        assert!(
            err.read_line(&mut log).unwrap() > 0,
            "no start-up line:\n{log}"
        );
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    err.read_to_string(&mut log).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(log.contains("Shutdown requested"), "{log}");
}

/// Issue 16, items 1–3 and 6: a user's own file (semicolons, a `datetime` column written as
/// people write it, no key column) scores with nothing but the model: no configuration, one
/// series named after the file, timestamps carried as written.
#[test]
fn score_needs_only_a_model_and_a_file_of_one_series() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pump-7.csv");
    let mut csv = String::from("datetime;cpu_pct;requests_per_s;latency_ms;net_out_mbps\n");
    for i in 0..50 {
        csv.push_str(&format!(
            "2020-03-09 10:{:02}:33;{};{};{};{}\n",
            i,
            50.0 + (i % 5) as f64,
            300.0,
            35.0,
            30.0
        ));
    }
    std::fs::write(&data, &csv).unwrap();
    let model = demo_model();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let o = anomalyd(&[
        "score",
        "--model",
        m,
        "--input",
        d,
        "--timestamp-field",
        "datetime",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 50, "{out}");
    assert!(
        rows.iter().all(|r| r[0] == "pump-7"),
        "one series, named after the file"
    );
    assert_eq!(rows[14][1], "2020-03-09 10:14:33");
    assert!(
        rows.iter().all(|r| !r[2].is_empty()),
        "every row scored: {out}"
    );

    // A key field named but absent: the error says how the header was read.
    let o = anomalyd(&["score", "--model", m, "--input", d, "--key-field", "host"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("no key column `host`") && err.contains("semicolon-separated"),
        "{err}"
    );
    assert!(err.contains("datetime, cpu_pct"), "{err}");
    // Neither a model nor a configuration: clap says what is needed.
    let o = anomalyd(&["score", "--input", d]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--model"), "{}", text(&o).1);
}
