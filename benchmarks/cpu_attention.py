"""CPU decode attention: kernel bandwidth vs the machine's read bandwidth and vs SDPA, thread
scaling, and the worker's hand-off overhead, all measured in one run.

    .venv/bin/python benchmarks/cpu_attention.py [--quick] [--threads N]

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


def bench_kernel(batch, ctx, shape, sdpa: bool, nhd: bool = False, page_size: int = 16) -> dict:
    """The kernel on an HND cache (and on an NHD one with ``nhd``), and SDPA on contiguous K/V, each
    reading its K and V from memory (see make_case)."""
    q, k, v, indptr, tables, last = make_case(batch, ctx, shape, page_size=page_size)
    nxt = cycling(tables)
    t = timeit(lambda: ops.paged_decode_attention(q, k, v, indptr, nxt(), last, kv_layout="HND"))
    nbytes = kv_bytes(batch, ctx, shape)
    row = {"batch": batch, "ctx": ctx, "page_size": page_size, "kernel_ms": t * 1e3, "kernel_gbps": nbytes / t / 1e9}
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


def bench_page_sizes(shape, batch=64, ctx=1024, page_sizes=(16, 32, 64)) -> list[dict]:
    """The kernel at each BE pool page size (--omniserve-cpu-page-size), each row against the read
    bandwidth measured right before it."""
    rows = []
    for ps in page_sizes:
        with StealMeter() as steal:
            gbps = read_bandwidth()
            row = {"read_bw_gbps": gbps, **bench_kernel(batch, ctx, shape, sdpa=False, page_size=ps)}
        row.update(pct_of_read_bw=100 * row["kernel_gbps"] / gbps, steal_pct=steal.pct)
        rows.append(row)
    return rows


def bench_threads(shape, batch=16, ctx=4096) -> dict:
    q, k, v, indptr, tables, last = make_case(batch, ctx, shape)
    nxt = cycling(tables)
    n = torch.get_num_threads()
    out = {}
    for threads in sorted({1, n}):
        torch.set_num_threads(threads)
        out[threads] = timeit(lambda: ops.paged_decode_attention(q, k, v, indptr, nxt(), last, kv_layout="HND"))
    torch.set_num_threads(n)
    return {"threads": n, "speedup": out[1] / out[n], "ms_1_thread": out[1] * 1e3, "ms_all": out[n] * 1e3}


def bench_handoff(threads: int, spin_us: float = 0.0, rows: int = 32, ctx: int = 1024, steps: int = 400) -> dict:
    """Per-layer hand-off of a decode step of `rows` BE rows (default model's shape): round trip of
    submit + wait (staging copies, doorbell or ZeroMQ both ways, kernel) minus the kernel time the
    worker reports (taken in C++ around the append and attention ops, their argument checks included). With `spin_us`, both sides busy-poll shared memory; the worker then gets the last
    core to itself and this process the others, as --omniserve-cpu-cores would arrange."""
    hq, hkv, d = SHAPES["smollm2-135m"]
    spec = BEKVPoolSpec(num_layers=2, num_kv_heads=hkv, head_dim=d, num_pages=rows * ctx // 16 + rows)
    pool = BEKVPool.create(spec)
    cores = sorted(os.sched_getaffinity(0))
    split = spin_us > 0 and len(cores) > 1
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
        overhead, round_trip = [], []
        with StealMeter() as steal:
            for i in range(steps):
                t = time.perf_counter()
                client.wait(client.submit_decode(i % 2, q, *meta, k_new=k_new, v_new=k_new), out=out, lse=lse)
                rt = (time.perf_counter() - t) * 1e6
                if i >= 20:
                    round_trip.append(rt)
                    overhead.append(rt - client.last_kernel_us)
        ping = [client.ping() * 1e6 for _ in range(200)]
        copies = staging_copies(client.staging.slots[0], q, k_new)
    finally:
        client.close()
        pool.close()
        pin_process(cores)
    return {"rows": rows, "ctx": ctx, "spin_us": spin_us, "worker_threads": 1 if split else threads,
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


def median_run(bench, runs: int = 5) -> dict:
    """The run of ``runs`` whose p50 overhead is the median (this VM's neighbours come and go within
    seconds), with every run's p50 in ``overhead_us_p50_runs``."""
    results = sorted((bench() for _ in range(runs)), key=lambda r: r["overhead_us_p50"])
    return {**results[runs // 2], "overhead_us_p50_runs": [r["overhead_us_p50"] for r in results],
            "steal_pct_runs": [r["steal_pct"] for r in results]}


def quantile(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    args = ap.parse_args()
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
                       **bench_kernel(batch, ctx, shape, sdpa=ctx <= 4096, nhd=True)}
            row.update(pct_of_read_bw=100 * row["kernel_gbps"] / row_gbps, steal_pct=steal.pct)
            rows.append(row)
            print(f"{name:13s} B={batch:3d} ctx={ctx:6d}: {row['kernel_gbps']:5.1f} GB/s "
                  f"({row['pct_of_read_bw']:3.0f}% of read BW, {row['pct_of_pattern_read']:3.0f}% of page-pattern read)" + (f", {row['speedup_vs_sdpa']:.1f}x SDPA" if "sdpa_ms" in row else ""))
    pages = bench_page_sizes(SHAPES["smollm2-135m"])
    print("page sizes: " + ", ".join(f"{r['page_size']}: {r['pct_of_read_bw']:.0f}%" for r in pages))
    scaling = bench_threads(SHAPES["llama3-8b"])
    print(f"threads: {scaling}")
    linear = [bench_kernel(16, c, SHAPES["smollm2-135m"], sdpa=False) for c in (512, 2048, 8192)]
    handoff = [median_run(lambda: bench_handoff(threads)),
               median_run(lambda: bench_handoff(threads, spin_us=2000))]
    print(f"hand-off: {handoff}")

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "read_bandwidth_gbps": machine_gbps, "kernel": ops.decode_backend(),
                    "torch": torch.__version__},
        "kernel": rows, "page_sizes": pages, "thread_scaling": scaling, "linearity": linear, "handoff": handoff,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_attention.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "cpu_attention.md").write_text(markdown(result))
    print(f"wrote {RESULTS / 'cpu_attention.json'} and cpu_attention.md")


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        (f"Machine: {m['threads']} threads, read bandwidth {m['read_bandwidth_gbps']:.1f} GB/s at the start (torch.sum "
         f"of 1 GiB; the read BW column is the same measurement taken right before each row), kernel "
         f"`{m['kernel']}`, torch {m['torch']}. bf16 KV, page size 16, scattered pages, HND layout (the BE KV pool's); "
         "the NHD column is the same kernel on an NHD cache. Each case cycles through 1 GiB of copies of its K/V, so K "
         "and V come from memory, not from the caches. Page-pattern read: the same pages read in the kernel's order "
         "by a loop that computes nothing (benchmarks/page_read.cpp), the ceiling of this access pattern. Host steal: "
         "the share of CPU time the hypervisor gave to other guests while the row ran (0 on bare metal)."),
        "",
        ("| shape (H_q/H_kv/D) | batch | context | read BW GB/s | kernel ms | kernel GB/s | % of read BW | "
         "page-pattern read GB/s | % of page-pattern read | NHD GB/s | SDPA ms | SDPA % of read BW | x SDPA | "
         "host steal % |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["kernel"]:
        hq, hkv, d = SHAPES[row["shape"]]
        sd = (f"{row['sdpa_ms']:.2f} | {100 * row['sdpa_gbps'] / row['read_bw_gbps']:.0f}% | "
              f"{row['speedup_vs_sdpa']:.1f}" if "sdpa_ms" in row else "- | - | -")
        lines.append(f"| {row['shape']} ({hq}/{hkv}/{d}) | {row['batch']} | {row['ctx']} | {row['read_bw_gbps']:.1f} | "
                     f"{row['kernel_ms']:.2f} | {row['kernel_gbps']:.1f} | {row['pct_of_read_bw']:.0f}% | "
                     f"{row['pattern_read_gbps']:.1f} | {row['pct_of_pattern_read']:.0f}% | {row['nhd_gbps']:.1f} | {sd} | "
                     f"{row['steal_pct']:.0f} |")
    lines += [
        "",
        ("BE KV pool page size (--omniserve-cpu-page-size), smollm2-135m, B=64, ctx 1024: each page is a jump in "
         "memory, and at page size 16 its K (or V) is 6 KB:"),
        "",
        ("| page size | read BW GB/s | kernel GB/s | % of read BW | page-pattern read GB/s | % of page-pattern read | "
         "host steal % |"),
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["page_sizes"]:
        lines.append(f"| {row['page_size']} | {row['read_bw_gbps']:.1f} | {row['kernel_gbps']:.1f} | "
                     f"{row['pct_of_read_bw']:.0f}% | {row['pattern_read_gbps']:.1f} | {row['pct_of_pattern_read']:.0f}% | "
                     f"{row['steal_pct']:.0f} |")
    s = r["thread_scaling"]
    lin = ", ".join(f"ctx {x['ctx']}: {x['kernel_ms']:.2f} ms" for x in r["linearity"])
    lines += [
        "",
        f"Thread scaling (llama3-8b, B=16, ctx 4096): {s['threads']} threads = {s['speedup']:.2f}x 1 thread.",
        f"Linearity (smollm2-135m, B=16): {lin}.",
        "",
        ("Worker hand-off, decode step of 32 BE rows (smollm2-135m, ctx 1024); overhead = round trip minus kernel; "
         "the median of 5 runs (every run's p50 in brackets, with the share of CPU time the host stole during it):"),
        "",
        ("| mode | worker threads | overhead p50 us | overhead p99 us | of which data copies us | round trip p50 us | "
        "jobs sent over ZeroMQ | results sent over ZeroMQ | empty ZeroMQ ping p50 us |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in r["handoff"]:
        mode = f"busy-poll {h['spin_us']:.0f} us, worker on its own core" if h["spin_us"] else "block on ZeroMQ"
        runs = ", ".join(f"{x:.0f} @{st:.0f}%" for x, st in zip(h["overhead_us_p50_runs"], h["steal_pct_runs"]))
        lines.append(f"| {mode} | {h['worker_threads']} | {h['overhead_us_p50']:.0f} ({runs}) | {h['overhead_us_p99']:.0f} | "
                     f"{h['data_copies_us_p50']:.0f} | {h['round_trip_us_p50']:.0f} | "
                     f"{h['job_messages']} of {h['jobs']} | {h['result_messages']} of {h['jobs']} | "
                     f"{h['ping_us_p50']:.0f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
