//! tract (the daemon's runtime) against onnxruntime on the same models, the same inputs, one
//! thread each, in one process: median time per call and the ratio ORT / tract.
//!
//! ```sh
//! ORT_DYLIB_PATH=target/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0 \
//!   cargo bench --bench tract_vs_ort -- [--batches 1,256] [--rounds 15] [--round-ms 150] \
//!   [--profile] [MODEL.onnx ...]
//! ```
//!
//! Without model arguments it runs the shipped `models/demo-dense.onnx` and
//! `models/demo-lstm.onnx`. Engines, per model and batch size:
//! - `tract`: `anomalyd::model::Model::infer`, exactly what the daemon calls (a fresh tract
//!   state per call, the input copied into a tensor, both outputs copied out);
//! - `tract-state`: the same optimised plan, one `SimpleState` reused across calls (what
//!   `infer` would cost without the per-call state set-up);
//! - `ort`: an onnxruntime session (the PyPI wheel's shared library, loaded at run time),
//!   intra- and inter-op threads 1, sequential execution, all graph optimisations, the input
//!   borrowed (no copy), both outputs copied out.
//!
//! Timing: after a warm-up, `--rounds` rounds; in each round every engine runs back to back for
//! `--round-ms` (the order rotating between rounds), and its mean time per call in that round is
//! one sample. Figures are medians over rounds, and the ratio is the median of the per-round
//! ratios, so a slow moment on this shared machine hits both engines alike. Lines starting with
//! `BENCH ` are JSON for scripts/bench.sh. `--profile` also prints tract's time per node type
//! (the optimised graph, batch by batch); `--graph` prints the optimised graph itself (each
//! node's operator, details and output shape, and the bodies of loops).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anomalyd::model::Model;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::SimpleState;

struct Args {
    batches: Vec<usize>,
    rounds: usize,
    round: Duration,
    profile: bool,
    graph: bool,
    models: Vec<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench tract_vs_ort -- [--batches 1,256] [--rounds N] [--round-ms MS] [--profile] [--graph] [MODEL.onnx ...]\n\
         needs ORT_DYLIB_PATH = onnxruntime's shared library (e.g. the PyPI wheel's \
         target/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.*)"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        batches: vec![1, 256],
        rounds: 15,
        round: Duration::from_millis(150),
        profile: false,
        graph: false,
        models: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                usage()
            })
        };
        match a.as_str() {
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            "--batches" => {
                args.batches = value("--batches")
                    .split(',')
                    .map(|b| b.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--rounds" => args.rounds = value("--rounds").parse().unwrap_or_else(|_| usage()),
            "--round-ms" => {
                args.round =
                    Duration::from_millis(value("--round-ms").parse().unwrap_or_else(|_| usage()))
            }
            "--profile" => args.profile = true,
            "--graph" => args.graph = true,
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => {
                eprintln!("unknown option {s}");
                usage()
            }
            path => args.models.push(PathBuf::from(path)),
        }
    }
    if args.models.is_empty() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        args.models = vec![
            repo.join("models/demo-dense.onnx"),
            repo.join("models/demo-lstm.onnx"),
        ];
    }
    if args.rounds == 0 || args.batches.contains(&0) {
        usage()
    }
    args
}

/// Deterministic inputs on the scale of the model's training data: mean + std × N(0, 1) per
/// feature, from the `anomalyd.normalisation` metadata when the file has it.
fn inputs(path: &Path, model: &Model, n: usize) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let f = model.contract.features.len();
    let (mean, std) = normalisation(path).unwrap_or((vec![0.0; f], vec![1.0; f]));
    let per = model.contract.sample_len();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let normal = rand_distr::Normal::new(0.0f64, 1.0).expect("unit normal");
    (0..n * per)
        .map(|i| {
            // Features are the last axis for every kind but images, where they are the first.
            let c = if model.contract.shape.is_some() {
                (i % per) / (per / f)
            } else {
                i % f
            };
            (mean[c] + std[c] * normal.sample(&mut rng)) as f32
        })
        .collect()
}

fn normalisation(path: &Path) -> Option<(Vec<f64>, Vec<f64>)> {
    let bytes = std::fs::read(path).ok()?;
    let proto = tract_onnx::onnx().proto_model_for_read(&mut &*bytes).ok()?;
    let text = proto
        .metadata_props
        .iter()
        .find(|p| p.key == "anomalyd.normalisation")?;
    let v: serde_json::Value = serde_json::from_str(&text.value).ok()?;
    let list =
        |k: &str| -> Option<Vec<f64>> { v[k].as_array()?.iter().map(|x| x.as_f64()).collect() };
    Some((list("mean")?, list("std")?))
}

fn ort_session(path: &Path) -> ort::Result<Session> {
    Session::builder()?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .with_parallel_execution(false)?
        .commit_from_file(path)
}

/// Runs one batch in onnxruntime: (error, reconstruction), copied out as the daemon would.
fn ort_run(session: &mut Session, shape: &[usize], input: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let tensor = TensorRef::from_array_view((shape.to_vec(), input)).expect("ORT input tensor");
    let outputs = session
        .run(ort::inputs!["input" => tensor])
        .expect("ORT run");
    let read = |name: &str| -> Vec<f32> {
        let (_, data) = outputs[name]
            .try_extract_tensor::<f32>()
            .expect("ORT output");
        data.to_vec()
    };
    (read("error"), read("reconstruction"))
}

fn tract_state_run(
    state: &mut SimpleState<TypedFact, Box<dyn TypedOp>>,
    shape: &[usize],
    input: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let tensor = Tensor::from_shape(shape, input).expect("tract input tensor");
    let out = state.run(tvec![tensor.into()]).expect("tract run");
    let read = |v: &TValue| -> Vec<f32> {
        v.to_plain_array_view::<f32>()
            .expect("f32 output")
            .iter()
            .copied()
            .collect()
    };
    (read(&out[0]), read(&out[1]))
}

/// One engine's call on the prepared input.
type Engine<'a> = Box<dyn FnMut() + 'a>;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Calls `f` repeatedly for at least `budget`; the mean seconds per call.
fn timed(budget: Duration, f: &mut dyn FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget || calls == 0 {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / calls as f64
}

/// tract's time per node, by operator name, over `calls` runs of the plan.
fn profile(plan: &Arc<TypedRunnableModel>, shape: &[usize], input: &[f32], calls: usize) {
    use tract_onnx::tract_core::plan::eval;
    let mut per_op: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut per_node: BTreeMap<usize, (String, f64)> = BTreeMap::new();
    let mut state = SimpleState::new(plan).expect("state");
    let mut total = 0.0;
    for _ in 0..calls {
        let tensor = Tensor::from_shape(shape, input).expect("tensor");
        let start = Instant::now();
        state
            .run_plan_with_eval(tvec![tensor.into()], |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let r = eval(ctx, op_state, node, inputs);
                let dt = t.elapsed().as_secs_f64();
                let e = per_op.entry(node.op().name().to_string()).or_default();
                e.0 += dt;
                e.1 += 1;
                per_node
                    .entry(node.id)
                    .or_insert_with(|| (format!("{} ({})", node.name, node.op().name()), 0.0))
                    .1 += dt;
                r
            })
            .expect("profiled run");
        total += start.elapsed().as_secs_f64();
    }
    let per_call = |s: f64| s / calls as f64 * 1e6;
    println!(
        "\n  tract profile, batch {}: {:.1} µs per call over {calls} calls ({} nodes)",
        shape[0],
        per_call(total),
        plan.model().nodes().len()
    );
    let mut ops: Vec<_> = per_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (name, (secs, n)) in ops.iter().take(12) {
        println!(
            "    {:>9.1} µs/call {:>5.1} %  {:>4} nodes  {name}",
            per_call(*secs),
            100.0 * secs / total,
            n / calls
        );
    }
    let mut nodes: Vec<_> = per_node.into_values().collect();
    nodes.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("    slowest nodes:");
    for (name, secs) in nodes.iter().take(6) {
        println!("    {:>9.1} µs/call  {name}", per_call(*secs));
    }
}

/// The optimised graph: every node with its operator, the operator's details, its inputs and
/// its output facts; loop bodies (Scan) indented below their node.
fn print_graph(model: &TypedModel, indent: usize) {
    use tract_onnx::tract_core::ops::scan::OptScan;
    let pad = " ".repeat(indent);
    for node in model.nodes() {
        let inputs: Vec<String> = node.inputs.iter().map(|o| format!("#{}", o.node)).collect();
        let outputs: Vec<String> = node
            .outputs
            .iter()
            .map(|o| format!("{:?}", o.fact))
            .collect();
        println!(
            "{pad}#{} {} [{}] {} <- {} -> {}",
            node.id,
            node.name,
            node.op().name(),
            node.op().info().unwrap_or_default().join("; "),
            inputs.join(","),
            outputs.join(" | ")
        );
        if let Some(scan) = node.op_as::<OptScan>() {
            print_graph(scan.plan.model(), indent + 4);
        }
    }
}

fn main() {
    // As the daemon does (anomalyd::cli::main), so that `tract` is what it costs there.
    anomalyd::model::keep_freed_buffers();
    let args = parse_args();
    let Some(dylib) = std::env::var_os("ORT_DYLIB_PATH") else {
        eprintln!("ORT_DYLIB_PATH is not set");
        usage()
    };
    if !Path::new(&dylib).is_file() {
        eprintln!(
            "ORT_DYLIB_PATH={} is not a file: run scripts/python-env.sh (it installs onnxruntime into target/venv)",
            Path::new(&dylib).display()
        );
        std::process::exit(2)
    }
    let committed = ort::init_from(&dylib)
        .unwrap_or_else(|e| {
            eprintln!(
                "cannot load onnxruntime from {}: {e}",
                Path::new(&dylib).display()
            );
            std::process::exit(2)
        })
        .with_name("tract_vs_ort")
        .commit();
    if !committed {
        eprintln!("onnxruntime environment was already set up; its settings may not apply");
    }

    println!(
        "| model | batch | tract µs/call | tract-state µs/call | ort µs/call | ORT/tract | ORT/tract-state | max abs diff (error) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut loads = Vec::new();
    for path in &args.models {
        // Loading (parse, type, optimise) is most of what a model swap costs the daemon, and
        // part of its cold start: the median of five loads.
        let mut load_ms = Vec::new();
        let model = loop {
            let t = Instant::now();
            let model = Model::load(path).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(1)
            });
            load_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if load_ms.len() == 5 {
                break model;
            }
        };
        // The daemon's own plan, for the reused-state and profile runs.
        let plan = model.plan().clone();
        let mut session = ort_session(path).unwrap_or_else(|e| {
            eprintln!("onnxruntime cannot load {}: {e}", path.display());
            std::process::exit(1)
        });
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if args.graph {
            println!("\noptimised tract graph of {name}:");
            print_graph(plan.model(), 2);
            println!();
        }
        for &n in &args.batches {
            let input = inputs(path, &model, n);
            let mut shape = vec![n];
            shape.extend(&model.contract.sample_shape);

            // Same outputs from both runtimes, or the comparison means nothing.
            let t = model.infer(&input, n).expect("tract infer");
            let (o_err, o_rec) = ort_run(&mut session, &shape, &input);
            let diff = t
                .errors
                .iter()
                .zip(&o_err)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert_eq!(t.reconstructions.len(), o_rec.len());

            let mut state = SimpleState::new(&plan).expect("tract state");
            let mut engines: Vec<(&str, Engine)> = vec![
                (
                    "tract",
                    Box::new(|| {
                        std::hint::black_box(model.infer(&input, n).expect("infer"));
                    }),
                ),
                (
                    "tract-state",
                    Box::new(|| {
                        std::hint::black_box(tract_state_run(&mut state, &shape, &input));
                    }),
                ),
                (
                    "ort",
                    Box::new(|| {
                        std::hint::black_box(ort_run(&mut session, &shape, &input));
                    }),
                ),
            ];
            for (_, f) in engines.iter_mut() {
                timed(Duration::from_millis(300), f.as_mut());
            }
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
            for round in 0..args.rounds {
                for k in 0..engines.len() {
                    let e = (k + round) % engines.len();
                    samples[e].push(timed(args.round, engines[e].1.as_mut()));
                }
            }
            drop(engines);
            let ratio = |a: usize, b: usize| {
                let mut r: Vec<f64> = samples[a]
                    .iter()
                    .zip(&samples[b])
                    .map(|(x, y)| x / y)
                    .collect();
                median(&mut r)
            };
            let (ort_tract, ort_state) = (ratio(2, 0), ratio(2, 1));
            let med: Vec<f64> = samples
                .iter()
                .map(|s| median(&mut s.clone()) * 1e6)
                .collect();
            println!(
                "| {name} | {n} | {:.1} | {:.1} | {:.1} | {ort_tract:.2} | {ort_state:.2} | {diff:.1e} |",
                med[0], med[1], med[2]
            );
            println!(
                "BENCH {}",
                serde_json::json!({
                    "bench": "tract_vs_ort",
                    "model": name,
                    "batch": n,
                    "rounds": args.rounds,
                    "tract_us": med[0],
                    "tract_state_us": med[1],
                    "ort_us": med[2],
                    "ort_over_tract": ort_tract,
                    "ort_over_tract_state": ort_state,
                    "tract_us_rounds": samples[0].iter().map(|s| s * 1e6).collect::<Vec<_>>(),
                    "ort_us_rounds": samples[2].iter().map(|s| s * 1e6).collect::<Vec<_>>(),
                    "max_abs_diff_error": diff,
                })
            );
            if args.profile {
                profile(&plan, &shape, &input, if n == 1 { 2000 } else { 100 });
            }
        }
        loads.push((name.to_string(), load_ms));
    }
    println!("\n| model | load ms, median of 5 (a swap's cost) |\n|---|---|");
    for (name, mut ms) in loads {
        let load = median(&mut ms);
        println!("| {name} | {load:.1} |");
        println!(
            "BENCH {}",
            serde_json::json!({"bench": "model_load", "model": name, "load_ms": load, "runs_ms": ms})
        );
    }
}
