"""Model-runner hooks: start the BE runtime, split the attention backend, load or profile the
latency model, and run decode passes with BE rows eagerly (graphs stay on for the others)."""

from __future__ import annotations

from omniserve_sgl.sglang_glue import attention, piggyback, scheduler


def init_attention_backends(_result, model_runner) -> None:
    """AFTER ``ModelRunner.init_attention_backends``: creates this scheduler's BE KV pool and CPU
    attention worker (once; with ``--omniserve-mode async`` also the piggybacking executor over the
    model, :mod:`omniserve_sgl.sglang_glue.piggyback`) and wraps the published attention backend
    with the LS/BE split.

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


def eager_for_be_rows(result, _runner, _forward_batch):
    """AFTER ``DecodeCudaGraphRunner.can_run_graph`` and ``CPUGraphRunner.can_run_graph``: a decode
    pass whose BE rows attend on the CPU worker runs eagerly (its attention is split per layer in
    Python, :mod:`omniserve_sgl.sglang_glue.attention`), and so does a pass the piggybacking
    executor has BE work for (:mod:`omniserve_sgl.sglang_glue.piggyback`: a token to enter, a
    row to join, a CPU job back); every other pass keeps SGLang's graphs."""
    return False if result and (scheduler.decode_plan_pending() or piggyback.wants_pass()) else None


def eager_prefill_for_be_rows(result, _runner, _forward_batch):
    """AFTER ``PrefillCudaGraphRunner.can_run_graph`` (SGLang's breakable prefill graphs, on by
    default on CUDA, replay the decoder body without running its Python): a prefill pass the
    piggybacking executor has BE work for runs eagerly, so BE rows join it as they join a decode
    pass; every other prefill pass keeps SGLang's graph."""
    return False if result and piggyback.wants_pass() else None
