"""A private system-like D-Bus bus with the simulated systemd on it.

:class:`SimBus` starts ``dbus-daemon`` (bus type ``system``, a unix socket under
``<root>/.sim/``, an allow-all policy) and :mod:`testbed.sim.systemd` on it, and waits for
both to be ready by reading their stdout (``--print-address`` and ``READY``), never by sleeping.
Point a client at it with ``DBUS_SYSTEM_BUS_ADDRESS=<address>`` or
``vfio_hookd.systemd.Systemd(address)``. Recipe: FIELD-NOTES §5 "A systemd to talk to".

Both run in their own session and get a parent-death signal (``PR_SET_PDEATHSIG``,
:mod:`.pdeathsig`) bound to the thread that creates the :class:`SimBus`: ``dbus-daemon``
SIGKILL, the simulated systemd SIGTERM (it then SIGKILLs its unit processes, as on stdin EOF),
so a SIGKILLed test run leaves none of them behind. Create the :class:`SimBus` in a thread that
lives as long as the bus is used (e.g. the main thread).

``python -m testbed.sim.bus --root R`` runs both in the foreground, prints the address on one
line and stops them on SIGTERM / SIGINT (or when either exits). Logs of both go to
``<root>/.sim/dbus-daemon.log`` and ``<root>/.sim/systemd.log``.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref

from .. import child_env
from ..pdeathsig import parent_death_signal
from ..procs import stop

#: AF_UNIX ``sun_path`` is 108 bytes including the terminating NUL (``unix(7)``).
_SUN_PATH_MAX = 107

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


def _address_value(path: str) -> str:
    """``path`` escaped as a D-Bus address value (D-Bus specification, "Server Addresses":
    every byte outside ``[-0-9A-Za-z_/.\\*]`` as ``%XX``), so a socket under a directory with
    a space, comma or ``&`` still gives a valid ``<listen>`` address (and valid XML)."""
    ok = set(b"-_/.\\*0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return "".join(chr(b) if b in ok else f"%{b:02x}" for b in os.fsencode(path))


def _read_line(proc: subprocess.Popen, deadline: float, what: str) -> str:
    """The first line ``proc`` writes on stdout, waiting for it with a deadline (monotonic s).

    :raises RuntimeError: the process exited or ``deadline`` passed first.
    """
    buf = b""
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{what} not ready within the deadline")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{what} exited with status {proc.wait()} before it was ready")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode().strip()


def _cleanup(procs: list, tmpdir: str | None) -> None:
    for p in procs:
        stop(p, 5.0)
    for p in procs:
        if p is not None and p.stdout:
            p.stdout.close()
        if p is not None and p.stdin:
            p.stdin.close()
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


class SimBus:
    """A private bus plus the simulated systemd for simulated host ``root``; a context manager.

    :param root: the simulated host root (str); ``<root>/.sim/`` is created if missing.
    :param ready_timeout_s: how long each process may take to be ready (s, default 10).
    :param state_root: the directory whose ``.sim/`` holds the bus files, ``units.json`` and
        the fault rules (str; default ``root``). Give it when ``root`` is a real root (``/`` in
        the kernel tests' guest), where no ``.sim/`` may be created.

    Attributes: ``address`` (str, a D-Bus address), ``pids`` (``[dbus-daemon pid,
    sim systemd pid]``). :meth:`stop` ends both by PID and waits for them.

    :raises RuntimeError: ``dbus-daemon`` missing, or a process did not get ready in time.
    """

    def __init__(self, root: str, ready_timeout_s: float = 10.0, state_root: str | None = None):
        self.root = os.path.abspath(root)
        self.state_root = os.path.abspath(state_root or root)
        self.address = ""
        self.pids: list[int] = []
        self.logind_pid = 0
        simdir = os.path.join(self.state_root, ".sim")
        os.makedirs(simdir, exist_ok=True)
        self._tmpdir = None
        socket = os.path.join(simdir, "bus.sock")
        if len(socket.encode()) > _SUN_PATH_MAX:
            self._tmpdir = tempfile.mkdtemp(prefix="vfio-hookd-bus-")
            socket = os.path.join(self._tmpdir, "bus.sock")
        if os.path.exists(socket):
            os.unlink(socket)  # left by a killed earlier run
        conf = os.path.join(simdir, "bus.conf")
        with open(conf, "w") as f:
            f.write(_CONFIG.format(socket=_address_value(socket)))
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise RuntimeError("dbus-daemon not found (Debian package dbus-daemon)")
        self._procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self._tmpdir)
        deadline = time.monotonic() + ready_timeout_s
        try:
            with open(os.path.join(simdir, "dbus-daemon.log"), "ab") as log:
                bus = subprocess.Popen(
                    [daemon, f"--config-file={conf}", "--nofork", "--nopidfile",
                     "--print-address=1"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True,   # a Ctrl-C at the terminal is the caller's to handle
                    preexec_fn=parent_death_signal(signal.SIGKILL))   # ...and so is its death
            self._procs.append(bus)
            self.address = _read_line(bus, deadline, "dbus-daemon")
            deadline = time.monotonic() + ready_timeout_s
            with open(os.path.join(simdir, "systemd.log"), "ab") as log:
                sim = subprocess.Popen(
                    [sys.executable, "-m", "testbed.sim.systemd", "--root", self.root,
                     "--state-root", self.state_root,
                     "--address", self.address, "--exit-on-stdin-eof"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    env=child_env(), start_new_session=True,
                    # SIGTERM, not SIGKILL: it then ends its unit processes before exiting
                    preexec_fn=parent_death_signal(signal.SIGTERM))
            self._procs.insert(0, sim)   # stopped first: it ends the unit processes
            line = _read_line(sim, deadline, "simulated systemd")
            if line != "READY":
                raise RuntimeError(f"simulated systemd said {line!r} instead of READY")
            if os.path.exists(os.path.join(simdir, "desktop.json")):
                self._start_logind(simdir, deadline + ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.pids = [bus.pid, sim.pid]

    def _start_logind(self, simdir: str, deadline: float) -> None:
        """Start the simulated logind (:mod:`testbed.sim.logind`) for the host's desktop."""
        with open(os.path.join(simdir, "logind.log"), "ab") as log:
            lg = subprocess.Popen(
                [sys.executable, "-m", "testbed.sim.logind", "--root", self.root,
                 "--state-root", self.state_root, "--address", self.address],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env=child_env(), start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGTERM))
        self._procs.insert(0, lg)   # stopped first: it ends the sessions' processes
        line = _read_line(lg, deadline, "simulated logind")
        if line != "READY":
            raise RuntimeError(f"simulated logind said {line!r} instead of READY")
        self.logind_pid = lg.pid

    def stop(self) -> None:
        """Stop the simulated systemd (it ends its unit processes), then the bus; wait for both."""
        self._finalizer()

    def __enter__(self) -> "SimBus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed.sim.bus --root R``: print the address, run until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(prog="python -m testbed.sim.bus")
    ap.add_argument("--root", required=True)
    opts = ap.parse_args(argv)

    def raise_exit(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, raise_exit)   # before the children exist: no window
    signal.signal(signal.SIGINT, raise_exit)
    with SimBus(opts.root) as sb:
        print(sb.address, flush=True)
        waited = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)   # children already have their mask
        while True:
            if signal.sigwait(waited) != signal.SIGCHLD:
                break
            if any(p.poll() is not None for p in sb._procs):
                print("testbed.sim.bus: a child exited; stopping", file=sys.stderr)
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
