"""The CPU attention worker as a real process, over real ZeroMQ and shared memory."""

import glob
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import orjson
import pytest
import torch
import zmq

from omniserve_sgl import ops
from omniserve_sgl.kv import BEKVPool, BEKVPoolSpec
from omniserve_sgl.worker import CPUAttentionClient, Job, WorkerError
from omniserve_sgl.worker import protocol as P

DRIVER = textwrap.dedent("""
    # Drives a worker from this (second) process: several layers, several jobs in flight.
    import torch
    from omniserve_sgl import ops
    from omniserve_sgl.kv import BEKVPool, BEKVPoolSpec
    from omniserve_sgl.worker import CPUAttentionClient

    torch.manual_seed(0)
    spec = BEKVPoolSpec(num_layers=3, num_kv_heads=2, head_dim=64, num_pages=256, page_size=16)
    pool = BEKVPool.create(spec)
    client = CPUAttentionClient.start(threads=2)
    client.attach_pool(pool)
    client.create_staging(num_slots=3, max_rows=8, max_pages=256, num_qo_heads=6)
    lens = [1, 15, 16, 200, 900]
    for i, n in enumerate(lens):
        pool.allocator.allocate(i, n)
    for layer in range(3):
        pool.k_cache(layer).normal_()
        pool.v_cache(layer).normal_()
    for step in range(3):  # decode steps: grow, append the new token's K/V and attend, per layer
        for i in range(len(lens)):
            pool.allocator.extend(i)
        meta = pool.allocator.kv_metadata(list(range(len(lens))))
        q = [torch.randn(5, 6, 64).bfloat16() for _ in range(3)]
        k = [torch.randn(5, 2, 64).bfloat16() for _ in range(3)]
        v = [torch.randn(5, 2, 64).bfloat16() for _ in range(3)]
        jobs = [client.submit_decode(l, q[l], *meta, k_new=k[l], v_new=v[l]) for l in range(3)]
        results = [client.wait(j, timeout=30) for j in jobs]
        for l, (out, lse) in enumerate(results):
            ref_out, ref_lse = ops.paged_decode_attention(q[l], pool.k_cache(l), pool.v_cache(l), *meta,
                                                          kv_layout=spec.kv_layout)
            assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse), (step, l)
            page, off = meta[1][meta[0][1:].long() - 1].long(), meta[2].long() - 1
            assert torch.equal(pool.k_cache(l)[page, :, off], k[l])  # the worker appended (HND pool)
    print("round trips ok", client.ping() * 1e6, "us")
    client.close()
""")


def test_round_trip_driven_from_a_second_process():
    res = subprocess.run([sys.executable, "-c", DRIVER], check=False, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round trips ok" in res.stdout


@pytest.fixture(params=[0, 2000], ids=["zmq", "spin"])
def worker(request):
    """A worker blocking on ZeroMQ, and one busy-polling the slots' doorbells (spin_us=2000)."""
    pool = BEKVPool.create(BEKVPoolSpec(num_layers=2, num_kv_heads=1, head_dim=16, num_pages=8, page_size=4))
    client = CPUAttentionClient.start(threads=1, spin_us=request.param, keep_endpoint=True)
    client.attach_pool(pool)
    client.create_staging(num_slots=2, max_rows=4, max_pages=8, num_qo_heads=2)
    yield client, pool
    client.close()
    pool.close()


def test_malformed_messages_get_error_replies(worker):
    client, _ = worker
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(client.endpoint)
    raw.send(P.encode(P.Hello(0, client.token)))  # a peer with the token, sending nonsense after it
    assert raw.poll(10_000) and orjson.loads(raw.recv())["ok"] is True
    bad = [
        (b"\x00\xffnot json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (orjson.dumps({"op": "explode", "seq": 1}), "unknown op"),
        (orjson.dumps({"op": "ping"}), "seq"),
        (orjson.dumps({"op": "ping", "seq": "x"}), "must be int"),
        (orjson.dumps({"op": "attend", "seq": 5, "pool": "nope", "staging": "nope", "slot": 0, "layer": 0,
                       "num_rows": 1, "num_pages": 1, "append_kv": False, "sm_scale": 1.0}), "unknown pool"),
        (orjson.dumps({"op": "attach", "seq": 6, "name": "x", "kind": "kv_pool",
                       "handle": {"spec": {}, "segment": {}}}), "Error"),
        (orjson.dumps({"op": "attach", "seq": 7, "name": "s", "kind": "staging", "pool": "nope",
                       "handle": {"spec": {}, "segment": {}}}), "attach the KV pool 'nope' before"),
    ]
    for payload, words in bad:
        raw.send(payload)
        assert raw.poll(10_000), f"no reply to {payload!r}"
        reply = orjson.loads(raw.recv())
        assert reply["ok"] is False and words in reply["error"], reply
    raw.send_multipart([b"two", b"frames"])
    assert raw.poll(10_000) and orjson.loads(raw.recv())["ok"] is False
    raw.close()
    assert client.ping() < 5  # still serving
    assert client.alive()


def test_a_failing_job_is_reported_and_the_worker_goes_on(worker):
    client, pool = worker
    pool.allocator.allocate("a", 3)
    indptr, indices, last = pool.allocator.kv_metadata(["a"])
    q = torch.randn(1, 2, 16).bfloat16()
    job = client.submit_decode(0, q, indptr, torch.tensor([99], dtype=torch.int32), last)
    with pytest.raises(WorkerError, match="outside the cache"):
        client.wait(job, timeout=30)
    with pytest.raises(ValueError, match="exceed a staging slot"):
        client.submit_decode(0, torch.randn(9, 2, 16).bfloat16(), indptr, indices, last)
    out, lse = client.wait(client.submit_decode(1, q, indptr, indices, last), timeout=30)
    assert out.shape == (1, 2, 16) and torch.isfinite(lse).all()


def test_jobs_in_flight_and_poll(worker):
    client, pool = worker
    pool.allocator.allocate("a", 10)
    meta = pool.allocator.kv_metadata(["a"])
    q = torch.randn(1, 2, 16).bfloat16()
    jobs = [client.submit_decode(0, q, *meta), client.submit_decode(1, q, *meta)]
    with pytest.raises(RuntimeError, match="staging slots are in flight"):
        client.submit_decode(0, q, *meta)
    deadline = time.monotonic() + 30
    while not all(client.poll(j) for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    for j in reversed(jobs):  # results can be collected in any order
        client.wait(j, timeout=1)


def test_the_worker_plans_a_page_table_once_and_runs_its_checked_copy(worker):
    client, pool = worker
    pool.allocator.allocate("a", 10)
    meta = pool.allocator.kv_metadata(["a"])
    q = torch.randn(1, 2, 16).bfloat16()
    want = [client.wait(client.submit_decode(layer, q, *meta), timeout=30)[0] for layer in (0, 1)]
    assert client.plans_made == 1  # both layers ran the plan of the first job
    for slot in client.staging.slots:  # scribbled over behind the client's back: the plan holds checked ids
        slot["kv_indices"].fill_(10**6)
    got = [client.wait(client.submit_decode(layer, q, *meta), timeout=30)[0] for layer in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and client.plans_made == 1
    page, off = int(meta[1][-1]), int(meta[2][-1]) - 1
    for layer in (0, 1):  # the append too writes through the plan's checked ids
        for slot in client.staging.slots:
            slot["kv_indices"].fill_(10**6)
        kv = torch.randn(2, 1, 1, 16).bfloat16()
        client.wait(client.submit_decode(layer, q, *meta, k_new=kv[0], v_new=kv[1]), timeout=30)
        assert torch.equal(pool.k_cache(layer)[page, :, off], kv[0, 0])  # HND pool
        assert torch.equal(pool.v_cache(layer)[page, :, off], kv[1, 0])
    assert client.plans_made == 1
    meta[1][0] = 10**6  # an in-place change is new metadata: planned, checked, refused
    with pytest.raises(WorkerError, match="outside the cache"):
        client.wait(client.submit_decode(0, q, *meta), timeout=30)


def test_a_job_whose_message_comes_before_its_doorbell_runs_when_the_doorbell_rings(worker):
    """What a GPU stream does (worker/stream_handoff.py): the message wakes the worker, the stream
    rings the doorbell only once the job's data has landed in the slot."""
    client, pool = worker
    pool.allocator.allocate("a", 7)
    meta = pool.allocator.kv_metadata(["a"])
    q = torch.randn(1, 2, 16).bfloat16()
    want = client.wait(client.submit_decode(0, q, *meta), timeout=30)
    slot, seq = client._free_slots.pop(), client._next_seq()
    s = client.staging.slots[slot]
    s["q"][:1].copy_(q)
    s["kv_indptr"][:2].copy_(meta[0])
    s["kv_indices"][: len(meta[1])].copy_(meta[1])
    s["kv_last_page_len"][:1].copy_(meta[2])
    client.staging.jobs[slot][1:] = (0, 1, len(meta[1]), 0, 0, 1 / 4, 0)
    client._awaiting.add(seq)
    client.sock.send(P.encode(P.Attend(seq, client._pool_name, client._staging_name, slot, 0, 1, len(meta[1]),
                                       False, 1 / 4, "kernel")))
    time.sleep(0.3)
    assert client.staging.done[slot][0] < seq  # not run from the slot's old words
    client.staging.jobs[slot][0] = seq  # the doorbell
    got = client.wait(Job(seq, slot, 1), timeout=30)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_sdpa_method_matches_the_kernel_and_torch(worker):
    client, pool = worker
    pool.allocator.allocate("a", 7)
    pool.allocator.allocate("b", 13)
    meta = pool.allocator.kv_metadata(["a", "b"])
    for layer in range(2):  # fill both sequences' pages with random K/V
        pool.k_cache(layer).copy_(torch.randn_like(pool.k_cache(layer), dtype=torch.float32))
        pool.v_cache(layer).copy_(torch.randn_like(pool.v_cache(layer), dtype=torch.float32))
    q = torch.randn(2, 2, 16).bfloat16()
    kernel, _ = client.wait(client.submit_decode(1, q, *meta, method="kernel"), timeout=30)
    sdpa, _ = client.wait(client.submit_decode(1, q, *meta, method="sdpa"), timeout=30)
    for row, rid in enumerate(["a", "b"]):
        n = pool.allocator.seq_len(rid)
        k = pool.k_cache(1)[pool.allocator.pages(rid)].reshape(-1, 1, 16)[:n]
        v = pool.v_cache(1)[pool.allocator.pages(rid)].reshape(-1, 1, 16)[:n]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[row].unsqueeze(1).unsqueeze(0), k.movedim(0, 1).unsqueeze(0), v.movedim(0, 1).unsqueeze(0),
            enable_gqa=True)[0, :, 0]
        assert torch.equal(sdpa[row], want)  # bit for bit: the same SDPA call
    torch.testing.assert_close(sdpa.float(), kernel.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(WorkerError, match="unknown attention method"):
        client.wait(client.submit_decode(1, q, *meta, method="magic"), timeout=30)


PARENT = textwrap.dedent("""
    import time
    from omniserve_sgl.kv import BEKVPool, BEKVPoolSpec
    from omniserve_sgl.worker import CPUAttentionClient
    pool = BEKVPool.create(BEKVPoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_pages=64))
    client = CPUAttentionClient.start(threads=1)
    client.attach_pool(pool)
    client.create_staging(2, 4, 8, 1)
    print(client.process.pid, client.endpoint, flush=True)
    time.sleep(600)
""")


def test_worker_exits_when_its_parent_is_killed_and_nothing_leaks():
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid, endpoint = parent.stdout.readline().split()
        worker_pid = int(worker_pid)
        os.kill(worker_pid, 0)  # the worker is running
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                break
            if _is_zombie(worker_pid):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker outlived its parent by 15 s")
    finally:
        parent.kill()
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert shm_after == shm_before
    assert not os.path.exists(endpoint[len("ipc://"):])
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"omniserve-{parent.pid}-*"))


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_each_job_runs_once_and_no_reply_is_left_behind(worker):
    """Whichever way the worker sees a job first (doorbell or ZeroMQ), it runs it once: the appended
    token lands once, results match the kernel, and the client keeps no stray replies."""
    client, pool = worker
    pool.allocator.allocate("a", 1)
    q = torch.randn(1, 2, 16).bfloat16()
    for step in range(20):
        pool.allocator.extend("a")
        meta = pool.allocator.kv_metadata(["a"])
        k = torch.full((1, 1, 16), float(step + 1)).bfloat16()
        out, lse = client.wait(client.submit_decode(step % 2, q, *meta, k_new=k, v_new=k), timeout=30)
        ref_out, ref_lse = ops.paged_decode_attention(q, pool.k_cache(step % 2), pool.v_cache(step % 2), *meta,
                                                      kv_layout=pool.spec.kv_layout)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    time.sleep(0.2)
    assert client.ping() < 5
    assert not client._replies  # replies of jobs finished from shared memory were dropped on arrival
    # Busy-polling, the worker takes back-to-back jobs from the doorbells: ZeroMQ wakes it only when
    # it stopped polling (on a loaded 2-core machine it may be descheduled for longer than its spin).
    assert client.job_messages == 20 if client.spin_s == 0 else client.job_messages < 20


def test_no_job_or_result_is_missed_where_polling_stops():
    """Jobs submitted around the moment the worker stops polling (spin 5 ms, pauses of 0-10 ms,
    among jobs sent after 20 ms and jobs sent at once) are all taken up and answered: the doorbell
    or a ZeroMQ message wakes the worker, the done words or a reply wake the client. A job the
    worker missed would wait for its 200 ms idle check."""
    pool = BEKVPool.create(BEKVPoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_pages=8, page_size=4))
    client = CPUAttentionClient.start(threads=1, spin_us=5000)
    try:
        client.attach_pool(pool)
        client.create_staging(num_slots=1, max_rows=4, max_pages=8, num_qo_heads=2)
        pool.allocator.allocate("a", 5)
        meta = pool.allocator.kv_metadata(["a"])
        q = torch.randn(1, 2, 16).bfloat16()
        rng = random.Random(0)
        slow = 0
        for i in range(300):
            time.sleep((20e-3, 0.0, 0.0, rng.uniform(0, 10e-3))[i % 4])
            t = time.perf_counter()
            client.wait(client.submit_decode(0, q, *meta), timeout=30)
            slow += time.perf_counter() - t > 0.15
        # Both ways were taken: jobs after 20 ms by ZeroMQ, and the second of two jobs sent at once
        # by its doorbell (the worker says it polls before it says the first is done).
        assert 75 <= client.job_messages < 300
        assert slow <= 3  # a scheduling hiccup of the VM, not missed jobs
    finally:
        client.close()
        pool.close()


def test_jobs_longer_than_the_spin_come_back_through_shared_memory():
    """A kernel far longer than spin_us: wait() polls beyond the previous job's kernel time, so the
    results come from the done words, not from ZeroMQ replies (each cost 100-300 us on this VM)."""
    spec = BEKVPoolSpec(num_layers=1, num_kv_heads=2, head_dim=64, num_pages=16 * 256, page_size=16)
    pool = BEKVPool.create(spec)
    # As spinning is meant to run: the worker on a core of its own, this thread on the others.
    cores = sorted(os.sched_getaffinity(0))
    split = len(cores) > 1
    client = CPUAttentionClient.start(threads=1, spin_us=200, cores=str(cores[-1]) if split else None)
    if split:
        os.sched_setaffinity(0, cores[:-1])
    try:
        client.attach_pool(pool)
        client.create_staging(num_slots=1, max_rows=16, max_pages=spec.num_pages, num_qo_heads=6)
        for i in range(16):
            pool.allocator.allocate(i, 4096)  # 32 MB of K and V per job
        meta = pool.allocator.kv_metadata(list(range(16)))
        q = torch.randn(16, 6, 64).bfloat16()
        for _ in range(2):  # the first job has no previous kernel time and maps the pool's pages
            client.wait(client.submit_decode(0, q, *meta), timeout=30)
        before, kernel_us = client.result_messages, []
        for _ in range(20):
            client.wait(client.submit_decode(0, q, *meta), timeout=30)
            kernel_us.append(client.last_kernel_us)
        assert sorted(kernel_us)[10] > 5 * 200  # the case the test is about
        # Before the fix all 20 came by ZeroMQ. A kernel more than twice as slow as the one before
        # it still sends its result that way: on this VM, under the full suite, up to 7 of 20 did.
        assert client.result_messages - before <= 10, (client.result_messages - before, kernel_us)
    finally:
        os.sched_setaffinity(0, cores)
        client.close()
        pool.close()


def test_two_clients_share_a_spinning_worker():
    """A second client on the same worker (its own pool and staging area, replaced once before any
    job and once between jobs): jobs of both, interleaved and in flight together, are each answered
    with their own results."""
    spec = BEKVPoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_pages=8, page_size=4)
    pools = [BEKVPool.create(spec), BEKVPool.create(spec)]
    a = CPUAttentionClient.start(threads=1, spin_us=2000, keep_endpoint=True)
    b = CPUAttentionClient(a.endpoint, spin_us=2000, token=a.token)
    try:
        for client, pool in zip((a, b), pools):
            client.attach_pool(pool)
            client.create_staging(num_slots=1, max_rows=2, max_pages=8, num_qo_heads=2)
            pool.allocator.allocate("s", 6)
            pool.k_cache(0).normal_()
            pool.v_cache(0).normal_()
        b.create_staging(num_slots=2, max_rows=2, max_pages=8, num_qo_heads=2)  # replaces b's first area
        metas = [pool.allocator.kv_metadata(["s"]) for pool in pools]
        for i in range(50):
            if i == 25:  # the client's cached slot views and staged metadata go with the old area
                b.create_staging(num_slots=1, max_rows=2, max_pages=8, num_qo_heads=2)
            qs = [torch.randn(1, 2, 16).bfloat16() for _ in range(2)]
            jobs = [c.submit_decode(0, q, *m) for c, q, m in zip((a, b), qs, metas)]
            for client, job, q, meta, pool in zip((a, b), jobs, qs, metas, pools):
                out, lse = client.wait(job, timeout=30)
                ref_out, ref_lse = ops.paged_decode_attention(q, pool.k_cache(0), pool.v_cache(0), *meta,
                                                              kv_layout=spec.kv_layout)
                assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        assert b.ping() < 5 and a.alive()
    finally:
        b.close()
        a.close()
        for pool in pools:
            pool.close()


def test_only_the_client_that_started_the_worker_is_answered():
    """The socket lives in a directory only this user can enter, and the worker answers a peer only
    after a Hello with the token it was started with: another process that reaches the socket,
    without the token or with a wrong one, gets nothing done."""
    a = CPUAttentionClient.start(threads=1, keep_endpoint=True)
    try:
        path = a.endpoint[len("ipc://"):]
        assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        intruder = textwrap.dedent(f"""
            import zmq
            from omniserve_sgl.worker import protocol as P
            sock = zmq.Context().socket(zmq.DEALER)
            sock.connect({a.endpoint!r})
            for msg in (P.Ping(1), P.Shutdown(2), P.Hello(3, "0" * 32), P.Detach(4, "any"), P.Hello(5, "é")):
                sock.send(P.encode(msg))
                assert sock.poll(10000), "no reply"
                reply = P.decode(sock.recv())
                assert reply.seq == msg.seq and not reply.ok, reply
                print(reply.error)
        """)
        out = subprocess.run([sys.executable, "-c", intruder], check=False, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "send Hello with its token first" in out.stdout
        assert a.ping() < 5 and a.alive()  # the Shutdown was not obeyed
    finally:
        a.close()


def test_no_socket_file_is_left_once_the_client_is_connected():
    a = CPUAttentionClient.start(threads=1)
    try:
        path = a.endpoint[len("ipc://"):]
        assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
        assert a.ping() < 5  # the connection outlives the file
    finally:
        a.close()
