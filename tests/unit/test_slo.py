"""The co-serving benchmark's metric computations on synthetic request records."""

import math

import numpy as np
import pytest

from omniserve_sgl.bench.loadgen import RequestRecord, RequestStyle, poisson_arrivals
from omniserve_sgl.bench.slo import (
    SLO,
    accuracy_from_error_buckets,
    be_tokens_per_s,
    derive_slo,
    lost,
    ls_summary,
    percentile,
    tpot,
)
from omniserve_sgl.metrics import BEMetrics


def rec(cls="ls", ttft=0.1, latency=1.0, n=10, success=True, max_new=10, token_times=()):
    return RequestRecord(cls, 0.0, max_new, prompt_len=5, success=success, output_len=n, ttft=ttft,
                         latency=latency, token_times=list(token_times))


def test_tpot_is_time_after_the_first_token_per_later_token():
    assert tpot(rec(ttft=0.1, latency=1.0, n=10)) == pytest.approx(0.1)
    assert tpot(rec(ttft=0.3, latency=0.3, n=1)) == 0.0


def test_attainment_counts_both_slos_and_failed_requests_as_misses():
    slo = SLO(ttft_s=0.5, tpot_s=0.2)
    records = [
        rec(ttft=0.1, latency=1.0),  # TPOT 0.1: meets both
        rec(ttft=0.9, latency=1.8),  # TTFT misses, TPOT 0.1 meets
        rec(ttft=0.2, latency=3.2),  # TPOT 0.333 misses
        rec(success=False, n=0, ttft=0.0, latency=0.0),  # failed: a miss of both
        rec("be", ttft=99.0, latency=999.0),  # BE records are not LS attainment
    ]
    s = ls_summary(records, slo, duration_s=10.0)
    assert s["ls_requests"] == 4
    assert s["ls_slo_attainment"] == pytest.approx(0.25)
    assert s["ttft_attainment"] == pytest.approx(0.5)
    assert s["tpot_attainment"] == pytest.approx(0.5)
    assert s["ls_goodput"] == pytest.approx(0.1)
    # Percentiles over the 3 successful LS requests only.
    assert s["ls_p50_ttft_s"] == pytest.approx(0.2)
    assert s["ls_p99_ttft_s"] == pytest.approx(percentile([0.1, 0.2, 0.9], 99))
    assert s["ls_p50_tpot_s"] == pytest.approx(0.1)
    assert s["ls_p99_tpot_s"] == pytest.approx(percentile([0.1, 0.1, 1 / 3], 99))


def test_summary_without_ls_requests_is_nan_not_an_error():
    s = ls_summary([rec("be")], SLO(1.0, 1.0), 1.0)
    assert s["ls_requests"] == 0 and math.isnan(s["ls_slo_attainment"]) and math.isnan(s["ls_p99_tpot_s"])


def test_be_throughput_counts_only_be_tokens_inside_the_window():
    records = [rec("be", token_times=[0.5, 1.0, 1.5, 2.5]), rec("be", token_times=[1.9, 2.0, 2.1]),
               rec("ls", token_times=[0.1, 0.2])]
    assert be_tokens_per_s(records, window_s=2.0) == pytest.approx(5 / 2.0)
    with pytest.raises(ValueError, match="window"):
        be_tokens_per_s(records, 0.0)


def test_lost_counts_errors_and_truncated_answers():
    assert lost([rec(), rec(n=7, max_new=10), rec(success=False, n=0)]) == 2


def test_slos_derive_from_ls_alone_medians():
    records = [rec(ttft=t, latency=t + 9 * p) for t, p in ((0.1, 0.02), (0.2, 0.03), (0.3, 0.05))]
    slo = derive_slo(records + [rec("be", ttft=5.0, latency=50.0)], ttft_factor=5.0, tpot_factor=3.0)
    assert slo.ttft_s == pytest.approx(1.0) and slo.tpot_s == pytest.approx(0.09)
    with pytest.raises(ValueError, match="LS-alone"):
        derive_slo([rec("be")], 5.0, 3.0)
    with pytest.raises(ValueError, match="> 0"):
        SLO(0.0, 1.0)


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    a = poisson_arrivals(4.0, 1000.0, seed=1)
    assert a == poisson_arrivals(4.0, 1000.0, seed=1) != poisson_arrivals(4.0, 1000.0, seed=2)
    assert a == sorted(a) and 0 < a[0] and a[-1] < 1000.0
    assert len(a) == pytest.approx(4000, rel=0.05)
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, 10.0, 0)


def test_request_bodies_mark_the_class_and_the_priority_only_where_asked():
    plain = RequestStyle().body("hi", "be", 8)
    assert plain["sampling_params"] == {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True,
                                        "custom_params": {"omniserve_class": "be"}}
    assert "priority" not in plain and plain["stream"] is True
    prio = RequestStyle(ls_priority=1, be_priority=0)
    assert prio.body("hi", "ls", 8)["priority"] == 1 and prio.body("hi", "be", 8)["priority"] == 0


def test_latency_model_accuracy_from_the_error_histogram_matches_the_samples():
    """Buckets filled from known errors give back their mean and p90 accuracy within a bucket."""

    rng = np.random.default_rng(0)
    errors = np.abs(rng.normal(0.0, 0.08, 5000))
    edges = [*BEMetrics.ERROR_BUCKETS, float("inf")]
    buckets = {e: float((errors <= e).sum()) for e in edges}
    mean, p90 = accuracy_from_error_buckets(buckets)
    assert mean == pytest.approx(1 - errors.mean(), abs=0.01)
    assert p90 == pytest.approx(1 - np.percentile(errors, 90), abs=0.01)
    assert all(np.isnan(accuracy_from_error_buckets({})))
