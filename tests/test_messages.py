"""Messages that say where a problem came from (issue 9, "Clear messages")."""

from __future__ import annotations

import pytest

from conftest import write_profile
from vfio_hookd import errors
from vfio_hookd.errors import HookdError

pytestmark = pytest.mark.unit

XML = ("<domain><devices><hostdev mode='subsystem' type='pci'><source><address domain='0' "
       "bus='0x{bus}' slot='0' function='0'/></source></hostdev></devices></domain>")


def test_a_missing_function_from_the_domain_xml_says_so(world):
    write_profile(world.dirs, "win11", "devices: auto\n")
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11", XML.format(bus="09"))
    assert exc.value.code == errors.DEVICE_NOT_FOUND
    assert exc.value.message.startswith("the domain XML of 'win11' (devices: auto in ")
    assert "0000:09:00.0 in a <hostdev>" in exc.value.message
    # from the profile's own list, the profile's key is named
    write_profile(world.dirs, "win11", "devices: ['0000:09:00.0']\n")
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert "win11.yaml: devices: 0000:09:00.0 is not a PCI function" in exc.value.message


def test_the_hooks_errors_name_no_cli_flag(world):
    """devices: auto with no domain XML in the request (the hook's path): no --xml hint."""
    write_profile(world.dirs, "win11", "devices: auto\n")
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11", "")
    assert exc.value.code == errors.DOMAIN_XML_INVALID and "--" not in exc.value.message


def test_status_of_an_idle_vm_names_the_vm_that_holds_its_devices(world):
    world.profile(vm="linux")
    world.machine.prepare("linux")
    world.machine.release("linux")          # linux: idle record with the same devices
    world.profile(vm="win11")
    world.machine.prepare("win11")
    st = world.machine.status()["vms"]
    assert [d.get("held_by") for d in st["linux"]["devices"]] == ["win11", "win11"]
    assert all("held_by" not in d for d in st["win11"]["devices"])
    world.machine.release("win11")
    st = world.machine.status()["vms"]
    assert all("held_by" not in d for d in st["linux"]["devices"])
