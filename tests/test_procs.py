"""Finding and ending the processes that hold a GPU's device nodes (fd and mmap holders)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vfio_hookd import procs
from vfio_hookd.host import Host

pytestmark = pytest.mark.unit

MMAP_HOLDER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096)
os.close(fd)            # only the mapping holds the node now
print("ready", flush=True)
sys.stdin.read()
"""


def _node(tmp_path):
    root = tmp_path / "host"
    (root / "dev/dri").mkdir(parents=True)
    node = root / "dev/dri/card0"
    node.write_bytes(b"\0" * 4096)
    return Host(str(root)), "/dev/dri/card0"


def test_fd_holder_is_found_with_pid_command_and_node(tmp_path):
    host, node = _node(tmp_path)
    with open(host.path(node)) as f:
        p = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        found = procs.find_holders(host, [node, "/dev/dri/absent"])
        assert [(h.pid, h.command, h.node) for h in found] == [(p.pid, "sleep", node)]
    finally:
        p.kill()
        p.wait()
    assert procs.find_holders(host, [node]) == []


def test_mmap_holder_is_found(tmp_path):
    host, node = _node(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", MMAP_HOLDER, host.path(node)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert [h.pid for h in procs.find_holders(host, [node])] == [p.pid]
    finally:
        p.kill()
        p.wait()


def test_terminate_ends_with_sigterm_then_sigkill(tmp_path):
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                                 "print('ready', flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen(["sleep", "60"])
    assert stubborn.stdout.readline().strip() == "ready"
    left = procs.terminate([stubborn.pid, polite.pid], timeout_s=0.3)
    assert left == []
    assert polite.wait(timeout=5) == -15
    assert stubborn.wait(timeout=5) == -9


def test_terminate_waits_once_for_all_holders(monkeypatch):
    """Three processes that ignore SIGTERM: one wait for all of them (not one per process),
    then SIGKILL to all at once and one more wait: at most twice the deadline in all."""
    code = ("import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "print('ready', flush=True); sys.stdin.read()")
    stubborn = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(3)]
    for p in stubborn:
        assert p.stdout.readline().strip() == "ready"
    waits = []
    real = procs._wait_all

    def counted(pidfds, pids, timeout_s):
        waits.append((sorted(pids), timeout_s))
        return real(pidfds, pids, timeout_s)
    monkeypatch.setattr(procs, "_wait_all", counted)
    pids = sorted(p.pid for p in stubborn)
    try:
        assert procs.terminate(pids, timeout_s=0.3) == []
        assert waits == [(pids, 0.3), (pids, 0.3)]
        assert [p.wait(timeout=5) for p in stubborn] == [-9, -9, -9]
    finally:
        for p in stubborn:
            if p.poll() is None:
                p.kill()
                p.wait()
