"""Scheduler-side state of offloaded BE requests: the BE KV pool, its page ledger and the CPU
attention worker, behind the few calls the SGLang glue makes (SGLang-agnostic on purpose: the
asynchronous piggybacking executor will drive the same object).

Life of a BE request here: :meth:`BERuntime.reserve` at admission (pages for its whole length,
so it never stalls mid-decode), :meth:`store_kv` once its prompt's KV exists on the GPU (and
again with the tokens it decoded on the GPU, when it moves here later; :meth:`load_kv` for a move
back),
then per decode step :meth:`plan_decode` and, per layer, :meth:`submit` / :meth:`wait`, and
finally :meth:`release`. The piggybacking executor (:mod:`omniserve_sgl.piggyback`) grows a request
by one token with :meth:`extend`, plans each job's rows with :meth:`plan_rows` and keeps many jobs
in flight, picked up with :meth:`poll` in any order.

Worker faults: the pool is this process's memory (the worker only maps it), so a worker that
exits or hangs loses nothing. :meth:`wait` and :meth:`poll` replace it (a new process mapping the
same pool) and run every job in flight again, in order: appending a token's K/V to its slot twice
writes the same values.
After three starts within a minute BE serving stops (:class:`BEUnavailableError`).
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from omniserve_sgl.config import OmniServeConfig, WorkerSetup
from omniserve_sgl.kv import BEKVPool, BEKVPoolSpec
from omniserve_sgl.worker import CPUAttentionClient, Job, WorkerDiedError, WorkerError

logger = logging.getLogger(__name__)


@dataclass
class DecodePlan:
    """One decode step's BE rows: their ids, their row numbers in the batch, and paged-KV metadata
    over the pool (int32 CPU tensors, counting the token being decoded), reused by every layer."""

    rids: list
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    rows: list = field(default_factory=list)


@dataclass
class PendingJob:
    """One layer's BE attention in flight, with what it takes to run it again on a new worker."""

    plan: DecodePlan
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sm_scale: float
    job: Job | None
    submitted_at: float = 0.0  # time.monotonic() of the latest submission


class BEUnavailableError(RuntimeError):
    """The CPU attention worker failed and could not be replaced; BE serving is off (LS goes on)."""


# A worker that needs more starts than this within RESTART_WINDOW_S is given up on.
MAX_STARTS_PER_WINDOW = 3
RESTART_WINDOW_S = 60.0
MIN_JOB_TIMEOUT_S = 2.0


class BERuntime:
    """Owns the BE KV pool and the CPU attention worker of one scheduler process.

    Args:
        config: the ``--omniserve*`` settings (pool size, worker threads and cores).
        worker: where the worker runs and how it waits (default: ``config.worker_setup("cpu")``).
        num_layers, num_kv_heads, head_dim: KV geometry of the model (this rank's heads).
        num_qo_heads: query heads per layer.
        dtype: KV dtype (the GPU KV cache's), one of bf16/fp16/fp32.
        max_rows: most BE rows in one decode step (SGLang's max running requests).
        staging_slots: jobs in flight at once (2 for the synchronous path; the piggybacking
            executor keeps one per layer and pass in flight).

    Attributes:
        worker_restarts: workers started to replace one that exited or hung.
        unavailable: why BE serving stopped (the worker could not be replaced), else ``None``.

    Raises:
        ValueError: the pool budget is below one page, or an unsupported dtype.
        omniserve_sgl.worker.WorkerDiedError, TimeoutError: the worker did not start.
    """

    def __init__(self, config: OmniServeConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                 num_qo_heads: int, dtype: torch.dtype, max_rows: int, worker: WorkerSetup | None = None,
                 staging_slots: int = 2):
        spec = BEKVPoolSpec.from_budget(config.cpu_kv_bytes, num_layers, num_kv_heads, head_dim,
                                        page_size=config.page_size, dtype=dtype)
        self.config, self.max_rows, self.staging_slots = config, max_rows, staging_slots
        self.worker = worker or config.worker_setup("cpu")
        self.pool = BEKVPool.create(spec)
        self.pages = self.pool.allocator
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.method = config.cpu_attention
        self.attention_tokens = 0  # token-layer attentions computed by the worker
        self.worker_restarts = 0
        self.unavailable: str | None = None
        self._starts: collections.deque[float] = collections.deque()  # monotonic times of recent starts
        self._slowest_kernel_s = 0.0
        self._in_flight: list[PendingJob] = []  # submitted, not yet waited for, in submission order
        self.client: CPUAttentionClient | None = self._start_worker()
        atexit.register(self.close)
        logger.info("omniserve: BE KV pool %.2f GiB (%d pages of %d tokens, %d layers), CPU attention "
                    "worker pid %d with %d threads, %s", spec.total_bytes / (1 << 30), spec.num_pages,
                    spec.page_size, num_layers, self.client.process.pid, self.worker.threads, self.worker.why)

    # worker -------------------------------------------------------------------------------------
    def _start_worker(self) -> CPUAttentionClient:
        """A new worker process with the pool mapped and its staging slots made."""
        w = self.worker
        self._starts.append(time.monotonic())
        client = CPUAttentionClient.start(threads=w.threads, cores=w.cores, spin_us=w.spin_us)
        try:
            client.attach_pool(self.pool)
            client.create_staging(self.staging_slots, self.max_rows, self.pool.spec.num_pages, self.num_qo_heads)
        except BaseException:
            client.kill()
            raise
        return client

    def check_worker(self) -> None:
        """Replaces the worker now if it has exited (a cheap check, for every scheduler step).

        Raises:
            BEUnavailableError: it could not be replaced.
        """
        if self.unavailable is None and self.client is not None and not self.client.alive():
            self._replace_worker("exited")

    def _replace_worker(self, what: str) -> None:
        """Kills the current worker (dead or hung), then starts another, up to
        ``MAX_STARTS_PER_WINDOW`` starts within ``RESTART_WINDOW_S``.

        Raises:
            BEUnavailableError: no worker could be had; :attr:`unavailable` says why.
        """
        if self.unavailable is not None:
            raise BEUnavailableError(self.unavailable)
        ended = self.client.kill()
        reason = f"the CPU attention worker (pid {self.client.process.pid}) {what} ({ended})"
        self.client = None
        while True:
            now = time.monotonic()
            while self._starts and now - self._starts[0] > RESTART_WINDOW_S:
                self._starts.popleft()
            if len(self._starts) >= MAX_STARTS_PER_WINDOW:
                self._in_flight.clear()
                self.unavailable = (f"omniserve: BE serving is off: {reason}, and {len(self._starts)} workers "
                                    f"were started within {RESTART_WINDOW_S:.0f} s")
                logger.error("%s", self.unavailable)
                raise BEUnavailableError(self.unavailable)
            logger.warning("omniserve: %s; starting a new worker", reason)
            try:
                self.client = self._start_worker()
            except (WorkerError, TimeoutError, OSError) as e:
                reason = f"a new CPU attention worker failed to start ({e})"
                continue
            self.worker_restarts += 1
            logger.warning("omniserve: CPU attention worker pid %d ready in %.2f s",
                           self.client.process.pid, time.monotonic() - now)
            return

    def _replace_and_resubmit(self, what: str) -> None:
        """Replaces the worker and submits every job in flight again, in order.

        Raises:
            BEUnavailableError: no worker could be had.
        """
        self._replace_worker(what)
        for p in self._in_flight:
            p.job = self._submit(p)

    def job_timeout(self) -> float:
        """Seconds a job may take before its worker counts as hung (``--omniserve-cpu-job-timeout``,
        else 10x the slowest job so far and at least 2 s)."""
        if self.config.cpu_job_timeout is not None:
            return self.config.cpu_job_timeout
        return max(MIN_JOB_TIMEOUT_S, 10 * self._slowest_kernel_s)

    # admission ----------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    def reserve(self, rid: object, num_tokens: int) -> None:
        """Reserves pool pages for ``rid``'s whole length. Raises BEPoolFullError if they are not free."""
        self.pages.allocate(rid, 0, reserve_tokens=num_tokens)

    def release(self, rid: object) -> None:
        """Frees ``rid``'s pages and reservation (idempotent)."""
        self.pages.free(rid)

    # prefill ------------------------------------------------------------------------------------
    def store_kv(self, rid: object, kv_per_layer) -> None:
        """Appends a request's KV to what the pool holds of it: after its prefill the whole
        prompt; when it comes back from decoding on the GPU, the tokens it decoded there.

        Args:
            rid: a reserved request.
            kv_per_layer: iterable of ``(k, v)``, one per layer in order, each ``[n, H_kv, D]`` on any
                device (copied to host memory), ``n`` the same for all layers: the request's
                tokens from :meth:`stored_tokens` on.
        """
        where = None
        for layer, (k, v) in enumerate(kv_per_layer):
            if where is None:  # once per request: every layer puts token t at the same place
                start = self.pages.seq_len(rid)
                self.pages.extend(rid, k.shape[0])
                where = self._token_positions(rid, k.shape[0], start)
            self.pool.store_tokens(layer, *where, k, v)

    def stored_tokens(self, rid: object) -> int:
        """Tokens of ``rid`` whose KV the pool holds."""
        return self.pages.seq_len(rid)

    def load_kv(self, rid: object):
        """The KV the pool holds of ``rid``, for its move back to the GPU: a generator of
        ``(k, v)`` per layer in order, each ``[n, H_kv, D]`` CPU, ``n`` = :meth:`stored_tokens`."""
        n = self.pages.seq_len(rid)
        where = self._token_positions(rid, n)
        for layer in range(self.pool.spec.num_layers):
            yield self.pool.load_tokens(layer, *where)

    def _token_positions(self, rid: object, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset in the page) of ``rid``'s tokens ``start .. start + n - 1``, int64 ``[n]`` each."""
        ps = self.pool.spec.page_size
        pages = torch.tensor(self.pages.pages(rid), dtype=torch.int64)
        t = torch.arange(start, start + n, dtype=torch.int64)
        return pages[t // ps], t % ps

    # decode -------------------------------------------------------------------------------------
    def plan_decode(self, rids: list, rows: list) -> DecodePlan:
        """Grows each request by the token being decoded (within its reservation) and returns the
        metadata every layer of this step uses; ``rows`` are the requests' rows in the batch."""
        for rid in rids:
            self.pages.extend(rid, 1)
        return self.plan_rows(rids, rows)

    def extend(self, rid: object) -> None:
        """Grows ``rid`` by the token about to be decoded (within its reservation): its K/V is
        appended layer by layer by the jobs of :meth:`submit`."""
        self.pages.extend(rid, 1)

    def plan_rows(self, rids: list, rows: list | None = None) -> DecodePlan:
        """Paged-KV metadata of ``rids`` as they are (each counting the token being decoded), for
        the jobs of those rows; ``rows`` are their rows in the caller's batch (default ``0..B-1``)."""
        return DecodePlan(list(rids), *self.pages.kv_metadata(rids),
                          rows=list(range(len(rids))) if rows is None else list(rows))

    def submit(self, plan: DecodePlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sm_scale: float | None) -> PendingJob:
        """Queues layer ``layer`` of ``plan``'s rows on the worker: append ``k``/``v`` ``[B, H_kv, D]``
        (the new token) to the pool, then decode attention of ``q`` ``[B, H_q, D]``. Returns at once;
        the tensors must stay unchanged until :meth:`wait` returns (a new worker may need them).

        Raises:
            BEUnavailableError: BE serving is off.
        """
        if self.unavailable is not None:
            raise BEUnavailableError(self.unavailable)
        scale = 1.0 / math.sqrt(self.head_dim) if sm_scale is None else sm_scale
        self.attention_tokens += len(plan.rids)
        pending = PendingJob(plan, layer, q, k, v, scale, None)
        pending.job = self._submit(pending)
        self._in_flight.append(pending)
        return pending

    @property
    def free_slots(self) -> int:
        """Jobs that can be submitted now without waiting for one."""
        return self.staging_slots - len(self._in_flight)

    def _submit(self, p: PendingJob) -> Job:
        p.submitted_at = time.monotonic()
        return self.client.submit_decode(p.layer, p.q, p.plan.kv_indptr, p.plan.kv_indices, p.plan.kv_last_page_len,
                                         p.k, p.v, p.sm_scale, self.method)

    def wait(self, pending: PendingJob, out: torch.Tensor) -> torch.Tensor:
        """Blocks until the job is done and copies its output ``[B, H_q, D]`` into ``out`` (any
        device). A worker that exits meanwhile (noticed within 0.1 s) or takes longer than
        :meth:`job_timeout` is replaced and the job runs again on the new one.

        Raises:
            omniserve_sgl.worker.WorkerError: the job failed (bad input; the worker goes on).
            BEUnavailableError: the worker failed and could not be replaced.
        """
        while True:
            try:
                self.client.wait(pending.job, timeout=self.job_timeout(), out=out)
            except WorkerDiedError:
                self._replace_and_resubmit("exited")
                continue
            except TimeoutError:
                self._replace_and_resubmit(f"took over {self.job_timeout():.1f} s for one job "
                                           "(--omniserve-cpu-job-timeout)")
                continue
            except WorkerError:  # its slot is free again
                self._in_flight.remove(pending)
                raise
            self._in_flight.remove(pending)
            self._slowest_kernel_s = max(self._slowest_kernel_s, self.client.last_kernel_us * 1e-6)
            return out

    def poll(self, pending: PendingJob) -> bool:
        """Whether ``pending``'s result is back (never blocks; then :meth:`wait` returns at once).
        A worker that has exited, or has run one job past :meth:`job_timeout`, is replaced here
        and every job in flight runs again on the new one.

        Raises:
            BEUnavailableError: the worker failed and could not be replaced.
        """
        if self.client.poll(pending.job):
            return True
        if not self.client.alive():
            self._replace_and_resubmit("exited")
        elif time.monotonic() - self._in_flight[0].submitted_at > self.job_timeout() * len(self._in_flight):
            self._replace_and_resubmit(f"took over {self.job_timeout():.1f} s per job "
                                       "(--omniserve-cpu-job-timeout)")
        return False

    # profiling ----------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V bytes of one token in one layer (what a decode job reads per context token)."""
        spec = self.pool.spec
        return 2 * spec.num_kv_heads * spec.head_dim * spec.torch_dtype.itemsize

    def profile_attention(self, rows: tuple[int, ...] = (1, 4, 16), contexts: tuple[int, ...] = (128, 1024, 4096),
                          repeats: int = 3, budget_s: float = 15.0) -> list[tuple[float, float]]:
        """Times decode jobs of synthetic BE rows on the worker, as :meth:`wait` sees them (submit
        to result), for the latency model's CPU terms. Runs before any request: it borrows pool
        pages and gives them back; grid points that do not fit the pool are skipped, and the grid
        stops when ``budget_s`` is spent.

        Returns:
            ``(kv_bytes_read, seconds)`` per job (the fastest of ``repeats`` per grid point).
        """
        out, deadline = [], time.monotonic() + budget_s
        counted = self.attention_tokens
        spec = self.pool.spec
        for n_rows in rows:
            for ctx in contexts:
                rids = [("omniserve-profile", i) for i in range(n_rows)]
                if self.pages.pages_for(ctx + 1) * n_rows > self.pages.free_pages or time.monotonic() > deadline:
                    continue
                for rid in rids:
                    self.pages.allocate(rid, ctx, reserve_tokens=ctx + 1)
                try:
                    plan = self.plan_decode(rids, list(range(n_rows)))
                    q = torch.randn(n_rows, self.num_qo_heads, spec.head_dim).to(spec.torch_dtype)
                    kv = torch.randn(n_rows, spec.num_kv_heads, spec.head_dim).to(spec.torch_dtype)
                    res = torch.empty_like(q)
                    best = math.inf
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        self.wait(self.submit(plan, 0, q, kv, kv, None), res)
                        best = min(best, time.perf_counter() - t0)
                    out.append((float(n_rows * (ctx + 1) * self.kv_bytes_per_token_layer), best))
                finally:
                    for rid in rids:
                        self.release(rid)
        self.attention_tokens = counted  # profiling is not serving
        return out

    def close(self) -> None:
        """Stops the worker and frees the pool (idempotent)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
