"""The daemon's memory stays flat (issue 9; the numbers: bench/daemon_memory.py): glibc's arenas
are limited, cyclic garbage is collected and the heap trimmed when no request is in flight
(vfio_hookd.memory); D-Bus error names are read without PyGObject's get_remote_error, whose
strings the daemon kept one per request; logind's signals come through one subscription per
connection (each subscription left 64 bytes behind in GObject-Introspection), and a watch's
context is run dry after the unsubscribe; the first use of the parsers happens before READY=1
(daemon.rehearse)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gc
import select
import weakref

from vfio_hookd import daemon, gdbus, logind, memory, server

pytestmark = pytest.mark.unit


def test_glibc_takes_the_arena_limit_and_the_trim():
    code = ("from vfio_hookd import memory; import sys; "
            "sys.exit(0 if memory.limit_arenas(1) and memory.trim() else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_server_trims_once_the_last_connection_ends(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    srv = server.Server(str(tmp_path / "s.sock"))
    for _ in range(2):
        srv._connections += 1
        srv._busy += 1
    srv._connection_done()
    assert calls == []          # one still in flight
    srv._connection_done()
    assert calls == [1]
    os.close(srv._wake_r)
    os.close(srv._wake_w)


@pytest.mark.parametrize("message,domain,code,name", [
    ("GDBus.Error:org.freedesktop.systemd1.NoSuchUnit: Unit x.service not loaded.",
     "io", 36, "org.freedesktop.systemd1.NoSuchUnit"),
    ("GDBus.Error:org.freedesktop.DBus.Error.ServiceUnknown: The name is not activatable",
     "dbus", 2, "org.freedesktop.DBus.Error.ServiceUnknown"),
    ("Timeout was reached", "io", 24, None),
    ("The connection is closed", "io", 18, None),
    ("no prefix, a registered D-Bus error", "dbus", 2, "org.freedesktop.DBus.Error.ServiceUnknown"),
])
def test_error_names_are_read_as_gdbus_reads_them(message, domain, code, name):
    from gi.repository import Gio, GLib
    quark = Gio.dbus_error_quark() if domain == "dbus" else Gio.io_error_quark()
    e = GLib.Error.new_literal(quark, message, code)
    assert gdbus.error_name(e) == name == Gio.DBusError.get_remote_error(e)


def test_trim_collects_cyclic_garbage():
    class Node:
        pass
    was = gc.isenabled()
    gc.disable()
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None       # a cycle: reference counting alone keeps it
        memory.trim()
        assert gone() is None
    finally:
        if was:
            gc.enable()


def test_iterate_dispatches_what_is_pending_when_stopped():
    # signal_unsubscribe queues the destroy notify as an idle source on the watch's context;
    # a loop that only checks its stop flag would leave it there for ever
    from gi.repository import GLib
    ctx = GLib.MainContext.new()
    ran = []
    src = GLib.idle_source_new()
    src.set_callback(lambda *_: ran.append(1) or False)
    src.attach(ctx)
    gdbus.iterate(ctx, lambda: True)
    assert ran == [1]
    assert not ctx.pending()


class _Con:
    """A Gio.DBusConnection stand-in that records subscriptions and fires their callbacks."""

    def __init__(self):
        self.subscribed = []
        self.unsubscribed = []
        self.callbacks = {}

    def signal_subscribe(self, sender, iface, member, path, arg0, flags, callback):
        sid = len(self.subscribed) + 1
        self.subscribed.append((sender, iface, member))
        self.callbacks[sid] = callback
        return sid

    def signal_unsubscribe(self, sid):
        self.unsubscribed.append(sid)
        self.callbacks.pop(sid)

    def is_closed(self):
        return False

    def close_sync(self, _cancellable):
        pass

    def fire(self, member, path, args, signature):
        from gi.repository import GLib
        for cb in list(self.callbacks.values()):
            cb(self, ":1.1", path, "org.freedesktop.login1.Manager", member,
               GLib.Variant(signature, args))


def test_listeners_share_one_subscription_and_get_only_later_signals():
    con = _Con()
    watch = gdbus.SignalWatch(con, "org.freedesktop.login1", None, None)
    try:
        first = watch.listen()
        con.fire("SessionNew", "/s/1", ("1", "/s/1"), "(so)")
        second = watch.listen()
        con.fire("SessionRemoved", "/s/1", ("1", "/s/1"), "(so)")
        assert con.subscribed == [("org.freedesktop.login1", None, None)]
        assert [e[0] for e in first.events] == ["SessionNew", "SessionRemoved"]
        assert list(second.events) == [("SessionRemoved", "/s/1", ("1", "/s/1"))]
        assert first.count == 2 and second.count == 1
        assert select.select([second.fileno()], [], [], 0)[0] == [second.fileno()]
        second.clear()
        assert select.select([second.fileno()], [], [], 0)[0] == []
        second.close()
        con.fire("SessionNew", "/s/2", ("2", "/s/2"), "(so)")
        assert second.count == 1 and first.count == 3
        assert first.wait(lambda: first.count == 3, 0.0)
        first.close()
        first.close()   # idempotent
    finally:
        watch.close()
    assert con.unsubscribed == [1]
    assert not watch._thread.is_alive()


def test_logind_subscribes_once_per_connection(monkeypatch):
    cons = []

    def connect(_address):
        cons.append(_Con())
        return cons[-1]
    monkeypatch.setattr(gdbus, "connect_bus", connect)
    lg = logind.Logind(address="unix:path=/nonexistent")
    try:
        for _ in range(5):
            with lg.watch() as w:
                assert w is not None
        assert len(cons) == 1 and len(cons[0].subscribed) == 1
        assert cons[0].unsubscribed == []
    finally:
        lg.close()
    assert cons[0].unsubscribed == [1]
    with lg.watch():   # a new connection, a new subscription
        pass
    lg.close()
    assert len(cons) == 2 and cons[1].unsubscribed == [1]


def test_the_rehearsal_runs_on_input_the_product_accepts():
    got = daemon.rehearse()
    prof = got["profile"]
    assert prof.devices == ("0000:01:00.0", "0000:01:00.1")
    assert prof.stop_units == ("nvidia-persistenced.service",)
    assert prof.inhibit == ("sleep",) and prof.host_cpus == "auto"
    assert got["devices"] == ("0000:01:00.0",)
    assert got["cpusets"] == {"vcpupin": ["2", "3"], "emulatorpin": "1"}
    assert got["hugepages"] == {"memory_kib": 8388608, "page_kib": 2048}
    assert got["record_bytes"] > 0


def test_a_closed_listener_never_writes_to_its_old_descriptor_number():
    # the watch's thread may hand over a signal while the waiter closes its listener; the
    # eventfd's number can belong to a new descriptor by then and must not be written to
    watch = gdbus.SignalWatch(_Con(), None, None, None)
    try:
        listener = watch.listen()
        number = listener.fileno()
        listener.close()
        reused = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            assert reused == number       # the lowest free number: the one just closed
            listener.push(("SessionNew", "/s/1", ("1", "/s/1")))
            listener.clear()
            assert select.select([reused], [], [], 0)[0] == []
        finally:
            os.close(reused)
    finally:
        watch.close()
