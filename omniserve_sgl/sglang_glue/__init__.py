"""Everything that touches SGLang's internals lives in this package, so an SGLang upgrade touches
one folder. ``register`` is the ``sglang.srt.plugins`` entry point: SGLang runs it at the start of
every process, before hooks are applied.

Hook map (target -> hook):
  ServerArgs.add_cli_args (AFTER), ServerArgs.from_cli_args (AROUND)       -> cli
  TokenizerManager.generate_request (BEFORE)                             -> tokenizer
  http_server.serve_generate_request (AROUND; the HTTP server's process) -> tokenizer
  ModelRunner.init_attention_backends (AFTER)                            -> start the BE runtime, split attention,
                                                                            the model's decoder body through the
                                                                            piggybacking executor (async mode)
  ModelRunner.init_cuda_graphs (AFTER)                                   -> load or profile the latency model
  DecodeCudaGraphRunner.can_run_graph, CPUGraphRunner.can_run_graph (AFTER) -> eager passes with BE rows
  PrefillCudaGraphRunner.can_run_graph (AFTER)                           -> eager prefill passes BE rows join
  Scheduler.event_loop_overlap (AROUND), ingest_requests (AFTER),
  abort_request (AROUND)                                                 -> mode (LS mode: SGLang alone;
                                                                            BE requests parked without slack)
  Scheduler._create_generation_req (AFTER), run_batch (AROUND: step time against the latency
  model), init_req_max_new_tokens (AFTER),
  Scheduler._get_new_batch_prefill_raw (AROUND),
  SchedulerBatchResultProcessor.process_batch_result_prefill (AFTER),
  alloc_for_decode (AROUND), release_kv_cache (AROUND),
  ScheduleBatch.new_tokens_required_next_decode, _get_decode_retraction_order,
  retract_decode (AROUND)                                                -> scheduler
  Scheduler._should_defer_prefill, update_running_batch (AROUND),
  process_batch_result (AFTER)                                           -> controller
"""

from __future__ import annotations

import logging
import multiprocessing
import pkgutil
import sys

from omniserve_sgl import config

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
_S = "sglang.srt.managers.scheduler.Scheduler"
_B = "sglang.srt.managers.schedule_batch.ScheduleBatch"
_ALWAYS = (
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.ServerArgs.from_cli_args",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request",
)
# Only in the process that runs the HTTP server (SGLang's launcher; its children have a parent).
_HTTP = ("sglang.srt.entrypoints.http_server.serve_generate_request",)
_SERVING = (
    "sglang.srt.model_executor.model_runner.ModelRunner.init_attention_backends",
    "sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs",
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph",
    "sglang.srt.model_executor.cpu_graph_runner.CPUGraphRunner.can_run_graph",
    "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph",
    f"{_S}.event_loop_overlap",
    f"{_S}.ingest_requests",
    f"{_S}.abort_request",
    f"{_S}._create_generation_req",
    f"{_S}.run_batch",
    f"{_S}.init_req_max_new_tokens",
    f"{_S}._get_new_batch_prefill_raw",
    ("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
     ".process_batch_result_prefill"),
    "sglang.srt.mem_cache.allocation.alloc_for_decode",
    "sglang.srt.mem_cache.common.release_kv_cache",
    f"{_B}.new_tokens_required_next_decode",
    f"{_B}._get_decode_retraction_order",
    f"{_B}.retract_decode",
    f"{_S}._should_defer_prefill",
    f"{_S}.update_running_batch",
    f"{_S}.process_batch_result",
)


def missing_targets(targets) -> list[str]:
    """The dotted hook targets that do not resolve in the installed SGLang."""
    missing = []
    for target in targets:
        obj_path, attr = target.rsplit(".", 1)
        try:
            if not hasattr(pkgutil.resolve_name(obj_path), attr):
                missing.append(target)
        except (ImportError, AttributeError, ValueError):
            missing.append(target)
    return missing


def _check(targets, requested: bool) -> bool:
    missing = missing_targets(targets)
    if not missing:
        return True
    import sglang

    msg = (f"omniserve-sgl needs SGLang {SGLANG_VERSION}, found {sglang.__version__}: these hook targets are "
           f"missing: {', '.join(missing)}")
    if requested:
        # SystemExit is not an Exception, so SGLang's plugin loader cannot swallow it.
        raise SystemExit(msg)
    logger.warning("%s; omniserve is unavailable", msg)
    return False


def register() -> None:
    """Registers omniserve's hooks (idempotent; the hooks are inert without ``--omniserve``).

    Raises:
        SystemExit: ``--omniserve`` was asked for and a hook target is missing from the installed
            SGLang (the message names the expected version and the missing targets).
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if getattr(register, "done", False):
        return
    register.done = True
    enabled = config.current().enabled
    if not _check(_ALWAYS, enabled or "--omniserve" in sys.argv):
        return
    from omniserve_sgl.sglang_glue import cli, tokenizer

    HookRegistry.register(_ALWAYS[0], cli.add_cli_args, HookType.AFTER)
    HookRegistry.register(_ALWAYS[1], cli.from_cli_args, HookType.AROUND)
    HookRegistry.register(_ALWAYS[2], tokenizer.generate_request, HookType.BEFORE)
    if multiprocessing.parent_process() is None and _check(_HTTP, enabled):
        HookRegistry.register(_HTTP[0], tokenizer.serve_generate_request, HookType.AROUND)
    if not enabled:  # the main process before argument parsing, or a server without --omniserve
        return
    _check(_SERVING, True)
    from omniserve_sgl.sglang_glue import controller, mode, scheduler
    from omniserve_sgl.sglang_glue.model_runner import (
        eager_for_be_rows,
        eager_prefill_for_be_rows,
        init_attention_backends,
        init_cuda_graphs,
    )

    hooks = (
        (init_attention_backends, HookType.AFTER),
        (init_cuda_graphs, HookType.AFTER),
        (eager_for_be_rows, HookType.AFTER),
        (eager_for_be_rows, HookType.AFTER),
        (eager_prefill_for_be_rows, HookType.AFTER),
        (mode.run_loops, HookType.AROUND),
        (mode.check_switch, HookType.AFTER),
        (mode.abort_request, HookType.AROUND),
        (scheduler.tag_request, HookType.AFTER),
        (scheduler.time_step, HookType.AROUND),
        (scheduler.refuse_oversized_be, HookType.AFTER),
        (scheduler.admit_prefill, HookType.AROUND),
        (scheduler.offload_after_prefill, HookType.AFTER),
        (scheduler.alloc_decode, HookType.AROUND),
        (scheduler.release_kv, HookType.AROUND),
        (scheduler.decode_tokens_needed, HookType.AROUND),
        (scheduler.retraction_order, HookType.AROUND),
        (scheduler.retract_decode, HookType.AROUND),
        (controller.plan_step, HookType.AROUND),
        (controller.defer_be_rows, HookType.AROUND),
        (controller.merge_deferred, HookType.AFTER),
    )
    for target, (hook, kind) in zip(_SERVING, hooks, strict=True):
        HookRegistry.register(target, hook, kind)
