"""Greedy BE output equals LS output token for token, and LS output under ``--omniserve`` equals
plain SGLang's, where no side rounds differently: SDPA on the worker in bf16, or the kernel in
float32. A CPU attention worker killed mid-decode changes no output either.

The sdpa and moves tests run their own servers; the float32 tests share ``f32_server``, started after them."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from omniserve_sgl.bench.launch import SGLangServer
from omniserve_sgl.kv import BEKVPoolSpec
from tests.serving.conftest import flush_cache, generate, metric, worker_processes


def test_be_output_equals_ls_output_token_for_token(model_path, plain_run, exact_texts):
    """With ``--omniserve-cpu-attention sdpa`` the worker computes BE attention with the math of
    SGLang's torch_native backend, so greedy BE output is LS output exactly, and LS output under
    --omniserve is plain SGLang's."""
    with SGLangServer(model_path, "--omniserve", "--omniserve-cpu-attention", "sdpa", "--omniserve-disable-control") as server:
        for text in exact_texts:
            flush_cache(server)
            ls = generate(server, text, 32, "ls")["output_ids"]
            flush_cache(server)
            be = generate(server, text, 32, "be")["output_ids"]
            assert len(be) == 32
            assert be == ls == plain_run.outputs[text]


def test_be_output_is_unchanged_by_moves_between_gpu_and_cpu(model_path, exact_texts):
    """Float32, every BE request moving GPU -> CPU -> GPU ... every second step
    (``OMNISERVE_TEST_MOVE_EVERY``), three at once: each BE request's greedy tokens are its LS tokens."""
    with SGLangServer(model_path, "--omniserve", "--dtype", "float32", "--omniserve-disable-control",
                      "--enable-metrics", env={"OMNISERVE_TEST_MOVE_EVERY": "2"}) as server:
        ls = []
        for text in exact_texts:
            flush_cache(server)
            ls.append(generate(server, text, 32, "ls")["output_ids"])
        flush_cache(server)
        with ThreadPoolExecutor(len(exact_texts)) as pool:
            be = list(pool.map(lambda t: generate(server, t, 32, "be")["output_ids"], exact_texts))
        assert be == ls
        moves = [metric(server, "omniserve_be_moves_total", direction=d) for d in ("to_cpu", "to_gpu")]
        assert min(moves) >= 3 * 5  # each request went both ways several times
        assert metric(server, "omniserve_cpu_attention_tokens_total") > 0
        assert metric(server, "omniserve_be_pool_pages_used") == 0


@pytest.fixture(scope="module")
def f32_server(model_path):
    """The model in float32 with omniserve's kernel; the hand-off busy-polls shared memory (the path
    where ZeroMQ is skipped) and the BE KV pool has pages of 64 tokens, not 16. Without the SLO
    controller every BE request decodes on the CPU worker."""
    with SGLangServer(model_path, "--omniserve", "--dtype", "float32", "--omniserve-cpu-spin-us", "500",
                      "--omniserve-cpu-page-size", "64", "--omniserve-cpu-kv-gb", "1", "--enable-metrics",
                      "--omniserve-disable-control") as s:
        yield s


def test_be_output_with_the_cpu_kernel_equals_ls_output_in_float32(f32_server, model, exact_texts):
    """With the default kernel and the model in float32, no probability is rounded to bf16 on either
    side, so greedy BE output is LS output token for token (here 32 tokens of 3 prompts)."""
    server = f32_server
    spec = BEKVPoolSpec.from_budget(1 << 30, model.num_layers, model.num_kv_heads, model.head_dim,
                                    page_size=64, dtype="float32")
    assert metric(server, "omniserve_be_pool_pages_capacity") == spec.num_pages
    for text in exact_texts:
        flush_cache(server)
        ls = generate(server, text, 32, "ls")["output_ids"]
        flush_cache(server)
        be = generate(server, text, 32, "be")["output_ids"]
        assert len(be) == 32 and be == ls


def test_a_worker_killed_mid_decode_changes_no_output(f32_server, prompts):
    """SIGKILL of the CPU attention worker while 2 LS and 2 BE requests decode: the scheduler starts
    a new worker on the same BE KV pool and runs the layer in flight again. Every request completes
    in full with the tokens it gets alone, and the server serves new LS and BE requests at once."""
    server = f32_server
    jobs = [(prompts[3], "ls"), (prompts[4], "be"), (prompts[5], "ls"), (prompts[6], "be")]
    alone = []
    for text, cls in jobs:
        flush_cache(server)
        alone.append(generate(server, text, 32, cls)["output_ids"])
    flush_cache(server)
    restarts = metric(server, "omniserve_worker_restarts_total")
    [worker] = worker_processes(server)
    with ThreadPoolExecutor(len(jobs)) as pool:
        started = metric(server, "omniserve_cpu_attention_tokens_total")
        futures = [pool.submit(generate, server, text, 32, cls) for text, cls in jobs]
        deadline = time.monotonic() + 120
        while metric(server, "omniserve_cpu_attention_tokens_total") == started:  # BE rows are decoding
            assert time.monotonic() < deadline, "BE decode never started"
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        after = [generate(server, "Name three colors.", 4, cls)["output_ids"] for cls in ("ls", "be")]
        answered_s = time.monotonic() - killed
        outs = [f.result()["output_ids"] for f in futures]
    assert outs == alone
    assert [len(a) for a in after] == [4, 4] and answered_s < 5.0
    assert metric(server, "omniserve_worker_restarts_total") == restarts + 1
    [new_worker] = worker_processes(server)
    assert new_worker.pid != worker.pid
    assert metric(server, "omniserve_be_pool_pages_used") == 0


def test_a_worker_that_keeps_dying_turns_be_serving_off_and_ls_goes_on(f32_server):
    """The last test on this server: each kill is noticed and replaced until the restart budget
    (three starts within a minute) is spent; then BE requests get HTTP 503 saying why, LS ones are
    served as before."""
    server = f32_server
    for _ in range(5):
        [worker] = worker_processes(server)
        os.kill(worker.pid, signal.SIGKILL)
        r = requests.post(f"{server.url}/generate", timeout=120, json={
            "text": "Count to five:", "sampling_params": {"max_new_tokens": 4, "custom_params": {"omniserve_class": "be"}}})
        if r.status_code != 200:
            break
        assert len(r.json()["output_ids"]) == 4
    assert r.status_code == 503, r.text
    assert f"the CPU attention worker (pid {worker.pid}) exited (exit status -9)" in r.text
    assert "BE serving is off" in r.text
    assert len(generate(server, "Count to five:", 4, "ls")["output_ids"]) == 4
    assert metric(server, "omniserve_be_pool_pages_used") == 0
