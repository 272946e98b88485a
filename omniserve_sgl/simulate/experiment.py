"""A simulated co-serving experiment: every system at every LS rate on the same workload seed, with
the rows, table and plots of ``benchmarks/coserve.py`` plus GPU and CPU utilisation and the BE
tokens that went through CPU attention."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from omniserve_sgl.bench.report import format_row, row, rows_table, write_plots
from omniserve_sgl.bench.slo import SLO as BenchSLO
from omniserve_sgl.bench.slo import tpot
from omniserve_sgl.control import SLO
from omniserve_sgl.simulate.engine import SimConfig, simulate
from omniserve_sgl.simulate.workload import (
    arrivals,
    be_stream,
    document_lengths,
    fixed_or_sharegpt,
    ls_requests,
    replay_lengths,
)

SIM_COLUMNS = (("GPU util", "{gpu_utilisation:.0%}"), ("CPU util", "{cpu_utilisation:.0%}"),
               ("BE tok via CPU", "{be_cpu_tokens}"))


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Workload and SLOs of an experiment. Token counts per request; times in seconds.

    Attributes:
        ls_arrivals: ``poisson`` or ``bursty`` (see :mod:`omniserve_sgl.simulate.workload`).
        ls_output_tokens: output tokens per LS request (None: ShareGPT's answer lengths).
        be_lengths: a :func:`~omniserve_sgl.simulate.workload.document_lengths` spec.
        be_concurrency: BE backlog in flight (0 with ``be_rate``).
        be_rate: BE arrivals/s of a Poisson stream instead of a backlog (0: backlog).
        headroom_be_concurrency: the ``headroom`` system's backlog cap.
        ls_prompt_lengths: replay these LS prompt lengths (a real run's, in the order it sent them:
            see :func:`~omniserve_sgl.simulate.workload.replay_lengths`; needs ``ls_output_tokens``);
            empty: ShareGPT lengths drawn.
    """

    name: str
    systems: tuple[str, ...]
    ls_rates: tuple[float, ...]
    duration_s: float
    slo: SLO
    ls_arrivals: str = "poisson"
    ls_max_prompt_tokens: int = 1024
    ls_output_tokens: int | None = None
    be_lengths: str = "longbench-v2"
    be_concurrency: int = 64
    be_rate: float = 0.0
    headroom_be_concurrency: int = 8
    ls_prompt_lengths: tuple[int, ...] = ()


def run(scenario: Scenario, config: Callable[[str], SimConfig], hardware: str, seed: int = 0,
        progress: Callable[[str], None] | None = print) -> dict:
    """Simulates every system of ``scenario`` at every LS rate (``config(system)`` builds each
    instance); returns the result dict ``benchmarks/coserve.py`` writes (``rows``,
    ``ls_tpot_samples_s``, ``slo``, ``systems``, ...) with the simulator's columns in each row.

    Raises:
        ValueError: an invalid scenario (unknown system, arrival kind or BE lengths; LS prompt
            lengths to replay without a fixed output length).
    """
    started = time.time()
    drawn = fixed_or_sharegpt(scenario.ls_max_prompt_tokens, scenario.ls_output_tokens)
    be_draw = document_lengths(scenario.be_lengths)
    rows, samples = [], {}
    for system in scenario.systems:
        for i, rate in enumerate(scenario.ls_rates):
            cfg = config(system)
            ls_lengths = (replay_lengths(scenario.ls_prompt_lengths, scenario.ls_output_tokens)
                          if scenario.ls_prompt_lengths else drawn)
            ls = ls_requests(arrivals(scenario.ls_arrivals, rate, scenario.duration_s, seed + i), ls_lengths, seed + i)
            if scenario.be_rate > 0:
                be = {"be": be_stream(scenario.be_rate, scenario.duration_s, be_draw, seed + 100 + i)}
            else:
                n = scenario.headroom_be_concurrency if system == "headroom" else scenario.be_concurrency
                be = {"be_backlog": be_draw, "be_concurrency": n}
            records, stats = simulate(cfg, ls, scenario.duration_s, **be)
            r = row(system, rate, records, BenchSLO(scenario.slo.ttft_s, scenario.slo.tpot_s), scenario.duration_s)
            r |= {"gpu_utilisation": stats.gpu_utilisation, "cpu_utilisation": stats.cpu_utilisation,
                  "be_cpu_tokens": stats.be_cpu_tokens, "steps": stats.steps, "step_s": stats.step_s}
            rows.append(r)
            samples.setdefault(system, {})[f"{rate:g}"] = sorted(
                tpot(x) for x in records if x.service_class == "ls" and x.success)
            if progress:
                progress(format_row(r))
    return {"profile": scenario.name, "device": hardware, "simulated": True,
            "slo": {"ttft_s": scenario.slo.ttft_s, "tpot_s": scenario.slo.tpot_s, "source": "given"},
            "workload": dataclasses.asdict(scenario) | {"slo": None}, "systems": list(scenario.systems),
            "wall_s": round(time.time() - started, 1), "rows": rows, "ls_tpot_samples_s": samples}


def write(result: dict, stem: Path, plots: bool = True) -> list[Path]:
    """Writes ``<stem>.json``, ``<stem>.md`` and (``plots``) the PNG plots; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    pngs = write_plots(result, stem) if plots else []
    stem.with_suffix(".md").write_text(report(result, pngs))
    return [stem.with_suffix(".json"), stem.with_suffix(".md"), *pngs]


def report(result: dict, plots: list[Path]) -> str:
    """The Markdown report of a simulated experiment."""
    slo, w = result["slo"], result["workload"]
    be = (f"Poisson {w['be_rate']:g}/s" if w["be_rate"] else
          f"{w['be_concurrency']} in flight (headroom: {w['headroom_be_concurrency']})")
    ls_out = w["ls_output_tokens"] or "ShareGPT answer lengths of"
    lines = [
        f"# Simulated co-serving, `{result['profile']}`", "",
        f"- hardware: {result['device']}",
        f"- SLOs: TTFT {slo['ttft_s'] * 1e3:.0f} ms, TPOT {slo['tpot_s'] * 1e3:.1f} ms",
        (f"- LS: ShareGPT prompts <= {w['ls_max_prompt_tokens']} tokens, {ls_out} output tokens, "
         f"{w['ls_arrivals']} arrivals for {w['duration_s']:g} s per run"),
        f"- BE: {be}, lengths `{w['be_lengths']}`; BE tokens/s counts tokens inside the window",
        f"- simulated in {result['wall_s']:.0f} s", "",
        *rows_table(result["rows"], SIM_COLUMNS), "", *(f"![{p.stem}]({p.name})" for p in plots), "",
    ]
    return "\n".join(lines)
