#!/usr/bin/env bash
# Performance figures of issue 5, measured side by side in one run, printed as markdown:
#   0. replay throughput: `anomalyd score` on 1M NDJSON rows of 8 features through a dense model
#      on one core (and, with BENCH_BASELINE=path/to/an/older/anomalyd, that binary interleaved
#      with this one: before and after), and memory per tracked key and with 1M keys;
#   1. tract vs onnxruntime on each shipped model and a GRU trained like the demo-lstm (batch 1 and
#      256, one thread each, one process),
#      the shipped recurrent model (demo-lstm) through `anomalyd score` on one core, and SPOT's
#      judge against the quantile's (`cargo bench --bench hot_path -- threshold`);
#   2. Kafka end to end on the tansu broker: the release `anomalyd run` binary's throughput, and
#      p50/p99 record-to-alert latency at half that rate;
#   3. against a Python consumer (confluent-kafka + onnxruntime, benches/python_consumer.py) doing
#      the same scoring on the same broker and records: throughput and CPU per record.
#
#   scripts/bench.sh                 # everything (~5-8 minutes after the builds)
#   scripts/bench.sh --quick         # smaller runs, to check that it works (~2 minutes)
#   BENCH_OUT=DIR scripts/bench.sh   # where raw outputs go (default target/bench)
#   BENCH_BASELINE=BIN scripts/bench.sh   # replay also with BIN, an anomalyd built from an older commit
#
# Needs: tansu (TANSU_BIN, or ~/.cargo/bin/tansu: scripts/test.sh installs it), the toolkit venv
# (scripts/python-env.sh, run here; cached) for onnxruntime's shared library, and installs
# confluent-kafka (pinned below) into that venv. Builds the benches and the binary in release
# mode. On a machine with 2+ cores the consumer under test gets CPU 0 and everything else
# (tansu, producers, readers) CPU 1; with one core nothing is pinned.
set -euo pipefail

CONFLUENT_KAFKA_VERSION=2.16.1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${BENCH_OUT:-$root/target/bench}"
mkdir -p "$out"
log() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 2; }

quick=
case "${1:-}" in
    --quick) quick=1 ;;
    "") ;;
    *) die "usage: scripts/bench.sh [--quick]" ;;
esac

tansu="${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}"
[[ -x "$tansu" ]] || die "tansu not found (TANSU_BIN, PATH, ~/.cargo/bin): run scripts/test.sh once (it installs it), or cargo install tansu --locked --version 0.6.0 --features dynostore"
export TANSU_BIN="$tansu"

venv="$(scripts/python-env.sh | tail -1)"
py="$venv/bin/python"
if ! "$py" -c "import confluent_kafka, importlib.metadata as m, sys; sys.exit(m.version('confluent-kafka') != '$CONFLUENT_KAFKA_VERSION')" 2>/dev/null; then
    log "installing confluent-kafka==$CONFLUENT_KAFKA_VERSION into $venv (benchmarks only)"
    "$py" -m pip install --quiet --disable-pip-version-check "confluent-kafka==$CONFLUENT_KAFKA_VERSION"
fi
ort_dylib="$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -1)"
[[ -n "$ort_dylib" ]] || die "onnxruntime's shared library not found in $venv: is onnxruntime installed there (scripts/python-env.sh)?"
export ORT_DYLIB_PATH="$ort_dylib"

cores="$(nproc)"
if (( cores >= 2 )) && command -v taskset >/dev/null; then
    consumer_cpus=0
    others="taskset -c 1"
    single="taskset -c 0"
else
    consumer_cpus=""
    others=""
    single=""
fi

log "building the benches and anomalyd in release mode"
cargo build --release --bin anomalyd
cargo bench --no-run --bench tract_vs_ort --bench kafka_e2e --bench memory --bench hot_path --message-format=json-render-diagnostics \
    >"$out/build.jsonl"
exe() {
    "$py" -c 'import json,sys
for l in open(sys.argv[1]):
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[2] and m.get("executable"):
        print(m["executable"])' "$out/build.jsonl" "$1" | tail -1
}
tract_vs_ort="$(exe tract_vs_ort)"
kafka_e2e="$(exe kafka_e2e)"
memory="$(exe memory)"
hot_path="$(exe hot_path)"
[[ -x "$tract_vs_ort" && -x "$kafka_e2e" && -x "$memory" && -x "$hot_path" ]] || die "bench executables not found in $out/build.jsonl"

if [[ -n "$quick" ]]; then
    replay_rows=200000
    replay_runs=1
    lstm_copies=5 # of models/demo/fleet-normal.csv's 20 hosts and 1000 rows: 100k rows
    criterion_args=(--warm-up-time 1 --measurement-time 2)
    tvo_args=(--rounds 5 --round-ms 100)
    e2e_args=(--records 200000 --python-records 100000 --repeats 1 --latency-seconds 5 --latency-repeats 1)
else
    replay_rows=1000000
    replay_runs=5
    lstm_copies=25 # 500 hosts, 500k rows
    criterion_args=()
    tvo_args=(--rounds 15 --round-ms 150)
    e2e_args=(--records 1000000 --python-records 300000 --repeats 3 --latency-seconds 10 --latency-repeats 3)
fi

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo ' (with uncommitted changes in src or Cargo.toml)')"
    echo "nproc: $cores"
    lscpu | head -20
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "onnxruntime: $ort_dylib"
    echo "confluent-kafka: $("$py" -c 'import confluent_kafka as c, importlib.metadata as m; print(m.version("confluent-kafka"), "with librdkafka", c.libversion()[0])')"
    echo "tansu: $("$tansu" --version 2>&1 | head -1)"
} >"$out/machine.txt"

# Replay: the data (8 features driven by 2 latent factors, 1000 keys), a dense model trained on
# its first 20k rows with the toolkit, and `anomalyd score` timed by its own summary line
# (decode to output, the process start and model load excluded). Cached between runs.
replay_data="$out/replay-$replay_rows.ndjson"
[[ -s "$replay_data" ]] || "$py" benches/replay_data.py --rows "$replay_rows" --keys 1000 --out "$replay_data"
[[ -s "$out/train8.csv" ]] || "$py" benches/replay_data.py --rows 20000 --keys 1000 --csv --out "$out/train8.csv"
[[ -s "$out/dense8.onnx" ]] || "$venv/bin/anomalyd-train" fit --kind dense --data "$out/train8.csv" \
    --features f0,f1,f2,f3,f4,f5,f6,f7 --key key --out "$out/dense8.onnx" --no-plot --quiet
printf '[pipelines.bench]\ntopics = ["bench"]\nmodel = "dense8.onnx"\nkey_field = "key"\ntimestamp_field = "ts"\n' >"$out/replay.toml"
replay_cmd="$single target/release/anomalyd score -c $out/replay.toml --pipeline bench --input $replay_data --output $out/replay-out.csv"
: >"$out/results.jsonl"
replay() { # BINARY LABEL: one run, one BENCH line
    local line
    line="$($single "$1" score -c "$out/replay.toml" --pipeline bench --input "$replay_data" --output "$out/replay-out.csv" 2>&1 | grep '^scored')"
    echo "$line" >&2
    "$py" -c 'import json, re, sys
m = re.search(r"scored (\d+) of (\d+) rows in ([0-9.]+)s", sys.argv[2])
print(json.dumps({"bench": "replay", "binary": sys.argv[1], "rows": int(m.group(2)), "seconds": float(m.group(3))}))' "$2" "$line" >>"$out/results.jsonl"
}
log "replay throughput: $replay_runs runs of anomalyd score on $replay_rows rows${single:+, pinned to CPU 0}${BENCH_BASELINE:+, interleaved with $BENCH_BASELINE}"
for ((i = 0; i < replay_runs; i++)); do
    replay target/release/anomalyd after
    [[ -z "${BENCH_BASELINE:-}" ]] || replay "$BENCH_BASELINE" before
done

log "memory per tracked key (each measurement in a process of its own)"
"$memory" >"$out/memory.md" 2>"$out/memory.txt"
grep '^BENCH ' "$out/memory.txt" | sed 's/^BENCH //' >>"$out/results.jsonl"

# No GRU model is shipped: one is trained here (cached) on the demo fleet, as models/regenerate.sh
# trains the demo-lstm, so that both recurrent cells are measured.
gru_model="$out/demo-gru.onnx"
[[ -s "$gru_model" ]] || "$venv/bin/anomalyd-train" fit --kind gru --data models/demo/fleet-normal.csv \
    --features cpu_pct,requests_per_s,latency_ms,net_out_mbps --key host --seed 0 --threads 1 \
    --window 16 --epochs 20 --code window --name demo-gru --out "$gru_model" --no-plot --quiet
log "tract vs onnxruntime (one thread each${single:+, pinned to CPU 0})"
cmd1="$single $tract_vs_ort ${tvo_args[*]} --profile models/demo-dense.onnx models/demo-lstm.onnx $gru_model"
$cmd1 >"$out/tract_vs_ort.txt"
grep '^BENCH ' "$out/tract_vs_ort.txt" | sed 's/^BENCH //' >>"$out/results.jsonl"

# The recurrent model through the daemon's code: the demo fleet's normal rows, each host copied
# under new names (500 hosts × 1000 rows), `anomalyd score --model models/demo-lstm.onnx`.
lstm_data="$out/lstm-fleet-x$lstm_copies.csv"
[[ -s "$lstm_data" ]] || "$py" -c 'import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
with open(sys.argv[2], "w") as out:
    out.write(",".join(rows[0]) + "\n")
    for r in rows[1:]:
        for c in range(int(sys.argv[3])):
            out.write(",".join([f"{r[0]}-{c:02d}"] + r[1:]) + "\n")' models/demo/fleet-normal.csv "$lstm_data" "$lstm_copies"
log "the demo-lstm through anomalyd score: 3 runs on $lstm_data${single:+, pinned to CPU 0}"
for ((i = 0; i < 3; i++)); do
    line="$($single target/release/anomalyd score --model models/demo-lstm.onnx --input "$lstm_data" --output "$out/lstm-out.csv" 2>&1 | grep '^scored')"
    echo "$line" >&2
    "$py" -c 'import json, re, sys
m = re.search(r"scored (\d+) of (\d+) rows in ([0-9.]+)s", sys.argv[1])
print(json.dumps({"bench": "replay_lstm", "rows": int(m.group(2)), "seconds": float(m.group(3))}))' "$line" >>"$out/results.jsonl"
done

log "SPOT's judge against the quantile's (criterion${single:+, pinned to CPU 0})"
$single "$hot_path" --bench threshold "${criterion_args[@]}" >"$out/threshold.txt" 2>&1
"$py" -c 'import json, sys
from pathlib import Path
for b in sorted(Path(sys.argv[1]).glob("*/new/benchmark.json")):
    meta, est = json.loads(b.read_text()), json.loads((b.parent / "estimates.json").read_text())
    method, case = meta["function_id"].split("/", 1)
    print(json.dumps({"bench": "threshold", "method": method, "case": case,
                      "scores": meta["throughput"]["Elements"], "ns": est["median"]["point_estimate"]}))' \
    target/criterion/threshold >>"$out/results.jsonl"

log "Kafka end to end and the Python baseline (tansu; consumer ${consumer_cpus:+on CPU $consumer_cpus, the rest on CPU 1})"
cmd2="$others $kafka_e2e ${e2e_args[*]} --consumer-cpus '$consumer_cpus' --python $py"
$others "$kafka_e2e" "${e2e_args[@]}" --consumer-cpus "$consumer_cpus" --python "$py" \
    >"$out/kafka_e2e.txt" 2> >(tee "$out/kafka_e2e.log" >&2)
grep '^BENCH ' "$out/kafka_e2e.txt" | sed 's/^BENCH //' >>"$out/results.jsonl"

"$py" benches/report.py "$out" \
    --command-replay "$replay_cmd" --command-memory "cargo bench --bench memory" \
    --command-tract "ORT_DYLIB_PATH=$ort_dylib $cmd1" \
    --command-lstm "$single target/release/anomalyd score --model models/demo-lstm.onnx --input $lstm_data --output $out/lstm-out.csv" \
    --command-threshold "$single $hot_path --bench threshold ${criterion_args[*]}" \
    --command-kafka "TANSU_BIN=$tansu $cmd2" | tee "$out/report.md"
log "raw outputs in $out (tract profile: $out/tract_vs_ort.txt)"
