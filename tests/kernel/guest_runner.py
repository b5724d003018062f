"""Runs inside the kernel tests' QEMU guest (a chroot of the host's root, with the guest's own
``/proc``, ``/sys``, ``/dev`` and the test kernel's modules): the vfio-hookd scenarios against
the guest's real kernel. Started by ``tests/kernel/guest_init.sh``; never run it on a real host.

``python guest_runner.py OUTDIR``: reads ``OUTDIR/boot.json`` (``scenarios``, ``gpu``,
``firmware``, ``gpu_addr``, ``audio_addr``, ``repo``; the hardware shape's ``funcs``,
``desktop_gpu``, ``own_usb``, ``usb_devices``), writes ``OUTDIR/results/<scenario>.json``
for each scenario (``{"ok": bool, "error": str|null, "wall_s": float, ...}``), the daemon's log
to ``OUTDIR/daemon.log`` and its own to ``OUTDIR/runner.log``. Exit status 0 when every
scenario passed, 1 otherwise.

Importing this module only defines names (the kernel tests import it on the host): :func:`main`
reads ``boot.json``, puts its ``repo`` first on ``sys.path`` and builds the one :class:`Ctx`
(configuration, paths, environment, log) that everything else is handed; what the scenarios of
one phase hand on to each other lives in that phase's :class:`Phase`.

Each scenario declares the state it needs (:data:`SCENARIOS`): :data:`BASELINE` (the guest as
its phase's coldplug left it, nothing held) or :data:`PREPARED`. The runner establishes it
before the scenario: from the baseline it restores a guest that an earlier scenario left
half-way (``vfio-hookd release VM --force``, then by hand drivers, vtconsoles, units:
:func:`restore_baseline`); for prepared it runs a prepare when the guest is not prepared. The
result's ``precondition`` says what was done (``restored``, ``prepared_by_runner``); when the
state cannot be reached the scenario does not run and fails with ``precondition <state> not
reached: <differences>``, so one failure does not cascade into the next scenarios' checks.

The scenarios run in phases (:data:`PHASES`, each scenario names its own): each phase sets the
guest up (:func:`setup_phase`: the firmware framebuffer alone, the functions on vfio-pci from
boot on, or every driver loaded), coldplugs it, starts its :class:`World` and takes its
baseline.

An entry ``SCENARIO.fail-POINT`` in ``scenarios`` runs SCENARIO with a failure injected at its
injection point POINT (:meth:`Phase.injection`); the entry passes when SCENARIO failed there.
The kernel tests use it to prove that the scenarios after a failed one still pass.

Scenario ``libvirt`` also runs Debian's libvirtd in the guest (:class:`GuestLibvirt`) with the
project's hook installed, so the whole path virsh -> libvirtd -> hook -> daemon -> kernel is real.

What stands for the host's services: the project's simulated systemd on a private D-Bus bus
(``testbed.sim.bus.SimBus`` with ``root="/"``: its ``gdm.service`` is a real process holding
the guest's real ``/dev/dri/card0`` and the GPU's audio control node), and vfio-hookd's daemon
acting on ``/`` exactly as the service runs it (``python -m vfio_hookd daemon``, a real
:class:`vfio_hookd.host.Host`), started and stopped by :class:`testbed.daemon.DaemonProcess`.

The guest's state before and after is a flat tree of the paths the scenarios compare
(:func:`tree`), and :func:`testbed.expected.classify_changes` -- the same comparison the
simulated host's tests and the demo use -- says which differences are the kernel's own
(:func:`compare`); the baseline check of the preconditions uses it too, so a change the kernel
made for good (the firmware framebuffer removed once a driver took the boot GPU) is no
difference to restore. ``testbed`` and ``vfio_hookd`` are imported inside the functions that
use them, from the repository :func:`main` puts first on ``sys.path`` (``boot.json``'s ``repo``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import traceback
from types import MappingProxyType
from typing import Callable, NamedTuple

#: The runner's working directory in the guest: profiles in ``WORK/etc/vms``, the simulated
#: systemd's state in ``WORK/sim``.
WORK = "/tmp/vh"
#: The daemon's run directory (socket, records).
RUN_DIR = "/run/vfio-hookd"
VM = "guest"
#: The framebuffer step's note for a firmware framebuffer the kernel removed ("DEV was removed
#: by the kernel ...").
FB_NOTE = "was removed by the kernel"
#: The vtconsoles step's note for a VGA text console the kernel's VGA arbiter removed.
VGACON_NOTE = "the VGA text console ({vt}) was removed by the kernel's VGA arbiter"


class Ctx:
    """What the whole run shares, built once by :func:`main` from ``OUTDIR/boot.json``.

    :ivar out: the artefact directory (the guest's writable share).
    :ivar cfg: ``boot.json`` (dict).
    :ivar repo: the repository whose code runs (``cfg["repo"]``); ``py`` its venv's Python.
    :ivar gpu: the GPU's PCI address; ``audio`` its audio function's; ``funcs`` the functions
        a profile hands over (``boot.json``'s ``funcs``: the GPU, its audio function, and on
        the ``usb-c`` shape its xHCI function).
    :ivar desktop_gpu: the GPU the desktop runs on when it is not :attr:`gpu` (the ``two-gpu``
        shape; None: the desktop runs on :attr:`gpu`).
    :ivar own_usb: the guest's own xHCI controller (``usb-c`` shape), or None.
    :ivar env: environment of the CLI and the daemon (:class:`World` adds its bus address); the
        repository first on ``PYTHONPATH`` (:func:`testbed.child_env`).

    Built once ``cfg["repo"]`` is on ``sys.path`` (:func:`main`): it imports :mod:`testbed`.
    """

    def __init__(self, out: str, cfg: dict, logf):
        from testbed import child_env
        self.out = out
        self.cfg = cfg
        self.repo = cfg["repo"]
        self.gpu, self.audio = cfg["gpu_addr"], cfg["audio_addr"]
        self.funcs = tuple(cfg.get("funcs") or (self.gpu, self.audio))
        self.desktop_gpu = cfg.get("desktop_gpu")
        self.own_usb = cfg.get("own_usb")
        self.py = os.path.join(self.repo, ".venv", "bin", "python")
        self.env = child_env(VFIO_HOOKD_CONFIG=f"{WORK}/etc", VFIO_HOOKD_RUN=RUN_DIR,
                             VFIO_HOOKD_LOG="stderr")
        self._logf = logf
        self._t0 = time.monotonic()

    @classmethod
    def load(cls, out: str, cfg: dict) -> "Ctx":
        """The context of the boot whose artefact directory is ``out`` and configuration
        ``cfg`` (its ``boot.json``, read by :func:`main`): opens ``runner.log`` (appending)."""
        return cls(out, cfg, open(os.path.join(out, "runner.log"), "a", buffering=1))

    def close(self) -> None:
        self._logf.close()

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self._t0:7.2f}] {msg}"
        print(line, flush=True)
        self._logf.write(line + "\n")

    def profile(self, extra: str = "") -> None:
        """Write the VM's profile: the functions handed over (:attr:`funcs`), then ``extra``
        (YAML lines)."""
        with open(f"{WORK}/etc/vms/{VM}.yaml", "w") as f:
            f.write(f"devices: [{', '.join(repr(a) for a in self.funcs)}]\n{extra}")

    def cli(self, *args, timeout=300) -> subprocess.CompletedProcess:
        """``vfio-hookd ARGS...`` (``python -m vfio_hookd``) on the guest's ``/``."""
        t = time.monotonic()
        r = subprocess.run([self.py, "-m", "vfio_hookd", *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        self.log(f"vfio-hookd {' '.join(args)} -> {r.returncode} in {time.monotonic() - t:.2f} s"
                 + (f": {r.stderr.strip()}" if r.returncode else ""))
        return r

    def status(self) -> dict:
        r = self.cli("status", VM, "--json")
        check(r.returncode == 0, f"status failed: {r.stderr}")
        return json.loads(r.stdout)["vms"][VM]

    def drm_modules(self) -> set[str]:
        """Modules of the DRM drivers of the GPU function (``bochs``, ``virtio_gpu``). The DRM
        device's parent is the PCI function in both cases, but virtio-gpu's driver is bound to
        the function's child ``virtio0`` (the function itself is on virtio-pci)."""
        dev = os.path.realpath(f"/sys/bus/pci/devices/{self.gpu}")
        mods = set()
        for e in os.listdir("/sys/class/drm") if os.path.isdir("/sys/class/drm") else []:
            d = os.path.realpath(f"/sys/class/drm/{e}/device")
            if d == dev or d.startswith(dev + "/"):
                if driver(self.gpu) == "virtio-pci":
                    for c in os.listdir(dev):
                        if c.startswith("virtio") and link(f"{dev}/{c}/driver/module"):
                            mods.add(link(f"{dev}/{c}/driver/module"))
                elif link(f"{d}/driver/module"):
                    mods.add(link(f"{d}/driver/module"))
        return mods

    def snapshot(self, world, like: dict | None = None) -> dict:
        """``{"tree": tree(funcs), "units": the DM's unit states}``: what the scenarios and the
        baseline check compare (:func:`compare`). With ``like`` (an earlier snapshot) the sound
        nodes and USB devices it lists are waited for first (:func:`settle`)."""
        if like is not None:
            settle(list(like["tree"]))
        return {"tree": tree(self.funcs), "units": world.units()}


class Fail(Exception):
    """A scenario's check failed."""


def check(cond, what: str) -> None:
    if not cond:
        raise Fail(what)


# ---- reading the guest's kernel state --------------------------------------------------------
def rd(p: str, default=None):
    try:
        with open(p) as f:
            return f.read().rstrip("\n")
    except OSError:
        return default


def link(p: str):
    try:
        return os.path.basename(os.readlink(p))
    except OSError:
        return None


def driver(addr: str):
    return link(f"/sys/bus/pci/devices/{addr}/driver")


def modules() -> set[str]:
    return {line.split()[0] for line in (rd("/proc/modules", "") or "").splitlines()}


def function_nodes(addr: str) -> list[str]:
    """``/dev/...`` nodes of the DRM and sound class devices below PCI function ``addr``
    (also through a child device such as virtio-gpu's ``virtio0``)."""
    dev = os.path.realpath(f"/sys/bus/pci/devices/{addr}")
    out = []
    for cls in ("drm", "sound"):
        base = f"/sys/class/{cls}"
        for e in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if not os.path.realpath(f"{base}/{e}").startswith(dev + "/"):
                continue
            for line in (rd(f"{base}/{e}/uevent", "") or "").splitlines():
                if line.startswith("DEVNAME="):
                    out.append("/dev/" + line[8:])
    return out


def vtcons() -> dict:
    base = "/sys/class/vtconsole"
    return {v: (rd(f"{base}/{v}/name"), rd(f"{base}/{v}/bind")) for v in sorted(os.listdir(base))}


def platform_fbs() -> dict:
    from testbed.expected import FIRMWARE_FBS
    out = {}
    for d in FIRMWARE_FBS:
        if os.path.exists(f"/sys/bus/platform/devices/{d}"):
            out[d] = link(f"/sys/bus/platform/devices/{d}/driver")
    return out


def nodes() -> list[str]:
    out = []
    for d in ("/dev/dri", "/dev/snd", "/dev/vfio"):
        if os.path.isdir(d):
            out += [f"{d}/{e}" for e in sorted(os.listdir(d))]
    out += sorted(f"/dev/{e}" for e in os.listdir("/dev") if e.startswith("fb"))
    return out


def wait_sound_nodes(expected: list[str], timeout_s: float = 10.0) -> None:
    """Wait until every ``/dev/snd`` node in ``expected`` exists again. snd_hda_intel probes
    asynchronously (``azx_probe_work``): its driver link is there when ``drivers_probe``
    returns, the sound card and its nodes a little later (and the codec drivers are loaded
    on request by then). Polls ``/dev/snd`` (no event to wait on from a chroot without udev)."""
    want = [n for n in expected if n.startswith("/dev/snd/")]
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(n) for n in want) and time.monotonic() < deadline:
        time.sleep(0.05)


def usb_below(addr: str) -> dict:
    """``{name: driver}`` of the USB devices and interfaces below PCI function ``addr`` (an
    xHCI controller): its root hubs (``usb3``), their hub interfaces (``3-0:1.0``), the
    devices on its ports (``3-1``) and their interfaces (``3-1:1.0``)."""
    base = "/sys/bus/usb/devices"
    top = os.path.realpath(f"/sys/bus/pci/devices/{addr}")
    out = {}
    for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if os.path.realpath(f"{base}/{d}").startswith(top + "/"):
            out[d] = link(f"{base}/{d}/driver")
    return out


def wait_usb(want: dict, timeout_s: float = 20.0) -> dict:
    """Wait until every USB device and interface of ``want`` (``{path: ...}``, paths
    ``/sys/bus/usb/devices/NAME/driver`` of a snapshot's tree) is bound again, or ``timeout_s``
    has passed; returns the names still unbound. A hub enumerates its ports in its own work
    item (``hub_event``): the devices come some time after the controller's driver is bound
    (polled: no event to wait on from a chroot without udev)."""
    names = [p.split("/")[5] for p in want
             if p.startswith("/sys/bus/usb/devices/") and p.endswith("/driver")]
    deadline = time.monotonic() + timeout_s
    while True:
        left = [n for n in names if not os.path.exists(f"/sys/bus/usb/devices/{n}/driver")]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def settle(paths: list[str]) -> None:
    """Wait for what a function given back brings back asynchronously among ``paths`` (a
    snapshot's tree): its sound nodes (:func:`wait_sound_nodes`) and the USB devices below an
    xHCI function (:func:`wait_usb`)."""
    wait_sound_nodes(paths)
    wait_usb(paths)


def tree(funcs: tuple) -> dict:
    """The guest's state the scenarios compare, as a flat tree ``{path: (kind, value)}`` in
    :mod:`testbed.expected`'s shape: every PCI function's ``driver`` link, the GPU functions'
    (``funcs``) ``driver_override``, ``/sys/module/M`` for each loaded module, the vtconsoles
    (link, directory, ``name``, ``bind``), ``/proc/fb``, the firmware framebuffer devices, the
    device nodes (``/dev/dri``, ``/dev/snd``, ``/dev/vfio/N``, ``/dev/fbN``), and every USB
    device and interface (its link in ``/sys/bus/usb/devices``, which names the controller it
    is below, and its ``driver`` link), and each hugepage pool's ``nr_hugepages`` and
    ``surplus_hugepages``."""
    from testbed.expected import FIRMWARE_FBS
    out: dict = {}

    def file(p: str) -> None:
        try:
            with open(p) as f:
                out[p] = ("file", f.read())
        except OSError:
            pass

    def symlink(p: str) -> None:
        try:
            out[p] = ("link", os.readlink(p))
        except OSError:
            pass

    for a in sorted(os.listdir("/sys/bus/pci/devices")):
        symlink(f"/sys/bus/pci/devices/{a}/driver")
    usb = "/sys/bus/usb/devices"
    for d in sorted(os.listdir(usb)) if os.path.isdir(usb) else []:
        symlink(f"{usb}/{d}")
        symlink(f"{usb}/{d}/driver")
    for a in funcs:
        file(f"/sys/bus/pci/devices/{a}/driver_override")
    for m in sorted(modules()):
        out[f"/sys/module/{m}"] = ("dir", None)
    base = "/sys/devices/virtual/vtconsole"
    for v in sorted(os.listdir("/sys/class/vtconsole")):
        symlink(f"/sys/class/vtconsole/{v}")
        out[f"{base}/{v}"] = ("dir", None)
        file(f"{base}/{v}/name")
        file(f"{base}/{v}/bind")
    file("/proc/fb")
    for dev in FIRMWARE_FBS:
        # /sys/devices/platform/DEV up to Linux 6.8, below the boot VGA's PCI function since
        # 6.9 (testbed.expected): where the bus's link points
        bus = f"/sys/bus/platform/devices/{dev}"
        top = os.path.realpath(bus) if os.path.exists(bus) else f"/sys/devices/platform/{dev}"
        if os.path.isdir(top):
            out[top] = ("dir", None)
            symlink(f"{top}/driver")
        symlink(bus)
    for n in nodes():
        if n != "/dev/vfio/vfio":
            out[n] = ("node", None)
    pools = "/sys/kernel/mm/hugepages"
    for d in sorted(os.listdir(pools)) if os.path.isdir(pools) else []:
        file(f"{pools}/{d}/nr_hugepages")
        file(f"{pools}/{d}/surplus_hugepages")
    return out


def tree_driver(snap: dict, addr: str):
    """The driver of ``addr`` in snapshot ``snap`` (None: unbound)."""
    value = snap["tree"].get(f"/sys/bus/pci/devices/{addr}/driver")
    return os.path.basename(value[1]) if value else None


def tree_modules(snap: dict) -> set[str]:
    """The modules loaded in snapshot ``snap``."""
    return {p[len("/sys/module/"):] for p in snap["tree"] if p.startswith("/sys/module/")}


def compare(before: dict, after: dict, notes=()) -> tuple[dict, list[str]]:
    """``(left, expected)``: the differences between two snapshots that are not the kernel's
    own (:func:`testbed.expected.classify_changes`; units included), and the expected lines.
    A firmware framebuffer the kernel removed, or a VGA text console it replaced, counts as
    expected only when the release said so in its framebuffer or vtconsoles step's ``notes``
    (:data:`FB_NOTE`, :data:`VGACON_NOTE`); ``notes`` None: not asked (the baseline check of
    the preconditions, where no release of this comparison's own reports it)."""
    from testbed.expected import classify_changes, framebuffer_removed, text_consoles_replaced
    expected, left = classify_changes(before["tree"], after["tree"])
    left = {k: list(v) for k, v in left.items()}
    if before["units"] != after["units"]:
        left["units"] = [before["units"], after["units"]]
    for line in expected if notes is not None else ():
        if framebuffer_removed([line]):
            dev = line.split()[2]    # "firmware framebuffer efi-framebuffer.0 removed: ..."
            if not any(f"{dev} {FB_NOTE}" in n for n in notes):
                left[f"notes: {dev}"] = [f"{dev} removed by the kernel but the release did "
                                         f"not report it", list(notes)]
        for vt in text_consoles_replaced([line]):
            if not any(VGACON_NOTE.format(vt=vt) in n for n in notes):
                left[f"notes: {vt}"] = [f"the VGA text console {vt} was replaced by the "
                                        f"kernel but the release did not report it",
                                        list(notes)]
    return left, expected


# ---- the world: coldplug, simulated systemd, daemon ------------------------------------------
#: The buses whose devices :func:`coldplug` loads modules for: PCI, the virtio devices below
#: virtio-pci (virtio-gpu, 9p), the USB devices and interfaces below an xHCI controller
#: (usbhid for the keyboard and the tablet) and the HID devices below those (hid-generic).
COLDPLUG_BUSES = ("pci", "virtio", "usb", "hid")


def bus_drivers() -> dict:
    """``{bus/device: driver}`` over :data:`COLDPLUG_BUSES`."""
    out = {}
    for bus in COLDPLUG_BUSES:
        base = f"/sys/bus/{bus}/devices"
        for d in os.listdir(base) if os.path.isdir(base) else []:
            out[f"{bus}/{d}"] = link(f"{base}/{d}/driver")
    return out


def usb_ports_filled(usb_devices: dict, timeout_s: float = 20.0) -> None:
    """Wait until each xHCI controller of ``usb_devices`` (``{PCI address: how many USB
    devices on its ports}``) that has a driver shows that many devices (``3-1``; root hubs
    and interfaces not counted), or ``timeout_s`` has passed (the hub enumerates its ports
    in its own work item after the controller's driver is bound; polled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not driver(a) or sum(1 for d in usb_below(a) if "-" in d and ":" not in d) >= n
               for a, n in usb_devices.items()):
            return
        time.sleep(0.05)


def coldplug(skip: tuple = (), usb_devices: dict | None = None) -> None:
    """Load the modules of every device but ``skip`` (PCI addresses), as udev's coldplug does
    (``modprobe -a MODALIAS``), until no new driver binds (a driver binding may add devices
    that need modules of their own: an xHCI's USB devices, a keyboard's HID device, which
    come once the devices of ``usb_devices`` (:func:`usb_ports_filled`) are there)."""
    for _ in range(4):
        if usb_devices:
            usb_ports_filled(usb_devices)
        aliases = []
        for bus in COLDPLUG_BUSES:
            base = f"/sys/bus/{bus}/devices"
            for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
                if d not in skip and not os.path.exists(f"{base}/{d}/driver"):
                    a = rd(f"{base}/{d}/modalias")
                    if a:
                        aliases.append(a)
        if not aliases:
            return
        before = bus_drivers()
        subprocess.run(["modprobe", "-a", "-q", "-b", *aliases], check=False)
        after = bus_drivers()
        if after == before and not os.path.isdir("/sys/bus/virtio/devices"):
            return


def static_nodes(ctx: Ctx) -> None:
    """Create the static device nodes of modules not loaded yet (``kmod static-nodes``), as
    systemd-tmpfiles does at boot: ``/dev/vfio/vfio`` (char 10:196), whose first open loads
    vfio. libvirt checks it before it assigns a PCI device through VFIO."""
    r = subprocess.run(["kmod", "static-nodes", "--format=tmpfiles"], capture_output=True,
                       text=True, check=False)
    for line in r.stdout.splitlines():
        parts = line.split()      # c! /dev/vfio/vfio 0600 - - - 10:196
        if len(parts) == 7 and parts[0].startswith("c") and parts[1] == "/dev/vfio/vfio" \
                and not os.path.exists(parts[1]):
            major, minor = (int(x) for x in parts[6].split(":"))
            os.makedirs(os.path.dirname(parts[1]), exist_ok=True)
            os.mknod(parts[1], int(parts[2], 8) | stat.S_IFCHR, os.makedev(major, minor))
            ctx.log(f"static node {parts[1]} ({parts[6]})")


class World:
    """The simulated systemd (``gdm.service`` holding the GPU's card and the GPU audio's
    control node, none when the GPU has no driver; on the ``two-gpu`` shape the card of the
    desktop's own GPU, :attr:`Ctx.desktop_gpu`, alone) on a private bus, and the daemon."""

    def __init__(self, ctx: Ctx):
        from testbed.sim.bus import SimBus
        from vfio_hookd.systemd import Systemd
        os.makedirs(f"{WORK}/etc/vms", exist_ok=True)
        shutil.rmtree(f"{WORK}/sim", ignore_errors=True)
        os.makedirs(f"{WORK}/sim/.sim", exist_ok=True)
        # the DM holds the GPU's card and the GPU audio's control node; with no DRM driver
        # (the OVMF efifb phase) there is no session on the GPU and it holds nothing
        self.ctx = ctx
        if ctx.desktop_gpu:
            holds = [n for n in function_nodes(ctx.desktop_gpu) if "/card" in n][:1]
        else:
            card = [n for n in function_nodes(ctx.gpu) if "/card" in n][:1]
            holds = card + ([n for n in function_nodes(ctx.audio) if "/controlC" in n][:1]
                            if card else [])
        self.holds = holds
        with open(f"{WORK}/sim/.sim/units.json", "w") as f:
            json.dump({"gdm.service": {"aliases": ["display-manager.service"], "active": True,
                                       "holds": holds}}, f)
        self.bus = SimBus("/", ready_timeout_s=60, state_root=f"{WORK}/sim")
        ctx.env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus.address
        self.systemd = Systemd(self.bus.address)
        self.daemon = None
        self.path_prefix = None
        self.start_daemon()

    def units(self) -> dict:
        return self.systemd.list_units()

    def dm_pid(self):
        with open(f"{WORK}/sim/.sim/units-state.json") as f:
            return json.load(f)["gdm.service"]["pid"]

    def restart_daemon(self, path_prefix: str | None = None) -> None:
        """Stop the daemon (SIGTERM, wait) and start it again, with ``path_prefix`` (a
        directory) first in its PATH when given."""
        self.daemon.stop(60)
        self.start_daemon(path_prefix)

    def start_daemon(self, path_prefix: str | None = None) -> None:
        """``python -m vfio_hookd daemon`` on ``/`` (:class:`testbed.daemon.DaemonProcess`),
        its log appended to ``OUT/daemon.log``, ready at ``READY=1``."""
        from testbed.daemon import DaemonProcess
        env = dict(self.ctx.env)
        if path_prefix:
            env["PATH"] = f"{path_prefix}:{env['PATH']}"
        self.path_prefix = path_prefix
        self.daemon = DaemonProcess(None, env=env, python=self.ctx.py, ready_timeout_s=120,
                                    log_path=os.path.join(self.ctx.out, "daemon.log"))
        self.ctx.log(f"daemon ready in {self.daemon.ready_ms / 1000:.1f} s "
                     f"(pid {self.daemon.pid})")

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(60)
        self.systemd.close()
        self.bus.stop()


def step_times(st: dict) -> dict:
    return {s["name"]: {"apply_ms": s["duration_ms"], "undo_ms": s.get("undo_ms"),
                        "status": s["status"], "notes": s.get("notes") or []}
            for s in st["steps"]}


# ---- scenarios --------------------------------------------------------------------------------
def sc_prepare(ctx: Ctx, ph: Phase) -> dict:
    """Scenario 1: prepare; both functions on vfio-pci, /dev/vfio/<group>, DRM module unloaded,
    framebuffer vtconsoles unbound, DM process gone, status --json agrees with sysfs.
    Injection points (entry ``prepare.fail-POINT``): ``early``, before ``vfio-hookd prepare``;
    ``late``, right after it succeeded (the guest is left prepared)."""
    world = ph.world
    ctx.profile()
    before = ctx.snapshot(world)
    drm = ctx.drm_modules()
    dm = world.dm_pid()
    check(dm and os.path.exists(f"/proc/{dm}"), f"display manager not running before: {dm}")
    check(drm, "no DRM driver bound to the GPU before prepare")
    ph.injection("early")
    r = ctx.cli("prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    ph.prepared_from = before
    ph.injection("late")
    for a in ctx.funcs:
        check(driver(a) == "vfio-pci", f"{a} is on {driver(a)} after prepare")
    group = link(f"/sys/bus/pci/devices/{ctx.gpu}/iommu_group")
    check(group == link(f"/sys/bus/pci/devices/{ctx.audio}/iommu_group"), "functions in two groups")
    check(os.path.exists(f"/dev/vfio/{group}"), f"/dev/vfio/{group} missing")
    left = drm & modules()
    check(not left, f"DRM module(s) still loaded: {sorted(left)}")
    bound_fb = [v for v, (name, b) in vtcons().items() if "frame buffer" in (name or "") and b == "1"]
    check(not bound_fb, f"frame-buffer vtconsoles still bound: {bound_fb}")
    check(not os.path.exists(f"/proc/{dm}"), f"display manager PID {dm} still running")
    check(world.units()["gdm.service"] == "inactive", f"gdm: {world.units()['gdm.service']}")
    st = ctx.status()
    check(st["phase"] == "prepared", f"status phase {st['phase']}")
    for d in st["devices"]:
        check(d["driver"] == driver(d["address"]),
              f"status says {d['address']} on {d['driver']}, sysfs {driver(d['address'])}")
    return {"group": group, "drm_modules": sorted(drm), "steps": step_times(st),
            "before": before, "after": ctx.snapshot(world)}


def sc_vfio_qemu(ctx: Ctx, ph: Phase) -> dict:
    """Scenario 3: a nested QEMU opens both functions through VFIO and quits cleanly."""
    argv = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
            "-display", "none", "-S", "-monitor", "stdio",
            "-device", f"vfio-pci,host={ctx.gpu[5:]},id=gpu",
            "-device", f"vfio-pci,host={ctx.audio[5:]},id=hda"]
    t = time.monotonic()
    r = subprocess.run(argv, input="info pci\nquit\n", capture_output=True, text=True, timeout=120)
    took = round(time.monotonic() - t, 2)
    ctx.log(f"nested qemu exit {r.returncode} in {took} s; stderr: {r.stderr.strip()[:400]}")
    check(r.returncode == 0, f"nested QEMU exit status {r.returncode}: {r.stderr.strip()[-800:]}")
    check("id \"gpu\"" in r.stdout and "id \"hda\"" in r.stdout,
          f"info pci does not list both vfio devices: {r.stdout[-1500:]}")
    return {"qemu_s": took}


def sc_release(ctx: Ctx, ph: Phase) -> dict:
    """Scenario 2: release gives everything back; the snapshot equals the one before prepare
    (the firmware framebuffer removed by the kernel is reported as expected)."""
    world = ph.world
    before, ph.prepared_from = ph.prepared_from, None
    r, release_s = timed_cli(ctx, "release", VM)
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    after = ctx.snapshot(world, like=before)
    st = ctx.status()
    check(st["phase"] == "idle", f"status phase {st['phase']}")
    notes = [n for s in st["steps"] for n in (s.get("notes") or [])]
    left, expected = compare(before, after, notes)
    check(not left, f"state after release differs from before prepare: {json.dumps(left)}")
    for a in ctx.funcs:
        check(driver(a) == tree_driver(before, a), f"{a} on {driver(a)}")
    dm = world.dm_pid()
    check(dm and os.path.exists(f"/proc/{dm}"), "display manager not running after release")
    return {"release_s": release_s, "steps": step_times(st), "notes": notes,
            "expected_differences": expected, "after": after}


def _holder(path: str) -> subprocess.Popen:
    """A process (not in any unit) holding ``path`` open."""
    return subprocess.Popen(["/bin/sh", "-c", f"exec sleep infinity 3<{path}"],
                            stdin=subprocess.DEVNULL)


def sc_holders(ctx: Ctx, ph: Phase) -> dict:
    """Scenario 4: a holder outside any unit: on_busy fail -> DEVICE_BUSY with its PID and the
    guest exactly as before; on_busy terminate -> prepare succeeds (then release)."""
    world = ph.world
    ctx.profile()
    card = world.holds[0]
    h = _holder(card)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:   # wait until the shell has exec'd with the fd
            try:
                if any(os.readlink(f"/proc/{h.pid}/fd/{fd}") == card
                       for fd in os.listdir(f"/proc/{h.pid}/fd")):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        before = ctx.snapshot(world)
        r = ctx.cli("prepare", VM)
        check(r.returncode != 0, "prepare succeeded although a process holds the GPU")
        check(r.stderr.startswith("DEVICE_BUSY:"), f"not DEVICE_BUSY: {r.stderr.strip()}")
        check(f"PID {h.pid}" in r.stderr, f"holder PID {h.pid} not named: {r.stderr.strip()}")
        left, _ = compare(before, ctx.snapshot(world, like=before))
        check(not left, f"state after the refused prepare differs: {json.dumps(left)}")
        check(h.poll() is None, "the holder was killed although on_busy is fail")
        st_fail = ctx.status()
        ctx.profile("on_busy: terminate\n")
        r = ctx.cli("release", VM)      # the failed record holds nothing; release is a no-op
        check(r.returncode == 0, f"release after a failed prepare: {r.stderr}")
        r = ctx.cli("prepare", VM)
        check(r.returncode == 0, f"prepare with on_busy: terminate failed: {r.stderr.strip()}")
        h.wait(10)
        check(all(driver(a) == "vfio-pci" for a in ctx.funcs), "not on vfio-pci")
        st_ok = ctx.status()
        r = ctx.cli("release", VM)
        check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
        notes = [n for s_ in ctx.status()["steps"] for n in (s_.get("notes") or [])]
        left, _ = compare(before, ctx.snapshot(world, like=before), notes)
        check(not left, f"state after terminate+release differs: {json.dumps(left)}")
        return {"refused": r.stderr.strip(), "steps_fail": step_times(st_fail),
                "steps_terminate": step_times(st_ok)}
    finally:
        if h.poll() is None:
            h.kill()
            h.wait()
        ctx.profile()


def sc_fault(ctx: Ctx, ph: Phase) -> dict:
    """Scenario 5: vfio-pci cannot be loaded (``install vfio_pci /bin/false`` in the guest's
    /etc/modprobe.d; a plain ``modprobe vfio-pci`` is checked to fail on that rule first):
    prepare fails in bind_vfio, the last step, after the GPU's DRM module was unloaded, and
    the rollback restores everything (the module loaded again binds the GPU again)."""
    world = ph.world
    ctx.profile()
    for m in ("vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "vfio"):
        if m in modules():
            subprocess.run(["rmmod", m], check=False)
    check("vfio_pci" not in modules(), "could not unload vfio_pci for the test")
    conf = "/etc/modprobe.d/zz-vfio-hookd-kernel-test.conf"
    with open(conf, "w") as f:
        f.write("install vfio_pci /bin/false\n")
    try:
        # kmod runs the install command instead of inserting the module; when the command
        # fails, kmod reports "Error running install command ..." and returns -EINVAL, so the
        # last line modprobe prints is "could not insert 'vfio_pci': Invalid argument" (kmod
        # libkmod-module.c module_do_install_commands); nothing reaches the kernel.
        direct = subprocess.run(["modprobe", "vfio-pci"], capture_output=True, text=True)
        ctx.log(f"modprobe vfio-pci: {direct.returncode}: {direct.stderr.strip()}")
        check(direct.returncode != 0 and "Error running install command" in direct.stderr,
              f"the install rule did not fail modprobe: {direct.returncode} {direct.stderr!r}")
        check("vfio_pci" not in modules(), "vfio_pci got loaded despite the install rule")
        before = ctx.snapshot(world)
        r = ctx.cli("prepare", VM)
        check(r.returncode != 0, "prepare succeeded although vfio-pci cannot load")
        check(r.stderr.startswith("MODULE_FAILED: step bind_vfio: loading module vfio-pci"),
              f"unexpected: {r.stderr.strip()}")
        left, _ = compare(before, ctx.snapshot(world, like=before))
        check(not left, f"state after rollback differs: {json.dumps(left)}")
        st = ctx.status()
        check(st["phase"] == "failed", f"phase {st['phase']}")
        steps = {s_["name"]: s_["status"] for s_ in st["steps"]}
        check(steps.get("modules") == "undone" and steps.get("bind_vfio") == "failed",
              f"steps after the rollback: {steps}")
        return {"error": r.stderr.strip(), "modprobe_stderr": direct.stderr.strip(),
                "steps": step_times(st)}
    finally:
        os.unlink(conf)


def sc_fault_late(ctx: Ctx, ph: Phase) -> dict:
    """Scenario 5b: the modules step fails after the units, holders, vtconsoles and
    framebuffer steps were applied: an ``rmmod`` first in the daemon's PATH refuses the GPU's
    DRM module (as kmod does for a module in use). The rollback must undo them on the real
    kernel: the vtconsoles rebound, the DM started; the state equals the one before."""
    world = ph.world
    ctx.profile()
    drm = sorted(ctx.drm_modules())
    check(drm, "no DRM module bound to the GPU")
    fbin = f"{WORK}/faultbin"
    os.makedirs(fbin, exist_ok=True)
    with open(f"{fbin}/rmmod", "w") as f:
        f.write("#!/bin/sh\n"
                f"for m in \"$@\"; do case \" {' '.join(drm)} \" in *\" $m \"*)\n"
                "  echo \"rmmod: ERROR: Module $m is in use (injected by the kernel tests)\" >&2\n"
                "  exit 1;; esac; done\n"
                "exec /usr/sbin/rmmod \"$@\"\n")
    os.chmod(f"{fbin}/rmmod", 0o755)
    world.restart_daemon(path_prefix=fbin)
    try:
        before = ctx.snapshot(world)
        dm = world.dm_pid()
        r = ctx.cli("prepare", VM)
        check(r.returncode != 0, "prepare succeeded although rmmod fails")
        check(r.stderr.startswith(f"MODULE_FAILED: step modules: unloading module {drm[0]}")
              and "injected" in r.stderr, f"unexpected: {r.stderr.strip()}")
        st = ctx.status()
        check(st["phase"] == "failed", f"phase {st['phase']}")
        steps = {s_["name"]: s_["status"] for s_ in st["steps"]}
        check(steps.get("modules") == "failed" and steps.get("bind_vfio") == "pending"
              and steps.get("vtconsoles") == "undone" and steps.get("units") == "undone",
              f"steps after the rollback: {steps}")
        notes = [n for s_ in st["steps"] for n in (s_.get("notes") or [])]
        left, expected = compare(before, ctx.snapshot(world, like=before), notes)
        check(not left, f"state after the rollback differs: {json.dumps(left)}")
        new_dm = world.dm_pid()
        check(new_dm != dm and os.path.exists(f"/proc/{new_dm}"), "display manager not restarted")
        return {"error": r.stderr.strip(), "steps": step_times(st),
                "expected_differences": expected}
    finally:
        world.restart_daemon()


def libvirt_conf() -> tuple[str, str]:
    """``(qemu.conf, libvirtd.conf)`` of the guest's libvirtd (FIELD-NOTES §5): the private
    test daemon's settings (root QEMU, no relabelling, no cgroups, no private /dev, so QEMU
    sees the guest's /dev/vfio) plus QEMU's log to a plain file (no virtlogd to start)."""
    from testbed.libvirtd import LIBVIRTD_CONF_EXTRA, QEMU_CONF_EXTRA
    return QEMU_CONF_EXTRA + 'stdio_handler = "file"\n', LIBVIRTD_CONF_EXTRA


LIBVIRT_DIRS = ("/etc/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt",
                "/run/libvirt")


class GuestLibvirt:
    """Debian's ``/usr/sbin/libvirtd`` running in the guest (a fresh tmpfs on each of
    :data:`LIBVIRT_DIRS`, so nothing of this machine's libvirt configuration is seen), with
    vfio-hookd's hook installed as ``/etc/libvirt/hooks/qemu.d/vfio-hookd`` before libvirtd
    starts (libvirt discovers hooks at start, FIELD-NOTES §1). The hook runs with libvirtd's
    environment, so it uses the default paths: ``/etc/vfio-hookd`` is made a link to the
    runner's configuration directory and the daemon listens on ``/run/vfio-hookd``."""

    ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "HOME": "/root"}

    def __init__(self, ctx: Ctx):
        from testbed.libvirtd import _DirWatch
        self.ctx = ctx
        qemu_conf, libvirtd_conf = libvirt_conf()
        for d in LIBVIRT_DIRS:
            os.makedirs(d, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d], check=True)
        for d in ("/etc/libvirt/hooks/qemu.d", "/etc/libvirt/qemu", "/var/lib/libvirt/qemu",
                  "/var/log/libvirt/qemu", "/var/cache/libvirt/qemu"):
            os.makedirs(d, exist_ok=True)
        with open("/etc/libvirt/qemu.conf", "w") as f:
            f.write(qemu_conf)
        with open("/etc/libvirt/libvirtd.conf", "w") as f:
            f.write(libvirtd_conf)
        hook = "/etc/libvirt/hooks/qemu.d/vfio-hookd"
        shutil.copyfile(os.path.join(self.ctx.repo, "vfio_hookd", "qemu_hook.py"), hook)
        os.chmod(hook, 0o755)
        if os.path.lexists("/etc/vfio-hookd"):
            shutil.rmtree("/etc/vfio-hookd") if os.path.isdir("/etc/vfio-hookd") and \
                not os.path.islink("/etc/vfio-hookd") else os.unlink("/etc/vfio-hookd")
        os.symlink(f"{WORK}/etc", "/etc/vfio-hookd")
        t = time.monotonic()
        self.logf = open(os.path.join(self.ctx.out, "libvirtd.log"), "ab")
        watch = _DirWatch("/run/libvirt")
        try:
            self.proc = subprocess.Popen(["/usr/sbin/libvirtd"], env=self.ENV, cwd="/",
                                         stdin=subprocess.DEVNULL, stdout=self.logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            watch.wait_for("libvirt-admin-sock", self.proc, "libvirtd", time.monotonic() + 120)
        finally:
            watch.close()
        r = self.virsh("version")    # answered once the qemu driver has probed QEMU
        check(r.returncode == 0, f"libvirtd does not answer: {r.stderr.strip()}")
        self.ready_s = round(time.monotonic() - t, 2)
        self.ctx.log(f"libvirtd ready in {self.ready_s} s (pid {self.proc.pid})")

    def virsh(self, *args, timeout=240) -> subprocess.CompletedProcess:
        t = time.monotonic()
        r = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], env=dict(self.ENV, LC_ALL="C"),
                           capture_output=True, text=True, timeout=timeout)
        self.ctx.log(f"virsh {' '.join(args)} -> {r.returncode} in {time.monotonic() - t:.2f} s"
            + (f": {r.stderr.strip()}" if r.returncode else ""))
        return r

    def domstate(self, name: str) -> str:
        r = self.virsh("domstate", name)
        check(r.returncode == 0, f"virsh domstate: {r.stderr.strip()}")
        return r.stdout.strip()

    def qemu_pid(self, name: str):
        return int(rd(f"/run/libvirt/qemu/{name}.pid", "0") or 0) or None

    def close(self) -> None:
        from testbed.procs import stop as stop_process
        stop_process(self.proc, 60)
        self.logf.close()
        qlog = "/var/log/libvirt/qemu/guest.log"
        if os.path.exists(qlog):
            shutil.copyfile(qlog, os.path.join(self.ctx.out, "libvirt-qemu-guest.log"))
        for d in reversed(LIBVIRT_DIRS):
            subprocess.run(["umount", "-l", d], check=False)


def _opened_by(pid: int, path: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _wait_open(h: subprocess.Popen, path: str) -> None:
    """Wait (10 s at most) until the holder ``h`` has ``path`` open (the shell has exec'd)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _opened_by(h.pid, path):
        time.sleep(0.02)
    check(_opened_by(h.pid, path), f"holder {h.pid} did not open {path}")


def sc_libvirt(ctx: Ctx, ph: Phase) -> dict:
    """Scenario 6: libvirtd in the guest, the hook in ``/etc/libvirt/hooks/qemu.d/``, a domain
    holding both functions as ``<hostdev managed='no'>`` and a profile with ``devices: auto``
    (the functions come from the domain XML libvirt hands the hook).

    managed='no': libvirt itself then never binds or unbinds the functions, and refuses to
    start a domain whose unmanaged function is not on vfio-pci, so a successful start proves
    the hook prepared the host (with managed='yes', libvirt would detach the functions itself
    after the prepare hook and the start would succeed whatever the hook did).

    a. without a profile the hook does nothing: ``virsh start`` fails, the guest unchanged;
    b. with the profile ``virsh start --paused`` succeeds, both functions on vfio-pci, QEMU
       holds ``/dev/vfio/<group>``, the DM stopped; ``virsh destroy`` gives everything back
       (release end) and the state equals the one before;
    c. a process outside any unit holds the GPU's card: ``virsh start`` fails with the hook's
       ``DEVICE_BUSY: ...`` line in libvirt's error, the domain is shut off, the guest
       unchanged.
    """
    world = ph.world
    from testbed.domains import tiny_domain_xml
    out: dict = {}
    pfile = f"{WORK}/etc/vms/{VM}.yaml"
    if os.path.exists(pfile):
        os.unlink(pfile)
    lv = GuestLibvirt(ctx)
    out["libvirtd_ready_s"] = lv.ready_s
    try:
        xml = f"{WORK}/{VM}.xml"
        with open(xml, "w") as f:
            f.write(tiny_domain_xml(VM, ctx.funcs, managed=False))
        r = lv.virsh("define", xml)
        check(r.returncode == 0, f"virsh define: {r.stderr.strip()}")
        group = link(f"/sys/bus/pci/devices/{ctx.gpu}/iommu_group")

        # a. no profile: the hook stays out, libvirt refuses the functions on their drivers
        before = ctx.snapshot(world)
        t = time.monotonic()
        r = lv.virsh("start", VM, "--paused")
        out["start_unprepared_s"] = round(time.monotonic() - t, 2)
        check(r.returncode != 0, "virsh start succeeded with both functions on their drivers")
        out["unprepared_error"] = r.stderr.strip()
        check(lv.domstate(VM) == "shut off", "domain not shut off after the refused start")
        left, _ = compare(before, ctx.snapshot(world, like=before))
        check(not left, f"state after the refused start differs: {json.dumps(left)}")

        # b. with the profile: start prepares, destroy releases
        with open(pfile, "w") as f:
            f.write("devices: auto\n")
        dm = world.dm_pid()
        t = time.monotonic()
        r = lv.virsh("start", VM, "--paused")
        out["start_s"] = round(time.monotonic() - t, 2)
        check(r.returncode == 0, f"virsh start failed: {r.stderr.strip()}")
        for a in ctx.funcs:
            check(driver(a) == "vfio-pci", f"{a} on {driver(a)} while the domain runs")
        check(lv.domstate(VM) == "paused", f"domain state {lv.domstate(VM)}")
        qpid = lv.qemu_pid(VM)
        check(qpid and _opened_by(qpid, f"/dev/vfio/{group}"),
              f"QEMU (pid {qpid}) does not hold /dev/vfio/{group}")
        check(not os.path.exists(f"/proc/{dm}"), f"display manager PID {dm} still running")
        st = ctx.status()
        check(st["phase"] == "prepared", f"status phase {st['phase']}")
        check([d["address"] for d in st["devices"]] == list(ctx.funcs),
              f"devices: auto gave {[d['address'] for d in st['devices']]}, expected {ctx.funcs}")
        out["steps_prepare"] = step_times(st)
        t = time.monotonic()
        r = lv.virsh("destroy", VM)
        out["destroy_s"] = round(time.monotonic() - t, 2)
        check(r.returncode == 0, f"virsh destroy failed: {r.stderr.strip()}")
        check(lv.domstate(VM) == "shut off", f"domain state {lv.domstate(VM)} after destroy")
        st = ctx.status()
        check(st["phase"] == "idle", f"status phase {st['phase']} after destroy")
        notes = [n for s_ in st["steps"] for n in (s_.get("notes") or [])]
        left, out["expected_differences"] = compare(before, ctx.snapshot(world, like=before),
                                                    notes)
        check(not left, f"state after virsh destroy differs from before start: {json.dumps(left)}")
        check(os.path.exists(f"/proc/{world.dm_pid()}"), "display manager not running again")
        out["steps_release"] = step_times(st)

        # c. a forced prepare failure: a holder outside any unit, on_busy: fail
        card = world.holds[0]
        h = _holder(card)
        try:
            _wait_open(h, card)
            before = ctx.snapshot(world)
            r = lv.virsh("start", VM, "--paused")
            check(r.returncode != 0, "virsh start succeeded although a process holds the GPU")
            err = " ".join(r.stderr.split())
            out["busy_error"] = err
            check("Hook script execution failed" in err and "DEVICE_BUSY: step holders:" in err,
                  f"libvirt's error does not carry the hook's CODE line: {err}")
            check(f"PID {h.pid}" in err, f"holder PID {h.pid} not named: {err}")
            check(lv.domstate(VM) == "shut off", "domain not shut off after the failed prepare")
            check(h.poll() is None, "the holder was killed although on_busy is fail")
            left, _ = compare(before, ctx.snapshot(world, like=before))
            check(not left, f"state after the failed start differs: {json.dumps(left)}")
            st = ctx.status()
            check(st["phase"] == "failed" and (st["error"] or {}).get("code") == "DEVICE_BUSY",
                  f"status after the failed start: {st['phase']} {st['error']}")
        finally:
            h.kill()
            h.wait()
        lv.virsh("undefine", VM)
    finally:
        lv.close()
        ctx.profile()
    return out


def sc_efifb_prepare(ctx: Ctx, ph: Phase) -> dict:
    """OVMF, before any DRM driver is loaded: the console is on efifb (``efi-framebuffer.0``).
    Prepare unbinds the fbcon vtconsole and efi-framebuffer.0, binds both functions to
    vfio-pci, and the kernel removes efi-framebuffer.0 when vfio-pci takes the boot GPU."""
    world = ph.world
    ctx.profile()
    before = ctx.snapshot(world)
    check(platform_fbs().get("efi-framebuffer.0") == "efi-framebuffer",
          f"efi-framebuffer.0 not bound to efifb before: {platform_fbs()}")
    check(driver(ctx.gpu) is None, f"GPU already on {driver(ctx.gpu)}")
    r = ctx.cli("prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    ph.prepared_from = before
    for a in ctx.funcs:
        check(driver(a) == "vfio-pci", f"{a} is on {driver(a)} after prepare")
    group = link(f"/sys/bus/pci/devices/{ctx.gpu}/iommu_group")
    check(os.path.exists(f"/dev/vfio/{group}"), f"/dev/vfio/{group} missing")
    bound_fb = [v for v, (name, b) in vtcons().items() if "frame buffer" in (name or "") and b == "1"]
    check(not bound_fb, f"frame-buffer vtconsoles still bound: {bound_fb}")
    st = ctx.status()
    return {"steps": step_times(st), "after": ctx.snapshot(world),
            "efi_framebuffer_removed": "efi-framebuffer.0" not in platform_fbs()}


def sc_efifb_holders(ctx: Ctx, ph: Phase) -> dict:
    """OVMF, the console on efifb: a process outside any unit holding efifb's ``/dev/fb0``
    (which draws into the boot GPU's memory) holds the GPU: prepare (``on_busy: fail``) fails
    with ``DEVICE_BUSY`` naming its PID and ``/dev/fb0``, the guest exactly as before, the
    holder alive. On Linux 6.1 ``efi-framebuffer.0`` is below ``/sys/devices/platform``, on
    6.12 below the GPU's PCI function (``vfio_hookd.pci.device_nodes`` finds it either way)."""
    world = ph.world
    ctx.profile()
    fbs = [n for n in nodes() if n.startswith("/dev/fb")]
    check(platform_fbs().get("efi-framebuffer.0") == "efi-framebuffer" and fbs,
          f"no efifb framebuffer: {platform_fbs()}, nodes {nodes()}")
    h = _holder(fbs[0])
    try:
        _wait_open(h, fbs[0])
        before = ctx.snapshot(world)
        r = ctx.cli("prepare", VM)
        check(r.returncode != 0, f"prepare succeeded although PID {h.pid} holds {fbs[0]}")
        check(r.stderr.startswith("DEVICE_BUSY:") and f"PID {h.pid}" in r.stderr
              and fbs[0] in r.stderr, f"not DEVICE_BUSY naming {h.pid} and {fbs[0]}: "
              f"{r.stderr.strip()}")
        left, _ = compare(before, ctx.snapshot(world, like=before))
        check(not left, f"state after the refused prepare differs: {json.dumps(left)}")
        check(h.poll() is None, "the holder was killed although on_busy is fail")
        return {"refused": r.stderr.strip(), "fb_device": os.path.realpath(
            "/sys/bus/platform/devices/efi-framebuffer.0")}
    finally:
        h.kill()
        h.wait()


def sc_efifb_release(ctx: Ctx, ph: Phase) -> dict:
    """Release of the prepared efifb phase (efifb_prepare before it): the functions go back
    (GPU: no driver, audio: snd_hda_intel), and the efi-framebuffer.0 the kernel removed is
    reported as expected in the framebuffer step's notes; everything else equals the state
    before prepare."""
    world = ph.world
    before, ph.prepared_from = ph.prepared_from, None
    r = ctx.cli("release", VM)
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    after = ctx.snapshot(world, like=before)
    st = ctx.status()
    check(st["phase"] == "idle", f"status phase {st['phase']}")
    notes = [n for s in st["steps"] for n in (s.get("notes") or [])]
    left, expected = compare(before, after, notes)
    check(not left, f"state after release differs from before prepare: {json.dumps(left)}")
    return {"steps": step_times(st), "notes": notes, "expected_differences": expected}


# ---- the shapes of issue 7 ("take only what the VM needs") ----------------------------------
def record_steps() -> dict:
    """``{step name: its record entry}`` (``facts``, ``status``, ``duration_ms``, ...) of the
    VM's record (``RUN_DIR/vms/VM.json``): the facts ``status --json`` does not show (the
    modules step's ``why``, the holders step's ``terminated``)."""
    with open(f"{RUN_DIR}/vms/{VM}.json") as f:
        return {s_["name"]: s_ for s_ in json.load(f)["steps"]}


def timed_cli(ctx: Ctx, *args) -> tuple[subprocess.CompletedProcess, float]:
    """``ctx.cli(*args)`` and its wall time (s), for the scenario's result (never asserted)."""
    t = time.monotonic()
    r = ctx.cli(*args)
    return r, round(time.monotonic() - t, 2)


def check_one_group(ctx: Ctx) -> str:
    """The IOMMU group of the functions handed over (one for all), ``/dev/vfio/N`` present."""
    groups = {a: link(f"/sys/bus/pci/devices/{a}/iommu_group") for a in ctx.funcs}
    check(len(set(groups.values())) == 1, f"the functions are in several groups: {groups}")
    group = groups[ctx.gpu]
    check(os.path.exists(f"/dev/vfio/{group}"), f"/dev/vfio/{group} missing")
    return group


#: Modules of the guest's own USB stack and keyboard: none may go with the GPU's xHCI.
USB_STACK = ("usb_common", "usbcore", "xhci_hcd", "xhci_pci", "usbhid", "hid", "hid_generic")


def sc_usb_prepare(ctx: Ctx, ph: Phase) -> dict:
    """USB-C-like GPU (shape ``usb-c``): the profile hands over the GPU, its HDA and its xHCI
    function (one IOMMU group; a tablet on that xHCI), while the guest's own xHCI (its own
    group) carries the keyboard. Prepare succeeds; the GPU's DRM module goes, but usbcore,
    xhci_hcd, xhci_pci, usbhid (the whole USB stack) stay loaded, the keyboard's device and
    interface keep their drivers (``usbhid``), and the modules step's ``why`` says that
    usbcore and xhci_pci also drive devices not handed over."""
    world = ph.world
    check(ctx.own_usb and len(ctx.funcs) == 3, f"not the usb-c shape: {ctx.cfg.get('shape')}")
    xhci = ctx.funcs[2]
    ctx.profile()
    before = ctx.snapshot(world)
    own = usb_below(ctx.own_usb)
    kbd = [d for d, drv in own.items() if ":" in d and not d.split("-")[1].startswith("0:")
           and drv == "usbhid"]
    check(kbd, f"the keyboard's interface under {ctx.own_usb} is not on usbhid: {own}")
    gpu_usb = usb_below(xhci)
    check(any(":" in d and drv == "usbhid" for d, drv in gpu_usb.items()),
          f"the tablet's interface under {xhci} is not on usbhid: {gpu_usb}")
    drm = ctx.drm_modules()
    check(drm, "no DRM driver bound to the GPU before prepare")
    stack = [m for m in USB_STACK if m not in modules()]
    check(not stack, f"USB modules not loaded before prepare: {stack}")
    r, prepare_s = timed_cli(ctx, "prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    ph.prepared_from = before
    for a in ctx.funcs:
        check(driver(a) == "vfio-pci", f"{a} is on {driver(a)} after prepare")
    group = check_one_group(ctx)
    left = drm & modules()
    check(not left, f"DRM module(s) still loaded: {sorted(left)}")
    gone = [m for m in USB_STACK if m not in modules()]
    check(not gone, f"the guest's own USB stack lost module(s) {gone}")
    now = usb_below(ctx.own_usb)
    check(now == own, f"the guest's own USB devices changed: before {own}, now {now}")
    check(not usb_below(xhci), f"USB devices left below {xhci} on vfio-pci: {usb_below(xhci)}")
    steps = record_steps()
    mods = steps["modules"]["facts"]
    why = mods.get("why") or {}
    check(sorted(mods["plan"]) == sorted(drm), f"modules plan {mods['plan']}, expected {drm}")
    for m, dev in (("usbcore", None), ("xhci_pci", ctx.own_usb)):
        w = why.get(m) or ""
        check(w.startswith("also drives ") and w.endswith("not handed over")
              and (dev is None or dev in w),
              f"the modules step's why for {m} does not say it drives the guest's own USB "
              f"devices: {w!r} (why: {why})")
    st = ctx.status()
    return {"group": group, "prepare_s": prepare_s, "modules": mods, "keyboard": kbd,
            "own_usb": own, "gpu_usb_before": gpu_usb, "units": steps["units"]["facts"],
            "steps": step_times(st)}


def sc_usb_release(ctx: Ctx, ph: Phase) -> dict:
    """Release of ``usb_prepare``: the snapshot before prepare comes back (:func:`sc_release`'s
    checks: every PCI driver, every USB device and interface with its driver, modules, nodes,
    units), and explicitly the xHCI function on xhci_hcd again with its root hubs and the
    tablet (device on ``usb``, interface on ``usbhid``)."""
    xhci = ctx.funcs[2]
    before = ph.prepared_from
    res = sc_release(ctx, ph)
    check(driver(xhci) == tree_driver(before, xhci) == "xhci_hcd",
          f"{xhci} on {driver(xhci)} after release")
    below = usb_below(xhci)
    hubs = [d for d in below if d.startswith("usb") and below[d] == "usb"]
    tablet = [d for d, drv in below.items() if ":" in d and drv == "usbhid"]
    check(len(hubs) == 2 and tablet, f"below {xhci} after release: {below}")
    res.update(gpu_usb_after=below)
    del res["after"]
    return res


def sc_second_gpu(ctx: Ctx, ph: Phase) -> dict:
    """Two GPUs (shape ``two-gpu``): the desktop (gdm holding its card) runs on the boot VGA
    at :attr:`Ctx.desktop_gpu`; the second GPU and its HDA are handed over. The display
    manager keeps its PID through prepare and release (the units step leaves it running and
    says why), the vtconsoles and framebuffer steps are left alone (skipped: not the boot
    display), the DRM module that also drives the desktop's GPU stays loaded, the desktop's
    GPU keeps its driver and card; release gives the snapshot back."""
    world = ph.world
    desk = ctx.desktop_gpu
    check(desk, "not the two-gpu shape")
    vga = {a: rd(f"/sys/bus/pci/devices/{a}/boot_vga") for a in (desk, ctx.gpu)}
    check(vga == {desk: "1", ctx.gpu: "0"}, f"boot_vga: {vga}")
    ctx.profile()
    before = ctx.snapshot(world)
    dm = world.dm_pid()
    check(dm and os.path.exists(f"/proc/{dm}"), f"display manager not running: {dm}")
    desk_card = world.holds[0]
    check(_opened_by(dm, desk_card), f"gdm (PID {dm}) does not hold {desk_card}")
    desk_drv, cons = driver(desk), vtcons()
    r, prepare_s = timed_cli(ctx, "prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    ph.prepared_from = before
    for a in ctx.funcs:
        check(driver(a) == "vfio-pci", f"{a} is on {driver(a)} after prepare")
    group = check_one_group(ctx)
    check(world.dm_pid() == dm and _opened_by(dm, desk_card),
          f"display manager PID {dm} -> {world.dm_pid()} after prepare")
    check(world.units()["gdm.service"] == "active", f"gdm: {world.units()['gdm.service']}")
    check(driver(desk) == desk_drv, f"the desktop's GPU {desk}: {desk_drv} -> {driver(desk)}")
    check(vtcons() == cons, f"vtconsoles changed: {cons} -> {vtcons()}")
    steps = record_steps()
    facts = {n: steps[n]["facts"] for n in ("units", "vtconsoles", "framebuffer", "modules")}
    check(facts["units"]["plan"] == [] and any(
        x.startswith("gdm.service (left running") for x in facts["units"]["skipped"]),
        f"units step: {facts['units']}")
    for n in ("vtconsoles", "framebuffer"):
        check(facts[n]["plan"] == [] and facts[n].get("skipped")
              and "boot display" in facts[n]["skipped"][0], f"{n} step: {facts[n]}")
    desk_mod = link(f"/sys/bus/pci/devices/{desk}/driver/module")
    why = (facts["modules"].get("why") or {}).get(desk_mod) or ""
    check(facts["modules"]["plan"] == [] and why.startswith("also drives") and desk in why,
          f"modules step: {facts['modules']} (the desktop GPU's module: {desk_mod})")
    r, release_s = timed_cli(ctx, "release", VM)
    ph.prepared_from = None
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    after = ctx.snapshot(world, like=before)
    st = ctx.status()
    notes = [n for s_ in st["steps"] for n in (s_.get("notes") or [])]
    left, expected = compare(before, after, notes)
    check(not left, f"state after release differs from before prepare: {json.dumps(left)}")
    check(world.dm_pid() == dm and os.path.exists(f"/proc/{dm}"),
          f"display manager PID {dm} -> {world.dm_pid()} after release")
    return {"group": group, "dm_pid": dm, "prepare_s": prepare_s, "release_s": release_s,
            "facts": facts, "expected_differences": expected, "steps": step_times(st)}


def sc_second_gpu_vfio(ctx: Ctx, ph: Phase) -> dict:
    """Two GPUs, the second one (and its HDA) on vfio-pci from boot on (phase
    :data:`VFIO_AT_BOOT`): prepare changes nothing on the guest (the snapshot equal, not even
    an expected change; the display manager's PID unchanged; nothing unbound, no module
    unloaded), and release neither."""
    world = ph.world
    check(ctx.desktop_gpu, "not the two-gpu shape")
    on = {a: driver(a) for a in ctx.funcs}
    check(all(d == "vfio-pci" for d in on.values()), f"not on vfio-pci from boot: {on}")
    ctx.profile()
    before = ctx.snapshot(world)
    dm = world.dm_pid()
    check(dm and os.path.exists(f"/proc/{dm}"), f"display manager not running: {dm}")
    r, prepare_s = timed_cli(ctx, "prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    ph.prepared_from = before
    left, expected = compare(before, ctx.snapshot(world))
    check(not left and not expected, f"prepare changed the guest: {json.dumps(left)} "
                                     f"(kernel's own: {expected})")
    check(world.dm_pid() == dm, f"display manager PID {dm} -> {world.dm_pid()} after prepare")
    steps = record_steps()
    done = {n: steps[n]["facts"].get("done") for n in steps}
    check(not any(done.values()), f"steps did something: {done}")
    st = ctx.status()
    check(st["phase"] == "prepared", f"status phase {st['phase']}")
    r, release_s = timed_cli(ctx, "release", VM)
    ph.prepared_from = None
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    left, expected = compare(before, ctx.snapshot(world), [])
    check(not left and not expected, f"release changed the guest: {json.dumps(left)} "
                                     f"(kernel's own: {expected})")
    check(world.dm_pid() == dm, f"display manager PID {dm} -> {world.dm_pid()} after release")
    check(all(driver(a) == "vfio-pci" for a in ctx.funcs), "not on vfio-pci after release")
    return {"dm_pid": dm, "prepare_s": prepare_s, "release_s": release_s,
            "facts": {n: steps[n]["facts"] for n in steps}, "steps": step_times(st)}


def sc_vgacon(ctx: Ctx, ph: Phase) -> dict:
    """BIOS text mode (SeaBIOS, ``nomodeset``: no DRM driver, the console is vgacon ``(S)
    VGA+`` on the boot VGA). Prepare warns of the VGA text console (the vtconsoles step's
    ``warnings``, shown by ``status``), the kernel's VGA arbiter replaces it by the dummy
    console when vfio-pci takes the GPU, release reports that in the vtconsoles step's
    ``notes``, and everything else equals the snapshot before prepare."""
    world = ph.world
    check("nomodeset" in (rd("/proc/cmdline") or ""), "no nomodeset on the kernel command line")
    text = [v for v, (name, b) in vtcons().items() if "VGA+" in (name or "") and b == "1"]
    check(text, f"no bound VGA text console: {vtcons()}")
    check(rd(f"/sys/bus/pci/devices/{ctx.gpu}/boot_vga") == "1", "the GPU is not the boot VGA")
    check(driver(ctx.gpu) is None, f"the GPU is on {driver(ctx.gpu)} despite nomodeset")
    ctx.profile()
    before = ctx.snapshot(world)
    r, prepare_s = timed_cli(ctx, "prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    ph.prepared_from = before
    for a in ctx.funcs:
        check(driver(a) == "vfio-pci", f"{a} is on {driver(a)} after prepare")
    cons_prepared = vtcons()
    st = ctx.status()
    vt_st = next(s_ for s_ in st["steps"] if s_["name"] == "vtconsoles")
    check(any(text[0] in w and "VGA text console" in w for w in vt_st["warnings"]),
          f"status shows no warning of the VGA text console: {vt_st}")
    r, release_s = timed_cli(ctx, "release", VM)
    ph.prepared_from = None
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    after = ctx.snapshot(world, like=before)
    st_r = ctx.status()
    vt_r = next(s_ for s_ in st_r["steps"] if s_["name"] == "vtconsoles")
    check(any(VGACON_NOTE.format(vt=text[0]) in n for n in vt_r["notes"]),
          f"status does not report the VGA text console's removal: {vt_r}")
    notes = [n for s_ in st_r["steps"] for n in (s_.get("notes") or [])]
    left, expected = compare(before, after, notes)
    check(not left, f"state after release differs from before prepare: {json.dumps(left)}")
    check(any(e.startswith(f"{text[0]} ") for e in expected),
          f"the VGA text console's replacement is not among the kernel's changes: {expected}")
    return {"prepare_s": prepare_s, "release_s": release_s, "vtcons_before": vtcons_of(before),
            "vtcons_prepared": cons_prepared, "warnings": vt_st["warnings"],
            "notes": vt_r["notes"], "expected_differences": expected,
            "steps": step_times(st_r)}


def vtcons_of(snap: dict) -> dict:
    """``{vtconN: {"name": ..., "bind": ...}}`` of snapshot ``snap``."""
    base = "/sys/devices/virtual/vtconsole/"
    out = {}
    for p, (_k, v) in snap["tree"].items():
        if p.startswith(base) and p.count("/") == 6:
            vt, attr = p[len(base):].split("/")
            out.setdefault(vt, {})[attr] = (v or "").strip()
    return out


def _stubborn_holder(path: str) -> subprocess.Popen:
    """A process (not in any unit) holding ``path`` open that ignores SIGTERM (``trap ''
    TERM``: SIG_IGN survives the exec of ``sleep``)."""
    return subprocess.Popen(["/bin/sh", "-c", f"trap '' TERM; exec sleep infinity 3<{path}"],
                            stdin=subprocess.DEVNULL)


def _ignores(pid: int, sig: int) -> bool:
    """True when process ``pid`` ignores signal ``sig`` (``SigIgn`` of /proc/PID/status)."""
    for line in (rd(f"/proc/{pid}/status", "") or "").splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def sc_holders_stubborn(ctx: Ctx, ph: Phase) -> dict:
    """Three holders of the GPU's card that ignore SIGTERM, ``on_busy: terminate`` with
    ``deadlines: {terminate: 2}``: prepare succeeds, all three end by SIGKILL (their wait
    status), the holders step's ``terminated`` facts list exactly them; the step's duration
    is recorded in the result (never asserted: no timing bounds in tests). Release then gives
    the snapshot back."""
    import signal
    world = ph.world
    card = world.holds[0]
    hs = [_stubborn_holder(card) for _ in range(3)]
    try:
        for h in hs:
            _wait_open(h, card)
            check(_ignores(h.pid, signal.SIGTERM), f"holder {h.pid} does not ignore SIGTERM")
        ctx.profile("on_busy: terminate\ndeadlines: {terminate: 2}\n")
        before = ctx.snapshot(world)
        r, prepare_s = timed_cli(ctx, "prepare", VM)
        check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
        ph.prepared_from = before
        status = {}
        for h in hs:
            try:
                status[h.pid] = h.wait(10)
            except subprocess.TimeoutExpired:
                status[h.pid] = None
        check(all(rc == -signal.SIGKILL for rc in status.values()),
              f"the holders did not all end by SIGKILL: {status}")
        check(all(driver(a) == "vfio-pci" for a in ctx.funcs), "not on vfio-pci")
        steps = record_steps()
        hold = steps["holders"]
        terminated = sorted({t["pid"] for t in hold["facts"]["terminated"]})
        check(terminated == sorted(h.pid for h in hs),
              f"terminated facts list {terminated}, the holders were {[h.pid for h in hs]}")
        check(hold["status"] == "done", f"holders step {hold['status']}")
        st = ctx.status()
        r, release_s = timed_cli(ctx, "release", VM)
        ph.prepared_from = None
        check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
        notes = [n for s_ in ctx.status()["steps"] for n in (s_.get("notes") or [])]
        left, _ = compare(before, ctx.snapshot(world, like=before), notes)
        check(not left, f"state after terminate+release differs: {json.dumps(left)}")
        return {"holders_step_ms": hold["duration_ms"], "terminated": hold["facts"]["terminated"],
                "wait_status": status, "prepare_s": prepare_s, "release_s": release_s,
                "steps": step_times(st)}
    finally:
        for h in hs:
            if h.poll() is None:
                h.kill()
                h.wait()
        ctx.profile()


# ---- issue 11: the GPU's ROM dump ----------------------------------------------------------
def _raw_rom(addr: str) -> bytes:
    """The ``rom`` attribute read by hand as seed 001 does (``echo 1 > rom; cat rom; echo 0 >
    rom``): what the kernel hands out, for comparison with what ``rom dump`` wrote."""
    p = f"/sys/bus/pci/devices/{addr}/rom"
    with open(p, "w") as f:
        f.write("1\n")
    try:
        with open(p, "rb") as f:
            return f.read()
    finally:
        with open(p, "w") as f:
            f.write("0\n")


def _rom_facts(addr: str) -> dict:
    """What the kernel says of ``addr``'s expansion ROM: the ROM resource (line 7 of
    ``resource``: start, end, flags; IORESOURCE_ROM_SHADOW is 0x2), ``boot_vga``, the driver,
    the ``rom`` attribute's size (the ROM BAR's) and the kernel's log lines about ROMs."""
    lines = (rd(f"/sys/bus/pci/devices/{addr}/resource") or "").splitlines()
    res = lines[6].split() if len(lines) > 6 else []
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    return {"resource": res, "boot_vga": rd(f"/sys/bus/pci/devices/{addr}/boot_vga"),
            "driver": driver(addr),
            "rom_size": os.stat(f"/sys/bus/pci/devices/{addr}/rom").st_size,
            "dmesg": [ln for ln in log if "ROM" in ln or "rom" in ln.split(":")[-1]][:20]}


def _rom_dump(ctx: Ctx, out: str) -> tuple[subprocess.CompletedProcess, float]:
    """``vfio-hookd rom dump GPU OUT --json`` and its wall time (ms)."""
    if os.path.exists(out):
        os.unlink(out)
    t = time.monotonic()
    r = ctx.cli("rom", "dump", ctx.gpu, out, "--json")
    return r, round((time.monotonic() - t) * 1000, 1)


def sc_rom_dump(ctx: Ctx, ph: Phase) -> dict:
    """Scenario (issue 11): ``vfio-hookd rom dump`` of the GPU handed over, whose ROM BAR holds
    the file QEMU loaded (``boot.json``'s ``gpu_romfile``: path, size, sha256, found on this
    machine in QEMU's firmware path).

    What the kernel does (seen on Linux 6.1, SeaBIOS and OVMF): for the boot VGA device the
    x86 fixup ``pci_fixup_video`` replaces the ROM resource by the shadow copy at 0xC0000
    (``resource`` line 7 flags 0x212: IORESOURCE_ROM_SHADOW), whatever driver is bound later:
    ``rom`` then gives SeaBIOS's RAM copy as its VGA BIOS left it (same length, other bytes
    than the file) or, under OVMF (nothing at 0xC0000), EIO.

    - The GPU is the boot VGA (the single-GPU boots): the dump is refused with ROM_UNRELIABLE
      naming the shadow copy, under bochs-drm and on vfio-pci alike; what a hand-made read
      (seed 001) gives is recorded and checked not to be the file QEMU loaded.
    - The GPU is not the boot VGA (``two-gpu``): under bochs-drm the dump is refused
      (ROM_UNRELIABLE: a driver on the card); after ``vfio-hookd prepare`` (the recommended
      time) it succeeds, the image validates and equals the file's first image-length bytes
      (the file may be longer than its images: QEMU maps the whole file, the kernel's ``rom``
      stops at the last image, ``pci_get_rom_size``; here they are equal, 39936 bytes).

    Each time: the ``rom`` attribute is left disabled (a read by hand fails EINVAL), nothing
    but the output file is written, a refused dump writes nothing. Ends released."""
    import errno as errno_
    import hashlib
    world = ph.world
    ctx.profile()
    romfile = ctx.cfg.get("gpu_romfile") or {}
    check(romfile.get("path"), f"boot.json has no gpu_romfile for {ctx.cfg.get('gpu')}")
    with open(romfile["path"], "rb") as f:
        loaded = f.read()
    check(hashlib.sha256(loaded).hexdigest() == romfile["sha256"],
          f"{romfile['path']} changed since the harness hashed it")
    boot_gpu = ctx.desktop_gpu is None
    out = f"{WORK}/gpu.rom"
    rom_attr = f"/sys/bus/pci/devices/{ctx.gpu}/rom"

    def disabled() -> bool:
        try:
            with open(rom_attr, "rb") as f:
                f.read(1)
        except OSError as exc:
            return exc.errno == errno_.EINVAL
        return False

    def refused(state: str, why: str) -> dict:
        before = ctx.snapshot(world)
        r, ms = _rom_dump(ctx, out)
        check(r.returncode == 37 and r.stderr.startswith("ROM_UNRELIABLE:") and why in r.stderr,
              f"rom dump {state}: exit {r.returncode}: {r.stderr.strip()} (expected "
              f"ROM_UNRELIABLE: ...{why}...)")
        check(not os.path.exists(out), f"{out} written although the dump was refused")
        check(disabled(), f"{rom_attr} left enabled after a refused dump")
        left, _ = compare(before, ctx.snapshot(world, like=before))
        check(not left, f"the guest changed after a refused dump: {json.dumps(left)}")
        return {"ms": ms, "stderr": r.stderr.strip()}

    res: dict = {"romfile": romfile, "boot_gpu": boot_gpu}
    res["facts_drm"] = facts = _rom_facts(ctx.gpu)
    shadow = bool(facts["resource"]) and int(facts["resource"][2], 16) & 0x2 != 0
    check(shadow == boot_gpu, f"the ROM resource of {ctx.gpu} (boot_vga {facts['boot_vga']}) "
          f"is {'' if shadow else 'not '}the shadow copy: {facts['resource']}")
    try:
        raw = _raw_rom(ctx.gpu)
        res["raw_drm"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                          "equals_file_prefix": raw == loaded[:len(raw)], "head": raw[:4].hex()}
    except OSError as exc:
        res["raw_drm"] = {"error": str(exc), "errno": exc.errno}
    ctx.log(f"rom facts with {facts['driver']}: {json.dumps(res)}")
    if boot_gpu:   # what seed 001's read gives is not the card's ROM
        check(not res["raw_drm"].get("equals_file_prefix"),
              f"the shadow copy equals {romfile['path']}: {res['raw_drm']}")
    res["drm"] = refused(f"while {facts['driver']} drives the GPU",
                         "shadow copy" if boot_gpu else f"driven by {facts['driver']}")
    r = ctx.cli("prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    ph.prepared_from = before = ctx.snapshot(world)
    res["facts_vfio"] = _rom_facts(ctx.gpu)
    if boot_gpu:
        res["vfio"] = refused("on vfio-pci", "shadow copy")
    else:
        r, ms = _rom_dump(ctx, out)
        check(r.returncode == 0, f"rom dump on vfio-pci: exit {r.returncode}: {r.stderr.strip()}")
        summary = json.loads(r.stdout)
        with open(out, "rb") as f:
            dumped = f.read()
        res["vfio"] = {"ms": ms, "summary": summary}
        check(len(dumped) == summary["size"] == sum(i["length"] for i in summary["images"]),
              f"{out}: {len(dumped)} bytes, summary {summary}")
        check(dumped == loaded[:len(dumped)],
              f"the dumped image ({len(dumped)} bytes) differs from {romfile['path']}'s first "
              f"{len(dumped)} bytes")
        check(summary["vendor"] == rd(f"/sys/bus/pci/devices/{ctx.gpu}/vendor")[2:]
              and summary["warnings"] == [], f"summary {summary}")
        check(disabled(), f"{rom_attr} left enabled after the dump")
        left, _ = compare(before, ctx.snapshot(world, like=before))
        check(not left, f"the guest changed with the dump: {json.dumps(left)}")
        ms_runs = []
        for _ in range(3):
            r, ms = _rom_dump(ctx, out)
            check(r.returncode == 0, f"repeated rom dump: {r.stderr.strip()}")
            ms_runs.append((ms, json.loads(r.stdout)["duration_ms"]))
        res["vfio"]["ms_repeated"] = ms_runs
        os.unlink(out)
    r = ctx.cli("release", VM)
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    ph.prepared_from = None
    return res
# ---- hugepages (issue 11) --------------------------------------------------------------------
#: The pool of 2 MiB pages of the guest's kernel.
HP2 = "/sys/kernel/mm/hugepages/hugepages-2048kB"


def hp_pool() -> dict:
    """The 2 MiB pool now: ``{"nr", "free", "resv", "surplus"}`` (pages)."""
    return {k: int(rd(f"{HP2}/{k}_hugepages")) for k in ("nr", "free", "resv", "surplus")}


def _hp_user(pages: int) -> subprocess.Popen:
    """A process that maps ``pages`` 2 MiB hugepages (a hugetlbfs memfd, as QEMU's memory
    backend does), touches each, prints ``ready`` and waits for its stdin to close."""
    code = ("import mmap, os, sys\n"
            f"n = {pages} * 2 * 1024 * 1024\n"
            "fd = os.memfd_create('vm', os.MFD_HUGETLB)\n"
            "os.ftruncate(fd, n)\n"
            "m = mmap.mmap(fd, n)\n"
            "for i in range(0, n, 2 * 1024 * 1024):\n"
            "    m[i] = 1\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    check(p.stdout.readline().strip() == "ready", "the hugepage user did not map its pages")
    return p


def sc_hugepages(ctx: Ctx, ph: Phase) -> dict:
    """Issue 11: the hugepages step on the guest kernel's real 2 MiB pool (1 GiB of guest
    memory). Pages of the "boot configuration" (10, written to ``nr_hugepages`` first) count
    and stay; a prepare that needs 74 adds the 64 missing ones (``nr_hugepages`` and
    ``free_hugepages`` read back) and its release frees exactly those; a release while a
    process still maps 40 of them leaves them as surplus pages the kernel frees when the
    process exits; a request larger than the guest's memory fails with ``HUGEPAGES_SHORT`` and
    leaves the pool (and everything else) as it was."""
    world = ph.world
    check(os.path.isdir(HP2), f"{HP2} missing: the guest kernel has no 2 MiB hugepages")
    start = hp_pool()
    check(start == {"nr": 0, "free": 0, "resv": 0, "surplus": 0}, f"pool at start: {start}")
    out: dict = {"start": start}
    try:
        with open(f"{HP2}/nr_hugepages", "w") as f:
            f.write("10")
        boot = hp_pool()
        check(boot["nr"] == 10 and boot["free"] == 10, f"10 boot pages: {boot}")
        # a prepare that needs 74 pages: the 10 free count, 64 are added
        ctx.profile("hugepages: {pages: 74, size: 2M}\n")
        before = ctx.snapshot(world)
        r, out["prepare_s"] = timed_cli(ctx, "prepare", VM)
        check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
        ph.prepared_from = before
        now = hp_pool()
        check(now["nr"] == 74 and now["free"] == 74, f"pool after prepare: {now}")
        entry = record_steps()["hugepages"]
        check(entry["status"] == "done" and entry["facts"]["done"][0]["added"] == 64,
              f"hugepages step: {entry}")
        out["prepared"] = {"pool": now, "apply_ms": entry["duration_ms"],
                           "why": entry["facts"]["why"]}
        r, out["release_s"] = timed_cli(ctx, "release", VM)
        check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
        ph.prepared_from = None
        now = hp_pool()
        check(now == {"nr": 10, "free": 10, "resv": 0, "surplus": 0},
              f"pool after release (the 10 boot pages must stay): {now}")
        entry = record_steps()["hugepages"]
        out["released"] = {"pool": now, "undo_ms": entry["undo_ms"], "notes": entry["notes"]}
        left, _ = compare(before, ctx.snapshot(world, like=before),
                          [n for s_ in ctx.status()["steps"] for n in (s_.get("notes") or [])])
        check(not left, f"state after release differs: {json.dumps(left)}")
        # released while a process still maps 50 pages (the 10 boot ones and 40 of the VM's)
        r = ctx.cli("prepare", VM)
        check(r.returncode == 0, f"second prepare failed: {r.stderr.strip()}")
        user = _hp_user(50)
        try:
            mapped = hp_pool()
            r = ctx.cli("release", VM)
            check(r.returncode == 0, f"release with pages in use failed: {r.stderr.strip()}")
            in_use = hp_pool()
            # the sysctl (default size: 2 MiB here) reads the persistent pages alone
            in_use["sysctl"] = int(rd("/proc/sys/vm/nr_hugepages"))
            notes = record_steps()["hugepages"]["notes"]
            # nr_hugepages reads persistent + surplus: the 40 still mapped are surplus now
            check(in_use["nr"] - in_use["surplus"] == 10 and in_use["surplus"] == 40
                  and in_use["sysctl"] == 10, f"pool after the release: {in_use}")
            check(any("still in use" in n for n in notes), f"no in-use note: {notes}")
        finally:
            user.stdin.close()
            user.wait(30)
        gone = hp_pool()
        check(gone == {"nr": 10, "free": 10, "resv": 0, "surplus": 0},
              f"pool once the user exited: {gone}")
        out["in_use"] = {"mapped": mapped, "after_release": in_use, "after_exit": gone,
                         "notes": notes}
        # more than the guest's memory: HUGEPAGES_SHORT, the pool and the guest as before
        ctx.profile("hugepages: {pages: 1024, size: 2M}\n")
        before = ctx.snapshot(world)
        r = ctx.cli("prepare", VM)
        check(r.returncode == 34 and r.stderr.startswith("HUGEPAGES_SHORT: step hugepages: "
                                                         "the kernel allocated "),
              f"not HUGEPAGES_SHORT: {r.returncode} {r.stderr.strip()}")
        now = hp_pool()
        check(now == {"nr": 10, "free": 10, "resv": 0, "surplus": 0},
              f"pool after the short allocation: {now}")
        left, _ = compare(before, ctx.snapshot(world, like=before),
                          [n for s_ in ctx.status()["steps"] for n in (s_.get("notes") or [])])
        check(not left, f"state after the rollback differs: {json.dumps(left)}")
        entry = record_steps()["hugepages"]
        out["short"] = {"error": r.stderr.strip(), "pool": now,
                        "apply_ms": entry["duration_ms"], "undo_ms": entry["undo_ms"]}
        return out
    finally:
        ctx.profile()
        with open(f"{HP2}/nr_hugepages", "w") as f:
            f.write("0")


# ---- preconditions: each scenario starts from a state it declares -----------------------------
#: The phase's baseline: the guest as the phase's coldplug left it (the snapshot taken when its
#: world was ready) up to the changes the kernel makes itself (:func:`compare`), nothing held
#: by a record, the daemon running as started, the default profile.
BASELINE = "baseline"
#: Prepared from the baseline: both functions on vfio-pci, the record ``prepared``.
PREPARED = "prepared"
#: Record phases in which the record holds nothing on the host.
NOTHING_HELD = ("idle", "failed")
#: Start of the error of a failure injected on purpose (:meth:`Phase.injection`).
INJECTED = "injected failure"


#: The phases of a boot, in the order they run (:func:`setup_phase`): the firmware
#: framebuffer alone, the functions on vfio-pci from boot on, then every driver loaded.
EFIFB, VFIO_AT_BOOT, DRM = "efifb", "vfio_at_boot", "drm"
PHASES = (EFIFB, VFIO_AT_BOOT, DRM)


class Scenario(NamedTuple):
    """A scenario: the function, the state it needs (:data:`BASELINE` or
    :data:`PREPARED`), which the runner establishes before it runs, and the phase it runs
    in (:data:`PHASES`)."""
    run: Callable[["Ctx", "Phase"], dict]
    needs: str
    phase: str = DRM


SCENARIOS = MappingProxyType({
    "efifb_holders": Scenario(sc_efifb_holders, BASELINE, EFIFB),
    "efifb_prepare": Scenario(sc_efifb_prepare, BASELINE, EFIFB),
    "efifb_release": Scenario(sc_efifb_release, PREPARED, EFIFB),
    "prepare": Scenario(sc_prepare, BASELINE),
    "vfio_qemu": Scenario(sc_vfio_qemu, PREPARED),
    "release": Scenario(sc_release, PREPARED),
    "holders": Scenario(sc_holders, BASELINE),
    "fault": Scenario(sc_fault, BASELINE),
    "fault_late": Scenario(sc_fault_late, BASELINE),
    "libvirt": Scenario(sc_libvirt, BASELINE),
    "usb_prepare": Scenario(sc_usb_prepare, BASELINE),
    "usb_release": Scenario(sc_usb_release, PREPARED),
    "second_gpu": Scenario(sc_second_gpu, BASELINE),
    "second_gpu_vfio": Scenario(sc_second_gpu_vfio, BASELINE, VFIO_AT_BOOT),
    "vgacon": Scenario(sc_vgacon, BASELINE),
    "holders_stubborn": Scenario(sc_holders_stubborn, BASELINE),
    "rom_dump": Scenario(sc_rom_dump, BASELINE),
    "hugepages": Scenario(sc_hugepages, BASELINE),
})


class Injected(Exception):
    """A failure injected on purpose into a scenario (boot.json entry ``SCENARIO.fail-POINT``)."""


def phase_of(entry: str) -> str:
    """The phase (:data:`PHASES`) of a boot.json entry's scenario; :data:`DRM` for an entry
    that names none (:func:`run_entry` reports it)."""
    try:
        return SCENARIOS[parse_entry(entry)[0]].phase
    except ValueError:
        return DRM


def parse_entry(entry: str) -> tuple[str, str | None]:
    """``"prepare"`` -> ``("prepare", None)``; ``"prepare.fail-late"`` -> ``("prepare", "late")``:
    run scenario ``prepare`` with a failure injected at its point ``late``.

    :raises ValueError: not a scenario, or a malformed injection.
    """
    name, dot, mod = entry.partition(".")
    if name not in SCENARIOS or (dot and not (mod.startswith("fail-") and mod[5:])):
        raise ValueError(f"unknown scenario entry {entry!r} (scenarios: {sorted(SCENARIOS)}; "
                         f"a failure is injected with SCENARIO.fail-POINT)")
    return name, (mod[5:] if dot else None)


class Phase:
    """One phase of the boot: the guest after a coldplug (all devices but ``skip``), its
    :class:`World`, and the states its scenarios start from.

    :ivar baseline: the snapshot taken when the world was ready (see :data:`BASELINE`).
    :ivar prepared_from: the snapshot taken before the prepare that left the guest prepared
        (None while it is not prepared): what a release must give back.
    :ivar inject: the injection point of the running entry (None: none).
    """

    def __init__(self, name: str, skip: tuple, world: World, baseline: dict):
        self.name = name
        self.skip = skip
        self.world = world
        self.baseline = baseline
        self.prepared_from: dict | None = None
        self.inject: str | None = None

    def injection(self, point: str) -> None:
        """Called by a scenario at its injection point ``point``.

        :raises Injected: the running entry asks for a failure at ``point``.
        """
        if self.inject == point:
            raise Injected(f"{INJECTED} at point {point!r} (boot.json entry)")


def record_phase(ctx: Ctx) -> str:
    """The phase of the VM's record (``RUN_DIR/vms/VM.json``; ``idle`` when there is none), or
    ``vfio-hookd status``'s when the file does not read as a record with a phase."""
    try:
        with open(f"{RUN_DIR}/vms/{VM}.json") as f:
            phase = json.load(f)["phase"]
        if isinstance(phase, str):
            return phase
    except FileNotFoundError:
        return "idle"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ctx.status()["phase"]


def daemon_off(ph: Phase) -> str | None:
    """Why the phase's daemon is not as it was started (exited, or a fault PATH), or None."""
    d = ph.world.daemon             # a testbed.daemon.DaemonProcess
    if d is None or not d.running():
        return f"exited ({None if d is None else d.proc.returncode})"
    if ph.world.path_prefix:
        return f"runs with {ph.world.path_prefix} first in its PATH"
    return None


def off_baseline(ctx: Ctx, ph: Phase) -> tuple[dict, list[str]]:
    """How the guest differs from the phase's baseline: ``(off, kernel)``. ``off`` holds
    :func:`compare`'s differences (``{path: [before, after]}``, ``units``) plus ``record`` and
    ``daemon`` (``{"before": ..., "after": ...}``); empty: the guest is at the baseline.
    ``kernel`` lists the changes the kernel itself made since
    (:func:`testbed.expected.classify_changes`' lines, e.g. the firmware framebuffer removed
    once a driver took the boot GPU, with its ``/proc/fb`` line, fbcon's vtconsole and
    ``/dev/fbN``): nothing can restore them before a reboot, they are no difference (the
    release that caused them reported them, which the scenarios check). Once the functions are
    back on their baseline drivers, the sound nodes are waited for
    (:func:`settle`)."""
    off = {}
    phase = record_phase(ctx)
    if phase not in NOTHING_HELD:
        off["record"] = {"before": "idle or failed", "after": phase}
    why = daemon_off(ph)
    if why:
        off["daemon"] = {"before": "running", "after": why}
    base = ph.baseline
    settled = all(driver(a) == tree_driver(base, a) for a in ctx.funcs)
    left, kernel = compare(base, ctx.snapshot(ph.world, like=base if settled else None), None)
    off.update(left)
    return off, kernel


def _write(path: str, value: str, actions: list[str]) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        actions.append(f"write {value.strip()!r} to {path} failed: {exc.strerror}")


def restore_baseline(ctx: Ctx, ph: Phase) -> list[str]:
    """Bring the guest back to the phase's baseline after a scenario that stopped half-way: the
    daemon as started, then the product's own release of whatever the record holds
    (``vfio-hookd release VM --force``), then by hand what is still off: the functions'
    drivers (``driver_override`` as in the baseline, unbind, the baseline's modules,
    ``drivers_probe``), the vtconsole binds :func:`compare` still finds off (not one the
    kernel changed itself: the console that took over from fbcon's removed one), the units.
    Returns what was done (list of str)."""
    w = ph.world
    actions = []
    why = daemon_off(ph)
    if why:
        w.restart_daemon()
        actions.append(f"daemon restarted (it {why})")
    r = ctx.cli("release", VM, "--force")
    actions.append(f"vfio-hookd release {VM} --force: exit {r.returncode}"
                   + (f": {r.stderr.strip()}" if r.returncode else ""))
    base = ph.baseline
    base_modules = tree_modules(base)
    if all(driver(a) == tree_driver(base, a) for a in ctx.funcs) \
            and base_modules <= modules():
        settle(list(base["tree"]))
    else:
        for a in ctx.funcs:
            want, have = tree_driver(base, a), driver(a)
            if have != want:
                # the baseline's override: none, or vfio-pci for a function reserved for it
                # at boot (phase vfio_at_boot)
                was = (base["tree"].get(f"/sys/bus/pci/devices/{a}/driver_override")
                       or ("file", "(null)\n"))[1] or "(null)\n"
                _write(f"/sys/bus/pci/devices/{a}/driver_override",
                       "\n" if was.strip() == "(null)" else was, actions)
                if have:
                    _write(f"/sys/bus/pci/devices/{a}/driver/unbind", a, actions)
                    actions.append(f"{a}: unbound from {have}")
        missing = sorted(base_modules - modules())
        if missing:
            r = subprocess.run(["modprobe", "-a", *missing], capture_output=True, text=True)
            actions.append(f"modprobe -a {' '.join(missing)}: exit {r.returncode}")
        for a in ctx.funcs:
            if tree_driver(base, a) and not driver(a):
                _write("/sys/bus/pci/drivers_probe", a, actions)
                actions.append(f"{a}: probed, now on {driver(a)}")
        settle(list(base["tree"]))
    left, _ = compare(base, ctx.snapshot(w), None)
    vtbase = "/sys/devices/virtual/vtconsole/"
    for path, (was, now) in left.items():
        if path.startswith(vtbase) and path.endswith("/bind") and was and now:
            v = path[len(vtbase):].split("/")[0]
            name = ((base["tree"].get(f"{vtbase}{v}/name") or ("file", ""))[1] or "").strip()
            _write(path, was[1], actions)
            actions.append(f"{v} ({name}): bind {was[1].strip()}")
    for path, (was, now) in left.items():   # hugepage pools: the baseline's size
        if path.startswith("/sys/kernel/mm/hugepages/") and path.endswith("/nr_hugepages") \
                and was and now:
            _write(path, was[1], actions)
            actions.append(f"{path}: {was[1].strip()}")
    units = w.units()
    for unit, state in base["units"].items():
        if state == "active" and units.get(unit) != "active":
            try:
                w.systemd.start(unit, 60)
                actions.append(f"{unit} started")
            except Exception as exc:          # HookdError from the client: reported below
                actions.append(f"{unit} did not start: {exc}")
    return actions


def establish_baseline(ctx: Ctx, ph: Phase) -> dict:
    """Precondition :data:`BASELINE`: check the guest against the phase's baseline, restore it
    when it differs (:func:`restore_baseline`).

    :returns: the report (``needs``, ``restored``; after a restore ``was``: the differences
        found, ``actions``; ``kernel_changes``: the kernel's own changes since the baseline,
        which are no difference, when there are any).
    :raises Fail: ``precondition baseline not reached: <differences>``.
    """
    ctx.profile()
    off, kernel = off_baseline(ctx, ph)
    if not off:
        ph.prepared_from = None
        report = {"needs": BASELINE, "restored": False}
        if kernel:
            report["kernel_changes"] = kernel
        return report
    ctx.log(f"precondition baseline: the guest differs from it: {json.dumps(off)}; restoring")
    actions = restore_baseline(ctx, ph)
    left, kernel = off_baseline(ctx, ph)
    if left:
        raise Fail(f"precondition baseline not reached: {json.dumps(left)} "
                   f"(differences found first: {json.dumps(off)}; restore: {actions})")
    ph.prepared_from = None
    ctx.log(f"precondition baseline: restored ({'; '.join(actions)})")
    report = {"needs": BASELINE, "restored": True, "was": off, "actions": actions}
    if kernel:
        report["kernel_changes"] = kernel
    return report


def establish_prepared(ctx: Ctx, ph: Phase) -> dict:
    """Precondition :data:`PREPARED`: when the guest is not prepared (by the scenario before),
    establish the baseline and run ``vfio-hookd prepare`` from it.

    :returns: the report (``needs``, ``prepared_by_runner``, ``actions``; ``baseline``: the
        baseline's report when the runner prepared).
    :raises Fail: ``precondition prepared not reached: ...``.
    """
    ctx.profile()
    actions = []
    why = daemon_off(ph)
    if why:       # a prepared record survives its daemon; a new one keeps it
        ph.world.restart_daemon()
        actions.append(f"daemon restarted (it {why})")
    if ph.prepared_from is not None and record_phase(ctx) == "prepared" \
            and all(driver(a) == "vfio-pci" for a in ctx.funcs):
        return {"needs": PREPARED, "prepared_by_runner": False, "actions": actions}
    ctx.log("precondition prepared: the guest is not prepared; preparing it")
    try:
        base = establish_baseline(ctx, ph)
    except Fail as exc:
        raise Fail(f"precondition prepared not reached: {exc}") from None
    before = ctx.snapshot(ph.world)
    r = ctx.cli("prepare", VM)
    on = {a: driver(a) for a in ctx.funcs}
    if r.returncode != 0 or any(d != "vfio-pci" for d in on.values()):
        raise Fail(f"precondition prepared not reached: vfio-hookd prepare exit {r.returncode}"
                   f"{': ' + r.stderr.strip() if r.returncode else ''}; drivers {on}")
    ph.prepared_from = before
    actions.append(f"vfio-hookd prepare {VM}")
    return {"needs": PREPARED, "prepared_by_runner": True, "baseline": base, "actions": actions}


# ---- the runner -------------------------------------------------------------------------------
def write_result(ctx: Ctx, name: str, res: dict) -> None:
    with open(os.path.join(ctx.out, "results", f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def run_entry(ctx: Ctx, ph: Phase, entry: str, prev: dict | None) -> dict:
    """Run one boot.json entry: establish its scenario's precondition, then the scenario.

    The result has ``precondition`` (the report of :func:`establish_baseline` or
    :func:`establish_prepared`, with ``after``: ``prev``, the entry before it in this phase).
    An entry ``SCENARIO.fail-POINT`` passes when the scenario failed at POINT as injected
    (``injected``, ``scenario_error``), and fails otherwise.
    """
    res: dict = {"ok": False, "error": None}
    try:
        name, point = parse_entry(entry)
    except ValueError as exc:
        res["error"] = str(exc)
        return res
    sc = SCENARIOS[name]
    t = time.monotonic()
    try:
        pre = establish_baseline(ctx, ph) if sc.needs == BASELINE else establish_prepared(ctx, ph)
    except Fail as exc:
        res["error"] = str(exc)
        return res
    except Exception:
        res["error"] = f"precondition {sc.needs} not reached: {traceback.format_exc()}"
        return res
    pre["s"] = round(time.monotonic() - t, 2)
    pre["after"] = prev
    res["precondition"] = pre
    ph.inject = point
    try:
        res.update(sc.run(ctx, ph) or {})
        if point is None:
            res["ok"] = True
        else:
            res["error"] = f"the failure injected at {point!r} did not happen: {name} passed"
    except Injected as exc:
        if point is None:      # cannot happen: ph.inject was None
            res["error"] = str(exc)
        else:
            res.update(ok=True, injected=point, scenario_error=str(exc))
    except Fail as exc:
        res["error"] = str(exc)
    except Exception:
        res["error"] = traceback.format_exc()
    finally:
        ph.inject = None
    return res


def setup_phase(ctx: Ctx, name: str) -> tuple:
    """Bring the guest into phase ``name`` (:data:`PHASES`) and coldplug it; returns the
    coldplug's ``skip``.

    - :data:`EFIFB`: every device but the GPU gets its driver (the console stays on the
      firmware framebuffer);
    - :data:`VFIO_AT_BOOT`: the functions handed over are reserved for vfio-pci before the
      coldplug, as ``vfio-pci.ids=`` or driverctl does at boot (``driver_override`` =
      ``vfio-pci``, so their native drivers, loaded by the coldplug, leave them alone), and
      ``modprobe vfio-pci`` binds them;
    - :data:`DRM`: a function an earlier phase reserved for vfio-pci is given back
      (``driver_override`` cleared, unbound, ``drivers_probe``), then everything is coldplugged.

    :raises Fail: a function is not where the phase needs it.
    """
    usb = ctx.cfg.get("usb_devices")
    if name == EFIFB:
        coldplug((ctx.gpu,), usb)
        return (ctx.gpu,)
    if name == VFIO_AT_BOOT:
        for a in ctx.funcs:
            with open(f"/sys/bus/pci/devices/{a}/driver_override", "w") as f:
                f.write("vfio-pci")
        coldplug((), usb)
        subprocess.run(["modprobe", "vfio-pci"], check=True)
        on = {a: driver(a) for a in ctx.funcs}
        check(all(d == "vfio-pci" for d in on.values()),
              f"the functions reserved for vfio-pci at boot are on {on}")
        return ()
    for a in ctx.funcs:
        if rd(f"/sys/bus/pci/devices/{a}/driver_override") not in (None, "(null)"):
            with open(f"/sys/bus/pci/devices/{a}/driver_override", "w") as f:
                f.write("\n")
            if driver(a):
                with open(f"/sys/bus/pci/devices/{a}/driver/unbind", "w") as f:
                    f.write(a)
            with open("/sys/bus/pci/drivers_probe", "w") as f:
                f.write(a)
    coldplug((), usb)
    return ()


def run_phase(ctx: Ctx, name: str, entries: list[str], more: bool) -> bool:
    """Set the phase up (:func:`setup_phase`), start the world, take the baseline, run
    ``entries``; False if one failed. With ``more`` (another phase follows), what the record
    still holds at the end is released (``--force``), so the next phase starts from free
    functions."""
    t = time.monotonic()
    try:
        static_nodes(ctx)
        skip = setup_phase(ctx, name)
        ctx.log(f"phase {name}: coldplug {time.monotonic() - t:.2f} s; drivers "
                f"{ {a: driver(a) for a in ctx.funcs} }; nodes {nodes()}; "
                f"fbs {platform_fbs()}; vtcons {vtcons()}")
        world = World(ctx)
        ctx.log(f"world ready: holds {world.holds}, units {world.units()}")
    except Exception:
        err = traceback.format_exc()
        ctx.log(f"setup failed: {err}")
        for entry in entries:
            write_result(ctx, entry, {"ok": False, "error": f"guest setup failed: {err}",
                                      "wall_s": 0})
        return False
    all_ok = True
    try:
        ph = Phase(name, skip, world, ctx.snapshot(world))
        prev = None
        for entry in entries:
            t = time.monotonic()
            ctx.log(f"=== scenario {entry}")
            res = run_entry(ctx, ph, entry, prev)
            res["wall_s"] = round(time.monotonic() - t, 2)
            all_ok &= res["ok"]
            ctx.log(f"=== scenario {entry}: {'PASS' if res['ok'] else 'FAIL'} in {res['wall_s']} s"
                    + (f": {res['error']}" if res["error"] else "")
                    + (f" (failed as injected: {res['scenario_error']})" if res.get("injected")
                       else ""))
            write_result(ctx, entry, res)
            prev = {"entry": entry, "ok": res["ok"], "injected": res.get("injected")}
        if more and record_phase(ctx) not in NOTHING_HELD:
            ctx.cli("release", VM, "--force")
    finally:
        world.close()
    return all_ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "/vfio-out"
    with open(os.path.join(out, "boot.json")) as f:
        cfg = json.load(f)
    # the repo's vfio_hookd and testbed, imported by the functions that use them (Ctx first)
    if sys.path[:1] != [cfg["repo"]]:
        sys.path.insert(0, cfg["repo"])
    ctx = Ctx.load(out, cfg)
    try:
        entries = ctx.cfg["scenarios"]
        ctx.log(f"guest runner: {ctx.cfg['name']} kernel {os.uname().release} "
                f"scenarios {entries}")
        phases = [(p, [e for e in entries if phase_of(e) == p]) for p in PHASES]
        phases = [(p, es) for p, es in phases if es]
        ok = True
        for i, (p, es) in enumerate(phases):
            ok &= run_phase(ctx, p, es, more=i + 1 < len(phases))
        return 0 if ok else 1
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
