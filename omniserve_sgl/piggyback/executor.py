"""The piggybacking executor: runs GPU passes layer by layer over LS rows and carries offloaded BE
rows through the layers as their CPU attention comes back (OmniServe paper section 3.2).

One pass, for layer ``l = 0 .. L-1``::

    LS rows + joined BE rows --pre_attn(l)--> q, k, v   (layer 0: + BE tokens entering)
      BE rows' q/k/v ------------------------> CPU worker, layer-l job; their residual -> store
      LS rows' q/k/v --LS attention----------> attn
    layer boundary: pick up finished jobs (never blocking while the pass has LS rows); up to
      budget(l) BE rows whose layer-l attention is back join:
    LS attn + joined BE attn (from the store) --post_attn(l)--> hidden   (joined rows go on to l+1)
    after the last layer: final norm; the LS rows' hidden states go back to the caller (SGLang's
      logits processor), BE rows go through the LM head and are sampled, their next token enters a later pass

A BE token thus crosses as many passes as its CPU jobs take; a job that is back before the pass
reaches its layer joins the same pass. In ``sync`` mode (the NEO-like baseline) every BE row
enters every pass and the pass waits for the worker at each layer, as the synchronous
``--omniserve-mode sync`` path does.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omniserve_sgl.be_runtime import BERuntime, BEUnavailableError, DecodePlan, PendingJob
from omniserve_sgl.piggyback.model import LayeredModel
from omniserve_sgl.piggyback.state import BERow, Phase
from omniserve_sgl.piggyback.store import ResidualStore
from omniserve_sgl.worker import WorkerError

MODES = ("async", "sync")


@dataclass
class LSBatch:
    """The LS rows of one pass (one token each: a decode row, or one token of a prefill chunk).

    Attributes:
        input_ids: ``[N]`` int64 on the model's device.
        positions: ``[N]`` int64, each token's position in its sequence.
        attend: ``attend(layer, q [N, H_q, D], k [N, H_kv, D], v) -> out [N, H_q, D]``: the LS
            attention (storing k/v in the LS KV cache), e.g. SGLang's backend over the batch.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PassResult:
    """What one pass produced.

    Attributes:
        ls_hidden: ``[N, H]`` of the LS rows after the final norm, for the LM head (``None``
            without LS rows).
        be_tokens: ``(rid, token)`` of each BE row that left the last layer in this pass, sampled.
        failed: ``(rid, message)`` of BE rows whose CPU job failed (they were removed).
        piggybacked_rows: BE rows that joined the pass after a layer's attention, summed over layers.
        waits: times the pass waited for a CPU job (however soon it was back).
        waited_s: seconds the pass spent in those waits.
    """

    ls_hidden: torch.Tensor | None
    be_tokens: list[tuple[object, int]] = field(default_factory=list)
    failed: list[tuple[object, str]] = field(default_factory=list)
    piggybacked_rows: int = 0
    waits: int = 0
    waited_s: float = 0.0


@dataclass
class _Job:
    pending: PendingJob
    rows: list[BERow]
    layer: int


def greedy(logits: torch.Tensor, _rids: list) -> list[int]:
    """The argmax token of each row of ``logits [n, V]``."""
    return logits.argmax(dim=-1).tolist()


class PiggybackExecutor:
    """Drives ``model`` over LS rows and the offloaded BE rows of ``runtime``.

    Args:
        model: the decoder, cut at its attention boundary (:class:`LayeredModel`).
        runtime: the BE KV pool and CPU attention worker; its staging slots bound the jobs in
            flight (a pass adds a row set only while a slot is free, so it never waits for one).
        capacity: most BE requests in the executor at once (rows of the residual store).
        mode: ``"async"`` (piggybacking) or ``"sync"`` (every BE row in every pass, the pass waits
            for the worker at each layer).
        layer_budget: ``layer_budget(l)``, the most BE rows joining a pass at layer ``l`` (the SLO
            controller's ``p_l``); default: no limit beyond a staging slot's rows.
        sample: ``sample(logits [n, V], rids) -> tokens``; default greedy.
        sm_scale: attention softmax scale (default ``1 / sqrt(D)``).

    Attributes:
        piggybacked_rows_total: BE rows that joined a pass after a layer's attention, summed over
            layers (each BE token counts once per layer).
        ls_pass_waits_total: passes with LS rows that waited for the worker (0 in async mode).
        be_tokens_total: BE tokens sampled.
        jobs_total: CPU jobs submitted.
        handoff_s_total: seconds the scheduler's thread spent handing jobs to the worker and
            taking results back (submission, and pick-up of results that were back; not waits).

    Raises:
        ValueError: an unknown mode, or a model whose sizes do not match the runtime's pool.
    """

    def __init__(self, model: LayeredModel, runtime: BERuntime, capacity: int, mode: str = "async",
                 layer_budget: Callable[[int], int] | None = None,
                 sample: Callable[[torch.Tensor, list], list[int]] = greedy, sm_scale: float | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        spec = runtime.pool.spec
        if (model.num_layers, model.num_kv_heads, model.head_dim) != (spec.num_layers, spec.num_kv_heads,
                                                                      spec.head_dim):
            raise ValueError(f"the model has {model.num_layers} layers of {model.num_kv_heads} KV heads of "
                             f"{model.head_dim}, the BE KV pool {spec.num_layers} of {spec.num_kv_heads} of "
                             f"{spec.head_dim}")
        self.model, self.runtime, self.mode = model, runtime, mode
        self.store = ResidualStore(capacity, model.hidden_size, model.num_qo_heads, model.head_dim, model.dtype,
                                   model.device)
        self.budget = layer_budget or (lambda _layer: capacity)
        self.sample = sample
        self.sm_scale = 1.0 / math.sqrt(model.head_dim) if sm_scale is None else sm_scale
        self.rows: dict[object, BERow] = {}
        self.jobs: list[_Job] = []  # in flight, in submission order
        self._clock = itertools.count()  # orders rows by when they reached their phase
        self._since: dict[object, int] = {}
        # Paged-KV metadata of recent row sets, keyed by the rows (held, so no new row takes their
        # id) and their positions: a set that moves on to the next layer together reuses its plan,
        # which the worker then checks and splits once for all layers (job word plan_id).
        self._plans: dict[tuple, tuple[list[BERow], DecodePlan]] = {}
        self._landing = torch.empty(runtime.max_rows, model.num_qo_heads, model.head_dim, dtype=model.dtype,
                                    device=model.device)  # a job's output, before it is scattered to the store
        self.piggybacked_rows_total = 0
        self.ls_pass_waits_total = 0
        self.be_tokens_total = 0
        self.jobs_total = 0
        self.handoff_s_total = 0.0

    # requests -----------------------------------------------------------------------------------
    def add(self, rid: object, token: int, position: int) -> None:
        """Takes over BE request ``rid``, whose next token to decode is ``token`` at ``position``;
        the pool must hold its KV for positions ``0 .. position-1`` (and room for more).

        Raises:
            ValueError: ``rid`` is here already, or the pool holds another number of its tokens.
            RuntimeError: the residual store is full.
        """
        if rid in self.rows:
            raise ValueError(f"BE request {rid!r} is in the executor already")
        stored = self.runtime.stored_tokens(rid)
        if stored != position:
            raise ValueError(f"BE request {rid!r} enters at position {position} but the BE KV pool holds "
                             f"{stored} of its tokens")
        self.rows[rid] = BERow(rid, int(token), int(position), self.store.allocate())
        self._since[rid] = next(self._clock)

    def remove(self, rid: object) -> None:
        """Drops ``rid`` (finished or aborted) and frees its pool pages, at once or, while a job of
        it is in flight (the worker may be writing its pages), when that job is back. Idempotent."""
        row = self.rows.pop(rid, None)
        if row is None:
            return
        self._since.pop(rid, None)
        self.store.free(row.slot)
        if row.phase is Phase.CPU:
            row.removed = True
        else:
            self.runtime.release(rid)

    def detach(self, rid: object) -> bool:
        """Drops ``rid`` keeping its pool pages (for a move of its KV elsewhere), only between two
        tokens: its current token has entered no layer. Returns whether it is out (True for an
        unknown ``rid``)."""
        row = self.rows.get(rid)
        if row is None:
            return True
        if row.phase is not Phase.ENTER:
            return False
        del self.rows[rid]
        self._since.pop(rid, None)
        self.store.free(row.slot)
        return True

    def __len__(self) -> int:
        return len(self.rows)

    def wants_pass(self) -> bool:
        """Whether the next pass has BE work to carry: a token waiting to enter, a row waiting to
        join at its layer, or a CPU job that is back (a worker that failed counts too, so the pass
        handles it). When False, a pass can run without the executor (on a GPU, as SGLang's CUDA
        graph); jobs that come back meanwhile join a later pass."""
        if any(r.phase is not Phase.CPU for r in self.rows.values()):
            return True
        try:
            return any(self.runtime.poll(job.pending) for job in self.jobs)
        except BEUnavailableError:
            return True

    @property
    def residual_store_bytes(self) -> int:
        return self.store.held_bytes

    # the pass -----------------------------------------------------------------------------------
    def run_pass(self, ls: LSBatch | None = None, stop_after_s: float | None = None) -> PassResult:
        """One GPU pass over ``ls`` (may be ``None`` or empty) with the BE rows that can join it.

        Without LS rows, the pass waits for the worker where its own BE rows need it (and, when
        no BE row could move at all, for the oldest job): then BE speed is bounded by the CPU.
        ``stop_after_s`` bounds such a pass: once that many seconds have passed, it ends where its
        rows' next job is on the worker instead of waiting for it (they join a later pass at that
        layer), so the caller can take in new work. Passes with LS rows never wait and ignore it.

        Returns:
            :class:`PassResult`.
        """
        deadline = None if stop_after_s is None else time.perf_counter() + stop_after_s
        m, L = self.model, self.model.num_layers
        n_ls = 0 if ls is None else int(ls.input_ids.shape[0])
        res = PassResult(None)
        self._collect(res)
        if n_ls == 0 and self.jobs and not any(r.phase is not Phase.CPU for r in self.rows.values()):
            self._wait(self.jobs[0], res)
        joined = self._pick(Phase.ENTER, 0, self._room(0, submits=True))
        for r in joined:
            self.runtime.extend(r.rid)
        q = k = v = residual = None
        if n_ls + len(joined):
            ids = self._cat(ls.input_ids if n_ls else None, [r.token for r in joined])
            positions = self._cat(ls.positions if n_ls else None, [r.position for r in joined])
            q, k, v, residual = m.pre_attn(0, positions, m.embed(ids), None)
        for layer in range(L):
            mine = self._submit(joined, layer, q[n_ls:], k[n_ls:], v[n_ls:], residual[n_ls:], res) if joined else None
            attn_ls = ls.attend(layer, q[:n_ls], k[:n_ls], v[:n_ls]) if n_ls else None
            # layer boundary
            if mine is not None and n_ls == 0 and deadline is not None and time.perf_counter() >= deadline:
                break  # BE rows alone, out of time: the rows just submitted join a later pass
            if mine is not None and (self.mode == "sync" or n_ls == 0):
                self._wait(mine, res)
            self._collect(res)
            last = layer == L - 1
            joined = self._pick(Phase.READY, layer, self._room(layer, submits=not last))
            res.piggybacked_rows += len(joined)
            if n_ls + len(joined) == 0:
                continue
            be_attn, be_res = self.store.take([r.slot for r in joined])
            attn = be_attn if not n_ls else torch.cat([attn_ls, be_attn]) if joined else attn_ls
            resid = be_res if not n_ls else torch.cat([residual[:n_ls], be_res]) if joined else residual[:n_ls]
            hidden, resid = m.post_attn(layer, attn, resid)
            if not last:
                positions = self._cat(ls.positions if n_ls else None, [r.position for r in joined])
                q, k, v, residual = m.pre_attn(layer + 1, positions, hidden, resid)
                continue
            hidden = m.final(hidden, resid)
            res.ls_hidden = hidden[:n_ls] if n_ls else None
            if joined:
                tokens = self.sample(m.logits(hidden[n_ls:]), [r.rid for r in joined])
                for r, t in zip(joined, tokens):
                    r.token, r.position = int(t), r.position + 1
                    self._move(r, Phase.ENTER, 0)
                    res.be_tokens.append((r.rid, int(t)))
        self.piggybacked_rows_total += res.piggybacked_rows
        self.be_tokens_total += len(res.be_tokens)
        if n_ls and res.waits:
            self.ls_pass_waits_total += 1
        return res

    # helpers ------------------------------------------------------------------------------------
    def _cat(self, ls_part: torch.Tensor | None, be_part: list[int]) -> torch.Tensor:
        be = torch.tensor(be_part, dtype=torch.int64).to(self.model.device, non_blocking=True)
        return be if ls_part is None else torch.cat([ls_part, be]) if be_part else ls_part

    def _move(self, row: BERow, phase: Phase, layer: int) -> None:
        row.phase, row.layer = phase, layer
        self._since[row.rid] = next(self._clock)

    def _room(self, layer: int, submits: bool) -> int:
        """How many BE rows may join at ``layer``: the budget, a staging slot's rows, and none when
        a job would follow and no staging slot is free."""
        if submits and self.runtime.free_slots < 1:
            return 0
        return max(0, min(self.budget(layer), self.runtime.max_rows))

    def _pick(self, phase: Phase, layer: int, limit: int) -> list[BERow]:
        """Up to ``limit`` rows in ``phase`` at ``layer``, longest waiting first."""
        rows = [r for r in self.rows.values() if r.phase is phase and (phase is Phase.ENTER or r.layer == layer)]
        if len(rows) > limit:
            rows = sorted(rows, key=lambda r: self._since[r.rid])[:limit]
        return rows

    def _submit(self, rows: list[BERow], layer: int, q, k, v, residual, res: PassResult) -> _Job | None:
        """Sends ``rows``' layer-``layer`` attention to the worker and keeps their residual."""
        t0 = time.perf_counter()
        self.store.put([r.slot for r in rows], residual)
        try:
            pending = self.runtime.submit(self._plan(rows), layer, q, k, v, self.sm_scale)
        except BEUnavailableError as e:
            self._fail(rows, str(e), res)
            return None
        self.jobs_total += 1
        self.handoff_s_total += time.perf_counter() - t0
        job = _Job(pending, rows, layer)
        for r in rows:
            r.job = job
            self._move(r, Phase.CPU, layer)
        self.jobs.append(job)
        return job

    def _plan(self, rows: list[BERow]) -> DecodePlan:
        """The paged-KV metadata of ``rows`` at their current tokens (the pool's pages of a token
        do not change between its layers), made once per row set and token."""
        key = tuple((id(r), r.position) for r in rows)
        known = self._plans.get(key)
        if known is not None:
            return known[1]
        if len(self._plans) >= 4 * self.runtime.staging_slots:
            del self._plans[next(iter(self._plans))]
        plan = self.runtime.plan_rows([r.rid for r in rows])
        self._plans[key] = (rows, plan)
        return plan

    def _collect(self, res: PassResult) -> None:
        """Picks up every job that is back (never blocks)."""
        for job in list(self.jobs):
            try:
                back = self.runtime.poll(job.pending)
            except BEUnavailableError as e:
                self._fail_all(str(e), res)
                return
            if back:
                self._wait(job, res, blocking=False)

    def _wait(self, job: _Job, res: PassResult, blocking: bool = True) -> None:
        """Takes ``job``'s result (waiting for it unless it is known to be back) into the residual store."""
        if job not in self.jobs:
            return
        n = len(job.rows)
        t0 = time.perf_counter()
        res.waits += blocking
        try:
            self.runtime.wait(job.pending, self._landing[:n])
        except WorkerError as e:
            self.jobs.remove(job)
            self._fail(job.rows, f"CPU attention failed: {e}", res)
            return
        except BEUnavailableError as e:
            self._fail_all(str(e), res)
            return
        finally:
            if blocking:
                res.waited_s += time.perf_counter() - t0
        self.jobs.remove(job)
        live = [i for i, r in enumerate(job.rows) if not r.removed]
        if len(live) < n:
            for r in job.rows:
                if r.removed:
                    self.runtime.release(r.rid)
        if live:
            idx = self.store.index([job.rows[i].slot for i in live])
            self.store.attn[idx] = self._landing[:n][torch.tensor(live, device=self._landing.device)]
            for i in live:
                job.rows[i].job = None
                self._move(job.rows[i], Phase.READY, job.layer)
        if not blocking:
            self.handoff_s_total += time.perf_counter() - t0

    def _fail(self, rows: list[BERow], why: str, res: PassResult) -> None:
        for r in rows:
            r.job = None
            if not r.removed:
                res.failed.append((r.rid, why))
                r.phase = Phase.ENTER  # no job in flight: its pages go at once
                self.remove(r.rid)
            else:
                self.runtime.release(r.rid)

    def _fail_all(self, why: str, res: PassResult) -> None:
        """The worker is gone for good: every BE row fails, the pass goes on for its LS rows."""
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            self._fail(job.rows, why, res)
        self._fail([r for r in self.rows.values()], why, res)
