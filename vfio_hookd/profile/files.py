"""Profile files: whether a domain has one (:func:`is_managed`), reading one
(:func:`load_profile`) and validating its text (:func:`parse_profile`).

Loading is pure parsing: nothing on the host is read except the profile file itself (and the
owners and modes of it and its directories: :mod:`vfio_hookd.trust`).
"""

from __future__ import annotations

import os

from .. import errors
from ..paths import Paths, check_vm_name
from ..trust import open_trusted
from . import reader, rules
from .model import MAX_PROFILE_BYTES, Profile


def is_managed(paths: Paths, name: str) -> bool:
    """True when domain ``name`` has a profile file, i.e. vfio-hookd manages it.

    Only the file's presence counts (``os.path.lexists``: a dangling symlink counts as present,
    so loading it fails loudly instead of the VM silently running unmanaged). A name that cannot
    name a profile file (``/``, NUL, empty, see :func:`vfio_hookd.paths.check_vm_name`) cannot
    have a profile: ``False``.

    :param paths: :class:`vfio_hookd.paths.Paths` (``paths.profile_path(name)``).
    :param name: the libvirt domain name (str).
    """
    try:
        path = paths.profile_path(name)
    except errors.HookdError:
        return False
    return os.path.lexists(path)


def load_profile(paths: Paths, name: str) -> Profile:
    """Read and validate the profile of domain ``name`` from ``paths.profile_path(name)``
    (:class:`vfio_hookd.paths.Paths`).

    The file is opened by :func:`vfio_hookd.trust.open_trusted`: it, its symlinks' targets and
    every directory up to ``/`` must be root's and writable by root alone (``paths.trusted_uid``
    is trusted too; 0 in the product).

    :raises HookdError: ``VM_NAME_INVALID`` for a name that cannot name a file; ``NOT_MANAGED``
        when there is no profile file; ``UNTRUSTED_FILE`` when someone besides root owns or may
        write it or a directory above it; ``PROFILE_INVALID`` when it cannot be read
        (permissions, a directory, not UTF-8, dangling symlink), is larger than
        :data:`~vfio_hookd.profile.model.MAX_PROFILE_BYTES` (at most that much + 1 byte is
        read) or is invalid (see :func:`parse_profile`).
    """
    path = paths.profile_path(name)
    try:
        with open_trusted(path, paths.trusted_uid) as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        if os.path.islink(path):
            reader.fail(path, None, None, "is a symbolic link to a missing file")
        raise errors.HookdError(
            errors.NOT_MANAGED,
            f"VM {name!r} is not managed by vfio-hookd: there is no profile {path} "
            f"(an empty file manages it with all defaults; see config.example.yaml)",
            {"vm": name, "file": path}) from None
    except OSError as e:
        reader.fail(path, None, None, f"cannot be read: {e.strerror or e}")
    if len(raw) > MAX_PROFILE_BYTES:
        _too_large(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        reader.fail(path, None, None, f"is not UTF-8 text (byte {e.start}: {e.reason})")
    return parse_profile(text, path, name)


def parse_profile(text: str, path: str, name: str) -> Profile:
    """Validate the YAML ``text`` of the profile of domain ``name``; ``path`` (str) names it in
    errors and is kept in :attr:`Profile.path`.

    An empty document (empty file, only comments, or a bare ``---``) gives all defaults. A text
    of more than :data:`~vfio_hookd.profile.model.MAX_PROFILE_BYTES` bytes (UTF-8) is refused
    before YAML reads it.

    :raises HookdError: ``VM_NAME_INVALID`` (:func:`vfio_hookd.paths.check_vm_name`);
        ``PROFILE_INVALID`` with the message ``"<path>:<line>: <key>: <what is wrong>"``
        (``"<path>:<line>:<col>: YAML syntax error: ..."`` for syntax errors) and details
        ``{"file", "line", "key"}``.
    """
    check_vm_name(name)
    if (len(text) > MAX_PROFILE_BYTES
            or len(text.encode("utf-8", "surrogatepass")) > MAX_PROFILE_BYTES):
        _too_large(path)
    return rules.build(reader.read_yaml(text, path, rules.SECTIONS), path, name)


def _too_large(path: str):
    reader.fail(path, None, None,
                f"is larger than {MAX_PROFILE_BYTES} bytes (64 KiB), the most a profile may be "
                f"(a profile with every key and full lists is about 23 KiB)")
