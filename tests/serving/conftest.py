"""Real SGLang servers on the default model, one alive at a time: each module starts the servers
it needs (a module-scoped fixture, or a ``with SGLangServer(...)`` inside a test), and the root
conftest fails a test during which two were alive."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2Config, Qwen3Config

from omniserve_sgl.bench.launch import SGLangServer, metric_sum
from omniserve_sgl.bench.workload import sharegpt_prompts
from omniserve_sgl.config import OmniServeConfig
from omniserve_sgl.default_model import ensure_default_model
from omniserve_sgl.kv import BEKVPoolSpec

# Prompts whose greedy outputs the exactness tests compare across servers.
EXACT_TEXTS_FROM_SHAREGPT = 2
FIRST_EXACT_TEXT = "The capital of France is"


@dataclass(frozen=True)
class ModelShape:
    """What the tests need to know of the default model, read from its config.json."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_len: int  # tokens, SGLang's limit for prompt + max_new_tokens

    @classmethod
    def of(cls, model_path: Path) -> ModelShape:
        cfg = json.loads((model_path / "config.json").read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return cls(cfg["num_hidden_layers"], cfg["num_key_value_heads"], head_dim, cfg["max_position_embeddings"])

    def be_pool_gb(self, num_pages: int, page_size: int = OmniServeConfig().page_size) -> str:
        """``--omniserve-cpu-kv-gb`` for a bf16 BE KV pool of exactly ``num_pages`` pages (of the
        default page size unless ``page_size``)."""
        page = BEKVPoolSpec(self.num_layers, self.num_kv_heads, self.head_dim, 1, page_size).bytes_per_page
        return repr((num_pages + 0.5) * page / (1 << 30))


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def model(model_path) -> ModelShape:
    return ModelShape.of(model_path)


def qwen_variant(arch: str, out: Path, num_layers: int = 4) -> Path:
    """A ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` folder made offline from the default model's
    first ``num_layers`` layers and tokenizer: Qwen2 gets zero q/k/v biases (the same function as
    those Llama layers), Qwen3 unit q/k norms (a different but smooth model). Real SGLang model
    classes, without a download."""
    src = ensure_default_model()
    cfg = json.loads((src / "config.json").read_text())
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id",
            "rope_parameters", "tie_word_embeddings")
    common = {k: cfg[k] for k in same} | {"num_hidden_layers": num_layers, "dtype": "bfloat16"}
    conf = Qwen2Config(**common) if arch == "qwen2" else Qwen3Config(head_dim=cfg["head_dim"], **common)
    conf.architectures = ["Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"]
    conf.save_pretrained(out)
    weights = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
               if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < num_layers}
    for layer in range(num_layers):
        p = f"model.layers.{layer}.self_attn."
        dtype = weights[p + "q_proj.weight"].dtype
        if arch == "qwen2":
            for n in "qkv":
                weights[p + f"{n}_proj.bias"] = torch.zeros(weights[p + f"{n}_proj.weight"].shape[0], dtype=dtype)
        else:
            for n in "qk":
                weights[p + f"{n}_norm.weight"] = torch.ones(cfg["head_dim"], dtype=dtype)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    return sharegpt_prompts(tokenizer, 32, max_prompt_tokens=96, seed=1)


@pytest.fixture(scope="session")
def exact_texts(prompts) -> list[str]:
    return [FIRST_EXACT_TEXT, *prompts[:EXACT_TEXTS_FROM_SHAREGPT]]


@dataclass(frozen=True)
class PlainRun:
    """What plain SGLang (the package installed, ``--omniserve`` off) answered.

    Attributes:
        outputs: greedy 32-token output ids for each of ``exact_texts``.
        marked: ``/generate`` answers to requests marked ``be`` and ``gold`` (8 and 2 tokens).
        workers: CPU attention worker processes below the server.
        metrics: the ``/metrics`` text.
        server_info: its ``/get_server_info`` (SGLang's arguments as it runs with them).
    """

    outputs: dict[str, list[int]]
    marked: dict[str, dict]
    workers: list
    metrics: str
    server_info: dict


@pytest.fixture(scope="session")
def plain_run(model_path, exact_texts) -> PlainRun:
    """One plain SGLang server, used for every comparison with it and stopped before the fixture
    returns, so the test's own server is the only one alive."""
    with SGLangServer(model_path, "--enable-metrics") as plain:
        outputs = {}
        for text in exact_texts:
            flush_cache(plain)
            outputs[text] = generate(plain, text, 32)["output_ids"]
        marked = {"be": generate(plain, FIRST_EXACT_TEXT, 8, "be"), "gold": generate(plain, "Hi", 2, "gold")}
        return PlainRun(outputs, marked, worker_processes(plain),
                        requests.get(f"{plain.url}/metrics", timeout=30).text,
                        requests.get(f"{plain.url}/get_server_info", timeout=30).json())


def flush_cache(server) -> None:
    """Empties the radix cache, so the next prefill computes the whole prompt (a prefix-cache hit
    changes prefill numerics in SGLang itself, whatever the class)."""
    server.flush_cache()


def generate(server, text, max_new_tokens=32, service_class=None, headers=None, timeout=600, **extra):
    """Greedy ``/generate``; returns the JSON answer (raises on HTTP errors; ``timeout`` in s)."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    if service_class is not None:
        params["custom_params"] = {"omniserve_class": service_class}
    r = requests.post(f"{server.url}/generate", json={"text": text, "sampling_params": params, **extra},
                      headers=headers, timeout=timeout)
    r.raise_for_status()
    return r.json()


def stream_generate(server, text, max_new, first_chunk: threading.Event, custom_params: dict | None = None) -> list[int]:
    """Streamed greedy ``/generate`` (with ``custom_params`` when given); sets ``first_chunk`` at the
    first chunk; returns the output ids."""
    params = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    if custom_params is not None:
        params["custom_params"] = custom_params
    out = []
    with requests.post(f"{server.url}/generate", json={"text": text, "stream": True, "sampling_params": params},
                       stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                out = json.loads(line[6:])["output_ids"]
                first_chunk.set()
    return out


def metric(server, name: str, **labels: str) -> float:
    """Sum of all samples of Prometheus metric ``name`` with ``labels`` on the server's ``/metrics``."""
    value = metric_sum(server.url, name, **labels)
    if value is None:
        raise KeyError(f"metric {name} not on /metrics")
    return value


def worker_processes(server) -> list[psutil.Process]:
    """CPU attention worker processes below the server's process."""
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "omniserve_sgl.worker" in " ".join(p.cmdline())]
