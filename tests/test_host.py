"""The real-host access layer (on a temporary root; modprobe/rmmod replaced on PATH)."""

from __future__ import annotations

import os

import pytest

from vfio_hookd import errors
from vfio_hookd.errors import HookdError
from vfio_hookd.host import Host

pytestmark = pytest.mark.unit

KMOD_FAILURE = """#!/bin/sh
echo "modprobe: ERROR: Error running install command '/bin/false' for module vfio_pci: retcode 1" >&2
echo "modprobe: ERROR: could not insert 'vfio_pci': Invalid argument" >&2
exit 1
"""


def _fake_tool(tmp_path, monkeypatch, name, text):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text(text)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


def test_modprobe_error_keeps_the_cause_and_the_consequence(tmp_path, monkeypatch):
    _fake_tool(tmp_path, monkeypatch, "modprobe", KMOD_FAILURE)
    with pytest.raises(HookdError) as exc:
        Host(str(tmp_path)).modprobe("vfio-pci", 5)
    assert exc.value.code == errors.MODULE_FAILED
    assert "install command '/bin/false'" in exc.value.message
    assert "Invalid argument" in exc.value.message


def test_hung_rmmod_is_a_timeout(tmp_path, monkeypatch):
    _fake_tool(tmp_path, monkeypatch, "rmmod", "#!/bin/sh\nexec sleep 30\n")
    with pytest.raises(HookdError) as exc:
        Host(str(tmp_path)).rmmod("nvidia", 0.3)
    assert exc.value.code == errors.TIMEOUT and "unloading module nvidia" in exc.value.message


def test_paths_stay_under_the_root(tmp_path):
    host = Host(str(tmp_path))
    (tmp_path / "sys").mkdir()
    os.symlink("../../outside", tmp_path / "sys/escape")
    assert host.path("/sys/bus") == f"{tmp_path}/sys/bus"
    with pytest.raises(ValueError):
        host.path("relative")
    with pytest.raises(HookdError):
        host.resolve("/sys/escape")
