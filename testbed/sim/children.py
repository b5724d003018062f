"""Child devices in the simulated kernel: what a driver creates below its PCI function (USB root
hubs and the devices on them, i2c adapters and their clients, HID and input devices, typec
ports) and module-wide virtual devices (``/sys/devices/virtual/kfd/kfd``), with their bus and
class links, their driver links and their ``/dev`` nodes.

Two node kinds of :data:`testbed.sim.kernel.STATE_DOC` live here:

- ``device``: a device directory. ``path`` is relative to the PCI function's directory
  (``usb3/3-1``) or absolute (``/sys/devices/virtual/kfd/kfd``); ``bus`` (``usb``, ``i2c``,
  ``hid``) gives it ``subsystem -> /sys/bus/BUS`` and ``/sys/bus/BUS/devices/NAME``; ``class``
  (``input``, ``i2c-dev``, ``typec``, ``hidraw``, ``kfd``) gives it ``subsystem ->
  /sys/class/CLASS``, ``/sys/class/CLASS/NAME`` and a ``device`` link to ``parent`` (relative
  path, ``""`` the function itself, null for a virtual device: no link); ``attrs`` are read-only
  files; ``uevent`` is written after ``MAJOR``/``MINOR``/``DEVNAME`` when ``devnum``/``dev``
  are set, and ``dev`` (``input/event3``) is the ``/dev`` node, pinning ``module`` (or each
  of a list) while open; ``unbind_waits``: while that node is open, the remove() of the
  function's driver blocks (an i2c adapter's ``/dev/i2c-N``); ``links`` are more host paths
  linking to it (``/sys/class/i2c-adapter/i2c-5``). Removing it
  removes the whole directory, its links and node, and the class glue directory
  (``.../input``, ``.../i2c-dev``) left empty, as ``device_del`` does.
- ``bind``: the device at ``path`` bound to ``driver`` on ``bus``: ``path/driver ->
  /sys/bus/BUS/drivers/DRV`` and ``/sys/bus/BUS/drivers/DRV/NAME -> path``.

Names the kernel numbers at run time are ``{var}`` fields in ``path``, ``dev``, ``devnum``,
``attrs``, ``uevent`` and ``links`` (Python ``str.format``, e.g. ``i2c-{i2c}``,
``0003:046D:C31C.{hid:04X}``), set per function in ``state["vars"][ADDR]`` by the spec that
allocates them: ``"seq": {VAR: COUNTER}``, from ``state["counters"][COUNTER]``:

- ``{"mode": "lowest", "start": 0, "taken": [...]}``: the lowest free number, given back when
  the allocating node is removed (``idr_alloc``: i2c adapter numbers, ``i2c_add_adapter``);
- ``{"mode": "next", "next": N}``: a number that only grows (``atomic_inc_return``: HID
  device names ``hid_add_device``, input devices ``input_register_device``), so a device
  created again gets a new name.

``requires`` (a module or a list) names the modules every one of which must be loaded for the
node to exist; loading the last one creates it (on a function its driver still drives), and
unloading any of them removes it (:mod:`testbed.sim.kernel`).
"""

from __future__ import annotations

import contextlib
import os

from . import kernel as K


def requires_of(spec: dict) -> list[str]:
    """The modules ``spec`` needs loaded (its ``requires`` as a list)."""
    req = spec.get("requires")
    if not req:
        return []
    return [req] if isinstance(req, str) else list(req)


def _vars(k, addr: str) -> dict:
    return k.st.setdefault("vars", {}).setdefault(addr or "-", {})


def fmt(k, addr: str, text: str) -> str:
    """``text`` with the function's run-time numbers filled in.

    :raises KeyError: a number that was never allocated (the node never existed)."""
    return text.format_map(_vars(k, addr)) if "{" in text else text


def path_of(k, addr: str, spec: dict) -> str:
    """Host path of the device directory of ``spec`` (module docstring)."""
    p = fmt(k, addr, spec["path"])
    return p if p.startswith("/") else f"{k.dev_dir(addr)}/{p}"


def _allocate(k, addr: str, spec: dict) -> None:
    counters = k.st.setdefault("counters", {})
    for var, name in spec.get("seq", {}).items():
        c = counters[name]
        if c["mode"] == "lowest":
            n = c.get("start", 0)
            while n in c["taken"]:
                n += 1
            c["taken"].append(n)
        else:
            n = c["next"]
            c["next"] = n + 1
        _vars(k, addr)[var] = n


def _release(k, addr: str, spec: dict) -> None:
    counters = k.st.setdefault("counters", {})
    for var, name in spec.get("seq", {}).items():
        c = counters[name]
        n = _vars(k, addr).get(var)
        if c["mode"] == "lowest" and n in c["taken"]:
            c["taken"].remove(n)


def present(k, addr: str, spec: dict) -> bool:
    """True when the node of ``spec`` exists (``device``: its directory; ``bind``: its link)."""
    try:
        d = path_of(k, addr, spec)
    except KeyError:
        return False
    if spec["kind"] == "bind":
        return os.path.lexists(k.r(f"{d}/driver"))
    return os.path.isdir(k.r(d))


def create(k, addr: str, spec: dict) -> None:
    """Create the node of ``spec`` for function ``addr`` (``""``: module-wide)."""
    root = k.root
    if spec["kind"] == "bind":
        d = path_of(k, addr, spec)
        drv = f"/sys/bus/{spec['bus']}/drivers/{spec['driver']}"
        K.mklink(root, f"{d}/driver", drv)
        K.mklink(root, f"{drv}/{os.path.basename(d)}", d)
        return
    _allocate(k, addr, spec)
    d = path_of(k, addr, spec)
    name = os.path.basename(d)
    K.mkdir(root, d)
    for attr, text in spec.get("attrs", {}).items():
        K.mkfile(root, f"{d}/{attr}", fmt(k, addr, text) + "\n", 0o444)
    uevent = ""
    if spec.get("devnum"):
        devnum = fmt(k, addr, spec["devnum"])
        major, minor = devnum.split(":")
        uevent = f"MAJOR={major}\nMINOR={minor}\n"
        K.mkfile(root, f"{d}/dev", devnum + "\n", 0o444)
    if spec.get("dev"):
        uevent += f"DEVNAME={fmt(k, addr, spec['dev'])}\n"
    if uevent or spec.get("bus") or spec.get("class") or "uevent" in spec:
        # a device has a uevent file; a plain kobject directory (kfd's topology) has none
        K.mkfile(root, f"{d}/uevent", uevent + fmt(k, addr, spec.get("uevent", "")), 0o644)
    if spec.get("bus"):
        K.mklink(root, f"{d}/subsystem", f"/sys/bus/{spec['bus']}")
        K.mklink(root, f"/sys/bus/{spec['bus']}/devices/{name}", d)
    if spec.get("class"):
        K.mklink(root, f"{d}/subsystem", f"/sys/class/{spec['class']}")
        K.mklink(root, f"/sys/class/{spec['class']}/{name}", d)
        parent = spec.get("parent", "")
        if parent is not None:
            pd = fmt(k, addr, parent)
            K.mklink(root, f"{d}/device",
                     pd if pd.startswith("/") else f"{k.dev_dir(addr)}/{pd}".rstrip("/"))
    for link in spec.get("links", []):
        K.mklink(root, fmt(k, addr, link), d)
    if spec.get("dev"):
        k._make_dev("/dev/" + fmt(k, addr, spec["dev"]), spec.get("module"))


def remove(k, addr: str, spec: dict) -> None:
    """Remove the node of ``spec`` (absent parts are skipped)."""
    root = k.root
    try:
        d = path_of(k, addr, spec)
    except KeyError:
        return
    name = os.path.basename(d)
    if spec["kind"] == "bind":
        K.remove(root, f"{d}/driver")
        K.remove(root, f"/sys/bus/{spec['bus']}/drivers/{spec['driver']}/{name}")
        return
    if spec.get("dev"):
        k._drop_dev("/dev/" + fmt(k, addr, spec["dev"]))
    for link in spec.get("links", []):
        K.remove(root, fmt(k, addr, link))
    if spec.get("bus"):
        K.remove(root, f"/sys/bus/{spec['bus']}/devices/{name}")
    if spec.get("class"):
        K.remove(root, f"/sys/class/{spec['class']}/{name}")
    K.remove(root, d)
    glue = os.path.dirname(d)
    if spec.get("class") and os.path.basename(glue) == spec["class"]:
        with contextlib.suppress(OSError):
            os.rmdir(k.r(glue))
    _release(k, addr, spec)


def register_bus_driver(k, module: str, bus: str, name: str) -> None:
    """``driver_register()`` of ``name`` on ``bus`` by ``module``: its directory and links."""
    base = f"/sys/bus/{bus}/drivers/{name}"
    K.mkdir(k.root, base)
    for attr in ("bind", "unbind", "uevent"):
        K.mkfile(k.root, f"{base}/{attr}", "", 0o200)
    K.mklink(k.root, f"{base}/module", f"/sys/module/{module}")
    K.mklink(k.root, f"/sys/module/{module}/drivers/{bus}:{name}", base)


def unregister_bus_driver(k, bus: str, name: str) -> None:
    """``driver_unregister()``: the driver's directory goes (its devices were unbound first)."""
    K.remove(k.root, f"/sys/bus/{bus}/drivers/{name}")
