"""The first-run verbs of the command line (:mod:`vfio_hookd.cli` imports this module only
when one of them runs): ``init``, ``check`` and ``plan``, and reading a domain's XML from
libvirt (read-only for these verbs) or from a file.

Each takes the parsed arguments and the CLI's ``Env`` (``paths``, ``host``,
``systemd_factory``) and returns the exit status; errors are :class:`HookdError`.
"""

from __future__ import annotations

import os
import sys

from . import errors
from .errors import HookdError
from .paths import check_vm_name


def domain_xml(vm: str, readonly: bool = False,
               why: str = "devices: auto (or hugepages: auto) needs") -> str:
    """The domain XML of ``vm`` from libvirt, for ``devices: auto`` (the CLI is not a hook, so
    it may call libvirt); ``readonly``: on a read-only connection.

    :raises HookdError: ``DOMAIN_XML_INVALID`` when libvirt cannot give it.
    """
    from .virt import Libvirt, VirtError
    try:
        with Libvirt(os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system",
                     readonly=readonly) as conn:
            return conn.xml_desc(vm)
    except VirtError as exc:
        raise HookdError(errors.DOMAIN_XML_INVALID,
                         f"{why} {vm!r}'s domain XML and libvirt could not give it "
                         f"({exc.message}); pass --xml FILE") from None


def xml_file(path: str) -> str:
    """The text of the domain XML file ``path``. :raises HookdError: ``DOMAIN_XML_INVALID``."""
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise HookdError(errors.DOMAIN_XML_INVALID,
                         f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def systemd_of(env):
    """The systemd client: ``env.systemd_factory()``, else the system bus's."""
    if env.systemd_factory is not None:
        return env.systemd_factory()
    from .systemd import Systemd
    return Systemd()


def cmd_init(args, env) -> int:
    """``vfio-hookd init VM [--xml FILE] [--force]``: write, validate and describe a first
    profile (:func:`vfio_hookd.init_profile.init`)."""
    from .init_profile import init, refuse_existing, report
    check_vm_name(args.vm)
    if not args.force:   # before libvirt or systemd is asked anything
        refuse_existing(env.paths.profile_path(args.vm), args.vm)
    if args.xml:
        xml, source = xml_file(args.xml), args.xml
    else:
        xml, source = domain_xml(args.vm, True, "init reads"), f"the domain XML of {args.vm!r}"
    sd = systemd_of(env)
    try:
        result = init(env.host, env.paths, args.vm, xml, sd, source, args.force)
    finally:
        sd.close()
    print("\n".join(report(result, args.vm)))
    return 0


def cmd_check(args, env) -> int:
    """``vfio-hookd check [VM] [--xml FILE] [--json]``: one line per check; 0 when nothing
    FAILs, else ``CHECK_FAILED`` (the domain XML unreadable is a WARN, not an error)."""
    from .preflight import failed, run_checks, to_json
    xml = problem = None
    if args.vm is not None:
        check_vm_name(args.vm)
        try:
            xml = xml_file(args.xml) if args.xml else \
                domain_xml(args.vm, True, "the hostdev checks read")
        except HookdError as exc:
            problem = exc.message
    sd = systemd_of(env)
    try:
        checks = run_checks(env.host, env.paths, sd, args.vm, xml, problem)
    finally:
        sd.close()
    if args.json:
        import json
        print(json.dumps(to_json(checks, args.vm), indent=2))
    else:
        print("\n".join(c.line() for c in checks))
    bad = failed(checks)
    if bad:
        err = HookdError(errors.CHECK_FAILED, f"{len(bad)} of {len(checks)} checks failed: "
                         + ", ".join(c.name for c in bad))
        print(str(err), file=sys.stderr)
        return err.exit_status
    return 0


def cmd_plan(args, env) -> int:
    """``vfio-hookd plan VM [--xml FILE] [--json]``: the prepare's plan and each step's
    observed facts (:mod:`vfio_hookd.plan_view`); the same planning errors as a prepare."""
    from .machine import Machine
    from .plan_view import document, render
    check_vm_name(args.vm)
    xml = xml_file(args.xml) if args.xml else None
    sd = None

    def systemd():
        nonlocal sd
        sd = sd or systemd_of(env)
        return sd
    machine = Machine(env.host, env.paths, systemd)
    prof = None
    if xml is None:
        from .profile import load_profile
        prof = load_profile(env.paths, args.vm)
        if prof.needs_domain_xml:
            xml = domain_xml(args.vm, True)
    try:
        doc = document(machine, machine.plan_prepare(args.vm, xml, prof))
    finally:
        if sd is not None:
            sd.close()
    if args.json:
        import json
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(render(doc)))
    return 0
