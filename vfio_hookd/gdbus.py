"""Small Gio helpers shared by the logind client (:mod:`vfio_hookd.logind`) and the user-instance
client (:mod:`vfio_hookd.usermgr`): connections (a bus, or a peer-to-peer socket), method calls
and property reads with a timeout, D-Bus error names, and a signal subscription per connection
with a listener per waiter, which it can ``poll(2)`` on.

Gio is imported on first use (FIELD-NOTES §4: ``import vfio_hookd.gdbus`` costs nothing).
"""

from __future__ import annotations

import collections
import math
import os
import socket
import threading
import time

#: sun_path is 108 bytes with its NUL (unix(7)); longer paths go through /proc/self/fd.
_SUN_PATH_MAX = 107


def connect_bus(address: str | None):
    """A private ``Gio.DBusConnection`` to the message bus at ``address`` (None: the system bus,
    ``DBUS_SYSTEM_BUS_ADDRESS`` honoured).

    :raises gi.repository.GLib.Error: the bus cannot be reached.
    """
    from gi.repository import Gio

    if address is None:
        address = Gio.dbus_address_get_for_bus_sync(Gio.BusType.SYSTEM, None)
    con = Gio.DBusConnection.new_for_address_sync(
        address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
    con.set_exit_on_close(False)
    return con


def connect_peer(path: str, timeout_s: float):
    """A peer-to-peer ``Gio.DBusConnection`` on the unix socket ``path`` (a real path), with
    the EXTERNAL authentication GDBus does by default (the caller's uid; sd-bus's server accepts
    a token equal to the peer's ``SO_PEERCRED`` uid, ``verify_external_token`` in
    ``sd-bus/bus-socket.c``, so root may talk to a user's manager on
    ``/run/user/UID/systemd/private``). A path longer than ``sun_path`` is reached through
    ``/proc/self/fd/N`` of its directory.

    :raises OSError: nothing listens there (``ENOENT``, ``ECONNREFUSED``), or no answer within
        ``timeout_s`` s (``TimeoutError``).
    :raises gi.repository.GLib.Error: the authentication failed.
    """
    from gi.repository import Gio

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout_s)
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            sock.connect(path)
        else:
            dfd = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
            finally:
                os.close(dfd)
        sock.settimeout(None)
        fd = sock.detach()
    except BaseException:
        sock.close()
        raise
    gsock = Gio.Socket.new_from_fd(fd)
    stream = gsock.connection_factory_create_connection()
    con = Gio.DBusConnection.new_sync(stream, None,
                                      Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT, None, None)
    con.set_exit_on_close(False)
    return con


def call(con, dest: str | None, path: str, iface: str, method: str, args=None,
         signature: str | None = None, timeout_s: float = 25.0):
    """Call ``iface.method`` of object ``path`` on ``dest`` (None on a peer-to-peer
    connection); ``args`` a tuple packed with ``signature``. Returns the unpacked reply tuple.

    :raises gi.repository.GLib.Error: the call failed or timed out.
    """
    from gi.repository import Gio, GLib

    params = GLib.Variant(f"({signature})", args) if signature else None
    reply = con.call_sync(dest, path, iface, method, params, None, Gio.DBusCallFlags.NONE,
                          max(1, math.ceil(timeout_s * 1000)), None)
    return reply.unpack() if reply is not None else ()


def call_fds(con, dest: str | None, path: str, iface: str, method: str, args=None,
             signature: str | None = None, timeout_s: float = 25.0) -> tuple[tuple, list[int]]:
    """:func:`call` for a method whose reply carries file descriptors (D-Bus type ``h``: an
    index into the message's descriptors). pydbus cannot do this (it calls ``call_sync``,
    whose reply drops the descriptors), so it is Gio's ``call_with_unix_fd_list_sync``.

    :returns: ``(reply tuple, fds)``: ``fds`` (list of int) are the reply's descriptors,
        stolen from the ``Gio.UnixFDList`` (``steal_fds``: the list no longer closes them),
        so the caller owns each one and must close it. GLib receives them close-on-exec
        (``SCM_RIGHTS`` with ``MSG_CMSG_CLOEXEC``).
    :raises gi.repository.GLib.Error: the call failed or timed out.
    """
    from gi.repository import Gio, GLib

    params = GLib.Variant(f"({signature})", args) if signature else None
    reply, fd_list = con.call_with_unix_fd_list_sync(
        dest, path, iface, method, params, None, Gio.DBusCallFlags.NONE,
        max(1, math.ceil(timeout_s * 1000)), None, None)
    fds = list(fd_list.steal_fds()) if fd_list is not None else []
    return (reply.unpack() if reply is not None else ()), fds


def get(con, dest: str | None, path: str, iface: str, prop: str, timeout_s: float = 25.0):
    """Property ``iface.prop`` of object ``path`` (``org.freedesktop.DBus.Properties.Get``)."""
    return call(con, dest, path, "org.freedesktop.DBus.Properties", "Get", (iface, prop), "ss",
                timeout_s)[0]


def get_all(con, dest: str | None, path: str, iface: str, timeout_s: float = 25.0) -> dict:
    """Every property of ``iface`` on object ``path`` (``GetAll``), unpacked."""
    return call(con, dest, path, "org.freedesktop.DBus.Properties", "GetAll", (iface,), "s",
                timeout_s)[0]


#: What GDBus puts before the D-Bus error name in the message of every remote error
#: (``g_dbus_error_new_for_dbus_error``: ``"GDBus.Error:NAME: message"``).
_REMOTE_PREFIX = "GDBus.Error:"


def error_name(e) -> str | None:
    """The D-Bus error name of a ``GLib.Error`` from a call (None if it was not remote).

    Read from the message as ``g_dbus_error_get_remote_error()`` does for unregistered names,
    without calling it: through PyGObject each call kept its returned string alive (about one
    per request in the daemon's memory benchmark, ``bench/daemon_memory.py``; tracemalloc
    traced them to this call).
    """
    message = getattr(e, "message", None) or ""
    if not message.startswith(_REMOTE_PREFIX):
        if getattr(e, "domain", None) == "g-dbus-error-quark":   # a registered one, unprefixed
            from gi.repository import Gio
            return Gio.DBusError.get_remote_error(e)
        return None
    name, sep, _ = message[len(_REMOTE_PREFIX):].partition(": ")
    return name if sep and name else None


def remote_message(e) -> str:
    """The message of a ``GLib.Error`` from a call without GDBus's ``GDBus.Error:NAME: ``
    prefix (what ``Gio.DBusError.strip_remote_error`` removes; PyGObject's errors are copies,
    so it is cut here). A D-Bus error name holds no ``": "``."""
    msg = e.message or ""
    return msg.split(": ", 1)[1] if msg.startswith("GDBus.Error:") and ": " in msg else msg


def iterate(ctx, stopped) -> None:
    """Iterate the ``GLib.MainContext`` ``ctx`` (blocking in ``poll(2)`` between events) until
    ``stopped()`` is true after an iteration (wake it with ``ctx.wakeup()``), then dispatch
    what is still pending on it, without blocking, and return.

    The last part matters: unsubscribing a signal hands the subscription's destroy notify,
    which frees PyGObject's closure for the Python callback and GDBus's subscriber record, to
    the subscriber's context as an idle source (``g_dbus_connection_signal_unsubscribe``:
    the ``user_data_free_func`` runs in the thread-default main context of the subscriber).
    Left queued on a context nobody iterates any more, the closure, the idle source and the
    subscriber record stayed in the C heap (heaptrack, ``bench/daemon_memory.py``).
    """
    while not stopped():
        ctx.iteration(True)
    while ctx.pending():
        ctx.iteration(False)


class SignalListener:
    """The signals a :class:`SignalWatch` received since :meth:`SignalWatch.listen`, for one
    waiter.

    Attributes: ``events`` (deque of ``(member, object path, unpacked parameters)``, the last
    4096), ``count`` (int, all received). :meth:`wait` waits on a condition with a deadline;
    :meth:`fileno` (an eventfd, readable after each signal) lets a caller ``poll(2)`` it beside
    other descriptors (inotify). :meth:`close` (or the ``with`` block's end) stops the delivery
    and closes the eventfd; the watch's subscription stays.
    """

    KEEP = 4096

    def __init__(self, watch: "SignalWatch"):
        self._watch = watch
        self._cv = threading.Condition()
        self.events: collections.deque = collections.deque(maxlen=self.KEEP)
        self.count = 0
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def push(self, event: tuple) -> None:
        """Record ``event`` and wake the waiters (called by the watch's thread)."""
        with self._cv:
            self.events.append(event)
            self.count += 1
            self._cv.notify_all()
            if self._efd >= 0:   # under the lock: close() cannot hand its number on meanwhile
                os.eventfd_write(self._efd, 1)

    def fileno(self) -> int:
        """An eventfd readable after each signal (:meth:`clear` resets it)."""
        return self._efd

    def clear(self) -> None:
        """Reset :meth:`fileno` to not readable."""
        with self._cv:
            if self._efd < 0:
                return
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:   # not readable: nothing to reset
                pass

    def wait(self, predicate, deadline: float) -> bool:
        """Wait until ``predicate()`` (called under the lock, after each signal) is true, at
        most until ``deadline`` (``time.monotonic()`` s). Returns its last value."""
        with self._cv:
            return bool(self._cv.wait_for(predicate, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Stop receiving and close the eventfd (idempotent); a signal being handed over at
        the same moment is recorded but wakes no descriptor."""
        self._watch._drop(self)
        with self._cv:
            efd, self._efd = self._efd, -1
        if efd >= 0:
            os.close(efd)

    def __enter__(self) -> "SignalListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SignalWatch:
    """Signals of one connection for its lifetime: one ``signal_subscribe`` on a GLib main
    context of its own, iterated by a daemon thread that blocks in ``poll(2)`` between signals,
    handed to each :class:`SignalListener` open at the time (:meth:`listen`, one per waiter).

    :param con: the ``Gio.DBusConnection``.
    :param sender: sender to match (None: any; it must be None on a peer-to-peer connection,
        whose signals carry no sender).
    :param iface: interface to match, or None. :param member: signal name, or None.

    Why one subscription for many waiters, not one per wait: each ``signal_subscribe`` with a
    Python callback makes PyGObject build an ffi closure, and GObject-Introspection 1.74
    (Debian 12) keeps 8 bytes per callback argument of it after the closure is freed (64 bytes
    for a D-Bus signal callback; heaptrack: one allocation per subscription, never freed,
    although ``g_callable_info_free_closure`` ran for each). One per request grew the daemon
    by that much per request (``bench/daemon_memory.py``).
    """

    def __init__(self, con, sender: str | None, iface: str | None, member: str | None):
        from gi.repository import Gio, GLib

        self._con = con
        self._lock = threading.Lock()
        self._listeners: list[SignalListener] = []
        self._stopping = False
        self._ctx = GLib.MainContext.new()
        self._ctx.push_thread_default()
        try:
            self._sub = con.signal_subscribe(sender, iface, member, None, None,
                                             Gio.DBusSignalFlags.NONE, self._on_signal)
        finally:
            self._ctx.pop_thread_default()
        self._thread = threading.Thread(target=self._run, name="dbus signals", daemon=True)
        self._thread.start()

    def listen(self) -> SignalListener:
        """A new :class:`SignalListener`, receiving every signal from now on. Open it *before*
        reading the state it waits on."""
        listener = SignalListener(self)
        with self._lock:
            self._listeners.append(listener)
        return listener

    def _drop(self, listener: SignalListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _on_signal(self, _con, _sender, path, _iface, member, params) -> None:
        event = (member, path, params.unpack())
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener.push(event)

    def _run(self) -> None:
        iterate(self._ctx, lambda: self._stopping)

    def close(self) -> None:
        """Unsubscribe and end the thread; the listeners still open get no more signals."""
        self._stopping = True
        try:
            self._con.signal_unsubscribe(self._sub)
        except Exception:  # the connection is gone already
            pass
        self._ctx.wakeup()
        self._thread.join(2)

    def __enter__(self) -> "SignalWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
