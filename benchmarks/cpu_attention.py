"""CPU decode attention: kernel bandwidth vs the machine's read bandwidth, vs SDPA and vs vLLM's CPU
paged attention, page sizes, thread scaling, and the worker's hand-off overhead, all measured in one
run.

    .venv/bin/python benchmarks/cpu_attention.py [--quick] [--threads N] [--peers]

``--peers`` adds vLLM's CPU paged decode attention (``scripts/setup-peers.sh`` installs it) on the
same q, K/V values and page tables, checked against the same reference before timing.

Writes benchmarks/results/cpu_attention.json and cpu_attention.md (the table the README quotes).
Effective KV bandwidth = K and V bytes of the context read once / kernel time.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from omniserve_sgl import ops
from omniserve_sgl.kv import BEKVPool, BEKVPoolSpec
from omniserve_sgl.worker import CPUAttentionClient

RESULTS = Path(__file__).parent / "results"
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # (H_q, H_kv, D)
SPIN_US = 2000.0  # the busy-poll window the worker gets when it has cores of its own (config.SPIN_US)
FOOTPRINT = 1 << 30  # bytes of K and V each timed case cycles through, as many as read_bandwidth() sums


def timeit(fn, min_time: float = 0.5, min_iters: int = 3) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    return statistics.median(times)


class StealMeter:
    """Share of CPU time the hypervisor gave to other guests ("steal" in /proc/stat, via psutil) while
    the ``with`` block ran, in percent; 0 on bare metal. This VM's figures move with it."""

    def __enter__(self):
        self._start = psutil.cpu_times()
        return self

    def __exit__(self, *exc):
        end = psutil.cpu_times()
        total = _cpu_total(end) - _cpu_total(self._start)
        self.pct = 100 * (end.steal - self._start.steal) / total if total > 0 else 0.0


def _cpu_total(t) -> float:
    return sum(t) - t.guest - t.guest_nice  # Linux counts guest time inside user time already


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """The machine's read bandwidth in GB/s with all torch threads: the median of several sums of a
    buffer far larger than the caches (torch.sum is vectorized and parallel), the statistic the
    kernel's times take too."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / timeit(lambda: x.sum(), min_time=0.3, min_iters=7) / 1e9


@functools.cache
def page_reader() -> ctypes.CDLL:
    """benchmarks/page_read.cpp, compiled for this CPU (g++ -O3 -march=native) and loaded."""
    so = Path(tempfile.mkdtemp(prefix="omniserve-bench-")) / "page_read.so"
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    if platform.machine() == "x86_64":
        flags.append("-mprefer-vector-width=512")  # whole cache lines per load, as the kernel's loads
    subprocess.run(["g++", *flags, str(Path(__file__).with_name("page_read.cpp")), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.read_pages.restype = ctypes.c_uint64
    lib.read_pages.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    return lib


def pattern_read_seconds(k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor) -> float:
    """Median seconds to read an HND case's K and V pages (``tables`` as make_case gives, cycled) the
    way the kernel reads them, computing nothing: the ceiling of the access pattern, which for small
    pages lies well below the sequential read bandwidth (each page is a jump in memory)."""
    lib = page_reader()
    num_heads, page_size, d = k.shape[1:]
    head_bytes = page_size * d * k.itemsize
    nxt = cycling(tables)
    threads = torch.get_num_threads()

    def run():
        t = nxt()
        lib.read_pages(k.data_ptr(), v.data_ptr(), t.data_ptr(), t.numel(), num_heads * head_bytes, head_bytes,
                       num_heads, threads)

    return timeit(run)


def make_case(batch: int, ctx: int, shape: tuple[int, int, int], page_size: int = 16, dtype=torch.bfloat16,
              layout: str = "HND", footprint: int = FOOTPRINT):
    """Decode inputs over a paged cache in ``layout`` (the BE KV pool's default is HND): ``(q, k_cache,
    v_cache, kv_indptr, tables, kv_last_page_len)``, ``tables`` holding one kv_indices per copy of the case. The
    cache holds enough copies of the case's pages for ``footprint`` bytes of K and V, spread over it
    in random order (as pages of a real pool are): cycling through ``tables`` reads K and V from
    memory, not from the caches (this CPU's L3 can hold hundreds of MB)."""
    hq, hkv, d = shape
    npages = math.ceil(ctx / page_size)
    dims = (page_size, hkv) if layout == "NHD" else (hkv, page_size)
    case_bytes = 2 * batch * npages * page_size * hkv * d * dtype.itemsize
    copies = max(1, math.ceil(footprint / case_bytes))
    k = torch.empty(copies * batch * npages, *dims, d, dtype=dtype).uniform_(-2, 2)
    v = torch.empty_like(k).uniform_(-2, 2)
    indptr = torch.arange(0, batch * npages + 1, npages, dtype=torch.int32)
    tables = torch.randperm(copies * batch * npages).to(torch.int32).view(copies, batch * npages)
    last = torch.full((batch,), ctx - (npages - 1) * page_size, dtype=torch.int32)
    q = torch.randn(batch, hq, d).to(dtype)
    return q, k, v, indptr, tables, last


def cycling(tables: torch.Tensor):
    """A function returning the next page table on each call."""
    it = itertools.cycle(range(tables.shape[0]))
    return lambda: tables[next(it)]


def kv_bytes(batch, ctx, shape, itemsize=2):
    return 2 * batch * ctx * shape[1] * shape[2] * itemsize


PEER_BLOCK_SIZES = (16, 32, 64, 128)  # vLLM: 16 runs its vec16 path, multiples of 32 its vec (or amx) path
MAX_ABS_ERR = 0.02  # bf16 K/V and output, float32 softmax: both kernels land within 1e-3 on these inputs


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """Decode attention in float32 from an HND case's pages (``table``: one kv_indices of make_case,
    every request ``ctx`` tokens): ``[B, H_q, D]``."""
    batch, _, d = q.shape
    hkv = k.shape[1]
    pages = table.view(batch, -1).long()
    kk = k[pages].permute(0, 2, 1, 3, 4).reshape(batch, hkv, -1, d)[:, :, :ctx].float()
    vv = v[pages].permute(0, 2, 1, 3, 4).reshape(batch, hkv, -1, d)[:, :, :ctx].float()
    return F.scaled_dot_product_attention(q.float().unsqueeze(2), kk, vv, enable_gqa=True).squeeze(2)


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error of ``out`` against ``ref``.

    Raises:
        AssertionError: above MAX_ABS_ERR (a wrong layout or argument, not rounding)."""
    err = (out.float() - ref).abs().max().item()
    if not err <= MAX_ABS_ERR:
        raise AssertionError(f"{name} differs from the reference by {err:.3g} (> {MAX_ABS_ERR})")
    return err


def bench_vllm(peer, q, k, v, tables, ctx: int, nbytes: int) -> tuple[float, float]:
    """vLLM's decode attention on an HND case's K/V values, pages and page tables (make_case): the
    pages are copied into vLLM's cache with its own writer, the plan is built once (as vLLM does
    per step), and each call reads the next page table as the kernel's calls do. Returns (GB/s,
    max abs error against the reference)."""
    batch, hq, d = q.shape
    num_pages, hkv, page_size, _ = k.shape
    cache = peer.new_cache(num_pages, hkv, page_size, d, k.dtype)
    tokens = lambda x: x.permute(0, 2, 1, 3).reshape(-1, hkv, d)  # page-major tokens
    peer.write(cache, tokens(k), tokens(v), torch.arange(num_pages * page_size, dtype=torch.int64))
    plan = peer.plan(torch.full((batch,), ctx, dtype=torch.int32), hq, hkv, d, page_size, k.dtype)
    out = torch.empty_like(q)
    err = check("vLLM", peer.decode(q, cache, tables[0].view(batch, -1), plan, out), reference(q, k, v, tables[0], ctx))
    nxt = cycling(tables)
    t = timeit(lambda: peer.decode(q, cache, nxt().view(batch, -1), plan, out))
    return nbytes / t / 1e9, err


def bench_kernel(batch, ctx, shape, sdpa: bool, nhd: bool = False, page_size: int = 16, peer=None) -> dict:
    """The kernel on an HND cache (and on an NHD one with ``nhd``), SDPA on contiguous K/V, and with
    ``peer`` vLLM's CPU attention at each of PEER_BLOCK_SIZES (the row's page size on the kernel's
    own case), each reading its K and V from memory (see make_case), each checked against the
    float32 reference first."""
    q, k, v, indptr, tables, last = make_case(batch, ctx, shape, page_size=page_size)
    nxt = cycling(tables)
    out = ops.paged_decode_attention(q, k, v, indptr, tables[0], last, kv_layout="HND")
    err = check("omniserve's kernel", out[0] if isinstance(out, tuple) else out, reference(q, k, v, tables[0], ctx))
    t = timeit(lambda: ops.paged_decode_attention(q, k, v, indptr, nxt(), last, kv_layout="HND"))
    nbytes = kv_bytes(batch, ctx, shape)
    row = {"batch": batch, "ctx": ctx, "page_size": page_size, "kernel_ms": t * 1e3, "kernel_gbps": nbytes / t / 1e9,
           "kernel_max_abs_err": err}
    if peer is not None:
        by_block, errs = {}, {}
        for bs in PEER_BLOCK_SIZES:
            if bs == page_size:
                by_block[bs], errs[bs] = bench_vllm(peer, q, k, v, tables, ctx, nbytes)
            else:
                qb, kb, vb, _, tb, _ = make_case(batch, ctx, shape, page_size=bs)
                by_block[bs], errs[bs] = bench_vllm(peer, qb, kb, vb, tb, ctx, nbytes)
                del kb, vb
        best = max(by_block, key=by_block.get)
        row.update(vllm_gbps=by_block[best], vllm_block_size=best, vllm_gbps_by_block=by_block,
                   vllm_max_abs_err=max(errs.values()), x_vllm=row["kernel_gbps"] / by_block[best],
                   x_vllm_same_page_size=row["kernel_gbps"] / by_block[page_size])
    row["pattern_read_gbps"] = nbytes / pattern_read_seconds(k, v, tables) / 1e9
    row["pct_of_pattern_read"] = 100 * row["kernel_gbps"] / row["pattern_read_gbps"]
    del k, v
    if nhd:
        q, k, v, indptr, tables, last = make_case(batch, ctx, shape, layout="NHD")
        nxt = cycling(tables)
        tn = timeit(lambda: ops.paged_decode_attention(q, k, v, indptr, nxt(), last, kv_layout="NHD"))
        row["nhd_gbps"] = nbytes / tn / 1e9
        del k, v
    if sdpa:  # SDPA's best case: contiguous [B, H, L, D] K/V, no paging
        _, hkv, d = shape
        copies = max(1, math.ceil(FOOTPRINT / nbytes))
        kc = torch.empty(copies, batch, hkv, ctx, d, dtype=torch.bfloat16).uniform_(-2, 2)
        vc = torch.empty_like(kc).uniform_(-2, 2)
        qs = q.unsqueeze(2)
        it = itertools.cycle(range(copies))

        def run_sdpa():
            i = next(it)
            return F.scaled_dot_product_attention(qs, kc[i], vc[i], enable_gqa=True)

        ts = timeit(run_sdpa, min_time=0.2, min_iters=2)
        row.update(sdpa_ms=ts * 1e3, sdpa_gbps=nbytes / ts / 1e9, speedup_vs_sdpa=ts / t)
    return row


PAGE_SIZES = (16, 32, 64, 128)
PAGE_SIZE_TOLERANCE = 0.05  # a larger page must read this much faster to be the default


def bench_page_sizes(batch=64, ctx=1024, page_sizes=PAGE_SIZES, rounds: int = 3) -> list[dict]:
    """The kernel at each BE pool page size (--omniserve-cpu-page-size) on both shapes: ``rounds``
    rounds over the page sizes, interleaved so that this VM's drift reaches every size alike; each
    row holds the medians of its rounds (``kernel_gbps_rounds``: every round's GB/s)."""
    cases = [(name, ps) for name in SHAPES for ps in page_sizes]
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in cases}
    for _ in range(rounds):
        for name, ps in cases:
            with StealMeter() as steal:
                gbps = read_bandwidth()
                row = {"read_bw_gbps": gbps, **bench_kernel(batch, ctx, SHAPES[name], sdpa=False, page_size=ps)}
            runs[name, ps].append({**row, "steal_pct": steal.pct})
    rows = []
    for (name, ps), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("read_bw_gbps", "kernel_gbps", "pattern_read_gbps",
                                                                  "steal_pct")}
        rows.append({"shape": name, "page_size": ps, **med, "kernel_gbps_rounds": [r["kernel_gbps"] for r in rs],
                     "pct_of_read_bw": 100 * med["kernel_gbps"] / med["read_bw_gbps"],
                     "pct_of_pattern_read": 100 * med["kernel_gbps"] / med["pattern_read_gbps"]})
    return rows


def best_page_size(rows: list[dict]) -> int:
    """The default page size these rows call for: the smallest whose kernel GB/s, relative to the
    best page size's on the same shape and averaged over the shapes, is within PAGE_SIZE_TOLERANCE of
    the best average (a larger page wastes more of the pool: up to page size - 1 tokens per request
    and layer)."""
    sizes = sorted({r["page_size"] for r in rows})
    shapes = sorted({r["shape"] for r in rows})
    gbps = {(r["shape"], r["page_size"]): r["kernel_gbps"] for r in rows}
    score = {ps: statistics.fmean(gbps[s, ps] / max(gbps[s, p] for p in sizes) for s in shapes) for ps in sizes}
    best = max(score.values())
    return min(ps for ps in sizes if score[ps] >= (1 - PAGE_SIZE_TOLERANCE) * best)


def bench_threads(shape, batch=16, ctx=4096) -> list[dict]:
    """The kernel at 1, 2, 4, ... threads up to all of them, each against the read bandwidth the same
    number of threads gets (torch.sum), measured right before it."""
    q, k, v, indptr, tables, last = make_case(batch, ctx, shape)
    nxt = cycling(tables)
    n = torch.get_num_threads()
    counts = sorted({*(2 ** i for i in range(n.bit_length()) if 2 ** i <= n), n})
    nbytes = kv_bytes(batch, ctx, shape)
    rows = []
    for threads in counts:
        torch.set_num_threads(threads)
        gbps = read_bandwidth()
        t = timeit(lambda: ops.paged_decode_attention(q, k, v, indptr, nxt(), last, kv_layout="HND"))
        rows.append({"threads": threads, "read_bw_gbps": gbps, "kernel_ms": t * 1e3, "kernel_gbps": nbytes / t / 1e9,
                     "pct_of_read_bw": 100 * nbytes / t / 1e9 / gbps})
    torch.set_num_threads(n)
    for r in rows:
        r["speedup"] = rows[0]["kernel_ms"] / r["kernel_ms"]
    return rows


def layer_forward(ms: float = 1.0):
    """A stand-in for one layer's dense work on the CPU device: a bf16 matmul on all torch threads,
    sized to take about ``ms`` milliseconds here (what SGLang's CPU forward spends per layer of the
    default model in a decode step: about 1.5 ms, from the latency model's per-step terms)."""
    a = torch.randn(256, 576).bfloat16()
    b = torch.randn(576, 1536).bfloat16()
    once = timeit(lambda: a @ b, min_time=0.2)
    reps = max(1, round(ms / 1e3 / once))

    def run():
        for _ in range(reps):
            a @ b
    return run
def bench_handoff(threads: int, spin_us: float = 0.0, rows: int = 32, ctx: int = 1024, steps: int = 400,
                  own_core: bool | None = None, forward=None) -> dict:
    """Per-layer hand-off of a decode step of `rows` BE rows (default model's shape): round trip of
    submit + wait (staging copies, doorbell or ZeroMQ both ways, kernel) minus the kernel time the
    worker reports (taken in C++ around the append and attention ops, their argument checks included). With `spin_us`, both sides busy-poll shared memory. With `own_core` (default: when
    spinning), the worker gets the last core to itself and this process the others, as
    --omniserve-cpu-cores would arrange; else it shares every core with this process, as on
    SGLang's CPU device. ``forward`` (e.g. layer_forward()) runs before each job, as a layer's dense
    work does in a synchronous decode step: ``layer_us_p50`` is then the whole layer's time."""
    hq, hkv, d = SHAPES["smollm2-135m"]
    spec = BEKVPoolSpec(num_layers=2, num_kv_heads=hkv, head_dim=d, num_pages=rows * ctx // 16 + rows)
    pool = BEKVPool.create(spec)
    cores = sorted(os.sched_getaffinity(0))
    split = (spin_us > 0 if own_core is None else own_core) and len(cores) > 1
    if split:
        pin_process(cores[:-1])
    client = CPUAttentionClient.start(threads=1 if split else threads, cores=str(cores[-1]) if split else None,
                                      spin_us=spin_us)
    try:
        client.attach_pool(pool)
        client.create_staging(num_slots=2, max_rows=rows, max_pages=spec.num_pages, num_qo_heads=hq)
        for i in range(rows):
            pool.allocator.allocate(i, ctx)
        meta = pool.allocator.kv_metadata(list(range(rows)))
        q = torch.randn(rows, hq, d).bfloat16()
        k_new = torch.randn(rows, hkv, d).bfloat16()
        out, lse = torch.empty_like(q), torch.empty(rows, hq)  # as the SGLang glue passes its buffers
        overhead, round_trip, layer = [], [], []
        with StealMeter() as steal:
            for i in range(steps):
                t0 = time.perf_counter()
                if forward is not None:
                    forward()
                t = time.perf_counter()
                client.wait(client.submit_decode(i % 2, q, *meta, k_new=k_new, v_new=k_new), out=out, lse=lse)
                t1 = time.perf_counter()
                rt = (t1 - t) * 1e6
                if i >= 20:
                    round_trip.append(rt)
                    overhead.append(rt - client.last_kernel_us)
                    layer.append((t1 - t0) * 1e6)
        ping = [client.ping() * 1e6 for _ in range(200)]
        copies = staging_copies(client.staging.slots[0], q, k_new)
    finally:
        client.close()
        pool.close()
        pin_process(cores)
    return {"rows": rows, "ctx": ctx, "spin_us": spin_us, "worker_threads": 1 if split else threads,
            "own_core": split, "forward": forward is not None, "layer_us_p50": quantile(layer, 0.5),
            "overhead_us_p50": quantile(overhead, 0.5), "overhead_us_p99": quantile(overhead, 0.99),
            "round_trip_us_p50": quantile(round_trip, 0.5), "ping_us_p50": quantile(ping, 0.5),
            "data_copies_us_p50": copies, "job_messages": client.job_messages,
            "result_messages": client.result_messages, "jobs": steps,
            "steal_pct": steal.pct}


def pin_process(cores: list[int]) -> None:
    """Pins every thread of this process to ``cores``: os.sched_setaffinity(0) pins the calling thread
    only, and the OpenMP threads the kernel rows started could otherwise run on the worker's core."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread has exited
            pass


def staging_copies(slot: dict, q: torch.Tensor, kv: torch.Tensor, n: int = 200) -> float:
    """Median time of one job's data transfer on the client, us: q, k, v into the staging slot and
    out, lse back out of it (on a GPU these are the device-host copies)."""
    rows = q.shape[0]
    out, lse = torch.empty_like(slot["out"][:rows]), torch.empty_like(slot["lse"][:rows])
    times = []
    for _ in range(n):
        t = time.perf_counter()
        slot["q"][:rows].copy_(q)
        slot["k"][:rows].copy_(kv)
        slot["v"][:rows].copy_(kv)
        out.copy_(slot["out"][:rows])
        lse.copy_(slot["lse"][:rows])
        times.append((time.perf_counter() - t) * 1e6)
    return quantile(times, 0.5)


def median_run(bench, runs: int = 5, key: str = "overhead_us_p50") -> dict:
    """The run of ``runs`` whose ``key`` is the median (this VM's neighbours come and go within
    seconds), with every run's value in ``<key>_runs`` and its steal in ``steal_pct_runs``, in the
    same order."""
    results = sorted((bench() for _ in range(runs)), key=lambda r: r[key])
    return {**results[runs // 2], f"{key}_runs": [r[key] for r in results],
            "steal_pct_runs": [r["steal_pct"] for r in results]}


def quantile(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    ap.add_argument("--peers", action="store_true", help="add vLLM's CPU paged attention (scripts/setup-peers.sh)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default %(default)s)")
    args = ap.parse_args()
    peer = None
    if args.peers:
        from peers import PeerMissing, vllm_ops
        try:
            peer = vllm_ops()
        except PeerMissing as e:
            ap.error(str(e))
        print(f"peer: {peer.describe()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    machine_gbps = read_bandwidth()
    print(f"machine read bandwidth ({threads} threads): {machine_gbps:.1f} GB/s; kernel: {ops.decode_backend()}")
    grid = [(8, 1024), (8, 16384), (32, 4096), (64, 1024), (64, 256), (64, 512)]
    if args.quick:
        grid = [(8, 1024), (64, 256)]
    rows = []
    for name, shape in SHAPES.items():
        for batch, ctx in grid:
            # This VM's bandwidth drifts within a run: each row is compared with a measurement taken
            # right before it.
            with StealMeter() as steal:
                row_gbps = read_bandwidth()
                row = {"shape": name, "read_bw_gbps": row_gbps,
                       **bench_kernel(batch, ctx, shape, sdpa=ctx <= 4096, nhd=True, peer=peer)}
            row.update(pct_of_read_bw=100 * row["kernel_gbps"] / row_gbps, steal_pct=steal.pct)
            rows.append(row)
            print(f"{name:13s} B={batch:3d} ctx={ctx:6d}: {row['kernel_gbps']:5.1f} GB/s "
                  f"({row['pct_of_read_bw']:3.0f}% of read BW, {row['pct_of_pattern_read']:3.0f}% of page-pattern read)"
                  + (f", {row['speedup_vs_sdpa']:.1f}x SDPA" if "sdpa_ms" in row else "")
                  + (f", {row['x_vllm']:.2f}x vLLM (block {row['vllm_block_size']})" if peer else ""))
    pages = bench_page_sizes(page_sizes=(16, 64) if args.quick else PAGE_SIZES, rounds=1 if args.quick else 3)
    print("page sizes: " + ", ".join(f"{r['shape']} {r['page_size']}: {r['pct_of_read_bw']:.0f}%" for r in pages))
    scaling = bench_threads(SHAPES["llama3-8b"])
    print(f"threads: {scaling}")
    linear = [bench_kernel(16, c, SHAPES["smollm2-135m"], sdpa=False) for c in (512, 2048, 8192)]
    shared = max(1, threads // 2)  # the worker's default threads on the CPU device
    forward = layer_forward()
    runs = 3 if args.quick else 5
    handoff = [median_run(lambda: bench_handoff(threads), runs),
               median_run(lambda: bench_handoff(threads, spin_us=SPIN_US), runs),
               median_run(lambda: bench_handoff(shared, forward=forward, own_core=False), runs, "layer_us_p50"),
               median_run(lambda: bench_handoff(shared, spin_us=SPIN_US, forward=forward, own_core=False), runs,
                          "layer_us_p50")]
    print(f"hand-off: {handoff}")

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "read_bandwidth_gbps": machine_gbps, "kernel": ops.decode_backend(),
                    "torch": torch.__version__, "peers": peer.describe() if peer else None},
        "kernel": rows, "page_sizes": pages, "thread_scaling": scaling, "linearity": linear, "handoff": handoff,
        "defaults": {"page_size": best_page_size(pages), "spin_us": SPIN_US},
    }
    args.out.mkdir(exist_ok=True)
    (args.out / "cpu_attention.json").write_text(json.dumps(result, indent=2))
    (args.out / "cpu_attention.md").write_text(markdown(result))
    print(f"defaults: {result['defaults']}")
    print(f"wrote {args.out / 'cpu_attention.json'} and cpu_attention.md")


def markdown(r: dict) -> str:
    m = r["machine"]
    peers = "kernel" in r and "x_vllm" in r["kernel"][0]
    lines = [
        (f"Machine: {m['threads']} threads, read bandwidth {m['read_bandwidth_gbps']:.1f} GB/s at the start (torch.sum "
         f"of 1 GiB; the read BW column is the same measurement taken right before each row), kernel "
         f"`{m['kernel']}`, torch {m['torch']}. bf16 KV, page size 16, scattered pages, HND layout (the BE KV pool's); "
         "the NHD column is the same kernel on an NHD cache. Each case cycles through 1 GiB of copies of its K/V, so K "
         "and V come from memory, not from the caches. Page-pattern read: the same pages read in the kernel's order "
         "by a loop that computes nothing (benchmarks/page_read.cpp), the ceiling of this access pattern. Host steal: "
         "the share of CPU time the hypervisor gave to other guests while the row ran (0 on bare metal)."),
        "",
    ]
    if peers:
        lines += [
            (f"vLLM: {m['peers']}, loaded into the same process: the same q, the same K/V values written into its "
             "cache by its own writer, the same page tables (for other block sizes, the same case made with pages of "
             "that size), the same threads, the plan built once per batch as vLLM's backend does per step, every "
             "output checked against a float32 reference before timing (max abs error: ours "
             f"{max(x['kernel_max_abs_err'] for x in r['kernel']):.1e}, vLLM "
             f"{max(x['vllm_max_abs_err'] for x in r['kernel']):.1e}). vLLM GB/s is its best block size of "
             f"{', '.join(map(str, PEER_BLOCK_SIZES))} (block 16 runs its `vec16` path, the others `vec`; this CPU "
             "has no AMX for its `amx` path); x vLLM = our GB/s over that, x vLLM@16 over vLLM at our page size."),
            "",
        ]
    head = ("| shape (H_q/H_kv/D) | batch | context | read BW GB/s | kernel ms | kernel GB/s | % of read BW | "
            "page-pattern read GB/s | % of page-pattern read | NHD GB/s | SDPA ms | SDPA % of read BW | x SDPA |")
    if peers:
        head += " vLLM GB/s | vLLM block | x vLLM | x vLLM@16 |"
    lines += [head + " host steal % |", "|" + "---|" * (head.count("|"))]
    for row in r["kernel"]:
        hq, hkv, d = SHAPES[row["shape"]]
        sd = (f"{row['sdpa_ms']:.2f} | {100 * row['sdpa_gbps'] / row['read_bw_gbps']:.0f}% | "
              f"{row['speedup_vs_sdpa']:.1f}" if "sdpa_ms" in row else "- | - | -")
        vl = (f" {row['vllm_gbps']:.1f} | {row['vllm_block_size']} | {row['x_vllm']:.2f} | "
              f"{row['x_vllm_same_page_size']:.2f} |" if peers else "")
        lines.append(f"| {row['shape']} ({hq}/{hkv}/{d}) | {row['batch']} | {row['ctx']} | {row['read_bw_gbps']:.1f} | "
                     f"{row['kernel_ms']:.2f} | {row['kernel_gbps']:.1f} | {row['pct_of_read_bw']:.0f}% | "
                     f"{row['pattern_read_gbps']:.1f} | {row['pct_of_pattern_read']:.0f}% | {row['nhd_gbps']:.1f} | {sd} |"
                     f"{vl} {row['steal_pct']:.0f} |")
    dflt = r["defaults"]
    lines += [
        "",
        ("BE KV pool page size (--omniserve-cpu-page-size), B=64, ctx 1024: each page is a jump in memory (at page "
         "size 16 a page's K, or V, is 6 KB on smollm2-135m, 32 KB on llama3-8b); medians of 3 rounds over the sizes, "
         "interleaved. The default is the smallest page size whose GB/s, relative to the best size's on each shape "
         f"and averaged over both, is within {100 * PAGE_SIZE_TOLERANCE:.0f}% of the best such average: "
         f"**{dflt['page_size']}** (`tests/unit/test_config.py` holds the code's default to it)."),
        "",
        ("| shape | page size | read BW GB/s | kernel GB/s | every round's GB/s | % of read BW | page-pattern read GB/s | "
         "% of page-pattern read | host steal % |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["page_sizes"]:
        rounds = ", ".join(f"{x:.1f}" for x in row["kernel_gbps_rounds"])
        lines.append(f"| {row['shape']} | {row['page_size']} | {row['read_bw_gbps']:.1f} | {row['kernel_gbps']:.1f} | {rounds} | "
                     f"{row['pct_of_read_bw']:.0f}% | {row['pattern_read_gbps']:.1f} | {row['pct_of_pattern_read']:.0f}% | "
                     f"{row['steal_pct']:.0f} |")
    lin = ", ".join(f"ctx {x['ctx']}: {x['kernel_ms']:.2f} ms" for x in r["linearity"])
    lines += [
        "",
        "Thread scaling (llama3-8b, B=16, ctx 4096; read BW with the same threads, measured right before):",
        "",
        "| threads | read BW GB/s | kernel ms | kernel GB/s | % of read BW | speed-up over 1 thread |",
        "|---|---|---|---|---|---|",
        *(f"| {x['threads']} | {x['read_bw_gbps']:.1f} | {x['kernel_ms']:.2f} | {x['kernel_gbps']:.1f} | "
          f"{x['pct_of_read_bw']:.0f}% | {x['speedup']:.2f} |" for x in r["thread_scaling"]),
        "",
        f"Linearity (smollm2-135m, B=16): {lin}.",
        "",
        ("Worker hand-off, decode step of 32 BE rows (smollm2-135m, ctx 1024); overhead = round trip minus kernel; "
         "the median of the runs (every run's p50 in brackets, with the share of CPU time the host stole during it). "
         "The last two rows run a layer's dense work (a bf16 matmul on every core, about 1 ms) before each job, as a "
         "synchronous decode step on SGLang's CPU device does, with the worker sharing the cores (its default there): "
         "layer time = that work + hand-off + kernel."),
        "",
        ("| mode | worker threads | cores | layer time p50 us | overhead p50 us | overhead p99 us | of which data copies us "
         "| round trip p50 us | jobs sent over ZeroMQ | results sent over ZeroMQ | empty ZeroMQ ping p50 us |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in r["handoff"]:
        mode = f"busy-poll {h['spin_us']:.0f} us" if h["spin_us"] else "block on ZeroMQ"
        cores = "worker on its own core" if h["own_core"] else "shared"
        key = "layer_us_p50" if h["forward"] else "overhead_us_p50"
        runs = ", ".join(f"{x:.0f} @{st:.0f}%" for x, st in zip(h[f"{key}_runs"], h["steal_pct_runs"]))
        layer = f"{h['layer_us_p50']:.0f} ({runs})" if h["forward"] else "-"
        over = f"{h['overhead_us_p50']:.0f}" + ("" if h["forward"] else f" ({runs})")
        lines.append(f"| {mode} | {h['worker_threads']} | {cores}{' + dense work' if h['forward'] else ''} | {layer} | "
                     f"{over} | {h['overhead_us_p99']:.0f} | {h['data_copies_us_p50']:.0f} | {h['round_trip_us_p50']:.0f} | "
                     f"{h['job_messages']} of {h['jobs']} | {h['result_messages']} of {h['jobs']} | "
                     f"{h['ping_us_p50']:.0f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
