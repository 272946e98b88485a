"""The BE KV pool: paged K/V of best-effort requests in shared host memory."""

from omniserve_sgl.kv.allocator import BEPoolFullError, PageAllocator
from omniserve_sgl.kv.pool import BEKVPool, BEKVPoolSpec

__all__ = ["BEKVPool", "BEKVPoolSpec", "BEPoolFullError", "PageAllocator"]
