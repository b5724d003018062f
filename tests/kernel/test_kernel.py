"""vfio-hookd on a real Linux kernel: QEMU guests (TCG, q35 + intel-iommu, an emulated GPU and
its HDA function in one IOMMU group; some boots add the GPU's USB-C controller and the guest's
own USB, or a second GPU the desktop runs on, or boot with ``nomodeset``) running the daemon
against their real sysfs, /dev and modprobe, with the simulated systemd's display manager
holding the real ``/dev/dri/card0``.

Each test is one scenario of one boot (``kernel_plan.BOOTS``); the scenario's checks run inside
the guest (``guest_runner.py``, one docstring per scenario there) and its verdict comes back as
``results/<scenario>.json`` through a 9p share, QEMU's exit status (isa-debug-exit) carrying
the boot's verdict. Every scenario starts from the state it declares, which the guest's runner
establishes; ``test_cascade`` checks that with a failure injected into an early scenario.
Needs root and ``scripts/kernel-cache`` (run on first use); a missing package or kernel is a
failure, never a skip.
"""

from __future__ import annotations

import json
import os

import pytest

import guest_runner
import kernel_harness as kh
from kernel_plan import BOOTS, injected

#: Every test here is a kernel test (``-m kernel`` / ``-m "not kernel"``).
pytestmark = pytest.mark.kernel


CASES = [(boot, sc) for boot, spec in BOOTS.items() for sc in spec.scenarios
         if not injected(sc)]
INJECTED = [(boot, e) for boot, spec in BOOTS.items() for e in spec.scenarios
            if injected(e)]


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
    # the runner re-establishes a scenario's state only after a failed (or injected) one: a
    # scenario that passes must leave the guest as the next one in the plan needs it
    pre = res.get("precondition") or {}
    prev = pre.get("after")
    if prev and (pre.get("restored") or pre.get("prepared_by_runner")):
        assert not prev["ok"] or prev["injected"], (
            f"the runner had to re-establish {pre['needs']} for {scenario} although "
            f"{prev['entry']} passed before it: {json.dumps(pre.get('was') or pre.get('actions'))}"
            f". {where}")


@pytest.mark.parametrize("boot,entry", INJECTED, ids=[f"{b}-{e}" for b, e in INJECTED])
def test_cascade(kernel_boots, boot, entry):
    """A scenario that fails half-way (a failure injected on purpose, ``kernel_plan.BOOTS``)
    does not take the boot's later scenarios with it: it failed where injected, the runner
    re-established the next scenario's state and said so, and every later scenario passed."""
    b = kernel_boots.get(boot)
    where = f"artefacts: {b.outdir} (runner.log, results/)"
    entries = BOOTS[boot].scenarios
    res = b.results.get(entry)
    assert res is not None, f"{b.verdict()}; no result for {entry}. {where}\n{b.tail()}"
    assert res.get("ok") and res.get("scenario_error", "").startswith(guest_runner.INJECTED), (
        f"{entry} did not fail as injected: {res.get('error')}. {where}")
    later = entries[entries.index(entry) + 1:]
    nxt = b.results.get(later[0]) or {}
    pre = nxt.get("precondition") or {}
    if entry.endswith(".fail-late"):      # left prepared, before a scenario needing the baseline
        assert pre.get("needs") == "baseline" and pre.get("restored") \
            and (pre.get("was") or {}).get("record", {}).get("after") == "prepared", (
                f"{later[0]} after {entry}: no restore of the baseline reported: {pre}. {where}")
    else:                                  # left unprepared, before one needing it prepared
        assert pre.get("needs") == "prepared" and pre.get("prepared_by_runner"), (
            f"{later[0]} after {entry}: the runner did not report preparing: {pre}. {where}")
    failed = {e: (b.results.get(e) or {}).get("error", "no result") for e in later
              if not (b.results.get(e) or {}).get("ok")}
    assert not failed, f"scenarios after {entry} failed: {json.dumps(failed)}. {where}"
    assert b.rc == kh.EXIT_PASS, f"{b.verdict()}. {where}"


def test_plan():
    """Every entry of the plan names a scenario of the guest's runner (imported here: it does
    nothing at import), and an entry that injects a failure has scenarios after it."""
    for boot, spec in BOOTS.items():
        entries = spec.scenarios
        assert len(set(entries)) == len(entries), f"{boot}: an entry twice: {entries}"
        for i, e in enumerate(entries):
            guest_runner.parse_entry(e)
            assert not injected(e) or i + 1 < len(entries), f"{boot}: nothing after {e}"
