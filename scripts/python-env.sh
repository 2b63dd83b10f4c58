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
# torch's CUDA build needs ~6 GB installed plus its download; say so before pip fails halfway
# with a bare "No space left on device" (what a CI run on a nearly full disk printed).
need_kb=$((9 * 1024 * 1024))
free_kb="$(df -Pk "$root/target" | awk 'NR == 2 { print $4 }')"
if ((free_kb < need_kb)); then
    echo "python-env: only $((free_kb / 1024)) MiB free under $root/target; the venv needs ~9 GiB (torch with its CUDA libraries)" >&2
    exit 1
fi
"$python" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$venv/bin/python" -m pip install --quiet --editable "$root/models[dev]"
"$venv/bin/anomalyd-train" --help >/dev/null
echo "$want" >"$stamp"
echo "python-env: ready" >&2
echo "$venv"
