"""Asynchronous attention piggybacking (OmniServe paper section 3.2): offloaded BE tokens move
through the model's layers across GPU passes. At layer ``l`` of a pass, BE rows whose layer-``l``
attention is back from the CPU worker join the LS rows for everything after attention, and their
layer-``l+1`` q/k/v go back to the worker; the GPU never waits for the CPU while the pass has LS rows.

SGLang-agnostic: :class:`PiggybackExecutor` drives any :class:`LayeredModel` (the SGLang adapter
lives in ``omniserve_sgl.sglang_glue``; :class:`TorchLlama` is a plain torch decoder for tests and
``benchmarks/piggyback.py``) and a :class:`omniserve_sgl.be_runtime.BERuntime`.
"""

from omniserve_sgl.piggyback.executor import LSBatch, PassResult, PiggybackExecutor
from omniserve_sgl.piggyback.model import LayeredModel
from omniserve_sgl.piggyback.state import BERow, Phase
from omniserve_sgl.piggyback.store import ResidualStore
from omniserve_sgl.piggyback.torch_llama import LlamaShape, TorchLlama

__all__ = ["BERow", "LSBatch", "LayeredModel", "LlamaShape", "PassResult", "Phase", "PiggybackExecutor",
           "ResidualStore", "TorchLlama"]
