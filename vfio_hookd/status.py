"""The status document, built from the records on disk and the host's current drivers; the
same for the daemon, the CLI without a daemon, and ``status --json``."""

from __future__ import annotations

from . import errors, pci
from .errors import HookdError
from .host import Host
from .paths import Paths, check_vm_name
from .record import Record, RecordStore


def status_from_records(host: Host, paths: Paths, vm: str | None = None,
                        inhibitors=None) -> dict:
    """``{"stuck_writes": [{"path", "data", "since"}] (writes past their deadline that have not
    returned: :meth:`vfio_hookd.host.Host.stuck_writes`), "vms": {NAME: {"phase", "updated",
    "steps": [{"name", "status", "duration_ms", "undo_ms", "error", "notes", "warnings",
    "skipped", "why"}], "devices": [{"address", "driver", "driver_before", "held_by" (only when
    another VM's record holds it)}], "error", "release_errors", "desktop": {"check": "back" |
    "missing" | "waiting" | "none", "missing": [str], "seconds": float | None, "after"},
    "inhibitor": None | {"what", "who", "why", "mode", "since", "held", "error"}}}}``
    (:mod:`vfio_hookd.desktop`; ``inhibitor``: the lock of the inhibit step while the record
    holds it, ``held`` True/False whether ``inhibitors``, the
    :class:`vfio_hookd.inhibitors.Inhibitors` of the daemon asked, holds it now, with the
    failure to take it again at the daemon's start in ``error``; None without ``inhibitors``).
    A record that cannot be read shows as phase ``unknown`` with its ``RECORD_INVALID`` error.

    :raises HookdError: ``VM_NAME_INVALID``; ``NOT_MANAGED`` when ``vm`` has neither a record
        nor a profile.
    """
    import os
    store = RecordStore(paths)
    records = store.load_all()   # each record read once: for the holders and for its VM
    names = [check_vm_name(vm)] if vm else list(records)
    holders = {}   # function -> the VM whose record holds it now
    for other, rec in records.items():
        if isinstance(rec, Record) and rec.holds_host:
            holders.update({a: other for a in rec.devices})
    out: dict = {}
    for name in names:
        rec = records.get(name)
        if isinstance(rec, HookdError):
            out[name] = {"phase": "unknown", "updated": None, "steps": [], "devices": [],
                         "error": {"code": rec.code, "message": rec.message},
                         "release_errors": [], "inhibitor": None,
                         "desktop": {"check": "none", "missing": [], "seconds": None}}
            continue
        if rec is None:
            if not os.path.lexists(paths.profile_path(name)):
                raise HookdError(errors.NOT_MANAGED, f"{name!r} has no profile "
                                                     f"({paths.profile_path(name)}) and no record")
            out[name] = {"phase": "idle", "updated": None, "steps": [], "devices": [],
                         "error": None, "release_errors": [], "inhibitor": None,
                         "desktop": {"check": "none", "missing": [], "seconds": None}}
            continue
        out[name] = _vm_status(host, rec, holders)
        out[name]["inhibitor"] = _inhibitor(rec, inhibitors)
    return {"vms": out, "stuck_writes": host.stuck_writes()}


def _vm_status(host: Host, rec: Record, holders: dict) -> dict:
    steps = []
    for s in rec.steps:
        err = s.undo_error or s.error
        steps.append({"name": s.name, "status": s.status, "duration_ms": s.duration_ms,
                      "undo_ms": s.undo_ms,
                      "error": f"{err['code']}: {err['message']}" if err else None,
                      "notes": list(s.notes),
                      "warnings": list(s.facts.get("warnings", [])),
                      "skipped": list(s.facts.get("skipped", [])),
                      "why": dict(s.facts.get("why", {}))})
    return {
        "phase": rec.phase, "updated": rec.updated, "steps": steps,
        "devices": [_device(host, rec, a, holders) for a in rec.devices],
        "error": rec.error, "release_errors": rec.release_errors,
        "desktop": rec.desktop_check or {"check": "none", "missing": [], "seconds": None},
    }


def _inhibitor(rec: Record, inhibitors) -> dict | None:
    """The inhibit step's lock while ``rec`` holds it (shape in :func:`status_from_records`);
    ``since`` is when the process that holds it now took it, else when prepare took it."""
    entry = next((s for s in rec.steps if s.name == "inhibit"), None)
    if entry is None or not entry.held or not entry.facts.get("done") \
            or "pid" not in entry.facts:
        return None
    lock = entry.facts["done"][0]
    out = {k: lock.get(k) for k in ("what", "who", "why", "mode")}
    out.update(since=entry.facts.get("since"), held=None, error=None)
    if inhibitors is not None:
        held = inhibitors.get(rec.vm)
        out.update(held=held is not None, error=inhibitors.error(rec.vm))
        if held is not None:
            out["since"] = held.since
    return out


def _device(host: Host, rec: Record, addr: str, holders: dict) -> dict:
    """One device of ``rec``: its driver now and before; ``held_by`` the other VM whose record
    holds it now (an idle VM's device on vfio-pci is then that VM's, not this one's)."""
    dev = {"address": addr, "driver": pci.current_driver(host, addr),
           "driver_before": rec.drivers.get(addr)}
    other = holders.get(addr)
    if other and other != rec.vm:
        dev["held_by"] = other
    return dev
