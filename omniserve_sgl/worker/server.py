"""The CPU attention worker process: maps the BE KV pool and staging slots, runs decode-attention
jobs on its own kernel threads, and answers every message (errors included) over ZeroMQ.

Jobs run one after another in arrival order; the client keeps several in flight and collects the
replies when it likes. The worker exits on a Shutdown message, on SIGTERM, or when its parent
process is gone.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq

from omniserve_sgl import ops
from omniserve_sgl.kv.pool import BEKVPool
from omniserve_sgl.worker import protocol as P
from omniserve_sgl.worker.staging import StagingArea

logger = logging.getLogger("omniserve.worker")

PARENT_CHECK_S = 0.2  # how often an idle worker checks that its parent is alive


class Worker:
    def __init__(self, endpoint: str, parent_pid: int | None):
        self.endpoint = endpoint
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.pools: dict[str, BEKVPool] = {}
        self.staging: dict[str, StagingArea] = {}
        self.running = True

    def parent_alive(self) -> bool:
        return self.parent_pid is None or os.getppid() == self.parent_pid

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while self.running:
            if not poller.poll(PARENT_CHECK_S * 1000):
                if not self.parent_alive():
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
                self.sock.send_multipart([frames[0], P.encode(self.handle(frames[1]))])
        self.close()

    def handle(self, data: bytes) -> P.Reply:
        seq = -1
        try:
            msg = P.decode(data)
            seq = msg.seq
            if isinstance(msg, P.Attend):
                return self.attend(msg)
            if isinstance(msg, P.Ping):
                return P.Reply(seq, True)
            if isinstance(msg, P.Attach):
                return self.attach(msg)
            if isinstance(msg, P.Detach):
                pool, staging = self.pools.pop(msg.name, None), self.staging.pop(msg.name, None)
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

    def attach(self, msg: P.Attach) -> P.Reply:
        if msg.kind == "kv_pool":
            self.pools[msg.name] = BEKVPool.attach(msg.handle)
        elif msg.kind == "staging":
            self.staging[msg.name] = StagingArea.attach(msg.handle)
        else:
            raise P.ProtocolError(f"Attach.kind must be 'kv_pool' or 'staging', got {msg.kind!r}")
        return P.Reply(msg.seq, True)

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
        if msg.method not in ("kernel", "sdpa"):  # before anything is written into the pool
            raise ValueError(f"unknown attention method {msg.method!r}; use 'kernel' or 'sdpa'")
        s = area.slots[msg.slot]
        n = msg.num_rows
        indptr, indices, last = s["kv_indptr"][: n + 1], s["kv_indices"][: msg.num_pages], s["kv_last_page_len"][:n]
        k_cache, v_cache = pool.k_cache(msg.layer), pool.v_cache(msg.layer)
        t0 = time.perf_counter()
        if msg.append_kv:
            ops.append_paged_kv(s["k"][:n], s["v"][:n], k_cache, v_cache, indptr, indices, last, pool.spec.kv_layout)
        if msg.method == "kernel":
            ops.paged_decode_attention(s["q"][:n], k_cache, v_cache, indptr, indices, last, msg.sm_scale,
                                       pool.spec.kv_layout, out=s["out"][:n], lse=s["lse"][:n])
        else:  # "sdpa", checked above
            _sdpa_decode(s["q"][:n], k_cache, v_cache, indptr, indices, last, msg.sm_scale, pool.spec.kv_layout,
                         s["out"][:n])
        return P.Reply(msg.seq, True, kernel_us=(time.perf_counter() - t0) * 1e6)

    def close(self) -> None:
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


def run_worker(endpoint: str, parent_pid: int | None = None, threads: int | None = None) -> None:
    """Entry function of the worker process: serves ``endpoint`` (a ZeroMQ address to bind) until
    shut down or orphaned. ``threads`` sets the kernel threads (default: torch's)."""
    if threads:
        torch.set_num_threads(threads)
    logger.info("CPU attention worker on %s: %d threads, kernel %s", endpoint, torch.get_num_threads(),
                ops.decode_backend())
    Worker(endpoint, parent_pid).serve()
