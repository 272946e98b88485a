"""The latency model corrected online by the server's own step times.

A profile is measured on an idle server; serving adds what the profile does not see (the
scheduler's bookkeeping, the CPU worker sharing cores and memory bandwidth with the forward, a
busier host). :class:`OnlineCorrection` keeps, per kind of step, an exponentially weighted mean of
``measured / predicted`` and scales the profile's predictions by it, so a systematic bias fades
within tens of steps while the profile keeps the shape (the staircase, the attention slopes).
"""

from __future__ import annotations

from omniserve_sgl.control.latency import LatencyModel, StepShape

PREFILL, DECODE, DECODE_CPU = "prefill", "decode", "decode+cpu"


def step_kind(shape: StepShape) -> str:
    """``prefill`` (no decode rows), ``decode+cpu`` (decode rows, some on the CPU worker) or ``decode``."""
    if shape.decode_rows == 0:
        return PREFILL
    return DECODE_CPU if shape.cpu_jobs > 0 else DECODE


class OnlineCorrection:
    """``model``'s predictions times a per-kind factor learned from measured steps.

    Args:
        model: the profiled latency model.
        alpha: weight of the newest step in the running mean of ``measured / predicted``.
        bounds: the factor stays within these (a wild step, e.g. a page fault storm, cannot make
            the controller believe the machine is 10x slower).
    """

    def __init__(self, model: LatencyModel, alpha: float = 0.05, bounds: tuple[float, float] = (0.5, 3.0)):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.model, self.alpha, self.bounds = model, alpha, bounds
        self.factors = {PREFILL: 1.0, DECODE: 1.0, DECODE_CPU: 1.0}

    def predict(self, shape: StepShape) -> float:
        """Corrected wall time of a step of ``shape``, s."""
        return self.model.predict(shape) * self.factors[step_kind(shape)]

    def observe(self, shape: StepShape, measured_s: float) -> None:
        """Folds one measured step (wall time ``measured_s``, s) into its kind's factor."""
        raw = self.model.predict(shape)
        if raw <= 0 or not measured_s > 0:
            return
        kind = step_kind(shape)
        f = (1 - self.alpha) * self.factors[kind] + self.alpha * measured_s / raw
        self.factors[kind] = min(max(f, self.bounds[0]), self.bounds[1])
