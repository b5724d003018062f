"""vfio-hookd on a real Linux kernel: QEMU guests (TCG, q35 + intel-iommu, an emulated GPU and
its HDA function in one IOMMU group) running the daemon against their real sysfs, /dev and
modprobe, with the simulated systemd's display manager holding the real ``/dev/dri/card0``.

Each test is one scenario of one boot (``kernel_plan.BOOTS``); the scenario's checks run inside
the guest (``guest_runner.py``, one docstring per scenario there) and its verdict comes back as
``results/<scenario>.json`` through a 9p share, QEMU's exit status (isa-debug-exit) carrying
the boot's verdict. Needs root and ``scripts/kernel-cache`` (run on first use); a missing
package or kernel is a failure, never a skip.
"""

from __future__ import annotations

import json
import os

import pytest

import kernel_harness as kh
from kernel_plan import BOOTS, Boots

pytestmark = pytest.mark.kernel



@pytest.fixture(scope="session")
def kernel_boots():
    """The session's boots (:class:`kernel_plan.Boots`): all start, two at a time, when the
    first kernel test asks for its boot, so a run without kernel tests costs nothing."""
    b = Boots()
    yield b
    b.close()


CASES = [(boot, sc) for boot, (_g, _f, scenarios) in BOOTS.items() for sc in scenarios]


@pytest.mark.parametrize("boot,scenario", CASES, ids=[f"{b}-{s}" for b, s in CASES])
def test_scenario(kernel_boots, boot, scenario):
    b = kernel_boots.get(boot)
    where = (f"artefacts: {b.outdir} (console.log, daemon.log, runner.log, "
             f"results/{scenario}.json)")
    harness_ok = b.rc in (kh.EXIT_PASS, kh.EXIT_FAIL)
    res = b.results.get(scenario)
    assert res is not None, (f"{b.verdict()}; no result for {scenario}. {where}\n"
                             f"console tail:\n{b.tail()}")
    assert res.get("ok"), (f"{scenario} failed in the guest: {res.get('error')}\n"
                           f"{b.verdict()}. {where}")
    assert harness_ok, f"{b.verdict()} although {scenario} passed. {where}\n{b.tail()}"
    if all(r.get("ok") for r in b.results.values()):
        assert b.rc == kh.EXIT_PASS, f"{b.verdict()}: the guest's verdict disagrees. {where}"
