"""The hugepages step: the pages of the VM's memory in the kernel's hugepage pool, and back.

Kernel interface (``Documentation/admin-guide/mm/hugetlbpage.rst``): one pool per page size,
``/sys/kernel/mm/hugepages/hugepages-<N>kB/`` with ``nr_hugepages`` (the persistent pool: a
write grows or shrinks it; reading it back tells how many the kernel really has),
``free_hugepages`` (in the pool, not allocated), ``resv_hugepages`` (free but promised to a
mapping, e.g. a QEMU that mapped its memory and has not touched it yet) and
``surplus_hugepages``; ``/proc/meminfo``'s ``Hugepagesize`` is the default size. A write to
``nr_hugepages`` sets the *persistent* pool, but reading it gives every page of the pool,
persistent and surplus (``nr_hugepages_show_common``: ``h->nr_huge_pages``; seen on Linux 6.1:
50 read back after writing 10 while 40 pages were in use), so the persistent count is
``nr_hugepages - surplus_hugepages``. Growing the pool first promotes surplus pages, then
allocates new ones while physically contiguous memory is found, so it may stop short; writing
``1`` to ``/proc/sys/vm/compact_memory`` first compacts memory to make more of it contiguous.
Shrinking frees free pages; pages still in use become surplus pages (even beyond
``nr_overcommit_hugepages``) and go back to the kernel when their user lets go of them.

NUMA: the global ``nr_hugepages`` is used, which ignores the writer's memory policy and spreads
the pool over every node with memory. Per-node pools
(``/sys/devices/system/node/nodeN/hugepages/``) are not handled: a VM pinned to one node may
get some of its pages from another.
"""

from __future__ import annotations

import dataclasses
import threading

from .. import errors
from ..errors import HookdError
from ..pci import write_attr
from ..profile.model import AUTO, Hugepages, size_text
from .base import Context, Shape, Step

POOLS = "/sys/kernel/mm/hugepages"
COMPACT = "/proc/sys/vm/compact_memory"
MEMINFO = "/proc/meminfo"

# One read-modify-write of a pool at a time in this process (two VMs on two GPUs may prepare
# at once: their locks do not exclude each other).
_POOL_LOCK = threading.Lock()


def pool(size_kb: int, attr: str = "") -> str:
    """Host path of the pool of ``size_kb`` KiB pages, or of its attribute ``attr``."""
    d = f"{POOLS}/hugepages-{size_kb}kB"
    return f"{d}/{attr}" if attr else d


def host_sizes(host) -> list[int]:
    """The hugepage sizes (KiB, ascending) the running kernel has a pool for."""
    out = []
    for name in host.listdir(POOLS):
        if name.startswith("hugepages-") and name.endswith("kB") and name[10:-2].isdigit():
            out.append(int(name[10:-2]))
    return sorted(out)


def default_size(host) -> int | None:
    """The default hugepage size (KiB): ``Hugepagesize`` of ``/proc/meminfo``; None if absent."""
    for line in (host.read_or(MEMINFO, "") or "").splitlines():
        key, _, value = line.partition(":")
        if key == "Hugepagesize" and value.split()[:1] and value.split()[0].isdigit():
            return int(value.split()[0])
    return None


def counts(host, size_kb: int) -> dict:
    """The pool of ``size_kb`` now: ``{"nr", "free", "resv", "surplus", "persistent"}`` (ints,
    pages; ``nr`` as ``nr_hugepages`` reads: persistent + surplus).

    :raises HookdError: ``HOST_IO`` when a count cannot be read.
    """
    out = {}
    for key in ("nr", "free", "resv", "surplus"):
        text = host.read_or(pool(size_kb, f"{key}_hugepages"))
        if text is None or not text.strip().isdigit():
            raise HookdError(errors.HOST_IO, f"cannot read {pool(size_kb, key + '_hugepages')}")
        out[key] = int(text)
    out["persistent"] = out["nr"] - out["surplus"]
    return out


def resolve(host, prof, xml: str | None, vm: str):
    """The profile a prepare runs with: ``hugepages`` made explicit (a :class:`Hugepages` with
    its size and ``why``, or None), checked against the host's pools. ``auto``: the domain's
    ``<memory>`` in pages when its XML has ``<memoryBacking><hugepages/>`` (page size from its
    ``<page>``, else the host's default), else ``Hugepages(0)`` (nothing to do, said why).

    :raises HookdError: ``DOMAIN_XML_INVALID`` (``auto`` without the XML, or a malformed one),
        ``PROFILE_INVALID`` (a size the host has no pool for, naming the sizes it has).
    """
    req = prof.hugepages
    if req is None:
        return prof
    where = f"{prof.path}: hugepages"
    if req == AUTO:
        from ..profile.domain_xml import hugepages_from_domain_xml
        if not xml:
            raise HookdError(errors.DOMAIN_XML_INVALID,
                             f"{where}: auto needs the domain XML and none came with the "
                             f"request; give hugepages: {{pages: N, size: 2M}}")
        asked = hugepages_from_domain_xml(xml, f"the domain XML of {vm!r}")
        if asked is None:
            return dataclasses.replace(prof, hugepages=Hugepages(
                0, None, "auto: the domain XML has no <memoryBacking><hugepages/>"))
        size = asked["page_kib"] or default_size(host)
        source = "<page> of <hugepages>" if asked["page_kib"] else "the host's default size"
        if size is None:
            raise HookdError(errors.PROFILE_INVALID, f"{where}: auto: the host has no "
                             f"hugepage support (no Hugepagesize in /proc/meminfo)")
        pages = -(-asked["memory_kib"] // size)
        why = (f"auto: <memory> {asked['memory_kib']} KiB of the domain XML with "
               f"<hugepages/>, in {size_text(size)} pages ({source})")
    else:
        size, pages = req.size_kb or default_size(host), req.pages
        why = f"profile: {pages} pages of {size_text(size) if size else 'the default size'}"
    have = host_sizes(host)
    if size not in have:
        raise HookdError(errors.PROFILE_INVALID,
                         f"{where}: this host has no pool of {size_text(size) if size else 'any'} "
                         f"pages ({POOLS}/ has "
                         f"{', '.join(size_text(s) for s in have) or 'none'})")
    return dataclasses.replace(prof, hugepages=Hugepages(pages, size, why))


class HugepagesStep(Step):
    """Put the VM's memory in the hugepage pool of its size: the VM needs ``pages`` pages of
    it free (``free_hugepages - resv_hugepages``: reserved pages are promised to another
    mapping); only what is missing is added, so enough free pages already (the boot
    configuration's ``hugepages=``, or another VM's pages it gave back) add none. Apply
    compacts memory (``compact_memory``), writes ``nr_hugepages`` = before + missing and
    reads it back; when the kernel found memory for part of them only, that part is given
    back (``nr_hugepages`` = before) and the prepare fails with ``HUGEPAGES_SHORT``. Undo
    frees exactly the pages this VM added: ``nr_hugepages`` = now - added, from the count of
    now, so pages the boot configuration or another VM added stay (and a pool someone else
    shrank below what this VM added is left alone, with a note). Pages still in use then
    (its QEMU still maps them) become surplus pages, which the kernel frees once they are let
    go: reported in a note. Off unless the profile asks (``hugepages``).
    Facts: ``{"plan": [{"size_kb", "pages", "available", "nr_before", "add"}], "why":
    {"hugepages": text}, "done": [{"size_kb", "before", "add", "added", "promoted",
    "freed"}]}`` (``promoted``: surplus pages the growing write made persistent, given back to
    surplus on undo) (``added``:
    the pages this VM added, None while the write has not been read back).
    """
    name = "hugepages"

    def observe(self, ctx: Context) -> dict:
        req = ctx.profile.hugepages
        if req is None:
            return {"plan": [], "skipped": ["hugepages: none in the profile"]}
        if not isinstance(req, Hugepages):   # auto: resolve() runs in every prepare's plan
            raise HookdError(errors.INTERNAL, "hugepages: auto was not resolved by the plan")
        if req.pages == 0:
            return {"plan": [], "why": {"hugepages": f"{req.why}: nothing to allocate"}}
        c = counts(ctx.host, req.size_kb)
        available = c["free"] - c["resv"]
        add = max(0, req.pages - available)
        item = {"size_kb": req.size_kb, "pages": req.pages, "available": available,
                "nr_before": c["nr"], "add": add}
        what = (f"the VM needs {req.pages} pages of {size_text(req.size_kb)}, {available} are "
                f"free: " + (f"adds {add}" if add else "adds none") + f" ({req.why})")
        return {"plan": [item] if add else [], "why": {"hugepages": what}}

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        host, limit = ctx.host, ctx.deadlines.hugepages
        for item in facts["plan"]:
            size = item["size_kb"]
            with _POOL_LOCK:
                c = counts(host, size)
                add = max(0, item["pages"] - (c["free"] - c["resv"]))
                if not add:
                    continue   # freed meanwhile: the target holds already
                write_attr(host, COMPACT, "1", limit, errors.HOST_IO, "compacting memory")
                # the persistent target: every page now (surplus ones get promoted first,
                # adding no free page) plus the missing ones
                entry = {"size_kb": size, "before": c["nr"], "add": add, "added": None,
                         "promoted": c["surplus"], "freed": 0}
                facts["done"].append(entry)
                write_attr(host, pool(size, "nr_hugepages"), str(c["nr"] + add), limit,
                           errors.HOST_IO, "growing the hugepage pool")
                got = counts(host, size)["nr"] - c["nr"]
                entry["added"] = max(0, got)
                if got >= add:
                    facts["why"] = {"hugepages": f"added {got} pages of {size_text(size)} "
                                    f"(nr_hugepages {c['nr']} -> {c['nr'] + got}); the VM "
                                    f"needs {item['pages']}"}
                    continue
                # give it back: the persistent pool as it was
                write_attr(host, pool(size, "nr_hugepages"), str(c["persistent"]), limit,
                           errors.HOST_IO, "giving a short allocation back")
                entry["added"] = max(0, counts(host, size)["nr"] - c["nr"])
                entry["promoted"] = 0
            total = c["nr"] + add
            raise HookdError(
                errors.HUGEPAGES_SHORT,
                f"the kernel allocated {max(0, got)} of the {add} {size_text(size)} hugepages "
                f"asked for (the VM needs {item['pages']}, {item['pages'] - add} were free) "
                f"and they were given back: not enough contiguous free memory. Free memory "
                f"(stop other VMs or programs), or reserve the pages at boot, when memory is "
                f"not fragmented yet: hugepagesz={size_text(size)} hugepages={total} on the "
                f"kernel command line" + ("" if size >= 1024 ** 2 else
                                          " (or 1G pages: hugepagesz=1G hugepages=N)"),
                {"size_kb": size, "asked": add, "allocated": max(0, got)})

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        host, limit = ctx.host, ctx.deadlines.hugepages
        notes = []
        for item in reversed(self.undo_items(facts)):
            size = item["size_kb"]
            with _POOL_LOCK:
                c = counts(host, size)
                if item.get("added") is not None:
                    n = item["added"] - item.get("freed", 0)
                else:   # crash or timeout before the read-back: what the pool has gained
                    before = item.get("before", item.get("nr_before", c["nr"]))
                    n = min(item.get("add", c["nr"] - before), c["nr"] - before) \
                        - item.get("freed", 0)
                if n <= 0:
                    continue
                if c["persistent"] < n:
                    notes.append(f"the persistent pool of {size_text(size)} pages is "
                                 f"{c['persistent']}, fewer than the {n} pages this VM added: "
                                 f"someone else shrank it; left as it is")
                    continue
                in_use = n - max(0, min(n, c["free"] - c["resv"]))
                # the surplus pages the growing write promoted go back to surplus as well
                target = max(0, c["persistent"] - n - item.get("promoted", 0))
                write_attr(host, pool(size, "nr_hugepages"), str(target), limit,
                           errors.HOST_IO, "freeing this VM's hugepages")
                now = counts(host, size)
                item["freed"] = item.get("freed", 0) + min(n, max(0, c["persistent"]
                                                                   - now["persistent"]))
                item["promoted"] = 0
                if now["persistent"] != target:
                    raise HookdError(errors.HOST_IO,
                                     f"{pool(size, 'nr_hugepages')}: {now['persistent']} "
                                     f"persistent pages after writing {target}: the kernel "
                                     f"could not free all of them (memory pressure); run the "
                                     f"release again later")
            if in_use:
                notes.append(f"{in_use} of the {n} {size_text(size)} pages this VM added are "
                             f"still in use (its QEMU still maps them?): they are surplus "
                             f"pages now (surplus_hugepages {now['surplus']}), which the "
                             f"kernel frees when they are let go")
            else:
                notes.append(f"freed the {n} {size_text(size)} pages this VM added "
                             f"(nr_hugepages {c['nr']} -> {now['nr']})")
        return notes

    def max_apply_s(self, profile, shape: Shape) -> float:
        """``compact_memory``, the ``nr_hugepages`` write and the give-back after a short
        allocation: each up to ``deadlines.hugepages``."""
        req = profile.hugepages
        if not isinstance(req, Hugepages) or req.pages == 0:
            return 0.0
        return 3 * profile.deadlines.hugepages

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """One ``nr_hugepages`` write per pool given pages back (``deadlines.hugepages``)."""
        n = shape.hugepages if facts is None else len(self.undo_items(facts))
        return n * deadlines.hugepages
