"""SGLang's scheduler state as the SLO controller sees it (``omniserve_sgl.control``): the
translation runs here, the controller never imports SGLang."""

from __future__ import annotations

import dataclasses

from omniserve_sgl.be_runtime import BERuntime
from omniserve_sgl.control import StepShape


def step_shape(batch, runtime: BERuntime, num_layers: int, offloaded) -> StepShape | None:
    """The latency model's view of a ``ScheduleBatch`` about to run: a prefill (EXTEND) batch's
    chunk tokens and attention work, a decode batch's rows, GPU context and the CPU worker's reads
    for its offloaded BE rows (``offloaded(req)``), or both for a mixed batch (prefill requests,
    then its ``decoding_reqs``); ``None`` for other forward modes (idle, speculative), which the
    model does not cover.
    """
    mode = batch.forward_mode
    if mode.is_decode():
        return _decode_shape(batch.reqs, runtime, num_layers, offloaded)
    if not mode.is_extend():
        return None
    tail = len(batch.decoding_reqs or ()) if mode.is_mixed() else 0
    n = len(batch.extend_lens) - tail
    pairs = list(zip(batch.extend_lens[:n], batch.prefix_lens[:n], strict=True))
    prefill = StepShape(tokens=sum(e for e, _ in pairs), prefill_attn_work=float(sum(e * (p + e) for e, p in pairs)),
                        prefill_context=sum(p + e for e, p in pairs))
    if not tail:
        return prefill
    d = _decode_shape(batch.reqs[-tail:], runtime, num_layers, offloaded)
    return dataclasses.replace(d, tokens=d.tokens + prefill.tokens, prefill_attn_work=prefill.prefill_attn_work,
                               prefill_context=prefill.prefill_context)


def _decode_shape(reqs, runtime: BERuntime, num_layers: int, offloaded) -> StepShape:
    cpu_ctx = sum(r.seqlen for r in reqs if offloaded(r))
    gpu_ctx = sum(r.seqlen for r in reqs if not offloaded(r))
    return StepShape(tokens=len(reqs), decode_context=gpu_ctx, decode_rows=len(reqs),
                     cpu_kv_bytes=float(cpu_ctx * runtime.kv_bytes_per_token_layer * num_layers),
                     cpu_jobs=num_layers if cpu_ctx else 0)
