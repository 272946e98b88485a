"""A plain torch Llama decoder with random weights, cut at its attention boundary
(:class:`~omniserve_sgl.piggyback.model.LayeredModel`): the executor's unit tests and
``benchmarks/piggyback.py`` run on it where SGLang is absent (a GPU machine with torch only).

The math is Llama's as SGLang runs it (``sglang.srt.models.llama``): RMSNorm with the residual add
fused in front (``RMSNorm.forward(x, residual)``: ``residual = x + residual; x = norm(residual)``),
neox-style RoPE, SiLU-gated MLP, untied LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaShape:
    """A Llama model's sizes (``config.json``'s ``hidden_size``, ``num_hidden_layers``, ...)."""

    hidden_size: int
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5

    @classmethod
    def llama3_8b(cls, num_layers: int = 32) -> LlamaShape:
        """Meta-Llama-3-8B (its ``config.json``; ``benchmarks/configs/llama-3-8b.json``), ``num_layers`` of its 32."""
        return cls(4096, num_layers, 32, 8, 128, 14336, 128256)

    @classmethod
    def tiny(cls, num_layers: int = 3) -> LlamaShape:
        return cls(64, num_layers, 4, 2, 16, 128, 97, rope_theta=10000.0)


class DenseKV:
    """A dense LS KV cache: ``k``/``v [L, batch, max_len, H_kv, D]``, row ``b`` one sequence.

    Attention gathers each token's whole row (``[N, max_len, H_kv, D]``): meant for tests and
    benchmark batches, not for long prefills.
    """

    def __init__(self, model: TorchLlama, batch: int, max_len: int):
        shape = (model.num_layers, batch, max_len, model.num_kv_heads, model.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.max_len = max_len
        self._pos = torch.arange(max_len, device=model.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               rows: torch.Tensor | None = None, sm_scale: float | None = None) -> torch.Tensor:
        """Stores ``k``/``v [N, H_kv, D]`` at ``positions [N]`` of cache rows ``rows [N]`` (``None``:
        token ``i`` is row ``i``), then attends ``q [N, H_q, D]`` over each row's positions up to
        its own (causal). Returns ``[N, H_q, D]``.

        Raises:
            IndexError: a position at or beyond ``max_len``.
        """
        if int(positions.max()) >= self.max_len:
            raise IndexError(f"position {int(positions.max())} is beyond this cache's {self.max_len} tokens")
        kc, vc = self.k[layer], self.v[layer]
        r = torch.arange(q.shape[0], device=q.device) if rows is None else rows
        kc[r, positions] = k
        vc[r, positions] = v
        keys, values = (kc, vc) if rows is None else (kc[rows], vc[rows])
        mask = self._pos[None, :] <= positions[:, None]  # [N, max_len]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask[:, None, None, :], scale=sm_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.squeeze(2)


class TorchLlama:
    """Llama with random weights (normal, std ``0.02``; norms 1), on ``device`` in ``dtype``.

    Args:
        shape: the model's sizes.
        dtype: weights and activations (norms and RoPE compute in float32).
        device: where it runs.
        seed: weight seed (drawn on ``device``).
    """

    def __init__(self, shape: LlamaShape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.num_layers, self.num_qo_heads, self.num_kv_heads = shape.num_layers, shape.num_qo_heads, shape.num_kv_heads
        self.head_dim, self.hidden_size = shape.head_dim, shape.hidden_size
        g = torch.Generator(device=self.device).manual_seed(seed)

        def w(*size):
            return (torch.randn(*size, generator=g, device=self.device) * 0.02).to(dtype)

        h, d, i = shape.hidden_size, shape.head_dim, shape.intermediate_size
        self.embed_tokens = w(shape.vocab_size, h)
        self.layers = [{
            "qkv": w(h, (shape.num_qo_heads + 2 * shape.num_kv_heads) * d),
            "o": w(shape.num_qo_heads * d, h),
            "gate_up": w(h, 2 * i),
            "down": w(i, h),
            "norm_in": torch.ones(h, dtype=dtype, device=self.device),
            "norm_post": torch.ones(h, dtype=dtype, device=self.device),
        } for _ in range(shape.num_layers)]
        self.norm = torch.ones(h, dtype=dtype, device=self.device)
        self.lm_head = w(shape.vocab_size, h)
        self.inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, d, 2, device=self.device, dtype=torch.float32) / d)
        self.sm_scale = 1.0 / math.sqrt(d)

    # LayeredModel ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[input_ids]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None):
        if residual is not None:
            x = x + residual
        residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.shape.rms_eps)
        return (xf.to(self.dtype) * weight), residual

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(self.dtype)

    def pre_attn(self, layer, positions, hidden, residual):
        p, s = self.layers[layer], self.shape
        x, residual = self._norm(hidden, p["norm_in"], residual)
        qkv = x @ p["qkv"]
        nq, nkv = s.num_qo_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q = qkv[:, :nq].reshape(-1, s.num_qo_heads, s.head_dim)
        k = qkv[:, nq: nq + nkv].reshape(-1, s.num_kv_heads, s.head_dim)
        v = qkv[:, nq + nkv:].reshape(-1, s.num_kv_heads, s.head_dim)
        return self._rope(q, positions), self._rope(k, positions), v.contiguous(), residual

    def post_attn(self, layer, attn, residual):
        p = self.layers[layer]
        x, residual = self._norm(attn.reshape(attn.shape[0], -1) @ p["o"], p["norm_post"], residual)
        gate, up = (x @ p["gate_up"]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ p["down"], residual

    def final(self, hidden, residual):
        return self._norm(hidden, self.norm, residual)[0]

    def logits(self, hidden):
        return (hidden @ self.lm_head.T).float()

    # reference ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The whole model over ``input_ids [N]`` at ``positions [N]`` with attention
        ``attend(layer, q, k, v)``: ``logits [N, V]`` float32."""
        q, k, v, residual = self.pre_attn(0, positions, self.embed(input_ids), None)
        for layer in range(self.num_layers):
            hidden, residual = self.post_attn(layer, attend(layer, q, k, v), residual)
            if layer + 1 < self.num_layers:
                q, k, v, residual = self.pre_attn(layer + 1, positions, hidden, residual)
        return self.logits(self.final(hidden, residual))

    def generate(self, prompt: list[int], new_tokens: int, max_len: int | None = None):
        """Greedy decoding of one sequence on a dense cache (the reference a BE request must match).

        Returns:
            ``(tokens, kv)``: the ``new_tokens`` sampled ids, and the prompt's KV per layer, a list
            of ``(k, v)`` ``[len(prompt), H_kv, D]`` (what a prefill leaves in the KV cache).
        """
        cache = DenseKV(self, 1, max_len or len(prompt) + new_tokens)
        ids = torch.tensor(prompt, device=self.device)
        pos = torch.arange(len(prompt), device=self.device)
        rows = torch.zeros(len(prompt), dtype=torch.int64, device=self.device)
        logits = self.forward(ids, pos, lambda layer, q, k, v: cache.attend(layer, q, k, v, pos, rows, self.sm_scale))
        kv = [(cache.k[layer, 0, :len(prompt)].clone(), cache.v[layer, 0, :len(prompt)].clone())
              for layer in range(self.num_layers)]
        tokens = [int(logits[-1].argmax())]
        for step in range(1, new_tokens):
            p = torch.tensor([len(prompt) + step - 1], device=self.device)
            ids = torch.tensor([tokens[-1]], device=self.device)
            logits = self.forward(ids, p, lambda layer, q, k, v, p=p: cache.attend(layer, q, k, v, p, None,
                                                                                  self.sm_scale))
            tokens.append(int(logits[-1].argmax()))
        return tokens, kv
