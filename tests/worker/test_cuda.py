"""Our components with CUDA tensors (skipped without a GPU; ``scripts/gpu_check.sh`` runs them on a
GPU machine): the BE KV pool and staging slots are pinned, a job's q/k/v are staged straight from
GPU tensors on a copy stream that rings the job's doorbell after them (the host does not wait for
a busy GPU) and its output lands in a GPU tensor, and the executor serves BE requests beside LS
rows that live on the GPU, token for token as the same requests decode alone."""

from __future__ import annotations

import pytest
import torch

from omniserve_sgl import ops
from omniserve_sgl.be_runtime import BERuntime
from omniserve_sgl.config import OmniServeConfig
from omniserve_sgl.piggyback import LlamaShape, TorchLlama
from tests.worker.test_piggyback import BE_TOKENS, _prompts, _serve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPE = LlamaShape.tiny(num_layers=3)


@pytest.fixture
def rt():
    config = OmniServeConfig(True, cpu_kv_gb=0.02, cpu_threads=2, page_size=16)
    runtime = BERuntime(config, SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, SHAPE.num_qo_heads,
                        torch.float32, max_rows=16, staging_slots=8)
    yield runtime
    runtime.close()


def test_the_pool_and_the_staging_slots_are_pinned(rt):
    assert rt.pool.k_cache(0).is_pinned()
    assert rt.client.staging.slots[0]["q"].is_pinned()


@pytest.mark.parametrize("gpu_busy", [False, True], ids=["idle", "busy"])
def test_a_job_takes_its_inputs_from_gpu_tensors_and_returns_into_one(rt, gpu_busy):
    g = torch.Generator().manual_seed(0)
    rt.reserve("a", 64)
    rt.store_kv("a", [(torch.randn(40, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g),) * 2
                      for _ in range(SHAPE.num_layers)])
    rt.extend("a")
    plan = rt.plan_rows(["a"])
    q = torch.randn(1, SHAPE.num_qo_heads, SHAPE.head_dim, generator=g)
    kv = torch.randn(1, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g)
    out = torch.empty(1, SHAPE.num_qo_heads, SHAPE.head_dim, device="cuda")
    q_gpu, kv_gpu = q.cuda(), kv.cuda()
    if gpu_busy:
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles queued before the copies
    pending = rt.submit(plan, 1, q_gpu, kv_gpu, kv_gpu, None)
    if gpu_busy:  # the copy stream rings the doorbell after the data: not before the GPU gets there
        assert rt.client.staging.jobs[pending.job.slot][0] < pending.job.seq
    rt.wait(pending, out)
    ref, _ = ops.paged_decode_attention(q, rt.pool.k_cache(1), rt.pool.v_cache(1), plan.kv_indptr,
                                        plan.kv_indices, plan.kv_last_page_len, kv_layout=rt.pool.spec.kv_layout)
    torch.testing.assert_close(out.cpu(), ref)


def test_be_requests_on_a_gpu_model_decode_their_own_greedy_tokens_beside_ls_rows(rt):
    model = TorchLlama(SHAPE, torch.float32, device="cuda", seed=1)
    prompts = _prompts(8, seed=2)
    out, ex, _ = _serve(model, rt, prompts, ls_prompts=_prompts(2, seed=3), ls_passes=150)
    for i, prompt in enumerate(prompts):
        assert out[i] == model.generate(prompt, BE_TOKENS)[0]
    assert ex.ls_pass_waits_total == 0 and ex.residual_store_bytes == 0
