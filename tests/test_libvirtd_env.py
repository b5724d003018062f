"""The private libvirtd (testbed.libvirtd) and the libvirt client (vfio_hookd.virt).

The ``libvirt`` tests run Debian's real libvirtd + QEMU (TCG) in a private mount namespace, with
a small test hook in ``/etc/libvirt/hooks/qemu.d/``. They need root and the packages that
``scripts/setup`` installs; a missing binary makes them fail, never skip. One QEMU capabilities
cache is shared by the session, so only the first daemon start pays the QEMU probe (~1.4 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed import libvirtd as plv
from testbed.domains import tiny_domain_xml

HOOK = """#!/bin/bash
# Test hook: logs its arguments; fails while the flag file exists (libvirt docs/hooks.rst).
cat >/dev/null   # the domain XML on stdin
echo "$*" >> {log}
if [ -e {flag} ]; then
    echo "TEST_FAIL: nope" >&2
    exit 1
fi
exit 0
"""

DRIVER = """
import json, sys, time
from testbed.domains import tiny_domain_xml
from vfio_hookd.virt import Libvirt, VirtError

name = sys.argv[1]
out = {}
with Libvirt() as lv:
    lv.define(tiny_domain_xml(name))
    t0 = time.monotonic()
    try:
        lv.start(name)
        out["state_after_start"] = lv.state(name)
        lv.destroy(name)
        out["start_destroy_s"] = round(time.monotonic() - t0, 3)
    except VirtError as exc:
        out["error"] = exc.message
    out["final"] = list(lv.state_reason(name))
    lv.undefine(name)
print(json.dumps(out))
"""


def _tree_digest(root: str) -> str:
    """Hash of names, types, modes, sizes, mtimes and contents under ``root``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{p} {st.st_mode:o} {st.st_size} {st.st_mtime_ns}\n".encode())
            if os.path.isfile(p) and not os.path.islink(p):
                h.update(Path(p).read_bytes())
    return h.hexdigest()


def _alive_daemon(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"libvirtd" in cmd or b"virtlogd" in cmd


@pytest.fixture(scope="session")
def libvirt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("libvirt-cache")


@pytest.fixture
def plenv(tmp_path, libvirt_cache):
    """A fresh state dir, a test hook logging to ``hook.log`` and failing while ``fail`` exists."""
    state = tmp_path / "state"
    log, flag = tmp_path / "hook.log", tmp_path / "fail"
    hook = tmp_path / "50-test"
    hook.write_text(HOOK.format(log=log, flag=flag))
    hook.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def run(command, **kw):
        kw.setdefault("hooks", [hook])
        kw.setdefault("cache_dir", libvirt_cache)
        kw.setdefault("timeout_s", 90)
        return plv.run_in_private_libvirt(state, command, **kw)

    return SimpleNamespace(state=state, log=log, flag=flag, hook=hook, driver=driver,
                           cache=libvirt_cache, run=run)


def _timings(state: Path) -> dict:
    return json.loads((state / "timings.json").read_text())


def _read_line(stream, timeout_s: float) -> str:
    """The first line (str, with its newline) from pipe ``stream``, waiting at most
    ``timeout_s`` (s); what was read so far when the pipe closes or the deadline passes (then
    without a newline). Reads the pipe's fd directly: bytes after the line are dropped."""
    fd, buf = stream.fileno(), b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").split("\n", 1)[0] + ("\n" if b"\n" in buf else "")


def _hook_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.libvirt
def test_start_and_destroy_run_the_hooks_in_order(plenv):
    proc = plenv.run([sys.executable, str(plenv.driver), "tiny"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.get("state_after_start") == "running", out
    assert out["final"] == ["shut off", 2]  # VIR_DOMAIN_SHUTOFF_DESTROYED
    assert _hook_lines(plenv.log) == [
        "tiny prepare begin -", "tiny start begin -", "tiny started begin -",
        "tiny stopped end -", "tiny release end -",
    ]  # libvirt 9.0.0 passes no reason to release (measured; FIELD-NOTES §1 says REASON)
    t = _timings(plenv.state)
    print(f"\nlibvirtd ready {t['libvirtd_ready_s']} s, virtlogd {t['virtlogd_ready_s']} s, "
          f"start+destroy {out['start_destroy_s']} s, stop {t['stop_s']} s")


@pytest.mark.libvirt
def test_failing_prepare_aborts_start_and_still_releases(plenv):
    plenv.flag.touch()
    proc = plenv.run([sys.executable, str(plenv.driver), "tiny"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "TEST_FAIL: nope" in out.get("error", ""), out
    assert "Hook script execution failed" in out["error"]
    assert out["final"] == ["shut off", 6]  # VIR_DOMAIN_SHUTOFF_FAILED
    assert _hook_lines(plenv.log) == [
        "tiny prepare begin -", "tiny stopped end -", "tiny release end -",
    ]  # the reason is only in the domain state: ("shut off", VIR_DOMAIN_SHUTOFF_FAILED)


@pytest.mark.libvirt
def test_machine_untouched_and_daemons_stopped(plenv, tmp_path):
    before = _tree_digest("/etc/libvirt")
    top_before = (sorted(os.listdir("/etc")), sorted(os.listdir("/run")))
    src = tmp_path / "conf"
    src.mkdir()
    (src / "marker").write_text("private\n")
    dst = f"/etc/vfio-hookd-test-{uuid.uuid4().hex[:8]}"  # does not exist on the machine
    script = tmp_path / "inside.sh"
    script.write_text(textwrap.dedent(f"""\
        set -e
        cat {dst}/marker
        ls /etc/libvirt/hooks/qemu.d
        test -S /run/libvirt/libvirt-sock
        echo new > /etc/libvirt/written-inside
        virsh -c qemu:///system list --all --name
        exit 7
        """))
    proc = plenv.run(["/bin/bash", str(script)], binds=[(src, dst)])
    assert proc.returncode == 7, proc.stderr  # COMMAND's status passes through
    assert proc.stdout.splitlines()[:2] == ["private", "50-test"]
    # The writes went to the state dir, not to the machine.
    assert (plenv.state / "etc-libvirt" / "written-inside").exists()
    assert _tree_digest("/etc/libvirt") == before
    assert (sorted(os.listdir("/etc")), sorted(os.listdir("/run"))) == top_before
    assert not os.path.lexists(dst)
    pids = json.loads((plenv.state / "logs" / "daemons.json").read_text())
    assert set(pids) == {"libvirtd", "virtlogd"}
    assert not [p for p in pids.values() if _alive_daemon(p)]


@pytest.mark.libvirt
def test_sigterm_to_runner_destroys_domain_and_stops_daemons(plenv, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent("""\
        import sys
        from testbed.domains import tiny_domain_xml
        from vfio_hookd.virt import Libvirt
        lv = Libvirt()
        lv.define(tiny_domain_xml("held"))
        lv.start("held")
        print("started", flush=True)
        sys.stdin.read()   # until the runner's SIGTERM is forwarded to us
        """))
    argv = [sys.executable, "-m", "testbed.libvirtd", "--state", str(plenv.state),
            "--hook", str(plenv.hook), "--cache", str(plenv.cache), "--",
            sys.executable, str(script)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            line = _read_line(proc.stdout, 60)   # until the domain runs (or the run fails)
            if line != "started\n":
                proc.send_signal(signal.SIGTERM)   # the runner stops what it started
                _, err = proc.communicate(timeout=60)
                pytest.fail(f"no 'started' line within 60 s (got {line!r}); stderr:\n{err}")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "destroyed domains still running: held" in err
    assert _hook_lines(plenv.log)[-2:] == ["held stopped end -", "held release end -"]
    pids = json.loads((plenv.state / "logs" / "daemons.json").read_text())
    assert not [p for p in pids.values() if _alive_daemon(p)]
    qemu_pidfiles = list((plenv.state / "run-libvirt" / "qemu").glob("*.pid"))
    assert qemu_pidfiles == []  # libvirt removes it once QEMU is gone


@pytest.mark.unit
def test_runner_refuses_to_mount_outside_a_private_namespace(tmp_path, monkeypatch):
    """The safety net: the mounting part never runs in the caller's mount namespace."""
    args = plv._parser().parse_args(["--state", str(tmp_path / "s"), "--", "true"])
    for mark in (None, f"{os.getpid()}:{os.stat('/proc/self/ns/mnt').st_ino}", "1:2"):
        if mark is None:
            monkeypatch.delenv(plv.ENV_MARK, raising=False)
        else:
            monkeypatch.setenv(plv.ENV_MARK, mark)
        with pytest.raises(plv.PrivateLibvirtError, match="not in a private mount namespace"):
            plv._inside(args)
    assert not (tmp_path / "s").exists()


@pytest.mark.unit
def test_tiny_domain_xml():
    xml = tiny_domain_xml("a&b", ["0000:01:00.0", "0000:01:00.1"])
    assert "<name>a&amp;b</name>" in xml
    assert "<domain type='qemu'>" in xml and "machine='pc'" in xml
    assert "<memory unit='MiB'>64</memory>" in xml
    assert xml.count("<hostdev mode='subsystem' type='pci' managed='yes'>") == 2
    assert "slot='0x00' function='0x1'" in xml
    assert "<disk" not in xml and "<graphics" not in xml
    with pytest.raises(ValueError):
        tiny_domain_xml("x", ["01:00.0"])
