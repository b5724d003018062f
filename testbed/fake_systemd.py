"""An in-process fake of vfio-hookd's systemd client, for the fast tests: no ``dbus-daemon``.

:class:`FakeSystemd` has the interface of :class:`vfio_hookd.systemd.Systemd` (``connect``,
``close``, ``resolve``, ``active_state``, ``shutting_down``, ``list_units``, ``stop``,
``start``, ``stop_all``, ``start_all``, ``allowed_cpus``, ``set_allowed_cpus``, context manager) with the same results and the same errors (:class:`HookdError`
with ``UNIT_FAILED`` "unit X not found" / "stopping X: job result failed", ``TIMEOUT``
"stopping X: job J did not end within S s"), and is both that client and the systemd it talks
to. Give it to the state machine: ``Machine(host, paths, systemd_factory=lambda: fake)``.

It runs the same unit model as the simulated systemd on D-Bus (:mod:`testbed.sim.units`): units
from ``<state_root>/.sim/units.json``, states written to ``units-state.json``, each active unit
with ``holds`` a real process holding those nodes of the simulated host (so the holders step
still finds real holders), fault rules ``stop``/``start``, the per-unit latencies
(``stop_s``/``start_s``, else ``unit_stop``/``unit_start`` of :mod:`testbed.sim.faults`), the
units' ordering and the job log (:mod:`testbed.sim.units`). Jobs follow the same rules
(:mod:`testbed.sim.systemd`): jobs of different units run concurrently unless ordered; a stop
sends SIGTERM and ends once the process has exited and the latency has passed; a start waits
the latency, then starts the process, and fails when none of its holds exists; ``fail`` ends a
job ``failed``, ``hang`` never ends it; a job of the other type replaces a pending one
(``canceled``), one of the same type is merged. Jobs run in background threads, so a job that
outlives its caller's deadline goes on, as in systemd. :meth:`FakeSystemd.stop_all` /
``start_all`` queue every job before awaiting any, as the real client does.

:meth:`FakeSystemd.kill_all` ends the unit processes (tests call it at teardown; ``close`` only
closes "the connection", as for the real client). :meth:`FakeSystemd.set_system_state` stands
for the D-Bus fake's ``SetSystemState`` (``"stopping"``: a shutdown in progress).

``AllowedCPUs`` of ``system.slice``, ``user.slice``, ``init.scope`` (and ``machine.slice``) is
:mod:`testbed.sim.cpus`' state, shared with the D-Bus fake; ``set_allowed_cpus`` meets the
``set_property`` fault rules (``fail``: systemd's error, ``hang``: no answer until the
caller's deadline) and waits the ``set_property`` latency.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from vfio_hookd import cpus as cpulist
from vfio_hookd.errors import TIMEOUT, UNIT_FAILED, HookdError
from vfio_hookd.jobs import enqueue_order, outcome

from .procs import stop as stop_process
from testbed.sim import cpus as simcpus
from testbed.sim import units as model

JOB_PREFIX = "/org/freedesktop/systemd1/job/"


class _Job:
    def __init__(self, jid: int, unit: model.Unit, jtype: str):
        self.id = jid
        self.path = f"{JOB_PREFIX}{jid}"
        self.unit = unit
        self.type = jtype                  # "start" | "stop"
        self.state = "waiting"             # "waiting" (ordered after another job) | "running"
        self.rule: dict | None = None      # the fault rule it met when queued
        self.waiting: set[str] = set()     # what a running stop still waits for
        self.result: str | None = None
        self.ended = threading.Event()


class FakeSystemd:
    """The fake manager and its client in one object (module docstring). Thread-safe.

    :param root: the simulated host root (str): the units' ``holds`` are host paths under it.
    :param state_root: the directory whose ``.sim/`` holds ``units.json``, the unit states, the
        unit executables and the fault rules (str; default ``root``).
    """

    def __init__(self, root: str, state_root: str | None = None):
        self.root = os.path.abspath(root)
        self.state_root = os.path.abspath(state_root or root)
        self.bindir = os.path.join(self.state_root, ".sim", "bin")
        self._lock = threading.RLock()
        self._next_job = 1
        self._queue: list[_Job] = []       # jobs waiting for others (systemd's ordering)
        self.system_state = "running"
        self.connected = False
        self.procs: dict[int, model.Unit] = {}
        self.adopted: dict[int, str] = {}
        self._watchers: dict[int, threading.Thread] = {}
        table = model.load_table(self.state_root)
        self.units, self.names = model.build(table)
        with self._lock:
            for unit in self.units.values():
                if (table.get(unit.id) or {}).get("active"):
                    self._activate(unit)
            self._persist()

    # ---- the client's interface ------------------------------------------------------------
    def connect(self) -> None:
        """Nothing to connect to; kept for the interface."""
        self.connected = True

    def close(self) -> None:
        """"Close the connection": the next call "reconnects" (the units keep running)."""
        self.connected = False

    def __enter__(self) -> "FakeSystemd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve(self, name: str) -> str:
        """The real unit id of ``name`` (an alias resolves to its unit).

        :raises HookdError: ``UNIT_FAILED`` "unit X not found".
        """
        self.connected = True
        unit = self.names.get(name)
        if unit is None:
            raise HookdError(UNIT_FAILED, f"unit {name} not found", {"unit": name})
        return unit.id

    def active_state(self, unit: str) -> str:
        """``ActiveState`` of ``unit``; a unit that is not loaded is ``inactive``."""
        self.connected = True
        with self._lock:
            u = self.names.get(unit)
            return u.active_state if u is not None else "inactive"

    def adopt(self, pid: int, unit: str) -> None:
        """Make ``unit_of_pid(pid)`` answer ``unit`` (e.g. ``session-2.scope``): a process of a
        login session or unit that this fake did not start."""
        self.adopted[pid] = unit

    def unit_of_pid(self, pid: int) -> str | None:
        """The unit whose process ``pid`` is (its main process, or :meth:`adopt`), or None."""
        self.connected = True
        if pid in self.adopted:
            return self.adopted[pid]
        with self._lock:
            for u in self.units.values():
                if u.pid and u.pid == pid:
                    return u.id
        return model.scope_of(self.state_root, pid)

    def shutting_down(self) -> bool:
        """True while the (fake) system shuts down (:meth:`set_system_state` ``stopping``)."""
        self.connected = True
        return self.system_state == "stopping"

    def list_units(self) -> dict[str, str]:
        """``{unit id: ActiveState}`` of every unit (aliases not listed)."""
        self.connected = True
        with self._lock:
            return {u.id: u.active_state for u in self.units.values()}

    def stop_all(self, units: list[str], timeout_s: float) -> dict[str, str]:
        """Stop ``units`` together, as :meth:`vfio_hookd.systemd.Systemd.stop_all`: every job
        queued before any is awaited, all awaited against one deadline.

        :returns: ``{unit: "done"}``.
        :raises HookdError: ``UNIT_FAILED`` (unknown units, job results other than ``done``),
            ``TIMEOUT`` (jobs not ended by the deadline; they stay pending), as
            :func:`vfio_hookd.jobs.outcome`.
        """
        return self._jobs("stop", "stopping", units, timeout_s)

    def start_all(self, units: list[str], timeout_s: float) -> dict[str, str]:
        """Start ``units`` together, as :meth:`vfio_hookd.systemd.Systemd.start_all`."""
        return self._jobs("start", "starting", units, timeout_s)

    def stop(self, unit: str, timeout_s: float) -> str:
        """Stop ``unit`` and wait for its job, as :meth:`vfio_hookd.systemd.Systemd.stop`.

        :returns: ``"done"``.
        :raises HookdError: as :meth:`stop_all`.
        """
        return self._jobs("stop", "stopping", [unit], timeout_s)[unit]

    def start(self, unit: str, timeout_s: float) -> str:
        """Start ``unit`` and wait for its job, as :meth:`vfio_hookd.systemd.Systemd.start`."""
        return self._jobs("start", "starting", [unit], timeout_s)[unit]

    def _cgroup_unit(self, unit: str, what: str) -> str:
        if unit not in simcpus.CGROUP_UNITS and unit not in self.names:
            raise HookdError(UNIT_FAILED, f"unit {unit} not found", {"unit": unit})
        if unit.rsplit(".", 1)[-1] not in ("slice", "scope", "service"):
            raise HookdError(UNIT_FAILED, f"{unit}: only slices, scopes and services have "
                             f"AllowedCPUs", {"unit": unit})
        return unit

    def allowed_cpus(self, unit: str, timeout_s: float | None = None) -> bytes:
        """``AllowedCPUs`` of ``unit`` as the bitmask, as
        :meth:`vfio_hookd.systemd.Systemd.allowed_cpus` (``b""``: no restriction)."""
        self.connected = True
        self._cgroup_unit(unit, "reading")
        return cpulist.to_mask(cpulist.parse(simcpus.allowed(self.state_root, unit)))

    def set_allowed_cpus(self, unit: str, mask: bytes, timeout_s: float) -> None:
        """``SetUnitProperties(unit, true, [("AllowedCPUs", mask)])``, as
        :meth:`vfio_hookd.systemd.Systemd.set_allowed_cpus`.

        :raises HookdError: ``UNIT_FAILED`` (unknown unit, injected failure), ``TIMEOUT``
            (injected hang: no answer by ``timeout_s``).
        """
        self.connected = True
        self._cgroup_unit(unit, "setting")
        rule = simcpus.property_rule(self.state_root, unit)
        if rule and rule["action"] == "hang":
            threading.Event().wait(timeout_s)   # systemd never answers: the caller's deadline
            raise HookdError(TIMEOUT, f"setting AllowedCPUs of {unit}: systemd did not answer "
                             f"in time", {"unit": unit})
        if rule:
            raise HookdError(UNIT_FAILED, f"setting AllowedCPUs of {unit}: "
                             f"org.freedesktop.DBus.Error.Failed: injected failure",
                             {"unit": unit})
        delay = simcpus.property_latency(self.state_root)
        if delay:
            threading.Event().wait(delay)   # systemd's time for the call (simulated)
        simcpus.set_allowed(self.root, self.state_root, unit,
                            cpulist.format_list(cpulist.from_mask(mask)))

    # ---- for the tests -----------------------------------------------------------------------
    def set_system_state(self, state: str) -> None:
        """Set ``SystemState`` (``"running"``, ``"stopping"``, ...)."""
        self.system_state = state

    def kill_all(self) -> None:
        """End every unit process still running (:func:`testbed.procs.stop`) and let the
        watchers record it."""
        with self._lock:
            pids = list(self.procs)
        for pid in pids:
            stop_process(pid, 5.0)
        for pid in pids:
            w = self._watchers.get(pid)
            if w is not None:
                w.join(5)

    # ---- jobs --------------------------------------------------------------------------------
    def _jobs(self, jtype: str, verb: str, names: list[str], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        self.connected = True
        jobs: dict[str, _Job] = {}
        refused = []
        names = list(dict.fromkeys(names))
        if len(names) > 1:   # as the real client: in the order of the units' After=
            names = enqueue_order(names, {n: self.names[n].after for n in names
                                          if n in self.names}, stop=jtype == "stop")
        for name in names:   # every job queued before any is awaited
            with self._lock:
                unit = self.names.get(name)
                if unit is None:
                    refused.append(HookdError(UNIT_FAILED, f"unit {name} not found",
                                              {"unit": name}))
                    continue
                old = unit.job
                if old is not None and old.type == jtype:
                    jobs[name] = old                  # merged into the pending job
                    continue
                if old is not None:
                    self._finish(old, "canceled")
                jobs[name] = self._enqueue(unit, jtype)
        for job in jobs.values():
            job.ended.wait(max(0.0, deadline - time.monotonic()))
        results = {j.path: j.result for j in jobs.values() if j.ended.is_set()}
        return outcome(verb, {n: j.path for n, j in jobs.items()}, results, refused, timeout_s)

    def _enqueue(self, unit: model.Unit, jtype: str) -> _Job:
        """A new job (called with the lock held); it runs in the background once the jobs it
        is ordered after are over (:func:`testbed.sim.units.blockers`)."""
        job = _Job(self._next_job, unit, jtype)
        self._next_job += 1
        unit.job = job
        model.log_job(self.state_root, "new", job.id, unit.id, jtype)
        job.rule = model.job_rule(self.state_root, jtype, unit.id)
        if model.is_noop(unit, jtype, job.rule):
            self._finish(job, "done")
            return job
        self._queue.append(job)
        self._dispatch()
        return job

    def _dispatch(self) -> None:
        """Run every waiting job that no longer waits for another (lock held)."""
        for job in list(self._queue):
            if job in self._queue and not model.blockers(job.unit, job.type, self.units):
                self._queue.remove(job)
                job.state = "running"
                model.log_job(self.state_root, "run", job.id, job.unit.id, job.type)
                self._run(job)

    def _run(self, job: _Job) -> None:
        unit, jtype, rule = job.unit, job.type, job.rule
        if rule and rule["action"] == "hang":
            if rule["op"] == "stop":
                self._set_state(unit, "deactivating", "stop-sigterm")
            else:
                self._set_state(unit, "activating", "start")
            return                               # never ends (unless replaced)
        if rule and rule["action"] == "fail":
            if rule["op"] == "start":
                self._set_state(unit, "failed", "failed")
            self._finish(job, "failed")
            return
        if jtype == "start":
            self._set_state(unit, "activating", "start")
            self._after(job, model.job_latency(self.state_root, unit, "start"), self._start_done)
        else:
            self._stop_job(job)

    def _after(self, job: _Job, seconds: float, then) -> None:
        """Call ``then(job)`` under the lock after ``seconds`` (the simulated latency), unless
        the job has ended meanwhile (canceled)."""
        def fire() -> None:
            with self._lock:
                if not job.ended.is_set():
                    then(job)
        timer = threading.Timer(max(0.0, seconds), fire)
        timer.daemon = True
        timer.start()

    def _start_done(self, job: _Job) -> None:
        self._finish(job, "done" if self._activate(job.unit) else "failed")

    def _stop_job(self, job: _Job) -> None:
        unit = job.unit
        if unit.active_state in ("inactive", "failed"):
            self._stop_progress(job)
            return
        self._set_state(unit, "deactivating", "stop-sigterm")
        job.waiting = {"latency"}
        if unit.pid:
            job.waiting.add("exit")
            try:
                os.kill(unit.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass   # the watcher reports the exit

        def latency_over(j: _Job) -> None:
            j.waiting.discard("latency")
            self._stop_progress(j)
        self._after(job, model.job_latency(self.state_root, unit, "stop"), latency_over)

    def _stop_progress(self, job: _Job) -> None:
        if job.waiting:
            return
        self._set_state(job.unit, "inactive", "dead")
        self._finish(job, "done")

    def _finish(self, job: _Job, result: str) -> None:
        if job.ended.is_set():
            return
        job.result = result
        if job in self._queue:
            self._queue.remove(job)
        if job.unit.job is job:
            job.unit.job = None
        self._persist()
        model.log_job(self.state_root, "removed", job.id, job.unit.id, job.type, result)
        job.ended.set()
        if self._queue:
            self._dispatch()   # jobs ordered after this one may run now

    # ---- unit processes ------------------------------------------------------------------------
    def _activate(self, unit: model.Unit) -> bool:
        if unit.pid:   # still running (a stop job was replaced before it sent SIGTERM)
            self._set_state(unit, "active", "running")
            return True
        how, pid = model.spawn(unit, self.root, self.bindir)
        if how == "exited":
            self._set_state(unit, "active", "exited")
            return True
        if how == "failed":
            self._set_state(unit, "failed", "failed")
            return False
        unit.pid = pid
        self.procs[pid] = unit
        w = threading.Thread(target=self._watch, args=(pid, unit), daemon=True,
                             name=f"unit {unit.id}")
        self._watchers[pid] = w
        w.start()
        self._set_state(unit, "active", "running")
        return True

    def _watch(self, pid: int, unit: model.Unit) -> None:
        """Reap the unit process ``pid`` (this process is its parent) and record its exit."""
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:   # reaped by kill_all's stop
            status = signal.SIGTERM  # a wait status: killed by SIGTERM (clean)
        with self._lock:
            self.procs.pop(pid, None)
            self._watchers.pop(pid, None)
            if unit.pid != pid:
                return
            unit.pid = 0
            job = unit.job
            if job is not None and job.type == "stop" and "exit" in job.waiting:
                job.waiting.discard("exit")
                self._persist()
                self._stop_progress(job)
                return
            if model.clean_exit(status):
                self._set_state(unit, "inactive", "dead")
            else:
                self._set_state(unit, "failed", "failed")

    # ---- state -----------------------------------------------------------------------------------
    def _set_state(self, unit: model.Unit, active: str, sub: str) -> None:
        unit.active_state, unit.sub_state = active, sub
        self._persist()

    def _persist(self) -> None:
        model.save_states(self.state_root, self.units.values())
