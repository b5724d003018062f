"""A simulated systemd-logind, and the users' systemd instances, for the simulated host: the
D-Bus face of the desktop model (:mod:`testbed.sim.desktop`).

Run as ``python -m testbed.sim.logind --root SIMROOT --address ADDR [--state-root DIR]`` (by
:class:`testbed.sim.bus.SimBus` when ``.sim/desktop.json`` exists). It owns
``org.freedesktop.login1`` on the bus at ``ADDR`` and answers the part of
``org.freedesktop.login1(5)`` vfio-hookd uses, with logind's paths and error names:

- ``/org/freedesktop/login1``, ``org.freedesktop.login1.Manager``: ``ListSessions() ->
  a(susso)``, ``GetSession(s) -> o``, ``GetSessionByPID(u) -> o`` (``NoSessionForPID``),
  ``GetUserByPID(u) -> o`` (``NoUserForPID``), ``TerminateSession(s)`` (``NoSuchSession``),
  ``Inhibit(ssss) -> h`` (a real descriptor over the bus: a pipe end) and ``ListInhibitors()
  -> a(ssssuu)`` (the locks whose descriptor is still open; :mod:`.inhibitors`); signals ``SessionNew(so)``, ``SessionRemoved(so)``, ``UserNew(uo)``, ``UserRemoved(uo)``.
- ``/org/freedesktop/login1/session/_3N``, ``org.freedesktop.login1.Session``: ``Id``, ``Name``,
  ``User (uo)``, ``Seat (so)``, ``Class``, ``Type``, ``State``, ``Leader``, ``TTY``, ``Scope``,
  ``Service``, ``Remote`` (``PropertiesChanged`` on ``State``).
- ``/org/freedesktop/login1/user/_UID``, ``org.freedesktop.login1.User``: ``UID``, ``Name``.

It holds the devices of sessions whose compositor opened them through logind (as logind does,
TakeDevice; its PID is the bus name's owner). Each running user instance listens on
``<root>/run/user/UID/systemd/private`` (peer to peer, GDBus server with EXTERNAL auth) with
``org.freedesktop.systemd1.Manager``: ``Subscribe()``, ``GetUnit(s)``, ``GetUnitByPID(u)``,
``StartUnit(ss)``, ``StopUnit(ss)``, signal ``JobRemoved(uoss)`` (to every connection, no
sender, as systemd does on direct connections) and units' ``Id``, ``ActiveState``,
``TriggeredBy``. Prints ``READY`` once the name is owned; SIGTERM ends every process it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from gi.repository import Gio, GLib

from . import desktop as model
from .inhibitors import Inhibitors, Refused
from .systemd import bus_label

NAME = "org.freedesktop.login1"
LOGIN_PATH = "/org/freedesktop/login1"

INTROSPECTION = """
<node>
 <interface name="org.freedesktop.login1.Manager">
  <method name="ListSessions"><arg type="a(susso)" direction="out"/></method>
  <method name="GetSession"><arg type="s" direction="in"/><arg type="o" direction="out"/></method>
  <method name="GetSessionByPID"><arg type="u" direction="in"/><arg type="o" direction="out"/>
  </method>
  <method name="GetUserByPID"><arg type="u" direction="in"/><arg type="o" direction="out"/>
  </method>
  <method name="TerminateSession"><arg type="s" direction="in"/></method>
  <method name="Inhibit"><arg type="s" direction="in"/><arg type="s" direction="in"/>
   <arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="h" direction="out"/>
  </method>
  <method name="ListInhibitors"><arg type="a(ssssuu)" direction="out"/></method>
  <signal name="SessionNew"><arg type="s"/><arg type="o"/></signal>
  <signal name="SessionRemoved"><arg type="s"/><arg type="o"/></signal>
  <signal name="UserNew"><arg type="u"/><arg type="o"/></signal>
  <signal name="UserRemoved"><arg type="u"/><arg type="o"/></signal>
 </interface>
 <interface name="org.freedesktop.login1.Session">
  <property name="Id" type="s" access="read"/><property name="Name" type="s" access="read"/>
  <property name="User" type="(uo)" access="read"/>
  <property name="Seat" type="(so)" access="read"/>
  <property name="Class" type="s" access="read"/><property name="Type" type="s" access="read"/>
  <property name="State" type="s" access="read"/><property name="Leader" type="u" access="read"/>
  <property name="TTY" type="s" access="read"/><property name="Scope" type="s" access="read"/>
  <property name="Service" type="s" access="read"/>
  <property name="Remote" type="b" access="read"/>
 </interface>
 <interface name="org.freedesktop.login1.User">
  <property name="UID" type="u" access="read"/><property name="Name" type="s" access="read"/>
 </interface>
 <interface name="org.freedesktop.systemd1.Manager">
  <method name="Subscribe"/>
  <method name="GetUnit"><arg type="s" direction="in"/><arg type="o" direction="out"/></method>
  <method name="GetUnitByPID"><arg type="u" direction="in"/><arg type="o" direction="out"/>
  </method>
  <method name="StartUnit"><arg type="s" direction="in"/><arg type="s" direction="in"/>
   <arg type="o" direction="out"/></method>
  <method name="StopUnit"><arg type="s" direction="in"/><arg type="s" direction="in"/>
   <arg type="o" direction="out"/></method>
  <signal name="JobRemoved"><arg type="u"/><arg type="o"/><arg type="s"/><arg type="s"/>
  </signal>
 </interface>
 <interface name="org.freedesktop.systemd1.Unit">
  <property name="Id" type="s" access="read"/>
  <property name="ActiveState" type="s" access="read"/>
  <property name="TriggeredBy" type="as" access="read"/>
 </interface>
</node>
"""


def _user_path(uid: int) -> str:
    return f"{LOGIN_PATH}/user/_{uid}"


class SimLogind:
    """The D-Bus objects of the model (module docstring).

    :param desk: the :class:`testbed.sim.desktop.Desktop`; :param con: the bus connection.
    """

    def __init__(self, desk: model.Desktop, con):
        self.desk = desk
        self.con = con
        self.node = Gio.DBusNodeInfo.new_for_xml(INTROSPECTION)
        self.regs: dict[str, int] = {}
        self.servers: dict[int, tuple] = {}     # uid -> (service, socket path, [connections])
        self.guid = Gio.dbus_generate_guid()
        self.locks = Inhibitors(desk.state_root)
        con.register_object(LOGIN_PATH, self._iface("org.freedesktop.login1.Manager"),
                            self._on_manager, None, None)
        with desk.lock:
            for s in desk.sessions.values():
                self._register_session(s.id)
            for u in desk.users.values():
                self._register_user(u)
                if u.running:
                    self._serve(u)
            desk.listeners.append(lambda ev, args: GLib.idle_add(self._event, ev, args))

    def _iface(self, name: str):
        return self.node.lookup_interface(name)

    # ---- logind -------------------------------------------------------------------------------
    def _register_session(self, sid: str) -> None:
        s = self.desk.sessions.get(sid)
        if s is None or s.path in self.regs:
            return
        self.regs[s.path] = self.con.register_object(
            s.path, self._iface("org.freedesktop.login1.Session"), None,
            lambda *a, s=s: self._session_prop(s, a[4]), None)

    def _register_user(self, u) -> None:
        path = _user_path(u.uid)
        if path not in self.regs:
            values = {"UID": GLib.Variant("u", u.uid), "Name": GLib.Variant("s", u.name)}
            self.regs[path] = self.con.register_object(
                path, self._iface("org.freedesktop.login1.User"), None,
                lambda *a: values.get(a[4]), None)

    def _session_prop(self, s, prop: str):
        return {"Id": GLib.Variant("s", s.id), "Name": GLib.Variant("s", s.user),
                "User": GLib.Variant("(uo)", (s.uid, _user_path(s.uid))),
                "Seat": GLib.Variant("(so)", (s.seat, f"{LOGIN_PATH}/seat/{s.seat}"
                                              if s.seat else "/")),
                "Class": GLib.Variant("s", s.cls), "Type": GLib.Variant("s", s.type),
                "State": GLib.Variant("s", s.state), "Leader": GLib.Variant("u", s.leader),
                "TTY": GLib.Variant("s", s.tty), "Scope": GLib.Variant("s", s.scope),
                "Service": GLib.Variant("s", s.service),
                "Remote": GLib.Variant("b", s.remote)}.get(prop)

    def _event(self, event: str, args: tuple) -> bool:
        emit = self.con.emit_signal
        manager = "org.freedesktop.login1.Manager"
        if event == "SessionNew":
            with self.desk.lock:
                self._register_session(args[0])
            emit(None, LOGIN_PATH, manager, "SessionNew", GLib.Variant("(so)", args))
        elif event == "SessionRemoved":
            reg = self.regs.pop(args[1], None)
            if reg:
                self.con.unregister_object(reg)
            emit(None, LOGIN_PATH, manager, "SessionRemoved", GLib.Variant("(so)", args))
        elif event == "SessionChanged":
            s = self.desk.sessions.get(args[0])
            if s is not None:
                emit(None, s.path, "org.freedesktop.DBus.Properties", "PropertiesChanged",
                     GLib.Variant("(sa{sv}as)", ("org.freedesktop.login1.Session",
                                                 {"State": GLib.Variant("s", s.state)}, [])))
        elif event in ("UserNew", "UserRemoved"):
            u = next(u for u in self.desk.users.values() if u.uid == args[0])
            self._register_user(u)
            if event == "UserNew":
                self._serve(u)
            else:
                self._unserve(u.uid)
            emit(None, LOGIN_PATH, manager, event, GLib.Variant("(uo)", (u.uid,
                                                                       _user_path(u.uid))))
        elif event == "JobRemoved":
            uid, jid, path, unit, result = args
            for c in list(self.servers.get(uid, (None, None, []))[2]):
                if not c.is_closed():
                    c.emit_signal(None, "/org/freedesktop/systemd1",
                                  "org.freedesktop.systemd1.Manager", "JobRemoved",
                                  GLib.Variant("(uoss)", (jid, path, unit, result)))
        return GLib.SOURCE_REMOVE

    def _inhibit(self, con, sender: str, args: tuple, inv) -> None:
        """``Inhibit``: the caller's end of the lock's pipe goes over the bus in the reply's
        descriptor list (which holds its own copy: ours is closed at once)."""
        def peer(method: str) -> int:
            return con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                 "org.freedesktop.DBus", method, GLib.Variant("(s)", (sender,)),
                                 GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, 5000,
                                 None).unpack()[0]
        try:
            w = self.locks.take(*args, peer("GetConnectionUnixUser"),
                                peer("GetConnectionUnixProcessID"))
        except Refused as exc:
            inv.return_dbus_error(exc.name, exc.message)
            return
        fds = Gio.UnixFDList.new()
        try:
            index = fds.append(w)
        finally:
            os.close(w)
        inv.return_value_with_unix_fd_list(GLib.Variant("(h)", (index,)), fds)

    def _on_manager(self, con, sender, path, iface, method, params, inv) -> None:
        args = params.unpack()
        d = self.desk
        if method == "Inhibit":
            self._inhibit(con, sender, args, inv)
            return
        if method == "ListInhibitors":
            inv.return_value(GLib.Variant("(a(ssssuu))", (self.locks.live(),)))
            return
        with d.lock:
            if method == "ListSessions":
                inv.return_value(GLib.Variant("(a(susso))", ([
                    (s.id, s.uid, s.user, s.seat, s.path) for s in d.sessions.values()],)))
            elif method in ("GetSession", "GetSessionByPID"):
                key = "id" if method == "GetSession" else "leader"
                s = next((s for s in d.sessions.values() if getattr(s, key) == args[0]), None)
                if s is None:
                    err = "NoSuchSession" if method == "GetSession" else "NoSessionForPID"
                    inv.return_dbus_error(f"org.freedesktop.login1.{err}", f"no {args[0]}")
                else:
                    inv.return_value(GLib.Variant("(o)", (s.path,)))
            elif method == "GetUserByPID":
                uid = d.user_of_pid(args[0])
                if uid is None:
                    inv.return_dbus_error("org.freedesktop.login1.NoUserForPID",
                                          f"PID {args[0]} does not belong to any known user")
                else:
                    inv.return_value(GLib.Variant("(o)", (_user_path(uid),)))
            elif method == "TerminateSession":
                if d.end_session(args[0]):
                    inv.return_value(None)
                else:
                    inv.return_dbus_error("org.freedesktop.login1.NoSuchSession",
                                          f"No session '{args[0]}' known")

    # ---- users' instances, peer to peer -----------------------------------------------------------
    def _serve(self, u) -> None:
        if u.uid in self.servers:
            return
        d = os.path.join(self.desk.root, "run", "user", str(u.uid), "systemd")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "private")
        if os.path.exists(path):
            os.unlink(path)
        cwd = os.getcwd()
        os.chdir(d)   # sun_path is 108 bytes: bind by a relative name
        try:
            service = Gio.SocketService.new()
            service.add_address(Gio.UnixSocketAddress.new("private"), Gio.SocketType.STREAM,
                                Gio.SocketProtocol.DEFAULT, None)
        finally:
            os.chdir(cwd)
        conns: list = []
        service.connect("incoming", lambda _s, stream, _o: self._incoming(u, stream, conns))
        service.start()
        self.servers[u.uid] = (service, path, conns)

    def _unserve(self, uid: int) -> None:
        entry = self.servers.pop(uid, None)
        if entry is None:
            return
        service, path, conns = entry
        service.stop()
        service.close()
        for c in conns:
            c.close_sync(None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _incoming(self, u, stream, conns: list) -> bool:
        # no message is dispatched before the objects are registered (as GDBusServer does)
        con = Gio.DBusConnection.new_sync(
            stream, self.guid, Gio.DBusConnectionFlags.AUTHENTICATION_SERVER
            | Gio.DBusConnectionFlags.DELAY_MESSAGE_PROCESSING, None, None)
        con.set_exit_on_close(False)
        con.register_object("/org/freedesktop/systemd1",
                            self._iface("org.freedesktop.systemd1.Manager"),
                            lambda *a: self._on_user_manager(u, *a), None, None)
        for name, unit in u.units.items():
            con.register_object("/org/freedesktop/systemd1/unit/" + bus_label(name),
                                self._iface("org.freedesktop.systemd1.Unit"), None,
                                lambda *a, unit=unit: self._unit_prop(unit, a[4]), None)
        conns.append(con)
        con.start_message_processing()
        return True

    def _unit_prop(self, unit, prop: str):
        with self.desk.lock:
            return {"Id": GLib.Variant("s", unit.name),
                    "ActiveState": GLib.Variant("s", unit.active_state),
                    "TriggeredBy": GLib.Variant("as", unit.spec.get("triggered_by", []))
                    }.get(prop)

    def _on_user_manager(self, u, con, sender, path, iface, method, params, inv) -> None:
        args = params.unpack()
        unit_path = "/org/freedesktop/systemd1/unit/"
        if method == "Subscribe":
            inv.return_value(None)
        elif method == "GetUnit":
            if args[0] in u.units:
                inv.return_value(GLib.Variant("(o)", (unit_path + bus_label(args[0]),)))
            else:
                inv.return_dbus_error("org.freedesktop.systemd1.NoSuchUnit",
                                      f"Unit {args[0]} not loaded.")
        elif method == "GetUnitByPID":
            name = self.desk.unit_of_pid(u.uid, args[0])
            if name is None:
                inv.return_dbus_error("org.freedesktop.systemd1.NoUnitForPID",
                                      f"PID {args[0]} does not belong to any loaded unit.")
            else:
                inv.return_value(GLib.Variant("(o)", (unit_path + bus_label(name),)))
        elif method in ("StartUnit", "StopUnit"):
            try:
                _jid, job = self.desk.run_job(u.uid, "start" if method == "StartUnit"
                                              else "stop", args[0])
            except (KeyError, StopIteration):
                inv.return_dbus_error("org.freedesktop.systemd1.NoSuchUnit",
                                      f"Unit {args[0]} not loaded.")
                return
            inv.return_value(GLib.Variant("(o)", (job,)))


def main(argv: list[str] | None = None) -> int:
    """Command line entry (module docstring); exit 0."""
    ap = argparse.ArgumentParser(prog="python -m testbed.sim.logind")
    ap.add_argument("--root", required=True)
    ap.add_argument("--state-root")
    ap.add_argument("--address", required=True)
    opts = ap.parse_args(argv)
    con = Gio.DBusConnection.new_for_address_sync(
        opts.address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
    con.set_exit_on_close(False)
    loop = GLib.MainLoop()
    desk = model.Desktop(opts.root, opts.state_root)
    SimLogind(desk, con)

    def quit_(*_a):
        loop.quit()
        return GLib.SOURCE_REMOVE
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, quit_)
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGINT, quit_)
    try:
        reply = con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                              "org.freedesktop.DBus", "RequestName", GLib.Variant("(su)", (NAME, 4)),
                              GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, 5000, None)
        if reply.unpack()[0] != 1:
            raise SystemExit(f"sim-logind: {NAME} is already owned on this bus")
        print("READY", flush=True)
        loop.run()
    finally:
        desk.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
