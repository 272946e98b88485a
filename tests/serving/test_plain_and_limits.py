"""The package installed but ``--omniserve`` off changes nothing; configuration limits; a full BE
KV pool makes BE requests wait, not fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from omniserve_sgl.launch import SGLangServer
from tests.serving.conftest import generate, metric, worker_processes

CPU_TOKENS = "omniserve_cpu_attention_tokens_total"


def test_flags_show_in_help():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    for flag in ("--omniserve", "--omniserve-cpu-kv-gb", "--omniserve-cpu-threads", "--omniserve-cpu-cores",
                 "--omniserve-cpu-attention", "--omniserve-cpu-page-size", "--omniserve-cpu-spin-us"):
        assert flag in out


def test_unsupported_configuration_is_refused(model_path):
    res = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
                          "--omniserve", "--tp-size", "2"], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0
    assert "does not support tensor parallelism" in res.stderr + res.stdout


def test_bad_flag_value_is_refused_with_what_to_fix(model_path):
    res = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
                          "--omniserve", "--omniserve-cpu-page-size", "0"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode != 0
    assert "--omniserve-cpu-page-size must be >= 1, got 0" in res.stderr + res.stdout


def test_mla_model_is_refused_before_loading(model_path, tmp_path):
    """A DeepSeek-V2 (MLA) config with no weights at all: refused from its config alone."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path / f, tmp_path / f)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 49152,
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "first_k_dense_replace": 2, "kv_lora_rank": 32, "q_lora_rank": None,
        "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "max_position_embeddings": 2048}))
    res = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
                          "--device", "cpu", "--omniserve"], capture_output=True, text=True, timeout=300,
                         check=False, env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": "1"})
    assert res.returncode != 0
    assert "does not support MLA models yet (DeepseekV2ForCausalLM)" in res.stderr + res.stdout


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


def test_retraction_takes_ls_requests_and_leaves_offloaded_be_decoding(model_path):
    """SGLang's retraction test mode retracts a decode request every 3 steps. BE requests whose KV is
    in the BE KV pool hold no GPU KV, so retracting them would free nothing and redo their decode:
    only LS requests are retracted, and every BE decode step runs exactly once."""
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"}
    with SGLangServer(model_path, "--omniserve", "--enable-metrics", env=env) as server:
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
        # 11 decode steps on the worker per BE request (its first token comes from the prefill) x 30 layers.
        assert metric(server, CPU_TOKENS) - before == 3 * 11 * 30
        assert metric(server, "omniserve_be_pool_pages_used") == 0
