"""vfio_hookd.systemd against the simulated systemd (testbed.sim.systemd on a SimBus), and the
in-process fake of that client (testbed.fake_systemd) against the same expectations: every
test taking ``host`` runs on both, so the fast tests' fake behaves as the client on D-Bus does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from testbed.fake_systemd import FakeSystemd
from testbed.sim import faults
from testbed.sim.bus import SimBus
from vfio_hookd import errors
from vfio_hookd.errors import HookdError
from vfio_hookd.systemd import Systemd

UNITS = {
    "gdm.service": {"aliases": ["display-manager.service"],
                    "holds": ["/dev/dri/card0", "/dev/snd/controlC1"], "active": True},
    "nvidia-persistenced.service": {"holds": ["/dev/nvidiactl", "/dev/nvidia0"], "active": True},
    "getty@tty1.service": {"active": True},
    "sshd.service": {"active": False},
}
DEVICE_NODES = ["/dev/dri/card0", "/dev/snd/controlC1", "/dev/nvidiactl", "/dev/nvidia0"]


def _root(tmp_path) -> str:
    """A simulated host root with device nodes and units."""
    root = tmp_path / "host"
    (root / ".sim").mkdir(parents=True)
    for node in DEVICE_NODES:
        (root / node.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / node.lstrip("/")).write_text("")
    (root / ".sim" / "units.json").write_text(json.dumps(UNITS))
    return str(root)


def _dbus(tmp_path):
    root = _root(tmp_path)
    with SimBus(root) as bus:
        sd = Systemd(bus.address)
        try:
            yield root, bus, sd
        finally:
            sd.close()


@pytest.fixture
def dbus_host(tmp_path):
    """``(root, SimBus, Systemd client on it)``."""
    yield from _dbus(tmp_path)


@pytest.fixture(params=[pytest.param("dbus", marks=pytest.mark.dbus),
                        pytest.param("fake", marks=pytest.mark.unit)])
def host(request, tmp_path):
    """``(root, backend, client)``: the SimBus and a Systemd client on it, or a FakeSystemd
    (backend and client in one)."""
    if request.param == "dbus":
        yield from _dbus(tmp_path)
        return
    fake = FakeSystemd(_root(tmp_path))
    try:
        yield fake.root, fake, fake
    finally:
        fake.close()
        fake.kill_all()


def set_system_state(backend, state: str) -> None:
    """``SystemState`` of the fake (D-Bus: the private ``SetSystemState`` method)."""
    if isinstance(backend, FakeSystemd):
        backend.set_system_state(state)
        return
    subprocess.run(["busctl", f"--address={backend.address}", "call", "org.freedesktop.systemd1",
                    "/org/freedesktop/systemd1", "org.vfiohookd.Sim", "SetSystemState", "s",
                    state], check=True, timeout=5)


def unit_pid(root: str, unit: str) -> int | None:
    with open(os.path.join(root, ".sim", "units-state.json")) as f:
        return json.load(f)[unit]["pid"]


def held_files(pid: int) -> set[str]:
    fd_dir = f"/proc/{pid}/fd"
    return {os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)}


def holders(path: str) -> list[int]:
    """PIDs with ``path`` open, from /proc/*/fd (what the holders step will look at)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if path in held_files(int(pid)):
                found.append(int(pid))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            pass
    return found


def test_resolve_alias_to_real_unit(host):
    _root, _bus, sd = host
    assert sd.resolve("display-manager.service") == "gdm.service"
    assert sd.resolve("gdm.service") == "gdm.service"


def test_unknown_unit_is_unit_failed_naming_it(host):
    _root, _bus, sd = host
    for call in (sd.resolve, lambda n: sd.stop(n, 2), lambda n: sd.start(n, 2)):
        with pytest.raises(HookdError) as exc:
            call("lightdm.service")
        assert exc.value.code == errors.UNIT_FAILED
        assert "unit lightdm.service not found" in exc.value.message
    assert sd.active_state("lightdm.service") == "inactive"


def test_stop_ends_the_holder_and_start_brings_a_new_one(host):
    root, _bus, sd = host
    card = os.path.join(root, "dev/dri/card0")
    pid = unit_pid(root, "gdm.service")
    assert pid and card in held_files(pid)
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "gdm"   # a useful COMMAND in a holder list

    assert sd.stop("gdm.service", 5) == "done"
    assert not os.path.exists(f"/proc/{pid}")   # reaped by the sim: gone, not a zombie
    assert holders(card) == []
    assert sd.active_state("gdm.service") == "inactive"
    assert sd.active_state("display-manager.service") == "inactive"

    assert sd.start("gdm.service", 5) == "done"
    new_pid = unit_pid(root, "gdm.service")
    assert new_pid and new_pid != pid
    assert holders(card) == [new_pid]
    assert sd.active_state("gdm.service") == "active"


def test_stop_waits_for_the_job_latency(host):
    root, _bus, sd = host
    faults.set_latency(root, {"unit_stop": 0.3})
    t0 = time.monotonic()
    assert sd.stop("nvidia-persistenced.service", 5) == "done"
    assert time.monotonic() - t0 >= 0.3
    assert sd.active_state("nvidia-persistenced.service") == "inactive"


def test_list_units_equal_after_stop_start_cycle(host):
    _root, _bus, sd = host
    before = sd.list_units()
    assert before == {"gdm.service": "active", "nvidia-persistenced.service": "active",
                      "getty@tty1.service": "active", "sshd.service": "inactive"}
    sd.stop("gdm.service", 5)
    assert sd.list_units()["gdm.service"] == "inactive"
    sd.start("gdm.service", 5)
    assert sd.list_units() == before


def test_noop_jobs_end_before_the_reply_and_are_not_missed(host):
    # The sim emits JobRemoved before the StopUnit reply when there is nothing to do.
    _root, _bus, sd = host
    assert sd.stop("sshd.service", 2) == "done"
    assert sd.start("getty@tty1.service", 2) == "done"


def test_stop_fail_fault_is_unit_failed(host):
    root, _bus, sd = host
    faults.inject(root, "stop", "gdm.service", "fail", count=1)
    pid = unit_pid(root, "gdm.service")
    with pytest.raises(HookdError) as exc:
        sd.stop("gdm.service", 5)
    assert exc.value.code == errors.UNIT_FAILED
    assert exc.value.message == "stopping gdm.service: job result failed"
    assert os.path.exists(f"/proc/{pid}")   # a failed stop leaves the holder running
    assert sd.stop("gdm.service", 5) == "done"   # the rule was spent


def test_stop_hang_fault_times_out_at_the_deadline(host):
    root, _bus, sd = host
    pid = unit_pid(root, "gdm.service")
    faults.inject(root, "stop", "gdm.service", "hang")
    t0 = time.monotonic()
    with pytest.raises(HookdError) as exc:
        sd.stop("gdm.service", 0.5)
    assert exc.value.code == errors.TIMEOUT
    # it waited for its own deadline (no upper bound on a loaded machine: a hang without a
    # deadline would never return, and the message names the deadline that fired)
    assert time.monotonic() - t0 >= 0.45
    assert "stopping gdm.service" in exc.value.message and "0.5 s" in exc.value.message
    # A start replaces the hung stop job (systemd's "replace" mode): the unit works again.
    assert sd.active_state("gdm.service") == "deactivating"
    faults.clear(root)
    assert sd.start("gdm.service", 5) == "done"
    assert sd.active_state("gdm.service") == "active"
    assert holders(os.path.join(root, "dev/dri/card0")) == [pid]


def test_unit_with_at_sign(host):
    _root, _bus, sd = host
    assert sd.resolve("getty@tty1.service") == "getty@tty1.service"
    assert sd.stop("getty@tty1.service", 2) == "done"
    assert sd.active_state("getty@tty1.service") == "inactive"
    assert sd.start("getty@tty1.service", 2) == "done"
    assert sd.active_state("getty@tty1.service") == "active"


def test_start_without_the_gpu_nodes_fails(host):
    # The GPU is on vfio-pci: its DRM and sound nodes are gone, the display manager cannot start.
    root, _bus, sd = host
    sd.stop("gdm.service", 5)
    os.unlink(os.path.join(root, "dev/dri/card0"))
    os.unlink(os.path.join(root, "dev/snd/controlC1"))
    with pytest.raises(HookdError) as exc:
        sd.start("gdm.service", 5)
    assert exc.value.code == errors.UNIT_FAILED
    assert exc.value.message == "starting gdm.service: job result failed"
    assert sd.active_state("gdm.service") == "failed"


def test_start_fail_fault(host):
    root, _bus, sd = host
    sd.stop("gdm.service", 5)
    faults.inject(root, "start", "gdm.*", "fail")
    with pytest.raises(HookdError) as exc:
        sd.start("gdm.service", 5)
    assert exc.value.code == errors.UNIT_FAILED


def test_shutting_down_follows_system_state(host):
    _root, backend, sd = host
    assert sd.shutting_down() is False
    set_system_state(backend, "stopping")
    assert sd.shutting_down() is True


def test_calls_from_worker_threads(host):
    root, _bus, sd = host
    faults.set_latency(root, {"unit_stop": 1.0})
    results: dict[str, object] = {}

    def work(unit):
        try:
            results[unit] = (sd.stop(unit, 5), sd.active_state(unit))
        except Exception as e:  # reported below
            results[unit] = e

    threads = [threading.Thread(target=work, args=(u,))
               for u in ("gdm.service", "nvidia-persistenced.service")]
    for t in threads:
        t.start()
    # the two 1.0 s jobs overlap: both units are seen stopping at the same moment (serial
    # calls would finish one before the other starts)
    both = False
    deadline = time.monotonic() + 5
    while not both and time.monotonic() < deadline and any(t.is_alive() for t in threads):
        states = {u: sd.active_state(u) for u in ("gdm.service", "nvidia-persistenced.service")}
        both = set(states.values()) == {"deactivating"}
    for t in threads:
        t.join(10)
    assert results == {"gdm.service": ("done", "inactive"),
                       "nvidia-persistenced.service": ("done", "inactive")}
    assert both, "the two stop jobs never ran at the same time"


def test_systemd_unavailable(tmp_path):
    sd = Systemd(f"unix:path={tmp_path}/nobus")
    with pytest.raises(HookdError) as exc:
        sd.list_units()
    assert exc.value.code == errors.SYSTEMD_UNAVAILABLE


def test_systemd_gone_after_connect(dbus_host):
    _root, bus, sd = dbus_host
    assert sd.list_units()
    bus.stop()
    with pytest.raises(HookdError) as exc:
        sd.active_state("gdm.service")
    assert exc.value.code == errors.SYSTEMD_UNAVAILABLE


def test_sim_stop_ends_unit_processes(dbus_host):
    root, bus, _sd = dbus_host
    pid = unit_pid(root, "gdm.service")
    assert os.path.exists(f"/proc/{pid}")
    bus.stop()
    assert not os.path.exists(f"/proc/{pid}")
    for p in bus.pids:
        assert not os.path.exists(f"/proc/{p}")


def test_import_does_not_load_gi():
    code = "import sys, vfio_hookd.systemd; print('gi' in sys.modules, 'pydbus' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", "False"]


def test_sim_restart_unit_replaces_the_process(dbus_host):
    root, _bus, sd = dbus_host
    pid = unit_pid(root, "gdm.service")
    assert sd._job("RestartUnit", "restarting", "display-manager.service", 5) == "done"
    new_pid = unit_pid(root, "gdm.service")
    assert new_pid != pid and not os.path.exists(f"/proc/{pid}")
    assert holders(os.path.join(root, "dev/dri/card0")) == [new_pid]


def test_system_bus_from_environment_and_reconnect_after_close(dbus_host, monkeypatch):
    _root, bus, _sd = dbus_host
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    with Systemd() as sd:
        assert "getty@tty1.service" in sd.list_units()
        sd.close()
        assert sd.resolve("display-manager.service") == "gdm.service"


def test_fake_kill_all_ends_unit_processes(tmp_path):
    fake = FakeSystemd(_root(tmp_path))
    pids = [unit_pid(fake.root, u) for u in ("gdm.service", "nvidia-persistenced.service")]
    assert all(os.path.exists(f"/proc/{p}") for p in pids)
    fake.kill_all()
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)   # reaped: no zombies
    assert fake.list_units()["gdm.service"] == "inactive"


def test_unit_of_pid_names_the_unit_of_a_process(host):
    root, _backend, sd = host
    pid = unit_pid(root, "gdm.service")
    assert sd.unit_of_pid(pid) == "gdm.service"
    assert sd.unit_of_pid(os.getpid()) is None   # this test runner belongs to no fake unit
