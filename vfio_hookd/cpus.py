"""CPU sets: the kernel's cpulist format, systemd's ``AllowedCPUs`` bitmask, the host's
present/online CPUs, and which CPUs a VM gets (for the ``cpu_isolation`` and ``cpu_governor``
steps, :mod:`vfio_hookd.steps.cpus`).

Formats, with their sources:

- cpulist (``Documentation/admin-guide/cgroup-v2.rst`` "cpuset.cpus",
  ``Documentation/ABI/testing/sysfs-devices-system-cpu`` ``present``/``online``): comma
  separated CPU numbers and ranges, ``0-3,8-11``; :func:`parse` reads it, :func:`format_list`
  writes the canonical form (ascending, ranges merged).
- libvirt's cpuset (``docs/formatdomain.rst``, ``<vcpupin cpuset=...>``): the same, plus
  ``^N`` to exclude a CPU (``1-4,^3``); :func:`parse` with ``libvirt=True``.
- systemd's ``AllowedCPUs`` on D-Bus (``org.freedesktop.systemd1(5)``, type ``ay``): a
  little-endian bitmask, byte 0 holds CPUs 0-7 (bit ``n % 8`` of byte ``n // 8``); an empty
  array means "no restriction" (``systemd.resource-control(5)``: an empty ``AllowedCPUs=``
  resets it). :func:`to_mask` / :func:`from_mask`.

Which CPUs are the VM's (:func:`resolve`):

- ``host_cpus: LIST``: the host keeps LIST; the VM's CPUs are the online CPUs not in it.
- ``host_cpus: auto``: the VM's CPUs are those of the domain XML's ``<cputune><vcpupin
  cpuset=...>`` and ``<emulatorpin cpuset=...>``; the host keeps the other online CPUs.
- ``host_cpus: none`` with a ``cpu_governor``: the governor goes on the ``<vcpupin>`` CPUs.
"""

from __future__ import annotations

import re

from . import errors
from .errors import HookdError

#: The largest CPU number accepted (the kernel's NR_CPUS is at most 8192 on x86-64).
MAX_CPU = 8191

_RANGE = re.compile(r"(\^?)(\d+)(?:-(\d+))?")


def parse(text: str, libvirt: bool = False) -> frozenset[int]:
    """The CPUs of cpulist ``text`` (``"0-3,8-11"``; spaces around items are allowed).

    :param libvirt: also accept libvirt's ``^N`` exclusions (``"1-4,^3"``).
    :returns: frozenset of CPU numbers (ints >= 0); empty for ``""``.
    :raises ValueError: a malformed item, a range whose end is below its start, a CPU above
        :data:`MAX_CPU`; the message names the item.
    """
    cpus: set[int] = set()
    drop: set[int] = set()
    if not text.strip():
        return frozenset()
    for item in text.split(","):
        item = item.strip()
        m = _RANGE.fullmatch(item)
        if not m or (m.group(1) and not libvirt) or (m.group(1) and m.group(3)):
            raise ValueError(f"{item!r} is not a CPU number or range (e.g. 0-3,8-11)")
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        if hi < lo:
            raise ValueError(f"{item!r}: the range ends below its start")
        if hi > MAX_CPU:
            raise ValueError(f"{item!r}: CPU numbers go up to {MAX_CPU}")
        (drop if m.group(1) else cpus).update(range(lo, hi + 1))
    return frozenset(cpus - drop)


def format_list(cpus) -> str:
    """The canonical cpulist of ``cpus`` (iterable of ints): ``{0,1,2,3,8}`` -> ``"0-3,8"``;
    ``""`` for none."""
    out, run = [], []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(_run(run))
        run = [c]
    if run:
        out.append(_run(run))
    return ",".join(out)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def to_mask(cpus) -> bytes:
    """systemd's ``AllowedCPUs`` bitmask (``ay``) of ``cpus``: bit ``n % 8`` of byte
    ``n // 8``; ``b""`` for no CPUs (= no restriction)."""
    cpus = set(cpus)
    if not cpus:
        return b""
    mask = bytearray(max(cpus) // 8 + 1)
    for c in cpus:
        mask[c // 8] |= 1 << (c % 8)
    return bytes(mask)


def from_mask(mask) -> frozenset[int]:
    """The CPUs of an ``AllowedCPUs`` bitmask (bytes or a list of ints 0-255)."""
    return frozenset(i * 8 + b for i, byte in enumerate(bytes(mask)) for b in range(8)
                     if byte >> b & 1)


def profile_value(v, type_name: str) -> str | None:
    """The profile's ``host_cpus`` value ``v`` as :class:`vfio_hookd.profile.Profile` holds it:
    ``"auto"``, None for ``none``, else the canonical cpulist (a lone CPU may be a YAML int).

    :param type_name: the YAML word for ``v``'s type, for the message.
    :raises ValueError: the message (what is wrong, what to write).
    """
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        v = str(v)
    if not isinstance(v, str):
        raise ValueError(f"must be 'auto', 'none' or a CPU list such as '0-3,8-11', "
                         f"got {type_name}")
    if v in ("auto", "none"):
        return None if v == "none" else v
    try:
        cpus = parse(v)
    except ValueError as e:
        raise ValueError(f"must be 'auto', 'none' or a CPU list such as '0-3,8-11': {e}") from None
    if not cpus:
        raise ValueError("empty CPU list: give the CPUs the host keeps (e.g. '0-3'), or 'none'")
    return format_list(cpus)


#: cpufreq governor names: CPUFREQ_NAME_LEN is 16 with the NUL (include/linux/cpufreq.h).
_GOVERNOR = re.compile(r"[a-z0-9_-]{1,15}")


def governor_value(v, type_name: str) -> str | None:
    """The profile's ``cpu_governor`` value ``v``: None for ``none``, else the name.

    :raises ValueError: not a string, or not a governor name.
    """
    if v is False:
        raise ValueError("write 'none' (not false) to leave the governors alone")
    if not isinstance(v, str):
        raise ValueError(f"must be 'none' or a cpufreq governor name such as 'performance', "
                         f"got {type_name}")
    if v == "none":
        return None
    if not _GOVERNOR.fullmatch(v):
        raise ValueError(f"{v!r} is not a cpufreq governor name (lower-case letters, digits, "
                         f"'_', at most 15 characters, e.g. 'performance')")
    return v


def present(host) -> frozenset[int]:
    """The CPUs present (``/sys/devices/system/cpu/present``, sysfs-devices-system-cpu).

    :raises HookdError: ``HOST_IO`` when the file is missing or unreadable.
    """
    return _read_list(host, "/sys/devices/system/cpu/present")


def online(host) -> frozenset[int]:
    """The CPUs online (``/sys/devices/system/cpu/online``).

    :raises HookdError: ``HOST_IO`` when the file is missing or unreadable.
    """
    return _read_list(host, "/sys/devices/system/cpu/online")


def _read_list(host, p: str) -> frozenset[int]:
    text = host.read_or(p)
    try:
        if text is None:
            raise ValueError("missing or unreadable")
        return parse(text)
    except ValueError as e:
        raise HookdError(errors.HOST_IO, f"{p}: {e}") from None


def resolve(host, profile, xml: str | None) -> dict | None:
    """Which CPUs the host keeps and which are the VM's, for ``profile`` on ``host`` now
    (module docstring), validated before anything is touched.

    :param xml: the domain XML (needed for ``host_cpus: auto`` and for a ``cpu_governor``
        without ``host_cpus``).
    :returns: None when the profile asks for neither step; else ``{"host": "0-7" | None
        (no isolation), "vm": "8-15", "online": "0-15", "source": str}`` (cpulists; ``source``
        says where the VM's CPUs came from).
    :raises HookdError: ``DOMAIN_XML_INVALID`` (no XML, or no ``<vcpupin>`` where one is
        needed, or a malformed ``cpuset``); ``PROFILE_INVALID`` naming ``host_cpus`` for CPUs
        not present, a list with no online CPU, or one that leaves the VM no online CPU;
        ``HOST_IO`` when ``present``/``online`` cannot be read.
    """
    host_cpus, governor = profile.host_cpus, profile.cpu_governor
    if host_cpus is None and governor is None:
        return None
    on, there = online(host), present(host)
    where = f"{profile.path}: host_cpus"
    pinned = None
    if host_cpus == "auto" or host_cpus is None:
        pinned = _pinned(xml, profile, need_emulator=host_cpus == "auto")
    if host_cpus is None:
        vm = pinned & on
        if not vm:
            raise HookdError(errors.DOMAIN_XML_INVALID,
                             f"the <vcpupin> CPUs of the domain XML ({format_list(pinned)}) "
                             f"are not online (online: {format_list(on)})")
        return {"host": None, "vm": format_list(vm), "online": format_list(on),
                "source": "the domain XML's <vcpupin> CPUs"}
    if host_cpus == "auto":
        if not pinned & on:
            raise HookdError(errors.DOMAIN_XML_INVALID,
                             f"host_cpus: auto, but none of the domain XML's pinned CPUs "
                             f"({format_list(pinned) or 'none'}) is online (online: "
                             f"{format_list(on)}): nothing would be left for the VM")
        keep = on - pinned
        source = "host_cpus: auto (the online CPUs outside the domain XML's <vcpupin>/<emulatorpin>)"
    else:
        keep = parse(host_cpus)
        absent = keep - there
        if absent:
            raise HookdError(errors.PROFILE_INVALID,
                             f"{where}: CPU {format_list(absent)} is not present on this host "
                             f"(present: {format_list(there)})", {"key": "host_cpus"})
        source = "host_cpus in the profile (the VM: the other online CPUs)"
    if not keep & on:
        raise HookdError(errors.PROFILE_INVALID,
                         f"{where}: {format_list(keep) or 'no CPU'} leaves the host no online "
                         f"CPU (online: {format_list(on)}); keep at least one for the host",
                         {"key": "host_cpus"})
    vm = on - keep
    if not vm:
        raise HookdError(errors.PROFILE_INVALID,
                         f"{where}: {format_list(keep)} covers every online CPU "
                         f"({format_list(on)}): nothing would be left for the VM",
                         {"key": "host_cpus"})
    return {"host": format_list(keep & there), "vm": format_list(vm), "online": format_list(on),
            "source": source}


def _pinned(xml: str | None, profile, need_emulator: bool) -> frozenset[int]:
    """The CPUs the domain XML pins its vCPUs (and emulator threads) to."""
    from .profile.domain_xml import cputune_cpusets

    why = ("host_cpus: auto" if profile.host_cpus == "auto"
           else f"cpu_governor: {profile.cpu_governor} without host_cpus")
    if not xml:
        raise HookdError(errors.DOMAIN_XML_INVALID,
                         f"{profile.path}: {why} needs the domain XML and none came with the "
                         f"request; set host_cpus to a CPU list such as '0-7'")
    sets = cputune_cpusets(xml)
    texts = list(sets["vcpupin"]) + ([sets["emulatorpin"]] if need_emulator
                                     and sets["emulatorpin"] else [])
    if not sets["vcpupin"]:
        raise HookdError(errors.DOMAIN_XML_INVALID,
                         f"{profile.path}: {why}, but the domain XML has no <cputune><vcpupin "
                         f"cpuset=...>: pin the vCPUs (virsh edit) or set host_cpus to a CPU "
                         f"list such as '0-7'")
    cpus: set[int] = set()
    for text in texts:
        try:
            cpus |= parse(text, libvirt=True)
        except ValueError as e:
            raise HookdError(errors.DOMAIN_XML_INVALID,
                             f"domain XML: <cputune> cpuset={text!r}: {e}") from None
    return frozenset(cpus)
