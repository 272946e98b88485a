"""The SGLang glue's logic without a server: BE admission rounds, row selection, the hooks that
reorder or filter rows, the tokenizer's class marking on SGLang's own request object, and the
command line on SGLang's own parser."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import types

import pytest
import torch

from omniserve_sgl import config
from omniserve_sgl.admission import admission_round
from omniserve_sgl.service_class import class_of_custom_params, parse_service_class, slos_of_custom_params


@dataclasses.dataclass(frozen=True)
class Req:
    name: str
    be: bool = False
    pages: int | None = None  # pool pages still to reserve


def _round(queue, free):
    offered, held = admission_round(queue, lambda r: r.be, lambda r: r.pages, free)
    return [r.name for r in offered], [r.name for r in held]


def test_admission_puts_ls_first_and_offers_one_new_be_request_per_round():
    q = [Req("b1", True, 2), Req("l1"), Req("b2", True, 1), Req("l2")]
    assert _round(q, free=10) == (["l1", "l2", "b1"], ["b2"])


def test_admission_holds_be_requests_that_do_not_fit_without_blocking_later_ones():
    q = [Req("big", True, 8), Req("small", True, 3), Req("l1")]
    assert _round(q, free=5) == (["l1", "small"], ["big"])
    assert _round(q, free=2) == (["l1"], ["big", "small"])


def test_admission_offers_be_requests_that_need_no_pages_beside_the_new_one():
    q = [Req("reserved", True, None), Req("new", True, 1), Req("next", True, 1)]
    assert _round(q, free=1) == (["reserved", "new"], ["next"])
    assert _round([], free=0) == ([], [])


def test_select_rows_keeps_the_rows_in_the_asked_order_and_shares_the_rest():
    from omniserve_sgl.sglang_glue.rows import select_rows

    batch = types.SimpleNamespace(seq_lens=torch.tensor([5, 6, 7, 8]), rids=["a", "b", "c", "d"],
                                  scalar=torch.tensor(3), absent=None, config=object())
    view = select_rows(batch, [3, 1], ("seq_lens", "scalar", "absent", "missing"), ("rids",))
    assert view.seq_lens.tolist() == [8, 6] and view.rids == ["d", "b"]
    assert view.scalar is batch.scalar and view.absent is None and view.config is batch.config
    assert batch.seq_lens.tolist() == [5, 6, 7, 8] and batch.rids == ["a", "b", "c", "d"]


def _reqs(*offloaded):
    return [types.SimpleNamespace(rid=i, omniserve_be=o, omniserve_offloaded=o) for i, o in enumerate(offloaded)]


@pytest.fixture
def be_mode():
    """The scheduler hooks with the BE path on (a BE request is in the server)."""
    from omniserve_sgl.sglang_glue import mode

    mode.start(pinned=True)
    yield
    mode.start(pinned=False)


def test_in_ls_mode_the_hooks_pass_sglangs_own_answers_through():
    from omniserve_sgl.sglang_glue import mode, scheduler

    assert not mode.be_mode()
    reqs = _reqs(False, True, False, True)
    assert scheduler.retraction_order(lambda rs: [2, 3, 0, 1], reqs) == [2, 3, 0, 1]
    seen = []
    scheduler.decode_tokens_needed(lambda self, rows: seen.append(rows), types.SimpleNamespace(reqs=reqs), None)
    assert seen == [None]


def _sched(queue=(), running=(), last_extend=False, overlap=True):
    last = types.SimpleNamespace(forward_mode=types.SimpleNamespace(is_extend=lambda: last_extend))
    return types.SimpleNamespace(waiting_queue=list(queue), chunked_req=None, last_batch=last,
                                 running_batch=types.SimpleNamespace(reqs=list(running)), enable_overlap=overlap)


def test_mode_switches_at_the_loop_top_on_a_be_arrival_and_back_once_none_is_left():
    from omniserve_sgl.sglang_glue import mode

    mode.start(pinned=False)
    be, ls = (types.SimpleNamespace(omniserve_be=c, finished=lambda: False, to_finish=None) for c in (True, False))
    done = types.SimpleNamespace(omniserve_be=True, finished=lambda: True, to_finish=None)
    try:
        mode.check_switch(None, _sched(queue=[ls]))
        assert not mode.be_mode()  # LS traffic alone: nothing happens
        mode.note_be_arrival()
        with pytest.raises(mode._Switch):  # SGLang's overlap loop is left (run_loops drains it)
            mode.check_switch(None, _sched(queue=[be, ls]))
        mode.note_be_arrival()
        mode.check_switch(None, _sched(queue=[be], overlap=False))  # the synchronous loop: in place
        assert mode.be_mode()
        mode.check_switch(None, _sched(running=[be, ls], overlap=False))
        mode.check_switch(None, _sched(running=[ls], last_extend=True, overlap=False))
        assert mode.be_mode()  # a BE request runs, or the last step was a prefill: stay
        mode.check_switch(None, _sched(running=[ls, done], overlap=False))  # finished, not yet filtered out
        assert not mode.be_mode()
    finally:
        mode.start(pinned=False)


def test_be_requests_without_slack_wait_parked_in_ls_mode_and_aborts_reach_them(monkeypatch):
    """With a controller, a BE request that has no slack is parked outside SGLang's queue and the
    overlap loop goes on; once the controller would prefill it, it is queued again and the
    scheduler switches; in BE mode, queued BE requests with no slack for PARK_AFTER_STEPS plans are
    parked again and the scheduler goes back to LS mode. No decision while a prefill is in flight
    (its requests are in neither the queue nor the running batch). An abort finds a parked request
    in the queue on SGLang's path; the others stay parked."""
    from omniserve_sgl.sglang_glue import controller, mode

    slack, idle = [False], [0]
    monkeypatch.setattr(controller, "can_park", lambda: True)
    monkeypatch.setattr(controller, "be_prefill_slack", lambda scheduler, parked: slack[0])
    monkeypatch.setattr(controller, "steps_without_be_work", lambda: idle[0])
    be, be2, ls, refused = (types.SimpleNamespace(rid=r, omniserve_be=c, finished=lambda: False, to_finish=t)
                            for r, c, t in (("b", True, None), ("b2", True, None), ("l", False, None),
                                            ("r", True, "abort")))
    mode.start(pinned=False)
    try:
        sched = _sched(queue=[ls, be, refused])
        mode.note_be_arrival()
        mode.check_switch(None, sched)  # no slack: parked, the overlap loop goes on
        # (a refused one stays: SGLang answers it from a one-token prefill)
        assert not mode.be_mode() and sched.waiting_queue == [ls, refused] and mode.parked() == [be]
        sched.waiting_queue.remove(refused)
        mode.check_switch(None, sched)
        assert mode.parked() == [be]
        slack[0] = True
        sched.last_batch.forward_mode.is_extend = lambda: True
        mode.check_switch(None, sched)  # a prefill in flight: its requests are not in the view yet
        assert mode.parked() == [be]
        sched.last_batch.forward_mode.is_extend = lambda: False
        with pytest.raises(mode._Switch):  # slack: queued again, the overlap loop is left
            mode.check_switch(None, sched)
        assert sched.waiting_queue == [ls, be] and mode.parked() == []
        mode._switched(True, "test")  # as run_loops does
        sched = _sched(queue=[be, be2], overlap=False)
        mode.check_switch(None, sched)
        assert mode.be_mode() and sched.waiting_queue == [be, be2]  # fewer idle plans than PARK_AFTER_STEPS
        idle[0] = mode.PARK_AFTER_STEPS
        mode.check_switch(None, sched)
        assert not mode.be_mode() and sched.waiting_queue == [] and mode.parked() == [be, be2]

        seen = []

        def sglang_abort(scheduler, recv_req):  # SGLang's queue path: drops the matching rid
            seen.append([r.rid for r in scheduler.waiting_queue])
            scheduler.waiting_queue[:] = [r for r in scheduler.waiting_queue if r.rid != recv_req.rid]

        sched.waiting_queue.append(ls)
        mode.abort_request(sglang_abort, sched, types.SimpleNamespace(rid="b"))
        assert seen == [["l", "b", "b2"]] and sched.waiting_queue == [ls] and mode.parked() == [be2]
    finally:
        mode.start(pinned=False)


def test_retraction_keeps_offloaded_be_requests_and_takes_ls_ones_in_sglangs_order(be_mode):
    from omniserve_sgl.sglang_glue import scheduler

    reqs = _reqs(False, True, False, True)
    order = scheduler.retraction_order(lambda rs: [2, 3, 0, 1], reqs)
    assert order == [3, 1, 2, 0]  # SGLang retracts from the end: LS 0 first, then LS 2


def test_retraction_takes_be_requests_decoding_on_the_gpu_before_any_ls_request(be_mode):
    """In a served run (async mode, 4K-token GPU KV) SGLang ran out of decode slots and retracted
    by its own order, LS and GPU-resident BE requests alike; BE requests give their slots up first."""
    from omniserve_sgl.sglang_glue import scheduler

    reqs = _reqs(False, True, False, False, False)
    reqs[3].omniserve_be = reqs[4].omniserve_be = True  # decoding in the GPU KV cache
    order = scheduler.retraction_order(lambda rs: [4, 0, 3, 1, 2], reqs)
    assert order == [1, 0, 2, 4, 3]  # from the end: BE 3, BE 4, then LS 2, LS 0; offloaded BE 1 kept


def test_next_decode_step_counts_gpu_kv_for_ls_rows_only(be_mode):
    from omniserve_sgl.sglang_glue import scheduler

    batch = types.SimpleNamespace(reqs=_reqs(True, False, True, False))
    seen = []
    scheduler.decode_tokens_needed(lambda self, rows: seen.append(rows) or len(rows), batch)
    scheduler.decode_tokens_needed(lambda self, rows: seen.append(rows) or len(rows), batch, [0, 1, 2])
    assert seen == [[1, 3], [1]]


def test_a_batch_of_offloaded_be_requests_only_retracts_nothing(be_mode):
    from omniserve_sgl.sglang_glue import scheduler

    def sglang_retract(self):
        raise AssertionError("SGLang's retraction must not run")

    reqs = _reqs(True, True)
    for r in reqs:
        r.output_ids, r.origin_input_ids = [1, 2], [3]
        r.sampling_params = types.SimpleNamespace(max_new_tokens=8)
    retracted, _ratio, _ = scheduler.retract_decode(sglang_retract, types.SimpleNamespace(reqs=reqs))
    assert retracted == []
    mixed = types.SimpleNamespace(reqs=_reqs(True, False))
    assert scheduler.retract_decode(lambda self: "sglang", mixed) == "sglang"


@pytest.mark.parametrize("value,want", [("be", "be"), (" BE ", "be"), ("Ls", "ls")])
def test_service_class_names_are_normalised(value, want):
    assert parse_service_class(value) == want
    assert class_of_custom_params({"omniserve_class": value}) == want


@pytest.mark.parametrize("value,shown", [
    ("gold", "'gold'"), ("", "''"), ("  ", "'  '"), ("bé", "'bé'"), ("NaN", "'NaN'"),
    (None, "null (a JSON null, not a string)"), (1, "1 (a JSON number"), (-1, "-1 (a JSON number"),
    (float("nan"), "NaN (a JSON number"), (True, "true (a JSON boolean"), (["be"], '["be"] (a JSON array'),
    ({"class": "be"}, '{"class": "be"} (a JSON object'),
    ("b" * 100_000, "'" + "b" * 39 + "... (100002 characters)"),
])
def test_unknown_service_classes_name_the_allowed_ones(value, shown):
    with pytest.raises(ValueError) as err:
        class_of_custom_params({"omniserve_class": value})
    msg = str(err.value)
    assert msg.startswith(f"unknown omniserve_class {shown}") and "use one of ls, be" in msg
    assert len(msg) < 200  # a huge value is cut, not echoed
    assert class_of_custom_params({"other": 1}) == class_of_custom_params(None) == "ls"


def test_request_slos_are_positive_numbers_on_ls_requests_only():
    assert slos_of_custom_params({"omniserve_ttft_slo": 1, "omniserve_tpot_slo": 0.05}) == (1.0, 0.05)
    assert slos_of_custom_params({"omniserve_tpot_slo": 0.3, "omniserve_class": "ls"}) == (None, 0.3)
    assert slos_of_custom_params(None) == slos_of_custom_params({"omniserve_class": "be"}) == (None, None)
    for bad in (0, -1, float("nan"), float("inf"), True, "1", [1], {}):
        with pytest.raises(ValueError, match="omniserve_tpot_slo must be a positive number of seconds, got "):
            slos_of_custom_params({"omniserve_tpot_slo": bad})
    with pytest.raises(ValueError, match="a BE request has no SLO"):
        slos_of_custom_params({"omniserve_class": "be", "omniserve_ttft_slo": 2})


@pytest.fixture
def no_config(monkeypatch):
    """No omniserve config in this process's environment; whatever the test exports is undone
    (setenv records the variable's state, so the undo also removes one that was absent)."""
    monkeypatch.setenv(config.ENV_VAR, "")
    monkeypatch.delenv(config.ENV_VAR)


@pytest.fixture
def omniserve_on(no_config):
    """This process's config says --omniserve (undone afterwards)."""
    config.OmniServeConfig(enabled=True).export()


def _request(obj, header=None):
    from omniserve_sgl.sglang_glue import tokenizer

    http = types.SimpleNamespace(headers={} if header is None else {"x-omniserve-class": header})
    tokenizer.generate_request(None, obj, http)
    return obj


def test_tokenizer_marks_sglangs_request_from_body_or_header(omniserve_on):
    from sglang.srt.managers.io_struct import GenerateReqInput

    body = _request(GenerateReqInput(text="hi", sampling_params={"custom_params": {"omniserve_class": "BE"}}))
    assert body.sampling_params["custom_params"] == {"omniserve_class": "be"}
    assert body.custom_labels == {"omniserve_class": "be"}
    header = _request(GenerateReqInput(text="hi", sampling_params={"max_new_tokens": 3}), header="be")
    assert header.sampling_params == {"max_new_tokens": 3, "custom_params": {"omniserve_class": "be"}}
    wins = _request(GenerateReqInput(text="hi", sampling_params={"custom_params": {"omniserve_class": "ls"}}),
                    header="be")
    assert wins.sampling_params["custom_params"]["omniserve_class"] == "ls"
    batch = _request(GenerateReqInput(text=["a", "b"], sampling_params=[{}, {"custom_params": {"k": 1}}]),
                     header="be")
    assert [p["custom_params"] for p in batch.sampling_params] == [
        {"omniserve_class": "be"}, {"k": 1, "omniserve_class": "be"}]
    plain = _request(GenerateReqInput(text="hi", sampling_params={}))
    assert plain.sampling_params == {} and plain.custom_labels == {"omniserve_class": "ls"}


@pytest.mark.parametrize("params,header,words", [
    ({"custom_params": {"omniserve_class": "gold"}}, None, "unknown omniserve_class 'gold'"),
    ({}, "urgent", "unknown omniserve_class 'urgent'"),
    ({"custom_params": "be"}, None, "custom_params must be a JSON object, got str"),
])
def test_tokenizer_refuses_bad_markers_with_what_to_send(omniserve_on, params, header, words):
    from sglang.srt.managers.io_struct import GenerateReqInput

    with pytest.raises(ValueError, match=words):
        _request(GenerateReqInput(text="hi", sampling_params=params), header=header)


def test_tokenizer_leaves_requests_alone_without_omniserve(no_config):
    from sglang.srt.managers.io_struct import GenerateReqInput

    req = _request(GenerateReqInput(text="hi", sampling_params={"custom_params": {"omniserve_class": "gold"}}))
    assert req.sampling_params == {"custom_params": {"omniserve_class": "gold"}} and req.custom_labels is None


def _parse(argv, model_path="unused"):
    """``argv`` read by SGLang's own parser with omniserve's flags added."""
    from sglang.srt.server_args import ServerArgs

    from omniserve_sgl.sglang_glue import cli

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    cli.add_cli_args(None, parser)
    return parser.parse_args(["--model-path", str(model_path), *argv])


@pytest.mark.parametrize("argv,words", [
    (["--tp-size", "2"], "does not support tensor parallelism (--tp-size > 1)"),
    (["--dp-size", "2", "--enable-mixed-chunk"], "data parallelism / DP attention (--dp-size > 1), --enable-mixed-chunk"),
    (["--omniserve-cpu-page-size", "0"], "--omniserve-cpu-page-size must be >= 1, got 0"),
    (["--omniserve-cpu-kv-gb", "-1"], "--omniserve-cpu-kv-gb must be > 0, got -1.0"),
    (["--omniserve-cpu-threads", "0"], "--omniserve-cpu-threads must be >= 1, got 0"),
    (["--omniserve-cpu-spin-us", "nan"], "--omniserve-cpu-spin-us must be >= 0, got nan"),
    (["--omniserve-cpu-job-timeout", "0"], "--omniserve-cpu-job-timeout must be > 0 seconds, got 0.0"),
    (["--omniserve-ttft-slo", "0"], "--omniserve-ttft-slo must be a positive number of seconds, got 0.0"),
    (["--omniserve-tpot-slo", "inf"], "--omniserve-tpot-slo must be a positive number of seconds, got inf"),
    (["--omniserve-tpot-slo", "-0.1"], "--omniserve-tpot-slo must be a positive number of seconds, got -0.1"),
])
def test_unsupported_or_bad_settings_are_refused_before_sglang_builds_its_args(no_config, argv, words):
    from omniserve_sgl.sglang_glue import cli


    def sglang_from_cli_args(cls, args):
        raise AssertionError("refused configurations must not reach SGLang")

    with pytest.raises(SystemExit, match=words.replace("(", r"\(").replace(")", r"\)")):
        cli.from_cli_args(sglang_from_cli_args, None, _parse(["--omniserve", *argv]))
    assert config.ENV_VAR not in os.environ


def test_omniserve_flags_keep_sglangs_schedule_and_graphs_and_reach_the_children(no_config, monkeypatch):
    """Through SGLang's own ``ServerArgs.from_cli_args`` on the default model's config: ``--omniserve``
    leaves the overlap schedule and the CUDA graph settings as plain SGLang has them (the scheduler
    leaves the overlap loop only while BE requests are in the server), except with
    ``--omniserve-ls-admission reject``, whose controller plans every step in the synchronous loop; a
    server without ``--omniserve`` drops a config inherited from its caller's environment."""
    from sglang.srt.server_args import ServerArgs

    from omniserve_sgl.default_model import ensure_default_model
    from omniserve_sgl.sglang_glue import cli

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    sglang_from_cli_args = ServerArgs.from_cli_args.__func__
    argv = ["--device", "cpu", "--enable-metrics"]
    config.OmniServeConfig(enabled=True).export()  # stale, from the caller
    plain = cli.from_cli_args(sglang_from_cli_args, ServerArgs, _parse(argv, ensure_default_model()))
    assert not plain.disable_overlap_schedule and not config.current().enabled
    graphs = ("disable_cuda_graph", "disable_decode_cuda_graph", "disable_prefill_cuda_graph")

    omni = cli.from_cli_args(sglang_from_cli_args, ServerArgs, _parse([*argv, "--omniserve"], ensure_default_model()))
    assert not omni.disable_overlap_schedule
    assert [getattr(omni, g) for g in graphs] == [getattr(plain, g) for g in graphs]
    assert not config.current().plans_every_step

    args = _parse([*argv, "--omniserve", "--omniserve-cpu-kv-gb", "0.5", "--omniserve-cpu-page-size", "64",
                   "--omniserve-tpot-slo", "0.1", "--omniserve-ls-admission", "reject", "--omniserve-mode", "async"],
                  ensure_default_model())
    server_args = cli.from_cli_args(sglang_from_cli_args, ServerArgs, args)
    assert isinstance(server_args, ServerArgs)
    assert server_args.disable_overlap_schedule
    assert [getattr(server_args, g) for g in graphs] == [getattr(plain, g) for g in graphs]
    assert "omniserve_class" in server_args.tokenizer_metrics_allowed_custom_labels
    assert config.current() == config.OmniServeConfig(True, 0.5, page_size=64, metrics=True, tpot_slo=0.1,
                                                           ls_admission="reject", mode="async")
    assert config.current().plans_every_step


def test_mla_model_is_refused_before_loading(no_config, monkeypatch, tmp_path):
    """A DeepSeek-V2 (MLA) config with no weights at all: refused from its config alone."""
    from sglang.srt.server_args import ServerArgs

    from omniserve_sgl.default_model import ensure_default_model
    from omniserve_sgl.sglang_glue import cli

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_default_model() / f, tmp_path / f)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 49152,
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "first_k_dense_replace": 2, "kv_lora_rank": 32, "q_lora_rank": None,
        "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "max_position_embeddings": 2048}))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _parse(["--device", "cpu", "--omniserve"], tmp_path)
    with pytest.raises(SystemExit, match=r"does not support MLA models yet \(DeepseekV2ForCausalLM\)"):
        cli.from_cli_args(ServerArgs.from_cli_args.__func__, ServerArgs, args)


def test_tokens_left_counts_tokens_a_request_will_surely_or_most_likely_produce(monkeypatch):
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH
    from sglang.srt.sampling.sampling_params import SamplingParams

    from omniserve_sgl.control import OutputLengths
    from omniserve_sgl.sglang_glue import controller

    monkeypatch.setattr(controller, "_lengths", OutputLengths())

    def req(produced=2, **kw):
        return types.SimpleNamespace(sampling_params=SamplingParams(**{"max_new_tokens": 32, **kw}),
                                     output_ids=list(range(produced)))

    def left(**kw):
        return controller._tokens_left(req(**kw))

    assert left(ignore_eos=True) == 30
    assert left() == 0 and left(min_new_tokens=10) == 8
    assert left(ignore_eos=True, stop=["\n"]) == 0 and left(ignore_eos=True, stop_token_ids=[7]) == 0
    # Once enough LS requests finished at 40 tokens, a running one likely goes on too, up to its
    # max_new_tokens; aborted requests say nothing about where requests end.
    for reason, produced in ((FINISH_LENGTH(40), 40), (FINISH_ABORT("gone"), 3)):
        for _ in range(40):
            controller.ls_finished(types.SimpleNamespace(finished=lambda: True, finished_reason=reason,
                                                         output_ids=[0] * produced))
    assert len(controller._lengths) == 40
    assert left() == 30 and left(max_new_tokens=12) == 10 and left(stop=["\n"]) == 30
    assert left(produced=40) == 0


def test_step_shape_reads_sglangs_batch_for_the_latency_model():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from omniserve_sgl.control import StepShape
    from omniserve_sgl.sglang_glue.view import step_shape

    runtime = types.SimpleNamespace(kv_bytes_per_token_layer=100)
    extend = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_lens=[10, 4], prefix_lens=[0, 6], reqs=[])
    assert step_shape(extend, runtime, 3, lambda r: False) == StepShape(tokens=14, prefill_attn_work=10 * 10 + 4 * 10,
                                                                               prefill_context=10 + 10)
    reqs = [types.SimpleNamespace(seqlen=n, off=off) for n, off in ((50, False), (70, True), (30, True))]
    decode = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=reqs)
    assert step_shape(decode, runtime, 3, lambda r: r.off) == StepShape(
        tokens=3, decode_context=50, decode_rows=3, cpu_kv_bytes=100.0 * 100 * 3, cpu_jobs=3)
    ls_only = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=reqs[:1])
    assert step_shape(ls_only, runtime, 3, lambda r: r.off).cpu_jobs == 0
    # A mixed step: the prefill requests, then its decode rows as one-token extends.
    prefill = types.SimpleNamespace(seqlen=10, off=False)
    mixed = types.SimpleNamespace(forward_mode=ForwardMode.MIXED, extend_lens=[10, 1, 1, 1], prefix_lens=[0, 49, 69, 29],
                                  reqs=[prefill, *reqs], decoding_reqs=reqs)
    assert step_shape(mixed, runtime, 3, lambda r: r.off) == StepShape(
        tokens=13, prefill_attn_work=100, prefill_context=10, decode_context=50, decode_rows=3,
        cpu_kv_bytes=100.0 * 100 * 3, cpu_jobs=3)
    assert step_shape(types.SimpleNamespace(forward_mode=ForwardMode.IDLE), runtime, 3, lambda r: False) is None
