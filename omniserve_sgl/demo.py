"""The main job: start SGLang with ``--omniserve`` on the default model, send a mixed workload of
real ShareGPT prompts as LS and BE requests at once, and print per-class TTFT/TPOT, BE tokens/s
and a few generated texts.

    python -m omniserve_sgl.demo [--num-ls 8] [--num-be 16] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import orjson
import requests

from omniserve_sgl.default_model import ensure_default_model
from omniserve_sgl.launch import SGLangServer
from omniserve_sgl.workload import sharegpt_prompts


@dataclass
class Result:
    service_class: str
    prompt: str
    text: str
    tokens: int
    start: float
    ttft: float  # s, request sent -> first token received
    end: float

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first, s."""
        return (self.end - self.start - self.ttft) / max(self.tokens - 1, 1)


def stream_generate(url: str, prompt: str, service_class: str, max_new_tokens: int) -> Result:
    """One streamed greedy ``/generate`` request, timed on the client."""
    body = {"text": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                "custom_params": {"omniserve_class": service_class}}}
    start = time.perf_counter()
    ttft, last = None, {}
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            last = orjson.loads(line[6:])
            if "error" in last:
                raise RuntimeError(last["error"])
            if ttft is None:
                ttft = time.perf_counter() - start
    return Result(service_class, prompt, last.get("text", ""), last["meta_info"]["completion_tokens"], start,
                  ttft or 0.0, time.perf_counter())


def _ms(xs) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, math.ceil(0.9 * len(xs)) - 1)]
    return f"{1e3 * statistics.mean(xs):8.0f} {1e3 * statistics.median(xs):8.0f} {1e3 * p90:8.0f}"


def report(results: list[Result], cpu_attention_tokens: float | None) -> str:
    lines = [(f"{'class':5} {'reqs':>4} | {'TTFT ms: mean':>13} {'p50':>8} {'p90':>8} | "
              f"{'TPOT ms: mean':>13} {'p50':>8} {'p90':>8} | {'tokens':>6} {'tok/s':>7}")]
    for cls in ("ls", "be"):
        rs = [r for r in results if r.service_class == cls]
        if not rs:
            continue
        tokens = sum(r.tokens for r in rs)
        span = max(r.end for r in rs) - min(r.start for r in rs)
        lines.append(f"{cls.upper():5} {len(rs):4} | {_ms([r.ttft for r in rs]):>31} | "
                     f"{_ms([r.tpot for r in rs]):>31} | {tokens:6} {tokens / span:7.1f}")
    if cpu_attention_tokens is not None:
        lines.append(f"token-layer attentions computed by the CPU worker: {cpu_attention_tokens:.0f}")
    for cls in ("ls", "be"):
        for r in [r for r in results if r.service_class == cls][:2]:
            lines.append(f"\n[{cls.upper()}] {r.prompt[:80]!r}\n  -> {r.text.strip()[:240]!r}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct, made offline")
    ap.add_argument("--num-ls", type=int, default=8)
    ap.add_argument("--num-be", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    model = args.model_path or ensure_default_model()
    prompts = sharegpt_prompts(AutoTokenizer.from_pretrained(model), args.num_ls + args.num_be,
                               args.max_prompt_tokens)
    jobs = [(p, "ls") for p in prompts[: args.num_ls]] + [(p, "be") for p in prompts[args.num_ls:]]
    print(f"starting SGLang with --omniserve on {model} ...", flush=True)
    with SGLangServer(model, "--omniserve", "--enable-metrics") as server:
        print(f"sending {args.num_ls} LS and {args.num_be} BE ShareGPT requests at once "
              f"(greedy, up to {args.max_new_tokens} new tokens)", flush=True)
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda j: stream_generate(server.url, j[0], j[1], args.max_new_tokens), jobs))
        cpu = None
        for line in requests.get(f"{server.url}/metrics", timeout=30).text.splitlines():
            if line.startswith("omniserve_cpu_attention_tokens_total"):
                cpu = float(line.rsplit(" ", 1)[1])
    print(report(results, cpu))


if __name__ == "__main__":
    main()
