"""Shared fixtures: every test gets a fresh simulated host, config and run directory.

Nothing here touches the machine's real /sys, /dev or /etc: the host is a directory under
``tmp_path`` (``testbed.sim``), systemd is a fake (in-process, ``testbed.fake_systemd``, or the
simulated systemd on a private D-Bus bus, ``testbed.sim.bus.SimBus``), and the environment
variables ``VFIO_HOOKD_CONFIG``/``VFIO_HOOKD_RUN`` point into ``tmp_path``.

The repository root goes first on ``sys.path`` and on ``PYTHONPATH`` (for every child process):
the tests import this checkout's ``vfio_hookd`` and ``testbed``, whatever an editable install
in the venv points at.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [REPO]:
    sys.path.insert(0, REPO)

from testbed import child_env  # noqa: E402

os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Config, run and host directories under tmp_path, exported through the environment.

    They are root's (the tests run as root) and writable by root alone whatever the umask:
    profiles and records are read only from such directories (``vfio_hookd.trust``); tmp_path
    is pytest's (0700, root's) under /tmp (1777, root's: sticky).
    """
    d = {"config": tmp_path / "etc", "run": tmp_path / "run", "host": tmp_path / "host"}
    for p in d.values():
        p.mkdir()
    (d["config"] / "vms").mkdir()
    for p in (d["config"], d["config"] / "vms", d["run"]):
        p.chmod(0o755)
    monkeypatch.setenv("VFIO_HOOKD_CONFIG", str(d["config"]))
    monkeypatch.setenv("VFIO_HOOKD_RUN", str(d["run"]))
    monkeypatch.setenv("VFIO_HOOKD_LOG", "stderr")
    # no bus until a test starts the simulated one: nothing reaches this machine's systemd
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
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
    """A simulated host + its systemd + a Machine acting on them.

    :param bus: False (default): systemd is :class:`testbed.fake_systemd.FakeSystemd`, in this
        process (the fast tier: no dbus-daemon); True: the simulated systemd on a private bus
        (:class:`testbed.sim.bus.SimBus`) with the product's D-Bus client, needed wherever
        another process (the daemon, the CLI) talks to systemd; ``address`` is its address.
    :param edit_desktop: for the desktop variants, a function changing the desktop's
        configuration (the dict of ``.sim/desktop.json``, :mod:`testbed.sim.desktop`) before
        logind starts.

    ``logind`` is the logind client: :class:`testbed.fake_logind.FakeLogind` (fast tier) or
    :class:`vfio_hookd.logind.Logind` on the simulated bus.
    """

    def __init__(self, dirs, variant: str = "nvidia", bus: bool = False, edit_desktop=None):
        from testbed import sim
        from testbed.sim.kernel import SimHost
        from vfio_hookd.machine import Machine
        from vfio_hookd.paths import Paths
        self.dirs = dirs
        self.root = str(dirs["host"])
        self.variant = variant
        self.devices = sim.DEVICES[variant]
        sim.make_host(self.root, variant)
        if edit_desktop is not None:   # change .sim/desktop.json before logind starts
            import json
            path = os.path.join(self.root, ".sim", "desktop.json")
            with open(path) as f:
                conf = json.load(f)
            edit_desktop(conf)
            with open(path, "w") as f:
                json.dump(conf, f)
        self.host = SimHost(self.root)
        self.paths = Paths(config_dir=str(dirs["config"]), run_dir=str(dirs["run"]))
        # a short holders' grace period: DEVICE_BUSY tests need not wait the product's 2 s
        grace = 0.3
        self.bus = None
        self.fake = None
        if bus:
            from testbed.sim.bus import SimBus
            from vfio_hookd.systemd import Systemd
            from vfio_hookd.logind import Logind
            self.bus = SimBus(self.root)
            self.address = self.bus.address
            self.systemd = Systemd(self.address)
            self.logind = Logind(self.address, run_user=self.host.path("/run/user"))
            self.machine = Machine(self.host, self.paths, lambda: Systemd(self.address),
                                   holders_grace_s=grace, logind_factory=lambda: Logind(
                                       self.address, run_user=self.host.path("/run/user")))
        else:
            from testbed.fake_logind import FakeLogind
            from testbed.fake_systemd import FakeSystemd
            self.fake = self.systemd = FakeSystemd(self.root)
            self.logind = FakeLogind(self.root)   # a desktop model for desktop-* variants
            self.machine = Machine(self.host, self.paths, lambda: self.fake,
                                   holders_grace_s=grace, logind_factory=lambda: self.logind)

    def snapshot(self) -> dict:
        """The whole fake kernel tree and the fake systemd's unit states."""
        from testbed.sim import hosts
        return {"tree": hosts.snapshot(self.root), "units": self.systemd.list_units()}

    def set_system_state(self, state: str) -> None:
        """systemd's ``SystemState`` (``"stopping"``: the machine shuts down)."""
        if self.fake is not None:
            self.fake.set_system_state(state)
            return
        import subprocess
        subprocess.run(["busctl", f"--address={self.address}", "call",
                        "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                        "org.vfiohookd.Sim", "SetSystemState", "s", state],
                       check=True, capture_output=True, timeout=10)

    def profile(self, vm: str = "win11", extra: str = "") -> str:
        """Write a profile for the GPU's functions; on the NVIDIA hosts (nvidia, turing,
        bios-text) nvidia-persistenced (which holds /dev/nvidia0) is stopped too, unless
        ``extra`` sets stop_units."""
        from testbed import sim
        devs = ", ".join(f'"{a}"' for a in self.devices)
        text = f"devices: [{devs}]\n"
        if ("nvidia-persistenced.service" in sim.UNITS[self.variant]
                and "stop_units" not in extra):
            text += "stop_units: [nvidia-persistenced.service]\n"
        return write_profile(self.dirs, vm, text + textwrap.dedent(extra))

    def close(self) -> None:
        self.systemd.close()
        self.logind.close()
        own = self.machine._logind   # the machine's own client (logind_factory), if it made one
        if own is not None and own is not self.logind:
            own.close()              # its connection and its signal subscription's thread
        if self.bus is not None:
            self.bus.stop()
        if self.fake is not None:
            self.logind.kill_all()
            self.fake.kill_all()


@pytest.fixture
def world(dirs):
    """The simulated NVIDIA host with the in-process fake systemd."""
    w = SimWorld(dirs)
    yield w
    w.close()


@pytest.fixture
def bus_world(dirs, monkeypatch):
    """The simulated NVIDIA host with the simulated systemd on a private D-Bus bus, its
    address in ``DBUS_SYSTEM_BUS_ADDRESS`` (for the daemon and the CLI in child processes)."""
    w = SimWorld(dirs, bus=True)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", w.address)
    yield w
    w.close()


@pytest.fixture
def amd_world(dirs):
    w = SimWorld(dirs, "amd")
    yield w
    w.close()


# The host shapes of testbed.sim.shapes, with the in-process fake systemd.
@pytest.fixture
def turing_world(dirs):
    """An NVIDIA Turing card (VGA, HDMI audio, xHCI, UCSI in one group) beside the host's own
    USB controller and keyboard (held by systemd-logind)."""
    w = SimWorld(dirs, "turing")
    yield w
    w.close()


@pytest.fixture
def twogpu_world(dirs):
    """A desktop on the integrated GPU (0000:00:02.0, i915); the AMD GPU 0000:01:00.x on
    amdgpu, held by nobody."""
    w = SimWorld(dirs, "twogpu")
    yield w
    w.close()


@pytest.fixture
def twogpu_vfio_world(dirs):
    """twogpu booted with vfio-pci.ids=: the AMD GPU on vfio-pci from the start, amdgpu not
    loaded."""
    w = SimWorld(dirs, "twogpu-vfio")
    yield w
    w.close()


@pytest.fixture
def bios_text_world(dirs):
    """The NVIDIA host booted by a BIOS in VGA text mode (nomodeset): vgacon, no framebuffer."""
    w = SimWorld(dirs, "bios-text")
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


#: The test tiers (pyproject.toml markers); every test is in exactly one.
TIERS = ("unit", "dbus", "libvirt", "kernel")


def pytest_collection_modifyitems(config, items):
    """Put the tests of test_systemd.py that name no backend in the dbus tier, then refuse a
    test that is in no tier or in two (so ``--fast``, ``-m unit``, cannot silently miss one)."""
    wrong = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if not tiers and item.module.__name__ == "test_systemd":
            item.add_marker(pytest.mark.dbus)
            tiers = {"dbus"}
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: tiers {sorted(tiers) or 'none'}")
    if wrong:
        raise pytest.UsageError("every test needs exactly one tier marker "
                                f"({', '.join(TIERS)}):\n" + "\n".join(wrong))


@pytest.fixture(scope="session")
def kernel_boots():
    """The kernel tests' boots (``tests/kernel/kernel_plan.Boots``), shared by
    ``tests/kernel/test_kernel.py`` and ``test_desktop_guest.py``: all start, two at a time, when the
    first kernel test asks for its boot, so a run without kernel tests costs nothing. (Here and
    not in a ``tests/kernel/conftest.py``: that module name would shadow this one, which tests
    import ``write_profile`` from.)"""
    from kernel_plan import Boots     # tests/kernel is on sys.path once its tests are collected
    b = Boots()
    yield b
    b.close()
