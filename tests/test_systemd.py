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
from testbed.sim.units import read_job_log
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


#: Units ordered among themselves (systemd.unit(5) After=/Before=): b is After= a, c is
#: Before= a (so a is After= c), x is ordered to nothing.
ORDERED = {
    "a.service": {"active": True},
    "b.service": {"active": True, "after": ["a.service"], "stop_s": 0.1, "start_s": 0.1},
    "c.service": {"active": True, "before": ["a.service"]},
    "x.service": {"active": True},
}


def _root(tmp_path, units: dict = UNITS) -> str:
    """A simulated host root with device nodes and units."""
    root = tmp_path / "host"
    (root / ".sim").mkdir(parents=True)
    for node in DEVICE_NODES:
        (root / node.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / node.lstrip("/")).write_text("")
    (root / ".sim" / "units.json").write_text(json.dumps(units))
    return str(root)


def _dbus(tmp_path, units: dict = UNITS):
    root = _root(tmp_path, units)
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


def _either(kind: str, tmp_path, units: dict):
    if kind == "dbus":
        yield from _dbus(tmp_path, units)
        return
    fake = FakeSystemd(_root(tmp_path, units))
    try:
        yield fake.root, fake, fake
    finally:
        fake.close()
        fake.kill_all()


BACKENDS = [pytest.param("dbus", marks=pytest.mark.dbus),
            pytest.param("fake", marks=pytest.mark.unit)]


@pytest.fixture(params=BACKENDS)
def host(request, tmp_path):
    """``(root, backend, client)``: the SimBus and a Systemd client on it, or a FakeSystemd
    (backend and client in one)."""
    yield from _either(request.param, tmp_path, UNITS)


@pytest.fixture(params=BACKENDS)
def ordered_host(request, tmp_path):
    """As ``host``, with the :data:`ORDERED` units."""
    yield from _either(request.param, tmp_path, ORDERED)


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
    """Paths ``pid`` has open. An fd that closes between the listing and its readlink (the
    fake's child still closing what it inherited, seen under load) is not held."""
    fd_dir = f"/proc/{pid}/fd"
    out = set()
    for fd in os.listdir(fd_dir):
        try:
            out.add(os.readlink(os.path.join(fd_dir, fd)))
        except FileNotFoundError:
            continue
    return out


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


# ---- batches: stop_all / start_all (systemctl stop A B) -------------------------------------
def _events(root: str, ev: str | None = None) -> list[tuple[str, str, str]]:
    """The job log as ``(ev, type, unit)`` tuples, oldest first (only ``ev`` if given)."""
    return [(e["ev"], e["type"], e["unit"]) for e in read_job_log(root)
            if ev is None or e["ev"] == ev]


def test_stop_all_queues_every_job_before_awaiting_any(host):
    # Both stop jobs hang: a client that awaited the first before queueing the second would
    # time out on gdm alone and never queue nvidia-persistenced's stop.
    root, _bus, sd = host
    faults.inject(root, "stop", "*.service", "hang")
    units = ["gdm.service", "nvidia-persistenced.service"]
    with pytest.raises(HookdError) as exc:
        sd.stop_all(units, 0.5)
    assert exc.value.code == errors.TIMEOUT
    assert exc.value.message.startswith("stopping gdm.service, nvidia-persistenced.service: "
                                        "jobs ")
    assert exc.value.message.endswith("did not end within 0.5 s")
    assert exc.value.details["results"] == {u: "pending" for u in units}
    assert _events(root, "new") == [("new", "stop", u) for u in units]   # both queued
    assert _events(root, "removed") == []                                 # none ended
    # start replaces the two hung stop jobs (mode "replace"), as one batch too
    faults.clear(root)
    assert sd.start_all(units, 5) == {u: "done" for u in units}
    ends = [(e["type"], e["unit"], e["result"]) for e in read_job_log(root)
            if e["ev"] == "removed"]
    for u in units:
        assert ends.index(("stop", u, "canceled")) < ends.index(("start", u, "done"))
    assert {u: sd.active_state(u) for u in units} == {u: "active" for u in units}


def test_stop_all_reports_the_failed_unit_and_stops_the_others(host):
    root, _bus, sd = host
    faults.inject(root, "stop", "gdm.service", "fail", count=1)
    with pytest.raises(HookdError) as exc:
        sd.stop_all(["gdm.service", "nvidia-persistenced.service"], 5)
    assert exc.value.code == errors.UNIT_FAILED
    assert exc.value.message == "stopping gdm.service: job result failed"
    assert exc.value.details["results"] == {"gdm.service": "failed",
                                            "nvidia-persistenced.service": "done"}
    assert sd.active_state("gdm.service") == "active"   # a failed stop leaves it running
    assert sd.active_state("nvidia-persistenced.service") == "inactive"


def test_stop_all_timeout_names_only_the_pending_units(host):
    root, _bus, sd = host
    faults.inject(root, "stop", "gdm.service", "hang")
    with pytest.raises(HookdError) as exc:   # 2 s: time for the other stop on a busy machine
        sd.stop_all(["gdm.service", "nvidia-persistenced.service"], 2)
    assert exc.value.code == errors.TIMEOUT
    assert exc.value.message.startswith("stopping gdm.service: job /org/freedesktop/systemd1/"
                                        "job/")
    assert "nvidia-persistenced" not in exc.value.message
    assert exc.value.details["results"] == {"gdm.service": "pending",
                                            "nvidia-persistenced.service": "done"}
    assert sd.active_state("nvidia-persistenced.service") == "inactive"
    faults.clear(root)
    assert sd.start("gdm.service", 5) == "done"


def test_stop_all_unknown_unit_is_named_and_the_others_are_stopped(host):
    # as systemctl stop: every unit is tried, the refused one is reported
    _root, _bus, sd = host
    with pytest.raises(HookdError) as exc:
        sd.stop_all(["lightdm.service", "nvidia-persistenced.service"], 5)
    assert exc.value.code == errors.UNIT_FAILED
    assert exc.value.message == "unit lightdm.service not found"
    assert exc.value.details["results"] == {"lightdm.service": "refused",
                                            "nvidia-persistenced.service": "done"}
    assert sd.active_state("nvidia-persistenced.service") == "inactive"


def test_stop_all_and_start_all_of_nothing(host):
    _root, _bus, sd = host
    assert sd.stop_all([], 1) == {} and sd.start_all([], 1) == {}


def _index(log, ev, jtype, unit) -> int:
    return log.index((ev, jtype, unit))


def test_stop_all_follows_the_units_order_in_reverse(ordered_host):
    # b is After= a, a is After= c: stops run b, then a, then c (systemd.unit(5)); x is free.
    # Given in start order, a client queueing a first would see a's job run at once (nothing
    # queued yet to wait for), before b's stop ended.
    root, _bus, sd = ordered_host
    assert sd.stop_all(["c.service", "a.service", "b.service", "x.service"], 5) == {
        u: "done" for u in ("c.service", "a.service", "b.service", "x.service")}
    log = _events(root)
    assert _index(log, "removed", "stop", "b.service") < _index(log, "run", "stop", "a.service")
    assert _index(log, "removed", "stop", "a.service") < _index(log, "run", "stop", "c.service")
    assert {u: sd.active_state(u) for u in ORDERED} == {u: "inactive" for u in ORDERED}


def test_start_all_follows_the_units_order(ordered_host):
    root, _bus, sd = ordered_host
    units = ["b.service", "a.service", "c.service"]   # given in stop order
    sd.stop_all(units, 5)
    assert sd.start_all(units, 5) == {u: "done" for u in units}
    log = [e for e in _events(root) if e[1] == "start"]
    assert _index(log, "removed", "start", "c.service") < _index(log, "run", "start", "a.service")
    assert _index(log, "removed", "start", "a.service") < _index(log, "run", "start", "b.service")
    assert {u: sd.active_state(u) for u in units} == {u: "active" for u in units}


@pytest.mark.dbus
def test_sim_unit_order_properties(tmp_path):
    """The D-Bus fake answers After/Before as systemd does: each direction on both units."""
    for root, _bus, sd in _dbus(tmp_path, ORDERED):
        _, manager = sd._connect()
        get = lambda u, p: sd._get(manager.GetUnit(u), "org.freedesktop.systemd1.Unit", p)
        assert get("a.service", "After") == ["c.service"]
        assert get("a.service", "Before") == ["b.service"]
        assert get("b.service", "After") == ["a.service"] and get("x.service", "After") == []


class _J:
    def __init__(self, jtype):
        self.type = jtype


@pytest.mark.unit
@pytest.mark.parametrize("mine, other_job, rel, waits", [
    # b After= a: b's start waits for a's start or stop; b's stop waits for nothing of a
    ("start", "start", "after", True), ("start", "stop", "after", True),
    ("stop", "stop", "after", False), ("stop", "start", "after", False),
    # a Before= b: a's job waits for b's stop (stops go in reverse, and before starts)
    ("stop", "stop", "before", True), ("start", "stop", "before", True),
    ("start", "start", "before", False), ("stop", "start", "before", False),
    ("start", None, "after", False), ("stop", None, "before", False),
])
def test_model_job_order_is_systemds(mine, other_job, rel, waits):
    """testbed.sim.units.blockers against systemd's job_compare() (src/core/job.c)."""
    from testbed.sim import units as model
    table = {"a.service": {}, "b.service": {"after": ["a.service"]}}
    units, _names = model.build(table)
    me, other = ((units["b.service"], units["a.service"]) if rel == "after"
                 else (units["a.service"], units["b.service"]))
    other.job = _J(other_job) if other_job else None
    assert model.blockers(me, mine, units) == ([other.id] if waits else [])


@pytest.mark.unit
def test_enqueue_order():
    from vfio_hookd.jobs import enqueue_order
    after = {"b": {"a"}, "a": {"c"}, "x": set()}
    assert enqueue_order(["c", "a", "b", "x"], after, stop=True) == ["b", "a", "c", "x"]
    assert enqueue_order(["b", "a", "c", "x"], after, stop=False) == ["c", "a", "b", "x"]
    assert enqueue_order(["x", "b", "x"], {}, stop=True) == ["x", "b"]   # free: as given
    cycle = {"p": {"q"}, "q": {"p"}}
    assert enqueue_order(["p", "q"], cycle, stop=False) == ["p", "q"]
