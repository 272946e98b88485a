"""Start and stop a real SGLang server (``python -m sglang.launch_server``) in its own process
group: used by the main job, the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import requests


def metric_samples(url: str, *names: str) -> list:
    """Every sample named one of ``names`` on the server's ``/metrics`` (one fetch), parsed with
    prometheus_client: ``Sample`` tuples with ``name``, ``labels`` and ``value``.

    Raises:
        requests.RequestException: the server did not answer.
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name in names]


def metric_sum(url: str, name: str, **labels: str) -> float | None:
    """Sum of every sample named ``name`` (e.g. ``omniserve_worker_restarts_total``, or a
    histogram's ``..._count``) with these ``labels`` (``direction="to_cpu"``) on the server's
    ``/metrics``; ``None`` when there is none.

    Raises:
        requests.RequestException: the server did not answer.
    """
    values = [s.value for s in metric_samples(url, name) if labels.items() <= s.labels.items()]
    return sum(values) if values else None


def histogram(url: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of Prometheus histogram ``name`` on the server's ``/metrics``:
    ``{upper bound: count}``, ``inf`` included; empty when the histogram is not there.

    Raises:
        requests.RequestException: the server did not answer.
    """
    out: dict[float, float] = {}
    for s in metric_samples(url, f"{name}_bucket"):
        le = float(s.labels["le"])
        out[le] = out.get(le, 0.0) + s.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGLangServer:
    """A running SGLang server. ``url`` is its base URL; ``log`` its combined stdout/stderr file.

    On a machine without CUDA the server runs on SGLang's CPU device (``SGLANG_USE_CPU_ENGINE=1
    --device cpu``) with a 16K-token KV cache, as SGLang's CPU path needs. It always runs with
    ``--sleep-on-idle``: an idle SGLang scheduler otherwise busy-polls a whole core, which on a
    small machine is taken from whatever runs beside it (the CPU attention worker, another test).
    The scheduler then blocks on its ZeroMQ sockets while idle and wakes on the next request.
    """

    def __init__(self, model_path: str | Path, *args: str, port: int | None = None,
                 startup_timeout: float = 600.0, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--port", str(self.port), "--log-level", "warning", "--sleep-on-idle", *args]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        if not _has_cuda():
            full_env["SGLANG_USE_CPU_ENGINE"] = "1"
            if "--device" not in args:
                cmd += ["--device", "cpu"]
            if "--max-total-tokens" not in args:
                cmd += ["--max-total-tokens", "16384"]
        self.log = Path(tempfile.mkstemp(prefix="sglang-", suffix=".log")[1])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"SGLang server not ready after {timeout:.0f} s:\n{self.tail()}")

    def flush_cache(self) -> None:
        """Empties the radix cache (``/flush_cache``), so the next prefill computes the whole prompt.

        Raises:
            RuntimeError: the server kept refusing for 10 s (it refuses while requests run).
        """
        for _ in range(100):
            if requests.post(f"{self.url}/flush_cache", timeout=60).status_code == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("the server refused /flush_cache for 10 s")

    def server_info(self, *keys: str) -> dict:
        """The server's arguments and state as ``/server_info`` reports them (only ``keys``
        when given; a key it lacks is left out).

        Raises:
            requests.RequestException: the server did not answer.
        """
        info = requests.get(f"{self.url}/server_info", timeout=30).json()
        return {k: info[k] for k in keys if k in info} if keys else info

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM to the whole process group (SGLang's launcher stops its children), SIGKILL after 30 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
