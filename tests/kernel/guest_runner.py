"""Runs inside the kernel tests' QEMU guest (a chroot of the host's root, with the guest's own
``/proc``, ``/sys``, ``/dev`` and the test kernel's modules): the vfio-hookd scenarios against
the guest's real kernel. Started by ``tests/kernel/guest_init.sh``; never run it on a real host.

``python guest_runner.py OUTDIR``: reads ``OUTDIR/boot.json`` (``scenarios``, ``gpu``,
``firmware``, ``gpu_addr``, ``audio_addr``), writes ``OUTDIR/results/<scenario>.json`` for each
scenario (``{"ok": bool, "error": str|null, "wall_s": float, ...}``), the daemon's log to
``OUTDIR/daemon.log`` and its own to ``OUTDIR/runner.log``. Exit status 0 when every scenario
passed, 1 otherwise.

Scenario ``libvirt`` also runs Debian's libvirtd in the guest (:class:`GuestLibvirt`) with the
project's hook installed, so the whole path virsh -> libvirtd -> hook -> daemon -> kernel is real.

What stands for the host's services: the project's simulated systemd on a private D-Bus bus
(``testbed.sim.bus.SimBus`` with ``root="/"``: its ``gdm.service`` is a real process holding
the guest's real ``/dev/dri/card0`` and the GPU's audio control node), and vfio-hookd's daemon
acting on ``/`` exactly as the service runs it (``python -m vfio_hookd daemon``, a real
:class:`vfio_hookd.host.Host`), started and stopped by :class:`testbed.daemon.DaemonProcess`.

The guest's state before and after is a flat tree of the paths the scenarios compare
(:func:`tree`), and :func:`testbed.expected.classify_changes` -- the same comparison the
simulated host's tests and the demo use -- says which differences are the kernel's own.
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

OUT = sys.argv[1] if len(sys.argv) > 1 else "/vfio-out"
with open(os.path.join(OUT, "boot.json")) as _f:
    CFG = json.load(_f)
REPO = CFG["repo"]
sys.path.insert(0, REPO)
from testbed import child_env  # noqa: E402
from testbed.daemon import DaemonProcess  # noqa: E402
from testbed.expected import FIRMWARE_FBS, classify_changes, framebuffer_removed  # noqa: E402
from testbed.libvirtd import LIBVIRTD_CONF_EXTRA, QEMU_CONF_EXTRA  # noqa: E402
from testbed.procs import stop as stop_process  # noqa: E402
GPU, AUDIO = CFG["gpu_addr"], CFG["audio_addr"]
FUNCS = (GPU, AUDIO)
PY = os.path.join(REPO, ".venv", "bin", "python")
WORK = "/tmp/vh"
ENV = child_env(VFIO_HOOKD_CONFIG=f"{WORK}/etc", VFIO_HOOKD_RUN="/run/vfio-hookd",
                VFIO_HOOKD_LOG="stderr")
VM = "guest"
#: The framebuffer step's note for a firmware framebuffer the kernel removed ("DEV was removed
#: by the kernel ...").
FB_NOTE = "was removed by the kernel"
_LOG = open(os.path.join(OUT, "runner.log"), "a", buffering=1)
T0 = time.monotonic()


def log(msg: str) -> None:
    line = f"[{time.monotonic() - T0:7.2f}] {msg}"
    print(line, flush=True)
    _LOG.write(line + "\n")


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


def drm_modules() -> set[str]:
    """Modules of the DRM drivers of the GPU function (``bochs``, ``virtio_gpu``). The DRM
    device's parent is the PCI function in both cases, but virtio-gpu's driver is bound to the
    function's child ``virtio0`` (the function itself is on virtio-pci)."""
    dev = os.path.realpath(f"/sys/bus/pci/devices/{GPU}")
    mods = set()
    for e in os.listdir("/sys/class/drm") if os.path.isdir("/sys/class/drm") else []:
        d = os.path.realpath(f"/sys/class/drm/{e}/device")
        if d == dev or d.startswith(dev + "/"):
            if driver(GPU) == "virtio-pci":
                for c in os.listdir(dev):
                    if c.startswith("virtio") and link(f"{dev}/{c}/driver/module"):
                        mods.add(link(f"{dev}/{c}/driver/module"))
            elif link(f"{d}/driver/module"):
                mods.add(link(f"{d}/driver/module"))
    return mods


def vtcons() -> dict:
    base = "/sys/class/vtconsole"
    return {v: (rd(f"{base}/{v}/name"), rd(f"{base}/{v}/bind")) for v in sorted(os.listdir(base))}


def platform_fbs() -> dict:
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


def tree() -> dict:
    """The guest's state the scenarios compare, as a flat tree ``{path: (kind, value)}`` in
    :mod:`testbed.expected`'s shape: every PCI function's ``driver`` link, the GPU functions'
    ``driver_override``, ``/sys/module/M`` for each loaded module, the vtconsoles (link,
    directory, ``name``, ``bind``), ``/proc/fb``, the firmware framebuffer devices, and the
    device nodes (``/dev/dri``, ``/dev/snd``, ``/dev/vfio/N``, ``/dev/fbN``)."""
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
    for a in FUNCS:
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
        top = f"/sys/devices/platform/{dev}"
        if os.path.isdir(top):
            out[top] = ("dir", None)
            symlink(f"{top}/driver")
        symlink(f"/sys/bus/platform/devices/{dev}")
    for n in nodes():
        if n != "/dev/vfio/vfio":
            out[n] = ("node", None)
    return out


def snapshot(world, like: dict | None = None) -> dict:
    """``{"tree": tree(), "units": the DM's unit states}``. With ``like`` (an earlier
    snapshot) the sound nodes it lists are waited for first (:func:`wait_sound_nodes`)."""
    if like is not None:
        wait_sound_nodes(list(like["tree"]))
    return {"tree": tree(), "units": world.units()}


def tree_driver(snap: dict, addr: str):
    """The driver of ``addr`` in snapshot ``snap`` (None: unbound)."""
    value = snap["tree"].get(f"/sys/bus/pci/devices/{addr}/driver")
    return os.path.basename(value[1]) if value else None


def compare(before: dict, after: dict, notes=()) -> tuple[dict, list[str]]:
    """``(left, expected)``: the differences between two snapshots that are not the kernel's
    own (:func:`testbed.expected.classify_changes`; units included), and the expected lines.
    A firmware framebuffer the kernel removed counts as expected only when the release said
    so in its framebuffer step's ``notes``."""
    expected, left = classify_changes(before["tree"], after["tree"])
    left = {k: list(v) for k, v in left.items()}
    if before["units"] != after["units"]:
        left["units"] = [before["units"], after["units"]]
    for line in expected:
        if framebuffer_removed([line]):
            dev = line.split()[2]    # "firmware framebuffer efi-framebuffer.0 removed: ..."
            if not any(f"{dev} {FB_NOTE}" in n for n in notes):
                left[f"notes: {dev}"] = [f"{dev} removed by the kernel but the release did "
                                         f"not report it", list(notes)]
    return left, expected


# ---- the world: coldplug, simulated systemd, daemon ------------------------------------------
def coldplug(skip: tuple = ()) -> None:
    """Load the modules of every device but ``skip`` (PCI addresses), as udev's coldplug does
    (``modprobe -a MODALIAS``), until no new driver binds."""
    for _ in range(4):
        aliases = []
        for bus in ("pci", "virtio"):
            base = f"/sys/bus/{bus}/devices"
            for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
                if d not in skip and not os.path.exists(f"{base}/{d}/driver"):
                    a = rd(f"{base}/{d}/modalias")
                    if a:
                        aliases.append(a)
        if not aliases:
            return
        before = {d: driver(d) for d in os.listdir("/sys/bus/pci/devices")}
        subprocess.run(["modprobe", "-a", "-q", "-b", *aliases], check=False)
        after = {d: driver(d) for d in os.listdir("/sys/bus/pci/devices")}
        if after == before and not os.path.isdir("/sys/bus/virtio/devices"):
            return


def static_nodes() -> None:
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
            log(f"static node {parts[1]} ({parts[6]})")


class World:
    """The simulated systemd (``gdm.service`` holding the GPU's card and the GPU audio's
    control node, none when the GPU has no driver) on a private bus, and the daemon."""

    def __init__(self):
        from testbed.sim.bus import SimBus
        from vfio_hookd.systemd import Systemd
        os.makedirs(f"{WORK}/etc/vms", exist_ok=True)
        shutil.rmtree(f"{WORK}/sim", ignore_errors=True)
        os.makedirs(f"{WORK}/sim/.sim", exist_ok=True)
        # the DM holds the GPU's card and the GPU audio's control node; with no DRM driver
        # (the OVMF efifb phase) there is no session on the GPU and it holds nothing
        card = [n for n in function_nodes(GPU) if "/card" in n][:1]
        holds = card + ([n for n in function_nodes(AUDIO) if "/controlC" in n][:1] if card else [])
        self.holds = holds
        with open(f"{WORK}/sim/.sim/units.json", "w") as f:
            json.dump({"gdm.service": {"aliases": ["display-manager.service"], "active": True,
                                       "holds": holds}}, f)
        self.bus = SimBus("/", ready_timeout_s=60, state_root=f"{WORK}/sim")
        ENV["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus.address
        self.systemd = Systemd(self.bus.address)
        self.daemon = None
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
        env = dict(ENV)
        if path_prefix:
            env["PATH"] = f"{path_prefix}:{env['PATH']}"
        self.daemon = DaemonProcess(None, env=env, python=PY, ready_timeout_s=120,
                                    log_path=os.path.join(OUT, "daemon.log"))
        log(f"daemon ready in {self.daemon.ready_ms / 1000:.1f} s (pid {self.daemon.pid})")

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(60)
        self.systemd.close()
        self.bus.stop()


def profile(extra: str = "") -> None:
    with open(f"{WORK}/etc/vms/{VM}.yaml", "w") as f:
        f.write(f"devices: ['{GPU}', '{AUDIO}']\n{extra}")


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """``vfio-hookd ARGS...`` (``python -m vfio_hookd``) on the guest's ``/``."""
    t = time.monotonic()
    r = subprocess.run([PY, "-m", "vfio_hookd", *args], env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    log(f"vfio-hookd {' '.join(args)} -> {r.returncode} in {time.monotonic() - t:.2f} s"
        + (f": {r.stderr.strip()}" if r.returncode else ""))
    return r


def status() -> dict:
    r = cli("status", VM, "--json")
    check(r.returncode == 0, f"status failed: {r.stderr}")
    return json.loads(r.stdout)["vms"][VM]


def step_times(st: dict) -> dict:
    return {s["name"]: {"apply_ms": s["duration_ms"], "undo_ms": s.get("undo_ms"),
                        "status": s["status"], "notes": s.get("notes") or []}
            for s in st["steps"]}


# ---- scenarios --------------------------------------------------------------------------------
STATE: dict = {}


def sc_prepare(world) -> dict:
    """Scenario 1: prepare; both functions on vfio-pci, /dev/vfio/<group>, DRM module unloaded,
    framebuffer vtconsoles unbound, DM process gone, status --json agrees with sysfs."""
    profile()
    before = snapshot(world)
    STATE["before"] = before
    drm = drm_modules()
    dm = world.dm_pid()
    check(dm and os.path.exists(f"/proc/{dm}"), f"display manager not running before: {dm}")
    check(drm, "no DRM driver bound to the GPU before prepare")
    r = cli("prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    STATE["prepared"] = True
    for a in FUNCS:
        check(driver(a) == "vfio-pci", f"{a} is on {driver(a)} after prepare")
    group = link(f"/sys/bus/pci/devices/{GPU}/iommu_group")
    check(group == link(f"/sys/bus/pci/devices/{AUDIO}/iommu_group"), "functions in two groups")
    check(os.path.exists(f"/dev/vfio/{group}"), f"/dev/vfio/{group} missing")
    left = drm & modules()
    check(not left, f"DRM module(s) still loaded: {sorted(left)}")
    bound_fb = [v for v, (name, b) in vtcons().items() if "frame buffer" in (name or "") and b == "1"]
    check(not bound_fb, f"frame-buffer vtconsoles still bound: {bound_fb}")
    check(not os.path.exists(f"/proc/{dm}"), f"display manager PID {dm} still running")
    check(world.units()["gdm.service"] == "inactive", f"gdm: {world.units()['gdm.service']}")
    st = status()
    check(st["phase"] == "prepared", f"status phase {st['phase']}")
    for d in st["devices"]:
        check(d["driver"] == driver(d["address"]),
              f"status says {d['address']} on {d['driver']}, sysfs {driver(d['address'])}")
    return {"group": group, "drm_modules": sorted(drm), "steps": step_times(st),
            "before": before, "after": snapshot(world)}


def sc_vfio_qemu(world) -> dict:
    """Scenario 3: a nested QEMU opens both functions through VFIO and quits cleanly."""
    check(STATE.get("prepared"), "needs a prepared guest (scenario prepare failed)")
    argv = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
            "-display", "none", "-S", "-monitor", "stdio",
            "-device", f"vfio-pci,host={GPU[5:]},id=gpu", "-device", f"vfio-pci,host={AUDIO[5:]},id=hda"]
    t = time.monotonic()
    r = subprocess.run(argv, input="info pci\nquit\n", capture_output=True, text=True, timeout=120)
    took = round(time.monotonic() - t, 2)
    log(f"nested qemu exit {r.returncode} in {took} s; stderr: {r.stderr.strip()[:400]}")
    check(r.returncode == 0, f"nested QEMU exit status {r.returncode}: {r.stderr.strip()[-800:]}")
    check("id \"gpu\"" in r.stdout and "id \"hda\"" in r.stdout,
          f"info pci does not list both vfio devices: {r.stdout[-1500:]}")
    return {"qemu_s": took}


def sc_release(world) -> dict:
    """Scenario 2: release gives everything back; the snapshot equals the one before prepare
    (the firmware framebuffer removed by the kernel is reported as expected)."""
    check(STATE.get("prepared"), "needs a prepared guest (scenario prepare failed)")
    r = cli("release", VM)
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    STATE["prepared"] = False
    after = snapshot(world, like=STATE["before"])
    st = status()
    check(st["phase"] == "idle", f"status phase {st['phase']}")
    notes = [n for s in st["steps"] for n in (s.get("notes") or [])]
    left, expected = compare(STATE["before"], after, notes)
    check(not left, f"state after release differs from before prepare: {json.dumps(left)}")
    for a in FUNCS:
        check(driver(a) == tree_driver(STATE["before"], a), f"{a} on {driver(a)}")
    dm = world.dm_pid()
    check(dm and os.path.exists(f"/proc/{dm}"), "display manager not running after release")
    return {"steps": step_times(st), "notes": notes, "expected_differences": expected,
            "after": after}


def _holder(path: str) -> subprocess.Popen:
    """A process (not in any unit) holding ``path`` open."""
    return subprocess.Popen(["/bin/sh", "-c", f"exec sleep infinity 3<{path}"],
                            stdin=subprocess.DEVNULL)


def sc_holders(world) -> dict:
    """Scenario 4: a holder outside any unit: on_busy fail -> DEVICE_BUSY with its PID and the
    guest exactly as before; on_busy terminate -> prepare succeeds (then release)."""
    profile()
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
        before = snapshot(world)
        r = cli("prepare", VM)
        check(r.returncode != 0, "prepare succeeded although a process holds the GPU")
        check(r.stderr.startswith("DEVICE_BUSY:"), f"not DEVICE_BUSY: {r.stderr.strip()}")
        check(f"PID {h.pid}" in r.stderr, f"holder PID {h.pid} not named: {r.stderr.strip()}")
        left, _ = compare(before, snapshot(world, like=before))
        check(not left, f"state after the refused prepare differs: {json.dumps(left)}")
        check(h.poll() is None, "the holder was killed although on_busy is fail")
        st_fail = status()
        profile("on_busy: terminate\n")
        r = cli("release", VM)      # the failed record holds nothing; release is a no-op
        check(r.returncode == 0, f"release after a failed prepare: {r.stderr}")
        r = cli("prepare", VM)
        check(r.returncode == 0, f"prepare with on_busy: terminate failed: {r.stderr.strip()}")
        h.wait(10)
        check(all(driver(a) == "vfio-pci" for a in FUNCS), "not on vfio-pci")
        st_ok = status()
        r = cli("release", VM)
        check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
        notes = [n for s_ in status()["steps"] for n in (s_.get("notes") or [])]
        left, _ = compare(before, snapshot(world, like=before), notes)
        check(not left, f"state after terminate+release differs: {json.dumps(left)}")
        return {"refused": r.stderr.strip(), "steps_fail": step_times(st_fail),
                "steps_terminate": step_times(st_ok)}
    finally:
        if h.poll() is None:
            h.kill()
            h.wait()
        profile()


def sc_fault(world) -> dict:
    """Scenario 5: vfio-pci cannot be loaded (``install vfio_pci /bin/false`` in the guest's
    /etc/modprobe.d; a plain ``modprobe vfio-pci`` is checked to fail on that rule first):
    prepare fails in bind_vfio, the last step, after the GPU's DRM module was unloaded, and
    the rollback restores everything (the module loaded again binds the GPU again)."""
    profile()
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
        log(f"modprobe vfio-pci: {direct.returncode}: {direct.stderr.strip()}")
        check(direct.returncode != 0 and "Error running install command" in direct.stderr,
              f"the install rule did not fail modprobe: {direct.returncode} {direct.stderr!r}")
        check("vfio_pci" not in modules(), "vfio_pci got loaded despite the install rule")
        before = snapshot(world)
        r = cli("prepare", VM)
        check(r.returncode != 0, "prepare succeeded although vfio-pci cannot load")
        check(r.stderr.startswith("MODULE_FAILED: step bind_vfio: loading module vfio-pci"),
              f"unexpected: {r.stderr.strip()}")
        left, _ = compare(before, snapshot(world, like=before))
        check(not left, f"state after rollback differs: {json.dumps(left)}")
        st = status()
        check(st["phase"] == "failed", f"phase {st['phase']}")
        steps = {s_["name"]: s_["status"] for s_ in st["steps"]}
        check(steps.get("modules") == "undone" and steps.get("bind_vfio") == "failed",
              f"steps after the rollback: {steps}")
        return {"error": r.stderr.strip(), "modprobe_stderr": direct.stderr.strip(),
                "steps": step_times(st)}
    finally:
        os.unlink(conf)


def sc_fault_late(world) -> dict:
    """Scenario 5b: the modules step fails after the units, holders, vtconsoles and
    framebuffer steps were applied: an ``rmmod`` first in the daemon's PATH refuses the GPU's
    DRM module (as kmod does for a module in use). The rollback must undo them on the real
    kernel: the vtconsoles rebound, the DM started; the state equals the one before."""
    profile()
    drm = sorted(drm_modules())
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
        before = snapshot(world)
        dm = world.dm_pid()
        r = cli("prepare", VM)
        check(r.returncode != 0, "prepare succeeded although rmmod fails")
        check(r.stderr.startswith(f"MODULE_FAILED: step modules: unloading module {drm[0]}")
              and "injected" in r.stderr, f"unexpected: {r.stderr.strip()}")
        st = status()
        check(st["phase"] == "failed", f"phase {st['phase']}")
        steps = {s_["name"]: s_["status"] for s_ in st["steps"]}
        check(steps.get("modules") == "failed" and steps.get("bind_vfio") == "pending"
              and steps.get("vtconsoles") == "undone" and steps.get("units") == "undone",
              f"steps after the rollback: {steps}")
        notes = [n for s_ in st["steps"] for n in (s_.get("notes") or [])]
        left, expected = compare(before, snapshot(world, like=before), notes)
        check(not left, f"state after the rollback differs: {json.dumps(left)}")
        new_dm = world.dm_pid()
        check(new_dm != dm and os.path.exists(f"/proc/{new_dm}"), "display manager not restarted")
        return {"error": r.stderr.strip(), "steps": step_times(st),
                "expected_differences": expected}
    finally:
        world.restart_daemon()


#: qemu.conf of the guest's libvirtd (FIELD-NOTES §5): the private test daemon's settings
#: (root QEMU, no relabelling, no cgroups, no private /dev, so QEMU sees the guest's
#: /dev/vfio) plus QEMU's log to a plain file (no virtlogd to start).
LIBVIRT_QEMU_CONF = QEMU_CONF_EXTRA + 'stdio_handler = "file"\n'
LIBVIRTD_CONF = LIBVIRTD_CONF_EXTRA
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

    def __init__(self):
        from testbed.libvirtd import _DirWatch
        for d in LIBVIRT_DIRS:
            os.makedirs(d, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d], check=True)
        for d in ("/etc/libvirt/hooks/qemu.d", "/etc/libvirt/qemu", "/var/lib/libvirt/qemu",
                  "/var/log/libvirt/qemu", "/var/cache/libvirt/qemu"):
            os.makedirs(d, exist_ok=True)
        with open("/etc/libvirt/qemu.conf", "w") as f:
            f.write(LIBVIRT_QEMU_CONF)
        with open("/etc/libvirt/libvirtd.conf", "w") as f:
            f.write(LIBVIRTD_CONF)
        hook = "/etc/libvirt/hooks/qemu.d/vfio-hookd"
        shutil.copyfile(os.path.join(REPO, "vfio_hookd", "qemu_hook.py"), hook)
        os.chmod(hook, 0o755)
        if os.path.lexists("/etc/vfio-hookd"):
            shutil.rmtree("/etc/vfio-hookd") if os.path.isdir("/etc/vfio-hookd") and \
                not os.path.islink("/etc/vfio-hookd") else os.unlink("/etc/vfio-hookd")
        os.symlink(f"{WORK}/etc", "/etc/vfio-hookd")
        t = time.monotonic()
        self.logf = open(os.path.join(OUT, "libvirtd.log"), "ab")
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
        log(f"libvirtd ready in {self.ready_s} s (pid {self.proc.pid})")

    def virsh(self, *args, timeout=240) -> subprocess.CompletedProcess:
        t = time.monotonic()
        r = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], env=dict(self.ENV, LC_ALL="C"),
                           capture_output=True, text=True, timeout=timeout)
        log(f"virsh {' '.join(args)} -> {r.returncode} in {time.monotonic() - t:.2f} s"
            + (f": {r.stderr.strip()}" if r.returncode else ""))
        return r

    def domstate(self, name: str) -> str:
        r = self.virsh("domstate", name)
        check(r.returncode == 0, f"virsh domstate: {r.stderr.strip()}")
        return r.stdout.strip()

    def qemu_pid(self, name: str):
        return int(rd(f"/run/libvirt/qemu/{name}.pid", "0") or 0) or None

    def close(self) -> None:
        stop_process(self.proc, 60)
        self.logf.close()
        qlog = "/var/log/libvirt/qemu/guest.log"
        if os.path.exists(qlog):
            shutil.copyfile(qlog, os.path.join(OUT, "libvirt-qemu-guest.log"))
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


def sc_libvirt(world) -> dict:
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
    from testbed.domains import tiny_domain_xml
    out: dict = {}
    pfile = f"{WORK}/etc/vms/{VM}.yaml"
    if os.path.exists(pfile):
        os.unlink(pfile)
    lv = GuestLibvirt()
    out["libvirtd_ready_s"] = lv.ready_s
    try:
        xml = f"{WORK}/{VM}.xml"
        with open(xml, "w") as f:
            f.write(tiny_domain_xml(VM, FUNCS, managed=False))
        r = lv.virsh("define", xml)
        check(r.returncode == 0, f"virsh define: {r.stderr.strip()}")
        group = link(f"/sys/bus/pci/devices/{GPU}/iommu_group")

        # a. no profile: the hook stays out, libvirt refuses the functions on their drivers
        before = snapshot(world)
        t = time.monotonic()
        r = lv.virsh("start", VM, "--paused")
        out["start_unprepared_s"] = round(time.monotonic() - t, 2)
        check(r.returncode != 0, "virsh start succeeded with both functions on their drivers")
        out["unprepared_error"] = r.stderr.strip()
        check(lv.domstate(VM) == "shut off", "domain not shut off after the refused start")
        left, _ = compare(before, snapshot(world, like=before))
        check(not left, f"state after the refused start differs: {json.dumps(left)}")

        # b. with the profile: start prepares, destroy releases
        with open(pfile, "w") as f:
            f.write("devices: auto\n")
        dm = world.dm_pid()
        t = time.monotonic()
        r = lv.virsh("start", VM, "--paused")
        out["start_s"] = round(time.monotonic() - t, 2)
        check(r.returncode == 0, f"virsh start failed: {r.stderr.strip()}")
        for a in FUNCS:
            check(driver(a) == "vfio-pci", f"{a} on {driver(a)} while the domain runs")
        check(lv.domstate(VM) == "paused", f"domain state {lv.domstate(VM)}")
        qpid = lv.qemu_pid(VM)
        check(qpid and _opened_by(qpid, f"/dev/vfio/{group}"),
              f"QEMU (pid {qpid}) does not hold /dev/vfio/{group}")
        check(not os.path.exists(f"/proc/{dm}"), f"display manager PID {dm} still running")
        st = status()
        check(st["phase"] == "prepared", f"status phase {st['phase']}")
        check([d["address"] for d in st["devices"]] == list(FUNCS),
              f"devices: auto gave {[d['address'] for d in st['devices']]}, expected {FUNCS}")
        out["steps_prepare"] = step_times(st)
        t = time.monotonic()
        r = lv.virsh("destroy", VM)
        out["destroy_s"] = round(time.monotonic() - t, 2)
        check(r.returncode == 0, f"virsh destroy failed: {r.stderr.strip()}")
        check(lv.domstate(VM) == "shut off", f"domain state {lv.domstate(VM)} after destroy")
        st = status()
        check(st["phase"] == "idle", f"status phase {st['phase']} after destroy")
        notes = [n for s_ in st["steps"] for n in (s_.get("notes") or [])]
        left, out["expected_differences"] = compare(before, snapshot(world, like=before),
                                                    notes)
        check(not left, f"state after virsh destroy differs from before start: {json.dumps(left)}")
        check(os.path.exists(f"/proc/{world.dm_pid()}"), "display manager not running again")
        out["steps_release"] = step_times(st)

        # c. a forced prepare failure: a holder outside any unit, on_busy: fail
        card = world.holds[0]
        h = _holder(card)
        try:
            _wait_open(h, card)
            before = snapshot(world)
            r = lv.virsh("start", VM, "--paused")
            check(r.returncode != 0, "virsh start succeeded although a process holds the GPU")
            err = " ".join(r.stderr.split())
            out["busy_error"] = err
            check("Hook script execution failed" in err and "DEVICE_BUSY: step holders:" in err,
                  f"libvirt's error does not carry the hook's CODE line: {err}")
            check(f"PID {h.pid}" in err, f"holder PID {h.pid} not named: {err}")
            check(lv.domstate(VM) == "shut off", "domain not shut off after the failed prepare")
            check(h.poll() is None, "the holder was killed although on_busy is fail")
            left, _ = compare(before, snapshot(world, like=before))
            check(not left, f"state after the failed start differs: {json.dumps(left)}")
            st = status()
            check(st["phase"] == "failed" and (st["error"] or {}).get("code") == "DEVICE_BUSY",
                  f"status after the failed start: {st['phase']} {st['error']}")
        finally:
            h.kill()
            h.wait()
        lv.virsh("undefine", VM)
    finally:
        lv.close()
        profile()
    return out


def sc_efifb_prepare(world) -> dict:
    """OVMF, before any DRM driver is loaded: the console is on efifb (``efi-framebuffer.0``).
    Prepare unbinds the fbcon vtconsole and efi-framebuffer.0, binds both functions to
    vfio-pci, and the kernel removes efi-framebuffer.0 when vfio-pci takes the boot GPU."""
    profile()
    before = snapshot(world)
    STATE["efifb_before"] = before
    check(platform_fbs().get("efi-framebuffer.0") == "efi-framebuffer",
          f"efi-framebuffer.0 not bound to efifb before: {platform_fbs()}")
    check(driver(GPU) is None, f"GPU already on {driver(GPU)}")
    r = cli("prepare", VM)
    check(r.returncode == 0, f"prepare failed: {r.stderr.strip()}")
    STATE["efifb_prepared"] = True
    for a in FUNCS:
        check(driver(a) == "vfio-pci", f"{a} is on {driver(a)} after prepare")
    group = link(f"/sys/bus/pci/devices/{GPU}/iommu_group")
    check(os.path.exists(f"/dev/vfio/{group}"), f"/dev/vfio/{group} missing")
    bound_fb = [v for v, (name, b) in vtcons().items() if "frame buffer" in (name or "") and b == "1"]
    check(not bound_fb, f"frame-buffer vtconsoles still bound: {bound_fb}")
    st = status()
    return {"steps": step_times(st), "after": snapshot(world),
            "efi_framebuffer_removed": "efi-framebuffer.0" not in platform_fbs()}


def sc_efifb_release(world) -> dict:
    """Release after efifb_prepare: the functions go back (GPU: no driver, audio:
    snd_hda_intel), and the efi-framebuffer.0 the kernel removed is reported as expected in
    the framebuffer step's notes; everything else equals the state before prepare."""
    check(STATE.get("efifb_prepared"), "needs efifb_prepare to have passed")
    r = cli("release", VM)
    check(r.returncode == 0, f"release failed: {r.stderr.strip()}")
    after = snapshot(world, like=STATE["efifb_before"])
    st = status()
    check(st["phase"] == "idle", f"status phase {st['phase']}")
    notes = [n for s in st["steps"] for n in (s.get("notes") or [])]
    left, expected = compare(STATE["efifb_before"], after, notes)
    check(not left, f"state after release differs from before prepare: {json.dumps(left)}")
    return {"steps": step_times(st), "notes": notes, "expected_differences": expected}


SCENARIOS = {"efifb_prepare": sc_efifb_prepare, "efifb_release": sc_efifb_release, "prepare": sc_prepare, "vfio_qemu": sc_vfio_qemu, "release": sc_release,
             "holders": sc_holders, "fault": sc_fault, "fault_late": sc_fault_late,
             "libvirt": sc_libvirt}


def run_phase(names: list[str], skip: tuple) -> bool:
    """Coldplug (but ``skip``), start the world, run ``names``; False if one failed."""
    t = time.monotonic()
    static_nodes()
    coldplug(skip)
    log(f"coldplug {time.monotonic() - t:.2f} s; drivers {driver(GPU)}, {driver(AUDIO)}; "
        f"nodes {nodes()}; fbs {platform_fbs()}; vtcons {vtcons()}")
    try:
        world = World()
        log(f"world ready: holds {world.holds}, units {world.units()}")
    except Exception:
        err = traceback.format_exc()
        log(f"setup failed: {err}")
        for name in names:
            with open(os.path.join(OUT, "results", f"{name}.json"), "w") as f:
                json.dump({"ok": False, "error": f"guest setup failed: {err}", "wall_s": 0}, f)
        return False
    all_ok = True
    try:
        for name in names:
            t = time.monotonic()
            res = {"ok": False, "error": None}
            log(f"=== scenario {name}")
            try:
                res.update(SCENARIOS[name](world) or {})
                res["ok"] = True
            except Fail as exc:
                res["error"] = str(exc)
            except Exception:
                res["error"] = traceback.format_exc()
            res["wall_s"] = round(time.monotonic() - t, 2)
            all_ok &= res["ok"]
            log(f"=== scenario {name}: {'PASS' if res['ok'] else 'FAIL'} in {res['wall_s']} s"
                + (f": {res['error']}" if res["error"] else ""))
            with open(os.path.join(OUT, "results", f"{name}.json"), "w") as f:
                json.dump(res, f, indent=1, default=str)
    finally:
        world.close()
    return all_ok


def main() -> int:
    log(f"guest runner: {CFG['name']} kernel {os.uname().release} scenarios {CFG['scenarios']}")
    efifb = [n for n in CFG["scenarios"] if n.startswith("efifb_")]
    rest = [n for n in CFG["scenarios"] if not n.startswith("efifb_")]
    ok = True
    if efifb:
        ok &= run_phase(efifb, skip=(GPU,))
    if rest:
        ok &= run_phase(rest, skip=())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
