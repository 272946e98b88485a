"""The soak's request mix and its verdicts, without a server (``omniserve_sgl.bench.soak``)."""

from __future__ import annotations

import dataclasses

import pytest

from omniserve_sgl.bench.soak import APIS, MALFORMED, Outcome, SoakSpec, _check, plan, request_of
from omniserve_sgl.service_class import class_of_custom_params, parse_service_class


def test_plan_is_reproducible_and_has_the_asked_mix():
    spec = SoakSpec(num_requests=2000, seed=7)
    reqs = plan(spec, ["a", "b"])
    again = plan(spec, ["a", "b"])
    assert [dataclasses.replace(r, rid="") for r in reqs] == [dataclasses.replace(r, rid="") for r in again]
    assert len({r.rid for r in reqs + again}) == 2 * len(reqs)  # request ids are never reused
    n = len(reqs)
    assert abs(sum(r.malformed is not None for r in reqs) / n - spec.malformed_fraction) < 0.02
    assert abs(sum(r.abort is not None for r in reqs) / n - spec.abort_fraction) < 0.02
    well = [r for r in reqs if r.malformed is None]
    assert abs(sum(r.service_class == "be" for r in well) / len(well) - spec.be_fraction) < 0.05
    assert {r.api for r in reqs} == set(APIS) and {r.stream for r in reqs} == {True, False}
    assert {r.malformed for r in reqs} - {None} == set(MALFORMED)
    assert all(r.marker != "none" for r in reqs if r.service_class == "be")  # unmarked means LS
    assert all(spec.max_new_tokens[0] <= r.max_new_tokens <= spec.max_new_tokens[1] for r in reqs)


@pytest.mark.parametrize("bad", [SoakSpec(be_fraction=1.5), SoakSpec(abort_fraction=-0.1)])
def test_plan_refuses_fractions_outside_0_1(bad):
    with pytest.raises(ValueError, match="must be in"):
        plan(bad, ["a"])
    with pytest.raises(ValueError, match="at least one prompt"):
        plan(SoakSpec(), [])


def _class_sent(route, body, headers) -> str:
    """The class the server reads: the header and the body are both parsed; the body wins."""
    custom = body["sampling_params"].get("custom_params") if route == "/generate" else body.get("custom_params")
    if not isinstance(custom, dict | None):
        raise ValueError("custom_params is not an object")  # noqa: TRY004 - what the server raises
    header = parse_service_class(headers["x-omniserve-class"]) if "x-omniserve-class" in headers else None
    return class_of_custom_params(custom) if custom and "omniserve_class" in custom else header or "ls"


def test_well_formed_requests_carry_their_class_and_ask_for_every_token():
    for r in plan(SoakSpec(num_requests=300, malformed_fraction=0.0), ["hello"]):
        route, body, headers = request_of(r)
        assert _class_sent(route, body, headers) == r.service_class
        assert body["stream"] == r.stream and body["rid"] == r.rid
        if route == "/generate":
            assert body["sampling_params"]["max_new_tokens"] == r.max_new_tokens
            assert body["sampling_params"]["ignore_eos"] is True
        else:
            assert body["max_tokens"] == r.max_new_tokens and body["ignore_eos"] is True
            assert ("messages" in body) == (route == "/v1/chat/completions")


def test_malformed_requests_are_refused_by_omniserves_own_parser():
    for r in plan(SoakSpec(num_requests=400, malformed_fraction=1.0), ["hello"]):
        route, body, headers = request_of(r)
        with pytest.raises(ValueError):
            _class_sent(route, body, headers)


def test_verdicts():
    r = plan(SoakSpec(num_requests=1, malformed_fraction=0.0, abort_fraction=0.0), ["x"])[0]
    full = Outcome(status=200, completion_tokens=r.max_new_tokens, finish_reason="length")
    assert _check(r, full) is None
    assert "want" in _check(r, Outcome(status=200, completion_tokens=r.max_new_tokens - 1, finish_reason="length"))
    assert "want" in _check(r, Outcome(status=503, error="worker gone"))
    assert _check(r, Outcome(status=0, error="disconnected", abort_fired=True)) is None
    bad = plan(SoakSpec(num_requests=1, malformed_fraction=1.0), ["x"])[0]
    field = MALFORMED[bad.malformed]
    assert _check(bad, Outcome(status=400, error=f"bad {field}")) is None
    assert "4xx" in _check(bad, Outcome(status=200, error=f"bad {field}"))
    assert "4xx" in _check(bad, Outcome(status=400, error="something else"))
