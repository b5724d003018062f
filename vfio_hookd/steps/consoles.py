"""The vtconsoles and framebuffer steps: the consoles that draw on the GPU."""

from __future__ import annotations

from .. import errors
from ..errors import HookdError
from ..pci import FIRMWARE_FRAMEBUFFERS, shows_boot_display
from .base import Context, Shape, Step, _write

#: Why the console steps leave a host alone whose boot display is not handed over.
NOT_BOOT_DISPLAY = ("no function handed over shows the boot display: the consoles and the "
                    "firmware framebuffer stay on the GPU that shows them")
#: The VGA text console driver's name in ``/sys/class/vtconsole/vtconN/name`` (vgacon.c).
VGACON = "VGA+"

class Vtconsoles(Step):
    """Unbind the frame-buffer vtconsoles (``/sys/class/vtconsole/vtconN/bind``; those whose
    ``name`` contains "frame buffer"), reading ``bind`` back because the kernel reports
    success even when it did nothing (Documentation/driver-api/console.rst). Undo rebinds only
    those that were bound. Only when the boot display is handed over
    (:func:`vfio_hookd.pci.shows_boot_display`): on a two-GPU host the consoles stay on the
    other GPU. A VGA text console (vgacon, ``(S) VGA+``, BIOS boots with ``nomodeset``) on the
    boot GPU is recorded: the kernel's VGA arbiter removes it when vfio-pci takes that GPU
    ("vgaarb: deactivate vga console") and it does not come back; undo says so, or rebinds it
    if the kernel still offers it. Facts: ``{"plan": ["vtcon1"], "done": [...],
    "text_consoles": ["vtcon0"], "warnings": [...], "skipped": [...]}``.
    """
    name = "vtconsoles"
    BASE = "/sys/class/vtconsole"

    def observe(self, ctx: Context) -> dict:
        plan: list[str] = []
        text: list[str] = []
        if not ctx.profile.vtconsoles:
            return {"plan": plan, "skipped": ["vtconsoles: none in the profile"]}
        if not shows_boot_display(ctx.host, ctx.devices):
            return {"plan": plan, "skipped": [NOT_BOOT_DISPLAY]}
        for vt in ctx.host.listdir(self.BASE):
            name = ctx.host.read_or(f"{self.BASE}/{vt}/name", "") or ""
            bound = ctx.host.read_or(f"{self.BASE}/{vt}/bind") == "1"
            if "frame buffer" in name and bound:
                plan.append(vt)
            elif VGACON in name and bound:
                text.append(vt)
        facts: dict = {"plan": plan, "text_consoles": text}
        if text:
            facts["warnings"] = [
                f"the boot GPU shows a VGA text console ({', '.join(text)}): the kernel removes "
                f"it when vfio-pci takes the GPU (vgaarb: deactivate vga console) and it does "
                f"not come back until reboot; a framebuffer console (the GPU driver's fbdev) "
                f"avoids this"]
        return facts

    def _set(self, ctx: Context, vt: str, value: str) -> None:
        path = f"{self.BASE}/{vt}/bind"
        _write(ctx, path, value, errors.VTCONSOLE_FAILED, vt)
        now = ctx.host.read_or(path)
        if now != value:
            raise HookdError(errors.VTCONSOLE_FAILED,
                             f"{vt}: bind reads {now!r} after writing {value!r} (a VT still in "
                             f"graphics mode? the display server must be stopped first)")

    def max_apply_s(self, profile, shape: Shape) -> float:
        """One ``bind`` write per vtconsole, each up to ``deadlines.unbind``."""
        return shape.vtconsoles * profile.deadlines.unbind if profile.vtconsoles else 0.0

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """Per unbound vtconsole: its ``bind`` write and one for the console that took over,
        and a last one, each up to ``deadlines.unbind``."""
        n = shape.vtconsoles if facts is None else len(self.undo_items(facts))
        return 3 * n * deadlines.unbind

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

    def _text_consoles_after(self, ctx: Context, facts: dict) -> list[str]:
        """Notes on the VGA text consoles seen at prepare; rebinds one the kernel still
        offers unbound."""
        notes = []
        for vt in facts.get("text_consoles", []):
            name = ctx.host.read_or(f"{self.BASE}/{vt}/name", "") or ""
            if VGACON not in name:
                notes.append(f"the VGA text console ({vt}) was removed by the kernel's VGA "
                             f"arbiter when vfio-pci took the boot GPU (vgaarb: deactivate vga "
                             f"console); text consoles stay blank until reboot"
                             + (f"; {vt} is now {name.strip()!r}" if name else ""))
            elif ctx.host.read_or(f"{self.BASE}/{vt}/bind") != "1":
                self._set(ctx, vt, "1")
        return notes

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        notes = self._text_consoles_after(ctx, facts)
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
        if not ctx.profile.framebuffer:
            return {"plan": plan, "skipped": ["framebuffer: none in the profile"]}
        if not shows_boot_display(ctx.host, ctx.devices):
            return {"plan": plan, "skipped": [NOT_BOOT_DISPLAY]}
        for dev in FIRMWARE_FRAMEBUFFERS:
            drv = ctx.host.link_name(f"{self.DEVS}/{dev}/driver")
            if drv:
                plan.append([dev, drv])
        return {"plan": plan}

    def max_apply_s(self, profile, shape: Shape) -> float:
        """One ``unbind`` write per firmware framebuffer, each up to ``deadlines.unbind``."""
        return len(FIRMWARE_FRAMEBUFFERS) * profile.deadlines.unbind if profile.framebuffer else 0.0

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """One ``bind`` write per unbound framebuffer, each up to ``deadlines.unbind``."""
        n = len(FIRMWARE_FRAMEBUFFERS) if facts is None else len(self.undo_items(facts))
        return n * deadlines.unbind

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
