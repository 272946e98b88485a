"""The SLO controller on a real server: LS admission in ``reject`` mode, BE rows that sit out while an
LS request needs its TPOT, BE requests that decode in the GPU KV cache, move to the BE KV pool
when an LS prompt needs the room, and come back, and a BE prompt that yields to an LS prompt
mid-prefill and resumes from its chunks.

The server's GPU KV cache holds 1536 tokens, so a BE request of ~400 tokens and an LS prompt of
~1200 cannot both be there. Its latency model is the profiled one made GPU-like: GPU decode
attention free and each layer's CPU job at least one token's dense work, so a BE row costs less in
the GPU KV cache on any machine and whatever the online correction learns. (SGLang's CPU decode
attention costs more per row than the CPU worker's, so with the measured model the controller keeps
BE requests in the pool: tests/unit/test_control.py.)"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from omniserve_sgl.bench.launch import SGLangServer
from tests.serving.conftest import metric

GPU_KV_TOKENS = 1536
CHUNK = 128  # --chunked-prefill-size: a long prompt is prefilled over several steps
MOVES = "omniserve_be_moves_total"


@pytest.fixture(scope="module")
def ctl_server(model_path, latency_profile, tmp_path_factory):
    gpu_like = json.loads(latency_profile.path.read_text())
    gpu_like["c_decode_attn"] = 0.0
    gpu_like["c_cpu_job"] += gpu_like["c_dense"]
    path = tmp_path_factory.mktemp("gpu-like") / "latency.json"
    path.write_text(json.dumps(gpu_like))
    with SGLangServer(model_path, "--omniserve", "--omniserve-ls-admission", "reject", "--enable-metrics",
                      "--max-total-tokens", str(GPU_KV_TOKENS), "--chunked-prefill-size", str(CHUNK),
                      "--omniserve-profile", str(path)) as s:
        yield s


def _post(server, text: str, n: int, custom: dict, route: str = "/generate") -> requests.Response:
    if route == "/generate":
        body = {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True,
                                                  "custom_params": custom}}
    else:
        body = {"model": "default", "prompt": text, "max_tokens": n, "temperature": 0, "custom_params": custom}
    return requests.post(f"{server.url}{route}", json=body, timeout=600)


def _wait_until(cond, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_reject_mode_answers_an_ls_request_that_would_miss_its_ttft_with_503(ctl_server, route):
    """An LS request whose own TTFT SLO cannot be met (1 ms: even its prefill takes longer) is refused
    at once with HTTP 503 saying the predicted TTFT, the SLO and the flag; others are served."""
    before = metric(ctl_server, "omniserve_ls_rejected_total")
    r = _post(ctl_server, "Name a planet.", 4, {"omniserve_ttft_slo": 0.001}, route)
    assert r.status_code == 503, r.text[:300]
    assert "predicted TTFT" in r.text and "exceeds the TTFT SLO 0.001 s" in r.text, r.text[:300]
    assert "--omniserve-ls-admission reject" in r.text
    assert metric(ctl_server, "omniserve_ls_rejected_total") == before + 1
    assert _post(ctl_server, "Name a planet.", 4, {}, route).status_code == 200


def test_be_rows_sit_out_while_an_ls_request_needs_its_tpot_then_finish(ctl_server):
    """An LS request with a 1 ms TPOT SLO leaves no slack: every decode step it runs in leaves the BE
    row out (the row keeps its state), and the BE request still completes in full afterwards."""
    deferred = metric(ctl_server, "omniserve_be_rows_deferred_total")
    with ThreadPoolExecutor(1) as pool:
        be = pool.submit(_post, ctl_server, "Write a long story about a lighthouse keeper.", 64, {"omniserve_class": "be"})
        _wait_until(lambda: metric(ctl_server, "omniserve_be_requests", placement="gpu") >= 1, "BE never decoded")
        ls = _post(ctl_server, "Count from one to twenty:", 16, {"omniserve_tpot_slo": 0.001, "omniserve_ttft_slo": 600})
        assert ls.status_code == 200 and ls.json()["meta_info"]["completion_tokens"] == 16
        assert metric(ctl_server, "omniserve_be_rows_deferred_total") >= deferred + 14  # each LS decode step
        assert be.result().status_code == 200 and be.result().json()["meta_info"]["completion_tokens"] == 64


def test_be_request_leaves_the_gpu_for_an_ls_prompt_and_comes_back(ctl_server, tokenizer):
    """A BE request decodes in the GPU KV cache (no CPU attention); an LS prompt that needs its room
    moves it to the BE KV pool, where the CPU worker decodes it; once the LS request is done it moves
    back. It completes in full and nothing is left in the pool."""
    be_text = "Once upon a time in a land far away " * 45
    ls_text = "The quick brown fox jumps over the lazy dog. " * 120
    assert len(tokenizer.encode(be_text)) + len(tokenizer.encode(ls_text)) > GPU_KV_TOKENS
    moves = {d: metric(ctl_server, MOVES, direction=d) for d in ("to_cpu", "to_gpu")}
    cpu_tokens = metric(ctl_server, "omniserve_cpu_attention_tokens_total")
    with ThreadPoolExecutor(1) as pool:
        be = pool.submit(_post, ctl_server, be_text, 160, {"omniserve_class": "be"})
        _wait_until(lambda: metric(ctl_server, "omniserve_be_requests", placement="gpu") >= 1, "BE never decoded")
        assert metric(ctl_server, "omniserve_cpu_attention_tokens_total") == cpu_tokens  # on the GPU
        # SLOs any machine meets: this test is about where the BE request lives, not admission or slack.
        ls = _post(ctl_server, ls_text, 8, {"omniserve_ttft_slo": 600, "omniserve_tpot_slo": 30})
        assert ls.status_code == 200, ls.text[:300]
        assert metric(ctl_server, MOVES, direction="to_cpu") == moves["to_cpu"] + 1
        _wait_until(lambda: metric(ctl_server, MOVES, direction="to_gpu") == moves["to_gpu"] + 1,
                    "BE never came back to the GPU")
        assert be.result().status_code == 200 and be.result().json()["meta_info"]["completion_tokens"] == 160
    assert metric(ctl_server, "omniserve_cpu_attention_tokens_total") > cpu_tokens  # it decoded on the CPU meanwhile
    assert metric(ctl_server, "omniserve_be_pool_pages_used") == 0
    assert metric(ctl_server, "omniserve_be_requests", placement="cpu") == 0


def test_a_be_prompt_that_yields_to_an_ls_prompt_mid_prefill_resumes_from_its_chunks(ctl_server, tokenizer):
    """An LS prompt arriving while a BE prompt is prefilled chunk by chunk goes first; the BE prompt
    keeps the chunks it had, pinned in the radix cache, while LS work goes on: here an LS request
    with no TPOT slack (so the BE prompt stays out), a short LS request that finishes (its prompt
    stays in the radix cache, more recently used than the BE chunks) and a long LS prompt that
    needs some of the cached KV. The eviction takes the finished LS prompt, not the older BE
    chunks: every BE prompt token is computed once. The BE prompt resumes before a BE request
    queued behind it starts. Once all are done nothing stays pinned."""
    def text(words: str, n: int) -> str:  # no first token shared with another prompt: nothing cached
        return words * n + str(time.time_ns())

    be_text = text("Long ago, in a kingdom by the sea, ", 90)
    hold_text, short_text = text("List the even numbers: ", 3), text("The sun is a star. ", 65)
    long_text, be2_text = text("Rivers flow into the ocean. ", 158), text("Birds sing at dawn. ", 50)
    n = {k: len(tokenizer.encode(t)) for k, t in (("be", be_text), ("hold", hold_text), ("short", short_text),
                                                  ("long", long_text), ("be2", be2_text))}
    hold_out = 96
    # The long prompt fits beside what is held (the hold request, the BE chunks: 1-3 chunks when it
    # yields) only by evicting some of the cached prompts.
    held = n["hold"] + hold_out + 2 * CHUNK
    assert GPU_KV_TOKENS - held - n["short"] < n["long"] < GPU_KV_TOKENS - held - 64, n
    assert n["be"] + n["be2"] + 64 < GPU_KV_TOKENS, n

    def computed() -> float:  # prompt tokens SGLang has computed (not taken from its prefix cache)
        return metric(ctl_server, "sglang:realtime_tokens_total", mode="prefill_compute")

    def timed(*args) -> tuple[requests.Response, float]:
        r = _post(*args)
        return r, time.monotonic()

    start, yields = computed(), metric(ctl_server, "omniserve_be_prefill_yields_total")
    relaxed = {"omniserve_ttft_slo": 600, "omniserve_tpot_slo": 30}
    with ThreadPoolExecutor(3) as pool:
        # One output token each: a BE request is done when its prefill is.
        be = pool.submit(timed, ctl_server, be_text, 1, {"omniserve_class": "be"})
        _wait_until(lambda: computed() >= start + CHUNK, "the BE prefill never started")
        # A second BE request, queued behind the first: the first resumes before it starts.
        be2 = pool.submit(timed, ctl_server, be2_text, 1, {"omniserve_class": "be"})
        hold = pool.submit(_post, ctl_server, hold_text, hold_out, {"omniserve_ttft_slo": 600,
                                                                    "omniserve_tpot_slo": 0.001})
        _wait_until(lambda: metric(ctl_server, "omniserve_be_prefill_yields_total") == yields + 1,
                    "the BE prompt never yielded")
        for t in (short_text, long_text):
            r = _post(ctl_server, t, 1, relaxed)
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 1
        assert not hold.done(), "the LS request holding BE out ended too soon: nothing was checked"
        assert hold.result().status_code == 200 and hold.result().json()["meta_info"]["completion_tokens"] == hold_out
        for r, _ in (be.result(), be2.result()):
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 1
        assert be.result()[1] < be2.result()[1], "the second BE prompt went ahead of the one that yielded"
    total = sum(n.values())
    _wait_until(lambda: computed() >= start + total - 2, "the prefill counter never caught up", timeout=30)
    assert computed() - start <= total, (computed() - start, n)
    # Nothing stays pinned: a prompt that needs nearly the whole GPU KV cache is served.
    final = text("Mountains rise above the clouds. ", 238)
    assert GPU_KV_TOKENS - 100 < len(tokenizer.encode(final)) < GPU_KV_TOKENS - 16
    r = _post(ctl_server, final, 4, relaxed)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4
