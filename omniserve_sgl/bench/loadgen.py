"""Client-side load for the co-serving benchmark: an LS stream with Poisson arrivals and a BE
backlog kept at N requests in flight, both streamed from a real server's ``/generate``.

Every request is greedy with ``ignore_eos`` so that each system generates the same number of
tokens; each one is recorded as a :class:`RequestRecord` (the fields SGLang's
``sglang.benchmark.goodput.calculate_goodput`` reads, plus the arrival of every token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Sequence

import aiohttp
import orjson

from omniserve_sgl.service_class import BE, LS, SERVICE_CLASS_KEY


@dataclasses.dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds on ``time.perf_counter``'s clock
    relative to the start of the run (``t0``) unless named ``*_s`` durations.

    Attributes:
        service_class: ``"ls"`` or ``"be"``.
        arrival: when it was sent, s after ``t0``.
        prompt_len: prompt tokens, as counted by the server (``meta_info.prompt_tokens``).
        max_new_tokens: tokens asked for (``ignore_eos``, so also the tokens expected).
        success: HTTP 200 and the stream ended normally.
        output_len: output tokens received (``meta_info.completion_tokens`` of the last chunk).
        ttft: time to first token, s (request sent -> first chunk with text).
        latency: end-to-end time, s (request sent -> last chunk).
        token_times: arrival of each output token, s after ``t0``; a chunk carrying k tokens
            stamps all k with its own arrival time.
        error: the server's or the client's error text when ``success`` is false.
        text: the generated text (the last chunk's).
    """

    service_class: str
    arrival: float
    max_new_tokens: int
    prompt_len: int = 0
    success: bool = False
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    token_times: list[float] = dataclasses.field(default_factory=list)
    error: str = ""
    text: str = ""

    @property
    def finished(self) -> bool:
        """Completed with every token asked for."""
        return self.success and self.output_len == self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class RequestStyle:
    """How a system marks the two classes on the wire.

    Attributes:
        mark_class: send ``custom_params.omniserve_class`` (what ``--omniserve`` reads; plain
            SGLang ignores it).
        ls_priority / be_priority: top-level ``priority`` for SGLang's
            ``--enable-priority-scheduling`` (larger value = served first); ``None`` sends none.
    """

    mark_class: bool = True
    ls_priority: int | None = None
    be_priority: int | None = None

    def body(self, prompt: str, service_class: str, max_new_tokens: int) -> dict:
        """The ``/generate`` request body (greedy, streamed, ``ignore_eos``)."""
        sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
        if self.mark_class:
            sampling["custom_params"] = {SERVICE_CLASS_KEY: service_class}
        body = {"text": prompt, "sampling_params": sampling, "stream": True}
        priority = self.ls_priority if service_class == LS else self.be_priority
        if priority is not None:
            body["priority"] = priority
        return body


async def send(session: aiohttp.ClientSession, url: str, body: dict, record: RequestRecord,
               t0: float) -> RequestRecord:
    """Streams one ``/generate`` request and fills ``record`` in place; never raises for a failed
    request (the failure is recorded in ``record.error``)."""
    start = time.perf_counter()
    record.arrival = start - t0
    try:
        async with session.post(f"{url}/generate", json=body) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {await resp.text()}"
                return record
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    record.error = str(chunk["error"])
                    return record
                now = time.perf_counter()
                meta = chunk.get("meta_info", {})
                n = meta.get("completion_tokens", 0)
                if n > record.output_len:
                    if not record.token_times:
                        record.ttft = now - start
                    record.token_times += [now - t0] * (n - record.output_len)
                    record.output_len = n
                record.prompt_len = meta.get("prompt_tokens", record.prompt_len)
                record.text = chunk.get("text", record.text)
                record.latency = now - start
            record.success = True
    except Exception as e:  # noqa: BLE001 - any client-side failure is a result to record, not a crash
        record.error = f"{type(e).__name__}: {e}"
    return record


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times (s) of a Poisson process of ``rate`` requests/s on ``[0, duration_s)``."""
    if rate <= 0:
        raise ValueError(f"LS rate must be > 0 requests/s, got {rate}")
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)


async def run_mix(url: str, style: RequestStyle, *, ls_prompts: Sequence[str], ls_arrivals: Sequence[float],
                  ls_max_new_tokens: int, be_prompts: Sequence[str], be_concurrency: int,
                  be_max_new_tokens: int, duration_s: float, drain_timeout_s: float = 600.0,
                  on_done: Callable[[RequestRecord], None] | None = None) -> list[RequestRecord]:
    """Runs the LS stream and the BE backlog together against ``url`` and returns every record.

    LS request i is sent at ``ls_arrivals[i]`` with prompt ``ls_prompts[i % len]``. The BE
    backlog starts at t=0 with ``be_concurrency`` requests and replaces each one that ends while
    t < ``duration_s``; prompts are taken round-robin. After ``duration_s`` nothing new is sent
    and the requests in flight are awaited up to ``drain_timeout_s`` (then cancelled; they count
    as not finished).

    Args:
        on_done: called with each record as it completes (progress display).
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_read=drain_timeout_s)
    # A connection per request: a pooled keep-alive connection that the server closes as idle
    # (uvicorn, after 5 s) while a request is being sent on it resets that request, which would
    # count as lost against the server (seen once in a 231-request run).
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        records: list[RequestRecord] = []
        tasks: set[asyncio.Task] = set()

        def launch(prompt: str, service_class: str, max_new_tokens: int) -> asyncio.Task:
            rec = RequestRecord(service_class, 0.0, max_new_tokens)
            records.append(rec)
            task = asyncio.create_task(send(session, url, style.body(prompt, service_class, max_new_tokens), rec, t0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if on_done is not None:
                task.add_done_callback(lambda t: t.cancelled() or on_done(t.result()))
            return task

        async def be_slot(first: int) -> None:
            i = first
            while time.perf_counter() - t0 < duration_s:
                await launch(be_prompts[i % len(be_prompts)], BE, be_max_new_tokens)
                i += be_concurrency

        async def ls_stream() -> None:
            for i, at in enumerate(ls_arrivals):
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
                launch(ls_prompts[i % len(ls_prompts)], LS, ls_max_new_tokens)

        drivers = [asyncio.create_task(ls_stream())]
        if be_prompts and be_concurrency > 0:
            drivers += [asyncio.create_task(be_slot(k)) for k in range(be_concurrency)]
        deadline = duration_s + drain_timeout_s
        try:
            await asyncio.wait(drivers, timeout=deadline)
            if tasks:
                await asyncio.wait(set(tasks), timeout=max(0.0, deadline - (time.perf_counter() - t0)))
        finally:
            for task in [*drivers, *tasks]:
                task.cancel()
            await asyncio.gather(*drivers, *tasks, return_exceptions=True)
        for rec in records:
            if not rec.success and not rec.error:
                rec.error = "not finished before the drain timeout"
        return records
