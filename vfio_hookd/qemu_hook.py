#!/usr/bin/python3 -IS
"""vfio-hookd's libvirt qemu hook: install as ``/etc/libvirt/hooks/qemu.d/vfio-hookd``.

libvirt runs it as ``vfio-hookd NAME OPERATION SUB-OPERATION EXTRA`` with the domain XML on
stdin (libvirt ``docs/hooks.rst``). Standard library only, absolute interpreter path, ``-I -S``
so that nothing from the environment or site-packages is loaded (fast, and the same interpreter
whatever libvirtd's PATH is).

- ``prepare begin`` and ``release end`` of a VM with a profile
  (``$VFIO_HOOKD_CONFIG/vms/NAME.yaml``, default ``/etc/vfio-hookd``) are sent to the daemon
  (``$VFIO_HOOKD_RUN/vfio-hookd.sock``, default ``/run/vfio-hookd``), and the hook waits for the
  answer within the deadline the daemon states when it accepts the request. ``release end`` is
  also sent for a VM with a record (``$VFIO_HOOKD_RUN/vms/NAME.json``) whose profile is gone.
- Everything else exits 0 at once, prints nothing and contacts nothing.
- On failure: one line ``CODE: message`` on stderr and exit status 1; libvirt then aborts the
  start and shows the line to the user.
- The domain XML on stdin is read up to ``MAX_XML_BYTES`` (the daemon's limit, 1 MiB) plus one
  byte, within ``STDIN_TIMEOUT_S``: more, or a stdin that does not end in time (libvirt writes
  the XML and closes the pipe at once), is ``DOMAIN_XML_INVALID``, nothing is sent.
- It never calls libvirt (the domain is locked while a hook runs: a call back deadlocks) and
  starts no child, so nothing can keep libvirt waiting on its stdout/stderr.
"""

import os
import sys

HANDLED = {("prepare", "begin"): "prepare", ("release", "end"): "release"}
ACCEPT_TIMEOUT_S = 15.0   # the daemon accepts a request at once; this covers a loaded machine
ANSWER_MARGIN_S = 10.0    # added to the deadline the daemon states
#: The largest domain XML (bytes) the hook reads from stdin: the daemon's limit
#: (vfio_hookd.profile.domain_xml.MAX_DOMAIN_XML_BYTES; libvirt's XML of a big VM is far below).
MAX_XML_BYTES = 1024 * 1024
STDIN_TIMEOUT_S = 10.0    # libvirt writes the XML to the pipe and closes it before waiting


class HookFailure(Exception):
    """``CODE: message`` to print; ``code`` and ``message`` as the daemon sent them."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def run_dir():
    """The runtime directory: records and socket (see vfio_hookd.paths)."""
    return os.environ.get("VFIO_HOOKD_RUN") or "/run/vfio-hookd"


def socket_path():
    """The daemon's socket (see vfio_hookd.paths)."""
    return os.path.join(run_dir(), "vfio-hookd.sock")


def request(payload, on_accept=None, path=None):
    """Send ``payload`` (dict) to the daemon and return its ``result`` (dict).

    Waits ``ACCEPT_TIMEOUT_S`` for the connection and the first answer: a daemon whose listen
    queue is full (a burst of requests) is waited for, not reported unreachable. After an
    ``accepted`` message, waits the daemon's ``deadline_s`` plus ``ANSWER_MARGIN_S``.

    :raises HookFailure: ``DAEMON_UNREACHABLE`` (no daemon, or its queue stayed full),
        ``TIMEOUT``, ``DAEMON_BUSY`` or the daemon's error.
    """
    import json
    import socket
    import time
    path = path or socket_path()
    deadline = time.monotonic() + ACCEPT_TIMEOUT_S
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _connect(sock, path, deadline)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            send_error = None
        except OSError as exc:   # a daemon that refused at once (DAEMON_BUSY) has answered
            send_error = exc
        reader = sock.makefile("rb")
        while True:
            try:
                line = reader.readline()
            except socket.timeout:
                raise HookFailure("TIMEOUT", f"the vfio-hookd daemon did not answer within "
                                             f"{sock.gettimeout():g} s; see: journalctl -u "
                                             f"vfio-hookd") from None
            except OSError as exc:
                raise HookFailure("DAEMON_UNREACHABLE", f"connection to the daemon failed: {exc}") from None
            if not line:
                why = f" ({send_error.strerror or send_error})" if send_error else ""
                raise HookFailure("DAEMON_UNREACHABLE", f"the daemon closed the connection without "
                                                        f"an answer{why}; see: journalctl -u vfio-hookd")
            msg = json.loads(line)
            if msg.get("accepted"):
                sock.settimeout(float(msg.get("deadline_s", 600)) + ANSWER_MARGIN_S)
                if on_accept:
                    on_accept(msg)
                continue
            if msg.get("ok"):
                return msg.get("result") or {}
            err = msg.get("error") or {}
            raise HookFailure(err.get("code", "INTERNAL"), err.get("message", "unknown error"))
    finally:
        sock.close()


def _connect(sock, path, deadline):
    """Connect ``sock`` to ``path`` by ``deadline`` (``time.monotonic()``).

    A Unix socket whose listen queue is full makes a non-blocking ``connect`` fail with
    ``EAGAIN`` at once, and ``select`` cannot wait for room in it (an unconnected Unix socket
    polls writable at once). A *blocking* ``connect`` sleeps in the kernel until the daemon's
    ``accept`` makes room (unix_stream_connect waits on the listener), for at most the socket's
    send timeout (``SO_SNDTIMEO``, set to what is left of the deadline): the wait is that event.

    :raises HookFailure: ``DAEMON_UNREACHABLE``; its hint says to start the daemon only when no
        daemon is there (no socket file, or ``ECONNREFUSED``: nobody listens on it).
    """
    import errno
    import socket
    import struct
    import time
    sock.settimeout(None)   # blocking: the kernel does the waiting
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HookFailure("DAEMON_UNREACHABLE",
                              f"the vfio-hookd daemon at {path} did not accept the connection "
                              f"within {ACCEPT_TIMEOUT_S:g} s (its queue stayed full: overloaded "
                              f"or stuck); see: journalctl -u vfio-hookd")
        sec = int(left)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", sec, max(int((left - sec) * 1e6), 1 if not sec else 0)))
        try:
            sock.connect(path)
            break
        except (BlockingIOError, InterruptedError):
            continue   # the send timeout ran out with the queue still full (or a signal)
        except OSError as exc:
            absent = exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
            hint = "; start it with: systemctl enable --now vfio-hookd.service" if absent else \
                "; see: journalctl -u vfio-hookd"
            raise HookFailure("DAEMON_UNREACHABLE", f"cannot reach the vfio-hookd daemon at "
                                                    f"{path} ({exc.strerror or exc}){hint}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))


def read_xml(fd, limit=MAX_XML_BYTES, timeout_s=None):
    """The domain XML (str) libvirt writes to ``fd`` (stdin), read until end of file.

    At most ``limit`` + 1 bytes are read (the one more tells that there is more), each read
    waiting in ``poll(2)`` for what is left of ``timeout_s`` (s, default ``STDIN_TIMEOUT_S``): a
    writer that never closes the pipe cannot keep the hook (and libvirt, which waits for it)
    forever.

    :raises HookFailure: ``DOMAIN_XML_INVALID`` when more than ``limit`` bytes come, when the
        input does not end within ``timeout_s``, or when it is not UTF-8.
    """
    import select
    import time
    timeout_s = STDIN_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            raise HookFailure("DOMAIN_XML_INVALID", f"the domain XML on stdin did not end within "
                                                    f"{timeout_s:g} s (libvirt writes it and "
                                                    f"closes stdin at once)")
        try:
            chunk = os.read(fd, min(65536, limit + 1 - size))
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise HookFailure("DOMAIN_XML_INVALID", f"the domain XML on stdin is larger than "
                                                    f"{limit} bytes, vfio-hookd's limit")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HookFailure("DOMAIN_XML_INVALID", f"the domain XML on stdin is not UTF-8 "
                                                f"({exc.reason} at byte {exc.start})") from None


def main(argv):
    """Entry point; returns the exit status (0, or 1 after printing ``CODE: message``)."""
    if len(argv) < 4:
        return 0
    name, op, sub = argv[1], argv[2], argv[3]
    what = HANDLED.get((op, sub))
    if what is None or not name or name in (".", "..") or "/" in name or "\0" in name:
        return 0
    config = os.environ.get("VFIO_HOOKD_CONFIG") or "/etc/vfio-hookd"
    # lexists: a profile that is a dangling link is a broken profile (the daemon says so),
    # not an unmanaged VM that libvirt would then start on a host nobody prepared
    managed = os.path.lexists(os.path.join(config, "vms", name + ".yaml"))
    if not managed and what == "release":
        # release follows the record, even if the profile was removed while the VM ran
        managed = os.path.exists(os.path.join(run_dir(), "vms", name + ".json"))
    if not managed:
        return 0
    payload = {"op": what, "vm": name}
    if what == "prepare":
        try:
            payload["xml"] = read_xml(sys.stdin.fileno())
        except HookFailure as exc:
            sys.stderr.write(f"{exc.code}: {exc.message}\n")
            return 1
    else:
        # libvirt's reason is a word ("destroyed"); the daemon takes printable text of at most
        # 256 characters (vfio_hookd.daemon.MAX_REASON_CHARS): never lose a release over it
        reason = argv[4][:256] if len(argv) > 4 and argv[4] != "-" else None
        payload["reason"] = reason if reason and reason.isprintable() else None
    try:
        request(payload)
    except HookFailure as exc:
        sys.stderr.write(" ".join(f"{exc.code}: {exc.message}".split()) + "\n")
        return 1
    except Exception as exc:  # never a traceback in libvirt's error line
        sys.stderr.write(f"INTERNAL: vfio-hookd hook: {type(exc).__name__}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
