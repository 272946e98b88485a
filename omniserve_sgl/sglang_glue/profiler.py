"""Start-up profiler of the SLO controller's latency model (OmniServe paper section 3.3): times real
forward passes of the loaded model, prefill and decode batches built by SGLang's own one-batch
benchmark helpers (``sglang.benchmark.one_batch.extend`` / ``decode``), and the CPU attention
worker's jobs on the BE KV pool; fits :class:`omniserve_sgl.control.LatencyModel` and writes it
to ``--omniserve-profile PATH`` (default: a file named after the setup in the profile cache) with
the setup it was made for, so a restart reads it instead of profiling again. With
``--omniserve-disable-control`` nothing is profiled.

Runs in the scheduler process after the attention backends exist and before the scheduler (and
its radix cache) does: it borrows SGLang's KV slots and request rows and clears them afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from importlib.metadata import version
from pathlib import Path

import torch

from omniserve_sgl import config
from omniserve_sgl.control import CPUJobSample, LatencyModel, StepSample, StepShape, fit_and_check
from omniserve_sgl.control.latency import FORMAT_VERSION

logger = logging.getLogger(__name__)

# (batch size, prompt length) of the profiled prefills; each is followed by DECODE_STEPS decodes.
GRID = ((1, 16), (1, 128), (4, 32), (1, 512), (16, 16), (2, 256), (8, 64), (32, 16), (4, 256), (64, 8),
        (1, 1024), (16, 64), (2, 1024), (8, 256), (32, 64), (64, 32), (4, 1024), (16, 256), (64, 64))
DECODE_STEPS = 3
# (batch size, cached prefix, chunk) of the profiled prefill chunks that continue a prompt
# (SGLang's chunked prefill): what a chunk costs beyond a fresh prefill of its length. The cheap
# ones first, so that a slow machine (the 2-core VM prefills ~90 tokens/s) still gets a few: only
# these tell a prefix's cost from the chunk's own.
CHUNK_GRID = ((1, 32, 16), (1, 64, 32), (2, 64, 16), (1, 128, 64), (1, 256, 32), (1, 1024, 32), (2, 512, 64),
              (1, 1024, 256), (4, 256, 64), (1, 2048, 64), (1, 2048, 512), (2, 1536, 128))
MAX_BATCH_TOKENS = 4096  # the grid's largest prefill (one pass, whatever --chunked-prefill-size says)
BUDGET_S = 60.0  # the whole profile, forward passes and CPU jobs
CPU_JOBS_BUDGET_S = 6.0  # timed first: a few ms each, and a model without them would call CPU attention free


def _fits(deadline: float, last_s: float, last_tokens: int, tokens: int) -> bool:
    """Whether a grid point of ``tokens`` tokens is predicted to finish by ``deadline`` (monotonic
    seconds), its time scaled from the last point's (``last_s`` for ``last_tokens``): a slow machine
    stops before a point it cannot finish instead of overrunning the budget with it."""
    return time.monotonic() + last_s * max(1.0, tokens / max(last_tokens, 1)) <= deadline


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_samples(model_runner, budget_s: float) -> list[StepSample]:
    """Times prefill and decode steps of synthetic requests over ``GRID`` (cheapest first, until
    ``budget_s`` is spent; batches that do not fit SGLang's KV cache or request rows are skipped).

    Returns:
        one :class:`StepSample` per prefill and per decode step, seconds of wall time (synchronised).
    """
    from sglang.benchmark import one_batch

    limit = min(MAX_BATCH_TOKENS, model_runner.max_total_num_tokens // 2)
    rows = model_runner.req_to_token_pool.size
    grid = sorted((g for g in GRID if g[0] * g[1] <= limit and g[0] <= rows), key=lambda g: g[0] * g[1])
    samples, deadline = [], time.monotonic() + budget_s
    last_s, last_tokens = 0.0, 1
    for i, (bs, n) in enumerate([grid[0], *grid]):  # the first run warms up and is not kept
        if not _fits(deadline, last_s, last_tokens, bs * n):
            break
        reqs = one_batch.prepare_synthetic_inputs_for_latency_test(bs, n)
        started = time.monotonic()
        try:
            _sync(model_runner.device)
            t0 = time.perf_counter()
            ids, _, batch = one_batch.extend(reqs, model_runner)
            _sync(model_runner.device)
            steps = [(StepShape(tokens=bs * n, prefill_attn_work=float(bs * n * n), prefill_context=bs * n),
                      time.perf_counter() - t0)]
            for k in range(DECODE_STEPS):
                t0 = time.perf_counter()
                ids, _ = one_batch.decode(ids, batch, model_runner)
                _sync(model_runner.device)
                steps.append((StepShape(tokens=bs, decode_context=bs * (n + k + 1), decode_rows=bs),
                              time.perf_counter() - t0))
        finally:
            model_runner.req_to_token_pool.clear()
            model_runner.token_to_kv_pool_allocator.clear()
        if i > 0:
            samples += [StepSample(shape, t) for shape, t in steps]
            last_s, last_tokens = time.monotonic() - started, bs * n
    return samples


def chunk_samples(model_runner, budget_s: float) -> list[StepSample]:
    """Times prefill chunks that continue a prompt over ``CHUNK_GRID``: a prompt's first
    ``prefix`` tokens are prefilled (not timed), then its next ``chunk`` tokens, as SGLang's
    chunked prefill does (the same requests, holding their ``req_to_token`` rows). Cheapest first,
    until ``budget_s`` is spent; skipped, with a warning, if SGLang refuses the batch.

    Returns:
        one :class:`StepSample` per timed chunk, seconds of wall time (synchronised).
    """
    from sglang.benchmark import one_batch

    limit = min(MAX_BATCH_TOKENS, model_runner.max_total_num_tokens // 2)
    rows = model_runner.req_to_token_pool.size
    grid = sorted((g for g in CHUNK_GRID if g[0] * (g[1] + g[2]) <= limit and g[0] <= rows),
                  key=lambda g: g[0] * (g[1] + g[2]))
    samples, deadline = [], time.monotonic() + budget_s
    last_s, last_tokens = 0.0, 1
    for i, (bs, prefix, chunk) in enumerate([grid[0], *grid] if grid else []):  # the first warms up
        if not _fits(deadline, last_s, last_tokens, bs * (prefix + chunk)):
            break
        reqs = one_batch.prepare_synthetic_inputs_for_latency_test(bs, prefix + chunk)
        started = time.monotonic()
        try:
            for r in reqs:
                r.extend_end = prefix
            one_batch.extend(reqs, model_runner)
            for r in reqs:
                r.prefix_len, r.extend_end = prefix, prefix + chunk
            _sync(model_runner.device)
            t0 = time.perf_counter()
            one_batch.extend(reqs, model_runner)
            _sync(model_runner.device)
            seconds = time.perf_counter() - t0
        except (RuntimeError, AssertionError, ValueError) as e:  # SGLang internals this does not control
            logger.warning("omniserve: prefill chunks with a cached prefix not profiled (%s)", e)
            break
        finally:
            model_runner.req_to_token_pool.clear()
            model_runner.token_to_kv_pool_allocator.clear()
        if i > 0:
            samples.append(StepSample(StepShape(tokens=bs * chunk, prefill_attn_work=float(bs * chunk * (prefix + chunk)),
                                                prefill_context=bs * (prefix + chunk)), seconds))
            last_s, last_tokens = time.monotonic() - started, bs * (prefix + chunk)
    return samples


def setup_key(model_runner, cfg: config.OmniServeConfig, worker: config.WorkerSetup) -> dict:
    """What a profile depends on: model files, dtype, device, TP size, the CPU worker's setup and the
    versions of SGLang, torch and omniserve-sgl."""
    mc = model_runner.model_config
    model_path = Path(model_runner.server_args.model_path)
    cfg_file = model_path / "config.json"
    return {
        "model": str(model_path), "config_sha": hashlib.sha256(cfg_file.read_bytes()).hexdigest()[:16]
        if cfg_file.is_file() else None, "layers": mc.num_hidden_layers, "dtype": str(mc.dtype),
        "device": str(model_runner.device), "tp": model_runner.server_args.tp_size, "cpu_threads": worker.threads,
        "cpu_attention": cfg.cpu_attention, "page_size": cfg.page_size,
        "versions": {p: version(p) for p in ("sglang", "torch", "omniserve-sgl")}, "format": FORMAT_VERSION,
    }


def check_key(model: LatencyModel, key: dict, path: Path) -> None:
    """Raises ValueError naming what differs when ``model`` was profiled for another setup than ``key``."""
    made_for = model.meta.get("key") or {}
    if made_for != key:
        diff = sorted(k for k in key if made_for.get(k) != key[k])
        raise ValueError(f"--omniserve-profile {path} was made for another setup (differs in {', '.join(diff)}); "
                         "delete it or name a new file to profile again")


def cache_dir() -> Path:
    """Where profiles live without ``--omniserve-profile``: ``$OMNISERVE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/omniserve-sgl``, else ``~/.cache/omniserve-sgl``."""
    if os.environ.get("OMNISERVE_CACHE_DIR"):
        return Path(os.environ["OMNISERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omniserve-sgl"


def profile_path(key: dict, cfg: config.OmniServeConfig) -> Path:
    """``--omniserve-profile PATH``, else the cache file of this setup (named by a hash of ``key``)."""
    if cfg.profile_path:
        return Path(cfg.profile_path)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"profile-{digest}.json"


def load_or_profile(model_runner, runtime, cfg: config.OmniServeConfig) -> LatencyModel | None:
    """The latency model of this model on this machine: read from its file (see
    :func:`profile_path`) when that exists, else profiled now (at most ``BUDGET_S``) and written
    there. ``None`` with ``--omniserve-disable-control`` (and no ``--omniserve-profile``), or (with
    a warning) when too few steps fit this server's KV cache.

    Raises:
        ValueError: the file is not a latency model, or one made for another setup (the message
            names what differs).
    """
    if not cfg.profile_path and not cfg.control:
        return None
    key = setup_key(model_runner, cfg, runtime.worker)
    path = profile_path(key, cfg)
    if path.is_file():
        try:
            model = LatencyModel.load(path)
        except ValueError as e:
            raise ValueError(f"--omniserve-profile {path}: {e}; delete it or name a new file to profile again") from None
        check_key(model, key, path)
        logger.info("omniserve: latency model from %s (accuracy mean %.1f%%, p90 %.1f%%)", path,
                    100 * model.meta.get("accuracy_mean", math.nan), 100 * model.meta.get("accuracy_p90", math.nan))
        return model
    t0 = time.monotonic()
    jobs = [CPUJobSample(b, t) for b, t in runtime.profile_attention(budget_s=CPU_JOBS_BUDGET_S)]
    steps = forward_samples(model_runner, BUDGET_S * 0.7 - (time.monotonic() - t0))
    steps += chunk_samples(model_runner, BUDGET_S - (time.monotonic() - t0))
    try:
        model, acc = fit_and_check(steps, holdout=0.25, cpu_jobs=jobs, meta={"key": key})
    except ValueError as e:
        logger.warning("omniserve: no latency model (%s; the KV cache holds %d tokens)", e,
                       model_runner.max_total_num_tokens)
        return None
    model.meta.update(accuracy_mean=acc.mean, accuracy_p90=acc.p90, profiled_s=round(time.monotonic() - t0, 1),
                      samples=[[*dataclasses.astuple(s.shape), s.seconds] for s in steps],
                      cpu_job_samples=[[j.kv_bytes, j.seconds] for j in jobs])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    logger.info("omniserve: profiled %d steps and %d CPU jobs in %.1f s; latency model accuracy on held-out "
                "steps: mean %.1f%%, p90 %.1f%%; saved to %s", len(steps), len(jobs), time.monotonic() - t0,
                100 * acc.mean, 100 * acc.p90, path)
    return model
