"""The latency model corrected online by the server's own step times.

A profile is measured on an idle server; serving adds what the profile does not see (the
scheduler's bookkeeping, the CPU worker sharing cores and memory bandwidth with the forward, a
busier host). :class:`OnlineCorrection` keeps exponentially weighted means of ``measured /
predicted``, one per kind of GPU step and one for the CPU worker's part of a step, and scales the
profile's predictions by them, so a systematic bias fades within tens of steps while the profile
keeps the shape (the staircase, the attention slopes). A second, fast factor over all steps
follows the host's pace from step to step (a shared or frequency-scaled CPU runs slow and fast for
seconds at a time): on the 2-core VM it took the served-step accuracy from 87.0% to 89.4% on a
replayed step log (``benchmarks/results/NOTES.md``).
"""

from __future__ import annotations

import dataclasses

from omniserve_sgl.control.latency import LatencyModel, StepShape

PREFILL, DECODE, DECODE_CPU = "prefill", "decode", "decode+cpu"
STEP_KINDS = (PREFILL, DECODE, DECODE_CPU)


def step_kind(shape: StepShape) -> str:
    """``prefill`` (a prefill chunk, with or without decode rows: a mixed step's time is mostly
    its chunk's), ``decode+cpu`` (decode rows only, some on the CPU worker) or ``decode``."""
    if _gpu_kind(shape) == PREFILL:
        return PREFILL
    return DECODE_CPU if shape.cpu_jobs > 0 else DECODE


def _gpu_kind(shape: StepShape) -> str:
    has_chunk = shape.prefill_context > 0 or shape.prefill_attn_work > 0
    return PREFILL if shape.decode_rows == 0 or has_chunk else DECODE


class OnlineCorrection:
    """``model``'s predictions times learned factors: the GPU part of a step (all but the CPU
    worker's terms) times its kind's factor (``prefill`` or ``decode``), the CPU worker's part times
    the ``decode+cpu`` factor, learned from what a step with CPU jobs took beyond its corrected GPU
    part. Split so, a prediction never falls when rows join a step (a CPU row adds a positive term
    to the decode step it joins; one factor per step kind would price a decode step with a CPU row
    below the same step without it whenever the CPU kind's factor is the smaller).

    Args:
        model: the profiled latency model.
        alpha: weight of the newest step in the running mean of ``measured / predicted`` per kind.
        pace_alpha: weight of the newest step in the pace factor (``measured / corrected``, all
            kinds); 0 turns it off.
        bounds: each factor stays within these (a wild step, e.g. a page fault storm, cannot make
            the controller believe the machine is 10x slower).

    Raises:
        ValueError: ``alpha`` outside (0, 1] or ``pace_alpha`` outside [0, 1].
    """

    def __init__(self, model: LatencyModel, alpha: float = 0.05, pace_alpha: float = 0.3,
                 bounds: tuple[float, float] = (0.5, 3.0)):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0 <= pace_alpha <= 1:
            raise ValueError(f"pace_alpha must be in [0, 1], got {pace_alpha}")
        self.model, self.alpha, self.pace_alpha, self.bounds = model, alpha, pace_alpha, bounds
        self.factors = {PREFILL: 1.0, DECODE: 1.0, DECODE_CPU: 1.0}
        self.pace = 1.0

    def _parts(self, shape: StepShape) -> tuple[str, float, float]:
        """(GPU part's kind, GPU part, CPU worker's part) of the profile's prediction, s."""
        total = self.model.predict(shape)
        if shape.cpu_jobs <= 0 and shape.cpu_kv_bytes <= 0:
            return _gpu_kind(shape), total, 0.0
        gpu = self.model.predict(dataclasses.replace(shape, cpu_kv_bytes=0.0, cpu_jobs=0))
        return _gpu_kind(shape), gpu, max(total - gpu, 0.0)

    def _corrected(self, kind: str, gpu: float, cpu: float) -> float:
        return gpu * self.factors[kind] + cpu * self.factors[DECODE_CPU]

    def predict(self, shape: StepShape) -> float:
        """Corrected wall time of a step of ``shape``, s."""
        return self._corrected(*self._parts(shape)) * self.pace

    def observe(self, shape: StepShape, measured_s: float) -> None:
        """Folds one measured step (wall time ``measured_s``, s) into its factors and the pace: a
        step without CPU jobs into its kind's, one with them into the CPU part's (what it took
        beyond its corrected GPU part, over the profile's CPU part)."""
        kind, gpu, cpu = self._parts(shape)
        corrected = self._corrected(kind, gpu, cpu)
        if corrected <= 0 or not measured_s > 0:
            return
        lo, hi = self.bounds
        pace = (1 - self.pace_alpha) * self.pace + self.pace_alpha * measured_s / corrected
        self.pace = min(max(pace, lo), hi)
        if cpu > 0:
            kind, ratio = DECODE_CPU, (measured_s - gpu * self.factors[kind]) / cpu
        else:
            ratio = measured_s / gpu
        f = (1 - self.alpha) * self.factors[kind] + self.alpha * ratio
        self.factors[kind] = min(max(f, lo), hi)
