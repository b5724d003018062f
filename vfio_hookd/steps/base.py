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

Order on prepare (release is the reverse): inhibit, units, sessions, holders, vtconsoles,
framebuffer, modules, bind_vfio, then the host tuning steps: hugepages (most memory is free
once the desktop has let go of it), cpu_isolation, cpu_governor (:mod:`.cpus`). The sleep
inhibitor comes first, so the host cannot suspend mid-prepare, and goes last. The GPU's
modules go before the bind: with nvidia_drm/nvidia_modeset loaded, nvkms
holds the GPU inside the kernel and an unbind of nvidia can block for good; and on release the
proprietary nvidia module refuses to load (ENODEV) while its GPU is still on vfio-pci, so the
functions are given back first and the modules loaded after (they bind what they find).
Kernel interfaces: ``Documentation/ABI/testing/sysfs-bus-pci``,
``Documentation/driver-api/console.rst``, ``Documentation/ABI/stable/sysfs-module``,
``drivers/video/aperture.c`` (firmware framebuffer removal); FIELD-NOTES §2, §3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import pci as pcimod
from ..host import Host
from ..inhibitors import Inhibitors


@dataclass(frozen=True)
class Shape:
    """What a prepare's waits depend on, known before any step runs (for the declared
    deadlines): ``devices`` functions handed over, ``units`` units the profile names (display
    manager + ``stop_units``), ``vtconsoles`` entries under ``/sys/class/vtconsole``,
    ``modules`` the most modules the modules step may unload, ``hugepages`` the hugepage pools
    the hugepages step may grow (0 or 1), ``cpus`` the VM's CPUs whose governor the
    cpu_governor step may set."""
    devices: int
    units: int = 0
    vtconsoles: int = 0
    modules: int = 0
    cpus: int = 0
    hugepages: int = 0


@dataclass
class Context:
    """What a step works with.

    :param vm: domain name.
    :param host: the host access layer.
    :param profile: the :class:`vfio_hookd.profile.Profile` in force on prepare; ``None`` on
        release and rollback, which work from the record alone.
    :param deadlines: the :class:`vfio_hookd.profile.Deadlines` in force (s): from the profile
        on prepare, from the record on release.
    :param devices: PCI addresses of the functions to hand over, e.g. ``("0000:01:00.0",)``.
    :param drivers: each function's driver before prepare (``None``: unbound).
    :param systemd: zero-argument callable returning a :class:`vfio_hookd.systemd.Systemd`
        (connected on first use).
    :param log: a logger; steps log with ``extra={"STEP": name}`` added by the machine.
    :param child_modules: per function, the modules of drivers bound to its child devices
        before prepare (e.g. ``{"0000:00:02.0": ["virtio_gpu"]}``; see
        :func:`vfio_hookd.pci.child_modules`).
    :param holders_grace_s: how long (s) holders may take to exit by themselves with
        ``on_busy: fail`` (capped by ``deadlines.terminate``).
    :param stopped_units: the units this prepare's units step stopped (their processes, and
        those of login sessions, get the holders' grace period).
    :param logind: zero-argument callable returning a :class:`vfio_hookd.logind.Logind` (or
        an object with its interface; connected on first use).
    :param cpus: on prepare, whose CPUs are whose (:func:`vfio_hookd.cpus.resolve`: ``{"host",
        "vm", "online", "source"}`` cpulists), None when the profile tunes no CPU; None on
        release (the CPU steps undo from their facts).
    :param inhibitors: the process's inhibitor locks by VM
        (:class:`vfio_hookd.inhibitors.Inhibitors`; the machine's own, shared by its runs).
    """
    vm: str
    host: Host
    profile: Any
    deadlines: Any
    devices: tuple[str, ...]
    drivers: dict[str, str | None]
    systemd: Callable[[], Any]
    log: logging.LoggerAdapter | logging.Logger = field(
        default_factory=lambda: logging.getLogger("vfio_hookd"))
    child_modules: dict[str, list[str]] = field(default_factory=dict)
    holders_grace_s: float = 2.0
    stopped_units: tuple[str, ...] = ()
    logind: Callable[[], Any] | None = None
    cpus: dict | None = None
    inhibitors: Inhibitors = field(default_factory=Inhibitors)


pci = pcimod.path


def _write(ctx: Context, path: str, data: str, code: str, what: str) -> None:
    pcimod.write_attr(ctx.host, path, data, ctx.deadlines.unbind, code, what)


class Step:
    """Base class. ``name`` (str) is the step's name in records and logs (``STEP=``).

    Besides observe/apply/undo each step declares the longest it may wait (s), so the daemon
    can announce a request's deadline from what the steps will really do:
    :meth:`max_apply_s` for a prepare (from the profile and the :class:`Shape`) and
    :meth:`max_undo_s` for an undo (from the deadlines and the recorded facts, or ``None``
    facts for the bound before apply has run).
    """
    name = "step"

    def observe(self, ctx: Context) -> dict:
        raise NotImplementedError

    def apply(self, ctx: Context, facts: dict) -> None:
        raise NotImplementedError

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        raise NotImplementedError

    def max_apply_s(self, profile, shape: Shape) -> float:
        """The longest (s) :meth:`apply` may wait for ``profile`` on a host of ``shape``."""
        raise NotImplementedError

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """The longest (s) :meth:`undo` may wait: for the recorded ``facts``, or (``None``)
        for whatever apply may have done on a host of ``shape``."""
        raise NotImplementedError

    @staticmethod
    def undo_items(facts: dict) -> list:
        """What to undo: ``done`` when apply recorded it, else the whole ``plan`` (crash mid-apply)."""
        return list(facts["done"]) if "done" in facts else list(facts.get("plan", []))
