"""The daemon: runs the state machines and answers on a Unix socket only root can use.

Protocol (one connection per request; UTF-8 JSON, one object per line):

- request: ``{"op": "prepare", "vm": NAME, "xml": DOMAIN_XML}``,
  ``{"op": "release", "vm": NAME, "reason": "destroyed"}``, ``{"op": "status", "vm": NAME|null}``,
  ``{"op": "ping"}``. Bounded: at most 4 MiB (:data:`MAX_REQUEST`), JSON nested at most
  :data:`MAX_JSON_DEPTH` deep, ``vm`` a VM name (at most 250 bytes, ``VM_NAME_INVALID``),
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
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import threading

from . import errors
from .errors import HookdError
from .host import Host
from .paths import Paths, check_vm_name

log = logging.getLogger("vfio_hookd")
MAX_REQUEST = 4 * 1024 * 1024
#: How deep a request's JSON may nest (the protocol's own requests are 1 deep).
MAX_JSON_DEPTH = 16
#: The longest ``reason`` of a release (libvirt's are words such as ``destroyed``).
MAX_REASON_CHARS = 256
REQUEST_READ_TIMEOUT_S = 10.0


class Daemon:
    """The control-socket server.

    :param host: the :class:`~vfio_hookd.host.Host` to act on.
    :param paths: the :class:`~vfio_hookd.paths.Paths`; the socket is ``paths.socket``.
    :param machine: the :class:`~vfio_hookd.machine.Machine` (default: one on ``host``).
    """

    def __init__(self, host: Host, paths: Paths, machine=None):
        from .machine import Machine
        self.host = host
        self.paths = paths
        self.socket_path = paths.socket
        self.machine = machine or Machine(host, paths)
        self._sock: socket.socket | None = None
        self._busy = 0
        self._busy_cv = threading.Condition()
        self._stopping = False
        self._activated = False

    # ---- lifecycle ------------------------------------------------------------------------
    def bind(self) -> None:
        """Take the listening socket from systemd (socket activation, sd_listen_fds(3):
        ``$LISTEN_PID``/``$LISTEN_FDS``, fd 3; ``systemd/vfio-hookd.socket``), or create the run
        directory (0700) and the socket (0600) itself. With socket activation, connections made
        while the daemon restarts wait in the kernel's queue instead of failing."""
        if os.environ.get("LISTEN_PID") == str(os.getpid()) and \
                int(os.environ.get("LISTEN_FDS", "0") or 0) >= 1:
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(var, None)
            sock = socket.socket(fileno=3)
            os.set_inheritable(3, False)
            self._activated = True
            self._sock = sock
            return
        run = os.path.dirname(self.socket_path)
        os.makedirs(run, mode=0o700, exist_ok=True)
        os.chmod(run, 0o700)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        sock.listen(16)
        self._sock = sock

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
        """Connect to systemd once, in the background after ``READY=1``, so the first prepare
        does not pay for the connection (about 10 ms). A failure is only logged: every
        request connects again if needed and reports ``SYSTEMD_UNAVAILABLE`` itself."""
        try:
            self.machine.systemd().connect()
        except HookdError as exc:
            log.warning("systemd not reachable yet: %s", exc)
        except Exception:
            log.exception("connecting to systemd failed")

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
                with self._busy_cv:
                    self._busy += 1
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
            with self._busy_cv:
                self._busy -= 1
                self._busy_cv.notify_all()

    def serve_forever(self, wake_fd: int | None = None) -> None:
        """Accept connections until :meth:`stop`; each request runs in its own thread.

        :param wake_fd: the read end of the pipe given to :func:`signal.set_wakeup_fd`. The
            kernel may deliver SIGTERM to any thread (GLib's among them), and Python runs its
            handler only when the main thread runs bytecode: waiting in ``select`` on the
            socket and this pipe wakes the main thread for every signal. No timeout: an idle
            daemon does not wake up.
        """
        assert self._sock is not None
        watched = [self._sock] + ([wake_fd] if wake_fd is not None else [])
        while not self._stopping:
            try:
                ready, _, _ = select.select(watched, [], [])
                if wake_fd is not None and wake_fd in ready:
                    os.read(wake_fd, 512)   # the handler itself runs when we return to Python
                if self._sock not in ready:
                    continue
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    break
                raise
            with self._busy_cv:   # counted before the thread runs: stop() waits for it
                self._busy += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True,
                             name="request").start()

    def stop(self, wait_s: float = 600.0) -> None:
        """Stop accepting, then wait up to ``wait_s`` for requests in flight to finish (a
        prepare is never cut in half by a daemon stop)."""
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._busy_cv:
            self._busy_cv.wait_for(lambda: self._busy == 0, timeout=wait_s)
        if not self._activated:   # systemd owns an activated socket's file
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    # ---- requests ---------------------------------------------------------------------------
    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    self._check_peer(conn)
                    req = self._read_request(conn)
                    reply = {"ok": True, "result": self.dispatch(req, lambda m: _send(conn, m))}
                except HookdError as exc:
                    reply = {"ok": False, "error": exc.to_dict()}
                except Exception as exc:  # a bug: log the traceback, answer INTERNAL
                    log.exception("request failed")
                    reply = {"ok": False, "error": HookdError(
                        errors.INTERNAL, f"{type(exc).__name__}: {exc}").to_dict()}
                try:
                    _send(conn, reply)
                except OSError:
                    log.warning("client went away before the answer")
        finally:
            with self._busy_cv:
                self._busy -= 1
                self._busy_cv.notify_all()

    @staticmethod
    def _check_peer(conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            raise HookdError(errors.PERMISSION_DENIED, f"uid {uid} may not use vfio-hookd (root only)")

    @staticmethod
    def _read_request(conn: socket.socket) -> dict:
        conn.settimeout(REQUEST_READ_TIMEOUT_S)
        data = b""
        try:
            while b"\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REQUEST:
                    raise HookdError(errors.BAD_REQUEST, f"request larger than {MAX_REQUEST} bytes")
        except socket.timeout:
            raise HookdError(errors.BAD_REQUEST, "request not received within "
                                                 f"{REQUEST_READ_TIMEOUT_S:g} s") from None
        conn.settimeout(None)
        return parse_request(data.split(b"\n", 1)[0])

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


def parse_request(line: bytes) -> dict:
    """The request in ``line`` (one line of UTF-8 JSON, without its newline).

    :returns: a dict whose ``op`` is a string (the other fields are checked by
        :meth:`Daemon.dispatch`).
    :raises HookdError: ``BAD_REQUEST`` for what is not JSON, nests deeper than
        :data:`MAX_JSON_DEPTH`, or is not an object with a string ``op``.
    """
    try:
        req = json.loads(line)
    except RecursionError:  # far deeper than MAX_JSON_DEPTH: json's C scanner gave up
        raise HookdError(errors.BAD_REQUEST, f"request nests deeper than {MAX_JSON_DEPTH} "
                                             f"levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HookdError(errors.BAD_REQUEST, f"request is not JSON: {_short(str(exc))}") from None
    if _depth_over(req, MAX_JSON_DEPTH):
        raise HookdError(errors.BAD_REQUEST, f"request nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise HookdError(errors.BAD_REQUEST, "request must be a JSON object with a string 'op'")
    return req


def _depth_over(value, limit: int) -> bool:
    """True when the JSON ``value`` nests lists/objects more than ``limit`` deep (iterative,
    linear in the containers; scalars are not visited one by one)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


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


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def preload() -> None:
    """Import what every request needs (profile parsing, systemd's D-Bus client, the holder
    scan) so that the first prepare does not pay for it (about 25 ms, bench/prepare_release.py).
    The D-Bus connection itself stays lazy."""
    import yaml  # noqa: F401
    from . import machine, plan, procs, profile, status, steps, systemd  # noqa: F401
    import psutil  # noqa: F401
    systemd.load_bindings()


def run(paths: Paths, host: Host | None = None, systemd_factory=None) -> int:
    """``vfio-hookd daemon``: serve until SIGTERM/SIGINT; returns the exit status.

    :param paths: where profiles, records and the socket are.
    :param host: the host to act on (default: the real one, ``Host("/")``).
    :param systemd_factory: as for :class:`vfio_hookd.machine.Machine` (default: the system
        bus's systemd).
    """
    from . import log as logmod
    from .machine import Machine
    logmod.setup()
    host = host or Host("/")
    daemon = Daemon(host, paths, Machine(host, paths, systemd_factory))
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
    logmod.notify("READY=1")
    threading.Thread(target=daemon.warm_up, daemon=True, name="warm-up").start()
    daemon.recover()
    daemon.serve_forever(wake_r)
    with daemon._busy_cv:
        daemon._busy_cv.wait_for(lambda: daemon._busy == 0, timeout=600)
    logmod.notify("STOPPING=1")
    log.info("stopped")
    return 0
