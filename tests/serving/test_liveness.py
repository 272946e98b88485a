"""BE work always progresses on a server without LS work, whatever the latency model predicts: with
a TTFT SLO of 50 ms, every prefill chunk on this machine is predicted above the controller's cap
for a BE chunk (half the TTFT SLO), so only the rule that BE prefill progresses when no LS decode is
there to protect lets BE requests through (before it, they stayed parked: 0 prefills in 150 s)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from omniserve_sgl.bench.launch import SGLangServer
from omniserve_sgl.control import LatencyModel, StepShape
from tests.serving.conftest import generate, metric

TTFT_SLO = 0.05


@pytest.fixture(scope="module")
def tight_server(model_path, latency_profile):
    with SGLangServer(model_path, "--omniserve", "--enable-metrics", "--omniserve-profile", str(latency_profile.path),
                      "--omniserve-ttft-slo", str(TTFT_SLO)) as s:
        yield s


def test_be_requests_complete_on_an_idle_server_when_no_chunk_fits_the_ttft_cap(tight_server, latency_profile):
    one_token = LatencyModel.load(latency_profile.path).predict(StepShape(tokens=1, prefill_attn_work=1, prefill_context=1))
    assert one_token > TTFT_SLO / 2  # the premise: no chunk fits the cap
    prompts = [f"Write a short poem about the number {i}." for i in range(3)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda p: generate(tight_server, p, 8, "be", timeout=240), prompts))  # ~2 s here
    assert all(len(o["output_ids"]) == 8 for o in outs)
    assert metric(tight_server, "omniserve_be_parked_requests") == 0
