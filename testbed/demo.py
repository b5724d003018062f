"""The demo: a real libvirtd runs vfio-hookd's hook on ``virsh start`` / ``virsh destroy``.

``scripts/demo`` (as root) runs ``python -m testbed.demo``. What happens:

1. A fresh state directory (printed; removed on success unless ``--keep``, kept on failure)
   gets the simulated single-GPU NVIDIA host with an X11 desktop (:data:`DEMO_HOST`:
   LightDM, alice logged in, her PipeWire/WirePlumber on the HDMI audio, her SSH session;
   :mod:`testbed.sim.desktops`; realistic latencies from :data:`testbed.sim.faults.REALISTIC`)
   and its systemd and logind on a private bus (:class:`testbed.sim.bus.SimBus`).
2. :func:`testbed.libvirtd.run_in_private_libvirt` starts Debian's libvirtd in a private
   mount namespace with ``hooks/vfio-hookd`` in its ``qemu.d``, and bind mounts that make the
   *default* paths ``/etc/vfio-hookd`` and ``/run/vfio-hookd`` point into the state directory
   (libvirtd gives the hook no environment of ours: it must find the daemon where a real
   install puts it).
3. Inside (``python -m testbed.demo --inner STATE ...``): vfio-hookd's daemon is started on
   the simulated host (:class:`testbed.daemon.DaemonProcess`: ``python -m testbed.daemon``,
   the product's ``vfio_hookd.daemon.run`` with the simulated host; its log lines stream to
   the terminal, prefixed ``daemon |``) and waited for (``READY=1`` on ``$NOTIFY_SOCKET``,
   sd_notify(3)); the profile is written; then
   the scenarios run with the real ``virsh`` and ``vfio-hookd status``:

   - ``passthrough``: ``virsh start`` takes the host into passthrough state, ``vfio-hookd
     status`` shows each step, ``virsh destroy`` gives everything back.
   - ``failure``: a fault makes the write to ``/sys/bus/pci/drivers_probe`` fail once
     (ENODEV); ``virsh start`` fails with the hook's ``BIND_FAILED: ...`` line and the host is
     rolled back.
   - ``unmanaged``: a VM without a profile starts and stops; the hook exits 0, nothing on
     the host changes, and nothing connects to the daemon's socket path (the daemon logs
     nothing for such a request, so a socket of the demo's stands in for it meanwhile:
     :class:`SocketStandIn`).

4. The host is compared with its state at the start (:func:`testbed.sim.hosts.snapshot`
   plus the simulated systemd's units). The changes the kernel itself makes are expected and
   listed as such (:func:`testbed.expected.classify_changes`); any other difference fails the
   run.

The same machinery drives the end-to-end tests (``tests/test_e2e_libvirt.py``) through
:func:`run`, with latencies off.

Exit status: 0 when every check passed, 1 when one failed, 2 when the run could not be set
up, 128 + N when interrupted by signal N (130: Ctrl-C; 143: SIGTERM; 129: SIGHUP).

Nothing outlives the run: SIGINT, SIGTERM and SIGHUP lead to the same cleanup in both parts
(the outer part passes SIGTERM/SIGHUP on to the private-libvirtd runner, which passes it to the
inner part; each destroys its domains and stops its daemons by PID), and the daemon and the bus
runner get ``PR_SET_PDEATHSIG`` = SIGTERM (``prctl(2)``), so they stop even when their parent
is killed without a chance to clean up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from . import REPO, child_env
from .daemon import DaemonProcess
from .expected import FIRMWARE_FBS, classify_changes
from .pdeathsig import parent_death_signal
from .procs import stop as stop_process

__all__ = ["run", "main", "Terminated", "SCENARIOS", "DEFAULT_VM", "UNMANAGED_VM",
           "CONFIG_DIR", "RUN_DIR", "URI"]

SCENARIOS = ("passthrough", "failure", "unmanaged")
DEMO_SCENARIOS = ("passthrough", "failure")
#: The demo's host (testbed.sim.make_host variant) and its display manager unit.
DEMO_HOST = "desktop-x11"
DEMO_DM = "lightdm.service"
DEFAULT_VM = "win11"
UNMANAGED_VM = "scratch"
URI = "qemu:///system"
#: The daemon's and the hook's default paths (vfio_hookd.paths); bind-mounted in the namespace.
CONFIG_DIR = "/etc/vfio-hookd"
RUN_DIR = "/run/vfio-hookd"
HOOK = Path(REPO) / "hooks" / "vfio-hookd"

#: The environment variables that would move vfio-hookd away from its default paths.
PATH_VARS = ("VFIO_HOOKD_CONFIG", "VFIO_HOOKD_RUN")
DAEMON_READY_TIMEOUT_S = 20.0
DAEMON_STOP_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 120.0

_print_lock = threading.Lock()


def say(text: str = "") -> None:
    """Print ``text`` (one or more lines) at once and flush, safe against the log thread."""
    with _print_lock:
        print(text, flush=True)


def section(title: str) -> None:
    say(f"\n=== {title} ===")


def _env_without_paths() -> dict:
    """This environment without :data:`PATH_VARS`, the repository first on ``PYTHONPATH``."""
    return child_env({k: v for k, v in os.environ.items() if k not in PATH_VARS})


#: The signals that end a run early; each leads to the same cleanup as Ctrl-C.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """Raised by the SIGTERM/SIGHUP handlers (a BaseException, like KeyboardInterrupt, so
    that ``except Exception`` cleanup paths do not swallow it); ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# Comparing the host with its earlier state (the kernel's own changes: testbed.expected)


def _units(address: str) -> dict[str, str]:
    from vfio_hookd.systemd import Systemd
    with Systemd(address) as sd:
        return sd.list_units()


def _snapshot(root: str, address: str) -> dict:
    from testbed.sim import hosts
    return {"tree": hosts.snapshot(root), "units": _units(address)}


def compare(before: dict, after: dict) -> dict:
    """``{"expected": [...], "unexpected": {path: [before, after]}, "units_before",
    "units_after", "units_equal": bool}`` for two :func:`_snapshot` results."""
    expected, unexpected = classify_changes(before["tree"], after["tree"])
    return {"expected": expected, "unexpected": {k: list(v) for k, v in unexpected.items()},
            "units_before": before["units"], "units_after": after["units"],
            "units_equal": before["units"] == after["units"]}


def _show_compare(cmp: dict, strict: bool = False) -> None:
    if strict and cmp["expected"]:
        say("  changed (none expected here):")
    for line in cmp["expected"]:
        say(f"  expected: {line}")
    for path, (b, a) in list(cmp["unexpected"].items())[:40]:
        say(f"  UNEXPECTED: {path}: {b!r} -> {a!r}")
    if len(cmp["unexpected"]) > 40:
        say(f"  ... and {len(cmp['unexpected']) - 40} more")
    if not cmp["unexpected"] and not cmp["expected"]:
        say("  sysfs, /dev, /proc tree: identical")
    elif not cmp["unexpected"]:
        say("  nothing else changed in the sysfs, /dev, /proc tree")
    if cmp["units_equal"]:
        say(f"  units: identical ({_fmt_units(cmp['units_after'])})")
    else:
        say(f"  UNITS DIFFER: before {cmp['units_before']}, after {cmp['units_after']}")


def _fmt_units(units: dict) -> str:
    return ", ".join(f"{u} {s}" for u, s in sorted(units.items()))


# ---------------------------------------------------------------------------------------------
# The inner part (runs inside the private mount namespace, next to libvirtd)


def start_daemon(root: str, address: str) -> DaemonProcess:
    """vfio-hookd's daemon on the simulated host ``root`` (:class:`testbed.daemon.DaemonProcess`:
    ``python -m testbed.daemon --root ROOT``), its systemd the simulated one at ``address``,
    its log lines streamed to the terminal (prefixed ``daemon |``), ready at ``READY=1``.

    :raises testbed.daemon.DaemonError: not ready within :data:`DAEMON_READY_TIMEOUT_S` or
        exited first.
    """
    env = _env_without_paths()
    env.update(DBUS_SYSTEM_BUS_ADDRESS=address, VFIO_HOOKD_LOG="stderr", PYTHONUNBUFFERED="1")
    return DaemonProcess(root, env=env, echo=lambda line: say(f"    daemon | {line}"),
                         ready_timeout_s=DAEMON_READY_TIMEOUT_S)


def _cmd(argv: list[str], env: dict | None = None, show: bool = True) -> dict:
    """Run ``argv``; ``{"argv", "rc", "stdout", "stderr", "ms"}`` (wall time in ms)."""
    if show:
        say(f"  $ {' '.join(argv)}")
    t0 = time.monotonic()
    p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=COMMAND_TIMEOUT_S)
    ms = round((time.monotonic() - t0) * 1000, 1)
    if show:
        for line in (p.stdout + p.stderr).splitlines():
            if line.strip():
                say(f"    {line}")
        say(f"    -> exit status {p.returncode} in {ms:.0f} ms")
    return {"argv": argv, "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "ms": ms}


def hook_error(virsh_stderr: str) -> str | None:
    """The hook's ``CODE: message`` line inside libvirt's error (FIELD-NOTES §1: ``Hook script
    execution failed: ... unexpected exit status 1: <hook stderr>``), or None."""
    text = " ".join(virsh_stderr.split())
    m = re.search(r"unexpected exit status \d+: ([A-Z][A-Z_]*: .*)$", text)
    return m.group(1) if m else None


class SocketStandIn:
    """A context manager that moves the daemon's listening socket file at ``path`` aside and
    listens on ``path`` itself, so that a client connecting by path (the hook) reaches this
    socket instead of the daemon; on exit the stand-in goes and the daemon's file is put back
    (its listening socket never stopped: a rename keeps the socket inode, ``unix(7)``).

    :meth:`connections` accepts and counts the connections made so far (int). Nothing answers
    them, so a hook that does connect fails after its accept timeout (``hooks/vfio-hookd``
    ``ACCEPT_TIMEOUT_S``, 15 s) and shows up in the count.

    :raises OSError: ``path`` missing, or the stand-in could not bind (the file is put back).
    """

    def __init__(self, path: str):
        self.path, self.aside = path, path + ".demo-aside"
        self._sock: socket.socket | None = None
        self._count = 0

    def __enter__(self) -> "SocketStandIn":
        os.rename(self.path, self.aside)
        try:
            sock = socket.socket(socket.AF_UNIX,
                                 socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.bind(self.path)
                os.chmod(self.path, 0o600)
                sock.listen(16)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            if os.path.lexists(self.path):
                os.unlink(self.path)
            os.rename(self.aside, self.path)
            raise
        self._sock = sock
        return self

    def connections(self) -> int:
        """The number of connections made to the stand-in since it started listening."""
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return self._count
            conn.close()
            self._count += 1

    def __exit__(self, *exc) -> None:
        if self._sock is not None:
            self._sock.close()
        if os.path.lexists(self.path):
            os.unlink(self.path)
        os.rename(self.aside, self.path)


class Inner:
    """The scenarios, run next to the private libvirtd; results go to ``STATE/result.json``.

    :param state: the state directory; the simulated host is ``state/host``.
    :param address: the simulated system bus's address.
    :param vm: the managed VM's name.
    """

    def __init__(self, state: Path, address: str, vm: str):
        from testbed.sim import DEVICES
        from testbed.sim.kernel import SimHost
        self.state, self.address, self.vm = state, address, vm
        self.root = str(state / "host")
        self.host = SimHost(self.root)
        self.devices = list(DEVICES["nvidia"])
        self.daemon: DaemonProcess | None = None
        self.results: dict = {"vm": vm, "scenarios": {}, "checks": [], "problems": []}
        # `vfio-hookd status` as a user runs it: it asks the daemon (the repository's code
        # through PYTHONPATH, whatever the venv's editable install points at)
        self.cli_env = _env_without_paths()
        exe = Path(sys.executable).parent / "vfio-hookd"
        self.cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "vfio_hookd.cli"]

    # ---- small helpers ----------------------------------------------------------------------
    def check(self, scenario: str, what: str, ok: bool, detail: str = "") -> bool:
        self.results["checks"].append({"scenario": scenario, "what": what, "ok": bool(ok),
                                       "detail": detail})
        say(f"  [{'ok' if ok else 'FAIL'}] {what}" + (f": {detail}" if detail and not ok else ""))
        return bool(ok)

    def drivers(self) -> dict[str, str | None]:
        return {a: self.host.link_name(f"/sys/bus/pci/devices/{a}/driver") for a in self.devices}

    def show_host(self) -> None:
        h = self.host
        for a, d in self.drivers().items():
            vga = " (boot VGA)" if (h.read_or(f"/sys/bus/pci/devices/{a}/boot_vga") or "").strip() == "1" else ""
            say(f"  {a}  driver {d or 'none'}{vga}")
        mods = ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm", "snd_hda_intel", "vfio_pci"]
        say("  modules       " + ", ".join(f"{m} {'loaded' if h.module_loaded(m) else 'not loaded'}"
                                           for m in mods))
        units = _units(self.address)
        say(f"  units         {_fmt_units(units)}")
        vts = []
        for v in sorted(h.listdir("/sys/class/vtconsole")):
            name = (h.read_or(f"/sys/class/vtconsole/{v}/name") or "").strip()
            bind = (h.read_or(f"/sys/class/vtconsole/{v}/bind") or "").strip()
            vts.append(f"{v} {name!r} bind={bind}")
        say(f"  vtconsoles    {'; '.join(vts) or 'none'}")
        fb = (h.read_or("/proc/fb") or "").strip().replace("\n", "; ")
        plat = []
        for dev in FIRMWARE_FBS:
            if h.exists(f"/sys/devices/platform/{dev}"):
                drv = h.link_name(f"/sys/devices/platform/{dev}/driver")
                plat.append(f"{dev} ({'bound to ' + drv if drv else 'unbound'})")
        say(f"  framebuffer   /proc/fb: {fb or 'empty'}; {', '.join(plat) or 'no firmware framebuffer device'}")

    def status(self, vm: str, show: bool = True) -> dict:
        if show:
            _cmd([*self.cli, "status", vm], env=self.cli_env)
        r = _cmd([*self.cli, "status", vm, "--json"], env=self.cli_env, show=False)
        if r["rc"] != 0:
            return {"error": r["stderr"].strip()}
        return json.loads(r["stdout"]).get("vms", {}).get(vm, {})

    def virsh(self, *args: str) -> dict:
        return _cmd(["virsh", "-c", URI, *args])

    def domain_state(self, vm: str) -> list:
        from vfio_hookd.virt import Libvirt
        with Libvirt(URI) as lv:
            return list(lv.state_reason(vm))

    def snap(self) -> dict:
        return _snapshot(self.root, self.address)

    # ---- scenarios --------------------------------------------------------------------------
    def passthrough(self) -> None:
        vm, sc = self.vm, "passthrough"
        res: dict = self.results["scenarios"].setdefault(sc, {})
        before = self.snap()
        drivers_before = self.drivers()
        section(f"virsh start {vm}: libvirt runs the hook, the daemon prepares the host")
        res["start"] = r = self.virsh("start", vm)
        self.check(sc, "virsh start succeeded", r["rc"] == 0, r["stderr"].strip())
        section(f"vfio-hookd status {vm} (VM running)")
        st = self.status(vm)
        drivers, units = self.drivers(), _units(self.address)
        res["after_start"] = {"status": st, "drivers": drivers, "units": units,
                              "domain": self.domain_state(vm)}
        self.check(sc, "record phase prepared", st.get("phase") == "prepared", str(st.get("phase")))
        self.check(sc, "both functions on vfio-pci", set(drivers.values()) == {"vfio-pci"},
                   str(drivers))
        self.check(sc, f"{DEMO_DM} inactive", units.get(DEMO_DM) == "inactive",
                   str(units.get(DEMO_DM)))
        self.check(sc, "domain running", res["after_start"]["domain"][0] == "running",
                   str(res["after_start"]["domain"]))
        section("Host while the VM runs")
        self.show_host()
        section(f"virsh destroy {vm}: libvirt runs the release hook, the daemon gives it back")
        res["destroy"] = r = self.virsh("destroy", vm)
        self.check(sc, "virsh destroy succeeded", r["rc"] == 0, r["stderr"].strip())
        section(f"vfio-hookd status {vm} (VM stopped)")
        st = self.status(vm)
        after = self.snap()
        cmp = compare(before, after)
        res["after_destroy"] = {"status": st, "drivers": self.drivers(), "compare": cmp}
        self.check(sc, "record phase idle", st.get("phase") == "idle", str(st.get("phase")))
        desk = st.get("desktop") or {}
        self.check(sc, "desktop back (display manager, alice's session, card0, audio)",
                   desk.get("check") == "back", str(desk))
        self.check(sc, "functions back on their drivers", self.drivers() == drivers_before,
                   f"{self.drivers()} != {drivers_before}")
        section("Host compared with before virsh start")
        _show_compare(cmp)
        self.check(sc, "host as before, except the kernel's own changes", not cmp["unexpected"],
                   f"{len(cmp['unexpected'])} unexpected changes")
        self.check(sc, "units as before", cmp["units_equal"])

    def failure(self) -> None:
        from testbed.sim import faults
        vm, sc = self.vm, "failure"
        res: dict = self.results["scenarios"].setdefault(sc, {})
        before = self.snap()
        section("Failure: the next write to /sys/bus/pci/drivers_probe fails (ENODEV)")
        faults.inject(self.root, "write", "/sys/bus/pci/drivers_probe", "fail", errno=19, count=1)
        say("  injected: faults.inject(root, 'write', '/sys/bus/pci/drivers_probe', 'fail', "
            "errno=19, count=1)")
        res["start"] = r = self.virsh("start", vm)
        faults.clear(self.root)
        res["hook_error"] = line = hook_error(r["stderr"])
        self.check(sc, "virsh start failed", r["rc"] != 0)
        self.check(sc, "libvirt's error carries the hook's BIND_FAILED line",
                   bool(line) and line.startswith("BIND_FAILED: "), r["stderr"].strip())
        if line:
            say(f"  the hook said: {line}")
        res["domain"] = dom = self.domain_state(vm)
        self.check(sc, "domain shut off (failed)", dom == ["shut off", 6], str(dom))
        section(f"vfio-hookd status {vm} (after the failed start)")
        st = self.status(vm)
        after = self.snap()
        cmp = compare(before, after)
        res["after"] = {"status": st, "drivers": self.drivers(), "compare": cmp}
        self.check(sc, "record phase failed (rolled back)", st.get("phase") == "failed",
                   str(st.get("phase")))
        desk = st.get("desktop") or {}
        self.check(sc, "desktop back after the rollback", desk.get("check") == "back",
                   str(desk))
        section("Host compared with before the failed start")
        _show_compare(cmp)
        self.check(sc, "host rolled back, except the kernel's own changes", not cmp["unexpected"],
                   f"{len(cmp['unexpected'])} unexpected changes")
        self.check(sc, "units as before", cmp["units_equal"])

    def unmanaged(self) -> None:
        vm, sc = UNMANAGED_VM, "unmanaged"
        res: dict = self.results["scenarios"].setdefault(sc, {})
        before = self.snap()
        section(f"A VM without a profile ({vm}): the hook exits 0 and touches nothing")
        path = os.path.join(RUN_DIR, "vfio-hookd.sock")
        # The daemon logs nothing for a request about an unmanaged VM, so its log cannot show
        # whether the hook asked it; a socket of ours in its place counts what the hook sends.
        with SocketStandIn(path) as stand_in:
            say(f"  the daemon's socket {path} is moved aside while {vm} starts and stops; a "
                "socket of the demo's listens in its place and counts connections")
            res["start"] = r = self.virsh("start", vm)
            self.check(sc, "virsh start succeeded", r["rc"] == 0, r["stderr"].strip())
            mid = self.snap()
            res["domain"] = self.domain_state(vm)
            res["destroy"] = r = self.virsh("destroy", vm)
            self.check(sc, "virsh destroy succeeded", r["rc"] == 0, r["stderr"].strip())
            res["hook_connections"] = stand_in.connections()
        say(f"  connections to the daemon's socket path: {res['hook_connections']}")
        after = self.snap()
        res["unchanged_while_running"] = mid == before
        res["unchanged_after"] = after == before
        res["record_exists"] = os.path.lexists(os.path.join(RUN_DIR, "vms", vm + ".json"))
        self.check(sc, "domain was running", res["domain"][0] == "running", str(res["domain"]))
        self.check(sc, "host and units identical while it ran", res["unchanged_while_running"])
        self.check(sc, "host and units identical after it stopped", res["unchanged_after"])
        self.check(sc, "no record", not res["record_exists"])
        self.check(sc, "the hook never connected to the daemon's socket",
                   res["hook_connections"] == 0, f"{res['hook_connections']} connections")

    # ---- the whole inner run ----------------------------------------------------------------
    def run(self, scenarios: list[str]) -> int:
        from vfio_hookd.virt import Libvirt

        from .domains import tiny_domain_xml
        section("Simulated host before anything runs")
        self.show_host()
        section("Starting vfio-hookd daemon (log lines prefixed 'daemon |')")
        self.daemon = start_daemon(self.root, self.address)
        self.results["daemon_ready_ms"] = self.daemon.ready_ms
        say(f"  daemon pid {self.daemon.proc.pid}, READY=1 after {self.daemon.ready_ms:.0f} ms")
        prof = Path(CONFIG_DIR) / "vms" / f"{self.vm}.yaml"
        prof.parent.mkdir(parents=True, exist_ok=True)
        prof.write_text("# written by testbed.demo: the devices, all else default\n"
                        f"devices: [{', '.join(repr(a) for a in self.devices)}]\n")
        section(f"Profile {prof}")
        say("\n".join("  " + ln for ln in prof.read_text().splitlines()))
        with Libvirt(URI) as lv:
            for name in (self.vm, UNMANAGED_VM):
                lv.define(tiny_domain_xml(name))
        say(f"  defined domains {self.vm!r} and {UNMANAGED_VM!r} (TCG, 64 MiB, no disk; "
            "testbed.domains.tiny_domain_xml)")
        for sc in scenarios:
            getattr(self, sc)()
        return 0 if all(c["ok"] for c in self.results["checks"]) else 1

    def cleanup(self) -> None:
        """Destroy our domains if still running (while the daemon can still release), then
        stop the daemon by PID."""
        try:
            from vfio_hookd.virt import Libvirt
            with Libvirt(URI) as lv:
                for name in lv.active_names():
                    if name in (self.vm, UNMANAGED_VM):
                        say(f"  destroying {name} (still running)")
                        lv.destroy(name)
        except Exception as exc:  # noqa: BLE001 - cleanup goes on
            self.results["problems"].append(f"cleanup: destroy failed: {exc}")
        if self.daemon is not None:
            rc = self.daemon.stop(DAEMON_STOP_TIMEOUT_S)
            self.results["daemon_exit"] = rc
            self.results["daemon_log"] = self.daemon.lines
            say(f"  daemon pid {self.daemon.proc.pid} stopped (exit status {rc})")
            if rc != 0:
                self.results["problems"].append(f"daemon exit status {rc}")


def inner_main(args) -> int:
    """``python -m testbed.demo --inner STATE --bus ADDRESS [--vm VM] [--scenario S ...]``:
    runs inside the private namespace; writes ``STATE/result.json``; returns the exit status."""
    state = Path(args.inner).resolve()
    for var in PATH_VARS:
        os.environ.pop(var, None)  # this process and `virsh`: the defaults, like a real host

    def on_signal(signum, _frame):
        # SIGINT (Ctrl-C), SIGTERM (the runner's timeout, or passed on from the outer part),
        # SIGHUP: one way out, through the cleanup below; later signals would only cut it short
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    inner = Inner(state, args.bus, args.vm)  # starts nothing: the default dispositions will do
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    status = 1
    try:
        status = inner.run(args.scenario or list(DEMO_SCENARIOS))
    except Terminated as exc:
        inner.results["problems"].append("interrupted")
        say(f"\n  interrupted ({signal.Signals(exc.signum).name}): cleaning up")
        status = 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - reported, then cleanup
        inner.results["problems"].append(f"{type(exc).__name__}: {exc}")
        say(traceback.format_exc())
        status = 1
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        section("Stopping the daemon")
        inner.cleanup()
        if inner.results["problems"] and status == 0:
            status = 1
        (state / "result.json").write_text(json.dumps(inner.results, indent=1, default=str))
    return status


# ---------------------------------------------------------------------------------------------
# The outer part


class BusProcess:
    """``python -m testbed.sim.bus --root ROOT`` (the private bus and the simulated
    systemd) in a session of its own, so that a Ctrl-C in the terminal does not stop it while
    the inner part still needs it to give the host back. Ready when it prints the address.

    It must not outlive this process: it gets ``PR_SET_PDEATHSIG`` = SIGTERM (on which it
    stops the simulated systemd, its unit processes and dbus-daemon; :mod:`.pdeathsig`).
    Its stdin is a pipe only this process holds (closed by :meth:`stop`, and by the kernel
    when this process dies), for the bus runner to stop on end of file; it does not watch
    stdin yet, so today the parent-death signal is what stops it after a SIGKILL here.

    :raises RuntimeError: it exited or printed nothing within 20 s.
    """

    def __init__(self, root: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "testbed.sim.bus", "--root", root],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=child_env(), start_new_session=True,
                                     preexec_fn=parent_death_signal(signal.SIGTERM))
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 20.0)
            line = self.proc.stdout.readline().decode().strip() if ready else ""
            if not line:
                raise RuntimeError(f"simulated bus not ready (exit status {self.proc.poll()}; "
                                   f"logs in {root}/.sim/)")
        except BaseException:
            self.stop()
            raise
        self.address = line

    def stop(self) -> None:
        """Close its stdin, SIGTERM by PID (it stops the simulated systemd, then the bus),
        wait, SIGKILL after 15 s."""
        self.proc.stdin.close()
        stop_process(self.proc, 15)
        self.proc.stdout.close()


def run(state: str | os.PathLike, scenarios: list[str] | tuple[str, ...] = DEMO_SCENARIOS,
        latency: dict[str, float] | None = None, vm: str = DEFAULT_VM,
        cache_dir: str | os.PathLike | None = None, capture: bool = False,
        timeout_s: float = 300.0) -> dict:
    """Build the simulated host in ``state/host``, run the scenarios next to a private
    libvirtd (module docstring) and compare the host at the end with its start.

    :param state: an empty or missing directory for this run.
    :param scenarios: names from :data:`SCENARIOS`, run in this order.
    :param latency: per-operation latencies (s) of the simulated host (None: none).
    :param cache_dir: a ``/var/cache/libvirt`` shared between runs (QEMU probed once).
    :param capture: capture the output (``result["output"]``) instead of printing it.
    :returns: the inner part's results (``checks``: ``[{"scenario", "what", "ok",
        "detail"}]``, ``scenarios``: per-scenario data, ``problems``) plus ``rc`` (the inner
        part's exit status), ``final`` (:func:`compare` of the host at the end with its
        start), ``ok`` (bool: every check passed, nothing unexpected changed), ``timings``
        (the private libvirtd's), ``signal`` (the first SIGINT/SIGTERM/SIGHUP received while
        the inner part ran, or None; the inner part cleaned up and ``problems`` says
        ``interrupted``) and ``output`` (when captured).
    :raises RuntimeError: the simulated host or its bus could not be set up.
    :raises subprocess.TimeoutExpired: the run took longer than ``timeout_s`` (the runner got
        SIGTERM: the inner part and the daemons were stopped).
    :raises KeyboardInterrupt: SIGINT received while the inner part was not running (the
        bus is stopped first).
    :raises Terminated: the same for SIGTERM/SIGHUP. While the inner part runs, SIGTERM and
        SIGHUP sent to this process are passed on to the runner (SIGINT from a terminal
        reaches it directly) and the run ends normally once it has cleaned up.

    Signal handlers are installed for the call (main thread only) and restored afterwards.
    """
    from testbed.sim import make_host
    for sc in scenarios:
        if sc not in SCENARIOS:
            raise ValueError(f"unknown scenario {sc!r} (one of {', '.join(SCENARIOS)})")
    state = Path(state).resolve()
    root = state / "host"
    root.mkdir(parents=True)
    make_host(str(root), DEMO_HOST, latency=latency)
    interrupted: list[int] = []
    deferring = [False]   # True while the runner runs, and while the bus stops
    bus: BusProcess | None = None

    def on_signal(signum, _frame):
        if not deferring[0]:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        # The runner and the inner part clean up and exit; this process waits for them
        # instead of leaving the bus to vanish under them. A Ctrl-C in the terminal reached
        # them already (same process group); SIGTERM/SIGHUP sent to this process are passed on.
        interrupted.append(signum)
        if signum != signal.SIGINT:
            _signal_runner(signum, bus)

    old = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        bus = BusProcess(str(root))
        result = _run_with_bus(state, root, bus, scenarios, vm, cache_dir, capture, timeout_s,
                               deferring)
    finally:
        deferring[0] = True
        if bus is not None:
            bus.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    try:
        result["timings"] = json.loads((state / "libvirt" / "timings.json").read_text())
    except (OSError, ValueError):
        result["timings"] = {}
    if interrupted and "interrupted" not in result["problems"]:
        result["problems"].append("interrupted")
    result["signal"] = interrupted[0] if interrupted else None  # the first stop signal
    result["ok"] = (result["rc"] == 0 and not result["problems"] and bool(result["checks"])
                    and all(c["ok"] for c in result["checks"])
                    and not result["final"]["unexpected"] and result["final"]["units_equal"])
    return result


def _signal_runner(signum: int, bus: "BusProcess | None") -> None:
    """Send ``signum`` to this process's private-libvirtd runner (a child running
    ``testbed.libvirtd``: the PID :func:`testbed.libvirtd.run_in_private_libvirt`
    does not hand out), by PID."""
    import psutil
    for child in psutil.Process().children():
        try:
            if ((bus is None or child.pid != bus.proc.pid)
                    and "testbed.libvirtd" in child.cmdline()):
                child.send_signal(signum)
        except psutil.Error:
            pass  # gone meanwhile


def _run_with_bus(state: Path, root: Path, bus: "BusProcess", scenarios, vm: str, cache_dir,
                  capture: bool, timeout_s: float, deferring: list[bool]) -> dict:
    """:func:`run` once the bus is up; returns the result without ``timings`` and ``ok``."""
    from . import libvirtd
    result: dict = {"checks": [], "scenarios": {}, "problems": [], "rc": None}
    from .sim.desktops import wait_up
    wait_up(str(root))   # alice's PipeWire/WirePlumber on the HDMI audio: the host as it runs
    before = _snapshot(str(root), bus.address)
    for d in ("etc-vfio-hookd", "run-vfio-hookd"):
        (state / d).mkdir()
    (state / "etc-vfio-hookd" / "vms").mkdir()
    command = [sys.executable, "-m", "testbed.demo", "--inner", str(state),
               "--bus", bus.address, "--vm", vm]
    for sc in scenarios:
        command += ["--scenario", sc]
    binds = [(state / "etc-vfio-hookd", CONFIG_DIR), (state / "run-vfio-hookd", RUN_DIR)]
    # until the runner is gone a stop signal is recorded (and passed on), not raised
    deferring[0] = True
    try:
        proc = libvirtd.run_in_private_libvirt(
            state / "libvirt", command, hooks=[HOOK], binds=binds, env=_env_without_paths(),
            timeout_s=timeout_s, cache_dir=cache_dir, capture=capture)
    finally:
        deferring[0] = False
    try:
        result.update(json.loads((state / "result.json").read_text()))
    except (OSError, ValueError) as exc:
        result["problems"].append(f"no result from the inner part ({exc}); "
                                  f"exit status {proc.returncode}")
    result["rc"] = proc.returncode
    if capture:
        result["output"] = proc.stdout + proc.stderr
    after = _snapshot(str(root), bus.address)
    result["final"] = compare(before, after)
    return result


def _outer_main(args) -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it starts libvirtd in a private mount namespace)",
              file=sys.stderr)
        return 2
    for exe in ("virsh", "dbus-daemon"):
        if shutil.which(exe) is None:
            print(f"demo: {exe} not found: run scripts/setup", file=sys.stderr)
            return 2
    from testbed.sim import faults
    latency = None if args.no_latency else faults.REALISTIC
    state = Path(tempfile.mkdtemp(prefix="vfio-hookd-demo-"))
    say(f"vfio-hookd demo: state directory {state}")
    say("  simulated single-GPU NVIDIA host, its systemd on a private D-Bus bus, Debian's "
        "libvirtd in a private mount namespace")
    say("  latencies: " + ("none" if latency is None else
                          ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in latency.items() if v)))
    t0 = time.monotonic()
    try:
        result = run(state, args.scenario or DEMO_SCENARIOS, latency=latency, vm=args.vm)
    except (KeyboardInterrupt, Terminated) as exc:  # before or after the inner part ran
        signum = getattr(exc, "signum", signal.SIGINT)
        say(f"\nVERDICT: INTERRUPTED by {signal.Signals(signum).name} (state kept in {state})")
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 - one line, state kept
        say(f"\nVERDICT: FAILED: could not run the demo: {type(exc).__name__}: {exc} "
            f"(state kept in {state})")
        return 2
    total_s = time.monotonic() - t0
    section("Host at the end compared with the start (daemon and libvirtd stopped)")
    _show_compare(result["final"])
    section("Summary")
    sc = result.get("scenarios", {})
    start = sc.get("passthrough", {}).get("start")
    if start:
        say(f"  virsh start {args.vm} (passthrough): {start['ms']:.0f} ms wall time")
    steps = (sc.get("passthrough", {}).get("after_start", {}).get("status") or {}).get("steps")
    if steps:
        say("  prepare steps: " + ", ".join(f"{s['name']} {s['duration_ms']:.0f} ms"
                                            for s in steps if s["duration_ms"] is not None))
    steps = (sc.get("passthrough", {}).get("after_destroy", {}).get("status") or {}).get("steps")
    if steps:
        say("  release (undo): " + ", ".join(f"{s['name']} {s['undo_ms']:.0f} ms" for s in
                                             reversed(steps) if s.get("undo_ms") is not None))
    destroy = sc.get("passthrough", {}).get("destroy")
    if destroy:
        say(f"  virsh destroy {args.vm}: {destroy['ms']:.0f} ms wall time")
    failed = [c for c in result["checks"] if not c["ok"]]
    for c in failed:
        say(f"  FAILED check [{c['scenario']}] {c['what']}: {c['detail']}")
    for p in result["problems"]:
        say(f"  problem: {p}")
    n = len(result["checks"])
    if result["ok"]:
        if args.keep:
            say(f"  state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
        say(f"\nVERDICT: OK: {n} checks passed; the host came back as it was except the "
            f"kernel's own expected changes ({total_s:.1f} s)")
        return 0
    if "interrupted" in result["problems"]:
        signum = result.get("signal") or signal.SIGINT
        say(f"\nVERDICT: INTERRUPTED by {signal.Signals(signum).name} (state kept in {state})")
        return 128 + signum
    say(f"\nVERDICT: FAILED: {len(failed)} of {n} checks failed, "
        f"{len(result['final']['unexpected'])} unexpected host changes"
        f"{'' if result['final']['units_equal'] else ', units differ'} (state kept in {state})")
    return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/demo", description="Watch a real libvirtd drive "
                                "vfio-hookd on a simulated single-GPU host (run as root).")
    p.add_argument("--keep", action="store_true", help="keep the state directory on success")
    p.add_argument("--vm", default=DEFAULT_VM, help=f"the managed VM's name (default {DEFAULT_VM})")
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help=f"run these scenarios in order (default: {' '.join(DEMO_SCENARIOS)})")
    p.add_argument("--no-latency", action="store_true",
                   help="simulated operations take no time (default: realistic latencies)")
    p.add_argument("--inner", metavar="STATE", help=argparse.SUPPRESS)
    p.add_argument("--bus", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m testbed.demo``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.inner:
        return inner_main(args)
    return _outer_main(args)


if __name__ == "__main__":
    sys.exit(main())
