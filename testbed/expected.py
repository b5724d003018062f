"""The changes the kernel itself makes during a prepare/release cycle: the one definition.

A release gives the host back as it was, except for what the kernel does on its own when
vfio-pci takes the boot VGA function, and for vfio-pci, which stays loaded by design. The
demo, the tests on the simulated host and the kernel tests on a real kernel all compare the
host before and after with :func:`classify_changes`, and name the expected changes with the
functions below (so a test can ask for exactly these lines).

Expected (Linux ``drivers/video/aperture.c``, ``drivers/video/fbdev/core/fbcon.c``,
``drivers/tty/vt/vt.c``; FIELD-NOTES §2, §6; seen on Linux 6.1 in the kernel tests' guests):

- a firmware framebuffer platform device (:data:`FIRMWARE_FBS`) *removed*, entirely: the
  kernel deletes it when vfio-pci (or a DRM driver) takes the boot VGA function; nothing can
  bring it back before a reboot. It is ``/sys/devices/platform/<dev>`` up to Linux 6.8; since
  6.9 sysfb makes it a child of the boot VGA's PCI function
  (``/sys/devices/pci0000:00/.../0000:01:00.0/efi-framebuffer.0``, ``drivers/firmware/sysfb.c``
  ``sysfb_parent_dev``; seen on Debian's 6.12): found through its
  ``/sys/bus/platform/devices/<dev>`` link either way;
- its line *removed* from ``/proc/fb`` (other lines unchanged), and its ``/dev/fbN`` node;
- fbcon's vtconsole (name containing ``frame buffer``) *removed*, entirely, when ``/proc/fb``
  is left empty: fbcon unregisters with the last framebuffer; if it was bound, another
  vtconsole's ``bind`` going from 0 to 1 (the driver that took the consoles over,
  ``do_unbind_con_driver``; nothing else of it changed);
- the VGA text console's vtconsole (vgacon, name containing ``VGA+``, bound) *removed*,
  entirely, and the console driver that took its consoles over (name containing ``dummy
  device``) bound: *added* with ``bind`` 1, or an existing one's ``bind`` going from 0 to 1.
  The VGA arbiter does this when vfio-pci (or a DRM driver) takes the boot VGA function
  (``vga_remove_vgacon``: "vgaarb: deactivate vga console"; ``drivers/pci/vgaarb.c``,
  ``drivers/video/aperture.c``); vgacon does not come back before a reboot. Seen on Linux 6.1
  in the kernel tests' guest (SeaBIOS, ``nomodeset``): ``vtcon0`` ``(S) VGA+`` gone,
  ``vtcon1`` ``(M) dummy device`` added, bound;
- devices *renumbered* below a function that was unbound and bound again: its driver creates
  its child devices anew and the kernel numbers them again -- i2c adapters take the lowest free
  number (``idr_alloc``: an adapter may come back as another ``i2c-N``, with its clients
  ``N-00XX`` and ``/dev/i2c-N``), HID devices (``0003:VVVV:PPPP.NNNN``) and input devices
  (``inputN``) take the next number of counters that only grow. Claimed only when the changed
  paths and values, with those numbers blanked, are the same before and after: a device that
  did not come back is not a renumbering;
- ``/sys/module/<m>`` for :data:`VFIO_MODULES` and ``/sys/bus/pci/drivers/vfio-pci`` *added*.

Snapshots are flat trees ``{host path: (kind, value)}``, kind ``"dir"`` (value None),
``"link"`` (its target) or ``"file"`` (its text, or None): :func:`testbed.sim.hosts.snapshot`
gives the whole simulated host; the kernel tests' guest builds the same shape from the real
``/sys``, ``/proc/fb`` and ``/dev`` for the paths it compares.
"""

from __future__ import annotations

import re
from collections import Counter
from fnmatch import fnmatchcase

#: Firmware framebuffer platform device -> its ``/proc/fb`` name (efifb, simplefb, vesafb).
FIRMWARE_FBS = {"efi-framebuffer.0": "EFI VGA", "simple-framebuffer.0": "simple",
                "vesa-framebuffer.0": "VESA VGA"}
#: vfio-pci and the modules it pulls in: left loaded by design (unloading them on release
#: breaks another VM that uses vfio-pci; FIELD-NOTES §6). ``irqbypass`` and ``vfio_virqfd``
#: come with it on a real kernel.
VFIO_MODULES = ("vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci", "irqbypass",
                "vfio_virqfd")
VTCONSOLES = "/sys/devices/virtual/vtconsole"

#: Families of names the kernel numbers at run time: ``(patterns naming a device (regex,
#: replacement with the number blanked), patterns of numbers in values of those devices' own
#: files, the pattern of a device directory's name)``.
RENUMBERED = {
    "i2c adapters": (
        [(re.compile(r"\bi2c-\d+\b"), "i2c-#"),
         (re.compile(r"(?<=/)\d+-00([0-9a-f]{2})\b"), r"#-00\1")],
        [(re.compile(r"^89:\d+$", re.M), "89:#"), (re.compile(r"\bMINOR=\d+"), "MINOR=#")],
        re.compile(r"i2c-\d+|\d+-00[0-9a-f]{2}")),
    "HID and input devices": (
        [(re.compile(r"\b([0-9A-F]{4}:[0-9A-F]{4}:[0-9A-F]{4})\.[0-9A-F]{4}\b"), r"\1.#"),
         (re.compile(r"\binput\d+\b"), "input#")],
        [],
        re.compile(r"[0-9A-F]{4}:[0-9A-F]{4}:[0-9A-F]{4}\.[0-9A-F]{4}|input\d+")),
}


# ---- the lines naming each expected change --------------------------------------------------

def fb_removed(dev: str) -> str:
    """Firmware framebuffer device ``dev`` (``efi-framebuffer.0``) removed by the kernel."""
    return (f"firmware framebuffer {dev} removed: the kernel deletes it when vfio-pci takes the "
            f"boot VGA function (aperture eviction)")


def proc_fb_gone(lines: list[str]) -> str:
    """Its ``/proc/fb`` lines (``["0 EFI VGA"]``) gone with it."""
    return f"/proc/fb: {', '.join(repr(g) for g in lines)} gone with it"


def fb_node_gone(node: str) -> str:
    """Its ``/dev/fbN`` node gone with it."""
    return f"{node} gone with it"


def vtcon_removed(vtcon: str, name: str) -> str:
    """fbcon's vtconsole ``vtcon`` (name ``(M) frame buffer device``) gone."""
    return f"{vtcon} ({name}) removed: fbcon unregistered with the last framebuffer"


def vtcon_took_over(vtcon: str, name: str, fbcons: list[str]) -> str:
    """``vtcon`` (``(S) dummy device``) bound now: it took the consoles of ``fbcons``."""
    return f"{vtcon} ({name}) bound: it took the consoles over from fbcon's {', '.join(fbcons)}"


def vgacon_replaced(vtcon: str, name: str, by: str, by_name: str) -> str:
    """The VGA text console's vtconsole ``vtcon`` (``(S) VGA+``) removed by the VGA arbiter;
    ``by`` (``(M) dummy device``) holds its consoles now."""
    return (f"{vtcon} ({name}) removed: the VGA arbiter deactivated the VGA text console when "
            f"vfio-pci took the boot VGA function; {by} ({by_name}) holds the consoles")


def text_consoles_replaced(expected: list[str]) -> list[str]:
    """The vtconsoles (``vtcon0``) of the :func:`vgacon_replaced` lines in ``expected``: a
    release must have reported each of these removals in its vtconsoles step's notes."""
    return [line.split()[0] for line in expected
            if "removed: the VGA arbiter deactivated the VGA text console" in line]


def renumbered(family: str, pairs: list[tuple[str, str]]) -> str:
    """``family`` (:data:`RENUMBERED`) devices created again with new numbers, ``pairs`` of
    (before, after) names."""
    names = ", ".join(f"{b} -> {a}" for b, a in pairs) or "same names, other devices"
    return (f"{family} renumbered by the kernel when they were created again ({names}, "
            f"with what is below them)")


def vfio_left_loaded(modules: list[str]) -> str:
    """vfio-pci (``modules`` of :data:`VFIO_MODULES` that were loaded) left loaded."""
    return f"vfio-pci left loaded by design (modules: {', '.join(modules) or '-'})"


# ---- the comparison ----------------------------------------------------------------------------

def classify_changes(before: dict, after: dict) -> tuple[list[str], dict]:
    """Split the differences between two snapshots (module docstring) into the ones the
    kernel itself makes and everything else.

    :param before: ``{host path: ("dir"|"link"|"file", value)}``.
    :param after: the same shape, later.
    :returns: ``(expected, unexpected)``: the lines above for each expected change that
        occurred (in this order: framebuffer device, ``/proc/fb``, ``/dev/fbN``, fbcon's
        vtconsole, the takeover, vgacon, renumbered i2c adapters, renumbered HID and input
        devices, vfio-pci), and ``{path: (before value or None, after value or
        None)}`` for every other difference.
    """
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    expected: list[str] = []

    def under(path: str, top: str) -> bool:
        return path == top or path.startswith(top + "/")

    def claim(paths: set, kind: str) -> bool:
        """True when ``paths`` is non-empty and every path was purely removed/added."""
        if not paths:
            return False
        if kind == "removed":
            ok = all(p in before and p not in after for p in paths)
        else:
            ok = all(p in after and p not in before for p in paths)
        if ok:
            changed.difference_update(paths)
        return ok

    removed_fbs = []
    for dev, fbname in FIRMWARE_FBS.items():
        top = _platform_dir(before, dev)
        if not (top in before and top not in after):
            continue
        paths = {p for p in changed if under(p, top)
                 or p == f"/sys/bus/platform/devices/{dev}"
                 or fnmatchcase(p, f"/sys/bus/platform/drivers/*/{dev}")}
        if claim(paths, "removed"):
            removed_fbs.append(fbname)
            expected.append(fb_removed(dev))

    fb_before = (before.get("/proc/fb") or ("file", ""))[1] or ""
    fb_after = (after.get("/proc/fb") or ("file", ""))[1] or ""
    if "/proc/fb" in changed:
        lines_b, lines_a = fb_before.splitlines(), fb_after.splitlines()
        gone = [ln for ln in lines_b if ln not in lines_a]
        if (gone and [ln for ln in lines_b if ln not in gone] == lines_a
                and all(ln.partition(" ")[2] in removed_fbs for ln in gone)):
            changed.discard("/proc/fb")
            expected.append(proc_fb_gone(gone))
            for ln in gone:
                node = f"/dev/fb{ln.partition(' ')[0]}"
                if claim({node} & changed, "removed"):
                    expected.append(fb_node_gone(node))

    fbcon_gone = []
    if fb_after.strip() == "":
        for p in sorted(changed):
            m = re.fullmatch(r"/sys/class/vtconsole/(vtcon\d+)", p)
            if not m or p not in before or p in after:
                continue
            v = m.group(1)
            name = (before.get(f"{VTCONSOLES}/{v}/name") or ("file", ""))[1] or ""
            if "frame buffer" not in name:
                continue
            if claim({q for q in changed if q == p or under(q, f"{VTCONSOLES}/{v}")}, "removed"):
                expected.append(vtcon_removed(v, name.strip()))
                if (before.get(f"{VTCONSOLES}/{v}/bind") or ("", ""))[1] == "1\n":
                    fbcon_gone.append(v)
    if fbcon_gone:
        # the consoles fbcon held went to another console driver (vt.c do_unbind_con_driver),
        # which keeps them: its bind reads 1 now, nothing else of it changed
        for p in sorted(changed):
            m = re.fullmatch(re.escape(VTCONSOLES) + r"/(vtcon\d+)/bind", p)
            if (m and before.get(p) == ("file", "0\n") and after.get(p) == ("file", "1\n")
                    and not any(q != p and under(q, f"{VTCONSOLES}/{m.group(1)}")
                                for q in changed)):
                changed.discard(p)
                v = m.group(1)
                name = ((after.get(f"{VTCONSOLES}/{v}/name") or ("", ""))[1] or "").strip()
                expected.append(vtcon_took_over(v, name, fbcon_gone))

    def vt_name(tree: dict, v: str) -> str:
        return ((tree.get(f"{VTCONSOLES}/{v}/name") or ("file", ""))[1] or "").strip()

    for p in sorted(changed):
        m = re.fullmatch(r"/sys/class/vtconsole/(vtcon\d+)", p)
        if not m or p not in before or p in after:
            continue
        v = m.group(1)
        if "VGA+" not in vt_name(before, v) or \
                (before.get(f"{VTCONSOLES}/{v}/bind") or ("", ""))[1] != "1\n" or \
                any(under(q, f"{VTCONSOLES}/{v}") for q in after):   # all of it gone
            continue
        # the console driver that took vgacon's consoles (vgaarb.c vga_remove_vgacon ->
        # do_take_over_console(&dummy_con)): a new vtconsole, bound, or one bound now
        takers = []
        for q in sorted(changed):
            t = re.fullmatch(re.escape(VTCONSOLES) + r"/(vtcon\d+)/bind", q)
            if not t or t.group(1) == v or "dummy device" not in vt_name(after, t.group(1)):
                continue
            w = t.group(1)
            mine = {c for c in changed if c == f"/sys/class/vtconsole/{w}"
                    or under(c, f"{VTCONSOLES}/{w}")}
            if after.get(q) != ("file", "1\n"):
                continue
            if before.get(q) is None and all(c in after and c not in before for c in mine):
                takers.append((w, mine))
            elif before.get(q) == ("file", "0\n") and mine == {q}:
                takers.append((w, mine))
        gone = {c for c in changed if c == p or under(c, f"{VTCONSOLES}/{v}")}
        if len(takers) == 1 and claim(gone, "removed"):
            w, mine = takers[0]
            changed.difference_update(mine)
            expected.append(vgacon_replaced(v, vt_name(before, v), w, vt_name(after, w)))

    for family, (names, numbers, leaf) in RENUMBERED.items():
        line = _renumbered(family, names, numbers, leaf, before, after, changed)
        if line:
            expected.append(line)

    loaded = [m for m in VFIO_MODULES
              if claim({p for p in changed if under(p, f"/sys/module/{m}")}, "added")]
    drv = claim({p for p in changed if under(p, "/sys/bus/pci/drivers/vfio-pci")}, "added")
    if loaded or drv:
        expected.append(vfio_left_loaded(loaded))
    return expected, {p: (before.get(p), after.get(p)) for p in sorted(changed)}


def _platform_dir(tree: dict, dev: str) -> str:
    """The directory of platform device ``dev`` in snapshot ``tree``: below the PCI function
    it belongs to (Linux 6.9+ sysfb, module docstring) or ``/sys/devices/platform/<dev>``."""
    for p, (kind, _) in tree.items():
        if kind == "dir" and p.startswith("/sys/devices/") and p.endswith(f"/{dev}"):
            return p
    return f"/sys/devices/platform/{dev}"


def _renumbered(family, names, numbers, leaf, before, after, changed: set) -> str | None:
    """The line for ``family`` when the changed paths it names are the same before and after
    once their numbers are blanked (then they leave ``changed``); else None."""
    def blank(text, pats):
        for rx, rep in pats:
            text = rx.sub(rep, text)
        return text

    def value(v):
        kind, text = v
        return (kind, blank(blank(text, names), numbers) if isinstance(text, str) else text)

    def named(p: str) -> bool:
        vals = [v[1] for v in (before.get(p), after.get(p)) if v and isinstance(v[1], str)]
        return blank(p, names) != p or any(blank(t, names) != t for t in vals)

    cands = {p for p in changed if named(p)}
    if not cands:
        return None
    was = Counter((blank(p, names), value(before[p])) for p in cands if p in before)
    now = Counter((blank(p, names), value(after[p])) for p in cands if p in after)
    if was != now:
        return None
    changed.difference_update(cands)
    # the renumbered devices at the top (not below another one), each side's names in order
    keys = {blank(p, names) for p in cands
            if leaf.fullmatch(p.rsplit("/", 1)[-1])
            and blank(p.rsplit("/", 1)[0], names) == p.rsplit("/", 1)[0]
            and "dir" in {(before.get(p) or ("",))[0], (after.get(p) or ("",))[0]}}

    def names_at(tree: dict, key: str) -> list[str]:
        parent = key.rsplit("/", 1)[0] + "/"
        return sorted((p.rsplit("/", 1)[-1] for p, v in tree.items()
                       if v[0] == "dir" and p.startswith(parent) and "/" not in p[len(parent):]
                       and blank(p, names) == key), key=_natural)

    pairs = [(b, a) for key in sorted(keys)
             for b, a in zip(names_at(before, key), names_at(after, key)) if b != a]
    return renumbered(family, pairs)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def framebuffer_removed(expected: list[str]) -> bool:
    """True when ``expected`` (from :func:`classify_changes`) holds a firmware framebuffer
    removal: the product's release must then have said so in its framebuffer step's notes."""
    return any(line.startswith("firmware framebuffer ") for line in expected)
