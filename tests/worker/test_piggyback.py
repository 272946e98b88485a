"""The piggybacking executor on a small torch Llama (no SGLang) with the real CPU attention worker:
BE requests decode, token for token, what they decode alone, while LS rows stream and never wait
for the worker; nothing is left behind in the residual store or the BE KV pool."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from omniserve_sgl.be_runtime import BERuntime
from omniserve_sgl.config import OmniServeConfig
from omniserve_sgl.piggyback import LlamaShape, LSBatch, PiggybackExecutor, TorchLlama
from omniserve_sgl.piggyback.torch_llama import DenseKV

SHAPE = LlamaShape.tiny(num_layers=3)
BE_TOKENS = 32


@pytest.fixture(scope="module")
def model():
    return TorchLlama(SHAPE, torch.float32, seed=1)


def _runtime(slots: int = 12, max_rows: int = 32) -> BERuntime:
    config = OmniServeConfig(True, cpu_kv_gb=0.02, cpu_threads=1, page_size=16)
    return BERuntime(config, SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, SHAPE.num_qo_heads,
                     torch.float32, max_rows=max_rows, staging_slots=slots)


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE.vocab_size, (int(torch.randint(3, 40, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


class LSStreams:
    """LS requests decoding on a dense cache, one row each, for as many passes as asked."""

    def __init__(self, model: TorchLlama, prompts: list[list[int]], max_len: int = 400):
        self.model, self.cache = model, DenseKV(model, len(prompts), max_len)
        self.tokens = []
        dev = self.device = model.device
        for b, prompt in enumerate(prompts):
            pos = torch.arange(len(prompt), device=dev)
            rows = torch.full((len(prompt),), b, device=dev)
            logits = model.forward(torch.tensor(prompt, device=dev), pos, lambda layer, q, k, v, pos=pos, rows=rows:
                                   self.cache.attend(layer, q, k, v, pos, rows, model.sm_scale))
            self.tokens.append([prompt, [int(logits[-1].argmax())]])

    def batch(self) -> LSBatch:
        ids = torch.tensor([out[-1] for _, out in self.tokens], device=self.device)
        pos = torch.tensor([len(p) + len(out) - 1 for p, out in self.tokens], device=self.device)
        return LSBatch(ids, pos, lambda layer, q, k, v: self.cache.attend(layer, q, k, v, pos, None,
                                                                          self.model.sm_scale))

    def take(self, logits: torch.Tensor) -> None:
        for (_, out), t in zip(self.tokens, logits.argmax(-1).tolist()):
            out.append(t)


def _serve(model, rt, prompts, mode="async", ls_prompts=(), ls_passes=0, on_pass=None, stop_after_s=None):
    """Runs BE requests ``prompts`` to BE_TOKENS tokens each through the executor, with LS streams
    for the first ``ls_passes`` passes (BE-only passes bounded by ``stop_after_s``); returns (BE
    tokens per request, executor, LS streams)."""
    ex = PiggybackExecutor(model, rt, capacity=len(prompts), mode=mode)
    out = {}
    for i, prompt in enumerate(prompts):
        first, kv = model.generate(prompt, 1)
        rt.reserve(i, len(prompt) + BE_TOKENS)
        rt.store_kv(i, kv)
        ex.add(i, first[0], len(prompt))
        out[i] = list(first)
    ls = LSStreams(model, list(ls_prompts)) if ls_prompts else None
    passes = 0
    while ex.rows:
        with_ls = ls is not None and passes < ls_passes
        res = ex.run_pass(ls.batch() if with_ls else None, stop_after_s=stop_after_s)
        assert not res.failed
        if with_ls:
            ls.take(model.logits(res.ls_hidden))
        for rid, t in res.be_tokens:
            out[rid].append(t)
            if len(out[rid]) == BE_TOKENS:
                ex.remove(rid)
        passes += 1
        if on_pass is not None:
            on_pass(ex, passes)
        assert passes < 20_000, "BE requests stopped moving"
    return out, ex, ls


@pytest.fixture
def rt():
    runtime = _runtime()
    yield runtime
    runtime.close()


def test_ls_rows_alone_give_the_models_own_result(model, rt):
    ex = PiggybackExecutor(model, rt, capacity=4)
    ls = LSStreams(model, _prompts(3, seed=5))
    ref = LSStreams(model, _prompts(3, seed=5))
    for _ in range(4):
        got = model.logits(ex.run_pass(ls.batch()).ls_hidden)
        b = ref.batch()
        want = model.forward(b.input_ids, b.positions, b.attend)
        assert torch.equal(got, want)
        ls.take(got)
        ref.take(want)


def test_be_requests_decode_their_own_greedy_tokens_while_ls_rows_stream_and_never_wait(model, rt):
    prompts = _prompts(32, seed=2)
    ls_prompts = _prompts(4, seed=3)
    out, ex, ls = _serve(model, rt, prompts, ls_prompts=ls_prompts, ls_passes=150)
    for i, prompt in enumerate(prompts):
        assert out[i] == model.generate(prompt, BE_TOKENS)[0], f"BE request {i}"
    for (prompt, got), ref_prompt in zip(ls.tokens, ls_prompts):
        assert got == model.generate(ref_prompt, len(got))[0]
    assert ex.ls_pass_waits_total == 0
    assert ex.piggybacked_rows_total == 32 * (BE_TOKENS - 1) * SHAPE.num_layers  # each token, each layer
    assert ex.residual_store_bytes == 0 and not ex.jobs
    assert rt.pages.used_pages == 0 and rt.pages.num_seqs == 0
    assert rt.client.plans_made < ex.jobs_total  # row sets that move on together reuse their plan


def test_sync_mode_gives_the_same_tokens_and_waits_for_the_worker_in_every_pass_with_be_rows(model, rt):
    prompts = _prompts(6, seed=4)
    out, ex, _ = _serve(model, rt, prompts, mode="sync", ls_prompts=_prompts(2, seed=6), ls_passes=10)
    for i, prompt in enumerate(prompts):
        assert out[i] == model.generate(prompt, BE_TOKENS)[0]
    assert ex.ls_pass_waits_total == 10
    # Every pass's BE rows go through all layers together: one plan per pass, run by each layer.
    assert rt.client.plans_made * SHAPE.num_layers == ex.jobs_total


def test_be_only_passes_cut_short_still_give_every_token(model, rt):
    """A pass over BE rows alone that is out of time ends at its first submission; its rows go on
    in later passes, at the layer where they stopped."""
    prompts = _prompts(6, seed=15)
    out, ex, _ = _serve(model, rt, prompts, stop_after_s=0.0)
    for i, prompt in enumerate(prompts):
        assert out[i] == model.generate(prompt, BE_TOKENS)[0]
    assert ex.residual_store_bytes == 0 and not ex.jobs


def _one_request(model, rt, seed: int):
    """An executor holding BE request ``"r"`` (prefilled); returns it and the prompt."""
    ex = PiggybackExecutor(model, rt, capacity=2)
    prompt = _prompts(1, seed=seed)[0]
    first, kv = model.generate(prompt, 1)
    rt.reserve("r", len(prompt) + 4)
    rt.store_kv("r", kv)
    ex.add("r", first[0], len(prompt))
    return ex, prompt


def test_a_request_removed_with_a_job_in_flight_frees_its_pages_once_the_job_is_back(model, rt):
    ex, _ = _one_request(model, rt, seed=7)
    os.kill(rt.client.process.pid, signal.SIGSTOP)  # the job stays in flight
    try:
        ls = LSStreams(model, _prompts(1, seed=8))
        ex.run_pass(ls.batch())
        assert ex.jobs
        ex.remove("r")
        assert "r" in rt.pages  # the worker may still write its pages
    finally:
        os.kill(rt.client.process.pid, signal.SIGCONT)
    while ex.jobs:
        ex.run_pass(None)
    assert "r" not in rt.pages and rt.pages.used_pages == 0


def test_a_pass_needs_the_executor_only_while_it_has_be_work_to_carry(model, rt):
    ex, _ = _one_request(model, rt, seed=13)
    assert ex.wants_pass()  # the token waits to enter
    os.kill(rt.client.process.pid, signal.SIGSTOP)
    try:
        ex.run_pass(LSStreams(model, _prompts(1, seed=14)).batch())
        assert ex.jobs and not ex.wants_pass()  # its job is on the worker: the pass may run without it
    finally:
        os.kill(rt.client.process.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while not ex.wants_pass():  # the job is back
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_worker_killed_with_jobs_in_flight_is_replaced_and_every_token_is_still_right(model, rt):
    prompts = _prompts(8, seed=9)
    killed = []

    def kill_once(ex, passes):
        if passes == 3:  # stopped, so jobs pile up in flight
            os.kill(rt.client.process.pid, signal.SIGSTOP)
        if passes == 6:
            assert ex.jobs
            killed.append(rt.client.process.pid)
            os.kill(rt.client.process.pid, signal.SIGKILL)

    out, _, _ = _serve(model, rt, prompts, ls_prompts=_prompts(2, seed=10), ls_passes=60, on_pass=kill_once)
    assert killed and rt.worker_restarts == 1
    for i, prompt in enumerate(prompts):
        assert out[i] == model.generate(prompt, BE_TOKENS)[0]


def test_a_request_detached_between_tokens_keeps_its_pages_and_is_refused_inside_the_layers(model, rt):
    ex, prompt = _one_request(model, rt, seed=11)
    os.kill(rt.client.process.pid, signal.SIGSTOP)
    try:
        ex.run_pass(LSStreams(model, _prompts(1, seed=12)).batch())
        assert not ex.detach("r")  # its token is inside the layers
    finally:
        os.kill(rt.client.process.pid, signal.SIGCONT)
    while ex.rows["r"].phase.value != "enter":
        ex.run_pass(None)
    assert ex.detach("r") and "r" not in ex.rows
    assert rt.stored_tokens("r") == len(prompt) + 1 and ex.residual_store_bytes == 0


def test_a_bad_request_is_refused_with_what_to_fix(model, rt):
    ex = PiggybackExecutor(model, rt, capacity=1)
    rt.reserve("x", 10)
    with pytest.raises(ValueError, match="pool holds 0"):
        ex.add("x", 1, 5)
    with pytest.raises(ValueError, match="mode must be"):
        PiggybackExecutor(model, rt, capacity=1, mode="fast")
    with pytest.raises(ValueError, match="layers"):
        PiggybackExecutor(TorchLlama(LlamaShape.tiny(num_layers=2)), rt, capacity=1)
