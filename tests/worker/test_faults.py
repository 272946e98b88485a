"""Worker faults under the scheduler-side BE runtime (no SGLang): a worker that is killed or hangs
with a job in flight is replaced, the job runs again on the new worker with the same result, and a
worker that keeps failing turns BE serving off instead of failing the caller's step forever."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from omniserve_sgl import ops
from omniserve_sgl.be_runtime import MAX_STARTS_PER_WINDOW, BERuntime, BEUnavailableError
from omniserve_sgl.config import OmniServeConfig

LAYERS, HQ, HKV, D = 2, 6, 2, 64
PROMPTS = {"a": 40, "b": 7}


def _runtime(**cfg) -> BERuntime:
    config = OmniServeConfig(True, cpu_kv_gb=0.01, cpu_threads=1, **cfg)
    rt = BERuntime(config, LAYERS, HKV, D, HQ, torch.bfloat16, max_rows=4)
    gen = torch.Generator().manual_seed(0)
    for rid, n in PROMPTS.items():
        rt.reserve(rid, n + 8)
        rt.store_kv(rid, [(torch.randn(n, HKV, D, generator=gen).bfloat16(),
                                torch.randn(n, HKV, D, generator=gen).bfloat16()) for _ in range(LAYERS)])
    return rt


def _decode_layer(rt: BERuntime, layer: int, before_submit=None, before_wait=None):
    """One layer of one decode step through the runtime; returns (out, reference out)."""
    plan = rt.plan_decode(list(PROMPTS), [0, 1])
    q, k, v = torch.randn(2, HQ, D).bfloat16(), torch.randn(2, HKV, D).bfloat16(), torch.randn(2, HKV, D).bfloat16()
    if before_submit is not None:  # e.g. stop the worker, so that the job is surely in flight
        before_submit()
    job = rt.submit(plan, layer, q, k, v, None)
    if before_wait is not None:
        before_wait()
    out = rt.wait(job, torch.empty(2, HQ, D, dtype=torch.bfloat16))
    ref, _ = ops.paged_decode_attention(q, rt.pool.k_cache(layer), rt.pool.v_cache(layer), plan.kv_indptr,
                                        plan.kv_indices, plan.kv_last_page_len, kv_layout=rt.pool.spec.kv_layout)
    return out, ref


@pytest.fixture
def rt():
    runtime = _runtime()
    yield runtime
    runtime.close()


def test_a_worker_killed_with_a_job_in_flight_is_replaced_and_the_job_runs_again(rt):
    first = rt.client.process
    out, ref = _decode_layer(rt, 0, before_submit=lambda: os.kill(first.pid, signal.SIGSTOP),
                             before_wait=lambda: os.kill(first.pid, signal.SIGKILL))
    assert torch.equal(out, ref)
    assert rt.worker_restarts == 1 and rt.client.process is not first and rt.client.alive()
    out, ref = _decode_layer(rt, 1)  # the new worker goes on with the next layer
    assert torch.equal(out, ref)


def test_a_hung_worker_is_killed_after_the_job_timeout_and_replaced():
    rt = _runtime(cpu_job_timeout=0.5)
    try:
        first = rt.client.process
        t0 = time.monotonic()
        out, ref = _decode_layer(rt, 0, before_submit=lambda: os.kill(first.pid, signal.SIGSTOP))
        assert torch.equal(out, ref)
        assert rt.worker_restarts == 1 and first.poll() == -signal.SIGKILL
        assert time.monotonic() - t0 < 30
    finally:
        rt.close()


def test_a_worker_that_exits_between_jobs_is_replaced_at_the_next_check(rt):
    first = rt.client.process
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    rt.check_worker()
    assert rt.worker_restarts == 1 and rt.client.alive()
    out, ref = _decode_layer(rt, 0)
    assert torch.equal(out, ref)


def test_a_worker_that_keeps_dying_turns_be_serving_off_with_a_reason(rt):
    for _ in range(MAX_STARTS_PER_WINDOW - 1):
        os.kill(rt.client.process.pid, signal.SIGKILL)
        _decode_layer(rt, 0)
    assert rt.worker_restarts == MAX_STARTS_PER_WINDOW - 1
    pid = rt.client.process.pid
    with pytest.raises(BEUnavailableError, match=f"CPU attention worker \\(pid {pid}\\) exited \\(exit status -9\\)"):
        _decode_layer(rt, 0, before_submit=lambda: os.kill(pid, signal.SIGKILL))
    assert rt.unavailable is not None and rt.client is None
    with pytest.raises(BEUnavailableError):
        _decode_layer(rt, 1)
    rt.release("a")  # the pool still works: pages go back
    assert rt.pages.used_pages == rt.pages.pages_for(PROMPTS["b"] + 4)  # its prompt and 4 decode steps
