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

    # capacity -------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages a sequence of ``num_tokens`` tokens occupies."""
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` tokens fits now."""
        return self.pages_for(num_tokens) <= len(self._free)

    def can_extend(self, seq_id: object, num_tokens: int = 1) -> bool:
        """Whether ``seq_id`` can grow by ``num_tokens`` tokens now."""
        cur = self._lens[seq_id]
        return self.pages_for(cur + num_tokens) - len(self._pages[seq_id]) <= len(self._free)

    # allocation -----------------------------------------------------------------------------
    def allocate(self, seq_id: object, num_tokens: int) -> None:
        """Registers a new sequence holding ``num_tokens`` (>= 0) tokens.

        Raises:
            ValueError: ``seq_id`` already has pages, or ``num_tokens`` is negative.
            BEPoolFullError: not enough free pages.
        """
        if seq_id in self._pages:
            raise ValueError(f"sequence {seq_id!r} is already allocated in the BE KV pool")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self.pages_for(num_tokens)
        if need > len(self._free):
            raise BEPoolFullError(f"BE KV pool full: {num_tokens} tokens need {need} pages, "
                                  f"{len(self._free)} of {self.num_pages} free")
        self._pages[seq_id] = [self._free.pop() for _ in range(need)]
        self._lens[seq_id] = num_tokens

    def extend(self, seq_id: object, num_tokens: int = 1) -> None:
        """Grows ``seq_id`` by ``num_tokens`` tokens, taking new pages as the last one fills.

        Raises:
            KeyError: unknown ``seq_id``.
            BEPoolFullError: not enough free pages (the sequence keeps its old length).
        """
        pages = self._pages[seq_id]
        new_len = self._lens[seq_id] + num_tokens
        need = self.pages_for(new_len) - len(pages)
        if need > len(self._free):
            raise BEPoolFullError(f"BE KV pool full: sequence {seq_id!r} needs {need} more pages, "
                                  f"{len(self._free)} of {self.num_pages} free")
        pages.extend(self._free.pop() for _ in range(need))
        self._lens[seq_id] = new_len

    def free(self, seq_id: object) -> None:
        """Returns all pages of ``seq_id`` to the pool; unknown ids are ignored (idempotent)."""
        pages = self._pages.pop(seq_id, None)
        if pages is not None:
            self._free.extend(reversed(pages))
            del self._lens[seq_id]

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
