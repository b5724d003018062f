"""The daemon under load (issue 9): it never dies of it.

Each test starts the daemon as a process on the simulated host (:class:`testbed.daemon.
DaemonProcess`) and floods its socket; every loop is bounded in count and time, and every
client socket is closed by the test.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time

import pytest

from test_daemon_hook import run_cli, run_hook
from testbed.daemon import DaemonProcess

pytestmark = pytest.mark.dbus


@pytest.fixture
def world(bus_world):
    return bus_world


def _sock_path(world) -> str:
    return os.path.join(world.dirs["run"], "vfio-hookd.sock")


def _wait_for_log(d: DaemonProcess, text: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in d.read_log():
        assert time.monotonic() < deadline, f"no {text!r} in the daemon's log: {d.read_log()}"
        assert d.running(), "the daemon died: " + d.read_log()
        time.sleep(0.05)


def _ping(path: str) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        s.connect(path)
        s.sendall(b'{"op": "ping"}\n')
        return json.loads(s.makefile().readline())
    finally:
        s.close()


def _flood(path: str, n: int, wait_s: float | None = None) -> list[socket.socket]:
    """Up to ``n`` idle connections (they send nothing).

    :param wait_s: None: each ``connect`` is non-blocking, those the full listen queue refuses
        are dropped and the flood goes on; else each ``connect`` waits up to ``wait_s`` (s) for
        room in the queue, and the flood ends at the first that does not get it (the daemon
        stopped taking connections)."""
    out = []
    for _ in range(n):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if wait_s is None:
            c.setblocking(False)
        else:
            c.settimeout(wait_s)
        try:
            c.connect(path)
        except (socket.timeout, BlockingIOError):
            c.close()
            if wait_s is None:
                continue
            break
        out.append(c)
    return out


def test_the_daemon_survives_running_out_of_file_descriptors(world, tmp_path):
    """EMFILE on accept (headroom off: as when something else took the descriptors)."""
    argv = [sys.executable, "-m", "testbed.daemon", "--root", world.root, "--fd-headroom", "0"]
    d = DaemonProcess(argv=argv, log_path=tmp_path / "daemon.log", ready_timeout_s=20)
    flood: list[socket.socket] = []
    try:
        path = _sock_path(world)
        # GLib aborts the process when it finds no descriptor for a D-Bus call's wakeup
        # (g_error): the fds are lowered once the warm-up's connection is made
        _wait_for_log(d, "connected to systemd")
        in_use = len(os.listdir(f"/proc/{d.pid}/fd"))
        spare = 6
        _soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (in_use + spare, hard))
        flood = _flood(path, 4 * (in_use + spare))
        assert len(flood) > spare
        _wait_for_log(d, "cannot accept a connection: Too many open files")
        assert d.running()
        for c in flood:            # the daemon's threads see EOF and close their ends
            c.close()
        flood = []
        reply = _ping(path)
        assert reply["ok"] and reply["result"]["pid"] == d.pid, reply
        _wait_for_log(d, "accepting connections again")
    finally:
        for c in flood:
            c.close()
        assert d.stop() == 0, d.read_log()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _soft_limit(pid: int) -> int:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


def test_a_connection_flood_leaves_descriptors_for_the_prepare_s_dbus_calls(world, tmp_path):
    """RLIMIT_NOFILE lowered to what is open + FD_HEADROOM + 8, then far more idle connections
    than that: the daemon stops accepting with FD_HEADROOM descriptors still free (GLib aborts
    the process on a D-Bus call that finds none), stays alive, and a prepare that needs systemd
    on D-Bus, sent by the hook while the flood still holds its connections, is answered (its
    connection is taken as soon as one idle connection ends) and succeeds; so does the
    release."""
    from vfio_hookd.server import FD_HEADROOM
    world.profile()
    argv = [sys.executable, "-m", "testbed.daemon", "--root", world.root,
            "--request-timeout", "2"]
    d = DaemonProcess(argv=argv, log_path=tmp_path / "daemon.log", ready_timeout_s=20)
    flood: list[socket.socket] = []
    try:
        path = _sock_path(world)
        _wait_for_log(d, "connected to systemd")
        _soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (_open_fds(d.pid) + FD_HEADROOM + 8, hard))
        flood = _flood(path, 3 * FD_HEADROOM, wait_s=1.0)
        _wait_for_log(d, "file descriptors free (RLIMIT_NOFILE); accepting no connection")
        assert d.running()
        assert _soft_limit(d.pid) - _open_fds(d.pid) >= FD_HEADROOM
        assert "Too many open files" not in d.read_log()
        # the prepare waits in the queue behind the flood; idle connections end after 2 s
        r = run_hook("win11", "prepare", "begin", "-", stdin=_domain_xml(world), timeout=120)
        assert r.returncode == 0, (r.stderr, d.read_log()[-3000:])
        assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "vfio-pci"
        assert d.running() and "Too many open files" not in d.read_log()
        for c in flood:
            c.close()
        flood = []
        r = run_hook("win11", "release", "end", "-", timeout=120)
        assert r.returncode == 0, (r.stderr, d.read_log()[-3000:])
        assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "nvidia"
    finally:
        for c in flood:
            c.close()
        assert d.stop() == 0, d.read_log()


def test_a_request_without_descriptors_to_spare_is_refused_busy(world, tmp_path):
    """A prepare accepted while the process has fewer than FD_PER_REQUEST descriptors free
    (headroom off, the limit lowered under it) is answered DAEMON_BUSY before any D-Bus call,
    the host untouched, and the daemon lives on."""
    from vfio_hookd.server import FD_PER_REQUEST
    world.profile()
    argv = [sys.executable, "-m", "testbed.daemon", "--root", world.root, "--fd-headroom", "0"]
    d = DaemonProcess(argv=argv, log_path=tmp_path / "daemon.log", ready_timeout_s=20)
    try:
        _wait_for_log(d, "connected to systemd")
        _soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (_open_fds(d.pid) + FD_PER_REQUEST // 2,
                                                         hard))
        before = world.snapshot()
        r = run_hook("win11", "prepare", "begin", "-", stdin=_domain_xml(world), timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("DAEMON_BUSY: "), r.stderr
        assert "file descriptors free" in r.stderr
        assert world.snapshot() == before
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (_soft, hard))
        assert _ping(_sock_path(world))["ok"]
    finally:
        assert d.stop() == 0, d.read_log()


def _domain_xml(world) -> str:
    from testbed.domains import tiny_domain_xml
    return tiny_domain_xml("win11", ("0000:01:00.0", "0000:01:00.1"))


def test_connections_beyond_the_cap_are_told_the_daemon_is_busy(world, tmp_path):
    world.profile()
    argv = [sys.executable, "-m", "testbed.daemon", "--root", world.root,
            "--max-connections", "2", "--request-timeout", "8"]
    d = DaemonProcess(argv=argv, log_path=tmp_path / "daemon.log", ready_timeout_s=20)
    idle: list[socket.socket] = []
    try:
        path = _sock_path(world)
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(30)
            c.connect(path)
            idle.append(c)
        reply = _ping(path)
        assert reply["ok"] is False and reply["error"]["code"] == "DAEMON_BUSY", reply
        assert "serving 2 connections" in reply["error"]["message"]
        r = run_hook("win11", "prepare", "begin", "-")
        assert r.returncode == 1 and r.stderr.startswith("DAEMON_BUSY: "), r.stderr
        r = run_cli("status", root=world.root)
        assert r.returncode == 29 and r.stderr.startswith("DAEMON_BUSY: "), r.stderr
        assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "nvidia"
        # the idle connections are closed after the request timeout, with an answer
        for c in idle:
            msg = json.loads(c.makefile().readline())
            assert msg["error"]["code"] == "BAD_REQUEST" and "within 8 s" in msg["error"]["message"]
            assert c.recv(1) == b""
        assert _ping(path)["ok"]
        assert "refusing connections" in d.read_log()
    finally:
        for c in idle:
            c.close()
        assert d.stop() == 0, d.read_log()


def test_the_daemon_survives_a_notify_socket_nobody_listens_on(world, tmp_path):
    import signal
    import subprocess

    from testbed import child_env
    from testbed.procs import stop as stop_process
    dead = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(dead)
    s.close()
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "testbed.daemon", "--root", world.root],
                                env=child_env(None, NOTIFY_SOCKET=dead), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "cannot send READY=1" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert _ping(_sock_path(world))["ok"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "cannot send STOPPING=1" in log.read_text()
    finally:
        stop_process(proc, 10)
