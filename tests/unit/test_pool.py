import os
import subprocess
import sys
import textwrap

import pytest
import torch

from omniserve_sgl import ops
from omniserve_sgl.kv import BEKVPool, BEKVPoolSpec
from omniserve_sgl.shm import SharedSegment


def test_spec_from_budget_sizes_the_pool():
    spec = BEKVPoolSpec.from_budget(10 << 20, num_layers=30, num_kv_heads=3, head_dim=64, page_size=16)
    assert spec.bytes_per_page == 2 * 30 * 16 * 3 * 64 * 2
    assert spec.num_pages == (10 << 20) // spec.bytes_per_page
    assert spec.total_bytes <= 10 << 20
    with pytest.raises(ValueError, match="below one page"):
        BEKVPoolSpec.from_budget(1000, num_layers=30, num_kv_heads=3, head_dim=64)
    with pytest.raises(ValueError, match="dtype"):
        BEKVPoolSpec(1, 1, 16, 1, dtype="int8")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_layers_are_disjoint_views(layout):
    pool = BEKVPool.create(BEKVPoolSpec(num_layers=3, num_kv_heads=2, head_dim=16, num_pages=4, kv_layout=layout))
    try:
        for i in range(3):
            pool.k_cache(i).fill_(2 * i)
            pool.v_cache(i).fill_(2 * i + 1)
        for i in range(3):
            assert pool.k_cache(i).shape == pool.spec.cache_shape
            assert torch.all(pool.k_cache(i) == 2 * i) and torch.all(pool.v_cache(i) == 2 * i + 1)
    finally:
        pool.close()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_stored_tokens_are_what_the_kernel_attends_over(layout):
    """store_tokens (the prefill hand-over) writes rows where the paged metadata points the kernel."""
    pool = BEKVPool.create(BEKVPoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_pages=8, page_size=4,
                                        dtype="float32", kv_layout=layout))
    try:
        pool.allocator.allocate("r", 11)
        pages = torch.tensor(pool.allocator.pages("r"))
        k, v = torch.randn(11, 2, 16), torch.randn(11, 2, 16)
        pool.store_tokens(1, pages[torch.arange(11) // 4].long(), torch.arange(11) % 4, k, v)
        q = torch.randn(1, 2, 16)
        out, _ = ops.paged_decode_attention(q, pool.k_cache(1), pool.v_cache(1), *pool.allocator.kv_metadata(["r"]),
                                            kv_layout=layout)
        want = torch.softmax(torch.einsum("hd,nhd->hn", q[0], k) / 4, -1)
        torch.testing.assert_close(out[0], torch.einsum("hn,nhd->hd", want, v), atol=1e-5, rtol=1e-5)
    finally:
        pool.close()


def test_second_process_maps_the_same_memory():
    pool = BEKVPool.create(BEKVPoolSpec(num_layers=2, num_kv_heads=1, head_dim=16, num_pages=2, page_size=4,
                                        kv_layout="NHD"))
    pool.k_cache(1)[0, 0, 0, :] = 7
    code = textwrap.dedent(f"""
        import sys, torch
        from omniserve_sgl.kv import BEKVPool
        pool = BEKVPool.attach({pool.handle()!r})
        assert torch.all(pool.k_cache(1)[0, 0, 0] == 7), pool.k_cache(1)[0, 0, 0]
        pool.v_cache(0)[1, 3, 0, :] = 3
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert torch.all(pool.v_cache(0)[1, 3, 0] == 3)
    pool.close()


def test_segment_leaves_nothing_in_dev_shm_after_a_kill():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    code = textwrap.dedent("""
        import os, signal
        from omniserve_sgl.shm import SharedSegment
        seg = SharedSegment.create(1 << 20, "omniserve-leak-test")
        print(seg.handle.path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == -9
    path = res.stdout.strip()
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after == before
    with pytest.raises(FileNotFoundError):
        SharedSegment.attach({"path": path, "size": 1 << 20})
