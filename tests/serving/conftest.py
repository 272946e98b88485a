"""Real SGLang servers on the default model, shared by the serving tests."""

from __future__ import annotations

import psutil
import pytest
import requests
from transformers import AutoTokenizer

from omniserve_sgl.default_model import ensure_default_model
from omniserve_sgl.launch import SGLangServer
from omniserve_sgl.workload import sharegpt_prompts


@pytest.fixture(scope="session")
def model_path():
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    return sharegpt_prompts(tokenizer, 32, max_prompt_tokens=96, seed=1)


@pytest.fixture(scope="session")
def omni_server(model_path):
    """``--omniserve`` with omniserve's CPU decode kernel and metrics on."""
    with SGLangServer(model_path, "--omniserve", "--omniserve-cpu-kv-gb", "0.2", "--enable-metrics") as s:
        yield s


@pytest.fixture(scope="module")
def plain_server(model_path):
    """SGLang without ``--omniserve`` (the package installed)."""
    with SGLangServer(model_path, "--enable-metrics") as s:
        yield s


def flush_cache(server) -> None:
    """Empties the radix cache, so the next prefill computes the whole prompt (a prefix-cache hit
    changes prefill numerics in SGLang itself, whatever the class)."""
    server.flush_cache()


def generate(server, text, max_new_tokens=32, service_class=None, headers=None, **extra):
    """Greedy ``/generate``; returns the JSON answer (raises on HTTP errors)."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    if service_class is not None:
        params["custom_params"] = {"omniserve_class": service_class}
    r = requests.post(f"{server.url}/generate", json={"text": text, "sampling_params": params, **extra},
                      headers=headers, timeout=600)
    r.raise_for_status()
    return r.json()


def metric(server, name: str) -> float:
    """Sum of all samples of Prometheus metric ``name`` on the server's ``/metrics``."""
    total, found = 0.0, False
    for line in requests.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"metric {name} not on /metrics")
    return total


def worker_processes(server) -> list[psutil.Process]:
    """CPU attention worker processes below the server's process."""
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "omniserve_sgl.worker" in " ".join(p.cmdline())]
