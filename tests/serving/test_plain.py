"""The package installed but ``--omniserve`` off changes nothing."""

from __future__ import annotations


def test_plain_sglang_without_omniserve(plain_run):
    assert len(plain_run.marked["be"]["output_ids"]) == 8  # the marker is just a custom param
    assert len(plain_run.marked["gold"]["output_ids"]) == 2  # not validated: omniserve is off
    assert plain_run.workers == []
    assert "sglang:" in plain_run.metrics and "omniserve_" not in plain_run.metrics
