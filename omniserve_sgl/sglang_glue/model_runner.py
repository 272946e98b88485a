"""Model-runner hooks: start the BE runtime, split the attention backend, and load or profile the
latency model."""

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


def init_cuda_graphs(_result, model_runner, *args, **kwargs) -> None:
    """AFTER ``ModelRunner.init_cuda_graphs`` (the model runner can run a forward from here on, and
    the scheduler holds no request yet): loads or profiles the latency model (once).

    Raises:
        ValueError: ``--omniserve-profile`` names an unusable file; the server stops.
    """
    if scheduler.latency_model() is None:
        scheduler.load_latency_model(model_runner)
