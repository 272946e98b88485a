"""The residual store: per offloaded BE row, the residual-stream vector it left its last pass
with, and the attention output the CPU sent back, preallocated on the GPU (no allocation per pass)."""

from __future__ import annotations

import torch


class ResidualStore:
    """``capacity`` rows of residual ``[H]`` and attention output ``[H_q, D]``.

    Args:
        capacity: most offloaded BE requests at once.
        hidden_size, num_qo_heads, head_dim: the model's sizes.
        dtype, device: the model's (residuals and attention outputs enter its layers as they are).

    Raises:
        ValueError: ``capacity < 1``.
    """

    def __init__(self, capacity: int, hidden_size: int, num_qo_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        if capacity < 1:
            raise ValueError(f"a residual store needs room for at least one row, got capacity {capacity}")
        self.residual = torch.zeros(capacity, hidden_size, dtype=dtype, device=device)
        self.attn = torch.zeros(capacity, num_qo_heads, head_dim, dtype=dtype, device=device)
        self._free = list(range(capacity - 1, -1, -1))
        self._held: set[int] = set()  # slots whose residual is live (a token between two layers)

    @property
    def capacity(self) -> int:
        return self.residual.shape[0]

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A free row. Raises RuntimeError when the store is full."""
        if not self._free:
            raise RuntimeError(f"the residual store's {self.capacity} rows are all in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._held.discard(slot)
        self._free.append(slot)

    def index(self, slots: list[int]) -> torch.Tensor:
        """``slots`` as an int64 index on the store's device."""
        return torch.tensor(slots, dtype=torch.int64).to(self.residual.device, non_blocking=True)

    def put(self, slots: list[int], residual: torch.Tensor) -> None:
        """Keeps ``residual [n, H]`` in rows ``slots``."""
        self.residual[self.index(slots)] = residual
        self._held.update(slots)

    def take(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attn [n, H_q, D], residual [n, H])`` of rows ``slots``; their residuals are no longer held."""
        self._held.difference_update(slots)
        idx = self.index(slots)
        return self.attn[idx], self.residual[idx]

    @property
    def held_bytes(self) -> int:
        """Bytes of residual held for tokens between two layers (``omniserve_residual_store_bytes``)."""
        return len(self._held) * self.residual.shape[1] * self.residual.element_size()
