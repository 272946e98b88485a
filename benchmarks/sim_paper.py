"""The OmniServe paper's setting, simulated: Llama-2-70B with TP4 on 4 A100-80GB and the Xeon Gold
6342 host, LS ShareGPT traffic and a BE backlog of LongBench-v2-length documents; then the same with
1 to 4 extra CPU servers over 100 Gbit/s and 10 Gbit/s.

    .venv/bin/python benchmarks/sim_paper.py          # a few minutes on one core

Predicts LS SLO attainment and BE tokens/s of ``omniserve`` (asynchronous piggybacking) against
``headroom`` (Llumnix-like), ``omniserve-sync`` (NEO-like) and ``ls-only`` (Sarathi-like upper
bound), beside the paper's reported figures. Writes benchmarks/results/sim-paper.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from omniserve_sgl.bench.report import rows_table
from omniserve_sgl.control import SLO, StepShape
from omniserve_sgl.simulate import CPUS, GPUS, LINKS, RooflineTiming, Scenario, SimConfig, run, shipped_model
from omniserve_sgl.simulate.experiment import SIM_COLUMNS
from omniserve_sgl.simulate.hardware import GB
from omniserve_sgl.simulate.workload import BE_DATASETS

RESULTS = Path(__file__).parent / "results"
SYSTEMS = ("ls-only", "headroom", "omniserve-sync", "omniserve")
# OmniServe (SIGMOD 2026), abstract and section 5: what the simulation is read against.
PAPER = {"ls_attainment_vs_llumnix": "up to 1.48x", "be_throughput_vs_llumnix": "up to 9.85x",
         "be_scaling_1_to_4_cpu_servers": "about 3.1-3.4x", "ls_vs_upper_bound": "within about 0.6%"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1,2,3,4", help="LS requests/s")
    ap.add_argument("--duration", type=float, default=300.0, help="window per run, s")
    ap.add_argument("--be-concurrency", type=int, default=256, help="BE backlog in flight")
    ap.add_argument("--scaling-rate", type=float, default=2.0, help="LS rate of the CPU-server runs")
    ap.add_argument("--drain", type=float, default=300.0, help="after the window, s (LS requests in flight finish)")
    ap.add_argument("--be-lengths", default="longbench-v2", help="BE documents of the rate sweep")
    ap.add_argument("--scaling-be-lengths", default="dailymails",
                    help="BE documents of the CPU-server runs (decode-heavy: prefill does not hide the CPU)")
    ap.add_argument("--ttft-slo", type=float, default=3.0)
    ap.add_argument("--tpot-slo", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    started = time.time()
    model = shipped_model("llama-2-70b")
    gpu, cpu = GPUS["a100-80gb"], CPUS["xeon-gold-6342"]
    timing = RooflineTiming(model, gpu, cpu, tp=4)
    kv, pool = timing.gpu_kv_tokens(), int(0.5 * cpu.memory_bytes // model.kv_bytes_per_token)
    slo = SLO(args.ttft_slo, args.tpot_slo)
    desc = (f"roofline: Llama-2-70B on 4 x {gpu.name} (TP4, {kv:,} KV tokens), host {cpu.name} "
            f"(CPU attention {timing.cpu_bytes_per_s / GB:.0f} GB/s, BE pool {pool:,} tokens per CPU server)")

    def scenario(systems, rates, be_lengths=args.be_lengths) -> Scenario:
        return Scenario("paper", systems, rates, args.duration, slo, ls_max_prompt_tokens=2048,
                        be_lengths=be_lengths, be_concurrency=args.be_concurrency, headroom_be_concurrency=8)

    def config(remote: int = 0, link: str = "100gbit"):
        return lambda system: SimConfig(system, timing, slo, kv, pool, chunk_tokens=8192, remote_cpus=remote,
                                        link=LINKS[link], seed=args.seed, drain_timeout_s=args.drain)

    print(f"simulating {desc}", flush=True)
    bounds = {name: be_bounds(timing, prompt, out, pool, slo.tpot_s) for name, (prompt, out) in BE_DATASETS.items()}
    sweep = run(scenario(SYSTEMS, tuple(float(x) for x in args.rates.split(","))), config(), desc, seed=args.seed)
    scaling = []
    for link in ("100gbit", "10gbit"):
        for remote in range(5):
            res = run(scenario(("omniserve",), (args.scaling_rate,), args.scaling_be_lengths), config(remote, link), desc,
                      seed=args.seed, progress=None)
            r = res["rows"][0]
            scaling.append({"link": link, "extra_cpu_servers": remote, **{k: r[k] for k in (
                "ls_slo_attainment", "be_tokens_per_s", "cpu_utilisation", "gpu_utilisation", "ls_p50_tpot_s")}})
            print(f"  {remote} extra CPU servers over {LINKS[link].name}: BE {r['be_tokens_per_s']:.0f} tok/s, "
                  f"LS attainment {r['ls_slo_attainment']:.1%}", flush=True)
    result = {"hardware": desc, "scaling_be_lengths": args.scaling_be_lengths, "scaling_rate": args.scaling_rate, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "paper": PAPER,
              "layers": model.layers,
              "sweep": sweep, "scaling": scaling, "be_bounds": bounds, "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim-paper.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (args.out / "sim-paper.md").write_text(report(result))
    print(report(result))
    return 0


def be_bounds(timing: RooflineTiming, prompt: int, out: int, pool_tokens: int, pass_s: float) -> dict:
    """What bounds BE tokens/s for documents of mean ``prompt`` / ``out`` tokens, with the whole
    machine on BE work: the GPU prefilling them (one prefill of ``prompt`` tokens per ``out``
    tokens), one CPU node's attention (each token reads its context's KV in every layer, at the
    mean context ``prompt + out / 2``), and piggybacking beside LS traffic: a row in a node's pool
    of ``pool_tokens`` crosses one layer per pass of ``pass_s`` seconds (the TPOT SLO, which the
    controller fills), so the pool's rows give ``rows / (layers * pass_s)`` tokens/s."""
    prefill_s = timing.gpu_step_s(StepShape(tokens=prompt, prefill_attn_work=float(prompt * prompt),
                                            prefill_context=prompt))
    cpu_s = timing.cpu_job_s((prompt + out / 2) * timing.kv_bytes_per_token)
    rows = pool_tokens // (prompt + out)
    return {"gpu_prefill_s_per_request": round(prefill_s, 3), "gpu_prefill_bound_tok_s": round(out / prefill_s, 1),
            "cpu_s_per_token": round(cpu_s, 4), "cpu_bound_tok_s_per_node": round(1 / cpu_s, 1),
            "pool_rows_per_node": rows, "piggyback_bound_tok_s_per_node": round(rows / (timing.num_layers * pass_s), 1)}


def ratios(rows: list[dict], system: str, base: str, key: str) -> list[tuple[float, float]]:
    """(LS rate, ``system``'s ``key`` over ``base``'s) per rate where ``base``'s is positive."""
    by = {(r["system"], r["ls_rate"]): r for r in rows}
    return [(rate, by[(system, rate)][key] / by[(base, rate)][key]) for (s, rate) in by
            if s == system and (base, rate) in by and by[(base, rate)][key] > 0]


def report(result: dict) -> str:
    rows = result["sweep"]["rows"]
    w = result["sweep"]["workload"]

    def fmt(pairs):
        return ", ".join(f"{x:.2f}x at {rate:g} LS/s" for rate, x in pairs) or "n/a"

    lines = [
        "# The paper's setting, simulated", "",
        f"- hardware: {result['hardware']}",
        (f"- SLOs: TTFT {result['slo']['ttft_s']:g} s, TPOT {result['slo']['tpot_s'] * 1e3:.0f} ms; LS: ShareGPT "
        f"(prompts <= {w['ls_max_prompt_tokens']} tokens, ShareGPT answer lengths), Poisson; BE: "
        f"{w['be_concurrency']} `{w['be_lengths']}`-length documents in flight (headroom: {w['headroom_be_concurrency']}); "
        f"{w['duration_s']:g} s per run"),
        f"- simulated in {result['wall_s']:.0f} s", "",
        *rows_table(rows, SIM_COLUMNS), "",
        "| | simulated | paper |", "|---|---|---|",
        (f"| LS SLO attainment, omniserve / headroom | {fmt(ratios(rows, 'omniserve', 'headroom', 'ls_slo_attainment'))} "
        f"| {PAPER['ls_attainment_vs_llumnix']} |"),
        (f"| BE tokens/s, omniserve / headroom | {fmt(ratios(rows, 'omniserve', 'headroom', 'be_tokens_per_s'))} "
        f"| {PAPER['be_throughput_vs_llumnix']} |"),
        (f"| BE tokens/s, omniserve / omniserve-sync | "
        f"{fmt(ratios(rows, 'omniserve', 'omniserve-sync', 'be_tokens_per_s'))} | - |"),
        (f"| LS SLO attainment, omniserve / ls-only | {fmt(ratios(rows, 'omniserve', 'ls-only', 'ls_slo_attainment'))} "
        f"| {PAPER['ls_vs_upper_bound']} |"), "",
        "## Extra CPU servers", "",
        f"omniserve at {result['scaling_rate']:g} LS/s, BE documents `{result['scaling_be_lengths']}`, the same backlog.", "",
        "| link | extra CPU servers | BE tok/s | LS SLO attainment | CPU util | GPU util |", "|---|---|---|---|---|---|",
    ]
    for s in result["scaling"]:
        lines.append(f"| {s['link']} | {s['extra_cpu_servers']} | {s['be_tokens_per_s']:.0f} | "
                     f"{s['ls_slo_attainment']:.1%} | {s['cpu_utilisation']:.0%} | {s['gpu_utilisation']:.0%} |")
    for link in ("100gbit", "10gbit"):
        by = {s["extra_cpu_servers"]: s["be_tokens_per_s"] for s in result["scaling"] if s["link"] == link}
        if by.get(1):
            lines.append(f"\nBE scaling over {link}, 1 to 4 extra CPU servers: {by[4] / by[1]:.2f}x "
                         f"(paper: {PAPER['be_scaling_1_to_4_cpu_servers']})")
    lines += ["", "## What bounds BE throughput here", "",
              "With the whole machine on BE work (the roofline's own numbers; mean document lengths):", "",
              ("| BE documents | GPU prefill per request s | GPU prefill bound tok/s | CPU attention per token ms "
               "| CPU bound tok/s per CPU node | rows per node's pool | piggybacked bound tok/s per node |"),
              "|---|---|---|---|---|---|---|"]
    for name, b in result["be_bounds"].items():
        lines.append(f"| {name} | {b['gpu_prefill_s_per_request']:.2f} | {b['gpu_prefill_bound_tok_s']:.0f} | "
                     f"{1e3 * b['cpu_s_per_token']:.1f} | {b['cpu_bound_tok_s_per_node']:.0f} | "
                     f"{b['pool_rows_per_node']} | {b['piggyback_bound_tok_s_per_node']:.0f} |")
    lines += ["", ("Piggybacked bound: beside LS traffic a CPU row's token crosses one layer per pass (its "
                   "attention result joins a later pass), so a node's pool of rows gives rows / (layers x TPOT SLO) "
                   "tokens/s.")]
    lines += ["", "## Reading", "", *reading(result)]
    return "\n".join(lines) + "\n"


def reading(result: dict) -> list[str]:
    """Where the prediction parts from the paper, and the assumption that drives it, from the numbers."""
    rows = {(r["system"], r["ls_rate"]): r for r in result["sweep"]["rows"]}
    sweep_docs = result["sweep"]["workload"]["be_lengths"]
    b = result["be_bounds"].get(sweep_docs)
    omni = [r for (s, _), r in rows.items() if s == "omniserve"]
    out = []
    if b and omni:
        best = max(omni, key=lambda r: r["be_tokens_per_s"])
        out.append(
            f"- **Rate sweep ({sweep_docs} BE)**: omniserve's BE throughput (at most {best['be_tokens_per_s']:.0f} tok/s) "
            f"sits under the GPU's prefill bound ({b['gpu_prefill_bound_tok_s']:.0f} tok/s with the whole GPU on BE "
            f"prompts: {b['gpu_prefill_s_per_request']:.1f} s of prefill per {sweep_docs} request), and the CPU attention "
            f"ran {sum(r['be_cpu_tokens'] for r in omni)} BE tokens in all. With BE prompts this long the prefill, "
            "not the decode, bounds BE work: asynchronous piggybacking has nothing to hide, so omniserve equals "
            "omniserve-sync, and the BE throughput gain over headroom the paper reports does not appear. The "
            "assumption that drives it: BE prompts are prefilled on the GPU at the roofline's prefill efficiency.")
    head = [r for (s, _), r in rows.items() if s == "headroom"]
    if head:
        out.append(
            f"- **LS attainment against headroom** is {min(r['ls_slo_attainment'] for r in head):.0%}-"
            f"{max(r['ls_slo_attainment'] for r in head):.0%} for headroom: its BE prompts go through prefill "
            "chunks of up to 8,192 tokens that stall LS prompts behind them (p99 TTFT in the table), where the "
            "controller sizes every chunk to the SLO slack. That gap is larger than the paper's 1.48x because "
            "the simulated headroom has no SLO-aware chunking at all.")
    scal = result["scaling"]
    if scal:
        cpu = max(s["cpu_utilisation"] for s in scal)
        gpu = min(s["gpu_utilisation"] for s in scal)
        nb = result["be_bounds"].get(result["scaling_be_lengths"], {})
        out.append(
            f"- **Extra CPU servers**: the GPU is at least {gpu:.0%} busy and the CPUs at most {cpu:.0%} in every run, "
            f"so more CPU capacity (about {nb.get('cpu_bound_tok_s_per_node', 0):.0f} tok/s of attention per node for "
            "these documents) adds little: the controller keeps BE requests in the GPU KV cache while their rows fit "
            "the BE budget (a row on the GPU yields a token every pass, one on a CPU one every "
            f"{result.get('layers', 80)} passes, as its token crosses a layer per pass: at most about "
            f"{nb.get('piggyback_bound_tok_s_per_node', 0):.0f} tok/s from a full pool of "
            f"{nb.get('pool_rows_per_node', 0)} rows), and the GPU's time goes to BE prefill and GPU-resident "
            "BE rows. The paper's 3.1-3.4x scaling needs CPU attention to be the bound. Sending BE requests to "
            "the pool while the CPU nodes have room was tried (benchmarks/results/NOTES.md): about as good with the "
            "host alone, worse with 4 servers, as GPU-resident rows then lose their decode slack. A slow link "
            "(10 Gbit/s) costs LS nothing: KV moves cross it on the host's time, not the GPU's.")
    return out


if __name__ == "__main__":
    sys.exit(main())
