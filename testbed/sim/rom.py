"""The simulated kernel's ``rom`` attribute of a PCI function (issue 11), and expansion ROM
images to put behind it.

Behaviour modelled, with its source (``drivers/pci/pci-sysfs.c`` ``pci_write_rom`` /
``pci_read_rom``, ``drivers/pci/rom.c`` ``pci_map_rom`` / ``pci_get_rom_size``):

- The attribute exists only for a function given a ROM (:func:`install`); its size is the ROM
  BAR's (``st_size`` of the file in the tree, mode 0600).
- A write enables reading, except a 2-byte write starting with ``0`` at offset 0, which
  disables it: ``"0\\n"`` disables, ``"0"`` enables.
- A read while disabled fails ``EINVAL``. Enabled, the kernel walks the images (0x55AA, the
  "PCIR" its pointer at 0x18 names, the image length, the last-image bit) and hands out the
  bytes up to the end of the last valid one, never past the BAR; nothing valid at offset 0
  (size 0) fails ``EIO``.
- ``shadow=True`` models the x86 boot VGA device whose ROM resource is the BIOS's shadow copy
  at 0xC0000 (``arch/x86/pci/fixup.c`` ``pci_fixup_video``): line 7 of the function's
  ``resource`` file carries ``IORESOURCE_ROM_SHADOW`` (0x2).

State: ``<root>/.sim/rom/ADDR.bin`` (the BAR's bytes) and ``<root>/.sim/rom/state.json``
(``{ADDR: {"enabled": bool}}``); ``.sim/`` is outside the host's tree, so a snapshot of the
tree does not show the enable flag: :func:`enabled` does.
"""

from __future__ import annotations

import errno
import json
import os

from . import kernel as K

_DIR = (".sim", "rom")


def _state_file(root: str) -> str:
    return os.path.join(root, *_DIR, "state.json")


def _load(root: str) -> dict:
    try:
        with open(_state_file(root)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _save(root: str, state: dict) -> None:
    os.makedirs(os.path.join(root, *_DIR), exist_ok=True)
    tmp = _state_file(root) + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(state))
    os.replace(tmp, _state_file(root))


def image(vendor: int, device: int, blocks: int = 2, code_type: int = 0, last: bool = True,
          efi_machine: int | None = None, pcir_at: int = 0x40, device_list: tuple = (),
          revision: int = 3, fill: int = 0) -> bytes:
    """One expansion ROM image of ``blocks`` 512-byte blocks: 0x55AA, the PCIR at ``pcir_at``
    (vendor, device, ``device_list`` for revision 3, class 0x030000, the length, code type,
    last-image bit); an EFI image (code type 3) gets the 0x0EF1 signature and
    ``efi_machine`` (default x64). An x86 image's checksum byte (the last) makes it sum to 0."""
    b = bytearray([fill & 0xFF] * (blocks * 512))
    b[0:2] = b"\x55\xaa"
    b[2] = blocks & 0xFF
    b[0x18:0x1A] = pcir_at.to_bytes(2, "little")
    if code_type == 3:
        b[4:8] = (0x0EF1).to_bytes(4, "little")
        b[0x0A:0x0C] = (efi_machine if efi_machine is not None else 0x8664).to_bytes(2, "little")
    p = pcir_at
    b[p:p + 4] = b"PCIR"
    b[p + 4:p + 6] = vendor.to_bytes(2, "little")
    b[p + 6:p + 8] = device.to_bytes(2, "little")
    if device_list:
        b[p + 8:p + 10] = (0x20).to_bytes(2, "little")
        for i, d in enumerate((*device_list, 0)):
            b[p + 0x20 + 2 * i:p + 0x22 + 2 * i] = d.to_bytes(2, "little")
    b[p + 0x0A:p + 0x0C] = (0x18).to_bytes(2, "little")
    b[p + 0x0C] = revision
    b[p + 0x0D:p + 0x10] = (0x030000).to_bytes(3, "little")
    b[p + 0x10:p + 0x12] = blocks.to_bytes(2, "little")
    b[p + 0x14] = code_type
    b[p + 0x15] = 0x80 if last else 0
    if code_type == 0:
        b[-1] = (-sum(b[:-1])) & 0xFF
    return bytes(b)


def install(root: str, addr: str, rom: bytes, bar_size: int | None = None,
            shadow: bool = False) -> None:
    """Give function ``addr`` of simulated host ``root`` a ROM BAR of ``bar_size`` bytes (default:
    the next power of two >= ``len(rom)``, at least 2 KiB) holding ``rom`` (the rest 0xFF, as
    an unprogrammed flash reads): its ``rom`` attribute (disabled) and its ``resource`` file
    (line 7 the ROM resource; ``shadow``: the boot VGA's shadow copy at 0xC0000, 128 KiB)."""
    if bar_size is None:
        bar_size = 2048
        while bar_size < len(rom):
            bar_size *= 2
    if shadow:
        bar_size = 0x20000
    data = rom[:bar_size] + b"\xff" * max(0, bar_size - len(rom))
    os.makedirs(os.path.join(root, *_DIR), exist_ok=True)
    with open(os.path.join(root, *_DIR, f"{addr}.bin"), "wb") as f:
        f.write(data)
    d = K.real(root, f"/sys/bus/pci/devices/{addr}")
    with open(os.path.join(d, "rom"), "wb") as f:
        f.truncate(bar_size)   # sparse: the size is the BAR's, as sysfs shows it
    os.chmod(os.path.join(d, "rom"), 0o600)
    lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 13
    start, flags = (0xC0000, 0x212) if shadow else (0xFE000000, 0x46200)
    lines[6] = f"0x{start:016x} 0x{start + bar_size - 1:016x} 0x{flags:016x}"
    with open(os.path.join(d, "resource"), "w") as f:
        f.write("\n".join(lines) + "\n")
    state = _load(root)
    state[addr] = {"enabled": False}
    _save(root, state)


def enabled(root: str, addr: str) -> bool:
    """True while ``addr``'s ``rom`` attribute is enabled (a write other than ``"0\\n"``)."""
    return bool(_load(root).get(addr, {}).get("enabled"))


def write(root: str, addr: str, data: str) -> None:
    """A write of ``data`` to ``addr``'s ``rom`` (``pci_write_rom``)."""
    state = _load(root)
    if addr not in state:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    state[addr]["enabled"] = not (data[:1] == "0" and len(data.encode()) == 2)
    _save(root, state)


def valid_size(rom: bytes) -> int:
    """``pci_get_rom_size``: bytes up to the end of the last valid image (0: none at 0)."""
    at = 0
    while True:
        if rom[at:at + 2] != b"\x55\xaa":
            break
        pds = at + int.from_bytes(rom[at + 0x18:at + 0x1A], "little")
        if rom[pds:pds + 4] != b"PCIR":
            break
        last = rom[pds + 21] & 0x80 if pds + 21 < len(rom) else 0x80
        length = int.from_bytes(rom[pds + 16:pds + 18], "little")
        at += length * 512
        if at >= len(rom) or last or not length or rom[at:at + 2] != b"\x55\xaa":
            break
    return min(at, len(rom))


def read(root: str, addr: str, limit: int) -> bytes:
    """A read of ``addr``'s ``rom`` from offset 0, at most ``limit`` bytes (``pci_read_rom``).

    :raises OSError: ``EINVAL`` while disabled, ``EIO`` when no valid image is at offset 0.
    """
    if not enabled(root, addr):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    with open(os.path.join(root, *_DIR, f"{addr}.bin"), "rb") as f:
        rom = f.read()
    size = valid_size(rom)
    if size == 0:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return rom[:min(size, limit)]
