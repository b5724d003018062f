"""The inhibit step: a systemd-logind ``block`` inhibitor lock on sleep (and idle) while the VM
holds the GPU."""

from __future__ import annotations

import os

from .. import errors
from ..errors import HookdError
from .base import Context, Shape, Step

#: ``who`` of the lock (``systemd-inhibit --list``).
WHO = "vfio-hookd"
#: ``block``: the operation is refused while the lock is held (``delay`` would only postpone
#: it); root may still override it (``systemctl suspend -i``), as systemd.io "Inhibitor Locks"
#: says of every block lock.
MODE = "block"


def why(vm: str, devices) -> str:
    """``why`` of ``vm``'s lock, naming the VM and its functions."""
    return (f"VM {vm} holds the GPU ({', '.join(devices)}) on vfio-pci; a host that sleeps "
            f"under a passed-through GPU rarely wakes well")


class Inhibit(Step):
    """Hold a logind inhibitor lock from the start of the prepare until the end of the release,
    so the host does not suspend (or, with ``idle``, run logind's ``IdleAction``) under the VM.
    First in prepare order (the host cannot suspend mid-prepare), so last in release.

    Profile ``inhibit``: ``none`` (the default: the step records an empty plan and does
    nothing), ``sleep``, ``idle`` or a list of them.

    Apply: ``Manager.Inhibit(what, "vfio-hookd", why, "block")`` (``org.freedesktop.login1(5)``,
    systemd.io "Inhibitor Locks", :meth:`vfio_hookd.logind.Logind.inhibit`) returns a
    descriptor; the lock lasts while it is open. The descriptor stays in this process's
    registry (:class:`vfio_hookd.inhibitors.Inhibitors`, ``ctx.inhibitors``), never in the
    record; the record's facts say what was taken, so a release (and a daemon that starts
    again, :func:`vfio_hookd.steps.inhibit.retake_all`) works from the record alone.
    Logind not running, a refusal or no answer fails the prepare with ``INHIBIT_FAILED``.

    Undo: close the descriptor. If this process does not hold it (the daemon that took it
    ended: the kernel closed the descriptor and logind dropped the lock then), undo is a no-op
    with a note. Nothing waits in either direction but the one ``Inhibit`` call (at most
    :data:`vfio_hookd.logind.INHIBIT_CALL_S`). A process that is not the daemon (``vfio-hookd
    prepare`` without one) holds the lock only while it runs; the daemon takes it again when
    it starts. Measured: 2-15 ms on the simulated host over D-Bus; 166 ms under systemd 252's
    logind in the TCG guest; the undo under 10 ms.

    Facts: ``{"plan": [{"what", "who", "why", "mode"}] (empty: off), "done": [...],
    "since": UTC time taken, "pid": the process that took it}``.
    """
    name = "inhibit"

    def observe(self, ctx: Context) -> dict:
        kinds = ctx.profile.inhibit
        if not kinds:
            return {"plan": [], "skipped": ["inhibit: none in the profile"]}
        what = ":".join(kinds)
        return {"plan": [{"what": what, "who": WHO, "why": why(ctx.vm, ctx.devices),
                          "mode": MODE}],
                "why": {f"{what} ({MODE})": "inhibit in the profile"}}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = list(facts["plan"])   # before the call: a rollback closes what came
        for lock in facts["done"]:
            held = self.take(ctx, lock)
            facts["since"], facts["pid"] = held.since, os.getpid()

    @staticmethod
    def take(ctx: Context, lock: dict):
        """Take ``lock`` (``{"what", "who", "why", "mode"}``) from logind and keep its
        descriptor in ``ctx.inhibitors`` for ``ctx.vm``; returns the
        :class:`vfio_hookd.inhibitors.Held`.

        :raises HookdError: ``INHIBIT_FAILED``.
        """
        if ctx.logind is None:
            raise HookdError(errors.INHIBIT_FAILED, "no logind client: no inhibitor lock")
        fd = ctx.logind().inhibit(lock["what"], lock["who"], lock["why"], lock["mode"])
        try:
            return ctx.inhibitors.hold(ctx.vm, fd, lock["what"], lock["who"], lock["why"],
                                       lock["mode"])
        except BaseException:
            os.close(fd)
            raise

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        locks = self.undo_items(facts)
        if not locks or "pid" not in facts:   # off, or logind never gave the lock
            ctx.inhibitors.release(ctx.vm)
            return []
        if ctx.inhibitors.release(ctx.vm) is not None:
            return []
        what = ", ".join(lock["what"] for lock in locks)
        return [f"the {what} inhibitor lock is not held by this process (PID {os.getpid()}): "
                f"the process that took it (PID {facts.get('pid', '?')}) has ended, and logind "
                f"dropped the lock with it; nothing to close"]

    def max_apply_s(self, profile, shape: Shape) -> float:
        """One ``Inhibit`` call: :data:`vfio_hookd.logind.INHIBIT_CALL_S` (s), 0 when off."""
        from ..logind import INHIBIT_CALL_S
        return INHIBIT_CALL_S if profile.inhibit else 0.0

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """0 s: closing a descriptor waits for nothing (logind notices the close itself)."""
        return 0.0


def retake_all(machine, log) -> dict[str, str | None]:
    """Take the lock again for every VM whose record is ``prepared`` with its inhibit step
    held: a daemon that starts (after a restart or a crash) holds no descriptor, and logind
    dropped the old daemon's locks when its descriptors closed. The daemon calls it before it
    serves. Each lock taken is logged, the record's ``since``/``pid`` updated; a failure is
    logged and noted in ``machine.inhibitors`` (``status`` shows it), never fatal.

    :param machine: the :class:`vfio_hookd.machine.Machine` (its records, logind client and
        inhibitor registry). :param log: the logger.
    :returns: ``{vm: None (taken) or the error (str)}`` for each VM it tried.
    """
    out: dict[str, str | None] = {}
    for vm, rec in machine.records.load_all().items():
        if isinstance(rec, HookdError) or rec.phase != "prepared":
            continue
        entry = next((s for s in rec.steps if s.name == Inhibit.name), None)
        if entry is None or not entry.held or not entry.facts.get("done"):
            continue
        ctx = Context(vm=vm, host=machine.host, profile=None, deadlines=None,
                      devices=tuple(rec.devices), drivers=dict(rec.drivers),
                      systemd=machine.systemd, logind=machine.logind,
                      inhibitors=machine.inhibitors)
        extra = {"VM": vm, "STEP": Inhibit.name, "PHASE": rec.phase}
        try:
            for lock in entry.facts["done"]:
                held = Inhibit.take(ctx, lock)
                entry.facts["since"], entry.facts["pid"] = held.since, os.getpid()
                log.info("inhibitor lock %s (%s) taken again at the daemon's start",
                         lock["what"], lock["mode"], extra=extra)
        except Exception as exc:   # noqa: BLE001 -- never fatal to the daemon's start
            err = exc if isinstance(exc, HookdError) else HookdError(
                errors.INHIBIT_FAILED, f"{type(exc).__name__}: {exc} (a bug; see the log)")
            if not isinstance(exc, HookdError):
                log.exception("taking the inhibitor lock again", extra=extra)
            machine.inhibitors.failed(vm, str(err))
            log.error("could not take the inhibitor lock again: %s", err,
                      extra=dict(extra, CODE=err.code))
            out[vm] = str(err)
            continue
        out[vm] = None
        try:
            machine.records.save(rec)
        except OSError as exc:
            log.error("cannot write the record: %s", exc, extra=extra)
    return out
