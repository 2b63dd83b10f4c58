//! The command line: `run`, `demo`, `score`, `check`, `inspect`. The only place `anyhow` is used.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon;
use crate::model::Model;
use crate::replay::{self, Format};

/// Exit code for a bad configuration or model (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "anomalyd",
    version,
    about = "Streaming anomaly detection: Kafka records scored by autoencoders (ONNX), judged against adaptive per-entity thresholds, alerted on.",
    long_about = "Streaming anomaly detection. Records arrive on Kafka topics; each pipeline scores them with an autoencoder exported to ONNX (reconstruction error), judges each score against an adaptive threshold per entity (host, sensor…), and emits alert events, Prometheus metrics and, optionally, scores and denoised values.\n\nStart with `anomalyd demo`: it runs everything in-process on a generated fleet of hosts with injected incidents."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: consume the configured topics until SIGTERM/SIGINT, then drain and commit.
    #[command(
        long_about = "Run the daemon with a configuration file (see docs/CONFIG.md; every key can be overridden by an environment variable ANOMALYD__SECTION__KEY).\n\nOn SIGTERM or SIGINT it stops consuming, finishes the records in flight, commits their offsets and exits 0 within runtime.shutdown_grace. Offsets are committed only once a record's outputs are acknowledged (at-least-once). Exits 64 if the configuration or a model is invalid."
    )]
    Run {
        /// The configuration file (TOML).
        #[arg(short, long, env = "ANOMALYD_CONFIG")]
        config: PathBuf,
    },
    /// Run the whole pipeline on a generated fleet with injected incidents, in-process.
    #[command(
        long_about = "Run the embedded demo: an in-process Kafka cluster, a generated stream of 20 hosts × 4 correlated metrics (a daily cycle plus noise) with injected incidents (latency spikes, a CPU level shift, a stuck sensor, a broken correlation), the real pipeline with the shipped dense autoencoder, live alerts as they fire and resolve, and /metrics served while it runs. Ends with a summary whose last line reads `incidents caught X/Y, false alarms Z`."
    )]
    Demo(crate::demo::DemoArgs),
    /// Score a file offline (CSV or NDJSON) through the same code as the daemon.
    #[command(
        long_about = "Score a file offline through the daemon's own decode → window → infer → threshold → alert code, with the settings of a pipeline of a configuration (--config), or the defaults around a model (--model: no configuration needed). Writes one row per input row (CSV or NDJSON, by the output's extension): key, timestamp, score (reconstruction error), threshold, anomaly_score in [0, 1], is_anomaly, top features, alert event, and the error for rows that could not be scored (with their key and timestamp when those could be read)."
    )]
    Score(ScoreArgs),
    /// Validate a configuration and load every model; report every problem at once.
    #[command(
        long_about = "Validate a configuration file (with its environment overrides) and load every model it names, checking each against its pipeline. Reports every problem at once. Exits 0 when valid, 64 when not."
    )]
    Check {
        /// The configuration file (TOML).
        #[arg(short, long, env = "ANOMALYD_CONFIG")]
        config: PathBuf,
    },
    /// Print a model's contract (kind, features, window, shapes, calibration, version).
    #[command(
        long_about = "Print what anomalyd reads from an ONNX model: kind, features, window, input and output shapes, calibration summary, version and training data. With --verify, also run the model in tract on the inputs of a samples file and compare its outputs with the expected ones (exit 1 if any differs by more than --tolerance)."
    )]
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "model"])))]
struct ScoreArgs {
    /// The model to score with, all other settings defaulted (no configuration file needed).
    #[arg(short, long, conflicts_with_all = ["config", "pipeline"])]
    model: Option<PathBuf>,
    /// A configuration file (TOML) whose pipeline's model, fields and threshold settings to use.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// The pipeline of --config to use; needed only when the file has several.
    #[arg(short, long, requires = "config")]
    pipeline: Option<String>,
    /// With --model: the field naming each record's entity. Without it, records (or CSV columns)
    /// without a `key` field are one series, named after the input file.
    #[arg(long, requires = "model")]
    key_field: Option<String>,
    /// With --model: the field holding each record's timestamp (text, carried as it is; default `ts`).
    #[arg(long, requires = "model")]
    timestamp_field: Option<String>,
    /// Input file, or `-` for standard input. CSV's delimiter (comma, semicolon, tab or pipe) is
    /// read from its header.
    #[arg(short, long)]
    input: String,
    /// Output file (`.csv` or `.ndjson`); standard output when absent.
    #[arg(short, long)]
    output: Option<String>,
    /// Input format, when the input's extension does not say (standard input: guessed from the first byte).
    #[arg(long, value_parser = parse_format)]
    input_format: Option<Format>,
    /// Output format, when the output's extension does not say (default: CSV).
    #[arg(long, value_parser = parse_format)]
    output_format: Option<Format>,
    /// From input row ROW on (0-based, as the output's rows), score with MODEL: the daemon's
    /// hot reload, mid-file (each key keeps its window and alert state; its threshold restarts
    /// from MODEL's calibration). Repeat for a schedule, as a retraining loop would swap models.
    #[arg(long, value_name = "ROW=MODEL", value_parser = parse_swap)]
    swap: Vec<(u64, PathBuf)>,
    /// From input row ROW on, score MODEL in the shadow of the serving model and promote or
    /// refuse it by the pipeline's [promotion] rule, as the daemon does with a candidate file
    /// (a refusal is said on stderr and counted; MODEL never alerts while in the shadow).
    #[arg(long, value_name = "ROW=MODEL", value_parser = parse_swap)]
    candidate: Vec<(u64, PathBuf)>,
}

fn parse_swap(s: &str) -> Result<(u64, PathBuf), String> {
    let (row, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ROW=MODEL, found {s:?}"))?;
    let row = row
        .trim()
        .parse()
        .map_err(|_| format!("ROW must be a row number (0, 1, ...), found {row:?}"))?;
    Ok((row, PathBuf::from(path)))
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The ONNX model file.
    model: PathBuf,
    /// Print the contract as JSON.
    #[arg(long)]
    json: bool,
    /// A samples file `{"input": [...], "error": [...], "reconstruction": [...]}` (nested lists,
    /// batch first) to run through tract and compare.
    #[arg(long, value_name = "SAMPLES.json")]
    verify: Option<PathBuf>,
    /// Largest accepted difference for --verify: absolute for `error`, relative to
    /// max(1, |expected|) for `reconstruction` (raw units, where float32 steps exceed 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s.to_ascii_lowercase().as_str() {
        "csv" => Ok(Format::Csv),
        "ndjson" | "jsonl" | "json" => Ok(Format::Ndjson),
        _ => Err(format!("unknown format {s:?} (csv or ndjson)")),
    }
}

/// The entry point of the binary.
pub fn main() -> ExitCode {
    crate::model::keep_freed_buffers();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => return run(&config),
        Command::Check { config } => return check(&config),
        Command::Demo(args) => crate::demo::main(args),
        Command::Score(args) => score(args),
        Command::Inspect(args) => inspect(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path, None).map_err(|e| {
        eprintln!("{}: invalid configuration:", path.display());
        for p in &e.problems {
            eprintln!("  - {p}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn run(path: &Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::log::init(config.log.format, &config.log.level);
    let rt = match daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Before anything slow: from here a SIGTERM is this process's to handle (and to log),
        // even one that arrives while the models load.
        let signals = Signals::install();
        tracing::info!(
            pipelines = config.pipelines.len(),
            "Starting anomalyd {}: loading models.",
            env!("CARGO_PKG_VERSION")
        );
        let shutdown = CancellationToken::new();
        let daemon = match daemon::Daemon::start(config, shutdown.clone()).await {
            Ok(d) => d,
            Err(daemon::DaemonError::Models(problems)) => {
                for p in problems {
                    tracing::error!("{p}");
                }
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        match signals {
            Ok(s) => drop(tokio::spawn(s.watch(shutdown.clone(), daemon.reload_handle()))),
            Err(e) => tracing::error!("Cannot install signal handlers ({e}); stop the daemon with SIGKILL."),
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let watchdog = sd_notify::watchdog_enabled().map(|timeout| {
            // Twice per watchdog period, as systemd recommends, so one late tick is not fatal.
            let every = timeout / 2;
            tracing::info!(every_ms = every.as_millis() as u64, "The systemd watchdog is on: pinging it twice per period.");
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                        _ = stop.cancelled() => return,
                    }
                }
            })
        });
        tracing::info!("anomalyd {} is running.", env!("CARGO_PKG_VERSION"));
        let result = daemon.wait().await;
        if let Some(w) = watchdog {
            w.abort();
        }
        match result {
            Ok(()) => {
                tracing::info!("anomalyd stopped cleanly.");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The daemon's signal handlers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Cancels `shutdown` on SIGTERM or SIGINT (a second one exits at once); SIGHUP makes every
    /// pipeline check its model file for a new version.
    async fn watch(
        mut self,
        shutdown: CancellationToken,
        reload: std::sync::Arc<tokio::sync::Notify>,
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: checking model files for new versions.");
                    reload.notify_waiters();
                }
            }
        }
        tracing::info!("Shutdown requested: draining (send the signal again to exit at once).");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        shutdown.cancel();
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        tracing::warn!(
            "Second signal: exiting without draining; uncommitted records will be processed again."
        );
        std::process::exit(130);
    }
}

/// Writes a command's output. A reader that went away (`anomalyd inspect m.onnx | head`) ends
/// the output quietly: a broken pipe is not the command's failure.
fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn check(path: &Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match daemon::load_models(&config) {
        Ok(models) => {
            let mut text = format!("{}: valid\n", path.display());
            for (name, m) in &models {
                let c = &m.contract;
                text += &format!(
                    "  pipeline {name}: topics {:?} → model {} ({} {}, {} features, window {})\n",
                    config.pipelines[name].topics,
                    m.path.display(),
                    format!("{:?}", c.kind).to_lowercase(),
                    c.version,
                    c.features.len(),
                    c.window
                );
            }
            match print_out(&text) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(problems) => {
            eprintln!("{}: invalid configuration:", path.display());
            for p in problems {
                eprintln!("  - {p}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// The pipeline `score` uses: one of a configuration file, or the defaults around `--model`.
/// Either way through [`Config::from_toml`]'s checks, so `score` refuses what `check` refuses.
fn score_pipeline(
    args: &ScoreArgs,
) -> Result<(String, crate::config::PipelineConfig, String), ExitCode> {
    let (config, origin) = match (&args.model, &args.config) {
        (Some(model), _) => {
            let quoted = |s: &str| serde_json::to_string(s).expect("a string serialises");
            let mut toml = format!(
                "[pipelines.score]\ntopics = [\"-\"]\nmodel = {}\n",
                quoted(&model.to_string_lossy())
            );
            for (key, value) in [
                ("key_field", &args.key_field),
                ("timestamp_field", &args.timestamp_field),
            ] {
                if let Some(v) = value {
                    toml.push_str(&format!("{key} = {}\n", quoted(v)));
                }
            }
            match Config::from_toml(&toml, Some(Default::default())) {
                Ok(c) => (c, "--model".to_string()),
                Err(e) => {
                    eprintln!("{e}");
                    return Err(ExitCode::from(EXIT_CONFIG));
                }
            }
        }
        (None, Some(path)) => (load_config(path)?, path.display().to_string()),
        (None, None) => unreachable!("clap requires --model or --config"),
    };
    let mut pipelines = config.pipelines;
    let name = match &args.pipeline {
        Some(p) => p.clone(),
        None if pipelines.len() == 1 => pipelines.keys().next().cloned().expect("one"),
        None => {
            eprintln!(
                "{origin}: several pipelines ({:?}): name one with --pipeline",
                pipelines.keys().collect::<Vec<_>>()
            );
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    let Some(pipeline) = pipelines.remove(&name) else {
        eprintln!(
            "{origin}: no pipeline {name:?} (pipelines: {:?})",
            pipelines.keys().collect::<Vec<_>>()
        );
        return Err(ExitCode::from(EXIT_CONFIG));
    };
    Ok((name, pipeline, origin))
}

fn score(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let (name, pipeline, origin) = match score_pipeline(&args) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let model = match Model::load(&pipeline.model) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    if let Err(e) = pipeline.detector().fits(&model) {
        eprintln!("{origin}: pipelines.{name}.{e}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let mut schedules = Vec::new();
    for (option, rows) in [("--swap", &args.swap), ("--candidate", &args.candidate)] {
        let mut schedule: Vec<(u64, Arc<Model>)> = Vec::with_capacity(rows.len());
        for (row, path) in rows {
            if schedule.last().is_some_and(|(before, _)| before >= row) {
                eprintln!(
                    "{option} {row}={}: rows must be in ascending order",
                    path.display()
                );
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            match Model::load(path) {
                Ok(m) => schedule.push((*row, Arc::new(m))),
                Err(e) => {
                    eprintln!("{option} {row}={}: {e}", path.display());
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            }
        }
        schedules.push(schedule);
    }
    let candidates = schedules.pop().expect("two schedules");
    let swaps = schedules.pop().expect("two schedules");
    let models = replay::Models {
        first: model,
        swaps,
        candidates,
    };
    // A file of one series needs no key: with --model and no --key-field, records without one
    // are that series, named after the file.
    let series = (args.model.is_some() && args.key_field.is_none()).then(|| {
        Path::new(&args.input)
            .file_stem()
            .filter(|_| args.input != "-")
            .map_or("stdin".to_string(), |s| s.to_string_lossy().into_owned())
    });
    let (reader, input_format): (Box<dyn std::io::BufRead>, Format) = if args.input == "-" {
        let mut stdin = BufReader::with_capacity(1 << 16, std::io::stdin());
        let format = match args.input_format {
            Some(f) => f,
            None => {
                let head = std::io::BufRead::fill_buf(&mut stdin)?;
                match head.iter().find(|b| !b.is_ascii_whitespace()) {
                    Some(b'{') => Format::Ndjson,
                    _ => Format::Csv,
                }
            }
        };
        (Box::new(stdin), format)
    } else {
        let format = match args.input_format.or_else(|| Format::from_path(&args.input)) {
            Some(f) => f,
            None => bail!(
                "cannot tell the format of {} from its extension: pass --input-format csv|ndjson",
                args.input
            ),
        };
        let file = std::fs::File::open(&args.input)
            .with_context(|| format!("cannot open the input {}", args.input))?;
        (Box::new(BufReader::with_capacity(1 << 16, file)), format)
    };
    let output_format = args
        .output_format
        .or_else(|| args.output.as_deref().and_then(Format::from_path))
        .unwrap_or(Format::Csv);
    let started = std::time::Instant::now();
    let input = replay::Input {
        reader,
        format: input_format,
        series,
    };
    let summary = match &args.output {
        Some(path) if path != "-" => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create the output {path}"))?;
            replay::replay(&name, &pipeline, models, input, file, output_format)
        }
        _ => replay::replay(
            &name,
            &pipeline,
            models,
            input,
            std::io::stdout().lock(),
            output_format,
        ),
    }
    .with_context(|| format!("scoring {}", args.input))?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "scored {} of {} rows in {:.2}s ({:.0} rows/s): {} anomalous, {} alerts fired, {} warming up, {} could not be scored{}",
        summary.scored,
        summary.rows,
        secs,
        summary.rows as f64 / secs.max(1e-9),
        summary.anomalies,
        summary.alerts_fired,
        summary.warming,
        summary.errors,
        if args.candidate.is_empty() {
            String::new()
        } else {
            format!(
                "; candidates: {} promoted, {} refused",
                summary.candidates_promoted, summary.candidates_refused
            )
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    use std::fmt::Write;
    let model = match Model::load(&args.model) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let verification = match &args.verify {
        Some(path) => Some(verify(&model, path, args.tolerance)?),
        None => None,
    };
    let c = &model.contract;
    let mut text = String::new();
    if args.json {
        let mut out = serde_json::to_value(c)?;
        out["path"] = model.path.display().to_string().into();
        if let Some(v) = &verification {
            out["verify"] = serde_json::to_value(v)?;
        }
        writeln!(text, "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        let shape = |tail: &[usize]| {
            let dims: Vec<String> = tail.iter().map(|d| d.to_string()).collect();
            format!("[batch, {}]", dims.join(", "))
        };
        let cal = &c.calibration;
        writeln!(text, "model        {} ({})", c.name, model.path.display())?;
        writeln!(
            text,
            "kind         {}",
            format!("{:?}", c.kind).to_lowercase()
        )?;
        writeln!(text, "version      {}", c.version)?;
        writeln!(
            text,
            "trained at   {}",
            c.trained_at.as_deref().unwrap_or("unknown")
        )?;
        writeln!(text, "features     {}", c.features.join(", "))?;
        writeln!(text, "window       {}", c.window)?;
        if let Some(b) = &c.baseline {
            writeln!(
                text,
                "baseline     {} measured from a per-key level (half-life {} records)",
                b.features.join(", "),
                b.half_life()
            )?;
        }
        writeln!(
            text,
            "input        input {} float32",
            shape(&c.sample_shape)
        )?;
        writeln!(
            text,
            "outputs      error {} float32, reconstruction {} float32",
            shape(&[c.features.len()]),
            shape(&c.sample_shape)
        )?;
        writeln!(
            text,
            "calibration  {} held-back samples: mean {:.6}, std {:.6}; {}; {} scores kept for warm starts",
            cal.count,
            cal.mean,
            cal.std,
            cal.quantiles
                .iter()
                .map(|(q, v)| format!("q{q} {v:.6}"))
                .collect::<Vec<_>>()
                .join(", "),
            cal.sample.len()
        )?;
        if let Some(t) = &c.training_data {
            writeln!(text, "training     {t}")?;
        }
        if let Some(v) = &verification {
            writeln!(
            text,
                "verify       {} samples: max |Δ| error {:.3e}, reconstruction {:.3e} relative (tolerance {:.1e}): {}",
                v.samples,
                v.error,
                v.reconstruction,
                v.tolerance,
                if v.ok { "ok" } else { "MISMATCH" }
            )?;
        }
    }
    print_out(&text)?;
    Ok(match verification {
        Some(v) if !v.ok => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

#[derive(serde::Serialize)]
struct Verification {
    samples: usize,
    error: f64,
    reconstruction: f64,
    tolerance: f64,
    ok: bool,
}

/// Runs the samples file's inputs through tract and compares with its expected outputs.
fn verify(model: &Model, path: &Path, tolerance: f64) -> anyhow::Result<Verification> {
    #[derive(serde::Deserialize)]
    struct Samples {
        input: serde_json::Value,
        error: serde_json::Value,
        reconstruction: serde_json::Value,
    }
    fn flatten(v: &serde_json::Value, out: &mut Vec<f32>) -> anyhow::Result<()> {
        match v {
            serde_json::Value::Array(items) => items.iter().try_for_each(|i| flatten(i, out)),
            serde_json::Value::Number(n) => {
                out.push(n.as_f64().context("a number out of range")? as f32);
                Ok(())
            }
            other => bail!("expected numbers, found {other}"),
        }
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let samples: Samples = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a samples file", path.display()))?;
    let (mut input, mut error, mut recon) = (Vec::new(), Vec::new(), Vec::new());
    flatten(&samples.input, &mut input)?;
    flatten(&samples.error, &mut error)?;
    flatten(&samples.reconstruction, &mut recon)?;
    let per = model.contract.sample_len();
    if input.is_empty() || input.len() % per != 0 {
        bail!(
            "{}: `input` holds {} values, not a whole number of samples of {per}",
            path.display(),
            input.len()
        );
    }
    let n = input.len() / per;
    let out = model.infer(&input, n)?;
    let max_diff = |got: &[f32], want: &[f32], name: &str, relative: bool| -> anyhow::Result<f64> {
        if got.len() != want.len() {
            bail!(
                "`{name}` has {} expected values but the model produced {}",
                want.len(),
                got.len()
            );
        }
        Ok(max_difference(got, want, relative))
    };
    let error = max_diff(&out.errors, &error, "error", false)?;
    let reconstruction = max_diff(&out.reconstructions, &recon, "reconstruction", true)?;
    Ok(Verification {
        samples: n,
        error,
        reconstruction,
        tolerance,
        ok: error <= tolerance
            && reconstruction <= tolerance
            && error.is_finite()
            && reconstruction.is_finite(),
    })
}

/// The largest difference between `got` and `want`; NaN if any is NaN (`f64::max` would drop it
/// and report a NaN output as a match). Reconstructions are in raw units, where float32 itself
/// steps by more than 1e-4 above a few hundred: their differences are `relative` to
/// max(1, |expected|). Errors are absolute.
fn max_difference(got: &[f32], want: &[f32], relative: bool) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&a, &b)| {
            let scale = if relative {
                (b as f64).abs().max(1.0)
            } else {
                1.0
            };
            (a as f64 - b as f64).abs() / scale
        })
        .fold(0.0, |m: f64, d| {
            if m.is_nan() || d.is_nan() {
                f64::NAN
            } else {
                m.max(d)
            }
        })
}

#[cfg(test)]
mod tests {
    /// Issue 10, finding 7: `inspect --verify` reported max |Δ| 0, "ok", for NaN outputs.
    #[test]
    fn a_nan_output_is_never_a_match() {
        use super::max_difference;
        assert_eq!(max_difference(&[1.0, 2.5], &[1.0, 2.0], false), 0.5);
        assert_eq!(max_difference(&[300.0], &[200.0], true), 0.5);
        assert!(max_difference(&[f32::NAN, 2.0], &[1.0, 2.0], false).is_nan());
        assert!(max_difference(&[1.0, f32::NAN], &[1.0, 2.0], true).is_nan());
    }
}
