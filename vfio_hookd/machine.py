"""The per-VM state machine: plan, prepare (fail closed), release (from the record).

Phases (record ``phase``): ``idle -> preparing -> prepared -> releasing -> idle``; a prepare that
fails rolls back and ends ``failed`` (with ``error``); a release with failed undos ends
``failed`` too (with ``release_errors``), and a later release retries what is still held.

Rules (issue 2, DEVELOPERS.md):
- Nothing on the host is touched until the plan is valid: profile, VM name, devices present,
  every endpoint of their IOMMU groups in the profile, no device held by another VM's record.
- The record is written atomically before and after every step.
- Prepare fails closed: on any step's failure it undoes the finished steps (and the failed
  step's partial changes) in reverse, then raises the original error.
- Release walks the record in reverse, carries on past a failed undo and reports every failure.
  No record, or a record with nothing held (e.g. after a rolled-back prepare): quiet success.
- A second prepare of a prepared VM changes nothing: it checks that every function is still on
  vfio-pci and answers success, or ``STATE_DRIFT`` (run ``vfio-hookd release VM`` first).
- One state machine at a time per device and per VM: in-process locks, and ``flock`` on
  ``<run>/locks/`` so a CLI run without the daemon cannot race it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Callable

from . import errors, paths, record
from .errors import HookdError
from .host import Host
from .steps import STEPS, Context, VFIO_DRIVER, child_modules, current_driver, pci

log = logging.getLogger("vfio_hookd")


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


class Machine:
    """Runs prepare/release/status for VMs on one host.

    :param host: the :class:`~vfio_hookd.host.Host` to act on.
    :param systemd_factory: zero-argument callable returning a
        :class:`~vfio_hookd.systemd.Systemd`; called at most once, on first use.
    :param lock_timeout_s: how long a request waits for another one on the same VM/device (s).
    """

    def __init__(self, host: Host, systemd_factory: Callable[[], object] | None = None,
                 lock_timeout_s: float = 600.0):
        self.host = host
        self._systemd_factory = systemd_factory or _default_systemd
        self._systemd = None
        self._systemd_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.lock_timeout_s = lock_timeout_s

    # ---- helpers ------------------------------------------------------------------------------
    def systemd(self):
        """The shared systemd client (created on first use)."""
        with self._systemd_lock:
            if self._systemd is None:
                self._systemd = self._systemd_factory()
            return self._systemd

    @contextmanager
    def _locked(self, keys: list[str]):
        """Hold the in-process lock and the ``flock`` of every key (sorted: no deadlock)."""
        with ExitStack() as stack:
            lockdir = paths.Paths.from_env().locks_dir
            os.makedirs(lockdir, mode=0o700, exist_ok=True)
            for key in sorted(set(keys)):
                with self._locks_guard:
                    lock = self._locks.setdefault(key, threading.Lock())
                if not lock.acquire(timeout=self.lock_timeout_s):
                    raise HookdError(errors.TIMEOUT, f"{key} stayed busy with another request "
                                                     f"for {self.lock_timeout_s:g} s")
                stack.callback(lock.release)
                f = stack.enter_context(open(os.path.join(lockdir, key.replace("/", "_")), "a"))
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise HookdError(errors.DEVICE_CLAIMED,
                                     f"{key} is being worked on by another vfio-hookd process "
                                     f"(the daemon?); retry when it has finished") from None
            yield

    def _context(self, vm: str, profile, devices, drivers, logger,
                 children: dict | None = None) -> Context:
        return Context(vm=vm, host=self.host, profile=profile, devices=tuple(devices),
                       drivers=dict(drivers), systemd=self.systemd, log=logger,
                       child_modules=dict(children or {}))

    # ---- plan ---------------------------------------------------------------------------------
    def plan(self, vm: str, xml: str | None):
        """Validate everything before the host is touched.

        :returns: ``(profile, devices, drivers)``.
        :raises HookdError: ``VM_NAME_INVALID``, ``NOT_MANAGED``, ``PROFILE_INVALID``,
            ``DOMAIN_XML_INVALID``, ``DEVICE_NOT_FOUND``, ``IOMMU_GROUP_INCOMPLETE``.
        """
        from . import profile as profiles
        prof = profiles.load_profile(paths.Paths.from_env(), vm)
        if prof.devices is None:
            if not xml:
                raise HookdError(errors.DOMAIN_XML_INVALID,
                                 f"{prof.path}: devices: auto needs the domain XML (pass --xml, "
                                 f"or list the PCI addresses under devices:)")
            devices = profiles.devices_from_domain_xml(xml)
            if not devices:
                raise HookdError(errors.DOMAIN_XML_INVALID,
                                 f"{prof.path}: devices: auto, but the domain XML of {vm!r} has no "
                                 f"PCI <hostdev>; list the GPU's functions under devices:")
        else:
            devices = tuple(prof.devices)
        host = self.host
        for addr in devices:
            if not host.exists(pci(addr)):
                raise HookdError(errors.DEVICE_NOT_FOUND,
                                 f"{prof.path}: devices: {addr} is not a PCI function on this host "
                                 f"(see lspci -D)")
        groups: dict[str, list[str]] = {}
        for addr in devices:
            group = host.link_name(pci(addr, "iommu_group"))
            if group is None:
                raise HookdError(errors.IOMMU_GROUP_INCOMPLETE,
                                 f"{addr} has no IOMMU group: enable the IOMMU "
                                 f"(intel_iommu=on or amd_iommu=on) and reboot")
            groups.setdefault(group, [])
        for group in groups:
            for member in host.listdir(f"/sys/kernel/iommu_groups/{group}/devices"):
                cls = host.read_or(pci(member, "class"), "") or ""
                if cls.startswith("0x0604"):  # PCI bridges are exempt (vfio docs)
                    continue
                if member not in devices:
                    groups[group].append(member)
        missing = {g: m for g, m in groups.items() if m}
        if missing:
            text = "; ".join(f"group {g}: {', '.join(m)}" for g, m in sorted(missing.items()))
            raise HookdError(errors.IOMMU_GROUP_INCOMPLETE,
                             f"{prof.path}: every endpoint of an IOMMU group must be handed over "
                             f"together; add to devices: {text}",
                             {"missing": sorted(a for m in missing.values() for a in m)})
        drivers = {addr: current_driver(host, addr) for addr in devices}
        return prof, devices, drivers

    def _check_claims(self, vm: str, devices) -> None:
        for other in record.all_names():
            if other == vm:
                continue
            try:
                rec = record.load(other)
            except ValueError:
                continue
            if rec and record.holds_host(rec):
                shared = sorted(set(rec["devices"]) & set(devices))
                if shared:
                    raise HookdError(errors.DEVICE_CLAIMED,
                                     f"{', '.join(shared)} is held by VM {other!r} "
                                     f"(phase {rec['phase']}); stop it or run "
                                     f"'vfio-hookd release {other}'", {"vm": other})

    # ---- prepare ------------------------------------------------------------------------------
    def prepare(self, vm: str, xml: str | None = None) -> dict:
        """Take the host into passthrough state for ``vm``.

        :param xml: the domain XML (needed for ``devices: auto``).
        :returns: the record (dict) in phase ``prepared``.
        :raises HookdError: a planning error (host untouched), ``DEVICE_CLAIMED``,
            ``STATE_DRIFT``, or the failing step's error after the rollback.
        """
        paths.check_vm_name(vm)
        with self._locked([f"vm-{vm}"]):
            prof, devices, drivers = self.plan(vm, xml)
            with self._locked(list(devices)):
                rec = self._load(vm)
                if rec and rec["phase"] == "prepared":
                    return self._check_still_prepared(rec)
                if record.holds_host(rec):
                    raise HookdError(errors.STATE_DRIFT,
                                     f"the record of {vm!r} says a previous run left changes on "
                                     f"the host (phase {rec['phase']}); run 'vfio-hookd release "
                                     f"{vm}' first")
                self._check_claims(vm, devices)
                return self._run_prepare(vm, prof, devices, drivers)

    def _check_still_prepared(self, rec: dict) -> dict:
        drift = [a for a in rec["devices"] if current_driver(self.host, a) != VFIO_DRIVER]
        if drift:
            raise HookdError(errors.STATE_DRIFT,
                             f"{rec['vm']!r} is recorded as prepared but {', '.join(drift)} "
                             f"is not on vfio-pci; run 'vfio-hookd release {rec['vm']}' first")
        log.info("already prepared; nothing to do", extra={"VM": rec["vm"], "PHASE": "prepared"})
        return rec

    def _run_prepare(self, vm, prof, devices, drivers) -> dict:
        rec = record.new(vm, devices, drivers, prof.to_dict(), [s.name for s in STEPS])
        children = {a: child_modules(self.host, a) for a in devices}
        rec["child_modules"] = children
        record.save(rec)   # nothing touched yet: a failure here is simply the answer
        started = time.monotonic()
        log.info("prepare: %s", ", ".join(f"{a} ({d or 'no driver'})" for a, d in drivers.items()),
                 extra={"VM": vm, "PHASE": "preparing"})
        for step, entry in zip(STEPS, rec["steps"]):
            slog = logging.LoggerAdapter(log, {"VM": vm, "STEP": step.name})
            ctx = self._context(vm, prof, devices, drivers, slog, children)
            t0 = time.monotonic()
            try:
                entry["facts"] = step.observe(ctx)
                entry["status"] = "applying"
                record.save(rec)   # the facts are on disk before anything changes
                step.apply(ctx, entry["facts"])
                entry.update(status="done", duration_ms=_ms(t0))
                record.save(rec)
            except Exception as exc:
                self._fail_prepare(rec, prof, step.name, entry, exc, t0)
            log.info("%s done", step.name, extra={"VM": vm, "STEP": step.name, "PHASE": "preparing",
                                                 "DURATION_MS": entry["duration_ms"]})
        rec["phase"] = "prepared"
        try:
            record.save(rec)
        except OSError as exc:
            self._fail_prepare(rec, prof, STEPS[-1].name, rec["steps"][-1], exc, time.monotonic())
        log.info("prepared in %.0f ms", _ms(started),
                 extra={"VM": vm, "PHASE": "prepared", "DURATION_MS": _ms(started)})
        return rec

    def _fail_prepare(self, rec, prof, name: str, entry: dict, exc: BaseException, t0: float):
        """Roll back after step ``name`` failed with ``exc``; raise the original error, with
        what the rollback could not undo appended."""
        vm = rec["vm"]
        err = _as_error(exc, name)
        # the step stays "applying" (held) until its partial changes are undone
        entry.update(status="applying", duration_ms=entry.get("duration_ms") or _ms(t0),
                     error=err.to_dict())
        log.error("%s failed: %s", name, err, extra={
            "VM": vm, "STEP": name, "PHASE": "preparing",
            "DURATION_MS": entry["duration_ms"], "CODE": err.code})
        rec["error"] = dict(err.to_dict(), step=name)
        rec["phase"] = "failed"
        _save_quietly(rec)
        failures = self._undo_all(rec, prof, "rollback")
        rec["release_errors"] = [dict(f.to_dict(), step=s) for s, f in failures]
        _save_quietly(rec)
        message = f"step {name}: {err.message}"
        details = dict(err.details, step=name)
        if failures:
            message += ("; rollback incomplete: " + "; ".join(f"step {s}: {f}" for s, f in failures)
                        + f". Fix it, then run 'vfio-hookd release {vm}'")
            details["rollback_errors"] = rec["release_errors"]
        raise HookdError(err.code, message, details) from None

    # ---- release ------------------------------------------------------------------------------
    def release(self, vm: str, reason: str | None = None) -> dict | None:
        """Give the host back: undo, in reverse, every step the record says is held.

        :param reason: libvirt's release reason (``destroyed``, ``failed``, ...), for the log.
        :returns: the record (phase ``idle``), or None when ``vm`` has no record.
        :raises HookdError: ``RELEASE_INCOMPLETE`` listing every undo that failed (all others
            still ran); the record then stays ``failed`` and a later release retries.
        """
        paths.check_vm_name(vm)
        with self._locked([f"vm-{vm}"]):
            rec = self._load(vm)
            if rec is None or not record.holds_host(rec):
                log.info("release%s: nothing held", f" ({reason})" if reason else "",
                         extra={"VM": vm, "PHASE": rec["phase"] if rec else "idle"})
                if rec and rec["phase"] != "idle" and rec["phase"] != "failed":
                    rec["phase"] = "idle"
                    record.save(rec)
                return rec
            from . import profile as profiles
            prof = profiles.Profile.from_dict(rec["profile"])
            with self._locked(list(rec["devices"])):
                started = time.monotonic()
                rec["phase"] = "releasing"
                rec["release_errors"] = []
                _save_quietly(rec)
                log.info("release%s", f" ({reason})" if reason else "",
                         extra={"VM": vm, "PHASE": "releasing"})
                failures = self._undo_all(rec, prof, "release")
                rec["phase"] = "failed" if failures else "idle"
                rec["release_errors"] = [dict(f.to_dict(), step=s) for s, f in failures]
                _save_quietly(rec)
                if failures:
                    raise HookdError(errors.RELEASE_INCOMPLETE, "; ".join(
                        f"step {s}: {f}" for s, f in failures) + f". Fix it, then run "
                        f"'vfio-hookd release {vm}' again",
                        {"failures": rec["release_errors"]})
                log.info("released in %.0f ms", _ms(started),
                         extra={"VM": vm, "PHASE": "idle", "DURATION_MS": _ms(started)})
                return rec

    def _undo_all(self, rec: dict, prof, why: str) -> list[tuple[str, HookdError]]:
        """Undo every held step of ``rec`` in reverse; returns ``[(step, error)]``."""
        vm = rec["vm"]
        failures = []
        for step, entry in reversed(list(zip(STEPS, rec["steps"]))):
            if entry["status"] not in record.HELD:
                continue
            slog = logging.LoggerAdapter(log, {"VM": vm, "STEP": step.name})
            ctx = self._context(vm, prof, rec["devices"], rec["drivers"], slog,
                                rec.get("child_modules"))
            keep_failed = entry["status"] == "applying" and entry.get("error") is not None
            entry["status"] = "undoing"
            _save_quietly(rec)
            t0 = time.monotonic()
            try:
                entry["notes"] = step.undo(ctx, entry["facts"])
            except Exception as exc:
                err = _as_error(exc, step.name)
                entry.update(status="undo_failed", undo_ms=_ms(t0),
                             undo_error=err.to_dict())
                failures.append((step.name, err))
                log.error("%s: undo failed: %s", why, err, extra={
                    "VM": vm, "STEP": step.name, "PHASE": rec["phase"],
                    "DURATION_MS": entry["undo_ms"], "CODE": err.code})
            else:
                entry.update(status="failed" if keep_failed else "undone", undo_ms=_ms(t0))
                for note in entry["notes"]:
                    log.info("%s: %s", step.name, note, extra={"VM": vm, "STEP": step.name})
                log.info("%s: %s undone", why, step.name, extra={
                    "VM": vm, "STEP": step.name, "PHASE": rec["phase"],
                    "DURATION_MS": entry["undo_ms"]})
            _save_quietly(rec)
        return failures

    # ---- status -------------------------------------------------------------------------------
    def _load(self, vm: str) -> dict | None:
        try:
            return record.load(vm)
        except ValueError as exc:
            raise HookdError(errors.STATE_DRIFT, f"{exc}; move it away to start afresh") from None

    def status(self, vm: str | None = None) -> dict:
        """``{"vms": {NAME: {"phase", "steps": [{"name", "status", "duration_ms", "undo_ms",
        "error", "notes"}], "devices": [{"address", "driver"}], "error", "release_errors"}}}``.

        :raises HookdError: ``VM_NAME_INVALID``; ``NOT_MANAGED`` when ``vm`` has neither a
            record nor a profile.
        """
        return status_from_records(self.host, vm)


def status_from_records(host: Host, vm: str | None = None) -> dict:
    """The status document built from the records on disk and the host's current drivers
    (works without the daemon). Shape: see :meth:`Machine.status`."""
    from . import profile as profiles
    names = [paths.check_vm_name(vm)] if vm else record.all_names()
    out: dict = {}
    for name in names:
        try:
            rec = record.load(name)
        except ValueError as exc:
            out[name] = {"phase": "unknown", "steps": [], "devices": [], "error":
                         {"code": errors.STATE_DRIFT, "message": str(exc)}}
            continue
        if rec is None:
            where = paths.Paths.from_env()
            if not profiles.is_managed(where, name):
                raise HookdError(errors.NOT_MANAGED, f"{name!r} has no profile "
                                                     f"({where.profile_path(name)}) and no record")
            out[name] = {"phase": "idle", "steps": [], "devices": [], "error": None,
                         "release_errors": []}
            continue
        steps = []
        for s in rec["steps"]:
            err = s.get("undo_error") or s.get("error")
            steps.append({"name": s["name"], "status": s["status"],
                          "duration_ms": s["duration_ms"], "undo_ms": s.get("undo_ms"),
                          "error": f"{err['code']}: {err['message']}" if err else None,
                          "notes": s.get("notes", [])})
        out[name] = {
            "phase": rec["phase"], "updated": rec.get("updated"), "steps": steps,
            "devices": [{"address": a, "driver": current_driver(host, a),
                         "driver_before": rec["drivers"].get(a)} for a in rec["devices"]],
            "error": rec.get("error"), "release_errors": rec.get("release_errors", []),
        }
    return {"vms": out}


def _save_quietly(rec: dict) -> None:
    """Save ``rec``; on failure log it and go on (an undo must not stop because /run is full:
    giving the host back comes first)."""
    try:
        record.save(rec)
    except OSError as exc:
        log.error("cannot write the record: %s", exc, extra={"VM": rec["vm"]})


def _as_error(exc: BaseException, step: str) -> HookdError:
    if isinstance(exc, HookdError):
        return exc
    if isinstance(exc, OSError):
        return HookdError(errors.HOST_IO, f"{exc}")
    log.exception("bug in step %s", step, extra={"STEP": step})
    return HookdError(errors.INTERNAL, f"{type(exc).__name__}: {exc} (a bug; see the daemon log)")


def _default_systemd():
    from .systemd import Systemd
    return Systemd()
