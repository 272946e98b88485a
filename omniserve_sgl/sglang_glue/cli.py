"""``--omniserve*`` flags on SGLang's command line (hooks on ``ServerArgs``)."""

from __future__ import annotations

import argparse
import logging
import os

from omniserve_sgl.config import ENV_VAR, SPIN_US, OmniServeConfig
from omniserve_sgl.service_class import SERVICE_CLASS_KEY

logger = logging.getLogger(__name__)
_DEFAULTS = OmniServeConfig()


def add_cli_args(_result, parser: argparse.ArgumentParser) -> None:
    """AFTER ``ServerArgs.add_cli_args``: adds the ``omniserve`` argument group (shown in ``--help``)."""
    group = parser.add_argument_group("omniserve", "Serve best-effort (BE) requests with KV and attention "
                                      "on CPU cores (omniserve-sgl).")
    group.add_argument("--omniserve", action="store_true",
                       help="Serve requests marked BE (custom_params omniserve_class=be, or the "
                       "x-omniserve-class header) with their KV cache in host memory and decode "
                       "attention on a CPU worker, batched with LS requests layer by layer.")
    group.add_argument("--omniserve-cpu-kv-gb", type=float, default=_DEFAULTS.cpu_kv_gb,
                       help="Host memory for the BE KV pool, GiB (default %(default)s).")
    group.add_argument("--omniserve-cpu-page-size", type=int, default=_DEFAULTS.page_size,
                       help="Tokens per page of the BE KV pool (default %(default)s, the page size "
                       "benchmarks/results/cpu_attention.md measures best: each page is a jump in memory for the "
                       "CPU kernel, and a larger page wastes more of the pool).")
    group.add_argument("--omniserve-cpu-threads", type=int, default=None,
                       help="Threads of the CPU attention worker (default: one per core of its own, else half "
                       "the cores).")
    group.add_argument("--omniserve-cpu-attention", choices=("kernel", "sdpa"), default=_DEFAULTS.cpu_attention,
                       help="BE decode attention on the CPU worker: omniserve's AVX-512 kernel (default), or "
                       "torch SDPA per request, bit-exact with SGLang's torch_native backend (slower).")
    group.add_argument("--omniserve-cpu-cores", type=str, default=None,
                       help="Pin the CPU attention worker to these cores, e.g. 8-15. Default: on a GPU server, "
                       "every core but the first 3 (left to SGLang's scheduler, tokenizer and detokenizer); on "
                       "the CPU device, no pinning (the forward uses every core).")
    group.add_argument("--omniserve-cpu-spin-us", type=float, default=None,
                       help="Microseconds the CPU worker and the scheduler busy-poll shared memory for each "
                       "other before blocking on ZeroMQ (the scheduler beyond twice the previous job's kernel "
                       f"time). Default: {SPIN_US:.0f} when the worker has cores of its own (about 30-60 us per "
                       "layer hand-off against about 250 blocking), else 0 (polling would take cores from the forward); "
                       "benchmarks/results/cpu_attention.md measures both.")
    group.add_argument("--omniserve-cpu-job-timeout", type=float, default=None,
                       help="Seconds one CPU attention job may take before the worker counts as hung and is "
                       "replaced, its job run again (default: 10x the slowest job so far, at least 2 s).")
    group.add_argument("--omniserve-profile", type=str, default=None, metavar="PATH",
                       help="The latency model of this model on this machine: read from PATH when it exists, "
                       "else profiled at start-up (at most 60 s) and written to PATH; a file made for another "
                       "model, dtype, device or version is refused (default: a file named after this setup in "
                       "$OMNISERVE_CACHE_DIR, else ~/.cache/omniserve-sgl, so a restart does not profile again).")
    group.add_argument("--omniserve-ttft-slo", type=float, default=_DEFAULTS.ttft_slo, metavar="SECONDS",
                       help="Time-to-first-token SLO of LS requests (default %(default)s s); a request may set its "
                       "own in custom_params omniserve_ttft_slo.")
    group.add_argument("--omniserve-tpot-slo", type=float, default=_DEFAULTS.tpot_slo, metavar="SECONDS",
                       help="Time-per-output-token SLO of LS requests (default %(default)s s): BE work runs only in "
                       "the slack it leaves; a request may set its own in custom_params omniserve_tpot_slo.")
    group.add_argument("--omniserve-ls-admission", choices=("queue", "reject"), default=_DEFAULTS.ls_admission,
                       help="An LS request predicted to miss its TTFT SLO: queue it as SGLang does (default), or "
                       "reject it at once with HTTP 503 (behind a router that retries elsewhere; the controller then "
                       "plans every step, so SGLang's overlap schedule is off even without BE requests).")
    group.add_argument("--omniserve-be-placement", choices=("auto", "cpu"), default=_DEFAULTS.be_placement,
                       help="Where BE requests decode: auto (default) keeps them in the GPU KV cache while the LS "
                       "SLOs and GPU KV headroom allow and moves them to the BE KV pool and the CPU worker when "
                       "not; cpu moves every BE request to the BE KV pool after its prefill.")
    group.add_argument("--omniserve-mode", choices=("async", "sync"), default=_DEFAULTS.mode,
                       help="How offloaded BE rows meet the GPU: async (asynchronous piggybacking: a BE token "
                       "crosses GPU passes layer by layer as its CPU attention comes back, and a pass never waits "
                       "for the CPU) or sync (default: BE rows join whole decode steps, which wait for the CPU "
                       "worker at each layer). async needs a Llama-family model; others run sync.")
    group.add_argument("--omniserve-disable-control", action="store_true",
                       help="Turn the SLO controller off: no latency model is profiled, every BE request decodes on "
                       "the CPU worker and joins every decode step.")


# Configurations the first version does not handle: (flag value check, message).
_REFUSED = (
    (lambda a: getattr(a, "tp_size", 1) > 1, "tensor parallelism (--tp-size > 1)"),
    (lambda a: getattr(a, "pp_size", 1) > 1, "pipeline parallelism (--pp-size > 1)"),
    (lambda a: getattr(a, "dp_size", 1) > 1, "data parallelism / DP attention (--dp-size > 1)"),
    (lambda a: getattr(a, "speculative_algorithm", None), "speculative decoding"),
    (lambda a: getattr(a, "enable_mixed_chunk", False),
     "--enable-mixed-chunk (omniserve runs mixed steps itself, step by step under the SLO controller)"),
    (lambda a: getattr(a, "disaggregation_mode", "null") not in (None, "null"), "PD disaggregation"),
)


def from_cli_args(original, cls, args: argparse.Namespace):
    """AROUND ``ServerArgs.from_cli_args``: reads the ``--omniserve*`` flags (which SGLang would
    drop), refuses configurations omniserve does not handle yet, turns the overlap schedule off for
    ``--omniserve-ls-admission reject`` (the controller plans every step), exports the config for the children, then builds
    SGLang's ``ServerArgs`` from the rest.

    Raises:
        SystemExit: an unsupported configuration with ``--omniserve``, or a bad flag value.
    """
    if getattr(args, "omniserve", False):
        try:
            config = OmniServeConfig(True, args.omniserve_cpu_kv_gb, args.omniserve_cpu_threads,
                                     args.omniserve_cpu_cores, page_size=args.omniserve_cpu_page_size,
                                     cpu_attention=args.omniserve_cpu_attention,
                                     metrics=bool(getattr(args, "enable_metrics", False)),
                                     cpu_spin_us=args.omniserve_cpu_spin_us,
                                     cpu_job_timeout=args.omniserve_cpu_job_timeout,
                                     profile_path=args.omniserve_profile,
                                     control=not args.omniserve_disable_control,
                                     ttft_slo=args.omniserve_ttft_slo, tpot_slo=args.omniserve_tpot_slo,
                                     ls_admission=args.omniserve_ls_admission,
                                     be_placement=args.omniserve_be_placement, mode=args.omniserve_mode)
        except ValueError as e:
            raise SystemExit(f"omniserve: {e}") from None
        refused = [what for check, what in _REFUSED if check(args)]
        if refused:
            raise SystemExit(f"omniserve: --omniserve does not support {', '.join(refused)} yet; "
                             "remove these flags or run without --omniserve")
        # SGLang's overlap schedule and CUDA graphs stay as given: the scheduler leaves the overlap
        # loop while BE requests are in the server, and decode passes with BE rows run eagerly
        # (sglang_glue.mode). Refusing LS requests at admission plans every step, in the synchronous loop.
        if config.plans_every_step:
            args.disable_overlap_schedule = True
        if getattr(args, "enable_metrics", False):
            allowed = list(getattr(args, "tokenizer_metrics_allowed_custom_labels", None) or [])
            if SERVICE_CLASS_KEY not in allowed:
                args.tokenizer_metrics_allowed_custom_labels = allowed + [SERVICE_CLASS_KEY]
        config.export()
        logger.info("omniserve enabled: %s", config)
        server_args = original(cls, args)
        _refuse_mla(server_args)
        return server_args
    os.environ.pop(ENV_VAR, None)  # a config inherited from the caller's environment must not turn it on
    return original(cls, args)


def _refuse_mla(server_args) -> None:
    """MLA models (DeepSeek-V2/V3, Kimi, ...) keep one compressed latent per token instead of
    per-head K/V, which the BE KV pool and the CPU kernel do not handle; refused here, before any
    weights load, from SGLang's own reading of the model config (``ModelConfig.attention_arch``)."""
    from sglang.srt.configs.model_config import AttentionArch, ModelConfig

    model_config = ModelConfig.from_server_args(server_args)
    if model_config.attention_arch == AttentionArch.MLA:
        raise SystemExit(f"omniserve: --omniserve does not support MLA models yet "
                         f"({', '.join(model_config.hf_config.architectures or ['this model'])}); "
                         "run this model without --omniserve")
