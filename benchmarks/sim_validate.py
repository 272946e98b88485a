"""Validates the co-serving simulator against the real server, in one run:

    .venv/bin/python benchmarks/sim_validate.py            # about 50 min on 2 cores

1. profiles the default model on this machine (``python -m omniserve_sgl.profile``, the quick
   profile's server flags), unless ``--latency-profile`` names one;
2. runs ``benchmarks/coserve.py --profile quick`` with that profile (every system, every rate, real
   servers) over a 180 s window per run (``--duration``), or reads a finished run with ``--real PATH``;
3. simulates the same systems, rates, workload and SLOs with ``python -m omniserve_sgl.simulate``'s
   code on the profile (coserve's ``omniserve`` runs ``--omniserve-mode async``, the simulator's
   ``omniserve``; its ``omniserve-sync`` the synchronous path, the simulator's ``omniserve-sync``);
   steps are priced as the real servers ran them while serving (``served_factors``: per step kind,
   measured over profiled time, from coserve's rows of the controlled systems; ``forward_factors``:
   for the others, SGLang's own forward seconds over the same passes simulated at the profile's
   pace), plus the scheduler's own time per pass (``step_overheads``); requests reserve KV as
   SGLang's PrefillAdder reserves it for ``ignore_eos`` requests; a plain server's tokens reach the
   client a step late, as under SGLang's overlap schedule on its CPU device (``results_lag``);
   four more simulations move every pace evenly by up to 2% either way (``pace_ensemble``);
4. compares them: LS SLO attainment within 5 points, BE tokens/s within 20%, p50 TPOT within 15%,
   each simulated value the ensemble's mean.

Writes benchmarks/results/sim-validate.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import orjson

from omniserve_sgl.bench.report import rows_table
from omniserve_sgl.control import SLO, STEP_KINDS, LatencyModel
from omniserve_sgl.default_model import ensure_default_model
from omniserve_sgl.simulate import ModelSpec, ProfileTiming, Scenario, SimConfig, run
from omniserve_sgl.simulate.hardware import GB

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SGLANG_PASS = {"prefill": "prefill", "decode": "decode", "decode+cpu": "decode"}  # step kind -> SGLang's pass kind
# How far the pace is moved for pace_ensemble: the served factors of one system moved by 2-3%
# between two full runs of the same day (benchmarks/results/NOTES.md); five members, 1% apart.
PACE_SPREAD = 0.02
PACE_MEMBERS = 5
# coserve's quick profile measures 90 s per run; the rows where LS requests miss around BE
# prefills vary between runs of that window on the same workload (priority at 1.5 LS/s: 81-94%):
# twice the window halves that variance (benchmarks/results/NOTES.md).
VALIDATE_DURATION_S = 180.0
BOUNDS = {"attainment_points": 5.0, "be_tokens_ratio": 0.20, "p50_tpot_ratio": 0.15}


def profile_machine(path: Path, server_args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "omniserve_sgl.profile", "--out", str(path), *server_args], check=True)


def be_lengths(workload: dict) -> str:
    """The simulator's BE lengths spec for a coserve run's ``workload``: the prompt lengths of the
    documents it sent when recorded (the quick profile's documents are cut at the top of its range,
    so drawing from the whole range would give the simulator 12% shorter BE prompts), else the
    range."""
    out = workload["be_max_new_tokens"]
    if workload.get("be_prompt_lengths"):
        return f"{','.join(map(str, workload['be_prompt_lengths']))}:{out}"
    lo, hi = workload["be_prompt_tokens"]
    return f"{lo}-{hi}:{out}"


def served_factors(real: dict) -> dict[str, dict[str, float]]:
    """``{system: {step kind: factor}}`` for each system whose real rows measured their steps against
    the profile (coserve's ``served_over_profiled``: the controlled systems): measured over profiled
    step time per kind, summed over its rates. The simulator prices each system's steps with them,
    so it replays the machine as it ran while serving (beside the tokenizer, the HTTP server and the
    load generator, on the same cores) rather than as the idle profile measured it."""
    sums: dict[str, dict[str, list[float]]] = {}
    for r in real["rows"]:
        for kind, ratio in (r.get("served_over_profiled") or {}).items():
            measured = r["served_step_s"][kind]
            acc = sums.setdefault(r["system"], {}).setdefault(kind, [0.0, 0.0])
            acc[0] += measured
            acc[1] += measured / ratio
    return {system: {kind: m / p for kind, (m, p) in kinds.items()} for system, kinds in sums.items()}


def forward_factors(real: dict, sim: dict, served: dict) -> dict[str, dict[str, float]]:
    """``{system: {every step kind: factor}}`` for the systems without ``served`` factors (plain
    SGLang) whose real rows carry SGLang's own forward counters (coserve's
    ``forward_s`` and ``forward_passes``): per system, its real forward seconds over what the same
    passes take in ``sim`` (a simulation that priced it at the profile's pace): each kind's real
    passes times the simulated mean step of that kind, summed over its rates. One factor for all
    kinds, as SGLang times its passes together."""
    sim_rows = {(r["system"], r["ls_rate"]): r for r in sim["rows"]}
    sums: dict[str, list[float]] = {}
    for r in real["rows"]:
        s = sim_rows.get((r["system"], r["ls_rate"]))
        if r["system"] in served or s is None or not r.get("forward_passes"):
            continue
        mean: dict[str, list[float]] = {}
        for kind, (n, seconds) in s["step_s"].items():
            acc = mean.setdefault(SGLANG_PASS[kind], [0, 0.0])
            acc[0] += n
            acc[1] += seconds
        acc = sums.setdefault(r["system"], [0.0, 0.0])
        acc[0] += r["forward_s"]
        acc[1] += sum(n * mean[k][1] / mean[k][0] for k, n in r["forward_passes"].items() if mean.get(k, [0])[0])
    return {system: dict.fromkeys(STEP_KINDS, m / p) for system, (m, p) in sums.items() if p > 0}


def step_overheads(real: dict) -> dict[str, float]:
    """``{system: s}``: the scheduler loop's busy time outside the forward per pass (coserve's
    ``scheduler_s`` over its ``forward_passes``, summed over its rates), for the systems whose rows
    carry them. On SGLang's CPU device the forward waits through it."""
    sums: dict[str, list[float]] = {}
    for r in real["rows"]:
        if r.get("forward_passes") and "scheduler_s" in r:
            acc = sums.setdefault(r["system"], [0.0, 0.0])
            acc[0] += r["scheduler_s"]
            acc[1] += sum(r["forward_passes"].values())
    return {system: s / n for system, (s, n) in sums.items() if n > 0}


def results_lag(real: dict, system: str) -> bool:
    """Whether ``system``'s real server streamed each step's tokens only after the next step ran:
    SGLang's overlap schedule (on unless ``--disable-overlap-schedule``) on its CPU device, whose
    forward runs inside the launch. omniserve's servers leave the overlap loop while BE requests
    are in the server (``sglang_glue.mode``), which is all of the quick profile's window."""
    info = real.get("server_info", {}).get(system, {})
    device = info.get("device") or ("cpu" if str(real.get("device", "")).startswith("CPU") else "cuda")
    return device == "cpu" and not info.get("disable_overlap_schedule", False) and not system.startswith("omniserve")


def simulate_like(real: dict, profile: Path, noise: float, seed: int, served: dict) -> dict:
    """The simulator's rows for the systems, rates, workload and SLOs of the coserve result ``real``,
    each system's steps priced with its ``served`` factors (the profile's pace without)."""
    w, info = real["workload"], real.get("server_info", {})
    model = ModelSpec.from_config(real["model"])
    lm = LatencyModel.load(profile)
    if "float32" in str((lm.meta.get("key") or {}).get("dtype", "")):
        model = ModelSpec(**{**model.__dict__, "dtype_bytes": 4})

    def timing(system: str) -> ProfileTiming:
        return ProfileTiming(lm, model.kv_bytes_per_token, model.layers, qo_bytes_per_row_layer=model.qo_bytes_per_row_layer,
                             served=served.get(system))
    slo = SLO(real["slo"]["ttft_s"], real["slo"]["tpot_s"])
    overheads = step_overheads(real)
    systems = tuple(real["systems"])  # coserve's system names are the simulator's
    gb = float(w["omniserve_args"][w["omniserve_args"].index("--omniserve-cpu-kv-gb") + 1])
    one = next(iter(info.values()), {})
    kv = int(one.get("max_total_num_tokens") or w["server_args"][w["server_args"].index("--max-total-tokens") + 1])
    scenario = Scenario("quick (simulated)", systems, tuple(w["ls_rates"]), w["duration_s"], slo,
                        ls_max_prompt_tokens=w["ls_max_prompt_tokens"], ls_output_tokens=w["ls_max_new_tokens"],
                        be_lengths=be_lengths(w),
                        be_concurrency=w["be_concurrency"], headroom_be_concurrency=w["headroom_be_concurrency"],
                        ls_prompt_lengths=tuple(w.get("ls_prompt_lengths", ())))

    def config(system: str) -> SimConfig:
        real_info = info.get(system, one)
        return SimConfig(system, timing(system), slo, kv, int(gb * GB // model.kv_bytes_per_token),
                         chunk_tokens=int(real_info.get("chunked_prefill_size") or 8192),
                         max_running=int(real_info.get("max_running_requests") or 256), noise=noise, seed=seed,
                         priority_preemption=int(real_info.get("priority_scheduling_preemption_threshold") or 10) < 1,
                         results_lag=results_lag(real, system), step_overhead_s=overheads.get(system, 0.0),
                         ignore_eos=True)  # coserve's requests
    return run(scenario, config, f"latency profile {profile.name}", seed=seed, progress=None)


def pace_ensemble(real: dict, profile: Path, noise: float, seed: int, served: dict, sim: dict,
                  spread: float = PACE_SPREAD, members: int = PACE_MEMBERS) -> list[dict]:
    """``sim`` (the simulation at the ``served`` pace) and ``members - 1`` more, with every system's
    pace moved evenly across ``1 - spread`` .. ``1 + spread`` (how much the real server's pace moves
    between runs of the same workload). Where a few percent of step time reorders which BE prompt
    gets the KV next, and when, a row's attainment jumps from one simulation to the next without a
    trend: the row is on a knife's edge, for the real server as for the simulator, and the
    ensemble's mean is the forecast (as in ensemble weather forecasting) and its range the
    spread."""
    steps = [spread * (2 * i / (members - 1) - 1) for i in range(members)]
    paces = [{system: {kind: f * (1 + k) for kind, f in kinds.items()} for system, kinds in served.items()}
             for k in steps if k]
    return [sim, *(simulate_like(real, profile, noise, seed, pace) for pace in paces)]


def compare(real: dict, sims: list[dict]) -> list[dict]:
    """One line per (system, rate): real and simulated attainment, BE tokens/s and p50 TPOT, and
    whether each is within :data:`BOUNDS`; the simulated values are the means over ``sims`` (one
    simulation, or :func:`pace_ensemble`'s), and ``sim_attainment_band`` the attainment's range
    over them."""
    by: dict[tuple[str, float], list[dict]] = {}
    for sim in sims:
        for r in sim["rows"]:
            by.setdefault((r["system"], r["ls_rate"]), []).append(r)
    out = []
    for r in real["rows"]:
        ss = by.get((r["system"], r["ls_rate"]))
        if not ss:
            continue
        s = {k: sum(x[k] for x in ss) / len(ss) for k in ("ls_slo_attainment", "be_tokens_per_s", "ls_p50_tpot_s")}
        att = 100 * abs(r["ls_slo_attainment"] - s["ls_slo_attainment"])
        be = (abs(s["be_tokens_per_s"] - r["be_tokens_per_s"]) / r["be_tokens_per_s"]
              if r["be_tokens_per_s"] > 0 else (0.0 if s["be_tokens_per_s"] < 0.5 else float("inf")))
        tp = abs(s["ls_p50_tpot_s"] - r["ls_p50_tpot_s"]) / r["ls_p50_tpot_s"]
        band = [min(x["ls_slo_attainment"] for x in ss), max(x["ls_slo_attainment"] for x in ss)]
        out.append({"system": r["system"], "sim_system": ss[0]["system"], "ls_rate": r["ls_rate"],
                    "real_attainment": r["ls_slo_attainment"], "sim_attainment": s["ls_slo_attainment"],
                    "sim_attainment_band": band,
                    "attainment_points": att, "attainment_ok": att <= BOUNDS["attainment_points"],
                    "real_be_tokens_per_s": r["be_tokens_per_s"], "sim_be_tokens_per_s": s["be_tokens_per_s"],
                    "be_ratio_error": be, "be_ok": r["system"] == "ls-only" or be <= BOUNDS["be_tokens_ratio"],
                    "real_p50_tpot_s": r["ls_p50_tpot_s"], "sim_p50_tpot_s": s["ls_p50_tpot_s"],
                    "p50_tpot_error": tp, "tpot_ok": tp <= BOUNDS["p50_tpot_ratio"]})
    return out


def report(result: dict) -> str:
    lines = ["# Simulator against the real server (quick profile)", "",
             (f"- real: `benchmarks/coserve.py --profile quick` ({result['real_source']}), SLOs TTFT "
             f"{result['slo']['ttft_s'] * 1e3:.0f} ms, TPOT {result['slo']['tpot_s'] * 1e3:.0f} ms"),
             (f"- simulated: the same systems, rates, workload and SLOs on the latency profile "
             f"`{result['latency_profile']}` (profiled accuracy {result['profile_accuracy']:.1%}), step-time "
             f"noise {result['noise']:.0%}; "
             + ("the LS requests replayed as sent (arrival times and prompt lengths)"
                if result["sim"]["workload"].get("ls_prompt_lengths") else
                "LS arrival times as sent, prompt lengths drawn from ShareGPT's")),
             *([("- steps priced as they ran while serving (the controlled systems: their measured over "
                 "profiled time per step kind; the others: SGLang's forward seconds over the same passes "
                 "simulated at the profile's pace): " + "; ".join(
                     f"{system} " + ", ".join(f"{kind} {f:.2f}" for kind, f in sorted(kinds.items()))
                     for system, kinds in sorted(result["served_factors"].items())))]
               if result.get("served_factors") else []),
             *([("- the scheduler's own time per pass outside the forward (SGLang's stage counters), added "
                 "to every simulated step: " + ", ".join(f"{system} {s * 1e3:.1f} ms" for system, s
                                                         in sorted(result["step_overheads"].items())))]
               if result.get("step_overheads") else []),
             (f"- bounds: attainment within {BOUNDS['attainment_points']:g} points, BE tokens/s within "
             f"{BOUNDS['be_tokens_ratio']:.0%}, p50 TPOT within {BOUNDS['p50_tpot_ratio']:.0%}; "
             f"{result['within']} of {result['checks']} checks within"),
             (f"- every simulated value is the mean of {PACE_MEMBERS} simulations with every pace moved evenly "
              f"from {PACE_SPREAD:.0%} slower to {PACE_SPREAD:.0%} faster (how much a system's pace moves between "
              "runs); the range column gives their attainments' span (a wide one: a row on a knife's edge, "
              "where a few percent of step time moves attainment by more than the bound, in the real server "
              "as in the simulator)"),
             f"- wall time {result['wall_s']:.0f} s"
             + (f" (the real run's: {result['real_wall_s']:.0f} s)" if result.get("real_wall_s") else ""), "",
             (f"| system | LS/s | attainment real / sim | sim attainment range, pace ±{PACE_SPREAD:.0%} "
              "| BE tok/s real / sim | p50 TPOT ms real / sim |"),
             "|---|---|---|---|---|---|"]
    mark = {True: "", False: " **x**"}
    for c in result["comparison"]:
        lo, hi = c["sim_attainment_band"]
        lines.append(
            f"| {c['system']} | {c['ls_rate']:g} | {c['real_attainment']:.1%} / {c['sim_attainment']:.1%}"
            f"{mark[c['attainment_ok']]} | {lo:.1%} - {hi:.1%} | {c['real_be_tokens_per_s']:.1f} / "
            f"{c['sim_be_tokens_per_s']:.1f}{mark[c['be_ok']]} | {c['real_p50_tpot_s'] * 1e3:.0f} / "
            f"{c['sim_p50_tpot_s'] * 1e3:.0f}{mark[c['tpot_ok']]} |")
    lines += ["", "Simulated rows (at the measured pace):", "", *rows_table(result["sim"]["rows"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, help="a finished coserve-quick.json instead of running coserve")
    ap.add_argument("--latency-profile", type=Path, help="a latency profile instead of profiling now")
    ap.add_argument("--coserve-args", default="", help="more coserve.py flags, e.g. '--rates 0.3,0.6' on a "
                    "machine too slow for the quick profile's rates")
    ap.add_argument("--duration", type=float, default=VALIDATE_DURATION_S,
                    help="coserve's measurement window per run, s")
    ap.add_argument("--noise", type=float, default=None,
                    help="step-time noise (default: 1 - profiled accuracy, at most 0.3)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    started = time.time()
    work = args.out / "sim-validate-work"
    work.mkdir(parents=True, exist_ok=True)
    profile = args.latency_profile or work / "latency-profile.json"
    if not profile.is_file():
        sys.path.insert(0, str(HERE))
        from coserve import PROFILES

        quick = PROFILES["quick"]
        profile_machine(profile, ["--model-path", ensure_default_model(), "--schedule-policy", "fcfs",
                                  *quick.server_args, *quick.omniserve_args])
    if args.real:
        real_path = args.real
    else:
        subprocess.run([sys.executable, str(HERE / "coserve.py"), "--profile", "quick", "--out", str(work),
                        "--seed", str(args.seed), "--duration", str(args.duration),
                        "--omniserve-args", f"--omniserve-profile {profile}",
                        *shlex.split(args.coserve_args)], check=False)
        real_path = work / "coserve-quick.json"
    real = orjson.loads(real_path.read_bytes())
    lm = LatencyModel.load(profile)
    acc = float(lm.meta.get("accuracy_mean", 0.9))
    # The profile's held-out error stands for the step-to-step noise (bounded: a profile made on a
    # busy machine fits badly, and the noise would then swamp every step).
    noise = args.noise if args.noise is not None else min(max(1.0 - acc, 0.0), 0.3)
    served = served_factors(real)
    sim = simulate_like(real, profile, noise, args.seed, served)
    if more := forward_factors(real, sim, served):  # the other systems' pace, from the first pass's steps
        served |= more
        sim = simulate_like(real, profile, noise, args.seed, served)
    comparison = compare(real, pace_ensemble(real, profile, noise, args.seed, served, sim))
    checks = [c[k] for c in comparison for k in ("attainment_ok", "be_ok", "tpot_ok")]
    result = {"real_source": str(real_path.relative_to(args.out) if real_path.is_relative_to(args.out) else real_path),
              "latency_profile": profile.name, "profile_accuracy": acc, "noise": noise, "slo": real["slo"],
              "served_factors": served, "step_overheads": step_overheads(real), "real_wall_s": real.get("wall_s"),
              "bounds": BOUNDS, "comparison": comparison, "within": sum(checks), "checks": len(checks),
              "wall_s": round(time.time() - started, 1), "sim": sim, "real_rows": real["rows"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim-validate.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (args.out / "sim-validate.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
