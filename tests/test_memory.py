"""The daemon's memory stays flat (issue 9; the numbers: bench/daemon_memory.py): glibc's arenas
are limited and trimmed when no request is in flight (vfio_hookd.memory), and D-Bus error names
are read without PyGObject's get_remote_error, whose strings the daemon kept one per request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vfio_hookd import gdbus, memory, server

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
