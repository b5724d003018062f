"""A desktop handed over and given back (fast tier: the in-process fakes of systemd and logind
on the simulated desktops of :mod:`testbed.sim.desktops`): seat0 sessions through logind, VT
sessions and their gettys, users' audio services through their systemd instances, logind's
hold on a compositor's devices, and the desktop-back check after release and rollback."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import SimWorld
from testbed.sim import faults
from vfio_hookd import errors, procs
from vfio_hookd.errors import EXIT_STATUS, HookdError
from vfio_hookd.inotify import IN_OPEN, Inotify
from vfio_hookd.pci import current_driver, device_nodes
from vfio_hookd.status import status_from_records

pytestmark = pytest.mark.unit

VARIANTS = ("desktop-x11", "desktop-wayland", "desktop-greeter", "desktop-vt")
AUDIO = ["/dev/snd/controlC1", "/dev/snd/pcmC1D3p"]


def wait_held(world, nodes, command: str, timeout_s: float = 10.0) -> None:
    """Wait (inotify IN_OPEN on ``nodes``) until a process named ``command`` holds one."""
    deadline = time.monotonic() + timeout_s
    with Inotify() as ino:
        for n in nodes:
            ino.add(world.host.path(n), IN_OPEN)
        while not any(h.command == command for h in procs.find_holders(world.host, nodes)):
            assert ino.wait(deadline), f"no {command} on {nodes} within {timeout_s} s"


def audio_up(world, timeout_s: float = 10.0) -> None:
    """Wait until PipeWire and WirePlumber both hold the audio function's nodes: the desktop
    is up. Each open moves snd_hda_intel's refcnt, which the host snapshots compare."""
    for server in ("pipewire", "wireplumber"):
        wait_held(world, AUDIO, server, timeout_s)


def seat0(world) -> list[tuple]:
    return sorted((s.user, s.cls, s.type) for s in world.logind.sessions() if s.seat == "seat0")


def seat0_becomes(world, want: list[tuple], timeout_s: float = 10.0) -> list[tuple]:
    """seat0's sessions once they are ``want`` (woken by logind's signals), or at the deadline
    as they are."""
    import select
    deadline = time.monotonic() + timeout_s
    watch = world.logind.watch()
    try:
        while seat0(world) != want and time.monotonic() < deadline:
            p = select.poll()
            p.register(watch.fileno(), select.POLLIN)
            p.poll(max(1, int((deadline - time.monotonic()) * 1000)))
            watch.clear()
    finally:
        watch.close()
    return seat0(world)


@pytest.fixture
def desk(dirs):
    """``desk(variant, edit_desktop=None)``: a desktop host, its audio servers up."""
    made = []

    def make(variant: str, **kw) -> SimWorld:
        w = SimWorld(dirs, variant, **kw)
        made.append(w)
        audio_up(w)
        return w
    yield make
    for w in made:
        w.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_desktop_is_handed_over_and_comes_back(desk, variant):
    w = desk(variant)
    w.profile()                       # the devices, nothing else
    before = seat0(w)
    remote = [s for s in w.logind.sessions() if not s.seat]
    t0 = time.monotonic()
    rec = w.machine.prepare("win11")
    took = time.monotonic() - t0
    assert took < 10.0                 # UserStopDelaySec (10 s) is not waited out
    assert all(current_driver(w.host, a) == "vfio-pci" for a in w.devices)
    # the DM's sessions that held nothing of the GPU end by themselves (~1 s after its stop:
    # not awaited); none comes back (no getty respawns one)
    assert seat0_becomes(w, []) == []
    # alice's session off seat0 and her lingering service are untouched, sshd too
    assert [s for s in w.logind.sessions() if not s.seat] == remote
    assert w.logind.user_manager(1000).active_state("syncthing.service") == "active"
    assert w.systemd.list_units()["sshd.service"] == "active"
    done = rec.step("sessions").facts["done"]
    stopped = {u for i in done if "uid" in i for u in i["units"]}
    assert {"pipewire.service", "wireplumber.service", "pipewire.socket"} <= stopped
    assert rec.desktop["audio"]["commands"] == ["pipewire", "wireplumber"]

    rec = w.machine.release("win11")
    assert rec.desktop_check["check"] == "back" and rec.desktop_check["after"] == "release"
    if variant == "desktop-wayland":   # greetd: initial_session once per boot, then its greeter
        assert seat0(w) == [("_greetd", "greeter", "tty")]
    else:   # (a session of the display manager's run before may still be closing)
        assert seat0_becomes(w, before) == before
    assert [s for s in w.logind.sessions() if not s.seat] == remote
    st = status_from_records(w.host, w.paths, "win11")["vms"]["win11"]["desktop"]
    assert st["check"] == "back" and st["missing"] == [] and st["seconds"] >= 0


def test_user_services_and_their_sockets_start_again(desk):
    w = desk("desktop-x11")
    w.profile()
    w.machine.prepare("win11")
    mgr = w.logind.user_manager(1000)  # alice's instance runs on: her SSH session
    assert [mgr.active_state(u) for u in ("pipewire.socket", "pipewire.service")] == \
        ["inactive", "inactive"]
    w.machine.release("win11")
    assert [mgr.active_state(u) for u in ("pipewire.socket", "pipewire.service",
                                          "wireplumber.service")] == ["active"] * 3


def test_a_service_whose_socket_listens_comes_back(desk):
    """Why the sockets are stopped too: the model restarts a service whose socket listens."""
    w = desk("desktop-x11")
    mgr = w.logind.user_manager(1000)
    mgr.run_jobs("StopUnit", ["pipewire.service"], 5)
    wait_held(w, AUDIO, "pipewire")
    assert mgr.active_state("pipewire.service") == "active"


def test_vt_session_getty_stopped_and_started_again(desk):
    w = desk("desktop-vt")
    w.profile()
    rec = w.machine.prepare("win11")
    assert rec.step("sessions").facts["done"][0] == {"getty": "getty@tty1.service"}
    assert w.systemd.list_units()["getty@tty1.service"] == "inactive"
    assert seat0(w) == []
    w.machine.release("win11")
    assert w.systemd.list_units()["getty@tty1.service"] == "active"
    assert seat0(w) == [("alice", "user", "tty")]


def test_a_seat0_session_that_does_not_use_the_gpu_is_left_alone(desk):
    def elsewhere(conf):   # the compositor on another GPU: nothing of 01:00.x open
        conf["vt"].update(holds=[], via_logind=[])
    w = desk("desktop-vt", edit_desktop=elsewhere)
    w.profile()
    leader = next(s.leader for s in w.logind.sessions() if s.seat == "seat0")
    rec = w.machine.prepare("win11")
    assert rec.step("sessions").facts["plan"]["sessions"] == []
    assert [s.leader for s in w.logind.sessions() if s.seat == "seat0"] == [leader]
    assert w.systemd.list_units()["getty@tty1.service"] == "active"
    w.machine.release("win11")


def test_logind_is_never_signalled(desk):
    def slow(conf):   # logind keeps weston's card0 for a minute after the session ended
        conf["timing"] = {"logind_release": 60.0}
    w = desk("desktop-wayland", edit_desktop=slow)
    w.profile(extra="on_busy: terminate\ndeadlines: {terminate: 0.5}\n")
    with pytest.raises(HookdError) as exc:
        w.machine.prepare("win11")
    assert exc.value.code == errors.DEVICE_BUSY
    assert "systemd-logind" in exc.value.message and "never signals" in exc.value.message
    held = [h for h in procs.find_holders(w.host, ["/dev/dri/card0"])
            if h.command == "systemd-logind"]
    assert held and all(os.path.exists(f"/proc/{h.pid}") for h in held)
    rec = w.machine.records.load("win11")
    assert rec.step("sessions").status == "failed"
    assert rec.desktop_check["after"] == "rollback"


def test_logind_let_go_is_awaited(desk):
    w = desk("desktop-wayland", edit_desktop=lambda c: c.update(timing={"logind_release": 1.0}))
    w.profile()
    rec = w.machine.prepare("win11")
    assert rec.step("sessions").duration_ms >= 1000   # waited for logind's close, no signal
    w.machine.release("win11")


def test_a_user_service_that_fails_to_stop_rolls_back(desk):
    w = desk("desktop-x11", edit_desktop=lambda c: c.update(fail_stop=["wireplumber.service"]))
    w.profile()
    before = seat0(w)
    with pytest.raises(HookdError) as exc:
        w.machine.prepare("win11")
    assert exc.value.code == errors.UNIT_FAILED and "wireplumber.service" in exc.value.message
    assert "desktop is not back" not in exc.value.message
    rec = w.machine.records.load("win11")
    assert rec.desktop_check["check"] == "back" and rec.desktop_check["after"] == "rollback"
    # the session of the display manager's run before may still be closing: LightDM's new
    # one follows
    assert seat0_becomes(w, before) == before
    assert w.logind.user_manager(1000).active_state("pipewire.socket") == "active"
    assert all(current_driver(w.host, a) != "vfio-pci" for a in w.devices)


@pytest.mark.parametrize("variant", ("desktop-x11", "desktop-wayland"))
def test_a_fault_at_the_last_step_gives_the_desktop_back(desk, variant):
    w = desk(variant)
    w.profile()
    faults.inject(w.root, "write", "/sys/bus/pci/devices/0000:01:00.1/driver_override", "fail",
                  errno=5, count=1)
    with pytest.raises(HookdError) as exc:
        w.machine.prepare("win11")
    assert exc.value.code == errors.BIND_FAILED or "bind_vfio" in exc.value.message
    rec = w.machine.records.load("win11")
    assert rec.desktop_check == {**rec.desktop_check, "check": "back", "after": "rollback"}
    assert w.logind.user_manager(1000).active_state("pipewire.service") == "active"


def test_a_desktop_that_does_not_come_back_is_reported(desk):
    w = desk("desktop-x11")
    w.profile(extra="deadlines: {desktop_back: 0.5}\n")
    w.machine.prepare("win11")
    assert seat0_becomes(w, []) == []                # the VM runs: alice's X session has ended
    w.logind.model.timing["session_start"] = 60.0   # LightDM does not log alice in again
    with pytest.raises(HookdError) as exc:
        w.machine.release("win11")
    assert exc.value.code == errors.DESKTOP_NOT_BACK and exc.value.exit_status == 32
    assert "seat0 session of alice (user, x11)" in exc.value.message
    rec = w.machine.records.load("win11")
    assert rec.phase == "idle" and not rec.holds_host   # nothing undone twice
    st = status_from_records(w.host, w.paths, "win11")["vms"]["win11"]["desktop"]
    assert st["check"] == "missing" and st["missing"] == ["seat0 session of alice (user, x11)"]
    assert EXIT_STATUS[errors.DESKTOP_NOT_BACK] == 32
    w.machine.release("win11")       # a second release: nothing held, quiet


# ---- device nodes of the functions (FIELD-NOTES §2, §7) -----------------------------------------
def test_nvidia_caps_and_uvm_tools_are_gpu_nodes(world, tmp_path):
    nodes = device_nodes(world.host, "0000:01:00.0")
    assert {"/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2",
            "/dev/nvidia-uvm-tools", "/dev/nvidia0", "/dev/nvidiactl"} <= set(nodes)
    world.profile()
    p = _hold(world, "/dev/nvidia-caps/nvidia-cap1")
    try:
        with pytest.raises(HookdError) as exc:
            world.machine.prepare("win11")
        assert exc.value.code == errors.DEVICE_BUSY and f"PID {p.pid}" in exc.value.message
    finally:
        p.kill()
        p.wait()


def test_a_holder_through_an_mmap_only_is_found(world):
    world.profile()
    node = world.host.path("/dev/nvidia-uvm-tools")
    with open(node, "wb") as f:
        f.write(b"\0" * 4096)          # the simulated node is a file: give it a page to map
    # libc's mmap: Python's mmap.mmap keeps a dup of the fd, this keeps only the mapping
    code = ("import ctypes, os, sys; libc = ctypes.CDLL(None); "
            "libc.mmap.restype = ctypes.c_void_p; libc.mmap.argtypes = [ctypes.c_void_p, "
            "ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]; "
            "fd = os.open(sys.argv[1], os.O_RDONLY); a = libc.mmap(None, 4096, 1, 1, fd, 0); "
            "os.close(fd); print('ok', flush=True); sys.stdin.read()")
    import sys
    p = subprocess.Popen([sys.executable, "-c", code, node], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ok\n"
        fds = os.listdir(f"/proc/{p.pid}/fd")
        assert all(os.readlink(f"/proc/{p.pid}/fd/{fd}") != node for fd in fds)
        with pytest.raises(HookdError) as exc:
            world.machine.prepare("win11")
        assert exc.value.code == errors.DEVICE_BUSY
        assert f"PID {p.pid}" in exc.value.message and "/dev/nvidia-uvm-tools" in exc.value.message
    finally:
        p.kill()
        p.wait()


def test_a_framebuffer_of_the_gpu_is_a_gpu_node(world):
    """amdgpu/nvidia-drm fbdev: ``graphics/fbN`` below the GPU's device (DEVNAME=fbN)."""
    gpu = world.host.resolve("/sys/bus/pci/devices/0000:01:00.0")
    os.makedirs(world.host.path(f"{gpu}/graphics/fb1"))
    with open(world.host.path(f"{gpu}/graphics/fb1/uevent"), "w") as f:
        f.write("MAJOR=29\nMINOR=1\nDEVNAME=fb1\n")
    open(world.host.path("/dev/fb1"), "w").close()
    assert "/dev/fb1" in device_nodes(world.host, "0000:01:00.0")
    world.profile()
    p = _hold(world, "/dev/fb1")
    try:
        with pytest.raises(HookdError) as exc:
            world.machine.prepare("win11")
        assert exc.value.code == errors.DEVICE_BUSY and "/dev/fb1" in exc.value.message
    finally:
        p.kill()
        p.wait()


def _hold(world, node: str) -> subprocess.Popen:
    with open(world.host.path(node)) as f:
        return subprocess.Popen(["sleep", "300"], stdin=f)


def test_the_sessions_step_alone_undoes_exactly(desk):
    """observe -> apply -> undo of the sessions step (after the units step) starts again what
    it stopped: the users' units, with the same states as before."""
    from vfio_hookd.steps import Context, Sessions, Units
    w = desk("desktop-vt")
    w.profile()
    plan = w.machine.plan_prepare("win11", None)
    ctx = Context(vm="win11", host=w.host, profile=plan.profile, deadlines=plan.deadlines,
                  devices=plan.devices, drivers=plan.drivers, systemd=lambda: w.systemd,
                  logind=lambda: w.logind)
    units = Units()
    ufacts = units.observe(ctx)
    units.apply(ctx, ufacts)
    mgr = w.logind.user_manager(1000)
    names = ("pipewire.socket", "pipewire.service", "wireplumber.service", "syncthing.service")
    before = [mgr.active_state(n) for n in names]
    step = Sessions()
    facts = step.observe(ctx)
    step.apply(ctx, facts)
    assert [mgr.active_state(n) for n in names] == ["inactive"] * 3 + ["active"]
    assert step.undo(ctx, facts) == []
    assert [mgr.active_state(n) for n in names] == before
    assert w.systemd.list_units()["getty@tty1.service"] == "active"
    units.undo(ctx, ufacts)
