"""omniserve configuration: one frozen dataclass, carried to SGLang's child processes in an
environment variable (children are started with ``spawn``; module globals do not cross, the
environment does)."""

from __future__ import annotations

import dataclasses
import math
import os

import orjson

ENV_VAR = "OMNISERVE_CONFIG"
# How long the worker (after a job) and the scheduler (waiting for one) busy-poll shared memory when
# the worker has cores of its own: benchmarks/results/cpu_attention.md measures the per-layer
# hand-off at about 30-60 us this way against about 250 us blocking on ZeroMQ, and a polling worker
# that shares its cores with the forward nearly doubles each layer's time.
SPIN_US = 2000.0
# Cores left to SGLang's own processes on a GPU server before the worker gets the rest: the
# scheduler (its event loop polls), the tokenizer manager and the detokenizer.
SGLANG_HOST_CORES = 3


def parse_cores(spec: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``. Raises ValueError on a malformed list."""
    cores: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad CPU core list {spec!r}: expected e.g. '0-3,6'") from None
        if a < 0 or b < a:
            raise ValueError(f"bad CPU core range {part!r} in {spec!r}")
        cores.extend(range(a, b + 1))
    if not cores:
        raise ValueError(f"empty CPU core list {spec!r}")
    return cores


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """Where the CPU attention worker runs and how the per-layer hand-off waits.

    Attributes:
        threads: kernel threads.
        cores: cores the worker is pinned to (``"4-7"``), or ``None`` (it shares every core).
        spin_us: busy-poll window, us (0: block on ZeroMQ).
        why: one line for the start-up log.
    """

    threads: int
    cores: str | None
    spin_us: float
    why: str


@dataclasses.dataclass(frozen=True)
class OmniServeConfig:
    """What ``--omniserve*`` asked for.

    Attributes:
        enabled: ``--omniserve``; without it the package changes nothing.
        cpu_kv_gb: size of the BE KV pool in host memory, GiB (``--omniserve-cpu-kv-gb``).
        cpu_threads: OpenMP threads of the CPU attention worker, >= 1; ``None``: see :meth:`worker_setup`.
        cpu_cores: cores the worker's threads are pinned to, e.g. ``"4-7"`` (``None``: see
            :meth:`worker_setup`).
        page_size: tokens per page of the BE KV pool (``--omniserve-cpu-page-size``), >= 1.
        cpu_attention: ``"kernel"`` (omniserve's AVX-512 decode kernel) or ``"sdpa"`` (torch SDPA
            per request, the exact math of SGLang's torch_native backend; slower).
        metrics: export omniserve's Prometheus metrics (SGLang's ``--enable-metrics``).
        cpu_spin_us: microseconds the worker (after a job) and the scheduler (waiting for one,
            beyond twice the previous job's kernel time) busy-poll shared memory before blocking
            on ZeroMQ; ``None`` = ``SPIN_US`` when the worker has cores of its own, else 0 (see
            :meth:`worker_setup`).
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
        mode: ``"async"`` (asynchronous piggybacking: offloaded BE rows cross GPU passes as their
            CPU attention comes back, the GPU never waits) or ``"sync"`` (offloaded BE rows join
            whole decode steps, the step waits for the worker at each layer) (``--omniserve-mode``).
    """

    enabled: bool = False
    cpu_kv_gb: float = 4.0
    cpu_threads: int | None = None
    cpu_cores: str | None = None
    page_size: int = 64
    cpu_attention: str = "kernel"
    metrics: bool = False
    cpu_spin_us: float | None = None
    cpu_job_timeout: float | None = None
    profile_path: str | None = None
    control: bool = True
    ttft_slo: float = 2.0
    tpot_slo: float = 0.2
    ls_admission: str = "queue"
    be_placement: str = "auto"
    mode: str = "sync"

    def __post_init__(self):
        if not self.cpu_kv_gb > 0:
            raise ValueError(f"--omniserve-cpu-kv-gb must be > 0, got {self.cpu_kv_gb}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--omniserve-cpu-threads must be >= 1, got {self.cpu_threads}")
        if self.page_size < 1:
            raise ValueError(f"--omniserve-cpu-page-size must be >= 1, got {self.page_size}")
        if self.cpu_spin_us is not None and not self.cpu_spin_us >= 0:
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
        if self.mode not in ("async", "sync"):
            raise ValueError(f"--omniserve-mode must be async or sync, got {self.mode!r}")
        if self.cpu_attention not in ("kernel", "sdpa"):
            raise ValueError(f"--omniserve-cpu-attention must be kernel or sdpa, got {self.cpu_attention!r}")

    def worker_setup(self, device: str, affinity: list[int] | None = None) -> WorkerSetup:
        """The CPU attention worker's cores, threads and hand-off for a scheduler on ``device``.

        - ``--omniserve-cpu-cores`` given: the worker runs there (one thread per core unless
          ``--omniserve-cpu-threads``) and busy-polls (``SPIN_US``): the user gave it cores of its own.
        - A CUDA device: SGLang's processes keep the first ``SGLANG_HOST_CORES`` cores of
          ``affinity`` (default: this process's) and the worker gets the rest, busy-polling; with
          no core left, as on the CPU device. (``--omniserve`` runs without tensor parallelism.)
        - The CPU device (SGLang's forward runs its threads on every core): the worker shares the
          cores with half as many threads and blocks on ZeroMQ between jobs, since polling there
          would take cores from the forward (benchmarks/results/cpu_attention.md).

        ``--omniserve-cpu-spin-us`` and ``--omniserve-cpu-threads``, when given, win in every case.

        Raises:
            ValueError: a malformed ``--omniserve-cpu-cores``.
        """
        cores = sorted(os.sched_getaffinity(0) if affinity is None else affinity)
        own: list[int] = []
        if self.cpu_cores:
            own, why = parse_cores(self.cpu_cores), "on --omniserve-cpu-cores"
        elif device.startswith("cuda"):
            own = cores[SGLANG_HOST_CORES:]
            why = (f"on cores of its own ({len(cores)} cores, {SGLANG_HOST_CORES} left to SGLang)" if own
                   else f"sharing the cores (only {len(cores)}: none to spare beside SGLang's processes)")
        else:
            why = f"sharing the cores with SGLang's {device} forward"
        spin = self.cpu_spin_us if self.cpu_spin_us is not None else (SPIN_US if own else 0.0)
        threads = self.cpu_threads or (len(own) if own else max(1, len(cores) // 2))
        spec = ",".join(map(str, own)) if own and not self.cpu_cores else self.cpu_cores
        mode = f"busy-polls {spin:.0f} us" if spin else "blocks on ZeroMQ"
        return WorkerSetup(threads, spec, spin, f"{why}; {mode} between jobs")

    @property
    def plans_every_step(self) -> bool:
        """Whether the SLO controller must plan every step, LS traffic alone included: only to
        refuse LS requests at admission (``--omniserve-ls-admission reject``). Otherwise the BE path,
        and with it SGLang's synchronous loop, is on only while a BE request is in the server
        (:mod:`omniserve_sgl.sglang_glue.mode`)."""
        return self.control and self.ls_admission == "reject"

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
