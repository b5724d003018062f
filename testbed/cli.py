"""``python -m testbed.cli --root DIR ARGS...``: the product's command line
(:func:`vfio_hookd.cli.main`) acting on the simulated host in ``DIR``.

The product's CLI acts on the real host; the tests of what it does without a daemon
(``vfio-hookd status`` from the records, ``prepare``/``release`` in process) run it through
this wrapper, which hands it a :class:`testbed.sim.kernel.SimHost` through its API
(``main(argv, host=...)``). Paths come from the environment as for the product
(``VFIO_HOOKD_CONFIG``, ``VFIO_HOOKD_RUN``). A ``prepare`` or ``release`` is refused unless
``$DBUS_SYSTEM_BUS_ADDRESS`` names the simulated systemd's private bus: against the machine's
own systemd it would stop this machine's display manager. An ``init`` is refused unless
``$VFIO_HOOKD_CONFIG`` is set (it would write into this machine's ``/etc/vfio-hookd``);
``check`` and ``plan`` only read.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the product CLI's exit status."""
    ap = argparse.ArgumentParser(prog="python -m testbed.cli",
                                 description="vfio-hookd's CLI on a simulated host")
    ap.add_argument("--root", required=True, help="the simulated host directory")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="vfio-hookd's arguments")
    opts = ap.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    if any(a in ("prepare", "release", "daemon") for a in args[:1]):
        from .daemon import require_private_bus
        require_private_bus()
    if args[:1] == ["init"] and not os.environ.get("VFIO_HOOKD_CONFIG"):
        raise SystemExit("testbed.cli: init writes a profile: set VFIO_HOOKD_CONFIG to a "
                         "directory of the test (not this machine's /etc/vfio-hookd)")
    from vfio_hookd.cli import main as cli_main

    from testbed.sim.kernel import SimHost
    try:
        host = SimHost(opts.root)
    except ValueError as exc:
        raise SystemExit(f"testbed.cli: {exc}") from None
    return cli_main(args, host=host)


if __name__ == "__main__":
    sys.exit(main())
