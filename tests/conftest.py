"""The test layers and the one-server-at-a-time rule.

Each test directory is a layer with a marker of the same meaning (registered in pyproject.toml):
``kernel`` (C++ ops), ``worker`` (the CPU attention worker process), ``unit`` (pure Python, no
server), ``serving`` (a real SGLang server). ``pytest -m "not serving"`` runs the fast layers.

On 2 cores a second SGLang server takes CPU from the one under test, so a watcher thread samples
this run's processes and a test during which two servers were alive fails in its teardown (and a
server overlap outside any test fails the run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

LAYERS = ("kernel", "worker", "unit", "serving", "soak")  # directories under tests/, and their markers
TESTS = Path(__file__).parent
SERVER_MARK = "sglang.launch_server"


def pytest_collection_modifyitems(items):
    for item in items:
        layer = item.path.relative_to(TESTS).parts[0]
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of tests/{{{','.join(LAYERS)}}}/")
        item.add_marker(layer)


def live_servers() -> list[psutil.Process]:
    """SGLang server launchers below this pytest process, each server once: SGLang's own children
    are spawned interpreters whose command lines do not name the launcher, and a child a launcher
    forks (its command line is the launcher's until it execs, or for good) belongs to that server."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if SERVER_MARK in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:  # exited while we looked
            pass
    pids = {p.pid for p in found}
    return [p for p in found if _ppid(p) not in pids]


def _ppid(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.Error:
        return None


class _ServerWatch:
    """Samples the live servers every ``period`` s; remembers each overlap with the test running then."""

    def __init__(self, period: float = 0.2):
        self.period, self.current = period, "(between tests)"
        self.overlaps: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-watch", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.period):
            servers = live_servers()
            if len(servers) > 1 and self.current not in self.overlaps:
                cmds = "\n".join("  " + " ".join(p.cmdline()[:12]) for p in servers)
                self.overlaps[self.current] = f"{len(servers)} SGLang servers alive at once:\n{cmds}"

    def stop(self):
        self._stop.set()
        self._thread.join()


_watch: _ServerWatch | None = None


def pytest_sessionstart(session):
    global _watch
    _watch = _ServerWatch()


@dataclass(frozen=True)
class Profile:
    """``python -m omniserve_sgl.profile`` on the default model: the file, its mtime, what it printed."""

    path: Path
    mtime_ns: int
    stdout: str


@pytest.fixture(scope="session")
def latency_profile(tmp_path_factory) -> Profile:
    """The latency model profiled once per test run by the user's command (one server, stopped
    before the fixture returns)."""
    path = tmp_path_factory.mktemp("profile") / "latency.json"
    res = subprocess.run([sys.executable, "-m", "omniserve_sgl.profile", "--out", str(path)],
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return Profile(path, path.stat().st_mtime_ns, res.stdout)


@pytest.fixture(scope="session", autouse=True)
def profile_cache(tmp_path_factory) -> Path:
    """Latency-model profiles of this run's servers go to a fresh cache (shared by the servers of
    one setup), not to the user's: each run profiles what it serves."""
    path = tmp_path_factory.mktemp("profile-cache")
    os.environ["OMNISERVE_CACHE_DIR"] = str(path)
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _watch.current = item.nodeid
    try:
        return (yield)
    finally:
        _watch.current = "(between tests)"


@pytest.fixture(autouse=True)
def _environment_unchanged():
    """A test that leaves omniserve's config in this process's environment would hand it to every
    server started later (its children inherit the environment)."""
    from omniserve_sgl.config import ENV_VAR

    before = os.environ.get(ENV_VAR)
    yield
    if os.environ.get(ENV_VAR) != before:
        pytest.fail(f"the test left {ENV_VAR}={os.environ.get(ENV_VAR)!r} in the environment")


@pytest.fixture(autouse=True)
def _one_server_at_a_time(request):
    yield
    if msg := _watch.overlaps.get(request.node.nodeid):
        pytest.fail(f"keep at most one SGLang server alive in tests: {msg}")


def pytest_sessionfinish(session, exitstatus):
    _watch.stop()
    if _watch.overlaps and session.exitstatus == 0:
        for where, msg in _watch.overlaps.items():
            print(f"\n{where}: {msg}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
