"""The piggybacking executor on a plain torch decoder of Llama-3-8B's shape (random weights, as many
layers as asked), with the real CPU attention worker: how much an LS decode pass slows down when BE
rows ride along, against the same pass without them, in one run.

    .venv/bin/python benchmarks/piggyback.py [--layers N] [--device cuda|cpu] [--quick]

Per number of offloaded BE requests (0, 8, 32, 128) and mode (``async``: piggybacking, ``sync``:
every BE row in every pass, the pass waits for the worker at each layer, the NEO-like baseline):
LS pass time (p50, p90, and p50 over the no-BE pass's p50), the BE rows that joined each layer
(mean), the passes with LS rows that waited for the worker and the time they waited, BE tokens/s,
the scheduler thread's hand-off cost per CPU job, and the share of jobs whose page table the
worker planned (the others ran the plan made for the same rows at an earlier layer). Needs no SGLang: it runs on a GPU machine
with torch and a compiler (``scripts/gpu_check.sh``).

Writes benchmarks/results/piggyback[-cuda].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from omniserve_sgl import ops
from omniserve_sgl.be_runtime import BERuntime
from omniserve_sgl.config import OmniServeConfig
from omniserve_sgl.piggyback import LlamaShape, LSBatch, PiggybackExecutor, TorchLlama
from omniserve_sgl.piggyback.torch_llama import DenseKV

RESULTS = Path(__file__).parent / "results"


def _runtime(shape: LlamaShape, be: int, be_context: int, passes: int, threads: int, cores: str | None,
             spin_us: float, dtype: torch.dtype) -> BERuntime:
    page = 64
    tokens = max(be, 1) * page * -(-(be_context + passes + 64) // page)
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype.itemsize
    config = OmniServeConfig(True, cpu_kv_gb=tokens * per_token * 1.05 / (1 << 30) + 0.01, cpu_threads=threads,
                             cpu_cores=cores, cpu_spin_us=spin_us, page_size=page)
    return BERuntime(config, shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.num_qo_heads, dtype,
                     max_rows=max(be, 1), staging_slots=2 * shape.num_layers + 2,
                     worker=config.worker_setup("cpu" if cores is None else "cuda"))


def run_case(model: TorchLlama, args, be: int, mode: str) -> dict:
    """Runs ``args.passes`` timed LS decode passes (after warm-up ones) with ``be`` offloaded BE
    requests of ``args.be_context`` tokens each in ``mode``."""
    shape, dev = model.shape, model.device
    rt = _runtime(shape, be, args.be_context, args.passes + args.warmup, args.threads, args.cores, args.spin_us,
                  model.dtype)
    try:
        ex = PiggybackExecutor(model, rt, capacity=max(be, 1), mode=mode)
        for i in range(be):  # KV values do not change the time: the pool's pages are left as they are
            rt.reserve(i, args.be_context + args.passes + args.warmup + 64)
            rt.pages.extend(i, args.be_context)
            ex.add(i, i % shape.vocab_size, args.be_context)
        cache = DenseKV(model, args.ls_rows, args.ls_context + args.passes + args.warmup + 1)
        ids = torch.randint(0, shape.vocab_size, (args.ls_rows,), device=dev)
        times, waits, waited, rows, tokens = [], 0, 0.0, 0, 0
        jobs0 = handoff0 = plans0 = 0
        t_start = 0.0
        for p in range(args.warmup + args.passes):
            if p == args.warmup:
                jobs0, handoff0, plans0 = ex.jobs_total, ex.handoff_s_total, rt.client.plans_made
                t_start = time.perf_counter()
            pos = torch.full((args.ls_rows,), args.ls_context + p, device=dev)
            batch = LSBatch(ids, pos, lambda layer, q, k, v, pos=pos: cache.attend(layer, q, k, v, pos, None,
                                                                                  model.sm_scale))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = ex.run_pass(batch)
            ids = model.logits(res.ls_hidden).argmax(-1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if p >= args.warmup:
                times.append(dt)
                waits += res.waits > 0
                waited += res.waited_s
                rows += res.piggybacked_rows
                tokens += len(res.be_tokens)
        wall = time.perf_counter() - t_start
        jobs = ex.jobs_total - jobs0
        times.sort()
        return {
            "be_requests": be, "mode": mode,
            "ls_pass_ms_p50": 1e3 * statistics.median(times),
            "ls_pass_ms_p90": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))],
            "be_rows_per_layer": rows / (args.passes * shape.num_layers),
            "passes_that_waited": waits, "waited_ms_per_pass": 1e3 * waited / args.passes,
            "be_tokens_per_s": tokens / wall,
            "handoff_us_per_job": 1e6 * (ex.handoff_s_total - handoff0) / jobs if jobs else 0.0,
            "jobs": jobs,
            # jobs that checked and split their page table on the worker; the rest ran a plan made
            # for the same rows at an earlier layer (plan/run split)
            "plans_per_job": (rt.client.plans_made - plans0) / jobs if jobs else 0.0,
        }
    finally:
        rt.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32 on CUDA, 2 on the CPU)")
    ap.add_argument("--ls-rows", type=int, default=None, help="LS decode rows per pass (default 32 CUDA, 4 CPU)")
    ap.add_argument("--ls-context", type=int, default=1024)
    ap.add_argument("--be-context", type=int, default=None, help="BE context tokens (default 1024 CUDA, 256 CPU)")
    ap.add_argument("--be", default="0,8,32,128", help="offloaded BE requests per case, comma-separated")
    ap.add_argument("--passes", type=int, default=None, help="timed passes per case (default 40 CUDA, 8 CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="worker threads (default: its cores)")
    ap.add_argument("--cores", default=None, help="worker cores (default on CUDA: all but the first 3)")
    ap.add_argument("--quick", action="store_true", help="fewer passes, BE counts 0 and 8")
    args = ap.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.layers = args.layers or (32 if on_cuda else 2)
    args.ls_rows = args.ls_rows or (32 if on_cuda else 4)
    args.be_context = args.be_context or (1024 if on_cuda else 256)
    args.passes = args.passes or (40 if on_cuda else 16)
    args.warmup = args.warmup if args.warmup is not None else (2 * args.layers if on_cuda else 4)
    ncpu = len(os.sched_getaffinity(0))
    if on_cuda and args.cores is None and ncpu > 4:
        args.cores = f"3-{ncpu - 1}"
    args.spin_us = 2000.0 if args.cores else 0.0
    args.threads = args.threads or (ncpu - 3 if args.cores else max(1, ncpu // 2))
    counts = [int(x) for x in args.be.split(",")]
    if args.quick:
        counts, args.passes = [c for c in counts if c <= 8], max(3, args.passes // 2)
    dtype = torch.bfloat16 if on_cuda else torch.float32  # CPUs without AVX-512 BF16 run bf16 GEMMs ~40x slower
    model = TorchLlama(LlamaShape.llama3_8b(args.layers), dtype, args.device)
    rows = []
    for be in counts:
        for mode in (("async",) if be == 0 else ("async", "sync")):
            row = run_case(model, args, be, mode)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r["ls_pass_ms_p50"] for r in rows if r["be_requests"] == 0), None)
    for r in rows:
        r["x_no_be"] = r["ls_pass_ms_p50"] / base if base else None
    setup = {
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "kernel": ops.decode_backend(), "cpus": ncpu,
        "shape": f"Llama-3-8B, {args.layers} of 32 layers, {str(dtype)[6:]}, random weights",
        "ls_rows": args.ls_rows, "ls_context": args.ls_context, "be_context": args.be_context,
        "passes": args.passes, "warmup": args.warmup, "worker_threads": args.threads,
        "worker_cores": args.cores or "shared", "spin_us": args.spin_us,
    }
    name = "piggyback-cuda" if on_cuda else "piggyback"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(report(setup, rows))
    print(report(setup, rows))


def report(setup: dict, rows: list[dict]) -> str:
    head = ", ".join(f"{k} {v}" for k, v in setup.items())
    lines = [f"Setup: {head}.", "",
             ("| BE requests | mode | LS pass p50 ms | p90 ms | x no BE | BE rows per layer | passes that waited "
              "| waited ms per pass | BE tokens/s | hand-off us per job | plans per job |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['be_requests']} | {r['mode']} | {r['ls_pass_ms_p50']:.1f} | {r['ls_pass_ms_p90']:.1f} | "
                     f"{r['x_no_be']:.2f} | {r['be_rows_per_layer']:.1f} | {r['passes_that_waited']} | "
                     f"{r['waited_ms_per_pass']:.1f} | {r['be_tokens_per_s']:.1f} | {r['handoff_us_per_job']:.0f} | "
                     f"{r['plans_per_job']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
