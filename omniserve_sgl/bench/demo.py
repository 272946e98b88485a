"""The main job: start SGLang with ``--omniserve`` on the default model, send a mixed workload of
real ShareGPT prompts as LS and BE requests at once, and print per-class TTFT/TPOT against the LS
SLOs the server was given, BE tokens/s, what the SLO controller did, and a few generated texts.

    python -m omniserve_sgl.bench.demo [--num-ls 8] [--num-be 16] [--max-new-tokens 48]
                                       [--ttft-slo 2.0] [--tpot-slo 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp

from omniserve_sgl.bench.launch import SGLangServer, metric_sum
from omniserve_sgl.bench.loadgen import RequestRecord, RequestStyle, send
from omniserve_sgl.bench.slo import percentile, tpot
from omniserve_sgl.bench.workload import sharegpt_prompts
from omniserve_sgl.config import OmniServeConfig
from omniserve_sgl.default_model import ensure_default_model


async def send_all(url: str, jobs: list[tuple[str, str]], max_new_tokens: int) -> list[tuple[str, RequestRecord]]:
    """Sends every (prompt, class) job at once, streamed and greedy (stopping at EOS); returns
    (prompt, record) pairs."""

    def body(prompt: str, cls: str) -> dict:
        b = RequestStyle().body(prompt, cls, max_new_tokens)
        b["sampling_params"]["ignore_eos"] = False
        return b

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        t0 = time.perf_counter()
        records = [RequestRecord(cls, 0.0, max_new_tokens) for _, cls in jobs]
        await asyncio.gather(*(send(session, url, body(p, cls), rec, t0)
                               for (p, cls), rec in zip(jobs, records, strict=True)))
    return [(p, r) for (p, _), r in zip(jobs, records, strict=True)]


COUNTERS = {  # what the demo prints -> (metric, labels)
    "BE decode rows that waited for SLO slack": ("omniserve_be_rows_deferred_total", {}),
    "BE requests moved GPU -> BE KV pool": ("omniserve_be_moves_total", {"direction": "to_cpu"}),
    "BE requests moved BE KV pool -> GPU": ("omniserve_be_moves_total", {"direction": "to_gpu"}),
    "token-layer attentions computed by the CPU worker": ("omniserve_cpu_attention_tokens_total", {}),
}


def _ms(xs) -> str:
    return f"{1e3 * statistics.mean(xs):8.0f} {1e3 * percentile(xs, 50):8.0f} {1e3 * percentile(xs, 90):8.0f}"


def report(results: list[tuple[str, RequestRecord]], counters: dict[str, float | None],
           slo: tuple[float, float]) -> str:
    """The per-class table (TTFT and TPOT mean/p50/p90 in ms, tokens, tokens/s), the LS TPOT p90
    against the TPOT SLO (``slo`` = (TTFT, TPOT) s), the server's ``counters`` and sample texts.

    Raises:
        RuntimeError: a request failed (its error text is in the message).
    """
    if failed := [r.error for _, r in results if not r.success]:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    lines = [(f"{'class':5} {'reqs':>4} | {'TTFT ms: mean':>13} {'p50':>8} {'p90':>8} | "
              f"{'TPOT ms: mean':>13} {'p50':>8} {'p90':>8} | {'tokens':>6} {'tok/s':>7}")]
    for cls in ("ls", "be"):
        rs = [r for _, r in results if r.service_class == cls]
        if not rs:
            continue
        tokens = sum(r.output_len for r in rs)
        span = max(r.arrival + r.latency for r in rs) - min(r.arrival for r in rs)
        lines.append(f"{cls.upper():5} {len(rs):4} | {_ms([r.ttft for r in rs]):>31} | "
                     f"{_ms([tpot(r) for r in rs]):>31} | {tokens:6} {tokens / span:7.1f}")
    ls_tpot_p90 = percentile([tpot(r) for _, r in results if r.service_class == "ls"], 90)
    verdict = "within" if ls_tpot_p90 <= slo[1] else "OVER"
    lines.append(f"LS SLOs: TTFT {1e3 * slo[0]:.0f} ms, TPOT {1e3 * slo[1]:.0f} ms; LS TPOT p90 "
                 f"{1e3 * ls_tpot_p90:.0f} ms is {verdict} the TPOT SLO")
    lines += [f"{what}: {value:.0f}" for what, value in counters.items() if value is not None]
    for cls in ("ls", "be"):
        for prompt, r in [(p, r) for p, r in results if r.service_class == cls][:2]:
            lines.append(f"\n[{cls.upper()}] {prompt[:80]!r}\n  -> {r.text.strip()[:240]!r}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct, made offline")
    ap.add_argument("--num-ls", type=int, default=8)
    ap.add_argument("--num-be", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--ttft-slo", type=float, default=OmniServeConfig.ttft_slo, help="LS TTFT SLO, s")
    ap.add_argument("--tpot-slo", type=float, default=OmniServeConfig.tpot_slo, help="LS TPOT SLO, s")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    model = args.model_path or ensure_default_model()
    prompts = sharegpt_prompts(AutoTokenizer.from_pretrained(model), args.num_ls + args.num_be,
                               args.max_prompt_tokens)
    jobs = [(p, "ls") for p in prompts[: args.num_ls]] + [(p, "be") for p in prompts[args.num_ls:]]
    print(f"starting SGLang with --omniserve on {model} ...", flush=True)
    with SGLangServer(model, "--omniserve", "--enable-metrics", "--omniserve-ttft-slo", str(args.ttft_slo),
                      "--omniserve-tpot-slo", str(args.tpot_slo)) as server:
        print(f"sending {args.num_ls} LS and {args.num_be} BE ShareGPT requests at once "
              f"(greedy, up to {args.max_new_tokens} new tokens)", flush=True)
        results = asyncio.run(send_all(server.url, jobs, args.max_new_tokens))
        counters = {what: metric_sum(server.url, name, **labels) for what, (name, labels) in COUNTERS.items()}
    print(report(results, counters, (args.ttft_slo, args.tpot_slo)))


if __name__ == "__main__":
    main()
