"""Reading a profile into the one structure the rules check: a list of :class:`Field`.

Two sources give the same structure: the YAML text of a profile file (:func:`read_yaml`, with
the line of each key and list item) and a dict such as a VM's record (:func:`read_data`, no
lines). The reader knows YAML, not the profile's keys: it keeps every key in file order, also
keys that are unknown, repeated or not names, and a value it cannot construct is recorded as
the field's :attr:`Field.problem`; judging all that is :mod:`vfio_hookd.profile.rules`' job,
so that the first mistake in the file is the one reported. Only what leaves no mapping to
read fails here: a YAML syntax error, a character YAML forbids, a top level that is not a
mapping.

Errors are ``HookdError(PROFILE_INVALID, "<file>:<line>: <key>: <what is wrong>")``
(:func:`fail`). pyyaml is imported only inside :func:`read_yaml`.
"""

from __future__ import annotations

from .. import errors
from .model import KEYS, MAX_LIST_ITEMS

#: The most nodes (keys, values, list items, collections) a profile may have: far above what
#: the keys allow with every list full (3 lists of 64 and a few dozen keys), far below what
#: 64 KiB of YAML can hold (32 000 one-character list items). Counted while parsing, before
#: any node is built.
MAX_NODES = 16 * MAX_LIST_ITEMS

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MAX_WHAT = 500


def fail(path: str, line: int | None, key: str | None, what: str):
    """Raise the profile error ``"<path>:<line>: <key>: <what>"`` (parts omitted when None).

    :param path: the profile file (or the path a record names), str.
    :param line: 1-based line number, or None when unknown (data from a dict).
    :param key: the key in error (``"devices"``, ``"deadlines.unbind"``, ``"devices[1]"``), or
        None for the document itself.
    :param what: what is wrong (str, one line).
    :raises HookdError: always: ``PROFILE_INVALID`` with details ``{"file", "line", "key"}``.
    """
    where = f"{path}:{line}" if line else path
    if len(what) > _MAX_WHAT:  # a 60 KiB value quoted in full would bury the message
        what = f"{what[:_MAX_WHAT]}... ({len(what) - _MAX_WHAT} more characters)"
    msg = f"{where}: {key}: {what}" if key else f"{where}: {what}"
    # "from None": a user's mistake, not a chain of exceptions (also when called in an except)
    raise errors.HookdError(errors.PROFILE_INVALID, msg,
                            {"file": path, "line": line, "key": key}) from None


class Field:
    """One key of a mapping as read, with where it came from.

    :ivar path: the file the field was read from, for errors (str).
    :ivar name: the key (str), or None when the key is not a string (see ``shown``).
    :ivar shown: the key as an error shows it: the text of a YAML scalar key, the node kind
        (``"list"``, ``"mapping"``) of a YAML collection key, or the dict key itself.
    :ivar key: where it sits, for errors: ``"devices"``, ``"deadlines.unbind"`` (str).
    :ivar value: the constructed value (str, int, float, bool, None, list, dict, ...); for a
        section (``sub``) a dict of the sub-fields' values; None when ``problem`` is set.
    :ivar line: 1-based line of the key, or None (data from a dict).
    :ivar text: the source text of a scalar value (str), else None. YAML 1.1 reads an
        unquoted ``0000:01:00.0`` as the number 60.0; the text is what was written.
    :ivar item_lines: for a list value, the line of each item (list[int]), else None.
    :ivar item_texts: for a list value, the source text of each scalar item (None for items
        that are not scalars), else None.
    :ivar sub: for a section read key by key, its fields in file order (list[Field]), else None.
    :ivar problem: why the value could not be constructed (str, e.g. an unsafe tag), else None;
        ``problem_line`` is where.
    """

    __slots__ = ("path", "name", "shown", "key", "value", "line", "text", "item_lines",
                 "item_texts", "sub", "problem", "problem_line")

    def __init__(self, path: str, name, shown, key: str, value, line: int | None = None, *,
                 text=None, item_lines=None, item_texts=None, sub=None, problem=None,
                 problem_line=None):
        self.path = path
        self.name = name
        self.shown = shown
        self.key = key
        self.value = value
        self.line = line
        self.text = text
        self.item_lines = item_lines
        self.item_texts = item_texts
        self.sub = sub
        self.problem = problem
        self.problem_line = problem_line

    def fail(self, what: str, index: int | None = None):
        """Raise :func:`fail` for this field, or for its list item ``index`` (``key[index]``,
        at the item's line when known).

        :raises HookdError: always, ``PROFILE_INVALID``.
        """
        if index is None:
            fail(self.path, self.line, self.key, what)
        line = self.item_lines[index] if self.item_lines else self.line
        fail(self.path, line, f"{self.key}[{index}]", what)

    def __repr__(self) -> str:
        return f"Field({self.key!r}, {self.value!r}, line={self.line})"


def read_yaml(text: str, path: str, sections=()) -> list[Field]:
    """The top-level fields of the YAML document ``text``, in file order.

    An empty document (empty text, only comments, a bare ``---``, ``~``) gives ``[]``.

    :param text: the profile file's text (str).
    :param path: names the file in errors (str).
    :param sections: top-level keys (str) whose value, when it is a mapping, is read key by key
        into :attr:`Field.sub` (``deadlines``); other values are constructed whole.
    :raises HookdError: ``PROFILE_INVALID``: ``"<path>:<line>:<col>: YAML syntax error: ..."``
        (also for a character YAML forbids, or a second document), ``"<path>:<line>: the
        profile must be a mapping of keys (...)"``.
    """
    import yaml  # lazily: ~15 ms, only the daemon and the CLI parse profiles

    # libyaml's parser when pyyaml was built with it (Debian's python3-yaml is): about 30
    # times faster than the pure-Python one (a 64 KiB profile in under 1 ms instead of 21 ms,
    # bench/profile_limits.py); the same nodes, marks and errors otherwise.
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    except yaml.reader.ReaderError as e:  # the pure-Python reader checks the text at once
        _character_error(text, path, e)
    try:
        try:
            _check_sizes(type(loader)(text), path)
            root = loader.get_single_node()
        except yaml.reader.ReaderError as e:  # a character YAML forbids (NUL, most controls)
            _character_error(text, path, e)
        except yaml.MarkedYAMLError as e:
            _syntax_error(path, e)
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL_TAG):
            return []
        if not isinstance(root, yaml.MappingNode):
            fail(path, _line(root), None,
                 f"the profile must be a mapping of keys ({', '.join(KEYS)}), "
                 f"got {_node_kind(root)}")
        return _read_mapping(loader, root, path, None, sections)
    finally:
        loader.dispose()


def _check_sizes(scanner, path: str) -> None:
    """Refuse a document with a list of more than :data:`MAX_LIST_ITEMS` items, or more than
    :data:`MAX_NODES` nodes, from pyyaml's parser events, before any node is composed: the
    scan stops at the first item or node too many, so refusing any 64 KiB input costs about as
    much as reading a valid profile (``bench/profile_limits.py``), not the 21 000 nodes a flow
    list ``[a, a, ...]`` holds. A syntax error is left to the composer (raised alike).

    :param scanner: a fresh loader of the same class and text (disposed here).
    :raises HookdError: ``PROFILE_INVALID`` ``"<path>:<line>: <key>: has more than 64 items
        (the 65th at line N); a profile list may have at most 64"`` at the line of the list's
        key (``devices``, ``deadlines.x``, ``devices[0]`` for a list in a list), or
        ``"<path>:<line>: the profile has more than MAX_NODES values ..."``.
    """
    import yaml

    # one frame per open collection: {"seq": is a list, "n": items so far, "key"/"line": the
    # key naming it and its line, "want_key": a mapping's next node is a key, "cur"/"cur_line":
    # the mapping's current key}
    stack: list[dict] = []
    nodes = 0
    try:
        while True:
            event = scanner.get_event()
            if event is None or isinstance(event, yaml.StreamEndEvent):
                return
            if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                stack.pop()
                continue
            if not isinstance(event, yaml.NodeEvent):
                continue   # stream and document start/end
            nodes += 1
            line = event.start_mark.line + 1
            if nodes > MAX_NODES:
                fail(path, line, None, f"the profile has more than {MAX_NODES} values; no "
                     f"profile needs that many (lists of at most {MAX_LIST_ITEMS} items)")
            key, key_line, is_key = None, line, False
            if stack:
                top = stack[-1]
                if top["seq"]:
                    top["n"] += 1
                    if top["n"] > MAX_LIST_ITEMS:
                        fail(path, top["line"], top["key"],
                             f"has more than {MAX_LIST_ITEMS} items (the {MAX_LIST_ITEMS + 1}th "
                             f"at line {line}); a profile list may have at most {MAX_LIST_ITEMS}")
                    key = f"{top['key']}[{top['n'] - 1}]" if top["key"] else None
                else:
                    is_key, top["want_key"] = top["want_key"], not top["want_key"]
                    if is_key:
                        shown = (event.value[:80] if isinstance(event, yaml.ScalarEvent) else
                                 "list" if isinstance(event, yaml.SequenceStartEvent) else
                                 "mapping")
                        top["cur"] = f"{top['key']}.{shown}" if top["key"] else shown
                        top["cur_line"] = line
                    else:
                        key, key_line = top["cur"], top["cur_line"]
            if isinstance(event, yaml.CollectionStartEvent):
                stack.append({"seq": isinstance(event, yaml.SequenceStartEvent), "n": 0,
                              "key": key, "line": key_line, "want_key": True,
                              "cur": None, "cur_line": line})
    except yaml.YAMLError:
        return   # the composer meets the same error and reports it
    finally:
        scanner.dispose()


def read_data(data: dict, path: str, sections=()) -> list[Field]:
    """The fields of ``data`` (a dict such as a record's profile), in its order, without lines.

    :param data: ``{key: value}`` (dict); values are taken as they are.
    :param path: names the profile in errors (str).
    :param sections: top-level keys whose value, when it is a dict, is read key by key into
        :attr:`Field.sub`, as :func:`read_yaml` does.
    """
    out = []
    for k, v in data.items():
        sub = None
        if k in sections and isinstance(v, dict):
            sub = [Field(path, sk if isinstance(sk, str) else None, sk, f"{k}.{sk}", sv)
                   for sk, sv in v.items()]
        out.append(Field(path, k if isinstance(k, str) else None, k, str(k), v, sub=sub))
    return out


def _read_mapping(loader, node, path: str, parent: str | None, sections) -> list[Field]:
    import yaml

    out = []
    for key_node, value_node in node.value:
        line = _line(key_node)
        if isinstance(key_node, yaml.ScalarNode):
            shown = key_node.value
            name = shown if key_node.tag == _STR_TAG else None
        else:
            name, shown = None, _node_kind(key_node)
        key = f"{parent}.{shown}" if parent else shown
        if name in sections and isinstance(value_node, yaml.MappingNode):
            sub = _read_mapping(loader, value_node, path, key, ())
            value = {f.name: f.value for f in sub if f.name is not None}
            out.append(Field(path, name, shown, key, value, line, sub=sub))
            continue
        field = Field(path, name, shown, key, None, line)
        try:
            field.value = loader.construct_object(value_node, deep=True)
        except yaml.MarkedYAMLError as e:  # e.g. an unknown tag: "!!python/object ..."
            # Recorded, not raised: an earlier key's mistake is reported first. pyyaml may be
            # left half-way in this node; nothing after it is looked at once this is reported.
            field.problem = e.problem or str(e)
            field.problem_line = e.problem_mark.line + 1 if e.problem_mark else _line(value_node)
        if isinstance(value_node, yaml.SequenceNode):
            field.item_lines = [_line(n) for n in value_node.value]
            field.item_texts = [n.value if isinstance(n, yaml.ScalarNode) else None
                                for n in value_node.value]
        elif isinstance(value_node, yaml.ScalarNode):
            field.text = value_node.value
        out.append(field)
    return out


def _character_error(text: str, path: str, e) -> None:
    position = min(max(e.position, 0), len(text))
    line = text.count("\n", 0, position) + 1
    col = position - (text.rfind("\n", 0, position) + 1) + 1
    raise errors.HookdError(
        errors.PROFILE_INVALID,
        f"{path}:{line}:{col}: YAML syntax error: character {e.character:#x} is not "
        f"allowed in YAML", {"file": path, "line": line, "key": None}) from None


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
