"""Per-VM records: what prepare did, written atomically before and after every step.

A record is ``<run>/vms/<domain name>.json`` (:meth:`vfio_hookd.paths.Paths.record_path`)::

    {"version": 1, "vm": "win11", "phase": "prepared",
     "devices": ["0000:01:00.0", "0000:01:00.1"],
     "drivers": {"0000:01:00.0": "nvidia", "0000:01:00.1": "snd_hda_intel"},
     "child_modules": {"0000:01:00.0": []},   # modules of drivers bound to child devices
     "profile": {...the profile as prepare used it...},
     "error": null | {"code": str, "message": str, "step": str|null},
     "release_errors": [{"code", "message", "step"}],
     "updated": "2026-11-21T15:03:00Z",
     "steps": [{"name": "units", "status": "done", "facts": {...},
                "duration_ms": 812.4, "undo_ms": null, "error": null, "notes": []}]}

Phases: ``idle`` (nothing held), ``preparing``, ``prepared``, ``releasing``, ``failed``.
Step statuses: ``pending``, ``applying``, ``done``, ``failed``, ``undoing``, ``undone``,
``undo_failed``. Release, not today's profile, is driven by this record.
"""

from __future__ import annotations

import json
import os
import time

from . import paths

PHASES = ("idle", "preparing", "prepared", "releasing", "failed")
#: Step statuses whose changes may still be on the host (release undoes these).
#: A step that failed during prepare stays "applying" until its partial changes are undone,
#: then becomes "failed" (nothing held).
HELD = ("applying", "done", "undoing", "undo_failed")


def new(vm: str, devices: list[str], drivers: dict, profile: dict, step_names: list[str]) -> dict:
    """A fresh record (dict, shape in the module docstring) in phase ``preparing``."""
    return {
        "version": 1, "vm": vm, "phase": "preparing", "devices": list(devices),
        "drivers": dict(drivers), "profile": profile, "error": None, "release_errors": [],
        "updated": None,
        "steps": [{"name": n, "status": "pending", "facts": {}, "duration_ms": None,
                   "undo_ms": None, "error": None, "notes": []} for n in step_names],
    }


def save(rec: dict) -> None:
    """Write ``rec`` to its path atomically (temporary file, fsync, rename).

    :raises OSError: the run directory cannot be written.
    """
    path = paths.Paths.from_env().record_path(rec["vm"])
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    rec["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(vm: str) -> dict | None:
    """The record of ``vm`` (dict) or None when there is none.

    :raises ValueError: the file is not a record (corrupt JSON); the message names the file.
    """
    path = paths.Paths.from_env().record_path(vm)
    try:
        with open(path) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a vfio-hookd record: {exc}") from None
    if not isinstance(rec, dict) or rec.get("vm") != vm or rec.get("phase") not in PHASES:
        raise ValueError(f"{path}: not a vfio-hookd record of {vm!r}")
    return rec


def all_names() -> list[str]:
    """Names (str) of every VM that has a record, sorted."""
    d = paths.Paths.from_env().records_dir
    try:
        return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))
    except FileNotFoundError:
        return []


def holds_host(rec: dict | None) -> bool:
    """True when ``rec`` says some change may still be on the host."""
    return bool(rec) and any(s["status"] in HELD for s in rec["steps"])
