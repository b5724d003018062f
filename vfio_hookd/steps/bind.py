"""The bind_vfio step: every function onto vfio-pci with ``driver_override``."""

from __future__ import annotations

from .. import errors, pci as pcimod
from ..errors import HookdError
from ..pci import VFIO_DRIVER, bind_with_driver_override, current_driver
from .base import Context, Shape, Step, pci

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
        skipped = [f"{a} already on vfio-pci: left as it is, not given back on release"
                   for a in ctx.devices if ctx.drivers.get(a) == VFIO_DRIVER]
        return {"plan": plan, "skipped": skipped} if skipped else {"plan": plan}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        host = ctx.host
        timeout = ctx.deadlines.unbind
        if not pcimod.driver_registered(host, VFIO_DRIVER):
            host.modprobe("vfio-pci", ctx.deadlines.module_load)
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

    def max_apply_s(self, profile, shape: Shape) -> float:
        """``modprobe vfio-pci``, then per function the ``driver_override``, ``unbind`` and
        ``drivers_probe`` writes, each up to ``deadlines.unbind``."""
        d = profile.deadlines
        return d.module_load + 3 * shape.devices * d.unbind

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """Per function given back: the same three writes."""
        n = shape.devices if facts is None else len(self.undo_items(facts))
        return 3 * n * deadlines.unbind

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
                                                ctx.deadlines.unbind)
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
