"""``python -m omniserve_sgl.worker --endpoint ipc:///tmp/x.sock [--threads N] [--cores 0-3]``.

Thread count and CPU affinity are applied before torch (and its OpenMP pool) is imported, so the
kernel threads are pinned one per core in the order given.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from omniserve_sgl.config import parse_cores


def _exit_on_signal(*_) -> None:
    raise SystemExit(0)  # unwinds through Worker.close(), which unmaps the shared segments


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m omniserve_sgl.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True, help="ZeroMQ address to bind, e.g. ipc:///tmp/omniserve.sock")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: one per allowed core)")
    ap.add_argument("--cores", default=None, help="CPU cores to run on, e.g. '0-3,6'")
    ap.add_argument("--spin-us", type=float, default=0.0,
                    help="busy-poll for the next job this long after each one (default 0: block on ZeroMQ)")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer the parent")
    args = ap.parse_args()

    if args.cores:
        cores = parse_cores(args.cores)
        os.sched_setaffinity(0, cores)
        os.environ.setdefault("GOMP_CPU_AFFINITY", " ".join(map(str, cores)))
    threads = args.threads or len(os.sched_getaffinity(0))
    if threads <= 0:
        ap.error("--threads must be positive")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    logging.basicConfig(level=logging.INFO, format="[omniserve worker %(process)d] %(message)s")

    from omniserve_sgl.worker.server import run_worker  # imports torch: after the thread settings

    if args.spin_us < 0:
        ap.error("--spin-us must be >= 0")
    run_worker(args.endpoint, args.parent_pid, threads, args.spin_us)


if __name__ == "__main__":
    main()
