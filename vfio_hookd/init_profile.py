"""``vfio-hookd init VM``: write a first profile from the domain XML and the host as it is now.

What it decides (and prints, and writes as comments in the profile):

- ``devices``: the domain's PCI ``<hostdev>``s, extended to every endpoint of their IOMMU
  groups (a group is handed over whole: vfio.rst "Groups, Devices, and IOMMUs"; bridges are
  not endpoints); for each function the domain XML lacks, the ``<hostdev>`` snippet to add.
- ``display_manager: auto``, with the unit ``display-manager.service`` resolves to now.
- ``stop_units``: the system services that hold the functions' device nodes now (e.g.
  nvidia-persistenced, nvidia-powerd), each with the PIDs and nodes that say why; the display
  manager and login sessions are left out (``display_manager`` ends them).
- everything else at its default, commented as in ``config.example.yaml``.

It never overwrites a profile (``PROFILE_EXISTS``); with ``force`` the old file is kept as
``VM.yaml.<UTC time>.bak``. The file is written root-only-writable (0644 in a 0755
directory: :mod:`vfio_hookd.trust` accepts it) through a temporary file and a rename, then read
back with the product's own reader (:func:`vfio_hookd.profile.load_profile`); if that fails,
the old state is put back and the error raised.
"""

from __future__ import annotations

import os
import time

from . import errors, pci
from .errors import HookdError
from .gpu_users import gpu_users
from .host import Host
from .paths import Paths, check_vm_name

#: Names of the PCI classes (class << 8 | subclass) a GPU's functions have (PCI Code and ID
#: Assignment Specification; the names lspci prints).
CLASS_NAMES = {
    0x0300: "VGA compatible controller", 0x0302: "3D controller", 0x0380: "display controller",
    0x0403: "audio device", 0x0c03: "USB controller", 0x0c80: "serial bus controller",
    0x0c05: "SMBus", 0x0604: "PCI bridge",
}


def describe(host: Host, addr: str) -> str:
    """``"10de:2484 VGA compatible controller, driver nvidia"`` for function ``addr``."""
    vendor = (host.read_or(pci.path(addr, "vendor"), "") or "")[2:]
    device = (host.read_or(pci.path(addr, "device"), "") or "")[2:]
    cls = host.read_or(pci.path(addr, "class"), "") or ""
    try:
        name = CLASS_NAMES.get(int(cls, 16) >> 8, f"class {cls}")
    except ValueError:
        name = "class unknown"
    return f"{vendor}:{device} {name}, driver {pci.current_driver(host, addr) or 'none'}"


def hostdev_snippet(addr: str) -> str:
    """The ``<hostdev>`` element (str, 3 lines) that passes function ``addr`` to a domain
    (libvirt ``docs/formatdomain.rst``, Host device assignment)."""
    dom, bus, slot_fn = addr.split(":")
    slot, fn = slot_fn.split(".")
    return (f"<hostdev mode='subsystem' type='pci' managed='yes'>\n"
            f"  <source><address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' "
            f"function='0x{fn}'/></source>\n"
            f"</hostdev>")


def gpus(host: Host) -> list[str]:
    """The display-class (0x03) functions of the host (sorted addresses)."""
    return [a for a in host.listdir("/sys/bus/pci/devices")
            if (host.read_or(pci.path(a, "class"), "") or "").startswith("0x03")]


def decide_devices(host: Host, hostdevs: list[str], source: str) -> tuple[list[str], list[str]]:
    """``(devices, missing)``: the domain's functions ``hostdevs`` and every other endpoint of
    their IOMMU groups (in that order), and those of them the domain lacks.

    :raises HookdError: ``DEVICE_NOT_FOUND`` for a hostdev not on this host,
        ``IOMMU_GROUP_INCOMPLETE`` for one without an IOMMU group (IOMMU off).
    """
    devices = list(hostdevs)
    for addr in hostdevs:
        if not host.exists(pci.path(addr)):
            raise HookdError(errors.DEVICE_NOT_FOUND,
                             f"{source} names {addr} in a <hostdev>, but it is not a PCI "
                             f"function on this host (see lspci -D)")
        group = pci.iommu_group(host, addr)
        if group is None:
            raise HookdError(errors.IOMMU_GROUP_INCOMPLETE,
                             f"{addr} has no IOMMU group: enable the IOMMU (intel_iommu=on or "
                             f"amd_iommu=on) and reboot; vfio-hookd check says more")
        for member in pci.group_endpoints(host, group):
            if member not in devices:
                devices.append(member)
    return devices, [a for a in devices if a not in hostdevs]


def no_hostdev_error(host: Host, vm: str, source: str) -> HookdError:
    """``DOMAIN_XML_INVALID`` for a domain without a PCI hostdev, naming the host's GPUs and
    the ``<hostdev>``s that would pass each (with its whole IOMMU group)."""
    lines = []
    for gpu in gpus(host):
        group = pci.iommu_group(host, gpu)
        members = pci.group_endpoints(host, group) if group else [gpu]
        snippets = " ".join(" ".join(hostdev_snippet(a).split()) for a in members)
        lines.append(f"{gpu} ({describe(host, gpu)}; IOMMU group {group or 'none'}: "
                     f"{', '.join(members)}): {snippets}")
    listing = "; ".join(lines) if lines else "this host has no display-class PCI function"
    return HookdError(errors.DOMAIN_XML_INVALID,
                      f"{source} has no PCI <hostdev>: nothing to hand over. Add the GPU's "
                      f"functions to the domain (virsh edit {vm}), then run vfio-hookd init "
                      f"again. GPUs here: {listing}")


def decide_units(host: Host, devices, systemd) -> tuple[str | None, list, list, list[str]]:
    """``(display manager, [(unit, why)] for stop_units, other users, notes)`` from the
    holders of the functions' nodes now; systemd unreachable -> no units, and a note."""
    notes: list[str] = []
    dm = None
    try:
        try:
            dm = systemd.resolve("display-manager.service")
        except HookdError as exc:
            if exc.code != errors.UNIT_FAILED:
                raise
            notes.append("display-manager.service does not exist here: no display manager")
        users = gpu_users(host, devices, systemd)
    except HookdError as exc:
        notes.append(f"systemd could not be asked ({exc.message}): display manager and "
                     f"stop_units not resolved")
        users = gpu_users(host, devices, None)
    stop: dict[str, list] = {}
    others = []
    for u in users:
        if u.is_system_service and u.unit != dm:
            stop.setdefault(u.unit, []).append(u)
        else:
            others.append(u)
    proposed = [(unit, "; ".join(f"PID {u.pid} ({u.command}) holds {', '.join(u.nodes)}"
                                 for u in us)) for unit, us in stop.items()]
    return dm, proposed, others, notes


def render(vm: str, devices: list[str], missing: list[str], hostdevs: list[str], host: Host,
           dm: str | None, stop_units: list, others: list, notes: list[str]) -> str:
    """The profile's YAML text with its comments (see the module docstring)."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [f"# vfio-hookd profile of the libvirt domain {vm!r}, written by `vfio-hookd init`",
           f"# on {when} from the domain XML and this host. Every key is explained in",
           f"# config.example.yaml. Check it with: vfio-hookd check {vm}", "",
           "# devices: the functions handed to the VM: the domain's PCI <hostdev>s and every",
           "# other endpoint of their IOMMU groups (a group is handed over whole).",
           "devices:"]
    for addr in devices:
        group = pci.iommu_group(host, addr)
        origin = "in the domain XML" if addr in hostdevs else \
            "NOT in the domain XML: add its <hostdev>, below"
        out.append(f'  - "{addr}"   # {describe(host, addr)}, IOMMU group {group}; {origin}')
    if missing:
        out.append(f"# Add these to <devices> of the domain (virsh edit {vm}):")
        for addr in missing:
            out.extend("#   " + ln for ln in hostdev_snippet(addr).splitlines())
    out += ["", "# display_manager: auto resolves display-manager.service"
            + (f" (here, now: {dm})" if dm else " (none here now)") + " and stops it",
            "# only when the desktop uses the GPU handed over; or a unit name; or none.",
            "display_manager: auto", "",
            "# stop_units: system services stopped (first to last) before the GPU is taken and",
            "# started again (last to first) after; proposed from what holds the GPU now."]
    if stop_units:
        out.append("stop_units:")
        out.extend(f"  - {unit}   # {why}" for unit, why in stop_units)
    else:
        out.append("stop_units: []")
    for u in others:
        how = ("the display manager: display_manager stops it" if u.unit and u.unit == dm else
               "a login session: it ends with the display manager" if u.is_session else
               "in no system service: stop it before the VM starts, or set on_busy: terminate")
        out.append(f"# also holding the GPU now: {u} -- {how}")
    out.extend(f"# note: {n}" for n in notes)
    out += ["", "# vtconsoles / framebuffer: when the GPU shows the boot display, unbind the",
            "# frame-buffer consoles / the firmware framebuffer (auto), or leave them (none).",
            "vtconsoles: auto", "framebuffer: auto", "",
            "# modules: unload the functions' driver modules when nothing else on the host uses",
            "# them (auto), a list of module names, or none.", "modules: auto", "",
            "# on_busy: processes still holding the GPU once the units are stopped: fail (name",
            "# them) or terminate (SIGTERM, then SIGKILL after deadlines.terminate).",
            "on_busy: fail", "",
            "# hugepages: the VM's memory in the hugepage pool while it runs: auto (the",
            "# domain's <memory> when its XML has <memoryBacking><hugepages/>), a request such",
            "# as {pages: 8192, size: 2M}, or none.", "hugepages: none", "",
            "# deadlines (seconds) of each host operation; past one, the step fails with TIMEOUT",
            "# and what was done is undone.", "deadlines:"]
    from .profile import DEFAULT_DEADLINES
    out.extend(f"  {k}: {v:g}" for k, v in DEFAULT_DEADLINES.items())
    return "\n".join(out) + "\n"


def refuse_existing(path: str, vm: str) -> None:
    """:raises HookdError: ``PROFILE_EXISTS`` when ``path`` exists (a dangling link too)."""
    if os.path.lexists(path):
        raise HookdError(errors.PROFILE_EXISTS,
                         f"{path} exists: vfio-hookd init never overwrites a profile; edit it, "
                         f"or run 'vfio-hookd init {vm} --force' (the old file is kept as a "
                         f".bak beside it)", {"file": path})


def write_profile(paths: Paths, vm: str, text: str, force: bool) -> str | None:
    """Write ``text`` as ``vm``'s profile and read it back with the profile reader; returns
    the backup's path (``force`` over an existing file) or None.

    :raises HookdError: ``PROFILE_EXISTS`` (no ``force``), ``INSTALL_FAILED`` for a write the
        system refused, or the reader's error (the old state is restored first).
    """
    from .profile import load_profile
    path = paths.profile_path(vm)
    if not force:
        refuse_existing(path, vm)
    backup = None
    tmp = f"{path}.init-tmp"
    try:
        for d in (paths.config_dir, paths.profiles_dir):
            if not os.path.isdir(d):
                os.mkdir(d, 0o755)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.fchmod(fd, 0o644)   # whatever the umask: root writes, everyone reads
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.lexists(path):
            backup = f"{path}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.bak"
            os.rename(path, backup)
        os.rename(tmp, path)
    except OSError as exc:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise HookdError(errors.INSTALL_FAILED,
                         f"writing {path}: {exc.strerror or exc}") from None
    try:
        load_profile(paths, vm)
    except HookdError:
        os.unlink(path)
        if backup:
            os.rename(backup, path)
        raise
    return backup


def init(host: Host, paths: Paths, vm: str, xml: str, systemd, source: str,
         force: bool = False) -> dict:
    """Decide, write and validate ``vm``'s profile (module docstring).

    :param xml: the domain XML (str); ``source`` names it in messages.
    :param systemd: a :class:`vfio_hookd.systemd.Systemd` (read-only use).
    :returns: ``{"file", "backup", "devices", "missing", "snippets", "display_manager",
        "stop_units": [[unit, why]], "others": [str], "notes": [str]}``.
    :raises HookdError: ``VM_NAME_INVALID``, ``PROFILE_EXISTS``, ``DOMAIN_XML_INVALID`` (also
        for a domain without a PCI hostdev), ``DEVICE_NOT_FOUND``, ``IOMMU_GROUP_INCOMPLETE``,
        ``INSTALL_FAILED``, ``PROFILE_INVALID`` (a bug: what it wrote does not read back).
    """
    from .profile.domain_xml import pci_hostdevs
    check_vm_name(vm)
    path = paths.profile_path(vm)
    if not force:
        refuse_existing(path, vm)   # before anything else is read
    hostdevs = [h["address"] for h in pci_hostdevs(xml, source)]
    if not hostdevs:
        raise no_hostdev_error(host, vm, source)
    devices, missing = decide_devices(host, hostdevs, source)
    dm, stop_units, others, notes = decide_units(host, devices, systemd)
    text = render(vm, devices, missing, hostdevs, host, dm, stop_units, others, notes)
    backup = write_profile(paths, vm, text, force)
    return {"file": path, "backup": backup, "devices": devices, "missing": missing,
            "snippets": {a: hostdev_snippet(a) for a in missing}, "display_manager": dm,
            "stop_units": [list(s) for s in stop_units], "others": [str(u) for u in others],
            "notes": notes}


def report(result: dict, vm: str) -> list[str]:
    """What ``vfio-hookd init`` prints: the file and each decision (lines of str)."""
    lines = [f"wrote {result['file']} (read back: valid)"]
    if result["backup"]:
        lines.append(f"  the old profile is kept as {result['backup']}")
    for addr in result["devices"]:
        origin = "same IOMMU group, NOT in the domain XML" if addr in result["missing"] \
            else "from the domain XML"
        lines.append(f"  device {addr} ({origin})")
    lines.append(f"  display manager: {result['display_manager'] or 'none found'} "
                 f"(display_manager: auto)")
    for unit, why in result["stop_units"]:
        lines.append(f"  stop_units: {unit} ({why})")
    if not result["stop_units"]:
        lines.append("  stop_units: none (no system service holds the GPU now)")
    lines.extend(f"  also holding the GPU: {o}" for o in result["others"])
    lines.extend(f"  note: {n}" for n in result["notes"])
    lines.append("  vtconsoles, framebuffer, modules, on_busy, hugepages, deadlines: defaults")
    if result["missing"]:
        lines.append(f"add to the domain (virsh edit {vm}), inside <devices>:")
        for addr in result["missing"]:
            lines.extend("  " + ln for ln in result["snippets"][addr].splitlines())
    lines.append(f"next: vfio-hookd check {vm}")
    return lines
