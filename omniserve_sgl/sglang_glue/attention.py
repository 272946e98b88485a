"""Per-layer LS/BE split of the attention backend (layer-wise batching).

SGLang's model calls ``attn_backend.forward(q, k, v, layer, forward_batch)`` once per layer with
every row of the batch (post-RoPE). In a decode step with offloaded BE rows, the BE rows' q/k/v go
to the CPU attention worker (submitted first, so the CPU works while the GPU does LS attention),
the LS rows go to SGLang's own backend (FlashInfer on a GPU, torch_native on the CPU device) as a
batch of their own, and the two outputs are put back in row order. Everything around attention
(QKV/O projections, MLP, sampling) runs once over all rows, unchanged.

A mixed step (SGLang's mixed chunked prefill: prefill chunks, then the decode rows as one-token
extends) is split the same way: its offloaded BE rows go to the worker and the rest to SGLang's
backend as one extend batch. On backends whose extend attends over the whole sequence for every
row (torch_native: a decode row would pay ``(context + 1)^2`` for one token), the decode rows also
go to the backend's decode path, as in a decode step.
"""

from __future__ import annotations

import types

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from omniserve_sgl.be_runtime import BEUnavailableError
from omniserve_sgl.sglang_glue import scheduler
from omniserve_sgl.sglang_glue.rows import select_rows

# ForwardBatch fields with one entry per row in a decode step; the LS view slices them.
_ROW_TENSORS = ("input_ids", "req_pool_indices", "seq_lens", "out_cache_loc", "orig_seq_lens", "positions",
                "seq_lens_cpu", "req_pool_indices_cpu")


def _ls_view(fb, ls_rows: list[int]):
    """The decode ForwardBatch ``fb`` restricted to rows ``ls_rows`` (a shallow copy)."""
    ls = select_rows(fb, ls_rows, _ROW_TENSORS, ("rids",))
    ls.batch_size = len(ls_rows)
    ls.seq_lens_sum = int(ls.seq_lens_cpu.sum()) if ls.seq_lens_cpu is not None else int(ls.seq_lens.sum())
    return ls


# Per-request and per-token ForwardBatch fields of an extend (or mixed) step.
_REQ_TENSORS = ("req_pool_indices", "seq_lens", "orig_seq_lens", "seq_lens_cpu", "req_pool_indices_cpu",
                "extend_seq_lens", "extend_prefix_lens")
_REQ_LISTS = ("rids", "extend_seq_lens_cpu", "extend_prefix_lens_cpu", "extend_logprob_start_lens_cpu")
_TOKEN_TENSORS = ("input_ids", "positions", "out_cache_loc")


def _extend_view(fb, rows: list[int], tokens: torch.Tensor, mode=None):
    """The extend ForwardBatch ``fb`` restricted to requests ``rows`` and their ``tokens`` (a
    shallow copy), as a batch of ``mode`` (default: ``fb``'s)."""
    view = select_rows(fb, rows, _REQ_TENSORS, _REQ_LISTS)
    for name in _TOKEN_TENSORS:
        t = getattr(fb, name, None)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            setattr(view, name, t[tokens.to(t.device)])
    view.batch_size = len(rows)
    view.seq_lens_sum = int(view.seq_lens_cpu.sum()) if view.seq_lens_cpu is not None else int(view.seq_lens.sum())
    if view.extend_seq_lens is not None:
        view.extend_num_tokens = int(view.extend_seq_lens.sum())
        view.extend_start_loc = torch.cumsum(view.extend_seq_lens, 0) - view.extend_seq_lens
    if mode is not None:
        view.forward_mode = mode
    return view


class _MixedStep:
    """A mixed step: prefill requests, then ``tail`` decode rows of one token each (SGLang's
    ``ScheduleBatch.mix_with_running``), of which ``plan`` (if any) holds the offloaded BE rows
    (their indices among the decode rows). ``parts``: (token indices, ForwardBatch view) for
    SGLang's backend."""

    def __init__(self, fb, plan, tail: int, split_decode: bool):
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        self.fb, self.plan = fb, plan
        n_ext = fb.batch_size - tail
        ext_tokens = sum(fb.extend_seq_lens_cpu[:n_ext])
        device = fb.seq_lens.device
        cpu = list(plan.rows) if plan is not None else []
        self.be_idx = torch.tensor([ext_tokens + j for j in cpu], dtype=torch.int64, device=device)
        offloaded = set(cpu)
        ls = [j for j in range(tail) if j not in offloaded]

        def part(rows: list[int], tokens: list[int], mode=None):
            idx = torch.tensor(tokens, dtype=torch.int64, device=device)
            return idx, _extend_view(fb, rows, idx, mode)

        if split_decode:
            self.parts = [part(list(range(n_ext)), list(range(ext_tokens)))] if n_ext else []
            if ls:
                self.parts.append(part([n_ext + j for j in ls], [ext_tokens + j for j in ls], ForwardMode.DECODE))
        else:
            self.parts = [part(list(range(n_ext)) + [n_ext + j for j in ls],
                               list(range(ext_tokens)) + [ext_tokens + j for j in ls])]
        self.be_out: torch.Tensor | None = None
        self.be_failed = False


class _Step:
    """A decode step with BE rows: its plan, the BE row indices, ``parts`` (the LS rows' indices
    and ForwardBatch view, for SGLang's backend), and the host buffer the worker's output lands in
    (made at the first layer, reused by the others)."""

    def __init__(self, fb, plan):
        self.fb, self.plan = fb, plan
        be = set(plan.rows)
        ls_rows = [i for i in range(fb.batch_size) if i not in be]
        device = fb.seq_lens.device
        self.be_idx = torch.tensor(plan.rows, dtype=torch.int64, device=device)
        ls_idx = torch.tensor(ls_rows, dtype=torch.int64, device=device)
        self.parts = [(ls_idx, _ls_view(fb, ls_rows))] if ls_rows else []
        self.be_out: torch.Tensor | None = None
        self.be_failed = False  # the worker failed for good: BE rows get zeros, their requests end


def _be_call(step: _Step, fn, *args):
    """``fn(*args)`` on the BE runtime; when the worker has failed for good, the step's BE requests
    are ended and the step goes on for its LS rows."""
    try:
        return fn(*args)
    except BEUnavailableError as e:
        step.be_failed = True
        scheduler.abort_decode_plan(str(e))
        return None


def install(backend) -> None:
    """Wraps ``backend`` (SGLang's published attention backend, one instance) in place: its
    ``init_forward_metadata`` and ``forward`` become split-aware. Instance attributes shadow the
    class's methods, so ``isinstance`` checks and every other attribute stay SGLang's own."""
    if getattr(backend, "_omniserve_installed", False):
        return
    inner_init = backend.init_forward_metadata
    inner_forward = backend.forward
    state = {"step": None}
    split_decode = isinstance(backend, TorchNativeAttnBackend)

    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        # SGLang runs a mixed batch as EXTEND (EagerRunner.execute); the scheduler hook counted its tail.
        tail = scheduler.take_mixed_tail() if mode.is_extend() else 0
        if tail:
            plan = scheduler.take_decode_plan()
            if plan is None and not split_decode:
                state["step"] = None
                return inner_init(forward_batch)
            step = state["step"] = _MixedStep(forward_batch, plan, tail, split_decode)
            for _, view in step.parts:  # torch_native keeps no per-batch metadata; others get one part
                inner_init(view)
            return None
        plan = scheduler.take_decode_plan() if mode.is_decode() else None
        if plan is None:
            state["step"] = None
            return inner_init(forward_batch)
        step = state["step"] = _Step(forward_batch, plan)
        for _, view in step.parts:
            inner_init(view)
        return None

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        step = state["step"]
        if step is None or step.fb is not forward_batch:
            return inner_forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        rt = scheduler.runtime()
        n, hq, hkv, d = q.shape[0], layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3, k3, v3 = q.reshape(n, hq, d), k.reshape(n, hkv, d), v.reshape(n, hkv, layer.v_head_dim)
        be = step.be_idx
        job = None
        if step.plan is not None and not step.be_failed:
            job = _be_call(step, rt.submit, step.plan, layer.layer_id, q3[be], k3[be], v3[be], layer.scaling)
        out = q.new_empty(n, hq * layer.v_head_dim)
        for idx, view in step.parts:
            out[idx] = inner_forward(q3[idx].reshape(len(idx), -1), k3[idx], v3[idx], layer, view,
                                     save_kv_cache, **kwargs).reshape(len(idx), -1)
        if step.plan is None:  # a mixed step without offloaded rows
            return out
        if step.be_out is None:  # on q's device: the result is copied there straight from the pinned slot
            step.be_out = torch.empty(len(be), hq, layer.v_head_dim, dtype=q.dtype, device=q.device)
        if job is not None:
            _be_call(step, rt.wait, job, step.be_out)
        if step.be_failed:
            step.be_out.zero_()
        out[be] = step.be_out.reshape(len(be), -1)
        return out

    backend.init_forward_metadata = types.MethodType(init_forward_metadata, backend)
    backend.forward = types.MethodType(forward, backend)
    backend._omniserve_installed = True
