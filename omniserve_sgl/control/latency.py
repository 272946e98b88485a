"""Latency model of one forward step, fitted from measured steps (OmniServe paper section 3.3: a
profiler fits module latency models that the scheduler queries every step).

One step's time, in seconds::

    t = c_step                                   fixed per-step cost (launches, sampling, Python)
      + c_dense * ceil(tokens / tile)            dense work (QKV/O projections, MLP, LM head): a
                                                 staircase in the batch's token count, which jumps
                                                 with each new GPU wave/tile instead of growing
                                                 smoothly
      + c_prefill_attn * prefill_attn_work       GPU attention of prefill chunks: sum over chunks of
                                                 chunk_len * (cached prefix + chunk_len)
      + c_prefill_ctx * prefill_context          ... and the KV each chunk reads: sum over chunks of
                                                 cached prefix + chunk_len (large on SGLang's CPU
                                                 path, which gathers a request's whole KV per layer)
      + c_decode_attn * decode_context           GPU attention of decode rows: their summed context
      + c_decode_row * decode_rows               a cost per decode row beyond its dense work (per-request
                                                 attention calls, sampling; large on SGLang's CPU path)
      + c_cpu_bytes * cpu_kv_bytes               the CPU worker's attention for BE rows: KV bytes read
      + c_cpu_job * cpu_jobs                     ... and a cost per job (one job per layer per step)

The CPU terms add to the step because the GPU waits for the worker in each layer (the synchronous
path); asynchronous piggybacking overlaps them instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TILES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # staircase step widths tried by the fit, tokens
_TERMS = ("c_step", "c_dense", "c_prefill_attn", "c_prefill_ctx", "c_decode_attn", "c_decode_row", "c_cpu_bytes",
          "c_cpu_job")
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What the latency model reads of one forward step.

    Attributes:
        tokens: tokens in the batch's dense work (prefill chunk tokens + one per decode row, LS and
            BE: BE rows run their dense work on the GPU too).
        prefill_attn_work: sum over prefill chunks of ``chunk_len * (prefix_len + chunk_len)``,
            token pairs.
        prefill_context: sum over prefill chunks of ``prefix_len + chunk_len``, tokens.
        decode_context: summed context length of decode rows whose attention runs on the GPU, tokens.
        decode_rows: decode rows in the step (LS and BE, wherever their attention runs).
        cpu_kv_bytes: KV bytes the CPU worker reads for BE rows in this step, all layers.
        cpu_jobs: CPU attention jobs in this step (one per layer when any BE row runs on the CPU).
    """

    tokens: int
    prefill_attn_work: float = 0.0
    prefill_context: int = 0
    decode_context: int = 0
    decode_rows: int = 0
    cpu_kv_bytes: float = 0.0
    cpu_jobs: int = 0


@dataclasses.dataclass(frozen=True)
class StepSample:
    """One measured step: its shape and its wall time, s."""

    shape: StepShape
    seconds: float


@dataclasses.dataclass(frozen=True)
class CPUJobSample:
    """One measured CPU attention job (one layer of a step's BE rows): KV bytes it read and the
    wall time the caller waited for it, s (submit to result)."""

    kv_bytes: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Accuracy of predictions over samples not used for fitting: per sample
    ``1 - |predicted - measured| / measured``; ``mean`` is its mean and ``p90`` the accuracy that 90% of
    the samples reach or exceed (its 10th percentile)."""

    mean: float
    p90: float
    samples: int


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Coefficients of the step-time model (see the module docstring), all >= 0, seconds per unit.

    Attributes:
        tile: width of the dense staircase's steps, tokens.
        meta: what the model was profiled on (model, dtype, device, versions), free-form.
    """

    tile: int
    c_step: float
    c_dense: float
    c_prefill_attn: float = 0.0
    c_prefill_ctx: float = 0.0
    c_decode_attn: float = 0.0
    c_decode_row: float = 0.0
    c_cpu_bytes: float = 0.0
    c_cpu_job: float = 0.0
    meta: dict = dataclasses.field(default_factory=dict, compare=False)

    def predict(self, shape: StepShape) -> float:
        """Predicted wall time of a step of ``shape``, s (0 for an empty step)."""
        if shape.tokens <= 0 and shape.cpu_jobs <= 0:
            return 0.0
        return float(np.dot(self._coefs(), _features(shape, self.tile)))

    def _coefs(self) -> np.ndarray:
        return np.array([getattr(self, t) for t in _TERMS])

    def accuracy(self, samples: Sequence[StepSample]) -> Accuracy:
        """How well this model predicts ``samples`` (see :class:`Accuracy`).

        Raises:
            ValueError: no samples, or a sample with a non-positive time.
        """
        if not samples:
            raise ValueError("accuracy needs at least one sample")
        if any(s.seconds <= 0 for s in samples):
            raise ValueError("every sample needs a positive measured time")
        acc = np.array([1.0 - abs(self.predict(s.shape) - s.seconds) / s.seconds for s in samples])
        return Accuracy(float(acc.mean()), float(np.percentile(acc, 10)), len(samples))

    # JSON ------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatencyModel:
        """Parses :meth:`to_json`'s output.

        Raises:
            ValueError: not a latency model of this format (the message says what is wrong).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"latency model is not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError(f"latency model format must be {FORMAT_VERSION}, got {data.get('format')!r}"
                             if isinstance(data, dict) else "latency model must be a JSON object")
        data.pop("format")
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - fields):
            raise ValueError(f"latency model has unknown fields {unknown}")
        model = cls(**data)
        if model.tile < 1 or any(not math.isfinite(c) or c < 0 for c in model._coefs()):
            raise ValueError(f"latency model needs tile >= 1 and finite coefficients >= 0, got {model}")
        return model

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """Reads :meth:`save`'s file. Raises ``ValueError`` as :meth:`from_json`, ``OSError`` if unreadable."""
        return cls.from_json(Path(path).read_text())


def _features(shape: StepShape, tile: int) -> np.ndarray:
    return np.array([1.0, math.ceil(shape.tokens / tile), shape.prefill_attn_work, shape.prefill_context,
                     shape.decode_context, shape.decode_rows, shape.cpu_kv_bytes, shape.cpu_jobs], dtype=np.float64)


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: terms that come out negative are dropped (held at
    0) and the rest refitted, until none is negative."""
    active = np.ones(a.shape[1], dtype=bool)
    active &= np.abs(a).sum(axis=0) > 0  # a term no sample exercises stays 0
    while True:
        x = np.zeros(a.shape[1])
        if active.any():
            x[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (x >= 0).all():
            return x
        active &= x > 0


def fit(samples: Sequence[StepSample], tiles: Sequence[int] = TILES, meta: dict | None = None,
        cpu_jobs: Sequence[CPUJobSample] = ()) -> LatencyModel:
    """Fits a :class:`LatencyModel` to measured steps: for each staircase width in ``tiles``, a
    least-squares fit of the coefficients (relative error, each sample weighted by 1/time, all
    coefficients >= 0); the width with the smallest mean relative error wins. With ``cpu_jobs``
    (the worker's jobs timed on their own), the two CPU terms come from those (time = c_cpu_job +
    c_cpu_bytes * bytes) and are held fixed in the step fit.

    Raises:
        ValueError: fewer samples than terms, or a sample with a non-positive time.
    """
    if len(samples) < len(_TERMS):
        raise ValueError(f"fitting needs at least {len(_TERMS)} samples, got {len(samples)}")
    if any(s.seconds <= 0 for s in samples) or any(j.seconds <= 0 for j in cpu_jobs):
        raise ValueError("every sample needs a positive measured time")
    b = np.array([s.seconds for s in samples])
    fixed = np.zeros(len(_TERMS))
    free = np.ones(len(_TERMS), dtype=bool)
    if cpu_jobs:
        tj = np.array([j.seconds for j in cpu_jobs])
        aj = np.stack([np.ones_like(tj), np.array([j.kv_bytes for j in cpu_jobs])], axis=1)
        c_job, c_bytes = _nonnegative_lstsq(aj / tj[:, None], np.ones_like(tj))
        fixed[_TERMS.index("c_cpu_job")], fixed[_TERMS.index("c_cpu_bytes")] = c_job, c_bytes
        free[[_TERMS.index("c_cpu_job"), _TERMS.index("c_cpu_bytes")]] = False
    best = None
    for tile in tiles:
        a = np.stack([_features(s.shape, tile) for s in samples])
        rest = b - a[:, ~free] @ fixed[~free]  # what the free terms must explain
        x = fixed.copy()
        x[free] = _nonnegative_lstsq(a[:, free] / b[:, None], rest / b)  # relative error: rows scaled by 1/t
        err = float(np.mean(np.abs(a @ x - b) / b))
        if best is None or err < best[0] - 1e-12:
            best = (err, tile, x)
    _, tile, x = best
    return LatencyModel(tile, *map(float, x), meta=dict(meta or {}))


def _stratum(shape: StepShape) -> tuple[bool, bool, bool]:
    """What kind of step ``shape`` is: (has decode rows, continues prompts past a cached prefix, has CPU jobs)."""
    return shape.decode_rows > 0, shape.prefill_context > shape.tokens, shape.cpu_jobs > 0


def fit_and_check(samples: Sequence[StepSample], holdout: float = 0.25, seed: int = 0,
                  meta: dict | None = None, cpu_jobs: Sequence[CPUJobSample] = ()) -> tuple[LatencyModel, Accuracy]:
    """Fits (see :func:`fit`) on a random ``1 - holdout`` of ``samples`` and reports the accuracy
    on the rest. The split is stratified by kind of step (prefill, prefill chunk after a cached
    prefix, decode, decode with CPU jobs), and a kind's last sample is never held out: only chunk
    samples tell the prefix's cost from the chunk's own (a fresh prefill reads as many tokens as it
    writes), and a slow machine profiles few of them.

    Raises:
        ValueError: ``holdout`` outside (0, 1), or too few samples to fit and check.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        strata.setdefault(_stratum(s.shape), []).append(i)
    check_idx: list[int] = []
    for members in strata.values():
        n = min(round(holdout * len(members)), len(members) - 1)
        check_idx += [members[i] for i in rng.permutation(len(members))[:n]]
    if not check_idx:
        raise ValueError(f"too few samples to fit and check: {len(samples)}")
    held = set(check_idx)
    check = [samples[i] for i in sorted(held)]
    train = [s for i, s in enumerate(samples) if i not in held]
    model = fit(train, meta=meta, cpu_jobs=cpu_jobs)
    return model, model.accuracy(check)
