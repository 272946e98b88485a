"""The worker's default cores and hand-off, and the defaults the CPU attention benchmark chose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omniserve_sgl.config import SGLANG_HOST_CORES, SPIN_US, OmniServeConfig, parse_cores

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results" / "cpu_attention.json"


def test_on_the_cpu_device_the_worker_shares_the_cores_and_blocks():
    w = OmniServeConfig().worker_setup("cpu", affinity=list(range(8)))
    assert (w.threads, w.cores, w.spin_us) == (4, None, 0.0)
    assert "blocks on ZeroMQ" in w.why


def test_on_a_gpu_server_the_worker_gets_the_cores_sglang_does_not_poll_on_and_busy_polls():
    w = OmniServeConfig().worker_setup("cuda:0", affinity=list(range(16)))
    assert parse_cores(w.cores) == list(range(SGLANG_HOST_CORES, 16))
    assert (w.threads, w.spin_us) == (16 - SGLANG_HOST_CORES, SPIN_US)
    # Too few cores to spare one: as on the CPU device.
    small = OmniServeConfig().worker_setup("cuda:0", affinity=list(range(SGLANG_HOST_CORES)))
    assert (small.cores, small.spin_us) == (None, 0.0)


def test_given_cores_are_the_workers_own_and_given_settings_win():
    w = OmniServeConfig(cpu_cores="2-3,6").worker_setup("cpu", affinity=list(range(8)))
    assert (w.threads, w.cores, w.spin_us) == (3, "2-3,6", SPIN_US)
    w = OmniServeConfig(cpu_cores="2-3", cpu_threads=1, cpu_spin_us=0.0).worker_setup("cuda", affinity=list(range(8)))
    assert (w.threads, w.cores, w.spin_us) == (1, "2-3", 0.0)
    w = OmniServeConfig(cpu_spin_us=500.0).worker_setup("cpu", affinity=[0, 1])
    assert (w.cores, w.spin_us) == (None, 500.0)
    with pytest.raises(ValueError, match="bad CPU core list"):
        OmniServeConfig(cpu_cores="x-2").worker_setup("cpu")


def test_the_default_page_size_is_the_one_the_landed_benchmark_measured_best():
    """benchmarks/cpu_attention.py picks it from its page-size rows; the code must follow."""
    measured = json.loads(RESULTS.read_text())["defaults"]["page_size"]
    assert OmniServeConfig().page_size == measured


def test_an_unknown_piggybacking_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="--omniserve-mode must be async or sync, got 'fast'"):
        OmniServeConfig(mode="fast")
