"""BE KV pool: per-layer paged K/V caches in one shared-memory segment, plus its page allocator.

The owner (the scheduler-side client) creates the pool and allocates pages; the CPU attention
worker attaches to the same memory from its :meth:`BEKVPool.handle` and reads/writes K/V there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from omniserve_sgl.kv.allocator import BEPoolFullError, PageAllocator
from omniserve_sgl.shm import SegmentHandle, SharedSegment, pin_for_cuda

KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; raises ValueError for dtypes the kernels do not take."""
    for name, dt in KV_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"KV dtype must be one of {list(KV_DTYPES)}, got {dtype}")


@dataclass(frozen=True)
class BEKVPoolSpec:
    """Geometry of the pool. Memory: for each layer, K then V, each ``[num_pages, page_size, H_kv, D]``
    (``"NHD"``) or ``[num_pages, H_kv, page_size, D]`` (``"HND"``).

    HND is the default: the decode kernel reads a page head by head, and in HND each head's rows of
    a page lie together, so the page is read in order (``benchmarks/cpu_attention.py`` measures both).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    page_size: int = 16
    dtype: str = "bfloat16"
    kv_layout: str = "HND"

    def __post_init__(self):
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.num_pages, self.page_size) <= 0:
            raise ValueError(f"every size of a BE KV pool must be positive: {self}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"dtype must be one of {list(KV_DTYPES)}, got {self.dtype!r}")
        if self.kv_layout not in ("NHD", "HND"):
            raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {self.kv_layout!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.dtype]

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        if self.kv_layout == "NHD":
            return (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        return (self.num_pages, self.num_kv_heads, self.page_size, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        """Bytes one page takes across all layers, K and V."""
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def layer_bytes(self) -> int:
        return self.bytes_per_page * self.num_pages // self.num_layers // 2

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_page * self.num_pages

    @classmethod
    def from_budget(cls, capacity_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                    page_size: int = 16, dtype: torch.dtype | str = "bfloat16", kv_layout: str = "HND"):
        """The largest pool that fits in ``capacity_bytes``.

        Raises:
            ValueError: the budget does not hold a single page.
        """
        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        one = cls(num_layers, num_kv_heads, head_dim, 1, page_size, name, kv_layout)
        num_pages = capacity_bytes // one.bytes_per_page
        if num_pages < 1:
            raise ValueError(f"a BE KV pool budget of {capacity_bytes} bytes is below one page "
                             f"({one.bytes_per_page} bytes for {num_layers} layers)")
        return cls(num_layers, num_kv_heads, head_dim, num_pages, page_size, name, kv_layout)


class BEKVPool:
    """Paged BE KV caches in shared memory. The owner also holds the :class:`PageAllocator`.

    Example::

        pool = BEKVPool.create(BEKVPoolSpec.from_budget(2 << 30, num_layers=30, num_kv_heads=3, head_dim=64))
        pool.allocator.allocate("req-1", num_tokens=100)
        indptr, indices, last = pool.allocator.kv_metadata(["req-1"])
        k_cache, v_cache = pool.k_cache(0), pool.v_cache(0)   # layer 0
    """

    def __init__(self, spec: BEKVPoolSpec, segment: SharedSegment, owner: bool):
        self.spec = spec
        self.segment = segment
        self.allocator = PageAllocator(spec.num_pages, spec.page_size) if owner else None
        n = spec.layer_bytes
        self._k = [segment.tensor((2 * i) * n, spec.torch_dtype, spec.cache_shape) for i in range(spec.num_layers)]
        self._v = [segment.tensor((2 * i + 1) * n, spec.torch_dtype, spec.cache_shape) for i in range(spec.num_layers)]

    @classmethod
    def create(cls, spec: BEKVPoolSpec, pin: bool = True) -> BEKVPool:
        """Allocates the pool's shared memory (zeroed) and its allocator; ``pin`` page-locks it for
        CUDA copies when CUDA is available.

        Raises:
            OSError: the OS refused the memory.
        """
        pool = cls(spec, SharedSegment.create(spec.total_bytes, "omniserve-be-kv"), owner=True)
        if pin:
            pin_for_cuda(pool.segment.tensor(0, torch.uint8, (spec.total_bytes,)))
        return pool

    @classmethod
    def attach(cls, handle: dict) -> BEKVPool:
        """Maps a pool created by another process from its :meth:`handle` (data only, no allocator)."""
        return cls(BEKVPoolSpec(**handle["spec"]), SharedSegment.attach(SegmentHandle(**handle["segment"])),
                   owner=False)

    def handle(self) -> dict:
        """A JSON-able description another process passes to :meth:`attach`."""
        return {"spec": asdict(self.spec), "segment": asdict(self.segment.handle)}

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K cache, ``spec.cache_shape``, ``spec.dtype``, CPU (shared memory)."""
        return self._k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s V cache, ``spec.cache_shape``, ``spec.dtype``, CPU (shared memory)."""
        return self._v[layer]

    def store_tokens(self, layer: int, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Writes K/V rows of tokens into layer ``layer``, in either layout.

        Args:
            pages, offsets: ``[n]`` int64, each token's page and its position in that page.
            k, v: ``[n, H_kv, D]`` on any device, cast to the pool's dtype.
        """
        for cache, x in ((self._k[layer], k), (self._v[layer], v)):
            x = x.to("cpu", cache.dtype)
            if self.spec.kv_layout == "NHD":
                cache[pages, offsets] = x
            else:  # HND: the advanced indices around the head slice put the token dimension first
                cache[pages, :, offsets] = x

    def load_tokens(self, layer: int, pages: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads K/V rows of tokens from layer ``layer`` (the inverse of :meth:`store_tokens`).

        Args:
            pages, offsets: ``[n]`` int64, each token's page and its position in that page.

        Returns:
            ``(k, v)``, each ``[n, H_kv, D]`` in the pool's dtype, CPU (copies, not views).
        """
        if self.spec.kv_layout == "NHD":
            return self._k[layer][pages, offsets], self._v[layer][pages, offsets]
        return self._k[layer][pages, :, offsets], self._v[layer][pages, :, offsets]

    @property
    def capacity_tokens(self) -> int:
        return self.spec.num_pages * self.spec.page_size

    def close(self) -> None:
        self._k = self._v = []
        self.segment.close()


__all__ = ["BEKVPool", "BEKVPoolSpec", "BEPoolFullError"]
