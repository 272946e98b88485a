"""How many more tokens a running LS request will produce, most likely: a survival estimate over
the output lengths of the LS requests that finished before it.

A request that may end at any token (no ``ignore_eos``) produces no token for certain, so the
controller, counting only certain tokens, could lend nothing of a young request's TPOT budget:
with LS requests arriving every few decode steps, the youngest running one held every BE chunk
back. What finished requests produced says how far a running one will likely go; the server's
glue and the simulator keep one :class:`OutputLengths` each and put its answer in
:attr:`omniserve_sgl.control.LSDecode.tokens_left`.
"""

from __future__ import annotations

import bisect
import collections


class OutputLengths:
    """The output lengths (tokens) of the last ``window`` LS requests that finished.

    Args:
        window: how many finished requests are kept (older ones drop out, so a change of traffic
            is followed).
        risk: the chance a request ends before the estimate (the estimate is the ``risk``
            quantile of what requests still running at that point went on to produce).
        min_samples: with fewer finished requests that went past a point, nothing is estimated
            there (0 tokens: as without history).

    Raises:
        ValueError: ``risk`` outside [0, 1), ``window`` or ``min_samples`` below 1.
    """

    def __init__(self, window: int = 512, risk: float = 0.1, min_samples: int = 32):
        if not 0.0 <= risk < 1.0:
            raise ValueError(f"risk must be in [0, 1), got {risk}")
        if window < 1 or min_samples < 1:
            raise ValueError(f"window and min_samples must be >= 1, got {window}, {min_samples}")
        self.risk, self.min_samples = risk, min_samples
        self._recent: collections.deque[int] = collections.deque(maxlen=window)
        self._sorted: list[int] = []
        self._left: dict[int, int] = {}  # likely_left's answers since the last add

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, produced: int) -> None:
        """Records a finished LS request's output length, tokens (>= 0). Aborted requests are not
        recorded: they did not end by themselves."""
        if len(self._recent) == self._recent.maxlen:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent[0]))
        self._recent.append(produced)
        bisect.insort(self._sorted, produced)
        self._left.clear()

    def likely_left(self, produced: int) -> int:
        """Tokens a running LS request that has produced ``produced`` tokens will still produce
        with probability at least ``1 - risk``: ``k`` such that, of the recorded requests that
        produced more than ``produced``, at least that share produced ``produced + k`` or more. 0
        with fewer than ``min_samples`` of them. Memoized until the next :meth:`add` (the
        controller asks for every LS decode of every step)."""
        k = self._left.get(produced)
        if k is None:
            s = self._sorted
            i = bisect.bisect_right(s, produced)  # s[i:]: the requests that went past ``produced``
            m = len(s) - i
            k = 0 if m < self.min_samples else s[i + int(self.risk * m)] - produced
            self._left[produced] = k
        return k
