#!/usr/bin/env bash
# Creates the Python environment of the training toolkit: a venv at target/venv with
# `pip install -e models/[dev]` (anomalyd-train, torch, onnx, onnxruntime, pytest).
#
# Idempotent and cached: the install is skipped when target/venv/.anomalyd-env holds the hash of
# models/pyproject.toml, this script, the Python version and the repo's path. Needs only PyPI.
# The first run downloads torch (the CUDA build from PyPI, ~5.5 GB installed, ~2 minutes).
#
# Prints the venv's path on its last line, e.g.:  . "$(scripts/python-env.sh | tail -1)/bin/activate"
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/venv"
stamp="$venv/.anomalyd-env"
python="${PYTHON:-python3}"

want="$({
    cat "$root/models/pyproject.toml" "${BASH_SOURCE[0]}"
    "$python" --version 2>&1
    echo "$root"
} | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "python-env: $venv is up to date" >&2
    echo "$venv"
    exit 0
fi

echo "python-env: creating $venv and installing models/[dev] (first run downloads torch, a few minutes)" >&2
rm -f "$stamp"
mkdir -p "$root/target"
"$python" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$venv/bin/python" -m pip install --quiet --editable "$root/models[dev]"
"$venv/bin/anomalyd-train" --help >/dev/null
echo "$want" >"$stamp"
echo "python-env: ready" >&2
echo "$venv"
