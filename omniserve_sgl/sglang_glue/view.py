"""SGLang's scheduler state as the SLO controller sees it (``omniserve_sgl.control``): the
translation runs here, the controller never imports SGLang."""

from __future__ import annotations

from omniserve_sgl.be_runtime import BERuntime
from omniserve_sgl.control import StepShape


def step_shape(batch, runtime: BERuntime, num_layers: int, offloaded) -> StepShape | None:
    """The latency model's view of a ``ScheduleBatch`` about to run: a prefill (EXTEND) batch's
    chunk tokens and attention work, or a decode batch's rows, GPU context and the CPU worker's
    reads for its offloaded BE rows (``offloaded(req)``); ``None`` for other forward modes (idle,
    mixed, speculative), which the model does not cover.
    """
    mode = batch.forward_mode
    if mode.is_extend() and not mode.is_mixed():
        pairs = list(zip(batch.extend_lens, batch.prefix_lens, strict=True))
        return StepShape(tokens=sum(e for e, _ in pairs), prefill_attn_work=float(sum(e * (p + e) for e, p in pairs)),
                         prefill_context=sum(p + e for e, p in pairs))
    if not mode.is_decode():
        return None
    cpu_ctx = sum(r.seqlen for r in batch.reqs if offloaded(r))
    gpu_ctx = sum(r.seqlen for r in batch.reqs if not offloaded(r))
    return StepShape(tokens=len(batch.reqs), decode_context=gpu_ctx, decode_rows=len(batch.reqs),
                     cpu_kv_bytes=float(cpu_ctx * runtime.kv_bytes_per_token_layer * num_layers),
                     cpu_jobs=num_layers if cpu_ctx else 0)
