"""Per-layer LS/BE split of the attention backend (layer-wise batching).

SGLang's model calls ``attn_backend.forward(q, k, v, layer, forward_batch)`` once per layer with
every row of the batch (post-RoPE). In a decode step with offloaded BE rows, the BE rows' q/k/v go
to the CPU attention worker (submitted first, so the CPU works while the GPU does LS attention),
the LS rows go to SGLang's own backend (FlashInfer on a GPU, torch_native on the CPU device) as a
batch of their own, and the two outputs are put back in row order. Everything around attention
(QKV/O projections, MLP, sampling) runs once over all rows, unchanged.
"""

from __future__ import annotations

import types

import torch

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


class _Step:
    """A decode step with BE rows: its plan, its LS view, the row index tensors, and the host buffer
    the worker's output lands in (made at the first layer, reused by the others)."""

    def __init__(self, fb, plan):
        self.fb, self.plan = fb, plan
        be = set(plan.rows)
        ls_rows = [i for i in range(fb.batch_size) if i not in be]
        device = fb.seq_lens.device
        self.be_idx = torch.tensor(plan.rows, dtype=torch.int64, device=device)
        self.ls_idx = torch.tensor(ls_rows, dtype=torch.int64, device=device)
        self.ls_fb = _ls_view(fb, ls_rows) if ls_rows else None
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

    def init_forward_metadata(self, forward_batch):
        plan = scheduler.take_decode_plan() if forward_batch.forward_mode.is_decode() else None
        if plan is None:
            state["step"] = None
            return inner_init(forward_batch)
        step = state["step"] = _Step(forward_batch, plan)
        if step.ls_fb is not None:
            inner_init(step.ls_fb)
        return None

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        step = state["step"]
        if step is None or step.fb is not forward_batch:
            return inner_forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        rt = scheduler.runtime()
        bs, hq, hkv, d = forward_batch.batch_size, layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3, k3, v3 = q.reshape(bs, hq, d), k.reshape(bs, hkv, d), v.reshape(bs, hkv, layer.v_head_dim)
        be = step.be_idx
        job = None if step.be_failed else _be_call(step, rt.submit, step.plan, layer.layer_id, q3[be], k3[be],
                                                      v3[be], layer.scaling)
        out = q.new_empty(bs, hq * layer.v_head_dim)
        if step.ls_fb is not None:
            ls = step.ls_idx
            out[ls] = inner_forward(q3[ls].reshape(len(ls), -1), k3[ls], v3[ls], layer, step.ls_fb,
                                    save_kv_cache, **kwargs).reshape(len(ls), -1)
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
