"""``vfio-hookd``: the command line.

- ``vfio-hookd daemon``: run the daemon (systemd/vfio-hookd.service).
- ``vfio-hookd status [VM] [--json]``: each VM's phase, steps (status, duration) and devices
  with their current driver; from the daemon, or from the records when it is down.
- ``vfio-hookd prepare VM [--xml FILE]`` / ``release VM``: the same state machine as the hook,
  for plain-QEMU users and for recovery; through the daemon, or in this process (with the same
  per-device locks) when the daemon is not running.
- ``vfio-hookd install``: the hook into libvirt's ``hooks/qemu.d/``, the unit into systemd, and
  libvirtd told to re-read its hooks.
- ``vfio-hookd init VM [--xml FILE] [--force]``: a first profile from the domain and the host
  (:mod:`vfio_hookd.init_profile`).
- ``vfio-hookd check [VM] [--xml FILE] [--json]``: a preflight that changes nothing
  (:mod:`vfio_hookd.preflight`); exit status 0 only if nothing FAILs (else ``CHECK_FAILED``).
- ``vfio-hookd plan VM [--xml FILE] [--json]``: what a prepare would do now, step by step, and
  its deadline (:mod:`vfio_hookd.plan_view`).
- ``vfio-hookd rom dump ADDR FILE [--force] [--json]``: the function's expansion ROM, validated,
  into FILE; no daemon needed (:mod:`vfio_hookd.rom`).

Exit status: 0 on success; otherwise ``CODE: message`` on stderr and the code's status
(:data:`vfio_hookd.errors.EXIT_STATUS`; 1 for an unexpected bug).

Paths come from the environment once, here at the edge (:meth:`vfio_hookd.paths.Paths.from_env`),
and each verb imports only what it uses: yaml only to read a profile, pydbus/GLib only when it
talks to systemd, libvirt only when it talks to libvirt.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import errors
from .errors import HookdError
from .paths import Paths, check_vm_name


def _daemon_request(paths: Paths, payload: dict) -> dict | None:
    """The daemon's result, or None when no daemon listens. Daemon errors raise HookdError."""
    from .qemu_hook import HookFailure, request
    if not os.path.exists(paths.socket):
        return None
    try:
        return request(payload, path=paths.socket)
    except HookFailure as exc:
        if exc.code == "DAEMON_UNREACHABLE":
            return None
        raise HookdError.from_dict({"code": exc.code, "message": exc.message})


class Env:
    """What every verb works with, built once in :func:`main`.

    :ivar paths: :class:`~vfio_hookd.paths.Paths` from the environment.
    :ivar host: the :class:`~vfio_hookd.host.Host` to act on (the real one, ``/``, unless a
        caller of :func:`main` passes another, as the repository's tests do).
    :ivar systemd_factory: as for :class:`vfio_hookd.machine.Machine` (None: the system bus).
    """

    def __init__(self, paths: Paths, host=None, systemd_factory=None):
        self.paths = paths
        self._host = host
        self.systemd_factory = systemd_factory

    @property
    def host(self):
        if self._host is None:
            from .host import Host
            self._host = Host("/")
        return self._host


def _local_machine(env: Env):
    from . import log
    from .machine import Machine
    log.setup()
    return Machine(env.host, env.paths, env.systemd_factory)


def cmd_status(args, env: Env) -> int:
    paths = env.paths
    result = _daemon_request(paths, {"op": "status", "vm": args.vm})
    if result is None:
        from .status import status_from_records
        result = status_from_records(env.host, paths, args.vm)
        source = "records (daemon not running)"
    else:
        source = "daemon"
    if args.json:
        import json
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    for w in result.get("stuck_writes") or []:
        print(f"stuck: writing {w['data']!r} to {w['path']} has not returned since {w['since']}")
    vms = result["vms"]
    if not vms:
        print(f"no VM records in {paths.run_dir} (source: {source})")
        return 0
    for name, vm in sorted(vms.items()):
        print(f"{name}: {vm['phase']}")
        for dev in vm["devices"]:
            before = dev.get("driver_before")
            print(f"  device {dev['address']}: driver {dev['driver'] or 'none'}"
                  + (f" (held by VM {dev['held_by']})" if dev.get("held_by") else
                     f" (before: {before or 'none'})" if "driver_before" in dev else ""))
        inh = vm.get("inhibitor")
        if inh:
            print(f"  inhibitor {inh['what']} ({inh['mode']}) since {inh['since']}: " + (
                "held by the daemon" if inh["held"] else f"NOT held: {inh['error']}"
                if inh["error"] else "NOT held by the daemon" if inh["held"] is False else
                "the daemon that took it is not running (it takes it again when it starts)"))
        for s in vm["steps"]:
            times = []
            if s["duration_ms"] is not None:
                times.append(f"{s['duration_ms']:.0f} ms")
            if s.get("undo_ms") is not None:
                times.append(f"undo {s['undo_ms']:.0f} ms")
            line = f"  step {s['name']:<12} {s['status']:<12} {', '.join(times)}"
            print(line.rstrip())
            if s["error"]:
                print(f"    error: {s['error']}")
            for note in s.get("notes") or []:
                print(f"    note: {note}")
            for warning in s.get("warnings") or []:
                print(f"    warning: {warning}")
            for skipped in s.get("skipped") or []:
                print(f"    left alone: {skipped}")
            for what, why in sorted((s.get("why") or {}).items()):
                print(f"    {what}: {why}")
        if vm.get("error"):
            e = vm["error"]
            print(f"  last prepare failed at step {e.get('step')}: {e['code']}: {e['message']}")
        for e in vm.get("release_errors") or []:
            print(f"  release failed at step {e.get('step')}: {e['code']}: {e['message']}")
        d = vm.get("desktop") or {}
        if d.get("check", "none") != "none":
            took = f" after {d['seconds']:g} s" if d.get("seconds") is not None else ""
            print(f"  desktop {d['check']}{took}" + (f" ({d['after']})" if d.get("after") else "")
                  + (f": missing {'; '.join(d['missing'])}" if d.get("missing") else ""))
    print(f"(source: {source})")
    return 0


def cmd_prepare(args, env: Env) -> int:
    paths = env.paths
    check_vm_name(args.vm)
    xml = None
    if args.xml:
        try:
            with open(args.xml) as f:
                xml = f.read()
        except OSError as exc:
            raise HookdError(errors.DOMAIN_XML_INVALID, f"{args.xml}: {exc.strerror}") from None
    prof = None
    if xml is None:
        from .profile import load_profile
        prof = load_profile(paths, args.vm)
        if prof.needs_domain_xml:
            xml = _domain_xml(args.vm)
    result = _daemon_request(paths, {"op": "prepare", "vm": args.vm, "xml": xml})
    if result is None:
        rec = _local_machine(env).prepare(args.vm, xml, prof)
        result = {"vm": args.vm, "phase": rec.phase}
    print(f"{result['vm']}: {result['phase']}")
    return 0


def _domain_xml(vm: str) -> str:
    """The domain XML of ``vm`` from libvirt, for ``devices: auto`` (the CLI is not a hook, so
    it may call libvirt). :raises HookdError: ``DOMAIN_XML_INVALID`` when libvirt cannot give it.
    """
    from .firstrun import domain_xml
    return domain_xml(vm)


def cmd_init(args, env: Env) -> int:
    from .firstrun import cmd_init as run
    return run(args, env)


def cmd_check(args, env: Env) -> int:
    from .firstrun import cmd_check as run
    return run(args, env)


def cmd_plan(args, env: Env) -> int:
    from .firstrun import cmd_plan as run
    return run(args, env)


def cmd_rom(args, env: Env) -> int:
    """``rom dump ADDR FILE``: :func:`vfio_hookd.rom.dump` on the host, one line (or JSON)."""
    from .rom import dump, summary_line
    result = dump(env.host, args.address, args.file, force=args.force)
    if args.json:
        import json
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(summary_line(result))
        for w in result["warnings"]:
            print(f"warning: {w}")
    return 0


def _refuse_if_running(vm: str) -> None:
    """Refuse a hand-made release while libvirt runs ``vm``: it would take the GPU from a
    running guest. When libvirt cannot be asked (no libvirtd, plain QEMU), say so and go on.

    :raises HookdError: ``VM_RUNNING``.
    """
    from .virt import Libvirt, VirtError
    try:
        with Libvirt(os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system") as conn:
            state = conn.state(vm)
    except VirtError as exc:
        print(f"note: could not ask libvirt whether {vm} runs ({exc.message}); releasing",
              file=sys.stderr)
        return
    if state in ("running", "paused", "blocked", "in shutdown", "pmsuspended"):
        raise HookdError(errors.VM_RUNNING,
                         f"libvirt says {vm} is {state}: stop it first (virsh shutdown {vm}); "
                         f"its release then runs by itself. Use --force only if the VM does "
                         f"not use the GPU")


def cmd_release(args, env: Env) -> int:
    paths = env.paths
    check_vm_name(args.vm)
    if not args.force:
        _refuse_if_running(args.vm)
    result = _daemon_request(paths, {"op": "release", "vm": args.vm, "reason": "cli"})
    if result is None:
        rec = _local_machine(env).release(args.vm, "cli")
        result = {"vm": args.vm, "phase": rec.phase if rec else "idle"}
    print(f"{result['vm']}: {result['phase']}")
    return 0


def cmd_daemon(args, env: Env) -> int:
    from .daemon import run
    return run(env.paths, env._host, env.systemd_factory)


UNITS = ("vfio-hookd.service", "vfio-hookd.socket")


def cmd_install(args, env: Env) -> int:
    """Install the hook and the unit under ``--root`` (default ``/``) and reload libvirtd."""
    import shutil
    import signal
    import subprocess
    paths = env.paths
    root = os.path.abspath(args.root)
    here = os.path.dirname(os.path.abspath(__file__))
    hook_dir = os.path.join(root, args.hooks_dir.lstrip("/"), "qemu.d")
    unit_dir = os.path.join(root, args.unit_dir.lstrip("/"))
    try:
        os.makedirs(hook_dir, exist_ok=True)
        with open(os.path.join(here, "qemu_hook.py")) as f:
            hook = f.read()
        dest = os.path.join(hook_dir, "vfio-hookd")
        tmp = dest + ".tmp"
        with open(tmp, "w") as f:
            f.write(hook)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        print(f"hook: {dest}")
        os.makedirs(unit_dir, exist_ok=True)
        exe = shutil.which("vfio-hookd") or os.path.join(os.path.dirname(sys.executable),
                                                         "vfio-hookd")
        for name in UNITS:
            with open(os.path.join(here, "data", name)) as f:
                unit = f.read().replace("@VFIO_HOOKD@", exe)
            with open(os.path.join(unit_dir, name), "w") as f:
                f.write(unit)
            print(f"unit: {os.path.join(unit_dir, name)}")
        os.makedirs(os.path.join(root, paths.profiles_dir.lstrip("/")), exist_ok=True)
    except OSError as exc:
        raise HookdError(errors.INSTALL_FAILED, f"{exc.filename}: {exc.strerror}") from None
    if root != "/" or args.no_reload:
        print("not reloading systemd or libvirtd (--root or --no-reload)")
        return 0
    if os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        for unit in ("libvirtd.service", "virtqemud.service"):
            if subprocess.run(["systemctl", "-q", "is-active", unit]).returncode == 0:
                subprocess.run(["systemctl", "reload", unit], check=False)
                print(f"{unit} reloaded: it now runs the hook")
        print("start the daemon with: systemctl enable --now vfio-hookd.socket vfio-hookd.service")
    else:
        try:
            with open("/run/libvirtd.pid") as f:
                os.kill(int(f.read().strip()), signal.SIGHUP)
            print("libvirtd sent SIGHUP: it now runs the hook")
        except (OSError, ValueError):
            print("libvirtd not running: it will find the hook when it starts")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argparse parser, every verb with its options (the man page and the shell
    completions are generated from it; keep the name)."""
    p = argparse.ArgumentParser(prog="vfio-hookd", description="Safe single-GPU passthrough "
                                "for libvirt: hook dispatcher and per-VM state machine.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="show each VM's phase, steps and devices")
    s.add_argument("vm", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("prepare", help="take the host into passthrough state for VM")
    s.add_argument("vm")
    s.add_argument("--xml", help="domain XML file (for devices: auto)")
    s.set_defaults(func=cmd_prepare)
    s = sub.add_parser("release", help="give the host back after VM")
    s.add_argument("vm")
    s.add_argument("--force", action="store_true",
                   help="release even if libvirt says the VM is running")
    s.set_defaults(func=cmd_release)
    s = sub.add_parser("init", help="write a first profile for VM from its domain and the host")
    s.add_argument("vm")
    s.add_argument("--xml", help="domain XML file (default: ask libvirt, read-only)")
    s.add_argument("--force", action="store_true",
                   help="replace an existing profile (the old one is kept as a .bak)")
    s.set_defaults(func=cmd_init)
    s = sub.add_parser("check", help="check the host (and VM) before a first start; changes "
                       "nothing")
    s.add_argument("vm", nargs="?")
    s.add_argument("--xml", help="domain XML file (default: ask libvirt, read-only)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("plan", help="show what a prepare of VM would do now; changes nothing")
    s.add_argument("vm")
    s.add_argument("--xml", help="domain XML file (for devices: auto)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_plan)
    s = sub.add_parser("rom", help="the expansion ROM of a PCI function (for <rom file=...>)")
    s = s.add_subparsers(dest="rom_command", required=True).add_parser(
        "dump", help="read ADDR's ROM through sysfs, validate it, write its images to FILE "
        "(run while the function is on vfio-pci or unbound)")
    s.add_argument("address", metavar="ADDR", help="PCI address, e.g. 0000:01:00.0")
    s.add_argument("file", metavar="FILE", help="output file (its directory must exist)")
    s.add_argument("--force", action="store_true", help="replace FILE if it exists")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_rom)
    s = sub.add_parser("daemon", help="run the daemon (normally from systemd)")
    s.set_defaults(func=cmd_daemon)
    s = sub.add_parser("install", help="install the libvirt hook and the systemd unit")
    s.add_argument("--root", default="/", help="install below this directory (packaging)")
    s.add_argument("--hooks-dir", default="/etc/libvirt/hooks")
    s.add_argument("--unit-dir", default="/etc/systemd/system")
    s.add_argument("--no-reload", action="store_true", help="do not reload systemd/libvirtd")
    s.set_defaults(func=cmd_install)
    return p


def main(argv: list[str] | None = None, host=None, systemd_factory=None) -> int:
    """Console entry point; returns the exit status.

    :param argv: the arguments (default ``sys.argv[1:]``).
    :param host: the :class:`~vfio_hookd.host.Host` to act on (default: the real one, ``/``).
    :param systemd_factory: as for :class:`vfio_hookd.machine.Machine` (default: the system bus).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, Env(Paths.from_env(), host, systemd_factory))
    except HookdError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
