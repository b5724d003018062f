"""testbed.expected: the one definition of the changes the kernel itself makes, which every
comparison of a host before and after (demo, tests, kernel guest) relies on. It must not wave
through a real leftover."""

from __future__ import annotations

import pytest

from testbed import expected as kernel
from testbed.expected import classify_changes

pytestmark = pytest.mark.unit

GPU = "0000:01:00.0"
FB_REMOVED = kernel.fb_removed("efi-framebuffer.0")
PROC_FB = kernel.proc_fb_gone(["0 EFI VGA"])
VTCON_REMOVED = kernel.vtcon_removed("vtcon1", "(M) frame buffer device")
VTCON_TAKEOVER = kernel.vtcon_took_over("vtcon0", "(S) dummy device", ["vtcon1"])


def _starts(lines: list[str], *prefixes: str) -> bool:
    return len(lines) == len(prefixes) and all(
        e.startswith(p) for e, p in zip(lines, prefixes))


def test_classify_changes_flags_anything_but_the_kernels_own_changes():
    before = {
        "/proc/fb": ("file", "0 EFI VGA\n"),
        "/sys/devices/platform/efi-framebuffer.0": ("dir", None),
        "/sys/devices/platform/efi-framebuffer.0/uevent": ("file", "DRIVER=efi-framebuffer\n"),
        "/sys/bus/platform/devices/efi-framebuffer.0": ("link", "../x"),
        "/sys/class/vtconsole/vtcon1": ("link", "../../devices/virtual/vtconsole/vtcon1"),
        "/sys/devices/virtual/vtconsole/vtcon1": ("dir", None),
        "/sys/devices/virtual/vtconsole/vtcon1/name": ("file", "(M) frame buffer device\n"),
        f"/sys/bus/pci/devices/{GPU}/driver_override": ("file", "(null)\n"),
    }
    after = {k: v for k, v in before.items() if "efi-framebuffer" not in k and "vtcon1" not in k}
    after["/proc/fb"] = ("file", "")
    after["/sys/module/vfio_pci"] = ("dir", None)
    expected, unexpected = classify_changes(before, after)
    assert _starts(expected, FB_REMOVED, PROC_FB, VTCON_REMOVED, "vfio-pci left loaded")
    assert unexpected == {}
    # the boot console driver holding the consoles since fbcon went is the kernel's doing too
    before["/sys/devices/virtual/vtconsole/vtcon0/bind"] = ("file", "0\n")
    before["/sys/devices/virtual/vtconsole/vtcon0/name"] = ("file", "(S) dummy device\n")
    before["/sys/devices/virtual/vtconsole/vtcon1/bind"] = ("file", "1\n")
    after["/sys/devices/virtual/vtconsole/vtcon0/bind"] = ("file", "1\n")
    after["/sys/devices/virtual/vtconsole/vtcon0/name"] = ("file", "(S) dummy device\n")
    expected, unexpected = classify_changes(before, after)
    assert _starts(expected, FB_REMOVED, PROC_FB, VTCON_REMOVED, VTCON_TAKEOVER,
                   "vfio-pci left loaded")
    assert unexpected == {}
    # a driver_override left behind is not the kernel's doing
    after[f"/sys/bus/pci/devices/{GPU}/driver_override"] = ("file", "vfio-pci\n")
    _, unexpected = classify_changes(before, after)
    assert list(unexpected) == [f"/sys/bus/pci/devices/{GPU}/driver_override"]
    # fbcon's vtconsole may only go with the last framebuffer
    after2 = dict(after, **{"/proc/fb": ("file", "1 other\n")})
    after2[f"/sys/bus/pci/devices/{GPU}/driver_override"] = ("file", "(null)\n")
    _, unexpected = classify_changes(before, after2)
    assert "/sys/class/vtconsole/vtcon1" in unexpected and "/proc/fb" in unexpected
    # a firmware framebuffer only half gone is a leftover, not the kernel's removal
    after3 = dict(after, **{"/sys/devices/platform/efi-framebuffer.0": ("dir", None)})
    after3[f"/sys/bus/pci/devices/{GPU}/driver_override"] = ("file", "(null)\n")
    expected, unexpected = classify_changes(before, after3)
    assert not any(e.startswith(FB_REMOVED) for e in expected)
    assert "/sys/devices/platform/efi-framebuffer.0/uevent" in unexpected


def test_the_framebuffer_node_goes_with_its_proc_fb_line():
    before = {"/proc/fb": ("file", "0 EFI VGA\n"), "/dev/fb0": ("file", None),
              "/sys/devices/platform/efi-framebuffer.0": ("dir", None)}
    after = {"/proc/fb": ("file", "")}
    lines, unexpected = classify_changes(before, after)
    assert lines == [FB_REMOVED, PROC_FB, kernel.fb_node_gone("/dev/fb0")]
    assert unexpected == {} and kernel.framebuffer_removed(lines)
    # without the framebuffer's removal, a vanished /dev/fb0 is a leftover
    lines, unexpected = classify_changes({"/dev/fb0": ("file", None)}, {})
    assert lines == [] and list(unexpected) == ["/dev/fb0"]


def test_the_framebuffer_below_its_pci_function_linux_6_9():
    """Since Linux 6.9 sysfb makes the firmware framebuffer a child of the boot VGA's PCI
    function (seen on Debian's 6.12): its removal is the kernel's there too, and a GPU
    function's own directory going is not."""
    top = f"/sys/devices/pci0000:00/0000:00:10.0/{GPU}/efi-framebuffer.0"
    before = {"/proc/fb": ("file", "0 EFI VGA\n"), "/dev/fb0": ("node", None),
              top: ("dir", None), f"{top}/driver": ("link", "../../../../bus/platform/drivers/x"),
              "/sys/bus/platform/devices/efi-framebuffer.0":
                  ("link", f"../../../devices/pci0000:00/0000:00:10.0/{GPU}/efi-framebuffer.0")}
    after = {"/proc/fb": ("file", "")}
    lines, unexpected = classify_changes(before, after)
    assert lines == [FB_REMOVED, PROC_FB, kernel.fb_node_gone("/dev/fb0")]
    assert unexpected == {}
    # only the bus's link gone, the device still there: a leftover
    bus = "/sys/bus/platform/devices/efi-framebuffer.0"
    lines, unexpected = classify_changes(before, {k: v for k, v in before.items() if k != bus})
    assert lines == [] and list(unexpected) == [bus]


def test_vfio_left_loaded_is_expected_only_as_an_addition():
    before = {"/sys/module/nvidia": ("dir", None)}
    after = {"/sys/module/vfio": ("dir", None), "/sys/module/vfio_pci": ("dir", None),
             "/sys/module/vfio_pci/holders": ("dir", None)}
    lines, unexpected = classify_changes(before, after)
    assert lines == [kernel.vfio_left_loaded(["vfio", "vfio_pci"])]
    assert list(unexpected) == ["/sys/module/nvidia"]   # a GPU module not given back
    lines, unexpected = classify_changes(after, {})
    assert lines == [] and len(unexpected) == 3           # vfio unloaded: not the kernel's doing


VT = "/sys/devices/virtual/vtconsole"


def _vtcon(v: str, name: str, bind: str) -> dict:
    return {f"/sys/class/vtconsole/{v}": ("link", f"../../devices/virtual/vtconsole/{v}"),
            f"{VT}/{v}": ("dir", None), f"{VT}/{v}/name": ("file", name + "\n"),
            f"{VT}/{v}/bind": ("file", bind + "\n"), f"{VT}/{v}/uevent": ("file", "")}


def test_vgacon_half_gone_or_another_console_gone_is_a_leftover():
    """A BIOS host in VGA text mode (vgaarb.c vga_remove_vgacon): only vgacon's vtconsole gone
    entirely, with the dummy console holding the consoles, is the kernel's doing."""
    before = _vtcon("vtcon0", "(S) VGA+", "1")
    after = _vtcon("vtcon1", "(M) dummy device", "1")
    lines, unexpected = classify_changes(before, after)
    assert lines == [kernel.vgacon_replaced("vtcon0", "(S) VGA+", "vtcon1", "(M) dummy device")]
    assert unexpected == {}
    # a dummy console that does not hold the consoles is no takeover of vgacon's
    lines, unexpected = classify_changes(before, _vtcon("vtcon1", "(M) dummy device", "0"))
    assert lines == [] and "/sys/class/vtconsole/vtcon0" in unexpected
    half = dict(after, **{f"{VT}/vtcon0/name": ("file", "(S) VGA+\n")})
    lines, unexpected = classify_changes(before, half)
    assert lines == [] and "/sys/class/vtconsole/vtcon0" in unexpected
    lines, unexpected = classify_changes(_vtcon("vtcon0", "(S) dummy device", "1"), after)
    assert lines == [] and len(unexpected) == 10


FN = "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.3"


def _adapter(n: int, name: str, fn: str = FN) -> dict:
    a = f"{fn}/i2c-{n}"
    return {a: ("dir", None), f"{a}/name": ("file", name + "\n"),
            f"{a}/{n}-0008": ("dir", None),
            f"{a}/i2c-dev/i2c-{n}/dev": ("file", f"89:{n}\n"),
            f"{a}/i2c-dev/i2c-{n}/uevent": ("file", f"MAJOR=89\nMINOR={n}\nDEVNAME=i2c-{n}\n"),
            f"/sys/bus/i2c/devices/i2c-{n}": ("link", f"../../..{a}"),
            f"/dev/i2c-{n}": ("file", "")}


def test_i2c_adapters_renumbered_only_when_the_same_adapters_came_back():
    smbus = _adapter(0, "SMBus I801 adapter", "/sys/devices/pci0000:00/0000:00:1f.4")
    before = {**smbus, **_adapter(5, "NVIDIA GPU I2C adapter")}
    after = {**smbus, **_adapter(1, "NVIDIA GPU I2C adapter")}
    lines, unexpected = classify_changes(before, after)
    assert lines == [kernel.renumbered("i2c adapters", [("i2c-5", "i2c-1")])]
    assert unexpected == {}
    # an adapter that did not come back, or came back as another one, is not a renumbering
    lines, unexpected = classify_changes(before, smbus)
    assert lines == [] and set(unexpected) == set(_adapter(5, ""))
    other = {**smbus, **_adapter(1, "NVIDIA i2c adapter 1 at 1:00.0")}
    lines, unexpected = classify_changes(before, other)
    assert lines == [] and f"{FN}/i2c-1/name" in unexpected and f"{FN}/i2c-5" in unexpected


def test_hid_and_input_devices_renumbered():
    intf = "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.2/usb3/3-1/3-1:1.0"

    def hid(h: str, i: int) -> dict:
        d = f"{intf}/0003:046D:C077.{h}"
        return {d: ("dir", None), f"{d}/input/input{i}": ("dir", None),
                f"{d}/input/input{i}/event4/dev": ("file", "13:68\n"),
                f"/sys/class/input/input{i}": ("link", f"../../..{d}/input/input{i}"),
                "/sys/class/input/event4": ("link", f"../../..{d}/input/input{i}/event4"),
                f"/sys/bus/hid/devices/0003:046D:C077.{h}": ("link", f"../../..{d}")}
    lines, unexpected = classify_changes(hid("0002", 4), hid("0003", 5))
    assert lines == [kernel.renumbered("HID and input devices",
                                       [("0003:046D:C077.0002", "0003:046D:C077.0003")])]
    assert unexpected == {}
    gone = hid("0003", 5)
    del gone["/sys/class/input/event4"]
    lines, unexpected = classify_changes(hid("0002", 4), gone)
    assert lines == [] and "/sys/class/input/event4" in unexpected


def _vtcon_raw(v: str, name: str, bind: str) -> dict:
    d = f"/sys/devices/virtual/vtconsole/{v}"
    return {f"/sys/class/vtconsole/{v}": ("link", f"../../devices/virtual/vtconsole/{v}"),
            d: ("dir", None), f"{d}/name": ("file", f"{name}\n"), f"{d}/bind": ("file", bind)}


def test_the_vga_text_console_replaced_by_the_dummy_console_is_the_kernels_doing():
    # seen on Linux 6.1 (SeaBIOS, nomodeset): vfio-pci takes the boot VGA function, the VGA
    # arbiter removes vgacon's vtcon0 and registers the dummy console as vtcon1, bound
    before = {"/proc/fb": ("file", ""), **_vtcon_raw("vtcon0", "(S) VGA+", "1\n")}
    after = {"/proc/fb": ("file", ""), **_vtcon_raw("vtcon1", "(M) dummy device", "1\n"),
             "/sys/module/vfio_pci": ("dir", None)}
    line = kernel.vgacon_replaced("vtcon0", "(S) VGA+", "vtcon1", "(M) dummy device")
    expected, unexpected = classify_changes(before, after)
    assert expected == [line, kernel.vfio_left_loaded(["vfio_pci"])] and unexpected == {}
    assert kernel.text_consoles_replaced(expected) == ["vtcon0"]
    assert kernel.text_consoles_replaced([FB_REMOVED]) == []
    # or a dummy console registered before takes the consoles: its bind goes from 0 to 1
    before2 = {**before, **_vtcon_raw("vtcon1", "(M) dummy device", "0\n")}
    after2 = {**after, **_vtcon_raw("vtcon1", "(M) dummy device", "1\n")}
    expected, unexpected = classify_changes(before2, after2)
    assert expected[0] == line and unexpected == {}
    # vgacon gone with nothing holding the consoles is no kernel change it makes
    expected, unexpected = classify_changes(before, {"/proc/fb": ("file", "")})
    assert expected == [] and "/sys/class/vtconsole/vtcon0" in unexpected
    # nor a vgacon that was not bound, nor a takeover by anything but the dummy console
    unbound = {**before, "/sys/devices/virtual/vtconsole/vtcon0/bind": ("file", "0\n")}
    assert classify_changes(unbound, after)[0] == [kernel.vfio_left_loaded(["vfio_pci"])]
    other = {"/proc/fb": ("file", ""), **_vtcon_raw("vtcon1", "(M) frame buffer device", "1\n")}
    expected, unexpected = classify_changes(before, other)
    assert expected == [] and "/sys/class/vtconsole/vtcon1" in unexpected
    # a dummy console that changed in more than its bind is a leftover
    odd = {**after2, "/sys/devices/virtual/vtconsole/vtcon1/name": ("file", "(S) dummy device\n")}
    expected, unexpected = classify_changes(before2, odd)
    assert not kernel.text_consoles_replaced(expected)
