"""What ``vfio-hookd check`` reads beyond the simulated kernel's PCI world: the firmware's
IOMMU tables and the IOMMU units, the kernel command line and release, the module index, the
libvirt hook and the running libvirt daemon, vfio-hookd's units, SELinux, reset and power
state -- on a healthy host, or broken one way at a time.

:func:`set_up` is called on a freshly built simulated host (:func:`testbed.sim.make_host`)
*before* its systemd (the in-process fake or the one on D-Bus) is started, since it adds
vfio-hookd's units to ``.sim/units.json``. The libvirt daemon is modelled by its pid file
``/run/libvirtd.pid`` and the files of its PID under the host's ``/proc`` (``comm``, ``stat``
with the start time in clock ticks, field 22) and ``/proc/stat``'s ``btime`` (proc(5)); no
process runs for it (the product reads only those files).

Flags (keyword arguments), each one way the host can be broken:

- ``iommu``: ``"intel"`` (ACPI ``DMAR``, ``/sys/class/iommu/dmar0``, ``intel_iommu=on
  iommu=pt``), ``"amd"`` (``IVRS``, ``ivhd0``, ``iommu=pt``); ``iommu_on=False``: the
  firmware table stays but the IOMMU is off: no units, no groups (the groups' directories
  and every function's ``iommu_group`` link are removed), no parameter.
- ``hook``: ``"loaded"`` (installed before the libvirt daemon started), ``"after"``
  (installed after it started and never reloaded), ``"absent"``, ``"not-executable"``;
  ``libvirtd=False``: no libvirt daemon runs.
- ``vfio_pci=False``: the kernel has no vfio-pci (not in ``modules.dep``).
- ``daemon``: vfio-hookd's units: ``"socket"`` (socket active, service not started yet: a
  healthy idle host), ``"running"``, ``"off"`` (neither active).
- ``selinux``: None (no SELinux), ``"off"`` (enforcing, ``virt_hooks_unconfined`` 0),
  ``"on"``.
- ``amd_device``: a PCI device ID written over the AMD GPU's (``"0x731f"``: Navi 10, an RX
  5700 XT, whose reset fails without vendor-reset); ``vendor_reset=True``: the module is
  loaded and the GPU's ``reset_method`` is ``device_specific``.
"""

from __future__ import annotations

import json
import os
import shutil

from . import kernel as K

LIBVIRTD_PID = 4242
#: The libvirt daemon's start relative to the hook's installation (s) for each ``hook`` mode.
START_AFTER_HOOK_S = 5.0
HOOK_AFTER_START_S = 600.0
HOOK = "/etc/libvirt/hooks/qemu.d/vfio-hookd"


def _state(root: str) -> dict:
    return K.load_state(root)


def set_up(root: str, *, iommu: str = "intel", iommu_on: bool = True, hook: str = "loaded",
           libvirtd: bool = True, vfio_pci: bool = True, daemon: str = "socket",
           selinux: str | None = None, amd_device: str | None = None,
           vendor_reset: bool = False) -> None:
    """Add the preflight's facts to the simulated host ``root`` (module docstring).

    :raises ValueError: an unknown flag value.
    """
    state = _state(root)
    release = state.get("kernel", "6.1.0-sim")
    _iommu(root, iommu, iommu_on)
    K.mkfile(root, "/proc/sys/kernel/osrelease", release + "\n", 0o444)
    dep = ["kernel/drivers/vfio/vfio.ko:",
           "kernel/drivers/vfio/pci/vfio-pci-core.ko: kernel/drivers/vfio/vfio.ko"]
    if vfio_pci:
        dep.append("kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/pci/"
                   "vfio-pci-core.ko kernel/drivers/vfio/vfio.ko")
    K.mkfile(root, f"/lib/modules/{release}/modules.dep", "\n".join(dep) + "\n", 0o644)
    K.mkfile(root, f"/lib/modules/{release}/modules.builtin", "kernel/drivers/tty/vt/vt.ko\n",
             0o644)
    for addr in state["devices"]:
        K.mkfile(root, f"/sys/bus/pci/devices/{addr}/power_state", "D0\n", 0o444)
    _hook(root, hook, libvirtd)
    _daemon_units(root, daemon)
    _selinux(root, selinux)
    _amd(root, state, amd_device, vendor_reset)


def _iommu(root: str, vendor: str, on: bool) -> None:
    if vendor not in ("intel", "amd"):
        raise ValueError(f"iommu must be 'intel' or 'amd', not {vendor!r}")
    table, unit = ("DMAR", "dmar0") if vendor == "intel" else ("IVRS", "ivhd0")
    K.mkfile(root, f"/sys/firmware/acpi/tables/{table}", "", 0o400)
    K.mkdir(root, "/sys/class/iommu")
    cmdline = "BOOT_IMAGE=/boot/vmlinuz-6.1.0-sim root=/dev/sda2 ro quiet"
    if on:
        K.mkdir(root, f"/sys/class/iommu/{unit}")
        cmdline += " intel_iommu=on iommu=pt" if vendor == "intel" else " iommu=pt"
    else:
        groups = K.real(root, "/sys/kernel/iommu_groups")
        for g in os.listdir(groups):
            shutil.rmtree(os.path.join(groups, g))
        for addr in os.listdir(K.real(root, "/sys/bus/pci/devices")):
            link = K.real(root, f"/sys/bus/pci/devices/{addr}/iommu_group")
            if os.path.islink(link):
                os.unlink(link)
    K.mkfile(root, "/proc/cmdline", cmdline + "\n", 0o444)


def _hook(root: str, mode: str, libvirtd: bool) -> None:
    if mode not in ("loaded", "after", "absent", "not-executable"):
        raise ValueError(f"hook must be loaded, after, absent or not-executable, not {mode!r}")
    installed = None
    if mode != "absent":
        K.mkfile(root, HOOK, "#!/usr/bin/python3\n# vfio-hookd's libvirt hook (simulated)\n",
                 0o644 if mode == "not-executable" else 0o755)
        st = os.stat(K.real(root, HOOK))
        installed = max(st.st_mtime, st.st_ctime)
    if not libvirtd:
        return
    base = installed if installed is not None else os.stat(K.real(root, "/sys")).st_mtime
    start = base - HOOK_AFTER_START_S if mode == "after" else base + START_AFTER_HOOK_S
    btime = int(start) - 3600
    ticks = round((start - btime) * os.sysconf("SC_CLK_TCK"))
    fields = ["S", "1"] + ["0"] * 17 + [str(ticks)] + ["0"] * 30   # field 3 .. 52
    K.mkfile(root, f"/proc/{LIBVIRTD_PID}/stat", f"{LIBVIRTD_PID} (libvirtd) "
             + " ".join(fields) + "\n", 0o444)
    K.mkfile(root, f"/proc/{LIBVIRTD_PID}/comm", "libvirtd\n", 0o444)
    K.mkfile(root, "/proc/stat", f"cpu  0 0 0 0 0 0 0 0 0 0\nbtime {btime}\n", 0o444)
    K.mkfile(root, "/run/libvirtd.pid", f"{LIBVIRTD_PID}\n", 0o644)


def _daemon_units(root: str, daemon: str) -> None:
    if daemon not in ("socket", "running", "off"):
        raise ValueError(f"daemon must be socket, running or off, not {daemon!r}")
    path = os.path.join(root, ".sim", "units.json")
    with open(path) as f:
        units = json.load(f)
    units["vfio-hookd.socket"] = {"active": daemon != "off", "holds": []}
    units["vfio-hookd.service"] = {"active": daemon == "running", "holds": []}
    with open(path, "w") as f:
        json.dump(units, f, indent=1)


def _selinux(root: str, mode: str | None) -> None:
    if mode is None:
        return
    if mode not in ("on", "off"):
        raise ValueError(f"selinux must be None, 'on' or 'off', not {mode!r}")
    K.mkfile(root, "/sys/fs/selinux/enforce", "1", 0o644)
    value = "1 1" if mode == "on" else "0 0"
    K.mkfile(root, "/sys/fs/selinux/booleans/virt_hooks_unconfined", value, 0o644)


def _amd(root: str, state: dict, device: str | None, vendor_reset: bool) -> None:
    gpu = state.get("boot_vga")
    if device is not None:
        K.mkfile(root, f"/sys/bus/pci/devices/{gpu}/device", device + "\n", 0o444)
    if vendor_reset:
        K.mkfile(root, "/sys/module/vendor_reset/refcnt", "0\n", 0o444)
        K.mkfile(root, f"/sys/bus/pci/devices/{gpu}/reset_method", "device_specific\n", 0o644)
