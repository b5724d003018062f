"""The host's checks for ``vfio-hookd check`` (see :mod:`vfio_hookd.preflight`).

Sources: the IOMMU: ACPI tables ``DMAR`` (Intel VT-d) and ``IVRS`` (AMD-Vi) under
``/sys/firmware/acpi/tables`` (Documentation/ABI/testing/sysfs-firmware-acpi), the IOMMU
units under ``/sys/class/iommu`` (sysfs-class-iommu), the groups under
``/sys/kernel/iommu_groups`` (sysfs-kernel-iommu_groups), the parameters ``intel_iommu=``,
``amd_iommu=``, ``iommu=`` (Documentation/admin-guide/kernel-parameters.txt); modules:
``/sys/module/M`` and ``/lib/modules/RELEASE/modules.dep``/``modules.builtin`` (depmod(8));
process start time: field 22 of ``/proc/PID/stat`` in clock ticks since boot and ``btime`` of
``/proc/stat`` (proc(5)); libvirt finds its hooks only when the daemon starts or reloads, and
once a qemu hook existed at that time, new files in ``qemu.d`` run at once (FIELD-NOTES §1);
SELinux booleans: ``/sys/fs/selinux/booleans/NAME`` reads ``current pending`` (selinuxfs),
``virt_hooks_unconfined`` (FIELD-NOTES §7).
"""

from __future__ import annotations

import os
import re
import time

from ..errors import HookdError
from . import FAIL, PASS, WARN, Check

ACPI_TABLES = "/sys/firmware/acpi/tables"
HOOKS_DIR = "/etc/libvirt/hooks"
HOOK = f"{HOOKS_DIR}/qemu.d/vfio-hookd"
#: The libvirt daemons that run qemu hooks: monolithic libvirtd, modular virtqemud; each
#: writes ``/run/NAME.pid`` when it runs as root.
LIBVIRT_DAEMONS = (("libvirtd", "libvirtd.service"), ("virtqemud", "virtqemud.service"))
GRUB_HINT = "(GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub) and reboot"


def run(host, paths, systemd) -> list[Check]:
    """The host's checks, in order (module docstring)."""
    return (iommu(host) + [vfio_pci(host)] + hook(host) + daemon(host, paths, systemd)
            + selinux(host))


def iommu(host) -> list[Check]:
    """``iommu.firmware``, ``iommu.enabled``, ``iommu.groups``, ``iommu.cmdline``."""
    dmar = host.exists(f"{ACPI_TABLES}/DMAR")
    ivrs = host.exists(f"{ACPI_TABLES}/IVRS")
    units = host.listdir("/sys/class/iommu")
    groups = host.listdir("/sys/kernel/iommu_groups")
    cmdline = (host.read_or("/proc/cmdline", "") or "").split()
    param = "intel_iommu=on" if dmar else "amd_iommu=on" if ivrs else \
        "intel_iommu=on (Intel) or amd_iommu=on (AMD)"
    off = [a for a in cmdline if a in ("intel_iommu=off", "amd_iommu=off", "iommu=off")]
    on = [a for a in cmdline if a in ("intel_iommu=on", "amd_iommu=on", "iommu=pt")]
    fix_on = (f"remove {' '.join(off)} from the kernel command line {GRUB_HINT}" if off else
              f"add {param} to the kernel command line {GRUB_HINT}")
    out = []
    if dmar or ivrs:
        out.append(Check("iommu.firmware", PASS, "ACPI " + " and ".join(
            n for n, t in (("DMAR table (Intel VT-d)", dmar), ("IVRS table (AMD-Vi)", ivrs))
            if t)))
    elif units:
        out.append(Check("iommu.firmware", PASS, "no ACPI DMAR or IVRS table, but the kernel "
                                                  "has IOMMU units"))
    else:
        out.append(Check("iommu.firmware", FAIL, "no ACPI DMAR or IVRS table: the firmware "
                         "describes no IOMMU", "enable VT-d (Intel) or AMD-Vi / IOMMU (AMD) in "
                         "the firmware setup"))
    if units:
        out.append(Check("iommu.enabled", PASS, f"IOMMU units: {', '.join(units)}"))
    else:
        out.append(Check("iommu.enabled", FAIL, "no IOMMU unit in /sys/class/iommu: the IOMMU "
                         "is off", fix_on))
    if groups:
        out.append(Check("iommu.groups", PASS, f"{len(groups)} IOMMU groups"))
    else:
        out.append(Check("iommu.groups", FAIL, "no IOMMU group in /sys/kernel/iommu_groups: "
                         "no function can be handed to vfio-pci", fix_on))
    if off:
        out.append(Check("iommu.cmdline", FAIL, f"the kernel command line has "
                                                f"{' '.join(off)}", fix_on))
    elif on:
        out.append(Check("iommu.cmdline", PASS, f"the kernel command line has {' '.join(on)}"))
    elif units:
        out.append(Check("iommu.cmdline", PASS, "no IOMMU parameter: the kernel enables it by "
                                                "default"))
    else:
        out.append(Check("iommu.cmdline", FAIL, f"the kernel command line lacks {param}",
                         fix_on))
    return out


def vfio_pci(host) -> Check:
    """``vfio.pci``: vfio-pci loaded, built in, or a module of the running kernel."""
    if host.module_builtin("vfio_pci"):
        return Check("vfio.pci", PASS, "vfio-pci is built into the kernel")
    if host.module_loaded("vfio_pci"):
        return Check("vfio.pci", PASS, "vfio-pci is loaded")
    release = host.read_or("/proc/sys/kernel/osrelease", "") or ""
    base = f"/lib/modules/{release}"
    dep = host.read_or(f"{base}/modules.dep", "") or ""
    builtin = host.read_or(f"{base}/modules.builtin", "") or ""
    if re.search(r"(^|/)vfio-pci\.ko(\.\w+)?:", dep, re.M):
        return Check("vfio.pci", PASS, f"vfio-pci is a module of {release} (loaded on the "
                                       f"first prepare)")
    if re.search(r"(^|/)vfio-pci\.ko$", builtin, re.M):
        return Check("vfio.pci", PASS, "vfio-pci is built into the kernel")
    return Check("vfio.pci", FAIL, f"kernel {release or '(release unknown)'} has no vfio-pci "
                 f"(not in {base}/modules.dep nor built in)",
                 "boot a kernel built with CONFIG_VFIO_PCI (Debian's linux-image-amd64 is)")


def _installed_at(st) -> float:
    """When a file was put in place (s since the epoch): the later of mtime and ctime (a
    package keeps the build's mtime; ctime is when it was written or renamed here)."""
    return max(st.st_mtime, st.st_ctime)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _started_at(host, pid: int) -> float | None:
    """When process ``pid`` started (s since the epoch), from ``/proc/PID/stat`` field 22
    (clock ticks after boot) and ``/proc/stat`` ``btime`` (proc(5)); None if unreadable."""
    stat = host.read_or(f"/proc/{pid}/stat")
    boot = host.read_or("/proc/stat", "") or ""
    m = re.search(r"^btime (\d+)$", boot, re.M)
    if not stat or ")" not in stat or not m:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    try:
        ticks = int(fields[19])   # field 22; the fields after ")" start at field 3
    except (IndexError, ValueError):
        return None
    return int(m.group(1)) + ticks / os.sysconf("SC_CLK_TCK")


def running_libvirt(host) -> list[tuple[str, str, int]]:
    """``[(name, unit, pid)]`` of the libvirt daemons that run now (their pid file names a
    live process of that name)."""
    out = []
    for name, unit in LIBVIRT_DAEMONS:
        pid = (host.read_or(f"/run/{name}.pid", "") or "").strip()
        if pid.isdigit() and (host.read_or(f"/proc/{pid}/comm", "") or "").strip() == name:
            out.append((name, unit, int(pid)))
    return out


def _qemu_hooks(host) -> list[str]:
    """Every qemu hook libvirt runs: ``hooks/qemu`` and the executable files of ``qemu.d``."""
    found = []
    for p in [f"{HOOKS_DIR}/qemu"] + [f"{HOOKS_DIR}/qemu.d/{n}"
                                      for n in host.listdir(f"{HOOKS_DIR}/qemu.d")]:
        st = host.stat(p)
        if st is not None and os.path.isfile(host.path(p)) and st.st_mode & 0o111:
            found.append(p)
    return found


def hook(host) -> list[Check]:
    """``hook.installed`` (present, executable, root's alone) and ``hook.loaded`` (seen by
    the running libvirt daemon: installed before it started, or another qemu hook was)."""
    st = host.stat(HOOK)
    if st is None:
        return [Check("hook.installed", FAIL, f"no hook at {HOOK}",
                      "vfio-hookd install (or install the vfio-hookd package)")]
    if not os.path.isfile(host.path(HOOK)) or not st.st_mode & 0o111:
        return [Check("hook.installed", FAIL, f"{HOOK} is not an executable file "
                      f"(mode {st.st_mode & 0o7777:04o}): libvirt skips it", f"chmod 755 {HOOK}")]
    if st.st_uid != 0 or st.st_mode & 0o022:
        return [Check("hook.installed", FAIL, f"{HOOK} is owned by uid {st.st_uid} with mode "
                      f"{st.st_mode & 0o7777:04o}: libvirt runs it as root",
                      f"chown root:root {HOOK} && chmod 755 {HOOK}")]
    out = [Check("hook.installed", PASS, f"{HOOK} (executable, root's)")]
    daemons = running_libvirt(host)
    if not daemons:
        out.append(Check("hook.loaded", PASS, "no libvirt daemon runs now (no /run/libvirtd.pid "
                         "or /run/virtqemud.pid of a live one): it finds the hook when it "
                         "starts"))
        return out
    installed = _installed_at(st)
    for name, unit, pid in daemons:
        started = _started_at(host, pid)
        if started is None:
            out.append(Check("hook.loaded", WARN, f"cannot read when {name} (PID {pid}) "
                             f"started", f"systemctl restart {unit} makes sure"))
        elif installed <= started:
            out.append(Check("hook.loaded", PASS, f"{name} (PID {pid}) started "
                             f"{_when(started)}, after the hook was installed "
                             f"({_when(installed)})"))
        else:
            older = [p for p in _qemu_hooks(host) if p != HOOK
                     and _installed_at(host.stat(p)) <= started]
            if older:
                out.append(Check("hook.loaded", PASS, f"{name} (PID {pid}) started before the "
                                 f"hook was installed, but {older[0]} was there then, so it "
                                 f"runs every file in qemu.d at once"))
            else:
                out.append(Check("hook.loaded", FAIL, f"{name} (PID {pid}) started "
                                 f"{_when(started)}, before the hook was installed "
                                 f"({_when(installed)}); libvirt looks for hooks only when it "
                                 f"starts or reloads, and a reload leaves no trace to check",
                                 f"systemctl restart {unit} (running VMs keep running)"))
    return out


def daemon(host, paths, systemd) -> list[Check]:
    """``daemon.socket`` and ``daemon.service``: vfio-hookd's units (systemd's view)."""
    try:
        sock = systemd.active_state("vfio-hookd.socket")
        svc = systemd.active_state("vfio-hookd.service")
    except HookdError as exc:
        there = os.path.exists(paths.socket)   # the run directory, not a host path
        return [Check("daemon.socket", WARN, f"systemd could not be asked ({exc.message}); "
                      f"the control socket {paths.socket} "
                      f"{'exists' if there else 'does not exist'}")]
    enable = "systemctl enable --now vfio-hookd.socket vfio-hookd.service"
    out = [Check("daemon.socket", PASS, f"vfio-hookd.socket is {sock}") if sock == "active"
           else Check("daemon.socket", FAIL, f"vfio-hookd.socket is {sock}: the hook cannot "
                      f"reach the daemon and every managed VM's start fails", enable)]
    if svc in ("active", "activating", "reloading"):
        out.append(Check("daemon.service", PASS, f"vfio-hookd.service is {svc}"))
    elif svc == "failed":
        out.append(Check("daemon.service", FAIL, "vfio-hookd.service failed",
                         "journalctl -u vfio-hookd.service, then systemctl restart "
                         "vfio-hookd.service"))
    elif sock == "active":
        out.append(Check("daemon.service", PASS, f"vfio-hookd.service is {svc}; the socket "
                         f"starts it on the first request"))
    else:
        out.append(Check("daemon.service", FAIL, f"vfio-hookd.service is {svc}", enable))
    return out


def selinux(host) -> list[Check]:
    """``selinux.hooks``, on SELinux hosts only: the ``virt_hooks_unconfined`` boolean."""
    enforce = host.read_or("/sys/fs/selinux/enforce")
    if enforce is None:
        return []
    value = host.read_or("/sys/fs/selinux/booleans/virt_hooks_unconfined")
    fix = "setsebool -P virt_hooks_unconfined on"
    if value is None:
        return [Check("selinux.hooks", WARN, "SELinux is on and its policy has no "
                      "virt_hooks_unconfined boolean: the hook runs as virt_hook_t")]
    if value.split()[:1] == ["1"]:
        return [Check("selinux.hooks", PASS, "virt_hooks_unconfined is on")]
    if enforce.strip() == "1":
        return [Check("selinux.hooks", WARN, "SELinux is enforcing and virt_hooks_unconfined "
                      "is off: the hook runs confined as virt_hook_t and may not reach the "
                      "daemon's socket", fix)]
    return [Check("selinux.hooks", PASS, "SELinux is permissive (virt_hooks_unconfined off)")]
