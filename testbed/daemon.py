"""vfio-hookd's daemon in a child process: start it, wait until it is ready, stop it by PID.

:class:`DaemonProcess` is the one way the demo, the tests, the benchmarks and the kernel guest
start the daemon:

- on a simulated host (``root`` given): ``python -m testbed.daemon --root ROOT`` (below), which
  runs the product's daemon through its API with a :class:`testbed.sim.kernel.SimHost`;
- on ``/`` (``root`` None; the kernel tests' guest): ``python -m vfio_hookd daemon``, exactly
  what ``vfio-hookd.service`` runs.

Readiness is the daemon's own ``READY=1`` on ``$NOTIFY_SOCKET`` (sd_notify(3); an abstract
unix datagram socket here), waited for together with the child's pidfd: a daemon that exits
first fails at once with the end of its log, and nothing sleeps. The child runs in its own
session (a Ctrl-C at the terminal is the caller's to handle) and gets SIGTERM when the thread
that started it dies (``PR_SET_PDEATHSIG``, :mod:`testbed.pdeathsig`), so a killed test run
leaves no daemon behind. :meth:`DaemonProcess.stop` sends SIGTERM by PID (the daemon finishes
the requests in flight), SIGKILL after a deadline (:func:`testbed.procs.stop`).

``python -m testbed.daemon --root DIR`` serves the simulated host in ``DIR`` (built by
:func:`testbed.sim.make_host`): it builds ``SimHost(DIR)`` and calls
``vfio_hookd.daemon.run(Paths.from_env(), host=host)``. It refuses to start unless
``$DBUS_SYSTEM_BUS_ADDRESS`` names a bus other than the machine's system bus (the simulated
systemd's, :class:`testbed.sim.bus.SimBus`): with the machine's own systemd, a prepare on the
simulated host would stop this machine's display manager.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from . import child_env
from .pdeathsig import parent_death_signal
from .procs import stop as stop_process

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
#: The machine's own system bus sockets (D-Bus specification, "Well-known Message Bus
#: Instances"; /var/run is /run on Debian).
_REAL_BUS_SOCKETS = ("/var/run/dbus/system_bus_socket", "/run/dbus/system_bus_socket")


class DaemonError(RuntimeError):
    """The daemon did not get ready (it exited first, or no ``READY=1`` in time); the message
    ends with the last lines of its log."""


class DaemonProcess:
    """``vfio-hookd``'s daemon in a child process, ready when constructed.

    :param root: a simulated host directory (``python -m testbed.daemon --root ROOT``), or None
        for the real root ``/`` (``python -m vfio_hookd daemon``).
    :param env: the child's environment (default ``os.environ``); the repository goes first
        on ``PYTHONPATH`` (:func:`testbed.child_env`) and ``NOTIFY_SOCKET`` is set here.
    :param argv: the command instead of the default one (e.g. the benchmarks' measuring shim);
        it must end up calling the daemon's ``run()`` with ``$NOTIFY_SOCKET`` passed on.
    :param python: the interpreter for the default command (default ``sys.executable``).
    :param log_path: append the daemon's stdout and stderr to this file; None: read them
        through a pipe into :attr:`lines`, each line also handed to ``echo`` if given.
    :param echo: called with each log line (str, no newline) when ``log_path`` is None.
    :param ready_timeout_s: deadline (s) for ``READY=1``.
    :param cwd: the child's working directory.

    Attributes: ``proc`` (:class:`subprocess.Popen`), ``pid``, ``ready_ms`` (float, from just
    before the start to ``READY=1``), ``lines`` (log lines read through the pipe).

    :raises DaemonError: it exited before ``READY=1`` or did not send it in time (it is
        stopped then).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, env: dict | None = None,
                 argv: list[str] | None = None, python: str | None = None,
                 log_path: str | os.PathLike | None = None,
                 echo: Callable[[str], None] | None = None,
                 ready_timeout_s: float = READY_TIMEOUT_S, cwd: str | os.PathLike | None = None):
        python = python or sys.executable
        if argv is None:
            argv = ([python, "-m", "testbed.daemon", "--root", os.fspath(root)] if root is not None
                    else [python, "-m", "vfio_hookd", "daemon"])
        self.argv = list(argv)
        self.lines: list[str] = []
        self.log_path = os.fspath(log_path) if log_path is not None else None
        self._echo = echo
        self._reader: threading.Thread | None = None
        self._stopped = False
        self.returncode: int | None = None
        name = f"vfio-hookd-testbed-{os.getpid()}-{time.monotonic_ns()}"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind("\0" + name)
        child = child_env(env, NOTIFY_SOCKET="@" + name)
        if self.log_path is not None:
            out = open(self.log_path, "ab")
        else:
            out = subprocess.PIPE
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                self.argv, env=child, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGTERM))
        except BaseException:
            self._notify.close()
            raise
        finally:
            if out is not subprocess.PIPE:
                out.close()
        self.pid = self.proc.pid
        if out is subprocess.PIPE:
            self._reader = threading.Thread(target=self._pump, daemon=True, name="daemon-log")
            self._reader.start()
        try:
            self._wait_ready(time.monotonic() + ready_timeout_s, ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_ms = round((time.perf_counter() - t0) * 1000.0, 1)

    # ---- log ----------------------------------------------------------------------------------
    def _pump(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if self._echo is not None:
                self._echo(line)

    def read_log(self) -> str:
        """Everything the daemon wrote so far (str)."""
        if self.log_path is None:
            return "\n".join(self.lines)
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _tail(self, n: int = 8) -> str:
        if self._reader is not None:
            self._reader.join(5)   # its last lines, when it exited
        lines = self.read_log().splitlines()[-n:]
        return " | ".join(lines) if lines else "(no output)"

    # ---- readiness ----------------------------------------------------------------------------
    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonError(f"vfio-hookd daemon (pid {self.pid}): no READY=1 within "
                                      f"{timeout_s:g} s: {self._tail()}")
                ready, _, _ = select.select([self._notify, pidfd], [], [], left)
                if self._notify in ready:
                    msg = self._notify.recv(4096).decode(errors="replace")
                    if "READY=1" in msg.split("\n"):
                        return
                elif pidfd in ready:
                    raise DaemonError(f"vfio-hookd daemon exited with status {self.proc.wait()} "
                                      f"before READY=1: {self._tail()}")
        finally:
            os.close(pidfd)

    # ---- stop ---------------------------------------------------------------------------------
    def running(self) -> bool:
        """True while the daemon process has not exited."""
        return self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM by PID (the daemon finishes requests in flight), SIGKILL after ``timeout_s``
        (s), reap; returns its exit status (``-signal.SIGKILL`` when it had to be killed).
        Calling it again returns the same status."""
        if not self._stopped:
            self._stopped = True
            self.returncode = stop_process(self.proc, timeout_s)
            if self._reader is not None:
                self._reader.join(5)
            self._notify.close()
        return self.returncode

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- python -m testbed.daemon --root DIR ---------------------------------------------------------

def require_private_bus() -> None:
    """Refuse to run the daemon for a simulated host against the machine's own systemd."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "")
    if not address or any(s in address for s in _REAL_BUS_SOCKETS):
        raise SystemExit("testbed.daemon: DBUS_SYSTEM_BUS_ADDRESS must name the simulated "
                         "systemd's private bus (testbed.sim.bus.SimBus), not the system bus "
                         f"(got {address!r}); refusing to start")


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed.daemon --root DIR``: the product's daemon on simulated host ``DIR``
    (``vfio_hookd.daemon.run(Paths.from_env(), host=SimHost(DIR))``); its exit status."""
    ap = argparse.ArgumentParser(prog="python -m testbed.daemon",
                                 description="vfio-hookd's daemon on a simulated host")
    ap.add_argument("--root", required=True, help="the simulated host directory")
    ap.add_argument("--max-connections", type=int, default=None,
                    help="the daemon's max_connections (default: the product's)")
    ap.add_argument("--request-timeout", type=float, default=None,
                    help="the daemon's request_timeout_s (default: the product's)")
    ap.add_argument("--fd-headroom", type=int, default=None,
                    help="the daemon's fd_headroom (default: the product's)")
    opts = ap.parse_args(argv)
    require_private_bus()
    from vfio_hookd import daemon
    from vfio_hookd.paths import Paths

    from testbed.sim.kernel import SimHost
    try:
        host = SimHost(opts.root)
    except ValueError as exc:
        raise SystemExit(f"testbed.daemon: {exc}") from None
    limits = {k: v for k, v in (("max_connections", opts.max_connections),
                                ("request_timeout_s", opts.request_timeout),
                                ("fd_headroom", opts.fd_headroom)) if v is not None}
    return daemon.run(Paths.from_env(), host=host, **limits)


if __name__ == "__main__":
    sys.exit(main())
