"""Records and plans: release works from the record alone; one policy for records that cannot
be read; deadlines come from what the steps declare."""

from __future__ import annotations

import json
import os

import pytest

from conftest import diff, write_profile
from vfio_hookd import errors
from vfio_hookd.errors import HookdError
from vfio_hookd.plan import MARGIN_S, plan_release
from vfio_hookd.profile import Deadlines
from vfio_hookd.record import VERSION, Record, RecordStore
from vfio_hookd.status import status_from_records
from vfio_hookd.steps import BY_NAME, STEPS, Shape

pytestmark = pytest.mark.unit


def _restored(world, before) -> None:
    after = world.snapshot()
    assert after["units"] == before["units"]
    d = diff(before["tree"], after["tree"])
    # only what the kernel does by itself (the firmware framebuffer) and vfio left loaded
    assert all(any(p in k for p in ("efi-framebuffer", "/proc/fb", "vtconsole", "vfio"))
               for k in d), d
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "nvidia"
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.1/driver") == "snd_hda_intel"


@pytest.mark.parametrize("change", ["invalid", "deleted", "stricter"])
def test_release_restores_the_host_whatever_became_of_the_profile(world, change):
    """The profile is read by prepare only: release follows the record, even when the profile
    is now invalid, gone, or would be refused by today's rules."""
    path = world.profile(extra="deadlines: {unit_start: 7}\n")
    before = world.snapshot()
    world.machine.prepare("win11")
    if change == "invalid":
        write_profile(world.dirs, "win11", "devices: [not-an-address]\non_bsy: fail\n")
    elif change == "deleted":
        os.unlink(path)
    else:   # a module list that today's rules refuse (pci_stub is never unloaded)
        write_profile(world.dirs, "win11", "modules: [pci_stub]\n")
    rec = world.machine.release("win11")
    assert rec.phase == "idle"
    assert [s.status for s in rec.steps] == ["undone"] * len(STEPS)
    _restored(world, before)


def test_the_record_carries_the_deadlines_in_force(world):
    world.profile(extra="deadlines: {unit_start: 7, module_load: 12}\n")
    rec = world.machine.prepare("win11")
    assert rec.version == VERSION
    assert rec.deadlines["unit_start"] == 7.0 and rec.deadlines["module_load"] == 12.0
    on_disk = json.loads(open(world.paths.record_path("win11")).read())
    assert on_disk["deadlines"] == rec.deadlines
    # a later profile change does not move the release's deadline
    write_profile(world.dirs, "win11", "deadlines: {unit_start: 3000}\n")
    plan = world.machine.plan_release("win11")
    assert plan.deadlines.unit_start == 7.0
    world.machine.release("win11")


def test_release_deadline_is_what_the_held_steps_declare(world):
    world.profile()
    rec = world.machine.prepare("win11")
    plan = plan_release(rec, "win11")
    d = Deadlines.from_record(rec.deadlines)
    units = len(rec.step("units").facts["done"])
    modules = len(rec.step("modules").facts["done"])
    assert units == 2 and modules >= 1
    expected = (units * d.unit_start + 3 * len(rec.step("vtconsoles").facts["done"]) * d.unbind
                + len(rec.step("framebuffer").facts["done"]) * d.unbind
                + modules * d.module_load + 2 * d.unbind
                + 3 * len(rec.step("bind_vfio").facts["done"]) * d.unbind
                + d.desktop_back)   # the desktop-back check: gdm held card0 before prepare
    assert plan.deadline_s == pytest.approx(expected + MARGIN_S)
    world.machine.release("win11")
    assert plan_release(None, "win11").deadline_s == MARGIN_S


def test_prepare_deadline_sums_each_steps_declared_waits(world):
    world.profile(extra="deadlines: {unit_stop: 11, terminate: 2}\n")
    plan = world.machine.plan_prepare("win11")
    shape = plan.shape
    assert shape == Shape(devices=2, units=2, vtconsoles=len(world.host.listdir(
        "/sys/class/vtconsole")), modules=8)
    total = sum(s.max_apply_s(plan.profile, shape) + s.max_undo_s(plan.deadlines, shape, None)
                for s in STEPS) + plan.deadlines.desktop_back   # the check after a rollback
    assert plan.deadline_s == pytest.approx(total + MARGIN_S)
    # the units step's share follows the profile: two stops of 11 s
    assert BY_NAME["units"].max_apply_s(plan.profile, shape) == 22.0


def _rewrite(world, change) -> None:
    path = world.paths.record_path("win11")
    with open(path) as f:
        data = json.load(f)
    data = change(data)
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def test_a_version_1_record_is_released(world):
    """A VM prepared by vfio-hookd 0.1 (deadlines inside the profile snapshot) is released."""
    world.profile()
    before = world.snapshot()
    world.machine.prepare("win11")

    def to_v1(data):
        data["profile"]["deadlines"] = data.pop("deadlines")
        data["version"] = 1
        for s in data["steps"]:
            s.pop("undo_error", None)
        return data
    _rewrite(world, to_v1)
    assert world.machine.release("win11").phase == "idle"
    _restored(world, before)


@pytest.mark.parametrize("change,needle", [
    (lambda d: dict(d, version=99), "record version 99 is not one this vfio-hookd reads"),
    (lambda d: "{not json", "not a vfio-hookd record"),
    (lambda d: dict(d, vm="other"), "holds the record of 'other'"),
    (lambda d: dict(d, phase="dancing"), "wrong type or value"),
    (lambda d: {k: v for k, v in d.items() if k != "steps"}, "missing or wrong field"),
])
def test_a_record_that_cannot_be_read_is_reported_alike_everywhere(world, change, needle):
    world.profile()
    world.machine.prepare("win11")
    _rewrite(world, change)
    path = world.paths.record_path("win11")
    for call in (lambda: world.machine.release("win11"), lambda: world.machine.prepare("win11"),
                 lambda: world.machine.plan_release("win11")):
        with pytest.raises(HookdError) as exc:
            call()
        assert exc.value.code == errors.RECORD_INVALID
        assert exc.value.message.startswith(path) and needle in exc.value.message
    st = status_from_records(world.host, world.paths)["vms"]["win11"]
    assert st["phase"] == "unknown"
    assert st["error"]["code"] == errors.RECORD_INVALID and needle in st["error"]["message"]
    # nothing was touched: the GPU is still where prepare put it
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "vfio-pci"


def test_record_round_trips_through_json(paths):
    rec = Record.new("win11", ["0000:01:00.0"], {"0000:01:00.0": "nvidia"},
                     Deadlines().to_dict(), ["units", "bind_vfio"], {"0000:01:00.0": []},
                     {"devices": ["0000:01:00.0"]})
    store = RecordStore(paths)
    store.save(rec)
    again = store.load("win11")
    assert again == rec and again.updated is not None
    assert store.names() == ["win11"]
    assert store.load("other") is None


def test_deadlines_from_a_record_never_refuse(paths):
    d = Deadlines.from_record({"unit_stop": 3, "unbind": -1, "terminate": "x", "new_key": 5})
    assert d.unit_stop == 3.0 and d.unbind == Deadlines().unbind
    assert d.terminate == Deadlines().terminate
    assert Deadlines.from_record(None) == Deadlines()
