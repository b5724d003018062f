"""The CPU steps (cpu_isolation, cpu_governor): cpulists and bitmasks, the profile keys, the
systemd client's AllowedCPUs on both fakes, and prepare/release on the simulated 16-CPU host
(testbed.sim.cpus: intel_pstate-like cpufreq, system.slice/user.slice/init.scope)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_profile
from test_daemon_hook import run_cli, run_hook, start_daemon
from test_machine import TUNING, kernel_only
from test_systemd import _either, BACKENDS
from testbed.sim import cpus as simcpus
from testbed.sim import faults
from vfio_hookd import cpus, errors
from vfio_hookd.errors import HookdError
from vfio_hookd.steps.cpus import UNITS

GOV = "/sys/devices/system/cpu/cpu{}/cpufreq/scaling_governor"
EPP = "/sys/devices/system/cpu/cpu{}/cpufreq/energy_performance_preference"


def allowed(world) -> dict:
    """``{unit: cpulist}`` of the three units, as systemd answers."""
    return {u: cpus.format_list(cpus.from_mask(world.systemd.allowed_cpus(u))) for u in UNITS}


def governors(world, which=range(16)) -> dict:
    return {c: world.host.read_or(GOV.format(c)) for c in which}


def domain(pins: str = "8-15", emulator: str | None = None) -> str:
    """A domain XML whose vCPUs are pinned one each to the CPUs of ``pins``."""
    cputune = "".join(f"<vcpupin vcpu='{i}' cpuset='{c}'/>"
                      for i, c in enumerate(sorted(cpus.parse(pins))))
    if emulator:
        cputune += f"<emulatorpin cpuset='{emulator}'/>"
    return f"<domain type='kvm'><name>win11</name><cputune>{cputune}</cputune></domain>"


# ---- cpulists and masks -------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("text, cpus_, canon", [
    ("0-3,8-11", {0, 1, 2, 3, 8, 9, 10, 11}, "0-3,8-11"),
    ("3, 1,2", {1, 2, 3}, "1-3"), ("0", {0}, "0"), ("", set(), ""), ("5,7", {5, 7}, "5,7")])
def test_cpulists_read_and_write_canonically(text, cpus_, canon):
    assert cpus.parse(text) == cpus_
    assert cpus.format_list(cpus_) == canon
    assert cpus.from_mask(cpus.to_mask(cpus_)) == cpus_


@pytest.mark.unit
def test_the_allowedcpus_mask_is_little_endian_by_byte():
    # systemd's ay: byte 0 holds CPUs 0-7 (bit n % 8 of byte n // 8)
    assert cpus.to_mask({0, 1, 2, 3, 8}) == b"\x0f\x01"
    assert cpus.to_mask({9}) == b"\x00\x02"
    assert cpus.to_mask(set()) == b""
    assert cpus.from_mask([0, 0x80]) == {15}


@pytest.mark.unit
@pytest.mark.parametrize("text", ["0-", "a", "3-1", "1--2", "^3", "8192"])
def test_malformed_cpulists_are_refused(text):
    with pytest.raises(ValueError):
        cpus.parse(text)
    assert cpus.parse("1-4,^3", libvirt=True) == {1, 2, 4}


# ---- the profile keys ----------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("line, needle", [
    ('host_cpus: "0-3,x"', "host_cpus: must be 'auto', 'none' or a CPU list"),
    ('host_cpus: "7-3"', "ends below its start"),
    ("host_cpus: [0, 1]", "got list"),
    ('host_cpus: ""', "empty CPU list"),
    ("cpu_governor: Performance!", "not a cpufreq governor name"),
    ("cpu_governor: false", "write 'none' (not false)"),
])
def test_bad_cpu_keys_name_the_file_line_and_key(world, line, needle):
    path = world.profile(extra=f"on_busy: fail\n{line}\n")
    with pytest.raises(HookdError) as exc:
        world.machine.plan_prepare("win11", None)
    assert exc.value.code == errors.PROFILE_INVALID
    n = open(path).read().splitlines().index(line) + 1
    assert exc.value.message.startswith(f"{path}:{n}: "), exc.value.message
    assert needle in exc.value.message


@pytest.mark.unit
def test_cpu_keys_round_trip_through_the_record(world):
    from vfio_hookd.profile import profile_from_dict
    world.profile(extra="host_cpus: 0-7\ncpu_governor: performance\n")
    prof = world.machine.plan_prepare("win11", None).profile
    assert (prof.host_cpus, prof.cpu_governor) == ("0-7", "performance")
    assert profile_from_dict(prof.to_dict()) == prof
    world.profile(extra="host_cpus: 3\n")   # a lone CPU, read by YAML as an int
    assert world.machine.plan_prepare("win11", None).profile.host_cpus == "3"


# ---- validation before anything is touched ----------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("extra, offline, code, needle", [
    ('host_cpus: "0-15"\n', None, errors.PROFILE_INVALID, "nothing would be left for the VM"),
    ('host_cpus: "0-20"\n', None, errors.PROFILE_INVALID, "CPU 16-20 is not present"),
    ('host_cpus: "3"\n', 3, errors.PROFILE_INVALID, "leaves the host no online CPU"),
    ("host_cpus: auto\n", None, errors.DOMAIN_XML_INVALID, "needs the domain XML"),
    ("cpu_governor: performance\n", None, errors.DOMAIN_XML_INVALID, "needs the domain XML"),
])
def test_a_cpu_setup_that_cannot_work_is_refused_untouched(world, extra, offline, code, needle):
    if offline is not None:
        simcpus.set_offline(world.root, offline)
    world.profile(extra=extra)
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == code and needle in exc.value.message, exc.value
    assert world.snapshot() == before
    assert world.machine.records.load("win11") is None


@pytest.mark.unit
def test_the_cpu_steps_add_nothing_to_the_deadline_when_off(world):
    """A profile without host_cpus/cpu_governor: the CPU steps declare 0 s for apply and for
    the rollback, so the announced deadline is what it was before these steps existed; with
    seed 000's setup they declare their calls."""
    from vfio_hookd.steps.cpus import CpuGovernor, CpuIsolation
    world.profile()
    plan = world.machine.plan_prepare("win11", None)
    for step in (CpuIsolation(), CpuGovernor()):
        assert step.max_apply_s(plan.profile, plan.shape) == 0
        assert step.max_undo_s(plan.deadlines, plan.shape, None) == 0
    world.profile(extra=TUNING)
    plan = world.machine.plan_prepare("win11", None)
    assert CpuIsolation().max_undo_s(plan.deadlines, plan.shape, None) > 0
    assert CpuGovernor().max_apply_s(plan.profile, plan.shape) > 0


@pytest.mark.unit
def test_a_domain_without_vcpupin_is_refused_for_auto(world):
    world.profile(extra="host_cpus: auto\n")
    with pytest.raises(HookdError) as exc:
        world.machine.plan_prepare("win11", "<domain><name>win11</name></domain>")
    assert exc.value.code == errors.DOMAIN_XML_INVALID
    assert "no <cputune><vcpupin" in exc.value.message and "host_cpus" in exc.value.message


# ---- the systemd client: both fakes alike ---------------------------------------------------

@pytest.fixture(params=BACKENDS)
def sd(request, tmp_path):
    """``(root, backend, client)`` on a bare simulated systemd (no CPU files needed)."""
    yield from _either(request.param, tmp_path, {"sshd.service": {"active": True}})


def test_allowed_cpus_set_read_and_reset(sd):
    root, _backend, client = sd
    for unit in UNITS:
        assert client.allowed_cpus(unit) == b""
    client.set_allowed_cpus("system.slice", cpus.to_mask({0, 1, 2, 3}), 5)
    assert client.allowed_cpus("system.slice") == b"\x0f"
    assert client.allowed_cpus("user.slice") == b""
    client.set_allowed_cpus("system.slice", b"", 5)   # empty: no restriction again
    assert client.allowed_cpus("system.slice") == b""
    assert json.load(open(os.path.join(root, ".sim", "cgroups.json")))["system.slice"] == ""


def test_allowed_cpus_of_an_unknown_unit_and_faults(sd):
    root, _backend, client = sd
    with pytest.raises(HookdError) as exc:
        client.set_allowed_cpus("nosuch.slice", b"\x01", 5)
    assert exc.value.code == errors.UNIT_FAILED and "nosuch.slice" in exc.value.message
    faults.inject(root, "set_property", "user.slice", "fail", count=1)
    with pytest.raises(HookdError) as exc:
        client.set_allowed_cpus("user.slice", b"\x01", 5)
    assert exc.value.code == errors.UNIT_FAILED and "user.slice" in exc.value.message
    faults.inject(root, "set_property", "init.scope", "hang", count=1)
    with pytest.raises(HookdError) as exc:
        client.set_allowed_cpus("init.scope", b"\x01", 0.3)
    assert exc.value.code == errors.TIMEOUT
    assert client.allowed_cpus("init.scope") == b""


# ---- prepare and release on the simulated host ------------------------------------------------

@pytest.mark.unit
def test_seed_000_setup_round_trip_leaves_the_host_identical(world):
    """CPUs 8-15 for the VM with the performance governor: host_cpus "0-7"."""
    world.profile(extra=TUNING)
    before = world.snapshot()
    epp_before = {c: world.host.read_or(EPP.format(c)) for c in range(16)}
    assert epp_before[12] == "power"
    rec = world.machine.prepare("win11")
    assert allowed(world) == {u: "0-7" for u in UNITS}
    assert world.host.read("/sys/fs/cgroup/system.slice/cpuset.cpus") == "0-7"
    assert governors(world) == {c: "performance" if c >= 8 else "powersave" for c in range(16)}
    steps = {s.name: s for s in rec.steps}
    assert steps["cpu_isolation"].facts["vm_cpus"] == "8-15"
    assert [i["before"] for i in steps["cpu_isolation"].facts["plan"]] == ["", "", ""]
    assert [i["epp"] for i in steps["cpu_governor"].facts["plan"]][4] == "power"   # CPU 12
    st = world.machine.status("win11")["vms"]["win11"]
    by = {s["name"]: s for s in st["steps"]}
    assert by["cpu_isolation"]["why"]["init.scope"].startswith("AllowedCPUs 0-7 (before: all")
    assert by["cpu_governor"]["why"] == {"CPU 8-15": "scaling_governor performance (before: "
                                                     "powersave)"}
    world.machine.release("win11")
    assert allowed(world) == {u: "" for u in UNITS}
    assert {c: world.host.read_or(EPP.format(c)) for c in range(16)} == epp_before
    after = world.snapshot()
    assert after["units"] == before["units"]
    kernel_only(before["tree"], after["tree"])


@pytest.mark.unit
def test_a_previous_allowedcpus_comes_back_exactly(world):
    world.systemd.set_allowed_cpus("system.slice", cpus.to_mask(cpus.parse("0-11")), 5)
    world.profile(extra='host_cpus: "0-3"\n')
    rec = world.machine.prepare("win11")
    plan = {i["unit"]: i["before"] for i in rec.steps[-2].facts["plan"]}
    assert plan == {"system.slice": "0-11", "user.slice": "", "init.scope": ""}
    assert allowed(world) == {u: "0-3" for u in UNITS}
    world.machine.release("win11")
    assert allowed(world) == {"system.slice": "0-11", "user.slice": "", "init.scope": ""}


@pytest.mark.unit
def test_offline_cpus_and_cpus_without_cpufreq_are_reported_not_errors(world):
    simcpus.set_offline(world.root, 9)
    simcpus.drop_cpufreq(world.root, [14, 15])
    world.profile(extra=TUNING)
    before = world.snapshot()
    rec = world.machine.prepare("win11")
    facts = {s.name: s.facts for s in rec.steps}
    assert facts["cpu_isolation"]["vm_cpus"] == "8,10-15"
    gov = facts["cpu_governor"]
    assert [i["cpu"] for i in gov["plan"]] == [8, 10, 11, 12, 13]
    assert gov["no_cpufreq"] == [14, 15] and gov["offline"] == []
    assert any("CPU 14-15: no cpufreq" in s for s in gov["skipped"])
    r = world.machine.status("win11")["vms"]["win11"]["steps"][-1]
    assert r["status"] == "done" and any("no cpufreq" in s for s in r["skipped"])
    world.machine.release("win11")
    kernel_only(before["tree"], world.snapshot()["tree"])


@pytest.mark.unit
def test_a_governor_the_cpus_lack_fails_and_rolls_everything_back(world):
    world.profile(extra='host_cpus: "0-7"\ncpu_governor: schedutil\n')   # intel_pstate: no
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.CPU_TUNING_FAILED
    assert "step cpu_governor" in exc.value.message and "performance powersave" in exc.value.message
    assert allowed(world) == {u: "" for u in UNITS}
    after = world.snapshot()
    assert after["units"] == before["units"]
    kernel_only(before["tree"], after["tree"])


@pytest.mark.unit
def test_host_cpus_auto_and_a_governor_from_the_vcpupin(world):
    world.profile(extra="host_cpus: auto\ncpu_governor: performance\n")
    plan = world.machine.plan_prepare("win11", domain("8-15", emulator="7"))
    assert plan.cpus["host"] == "0-6" and plan.cpus["vm"] == "7-15"
    assert plan.shape.cpus == 9
    world.profile(extra="cpu_governor: performance\n")   # no isolation: the pinned CPUs only
    xml = domain("4-5", emulator="7")
    plan = world.machine.plan_prepare("win11", xml)
    assert (plan.cpus["host"], plan.cpus["vm"]) == (None, "4-5")
    rec = world.machine.prepare("win11", xml)
    assert governors(world, [3, 4, 5, 7]) == {3: "powersave", 4: "performance",
                                             5: "performance", 7: "powersave"}
    assert rec.steps[-2].facts["plan"] == []   # cpu_isolation off: nothing recorded to undo
    world.machine.release("win11")
    assert set(governors(world).values()) == {"powersave"}


@pytest.mark.unit
def test_a_failed_undo_gives_back_the_other_units_and_a_second_release_finishes(world):
    world.profile(extra=TUNING)
    world.machine.prepare("win11")
    faults.inject(world.root, "set_property", "user.slice", "fail", count=1)
    with pytest.raises(HookdError) as exc:
        world.machine.release("win11")
    assert exc.value.code == errors.RELEASE_INCOMPLETE and "step cpu_isolation" in exc.value.message
    assert allowed(world) == {"system.slice": "", "user.slice": "0-7", "init.scope": ""}
    assert set(governors(world).values()) == {"powersave"}   # the governor undo ran too
    world.machine.release("win11")
    assert allowed(world) == {u: "" for u in UNITS}


@pytest.mark.unit
def test_plan_shows_what_the_cpu_steps_would_do(world):
    from vfio_hookd.plan_view import document, render
    world.profile(extra=TUNING)
    text = "\n".join(render(document(world.machine, world.machine.plan_prepare("win11", None))))
    assert "step cpu_isolation" in text and "init.scope: AllowedCPUs 0-7" in text
    assert "step cpu_governor" in text and "governor: performance" in text
    assert "cpu=15, governor=powersave" in text


# ---- the daemon: a restart between prepare and release ----------------------------------------

@pytest.mark.dbus
def test_release_after_a_daemon_restart_works_from_the_record_alone(bus_world, tmp_path):
    world = bus_world
    path = world.profile(extra=TUNING)
    before = world.snapshot()
    d = start_daemon(world, tmp_path)
    try:
        r = run_hook("win11", "prepare", "begin", "-")
        assert (r.returncode, r.stderr) == (0, "")
        r = run_cli("status")
        assert "step cpu_isolation" in r.stdout and "system.slice: AllowedCPUs 0-7" in r.stdout
    finally:
        assert d.stop() == 0
    assert allowed(world) == {u: "0-7" for u in UNITS}
    assert governors(world, [7, 8]) == {7: "powersave", 8: "performance"}
    write_profile(world.dirs, "win11", "devices: ['0000:01:00.0']\nhost_cpus: '0-1'\n")
    d = start_daemon(world, tmp_path)
    try:
        r = run_hook("win11", "release", "end", "-")
        assert (r.returncode, r.stderr) == (0, "")
    finally:
        assert d.stop() == 0
    assert allowed(world) == {u: "" for u in UNITS}
    after = world.snapshot()
    assert after["units"] == before["units"]
    kernel_only(before["tree"], after["tree"])
    assert os.path.exists(path)


# ---- properties ----------------------------------------------------------------------------

@pytest.mark.unit
def test_cpulists_and_masks_round_trip_for_any_set():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(st.sets(st.integers(0, cpus.MAX_CPU), max_size=64))
    def prop(s):
        assert cpus.parse(cpus.format_list(s)) == s
        assert cpus.from_mask(cpus.to_mask(s)) == s
    prop()


@pytest.mark.unit
def test_any_cpuset_text_in_the_domain_xml_is_read_or_refused_with_its_code(world):
    from hypothesis import given, settings, strategies as st
    world.profile(extra="host_cpus: auto\n")

    @settings(max_examples=200, derandomize=True, database=None, deadline=None)
    @given(st.text(alphabet="0123456789-,^ x", max_size=12))
    def prop(text):
        xml = f"<domain><cputune><vcpupin vcpu='0' cpuset='{text}'/></cputune></domain>"
        try:
            plan = world.machine.plan_prepare("win11", xml)
        except HookdError as e:
            assert e.code in (errors.DOMAIN_XML_INVALID, errors.PROFILE_INVALID), e
        else:
            assert cpus.parse(plan.cpus["vm"]) and cpus.parse(plan.cpus["host"])
    prop()
