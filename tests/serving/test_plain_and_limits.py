"""The package installed but ``--omniserve`` off changes nothing; configuration limits; a full BE
KV pool makes BE requests wait, not fail."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import requests

from omniserve_sgl.launch import SGLangServer
from tests.serving.conftest import generate, metric, worker_processes


def test_flags_show_in_help():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    for flag in ("--omniserve", "--omniserve-cpu-kv-gb", "--omniserve-cpu-threads", "--omniserve-cpu-cores",
                 "--omniserve-cpu-attention"):
        assert flag in out


def test_unsupported_configuration_is_refused(model_path):
    res = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
                          "--omniserve", "--tp-size", "2"], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0
    assert "does not support tensor parallelism" in res.stderr + res.stdout


def test_plain_sglang_without_omniserve(plain_server):
    out = generate(plain_server, "The capital of France is", 8, "be")  # the marker is just a custom param
    assert len(out["output_ids"]) == 8
    weird = generate(plain_server, "Hi", 2, "gold")  # not validated: omniserve is off
    assert len(weird["output_ids"]) == 2
    assert worker_processes(plain_server) == []
    with pytest.raises(KeyError):
        metric(plain_server, "omniserve_cpu_attention_tokens_total")


def test_full_be_pool_makes_be_requests_wait_then_complete(model_path):
    # 0.004 GiB holds 11 pages of 16 tokens: two of these ~64-token requests at a time, the third waits.
    with SGLangServer(model_path, "--omniserve", "--omniserve-cpu-kv-gb", "0.004", "--enable-metrics") as server:
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
            results[i] = generate(server, f"Count from {i} to ten:", 56, "be")

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
        assert all(len(r["output_ids"]) == 56 for r in results)
        assert max(seen_waiting) >= 1
        assert metric(server, "omniserve_be_pool_pages_used") == 0

        too_long = requests.post(f"{server.url}/generate", timeout=120, json={
            "text": "x", "sampling_params": {"max_new_tokens": 500, "custom_params": {"omniserve_class": "be"}}})
        assert too_long.status_code == 400
        assert "--omniserve-cpu-kv-gb" in too_long.text
