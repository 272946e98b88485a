"""The per-step policy (OmniServe paper section 3.3, dynamic batching control): spend the LS
SLOs' slack, and only the slack, on BE work, in the strict order LS decode > LS prefill > BE
prefill > BE decode.

SGLang runs a step as a prefill (EXTEND) batch or as a decode batch. In a plain prefill step the
decode rows wait, so a chunk is bounded by the TPOT slack of the LS decodes it stalls:
``t(prefill chunk) + t(decode step) <= TPOT SLO`` (their next token comes one prefill step late).
With mixed steps (``ServerView.mixed_steps``: SGLang's mixed chunked prefill, the paper's
Sarathi-style co-scheduling) the decode rows run in the prefill step itself, so the bound is
``t(chunk with the decode rows) <= TPOT SLO``: the chunk no longer pays a step's fixed cost of its
own, and BE decode rows may ride the same step in what is left.
"""

from __future__ import annotations

import dataclasses
import math

from omniserve_sgl.control.latency import LatencyModel, StepShape
from omniserve_sgl.control.online import OnlineCorrection
from omniserve_sgl.control.state import CPU, GPU, WAITING, BERequest, LSDecode, ServerView, StepPlan

ADMISSION = ("queue", "reject")
BE_PLACEMENT = ("auto", "cpu")


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Policy settings.

    Attributes:
        ls_admission: ``"queue"`` keeps an LS request that will miss its TTFT SLO queued (as
            SGLang does); ``"reject"`` refuses it at once (the paper's policy, for deployments
            behind a router that retries elsewhere).
        be_placement: ``"auto"`` lets BE requests decode on the GPU while there is slack and GPU
            KV headroom; ``"cpu"`` offloads every BE request after its prefill, for good.
        ls_margin: an LS prefill chunk keeps the stalled decodes' next token within this share of
            their TPOT SLO (TPOT is an average over a request's tokens: filling every gap to the
            SLO would put half the requests over it).
        be_margin: BE work fits within this share of the TPOT SLO (a stricter bound than LS
            prefill's, so prediction error lands on BE, not on LS).
        be_ttft_share: a BE prefill chunk takes at most this share of the TTFT SLO, so an LS
            request arriving during it waits at most that long, with or without LS decodes;
            without LS decodes, a chunk the cap would leave too small to be efficient (see
            ``be_chunk_waste``) grows to the smallest efficient one: BE prefill always progresses
            when no LS request is there to protect.
        ahead_share, ahead_cap: of the time the running LS decodes are ahead of
            ``lead_target`` of their TPOT SLO (:meth:`Controller.lead`), this share, and at most
            ``ahead_cap`` TPOT SLOs, is spent on one gap between two of their tokens.
        lead_target: the average TPOT the lead is counted against, as a share of the TPOT SLO
            (spending a lead counted against the SLO itself would leave the average at the SLO,
            and prediction error on either side of it).
        be_chunk_waste: a BE prefill chunk costs at most this multiple of the time per token of
            prefilling the rest of the prompt in one step (a tiny chunk pays the step's fixed cost,
            and on backends whose chunk cost grows with the prefix, such as SGLang's CPU
            torch_native, the whole prefix again, for a few tokens), or is the server's largest
            chunk (``--chunked-prefill-size``); when no chunk that fits is that efficient, the
            slack goes to BE decode rows instead.
        move_gain: a BE request moves between the GPU KV cache and the BE KV pool for speed only
            when its row costs a decode step at least this share less at the other place
            (hysteresis: no back and forth on prediction noise).
        min_ls_chunk: the smallest LS prefill chunk, tokens: LS prefill always progresses.
        ls_ttft_share: when a waiting LS request's TTFT, predicted at full prefill pace, exceeds this
            share of its TTFT SLO, LS prefill runs at full pace (SGLang's own chunk), whatever the
            decodes' slack: a request past its TTFT SLO misses it whole, while one prefill step
            more adds a fraction of a step to the decodes' average TPOT. Under overload the
            queue is then drained as fast as SGLang alone would drain it.
        gpu_kv_reserve_tokens: GPU KV slots kept free for LS beyond the queued prompts.
    """

    ls_admission: str = "queue"
    be_placement: str = "auto"
    ls_margin: float = 0.9
    be_margin: float = 0.6
    be_ttft_share: float = 0.5
    ahead_share: float = 0.5
    ahead_cap: float = 4.0
    lead_target: float = 0.8
    be_chunk_waste: float = 2.0
    move_gain: float = 0.05
    min_ls_chunk: int = 32
    ls_ttft_share: float = 0.75
    gpu_kv_reserve_tokens: int = 0

    def __post_init__(self):
        if self.ls_admission not in ADMISSION:
            raise ValueError(f"ls_admission must be one of {ADMISSION}, got {self.ls_admission!r}")
        if self.be_placement not in BE_PLACEMENT:
            raise ValueError(f"be_placement must be one of {BE_PLACEMENT}, got {self.be_placement!r}")
        for name in ("ls_margin", "be_margin", "be_ttft_share", "ahead_share", "ls_ttft_share", "lead_target"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.be_chunk_waste >= 1.0:
            raise ValueError(f"be_chunk_waste must be >= 1, got {self.be_chunk_waste}")
        if not 0.0 <= self.move_gain < 1.0:
            raise ValueError(f"move_gain must be in [0, 1), got {self.move_gain}")
        if not self.ahead_cap >= 0:
            raise ValueError(f"ahead_cap must be >= 0, got {self.ahead_cap}")
        if self.min_ls_chunk < 1:
            raise ValueError(f"min_ls_chunk must be >= 1, got {self.min_ls_chunk}")


def _lead(d: LSDecode, default_tpot: float, lead_target: float, t_decode: float) -> float:
    """:meth:`Controller.lead` of ``d`` (a function: it runs for every LS decode of every step)."""
    tpot = d.tpot_slo_s or default_tpot
    done, left = d.tokens_done, d.tokens_left
    elapsed = tpot * done - d.ahead_s
    return lead_target * tpot * (done + left) - elapsed - left * t_decode


def largest_fitting(lo: int, hi: int, fits) -> int:
    """The largest ``n`` in ``[lo, hi]`` with ``fits(n)``, for ``fits`` true up to some point and
    false after it (binary search); ``lo - 1`` when even ``lo`` does not fit."""
    if hi < lo or not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


class Controller:
    """Decides every step from a :class:`ServerView` with a :class:`LatencyModel`; holds no state
    between steps (the view carries it), so the server and a simulator replay the same decisions."""

    def __init__(self, model: LatencyModel | OnlineCorrection, config: ControllerConfig | None = None):
        self.model = model
        self.config = config or ControllerConfig()
        self._ls: tuple = (None, None, 0, None)  # see _ls_summary

    # step shapes ---------------------------------------------------------------------------
    def _decode_shape(self, view: ServerView, be_rows: list[BERequest]) -> StepShape:
        return self._shape(view, _BESum.of(be_rows))

    def _shape(self, view: ServerView, be: _BESum) -> StepShape:
        """The decode step of every LS row and the BE rows summed in ``be`` (a CPU row's attention
        costs the step nothing under ``cpu_overlap``)."""
        rows = len(view.ls_decodes) + be.rows
        cpu = 0 if view.cpu_overlap else be.cpu_rows
        return StepShape(tokens=rows, decode_context=self._ls_summary(view)[2] + be.gpu_ctx, decode_rows=rows,
                         cpu_kv_bytes=(be.cpu_ctx if cpu else 0) * view.kv_bytes_per_token,
                         cpu_jobs=view.num_layers if cpu else 0)

    def _prefill_time(self, chunk: int, prefix: int) -> float:
        return self.model.predict(StepShape(tokens=chunk, prefill_attn_work=chunk * (prefix + chunk),
                                            prefill_context=prefix + chunk))

    def _mixed_time(self, view: ServerView, chunk: int, prefix: int, be: _BESum) -> float:
        """A prefill chunk of ``chunk`` tokens after ``prefix`` in one step with every LS decode and
        the BE rows summed in ``be``, s."""
        d = self._shape(view, be)
        return self.model.predict(dataclasses.replace(d, tokens=d.tokens + chunk, prefill_attn_work=chunk * (
            prefix + chunk), prefill_context=prefix + chunk if chunk else 0))

    def _ls_summary(self, view: ServerView) -> tuple:
        """``(ls_decodes, slo, summed context, tightest TPOT SLO or None)`` of ``view``, computed once
        per view: a plan reads them many times, and a simulated step can hold hundreds of LS decodes."""
        if self._ls[0] is not view.ls_decodes or self._ls[1] is not view.slo:
            default = view.slo.tpot_s
            ctx, tightest = 0, None
            for d in view.ls_decodes:
                ctx += d.context_len
                tpot = d.tpot_slo_s or default
                if tightest is None or tpot < tightest:
                    tightest = tpot
            self._ls = (view.ls_decodes, view.slo, ctx, tightest)
        return self._ls

    def tpot_budget(self, view: ServerView) -> float | None:
        """The tightest TPOT SLO of the running LS decodes, s (None: no LS decode to protect)."""
        return self._ls_summary(view)[3]

    def lead(self, d: LSDecode, view: ServerView, t_decode: float) -> float:
        """How far ``d`` is ahead of a ``lead_target`` share of its TPOT SLO, s, over the tokens it
        has produced and those it will produce for certain or most likely (``tokens_left``), were
        the latter to come one LS decode step apart (``t_decode``, the step's predicted time, s):
        ``target * (done + left) - elapsed - left * t_decode``. A gap it takes now is counted
        once, in ``elapsed``: projecting its pace so far onto the tokens to come would charge a
        lent gap again for each of them (and a young request that lent one gap would hold every
        BE chunk back for the rest of its life). The LS prefill steps between its future tokens
        are what ``lead_target``'s margin is for."""
        return _lead(d, view.slo.tpot_s, self.config.lead_target, t_decode)

    def spendable(self, view: ServerView, t_decode: float) -> float | None:
        """What the LS decodes can lend this step, s: the least, over them, of ``ahead_share`` of
        their :meth:`lead` (none when behind) capped at ``ahead_cap`` TPOT SLOs (None without LS
        decodes)."""
        if not view.ls_decodes:
            return None
        cfg, default = self.config, view.slo.tpot_s
        share, cap, target = cfg.ahead_share, cfg.ahead_cap, cfg.lead_target
        least = math.inf
        for d in view.ls_decodes:  # a plain loop: it runs for every LS decode of every step
            lent = share * _lead(d, default, target, t_decode)
            lent = min(max(lent, 0.0), cap * (d.tpot_slo_s or default))
            least = min(least, lent)
        return least

    # LS admission --------------------------------------------------------------------------
    def predicted_ttfts(self, view: ServerView) -> list[float]:
        """Predicted TTFT of each waiting LS request, in queue order, s: its wait so far plus the
        prefill steps of the queue up to and including it, at the largest chunk, each followed by
        (or, with mixed steps, running with) a decode step of the running LS rows."""
        t_decode = self.model.predict(self._decode_shape(view, [])) if view.ls_decodes else 0.0
        ahead, out = 0.0, []
        for w in view.ls_waiting:
            left, prefix = w.remaining, w.prefilled
            while left > 0:
                chunk = min(left, view.max_prefill_tokens)
                ahead += (self._mixed_time(view, chunk, prefix, _BESum()) if view.mixed_steps
                          else self._prefill_time(chunk, prefix) + t_decode)
                left, prefix = left - chunk, prefix + chunk
            out.append(view.now_s - w.arrival_s + ahead)
        return out

    # the plan ------------------------------------------------------------------------------
    def plan(self, view: ServerView) -> StepPlan:
        """The decision for this step (see the module docstring for the order and the bounds).

        A prefill chunk fits when ``since_decode_s - ahead + t(chunk) + t(LS decode step)`` (with
        mixed steps: ``since_decode_s - ahead + t(chunk with the LS decodes)``) stays within
        ``ls_margin`` (LS) or ``be_margin`` (BE) of the TPOT SLO; a BE chunk also within
        ``be_ttft_share`` of the TTFT SLO, and BE decode rows ride a mixed BE chunk within what is
        left of ``be_margin``. When no LS chunk of at least
        ``min_ls_chunk`` fits and the last step was not a decode, the LS decodes go first; right
        after a decode step the minimum chunk runs anyway, so LS prefill never stalls. When a
        waiting LS request's TTFT is at risk (``ls_ttft_share``), the largest chunk runs.
        """
        cfg = self.config
        tpot = self.tpot_budget(view)
        t_ls_decode = self.model.predict(self._decode_shape(view, [])) if view.ls_decodes else 0.0
        # How late the LS decodes' next token is against their schedule: the wait since their last
        # token, less what the least-ahead of them can spend (0 when none is ahead).
        spendable = self.spendable(view, t_ls_decode)
        since = view.since_decode_s - spendable if spendable is not None else 0.0
        rejected = []
        waiting = list(view.ls_waiting)
        ttfts = self.predicted_ttfts(view) if waiting else []
        if cfg.ls_admission == "reject" and waiting:
            kept = []
            for w, ttft in zip(waiting, ttfts, strict=True):
                slo = w.ttft_slo_s or view.slo.ttft_s
                # The head of the queue decides (later ones re-evaluate next step); a prompt whose
                # prefill has begun is not thrown away.
                if ttft > slo and not kept and w.prefilled == 0:
                    rejected.append((w.rid, f"predicted TTFT {ttft:.3g} s exceeds the TTFT SLO {slo:.3g} s"))
                else:
                    kept.append(w)
            waiting = kept
        to_cpu, to_gpu = self._placement(view)
        common = {"ls_rejected": tuple(rejected), "to_cpu": to_cpu, "to_gpu": to_gpu}

        mixed = view.mixed_steps

        def step_time(chunk: int, prefix: int, be: _BESum = _BESum()) -> float:
            """The prefill step, s; without mixed steps plus the LS decode step it delays."""
            if mixed:
                return self._mixed_time(view, chunk, prefix, be)
            return self._prefill_time(chunk, prefix) + t_ls_decode

        def fits(chunk: int, prefix: int, budget: float) -> bool:
            return since + step_time(chunk, prefix) <= budget

        why = ""
        if waiting:  # LS prefill, bounded by the slack of the decodes it stalls
            queued = sum(w.remaining for w in waiting)
            hi = min(queued, view.max_prefill_tokens)
            prefix = waiting[0].prefilled
            at_risk = [w.rid for w, ttft in zip(view.ls_waiting, ttfts, strict=True)
                       if ttft > cfg.ls_ttft_share * (w.ttft_slo_s or view.slo.ttft_s)]
            if tpot is None or at_risk:
                chunk = hi
            else:
                chunk = largest_fitting(1, hi, lambda c: fits(c, prefix, cfg.ls_margin * tpot))
            if chunk < min(cfg.min_ls_chunk, hi) and view.decoded_last_step:
                chunk = min(cfg.min_ls_chunk, hi)
            if chunk >= min(cfg.min_ls_chunk, hi):
                risk = f" (TTFT at risk: {', '.join(at_risk[:3])})" if at_risk else ""
                t = step_time(chunk, prefix) if mixed else self._prefill_time(chunk, prefix)
                return StepPlan(ls_prefill_tokens=chunk, mixed=mixed, predicted_s=t,
                                why=f"LS prefill {chunk} of {queued} queued tokens{risk}", **common)
            why = f"LS decodes first ({1e3 * since:.0f} ms late for their schedule), then LS prefill; "
        be_budget = None if tpot is None else cfg.be_margin * tpot
        be_waiting = [r for r in view.be if r.placement == WAITING and r.prompt_len > r.prefilled]
        # A BE prompt needs GPU KV beside what the LS decodes' next tokens need (_kv_to_start).
        be_room = view.gpu_kv_free_tokens - len(view.ls_decodes) - cfg.gpu_kv_reserve_tokens
        if be_waiting and not waiting and be_room < _kv_to_start(be_waiting[0]):
            why += f"BE prefill of {be_waiting[0].rid} waits for GPU KV; "
        elif be_waiting and not waiting:
            r = be_waiting[0]
            hi = min(r.prompt_len - r.prefilled, view.max_prefill_tokens, be_room)
            ttft_cap = cfg.be_ttft_share * view.slo.ttft_s

            def alone(c: int) -> float:  # what an LS request arriving now waits for
                return step_time(c, r.prefilled) if mixed else self._prefill_time(c, r.prefilled)

            def be_fits(c: int) -> bool:
                return alone(c) <= ttft_cap and (be_budget is None or fits(c, r.prefilled, be_budget))

            chunk = largest_fitting(1, hi, be_fits)
            # A chunk riding the LS decodes' step costs only what it adds to that step.
            ride = mixed and bool(view.ls_decodes)

            def cost(c: int) -> float:
                return step_time(c, r.prefilled) - t_ls_decode if ride else self._prefill_time(c, r.prefilled)

            # The server's own chunk limit is as efficient as a chunk can be: no chunk beyond it
            # is asked for (with a small --chunked-prefill-size none might pass the waste bound).
            top = min(r.prompt_len - r.prefilled, view.max_prefill_tokens)
            smallest = min(self._smallest_efficient_be_chunk(r.prompt_len - r.prefilled, hi, cost), top)
            if be_budget is None:  # nothing to protect but an LS arrival: the cap never starves BE
                chunk = max(chunk, min(smallest, hi))
            if chunk >= smallest:
                # A request moving back to the GPU takes its slots before this chunk is allocated
                # (moves run first): it waits when both do not fit (BE prefill > BE decode).
                back = sum(b.context_len + 1 for b in view.be if b.rid in to_gpu)
                if back and chunk + back > be_room:
                    common["to_gpu"] = ()
                if not mixed:
                    return StepPlan(be_prefill=(r.rid, chunk), predicted_s=self._prefill_time(chunk, r.prefilled),
                                    why=f"BE prefill {chunk} tokens of {r.rid}", **common)
                # BE decode rows ride the chunk's step in what is left (BE prefill > BE decode).
                rows = self._be_rows(view, common["to_cpu"], common["to_gpu"])
                limit = min(ttft_cap, math.inf if be_budget is None else be_budget - since)
                n, first = self._rows_within(rows, lambda be: step_time(chunk, r.prefilled, be), limit)
                return StepPlan(be_prefill=(r.rid, chunk), mixed=True, be_decode=tuple(x.rid for x in rows[:n]),
                                be_budget_per_layer=(n,) * view.num_layers,
                                predicted_s=step_time(chunk, r.prefilled, first[n]),
                                why=f"BE prefill {chunk} tokens of {r.rid} with {len(view.ls_decodes)} LS + "
                                    f"{n} of {len(rows)} BE decode rows", **common)
            why += f"BE prefill of {r.rid} waits (fits {max(chunk, 0)} tokens, efficient from {smallest}); "
        # Decode step: every LS row, then BE rows, longest-deferred first, while the step fits; none
        # while LS prompts wait (their prefill comes first, and BE rows would shrink its chunk).
        rows = self._be_rows(view, common["to_cpu"], common["to_gpu"])
        if waiting:
            n = 0
        elif be_budget is None:
            n = len(rows)
        else:  # what BE rows add to the step fits the slack left (rows that add nothing always fit)
            slack = max(be_budget - since - t_ls_decode, 0.0)
            n, _ = self._rows_within(rows, lambda be: self.model.predict(self._shape(view, be)) - t_ls_decode, slack)
        chosen = rows[:n]
        return StepPlan(be_decode=tuple(r.rid for r in chosen), be_budget_per_layer=(n,) * view.num_layers,
                        predicted_s=self.model.predict(self._decode_shape(view, chosen)),
                        why=f"{why}decode {len(view.ls_decodes)} LS + {n} of {len(rows)} BE rows", **common)

    def _smallest_efficient_be_chunk(self, remaining: int, hi: int, cost) -> int:
        """The smallest BE chunk whose time per token (``cost(chunk)``, s) is within
        ``be_chunk_waste`` of the time per token of prefilling all ``remaining`` tokens in one step
        (time per token falls with the chunk: the fixed and prefix terms are shared by its tokens)."""
        bound = self.config.be_chunk_waste * cost(remaining) / remaining
        # largest_fitting over the mirrored range finds the boundary of a predicate true from it up.
        n = largest_fitting(-hi, -1, lambda m: cost(-m) / -m <= bound)
        return hi + 1 if n < -hi else -n

    @staticmethod
    def _be_rows(view: ServerView, to_cpu, to_gpu) -> list[BERequest]:
        """The BE decode rows of ``view`` at their places after this step's moves, longest-deferred
        first (so none starves)."""
        moved = {**{rid: CPU for rid in to_cpu}, **{rid: GPU for rid in to_gpu}}
        return sorted((dataclasses.replace(r, placement=moved.get(r.rid, r.placement)) for r in view.be
                       if r.placement != WAITING), key=lambda r: (r.last_run_step, r.rid))

    @staticmethod
    def _rows_within(rows: list[BERequest], cost, limit: float) -> tuple[int, list[_BESum]]:
        """How many of ``rows``, first first, keep ``cost(_BESum of them)`` (s) within ``limit``
        (0 when even one does not), and the sums of the first k rows, k = 0..len(rows)."""
        first = [_BESum()]
        for r in rows:
            first.append(first[-1].plus(r))
        return max(largest_fitting(1, len(rows), lambda k: cost(first[k]) <= limit), 0), first

    def _placement(self, view: ServerView) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """BE KV moves for this step (paper 3.3): GPU-resident BE requests go to the BE KV pool,
        largest first, while the GPU KV the LS requests need (queued prompts, a token per decode,
        the reserve) is not free. Otherwise (``auto`` placement, no LS prompt waiting) the largest
        GPU-resident one goes to the pool when the next BE prompt waits for GPU KV, else one request
        moves for speed: the largest GPU-resident one to the pool when its row costs a decode step
        less there, else the longest-deferred CPU-resident one back to fresh GPU slots when its KV
        fits beside the LS need, its row costs less on the GPU, and the GPU's BE rows with it still
        fit the BE budget."""
        headroom = view.gpu_kv_free_tokens - view.ls_kv_need - self.config.gpu_kv_reserve_tokens
        to_cpu = []
        for r in sorted((r for r in view.be if r.placement == GPU), key=lambda r: (-r.context_len, r.rid)):
            if headroom >= 0:
                break
            if r.context_len <= view.be_pool_free_tokens:
                to_cpu.append(r.rid)
                headroom += r.context_len
        if to_cpu or self.config.be_placement == "cpu" or view.ls_waiting:
            return tuple(to_cpu), ()
        # The next BE prompt waiting for GPU KV (the rest of it, before its next chunk) counts as
        # pressure too: in the pool a request still decodes; a prompt is prefilled on the GPU only.
        queued = next((r for r in view.be if r.placement == WAITING and r.prompt_len > r.prefilled), None)
        gpu = [r for r in view.be if r.placement == GPU]
        if queued is not None and not queued.in_prefill and headroom < _kv_to_start(queued) and gpu:
            return _largest_to_pool(gpu, view)
        if view.cpu_overlap:
            return self._placement_overlap(view, headroom)
        # For speed: one move per step, to wherever the request's row adds less to a decode step of
        # every BE row, by ``move_gain`` (on a GPU its own KV cache; on SGLang's CPU device, whose
        # decode attention is slower than the worker's kernel, the BE KV pool).
        tpot = self.tpot_budget(view)
        rows = [r for r in view.be if r.placement in (GPU, CPU)]

        total = _BESum.of(rows)

        def cost(r: BERequest, placement: str) -> float:
            """What the row of ``r`` at ``placement`` adds to the step of every BE row, s."""
            others = total.plus(r, sign=-1)
            return (self.model.predict(self._shape(view, others.plus(dataclasses.replace(r, placement=placement))))
                    - self.model.predict(self._shape(view, others)))

        keep = 1.0 - self.config.move_gain
        for r in sorted((r for r in rows if r.placement == GPU), key=lambda r: (-r.context_len, r.rid)):
            if r.context_len <= view.be_pool_free_tokens and cost(r, CPU) < keep * cost(r, GPU):
                return (r.rid,), ()
        for r in sorted((r for r in rows if r.placement == CPU), key=lambda r: (r.last_run_step, r.rid)):
            if r.context_len + 1 > headroom:
                continue
            back = _BESum.of(x for x in rows if x.placement == GPU).plus(dataclasses.replace(r, placement=GPU))
            fits = tpot is None or self.model.predict(self._shape(view, back)) <= self.config.be_margin * tpot
            if fits and cost(r, GPU) < keep * cost(r, CPU):
                return (), (r.rid,)
            break
        return (), ()

    def _placement_overlap(self, view: ServerView, headroom: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Placement for speed under asynchronous piggybacking (``cpu_overlap``): a row on the CPU
        costs the pass only its dense work but moves on only as far as its CPU jobs are back in
        time, so it yields a token at most every pass and often fewer, where a row on the GPU yields
        one per decode pass. So BE requests stay on the
        GPU while the GPU's BE rows fit the BE budget (paper 3.3: on the GPU while there is slack),
        the largest moves to the pool when they no longer fit, and the longest-deferred CPU one
        comes back when it fits beside them; one move per step."""
        tpot = self.tpot_budget(view)
        budget = None if tpot is None else self.config.be_margin * tpot
        gpu = [r for r in view.be if r.placement == GPU]

        def fits(rows: list[BERequest]) -> bool:
            return budget is None or self.model.predict(self._decode_shape(view, rows)) <= budget

        if gpu and not fits(gpu):
            return _largest_to_pool(gpu, view)
        cpu = sorted((r for r in view.be if r.placement == CPU), key=lambda r: (r.last_run_step, r.rid))
        if cpu and cpu[0].context_len + 1 <= headroom and fits([*gpu, dataclasses.replace(cpu[0], placement=GPU)]):
            return (), (cpu[0].rid,)
        return (), ()


def _kv_to_start(r: BERequest) -> int:
    """GPU KV slots the waiting BE request ``r`` needs free before its next chunk: the rest of its
    prompt unless the server is prefilling it chunk by chunk (SGLang's ``PrefillAdder`` admits a
    request whole, then sizes each chunk of its chunked request to the free KV)."""
    return 1 if r.in_prefill else r.prompt_len - r.prefilled


def _largest_to_pool(gpu: list[BERequest], view: ServerView) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The move of the largest of the GPU-resident BE requests ``gpu`` to the BE KV pool, or no
    move when the pool cannot take it."""
    r = max(gpu, key=lambda r: (r.context_len, r.rid))
    return ((r.rid,), ()) if r.context_len <= view.be_pool_free_tokens else ((), ())


@dataclasses.dataclass(frozen=True)
class _BESum:
    """Sums over a set of BE decode rows, all a decode step's shape needs of them (so the step of
    the first k rows, or of all rows but one, costs O(1) to shape)."""

    rows: int = 0
    gpu_ctx: int = 0
    cpu_ctx: int = 0
    cpu_rows: int = 0

    @classmethod
    def of(cls, rows) -> _BESum:
        out = cls()
        for r in rows:
            out = out.plus(r)
        return out

    def plus(self, r: BERequest, sign: int = 1) -> _BESum:
        """These rows and ``r`` (``sign=-1``: without ``r``)."""
        on_gpu = r.placement == GPU
        return _BESum(self.rows + sign, self.gpu_ctx + sign * r.context_len * on_gpu,
                      self.cpu_ctx + sign * r.context_len * (not on_gpu), self.cpu_rows + sign * (not on_gpu))
