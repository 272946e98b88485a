"""Asynchronous piggybacking in SGLang's scheduler (``--omniserve-mode async``).

An offloaded BE request leaves SGLang's decode steps: before each step its row is taken out of
the running batch (with the controller's deferred rows) and driven by the
:class:`~omniserve_sgl.piggyback.PiggybackExecutor`, and after the step it is merged back, so
SGLang's aborts, admission and idle checks see it. The executor runs inside the model's forward:
the Llama model's ``model.forward`` (the decoder body, before the LM head) is replaced, for passes
while the executor holds BE rows, by an executor pass over the batch's LS rows (SGLang's own
modules and attention backend, :mod:`omniserve_sgl.sglang_glue.llama_adapter`) with the BE rows
whose CPU attention is back; SGLang's logits processor and sampler then see the LS rows only.
BE tokens a pass produced are sampled with SGLang's sampler over their own requests and emitted
after the step's results, as SGLang emits a decode token (SGLANG-INTERNALS section 5). With no LS
work, passes over BE rows alone run from the decode hook, back to back.

Rows whose sampling keeps per-batch state (penalties, ``min_new_tokens``, grammar, logprobs) keep
the synchronous path.
"""

from __future__ import annotations

import logging
import types

import torch

from omniserve_sgl import config
from omniserve_sgl.piggyback import LSBatch, PiggybackExecutor

logger = logging.getLogger(__name__)

_executor: PiggybackExecutor | None = None
_adapter = None
_model_runner = None
_owned: dict = {}  # rid -> Req driven by the executor
_tokens: list[tuple[object, int]] = []  # BE tokens of the step in flight, emitted after its results
_failed: list[tuple[object, str]] = []
_budget: int | None = None  # this step's BE rows per layer (the controller's), None: no limit
_metrics = None


def start(model_runner, runtime, metrics=None) -> None:
    """With ``--omniserve-mode async`` and a supported model, builds the executor over ``runtime``
    and routes the model's forward through it (logs once why not, otherwise)."""
    global _executor, _adapter, _model_runner, _metrics
    if config.current().mode != "async" or _executor is not None:
        return
    from omniserve_sgl.sglang_glue.llama_adapter import adapter_for

    adapter, why = adapter_for(model_runner)
    if adapter is None:
        logger.warning("omniserve: --omniserve-mode async is not available for this model (%s); offloaded BE "
                       "rows take the synchronous path", why)
        return
    _adapter, _model_runner, _metrics = adapter, model_runner, metrics
    _executor = PiggybackExecutor(adapter, runtime, capacity=runtime.max_rows, layer_budget=_layer_budget,
                                  sample=_sample)
    _wrap_forward(adapter.inner)
    logger.info("omniserve: asynchronous piggybacking on (%s, %d layers, %d staging slots)",
                type(model_runner.model).__name__, adapter.num_layers, runtime.staging_slots)


def staging_slots(num_layers: int) -> int:
    """Staging slots the BE runtime needs: one job per layer and pass in flight, twice over."""
    return 2 * num_layers + 2 if config.current().mode == "async" else 2


def enabled() -> bool:
    return _executor is not None


def active() -> bool:
    """Whether passes go through the executor now (it holds BE rows)."""
    return _executor is not None and bool(_executor.rows)


def wants_pass() -> bool:
    """Whether the next pass must go through the executor (see ``PiggybackExecutor.wants_pass``)."""
    return active() and _executor.wants_pass()


def owns(rid) -> bool:
    return rid in _owned


def release(rid) -> None:
    """Frees ``rid``'s BE KV pool pages through the executor (later, while a job of it is in flight)."""
    _owned.pop(rid, None)
    _executor.remove(rid)


def detach(rid) -> bool:
    """Takes ``rid`` out of the executor with its pages, for a move back to the GPU: only between
    two tokens (its current token has entered no layer). Returns whether it was taken out."""
    if _executor is None or not _executor.detach(rid):
        return _executor is None
    _owned.pop(rid, None)
    return True


def _layer_budget(_layer: int) -> int:
    return _executor.store.capacity if _budget is None else _budget


def set_budget(rows: int | None) -> None:
    """BE rows that may join each layer of the next pass (``None``: no limit)."""
    global _budget
    _budget = rows


# the forward ------------------------------------------------------------------------------------
def _wrap_forward(inner) -> None:
    """Shadows the decoder body's ``forward`` on the instance: executor passes while BE rows are
    held, SGLang's own forward otherwise."""
    original = inner.forward

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None, **kwargs):
        fm = forward_batch.forward_mode
        if (not active() or input_embeds is not None or pp_proxy_tensors is not None or kwargs
                or not (fm.is_decode() or fm.is_extend()) or input_ids is None or input_ids.shape[0] == 0):
            return original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors=pp_proxy_tensors,
                            **kwargs)
        res = _executor.run_pass(LSBatch(input_ids, positions, _adapter.ls_attention(forward_batch)))
        _absorb(res)
        return res.ls_hidden

    inner.forward = types.MethodType(forward, inner)


def _absorb(res) -> None:
    _tokens.extend(res.be_tokens)
    _failed.extend(res.failed)
    if _metrics is not None:
        _metrics.piggybacked_rows.inc(res.piggybacked_rows)
        if res.waits and res.ls_hidden is not None:
            _metrics.ls_pass_waits.inc()
        _metrics.residual_store_bytes.set(_executor.residual_store_bytes)


def _sample(logits: torch.Tensor, rids: list) -> list[int]:
    """SGLang's sampler over the requests ``rids`` (their temperature, top-p/k, min-p, seed)."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    reqs = [_owned[r] for r in rids]
    if all(r.sampling_params.temperature == 0 or r.sampling_params.top_k == 1 for r in reqs):
        return logits.argmax(dim=-1).tolist()
    mr = _model_runner
    batch = ScheduleBatch.init_new(reqs=reqs, req_to_token_pool=mr.req_to_token_pool,
                                   token_to_kv_pool_allocator=mr.token_to_kv_pool_allocator, tree_cache=None,
                                   model_config=mr.model_config, enable_overlap=False, spec_algorithm=None)
    info = SamplingBatchInfo.from_schedule_batch(batch, mr.model_config.vocab_size)
    positions = torch.tensor([len(r.origin_input_ids) + len(r.output_ids) - 1 for r in reqs], device=logits.device)
    ids = mr.sampler(LogitsProcessorOutput(next_token_logits=logits), info, False, [0] * len(reqs),
                     [None] * len(reqs), positions)
    return ids.tolist()


# the scheduler ----------------------------------------------------------------------------------
def takes(req) -> bool:
    """Whether ``req`` is driven by the executor (an offloaded BE request whose sampling keeps no
    per-batch state, not finishing)."""
    from omniserve_sgl.sglang_glue.controller import deferrable
    from omniserve_sgl.sglang_glue.placement import is_offloaded

    return _executor is not None and is_offloaded(req) and deferrable(req)


def take(scheduler, reqs: list) -> list:
    """The requests of ``reqs`` the executor drives this step (added to it on first sight); those
    it drove that are to finish now (aborted) are finished here and in neither list."""
    taken = []
    for r in reqs:
        if r.rid in _owned and (r.to_finish is not None or r.finished()):
            _finish_now(scheduler, r)
        elif takes(r):
            if r.rid not in _owned:
                _executor.add(r.rid, r.output_ids[-1], len(r.origin_input_ids) + len(r.output_ids) - 1)
                _owned[r.rid] = r
            taken.append(r)
    return taken


def _finish_now(scheduler, req) -> None:
    from sglang.srt.mem_cache.common import release_kv_cache

    req.update_finish_state(0)  # to_finish -> finished_reason
    release_kv_cache(req, scheduler.tree_cache, checkpoint=False)
    scheduler.output_streamer.stream_output([req], False)


def be_only_pass(scheduler) -> None:
    """A pass over BE rows alone (no LS work in this step); its tokens are emitted at once. It
    lasts about one TPOT SLO at most (it stops where its rows wait for the worker), so an LS
    request arriving meanwhile waits no longer than a decode step may take."""
    if not active():
        return
    _absorb(_executor.run_pass(None, stop_after_s=config.current().tpot_slo))
    emit(scheduler)


def emit(scheduler) -> None:
    """Emits the BE tokens of the last pass as SGLang emits decode tokens
    (``process_batch_result_decode``): output ids, finish state, KV release, streaming."""
    global _tokens, _failed
    from http import HTTPStatus

    from sglang.srt.managers.schedule_batch import FINISH_ABORT
    from sglang.srt.mem_cache.common import release_kv_cache

    tokens, _tokens = _tokens, []
    failed, _failed = _failed, []
    for rid, why in failed:  # the executor dropped them (and their pages)
        req = _owned.get(rid)
        if req is not None and not req.finished():
            req.to_finish = FINISH_ABORT(why, HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailable")
            _finish_now(scheduler, req)

    reqs = []
    for rid, tok in tokens:
        req = _owned.get(rid)
        if req is None or req.finished():
            continue
        req.time_stats.set_last_decode_finish_time()
        req.kv.kv_allocated_len += 1  # the pass's input token now has KV (in the BE KV pool)
        req.kv.kv_committed_len += 1
        req.output_ids.append(tok)
        req.update_finish_state(1)
        if req.finished():
            release_kv_cache(req, scheduler.tree_cache, checkpoint=True)
            req.time_stats.set_completion_time()
        reqs.append(req)
    live = [r for r in reqs if not r.finished()]
    relay_last_tokens(scheduler, live)
    _refresh_lengths(scheduler.running_batch, live)
    scheduler.output_streamer.stream_output(reqs, False)


def _refresh_lengths(batch, reqs) -> None:
    """Sets the sequence lengths of ``reqs``' rows in ``batch`` (if there) to what they hold now:
    a BE request's row that sat in the running batch while the executor decoded it (no decode step
    of SGLang grew it) would otherwise be decoded at a stale position after a move back to the GPU."""
    want = {id(r) for r in reqs}
    rows = [i for i, r in enumerate(batch.reqs) if id(r) in want]
    if not rows or batch.seq_lens is None:
        return
    lens = [len(batch.reqs[i].origin_input_ids) + len(batch.reqs[i].output_ids) - 1 for i in rows]
    for name in ("seq_lens", "seq_lens_cpu", "orig_seq_lens"):
        t = getattr(batch, name, None)
        if t is not None:
            t[torch.tensor(rows, device=t.device)] = torch.tensor(lens, dtype=t.dtype, device=t.device)
    batch.seq_lens_sum = int(batch.seq_lens_cpu.sum()) if batch.seq_lens_cpu is not None else int(batch.seq_lens.sum())


def relay_last_tokens(scheduler, reqs) -> None:
    """Puts each request's last token where SGLang's next decode step reads its input (the
    ``FutureMap`` slot of its ``req_pool_idx``), as for requests that join decoding from outside the
    batch: a request that moves back to the GPU decodes from its newest token."""
    if not reqs:
        return
    from sglang.srt.managers.overlap_utils import RelayPayload

    device = scheduler.device
    idx = torch.tensor([r.kv.req_pool_idx for r in reqs], dtype=torch.int64, device=device)
    last = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.int64, device=device)
    scheduler.future_map.stash(idx, RelayPayload(bonus_tokens=last))
