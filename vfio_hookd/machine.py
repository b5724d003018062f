"""The per-VM state machine: run a plan (:mod:`vfio_hookd.plan`): prepare (fail closed),
release (from the record alone).

Phases (record ``phase``): ``idle -> preparing -> prepared -> releasing -> idle``; a prepare that
fails rolls back and ends ``failed`` (with ``error``); a release with failed undos ends
``failed`` too (with ``release_errors``), and a later release retries what is still held.

Rules (DEVELOPERS.md):
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

import logging
import threading
import time
from typing import Callable

from . import desktop, errors, pci
from . import plan as plans
from .errors import HookdError
from .host import Host
from .inhibitors import Inhibitors
from .locks import Locks
from .paths import Paths, check_vm_name
from .plan import Plan
from .record import HELD, Record, RecordStore, StepEntry
from .steps import BY_NAME, STEPS, Context

log = logging.getLogger("vfio_hookd")


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


class Machine:
    """Plans and runs prepare/release for VMs on one host.

    :param host: the :class:`~vfio_hookd.host.Host` to act on.
    :param paths: the :class:`~vfio_hookd.paths.Paths` (profiles, records, locks).
    :param systemd_factory: zero-argument callable returning a
        :class:`~vfio_hookd.systemd.Systemd` (or an object with its interface); called at most
        once, on first use.
    :param lock_timeout_s: how long a request waits for another one on the same VM/device (s).
    :param holders_grace_s: how long (s) holders may take to exit by themselves with
        ``on_busy: fail`` (the session of a display manager just stopped may still be ending).
    :param logind_factory: zero-argument callable returning a
        :class:`~vfio_hookd.logind.Logind` (default: logind on the system bus, users'
        instances under the host's ``/run/user``); called at most once.
    """

    def __init__(self, host: Host, paths: Paths, systemd_factory: Callable[[], object] | None = None,
                 lock_timeout_s: float = 600.0, holders_grace_s: float = 2.0,
                 logind_factory: Callable[[], object] | None = None):
        self.host = host
        self.paths = paths
        self.records = RecordStore(paths)
        self._systemd_factory = systemd_factory or _default_systemd
        self._systemd = None
        self._systemd_lock = threading.Lock()
        self._logind_factory = logind_factory or (lambda: _default_logind(host))
        self._logind = None
        self._lockset = Locks(paths.locks_dir, lock_timeout_s)
        self.lock_timeout_s = lock_timeout_s
        self.holders_grace_s = holders_grace_s
        self.inhibitors = Inhibitors()   # the inhibitor locks' descriptors: the process's own

    # ---- helpers ------------------------------------------------------------------------------
    def systemd(self):
        """The shared systemd client (created on first use)."""
        with self._systemd_lock:
            if self._systemd is None:
                self._systemd = self._systemd_factory()
            return self._systemd

    def logind(self):
        """The shared logind client (created on first use)."""
        with self._systemd_lock:
            if self._logind is None:
                self._logind = self._logind_factory()
            return self._logind

    def _locked(self, keys: list[str]):
        """:meth:`vfio_hookd.locks.Locks.held` for ``keys``."""
        return self._lockset.held(keys)

    def _context(self, rec: Record, prof, deadlines, logger, cpus: dict | None = None) -> Context:
        return Context(vm=rec.vm, host=self.host, profile=prof, deadlines=deadlines,
                       devices=tuple(rec.devices), drivers=dict(rec.drivers),
                       systemd=self.systemd, log=logger,
                       child_modules=dict(rec.child_modules),
                       holders_grace_s=self.holders_grace_s,
                       stopped_units=tuple(_stopped_units(rec)), logind=self.logind, cpus=cpus,
                       inhibitors=self.inhibitors)

    def _save(self, rec: Record) -> None:
        """Save ``rec``; on failure log it and go on (an undo must not stop because /run is
        full: giving the host back comes first)."""
        try:
            self.records.save(rec)
        except (OSError, HookdError) as exc:   # HookdError: UNTRUSTED_FILE (run directory)
            log.error("cannot write the record: %s", exc, extra={"VM": rec.vm})

    # ---- plans --------------------------------------------------------------------------------
    def plan_prepare(self, vm: str, xml: str | None = None, profile=None) -> Plan:
        """:func:`vfio_hookd.plan.plan_prepare` on this machine's host and paths."""
        return plans.plan_prepare(self.host, self.paths, check_vm_name(vm), xml, profile)

    def plan_release(self, vm: str) -> Plan:
        """:func:`vfio_hookd.plan.plan_release` from ``vm``'s record.

        :raises HookdError: ``RECORD_INVALID``, ``UNTRUSTED_FILE``, ``VM_NAME_INVALID``.
        """
        return plans.plan_release(self.records.load(check_vm_name(vm)), vm)

    def run(self, plan: Plan, reason: str | None = None) -> Record | None:
        """Carry out ``plan`` (from :meth:`plan_prepare` or :meth:`plan_release`).

        :param reason: why a release runs (``cli``, ``daemon restart``, ...), for the log.
        :returns: the record (prepare: phase ``prepared``; release: ``idle``; None when a
            release found no record).
        :raises HookdError: see :meth:`prepare` and :meth:`release`.
        """
        if plan.op == "prepare":
            return self._prepare(plan)
        return self._release(plan.vm, reason)

    def prepare(self, vm: str, xml: str | None = None, profile=None) -> Record:
        """Plan and take the host into passthrough state for ``vm``.

        :param xml: the domain XML (needed for ``devices: auto``).
        :param profile: the profile, if the caller has read it already.
        :returns: the record in phase ``prepared``.
        :raises HookdError: a planning error (host untouched), ``DEVICE_CLAIMED``,
            ``STATE_DRIFT``, ``RECORD_INVALID``, or the failing step's error after the rollback.
        """
        return self._prepare(self.plan_prepare(vm, xml, profile))

    def release(self, vm: str, reason: str | None = None) -> Record | None:
        """Give the host back: undo, in reverse, every step the record says is held.

        :param reason: why (``cli``, ``daemon restart``, ...), for the log.
        :returns: the record (phase ``idle``), or None when ``vm`` has no record.
        :raises HookdError: ``RELEASE_INCOMPLETE`` listing every undo that failed (all others
            still ran; the record then stays ``failed`` and a later release retries);
            ``RECORD_INVALID`` for a record that cannot be read, ``UNTRUSTED_FILE`` for one
            that someone besides root owns or may write (nothing is touched).
        """
        return self._release(check_vm_name(vm), reason)

    # ---- prepare ------------------------------------------------------------------------------
    def _refuse_if_stuck(self, devices) -> None:
        """:func:`vfio_hookd.pci.refuse_if_stuck` on this host."""
        pci.refuse_if_stuck(self.host, devices)

    def _prepare(self, plan: Plan) -> Record:
        vm, devices = plan.vm, plan.devices
        self._refuse_if_stuck(devices)
        with self._locked([f"vm-{vm}"]):
            with self._locked(list(devices)):
                rec = self.records.load(vm)
                if rec and rec.phase == "prepared":
                    return self._check_still_prepared(rec)
                if rec and rec.holds_host:
                    raise HookdError(errors.STATE_DRIFT,
                                     f"the record of {vm!r} says a previous run left changes on "
                                     f"the host (phase {rec.phase}); run 'vfio-hookd release "
                                     f"{vm}' first")
                self._check_claims(vm, devices)
                # the host's drivers as they are now, under the locks
                return self._run_prepare(self._new_record(plan), plan)

    def _new_record(self, plan: Plan) -> Record:
        """A fresh record for ``plan`` with the functions' drivers as they are now."""
        devices = plan.devices
        return Record.new(plan.vm, devices, {a: pci.current_driver(self.host, a) for a in devices},
                          plan.deadlines.to_dict(), [s.name for s in STEPS],
                          {a: pci.child_modules(self.host, a) for a in devices},
                          plan.profile.to_dict())

    def observe(self, plan: Plan) -> list[tuple[str, dict]]:
        """What a prepare of ``plan`` would do now: ``[(step name, facts)]``, each step's
        :meth:`~vfio_hookd.steps.Step.observe` on the context the prepare builds (nothing is
        applied, no lock is taken, no record is written: ``vfio-hookd plan``).

        :raises HookdError: what an observe raises (e.g. ``SYSTEMD_UNAVAILABLE``).
        """
        rec = self._new_record(plan)
        return [(step.name, step.observe(self._context(rec, plan.profile, plan.deadlines, log,
                                                       plan.cpus)))
                for step in STEPS]

    def _check_claims(self, vm: str, devices) -> None:
        for other, rec in self.records.load_all().items():
            if other == vm or not isinstance(rec, Record) or not rec.holds_host:
                continue
            shared = sorted(set(rec.devices) & set(devices))
            if shared:
                raise HookdError(errors.DEVICE_CLAIMED,
                                 f"{', '.join(shared)} is held by VM {other!r} "
                                 f"(phase {rec.phase}); stop it or run "
                                 f"'vfio-hookd release {other}'", {"vm": other})

    def _check_still_prepared(self, rec: Record) -> Record:
        drift = [a for a in rec.devices if pci.current_driver(self.host, a) != pci.VFIO_DRIVER]
        if drift:
            raise HookdError(errors.STATE_DRIFT,
                             f"{rec.vm!r} is recorded as prepared but {', '.join(drift)} "
                             f"is not on vfio-pci; run 'vfio-hookd release {rec.vm}' first")
        log.info("already prepared; nothing to do", extra={"VM": rec.vm, "PHASE": "prepared"})
        return rec

    def _run_prepare(self, rec: Record, plan: Plan) -> Record:
        vm = rec.vm
        desktop.record_snapshot(self, rec, plan.profile)   # what release must give back
        self.records.save(rec)   # nothing touched yet: a failure here is simply the answer
        started = time.monotonic()
        log.info("prepare: %s", ", ".join(f"{a} ({d or 'no driver'})"
                                          for a, d in rec.drivers.items()),
                 extra={"VM": vm, "PHASE": "preparing"})
        for step, entry in zip(STEPS, rec.steps):
            slog = logging.LoggerAdapter(log, {"VM": vm, "STEP": step.name})
            ctx = self._context(rec, plan.profile, plan.deadlines, slog, plan.cpus)
            t0 = time.monotonic()
            try:
                entry.facts = step.observe(ctx)
                for warning in entry.facts.get("warnings", []):
                    slog.warning("%s", warning)
                entry.status = "applying"
                self.records.save(rec)   # the facts are on disk before anything changes
                step.apply(ctx, entry.facts)
                entry.status, entry.duration_ms = "done", _ms(t0)
                self.records.save(rec)
            except Exception as exc:
                self._fail_prepare(rec, step.name, entry, exc, t0)
            log.info("%s done", step.name, extra={"VM": vm, "STEP": step.name, "PHASE": "preparing",
                                                 "DURATION_MS": entry.duration_ms})
        rec.phase = "prepared"
        try:
            self.records.save(rec)
        except (OSError, HookdError) as exc:
            self._fail_prepare(rec, STEPS[-1].name, rec.steps[-1], exc, time.monotonic())
        log.info("prepared in %.0f ms", _ms(started),
                 extra={"VM": vm, "PHASE": "prepared", "DURATION_MS": _ms(started)})
        return rec

    def _fail_prepare(self, rec: Record, name: str, entry: StepEntry, exc: BaseException,
                      t0: float):
        """Roll back after step ``name`` failed with ``exc``; raise the original error, with
        what the rollback could not undo appended."""
        vm = rec.vm
        err = _as_error(exc, name)
        # the step stays "applying" (held) until its partial changes are undone
        entry.status = "applying"
        entry.duration_ms = entry.duration_ms or _ms(t0)
        entry.error = err.to_dict()
        log.error("%s failed: %s", name, err, extra={
            "VM": vm, "STEP": name, "PHASE": "preparing",
            "DURATION_MS": entry.duration_ms, "CODE": err.code})
        rec.error = dict(err.to_dict(), step=name)
        rec.phase = "failed"
        self._save(rec)
        failures = self._undo_all(rec, "rollback")
        rec.release_errors = [dict(f.to_dict(), step=s) for s, f in failures]
        self._save(rec)
        message = f"step {name}: {err.message}"
        details = dict(err.details, step=name)
        if not failures and desktop.record_check(self, rec, "rollback")["check"] == "missing":
            message += f"; after the rollback the desktop is not back: missing " \
                       f"{'; '.join(rec.desktop_check['missing'])}"
        if failures:
            message += ("; rollback incomplete: " + "; ".join(f"step {s}: {f}" for s, f in failures)
                        + f". Fix it, then run 'vfio-hookd release {vm}'")
            details["rollback_errors"] = rec.release_errors
        raise HookdError(err.code, message, details) from None

    # ---- release ------------------------------------------------------------------------------
    def _release(self, vm: str, reason: str | None) -> Record | None:
        why = f" ({reason})" if reason else ""
        with self._locked([f"vm-{vm}"]):
            rec = self.records.load(vm)
            if rec is None or not rec.holds_host:
                log.info("release%s: nothing held", why,
                         extra={"VM": vm, "PHASE": rec.phase if rec else "idle"})
                if rec and rec.phase not in ("idle", "failed"):
                    rec.phase = "idle"
                    self.records.save(rec)
                return rec
            self._refuse_if_stuck(rec.devices)
            with self._locked(list(rec.devices)):
                started = time.monotonic()
                rec.phase = "releasing"
                rec.release_errors = []
                self._save(rec)
                log.info("release%s", why, extra={"VM": vm, "PHASE": "releasing"})
                failures = self._undo_all(rec, "release")
                rec.phase = "failed" if failures else "idle"
                rec.release_errors = [dict(f.to_dict(), step=s) for s, f in failures]
                self._save(rec)
                if failures:
                    raise HookdError(errors.RELEASE_INCOMPLETE, "; ".join(
                        f"step {s}: {f}" for s, f in failures) + f". Fix it, then run "
                        f"'vfio-hookd release {vm}' again",
                        {"failures": rec.release_errors})
                log.info("released in %.0f ms", _ms(started),
                         extra={"VM": vm, "PHASE": "idle", "DURATION_MS": _ms(started)})
                if desktop.record_check(self, rec, "release")["check"] == "missing":
                    raise desktop.not_back_error(vm, rec.desktop_check)
                return rec

    def _undo_all(self, rec: Record, why: str) -> list[tuple[str, HookdError]]:
        """Undo every held step of ``rec`` in reverse, from the record alone (its devices,
        drivers, deadlines and facts); returns ``[(step, error)]``."""
        from .profile import Deadlines
        deadlines = Deadlines.from_record(rec.deadlines)
        failures = []
        for entry in reversed(rec.steps):
            if entry.status not in HELD:
                continue
            step = BY_NAME.get(entry.name)
            if step is None:   # a step this version does not know: say so, keep going
                err = HookdError(errors.RECORD_INVALID, f"step {entry.name!r} of the record is "
                                 f"unknown to this vfio-hookd; undo it by hand")
                entry.status, entry.undo_error = "undo_failed", err.to_dict()
                failures.append((entry.name, err))
                continue
            slog = logging.LoggerAdapter(log, {"VM": rec.vm, "STEP": step.name})
            ctx = self._context(rec, None, deadlines, slog)
            keep_failed = entry.status == "applying" and entry.error is not None
            entry.status = "undoing"
            self._save(rec)
            t0 = time.monotonic()
            try:
                entry.notes = step.undo(ctx, entry.facts)
            except Exception as exc:
                err = _as_error(exc, step.name)
                entry.status, entry.undo_ms, entry.undo_error = "undo_failed", _ms(t0), err.to_dict()
                failures.append((step.name, err))
                log.error("%s: undo failed: %s", why, err, extra={
                    "VM": rec.vm, "STEP": step.name, "PHASE": rec.phase,
                    "DURATION_MS": entry.undo_ms, "CODE": err.code})
            else:
                entry.status = "failed" if keep_failed else "undone"
                entry.undo_ms = _ms(t0)
                for note in entry.notes:
                    log.info("%s: %s", step.name, note, extra={"VM": rec.vm, "STEP": step.name})
                log.info("%s: %s undone", why, step.name, extra={
                    "VM": rec.vm, "STEP": step.name, "PHASE": rec.phase,
                    "DURATION_MS": entry.undo_ms})
            self._save(rec)
        return failures

    # ---- status -------------------------------------------------------------------------------
    def status(self, vm: str | None = None) -> dict:
        """The status document (:func:`vfio_hookd.status.status_from_records`), with the
        inhibitor locks this process holds."""
        from .status import status_from_records
        return status_from_records(self.host, self.paths, vm, self.inhibitors)


def _stopped_units(rec: Record) -> list[str]:
    """The units the units step of ``rec`` has stopped so far."""
    for s in rec.steps:
        if s.name == "units":
            return list(s.facts.get("done", []))
    return []


def _as_error(exc: BaseException, step: str) -> HookdError:
    if isinstance(exc, HookdError):
        return exc
    if isinstance(exc, OSError):
        return HookdError(errors.HOST_IO, f"{exc}")
    log.exception("bug in step %s", step, extra={"STEP": step})
    return HookdError(errors.INTERNAL, f"{type(exc).__name__}: {exc} (a bug; see the daemon log)")


def _default_logind(host: Host):
    from .logind import Logind
    return Logind(run_user=host.path("/run/user"))


def _default_systemd():
    from .systemd import Systemd
    return Systemd()
