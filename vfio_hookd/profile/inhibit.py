"""The ``inhibit`` profile key: ``none`` (the default), ``sleep``, ``idle``, or a list of them:
the logind lock types the ``inhibit`` step holds while the VM runs
(:mod:`vfio_hookd.steps.inhibit`). Checked here as a rule of :mod:`vfio_hookd.profile.rules`.
"""

from __future__ import annotations

from .model import INHIBIT_WHAT, NONE
from .reader import Field
from .words import did_you_mean, type_name


def check(f: Field, so_far: dict) -> tuple[str, ...]:
    """``none`` -> ``()``; ``sleep`` / ``idle`` or a list of them -> a tuple in
    :data:`INHIBIT_WHAT` order (logind's ``what`` is the set, joined by ``:``)."""
    v, kinds = f.value, "'none', 'sleep', 'idle' or a list of them"
    if isinstance(v, bool):
        f.fail(f"must be {kinds}, got bool: write {'sleep' if v else NONE!r}")
    if isinstance(v, str) and v != NONE and v not in INHIBIT_WHAT and ":" in v:
        f.fail(f"write the lock types as a list: inhibit: [{', '.join(v.split(':'))}]")
    items = [] if v == NONE else [v] if isinstance(v, str) else v
    if items == [] and v != NONE:
        f.fail("empty list: write 'none' to take no inhibitor lock, or [sleep]")
    if not isinstance(items, list):
        f.fail(f"must be {kinds}, got {type_name(v)}")
    seen: dict[str, int] = {}
    for i, w in enumerate(items):
        at = i if isinstance(v, list) else None
        if w == "shutdown":
            f.fail("'shutdown' is not taken: a shutdown stops the VM (libvirt-guests) and its "
                   "release gives the GPU back; the lock types are 'sleep' and 'idle'", at)
        if w not in INHIBIT_WHAT:
            shown = repr(w) if isinstance(w, str) else type_name(w)
            f.fail(f"must be {kinds if at is None else repr('sleep') + ' or ' + repr('idle')}, "
                   f"got {shown}"
                   + (did_you_mean(w, INHIBIT_WHAT) if isinstance(w, str) else ""), at)
        if w in seen:
            f.fail(f"duplicate lock type {w!r} (also {f.key}[{seen[w]}])", at)
        seen[w] = i
    return tuple(w for w in INHIBIT_WHAT if w in seen)
