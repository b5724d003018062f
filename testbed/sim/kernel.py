"""The simulated kernel: a directory tree that answers writes the way Linux does, and module
commands the way kmod does.

:class:`SimHost` is the :class:`~vfio_hookd.host.Host` of the simulated host (a directory
holding ``.sim/``, built by :mod:`testbed.sim.hosts`); it replaces only the product's three doors
to the kernel, one sysfs write, one binary read of an attribute the kernel answers from its
state (a function's ``rom``, :mod:`testbed.sim.rom`) and one ``modprobe``/``rmmod`` command,
and raises what those
raise (``OSError``, ``TimeoutError``) or answers what they answer (exit status and message):
never a product error. The state lives in the tree itself --
real directories, regular files, relative symlinks that stay inside the root, exactly where sysfs
has them -- plus ``<root>/.sim/state.json`` for what a tree cannot hold (see :data:`STATE_DOC`).
Every operation takes an ``flock`` on ``<root>/.sim/kernel.lock`` so the daemon, the fake
systemd and the tests can share one host.

Behaviour modelled, with its source:

- PCI ``driver_override``, ``bind``, ``unbind``, ``drivers_probe`` (``Documentation/ABI/testing/
  sysfs-bus-pci``; ``drivers/base/bus.c`` ``bind_store``/``unbind_store``/``drivers_probe_store``,
  ``drivers/pci/pci-driver.c`` ``pci_match_device``): unbind of a device not bound to that driver
  is ``ENODEV``; bind is ``ENODEV`` when the driver does not match (override set to another
  driver, or not in its id table -- vfio-pci matches nothing without an override) and ``EBUSY``
  when the device already has a driver.
- Unbinding tears down what the driver created for the function (DRM, sound, ``/dev/nvidia0``,
  ``/proc/driver/nvidia/gpus/ADDR``, the framebuffer it registered). NVIDIA's unbind blocks
  forever while a process holds one of the GPU's nodes (FIELD-NOTES §2, ``nv_pci_remove``);
  so does vfio-pci's while the IOMMU group node is open (``vfio_unregister_group_dev``). A DRM
  driver's unbind succeeds with ``card0`` open, but the stale file keeps the module pinned.
- Binding vfio-pci or an evicting DRM driver to the boot VGA function removes the firmware
  framebuffer platform device (``drivers/video/aperture.c``) and retires a bound VGA text
  console (``drivers/pci/vgaarb.c`` ``vga_remove_vgacon``: dummycon takes the consoles as a new
  ``(M) dummy device`` vtconsole, vgacon's vtconsole disappears for good, so a write to its
  ``bind`` finds no file: ENOENT). When the last framebuffer goes
  and the fbcon vtconsole is unbound, fbcon unregisters its console driver and the vtconsole
  disappears; the next framebuffer brings it back bound (``drivers/video/fbdev/core/fbcon.c``
  ``fbcon_fb_unregistered`` / ``fbcon_fb_registered``).
- A function without ``driver_override`` is matched by a driver's id table (``native``) or
  its dynamic ids (``vfio-pci.ids=``, ``ids``); ``drivers_probe`` binds the first matching
  driver in registration order (``bus_for_each_drv``), so vfio-pci with ids, loaded first,
  takes a function back from a native driver loaded later.
- Hugepage pools (:mod:`testbed.sim.hugepages`): ``nr_hugepages`` grows while contiguous
  memory lasts (short otherwise), ``compact_memory`` makes more of it contiguous, pages in use
  become surplus when the pool shrinks below them.
- Child devices (:mod:`testbed.sim.children`): what a driver creates below its function -- USB
  root hubs and devices, i2c adapters and clients, HID and input devices -- on their buses and
  classes, bound to bus drivers of other modules (usbcore's ``usb``, usbhid), with ``/dev``
  nodes; they go with the function's driver and with any module they need, and names the
  kernel numbers at run time come back as the kernel numbers them (lowest free, or only
  growing). devtmpfs drops the ``/dev`` directories a removed node leaves empty below the
  second level (``/dev/bus/usb/003``).
- ``modprobe`` loads dependencies, creates ``/sys/module/M`` (``refcnt``, ``holders/``), the PCI
  driver directory and the module's drivers on other buses, and probes matching unbound
  functions. ``rmmod`` refuses built-ins, modules
  with holders or open files (kmod's messages), else unbinds the driver's functions and unloads
  (``Documentation/ABI/stable/sysfs-module``). ``refcnt`` = holders + open files on the module's
  nodes, recomputed at each driver or module operation.

Holders of nodes are real processes: the kernel scans ``/proc/*/fd`` and compares
:func:`~vfio_hookd.host.identity_of` with the identities of the node files it created (kept
in the state even after the file is removed, so stale descriptors still count).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import threading
import time

from vfio_hookd.deadline import run_with_deadline
from vfio_hookd.host import Host, identity_of

from . import children, cpus, faults

#: The schema of ``<root>/.sim/state.json`` (documentation only).
STATE_DOC = """
{"kernel": "6.1.0-sim",                       # uname -r shown in modprobe's messages
 "devices": {ADDR: {"native": DRV|null,       # driver whose id table matches the function
                    "group": "1"}},            # IOMMU group number (str)
 "modules": {M: {"builtin": bool,             # built-in: /sys/module/M without refcnt
                 "deps": [M, ...],            # loaded first, each gets holders/M
                 "pci_driver": DRV|null,      # PCI driver the module registers
                 "bus_drivers": [[BUS, DRV]], # drivers on other buses (usb: usbhid)
                 "needs_device": bool,        # init fails (ENODEV) when it binds no device
                 "nodes": [SPEC, ...]}},      # nodes the module creates at load (/dev/nvidiactl)
 "drivers": {DRV: {"module": M|null,          # null: built-in driver (pcieport)
                   "evicts_firmware_fb": bool,    # aperture eviction on the boot VGA function
                   "unbind_waits_for_holders": bool,  # unbind blocks while nodes are held
                   "hold_nodes": [PATH, ...],     # extra nodes counted for that (nvidiactl)
                   "ids": ["1002:73bf", ...]}},   # dynamic ids (vfio-pci.ids=): match too
 "pci_drivers": [DRV, ...],                   # registration order: the first match binds
 "driver_nodes": {DRV: {ADDR: [SPEC, ...]}},  # what DRV creates when it binds ADDR
 "boot_vga": ADDR|null,
 "platform": {NAME: {"driver": PDRV, "fb": "EFI VGA", "firmware_fb": bool}},
 "fbs": {"0": "EFI VGA"},                     # registered framebuffers (/proc/fb)
 "counters": {NAME: {"mode": "lowest"|"next", ...}},  # run-time numbers (testbed.sim.children)
 "vars": {ADDR: {VAR: N}},                    # the numbers a function's nodes got
 "live": {PATH: {"id": ID, "module": M|[M]|null}},  # node files that exist; pin M
 "stale": [{"path": PATH, "id": ID, "module": M|null}]}  # removed but maybe still open
SPEC: {"kind": "dev", "path": "/dev/nvidia0", "module": M}
    | {"kind": "proc", "path": "/proc/driver/nvidia/gpus/ADDR/information", "text": str}
    | {"kind": "class", "class": "drm"|"sound", "name": "card0", "parent": "card1"|null,
       "dev": "dri/card0"|null, "devnum": "226:0"|null, "module": M, "requires": M|null}
    | {"kind": "fb", "name": "amdgpudrmfb"}
    | {"kind": "dir", "path": "/sys/bus/usb/devices"}
    | {"kind": "device", "path": "usb3/3-1", "bus": "usb"|null, "class": "input"|null, ...}
    | {"kind": "bind", "path": "usb3/3-1", "bus": "usb", "driver": "usb", ...}
    (device and bind: testbed.sim.children; "requires" may be a list: every module loaded)
ID: ["f", st_dev, st_ino] (see vfio_hookd.host.identity_of)
"""

_PCI_ADDR = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class _Hang(Exception):
    """Raised inside the locked section for an operation that blocks in the kernel: the lock is
    released first, then the calling thread blocks forever."""


class KmodError(Exception):
    """A ``modprobe`` / ``rmmod`` that failed the way kmod's does: ``status`` (its exit status)
    and ``text`` (what it printed on stderr, e.g. ``rmmod: ERROR: Module nvidia is in use by:
    nvidia_modeset``). :meth:`SimHost.run_command` turns it into ``(status, text)``: the
    simulated host answers like the commands, the product decides what that means."""

    def __init__(self, text: str, status: int = 1):
        super().__init__(text)
        self.text = text
        self.status = status


def _hang() -> None:
    threading.Event().wait()


# ---- tree primitives (shared with testbed.sim.hosts) -------------------------------------
def real(root: str, p: str) -> str:
    """Filesystem path of host path ``p`` under ``root``."""
    return root + p


def mkdir(root: str, p: str) -> None:
    """Create directory ``p`` (host path) and its parents."""
    os.makedirs(real(root, p), exist_ok=True)


def mkfile(root: str, p: str, text: str = "", mode: int = 0o644) -> None:
    """Create or replace regular file ``p`` with ``text``; ``mode`` like the sysfs attribute
    (0o444 read-only, 0o200 write-only, 0o644 read-write)."""
    path = real(root, p)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):  # replace, also when read-only to us (refcnt, /proc/fb)
        os.unlink(path)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def mklink(root: str, link: str, target: str) -> None:
    """Create symlink ``link`` -> ``target`` (host paths) as a relative link that goes up to the
    common ancestor and down again, the way sysfs writes them (``../../../bus/pci/drivers/X``)."""
    rel = os.path.relpath(os.path.dirname(target), os.path.dirname(link))
    value = os.path.normpath(os.path.join(rel, os.path.basename(target)))
    path = real(root, link)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(value, path)


def remove(root: str, p: str) -> None:
    """Remove ``p`` (file, link or directory tree); absent is fine."""
    path = real(root, p)
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def load_state(root: str) -> dict:
    """The simulated kernel's state of host ``root`` (see :data:`STATE_DOC`); read-only use."""
    with open(os.path.join(root, ".sim", "state.json")) as f:
        return json.load(f)


def save_state(root: str, state: dict) -> None:
    """Write ``state`` atomically to ``<root>/.sim/state.json``."""
    path = os.path.join(root, ".sim", "state.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(state, sort_keys=True))   # C encoder: no cyclic garbage in the daemon
    os.replace(tmp, path)


def module_name(name: str) -> str:
    """kmod's canonical module name: ``-`` and ``_`` are the same (``vfio-pci`` -> ``vfio_pci``)."""
    return name.replace("-", "_")


@contextlib.contextmanager
def locked_kernel(root: str, proc: str = "/proc"):
    """Context manager yielding a :class:`Kernel` for ``root`` under the kernel lock; the state
    is saved on exit, also when the operation raised (a half-done operation stays half done,
    as in the kernel); when the operation scanned the holders, every ``refcnt`` is rewritten."""
    lock_path = os.path.join(root, ".sim", "kernel.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        k = Kernel(root, load_state(root), proc)
        try:
            yield k
        finally:
            if k._open is not None:  # holders were scanned: refcnt reflects them, also on error
                k.refresh_refcnts()
            save_state(root, k.st)


class Kernel:
    """The kernel logic on one loaded state; use through :func:`locked_kernel`.

    Every method works on host paths and raises ``OSError`` with the errno the kernel returns,
    :class:`KmodError` (kmod's exit status and message) for module operations, or
    :class:`_Hang` when the kernel would block.
    """

    def __init__(self, root: str, state: dict, proc: str = "/proc"):
        self.root = root
        self.st = state
        self.proc = proc
        self._open: dict[tuple, int] | None = None

    # ---- small helpers -------------------------------------------------------------------
    def r(self, p: str) -> str:
        """Filesystem path of host path ``p``."""
        return real(self.root, p)

    def read(self, p: str) -> str | None:
        """Text of ``p`` without the trailing newline; None when absent."""
        try:
            with open(self.r(p)) as f:
                return f.read().rstrip("\n")
        except OSError:
            return None

    def link_name(self, p: str) -> str | None:
        """Last component of symlink ``p``'s target; None when ``p`` is no link."""
        try:
            return os.path.basename(os.readlink(self.r(p)))
        except OSError:
            return None

    def resolve(self, p: str) -> str:
        """Host path of ``p`` with links resolved.

        :raises OSError: ``ENOENT`` when it leaves the root."""
        realp = os.path.realpath(self.r(p))
        root = os.path.realpath(self.root)
        if realp == root:
            return "/"
        if not realp.startswith(root + "/"):
            raise OSError(errno.ENOENT, "outside the simulated host", p)
        return realp[len(root):]

    def dev_dir(self, addr: str) -> str:
        """Host path of the sysfs directory of PCI function ``addr``."""
        return self.resolve(f"/sys/bus/pci/devices/{addr}")

    def driver_of(self, addr: str) -> str | None:
        """Name of the driver bound to ``addr`` (its ``driver`` link), or None."""
        return self.link_name(f"/sys/bus/pci/devices/{addr}/driver")

    def override_of(self, addr: str) -> str | None:
        """``driver_override`` of ``addr``; None when unset (reads ``(null)``)."""
        value = self.read(f"/sys/bus/pci/devices/{addr}/driver_override")
        return None if value in (None, "(null)") else value

    def loaded(self, module: str) -> bool:
        """True when ``/sys/module/<module>`` exists (loaded or built in)."""
        return os.path.isdir(self.r(f"/sys/module/{module}"))

    def driver_registered(self, drv: str) -> bool:
        """True when PCI driver ``drv`` is registered (its directory exists)."""
        return os.path.isdir(self.r(f"/sys/bus/pci/drivers/{drv}"))

    # ---- holders of nodes ----------------------------------------------------------------
    def open_files(self) -> dict[tuple, int]:
        """Identity -> number of open descriptors, over every readable ``/proc/*/fd`` entry
        that points into the simulated root (scanned once per operation)."""
        if self._open is not None:
            return self._open
        prefixes = tuple({self.root + "/", os.path.realpath(self.root) + "/"})
        found: dict[tuple, int] = {}
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    if not os.readlink(f"{fd_dir}/{fd}").startswith(prefixes):
                        continue
                    ident = identity_of(os.stat(f"{fd_dir}/{fd}"))
                except OSError:
                    continue
                found[ident] = found.get(ident, 0) + 1
        self._open = found
        return found

    def held(self, idents) -> bool:
        """True when some process has one of the identities ``idents`` open."""
        opened = self.open_files()
        return any(tuple(i) in opened for i in idents)

    def node_ids(self, paths) -> list[tuple]:
        """Identities of the live node files among ``paths``."""
        live = self.st.setdefault("live", {})
        return [tuple(live[p]["id"]) for p in paths if p in live]

    def pinned_count(self, module: str) -> int:
        """Open descriptors on nodes (live or removed) that pin ``module`` (a node's
        ``module`` may be a list: /dev/i2c-5 pins i2c_dev, whose file it is, and the adapter's
        owner, ``i2c_get_adapter``)."""
        def pins(m) -> bool:
            return m == module or (isinstance(m, list) and module in m)
        opened = self.open_files()
        ids = [tuple(v["id"]) for v in self.st.get("live", {}).values() if pins(v["module"])]
        ids += [tuple(v["id"]) for v in self.st.get("stale", []) if pins(v["module"])]
        return sum(opened.get(i, 0) for i in ids)

    def refresh_refcnts(self) -> None:
        """Rewrite every loadable module's ``refcnt``; forget removed nodes nobody holds."""
        opened = self.open_files()
        self.st["stale"] = [s for s in self.st.get("stale", []) if tuple(s["id"]) in opened]
        for m, info in self.st["modules"].items():
            if info.get("builtin") or not self.loaded(m):
                continue
            holders = len(os.listdir(self.r(f"/sys/module/{m}/holders")))
            mkfile(self.root, f"/sys/module/{m}/refcnt", f"{holders + self.pinned_count(m)}\n", 0o444)

    # ---- node files ----------------------------------------------------------------------
    def _make_dev(self, p: str, module: str | None) -> None:
        mkfile(self.root, p, "", 0o666)
        st = os.stat(self.r(p))
        self.st.setdefault("live", {})[p] = {"id": list(identity_of(st)), "module": module}

    def _drop_dev(self, p: str) -> None:
        entry = self.st.setdefault("live", {}).pop(p, None)
        if entry is not None:
            self.st.setdefault("stale", []).append({"path": p, **entry})
        remove(self.root, p)
        # devtmpfs removes the directories a node leaves empty (delete_path); the first two
        # levels (/dev/dri, /dev/bus/usb) are kept here, as the host was built with them
        parent = os.path.dirname(p)
        while parent.startswith("/dev/") and parent.count("/") >= 4:
            try:
                os.rmdir(self.r(parent))
            except OSError:
                break
            parent = os.path.dirname(parent)

    def _class_dir(self, addr: str, spec: dict) -> str:
        parts = [self.dev_dir(addr), spec["class"]]
        if spec.get("parent"):
            parts.append(spec["parent"])
        parts.append(spec["name"])
        return "/".join(parts)

    def create_node(self, addr: str, spec: dict) -> None:
        """Create one node of ``spec`` (see :data:`STATE_DOC`) for function ``addr``."""
        kind = spec["kind"]
        if kind == "dev":
            self._make_dev(spec["path"], spec.get("module"))
        elif kind == "proc":
            mkfile(self.root, spec["path"], spec["text"], 0o444)
        elif kind == "class":
            d = self._class_dir(addr, spec)
            mkdir(self.root, d)
            mklink(self.root, f"{d}/device", os.path.dirname(d) if spec.get("parent")
                   else self.dev_dir(addr))
            mklink(self.root, f"{d}/subsystem", f"/sys/class/{spec['class']}")
            uevent = ""
            if spec.get("devnum"):
                major, minor = spec["devnum"].split(":")
                uevent = f"MAJOR={major}\nMINOR={minor}\n"
                mkfile(self.root, f"{d}/dev", spec["devnum"] + "\n", 0o444)
            if spec.get("dev"):
                uevent += f"DEVNAME={spec['dev']}\n"
            mkfile(self.root, f"{d}/uevent", uevent, 0o644)
            mklink(self.root, f"/sys/class/{spec['class']}/{spec['name']}", d)
            if spec.get("dev"):
                self._make_dev(f"/dev/{spec['dev']}", spec.get("module"))
        elif kind == "fb":
            self.register_fb(spec["name"])
        elif kind == "dir":
            mkdir(self.root, spec["path"])
        elif kind in ("device", "bind"):
            children.create(self, addr, spec)

    def remove_node(self, addr: str, spec: dict) -> None:
        """Tear down one node created by :meth:`create_node` (absent parts are skipped)."""
        kind = spec["kind"]
        if kind == "dev":
            self._drop_dev(spec["path"])
        elif kind == "proc":
            remove(self.root, spec["path"])
            parent = os.path.dirname(spec["path"])
            with contextlib.suppress(OSError):
                os.rmdir(self.r(parent))
        elif kind == "class":
            d = self._class_dir(addr, spec)
            if spec.get("dev"):
                self._drop_dev(f"/dev/{spec['dev']}")
            remove(self.root, f"/sys/class/{spec['class']}/{spec['name']}")
            remove(self.root, d)
            glue = f"{self.dev_dir(addr)}/{spec['class']}"  # kernel drops the empty glue dir
            with contextlib.suppress(OSError):
                os.rmdir(self.r(glue))
        elif kind == "fb":
            self.unregister_fb(spec["name"])
        elif kind == "dir":
            remove(self.root, spec["path"])
        elif kind in ("device", "bind"):
            children.remove(self, addr, spec)

    def _node_present(self, addr: str, spec: dict) -> bool:
        kind = spec["kind"]
        if kind in ("dev", "proc", "dir"):
            return os.path.lexists(self.r(spec["path"]))
        if kind == "class":
            return os.path.lexists(self.r(f"/sys/class/{spec['class']}/{spec['name']}"))
        if kind in ("device", "bind"):
            return children.present(self, addr, spec)
        return spec["name"] in self.st.setdefault("fbs", {}).values()

    def binding_nodes(self, drv: str, addr: str) -> list[dict]:
        """Node specs ``drv`` creates when it binds ``addr`` (see :data:`STATE_DOC`)."""
        return self.st.get("driver_nodes", {}).get(drv, {}).get(addr, [])

    def ready(self, spec: dict) -> bool:
        """True when every module ``spec`` requires is loaded."""
        return all(self.loaded(m) for m in children.requires_of(spec))

    # ---- framebuffers and fbcon ----------------------------------------------------------
    def _write_proc_fb(self) -> None:
        fbs = self.st.setdefault("fbs", {})
        text = "".join(f"{i} {fbs[i]}\n" for i in sorted(fbs, key=int))
        mkfile(self.root, "/proc/fb", text, 0o444)

    def _fbcon_vtcons(self) -> list[str]:
        base = "/sys/devices/virtual/vtconsole"
        return [v for v in sorted(os.listdir(self.r(base)))
                if "frame buffer" in (self.read(f"{base}/{v}/name") or "")] \
            if os.path.isdir(self.r(base)) else []

    def add_vtcon(self, name: str, bind: str) -> str:
        """Register a console driver: the next free ``vtconN`` with ``name``; returns vtconN."""
        base = "/sys/devices/virtual/vtconsole"
        mkdir(self.root, base)
        n = 0
        while os.path.lexists(self.r(f"{base}/vtcon{n}")):
            n += 1
        v = f"vtcon{n}"
        mkfile(self.root, f"{base}/{v}/name", name + "\n", 0o444)
        mkfile(self.root, f"{base}/{v}/bind", bind + "\n", 0o644)
        mkfile(self.root, f"{base}/{v}/uevent", "", 0o644)
        mklink(self.root, f"{base}/{v}/subsystem", "/sys/class/vtconsole")
        mklink(self.root, f"/sys/class/vtconsole/{v}", f"{base}/{v}")
        return v

    def vtcon_bind(self, vt: str, bind: bool) -> None:
        """A write to ``/sys/class/vtconsole/VT/bind`` (``drivers/tty/vt/vt.c`` ``vt_bind`` /
        ``vt_unbind``, Linux 6.1; seen in QEMU guests):

        - only a driver registered as a module (name ``(M) ...``) can be bound or unbound; a
          write to the boot console driver's (``(S) ...``) does nothing;
        - unbind hands the consoles to the first other registered driver (lowest vtconN:
          ``do_unbind_con_driver``), e.g. ``(S) dummy device`` after an EFI boot, or the
          ``(M) dummy device`` a DRM driver left when it evicted vgacon after a BIOS boot;
        - bind takes consoles only from the boot ``(S)`` driver; if another driver holds them,
          or no ``(S)`` driver is registered any more, the write succeeds and does nothing.
        Writing what already is does nothing either."""
        base = "/sys/devices/virtual/vtconsole"
        names = sorted(os.listdir(self.r(base)), key=lambda v: int(v[len("vtcon"):])) \
            if os.path.isdir(self.r(base)) else []
        bound = {v: self.read(f"{base}/{v}/bind") == "1" for v in names}
        system = [v for v in names if (self.read(f"{base}/{v}/name") or "").startswith("(S)")]
        if vt not in bound or bound[vt] == bind or vt in system:
            return

        def set_(v: str, b: bool) -> None:
            mkfile(self.root, f"{base}/{v}/bind", ("1" if b else "0") + "\n", 0o644)

        others = [v for v in names if v != vt]
        if not bind:
            if others:    # no backup driver: do_unbind_con_driver fails, store_bind ignores it
                set_(vt, False)
                set_(others[0], True)
            return
        owner = [v for v in others if bound[v]]
        if not system or (owner and owner[0] not in system):
            return
        set_(vt, True)
        for v in owner:
            set_(v, False)

    def register_fb(self, name: str) -> None:
        """register_framebuffer(): lowest free index, /proc/fb. When fbcon had no framebuffer
        (``fbcon_fb_registered`` with ``info_idx == -1``) it registers its console driver if
        needed (the lowest free vtconN) and takes the consoles over from whichever driver held
        them (``do_fbcon_takeover``; seen in a QEMU guest when bochs-drm loads again)."""
        fbs = self.st.setdefault("fbs", {})
        first = not fbs
        i = 0
        while str(i) in fbs:
            i += 1
        fbs[str(i)] = name
        self._write_proc_fb()
        base = "/sys/devices/virtual/vtconsole"
        fbcon = self._fbcon_vtcons()
        if not fbcon:
            fbcon = [self.add_vtcon("(M) frame buffer device", "1")]
        elif not first:
            return
        for v in sorted(os.listdir(self.r(base))):
            mkfile(self.root, f"{base}/{v}/bind", ("1" if v == fbcon[0] else "0") + "\n", 0o644)

    def unregister_fb(self, name: str) -> None:
        """unregister_framebuffer(); with no framebuffer left fbcon unregisters its console
        driver, which only succeeds when its vtconsole is unbound (fbcon.c)."""
        fbs = self.st.setdefault("fbs", {})
        for i, n in list(fbs.items()):
            if n == name:
                del fbs[i]
        self._write_proc_fb()
        if not fbs:
            for v in self._fbcon_vtcons():
                if self.read(f"/sys/devices/virtual/vtconsole/{v}/bind") == "0":
                    remove(self.root, f"/sys/class/vtconsole/{v}")
                    remove(self.root, f"/sys/devices/virtual/vtconsole/{v}")

    def remove_vgacon(self) -> None:
        """vga_remove_vgacon() (drivers/video/aperture.c, Linux 6.1): when vgacon (the boot
        console driver of a BIOS boot, ``(S) VGA+``) holds the consoles, dummycon takes them
        over (``do_take_over_console`` registers it as ``(M) dummy device`` at the lowest free
        vtconN) and vgacon is unregistered (its vtconN disappears). A vgacon that holds no
        console is left alone. Seen in the BIOS guests of tests/kernel: after bochs-drm
        loaded, vtcon0 is fbcon (it took vgacon's free slot) and vtcon1 ``(M) dummy device``."""
        base = "/sys/devices/virtual/vtconsole"
        if not os.path.isdir(self.r(base)):
            return
        for v in sorted(os.listdir(self.r(base))):
            if self.read(f"{base}/{v}/name") == "(S) VGA+" and self.read(f"{base}/{v}/bind") == "1":
                self.add_vtcon("(M) dummy device", "1")
                remove(self.root, f"/sys/class/vtconsole/{v}")
                remove(self.root, f"{base}/{v}")

    # ---- platform devices (firmware framebuffer) -----------------------------------------
    def platform_bind(self, pdrv: str, name: str) -> None:
        """``bind`` of platform driver ``pdrv`` (bus.c bind_store).

        :raises OSError: ``ENODEV`` absent or wrong driver, ``EBUSY`` already bound."""
        info = self.st.get("platform", {}).get(name)
        dev = f"/sys/devices/platform/{name}"
        if info is None or not os.path.isdir(self.r(dev)) or info["driver"] != pdrv:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        if os.path.lexists(self.r(f"{dev}/driver")):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        mklink(self.root, f"{dev}/driver", f"/sys/bus/platform/drivers/{pdrv}")
        mklink(self.root, f"/sys/bus/platform/drivers/{pdrv}/{name}", dev)
        if info.get("fb"):
            self.register_fb(info["fb"])

    def platform_unbind(self, pdrv: str, name: str) -> None:
        """``unbind`` of platform driver ``pdrv``.

        :raises OSError: ``ENODEV`` when ``name`` is not bound to ``pdrv``."""
        dev = f"/sys/devices/platform/{name}"
        if self.link_name(f"{dev}/driver") != pdrv:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        remove(self.root, f"{dev}/driver")
        remove(self.root, f"/sys/bus/platform/drivers/{pdrv}/{name}")
        info = self.st.get("platform", {}).get(name, {})
        if info.get("fb"):
            self.unregister_fb(info["fb"])

    def evict_firmware_fb(self) -> None:
        """aperture_remove_conflicting_pci_devices() on the boot VGA function: sysfb_disable()
        unregisters the firmware framebuffer platform devices (removed, not just unbound),
        and vga_remove_vgacon() retires the VGA text console (:meth:`remove_vgacon`)."""
        self.remove_vgacon()
        for name, info in self.st.get("platform", {}).items():
            dev = f"/sys/devices/platform/{name}"
            if not info.get("firmware_fb") or not os.path.isdir(self.r(dev)):
                continue
            drv = self.link_name(f"{dev}/driver")
            if drv:
                self.platform_unbind(drv, name)
            remove(self.root, f"/sys/bus/platform/devices/{name}")
            remove(self.root, dev)

    # ---- PCI driver core -----------------------------------------------------------------
    def pci_id(self, addr: str) -> str:
        """``vendor:device`` of function ``addr`` (``10de:1e87``)."""
        return ":".join((self.read(f"/sys/bus/pci/devices/{addr}/{a}") or "0x")[2:]
                        for a in ("vendor", "device"))

    def matches(self, drv: str, addr: str) -> bool:
        """pci_match_device(): the override decides when set, else the dynamic ids
        (``new_id``, ``vfio-pci.ids=``) and the id table (native)."""
        override = self.override_of(addr)
        if override is not None:
            return override == drv
        if self.st["devices"][addr].get("native") == drv:
            return True
        return self.pci_id(addr) in self.st["drivers"].get(drv, {}).get("ids", [])

    def _group_node(self, addr: str) -> str:
        return f"/dev/vfio/{self.st['devices'][addr]['group']}"

    def attach(self, drv: str, addr: str) -> None:
        """really_probe(): link device and driver, run the driver's probe side effects."""
        info = self.st["drivers"].get(drv, {})
        d = self.dev_dir(addr)
        if self.st.get("boot_vga") == addr and info.get("evicts_firmware_fb"):
            self.evict_firmware_fb()
        mklink(self.root, f"{d}/driver", f"/sys/bus/pci/drivers/{drv}")
        mklink(self.root, f"/sys/bus/pci/drivers/{drv}/{addr}", d)
        if drv == "vfio-pci" and not os.path.lexists(self.r(self._group_node(addr))):
            self._make_dev(self._group_node(addr), None)
        for spec in self.binding_nodes(drv, addr):
            if self.ready(spec):
                self.create_node(addr, spec)

    def unbind_blocks(self, drv: str, addr: str) -> bool:
        """True when ``drv``'s remove() would wait for the holders of the function's nodes:
        all of them for a driver that ``unbind_waits_for_holders``; else those of child nodes
        marked ``unbind_waits`` (an i2c adapter's ``/dev/i2c-N``: ``i2c_del_adapter`` waits
        for the adapter's last reference, which an open i2c-dev file holds)."""
        info = self.st["drivers"].get(drv, {})
        paths = ["/dev/" + children.fmt(self, addr, s["dev"])
                 for s in self.binding_nodes(drv, addr)
                 if s.get("unbind_waits") and children.present(self, addr, s)]
        if info.get("unbind_waits_for_holders"):
            paths += [s["path"] if s["kind"] == "dev" else f"/dev/{s['dev']}"
                      for s in self.binding_nodes(drv, addr)
                      if s["kind"] == "dev" or (s["kind"] == "class" and s.get("dev"))]
            paths += info.get("hold_nodes", [])
            if drv == "vfio-pci":
                paths.append(self._group_node(addr))
        return bool(paths) and self.held(self.node_ids(paths))

    def detach(self, drv: str, addr: str) -> None:
        """device_release_driver(): the driver's remove() tears down its nodes, then the links.
        Raises :class:`_Hang` when remove() would block."""
        if self.unbind_blocks(drv, addr):
            raise _Hang()
        for spec in reversed(self.binding_nodes(drv, addr)):
            if self._node_present(addr, spec):
                self.remove_node(addr, spec)
        d = self.dev_dir(addr)
        remove(self.root, f"{d}/driver")
        remove(self.root, f"/sys/bus/pci/drivers/{drv}/{addr}")
        self.st.get("vars", {}).pop(addr, None)
        if drv == "vfio-pci":
            group = self.st["devices"][addr]["group"]
            if not any(self.driver_of(a) == "vfio-pci" for a, i in self.st["devices"].items()
                       if i["group"] == group):
                self._drop_dev(self._group_node(addr))

    def probe(self, addr: str) -> None:
        """device_attach(): bind the first registered driver that matches, in registration
        order (bus_for_each_drv); none is fine."""
        if self.driver_of(addr):
            return
        override = self.override_of(addr)
        native = self.st["devices"][addr].get("native")
        order = self.st.get("pci_drivers") or ([native] if native else [])
        for drv in [override] if override is not None else order:
            if drv and self.driver_registered(drv) and self.matches(drv, addr):
                self.attach(drv, addr)
                return

    def pci_bind(self, drv: str, addr: str) -> None:
        """Write to ``drivers/DRV/bind``.

        :raises OSError: ``ENODEV`` (absent, no match), ``EBUSY`` (has a driver)."""
        if addr not in self.st["devices"] or not self.matches(drv, addr):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        if self.driver_of(addr):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        self.attach(drv, addr)

    def pci_unbind(self, drv: str, addr: str) -> None:
        """Write to ``drivers/DRV/unbind``.

        :raises OSError: ``ENODEV`` when ``addr`` is not bound to ``drv``; :class:`_Hang`."""
        if addr not in self.st["devices"] or self.driver_of(addr) != drv:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        self.detach(drv, addr)

    def register_pci_driver(self, drv: str, module: str | None) -> None:
        """pci_register_driver(): the driver directory, then probe every unbound function."""
        base = f"/sys/bus/pci/drivers/{drv}"
        mkdir(self.root, base)
        for attr in ("bind", "unbind", "new_id", "remove_id"):
            mkfile(self.root, f"{base}/{attr}", "", 0o200)
        mkfile(self.root, f"{base}/uevent", "", 0o200)
        if module:
            mklink(self.root, f"{base}/module", f"/sys/module/{module}")
            mklink(self.root, f"/sys/module/{module}/drivers/pci:{drv}", base)
        order = self.st.setdefault("pci_drivers", [])
        if drv not in order:
            order.append(drv)
        for addr in sorted(self.st["devices"]):
            if not self.driver_of(addr) and self.matches(drv, addr):
                self.attach(drv, addr)

    # ---- modules ---------------------------------------------------------------------------
    def modprobe(self, name: str) -> None:
        """Load module ``name`` (``-`` or ``_``) with its deps; no-op when loaded.

        :raises KmodError: an unknown module, or one whose init fails."""
        m = module_name(name)
        info = self.st["modules"].get(m)
        if info is None:
            raise KmodError(f"modprobe: FATAL: Module {name} not found in directory "
                            f"/lib/modules/{self.st.get('kernel', '6.1.0-sim')}")
        if self.loaded(m):
            return
        for dep in info.get("deps", []):
            self.modprobe(dep)
        base = f"/sys/module/{m}"
        mkdir(self.root, f"{base}/holders")
        mkfile(self.root, f"{base}/initstate", "live\n", 0o444)
        mkfile(self.root, f"{base}/refcnt", "0\n", 0o444)
        for dep in info.get("deps", []):
            mklink(self.root, f"/sys/module/{dep}/holders/{m}", base)
        for spec in info.get("nodes", []):
            self.create_node("", spec)
        for bus, drv in info.get("bus_drivers", []):
            children.register_bus_driver(self, m, bus, drv)
        # nodes of drivers already bound that this module provides (nvidia_drm -> card0,
        # usbhid -> the HID devices of the USB keyboards found)
        for drv, per in self.st.get("driver_nodes", {}).items():
            for addr, specs in per.items():
                if self.driver_of(addr) == drv:
                    for spec in specs:
                        if (m in children.requires_of(spec) and self.ready(spec)
                                and not self._node_present(addr, spec)):
                            self.create_node(addr, spec)
        if info.get("pci_driver"):
            self.register_pci_driver(info["pci_driver"], m)
            drv = info["pci_driver"]
            if info.get("needs_device") and not any(
                    self.driver_of(a) == drv for a in self.st.get("devices", {})):
                # the proprietary nvidia module's init fails when it probed no GPU
                # ("NVRM: No NVIDIA devices probed", nv.c returns -ENODEV), e.g. while the
                # GPU is still on vfio-pci
                self.rmmod(m)
                raise KmodError(f"modprobe: ERROR: could not insert '{m}': No such device")

    def rmmod(self, name: str) -> None:
        """Unload module ``name`` only.

        :raises KmodError: with kmod's message; :class:`_Hang`."""
        m = module_name(name)
        info = self.st["modules"].get(m)
        if info is None or not self.loaded(m):
            raise KmodError(f"rmmod: ERROR: Module {m} is not currently loaded")
        if info.get("builtin"):
            raise KmodError(f"rmmod: ERROR: Module {m} is builtin.")
        holders = sorted(os.listdir(self.r(f"/sys/module/{m}/holders")))
        if holders:
            raise KmodError(f"rmmod: ERROR: Module {m} is in use by: {' '.join(holders)}")
        if self.pinned_count(m):
            raise KmodError(f"rmmod: ERROR: Module {m} is in use")
        drv = info.get("pci_driver")
        if drv:
            bound = [a for a in sorted(self.st["devices"]) if self.driver_of(a) == drv]
            if any(self.unbind_blocks(drv, a) for a in bound):
                raise _Hang()
            for addr in bound:
                self.detach(drv, addr)
            remove(self.root, f"/sys/bus/pci/drivers/{drv}")
            if drv in self.st.get("pci_drivers", []):
                self.st["pci_drivers"].remove(drv)
        for d, per in self.st.get("driver_nodes", {}).items():
            for addr, specs in per.items():
                if self.driver_of(addr) != d:
                    continue
                for spec in reversed(specs):
                    if m in children.requires_of(spec) and self._node_present(addr, spec):
                        self.remove_node(addr, spec)
        for bus, drv in info.get("bus_drivers", []):
            children.unregister_bus_driver(self, bus, drv)
        for spec in reversed(info.get("nodes", [])):
            self.remove_node("", spec)
        for dep in info.get("deps", []):
            remove(self.root, f"/sys/module/{dep}/holders/{m}")
        remove(self.root, f"/sys/module/{m}")

    # ---- the write dispatcher ------------------------------------------------------------
    @staticmethod
    def classify(rp: str) -> tuple[str, tuple]:
        """Kind of the sysfs attribute at resolved host path ``rp`` and its parameters; the
        kind names the latency key in :mod:`testbed.sim.faults` (``plain`` has none)."""
        if rp == "/sys/bus/pci/drivers_probe":
            return "drivers_probe", ()
        m = re.fullmatch(r"/sys/bus/pci/drivers/([^/]+)/(bind|unbind)", rp)
        if m:
            return m.group(2), (m.group(1),)
        m = re.fullmatch(r"/sys/devices/pci[^/]+/(?:[^/]+/)*([^/]+)/driver_override", rp)
        if m and _PCI_ADDR.match(m.group(1)):
            return "driver_override", (m.group(1),)
        m = re.fullmatch(r"/sys/devices/pci[^/]+/(?:[^/]+/)*([^/]+)/rom", rp)
        if m and _PCI_ADDR.match(m.group(1)):
            return "rom", (m.group(1),)   # testbed.sim.rom
        m = re.fullmatch(r"/sys/devices/virtual/vtconsole/(vtcon\d+)/bind", rp)
        if m:
            return "vtcon_bind", (m.group(1),)
        m = re.fullmatch(r"/sys/bus/platform/drivers/([^/]+)/(bind|unbind)", rp)
        if m:
            return f"fb_{m.group(2)}", (m.group(1),)
        from . import hugepages   # the hugepage pools: testbed.sim.hugepages
        return hugepages.classify(rp) or ("plain", ())

    def write(self, rp: str, data: str) -> None:
        """Apply a write of ``data`` to the resolved host path ``rp``."""
        path = self.r(rp)
        if not os.path.lexists(path):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), rp)
        kind, args = self.classify(rp)
        name = data[:-1] if data.endswith("\n") else data  # sysfs_streq(): one newline
        if kind == "driver_override":
            value = data.split("\n", 1)[0]  # driver_set_override() cuts at the newline
            mkfile(self.root, rp, (value or "(null)") + "\n", 0o644)
        elif kind == "bind":
            self.pci_bind(args[0], name)
            self.refresh_refcnts()
        elif kind == "unbind":
            self.pci_unbind(args[0], name)
            self.refresh_refcnts()
        elif kind == "drivers_probe":
            if name not in self.st["devices"]:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
            self.probe(name)
            self.refresh_refcnts()
        elif kind == "vtcon_bind":
            try:
                value = int(name.strip() or "0", 0)
            except ValueError:
                value = 0
            self.vtcon_bind(args[0], bool(value))
        elif kind == "fb_bind":
            self.platform_bind(args[0], name)
        elif kind == "fb_unbind":
            self.platform_unbind(args[0], name)
        elif kind == "rom":
            from . import rom
            rom.write(self.root, args[0], data)
        elif cpus.handles(rp):   # cpufreq: testbed.sim.cpus
            cpus.write(self.root, rp, data)
        elif kind in ("hugepages_nr", "compact_memory"):
            from . import hugepages
            hugepages.write(self, kind, args, data)
        else:
            st = os.stat(path)
            if not st.st_mode & 0o222:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), rp)
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, data.encode())
            finally:
                os.close(fd)


class SimHost(Host):
    """The :class:`~vfio_hookd.host.Host` of a simulated host directory (one holding
    ``.sim/state.json``, built by :mod:`testbed.sim.hosts`).

    Only the places where the product meets the kernel and kmod are replaced:
    :meth:`_write_now` (one ``write(2)`` to a sysfs attribute), :meth:`_read_bytes_now` (a
    binary read; a function's ``rom`` is answered by :mod:`testbed.sim.rom`) and
    :meth:`run_command` (a ``modprobe NAME`` / ``rmmod NAME`` command); they are answered under
    the kernel lock. Everything else (text reads, deadlines, turning exit statuses into errors)
    is the product's own :class:`~vfio_hookd.host.Host` code.

    Before each operation the fault rules of :mod:`testbed.sim.faults` are consulted (op
    ``write`` with the host path as given and as resolved, ``modprobe``/``rmmod`` with the module
    name as given and canonical): ``fail`` raises ``OSError(errno)`` for a write and makes the
    command exit 1 with kmod's message for a module; ``hang`` blocks so the caller's deadline
    fires. Then the configured latency (s) for the operation is slept: the only sleep,
    modelling the kernel's time.

    :param root: the simulated host directory (str).
    :param proc: process table scanned for holders of the simulated nodes (real processes).
    :raises ValueError: ``root`` holds no ``.sim/state.json``.
    """

    def __init__(self, root: str, proc: str = "/proc"):
        super().__init__(root, proc)
        if not os.path.isfile(os.path.join(self.root, ".sim", "state.json")):
            raise ValueError(f"{root} is not a simulated host (no .sim/state.json)")

    def _fault(self, op: str, targets: list[str]) -> dict | None:
        for t in dict.fromkeys(targets):
            rule = faults.match(self.root, op, t)
            if rule:
                return rule
        return None

    def _latency(self, key: str) -> None:
        delay = faults.latency(self.root, key)
        if delay > 0:
            time.sleep(delay)  # the kernel's time for this operation (the one allowed sleep)

    def _write_now(self, p: str, data: str) -> None:
        """One write of ``data`` to host path ``p``, answered like the kernel.

        :raises OSError: the kernel's errno (``ENODEV``, ``EBUSY``, ``ENOENT``, ...) or the
            injected one. Blocks for good where the kernel would (the product's deadline
            thread is abandoned then).
        """
        try:
            rp = Kernel(self.root, {}, self.proc).resolve(p)
        except OSError:
            rp = p
        rule = self._fault("write", [p, rp])
        if rule and rule["action"] == "stall":
            time.sleep(float(rule.get("seconds") or 0))   # the kernel's time (a stalled unbind)
            rule = None
        if rule:
            if rule["action"] == "hang":
                _hang()
            code = int(rule.get("errno") or errno.EIO)
            raise OSError(code, os.strerror(code), p)
        kind, _ = Kernel.classify(rp)
        if kind != "plain":
            self._latency(kind)
        try:
            with locked_kernel(self.root, self.proc) as k:
                k.write(rp, data)
        except _Hang:
            _hang()

    def _read_bytes_now(self, p: str, limit: int) -> bytes:
        """One binary read of host path ``p``: a function's ``rom`` is answered by
        :mod:`testbed.sim.rom` (``EINVAL`` until enabled, the valid images only, ``EIO`` when
        none); any other file is read as it is."""
        try:
            rp = Kernel(self.root, {}, self.proc).resolve(p)
        except OSError:
            rp = p
        kind, args = Kernel.classify(rp)
        if kind != "rom":
            return super()._read_bytes_now(p, limit)
        from . import rom
        with locked_kernel(self.root, self.proc):
            return rom.read(self.root, args[0], limit)

    def run_command(self, argv: list[str], timeout_s: float) -> tuple[int, str]:
        """Emulate ``modprobe NAME`` (load NAME and its dependencies, probe its PCI driver's
        functions) and ``rmmod NAME`` (unload NAME only; its PCI driver's functions are
        unbound): ``(exit status, stderr text)`` as kmod gives them, e.g. ``(1, "rmmod:
        ERROR: Module nvidia is in use by: nvidia_modeset")`` or ``(1, "modprobe: FATAL:
        Module x not found in directory /lib/modules/6.1.0-sim")``.

        :raises TimeoutError: it has not finished within ``timeout_s`` (s): a hang fault, or
            a module whose unbind blocks (:func:`vfio_hookd.deadline.run_with_deadline`).
        :raises OSError: ``ENOENT`` for any other command (the simulated host has no others).
        """
        if len(argv) != 2 or argv[0] not in ("modprobe", "rmmod"):
            raise OSError(errno.ENOENT, "the simulated host runs only 'modprobe NAME' and "
                          "'rmmod NAME'", " ".join(argv))
        cmd, name = argv

        def run() -> tuple[int, str]:
            rule = self._fault(cmd, [name, module_name(name)])
            if rule:
                if rule["action"] == "hang":
                    _hang()
                why = os.strerror(int(rule.get("errno") or errno.EIO))
                if cmd == "modprobe":
                    return 1, f"modprobe: ERROR: could not insert '{module_name(name)}': {why}\n"
                return 1, f"rmmod: ERROR: could not remove module {module_name(name)}: {why}\n"
            self._latency(cmd)
            try:
                with locked_kernel(self.root, self.proc) as k:
                    getattr(k, cmd)(name)
                    k.refresh_refcnts()
            except KmodError as exc:
                return exc.status, exc.text + "\n"
            except _Hang:
                _hang()
            return 0, ""

        return run_with_deadline(run, timeout_s, " ".join(argv))
