"""A VM's checks for ``vfio-hookd check VM`` (see :mod:`vfio_hookd.preflight`).

Sources: the profile reader (:func:`vfio_hookd.profile.load_profile`) and the plan's group
rule (:func:`vfio_hookd.plan.check_groups`); the domain XML's PCI ``<hostdev>``s and their
``managed`` attribute (libvirt ``docs/formatdomain.rst``; libvirt gives back at stop only
what it detached itself, FIELD-NOTES §1); who holds the GPU (:mod:`vfio_hookd.gpu_users`);
``reset_method`` (Linux >= 5.15) and ``power_state`` (Linux >= 5.11) of each function
(Documentation/ABI/testing/sysfs-bus-pci); the AMD reset bug and vendor-reset
(FIELD-NOTES §2, §7; :data:`VENDOR_RESET_IDS`).
"""

from __future__ import annotations

from .. import errors, pci
from ..errors import HookdError
from . import FAIL, PASS, WARN, Check

#: AMD GPUs whose own reset leaves them unusable for a second VM start and that vendor-reset
#: resets (Polaris 10/11/12, Vega 10/20, Navi 10/12/14, Arcturus): the device IDs of
#: gnif/vendor-reset ``src/device-db.h`` (commit ca6a270), vendor 0x1002.
VENDOR_RESET_IDS = frozenset(int(x, 16) for x in (
    # Polaris 10
    "67c0 67c1 67c2 67c4 67c7 67d0 67df 67c8 67c9 67ca 67cc 67cf 6fdf "
    # Polaris 11
    "67e0 67e3 67e8 67eb 67ef 67ff 67e1 67e7 67e9 "
    # Polaris 12
    "6980 6981 6985 6986 6987 6995 6997 699f "
    # Vega 10
    "6860 6861 6862 6863 6864 6867 6868 6869 686a 686b 686c 686d 686e 686f 687f "
    # Vega 20
    "66a0 66a1 66a2 66a3 66a4 66a7 66af "
    # Navi 10, Navi 14, Navi 12, Arcturus (MI100)
    "7310 7312 7318 7319 731a 731b 731e 731f 1681 7340 7341 7347 734f 7360 7362 738c"
).split())


def run(host, paths, systemd, vm: str, xml: str | None, xml_problem: str | None) -> list[Check]:
    """The checks of ``vm``, in order; those that need what an earlier one could not give
    (a valid profile, functions on the host) are left out."""
    from ..profile import load_profile
    try:
        prof = load_profile(paths, vm)
    except HookdError as exc:
        fix = f"vfio-hookd init {vm}" if exc.code == errors.NOT_MANAGED else \
            f"correct {paths.profile_path(vm)}"
        return [Check("vm.profile", FAIL, exc.message, fix)]
    out = [Check("vm.profile", PASS, f"{prof.path} is valid")]
    hostdevs = None
    if xml is not None:
        from ..profile.domain_xml import pci_hostdevs
        try:
            hostdevs = pci_hostdevs(xml, f"the domain XML of {vm!r}")
        except HookdError as exc:
            out.append(Check("vm.domain", FAIL, exc.message, f"virsh edit {vm}"))
    else:
        out.append(Check("vm.domain", WARN, f"the domain XML could not be read "
                         f"({xml_problem}): the hostdev checks are skipped",
                         f"vfio-hookd check {vm} --xml FILE"))
    if prof.devices is not None:
        devices = list(prof.devices)
    elif hostdevs is not None:
        devices = [h["address"] for h in hostdevs]
    else:
        return out
    if not devices:
        out.append(Check("vm.devices", FAIL, "devices: auto, and the domain has no PCI "
                         "<hostdev>", f"virsh edit {vm}: add the GPU's functions"))
        return out
    absent = [a for a in devices if not host.exists(pci.path(a))]
    if absent:
        out.append(Check("vm.devices", FAIL, f"not on this host: {', '.join(absent)}",
                         "correct devices: in the profile (see lspci -D)"))
        return out
    from ..init_profile import describe, hostdev_snippet
    out.append(Check("vm.devices", PASS, "; ".join(f"{a} ({describe(host, a)})"
                                                     for a in devices)))
    out.append(_group(host, devices))
    if hostdevs is not None:
        out += _hostdevs(vm, devices, hostdevs, prof.devices is None, hostdev_snippet)
    out += _units_and_holders(host, systemd, prof, devices)
    out += _reset(host, devices)
    return out


def _group(host, devices) -> Check:
    from ..plan import check_groups
    try:
        check_groups(host, "the profile", devices)
    except HookdError as exc:
        return Check("vm.iommu_group", FAIL, exc.message, "add the missing functions to "
                     "devices: (vfio-hookd init --force writes them) and to the domain")
    groups = sorted({pci.iommu_group(host, a) for a in devices})
    return Check("vm.iommu_group", PASS, f"IOMMU group {', '.join(groups)} complete")


def _hostdevs(vm, devices, hostdevs, auto, snippet) -> list[Check]:
    """``vm.hostdevs`` (the domain passes what the profile hands over) and ``vm.managed``."""
    in_xml = [h["address"] for h in hostdevs]
    out = []
    extra = [a for a in in_xml if a not in devices]
    lacking = [a for a in devices if a not in in_xml]
    if extra:
        out.append(Check("vm.hostdevs", FAIL, f"the domain passes {', '.join(extra)}, which "
                         f"the profile does not hand over: nothing frees it for the VM",
                         "add it to devices: in the profile"))
    elif lacking:
        out.append(Check("vm.hostdevs", WARN, f"the profile hands over {', '.join(lacking)}, "
                         f"which the domain does not pass: the VM does not get it",
                         f"virsh edit {vm}, add " + " ".join(" ".join(snippet(a).split())
                                                          for a in lacking)))
    else:
        out.append(Check("vm.hostdevs", PASS, "the domain's PCI hostdevs are the profile's "
                         "devices" + (" (devices: auto)" if auto else "")))
    unmanaged = [h["address"] for h in hostdevs if not h["managed"]]
    stray = [a for a in unmanaged if a not in devices]
    if stray:
        out.append(Check("vm.managed", FAIL, f"{', '.join(stray)}: managed='no' and not in the "
                         f"profile: nothing binds it to vfio-pci, the start fails",
                         "add it to devices: in the profile"))
    else:
        out.append(Check("vm.managed", PASS, ", ".join(
            f"{h['address']} managed='{'yes' if h['managed'] else 'no'}'" for h in hostdevs)
            + ": vfio-hookd binds them; libvirt gives back only what it detached itself"
            if hostdevs else "no PCI hostdev"))
    return out


def _units_and_holders(host, systemd, prof, devices) -> list[Check]:
    """``vm.display_manager``, ``vm.stop_units`` and ``vm.holders``."""
    from ..gpu_users import FATES, fate, gpu_users
    out = []
    try:
        dm = None
        if prof.display_manager == "auto":
            try:
                dm = systemd.resolve("display-manager.service")
                out.append(Check("vm.display_manager", PASS, f"display-manager.service is {dm} "
                                 f"({systemd.active_state(dm)})"))
            except HookdError as exc:
                if exc.code != errors.UNIT_FAILED:
                    raise
                out.append(Check("vm.display_manager", PASS, "no display-manager.service: no "
                                 "display manager to stop"))
        elif prof.display_manager is None:
            out.append(Check("vm.display_manager", PASS, "display_manager: none"))
        else:
            dm = _resolve(systemd, prof.display_manager, "vm.display_manager", out)
        units = [u for u in (_resolve(systemd, u, "vm.stop_units", out)
                             for u in prof.stop_units) if u]
        if prof.stop_units and len(units) == len(prof.stop_units):
            out.append(Check("vm.stop_units", PASS, ", ".join(
                f"{u} ({systemd.active_state(u)})" for u in units)))
        users = gpu_users(host, devices, systemd)
    except HookdError as exc:
        return out + [Check("vm.holders", WARN, f"systemd could not be asked: {exc.message}")]
    blocking, ending = [], []
    for u in users:
        how = fate(u, dm, units)
        (ending if how else blocking).append((u, how))
    said = "; ".join(f"{u} (ends: {FATES[how]})" for u, how in ending)
    if not blocking:
        out.append(Check("vm.holders", PASS, said or "nothing holds the GPU's device nodes"))
    elif prof.on_busy == "terminate":
        out.append(Check("vm.holders", WARN, "on_busy: terminate ends "
                         + "; ".join(str(u) for u, _ in blocking)
                         + (f"; {said}" if said else "")))
    else:
        fixes = sorted({f"add {u.unit} to stop_units" if u.is_system_service
                        else f"stop PID {u.pid} ({u.command})" for u, _ in blocking})
        out.append(Check("vm.holders", FAIL, "nothing a prepare stops ends "
                         + "; ".join(str(u) for u, _ in blocking)
                         + ": the start fails with DEVICE_BUSY (on_busy: fail)"
                         + (f"; {said}" if said else ""),
                         ", ".join(fixes) + ", or set on_busy: terminate"))
    return out


def _resolve(systemd, unit: str, name: str, out: list) -> str | None:
    try:
        return systemd.resolve(unit)
    except HookdError as exc:
        if exc.code != errors.UNIT_FAILED:
            raise
        out.append(Check(name, FAIL, f"{exc.message}: the prepare fails with UNIT_FAILED",
                         f"correct {unit} in the profile (systemctl list-units)"))
        return None


def _reset(host, devices) -> list[Check]:
    """``vm.reset_method``, ``vm.power_state`` and, for an AMD card with the reset bug,
    ``vm.amd_reset``."""
    out = []
    methods = {a: host.read_or(pci.path(a, "reset_method")) for a in devices}
    none = [a for a, m in methods.items() if m is not None and not m.strip()]
    shown = "; ".join(f"{a}: {m or 'unknown (Linux < 5.15)'}" if m is None or m.strip()
                      else f"{a}: none" for a, m in methods.items())
    out.append(Check("vm.reset_method", WARN if none else PASS, shown,
                     "a function without a reset may not work in a second VM start; "
                     "see your card's reset quirks" if none else None))
    states = {a: host.read_or(pci.path(a, "power_state")) for a in devices}
    cold = [a for a, s in states.items() if s == "D3cold"]
    out.append(Check("vm.power_state", WARN if cold else PASS, "; ".join(
        f"{a}: {s or 'unknown'}" for a, s in states.items()),
        "; ".join(f"echo on > /sys/bus/pci/devices/{a}/power/control" for a in cold) or None))
    buggy = [a for a in devices if host.read_or(pci.path(a, "vendor")) == "0x1002"
             and _device_id(host, a) in VENDOR_RESET_IDS]
    if buggy:
        loaded = host.module_loaded("vendor_reset")
        unset = [a for a in buggy if "device_specific" not in (methods[a] or "").split()]
        if not loaded:
            out.append(Check("vm.amd_reset", WARN, f"{', '.join(buggy)}: an AMD GPU whose own "
                             f"reset fails (Polaris/Vega/Navi 1x) and vendor-reset is not "
                             f"loaded: a second VM start may find it dead until reboot",
                             "install vendor-reset (github.com/gnif/vendor-reset, DKMS) and "
                             "load it at boot"))
        elif unset:
            out.append(Check("vm.amd_reset", WARN, f"vendor-reset is loaded, but "
                             f"{', '.join(unset)} does not use it (reset_method)", "; ".join(
                                 f"echo device_specific > /sys/bus/pci/devices/{a}/reset_method"
                                 for a in unset)))
        else:
            out.append(Check("vm.amd_reset", PASS, f"{', '.join(buggy)}: reset by vendor-reset "
                                                   f"(device_specific)"))
    return out


def _device_id(host, addr: str) -> int | None:
    try:
        return int(host.read_or(pci.path(addr, "device"), "") or "", 16)
    except ValueError:
        return None
