"""The C++ kernels against a float64 reference, on fresh random inputs each run."""

import math

import pytest
import torch

from omniserve_sgl import ops
from tests.kernel.conftest import TOL, backends, random_paged_kv, reference_decode

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def ragged_lens(gen, batch=5, max_len=4096):
    """Lengths 1..max_len, always including 1 and max_len."""
    lens = torch.randint(1, max_len + 1, (batch - 2,), generator=gen).tolist()
    return [1, *lens, max_len]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 3, 4, 8])
def test_decode_matches_reference(gen, backend, dtype, page_size, head_dim, gqa):
    num_kv_heads = 2
    layout = "NHD" if (gqa + page_size) % 2 else "HND"  # both layouts across the grid
    lens = ragged_lens(gen)
    k, v, indptr, indices, last = random_paged_kv(lens, page_size, num_kv_heads, head_dim, dtype, layout, gen=gen)
    q = torch.randn(len(lens), num_kv_heads * gqa, head_dim, generator=gen).to(dtype)
    out, lse = ops.paged_decode_attention(q, k, v, indptr, indices, last, kv_layout=layout, backend=backend)
    ref_out, ref_lse = reference_decode(q, k, v, indptr, indices, last, layout=layout)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 80, 256])
def test_other_head_dims_and_scale(gen, head_dim):
    lens = [3, 700, 33]
    k, v, indptr, indices, last = random_paged_kv(lens, 16, 1, head_dim, torch.bfloat16, gen=gen)
    q = torch.randn(3, 5, head_dim, generator=gen).bfloat16()
    out, lse = ops.paged_decode_attention(q, k, v, indptr, indices, last, sm_scale=0.3)
    ref_out, ref_lse = reference_decode(q, k, v, indptr, indices, last, sm_scale=0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_groups_and_pages_that_straddle_tiles(gen, dtype):
    """36 query heads over 3 KV heads (groups of 12: two head blocks in the AVX-512 kernel) and
    pages of 5 tokens, so the kernel's 16-token tiles cut across pages; q is left as it was."""
    lens = [1, 37, 1500]
    k, v, indptr, indices, last = random_paged_kv(lens, 5, 3, 64, dtype, gen=gen)
    q = torch.randn(3, 36, 64, generator=gen).to(dtype)
    q_before = q.clone()
    out, lse = ops.paged_decode_attention(q, k, v, indptr, indices, last)
    ref_out, ref_lse = reference_decode(q, k, v, indptr, indices, last)
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    assert torch.equal(q, q_before)


def test_threads_split_agrees_with_one_thread(gen):
    lens = [4096, 5, 2000]
    k, v, indptr, indices, last = random_paged_kv(lens, 16, 2, 64, torch.float32, gen=gen)
    q = torch.randn(3, 8, 64, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.paged_decode_attention(q, k, v, indptr, indices, last)
        torch.set_num_threads(max(2, before))
        many = ops.paged_decode_attention(q, k, v, indptr, indices, last)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-5)


def test_empty_sequence_gives_zeros_and_minus_inf(gen):
    k, v, indptr, indices, last = random_paged_kv([5, 0, 9], 4, 1, 16, torch.float32, gen=gen)
    q = torch.randn(3, 2, 16, generator=gen)
    out, lse = ops.paged_decode_attention(q, k, v, indptr, indices, last)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    assert torch.isfinite(lse[0]).all() and torch.isfinite(lse[2]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_empty_sequence_beside_a_split_one(gen, dtype):
    # As many chunks as sequences (2 threads split 500 tokens in two), but not one each: the
    # merge must still run.
    k, v, indptr, indices, last = random_paged_kv([0, 500], 16, 2, 64, dtype, gen=gen)
    q = torch.randn(2, 4, 64, generator=gen).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out, lse = ops.paged_decode_attention(q, k, v, indptr, indices, last)
    finally:
        torch.set_num_threads(before)
    ref_out, ref_lse = reference_decode(q, k, v, indptr, indices, last)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    torch.testing.assert_close(out[1].double(), ref_out[1], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse[1].double(), ref_lse[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("planned", [False, True], ids=["one-shot", "planned"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_writes_the_last_slot(gen, layout, planned):
    lens = [1, 16, 17, 40]
    k_cache, v_cache, indptr, indices, last = random_paged_kv(lens, 16, 2, 64, torch.bfloat16, layout, gen=gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k_new = torch.randn(4, 2, 64, generator=gen).bfloat16()
    v_new = torch.randn(4, 2, 64, generator=gen).bfloat16()
    if planned:
        plan = ops.PagedDecodePlan(indptr, indices, last, num_pages=k_cache.shape[0], page_size=16)
        checked = indices.clone()
        indices.fill_(10**6)  # the append goes through the plan's checked copy
        plan.append(k_new, v_new, k_cache, v_cache, layout)
        indices = checked
    else:
        ops.append_paged_kv(k_new, v_new, k_cache, v_cache, indptr, indices, last, layout)
    for b in range(4):
        page = int(indices[indptr[b + 1] - 1])
        off = int(last[b]) - 1
        for cache, before, new in ((k_cache, before_k, k_new), (v_cache, before_v, v_new)):
            got = cache[page, off] if layout == "NHD" else cache[page, :, off]
            assert torch.equal(got, new[b])
            if layout == "NHD":
                before[page, off] = new[b]
            else:
                before[page, :, off] = new[b]
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)  # nothing else changed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_of_two_halves_equals_attention_over_all(gen, dtype):
    lens = [50, 300, 7]
    k, v, indptr, indices, last = random_paged_kv(lens, 16, 2, 64, dtype, gen=gen)
    q = torch.randn(3, 4, 64, generator=gen).to(dtype)
    full_out, full_lse = ops.paged_decode_attention(q, k, v, indptr, indices, last)
    # Split each sequence's pages: the first page alone, then the rest (possibly empty).
    a_indptr = torch.arange(4, dtype=torch.int32)
    a_indices = indices[indptr[:-1].long()]
    a_last = torch.tensor([min(n, 16) for n in lens], dtype=torch.int32)
    b_counts = (indptr[1:] - indptr[:-1] - 1).tolist()
    b_indptr = torch.tensor([0] + torch.tensor(b_counts).cumsum(0).tolist(), dtype=torch.int32)
    b_indices = torch.cat([indices[indptr[i] + 1 : indptr[i + 1]] for i in range(3)]).contiguous()
    b_last = torch.where(torch.tensor(b_counts) > 0, last, 0).to(torch.int32)
    va, sa = ops.paged_decode_attention(q, k, v, a_indptr, a_indices, a_last)
    vb, sb = ops.paged_decode_attention(q, k, v, b_indptr, b_indices, b_last)
    out, lse = ops.merge_state(va, sa, vb, sb)
    torch.testing.assert_close(out.float(), full_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, full_lse, atol=1e-4, rtol=1e-5)


def test_merge_state_reference_and_empty_states(gen):
    va, vb = torch.randn(6, 3, 32, generator=gen), torch.randn(6, 3, 32, generator=gen)
    sa, sb = torch.randn(6, 3, generator=gen) * 4, torch.randn(6, 3, generator=gen) * 4
    sa[0, 0] = sb[0, 0] = -math.inf
    sb[1, 1] = -math.inf
    v, s = ops.merge_state(va, sa, vb, sb)
    wa, wb = torch.exp(sa.double()), torch.exp(sb.double())
    ref = (va.double() * wa[..., None] + vb.double() * wb[..., None]) / (wa + wb)[..., None]
    assert torch.all(v[0, 0] == 0) and s[0, 0] == -math.inf
    torch.testing.assert_close(v[1, 1], va[1, 1])
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[0, 0] = False
    torch.testing.assert_close(v[mask].double(), ref[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[mask].double(), torch.log(wa + wb)[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_caller_owned_outputs_are_written_in_place(gen, dtype):
    k, v, indptr, indices, last = random_paged_kv([40, 3], 16, 2, 64, dtype, gen=gen)
    q = torch.randn(2, 4, 64, generator=gen).to(dtype)
    out, lse = torch.empty_like(q), torch.empty(2, 4)
    got_out, got_lse = ops.paged_decode_attention(q, k, v, indptr, indices, last, out=out, lse=lse)
    assert got_out.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    ref_out, ref_lse = ops.paged_decode_attention(q, k, v, indptr, indices, last)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match="out must be"):
        ops.paged_decode_attention(q, k, v, indptr, indices, last, out=out[:1])
    with pytest.raises(TypeError, match="lse must be float32"):
        ops.paged_decode_attention(q, k, v, indptr, indices, last, lse=lse.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_plan_runs_every_layer_as_the_one_shot_op_and_keeps_its_checked_page_ids(gen, dtype):
    lens = [1, 700, 33, 4096]
    layers = [random_paged_kv(lens, 16, 2, 64, dtype, gen=gen) for _ in range(2)]
    _, _, indptr, indices, last = layers[0]
    plan = ops.PagedDecodePlan(indptr, indices, last, num_pages=layers[0][0].shape[0], page_size=16)
    assert plan.batch == 4 and plan.num_items >= 4
    q = torch.randn(4, 8, 64, generator=gen).to(dtype)
    wants = [ops.paged_decode_attention(q, k, v, indptr, indices, last) for k, v, *_ in layers]
    indices.fill_(10**6)  # the plan runs its own checked copy, not the caller's tensor
    for (k, v, *_), want in zip(layers, wants):
        got = plan.run(q, k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_plan_refuses_bad_metadata_and_a_run_on_other_rows_or_caches(gen):
    k, v, indptr, indices, last = random_paged_kv([20, 5], 16, 2, 64, torch.float32, gen=gen)
    with pytest.raises(IndexError, match="outside the cache"):
        ops.PagedDecodePlan(indptr, indices, last, num_pages=1, page_size=16)
    with pytest.raises(ValueError, match="kv_last_page_len"):
        ops.PagedDecodePlan(indptr, indices, last, num_pages=k.shape[0], page_size=4)
    plan = ops.PagedDecodePlan(indptr, indices, last, num_pages=k.shape[0], page_size=16)
    with pytest.raises(ValueError, match="plan was made for 2"):
        plan.run(torch.randn(3, 4, 64), k, v)
    with pytest.raises(ValueError, match="plan was made for a cache of"):
        plan.run(torch.randn(2, 4, 64), k[:-1].contiguous(), v[:-1].contiguous())


def test_a_planned_append_refuses_other_rows_caches_and_empty_sequences(gen):
    k, v, indptr, indices, last = random_paged_kv([20, 5], 16, 2, 64, torch.float32, gen=gen)
    plan = ops.PagedDecodePlan(indptr, indices, last, num_pages=k.shape[0], page_size=16)
    with pytest.raises(ValueError, match="plan was made for 2"):
        plan.append(torch.randn(3, 2, 64), torch.randn(3, 2, 64), k, v)
    with pytest.raises(ValueError, match="plan was made for a cache of"):
        plan.append(torch.randn(2, 2, 64), torch.randn(2, 2, 64), k[:-1].contiguous(), v[:-1].contiguous())
    with pytest.raises(ValueError, match="must have shape"):
        plan.append(torch.randn(2, 1, 64), torch.randn(2, 1, 64), k, v)
    empty = ops.PagedDecodePlan(torch.tensor([0, 0, 2], dtype=torch.int32), indices[:2].contiguous(),
                                torch.tensor([0, 3], dtype=torch.int32), num_pages=k.shape[0], page_size=16)
    with pytest.raises(ValueError, match="sequence 0 has no pages"):
        empty.append(torch.randn(2, 2, 64), torch.randn(2, 2, 64), k, v)
