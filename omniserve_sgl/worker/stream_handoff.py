"""The GPU side of a job's hand-off, for q/k/v that live on a CUDA device (OmniServe paper section
3.2: the GPU never waits for the CPU, and the scheduler's thread should not wait for the GPU).

Without it, staging a job copies q/k/v to the pinned staging slot with blocking copies, so every
layer that hands BE rows to the worker would stall the scheduler's thread until the GPU has run
everything queued before. Here:

- q/k/v go to the slot on a copy stream, which first waits for the compute stream (the copies see
  the values the pass computed); the tensors are recorded on that stream so the caching allocator
  keeps them until the copies ran.
- The copy stream itself writes the job's doorbell word after the data: an 8-byte device-to-host
  copy of the job's seq into the pinned job word, ordered after the data copies on the same
  stream. The worker, polling the doorbells, starts the job when the data has landed, and no thread
  of this process waits for it. (A ZeroMQ wake-up for a worker that is not polling can arrive
  before the doorbell rings: the worker waits for the doorbell, see ``worker/server.py``.)
- Results come back into device tensors with non-blocking copies on the compute stream; an event
  recorded after them guards the slot: the next job staged into it from the GPU waits for that
  event on the copy stream, and one staged from host tensors waits for it on the host.
"""

from __future__ import annotations

import torch


class StreamHandoff:
    """Copy stream, doorbell source and per-slot read-back events of one staging area.

    Args:
        device: the CUDA device whose tensors are staged.
        num_slots: the staging area's slots.
    """

    def __init__(self, device: torch.device, num_slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # One float64 per slot, filled with the job's seq on the copy stream, then copied into the
        # slot's job word: a device-to-host copy into pinned memory is asynchronous and ordered.
        self._bells = torch.zeros(num_slots, dtype=torch.float64, device=device)
        self._read_back: list[torch.cuda.Event | None] = [None] * num_slots

    def stage(self, slot: int, dst: list[torch.Tensor], src: list[torch.Tensor], job_word: torch.Tensor,
              seq: int) -> None:
        """Copies ``src[i]`` (CUDA tensors) into ``dst[i]`` (the slot's pinned views), then writes
        ``seq`` into ``job_word`` (the slot's ``[1]`` float64 seq word), all on the copy stream.
        Returns at once; the worker sees the job once the copies ran."""
        s = self.stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        event = self._read_back[slot]
        if event is not None:  # the previous job's result is read from this slot by then
            s.wait_event(event)
            self._read_back[slot] = None
        with torch.cuda.stream(s):
            for d, x in zip(dst, src):
                d.copy_(x, non_blocking=True)
            bell = self._bells[slot: slot + 1]
            bell.fill_(float(seq))
            job_word.copy_(bell, non_blocking=True)
        for x in src:
            x.record_stream(s)

    def read_back(self, slot: int, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """Copies the slot's results ``src[i]`` (pinned) into ``dst[i]`` (CUDA tensors) without
        blocking, on the compute stream, and guards the slot until they ran."""
        for d, x in zip(dst, src):
            d.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._read_back[slot] = event

    def release_to_host(self, slot: int) -> None:
        """Blocks until the slot's last results have been read (before the host writes into it)."""
        event = self._read_back[slot]
        if event is not None:
            event.synchronize()
            self._read_back[slot] = None
