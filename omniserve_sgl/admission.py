"""BE admission against the BE KV pool, one prefill round at a time (plain Python, no SGLang)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

R = TypeVar("R")


def admission_round(queue: Sequence[R], is_be: Callable[[R], bool], pool_pages: Callable[[R], int | None],
                    free_pages: int, be_allowed: bool = True) -> tuple[list[R], list[R]]:
    """Splits a waiting queue for one prefill round.

    Args:
        queue: waiting requests in the scheduler's order.
        is_be: whether a request is BE.
        pool_pages: BE KV pool pages a request still has to reserve (its prompt plus
            ``max_new_tokens``), or ``None`` when it needs none (LS, already reserved, or refused).
        free_pages: the pool's free pages now.
        be_allowed: whether a BE prefill may start in this round (the SLO controller's plan).

    Returns:
        ``(offered, held)``: ``offered`` is what the round may take, LS requests first and each
        class in queue order; it holds at most one BE request that still needs pages, so an LS
        arrival waits for at most one BE prompt. ``held`` are the BE requests that sit out this
        round (pages not free, another BE request takes the round, or no BE prefill is
        allowed), in queue order; they
        block no one behind them.
    """
    offered_be, held, admitting = [], [], False
    for req in queue:
        if not is_be(req):
            continue
        need = pool_pages(req)
        if need is not None and (admitting or need > free_pages or not be_allowed):
            held.append(req)
            continue
        if need is not None:
            free_pages -= need
            admitting = True
        offered_be.append(req)
    return [r for r in queue if not is_be(r)] + offered_be, held
