"""Model-runner hook: start the BE runtime and split the attention backend."""

from __future__ import annotations

from omniserve_sgl.sglang_glue import attention, scheduler


def init_attention_backends(_result, model_runner) -> None:
    """AFTER ``ModelRunner.init_attention_backends``: creates this scheduler's BE KV pool and CPU
    attention worker (once) and wraps the published attention backend with the LS/BE split.

    Raises:
        RuntimeError: the worker did not start; the server stops.
    """
    if scheduler.runtime() is None:
        scheduler.start_runtime(model_runner)
    attention.install(model_runner.attn_backend)
