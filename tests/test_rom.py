"""``vfio-hookd rom dump``: the parser of expansion ROMs (PCI Firmware Specification 3.0) and
the dump through the simulated kernel's ``rom`` attribute (``testbed.sim.rom``)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.sim import faults, hosts
from testbed.sim import rom as simrom
from vfio_hookd import cli, errors
from vfio_hookd.rom import RomInvalid, parse_images, validate

pytestmark = pytest.mark.unit

NV, NV_GPU = 0x10DE, 0x2484
AMD, AMD_GPU = 0x1002, 0x73BF
GPU = "0000:01:00.0"


def legacy_efi(vendor=NV, device=NV_GPU) -> bytes:
    """A card's usual ROM: a legacy x86 image, then an EFI x64 image marked last."""
    return (simrom.image(vendor, device, blocks=4, code_type=0, last=False)
            + simrom.image(vendor, device, blocks=6, code_type=3, last=True))


# ---- the parser ---------------------------------------------------------------------------
def test_legacy_and_efi_images_are_walked_by_their_lengths():
    images = parse_images(legacy_efi() + b"\xff" * 3000)
    assert [(i.offset, i.length, i.kind, i.last) for i in images] == [
        (0, 2048, "x86 BIOS", False), (2048, 3072, "EFI x64", True)]
    assert images[0].checksum_ok is True and images[1].checksum_ok is None
    assert images[0].vendor == NV and images[0].device_ids == (NV_GPU,)


@pytest.mark.parametrize("corrupt,check,offset", [
    (lambda b: b"\x00" + b[1:], "signature", 0),
    (lambda b: b[:0x800] + b"\x55\xab" + b[0x802:], "signature", 0x800),
    (lambda b: b[:0x40] + b"PCIX" + b[0x44:], "pcir", 0x40),
    (lambda b: b[:0x18] + b"\xf0\xff" + b[0x1a:], "pcir", 0xfff0),
    (lambda b: b[:0x50] + b"\x00\x00" + b[0x52:], "length", 0x50),
    (lambda b: b[:3000], "truncated", 0x1400),
    (lambda b: b[:0x800], "truncated", 0x800),
])
def test_each_failed_check_is_named_with_its_offset(corrupt, check, offset):
    with pytest.raises(RomInvalid) as e:
        parse_images(corrupt(legacy_efi()))
    assert (e.value.check, e.value.offset) == (check, offset), e.value.message


def test_the_vendor_must_match_a_device_mismatch_is_reported():
    with pytest.raises(RomInvalid) as e:
        validate(legacy_efi(vendor=AMD), NV, NV_GPU)
    assert e.value.check == "vendor" and "1002" in e.value.message
    images, warnings = validate(legacy_efi(device=0x2486), NV, NV_GPU)
    assert len(images) == 2 and len(warnings) == 2 and "2486" in warnings[0]
    # a PCI 3.0 device list naming the function's device: no warning
    listed = simrom.image(NV, 0x2486, device_list=(0x2484, 0x2488))
    assert validate(listed, NV, NV_GPU) == (parse_images(listed), [])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_invalid_or_valid_never_a_crash(data):
    try:
        images = parse_images(data)
    except RomInvalid as exc:
        assert exc.check in ("signature", "pcir", "length", "truncated")
        return
    assert images[-1].last and sum(i.length for i in images) <= len(data)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5119), st.integers(0, 255)), max_size=6))
def test_a_valid_rom_with_random_bytes_changed_is_invalid_or_valid(changes):
    b = bytearray(legacy_efi())
    for at, value in changes:
        b[at] = value
    try:
        images, _ = validate(bytes(b), NV, NV_GPU)
    except RomInvalid as exc:
        assert exc.check in ("signature", "pcir", "length", "truncated", "vendor")
        return
    assert sum(i.length for i in images) <= len(b)


# ---- the dump on the simulated host ----------------------------------------------------------
def run(w, capsys, out, *extra) -> tuple[int, str, str]:
    rc = cli.main(["rom", "dump", GPU, str(out), *extra], host=w.host)
    o, e = capsys.readouterr()
    return rc, o, e


def test_dump_on_vfio_pci_writes_exactly_the_images(twogpu_vfio_world, tmp_path, capsys):
    w = twogpu_vfio_world
    rom = legacy_efi(AMD, AMD_GPU)
    simrom.install(w.root, GPU, rom + b"\x00" * 1000, bar_size=65536)
    before = hosts.snapshot(w.root)
    out = tmp_path / "out" / "gpu.rom"
    out.parent.mkdir()
    rc, o, e = run(w, capsys, out, "--json")
    assert rc == 0, e
    res = json.loads(o)
    assert out.read_bytes() == rom and res["size"] == len(rom) == 5120
    assert res["bar_size"] == 65536 and (res["vendor"], res["device"]) == ("1002", "73bf")
    assert [i["kind"] for i in res["images"]] == ["x86 BIOS", "EFI x64"]
    assert res["warnings"] == [] and oct(out.stat().st_mode & 0o777) == "0o644"
    assert not simrom.enabled(w.root, GPU)
    assert hosts.snapshot(w.root) == before
    assert os.listdir(out.parent) == ["gpu.rom"]     # no temporary file left
    rc, o, e = run(w, capsys, out)
    assert rc == errors.EXIT_STATUS["HOST_IO"] and "exists: use --force" in e
    rc, o, e = run(w, capsys, out, "--force")
    assert rc == 0 and o.startswith(f"wrote {out}: 5120 bytes, 2 images (x86 BIOS, EFI x64), "
                                    f"1002:73bf from {GPU}")


def test_a_driver_on_the_card_or_a_shadow_copy_is_refused_untouched(world, tmp_path, capsys):
    """nvidia drives the GPU: ROM_UNRELIABLE, nothing touched; after a prepare (vfio-pci) the
    dump works; the boot VGA's shadow copy is refused whatever the driver."""
    w = world
    simrom.install(w.root, GPU, legacy_efi())
    out = tmp_path / "gpu.rom"
    before = hosts.snapshot(w.root)
    rc, o, e = run(w, capsys, out)
    assert rc == 37 and e.startswith("ROM_UNRELIABLE: 0000:01:00.0 is driven by nvidia")
    assert "vfio-hookd prepare" in e and not out.exists()
    assert hosts.snapshot(w.root) == before and not simrom.enabled(w.root, GPU)
    w.profile()
    w.machine.prepare("win11")
    rc, o, e = run(w, capsys, out)
    assert rc == 0, e
    assert out.read_bytes() == legacy_efi() and not simrom.enabled(w.root, GPU)
    simrom.install(w.root, GPU, legacy_efi(), shadow=True)
    rc, o, e = run(w, capsys, tmp_path / "shadow.rom")
    assert rc == 37 and "shadow copy in RAM at 0xc0000" in e
    assert not (tmp_path / "shadow.rom").exists() and not simrom.enabled(w.root, GPU)


def test_a_vm_using_the_group_is_refused(twogpu_vfio_world, tmp_path, capsys):
    import subprocess
    w = twogpu_vfio_world
    simrom.install(w.root, GPU, legacy_efi(AMD, AMD_GPU))
    node = w.host.path("/dev/vfio/1")
    qemu = subprocess.Popen(["/bin/sh", "-c", f"read x; exec 3<{node}; echo ok; read x"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        qemu.stdin.write("\n")
        qemu.stdin.flush()
        assert qemu.stdout.readline() == "ok\n"
        rc, o, e = run(w, capsys, tmp_path / "gpu.rom")
        assert rc == 37 and "in use by a VM" in e and str(qemu.pid) in e
    finally:
        qemu.kill()
        qemu.wait()


@pytest.mark.parametrize("rom,check", [
    (b"\x00" * 2048, None),                                          # EIO from the kernel
    (legacy_efi(AMD, AMD_GPU)[:0x40] + b"PCIX" + legacy_efi()[0x44:], None),  # EIO too
    (legacy_efi(NV, NV_GPU), "vendor"),
    (simrom.image(AMD, AMD_GPU, blocks=4, last=False) + b"\xff" * 1000, "truncated"),
    (simrom.image(AMD, AMD_GPU, blocks=40), "truncated"),            # longer than the BAR
])
def test_an_invalid_rom_is_refused_and_left_disabled(twogpu_vfio_world, tmp_path, capsys,
                                                     rom, check):
    w = twogpu_vfio_world
    simrom.install(w.root, GPU, rom, bar_size=16384)
    before = hosts.snapshot(w.root)
    out = tmp_path / "out"
    out.mkdir()
    rc, o, e = run(w, capsys, out / "gpu.rom")
    assert rc == 36 and e.startswith("ROM_INVALID: "), e
    if check:
        assert f"{check} check failed at offset 0x" in e
    else:
        assert "the kernel found no valid ROM image" in e and "(EIO)" in e
    assert os.listdir(out) == []
    assert not simrom.enabled(w.root, GPU) and hosts.snapshot(w.root) == before


def test_a_failed_read_or_enable_leaves_the_rom_disabled(twogpu_vfio_world, tmp_path, capsys):
    w = twogpu_vfio_world
    simrom.install(w.root, GPU, legacy_efi(AMD, AMD_GPU))
    rom_attr = f"/sys/bus/pci/devices/{GPU}/rom"
    faults.inject(w.root, "write", rom_attr, errno=5, count=1)   # enabling fails
    rc, o, e = run(w, capsys, tmp_path / "a.rom")
    assert rc == errors.EXIT_STATUS["HOST_IO"] and "enabling the ROM" in e
    assert not simrom.enabled(w.root, GPU)
    orig = w.host.read_bytes

    def failing(p, limit):
        raise OSError(22, "Invalid argument")
    w.host.read_bytes = failing
    rc, o, e = run(w, capsys, tmp_path / "b.rom")
    w.host.read_bytes = orig
    assert rc == errors.EXIT_STATUS["HOST_IO"] and "(EINVAL)" in e
    assert not simrom.enabled(w.root, GPU) and not (tmp_path / "b.rom").exists()


@pytest.mark.parametrize("addr,what", [("01:00.0", "is not a PCI address"),
                                       ("0000:01:00.9", "is not a PCI address"),
                                       ("0000:09:00.0", "no such PCI function")])
def test_a_bad_address_is_named(world, tmp_path, capsys, addr, what):
    rc = cli.main(["rom", "dump", addr, str(tmp_path / "x.rom")], host=world.host)
    e = capsys.readouterr().err
    assert rc == errors.EXIT_STATUS["DEVICE_NOT_FOUND"] and what in e and "ADDR" in e


def test_a_function_without_rom_and_a_missing_directory(twogpu_vfio_world, tmp_path, capsys):
    w = twogpu_vfio_world
    rc, o, e = run(w, capsys, tmp_path / "gpu.rom")
    assert rc == 36 and "has no expansion ROM" in e
    rc, o, e = run(w, capsys, tmp_path / "nodir" / "gpu.rom")
    assert rc == errors.EXIT_STATUS["HOST_IO"] and "does not exist" in e


def test_the_sim_rom_attribute_follows_the_kernel(twogpu_vfio_world):
    """Reads fail EINVAL until enabled; "0\\n" disables, a bare "0" enables (pci_write_rom)."""
    w = twogpu_vfio_world
    simrom.install(w.root, GPU, legacy_efi(AMD, AMD_GPU))
    p = f"/sys/bus/pci/devices/{GPU}/rom"
    assert w.host.stat(p).st_size == 8192
    with pytest.raises(OSError) as e:
        w.host.read_bytes(p, 1 << 20)
    assert e.value.errno == 22
    w.host.write(p, "0", 1)
    assert simrom.enabled(w.root, GPU)
    assert w.host.read_bytes(p, 1 << 20) == legacy_efi(AMD, AMD_GPU)
    w.host.write(p, "0\n", 1)
    assert not simrom.enabled(w.root, GPU)


def test_a_failed_disable_is_reported_and_nothing_written(twogpu_vfio_world, tmp_path, capsys):
    w = twogpu_vfio_world
    simrom.install(w.root, GPU, legacy_efi(AMD, AMD_GPU))
    real_write = w.host.write

    def write(p, data, timeout_s):
        if p.endswith("/rom") and data == "0\n":
            raise OSError(5, "Input/output error")
        return real_write(p, data, timeout_s)
    w.host.write = write
    rc, o, e = run(w, capsys, tmp_path / "gpu.rom")
    assert rc == errors.EXIT_STATUS["HOST_IO"] and "(it stays enabled)" in e
    assert not (tmp_path / "gpu.rom").exists()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=3000),
                      st.lists(st.tuples(st.integers(0, 5119), st.integers(0, 255)),
                               max_size=4).map(lambda ch: _changed(legacy_efi(AMD, AMD_GPU), ch))))
def test_any_rom_behind_the_attribute_dumps_or_is_rom_invalid(twogpu_vfio_world, tmp_path,
                                                              capsys, data):
    """Whatever the ROM BAR holds, the dump through the kernel's attribute ends in a valid
    file or ROM_INVALID (never INTERNAL or a traceback), and the attribute is left disabled."""
    w = twogpu_vfio_world
    simrom.install(w.root, GPU, data, bar_size=8192)
    out = tmp_path / "gpu.rom"
    rc, o, e = run(w, capsys, out, "--force")
    assert rc in (0, 36), e
    assert (rc == 0) == out.exists() and not simrom.enabled(w.root, GPU)
    if rc == 0:
        assert out.read_bytes() == data[:out.stat().st_size]
        out.unlink()


def _changed(rom: bytes, changes) -> bytes:
    b = bytearray(rom)
    for at, value in changes:
        b[at] = value
    return bytes(b)
