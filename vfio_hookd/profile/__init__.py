"""Per-VM profiles: ``<config>/vms/<domain name>.yaml`` (:meth:`vfio_hookd.paths.Paths.profile_path`).

A domain is *managed* by vfio-hookd exactly when its profile file exists; every other domain is
left alone. The file is YAML; every key is optional and an empty file means "all defaults".
``config.example.yaml`` at the top of the repository documents each key, its default and the
values it allows. Every error is ``HookdError(PROFILE_INVALID, "<file>:<line>: <key>: <what is
wrong>")`` so the user can go to the line.

The package (this module only re-exports; the modules below never import it):

- :mod:`.model`: :class:`Profile`, :class:`Deadlines` and the constants (the "auto"/"none"
  representation table is there);
- :mod:`.reader`: YAML text or a record's dict -> one list of fields with their lines;
- :mod:`.rules`: the table of validation rules, and building a :class:`Profile` by walking it;
- :mod:`.files`: :func:`is_managed`, :func:`load_profile`, :func:`parse_profile`;
- :mod:`.domain_xml`: :func:`devices_from_domain_xml`, for ``devices: auto``.

Importing it stays cheap for the CLI: pyyaml, ``xml.etree`` and ``difflib`` are imported only
inside the functions that need them.
"""

from __future__ import annotations

from ..pci import normalize_address as normalize_pci_address
from .domain_xml import devices_from_domain_xml
from .files import is_managed, load_profile, parse_profile
from .model import (AUTO, DEFAULT_DEADLINES, DISPLAY_MANAGER_ALIAS, KEYS, MAX_DEADLINE_S, NONE,
                    ON_BUSY, Deadlines, Profile)
from .rules import profile_from_dict

__all__ = ["AUTO", "DEFAULT_DEADLINES", "DISPLAY_MANAGER_ALIAS", "KEYS", "MAX_DEADLINE_S", "NONE",
           "ON_BUSY", "Deadlines", "Profile", "devices_from_domain_xml", "is_managed",
           "load_profile", "normalize_pci_address", "parse_profile", "profile_from_dict"]
