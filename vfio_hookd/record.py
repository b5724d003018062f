"""Per-VM records: what prepare did, written atomically before and after every step, and
everything release needs: release reads nothing but the record (not today's profile).

A record is ``<run>/vms/<domain name>.json`` (:meth:`vfio_hookd.paths.Paths.record_path`), the
JSON form of :class:`Record`::

    {"version": 2, "vm": "win11", "phase": "prepared",
     "devices": ["0000:01:00.0", "0000:01:00.1"],
     "drivers": {"0000:01:00.0": "nvidia", "0000:01:00.1": "snd_hda_intel"},
     "child_modules": {"0000:01:00.0": []},   # modules of drivers bound to child devices
     "deadlines": {"unit_stop": 100.0, ...},   # seconds, in force for this prepare and its release
     "profile": {...the profile as prepare used it; shown by status, never read by release...},
     "error": null | {"code", "message", "step"},
     "release_errors": [{"code", "message", "step"}],
     "updated": "2026-11-21T15:03:00Z",
     "desktop": {} | {...the desktop seen before prepare: vfio_hookd.desktop.snapshot...},
     "desktop_check": null | {"check": "back" | "missing" | "waiting" | "none",
                              "missing": [str], "seconds": float | null, "after": "release" |
                              "rollback"},
     "steps": [{"name": "units", "status": "done", "facts": {...}, "duration_ms": 812.4,
                "undo_ms": null, "error": null, "undo_error": null, "notes": []}]}

Phases: ``idle`` (nothing held), ``preparing``, ``prepared``, ``releasing``, ``failed``.
Step statuses: ``pending``, ``applying``, ``done``, ``failed``, ``undoing``, ``undone``,
``undo_failed``. Version 1 records (vfio-hookd 0.1, deadlines inside ``profile``) are read and
upgraded; a record of any other version is refused with ``RECORD_INVALID``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from . import errors
from .errors import HookdError
from .paths import Paths
from .trust import open_trusted, open_trusted_dir

#: A record's temporary file: created new, never through a symbolic link.
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRFD = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

VERSION = 2
#: Versions this code reads (1 is upgraded on load).
READABLE_VERSIONS = (1, 2)
PHASES = ("idle", "preparing", "prepared", "releasing", "failed")
STEP_STATUSES = ("pending", "applying", "done", "failed", "undoing", "undone", "undo_failed")
#: Step statuses whose changes may still be on the host (release undoes these).
#: A step that failed during prepare stays "applying" until its partial changes are undone,
#: then becomes "failed" (nothing held).
HELD = ("applying", "done", "undoing", "undo_failed")


@dataclass
class StepEntry:
    """One step's part of a record.

    :ivar name: the step's name (``units``, ``holders``, ...).
    :ivar status: one of :data:`STEP_STATUSES`.
    :ivar facts: what the step observed and did (JSON-able dict; the step's own shape).
    :ivar duration_ms: apply time (ms) or None; :ivar undo_ms: undo time (ms) or None.
    :ivar error: ``{"code", "message", "details"}`` of a failed apply; ``undo_error`` likewise.
    :ivar notes: expected differences the undo reported (list of str).
    """
    name: str
    status: str = "pending"
    facts: dict = field(default_factory=dict)
    duration_ms: float | None = None
    undo_ms: float | None = None
    error: dict | None = None
    undo_error: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def held(self) -> bool:
        """True when this step's changes may still be on the host."""
        return self.status in HELD


@dataclass
class Record:
    """What prepare did for one VM (shape in the module docstring). Build with :meth:`new`."""
    vm: str
    devices: list
    drivers: dict
    deadlines: dict
    steps: list
    phase: str = "preparing"
    child_modules: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    error: dict | None = None
    release_errors: list = field(default_factory=list)
    updated: str | None = None
    version: int = VERSION
    desktop: dict = field(default_factory=dict)
    desktop_check: dict | None = None

    @classmethod
    def new(cls, vm: str, devices, drivers: dict, deadlines: dict, step_names,
            child_modules: dict | None = None, profile: dict | None = None) -> "Record":
        """A fresh record in phase ``preparing``, every step ``pending``."""
        return cls(vm=vm, devices=list(devices), drivers=dict(drivers),
                   deadlines=dict(deadlines), steps=[StepEntry(n) for n in step_names],
                   child_modules={a: list(m) for a, m in (child_modules or {}).items()},
                   profile=dict(profile or {}))

    @property
    def holds_host(self) -> bool:
        """True when some change of this record may still be on the host."""
        return any(s.held for s in self.steps)

    def step(self, name: str) -> StepEntry:
        """The entry of step ``name``. :raises KeyError: no such step in this record."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict:
        """The JSON-able dict written to disk."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, source: str) -> "Record":
        """Read a record from its JSON form (``source`` names the file in errors); upgrades
        version 1.

        :raises HookdError: ``RECORD_INVALID`` naming ``source`` and what is wrong.
        """
        def bad(what: str) -> HookdError:
            return HookdError(errors.RECORD_INVALID, f"{source}: {what}",
                              {"file": source})
        if not isinstance(data, dict):
            raise bad("not a vfio-hookd record (not a JSON object)")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise bad(f"record version {version!r} is not one this vfio-hookd reads "
                      f"({', '.join(map(str, READABLE_VERSIONS))}): it was written by another "
                      f"version. Release it with that version, or move the file away once the "
                      f"host is back as it was")
        if version == 1:
            data = dict(data, deadlines=(data.get("profile") or {}).get("deadlines") or {},
                        version=VERSION)
        try:
            steps = [StepEntry(**{k: s[k] for k in StepEntry.__dataclass_fields__ if k in s})
                     for s in data["steps"]]
            rec = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "steps"},
                      steps=steps)
        except (KeyError, TypeError) as exc:
            raise bad(f"not a vfio-hookd record (missing or wrong field: {exc})") from None
        if not isinstance(rec.vm, str) or rec.phase not in PHASES or \
                not isinstance(rec.devices, list) or not isinstance(rec.drivers, dict) or \
                not isinstance(rec.deadlines, dict) or \
                any(s.status not in STEP_STATUSES or not isinstance(s.facts, dict)
                    for s in rec.steps):
            raise bad("not a vfio-hookd record (a field has the wrong type or value)")
        return rec


class RecordStore:
    """The records under ``paths.records_dir``: load, save, list; one policy for a record that
    cannot be read (``RECORD_INVALID``, naming the file), used by daemon, CLI and status.

    :param paths: :class:`vfio_hookd.paths.Paths`.
    """

    def __init__(self, paths: Paths):
        self.paths = paths

    def save(self, rec: Record) -> None:
        """Write ``rec`` atomically (temporary file, fsync, rename); sets ``rec.updated``.

        Release trusts what is written here, so the records directory and every directory up
        to ``/`` must be root's and writable by root alone before anything is written
        (:func:`vfio_hookd.trust.open_trusted_dir`, the rule :meth:`load` reads by; missing
        directories are made 0700 under the deepest one that passes); the file is written and
        renamed relative to the checked directory's descriptor.

        :raises HookdError: ``UNTRUSTED_FILE`` naming the directory at fault, its owner, mode
            and the fix (nothing is written).
        :raises OSError: the run directory cannot be written.
        """
        path = self.paths.record_path(rec.vm)
        name = os.path.basename(path)
        dfd = self._records_dir()
        try:
            rec.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            tmp = f"{name}.{os.getpid()}.tmp"
            try:   # a leftover (or planted) temporary file is never written through
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            fd = os.open(tmp, _NEW, 0o644, dir_fd=dfd)
            with os.fdopen(fd, "w") as f:
                # one line, by json's C encoder: with an indent (or through json.dump) json
                # encodes in Python, whose nested closures are reference cycles, left for the
                # cyclic collector; a prepare and release save ~50 times (vfio_hookd.memory)
                f.write(json.dumps(rec.to_json(), sort_keys=True, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)

    def _records_dir(self) -> int:
        """An ``O_PATH`` descriptor of the checked records directory, made (0700) if missing
        under the deepest existing directory, which is checked first."""
        uid, top = self.paths.trusted_uid, self.paths.records_dir
        missing, d = [], top
        while True:
            try:
                fd = open_trusted_dir(d, uid)
                break
            except FileNotFoundError:
                if d == os.path.dirname(d):
                    raise
                missing.append(os.path.basename(d))
                d = os.path.dirname(d)
        if not missing:
            return fd
        try:
            for part in reversed(missing):
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, _DIRFD, dir_fd=fd)
                os.close(fd)
                fd = nfd
        finally:
            os.close(fd)
        return open_trusted_dir(top, uid)   # what was made is checked like the rest

    def load(self, vm: str) -> Record | None:
        """The record of ``vm``, or None when there is none.

        The file is opened by :func:`vfio_hookd.trust.open_trusted` (root's alone, and every
        directory up to ``/``): release acts on the host as the record says.

        :raises HookdError: ``RECORD_INVALID`` (corrupt JSON, unknown version, another VM's
            record, unreadable file), ``UNTRUSTED_FILE`` (someone besides root owns or may
            write it or a directory above it), ``VM_NAME_INVALID``.
        """
        path = self.paths.record_path(vm)
        try:
            with open_trusted(path, self.paths.trusted_uid) as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            raise HookdError(errors.RECORD_INVALID,
                             f"{path}: not a vfio-hookd record: {exc}. If the host is as it was "
                             f"before the VM started, move the file away", {"file": path}) from None
        except OSError as exc:
            raise HookdError(errors.RECORD_INVALID, f"{path}: cannot be read: "
                                                    f"{exc.strerror or exc}", {"file": path}) from None
        rec = Record.from_json(data, path)
        if rec.vm != vm:
            raise HookdError(errors.RECORD_INVALID,
                             f"{path}: holds the record of {rec.vm!r}, not of {vm!r}",
                             {"file": path})
        return rec

    def names(self) -> list[str]:
        """Names (str) of every VM that has a record file, sorted."""
        try:
            return sorted(f[:-5] for f in os.listdir(self.paths.records_dir)
                          if f.endswith(".json"))
        except FileNotFoundError:
            return []

    def load_all(self) -> dict[str, "Record | HookdError"]:
        """Every record by VM name; a record that cannot be read maps to its error."""
        out: dict = {}
        for name in self.names():
            try:
                out[name] = self.load(name)
            except HookdError as exc:
                out[name] = exc
        return out
