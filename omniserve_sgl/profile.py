"""Profile the SLO controller's latency model of a model on this machine, without serving:

    python -m omniserve_sgl.profile --out PATH [--model-path M] [SGLang server flags ...]

starts an ``--omniserve`` SGLang server with ``--omniserve-profile PATH`` (it times forward passes
and CPU attention jobs at start-up, at most 60 s, fits the model and writes PATH), stops it, and
prints the model and its accuracy on held-out steps. Serve with the same flags and
``--omniserve-profile PATH`` to use it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omniserve_sgl.bench.launch import SGLangServer
from omniserve_sgl.control import LatencyModel
from omniserve_sgl.default_model import ensure_default_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where to write the latency model (JSON)")
    ap.add_argument("--model-path", default=None, help="default: the embedded default model")
    args, server_flags = ap.parse_known_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; delete it to profile again", file=sys.stderr)
        return 2
    model_path = args.model_path or ensure_default_model()
    with SGLangServer(model_path, "--omniserve", "--omniserve-profile", str(args.out), *server_flags):
        pass  # the profile is written before the server answers
    if not args.out.is_file():
        print(f"no latency model written to {args.out} (too few steps fit the KV cache?)", file=sys.stderr)
        return 1
    model = LatencyModel.load(args.out)
    meta = model.meta
    print(f"latency model of {model_path} -> {args.out}: profiled in {meta['profiled_s']} s, "
          f"{len(meta['samples'])} steps and {len(meta['cpu_job_samples'])} CPU jobs; accuracy on held-out steps: "
          f"mean {100 * meta['accuracy_mean']:.1f}%, p90 {100 * meta['accuracy_p90']:.1f}%")
    print("coefficients (s per unit): " + ", ".join(
        f"{k} {getattr(model, k):.3g}" for k in ("c_step", "c_dense", "c_prefill_attn", "c_prefill_ctx", "c_decode_attn",
                                                  "c_decode_row", "c_cpu_bytes", "c_cpu_job"))
          + f"; dense staircase width {model.tile} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
