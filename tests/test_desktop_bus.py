"""The desktop handed over and given back over D-Bus (dbus tier): the product's logind client
and user-instance client (peer to peer on ``/run/user/UID/systemd/private``) against the
simulated logind (:mod:`testbed.sim.logind`) and systemd on a private bus; the daemon and the
hook on the desktop host; ``status --json``'s desktop check; ``DESKTOP_NOT_BACK``."""

from __future__ import annotations

import json
import time

import pytest

from conftest import SimWorld
from test_daemon_hook import run_cli, run_hook, start_daemon
from test_desktop import AUDIO, VARIANTS, audio_up, seat0, seat0_becomes
from vfio_hookd import errors
from vfio_hookd.errors import HookdError
from vfio_hookd.pci import current_driver
from vfio_hookd.usermgr import UserManager

pytestmark = pytest.mark.dbus


@pytest.fixture
def desk(dirs, monkeypatch):
    made = []

    def make(variant: str, **kw) -> SimWorld:
        w = SimWorld(dirs, variant, bus=True, **kw)
        made.append(w)
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", w.address)
        audio_up(w)
        return w
    yield make
    for w in made:
        w.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_desktop_is_handed_over_and_comes_back_over_dbus(desk, variant):
    w = desk(variant)
    w.profile()
    before = seat0(w)
    remote = [(s.id, s.leader) for s in w.logind.sessions() if not s.seat]
    t0 = time.monotonic()
    rec = w.machine.prepare("win11")
    assert time.monotonic() - t0 < 10.0          # not UserStopDelaySec
    assert all(current_driver(w.host, a) == "vfio-pci" for a in w.devices)
    assert seat0_becomes(w, []) == []
    assert [(s.id, s.leader) for s in w.logind.sessions() if not s.seat] == remote
    alice = w.logind.user_manager(1000)
    try:
        assert alice.active_state("syncthing.service") == "active"
        assert alice.active_state("pipewire.service") == "inactive"
    finally:
        alice.close()
    assert rec.step("sessions").status == "done"
    rec = w.machine.release("win11")
    assert rec.desktop_check["check"] == "back"
    if variant == "desktop-wayland":
        assert seat0(w) == [("_greetd", "greeter", "tty")]
    else:
        assert seat0_becomes(w, before) == before


def test_root_talks_to_a_users_instance_peer_to_peer(desk):
    w = desk("desktop-x11")
    path = w.host.path("/run/user/1000/systemd/private")
    mgr = UserManager(path, 1000, 5.0)
    try:
        pid = next(h.pid for h in __import__("vfio_hookd.procs", fromlist=["x"]).find_holders(
            w.host, AUDIO) if h.command == "wireplumber")
        assert mgr.unit_of_pid(pid) == "wireplumber.service"
        assert mgr.triggered_by("pipewire.service") == ["pipewire.socket"]
        mgr.run_jobs("StopUnit", ["pipewire.socket", "pipewire.service"], 5)
        assert mgr.active_state("pipewire.service") == "inactive"
        mgr.run_jobs("StartUnit", ["pipewire.socket", "pipewire.service"], 5)
        assert mgr.active_state("pipewire.service") == "active"
        with pytest.raises(HookdError) as exc:
            mgr.run_jobs("StopUnit", ["nosuch.service"], 5)
        assert exc.value.code == errors.UNIT_FAILED
    finally:
        mgr.close()


def test_a_desktop_that_does_not_come_back_over_dbus(desk):
    w = desk("desktop-x11", edit_desktop=lambda c: c.update(timing={"session_start": 60.0}))
    w.profile(extra="deadlines: {desktop_back: 0.5}\n")
    w.machine.prepare("win11")
    assert seat0_becomes(w, []) == []      # the VM runs: alice's X session has ended
    with pytest.raises(HookdError) as exc:
        w.machine.release("win11")
    assert exc.value.code == errors.DESKTOP_NOT_BACK
    assert "seat0 session of alice (user, x11)" in exc.value.message
    assert w.machine.records.load("win11").phase == "idle"


def test_daemon_and_hook_on_the_wayland_desktop(desk, tmp_path):
    w = desk("desktop-wayland")
    w.profile()
    daemon = start_daemon(w, tmp_path)
    try:
        r = run_hook("win11", "prepare", "begin", "-")
        assert (r.returncode, r.stderr) == (0, ""), daemon.read_log()
        vm = json.loads(run_cli("status", "--json").stdout)["vms"]["win11"]
        assert vm["phase"] == "prepared" and vm["desktop"]["check"] == "none"
        names = [s["name"] for s in vm["steps"]]
        assert names[names.index("units"):][:3] == ["units", "sessions", "holders"]
        r = run_hook("win11", "release", "end", "destroyed")
        assert (r.returncode, r.stderr) == (0, ""), daemon.read_log()
        vm = json.loads(run_cli("status", "--json").stdout)["vms"]["win11"]
        assert vm["desktop"]["check"] == "back" and vm["desktop"]["missing"] == []
        assert vm["desktop"]["after"] == "release" and vm["desktop"]["seconds"] >= 0
        text = run_cli("status").stdout
        assert "desktop back after" in text
    finally:
        assert daemon.stop() == 0, daemon.read_log()
