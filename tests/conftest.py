"""Shared fixtures: every test gets a fresh simulated host, config and run directory.

Nothing here touches the machine's real /sys, /dev or /etc: the host is a directory under
``tmp_path``, systemd is the simulated one on a private D-Bus bus, and the environment variables
``VFIO_HOOKD_CONFIG``/``VFIO_HOOKD_RUN``/``VFIO_HOOKD_HOST_ROOT`` point into ``tmp_path``.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Config, run and host directories under tmp_path, exported through the environment."""
    d = {"config": tmp_path / "etc", "run": tmp_path / "run", "host": tmp_path / "host"}
    for p in d.values():
        p.mkdir()
    (d["config"] / "vms").mkdir()
    monkeypatch.setenv("VFIO_HOOKD_CONFIG", str(d["config"]))
    monkeypatch.setenv("VFIO_HOOKD_RUN", str(d["run"]))
    monkeypatch.setenv("VFIO_HOOKD_LOG", "stderr")
    return d


@pytest.fixture
def paths(dirs):
    """The :class:`vfio_hookd.paths.Paths` of ``dirs``."""
    from vfio_hookd.paths import Paths
    return Paths(config_dir=str(dirs["config"]), run_dir=str(dirs["run"]))


def write_profile(dirs, vm: str, text: str) -> str:
    """Write ``<config>/vms/<vm>.yaml`` with ``text`` (dedented); return its path."""
    path = dirs["config"] / "vms" / f"{vm}.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


class SimWorld:
    """A simulated host + its systemd + a Machine acting on them."""

    def __init__(self, dirs, variant: str = "nvidia"):
        from vfio_hookd import sim
        from vfio_hookd.machine import Machine
        from vfio_hookd.paths import Paths
        from vfio_hookd.sim.bus import SimBus
        from vfio_hookd.sim.kernel import SimHost
        from vfio_hookd.systemd import Systemd
        self.dirs = dirs
        self.root = str(dirs["host"])
        self.variant = variant
        self.devices = sim.DEVICES[variant]
        sim.make_host(self.root, variant)
        self.bus = SimBus(self.root)
        self.host = SimHost(self.root)
        self.paths = Paths(config_dir=str(dirs["config"]), run_dir=str(dirs["run"]))
        self.systemd = Systemd(self.bus.address)
        # a short holders' grace period: DEVICE_BUSY tests need not wait the product's 2 s
        self.machine = Machine(self.host, self.paths,
                               systemd_factory=lambda: Systemd(self.bus.address),
                               holders_grace_s=0.3)

    def snapshot(self) -> dict:
        """The whole fake kernel tree and the fake systemd's unit states."""
        from vfio_hookd.sim import hosts
        return {"tree": hosts.snapshot(self.root), "units": self.systemd.list_units()}

    def profile(self, vm: str = "win11", extra: str = "") -> str:
        """Write a profile for the GPU's functions; on the NVIDIA host nvidia-persistenced
        (which holds /dev/nvidia0) is stopped too, unless ``extra`` sets stop_units."""
        devs = ", ".join(f'"{a}"' for a in self.devices)
        text = f"devices: [{devs}]\n"
        if self.variant == "nvidia" and "stop_units" not in extra:
            text += "stop_units: [nvidia-persistenced.service]\n"
        return write_profile(self.dirs, vm, text + textwrap.dedent(extra))

    def close(self) -> None:
        self.systemd.close()
        self.bus.stop()


@pytest.fixture
def world(dirs):
    w = SimWorld(dirs)
    yield w
    w.close()


@pytest.fixture
def amd_world(dirs):
    w = SimWorld(dirs, "amd")
    yield w
    w.close()


def diff(before: dict, after: dict) -> dict:
    """Keys whose values differ between two flat dicts, with (before, after)."""
    return {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
            if before.get(k) != after.get(k)}


@pytest.fixture
def python():
    """The interpreter running the tests (the repo's venv)."""
    return sys.executable
