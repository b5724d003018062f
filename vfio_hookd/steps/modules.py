"""The modules step: unload the GPU's driver modules, holders first."""

from __future__ import annotations

from .. import errors, pci as pcimod
from ..errors import HookdError
from ..pci import (VFIO_DRIVER, current_driver, module_of_driver, never_unload_reason,
                   unload_order)
from .base import Context, Shape, Step, _write

class Modules(Step):
    """Unload the GPU's driver modules in dependency order (holders first), e.g. ``nvidia_drm
    nvidia_modeset nvidia_uvm nvidia``. ``modules: auto`` starts from the functions' drivers
    before prepare and unloads a module only when every device it drives is handed over
    (:func:`vfio_hookd.pci.unload_plan`); an explicit list is unloaded as given, ordered by dependency. Built-ins
    (no ``/sys/module/M/refcnt``) are skipped; vfio-pci and snd_hda_intel never unloaded.
    Undo loads them again, last unloaded first; a PCI driver binds the functions it finds
    unbound when it registers, and undo then checks that every function that had a driver
    before prepare and is no longer on vfio-pci has it again (probing once more if needed).
    Facts: ``{"plan": [modules], "why": {module: reason taken or kept}, "done": [...]}``.
    """
    name = "modules"

    def observe(self, ctx: Context) -> dict:
        mods = ctx.profile.modules
        if mods == "auto":
            # The functions' drivers' modules, and those of drivers bound to their child
            # devices (virtio-vga's virtio_gpu on virtio0; an xHCI function's root hubs on
            # usbcore), but not under a driver we never unload: snd_hda_intel's codec children
            # serve the onboard audio too. unload_plan keeps every module that also drives a
            # device not handed over (a bus driver such as virtio-pci, which also carries the
            # disks; usbcore and xhci_hcd while the host's own USB controller runs).
            roots = [module_of_driver(ctx.host, d) for d in ctx.drivers.values()
                     if d and d != VFIO_DRIVER]
            roots += [m for addr, mods in ctx.child_modules.items() for m in mods
                      if not never_unload_reason(
                          module_of_driver(ctx.host, ctx.drivers.get(addr) or ""))]
            plan, why = pcimod.unload_plan(ctx.host, roots, ctx.devices)
            return {"plan": plan, "why": why}
        return {"plan": unload_order(ctx.host, list(mods)),
                "why": {m: "listed in the profile" for m in mods}}

    #: The most modules ``modules: auto`` unloads for one GPU, for the declared deadline
    #: (NVIDIA: nvidia_drm nvidia_modeset nvidia_uvm nvidia, plus the holders' helpers).
    MAX_AUTO_MODULES = 8

    @classmethod
    def count(cls, profile) -> int:
        """The most modules this step may unload for ``profile``."""
        return cls.MAX_AUTO_MODULES if profile.modules == "auto" else len(profile.modules)

    def max_apply_s(self, profile, shape: Shape) -> float:
        """One unload per module, each up to ``deadlines.module_unload``."""
        return shape.modules * profile.deadlines.module_unload

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """One ``modprobe`` per unloaded module (``deadlines.module_load``), then a
        ``drivers_probe`` write per function that lost its driver (``deadlines.unbind``)."""
        n = shape.modules if facts is None else len(self.undo_items(facts))
        return n * deadlines.module_load + shape.devices * deadlines.unbind

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        for mod in facts["plan"]:
            if ctx.host.module_loaded(mod):
                facts["done"].append(mod)
                ctx.host.rmmod(mod, ctx.deadlines.module_unload)

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        host = ctx.host
        for mod in reversed(self.undo_items(facts)):
            if not host.module_loaded(mod):
                host.modprobe(mod, ctx.deadlines.module_load)
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
