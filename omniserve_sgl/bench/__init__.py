"""The harness around the runtime, not part of it: start a real SGLang server (``launch``), real
ShareGPT prompts (``workload``), client-side load and its records (``loadgen``), SLO attainment
and throughput from those records (``slo``), and the main job (``demo``)."""
