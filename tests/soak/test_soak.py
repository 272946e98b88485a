"""The short form of the soak (``benchmarks/soak.py`` runs the long one): LS and BE requests through
every API, streamed and not, some aborted and some malformed, with the CPU attention worker killed
twice; nothing is lost and nothing leaks (see ``omniserve_sgl.bench.soak``)."""

from __future__ import annotations

from omniserve_sgl.bench.soak import SoakSpec, run_soak

SHORT = SoakSpec(num_requests=250, warmup_requests=100, concurrency=8, max_new_tokens=(4, 16), worker_kills=2,
                 seed=0)


def test_short_mixed_soak_with_two_worker_kills(soak_server, prompts):
    report = run_soak(soak_server.url, soak_server.proc.pid, SHORT, prompts)
    print(report.to_markdown())
    assert report.failures == [], "\n".join(report.failures)
    # The run did what it says: every kind of request was in it.
    for kind in ("ls", "be", "aborted", "malformed", "generate", "completions", "chat", "streamed"):
        assert report.counts.get(kind, 0) > 0, (kind, report.counts)
    assert report.restarts == SHORT.worker_kills
