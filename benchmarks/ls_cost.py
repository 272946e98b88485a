"""What ``--omniserve`` costs LS traffic: SGLang's own benchmark client (``python -m
sglang.benchmark.serving``) drives the same LS stream against plain SGLang and ``--omniserve``,
alternating, pair after pair (each pair's order flips, so drift in the machine falls on both
sides), and reports each pair's ratio omniserve / plain of median and p99 TTFT and TPOT, then their
median and spread over the pairs.

    .venv/bin/python benchmarks/ls_cost.py            # CPU, default model, about 15 min

Two workloads per server, both the same random-token LS stream (fixed seed):
  ls-only  LS requests alone: ``--omniserve`` should run as plain SGLang (its overlap schedule)
  burst    the same, plus a short burst of requests marked BE in the middle (``x-omniserve-class:
           be``; plain SGLang ignores the marker and serves them as any request): the scheduler
           switches to the BE path and back; the LS numbers show what the burst costs each system

Both servers stay up for the whole run, each sleeping while the other is measured
(``--sleep-on-idle``), with ``--enable-metrics`` and, for omniserve, its defaults (the SLO
controller on, the latency profile cached from an earlier start). Writes
benchmarks/results/ls_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from omniserve_sgl.bench.launch import SGLangServer, metric_sum
from omniserve_sgl.default_model import ensure_default_model

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SYSTEMS = {"plain": (), "omniserve": ("--omniserve",)}
WORKLOADS = ("ls-only", "burst")
KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


@dataclasses.dataclass(frozen=True)
class Profile:
    """The LS stream (SGLang's ``random`` dataset: ``num_prompts`` requests of ``input_len`` /
    ``output_len`` tokens, ``concurrency`` in flight, each sent as one finishes: every decode step
    has about the same rows, so the run-to-run spread is the machine's, not the arrivals') and the
    BE burst, sent ``burst_at_s`` after the client starts: ``burst_requests`` requests of
    ``burst_input_len`` / ``burst_output_len`` tokens."""

    pairs: int = 12
    concurrency: int = 4
    num_prompts: int = 24
    input_len: int = 200
    output_len: int = 32
    burst_at_s: float = 6.0
    burst_requests: int = 3
    burst_input_len: int = 200
    burst_output_len: int = 16


def bench(server: SGLangServer, p: Profile, seed: int) -> dict:
    """One run of SGLang's client against ``server``; its JSON result (times in ms).

    The client runs in this process (its command-line entry point, ``cli_main``, with the
    arguments a shell would give): loaded once, so the runs of a pair follow each other within
    seconds and the machine's drift falls on both alike.

    Raises:
        RuntimeError: a request did not complete.
    """
    from sglang.benchmark.serving import cli_main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.jsonl"
        argv = ["sglang.benchmark.serving", "--backend", "sglang", "--base-url", server.url,
                "--dataset-name", "random-ids", "--random-input-len", str(p.input_len),
                "--random-output-len", str(p.output_len), "--random-range-ratio", "1.0",
                "--num-prompts", str(p.num_prompts), "--max-concurrency", str(p.concurrency),
                "--seed", str(seed), "--output-file", str(out), "--disable-tqdm"]
        saved, sys.argv = sys.argv, argv
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cli_main()
        finally:
            sys.argv = saved
        result = json.loads(out.read_text().splitlines()[-1])
    if result["completed"] != p.num_prompts:
        raise RuntimeError(f"{result['completed']} of {p.num_prompts} LS requests completed")
    return result


def burst(server: SGLangServer, p: Profile, start: float, done: list) -> None:
    """Sends the BE burst ``p.burst_at_s`` after ``start`` (all at once) and appends to ``done``
    its seconds from first send to last answer, or the failed answers."""
    time.sleep(max(0.0, start + p.burst_at_s - time.monotonic()))
    body = {"input_ids": [100 + i for i in range(p.burst_input_len)],
            "sampling_params": {"max_new_tokens": p.burst_output_len, "temperature": 0, "ignore_eos": True}}
    failed = []

    def send():
        r = requests.post(f"{server.url}/generate", json=body, timeout=1800, headers={"x-omniserve-class": "be"})
        if r.status_code != 200:
            failed.append(f"{r.status_code} {r.text[:200]}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=send) for _ in range(p.burst_requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.append(failed or time.monotonic() - t0)


def run(server: SGLangServer, system: str, workload: str, p: Profile, seed: int) -> dict:
    """One measured run; the client's four LS numbers, the burst's time and the mode switches."""
    server.flush_cache()
    switches = [metric_sum(server.url, "omniserve_mode_switches_total") or 0.0]
    burst_s: list = []
    helper = None
    if workload == "burst":
        # About a third of the way into the run: the client starts within a second.
        helper = threading.Thread(target=burst, args=(server, p, time.monotonic(), burst_s))
        helper.start()
    result = bench(server, p, seed)
    if helper is not None:
        helper.join()
    switches.append(metric_sum(server.url, "omniserve_mode_switches_total") or 0.0)
    row = {"system": system, "workload": workload, "seed": seed, **{k: result[k] for k in KEYS},
           "mode_switches": switches[1] - switches[0]}
    if burst_s:
        if isinstance(burst_s[0], list):
            raise RuntimeError(f"BE burst requests failed: {burst_s[0]}")
        row["burst_s"] = burst_s[0]
    print(f"  {system:9s} {workload:7s} " + " ".join(f"{k} {row[k]:7.1f}" for k in KEYS)
          + f" switches {row['mode_switches']:.0f}", flush=True)
    return row


def median_interval(xs: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval holding the median of ``xs``'s population with at least
    ``confidence`` (the sign test's order statistics: the k-th smallest and k-th largest, k the
    largest with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2); the whole range when n is too
    small for that."""
    xs, n = sorted(xs), len(xs)
    k, tail = 0, 0.0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


def summarise(rows: list[dict]) -> dict:
    """Per workload and key: each pair's ratio omniserve / plain, their median, min, max and the
    95% interval of the median (:func:`median_interval`)."""
    out = {}
    for w in WORKLOADS:
        by = {(r["system"], r["seed"]): r for r in rows if r["workload"] == w}
        seeds = sorted({s for _, s in by})
        out[w] = {}
        for k in KEYS:
            ratios = [by["omniserve", s][k] / by["plain", s][k] for s in seeds if by["plain", s][k] > 0]
            lo, hi = median_interval(ratios)
            out[w][k] = {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios),
                         "max": max(ratios), "median_interval_95": [lo, hi]}
    return out


def report(result: dict) -> str:
    p, s = result["profile"], result["summary"]
    lines = [
        "# LS cost of `--omniserve`",
        "",
        (f"SGLang's own client (`python -m sglang.benchmark.serving`), random-token LS requests of "
        f"{p['input_len']} / {p['output_len']} tokens, {p['concurrency']} in flight ({p['num_prompts']} per run), against "
        f"plain SGLang and `--omniserve` alternating, {p['pairs']} pairs (order flipped every pair). "
        f"`burst`: the same stream plus {p['burst_requests']} requests marked BE "
        f"({p['burst_input_len']} / {p['burst_output_len']} tokens) sent together {p['burst_at_s']:.0f} s after the client starts. "
        f"Machine: {result['machine']}."),
        "",
        "Ratio omniserve / plain, median over the pairs [95% interval of that median, sign test] (min - max):",
        "",
        "| workload | median TTFT | p99 TTFT | median TPOT | p99 TPOT | mode switches per run |",
        "|---|---|---|---|---|---|",
    ]
    for w in WORKLOADS:
        sw = [r["mode_switches"] for r in result["rows"] if r["workload"] == w and r["system"] == "omniserve"]
        cells = [f"{s[w][k]['median']:.3f} [{s[w][k]['median_interval_95'][0]:.2f} - "
                 f"{s[w][k]['median_interval_95'][1]:.2f}] ({s[w][k]['min']:.2f} - {s[w][k]['max']:.2f})" for k in KEYS]
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {statistics.median(sw):.0f} |")
    lines += ["", "Every run (ms):", "", ("| pair | system | workload | median TTFT | p99 TTFT | median TPOT | "
              "p99 TPOT | burst done (s) |"), "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['seed']} | {r['system']} | {r['workload']} | "
                     + " | ".join(f"{r[k]:.1f}" for k in KEYS) + f" | {r.get('burst_s', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=Profile.pairs)
    ap.add_argument("--num-prompts", type=int, default=Profile.num_prompts)
    ap.add_argument("--out", type=Path, default=RESULTS / "ls_cost")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite OUT.md (and OUT.json's summary) from OUT.json's runs, without running")
    args = ap.parse_args(argv)
    if args.report_only:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["summary"] = summarise(result["rows"])
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(report(result))
        return 0
    p = dataclasses.replace(Profile(), pairs=args.pairs, num_prompts=args.num_prompts)
    model = ensure_default_model()
    rows = []
    # Both servers stay up (each sleeps while idle: --sleep-on-idle), so runs alternate without
    # restarts: P O | O P | P O ... for each workload in turn.
    with (SGLangServer(model, "--enable-metrics", *SYSTEMS["plain"]) as plain,
          SGLangServer(model, "--enable-metrics", *SYSTEMS["omniserve"]) as omni):
        servers = {"plain": plain, "omniserve": omni}
        for w in WORKLOADS:
            for seed in range(p.pairs):
                print(f"{w} pair {seed}:", flush=True)
                order = ("plain", "omniserve") if seed % 2 == 0 else ("omniserve", "plain")
                for system in order:
                    rows.append(run(servers[system], system, w, p, seed))
    result = {"profile": dataclasses.asdict(p), "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
              "rows": rows, "summary": summarise(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
