"""Aborts at every stage of a BE request's life (waiting for BE KV pool pages, in its chunked
prefill, offloaded to the CPU worker and decoding), by ``/abort_request`` and by a client that
goes away (streamed or not): the request ends, its pool pages and reservation come back once, and
the server goes on giving the same answers. The stage is read from the server's own metrics before
the abort is sent."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest

from tests.serving.conftest import flush_cache, generate, metric
from tests.soak.conftest import CHUNK, PAGE, POOL_PAGES

USED, RESERVED, WAITING = ("omniserve_be_pool_pages_used", "omniserve_be_pool_pages_reserved",
                           "omniserve_be_waiting_requests")
HOWS = [("abort_request", False), ("disconnect", True), ("disconnect", False)]


def _prompt(num_tokens: int) -> str:
    return " ".join(["apple"] * num_tokens)  # one token per word in the default model's vocabulary


async def _metrics(session, url) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    out = dict.fromkeys((USED, RESERVED, WAITING), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


async def _until(session, url, cond, timeout_s=60.0) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        m = await _metrics(session, url)
        if cond(m):
            return m
        assert loop.time() < deadline, f"server metrics never reached the awaited state: {m}"
        await asyncio.sleep(0.005)


async def _send(session, url, text, max_new, cls, stream, rid, chunks: list) -> dict:
    body = {"rid": rid, "text": text, "stream": stream,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"omniserve_class": cls}}}
    async with session.post(f"{url}/generate", json=body) as r:
        if not stream:
            return await r.json()
        last = {}
        async for line in r.content:
            if line.startswith(b"data: {"):
                last = json.loads(line[6:])
                chunks.append(last)
        return last


async def _abort(session, url, task, rid, how) -> dict | None:
    """Aborts one request; returns its final answer (``None`` for a client that went away)."""
    if how == "disconnect":
        task.cancel()  # aiohttp closes the connection of a cancelled request
        with pytest.raises(asyncio.CancelledError):
            await task
        return None
    async with session.post(f"{url}/abort_request", json={"rid": rid}) as r:
        assert r.status == 200
    return await asyncio.wait_for(task, 60)


def _ended_by_abort(answer: dict | None) -> None:
    if answer is not None:
        assert answer["meta_info"]["finish_reason"]["type"] == "abort", answer["meta_info"]


async def _drained(session, url) -> None:
    """Pages and reservations all back (a disconnect is noticed within SGLang's 4 s poll)."""
    m = await _until(session, url, lambda m: m[USED] == 0 and m[RESERVED] == 0 and m[WAITING] == 0, 30)
    assert m[USED] >= 0 and m[RESERVED] >= 0  # a page freed twice would show up as a negative count


@pytest.fixture(scope="module")
def reference(soak_server):
    """A BE answer before any abort; the module's last test asks for it again."""
    flush_cache(soak_server)
    return generate(soak_server, "The capital of France is", 12, "be")["output_ids"]


def _run(coro):
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            return await coro(session)

    return asyncio.run(main())


@pytest.mark.parametrize("how,stream", HOWS)
def test_abort_while_waiting_for_pool_pages(soak_server, reference, how, stream):
    url = soak_server.url
    # Two requests of half the pool each (prompt + max_new_tokens) hold every page from their
    # admission on: short prompts, so their prefill is one step (a 792-token prompt took 13 chunks
    # of ~2.7 s each on the 2-core VM, and longer than the wait below in CI).
    half = POOL_PAGES // 2 * PAGE - 40

    async def case(session):
        blockers = [(uuid.uuid4().hex, []) for _ in range(2)]
        tasks = [asyncio.ensure_future(_send(session, url, _prompt(40), half, "be", True, rid, ch))
                 for rid, ch in blockers]
        await _until(session, url, lambda m: m[USED] + m[RESERVED] == POOL_PAGES)
        rid = uuid.uuid4().hex
        waiting = asyncio.ensure_future(_send(session, url, "Short question?", 8, "be", stream, rid, []))
        await _until(session, url, lambda m: m[WAITING] == 1)
        _ended_by_abort(await _abort(session, url, waiting, rid, how))
        assert all(not t.done() for t in tasks)  # the others went on
        for (brid, _), t in zip(blockers, tasks, strict=True):
            _ended_by_abort(await _abort(session, url, t, brid, "abort_request"))
        await _drained(session, url)

    _run(case)


@pytest.mark.parametrize("how,stream", HOWS)
def test_abort_during_chunked_prefill(soak_server, reference, how, stream):
    url = soak_server.url
    prompt_tokens = 24 * CHUNK  # 24 prefill chunks

    async def case(session):
        rid = uuid.uuid4().hex
        task = asyncio.ensure_future(_send(session, url, _prompt(prompt_tokens), 8, "be", stream, rid, []))
        # Reserved at admission, used only once its KV moves to the pool after the last chunk.
        await _until(session, url, lambda m: m[RESERVED] > 0 and m[USED] == 0)
        answer = await _abort(session, url, task, rid, how)
        _ended_by_abort(answer)
        if answer is not None:
            assert answer["meta_info"]["completion_tokens"] <= 1
        await _drained(session, url)

    _run(case)


@pytest.mark.parametrize("how,stream", HOWS)
def test_abort_while_offloaded_and_decoding(soak_server, reference, how, stream):
    url = soak_server.url

    async def case(session):
        rid, chunks = uuid.uuid4().hex, []
        task = asyncio.ensure_future(_send(session, url, "Tell me about the sea.", 400, "be", stream, rid, chunks))
        await _until(session, url, lambda m: m[USED] > 0)  # offloaded: its KV is in the pool
        if stream:
            while len(chunks) < 3:
                await asyncio.sleep(0.01)
        answer = await _abort(session, url, task, rid, how)
        _ended_by_abort(answer)
        if answer is not None:
            assert 1 <= answer["meta_info"]["completion_tokens"] < 400
        await _drained(session, url)

    _run(case)


@pytest.mark.parametrize("how,stream", [("abort_request", False), ("disconnect", True)])
def test_ls_aborts_in_prefill_and_decode_leave_sglang_clean(soak_server, how, stream):
    """LS requests keep SGLang's own abort path; SGLang's idle check would end the scheduler on a
    leaked GPU KV slot, and a cache flush only succeeds with no request left."""
    url = soak_server.url

    async def case(session):
        for text, max_new, delay in ((_prompt(24 * CHUNK), 8, 0.2), ("Tell me about the sea.", 400, 1.5)):
            rid = uuid.uuid4().hex
            task = asyncio.ensure_future(_send(session, url, text, max_new, "ls", stream, rid, []))
            await asyncio.sleep(delay)
            _ended_by_abort(await _abort(session, url, task, rid, how))

    _run(case)
    flush_cache(soak_server)  # retries for 10 s: a disconnect is noticed within SGLang's 4 s poll
    assert generate(soak_server, "Still here?", 4, "ls")["meta_info"]["completion_tokens"] == 4


def test_answers_are_unchanged_after_the_aborts(soak_server, reference):
    flush_cache(soak_server)
    assert generate(soak_server, "The capital of France is", 12, "be")["output_ids"] == reference
    assert metric(soak_server, USED) == metric(soak_server, RESERVED) == 0
