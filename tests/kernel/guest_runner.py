"""Runs inside the kernel tests' QEMU guest (a chroot of the host's root, with the guest's own
``/proc``, ``/sys``, ``/dev`` and the test kernel's modules): the vfio-hookd scenarios against
the guest's real kernel. Started by ``tests/kernel/guest_init.sh``; never run it on a real host.

``python guest_runner.py OUTDIR``: reads ``OUTDIR/boot.json`` (``scenarios``, ``gpu``,
``firmware``, ``gpu_addr``, ``audio_addr``), writes ``OUTDIR/results/<scenario>.json`` for each
scenario (``{"ok": bool, "error": str|null, "wall_s": float, ...}``), the daemon's log to
``OUTDIR/daemon.log`` and its own to ``OUTDIR/runner.log``. Exit status 0 when every scenario
passed, 1 otherwise.

What stands for the host's services: the project's simulated systemd on a private D-Bus bus
(``vfio_hookd.sim.bus.SimBus`` with ``root="/"``: its ``gdm.service`` is a real process holding
the guest's real ``/dev/dri/card0`` and the GPU's audio control node), and ``vfio-hookd daemon``
acting on ``/`` (a real :class:`vfio_hookd.host.Host`; no ``/.sim`` exists in the guest).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

OUT = sys.argv[1] if len(sys.argv) > 1 else "/vfio-out"
with open(os.path.join(OUT, "boot.json")) as _f:
    CFG = json.load(_f)
REPO = CFG["repo"]
sys.path.insert(0, REPO)
GPU, AUDIO = CFG["gpu_addr"], CFG["audio_addr"]
FUNCS = (GPU, AUDIO)
PY = os.path.join(REPO, ".venv", "bin", "python")
WORK = "/tmp/vh"
ENV = dict(os.environ, VFIO_HOOKD_CONFIG=f"{WORK}/etc", VFIO_HOOKD_RUN="/run/vfio-hookd",
           VFIO_HOOKD_HOST_ROOT="/", VFIO_HOOKD_LOG="stderr", PYTHONPATH=REPO)
VM = "guest"
#: Modules that stay loaded after release by design (vfio-hookd never unloads vfio).
VFIO_MODULES = {"vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "irqbypass",
                "vfio_virqfd"}
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
    for d in ("efi-framebuffer.0", "simple-framebuffer.0", "vesa-framebuffer.0"):
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


def snapshot(world) -> dict:
    """The state scenario 2 compares (drivers, overrides, modules, vtcon binds, /proc/fb,
    device nodes, firmware framebuffers, DM unit state)."""
    return {
        "drivers": {a: driver(a) for a in sorted(os.listdir("/sys/bus/pci/devices"))},
        "overrides": {a: rd(f"/sys/bus/pci/devices/{a}/driver_override") for a in FUNCS},
        "modules": sorted(modules() - VFIO_MODULES),
        "vtcons": vtcons(),
        "proc_fb": rd("/proc/fb", ""),
        "nodes": [n for n in nodes() if n != "/dev/vfio/vfio"],
        "platform_fbs": platform_fbs(),
        "units": world.units(),
    }


def diff(a: dict, b: dict) -> dict:
    return {k: {"before": a.get(k), "after": b.get(k)} for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)}


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


class World:
    """The simulated systemd (``gdm.service`` holding the GPU's card and audio control node,
    none when the GPU has no driver) on a private bus, and the daemon."""

    def __init__(self):
        from vfio_hookd.sim.bus import SimBus
        from vfio_hookd.systemd import Systemd
        os.makedirs(f"{WORK}/etc/vms", exist_ok=True)
        shutil.rmtree(f"{WORK}/sim", ignore_errors=True)
        os.makedirs(f"{WORK}/sim/.sim", exist_ok=True)
        holds = [n for n in function_nodes(GPU) if "/card" in n][:1] + \
                [n for n in function_nodes(AUDIO) if "/controlC" in n][:1]
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

    def start_daemon(self) -> None:
        path = f"{WORK}/notify"
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(120)
        env = dict(ENV, NOTIFY_SOCKET=path)
        logf = open(os.path.join(OUT, "daemon.log"), "ab")
        t = time.monotonic()
        self.daemon = subprocess.Popen([PY, "-m", "vfio_hookd.cli", "daemon"], env=env,
                                       stdout=logf, stderr=subprocess.STDOUT)
        try:
            msg = sock.recv(4096).decode()
        finally:
            sock.close()
        check("READY=1" in msg, f"daemon sent {msg!r}")
        log(f"daemon ready in {time.monotonic() - t:.1f} s (pid {self.daemon.pid})")

    def close(self) -> None:
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(60)
        self.systemd.close()
        self.bus.stop()


def profile(extra: str = "") -> None:
    with open(f"{WORK}/etc/vms/{VM}.yaml", "w") as f:
        f.write(f"devices: ['{GPU}', '{AUDIO}']\n{extra}")


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    t = time.monotonic()
    r = subprocess.run([PY, "-m", "vfio_hookd.cli", *args], env=ENV, capture_output=True,
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
    after = snapshot(world)
    st = status()
    check(st["phase"] == "idle", f"status phase {st['phase']}")
    d = diff(STATE["before"], after)
    notes = [n for s in st["steps"] for n in (s.get("notes") or [])]
    expected = {}
    if "platform_fbs" in d and "efi-framebuffer.0" in (d["platform_fbs"]["before"] or {}) \
            and "efi-framebuffer.0" not in (d["platform_fbs"]["after"] or {}):
        check(any("efi-framebuffer.0 was removed by the kernel" in n for n in notes),
              f"efi-framebuffer.0 gone but not reported as expected: {notes}")
        expected["platform_fbs"] = d.pop("platform_fbs")
        if "proc_fb" in d:
            expected["proc_fb"] = d.pop("proc_fb")
    check(not d, f"state after release differs from before prepare: {json.dumps(d)}")
    for a in FUNCS:
        check(driver(a) == STATE["before"]["drivers"][a], f"{a} on {driver(a)}")
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
        after = snapshot(world)
        d = diff(before, after)
        check(not d, f"state after the refused prepare differs: {json.dumps(d)}")
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
        d = diff(before, snapshot(world))
        d.pop("platform_fbs", None), d.pop("proc_fb", None)
        check(not d, f"state after terminate+release differs: {json.dumps(d)}")
        return {"refused": r.stderr.strip(), "steps_fail": step_times(st_fail),
                "steps_terminate": step_times(st_ok)}
    finally:
        if h.poll() is None:
            h.kill()
            h.wait()
        profile()


def sc_fault(world) -> dict:
    """Scenario 5: vfio-pci cannot be loaded (blacklisted with an ``install`` rule in the
    guest's /etc/modprobe.d): prepare fails in bind_vfio and the rollback restores everything."""
    profile()
    for m in ("vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "vfio"):
        if m in modules():
            subprocess.run(["rmmod", m], check=False)
    check("vfio_pci" not in modules(), "could not unload vfio_pci for the test")
    conf = "/etc/modprobe.d/zz-vfio-hookd-kernel-test.conf"
    with open(conf, "w") as f:
        f.write("install vfio_pci /bin/false\n")
    try:
        dry = subprocess.run(["modprobe", "-n", "-v", "vfio-pci"], capture_output=True, text=True)
        log(f"modprobe -n -v vfio-pci: {dry.returncode} {dry.stdout.strip()} {dry.stderr.strip()}")
        before = snapshot(world)
        r = cli("prepare", VM)
        check(r.returncode != 0, "prepare succeeded although vfio-pci cannot load")
        check(r.stderr.startswith("MODULE_FAILED: step bind_vfio"), f"unexpected: {r.stderr.strip()}")
        after = snapshot(world)
        d = diff(before, after)
        check(not d, f"state after rollback differs: {json.dumps(d)}")
        st = status()
        check(st["phase"] == "failed", f"phase {st['phase']}")
        return {"error": r.stderr.strip(), "steps": step_times(st)}
    finally:
        os.unlink(conf)


FB_KEYS = ("platform_fbs", "proc_fb", "vtcons")


def sc_efifb_prepare(world) -> dict:
    """OVMF, before any DRM driver is loaded: the console is on efifb (``efi-framebuffer.0``).
    Prepare unbinds the fbcon vtconsole and efi-framebuffer.0, binds both functions to
    vfio-pci, and the kernel removes efi-framebuffer.0 when vfio-pci takes the boot GPU."""
    profile()
    before = snapshot(world)
    STATE["efifb_before"] = before
    check(before["platform_fbs"].get("efi-framebuffer.0") == "efi-framebuffer",
          f"efi-framebuffer.0 not bound to efifb before: {before['platform_fbs']}")
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
    after = snapshot(world)
    st = status()
    check(st["phase"] == "idle", f"status phase {st['phase']}")
    notes = [n for s in st["steps"] for n in (s.get("notes") or [])]
    d = diff(STATE["efifb_before"], after)
    expected = {}
    if "efi-framebuffer.0" not in after["platform_fbs"]:
        check(any("efi-framebuffer.0 was removed by the kernel" in n for n in notes),
              f"efi-framebuffer.0 gone but not reported as expected: {notes}")
        for k in FB_KEYS:
            if k in d:
                expected[k] = d.pop(k)
        if "nodes" in d:   # /dev/fb0 went with efifb's framebuffer
            gone = set(d["nodes"]["before"]) - set(d["nodes"]["after"])
            if gone <= {"/dev/fb0"} and set(d["nodes"]["after"]) <= set(d["nodes"]["before"]):
                expected["nodes"] = d.pop("nodes")
    check(not d, f"state after release differs from before prepare: {json.dumps(d)}")
    return {"steps": step_times(st), "notes": notes, "expected_differences": expected}


SCENARIOS = {"efifb_prepare": sc_efifb_prepare, "efifb_release": sc_efifb_release, "prepare": sc_prepare, "vfio_qemu": sc_vfio_qemu, "release": sc_release,
             "holders": sc_holders, "fault": sc_fault}


def run_phase(names: list[str], skip: tuple) -> bool:
    """Coldplug (but ``skip``), start the world, run ``names``; False if one failed."""
    t = time.monotonic()
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
