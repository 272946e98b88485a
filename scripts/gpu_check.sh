#!/usr/bin/env bash
# GPU checks of omniserve-sgl's own components, for a machine with python3 + torch + CUDA, nvcc and
# 16 cores but no SGLang and no network (the device machine of docs: see the README's "GPU checks").
#
#   scripts/gpu_check.sh --fetch-wheels   # here, with network: pyzmq and orjson wheels into .gpu-wheels/
#   scripts/gpu_check.sh                  # there (carry .gpu-wheels): build, CUDA tests, benchmarks
#
# Builds the C++ extension in place against that machine's torch, runs the worker and CUDA tests
# (tests/worker: pinned pool and staging, jobs staged from GPU tensors, the executor on a GPU model)
# and benchmarks/piggyback.py on Llama-3-8B's shape; results go to benchmarks/results/piggyback-cuda.*
# and, when $OUT is set, are copied there with the test log. Takes under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=.gpu-wheels

if [ "${1:-}" = "--fetch-wheels" ]; then
  # The device machine's python3 is 3.12 (KINDS.md) and lacks these two of our dependencies.
  pyver=${GPU_PYTHON_VERSION:-3.12}
  "$py" -m pip download -q pyzmq orjson --python-version "$pyver" --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels"
  ls "$wheels"
  exit 0
fi

out=${OUT:-}
log() { printf '[gpu_check %s] %s\n' "$(date +%T)" "$*" >&2; }
nvidia-smi -L
if ! "$py" -c "import zmq, orjson" 2>/dev/null; then
  [ -d "$wheels" ] || { echo "pyzmq/orjson missing and no $wheels/: run '$0 --fetch-wheels' where there is network" >&2; exit 2; }
  log "installing $(ls $wheels | tr '\n' ' ')into .gpu-deps"
  "$py" -m pip install -q --no-index --no-deps --target .gpu-deps "$wheels"/*.whl
  export PYTHONPATH="$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
fi
log "building the extension"
MAX_JOBS=16 "$py" setup.py -q build_ext --inplace 2>&1 | grep -v "^running\|^copying" || true
"$py" -c "from omniserve_sgl import ops; print('kernel', ops.decode_backend())"
log "tests: worker layer (CUDA tests included)"
set +e
"$py" -m pytest -q -p no:cacheprovider tests/worker tests/kernel -x 2>&1 | tee /tmp/gpu_check_tests.log | tail -25
tests_rc=${PIPESTATUS[0]}
set -e
log "benchmarks/piggyback.py"
PYTHONUNBUFFERED=1 timeout 300 "$py" benchmarks/piggyback.py 2>&1 | grep -v "CPU attention worker on"
if [ -n "$out" ]; then
  cp benchmarks/results/piggyback-cuda.json benchmarks/results/piggyback-cuda.md /tmp/gpu_check_tests.log "$out"/
fi
log "done (tests exit $tests_rc)"
exit "$tests_rc"
