"""The host shapes of testbed.sim.shapes (turing, twogpu, twogpu-vfio, bios-text) and amd's
/dev/kfd: each builds, is stable, and the simulated kernel acts on it as Linux would.

Only the simulated kernel and its fake systemd are exercised here (raw sysfs writes and kmod
commands through SimHost), never the product's steps or machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess

import pytest

from testbed import sim
from testbed.expected import classify_changes, renumbered, vgacon_replaced
from testbed.sim import hosts
from testbed.sim.kernel import SimHost, locked_kernel
from vfio_hookd import errors

pytestmark = pytest.mark.unit

T = 2.0
SHAPES = ("turing", "twogpu", "twogpu-vfio", "bios-text")
GPU, AUDIO, XHCI, UCSI = sim.DEVICES["turing"]
HOST_XHCI, SMBUS, IGPU = "0000:00:14.0", "0000:00:1f.4", "0000:00:02.0"


def build(tmp_path, variant: str, name: str = "host", **kw) -> SimHost:
    root = str(tmp_path / name)
    if kw:
        hosts.build_host(root, variant, **kw)
    else:
        sim.make_host(root, variant)
    return SimHost(root)


@pytest.fixture
def turing(tmp_path) -> SimHost:
    return build(tmp_path, "turing")


@contextlib.contextmanager
def holding(h: SimHost, p: str):
    """A real process (sleep) holding host node ``p`` open."""
    with open(h.path(p)) as f:
        proc = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def driver(h: SimHost, addr: str) -> str | None:
    return h.link_name(f"/sys/bus/pci/devices/{addr}/driver")


def drivers(h: SimHost) -> dict:
    return {a: driver(h, a) for a in h.listdir("/sys/bus/pci/devices")}


def rmmod(h: SimHost, m: str) -> tuple[int, str]:
    return h.run_command(["rmmod", m], T)


def modprobe(h: SimHost, m: str) -> tuple[int, str]:
    return h.run_command(["modprobe", m], T)


def unbind(h: SimHost, addr: str) -> None:
    h.write(f"/sys/bus/pci/devices/{addr}/driver/unbind", addr, T)


def probe(h: SimHost, addr: str) -> None:
    h.write("/sys/bus/pci/drivers_probe", addr, T)


def to_vfio(h: SimHost, addr: str) -> None:
    h.write(f"/sys/bus/pci/devices/{addr}/driver_override", "vfio-pci", T)
    if driver(h, addr):
        unbind(h, addr)
    probe(h, addr)


def give_back(h: SimHost, addr: str) -> None:
    h.write(f"/sys/bus/pci/devices/{addr}/driver_override", "\n", T)
    h.write("/sys/bus/pci/drivers/vfio-pci/unbind", addr, T)
    probe(h, addr)


def vtcons(h: SimHost) -> dict:
    return {v: (h.read(f"/sys/class/vtconsole/{v}/name"), h.read(f"/sys/class/vtconsole/{v}/bind"))
            for v in h.listdir("/sys/class/vtconsole")}


def held(h: SimHost, *nodes: str) -> bool:
    """True when some process holds one of ``nodes`` (the simulated kernel's own scan)."""
    with locked_kernel(h.root) as k:
        return k.held(k.node_ids(nodes))


def bus_driver(h: SimHost, bus: str, dev: str) -> tuple[str | None, str | None]:
    """(driver, module of the driver) of device ``dev`` on ``bus``."""
    drv = h.link_name(f"/sys/bus/{bus}/devices/{dev}/driver")
    mod = h.link_name(f"/sys/bus/{bus}/drivers/{drv}/module") if drv else None
    return drv, mod


# ---- every shape -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", SHAPES)
def test_shape_builds_the_same_every_time_with_its_units_and_devices(tmp_path, variant):
    one, two = build(tmp_path, variant, "one"), build(tmp_path, variant, "two")
    snap = hosts.snapshot(one.root)
    assert snap == hosts.snapshot(one.root) == hosts.snapshot(two.root)
    for p, (kind, value) in snap.items():   # sysfs links are relative and stay inside
        if kind == "link":
            assert not value.startswith("/") and one.resolve(p), p
    with open(os.path.join(one.root, ".sim", "units.json")) as f:
        assert json.load(f) == sim.UNITS[variant]
    # the functions a VM is handed are exactly one whole IOMMU group
    group = one.listdir("/sys/kernel/iommu_groups/1/devices")
    assert tuple(group) == sim.DEVICES[variant]
    with pytest.raises(ValueError):
        hosts.build_host(one.root, variant)   # not empty


def test_bios_text_is_booted_by_a_bios_only(tmp_path):
    with pytest.raises(ValueError):
        build(tmp_path, "bios-text", firmware="efi")


@pytest.mark.parametrize("fixture", ["turing_world", "twogpu_world", "twogpu_vfio_world",
                                     "bios_text_world"])
def test_worlds_run_their_units(request, fixture):
    w = request.getfixturevalue(fixture)
    units = w.systemd.list_units()
    assert units == {u: "active" if spec.get("active") else "inactive"
                     for u, spec in sim.UNITS[w.variant].items()}
    assert w.devices == sim.DEVICES[w.variant]
    assert all(w.host.exists(f"/sys/bus/pci/devices/{a}") for a in w.devices)


# ---- turing ------------------------------------------------------------------------------------
def test_turing_boots_with_four_functions_and_their_children(turing):
    assert drivers(turing) == {
        "0000:00:01.0": "pcieport", HOST_XHCI: "xhci_hcd", "0000:00:1f.3": "snd_hda_intel",
        SMBUS: "i801_smbus", GPU: "nvidia", AUDIO: "snd_hda_intel", XHCI: "xhci_hcd",
        UCSI: "nvidia-gpu"}
    assert turing.link_name("/sys/bus/pci/drivers/xhci_hcd/module") == "xhci_pci"
    assert turing.link_name("/sys/bus/pci/drivers/nvidia-gpu/module") == "i2c_nvidia_gpu"
    xhci = turing.resolve(f"/sys/bus/pci/devices/{XHCI}")
    # the card's root hubs and the device on them: children of the function
    for dev, drv, mod in (("usb3", "usb", "usbcore"), ("usb4", "usb", "usbcore"),
                          ("3-0:1.0", "hub", "usbcore"), ("3-1", "usb", "usbcore"),
                          ("3-1:1.0", "usbhid", "usbhid")):
        assert turing.resolve(f"/sys/bus/usb/devices/{dev}").startswith(xhci + "/"), dev
        assert bus_driver(turing, "usb", dev) == (drv, mod), dev
    assert turing.resolve("/sys/bus/usb/devices/usb3") == f"{xhci}/usb3"
    assert turing.read("/sys/bus/usb/devices/usb3/serial") == XHCI
    assert bus_driver(turing, "hid", "0003:046D:C077.0002") == ("hid-generic", "hid_generic")
    assert turing.resolve("/sys/class/input/event4").startswith(xhci + "/")
    assert turing.read("/sys/class/input/event4/dev") == "13:68"
    for node in ("/dev/bus/usb/003/001", "/dev/bus/usb/003/002", "/dev/bus/usb/004/001",
                 "/dev/input/event4", "/dev/input/mouse0", "/dev/hidraw1"):
        assert turing.exists(node), node
    # the host's own controller, beside it
    assert [d for d in turing.listdir("/sys/bus/usb/devices")
            if turing.resolve(f"/sys/bus/usb/devices/{d}").startswith(
                turing.resolve(f"/sys/bus/pci/devices/{HOST_XHCI}") + "/")] == [
        "1-0:1.0", "1-2", "1-2:1.0", "2-0:1.0", "usb1", "usb2"]
    assert bus_driver(turing, "usb", "1-2:1.0") == ("usbhid", "usbhid")
    assert "Keyboard" in turing.read("/sys/class/input/input3/name")
    # UCSI: its adapter, node, client and port
    ucsi = turing.resolve(f"/sys/bus/pci/devices/{UCSI}")
    assert turing.resolve("/sys/bus/i2c/devices/i2c-5") == f"{ucsi}/i2c-5"
    assert turing.read("/sys/bus/i2c/devices/i2c-5/name") == "NVIDIA GPU I2C adapter"
    assert turing.resolve("/sys/class/i2c-dev/i2c-5/device") == f"{ucsi}/i2c-5"
    assert turing.read("/sys/class/i2c-dev/i2c-5/dev") == "89:5" and turing.exists("/dev/i2c-5")
    assert bus_driver(turing, "i2c", "5-0008") == ("ucsi_ccg", "ucsi_ccg")
    assert turing.resolve("/sys/class/typec/port0").startswith(f"{ucsi}/i2c-5/5-0008/")
    # i2c-0 the host's SMBus, i2c-1..4 the proprietary driver's DDC adapters
    assert turing.read("/sys/bus/i2c/devices/i2c-0/name").startswith("SMBus I801")
    assert [turing.read(f"/sys/bus/i2c/devices/i2c-{n}/name") for n in range(1, 5)] == [
        f"NVIDIA i2c adapter {n} at 1:00.0" for n in (1, 3, 5, 6)]
    # modules: holders as in Debian's 6.1, i2c_core built in
    assert turing.listdir("/sys/module/usbcore/holders") == ["usbhid", "xhci_hcd", "xhci_pci"]
    assert turing.read("/sys/module/usbcore/refcnt") == "3"
    assert turing.listdir("/sys/module/xhci_hcd/holders") == ["xhci_pci"]
    assert turing.listdir("/sys/module/typec_ucsi/holders") == ["ucsi_ccg"]
    assert turing.module_builtin("i2c_core")
    assert turing.listdir("/sys/module/usbcore/drivers") == ["usb:hub", "usb:usb", "usb:usbfs"]


def test_turing_xhci_unbind_removes_only_its_own_root_hubs(turing):
    before = hosts.snapshot(turing.root)
    unbind(turing, XHCI)
    assert driver(turing, XHCI) is None
    assert turing.listdir("/sys/bus/usb/devices") == [
        "1-0:1.0", "1-2", "1-2:1.0", "2-0:1.0", "usb1", "usb2"]
    assert turing.listdir("/sys/bus/usb/drivers/usbhid") == ["1-2:1.0", "bind", "module",
                                                             "uevent", "unbind"]
    assert turing.listdir("/sys/bus/hid/devices") == ["0003:046D:C31C.0001"]
    assert turing.listdir("/dev/bus/usb") == ["001", "002"]   # devtmpfs drops 003, 004
    assert turing.listdir("/dev/input") == ["event3"] and not turing.exists("/dev/hidraw1")
    assert not any(e.startswith("usb") for e in turing.listdir(
        turing.resolve(f"/sys/bus/pci/devices/{XHCI}")))
    assert turing.exists("/dev/i2c-5") and driver(turing, HOST_XHCI) == "xhci_hcd"
    # bound again: the same buses, the device re-enumerated with new HID and input numbers
    probe(turing, XHCI)
    assert driver(turing, XHCI) == "xhci_hcd"
    assert turing.listdir("/sys/bus/hid/devices") == ["0003:046D:C077.0003",
                                                      "0003:046D:C31C.0001"]
    assert turing.listdir("/sys/class/input") == ["event3", "event4", "input3", "input5",
                                                  "mouse0"]
    assert turing.exists("/dev/bus/usb/004/001") and turing.exists("/dev/input/event4")
    expected, unexpected = classify_changes(before, hosts.snapshot(turing.root))
    assert expected == [renumbered("HID and input devices",
                                   [("0003:046D:C077.0002", "0003:046D:C077.0003")])]
    assert unexpected == {}


def test_turing_usb_modules_the_host_uses_are_refused_or_taken_from_it(turing):
    """The kernel refuses rmmod only for modules with holders or open files: usbcore,
    usb_common, xhci_hcd, hid, and evdev while logind's event3 is open. usbhid, hid_generic
    and xhci_pci have neither (the ``modprobe -r usbhid`` reset trick works): unloading them
    takes the host's keyboard or controllers with them."""
    assert rmmod(turing, "usbcore") == (
        1, "rmmod: ERROR: Module usbcore is in use by: usbhid xhci_hcd xhci_pci\n")
    assert rmmod(turing, "xhci_hcd") == (1, "rmmod: ERROR: Module xhci_hcd is in use by: "
                                            "xhci_pci\n")
    assert rmmod(turing, "usb_common")[1].startswith(
        "rmmod: ERROR: Module usb_common is in use by: usbcore")
    assert rmmod(turing, "hid") == (1, "rmmod: ERROR: Module hid is in use by: hid_generic "
                                       "usbhid\n")
    assert rmmod(turing, "i2c_core") == (1, "rmmod: ERROR: Module i2c_core is builtin.\n")
    with holding(turing, "/dev/input/event3"):
        assert rmmod(turing, "evdev") == (1, "rmmod: ERROR: Module evdev is in use\n")
        assert turing.read("/sys/module/evdev/refcnt") == "1"
        assert rmmod(turing, "usbhid") == (0, "")
        assert bus_driver(turing, "usb", "1-2:1.0") == (None, None)
        assert not turing.exists("/dev/input/event3")
        assert turing.listdir("/sys/bus/hid/devices") == []
        assert rmmod(turing, "evdev")[0] == 1   # the stale descriptor still pins evdev
    assert modprobe(turing, "usbhid") == (0, "")
    assert bus_driver(turing, "usb", "1-2:1.0") == ("usbhid", "usbhid")
    assert turing.listdir("/sys/bus/hid/devices") == ["0003:046D:C077.0004",
                                                      "0003:046D:C31C.0003"]
    assert turing.exists("/dev/input/event3") and turing.exists("/dev/input/event4")
    assert rmmod(turing, "xhci_pci") == (0, "")
    assert driver(turing, HOST_XHCI) is None and driver(turing, XHCI) is None
    assert turing.listdir("/sys/bus/usb/devices") == []


def test_turing_logind_holds_the_host_keyboard(turing_world):
    w = turing_world
    assert w.systemd.list_units()["systemd-logind.service"] == "active"
    assert held(w.host, "/dev/input/event3") and not held(w.host, "/dev/input/event4")
    assert rmmod(w.host, "evdev") == (1, "rmmod: ERROR: Module evdev is in use\n")


def test_turing_ucsi_adapter_and_node_go_with_its_driver(turing):
    ucsi_nodes = ("/dev/i2c-5", "/sys/bus/i2c/devices/i2c-5", "/sys/bus/i2c/devices/5-0008",
                  "/sys/class/i2c-dev/i2c-5", "/sys/class/i2c-adapter/i2c-5",
                  "/sys/class/typec/port0", "/sys/bus/i2c/drivers/ucsi_ccg/5-0008")
    # an open /dev/i2c-5 (ddcutil, a bar's poller) holds the adapter: it pins its owner and
    # i2c_dev, and the unbind blocks in i2c_del_adapter until the file is closed
    with holding(turing, "/dev/i2c-5"):
        assert rmmod(turing, "i2c_nvidia_gpu") == (
            1, "rmmod: ERROR: Module i2c_nvidia_gpu is in use\n")
        assert rmmod(turing, "i2c_dev") == (1, "rmmod: ERROR: Module i2c_dev is in use\n")
        assert turing.read("/sys/module/i2c_nvidia_gpu/refcnt") == "1"
        with pytest.raises(errors.HookdError) as exc:
            turing.write("/sys/bus/pci/drivers/nvidia-gpu/unbind", UCSI, 0.3)
        assert exc.value.code == errors.TIMEOUT and driver(turing, UCSI) == "nvidia-gpu"
    with holding(turing, "/dev/i2c-1"):   # the same for the proprietary driver's adapters
        for m in ("nvidia_drm", "nvidia_modeset", "nvidia_uvm"):
            assert rmmod(turing, m) == (0, "")
        assert rmmod(turing, "nvidia") == (1, "rmmod: ERROR: Module nvidia is in use\n")
    unbind(turing, UCSI)
    for p in ucsi_nodes:
        assert not os.path.lexists(turing.path(p)), p
    assert turing.listdir("/sys/bus/i2c/devices") == ["i2c-0", "i2c-1", "i2c-2", "i2c-3",
                                                      "i2c-4"]
    probe(turing, UCSI)
    for p in ucsi_nodes:
        assert os.path.lexists(turing.path(p)), p
    # ucsi_ccg and i2c_dev go on their own; the adapter stays
    assert rmmod(turing, "ucsi_ccg") == (0, "")
    assert bus_driver(turing, "i2c", "5-0008") == (None, None)
    assert not turing.exists("/sys/class/typec/port0") and turing.exists("/sys/class/typec")
    assert rmmod(turing, "i2c_dev") == (0, "")
    assert not [n for n in turing.listdir("/dev") if n.startswith("i2c-")]
    assert turing.exists("/sys/bus/i2c/devices/i2c-5")
    assert modprobe(turing, "i2c_dev") == (0, "") and turing.exists("/dev/i2c-5")


def test_turing_i2c_adapters_take_the_lowest_free_number(turing):
    """An adapter registered again takes the lowest free number: with nvidia's adapters gone
    meanwhile, the UCSI adapter comes back as i2c-1 and nvidia's take 2..5."""
    before = hosts.snapshot(turing.root)
    for m in ("nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia"):
        assert rmmod(turing, m) == (0, "")
    unbind(turing, UCSI)
    assert turing.listdir("/sys/bus/i2c/devices") == ["i2c-0"]
    probe(turing, UCSI)
    assert turing.read("/sys/bus/i2c/devices/i2c-1/name") == "NVIDIA GPU I2C adapter"
    assert bus_driver(turing, "i2c", "1-0008") == ("ucsi_ccg", "ucsi_ccg")
    assert turing.read("/sys/class/i2c-dev/i2c-1/dev") == "89:1"
    for m in ("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        assert modprobe(turing, m) == (0, "")
    assert turing.read("/sys/bus/i2c/devices/i2c-5/name") == "NVIDIA i2c adapter 6 at 1:00.0"
    expected, unexpected = classify_changes(before, hosts.snapshot(turing.root))
    assert expected == [renumbered("i2c adapters", [
        ("i2c-1", "i2c-2"), ("i2c-2", "i2c-3"), ("i2c-3", "i2c-4"), ("i2c-4", "i2c-5"),
        ("i2c-5", "i2c-1")])]
    assert unexpected == {}


def test_turing_whole_card_to_vfio_and_back(turing):
    """The four functions on vfio-pci, then given back (the proprietary driver reloaded last):
    what differs is the kernel's own doing, named by testbed.expected."""
    before = hosts.snapshot(turing.root)
    turing.write("/sys/class/vtconsole/vtcon1/bind", "0", T)
    for m in ("nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia"):
        rmmod(turing, m)
    modprobe(turing, "vfio-pci")
    for a in sim.DEVICES["turing"]:
        to_vfio(turing, a)
    assert {a: driver(turing, a) for a in sim.DEVICES["turing"]} == dict.fromkeys(
        sim.DEVICES["turing"], "vfio-pci")
    assert turing.exists("/dev/vfio/1") and turing.listdir("/sys/bus/i2c/devices") == ["i2c-0"]
    assert turing.listdir("/sys/bus/usb/devices")[-2:] == ["usb1", "usb2"]
    for a in reversed(sim.DEVICES["turing"]):
        give_back(turing, a)
    for m in ("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        modprobe(turing, m)
    assert drivers(turing)[GPU] == "nvidia" and drivers(turing)[XHCI] == "xhci_hcd"
    expected, unexpected = classify_changes(before, hosts.snapshot(turing.root))
    assert unexpected == {}
    assert [e.split(" ")[0] for e in expected] == [
        "firmware", "/proc/fb:", "vtcon1", "vtcon0", "i2c", "HID", "vfio-pci"]


# ---- amd: /dev/kfd -------------------------------------------------------------------------
def test_amd_kfd_is_the_gpus_node_while_amdgpu_drives_it(tmp_path):
    amd = build(tmp_path, "amd")
    before = hosts.snapshot(amd.root)
    assert amd.exists("/dev/kfd") and amd.read("/sys/class/kfd/kfd/dev") == "236:0"
    assert "DEVNAME=kfd" in amd.read("/sys/class/kfd/kfd/uevent")
    props = dict(line.split(" ", 1) for line in
                 amd.read("/sys/class/kfd/kfd/topology/nodes/1/properties").splitlines())
    assert (props["domain"], props["location_id"], props["drm_render_minor"]) == (
        "0", str(0x03 << 8), "128")
    assert amd.listdir("/sys/class/kfd/kfd/topology/nodes") == ["0", "1"]
    with holding(amd, "/dev/kfd"):
        assert rmmod(amd, "amdgpu") == (1, "rmmod: ERROR: Module amdgpu is in use\n")
        assert amd.read("/sys/module/amdgpu/refcnt") == "1"
    unbind(amd, "0000:03:00.0")   # the GPU's topology node goes, /dev/kfd stays
    assert amd.listdir("/sys/class/kfd/kfd/topology/nodes") == ["0"] and amd.exists("/dev/kfd")
    assert rmmod(amd, "amdgpu") == (0, "")
    assert not amd.exists("/dev/kfd") and not amd.exists("/sys/class/kfd")
    assert not amd.exists("/sys/devices/virtual/kfd")
    assert modprobe(amd, "amdgpu") == (0, "")
    assert hosts.snapshot(amd.root) == before


def test_amd_ollama_unit_holds_kfd_once_started(amd_world):
    w = amd_world
    assert w.systemd.list_units()["ollama.service"] == "inactive" and not held(w.host, "/dev/kfd")
    w.systemd.start("ollama.service", T)
    assert w.systemd.list_units()["ollama.service"] == "active" and held(w.host, "/dev/kfd")
    w.systemd.stop("ollama.service", T)


# ---- twogpu, twogpu-vfio ----------------------------------------------------------------------
def test_twogpu_desktop_on_the_igpu_and_an_idle_dgpu(twogpu_world):
    w, h = twogpu_world, twogpu_world.host
    dgpu, daudio = w.devices
    assert drivers(h) == {"0000:00:01.0": "pcieport", IGPU: "i915",
                          "0000:00:1f.3": "snd_hda_intel", dgpu: "amdgpu",
                          daudio: "snd_hda_intel"}
    assert h.read(f"/sys/bus/pci/devices/{IGPU}/boot_vga") == "1"
    assert h.read(f"/sys/bus/pci/devices/{dgpu}/boot_vga") == "0"
    assert h.resolve(f"/sys/bus/pci/devices/{IGPU}") == f"/sys/devices/pci0000:00/{IGPU}"
    assert h.resolve(f"/sys/bus/pci/devices/{IGPU}/iommu_group") == "/sys/kernel/iommu_groups/4"
    assert h.resolve("/sys/class/drm/card0/device") == h.resolve(f"/sys/bus/pci/devices/{IGPU}")
    assert h.resolve("/sys/class/drm/card1/device") == h.resolve(f"/sys/bus/pci/devices/{dgpu}")
    assert h.read("/sys/class/drm/renderD129/dev") == "226:129"
    assert not h.exists("/sys/bus/platform/devices/efi-framebuffer.0")   # i915 evicted efifb
    assert h.read("/proc/fb") == "0 i915drmfb\n1 amdgpudrmfb"
    assert vtcons(h) == {"vtcon0": ("(S) dummy device", "0"),
                         "vtcon1": ("(M) frame buffer device", "1")}
    assert "location_id 256" in h.read("/sys/class/kfd/kfd/topology/nodes/1/properties")
    assert h.listdir("/sys/module/ttm/holders") == ["amdgpu", "drm_ttm_helper", "i915"]
    # the display manager holds the iGPU's nodes; nobody holds the dGPU's
    assert held(h, "/dev/dri/card0") and held(h, "/dev/dri/renderD128")
    assert not held(h, "/dev/dri/card1", "/dev/dri/renderD129", "/dev/kfd", "/dev/snd/controlC1",
                    "/dev/snd/pcmC1D3p")
    assert rmmod(h, "ttm")[1].startswith("rmmod: ERROR: Module ttm is in use by: amdgpu")
    # the dGPU goes to vfio-pci without touching the desktop's console or framebuffer
    before = hosts.snapshot(h.root)
    modprobe(h, "vfio-pci")
    for a in w.devices:
        to_vfio(h, a)
    assert h.read("/proc/fb") == "0 i915drmfb" and vtcons(h)["vtcon1"][1] == "1"
    assert h.listdir("/dev/dri") == ["card0", "renderD128"] and h.exists("/dev/vfio/1")
    for a in reversed(w.devices):
        give_back(h, a)
    expected, unexpected = classify_changes(before, hosts.snapshot(h.root))
    assert unexpected == {} and [e.split(" ")[0] for e in expected] == ["vfio-pci"]


def test_twogpu_vfio_dgpu_on_vfio_pci_from_boot(twogpu_vfio_world):
    w, h = twogpu_vfio_world, twogpu_vfio_world.host
    dgpu, daudio = w.devices
    assert driver(h, dgpu) == driver(h, daudio) == "vfio-pci"
    assert h.read(f"/sys/bus/pci/devices/{dgpu}/driver_override") == "(null)"   # by its ids
    assert h.exists("/dev/vfio/1") and h.module_loaded("vfio_pci")
    assert not h.module_loaded("amdgpu") and not h.exists("/dev/kfd")
    assert h.listdir("/dev/dri") == ["card0", "renderD128"] and driver(h, IGPU) == "i915"
    assert "vfio-pci.ids=1002:73bf,1002:ab28" in h.read("/proc/cmdline")
    assert w.systemd.list_units()["gdm.service"] == "active"
    # unbound and probed, a dGPU function goes back to vfio-pci: its ids match, it came first
    unbind(h, daudio)
    assert h.exists("/dev/vfio/1")   # the GPU still holds the group on vfio-pci
    probe(h, daudio)
    assert driver(h, daudio) == "vfio-pci"
    # amdgpu loads by name (the blacklist stops alias loading only) and binds nothing held
    assert modprobe(h, "amdgpu") == (0, "")
    assert driver(h, dgpu) == "vfio-pci" and h.exists("/dev/kfd")
    assert h.listdir("/sys/class/kfd/kfd/topology/nodes") == ["0"]
    h.write(f"/sys/bus/pci/devices/{dgpu}/driver_override", "amdgpu", T)
    unbind(h, dgpu)
    probe(h, dgpu)
    assert driver(h, dgpu) == "amdgpu" and h.exists("/dev/dri/card1")


def test_twogpu_bios_boot_retires_vgacon_when_i915_binds(tmp_path):
    h = build(tmp_path, "twogpu", firmware="bios")
    assert vtcons(h) == {"vtcon0": ("(M) frame buffer device", "1"),
                         "vtcon1": ("(M) dummy device", "0")}


# ---- bios-text -----------------------------------------------------------------------------
def test_bios_text_boots_in_vga_text_mode(bios_text_world):
    h = bios_text_world.host
    assert vtcons(h) == {"vtcon0": ("(S) VGA+", "1")}
    assert h.read("/proc/fb") == "" and h.listdir("/sys/bus/platform/devices") == []
    assert "nomodeset" in h.read("/proc/cmdline").split()
    assert driver(h, GPU) == "nvidia" and held(h, "/dev/dri/card0")


def test_bios_text_vfio_on_the_boot_vga_deactivates_vgacon_for_good(tmp_path):
    h = build(tmp_path, "bios-text")
    before = hosts.snapshot(h.root)
    for m in ("nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia"):
        rmmod(h, m)
    modprobe(h, "vfio-pci")
    to_vfio(h, AUDIO)   # not the boot VGA function: the arbiter leaves the console alone
    assert vtcons(h) == {"vtcon0": ("(S) VGA+", "1")}
    to_vfio(h, GPU)
    assert vtcons(h) == {"vtcon1": ("(M) dummy device", "1")}
    # vgacon is unregistered: its vtconsole is gone, there is no bind to write 1 to
    with pytest.raises(OSError) as exc:
        h.write("/sys/class/vtconsole/vtcon0/bind", "1", T)
    assert exc.value.errno == errno.ENOENT
    h.write("/sys/class/vtconsole/vtcon1/bind", "0", T)   # no other console driver: nothing
    assert vtcons(h) == {"vtcon1": ("(M) dummy device", "1")}
    for a in (AUDIO, GPU):
        give_back(h, a)
    for m in ("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        modprobe(h, m)
    assert driver(h, GPU) == "nvidia" and vtcons(h) == {"vtcon1": ("(M) dummy device", "1")}
    expected, unexpected = classify_changes(before, hosts.snapshot(h.root))
    assert unexpected == {}
    assert expected[0] == vgacon_replaced("vtcon0", "(S) VGA+", "vtcon1", "(M) dummy device")
    assert expected[1].startswith("vfio-pci left loaded") and len(expected) == 2
