"""Where vfio-hookd keeps its files. Standard library only (the hook mirrors these rules).

- Profiles: ``$VFIO_HOOKD_CONFIG/vms/<domain name>.yaml`` (default ``/etc/vfio-hookd``).
- Records and the control socket: ``$VFIO_HOOKD_RUN`` (default ``/run/vfio-hookd``):
  ``<run>/vms/<domain name>.json`` and ``<run>/vfio-hookd.sock``.
- Host root: ``$VFIO_HOOKD_HOST_ROOT`` (default ``/``); a directory holding ``.sim/`` is the
  embedded simulated host (:mod:`vfio_hookd.sim`).
"""

from __future__ import annotations

import os

from . import errors

DEFAULT_CONFIG = "/etc/vfio-hookd"
DEFAULT_RUN = "/run/vfio-hookd"
SOCKET_NAME = "vfio-hookd.sock"


def config_dir() -> str:
    """The configuration directory (str), ``$VFIO_HOOKD_CONFIG`` or ``/etc/vfio-hookd``."""
    return os.environ.get("VFIO_HOOKD_CONFIG") or DEFAULT_CONFIG


def run_dir() -> str:
    """The runtime directory (str), ``$VFIO_HOOKD_RUN`` or ``/run/vfio-hookd``."""
    return os.environ.get("VFIO_HOOKD_RUN") or DEFAULT_RUN


def socket_path() -> str:
    """The daemon's control socket path (str)."""
    return os.path.join(run_dir(), SOCKET_NAME)


def host_root() -> str:
    """The host root (str) all sysfs, /dev and /proc/driver access is relative to."""
    return os.environ.get("VFIO_HOOKD_HOST_ROOT") or "/"


def check_vm_name(name: str) -> str:
    """Return ``name`` if it can name a profile file, else raise.

    :raises HookdError: ``VM_NAME_INVALID`` for an empty name, ``.``/``..``, or one holding
        ``/`` or NUL (libvirt allows almost any name; a file name does not).
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise errors.HookdError(
            errors.VM_NAME_INVALID,
            f"VM name {name!r} cannot name a profile file (empty, '.', '..', '/' or NUL)")
    return name


def profile_path(name: str) -> str:
    """Path of the profile of domain ``name``: ``<config>/vms/<name>.yaml``.

    :raises HookdError: ``VM_NAME_INVALID`` (see :func:`check_vm_name`).
    """
    return os.path.join(config_dir(), "vms", check_vm_name(name) + ".yaml")


def record_path(name: str) -> str:
    """Path of the record of domain ``name``: ``<run>/vms/<name>.json``."""
    return os.path.join(run_dir(), "vms", check_vm_name(name) + ".json")
