"""Simulate co-serving of LS and BE traffic, every system side by side on the same workload seed:

    # the paper's setting: Llama-2-70B, TP4 on 4 A100-80GB, the Xeon Gold 6342 host
    python -m omniserve_sgl.simulate --gpu a100-80gb --tp 4 --model llama-2-70b --rates 1,2,4
    # ... with 2 CPU servers over 100 Gbit/s
    python -m omniserve_sgl.simulate --gpu a100-80gb --tp 4 --model llama-2-70b --remote-cpus 2 --link 100gbit
    # a latency profile measured on this machine (python -m omniserve_sgl.profile --out P.json)
    python -m omniserve_sgl.simulate --profile P.json --gpu-kv-tokens 4096 --be-pool-gb 1 ...

Writes <out>/<name>.{json,md} and the plots of ``benchmarks/coserve.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omniserve_sgl.bench.report import rows_table
from omniserve_sgl.control import SLO, ControllerConfig, LatencyModel
from omniserve_sgl.simulate.engine import SYSTEMS, SimConfig
from omniserve_sgl.simulate.experiment import SIM_COLUMNS, Scenario, run, write
from omniserve_sgl.simulate.hardware import (
    CPUS,
    GB,
    GPUS,
    LINKS,
    ModelSpec,
    ProfileTiming,
    RooflineTiming,
    shipped_model,
)


def _model(name: str) -> ModelSpec:
    return ModelSpec.from_config(name) if Path(name).exists() else shipped_model(name)


def build(args) -> tuple[object, int, int, str]:
    """The timing, GPU KV tokens, BE pool tokens per CPU node and a hardware description."""
    if args.profile:
        lm = LatencyModel.load(args.profile)
        key = lm.meta.get("key") or {}
        model = _model(args.model or key.get("model") or "")
        if "float32" in str(key.get("dtype", "")):
            model = ModelSpec(**{**model.__dict__, "dtype_bytes": 4})
        timing = ProfileTiming(lm, model.kv_bytes_per_token, model.layers, qo_bytes_per_row_layer=model.qo_bytes_per_row_layer)
        if not args.gpu_kv_tokens:
            raise ValueError("--profile needs --gpu-kv-tokens (the server's --max-total-tokens)")
        desc = f"latency profile {args.profile} ({key.get('device', '?')}, {model.name}, {model.layers} layers)"
        kv = args.gpu_kv_tokens
    else:
        model = _model(args.model)
        timing = RooflineTiming(model, GPUS[args.gpu], CPUS[args.cpu], tp=args.tp)
        kv = args.gpu_kv_tokens or timing.gpu_kv_tokens()
        desc = (f"roofline: {model.name} on {args.tp} x {GPUS[args.gpu].name}, host {CPUS[args.cpu].name} "
                f"(CPU attention {timing.cpu_bytes_per_s / GB:.0f} GB/s)")
    pool_bytes = args.be_pool_gb * GB if args.be_pool_gb else (
        0.5 * CPUS[args.cpu].memory_bytes if not args.profile else 1 * GB)
    if args.remote_cpus:
        desc += f", {args.remote_cpus} remote CPU servers over {LINKS[args.link].name}"
    return timing, kv, int(pool_bytes // model.kv_bytes_per_token), desc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omniserve_sgl.simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    hw = ap.add_argument_group("hardware (a latency profile, or a roofline of presets)")
    hw.add_argument("--profile", type=Path, help="latency model JSON from the controller's profiler")
    hw.add_argument("--model", default="llama-2-70b", help="benchmarks/configs/<name> or a config.json path "
                    "(with --profile: default the profiled model)")
    hw.add_argument("--gpu", choices=sorted(GPUS), default="a100-80gb")
    hw.add_argument("--tp", type=int, default=4, help="tensor-parallel GPUs")
    hw.add_argument("--cpu", choices=sorted(CPUS), default="xeon-gold-6342", help="the host and remote CPU servers")
    hw.add_argument("--remote-cpus", type=int, default=0, help="CPU servers beside the host")
    hw.add_argument("--link", choices=sorted(LINKS), default="100gbit", help="network to the remote CPU servers")
    hw.add_argument("--gpu-kv-tokens", type=int, default=0, help="GPU KV cache, tokens (default: roofline's)")
    hw.add_argument("--be-pool-gb", type=float, default=0, help="BE KV pool per CPU node, GB "
                    "(default: half the CPU's memory; 1 with --profile)")
    hw.add_argument("--chunk", type=int, default=8192, help="largest prefill chunk, tokens")
    hw.add_argument("--max-running", type=int, default=256)
    hw.add_argument("--noise", type=float, default=0.0, help="lognormal spread of step times around the model")
    hw.add_argument("--drain", type=float, default=600.0, help="after the window, requests in flight get this long, s")
    wl = ap.add_argument_group("workload")
    wl.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    wl.add_argument("--rates", default="1,2,4", help="LS requests/s")
    wl.add_argument("--duration", type=float, default=120.0, help="window per run, s")
    wl.add_argument("--arrivals", choices=("poisson", "bursty"), default="poisson")
    wl.add_argument("--ls-max-prompt", type=int, default=1024, help="longest ShareGPT LS prompt, tokens")
    wl.add_argument("--ls-output", type=int, default=None, help="LS output tokens (default: ShareGPT's)")
    wl.add_argument("--be-lengths", default="longbench-v2", help="longbench-v2, dailymails or MIN-MAX:OUT")
    wl.add_argument("--be-concurrency", type=int, default=128, help="BE backlog in flight")
    wl.add_argument("--be-rate", type=float, default=0.0, help="BE Poisson arrivals/s instead of a backlog")
    wl.add_argument("--headroom-be-concurrency", type=int, default=8)
    wl.add_argument("--ttft-slo", type=float, default=2.0, help="s (the paper: 2-3)")
    wl.add_argument("--tpot-slo", type=float, default=0.2, help="s (the paper: 0.15-0.25)")
    wl.add_argument("--be-placement", choices=("auto", "cpu"), default="auto")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--name", default="sim")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no line per run, only the table")
    args = ap.parse_args(argv)
    try:
        systems = tuple(s.strip() for s in args.systems.split(","))
        if unknown := sorted(set(systems) - set(SYSTEMS)):
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
        timing, kv, pool, desc = build(args)
        slo = SLO(args.ttft_slo, args.tpot_slo)
        scenario = Scenario(args.name, systems, tuple(float(x) for x in args.rates.split(",")), args.duration, slo,
                            ls_arrivals=args.arrivals, ls_max_prompt_tokens=args.ls_max_prompt,
                            ls_output_tokens=args.ls_output, be_lengths=args.be_lengths,
                            be_concurrency=args.be_concurrency, be_rate=args.be_rate,
                            headroom_be_concurrency=args.headroom_be_concurrency)
        ctl = ControllerConfig(be_placement=args.be_placement)

        def config(system: str) -> SimConfig:
            return SimConfig(system, timing, slo, kv, pool, chunk_tokens=args.chunk, max_running=args.max_running,
                             controller=ctl, remote_cpus=args.remote_cpus, link=LINKS[args.link],
                             noise=args.noise, seed=args.seed, drain_timeout_s=args.drain)
        print(f"simulating {desc}", flush=True)
        result = run(scenario, config, desc, seed=args.seed, progress=None if args.quiet else print)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    paths = write(result, args.out / args.name, plots=not args.no_plots)
    print("\n".join(["", *rows_table(result["rows"], SIM_COLUMNS), ""]))
    print(f"wrote {', '.join(str(p) for p in paths[:2])} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
