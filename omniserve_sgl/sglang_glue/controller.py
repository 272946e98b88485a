"""The SLO controller in SGLang's scheduler: every step, SGLang's state is translated into a
:class:`omniserve_sgl.control.ServerView`, the pure :class:`~omniserve_sgl.control.Controller`
plans the step, and the hooks here apply the plan:

- ``Scheduler._should_defer_prefill`` (AROUND): plans the step; LS requests the plan rejects
  (``--omniserve-ls-admission reject``) are answered with HTTP 503 at once; a BE prompt being
  prefilled in chunks yields to a waiting LS prompt; BE KV moves; a decode step is forced when the
  plan says the LS decodes come first.
- ``Scheduler._get_new_batch_prefill_raw`` (``scheduler.admit_prefill``): the plan's chunk size;
  BE requests sit out unless the plan prefills one; a mixed step (the prefill chunk and the decode
  rows in one step, SGLang's mixed chunked prefill) with the BE rows the plan keeps.
- ``Scheduler.update_running_batch`` (AROUND): BE rows beyond the plan's budget sit out this decode
  step (filtered out of the batch with their KV and state untouched) ...
- ``Scheduler.process_batch_result`` (AFTER): ... and are merged back, as a decode-ready batch,
  once the step's results are processed (so aborts, admission and SGLang's idle checks see them).

Without a latency model (``--omniserve-disable-control``, or profiling failed) nothing is planned
and every hook passes through.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from http import HTTPStatus

import torch
from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

from omniserve_sgl import config
from omniserve_sgl.control import (
    CPU,
    GPU,
    SLO,
    WAITING,
    BERequest,
    Controller,
    ControllerConfig,
    LSDecode,
    LSWaiting,
    OnlineCorrection,
    OutputLengths,
    ServerView,
    StepPlan,
)
from omniserve_sgl.service_class import slos_of_custom_params
from omniserve_sgl.sglang_glue import mode, piggyback, placement
from omniserve_sgl.sglang_glue.placement import is_be, is_offloaded

logger = logging.getLogger(__name__)

_controller: Controller | None = None
_slo: SLO | None = None
_plan: StepPlan | None = None  # this step's, from _should_defer_prefill on
_view: ServerView | None = None  # what it was planned from
_step = 0
_decoded_last_step = True
_deferred: list = []  # BE Reqs sitting out the decode step in flight
_yielded: list = []  # queued BE Reqs that yielded to an LS prompt, their prefilled chunks pinned
_test_step = 0
_without_be_work = 0  # consecutive plans that gave BE nothing to do
_lengths = OutputLengths()  # of the LS requests that finished in this process, LS mode included
_metrics = None


def start(model: OnlineCorrection | None, metrics=None) -> None:
    """Builds this process's controller over ``model`` (no controller without one, or with
    ``--omniserve-disable-control``)."""
    global _controller, _slo, _metrics
    cfg = config.current()
    _metrics = metrics
    if model is None or not cfg.control:
        return
    _slo = SLO(cfg.ttft_slo, cfg.tpot_slo)
    _controller = Controller(model, ControllerConfig(ls_admission=cfg.ls_admission, be_placement=cfg.be_placement))
    logger.info("omniserve: SLO controller on (TTFT SLO %.2f s, TPOT SLO %.3f s, LS admission %s, BE placement %s)",
                cfg.ttft_slo, cfg.tpot_slo, cfg.ls_admission, cfg.be_placement)


def deferred() -> list:
    """The BE Reqs sitting out the decode step in flight (outside SGLang's batches until merged back)."""
    return _deferred


# Tests only (like SGLang's SGLANG_TEST_RETRACT): every N-th step, every running BE request moves
# (GPU -> CPU, CPU -> GPU), with or without the controller, so greedy exactness across moves is
# checked on a fixed schedule.
_TEST_MOVE_EVERY = int(os.environ.get("OMNISERVE_TEST_MOVE_EVERY", "0") or 0)


def can_park() -> bool:
    """Whether BE requests that only wait may be parked in LS mode (:mod:`omniserve_sgl.sglang_glue.mode`):
    only a controller can say when they have slack."""
    return _controller is not None


def steps_without_be_work() -> int:
    """How many plans in a row gave BE nothing to prefill or decode."""
    return _without_be_work


def _set_chunk_limit(scheduler) -> None:
    if not hasattr(scheduler, "omniserve_chunk_limit"):  # --chunked-prefill-size, once (we change it per step)
        scheduler.omniserve_chunk_limit = scheduler.chunked_prefill_size or scheduler.max_prefill_tokens


def be_prefill_slack(scheduler, parked) -> bool:
    """Whether the controller would start a BE prefill now (LS mode, with ``parked`` BE requests
    queued after SGLang's waiting queue): the plan of a step from SGLang's current state. Only
    called with a controller (BE requests are parked only then: :func:`can_park`)."""
    global _without_be_work
    from omniserve_sgl.sglang_glue import scheduler as glue

    _set_chunk_limit(scheduler)
    plan = _controller.plan(server_view(scheduler, scheduler.running_batch, glue.runtime(), parked))
    if plan.be_prefill is None:
        return False
    _without_be_work = 0
    return True


def keeps_be_on_gpu() -> bool:
    """Whether a BE request stays in the GPU KV cache after its prefill (``--omniserve-be-placement
    auto`` with the controller on); else it moves to the BE KV pool at once."""
    return _TEST_MOVE_EVERY > 0 or (_controller is not None and config.current().be_placement == "auto")


def current_plan() -> StepPlan | None:
    return _plan


def _slos(req) -> tuple[float | None, float | None]:
    try:
        return slos_of_custom_params(req.sampling_params.custom_params)
    except ValueError:  # refused by the tokenizer hook already
        return None, None


def _last_token_time(req, now: float) -> float:
    # SGLang stamps decode steps' tokens only; a mixed step's are stamped by merge_deferred.
    ts = req.time_stats
    return max(ts.last_decode_finish_time, ts.prefill_finished_time, getattr(req, "omniserve_token_s", 0.0)) or now


def ls_finished(req) -> None:
    """Records a finished LS request's output length for :func:`_tokens_left` (from SGLang's
    ``release_kv_cache``, which every finished request passes; aborted ones are not recorded)."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    if req.finished() and not isinstance(req.finished_reason, FINISH_ABORT):
        _lengths.add(len(req.output_ids))


def _tokens_left(req) -> int:
    """Output tokens ``req`` will still produce: for certain (up to ``max_new_tokens`` with
    ``ignore_eos`` and no stop token, else up to ``min_new_tokens``; none with a stop string or
    regex, either of which may end it at any token), or, when more, most likely (from the output
    lengths of the LS requests that finished before it, at most up to ``max_new_tokens``)."""
    sp, produced = req.sampling_params, len(req.output_ids)
    certain = 0
    if not (sp.stop_strs or sp.stop_regex_strs):
        certain = (sp.max_new_tokens if sp.ignore_eos and not sp.stop_token_ids else sp.min_new_tokens) or 0
    likely = _lengths.likely_left(produced)
    if sp.max_new_tokens is not None:
        likely = min(likely, sp.max_new_tokens - produced)
    return max(certain - produced, likely, 0)


def server_view(scheduler, running_batch, runtime, parked=()) -> ServerView:
    """SGLang's scheduler state as the controller reads it (see ``ServerView``): running LS
    decodes and their last token times, waiting LS requests (the chunked one first), BE requests
    and where they live (``parked`` ones queued after the rest), free GPU KV (free slots plus what
    the radix cache can evict) and BE KV pool space."""
    now = time.perf_counter()
    ls_decodes, be, last_tokens = [], [], []
    for r in running_batch.reqs:
        if r.finished() or r.to_finish is not None:
            continue
        if is_be(r):
            be.append(BERequest(r.rid, CPU if is_offloaded(r) else GPU,
                                context_len=r.seqlen, last_run_step=getattr(r, "omniserve_last_step", -1)))
        else:
            tpot = _slos(r)[1]
            last = _last_token_time(r, now)
            first = r.time_stats.prefill_finished_time or last
            done = max(len(r.output_ids) - 1, 0)  # gaps since its first token
            ls_decodes.append(LSDecode(r.rid, r.seqlen, tpot, ahead_s=(tpot or _slo.tpot_s) * done - (last - first),
                                       tokens_left=_tokens_left(r), tokens_done=done))
            last_tokens.append(last)
    ls_waiting = []
    queue = [*scheduler.waiting_queue, *parked]
    if scheduler.chunked_req is not None:
        queue.insert(0, scheduler.chunked_req)
    for r in queue:
        if r.finished() or r.to_finish is not None:
            continue
        if is_be(r):
            pin = getattr(r, "omniserve_pin", None)
            be.append(BERequest(r.rid, WAITING, prompt_len=len(r.origin_input_ids),
                                prefilled=max(r.kv.kv_committed_len, pin[1] if pin else 0),
                                in_prefill=r is scheduler.chunked_req))
        else:
            ls_waiting.append(LSWaiting(r.rid, len(r.origin_input_ids), r.time_stats.wait_queue_entry_time or now,
                                        prefilled=r.kv.kv_committed_len, ttft_slo_s=_slos(r)[0]))
    tree = scheduler.tree_cache
    spec = runtime.pool.spec
    return ServerView(
        now_s=now, step=_step, slo=_slo, ls_decodes=tuple(ls_decodes), ls_waiting=tuple(ls_waiting), be=tuple(be),
        gpu_kv_free_tokens=scheduler.token_to_kv_pool_allocator.available_size() + tree.evictable_size(),
        gpu_kv_reserved_tokens=_decode_reserve(scheduler, running_batch),
        be_pool_free_tokens=runtime.pages.free_pages * spec.page_size,
        kv_bytes_per_token=runtime.kv_bytes_per_token_layer * spec.num_layers, num_layers=spec.num_layers,
        max_prefill_tokens=scheduler.omniserve_chunk_limit,
        since_decode_s=now - min(last_tokens) if last_tokens else 0.0, decoded_last_step=_decoded_last_step,
        cpu_overlap=piggyback.enabled(), mixed_steps=True)


# planning ---------------------------------------------------------------------------------------
def _decode_reserve(scheduler, running_batch) -> int:
    """GPU KV slots SGLang's ``PrefillAdder`` keeps for the running requests' future tokens before it
    admits a prompt (``_get_running_request_total_token_offset``: remaining ``max_new_tokens``,
    clipped at ``CLIP_MAX_NEW_TOKENS``, times the new-token ratio; 1 for ``ignore_eos``)."""
    ratio = scheduler.new_token_ratio_tracker.current
    total = 0.0
    for r in running_batch.reqs:
        p = r.sampling_params
        total += min(p.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW_TOKENS) * (1.0 if p.ignore_eos else ratio)
    return math.ceil(total)


def _reject(scheduler, rid: str, why: str) -> None:
    """Answers a queued LS request with HTTP 503 and ``why`` (SGLang's own path for a request the
    full queue refuses, ``Scheduler._abort_on_queued_limit``)."""
    from sglang.srt.managers.scheduler import _make_abort_req

    for i, req in enumerate(scheduler.waiting_queue):
        if req.rid == rid:
            scheduler.waiting_queue.pop(i)
            scheduler._release_aborted_request(req)
            message = f"omniserve: LS request rejected: {why} (--omniserve-ls-admission reject)"
            scheduler.send_abort_output(_make_abort_req(req, finished_reason={
                "type": "abort", "status_code": HTTPStatus.SERVICE_UNAVAILABLE, "message": message}), req)
            if _metrics is not None:
                _metrics.ls_rejected.inc()
            return


def plan_step(original, self, running_batch) -> bool:
    """AROUND ``Scheduler._should_defer_prefill`` (asked once per step, before any prefill is
    formed): plans this step; True (no prefill this step, decode instead) when SGLang's own
    prefill/decode interval says so or the plan is a decode step with rows to run."""
    global _plan, _view, _step, _without_be_work
    deferred = original(self, running_batch)
    from omniserve_sgl.sglang_glue import scheduler as glue

    if glue.runtime() is None or not mode.be_mode():
        return deferred
    if _TEST_MOVE_EVERY:
        _test_moves(self, running_batch, glue.runtime())
    if _controller is None:
        return deferred
    _set_chunk_limit(self)
    _step += 1
    release_yielded(self)
    _view = server_view(self, running_batch, glue.runtime())
    if _yielded and _ls_short_of_kv(_view):
        release_yielded(self, everything=True)
        _view = server_view(self, running_batch, glue.runtime())
    _plan = _controller.plan(_view)
    _without_be_work = 0 if _plan.be_prefill or _plan.be_decode else _without_be_work + 1
    piggyback.set_budget(sum(map(piggyback.owns, _plan.be_decode)))
    for rid, why in _plan.ls_rejected:
        _reject(self, rid, why)
    if _plan.ls_prefill_tokens and self.chunked_req is not None and is_be(self.chunked_req):
        _park_be_prefill(self)
    _move(self, running_batch, glue.runtime(), _plan.to_cpu, _plan.to_gpu)
    return deferred or (not _plan.is_prefill and not running_batch.is_empty())


def _park_be_prefill(scheduler) -> None:
    """An LS prompt waits while a BE prompt is being prefilled in chunks (SGLang's chunked request
    goes first in every prefill step): the BE request goes back to the queue, as SGLang retracts a
    request (ahead of the BE requests that have not started), and the LS prompt takes this step
    (strict order: LS prefill > BE prefill). The chunks it has prefilled stay in the radix cache
    (SGLang put them there at the start of this step), so it resumes from them: they are pinned
    there (a tree lock of ours on the node they end at) until it is admitted again
    (:func:`release_yielded`). Unpinned, the radix cache's LRU eviction takes the tail of its prefix
    first, and the chunks are computed again: in a served run at 2.5 LS/s, BE prompts of 1K tokens
    were prefilled 1.4 to 5.3 times over."""
    from sglang.srt.mem_cache import common

    req, scheduler.chunked_req = scheduler.chunked_req, None
    kept = req.kv.cache_protected_len
    pin = (scheduler.tree_cache.lock(req.last_node), kept) if kept and req.last_node is not None else None
    common.release_kv_cache(req, scheduler.tree_cache, checkpoint=False)  # with omniserve's hook: pool pages too
    req.reset_for_retract()
    if pin is not None:
        req.omniserve_pin = pin
        _yielded.append(req)
    scheduler._add_request_to_queue(req, is_retracted=True)
    # SGLang appends it; it goes back ahead of the BE requests that have not started, so it resumes
    # before another BE prompt starts (one at a time: fewer chunks pinned, the oldest done first).
    queue = scheduler.waiting_queue
    if queue and queue[-1] is req:
        queue.pop()
        queue.insert(next((i for i, r in enumerate(queue) if is_be(r)), len(queue)), req)
    if _metrics is not None:
        _metrics.be_prefill_yields.inc()


def _ls_short_of_kv(view: ServerView) -> bool:
    """Whether the LS requests need more GPU KV (their queued prompts, a token per decode) than is
    free, evictable, or held by BE requests the plan can move to the BE KV pool: then the chunks of
    BE prompts that yielded to them are unpinned (they become evictable, LRU first)."""
    movable = sum(b.context_len for b in view.be if b.placement == GPU)
    return view.ls_kv_need > view.gpu_kv_free_tokens + movable


def release_yielded(scheduler, everything: bool = False) -> None:
    """Unpins the chunks of BE prompts that yielded to LS prompts (:func:`_park_be_prefill`) once
    they are out of SGLang's waiting queue (admitted again, holding a tree lock of their own, or
    aborted), or all of them when ``everything`` (LS requests need the GPU KV, SGLang found no room
    for a planned LS prefill, or the BE path goes off); unpinned chunks stay in the radix cache
    until evicted."""
    if not _yielded:
        return
    queued = {id(r) for r in scheduler.waiting_queue}
    keep = []
    for req in _yielded:
        if everything or id(req) not in queued or req.finished():
            scheduler.tree_cache.unlock(req.omniserve_pin[0])
            req.omniserve_pin = None
        else:
            keep.append(req)
    _yielded[:] = keep


def _move(scheduler, running_batch, runtime, to_cpu, to_gpu) -> None:
    """Applies BE KV moves to requests of the running batch (between steps)."""
    by_rid = {r.rid: r for r in running_batch.reqs}
    for rid in to_cpu:
        placement.to_cpu(by_rid[rid], scheduler.tree_cache, runtime)
        if _metrics is not None:
            _metrics.be_moves.labels(direction="to_cpu").inc()
    for rid in to_gpu:
        if piggyback.owns(rid) and not piggyback.detach(rid):  # its token is inside the layers: later
            continue
        if placement.to_gpu(by_rid[rid], scheduler.tree_cache, runtime) and _metrics is not None:
            _metrics.be_moves.labels(direction="to_gpu").inc()


def _test_moves(scheduler, running_batch, runtime) -> None:
    global _test_step
    _test_step += 1
    if _test_step % _TEST_MOVE_EVERY:
        return
    live = [r for r in running_batch.reqs if is_be(r) and not r.finished() and r.to_finish is None
            and r.kv.kv_committed_len > 0]
    on_cpu = [r.rid for r in live if is_offloaded(r)]
    _move(scheduler, running_batch, runtime, [r.rid for r in live if not is_offloaded(r)], on_cpu)


def prefill_chunk(scheduler) -> int | None:
    """This step's prefill chunk, tokens (None: SGLang's own, when no plan or chunking is off)."""
    if _plan is None or not _plan.is_prefill or scheduler.chunked_prefill_size is None:
        return None
    return _plan.ls_prefill_tokens or _plan.be_prefill[1]


def mix_decodes(scheduler, running_batch) -> bool:
    """Before SGLang forms this step's prefill batch: whether the plan is a mixed step, whose
    prefill batch takes the decode rows of ``running_batch``; if so, the BE rows the plan leaves
    out sit out, as in a decode step (:func:`defer_be_rows`: with asynchronous piggybacking the
    offloaded ones go to the executor, up to the plan's rows per layer), and those that run are
    stamped."""
    if _plan is None or not _plan.mixed or running_batch.is_empty():
        return False
    chosen = set(_plan.be_decode)
    # Asynchronous piggybacking: offloaded rows leave the batch for the executor, as in a decode step.
    taken = piggyback.take(scheduler, running_batch.reqs) if piggyback.enabled() else []
    gone = {id(r) for r in taken} | {id(r) for r in running_batch.reqs if r.finished()} if taken else set()
    if piggyback.enabled():
        piggyback.set_budget(sum(r.rid in chosen for r in taken))
    keep = [i for i, r in enumerate(running_batch.reqs)
            if id(r) not in gone and (r.rid in chosen or not deferrable(r))]
    _sit_out(running_batch, keep, gone)
    return True


def _sit_out(batch, keep: list[int], gone: set) -> None:
    """Rows of ``batch`` outside ``keep`` sit this step out (:data:`_deferred`, merged back after
    it; those in ``gone``, the executor's, are not counted as deferred); the BE rows that run are
    stamped with this step (oldest-first order)."""
    global _deferred
    if len(keep) < len(batch.reqs):
        kept = set(keep)
        _deferred = [r for i, r in enumerate(batch.reqs) if i not in kept and not r.finished()]
        if _metrics is not None:
            _metrics.be_rows_deferred.inc(sum(id(r) not in gone for r in _deferred))
        batch.filter_batch(keep_indices=keep)
    for r in batch.reqs:
        if is_be(r):
            r.omniserve_last_step = _step


def unmix(scheduler, running_batch):
    """The mixed step did not form (no prefill after all, or SGLang ran it without the decode
    rows): the BE rows that sat out go back into ``running_batch`` at once (a decode step may run
    next in this same step). Returns the running batch."""
    global _deferred
    reqs, _deferred = [r for r in _deferred if not r.finished()], []
    if not reqs:
        return running_batch
    part = _decode_ready_batch(scheduler, reqs)
    if running_batch.is_empty():
        return part
    running_batch.merge_batch(part)
    return running_batch


def be_prefill_allowed() -> bool:
    """Whether a BE request may start its prefill in this step (one whose chunked prefill is under
    way continues in any prefill step: SGLang's chunked request goes first)."""
    return _plan is None or _plan.be_prefill is not None


# BE rows that sit out a decode step -------------------------------------------------------------
def deferrable(req) -> bool:
    # Rows whose sampling keeps per-batch state (penalties, min_new_tokens, grammar, logprobs)
    # always run: rebuilding their batch would restart that state.
    sp = req.sampling_params
    return (is_be(req) and not req.finished() and req.to_finish is None and not req.return_logprob
            and req.grammar is None and sp.frequency_penalty == 0 and sp.presence_penalty == 0
            and sp.repetition_penalty == 1 and not sp.min_new_tokens)


def defer_be_rows(original, self, batch):
    """AROUND ``Scheduler.update_running_batch``: BE rows that the plan leaves out of this decode
    step are filtered out of the batch first (so retraction and ``prepare_for_decode`` see only the
    rows that run); the rows that run are stamped with this step for the oldest-first order. With
    asynchronous piggybacking, offloaded BE rows always leave the batch (the executor drives them:
    :mod:`omniserve_sgl.sglang_glue.piggyback`), up to the plan's BE rows per layer join its passes,
    and when nothing else would run, a pass over them alone runs here."""
    global _decoded_last_step, _plan
    _decoded_last_step = True
    taken = piggyback.take(self, batch.reqs) if piggyback.enabled() and mode.be_mode() else []
    gone = {id(r) for r in taken} | {id(r) for r in batch.reqs if r.finished()} if piggyback.enabled() else set()
    if _plan is None and not gone:
        return original(self, batch)
    chosen = None
    if _plan is not None:
        if _plan.is_prefill:  # no prefill could be formed after all (GPU KV, request rows): plan the decode
            if _plan.ls_prefill_tokens:  # SGLang found no room for the LS prompt: pinned BE chunks give way
                release_yielded(self, everything=True)
            _plan = _controller.plan(dataclasses.replace(_view, ls_waiting=(), be=tuple(
                r for r in _view.be if r.placement != WAITING)))
        chosen = set(_plan.be_decode)
        piggyback.set_budget(sum(r.rid in chosen for r in taken))
    keep = [i for i, r in enumerate(batch.reqs)
            if id(r) not in gone and (chosen is None or r.rid in chosen or not deferrable(r))]
    if not keep:  # nothing else would run: the rows stay in the batch; BE rows alone run a pass
        if taken:
            piggyback.set_budget(None)
            piggyback.be_only_pass(self)
        merge_deferred(None, self)
        return None
    _sit_out(batch, keep, gone)
    out = original(self, batch)
    if out is None or out.is_empty():
        merge_deferred(None, self)
    return out


def _decode_ready_batch(scheduler, reqs):
    """A running-batch part holding ``reqs`` (each with its KV and ``req_pool_idx``) ready to
    decode again: SGLang's own recipe for requests that join decoding from outside the batch
    (``Scheduler._build_hisparse_decode_batch``)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    device = scheduler.device
    batch = ScheduleBatch.init_new(
        reqs=reqs, req_to_token_pool=scheduler.req_to_token_pool,
        token_to_kv_pool_allocator=scheduler.token_to_kv_pool_allocator, tree_cache=scheduler.tree_cache,
        model_config=scheduler.model_config, enable_overlap=scheduler.enable_overlap,
        spec_algorithm=scheduler.spec_algorithm)
    idx = [r.kv.req_pool_idx for r in reqs]
    batch.req_pool_indices = torch.tensor(idx, dtype=torch.int64, device=device)
    batch.req_pool_indices_cpu = torch.tensor(idx, dtype=torch.int64)
    seq_lens = [len(r.origin_input_ids) + len(r.output_ids) - 1 for r in reqs]
    batch.seq_lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
    batch.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
    batch.orig_seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    batch.seq_lens_sum = sum(seq_lens)
    piggyback.relay_last_tokens(scheduler, reqs)
    batch.input_ids = None
    batch.multimodal_inputs = [r.multimodal_inputs for r in reqs]
    batch.forward_mode = ForwardMode.DECODE
    batch.sampling_info = SamplingBatchInfo.from_schedule_batch(batch, scheduler.model_config.vocab_size)
    return batch


def merge_deferred(_result, self, *args, **kwargs) -> None:
    """AFTER ``Scheduler.process_batch_result`` (and when no decode step runs after all): the BE
    rows that sat out go back into the running batch; ``omniserve_be_requests`` is published."""
    global _deferred, _decoded_last_step, _plan
    if not mode.be_mode():
        return
    batch = args[0] if args else None
    if batch is not None and batch.forward_mode.is_mixed():  # its decode rows got a token
        now = time.perf_counter()
        for r in batch.decoding_reqs or ():
            r.omniserve_token_s = now
        if _metrics is not None:
            _metrics.mixed_steps.inc()
    if _plan is not None and _plan.is_prefill:  # a mixed step too: the next forced LS chunk waits a decode step
        _decoded_last_step = False
    _plan = None
    piggyback.emit(self)
    reqs, _deferred = [r for r in _deferred if not r.finished()], []
    if reqs:
        part = _decode_ready_batch(self, reqs)
        if self.running_batch.is_empty():
            self.running_batch = part
        else:
            self.running_batch.merge_batch(part)
    if _metrics is not None:
        be = [r for r in self.running_batch.reqs if is_be(r) and not r.finished()]
        _metrics.be_requests.labels(placement=CPU).set(sum(map(is_offloaded, be)))
        _metrics.be_requests.labels(placement=GPU).set(len(be) - sum(map(is_offloaded, be)))
