"""Scheduler-process hooks: which requests are BE, BE admission against the BE KV pool, moving a
BE request's KV to the pool after its prefill, and no GPU KV slots for its decode tokens.

Every hook is a named function whose docstring says what it changes in SGLang and why; in LS
mode (no BE request in the server, :mod:`omniserve_sgl.sglang_glue.mode`) each passes SGLang's own
answer through. BE request state lives in two attributes on SGLang's ``Req`` (``omniserve_be``,
``omniserve_offloaded``) and, for the KV, in :class:`omniserve_sgl.be_runtime.BERuntime`.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker

from omniserve_sgl import config
from omniserve_sgl.admission import admission_round
from omniserve_sgl.be_runtime import BERuntime, BEUnavailableError, DecodePlan
from omniserve_sgl.control import OnlineCorrection, step_kind
from omniserve_sgl.service_class import BE, class_of_custom_params
from omniserve_sgl.sglang_glue import controller, mode, piggyback, placement, profiler, view
from omniserve_sgl.sglang_glue.placement import is_be, is_offloaded
from omniserve_sgl.sglang_glue.rows import select_rows

logger = logging.getLogger(__name__)

_runtime: BERuntime | None = None  # one scheduler, hence one runtime, per process
_latency_model: OnlineCorrection | None = None  # the profile (sglang_glue.profiler), corrected online
_metrics = None  # BEMetrics with --enable-metrics
_pending_plan: DecodePlan | None = None  # the BE rows of the decode step being prepared
_plan_reqs: list = []  # their Reqs
_mixed_tail = 0  # decode rows at the end of the mixed step being prepared


def runtime() -> BERuntime | None:
    return _runtime


def latency_model() -> OnlineCorrection | None:
    return _latency_model


def decode_plan_pending() -> bool:
    """Whether the decode batch about to run has BE rows for the CPU worker."""
    return _pending_plan is not None


def take_mixed_tail() -> int:
    """How many decode rows end the mixed step about to run (consumed once, by the attention
    backend); their offloaded BE rows are in :func:`take_decode_plan`."""
    global _mixed_tail
    tail, _mixed_tail = _mixed_tail, 0
    return tail


def take_decode_plan() -> DecodePlan | None:
    """The BE rows of the decode batch about to run (consumed once, by the attention backend)."""
    global _pending_plan
    plan, _pending_plan = _pending_plan, None
    return plan


# worker faults ----------------------------------------------------------------------------------
def _check_worker() -> str | None:
    """Replaces a worker that exited (see ``BERuntime.check_worker``); returns why BE serving is
    off when it could not be replaced."""
    try:
        _runtime.check_worker()
    except BEUnavailableError:
        pass
    return _runtime.unavailable


def _abort_be(req, why: str) -> None:
    """Ends a BE request with HTTP 503 and ``why``: at once if it has not started, else after
    this step (as SGLang's own aborts of running requests)."""
    if req.finished() or req.to_finish is not None:
        return
    if req.output_ids:
        req.to_finish = FINISH_ABORT(why, HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailable")
    else:
        req.set_finish_with_abort(why, HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailable")


def abort_decode_plan(why: str) -> None:
    """The worker failed for good during the decode step in flight: its BE requests end after it."""
    for req in _plan_reqs:
        _abort_be(req, why)


# start-up ---------------------------------------------------------------------------------------
def start_runtime(model_runner) -> BERuntime:
    """Creates this process's BE KV pool and CPU attention worker, sized from the model runner."""
    global _runtime, _metrics
    mc = model_runner.model_config  # MLA models were refused with the command line (cli)
    kv_pool = model_runner.token_to_kv_pool
    _runtime = BERuntime(config.current(), num_layers=mc.num_hidden_layers, num_kv_heads=kv_pool.head_num,
                         head_dim=kv_pool.head_dim, num_qo_heads=mc.num_attention_heads,
                         dtype=kv_pool.dtype, max_rows=max(model_runner.req_to_token_pool.size, 1),
                         worker=config.current().worker_setup(str(model_runner.device)),
                         staging_slots=piggyback.staging_slots(mc.num_hidden_layers))
    if config.current().metrics:
        from omniserve_sgl.metrics import BEMetrics

        _metrics = BEMetrics()
        _metrics.update(_runtime, waiting=0)
    mode.start(config.current().plans_every_step, _metrics)
    piggyback.start(model_runner, _runtime, _metrics)
    return _runtime


def publish_no_be() -> None:
    """The BE path's gauges with no BE request left (LS mode updates none of them): nothing waits
    for the pool, no BE request runs; the pool's pages as they are."""
    if _metrics is not None and _runtime is not None:
        _metrics.update(_runtime, waiting=0)
        for where in ("gpu", "cpu"):
            _metrics.be_requests.labels(placement=where).set(0)


def load_latency_model(model_runner) -> None:
    """Loads (or profiles, see :mod:`omniserve_sgl.sglang_glue.profiler`) this process's latency
    model and starts the SLO controller over it."""
    global _latency_model
    model = profiler.load_or_profile(model_runner, _runtime, config.current())
    _latency_model = OnlineCorrection(model) if model is not None else None
    controller.start(_latency_model, _metrics)


def time_step(original, self, batch, *args, **kwargs):
    """AROUND ``Scheduler.run_batch``: with a latency model loaded, times each prefill or decode
    step in BE mode (synchronised on a GPU: BE mode runs SGLang's synchronous loop, so the
    scheduler waits for the step's results right after anyway), publishes
    ``|predicted - measured| / measured``, logs the plan and both times at debug level, one line
    per step, and folds the measured time into the model's online correction."""
    shape = None
    if _latency_model is not None and _runtime is not None and mode.be_mode():
        shape = view.step_shape(batch, _runtime, _runtime.pool.spec.num_layers, is_offloaded)
    if shape is None:
        return original(self, batch, *args, **kwargs)
    t0 = time.perf_counter()
    result = original(self, batch, *args, **kwargs)
    if str(batch.device).startswith("cuda"):
        torch.cuda.synchronize(batch.device)
    measured = time.perf_counter() - t0
    predicted = _latency_model.predict(shape)
    _latency_model.observe(shape, measured)
    if _metrics is not None:
        _metrics.prediction_error.observe(abs(predicted - measured) / measured)
        kind = step_kind(shape)
        _metrics.step_seconds.labels(kind=kind).inc(measured)
        _metrics.step_profiled_seconds.labels(kind=kind).inc(_latency_model.model.predict(shape))
    plan = controller.current_plan()
    logger.debug("omniserve step: %s; %s; predicted %.1f ms, measured %.1f ms", plan.why if plan else "no plan",
                 shape, 1e3 * predicted, 1e3 * measured)
    return result


# request class ----------------------------------------------------------------------------------
def tag_request(req, _self, _recv_req, *args, **kwargs):
    """AFTER ``Scheduler._create_generation_req`` (SGLang's extension point for request-local
    state): marks the request BE or LS from ``sampling_params.custom_params``."""
    try:
        req.omniserve_be = class_of_custom_params(req.sampling_params.custom_params) == BE
    except ValueError:  # refused by the tokenizer hook already; never reached over HTTP
        req.omniserve_be = False
    req.omniserve_offloaded = False
    if req.omniserve_be:
        mode.note_be_arrival()


def refuse_oversized_be(_result, _self, req):
    """AFTER ``Scheduler.init_req_max_new_tokens``: a BE request longer than the whole BE KV pool
    could never be admitted, so it is refused at once with a message instead of waiting forever."""
    if not is_be(req) or req.finished() or _runtime is None:
        return
    if _runtime.unavailable is not None:
        _abort_be(req, _runtime.unavailable)
        return
    need = _be_tokens(req)
    if need > _runtime.capacity_tokens:
        req.set_finish_with_abort(
            f"omniserve: this BE request needs {need} tokens of BE KV pool (prompt + max_new_tokens) but "
            f"the pool holds {_runtime.capacity_tokens}; lower max_new_tokens or raise --omniserve-cpu-kv-gb")


# admission --------------------------------------------------------------------------------------
def _needs_pool(req) -> bool:
    # A request refused earlier (to_finish set) finishes in its prefill: it needs no pages.
    return is_be(req) and not req.finished() and req.to_finish is None and req.rid not in _runtime.pages


def _be_tokens(req) -> int:
    return len(req.origin_input_ids) + req.sampling_params.max_new_tokens


def admit_prefill(original, self, prefill_delayer_single_pass, running_batch):
    """AROUND ``Scheduler._get_new_batch_prefill_raw``: BE requests are admitted against the BE KV
    pool instead of the GPU KV budget.

    - Waiting LS requests go first (each class keeps SGLang's order), and at most one BE request
      starts its prefill per batch, so an LS arrival waits for at most one BE prompt (chunked at
      ``--chunked-prefill-size``), not for a backlog of them.
    - BE requests whose whole length does not fit in the pool's free pages (in queue order) sit
      out this round: they stay queued, in order, and LS requests behind them are not blocked.
    - For SGLang's GPU budget a BE request counts only its prompt and the token its prefill
      samples (it leaves the GPU after its prefill): for the length of the call its
      ``max_new_tokens`` reads as one more than it has generated (not 0: SGLang treats 0 as a
      prefill-only request and samples nothing).
    - Admitted BE requests get their pool reservation, so they never stall or fail mid-decode.
    - When the plan is a mixed step (:func:`controller.mix_decodes`), SGLang's mixed chunked
      prefill runs for this call: the decode rows the plan keeps join the prefill batch, and the
      chunk limit grows by their count (SGLang takes one token per decode row off it).
    """
    global _mixed_tail
    if _runtime is None or not mode.be_mode():
        return original(self, prefill_delayer_single_pass, running_batch)
    if (why := _check_worker()) is not None:
        for req in [*self.waiting_queue, *running_batch.reqs]:
            if is_be(req):
                _abort_be(req, why)
    queue = list(self.waiting_queue)
    offered, held = admission_round(
        queue, is_be, lambda r: _runtime.pages.pages_for(_be_tokens(r)) if _needs_pool(r) else None,
        _runtime.pages.free_pages, be_allowed=controller.be_prefill_allowed())
    self.waiting_queue[:] = offered
    mixed = controller.mix_decodes(self, running_batch)
    hidden = [r for r in offered if is_be(r)] + [r for r in running_batch.reqs if is_be(r)]
    saved = [(r, r.sampling_params.max_new_tokens) for r in hidden]
    for r, _ in saved:
        r.sampling_params.max_new_tokens = len(r.output_ids) + 1
    chunk, own_chunk, own_mixed = controller.prefill_chunk(self), self.chunked_prefill_size, self.is_mixed_chunk
    if chunk is not None:
        self.chunked_prefill_size = chunk + (running_batch.batch_size() if mixed else 0)
    self.is_mixed_chunk = mixed
    try:
        result = original(self, prefill_delayer_single_pass, running_batch)
    finally:
        self.chunked_prefill_size, self.is_mixed_chunk = own_chunk, own_mixed
        for r, n in saved:
            r.sampling_params.max_new_tokens = n
        order = {id(r): i for i, r in enumerate(sorted(queue, key=is_be))}  # LS first, each class in order
        self.waiting_queue[:] = sorted(list(self.waiting_queue) + held,
                                       key=lambda r: order.get(id(r), len(order)))
    new_batch = result[0]
    if mixed and new_batch is not None and new_batch.forward_mode.is_mixed():
        _mixed_tail = len(new_batch.decoding_reqs)
    elif mixed:  # no prefill formed, or SGLang ran it plain: the rows that sat out go back now
        result = (new_batch, controller.unmix(self, result[1]))
    for req in new_batch.reqs if new_batch is not None else []:
        if _needs_pool(req):
            _runtime.reserve(req.rid, _be_tokens(req))
    if _metrics is not None:
        _metrics.update(_runtime, waiting=len(held))
    return result


# prefill -> BE KV pool ----------------------------------------------------------------------------
def _prefill_done(req) -> bool:
    # Every token but the one just sampled has KV: the prompt (and any earlier output) is complete.
    return len(req.output_ids) > 0 and req.kv.kv_committed_len == len(req.origin_input_ids) + len(req.output_ids) - 1


def offload_after_prefill(_result, self, batch, *args, **kwargs):
    """AFTER ``SchedulerBatchResultProcessor.process_batch_result_prefill``: a BE request whose
    prefill just completed moves to the BE KV pool (:func:`placement.to_cpu`), and from here on its
    decode attention runs on the CPU worker (the paper's choice: prefill on the GPU). With the SLO
    controller and ``--omniserve-be-placement auto`` it stays in the GPU KV cache instead, and the
    controller moves it when LS work needs the room."""
    if _runtime is None or not mode.be_mode() or controller.keeps_be_on_gpu():
        return
    for req in batch.reqs:
        if not is_be(req) or is_offloaded(req) or req.finished() or req.is_retracted or not _prefill_done(req):
            continue
        placement.to_cpu(req, self.tree_cache, _runtime)


def release_kv(original, req, tree_cache, *, checkpoint: bool):
    """AROUND ``mem_cache.common.release_kv_cache`` (finish, abort, retraction): a BE request also
    frees its BE KV pool pages. An offloaded one holds no GPU KV slots (they went back after its
    prefill), so only its ``req_to_token`` row is returned and nothing is put in the radix cache."""
    if not is_be(req):
        controller.ls_finished(req)
        return original(req, tree_cache, checkpoint=checkpoint)
    if piggyback.owns(req.rid):
        piggyback.release(req.rid)  # the executor frees its pages once no CPU job of it is in flight
    elif _runtime is not None:
        _runtime.release(req.rid)
    if _runtime is not None and _metrics is not None:
        _metrics.update(_runtime)
    if not is_offloaded(req):
        return original(req, tree_cache, checkpoint=checkpoint)
    req.omniserve_offloaded = False  # a retracted request is prefilled again
    tree_cache.on_release(req, checkpointed=False)
    tree_cache.req_to_token_pool.free(req)
    req.kv.mark_kv_released()


# decode -----------------------------------------------------------------------------------------
def decode_tokens_needed(original, self, selected_indices=None):
    """AROUND ``ScheduleBatch.new_tokens_required_next_decode``: offloaded BE rows need no GPU KV
    slot for their next token (it goes to the BE KV pool), so only LS rows count towards the GPU KV
    the next decode step needs, and BE rows never make SGLang think it must retract."""
    if not mode.be_mode():
        return original(self, selected_indices)
    rows = range(len(self.reqs)) if selected_indices is None else selected_indices
    return original(self, [i for i in rows if not is_offloaded(self.reqs[i])])


def retraction_order(original, reqs):
    """AROUND ``ScheduleBatch._get_decode_retraction_order`` (most preferred to keep first; SGLang
    retracts from the end): offloaded BE requests hold no GPU KV, so retracting one frees nothing
    and throws its decode progress away: they move to the front. BE requests decoding in the GPU KV
    cache go to the end (best effort: they give their slots up before any LS request does), LS
    requests between them; each group in SGLang's order."""
    order = original(reqs)
    if not mode.be_mode():
        return order
    on_gpu_be = [i for i in order if is_be(reqs[i]) and not is_offloaded(reqs[i])]
    ls = [i for i in order if not is_be(reqs[i])]
    return [i for i in order if is_offloaded(reqs[i])] + ls + on_gpu_be


def retract_decode(original, self):
    """AROUND ``ScheduleBatch.retract_decode``: a batch of offloaded BE requests only holds no GPU
    KV to free, so nothing is retracted (SGLang's loop retracts at least one request per call)."""
    if mode.be_mode() and self.reqs and all(is_offloaded(r) for r in self.reqs):
        return [], NewTokenRatioTracker.estimate_new_token_ratio_after_retract(self.reqs), []
    return original(self)


def alloc_decode(original, batch, token_per_req: int):
    """AROUND ``mem_cache.allocation.alloc_for_decode``: only LS rows get GPU KV slots. Offloaded BE
    rows get slot 0 (SGLang's padding slot, never written: the attention split keeps BE rows away
    from the GPU KV cache) and their next token is placed in the BE KV pool instead."""
    global _pending_plan, _plan_reqs, _mixed_tail
    _pending_plan, _plan_reqs, _mixed_tail = None, [], 0
    if not mode.be_mode():
        return original(batch, token_per_req)
    be_rows, ls_rows = [], []
    for i, r in enumerate(batch.reqs):
        (be_rows if is_offloaded(r) else ls_rows).append(i)
    if not be_rows or _runtime is None:
        return original(batch, token_per_req)
    if token_per_req != 1:
        raise RuntimeError("omniserve: BE decode takes one token per step (speculative decoding is off)")
    be_reqs = [batch.reqs[i] for i in be_rows]
    out_cache_loc = torch.zeros(len(batch.reqs), dtype=torch.int64, device=batch.seq_lens.device)
    if ls_rows:
        # SGLang's allocator over the same batch seen through its LS rows only.
        ls = select_rows(batch, ls_rows, ("seq_lens", "seq_lens_cpu", "req_pool_indices", "req_pool_indices_cpu"),
                         ("reqs",))
        ls_loc = original(ls, token_per_req)
        out_cache_loc[torch.tensor(ls_rows, device=out_cache_loc.device)] = ls_loc.to(torch.int64)
        out_cache_loc = out_cache_loc.to(ls_loc.dtype)
    for req in be_reqs:
        req.kv.kv_allocated_len += 1
        req.kv.kv_committed_len += 1
    _pending_plan, _plan_reqs = _runtime.plan_decode([r.rid for r in be_reqs], be_rows), be_reqs
    if _metrics is not None:
        _metrics.update(_runtime)
    return out_cache_loc

