"""The daemon: runs the state machines and answers on a Unix socket only root can use.

Protocol (one connection per request; UTF-8 JSON, one object per line):

- request: ``{"op": "prepare", "vm": NAME, "xml": DOMAIN_XML}``,
  ``{"op": "release", "vm": NAME, "reason": "destroyed"}``, ``{"op": "status", "vm": NAME|null}``,
  ``{"op": "ping"}``. Bounded: at most 4 MiB (:data:`vfio_hookd.server.MAX_REQUEST`), JSON nested at most
  :data:`vfio_hookd.server.MAX_JSON_DEPTH` deep, ``vm`` a VM name (at most 250 bytes, ``VM_NAME_INVALID``),
  ``xml`` at most 1 MiB (``DOMAIN_XML_INVALID``), ``reason`` at most :data:`MAX_REASON_CHARS`;
  a field of the wrong type is ``BAD_REQUEST`` naming it. ``INTERNAL`` is left for bugs.
- for prepare/release, at once: ``{"accepted": true, "deadline_s": S}``: the daemon answers
  within S seconds: the plan's deadline, summed from what each step declares it may wait
  (rollback included; :mod:`vfio_hookd.plan`).
- then: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": {"code", "message", "details"}}``.

The socket is ``<run>/vfio-hookd.sock``, mode 0600 in a 0700 directory; peers are checked with
``SO_PEERCRED`` and only root (or the daemon's own user, for tests) is served. The accept loop
blocks in ``accept(2)``: an idle daemon has no periodic wake-ups. The modules a request needs
(yaml, gi/pydbus, psutil: about 10 MB) are imported once before ``READY=1``, so the first
request after boot is as fast as the others; libvirt-python is never imported by the daemon.
The socket loop and its limits under load are :mod:`vfio_hookd.server`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from . import errors
from .errors import HookdError
from .host import Host
from .paths import Paths, check_vm_name
from .server import (FD_HEADROOM, FD_PER_REQUEST, MAX_CONNECTIONS, REQUEST_READ_TIMEOUT_S,
                     Server, free_fds)

log = logging.getLogger("vfio_hookd")
#: The longest ``reason`` of a release (libvirt's are words such as ``destroyed``).
MAX_REASON_CHARS = 256


class Daemon(Server):
    """The control-socket server.

    :param host: the :class:`~vfio_hookd.host.Host` to act on.
    :param paths: the :class:`~vfio_hookd.paths.Paths`; the socket is ``paths.socket``.
    :param machine: the :class:`~vfio_hookd.machine.Machine` (default: one on ``host``).
    :param max_connections: connections served at once; more are answered ``DAEMON_BUSY``.
    :param request_timeout_s: how long (s) a client may take to send its request.
    :param fd_headroom: descriptors kept free for the requests in flight
        (:class:`vfio_hookd.server.Server`).
    """

    def __init__(self, host: Host, paths: Paths, machine=None,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_READ_TIMEOUT_S,
                 fd_headroom: int = FD_HEADROOM):
        from .machine import Machine
        super().__init__(paths.socket, max_connections, request_timeout_s, fd_headroom)
        self.host = host
        self.paths = paths
        self.machine = machine or Machine(host, paths)

    # ---- lifecycle ------------------------------------------------------------------------
    def log_records(self) -> None:
        """Log every record found at start (journal fields VM=, PHASE=)."""
        for name, rec in self.machine.records.load_all().items():
            if isinstance(rec, HookdError):
                log.error("%s", rec, extra={"VM": name, "CODE": rec.code})
                continue
            held = [s.name for s in rec.steps if s.held]
            log.info("record found: phase %s%s", rec.phase,
                     f", holding {', '.join(held)}" if held else "",
                     extra={"VM": name, "PHASE": rec.phase})

    def warm_up(self) -> None:
        """Connect to systemd and logind once, and subscribe to logind's signals, in the
        background after ``READY=1``, so the first prepare does not pay for the connections
        (about 10 ms), nor grow the daemon's memory, threads or descriptors by them
        (bench/daemon_memory.py). A failure is only logged: every request
        connects again if needed and reports ``SYSTEMD_UNAVAILABLE`` itself."""
        try:
            self.machine.systemd().connect()
            log.info("connected to systemd")
        except HookdError as exc:
            log.warning("systemd not reachable yet: %s", exc)
        except Exception:
            log.exception("connecting to systemd failed")
        try:
            logind = self.machine.logind()
            up = logind.available()
            # the subscription to its signals, one for the daemon's life (gdbus.SignalWatch),
            # also while logind is not there yet: it is on the bus connection
            watch = logind.watch()
            if watch is not None:
                watch.close()
            log.info("connected to systemd-logind" if up else "systemd-logind is not on the bus")
        except Exception as exc:   # a request says it again, with its code
            log.warning("systemd-logind not reachable yet: %s", exc)

    def retake_inhibitors(self) -> dict:
        """Take the logind inhibitor locks again for the VMs still prepared
        (:func:`vfio_hookd.steps.inhibit.retake_all`): the locks of the daemon that ran before
        ended with its descriptors. Called before ``READY=1``, so a ``systemctl restart`` has
        them back when it returns; a failure is logged and shown by status, never fatal.

        :returns: ``{vm: None (taken) or the error (str)}``.
        """
        from .steps.inhibit import retake_all
        return retake_all(self.machine, log)

    def recover(self) -> list[threading.Thread]:
        """Release, in the background, every VM whose record was left ``preparing`` or
        ``releasing`` by a daemon that died mid-operation. Such a prepare never answered, so
        libvirt aborted that start: no VM runs on it, and the host must get its desktop back.
        Records ``prepared`` (the VM may be running) or ``failed`` (the user was told) are left.

        :returns: the started threads (tests join them).
        """
        threads = []
        for name, rec in self.machine.records.load_all().items():
            if not isinstance(rec, HookdError) and rec.phase in ("preparing", "releasing") \
                    and rec.holds_host:
                log.warning("record left %s by an earlier daemon: releasing", rec.phase,
                            extra={"VM": name, "PHASE": rec.phase})
                t = threading.Thread(target=self._recover_one, args=(name,), daemon=True,
                                     name=f"recover {name}")
                self.task_started()
                t.start()
                threads.append(t)
        return threads

    def _recover_one(self, name: str) -> None:
        try:
            self.machine.release(name, "daemon restart")
        except HookdError as exc:
            log.error("recovery release failed: %s", exc, extra={"VM": name})
        except Exception:
            log.exception("recovery release failed", extra={"VM": name})
        finally:
            self.task_done()

    # ---- requests ---------------------------------------------------------------------------
    def dispatch(self, req: dict, send=lambda m: None) -> dict:
        """Run one request (shape in the module docstring) and return its result (dict).

        :param send: called with the ``accepted`` message before a long operation.
        :raises HookdError: the operation's error, or ``BAD_REQUEST`` naming the bad field.
        """
        op = req["op"]
        if op == "ping":
            return {"pid": os.getpid(), "host_root": self.host.root}
        if op == "status":
            vm = _field(req, "vm", "a string or null", null=True)
            if vm is not None:
                check_vm_name(vm)
            return self.machine.status(vm)
        if op not in ("prepare", "release"):
            raise HookdError(errors.BAD_REQUEST, f"unknown op {_short(op)!r} "
                                                 f"(prepare, release, status, ping)")
        vm = check_vm_name(_field(req, "vm", "a string"))
        free = free_fds()
        if free < FD_PER_REQUEST:   # a D-Bus call without a descriptor aborts GLib
            raise HookdError(errors.DAEMON_BUSY, f"the daemon has {free} file descriptors "
                             f"free (RLIMIT_NOFILE), a {op} needs {FD_PER_REQUEST}; retry when "
                             f"the requests in flight have ended")
        if op == "prepare":
            from .profile.domain_xml import check_domain_xml_size
            xml = _field(req, "xml", "a string or null", null=True)
            if xml is not None:
                check_domain_xml_size(xml, f"domain XML of {vm!r}")
            plan = self.machine.plan_prepare(vm, xml)
            reason = None
        else:
            reason = _field(req, "reason", "a string or null", null=True)
            if reason is not None and (len(reason) > MAX_REASON_CHARS
                                       or not reason.isprintable()):
                raise HookdError(errors.BAD_REQUEST, f"field 'reason' must be printable text of "
                                 f"at most {MAX_REASON_CHARS} characters (got {len(reason)})")
            plan = self.machine.plan_release(vm)
        send({"accepted": True, "deadline_s": plan.deadline_s})
        rec = self.machine.run(plan, reason)
        return {"vm": vm, "phase": rec.phase if rec else "idle"}


def _field(req: dict, name: str, what: str, null: bool = False):
    """``req[name]``, which must be a string (or null/absent when ``null``).

    :raises HookdError: ``BAD_REQUEST`` naming the field and the type it has.
    """
    value = req.get(name)
    if isinstance(value, str) or (null and value is None):
        return value
    got = "missing" if value is None else type(value).__name__
    raise HookdError(errors.BAD_REQUEST, f"field {name!r} must be {what}, got {got}")


def _short(s: str, limit: int = 80) -> str:
    """``s`` cut to ``limit`` characters for a message."""
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} characters)"


def preload() -> None:
    """Import what every request needs (profile parsing, systemd's and logind's D-Bus clients,
    the holder scan, the domain XML reader) so that the first prepare does not pay for it
    (about 25 ms, bench/prepare_release.py), and its memory is the daemon's from the start,
    not a growth of the first request (bench/daemon_memory.py). The D-Bus connection itself
    stays lazy."""
    import pwd  # noqa: F401
    import yaml  # noqa: F401
    from . import machine, plan, procs, profile, status, steps, systemd  # noqa: F401
    from . import gdbus, gpu_users, inotify, logind, usermgr  # noqa: F401
    from .profile import domain_xml  # noqa: F401
    import defusedxml.ElementTree  # noqa: F401
    import psutil  # noqa: F401
    systemd.load_bindings()
    rehearse()


#: :func:`rehearse`'s profile: every kind of value a profile holds (lists, a mapping, numbers,
#: strings, ``auto``) in the YAML forms users write (flow and block lists, quoted strings).
REHEARSAL_PROFILE = """\
devices: ["0000:01:00.0", "0000:01:00.1"]
stop_units:
  - nvidia-persistenced.service
modules: auto
on_busy: fail
inhibit: sleep
hugepages: auto
host_cpus: auto
cpu_governor: performance
deadlines: {unit_stop: 100, desktop_back: 30}
"""

#: :func:`rehearse`'s domain XML: a PCI ``<hostdev>``, CPU pinning and hugepages, as libvirt
#: passes them to the hook (formatdomain.html).
REHEARSAL_DOMAIN_XML = """\
<domain type="kvm">
  <name>rehearsal</name>
  <memory unit="KiB">8388608</memory>
  <memoryBacking><hugepages><page size="2048" unit="KiB"/></hugepages></memoryBacking>
  <vcpu placement="static">2</vcpu>
  <cputune><vcpupin vcpu="0" cpuset="2"/><vcpupin vcpu="1" cpuset="3"/>
    <emulatorpin cpuset="1"/></cputune>
  <devices>
    <hostdev mode="subsystem" type="pci" managed="yes">
      <source><address domain="0x0000" bus="0x01" slot="0x00" function="0x0"/></source>
    </hostdev>
  </devices>
</domain>
"""


def rehearse() -> dict:
    """The pure part of a prepare once, on the built-in :data:`REHEARSAL_PROFILE` and
    :data:`REHEARSAL_DOMAIN_XML`: nothing is read from disk and nothing on the host is looked
    at or changed. It parses the profile (libyaml) and the domain XML (expat) and encodes a
    record as JSON, so that the first use of each (the C libraries' code pages, the caches of
    ``re`` and ``dataclasses``) is the daemon's from the start and not a growth of the first
    request (bench/daemon_memory.py).

    :returns: ``{"profile": Profile, "devices": tuple, "cpusets": dict, "hugepages": dict,
        "record_bytes": int}`` (what the rehearsal read, for its test).
    :raises HookdError: only if the built-in input no longer passes the product's own checks
        (a bug; ``tests/test_memory.py`` runs it).
    """
    import json

    from .profile import parse_profile
    from .profile.domain_xml import (cputune_cpusets, devices_from_domain_xml,
                                     hugepages_from_domain_xml)
    from .record import Record
    prof = parse_profile(REHEARSAL_PROFILE, "<rehearsal>", "rehearsal")
    devices = devices_from_domain_xml(REHEARSAL_DOMAIN_XML, "rehearsal domain XML")
    cpusets = cputune_cpusets(REHEARSAL_DOMAIN_XML, "rehearsal domain XML")
    pages = hugepages_from_domain_xml(REHEARSAL_DOMAIN_XML, "rehearsal domain XML")
    rec = Record.new("rehearsal", devices, {a: None for a in devices},
                     prof.deadlines.to_dict(), ["units", "bind_vfio"])
    text = json.dumps(rec.to_json(), sort_keys=True, separators=(",", ":"))   # as saved
    return {"profile": prof, "devices": devices, "cpusets": cpusets, "hugepages": pages,
            "record_bytes": len(text)}


def run(paths: Paths, host: Host | None = None, systemd_factory=None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_READ_TIMEOUT_S, fd_headroom: int = FD_HEADROOM) -> int:
    """``vfio-hookd daemon``: serve until SIGTERM/SIGINT; returns the exit status.

    :param paths: where profiles, records and the socket are.
    :param host: the host to act on (default: the real one, ``Host("/")``).
    :param systemd_factory: as for :class:`vfio_hookd.machine.Machine` (default: the system
        bus's systemd).
    :param max_connections: as for :class:`Daemon`.
    :param request_timeout_s: as for :class:`Daemon`.
    :param fd_headroom: as for :class:`Daemon`.
    """
    from . import log as logmod
    from . import memory
    from .machine import Machine
    memory.limit_arenas()   # before any thread: one malloc arena (vfio_hookd.memory)
    logmod.setup()
    host = host or Host("/")
    daemon = Daemon(host, paths, Machine(host, paths, systemd_factory),
                    max_connections=max_connections, request_timeout_s=request_timeout_s,
                    fd_headroom=fd_headroom)
    daemon.bind()
    log.info("vfio-hookd daemon listening on %s (host root %s)", daemon.socket_path, host.root)
    daemon.log_records()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping after requests in flight", signum)
        threading.Thread(target=daemon.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    preload()
    memory.trim()   # the start's garbage, before the first request is measured against it
    daemon.retake_inhibitors()   # before serving: the host must not sleep under a running VM
    logmod.notify("READY=1")
    threading.Thread(target=daemon.warm_up, daemon=True, name="warm-up").start()
    daemon.recover()
    daemon.serve_forever(wake_r)
    daemon.wait_idle(600)
    logmod.notify("STOPPING=1")
    log.info("stopped")
    return 0
