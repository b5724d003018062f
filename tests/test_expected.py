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


def test_vfio_left_loaded_is_expected_only_as_an_addition():
    before = {"/sys/module/nvidia": ("dir", None)}
    after = {"/sys/module/vfio": ("dir", None), "/sys/module/vfio_pci": ("dir", None),
             "/sys/module/vfio_pci/holders": ("dir", None)}
    lines, unexpected = classify_changes(before, after)
    assert lines == [kernel.vfio_left_loaded(["vfio", "vfio_pci"])]
    assert list(unexpected) == ["/sys/module/nvidia"]   # a GPU module not given back
    lines, unexpected = classify_changes(after, {})
    assert lines == [] and len(unexpected) == 3           # vfio unloaded: not the kernel's doing


def _vtcon(v: str, name: str, bind: str) -> dict:
    d = f"/sys/devices/virtual/vtconsole/{v}"
    return {f"/sys/class/vtconsole/{v}": ("link", f"../../devices/virtual/vtconsole/{v}"),
            d: ("dir", None), f"{d}/name": ("file", f"{name}\n"), f"{d}/bind": ("file", bind)}


def test_the_vga_text_console_replaced_by_the_dummy_console_is_the_kernels_doing():
    # seen on Linux 6.1 (SeaBIOS, nomodeset): vfio-pci takes the boot VGA function, the VGA
    # arbiter removes vgacon's vtcon0 and registers the dummy console as vtcon1, bound
    before = {"/proc/fb": ("file", ""), **_vtcon("vtcon0", "(S) VGA+", "1\n")}
    after = {"/proc/fb": ("file", ""), **_vtcon("vtcon1", "(M) dummy device", "1\n"),
             "/sys/module/vfio_pci": ("dir", None)}
    line = kernel.vgacon_replaced("vtcon0", "(S) VGA+", "vtcon1", "(M) dummy device")
    expected, unexpected = classify_changes(before, after)
    assert expected == [line, kernel.vfio_left_loaded(["vfio_pci"])] and unexpected == {}
    assert kernel.text_consoles_replaced(expected) == ["vtcon0"]
    assert kernel.text_consoles_replaced([FB_REMOVED]) == []
    # or a dummy console registered before takes the consoles: its bind goes from 0 to 1
    before2 = {**before, **_vtcon("vtcon1", "(M) dummy device", "0\n")}
    after2 = {**after, **_vtcon("vtcon1", "(M) dummy device", "1\n")}
    expected, unexpected = classify_changes(before2, after2)
    assert expected[0] == line and unexpected == {}
    # vgacon gone with nothing holding the consoles is no kernel change it makes
    expected, unexpected = classify_changes(before, {"/proc/fb": ("file", "")})
    assert expected == [] and "/sys/class/vtconsole/vtcon0" in unexpected
    # nor a vgacon that was not bound, nor a takeover by anything but the dummy console
    unbound = {**before, "/sys/devices/virtual/vtconsole/vtcon0/bind": ("file", "0\n")}
    assert classify_changes(unbound, after)[0] == [kernel.vfio_left_loaded(["vfio_pci"])]
    other = {"/proc/fb": ("file", ""), **_vtcon("vtcon1", "(M) frame buffer device", "1\n")}
    expected, unexpected = classify_changes(before, other)
    assert expected == [] and "/sys/class/vtconsole/vtcon1" in unexpected
    # a dummy console that changed in more than its bind is a leftover
    odd = {**after2, "/sys/devices/virtual/vtconsole/vtcon1/name": ("file", "(S) dummy device\n")}
    expected, unexpected = classify_changes(before2, odd)
    assert not kernel.text_consoles_replaced(expected)
