"""One offloaded BE request as the executor sees it: where its current token is in the model."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Phase(enum.Enum):
    ENTER = "enter"  # its current token waits to enter a pass at layer 0
    CPU = "cpu"  # its layer-``layer`` attention runs on the CPU worker
    READY = "ready"  # its layer-``layer`` attention is back: it joins a pass at that layer


@dataclass
class BERow:
    """An offloaded BE request inside the executor.

    Attributes:
        rid: the request's id (its key in the BE KV pool's page ledger).
        token: the token being decoded (its input id), at ``position`` (0-based; the pool holds
            the KV of every earlier position).
        layer: the layer the token is at (meaningful in ``CPU`` and ``READY``).
        phase: see :class:`Phase`.
        slot: its row in the residual store.
        job: the CPU job its attention is in (``CPU`` only).
        removed: finished or aborted while a job of its was in flight; its pages are freed once
            that job is back (the worker may still be writing them).
    """

    rid: object
    token: int
    position: int
    slot: int
    layer: int = 0
    phase: Phase = Phase.ENTER
    job: object = None
    removed: bool = False
