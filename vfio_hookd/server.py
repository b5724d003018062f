"""The control socket's server loop: accept, one thread per connection, and the limits that
keep the daemon alive under load. :class:`vfio_hookd.daemon.Daemon` supplies what a request
does (:meth:`Server.dispatch`).

Load (issue 9):

- Out of file descriptors (``EMFILE``/``ENFILE``, also ``ENOBUFS``/``ENOMEM``) on ``accept``
  is not fatal: the connections already accepted are served, and the loop accepts again when
  one of them ends (it waits on the condition their threads signal), or after a back-off that
  doubles from 50 ms to 2 s when the descriptors are held by something else. The waiting
  connections stay in the kernel's queue meanwhile. No busy loop.
- At most ``max_connections`` (64) connections are served at once; one beyond is answered at
  once ``DAEMON_BUSY`` and closed (so a flood of idle clients cannot take every thread and
  descriptor). A connection that sends no complete request within ``request_timeout_s`` is
  answered ``BAD_REQUEST`` and closed.
- A thread that cannot be started is answered ``DAEMON_BUSY`` too.
- Descriptors are kept for the requests in flight: a connection is accepted only while more
  than ``fd_headroom`` (32) descriptors are free under ``RLIMIT_NOFILE``'s soft limit, and a
  prepare/release starts only with :data:`FD_PER_REQUEST` free (else ``DAEMON_BUSY``). A D-Bus
  call needs a descriptor of its own (GDBus makes a ``GMainContext`` per synchronous call, and
  its ``GWakeup`` eventfd failing is a ``g_error()``: GLib aborts the process), a prepare about
  20 at its peak (sockets to systemd, logind and a user instance, their signal watches, sysfs
  writes, inotify, locks, the record); idle connections must never take them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import struct
import threading

from . import errors, memory
from .errors import HookdError

log = logging.getLogger("vfio_hookd")
MAX_REQUEST = 4 * 1024 * 1024
#: How deep a request's JSON may nest (the protocol's own requests are 1 deep).
MAX_JSON_DEPTH = 16
REQUEST_READ_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
#: accept(2) errors that mean "no descriptor or memory for one more connection now"
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: accept(2) errors about the one connection being accepted (it went away): accept the next
TRANSIENT = (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO)
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
#: Descriptors left free when accepting (see the module docstring).
FD_HEADROOM = 32
#: Descriptors a prepare or release needs free to start.
FD_PER_REQUEST = 16


def free_fds() -> int:
    """Descriptors this process may still open: ``RLIMIT_NOFILE``'s soft limit minus those
    open (``/proc/self/fd``, proc(5)); a large number when either is unknown or unlimited."""
    import resource
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        used = len(os.listdir("/proc/self/fd")) - 1   # listdir's own descriptor
    except OSError:
        return 1 << 30
    return soft - used


class Server:
    """A Unix stream socket server with one thread per connection.

    :param socket_path: where :meth:`bind` creates the socket (str).
    :param max_connections: connections served at once; more are answered ``DAEMON_BUSY``.
    :param request_timeout_s: how long (s) a connection may take to send its request line.
    :param fd_headroom: descriptors left free for the requests in flight: no connection is
        accepted while this many or fewer are free (0: accept until ``EMFILE``).
    """

    def __init__(self, socket_path: str, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_READ_TIMEOUT_S,
                 fd_headroom: int = FD_HEADROOM):
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.socket_path = socket_path
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.fd_headroom = fd_headroom
        self._sock: socket.socket | None = None
        self._busy = 0           # connections + background tasks: stop() waits for them
        self._connections = 0    # connections being served
        self._busy_cv = threading.Condition()
        self._stopping = False
        self._activated = False
        # stop() from another thread wakes the accept loop through this pipe, not by a
        # shutdown(2) of the socket: an activated socket is systemd's too
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._refusing = False   # in a DAEMON_BUSY episode (logged once per episode)

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

    def task_started(self) -> None:
        """Count a background task (e.g. a recovery release): :meth:`stop` waits for it."""
        with self._busy_cv:
            self._busy += 1

    def task_done(self) -> None:
        """The end of a task counted by :meth:`task_started`."""
        with self._busy_cv:
            self._busy -= 1
            self._busy_cv.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every connection and task to end; True if they did."""
        with self._busy_cv:
            return self._busy_cv.wait_for(lambda: self._busy == 0, timeout=timeout_s)

    def serve_forever(self, wake_fd: int | None = None) -> None:
        """Accept connections until :meth:`stop`; each request runs in its own thread.

        :param wake_fd: the read end of the pipe given to :func:`signal.set_wakeup_fd`. The
            kernel may deliver SIGTERM to any thread (GLib's among them), and Python runs its
            handler only when the main thread runs bytecode: waiting in ``select`` on the
            socket and this pipe wakes the main thread for every signal. No timeout: an idle
            daemon does not wake up.
        """
        assert self._sock is not None
        watched = [self._sock, self._wake_r] + ([wake_fd] if wake_fd is not None else [])
        backoff = 0.0
        while not self._stopping:
            try:
                ready, _, _ = select.select(watched, [], [])
                if wake_fd is not None and wake_fd in ready:
                    os.read(wake_fd, 512)   # the handler itself runs when we return to Python
                if self._sock not in ready:
                    continue
                if self.fd_headroom and (free := free_fds()) <= self.fd_headroom:
                    backoff = self._wait_for_fds(
                        backoff, "only %d file descriptors free (RLIMIT_NOFILE); accepting no "
                        "connection until more than %d are, for the %d connections open",
                        free, self.fd_headroom)
                    continue
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._stopping:
                    break
                if exc.errno in OUT_OF_FDS:
                    backoff = self._wait_for_fds(
                        backoff, "cannot accept a connection: %s (%d connections open); "
                        "accepting again when one ends", os.strerror(exc.errno or 0))
                    continue
                if exc.errno in TRANSIENT:
                    continue
                raise
            if backoff:
                backoff = 0.0
                log.info("accepting connections again")
            self._start(conn)

    def _wait_for_fds(self, backoff: float, message: str, *args) -> float:
        """Leave the waiting connections queued until a connection ends (its descriptors are
        free again) or the next backoff passes; returns that backoff (s, doubled from
        ``backoff`` between :data:`BACKOFF_MIN_S` and :data:`BACKOFF_MAX_S`). ``message`` is
        logged once per episode (at the first backoff), with ``args`` and then the number of
        connections open."""
        backoff = min(max(backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
        with self._busy_cv:
            n = self._connections
            if backoff == BACKOFF_MIN_S:
                log.warning(message, *args, n)
            self._busy_cv.wait_for(lambda: self._connections < n or self._stopping,
                                   timeout=backoff)
        return backoff

    def _start(self, conn: socket.socket) -> None:
        with self._busy_cv:   # counted before the thread runs: stop() waits for it
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
                self._busy += 1
        if full:
            self._refuse(conn, f"the daemon is serving {self.max_connections} connections "
                               f"already; retry shortly")
            return
        if self._refusing:
            self._refusing = False
            log.info("serving new connections again")
        try:
            threading.Thread(target=self._handle, args=(conn,), daemon=True,
                             name="request").start()
        except RuntimeError as exc:   # "can't start new thread"
            self._connection_done()
            self._refuse(conn, f"the daemon cannot start a thread for the request ({exc}); "
                               f"retry shortly")

    def _refuse(self, conn: socket.socket, message: str) -> None:
        """Answer ``DAEMON_BUSY`` without blocking the accept loop, and close."""
        if not self._refusing:
            self._refusing = True
            log.warning("refusing connections: %s", message, extra={"CODE": errors.DAEMON_BUSY})
        reply = {"ok": False, "error": HookdError(errors.DAEMON_BUSY, message).to_dict()}
        try:
            conn.setblocking(False)
            conn.send(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def _connection_done(self) -> None:
        with self._busy_cv:
            self._connections -= 1
            self._busy -= 1
            idle = self._busy == 0
            self._busy_cv.notify_all()
        if idle:   # the freed heap pages of the request go back (vfio_hookd.memory)
            memory.trim()

    def stop(self, wait_s: float = 600.0) -> None:
        """Stop accepting, then wait up to ``wait_s`` for requests in flight to finish (a
        prepare is never cut in half by a daemon stop)."""
        self._stopping = True
        with self._busy_cv:
            self._busy_cv.notify_all()
        try:
            os.write(self._wake_w, b"x")
        except OSError:     # full: the loop is awake already
            pass
        if self._sock is not None:
            if not self._activated:
                # ours alone; an activated socket is shared with systemd, and a shutdown(2)
                # of it fails the socket unit ("Got POLLHUP on a listening socket")
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._sock.close()
        self.wait_idle(wait_s)
        if not self._activated:   # systemd owns an activated socket's file
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    # ---- requests ---------------------------------------------------------------------------
    def dispatch(self, req: dict, send=lambda m: None) -> dict:
        """Run one request and return its result (the subclass's)."""
        raise NotImplementedError

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
            self._connection_done()

    @staticmethod
    def _check_peer(conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            raise HookdError(errors.PERMISSION_DENIED, f"uid {uid} may not use vfio-hookd (root only)")

    def _read_request(self, conn: socket.socket) -> dict:
        conn.settimeout(self.request_timeout_s)
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
                                                 f"{self.request_timeout_s:g} s") from None
        conn.settimeout(None)
        return parse_request(data.split(b"\n", 1)[0])


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
        raise HookdError(errors.BAD_REQUEST, f"request is not JSON: {str(exc)[:80]}") from None
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


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")
