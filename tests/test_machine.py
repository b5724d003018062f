"""The state machine and its steps on the simulated host: prepare, release, rollback, faults."""

from __future__ import annotations

import signal
import subprocess

import pytest

from conftest import diff, write_profile
from testbed.expected import classify_changes, framebuffer_removed
from testbed.sim import faults
from vfio_hookd import errors
from vfio_hookd.errors import HookdError
from vfio_hookd.pci import current_driver
from vfio_hookd.steps import STEP_NAMES, STEPS, Context

pytestmark = pytest.mark.unit


def kernel_only(before: dict, after: dict, fb_removed: bool = True,
                vfio_loaded: bool = True) -> list[str]:
    """Assert that the trees differ only by the kernel's own changes (testbed.expected: the
    firmware framebuffer removed when vfio-pci took the boot VGA function, with what goes with
    it) and vfio-pci left loaded, each exactly when asked for; return the expected lines."""
    expected, unexpected = classify_changes(before, after)
    assert unexpected == {}, unexpected
    assert framebuffer_removed(expected) == fb_removed, expected
    assert any(e.startswith("vfio-pci left loaded") for e in expected) == vfio_loaded, expected
    return expected


@pytest.fixture
def holder(world):
    """Start a process holding a node of the simulated host; killed by PID afterwards."""
    procs = []

    def start(node: str) -> subprocess.Popen:
        f = open(world.host.path(node))
        p = subprocess.Popen(["sleep", "300"], stdin=f)
        f.close()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_prepare_then_release_restores_the_host(world):
    world.profile()
    before = world.snapshot()
    rec = world.machine.prepare("win11")
    assert rec.phase == "prepared"
    assert [s.status for s in rec.steps] == ["done"] * len(STEPS)
    for addr in world.devices:
        assert current_driver(world.host, addr) == "vfio-pci"
    assert world.host.exists("/dev/vfio/1")
    assert not world.host.module_loaded("nvidia")
    assert world.host.module_loaded("snd_hda_intel")
    # fbcon was unbound, then the last framebuffer went away: the kernel drops vtcon1, and
    # the boot console driver holds the consoles
    assert not world.host.exists("/sys/class/vtconsole/vtcon1")
    assert world.host.read("/sys/class/vtconsole/vtcon0/bind") == "1"
    units = world.systemd.list_units()
    assert units["gdm.service"] == "inactive" and units["nvidia-persistenced.service"] == "inactive"
    assert units["sshd.service"] == "active"
    assert world.machine.records.load("win11").phase == "prepared"

    rec = world.machine.release("win11", "destroyed")
    assert rec.phase == "idle"
    assert [s.status for s in rec.steps] == ["undone"] * len(STEPS)
    after = world.snapshot()
    assert after["units"] == before["units"]
    kernel_only(before["tree"], after["tree"])
    fb = next(s for s in rec.steps if s.name == "framebuffer")
    assert any("removed by the kernel" in n for n in fb.notes)
    for addr, drv in zip(world.devices, ("nvidia", "snd_hda_intel")):
        assert current_driver(world.host, addr) == drv


def test_amd_host_round_trip_is_identical(amd_world):
    amd_world.profile()
    before = amd_world.snapshot()
    amd_world.machine.prepare("win11")
    assert not amd_world.host.module_loaded("amdgpu")
    amd_world.machine.release("win11")
    after = amd_world.snapshot()
    assert after["units"] == before["units"]
    kernel_only(before["tree"], after["tree"], fb_removed=False)


def _ctx(world, vm="win11"):
    plan = world.machine.plan_prepare(vm, None)
    return Context(vm=vm, host=world.host, profile=plan.profile, deadlines=plan.deadlines,
                   devices=plan.devices, drivers=plan.drivers, systemd=lambda: world.systemd,
                   logind=lambda: world.logind, cpus=plan.cpus)


#: The host tuning steps are off by default: these profile keys turn them on (seed 000's
#: setup on the simulated 16-CPU host, and 16 pages of 2 MiB), so that every step has
#: something to do.
TUNING = 'host_cpus: "0-7"\ncpu_governor: performance\nhugepages: {pages: 16, size: 2M}\n'


# What must be true before a step can run alone: the display manager and
# nvidia-persistenced hold the GPU, so steps that unbind it need the units stopped first.
PREREQS = {"inhibit": [], "units": [], "sessions": ["units"], "holders": ["units"], "vtconsoles": [],
           "framebuffer": [], "bind_vfio": ["units"], "modules": ["units"], "hugepages": [],
           "cpu_isolation": [], "cpu_governor": []}


# the sessions step: tests/test_desktop.py (it has nothing to do on a host without logind);
# the inhibit step (off by default, and logind's): tests/test_inhibit.py
_ELSEWHERE = ("sessions", "inhibit")
_ON_THIS_HOST = [k for k, n in enumerate(STEP_NAMES) if n not in _ELSEWHERE]


@pytest.mark.parametrize("k", _ON_THIS_HOST, ids=[STEP_NAMES[k] for k in _ON_THIS_HOST])
def test_each_step_undo_restores_exactly(world, holder, k):
    """Step k's observe -> apply -> undo leaves the whole host as it was (with vfio-pci
    already loaded, as on most passthrough hosts)."""
    world.profile(extra="on_busy: terminate\n" + TUNING)
    world.host.modprobe("vfio-pci", 5)
    ctx = _ctx(world)
    earlier = []
    for step in STEPS:
        if step.name in PREREQS[STEPS[k].name]:
            facts = step.observe(ctx)
            step.apply(ctx, facts)
            earlier.append((step, facts))
    foreign = holder("/dev/dri/card0") if STEPS[k].name == "holders" else None
    before = world.snapshot()
    facts = STEPS[k].observe(ctx)
    assert facts["plan"], f"step {STEPS[k].name} has nothing to do on the default host"
    STEPS[k].apply(ctx, facts)
    if foreign:  # the holders step changes processes, not the tree
        assert foreign.poll() == -signal.SIGTERM   # ended by the step, not later
        assert facts["terminated"][0]["pid"] == foreign.pid
    else:
        assert world.snapshot() != before, "apply changed nothing"
    STEPS[k].undo(ctx, facts)
    after = world.snapshot()
    d = diff(before["tree"], after["tree"])
    if STEPS[k].name == "bind_vfio":  # the kernel removes the firmware framebuffer for good
        kernel_only(before["tree"], after["tree"], vfio_loaded=False)
    elif foreign:  # the terminated holder no longer counts in the module's refcnt
        assert set(d) == {"/sys/module/nvidia_drm/refcnt"}, d
    else:
        assert d == {}
    assert after["units"] == before["units"]
    for step, f in reversed(earlier):
        step.undo(ctx, f)


# One fault per step position: (step, fault rule args) making that step fail half-way.
# Each fires once; where a step changes several things, the fault hits a later one, so the
# step fails half-way and its own partial change must be undone too.
FAULTS = {
    "units": ("stop", "nvidia-persistenced.service"),   # after gdm was stopped
    "holders": None,  # a foreign holder process (fixture)
    "vtconsoles": ("write", "/sys/class/vtconsole/vtcon1/bind"),
    "framebuffer": ("write", "/sys/bus/platform/drivers/efi-framebuffer/unbind"),
    "bind_vfio": ("write", "/sys/bus/pci/devices/0000:01:00.1/driver_override"),  # 2nd function
    "modules": ("rmmod", "nvidia"),                       # after nvidia_drm... were unloaded
    "cpu_isolation": ("set_property", "user.slice"),      # after system.slice was restricted
    "cpu_governor": ("write", "/sys/devices/system/cpu/cpu9/cpufreq/scaling_governor"),  # after cpu8
    # after compact_memory was written
    "hugepages": ("write", "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
}


def assert_rolled_back(before: dict, after: dict, k: int) -> None:
    """After a prepare that failed at step ``k`` (index in STEP_NAMES) and rolled back: the
    units as before, and the tree as before except, once bind_vfio may have run, the kernel's
    own documented changes."""
    assert after["units"] == before["units"]
    if k >= STEP_NAMES.index("bind_vfio"):
        kernel_only(before["tree"], after["tree"])
    else:
        assert diff(before["tree"], after["tree"]) == {}


# the sessions and inhibit steps have nothing to do on this host (no logind): their failures
# and rollback are tested on the desktop hosts (tests/test_desktop.py, tests/test_inhibit.py)
@pytest.mark.parametrize("name", [n for n in STEP_NAMES if n not in _ELSEWHERE])
def test_prepare_failure_at_each_step_rolls_back(world, holder, name):
    world.profile(extra=TUNING)
    before = world.snapshot()
    if FAULTS[name] is None:
        holder("/dev/dri/card0")
        before = world.snapshot()
    else:
        op, target = FAULTS[name]
        faults.inject(world.root, op, target, "fail", errno=5, count=1)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert f"step {name}" in str(exc.value)
    faults.clear(world.root)
    rec = world.machine.records.load("win11")
    assert rec.phase == "failed"
    assert rec.error["step"] == name
    statuses = {s.name: s.status for s in rec.steps}
    k = STEP_NAMES.index(name)
    assert statuses[name] == "failed"
    assert all(statuses[n] == "undone" for n in STEP_NAMES[:k])
    assert all(statuses[n] == "pending" for n in STEP_NAMES[k + 1:])
    after = world.snapshot()
    assert_rolled_back(before, after, k)
    if name == "bind_vfio":  # the first function went over and came back
        assert current_driver(world.host, "0000:01:00.0") == "nvidia"
    assert not rec.holds_host
    # libvirt calls release end after a failed start: a quiet success that changes nothing
    assert world.machine.release("win11", "failed").phase == "failed"
    assert world.snapshot() == after


def test_prepare_failure_in_bind_vfio_gives_back_the_half_done_function(world):
    world.profile()
    faults.inject(world.root, "write", "/sys/bus/pci/drivers_probe", "fail", errno=19, count=1)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.BIND_FAILED
    assert "0000:01:00.0" in exc.value.message
    assert current_driver(world.host, "0000:01:00.0") == "nvidia"
    assert world.host.read("/sys/bus/pci/devices/0000:01:00.0/driver_override") == "(null)"


# Faults that make each step's undo fail during release.
# (vtconsoles, framebuffer: on this host the kernel removed what they would give back, so
# their undo writes nothing; test_each_step_undo_restores_exactly covers their undo.)
UNDO_FAULTS = {
    "units": ("start", "gdm.service"),
    "bind_vfio": ("write", "/sys/bus/pci/drivers/vfio-pci/unbind"),
    "modules": ("modprobe", "nvidia_uvm"),
    "hugepages": ("write", "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
}


@pytest.mark.parametrize("name", sorted(UNDO_FAULTS))
def test_release_carries_on_past_a_failed_undo(world, name):
    world.profile(extra=TUNING)
    world.machine.prepare("win11")
    op, target = UNDO_FAULTS[name]
    faults.inject(world.root, op, target, "fail", errno=5)
    with pytest.raises(HookdError) as exc:
        world.machine.release("win11")
    assert exc.value.code == errors.RELEASE_INCOMPLETE
    assert f"step {name}" in exc.value.message
    rec = world.machine.records.load("win11")
    assert rec.phase == "failed"
    by_name = {s.name: s for s in rec.steps}
    assert by_name[name].status == "undo_failed"
    # every undo ran (each has an undo time), not only those before the failure
    assert all(s.undo_ms is not None for s in rec.steps)
    assert [e["step"] for e in rec.release_errors][0] == name
    # once the cause is gone, a second release finishes the job; a gdm started by the first
    # release while the GPU's nodes were missing does not hold card0: the desktop-back check
    # says so with DESKTOP_NOT_BACK (the record is released all the same)
    faults.clear(world.root)
    _rewrite_deadline(world, desktop_back=0.5)
    try:
        rec = world.machine.release("win11")
    except HookdError as again:
        assert again.code == errors.DESKTOP_NOT_BACK and "card0" in again.message
        rec = world.machine.records.load("win11")
    assert rec.phase == "idle"
    from vfio_hookd.procs import find_holders
    gdm_on_card = any(h.command == "gdm" for h in find_holders(world.host, ["/dev/dri/card0"]))
    assert (rec.desktop_check["check"] == "back") == gdm_on_card
    assert world.systemd.list_units()["gdm.service"] == "active"
    assert current_driver(world.host, "0000:01:00.0") == "nvidia"


def test_holder_fails_prepare_with_its_pid(world, holder):
    world.profile()
    p = holder("/dev/dri/card0")
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.DEVICE_BUSY
    assert f"PID {p.pid}" in exc.value.message and "/dev/dri/card0" in exc.value.message
    assert exc.value.details["holders"][0]["pid"] == p.pid
    assert p.poll() is None
    assert world.snapshot() == before


def test_holder_is_terminated_with_on_busy_terminate(world, holder):
    world.profile(extra="on_busy: terminate\n")
    p = holder("/dev/nvidia0")
    rec = world.machine.prepare("win11")
    assert rec.phase == "prepared"
    assert p.poll() == -signal.SIGTERM   # ended before prepare answered
    facts = next(s for s in rec.steps if s.name == "holders").facts
    assert [h["pid"] for h in facts["terminated"]] == [p.pid]


def test_incomplete_iommu_group_is_refused_before_touching_the_host(world):
    write_profile(world.dirs, "win11", 'devices: ["0000:01:00.0"]\n')
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.IOMMU_GROUP_INCOMPLETE
    assert "0000:01:00.1" in exc.value.message
    assert world.snapshot() == before
    assert world.machine.records.load("win11") is None


def test_missing_device_is_refused(world):
    write_profile(world.dirs, "win11", 'devices: ["0000:09:00.0"]\n')
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.DEVICE_NOT_FOUND and "0000:09:00.0" in exc.value.message
    assert world.snapshot() == before


def test_device_held_by_another_vm_is_refused(world):
    world.profile("win11")
    world.profile("linux")
    world.machine.prepare("win11")
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("linux")
    assert exc.value.code == errors.DEVICE_CLAIMED and "win11" in exc.value.message
    world.machine.release("win11")
    assert world.machine.prepare("linux").phase == "prepared"
    world.machine.release("linux")


def test_second_prepare_is_a_checked_no_op(world):
    world.profile()
    first = world.machine.prepare("win11")
    snap = world.snapshot()
    again = world.machine.prepare("win11")
    assert again.steps == first.steps
    assert world.snapshot() == snap
    # drift: someone gave a function back behind our back
    world.host.write("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:01:00.1", 1)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.STATE_DRIFT


def test_release_without_record_is_quiet(world):
    world.profile()
    before = world.snapshot()
    assert world.machine.release("win11", "failed") is None
    assert world.snapshot() == before


def test_release_follows_the_record_not_todays_profile(world):
    world.profile()
    world.machine.prepare("win11")
    # the user edits the profile while the VM runs
    write_profile(world.dirs, "win11", "display_manager: none\nmodules: none\n"
                  "devices: ['0000:01:00.0', '0000:01:00.1']\n")
    world.machine.release("win11")
    units = world.systemd.list_units()
    assert units["gdm.service"] == "active" and units["nvidia-persistenced.service"] == "active"
    assert world.host.module_loaded("nvidia_drm")


@pytest.mark.parametrize("op,target,step", [
    ("write", "/sys/bus/pci/drivers/snd_hda_intel/unbind", "bind_vfio"),
    ("rmmod", "nvidia", "modules"),
])
def test_hung_kernel_operation_fails_the_step_at_its_deadline(world, op, target, step):
    """A sysfs write or module unload that never returns (as an NVIDIA unbind with a holder
    does) fails its step at the deadline, and the rollback gives the rest back."""
    world.profile(extra="deadlines: {unbind: 0.3, module_unload: 0.3}\n")
    before = world.snapshot()
    faults.inject(world.root, op, target, "hang", count=1)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.TIMEOUT and f"step {step}" in str(exc.value)
    rec = world.machine.records.load("win11")
    assert rec.error["step"] == step and not rec.holds_host
    assert world.systemd.list_units() == before["units"]
    assert current_driver(world.host, "0000:01:00.0") == "nvidia"


def test_status_reports_phase_steps_and_drivers(world):
    world.profile()
    world.machine.prepare("win11")
    st = world.machine.status()["vms"]["win11"]
    assert st["phase"] == "prepared"
    assert [s["name"] for s in st["steps"]] == list(STEP_NAMES)
    assert all(isinstance(s["duration_ms"], float) for s in st["steps"])
    assert {d["address"]: d["driver"] for d in st["devices"]} == {a: "vfio-pci" for a in world.devices}
    world.machine.release("win11")
    st = world.machine.status("win11")["vms"]["win11"]
    assert st["phase"] == "idle"
    assert st["devices"][0]["driver"] == "nvidia"


@pytest.mark.parametrize("k", range(len(STEPS)), ids=STEP_NAMES)
def test_release_runs_every_other_undo_when_one_raises(world, monkeypatch, k):
    """Whatever step's undo fails, the undos of all the others still run, in reverse order."""
    world.profile()
    world.machine.prepare("win11")
    ran = []
    for i, step in enumerate(STEPS):
        real = step.undo

        def undo(ctx, facts, _i=i, _real=real):
            ran.append(STEP_NAMES[_i])
            if _i == k:
                raise HookdError(errors.HOST_IO, f"injected in {STEP_NAMES[_i]}")
            return _real(ctx, facts)
        monkeypatch.setattr(step, "undo", undo)
    with pytest.raises(HookdError) as exc:
        world.machine.release("win11")
    assert exc.value.code == errors.RELEASE_INCOMPLETE
    assert f"injected in {STEP_NAMES[k]}" in exc.value.message
    assert ran == list(reversed(STEP_NAMES))
    statuses = {s.name: s.status for s in world.machine.records.load("win11").steps}
    if STEP_NAMES[k] == "modules":
        # without the nvidia modules the GPU stays unbound (bind_vfio left it for them) and
        # the display manager cannot start without its GPU: that undo ran and failed too
        assert statuses == {**{n: "undone" for n in STEP_NAMES}, "modules": "undo_failed",
                            "units": "undo_failed"}
        assert current_driver(world.host, "0000:01:00.0") is None
    elif STEP_NAMES[k] == "bind_vfio":
        # the GPU stays on vfio-pci, so nvidia will not load (no device to probe) and the
        # display manager has no GPU: those undos ran and failed in their own right
        assert statuses == {**{n: "undone" for n in STEP_NAMES}, "bind_vfio": "undo_failed",
                            "modules": "undo_failed", "units": "undo_failed"}
        assert current_driver(world.host, "0000:01:00.0") == "vfio-pci"
    else:
        assert statuses == {n: ("undo_failed" if i == k else "undone")
                            for i, n in enumerate(STEP_NAMES)}


def test_units_are_not_started_while_the_system_shuts_down(world):
    world.profile()
    world.machine.prepare("win11")
    world.set_system_state("stopping")
    rec = world.machine.release("win11", "shutdown")
    assert rec.phase == "idle"
    units = world.systemd.list_units()
    assert units["gdm.service"] == "inactive" and units["nvidia-persistenced.service"] == "inactive"
    notes = next(s for s in rec.steps if s.name == "units").notes
    assert notes and "shutting down" in notes[0]
    assert current_driver(world.host, "0000:01:00.0") == "nvidia"


def test_concurrent_prepares_of_one_device_run_one_at_a_time(world):
    """Two VMs racing for the same GPU: one wins, the other is refused; never both."""
    import threading
    world.profile("a")
    world.profile("b")
    results = {}

    def run(vm):
        try:
            results[vm] = world.machine.prepare(vm).phase
        except HookdError as exc:
            results[vm] = exc.code

    threads = [threading.Thread(target=run, args=(vm,)) for vm in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results.values()) == [errors.DEVICE_CLAIMED, "prepared"], results
    winner = next(vm for vm, r in results.items() if r == "prepared")
    world.machine.release(winner)
    assert current_driver(world.host, "0000:01:00.0") == "nvidia"


def test_a_record_that_cannot_be_written_rolls_back_the_host(world, monkeypatch):
    """/run full or failing mid-prepare: the host is given back all the same."""
    world.profile()
    before = world.snapshot()
    real_save = world.machine.records.save

    def save(rec):
        if any(s.name == "bind_vfio" and s.status == "applying" for s in rec.steps):
            raise OSError(28, "No space left on device")
        real_save(rec)
    monkeypatch.setattr(world.machine.records, "save", save)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.HOST_IO and "step bind_vfio" in exc.value.message
    after = world.snapshot()
    assert after["units"] == before["units"]
    assert diff(before["tree"], after["tree"]) == {}


def test_a_failed_rollback_is_reported_with_the_original_error(world):
    world.profile()
    faults.inject(world.root, "write", "/sys/bus/pci/drivers_probe", "fail", errno=19, count=1)
    faults.inject(world.root, "start", "gdm.service", "fail", count=1)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.BIND_FAILED
    msg = exc.value.message
    assert msg.startswith("step bind_vfio: ") and "rollback incomplete: step units" in msg
    assert "vfio-hookd release win11" in msg
    assert exc.value.details["rollback_errors"][0]["step"] == "units"
    faults.clear(world.root)
    assert world.machine.release("win11").phase == "idle"
    assert world.systemd.list_units()["gdm.service"] == "active"


def test_a_holder_on_its_way_out_does_not_fail_prepare(world):
    """A session process still ending after its display manager stopped is waited for."""
    world.profile()
    world.machine.holders_grace_s = 2.0   # the product's default
    with open(world.host.path("/dev/dri/card0")) as f:
        leaving = subprocess.Popen(["sleep", "0.5"], stdin=f)
    world.systemd.adopt(leaving.pid, "session-2.scope")   # the greeter's session, ending
    try:
        assert world.machine.prepare("win11").phase == "prepared"
        assert leaving.poll() is not None
    finally:
        leaving.kill()
        leaving.wait()
    world.machine.release("win11")


def _rewrite_deadline(world, **deadlines) -> None:
    """Change deadlines in the VM's record (as if prepare had run with them)."""
    import json
    path = world.paths.record_path("win11")
    with open(path) as f:
        data = json.load(f)
    data["deadlines"].update(deadlines)
    with open(path, "w") as f:
        json.dump(data, f)
