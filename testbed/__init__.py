"""vfio-hookd's test bed: everything the tests, the benchmarks and the demo need that is not the
product. Not installed (``pyproject.toml`` packages ``vfio_hookd`` only); importable when the
repository root is on ``sys.path`` (``python -m ...`` from the root, pytest's ``conftest.py``,
``bench/benchlib.py``, the kernel guest's runner).

- :mod:`testbed.sim`: the simulated host (fake kernel in a directory, fake systemd on a private
  D-Bus bus, fault injection and latencies).
- :mod:`testbed.fake_systemd`: an in-process fake of :class:`vfio_hookd.systemd.Systemd` driven by
  the same unit model, for the fast tests (no ``dbus-daemon``).
- :mod:`testbed.daemon`: start ``vfio-hookd``'s daemon (on a simulated host or on ``/``), wait
  for ``READY=1``, stop it by PID; ``python -m testbed.daemon --root DIR``.
- :mod:`testbed.cli`: ``python -m testbed.cli --root DIR ARGS...``, the product's CLI acting on a
  simulated host (for the tests of the CLI without a daemon).
- :mod:`testbed.expected`: the changes the kernel itself makes during prepare/release.
- :mod:`testbed.procs`: stop a child process (SIGTERM, SIGKILL after a deadline, reap).
- :mod:`testbed.pdeathsig`: children that die with their parent.
- :mod:`testbed.libvirtd`: a real libvirtd in a private mount namespace.
- :mod:`testbed.domains`: small libvirt domain XML for the demo and the tests.
- :mod:`testbed.demo`: ``python -m testbed.demo`` (``scripts/demo``).

Every child process started by the test bed runs the repository's code: :func:`child_env` puts
the repository root first on ``PYTHONPATH`` (an editable install of another checkout in the
venv would win otherwise).
"""

from __future__ import annotations

import os

#: The repository root (the directory holding ``vfio_hookd/`` and ``testbed/``).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(env: dict | None = None, **extra: str) -> dict:
    """A copy of ``env`` (default ``os.environ``) updated with ``extra``, whose ``PYTHONPATH``
    starts with :data:`REPO`, so that ``python -m vfio_hookd...`` / ``python -m testbed...`` in
    a child import this checkout's code whatever its working directory."""
    out = dict(os.environ if env is None else env)
    out.update(extra)
    parts = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != REPO]
    out["PYTHONPATH"] = os.pathsep.join([REPO, *parts])
    return out
