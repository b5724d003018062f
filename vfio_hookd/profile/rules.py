"""The profile rules: one table, :data:`RULES`, and building a :class:`Profile` by walking it.

Validation is strict, in the manner of firewalld's config loaders: an unknown key, a wrong
type, a duplicate key or a malformed PCI address is an error, reported as
``HookdError(PROFILE_INVALID, "<file>:<line>: <key>: <what is wrong>")`` so the user can go to
the line. Everything read comes in as :class:`vfio_hookd.profile.reader.Field` lists, from a
file or from a record alike; :func:`build` checks, in this order (the first mistake wins):

1. each key in file order: a name, given once, known (with "did you mean"), value readable;
2. each key in file order: not empty (an empty value is not "the default");
3. each key of :data:`RULES` in table (documented) order: its checker; absent keys take the
   :class:`Profile` field's default.

PCI addresses and the modules never unloaded are :mod:`vfio_hookd.pci`'s facts; the words of
the errors (a type's YAML name, "did you mean") are :mod:`.words`'.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

from .. import errors
from ..paths import check_vm_name
from ..pci import never_unload_reason, normalize_address
from . import hugepages as _hugepages
from . import inhibit as _inhibit
from .model import (AUTO, DEFAULT_DEADLINES, DISPLAY_MANAGER_ALIAS, MAX_DEADLINE_S,
                    MAX_LIST_ITEMS, NONE, ON_BUSY, Deadlines, Profile)
from .reader import Field, fail, read_data
from .words import did_you_mean as _did_you_mean, type_name as _type_name

# systemd unit names (systemd.unit(5)): "prefix[@instance].type"; the characters allowed are
# ASCII letters, digits, ":", "-", "_", "." and "\"; at most 255 characters.
_UNIT_TYPES = ("service", "socket", "device", "mount", "automount", "swap", "target", "path",
               "timer", "slice", "scope")
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]+)?\.(%s)" % "|".join(_UNIT_TYPES))
_UNIT_MAX = 255

# Kernel module names as modprobe accepts them; '-' and '_' are the same to the kernel
# (modprobe(8): "there is no difference between _ and - in module names").
_MODULE_RE = re.compile(r"[A-Za-z0-9_-]+")


# ---- the checkers: check(field, so_far) -> the Profile attribute's value --------------------

def _base60_text(value, text):
    """The source text of a plain scalar YAML 1.1 read as a base-60 number, else ``value``.

    YAML 1.1 (pyyaml) reads an unquoted ``0000:01:00.0`` as the float 60.0 and ``1:30`` as the
    int 90; for PCI addresses the text as written is what was meant.
    """
    if (isinstance(value, (int, float)) and not isinstance(value, bool)
            and isinstance(text, str) and ":" in text):
        return text
    return value


def _check_devices(f: Field, so_far: dict):
    v = _base60_text(f.value, f.text)
    if isinstance(v, str):
        if v == AUTO:
            return None
        if normalize_address(v):
            f.fail(f"must be a list, even for one function: devices: [{v!r}]")
        f.fail(f"must be 'auto' or a list of PCI addresses such as '0000:01:00.0', got {v!r}")
    if not isinstance(v, list):
        f.fail(f"must be 'auto' or a list of PCI addresses such as '0000:01:00.0', "
               f"got {_type_name(v)}")
    if not v:
        f.fail("empty list: list the GPU's PCI functions (e.g. '0000:01:00.0', "
               "'0000:01:00.1') or write 'auto'")
    _check_count(f, v)
    seen: dict[str, int] = {}   # address -> index: validation stays linear in the list
    for i, item in enumerate(v):
        item = _base60_text(item, f.item_texts[i] if f.item_texts else None)
        if not isinstance(item, str):
            f.fail(f"must be a PCI address such as '0000:01:00.0', got {_type_name(item)}", i)
        addr = normalize_address(item)
        if addr is None:
            f.fail(f"malformed PCI address {item!r}: expected the full form "
                   f"domain:bus:slot.function, e.g. '0000:01:00.0' "
                   f"(slot 00-1f, function 0-7)", i)
        if addr in seen:
            f.fail(f"duplicate PCI address {addr!r} (also {f.key}[{seen[addr]}])", i)
        seen[addr] = i
    return tuple(seen)


def _check_count(f: Field, items: list) -> None:
    """Refuse a list longer than :data:`MAX_LIST_ITEMS` (at the key's line)."""
    if len(items) > MAX_LIST_ITEMS:
        f.fail(f"has {len(items)} items; a profile list may have at most {MAX_LIST_ITEMS}")


def _unit_problem(u: str) -> str | None:
    """Why ``u`` is not a full systemd unit name, or None when it is one."""
    if len(u) > _UNIT_MAX:
        return f"unit name longer than {_UNIT_MAX} characters"
    if _UNIT_RE.fullmatch(u):
        return None
    if "/" in u:
        return f"{u!r} is a path; give a unit name such as 'gdm.service'"
    if re.fullmatch(r"[A-Za-z0-9:_\\-]+(?:@[A-Za-z0-9:_.\\-]+)?", u):
        return (f"{u!r} is not a full unit name: give it with its type suffix, "
                f"e.g. '{u}.service'")
    return (f"{u!r} is not a systemd unit name (name[@instance].type, e.g. 'gdm.service', "
            f"type one of {', '.join(_UNIT_TYPES)})")


def _check_display_manager(f: Field, so_far: dict):
    v = f.value
    if v is False:
        f.fail("write 'none' (not false) to stop no display manager")
    if not isinstance(v, str):
        f.fail(f"must be 'auto', 'none' or a unit name such as 'gdm.service', "
               f"got {_type_name(v)}")
    if v in (AUTO, DISPLAY_MANAGER_ALIAS):
        return AUTO
    if v == NONE:
        return None
    problem = _unit_problem(v)
    if problem is None and not v.endswith(".service"):
        problem = f"{v!r} is not a service unit; a display manager is a '.service'"
    if problem:
        f.fail(f"must be 'auto', 'none' or a unit name: {problem}")
    return v


def _check_stop_units(f: Field, so_far: dict):
    v = f.value
    display_manager = so_far["display_manager"]
    if not isinstance(v, list):
        hint = f": stop_units: [{v!r}]" if isinstance(v, str) else ""
        f.fail(f"must be a list of unit names, got {_type_name(v)}{hint}")
    _check_count(f, v)
    seen: dict[str, int] = {}
    for i, u in enumerate(v):
        if not isinstance(u, str):
            f.fail(f"must be a unit name such as 'nvidia-persistenced.service', "
                   f"got {_type_name(u)}", i)
        problem = _unit_problem(u)
        if problem:
            f.fail(problem, i)
        if u == DISPLAY_MANAGER_ALIAS or (display_manager not in (AUTO, None)
                                          and u == display_manager):
            f.fail(f"{u!r} is the display manager: set it with 'display_manager', not here", i)
        if u in seen:
            f.fail(f"duplicate unit {u!r} (also {f.key}[{seen[u]}])", i)
        seen[u] = i
    return tuple(seen)


def _enum(f: Field, allowed) -> str:
    """``f``'s value, which must be one of the strings ``allowed``."""
    v = f.value
    choices = " or ".join(repr(a) for a in allowed)
    if not isinstance(v, str):
        f.fail(f"must be {choices}, got {_type_name(v)}")
    if v not in allowed:
        f.fail(f"must be {choices}, got {v!r}{_did_you_mean(v, allowed)}")
    return v


def _check_auto_none(f: Field, so_far: dict) -> bool:
    if isinstance(f.value, bool):
        f.fail(f"must be 'auto' or 'none', got bool ({str(f.value).lower()}): "
               f"write {AUTO if f.value else NONE!r}")
    return _enum(f, (AUTO, NONE)) == AUTO


def _check_on_busy(f: Field, so_far: dict) -> str:
    return _enum(f, ON_BUSY)


def _check_modules(f: Field, so_far: dict):
    v = f.value
    if v is False:
        f.fail("write 'none' (not false) to unload no modules")
    if isinstance(v, str):
        if v == AUTO:
            return AUTO
        if v == NONE:
            return ()
        if _MODULE_RE.fullmatch(v):
            f.fail(f"must be 'auto', 'none' or a list: modules: [{v!r}]")
    if not isinstance(v, list):
        shown = repr(v) if isinstance(v, str) else _type_name(v)
        f.fail(f"must be 'auto', 'none' or a list of module names, got {shown}")
    if not v:
        f.fail("empty list: write 'none' to unload no modules, or 'auto'")
    _check_count(f, v)
    seen: dict[str, int] = {}
    for i, m in enumerate(v):
        if not isinstance(m, str):
            f.fail(f"must be a module name such as 'nvidia_drm', got {_type_name(m)}", i)
        if not _MODULE_RE.fullmatch(m):
            f.fail(f"{m!r} is not a module name (letters, digits, '_' and '-')", i)
        m = m.replace("-", "_")
        why = never_unload_reason(m)
        if why:
            f.fail(f"{m!r} must not be unloaded: {why}", i)
        if m in seen:
            f.fail(f"duplicate module {m!r} (also {f.key}[{seen[m]}])", i)
        seen[m] = i
    return tuple(seen)


def _check_deadlines(f: Field, so_far: dict) -> Deadlines:
    if f.sub is None:
        f.fail(f"must be a mapping of deadlines in seconds "
               f"({', '.join(DEFAULT_DEADLINES)}), got {_type_name(f.value)}")
    values = {}
    for sub in f.sub:  # known and unique: checked by _by_name
        v = sub.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            sub.fail(f"must be a number of seconds > 0, got {_type_name(v)}")
        if not math.isfinite(v) or v <= 0:
            sub.fail(f"must be a number of seconds > 0, got {v!r}")
        if v > MAX_DEADLINE_S:
            sub.fail(f"must be at most {MAX_DEADLINE_S} seconds (a wait that long is a "
                     f"hung host: fail it and say so), got {v!r}")
        values[sub.name] = float(v)
    return Deadlines(**values)


def _check_host_cpus(f: Field, so_far: dict):
    """``auto``, ``none`` or a cpulist (:func:`vfio_hookd.cpus.profile_value`)."""
    from ..cpus import profile_value
    try:
        return profile_value(f.value, _type_name(f.value))
    except ValueError as e:
        f.fail(str(e))


def _check_cpu_governor(f: Field, so_far: dict):
    """``none`` or a cpufreq governor name (:func:`vfio_hookd.cpus.governor_value`)."""
    from ..cpus import governor_value
    try:
        return governor_value(f.value, _type_name(f.value))
    except ValueError as e:
        f.fail(str(e))


# ---- the table -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """How one top-level profile key is validated.

    :ivar key: the key (str), also the :class:`Profile` attribute it sets; an absent key takes
        that attribute's default.
    :ivar check: ``check(field, so_far) -> value``: validates the key's
        :class:`~vfio_hookd.profile.reader.Field` (present, value not null) and returns the
        attribute's value. ``so_far`` (dict) holds the values of the keys before it in
        :data:`RULES` (absent ones at their defaults). Raises ``HookdError(PROFILE_INVALID)``
        through :meth:`Field.fail`.
    :ivar keys: for a key whose value is a mapping of named keys (a section such as
        ``deadlines``), those keys in documented order (tuple of str); else ``()``.
    """

    key: str
    check: Callable[[Field, dict], object]
    keys: tuple[str, ...] = ()


#: The rules, in the documented key order (:data:`vfio_hookd.profile.model.KEYS`).
RULES = (
    Rule("devices", _check_devices),
    Rule("display_manager", _check_display_manager),
    Rule("stop_units", _check_stop_units),           # uses display_manager
    Rule("vtconsoles", _check_auto_none),
    Rule("framebuffer", _check_auto_none),
    Rule("modules", _check_modules),
    Rule("on_busy", _check_on_busy),
    Rule("inhibit", _inhibit.check),
    Rule("hugepages", _hugepages.check, keys=_hugepages.KEYS),
    Rule("host_cpus", _check_host_cpus),
    Rule("cpu_governor", _check_cpu_governor),
    Rule("deadlines", _check_deadlines, keys=tuple(DEFAULT_DEADLINES)),
)

_BY_KEY = {r.key: r for r in RULES}

#: The top-level keys whose mapping value the reader reads key by key.
SECTIONS = frozenset(r.key for r in RULES if r.keys)


def defaults() -> dict:
    """``{key: default}`` for every key of :data:`RULES`: the :class:`Profile` field defaults."""
    out = {}
    for f in dataclasses.fields(Profile):
        if f.name in _BY_KEY:
            missing = f.default is dataclasses.MISSING
            out[f.name] = f.default_factory() if missing else f.default
    return out


def build(fields: list[Field], path: str, name: str) -> Profile:
    """Validate ``fields`` (from :func:`~vfio_hookd.profile.reader.read_yaml` or
    :func:`~vfio_hookd.profile.reader.read_data`) and build the :class:`Profile`.

    :param path: the profile's file (str), kept in :attr:`Profile.path`.
    :param name: the domain name (str, already checked by the caller).
    :raises HookdError: ``PROFILE_INVALID`` for the first mistake (see the module docstring).
    """
    present = _by_name(fields, None, tuple(_BY_KEY))
    for f in present.values():
        if f.value is None:
            f.fail("has no value; remove the key to get its default, or give a value")
    values = defaults()
    for rule in RULES:
        f = present.get(rule.key)
        if f is not None:
            values[rule.key] = rule.check(f, values)
    return Profile(name=name, path=path, **values)


def _by_name(fields: list[Field], parent: str | None, allowed) -> dict[str, Field]:
    """``{name: field}`` after step 1 of :func:`build` (sections checked key by key too)."""
    out: dict[str, Field] = {}
    for f in fields:
        if f.name is None:
            fail(f.path, f.line, parent,
                 f"keys must be names such as {allowed[0]!r}, got {f.shown!r}")
        if f.name in out:
            fail(f.path, f.line, parent,
                 f"duplicate key {f.name!r} (first at line {out[f.name].line}); "
                 f"YAML keeps only one of them, so give it once")
        if f.name not in allowed:
            fail(f.path, f.line, parent,
                 f"unknown key {f.name!r}{_did_you_mean(f.name, allowed)}")
        out[f.name] = f
        rule = _BY_KEY.get(f.name) if parent is None else None
        if rule is not None and rule.keys and f.sub is not None:
            _by_name(f.sub, f.key, rule.keys)
        elif f.problem:
            fail(f.path, f.problem_line, f.key, f"cannot read the value: {f.problem}")
    return out


def profile_from_dict(data: dict) -> Profile:
    """Rebuild a profile from ``data`` as :meth:`Profile.to_dict` writes it (``name``,
    ``path`` and the profile keys), through :func:`read_data` and :func:`build`.

    :raises HookdError: ``PROFILE_INVALID`` (no lines: ``"<path>: <key>: ..."``),
        ``VM_NAME_INVALID`` for a bad ``name``.
    """
    if not isinstance(data, dict):
        raise errors.HookdError(errors.PROFILE_INVALID,
                                f"profile data: must be a mapping, got {_type_name(data)}")
    name = check_vm_name(data.get("name"))
    path = data.get("path")
    if not isinstance(path, str) or not path:
        path = "<record>"
    body = {k: v for k, v in data.items() if k not in ("name", "path")}
    return build(read_data(body, path, SECTIONS), path, name)
