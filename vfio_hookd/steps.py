"""The steps that take a host into passthrough state and back.

Each step is a small class with three methods, in the manner of tuned's plugins
(apply / verify / unapply), but with the observed facts written to the VM's record:

- ``observe(ctx) -> facts``: read what the step will change (no writes). ``facts`` is a JSON-able
  dict; it holds ``plan`` (what apply will change) and is saved in the record *before* apply.
- ``apply(ctx, facts)``: make the change; appends what it actually changed to ``facts["done"]``
  *before* each change, so a failure half-way through is undone exactly (undo of an item
  is idempotent: an item whose change did not happen is already in its original state). Already in the target state
  counts as success (nothing is appended).
- ``undo(ctx, facts) -> notes``: undo what ``facts["done"]`` lists (or, after a crash mid-apply,
  what ``facts["plan"]`` lists, each item idempotently). Returns notes (list of str) about
  expected differences; raises :class:`HookdError` on failure.

Order on prepare (release is the reverse): units, holders, vtconsoles, framebuffer, modules,
bind_vfio. The GPU's modules go before the bind: with nvidia_drm/nvidia_modeset loaded, nvkms
holds the GPU inside the kernel and an unbind of nvidia can block for good; and on release the
proprietary nvidia module refuses to load (ENODEV) while its GPU is still on vfio-pci, so the
functions are given back first and the modules loaded after (they bind what they find).
Kernel interfaces: ``Documentation/ABI/testing/sysfs-bus-pci``,
``Documentation/driver-api/console.rst``, ``Documentation/ABI/stable/sysfs-module``,
``drivers/video/aperture.c`` (firmware framebuffer removal); FIELD-NOTES §2, §3.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import errors, pci as pcimod
from .errors import HookdError
from .host import Host
from .pci import (VFIO_DRIVER, bind_with_driver_override, child_modules, current_driver,
                  device_nodes, module_of_driver, never_unload_reason, unload_order)

FIRMWARE_FRAMEBUFFERS = ("efi-framebuffer.0", "simple-framebuffer.0", "vesa-framebuffer.0")
pci = pcimod.path


@dataclass
class Context:
    """What a step works with.

    :param vm: domain name.
    :param host: the host access layer.
    :param profile: the :class:`vfio_hookd.profile.Profile` in force.
    :param devices: PCI addresses of the functions to hand over, e.g. ``("0000:01:00.0",)``.
    :param drivers: each function's driver before prepare (``None``: unbound).
    :param systemd: zero-argument callable returning a :class:`vfio_hookd.systemd.Systemd`
        (connected on first use).
    :param log: a logger; steps log with ``extra={"STEP": name}`` added by the machine.
    :param child_modules: per function, the modules of drivers bound to its child devices
        before prepare (e.g. ``{"0000:00:02.0": ["virtio_gpu"]}``; see :func:`child_modules`).
    """
    vm: str
    host: Host
    profile: Any
    devices: tuple[str, ...]
    drivers: dict[str, str | None]
    systemd: Callable[[], Any]
    log: logging.LoggerAdapter | logging.Logger = field(default_factory=lambda: logging.getLogger("vfio_hookd"))
    child_modules: dict[str, list[str]] = field(default_factory=dict)


def _write(ctx: Context, path: str, data: str, code: str, what: str) -> None:
    pcimod.write_attr(ctx.host, path, data, ctx.profile.deadlines.unbind, code, what)


class Step:
    """Base class. ``name`` (str) is the step's name in records and logs (``STEP=``)."""
    name = "step"

    def observe(self, ctx: Context) -> dict:
        raise NotImplementedError

    def apply(self, ctx: Context, facts: dict) -> None:
        raise NotImplementedError

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def undo_items(facts: dict) -> list:
        """What to undo: ``done`` when apply recorded it, else the whole ``plan`` (crash mid-apply)."""
        return list(facts["done"]) if "done" in facts else list(facts.get("plan", []))


class Units(Step):
    """Stop the display manager and the profile's ``stop_units`` over systemd's D-Bus API.

    ``display_manager: auto`` resolves ``display-manager.service`` (systemd.special(7)) to the
    real unit; absent alias = a host without a display manager, nothing to stop. Each stop waits
    for the job's ``JobRemoved`` with ``deadlines.unit_stop``. Undo starts again, last to first,
    only the units that were active, and starts nothing while the system shuts down
    (``Manager.SystemState == "stopping"``; tuned's ``_full_rollback_required``).
    Facts: ``{"plan": [unit ids active before], "done": [...], "skipped": [...]}``.
    """
    name = "units"

    def observe(self, ctx: Context) -> dict:
        prof = ctx.profile
        wanted: list[str] = []
        skipped: list[str] = []
        sd = None
        if prof.display_manager is not None or prof.stop_units:
            sd = ctx.systemd()
        if prof.display_manager == "auto":
            try:
                wanted.append(sd.resolve("display-manager.service"))
            except HookdError as exc:
                if exc.code != errors.UNIT_FAILED:
                    raise
                skipped.append("display-manager.service (no such unit: no display manager)")
        elif prof.display_manager is not None:
            wanted.append(sd.resolve(prof.display_manager))
        for unit in prof.stop_units:
            wanted.append(sd.resolve(unit))
        plan = []
        for unit in dict.fromkeys(wanted):
            if sd.active_state(unit) in ("active", "activating", "reloading"):
                plan.append(unit)
            else:
                skipped.append(f"{unit} (not active)")
        return {"plan": plan, "skipped": skipped}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        for unit in facts["plan"]:
            facts["done"].append(unit)
            ctx.systemd().stop(unit, ctx.profile.deadlines.unit_stop)

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        units = self.undo_items(facts)
        if not units:
            return []
        sd = ctx.systemd()
        if sd.shutting_down():
            return [f"system is shutting down: not starting {', '.join(units)}"]
        failures = []
        for unit in reversed(units):
            if sd.active_state(unit) == "active":
                continue
            try:
                sd.start(unit, ctx.profile.deadlines.unit_start)
            except HookdError as exc:
                failures.append(exc)
        if failures:
            raise HookdError(failures[0].code, "; ".join(e.message for e in failures))
        return []


class Holders(Step):
    """Deal with processes that still hold the GPU's device nodes once the units are stopped.

    ``on_busy: fail`` refuses with ``DEVICE_BUSY`` listing PID, command and node, after giving
    the holders up to :attr:`GRACE_S` (or ``deadlines.terminate`` if shorter) to exit on their
    own (the session of a display manager that was just stopped may still be ending);
    ``on_busy: terminate`` sends SIGTERM, then SIGKILL after ``deadlines.terminate`` s.
    Unbinding a GPU someone holds can block the kernel forever (NVIDIA) or leave a stale
    DRM node (FIELD-NOTES §2), so this is checked before any unbind. Undo: ended processes
    are not restarted (the units step restarts what systemd owns).
    Facts: ``{"plan": [nodes], "terminated": [holder dicts]}``.
    """
    name = "holders"
    GRACE_S = 2.0

    def observe(self, ctx: Context) -> dict:
        nodes: list[str] = []
        for addr in ctx.devices:
            nodes.extend(device_nodes(ctx.host, addr))
        return {"plan": list(dict.fromkeys(nodes)), "terminated": []}

    def apply(self, ctx: Context, facts: dict) -> None:
        from . import procs
        holders = procs.find_holders(ctx.host, facts["plan"])
        if holders and ctx.profile.on_busy != "terminate":
            # processes of the session that was just stopped may still be on their way out
            deadline = time.monotonic() + min(ctx.profile.deadlines.terminate, self.GRACE_S)
            for pid in sorted({h.pid for h in holders}):
                procs.wait_gone(pid, max(0.0, deadline - time.monotonic()))
            holders = procs.find_holders(ctx.host, facts["plan"])
        if not holders:
            return
        listing = "; ".join(str(h) for h in holders)
        if ctx.profile.on_busy != "terminate":
            raise HookdError(errors.DEVICE_BUSY,
                             f"{listing}. Stop them, add their unit to stop_units, or set "
                             f"on_busy: terminate", {"holders": [h.to_dict() for h in holders]})
        pids = sorted({h.pid for h in holders})
        ctx.log.warning("terminating GPU holders: %s", listing)
        facts["terminated"] = [h.to_dict() for h in holders]
        left = procs.terminate(pids, ctx.profile.deadlines.terminate)
        if left:
            raise HookdError(errors.DEVICE_BUSY,
                             f"PIDs {', '.join(map(str, left))} did not end after SIGKILL "
                             f"within {ctx.profile.deadlines.terminate:g} s",
                             {"holders": [h.to_dict() for h in holders if h.pid in left]})

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        if facts.get("terminated"):
            return ["terminated processes are not restarted: " + ", ".join(
                f"PID {h['pid']} ({h['command']})" for h in facts["terminated"])]
        return []


class Vtconsoles(Step):
    """Unbind the frame-buffer vtconsoles (``/sys/class/vtconsole/vtconN/bind``; those whose
    ``name`` contains "frame buffer"), reading ``bind`` back because the kernel reports
    success even when it did nothing (Documentation/driver-api/console.rst). Undo rebinds only
    those that were bound. Facts: ``{"plan": ["vtcon1"], "done": [...]}``.
    """
    name = "vtconsoles"
    BASE = "/sys/class/vtconsole"

    def observe(self, ctx: Context) -> dict:
        plan = []
        if ctx.profile.vtconsoles:
            for vt in ctx.host.listdir(self.BASE):
                name = ctx.host.read_or(f"{self.BASE}/{vt}/name", "") or ""
                if "frame buffer" in name and ctx.host.read_or(f"{self.BASE}/{vt}/bind") == "1":
                    plan.append(vt)
        return {"plan": plan}

    def _set(self, ctx: Context, vt: str, value: str) -> None:
        path = f"{self.BASE}/{vt}/bind"
        _write(ctx, path, value, errors.VTCONSOLE_FAILED, vt)
        now = ctx.host.read_or(path)
        if now != value:
            raise HookdError(errors.VTCONSOLE_FAILED,
                             f"{vt}: bind reads {now!r} after writing {value!r} (a VT still in "
                             f"graphics mode? the display server must be stopped first)")

    def _bound(self, ctx: Context) -> set[str]:
        return {vt for vt in ctx.host.listdir(self.BASE)
                if ctx.host.read_or(f"{self.BASE}/{vt}/bind") == "1"}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        facts["took_over"] = {}
        for vt in facts["plan"]:
            facts["done"].append(vt)
            before = self._bound(ctx)
            self._set(ctx, vt, "0")
            facts["took_over"][vt] = sorted(self._bound(ctx) - before)

    def _rebind(self, ctx: Context, vt: str, takers: list[str]) -> None:
        """Bind ``vt`` again. Writing 1 to its ``bind`` only takes consoles from the boot
        console driver (vgacon); once a DRM driver has evicted vgacon (vgaarb: "deactivate vga
        console"), the consoles went to dummycon, and a 1 is silently ignored (seen on Linux
        6.1 in a QEMU guest). Unbinding the console driver that took over when ``vt`` was
        unbound (dummycon) hands the consoles back to ``vt``."""
        path = f"{self.BASE}/{vt}/bind"
        _write(ctx, path, "1", errors.VTCONSOLE_FAILED, vt)
        if ctx.host.read_or(path) == "1":
            return
        for other in takers:
            if other != vt and ctx.host.read_or(f"{self.BASE}/{other}/bind") == "1":
                _write(ctx, f"{self.BASE}/{other}/bind", "0", errors.VTCONSOLE_FAILED, other)
        now = ctx.host.read_or(path)
        if now != "1":
            raise HookdError(errors.VTCONSOLE_FAILED,
                             f"{vt}: bind reads {now!r} after writing '1'"
                             + (f" and unbinding {', '.join(takers)}" if takers else ""))

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        notes = []
        for vt in reversed(self.undo_items(facts)):
            if not ctx.host.exists(f"{self.BASE}/{vt}"):
                notes.append(f"{vt} no longer exists")
                continue
            if ctx.host.read_or(f"{self.BASE}/{vt}/bind") != "1":
                takers = facts.get("took_over", {}).get(vt)
                if takers is None:   # record from before apply finished: the usual taker
                    takers = [o for o in ctx.host.listdir(self.BASE)
                              if "dummy device" in (ctx.host.read_or(f"{self.BASE}/{o}/name") or "")]
                self._rebind(ctx, vt, takers)
        return notes


class Framebuffer(Step):
    """Unbind the firmware framebuffer (efi-, simple- or vesa-framebuffer platform device) from
    its driver; absent is fine. Since Linux 6.0 the kernel removes that device when a driver
    (vfio-pci or the native one) takes the boot VGA function (drivers/video/aperture.c), so a
    device gone at undo is reported as expected, not as a failure: the console comes back
    through the native driver's fbdev.
    Facts: ``{"plan": [[device, driver]], "done": [...]}``.
    """
    name = "framebuffer"
    DEVS = "/sys/bus/platform/devices"
    DRVS = "/sys/bus/platform/drivers"

    def observe(self, ctx: Context) -> dict:
        plan = []
        if ctx.profile.framebuffer:
            for dev in FIRMWARE_FRAMEBUFFERS:
                drv = ctx.host.link_name(f"{self.DEVS}/{dev}/driver")
                if drv:
                    plan.append([dev, drv])
        return {"plan": plan}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        for dev, drv in facts["plan"]:
            facts["done"].append([dev, drv])
            _write(ctx, f"{self.DRVS}/{drv}/unbind", dev, errors.FRAMEBUFFER_FAILED, dev)
            if ctx.host.link_name(f"{self.DEVS}/{dev}/driver"):
                raise HookdError(errors.FRAMEBUFFER_FAILED, f"{dev} is still bound to {drv}")

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        notes = []
        for dev, drv in reversed(self.undo_items(facts)):
            if not ctx.host.exists(f"{self.DEVS}/{dev}"):
                notes.append(f"{dev} was removed by the kernel when a driver took the boot GPU "
                             f"(expected since Linux 6.0; the console returns through the "
                             f"GPU driver's framebuffer)")
                continue
            if ctx.host.link_name(f"{self.DEVS}/{dev}/driver") == drv:
                continue
            _write(ctx, f"{self.DRVS}/{drv}/bind", dev, errors.FRAMEBUFFER_FAILED, dev)
            if ctx.host.link_name(f"{self.DEVS}/{dev}/driver") != drv:
                raise HookdError(errors.FRAMEBUFFER_FAILED, f"{dev} did not bind back to {drv}")
        return notes


class BindVfio(Step):
    """Bind every function to vfio-pci: load vfio-pci, then per function write ``vfio-pci`` to
    ``driver_override``, the address to ``driver/unbind`` and to ``/sys/bus/pci/drivers_probe``,
    and check the ``driver`` link (sysfs-bus-pci; libvirt's ``virPCIDeviceBindToStub``). Never
    ``new_id`` (driver-wide). Undo gives each function back to the driver it had: restore
    ``driver_override``, unbind from vfio-pci, probe, check the link. When that driver's module
    is not loaded yet (the modules step unloaded it, and its undo comes next) the function is
    left unbound for it: loading the module binds it, and the modules step checks the link.
    A function already on vfio-pci is left alone and not given back.
    Facts: ``{"plan": [{"address", "driver", "override"}], "done": [addresses]}``.
    """
    name = "bind_vfio"

    def observe(self, ctx: Context) -> dict:
        plan = []
        for addr in ctx.devices:
            override = ctx.host.read_or(pci(addr, "driver_override"), "(null)")
            plan.append({"address": addr, "driver": ctx.drivers.get(addr),
                         "override": None if override in ("(null)", "") else override})
        return {"plan": plan}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        host = ctx.host
        timeout = ctx.profile.deadlines.unbind
        if not pcimod.driver_registered(host, VFIO_DRIVER):
            host.modprobe("vfio-pci", ctx.profile.deadlines.module_load)
        for item in facts["plan"]:
            addr = item["address"]
            if current_driver(host, addr) == VFIO_DRIVER:
                continue
            facts["done"].append(addr)
            now = bind_with_driver_override(host, addr, VFIO_DRIVER, VFIO_DRIVER, timeout)
            if now != VFIO_DRIVER:
                raise HookdError(errors.BIND_FAILED,
                                 f"{addr}: driver after drivers_probe is {now or 'none'}, "
                                 f"expected {VFIO_DRIVER}")
        for group in sorted({host.link_name(pci(a, "iommu_group")) for a in ctx.devices} - {None}):
            if not host.exists(f"/dev/vfio/{group}"):
                raise HookdError(errors.BIND_FAILED, f"/dev/vfio/{group} did not appear after "
                                                     f"binding IOMMU group {group} to vfio-pci")

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        host = ctx.host
        by_addr = {item["address"]: item for item in facts["plan"]}
        failures = []
        notes: list[str] = []
        for addr in reversed(self.undo_items(facts)):
            item = by_addr[addr if isinstance(addr, str) else addr["address"]]
            addr, orig = item["address"], item["driver"]
            try:
                now = bind_with_driver_override(host, addr, item["override"], orig,
                                                ctx.profile.deadlines.unbind)
                if orig and now is None and not pcimod.driver_registered(host, orig):
                    notes.append(f"{addr} left unbound until its driver {orig} is loaded "
                                 f"again by the modules step")
                    continue
                if now != orig:
                    raise HookdError(errors.BIND_FAILED,
                                     f"{addr}: driver is {now or 'none'} after giving it back, "
                                     f"expected {orig or 'none'}")
            except HookdError as exc:
                failures.append(exc)
        if failures:
            raise HookdError(errors.BIND_FAILED, "; ".join(e.message for e in failures))
        return notes


class Modules(Step):
    """Unload the GPU's driver modules in dependency order (holders first), e.g. ``nvidia_drm
    nvidia_modeset nvidia_uvm nvidia``. ``modules: auto`` starts from the functions' drivers
    before prepare; an explicit list is unloaded as given, ordered by dependency. Built-ins
    (no ``/sys/module/M/refcnt``) are skipped; vfio-pci and snd_hda_intel never unloaded.
    Undo loads them again, last unloaded first; a PCI driver binds the functions it finds
    unbound when it registers, and undo then checks that every function that had a driver
    before prepare and is no longer on vfio-pci has it again (probing once more if needed).
    Facts: ``{"plan": [modules], "done": [...]}``.
    """
    name = "modules"

    def observe(self, ctx: Context) -> dict:
        mods = ctx.profile.modules
        if mods == "auto":
            # A PCI driver that still drives other functions once ours are on vfio-pci is a
            # bus driver (virtio-pci under virtio-vga: its module also carries the disks and
            # 9p shares); unloading it would take them away. Seen in a QEMU guest, Linux 6.1.
            roots = [module_of_driver(ctx.host, d) for d in ctx.drivers.values()
                     if d and d != VFIO_DRIVER
                     and not pcimod.other_functions_of(ctx.host, d, ctx.devices)]
            # modules of drivers bound to child devices (virtio-vga's virtio_gpu on virtio0),
            # but not under a driver we never unload: snd_hda_intel's codec children
            # (snd_hda_codec_*) serve the onboard audio too and stay in use while it is loaded
            roots += [m for addr, mods in ctx.child_modules.items() for m in mods
                      if not never_unload_reason(
                          module_of_driver(ctx.host, ctx.drivers.get(addr) or ""))]
            plan = unload_order(ctx.host, roots, with_holders=True)
        else:
            plan = unload_order(ctx.host, list(mods), with_holders=False)
        return {"plan": plan}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        for mod in facts["plan"]:
            if ctx.host.module_loaded(mod):
                facts["done"].append(mod)
                ctx.host.rmmod(mod, ctx.profile.deadlines.module_unload)

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        host = ctx.host
        for mod in reversed(self.undo_items(facts)):
            if not host.module_loaded(mod):
                host.modprobe(mod, ctx.profile.deadlines.module_load)
        wrong = []
        for addr, orig in ctx.drivers.items():
            now = current_driver(host, addr)
            if not orig or orig == VFIO_DRIVER or now in (orig, VFIO_DRIVER):
                continue   # on vfio-pci: bind_vfio's undo failed and said so
            if now is None and host.exists(f"/sys/bus/pci/drivers/{orig}"):
                _write(ctx, "/sys/bus/pci/drivers_probe", addr, errors.BIND_FAILED, addr)
                now = current_driver(host, addr)
            if now != orig:
                wrong.append(f"{addr} is on {now or 'no driver'}, expected {orig}")
        if wrong:
            raise HookdError(errors.BIND_FAILED, "after loading the modules: " + "; ".join(wrong))
        return []


#: The steps in prepare order.
STEPS: tuple[Step, ...] = (Units(), Holders(), Vtconsoles(), Framebuffer(), Modules(), BindVfio())
STEP_NAMES = tuple(s.name for s in STEPS)
