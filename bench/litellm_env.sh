#!/usr/bin/env bash
# Create (or reuse) the LiteLLM proxy's own virtualenv, for tests/test_litellm.py (LiteLLM in
# front of activator, end to end) and bench/overhead.py (LiteLLM as a peer to compare with).
# LiteLLM is never a dependency of activator, so it lives apart from the project's venv.
#
#   bash bench/litellm_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $LITELLM_VENV, else ~/.cache/activator-bench/litellm-venv: outside the
# clone, so that CI on a fresh clone reuses it (a venv that already has the pinned version is
# left as it is: no network I/O). The tests and overhead.py look in the same places.
set -euo pipefail
venv="${1:-${LITELLM_VENV:-$HOME/.cache/activator-bench/litellm-venv}}"
python="${PYTHON:-python3}"
# Pinned exactly, and only ever bumped on purpose: tests/test_litellm.py pins what this
# version does with activator's errors (docs/litellm.md), and a gateway holds every tenant's
# keys (one LiteLLM release on PyPI was once compromised). 1.108.6 is also the newest whose
# [proxy] extra resolves from the package index CI uses: later ones pin litellm-proxy-extras
# and litellm-proxy releases that it does not serve.
version="${LITELLM_VERSION:-1.108.6}"
started=$SECONDS

installed() {
  "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null
}

if [ -x "$venv/bin/litellm" ] && [ "$(installed)" = "$version" ]; then
  echo "litellm_env: reusing $venv (litellm $version)"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
echo "litellm_env: installing litellm[proxy]==$version into $venv (about a minute)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
  "litellm[proxy]==$version"
[ "$(installed)" = "$version" ] || { echo "litellm_env: litellm $version did not install" >&2; exit 1; }
echo "litellm_env: litellm proxy ready: $venv/bin/litellm (took $((SECONDS - started))s)"
