"""Host shapes: vfio-hookd takes only what the VM needs (issue 7): modules shared with devices
that are not handed over stay, the desktop and the consoles stay when the GPU handed over is
not the one they use, and the record says why each step did or did not act."""

from __future__ import annotations

import os

import pytest

from vfio_hookd import pci
from vfio_hookd.host import Host

pytestmark = pytest.mark.unit


def test_the_plan_names_each_module_and_why(world):
    world.profile()
    plan = world.machine.plan_prepare("win11")
    rec = world.machine.prepare("win11")
    facts = rec.step("modules").facts
    order = facts["plan"]
    assert sorted(order) == ["nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm"]
    # holders first: nvidia_drm before nvidia_modeset before nvidia
    assert order.index("nvidia_drm") < order.index("nvidia_modeset") < order.index("nvidia")
    assert facts["why"]["nvidia"].startswith("drives 0000:01:00.0")
    assert facts["why"]["nvidia_drm"].startswith("drives no device")
    assert facts["why"]["snd_hda_intel"].startswith("never unloaded: snd_hda_intel also drives")
    assert plan.shape.modules >= len(facts["plan"])
    world.machine.release("win11")


def test_a_module_that_drives_a_device_not_handed_over_stays(world):
    """Hand over only the audio function: snd_hda_intel is never unloaded, and nvidia, which
    drives the VGA function that stays, is not touched either."""
    order, why = pci.unload_plan(world.host, ["nvidia", "snd_hda_intel"], ["0000:01:00.1"])
    assert order == []
    assert why["nvidia"].startswith("also drives 0000:01:00.0")
    assert "snd_hda_intel" in why and why["snd_hda_intel"].startswith("never unloaded")


def test_devices_of_module_follow_the_driver_links(world):
    devs = pci.devices_of_module(world.host, "nvidia")
    assert [d.rsplit("/", 1)[1] for d in devs] == ["0000:01:00.0"]
    assert pci.devices_of_module(world.host, "no_such_module") == []


def test_the_units_step_says_why_it_stops_the_display_manager(world):
    world.profile()
    rec = world.machine.prepare("win11")
    why = rec.step("units").facts["why"]
    assert why["gdm.service"].startswith("the desktop uses the GPU: PID ")
    assert "(gdm, unit gdm.service) holds /dev/dri/card0, " in why["gdm.service"]
    assert why["nvidia-persistenced.service"] == "stop_units in the profile"
    world.machine.release("win11")


# ---- the shapes users have: prepare/release on each (testbed.sim.shapes) -----------------------
import subprocess  # noqa: E402

from conftest import SimWorld, diff  # noqa: E402
from testbed.expected import classify_changes  # noqa: E402
from testbed.sim import faults  # noqa: E402
from vfio_hookd import errors  # noqa: E402
from vfio_hookd.errors import HookdError  # noqa: E402
from vfio_hookd.steps import STEP_NAMES  # noqa: E402

HOST_USB = "0000:00:14.0"
HOST_KEYBOARD = "/sys/bus/usb/devices/1-2"
USB_MODULES = ("usbcore", "xhci_hcd", "xhci_pci", "usbhid")
SHAPES = ("turing", "twogpu", "twogpu-vfio", "bios-text", "amd", "nvidia")


def _restored(before, after, allowed=()):
    """Only the kernel's own changes (testbed.expected) between two snapshots, same units."""
    assert after["units"] == before["units"]
    _expected, left = classify_changes(before["tree"], after["tree"])
    assert left == {}, left


def _host_usb_bound(w) -> None:
    host = w.host
    assert host.link_name(f"/sys/bus/pci/devices/{HOST_USB}/driver") == "xhci_hcd"
    assert host.link_name(f"{HOST_KEYBOARD}/driver") == "usb"
    assert host.link_name(f"{HOST_KEYBOARD}/1-2:1.0/driver") == "usbhid"
    for m in USB_MODULES:
        assert host.module_loaded(m), m


@pytest.fixture(params=SHAPES)
def shape(request, dirs):
    w = SimWorld(dirs, request.param)
    yield w
    w.close()


def test_each_shape_round_trips_to_the_same_host(shape):
    shape.profile()
    before = shape.snapshot()
    rec = shape.machine.prepare("win11")
    for addr in shape.devices:
        assert shape.host.link_name(f"/sys/bus/pci/devices/{addr}/driver") == "vfio-pci"
    shape.machine.release("win11")
    _restored(before, shape.snapshot())
    assert [s.status for s in rec.steps] == ["done"] * len(STEP_NAMES)


def test_a_gpu_with_a_usb_c_controller_leaves_the_hosts_usb_alone(turing_world):
    w = turing_world
    w.profile()
    _host_usb_bound(w)
    rec = w.machine.prepare("win11")
    _host_usb_bound(w)   # the keyboard stays while the VM runs
    why = rec.step("modules").facts["why"]
    plan = rec.step("modules").facts["plan"]
    assert not set(plan) & set(USB_MODULES), plan
    assert why["usbcore"].startswith("also drives usb1")
    assert why["xhci_pci"] == f"also drives {HOST_USB}, not handed over"
    assert "i2c_nvidia_gpu" in plan   # the UCSI function's driver drives only that function
    # the xHCI and UCSI functions were simply unbound, like the others
    assert w.host.listdir("/sys/bus/pci/devices/0000:01:00.2/") and \
        not w.host.exists("/sys/bus/pci/devices/0000:01:00.2/usb3")
    w.machine.release("win11")
    _host_usb_bound(w)


def test_a_busy_usb_module_does_not_fail_the_start(turing_world):
    """With the keyboard's event node held (systemd-logind) usbhid cannot go: it is not asked."""
    w = turing_world
    w.profile()
    rec = w.machine.prepare("win11")
    assert "usbhid" not in rec.step("modules").facts["plan"]
    assert w.systemd.list_units()["systemd-logind.service"] == "active"
    w.machine.release("win11")


@pytest.mark.parametrize("variant", ["twogpu", "twogpu-vfio"])
def test_a_second_gpu_is_handed_over_with_the_desktop_running(dirs, variant):
    w = SimWorld(dirs, variant)
    try:
        w.profile()
        dm_pid = w.systemd.procs and next(p for p, u in w.systemd.procs.items()
                                          if u.id == "gdm.service")
        before = w.snapshot()
        rec = w.machine.prepare("win11")
        units = rec.step("units").facts
        assert units["plan"] == [] and units["skipped"][0].startswith("gdm.service (left running")
        for step in ("vtconsoles", "framebuffer"):
            assert rec.step(step).facts["plan"] == []
            assert "shows the boot display" in rec.step(step).facts["skipped"][0]
        assert w.systemd.unit_of_pid(dm_pid) == "gdm.service"   # same process throughout
        assert w.systemd.list_units() == before["units"]
        w.machine.release("win11")
        assert w.systemd.unit_of_pid(dm_pid) == "gdm.service"
        _restored(before, w.snapshot())
        if variant == "twogpu-vfio":   # nothing to do at all: the host did not change
            assert diff(before["tree"], w.snapshot()["tree"]) == {}
            assert rec.step("bind_vfio").facts["done"] == []
    finally:
        w.close()


def test_a_vga_text_console_is_warned_of_and_its_removal_reported(bios_text_world):
    w = bios_text_world
    w.profile()
    rec = w.machine.prepare("win11")
    warning = rec.step("vtconsoles").facts["warnings"][0]
    assert "VGA text console (vtcon0)" in warning and "until reboot" in warning
    rec = w.machine.release("win11")
    notes = rec.step("vtconsoles").notes
    assert notes and "removed by the kernel's VGA arbiter" in notes[0]
    st = w.machine.status("win11")["vms"]["win11"]
    vt = next(s for s in st["steps"] if s["name"] == "vtconsoles")
    assert vt["notes"] == notes and vt["warnings"] == [warning]


def test_a_holder_nothing_stopped_fails_the_start_at_once(world, monkeypatch):
    """No grace period for a process no stopped unit or session owns: it is named at once."""
    from vfio_hookd import procs
    waited = []
    monkeypatch.setattr(procs, "wait_gone", lambda pid, t: waited.append(pid) or False)
    world.profile()
    with open(world.host.path("/dev/dri/card0")) as f:
        stranger = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        with pytest.raises(HookdError) as exc:
            world.machine.prepare("win11")
        assert exc.value.code == errors.DEVICE_BUSY and f"PID {stranger.pid}" in exc.value.message
        assert waited == []
    finally:
        stranger.kill()
        stranger.wait()


#: Per shape, the first host operation of each step that acts there (None: a process holds a
#: node of the functions, for the holders step). Steps that do nothing on a shape (the units
#: and console steps on a second GPU) have no operation to fail.
FAULTS = {
    "turing": {"units": ("stop", "gdm.service"), "holders": "/dev/i2c-5",
               "vtconsoles": ("write", "/sys/class/vtconsole/vtcon1/bind"),
               "framebuffer": ("write", "/sys/bus/platform/drivers/efi-framebuffer/unbind"),
               "modules": ("rmmod", "nvidia_drm"),
               "bind_vfio": ("write", "/sys/bus/pci/drivers_probe")},
    "amd": {"units": ("stop", "sddm.service"), "holders": "/dev/kfd",
            "vtconsoles": ("write", "/sys/class/vtconsole/vtcon1/bind"),
            "modules": ("rmmod", "amdgpu"), "bind_vfio": ("write", "/sys/bus/pci/drivers_probe")},
    "bios-text": {"units": ("stop", "gdm.service"), "holders": "/dev/nvidia0",
                  "modules": ("rmmod", "nvidia_drm"),
                  "bind_vfio": ("write", "/sys/bus/pci/drivers_probe")},
    "twogpu": {"holders": "/dev/dri/card1", "modules": ("rmmod", "amdgpu"),
               "bind_vfio": ("write", "/sys/bus/pci/drivers_probe")},
}
FAULT_CASES = [(shape, step) for shape, steps in FAULTS.items() for step in steps]


@pytest.mark.parametrize("variant,name", FAULT_CASES, ids=[f"{a}-{b}" for a, b in FAULT_CASES])
def test_a_fault_at_each_step_of_each_shape_rolls_back(dirs, variant, name):
    w = SimWorld(dirs, variant)
    p = None
    try:
        w.profile()
        target = FAULTS[variant][name]
        if isinstance(target, str):   # holders: a stranger holds one of the functions' nodes
            f = open(w.host.path(target))
            p = subprocess.Popen(["sleep", "60"], stdin=f)
            f.close()
            # the stranger's open node is part of the host as it was; the simulated kernel
            # updates refcnt on its next operation (a no-op write here)
            w.host.write(f"/sys/bus/pci/devices/{w.devices[0]}/driver_override", "\n", 5)
        else:
            faults.inject(w.root, target[0], target[1], "fail", errno=5, count=1)
        before = w.snapshot()
        with pytest.raises(HookdError) as exc:
            w.machine.prepare("win11")
        assert exc.value.details["step"] == name
        if variant == "turing":
            _host_usb_bound(w)
        _restored(before, w.snapshot())
        rec = w.machine.records.load("win11")
        assert rec.phase == "failed" and not rec.holds_host
    finally:
        if p:
            p.kill()
            p.wait()
        w.close()


# ---- the firmware framebuffer's nodes: below /sys/devices/platform (<= 6.8) or the GPU (6.9+) --
def _fb_host(root, layout: str, boot_vga: str = "1") -> Host:
    """A minimal sysfs: GPU 0000:01:00.0 (``boot_vga`` as given) with its card0, audio
    0000:01:00.1, and efi-framebuffer.0 with fb0, at the place ``layout`` says: ``platform``
    (Linux <= 6.8, Debian's 6.1) or ``pci`` (6.9+, below the boot GPU; Debian's 6.12)."""
    def mk(p, text=None):
        full = os.path.join(root, p.lstrip("/"))
        if text is None:
            os.makedirs(full, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)

    def ln(p, target):
        full = os.path.join(root, p.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        os.symlink(os.path.join(root, target.lstrip("/")), full)

    port = "/sys/devices/pci0000:00/0000:00:10.0"
    for fn, cls, vga in (("0000:01:00.0", "0x030000", boot_vga),
                         ("0000:01:00.1", "0x040300", None)):
        mk(f"{port}/{fn}/class", cls + "\n")
        if vga is not None:
            mk(f"{port}/{fn}/boot_vga", vga + "\n")
        ln(f"/sys/bus/pci/devices/{fn}", f"{port}/{fn}")
    mk(f"{port}/0000:01:00.0/drm/card0/uevent", "MAJOR=226\nMINOR=0\nDEVNAME=dri/card0\n")
    mk(f"{port}/0000:01:00.1/sound/card0/controlC0/uevent", "DEVNAME=snd/controlC0\n")
    fb = ("/sys/devices/platform/efi-framebuffer.0" if layout == "platform"
          else f"{port}/0000:01:00.0/efi-framebuffer.0")
    mk(f"{fb}/graphics/fb0/uevent", "MAJOR=29\nMINOR=0\nDEVNAME=fb0\n")
    ln("/sys/bus/platform/devices/efi-framebuffer.0", fb)
    return Host(str(root))


@pytest.mark.parametrize("layout", ["platform", "pci"])
def test_the_firmware_framebuffers_node_is_the_boot_gpus(tmp_path, layout):
    """efifb's /dev/fb0 draws into the boot GPU's memory: a process holding it holds the GPU,
    on Linux 6.1 (efi-framebuffer.0 below /sys/devices/platform) as on 6.12 (below the GPU)."""
    host = _fb_host(tmp_path, layout)
    assert pci.device_nodes(host, "0000:01:00.0") == ["/dev/dri/card0", "/dev/fb0"]
    assert pci.device_nodes(host, "0000:01:00.1") == ["/dev/snd/controlC0"]


def test_the_firmware_framebuffer_of_another_boot_gpu_is_not_this_gpus(tmp_path):
    host = _fb_host(tmp_path, "platform", boot_vga="0")
    os.makedirs(tmp_path / "sys/devices/pci0000:00/0000:00:02.0")
    (tmp_path / "sys/devices/pci0000:00/0000:00:02.0/boot_vga").write_text("1\n")
    os.symlink(tmp_path / "sys/devices/pci0000:00/0000:00:02.0",
               tmp_path / "sys/bus/pci/devices/0000:00:02.0")
    assert pci.device_nodes(host, "0000:01:00.0") == ["/dev/dri/card0"]
