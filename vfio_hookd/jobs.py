"""Waiting for systemd jobs (``org.freedesktop.systemd1(5)``, FIELD-NOTES §3): the
``JobRemoved`` watch of one connection (:class:`JobWatch`) and the outcome of a batch of jobs
awaited together (:func:`outcome`), for :mod:`vfio_hookd.systemd`.

A batch is what ``systemctl stop A B`` does (systemd's ``systemctl-start-unit.c``): one
``StopUnit``/``StartUnit`` call per unit, every job enqueued before any is awaited, then all
awaited; systemd itself orders the jobs by the units' ``After=``/``Before=``
(``systemd.unit(5)``: stop jobs in the reverse of the start order, a stop before a start), so
the batch costs about its slowest chain, not the sum.

systemd orders a job only after jobs that are already queued (``job_is_runnable()`` in
``src/core/job.c``), and it runs a runnable job from its run queue as soon as its event loop is
idle, which it is between two method calls. So a job queued first runs at once even when a unit
queued later should go before it, ``systemctl stop A B`` included. :func:`enqueue_order`
therefore queues the jobs in the order the units' ``After=`` asks for (for stops, the unit that
is ``After=`` the other first): each job that must wait then finds the job it waits for
queued. GLib is imported when a watch is made.
"""

from __future__ import annotations

import collections
import threading
import time

from .errors import TIMEOUT, UNIT_FAILED, HookdError
from .gdbus import iterate


class JobWatch:
    """Every ``JobRemoved(id, job, unit, result)`` of one connection, for its lifetime: one
    subscription on a GLib main context of its own, iterated by one daemon thread that blocks
    in ``poll(2)`` between signals. :meth:`wait_all` is a condition-variable wait with a
    deadline; a result that came before anyone waited for it (even before the method reply
    that returned the job path) is kept (the last :attr:`KEEP`).

    :param bus: the pydbus bus of the connection (already ``Subscribe()``d).
    :param sender: the bus name of the manager (systemd's, also a user instance's on its bus).
    """

    KEEP = 1024   #: recent results kept (other clients' jobs end too; ours are taken out)

    def __init__(self, bus, sender: str = "org.freedesktop.systemd1"):
        from gi.repository import GLib

        self._cv = threading.Condition()
        self._removed: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._stopping = False
        self._ctx = GLib.MainContext.new()
        self._ctx.push_thread_default()
        try:
            self._sub = bus.subscribe(sender=sender, iface="org.freedesktop.systemd1.Manager",
                                      signal="JobRemoved", object="/org/freedesktop/systemd1",
                                      signal_fired=self._on_removed)
        finally:
            self._ctx.pop_thread_default()
        threading.Thread(target=self._run, name="systemd JobRemoved", daemon=True).start()

    def _on_removed(self, _sender, _path, _iface, _signal, params) -> None:
        _id, job_path, _unit, result = params
        with self._cv:
            self._removed[job_path] = result
            while len(self._removed) > self.KEEP:
                self._removed.popitem(last=False)
            self._cv.notify_all()

    def _run(self) -> None:
        iterate(self._ctx, lambda: self._stopping)

    def wait(self, job: str, deadline: float) -> str | None:
        """The result (``done``, ``failed``, ...) of ``job`` (object path) once its
        ``JobRemoved`` came, or None at ``deadline`` (monotonic s)."""
        return self.wait_all([job], deadline).get(job)

    def wait_all(self, jobs, deadline: float) -> dict[str, str]:
        """``{job path: result}`` once every job of ``jobs`` has ended, or at ``deadline``
        (monotonic s) those that have: a job missing from the answer is still queued."""
        want = set(jobs)
        with self._cv:
            self._cv.wait_for(lambda: want <= self._removed.keys(),
                              timeout=max(0.0, deadline - time.monotonic()))
            return {j: self._removed.pop(j) for j in want if j in self._removed}

    def close(self) -> None:
        """Unsubscribe and end the thread."""
        self._stopping = True
        try:
            self._sub.unsubscribe()
        except Exception:  # the connection is already gone
            pass
        self._ctx.wakeup()


def enqueue_order(units: list[str], after: dict[str, set], stop: bool) -> list[str]:
    """``units`` (unit ids, duplicates dropped) in the order to queue their jobs: for starts
    a unit after every unit of the batch it is ``After=``, for stops before them (stops run
    in the reverse order, ``systemd.unit(5)``); otherwise the given order. An ordering cycle
    falls back to the given order where it is.

    :param after: ``{unit: set of unit ids}``, each unit's ``After`` property (systemd lists
        there the reverse of every ``Before=`` pointing at the unit too).
    :param stop: True for stop jobs, False for start jobs.
    """
    left = list(dict.fromkeys(units))
    out = []
    while left:
        def waits(u: str) -> bool:   # another unit of the batch must be queued before u
            if stop:
                return any(u in after.get(v, ()) for v in left if v != u)
            return any(v in after.get(u, ()) for v in left if v != u)
        pick = next((u for u in left if not waits(u)), left[0])
        out.append(pick)
        left.remove(pick)
    return out


def outcome(verb: str, jobs: dict[str, str], results: dict[str, str],
            refused: list[HookdError], timeout_s: float) -> dict[str, str]:
    """The answer to a batch: ``{unit: "done"}`` for every unit, or one :class:`HookdError`
    naming every unit that did not end ``done``.

    :param verb: ``"stopping"`` / ``"starting"`` (for messages).
    :param jobs: ``{unit: job path}`` of the jobs systemd queued.
    :param results: ``{job path: result}`` from :meth:`JobWatch.wait_all`.
    :param refused: the errors of the calls systemd refused (``NoSuchUnit``, ...), in order.
    :param timeout_s: the batch's deadline (s), for the message.
    :raises HookdError: ``UNIT_FAILED`` if a call was refused or a job ended other than
        ``done`` (``canceled``, ``timeout``, ``failed``, ``dependency``, ``skipped``):
        "stopping gdm.service: job result failed" for each such unit, joined by ``; ``;
        else ``TIMEOUT`` "stopping a.service, b.service: jobs J1, J2 did not end within S s"
        naming the units whose jobs are still queued (they stay queued in systemd). A
        failure names the pending units too. ``details``: ``results`` (``{unit: result,
        "pending" or "refused"}``); for one failed unit also its ``unit``, ``job``, ``result``.
    """
    per_unit = {u: results.get(j, "pending") for u, j in jobs.items()}
    errs = list(refused)
    for unit, result in per_unit.items():
        if result not in ("done", "pending"):
            errs.append(HookdError(UNIT_FAILED, f"{verb} {unit}: job result {result}",
                                   {"unit": unit, "job": jobs[unit], "result": result}))
    pending = [u for u, r in per_unit.items() if r == "pending"]
    if pending:
        paths = ", ".join(jobs[u] for u in pending)
        errs.append(HookdError(TIMEOUT, f"{verb} {', '.join(pending)}: job"
                               f"{'s' if len(pending) > 1 else ''} {paths} did not end within "
                               f"{timeout_s:g} s", {"unit": pending[0], "job": jobs[pending[0]]}
                               if len(pending) == 1 else {"units": pending}))
    if not errs:
        return per_unit
    code = UNIT_FAILED if any(e.code != TIMEOUT for e in errs) else TIMEOUT
    details = dict(errs[0].details) if len(errs) == 1 else {}
    details["results"] = dict(per_unit, **{e.details["unit"]: "refused" for e in refused
                                           if "unit" in e.details})
    raise HookdError(code, "; ".join(e.message for e in errs), details)
