"""Boot a real Linux kernel under QEMU (TCG) with an emulated IOMMU and GPU, and run vfio-hookd
scenarios inside it. Host side of the kernel tests (``tests/kernel/``).

Recipe (FIELD-NOTES §5): ``q35`` + ``intel-iommu``, a ``pcie-root-port`` holding the GPU
(``VGA``, ``bochs-display`` or ``virtio-vga``) at function 0 and ``intel-hda`` at function 1
of the same slot (one IOMMU group); SeaBIOS or OVMF (OVMF gives ``efi-framebuffer.0``). A boot
may add the devices of a hardware shape (:data:`SHAPES`: the GPU's USB-C controller and the
guest's own USB, or a second GPU the desktop runs on) and append to the kernel's command line
(``nomodeset``: the VGA text console stays). The
kernel is a Debian package unpacked into ``.cache/kernel/<KV>/`` by ``scripts/kernel-cache``
(never installed on this machine): Debian 12's own Linux 6.1, or the Linux 6.12 of
bookworm-backports (:data:`KERNELS`); and so is busybox-static (``.cache/kernel/busybox-static/``).
The initramfs (busybox + the modules needed to mount 9p and overlayfs) is built here, cached by
content. The guest mounts this machine's ``/`` read-only over 9p under a tmpfs overlay, so the
guest runs the same Python and the same code and writes nothing back, except into one writable
9p share: the boot's artefact directory, where ``tests/kernel/guest_runner.py`` writes one JSON
result per scenario, the daemon's log and its own log.

QEMU's exit status carries the boot's verdict (``isa-debug-exit``, see
``tests/kernel/guest_init.sh``): :data:`EXIT_PASS` when every scenario passed,
:data:`EXIT_FAIL` when one failed; anything else (0 after a kernel panic, or the harness's
kill at the deadline) means the harness itself failed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field

from testbed.pdeathsig import parent_death_signal
from testbed.procs import stop as stop_process

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(REPO, ".cache", "kernel")
ARTEFACTS = os.path.join(REPO, "artefacts", "kernel")
SETUP = os.path.join(REPO, "scripts", "kernel-cache")
QEMU = "/usr/bin/qemu-system-x86_64"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
#: busybox-static, unpacked by ``scripts/kernel-cache`` (installing it would fire the
#: update-initramfs trigger and replace the ``busybox`` package).
BUSYBOX_DIR = os.path.join(CACHE, "busybox-static")
BUSYBOX = os.path.join(BUSYBOX_DIR, "bin", "busybox")

#: QEMU's exit status for the guest's verdicts (isa-debug-exit: status = value * 2 + 1).
EXIT_PASS = 1
EXIT_FAIL = 3

#: The kernels a boot may run (``kernel`` of :func:`run_boot`): the name of the file in
#: ``.cache/kernel/`` naming the unpacked version (``scripts/kernel-cache`` writes both) ->
#: what it is. ``current``: Debian 12's Linux 6.1 (``6.1.0-N-amd64``), the default;
#: ``backports``: the Linux 6.12 of bookworm-backports (``6.12.N+deb12-amd64``).
KERNELS = {"current": "Linux 6.1 (Debian 12)", "backports": "Linux 6.12 (bookworm-backports)"}
DEFAULT_KERNEL = "current"

#: Modules the initramfs loads before it can reach the host's root (the rest, e.g. bochs,
#: vfio-pci, snd_hda_intel, come from the cache's /lib/modules through the 9p share).
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

#: The guest's PCI layout: the GPU's functions behind root port 00:10.0 on bus 01.
GPU_ADDR = "0000:01:00.0"
AUDIO_ADDR = "0000:01:00.1"
GPUS = ("VGA", "bochs-display", "virtio-vga")
FIRMWARES = ("bios", "ovmf")

#: Hardware shapes of a boot (:func:`shape_devices`), each with the guest's PCI addresses the
#: runner needs (``boot.json``: ``funcs``, the functions a profile hands over, GPU first;
#: ``desktop_gpu``, the GPU the desktop runs on when it is not the one handed over;
#: ``own_usb``, the guest's own xHCI controller; ``usb_devices``, how many USB devices each
#: xHCI controller has on its ports, which the runner's coldplug waits for):
#:
#: - ``single``: the GPU at 01:00.0 and its HDA function at 01:00.1 (one IOMMU group);
#: - ``usb-c``: as ``single`` plus a ``qemu-xhci`` at 01:00.2 (a Turing-like GPU's USB-C
#:   controller, same slot and IOMMU group) with a ``usb-tablet`` on it, and the guest's own
#:   ``qemu-xhci`` at 00:05.0 (its own IOMMU group) with a ``usb-kbd``;
#: - ``two-gpu``: a second ``VGA`` at 00:02.0 on the root complex (an integrated GPU's place:
#:   found first by SeaBIOS, so it is the boot VGA) that the desktop runs on, and the GPU + HDA
#:   of ``single`` behind the root port, handed over.
SHAPES = {
    "single": {"funcs": [GPU_ADDR, AUDIO_ADDR]},
    "usb-c": {"funcs": [GPU_ADDR, AUDIO_ADDR, "0000:01:00.2"], "own_usb": "0000:00:05.0",
              "usb_devices": {"0000:01:00.2": 1, "0000:00:05.0": 1}},
    "two-gpu": {"funcs": [GPU_ADDR, AUDIO_ADDR], "desktop_gpu": "0000:00:02.0"},
}


def shape_devices(shape: str) -> list[str]:
    """QEMU ``-device`` arguments of ``shape`` (:data:`SHAPES`) beyond the GPU and its HDA
    function (list of str, each ``-device`` followed by its value)."""
    if shape == "single":
        return []
    if shape == "usb-c":
        return ["-device", "qemu-xhci,bus=rp1,addr=00.2,id=gpuusb",
                "-device", "usb-tablet,bus=gpuusb.0",
                "-device", "qemu-xhci,bus=pcie.0,addr=0x5,id=ownusb",
                "-device", "usb-kbd,bus=ownusb.0"]
    if shape == "two-gpu":
        return ["-device", "VGA,bus=pcie.0,addr=0x2"]
    raise ValueError(f"shape must be one of {sorted(SHAPES)}")


class HarnessError(Exception):
    """The harness could not boot (missing package, kernel, QEMU error)."""


class SessionLock:
    """An exclusive ``flock`` on ``.cache/kernel/session.lock``, held by one kernel-test session
    from its first boot to its end: a second session on the same checkout (another pytest run)
    waits for it instead of removing and rewriting the same artefact directories
    (``artefacts/kernel/<boot>/``) under the first one's running guests."""

    def __init__(self):
        import fcntl
        os.makedirs(CACHE, exist_ok=True)
        self._f = open(os.path.join(CACHE, "session.lock"), "a")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kernel tests: another session holds {self._f.name}; waiting for it",
                  flush=True)
            fcntl.flock(self._f, fcntl.LOCK_EX)

    def release(self) -> None:
        """Release the lock (closing the file drops the flock)."""
        self._f.close()


def build_deb() -> str:
    """The path of the Debian package ``scripts/build-deb`` makes from this checkout (reused
    from ``.cache/deb/`` when its sources did not change), for the desktop guest's ``package``
    variant (issue 10: installed under real systemd).

    :raises HarnessError: the build failed.
    """
    r = subprocess.run([os.path.join(REPO, "scripts", "build-deb")], capture_output=True,
                       text=True, timeout=900, cwd=REPO,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"})
    if r.returncode != 0:
        raise HarnessError(f"scripts/build-deb failed ({r.returncode}): {r.stderr[-2000:]}")
    out = r.stdout.strip().splitlines()[-1]
    debs = sorted(f for f in os.listdir(out) if f.endswith(".deb"))
    if len(debs) != 1:
        raise HarnessError(f"scripts/build-deb left {debs} in {out}")
    return os.path.join(out, debs[0])


def kernel_version(prepare: bool = True, kernel: str = DEFAULT_KERNEL) -> str:
    """The cached version of ``kernel`` (:data:`KERNELS`: ``6.1.0-56-amd64`` for ``current``,
    ``6.12.57+deb12-amd64`` for ``backports``), running ``scripts/kernel-cache`` first when the
    cache (that kernel and busybox-static) is not complete and ``prepare`` is true (needs root:
    apt-get).

    :raises HarnessError: no cached kernel and it could not be prepared.
    :raises ValueError: ``kernel`` is not in :data:`KERNELS`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}")
    cur = os.path.join(CACHE, kernel)

    def cached() -> str | None:
        try:
            with open(cur) as f:
                kv = f.read().strip()
        except FileNotFoundError:
            return None
        done = (os.path.join(CACHE, kv, ".done"), os.path.join(BUSYBOX_DIR, ".done"))
        return kv if all(os.path.exists(d) for d in done) else None

    kv = cached()
    if kv is None and prepare:
        r = subprocess.run([SETUP], capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(f"{SETUP} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        kv = cached()
    if kv is None:
        raise HarnessError(f"no {KERNELS[kernel]} in {CACHE}: run {SETUP} (as root)")
    for exe in (QEMU, BUSYBOX, OVMF_CODE, "/usr/bin/kmod"):
        if not os.path.exists(exe):
            raise HarnessError(f"{exe} missing: run {SETUP} (as root)")
    return kv


_INSMOD = re.compile(r"insmod (/.*?\.ko(?:\.xz|\.zst|\.gz)?)(?: |$)")


def module_paths(kv: str, names) -> list[str]:
    """The ``.ko`` files (absolute) to insert for ``names`` and their dependencies, in load
    order, from ``modprobe --show-depends`` against the cache (kmod's own resolution)."""
    base = os.path.join(CACHE, kv)
    out: list[str] = []
    for name in names:
        r = subprocess.run(["/usr/sbin/modprobe" if os.path.exists("/usr/sbin/modprobe")
                            else "/sbin/modprobe", "-d", base, "-S", kv, "--show-depends", name],
                           capture_output=True, text=True, check=True)
        for line in r.stdout.splitlines():
            # "insmod PATH [OPTIONS]"; PATH may hold spaces (a clone under such a directory)
            m = _INSMOD.match(line)
            if m and m.group(1) not in out:
                out.append(m.group(1))
    return out


class _Cpio:
    """A ``newc`` cpio archive (the initramfs format, ``Documentation/driver-api/early-userspace``)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(hdr + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(len(hdr) + len(name) + 1) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def module_data(path: str) -> tuple[str, bytes]:
    """``(file name, contents)`` of the module file ``path`` as the initramfs holds it:
    uncompressed (Debian's 6.12 ships ``.ko.xz``, ``CONFIG_MODULE_COMPRESS_XZ``; busybox's
    ``insmod`` hands the file to the kernel as it is), named ``NAME.ko``.

    :raises HarnessError: a compression the standard library cannot read (``.zst``).
    """
    import lzma
    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = f.read()
    if name.endswith(".ko.xz"):
        return name[:-3], lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return name[:-3], gzip.decompress(data)
    if not name.endswith(".ko"):
        raise HarnessError(f"{path}: cannot uncompress this module for the initramfs")
    return name, data


def build_initramfs(kv: str) -> str:
    """The initramfs for kernel ``kv`` (path), built unless a build of the same inputs (init
    script, busybox, module files) is cached in ``.cache/kernel/``."""
    with open(os.path.join(HERE, "guest_init.sh"), "rb") as f:
        init = f.read()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    mods = module_paths(kv, INITRAMFS_MODULES)
    h = hashlib.sha256(init + busybox + kv.encode())
    blobs = []
    for m in mods:
        name, data = module_data(m)
        h.update(data)
        blobs.append((name, data))
    out = os.path.join(CACHE, f"initramfs-{kv}-{h.hexdigest()[:12]}.cpio.gz")
    if os.path.exists(out):
        return out
    c = _Cpio()
    for d in ("bin", "sbin", "modules", "proc", "sys", "dev", "host", "out", "rw", "newroot"):
        c.dir(d)
    c.file("init", init, 0o755)
    c.file("bin/busybox", busybox, 0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            c.symlink(f"bin/{a}", "busybox")
    for name, data in blobs:
        c.file(f"modules/{name}", data)
    c.file("modules.order", "\n".join(n for n, _ in blobs).encode() + b"\n")
    tmp = f"{out}.{os.getpid()}.{threading.get_ident()}.tmp"   # concurrent builders
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        f.write(c.finish())
    os.replace(tmp, out)
    return out


@dataclass
class Boot:
    """One guest boot and its outcome.

    :ivar name: e.g. ``VGA-bios``; also the artefact directory's name.
    :ivar outdir: the boot's artefact directory (the guest's writable share).
    :ivar rc: QEMU's exit status (None: killed at the deadline).
    :ivar wall_s: wall time of the boot, QEMU start to exit (s).
    :ivar results: scenario name -> the guest's result dict (``ok``, ``error``, ``wall_s``, ...).
    """
    name: str
    outdir: str
    rc: int | None = None
    wall_s: float = 0.0
    timed_out: bool = False
    results: dict = field(default_factory=dict)

    @property
    def console(self) -> str:
        return os.path.join(self.outdir, "console.log")

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the console log (str)."""
        try:
            with open(self.console, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no console log)"

    def verdict(self) -> str:
        """One line on how the boot ended."""
        if self.timed_out:
            return f"boot {self.name}: killed at the deadline after {self.wall_s:.0f} s"
        what = {EXIT_PASS: "all scenarios passed", EXIT_FAIL: "some scenario failed",
                0: "the guest panicked or init died"}.get(self.rc, "unexpected status")
        return f"boot {self.name}: QEMU exit status {self.rc} ({what}) after {self.wall_s:.1f} s"


def qemu_opt(value: str) -> str:
    """``value`` (str, e.g. a path) escaped for use inside one QEMU option string such as
    ``-fsdev``/``-drive``/``-chardev``: QEMU's option parser (``util/qemu-option.c``) ends a
    value at a comma and reads ``,,`` as a literal comma. No shell is involved (the argv goes
    to ``execve`` as is), so nothing else needs quoting. Not for the legacy ``-serial file:``
    form, which takes the rest verbatim."""
    return value.replace(",", ",,")


def qemu_argv(gpu: str, firmware: str, kv: str, initrd: str, outdir: str, memory_mb: int,
              accel: str = "tcg", shape: str = "single", cmdline: str = "",
              cpus: int = 1) -> list[str]:
    """The QEMU command line of one boot (list of str): ``shape`` (:data:`SHAPES`) adds its
    devices, ``cmdline`` is appended to the kernel's command line (e.g. ``nomodeset``),
    ``cpus`` vCPUs (the desktop boots: 2, FIELD-NOTES §8)."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {GPUS}")
    more = shape_devices(shape)
    kdir = os.path.join(CACHE, kv)
    argv = [QEMU, "-M", "q35,kernel-irqchip=split", "-m", str(memory_mb), "-smp", str(cpus),
            "-nodefaults", "-no-reboot", "-display", "none", "-vga", "none", "-monitor", "none",
            # -chardev, not "-serial file:PATH": the legacy form takes PATH verbatim (no ",,")
            "-chardev", f"file,id=console,path={qemu_opt(os.path.join(outdir, 'console.log'))}",
            "-serial", "chardev:console",
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,addr=0x10",
            "-device", f"{gpu},bus=rp1,addr=00.0,multifunction=on",
            "-device", "intel-hda,bus=rp1,addr=00.1,id=hda",
            "-audiodev", "none,id=snd0",
            "-device", "hda-output,bus=hda.0,audiodev=snd0",
            *more,
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=out,path={qemu_opt(outdir)},security_model=none",
            "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", os.path.join(kdir, "boot", f"vmlinuz-{kv}"), "-initrd", initrd,
            # no_timer_check: the kernel's boot-time check that the timer interrupt arrives
            # through the interrupt-remapped IO-APIC (io_apic.c timer_irq_works) counts ticks
            # in a busy loop; under TCG on a loaded machine it misses them and panics ("timer
            # doesn't work through Interrupt-remapped IO-APIC", seen on 6.1 and 6.12)
            "-append", "console=ttyS0 intel_iommu=on iommu=pt panic_on_oops=1 panic=-1 "
                       "no_timer_check loglevel=4 rdinit=/init"
                       + (f" {cmdline}" if cmdline else "")]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    if firmware == "ovmf":
        vars_copy = os.path.join(outdir, "OVMF_VARS.fd")
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv += ["-drive",
                 f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_opt(OVMF_CODE)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={qemu_opt(vars_copy)}"]
    elif firmware != "bios":
        raise ValueError(f"firmware must be one of {FIRMWARES}")
    return argv


#: The option ROM file QEMU loads into each GPU model's ROM BAR (its ``romfile`` property's
#: default, ``hw/display/vga-pci.c``, ``bochs-display.c``, ``virtio-vga.c``).
GPU_ROMFILES = {"VGA": "vgabios-stdvga.bin", "bochs-display": "vgabios-bochs-display.bin",
                "virtio-vga": "vgabios-virtio.bin"}


def gpu_romfile(gpu: str) -> dict | None:
    """The ROM file QEMU loads for ``gpu`` (:data:`GPU_ROMFILES`), found the way QEMU finds it:
    the first of its firmware directories (``qemu-system-x86_64 -L help``; Debian:
    ``/usr/share/qemu``, ``/usr/share/seabios``, ...) that has it. ``{"path", "size",
    "sha256"}``, or None when no directory has it."""
    name = GPU_ROMFILES.get(gpu)
    if name is None:
        return None
    dirs = subprocess.run([QEMU, "-L", "help"], capture_output=True, text=True,
                          timeout=30).stdout.split()
    for d in dirs:
        p = os.path.realpath(os.path.join(d, name))
        if os.path.isfile(p):
            with open(p, "rb") as f:
                data = f.read()
            return {"path": p, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return None


def run_boot(name: str, gpu: str, firmware: str, scenarios: list[str], timeout_s: float,
             memory_mb: int = 1024, accel: str | None = None, extra: dict | None = None,
             shape: str = "single", cmdline: str = "", kernel: str = DEFAULT_KERNEL,
             desktop: bool = False, cpus: int = 1) -> Boot:
    """Boot the guest once with ``kernel`` (:data:`KERNELS`) and run ``scenarios`` (names
    known to ``guest_runner.py``) in it, with the hardware of ``shape`` (:data:`SHAPES`) and
    ``cmdline`` appended to the kernel's command line. ``desktop``: the guest switch_roots into
    the real systemd and runs ``tests/kernel/desktop_runner.py`` as its service
    (``desktop_root.sh``), with ``cpus`` vCPUs.

    The boot is killed (SIGKILL, by PID) at ``timeout_s``; QEMU also gets SIGKILL when the
    calling thread dies (``PR_SET_PDEATHSIG``), so a killed pytest leaves no guest running.
    Results are read from the artefact directory ``artefacts/kernel/<name>/``
    (``results/<scenario>.json``).

    :raises HarnessError: the kernel or a package is missing.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}")
    kv = kernel_version(kernel=kernel)
    initrd = build_initramfs(kv)
    outdir = os.path.join(ARTEFACTS, name)
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(os.path.join(outdir, "results"))
    with open(os.path.join(outdir, "boot.env"), "w") as f:
        # sourced by the guest's /init (busybox sh): every value shell-quoted. KMODS is the
        # kernel's module tree with symlinks resolved: /init bind-mounts it from the 9p view
        # of this machine's root, where an absolute symlink (a worktree's .cache linking to
        # another checkout's) would point into the initramfs instead
        kmods = os.path.realpath(os.path.join(CACHE, kv, "lib", "modules", kv))
        f.write("".join(f"{k}={shlex.quote(v)}\n" for k, v in
                        (("KV", kv), ("REPO", REPO), ("KMODS", kmods),
                         ("SCENARIOS", " ".join(scenarios)), ("DESKTOP", "1" if desktop else "0"))))
    cfg = {"name": name, "gpu": gpu, "firmware": firmware, "kv": kv, "repo": REPO,
           "scenarios": scenarios, "gpu_addr": GPU_ADDR, "audio_addr": AUDIO_ADDR,
           "shape": shape, "cmdline": cmdline, "kernel": kernel, **SHAPES[shape],
           "gpu_romfile": gpu_romfile(gpu)}
    cfg.update(extra or {})
    with open(os.path.join(outdir, "boot.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    accel = accel or os.environ.get("VFIO_HOOKD_KERNEL_ACCEL", "tcg")
    argv = qemu_argv(gpu, firmware, kv, initrd, outdir, memory_mb, accel, shape, cmdline, cpus)
    with open(os.path.join(outdir, "qemu.cmdline"), "w") as f:
        f.write(shlex.join(argv) + "\n")
    boot = Boot(name, outdir)
    t0 = time.monotonic()
    with open(os.path.join(outdir, "qemu.log"), "wb") as qlog:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                start_new_session=True,
                                preexec_fn=parent_death_signal(signal.SIGKILL))
        # the guest powers itself off (isa-debug-exit); SIGKILL by PID at the deadline
        rc = stop_process(proc, timeout_s, sig=None)
        boot.timed_out = rc == -signal.SIGKILL
        boot.rc = None if boot.timed_out else rc
    boot.wall_s = round(time.monotonic() - t0, 1)
    rdir = os.path.join(outdir, "results")
    for entry in sorted(os.listdir(rdir)):
        if entry.endswith(".json"):
            try:
                with open(os.path.join(rdir, entry)) as f:
                    boot.results[entry[:-5]] = json.load(f)
            except (OSError, ValueError) as exc:
                boot.results[entry[:-5]] = {"ok": False, "error": f"unreadable result: {exc}"}
    with open(os.path.join(outdir, "boot-summary.json"), "w") as f:
        json.dump({"rc": boot.rc, "wall_s": boot.wall_s, "timed_out": boot.timed_out,
                   "results": {k: {"ok": v.get("ok"), "wall_s": v.get("wall_s")}
                               for k, v in boot.results.items()}}, f, indent=1)
    return boot
