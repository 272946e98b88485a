"""Prometheus metrics of the BE path, exported through SGLang's ``/metrics`` (``--enable-metrics``).

They live in the scheduler process; SGLang runs prometheus_client in multiprocess mode, so values
written here show up in the main process's ``/metrics``. Per-class TTFT/TPOT are SGLang's own
histograms with the custom label ``omniserve_class`` (set by the tokenizer hook).
"""

from __future__ import annotations

from omniserve_sgl.control.online import STEP_KINDS


class BEMetrics:
    """``omniserve_cpu_attention_tokens_total`` (counter: token-layer attentions computed by the CPU
    worker), ``omniserve_worker_restarts_total`` (counter: workers started to replace one that
    exited or hung), ``omniserve_be_pool_pages_{used,reserved,capacity}`` and
    ``omniserve_be_waiting_requests`` (BE requests queued for admission: the BE KV pool is full,
    or another BE request takes this prefill batch's one BE slot), ``omniserve_be_parked_requests``
    (BE requests held in LS mode until the SLO controller has slack for them), and, with a latency model
    loaded (``--omniserve-profile``), ``omniserve_step_time_prediction_error`` (histogram of
    ``|predicted - measured| / measured`` per prefill or decode step) and
    ``omniserve_step_seconds_total{kind}`` / ``omniserve_step_profiled_seconds_total{kind}`` (the
    steps' measured time and the profile's prediction of it, before the online correction, per step
    kind ``prefill``, ``decode`` or ``decode+cpu``: their ratio is how much slower steps run while
    serving than the idle profile measured); with the SLO controller,
    ``omniserve_ls_rejected_total`` (LS requests refused by ``--omniserve-ls-admission reject``),
    ``omniserve_be_rows_deferred_total`` (BE decode rows that sat out a step: no slack),
    ``omniserve_be_prefill_yields_total`` (BE prompts being prefilled in chunks that yielded to an
    LS prompt; each resumes from the chunks it had), ``omniserve_mixed_steps_total`` (prefill steps
    that also decoded the running rows: mixed chunked prefill under the SLO controller),
    ``omniserve_be_moves_total{direction="to_cpu"|"to_gpu"}`` (BE KV moves between the GPU KV cache
    and the BE KV pool) and ``omniserve_be_requests{placement="gpu"|"cpu"}`` (running BE requests
    by where their KV lives); ``omniserve_mode_switches_total{to="be"|"ls"}`` (the scheduler's
    switches between LS mode and BE mode, :mod:`omniserve_sgl.sglang_glue.mode`) and
    ``omniserve_overlap_schedule`` (1 while SGLang's overlap loop runs); with asynchronous
    piggybacking, ``omniserve_piggybacked_rows_total`` (BE rows that joined a pass after a layer's
    attention, summed over layers), ``omniserve_ls_pass_waits_total`` (passes with LS rows that
    waited for the CPU worker: 0) and ``omniserve_residual_store_bytes`` (residuals held for BE
    tokens between two layers)."""

    ERROR_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0, 2.0)

    def __init__(self):
        # Imported here: prometheus_client must be first imported after PROMETHEUS_MULTIPROC_DIR is set.
        from prometheus_client import Counter, Gauge, Histogram

        self.cpu_attention_tokens = Counter(
            "omniserve_cpu_attention_tokens", "Token-layer attentions computed by the CPU attention worker")
        self.worker_restarts = Counter(
            "omniserve_worker_restarts", "CPU attention workers started to replace one that exited or hung")
        gauge = {"multiprocess_mode": "mostrecent"}
        self.pages_used = Gauge("omniserve_be_pool_pages_used", "BE KV pool pages holding KV", **gauge)
        self.pages_reserved = Gauge("omniserve_be_pool_pages_reserved",
                                    "BE KV pool pages reserved for admitted BE requests' future tokens", **gauge)
        self.pages_capacity = Gauge("omniserve_be_pool_pages_capacity", "BE KV pool size in pages", **gauge)
        self.waiting = Gauge("omniserve_be_waiting_requests",
                             "BE requests queued for admission (BE KV pool full, or one BE prefill per batch)", **gauge)
        self.parked = Gauge("omniserve_be_parked_requests", "BE requests parked in LS mode until the SLO "
                            "controller has slack to prefill them (outside SGLang's waiting queue)", **gauge)
        self.prediction_error = Histogram(
            "omniserve_step_time_prediction_error",
            "Relative error of the latency model's step time prediction, |predicted - measured| / measured",
            buckets=self.ERROR_BUCKETS)
        # Their ratio per kind is how much slower the served steps ran than the profile measured them
        # idle (benchmarks/sim_validate.py prices the simulated steps with it).
        self.step_seconds = Counter("omniserve_step_seconds", "Measured wall time of the controlled steps, by "
                                    "step kind (prefill, decode, decode+cpu)", ["kind"])
        self.step_profiled_seconds = Counter(
            "omniserve_step_profiled_seconds", "The latency profile's prediction of the same steps, before the "
            "online correction, by step kind", ["kind"])
        self.ls_rejected = Counter("omniserve_ls_rejected",
                                   "LS requests rejected at admission: predicted TTFT over the TTFT SLO")
        self.be_rows_deferred = Counter("omniserve_be_rows_deferred",
                                        "BE decode rows that sat out a decode step (no SLO slack for them)")
        self.be_prefill_yields = Counter("omniserve_be_prefill_yields", "BE prompts being prefilled in chunks "
                                         "that yielded to an LS prompt (each resumes from the chunks it had)")
        self.mixed_steps = Counter("omniserve_mixed_steps", "Prefill steps that also decoded the running rows "
                                   "(a prefill chunk and the decode rows in one step)")
        self.be_moves = Counter("omniserve_be_moves", "BE requests whose KV moved between the GPU KV cache and "
                                "the BE KV pool", ["direction"])
        self.be_requests = Gauge("omniserve_be_requests", "Running BE requests by where their KV lives",
                                 ["placement"], **gauge)
        self.mode_switches = Counter("omniserve_mode_switches", "Switches of the scheduler between LS mode (SGLang "
                                     "alone, its overlap schedule) and BE mode (the BE path on)", ["to"])
        self.overlap_schedule = Gauge("omniserve_overlap_schedule", "1 while the scheduler runs SGLang's overlap "
                                      "loop, 0 in its synchronous loop", **gauge)
        self.piggybacked_rows = Counter("omniserve_piggybacked_rows", "BE rows that joined a GPU pass after a "
                                        "layer's attention, summed over layers (asynchronous piggybacking)")
        self.ls_pass_waits = Counter("omniserve_ls_pass_waits", "GPU passes with LS rows that waited for the CPU "
                                     "attention worker (asynchronous piggybacking: none)")
        self.residual_store_bytes = Gauge("omniserve_residual_store_bytes", "Residual-stream bytes held for BE "
                                          "tokens between two layers (asynchronous piggybacking)", **gauge)
        self.ls_pass_waits.inc(0)
        self.be_prefill_yields.inc(0)
        self.mixed_steps.inc(0)
        self.parked.set(0)
        for placement in ("gpu", "cpu"):
            self.be_requests.labels(placement=placement).set(0)
        for kind in STEP_KINDS:
            self.step_seconds.labels(kind=kind).inc(0)
            self.step_profiled_seconds.labels(kind=kind).inc(0)
        for direction in ("to_cpu", "to_gpu"):
            self.be_moves.labels(direction=direction).inc(0)
        self._counted = self._restarts = 0

    def update(self, runtime, waiting: int | None = None) -> None:
        """Publishes ``runtime``'s counters and pool occupancy (``waiting`` when known)."""
        self.cpu_attention_tokens.inc(runtime.attention_tokens - self._counted)
        self._counted = runtime.attention_tokens
        self.worker_restarts.inc(runtime.worker_restarts - self._restarts)
        self._restarts = runtime.worker_restarts
        self.pages_used.set(runtime.pages.used_pages)
        self.pages_reserved.set(runtime.pages.reserved_pages)
        self.pages_capacity.set(runtime.pages.num_pages)
        if waiting is not None:
            self.waiting.set(waiting)
