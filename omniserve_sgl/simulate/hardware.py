"""What the simulator knows of a serving instance's hardware: the model's shape, the GPU(s), the host
CPU, links to remote CPU servers, and the two ways to time a step from them.

- :class:`ProfileTiming`: a latency profile written by the controller's profiler
  (``python -m omniserve_sgl.profile``); step times come from that machine's fitted model.
- :class:`RooflineTiming`: a roofline over datasheet numbers (dense work: the larger of FLOPs over
  peak FLOP/s and weight bytes over HBM bandwidth, as a staircase in the token count; decode
  attention: KV bytes over HBM bandwidth; CPU attention: KV bytes over the host's memory
  bandwidth times the CPU kernel's measured efficiency).

Every preset number cites its source; the few modelling assumptions are in :class:`Assumptions`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

from omniserve_sgl.control import LatencyModel, StepShape, step_kind
from omniserve_sgl.control.online import DECODE_CPU

GB = 1e9
REPO_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape (Llama family), from its Hugging Face ``config.json``.

    Attributes:
        dtype_bytes: bytes per weight and per KV element (2: bf16/fp16).
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """Reads a Hugging Face ``config.json`` (a file, or a folder holding one).

        Raises:
            OSError: unreadable; ValueError: not JSON, or a field the shape needs is missing.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        name = name or (p.parent.name if p.name == "config.json" else p.stem)
        try:
            c = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not JSON: {e}") from None
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if missing := [k for k in need if k not in c]:
            raise ValueError(f"{p} lacks {', '.join(missing)}: a Llama-family config.json is needed")
        heads = c["num_attention_heads"]
        return cls(name=name, hidden=c["hidden_size"],
                   intermediate=c["intermediate_size"], layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads", heads), head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   vocab=c["vocab_size"], dtype_bytes=2)

    @property
    def dense_params(self) -> int:
        """Weights each token multiplies: QKV and O projections, gated MLP, all layers, and the LM head."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        return self.layers * per_layer + self.hidden * self.vocab

    @property
    def weight_bytes(self) -> int:
        """All weights (dense and the input embedding), bytes."""
        return (self.dense_params + self.hidden * self.vocab) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def qo_bytes_per_row_layer(self) -> int:
        """What one BE row sends to a CPU attention job and gets back, per layer, bytes: its query,
        its new K and V, and the attention output with one float32 LSE per head."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (2 * q + 2 * kv) * self.dtype_bytes + 4 * self.heads


def shipped_model(name: str) -> ModelSpec:
    """A model of ``benchmarks/configs/`` by file stem (``llama-2-70b``, ``yi-34b``, ``llama-3-8b``).

    Raises:
        ValueError: no such config (the message lists them).
    """
    path = REPO_BENCHMARKS / "configs" / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in (REPO_BENCHMARKS / "configs").glob("*.json"))
        raise ValueError(f"no model config {name!r}; shipped: {', '.join(have)} (or give a config.json path)")
    return ModelSpec.from_config(path, name=name)


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """One GPU: dense bf16 FLOP/s (no sparsity), HBM bytes/s and bytes, the GPU-GPU link for
    tensor parallelism and the host link (PCIe), bytes/s each way."""

    name: str
    bf16_flops: float
    hbm_bytes_per_s: float
    memory_bytes: float
    nvlink_bytes_per_s: float
    pcie_bytes_per_s: float
    source: str


@dataclasses.dataclass(frozen=True)
class CPUSpec:
    """A CPU server (or the GPU server's host): cores and memory bandwidth over all sockets."""

    name: str
    cores: int
    mem_bytes_per_s: float
    memory_bytes: float
    source: str


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """The network to a remote CPU server: bytes/s each way and one-way latency, s."""

    name: str
    bytes_per_s: float
    latency_s: float
    source: str


GPUS = {
    "a100-80gb": GPUSpec("A100-80GB SXM", 312e12, 2.039e12, 80 * GB, 300 * GB, 32 * GB,
                         "NVIDIA A100 datasheet (2021): 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, NVLink 600 GB/s "
                         "bidirectional, PCIe Gen4 x16 (32 GB/s each way)"),
    "h100": GPUSpec("H100 SXM", 989e12, 3.35e12, 80 * GB, 450 * GB, 64 * GB,
                    "NVIDIA H100 datasheet (2023): 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink 900 GB/s "
                    "bidirectional, PCIe Gen5 x16 (64 GB/s each way)"),
    "h200": GPUSpec("H200 SXM", 989e12, 4.8e12, 141 * GB, 450 * GB, 64 * GB,
                    "NVIDIA H200 datasheet (2024): 989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e, 141 GB, NVLink "
                    "900 GB/s bidirectional, PCIe Gen5 x16"),
}

CPUS = {
    # The paper's host (OmniServe, section 5.1): two sockets.
    "xeon-gold-6342": CPUSpec("2x Xeon Gold 6342", 48, 2 * 204.8 * GB, 1024 * GB,
                              "Intel ARK, Xeon Gold 6342: 24 cores, 8 channels DDR4-3200 (204.8 GB/s) per "
                              "socket; two sockets as in the paper's host; 1 TB of memory assumed"),
}

LINKS = {
    "100gbit": LinkSpec("100 Gbit/s", 12.5 * GB, 5e-6, "100 Gbit/s Ethernet/InfiniBand line rate; 5 us one-way "
                        "latency assumed (RDMA class)"),
    "10gbit": LinkSpec("10 Gbit/s", 1.25 * GB, 50e-6, "10 Gbit/s Ethernet line rate; 50 us one-way latency "
                       "assumed (kernel TCP class)"),
}


def cpu_kernel_efficiency(path: Path = REPO_BENCHMARKS / "results" / "cpu_attention.json") -> float:
    """Our CPU attention kernel's bandwidth as a share of the machine's measured read bandwidth:
    the median of ``pct_of_read_bw`` over the Llama-3-8B shapes of ``benchmarks/cpu_attention.py``'s
    results (the small model's short rows are dominated by per-row costs a big model does not pay).

    Raises:
        OSError / ValueError: the results file is missing or holds no such row.
    """
    rows = json.loads(path.read_text())["kernel"]
    pct = [r["pct_of_read_bw"] for r in rows if r.get("shape") == "llama3-8b"]
    if not pct:
        raise ValueError(f"{path} has no llama3-8b kernel rows")
    return statistics.median(pct) / 100


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """Modelling assumptions of the roofline (not datasheet numbers; each says where it comes from).

    Attributes:
        mfu: share of peak FLOP/s a large GEMM reaches (cuBLAS bf16 GEMMs commonly reach 60-75%).
        mbu: share of HBM bandwidth a weight- or KV-bound kernel reaches (commonly 70-85%).
        tile: tokens per step of the dense staircase (GEMM tile height: FlashInfer/cuBLAS tiles
            of 64-128 rows).
        step_overhead_s: fixed cost of one GPU pass (scheduling, launches, sampling; SGLang with CUDA
            graphs spends a few ms per step on the host).
        tp_latency_s: latency of one all-reduce over NVLink (NCCL, small messages).
        cpu_stream_share: share of the datasheet memory bandwidth a streaming read reaches (STREAM on
            server CPUs: 70-85%); times :func:`cpu_kernel_efficiency` gives the kernel's.
        cpu_job_overhead_s: per-job cost of a CPU attention job (one layer): the handoff measured in
            ``benchmarks/results/cpu_attention.json`` (``handoff``, worker on its own core:
            overhead p50 57 us).
        host_cores_for_attention: share of the host's cores the CPU attention worker gets (the rest
            run the scheduler, tokenizer and HTTP server).
    """

    mfu: float = 0.6
    mbu: float = 0.8
    tile: int = 64
    step_overhead_s: float = 3e-3
    tp_latency_s: float = 10e-6
    cpu_stream_share: float = 0.8
    cpu_job_overhead_s: float = 60e-6
    host_cores_for_attention: float = 0.75


class ProfileTiming:
    """Step and CPU job times from a latency profile measured by the controller's profiler.

    The profile's CPU terms time the worker of that machine; remote CPU servers are assumed to be
    that machine's equals.

    Args:
        served: ``{step kind: factor}`` (kinds of :func:`~omniserve_sgl.control.step_kind`): each
            step of that kind takes ``factor`` times the profile's prediction, and a CPU job the
            ``decode+cpu`` factor times its profiled time. For a machine whose served steps ran
            slower than the idle profile measured them (the server's
            ``omniserve_step_seconds_total`` over ``omniserve_step_profiled_seconds_total``); a
            kind not given keeps the profile's time.
    """

    def __init__(self, model: LatencyModel, kv_bytes_per_token: int, num_layers: int,
                 pcie_bytes_per_s: float = 5 * GB, qo_bytes_per_row_layer: int = 0,
                 served: Mapping[str, float] | None = None):
        self.model, self.kv_bytes_per_token, self.num_layers = model, kv_bytes_per_token, num_layers
        self.pcie_bytes_per_s, self.qo_bytes_per_row_layer = pcie_bytes_per_s, qo_bytes_per_row_layer
        self.served = dict(served or {})

    def gpu_step_s(self, shape: StepShape) -> float:
        """A pass's GPU time, s: the profile's prediction without its CPU terms, times the
        ``served`` factor of ``shape``'s own kind (a synchronous step with CPU rows: ``decode+cpu``,
        whose factor the server measured over the whole step)."""
        gpu = dataclasses.replace(shape, cpu_kv_bytes=0.0, cpu_jobs=0)
        return self.model.predict(gpu) * self.served.get(step_kind(shape), 1.0)

    def cpu_job_s(self, kv_bytes: float) -> float:
        """One CPU attention job (one layer of some BE rows) reading ``kv_bytes``, s."""
        return (self.model.c_cpu_job + self.model.c_cpu_bytes * kv_bytes) * self.served.get(DECODE_CPU, 1.0)

    def move_s(self, kv_bytes: float) -> float:
        """Moving ``kv_bytes`` of KV between the GPU cache and the BE pool, s."""
        return kv_bytes / self.pcie_bytes_per_s

    def predict(self, shape: StepShape) -> float:
        """The synchronous step (the GPU waits for the CPU in each layer): the profile itself (times
        its kind's ``served`` factor)."""
        return self.model.predict(shape) * self.served.get(step_kind(shape), 1.0)


class RooflineTiming:
    """Step and CPU job times of ``model`` on ``tp`` GPUs and a host CPU, from datasheet numbers
    (see the module docstring); ``predict`` is the synchronous step, which the controller reads.

    Args:
        cpu_cores: cores of ``cpu`` the attention worker uses (default: ``host_cores_for_attention``
            of them).

    Raises:
        ValueError: ``tp`` < 1, or the model's heads not divisible by ``tp``.
    """

    def __init__(self, model: ModelSpec, gpu: GPUSpec, cpu: CPUSpec, tp: int = 1,
                 assumptions: Assumptions | None = None, kernel_efficiency: float | None = None,
                 cpu_cores: float | None = None):
        if tp < 1 or model.heads % tp or model.kv_heads % tp and tp % model.kv_heads:
            raise ValueError(f"tensor parallelism {tp} does not divide {model.name}'s {model.heads} heads")
        self.spec, self.gpu, self.cpu, self.tp = model, gpu, cpu, tp
        self.a = assumptions or Assumptions()
        self.kernel_efficiency = cpu_kernel_efficiency() if kernel_efficiency is None else kernel_efficiency
        cores = cpu.cores * self.a.host_cores_for_attention if cpu_cores is None else cpu_cores
        # Memory bandwidth is shared by all cores: a share of the cores gets at most its share of it.
        self.cpu_bytes_per_s = (cpu.mem_bytes_per_s * self.a.cpu_stream_share * self.kernel_efficiency
                                * min(cores / cpu.cores, 1.0))
        self.kv_bytes_per_token = model.kv_bytes_per_token
        self._dense_params, self._weight_bytes = model.dense_params, model.weight_bytes  # per step otherwise
        self.num_layers = model.layers
        self.qo_bytes_per_row_layer = model.qo_bytes_per_row_layer

    def gpu_step_s(self, shape: StepShape) -> float:
        """One pass on the GPUs, s: fixed cost + dense staircase + GPU attention + TP all-reduces."""
        if shape.tokens <= 0:
            return 0.0
        a, g, m = self.a, self.gpu, self.spec
        flops, hbm = g.bf16_flops * a.mfu * self.tp, g.hbm_bytes_per_s * a.mbu * self.tp
        padded = math.ceil(shape.tokens / a.tile) * a.tile
        dense = max(2 * self._dense_params * padded / flops, self._weight_bytes / hbm)
        # Prefill attention: QK^T and PV, 2 FLOPs per multiply-add, over the causal half.
        attn = 4 * m.heads * m.head_dim * m.layers * shape.prefill_attn_work / 2 / flops
        attn += (shape.decode_context + shape.prefill_context) * m.kv_bytes_per_token / hbm
        comm = 0.0
        if self.tp > 1:  # two ring all-reduces of the hidden states per layer
            size = shape.tokens * m.hidden * m.dtype_bytes
            comm = 2 * m.layers * (2 * (self.tp - 1) / self.tp * size / g.nvlink_bytes_per_s + a.tp_latency_s)
        return a.step_overhead_s + dense + attn + comm

    def cpu_job_s(self, kv_bytes: float) -> float:
        """One CPU attention job (one layer of some BE rows) reading ``kv_bytes`` on the host, s."""
        return self.a.cpu_job_overhead_s + kv_bytes / self.cpu_bytes_per_s

    def move_s(self, kv_bytes: float) -> float:
        """Moving ``kv_bytes`` of KV over PCIe (each GPU moves its TP share in parallel), s."""
        return kv_bytes / (self.gpu.pcie_bytes_per_s * self.tp)

    def predict(self, shape: StepShape) -> float:
        """The synchronous step, s: the GPU pass plus, per layer, the CPU job it waits for."""
        cpu = 0.0
        if shape.cpu_jobs:
            cpu = shape.cpu_jobs * self.a.cpu_job_overhead_s + shape.cpu_kv_bytes / self.cpu_bytes_per_s
        return self.gpu_step_s(shape) + cpu

    def gpu_kv_tokens(self, mem_fraction: float = 0.9) -> int:
        """GPU KV cache capacity, tokens: ``mem_fraction`` of the GPUs' memory less the weights."""
        free = self.tp * self.gpu.memory_bytes * mem_fraction - self.spec.weight_bytes
        if free <= 0:
            raise ValueError(f"{self.spec.name} ({self.spec.weight_bytes / GB:.0f} GB) does not fit "
                             f"{self.tp} x {self.gpu.name}")
        return int(free // self.spec.kv_bytes_per_token)
