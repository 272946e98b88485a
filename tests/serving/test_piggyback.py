"""Asynchronous piggybacking in the server (``--omniserve-mode async``): offloaded BE rows leave
SGLang's decode steps and cross GPU passes layer by layer through the executor, and no pass with LS
rows waits for the CPU worker. Float32, so greedy BE output is LS output token for token; every
second step every BE request moves between the GPU and the BE KV pool (``OMNISERVE_TEST_MOVE_EVERY``),
so the hand-offs between SGLang's batch and the executor are crossed many times."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from omniserve_sgl.bench.launch import SGLangServer
from tests.serving.conftest import flush_cache, generate, metric, qwen_variant


def _be_decodes_its_ls_tokens(server, texts: list[str], num_be: int, max_new_tokens: int) -> None:
    """``num_be`` BE requests beside one LS request per text, all at once: every greedy output equals
    the text's LS output alone; rows piggybacked, no LS pass waited, the residual store empty."""
    alone = {}
    for text in texts:
        flush_cache(server)
        alone[text] = generate(server, text, max_new_tokens, "ls")["output_ids"]
    flush_cache(server)
    jobs = [(texts[i % len(texts)], "be") for i in range(num_be)] + [(t, "ls") for t in texts]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda job: generate(server, job[0], max_new_tokens, job[1])["output_ids"], jobs))
    assert [o == alone[t] for o, (t, _) in zip(outs, jobs)] == [True] * len(jobs)
    assert metric(server, "omniserve_piggybacked_rows_total") > 0  # the executor ran them
    assert metric(server, "omniserve_ls_pass_waits_total") == 0
    assert metric(server, "omniserve_residual_store_bytes") == 0


def test_32_be_requests_piggyback_beside_ls_requests_and_decode_their_ls_tokens(model_path, exact_texts):
    with SGLangServer(model_path, "--omniserve", "--omniserve-mode", "async", "--dtype", "float32",
                      "--omniserve-disable-control", "--enable-metrics",
                      env={"OMNISERVE_TEST_MOVE_EVERY": "2"}) as server:
        _be_decodes_its_ls_tokens(server, exact_texts, 32, 32)
        assert metric(server, "omniserve_be_moves_total", direction="to_gpu") > 0
        assert metric(server, "omniserve_be_pool_pages_used") == 0


def test_ls_output_under_async_omniserve_equals_plain_sglangs(model_path, plain_run, exact_texts):
    """With a BE request held by the executor the whole time, LS passes go through it: their
    greedy tokens are still plain SGLang's (the model's dtype, bfloat16). Each LS request runs alone
    beside it, as in ``plain_run``: in bfloat16, LS requests batched together may round differently
    from each alone in plain SGLang too (seen once in CI when they ran at once)."""
    with SGLangServer(model_path, "--omniserve", "--omniserve-mode", "async", "--omniserve-disable-control",
                      "--enable-metrics") as server:
        flush_cache(server)
        with ThreadPoolExecutor(1) as pool:
            be = pool.submit(generate, server, "Write a long story about the sea.", 400, "be")
            outs = [generate(server, t, 32, "ls")["output_ids"] for t in exact_texts]
            assert not be.done(), "the BE request ended before the LS requests: nothing was checked"
            assert len(be.result()["output_ids"]) == 400
        assert outs == [plain_run.outputs[t] for t in exact_texts]
        assert metric(server, "omniserve_piggybacked_rows_total") > 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_models_piggyback_and_decode_their_ls_tokens(arch, tmp_path_factory, exact_texts):
    """The adapter's other Llama-family layouts: Qwen2 (``qkv_proj`` + ``rotary_emb``) and Qwen3
    (``forward_prepare_native`` with q/k norms), as real SGLang model classes."""
    path = qwen_variant(arch, tmp_path_factory.mktemp(arch))
    with SGLangServer(path, "--omniserve", "--omniserve-mode", "async", "--dtype", "float32",
                      "--omniserve-disable-control", "--enable-metrics",
                      env={"OMNISERVE_TEST_MOVE_EVERY": "2"}) as server:
        _be_decodes_its_ls_tokens(server, exact_texts, 8, 24)
