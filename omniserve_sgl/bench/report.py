"""Rows, Markdown table and plots of a co-serving run, shared by the real benchmark
(``benchmarks/coserve.py``) and the simulator (``python -m omniserve_sgl.simulate``), so the two
report the same things the same way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omniserve_sgl.bench.loadgen import RequestRecord
from omniserve_sgl.bench.slo import SLO, be_tokens_per_s, lost, ls_summary
from omniserve_sgl.service_class import BE, LS

STYLES = {"ls-only": {"marker": "s", "ls": ":", "lw": 2.5}, "fcfs": {"marker": "v"}, "priority": {"marker": "^"},
          "headroom": {"marker": "D"}, "omniserve-nocontrol": {"marker": "x", "ls": "--"},
          "omniserve-sync": {"marker": "P", "ls": "-."}, "omniserve": {"marker": "o", "lw": 2}}  # ls-only often overlaps


def row(system: str, rate: float, records: Sequence[RequestRecord], slo: SLO, duration_s: float) -> dict:
    """One (system, LS rate) row: :func:`~omniserve_sgl.bench.slo.ls_summary`'s LS fields, BE
    tokens/s inside the ``duration_s`` window, requests finished per class, requests lost and up to
    three distinct errors."""
    be = [r for r in records if r.service_class == BE]
    return {"system": system, "ls_rate": rate, **ls_summary(records, slo, duration_s),
            "be_tokens_per_s": be_tokens_per_s(records, duration_s),
            "be_requests_finished": sum(r.finished for r in be),
            "ls_requests_finished": sum(r.finished for r in records if r.service_class == LS),
            "lost": lost(records), "errors": sorted({r.error for r in records if r.error})[:3]}


def format_row(r: dict) -> str:
    """A row as one progress line."""
    return (f"  {r['system']:>9} @ {r['ls_rate']:g} LS/s: SLO attainment {r['ls_slo_attainment']:.0%} "
            f"(TTFT {r['ttft_attainment']:.0%}, TPOT {r['tpot_attainment']:.0%}), p99 TTFT "
            f"{r['ls_p99_ttft_s'] * 1e3:.0f} ms, p99 TPOT {r['ls_p99_tpot_s'] * 1e3:.1f} ms, "
            f"BE {r['be_tokens_per_s']:.1f} tok/s, lost {r['lost']}")


def rows_table(rows: Sequence[dict], extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The rows as Markdown table lines; ``extra`` adds ``(header, format)`` columns, each format a
    ``str.format`` template over the row (e.g. ``("GPU util", "{gpu_utilisation:.0%}")``)."""
    lines = ["| system | LS/s | SLO attainment | TTFT att. | TPOT att. | p50 TTFT ms | p99 TTFT ms | p50 TPOT ms "
             "| p99 TPOT ms | BE tok/s | BE done | lost |" + "".join(f" {h} |" for h, _ in extra),
             "|---" * (12 + len(extra)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['ls_rate']:g} | {r['ls_slo_attainment']:.1%} | {r['ttft_attainment']:.1%} "
            f"| {r['tpot_attainment']:.1%} | {r['ls_p50_ttft_s'] * 1e3:.0f} | {r['ls_p99_ttft_s'] * 1e3:.0f} "
            f"| {r['ls_p50_tpot_s'] * 1e3:.1f} | {r['ls_p99_tpot_s'] * 1e3:.1f} | {r['be_tokens_per_s']:.1f} "
            f"| {r['be_requests_finished']} | {r['lost']} |" + "".join(f" {fmt.format(**r)} |" for _, fmt in extra))
    return lines


def write_plots(result: dict, stem: Path) -> list[Path]:
    """LS SLO attainment vs LS rate, BE tokens/s vs LS rate, LS TPOT CDF per system (highest rate),
    from ``result``'s ``rows``, ``systems``, ``profile``, ``slo`` and ``ls_tpot_samples_s``; written
    next to ``stem`` as ``<stem>-{attainment,be-throughput,tpot-cdf}.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, paths = result["rows"], []
    for key, ylabel, name in (("ls_slo_attainment", "LS SLO attainment", "attainment"),
                              ("be_tokens_per_s", "BE output tokens/s", "be-throughput")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for system in result["systems"]:
            pts = [(r["ls_rate"], r[key]) for r in rows if r["system"] == system]
            if pts and not (key == "be_tokens_per_s" and system == "ls-only"):
                ax.plot(*zip(*pts), label=system, **STYLES.get(system, {}))
        ax.set(xlabel="LS rate (requests/s)", ylabel=ylabel, title=f"{ylabel} ({result['profile']})")
        if key == "ls_slo_attainment":
            ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, stem, name))
    rate = f"{max(r['ls_rate'] for r in rows):g}"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for system, by_rate in result["ls_tpot_samples_s"].items():
        xs = by_rate.get(rate, [])
        if xs:
            ax.step([x * 1e3 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                    label=system, ls=STYLES.get(system, {}).get("ls", "-"))
    ax.axvline(result["slo"]["tpot_s"] * 1e3, color="k", ls="--", lw=1, label="TPOT SLO")
    ax.set(xlabel="LS TPOT (ms)", ylabel="fraction of LS requests", title=f"LS TPOT CDF at {rate} LS/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, stem, "tpot-cdf"))
    return paths


def _save(fig, stem: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = stem.with_name(f"{stem.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
