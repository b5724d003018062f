"""Only root's files steer a root daemon: :func:`open_trusted` opens a profile or a record only
when nobody but root can have written it or chosen which file it is.

The rule is sshd's ``StrictModes`` (sshd_config(5): "sshd(8) should check file modes and
ownership of the user's files and home directory before accepting login"; OpenSSH ``misc.c``
``safe_path()``): the file and every directory from it up to ``/`` are owned by root and not
writable by group or others.

- Symbolic links are followed one component at a time as the kernel does (path_resolution(7)):
  each directory walked through is checked, so is each link (its owner: a link's mode means
  nothing), its target and the target's directories. More than 40 links is ``ELOOP``.
- A sticky directory (``S_ISVTX``, e.g. ``/tmp``, mode 1777, root-owned) may be writable by
  others: in it only an entry's owner (or the directory's, or root) may delete or rename that
  entry (inode(7), "The file type and mode": the sticky bit), so an entry that is root's and
  not writable by others stays root's.
- Every component is opened (``O_PATH|O_NOFOLLOW``, then the file ``O_RDONLY|O_NOFOLLOW``)
  relative to the already checked directory's descriptor, and what is judged is ``os.fstat`` of
  the descriptor that is then used: a swap between the check and the read cannot slip through.

Standard library only. Nothing is changed on the host: a refusal only names the fix.
"""

from __future__ import annotations

import errno
import os
import stat

from . import errors
from .errors import HookdError

#: The most symbolic links followed in one path (path_resolution(7): Linux allows 40).
MAX_LINKS = 40
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GO_W = stat.S_IWGRP | stat.S_IWOTH
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _owner(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _refuse(requested: str, path: str, st: os.stat_result, kind: str, bad_owner: bool,
            bad_mode: bool, link: bool = False, verb: str = "read") -> HookdError:
    """``UNTRUSTED_FILE`` naming ``requested``, the component ``path`` at fault, its owner and
    mode, and the fix."""
    fixes = []
    if bad_owner:
        fixes.append(f"chown {'-h ' if link else ''}root:root {path}")
    if bad_mode:
        fixes.append(f"chmod go-w {path}")
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    what = (f"{requested}: the {kind}" if path == requested
            else f"{requested}: the {kind} {path} it is {verb} through")
    rule = ("reads only files that root owns and only root can write, in directories likewise"
            if verb == "read" else "writes its records only in directories that root owns and "
            "only root can write, likewise")
    return HookdError(
        errors.UNTRUSTED_FILE,
        f"{what} is owned by {_owner(st.st_uid)} with mode {mode}; vfio-hookd runs as root "
        f"and {rule} up to /: {' and '.join(fixes)}, or move the "
        f"{'file' if verb == 'read' else 'directory'} to such a directory",
        {"file": requested, "path": path, "uid": st.st_uid, "mode": mode})


def _check(requested: str, path: str, st: os.stat_result, owners: frozenset, kind: str,
           verb: str = "read") -> None:
    bad_owner = st.st_uid not in owners
    writable = bool(st.st_mode & _GO_W)
    if kind == "directory" and writable and st.st_mode & stat.S_ISVTX:
        writable = False   # sticky: others' entries are theirs, ours stay ours
    if bad_owner or writable:
        raise _refuse(requested, path, st, kind, bad_owner, writable, verb=verb)


def open_trusted(path: str, trusted_uid: int = 0):
    """Open the regular file ``path`` (absolute ``str``) for reading, binary, if root's alone.

    :param trusted_uid: the uid whose files are trusted besides root (0 = root only: the
        product's value; tests pass another to build trusted cases without root's files).
    :returns: the open file object (``rb``); the caller closes it.
    :raises HookdError: ``UNTRUSTED_FILE`` naming the file, the component at fault, its owner
        and mode, and the fix (``chown root:root``, ``chmod go-w``).
    :raises OSError: as ``open`` would: ``FileNotFoundError`` (also for a dangling link),
        ``IsADirectoryError``, ``ELOOP``, ``EACCES``; ``EINVAL`` for a file that is not a
        regular file (a FIFO, a device).
    """
    def last(fd: int, name: str, here: str, owners: frozenset):
        ffd = os.open(name, _FILE, dir_fd=fd)
        try:
            st = os.fstat(ffd)   # the file that will be read decides, not its lstat
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), here)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", here)
            _check(path, here, st, owners, "file")
            os.set_blocking(ffd, True)
            return os.fdopen(ffd, "rb")
        except BaseException:
            os.close(ffd)
            raise
    return _walk(path, trusted_uid, last)


def open_trusted_dir(path: str, trusted_uid: int = 0) -> int:
    """Open the directory ``path`` (absolute ``str``) if it and every directory up to ``/`` are
    root's and writable by root alone (the rule of :func:`open_trusted`, symlinks followed and
    checked alike; the directory itself may not be sticky-and-writable either): where records
    are written (release trusts them, so they must not be written where another user could
    swap or plant them).

    :param trusted_uid: as for :func:`open_trusted`.
    :returns: an ``O_PATH`` descriptor (int) of the checked directory, for ``dir_fd=`` of the
        ``*at`` calls that then write in it (the directory checked is the one written to); the
        caller closes it.
    :raises HookdError: ``UNTRUSTED_FILE`` naming the directory, the component at fault, its
        owner and mode, and the fix.
    :raises OSError: ``FileNotFoundError``, ``NotADirectoryError``, ``ELOOP``, ``EACCES``.
    """
    def last(fd: int, name: str, here: str, owners: frozenset) -> int:
        nfd = os.open(name, _DIR, dir_fd=fd)
        try:
            st = os.fstat(nfd)
            # no sticky exemption here: in a sticky directory others may still create the
            # names records will take
            bad_owner, writable = st.st_uid not in owners, bool(st.st_mode & _GO_W)
            if bad_owner or writable:
                raise _refuse(path, here, st, "directory", bad_owner, writable, verb="written")
        except BaseException:
            os.close(nfd)
            raise
        return nfd
    return _walk(path, trusted_uid, last, "written")


def _walk(path: str, trusted_uid: int, last, verb: str = "read"):
    """Walk ``path`` from ``/`` checking each directory and link on the way (module
    docstring); return ``last(dir fd, name, path so far, owners)`` for its final component."""
    if not os.path.isabs(path):
        raise ValueError(f"not an absolute path: {path!r}")
    owners = frozenset({0, trusted_uid})
    todo = [c for c in path.split("/") if c not in ("", ".")]
    fd = os.open("/", _DIR)
    try:
        _check(path, "/", os.fstat(fd), owners, "directory", verb)
        cur, links = "/", 0
        while todo:
            name = todo.pop(0)
            if name == "..":   # the parent of a checked directory was checked on the way in
                nfd = os.open("..", _DIR, dir_fd=fd)
                os.close(fd)
                fd, cur = nfd, os.path.dirname(cur)
                _check(path, cur, os.fstat(fd), owners, "directory", verb)
                if not todo:
                    return last(fd, ".", cur, owners)
                continue
            here = os.path.join(cur, name)
            lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(lst.st_mode):
                if lst.st_uid not in owners:
                    raise _refuse(path, here, lst, "symbolic link", True, False, link=True,
                                  verb=verb)
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(name, dir_fd=fd)
                todo[:0] = [c for c in target.split("/") if c not in ("", ".")]
                if target.startswith("/"):
                    os.close(fd)
                    fd, cur = os.open("/", _DIR), "/"
                    _check(path, "/", os.fstat(fd), owners, "directory", verb)
                    if not todo:
                        return last(fd, ".", cur, owners)
                continue
            if todo:   # a directory on the way
                nfd = os.open(name, _DIR, dir_fd=fd)
                os.close(fd)
                fd, cur = nfd, here
                _check(path, cur, os.fstat(fd), owners, "directory", verb)
                continue
            return last(fd, name, here, owners)
        return last(fd, ".", cur, owners)
    finally:
        os.close(fd)
