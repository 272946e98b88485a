"""The model interface the piggybacking executor drives: a decoder cut at its attention boundary.

For a Llama-family layer (SGLang's ``LlamaDecoderLayer.forward``: fused add + RMSNorm, QKV, RoPE,
attention, O projection, fused add + RMSNorm, MLP) the cut is

    pre_attn(l):  residual, x = add_norm_in(hidden, residual); q, k, v = rope(qkv(x))
    post_attn(l): residual, x = add_norm_post(o_proj(attn), residual); hidden = mlp(x)

so a row's whole state between ``pre_attn(l)`` and ``post_attn(l)`` is its ``residual`` (what the
executor's residual store keeps) and, once the CPU has attended, its attention output. Rows are
independent in every method, so any set of rows can be batched in any order.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LayeredModel(Protocol):
    """A decoder the executor runs layer by layer. Shapes: ``N`` rows, hidden size ``H``, ``H_q``
    query and ``H_kv`` KV heads of ``head_dim`` ``D``, vocabulary ``V``; all tensors on the model's
    device and in its dtype unless said otherwise."""

    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [N]`` int64 -> ``hidden [N, H]``."""
        ...

    def pre_attn(self, layer: int, positions: torch.Tensor, hidden: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm (adding ``residual``; ``None`` at layer 0), QKV projection and RoPE at
        ``positions [N]`` int64. Returns ``q [N, H_q, D]``, ``k``, ``v [N, H_kv, D]``, ``residual [N, H]``."""
        ...

    def post_attn(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """O projection of ``attn [N, H_q, D]``, residual add, post-attention norm and MLP.
        Returns ``(hidden [N, H], residual [N, H])``."""
        ...

    def final(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final norm (adding ``residual``): ``[N, H]``, what the LM head takes."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over :meth:`final`'s output: next-token ``logits [N, V]`` float32."""
        ...
