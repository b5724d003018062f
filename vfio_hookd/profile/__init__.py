"""Per-VM profiles: ``<config>/vms/<domain name>.yaml`` (:meth:`vfio_hookd.paths.Paths.profile_path`).

A domain is *managed* by vfio-hookd exactly when its profile file exists; every other domain is
left alone. The file is YAML; every key is optional and an empty file means "all defaults".
``config.example.yaml`` at the top of the repository documents each key, its default and the
values it allows.

Loading is pure parsing: nothing on the host is read except the profile file itself. Validation
is strict, in the manner of firewalld's config loaders: an unknown key, a wrong type, a duplicate
key or a malformed PCI address is an error, and every error is
``HookdError(PROFILE_INVALID, "<file>:<line>: <key>: <what is wrong>")`` so the user can go to the
line. pyyaml is imported only inside the parsing functions (importing this module stays cheap for
the hook); ``xml.etree`` and ``difflib`` likewise.

Representation of the "auto"/"none" choices in :class:`Profile` (the one place to look):

=================  ======================  ==========================  =======================
key                ``auto``                ``none``                    explicit value
=================  ======================  ==========================  =======================
devices            ``None``                (not allowed)               ``tuple`` of addresses
display_manager    ``"auto"`` (``AUTO``)   ``None``                    unit name ``str``
modules            ``"auto"`` (``AUTO``)   ``()`` (empty tuple)        ``tuple`` of names
vtconsoles         ``True``                ``False``                   --
framebuffer        ``True``                ``False``                   --
=================  ======================  ==========================  =======================
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from .. import errors
from ..paths import Paths, check_vm_name
from ..pci import never_unload_reason, normalize_address as normalize_pci_address
from .domain_xml import devices_from_domain_xml

AUTO = "auto"
NONE = "none"

#: The display-manager alias unit ``display_manager: auto`` resolves (systemd.special(7)).
DISPLAY_MANAGER_ALIAS = "display-manager.service"

ON_BUSY = ("fail", "terminate")

#: Top-level keys of a profile, in the order they are documented.
KEYS = ("devices", "display_manager", "stop_units", "vtconsoles", "framebuffer", "modules",
        "on_busy", "deadlines")

#: The longest deadline a profile may set (s): one hour.
MAX_DEADLINE_S = 3600

#: Keys under ``deadlines`` and their defaults in seconds.
DEFAULT_DEADLINES = {
    "unit_stop": 30.0,
    "unit_start": 30.0,
    "terminate": 5.0,
    "unbind": 10.0,
    "module_unload": 15.0,
    "module_load": 30.0,
}

# systemd unit names (systemd.unit(5)): "prefix[@instance].type"; the characters allowed are
# ASCII letters, digits, ":", "-", "_", "." and "\"; at most 255 characters.
_UNIT_TYPES = ("service", "socket", "device", "mount", "automount", "swap", "target", "path",
               "timer", "slice", "scope")
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]+)?\.(%s)" % "|".join(_UNIT_TYPES))
_UNIT_MAX = 255

# Kernel module names as modprobe accepts them; '-' and '_' are the same to the kernel
# (modprobe(8): "there is no difference between _ and - in module names").
_MODULE_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Deadlines:
    """Deadlines of the host operations, all in seconds (float, > 0).

    :ivar unit_stop: one systemd StopUnit job, until its ``JobRemoved`` signal.
    :ivar unit_start: one systemd StartUnit job, likewise.
    :ivar terminate: per holder process: SIGTERM, then SIGKILL once this has passed.
    :ivar unbind: each sysfs ``bind``/``unbind``/``drivers_probe`` write.
    :ivar module_unload: each module unload.
    :ivar module_load: each ``modprobe``.
    """

    unit_stop: float = DEFAULT_DEADLINES["unit_stop"]
    unit_start: float = DEFAULT_DEADLINES["unit_start"]
    terminate: float = DEFAULT_DEADLINES["terminate"]
    unbind: float = DEFAULT_DEADLINES["unbind"]
    module_unload: float = DEFAULT_DEADLINES["module_unload"]
    module_load: float = DEFAULT_DEADLINES["module_load"]

    def to_dict(self) -> dict:
        """``{"unit_stop": float, ...}``: the six deadlines in seconds."""
        return {k: getattr(self, k) for k in DEFAULT_DEADLINES}


@dataclass(frozen=True)
class Profile:
    """The validated profile of one domain. Build it with :func:`load_profile`,
    :func:`parse_profile` or :meth:`from_dict`, not by hand.

    :ivar name: the libvirt domain name (str).
    :ivar path: the file it came from (str; for a profile rebuilt from a record, the path the
        record names).
    :ivar devices: ``None`` for ``auto`` (the PCI ``<hostdev>`` functions of the domain XML the
        hook receives, see :func:`devices_from_domain_xml`), else a non-empty tuple of
        normalised PCI addresses (``"0000:01:00.0"``), in file order, without duplicates.
    :ivar display_manager: ``"auto"`` (:data:`AUTO`: resolve ``display-manager.service`` to the
        real unit), a ``.service`` unit name, or ``None`` for ``none`` (stop no display manager).
    :ivar stop_units: more units to stop first-to-last and start again last-to-first (tuple of
        unit names; may be empty).
    :ivar vtconsoles: ``True`` for ``auto`` (unbind the framebuffer vtconsoles), ``False`` for
        ``none``.
    :ivar framebuffer: ``True`` for ``auto`` (unbind the firmware framebuffer), ``False`` for
        ``none``.
    :ivar modules: ``"auto"`` (:data:`AUTO`: derived from the functions' drivers and their
        module holders), a tuple of module names (``-`` normalised to ``_``) to unload in the
        given order, or ``()`` for ``none``. Test with ``profile.modules == AUTO`` before
        iterating.
    :ivar on_busy: ``"fail"`` or ``"terminate"``: what to do with processes still holding the
        GPU's device nodes once the units are stopped.
    :ivar deadlines: :class:`Deadlines`.
    """

    name: str
    path: str
    devices: tuple[str, ...] | None = None
    display_manager: str | None = AUTO
    stop_units: tuple[str, ...] = ()
    vtconsoles: bool = True
    framebuffer: bool = True
    modules: str | tuple[str, ...] = AUTO
    on_busy: str = "fail"
    deadlines: Deadlines = field(default_factory=Deadlines)

    def to_dict(self) -> dict:
        """A JSON-able dict in the profile file's own vocabulary, plus ``name`` and ``path``.

        ``devices`` is ``"auto"`` or a list; ``display_manager`` ``"auto"``, a unit or
        ``"none"``; ``vtconsoles``/``framebuffer`` ``"auto"``/``"none"``; ``modules``
        ``"auto"``, a list or ``"none"``; ``deadlines`` a dict of floats (seconds).
        :meth:`from_dict` reads it back to an equal :class:`Profile`.
        """
        return {
            "name": self.name,
            "path": self.path,
            "devices": AUTO if self.devices is None else list(self.devices),
            "display_manager": NONE if self.display_manager is None else self.display_manager,
            "stop_units": list(self.stop_units),
            "vtconsoles": AUTO if self.vtconsoles else NONE,
            "framebuffer": AUTO if self.framebuffer else NONE,
            "modules": (AUTO if self.modules == AUTO
                        else NONE if not self.modules else list(self.modules)),
            "on_busy": self.on_busy,
            "deadlines": self.deadlines.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        """Rebuild a profile from :meth:`to_dict` output (e.g. from a VM's record).

        The data goes through the same validation as a profile file (a record may have been
        edited or written by another version).

        :raises HookdError: ``PROFILE_INVALID`` (no line numbers: ``"<path>: <key>: ..."``),
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
        fields = _fields_from_dict(body, path)
        return _build(fields, path, name)


# ---- public functions -----------------------------------------------------------------------

def is_managed(paths: "Paths", name: str) -> bool:
    """True when domain ``name`` has a profile file, i.e. vfio-hookd manages it.

    Only the file's presence counts (``os.path.lexists``: a dangling symlink counts as present,
    so loading it fails loudly instead of the VM silently running unmanaged). A name that cannot
    name a profile file (``/``, NUL, empty, see :func:`vfio_hookd.paths.check_vm_name`) cannot have a
    profile: ``False``.
    """
    try:
        path = paths.profile_path(name)
    except errors.HookdError:
        return False
    return os.path.lexists(path)


def load_profile(paths: "Paths", name: str) -> Profile:
    """Read and validate the profile of domain ``name`` from ``paths.profile_path(name)``
    (:class:`vfio_hookd.paths.Paths`).

    :raises HookdError: ``VM_NAME_INVALID`` for a name that cannot name a file; ``NOT_MANAGED``
        when there is no profile file; ``PROFILE_INVALID`` when it cannot be read (permissions,
        a directory, not UTF-8, dangling symlink) or is invalid (see :func:`parse_profile`).
    """
    path = paths.profile_path(name)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if os.path.islink(path):
            _fail(path, None, None, "is a symbolic link to a missing file")
        raise errors.HookdError(
            errors.NOT_MANAGED,
            f"VM {name!r} is not managed by vfio-hookd: there is no profile {path} "
            f"(an empty file manages it with all defaults; see config.example.yaml)",
            {"vm": name, "file": path}) from None
    except OSError as e:
        _fail(path, None, None, f"cannot be read: {e.strerror or e}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        _fail(path, None, None, f"is not UTF-8 text (byte {e.start}: {e.reason})")
    return parse_profile(text, path, name)


def parse_profile(text: str, path: str, name: str) -> Profile:
    """Validate the YAML ``text`` of the profile of domain ``name``; ``path`` names it in errors.

    An empty document (empty file, only comments, or a bare ``---``) gives all defaults.

    :raises HookdError: ``VM_NAME_INVALID`` (:func:`vfio_hookd.paths.check_vm_name`); ``PROFILE_INVALID``
        with the message ``"<path>:<line>: <key>: <what is wrong>"`` (``"<path>:<line>:<col>:
        YAML syntax error: ..."`` for syntax errors) and details ``{"file", "line", "key"}``.
    """
    check_vm_name(name)
    import yaml  # lazily: ~15 ms, only the daemon and the CLI parse profiles

    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:  # a character YAML forbids (NUL, most controls)
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise errors.HookdError(
            errors.PROFILE_INVALID,
            f"{path}:{line}:{col}: YAML syntax error: character {e.character:#x} is not "
            f"allowed in YAML", {"file": path, "line": line, "key": None}) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            _syntax_error(path, e)
        if root is None or (isinstance(root, yaml.ScalarNode)
                            and root.tag == "tag:yaml.org,2002:null"):
            fields = {}
        elif not isinstance(root, yaml.MappingNode):
            _fail(path, _line(root), None,
                  f"the profile must be a mapping of keys ({', '.join(KEYS)}), "
                  f"got {_node_kind(root)}")
        else:
            fields = _fields_from_mapping(loader, root, path, None, KEYS)
    finally:
        loader.dispose()
    return _build(fields, path, name)


# ---- validation ---------------------------------------------------------------------------

class _Field:
    """One key's value and where it came from (line numbers are 1-based; None from a dict)."""

    __slots__ = ("key", "value", "line", "text", "item_lines", "item_texts", "sub")

    def __init__(self, key, value, line, item_lines=None, item_texts=None, sub=None, text=None):
        self.key = key              # "devices", "deadlines.unbind"
        self.value = value          # the constructed Python value
        self.line = line
        self.text = text            # source text of a scalar value, or None
        self.item_lines = item_lines  # per list item, or None
        self.item_texts = item_texts  # per list item: source text of a scalar, or None
        self.sub = sub              # for a mapping value (deadlines): dict[str, _Field]

    def fail(self, path: str, what: str, index: int | None = None):
        if index is None:
            _fail(path, self.line, self.key, what)
        line = self.item_lines[index] if self.item_lines else self.line
        _fail(path, line, f"{self.key}[{index}]", what)


def _fail(path: str, line: int | None, key: str | None, what: str):
    """Raise PROFILE_INVALID as ``"<path>:<line>: <key>: <what>"`` (parts omitted when None)."""
    where = f"{path}:{line}" if line else path
    msg = f"{where}: {key}: {what}" if key else f"{where}: {what}"
    # "from None": a user's mistake, not a chain of exceptions (also when called in an except)
    raise errors.HookdError(errors.PROFILE_INVALID, msg,
                            {"file": path, "line": line, "key": key}) from None


def _syntax_error(path: str, e) -> None:
    mark = e.problem_mark or e.context_mark
    problem = e.problem or e.context or "invalid YAML"
    if e.context and e.problem:
        problem = f"{e.context}: {e.problem}"
    line = mark.line + 1 if mark else None
    where = f"{path}:{line}:{mark.column + 1}" if mark else path
    raise errors.HookdError(errors.PROFILE_INVALID, f"{where}: YAML syntax error: {problem}",
                            {"file": path, "line": line, "key": None}) from None


def _line(node) -> int:
    return node.start_mark.line + 1


def _node_kind(node) -> str:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "a single value"


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _did_you_mean(word: str, choices) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, else the list of them."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(choices)})"


def _fields_from_mapping(loader, node, path: str, parent: str | None, allowed) -> dict:
    """Check a YAML mapping node's keys (strings, known, unique) and construct its values."""
    import yaml

    fields: dict[str, _Field] = {}
    first_line: dict[str, int] = {}
    prefix = f"{parent}." if parent else ""
    for key_node, value_node in node.value:
        line = _line(key_node)
        if not (isinstance(key_node, yaml.ScalarNode)
                and key_node.tag == "tag:yaml.org,2002:str"):
            shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else _node_kind(key_node)
            _fail(path, line, parent,
                  f"keys must be names such as {allowed[0]!r}, got {shown!r}")
        key = key_node.value
        if key in first_line:
            _fail(path, line, parent,
                  f"duplicate key {key!r} (first at line {first_line[key]}); "
                  f"YAML keeps only one of them, so give it once")
        first_line[key] = line
        if key not in allowed:
            _fail(path, line, parent, f"unknown key {key!r}{_did_you_mean(key, allowed)}")
        full = prefix + key
        if parent is None and key == "deadlines" and isinstance(value_node, yaml.MappingNode):
            sub = _fields_from_mapping(loader, value_node, path, "deadlines",
                                       tuple(DEFAULT_DEADLINES))
            fields[key] = _Field(full, {k: f.value for k, f in sub.items()}, line, sub=sub)
            continue
        value = _construct(loader, value_node, path, full)
        item_lines = item_texts = text = None
        if isinstance(value_node, yaml.SequenceNode):
            item_lines = [_line(n) for n in value_node.value]
            item_texts = [n.value if isinstance(n, yaml.ScalarNode) else None
                          for n in value_node.value]
        elif isinstance(value_node, yaml.ScalarNode):
            text = value_node.value
        fields[key] = _Field(full, value, line, item_lines, item_texts, text=text)
    return fields


def _construct(loader, node, path: str, key: str):
    import yaml

    try:
        return loader.construct_object(node, deep=True)
    except yaml.MarkedYAMLError as e:  # e.g. an unknown tag: "!!python/object ..."
        line = e.problem_mark.line + 1 if e.problem_mark else _line(node)
        _fail(path, line, key, f"cannot read the value: {e.problem or e}")


def _fields_from_dict(data: dict, path: str) -> dict:
    fields: dict[str, _Field] = {}
    for key, value in data.items():
        if key not in KEYS:
            _fail(path, None, None, f"unknown key {key!r}{_did_you_mean(str(key), KEYS)}")
        if key == "deadlines" and isinstance(value, dict):
            sub = {}
            for k, v in value.items():
                if k not in DEFAULT_DEADLINES:
                    _fail(path, None, "deadlines", f"unknown key {k!r}"
                          f"{_did_you_mean(str(k), DEFAULT_DEADLINES)}")
                sub[k] = _Field(f"deadlines.{k}", v, None)
            fields[key] = _Field(key, value, None, sub=sub)
        else:
            texts = list(value) if isinstance(value, list) else None
            fields[key] = _Field(key, value, None, item_texts=texts)
    return fields


def _build(fields: dict, path: str, name: str) -> Profile:
    """Validate every field and build the Profile; absent keys take their defaults."""
    for f in fields.values():
        if f.value is None:
            f.fail(path, "has no value; remove the key to get its default, or give a value")
    get = fields.get
    devices = _check_devices(get("devices"), path)
    display_manager = _check_display_manager(get("display_manager"), path)
    stop_units = _check_stop_units(get("stop_units"), path, display_manager)
    vtconsoles = _check_auto_none(get("vtconsoles"), path)
    framebuffer = _check_auto_none(get("framebuffer"), path)
    modules = _check_modules(get("modules"), path)
    on_busy = _check_enum(get("on_busy"), path, ON_BUSY, "fail")
    deadlines = _check_deadlines(get("deadlines"), path)
    return Profile(name=name, path=path, devices=devices, display_manager=display_manager,
                   stop_units=stop_units, vtconsoles=vtconsoles, framebuffer=framebuffer,
                   modules=modules, on_busy=on_busy, deadlines=deadlines)


def _base60_text(value, text):
    """The source text of a plain scalar YAML 1.1 read as a base-60 number, else ``value``.

    YAML 1.1 (pyyaml) reads an unquoted ``0000:01:00.0`` as the float 60.0 and ``1:30`` as the
    int 90; for PCI addresses the text as written is what was meant.
    """
    if (isinstance(value, (int, float)) and not isinstance(value, bool)
            and isinstance(text, str) and ":" in text):
        return text
    return value


def _check_devices(f: _Field | None, path: str):
    if f is None:
        return None
    v = f.value
    v = _base60_text(v, f.text)
    if isinstance(v, str):
        if v == AUTO:
            return None
        if normalize_pci_address(v):
            f.fail(path, f"must be a list, even for one function: devices: [{v!r}]")
        f.fail(path, f"must be 'auto' or a list of PCI addresses such as '0000:01:00.0', "
                     f"got {v!r}")
    if not isinstance(v, list):
        f.fail(path, f"must be 'auto' or a list of PCI addresses such as '0000:01:00.0', "
                     f"got {_type_name(v)}")
    if not v:
        f.fail(path, "empty list: list the GPU's PCI functions (e.g. '0000:01:00.0', "
                     "'0000:01:00.1') or write 'auto'")
    out: list[str] = []
    for i, item in enumerate(v):
        item = _base60_text(item, f.item_texts[i] if f.item_texts else None)
        if not isinstance(item, str):
            f.fail(path, f"must be a PCI address such as '0000:01:00.0', "
                         f"got {_type_name(item)}", i)
        addr = normalize_pci_address(item)
        if addr is None:
            f.fail(path, f"malformed PCI address {item!r}: expected the full form "
                         f"domain:bus:slot.function, e.g. '0000:01:00.0' "
                         f"(slot 00-1f, function 0-7)", i)
        if addr in out:
            f.fail(path, f"duplicate PCI address {addr!r} (also {f.key}[{out.index(addr)}])", i)
        out.append(addr)
    return tuple(out)


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


def _check_display_manager(f: _Field | None, path: str):
    if f is None:
        return AUTO
    v = f.value
    if v is False:
        f.fail(path, "write 'none' (not false) to stop no display manager")
    if not isinstance(v, str):
        f.fail(path, f"must be 'auto', 'none' or a unit name such as 'gdm.service', "
                     f"got {_type_name(v)}")
    if v in (AUTO, DISPLAY_MANAGER_ALIAS):
        return AUTO
    if v == NONE:
        return None
    problem = _unit_problem(v)
    if problem is None and not v.endswith(".service"):
        problem = f"{v!r} is not a service unit; a display manager is a '.service'"
    if problem:
        f.fail(path, f"must be 'auto', 'none' or a unit name: {problem}")
    return v


def _check_stop_units(f: _Field | None, path: str, display_manager):
    if f is None:
        return ()
    v = f.value
    if not isinstance(v, list):
        hint = f": stop_units: [{v!r}]" if isinstance(v, str) else ""
        f.fail(path, f"must be a list of unit names, got {_type_name(v)}{hint}")
    out: list[str] = []
    for i, u in enumerate(v):
        if not isinstance(u, str):
            f.fail(path, f"must be a unit name such as 'nvidia-persistenced.service', "
                         f"got {_type_name(u)}", i)
        problem = _unit_problem(u)
        if problem:
            f.fail(path, problem, i)
        if u == DISPLAY_MANAGER_ALIAS or (display_manager not in (AUTO, None)
                                          and u == display_manager):
            f.fail(path, f"{u!r} is the display manager: set it with 'display_manager', "
                         f"not here", i)
        if u in out:
            f.fail(path, f"duplicate unit {u!r} (also {f.key}[{out.index(u)}])", i)
        out.append(u)
    return tuple(out)


def _check_auto_none(f: _Field | None, path: str) -> bool:
    if f is None:
        return True
    if isinstance(f.value, bool):
        f.fail(path, f"must be 'auto' or 'none', got bool ({str(f.value).lower()}): "
                     f"write {AUTO if f.value else NONE!r}")
    return _check_enum(f, path, (AUTO, NONE), AUTO) == AUTO


def _check_enum(f: _Field | None, path: str, allowed, default: str) -> str:
    if f is None:
        return default
    v = f.value
    choices = " or ".join(repr(a) for a in allowed)
    if not isinstance(v, str):
        f.fail(path, f"must be {choices}, got {_type_name(v)}")
    if v not in allowed:
        f.fail(path, f"must be {choices}, got {v!r}{_did_you_mean(v, allowed)}")
    return v


def _forbidden_module(m: str) -> str | None:
    why = never_unload_reason(m)
    return f"{m!r} must not be unloaded: {why}" if why else None


def _check_modules(f: _Field | None, path: str):
    if f is None:
        return AUTO
    v = f.value
    if v is False:
        f.fail(path, "write 'none' (not false) to unload no modules")
    if isinstance(v, str):
        if v == AUTO:
            return AUTO
        if v == NONE:
            return ()
        if _MODULE_RE.fullmatch(v):
            f.fail(path, f"must be 'auto', 'none' or a list: modules: [{v!r}]")
    if not isinstance(v, list):
        shown = repr(v) if isinstance(v, str) else _type_name(v)
        f.fail(path, f"must be 'auto', 'none' or a list of module names, got {shown}")
    if not v:
        f.fail(path, "empty list: write 'none' to unload no modules, or 'auto'")
    out: list[str] = []
    for i, m in enumerate(v):
        if not isinstance(m, str):
            f.fail(path, f"must be a module name such as 'nvidia_drm', got {_type_name(m)}", i)
        if not _MODULE_RE.fullmatch(m):
            f.fail(path, f"{m!r} is not a module name (letters, digits, '_' and '-')", i)
        m = m.replace("-", "_")
        problem = _forbidden_module(m)
        if problem:
            f.fail(path, problem, i)
        if m in out:
            f.fail(path, f"duplicate module {m!r} (also {f.key}[{out.index(m)}])", i)
        out.append(m)
    return tuple(out)


def _check_deadlines(f: _Field | None, path: str) -> Deadlines:
    if f is None:
        return Deadlines()
    if f.sub is None:
        f.fail(path, f"must be a mapping of deadlines in seconds "
                     f"({', '.join(DEFAULT_DEADLINES)}), got {_type_name(f.value)}")
    values = {}
    for key, sub in f.sub.items():
        v = sub.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            sub.fail(path, f"must be a number of seconds > 0, got {_type_name(v)}")
        if not math.isfinite(v) or v <= 0:
            sub.fail(path, f"must be a number of seconds > 0, got {v!r}")
        if v > MAX_DEADLINE_S:
            sub.fail(path, f"must be at most {MAX_DEADLINE_S} seconds (a wait that long is a "
                           f"hung host: fail it and say so), got {v!r}")
        values[key] = float(v)
    return Deadlines(**values)
