"""The scheduler's two modes under ``--omniserve``, so the flag costs LS traffic nothing while no BE
request is in the server.

- **LS mode** (no BE request waiting, running, deferred or holding BE KV pool pages): SGLang runs
  as without ``--omniserve``: its overlap schedule (``Scheduler.event_loop_overlap``, step N+1 is
  launched before step N's results are processed), CUDA graphs on a GPU, and every omniserve
  scheduler hook passes straight through (:func:`be_mode` is False).
- **BE mode**: SGLang's synchronous loop (``Scheduler.event_loop_normal``) with the BE path on.
  The BE path decides each step from the previous step's results: a BE request's KV moves to the
  BE KV pool once its prefill's result is processed, the controller plans from the state after the
  last step and times each step against the latency model, and BE rows that sat out a step rejoin
  after its results. In the overlap loop, step N+1 is built before step N's results exist, so
  these would act one step late on batches already launched; a mode switch costs one step
  without overlap instead.

Switches happen at the top of a loop iteration, right after SGLang ingests new requests, which is
where SGLang's own runtime PD role switch leaves its loop (``disaggregation/role_switch.py``). To BE
mode: when a BE request has arrived, the result of the step in flight is processed first (the
drain). Back to LS mode: when no BE request is left and the last step was not a prefill (SGLang
merges a prefill's requests into the running batch at the next step, from ``last_batch``, which
the overlap loop must start without). Each switch is logged and counted
(``omniserve_mode_switches_total``; ``omniserve_overlap_schedule`` says which loop runs).

With the SLO controller on, a BE request that would only wait does not leave LS mode: a BE request
arriving in LS mode is **parked** (held outside SGLang's waiting queue, holding nothing) until the
controller would start its prefill (:func:`omniserve_sgl.sglang_glue.controller.be_prefill_slack`);
then every parked request goes back to the queue, in arrival order, and the scheduler switches.
In BE mode, once no BE request holds KV and the controller has given the queued ones no slack for
``PARK_AFTER_STEPS`` steps, they are parked and the scheduler goes back to LS mode. So LS traffic
with no slack to spare (overload) keeps SGLang's overlap schedule while BE work queues. An abort
reaches a parked request through SGLang's own queue path (:func:`abort_request`).

A server started with ``--disable-overlap-schedule`` runs SGLang's synchronous loop throughout and
only turns the BE path on and off; with ``--omniserve-ls-admission reject`` the controller plans
every step, so the BE path is always on (the command line turns the overlap schedule off).
"""

from __future__ import annotations

import itertools
import logging

from omniserve_sgl.sglang_glue.placement import is_be

logger = logging.getLogger(__name__)

_be = False  # the BE path is on
_pinned = False  # the BE path stays on (reject admission: the controller plans every step)
_arrived = False  # a BE request arrived since the last check
_overlap_configured = False  # SGLang runs its overlap loop (no --disable-overlap-schedule): run_loops
_metrics = None  # BEMetrics with --enable-metrics
_parked: list = []  # BE Reqs waiting in LS mode for slack, outside SGLang's queue, in arrival order
PARK_AFTER_STEPS = 8  # BE-mode steps with no slack for the queued BE requests before they are parked


class _Switch(Exception):
    """Leaves the running event loop at the top of an iteration (caught by :func:`run_loops`)."""


def be_mode() -> bool:
    """Whether the BE path is on: the omniserve scheduler hooks do their work only then."""
    return _be


def start(pinned: bool, metrics=None) -> None:
    """Sets the starting mode: LS mode, or BE mode for good when ``pinned``."""
    global _be, _pinned, _metrics
    _be = _pinned = pinned
    _metrics = metrics
    _parked.clear()
    if metrics is not None:
        for to in ("be", "ls"):
            metrics.mode_switches.labels(to=to).inc(0)


def note_be_arrival() -> None:
    """A BE request was just created (``Scheduler._create_generation_req``): BE mode from the next
    loop iteration on."""
    global _arrived
    _arrived = True


def parked() -> list:
    """The BE requests parked in LS mode (see the module docstring), in arrival order."""
    return _parked


def be_active(scheduler, runtime, deferred) -> bool:
    """Whether a BE request is past SGLang's waiting queue (waiting for its grammar, being
    prefilled in chunks, running, sitting out a step: ``deferred``, or holding BE KV pool pages),
    or queued with its answer decided (refused: SGLang sends it from a one-token prefill)."""
    if runtime is not None and runtime.pages.num_seqs:
        return True
    chunked = [scheduler.chunked_req] if scheduler.chunked_req is not None else []
    grammar = getattr(getattr(scheduler, "grammar_manager", None), "grammar_queue", ())
    refused = (r for r in scheduler.waiting_queue if r.to_finish is not None)
    # A finished one stays in the running batch until SGLang filters it, its KV already released.
    return any(is_be(r) and not r.finished() for r in itertools.chain(
        deferred, chunked, scheduler.running_batch.reqs, grammar, refused))


def _queued_be(scheduler) -> list:
    """The BE requests in SGLang's waiting queue that wait to be served (not refused)."""
    return [r for r in scheduler.waiting_queue if is_be(r) and not r.finished() and r.to_finish is None]


def _park(scheduler, reqs) -> None:
    """Moves ``reqs`` (BE requests in SGLang's waiting queue, holding no KV) to the parked list."""
    ids = {id(r) for r in reqs}
    scheduler.waiting_queue[:] = [r for r in scheduler.waiting_queue if id(r) not in ids]
    _parked.extend(reqs)
    _publish_parked()


def _unpark(scheduler) -> None:
    scheduler.waiting_queue.extend(_parked)
    _parked.clear()
    _publish_parked()


def _publish_parked() -> None:
    if _metrics is not None:
        _metrics.parked.set(len(_parked))


def abort_request(original, scheduler, recv_req):
    """AROUND ``Scheduler.abort_request``: parked BE requests are in SGLang's waiting queue for the
    call, so an abort (by rid, or all) reaches them on SGLang's own path for queued requests (the
    client gets the abort, nothing was allocated); the others are parked again."""
    if not _parked:
        return original(scheduler, recv_req)
    mine = {id(r) for r in _parked}
    _unpark(scheduler)
    try:
        return original(scheduler, recv_req)
    finally:
        _park(scheduler, [r for r in scheduler.waiting_queue if id(r) in mine])


def _set_overlap(scheduler, on: bool) -> None:
    """Every copy SGLang keeps of ``enable_overlap`` (read at start-up from
    ``--disable-overlap-schedule``), as SGLang's role switch syncs its components' copies of the
    disaggregation mode (``Scheduler._sync_disaggregation_mode_to_subcomponents``)."""
    scheduler.enable_overlap = on
    scheduler.enable_skip_finishing_decode = on
    object.__setattr__(scheduler.batch_result_processor, "enable_overlap", on)  # a frozen dataclass
    if hasattr(scheduler.tp_worker, "enable_overlap"):
        scheduler.tp_worker.enable_overlap = on
    scheduler.running_batch.enable_overlap = on


def _switched(to_be: bool, why: str) -> None:
    global _be
    _be = to_be
    logger.info("omniserve: %s", why)
    if not to_be:
        from omniserve_sgl.sglang_glue import scheduler as glue

        glue.publish_no_be()
    if _metrics is not None:
        _metrics.mode_switches.labels(to="be" if to_be else "ls").inc()


def check_switch(_result, scheduler, *args, **kwargs) -> None:
    """AFTER ``Scheduler.ingest_requests`` (the top of each loop iteration): switches mode when a
    BE request has arrived in LS mode (with the controller: when a parked one has slack), or when
    none is left in BE mode (with the controller: none holds KV and the queued ones, parked now,
    had no slack); in SGLang's overlap loop by leaving it for :func:`run_loops`, else in place."""
    global _arrived
    from omniserve_sgl.sglang_glue import controller
    from omniserve_sgl.sglang_glue import scheduler as glue

    if not _be:
        if not _arrived and not _parked:
            return
        if _arrived and controller.can_park():
            _park(scheduler, _queued_be(scheduler))
        _arrived = False
        if _parked:
            # A prefill in flight: its requests join the running batch only at the next step, so
            # the controller could not see them yet.
            last = scheduler.last_batch
            if last is not None and last.forward_mode.is_extend():
                return
            if not controller.be_prefill_slack(scheduler, _parked):
                return
            _unpark(scheduler)
        if scheduler.enable_overlap:
            raise _Switch()
        _switched(True, "a BE request arrived: BE path on")
    elif not _pinned:
        last = scheduler.last_batch
        if last is not None and last.forward_mode.is_extend():
            return
        if be_active(scheduler, glue.runtime(), controller.deferred()):
            return
        if queued := _queued_be(scheduler):
            if not controller.can_park() or controller.steps_without_be_work() < PARK_AFTER_STEPS:
                return
            _park(scheduler, queued)
            why = f"{len(queued)} BE request(s) wait for slack, parked: BE path off"
        else:
            why = "no BE request left: BE path off"
        controller.release_yielded(scheduler, everything=True)
        if _overlap_configured:
            raise _Switch(why)
        _switched(False, why)
    _arrived = False


def _drain(scheduler) -> None:
    """Processes the results of the steps the overlap loop has launched and not yet processed
    (SGLang's ``pop_and_process``), in order."""
    while scheduler.result_queue:
        batch, result = scheduler.result_queue.popleft()
        scheduler.process_batch_result(batch, result)


def _publish_loop(overlap: bool) -> None:
    if _metrics is not None:
        _metrics.overlap_schedule.set(1 if overlap else 0)


def run_loops(original, scheduler) -> None:
    """AROUND ``Scheduler.event_loop_overlap`` (SGLang runs it unless ``--disable-overlap-schedule``):
    SGLang's overlap loop in LS mode, its synchronous loop in BE mode, and the switches between them
    (see the module docstring). Returns when SGLang's loop does (shutdown)."""
    global _overlap_configured
    _overlap_configured = True
    while True:
        try:
            _publish_loop(not _be)
            if _be:
                return scheduler.event_loop_normal()
            return original(scheduler)
        except _Switch as switch:
            if not _be:
                _drain(scheduler)
                _set_overlap(scheduler, False)
                _switched(True, "a BE request arrived: BE path on, SGLang's synchronous loop")
            else:
                scheduler.last_batch = None  # a decode step (or none): its requests are the running batch
                _set_overlap(scheduler, True)
                _switched(False, f"{switch.args[0]}, SGLang's overlap loop")
