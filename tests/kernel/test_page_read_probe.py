"""The benchmark's page-pattern read (benchmarks/page_read.cpp), the ceiling its kernel rows are
compared with: it must read every byte of the listed K and V pages, and nothing else."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import cpu_attention as bench


def test_page_read_sums_exactly_the_listed_pages():
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(-(2**15), 2**15, (12, 3, 16, 64), dtype=torch.int16, generator=gen).view(torch.bfloat16)
    v = torch.randint(-(2**15), 2**15, (12, 3, 16, 64), dtype=torch.int16, generator=gen).view(torch.bfloat16)
    pages = torch.tensor([7, 2, 11, 5, 0], dtype=torch.int32)
    head_bytes = 16 * 64 * 2
    for threads in (1, 2):
        got = bench.page_reader().read_pages(k.data_ptr(), v.data_ptr(), pages.data_ptr(), pages.numel(),
                                             3 * head_bytes, head_bytes, 3, threads)
        words = np.concatenate([t[pages.long()].view(torch.int16).numpy().view(np.uint64).ravel() for t in (k, v)])
        assert got == int(words.sum(dtype=np.uint64))  # both wrap modulo 2**64
    # A page left out changes the sum.
    assert bench.page_reader().read_pages(k.data_ptr(), v.data_ptr(), pages.data_ptr(), 4, 3 * head_bytes,
                                          head_bytes, 3, 1) != got
