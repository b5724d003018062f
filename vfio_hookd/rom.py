"""``vfio-hookd rom dump ADDR FILE``: the expansion ROM of a PCI function, read through its
sysfs ``rom`` attribute, validated, and written to FILE (e.g. for a domain's ``<rom file=.../>``).

The kernel's side (``Documentation/ABI/testing/sysfs-bus-pci``, "rom";
``drivers/pci/pci-sysfs.c`` ``pci_write_rom``/``pci_read_rom``; ``drivers/pci/rom.c``):

- The attribute exists only for a function with a ROM BAR; its size is the BAR's. Reads give
  ``EINVAL`` until the attribute is enabled: any write enables it, **except** a 2-byte write
  starting with ``0`` at offset 0, which disables it (``echo 0 > rom`` writes ``"0\\n"``; a bare
  ``"0"`` would *enable* it). :func:`dump` writes ``"1\\n"`` and ``"0\\n"``.
- A read maps the ROM (``pci_map_rom``): it turns the BAR's decoding on for the read (some cards
  share the decoder between the ROM and other BARs: a driver using the card loses its MMIO
  meanwhile, the comment of ``pci_enable_rom``) and stops at the end of the last valid image
  (``pci_get_rom_size``: 0x55AA, then "PCIR", then the image length, up to the BAR's size);
  ``EIO`` when the first image has no valid header.
- On x86 the boot VGA device's ROM resource may be the **shadow copy** in RAM at 0xC0000 that
  the system BIOS ran at POST (``arch/x86/pci/fixup.c`` ``pci_fixup_video`` marks the resource
  ``IORESOURCE_ROM_SHADOW``, 0x2 in the flags of line 7 of the function's ``resource`` file);
  then ``rom`` hands out that copy, changed by its own initialisation, whatever driver is bound.

The image (PCI Firmware Specification 3.0, "PCI Expansion ROM"; edk2 ``IndustryStandard/Pci22.h``,
``Pci30.h``, ``EfiPci.h``): each image starts with 0x55AA and at 0x18 has the offset of its PCI
Data Structure ("PCIR"; vendor ID at +4, device ID at +6, device list pointer at +8 (revision
3), structure revision at +0x0C, class code at +0x0D, image length in 512-byte units at +0x10,
code type at +0x14 (0 x86 BIOS, 1 Open Firmware, 2 PA-RISC, 3 EFI), indicator at +0x15, bit 7:
last image). An EFI image has the signature 0x0EF1 at 0x04 and its machine type at 0x0A.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass

from . import errors, pci
from .errors import HookdError
from .host import Host, oserror_text

#: Most bytes read from a ``rom`` attribute (bytes): PCI allows a 16 MiB ROM BAR (the largest
#: option ROM edk2's EfiRom builds); a larger attribute is read only this far.
MAX_ROM_BYTES = 16 * 1024 * 1024
#: ``IORESOURCE_ROM_SHADOW`` (``include/linux/ioport.h``): the ROM resource is a RAM copy.
IORESOURCE_ROM_SHADOW = 0x2
#: Drivers under which the ROM can be read without disturbing anyone (none bound is fine too).
QUIET_DRIVERS = ("vfio-pci", "pci-stub")
#: Code types of the PCI Data Structure (PCI Firmware Specification 3.0).
CODE_TYPES = {0: "x86 BIOS", 1: "Open Firmware", 2: "PA-RISC", 3: "EFI"}
#: EFI machine types (PE/COFF ``Machine``) of an EFI image's header.
EFI_MACHINES = {0x014C: "IA32", 0x8664: "x64", 0x0EBC: "EBC", 0xAA64: "AArch64",
                0x01C2: "ARM", 0x5064: "RISC-V 64"}
#: Timeout of one write to the ``rom`` attribute (s): the kernel only sets a flag.
WRITE_TIMEOUT_S = 5.0


class RomInvalid(Exception):
    """The bytes are no valid expansion ROM: ``check`` (str, what failed, e.g. "signature"),
    ``offset`` (int, where in the ROM), ``message`` (str)."""

    def __init__(self, check: str, offset: int, message: str):
        super().__init__(message)
        self.check, self.offset, self.message = check, offset, message


@dataclass(frozen=True)
class RomImage:
    """One image of an expansion ROM. Offsets and lengths in bytes; IDs as int.

    ``efi_machine`` is set for an EFI image (code type 3) with the 0x0EF1 signature;
    ``checksum_ok`` for an x86 image (its bytes sum to 0 modulo 256; the system BIOS checks
    it), else None. ``device_ids`` is the PCIR's device ID plus its device list (revision 3)."""
    offset: int
    length: int
    pcir_offset: int
    vendor: int
    device_ids: tuple
    class_code: int
    code_type: int
    last: bool
    efi_machine: int | None = None
    checksum_ok: bool | None = None

    @property
    def kind(self) -> str:
        """``"x86 BIOS"``, ``"EFI x64"``, ``"code type 0x70"``..."""
        name = CODE_TYPES.get(self.code_type, f"code type {self.code_type:#04x}")
        if self.efi_machine is not None:
            name += " " + EFI_MACHINES.get(self.efi_machine, f"{self.efi_machine:#06x}")
        return name

    def to_dict(self) -> dict:
        """The fields, IDs as hex strings, plus ``kind`` (for ``--json``)."""
        d = asdict(self)
        d.update(vendor=f"{self.vendor:04x}", device_ids=[f"{i:04x}" for i in self.device_ids],
                 class_code=f"{self.class_code:06x}", kind=self.kind)
        return d


def _u(data: bytes, at: int, size: int, what: str) -> int:
    """Little-endian unsigned int of ``size`` bytes (1, 2, 4) at ``at``.

    :raises RomInvalid: ``truncated`` when ``data`` ends before it."""
    if at < 0 or at + size > len(data):
        raise RomInvalid("truncated", at, f"the ROM ends ({len(data)} bytes) before the {what} "
                         f"at offset {at:#x}")
    return int.from_bytes(data[at:at + size], "little")


def parse_images(data: bytes) -> list[RomImage]:
    """The images of expansion ROM ``data`` (bytes from offset 0 of the ROM), walked by their
    PCIR image lengths up to the one marked last.

    :raises RomInvalid: no 0x55AA at an image's start (``signature``), no "PCIR" where its
        pointer at 0x18 points or a PCIR outside its image (``pcir``), an image length of 0
        (``length``), the data ending inside an image or before the last image (``truncated``).
    """
    images: list[RomImage] = []
    off = 0
    while True:
        if off >= len(data):
            raise RomInvalid("truncated", off, f"the image before offset {off:#x} is not "
                             f"marked last, but the ROM ends there ({len(data)} bytes)")
        sig = _u(data, off, 2, "ROM signature")
        if sig != 0xAA55:
            raise RomInvalid("signature", off, f"no ROM signature 0x55AA at offset {off:#x} "
                             f"(found {sig & 0xFF:02X}{sig >> 8:02X})")
        pcir = off + _u(data, off + 0x18, 2, "PCI data structure pointer")
        if data[pcir:pcir + 4] != b"PCIR":
            raise RomInvalid("pcir", pcir, f"the image at {off:#x} points (offset {off + 0x18:#x})"
                             f" to a PCI data structure at {pcir:#x} without the 'PCIR' "
                             f"signature")
        vendor = _u(data, pcir + 4, 2, "PCIR vendor ID")
        device = _u(data, pcir + 6, 2, "PCIR device ID")
        revision = _u(data, pcir + 0x0C, 1, "PCIR revision")
        class_code = _u(data, pcir + 0x0D, 3, "PCIR class code")
        length = _u(data, pcir + 0x10, 2, "PCIR image length") * 512
        code_type = _u(data, pcir + 0x14, 1, "PCIR code type")
        last = bool(_u(data, pcir + 0x15, 1, "PCIR indicator") & 0x80)
        if length == 0:
            raise RomInvalid("length", pcir + 0x10, f"the image at {off:#x} has length 0 "
                             f"(PCIR offset {pcir + 0x10:#x})")
        if pcir + 0x18 > off + length:
            raise RomInvalid("pcir", pcir, f"the PCI data structure at {pcir:#x} lies outside "
                             f"its image ({off:#x}..{off + length:#x})")
        if off + length > len(data):
            raise RomInvalid("truncated", off + length, f"the image at {off:#x} is {length} "
                             f"bytes long but the ROM ends at {len(data):#x}")
        ids = [device]
        dl = _u(data, pcir + 8, 2, "PCIR device list pointer") if revision >= 3 else 0
        while dl and len(ids) < 256:   # revision 3: more device IDs, ended by 0
            at = pcir + dl + 2 * (len(ids) - 1)
            extra = _u(data, at, 2, "device list entry") if at + 2 <= off + length else 0
            if not extra:
                break
            ids.append(extra)
        efi = None
        if code_type == 3 and _u(data, off + 4, 4, "EFI signature") == 0x0EF1:
            efi = _u(data, off + 0x0A, 2, "EFI machine type")
        checksum = (sum(data[off:off + length]) & 0xFF) == 0 if code_type == 0 else None
        images.append(RomImage(off, length, pcir - off, vendor, tuple(ids), class_code,
                               code_type, last, efi, checksum))
        off += length
        if last:
            return images


def validate(data: bytes, vendor: int, device: int) -> tuple[list[RomImage], list[str]]:
    """Parse ``data`` and check it belongs to a function with IDs ``vendor``:``device``.

    Every image's PCIR vendor ID must be the function's (a ROM of another vendor's card is
    not this card's ROM). A device ID that is neither the PCIR's nor in its device list is
    reported, not refused: vendors ship one image for a family of cards (QEMU's
    ``pci_patch_ids`` rewrites it for that reason). Returns ``(images, warnings)``.

    :raises RomInvalid: :func:`parse_images`' checks, or ``vendor`` (vendor ID mismatch).
    """
    images = parse_images(data)
    warnings = []
    for im in images:
        if im.vendor != vendor:
            raise RomInvalid("vendor", im.offset + im.pcir_offset + 4,
                             f"the image at {im.offset:#x} is for vendor {im.vendor:04x}, the "
                             f"function's vendor is {vendor:04x} (PCIR offset "
                             f"{im.offset + im.pcir_offset + 4:#x})")
        if device not in im.device_ids:
            warnings.append(f"the image at {im.offset:#x} names device "
                            f"{'/'.join(f'{i:04x}' for i in im.device_ids)}, the function is "
                            f"{device:04x} (same vendor: a ROM for a family of cards?)")
        if im.checksum_ok is False:
            warnings.append(f"the x86 image at {im.offset:#x} does not sum to 0 (checksum)")
    return images, warnings


def _unreliable_reason(host: Host, addr: str) -> str | None:
    """Why a read of ``addr``'s ``rom`` would not give the card's ROM as the card has it, or
    None. See the module docstring for the kernel's behaviour."""
    lines = (host.read_or(pci.path(addr, "resource"), "") or "").splitlines()
    if len(lines) > 6:
        try:
            start, _end, flags = (int(v, 16) for v in lines[6].split()[:3])
        except ValueError:
            start, flags = 0, 0
        if flags & IORESOURCE_ROM_SHADOW:
            return (f"the kernel's rom attribute of {addr} is the shadow copy in RAM at "
                    f"{start:#x} that the system BIOS ran at boot (the boot VGA device: "
                    f"IORESOURCE_ROM_SHADOW), changed by its own initialisation, not the "
                    f"card's ROM (under UEFI: nothing, EIO), on vfio-pci too; dump it on a boot "
                    f"where another GPU is the boot display (the firmware setup's primary "
                    f"display), or use the card vendor's image")
    drv = pci.current_driver(host, addr)
    if drv is not None and drv not in QUIET_DRIVERS:
        return (f"{addr} is driven by {drv}: reading the ROM turns on its decoding under the "
                f"driver (it can cut the driver off the card's registers) and a GPU driver "
                f"may have changed what the card shows since POST; dump it while the function "
                f"is on vfio-pci before its VM starts (vfio-hookd prepare VM; rom dump; "
                f"vfio-hookd release VM) or with it unbound")
    if drv == "vfio-pci":
        group = pci.iommu_group(host, addr)
        if group is not None:
            from .procs import find_holders
            users = find_holders(host, [f"/dev/vfio/{group}"])
            if users:
                return (f"{addr} is in use by a VM ({users[0]}): reading the ROM turns on its "
                        f"decoding under the guest's driver; dump it before the VM starts "
                        f"or after it stopped")
    return None


def read_rom(host: Host, addr: str) -> tuple[bytes, int]:
    """Enable ``addr``'s ``rom`` attribute, read it (at most :data:`MAX_ROM_BYTES`), disable it
    again, also when the read fails. Returns ``(data, BAR size in bytes)``.

    :raises HookdError: ``ROM_INVALID`` when the function has no ROM or the kernel finds no
        valid image (``EIO``); ``HOST_IO`` for other errors of the attribute; ``TIMEOUT``.
    """
    rom = pci.path(addr, "rom")
    st = host.stat(rom)
    if st is None:
        raise HookdError(errors.ROM_INVALID, f"{addr} has no expansion ROM (no {rom}: the "
                         f"function has no ROM BAR)")
    bar = st.st_size
    pci.write_attr(host, rom, "1\n", WRITE_TIMEOUT_S, errors.HOST_IO, f"enabling the ROM of {addr}")
    try:
        data = host.read_bytes(rom, min(bar or MAX_ROM_BYTES, MAX_ROM_BYTES))
    except OSError as exc:
        if exc.errno == 5:   # EIO: pci_map_rom found no image (pci_get_rom_size gave 0)
            raise HookdError(errors.ROM_INVALID, f"{rom}: the kernel found no valid ROM image "
                             f"at offset 0x0 ({oserror_text(exc)})") from None
        raise HookdError(errors.HOST_IO, f"reading {rom}: {oserror_text(exc)}") from None
    finally:   # "0\n" exactly: pci_write_rom disables only on a 2-byte write of '0'
        pci.write_attr(host, rom, "0\n", WRITE_TIMEOUT_S, errors.HOST_IO,
                       f"disabling the ROM of {addr} (it stays enabled)")
    return data, bar


def _check_out(out: str, force: bool) -> str:
    """``out`` as an absolute path, once its directory exists and it may be written.

    :raises HookdError: ``HOST_IO`` naming FILE (directory missing, file exists)."""
    out = os.path.abspath(out)
    d = os.path.dirname(out)
    if not os.path.isdir(d):
        raise HookdError(errors.HOST_IO, f"FILE {out}: directory {d} does not exist")
    if os.path.lexists(out) and not force:
        raise HookdError(errors.HOST_IO, f"FILE {out} exists: use --force to replace it")
    return out


def _write_file(out: str, data: bytes, force: bool) -> None:
    """Write ``data`` to ``out`` through a temporary file in its directory, renamed (or, without
    ``force``, linked) into place: ``out`` is never half-written and never replaced unasked.

    :raises HookdError: ``HOST_IO`` (directory missing, file exists, write error)."""
    out = _check_out(out, force)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)   # EEXIST if it appeared meanwhile: never replaced unasked
    except FileExistsError:
        raise HookdError(errors.HOST_IO, f"FILE {out} exists: use --force to replace it") \
            from None
    except OSError as exc:
        raise HookdError(errors.HOST_IO, f"writing {out}: {oserror_text(exc)}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def dump(host: Host, address: str, out: str, force: bool = False) -> dict:
    """Dump the expansion ROM of function ``address`` to file ``out`` (only the images: the
    sum of their lengths, not the rest of the BAR). Changes nothing on the host but ``out``
    (the ``rom`` attribute is left disabled, as found). Needs no daemon.

    Returns ``{"address", "file", "size" (bytes), "bar_size" (bytes), "vendor", "device"
    (4 hex digits), "images": [RomImage.to_dict()], "warnings": [str], "duration_ms"}``.

    :raises HookdError: ``DEVICE_NOT_FOUND`` (not a PCI address, or not on the host);
        ``ROM_UNRELIABLE`` (:func:`_unreliable_reason`; nothing is touched); ``ROM_INVALID``
        (which check, at which offset); ``HOST_IO`` (the output file, the attribute).
    """
    t0 = time.monotonic()
    addr = pci.normalize_address(address)
    if addr is None:
        raise HookdError(errors.DEVICE_NOT_FOUND, f"ADDR {address!r} is not a PCI address "
                         f"(domain:bus:slot.function, e.g. 0000:01:00.0)")
    if not host.exists(pci.path(addr)):
        raise HookdError(errors.DEVICE_NOT_FOUND, f"ADDR {addr}: no such PCI function on "
                         f"this host ({pci.path(addr)})")
    _check_out(out, force)   # before the ROM is touched; again when written
    why = _unreliable_reason(host, addr)
    if why:
        raise HookdError(errors.ROM_UNRELIABLE, why)
    ids = []
    for attr in ("vendor", "device"):
        try:
            ids.append(int(host.read(pci.path(addr, attr)), 16))
        except (OSError, ValueError) as exc:
            raise HookdError(errors.HOST_IO, f"{pci.path(addr, attr)}: {exc}") from None
    data, bar = read_rom(host, addr)
    try:
        images, warnings = validate(data, *ids)
    except RomInvalid as exc:
        raise HookdError(errors.ROM_INVALID, f"{addr}: {exc.check} check failed at offset "
                         f"{exc.offset:#x}: {exc.message}",
                         {"check": exc.check, "offset": exc.offset}) from None
    size = sum(im.length for im in images)
    _write_file(out, data[:size], force)
    return {"address": addr, "file": os.path.abspath(out), "size": size, "bar_size": bar,
            "vendor": f"{ids[0]:04x}", "device": f"{ids[1]:04x}",
            "images": [im.to_dict() for im in images], "warnings": warnings,
            "duration_ms": round((time.monotonic() - t0) * 1000, 1)}


def summary_line(result: dict) -> str:
    """One line for :func:`dump`'s result: what was written."""
    n = len(result["images"])
    kinds = ", ".join(im["kind"] for im in result["images"])
    return (f"wrote {result['file']}: {result['size']} bytes, {n} image{'s' * (n != 1)} "
            f"({kinds}), {result['vendor']}:{result['device']} from {result['address']}")
