"""The first-run verbs in their own process, with the product's D-Bus client talking to the
simulated systemd on a private bus (``python -m testbed.cli --root ROOT ...``): the units of
the GPU's holders come from ``GetUnitByPID``, the display manager from ``GetUnit``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from testbed.domains import tiny_domain_xml
from testbed.sim import preflight

pytestmark = pytest.mark.dbus


def vfio_hookd(root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", "--root", root, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_init_check_plan_over_dbus(bus_world, tmp_path):
    preflight.set_up(bus_world.root)   # units.json is read already: only the host's files
    xml = tmp_path / "win11.xml"
    xml.write_text(tiny_domain_xml("win11", ["0000:01:00.0"]))
    p = vfio_hookd(bus_world.root, "init", "win11", "--xml", str(xml))
    assert p.returncode == 0, p.stderr
    assert "stop_units: nvidia-persistenced.service (PID" in p.stdout
    assert "display manager: gdm.service" in p.stdout

    xml.write_text(tiny_domain_xml("win11", ["0000:01:00.0", "0000:01:00.1"]))
    p = vfio_hookd(bus_world.root, "check", "win11", "--xml", str(xml), "--json")
    checks = {c["name"]: c for c in json.loads(p.stdout)["checks"]}
    for name in ("vm.profile", "vm.devices", "vm.iommu_group", "vm.hostdevs", "vm.managed",
                 "vm.display_manager", "vm.stop_units", "vm.holders", "hook.loaded"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert "gdm.service" in checks["vm.display_manager"]["message"]
    assert "unit gdm.service" in checks["vm.holders"]["message"]
    # vfio-hookd's units are not in this bus's unit table: the daemon checks fail, by name
    assert checks["daemon.socket"]["status"] == "FAIL" and p.returncode == 31

    before = bus_world.snapshot()
    p = vfio_hookd(bus_world.root, "plan", "win11", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert bus_world.snapshot() == before
    units = next(s for s in doc["steps"] if s["name"] == "units")
    assert units["facts"]["plan"] == ["gdm.service", "nvidia-persistenced.service"]
