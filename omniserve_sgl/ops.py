"""CPU attention ops (the C++ extension ``omniserve_sgl._C``), with FlashInfer's paged-KV conventions.

Paged KV (FlashInfer, "Page Table Layout"): sequence ``b`` owns pages
``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``, all full but the last, which holds
``kv_last_page_len[b]`` tokens; its length is ``(num_pages_b - 1) * page_size + kv_last_page_len[b]``
(0, with ``kv_last_page_len[b] == 0``, for a sequence with no pages). Layouts: ``"NHD"`` caches are
``[num_pages, page_size, H_kv, D]``, ``"HND"`` caches ``[num_pages, H_kv, page_size, D]``.

Errors: every op checks its arguments before touching memory and raises ``ValueError`` (shapes,
values), ``TypeError`` (dtypes) or ``IndexError`` (a page index outside the cache), with a message
naming the argument. None of them can crash the process on bad input.
"""

from __future__ import annotations

import math

import torch

from omniserve_sgl import _C  # registers torch.ops.omniserve; holds DecodePlan

_ops = torch.ops.omniserve


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sm_scale: float | None = None,
    kv_layout: str = "NHD",
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query token per sequence over a paged KV cache, on CPU threads.

    Computes ``softmax(q · Kᵀ · sm_scale) · V`` per sequence and query head, with grouped-query
    attention (query head ``h`` reads KV head ``h // (H_q // H_kv)``), as FlashInfer's
    ``BatchDecodeWithPagedKVCacheWrapper.run(..., return_lse=True)`` does on a GPU. Each sequence's
    KV is split into chunks across threads (flash decoding) and the chunks are merged by their LSE.

    Args:
        q: ``[B, H_q, D]``, bfloat16, float16 or float32, CPU. ``D`` is a positive multiple of 16,
            at most 256; ``H_q`` a multiple of ``H_kv`` with at most 64 query heads per KV head.
        k_cache, v_cache: paged caches of q's dtype, contiguous, ``[num_pages, page_size, H_kv, D]``
            (``"NHD"``) or ``[num_pages, H_kv, page_size, D]`` (``"HND"``).
        kv_indptr: ``[B + 1]`` int32, ``kv_indptr[0] == 0``, non-decreasing.
        kv_indices: ``[nnz_pages]`` int32 page ids in ``[0, num_pages)``.
        kv_last_page_len: ``[B]`` int32 in ``1..page_size`` (0 for a sequence with no pages).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        kv_layout: ``"NHD"`` or ``"HND"``.
        backend: ``"auto"`` (the fastest this CPU runs), ``"avx512_bf16"``, ``"avx512"`` or
            ``"portable"``; naming an AVX-512 kernel the CPU lacks raises ``ValueError``.
        out, lse: optional caller-owned outputs (contiguous, shapes and dtypes as returned), written
            in place as with FlashInfer's ``run(..., out=, lse=)``.

    Returns:
        ``(out, lse)``: ``out [B, H_q, D]`` in q's dtype (zeros for an empty sequence) and
        ``lse [B, H_q]`` float32, the natural log of the sum of ``exp(sm_scale · q·k)`` over the
        sequence (``-inf`` for an empty sequence), ready for :func:`merge_state`. Accumulation is
        in float32.

    Raises:
        ValueError, TypeError, IndexError: as described in the module docstring.
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return _ops.paged_decode_attention(
        q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, float(sm_scale), kv_layout, backend, out, lse
    )


class PagedDecodePlan:
    """Paged decode attention split as FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper`` splits
    it: ``plan`` once per set of rows (it checks the page table and splits each sequence into
    chunks for the CPU threads), then ``append`` and ``run`` once per layer, which check only shapes.
    :func:`paged_decode_attention` is a plan followed by one run.

    Args:
        kv_indptr, kv_indices, kv_last_page_len: int32 paged-KV metadata of ``B`` sequences, as for
            :func:`paged_decode_attention`; the plan keeps a copy of the checked page ids, so later
            changes to these tensors do not reach it.
        num_pages, page_size: geometry of the caches the plan will run on.

    Raises:
        ValueError, IndexError, TypeError: bad metadata, as :func:`paged_decode_attention` raises.
    """

    def __init__(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                 num_pages: int, page_size: int):
        self._plan = _C.DecodePlan(kv_indptr, kv_indices, kv_last_page_len, int(num_pages), int(page_size))

    @property
    def batch(self) -> int:
        """``B``, the rows the plan was made for."""
        return self._plan.batch

    @property
    def num_items(self) -> int:
        """(sequence, chunk) work items: the split-KV parallelism of one run."""
        return self._plan.num_items

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sm_scale: float | None = None,
            kv_layout: str = "NHD", *, backend: str = "auto", out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of ``q [B, H_q, D]`` over the planned pages of ``k_cache``/``v_cache``;
        arguments and result as :func:`paged_decode_attention`'s.

        Raises:
            ValueError: ``q`` has another number of rows than the plan, or the caches another
                number of pages or page size; and :func:`paged_decode_attention`'s shape and dtype
                errors.
        """
        if sm_scale is None:
            sm_scale = 1.0 / math.sqrt(q.shape[-1])
        return self._plan.run(q, k_cache, v_cache, float(sm_scale), kv_layout, backend, out, lse)

    def append(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               kv_layout: str = "NHD") -> None:
        """Writes ``k``/``v [B, H_kv, D]`` (the caches' dtype) at each planned sequence's last slot,
        in place, as :func:`append_paged_kv` does, through the plan's checked page ids: the plan's
        metadata must already count the appended token. Checks shapes only.

        Raises:
            ValueError: another number of rows than the plan, caches of another geometry, or a
                planned sequence with no pages; and :func:`append_paged_kv`'s shape and dtype errors.
        """
        self._plan.append(k, v, k_cache, v_cache, kv_layout)


def append_paged_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    kv_layout: str = "NHD",
) -> None:
    """Writes one new token's K/V per sequence at that sequence's last slot, in place.

    As with FlashInfer's ``append_paged_kv_cache``, the metadata describes the caches *after* the
    append: the token lands in page ``kv_indices[kv_indptr[b+1] - 1]`` at offset
    ``kv_last_page_len[b] - 1``. Grow the sequence first (allocate a page when the last one is
    full), then append.

    Args:
        k, v: ``[B, H_kv, D]`` of the caches' dtype, CPU.
        k_cache, v_cache: as in :func:`paged_decode_attention`; modified in place.
        kv_indptr, kv_indices, kv_last_page_len: int32 paged-KV metadata of the ``B`` sequences,
            each holding at least one token.
        kv_layout: ``"NHD"`` or ``"HND"``.

    Raises:
        ValueError, TypeError, IndexError: bad shapes, dtypes, metadata, or a sequence with no pages.
    """
    _ops.append_paged_kv(k, v, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)


def merge_state(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two partial attention results over disjoint KV sets, as FlashInfer's ``merge_state``.

    ``v = (v_a · e^{s_a} + v_b · e^{s_b}) / (e^{s_a} + e^{s_b})`` and ``s = log(e^{s_a} + e^{s_b})``,
    computed with the max subtracted; two empty states (``-inf``) merge to zeros and ``-inf``.
    LSEs are natural logs, as :func:`paged_decode_attention` returns them.

    Args:
        v_a, v_b: ``[N, H, D]``, same dtype (bfloat16, float16 or float32), CPU.
        s_a, s_b: ``[N, H]`` float32 LSEs of ``v_a`` and ``v_b``.

    Returns:
        ``(v [N, H, D]`` in the inputs' dtype, ``s [N, H]`` float32``)``.

    Raises:
        ValueError, TypeError: mismatched shapes or dtypes.
    """
    return _ops.merge_state(v_a, s_a, v_b, s_b)


def decode_backend() -> str:
    """The kernel ``backend="auto"`` runs on this CPU: ``"avx512_bf16"``, ``"avx512"`` or ``"portable"``."""
    return _ops.decode_backend()
