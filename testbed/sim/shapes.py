"""The host shapes users have, beyond the one-GPU hosts of :mod:`testbed.sim.hosts`
(project issue 7): a Turing card with USB and UCSI functions beside the host's own USB
controller, a desktop on an integrated GPU with a discrete GPU it does not use (bound to its
driver, or to vfio-pci from boot), and a BIOS host in VGA text mode.

Each is built like the others: the static topology, then the boot modules loaded through the
simulated kernel, whose drivers probe the functions and create their nodes. Module
dependencies follow Debian 12's 6.1 kernel (``modules.dep`` of ``linux-image-6.1.0-*-amd64``):
``deps`` are the modules whose symbols a module uses (its ``holders/`` links), a subset of
``modules.dep``'s closure; ``i2c_core`` is built in there (``CONFIG_I2C=y``: no ``refcnt``,
never a holder), ``drm`` is treated as built in as in the other hosts. Numbers the kernel
hands out at run time (i2c adapters, HID and input devices) are allocated as the kernel does
(:mod:`.children`); the others (USB bus numbers, event, hidraw and DRM minors) are the lowest
free ones at boot and come back the same, as nothing else takes them meanwhile.

``turing`` -- NVIDIA GeForce RTX 2080 (TU104), four functions in one slot and IOMMU group 1::

    0000:01:00.0 VGA 10de:1e87 (boot VGA)   nvidia  (nvidia_drm nvidia_modeset nvidia_uvm, as
                 ``nvidia``; /dev/nvidia0 card0 renderD128; DDC adapters i2c-1..i2c-4
                 "NVIDIA i2c adapter N at 1:00.0" with /dev/i2c-1..4)
    0000:01:00.1 audio 10de:10f8            snd_hda_intel (card1: controlC1 pcmC1D3p)
    0000:01:00.2 USB 10de:1ad8 (xHCI)       xhci_hcd (module xhci_pci -> xhci_hcd -> usbcore
                 -> usb_common); root hubs usb3 (USB 2) and usb4 (USB 3) on usbcore's ``usb``
                 driver, their hub interfaces 3-0:1.0 / 4-0:1.0 on ``hub``; a mouse 3-1 on
                 ``usb``, its interface 3-1:1.0 on usbhid, HID device 0003:046D:C077.0002
                 on hid-generic, input4 with event4 (evdev) and mouse0 (mousedev, built in),
                 hidraw1; /dev/bus/usb/003/001..002, /dev/bus/usb/004/001
    0000:01:00.3 serial bus 10de:1ad9 (UCSI) nvidia-gpu (module i2c_nvidia_gpu); its adapter
                 i2c-5 "NVIDIA GPU I2C adapter" with /dev/i2c-5 (i2c_dev) and the client
                 5-0008 ("ccgx-ucsi") on ucsi_ccg (-> typec_ucsi -> typec, roles) with the
                 typec port0

Beside it, the host's own functions (so that usbcore, usb_common, xhci_hcd, xhci_pci, usbhid,
hid, hid_generic, evdev and i2c_dev drive devices that are not handed over)::

    0000:00:14.0 USB 8086:7ae0 (group 3)    xhci_hcd: usb1 with the keyboard 1-2 (046d:c31c,
                 usbhid, 0003:046D:C31C.0001, input3, event3 held by systemd-logind, hidraw0),
                 usb2; /dev/bus/usb/001/001..002, /dev/bus/usb/002/001
    0000:00:1f.4 SMBus 8086:7aa3 (group 2, with the onboard audio) i801_smbus (i2c_i801 ->
                 i2c_smbus): i2c-0 "SMBus I801 adapter at efa0", /dev/i2c-0

i2c-dev is loaded at boot (as ddcutil's modules-load.d does). ``rmmod usbcore`` is refused
("in use by: usbhid xhci_hcd xhci_pci"), so are xhci_hcd (xhci_pci), usb_common, hid and
evdev (event3 is open); but usbhid, hid_generic, xhci_pci and i2c_dev have no holders and
unload as in the kernel, taking the host's keyboard, controllers or i2c nodes with them:
nothing in the kernel protects a module that drives devices not handed over. Unbinding
01:00.2 from xhci_hcd removes usb3/usb4 and everything below; binding it again creates them
with new HID and input numbers (``.0003``, input5): ``hid_add_device`` and
``input_register_device`` number from counters that only grow. Unbinding 01:00.3 removes
i2c-5 with its node and client; an adapter registered again takes the lowest free number
(``idr_alloc``), which is not 5 if the nvidia adapters were gone meanwhile. Debian 12's own
kernel builds neither i2c_nvidia_gpu nor ucsi_ccg (``CONFIG_I2C_NVIDIA_GPU``,
``CONFIG_UCSI_CCG`` unset: there 01:00.3 has no driver); Arch, Fedora and Ubuntu build them.
EFI boot, nvidia modeset=0 as in ``nvidia``: efifb stays, fbcon on vtcon1.

``twogpu`` -- the desktop runs on the integrated GPU, the discrete one is idle::

    0000:00:02.0 VGA 8086:4680 (boot VGA, group 4, on the root bus)  i915: card0 renderD128,
                 i915drmfb fb0 (it evicted efifb at boot), fbcon on vtcon1
    0000:01:00.0 VGA 1002:73bf (boot_vga 0)  amdgpu: card1 renderD129, amdgpudrmfb fb1,
                 /dev/kfd and kfd topology node 1 (location_id 256, drm_render_minor 129)
    0000:01:00.1 audio 1002:ab28             snd_hda_intel (card1)

The display manager holds the iGPU's card0 and renderD128 (and nothing of the dGPU); the shared
helpers (ttm, drm_kms_helper, drm_display_helper, drm_buddy, i2c_algo_bit, video) are held by
both i915 and amdgpu.

``twogpu-vfio`` -- the same machine booted with ``vfio-pci.ids=1002:73bf,1002:ab28
modprobe.blacklist=amdgpu``: vfio-pci (loaded first, from the initramfs) binds both dGPU
functions through its dynamic ids (no ``driver_override``), ``/dev/vfio/1`` exists, amdgpu is
not loaded (no card1, no /dev/kfd). A dGPU function given back to no driver and probed is taken
by vfio-pci again (its ids match, it registered first); ``modprobe amdgpu`` by name still works
(the blacklist stops only alias loading) but binds nothing that vfio-pci holds.

``bios-text`` -- the ``nvidia`` host booted by a BIOS in VGA text mode (``nomodeset``): no
firmware framebuffer, no framebuffer at all, no fbcon; ``vtcon0 (S) VGA+`` (vgacon) bound. The
proprietary driver (modeset=0) leaves vgacon alone. When vfio-pci (or any driver that removes
the conflicting console drivers) binds the boot VGA function, the VGA arbiter deactivates the
VGA console (``vga_remove_vgacon``: "vgaarb: deactivate vga console"): dummycon takes the
consoles over as a new console driver, ``vtcon1 (M) dummy device`` (bound), and vgacon is
unregistered, so vtcon0 disappears (``do_unregister_con_driver`` then the deferred
``device_destroy``). Nothing registers vgacon again before a reboot: writing to its ``bind``
fails with ENOENT (the file is gone; a descriptor opened before gets ENODEV from kernfs), and
even a vtconsole of vgacon would ignore a write (``vt_bind`` binds only ``(M)`` drivers and
takes consoles only from an ``(S)`` one). FIELD-NOTES §7.
"""

from __future__ import annotations

from . import hosts as H

CMDLINE = "BOOT_IMAGE=/boot/vmlinuz-6.1.0-sim root=/dev/sda2 ro quiet intel_iommu=on iommu=pt"

TURING = ("0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3")
HOST_XHCI, SMBUS, IGPU = "0000:00:14.0", "0000:00:1f.4", "0000:00:02.0"
DGPU, DGPU_AUDIO = "0000:01:00.0", "0000:01:00.1"
HIDRAW_MAJOR, INPUT_MAJOR, USB_MAJOR, I2C_MAJOR = 244, 13, 189, 89


def _mod(deps=(), pci_driver=None, bus_drivers=(), nodes=(), builtin=False) -> dict:
    return {"builtin": builtin, "deps": list(deps), "pci_driver": pci_driver,
            "bus_drivers": [list(b) for b in bus_drivers], "nodes": list(nodes)}


def _dirs(*paths: str) -> list[dict]:
    return [{"kind": "dir", "path": p} for p in paths]


def _counters() -> dict:
    """i2c adapters: lowest free from 0 (``__i2c_first_dynamic_bus_num`` without static
    boards); HID devices from 1 and input devices from 3 (input0-2: the power and sleep
    buttons and the ACPI video bus, not modelled), only growing."""
    return {"i2c": {"mode": "lowest", "start": 0, "taken": []},
            "hid": {"mode": "next", "next": 1}, "input": {"mode": "next", "next": 3}}


# ---- USB -----------------------------------------------------------------------------------
def _usb_device(path: str, bus: int, devnum: int, attrs: dict) -> list[dict]:
    """A USB device on ``bus`` (its ``/dev/bus/usb/BBB/DDD`` node, usbcore's ``usb`` driver)."""
    vid, pid, cls = attrs["idVendor"], attrs["idProduct"], attrs.get("bDeviceClass", "00")
    return [
        {"kind": "device", "path": path, "bus": "usb",
         "attrs": {"busnum": str(bus), "devnum": str(devnum), **attrs},
         "uevent": f"DEVTYPE=usb_device\nPRODUCT={int(vid, 16):x}/{int(pid, 16):x}/601\n"
                   f"TYPE={int(cls, 16)}/0/0\nBUSNUM={bus:03d}\nDEVNUM={devnum:03d}\n",
         "dev": f"bus/usb/{bus:03d}/{devnum:03d}",
         "devnum": f"{USB_MAJOR}:{(bus - 1) * 128 + devnum - 1}", "module": "usbcore"},
        {"kind": "bind", "path": path, "bus": "usb", "driver": "usb", "requires": ["usbcore"]},
    ]


def _usb_interface(path: str, cls: str, driver: str, requires: list[str]) -> list[dict]:
    return [
        {"kind": "device", "path": path, "bus": "usb",
         "attrs": {"bInterfaceNumber": "00", "bInterfaceClass": cls},
         "uevent": f"DEVTYPE=usb_interface\nINTERFACE={int(cls, 16)}/1/0\n"},
        {"kind": "bind", "path": path, "bus": "usb", "driver": driver, "requires": requires},
    ]


def _root_hub(addr: str, bus: int, usb3: bool) -> list[dict]:
    path = f"usb{bus}"
    attrs = {"idVendor": "1d6b", "idProduct": "0003" if usb3 else "0002",
             "bDeviceClass": "09", "manufacturer": f"Linux {H.KERNEL_RELEASE} xhci-hcd",
             "product": "xHCI Host Controller", "serial": addr,
             "speed": "10000" if usb3 else "480"}
    return (_usb_device(path, bus, 1, attrs)
            + _usb_interface(f"{path}/{bus}-0:1.0", "09", "hub", ["usbcore"]))


def _hid_device(addr: str, bus: int, port: int, vid: str, pid: str, manufacturer: str,
                product: str, event: int, hidraw: int, mouse: int | None = None) -> list[dict]:
    """A low-speed USB HID device on ``port`` of root hub ``bus``: the device, its interface
    on usbhid, the HID device on hid-generic with hidraw, the input device with its event
    node (evdev) and, for a mouse, mouseN (mousedev, built in)."""
    dev = f"usb{bus}/{bus}-{port}"
    intf = f"{dev}/{bus}-{port}:1.0"
    hv, hi = f"hid_{bus}_{port}", f"input_{bus}_{port}"
    hid = f"{intf}/0003:{vid.upper()}:{pid.upper()}.{{{hv}:04X}}"
    inp = f"{hid}/input/input{{{hi}}}"
    name = f"{manufacturer} {product}"
    phys = f"usb-{addr}-{port}/input0"
    hid_mods, ev_mods = ["usbhid"], ["usbhid", "hid_generic"]
    specs = _usb_device(dev, bus, 2, {"idVendor": vid, "idProduct": pid,
                                      "manufacturer": manufacturer, "product": product,
                                      "speed": "1.5"})
    specs += _usb_interface(intf, "03", "usbhid", ["usbhid"])
    specs += [
        {"kind": "device", "path": hid, "bus": "hid", "seq": {hv: "hid"}, "requires": hid_mods,
         "attrs": {"country": "00"},
         "uevent": f"HID_ID=0003:0000{vid.upper()}:0000{pid.upper()}\nHID_NAME={name}\n"
                   f"HID_PHYS={phys}\nMODALIAS=hid:b0003g0001v0000{vid.upper()}"
                   f"p0000{pid.upper()}\n"},
        {"kind": "bind", "path": hid, "bus": "hid", "driver": "hid-generic", "requires": ev_mods},
        {"kind": "device", "path": f"{hid}/hidraw/hidraw{hidraw}", "class": "hidraw",
         "parent": hid, "dev": f"hidraw{hidraw}", "devnum": f"{HIDRAW_MAJOR}:{hidraw}",
         "module": "hid", "requires": ev_mods},
        {"kind": "device", "path": inp, "class": "input", "parent": hid, "seq": {hi: "input"},
         "requires": ev_mods, "attrs": {"name": name, "phys": phys, "uniq": ""},
         "uevent": f"PRODUCT=3/{int(vid, 16):x}/{int(pid, 16):x}/110\nNAME=\"{name}\"\n"
                   f"PHYS=\"{phys}\"\nUNIQ=\"\"\n"},
    ]
    if mouse is not None:   # mousedev is built in (CONFIG_INPUT_MOUSEDEV=y)
        specs.append({"kind": "device", "path": f"{inp}/mouse{mouse}", "class": "input",
                      "parent": inp, "dev": f"input/mouse{mouse}",
                      "devnum": f"{INPUT_MAJOR}:{32 + mouse}", "module": None,
                      "requires": ev_mods})
    specs.append({"kind": "device", "path": f"{inp}/event{event}", "class": "input",
                  "parent": inp, "dev": f"input/event{event}",
                  "devnum": f"{INPUT_MAJOR}:{64 + event}", "module": "evdev",
                  "requires": ev_mods + ["evdev"]})
    return specs


def _xhci(addr: str, bus: int, devices: list[list[dict]]) -> list[dict]:
    """What xhci_hcd creates when it binds ``addr``: the USB 2 root hub ``usb{bus}``, the
    USB 3 one ``usb{bus+1}`` (registered in that order), then the devices found on them."""
    specs = _root_hub(addr, bus, False) + _root_hub(addr, bus + 1, True)
    for d in devices:
        specs += d
    return specs


def _usb_modules() -> dict:
    return {
        "usb_common": _mod(),
        "usbcore": _mod(["usb_common"], bus_drivers=[("usb", "usb"), ("usb", "hub"),
                                                     ("usb", "usbfs")],
                        nodes=_dirs("/sys/bus/usb", "/sys/bus/usb/devices",
                                    "/sys/bus/usb/drivers")),
        "xhci_hcd": _mod(["usbcore", "usb_common"]),
        "xhci_pci": _mod(["xhci_hcd", "usbcore"], pci_driver="xhci_hcd"),
        "hid": _mod(nodes=_dirs("/sys/bus/hid", "/sys/bus/hid/devices", "/sys/bus/hid/drivers",
                                "/sys/class/hidraw")),
        "hid_generic": _mod(["hid"], bus_drivers=[("hid", "hid-generic")]),
        "usbhid": _mod(["hid", "usbcore"], bus_drivers=[("usb", "usbhid")]),
        "evdev": _mod(),
    }


# ---- i2c -----------------------------------------------------------------------------------
def _i2c_adapter(var: str, name: str, owner: str) -> list[dict]:
    """An i2c adapter (number ``{var}``, lowest free) below the function, registered by the
    module ``owner``, with its ``/dev/i2c-N`` while i2c_dev is loaded (``i2c-dev`` class,
    major 89). An open ``/dev/i2c-N`` holds the adapter (``i2cdev_open`` ->
    ``i2c_get_adapter``: a reference on the device and on ``owner``), so it pins ``owner``
    and i2c_dev, and the owner's remove() blocks in ``i2c_del_adapter`` until it is closed
    (Linux 6.1)."""
    path = f"i2c-{{{var}}}"
    return [
        {"kind": "device", "path": path, "bus": "i2c", "seq": {var: "i2c"},
         "attrs": {"name": name}, "uevent": "",
         "links": [f"/sys/class/i2c-adapter/i2c-{{{var}}}"]},
        {"kind": "device", "path": f"{path}/i2c-dev/i2c-{{{var}}}", "class": "i2c-dev",
         "parent": path, "dev": f"i2c-{{{var}}}", "devnum": f"{I2C_MAJOR}:{{{var}}}",
         "module": ["i2c_dev", owner], "requires": ["i2c_dev"], "unbind_waits": True},
    ]


def _i2c_modules() -> dict:
    return {
        "i2c_core": _mod(builtin=True),
        "i2c_dev": _mod(nodes=_dirs("/sys/class/i2c-dev")),
        "i2c_smbus": _mod(),
        "i2c_i801": _mod(["i2c_smbus"], pci_driver="i801_smbus"),
    }


# ---- turing --------------------------------------------------------------------------------
def turing_state() -> dict:
    """The state of the ``turing`` host (module docstring)."""
    gpu, audio, xhci, ucsi = TURING
    st = H._nvidia_state()
    st["devices"].update({
        xhci: {"native": "xhci_hcd", "group": "1"},
        ucsi: {"native": "nvidia-gpu", "group": "1"},
        HOST_XHCI: {"native": "xhci_hcd", "group": "3"},
        SMBUS: {"native": "i801_smbus", "group": "2"},
    })
    st["modules"].update(_usb_modules())
    st["modules"].update(_i2c_modules())
    st["modules"].update({
        "i2c_nvidia_gpu": _mod(pci_driver="nvidia-gpu"),
        "roles": _mod(),
        "typec": _mod(nodes=_dirs("/sys/class/typec")),
        "typec_ucsi": _mod(["roles", "typec"]),
        "ucsi_ccg": _mod(["typec_ucsi"], bus_drivers=[("i2c", "ucsi_ccg")]),
    })
    plain = {"evicts_firmware_fb": False, "unbind_waits_for_holders": False}
    st["drivers"].update({"xhci_hcd": {"module": "xhci_pci", **plain},
                          "nvidia-gpu": {"module": "i2c_nvidia_gpu", **plain},
                          "i801_smbus": {"module": "i2c_i801", **plain}})
    nodes = st["driver_nodes"]
    info = next(s for s in nodes["nvidia"][gpu] if s["kind"] == "proc")
    info["text"] = info["text"].replace("RTX 3060 Ti", "RTX 2080")
    for n in (1, 3, 5, 6):   # the proprietary driver's DDC/aux adapters, one per connector
        nodes["nvidia"][gpu] += _i2c_adapter(f"ddc{n}", f"NVIDIA i2c adapter {n} at 1:00.0",
                                              "nvidia")
    client = "i2c-{i2c}/{i2c}-0008"
    nodes["xhci_hcd"] = {
        HOST_XHCI: _xhci(HOST_XHCI, 1, [_hid_device(HOST_XHCI, 1, 2, "046d", "c31c", "Logitech",
                                                     "USB Keyboard", event=3, hidraw=0)]),
        xhci: _xhci(xhci, 3, [_hid_device(xhci, 3, 1, "046d", "c077", "Logitech",
                                          "USB Optical Mouse", event=4, hidraw=1, mouse=0)]),
    }
    nodes["nvidia-gpu"] = {ucsi: _i2c_adapter("i2c", "NVIDIA GPU I2C adapter",
                                        "i2c_nvidia_gpu") + [
        {"kind": "device", "path": client, "bus": "i2c",
         "attrs": {"name": "ccgx-ucsi"}, "uevent": "MODALIAS=i2c:ccgx-ucsi\n"},
        {"kind": "bind", "path": client, "bus": "i2c", "driver": "ucsi_ccg",
         "requires": ["ucsi_ccg"]},
        {"kind": "device", "path": f"{client}/typec/port0", "class": "typec", "parent": client,
         "requires": ["ucsi_ccg"], "uevent": "DEVTYPE=typec_port\nTYPEC_PORT=port0\n",
         "attrs": {"data_role": "[host] device", "power_role": "[source] sink",
                   "port_type": "dual", "usb_typec_revision": "1.2"}},
    ]}
    nodes["i801_smbus"] = {SMBUS: _i2c_adapter("i2c", "SMBus I801 adapter at efa0",
                                             "i2c_i801")}
    st["counters"] = _counters()
    return st


#: Built-in buses and classes of the shapes with USB and i2c (input core and i2c core are
#: built in on Debian's kernel).
_BUILTIN_DIRS = ("/sys/bus/i2c/devices", "/sys/bus/i2c/drivers", "/sys/class/i2c-adapter",
                 "/sys/class/input", "/dev/input", "/dev/bus/usb")


def build_turing_host(root: str, firmware: str = "efi") -> None:
    """Make the empty directory ``root`` the ``turing`` host (module docstring)."""
    gpu, audio, xhci, ucsi = TURING
    H._skeleton(root, H._state_for(turing_state(), firmware), [
        (gpu, "0x10de", "0x1e87", "0x030000", "1"),
        (audio, "0x10de", "0x10f8", "0x040300", None),
        (xhci, "0x10de", "0x1ad8", "0x0c0330", None),
        (ucsi, "0x10de", "0x1ad9", "0x0c8000", None),
        (HOST_XHCI, "0x8086", "0x7ae0", "0x0c0330", None, "3", H.ROOT_BUS),
        (SMBUS, "0x8086", "0x7aa3", "0x0c0500", None, "2", H.ROOT_BUS),
    ], firmware, _BUILTIN_DIRS, CMDLINE)
    H._boot(root, ["i2c_dev", "i2c_i801", "snd_hda_intel", "nvidia", "nvidia_modeset",
                   "nvidia_uvm", "nvidia_drm", "xhci_pci", "usbhid", "hid_generic", "evdev",
                   "i2c_nvidia_gpu", "ucsi_ccg"], firmware)


# ---- twogpu --------------------------------------------------------------------------------
def twogpu_state(vfio_ids: bool = False) -> dict:
    """The state of ``twogpu`` (``vfio_ids``: of ``twogpu-vfio``; module docstring)."""
    modules = H._vfio_modules()
    modules.update({
        "wmi": _mod(), "video": _mod(["wmi"]), "rc_core": _mod(), "cec": _mod(["rc_core"]),
        "i2c_algo_bit": _mod(), "drm_kms_helper": _mod(),
        "drm_display_helper": _mod(["drm_kms_helper", "cec"]),
        "drm_buddy": _mod(), "ttm": _mod(), "drm_ttm_helper": _mod(["ttm"]), "gpu_sched": _mod(),
        "i915": _mod(["drm_buddy", "video", "drm_display_helper", "cec", "ttm",
                      "drm_kms_helper", "i2c_algo_bit"], pci_driver="i915"),
        "amdgpu": _mod(["gpu_sched", "drm_buddy", "video", "drm_display_helper",
                        "drm_ttm_helper", "ttm", "drm_kms_helper", "i2c_algo_bit"],
                       pci_driver="amdgpu", nodes=H.kfd_nodes()),
    })
    drivers = H._common_drivers()
    drm = {"evicts_firmware_fb": True, "unbind_waits_for_holders": False}
    drivers["i915"] = {"module": "i915", **drm}
    drivers["amdgpu"] = {"module": "amdgpu", **drm}
    if vfio_ids:
        drivers["vfio-pci"]["ids"] = ["1002:73bf", "1002:ab28"]
    return {
        "kernel": H.KERNEL_RELEASE,
        "devices": {
            H.BRIDGE: {"native": "pcieport", "group": "0"},
            H.ONBOARD_AUDIO: {"native": "snd_hda_intel", "group": "2"},
            IGPU: {"native": "i915", "group": "4"},
            DGPU: {"native": "amdgpu", "group": "1"},
            DGPU_AUDIO: {"native": "snd_hda_intel", "group": "1"},
        },
        "modules": modules,
        "drivers": drivers,
        "driver_nodes": {
            "i915": {IGPU: [H._drm("card0", 0, "i915"), H._drm("renderD128", 128, "i915"),
                            {"kind": "fb", "name": "i915drmfb"}]},
            "amdgpu": {DGPU: [H._drm("card1", 1, "amdgpu"), H._drm("renderD129", 129, "amdgpu"),
                              {"kind": "fb", "name": "amdgpudrmfb"},
                              H.kfd_gpu_node(DGPU, 1, 129, 0x73bf, 5234)]},
            "snd_hda_intel": {
                H.ONBOARD_AUDIO: H._sound_card(0, [("controlC0", 11), ("pcmC0D0p", 3)]),
                DGPU_AUDIO: H._sound_card(1, [("controlC1", 31), ("pcmC1D3p", 19)]),
            },
        },
        "boot_vga": IGPU,
        "platform": {"efi-framebuffer.0": {"driver": "efi-framebuffer", "fb": "EFI VGA",
                                           "firmware_fb": True}},
        "fbs": {}, "live": {}, "stale": [],
    }


def _build_twogpu(root: str, firmware: str, vfio_ids: bool) -> None:
    cmdline = CMDLINE + (" vfio-pci.ids=1002:73bf,1002:ab28 modprobe.blacklist=amdgpu"
                         if vfio_ids else "")
    H._skeleton(root, H._state_for(twogpu_state(vfio_ids), firmware), [
        (IGPU, "0x8086", "0x4680", "0x030000", "1", "4", H.ROOT_BUS),
        (DGPU, "0x1002", "0x73bf", "0x030000", "0"),
        (DGPU_AUDIO, "0x1002", "0xab28", "0x040300", None),
    ], firmware, (), cmdline)
    boot = ["snd_hda_intel", "i915"] + ([] if vfio_ids else ["amdgpu"])
    H._boot(root, (["vfio_pci"] if vfio_ids else []) + boot, firmware)


def build_twogpu_host(root: str, firmware: str = "efi") -> None:
    """Make the empty directory ``root`` the ``twogpu`` host (module docstring)."""
    _build_twogpu(root, firmware, False)


def build_twogpu_vfio_host(root: str, firmware: str = "efi") -> None:
    """Make the empty directory ``root`` the ``twogpu-vfio`` host (module docstring)."""
    _build_twogpu(root, firmware, True)


# ---- bios-text -----------------------------------------------------------------------------
def build_bios_text_host(root: str, firmware: str = "bios") -> None:
    """Make the empty directory ``root`` the ``bios-text`` host (module docstring).

    :raises ValueError: a firmware other than ``"bios"``."""
    if firmware != "bios":
        raise ValueError("bios-text is booted by a BIOS: firmware must be 'bios'")
    H._skeleton(root, H._state_for(H._nvidia_state(), "bios"), [
        ("0000:01:00.0", "0x10de", "0x2484", "0x030000", "1"),
        ("0000:01:00.1", "0x10de", "0x228b", "0x040300", None),
    ], "bios", (), CMDLINE + " nomodeset")
    H._boot(root, ["snd_hda_intel", "nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"],
            "bios")


BUILDERS = {"turing": build_turing_host, "twogpu": build_twogpu_host,
            "twogpu-vfio": build_twogpu_vfio_host, "bios-text": build_bios_text_host}
