"""The inhibit step over D-Bus (dbus tier): the product's logind client gets a real descriptor
through the bus from the simulated logind (:mod:`testbed.sim.logind`, a pipe end in the reply's
``UnixFDList``), which lists the lock while that descriptor is open; the daemon as a process
holds the lock from prepare to release and takes it again when it starts anew."""

from __future__ import annotations

import json
import os

import pytest

from conftest import SimWorld
from test_daemon_hook import run_cli, start_daemon
from test_desktop import audio_up
from testbed.sim import faults
from vfio_hookd import errors
from vfio_hookd.errors import HookdError
from vfio_hookd.logind import Logind
from vfio_hookd.steps.inhibit import WHO

pytestmark = pytest.mark.dbus


@pytest.fixture
def desk(dirs, monkeypatch):
    w = SimWorld(dirs, "desktop-x11", bus=True)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", w.address)
    audio_up(w, timeout_s=30)   # the machine may be loaded
    yield w
    w.close()


def locks(world) -> list[tuple]:
    return [(i.what, i.who, i.mode, i.pid) for i in world.logind.inhibitors()]


def listed_after_close(read, want, timeout_s: float = 5.0):
    """``read()`` once it equals ``want``, else its last value after ``timeout_s`` (s).

    logind drops a lock when its event loop sees the FIFO's writer closed, after the close
    returned, and signals nothing (org.freedesktop.login1(5)): polled with a deadline."""
    import time
    end = time.monotonic() + timeout_s
    while True:
        got = read()
        if got == want or time.monotonic() > end:
            return got
        time.sleep(0.01)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fd_kind(name: str) -> str:
    """What descriptor ``name`` of this process is (``pipe:[N]``, ``socket:[N]``, a path), or
    ``""`` if it closed meanwhile."""
    try:
        return os.readlink(f"/proc/self/fd/{name}")
    except FileNotFoundError:
        return ""


def test_the_lock_comes_over_the_bus_and_ends_with_its_descriptor(desk):
    lg = Logind(desk.address)
    try:
        warm = lg.inhibit("sleep", WHO, "warm-up", "block")   # the connections are up now
        assert len(locks(desk)) == 1
        fds = open_fds()
        for _ in range(20):
            fd = lg.inhibit("sleep:idle", WHO, "a test", "block")
            assert not os.get_inheritable(fd)
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
            assert locks(desk)[-1] == ("sleep:idle", WHO, "block", os.getpid())
            assert [i.uid for i in lg.inhibitors()] == [os.getuid()] * 2
            os.close(fd)
            assert listed_after_close(lambda: [i.why for i in lg.inhibitors()],
                                      ["warm-up"]) == ["warm-up"]
        # nothing leaked from the replies' descriptor lists: no new pipe, the kind logind's
        # inhibitor descriptors are (other threads of this process, e.g. an earlier test's bus
        # connection being finalised, may close or open sockets and eventfds meanwhile)
        assert [p for p in (fd_kind(x) for x in open_fds() - fds) if p.startswith("pipe:")] == []
        os.close(warm)
        assert listed_after_close(lambda: locks(desk), []) == []
    finally:
        lg.close()


@pytest.mark.parametrize("args,needle", [
    (("sleep", "block"), "Access denied"),                         # the injected refusal
    (("sleep", "hold"), "Unknown inhibitor mode hold"),
    (("idle", "delay"), "Delay inhibitors only supported for shutdown and sleep"),
    (("nap", "block"), "Invalid what specification nap"),
])
def test_a_refused_lock_is_inhibit_failed(desk, args, needle):
    what, mode = args
    if needle == "Access denied":
        faults.inject(desk.root, "inhibit", "sleep", "fail", count=1)
    lg = Logind(desk.address)
    try:
        with pytest.raises(HookdError) as exc:
            lg.inhibit(what, WHO, "a test", mode)
    finally:
        lg.close()
    assert exc.value.code == errors.INHIBIT_FAILED
    assert exc.value.message == (f"systemd-logind did not give the {what} inhibitor lock "
                                 f"(mode {mode}): {needle}")
    assert locks(desk) == []


def test_without_logind_on_the_bus(bus_world):
    """The NVIDIA host's bus has systemd but no logind."""
    lg = Logind(bus_world.address)
    try:
        with pytest.raises(HookdError) as exc:
            lg.inhibit("sleep", WHO, "a test", "block")
        assert exc.value.code == errors.INHIBIT_FAILED
        assert "systemd-logind is not running (nothing owns org.freedesktop.login1" in \
            exc.value.message
        assert lg.inhibitors() == []
    finally:
        lg.close()


def _status(desk) -> dict:
    r = run_cli("status", "--json", "win11")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["vms"]["win11"]


def test_the_daemon_holds_the_lock_and_takes_it_again_after_a_restart(desk, tmp_path):
    desk.profile(extra="inhibit: sleep\n")
    before = desk.snapshot()
    d = start_daemon(desk, tmp_path)
    try:
        r = run_cli("prepare", "win11")
        assert r.returncode == 0, r.stderr + d.read_log()
        assert locks(desk) == [("sleep", WHO, "block", d.pid)]
        st = _status(desk)["inhibitor"]
        assert st["held"] is True and st["what"] == "sleep" and st["mode"] == "block"
        r = run_cli("status", "win11")
        assert "  inhibitor sleep (block) since " in r.stdout and "held by the daemon" in r.stdout
    finally:
        assert d.stop() == 0, d.read_log()
    assert locks(desk) == []              # the descriptor closed with the process
    d = start_daemon(desk, tmp_path)      # READY=1 comes after the lock is taken again
    try:
        assert locks(desk) == [("sleep", WHO, "block", d.pid)]
        assert "inhibitor lock sleep (block) taken again at the daemon's start" in d.read_log()
        assert _status(desk)["inhibitor"]["held"] is True
        r = run_cli("release", "win11", "--force")
        assert r.returncode == 0, r.stderr + d.read_log()
        assert locks(desk) == []
        rec = desk.machine.records.load("win11")
        assert rec.step("inhibit").status == "undone" and rec.step("inhibit").notes == []
    finally:
        assert d.stop() == 0, d.read_log()
    assert desk.snapshot()["units"] == before["units"]


def test_a_failed_retake_at_start_is_logged_and_shown(desk, tmp_path):
    desk.profile(extra="inhibit: [sleep, idle]\n")
    desk.machine.prepare("win11")          # this process's lock: it is let go below
    desk.machine.inhibitors.close_all()
    faults.inject(desk.root, "inhibit", "sleep:idle", "fail", count=1)
    d = start_daemon(desk, tmp_path)
    try:
        assert locks(desk) == []
        assert "could not take the inhibitor lock again: INHIBIT_FAILED" in d.read_log()
        st = _status(desk)["inhibitor"]
        assert st["held"] is False and "Access denied" in st["error"]
        assert "NOT held: INHIBIT_FAILED" in run_cli("status", "win11").stdout
        r = run_cli("release", "win11", "--force")
        assert r.returncode == 0, r.stderr + d.read_log()
    finally:
        assert d.stop() == 0, d.read_log()
    note, = desk.machine.records.load("win11").step("inhibit").notes
    assert "not held by this process" in note


def test_a_refused_lock_fails_the_start_through_the_daemon(desk, tmp_path):
    desk.profile(extra="inhibit: sleep\n")
    before = desk.snapshot()
    faults.inject(desk.root, "inhibit", "sleep", "fail", count=1)
    d = start_daemon(desk, tmp_path)
    try:
        r = run_cli("prepare", "win11")
        assert r.returncode == 35, r.stderr
        assert r.stderr.startswith("INHIBIT_FAILED: step inhibit: systemd-logind did not give")
    finally:
        assert d.stop() == 0, d.read_log()
    assert desk.snapshot() == before and locks(desk) == []
