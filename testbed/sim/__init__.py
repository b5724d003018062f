"""The simulated host: a fake kernel rooted in a directory (:mod:`.kernel`, built by
:mod:`.hosts`), a fake systemd on a private D-Bus bus (:mod:`.systemd`, :mod:`.bus`), and fault
injection / latencies shared by both (:mod:`.faults`). Used by the demo, the tests and the
benchmarks; the product's code runs against it unchanged: :class:`.kernel.SimHost` is a
:class:`vfio_hookd.host.Host` subclass handed to the product's API (``Machine(SimHost(root), paths)``,
``vfio_hookd.daemon.run(paths, host=SimHost(root))``), and the fake systemd answers
:class:`vfio_hookd.systemd.Systemd` on a private bus (or :mod:`testbed.fake_systemd` stands in
for that client in-process).
"""

from __future__ import annotations

import json
import os

from .desktops import DESKTOPS, UNITS as _desktop_units

_NVIDIA_UNITS = {
    "gdm.service": {"aliases": ["display-manager.service"], "active": True,
                    "holds": ["/dev/dri/card0", "/dev/nvidia0", "/dev/nvidiactl",
                              "/dev/nvidia-modeset"]},
    "nvidia-persistenced.service": {"active": True, "holds": ["/dev/nvidiactl", "/dev/nvidia0"]},
    "sshd.service": {"active": True, "holds": []},
}

#: Units of each simulated host variant (``<root>/.sim/units.json``): the display manager is a
#: real process holding the GPU's nodes; nvidia-persistenced holds the NVIDIA control nodes.
UNITS = {
    "nvidia": _NVIDIA_UNITS,
    "amd": {
        "sddm.service": {"aliases": ["display-manager.service"], "active": True,
                         "holds": ["/dev/dri/card0", "/dev/dri/renderD128"]},
        "sshd.service": {"active": True, "holds": []},
        # a ROCm user (ollama with ROCm holds /dev/kfd and the render node), not started at
        # boot: a test starts it to have a holder of /dev/kfd
        "ollama.service": {"active": False, "holds": ["/dev/kfd", "/dev/dri/renderD128"]},
    },
    # as nvidia, plus systemd-logind watching the host's USB keyboard ("Watching system
    # buttons on /dev/input/event3"): it keeps evdev and the host's USB stack in use
    "turing": {**_NVIDIA_UNITS,
               "systemd-logind.service": {"active": True, "holds": ["/dev/input/event3"]}},
    # the display manager on the integrated GPU only; the discrete GPU is nobody's
    "twogpu": {
        "gdm.service": {"aliases": ["display-manager.service"], "active": True,
                        "holds": ["/dev/dri/card0", "/dev/dri/renderD128"]},
        "sshd.service": {"active": True, "holds": []},
    },
    "bios-text": _NVIDIA_UNITS,
}
UNITS["twogpu-vfio"] = UNITS["twogpu"]
UNITS.update(_desktop_units)

#: The GPU functions of each variant: those a VM is handed (for profiles in the demo and
#: tests).
DEVICES = {"nvidia": ("0000:01:00.0", "0000:01:00.1"), "amd": ("0000:03:00.0", "0000:03:00.1"),
           "turing": ("0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"),
           "twogpu": ("0000:01:00.0", "0000:01:00.1"),
           "twogpu-vfio": ("0000:01:00.0", "0000:01:00.1"),
           "bios-text": ("0000:01:00.0", "0000:01:00.1"),
           **{v: ("0000:01:00.0", "0000:01:00.1") for v in _desktop_units}}


def make_host(root: str, variant: str = "nvidia", latency: dict[str, float] | None = None) -> str:
    """Build a simulated host of ``variant`` (a key of :data:`UNITS`: "nvidia", "amd",
    "turing", "twogpu", "twogpu-vfio", "bios-text"; :mod:`.hosts`, :mod:`.shapes`; or a
    desktop on the NVIDIA host: "desktop-x11", "desktop-wayland", "desktop-greeter",
    "desktop-vt", :mod:`.desktops`) in directory
    ``root`` with its systemd units; set per-operation ``latency`` (s, keys in
    :mod:`.faults`). Returns ``root``.

    :raises ValueError: unknown variant.
    """
    from . import cpus, faults, hosts
    if variant not in UNITS:
        raise ValueError(f"variant must be one of {sorted(UNITS)}")
    hosts.build_host(root, "nvidia" if variant in DESKTOPS else variant)
    cpus.build(root)   # 16 CPUs with cpufreq; slices with AllowedCPUs (testbed.sim.cpus)
    with open(os.path.join(root, ".sim", "units.json"), "w") as f:
        json.dump(UNITS[variant], f, indent=1)
    if variant in DESKTOPS:   # logind's sessions, users and their instances (.desktop)
        with open(os.path.join(root, ".sim", "desktop.json"), "w") as f:
            json.dump(DESKTOPS[variant], f, indent=1)
    if latency:
        faults.set_latency(root, latency)
    return root
