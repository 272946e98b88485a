"""The co-serving simulator: hardware models, workloads, the step loop of every system (the
omniserve ones running the controller's own code) and the command line."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from omniserve_sgl.bench.slo import SLO as BenchSLO
from omniserve_sgl.bench.slo import be_tokens_per_s, ls_summary
from omniserve_sgl.control import SLO, STEP_KINDS, LatencyModel, StepShape
from omniserve_sgl.simulate import (
    CPUS,
    GPUS,
    LINKS,
    ProfileTiming,
    RooflineTiming,
    SimConfig,
    Simulation,
    shipped_model,
    simulate,
)
from omniserve_sgl.simulate.__main__ import main
from omniserve_sgl.simulate.workload import arrivals, bursty_arrivals, document_lengths, ls_requests

# A small machine: 5 ms per step, 2 ms per 16-token tile, attention and CPU terms of a small model.
MODEL = LatencyModel(tile=16, c_step=5e-3, c_dense=2e-3, c_prefill_attn=2e-8, c_prefill_ctx=1e-6,
                     c_decode_attn=2e-6, c_decode_row=2e-4, c_cpu_bytes=2e-9, c_cpu_job=1e-4)
TIMING = ProfileTiming(MODEL, kv_bytes_per_token=4096, num_layers=4, qo_bytes_per_row_layer=256)
SLOS = SLO(ttft_s=1.0, tpot_s=0.08)
DURATION = 60.0


def ls_stream(rate: float, seed: int = 0):
    return ls_requests(arrivals("poisson", rate, DURATION, seed), lambda rng: (rng.randint(32, 192), 32), seed)


def run(system: str, rate: float = 2.0, be_concurrency: int = 4, **cfg):
    config = SimConfig(system, TIMING, SLOS, gpu_kv_tokens=cfg.pop("gpu_kv_tokens", 4096), be_pool_tokens=200_000,
                       chunk_tokens=512, **cfg)
    sim = Simulation(config, ls_stream(rate), DURATION, be_backlog=document_lengths("768-1024:96"),
                     be_concurrency=be_concurrency)
    records = sim.run()
    return sim, records, ls_summary(records, BenchSLO(SLOS.ttft_s, SLOS.tpot_s), DURATION)


# hardware ------------------------------------------------------------------------------------
def test_llama_2_70b_has_its_published_size_and_kv_per_token():
    m = shipped_model("llama-2-70b")
    params = m.weight_bytes / m.dtype_bytes
    assert abs(params - 68.98e9) / 68.98e9 < 0.01  # Llama 2 paper: 70B (68.98B in the HF checkpoint)
    assert m.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def test_unknown_model_config_names_the_shipped_ones():
    with pytest.raises(ValueError, match="llama-2-70b"):
        shipped_model("gpt-17")


def test_roofline_dense_work_is_a_staircase_and_tensor_parallelism_shortens_it():
    m = shipped_model("llama-3-8b")
    one = RooflineTiming(m, GPUS["h100"], CPUS["xeon-gold-6342"], tp=1, kernel_efficiency=0.5)
    four = RooflineTiming(m, GPUS["h100"], CPUS["xeon-gold-6342"], tp=4, kernel_efficiency=0.5)
    assert one.gpu_step_s(StepShape(tokens=1)) == one.gpu_step_s(StepShape(tokens=one.a.tile))
    assert one.gpu_step_s(StepShape(tokens=8192)) > 2 * one.gpu_step_s(StepShape(tokens=64))
    assert four.gpu_step_s(StepShape(tokens=8192)) < one.gpu_step_s(StepShape(tokens=8192)) / 2
    # The CPU job is linear in KV bytes; the synchronous step adds one per layer.
    j1, j2 = one.cpu_job_s(1e8), one.cpu_job_s(2e8)
    assert j2 - j1 == pytest.approx(j1 - one.cpu_job_s(0))
    sync = one.predict(StepShape(tokens=8, decode_rows=8, cpu_kv_bytes=32e8, cpu_jobs=32))
    assert sync == pytest.approx(one.gpu_step_s(StepShape(tokens=8, decode_rows=8)) + 32 * one.cpu_job_s(1e8))


def test_a_model_that_does_not_fit_the_gpus_is_refused():
    t = RooflineTiming(shipped_model("llama-2-70b"), GPUS["a100-80gb"], CPUS["xeon-gold-6342"], tp=1,
                       kernel_efficiency=0.5)
    with pytest.raises(ValueError, match="does not fit"):
        t.gpu_kv_tokens()


# workloads -----------------------------------------------------------------------------------
def test_bursty_arrivals_keep_the_mean_rate_and_vary_it():
    times = bursty_arrivals(4.0, 2000.0, seed=1, period_s=5.0)
    assert abs(len(times) / 2000.0 - 4.0) < 0.3
    per_period = [sum(5 * k <= t < 5 * (k + 1) for t in times) for k in range(400)]
    assert statistics.pstdev(per_period) > 1.5 * (20 ** 0.5)  # more spread than a steady Poisson's


def test_document_lengths_follow_the_published_mean_and_bad_specs_are_refused():
    draw, rng = document_lengths("longbench-v2"), random.Random(0)
    prompts, outputs = zip(*(draw(rng) for _ in range(4000)))
    assert abs(statistics.mean(prompts) - 8952) / 8952 < 0.05 and set(outputs) == {136}
    assert document_lengths("10-20:5")(rng)[1] == 5
    assert {document_lengths("1024,1025,7:96")(rng) for _ in range(200)} == {(1024, 96), (1025, 96), (7, 96)}
    for bad in ("wiki", "20-10:5", "10-20", "10-20:0", "0,5:3", "5,x:3"):
        with pytest.raises(ValueError, match="BE lengths"):
            document_lengths(bad)


# the step loop -------------------------------------------------------------------------------
def test_ls_alone_serves_every_request_whole_and_returns_every_kv_slot():
    sim, records, summary = run("ls-only")
    assert records and all(r.success and r.output_len == 32 and len(r.token_times) == 32 for r in records)
    assert summary["ls_slo_attainment"] == 1.0
    assert all(r.ttft >= MODEL.c_step for r in records)
    assert sim.gpu_free == 4096 and not sim.running and not sim.waiting


@pytest.mark.parametrize("system", ["ls-only", "omniserve-sync", "omniserve"])
def test_one_ls_request_alone_gets_the_models_own_ttft_and_tpot(system):
    config = SimConfig(system, TIMING, SLOS, gpu_kv_tokens=4096, be_pool_tokens=0)
    (rec,), _ = simulate(config, ls_requests([0.5], lambda rng: (100, 4), 0), 10.0)
    assert rec.ttft == pytest.approx(MODEL.predict(StepShape(tokens=100, prefill_attn_work=100 * 100,
                                                             prefill_context=100)))
    gaps = [b - a for a, b in zip(rec.token_times, rec.token_times[1:], strict=False)]
    # Decode step k reads the prompt and the k tokens so far.
    assert gaps == pytest.approx([MODEL.predict(StepShape(tokens=1, decode_context=100 + k, decode_rows=1))
                                  for k in (1, 2, 3)])


def test_results_lag_streams_each_steps_tokens_after_the_next_step_and_frees_kv_then():
    """SGLang's overlap schedule on its CPU device: step N's results are processed after step N+1
    ran, so each token reaches the client one step late (the last one at once: no step follows),
    and a finished request's KV is free only for the step after next."""
    config = SimConfig("fcfs", TIMING, SLOS, gpu_kv_tokens=4096, be_pool_tokens=0, results_lag=True)
    (rec,), _ = simulate(config, ls_requests([0.5], lambda rng: (100, 4), 0), 10.0)
    prefill = MODEL.predict(StepShape(tokens=100, prefill_attn_work=100 * 100, prefill_context=100))
    d1, d2, d3 = (MODEL.predict(StepShape(tokens=1, decode_context=100 + k, decode_rows=1)) for k in (1, 2, 3))
    assert [t - 0.5 for t in rec.token_times] == pytest.approx(
        [prefill + d1, prefill + d1 + d2, prefill + d1 + d2 + d3, prefill + d1 + d2 + d3])
    assert rec.ttft == pytest.approx(prefill + d1)
    # A finishes with B still decoding; C needs A's KV. Without the lag C's prefill follows A's last
    # step; with it, B decodes alone once more first, and C's first token waits for the step after.
    def c_ttft(lag: bool) -> float:
        config = SimConfig("fcfs", TIMING, SLOS, gpu_kv_tokens=164, be_pool_tokens=0, results_lag=lag)
        sim = Simulation(config, ls_requests([0.0], lambda rng: (100, 2), 0) + ls_requests([0.0], lambda rng: (20, 8), 0)
                         + ls_requests([0.001], lambda rng: (100, 2), 0), 10.0)
        records = sim.run()
        assert all(r.success for r in records) and sim.gpu_free == 164
        return records[2].ttft

    b_alone = MODEL.predict(StepShape(tokens=1, decode_context=22, decode_rows=1))
    b_and_c = MODEL.predict(StepShape(tokens=2, decode_context=23 + 101, decode_rows=2))
    assert c_ttft(True) - c_ttft(False) == pytest.approx(b_alone + b_and_c)


def test_ignore_eos_requests_keep_their_whole_remaining_output_free_as_sglangs_prefill_adder_does():
    """A (100-token prompt, 40 output tokens) runs; B (50 + 10) fits beside the new-token ratio of
    A's remaining output but not beside all of it, which an ``ignore_eos`` request keeps free."""
    def first_tokens(ignore_eos: bool) -> tuple[list[float], float]:
        config = SimConfig("fcfs", TIMING, SLOS, gpu_kv_tokens=190, be_pool_tokens=0, ignore_eos=ignore_eos)
        a, b = simulate(config, ls_requests([0.0], lambda rng: (100, 40), 0)
                        + ls_requests([0.001], lambda rng: (50, 10), 0), 10.0)[0]
        assert a.success and b.success
        return a.token_times, b.token_times[0]

    a_times, b_first = first_tokens(ignore_eos=False)
    assert b_first < a_times[2]  # admitted beside A at once
    a_times, b_first = first_tokens(ignore_eos=True)
    assert b_first > a_times[-1]  # only once A has finished


def test_the_schedulers_own_time_between_steps_delays_each_next_step():
    config = SimConfig("ls-only", TIMING, SLOS, gpu_kv_tokens=4096, be_pool_tokens=0, step_overhead_s=0.01)
    (rec,), _ = simulate(config, ls_requests([0.5], lambda rng: (100, 4), 0), 10.0)
    assert rec.ttft == pytest.approx(MODEL.predict(StepShape(tokens=100, prefill_attn_work=100 * 100,
                                                             prefill_context=100)))
    gaps = [b - a for a, b in zip(rec.token_times, rec.token_times[1:], strict=False)]
    assert gaps == pytest.approx([0.01 + MODEL.predict(StepShape(tokens=1, decode_context=100 + k, decode_rows=1))
                                  for k in (1, 2, 3)])


def test_be_work_never_stretches_an_ls_decode_step_past_the_tpot_slo_under_omniserve():
    """With no lead lent (``ahead_cap=0``) no step with LS decodes and BE work (BE rows, or a BE
    chunk in a mixed step) is longer than the TPOT SLO; with the default policy the LS decodes
    lend the time they are ahead, so single steps may be longer, but no LS request's TPOT is."""
    from omniserve_sgl.control import ControllerConfig

    for system in ("omniserve-sync", "omniserve"):
        sim, records, _summary = run(system, rate=1.0, be_concurrency=8, controller=ControllerConfig(ahead_cap=0))
        assert sim.stats.longest_ls_decode_s <= SLOS.tpot_s
        assert be_tokens_per_s(records, DURATION) > 0
        sim, records, summary = run(system, rate=1.0, be_concurrency=8)
        assert summary["tpot_attainment"] == 1.0 and be_tokens_per_s(records, DURATION) > 0


def test_nothing_is_lost_every_request_finishes_or_is_rejected_with_a_reason():
    from omniserve_sgl.control import ControllerConfig

    for system in ("fcfs", "priority", "omniserve-sync", "omniserve"):
        sim, records, _ = run(system, rate=4.0, be_concurrency=6, controller=ControllerConfig(ls_admission="reject"))
        assert all(r.success or r.error.startswith("rejected: predicted TTFT") for r in records), system
        assert sim.gpu_free == 4096 and not sim.running and not sim.waiting


def test_the_simulator_runs_the_servers_own_controller():
    from omniserve_sgl.control import policy
    from omniserve_sgl.sglang_glue import controller as glue

    sim = run("omniserve-sync", rate=0.5)[0]
    assert type(sim.controller) is policy.Controller is glue.Controller


def test_the_simulated_controller_knows_only_what_the_server_knows_of_ls_output_lengths(monkeypatch):
    """The server cannot know where an LS request will end: the simulator gives the controller the
    tokens the LS requests finished so far make likely (as the glue does), not each request's
    actual remaining output."""
    from omniserve_sgl.control import policy

    seen, plan = [], policy.Controller.plan

    def spy(self, view):
        seen.extend((len(sim.lengths), d.tokens_done, d.tokens_left, sim.lengths.likely_left(d.tokens_done + 1))
                    for d in view.ls_decodes)
        return plan(self, view)

    monkeypatch.setattr(policy.Controller, "plan", spy)
    ls = ls_requests(arrivals("poisson", 2.0, DURATION, 0), lambda rng: (rng.randint(32, 192), rng.randint(2, 48)), 0)
    sim = Simulation(SimConfig("omniserve-sync", TIMING, SLOS, gpu_kv_tokens=4096, be_pool_tokens=200_000), ls,
                     DURATION, be_backlog=document_lengths("768-1024:96"), be_concurrency=4)
    sim.run()
    assert seen and all(left == likely for _, _, left, likely in seen)
    assert {left for n, _, left, _ in seen if n == 0} == {0}  # nothing finished yet: nothing is likely
    assert any(left > 0 for n, _, left, _ in seen if n >= 32)


def test_sim_validate_simulates_the_be_documents_the_real_run_sent():
    """The quick profile's BE documents are cut at the top of their range: validation draws the
    prompt lengths the real run recorded, and the range only for runs that did not record them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from sim_validate import be_lengths

    w = {"be_prompt_tokens": [768, 1024], "be_max_new_tokens": 96}
    assert be_lengths(w) == "768-1024:96"
    spec = be_lengths({**w, "be_prompt_lengths": [1024, 1025, 1024]})
    assert spec == "1024,1025,1024:96"
    assert {document_lengths(spec)(random.Random(s))[0] for s in range(50)} == {1024, 1025}


def test_the_same_seed_gives_the_same_run():
    a, b = run("omniserve-sync")[1], run("omniserve-sync")[1]
    assert [r.token_times for r in a] == [r.token_times for r in b]


def test_baselines_order_as_sglang_schedules_them():
    _, _, alone = run("ls-only")
    _, _, fcfs = run("fcfs")
    _, _, prio = run("priority")
    # BE documents ahead in one FCFS queue delay LS first tokens; priority puts LS first.
    assert fcfs["ls_p50_ttft_s"] > 2 * alone["ls_p50_ttft_s"]
    assert prio["ls_p50_ttft_s"] < fcfs["ls_p50_ttft_s"]


def test_omniserve_without_control_admits_as_the_server_does_ls_first_and_one_be_prompt_per_prefill():
    config = SimConfig("omniserve-nocontrol", TIMING, SLOS, gpu_kv_tokens=4096, be_pool_tokens=200_000,
                       chunk_tokens=4096)
    sim = Simulation(config, ls_stream(2.0), DURATION, be_backlog=document_lengths("768-1024:96"), be_concurrency=4)
    batches = []
    prefill = sim._prefill

    def spy(batch):
        batches.append([(r.cls, r.prefilled) for r, _ in batch])
        prefill(batch)

    sim._prefill = spy
    records = sim.run()
    assert all(r.success for r in records)
    starting = [[cls for cls, done in batch if done == 0] for batch in batches]
    assert max(b.count("be") for b in starting) == 1  # four BE requests arrive at once; one starts per batch
    assert all(b == sorted(b, key=lambda c: c == "be") for b in starting)  # LS prompts before the BE one


def test_the_controller_holds_ls_slos_where_every_be_row_in_every_step_does_not():
    _, _, alone = run("ls-only")
    _, rec_sync, sync = run("omniserve-sync")
    _, _, nocontrol = run("omniserve-nocontrol")
    assert sync["ls_slo_attainment"] >= 0.99 * alone["ls_slo_attainment"]
    assert be_tokens_per_s(rec_sync, DURATION) > 0
    assert nocontrol["ls_p50_tpot_s"] > sync["ls_p50_tpot_s"]


def test_asynchronous_piggybacking_moves_be_tokens_through_cpu_attention_without_slowing_ls():
    sim, records, summary = run("omniserve", controller=__import__(
        "omniserve_sgl.control", fromlist=["ControllerConfig"]).ControllerConfig(be_placement="cpu"))
    assert summary["ls_slo_attainment"] >= 0.99
    assert sim.stats.be_cpu_tokens > 0 and sim.stats.cpu_utilisation > 0
    be = [r for r in records if r.service_class == "be" and r.success]
    assert be and all(len(r.token_times) == 96 for r in be)
    assert sim.gpu_free == 4096 and all(n.pool_free == 200_000 for n in sim.nodes)


def test_remote_cpu_servers_add_cpu_attention_capacity():
    base = run("omniserve-nocontrol", rate=0.5, be_concurrency=16, gpu_kv_tokens=32768)
    more = run("omniserve-nocontrol", rate=0.5, be_concurrency=16, gpu_kv_tokens=32768, remote_cpus=3,
               link=LINKS["100gbit"])
    assert be_tokens_per_s(more[1], DURATION) > 1.2 * be_tokens_per_s(base[1], DURATION)
    assert sum(n.busy_s > 0 for n in more[0].nodes) == 4


def test_a_slow_link_to_remote_cpu_servers_never_stalls_ls_decode_steps():
    """KV crossing the network to (or from) a remote CPU server is the host's work: the GPU goes
    on, and only the moved row waits for its KV. (Charged to the GPU, an 80 Mbit/s link made the
    LS p50 TPOT 2.6x the 100 Gbit/s one's.)"""
    from omniserve_sgl.control import ControllerConfig
    from omniserve_sgl.simulate.hardware import LinkSpec

    slow = LinkSpec("80 Mbit/s", 0.01e9, 1e-3, "a slow link for the test")
    ctl = ControllerConfig(be_placement="cpu")
    _, _, fast = run("omniserve", be_concurrency=8, controller=ctl, remote_cpus=3, link=LINKS["100gbit"])
    sim, _, remote = run("omniserve", be_concurrency=8, controller=ctl, remote_cpus=3, link=slow)
    assert all(n.busy_s > 0 for n in sim.nodes)  # the remote nodes did attention
    assert remote["ls_slo_attainment"] >= 0.99 * fast["ls_slo_attainment"]
    assert remote["ls_p50_tpot_s"] <= 1.1 * fast["ls_p50_tpot_s"]


def test_a_cpu_result_joins_the_same_pass_only_within_one_layers_ls_attention():
    """As the executor runs a pass: every ready row's layer-s job is submitted after the
    boundary's dense work and joins this pass at boundary s+1 only if it is back within the LS
    attention of layer s; otherwise it waits a whole pass (one layer per pass)."""
    from omniserve_sgl.simulate.engine import CPU, _Req

    def pass_over(ls_context: int):
        sim = Simulation(SimConfig("omniserve", TIMING, SLOS, gpu_kv_tokens=4096, be_pool_tokens=200_000), [], 10.0)
        rows = [_Req(f"be{i}", "be", 0.0, 200, 10, target=200, prefilled=200, placement=CPU) for i in range(16)]
        sim.running += rows
        return rows, sim._piggyback(StepShape(tokens=1, decode_context=ls_context, decode_rows=1), budget=16)

    job_s = TIMING.cpu_job_s(16 * 200 * TIMING.kv_bytes_per_token / TIMING.num_layers)
    short, long = 100, 20_000  # one layer's LS attention: 0.05 ms, then 10 ms (c_decode_attn 2 us per token)
    assert short * MODEL.c_decode_attn / TIMING.num_layers < job_s < long * MODEL.c_decode_attn / TIMING.num_layers
    rows, (joined, sampled, _) = pass_over(short)
    assert joined == 16 and not sampled and all(r.stage == 1 for r in rows)  # all submitted, all late
    rows, (joined, sampled, _) = pass_over(long)
    assert joined == 16 * (TIMING.num_layers + 1) and len(sampled) == 16  # back in time at every layer


def test_served_factors_price_each_step_kind_as_the_server_measured_it():
    served = ProfileTiming(MODEL, kv_bytes_per_token=4096, num_layers=4,
                           served={"prefill": 1.5, "decode": 1.2, "decode+cpu": 2.0})
    prefill = StepShape(tokens=64, prefill_attn_work=64 * 64, prefill_context=64)
    decode = StepShape(tokens=8, decode_context=800, decode_rows=8)
    sync = StepShape(tokens=8, decode_context=800, decode_rows=8, cpu_kv_bytes=1e6, cpu_jobs=4)
    assert served.gpu_step_s(prefill) == pytest.approx(1.5 * TIMING.gpu_step_s(prefill))
    assert served.gpu_step_s(decode) == pytest.approx(1.2 * TIMING.gpu_step_s(decode))
    # its GPU part: the server measured decode+cpu over the whole step
    assert served.gpu_step_s(sync) == pytest.approx(2.0 * TIMING.gpu_step_s(sync))
    assert served.predict(sync) == pytest.approx(2.0 * TIMING.predict(sync))
    assert served.cpu_job_s(1e6) == pytest.approx(2.0 * TIMING.cpu_job_s(1e6))


def test_sim_validate_sums_each_systems_served_factors_over_its_rates():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from sim_validate import served_factors

    rows = [{"system": "omniserve-sync", "served_over_profiled": {"decode": 1.0}, "served_step_s": {"decode": 10.0}},
            {"system": "omniserve-sync", "served_over_profiled": {"decode": 2.0}, "served_step_s": {"decode": 30.0}},
            {"system": "ls-only"}]
    # 40 s measured over 10 + 15 s profiled; a system that measured nothing gets no factors
    assert served_factors({"rows": rows}) == {"omniserve-sync": {"decode": pytest.approx(40 / 25)}}
    assert served_factors({"rows": rows[2:]}) == {}


def test_sim_validate_prices_the_other_systems_by_sglangs_forward_seconds_over_the_same_passes_simulated():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from sim_validate import forward_factors

    real = {"rows": [
        {"system": "fcfs", "ls_rate": 1.0, "forward_s": 33.0, "forward_passes": {"prefill": 10, "decode": 100}},
        {"system": "fcfs", "ls_rate": 2.0, "forward_s": 11.0, "forward_passes": {"prefill": 0, "decode": 50}},
        {"system": "omniserve-sync", "ls_rate": 1.0, "forward_s": 5.0, "forward_passes": {"prefill": 1, "decode": 1}},
        {"system": "ls-only", "ls_rate": 1.0}]}  # a run without SGLang's counters
    sim = {"rows": [
        # simulated mean steps: prefill 1 s, decode (with or without CPU rows) 0.2 s; then 0.2 s
        {"system": "fcfs", "ls_rate": 1.0, "step_s": {"prefill": [4, 4.0], "decode": [5, 0.5], "decode+cpu": [5, 1.5]}},
        {"system": "fcfs", "ls_rate": 2.0, "step_s": {"prefill": [2, 2.0], "decode": [10, 2.0]}},
        {"system": "omniserve-sync", "ls_rate": 1.0, "step_s": {"decode": [1, 1.0]}},
        {"system": "ls-only", "ls_rate": 1.0, "step_s": {"decode": [1, 1.0]}}]}
    factors = forward_factors(real, sim, served={"omniserve-sync": {"decode": 1.1}})
    # (33 + 11) s over (10 x 1 + 100 x 0.2) + (50 x 0.2) s, for every step kind
    assert factors == {"fcfs": dict.fromkeys(STEP_KINDS, pytest.approx(44 / 40))}


def test_sim_validate_adds_each_systems_scheduler_time_per_pass():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from sim_validate import step_overheads

    rows = [{"system": "fcfs", "scheduler_s": 1.0, "forward_passes": {"prefill": 10, "decode": 90}},
            {"system": "fcfs", "scheduler_s": 2.0, "forward_passes": {"prefill": 0, "decode": 100}},
            {"system": "ls-only"}]
    assert step_overheads({"rows": rows}) == {"fcfs": pytest.approx(3.0 / 200)}


def test_sim_validate_lags_results_only_where_sglang_ran_its_overlap_loop_on_the_cpu_device():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from sim_validate import results_lag

    real = {"device": "CPU only: 2 cores", "server_info": {"fcfs": {"device": "cpu", "disable_overlap_schedule": False},
                                                           "ls-only": {"device": "cpu", "disable_overlap_schedule": True},
                                                           "priority": {"device": "cuda"}}}
    assert results_lag(real, "fcfs") and not results_lag(real, "omniserve-sync")
    assert not results_lag(real, "ls-only") and not results_lag(real, "priority")
    assert results_lag({"device": "CPU only: 2 cores"}, "headroom")  # a run that recorded neither key


def test_a_prompt_longer_than_the_kv_cache_fails_with_a_reason():
    config = SimConfig("ls-only", TIMING, SLOS, gpu_kv_tokens=100, be_pool_tokens=0)
    records, _ = simulate(config, ls_requests([0.5], lambda rng: (200, 4), 0), 10.0)
    assert not records[0].success and "exceeds the KV cache" in records[0].error


def test_invalid_configurations_are_refused():
    with pytest.raises(ValueError, match="unknown system"):
        SimConfig("vllm", TIMING, SLOS, 100, 100)
    with pytest.raises(ValueError, match="link"):
        SimConfig("omniserve", TIMING, SLOS, 100, 100, remote_cpus=2)
    with pytest.raises(ValueError, match="step_overhead_s"):
        SimConfig("fcfs", TIMING, SLOS, 100, 100, step_overhead_s=-0.001)


# the command line ----------------------------------------------------------------------------
def test_the_command_line_writes_coserves_rows_table_and_simulator_columns(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(MODEL.to_json())
    rc = main(["--profile", str(profile), "--model", "llama-3-8b", "--gpu-kv-tokens", "4096", "--be-pool-gb", "1",
               "--systems", "ls-only,omniserve-sync", "--rates", "1", "--duration", "20", "--ls-output", "16",
               "--ls-max-prompt", "192", "--be-lengths", "768-1024:32", "--be-concurrency", "2",
               "--out", str(tmp_path), "--name", "t", "--no-plots"])
    assert rc == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert [r["system"] for r in result["rows"]] == ["ls-only", "omniserve-sync"]
    assert {"ls_slo_attainment", "be_tokens_per_s", "gpu_utilisation", "be_cpu_tokens"} <= set(result["rows"][1])
    assert "| GPU util |" in (tmp_path / "t.md").read_text()


def test_the_command_line_refuses_bad_input_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--systems", "ls-only,vllm", "--rates", "1", "--duration", "1"])
    assert e.value.code == 2 and "unknown systems ['vllm']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--profile", "/nonexistent.json", "--rates", "1"])


def test_a_replay_gives_every_runs_ith_ls_request_the_real_runs_ith_prompt(monkeypatch):
    """``benchmarks/coserve.py`` sends prompt i to LS request i at every rate; a replay of its
    recorded prompt lengths does the same, from the first prompt again in each run."""
    import dataclasses

    from omniserve_sgl.simulate import experiment

    seen, simulate_one = [], experiment.simulate
    monkeypatch.setattr(experiment, "simulate", lambda cfg, ls, d, **be: (
        seen.append([r.prompt_len for r in ls]), simulate_one(cfg, ls, d, **be))[1])
    scenario = experiment.Scenario("t", ("ls-only",), (2.0, 3.0), 10.0, SLOS, ls_output_tokens=4,
                                   ls_prompt_lengths=(100, 7, 50))
    result = experiment.run(scenario, lambda s: SimConfig(s, TIMING, SLOS, 4096, 1000), "t", progress=None)
    assert len(seen) == 2 and all(len(lens) > 3 for lens in seen)
    assert all(lens == [(100, 7, 50)[i % 3] for i in range(len(lens))] for lens in seen)
    assert all(r["ls_requests"] == len(lens) for r, lens in zip(result["rows"], seen, strict=True))
    with pytest.raises(ValueError, match="fixed output length"):
        experiment.run(dataclasses.replace(scenario, ls_output_tokens=None), lambda s: None, "t", progress=None)


def test_a_synchronous_step_with_cpu_rows_takes_its_served_decode_cpu_factor_as_a_whole():
    """The server measures a ``decode+cpu`` step whole (its GPU part and the CPU waits): a served
    factor for that kind stretches both, and the ``decode`` kind's factor neither."""

    def decode_cpu_seconds(served):
        timing = ProfileTiming(MODEL, kv_bytes_per_token=4096, num_layers=4, served=served)
        config = SimConfig("omniserve-nocontrol", timing, SLOS, gpu_kv_tokens=4096, be_pool_tokens=200_000)
        sim = Simulation(config, [], 0.01, be_backlog=lambda rng: (500, 20), be_concurrency=1)  # one request
        sim.run()
        return sim.stats.step_s["decode+cpu"]

    (n, plain), (n2, served) = decode_cpu_seconds(None), decode_cpu_seconds({"decode+cpu": 2.0, "decode": 3.0})
    assert n == n2 >= 19 and served == pytest.approx(2.0 * plain)


def test_sim_validate_forecasts_a_row_by_the_mean_of_a_pace_ensemble():
    """``pace_ensemble`` simulates the row again with every served pace moved evenly from 2% slower
    to 2% faster; ``compare`` checks the ensemble's mean and reports its attainment's range (the
    landed real run, one row)."""
    import sys
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    sys.path.insert(0, str(results.parent))
    import sim_validate as sv

    real = json.loads((results / "sim-validate-work" / "coserve-quick.json").read_text())
    real = {**real, "systems": ["priority"], "rows": [r for r in real["rows"] if r["system"] == "priority"][:1],
            "workload": {**real["workload"], "ls_rates": real["workload"]["ls_rates"][:1]}}
    profile = results / "sim-validate-work" / "latency-profile.json"
    served = {"priority": dict.fromkeys(STEP_KINDS, 1.0)}
    sim = sv.simulate_like(real, profile, 0.04, 0, served)
    sims = sv.pace_ensemble(real, profile, 0.04, 0, served, sim)
    assert len(sims) == sv.PACE_MEMBERS == 5 and sims[0] is sim
    slower = sv.simulate_like(real, profile, 0.04, 0, {"priority": dict.fromkeys(STEP_KINDS, 1.02)})["rows"][0]
    assert sims[-1]["rows"][0]["ls_slo_attainment"] == slower["ls_slo_attainment"]
    att = [s["rows"][0]["ls_slo_attainment"] for s in sims]
    (c,) = sv.compare(real, sims)
    assert c["sim_attainment"] == pytest.approx(sum(att) / 5) and c["sim_attainment_band"] == [min(att), max(att)]
    assert c["sim_be_tokens_per_s"] == pytest.approx(sum(s["rows"][0]["be_tokens_per_s"] for s in sims) / 5)
    assert c["attainment_ok"] == (abs(c["real_attainment"] - c["sim_attainment"]) * 100 <= 5)
    (one,) = sv.compare(real, [sim])
    assert one["sim_attainment"] == att[0] and one["sim_attainment_band"] == [att[0], att[0]]
