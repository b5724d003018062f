"""Processes that hold a GPU's device nodes, and ending them. The only module using psutil.

Holders are found the way ``fuser`` does it: every ``/proc/PID/fd/*`` is ``stat``-ed and compared
with the node (``st_rdev`` for a character device, ``st_dev``/``st_ino`` for the simulated host's
regular files), and ``/proc/PID/maps`` is read for mappings of the node (a mapped device holds
it too; FIELD-NOTES §2). Waiting for a process to end uses a pidfd (Linux >= 5.3,
``pidfd_open(2)``) polled with a deadline: no sleeping.
"""

from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import asdict, dataclass

from .host import Host, identity_of


@dataclass(frozen=True)
class Holder:
    """One process holding one node: ``pid`` (int), ``command`` (str, the process name),
    ``node`` (str, host path such as ``/dev/dri/card0``)."""
    pid: int
    command: str
    node: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"PID {self.pid} ({self.command}) holds {self.node}"


def _command(pid: int) -> str:
    import psutil
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def find_holders(host: Host, nodes: list[str], exclude: set[int] | None = None) -> list[Holder]:
    """Every process holding one of ``nodes`` (host paths), sorted by PID then node.

    :param exclude: PIDs to leave out (default: this process).
    Nodes that do not exist are skipped. Processes that vanish while scanned are skipped.
    """
    exclude = exclude if exclude is not None else {os.getpid()}
    wanted: dict[tuple, str] = {}
    map_paths: dict[str, str] = {}
    for node in nodes:
        ident = host.node_identity(node)
        if ident is not None:
            wanted[ident] = node
            map_paths[host.path(node)] = node
    if not wanted:
        return []
    found: set[tuple[int, str]] = set()
    needles = [p.encode() for p in map_paths]
    for entry in os.listdir(host.proc):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        pid = int(entry)
        fd_dir = f"{host.proc}/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                # sockets, pipes and anon inodes ("socket:[123]") cannot be device nodes:
                # skip their stat (most fds of a desktop are of that kind)
                if not os.readlink(f"{fd_dir}/{fd}").startswith("/"):
                    continue
                ident = identity_of(os.stat(f"{fd_dir}/{fd}"))
            except OSError:
                continue
            if ident in wanted:
                found.add((pid, wanted[ident]))
        try:
            with open(f"{host.proc}/{entry}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            continue
        if not any(n in maps for n in needles):
            continue
        for line in maps.decode(errors="replace").splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5] in map_paths:
                found.add((pid, map_paths[parts[5]]))
    return [Holder(pid, _command(pid), node) for pid, node in sorted(found)]


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` has ended, at most ``timeout_s`` seconds.

    :returns: True when it is gone, False at the deadline.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        # a readable pidfd: the process exited (it may still be a zombie of its parent)
        return _wait_fd(pidfd, timeout_s)
    finally:
        os.close(pidfd)


def terminate(pids: list[int], timeout_s: float) -> list[int]:
    """SIGTERM every PID at once, wait up to ``timeout_s`` (s) in all for them to end; SIGKILL
    every one left at once and wait up to ``timeout_s`` again in all (pidfds: signals never
    reach a reused PID; pidfd_open(2)). At most ``2 * timeout_s`` whatever the count.

    :returns: the PIDs still alive after that (empty on success).
    """
    pidfds = {}
    for pid in pids:
        try:
            pidfds[pid] = os.pidfd_open(pid)   # signals go to this process, never a reused PID
        except ProcessLookupError:
            pass
    try:
        for fd in pidfds.values():
            _signal(fd, signal.SIGTERM)
        left = _wait_all(pidfds, list(pidfds), timeout_s)
        for pid in left:
            _signal(pidfds[pid], signal.SIGKILL)
        return _wait_all(pidfds, left, timeout_s)
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _wait_all(pidfds: dict[int, int], pids: list[int], timeout_s: float) -> list[int]:
    """Wait until every PID of ``pids`` has ended or ``timeout_s`` (s) has passed, whichever
    comes first; the PIDs still running (one poll over all their pidfds, no per-PID wait)."""
    deadline = time.monotonic() + timeout_s
    left = set(pids)
    poller = select.poll()
    for pid in left:
        poller.register(pidfds[pid], select.POLLIN)
    by_fd = {pidfds[pid]: pid for pid in left}
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _ev in poller.poll(max(1, int(remaining * 1000))):
            poller.unregister(fd)
            left.discard(by_fd[fd])
    return sorted(left)


def _signal(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass


def _wait_fd(pidfd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))
