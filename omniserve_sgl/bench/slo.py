"""SLO attainment, latency percentiles and throughput from client-side request records
(:class:`omniserve_sgl.bench.loadgen.RequestRecord`). Attainment is SGLang's own definition
(``sglang.benchmark.goodput.calculate_goodput``): a request meets the SLOs when it succeeded and
its TTFT and TPOT are both within them; requests that failed count as misses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from sglang.benchmark.goodput import calculate_goodput

from omniserve_sgl.bench.loadgen import RequestRecord
from omniserve_sgl.service_class import BE, LS


@dataclasses.dataclass(frozen=True)
class SLO:
    """Per-request LS latency objectives, seconds."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self):
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be > 0 s, got TTFT {self.ttft_s} s, TPOT {self.tpot_s} s")


def tpot(rec: RequestRecord) -> float:
    """Time per output token after the first, s: ``(latency - ttft) / (output_len - 1)``, 0 for
    a single-token answer (``sglang.benchmark.goodput.calculate_goodput``'s definition)."""
    return (rec.latency - rec.ttft) / (rec.output_len - 1) if rec.output_len > 1 else 0.0


def accuracy_from_error_buckets(buckets: dict[float, float]) -> tuple[float, float]:
    """Mean and p90 accuracy of the latency model, ``1 - |predicted - measured| / measured``, from
    the cumulative buckets of ``omniserve_step_time_prediction_error`` (see ``bench.launch.histogram``;
    a difference of two readings covers the steps between them). The mean takes each step at the
    middle of its bucket; p90 is the accuracy 90% of the steps reach, ``1 - `` the error's 90th
    percentile interpolated within its bucket (Prometheus' ``histogram_quantile``).

    Returns:
        ``(mean, p90)``; NaN for no steps.
    """
    edges = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan"), float("nan")
    mean_err, prev_edge, prev_count, p90_err = 0.0, 0.0, 0.0, None
    for edge in edges:
        n = buckets[edge] - prev_count
        upper = edge if edge != float("inf") else prev_edge * 2
        mean_err += n * (prev_edge + upper) / 2
        if p90_err is None and buckets[edge] >= 0.9 * total:
            p90_err = prev_edge + (upper - prev_edge) * (0.9 * total - prev_count) / n
        prev_edge, prev_count = upper, buckets[edge]
    return 1.0 - mean_err / total, 1.0 - p90_err


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation, numpy's default); NaN for no samples."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def lost(records: Sequence[RequestRecord]) -> int:
    """Requests that did not complete with every token they asked for (errors, truncation,
    timeouts)."""
    return sum(not r.finished for r in records)


def ls_summary(records: Sequence[RequestRecord], slo: SLO, duration_s: float) -> dict:
    """LS SLO attainment and latency percentiles of the LS records among ``records``.

    Returns:
        ``ls_requests``; ``ls_slo_attainment`` (both SLOs met), ``ttft_attainment``,
        ``tpot_attainment`` as fractions in [0, 1] of all LS requests sent; ``ls_p{50,90,99}_ttft_s``
        and ``ls_p{50,90,99}_tpot_s`` over the successful ones, s; ``ls_goodput`` (requests/s
        meeting both SLOs over ``duration_s``). Attainments are NaN with no LS requests.
    """
    ls = [r for r in records if r.service_class == LS]
    out = {"ls_requests": len(ls)}
    if ls:
        good = calculate_goodput(ls, {"ttft": slo.ttft_s * 1e3, "tpot": slo.tpot_s * 1e3}, duration_s)
        out |= {"ls_slo_attainment": good.slo_attainment,
                "ttft_attainment": good.slo_attainment_by_metric["ttft"],
                "tpot_attainment": good.slo_attainment_by_metric["tpot"],
                "ls_goodput": good.request_goodput}
    else:
        out |= dict.fromkeys(("ls_slo_attainment", "ttft_attainment", "tpot_attainment", "ls_goodput"), float("nan"))
    ok = [r for r in ls if r.success]
    for q in (50, 90, 99):
        out[f"ls_p{q}_ttft_s"] = percentile([r.ttft for r in ok], q)
        out[f"ls_p{q}_tpot_s"] = percentile([tpot(r) for r in ok], q)
    return out


def be_tokens_per_s(records: Sequence[RequestRecord], window_s: float) -> float:
    """BE output tokens received during ``[0, window_s]`` divided by ``window_s``, tokens/s.

    Only the measurement window counts: tokens of the drain after it (BE running with no LS load)
    would flatter the systems that starve BE during the window."""
    if window_s <= 0:
        raise ValueError(f"window must be > 0 s, got {window_s}")
    return sum(t <= window_s for r in records if r.service_class == BE for t in r.token_times) / window_s


def derive_slo(ls_alone: Sequence[RequestRecord], ttft_factor: float, tpot_factor: float) -> SLO:
    """SLOs as multiples of the LS-alone median TTFT and TPOT of the same run.

    Raises:
        ValueError: no successful LS request to derive them from.
    """
    ok = [r for r in ls_alone if r.service_class == LS and r.success and r.output_len > 1]
    if not ok:
        raise ValueError("no successful LS-alone request to derive the SLOs from")
    return SLO(ttft_factor * percentile([r.ttft for r in ok], 50), tpot_factor * percentile([tpot(r) for r in ok], 50))
