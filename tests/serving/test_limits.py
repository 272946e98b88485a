"""Limits: a full BE KV pool makes BE requests wait, not fail, and one longer than the pool is
refused; under GPU KV pressure SGLang retracts LS requests, never offloaded BE ones; a server
killed with SIGKILL leaves nothing behind. One server for all: a BE KV pool of 5 pages, and
SGLang's retraction test mode."""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from omniserve_sgl.bench.launch import SGLangServer
from tests.serving.conftest import generate, metric, worker_processes

CPU_TOKENS = "omniserve_cpu_attention_tokens_total"


@pytest.fixture(scope="module")
def server(model_path, model, latency_profile):
    """5 BE KV pool pages of 64 tokens (the default page size); SGLang retracts a decode request every 3 steps; the SLO
    controller on, BE requests decoding on the CPU worker."""
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"}
    shm_before = set(os.listdir("/dev/shm"))
    with SGLangServer(model_path, "--omniserve", "--omniserve-cpu-kv-gb", model.be_pool_gb(5),
                      "--enable-metrics", "--omniserve-profile", str(latency_profile.path),
                      "--omniserve-be-placement", "cpu", env=env) as s:
        s.shm_before = shm_before
        yield s


def test_full_be_pool_makes_be_requests_wait_then_complete(server):
    # Two of these ~68-token requests (2 pages each) fit in the 5 pages at a time; the third waits.
    assert metric(server, "omniserve_be_pool_pages_capacity") == 5
    seen_waiting = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen_waiting.append(metric(server, "omniserve_be_waiting_requests"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    results = [None] * 3

    def run(i):
        results[i] = generate(server, f"Count from {i} to ten:", 60, "be")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ls = generate(server, "LS requests are not held back:", 4, "ls")  # while BE requests wait
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert len(ls["output_ids"]) == 4
    assert all(len(r["output_ids"]) == 60 for r in results)
    assert max(seen_waiting) >= 1
    assert metric(server, "omniserve_be_pool_pages_used") == 0

    too_long = requests.post(f"{server.url}/generate", timeout=120, json={
        "text": "x", "sampling_params": {"max_new_tokens": 500, "custom_params": {"omniserve_class": "be"}}})
    assert too_long.status_code == 400
    assert "--omniserve-cpu-kv-gb" in too_long.text


def test_retraction_takes_ls_requests_and_leaves_offloaded_be_decoding(server, model):
    """SGLang's retraction test mode retracts a decode request every 3 steps. BE requests whose KV is
    in the BE KV pool hold no GPU KV, so retracting them would free nothing and redo their decode:
    only LS requests are retracted, and every BE decode step runs exactly once."""
    before = metric(server, CPU_TOKENS)
    jobs = [(f"Story {i}: once upon a time", 40, "ls") for i in range(3)]
    jobs += [(f"List {i}: the colors are", 12, "be") for i in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = []
        for text, n, cls in jobs:
            futures.append(pool.submit(generate, server, text, n, cls))
            time.sleep(0.3 if cls == "ls" else 0.0)  # LS in the batch before BE arrives
        outs = [f.result() for f in futures]
    assert [len(o["output_ids"]) for o in outs] == [n for _, n, _ in jobs]
    assert metric(server, "sglang:num_retracted_requests_total") > 0
    # 11 decode steps on the worker per BE request (its first token comes from the prefill), every layer.
    assert metric(server, CPU_TOKENS) - before == 3 * 11 * model.num_layers
    assert metric(server, "omniserve_be_pool_pages_used") == 0


def test_sigkill_of_the_whole_server_leaves_nothing_behind(server):
    """The last test on this server: SIGKILL to every process of the server at once (no handler
    runs). The BE KV pool and staging areas are memfds, freed with their last holder; the worker's
    socket file and directory were removed once it was connected; no worker process lives on.
    (SGLang itself leaves a multiprocessing semaphore and its load-snapshot segment in /dev/shm
    after a SIGKILL; the test removes those.)"""
    generate(server, "One more BE request:", 4, "be")
    [worker] = worker_processes(server)
    scheduler_pid = worker.ppid()
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    _, alive = psutil.wait_procs([worker], timeout=30)
    assert not alive
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"omniserve-{scheduler_pid}-*"))
    left = set(os.listdir("/dev/shm")) - server.shm_before
    for name in left:
        os.unlink(os.path.join("/dev/shm", name))
    assert not [name for name in left if "omniserve" in name], left
