"""The hook's connection to the daemon under load (issue 9): a full listen queue is waited for
within the accept deadline, and "start the daemon" is said only when no daemon is there. No
daemon process: a plain listening socket stands for it."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from vfio_hookd import qemu_hook
from vfio_hookd.qemu_hook import HookFailure, request

pytestmark = pytest.mark.unit


@pytest.fixture
def full_listener(tmp_path):
    """A listening socket with a backlog of 1, its queue filled; yields (path, listener)."""
    path = str(tmp_path / "d.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fillers = []
    for _ in range(16):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            break
        fillers.append(c)
    else:
        pytest.fail("the listen queue never filled")
    yield path, listener
    for c in fillers:
        c.close()
    listener.close()


def test_a_full_queue_is_waited_for_until_the_daemon_accepts(full_listener):
    path, listener = full_listener

    def daemon():   # busy for 0.5 s, then drains the queue and answers every request
        time.sleep(0.5)
        listener.settimeout(10)
        for _ in range(8):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(0.3)   # the fillers send nothing
                try:
                    line = conn.makefile("rb").readline()
                except socket.timeout:
                    continue
                if line:
                    conn.sendall(json.dumps({"ok": True, "result": json.loads(line)}).encode() + b"\n")
                    return
    t = threading.Thread(target=daemon)
    t.start()
    t0 = time.monotonic()
    try:
        assert request({"op": "ping"}, path=path) == {"op": "ping"}
    finally:
        t.join(15)
    assert 0.4 < time.monotonic() - t0 < 10


def test_a_queue_that_stays_full_fails_at_the_accept_deadline(full_listener, monkeypatch):
    path, _listener = full_listener
    monkeypatch.setattr(qemu_hook, "ACCEPT_TIMEOUT_S", 0.6)
    t0 = time.monotonic()
    with pytest.raises(HookFailure) as exc:
        request({"op": "ping"}, path=path)
    took = time.monotonic() - t0
    assert exc.value.code == "DAEMON_UNREACHABLE" and "queue stayed full" in exc.value.message
    assert "systemctl enable" not in exc.value.message
    assert 0.5 < took < 5


def test_start_the_daemon_is_said_when_no_daemon_is_there(tmp_path):
    with pytest.raises(HookFailure) as exc:       # no socket file
        request({"op": "ping"}, path=str(tmp_path / "absent.sock"))
    assert exc.value.code == "DAEMON_UNREACHABLE"
    assert "systemctl enable --now vfio-hookd.service" in exc.value.message
    path = str(tmp_path / "stale.sock")           # a file nobody listens on: ECONNREFUSED
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert os.path.exists(path)
    with pytest.raises(HookFailure) as exc:
        request({"op": "ping"}, path=path)
    assert "Connection refused" in exc.value.message
    assert "systemctl enable --now vfio-hookd.service" in exc.value.message


def test_an_answer_sent_before_the_request_is_read_is_reported(tmp_path):
    """A daemon that refuses at once (DAEMON_BUSY) may close before the hook has sent."""
    path = str(tmp_path / "d.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        conn, _ = listener.accept()
        busy = {"ok": False, "error": {"code": "DAEMON_BUSY", "message": "m"}}
        conn.sendall(json.dumps(busy).encode() + b"\n")
        conn.close()
        c.close()
        # the same through request(): answer and close before reading
        done = threading.Event()

        def refuse():
            listener.settimeout(10)
            conn, _ = listener.accept()
            conn.sendall(json.dumps(busy).encode() + b"\n")
            conn.close()
            done.set()
        t = threading.Thread(target=refuse)
        t.start()
        with pytest.raises(HookFailure) as exc:
            request({"op": "ping", "pad": "x" * 300000}, path=path)
        t.join(10)
        assert exc.value.code == "DAEMON_BUSY"
    finally:
        listener.close()
