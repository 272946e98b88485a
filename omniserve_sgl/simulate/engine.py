"""The step-by-step simulation of one serving instance: an LS stream and a BE stream served by one of
:data:`SYSTEMS`, each step timed by a hardware timing (:mod:`omniserve_sgl.simulate.hardware`).

The omniserve systems run the SLO controller's own :class:`~omniserve_sgl.control.Controller`, fed a
:class:`~omniserve_sgl.control.ServerView` built as the server's glue builds it, with its plan
applied as the glue applies it. The baselines follow SGLang 0.5.23's scheduler: a step is either a
prefill (EXTEND) batch, which runs while decode rows wait, or a decode batch of every running
request; new requests are admitted in queue order while the chunk budget and the KV cache last
(``PrefillAdder``: a request reserves its prompt and ``new_token_ratio`` of its output), and a
decode step short of KV retracts the newest request (``retract_decode``) back to the queue.

Systems:
  ls-only              the LS stream alone (the upper bound)
  fcfs                 LS and BE in one first-come-first-served queue, BE KV on the GPU
  priority             LS before BE in the queue (SGLang ``--enable-priority-scheduling``,
                       ``--retraction-policy priority``); preemption of BE only with ``priority_preemption``
  headroom             ``fcfs`` with the BE backlog capped by the client (Llumnix-like reservation)
  omniserve-nocontrol  every BE request offloaded after prefill, every BE row in every decode step,
                       the GPU waiting for the CPU in each layer (``--omniserve-disable-control``);
                       the server's admission round (:func:`omniserve_sgl.admission.admission_round`:
                       LS first, one BE prompt per prefill batch)
  omniserve-sync       the controller, the GPU waiting for the CPU in each layer (NEO-like; the
                       server's ``--omniserve`` today)
  omniserve            the controller with asynchronous piggybacking: a BE row's layer-l attention
                       runs on a CPU while the GPU goes on; the row rejoins a later pass at layer l
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Callable

from omniserve_sgl.admission import admission_round
from omniserve_sgl.bench.loadgen import RequestRecord
from omniserve_sgl.control import (
    CPU,
    GPU,
    SLO,
    WAITING,
    BERequest,
    Controller,
    ControllerConfig,
    LSDecode,
    LSWaiting,
    OnlineCorrection,
    OutputLengths,
    ServerView,
    StepShape,
    step_kind,
)
from omniserve_sgl.simulate.hardware import LinkSpec
from omniserve_sgl.simulate.workload import SimRequest

SYSTEMS = ("ls-only", "fcfs", "priority", "headroom", "omniserve-nocontrol", "omniserve-sync", "omniserve")
CONTROLLED = ("omniserve-sync", "omniserve")
# SGLang 0.5.23 defaults (server_args.py / global_config): the share of a request's output the
# PrefillAdder reserves, decaying per decode step from init to min over the decay steps.
INIT_NEW_TOKEN_RATIO, MIN_NEW_TOKEN_RATIO, NEW_TOKEN_RATIO_DECAY_STEPS = 0.7, 0.1, 600


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """One simulated serving instance.

    Attributes:
        timing: a :class:`~omniserve_sgl.simulate.hardware.ProfileTiming` or ``RooflineTiming``.
        gpu_kv_tokens: GPU KV cache capacity, tokens (SGLang's ``--max-total-tokens``).
        be_pool_tokens: BE KV pool capacity of each CPU node, tokens.
        chunk_tokens: the largest prefill chunk, tokens (``--chunked-prefill-size``).
        max_running: the most requests running at once (``--max-running-requests``).
        remote_cpus: CPU servers beside the host, each the host's equal, reached over ``link``.
        noise: spread (sigma of a lognormal with mean 1) of a step's measured time around the
            timing's; the controller learns it online as the server does.
        priority_preemption: under ``priority``, an LS request that does not fit the KV cache
            retracts running BE requests. SGLang preempts only when the priorities differ by more
            than ``--priority-scheduling-preemption-threshold`` (default 10; coserve sends LS 1 and
            BE 0), so by default it does not.
        drain_timeout_s: after the window, requests in flight get this long to finish.
        ignore_eos: the requests carry SGLang's ``ignore_eos`` (fixed output lengths, as
            ``benchmarks/coserve.py`` sends them): SGLang's PrefillAdder then keeps a running
            request's whole remaining output free, not the new-token ratio of it.
        step_overhead_s: the scheduler's own time per step outside the forward (forming the batch,
            processing results), s; the device idles through it where nothing overlaps the
            forward (SGLang's CPU device).
        results_lag: a step's tokens reach the clients only once the next step has run, as under
            SGLang's overlap schedule (``Scheduler.event_loop_overlap`` processes step N's results
            after launching step N+1) on a device whose forward runs inside the launch (SGLang's
            CPU device). With no next step, they go out at once. Off for a GPU, whose launch
            returns before the forward ends, and for omniserve, whose scheduler leaves the overlap
            loop while BE requests are in the server.
    """

    system: str
    timing: object
    slo: SLO
    gpu_kv_tokens: int
    be_pool_tokens: int
    chunk_tokens: int = 8192
    max_running: int = 256
    controller: ControllerConfig = dataclasses.field(default_factory=ControllerConfig)
    remote_cpus: int = 0
    link: LinkSpec | None = None
    noise: float = 0.0
    priority_preemption: bool = False
    seed: int = 0
    drain_timeout_s: float = 600.0
    ignore_eos: bool = False
    step_overhead_s: float = 0.0
    results_lag: bool = False

    def __post_init__(self):
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; choose from {', '.join(SYSTEMS)}")
        if self.gpu_kv_tokens < 1 or self.chunk_tokens < 1 or self.max_running < 1:
            raise ValueError("gpu_kv_tokens, chunk_tokens and max_running must be >= 1")
        if self.step_overhead_s < 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {self.step_overhead_s}")
        if self.remote_cpus and self.link is None:
            raise ValueError("remote CPU servers need a link")


@dataclasses.dataclass(eq=False)
class _Req:
    rid: str
    cls: str
    arrival: float
    prompt_len: int
    output_len: int
    target: int = 0  # tokens to prefill: the prompt, plus the output so far after a retraction
    prefilled: int = 0
    generated: int = 0
    token_times: list = dataclasses.field(default_factory=list)
    placement: str = WAITING  # BE: waiting, gpu (KV in the GPU cache), cpu (KV on node ``node``)
    node: int = 0
    gpu_kv: int = 0  # GPU KV slots held
    last_run_step: int = -1
    stage: int = 0  # asynchronous piggybacking: the next layer boundary the row's token joins
    ready_at: float = 0.0  # ... once its CPU attention is back
    error: str = ""
    view_key: object = ()  # what view_obj, the controller's view of it, was made from
    view_obj: object = None

    @property
    def context(self) -> int:
        return self.prompt_len + self.generated

    @property
    def done(self) -> bool:
        return self.generated >= self.output_len or bool(self.error)


class _Node:
    """A CPU that runs attention jobs one after another (the worker's cores work on one job)."""

    def __init__(self, latency_s: float, bytes_per_s: float | None, pool_tokens: int):
        self.latency_s, self.bytes_per_s, self.pool_free = latency_s, bytes_per_s, pool_tokens
        self.free_at, self.busy_s = 0.0, 0.0

    def run(self, at: float, job_s: float, transfer_bytes: float) -> float:
        """Runs a job submitted at ``at``; returns when its result is back at the GPU server."""
        wire = self.latency_s + (transfer_bytes / self.bytes_per_s if self.bytes_per_s else 0.0)
        start = max(self.free_at, at + wire)
        self.free_at = start + job_s
        self.busy_s += job_s
        return self.free_at + wire


@dataclasses.dataclass
class SimStats:
    """What a run measured besides the requests: GPU busy time (passes), CPU attention time per
    node, s, the BE tokens whose attention ran on a CPU, and the longest decode step that had LS
    rows and BE work (BE rows, or a BE chunk in a mixed step), s; ``step_s``: per step kind
    (:func:`~omniserve_sgl.control.step_kind`), ``[steps, s]``."""

    wall_s: float = 0.0
    gpu_busy_s: float = 0.0
    cpu_busy_s: list = dataclasses.field(default_factory=list)
    be_cpu_tokens: int = 0
    steps: int = 0
    longest_ls_decode_s: float = 0.0
    step_s: dict = dataclasses.field(default_factory=dict)

    @property
    def gpu_utilisation(self) -> float:
        return self.gpu_busy_s / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_utilisation(self) -> float:
        return sum(self.cpu_busy_s) / (self.wall_s * len(self.cpu_busy_s)) if self.wall_s and self.cpu_busy_s else 0.0


class Simulation:
    """Serves ``ls`` (requests with arrival times) and a BE stream: ``be`` requests with arrival
    times, or, when ``be_backlog`` is given, a backlog of ``be_concurrency`` requests in flight
    whose lengths ``be_backlog(rng)`` draws (each one finishing inside the window sends the next).

    Raises:
        ValueError: an invalid :class:`SimConfig` (see there).
    """

    def __init__(self, cfg: SimConfig, ls: list[SimRequest], duration_s: float, be: list[SimRequest] = (),
                 be_backlog: Callable[[random.Random], tuple[int, int]] | None = None, be_concurrency: int = 0):
        self.cfg, self.duration_s = cfg, duration_s
        self.timing = cfg.timing
        self.L = self.timing.num_layers
        self.kv_bytes = self.timing.kv_bytes_per_token
        self.rng = random.Random(cfg.seed + 7)
        self.be_backlog, self.be_concurrency = be_backlog, be_concurrency if cfg.system != "ls-only" else 0
        self.arrivals: list[tuple[float, int, _Req]] = []
        self.all: list[_Req] = []
        for r in ls:
            self._add(r.service_class, r.arrival, r.prompt_len, r.output_len)
        if cfg.system != "ls-only":
            for r in be:
                self._add(r.service_class, r.arrival, r.prompt_len, r.output_len)
        heapq.heapify(self.arrivals)
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []  # holding GPU KV or BE pool KV, decoding or mid-prefill
        self.gpu_free = cfg.gpu_kv_tokens
        host_pool = cfg.be_pool_tokens
        self.nodes = [_Node(0.0, None, host_pool)] + [
            _Node(cfg.link.latency_s, cfg.link.bytes_per_s, host_pool) for _ in range(cfg.remote_cpus)]
        self.t, self.step = 0.0, 0
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.decoded_last_step = True
        self.stats = SimStats(cpu_busy_s=[0.0] * len(self.nodes))
        self.async_cpu = cfg.system == "omniserve"
        self.lengths = OutputLengths()  # the LS requests' that finished, as the server's glue keeps them
        self.unsent: list[tuple[_Req, int]] = []  # results_lag: the last step's tokens, (request, index)
        if cfg.system in CONTROLLED:
            self.model = OnlineCorrection(self.timing)
            self.controller = Controller(self.model, cfg.controller)

    # workload --------------------------------------------------------------------------------
    def _add(self, cls: str, at: float, prompt_len: int, output_len: int) -> _Req:
        r = _Req(f"{cls}{len(self.all)}", cls, at, prompt_len, output_len, target=prompt_len)
        self.all.append(r)
        heapq.heappush(self.arrivals, (at, len(self.all), r))
        return r

    def _send_be(self) -> None:
        if self.be_backlog is not None and self.t < self.duration_s:
            self._add("be", self.t, *self.be_backlog(self.rng))

    def _admit_arrivals(self) -> None:
        while self.arrivals and self.arrivals[0][0] <= self.t:
            _, _, r = heapq.heappop(self.arrivals)
            if r.target > self.cfg.gpu_kv_tokens:
                r.error = f"prompt of {r.target} tokens exceeds the KV cache ({self.cfg.gpu_kv_tokens})"
                continue
            self.waiting.append(r)

    # time ------------------------------------------------------------------------------------
    def _measured(self, predicted: float) -> float:
        if self.cfg.noise <= 0:
            return predicted
        s = self.cfg.noise
        return predicted * math.exp(self.rng.gauss(-s * s / 2, s))

    def _advance(self, seconds: float, busy: bool = True) -> None:
        self.t += seconds
        if busy:
            self.stats.gpu_busy_s += seconds

    # the loop --------------------------------------------------------------------------------
    def run(self) -> list[RequestRecord]:
        """Runs to the end of the window and the drain; returns one record per request sent."""
        for _ in range(self.be_concurrency if self.be_backlog else 0):
            self._send_be()
        end = self.duration_s + self.cfg.drain_timeout_s
        while self.t < end:
            self._admit_arrivals()
            if not (self.waiting or self.running or self.arrivals):
                break
            unsent, self.unsent = self.unsent, []
            progressed = self._step_controlled() if self.cfg.system in CONTROLLED else self._step_sglang()
            self._send(unsent, self.t if progressed else None)
            if progressed:
                self._advance(self.cfg.step_overhead_s, busy=False)
            else:  # nothing runnable: wait for the next arrival or CPU result
                nxt = [self.arrivals[0][0]] if self.arrivals else []
                nxt += [r.ready_at for r in self.running if r.cls == "be" and r.ready_at > self.t]
                if not nxt:
                    break
                self._advance(max(min(nxt) - self.t, 1e-6), busy=False)
        self._send(self.unsent, None)
        self.stats.wall_s = self.t
        self.stats.cpu_busy_s = [n.busy_s for n in self.nodes]
        return [self._record(r) for r in self.all if r.arrival <= self.duration_s]

    def _record(self, r: _Req) -> RequestRecord:
        rec = RequestRecord(r.cls, r.arrival, r.output_len, prompt_len=r.prompt_len, output_len=r.generated,
                            token_times=list(r.token_times), error=r.error or ("" if r.done else "not finished"))
        rec.success = r.generated >= r.output_len and not r.error
        if r.token_times:
            rec.ttft = r.token_times[0] - r.arrival
            rec.latency = r.token_times[-1] - r.arrival
        return rec

    # tokens and KV ---------------------------------------------------------------------------
    def _emit(self, r: _Req, at: float) -> None:
        r.generated += 1
        r.token_times.append(at)
        if r.placement == CPU and r.cls == "be":
            self.stats.be_cpu_tokens += 1
        if self.cfg.results_lag:
            self.unsent.append((r, len(r.token_times) - 1))
        if r.done:
            self.running.remove(r)  # the next step leaves it out (SGLang's _reqs_finishing_inflight)
            if not self.cfg.results_lag:
                self._finished(r)

    def _finished(self, r: _Req) -> None:
        """A finished request's result was processed: its KV is freed, and a BE client sends its
        next request."""
        self._release(r)
        if r.cls == "be":
            self._send_be()
        elif not r.error:
            self.lengths.add(r.generated)

    def _send(self, unsent: list[tuple[_Req, int]], at: float | None) -> None:
        """``results_lag``: the previous step's results are processed, after the step that followed
        it (its tokens reach their clients at ``at``, the end of that step; None: at once, no step
        ran); the requests they finished free their KV only now, so that step could not use it."""
        for r, i in unsent:
            if at is not None:
                r.token_times[i] = at
            if r.done and i == len(r.token_times) - 1:
                self._finished(r)

    def _release(self, r: _Req) -> None:
        self.gpu_free += r.gpu_kv
        r.gpu_kv = 0
        if r.placement == CPU:
            self.nodes[r.node].pool_free += r.context

    def _retract(self, r: _Req) -> None:
        """SGLang's retraction: KV freed, back to the queue; the output so far is prefilled again."""
        self._release(r)
        self.running.remove(r)
        r.placement, r.prefilled, r.target, r.stage = WAITING, 0, r.prompt_len + r.generated, 0
        self.waiting.insert(0, r)
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def _wire_s(self, node: _Node, nbytes: float) -> float:
        return nbytes / node.bytes_per_s + node.latency_s if node.bytes_per_s else 0.0

    def _to_cpu(self, r: _Req) -> float:
        """Moves ``r``'s KV to the CPU node with the most free pool; returns the GPU's part of the
        move (the PCIe copy to the host), s. The network hop to a remote node is the host's: the
        GPU goes on, and the row's first CPU job waits for its KV to arrive."""
        node = max(range(len(self.nodes)), key=lambda i: self.nodes[i].pool_free)
        self.gpu_free += r.gpu_kv
        r.gpu_kv, r.placement, r.node = 0, CPU, node
        self.nodes[node].pool_free -= r.context
        nbytes = r.context * self.kv_bytes
        pcie = self.timing.move_s(nbytes)
        r.stage, r.ready_at = 0, self.t + pcie + self._wire_s(self.nodes[node], nbytes)
        return pcie

    def _to_gpu(self, r: _Req) -> float:
        """Moves ``r``'s KV back to the GPU; returns the PCIe copy's time, s. From a remote node the
        KV first crosses the network (the host's work): the row decodes once it is there."""
        n = self.nodes[r.node]
        n.pool_free += r.context
        r.placement, r.gpu_kv = GPU, r.context
        self.gpu_free -= r.context
        nbytes = r.context * self.kv_bytes
        r.ready_at = self.t + self._wire_s(n, nbytes)
        return self.timing.move_s(nbytes)

    def _finish_prefill(self, r: _Req, at: float) -> float:
        """A request's last prefill chunk ran: it decodes from now on (a first prefill also samples
        its first token). Returns the time of an offload it triggers, s."""
        self.waiting.remove(r)
        self.running.append(r)
        if r.cls == "be":
            r.placement = GPU
        if r.generated == 0:
            self._emit(r, at)
        if r.done or r.cls != "be":
            return 0.0
        offload = self.cfg.system == "omniserve-nocontrol" or (
            self.cfg.system in CONTROLLED and self.cfg.controller.be_placement == "cpu")
        if offload and max(n.pool_free for n in self.nodes) >= r.context:
            return self._to_cpu(r)
        return 0.0

    # steps -----------------------------------------------------------------------------------
    def _prefill(self, batch: list[tuple[_Req, int]]) -> None:
        """Runs one prefill step of ``(request, chunk)``; KV was allocated by the caller."""
        shape = StepShape(tokens=sum(c for _, c in batch),
                          prefill_attn_work=sum(c * (r.prefilled + c) for r, c in batch),
                          prefill_context=sum(r.prefilled + c for r, c in batch))
        sampled = []
        if self.async_cpu:  # a prefill pass carries every ready offloaded row: small beside the chunk
            joined, sampled, _ = self._piggyback(shape, len(self._cpu_rows()))
            shape = dataclasses.replace(shape, tokens=shape.tokens + math.ceil(joined / (self.L + 1)))
        seconds = self._measured(self.timing.gpu_step_s(shape))
        self._observe(shape, seconds)
        self._advance(seconds)
        self.step += 1
        self.stats.steps += 1
        for r in sampled:
            r.last_run_step = self.step
            self._emit(r, self.t)
        self._finish_chunks(batch)

    def _decode(self, gpu_rows: list[_Req], cpu_rows: list[_Req], chunks: list[tuple[_Req, int]] = ()) -> None:
        """One synchronous decode step: the GPU rows, and CPU rows whose attention the GPU waits for
        in each layer (on every node in parallel); with ``chunks`` (``(request, chunk)``, KV
        allocated by the caller) a mixed step that prefills them too."""
        for r in gpu_rows:
            r.gpu_kv += 1
            self.gpu_free -= 1
        full = StepShape(tokens=len(gpu_rows) + len(cpu_rows) + sum(c for _, c in chunks),
                         prefill_attn_work=sum(c * (r.prefilled + c) for r, c in chunks),
                         prefill_context=sum(r.prefilled + c for r, c in chunks),
                         decode_context=sum(r.context for r in gpu_rows), decode_rows=len(gpu_rows) + len(cpu_rows),
                         cpu_kv_bytes=sum(r.context for r in cpu_rows) * self.kv_bytes,
                         cpu_jobs=self.L if cpu_rows else 0)
        gpu_s = self.timing.gpu_step_s(full)
        cpu_s = 0.0
        for layer in range(self.L if cpu_rows else 0):  # each layer waits for its jobs on every node
            at = self.t + gpu_s * layer / self.L + cpu_s
            back = at
            for i, node in enumerate(self.nodes):
                if mine := [r for r in cpu_rows if r.node == i]:
                    job = self.timing.cpu_job_s(sum(r.context for r in mine) * self.kv_bytes / self.L)
                    back = max(back, node.run(at, job, len(mine) * self.timing.qo_bytes_per_row_layer))
            cpu_s += back - at
        for r in cpu_rows:
            self.nodes[r.node].pool_free -= 1
        seconds = self._measured(gpu_s + cpu_s)
        self._observe(full, seconds)
        self._advance(seconds)
        self._after_decode(gpu_rows + cpu_rows, seconds, be_chunk=any(r.cls == "be" for r, _ in chunks))
        self._finish_chunks(chunks)

    def _finish_chunks(self, chunks: list[tuple[_Req, int]]) -> None:
        """Prefill chunks ran (see :meth:`_finish_prefill`); a step with chunks, mixed or not, does
        not count as a decode step for the forced minimum LS chunk."""
        if chunks:
            self.decoded_last_step = False
        extra = 0.0
        for r, c in chunks:
            r.prefilled += c
            if r.prefilled >= r.target:
                extra += self._finish_prefill(r, self.t)
        self._advance(extra)

    def _after_decode(self, rows: list[_Req], seconds: float, be_chunk: bool = False) -> None:
        if any(r.cls == "ls" for r in rows) and (be_chunk or any(r.cls == "be" for r in rows)):
            self.stats.longest_ls_decode_s = max(self.stats.longest_ls_decode_s, seconds)
        self.step += 1
        self.stats.steps += 1
        self.decoded_last_step = True
        self.new_token_ratio = max(self.new_token_ratio - (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO)
                                   / NEW_TOKEN_RATIO_DECAY_STEPS, MIN_NEW_TOKEN_RATIO)
        for r in rows:
            r.last_run_step = self.step
            self._emit(r, self.t)

    def _observe(self, shape: StepShape, seconds: float) -> None:
        acc = self.stats.step_s.setdefault(step_kind(shape), [0, 0.0])
        acc[0] += 1
        acc[1] += seconds
        if self.cfg.system in CONTROLLED:
            self.model.observe(shape, seconds)

    def _decode_kv(self, rows: list[_Req], victims: Callable[[], list[_Req]]) -> list[_Req]:
        """Frees GPU KV for one token per GPU row by retracting ``victims()`` (first = first to go),
        as SGLang's ``check_decode_mem``/``retract_decode``; returns the rows left."""
        rows = list(rows)
        while self.gpu_free < len(rows) and rows:
            v = victims()[0]
            self._retract(v)
            rows = [r for r in rows if r is not v]
        return rows

    # SGLang's scheduler (the baselines) --------------------------------------------------------
    def _queue(self) -> list[_Req]:
        if self.cfg.system == "priority":
            return sorted(self.waiting, key=lambda r: (r.cls != "ls", r.arrival))
        if self.cfg.system == "omniserve-nocontrol":  # the server's admission round (sglang_glue.scheduler)
            return admission_round(self.waiting, lambda r: r.cls == "be",
                                   lambda r: r.target + r.output_len if r.cls == "be" and not r.prefilled else None,
                                   max(n.pool_free for n in self.nodes))[0]
        return self.waiting

    def _output_reserve(self, r: _Req) -> int:
        """KV slots SGLang's PrefillAdder sets aside for ``r``'s output when it admits it: all of
        what is left (``add_one_req``); under ``--omniserve`` a BE request counts only the token its
        prefill samples (it leaves the GPU after its prefill: sglang_glue.scheduler)."""
        return 1 if self.cfg.system == "omniserve-nocontrol" and r.cls == "be" else r.output_len - r.generated

    def _reserved(self) -> float:
        """GPU KV slots SGLang's PrefillAdder keeps for the running requests' future tokens
        (``_get_running_request_total_token_offset``: the new-token ratio of what is left, all of
        it for ``ignore_eos`` requests)."""
        ratio = 1.0 if self.cfg.ignore_eos else self.new_token_ratio
        return sum((r.output_len - r.generated) * ratio for r in self.running if r.placement != CPU)

    def _step_sglang(self) -> bool:
        batch, budget = [], self.cfg.chunk_tokens
        free = self.gpu_free - self._reserved()
        for r in list(self._queue()):
            if budget <= 0 or len(self.running) + len(batch) >= self.cfg.max_running and r.prefilled == 0:
                break
            need = r.target - r.prefilled
            if r.prefilled == 0:
                want = need + self._output_reserve(r)
                if want > free and self.cfg.system == "priority" and r.cls == "ls" and self.cfg.priority_preemption:
                    while want > free and (be := [x for x in self.running if x.cls == "be" and x.placement != CPU]):
                        self._retract(be[-1])
                        free = self.gpu_free - self._reserved()
                if want > free:
                    break
                free -= want
            chunk = min(need, budget)
            batch.append((r, chunk))
            r.gpu_kv += chunk
            self.gpu_free -= chunk
            budget -= chunk
        if batch:
            self._prefill(batch)
            return True
        decoding = [r for r in self.running if r.prefilled >= r.target]
        if not decoding:
            return False
        prio = self.cfg.system == "priority"

        def victims() -> list[_Req]:  # newest first; BE before LS under priority
            gpu = [r for r in self.running if r.placement != CPU]
            return sorted(gpu, key=lambda r: ((r.cls == "ls") if prio else 0, -r.arrival))
        gpu_rows = self._decode_kv([r for r in decoding if r.placement != CPU], victims)
        cpu_rows = [r for r in decoding if r.placement == CPU]
        self._decode(gpu_rows, cpu_rows)
        return True

    # the controller (omniserve) ----------------------------------------------------------------
    @staticmethod
    def _cached(r: _Req, key: tuple, make: Callable[[], object]):
        """``r``'s view object for ``key``, made again only when ``key`` changed (most BE requests
        neither ran nor moved in a step: rebuilding them every step was most of a step's cost)."""
        if r.view_key != key:
            r.view_key, r.view_obj = key, make()
        return r.view_obj

    def _view(self) -> ServerView:
        slo = self.cfg.slo
        ls_decodes, be, last = [], [], []
        tpot = slo.tpot_s
        for r in self.running:
            if r.prefilled < r.target:
                continue
            times = r.token_times
            if r.cls == "be":  # the hot loop: the cache check inlined (see _cached)
                key = (r.placement, r.prompt_len + r.generated, r.last_run_step)
                if r.view_key != key:
                    r.view_key, r.view_obj = key, BERequest(r.rid, r.placement, context_len=key[1],
                                                            last_run_step=r.last_run_step)
                be.append(r.view_obj)
            elif times:
                done = len(times) - 1
                if r.view_key != done:  # a new token since the last view (not so in a prefill step)
                    r.view_key, r.view_obj = done, LSDecode(r.rid, r.prompt_len + r.generated, None,
                                                            tpot * done - (times[-1] - times[0]),
                                                            self.lengths.likely_left(r.generated), done)
                ls_decodes.append(r.view_obj)
                last.append(times[-1])
        # The requests mid-prefill first (SGLang's ``chunked_req``), then the queue. Of the queued
        # BE requests the controller reads only the first (BE prompts are prefilled one at a time,
        # in queue order): the rest of a long backlog stays out of the view.
        mid, queued, fresh_be = [], [], None
        for r in self.waiting:
            if r.prefilled:
                mid.append(r)
            elif r.cls != "be":
                queued.append(r)
            elif fresh_be is None:
                fresh_be = r
        ls_waiting, be_waiting = [], []
        for r in mid + queued + ([fresh_be] if fresh_be else []):
            key = (WAITING, r.target, r.prefilled)
            if r.cls == "be":
                be_waiting.append(self._cached(r, key, lambda r=r: BERequest(
                    r.rid, WAITING, prompt_len=r.target, prefilled=r.prefilled, in_prefill=r.prefilled > 0)))
            else:
                ls_waiting.append(self._cached(r, key, lambda r=r: LSWaiting(
                    r.rid, r.target, r.arrival, prefilled=r.prefilled)))
        return ServerView(
            now_s=self.t, step=self.step, slo=slo, ls_decodes=tuple(ls_decodes), ls_waiting=tuple(ls_waiting),
            be=tuple(be + be_waiting), gpu_kv_free_tokens=self.gpu_free, gpu_kv_reserved_tokens=math.ceil(self._reserved()),
            be_pool_free_tokens=max(n.pool_free for n in self.nodes),
            kv_bytes_per_token=self.kv_bytes, num_layers=self.L, max_prefill_tokens=self.cfg.chunk_tokens,
            since_decode_s=self.t - min(last) if last else 0.0, decoded_last_step=self.decoded_last_step,
            cpu_overlap=self.async_cpu, mixed_steps=True)

    def _step_controlled(self) -> bool:
        view = self._view()
        plan = self.controller.plan(view)
        by_id = {r.rid: r for r in self.running + self.waiting}
        for rid, why in plan.ls_rejected:
            r = by_id[rid]
            r.error = f"rejected: {why}"
            self.waiting.remove(r)
        moved = sum(self._to_cpu(by_id[rid]) for rid in plan.to_cpu)
        moved += sum(self._to_gpu(by_id[rid]) for rid in plan.to_gpu)
        self._advance(moved)
        if plan.is_prefill:
            batch = []
            # A new request is admitted only when its whole prompt fits the free GPU KV (SGLang's
            # PrefillAdder); one already mid-prefill goes on.
            free = self.gpu_free
            if plan.ls_prefill_tokens:
                budget = plan.ls_prefill_tokens
                for r in sorted((w for w in self.waiting if w.cls == "ls"), key=lambda r: r.prefilled == 0):
                    chunk = min(r.target - r.prefilled, budget)
                    if budget <= 0 or (r.target if r.prefilled == 0 else chunk) > free:
                        break
                    batch.append((r, chunk))
                    budget -= chunk
                    free -= r.target - r.prefilled
            else:
                r = by_id[plan.be_prefill[0]]
                if (r.target if r.prefilled == 0 else plan.be_prefill[1]) <= free:
                    batch.append((r, plan.be_prefill[1]))
            for r, c in batch:
                r.gpu_kv += c
                self.gpu_free -= c
            if batch and plan.mixed:
                # The decode rows ride the chunk's step when the KV left fits their next tokens (as
                # SGLang's mixed chunked prefill: else they sit this step out).
                gpu_rows, cpu_rows = self._decode_rows(plan)
                if len(gpu_rows) <= self.gpu_free:
                    if self.async_cpu:
                        self._pass_async(gpu_rows, len(cpu_rows), batch)
                    else:
                        self._decode(gpu_rows, cpu_rows, batch)
                    return True
            if batch:
                self._prefill(batch)
                return True
            # Nothing admissible (SGLang would run the running batch): plan the decode step alone.
            plan = self.controller.plan(dataclasses.replace(
                view, ls_waiting=(), be=tuple(b for b in view.be if b.placement != WAITING)))
        gpu_rows, be_rows = self._decode_rows(plan)

        def victims() -> list[_Req]:
            gpu = [r for r in self.running if r.placement != CPU]
            return sorted(gpu, key=lambda r: (r.cls == "ls", -r.arrival))
        gpu_rows = self._decode_kv(gpu_rows, victims)
        if self.async_cpu:
            return self._pass_async(gpu_rows, len(be_rows)) or bool(moved)
        cpu_rows = be_rows
        if not (gpu_rows or cpu_rows):
            return bool(moved)
        self._decode(gpu_rows, cpu_rows)
        return True

    def _decode_rows(self, plan) -> tuple[list[_Req], list[_Req]]:
        """The rows of ``plan``'s decode: every decoding LS request and the planned BE rows on the
        GPU, and the planned BE rows on the CPU (whose KV is not still on the wire)."""
        chosen = set(plan.be_decode)
        gpu, cpu = [], []
        for r in self.running:
            if r.cls == "ls":
                if r.prefilled >= r.target:
                    gpu.append(r)
            elif r.rid in chosen and (r.ready_at <= self.t or (self.async_cpu and r.placement == CPU)):
                (cpu if r.placement == CPU else gpu).append(r)
        return gpu, cpu

    def _pass_async(self, gpu_rows: list[_Req], budget: int, chunks: list[tuple[_Req, int]] = ()) -> bool:
        """One decode pass with asynchronous piggybacking (see :meth:`_piggyback`): the GPU rows
        decode, and up to ``budget`` offloaded BE rows join at each layer boundary. With no GPU rows
        the pass waits at each boundary for the first result due there (BE speed is then the CPU's).
        With ``chunks`` (``(request, chunk)``, KV allocated by the caller) a mixed pass that
        prefills them too."""
        if not chunks and not gpu_rows and (budget == 0 or not self._cpu_rows()):
            return False
        base = StepShape(tokens=len(gpu_rows) + sum(c for _, c in chunks),
                         prefill_attn_work=sum(c * (r.prefilled + c) for r, c in chunks),
                         prefill_context=sum(r.prefilled + c for r, c in chunks),
                         decode_context=sum(r.context for r in gpu_rows), decode_rows=len(gpu_rows))
        joined, sampled, stall = self._piggyback(base, budget, wait=not (gpu_rows or chunks))
        if not (gpu_rows or chunks) and joined == 0:
            return False
        for r in gpu_rows:
            r.gpu_kv += 1
            self.gpu_free -= 1
        shape = dataclasses.replace(base, tokens=base.tokens + math.ceil(joined / (self.L + 1)),
                                    decode_rows=base.decode_rows + len(sampled))
        seconds = self._measured(self.timing.gpu_step_s(shape))
        self._observe(shape, seconds)
        self._advance(seconds)
        self._advance(stall, busy=False)
        self._after_decode(gpu_rows + sampled, seconds + stall, be_chunk=any(r.cls == "be" for r, _ in chunks))
        self._finish_chunks(chunks)
        return True

    def _cpu_rows(self) -> list[_Req]:
        return [r for r in self.running if r.placement == CPU and r.cls == "be" and r.prefilled >= r.target]

    def _piggyback(self, base: StepShape, budget: int, wait: bool = False) -> tuple[int, list[_Req], float]:
        """The offloaded BE rows' side of a pass of ``base`` starting now, as the piggybacking
        executor (``omniserve_sgl/piggyback/executor.py``) runs it: at each layer boundary ``s``
        (0: embedding and layer 0's QKV; ``L``: the last layer's MLP, the LM head and sampling) up
        to ``budget`` rows whose attention is back join, and every joined row's layer-``s`` job goes
        to its CPU node after the boundary's dense work. The pass then runs layer ``s``'s LS
        attention and reaches boundary ``s+1``: a result back by then joins this pass, a later one
        waits for the next pass (paper section 3.2). With ``wait`` (no GPU rows), the pass waits at
        a boundary for the first result due there. Returns the row-boundaries joined, the rows
        sampled (their token is out at the pass's end) and the time spent waiting, s."""
        L, rows = self.L, self._cpu_rows()
        if not rows:
            return 0, [], 0.0
        est = self.timing.gpu_step_s(dataclasses.replace(base, tokens=base.tokens + budget))
        spacing = est / (L + 1)
        # The window a job has to join the same pass: one layer of the pass's LS decode attention.
        window = min(spacing, (self.timing.gpu_step_s(base) - self.timing.gpu_step_s(
            dataclasses.replace(base, decode_context=0))) / L) if base.tokens else 0.0
        at, stall = self.t, 0.0
        stages: dict[int, list[_Req]] = {}
        for r in rows:
            stages.setdefault(r.stage, []).append(r)
        joined, sampled = 0, []
        for s in range(L + 1):
            here = stages.pop(s, [])
            if wait and here and (first := min(r.ready_at for r in here)) > at:
                stall += first - at
                at = first
            go = sorted((r for r in here if r.ready_at <= at), key=lambda r: (r.ready_at, r.rid))[:budget]
            joined += len(go)  # the rest stay at this boundary for a later pass
            if s == L:
                sampled = go
                break
            for i, node in enumerate(self.nodes):
                if mine := [r for r in go if r.node == i]:
                    back = node.run(at + spacing - window,
                                    self.timing.cpu_job_s(sum(r.context for r in mine) * self.kv_bytes / L),
                                    len(mine) * self.timing.qo_bytes_per_row_layer)
                    for r in mine:
                        r.stage, r.ready_at = s + 1, back
                        stages.setdefault(s + 1, []).append(r)
            at += spacing
        for r in sampled:
            r.stage, r.ready_at = 0, self.t + stall + est
            self.nodes[r.node].pool_free -= 1
        return joined, sampled, stall


def simulate(cfg: SimConfig, ls: list[SimRequest], duration_s: float, **be) -> tuple[list[RequestRecord], SimStats]:
    """Runs one :class:`Simulation`; returns its request records (as ``benchmarks/coserve.py``'s
    client records them: times in s from the start) and its :class:`SimStats`."""
    sim = Simulation(cfg, ls, duration_s, **be)
    return sim.run(), sim.stats
