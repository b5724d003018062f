"""Words of the profile errors: the YAML name of a value's type and a "did you mean".

Shared by :mod:`vfio_hookd.profile.rules` and the rules kept in modules of their own
(:mod:`vfio_hookd.profile.inhibit`). ``difflib`` is imported only for a "did you mean".
"""

from __future__ import annotations


def type_name(value) -> str:
    """The YAML word for the type of ``value``: null, bool, int, float, string, list, mapping."""
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


def did_you_mean(word: str, choices) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, else the list of them."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(choices)})"
