"""Builders of simulated hosts: a directory laid out like a booted Linux machine.

:func:`build_host` makes ``root`` a simulated host (``root/.sim/state.json`` plus the tree) for
:class:`testbed.sim.kernel.SimHost` (``SimHost(root)``) to act on. The
tree is built the way the kernel would have built it at boot: the static topology (PCI
functions, IOMMU groups, vtconsole 0, the firmware framebuffer) is laid out, then the boot
modules are loaded through the simulated kernel, whose drivers probe the functions and create
their nodes. Layout follows sysfs: ``/sys/devices/pci0000:00/...`` directories,
``/sys/bus/pci/devices/ADDR`` and ``iommu_group`` relative links, ``/sys/module/M``.

Variants:

``nvidia`` (default): bridge ``0000:00:01.0`` (IOMMU group 0); GPU ``0000:01:00.0`` (10de:2484,
boot VGA, driver ``nvidia``, modules nvidia, nvidia_modeset, nvidia_uvm, nvidia_drm with
``/dev/nvidia0``, ``/dev/nvidiactl``, ``/dev/nvidia-modeset``, ``/dev/nvidia-uvm``,
``/dev/dri/card0``, ``/dev/dri/renderD128``) and its HDMI audio ``0000:01:00.1`` (10de:228b,
snd_hda_intel, card1: ``/dev/snd/controlC1``, ``pcmC1D3p``) in group 1; onboard audio
``0000:00:1f.3`` (snd_hda_intel, card0) in group 2. The proprietary driver with modeset=0 does
no aperture eviction, so ``efi-framebuffer.0`` is still there and bound (``/proc/fb``:
``0 EFI VGA``), vtcon1 (frame buffer) bound.

``amd``: GPU ``0000:03:00.0`` (1002:73bf, boot VGA, amdgpu with deps drm_ttm_helper and ttm,
card0/renderD128 and the ``amdgpudrmfb`` framebuffer) and audio ``0000:03:00.1`` (1002:ab28) in
group 1. amdgpu evicted the firmware framebuffer at boot: no ``efi-framebuffer.0``, ``/proc/fb``
is ``0 amdgpudrmfb``, vtcon1 bound. amdgpu's ROCm part (kfd, built into amdgpu) gives
``/dev/kfd`` (major 236, dynamic) with the virtual device ``/sys/devices/virtual/kfd/kfd``
(``/sys/class/kfd/kfd``, its ``dev`` file) while amdgpu is loaded, and the topology
``/sys/class/kfd/kfd/topology/nodes/N``: node 0 the CPU, node 1 the GPU while amdgpu drives it,
whose ``properties`` name its PCI function (``domain``, ``location_id`` = bus << 8 | devfn, 768
for 03:00.0) and its render node (``drm_render_minor 128``): the way to tell which GPU a
holder of /dev/kfd uses (:func:`kfd_gpu_node`). The unit ``ollama.service`` (not started at
boot) holds /dev/kfd and renderD128 when a test starts it.

Both: vfio_pci (deps vfio_pci_core, vfio, vfio_iommu_type1; driver ``vfio-pci``) is not loaded;
``vt`` and ``drm`` are built in; ``/dev/vfio/vfio`` exists.

The host shapes ``turing``, ``twogpu``, ``twogpu-vfio`` and ``bios-text`` are built by
:mod:`testbed.sim.shapes` on the same skeleton.

Firmware (``firmware=``): ``"efi"`` (default) as above: the boot console driver is
``vtcon0 (S) dummy device`` and ``efi-framebuffer.0`` exists. ``"bios"``: no firmware
framebuffer device; the boot console is vgacon, ``vtcon0 (S) VGA+``. A driver that evicts the
boot VGA's firmware users (amdgpu, vfio-pci) retires vgacon: dummycon takes over as
``(M) dummy device`` and fbcon, with the driver's framebuffer, lands on vgacon's free vtcon0
-- so the ``amd`` BIOS host boots with ``vtcon0 (M) frame buffer device`` bound and ``vtcon1
(M) dummy device`` unbound, the layout of the BIOS guests of tests/kernel (Linux 6.1).
The ``nvidia`` BIOS host keeps vgacon bound (modeset=0 evicts nothing) and has no fbcon.
"""

from __future__ import annotations

import os
import stat

from . import kernel as K

KERNEL_RELEASE = "6.1.0-sim"
BRIDGE = "0000:00:01.0"
ONBOARD_AUDIO = "0000:00:1f.3"
ROOT_BUS = "/sys/devices/pci0000:00"


def _dev(path: str, module: str | None) -> dict:
    return {"kind": "dev", "path": path, "module": module}


def _drm(name: str, minor: int, module: str, requires: str | None = None) -> dict:
    return {"kind": "class", "class": "drm", "name": name, "parent": None,
            "dev": f"dri/{name}", "devnum": f"226:{minor}", "module": module, "requires": requires}


def _sound_card(card: int, nodes: list[tuple[str, int]]) -> list[dict]:
    specs = [{"kind": "class", "class": "sound", "name": f"card{card}", "parent": None,
              "dev": None, "devnum": None, "module": "snd_hda_intel", "requires": None}]
    for name, minor in nodes:
        specs.append({"kind": "class", "class": "sound", "name": name, "parent": f"card{card}",
                      "dev": f"snd/{name}", "devnum": f"116:{minor}", "module": "snd_hda_intel",
                      "requires": None})
    return specs


KFD = "/sys/devices/virtual/kfd/kfd"
#: /dev/kfd's major: a dynamic char major (``register_chrdev(0, "kfd")``), 236 here.
KFD_DEVNUM = "236:0"


def kfd_nodes() -> list[dict]:
    """What amdgpu's init creates for ROCm/HSA (``kfd_chardev_init``, ``kfd_topology_init``;
    ``CONFIG_HSA_AMD=y`` in Debian's 6.1): the ``kfd`` class with the virtual device
    ``/sys/devices/virtual/kfd/kfd`` (``dev`` 236:0, ``/sys/class/kfd/kfd``) and ``/dev/kfd``,
    which exists while amdgpu is loaded, with or without a GPU, and pins amdgpu while open;
    its ``topology`` with node 0, the CPU. The GPUs are further topology nodes
    (:func:`kfd_gpu_node`)."""
    cpu = ("cpu_cores_count 16\nsimd_count 0\nmem_banks_count 1\ncaches_count 0\n"
           "io_links_count 1\ncpu_core_id_base 0\nsimd_id_base 0\nvendor_id 0\n"
           "device_id 0\nlocation_id 0\ndomain 0\ndrm_render_minor 0\nhive_id 0")
    return [
        {"kind": "dir", "path": "/sys/class/kfd"},
        {"kind": "device", "path": KFD, "class": "kfd", "parent": None, "dev": "kfd",
         "devnum": KFD_DEVNUM, "module": "amdgpu"},
        {"kind": "device", "path": f"{KFD}/topology",
         "attrs": {"generation_id": "1", "system_properties":
                   "platform_oem 0\nplatform_id 0\nplatform_rev 0"}},
        {"kind": "device", "path": f"{KFD}/topology/nodes/0",
         "attrs": {"gpu_id": "0", "name": "", "properties": cpu}},
    ]


def kfd_gpu_node(addr: str, node: int, render_minor: int, device_id: int, gpu_id: int,
                 name: str = "gfx1030") -> dict:
    """The kfd topology node of the AMD GPU ``addr`` (``kfd_topology_add_device`` when amdgpu
    binds it, gone when it unbinds): ``/sys/devices/virtual/kfd/kfd/topology/nodes/N`` whose
    ``properties`` tie it to the PCI function (``domain``, ``location_id`` = bus << 8 | devfn)
    and to its render node (``drm_render_minor``), as ROCm's ``rocminfo`` reads them."""
    dom, bus, slot_fn = addr.split(":")
    slot, fn = slot_fn.split(".")
    location = int(bus, 16) << 8 | int(slot, 16) << 3 | int(fn)
    props = (f"cpu_cores_count 0\nsimd_count 144\nmem_banks_count 1\ncaches_count 0\n"
             f"io_links_count 1\ncpu_core_id_base 0\nsimd_id_base 2147487744\n"
             f"max_waves_per_simd 16\nwave_front_size 32\ngfx_target_version 100300\n"
             f"vendor_id 4098\ndevice_id {device_id}\nlocation_id {location}\n"
             f"domain {int(dom, 16)}\ndrm_render_minor {render_minor}\nhive_id 0")
    return {"kind": "device", "path": f"{KFD}/topology/nodes/{node}",
            "attrs": {"gpu_id": str(gpu_id), "name": name, "properties": props}}


def _vfio_modules() -> dict:
    return {
        "vfio": {"builtin": False, "deps": [], "pci_driver": None, "nodes": []},
        "vfio_iommu_type1": {"builtin": False, "deps": ["vfio"], "pci_driver": None, "nodes": []},
        "vfio_pci_core": {"builtin": False, "deps": ["vfio"], "pci_driver": None, "nodes": []},
        "vfio_pci": {"builtin": False, "deps": ["vfio_pci_core", "vfio", "vfio_iommu_type1"],
                     "pci_driver": "vfio-pci", "nodes": []},
        "snd_hda_intel": {"builtin": False, "deps": [], "pci_driver": "snd_hda_intel", "nodes": []},
        "vt": {"builtin": True, "deps": [], "pci_driver": None, "nodes": []},
        "drm": {"builtin": True, "deps": [], "pci_driver": None, "nodes": []},
    }


def _common_drivers() -> dict:
    return {
        "pcieport": {"module": None, "evicts_firmware_fb": False, "unbind_waits_for_holders": False},
        "snd_hda_intel": {"module": "snd_hda_intel", "evicts_firmware_fb": False,
                          "unbind_waits_for_holders": False},
        # vfio-pci evicts the firmware framebuffer of the boot VGA function (aperture.c) and its
        # remove() waits while the device is open (vfio_unregister_group_dev).
        "vfio-pci": {"module": "vfio_pci", "evicts_firmware_fb": True,
                     "unbind_waits_for_holders": True},
    }


def _nvidia_state() -> dict:
    gpu, audio = "0000:01:00.0", "0000:01:00.1"
    modules = _vfio_modules()
    modules.update({
        "nvidia": {"builtin": False, "deps": [], "pci_driver": "nvidia", "needs_device": True,
                   "nodes": [
            {"kind": "dir", "path": "/proc/driver/nvidia"},
            {"kind": "dir", "path": "/proc/driver/nvidia/gpus"},
            _dev("/dev/nvidiactl", "nvidia"),
            # MIG/fabric capability nodes (nvidia-modprobe -c; FIELD-NOTES §7: an H200 host)
            {"kind": "dir", "path": "/dev/nvidia-caps"},
            _dev("/dev/nvidia-caps/nvidia-cap1", "nvidia"),
            _dev("/dev/nvidia-caps/nvidia-cap2", "nvidia")]},
        "nvidia_modeset": {"builtin": False, "deps": ["nvidia"], "pci_driver": None,
                           "nodes": [_dev("/dev/nvidia-modeset", "nvidia_modeset")]},
        "nvidia_uvm": {"builtin": False, "deps": ["nvidia"], "pci_driver": None,
                       "nodes": [_dev("/dev/nvidia-uvm", "nvidia_uvm"),
                                 _dev("/dev/nvidia-uvm-tools", "nvidia_uvm")]},
        "nvidia_drm": {"builtin": False, "deps": ["nvidia", "nvidia_modeset"], "pci_driver": None,
                       "nodes": []},
    })
    drivers = _common_drivers()
    drivers["nvidia"] = {"module": "nvidia", "evicts_firmware_fb": False,
                         "unbind_waits_for_holders": True, "hold_nodes": ["/dev/nvidiactl"]}
    info = ("Model: \t\t NVIDIA GeForce RTX 3060 Ti\nIRQ:   \t\t 130\nGPU UUID: \t "
            "GPU-00000000-0000-0000-0000-000000000000\nVideo BIOS: \t 94.04.3a.00.b0\n"
            f"Bus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\n"
            f"Bus Location: \t {gpu[5:]}\nDevice Minor: \t 0\nGPU Excluded:\t No\n")
    return {
        "kernel": KERNEL_RELEASE,
        "devices": {
            BRIDGE: {"native": "pcieport", "group": "0"},
            ONBOARD_AUDIO: {"native": "snd_hda_intel", "group": "2"},
            gpu: {"native": "nvidia", "group": "1"},
            audio: {"native": "snd_hda_intel", "group": "1"},
        },
        "modules": modules,
        "drivers": drivers,
        "driver_nodes": {
            "nvidia": {gpu: [
                _dev("/dev/nvidia0", "nvidia"),
                {"kind": "proc", "path": f"/proc/driver/nvidia/gpus/{gpu}/information",
                 "text": info},
                _drm("card0", 0, "nvidia_drm", requires="nvidia_drm"),
                _drm("renderD128", 128, "nvidia_drm", requires="nvidia_drm"),
            ]},
            "snd_hda_intel": {
                ONBOARD_AUDIO: _sound_card(0, [("controlC0", 11), ("pcmC0D0p", 3)]),
                audio: _sound_card(1, [("controlC1", 31), ("pcmC1D3p", 19)]),
            },
        },
        "boot_vga": gpu,
        "platform": {"efi-framebuffer.0": {"driver": "efi-framebuffer", "fb": "EFI VGA",
                                           "firmware_fb": True}},
        "fbs": {}, "live": {}, "stale": [],
    }


def _amd_state() -> dict:
    gpu, audio = "0000:03:00.0", "0000:03:00.1"
    modules = _vfio_modules()
    modules.update({
        "ttm": {"builtin": False, "deps": [], "pci_driver": None, "nodes": []},
        "drm_ttm_helper": {"builtin": False, "deps": ["ttm"], "pci_driver": None, "nodes": []},
        "amdgpu": {"builtin": False, "deps": ["drm_ttm_helper", "ttm"], "pci_driver": "amdgpu",
                   "nodes": kfd_nodes()},
    })
    drivers = _common_drivers()
    drivers["amdgpu"] = {"module": "amdgpu", "evicts_firmware_fb": True,
                         "unbind_waits_for_holders": False}
    return {
        "kernel": KERNEL_RELEASE,
        "devices": {
            BRIDGE: {"native": "pcieport", "group": "0"},
            ONBOARD_AUDIO: {"native": "snd_hda_intel", "group": "2"},
            gpu: {"native": "amdgpu", "group": "1"},
            audio: {"native": "snd_hda_intel", "group": "1"},
        },
        "modules": modules,
        "drivers": drivers,
        "driver_nodes": {
            "amdgpu": {gpu: [_drm("card0", 0, "amdgpu"), _drm("renderD128", 128, "amdgpu"),
                             {"kind": "fb", "name": "amdgpudrmfb"},
                             kfd_gpu_node(gpu, 1, 128, 0x73bf, 40461)]},
            "snd_hda_intel": {
                ONBOARD_AUDIO: _sound_card(0, [("controlC0", 11), ("pcmC0D0p", 3)]),
                audio: _sound_card(1, [("controlC1", 31), ("pcmC1D3p", 19)]),
            },
        },
        "boot_vga": gpu,
        "platform": {"efi-framebuffer.0": {"driver": "efi-framebuffer", "fb": "EFI VGA",
                                           "firmware_fb": True}},
        "fbs": {}, "live": {}, "stale": [],
    }


def _pci_function(root: str, parent: str, addr: str, vendor: str, device: str, cls: str,
                  group: str, boot_vga: str | None = None) -> str:
    d = f"{parent}/{addr}"
    K.mkdir(root, d)
    for name, value in (("vendor", vendor), ("device", device), ("class", cls)):
        K.mkfile(root, f"{d}/{name}", value + "\n", 0o444)
    if boot_vga is not None:
        K.mkfile(root, f"{d}/boot_vga", boot_vga + "\n", 0o444)
    K.mkfile(root, f"{d}/driver_override", "(null)\n", 0o644)
    K.mkfile(root, f"{d}/reset_method", "flr bus\n", 0o644)
    K.mkfile(root, f"{d}/uevent",
             f"PCI_CLASS={cls[2:].upper()}\nPCI_ID={vendor[2:].upper()}:{device[2:].upper()}\n"
             f"PCI_SLOT_NAME={addr}\n", 0o644)
    K.mklink(root, f"{d}/subsystem", "/sys/bus/pci")
    K.mklink(root, f"{d}/iommu_group", f"/sys/kernel/iommu_groups/{group}")
    K.mklink(root, f"/sys/kernel/iommu_groups/{group}/devices/{addr}", d)
    K.mklink(root, f"/sys/bus/pci/devices/{addr}", d)
    return d


def _skeleton(root: str, state: dict, functions: list[tuple], firmware: str = "efi",
              dirs: tuple = (), cmdline: str | None = None) -> None:
    """Lay out the static tree: the bridge and onboard audio, ``functions`` (``(addr, vendor,
    device, class, boot_vga)``, behind the bridge in IOMMU group 1, or with ``group`` and
    ``parent`` directory added), the built-in modules, more directories ``dirs`` (of
    built-in buses and classes), ``/proc/cmdline`` when given, the firmware framebuffer."""
    if os.path.isdir(os.path.join(root, ".sim")) or (os.path.isdir(root) and os.listdir(root)):
        raise ValueError(f"{root} is not empty: a simulated host is built in an empty directory")
    os.makedirs(os.path.join(root, ".sim"), exist_ok=True)
    open(os.path.join(root, ".sim", "kernel.lock"), "a").close()
    K.save_state(root, state)
    for p in ("/sys/bus/pci/drivers", "/sys/bus/platform/devices", "/sys/class/drm",
              "/sys/class/sound", "/sys/class/vtconsole", "/sys/module", "/dev/dri", "/dev/snd",
              "/dev/vfio", "/proc/driver", "/sys/devices/virtual/vtconsole"):
        K.mkdir(root, p)
    K.mkfile(root, "/sys/bus/pci/drivers_probe", "", 0o200)
    K.mkfile(root, "/sys/bus/pci/rescan", "", 0o200)
    K.mkfile(root, "/dev/vfio/vfio", "", 0o666)
    K.mkfile(root, "/proc/fb", "", 0o444)
    bridge = _pci_function(root, ROOT_BUS, BRIDGE, "0x8086", "0xa8b8", "0x060400", "0")
    _pci_function(root, ROOT_BUS, ONBOARD_AUDIO, "0x8086", "0x7ad0", "0x040300", "2")
    for f in functions:
        addr, vendor, device, cls, boot_vga = f[:5]
        group, parent = (f[5], f[6]) if len(f) > 5 else ("1", bridge)
        _pci_function(root, parent, addr, vendor, device, cls, group, boot_vga)
    for p in dirs:
        K.mkdir(root, p)
    if cmdline is not None:
        K.mkfile(root, "/proc/cmdline", cmdline + "\n", 0o444)
    for m, info in state["modules"].items():
        if info["builtin"]:
            K.mkdir(root, f"/sys/module/{m}/parameters")
    for attr in ("bind", "unbind", "uevent"):   # efifb: a built-in platform driver
        K.mkfile(root, f"/sys/bus/platform/drivers/efi-framebuffer/{attr}", "", 0o200)
    if firmware == "bios":
        return
    # the firmware framebuffer platform device
    K.mkdir(root, "/sys/devices/platform/efi-framebuffer.0")
    K.mkfile(root, "/sys/devices/platform/efi-framebuffer.0/uevent",
             "DRIVER=efi-framebuffer\nMODALIAS=platform:efi-framebuffer\n", 0o644)
    K.mklink(root, "/sys/devices/platform/efi-framebuffer.0/subsystem", "/sys/bus/platform")
    K.mklink(root, "/sys/bus/platform/devices/efi-framebuffer.0",
             "/sys/devices/platform/efi-framebuffer.0")


def _boot(root: str, modules: list[str], firmware: str = "efi") -> None:
    with K.locked_kernel(root) as k:
        if firmware == "bios":
            k.add_vtcon("(S) VGA+", "1")                          # vgacon
        else:
            k.add_vtcon("(S) dummy device", "0")
            k.platform_bind("efi-framebuffer", "efi-framebuffer.0")  # efifb: fb0, fbcon vtcon1
        k.register_pci_driver("pcieport", None)
        for m in modules:
            k.modprobe(m)
        k.refresh_refcnts()


FIRMWARES = ("efi", "bios")


def _state_for(state: dict, firmware: str) -> dict:
    if firmware not in FIRMWARES:
        raise ValueError(f"firmware must be one of {FIRMWARES}, not {firmware!r}")
    if firmware == "bios":
        state["platform"] = {}
    return state


def build_nvidia_host(root: str, firmware: str = "efi") -> None:
    """Make the empty directory ``root`` the default simulated NVIDIA host (module docstring);
    ``firmware`` ``"efi"`` or ``"bios"``.

    :raises ValueError: ``root`` is not empty, or an unknown firmware.
    """
    _skeleton(root, _state_for(_nvidia_state(), firmware), [
        ("0000:01:00.0", "0x10de", "0x2484", "0x030000", "1"),
        ("0000:01:00.1", "0x10de", "0x228b", "0x040300", None),
    ], firmware)
    _boot(root, ["snd_hda_intel", "nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"],
          firmware)


def build_amd_host(root: str, firmware: str = "efi") -> None:
    """Make the empty directory ``root`` a simulated AMD host (module docstring); ``firmware``
    ``"efi"`` or ``"bios"``.

    :raises ValueError: ``root`` is not empty, or an unknown firmware.
    """
    _skeleton(root, _state_for(_amd_state(), firmware), [
        ("0000:03:00.0", "0x1002", "0x73bf", "0x030000", "1"),
        ("0000:03:00.1", "0x1002", "0xab28", "0x040300", None),
    ], firmware)
    # amdgpu's probe evicts efi-framebuffer.0 (EFI) or vgacon (BIOS)
    _boot(root, ["snd_hda_intel", "amdgpu"], firmware)


def build_host(root: str, variant: str = "nvidia", firmware: str | None = None) -> None:
    """Build simulated host ``variant`` in the empty dir ``root``: ``"nvidia"``, ``"amd"``
    (this module's docstring), ``"turing"``, ``"twogpu"``, ``"twogpu-vfio"``, ``"bios-text"``
    (:mod:`testbed.sim.shapes`), booted by ``firmware`` (``"efi"`` or ``"bios"``; default the
    variant's own: ``"bios"`` for bios-text, else ``"efi"``).

    :raises ValueError: unknown variant or firmware, or ``root`` not empty.
    """
    from . import shapes
    builders = {"nvidia": build_nvidia_host, "amd": build_amd_host, **shapes.BUILDERS}
    if variant not in builders:
        raise ValueError(f"variant must be one of {sorted(builders)}, not {variant!r}")
    if firmware is None:
        builders[variant](root)
    else:
        builders[variant](root, firmware)
    from . import hugepages
    hugepages.build(root)   # empty 2 MiB and 1 GiB pools, memory to fill them


def snapshot(root: str) -> dict:
    """The whole tree of simulated host ``root`` except ``.sim/``: ``{host path: value}`` with
    value ``("dir", None)``, ``("link", target)``, ``("socket", None)`` (the simulated users'
    ``/run/user/UID/systemd/private``) or ``("file", content)`` (str).

    Every module's ``refcnt`` is brought up to date first (the simulated kernel counts open
    files when it scans ``/proc``; a process that closed a node since then is not counted)."""
    from .kernel import locked_kernel
    with locked_kernel(root) as k:
        k.refresh_refcnts()
    out: dict[str, tuple] = {}
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel = dirpath[len(root):] or "/"
        if rel == "/":
            dirnames[:] = [d for d in dirnames if d != ".sim"]
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            hp = (rel.rstrip("/") + "/" + name)
            if os.path.islink(full):
                out[hp] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                out[hp] = ("dir", None)
            elif stat.S_ISSOCK(os.lstat(full).st_mode):   # a user instance's private socket
                out[hp] = ("socket", None)
            else:
                try:
                    with open(full, errors="replace") as f:
                        out[hp] = ("file", f.read())
                except PermissionError:
                    out[hp] = ("file", None)
        # os.walk does not descend into symlinked dirs (followlinks=False): links stay leaves
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out
