"""Small libvirt domain XML for the demo and the tests (not product code: the product never
defines domains)."""

from __future__ import annotations

from xml.sax.saxutils import escape

from vfio_hookd.pci import ADDRESS_RE

__all__ = ["tiny_domain_xml"]


def tiny_domain_xml(name: str, hostdevs: list[str] | tuple[str, ...] = (),
                    managed: bool = True) -> str:
    """Return the XML of the smallest domain that starts quickly under TCG.

    ``<domain type='qemu'>`` (TCG: KVM cannot run a stock guest on the test machines), 64 MiB,
    1 vCPU, machine ``pc``, no disk, no graphics, no video, no serial, USB controller
    ``none``, memballoon ``none``, every lifecycle event ``destroy``. SeaBIOS finds nothing to
    boot and idles, so the domain stays ``running`` until destroyed. Measured: ``virsh start``
    returns in about 0.4 s (FIELD-NOTES §5).

    :param name: the domain name (XML-escaped here; libvirt itself rejects ``/``).
    :param hostdevs: PCI addresses such as ``"0000:01:00.0"``, each added as a
        ``<hostdev mode='subsystem' type='pci'>``. Only useful where those functions exist
        (libvirt checks ``/sys/bus/pci/devices/ADDR`` at start) or where only the XML matters.
    :param managed: the hostdevs' ``managed`` attribute (libvirt detaches/reattaches managed
        devices itself, ``src/util/virpci.c``).
    :raises ValueError: a hostdev that is not a full lower-case PCI address.
    """
    devs = []
    for addr in hostdevs:
        m = ADDRESS_RE.fullmatch(addr)
        if not m:
            raise ValueError(f"not a PCI address (DDDD:BB:SS.F): {addr!r}")
        dom, bus, slot, fn = m.groups()
        devs.append(
            f"    <hostdev mode='subsystem' type='pci' managed='{'yes' if managed else 'no'}'>\n"
            f"      <source><address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}'"
            f" function='0x{fn}'/></source>\n"
            f"    </hostdev>\n")
    return (
        "<domain type='qemu'>\n"
        f"  <name>{escape(name)}</name>\n"
        "  <memory unit='MiB'>64</memory>\n"
        "  <vcpu>1</vcpu>\n"
        "  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>destroy</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        "    <controller type='usb' model='none'/>\n"
        "    <memballoon model='none'/>\n"
        + "".join(devs) +
        "  </devices>\n"
        "</domain>\n"
    )
