"""Greedy BE output equals LS output token for token, and LS output under ``--omniserve`` equals
plain SGLang's, where no side rounds differently: SDPA on the worker in bf16, or the kernel in
float32, with the scheduler switching between SGLang's overlap loop (no BE request) and the BE
path around a BE request amid streaming LS requests. A CPU attention worker killed mid-decode
changes no output either.

The sdpa and moves tests run their own servers; the float32 tests share ``f32_server``, started after them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from omniserve_sgl.bench.launch import SGLangServer
from omniserve_sgl.kv import BEKVPoolSpec
from tests.serving.conftest import flush_cache, generate, metric, stream_generate, worker_processes


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


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_mixed_steps_change_no_output(model_path, latency_profile, exact_texts, tmp_path, mode):
    """With the SLO controller a prefill chunk runs in one step with the running decode rows
    (SGLang's mixed chunked prefill). LS and BE prompts arriving one after another while the
    earlier ones decode are prefilled in 4-token chunks in such steps, beside LS rows, BE rows in
    the GPU KV cache and BE rows in the BE KV pool (every BE request moves each step; in async mode
    the executor carries the pool's rows through the mixed passes): every request's greedy output
    is the one it gets alone (float32). The SLOs leave slack for all of it; the profile is the test
    run's, relabelled float32 (the policy, not its accuracy, is under test)."""
    profile = json.loads(latency_profile.path.read_text())
    profile["meta"]["key"]["dtype"] = "torch.float32"
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(profile))
    with SGLangServer(model_path, "--omniserve", "--omniserve-mode", mode, "--dtype", "float32", "--enable-metrics",
                      "--omniserve-profile", str(path), "--omniserve-ttft-slo", "600", "--omniserve-tpot-slo", "30",
                      "--chunked-prefill-size", "4", env={"OMNISERVE_TEST_MOVE_EVERY": "1"}) as server:
        alone = {}
        for text in exact_texts:
            flush_cache(server)
            alone[text] = generate(server, text, 32, "ls")["output_ids"]
        flush_cache(server)
        jobs = [(text, cls) for cls in ("be", "ls") for text in exact_texts]

        def staggered(i: int) -> list[int]:
            time.sleep(0.4 * i)
            text, cls = jobs[i]
            return generate(server, text, 32, cls)["output_ids"]

        with ThreadPoolExecutor(len(jobs)) as pool:
            outputs = list(pool.map(staggered, range(len(jobs))))
        assert outputs == [alone[text] for text, _ in jobs]
        assert metric(server, "omniserve_mixed_steps_total") >= len(jobs)
        assert metric(server, "omniserve_cpu_attention_tokens_total") > 0
        assert min(metric(server, "omniserve_be_moves_total", direction=d) for d in ("to_cpu", "to_gpu")) > 0


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


def test_without_be_requests_the_scheduler_runs_sglangs_overlap_loop(f32_server, plain_run):
    """``--omniserve`` leaves the overlap schedule and the graph settings as plain SGLang has them,
    and with no BE request in the server its scheduler runs SGLang's overlap loop."""
    info = requests.get(f"{f32_server.url}/get_server_info", timeout=30).json()
    for key in ("disable_overlap_schedule", "disable_cuda_graph", "disable_decode_cuda_graph",
                "disable_prefill_cuda_graph"):
        assert info[key] == plain_run.server_info[key], key
    assert not info["disable_overlap_schedule"]
    generate(f32_server, "Hi", 4, "ls")
    assert metric(f32_server, "omniserve_overlap_schedule") == 1


def test_a_be_request_amid_streaming_ls_requests_switches_mode_twice_and_changes_no_output(f32_server, exact_texts):
    """LS requests stream; a BE request arrives, the scheduler leaves SGLang's overlap loop for the
    BE path, the BE request finishes, the scheduler goes back while the LS requests still stream:
    every request gets its whole greedy output, the one it gets alone (float32)."""
    alone = {}
    for text in exact_texts:
        flush_cache(f32_server)
        alone[text] = generate(f32_server, text, 96, "ls")["output_ids"]

    def switches():
        return tuple(metric(f32_server, "omniserve_mode_switches_total", to=to) for to in ("be", "ls"))

    before = switches()
    assert metric(f32_server, "omniserve_overlap_schedule") == 1
    flush_cache(f32_server)
    started = [threading.Event() for _ in exact_texts]
    with ThreadPoolExecutor(len(exact_texts)) as pool:
        ls = [pool.submit(stream_generate, f32_server, t, 96, e) for t, e in zip(exact_texts, started)]
        assert all(e.wait(300) for e in started)
        be = generate(f32_server, exact_texts[0], 8, "be")["output_ids"]
        deadline = time.monotonic() + 60
        while metric(f32_server, "omniserve_overlap_schedule") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        back_while_streaming = not any(f.done() for f in ls)
        outs = [f.result() for f in ls]
    assert outs == [alone[t] for t in exact_texts]
    assert be == alone[exact_texts[0]][:8]
    assert switches() == (before[0] + 1, before[1] + 1)
    assert back_while_streaming


def test_a_worker_killed_mid_decode_changes_no_output(f32_server, prompts):
    """SIGKILL of the CPU attention worker while 2 LS and 2 BE requests decode: the scheduler starts
    a new worker on the same BE KV pool and runs the layer in flight again. Every request completes
    in full with the tokens it gets alone, and the server serves new LS and BE requests at once: they
    are answered while the requests in flight at the kill still decode."""
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
        after = [generate(server, "Name three colors.", 4, cls)["output_ids"] for cls in ("ls", "be")]
        in_flight_still_decoding = not any(f.done() for f in futures)
        outs = [f.result()["output_ids"] for f in futures]
    assert outs == alone
    assert [len(a) for a in after] == [4, 4] and in_flight_still_decoding
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
