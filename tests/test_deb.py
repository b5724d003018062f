"""The Debian package and the Arch PKGBUILD: built from this checkout, clean by lintian, the
product alone, its files run, and both packages install the same files to the same places.

The .deb comes from ``scripts/build-deb`` (``dpkg-buildpackage -us -uc -b`` in a copy of the
sources, then lintian): a build of the same files is reused from ``.cache/deb/`` (``./scripts/test``
makes it before pytest runs), otherwise it is made here (about 10 s on 2 cores). It is installed
into a throwaway root with ``dpkg -x`` (no maintainer script runs and nothing of this machine's
``/etc``, ``/lib/systemd`` or dpkg database changes), and the installed command and hook run
from there with ``/usr/bin/python3``, the interpreter their ``#!`` lines name. The PKGBUILD's
``build()`` and ``package()`` run in bash with ``python`` meaning ``/usr/bin/python3`` (as on
Arch), so its file list is the one makepkg would pack.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit

PRODUCT_DEPENDS = {"python3-yaml", "python3-psutil", "python3-pydbus", "python3-gi",
                   "python3-systemd", "python3-libvirt", "python3-defusedxml", "kmod"}
HOOK = "etc/libvirt/hooks/qemu.d/vfio-hookd"
HOOK_TARGET = "/usr/libexec/vfio-hookd/qemu-hook"
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def _run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", SYSTEM_ENV)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def build() -> dict:
    """scripts/build-deb's results: ``dir``, ``deb`` (path), ``lintian`` (text), ``status``."""
    out = _run([os.path.join(REPO, "scripts", "build-deb")], cwd=REPO).stdout.strip().splitlines()[-1]
    debs = [f for f in os.listdir(out) if f.endswith(".deb")]
    assert len(debs) == 1, debs
    with open(os.path.join(out, "lintian.txt")) as f:
        lintian = f.read()
    with open(os.path.join(out, "lintian.status")) as f:
        status = int(f.read())
    return {"dir": out, "deb": os.path.join(out, debs[0]), "lintian": lintian, "status": status}


@pytest.fixture(scope="module")
def root(build, tmp_path_factory) -> str:
    """The .deb unpacked (``dpkg -x``) into a throwaway directory."""
    d = str(tmp_path_factory.mktemp("debroot"))
    _run(["dpkg", "-x", build["deb"], d])
    return d


def _deb_paths(deb: str) -> dict[str, str]:
    """Path (no leading ``./``) -> ``dpkg-deb -c``'s type letter and link target if any."""
    out = {}
    for line in _run(["dpkg-deb", "-c", deb]).stdout.splitlines():
        mode, _owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        path = path.removeprefix("./").rstrip("/")
        if path:
            out[path] = mode[0] + (f" {target}" if target else "")
    return out


def test_lintian_reports_no_error_and_no_warning(build):
    assert build["status"] == 0, build["lintian"]
    tags = [ln for ln in build["lintian"].splitlines() if re.match(r"^[EWIPXO]: ", ln)]
    assert [t for t in tags if t[0] in "EW"] == [], build["lintian"]


def test_the_deb_holds_the_product_only(build):
    paths = _deb_paths(build["deb"])
    for bad in ("testbed", "tests/", "bench", "conftest", "/sim/", "fake_systemd", "demo"):
        assert not [p for p in paths if bad in p], (bad, sorted(paths))
    site = "usr/lib/python3/dist-packages/"
    code = {p for p in paths if p.startswith(site) and p.endswith(".py")}
    assert code and all(p.startswith(site + "vfio_hookd/") for p in code), code
    # every module of the checkout is in it
    mine = {os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in
            os.walk(os.path.join(REPO, "vfio_hookd")) for f in fs if f.endswith(".py")}
    assert {p.removeprefix(site) for p in code} == mine
    for need in ("usr/bin/vfio-hookd", "lib/systemd/system/vfio-hookd.service",
                 "lib/systemd/system/vfio-hookd.socket", "usr/libexec/vfio-hookd/qemu-hook",
                 "usr/share/man/man8/vfio-hookd.8.gz",
                 "usr/share/bash-completion/completions/vfio-hookd",
                 "usr/share/zsh/vendor-completions/_vfio-hookd", "etc/vfio-hookd/vms"):
        assert need in paths, need
    assert paths[HOOK] == f"l {HOOK_TARGET}"
    assert paths["etc/vfio-hookd/vms"] == "d"
    # nothing of the user's: no file at all below /etc/vfio-hookd, and no conffile
    assert [p for p in paths if p.startswith("etc/vfio-hookd/") and paths[p] != "d"] == []
    ctrl = _run(["dpkg-deb", "-I", build["deb"]]).stdout
    assert "conffiles" not in ctrl
    depends = _run(["dpkg-deb", "-f", build["deb"], "Depends"]).stdout
    names = {d.strip().split()[0] for d in depends.split(",")}
    assert PRODUCT_DEPENDS <= names, depends


def test_the_maintainer_scripts_enable_the_units_and_keep_the_user_files(build, tmp_path):
    _run(["dpkg-deb", "-e", build["deb"], str(tmp_path / "ctrl")])
    postinst = (tmp_path / "ctrl" / "postinst").read_text()
    prerm = (tmp_path / "ctrl" / "prerm").read_text()
    postrm = (tmp_path / "ctrl" / "postrm").read_text()
    for unit in ("vfio-hookd.socket", "vfio-hookd.service"):
        assert f"deb-systemd-helper enable '{unit}'" in postinst
    assert "deb-systemd-invoke reload" in postinst and "invoke-rc.d libvirtd force-reload" in postinst
    # the hook is taken out before the debhelper snippet stops the daemon
    assert prerm.index('rm -f "$HOOK"') < prerm.index("deb-systemd-invoke stop")
    # purge removes directories only when empty: never a profile
    assert "rmdir --ignore-fail-on-non-empty" in postrm and "rm -r" not in postrm
    for script in ("postinst", "prerm", "postrm"):
        _run(["sh", "-n", str(tmp_path / "ctrl" / script)])


def test_the_installed_files_run(root, tmp_path):
    site = os.path.join(root, "usr/lib/python3/dist-packages")
    config, run = os.path.join(root, "etc/vfio-hookd"), tmp_path / "run"
    run.mkdir(mode=0o755)
    env = dict(SYSTEM_ENV, PYTHONPATH=site, VFIO_HOOKD_CONFIG=config, VFIO_HOOKD_RUN=str(run),
               DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus", VFIO_HOOKD_LOG="stderr")
    exe = os.path.join(root, "usr/bin/vfio-hookd")
    with open(exe) as f:
        assert f.readline().strip() == "#!/usr/bin/python3"
    where = _run(["/usr/bin/python3", "-c", "import vfio_hookd; print(vfio_hookd.__file__)"],
                 env=env, cwd=str(tmp_path)).stdout.strip()
    assert where.startswith(site), where
    r = _run([exe, "--help"], env=env, cwd=str(tmp_path))
    assert "usage: vfio-hookd" in r.stdout and "status" in r.stdout
    r = _run([exe, "status"], env=env, cwd=str(tmp_path))
    assert r.stdout.startswith(f"no VM records in {run}"), r.stdout
    # the hook, through the link libvirt follows (resolved inside the throwaway root)
    link = os.readlink(os.path.join(root, HOOK))
    hook = os.path.join(root, link.lstrip("/"))
    assert os.access(hook, os.X_OK)
    with open(hook) as f:
        assert f.readline().strip() == "#!/usr/bin/python3 -IS"
    r = subprocess.run([hook, "win11", "prepare", "begin", "-"], input="<domain/>", env=env,
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")       # no profile: not managed
    profile = tmp_path / "etc" / "vms" / "win11.yaml"
    profile.parent.mkdir(parents=True)
    profile.write_text("devices: auto\n")
    r = subprocess.run([hook, "win11", "prepare", "begin", "-"], input="<domain/>",
                       env=dict(env, VFIO_HOOKD_CONFIG=str(tmp_path / "etc")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("DAEMON_UNREACHABLE: "), r.stderr


def _verbs() -> set[str]:
    """The CLI's verbs, from its argparse parser."""
    import argparse
    from vfio_hookd.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_the_man_page_and_completions_cover_every_verb(root):
    verbs = _verbs()
    with gzip.open(os.path.join(root, "usr/share/man/man8/vfio-hookd.8.gz"), "rt") as f:
        man = f.read()
    assert man.startswith(".TH VFIO-HOOKD 8 ")
    assert "EXIT STATUS" in man and "UNTRUSTED_FILE" in man.replace("\\-", "-")
    bash = open(os.path.join(root, "usr/share/bash-completion/completions/vfio-hookd")).read()
    zsh = open(os.path.join(root, "usr/share/zsh/vendor-completions/_vfio-hookd")).read()
    assert zsh.startswith("#compdef vfio-hookd")
    for verb in verbs:
        assert f"vfio-hookd {verb}" in man.replace("\\-", "-") or f"'{verb}'" in man, verb
        assert f"'{verb}'" in bash and verb in zsh, verb
    r = _run(["bash", "-n", os.path.join(root, "usr/share/bash-completion/completions/vfio-hookd")])
    assert r.returncode == 0


def _normalized(paths: set[str]) -> set[str]:
    """Paths with what differs by distribution alone mapped to one name: Python's site
    directory, zsh's completion directory, /lib vs /usr/lib (one directory on a merged /usr),
    compressed man pages and docs; without byte code and Debian's changelog and copyright."""
    out = set()
    for p in paths:
        if "__pycache__" in p or p in ("usr/share/doc/vfio-hookd/changelog.gz",
                                       "usr/share/doc/vfio-hookd/copyright"):
            continue
        p = re.sub(r"^usr/lib/python3(\.\d+)?/(site|dist)-packages", "SITE", p)
        p = re.sub(r"^usr/share/zsh/(site-functions|vendor-completions)", "ZSHCOMP", p)
        p = re.sub(r"^lib/", "usr/lib/", p)
        p = re.sub(r"^lib$", "usr/lib", p)
        p = re.sub(r"^usr/share/(man/.*|doc/.*)\.gz$", r"usr/share/\1", p)
        out.add(p)
    return out


def test_the_pkgbuild_installs_the_same_files_as_the_deb(build, tmp_path):
    src, pkg, srcdir, bindir = (tmp_path / n for n in ("start", "pkg", "src", "bin"))
    for d in (pkg, srcdir, bindir):
        d.mkdir()
    os.symlink("/usr/bin/python3", bindir / "python")
    shutil.copytree(REPO, src, symlinks=True, ignore=lambda _d, names: [
        n for n in names if n in (".venv", ".cache", ".git", "build", "__pycache__", "generated")
        or n.endswith(".egg-info")])
    # Debian's python3 installs into /usr/local unless told it packages (DEB_PYTHON_INSTALL_LAYOUT)
    env = dict(SYSTEM_ENV, PATH=f"{bindir}:{SYSTEM_ENV['PATH']}", HOME=str(tmp_path),
               DEB_PYTHON_INSTALL_LAYOUT="deb")
    script = (f'set -e; startdir={src}; srcdir={srcdir}; pkgdir={pkg}; source "$startdir/PKGBUILD"; '
              f'(build); (package)')
    _run(["bash", "-c", script], env=env, cwd=str(src))
    arch = set()
    for d, dirs, files in os.walk(pkg):
        for n in dirs + files:
            arch.add(os.path.relpath(os.path.join(d, n), pkg))
    deb = set(_deb_paths(build["deb"]))
    assert _normalized(arch) == _normalized(deb)
    assert os.readlink(pkg / HOOK) == HOOK_TARGET
    unit = (pkg / "usr/lib/systemd/system/vfio-hookd.service").read_text()
    assert "ExecStart=/usr/bin/vfio-hookd daemon" in unit


def test_the_versions_agree():
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    pkgbuild = open(os.path.join(REPO, "PKGBUILD")).read()
    assert re.search(r"^pkgver=(\S+)", pkgbuild, re.M).group(1) == version
    changelog = open(os.path.join(REPO, "debian", "changelog")).readline()
    assert re.match(r"vfio-hookd \(([^)-]+)", changelog).group(1) == version


# The maintainer scripts in this machine's Debian 12 root (which scripts/setup gave the
# package's dependencies), seen through an overlay in a private mount namespace so that every
# write lands in the test's own directory: install, a removal refused while a VM holds its
# GPU, remove, purge with and without a profile, reinstall, upgrade. No service can start
# there (a policy-rc.d in the overlay, and no systemd runs in the chroot); the same package
# under a real systemd: the desktop guest's ``package`` variant (tests/kernel). After each step the
# scenario prints "STEP name rc" and "present PATH" for the paths of WATCH that exist.
WATCH = (f"/{HOOK}", "/etc/vfio-hookd", "/etc/vfio-hookd/vms", "/etc/vfio-hookd/vms/win11.yaml",
         "/usr/bin/vfio-hookd", "/etc/systemd/system/sockets.target.wants/vfio-hookd.socket",
         "/etc/systemd/system/multi-user.target.wants/vfio-hookd.service")
SCENARIO = r"""
set -u
lower=$1 top=$2 deb=$3; shift 3
mkdir -p "$top/up" "$top/work" "$top/root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$top/up,workdir=$top/work" "$top/root"
R=$top/root
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d" && chmod 755 "$R/usr/sbin/policy-rc.d"
: >"$R/dev/null" 2>/dev/null || touch "$R/dev/null"
mount --bind /dev/null "$R/dev/null"
cp "$deb" "$R/tmp/vfio-hookd.deb"
state() {
    echo "STEP $1 $2 $(date +%s.%N)"
    for p in WATCH; do if [ -e "$R$p" ] || [ -L "$R$p" ]; then echo "present $p"; fi; done
}
in_root() { chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }
in_root dpkg -i /tmp/vfio-hookd.deb >"$top/install.log" 2>&1; state install $?
in_root vfio-hookd --help | head -1
mkdir -p "$R/tmp/run"
in_root env VFIO_HOOKD_RUN=/tmp/run DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent vfio-hookd status
echo "status-rc $?"
if in_root vfio-hookd --help | grep -q '[{,]check[,}]'; then
    # the preflight from the installed files; the root has no /sys, /proc or IOMMU: FAILs
    in_root env DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent vfio-hookd check 2>&1
    echo "check-rc $?"
fi
printf 'devices: auto\n' >"$R/etc/vfio-hookd/vms/win11.yaml"
mkdir -p "$R/run/vfio-hookd/vms"
printf '{"version": 2, "vm": "win11", "phase": "prepared"}\n' >"$R/run/vfio-hookd/vms/win11.json"
in_root dpkg -r vfio-hookd >"$top/refused.log" 2>&1; state remove-while-prepared $?
printf '{"version": 2, "vm": "win11", "phase": "idle"}\n' >"$R/run/vfio-hookd/vms/win11.json"
in_root dpkg -r vfio-hookd >"$top/remove.log" 2>&1; state remove $?
in_root dpkg -P vfio-hookd >"$top/purge.log" 2>&1; state purge-with-profile $?
in_root dpkg -i /tmp/vfio-hookd.deb >/dev/null 2>&1; state reinstall $?
in_root dpkg -i /tmp/vfio-hookd.deb >/dev/null 2>&1; state upgrade $?
cat "$R/etc/vfio-hookd/vms/win11.yaml"
rm "$R/etc/vfio-hookd/vms/win11.yaml"
in_root dpkg -P vfio-hookd >/dev/null 2>&1; state purge-empty $?
cat "$top/refused.log"
"""


@pytest.fixture(scope="module")
def chroot_root() -> str:
    """This machine's root, the overlay's read-only lower layer: it has the package's
    dependencies (scripts/setup), and dpkg does not know vfio-hookd there (refused if it does:
    the machine would not be a clean place to try the maintainer scripts)."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "vfio-hookd"],
                       capture_output=True, text=True, env=SYSTEM_ENV)
    assert r.stdout.strip() in ("", "not-installed", "config-files") or r.returncode, \
        f"vfio-hookd is installed on this machine ({r.stdout}): remove it to run this test"
    return "/"


def test_the_maintainer_scripts_in_a_debian_12_root(build, chroot_root, tmp_path):
    script = SCENARIO.replace("for p in WATCH;", "for p in " + " ".join(WATCH) + ";")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script,
                        "scenario", chroot_root, str(tmp_path), build["deb"]],
                       capture_output=True, text=True, timeout=300, env=SYSTEM_ENV)
    steps: dict[str, tuple[int, set]] = {}
    current = None
    for line in r.stdout.splitlines():
        if line.startswith("STEP "):
            _, name, rc, _when = line.split()
            current = name
            steps[name] = (int(rc), set())
        elif line.startswith("present ") and current:
            steps[current][1].add(line.split(None, 1)[1])
    log = f"{r.stdout}\n{r.stderr}"
    everything = set(WATCH) - {"/etc/vfio-hookd/vms/win11.yaml"}
    assert steps["install"] == (0, everything), log
    assert "usage: vfio-hookd" in r.stdout and "status-rc 0" in r.stdout, log
    if "check" in _verbs():
        # `vfio-hookd check` runs from the installed files and sees the package's hook
        rc = int(re.search(r"^check-rc (\d+)$", r.stdout, re.M).group(1))
        from vfio_hookd.errors import EXIT_STATUS
        assert rc in (0, EXIT_STATUS.get("CHECK_FAILED")), log
        assert re.search(r"^PASS +hook\.installed: /etc/libvirt/hooks/qemu\.d/vfio-hookd", r.stdout,
                         re.M), log
    # a VM holds its GPU: refused, nothing removed
    rc, present = steps["remove-while-prepared"]
    assert rc != 0 and present == set(WATCH), log
    assert "not removed: VM(s) win11" in r.stdout, log
    # removal: the hook and the program go, the profile stays
    rc, present = steps["remove"]
    assert rc == 0 and f"/{HOOK}" not in present and "/usr/bin/vfio-hookd" not in present, log
    assert {"/etc/vfio-hookd/vms/win11.yaml", "/etc/vfio-hookd/vms"} <= present, log
    # purge keeps /etc/vfio-hookd while it holds the user's profile
    rc, present = steps["purge-with-profile"]
    assert rc == 0 and "/etc/vfio-hookd/vms/win11.yaml" in present, log
    assert not [p for p in present if "systemd" in p], log
    assert steps["reinstall"] == (0, set(WATCH)), log
    assert steps["upgrade"] == (0, set(WATCH)), log
    assert "devices: auto" in r.stdout, log      # the profile, untouched through all of it
    assert steps["purge-empty"] == (0, set()), log
