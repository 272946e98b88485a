"""Staging slots: shared-memory buffers through which one decode-attention job's inputs and
outputs pass between the client and the worker (no tensor is ever pickled or sent over ZeroMQ).

Each slot also carries small float64 word arrays, the shared-memory side of the hand-off:
``job`` (the client's doorbell: ``JOB_FIELDS``, ``seq`` written last), ``done`` (the worker's
completion: ``DONE_FIELDS``, ``seq`` written last) and ``watch`` (``WATCH_FIELDS``: until when, in
``time.perf_counter()`` seconds, the worker busy-polls the doorbells and the client busy-polls this
slot's done words). A worker that is busy-polling picks a job up from its doorbell without waiting
for the ZeroMQ message, and a client that is busy-polling sees the result in ``done`` before the
ZeroMQ reply arrives; while the other side's ``watch`` word says it is polling, each side skips its
ZeroMQ message altogether. float64 holds every integer field exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from omniserve_sgl.kv.pool import KV_DTYPES
from omniserve_sgl.shm import SegmentHandle, SharedSegment, align, pin_for_cuda

# plan_id: the client's number for the slot's paged-KV metadata; jobs with the same id carry the
# same metadata, so the worker checks and splits it once (its plan) and runs it for every layer.
JOB_FIELDS = ("seq", "layer", "num_rows", "num_pages", "append_kv", "method", "sm_scale", "plan_id")
DONE_FIELDS = ("seq", "ok", "kernel_us", "planned")  # planned: 1 when the job made a new plan
WATCH_FIELDS = ("worker_polling_until", "client_waiting_until")
# A side skips its ZeroMQ message only while the other will go on polling for at least this long
# (it re-reads the words once more when it stops): far longer than a store takes to reach the other
# core (x86 keeps stores in order), so a job or result is never left unseen.
WATCH_MARGIN_S = 50e-6
METHODS = ("kernel", "sdpa")  # job word "method" indexes this


@dataclass(frozen=True)
class StagingSpec:
    """``num_slots`` slots, each for up to ``max_rows`` rows and ``max_pages`` KV pages."""

    num_slots: int
    max_rows: int
    max_pages: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def __post_init__(self):
        if min(self.num_slots, self.max_rows, self.max_pages, self.num_qo_heads, self.num_kv_heads,
               self.head_dim) <= 0:
            raise ValueError(f"every size of a staging area must be positive: {self}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"dtype must be one of {list(KV_DTYPES)}, got {self.dtype!r}")

    def fields(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Name, dtype and shape of each tensor of a slot, in memory order."""
        r, hq, hkv, d, dt = self.max_rows, self.num_qo_heads, self.num_kv_heads, self.head_dim, KV_DTYPES[self.dtype]
        return [
            ("job", torch.float64, (len(JOB_FIELDS),)),
            ("done", torch.float64, (len(DONE_FIELDS),)),
            ("watch", torch.float64, (len(WATCH_FIELDS),)),
            ("q", dt, (r, hq, d)),
            ("k", dt, (r, hkv, d)),
            ("v", dt, (r, hkv, d)),
            ("out", dt, (r, hq, d)),
            ("lse", torch.float32, (r, hq)),
            ("kv_indptr", torch.int32, (r + 1,)),
            ("kv_indices", torch.int32, (self.max_pages,)),
            ("kv_last_page_len", torch.int32, (r,)),
        ]

    def _layout(self) -> tuple[list[int], int]:
        offsets, off = [], 0
        for _, dt, shape in self.fields():
            offsets.append(off)
            off += align(dt.itemsize * math.prod(shape))
        return offsets, off

    @property
    def slot_bytes(self) -> int:
        return self._layout()[1]

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.num_slots


class StagingArea:
    """The slots of a :class:`StagingSpec` in one shared segment; ``slots[i]`` maps field names to
    tensors (``q [max_rows, H_q, D]``, ``k``/``v [max_rows, H_kv, D]``, ``out``, ``lse [max_rows, H_q]``
    float32, and int32 ``kv_indptr``, ``kv_indices``, ``kv_last_page_len``); ``jobs[i]``,
    ``done[i]`` and ``watch[i]`` are numpy views of slot i's word arrays (a numpy read costs far
    less than a tensor's, which matters in a polling loop)."""

    def __init__(self, spec: StagingSpec, segment: SharedSegment):
        self.spec = spec
        self.segment = segment
        offsets, slot_bytes = spec._layout()
        self.slots = [
            {name: segment.tensor(i * slot_bytes + off, dt, shape)
             for (name, dt, shape), off in zip(spec.fields(), offsets)}
            for i in range(spec.num_slots)
        ]
        self.jobs = [slot["job"].numpy() for slot in self.slots]
        self.done = [slot["done"].numpy() for slot in self.slots]
        self.watch = [slot["watch"].numpy() for slot in self.slots]

    @classmethod
    def create(cls, spec: StagingSpec, pin: bool = True) -> StagingArea:
        area = cls(spec, SharedSegment.create(spec.total_bytes, "omniserve-staging"))
        if pin:
            pin_for_cuda(area.segment.tensor(0, torch.uint8, (spec.total_bytes,)))
        return area

    @classmethod
    def attach(cls, handle: dict) -> StagingArea:
        return cls(StagingSpec(**handle["spec"]), SharedSegment.attach(SegmentHandle(**handle["segment"])))

    def handle(self) -> dict:
        return {"spec": asdict(self.spec), "segment": asdict(self.segment.handle)}

    def close(self) -> None:
        self.slots, self.jobs, self.done, self.watch = [], [], [], []
        self.segment.close()
