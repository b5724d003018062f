"""vfio-hookd on a real Linux desktop (issue 8): QEMU guests (TCG, 2 vCPUs) booting real systemd
252 as PID 1 on this machine's root (9p, read-only, under a tmpfs overlay), with logind, udev,
LightDM + Xorg, greetd + weston, PipeWire + WirePlumber in alice's user instance, alice's ssh
session to the guest's sshd, and vfio-hookd installed with ``vfio-hookd install`` and
``systemctl enable --now`` (``tests/kernel/desktop_runner.py``, ``desktop_root.sh``).

Each test is one variant of one desktop boot (``kernel_plan.DESKTOP_BOOTS``); its checks run in
the guest and come back as ``results/<variant>.json``. ``test_desktop_setup`` checks each
boot's setup (systemd up, the second session, the install, the unit's exposure score). The
packages come from ``scripts/desktop-packages`` (run by ``scripts/test``): a missing package
fails the setup, it never skips.
"""

from __future__ import annotations

import json

import pytest

import desktop_runner
import kernel_harness as kh
from kernel_plan import DESKTOP_BOOTS

pytestmark = pytest.mark.kernel

CASES = [(boot, v) for boot, spec in DESKTOP_BOOTS.items() for v in spec.scenarios]


def _where(b: kh.Boot, name: str) -> str:
    return (f"artefacts: {b.outdir} (console.log, journal.txt, runner.log, ssh.log, "
            f"results/{name}.json)")


@pytest.mark.parametrize("boot", list(DESKTOP_BOOTS))
def test_desktop_setup(kernel_boots, boot):
    """The guest booted systemd, alice's ssh session is a remote user session without seat,
    vfio-hookd was installed and its units enabled and started, and the exposure score of
    ``systemd-analyze security vfio-hookd.service`` was read."""
    b = kernel_boots.get(boot)
    res = b.results.get("setup")
    assert res is not None, f"{b.verdict()}; no setup result. {_where(b, 'setup')}\n{b.tail()}"
    assert res.get("ok"), f"the desktop guest's setup failed: {res.get('error')}. " \
                          f"{_where(b, 'setup')}"
    assert res.get("exposure"), f"no exposure score: {json.dumps(res)}"


@pytest.mark.parametrize("boot,variant", CASES, ids=[f"{b}-{v}" for b, v in CASES])
def test_desktop_variant(kernel_boots, boot, variant):
    """One variant (``desktop_runner.VARIANTS``): prepare with a profile naming only the
    devices succeeds on the real desktop (both functions on vfio-pci, no process holds a node
    of them, alice's non-seat session alive), release gives the desktop back and the guest
    equals its state before (kernel's own changes and greetd's greeter policy excepted); the
    ``-fault`` variants: a prepare failing at its last step rolls back to the same state."""
    assert variant in desktop_runner.VARIANTS
    b = kernel_boots.get(boot)
    res = b.results.get(variant)
    assert res is not None, (f"{b.verdict()}; no result for {variant}. {_where(b, variant)}\n"
                             f"console tail:\n{b.tail()}")
    assert res.get("ok"), f"{variant} failed in the desktop guest: {res.get('error')}\n" \
                          f"{b.verdict()}. {_where(b, variant)}"
    assert b.rc in (kh.EXIT_PASS, kh.EXIT_FAIL), f"{b.verdict()} although {variant} passed."


def test_desktop_x11_holds_a_sleep_inhibitor(kernel_boots):
    """The ``x11`` variant's profile asks ``inhibit: sleep`` (``desktop_runner.PROFILE_EXTRA``):
    the guest's real logind (systemd 252) listed vfio-hookd's ``block`` lock on ``sleep`` held
    by the daemon while prepared, again held by the new daemon after ``systemctl restart
    vfio-hookd.service``, and no more after the release."""
    assert desktop_runner.PROFILE_EXTRA["x11"] == "inhibit: sleep\n"
    b = kernel_boots.get("desktop-x11")
    res = b.results.get("x11")
    assert res is not None, f"{b.verdict()}; no result for x11. {_where(b, 'x11')}"
    inh = res.get("inhibitor") or {}
    pid, new = inh["prepared"]["daemon_pid"], inh["restarted"]["daemon_pid"]
    assert [(i[0], i[1], i[3], i[5]) for i in inh["prepared"]["locks"]] == \
        [("sleep", "vfio-hookd", "block", pid)], inh
    assert new != pid and [(i[0], i[3], i[5]) for i in inh["restarted"]["locks"]] == \
        [("sleep", "block", new)], inh
    assert not [i for i in inh["after_release"] if i[1] == "vfio-hookd"], inh
    assert res["prepare_steps"]["inhibit"]["status"] == "done", res["prepare_steps"]
    assert res["release_steps"]["inhibit"]["status"] == "undone", res["release_steps"]


def test_desktop_plan():
    """Every desktop boot's entries are variants the guest's runner knows, each once."""
    for boot, spec in DESKTOP_BOOTS.items():
        assert spec.desktop, boot
        assert len(set(spec.scenarios)) == len(spec.scenarios), boot
        for v in spec.scenarios:
            assert v in desktop_runner.VARIANTS, f"{boot}: unknown variant {v}"
