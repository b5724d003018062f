"""A simulated systemd for the simulated host: ``org.freedesktop.systemd1`` on a private bus.

The unit model (units, their processes, states, fault rules) is :mod:`testbed.sim.units`,
shared with the in-process fake of the client, :mod:`testbed.fake_systemd`; this module is the
D-Bus face of it, on GLib.

Run as ``python -m testbed.sim.systemd --root SIMROOT --address ADDR`` (normally through
:class:`testbed.sim.bus.SimBus`). It owns ``org.freedesktop.systemd1`` on the bus at ``ADDR``
and answers the part of ``org.freedesktop.systemd1(5)`` that vfio-hookd uses, with systemd's own
object paths and D-Bus error names:

- ``/org/freedesktop/systemd1``, ``org.freedesktop.systemd1.Manager``: ``Subscribe()``,
  ``Unsubscribe()``, ``GetUnit(s) -> o``, ``LoadUnit(s) -> o``, ``StartUnit(ss) -> o``,
  ``StopUnit(ss) -> o``, ``RestartUnit(ss) -> o``, ``ListUnits() -> a(ssssssouso)``,
  ``SetUnitProperties(sba(sv))`` (only ``AllowedCPUs`` (``ay``) of the cgroup units below, and
  only with ``runtime=true``: a persistent change is refused, ``InvalidArgs``); signals
  ``JobNew(uos)`` and ``JobRemoved(uoss)``; property ``SystemState`` (``"running"``). The private
  interface ``org.vfiohookd.Sim`` on the same object has ``SetSystemState(s)`` for tests
  (e.g. ``"stopping"`` to model a shutdown).
- ``/org/freedesktop/systemd1/unit/<label>`` (systemd's bus label escaping:
  ``gdm.service`` -> ``gdm_2eservice``, ``getty@tty1.service`` -> ``getty_40tty1_2eservice``),
  ``org.freedesktop.systemd1.Unit``: ``Id``, ``Names``, ``Description``, ``LoadState``,
  ``ActiveState``, ``SubState``, ``Job``, ``After``, ``Before`` (``PropertiesChanged`` for
  ``ActiveState`` and
  ``SubState``); ``.service`` units also have
  ``org.freedesktop.systemd1.Service.MainPID``. An alias (``display-manager.service``) resolves
  to the object of its unit, whose ``Id`` is the real name, as in systemd.
- ``/org/freedesktop/systemd1/job/<id>``, ``org.freedesktop.systemd1.Job``: ``Id``, ``Unit``,
  ``JobType``, ``State``, ``Cancel()``.
- ``system.slice``, ``user.slice``, ``machine.slice`` (``org.freedesktop.systemd1.Slice``)
  and ``init.scope`` (``.Scope``), active, not in ``ListUnits``: ``AllowedCPUs`` (``ay``, the
  state of :mod:`testbed.sim.cpus`, shared with :mod:`testbed.fake_systemd`).
  ``SetUnitProperties`` meets the ``set_property`` fault rules (``fail``:
  ``org.freedesktop.DBus.Error.Failed``; ``hang``: no reply) and waits the ``set_property``
  latency before it answers.

Units come from ``<root>/.sim/units.json``::

    {"gdm.service": {"aliases": ["display-manager.service"],
                     "holds": ["/dev/dri/card0", "/dev/snd/controlC1"], "active": true},
     "nvidia-persistenced.service": {"holds": ["/dev/nvidiactl", "/dev/nvidia0"], "active": true}}

(optional keys ``after``, ``before``, ``stop_s``, ``start_s``: :mod:`testbed.sim.units`).
Every job's queueing, run and end are appended to ``<root>/.sim/jobs.jsonl`` (the job log).

``holds`` are host paths under the simulated root. An active unit with ``holds`` runs a real
process (``sleep infinity`` executed through a symlink named after the unit, so its ``comm`` is
e.g. ``gdm``) in its own session, with those files open on fds 3, 4, ... -- the holder a
display manager is on a real host. Its state is written to ``<root>/.sim/units-state.json``
(``{"gdm.service": {"active_state": "active", "sub_state": "running", "pid": 4242}}``) on every
change.

Jobs follow systemd's job model (``systemd.job`` in ``org.freedesktop.systemd1(5)``): a start or
stop returns a job path at once; ``JobRemoved(id, job, unit, result)`` reports the end, with
``result`` ``done``, ``failed`` or ``canceled``. Jobs of different units run concurrently; a
job is ``waiting`` (``Job.State``) while the units' ``after``/``before`` order it after another
unit's pending job, as systemd orders jobs of separate calls too (stops in the reverse of the
start order, a stop before a start; :func:`testbed.sim.units.blockers`), then ``running``.
A stop sends SIGTERM to the unit's process and ends when the process has exited (GLib child
watch) and the unit's stop latency has passed (``stop_s`` in ``units.json``, else
``unit_stop`` of :mod:`testbed.sim.faults`); a start waits its start latency and then opens
the unit's holds; if none of them exists (the GPU is on vfio-pci, ``/dev/dri/card0`` is gone) the job fails
and the unit is ``failed``, like a display manager without a GPU. Fault rules ``stop`` / ``start``:
``fail`` ends the job ``failed`` (a failed stop leaves the process running and the unit
``active``); ``hang`` never ends the job. A second job for a unit with a job of the other type
replaces it (the old one ends ``canceled``; mode ``fail`` refuses with
``org.freedesktop.systemd1.TransactionIsDestructive``); a job of the same type is merged.

Deliberate differences from systemd, to make clients prove they are correct:

- Signals are emitted only while at least one client is subscribed (``Subscribe()``); systemd
  also emits them for the client that queued the job.
- A job with nothing to do (stop of an inactive unit, start of an active one) emits
  ``JobRemoved`` *before* the method reply, so a client that subscribes after calling
  ``StopUnit`` (or ignores signals that arrive before the reply) misses it.
- ``LoadUnit`` of an unknown name returns an object with ``LoadState`` ``not-found`` that is
  never listed; ``GetUnit`` keeps answering ``NoSuchUnit`` for it (systemd garbage-collects such
  a unit soon after).

Readiness: once the name is owned the process prints ``READY`` on stdout. SIGTERM or SIGINT
(or, with ``--exit-on-stdin-eof``, the parent going away) stops the unit processes and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from gi.repository import Gio, GLib

from vfio_hookd import cpus as cpulist

from ..procs import stop
from . import cpus as simcpus
from . import units as model
from .units import Unit as _Unit

BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
JOB_PREFIX = "/org/freedesktop/systemd1/job/"
MANAGER = "org.freedesktop.systemd1.Manager"
ERR_NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
ERR_NO_UNIT_FOR_PID = "org.freedesktop.systemd1.NoUnitForPID"
ERR_NO_SUCH_JOB = "org.freedesktop.systemd1.NoSuchJob"
ERR_ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"
ERR_NOT_SUBSCRIBED = "org.freedesktop.systemd1.NotSubscribed"
ERR_DESTRUCTIVE = "org.freedesktop.systemd1.TransactionIsDestructive"
ERR_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
JOB_MODES = ("replace", "fail", "isolate", "ignore-dependencies", "ignore-requirements",
             "replace-irreversibly", "flush")

INTROSPECTION = """
<node>
 <interface name="org.freedesktop.systemd1.Manager">
  <method name="Subscribe"/>
  <method name="Unsubscribe"/>
  <method name="GetUnit"><arg name="name" type="s" direction="in"/>
   <arg name="unit" type="o" direction="out"/></method>
  <method name="LoadUnit"><arg name="name" type="s" direction="in"/>
   <arg name="unit" type="o" direction="out"/></method>
  <method name="GetUnitByPID"><arg name="pid" type="u" direction="in"/>
   <arg name="unit" type="o" direction="out"/></method>
  <method name="StartUnit"><arg name="name" type="s" direction="in"/>
   <arg name="mode" type="s" direction="in"/><arg name="job" type="o" direction="out"/></method>
  <method name="StopUnit"><arg name="name" type="s" direction="in"/>
   <arg name="mode" type="s" direction="in"/><arg name="job" type="o" direction="out"/></method>
  <method name="RestartUnit"><arg name="name" type="s" direction="in"/>
   <arg name="mode" type="s" direction="in"/><arg name="job" type="o" direction="out"/></method>
  <method name="ListUnits"><arg name="units" type="a(ssssssouso)" direction="out"/></method>
  <method name="SetUnitProperties"><arg name="name" type="s" direction="in"/>
   <arg name="runtime" type="b" direction="in"/>
   <arg name="properties" type="a(sv)" direction="in"/></method>
  <signal name="JobNew"><arg name="id" type="u"/><arg name="job" type="o"/>
   <arg name="unit" type="s"/></signal>
  <signal name="JobRemoved"><arg name="id" type="u"/><arg name="job" type="o"/>
   <arg name="unit" type="s"/><arg name="result" type="s"/></signal>
  <property name="SystemState" type="s" access="read"/>
 </interface>
 <interface name="org.vfiohookd.Sim">
  <method name="SetSystemState"><arg name="state" type="s" direction="in"/></method>
 </interface>
 <interface name="org.freedesktop.systemd1.Unit">
  <property name="Id" type="s" access="read"/>
  <property name="Names" type="as" access="read"/>
  <property name="Description" type="s" access="read"/>
  <property name="LoadState" type="s" access="read"/>
  <property name="ActiveState" type="s" access="read"/>
  <property name="SubState" type="s" access="read"/>
  <property name="Job" type="(uo)" access="read"/>
  <property name="After" type="as" access="read"/>
  <property name="Before" type="as" access="read"/>
 </interface>
 <interface name="org.freedesktop.systemd1.Service">
  <property name="MainPID" type="u" access="read"/>
 </interface>
 <interface name="org.freedesktop.systemd1.Slice">
  <property name="AllowedCPUs" type="ay" access="read"/>
 </interface>
 <interface name="org.freedesktop.systemd1.Scope">
  <property name="AllowedCPUs" type="ay" access="read"/>
 </interface>
 <interface name="org.freedesktop.systemd1.Job">
  <method name="Cancel"/>
  <property name="Id" type="u" access="read"/>
  <property name="Unit" type="(so)" access="read"/>
  <property name="JobType" type="s" access="read"/>
  <property name="State" type="s" access="read"/>
 </interface>
</node>
"""


def bus_label(name: str) -> str:
    """systemd's bus label escaping (``bus_label_escape()`` in systemd's ``bus-label.c``).

    ASCII letters stay, digits stay except in first position, every other byte becomes ``_xx``
    (lower-case hex); the empty string is ``_``. ``gdm.service`` -> ``gdm_2eservice``.
    """
    if not name:
        return "_"
    out = []
    for i, b in enumerate(name.encode()):
        c = chr(b)
        if (c.isascii() and c.isalpha()) or (i > 0 and c.isascii() and c.isdigit()):
            out.append(c)
        else:
            out.append(f"_{b:02x}")
    return "".join(out)


def unit_path(name: str) -> str:
    """The object path systemd gives unit ``name`` (str)."""
    return UNIT_PREFIX + bus_label(name)


class _Job:
    def __init__(self, jid: int, unit: _Unit, jtype: str):
        self.id = jid
        self.path = f"{JOB_PREFIX}{jid}"
        self.unit = unit
        self.type = jtype          # "start" | "stop" | "restart"
        self.state = "waiting"     # "waiting" | "running"
        self.sources: list[int] = []   # GLib sources to remove if the job is canceled
        self.waiting: set[str] = set()  # what a running stop still waits for: "exit", "latency"
        self.rule: dict | None = None   # the fault rule it met when queued
        self.reg_id = 0
        self.finished = False


class SimSystemd:
    """The fake manager: unit table, jobs, unit processes, D-Bus objects.

    :param root: the simulated host root (str): the units' ``holds`` are host paths under it.
    :param con: a ``Gio.DBusConnection`` to the private bus (not yet owning the name).
    :param state_root: the directory whose ``.sim/`` holds ``units.json``, the unit states,
        the unit executables and the fault rules (str; default ``root``). The kernel tests give
        ``root="/"`` (a real kernel's ``/dev/dri/card0``) and a scratch directory here: nothing
        may be written under the guest's ``/`` itself.
    """

    def __init__(self, root: str, con: Gio.DBusConnection, state_root: str | None = None):
        self.root = os.path.abspath(root)
        self.state_root = os.path.abspath(state_root or root)
        self.con = con
        self.node = Gio.DBusNodeInfo.new_for_xml(INTROSPECTION)
        self.units: dict[str, _Unit] = {}
        self.names: dict[str, _Unit] = {}        # id and aliases -> unit
        self.not_found: dict[str, int] = {}      # LoadUnit of unknown names -> registration id
        self.jobs: dict[str, _Job] = {}
        self.next_job = 1
        self.subscribers: set[str] = set()
        self.system_state = "running"
        self.procs: dict[int, _Unit] = {}        # live unit processes (pid -> unit)
        self.bindir = os.path.join(self.state_root, ".sim", "bin")
        self._load()
        self._register()
        self.con.signal_subscribe("org.freedesktop.DBus", "org.freedesktop.DBus",
                                  "NameOwnerChanged", "/org/freedesktop/DBus", None,
                                  Gio.DBusSignalFlags.NONE, self._on_name_owner_changed)

    # ---- setup -----------------------------------------------------------------------------
    def _load(self) -> None:
        table = model.load_table(self.state_root)
        self.units, self.names = model.build(table)
        for unit in self.units.values():
            if (table[unit.id] or {}).get("active"):
                self._activate(unit)
        self._persist()
        self.hung: list = []   # SetUnitProperties calls never answered (hang fault)
        for name in simcpus.CGROUP_UNITS:   # the cgroup units (testbed.sim.cpus)
            if name not in self.names:
                unit = _Unit(name, {})
                unit.active_state = unit.sub_state = "active"
                self.names[name] = unit

    def _register(self) -> None:
        iface = self.node.lookup_interface
        for name in (MANAGER, "org.vfiohookd.Sim"):
            self.con.register_object(MANAGER_PATH, iface(name), self._on_manager_call,
                                     self._on_manager_property, None)
        for unit in self.units.values():
            self._register_unit(unit, unit_path(unit.id))
        for name in simcpus.CGROUP_UNITS:
            if name not in self.units:
                self._register_unit(self.names[name], unit_path(name))

    def _register_unit(self, unit: _Unit, path: str) -> None:
        names = ["org.freedesktop.systemd1.Unit"]
        if unit.id.endswith(".service"):
            names.append("org.freedesktop.systemd1.Service")
        elif unit.id.endswith(".slice") and unit.load_state == "loaded":
            names.append("org.freedesktop.systemd1.Slice")
        elif unit.id.endswith(".scope") and unit.load_state == "loaded":
            names.append("org.freedesktop.systemd1.Scope")
        for name in names:
            unit.reg_ids.append(self.con.register_object(
                path, self.node.lookup_interface(name), None,
                lambda *a, u=unit: self._unit_property(u, a[4]), None))

    # ---- signals and state file --------------------------------------------------------------
    def _emit(self, member: str, args: GLib.Variant) -> None:
        if self.subscribers:
            self.con.emit_signal(None, MANAGER_PATH, MANAGER, member, args)

    def _on_name_owner_changed(self, con, sender, path, iface, member, params) -> None:
        name, _old, new = params.unpack()
        if not new:
            self.subscribers.discard(name)

    def _persist(self) -> None:
        model.save_states(self.state_root, self.units.values())

    def _set_state(self, unit: _Unit, active: str, sub: str) -> None:
        unit.active_state, unit.sub_state = active, sub
        self._persist()
        if self.subscribers and unit.id in self.units:
            changed = {"ActiveState": GLib.Variant("s", active), "SubState": GLib.Variant("s", sub)}
            self.con.emit_signal(None, unit_path(unit.id), "org.freedesktop.DBus.Properties",
                                 "PropertiesChanged", GLib.Variant(
                                     "(sa{sv}as)", ("org.freedesktop.systemd1.Unit", changed, [])))

    # ---- unit processes ----------------------------------------------------------------------
    def _activate(self, unit: _Unit) -> bool:
        """Open the unit's holds in a new process; False (unit ``failed``) if none exists."""
        if unit.pid:   # still running (a stop job was canceled before it sent SIGTERM)
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
        GLib.child_watch_add(GLib.PRIORITY_DEFAULT, pid, self._on_exit, unit)
        self._set_state(unit, "active", "running")
        return True

    def _on_exit(self, pid: int, status: int, unit: _Unit) -> None:
        self.procs.pop(pid, None)
        if unit.pid != pid:
            return
        unit.pid = 0
        job = unit.job
        if job and job.type in ("stop", "restart") and "exit" in job.waiting:
            job.waiting.discard("exit")
            self._persist()
            self._stop_progress(job)
            return
        if model.clean_exit(status):
            self._set_state(unit, "inactive", "dead")
        else:
            self._set_state(unit, "failed", "failed")

    def kill_all(self) -> None:
        """Stop every unit process still running (:func:`testbed.procs.stop`: SIGTERM, SIGKILL
        after 5 s, reap)."""
        for pid in list(self.procs):
            stop(pid, 5.0)
            self.procs.pop(pid, None)

    # ---- jobs ----------------------------------------------------------------------------------
    def _new_job(self, unit: _Unit, jtype: str) -> _Job:
        job = _Job(self.next_job, unit, jtype)
        self.next_job += 1
        job.reg_id = self.con.register_object(
            job.path, self.node.lookup_interface("org.freedesktop.systemd1.Job"),
            lambda *a, j=job: self._on_job_call(j, a[4], a[6]),
            lambda *a, j=job: self._job_property(j, a[4]), None)
        self.jobs[job.path] = job
        unit.job = job
        model.log_job(self.state_root, "new", job.id, unit.id, jtype)
        self._emit("JobNew", GLib.Variant("(uos)", (job.id, job.path, unit.id)))
        return job

    def _finish(self, job: _Job, result: str) -> None:
        if job.finished:
            return
        job.finished = True
        for src in job.sources:
            GLib.source_remove(src)
        job.sources.clear()
        self.con.unregister_object(job.reg_id)
        self.jobs.pop(job.path, None)
        if job.unit.job is job:
            job.unit.job = None
        self._persist()
        model.log_job(self.state_root, "removed", job.id, job.unit.id, job.type, result)
        self._emit("JobRemoved", GLib.Variant("(uoss)", (job.id, job.path, job.unit.id, result)))
        self._dispatch()   # jobs ordered after this one may run now

    def _dispatch(self) -> None:
        """Run every waiting job that no longer waits for another unit's job."""
        for job in sorted(self.jobs.values(), key=lambda j: j.id):
            if (job.state == "waiting" and not job.finished
                    and not model.blockers(job.unit, job.type, self.units)):
                job.state = "running"
                model.log_job(self.state_root, "run", job.id, job.unit.id, job.type)
                self._run(job)

    def _after(self, job: _Job, seconds: float, then) -> None:
        """Run ``then()`` after ``seconds`` (the simulated operation latency) unless canceled."""
        def fire():
            if src in job.sources:
                job.sources.remove(src)
            if not job.finished:
                then()
            return GLib.SOURCE_REMOVE
        src = GLib.timeout_add(max(0, int(seconds * 1000)), fire)
        job.sources.append(src)

    def _enqueue(self, unit: _Unit, jtype: str, mode: str, invocation) -> None:
        if mode not in JOB_MODES:
            invocation.return_dbus_error(ERR_INVALID_ARGS, f"Job mode {mode} invalid.")
            return
        old = unit.job
        if old is not None:
            if old.type == jtype:   # merged into the pending job, as systemd does
                invocation.return_value(GLib.Variant("(o)", (old.path,)))
                return
            if mode == "fail":
                invocation.return_dbus_error(
                    ERR_DESTRUCTIVE, f"Transaction for {unit.id}/{jtype} is destructive "
                    f"({unit.id} has '{old.type}' job queued, but '{jtype}' is included "
                    "in transaction).")
                return
            self._finish(old, "canceled")
        job = self._new_job(unit, jtype)
        job.rule = model.job_rule(self.state_root, jtype, unit.id)
        if model.is_noop(unit, jtype, job.rule):
            # Ends before the reply on purpose (see the module docstring).
            self._finish(job, "done")
            invocation.return_value(GLib.Variant("(o)", (job.path,)))
            return
        invocation.return_value(GLib.Variant("(o)", (job.path,)))
        self._dispatch()

    def _run(self, job: _Job) -> None:
        unit, rule = job.unit, job.rule
        op = rule["op"] if rule else job.type
        if rule and rule["action"] == "hang":
            if op == "stop":
                self._set_state(unit, "deactivating", "stop-sigterm")
            else:
                self._set_state(unit, "activating", "start")
            return
        if rule and rule["action"] == "fail":
            if op == "start":
                self._set_state(unit, "failed", "failed")
            job.sources.append(GLib.idle_add(lambda: self._finish(job, "failed")))
            return
        if job.type == "start":
            self._start_job(job)
        else:
            self._stop_job(job)

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
                pass  # the child watch reports the exit
        self._after(job, model.job_latency(self.state_root, unit, "stop"),
                    lambda: (job.waiting.discard("latency"), self._stop_progress(job)))

    def _stop_progress(self, job: _Job) -> None:
        if job.waiting:
            return
        self._set_state(job.unit, "inactive", "dead")
        if job.type == "restart":
            self._start_job(job)
        else:
            self._finish(job, "done")

    def _start_job(self, job: _Job) -> None:
        self._set_state(job.unit, "activating", "start")
        self._after(job, model.job_latency(self.state_root, job.unit, "start"),
                    lambda: self._finish(job, "done" if self._activate(job.unit) else "failed"))

    # ---- D-Bus handlers ------------------------------------------------------------------------
    def _on_manager_call(self, con, sender, path, iface, method, params, invocation) -> None:
        args = params.unpack()
        if iface == "org.vfiohookd.Sim":
            self.system_state = args[0]
            invocation.return_value(None)
        elif method == "Subscribe":
            if sender in self.subscribers:
                invocation.return_dbus_error(ERR_ALREADY_SUBSCRIBED,
                                             "Client is already subscribed.")
            else:
                self.subscribers.add(sender)
                invocation.return_value(None)
        elif method == "Unsubscribe":
            if sender not in self.subscribers:
                invocation.return_dbus_error(ERR_NOT_SUBSCRIBED, "Client is not subscribed.")
            else:
                self.subscribers.discard(sender)
                invocation.return_value(None)
        elif method == "GetUnit":
            unit = self.names.get(args[0])
            if unit is None:
                invocation.return_dbus_error(ERR_NO_SUCH_UNIT, f"Unit {args[0]} not loaded.")
            else:
                invocation.return_value(GLib.Variant("(o)", (unit_path(unit.id),)))
        elif method == "LoadUnit":
            unit = self.names.get(args[0])
            if unit is None:
                invocation.return_value(GLib.Variant("(o)", (self._load_not_found(args[0]),)))
            else:
                invocation.return_value(GLib.Variant("(o)", (unit_path(unit.id),)))
        elif method in ("StartUnit", "StopUnit", "RestartUnit"):
            unit = self.names.get(args[0])
            if unit is None:
                verb = "not found" if method != "StopUnit" else "not loaded"
                invocation.return_dbus_error(ERR_NO_SUCH_UNIT, f"Unit {args[0]} {verb}.")
                return
            jtype = {"StartUnit": "start", "StopUnit": "stop", "RestartUnit": "restart"}[method]
            self._enqueue(unit, jtype, args[1], invocation)
        elif method == "GetUnitByPID":
            unit = next((u for u in self.units.values() if u.pid and u.pid == args[0]), None)
            scope = model.scope_of(self.state_root, args[0]) if unit is None else None
            if scope is not None:   # a session's or user instance's process (.desktop)
                self._load_not_found(scope)
                invocation.return_value(GLib.Variant("(o)", (unit_path(scope),)))
            elif unit is None:
                invocation.return_dbus_error(ERR_NO_UNIT_FOR_PID,
                                             f"PID {args[0]} does not belong to any loaded unit.")
            else:
                invocation.return_value(GLib.Variant("(o)", (unit_path(unit.id),)))
        elif method == "SetUnitProperties":
            self._set_properties(*args, invocation)
        elif method == "ListUnits":
            rows = []
            for u in self.units.values():
                job = u.job
                rows.append((u.id, u.description, u.load_state, u.active_state, u.sub_state, "",
                             unit_path(u.id), job.id if job else 0, job.type if job else "",
                             job.path if job else "/"))
            invocation.return_value(GLib.Variant("(a(ssssssouso))", (rows,)))

    def _set_properties(self, name: str, runtime: bool, props, invocation) -> None:
        """``SetUnitProperties``: ``AllowedCPUs`` of a cgroup unit, at runtime only."""
        unit = self.names.get(name)
        if unit is None or name not in simcpus.CGROUP_UNITS:
            invocation.return_dbus_error(ERR_NO_SUCH_UNIT, f"Unit {name} not loaded.")
            return
        if not runtime:
            invocation.return_dbus_error(ERR_INVALID_ARGS, "the simulated systemd takes "
                                         "runtime property changes only")
            return
        masks = []
        for prop, value in props:
            if prop != "AllowedCPUs":
                invocation.return_dbus_error("org.freedesktop.DBus.Error.PropertyReadOnly",
                                             f"Cannot set property {prop}, or unknown property.")
                return
            masks.append(bytes(value))
        rule = simcpus.property_rule(self.state_root, name)
        if rule and rule["action"] == "hang":
            self.hung.append(invocation)   # kept, never answered
            return
        if rule:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.Failed", "injected failure")
            return

        def answer():
            for mask in masks:
                simcpus.set_allowed(self.root, self.state_root, name,
                                    cpulist.format_list(cpulist.from_mask(mask)))
            invocation.return_value(None)
            return GLib.SOURCE_REMOVE
        delay = simcpus.property_latency(self.state_root)
        if delay:
            GLib.timeout_add(int(delay * 1000), answer)
        else:
            answer()

    def _on_manager_property(self, con, sender, path, iface, prop):
        if prop == "SystemState":
            return GLib.Variant("s", self.system_state)
        return None

    def _load_not_found(self, name: str) -> str:
        path = unit_path(name)
        if name not in self.not_found:
            ghost = _Unit(name, {})
            ghost.load_state = "not-found"
            self._register_unit(ghost, path)
            self.not_found[name] = 1
        return path

    def _unit_property(self, unit: _Unit, prop: str):
        if prop == "AllowedCPUs":
            return GLib.Variant("ay", cpulist.to_mask(cpulist.parse(
                simcpus.allowed(self.state_root, unit.id))))
        job = unit.job
        values = {
            "Id": GLib.Variant("s", unit.id),
            "Names": GLib.Variant("as", [unit.id, *unit.aliases]),
            "Description": GLib.Variant("s", unit.description),
            "LoadState": GLib.Variant("s", unit.load_state),
            "ActiveState": GLib.Variant("s", unit.active_state),
            "SubState": GLib.Variant("s", unit.sub_state),
            "Job": GLib.Variant("(uo)", (job.id, job.path) if job else (0, "/")),
            "MainPID": GLib.Variant("u", unit.pid),
            "After": GLib.Variant("as", sorted(unit.after)),
            "Before": GLib.Variant("as", sorted(unit.before)),
        }
        return values.get(prop)

    def _job_property(self, job: _Job, prop: str):
        values = {
            "Id": GLib.Variant("u", job.id),
            "Unit": GLib.Variant("(so)", (job.unit.id, unit_path(job.unit.id))),
            "JobType": GLib.Variant("s", job.type),
            "State": GLib.Variant("s", job.state),
        }
        return values.get(prop)

    def _on_job_call(self, job: _Job, method: str, invocation) -> None:
        if job.finished:
            invocation.return_dbus_error(ERR_NO_SUCH_JOB, f"Job {job.id} does not exist.")
            return
        invocation.return_value(None)
        self._finish(job, "canceled")


def _own_name(con: Gio.DBusConnection) -> None:
    reply = con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                          "RequestName", GLib.Variant("(su)", (BUS_NAME, 4)),  # DO_NOT_QUEUE
                          GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, 5000, None)
    if reply.unpack()[0] != 1:  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
        raise SystemExit(f"sim-systemd: {BUS_NAME} is already owned on this bus")


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``--root SIMROOT --address ADDR [--state-root DIR]
    [--exit-on-stdin-eof]``; exit 0."""
    ap = argparse.ArgumentParser(prog="python -m testbed.sim.systemd")
    ap.add_argument("--root", required=True)
    ap.add_argument("--state-root", help="directory holding .sim/ (units.json, faults); "
                    "default: --root")
    ap.add_argument("--address", required=True)
    ap.add_argument("--exit-on-stdin-eof", action="store_true",
                    help="exit when stdin reaches end of file (the parent went away)")
    opts = ap.parse_args(argv)
    flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
             | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
    con = Gio.DBusConnection.new_for_address_sync(opts.address, flags, None, None)
    con.set_exit_on_close(False)
    loop = GLib.MainLoop()
    sim = SimSystemd(opts.root, con, opts.state_root)

    def quit_(*_args):
        loop.quit()
        return GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, quit_)
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGINT, quit_)
    con.connect("closed", quit_)
    if opts.exit_on_stdin_eof:
        def on_stdin(fd, cond):
            if cond & (GLib.IO_HUP | GLib.IO_ERR) or not os.read(fd, 4096):
                loop.quit()
                return GLib.SOURCE_REMOVE
            return GLib.SOURCE_CONTINUE
        GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, 0, GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR,
                              on_stdin)
    try:
        _own_name(con)
        print("READY", flush=True)
        loop.run()
    finally:
        sim.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
