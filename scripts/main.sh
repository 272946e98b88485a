#!/usr/bin/env bash
# The main job, from nothing: set everything up, then serve a mixed LS/BE ShareGPT workload with
# --omniserve on the default model and print per-class TTFT/TPOT, BE tokens/s and sample outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m omniserve_sgl.bench.demo "$@"
