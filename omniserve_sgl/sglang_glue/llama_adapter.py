"""SGLang's Llama-family models as a :class:`omniserve_sgl.piggyback.LayeredModel`, built from the
model's own module objects (SGLANG-INTERNALS section 3), so LS rows alone get SGLang's own ops:

    entry:        r = embed_tokens(ids); x = layers[0].input_layernorm(r)
    pre_attn(l):  x, r = layers[l].input_layernorm(h, r); q, k, v = self_attn.forward_prepare_native(pos, x)
    post_attn(l): h = o_proj(a); x, r = layers[l].post_attention_layernorm(h, r); h = mlp(x)
    final:        norm(h, r); logits: the model's logits processor in decode mode

Supported: one GPU (no tensor or pipeline parallelism), models whose layers are
``input_layernorm`` / ``self_attn`` / ``post_attention_layernorm`` / ``mlp`` and whose attention
prepares q/k/v with ``forward_prepare_native`` (``LlamaForCausalLM``, ``MistralForCausalLM``, which
is Llama, ``Qwen3ForCausalLM``, with its q/k norms inside it) or as ``qkv_proj``, split,
``rotary_emb`` (``Qwen2ForCausalLM``, SGLANG-INTERNALS section 3; the default model is Llama, the
others are recognised by this structure). :func:`adapter_for` says why another model is not.
"""

from __future__ import annotations

import torch

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class SGLangLlama:
    """The :class:`~omniserve_sgl.piggyback.LayeredModel` of an SGLang ``LlamaForCausalLM``."""

    def __init__(self, causal_lm, num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.lm, self.inner = causal_lm, causal_lm.model
        self.layers = self.inner.layers
        self.num_layers = len(self.layers)
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.hidden_size = causal_lm.config.hidden_size
        self.dtype, self.device = dtype, device

    def embed(self, input_ids):
        return self.inner.embed_tokens(input_ids)

    def pre_attn(self, layer, positions, hidden, residual):
        mod = self.layers[layer]
        if residual is None:
            residual, x = hidden, mod.input_layernorm(hidden)
        else:
            x, residual = mod.input_layernorm(hidden, residual)
        attn = mod.self_attn
        if hasattr(attn, "forward_prepare_native"):
            q, k, v = attn.forward_prepare_native(positions, x)
        else:  # Qwen2Attention.forward's own steps
            qkv, _ = attn.qkv_proj(x)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
        n = q.shape[0]
        return (q.reshape(n, self.num_qo_heads, self.head_dim), k.reshape(n, self.num_kv_heads, self.head_dim),
                v.reshape(n, self.num_kv_heads, self.head_dim), residual)

    def post_attn(self, layer, attn, residual):
        mod = self.layers[layer]
        h, _ = mod.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        x, residual = mod.post_attention_layernorm(h, residual)
        return mod.mlp(x), residual

    def final(self, hidden, residual):
        return self.inner.norm(hidden, residual)[0]

    def logits(self, hidden):
        from sglang.srt.layers.logits_processor import LogitsMetadata
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        out = self.lm.logits_processor(None, hidden, self.lm.lm_head, LogitsMetadata(forward_mode=ForwardMode.DECODE))
        return out.next_token_logits.float()

    def ls_attention(self, forward_batch):
        """``attend(layer, q, k, v)`` over SGLang's attention backend for the pass's own rows."""
        def attend(layer, q, k, v):
            n = q.shape[0]
            out = self.layers[layer].self_attn.attn(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1),
                                                     forward_batch)
            return out.reshape(n, self.num_qo_heads, self.head_dim)
        return attend


def adapter_for(model_runner) -> tuple[SGLangLlama | None, str]:
    """``(adapter, "")`` for a supported model, else ``(None, why)``."""
    lm = model_runner.model
    name = type(lm).__name__
    if getattr(model_runner, "tp_size", 1) != 1 or getattr(model_runner, "pp_size", 1) != 1:
        return None, "tensor or pipeline parallelism"
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(inner, a) for a in ("embed_tokens", "norm")) or not hasattr(lm, "lm_head"):
        return None, f"{name} is not a Llama-family decoder (embed_tokens, layers, norm, lm_head)"
    first = layers[0]
    attn = getattr(first, "self_attn", None)
    plain = all(hasattr(attn, a) for a in ("qkv_proj", "q_size", "kv_size", "rotary_emb")) and not hasattr(attn, "q_norm")
    if not all(hasattr(first, p) for p in _LAYER_PARTS) or not (hasattr(attn, "forward_prepare_native") or plain):
        return None, (f"{name}'s layers are not Llama's (input_layernorm, self_attn with forward_prepare_native or "
                      "qkv_proj + rotary_emb, post_attention_layernorm, mlp)")
    if getattr(lm, "capture_aux_hidden_states", False):
        return None, f"{name} captures auxiliary hidden states (speculative decoding)"
    radix = attn.attn
    return SGLangLlama(lm, radix.tp_q_head_num, radix.tp_k_head_num, radix.qk_head_dim, model_runner.dtype,
                       torch.device(model_runner.device)), ""
