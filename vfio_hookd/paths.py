"""Where vfio-hookd keeps its files: one :class:`Paths` built once at the edge (CLI, daemon
entry point, hook) from the environment, then passed in. Standard library only (the hook
mirrors these rules without importing this module).

- Profiles: ``<config>/vms/<domain name>.yaml``; config is ``$VFIO_HOOKD_CONFIG`` or
  ``/etc/vfio-hookd``.
- Records, locks and the control socket: ``<run>/vms/<domain name>.json``, ``<run>/locks/``,
  ``<run>/vfio-hookd.sock``; run is ``$VFIO_HOOKD_RUN`` or ``/run/vfio-hookd``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from . import errors

DEFAULT_CONFIG = "/etc/vfio-hookd"
DEFAULT_RUN = "/run/vfio-hookd"
SOCKET_NAME = "vfio-hookd.sock"
#: The longest VM name a profile or record file can carry: NAME_MAX (255 bytes) less the
#: ``.yaml``/``.json`` suffix (libvirt itself has no limit).
MAX_VM_NAME_BYTES = 250


@dataclass(frozen=True)
class Paths:
    """The configuration and runtime directories (absolute ``str`` paths).

    :ivar config_dir: profiles live in ``<config_dir>/vms/``.
    :ivar run_dir: records in ``<run_dir>/vms/``, locks in ``<run_dir>/locks/``, the socket.
    :ivar trusted_uid: whose profiles and records are read besides root's
        (:func:`vfio_hookd.trust.open_trusted`); 0, root alone, everywhere but in tests, which
        set it here (never from the environment).
    """

    config_dir: str = DEFAULT_CONFIG
    run_dir: str = DEFAULT_RUN
    trusted_uid: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Paths":
        """``$VFIO_HOOKD_CONFIG`` / ``$VFIO_HOOKD_RUN`` (empty or unset: the defaults)."""
        env = os.environ if environ is None else environ
        return cls(config_dir=os.path.abspath(env.get("VFIO_HOOKD_CONFIG") or DEFAULT_CONFIG),
                   run_dir=os.path.abspath(env.get("VFIO_HOOKD_RUN") or DEFAULT_RUN))

    @property
    def profiles_dir(self) -> str:
        """``<config>/vms``."""
        return os.path.join(self.config_dir, "vms")

    @property
    def records_dir(self) -> str:
        """``<run>/vms``."""
        return os.path.join(self.run_dir, "vms")

    @property
    def locks_dir(self) -> str:
        """``<run>/locks``: one ``flock`` file per VM and per PCI function."""
        return os.path.join(self.run_dir, "locks")

    @property
    def socket(self) -> str:
        """The daemon's control socket, ``<run>/vfio-hookd.sock``."""
        return os.path.join(self.run_dir, SOCKET_NAME)

    def profile_path(self, name: str) -> str:
        """``<config>/vms/<name>.yaml``.

        :raises HookdError: ``VM_NAME_INVALID`` (see :func:`check_vm_name`).
        """
        return os.path.join(self.profiles_dir, check_vm_name(name) + ".yaml")

    def record_path(self, name: str) -> str:
        """``<run>/vms/<name>.json``.

        :raises HookdError: ``VM_NAME_INVALID`` (see :func:`check_vm_name`).
        """
        return os.path.join(self.records_dir, check_vm_name(name) + ".json")


def check_vm_name(name: object) -> str:
    """Return ``name`` if it can name a profile file, else raise.

    :raises HookdError: ``VM_NAME_INVALID`` for a non-string, an empty name, ``.``/``..``, one
        holding ``/`` or NUL, or one longer than :data:`MAX_VM_NAME_BYTES` in UTF-8 (libvirt
        allows almost any name; a file name does not).
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise errors.HookdError(
            errors.VM_NAME_INVALID,
            f"VM name {_shown(name)} cannot name a profile file (empty, '.', '..', '/' or NUL)")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise errors.HookdError(errors.VM_NAME_INVALID,
                                f"VM name {_shown(name)} is not valid UTF-8") from None
    if size > MAX_VM_NAME_BYTES:
        raise errors.HookdError(errors.VM_NAME_INVALID,
                                f"VM name is {size} bytes long; a profile file name allows "
                                f"{MAX_VM_NAME_BYTES}")
    return name


def _shown(name: object) -> str:
    """``repr(name)`` for a message, cut after 80 characters (a request may carry megabytes)."""
    if not isinstance(name, str):
        return f"of type {type(name).__name__}"
    text = repr(name)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(name)} characters)"
