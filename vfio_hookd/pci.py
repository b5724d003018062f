"""PCI functions, their drivers and modules: the one place for these facts.

- PCI address syntax (:data:`ADDRESS_RE`, :func:`normalize_address`): ``domain:bus:slot.function``
  as the kernel names ``/sys/bus/pci/devices`` entries (``"%04x:%02x:%02x.%1u"``,
  drivers/pci/probe.c).
- The modules vfio-hookd never unloads (:func:`never_unload_reason`), used by both the profile
  rules and the modules step.
- Binding with ``driver_override`` (:func:`bind_with_driver_override`), the one primitive used to
  hand a function to vfio-pci and to give it back (libvirt's
  ``virPCIDeviceBindWithDriverOverride``; ``Documentation/ABI/testing/sysfs-bus-pci``).
- Queries: a function's driver, the module of a driver, the modules of drivers bound to child
  devices, module unload order (``Documentation/ABI/stable/sysfs-module``), device nodes.
"""

from __future__ import annotations

import os
import re

from . import errors
from .errors import HookdError
from .host import Host, oserror_text

VFIO_DRIVER = "vfio-pci"
#: The firmware framebuffer platform devices (``drivers/firmware/sysfb.c``): efifb's, simplefb's
#: or simpledrm's, vesafb's. Each draws into the boot GPU's memory.
FIRMWARE_FRAMEBUFFERS = ("efi-framebuffer.0", "simple-framebuffer.0", "vesa-framebuffer.0")

#: A full PCI address, lower-case hex, as in ``/sys/bus/pci/devices/`` (groups: domain, bus,
#: slot, function).
ADDRESS_RE = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")

#: Modules never unloaded, with the reason a profile that lists them is refused. Any module
#: named ``vfio`` or ``vfio_*`` is never unloaded too (:func:`never_unload_reason`).
NEVER_UNLOAD = {
    "snd_hda_intel": "snd_hda_intel also drives the onboard audio: the GPU's audio function is "
                     "unbound from it instead",
    "snd_hda_codec_hdmi": "the HDMI codec driver also serves the onboard audio's and other "
                          "GPUs' HDMI codecs while snd_hda_intel is loaded",
    "pci_stub": "pci-stub may hold functions that the boot configuration reserved for other "
                "VMs",
}
_VFIO_WHY = ("vfio-pci serves the passed-through functions of this VM and of other VMs; "
             "vfio-hookd loads it and never unloads it")

NVIDIA_SHARED_NODES = ("/dev/nvidiactl", "/dev/nvidia-modeset", "/dev/nvidia-uvm",
                       "/dev/nvidia-uvm-tools")


def normalize_address(s: object) -> str | None:
    """``s`` as a full PCI address in lower case (``"0000:01:00.0"``), or ``None``.

    Accepts exactly ``domain:bus:slot.function`` with 4, 2, 2 and 1 digits (hex, any case);
    slot <= 0x1f and function <= 7 (PCI spec; libvirt's ``virPCIDeviceAddressIsValid``). The
    short ``lspci`` form ``01:00.0`` is refused: it is ambiguous on hosts with several PCI
    domains. Anything that is not a ``str`` gives ``None``.
    """
    if not isinstance(s, str):
        return None
    low = s.lower()
    m = ADDRESS_RE.fullmatch(low)
    if m is None or int(m.group(3), 16) > 0x1F:
        return None
    return low


def is_address(s: object) -> bool:
    """True when ``s`` is already a normalised PCI address (:func:`normalize_address`)."""
    return isinstance(s, str) and normalize_address(s) == s


def never_unload_reason(module: str) -> str | None:
    """Why ``module`` (``-`` or ``_``) is never unloaded, or None when it may be."""
    m = module.replace("-", "_")
    if m == "vfio" or m.startswith("vfio_"):
        return _VFIO_WHY
    return NEVER_UNLOAD.get(m)


def stuck_functions(host: Host, functions) -> list[dict]:
    """The writes of :meth:`Host.stuck_writes` that concern one of ``functions``: the address
    in the path (``/sys/bus/pci/devices/ADDR/...``) or written (``drivers/DRV/unbind``,
    ``drivers_probe``); each with its ``function``."""
    out = []
    for w in host.stuck_writes():
        for addr in functions:
            if addr in w["path"] or addr == w["data"]:
                out.append(dict(w, function=addr))
    return out


def refuse_if_stuck(host: Host, devices) -> None:
    """:raises HookdError: ``DEVICE_STUCK`` while a write to one of ``devices``'s sysfs files
    that ran past its deadline has not returned (another request touching the function would
    only pile up more threads stuck in the kernel)."""
    stuck = stuck_functions(host, devices)
    if stuck:
        w = stuck[0]
        raise HookdError(errors.DEVICE_STUCK,
                         f"{w['function']}: writing {w['data']!r} to {w['path']} has not "
                         f"returned since {w['since']} (a holder the kernel waits for?); "
                         f"nothing else is done to it until that write returns, or the "
                         f"host reboots", {"stuck": stuck})


def path(addr: str, attr: str = "") -> str:
    """Host path of PCI function ``addr`` or one of its attributes."""
    return f"/sys/bus/pci/devices/{addr}" + (f"/{attr}" if attr else "")


def current_driver(host: Host, addr: str) -> str | None:
    """Name (str) of the driver bound to ``addr``, or None (from the ``driver`` link)."""
    return host.link_name(path(addr, "driver"))


def shows_boot_display(host: Host, functions) -> bool:
    """True when one of ``functions`` is the GPU the firmware's console and framebuffer are on:
    the function whose ``boot_vga`` reads 1 (the VGA arbiter's boot device; sysfs-bus-pci), or,
    on a host where no function says so (no VGA-class device, e.g. an OVMF boot on a display
    controller), any display-class (0x03) function handed over when it is the only one or
    when the host has several and none is marked (then the consoles may be on it)."""
    marked = [e for e in host.listdir("/sys/bus/pci/devices")
              if host.read_or(path(e, "boot_vga")) == "1"]
    if marked:
        return any(a in marked for a in functions)
    return any((host.read_or(path(a, "class"), "") or "").startswith("0x03") for a in functions)


def iommu_group(host: Host, addr: str) -> str | None:
    """The IOMMU group (str, e.g. ``"1"``) of function ``addr`` from its ``iommu_group`` link,
    or None when the function has none (IOMMU off; Documentation/ABI/testing/sysfs-kernel-iommu_groups)."""
    return host.link_name(path(addr, "iommu_group"))


def group_endpoints(host: Host, group: str) -> list[str]:
    """The endpoints (sorted addresses) of IOMMU group ``group``: its devices less the PCI
    bridges (class ``0x0604``), which need no driver change (vfio.rst "Groups, Devices, and
    IOMMUs")."""
    return [m for m in host.listdir(f"/sys/kernel/iommu_groups/{group}/devices")
            if not (host.read_or(path(m, "class"), "") or "").startswith("0x0604")]


def driver_registered(host: Host, driver: str) -> bool:
    """True when PCI driver ``driver`` is registered (``/sys/bus/pci/drivers/DRV`` exists)."""
    return host.exists(f"/sys/bus/pci/drivers/{driver}")


def write_attr(host: Host, p: str, data: str, timeout_s: float, code: str, what: str) -> None:
    """Write ``data`` to sysfs attribute ``p`` within ``timeout_s`` (s).

    :raises HookdError: ``code`` naming ``what``, the value and the kernel's errno; ``TIMEOUT``
        when the write did not return in time.
    """
    try:
        host.write(p, data, timeout_s)
    except OSError as exc:
        raise HookdError(code, f"{what}: writing {data.strip()!r} to {p}: {oserror_text(exc)}")


def bind_with_driver_override(host: Host, addr: str, override: str | None, driver: str | None,
                              timeout_s: float) -> str | None:
    """Hand PCI function ``addr`` to ``driver`` the way libvirt's
    ``virPCIDeviceBindWithDriverOverride`` does, and return the driver bound afterwards.

    1. write ``override`` to ``driver_override`` (``None`` clears it with a newline);
    2. unbind ``addr`` from its current driver unless that already is ``driver``;
    3. when ``driver`` is set, registered and not yet bound, write ``addr`` to
       ``/sys/bus/pci/drivers_probe`` (the kernel picks the override, else matching IDs).

    A ``driver`` whose module is not loaded leaves the function unbound: loading the module
    binds it. The caller checks the result against what it wanted. Never ``new_id``
    (driver-wide). Source: ``Documentation/ABI/testing/sysfs-bus-pci``.

    :param timeout_s: deadline of each sysfs write (s).
    :raises HookdError: ``BIND_FAILED`` for a write the kernel refused, ``TIMEOUT``.
    """
    code = errors.BIND_FAILED
    write_attr(host, path(addr, "driver_override"), override or "\n", timeout_s, code, addr)
    now = current_driver(host, addr)
    if now and now != driver:
        write_attr(host, f"/sys/bus/pci/drivers/{now}/unbind", addr, timeout_s, code, addr)
    if driver and current_driver(host, addr) != driver and driver_registered(host, driver):
        write_attr(host, "/sys/bus/pci/drivers_probe", addr, timeout_s, code, addr)
    return current_driver(host, addr)


def module_of_driver(host: Host, driver: str) -> str:
    """Module (str) that registers PCI driver ``driver`` (``drivers/DRV/module`` link; the
    driver name with ``-`` as ``_`` when the link is absent)."""
    return host.link_name(f"/sys/bus/pci/drivers/{driver}/module") or driver.replace("-", "_")


def child_modules(host: Host, addr: str) -> list[str]:
    """Modules of the drivers bound to the child devices of PCI function ``addr`` (str list).

    Some GPUs are driven through a child device, not the PCI function: virtio-vga's function
    is bound to the bus driver virtio-pci, and the DRM driver virtio_gpu to its child
    ``virtio0`` (seen on Linux 6.1 in a QEMU guest). The child is gone once the function is
    unbound, so this is read before prepare. Built-in drivers (no ``module`` link) are left out.
    """
    base = host.resolve(path(addr))
    mods: list[str] = []
    for entry in host.subdirs(base):
        if ADDRESS_RE.fullmatch(entry) or not host.link_name(f"{base}/{entry}/driver"):
            continue
        try:
            drv_dir = host.resolve(f"{base}/{entry}/driver")
        except (HookdError, OSError):
            continue
        mod = host.link_name(f"{drv_dir}/module")
        if mod and mod not in mods:
            mods.append(mod)
    return mods


def devices_by_module(host: Host) -> dict[str, list[str]]:
    """Every bound device (host path, symlinks resolved) by the module of its driver, on any
    bus: the device links in ``/sys/bus/*/drivers/DRV/`` under the driver's ``module`` link
    (sysfs-bus-*; Documentation/driver-api/driver-model/driver.rst). Built-in drivers (no
    ``module`` link) are left out. One walk of the drivers for all modules."""
    out: dict[str, set[str]] = {}
    for bus in host.listdir("/sys/bus"):
        base = f"/sys/bus/{bus}/drivers"
        for drv in host.listdir(base):
            module = host.link_name(f"{base}/{drv}/module")
            if module is None:
                continue
            found = out.setdefault(module, set())
            for entry in host.listdir(f"{base}/{drv}"):
                if entry == "module" or host.link_name(f"{base}/{drv}/{entry}") is None:
                    continue
                try:
                    found.add(host.resolve(f"{base}/{drv}/{entry}"))
                except (HookdError, OSError):
                    continue
    return {m: sorted(d) for m, d in out.items()}


def devices_of_module(host: Host, module: str) -> list[str]:
    """The devices bound to the drivers of ``module`` (:func:`devices_by_module`)."""
    return devices_by_module(host).get(module, [])


def unload_plan(host: Host, roots: list[str], functions) -> tuple[list[str], dict[str, str]]:
    """Which of the modules ``roots`` (and the modules holding them) may be unloaded when
    ``functions`` (PCI addresses) are handed over, in unload order, and why each was taken or
    kept: ``(order, {module: why})``.

    A module is unloaded only when every device its drivers drive (:func:`devices_of_module`:
    PCI functions, their child devices, devices elsewhere on the host) is one of ``functions``
    or below one of them, and every module holding it may be unloaded too (rmmod needs its
    holders gone first; sysfs-module ``holders/``). So shared subsystem modules (usbcore,
    xhci_hcd, i2c_core, typec, snd core, drm core) stay while the rest of the host uses them:
    a GPU's USB-C controller (xHCI) and its root hubs on usbcore take no USB module from the
    host's own controller and keyboard. Modules never unloaded (:func:`never_unload_reason`),
    not loaded or built in are left out.
    """
    tops = []
    for addr in functions:
        try:
            tops.append(host.resolve(path(addr)))
        except (HookdError, OSError):
            continue

    def ours(dev: str) -> bool:
        return any(dev == t or dev.startswith(t + "/") for t in tops)

    verdict: dict[str, tuple[bool, str]] = {}
    bound = devices_by_module(host)

    def check(mod: str, trail: tuple) -> tuple[bool, str]:
        if mod in verdict:
            return verdict[mod]
        if mod in trail:   # a holder cycle cannot happen in the kernel
            return True, "cycle"
        why_never = never_unload_reason(mod)
        if why_never:
            verdict[mod] = (False, f"never unloaded: {why_never}")
            return verdict[mod]
        devices = bound.get(mod, [])
        outside = [d for d in devices if not ours(d)]
        if outside:
            shown = ", ".join(os.path.basename(d) for d in outside[:3])
            more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
            verdict[mod] = (False, f"also drives {shown}{more}, not handed over")
            return verdict[mod]
        for holder in host.listdir(f"/sys/module/{mod}/holders"):
            if not host.module_loaded(holder) or host.module_builtin(holder):
                continue
            ok, why = check(holder, trail + (mod,))
            if not ok:
                verdict[mod] = (False, f"held by {holder}, which is kept ({why})")
                return verdict[mod]
        shown = ", ".join(sorted({os.path.basename(d) for d in devices})) or "no device"
        verdict[mod] = (True, f"drives {shown}" if devices else "drives no device; holds a "
                                                                  "module unloaded here")
        return verdict[mod]

    wanted: list[str] = []
    todo = [m.replace("-", "_") for m in roots]
    while todo:
        mod = todo.pop(0)
        if mod in wanted or not host.module_loaded(mod) or host.module_builtin(mod):
            continue
        ok, _why = check(mod, ())
        if not ok:
            continue
        wanted.append(mod)
        todo.extend(host.listdir(f"/sys/module/{mod}/holders"))
    why = {m: v[1] for m, v in verdict.items()}
    return unload_order(host, wanted), why


def unload_order(host: Host, roots: list[str]) -> list[str]:
    """Loaded, non-built-in modules among ``roots``, ordered so each comes after all its
    holders (``/sys/module/M/holders``, sysfs-module ABI). Modules that are never unloaded
    (:func:`never_unload_reason`) are left out.
    """
    wanted: list[str] = []
    todo = [m.replace("-", "_") for m in roots]
    while todo:
        mod = todo.pop(0)
        if mod in wanted or never_unload_reason(mod):
            continue
        if not host.module_loaded(mod) or host.module_builtin(mod):
            continue
        wanted.append(mod)
    order: list[str] = []
    left = list(wanted)
    while left:
        ready = [m for m in left
                 if not set(host.listdir(f"/sys/module/{m}/holders")) & (set(left) - {m})]
        if not ready:  # a holder cycle cannot happen in the kernel; keep the rest as found
            ready = left[:1]
        for m in ready:
            order.append(m)
            left.remove(m)
    return order


def device_nodes(host: Host, addr: str) -> list[str]:
    """Device nodes (host paths) that belong to PCI function ``addr`` or to any device below it:
    every ``DEVNAME=`` in a ``uevent`` file of the function's sysfs subtree (DRM and sound
    nodes, the DDC and UCSI i2c adapters' ``/dev/i2c-N``, the nodes of a USB controller's
    devices and their input/hidraw children, ``/dev/fbN``; sysfs-devices-uevent), plus
    ``/dev/kfd`` for a function amdgpu drives (it pins amdgpu), and for NVIDIA ``/dev/nvidiaN``
    from ``/proc/driver/nvidia/gpus/ADDR/information`` and the driver-wide nodes
    (``/dev/nvidiactl``, ``/dev/nvidia-modeset``, ``/dev/nvidia-uvm*``,
    ``/dev/nvidia-caps/*``).

    For the function that shows the boot display (:func:`shows_boot_display`), the nodes of
    the firmware framebuffer devices (:data:`FIRMWARE_FRAMEBUFFERS`: efifb's ``/dev/fbN``,
    simpledrm's ``/dev/dri/cardN``) count too, wherever sysfs puts them: since Linux 6.9 they
    are below the function (``sysfb_parent_dev``; seen on Debian's 6.12), before that below
    ``/sys/devices/platform`` (Debian's 6.1). They draw into the GPU's memory, which the VM
    gets."""
    nodes: list[str] = []
    try:
        top = host.resolve(path(addr))
    except (HookdError, OSError):
        return nodes
    todo = [top]        # a stack: the firmware framebuffers go below, walked last
    if shows_boot_display(host, [addr]):
        for fb in FIRMWARE_FRAMEBUFFERS:
            link = f"/sys/bus/platform/devices/{fb}"
            try:
                d = host.resolve(link) if host.exists(link) else None
            except (HookdError, OSError):
                d = None
            if d is None:
                continue
            if not (d == top or d.startswith(top + "/")):     # else found below top
                todo.insert(0, d)
    while todo:
        d = todo.pop()
        for line in (host.read_or(f"{d}/uevent", "") or "").splitlines():
            if line.startswith("DEVNAME="):
                nodes.append("/dev/" + line[len("DEVNAME="):])
        todo.extend(f"{d}/{e}" for e in reversed(host.subdirs(d)))
    if current_driver(host, addr) == "amdgpu" and host.exists("/dev/kfd"):
        nodes.append("/dev/kfd")
    info = host.read_or(f"/proc/driver/nvidia/gpus/{addr}/information")
    if info is not None:
        for line in info.splitlines():
            if line.replace(" ", "").lower().startswith("deviceminor:"):
                nodes.append(f"/dev/nvidia{line.split(':', 1)[1].strip()}")
        nodes.extend(n for n in NVIDIA_SHARED_NODES if host.exists(n))
        nodes.extend(f"/dev/nvidia-caps/{n}" for n in host.listdir("/dev/nvidia-caps"))
    return list(dict.fromkeys(nodes))