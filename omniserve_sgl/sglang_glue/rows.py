"""A batch seen through some of its rows: used for SGLang's ``ScheduleBatch`` (GPU KV slots for LS
rows only) and ``ForwardBatch`` (LS attention over LS rows only)."""

from __future__ import annotations

import copy

import torch


def select_rows(batch, rows: list[int], tensor_fields, list_fields=()):
    """A shallow copy of ``batch`` whose per-row tensors (``tensor_fields``, on any device) and
    lists (``list_fields``) keep only ``rows``, in that order; other attributes are shared. Fields
    that are absent or ``None`` are left as they are."""
    view = copy.copy(batch)
    idx = torch.tensor(rows, dtype=torch.int64)
    for name in tensor_fields:
        t = getattr(batch, name, None)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            setattr(view, name, t[idx.to(t.device)])
    for name in list_fields:
        xs = getattr(batch, name, None)
        if xs:
            setattr(view, name, [xs[i] for i in rows])
    return view
