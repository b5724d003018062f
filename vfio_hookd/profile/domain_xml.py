"""The host PCI functions a libvirt domain passes through, read from its domain XML.

Used when a profile says ``devices: auto``: the hook receives the domain XML on stdin and the
functions to hand to vfio-pci are its PCI ``<hostdev>`` sources. Separate from profile
validation; ``defusedxml`` (and with it ``xml.etree``) is imported only when a document is
read.

Bounded: a document larger than :data:`MAX_DOMAIN_XML_BYTES` is refused before it is parsed,
and it is parsed by ``defusedxml`` with DTDs forbidden, so an entity bomb ("billion laughs")
or an external entity is refused as ``DOMAIN_XML_INVALID`` instead of being expanded.
"""

from __future__ import annotations

import re

from .. import errors

#: The largest domain XML read (bytes, UTF-8): 1 MiB. libvirt's XML for a big VM (dozens of
#: devices) is tens of KiB. The daemon's request carries it JSON-escaped (at most 3 bytes per
#: byte of XML text) within its 4 MiB (:data:`vfio_hookd.daemon.MAX_REQUEST`).
MAX_DOMAIN_XML_BYTES = 1024 * 1024


def check_domain_xml_size(xml: str, source: str = "domain XML") -> None:
    """Refuse a domain XML of more than :data:`MAX_DOMAIN_XML_BYTES` bytes in UTF-8.

    :raises HookdError: ``DOMAIN_XML_INVALID`` naming the limit.
    """
    if len(xml) > MAX_DOMAIN_XML_BYTES or \
            len(xml.encode("utf-8", "surrogatepass")) > MAX_DOMAIN_XML_BYTES:
        raise errors.HookdError(
            errors.DOMAIN_XML_INVALID,
            f"{source}: larger than {MAX_DOMAIN_XML_BYTES} bytes (1 MiB), the most vfio-hookd "
            f"reads (libvirt's XML for a big VM is tens of KiB)")


def devices_from_domain_xml(xml: str, source: str = "domain XML") -> tuple[str, ...]:
    """The host PCI functions a libvirt domain passes through, as normalised addresses: the
    ``address`` of each of :func:`pci_hostdevs` (same errors)."""
    return tuple(h["address"] for h in pci_hostdevs(xml, source))


def pci_hostdevs(xml: str, source: str = "domain XML") -> list[dict]:
    """The PCI ``<hostdev>``s of a libvirt domain: host address and ``managed`` attribute.

    Reads every ``<domain><devices><hostdev mode='subsystem' type='pci'>`` (``mode`` defaults
    to ``subsystem`` as in libvirt) and its ``<source><address domain= bus= slot= function=/>``
    (``0x0000 0x01 0x00 0x0``; numbers are read like libvirt's ``virStrToLong_uip(..., 0)``:
    ``0x`` hex, leading ``0`` octal, else decimal). The ``<address type='pci'>`` directly under
    ``<hostdev>`` is the *guest* address and is ignored, as are USB/SCSI/mdev hostdevs and
    ``<interface type='hostdev'>``. Order: document order, duplicates dropped. Source of the
    format: libvirt ``docs/formatdomain.rst`` (Host device assignment), ``src/conf/device_conf.c``.

    :param xml: the domain XML (str), as libvirt gives the hook on stdin.
    :param source: what to call it in error messages (str).
    :returns: ``[{"address": "0000:01:00.0", "managed": bool}]`` (``managed`` as libvirt
        reads it: ``yes`` is True, absent or ``no`` False); empty when the domain has no PCI
        hostdev.
    :raises HookdError: ``DOMAIN_XML_INVALID`` for a document over
        :data:`MAX_DOMAIN_XML_BYTES`, XML that is not well-formed or has a DTD (``<!DOCTYPE``,
        entity declarations: libvirt writes none), a root that is not ``<domain>``, or a PCI hostdev whose source address is missing or malformed (the
        message names the element).
    """
    root = _root(xml, source)
    found: dict[str, bool] = {}   # document order, duplicates dropped, linear
    for n, hostdev in enumerate(root.findall("./devices/hostdev"), start=1):
        mode = hostdev.get("mode", "subsystem")
        if mode != "subsystem" or hostdev.get("type") != "pci":
            continue
        where = f"{source}: <hostdev mode='{mode}' type='pci'> (hostdev #{n})"
        address = hostdev.find("./source/address")
        if address is None:
            raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                    f"{where} has no <source><address .../></source>")
        parts = []
        for attr, limit in (("domain", 0xFFFF), ("bus", 0xFF), ("slot", 0x1F), ("function", 7)):
            value = address.get(attr)
            number = _xml_uint(value)
            if number is None or number > limit:
                got = "is missing" if value is None else f"is {_short(repr(value))}"
                raise errors.HookdError(
                    errors.DOMAIN_XML_INVALID,
                    f"{where}: <source><address {attr}=...> {got}, expected a number "
                    f"0..{limit:#x} such as {'0x0000' if attr == 'domain' else '0x01'}")
            parts.append(number)
        addr = "%04x:%02x:%02x.%x" % tuple(parts)
        found.setdefault(addr, hostdev.get("managed", "no") == "yes")
    return [{"address": a, "managed": m} for a, m in found.items()]


def _root(xml: str, source: str):
    """The ``<domain>`` element of ``xml``, parsed by defusedxml with DTDs forbidden.

    :raises HookdError: ``DOMAIN_XML_INVALID`` (too large, not well-formed, a DTD, another root).
    """
    from xml.etree.ElementTree import ParseError

    import defusedxml
    from defusedxml import ElementTree

    check_domain_xml_size(xml, source)
    try:
        root = ElementTree.fromstring(xml, forbid_dtd=True)
    except ParseError as e:
        raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                f"{source}: not well-formed XML: {e}") from None
    except defusedxml.DefusedXmlException as e:
        raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                f"{source}: has a DTD or entity declarations, which libvirt "
                                f"never writes; refused unread ({type(e).__name__})") from None
    except ValueError as e:  # e.g. a str with an encoding declaration expat cannot honour
        raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                f"{source}: not readable XML: {_short(str(e))}") from None
    if root.tag != "domain":
        raise errors.HookdError(
            errors.DOMAIN_XML_INVALID,
            f"{source}: the root element is <{_short(root.tag)}>, expected <domain>")
    return root


def _short(s: str, limit: int = 80) -> str:
    """``s``, cut to ``limit`` characters for a message."""
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} characters)"


def _xml_uint(s: str | None) -> int | None:
    """Parse an unsigned number like C ``strtoul(s, &end, 0)`` consuming all of ``s``."""
    if s is None:
        return None
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", s):
        return int(s, 16)
    if re.fullmatch(r"0[0-7]*", s):
        return int(s, 8)
    if re.fullmatch(r"[1-9][0-9]*", s):
        return int(s)
    return None


def cputune_cpusets(xml: str, source: str = "domain XML") -> dict:
    """The host CPU sets of a domain's ``<cputune>`` (libvirt ``docs/formatdomain.rst``, CPU
    Tuning): ``{"vcpupin": [cpuset of each <vcpupin>, in document order], "emulatorpin":
    cpuset of <emulatorpin> or None}``, the ``cpuset`` attributes as written (libvirt's
    syntax: ``1-4,^3,6``; read with :func:`vfio_hookd.cpus.parse`).

    :raises HookdError: ``DOMAIN_XML_INVALID`` as :func:`pci_hostdevs`, and for a
        ``<vcpupin>``/``<emulatorpin>`` without ``cpuset``.
    """
    root = _root(xml, source)
    out: dict = {"vcpupin": [], "emulatorpin": None}
    for tag in ("vcpupin", "emulatorpin"):
        for el in root.findall(f"./cputune/{tag}"):
            cpuset = el.get("cpuset")
            if cpuset is None:
                raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                        f"{source}: <cputune><{tag}> has no cpuset attribute")
            if tag == "vcpupin":
                out["vcpupin"].append(cpuset)
            else:
                out["emulatorpin"] = cpuset
    return out


#: libvirt's memory units (``docs/formatdomain.rst``, Memory Allocation): the factor in bytes;
#: no unit is KiB.
_UNITS = {"b": 1, "bytes": 1, "KB": 1000, "k": 1024, "KiB": 1024, "MB": 1000 ** 2,
          "M": 1024 ** 2, "MiB": 1024 ** 2, "GB": 1000 ** 3, "G": 1024 ** 3, "GiB": 1024 ** 3,
          "TB": 1000 ** 4, "T": 1024 ** 4, "TiB": 1024 ** 4}


def _bytes(element, what: str, source: str) -> int:
    """The size an element gives as its text (``<memory unit='GiB'>8</memory>``) or its
    ``size`` attribute (``<page size='2' unit='M'/>``) with ``unit`` (default KiB), in bytes."""
    text = element.get("size") if element.tag == "page" else element.text
    unit = element.get("unit", "KiB")
    number = _xml_uint((text or "").strip())
    if number is None or number == 0 or unit not in _UNITS:
        raise errors.HookdError(
            errors.DOMAIN_XML_INVALID,
            f"{source}: {what} is {_short(repr(text))} {_short(repr(unit))}: expected a number "
            f"> 0 and a unit of libvirt's ({', '.join(_UNITS)})")
    return number * _UNITS[unit]


def hugepages_from_domain_xml(xml: str, source: str = "domain XML") -> dict | None:
    """What a domain asks for hugepages: None when its XML has no
    ``<memoryBacking><hugepages/>``, else ``{"memory_kib": int, "page_kib": int | None}``:
    the domain's ``<memory>`` (``unit`` attribute, KiB by default) and the size of the one
    ``<page size= unit=>`` inside ``<hugepages>`` (KiB; None: no ``<page>``, the host's
    default hugepage size). Source of the format: libvirt ``docs/formatdomain.rst`` (Memory
    Allocation, Memory Backing).

    :raises HookdError: ``DOMAIN_XML_INVALID`` as :func:`pci_hostdevs`, and for a missing or
        malformed ``<memory>`` or ``<page>``, or pages of several sizes (libvirt backs guest
        NUMA nodes with different sizes through ``nodeset``; give ``hugepages: {pages, size}``
        in the profile then).
    """
    root = _root(xml, source)
    hp = root.find("./memoryBacking/hugepages")
    if hp is None:
        return None
    memory = root.find("./memory")
    if memory is None:
        raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                f"{source}: <memoryBacking><hugepages/> but no <memory>")
    sizes = sorted({_bytes(p, "<hugepages><page size=... unit=...>", source)
                    for p in hp.findall("./page")})
    if len(sizes) > 1:
        raise errors.HookdError(
            errors.DOMAIN_XML_INVALID,
            f"{source}: <hugepages> has pages of {len(sizes)} sizes (per guest NUMA node); "
            f"vfio-hookd allocates one size: give hugepages: {{pages: N, size: S}} in the "
            f"profile")
    return {"memory_kib": -(-_bytes(memory, "<memory>", source) // 1024),
            "page_kib": sizes[0] // 1024 if sizes else None}
