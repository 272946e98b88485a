"""Shared-memory segments that two processes map, and torch tensors over them.

On Linux a segment is an anonymous ``memfd``: another process maps it through
``/proc/<owner pid>/fd/<fd>``, and the kernel frees it when the last process holding it exits,
cleanly or not, so nothing can be left behind in ``/dev/shm``. Elsewhere a named file in the
temporary directory is used and removed by its owner on close or interpreter exit (a killed owner
can leave it behind there; the OS offers nothing better).
"""

from __future__ import annotations

import atexit
import math
import mmap
import os
import tempfile
import uuid
from dataclasses import dataclass

import torch

_ALIGN = 64  # cache-line aligned tensors


def align(nbytes: int, alignment: int = _ALIGN) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return (nbytes + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class SegmentHandle:
    """What another process needs to map a segment: a path to open and the size in bytes."""

    path: str
    size: int


class SharedSegment:
    """A shared-memory mapping of ``size`` bytes; :meth:`tensor` makes views over it.

    Create with :meth:`create` (the owner) or :meth:`attach` (any other process, from the owner's
    :attr:`handle`). The owner must stay alive until every other process has attached.
    """

    def __init__(self, mapping: mmap.mmap, handle: SegmentHandle, fd: int | None, unlink_path: str | None):
        self._mmap = mapping
        self.handle = handle
        self._fd = fd  # the owner keeps its memfd open so others can open /proc/<pid>/fd/<fd>
        self._unlink_path = unlink_path
        self._base = torch.frombuffer(mapping, dtype=torch.uint8) if handle.size else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def create(cls, size: int, name: str = "omniserve") -> SharedSegment:
        """Creates a zero-filled segment of ``size`` bytes (> 0).

        Raises:
            ValueError: ``size`` is not positive.
            OSError: the OS refused the memory (e.g. ``/dev/shm`` or memlock limits).
        """
        if size <= 0:
            raise ValueError(f"a shared segment needs a positive size, got {size}")
        if hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd"):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mapping = mmap.mmap(fd, size)
            except BaseException:
                os.close(fd)
                raise
            return cls(mapping, SegmentHandle(f"/proc/{os.getpid()}/fd/{fd}", size), fd, None)
        path = os.path.join(tempfile.gettempdir(), f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(path, "w+b") as f:
            f.truncate(size)
            mapping = mmap.mmap(f.fileno(), size)
        seg = cls(mapping, SegmentHandle(path, size), None, path)
        atexit.register(seg.close)
        return seg

    @classmethod
    def attach(cls, handle: SegmentHandle | dict) -> SharedSegment:
        """Maps a segment another process created.

        Raises:
            FileNotFoundError: the owner is gone or the handle is stale.
            ValueError: the segment is smaller than the handle says.
        """
        if isinstance(handle, dict):
            handle = SegmentHandle(**handle)
        fd = os.open(handle.path, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < handle.size:
                raise ValueError(f"shared segment {handle.path} has {actual} bytes, expected {handle.size}")
            mapping = mmap.mmap(fd, handle.size)
        finally:
            os.close(fd)
        return cls(mapping, handle, None, None)

    @property
    def size(self) -> int:
        return self.handle.size

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of ``dtype`` and ``shape`` over bytes ``[offset, offset + nbytes)`` of the segment.

        Raises:
            ValueError: the view would not fit in the segment, or ``offset`` is misaligned for ``dtype``.
        """
        nbytes = dtype.itemsize * math.prod(shape)
        if offset < 0 or offset + nbytes > self.size or offset % dtype.itemsize:
            raise ValueError(f"a {dtype} view of shape {tuple(shape)} at offset {offset} does not fit "
                             f"segment of {self.size} bytes")
        return self._base[offset : offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        """Unmaps (once every tensor view is gone) and releases the segment; safe to call twice."""
        self._base = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive: the mapping goes with the last of them
                pass
            self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._unlink_path is not None:
            try:
                os.unlink(self._unlink_path)
            except FileNotFoundError:
                pass
            self._unlink_path = None


def pin_for_cuda(tensor: torch.Tensor) -> bool:
    """Page-locks a shared-memory tensor for CUDA DMA (``cudaHostRegister``); no-op without CUDA.

    Pinned host memory lets GPU<->host copies of BE q/k/v and outputs run asynchronously on a CUDA
    stream. Returns whether the memory was registered.
    """
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    return int(err) == 0
