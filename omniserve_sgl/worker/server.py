"""The CPU attention worker process: maps the BE KV pool and staging slots, runs decode-attention
jobs on its own kernel threads, and answers over ZeroMQ (every error, and every result its client
is not busy-polling shared memory for).

Jobs run one after another in arrival order; the client keeps several in flight and collects the
replies when it likes. A job announced in a slot's doorbell runs in a C++ loop (``_C.DoorbellLoop``,
csrc/doorbell.cpp) from pick-up to the done words, so no Python runs between the two sides' shared
memory; this module serves the socket, and runs what that loop hands back (another method, bad job
words, a failing job). After each job the worker busy-polls the doorbells (and, every SLICE_S, its
socket) for ``spin_s`` seconds before it blocks on ZeroMQ again, and says so in the slots' watch
words: with cores of its own, that takes ZeroMQ out of the per-layer hand-off both ways. A job's
message may come before its doorbell (a GPU stream rings it once the job's data has landed,
``stream_handoff.py``): the worker then polls that doorbell instead of running the slot's old
words. The worker exits on a Shutdown message, on SIGTERM, or when its parent process is gone."""

from __future__ import annotations

import hmac
import logging
import os
import time

import numpy as np
import torch
import zmq

from omniserve_sgl import _C, ops
from omniserve_sgl.kv.pool import BEKVPool
from omniserve_sgl.worker import protocol as P
from omniserve_sgl.worker.staging import (
    DONE_FIELDS,
    JOB_FIELDS,
    METHODS,
    WATCH_FIELDS,
    WATCH_MARGIN_S,
    StagingArea,
)

logger = logging.getLogger("omniserve.worker")

PARENT_CHECK_S = 0.2  # how often an idle worker checks that its parent is alive
SLICE_S = 100e-6  # the longest the C++ doorbell loop spins before the socket is served again
# How long a job's ZeroMQ message waits for its doorbell: a GPU stream rings it once the job's data
# has landed (worker/stream_handoff.py), which can be after the message arrives.
BELL_WAIT_S = 30.0
IDLE, REPLY = _C.DoorbellLoop.IDLE, _C.DoorbellLoop.REPLY  # what DoorbellLoop.serve() returns first


class Worker:
    def __init__(self, endpoint: str, parent_pid: int | None, spin_s: float = 0.0, token: str | None = None):
        self.endpoint = endpoint
        self.token = token  # when set, a peer must say it (Hello) before anything else is done
        self.greeted: set[bytes] = set()
        self.parent_pid = parent_pid
        self.spin_s = spin_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.pools: dict[str, BEKVPool] = {}
        self.staging: dict[str, StagingArea] = {}
        self.staging_pool: dict[str, str] = {}  # staging name -> the pool its doorbell jobs use
        self.peers: dict[str, bytes] = {}  # staging name -> identity of the client that attached it
        self.handled: dict[str, np.ndarray] = {}  # staging name -> last job seq run, per slot (shared with its loop)
        self.loops: dict[str, _C.DoorbellLoop] = {}  # staging name -> the C++ loop that runs its doorbell jobs
        self._views: dict[tuple, tuple] = {}  # (staging name, slot, rows) -> the slot's tensors cut to rows
        # (staging name, slot) -> (seq, deadline) of jobs whose message came before their doorbell
        self.early: dict[tuple[str, int], tuple[int, float]] = {}
        self.running = True

    def parent_alive(self) -> bool:
        return self.parent_pid is None or os.getppid() == self.parent_pid

    def serve(self) -> None:
        spin_until = 0.0
        while self.running:
            now = time.perf_counter()  # before the doorbells are read: see WATCH_MARGIN_S
            if self.early:  # poll until their doorbells ring
                spin_until = max(spin_until, now + SLICE_S)
            spin_until = self.run_doorbells(spin_until)
            self._check_early()
            spinning = now < spin_until or bool(self.early)
            if not self.sock.poll(0 if spinning else PARENT_CHECK_S * 1000):
                if not spinning and not self.parent_alive():
                    logger.warning("parent process %s is gone; CPU attention worker exits", self.parent_pid)
                    break
                continue
            while self.running:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2:  # [peer identity, payload]
                    self.sock.send_multipart([frames[0], P.encode(P.Reply(-1, False, "expected one frame per message"))])
                    continue
                reply = self.handle(frames[1], frames[0])
                if reply is not None:
                    self.sock.send_multipart([frames[0], P.encode(reply)])
            spin_until = self._polling_until(time.perf_counter() + self.spin_s)
        self.close()

    def _check_early(self) -> None:
        """Forgets early messages whose job ran; refuses those whose doorbell never rang."""
        for (name, slot), (seq, deadline) in list(self.early.items()):
            handled = self.handled.get(name)
            if handled is None or handled[slot] >= seq:
                del self.early[(name, slot)]
            elif time.perf_counter() > deadline:
                del self.early[(name, slot)]
                self.sock.send_multipart([self.peers[name], P.encode(P.Reply(
                    seq, False, f"job {seq}'s doorbell was not rung within {BELL_WAIT_S:.0f} s of its message"))])

    def _polling_until(self, t: float) -> float:
        """Publishes that the doorbells are polled until ``t`` (clients then send no ZeroMQ message
        for a job); the serve loop reads the doorbells once more after ``t`` before it blocks."""
        if self.spin_s:
            for area in self.staging.values():
                for watch in area.watch:
                    watch[0] = t
        return t

    def run_doorbells(self, until: float) -> float:
        """Runs the jobs announced in the slots' job words, polling them until ``until`` (in slices
        of SLICE_S, so the socket is served too); a job run extends it by ``spin_s``. Kernel jobs run
        in the C++ loop; the rest (another method, bad words, a failing job) run here, which sends
        the error. Returns the new polling deadline."""
        slice_s = SLICE_S if len(self.loops) == 1 else 0.0  # several areas: one pass each, in turn
        before = until
        for name, loop in list(self.loops.items()):
            while True:
                code, slot, seq, kernel_us, until = loop.serve(until, slice_s, self.spin_s)
                if code == IDLE:
                    break
                if code == REPLY:
                    reply = P.Reply(int(seq), True, kernel_us=kernel_us)
                else:
                    reply = self.run_attend(self._job_from_words(name, slot))
                if reply is not None:
                    self.sock.send_multipart([self.peers[name], P.encode(reply)])
        if until > before and len(self.loops) > 1:  # each loop publishes its own area only
            self._polling_until(until)
        return until

    def _job_from_words(self, name: str, slot: int) -> P.Attend:
        job = dict(zip(JOB_FIELDS, self.staging[name].jobs[slot].tolist()))  # the fields were written before seq
        method = int(job["method"])
        return P.Attend(int(job["seq"]), self.staging_pool.get(name, ""), name, slot, int(job["layer"]),
                        int(job["num_rows"]), int(job["num_pages"]), bool(job["append_kv"]), job["sm_scale"],
                        METHODS[method] if 0 <= method < len(METHODS) else "?")

    def handle(self, data: bytes, peer: bytes = b"") -> P.Reply | None:
        """Answers one ZeroMQ message; None for an Attend its doorbell already ran (answered then)
        or whose client watches the done words (see :meth:`run_attend`)."""
        seq = -1
        try:
            msg = P.decode(data)
            seq = msg.seq
            greeted = self.token is None or peer in self.greeted
            if not greeted and not (isinstance(msg, P.Hello) and hmac.compare_digest(msg.token, self.token)):
                return P.Reply(seq, False, "this CPU attention worker answers only the scheduler that started "
                               "it: send Hello with its token first")
            if isinstance(msg, P.Hello):
                self.greeted.add(peer)
                return P.Reply(seq, True)
            if isinstance(msg, P.Attend):
                if msg.staging in self.loops:  # its doorbell was rung before the message was sent
                    self.run_doorbells(0.0)
                handled = self.handled.get(msg.staging)
                if handled is not None and 0 <= msg.slot < len(handled):
                    if msg.seq <= handled[msg.slot]:
                        return None
                    if self.staging[msg.staging].jobs[msg.slot][0] < msg.seq:  # its data is on the way
                        self.early[(msg.staging, msg.slot)] = (msg.seq, time.perf_counter() + BELL_WAIT_S)
                        return None
                return self.run_attend(msg)
            if isinstance(msg, P.Ping):
                return P.Reply(seq, True)
            if isinstance(msg, P.Attach):
                return self.attach(msg, peer)
            if isinstance(msg, P.Detach):
                pool, staging = self.pools.pop(msg.name, None), self.staging.pop(msg.name, None)
                for table in (self.staging_pool, self.peers, self.handled, self.loops):
                    table.pop(msg.name, None)
                for name in [n for n, p in self.staging_pool.items() if p == msg.name]:
                    self.loops.pop(name, None)  # it holds the pool's caches
                self._views.clear()
                for seg in (pool, staging):
                    if seg is not None:
                        seg.close()
                return P.Reply(seq, True)
            if isinstance(msg, P.Shutdown):
                self.running = False
                return P.Reply(seq, True)
            raise P.ProtocolError(f"the worker does not take {type(msg).__name__} messages")
        except Exception as e:  # noqa: BLE001  a bad job gets an error reply, never a dead worker
            return P.Reply(seq, False, f"{type(e).__name__}: {e}")

    def attach(self, msg: P.Attach, peer: bytes) -> P.Reply:
        if msg.kind == "kv_pool":
            self.pools[msg.name] = BEKVPool.attach(msg.handle)
        elif msg.kind == "staging":
            pool = self.pools.get(msg.pool)
            if pool is None:
                raise P.ProtocolError(f"attach the KV pool {msg.pool!r} before a staging area that uses it")
            area = StagingArea.attach(msg.handle)
            handled = torch.tensor([float(w[0]) for w in area.jobs], dtype=torch.float64)  # earlier jobs are stale
            fields = [f for f, _, _ in area.spec.fields()]
            self.loops[msg.name] = _C.DoorbellLoop(
                [[slot[f] for f in fields] for slot in area.slots], fields, list(JOB_FIELDS), list(DONE_FIELDS),
                list(WATCH_FIELDS), [pool.k_cache(i) for i in range(pool.spec.num_layers)],
                [pool.v_cache(i) for i in range(pool.spec.num_layers)], pool.spec.kv_layout, handled, WATCH_MARGIN_S)
            self.staging[msg.name] = area
            self.staging_pool[msg.name] = msg.pool
            self.peers[msg.name] = peer
            self.handled[msg.name] = handled.numpy()
        else:
            raise P.ProtocolError(f"Attach.kind must be 'kv_pool' or 'staging', got {msg.kind!r}")
        return P.Reply(msg.seq, True)

    def run_attend(self, msg: P.Attend) -> P.Reply | None:
        """Runs one job and publishes its completion in the slot's done words (seq last). Returns
        the reply to send, or None for a job that succeeded while its client polls the done words
        (it stops polling no earlier than WATCH_MARGIN_S from now, and reads them once more then)."""
        area = self.staging.get(msg.staging)
        slot_ok = area is not None and 0 <= msg.slot < len(area.jobs)
        if slot_ok:
            self.handled[msg.staging][msg.slot] = max(self.handled[msg.staging][msg.slot], msg.seq)
        try:
            reply = self.attend(msg)
        except Exception as e:  # noqa: BLE001  a bad job gets an error reply, never a dead worker
            reply = P.Reply(msg.seq, False, f"{type(e).__name__}: {e}")
        if slot_ok:
            done = area.done[msg.slot]
            done[1], done[2], done[3] = float(reply.ok), reply.kernel_us, float(reply.ok and msg.method == "kernel")
            done[0] = msg.seq
            if reply.ok and area.watch[msg.slot][1] > time.perf_counter() + WATCH_MARGIN_S:
                return None
        return reply

    def attend(self, msg: P.Attend) -> P.Reply:
        pool = self.pools.get(msg.pool)
        area = self.staging.get(msg.staging)
        if pool is None or area is None:
            raise KeyError(f"unknown pool {msg.pool!r} or staging {msg.staging!r}; attach them first")
        spec = area.spec
        if not 0 <= msg.slot < spec.num_slots:
            raise IndexError(f"slot {msg.slot} outside 0..{spec.num_slots - 1}")
        if not 0 <= msg.layer < pool.spec.num_layers:
            raise IndexError(f"layer {msg.layer} outside 0..{pool.spec.num_layers - 1}")
        if not (0 <= msg.num_rows <= spec.max_rows and 0 <= msg.num_pages <= spec.max_pages):
            raise ValueError(f"{msg.num_rows} rows / {msg.num_pages} pages exceed the slot "
                             f"({spec.max_rows} rows, {spec.max_pages} pages)")
        if msg.method not in METHODS:  # before anything is written into the pool
            raise ValueError(f"unknown attention method {msg.method!r}; use 'kernel' or 'sdpa'")
        q, k, v, out, lse, indptr, last = self._row_views(msg.staging, area, msg.slot, msg.num_rows)
        indices = area.slots[msg.slot]["kv_indices"][: msg.num_pages]
        k_cache, v_cache = pool.k_cache(msg.layer), pool.v_cache(msg.layer)
        t0 = time.perf_counter()
        if msg.append_kv:
            ops.append_paged_kv(k, v, k_cache, v_cache, indptr, indices, last, pool.spec.kv_layout)
        if msg.method == "kernel":
            ops.paged_decode_attention(q, k_cache, v_cache, indptr, indices, last, msg.sm_scale,
                                       pool.spec.kv_layout, out=out, lse=lse)
        else:  # "sdpa", checked above
            _sdpa_decode(q, k_cache, v_cache, indptr, indices, last, msg.sm_scale, pool.spec.kv_layout, out)
        return P.Reply(msg.seq, True, kernel_us=(time.perf_counter() - t0) * 1e6)

    def _row_views(self, name: str, area: StagingArea, slot: int, n: int) -> tuple:
        """Slot ``slot``'s tensors cut to ``n`` rows: q, k, v, out, lse, kv_indptr, kv_last_page_len.
        Cached: every layer of a decode step cuts the same views, and each cut costs a microsecond."""
        key = (name, slot, n)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 4096:
                self._views.clear()
            s = area.slots[slot]
            views = (s["q"][:n], s["k"][:n], s["v"][:n], s["out"][:n], s["lse"][:n], s["kv_indptr"][: n + 1],
                     s["kv_last_page_len"][:n])
            self._views[key] = views
        return views

    def close(self) -> None:
        self._views.clear()
        self.loops.clear()  # they hold views of the segments
        for seg in [*self.pools.values(), *self.staging.values()]:
            seg.close()
        self.sock.close(0)
        self.ctx.term()
        if self.endpoint.startswith("ipc://"):  # the binder owns the socket file
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass


def _sdpa_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale, kv_layout, out):
    """Decode attention row by row with ``torch.nn.functional.scaled_dot_product_attention``, called
    exactly as SGLang's torch_native backend calls it (``TorchNativeAttnBackend._run_sdpa_forward_decode``:
    ``[H, 1, D]`` query view, ``[H, L, D]`` K/V views of contiguous ``[L, H, D]`` gathers, same scale
    and GQA flag), so a BE row gets bit for bit what it would get as an LS row on SGLang's CPU device."""
    nhd = kv_layout == "NHD"
    page_size, h_kv = (k_cache.shape[1], k_cache.shape[2]) if nhd else (k_cache.shape[2], k_cache.shape[1])
    h_q = q.shape[1]
    query = q.movedim(0, 1)
    for i in range(q.shape[0]):
        pages = kv_indices[kv_indptr[i]: kv_indptr[i + 1]].long()
        n = (len(pages) - 1) * page_size + int(kv_last_page_len[i])
        k, v = k_cache[pages], v_cache[pages]
        if not nhd:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        k = k.reshape(-1, h_kv, k.shape[-1])[:n].contiguous().movedim(0, 1)
        v = v.reshape(-1, h_kv, v.shape[-1])[:n].contiguous().movedim(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(
            query[:, i: i + 1, :].unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), enable_gqa=h_q != h_kv,
            scale=sm_scale)
        out[i: i + 1] = o.squeeze(0).movedim(1, 0)


def run_worker(endpoint: str, parent_pid: int | None = None, threads: int | None = None, spin_us: float = 0.0) -> None:
    """Entry function of the worker process: serves ``endpoint`` (a ZeroMQ address to bind) until
    shut down or orphaned. ``threads`` sets the kernel threads (default: torch's); ``spin_us`` how long
    the worker busy-polls for the next job after one (0: it blocks on ZeroMQ at once)."""
    if threads:
        torch.set_num_threads(threads)
    logger.info("CPU attention worker on %s: %d threads, kernel %s", endpoint, torch.get_num_threads(),
                ops.decode_backend())
    Worker(endpoint, parent_pid, spin_us * 1e-6, os.environ.pop(P.TOKEN_ENV, None)).serve()
