"""The units step stops the display manager and ``stop_units`` as one batch (prepare) and
starts them as one batch (release, rollback), as ``systemctl stop A B`` does: every job queued
before any is awaited. Proven from the fake systemd's job log (``testbed.sim.units``), never
from wall time: a hung job keeps the first unit's job pending while the other's is queued.

Each test runs with the in-process fake (unit tier) and with the simulated systemd on D-Bus and
the product's client (dbus tier).
"""

from __future__ import annotations

import pytest

from testbed.sim import faults
from testbed.sim.units import read_job_log
from vfio_hookd import errors
from vfio_hookd.errors import HookdError

UNITS = ["gdm.service", "nvidia-persistenced.service"]


@pytest.fixture(params=[pytest.param("world", marks=pytest.mark.unit),
                        pytest.param("bus_world", marks=pytest.mark.dbus)])
def w(request):
    """The simulated NVIDIA host: display manager gdm + nvidia-persistenced in stop_units."""
    return request.getfixturevalue(request.param)


def jobs(w, jtype: str) -> list[tuple[str, str, str | None]]:
    """``(ev, unit, result)`` of every ``jtype`` job event of the fake systemd, oldest first."""
    return [(e["ev"], e["unit"], e["result"]) for e in read_job_log(w.root)
            if e["type"] == jtype]


def test_prepare_queues_every_stop_and_the_rollback_starts_them(w):
    w.profile(extra="deadlines: {unit_stop: 1}\n")   # the other stop must end within 2 s
    before = w.snapshot()
    faults.inject(w.root, "stop", "gdm.service", "hang")
    with pytest.raises(HookdError) as exc:
        w.machine.prepare("win11")
    assert exc.value.code == errors.TIMEOUT
    # the batch's deadline: one unit_stop per unit (systemd may order them one after another)
    assert exc.value.message.startswith("step units: stopping gdm.service: job ")
    assert "did not end within 2 s" in exc.value.message
    stops = jobs(w, "stop")
    # nvidia-persistenced's stop was queued while gdm's was pending, and ended
    assert [(ev, u) for ev, u, _ in stops if ev == "new"] == [("new", u) for u in UNITS]
    assert ("removed", "nvidia-persistenced.service", "done") in stops
    rec = w.machine.records.load("win11")
    assert rec.step("units").facts["done"] == UNITS   # recorded before the jobs were queued
    assert rec.step("units").status == "failed" and not rec.holds_host
    # the rollback started both, together: gdm's start replaced its hung stop
    starts = jobs(w, "start")
    assert [(ev, u) for ev, u, _ in starts if ev == "new"] == [
        ("new", "nvidia-persistenced.service"), ("new", "gdm.service")]   # last to first
    assert ("removed", "gdm.service", "canceled") in stops
    assert {(u, r) for ev, u, r in starts if ev == "removed"} == {(u, "done") for u in UNITS}
    assert w.snapshot() == before


def test_rollback_after_a_failed_stop_starts_only_what_was_stopped(w):
    w.profile()
    before = w.snapshot()
    faults.inject(w.root, "stop", "gdm.service", "fail", count=1)
    with pytest.raises(HookdError) as exc:
        w.machine.prepare("win11")
    assert exc.value.code == errors.UNIT_FAILED
    assert exc.value.message.startswith("step units: stopping gdm.service: job result failed")
    assert exc.value.details["results"] == {"gdm.service": "failed",
                                            "nvidia-persistenced.service": "done"}
    # gdm stayed active (its stop failed): only nvidia-persistenced is started again
    assert jobs(w, "start") == [("new", "nvidia-persistenced.service", None),
                                ("run", "nvidia-persistenced.service", None),
                                ("removed", "nvidia-persistenced.service", "done")]
    assert w.snapshot() == before


def test_release_starts_every_unit_together(w):
    w.profile(extra="deadlines: {unit_start: 1}\n")   # the other start must end within 2 s
    before = w.snapshot()
    w.machine.prepare("win11")
    assert {u: w.systemd.active_state(u) for u in UNITS} == {u: "inactive" for u in UNITS}
    faults.inject(w.root, "start", "gdm.service", "hang")
    with pytest.raises(HookdError) as exc:
        w.machine.release("win11")
    assert exc.value.code == errors.RELEASE_INCOMPLETE
    assert "step units: TIMEOUT: starting gdm.service: job " in exc.value.message
    starts = jobs(w, "start")
    # both start jobs queued (release order: last to first) while gdm's hangs; the other ran
    assert [(ev, u) for ev, u, _ in starts if ev == "new"] == [
        ("new", "nvidia-persistenced.service"), ("new", "gdm.service")]
    assert ("removed", "nvidia-persistenced.service", "done") in starts
    assert w.systemd.active_state("nvidia-persistenced.service") == "active"
    # the hung start stays queued (as in systemd): a stop replaces it, then release finishes
    faults.clear(w.root)
    w.systemd.stop("gdm.service", 5)
    assert w.machine.release("win11").phase == "idle"
    assert w.snapshot()["units"] == before["units"]
