"""The hook, the daemon and the CLI as separate processes, the way libvirt and a user use them.

The daemon runs on the simulated host through :class:`testbed.daemon.DaemonProcess`
(``python -m testbed.daemon --root ROOT``); the CLI without a daemon acts on it through
``python -m testbed.cli --root ROOT``. Both talk to the simulated systemd on a private bus, so
``world`` here is the bus-backed one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, write_profile
from testbed.daemon import DaemonProcess
from testbed.domains import tiny_domain_xml
from testbed.sim import faults

pytestmark = pytest.mark.dbus

HOOK = os.path.join(REPO, "hooks", "vfio-hookd")
OPS = [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"),
       ("release", "end"), ("migrate", "begin"), ("restore", "begin"), ("reconnect", "begin"),
       ("attach", "begin")]


def run_hook(*args, stdin="<domain/>", env=None, timeout=60):
    return subprocess.run([HOOK, *args], input=stdin, capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=timeout)


def run_cli(*args, env=None, root=None):
    """``vfio-hookd ARGS...`` in a subprocess, as a user runs it; with ``root``, acting on that
    simulated host (``python -m testbed.cli --root ROOT ARGS...``) instead of this machine."""
    argv = [sys.executable, "-m", "vfio_hookd", *args] if root is None else \
        [sys.executable, "-m", "testbed.cli", "--root", root, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env)


def start_daemon(world, tmp_path) -> DaemonProcess:
    """The daemon on ``world``'s simulated host, its log in ``tmp_path/daemon.log``."""
    return DaemonProcess(world.root, log_path=tmp_path / "daemon.log", ready_timeout_s=20)


@pytest.fixture
def world(bus_world):
    """The simulated host with its systemd on a private bus (the daemon is another process)."""
    return bus_world


@pytest.fixture
def daemon(world, tmp_path):
    d = start_daemon(world, tmp_path)
    yield d
    assert d.stop() == 0, "the daemon did not stop on SIGTERM: " + d.read_log()


@pytest.mark.parametrize("op,sub", OPS)
def test_hook_ignores_unmanaged_vm_without_a_daemon(dirs, op, sub):
    r = run_hook("nothere", op, sub, "-")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.parametrize("op,sub", [p for p in OPS if p not in (("prepare", "begin"), ("release", "end"))])
def test_hook_ignores_unhandled_operations_of_a_managed_vm(dirs, op, sub):
    write_profile(dirs, "win11", "devices: ['0000:01:00.0']\n")
    r = run_hook("win11", op, sub, "-")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.parametrize("name", ["../passwd", "a/b", ".", ".."])
def test_hook_ignores_names_that_cannot_be_profiles(dirs, name):
    # files that a hook without the name check would take for profiles of these names
    cfg = dirs["config"]
    (cfg / "passwd.yaml").write_text("{}\n")
    (cfg / "vms" / "a").mkdir()
    (cfg / "vms" / "a" / "b.yaml").write_text("{}\n")
    (cfg / "vms" / "..yaml").write_text("{}\n")
    (cfg / "vms" / "...yaml").write_text("{}\n")
    r = run_hook(name, "prepare", "begin", "-")
    assert (r.returncode, r.stderr) == (0, "")


def test_hook_treats_a_dangling_profile_link_as_managed(dirs):
    os.symlink(str(dirs["config"] / "elsewhere.yaml"), dirs["config"] / "vms" / "win11.yaml")
    r = run_hook("win11", "prepare", "begin", "-")
    assert r.returncode == 1 and r.stderr.startswith("DAEMON_UNREACHABLE: ")


def test_hook_releases_by_record_when_the_profile_is_gone(world, daemon):
    path = world.profile()
    assert run_hook("win11", "prepare", "begin", "-").returncode == 0
    os.unlink(path)
    r = run_hook("win11", "release", "end", "-")
    assert (r.returncode, r.stderr) == (0, "")
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "nvidia"
    assert world.systemd.list_units()["gdm.service"] == "active"


def test_hook_release_with_daemon_down_says_so(dirs):
    write_profile(dirs, "win11", "devices: ['0000:01:00.0']\n")
    r = run_hook("win11", "release", "end", "-")
    assert r.returncode == 1 and r.stderr.startswith("DAEMON_UNREACHABLE: ")


def test_hook_reports_daemon_down_on_prepare(dirs):
    write_profile(dirs, "win11", "devices: ['0000:01:00.0']\n")
    r = run_hook("win11", "prepare", "begin", "-")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("DAEMON_UNREACHABLE: ")
    assert "systemctl enable --now vfio-hookd.service" in lines[0]


def test_hook_prepare_and_release_through_the_daemon(world, daemon):
    world.profile()
    r = run_hook("win11", "prepare", "begin", "-")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    vm = st["vms"]["win11"]
    assert vm["phase"] == "prepared"
    assert {d["driver"] for d in vm["devices"]} == {"vfio-pci"}
    assert set(vm) >= {"phase", "steps", "devices"}
    assert set(vm["steps"][0]) >= {"name", "status", "duration_ms", "error"}
    r = run_hook("win11", "release", "end", "destroyed")
    assert (r.returncode, r.stderr) == (0, "")
    assert world.systemd.list_units()["gdm.service"] == "active"
    log = daemon.read_log()
    assert "VM=win11" in log and "STEP=bind_vfio" in log and "DURATION_MS=" in log


def test_hook_turns_a_daemon_error_into_one_code_line(world, daemon):
    world.profile()
    faults.inject(world.root, "write", "/sys/bus/pci/drivers_probe", "fail", errno=19)
    r = run_hook("win11", "prepare", "begin", "-")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("BIND_FAILED: step bind_vfio: ")
    faults.clear(world.root)
    r = run_hook("win11", "release", "end", "failed")
    assert r.returncode == 0


def test_hook_reports_a_bad_profile(world, daemon):
    write_profile(world.dirs, "win11", "on_bsy: fail\n")
    r = run_hook("win11", "prepare", "begin", "-")
    assert r.returncode == 1
    assert r.stderr.startswith("PROFILE_INVALID: ") and "win11.yaml:1" in r.stderr
    assert "did you mean 'on_busy'" in r.stderr


def test_hook_uses_devices_from_the_domain_xml(world, daemon):
    write_profile(world.dirs, "win11", "devices: auto\nstop_units: [nvidia-persistenced.service]\n")
    xml = tiny_domain_xml("win11", world.devices)
    r = run_hook("win11", "prepare", "begin", "-", stdin=xml)
    assert (r.returncode, r.stderr) == (0, "")
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.1/driver") == "vfio-pci"
    assert run_hook("win11", "release", "end", "destroyed").returncode == 0


def _raw(path, data: bytes) -> dict:
    """Send ``data`` and return the daemon's final answer (after any "accepted" line)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reader = s.makefile()
    while True:
        msg = json.loads(reader.readline())
        if "ok" in msg:
            s.close()
            return msg


@pytest.mark.parametrize("data,needle", [
    (b"not json\n", "not JSON"),
    (b"[1,2]\n", "JSON object"),
    (b'{"op": "explode"}\n', "unknown op"),
    (b'{"op": "prepare"}\n', "'vm'"),
    (b'{"op": "prepare", "vm": "a/b"}\n', "VM name"),
    (b'{"op": "prepare", "vm": "win11", "xml": 5}\n', "'xml'"),
    # bounds (issue 9): nesting far past json's own recursion limit, a field's type, the XML size
    pytest.param(b'{"op": "ping", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b'}\n',
                 "deeper than 16", id="nested-100000-deep"),
    pytest.param(b'{"op": "release", "vm": "win11", "reason": 5}\n', "field 'reason'",
                 id="reason-not-a-string"),
    pytest.param(b'{"op": "prepare", "vm": "win11", "xml": "' + b"x" * (1024 * 1024 + 1)
                 + b'"}\n', "1 MiB", id="xml-over-1-MiB"),
])
def test_daemon_rejects_bad_requests_and_changes_nothing(world, daemon, data, needle):
    world.profile()
    before = world.snapshot()
    reply = _raw(os.path.join(world.dirs["run"], "vfio-hookd.sock"), data)
    assert reply["ok"] is False and needle in reply["error"]["message"]
    assert world.snapshot() == before
    assert daemon.running()


def test_socket_is_root_only(world, daemon):
    sock = os.path.join(world.dirs["run"], "vfio-hookd.sock")
    assert os.stat(sock).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700


def test_daemon_logs_records_it_finds_at_start(world, tmp_path):
    world.profile()
    world.machine.prepare("win11")
    d = start_daemon(world, tmp_path)
    try:
        assert "record found: phase prepared" in d.read_log()
    finally:
        assert d.stop() == 0
    world.machine.release("win11")


def test_cli_status_works_without_the_daemon(world):
    world.profile()
    world.machine.prepare("win11")
    r = run_cli("status", "win11", root=world.root)
    assert r.returncode == 0, r.stderr
    assert "win11: prepared" in r.stdout and "vfio-pci" in r.stdout
    assert "daemon not running" in r.stdout
    world.machine.release("win11")


def test_cli_prepare_release_without_daemon(world):
    world.profile()
    r = run_cli("prepare", "win11", root=world.root)
    assert r.returncode == 0, r.stderr
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "vfio-pci"
    r = run_cli("release", "win11", root=world.root)
    assert r.returncode == 0, r.stderr
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "nvidia"


def test_cli_errors_are_one_code_line(dirs):
    r = run_cli("prepare", "ghost")
    assert r.returncode != 0
    assert r.stderr.strip().startswith("NOT_MANAGED: ")


def test_install_into_a_root(tmp_path, dirs):
    r = run_cli("install", "--root", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    hook = tmp_path / "r/etc/libvirt/hooks/qemu.d/vfio-hookd"
    assert os.access(hook, os.X_OK) and hook.read_text().startswith("#!/usr/bin/python3")
    unit = (tmp_path / "r/etc/systemd/system/vfio-hookd.service").read_text()
    assert "Type=notify" in unit and "@VFIO_HOOKD@" not in unit
    assert "Requires=vfio-hookd.socket" in unit and "Before=libvirtd.service" in unit
    sock = (tmp_path / "r/etc/systemd/system/vfio-hookd.socket").read_text()
    assert "ListenStream=/run/vfio-hookd/vfio-hookd.sock" in sock and "SocketMode=0600" in sock


def test_cli_prepare_auto_devices_needs_the_domain_xml(world, tmp_path):
    write_profile(world.dirs, "win11", "devices: auto\nstop_units: [nvidia-persistenced.service]\n")
    before = world.snapshot()
    env = dict(os.environ,
               LIBVIRT_DEFAULT_URI="qemu+unix:///system?socket=" + str(tmp_path / "none.sock"))
    r = run_cli("prepare", "win11", env=env, root=world.root)
    assert r.returncode != 0
    assert r.stderr.startswith("DOMAIN_XML_INVALID: ") and "--xml" in r.stderr
    assert world.snapshot() == before
    xml = tmp_path / "win11.xml"
    xml.write_text("<domain><devices><hostdev mode='subsystem' type='pci'><source><address "
                   "domain='0' bus='1' slot='0' function='0'/></source></hostdev><hostdev "
                   "mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' "
                   "function='1'/></source></hostdev></devices></domain>")
    r = run_cli("prepare", "win11", "--xml", str(xml), env=env, root=world.root)
    assert r.returncode == 0, r.stderr
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.1/driver") == "vfio-pci"
    r = run_cli("release", "win11", env=env, root=world.root)
    assert r.returncode == 0, r.stderr


ACTIVATE = ("import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
            "os.environ['LISTEN_FDS'] = '1'; "
            "os.execv(sys.executable, [sys.executable, '-m', 'testbed.daemon', '--root', {root!r}])")


def test_socket_activation_answers_connections_made_before_the_daemon_ran(world, tmp_path):
    """systemd's socket holds connections while the daemon (re)starts (sd_listen_fds(3))."""
    run = world.dirs["run"]
    path = str(run / "vfio-hookd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(path)          # queued in the kernel: nobody accepts yet
    early.sendall(b'{"op": "ping"}\n')
    fd = listener.fileno()
    # fd 3 in the child, as systemd passes it (close_fds would close it after preexec_fn)
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATE.format(root=world.root)],
                            close_fds=False,
                            preexec_fn=lambda: os.dup2(fd, 3),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        early.settimeout(20)
        reply = json.loads(early.makefile().readline())
        assert reply["ok"] and reply["result"]["pid"] == proc.pid
        early.close()
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        # systemd's copy still listens after the daemon stopped (a shutdown(2) of the shared
        # socket made the real socket unit fail with "Got POLLHUP on a listening socket" in
        # the real-systemd guest): the next client queues for the next daemon
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.connect(path)
        listener.settimeout(10)
        conn, _ = listener.accept()
        conn.close()
        late.close()
    finally:
        early.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        listener.close()
    assert os.path.exists(path), "the activated socket's file belongs to systemd"


def test_daemon_start_releases_a_record_left_mid_prepare(world, tmp_path):
    """A daemon that died during a prepare left the desktop stopped: the next one gives it back."""
    world.profile()
    before = world.snapshot()
    rec = world.machine.prepare("win11")
    rec.phase = "preparing"
    rec.steps[-1].status = "applying"   # died while binding vfio-pci
    world.machine.records.save(rec)
    d = start_daemon(world, tmp_path)
    try:
        # a release request waits for the VM's lock, so it returns once recovery is done
        reply = _raw(os.path.join(world.dirs["run"], "vfio-hookd.sock"),
                     b'{"op": "release", "vm": "win11"}\n')
        assert reply["ok"], reply
        assert "record left preparing by an earlier daemon: releasing" in d.read_log()
    finally:
        assert d.stop() == 0
    assert world.machine.records.load("win11").phase == "idle"
    after = world.snapshot()
    assert after["units"] == before["units"]
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "nvidia"


def test_cli_release_refuses_while_libvirt_runs_the_vm(world):
    """libvirt's built-in test driver (test:///default) has a running domain named 'test'."""
    world.profile("test")
    world.machine.prepare("test")
    env = dict(os.environ, LIBVIRT_DEFAULT_URI="test:///default")
    r = run_cli("release", "test", env=env, root=world.root)
    assert r.returncode != 0 and r.stderr.startswith("VM_RUNNING: libvirt says test is running")
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "vfio-pci"
    r = run_cli("release", "test", "--force", env=env, root=world.root)
    assert r.returncode == 0, r.stderr
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "nvidia"


@pytest.mark.parametrize("address", [None, "unix:path=/run/dbus/system_bus_socket"])
def test_testbed_refuses_to_drive_this_machines_systemd(dirs, address):
    """The test bed's daemon and CLI on a simulated host never talk to the real systemd."""
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SYSTEM_BUS_ADDRESS"}
    if address:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = address
    root = str(dirs["host"])
    for argv in ([sys.executable, "-m", "testbed.daemon", "--root", root],
                 [sys.executable, "-m", "testbed.cli", "--root", root, "prepare", "win11"]):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "refusing to start" in r.stderr, (argv, r.stderr)


def test_a_daemon_that_exits_before_ready_fails_at_once_with_its_log(dirs, tmp_path):
    from testbed.daemon import DaemonError
    with pytest.raises(DaemonError) as exc:
        DaemonProcess(tmp_path / "not-a-host", ready_timeout_s=60)
    assert "exited with status 1 before READY=1" in str(exc.value)
    assert "is not a simulated host" in str(exc.value)
