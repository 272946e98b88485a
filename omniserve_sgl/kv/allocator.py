"""Page bookkeeping of the BE KV pool: which pages each sequence owns and how full its last one is."""

from __future__ import annotations

import torch


class BEPoolFullError(RuntimeError):
    """The BE KV pool has too few free pages for the request; nothing was allocated."""


class PageAllocator:
    """Allocates fixed-size pages to sequences that grow token by token.

    A page id is valid in every layer (one allocation covers the whole model). Every method either
    succeeds completely or raises and changes nothing.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages} and {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low page ids first
        self._pages: dict[object, list[int]] = {}
        self._lens: dict[object, int] = {}
        # Pages promised to a sequence but not yet handed out: extend() within a reservation
        # never fails, which is how admission guarantees a BE request can run to completion.
        self._reserved: dict[object, int] = {}
        self._reserved_total = 0

    # capacity -------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        """Pages neither held nor reserved by any sequence."""
        return len(self._free) - self._reserved_total

    @property
    def used_pages(self) -> int:
        """Pages holding K/V of some sequence."""
        return self.num_pages - len(self._free)

    @property
    def num_seqs(self) -> int:
        """Sequences holding pages or a reservation."""
        return len(self._pages)

    @property
    def reserved_pages(self) -> int:
        """Pages reserved for sequences' future tokens and not yet used."""
        return self._reserved_total

    def pages_for(self, num_tokens: int) -> int:
        """Pages a sequence of ``num_tokens`` tokens occupies."""
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` tokens (or reservation of as many) fits now."""
        return self.pages_for(num_tokens) <= self.free_pages

    def can_extend(self, seq_id: object, num_tokens: int = 1) -> bool:
        """Whether ``seq_id`` can grow by ``num_tokens`` tokens now."""
        need = self.pages_for(self._lens[seq_id] + num_tokens) - len(self._pages[seq_id])
        return need - self._reserved[seq_id] <= self.free_pages

    # allocation -----------------------------------------------------------------------------
    def allocate(self, seq_id: object, num_tokens: int, reserve_tokens: int = 0) -> None:
        """Registers a new sequence holding ``num_tokens`` (>= 0) tokens, and reserves pages so that
        it can grow to ``reserve_tokens`` tokens without ever failing.

        Raises:
            ValueError: ``seq_id`` already has pages, or ``num_tokens`` is negative.
            BEPoolFullError: not enough free pages.
        """
        if seq_id in self._pages:
            raise ValueError(f"sequence {seq_id!r} is already allocated in the BE KV pool")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self.pages_for(num_tokens)
        total = max(need, self.pages_for(reserve_tokens))
        if total > self.free_pages:
            raise BEPoolFullError(f"BE KV pool full: {max(num_tokens, reserve_tokens)} tokens need {total} "
                                  f"pages, {self.free_pages} of {self.num_pages} free")
        self._pages[seq_id] = [self._free.pop() for _ in range(need)]
        self._lens[seq_id] = num_tokens
        self._reserved[seq_id] = total - need
        self._reserved_total += total - need

    def extend(self, seq_id: object, num_tokens: int = 1) -> None:
        """Grows ``seq_id`` by ``num_tokens`` tokens, taking new pages as the last one fills.

        Raises:
            KeyError: unknown ``seq_id``.
            BEPoolFullError: not enough free pages (the sequence keeps its old length).
        """
        pages = self._pages[seq_id]
        new_len = self._lens[seq_id] + num_tokens
        need = self.pages_for(new_len) - len(pages)
        from_reserve = min(max(need, 0), self._reserved[seq_id])
        if need - from_reserve > self.free_pages:
            raise BEPoolFullError(f"BE KV pool full: sequence {seq_id!r} needs {need} more pages, "
                                  f"{self.free_pages} of {self.num_pages} free")
        pages.extend(self._free.pop() for _ in range(need))
        self._lens[seq_id] = new_len
        self._reserved[seq_id] -= from_reserve
        self._reserved_total -= from_reserve

    def free(self, seq_id: object) -> None:
        """Returns all pages of ``seq_id`` and its reservation to the pool; unknown ids are ignored
        (idempotent)."""
        pages = self._pages.pop(seq_id, None)
        if pages is not None:
            self._free.extend(reversed(pages))
            del self._lens[seq_id]
            self._reserved_total -= self._reserved.pop(seq_id)

    # views ----------------------------------------------------------------------------------
    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._pages

    def seq_len(self, seq_id: object) -> int:
        return self._lens[seq_id]

    def pages(self, seq_id: object) -> list[int]:
        return list(self._pages[seq_id])

    def kv_metadata(self, seq_ids: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlashInfer paged-KV metadata of ``seq_ids``, in that order.

        Returns:
            ``(kv_indptr [B + 1], kv_indices [nnz_pages], kv_last_page_len [B])``, int32 CPU tensors;
            a sequence with no tokens has no pages and ``kv_last_page_len`` 0.

        Raises:
            KeyError: an unknown sequence id.
        """
        indptr = [0]
        indices: list[int] = []
        last = []
        for sid in seq_ids:
            pages = self._pages[sid]
            indices.extend(pages)
            indptr.append(len(indices))
            n = self._lens[sid]
            last.append(0 if n == 0 else n - (len(pages) - 1) * self.page_size)
        return tuple(torch.tensor(xs, dtype=torch.int32) for xs in (indptr, indices, last))
