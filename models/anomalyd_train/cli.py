"""The `anomalyd-train` command."""

from __future__ import annotations

import argparse
import json
import sys

from . import KINDS, __version__
from .baseline import DEFAULT_HALF_LIFE
from .calibrate import SMALL_CALIBRATION

DESCRIPTION = """\
Train autoencoders on normal data and export them as self-describing ONNX models for the
anomalyd daemon (one file: features, window, normalisation, per-feature error output and the
calibration of held-back validation scores; see docs/MODEL-CONTRACT.md).

Run `anomalyd-train COMMAND --help` for a command's options.
"""

FIT_EPILOG = """\
kinds:
  pca        linear baseline: projection on the top principal components (closed form, no epochs)
  dense      dense autoencoder (tanh), bottleneck --latent
  conv       convolutional: 1-D over a window of T rows (default T=16), or 2-D over image-shaped
             records with --shape C,H,W (NDJSON, one H x W array field per channel)
  vae        variational autoencoder; score = squared error of the mean path (z = mu);
             `anomalyd-train generate` samples from it
  sparse     wide code with a sparsity penalty: --sparsity kl (target activation --rho) or l1
  stacked    greedy layer-wise pretraining (--pretrain-epochs per level), then fine-tuning
  denoising  reconstructs clean inputs from corrupted ones (--noise-std, --mask-prob); its
             reconstruction is a denoised signal
  lstm, gru  recurrent sequence-to-sequence autoencoders over windows of T rows (default T=16)
  (conv 1-D, lstm and gru with 2+ features: a code per row, scored on the window's last row; see
  --code)

Point kinds use window 1 unless --window is given (their window is then flattened).
With --key, rows are grouped per entity (file order) and windows never cross entities.

examples:
  anomalyd-train fit --kind dense --data fleet.csv --features cpu_pct,latency_ms --out models/x.onnx
  anomalyd-train fit --kind lstm --data fleet.csv --features cpu_pct,latency_ms --key host \\
      --window 16 --epochs 20 --out models/x-lstm.onnx
"""


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def _shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(t) for t in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive integers), got {text!r}")
    return dims  # type: ignore[return-value]


def _baseline_args(g) -> None:
    g.add_argument("--baseline", type=_csv_list, default=[], metavar="A,B",
                   help="features that drift (temperatures following the ambient, counters, ...): "
                        "the model sees each one's distance from the key's own slow level instead of "
                        "its value, so drift does not read as an anomaly while a step, spike or fast "
                        "ramp still does (computed alike by the daemon; docs/MODEL-CONTRACT.md)")
    g.add_argument("--baseline-half-life", type=float, default=DEFAULT_HALF_LIFE, metavar="N",
                   help="records after which a value weighs half in a --baseline level "
                        f"(default {DEFAULT_HALF_LIFE:g})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomalyd-train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"anomalyd-train {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")

    f = sub.add_parser(
        "fit", help="train a model and export it", description="Train a model on normal data and export it "
        "as one ONNX file under the model contract, with a loss-curve PNG beside it (NAME.loss.png).",
        epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = f.add_argument_group("data and output")
    g.add_argument("--kind", required=True, choices=KINDS, metavar="KIND",
                   help=f"model kind: {', '.join(KINDS)} (see below)")
    g.add_argument("--data", required=True, metavar="FILE",
                   help="training data: .csv (header line) or .ndjson")
    g.add_argument("--features", required=True, type=_csv_list, metavar="A,B,C",
                   help="feature columns, in the order the model will take them")
    g.add_argument("--key", metavar="COL", help="entity key column: one series per key (e.g. host)")
    g.add_argument("--window", type=int, metavar="T",
                   help="rows per sample (default 1; 16 for conv, lstm, gru)")
    g.add_argument("--shape", type=_shape, metavar="C,H,W",
                   help="conv only: image-shaped records (2-D model)")
    _baseline_args(g)
    g.add_argument("--out", required=True, metavar="NAME.onnx", help="the model file to write")
    g.add_argument("--name", help="model name in the metadata (default: the file's stem)")
    g.add_argument("--version", dest="model_version", metavar="VERSION", default="1.0.0",
                   help="model version (default 1.0.0)")
    g.add_argument("--no-plot", action="store_true", help="do not write the loss-curve PNG")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    t = f.add_argument_group("training")
    t.add_argument("--epochs", metavar="N", type=int,
                   help="train exactly N epochs, keeping the best validation epoch's weights (default: "
                        "until the validation loss stops improving, at most the epochs that make 5000 "
                        "optimizer steps, at least 30; pca ignores it)")
    t.add_argument("--batch-size", metavar="N", type=int, default=64, help="mini-batch size (default 64)")
    t.add_argument("--lr", metavar="X", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--val-fraction", metavar="X", type=float, default=0.2,
                   help="share held back for validation and calibration (default 0.2)")
    t.add_argument("--calibration-folds", metavar="K", type=int, default=5,
                   help=f"with fewer than {SMALL_CALIBRATION} validation windows, also train K models on "
                        "K-1 of K folds of the data and calibrate on their held-out scores too, so that "
                        "every row gives a score the thresholds start from; for conv, lstm and gru the folds "
                        "are blocks of 2 x window rows dealt at random, so that no fold is a stretch of the "
                        "series the others never saw (default 5; 1: off)")
    t.add_argument("--seed", type=int, metavar="N", default=0,
                   help="random seed: same seed and data, same model (default 0)")
    t.add_argument("--threads", metavar="N", type=int, default=1,
                   help="CPU threads for torch (default 1: these small models train fastest on one, "
                        "and results are bit-identical only for the same thread count)")

    a = f.add_argument_group("architecture")
    a.add_argument("--latent", metavar="K", type=int,
                   help="code size (default: min(D/2, 8) for D = window x features, or D = features for "
                        "a code per row (--code); sparse: twice that; "
                        "pca: the fewest components explaining --variance)")
    a.add_argument("--hidden", metavar="H", type=int, default=32,
                   help="hidden layer / recurrent state size (default 32)")
    a.add_argument("--variance", metavar="X", type=float, default=0.95,
                   help="pca: share of variance to keep (default 0.95)")
    a.add_argument("--sparsity", choices=("kl", "l1"), default="kl",
                   help="sparse: KL divergence to a target activation (default) or L1 of the code")
    a.add_argument("--sparsity-weight", metavar="W", type=float,
                   help="sparse: penalty weight (default 0.1 kl, 1e-3 l1)")
    a.add_argument("--rho", metavar="X", type=float, default=0.05,
                   help="sparse kl: target mean activation (default 0.05)")
    a.add_argument("--noise-std", metavar="X", type=float, default=0.5,
                   help="denoising: Gaussian corruption in normalised units (default 0.5)")
    a.add_argument("--mask-prob", metavar="P", type=float, default=0.1,
                   help="denoising: probability of masking an input value (default 0.1)")
    a.add_argument("--code", choices=("step", "window"),
                   help="conv (1-D), lstm, gru: a code of --latent units for every row, scored on the "
                        "window's last row (default with 2 or more features), or one code for the whole "
                        "window, scored over all its rows (the default for a single series)")
    a.add_argument("--beta", metavar="X", type=float, default=1.0,
                   help="vae, and the per-row codes of conv, lstm, gru: weight of the KL term (default 1)")
    a.add_argument("--pretrain-epochs", metavar="N", type=int,
                   help="stacked: epochs per level (default epochs/3)")

    gen = sub.add_parser("generate", help="sample synthetic normal data from a VAE model",
                         description="Sample synthetic normal data from a trained VAE model: z ~ N(0, I) "
                         "is decoded by the model's own decoder (the sub-graph from the latent code to "
                         "`reconstruction`), plus Gaussian noise with the per-feature residual variance "
                         "measured on validation data (calibration feature_mean) unless --no-noise.")
    gen.add_argument("--model", required=True, metavar="MODEL.onnx", help="a model of kind vae")
    gen.add_argument("-n", type=int, default=100, help="number of samples (default 100)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--no-noise", action="store_true", help="output the decoder means only")
    gen.add_argument("--out", default="-", metavar="FILE", help="output .csv or .ndjson (default: CSV on stdout)")

    c = sub.add_parser("check", help="check ONNX files against the model contract",
                       description="Check ONNX files against docs/MODEL-CONTRACT.md; exit 1 if any fails.")
    c.add_argument("models", nargs="+", metavar="MODEL.onnx")
    c.add_argument("--json", action="store_true", help="print each model's contract summary as JSON")

    sel = sub.add_parser(
        "select", help="choose the kind and code size on your data, by injected anomalies",
        description=(
            "Train every candidate of a grid (kind x code size, and window for the sequence kinds) on the\n"
            "first part of each series and judge it on the held-back rest two ways: the reconstruction\n"
            "error of the normal rows, and the detection (ROC AUC, PR AUC) of anomalies injected into\n"
            "them (spikes, level shifts, stuck values, broken correlations, seasonal phase shifts; sizes\n"
            "relative to each feature's spread; seeded). Reconstruction error alone always prefers a\n"
            "wider code; detection does not, since a code as wide as the input reconstructs anomalies too.\n\n"
            "Rule: the best ROC AUC sets the bar; of the candidates within one bootstrap standard error\n"
            "of it, the one with the fewest stored numbers wins (the one-standard-error rule).\n\n"
            "Writes, in --out: model.onnx (the winner, refitted on all the data, the evidence in its\n"
            "anomalyd.selection metadata) and its loss curve, candidates.csv (every candidate) and\n"
            "selection.png (error and AUC against code size per kind), and prints the winner."
        ),
        epilog="example:\n  anomalyd-train select --data models/demo/fleet-normal.csv --key host \\\n"
        "      --features cpu_pct,requests_per_s,latency_ms,net_out_mbps --out models/demo-select",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel.add_argument("--data", required=True, metavar="FILE", help="normal data: .csv (header line) or .ndjson")
    sel.add_argument("--features", required=True, type=_csv_list, metavar="A,B,C", help="feature columns")
    sel.add_argument("--key", metavar="COL", help="entity key column: one series per key (e.g. host)")
    sel.add_argument("--kinds", type=_csv_list, default=["pca", "dense", "conv", "lstm"], metavar="K,K",
                     help=f"kinds to try (default pca,dense,conv,lstm; any of {', '.join(KINDS)})")
    sel.add_argument("--latent", type=_int_list, default=[1, 2, 4, 8, 16], metavar="N,N",
                     help="code sizes to try (default 1,2,4,8,16; those wider than the input are left out)")
    sel.add_argument("--window", type=_int_list, default=[16], metavar="T,T",
                     help="windows to try for the sequence kinds conv, lstm, gru (default 16)")
    _baseline_args(sel)
    sel.add_argument("--holdout", type=float, default=0.3, metavar="X",
                     help="share of each series (its end) held back for judging (default 0.3)")
    sel.add_argument("--inject-share", type=float, default=0.1, metavar="X",
                     help="share of the held-back rows made anomalous in each injected copy (default 0.1)")
    sel.add_argument("--inject-magnitude", type=float, default=4.0, metavar="K",
                     help="spikes of K feature standard deviations, level shifts of K/2 (default 4)")
    sel.add_argument("--budget", default="30m", metavar="DURATION",
                     help="time for the grid (90s, 30m, 2h; default 30m): candidates not started by then "
                          "are skipped (and listed); the winner's refit comes after")
    sel.add_argument("--epochs", type=int, metavar="N",
                     help="train each candidate exactly N epochs (default: until its validation loss stops improving)")
    sel.add_argument("--seed", type=int, default=0, metavar="N", help="seeds training and injection (default 0)")
    sel.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads for torch (default 1)")
    sel.add_argument("--out", required=True, metavar="DIR", help="directory for the model, table and plot")
    sel.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("synth", help="write a synthetic dataset",
                       description="Write a synthetic dataset of correlated sensor series (normal data), "
                       "optionally with injected, labelled anomalies (column `anomaly`).")
    s.add_argument("--structure", choices=("sensors", "linear", "curved"), default="sensors",
                   help="sensors (default): entities of four correlated sensors on a cycle; linear / "
                        "curved: one series of 8 features f0..f7, independent rows driven by 2 hidden "
                        "factors through a linear map / a curved one (the `select` tests' data)")
    s.add_argument("--rows", type=int, default=10000, help="total rows (default 10000)")
    s.add_argument("--entities", type=int, default=10,
                   help="sensors: number of entities, column `entity` (default 10)")
    s.add_argument("--anomalies", type=float, default=0.0, help="sensors: share of anomalous rows (default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, metavar="FILE.csv")

    r = sub.add_parser(
        "retrain", help="fit a candidate for a running pipeline on its recent input (Kafka)",
        description=(
            "Fit a candidate model for pipeline P of a running daemon on P's recent input, read from\n"
            "Kafka, and write it beside the serving model (pipelines.P.candidate, by default\n"
            "MODEL.candidate.onnx), where the daemon shadows it on live traffic and promotes or refuses it.\n\n"
            "- Left out: every record of an alert episode, read back from the pipeline's alerts topic.\n"
            "- Fitted: the serving model's kind and hyper-parameters (its anomalyd.training metadata).\n"
            "- Version: the serving one's with its last number raised.\n"
            "- Kafka: a client of its own that never joins or commits for the daemon's consumer group."
        ),
        epilog="Run it on a schedule (deploy/systemd/anomalyd-retrain.timer, deploy/k8s/retrain-cronjob.yaml) "
        "or when the drift alert fires (docs/OPERATIONS.md).\n\nexample:\n"
        "  anomalyd-train retrain -c /etc/anomalyd/anomalyd.toml --pipeline fleet --since 7d",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="the daemon's configuration (its ANOMALYD__… environment overrides apply too)")
    r.add_argument("--pipeline", required=True, metavar="P", help="the pipeline to retrain")
    span = r.add_mutually_exclusive_group()
    span.add_argument("--since", metavar="DURATION",
                      help="train on the records of the last DURATION (90s, 30m, 12h, 7d, 2w; default 7d)")
    span.add_argument("--records", type=int, metavar="N",
                      help="train on the last N records (split evenly over the input partitions)")
    r.add_argument("--min-records", type=int, default=1000, metavar="N",
                   help="refuse when fewer clean records than this remain (default 1000)")
    r.add_argument("--out", metavar="FILE.onnx", help="write here instead of the pipeline's candidate path")
    r.add_argument("--version", dest="model_version", metavar="VERSION",
                   help="the candidate's version (default: the serving model's, last number raised)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress")

    from .machines import add_parser as add_machines
    from .nab_cli import add_parser as add_nab

    add_nab(sub)
    add_machines(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .data import DataError

    try:
        if args.command == "fit":
            return _fit(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "check":
            return _check(args)
        if args.command == "synth":
            return _synth(args)
        if args.command == "select":
            return _select(args)
        if args.command == "retrain":
            from .retrain import RetrainOptions, retrain

            retrain(RetrainOptions(config=args.config, pipeline=args.pipeline, since=args.since,
                                   records=args.records, min_records=args.min_records, out=args.out,
                                   version=args.model_version, quiet=args.quiet))
            return 0
        if args.command == "machines":
            from .machines import main as run_machines

            return run_machines(args)
        if args.command in ("nab", "nab-plot"):
            from .nab_cli import run as run_nab

            return run_nab(args)
    except DataError as e:
        print(f"anomalyd-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


def _fit(args) -> int:
    from .fit import FitOptions, fit

    opts = FitOptions(
        kind=args.kind, data=args.data, features=args.features, out=args.out, key=args.key,
        window=args.window, shape=args.shape, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_fraction=args.val_fraction, seed=args.seed, threads=args.threads, version=args.model_version,
        name=args.name, quiet=args.quiet, plot=not args.no_plot, latent=args.latent, hidden=args.hidden,
        sparsity=args.sparsity, sparsity_weight=args.sparsity_weight, rho=args.rho, noise_std=args.noise_std,
        mask_prob=args.mask_prob, beta=args.beta, pretrain_epochs=args.pretrain_epochs, variance=args.variance,
        baseline=args.baseline, baseline_half_life=args.baseline_half_life,
        calibration_folds=args.calibration_folds, code=args.code,
    )
    res = fit(opts)
    q = res.calibration["quantiles"]
    print(
        f"wrote {res.path} ({args.kind}, window {res.meta['anomalyd.window']}, "
        f"{len(res.train)} training / {len(res.val)} validation windows, {res.seconds:.1f} s); "
        f"validation score p50 {q['0.5']:.4g}, p99 {q['0.99']:.4g}"
        + (f"; loss curve {res.png}" if res.png else "")
    )
    count, folds = res.calibration["count"], res.meta["anomalyd.training"]["calibration_folds"]
    if count < SMALL_CALIBRATION:
        print(
            f"anomalyd-train fit: warning: the calibration rests on {count} held-back scores"
            + (f" (of the validation windows and of {folds} models trained on the other folds)" if folds else "")
            + (", of windows that overlap" if int(res.meta["anomalyd.window"]) > 1 else "")
            + ": the daemon extrapolates a high quantile's threshold (0.999 by default) from their "
            "tail, which is rough on so few. Give more normal rows if you have them, and look at "
            "the scores of a stretch you know is normal before trusting alerts.",
            file=sys.stderr,
        )
    return 0


def _generate(args) -> int:
    from .generate import generate, write

    features, samples = generate(args.model, args.n, seed=args.seed, noise=not args.no_noise)
    write(args.out, features, samples)
    return 0


def _check(args) -> int:
    from .contract import check, summary

    failed = 0
    for path in args.models:
        problems = check(path)
        if args.json and not problems:
            print(json.dumps(summary(path)))
        if problems:
            failed += 1
            print(f"{path}: FAILED", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        elif not args.json:
            print(f"{path}: ok")
    return 1 if failed else 0


def _select(args) -> int:
    from .retrain import parse_duration
    from .selection import SelectOptions, select

    res = select(SelectOptions(
        data=args.data, features=args.features, out=args.out, key=args.key, kinds=args.kinds,
        latents=args.latent, windows=args.window, holdout=args.holdout, inject_share=args.inject_share,
        inject_magnitude=args.inject_magnitude, budget=parse_duration(args.budget, "--budget"),
        epochs=args.epochs, seed=args.seed, threads=args.threads, quiet=args.quiet,
        baseline=args.baseline, baseline_half_life=args.baseline_half_life,
    ))
    c = res.chosen
    ok = sum(x.status == "ok" for x in res.candidates)
    skipped = len(res.candidates) - ok
    print(
        f"selected {c.name}: ROC AUC {c.roc_auc:.3f} ± {c.roc_auc_se:.3f}, PR AUC {c.pr_auc:.3f}, held-back error "
        f"{c.val_mse:.4g}, {c.params} numbers; best of {ok} candidates" + (f" ({skipped} not run)" if skipped else "")
        + f" -> {res.model} (table {res.table}, plot {res.plot})"
    )
    return 0


def _synth(args) -> int:
    from .synth import factors, sensors_table, write_csv

    if args.structure == "sensors":
        cols, rows = sensors_table(args.rows, args.entities, args.anomalies, args.seed)
    else:
        x = factors(args.rows, curved=args.structure == "curved", seed=args.seed)
        cols, rows = [f"f{i}" for i in range(x.shape[1])], [[repr(float(v)) for v in r] for r in x]
    write_csv(args.out, cols, rows)
    print(f"wrote {args.out}: {len(rows)} rows, columns {','.join(cols)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
