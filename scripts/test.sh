#!/usr/bin/env bash
# The project's one test command (README.md; .ci/run calls it). From nothing, it installs what
# the tests need, caching each piece, then runs every check and test:
#   - the tansu Kafka broker (cargo install, cached in ~/.cargo/bin; ~12 minutes the first time),
#   - the Python training toolkit in a venv under target/venv (scripts/python-env.sh),
#   - podman and local base images for the container image test (scripts/container-tools.sh),
#   - formatting and clippy, the Rust unit and integration tests, the Python tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
export PATH="$HOME/.cargo/bin:$PATH"
log() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }
started=$SECONDS

mkdir -p target
TANSU_VERSION=0.6.0
if ! command -v tansu >/dev/null 2>&1 || ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    log "installing the tansu broker $TANSU_VERSION (cached in ~/.cargo/bin afterwards)"
    # Built in the background while the venv installs; both are needed only by the tests.
    cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore >target/tansu-install.log 2>&1 &
    tansu_pid=$!
else
    tansu_pid=
fi

log "Python environment"
venv="$(scripts/python-env.sh | tail -1)"
scripts/deploy-tools.sh # Prometheus, Alertmanager, kubectl, kubernetes-validate, hadolint: tests/deploy.rs
scripts/container-tools.sh # podman and local base images: the container image test in tests/deploy.rs
export ANOMALYD_REQUIRE_TOOLS=1

if [[ -n "$tansu_pid" ]]; then
    log "waiting for the tansu build"
    if ! wait "$tansu_pid"; then
        tail -30 target/tansu-install.log
        echo "installing tansu failed" >&2
        exit 1
    fi
    rm -f target/tansu-install.log
fi
export TANSU_BIN="$(command -v tansu)"
export ANOMALYD_REQUIRE_TANSU=1

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

log "cargo build"
cargo build --all-targets --locked
export ANOMALYD_BIN="$root/target/debug/anomalyd"

log "Rust tests"
cargo test --locked -- --test-threads=2

log "Python tests"
"$venv/bin/python" -m pytest -q "$root/models/tests"

log "all tests passed in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
