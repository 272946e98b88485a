"""omniserve configuration: one frozen dataclass, carried to SGLang's child processes in an
environment variable (children are started with ``spawn``; module globals do not cross, the
environment does)."""

from __future__ import annotations

import dataclasses
import math
import os

import orjson

ENV_VAR = "OMNISERVE_CONFIG"


@dataclasses.dataclass(frozen=True)
class OmniServeConfig:
    """What ``--omniserve*`` asked for.

    Attributes:
        enabled: ``--omniserve``; without it the package changes nothing.
        cpu_kv_gb: size of the BE KV pool in host memory, GiB (``--omniserve-cpu-kv-gb``).
        cpu_threads: OpenMP threads of the CPU attention worker; ``None`` = half the cores, >= 1.
        cpu_cores: cores the worker's threads are pinned to, e.g. ``"4-7"`` (``None`` = no pinning).
        page_size: tokens per page of the BE KV pool (``--omniserve-cpu-page-size``), >= 1.
        cpu_attention: ``"kernel"`` (omniserve's AVX-512 decode kernel) or ``"sdpa"`` (torch SDPA
            per request, the exact math of SGLang's torch_native backend; slower).
        metrics: export omniserve's Prometheus metrics (SGLang's ``--enable-metrics``).
        cpu_spin_us: microseconds the worker (after a job) and the scheduler (waiting for one,
            beyond twice the previous job's kernel time) busy-poll shared memory before blocking
            on ZeroMQ; for workers on cores of their own.
        cpu_job_timeout: seconds a CPU attention job may take before its worker counts as hung
            and is replaced (``--omniserve-cpu-job-timeout``); ``None`` = 10x the slowest job
            seen so far, and at least 2 s.
        profile_path: the latency model's file (``--omniserve-profile``): read when it exists,
            else profiled at start-up and written there; ``None`` = a file in the profile cache
            (``$OMNISERVE_CACHE_DIR``, default ``~/.cache/omniserve-sgl``) named after the setup.
        control: run the SLO controller (``--omniserve-disable-control`` turns it off: BE work then
            joins every step, as without a latency model).
        ttft_slo / tpot_slo: the LS SLOs, s (``--omniserve-ttft-slo``, ``--omniserve-tpot-slo``);
            a request may set tighter or looser ones of its own.
        ls_admission: ``"queue"`` or ``"reject"`` (``--omniserve-ls-admission``).
        be_placement: ``"auto"`` or ``"cpu"`` (``--omniserve-be-placement``).
    """

    enabled: bool = False
    cpu_kv_gb: float = 4.0
    cpu_threads: int | None = None
    cpu_cores: str | None = None
    page_size: int = 16
    cpu_attention: str = "kernel"
    metrics: bool = False
    cpu_spin_us: float = 0.0
    cpu_job_timeout: float | None = None
    profile_path: str | None = None
    control: bool = True
    ttft_slo: float = 2.0
    tpot_slo: float = 0.2
    ls_admission: str = "queue"
    be_placement: str = "auto"

    def __post_init__(self):
        if not self.cpu_kv_gb > 0:
            raise ValueError(f"--omniserve-cpu-kv-gb must be > 0, got {self.cpu_kv_gb}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--omniserve-cpu-threads must be >= 1, got {self.cpu_threads}")
        if self.page_size < 1:
            raise ValueError(f"--omniserve-cpu-page-size must be >= 1, got {self.page_size}")
        if not self.cpu_spin_us >= 0:
            raise ValueError(f"--omniserve-cpu-spin-us must be >= 0, got {self.cpu_spin_us}")
        if self.cpu_job_timeout is not None and not self.cpu_job_timeout > 0:
            raise ValueError(f"--omniserve-cpu-job-timeout must be > 0 seconds, got {self.cpu_job_timeout}")
        for flag, value in (("--omniserve-ttft-slo", self.ttft_slo), ("--omniserve-tpot-slo", self.tpot_slo)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
        if self.ls_admission not in ("queue", "reject"):
            raise ValueError(f"--omniserve-ls-admission must be queue or reject, got {self.ls_admission!r}")
        if self.be_placement not in ("auto", "cpu"):
            raise ValueError(f"--omniserve-be-placement must be auto or cpu, got {self.be_placement!r}")
        if self.cpu_attention not in ("kernel", "sdpa"):
            raise ValueError(f"--omniserve-cpu-attention must be kernel or sdpa, got {self.cpu_attention!r}")

    @property
    def worker_threads(self) -> int:
        return self.cpu_threads or max(1, (os.cpu_count() or 2) // 2)

    @property
    def cpu_kv_bytes(self) -> int:
        return int(self.cpu_kv_gb * (1 << 30))

    def export(self) -> None:
        """Publishes this config to child processes started from now on."""
        os.environ[ENV_VAR] = orjson.dumps(dataclasses.asdict(self)).decode()


def current() -> OmniServeConfig:
    """The config of this process tree (disabled when ``--omniserve`` was not given)."""
    raw = os.environ.get(ENV_VAR)
    return OmniServeConfig(**orjson.loads(raw)) if raw else OmniServeConfig()
