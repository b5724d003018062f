"""The simulated host's systemd units: the model both fakes of systemd share.

Two fakes answer for systemd on a simulated host, with one behaviour:

- :mod:`testbed.sim.systemd`: ``org.freedesktop.systemd1`` on a private D-Bus bus, for the
  product's real client (:class:`vfio_hookd.systemd.Systemd`) and for the daemon in a child
  process;
- :mod:`testbed.fake_systemd`: an in-process stand-in for that client, for the fast tests.

What they share is here (standard library only: no GLib): the unit table
(``<state_root>/.sim/units.json``, see :mod:`testbed.sim.systemd`), the unit states written to
``<state_root>/.sim/units-state.json`` on every change, the unit processes (an active unit with
``holds`` is a real ``sleep infinity`` process, named after the unit, holding those host paths
open on fds 3, 4, ...; it cannot start when none of them exists), the exit statuses that count
as a clean stop, which fault rule of :mod:`testbed.sim.faults` a job meets, how long a job
takes, which other jobs it waits for, and the job log.

Jobs of different units run concurrently, as in systemd; a job waits only for the jobs that
the units' ordering puts before it (:func:`blockers`: systemd's ``job_is_runnable()`` and
``job_compare()`` in ``src/core/job.c``). A unit's ``after``/``before`` in ``units.json`` are
its ``After=``/``Before=`` (``B after A`` is also ``A before B``). Starts follow the order
(``B`` starts once ``A``'s job is over), stops the reverse (``A`` stops once ``B``'s stop is
over), and a stop goes before a start whatever the direction; a unit without a job orders
nothing. A job that waits for nothing runs as soon as it is queued, as systemd runs its run
queue whenever its event loop is idle (between two method calls): a job queued before the one
it should follow has already run, in both fakes as in systemd. Ordering cycles are not broken
as systemd breaks them: don't write any.

Per-unit latency: ``stop_s`` / ``start_s`` (s) in ``units.json``; a unit without them takes
the ``unit_stop`` / ``unit_start`` latency of :mod:`testbed.sim.faults` (:func:`job_latency`).
``units.json`` example::

    {"gdm.service": {"aliases": ["display-manager.service"], "holds": ["/dev/dri/card0"],
                     "active": true, "after": ["systemd-user-sessions.service"],
                     "stop_s": 0.8, "start_s": 0.8}}

Job log: ``<state_root>/.sim/jobs.jsonl``, one JSON line per event in the order the fake saw
them (:func:`log_job`, :func:`read_job_log`): ``{"ev": "new"|"run"|"removed", "job": id,
"unit": id, "type": "stop"|"start"|"restart", "result": str or null, "t": monotonic s}``.
A job is ``new`` when queued, ``run`` once nothing it waits for is pending (never for a job
with nothing to do), ``removed`` at its end (``JobRemoved``). Tests read orders from it, not
wall times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

from . import faults

#: Exit signals systemd counts as a clean service exit (``SuccessExitStatus=`` default,
#: ``systemd.service(5)``): such an exit leaves the unit ``inactive``, anything else ``failed``.
CLEAN_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)


class Unit:
    """One unit: its names, what its process holds, its state and pending job."""

    def __init__(self, uid: str, spec: dict):
        self.id = uid
        self.aliases = list(spec.get("aliases", []))
        self.holds = list(spec.get("holds", []))
        self.description = str(spec.get("description", uid))
        self.after = set(spec.get("after", []))     # After= (build() adds the reverse Before=)
        self.before = set(spec.get("before", []))   # Before=
        self.latency = {"stop": spec.get("stop_s"), "start": spec.get("start_s")}
        self.load_state = "loaded"
        self.active_state = "inactive"
        self.sub_state = "dead"
        self.pid = 0
        self.job = None            # the fake's pending job object, if any
        self.reg_ids: list[int] = []   # D-Bus object registrations (testbed.sim.systemd)


def load_table(state_root: str) -> dict[str, dict]:
    """``units.json`` of ``state_root`` (``{unit id: spec}``; ``{}`` when absent)."""
    try:
        with open(os.path.join(state_root, ".sim", "units.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def build(table: dict[str, dict]) -> tuple[dict[str, Unit], dict[str, Unit]]:
    """``(units by id, units by id and alias)`` for ``table`` (all inactive still)."""
    units: dict[str, Unit] = {}
    names: dict[str, Unit] = {}
    for uid, spec in table.items():
        unit = Unit(uid, spec or {})
        units[uid] = unit
        for n in [uid, *unit.aliases]:
            names[n] = unit
    for unit in units.values():   # B After=A is A Before=B, and the reverse
        for rel, back in (("after", "before"), ("before", "after")):
            for other in list(getattr(unit, rel)):
                if other in names:
                    getattr(names[other], back).add(unit.id)
    for unit in units.values():   # by unit id
        unit.after = {names[n].id if n in names else n for n in unit.after}
        unit.before = {names[n].id if n in names else n for n in unit.before}
    return units, names


def save_states(state_root: str, units) -> None:
    """Write ``units-state.json``: ``{id: {"active_state", "sub_state", "pid"}}``."""
    state = {u.id: {"active_state": u.active_state, "sub_state": u.sub_state,
                    "pid": u.pid or None} for u in units}
    path = os.path.join(state_root, ".sim", "units-state.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def host_path(root: str, p: str) -> str:
    """Real path of host path ``p`` under ``root``."""
    return root.rstrip("/") + "/" + p.lstrip("/")


def executable(bindir: str, unit: Unit) -> str:
    """A symlink to sleep(1) named after the unit: the kernel takes ``comm`` from it, so a
    holder list shows e.g. ``gdm``."""
    name = unit.id.rsplit(".", 1)[0] or "unit"
    link = os.path.join(bindir, name)
    if not os.path.islink(link):
        os.makedirs(bindir, exist_ok=True)
        os.symlink(shutil.which("sleep") or "/bin/sleep", link)
    return link


def spawn(unit: Unit, root: str, bindir: str) -> tuple[str, int]:
    """Start ``unit``'s process if it has ``holds``: ``("running", pid)``; a unit without
    holds is ``("exited", 0)`` (active, no process); ``("failed", 0)`` when none of its holds
    exists (a display manager without its GPU) or the process cannot start. The process runs
    in a session of its own; the caller reaps it."""
    if not unit.holds:
        return "exited", 0
    present = [h for h in unit.holds if os.path.exists(host_path(root, h))]
    if not present:
        return "failed", 0
    exe = executable(bindir, unit)
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
    for fd, h in enumerate(present, start=3):
        actions.append((os.POSIX_SPAWN_OPEN, fd, host_path(root, h), os.O_RDONLY, 0))
    try:
        pid = os.posix_spawn(exe, [os.path.basename(exe), "infinity"], os.environ,
                             file_actions=actions, setsid=True)
    except OSError:
        return "failed", 0
    return "running", pid


def clean_exit(status: int) -> bool:
    """True when wait status ``status`` is a clean service exit (exit 0 or a
    :data:`CLEAN_SIGNALS` signal)."""
    return (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0) or (
        os.WIFSIGNALED(status) and os.WTERMSIG(status) in CLEAN_SIGNALS)


def job_rule(state_root: str, jtype: str, unit_id: str) -> dict | None:
    """The fault rule a new job of ``jtype`` (``start``, ``stop``, ``restart``) on ``unit_id``
    meets (consuming one of its ``count``), or None: a stop or restart meets ``stop`` rules,
    a restart without one meets ``start`` rules."""
    rule = faults.match(state_root, "stop" if jtype != "start" else "start", unit_id)
    if rule is None and jtype == "restart":
        rule = faults.match(state_root, "start", unit_id)
    return rule


def is_noop(unit: Unit, jtype: str, rule: dict | None) -> bool:
    """True for a job with nothing to do: a stop of an inactive/failed unit, a start of an
    active one (and no fault rule)."""
    return rule is None and (
        (jtype == "stop" and unit.active_state in ("inactive", "failed")) or
        (jtype == "start" and unit.active_state == "active"))


def job_latency(state_root: str, unit: Unit, jtype: str) -> float:
    """How long (s) a ``jtype`` (``stop``/``start``) job of ``unit`` takes: the unit's
    ``stop_s``/``start_s``, else the ``unit_stop``/``unit_start`` latency of the faults."""
    own = unit.latency.get(jtype)
    return float(own) if own is not None else faults.latency(state_root, f"unit_{jtype}")


def batch_latency(state_root: str, unit_ids: list[str], jtype: str) -> float:
    """The latency (s) a batch of ``jtype`` jobs of ``unit_ids`` (all queued together, each
    with work to do) incurs: the longest chain of the jobs' latencies along the units'
    ordering (the jobs of unordered units overlap; :func:`blockers`)."""
    units, names = build(load_table(state_root))
    batch = {names[u].id: names[u] for u in unit_ids if u in names}
    memo: dict[str, float] = {}

    def chain(uid: str, seen: frozenset) -> float:
        if uid not in memo:
            unit = batch[uid]
            first = [v for v in batch if v not in seen and v != uid and (
                v in unit.after if jtype == "start" else v in unit.before)]
            memo[uid] = job_latency(state_root, unit, jtype) + max(
                (chain(v, seen | {uid}) for v in first), default=0.0)
        return memo[uid]
    return max((chain(u, frozenset()) for u in batch), default=0.0)


def blockers(unit: Unit, jtype: str, units: dict[str, Unit]) -> list[str]:
    """The units (ids) whose pending jobs a waiting ``jtype`` job of ``unit`` must wait for,
    as systemd's ``job_is_runnable()``/``job_compare()``: a unit it is ``After=`` when the job
    is a start (that unit's start or stop goes first), and a unit it is ``Before=`` whose job
    is a stop or restart (stops run in the reverse order, and before starts). ``units``:
    ``{id: Unit}`` (each with ``job`` None or an object with ``type``)."""
    out = []
    for uid in sorted(unit.after if jtype == "start" else ()):
        if uid in units and units[uid].job is not None:
            out.append(uid)
    for uid in sorted(unit.before):
        other = units.get(uid)
        if other is not None and other.job is not None and other.job.type in ("stop", "restart"):
            out.append(uid)
    return out


def log_job(state_root: str, ev: str, jid: int, unit_id: str, jtype: str,
            result: str | None = None) -> None:
    """Append one event to the job log (module docstring) with one ``write(2)``."""
    line = json.dumps({"ev": ev, "job": jid, "unit": unit_id, "type": jtype, "result": result,
                       "t": time.monotonic()}) + "\n"
    path = os.path.join(state_root, ".sim", "jobs.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_job_log(state_root: str) -> list[dict]:
    """The job log of ``state_root``, oldest first (``[]`` when no job ran yet)."""
    try:
        with open(os.path.join(state_root, ".sim", "jobs.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def scope_of(state_root: str, pid: int) -> str | None:
    """The unit systemd puts process ``pid`` in when it is a login session's process
    (``session-2.scope``) or a user instance's (``user@1000.service``): from
    ``.sim/scopes.json``, written by the desktop model (:mod:`testbed.sim.desktop`); None
    otherwise. Real systemd answers ``GetUnitByPID`` from the process's cgroup."""
    try:
        with open(os.path.join(state_root, ".sim", "scopes.json")) as f:
            return json.load(f).get(str(pid))
    except (OSError, ValueError):
        return None
