"""Fault injection and simulated latencies for the simulated host.

Shared by the simulated kernel (:mod:`testbed.sim.kernel`) and the simulated systemd
(:mod:`testbed.sim.systemd`). The settings live in ``<root>/.sim/faults.json`` so that every
process working on the simulated host (daemon, fake systemd, tests) sees the same ones::

    {"rules": [{"op": "write", "target": "/sys/bus/pci/drivers_probe",
                "action": "fail", "errno": 19, "count": null}],
     "latency": {"unbind": 0.05, "rmmod": 0.15, "unit_stop": 0.8}}

- ``op``: ``write`` (target: a host path), ``modprobe`` / ``rmmod`` (target: module name),
  ``stop`` / ``start`` (target: unit name), ``set_property`` (target: unit name; systemd's
  ``SetUnitProperties``, :mod:`testbed.sim.cpus`), ``inhibit`` (target: logind's ``what``, e.g.
  ``sleep``: the lock is refused, :mod:`.inhibitors`).
- ``target``: an ``fnmatch`` pattern.
- ``action``: ``fail`` (the operation fails with ``errno``; for units, the job ends "failed"),
  ``hang`` (the operation never completes, like an NVIDIA unbind with a holder) or ``stall``
  (writes only: the operation completes, but after ``seconds``, like an unbind that returns
  once its holder lets go).
- ``count``: how many times the rule fires before it is spent (``null``: always).

Latency keys (seconds): ``driver_override``, ``bind``, ``unbind``, ``drivers_probe``,
``vtcon_bind``, ``fb_unbind``, ``fb_bind``, ``modprobe``, ``rmmod``, ``unit_stop``, ``unit_start``,
``set_property``, ``hugepages_nr`` (a write of ``nr_hugepages``), ``compact_memory``.
:data:`REALISTIC` holds the per-operation latencies the benchmarks and the demo use.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import fnmatch
import json
import os

#: Realistic per-operation latencies (s) for benchmarks and the demo (issue 2: display manager
#: stop 800 ms, module unload 150 ms, unbind/probe 50 ms).
REALISTIC = {
    "driver_override": 0.0, "bind": 0.05, "unbind": 0.05, "drivers_probe": 0.05,
    "vtcon_bind": 0.0, "fb_unbind": 0.0, "fb_bind": 0.0,
    "modprobe": 0.15, "rmmod": 0.15, "unit_stop": 0.8, "unit_start": 0.8,
}

OPS = ("write", "modprobe", "rmmod", "stop", "start", "set_property", "inhibit")
ACTIONS = ("fail", "hang", "stall")


def _file(root: str) -> str:
    return os.path.join(root, ".sim", "faults.json")


def _locked_update(root: str, change) -> dict:
    path = _file(root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(path)
        change(data)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(data))   # C encoder: no cyclic garbage in the daemon
        os.replace(tmp, path)
        return data


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    data.setdefault("rules", [])
    data.setdefault("latency", {})
    return data


def load(root: str) -> dict:
    """The current settings of simulated host ``root``: ``{"rules": [...], "latency": {...}}``."""
    return _read(_file(root))


def inject(root: str, op: str, target: str, action: str = "fail",
           errno: int = _errno.EIO, count: int | None = None, seconds: float = 0.0) -> None:
    """Add a fault rule (see the module docstring).

    :raises ValueError: unknown ``op`` or ``action``.
    """
    if op not in OPS or action not in ACTIONS:
        raise ValueError(f"op must be one of {OPS}, action one of {ACTIONS}")
    rule = {"op": op, "target": target, "action": action, "errno": errno, "count": count,
            "seconds": seconds}
    _locked_update(root, lambda d: d["rules"].append(rule))


def clear(root: str) -> None:
    """Remove every fault rule (latencies stay)."""
    _locked_update(root, lambda d: d.__setitem__("rules", []))


def set_latency(root: str, values: dict[str, float]) -> None:
    """Set per-operation latencies in seconds (keys in the module docstring)."""
    _locked_update(root, lambda d: d["latency"].update(values))


def latency(root: str, key: str) -> float:
    """The latency (s) configured for ``key``, 0.0 when none is."""
    return float(load(root)["latency"].get(key, 0.0))


def match(root: str, op: str, target: str) -> dict | None:
    """The first live rule for ``op`` on ``target``, consuming one of its ``count``; or None.

    Fast path: no ``faults.json`` means no rule.
    """
    path = _file(root)
    if not os.path.exists(path):
        return None
    hit: list[dict] = []

    def change(data: dict) -> None:
        for rule in data["rules"]:
            if rule["op"] == op and fnmatch.fnmatchcase(target, rule["target"]):
                if rule.get("count") is not None:
                    if rule["count"] <= 0:
                        continue
                    rule["count"] -= 1
                hit.append(dict(rule))
                return

    _locked_update(root, change)
    return hit[0] if hit else None
