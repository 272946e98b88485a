"""Scheduler-side state of offloaded BE requests: the BE KV pool, its page ledger and the CPU
attention worker, behind the few calls the SGLang glue makes (SGLang-agnostic on purpose: the
asynchronous piggybacking executor will drive the same object).

Life of a BE request here: :meth:`BERuntime.reserve` at admission (pages for its whole length,
so it never stalls mid-decode), :meth:`store_prefill` once its prompt's KV exists on the GPU,
then per decode step :meth:`plan_decode` and, per layer, :meth:`submit` / :meth:`wait`, and
finally :meth:`release`.
"""

from __future__ import annotations

import atexit
import logging
import math
from dataclasses import dataclass, field

import torch

from omniserve_sgl.config import OmniServeConfig
from omniserve_sgl.kv import BEKVPool, BEKVPoolSpec
from omniserve_sgl.worker import CPUAttentionClient, Job

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


class BERuntime:
    """Owns the BE KV pool and the CPU attention worker of one scheduler process.

    Args:
        config: the ``--omniserve*`` settings (pool size, worker threads and cores).
        num_layers, num_kv_heads, head_dim: KV geometry of the model (this rank's heads).
        num_qo_heads: query heads per layer.
        dtype: KV dtype (the GPU KV cache's), one of bf16/fp16/fp32.
        max_rows: most BE rows in one decode step (SGLang's max running requests).

    Raises:
        ValueError: the pool budget is below one page, or an unsupported dtype.
        omniserve_sgl.worker.WorkerDiedError, TimeoutError: the worker did not start.
    """

    def __init__(self, config: OmniServeConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                 num_qo_heads: int, dtype: torch.dtype, max_rows: int):
        spec = BEKVPoolSpec.from_budget(config.cpu_kv_bytes, num_layers, num_kv_heads, head_dim,
                                        page_size=config.page_size, dtype=dtype)
        self.pool = BEKVPool.create(spec)
        self.pages = self.pool.allocator
        self.client = CPUAttentionClient.start(threads=config.worker_threads, cores=config.cpu_cores,
                                               spin_us=config.cpu_spin_us)
        self.client.attach_pool(self.pool)
        # Two slots: the synchronous path uses one; piggybacking will keep more jobs in flight.
        self.client.create_staging(2, max_rows, spec.num_pages, num_qo_heads)
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.method = config.cpu_attention
        self.attention_tokens = 0  # token-layer attentions computed by the worker
        atexit.register(self.close)
        logger.info("omniserve: BE KV pool %.2f GiB (%d pages of %d tokens, %d layers), CPU attention "
                    "worker pid %d with %d threads", spec.total_bytes / (1 << 30), spec.num_pages,
                    spec.page_size, num_layers, self.client.process.pid, config.worker_threads)

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
    def store_prefill(self, rid: object, kv_per_layer) -> None:
        """Writes a prefilled request's KV into the pool.

        Args:
            rid: a reserved request with no tokens stored yet.
            kv_per_layer: iterable of ``(k, v)``, one per layer in order, each ``[n, H_kv, D]`` on any
                device (copied to host memory), ``n`` the same for all layers.
        """
        where = None
        for layer, (k, v) in enumerate(kv_per_layer):
            if where is None:  # once per request: every layer puts token t at the same place
                self.pages.extend(rid, k.shape[0])
                where = self._token_positions(rid, k.shape[0])
            self.pool.store_tokens(layer, *where, k, v)

    def _token_positions(self, rid: object, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset in the page) of ``rid``'s first ``n`` tokens, int64 ``[n]`` each."""
        ps = self.pool.spec.page_size
        pages = torch.tensor(self.pages.pages(rid), dtype=torch.int64)
        t = torch.arange(n, dtype=torch.int64)
        return pages[t // ps], t % ps

    # decode -------------------------------------------------------------------------------------
    def plan_decode(self, rids: list, rows: list) -> DecodePlan:
        """Grows each request by the token being decoded (within its reservation) and returns the
        metadata every layer of this step uses; ``rows`` are the requests' rows in the batch."""
        for rid in rids:
            self.pages.extend(rid, 1)
        return DecodePlan(list(rids), *self.pages.kv_metadata(rids), rows=list(rows))

    def submit(self, plan: DecodePlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sm_scale: float | None) -> Job:
        """Queues layer ``layer`` of ``plan``'s rows on the worker: append ``k``/``v`` ``[B, H_kv, D]``
        (the new token) to the pool, then decode attention of ``q`` ``[B, H_q, D]``. Returns at once."""
        scale = 1.0 / math.sqrt(self.head_dim) if sm_scale is None else sm_scale
        self.attention_tokens += len(plan.rids)
        return self.client.submit_decode(layer, q, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len,
                                         k, v, scale, self.method)

    def wait(self, job: Job, out: torch.Tensor) -> torch.Tensor:
        """Blocks until ``job`` is done and copies its output ``[B, H_q, D]`` into ``out`` (any device).

        Raises:
            omniserve_sgl.worker.WorkerError: the job failed; WorkerDiedError: the worker exited.
        """
        self.client.wait(job, out=out)
        return out

    def close(self) -> None:
        """Stops the worker and frees the pool (idempotent)."""
        if self.client is not None:
            self.client.close()
            self.client = None
            self.pool.close()
