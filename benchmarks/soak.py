"""Long soak: 1,000 mixed requests against one ``--omniserve`` server on the default model (LS and
BE, ``/generate`` and both OpenAI routes, streamed and not, 10% aborted at random times, 5%
malformed), with the CPU attention worker killed twice. ``tests/soak`` runs a short form of the same
run in CI; the checks are those of :mod:`omniserve_sgl.bench.soak`.

    .venv/bin/python benchmarks/soak.py          # about 9 min on 2 cores: plain SGLang, then omniserve

The scheduler's RSS growth is compared with plain SGLang's under the same requests (run first).

Writes benchmarks/results/soak.{json,md}; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import orjson
import psutil
from transformers import AutoTokenizer

from omniserve_sgl.bench.launch import SGLangServer
from omniserve_sgl.bench.soak import SoakSpec, run_soak
from omniserve_sgl.bench.workload import sharegpt_prompts
from omniserve_sgl.default_model import ensure_default_model

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--worker-kills", type=int, default=2)
    ap.add_argument("--be-fraction", type=float, default=0.5, help="share of well-formed requests marked BE")
    ap.add_argument("--max-new-tokens", type=int, nargs=2, default=(4, 32), metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-SGLang run (RSS bound absolute)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    spec = SoakSpec(num_requests=args.requests, concurrency=args.concurrency, worker_kills=args.worker_kills,
                    be_fraction=args.be_fraction,
                    max_new_tokens=tuple(args.max_new_tokens), seed=args.seed)
    model = ensure_default_model()
    prompts = sharegpt_prompts(AutoTokenizer.from_pretrained(model), 256, max_prompt_tokens=256, seed=args.seed)
    # Plain SGLang's scheduler grows too under these requests (oneDNN keeps a primitive per new GEMM
    # shape on the CPU device, benchmarks/results/NOTES.md): the same requests against it first give
    # the RSS baseline; its malformed requests are served (it does not read the class) and ignored.
    baseline = None
    if not args.no_baseline:
        with SGLangServer(model, "--enable-metrics") as plain:
            baseline = run_soak(plain.url, plain.proc.pid, dataclasses.replace(spec, worker_kills=0), prompts)
    with SGLangServer(model, "--omniserve", "--enable-metrics") as server:
        report = run_soak(server.url, server.proc.pid, spec, prompts,
                          rss_baseline=None if baseline is None else baseline.rss_growth)
    machine = f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_bytes(orjson.dumps(
        {"machine": machine, "model": model.name, **dataclasses.asdict(report), "rss_growth": report.rss_growth,
         "plain_sglang": None if baseline is None else {"rss_mib": baseline.rss_mib, "rss_trace": baseline.rss_trace,
                                                        "duration_s": baseline.duration_s}},
        option=orjson.OPT_INDENT_2))
    verdict = "all checks hold" if not report.failures else f"{len(report.failures)} checks failed"
    md = (f"# Soak: {spec.num_requests} mixed requests, worker killed {spec.worker_kills} times\n\n"
          f"`benchmarks/soak.py` on {machine}, model {model.name}, one `--omniserve` server"
          + ("" if baseline is None else " (and first plain SGLang under the same requests, for the RSS baseline)")
          + f": {verdict}.\n\n"
          + report.to_markdown())
    (args.out / "soak.md").write_text(md)
    print(md)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
