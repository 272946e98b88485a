"""Co-serving benchmark: LS SLO attainment and BE throughput of omniserve against SGLang's own
ways of mixing the two classes, side by side in one run, each system a real server.

    .venv/bin/python benchmarks/coserve.py --profile quick      # CPU, default model, <= 25 min
    python benchmarks/coserve.py --profile gpu                  # Llama-3-8B shape, dummy weights

Systems (every server runs ``--schedule-policy fcfs --enable-metrics``; one server per distinct command line,
reused with its radix cache flushed between runs):
  ls-only    plain SGLang, the LS stream alone (the upper bound; its first run sets the SLOs)
  fcfs       plain SGLang, LS stream and BE backlog together
  priority   SGLang ``--enable-priority-scheduling`` (LS priority 1 > BE 0, preemption on,
             ``--retraction-policy priority``)
  headroom   plain SGLang with the BE backlog capped to keep room for LS (Llumnix-style
             reservation, done by the client)
  omniserve  ``--omniserve --omniserve-mode async`` with the SLO controller, given the benchmark's
             SLOs: BE work only in the LS SLOs' slack, BE requests on the GPU while there is room,
             else in host memory with their attention on the CPU worker, piggybacked on GPU passes
             without the GPU waiting for the CPU
  omniserve-sync  the same with ``--omniserve-mode sync``: a decode step with BE rows on the CPU
             waits for the worker at each layer (the NEO-like baseline)
  omniserve-nocontrol  ``--omniserve --omniserve-disable-control``: every BE request in host
             memory, every BE row in every decode step (the controller's effect, side by side)

The ``omniserve`` rows also give the latency model's accuracy while serving (the server's
``omniserve_step_time_prediction_error`` over the runs' steps): top-level JSON fields
``latency_model_accuracy`` (mean) and ``latency_model_accuracy_p90``. Every controlled row gives
``served_over_profiled``: per step kind, the run's measured step time over the profile's prediction
of the same steps (``omniserve_step_seconds_total`` / ``omniserve_step_profiled_seconds_total``),
i.e. how much slower steps ran while serving than the idle profile measured them. Every row gives
SGLang's own account of its steps (every server runs with ``--enable-metrics``): ``forward_s``,
seconds in ``run_batch``; ``scheduler_s``, the scheduler loop's other busy seconds; and
``forward_passes``, prefill and decode passes.

Writes benchmarks/results/coserve-<profile>.{json,md} and coserve-<profile>-*.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import orjson
from tqdm import tqdm

from omniserve_sgl.bench.launch import SGLangServer, histogram, metric_samples, metric_sum
from omniserve_sgl.bench.loadgen import RequestStyle, poisson_arrivals, run_mix
from omniserve_sgl.bench.report import format_row, row, rows_table, write_plots
from omniserve_sgl.bench.slo import SLO, accuracy_from_error_buckets, derive_slo, tpot
from omniserve_sgl.control import STEP_KINDS
from omniserve_sgl.default_model import ensure_default_model
from omniserve_sgl.service_class import BE, LS

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SYSTEMS = ("ls-only", "fcfs", "priority", "headroom", "omniserve-nocontrol", "omniserve-sync", "omniserve")
ERROR_HISTOGRAM = "omniserve_step_time_prediction_error"
# What the simulator needs to replay a system (benchmarks/sim_validate.py), from /server_info.
SERVER_INFO = ("chunked_prefill_size", "max_running_requests", "max_total_num_tokens", "max_prefill_tokens",
               "priority_scheduling_preemption_threshold", "enable_mixed_chunk", "page_size", "device",
               "disable_overlap_schedule")


@dataclasses.dataclass(frozen=True)
class Profile:
    """One benchmark configuration. Token counts are per request; times in seconds."""

    ls_rates: tuple[float, ...]  # LS requests/s, one run per rate and system
    duration_s: float  # measurement window per run
    ls_max_prompt_tokens: int
    ls_max_new_tokens: int
    be_prompt_tokens: tuple[int, int]  # (min, max) of the BE documents
    be_max_new_tokens: int
    be_concurrency: int  # BE requests kept in flight
    headroom_be_concurrency: int  # the cap of the `headroom` system
    # SLO = factor x LS-alone median of the same run; 5x / 3x is about the paper's ratio of its
    # SLOs (TTFT 2 s, TPOT 0.2 s) to its LS-alone latencies.
    ttft_factor: float
    tpot_factor: float
    server_args: tuple[str, ...] = ()  # for every server
    omniserve_args: tuple[str, ...] = ()
    model_config: str | None = None  # benchmarks/configs/<name>.json, with --load-format dummy


PROFILES = {
    # 2 CPU cores, SmolLM2-135M. A 4K-token KV cache plays a GPU whose memory is mostly weights:
    # the BE backlog (4 x ~1.1K tokens) does not fit next to the LS stream. 90 s windows hold over
    # 100 LS requests per row, so one request moves attainment by under 1 point.
    "quick": Profile(ls_rates=(1.5, 2.5), duration_s=90.0, ls_max_prompt_tokens=192, ls_max_new_tokens=32,
                     be_prompt_tokens=(768, 1024), be_max_new_tokens=96, be_concurrency=4,
                     headroom_be_concurrency=1, ttft_factor=5.0, tpot_factor=3.0,
                     server_args=("--max-total-tokens", "4096"), omniserve_args=("--omniserve-cpu-kv-gb", "1")),
    # Any CUDA GPU: Llama-3-8B's architecture with random weights (no download), ShareGPT prompts.
    "gpu": Profile(ls_rates=(2.0, 4.0, 8.0, 12.0), duration_s=120.0, ls_max_prompt_tokens=1024,
                   ls_max_new_tokens=128, be_prompt_tokens=(6144, 8192), be_max_new_tokens=256,
                   be_concurrency=64, headroom_be_concurrency=8, ttft_factor=5.0, tpot_factor=3.0,
                   server_args=("--load-format", "dummy", "--mem-fraction-static", "0.85"),
                   omniserve_args=("--omniserve-cpu-kv-gb", "64"), model_config="llama-3-8b"),
}


def server_args(system: str, profile: Profile, slo: SLO | None = None) -> tuple[str, ...]:
    """The extra ``launch_server`` arguments of ``system`` (systems with equal ones share a server);
    omniserve's controller is given ``slo`` (None: left out, for grouping before the SLOs are known)."""
    # --enable-metrics: SGLang's own step counters (forward_time), on every server alike.
    base = ("--schedule-policy", "fcfs", "--enable-metrics", *profile.server_args)
    if system == "priority":
        return (*base, "--enable-priority-scheduling", "--default-priority-value", "0",
                "--retraction-policy", "priority")
    if system == "omniserve-nocontrol":
        return (*base, "--omniserve", *profile.omniserve_args, "--omniserve-disable-control")
    if system in ("omniserve", "omniserve-sync"):
        slos = () if slo is None else ("--omniserve-ttft-slo", f"{slo.ttft_s:.4f}", "--omniserve-tpot-slo",
                                       f"{slo.tpot_s:.4f}")
        mode = ("--omniserve-mode", "async" if system == "omniserve" else "sync")
        return (*base, "--omniserve", *mode, *profile.omniserve_args, *slos)
    return base


def request_style(system: str) -> RequestStyle:
    return RequestStyle(mark_class=True, ls_priority=1, be_priority=0) if system == "priority" else RequestStyle()


def be_concurrency(system: str, profile: Profile) -> int:
    return {"ls-only": 0, "headroom": profile.headroom_be_concurrency}.get(system, profile.be_concurrency)


def model_path(profile: Profile) -> str:
    """The default model, or a folder with a shipped ``config.json`` and the default model's
    tokenizer (the configs use its 49152-token vocabulary so that every sampled id decodes)."""
    tok_dir = Path(ensure_default_model())
    if profile.model_config is None:
        return str(tok_dir)
    out = Path.home() / ".cache" / "omniserve-sgl" / f"{profile.model_config}-dummy"
    out.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    shutil.copy(HERE / "configs" / f"{profile.model_config}.json", out / "config.json")
    return str(out)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"CPU only: {cpu}, {os.cpu_count()} cores (SGLang's CPU device stands in for the GPU)"


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("sglang", "torch", "omniserve-sgl")} | {"python": platform.python_version()}


def step_seconds(url: str) -> dict[str, tuple[float, float]]:
    """``{step kind: (measured s, profiled s)}`` summed over the server's controlled steps so far
    (``omniserve_step_seconds_total`` and ``omniserve_step_profiled_seconds_total``; empty on a server
    without them)."""
    out = {}
    for kind in STEP_KINDS:
        measured = metric_sum(url, "omniserve_step_seconds_total", kind=kind)
        if measured is not None:
            out[kind] = (measured, metric_sum(url, "omniserve_step_profiled_seconds_total", kind=kind) or 0.0)
    return out


def forward_time(url: str) -> dict:
    """SGLang's own account of a server's steps so far (``--enable-metrics``): ``forward_s``, seconds
    in ``run_batch`` (``sglang:scheduler_stage_seconds_total{category="run_batch"}``: on SGLang's CPU
    device the forward runs inside it; on a GPU only its launch does); ``scheduler_s``, the
    scheduler loop's other busy seconds (every other category but ``idle``: receiving requests,
    forming batches, processing results); ``forward_passes``, passes per kind
    (``sglang:cuda_graph_passes_total``; ``prefill`` counts extend and mixed passes)."""
    stages: dict[str, float] = {}
    passes = {"prefill": 0.0, "decode": 0.0}
    for sample in metric_samples(url, "sglang:scheduler_stage_seconds_total", "sglang:cuda_graph_passes_total"):
        if sample.name == "sglang:scheduler_stage_seconds_total":
            stages[sample.labels["category"]] = stages.get(sample.labels["category"], 0.0) + sample.value
        else:
            passes[sample.labels["mode"].split("_")[0]] += sample.value
    forward = stages.pop("run_batch", 0.0)
    stages.pop("idle", None)
    return {"forward_s": forward, "scheduler_s": sum(stages.values()), "forward_passes": passes}


def run_one(server: SGLangServer, system: str, rate: float, profile: Profile, prompts: dict, seed: int):
    """One (system, LS rate) run; returns its records and the measurement window."""
    arrivals = poisson_arrivals(rate, profile.duration_s, seed)
    bar = tqdm(total=len(arrivals), desc=f"{system:>9} @ {rate:g} LS/s", unit="LS", leave=True, dynamic_ncols=True)
    be_done = [0]

    def on_done(rec) -> None:
        if rec.service_class == LS:
            bar.update(1)
        else:
            be_done[0] += 1
            bar.set_postfix(BE_done=be_done[0], refresh=False)

    server.flush_cache()
    records = asyncio.run(run_mix(
        server.url, request_style(system), ls_prompts=prompts[LS], ls_arrivals=arrivals,
        ls_max_new_tokens=profile.ls_max_new_tokens, be_prompts=prompts[BE],
        be_concurrency=be_concurrency(system, profile), be_max_new_tokens=profile.be_max_new_tokens,
        duration_s=profile.duration_s, on_done=on_done))
    bar.close()
    return records


def warm_up(server: SGLangServer, profile: Profile, prompts: dict) -> None:
    """Two short requests per class, so one-time start-up costs fall outside the measurement."""
    asyncio.run(run_mix(server.url, RequestStyle(), ls_prompts=prompts[LS][:2], ls_arrivals=[0.0, 0.0],
                        ls_max_new_tokens=4, be_prompts=prompts[BE][:2], be_concurrency=2,
                        be_max_new_tokens=4, duration_s=0.01))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    ap.add_argument("--rates", default=None, help="comma-separated LS rates (requests/s); default: the profile's")
    ap.add_argument("--duration", type=float, default=None, help="measurement window per run, s")
    ap.add_argument("--be-max-new-tokens", type=int, default=None, help="output tokens per BE request")
    ap.add_argument("--ttft-slo", type=float, default=None, help="fixed TTFT SLO, s (default: derived)")
    ap.add_argument("--tpot-slo", type=float, default=None, help="fixed TPOT SLO, s (default: derived)")
    ap.add_argument("--model-path", default=None, help="override the profile's model")
    ap.add_argument("--omniserve-args", default="", help="more flags for the omniserve servers, e.g. "
                    "'--omniserve-profile PATH --omniserve-cpu-cores 8-15'")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.omniserve_args:
        profile = dataclasses.replace(profile, omniserve_args=(*profile.omniserve_args, *shlex.split(args.omniserve_args)))
    if args.rates:
        profile = dataclasses.replace(profile, ls_rates=tuple(float(x) for x in args.rates.split(",")))
    if args.duration:
        profile = dataclasses.replace(profile, duration_s=args.duration)
    if args.be_max_new_tokens is not None:
        profile = dataclasses.replace(profile, be_max_new_tokens=args.be_max_new_tokens)
    systems = [s.strip() for s in args.systems.split(",")]
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    fixed = (args.ttft_slo, args.tpot_slo)
    if (None in fixed) != (fixed == (None, None)):
        ap.error("give both --ttft-slo and --tpot-slo, or neither (then they are derived from ls-only)")
    if fixed == (None, None) and systems[0] != "ls-only":
        ap.error("derived SLOs need ls-only as the first system; or give --ttft-slo and --tpot-slo")
    # SIGTERM -> SystemExit, so the servers' context managers stop them (Ctrl-C does the same).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from transformers import AutoTokenizer

    from omniserve_sgl.bench.workload import sharegpt_documents, sharegpt_prompts

    model = args.model_path or model_path(profile)
    tok = AutoTokenizer.from_pretrained(model)
    n_ls = int(max(profile.ls_rates) * profile.duration_s * 1.5) + 8
    prompts = {LS: sharegpt_prompts(tok, n_ls, profile.ls_max_prompt_tokens, seed=args.seed),
               BE: sharegpt_documents(tok, 4 * profile.be_concurrency + 8, *profile.be_prompt_tokens, seed=args.seed)}
    slo = SLO(*fixed) if None not in fixed else None
    rows, tpot_samples, started = [], {}, time.time()
    print(f"co-serving benchmark, profile {args.profile}: {model}\n  device: {device_name()}", flush=True)
    by_server: dict[tuple[str, ...], list[str]] = {}
    for system in systems:
        by_server.setdefault(server_args(system, profile), []).append(system)
    errors_seen: dict[float, float] = {}
    server_info: dict[str, dict] = {}
    for group in by_server.values():
        extra = server_args(group[0], profile, slo)
        print(f"starting SGLang {' '.join(extra)} for {', '.join(group)} ...", flush=True)
        with SGLangServer(model, *extra) as server:
            warm_up(server, profile, prompts)
            info = server.server_info(*SERVER_INFO)
            for system in group:
                server_info[system] = info
            for system in group:
                for i, rate in enumerate(profile.ls_rates):
                    before = histogram(server.url, ERROR_HISTOGRAM) if system == "omniserve" else {}
                    steps_before, forward_before = step_seconds(server.url), forward_time(server.url)
                    records = run_one(server, system, rate, profile, prompts, args.seed + i)
                    forward = forward_time(server.url)
                    for edge, count in (histogram(server.url, ERROR_HISTOGRAM) if before else {}).items():
                        errors_seen[edge] = errors_seen.get(edge, 0.0) + count - before.get(edge, 0.0)
                    steps = {k: (m - steps_before[k][0], p - steps_before[k][1])
                             for k, (m, p) in step_seconds(server.url).items()}
                    if slo is None:
                        slo = derive_slo(records, profile.ttft_factor, profile.tpot_factor)
                        print(f"SLOs from ls-only at {rate:g} LS/s: TTFT {slo.ttft_s * 1e3:.0f} ms "
                              f"({profile.ttft_factor:g} x median), TPOT {slo.tpot_s * 1e3:.1f} ms "
                              f"({profile.tpot_factor:g} x median)", flush=True)
                    rows.append(row(system, rate, records, slo, profile.duration_s))
                    rows[-1] |= {"forward_s": forward["forward_s"] - forward_before["forward_s"],
                                 "scheduler_s": forward["scheduler_s"] - forward_before["scheduler_s"],
                                 "forward_passes": {k: n - forward_before["forward_passes"][k]
                                                    for k, n in forward["forward_passes"].items()}}
                    if served := {k: m / p for k, (m, p) in steps.items() if p > 0}:
                        rows[-1]["served_over_profiled"] = served
                        rows[-1]["served_step_s"] = {k: m for k, (m, _) in steps.items() if m > 0}
                    tpot_samples.setdefault(system, {})[f"{rate:g}"] = sorted(
                        tpot(r) for r in records if r.service_class == LS and r.success)
                    print(format_row(rows[-1]), flush=True)
    result = {
        "profile": args.profile, "model": model, "device": device_name(), "versions": versions(),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                "source": "fixed" if None not in fixed else
                f"ls-only at {profile.ls_rates[0]:g} LS/s: {profile.ttft_factor:g} x median TTFT, "
                f"{profile.tpot_factor:g} x median TPOT"},
        "workload": {**dataclasses.asdict(profile), "seed": args.seed,
                     # what the server prefills per BE request (the documents are cut at the top of the range)
                     "be_prompt_lengths": [len(tok.encode(d)) for d in prompts[BE]],
                     # the i-th LS request's prompt is prompt i (run_mix): a simulation can replay them
                     "ls_prompt_lengths": [len(tok.encode(p)) for p in prompts[LS]]},
        "systems": systems,
        "wall_s": round(time.time() - started, 1), "rows": rows, "ls_tpot_samples_s": tpot_samples,
        "server_info": server_info,
    }
    if errors_seen:
        acc, acc_p90 = accuracy_from_error_buckets(errors_seen)
        result |= {"latency_model_accuracy": acc, "latency_model_accuracy_p90": acc_p90,
                   "latency_model_steps": errors_seen.get(float("inf"), 0.0)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"coserve-{args.profile}"
    stem.with_suffix(".json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    plots = write_plots(result, stem)
    stem.with_suffix(".md").write_text(report(result, plots))
    print(f"wrote {stem}.json, {stem}.md and {len(plots)} plots in {result['wall_s']:.0f} s")
    return 0 if all(r["lost"] == 0 for r in rows) else 1


def report(result: dict, plots: list[Path]) -> str:
    """The Markdown report the README quotes."""
    slo, w = result["slo"], result["workload"]
    lines = [
        f"# Co-serving benchmark, profile `{result['profile']}`", "",
        f"- device: {result['device']}",
        f"- model: `{Path(result['model']).name}`; versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- SLOs: TTFT {slo['ttft_s'] * 1e3:.0f} ms, TPOT {slo['tpot_s'] * 1e3:.1f} ms ({slo['source']})",
        (f"- LS: ShareGPT first turns <= {w['ls_max_prompt_tokens']} tokens, {w['ls_max_new_tokens']} output "
        f"tokens, Poisson arrivals for {w['duration_s']:g} s per run"),
        (f"- BE: {w['be_concurrency']} in flight (headroom: {w['headroom_be_concurrency']}), ShareGPT documents "
        f"of {w['be_prompt_tokens'][0]}-{w['be_prompt_tokens'][1]} tokens, {w['be_max_new_tokens']} output "
        "tokens; BE tokens/s counts tokens received inside the window"),
        (f"- every server: `--schedule-policy fcfs --enable-metrics {' '.join(w['server_args'])}`; omniserve adds "
        f"`--omniserve {' '.join(w['omniserve_args'])}` and the SLOs (`--omniserve-ttft-slo`, "
        "`--omniserve-tpot-slo`); omniserve-nocontrol adds `--omniserve-disable-control` instead"),
        *([(f"- latency model while serving (omniserve rows, {result['latency_model_steps']:.0f} steps): "
            f"accuracy mean {result['latency_model_accuracy']:.1%}, p90 {result['latency_model_accuracy_p90']:.1%}")]
          if "latency_model_accuracy" in result else []),
        f"- wall time {result['wall_s']:.0f} s", "",
    ]
    lines += [*rows_table(result["rows"]), "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
