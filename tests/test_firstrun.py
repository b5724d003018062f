"""The first-run verbs on the simulated host: ``vfio-hookd init`` (from domain XMLs, never
overwriting), ``check`` (healthy and broken hosts, each FAIL/WARN by name) and ``plan`` (the
prepare's own plan and observes: what the following prepare records)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess

import pytest

from conftest import write_profile
from testbed import sim
from testbed.domains import tiny_domain_xml
from testbed.sim import preflight
from testbed.sim.shapes import HOST_XHCI

pytestmark = pytest.mark.unit


class PreWorld:
    """A simulated host with the preflight's facts (:mod:`testbed.sim.preflight`) and the
    in-process fake systemd, and the product's CLI acting on them."""

    def __init__(self, dirs, variant: str, flags: dict):
        from testbed.fake_systemd import FakeSystemd
        from testbed.sim.kernel import SimHost
        from vfio_hookd.paths import Paths
        self.dirs = dirs
        self.root = str(dirs["host"])
        self.variant = variant
        sim.make_host(self.root, variant)
        preflight.set_up(self.root, **flags)
        self.fake = FakeSystemd(self.root)
        self.host = SimHost(self.root)
        self.paths = Paths(config_dir=str(dirs["config"]), run_dir=str(dirs["run"]))

    def xml(self, hostdevs, managed: bool = True, extra: str = "") -> str:
        """A domain XML file with ``hostdevs`` (and ``extra`` inside ``<devices>``)."""
        text = tiny_domain_xml("win11", list(hostdevs), managed)
        text = text.replace("  </devices>", extra + "  </devices>")
        path = self.dirs["config"].parent / "win11.xml"
        path.write_text(text)
        return str(path)

    def cli(self, *argv) -> tuple[int, str, str]:
        """``vfio-hookd ARGV`` on this host: (exit status, stdout, stderr)."""
        from vfio_hookd import cli
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(argv), host=self.host, systemd_factory=lambda: self.fake)
        return rc, out.getvalue(), err.getvalue()

    def check(self, *argv) -> tuple[int, dict]:
        """``vfio-hookd check ARGV --json``: (exit status, {name: [status, ...]}, document)."""
        rc, out, _ = self.cli("check", *argv, "--json")
        doc = json.loads(out)
        by_name: dict[str, list] = {}
        for c in doc["checks"]:
            by_name.setdefault(c["name"], []).append(c)
        return rc, by_name

    def profile_path(self, vm: str = "win11") -> str:
        return self.paths.profile_path(vm)


@pytest.fixture
def make(dirs):
    worlds = []

    def build(variant: str = "nvidia", **flags) -> PreWorld:
        w = PreWorld(dirs, variant, flags)
        worlds.append(w)
        return w
    yield build
    for w in worlds:
        w.fake.kill_all()


@pytest.fixture
def holder():
    """Start a process holding a node of a simulated host; killed by PID afterwards."""
    procs = []

    def start(w: PreWorld, node: str) -> subprocess.Popen:
        with open(w.host.path(node)) as f:
            p = subprocess.Popen(["sleep", "300"], stdin=f)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def statuses(by_name: dict) -> dict:
    return {n: [c["status"] for c in cs] for n, cs in by_name.items()}


# ---- init -------------------------------------------------------------------------------------

def test_init_from_the_gpu_alone_adds_its_audio_function_and_persistenced(make):
    w = make("nvidia")
    rc, out, err = w.cli("init", "win11", "--xml", w.xml(["0000:01:00.0"]))
    assert rc == 0, err
    from vfio_hookd.profile import load_profile
    prof = load_profile(w.paths, "win11")
    assert prof.devices == ("0000:01:00.0", "0000:01:00.1")
    assert prof.stop_units == ("nvidia-persistenced.service",)
    assert prof.display_manager == "auto" and prof.on_busy == "fail" and prof.modules == "auto"
    text = open(w.profile_path()).read()
    # why persistenced is proposed, and the snippet for the function the domain lacks
    assert "nvidia-persistenced.service   # PID" in text and "holds /dev/nvidia0" in text
    assert "function='0x1'" in text and "NOT in the domain XML" in text
    assert "gdm.service" in text   # the display manager resolved, in a comment
    assert "device 0000:01:00.1 (same IOMMU group, NOT in the domain XML)" in out
    assert "<source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/>" in out
    assert "display manager: gdm.service" in out
    # root-only writable, as the trust rule wants
    st = os.stat(w.profile_path())
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0


def test_init_from_gpu_and_audio_needs_no_snippet(make):
    w = make("nvidia")
    rc, out, _ = w.cli("init", "win11", "--xml", w.xml(["0000:01:00.0", "0000:01:00.1"]))
    assert rc == 0
    assert "add to the domain" not in out and "NOT in the domain XML" not in out
    text = open(w.profile_path()).read()
    assert "<hostdev mode" not in text


def test_init_extends_a_group_with_more_functions(make):
    w = make("turing")
    rc, out, _ = w.cli("init", "win11", "--xml", w.xml(["0000:01:00.0"]))
    assert rc == 0
    from vfio_hookd.profile import load_profile
    assert load_profile(w.paths, "win11").devices == sim.DEVICES["turing"]
    for fn in ("0x1", "0x2", "0x3"):
        assert f"function='{fn}'/>" in out
    assert out.count("NOT in the domain XML") == 3


def test_init_with_a_usb_controller_hostdev(make):
    # the host's own xHCI (alone in its group) passed beside the card; a USB hostdev is not PCI
    w = make("turing")
    usb = ("    <hostdev mode='subsystem' type='usb' managed='yes'><source>"
           "<vendor id='0x046d'/><product id='0xc077'/></source></hostdev>\n")
    rc, out, err = w.cli("init", "win11", "--xml", w.xml(list(sim.DEVICES["turing"]) + [HOST_XHCI],
                                                           extra=usb))
    assert rc == 0, err
    from vfio_hookd.profile import load_profile
    assert load_profile(w.paths, "win11").devices == sim.DEVICES["turing"] + (HOST_XHCI,)
    assert "NOT in the domain XML" not in out


def test_init_refuses_a_vm_without_hostdev_and_names_the_gpus(make):
    w = make("nvidia")
    rc, _, err = w.cli("init", "win11", "--xml", w.xml([]))
    assert rc == 5 and err.startswith("DOMAIN_XML_INVALID:")
    assert "0000:01:00.0" in err and "0000:01:00.1" in err and "<hostdev" in err
    assert not os.path.lexists(w.profile_path())


def test_init_never_overwrites_and_force_keeps_a_backup(make):
    w = make("nvidia")
    path = write_profile(w.dirs, "win11", "on_busy: terminate\n")
    rc, _, err = w.cli("init", "win11", "--xml", w.xml(["0000:01:00.0"]))
    assert rc == 30 and err.startswith("PROFILE_EXISTS:") and "--force" in err
    assert open(path).read() == "on_busy: terminate\n"
    rc, out, _ = w.cli("init", "win11", "--xml", w.xml(["0000:01:00.0"]), "--force")
    assert rc == 0
    backups = [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".bak")]
    assert len(backups) == 1 and backups[0] in out
    assert open(os.path.join(os.path.dirname(path), backups[0])).read() == "on_busy: terminate\n"
    assert "devices:" in open(path).read()


def test_init_on_an_amd_host_proposes_no_unit(make):
    w = make("amd")
    rc, out, _ = w.cli("init", "win11", "--xml", w.xml(["0000:03:00.0"]))
    assert rc == 0
    assert "display manager: sddm.service" in out
    assert "stop_units: none" in out


def test_init_and_check_without_systemd(make):
    """No bus (the fixture points DBUS_SYSTEM_BUS_ADDRESS nowhere): init still writes a valid
    profile and says what it could not resolve; check warns instead of failing."""
    from vfio_hookd import cli
    w = make("nvidia")
    xml = w.xml(sim.DEVICES["nvidia"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["init", "win11", "--xml", xml], host=w.host)
    assert rc == 0
    assert "note: systemd could not be asked" in out.getvalue()
    assert "stop_units: none" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["check", "win11", "--xml", xml, "--json"], host=w.host)
    checks = {c["name"]: c["status"] for c in json.loads(out.getvalue())["checks"]}
    assert checks["daemon.socket"] == "WARN" and checks["vm.holders"] == "WARN"


def test_init_without_iommu_refuses(make):
    w = make("nvidia", iommu_on=False)
    rc, _, err = w.cli("init", "win11", "--xml", w.xml(["0000:01:00.0"]))
    assert rc == 7 and "no IOMMU group" in err
    assert not os.path.lexists(w.profile_path())


# ---- check ------------------------------------------------------------------------------------

def _init(w, devices=None):
    devices = list(devices or sim.DEVICES[w.variant])
    xml = w.xml(devices)
    rc, _, err = w.cli("init", "win11", "--xml", xml)
    assert rc == 0, err
    return xml


def test_check_passes_on_a_healthy_host(make):
    w = make("nvidia")
    xml = _init(w)
    rc, by_name = w.check("win11", "--xml", xml)
    assert rc == 0
    assert {n: s for n, s in statuses(by_name).items() if s != ["PASS"]} == {}
    for name in ("iommu.firmware", "iommu.enabled", "iommu.groups", "iommu.cmdline", "vfio.pci",
                 "hook.installed", "hook.loaded", "daemon.socket", "daemon.service",
                 "vm.profile", "vm.devices", "vm.iommu_group", "vm.hostdevs", "vm.managed",
                 "vm.display_manager", "vm.stop_units", "vm.holders", "vm.reset_method",
                 "vm.power_state"):
        assert name in by_name
    rc, out, err = w.cli("check", "win11", "--xml", xml)
    assert rc == 0 and err == ""
    assert all(line.startswith("PASS  ") for line in out.splitlines())


def test_check_iommu_off(make):
    w = make("nvidia", iommu_on=False)
    write_profile(w.dirs, "win11", 'devices: ["0000:01:00.0", "0000:01:00.1"]\n'
                                   "stop_units: [nvidia-persistenced.service]\n")
    rc, by_name = w.check("win11", "--xml", w.xml(sim.DEVICES["nvidia"]))
    assert rc == 31
    s = statuses(by_name)
    assert s["iommu.firmware"] == ["PASS"]   # the table is there: the kernel has it off
    for name in ("iommu.enabled", "iommu.groups", "iommu.cmdline", "vm.iommu_group"):
        assert s[name] == ["FAIL"], name
    assert "intel_iommu=on" in by_name["iommu.enabled"][0]["fix"]


def test_check_hook_installed_after_libvirtd_started(make):
    w = make("nvidia", hook="after")
    rc, by_name = w.check()
    assert rc == 31
    [c] = by_name["hook.loaded"]
    assert c["status"] == "FAIL" and "PID 4242" in c["message"]
    assert c["fix"].startswith("systemctl restart libvirtd.service")


def test_check_hook_after_start_is_run_when_another_qemu_hook_was_there(make):
    """libvirt runs new files of qemu.d at once when a qemu hook existed at its start
    (FIELD-NOTES §1). ctime cannot be set back, so the older hook's times come from a Host
    that reports them as the epoch."""
    from testbed.sim import kernel as K
    from vfio_hookd.preflight import host_checks
    w = make("nvidia", hook="after")
    other = "/etc/libvirt/hooks/qemu"
    K.mkfile(w.root, other, "#!/bin/sh\nexit 0\n", 0o755)

    class OlderOther(type(w.host)):
        def stat(self, p):
            st = super().stat(p)
            return os.stat_result(tuple(st[:7]) + (0, 0, 0)) if p == other else st
    [installed, loaded] = host_checks.hook(OlderOther(w.root))
    assert installed.status == loaded.status == "PASS"
    assert other in loaded.message
    [_, loaded] = host_checks.hook(w.host)   # the same hook, as new as ours: not enough
    assert loaded.status == "FAIL"


@pytest.mark.parametrize("mode", ["absent", "not-executable"])
def test_check_hook_missing_or_not_executable(make, mode):
    w = make("nvidia", hook=mode)
    rc, by_name = w.check()
    assert rc == 31 and statuses(by_name)["hook.installed"] == ["FAIL"]
    assert "hook.loaded" not in by_name


def test_check_no_libvirt_daemon_running_is_fine(make):
    w = make("nvidia", libvirtd=False)
    rc, by_name = w.check()
    assert rc == 0 and "finds the hook when it starts" in by_name["hook.loaded"][0]["message"]


def test_check_daemon_units_and_vfio_pci(make):
    w = make("nvidia", daemon="off", vfio_pci=False)
    rc, by_name = w.check()
    s = statuses(by_name)
    assert rc == 31
    assert s["daemon.socket"] == ["FAIL"] and s["daemon.service"] == ["FAIL"]
    assert s["vfio.pci"] == ["FAIL"]


def test_check_holder_that_nothing_ends(make, holder):
    w = make("nvidia")
    xml = _init(w)
    stray = holder(w, "/dev/dri/renderD128")
    rc, by_name = w.check("win11", "--xml", xml)
    assert rc == 31
    [c] = by_name["vm.holders"]
    assert c["status"] == "FAIL" and f"PID {stray.pid}" in c["message"]
    assert f"stop PID {stray.pid}" in c["fix"] and "on_busy: terminate" in c["fix"]
    # with on_busy: terminate the same holder is a warning
    text = open(w.profile_path()).read().replace("on_busy: fail", "on_busy: terminate")
    write_profile(w.dirs, "win11", text)
    rc, by_name = w.check("win11", "--xml", xml)
    assert rc == 0 and statuses(by_name)["vm.holders"] == ["WARN"]


def test_check_service_holding_the_gpu_not_in_stop_units(make):
    w = make("nvidia")
    write_profile(w.dirs, "win11", 'devices: ["0000:01:00.0", "0000:01:00.1"]\n')
    rc, by_name = w.check("win11", "--xml", w.xml(sim.DEVICES["nvidia"]))
    [c] = by_name["vm.holders"]
    assert rc == 31 and c["status"] == "FAIL"
    assert "add nvidia-persistenced.service to stop_units" in c["fix"]
    assert "gdm.service" in c["message"]   # listed among those that end (the DM's stop)


def test_check_unknown_unit_in_the_profile(make):
    w = make("nvidia")
    write_profile(w.dirs, "win11", 'devices: ["0000:01:00.0", "0000:01:00.1"]\n'
                                   "stop_units: [nvidia-persistenced.service, nope.service]\n")
    rc, by_name = w.check("win11", "--xml", w.xml(sim.DEVICES["nvidia"]))
    [c] = by_name["vm.stop_units"]
    assert rc == 31 and c["status"] == "FAIL" and "nope.service" in c["message"]


def test_check_incomplete_group(make):
    w = make("turing")
    write_profile(w.dirs, "win11", 'devices: ["0000:01:00.0", "0000:01:00.1"]\n'
                                   "stop_units: [nvidia-persistenced.service]\n")
    rc, by_name = w.check("win11", "--xml", w.xml(["0000:01:00.0", "0000:01:00.1"]))
    [c] = by_name["vm.iommu_group"]
    assert rc == 31 and c["status"] == "FAIL"
    assert "0000:01:00.2" in c["message"] and "0000:01:00.3" in c["message"]


def test_check_domain_hostdevs_against_the_profile(make):
    w = make("nvidia")
    write_profile(w.dirs, "win11", 'devices: ["0000:01:00.0", "0000:01:00.1"]\n'
                                   "stop_units: [nvidia-persistenced.service]\n")
    # the domain passes the onboard audio too, unmanaged: nothing would bind it
    rc, by_name = w.check("win11", "--xml", w.xml(["0000:01:00.0", "0000:01:00.1",
                                                   "0000:00:1f.3"], managed=False))
    s = statuses(by_name)
    assert rc == 31 and s["vm.hostdevs"] == ["FAIL"] and s["vm.managed"] == ["FAIL"]
    # the domain lacks the audio function: a warning with the snippet
    rc, by_name = w.check("win11", "--xml", w.xml(["0000:01:00.0"]))
    [c] = by_name["vm.hostdevs"]
    assert rc == 0 and c["status"] == "WARN" and "function='0x1'" in c["fix"]


def test_check_amd_card_with_the_reset_bug(make):
    w = make("amd", amd_device="0x731f")
    xml = _init(w)
    rc, by_name = w.check("win11", "--xml", xml)
    [c] = by_name["vm.amd_reset"]
    assert rc == 0 and c["status"] == "WARN" and "vendor-reset" in c["fix"]


def test_check_amd_card_with_vendor_reset(make):
    w = make("amd", amd_device="0x731f", vendor_reset=True)
    rc, by_name = w.check("win11", "--xml", _init(w))
    assert statuses(by_name)["vm.amd_reset"] == ["PASS"]


def test_check_amd_card_without_the_reset_bug_says_nothing_of_it(make):
    w = make("amd")   # 1002:73bf, Navi 21: not in vendor-reset's list
    rc, by_name = w.check("win11", "--xml", _init(w))
    assert rc == 0 and "vm.amd_reset" not in by_name


@pytest.mark.parametrize("mode,status", [("off", "WARN"), ("on", "PASS")])
def test_check_selinux_boolean(make, mode, status):
    w = make("nvidia", selinux=mode)
    rc, by_name = w.check()
    assert rc == 0 and statuses(by_name)["selinux.hooks"] == [status]


def test_check_without_selinux_has_no_selinux_line(make):
    rc, by_name = make("nvidia").check()
    assert "selinux.hooks" not in by_name


def test_check_unmanaged_vm(make):
    w = make("nvidia")
    rc, by_name = w.check("win11", "--xml", w.xml(["0000:01:00.0"]))
    [c] = by_name["vm.profile"]
    assert rc == 31 and c["status"] == "FAIL" and c["fix"] == "vfio-hookd init win11"


def test_check_without_the_domain_xml_warns(make, monkeypatch):
    # libvirt's built-in test driver has no domain win11
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    w = make("nvidia")
    _init(w)
    rc, by_name = w.check("win11")
    assert rc == 0 and statuses(by_name)["vm.domain"] == ["WARN"]
    assert "vm.hostdevs" not in by_name and statuses(by_name)["vm.holders"] == ["PASS"]


def test_check_json_document(make):
    w = make("nvidia", hook="after")
    rc, out, err = w.cli("check", "--json")
    doc = json.loads(out)
    assert rc == 31 and doc["ok"] is False and doc["counts"]["FAIL"] == 1
    assert err.startswith("CHECK_FAILED: 1 of") and "hook.loaded" in err


def test_check_changes_nothing(make):
    w = make("nvidia")
    xml = _init(w)
    from testbed.sim import hosts
    before = hosts.snapshot(w.root), w.fake.list_units()
    w.check("win11", "--xml", xml)
    assert (hosts.snapshot(w.root), w.fake.list_units()) == before


# ---- plan -------------------------------------------------------------------------------------

def _cli(world, *argv) -> tuple[int, str, str]:
    from vfio_hookd import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv), host=world.host, systemd_factory=lambda: world.fake)
    return rc, out.getvalue(), err.getvalue()


def _record_observes(machine) -> dict:
    """``{step: facts}`` as the prepare writes them to the record before applying the step
    (the record is saved with the facts, status ``applying``, before anything changes)."""
    import copy
    observed: dict = {}
    save = machine.records.save

    def saving(rec):
        for e in rec.steps:
            if e.status == "applying" and e.name not in observed:
                observed[e.name] = copy.deepcopy(e.facts)
        return save(rec)
    machine.records.save = saving
    return observed


@pytest.mark.parametrize("variant", ["nvidia", "amd", "turing", "twogpu"])
def test_plan_is_what_the_following_prepare_records(dirs, variant):
    from conftest import SimWorld
    from vfio_hookd.plan_view import document
    w = SimWorld(dirs, variant)
    try:
        w.profile()
        plan = w.machine.plan_prepare("win11")
        doc = json.loads(json.dumps(document(w.machine, plan)))   # as --json prints it
        recorded = _record_observes(w.machine)
        rec = w.machine.prepare("win11")
        assert [s["name"] for s in doc["steps"]] == [s.name for s in rec.steps]
        assert {s["name"]: s["facts"] for s in doc["steps"]} == recorded
        assert doc["deadline_s"] == plan.deadline_s
        assert [d["driver"] for d in doc["devices"]] == [rec.drivers[a] for a in rec.devices]
        w.machine.release("win11")
    finally:
        w.close()


def test_plan_cli_shows_every_step_and_the_deadline_and_changes_nothing(world):
    world.profile()
    before = world.snapshot()
    rc, out, err = _cli(world, "plan", "win11")
    assert rc == 0, err
    assert world.snapshot() == before
    from vfio_hookd.steps import STEP_NAMES
    for name in STEP_NAMES:
        assert f"  step {name}\n" in out
    plan = world.machine.plan_prepare("win11")
    assert f"deadline: {plan.deadline_s:g} s" in out
    assert "  step units\n    plan: gdm.service, nvidia-persistenced.service\n" in out
    assert "plan: nvidia_drm, nvidia_uvm, nvidia_modeset, nvidia\n" in out
    rc, out, _ = _cli(world, "plan", "win11", "--json")
    assert rc == 0 and json.loads(out)["deadline_s"] == plan.deadline_s


def test_plan_renders_a_step_it_does_not_know(world, monkeypatch):
    """New steps (sessions, user units, ...) show up without the plan verb knowing them."""
    from vfio_hookd import machine
    from vfio_hookd.steps import Step

    class Sessions(Step):
        name = "sessions"

        def observe(self, ctx):
            return {"plan": ["session 2 (alice)"], "why": {"session 2": "on seat0"},
                    "skipped": []}
    monkeypatch.setattr(machine, "STEPS", machine.STEPS[:1] + (Sessions(),) + machine.STEPS[1:])
    world.profile()
    rc, out, _ = _cli(world, "plan", "win11")
    assert rc == 0
    assert "  step sessions\n    plan: session 2 (alice)\n    why: session 2: on seat0\n" in out


def test_plan_refuses_what_prepare_refuses(world):
    write_profile(world.dirs, "win11", 'devices: ["0000:01:00.0"]\n')
    rc, _, err = _cli(world, "plan", "win11")
    assert rc == 7 and err.startswith("IOMMU_GROUP_INCOMPLETE:")
    rc, _, err = _cli(world, "plan", "win10")
    assert rc == 4 and err.startswith("NOT_MANAGED:")


def test_plan_of_a_prepared_vm(world):
    world.profile()
    world.machine.prepare("win11")
    try:
        rc, out, _ = _cli(world, "plan", "win11")
        assert rc == 0 and "prepared already" in out and "step " not in out
    finally:
        world.machine.release("win11")


def test_plan_names_the_holders_now_and_what_ends_them(world, holder):
    world.profile()
    stray = holder(world, "/dev/dri/renderD128")
    rc, out, _ = _cli(world, "plan", "win11")
    assert rc == 0
    assert "(gdm, unit gdm.service) holds /dev/dri/card0" in out
    assert "ends: its unit is stopped" in out
    assert (f"holding the GPU now: PID {stray.pid} (sleep) holds /dev/dri/renderD128: nothing "
            f"ends it: on_busy: fail fails the start (DEVICE_BUSY)") in out
    rc, out, _ = _cli(world, "plan", "win11", "--json")
    ends = {h["pid"]: h["ends"] for h in json.loads(out)["holders_now"]}
    assert ends[stray.pid] == "on_busy" and sorted(set(ends.values())) == ["on_busy", "unit"]


@pytest.mark.parametrize("pid,unit,want", [
    (4242, "gdm.service", "unit"),
    (4243, "nvidia-persistenced.service", "unit"),
    (4244, "session-11.scope", "session"),
    (4245, "user@1000.service", "user"),
    (4246, "user@102.service", "user"),
    (1, "init.scope", "system"),
    (268, "systemd-logind.service", "system"),
    (4247, "ollama.service", None),
    (4248, None, None),
])
def test_what_ends_each_holder_is_what_the_steps_do(pid, unit, want):
    """check and plan say of each holder what the units and sessions steps do with it (the
    real-systemd guest: weston in a session, WirePlumber in alice's and the greeter's user
    instances, PID 1 and logind holding card0 for weston); before the sessions step existed,
    check told a user to put systemd-logind.service in stop_units."""
    from vfio_hookd.gpu_users import FATES, GpuUser, fate
    got = fate(GpuUser(pid, "x", ["/dev/dri/card0"], unit), "gdm.service",
               ["nvidia-persistenced.service"])
    assert got == want and (got is None or got in FATES)
