"""A sysfs write that hangs leaves one thread stuck in the kernel: status shows it, and another
request for the same function is refused (DEVICE_STUCK) until the write returns (issue 9)."""

from __future__ import annotations

import time

import pytest

from testbed.sim import faults
from vfio_hookd import errors
from vfio_hookd.errors import HookdError

pytestmark = pytest.mark.unit

OVERRIDE = "/sys/bus/pci/devices/0000:01:00.1/driver_override"


def _wait_unstuck(host, limit_s: float = 10.0) -> None:
    """Wait (polling the host's own list, with a deadline) until no write is stuck."""
    end = time.monotonic() + limit_s
    while host.stuck_writes() and time.monotonic() < end:
        time.sleep(0.02)
    assert host.stuck_writes() == []


def test_a_stuck_write_is_shown_and_blocks_its_function_until_it_returns(world):
    world.profile(extra="deadlines: {unbind: 0.2}\n")
    # the audio function's driver_override write returns only after 1.5 s: past its deadline
    faults.inject(world.root, "write", OVERRIDE, "stall", count=1, seconds=1.5)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.TIMEOUT and OVERRIDE in exc.value.message
    stuck = world.machine.status()["stuck_writes"]
    assert [(w["path"], w["data"]) for w in stuck] == [(OVERRIDE, "vfio-pci")]
    assert stuck[0]["since"].endswith("Z")
    # a second request that would touch the same function is refused at once
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.DEVICE_STUCK
    assert "0000:01:00.1" in exc.value.message and OVERRIDE in exc.value.message
    assert exc.value.details["stuck"][0]["function"] == "0000:01:00.1"
    # (the rollback gave everything back: a release has nothing to touch, a quiet success)
    assert world.machine.release("win11").phase == "failed"
    # once the kernel lets go, the function may be worked on again
    _wait_unstuck(world.host)
    assert world.machine.status()["stuck_writes"] == []
    world.machine.release("win11")


def test_a_stuck_write_of_another_function_does_not_block(world):
    world.profile(vm="audio", extra="")
    faults.inject(world.root, "write", OVERRIDE, "stall", count=1, seconds=1.0)
    world.host.write("/sys/bus/pci/devices/0000:01:00.0/driver_override", "\n", 5)
    with pytest.raises(HookdError):
        world.host.write(OVERRIDE, "vfio-pci", 0.1)
    assert world.machine._refuse_if_stuck(["0000:01:00.0"]) is None
    with pytest.raises(HookdError) as exc:
        world.machine._refuse_if_stuck(["0000:01:00.1"])
    assert exc.value.code == errors.DEVICE_STUCK
    _wait_unstuck(world.host)
    world.host.write(OVERRIDE, "\n", 5)
