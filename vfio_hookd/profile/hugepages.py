"""The ``hugepages`` profile key: ``none`` (the default), ``auto``, or ``{pages: N, size: S}``.

Checked here as a rule of :mod:`vfio_hookd.profile.rules` (``check``), with the page size
read by :func:`parse_size`. Whether the host has a pool of that size is a fact of the host,
checked when a prepare is planned (:func:`vfio_hookd.steps.hugepages.resolve`), not here: a
profile is valid or not whatever host it is read on.
"""

from __future__ import annotations

import re

from .model import AUTO, MAX_HUGEPAGES_KIB, NONE, Hugepages, size_text
from .reader import Field

#: The sub-keys of an explicit request, in documented order.
KEYS = ("pages", "size")

# "2M", "1G", "2048K", "2MiB", "1 GiB", "2048kB": a number and a binary unit (the kernel's
# hugepagesz= takes K/M/G, Documentation/admin-guide/mm/hugetlbpage.rst)
_SIZE_RE = re.compile(r"([0-9]+)\s*([KkMmGg])(?:i?B)?")
_FACTOR = {"k": 1, "m": 1024, "g": 1024 ** 2}
_SHAPE = "'none', 'auto' or a mapping such as {pages: 8192, size: 2M}"


def parse_size(text) -> int | None:
    """A page size as written in a profile, in KiB (int): ``"2M"`` -> 2048, ``"1G"`` ->
    1048576, ``"64K"`` -> 64; None when ``text`` is not such a size or not a power of two
    (every hugepage size the kernel has is one)."""
    if not isinstance(text, str):
        return None
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        return None
    kib = int(m.group(1)) * _FACTOR[m.group(2).lower()]
    return kib if kib > 0 and kib & (kib - 1) == 0 else None


def check(f: Field, so_far: dict):
    """The ``hugepages`` rule: ``None`` for ``none``, ``"auto"``, or a :class:`Hugepages`.

    :raises HookdError: ``PROFILE_INVALID`` naming ``hugepages`` or ``hugepages.pages`` /
        ``hugepages.size`` (at their lines in a file).
    """
    v = f.value
    if isinstance(v, bool):   # YAML 1.1: yes/no/on/off/true/false
        f.fail(f"write 'auto' or {{pages: N, size: S}} to allocate hugepages, 'none' for none "
               f"(not {str(v).lower()})")
    if isinstance(v, str):
        if v in (AUTO, NONE):
            return None if v == NONE else AUTO
        f.fail(f"must be {_SHAPE}, got {v!r}")
    if f.sub is None:
        kind = "list" if isinstance(v, list) else "a mapping with a key that is not a name" \
            if isinstance(v, dict) else type(v).__name__.replace("NoneType", "null")
        f.fail(f"must be {_SHAPE}, got {kind}")
    subs = {s.name: s for s in f.sub}   # known and unique: checked by the rules' _by_name
    if "pages" not in subs:
        f.fail("pages: missing: how many hugepages the VM needs, e.g. {pages: 8192, size: 2M} "
               "for 16 GiB")
    pages_f = subs["pages"]
    pages = pages_f.value
    if isinstance(pages, bool) or not isinstance(pages, int) or pages < 1:
        pages_f.fail(f"must be a whole number of pages >= 1, got {pages!r}")
    size = None
    if "size" in subs:
        size_f = subs["size"]
        size = parse_size(size_f.value)
        if size is None:
            size_f.fail(f"must be a page size such as 2M or 1G (the sizes of "
                        f"/sys/kernel/mm/hugepages/), got {size_f.value!r}")
    if pages * (size or 2048) > MAX_HUGEPAGES_KIB:
        pages_f.fail(f"{pages} pages of {size_text(size or 2048)} are more than 16 TiB")
    return Hugepages(pages, size)
