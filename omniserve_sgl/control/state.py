"""The controller's view of a serving instance at one scheduler step, and its decision: plain
frozen dataclasses, no SGLang types, so the server's glue and a simulator fill them the same way."""

from __future__ import annotations

import dataclasses
import math

WAITING, GPU, CPU = "waiting", "gpu", "cpu"  # where a BE request is: not prefilled yet, KV on GPU, KV in the BE pool
PLACEMENTS = (WAITING, GPU, CPU)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SLO:
    """Service-level objectives of LS requests, s: time to first token and time per output token.

    Raises:
        ValueError: a value that is not a positive finite number.
    """

    ttft_s: float
    tpot_s: float

    def __post_init__(self):
        _positive("ttft_s", self.ttft_s)
        _positive("tpot_s", self.tpot_s)


@dataclasses.dataclass(frozen=True)
class LSDecode:
    """A running LS request: ``context_len`` tokens with KV; its own TPOT SLO, s, if it set one;
    ``ahead_s``: how far ahead of its TPOT SLO it is, s (TPOT SLO x tokens since its first token,
    less the time they took: TPOT is an average, so time a request is ahead may be spent);
    ``tokens_left``: output tokens it will still produce for certain (``ignore_eos`` and no stop
    condition, or ``min_new_tokens``) or most likely (:class:`~omniserve_sgl.control.OutputLengths`,
    from the LS requests that finished before it), 0 when nothing says it will go on;
    ``tokens_done``: tokens since its first (the gaps ``ahead_s`` counts)."""

    rid: str
    context_len: int
    tpot_slo_s: float | None = None
    ahead_s: float = 0.0
    tokens_left: int = 0
    tokens_done: int = 0


@dataclasses.dataclass(frozen=True)
class LSWaiting:
    """A queued LS request: ``prompt_len`` tokens of which ``prefilled`` have KV (cached prefix or
    earlier chunks); it arrived at ``arrival_s`` (the view's clock); its own TTFT SLO, s, if any."""

    rid: str
    prompt_len: int
    arrival_s: float
    prefilled: int = 0
    ttft_slo_s: float | None = None

    @property
    def remaining(self) -> int:
        return max(self.prompt_len - self.prefilled, 0)


@dataclasses.dataclass(frozen=True)
class BERequest:
    """A BE request: ``placement`` is one of ``PLACEMENTS``; ``context_len`` tokens with KV (for a
    waiting one, ``prefilled`` of its ``prompt_len``); ``last_run_step`` is the step it last decoded
    in (-1: never), so the longest-deferred rows go first and none starves. A waiting one is
    ``in_prefill`` while the server prefills it chunk by chunk (its next chunk needs GPU KV only for
    itself); one that has not started, or yielded to an LS prompt and resumes from the ``prefilled``
    tokens the server kept, needs GPU KV for all the rest of its prompt before its next chunk (as
    SGLang's ``PrefillAdder`` admits a request)."""

    rid: str
    placement: str
    context_len: int = 0
    prompt_len: int = 0
    prefilled: int = 0
    last_run_step: int = -1
    in_prefill: bool = False

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"BE placement must be one of {PLACEMENTS}, got {self.placement!r}")


@dataclasses.dataclass(frozen=True)
class ServerView:
    """Everything the controller reads at one scheduler step.

    Attributes:
        now_s: the clock of ``LSWaiting.arrival_s``, s.
        step: a counter that grows by one per scheduler step.
        gpu_kv_free_tokens: free token slots in the GPU KV cache (SGLang's allocator).
        gpu_kv_reserved_tokens: of those, what SGLang keeps for the running requests' future tokens
            when it admits a new prompt (``PrefillAdder``: per running request, its remaining
            ``max_new_tokens``, clipped, times the new-token ratio, or all of it for an
            ``ignore_eos`` request), tokens.
        be_pool_free_tokens: free tokens in the BE KV pool (host memory).
        kv_bytes_per_token: K and V bytes of one token over all layers (what the CPU worker reads).
        num_layers: decoder layers (one CPU job per layer per step with BE rows on the CPU).
        max_prefill_tokens: the largest prefill chunk, tokens (SGLang's ``--chunked-prefill-size``).
        since_decode_s: how long the running LS decodes have waited since their last token, s
            (the oldest wait among them).
        decoded_last_step: the previous step was a decode step without a prefill chunk (then an
            LS prefill may take at least the minimum chunk, so LS prefill always progresses; a
            forced chunk in every mixed step would leave the decodes no step without one).
        cpu_overlap: the CPU worker's attention overlaps the GPU pass (asynchronous piggybacking:
            a BE row on the CPU costs the pass only its dense work); False when the GPU waits for
            the worker in each layer (the synchronous path).
        mixed_steps: a prefill chunk runs in one step with the decode rows (SGLang's mixed chunked
            prefill; the paper's Sarathi-style co-scheduling, section 3.3): the LS decodes get
            their next token in the prefill step itself instead of waiting for the decode step
            after it.
    """

    now_s: float
    step: int
    slo: SLO
    ls_decodes: tuple[LSDecode, ...] = ()
    ls_waiting: tuple[LSWaiting, ...] = ()
    be: tuple[BERequest, ...] = ()
    gpu_kv_free_tokens: int = 0
    gpu_kv_reserved_tokens: int = 0
    be_pool_free_tokens: int = 0
    kv_bytes_per_token: int = 0
    num_layers: int = 1
    max_prefill_tokens: int = 8192
    since_decode_s: float = 0.0
    decoded_last_step: bool = True
    cpu_overlap: bool = False
    mixed_steps: bool = False

    @property
    def ls_kv_need(self) -> int:
        """GPU KV slots the LS requests need free next, tokens: one per running decode and, while
        LS prompts are queued, their rest beside what SGLang reserves for the running requests
        (it admits a prompt only into the slots left after that reserve)."""
        queued = sum(w.remaining for w in self.ls_waiting)
        return len(self.ls_decodes) + (queued + self.gpu_kv_reserved_tokens if queued else 0)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The controller's decision for one step (SGLang runs a prefill step or a decode step): a
    prefill step when ``ls_prefill_tokens`` or ``be_prefill`` is set, else a decode step.

    Attributes:
        ls_prefill_tokens: LS prompt tokens to prefill in this step, in queue order (0: none).
        ls_rejected: (rid, why) of LS requests refused because their TTFT SLO cannot be met
            (``reject`` admission only).
        be_prefill: (rid, tokens) of the BE request whose prompt is prefilled in this step, if any.
        be_decode: BE requests that decode in this step (the others keep their state).
        mixed: a prefill step that also decodes: every running LS decode and the ``be_decode`` rows
            run in it (only with ``ServerView.mixed_steps``).
        be_budget_per_layer: BE rows allowed at each layer (all equal until piggybacking fills
            them layer by layer).
        to_cpu / to_gpu: BE requests whose KV moves to the BE KV pool / back to GPU slots.
        predicted_s: predicted wall time of this step, s.
        why: one line for the debug log.
    """

    @property
    def is_prefill(self) -> bool:
        return self.ls_prefill_tokens > 0 or self.be_prefill is not None

    ls_prefill_tokens: int = 0
    ls_rejected: tuple[tuple[str, str], ...] = ()
    be_prefill: tuple[str, int] | None = None
    be_decode: tuple[str, ...] = ()
    mixed: bool = False
    be_budget_per_layer: tuple[int, ...] = ()
    to_cpu: tuple[str, ...] = ()
    to_gpu: tuple[str, ...] = ()
    predicted_s: float = 0.0
    why: str = ""
