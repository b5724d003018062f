"""The kernel tests' boot plan and the session's boot runner (used by ``test_kernel.py``).

Boots run two at a time (one per core); each runs several scenarios, and every scenario is its
own test. Artefacts: ``artefacts/kernel/<boot>/`` (console.log, daemon.log, runner.log,
results/*.json), removed after a boot whose scenarios all passed unless
``VFIO_HOOKD_KEEP_ARTEFACTS=1``; ``artefacts/kernel/summary.json`` always holds each boot's
exit status and per-scenario wall times.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import kernel_harness as kh


class BootSpec(NamedTuple):
    """One boot of the plan: the GPU model handed over, the firmware, the scenario entries in
    run order, the hardware shape (``kernel_harness.SHAPES``), what is appended to the
    kernel's command line, and the kernel it boots (``kernel_harness.KERNELS``: Debian 12's
    Linux 6.1 unless it says ``backports``, the Linux 6.12 of bookworm-backports)."""
    gpu: str
    firmware: str
    scenarios: list
    shape: str = "single"
    cmdline: str = ""
    kernel: str = kh.DEFAULT_KERNEL
    desktop: bool = False


#: Per boot: its :class:`BootSpec`. The runner runs a boot's scenarios in phases
#: (``guest_runner.PHASES``), in the plan's order within each: OVMF boots first run the
#: scenarios on the firmware framebuffer alone (no DRM driver loaded yet), the two-GPU boot
#: first those with the second GPU on vfio-pci from boot on. Listed longest first: two boots
#: run at a time, so this order keeps the session short.
#:
#: The shapes of issue 7 ("take only what the VM needs"): ``usb-c-VGA-bios`` (the GPU's xHCI
#: function handed over, the guest's own USB kept), ``two-gpu-VGA-bios`` (the desktop on the
#: other GPU), ``nomodeset-VGA-bios`` (the VGA text console), and ``holders_stubborn``
#: (holders that ignore SIGTERM) folded into ``bochs-display-bios``, and so is ``hugepages``
#: (issue 11: the guest kernel's real 2 MiB pool; 1 GiB of guest memory).
#:
#: The boots named ``*-6.12`` run the plain scenarios on the Linux 6.12 of bookworm-backports
#: (issue 8), once with OVMF (efifb first) and once with SeaBIOS; the others run Linux 6.1.
#:
#: Each scenario starts from the state it declares (``guest_runner.SCENARIOS``), which the
#: runner establishes. An entry ``SCENARIO.fail-POINT`` (:func:`injected`) makes SCENARIO fail
#: on purpose at POINT and is no scenario test of its own: ``test_cascade`` checks that the
#: scenarios after it still pass. ``prepare.fail-late`` leaves the guest prepared before a
#: scenario that needs the baseline (the runner restores it); ``prepare.fail-early`` leaves it
#: unprepared before one that needs it prepared (the runner prepares it).
BOOTS = {
    "bochs-display-ovmf": BootSpec("bochs-display", "ovmf", ["prepare", "release", "libvirt"]),
    "VGA-bios": BootSpec("VGA", "bios", ["prepare.fail-late", "prepare", "vfio_qemu",
                                         "release", "holders", "fault", "fault_late",
                                         "rom_dump"]),
    "VGA-ovmf": BootSpec("VGA", "ovmf", ["efifb_holders", "efifb_prepare", "efifb_release",
                                         "prepare", "vfio_qemu", "release", "holders",
                                         "rom_dump", "fault"]),
    "bochs-display-bios": BootSpec("bochs-display", "bios", ["prepare", "release", "holders",
                                                             "holders_stubborn", "hugepages"]),
    "two-gpu-VGA-bios": BootSpec("VGA", "bios", ["second_gpu_vfio", "second_gpu",
                                                 "rom_dump"], shape="two-gpu"),
    "virtio-vga-bios": BootSpec("virtio-vga", "bios", ["prepare", "release", "holders"]),
    "virtio-vga-ovmf": BootSpec("virtio-vga", "ovmf", ["prepare.fail-early", "release",
                                                       "prepare"]),
    "usb-c-VGA-bios": BootSpec("VGA", "bios", ["usb_prepare", "usb_release"], shape="usb-c"),
    "nomodeset-VGA-bios": BootSpec("VGA", "bios", ["vgacon"], cmdline="nomodeset"),
    "VGA-ovmf-6.12": BootSpec("VGA", "ovmf", ["efifb_holders", "efifb_prepare",
                                              "efifb_release", "prepare", "release",
                                              "holders", "fault"],
                              kernel="backports"),
    "VGA-bios-6.12": BootSpec("VGA", "bios", ["prepare", "release", "holders", "fault"],
                              kernel="backports"),
}
#: The desktop boots (issue 8, ``desktop_runner.py``): real systemd as PID 1, a real desktop
#: per variant (``desktop_runner.VARIANTS``), 2 vCPUs and 2 GiB (FIELD-NOTES §8). Listed
#: first: they are the longest, and two boots run at a time. Any variant can run in either boot
#: (each configures its own display manager); they are split so that both boots take about as
#: long (the package variant alone is about 6 min under TCG, most of it dpkg).
DESKTOP_BOOTS = {
    "desktop-wayland": BootSpec("bochs-display", "bios", ["wayland", "wayland-fault", "package"],
                                desktop=True),
    "desktop-x11": BootSpec("bochs-display", "bios", ["x11", "x11-fault", "nodm", "libvirt",
                                                      "greeter"], desktop=True),
}
#: Hard deadline of a desktop boot (s).
DESKTOP_BOOT_TIMEOUT_S = float(os.environ.get("VFIO_HOOKD_DESKTOP_BOOT_TIMEOUT", "1200"))
#: For a developer's loop: only these boots (comma-separated names) are booted, the tests of the
#: others fail at once. Unset (CI): every boot.
ONLY = [n for n in os.environ.get("VFIO_HOOKD_KERNEL_ONLY", "").split(",") if n]
#: Hard deadline of one boot (s), QEMU start to exit, under TCG on a loaded 2-core machine.
BOOT_TIMEOUT_S = float(os.environ.get("VFIO_HOOKD_KERNEL_BOOT_TIMEOUT", "240"))
PARALLEL = int(os.environ.get("VFIO_HOOKD_KERNEL_PARALLEL", str(max(1, min(2, os.cpu_count() or 1)))))


#: Every boot of the session, desktop boots first (the longest).
ALL_BOOTS = {**DESKTOP_BOOTS, **BOOTS}


def injected(entry: str) -> bool:
    """True for an entry that injects a failure (``SCENARIO.fail-POINT``)."""
    return "." in entry



class Boots:
    """Starts every boot of :data:`BOOTS` on first use; :meth:`get` waits for one.

    The session's setup (the session lock, the kernel cache, the initramfs) runs once: when it
    fails, its error is kept and every later :meth:`get` fails at once with it, instead of
    retrying (a second :class:`kernel_harness.SessionLock` in this process would wait forever
    for the first one's ``flock``).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}
        self._session: kh.SessionLock | None = None
        self._setup_error: Exception | None = None
        self._deb: str | None = None
        self.summary: dict = {}

    def _run(self, name: str) -> kh.Boot:
        spec = ALL_BOOTS[name]
        scenarios = spec.scenarios
        if spec.desktop:
            extra = {"deb": self._deb} if "package" in scenarios else None
            boot = kh.run_boot(name, spec.gpu, spec.firmware, scenarios, DESKTOP_BOOT_TIMEOUT_S,
                               memory_mb=2048, desktop=True, cpus=2, kernel=spec.kernel,
                               extra=extra)
            scenarios = ["setup", *scenarios]
        else:
            boot = kh.run_boot(name, spec.gpu, spec.firmware, scenarios, BOOT_TIMEOUT_S,
                               shape=spec.shape, cmdline=spec.cmdline, kernel=spec.kernel)
        ok = boot.rc == kh.EXIT_PASS and all(r.get("ok") for r in boot.results.values()) \
            and set(boot.results) == set(scenarios)
        with self._lock:
            self.summary[name] = {"kernel": spec.kernel, "rc": boot.rc, "wall_s": boot.wall_s,
                                  "timed_out": boot.timed_out,
                                  "scenarios": {k: {"ok": v.get("ok"), "wall_s": v.get("wall_s")}
                                                for k, v in boot.results.items()},
                                  "artefacts": None if ok else boot.outdir}
            os.makedirs(kh.ARTEFACTS, exist_ok=True)
            with open(os.path.join(kh.ARTEFACTS, "summary.json"), "w") as f:
                json.dump(self.summary, f, indent=1, sort_keys=True)
        if ok and os.environ.get("VFIO_HOOKD_KEEP_ARTEFACTS") != "1":
            shutil.rmtree(boot.outdir, ignore_errors=True)
        return boot

    def get(self, name: str) -> kh.Boot:
        """The finished boot ``name`` (waits for it; starts every boot on the first call).

        :raises kernel_harness.HarnessError: the session's setup failed (now or in an earlier
            call: then at once, chained to the first error).
        """
        with self._lock:
            if self._setup_error is not None:
                raise kh.HarnessError(f"the kernel tests' setup failed earlier: "
                                      f"{self._setup_error}") from self._setup_error
            if self._pool is None:
                try:
                    if self._session is None:
                        self._session = kh.SessionLock()
                    for kernel in sorted({s.kernel for s in BOOTS.values()}):
                        # once each, before the boots race for it
                        kh.build_initramfs(kh.kernel_version(kernel=kernel))
                    if any("package" in ALL_BOOTS[n].scenarios for n in ALL_BOOTS
                           if not ONLY or n in ONLY):
                        self._deb = kh.build_deb()
                except Exception as exc:
                    self._setup_error = exc
                    raise
                self._pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="boot")
                for n in ALL_BOOTS:
                    if not ONLY or n in ONLY:
                        self._futures[n] = self._pool.submit(self._run, n)
        if name not in self._futures:
            raise kh.HarnessError(f"boot {name} is not in VFIO_HOOKD_KERNEL_ONLY={','.join(ONLY)}")
        return self._futures[name].result()

    def close(self) -> None:
        """Wait for the running boots (cancel the queued ones) and release the session lock."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._session is not None:
            self._session.release()
