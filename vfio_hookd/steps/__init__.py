"""The steps, in prepare order (release is the reverse); see :mod:`.base` for the contract."""

from __future__ import annotations

from .base import Context, Shape, Step
from .bind import BindVfio
from .consoles import FIRMWARE_FRAMEBUFFERS, Framebuffer, Vtconsoles
from .cpus import CpuGovernor, CpuIsolation
from .holders import Holders
from .hugepages import HugepagesStep
from .inhibit import Inhibit
from .modules import Modules
from .sessions import Sessions
from .units import Units

#: The steps in prepare order.
STEPS: tuple[Step, ...] = (Inhibit(), Units(), Sessions(), Holders(), Vtconsoles(),
                           Framebuffer(), Modules(), BindVfio(), HugepagesStep(), CpuIsolation(),
                           CpuGovernor())
STEP_NAMES = tuple(s.name for s in STEPS)
BY_NAME = {s.name: s for s in STEPS}

__all__ = ["Context", "Shape", "Step", "STEPS", "STEP_NAMES", "BY_NAME", "FIRMWARE_FRAMEBUFFERS",
           "Inhibit", "Units", "Sessions", "Holders", "Vtconsoles", "Framebuffer", "Modules",
           "BindVfio", "HugepagesStep", "CpuIsolation", "CpuGovernor"]
