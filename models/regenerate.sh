#!/usr/bin/env bash
# Regenerates the shipped models in models/ from the committed training data, deterministically:
# same data, same seeds, same toolkit versions -> the same .onnx bytes (SOURCE_DATE_EPOCH fixes
# `anomalyd.trained_at`; training runs with a fixed seed and thread count).
#
#   models/regenerate.sh           train from models/demo/fleet-normal.csv (written first if missing)
#   models/regenerate.sh --data    also rewrite the data with `anomalyd demo --write-training-data`
#                                  (needs the Rust binary: cargo build, or ANOMALYD_BIN)
#   MODELS_OUT=DIR models/regenerate.sh   write the models to DIR instead (the tests compare)
#
# Writes models/demo-dense.onnx, models/demo-lstm.onnx and their loss curves (*.loss.png), then
# checks every shipped model against the contract.
set -euo pipefail
models="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$models")"
venv="$("$root/scripts/python-env.sh" | tail -1)"
train="$venv/bin/anomalyd-train"
data="$models/demo/fleet-normal.csv"
features="cpu_pct,requests_per_s,latency_ms,net_out_mbps"
export SOURCE_DATE_EPOCH=1795824000 # 2026-11-28T00:00:00Z: the shipped models' trained_at
out="${MODELS_OUT:-$models}"
mkdir -p "$out"

if [[ "${1:-}" == "--data" || ! -f "$data" ]]; then
    bin="${ANOMALYD_BIN:-$root/target/debug/anomalyd}"
    if [[ ! -x "$bin" ]]; then
        echo "regenerate: $bin is missing: run cargo build (or set ANOMALYD_BIN) to write $data" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$data")"
    # 20 hosts x 1000 five-minute ticks (about 3.5 simulated days) of incident-free fleet data.
    "$bin" demo --write-training-data "$data" --hosts 20 --ticks 1000
fi

common=(--data "$data" --features "$features" --key host --seed 0 --threads 1 --version 1.0.0 --quiet)

# Point model: one row per host and tick. A wider hidden layer (64) reconstructs normal rows at the
# noise floor while the bounded 2-D code keeps the demo's incidents well above calibration p99.
"$train" fit --kind dense "${common[@]}" --window 1 --hidden 64 --epochs 40 \
    --name demo-dense --out "$out/demo-dense.onnx"

# Sequence model: the last 16 ticks of a host, one code per window: the design the demo's figures
# (README's incident table, the benchmarks) were measured on, kept until they are measured again
# with the default code per row.
"$train" fit --kind lstm "${common[@]}" --window 16 --epochs 20 --code window \
    --name demo-lstm --out "$out/demo-lstm.onnx"

"$train" check "$out"/*.onnx
sha256sum "$out"/*.onnx
