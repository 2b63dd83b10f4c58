"""The `anomalyd-train nab` subcommand (argument parsing; the work is in `nab.py`)."""

from __future__ import annotations

import argparse
import sys

from . import KINDS
from . import nab as nb
from . import nab_score as ns

DESCRIPTION = """\
Run the Numenta Anomaly Benchmark (NAB) through the daemon and score it by NAB's rules.

For every file of the corpus (DIR/data/<category>/<file>.csv, labels in DIR/labels/):
  1. features are computed causally from each row and the rows before it;
  2. a model of --kind (--ensemble of them, one graph) is trained on the file's probationary rows
     only (the first 15%, at most 750): its normalisation, weights and calibration see nothing
     later;
  3. the whole file is streamed through `anomalyd score` (the daemon's own decode, window,
     inference, adaptive threshold and alert code) with a generated one-pipeline config;
  4. each row's NAB anomaly score is read from the daemon's output (--report) and written to
     OUT/<detector>/<category>/<detector>_<file>.csv (timestamp,value,anomaly_score,label);
  5. the results are scored with the project's NAB scorer (threshold optimised per profile
     over the whole corpus, normalised against the null and perfect detectors).

One parameter set for the whole corpus: nothing is tuned per file, nothing looks ahead.
The last line printed is `NAB standard=S low_fp=S low_fn=S`.
"""

EPILOG = """\
reports (--report; each is causal, computed from the daemon's per-row output):
  escalation  (default) rarity on the row that opens an alert episode, and again on any anomalous
              row of the open episode whose rarity has grown by a factor of --escalate over the
              largest reported in it (a re-notification: the anomaly got worse)
  rarity      on the rows that open an episode only: x / (1 + x), x = the row's score over the
              99th percentile of every earlier score of the file, divided by 1 + --repeat-discount
              per episode the key fired before, and ranked against the key's earlier episodes
              (--key-rank)
  novelty     as rarity, over the largest earlier score
  firing      the daemon's anomaly_score on the rows that open an episode, 0 elsewhere
  score       the daemon's calibrated anomaly_score on every row

the defaults are the parameter set of docs/BENCHMARKS.md (NAB); --kind changes the kind only.

examples:
  anomalyd-train nab --nab-dir ../shared/nab --out target/nab            # the headline (kind conv)
  anomalyd-train nab --nab-dir ../shared/nab --out target/nab --kind dense
  anomalyd-train nab --nab-dir ../shared/nab --out target/nab --ensemble 1 \\
      --files realKnownCause/nyc_taxi.csv,realTweets/Twitter_volume_AAPL.csv
  anomalyd-train nab-plot --out target/nab --file realKnownCause/nyc_taxi.csv --png nyc_taxi.png
  anomalyd-train nab --score-only --nab-dir ../shared/nab --out ../shared/nab/results \\
      --detector numenta          # score existing results in NAB's layout
"""


def _list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def add_parser(sub) -> None:
    add_nab_parser(sub)
    add_plot_parser(sub)


def add_nab_parser(sub) -> None:
    d = nb.NabOptions(nab_dir="", out="")
    p = sub.add_parser("nab", help="run and score the Numenta Anomaly Benchmark through the daemon",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("benchmark")
    g.add_argument("--nab-dir", required=True, metavar="DIR",
                   help="a NAB checkout: data/, labels/combined_windows.json, config/profiles.json")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="results directory (NAB's layout); models and daemon outputs go to DIR/.work")
    g.add_argument("--kind", default=d.kind, choices=KINDS, metavar="KIND",
                   help=f"model kind: {', '.join(KINDS)} (default {d.kind})")
    g.add_argument("--detector", metavar="NAME", help="detector name in the results (default anomalyd-KIND)")
    g.add_argument("--files", type=_list, metavar="C/F.csv,...",
                   help="only these corpus files (default: every labelled file); scores are then "
                        "optimised over these files only")
    g.add_argument("--jobs", type=int, default=d.jobs, metavar="N",
                   help=f"files processed in parallel (default {d.jobs}); each trains on one thread")
    g.add_argument("--anomalyd", metavar="PATH",
                   help="the daemon binary (default $ANOMALYD_BIN, else the newest of this checkout's "
                        "target/release/anomalyd and target/debug/anomalyd (or under $CARGO_TARGET_DIR), "
                        "else anomalyd on the PATH)")
    g.add_argument("--reuse-models", action="store_true",
                   help="keep the models (each ensemble member) of an earlier run into the same --out "
                        "when their training data and options are unchanged (to try daemon settings)")
    g.add_argument("--score-only", action="store_true",
                   help="do not run anything: score the results already in OUT/<detector>")
    g.add_argument("--plot", metavar="C/F.csv",
                   help="also plot this file (value, score, threshold, NAB score, windows) to "
                        "OUT/<detector>/<detector>_<file>.png")
    g.add_argument("-q", "--quiet", action="store_true", help="no per-file progress lines")

    m = p.add_argument_group("model (trained on each file's probationary rows)")
    m.add_argument("--features", type=_list, default=d.features, metavar="G,G",
                   help=f"feature groups: {', '.join(nb.FEATURE_GROUPS)} (default {','.join(d.features)}); "
                        "diff = value minus the previous value; tod / dow = time of day / of week "
                        "on the unit circle")
    m.add_argument("--window", type=int, default=d.window, metavar="T",
                   help=f"rows per sample (default {d.window})")
    m.add_argument("--epochs", type=int, default=d.epochs, metavar="N", help=f"default {d.epochs}")
    m.add_argument("--hidden", type=int, default=d.hidden, metavar="H", help=f"default {d.hidden}")
    m.add_argument("--latent", type=int, metavar="K", help="code size (default: the kind's)")
    m.add_argument("--lr", type=float, default=d.lr, metavar="X", help=f"default {d.lr}")
    m.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N", help=f"default {d.batch_size}")
    m.add_argument("--val-fraction", type=float, default=d.val_fraction, metavar="X",
                   help=f"share of the probationary windows held back for calibration (default {d.val_fraction})")
    m.add_argument("--seed", type=int, default=d.seed, metavar="N", help=f"default {d.seed}")
    m.add_argument("--ensemble", type=int, default=d.ensemble, metavar="K",
                   help="models per file, seeds SEED .. SEED+K-1, exported as one graph whose error is "
                        f"the mean of theirs (default {d.ensemble}; 1: a single model)")
    m.add_argument("--calibration", default=d.calibration, choices=("val", "probation"),
                   help="the warm start of the daemon's threshold: the scores of the toolkit's held-back "
                        "validation windows (val), or of every probationary window (probation: every "
                        f"pattern of the probation is in it) (default {d.calibration})")

    t = p.add_argument_group("daemon pipeline ([pipelines.nab.threshold] and [pipelines.nab.alert])")
    t.add_argument("--threshold", default=d.threshold, choices=nb.THRESHOLD_METHODS,
                   help=f"threshold method (default {d.threshold})")
    t.add_argument("--q", type=float, default=d.q, metavar="RISK",
                   help=f"spot/dspot risk; quantile uses 1 - RISK (default {d.q})")
    t.add_argument("--level", type=float, default=d.level, metavar="X",
                   help=f"spot/dspot peaks level (default {d.level})")
    t.add_argument("--max-peaks", type=int, default=d.max_peaks, metavar="N", help=f"default {d.max_peaks}")
    t.add_argument("--exclude", type=float, default=d.exclude, metavar="X", help=f"default {d.exclude}")
    t.add_argument("--depth", type=int, default=d.depth, metavar="N", help=f"dspot depth (default {d.depth})")
    t.add_argument("--alpha", type=float, default=d.alpha, metavar="X", help=f"ewma alpha (default {d.alpha})")
    t.add_argument("--k", type=float, default=d.k, metavar="X", help=f"ewma k (default {d.k})")
    t.add_argument("--memory", type=int, default=d.memory, metavar="N", help=f"quantile memory (default {d.memory})")
    t.add_argument("--fire-after", type=int, default=d.fire_after, metavar="N", help=f"default {d.fire_after}")
    t.add_argument("--resolve-after", type=int, default=d.resolve_after, metavar="N",
                   help=f"default {d.resolve_after}")
    t.add_argument("--retrain-every", type=int, default=d.retrain_every, metavar="N",
                   help="learning: every N rows after the probation, train a model like the first on the rows so "
                        "far the daemon did not alert on, and swap it in from the next row (default 0: never)")
    t.add_argument("--retrain-rows", type=int, default=d.retrain_rows, metavar="N",
                   help=f"learning: train on the most recent N of those rows (default {d.retrain_rows})")
    t.add_argument("--shadow-rows", type=int, default=d.shadow_rows, metavar="N",
                   help=f"learning: rows a retrained model is scored in the shadow before the daemon's promotion "
                        f"rule decides (default {d.shadow_rows})")
    t.add_argument("--retrain-calibration", default=d.retrain_calibration, choices=("probation", "val"),
                   help="learning: a retrained model's threshold warm start, from every window it trained on or "
                        f"from the windows it held back (default {d.retrain_calibration})")
    t.add_argument("--rebaseline-after", default=d.rebaseline_after, metavar="N|never",
                   help=f"rows after which an open episode's level is accepted as normal (default {d.rebaseline_after})")
    t.add_argument("--report", default=d.report, choices=tuple(nb.REPORTS),
                   help=f"how a row's NAB score is read from the daemon's output (default {d.report}; below)")
    t.add_argument("--escalate", type=float, default=d.escalate, metavar="X",
                   help=f"report escalation: the growth of an open episode's rarity that is reported again "
                        f"(default {d.escalate})")
    t.add_argument("--repeat-discount", type=float, default=d.repeat_discount, metavar="X",
                   help="reports rarity and escalation: a key's k-th episode reports its rarity divided by "
                        f"1 + X * (k - 1), so a key that keeps alerting ranks lower (default {d.repeat_discount}; "
                        "0: no discount)")
    t.add_argument("--key-rank", type=float, default=d.key_rank, metavar="P",
                   help="reports rarity and escalation: an episode's rarity is also multiplied by "
                        "((s + 1) / k) ** P, where s of the key's k - 1 earlier episodes opened with a smaller "
                        f"rarity, so an alert ranks against the key's own earlier ones (default {d.key_rank}; "
                        "0: off)")


def add_plot_parser(sub) -> None:
    p = sub.add_parser("nab-plot", help="plot one file of a finished NAB run",
                       description="Plot one file of a finished `anomalyd-train nab` run: the value with the "
                                   "alerts, the daemon's score and adaptive threshold (log scale), and the NAB "
                                   "anomaly score, with the labelled anomaly windows shaded and the probation "
                                   "marked. Reads OUT/<detector>/ and OUT/.work/<detector>/ of the run.")
    p.add_argument("--out", required=True, metavar="DIR", help="the run's --out")
    p.add_argument("--file", required=True, metavar="C/F.csv", help="the corpus file, e.g. realKnownCause/nyc_taxi.csv")
    p.add_argument("--png", required=True, metavar="FILE.png", help="where to write the plot")
    p.add_argument("--nab-dir", default=None, metavar="DIR",
                   help="the NAB checkout (default: the run's, from OUT/<detector>/<detector>_scores.json)")
    p.add_argument("--detector", default="anomalyd-conv", metavar="NAME", help="the run's detector (default anomalyd-conv)")
    p.add_argument("--title", default=None, help="the plot's title")


def run_plot(args) -> int:
    import json
    from pathlib import Path

    nab_dir = args.nab_dir
    if nab_dir is None:
        summary = Path(args.out) / args.detector / f"{args.detector}_scores.json"
        if not summary.is_file():
            print(f"anomalyd-train nab-plot: error: {summary} does not exist (pass --nab-dir, or check --out "
                  "and --detector)", file=sys.stderr)
            return 2
        nab_dir = json.loads(summary.read_text())["options"]["nab_dir"]
    try:
        png = nb.plot_file(args.out, args.detector, args.file, nab_dir, args.png, args.title)
    except ns.NabError as e:
        print(f"anomalyd-train nab-plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {png}")
    return 0


def run(args) -> int:
    if args.command == "nab-plot":
        return run_plot(args)
    opts = nb.NabOptions(
        nab_dir=args.nab_dir, out=args.out, kind=args.kind, detector=args.detector, features=args.features,
        window=args.window, epochs=args.epochs, hidden=args.hidden, latent=args.latent, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, ensemble=args.ensemble, val_fraction=args.val_fraction,
        calibration=args.calibration, threshold=args.threshold,
        q=args.q, level=args.level, max_peaks=args.max_peaks, depth=args.depth, exclude=args.exclude,
        alpha=args.alpha, k=args.k, memory=args.memory, fire_after=args.fire_after,
        resolve_after=args.resolve_after, rebaseline_after=args.rebaseline_after,
        retrain_every=args.retrain_every, retrain_rows=args.retrain_rows,
        shadow_rows=args.shadow_rows, retrain_calibration=args.retrain_calibration, report=args.report, escalate=args.escalate,
        repeat_discount=args.repeat_discount, key_rank=args.key_rank, jobs=args.jobs,
        files=args.files,
        anomalyd=args.anomalyd, reuse_models=args.reuse_models, quiet=args.quiet,
    )
    try:
        if args.score_only:
            results = ns.score_detector(opts.nab_dir, opts.out, opts.name, opts.files)
            for p, res in results.items():
                print(f"  {p:20s} {res.normalised:6.2f}  threshold {res.threshold:.6g}, windows hit "
                      f"{res.tp}/{res.tp + res.fn}, false positive rows {res.fp}")
            print(ns.summary_line(results))
            return 0
        r = nb.run(opts)
        if args.plot:
            from pathlib import Path

            png = ns.result_path(opts.out, opts.name, args.plot).with_suffix(".png")
            nb.plot_file(opts.out, opts.name, args.plot, opts.nab_dir, str(Path(opts.out) / opts.name / png.name))
        nb.print_summary(r, opts)
        return 0
    except ns.NabError as e:
        print(f"anomalyd-train nab: error: {e}", file=sys.stderr)
        return 2
