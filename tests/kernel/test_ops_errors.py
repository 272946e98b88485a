"""Bad arguments raise a Python exception that names the problem; the process survives."""

import pytest
import torch

from omniserve_sgl import ops
from tests.kernel.conftest import random_paged_kv


@pytest.fixture
def case():
    k, v, indptr, indices, last = random_paged_kv([20, 5], 16, 2, 64, torch.bfloat16)
    q = torch.randn(2, 4, 64).bfloat16()
    return {"q": q, "k_cache": k, "v_cache": v, "kv_indptr": indptr, "kv_indices": indices, "kv_last_page_len": last}


def call(case, **changes):
    args = {**case, **changes}
    return ops.paged_decode_attention(**args)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (lambda c: {"q": c["q"].float()}, TypeError, "same dtype"),
        (lambda c: {"q": c["q"][:, :3]}, ValueError, "multiple of H_kv"),
        (lambda c: {"q": c["q"][0]}, ValueError, "[B, H_q, D]"),
        (lambda c: {"q": torch.randn(2, 4, 32).bfloat16()}, ValueError, "head_dim"),
        (lambda c: {"k_cache": c["k_cache"].float(), "v_cache": c["v_cache"].float()}, TypeError, "same dtype"),
        (lambda c: {"k_cache": c["k_cache"].to(torch.int16), "v_cache": c["v_cache"].to(torch.int16),
                    "q": c["q"].to(torch.int16)}, TypeError, "bfloat16, float16 or float32"),
        (lambda c: {"v_cache": c["v_cache"][:-1]}, ValueError, "same shape"),
        (lambda c: {"k_cache": torch.randn(4, 16, 2, 40).bfloat16(), "v_cache": torch.randn(4, 16, 2, 40).bfloat16(),
                    "q": torch.randn(2, 4, 40).bfloat16()}, ValueError, "multiple of 16"),
        (lambda c: {"kv_indptr": c["kv_indptr"].long()}, TypeError, "kv_indptr must be int32"),
        (lambda c: {"kv_indptr": c["kv_indptr"][:-1]}, ValueError, "kv_indptr must have 3 entries"),
        (lambda c: {"kv_indptr": torch.tensor([0, 3, 2], dtype=torch.int32)}, ValueError, "non-decreasing"),
        (lambda c: {"kv_indptr": torch.tensor([0, 2, 99], dtype=torch.int32)}, ValueError, "exceeds the length"),
        (lambda c: {"kv_indices": torch.full_like(c["kv_indices"], 1000)}, IndexError, "outside the cache"),
        (lambda c: {"kv_indices": torch.full_like(c["kv_indices"], -1)}, IndexError, "outside the cache"),
        (lambda c: {"kv_last_page_len": torch.tensor([0, 5], dtype=torch.int32)}, ValueError, "1..16"),
        (lambda c: {"kv_last_page_len": torch.tensor([4, 17], dtype=torch.int32)}, ValueError, "1..16"),
        (lambda c: {"kv_layout": "NDH"}, ValueError, "kv_layout"),
        (lambda c: {"sm_scale": -1.0}, ValueError, "sm_scale"),
        (lambda c: {"backend": "gpu"}, ValueError, "backend"),
    ],
)
def test_bad_arguments_raise(case, change, exc, words):
    with pytest.raises(exc, match=None) as info:
        call(case, **change(case))
    assert words in str(info.value)
    out, _ = call(case)  # and the op still works afterwards
    assert torch.isfinite(out.float()).all()


def test_append_and_merge_errors(case):
    k_new = torch.randn(2, 2, 64).bfloat16()
    with pytest.raises(ValueError, match="must have shape"):
        ops.append_paged_kv(k_new[:, :1], k_new[:, :1], case["k_cache"], case["v_cache"], case["kv_indptr"],
                            case["kv_indices"], case["kv_last_page_len"])
    with pytest.raises(TypeError, match="dtype"):
        ops.append_paged_kv(k_new.float(), k_new.float(), case["k_cache"], case["v_cache"], case["kv_indptr"],
                            case["kv_indices"], case["kv_last_page_len"])
    empty = {"kv_indptr": torch.zeros(3, dtype=torch.int32), "kv_last_page_len": torch.zeros(2, dtype=torch.int32)}
    with pytest.raises(ValueError, match="no pages"):
        ops.append_paged_kv(k_new, k_new, case["k_cache"], case["v_cache"], empty["kv_indptr"], case["kv_indices"],
                            empty["kv_last_page_len"])
    v = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="same shape"):
        ops.merge_state(v, torch.zeros(2, 3), v[:1], torch.zeros(1, 3))
    with pytest.raises(TypeError, match="float32"):
        ops.merge_state(v, torch.zeros(2, 3, dtype=torch.float64), v, torch.zeros(2, 3))
