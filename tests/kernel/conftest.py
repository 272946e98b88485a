import math

import pytest
import torch

from omniserve_sgl import ops


def random_paged_kv(seq_lens, page_size, num_kv_heads, head_dim, dtype, layout="NHD", spare_pages=3, gen=None):
    """Caches with scattered pages (a random permutation) and their FlashInfer metadata."""
    npages = [-(-n // page_size) for n in seq_lens]
    total = sum(npages) + spare_pages
    shape = (total, page_size, num_kv_heads, head_dim) if layout == "NHD" else (total, num_kv_heads, page_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(npages).cumsum(0).tolist(), dtype=torch.int32)
    kv_indices = perm[: int(kv_indptr[-1])].contiguous()
    kv_last_page_len = torch.tensor([0 if p == 0 else n - (p - 1) * page_size for n, p in zip(seq_lens, npages)],
                                    dtype=torch.int32)
    return k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len


def gather_kv(cache, kv_indptr, kv_indices, kv_last_page_len, b, layout):
    """Sequence b's K (or V) as [len, H_kv, D]."""
    pages = kv_indices[kv_indptr[b] : kv_indptr[b + 1]].long()
    if len(pages) == 0:
        return cache.new_zeros((0, cache.shape[2 if layout == "NHD" else 1], cache.shape[3]))
    x = cache[pages]
    if layout == "HND":
        x = x.transpose(1, 2)
    page_size = x.shape[1]
    n = (len(pages) - 1) * page_size + int(kv_last_page_len[b])
    return x.reshape(-1, x.shape[2], x.shape[3])[:n]


def reference_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale=None, layout="NHD"):
    """Float64 softmax attention per sequence: (out [B, H_q, D] float64, lse [B, H_q] float64)."""
    B, hq, D = q.shape
    sm_scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    outs, lses = [], []
    for b in range(B):
        K = gather_kv(k_cache, kv_indptr, kv_indices, kv_last_page_len, b, layout).double()
        V = gather_kv(v_cache, kv_indptr, kv_indices, kv_last_page_len, b, layout).double()
        if K.shape[0] == 0:
            outs.append(torch.zeros(hq, D, dtype=torch.float64))
            lses.append(torch.full((hq,), -math.inf, dtype=torch.float64))
            continue
        G = hq // K.shape[1]
        K, V = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), K) * sm_scale
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), V))
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs), torch.stack(lses)


# Output tolerance by dtype: the output is rounded to its dtype; accumulation is fp32.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def backends():
    """Kernels this CPU can run (the portable one always)."""
    auto = ops.decode_backend()
    names = ["portable"]
    if auto in ("avx512", "avx512_bf16"):
        names.append("avx512")
    if auto == "avx512_bf16":
        names.append("avx512_bf16")
    return names


@pytest.fixture
def gen():
    """A generator seeded afresh each run (the seed is printed on failure)."""
    seed = torch.seed()
    print(f"torch seed {seed}")
    g = torch.Generator()
    g.manual_seed(seed)
    return g
