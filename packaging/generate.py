"""Generate, at package build time, the files a distribution package installs beside the
Python package: ``python3 packaging/generate.py OUTDIR`` (run by ``debian/rules`` and the
``PKGBUILD`` from the source tree; ``vfio_hookd`` is imported from the tree beside this file).

OUTDIR receives:

- ``vfio-hookd.8``: the man page, made by argparse-manpage (``build_manpages.manpage.Manpage``)
  from :func:`vfio_hookd.cli.build_parser`, with an EXIT STATUS section made from
  :data:`vfio_hookd.errors.EXIT_STATUS`, and FILES and SEE ALSO;
- ``completions/bash/vfio-hookd`` and ``completions/zsh/_vfio-hookd``: made by shtab
  (``shtab.complete``) from the same parser;
- ``systemd/vfio-hookd.service`` and ``systemd/vfio-hookd.socket``: ``vfio_hookd/data``'s
  units with ``@VFIO_HOOKD@`` replaced by ``/usr/bin/vfio-hookd`` (where both packages put the
  console script; ``vfio-hookd install`` fills in its own path instead).

Nothing here is written by hand: a new verb or option shows in the man page and in the
completions of the next build. Debian 12 ships argparse-manpage 1.2.2 (python3-argparse-manpage),
whose man page header always says section 1; the header is rewritten to section 8 here, the
section of system administration commands (man-pages(7)), since the command is for root.

:raises SystemExit: with a message when OUTDIR is missing from the command line.
"""

from __future__ import annotations

import os
import re
import sys

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, SRC)

from build_manpages.manpage import Manpage  # noqa: E402  (argparse-manpage)
import shtab  # noqa: E402

from vfio_hookd import errors  # noqa: E402
from vfio_hookd.cli import build_parser  # noqa: E402

EXE = "/usr/bin/vfio-hookd"
SHORT = "safe single-GPU passthrough for libvirt: hook dispatcher and per-VM state machine"


def _roff(text: str) -> str:
    """``text`` with roff's special characters escaped (``-`` as ``\\-``, a leading ``.``)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _version() -> str:
    """The version in pyproject.toml (``[project] version``)."""
    with open(os.path.join(SRC, "pyproject.toml")) as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    return m.group(1) if m else "unknown"


def manpage() -> str:
    """The roff text of vfio-hookd(8)."""
    parser = build_parser()
    parser.man_short_description = SHORT
    text = str(Manpage(parser))
    lines = text.splitlines()
    # argparse-manpage 1.2.2 writes '.TH vfio-hookd "1" Manual'; newer ones other forms
    header = f'.TH VFIO-HOOKD 8 "" "vfio-hookd {_version()}" "System Administration"'
    lines = [header] + [ln for ln in lines if not ln.startswith(".TH ")]
    out = ["\n".join(lines).rstrip("\n")]
    out.append(".SH FILES")
    for path, what in (
            ("/etc/vfio-hookd/vms/NAME.yaml", "the profile of the libvirt domain NAME: "
             "the VM is managed exactly when it exists; owned by root, writable by root alone"),
            ("/etc/libvirt/hooks/qemu.d/vfio-hookd", "the libvirt qemu hook (a link to "
             "/usr/libexec/vfio-hookd/qemu-hook)"),
            ("/run/vfio-hookd/vms/NAME.json", "the record of what prepare did, which release "
             "undoes"),
            ("/run/vfio-hookd/vfio-hookd.sock", "the daemon's control socket "
             "(vfio-hookd.socket)")):
        out += [".TP", f"\\fI{_roff(path)}\\fR", _roff(what)]
    out.append(".SH EXIT STATUS")
    out.append("0 on success. Otherwise one line \\fICODE\\fR: \\fImessage\\fR on standard "
               "error and the code's exit status:")
    out.append(".PD 0")
    for code, status in sorted(errors.EXIT_STATUS.items(), key=lambda kv: kv[1]):
        out += [".TP", str(status), f"\\fB{_roff(code)}\\fR"]
    out.append(".PD")
    out.append(".SH SEE ALSO")
    out.append("\\fBvirsh\\fR(1), \\fBlibvirtd\\fR(8), \\fBsystemctl\\fR(1), "
               "\\fBjournalctl\\fR(1)")
    return "\n".join(out) + "\n"


def completion(shell: str) -> str:
    """The ``shell`` (``bash`` or ``zsh``) completion script, from shtab."""
    return shtab.complete(build_parser(), shell=shell)


def units() -> dict[str, str]:
    """Unit file name -> text, with the console script's packaged path."""
    data = os.path.join(SRC, "vfio_hookd", "data")
    out = {}
    for name in ("vfio-hookd.service", "vfio-hookd.socket"):
        with open(os.path.join(data, name)) as f:
            out[name] = f.read().replace("@VFIO_HOOKD@", EXE)
        assert "@" not in out[name], name
    return out


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: packaging/generate.py OUTDIR")
    out = argv[1]
    _write(os.path.join(out, "vfio-hookd.8"), manpage())
    _write(os.path.join(out, "completions", "bash", "vfio-hookd"), completion("bash"))
    _write(os.path.join(out, "completions", "zsh", "_vfio-hookd"), completion("zsh"))
    for name, text in units().items():
        _write(os.path.join(out, "systemd", name), text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
