"""Greedy BE output equals LS output token for token, and LS output under ``--omniserve`` equals
plain SGLang's, where no side rounds differently: SDPA on the worker in bf16, or the kernel in
float32."""

from __future__ import annotations

from omniserve_sgl.bench.launch import SGLangServer
from omniserve_sgl.kv import BEKVPoolSpec
from tests.serving.conftest import flush_cache, generate, metric


def test_be_output_equals_ls_output_token_for_token(model_path, plain_run, exact_texts):
    """With ``--omniserve-cpu-attention sdpa`` the worker computes BE attention with the math of
    SGLang's torch_native backend, so greedy BE output is LS output exactly, and LS output under
    --omniserve is plain SGLang's."""
    with SGLangServer(model_path, "--omniserve", "--omniserve-cpu-attention", "sdpa") as server:
        for text in exact_texts:
            flush_cache(server)
            ls = generate(server, text, 32, "ls")["output_ids"]
            flush_cache(server)
            be = generate(server, text, 32, "be")["output_ids"]
            assert len(be) == 32
            assert be == ls == plain_run.outputs[text]


def test_be_output_with_the_cpu_kernel_equals_ls_output_in_float32(model_path, model, exact_texts):
    """With the default kernel and the model in float32, no probability is rounded to bf16 on either
    side, so greedy BE output is LS output token for token (here 32 tokens of 3 prompts). The hand-off
    busy-polls shared memory here (--omniserve-cpu-spin-us), the path where ZeroMQ is skipped, and the
    BE KV pool has pages of 64 tokens, not 16."""
    with SGLangServer(model_path, "--omniserve", "--dtype", "float32", "--omniserve-cpu-spin-us", "500",
                      "--omniserve-cpu-page-size", "64", "--omniserve-cpu-kv-gb", "1", "--enable-metrics") as server:
        spec = BEKVPoolSpec.from_budget(1 << 30, model.num_layers, model.num_kv_heads, model.head_dim,
                                        page_size=64, dtype="float32")
        assert metric(server, "omniserve_be_pool_pages_capacity") == spec.num_pages
        for text in exact_texts:
            flush_cache(server)
            ls = generate(server, text, 32, "ls")["output_ids"]
            flush_cache(server)
            be = generate(server, text, 32, "be")["output_ids"]
            assert len(be) == 32 and be == ls
