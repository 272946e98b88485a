"""Mixed soak against a running ``--omniserve`` server: LS and BE requests through ``/generate``,
``/v1/completions`` and ``/v1/chat/completions``, streamed and not, some aborted at random times
(client disconnect or ``/abort_request``), some malformed, with the CPU attention worker killed
during the run. What it checks afterwards (issue "fault containment", item 4):

- every well-formed request that was not aborted completed in full (``ignore_eos``, so exactly
  ``max_new_tokens`` tokens, finish reason ``length``);
- every malformed request got a 4xx whose message names the bad field;
- the BE KV pool is empty again (``omniserve_be_pool_pages_used`` and ``_reserved`` are 0);
- ``omniserve_worker_restarts_total`` grew by the number of kills;
- the scheduler's RSS grew by less than ``SoakSpec.max_rss_growth`` between the first and the last
  tenth of the run after its warm-up requests (median of the samples taken while that tenth of
  requests completed); given the growth of plain SGLang's scheduler under the same requests
  (``rss_baseline``), by less than that much more than plain SGLang's.

Used by ``tests/soak`` (a short run) and ``benchmarks/soak.py`` (1,000 requests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import signal
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Sequence

import aiohttp
import psutil

from omniserve_sgl.bench.launch import metric_sum
from omniserve_sgl.service_class import BE, LS, SERVICE_CLASS_HEADER, SERVICE_CLASS_KEY

APIS = ("generate", "completions", "chat")
_ROUTES = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
# What is wrong with a malformed request -> the field its 4xx must name.
MALFORMED = {
    "class in body": SERVICE_CLASS_KEY,
    "class in header": SERVICE_CLASS_KEY,
    "class not a string": SERVICE_CLASS_KEY,
    "custom_params not an object": "custom_params",
}
_BAD_CLASSES = ("gold", "", "urgent", "b" * 5000, "bé", "-1")
_BAD_VALUES = (1, -1, None, ["be"], {"class": "be"}, True, 0.5)


@dataclasses.dataclass(frozen=True)
class SoakSpec:
    """One soak run.

    Attributes:
        num_requests: requests sent in all.
        be_fraction: share of well-formed requests marked BE (the rest LS, unmarked or marked).
        abort_fraction: share aborted at a random time after sending (half by closing the
            connection, half by ``/abort_request``).
        malformed_fraction: share with a bad omniserve field (see ``MALFORMED``).
        worker_kills: SIGKILLs of the CPU attention worker, spread evenly over the run.
        concurrency: requests in flight at once (a closed loop).
        max_new_tokens: inclusive range of tokens asked for per request.
        abort_within_s: an aborted request is aborted uniformly within this many seconds.
        max_rss_growth: allowed relative growth of the scheduler's RSS (0.05 = 5%).
        warmup_requests: the first requests, left out of the RSS comparison (checked like the
            rest): the scheduler's RSS climbs by about 7% over its first ~180 mixed requests as
            allocator caches fill with new batch shapes, then stays flat (benchmarks/results/NOTES.md).
        seed: everything random is drawn from it.
    """

    num_requests: int = 1000
    be_fraction: float = 0.5
    abort_fraction: float = 0.10
    malformed_fraction: float = 0.05
    worker_kills: int = 2
    concurrency: int = 16
    max_new_tokens: tuple[int, int] = (4, 32)
    abort_within_s: float = 2.0
    max_rss_growth: float = 0.05
    warmup_requests: int = 100
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One request of the soak, drawn before the run.

    Attributes:
        api: one of ``APIS``.
        stream: streamed (SSE) or one JSON answer.
        service_class: ``"ls"`` or ``"be"``.
        marker: where the class goes: ``"body"`` (``custom_params``), ``"header"``, or ``"none"``
            (LS only: an unmarked request is LS).
        abort: ``None``, ``"disconnect"`` or ``"abort_request"``.
        abort_after_s: when the abort fires, s after sending.
        malformed: a key of ``MALFORMED``, or ``None``.
    """

    index: int
    api: str
    stream: bool
    service_class: str
    marker: str
    prompt: str
    max_new_tokens: int
    abort: str | None = None
    abort_after_s: float = 0.0
    malformed: str | None = None
    rid: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


@dataclasses.dataclass
class Outcome:
    """What the client saw of one request: HTTP status, tokens and finish reason (or the error
    message), and whether our abort fired before it ended."""

    status: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str = ""
    abort_fired: bool = False
    latency_s: float = 0.0


def plan(spec: SoakSpec, prompts: Sequence[str]) -> list[PlannedRequest]:
    """Draws the soak's requests from ``spec.seed``: every API, stream mode and class in turn-free
    random order, prompts from ``prompts``.

    Raises:
        ValueError: ``prompts`` is empty or a fraction is outside [0, 1].
    """
    if not prompts:
        raise ValueError("the soak needs at least one prompt")
    for name in ("be_fraction", "abort_fraction", "malformed_fraction"):
        if not 0.0 <= getattr(spec, name) <= 1.0:
            raise ValueError(f"SoakSpec.{name} must be in [0, 1], got {getattr(spec, name)}")
    rng = random.Random(spec.seed)
    out = []
    for i in range(spec.num_requests):
        cls = BE if rng.random() < spec.be_fraction else LS
        marker = rng.choice(("body", "header") if cls == BE else ("body", "header", "none"))
        draw = rng.random()
        malformed = rng.choice(sorted(MALFORMED)) if draw < spec.malformed_fraction else None
        abort = None
        if malformed is None and draw < spec.malformed_fraction + spec.abort_fraction:
            abort = rng.choice(("disconnect", "abort_request"))
        out.append(PlannedRequest(
            index=i, api=rng.choice(APIS), stream=rng.random() < 0.5, service_class=cls, marker=marker,
            prompt=rng.choice(prompts), max_new_tokens=rng.randint(*spec.max_new_tokens), abort=abort,
            abort_after_s=rng.uniform(0.0, spec.abort_within_s), malformed=malformed))
    return out


def request_of(p: PlannedRequest) -> tuple[str, dict, dict]:
    """The route, JSON body and headers of a planned request (greedy, ``ignore_eos``)."""
    custom: object = {}
    headers = {}
    if p.marker == "body":
        custom = {SERVICE_CLASS_KEY: p.service_class}
    elif p.marker == "header":
        headers[SERVICE_CLASS_HEADER] = p.service_class
    rng = random.Random(p.index)
    if p.malformed == "class in body":
        custom = {SERVICE_CLASS_KEY: rng.choice(_BAD_CLASSES)}
    elif p.malformed == "class in header":
        headers[SERVICE_CLASS_HEADER] = rng.choice(_BAD_CLASSES).encode().decode("latin-1")
    elif p.malformed == "class not a string":
        custom = {SERVICE_CLASS_KEY: rng.choice(_BAD_VALUES)}
    elif p.malformed == "custom_params not an object":
        custom = rng.choice(("be", ["be"], 3))
    if p.api == "generate":
        sampling = {"max_new_tokens": p.max_new_tokens, "temperature": 0.0, "ignore_eos": True}
        if custom != {}:
            sampling["custom_params"] = custom
        body = {"text": p.prompt, "sampling_params": sampling, "stream": p.stream, "rid": p.rid}
    else:
        body = {"model": "default", "max_tokens": p.max_new_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": p.stream, "rid": p.rid}
        if p.api == "completions":
            body["prompt"] = p.prompt
        else:
            body["messages"] = [{"role": "user", "content": p.prompt}]
        if p.stream:
            body["stream_options"] = {"include_usage": True}
        if custom != {}:
            body["custom_params"] = custom
    return _ROUTES[p.api], body, headers


def _read_chunk(p: PlannedRequest, chunk: dict, out: Outcome) -> None:
    if "error" in chunk:
        err = chunk["error"]
        out.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return
    if p.api == "generate":
        meta = chunk.get("meta_info", {})
        out.completion_tokens = meta.get("completion_tokens", out.completion_tokens)
        reason = meta.get("finish_reason")
        out.finish_reason = reason.get("type") if isinstance(reason, dict) else out.finish_reason
        return
    if chunk.get("usage"):
        out.completion_tokens = chunk["usage"]["completion_tokens"]
    for choice in chunk.get("choices", []):
        out.finish_reason = choice.get("finish_reason") or out.finish_reason


async def _send(session: aiohttp.ClientSession, url: str, p: PlannedRequest, out: Outcome) -> None:
    route, body, headers = request_of(p)
    async with session.post(url + route, json=body, headers=headers) as resp:
        out.status = resp.status
        if resp.status != 200:
            text = await resp.text()
            try:
                err = json.loads(text)
                out.error = err["error"]["message"] if "error" in err else err.get("message", text)
            except (ValueError, KeyError, TypeError):
                out.error = text
            return
        if not p.stream:
            _read_chunk(p, await resp.json(), out)
            return
        async for line in resp.content:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                _read_chunk(p, json.loads(line[6:]), out)


async def _one(session: aiohttp.ClientSession, url: str, p: PlannedRequest) -> Outcome:
    out = Outcome()
    start = time.perf_counter()
    task = asyncio.ensure_future(_send(session, url, p, out))
    if p.abort is not None:
        done, _ = await asyncio.wait({task}, timeout=p.abort_after_s)
        if not done:
            out.abort_fired = True
            if p.abort == "disconnect":
                task.cancel()  # closes the connection: SGLang sees the client gone
            else:
                async with session.post(f"{url}/abort_request", json={"rid": p.rid}) as resp:
                    await resp.read()
    try:
        await task
    except asyncio.CancelledError:
        if not out.abort_fired:
            raise
    except aiohttp.ClientError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency_s = time.perf_counter() - start
    return out


def _metric(url: str, name: str) -> float:
    return metric_sum(url, name) or 0.0  # a plain SGLang baseline has no omniserve metrics


def scheduler_process(server_pid: int) -> psutil.Process:
    """SGLang's scheduler below the server process (its process title is ``sglang::scheduler``).

    Raises:
        LookupError: no such process.
    """
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            if "sglang::scheduler" in " ".join(proc.cmdline()) or proc.name().startswith("sglang::schedul"):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise LookupError(f"no sglang::scheduler process below pid {server_pid}")


def kill_worker(server_pid: int) -> int:
    """SIGKILLs the CPU attention worker below the server process; returns its pid.

    Raises:
        LookupError: no worker process is running.
    """
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            if "omniserve_sgl.worker" in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
                return proc.pid
        except psutil.NoSuchProcess:
            continue
    raise LookupError(f"no CPU attention worker below pid {server_pid}")


@dataclasses.dataclass
class SoakReport:
    """What a soak run did and what it found wrong (``failures`` is empty when all checks hold).

    Attributes:
        counts: requests by kind (``"ls"``, ``"be"``, ``"malformed"``, ``"aborted"``, per API, ...).
        duration_s: wall time of the run, s.
        output_tokens: tokens of the well-formed requests that completed.
        rss_mib: scheduler RSS, MiB, median over the first and the last tenth of the run after its
            warm-up requests.
        restarts: growth of ``omniserve_worker_restarts_total`` over the run.
        latency_s: median and p99 latency of completed requests by class, s.
        rss_trace: (requests completed, scheduler RSS MiB) samples over the run, at most 50.
        rss_baseline: plain SGLang's relative RSS growth under the same requests, if measured.
    """

    spec: SoakSpec
    counts: dict
    duration_s: float
    output_tokens: int
    rss_mib: tuple[float, float]
    restarts: float
    pool_pages_after: tuple[float, float]
    latency_s: dict
    failures: list[str]
    rss_trace: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    rss_baseline: float | None = None

    @property
    def rss_growth(self) -> float:
        return self.rss_mib[1] / self.rss_mib[0] - 1.0

    def to_markdown(self) -> str:
        s = self.spec
        lines = [
            (f"- {s.num_requests} requests ({s.concurrency} in flight), seed {s.seed}, "
             f"{s.max_new_tokens[0]}-{s.max_new_tokens[1]} new tokens each, worker killed {s.worker_kills} "
             f"times; {self.duration_s:.0f} s, {self.output_tokens} output tokens"),
            "- requests: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
            (f"- scheduler RSS after {s.warmup_requests} warm-up requests: {self.rss_mib[0]:.0f} MiB in the first "
             f"tenth, {self.rss_mib[1]:.0f} MiB in the last ({100 * self.rss_growth:+.1f}%; "
             + (f"bound {100 * s.max_rss_growth:.0f}%)" if self.rss_baseline is None else
                f"plain SGLang under the same requests {100 * self.rss_baseline:+.1f}%, bound "
                f"{100 * s.max_rss_growth:.0f} points more)")),
            (f"- worker restarts: {self.restarts:.0f}; BE KV pool pages used / reserved afterwards: "
             f"{self.pool_pages_after[0]:.0f} / {self.pool_pages_after[1]:.0f}"),
            "- latency of completed requests (median / p99): " + "; ".join(
                f"{k} {v[0]:.2f} / {v[1]:.2f} s" for k, v in sorted(self.latency_s.items())),
            "- failures: " + ("none" if not self.failures else "; ".join(self.failures[:20])),
        ]
        return "\n".join(lines) + "\n"


def _check(p: PlannedRequest, out: Outcome) -> str | None:
    """Why this request's outcome is wrong, or None."""
    if p.malformed is not None:
        field = MALFORMED[p.malformed]
        if not (400 <= out.status < 500 and field in out.error):
            return f"#{p.index} ({p.malformed}, {p.api}): want a 4xx naming {field}, got {out.status} {out.error[:120]!r}"
        return None
    if out.abort_fired:
        return None  # anything but a crash; leaks are checked on the pool afterwards
    if out.status != 200 or out.error or out.completion_tokens != p.max_new_tokens or out.finish_reason != "length":
        return (f"#{p.index} ({p.service_class}, {p.api}, stream={p.stream}): want {p.max_new_tokens} tokens and "
                f"finish length, got HTTP {out.status}, {out.completion_tokens} tokens, finish {out.finish_reason}, "
                f"{out.error[:200]!r}")
    return None


async def _run(url: str, spec: SoakSpec, planned: list[PlannedRequest], server_pid: int):
    outcomes: list[Outcome | None] = [None] * len(planned)
    samples: list[tuple[int, int]] = []  # (completed so far, scheduler RSS bytes)
    scheduler = scheduler_process(server_pid)
    kill_at = {round(spec.num_requests * (k + 1) / (spec.worker_kills + 1)) for k in range(spec.worker_kills)}
    completed = 0
    queue = list(reversed(planned))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async def client(session):
        nonlocal completed
        while queue:
            p = queue.pop()
            outcomes[p.index] = await _one(session, url, p)
            completed += 1
            if completed in kill_at:
                kill_at.discard(completed)
                kill_worker(server_pid)

    async def sample_rss(stop: asyncio.Event):
        while not stop.is_set():
            samples.append((completed, scheduler.memory_info().rss))
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.25)
            except TimeoutError:
                pass

    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sampler = asyncio.ensure_future(sample_rss(stop))
        await asyncio.gather(*(client(session) for _ in range(spec.concurrency)))
        stop.set()
        await sampler
    return outcomes, samples


def _wait_idle(url: str, timeout_s: float = 60.0) -> tuple[float, float]:
    """Waits for the BE KV pool to drain (aborted requests end a step or a disconnect check later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = _metric(url, "omniserve_be_pool_pages_used"), _metric(url, "omniserve_be_pool_pages_reserved")
        if used == (0.0, 0.0) or time.monotonic() > deadline:
            return used
        time.sleep(0.5)


def run_soak(url: str, server_pid: int, spec: SoakSpec, prompts: Sequence[str],
             rss_baseline: float | None = None) -> SoakReport:
    """Runs the soak against the ``--omniserve --enable-metrics`` server at ``url`` whose launcher
    process is ``server_pid`` (its worker is killed and its scheduler's RSS read through it).
    ``rss_baseline``: the relative RSS growth of plain SGLang's scheduler under the same requests
    (a ``SoakReport.rss_growth``); the RSS check then bounds the growth beyond it. Against plain
    SGLang itself (for that baseline) use ``worker_kills=0``; its malformed requests are served.

    Raises:
        LookupError: the server has no scheduler or worker process to watch or kill.
    """
    planned = plan(spec, prompts)
    restarts_before = _metric(url, "omniserve_worker_restarts_total")
    t0 = time.perf_counter()
    outcomes, samples = asyncio.run(_run(url, spec, planned, server_pid))
    duration = time.perf_counter() - t0
    pool_after = _wait_idle(url)
    restarts = _metric(url, "omniserve_worker_restarts_total") - restarts_before
    failures = [why for p, o in zip(planned, outcomes, strict=True) if (why := _check(p, o)) is not None]
    if pool_after != (0.0, 0.0):
        failures.append(f"BE KV pool pages used / reserved after the run: {pool_after[0]:.0f} / {pool_after[1]:.0f}")
    if restarts != spec.worker_kills:
        failures.append(f"omniserve_worker_restarts_total grew by {restarts:.0f}, want {spec.worker_kills}")
    warm = min(spec.warmup_requests, spec.num_requests - 1)
    tenth = max((spec.num_requests - warm) // 10, 1)
    first = [rss for done, rss in samples if warm <= done <= warm + tenth] or [samples[0][1]]
    last = [rss for done, rss in samples if done >= spec.num_requests - tenth] or [samples[-1][1]]
    rss_mib = (statistics.median(first) / 2**20, statistics.median(last) / 2**20)
    if rss_mib[1] / rss_mib[0] - 1.0 - (rss_baseline or 0.0) > spec.max_rss_growth:
        than = "" if rss_baseline is None else f", {100 * rss_baseline:+.1f}% for plain SGLang"
        failures.append(f"scheduler RSS grew from {rss_mib[0]:.0f} to {rss_mib[1]:.0f} MiB{than}")
    counts = Counter()
    tokens = 0
    latency: dict[str, list[float]] = {}
    for p, o in zip(planned, outcomes, strict=True):
        counts[p.api] += 1
        counts["streamed"] += p.stream
        if p.malformed is not None:
            counts["malformed"] += 1
        elif o.abort_fired:
            counts["aborted"] += 1
        else:
            counts[p.service_class] += 1
            if o.finish_reason == "length":
                tokens += o.completion_tokens
                latency.setdefault(p.service_class, []).append(o.latency_s)
    lat = {k: (statistics.median(v), sorted(v)[min(len(v) - 1, int(0.99 * len(v)))]) for k, v in latency.items()}
    trace = [(done, rss / 2**20) for done, rss in samples[::max(1, len(samples) // 50)]]
    return SoakReport(spec, dict(counts), duration, tokens, rss_mib, restarts, pool_after, lat, failures, trace,
                      rss_baseline)
