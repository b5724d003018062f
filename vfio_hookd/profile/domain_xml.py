"""The host PCI functions a libvirt domain passes through, read from its domain XML.

Used when a profile says ``devices: auto``: the hook receives the domain XML on stdin and the
functions to hand to vfio-pci are its PCI ``<hostdev>`` sources. Separate from profile
validation; ``xml.etree`` is imported only when a document is read.
"""

from __future__ import annotations

import re

from .. import errors


def devices_from_domain_xml(xml: str, source: str = "domain XML") -> tuple[str, ...]:
    """The host PCI functions a libvirt domain passes through, as normalised addresses.

    Reads every ``<domain><devices><hostdev mode='subsystem' type='pci'>`` (``mode`` defaults
    to ``subsystem`` as in libvirt) and its ``<source><address domain= bus= slot= function=/>``
    (``0x0000 0x01 0x00 0x0``; numbers are read like libvirt's ``virStrToLong_uip(..., 0)``:
    ``0x`` hex, leading ``0`` octal, else decimal). The ``<address type='pci'>`` directly under
    ``<hostdev>`` is the *guest* address and is ignored, as are USB/SCSI/mdev hostdevs and
    ``<interface type='hostdev'>``. Order: document order, duplicates dropped. Source of the
    format: libvirt ``docs/formatdomain.rst`` (Host device assignment), ``src/conf/device_conf.c``.

    :param xml: the domain XML (str), as libvirt gives the hook on stdin.
    :param source: what to call it in error messages (str).
    :returns: tuple of ``"0000:01:00.0"`` strings; empty when the domain has no PCI hostdev.
    :raises HookdError: ``DOMAIN_XML_INVALID`` for XML that is not well-formed, a root that is
        not ``<domain>``, or a PCI hostdev whose source address is missing or malformed (the
        message names the element).
    """
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as e:
        raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                f"{source}: not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise errors.HookdError(errors.DOMAIN_XML_INVALID,
                                f"{source}: the root element is <{root.tag}>, expected <domain>")
    found: list[str] = []
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
                got = "is missing" if value is None else f"is {value!r}"
                raise errors.HookdError(
                    errors.DOMAIN_XML_INVALID,
                    f"{where}: <source><address {attr}=...> {got}, expected a number "
                    f"0..{limit:#x} such as {'0x0000' if attr == 'domain' else '0x01'}")
            parts.append(number)
        addr = "%04x:%02x:%02x.%x" % tuple(parts)
        if addr not in found:
            found.append(addr)
    return tuple(found)


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
