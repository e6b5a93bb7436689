#!/usr/bin/env bash
# Create the LiteLLM proxy's own virtualenv for bench/overhead.py (LiteLLM is a peer we
# compare against, never a dependency of activator, so it lives apart from the project's
# venv). Usage:  bash bench/litellm_env.sh [VENV_DIR]
# VENV_DIR defaults to $LITELLM_VENV, else ~/.cache/activator-bench/litellm-venv; overhead.py
# looks in the same places (or takes --litellm PATH_TO_litellm_BINARY).
set -euo pipefail
venv="${1:-${LITELLM_VENV:-$HOME/.cache/activator-bench/litellm-venv}}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet 'litellm[proxy]'
"$venv/bin/litellm" --version >/dev/null 2>&1 || true
echo "litellm proxy ready: $venv/bin/litellm"
