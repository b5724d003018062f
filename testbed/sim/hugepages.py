"""The simulated kernel's hugepage pools (``Documentation/admin-guide/mm/hugetlbpage.rst``).

Per page size a pool ``/sys/kernel/mm/hugepages/hugepages-<N>kB/`` (2 MiB and 1 GiB, as on
x86-64) with ``nr_hugepages`` (a write sets the persistent pages; a read gives persistent +
surplus, ``nr_hugepages_show_common``, as Linux 6.1 does in the kernel tests' guest), ``free_hugepages``,
``resv_hugepages``, ``surplus_hugepages`` and ``nr_overcommit_hugepages``; the default size's
pool also as ``/proc/sys/vm/nr_hugepages`` and in ``/proc/meminfo`` (``HugePages_Total`` ...
``Hugepagesize``); ``/proc/sys/vm/compact_memory`` (write-only). The counts live in the
state (``state["hugepages"]``, :data:`STATE_DOC`) and the files are rewritten from them after
every operation.

Behaviour, as the kernel's ``set_max_huge_pages`` (``mm/hugetlb.c``):

- growing ``nr_hugepages`` first promotes surplus pages to persistent ones, then allocates new
  pages while contiguous memory lasts (``contiguous_kb``), so it can stop short: the file then
  reads the count reached;
- ``compact_memory`` makes the fragmented memory (``fragmented_kb``) contiguous;
- shrinking frees free pages that are not reserved; the rest of the excess (in use or
  reserved) becomes surplus pages (also beyond ``nr_overcommit_hugepages``), freed when their
  user lets go (:func:`release_pages`).

Users of pages (a QEMU with its memory on hugetlbfs) are modelled by :func:`use_pages`
(``reserve``: mapped, not touched yet) and :func:`release_pages`.
"""

from __future__ import annotations

import re

from . import kernel as K

STATE_DOC = """
"hugepages": {"default_kb": 2048,          # Hugepagesize of /proc/meminfo
              "contiguous_kb": N,          # memory a new huge page can be allocated from
              "fragmented_kb": N,          # memory compact_memory makes contiguous
              "compactions": 0,            # how many times compact_memory was written
              "pools": {"2048": {"nr": 0 (persistent), "surplus": 0, "free": 0, "resv": 0,
                                 "overcommit": 0}, "1048576": {...}}}
"""

POOLS = "/sys/kernel/mm/hugepages"
COMPACT = "/proc/sys/vm/compact_memory"
SIZES = (2048, 1024 * 1024)
_NR = re.compile(r"/sys/kernel/mm/hugepages/hugepages-(\d+)kB/nr_hugepages")


def build(root: str, contiguous_kb: int = 8 * 1024 * 1024, fragmented_kb: int = 4 * 1024 * 1024,
          boot_pages: dict | None = None) -> None:
    """Give simulated host ``root`` its pools: empty, except ``boot_pages`` (``{size_kb: n}``,
    the ``hugepages=`` of the boot command line, taken from the contiguous memory), and
    ``contiguous_kb`` + ``fragmented_kb`` KiB of memory for more."""
    with K.locked_kernel(root) as k:
        hp = {"default_kb": SIZES[0], "contiguous_kb": contiguous_kb,
              "fragmented_kb": fragmented_kb, "compactions": 0,
              "pools": {str(s): {"nr": 0, "surplus": 0, "free": 0, "resv": 0, "overcommit": 0}
                        for s in SIZES}}
        for size, n in (boot_pages or {}).items():
            p = hp["pools"][str(size)]
            p["nr"] = p["free"] = n
            hp["contiguous_kb"] -= n * size
        k.st["hugepages"] = hp
        K.mkfile(root, COMPACT, "", 0o200)
        write_files(k)


def configure(root: str, contiguous_kb: int | None = None, fragmented_kb: int | None = None,
              boot_pages: dict | None = None) -> None:
    """Change the memory of host ``root``'s pools (KiB: ``contiguous_kb`` a new page can come
    from, ``fragmented_kb`` compaction makes contiguous) or put ``boot_pages`` (``{size_kb:
    n}``, free, as ``hugepages=`` at boot) in them; None leaves a value as it is."""
    with K.locked_kernel(root) as k:
        hp = k.st["hugepages"]
        if contiguous_kb is not None:
            hp["contiguous_kb"] = contiguous_kb
        if fragmented_kb is not None:
            hp["fragmented_kb"] = fragmented_kb
        for size, n in (boot_pages or {}).items():
            p = hp["pools"][str(size)]
            p["nr"] += n
            p["free"] += n
        write_files(k)


def classify(rp: str) -> tuple[str, tuple] | None:
    """The kind of a hugepage file at resolved host path ``rp`` (``hugepages_nr`` with the
    size in KiB, ``compact_memory``), or None when it is none of them."""
    m = _NR.fullmatch(rp)
    if m:
        return "hugepages_nr", (int(m.group(1)),)
    if rp == "/proc/sys/vm/nr_hugepages":
        return "hugepages_nr", (None,)
    if rp == COMPACT:
        return "compact_memory", ()
    return None


def write(k, kind: str, args: tuple, data: str) -> None:
    """A write of ``data`` to a hugepage file of :func:`classify`'s ``kind``.

    :raises OSError: ``EINVAL`` for a value that is not a number (``kstrtoul``)."""
    import errno
    import os
    hp = k.st["hugepages"]
    text = data.strip()
    if not text.isdigit():
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if kind == "compact_memory":
        hp["contiguous_kb"] += hp["fragmented_kb"]
        hp["fragmented_kb"] = 0
        hp["compactions"] += 1
        return
    size = args[0] or hp["default_kb"]
    set_nr(hp, size, int(text))
    write_files(k)


def set_nr(hp: dict, size: int, count: int) -> None:
    """``set_max_huge_pages``: the persistent pool of ``size`` KiB pages towards ``count``."""
    p = hp["pools"][str(size)]
    while p["surplus"] and count > p["nr"]:        # promote surplus pages first
        p["surplus"] -= 1
        p["nr"] += 1
    while count > p["nr"] and hp["contiguous_kb"] >= size:   # then allocate while it lasts
        hp["contiguous_kb"] -= size
        p["nr"] += 1
        p["free"] += 1
    while count < p["nr"] and p["free"] > p["resv"]:   # free unreserved free pages
        p["free"] -= 1
        p["nr"] -= 1
        hp["contiguous_kb"] += size
    while count < p["nr"]:                          # the rest (in use, reserved): surplus
        p["nr"] -= 1
        p["surplus"] += 1


def use_pages(root: str, size: int, n: int, reserve: bool = False) -> None:
    """A user (a QEMU) maps ``n`` pages of ``size`` KiB: they are reserved (``reserve``) or
    taken from the free ones.

    :raises ValueError: fewer than ``n`` are free (the mmap would fail with ENOMEM)."""
    with K.locked_kernel(root) as k:
        p = k.st["hugepages"]["pools"][str(size)]
        if p["free"] - p["resv"] < n:
            raise ValueError(f"only {p['free'] - p['resv']} free pages of {size} kB")
        if reserve:
            p["resv"] += n
        else:
            p["free"] -= n
        write_files(k)


def release_pages(root: str, size: int, n: int, reserved: bool = False) -> None:
    """The user lets go of ``n`` pages (in use, or only ``reserved``): surplus pages among them
    go back to the kernel's memory, the others to the pool's free pages."""
    with K.locked_kernel(root) as k:
        hp = k.st["hugepages"]
        p = hp["pools"][str(size)]
        if reserved:
            p["resv"] -= n
        for _ in range(n):
            if p["surplus"]:
                p["surplus"] -= 1
                hp["contiguous_kb"] += size
                if reserved:
                    p["free"] -= 1
            elif not reserved:
                p["free"] += 1
        write_files(k)


def state(root: str) -> dict:
    """The pools' state of host ``root`` (``state["hugepages"]``, see :data:`STATE_DOC`)."""
    return K.load_state(root)["hugepages"]


def pool_counts(root: str, size: int) -> dict:
    """The pool of ``size`` KiB pages: ``{"nr", "free", "resv", "surplus", "overcommit"}``."""
    return dict(K.load_state(root)["hugepages"]["pools"][str(size)])


def write_files(k) -> None:
    """Rewrite every pool's files, ``/proc/sys/vm/nr_hugepages`` and ``/proc/meminfo``."""
    hp = k.st["hugepages"]
    for size, p in hp["pools"].items():
        d = f"{POOLS}/hugepages-{size}kB"
        # sysfs nr_hugepages reads every page of the pool, persistent and surplus
        # (nr_hugepages_show_common: h->nr_huge_pages); the sysctl the persistent ones
        K.mkfile(k.root, f"{d}/nr_hugepages", f"{p['nr'] + p['surplus']}\n", 0o644)
        for name, key, mode in (("free_hugepages", "free", 0o444),
                                ("resv_hugepages", "resv", 0o444),
                                ("surplus_hugepages", "surplus", 0o444),
                                ("nr_overcommit_hugepages", "overcommit", 0o644)):
            K.mkfile(k.root, f"{d}/{name}", f"{p[key]}\n", mode)
    default = hp["pools"][str(hp["default_kb"])]
    K.mkfile(k.root, "/proc/sys/vm/nr_hugepages", f"{default['nr']}\n", 0o644)
    total_kb = 16 * 1024 * 1024
    hugetlb = sum(int(s) * (p["nr"] + p["surplus"]) for s, p in hp["pools"].items())
    free_kb = hp["contiguous_kb"] + hp["fragmented_kb"]
    K.mkfile(k.root, "/proc/meminfo",
             f"MemTotal:       {total_kb} kB\nMemFree:        {free_kb} kB\n"
             f"MemAvailable:   {free_kb} kB\n"
             f"HugePages_Total: {default['nr'] + default['surplus']:>5}\n"
             f"HugePages_Free:  {default['free']:>5}\n"
             f"HugePages_Rsvd:  {default['resv']:>5}\n"
             f"HugePages_Surp:  {default['surplus']:>5}\n"
             f"Hugepagesize:    {hp['default_kb']} kB\nHugetlb:        {hugetlb} kB\n", 0o444)
