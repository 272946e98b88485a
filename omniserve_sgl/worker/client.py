"""Client side of the CPU attention worker: starts (or connects to) the worker process, shares the
BE KV pool and a staging area with it, and submits decode-attention jobs asynchronously.

    client = CPUAttentionClient.start(threads=2)
    client.attach_pool(pool)                       # a BEKVPool this process owns
    job = client.submit_decode(layer, q, indptr, indices, last, k_new=k, v_new=v)
    ...                                            # overlap other work
    out, lse = client.wait(job)
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import torch
import zmq

from omniserve_sgl.kv.pool import BEKVPool, dtype_name
from omniserve_sgl.worker import protocol as P
from omniserve_sgl.worker.staging import METHODS, WATCH_MARGIN_S, StagingArea, StagingSpec
from omniserve_sgl.worker.stream_handoff import StreamHandoff


class WorkerError(RuntimeError):
    """The worker refused a message or a job failed; the message says why."""


class WorkerDiedError(WorkerError):
    """The worker process exited; jobs in flight are lost (BE requests must be retried)."""


@dataclass
class Job:
    """A submitted decode-attention job: its sequence number, staging slot and row count."""

    seq: int
    slot: int
    num_rows: int


class CPUAttentionClient:
    """Talks to one CPU attention worker over a ZeroMQ DEALER socket.

    Not thread-safe: use it from one thread (the SGLang scheduler's).
    """

    def __init__(self, endpoint: str, process: subprocess.Popen | None = None, spin_us: float = 0.0,
                 token: str | None = None):
        self.endpoint = endpoint
        self.token = token
        self.process = process
        self.spin_s = spin_us * 1e-6  # see start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._seq = 0
        self._replies: dict[int, P.Reply] = {}
        # Messages whose replies are still wanted; a reply to anything else (a job wait() finished
        # from shared memory, a ping that timed out) is dropped when it arrives.
        self._awaiting: set[int] = set()
        self.pool: BEKVPool | None = None
        self._pool_name: str | None = None
        self.staging: StagingArea | None = None
        self._staging_name: str | None = None
        self._free_slots: list[int] = []
        # Per slot, the plan id of the paged-KV metadata staged in it: every layer of a decode step
        # shares the step's metadata, so it is copied once per slot and step, not once per layer.
        self._staged_meta: dict[int, int] = {}
        # Plan ids of recent metadata, by the tensors' identities (held, so no new tensor can take
        # them): the worker plans each id once (job word plan_id).
        self._plan_ids: dict[tuple[int, ...], tuple[tuple, tuple, int]] = {}
        self._last_plan_id = 0
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # see _row_views
        self.last_kernel_us = 0.0
        self._private_dir: str | None = None  # the endpoint's directory, made by start()
        self.job_messages = 0  # jobs announced over ZeroMQ too (the worker was not polling doorbells)
        self.result_messages = 0  # results wait() took from a ZeroMQ reply (it was not polling done words)
        self._gpu: StreamHandoff | None = None  # for jobs from CUDA tensors (stream_handoff.py)
        self.plans_made = 0  # jobs for which the worker checked and split a page table (the rest reused one)
        if token is not None and process is None:  # a second client of a running worker
            self._request(P.Hello(self._next_seq(), token), timeout=30.0)

    # lifecycle ------------------------------------------------------------------------------
    @classmethod
    def start(cls, threads: int | None = None, cores: str | None = None, endpoint: str | None = None,
              startup_timeout: float = 60.0, spin_us: float = 0.0, keep_endpoint: bool = False) -> CPUAttentionClient:
        """Spawns ``python -m omniserve_sgl.worker`` as a child of this process and waits until it
        answers. The worker exits by itself if this process dies.

        Only this client can use the worker: its ``ipc://`` socket is made in a new directory that
        only this user can enter (mode 0700), the worker gets a random token in its environment and
        answers a peer only after that peer's Hello with it, and once connected the socket file and
        its directory are removed (a connected ipc socket works on without them), so nothing is
        left on disk even if every process is killed.

        Args:
            threads: kernel threads (default: one per core it may run on).
            cores: CPU cores for the worker, e.g. ``"2-5"`` (default: inherited affinity).
            endpoint: ZeroMQ address (default: a fresh ``ipc://`` socket in a private directory).
            spin_us: microseconds each side busy-polls shared memory for the other before blocking
                on ZeroMQ: the worker after a job, the client in :meth:`wait` (beyond twice the
                previous job's kernel time). Worth it only when the worker has cores of its own; 0
                (the default) never spins.
            keep_endpoint: leave the default socket file in place, for a second client that is
                given ``endpoint`` and ``token``.

        Raises:
            WorkerDiedError: the worker exited during start-up (its stderr is in the message).
            TimeoutError: no answer within ``startup_timeout`` seconds.
        """
        private_dir = None
        if endpoint is None:
            private_dir = tempfile.mkdtemp(prefix=f"omniserve-{os.getpid()}-")  # mode 0700
            endpoint = f"ipc://{private_dir}/worker.sock"
        token = secrets.token_hex(16)
        cmd = [sys.executable, "-m", "omniserve_sgl.worker", "--endpoint", endpoint, "--parent-pid", str(os.getpid())]
        if threads:
            cmd += ["--threads", str(threads)]
        if cores:
            cmd += ["--cores", cores]
        if spin_us:
            cmd += ["--spin-us", str(spin_us)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env={**os.environ, P.TOKEN_ENV: token})
        client = cls(endpoint, proc, spin_us, token)
        client._private_dir = private_dir
        try:
            client._request(P.Hello(client._next_seq(), token), timeout=startup_timeout)
        except TimeoutError:
            client.kill()
            raise TimeoutError(f"CPU attention worker did not answer within {startup_timeout} s") from None
        except BaseException:
            client.kill()
            raise
        if private_dir is not None and not keep_endpoint:
            client._remove_endpoint()
        return client

    def _remove_endpoint(self) -> None:
        """Removes the socket file and its private directory (idempotent)."""
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass
        if self._private_dir is not None:
            try:
                os.rmdir(self._private_dir)
            except OSError:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Shuts the worker down (if this client started it) and releases shared memory."""
        if self.process is not None and self.process.poll() is None:
            try:
                self._request(P.Shutdown(self._next_seq()), timeout=timeout)
            except (WorkerError, TimeoutError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.staging is not None:
            self._views = {}
            self.staging.close()
            self.staging = None
        self.sock.close(0)
        self.ctx.term()
        if self.process is not None:  # in case the worker was killed before it removed them
            self._remove_endpoint()

    def kill(self) -> str:
        """Ends a dead or hung worker at once (SIGKILL, no shutdown message), releases this side's
        shared memory and sockets, and says how the worker ended, e.g. ``"exit status -9"``."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.close(timeout=0.0)
        return f"exit status {self.process.returncode}" if self.process is not None else "not started by this client"

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    # control --------------------------------------------------------------------------------
    def ping(self, timeout: float = 5.0) -> float:
        """Round trip of an empty message, in seconds. Raises TimeoutError or WorkerDiedError."""
        t0 = time.perf_counter()
        self._request(P.Ping(self._next_seq()), timeout)
        return time.perf_counter() - t0

    def attach_pool(self, pool: BEKVPool, timeout: float = 30.0) -> None:
        """Shares ``pool`` (created by this process) with the worker and sizes a staging area for it.

        Args:
            pool: the BE KV pool; jobs attend over it.
        """
        name = f"pool-{uuid.uuid4().hex[:8]}"
        self._request(P.Attach(self._next_seq(), name, "kv_pool", pool.handle()), timeout)
        self.pool, self._pool_name = pool, name

    def create_staging(self, num_slots: int, max_rows: int, max_pages: int, num_qo_heads: int,
                       timeout: float = 30.0) -> StagingArea:
        """Allocates ``num_slots`` staging slots (jobs in flight at once) for up to ``max_rows`` rows
        and ``max_pages`` KV pages each, matching the attached pool, and shares them with the worker."""
        if self.pool is None:
            raise RuntimeError("attach_pool() first: staging slots are sized from the pool")
        ps = self.pool.spec
        spec = StagingSpec(num_slots, max_rows, max_pages, num_qo_heads, ps.num_kv_heads, ps.head_dim, ps.dtype)
        area = StagingArea.create(spec)
        name = f"staging-{uuid.uuid4().hex[:8]}"
        try:
            self._request(P.Attach(self._next_seq(), name, "staging", area.handle(), self._pool_name), timeout)
        except BaseException:
            area.close()
            raise
        if self.staging is not None:  # replaced: the worker unmaps it too
            self._request(P.Detach(self._next_seq(), self._staging_name), timeout)
            self._views = {}  # views keep a segment mapped
            self.staging.close()
        self.staging, self._staging_name = area, name
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._staged_meta = {}
        self._gpu = None
        return area

    # jobs -----------------------------------------------------------------------------------
    def submit_decode(self, layer: int, q: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                      kv_last_page_len: torch.Tensor, k_new: torch.Tensor | None = None,
                      v_new: torch.Tensor | None = None, sm_scale: float | None = None,
                      method: str = "kernel") -> Job:
        """Queues decode attention of ``B`` rows at ``layer`` and returns at once.

        Args:
            layer: model layer, indexing the pool's caches.
            q: ``[B, H_q, D]`` in the pool's dtype (any device; copied into the staging slot). From
                a CUDA device, q/k/v are copied on a copy stream after the current stream's work
                and that stream rings the job's doorbell: the call does not wait for the GPU
                (:mod:`omniserve_sgl.worker.stream_handoff`).
            kv_indptr, kv_indices, kv_last_page_len: int32 paged-KV metadata of the rows' sequences
                in the pool (as :meth:`PageAllocator.kv_metadata` gives, counting the new token).
            k_new, v_new: ``[B, H_kv, D]``, the rows' new K/V, appended to the pool before attending.
            sm_scale: softmax scale, default ``1 / sqrt(D)``.
            method: ``"kernel"`` (omniserve's decode kernel, out and LSE) or ``"sdpa"`` (torch SDPA per
                row as SGLang's torch_native backend computes it, bit for bit; out only).

        Raises:
            RuntimeError: no free staging slot (wait for a job first) or no pool/staging attached.
            ValueError: sizes beyond the staging slot or mismatched with the pool.
        """
        if self.staging is None:
            raise RuntimeError("create_staging() first")
        if not self._free_slots:
            raise RuntimeError(f"all {self.staging.spec.num_slots} staging slots are in flight; wait() for a job first")
        spec = self.staging.spec
        n, nnz = q.shape[0], kv_indices.shape[0]
        if n > spec.max_rows or nnz > spec.max_pages:
            raise ValueError(f"{n} rows / {nnz} pages exceed a staging slot ({spec.max_rows} rows, "
                             f"{spec.max_pages} pages)")
        if tuple(q.shape[1:]) != (spec.num_qo_heads, spec.head_dim) or dtype_name(q.dtype) != spec.dtype:
            raise ValueError(f"q must be [B, {spec.num_qo_heads}, {spec.head_dim}] {spec.dtype}, got "
                             f"{tuple(q.shape)} {q.dtype}")
        if (k_new is None) != (v_new is None):
            raise ValueError("give both k_new and v_new, or neither")
        slot = self._free_slots.pop()
        views = self._row_views(slot, n)
        src = [q] if k_new is None else [q, k_new, v_new]
        dst = [views["q"]] if k_new is None else [views["q"], views["k"], views["v"]]
        gpu = self._gpu_for(q) if q.is_cuda else None
        try:
            if gpu is None:
                if self._gpu is not None:
                    self._gpu.release_to_host(slot)
                for d, x in zip(dst, src):
                    d.copy_(x)
            meta = (kv_indptr, kv_indices, kv_last_page_len)
            plan_id = self._plan_id(meta)
            if self._staged_meta.get(slot) != plan_id:
                views["kv_indptr"].copy_(kv_indptr)
                self.staging.slots[slot]["kv_indices"][:nnz].copy_(kv_indices)
                views["kv_last_page_len"].copy_(kv_last_page_len)
                self._staged_meta[slot] = plan_id
            scale = 1.0 / math.sqrt(spec.head_dim) if sm_scale is None else float(sm_scale)
            seq = self._next_seq()
            words = self.staging.jobs[slot]
            words[1:] = (layer, n, nnz, k_new is not None, METHODS.index(method) if method in METHODS else -1, scale,
                         plan_id)
            if gpu is None:
                words[0] = seq  # the doorbell: last, after the inputs and the job words
            else:  # rung by the copy stream after the data (stream_handoff.py)
                gpu.stage(slot, dst, src, self.staging.slots[slot]["job"][:1], seq)
            self._awaiting.add(seq)
            if self.staging.watch[slot][0] < time.perf_counter() + WATCH_MARGIN_S:
                # The worker is not polling the doorbells: wake it.
                self.sock.send(P.encode(P.Attend(seq, self._pool_name, self._staging_name, slot, layer, n, nnz,
                                                 k_new is not None, scale, method)))
                self.job_messages += 1
        except BaseException:
            self._free_slots.append(slot)
            self._staged_meta.pop(slot, None)
            raise
        return Job(seq, slot, n)

    def _gpu_for(self, t: torch.Tensor) -> StreamHandoff:
        """The stream hand-off of ``t``'s CUDA device (made on first use)."""
        if self._gpu is None or self._gpu.device != t.device:
            self._gpu = StreamHandoff(t.device, self.staging.spec.num_slots)
        return self._gpu

    def _plan_id(self, meta: tuple[torch.Tensor, ...]) -> int:
        """The id of paged-KV metadata ``meta``: the same while the same tensors are unchanged
        (their versions count in-place writes), a new one otherwise."""
        key = tuple(id(t) for t in meta)
        versions = tuple(t._version for t in meta)
        known = self._plan_ids.get(key)
        if known is not None and known[1] == versions:
            return known[2]
        self._last_plan_id += 1
        if len(self._plan_ids) >= 64:  # the worker keeps as many plans (csrc/doorbell.cpp)
            del self._plan_ids[next(iter(self._plan_ids))]
        self._plan_ids[key] = (meta, versions, self._last_plan_id)
        return self._last_plan_id

    def poll(self, job: Job) -> bool:
        """Whether ``job``'s result has arrived (never blocks)."""
        if self.staging.done[job.slot][0] >= job.seq:
            return True
        self._drain(0)
        return job.seq in self._replies

    def wait(self, job: Job, timeout: float | None = None, out: torch.Tensor | None = None,
             lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks until ``job`` is done and returns ``(out [B, H_q, D], lse [B, H_q] float32)``,
        copied into ``out``/``lse`` when given (any device; into a CUDA tensor without blocking, on
        the current stream) and freeing the staging slot.

        Raises:
            WorkerError: the job failed (bad metadata, ...); the slot is freed.
            WorkerDiedError: the worker exited.
            TimeoutError: no result within ``timeout`` seconds (the job stays in flight).
        """
        done, watch = self.staging.done[job.slot], self.staging.watch[job.slot]
        if self.spin_s and done[0] < job.seq:
            # Polls for twice the previous job's kernel time (the layers of a decode step are alike)
            # plus spin_s: with spin_s alone, every job whose kernel outlasted it waited for a
            # ZeroMQ reply. While this word is ahead of the clock, the worker writes done words and
            # sends no reply.
            watch[1] = spin_until = time.perf_counter() + self.spin_s + 2e-6 * self.last_kernel_us
            while done[0] < job.seq and time.perf_counter() < spin_until:
                pass
            watch[1] = 0.0
        if done[0] >= job.seq and done[1]:  # finished and fine (the worker writes seq after ok and time)
            kernel_us, error = float(done[2]), None
            self._awaiting.discard(job.seq)
            self._replies.pop(job.seq, None)
        else:  # failed (the reply has the message), or not done yet: block on ZeroMQ
            reply = self._await(job.seq, timeout)
            self.result_messages += reply.ok
            kernel_us, error = reply.kernel_us, None if reply.ok else reply.error
        try:
            if error is not None:
                raise WorkerError(error)
            self.last_kernel_us = kernel_us
            self.plans_made += int(done[3])  # written before the reply and before done's seq
            views = self._row_views(job.slot, job.num_rows)
            got, to_gpu = [], []
            for dst, src in ((out, views["out"]), (lse, views["lse"])):
                if dst is None:
                    dst = src.clone()
                elif dst.is_cuda:
                    to_gpu.append((dst, src))
                else:
                    dst.copy_(src)
                got.append(dst)
            if to_gpu:  # non-blocking; the slot is guarded until the copies ran
                self._gpu_for(to_gpu[0][0]).read_back(job.slot, [d for d, _ in to_gpu], [s for _, s in to_gpu])
            return got[0], got[1]
        finally:
            self._free_slots.append(job.slot)

    def _row_views(self, slot: int, n: int) -> dict[str, torch.Tensor]:
        """Slot ``slot``'s per-row tensors cut to ``n`` rows, cached: the layers of a decode step
        cut the same views, and cutting them took several microseconds per job."""
        views = self._views.get((slot, n))
        if views is None:
            s = self.staging.slots[slot]
            views = {name: s[name][:n] for name in ("q", "k", "v", "out", "lse", "kv_last_page_len")}
            views["kv_indptr"] = s["kv_indptr"][: n + 1]
            self._views[(slot, n)] = views
        return views

    # transport ------------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _request(self, msg, timeout: float) -> P.Reply:
        self._awaiting.add(msg.seq)
        self.sock.send(P.encode(msg))
        reply = self._await(msg.seq, timeout)
        if not reply.ok:
            raise WorkerError(reply.error)
        return reply

    def _drain(self, timeout_ms: int) -> None:
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    data = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                reply = P.decode(data)
                if reply.seq in self._awaiting:
                    self._replies[reply.seq] = reply

    def _await(self, seq: int, timeout: float | None) -> P.Reply:
        deadline = None if timeout is None else time.monotonic() + timeout
        while seq not in self._replies:
            if not self.alive():
                raise WorkerDiedError(f"CPU attention worker exited with code {self.process.returncode}")
            wait_ms = 100 if deadline is None else max(0, min(100, int((deadline - time.monotonic()) * 1000)))
            self._drain(wait_ms)
            if seq not in self._replies and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no reply from the CPU attention worker for message {seq} within {timeout} s")
        self._awaiting.discard(seq)
        return self._replies.pop(seq)
