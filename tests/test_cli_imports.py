"""Each CLI verb imports only what it uses: yaml only to read a profile, pydbus/GLib only to
talk to systemd, psutil only to look for holders, libvirt only to ask libvirt (and never the
xml.sax/urllib/http/email chain). Measured on a real 6.1 kernel in a TCG guest, these imports
were most of a CLI call's time (yaml 127 ms, psutil 194, pydbus+gi 359)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, write_profile

HEAVY = ("yaml", "gi", "pydbus", "psutil", "libvirt", "xml.sax.saxutils", "urllib.parse",
         "http.client", "email")

pytestmark = pytest.mark.unit

# The host is an empty directory: nothing of this machine is read or written.
# Modules the interpreter had before the CLI ran (site's .pth files) do not count.
PROBE = """
import json, sys
before = set(sys.modules)
from vfio_hookd import cli
from vfio_hookd.host import Host
rc = cli.main(sys.argv[2:], host=Host(sys.argv[1]))
print(json.dumps({"rc": rc, "loaded": [m for m in %r if m in set(sys.modules) - before]}))
""" % (HEAVY,)


def imported(dirs, *argv, env=None) -> tuple[int, set[str]]:
    """Run ``vfio-hookd ARGV`` in a fresh interpreter; (exit status, heavy modules loaded)."""
    e = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    root = dirs["host"]
    p = subprocess.run([sys.executable, "-c", PROBE, str(root), *argv], capture_output=True, text=True,
                       env=e, cwd=REPO, timeout=60)
    last = p.stdout.strip().splitlines()[-1]
    data = json.loads(last)
    return data["rc"], set(data["loaded"])


def test_status_imports_nothing_heavy(dirs):
    rc, loaded = imported(dirs, "status")
    assert rc == 0 and loaded == set()


def test_release_without_a_record_imports_nothing_heavy(dirs):
    write_profile(dirs, "win11", "devices: ['0000:01:00.0']\n")
    rc, loaded = imported(dirs, "release", "win11", "--force")
    assert rc == 0 and loaded == set()


def test_release_asks_libvirt_without_the_xml_chain(dirs):
    # libvirt's built-in test driver: no daemon needed, and it has no VM of that name
    write_profile(dirs, "win11", "devices: ['0000:01:00.0']\n")
    rc, loaded = imported(dirs, "release", "win11",
                          env={"LIBVIRT_DEFAULT_URI": "test:///default"})
    assert rc == 0
    assert loaded == {"libvirt"}


def test_prepare_reads_the_profile_and_stops_before_systemd(dirs, tmp_path):
    write_profile(dirs, "win11", "devices: ['0000:7f:1f.7']\n")   # not on the empty host
    xml = tmp_path / "d.xml"
    xml.write_text("<domain/>")
    rc, loaded = imported(dirs, "prepare", "win11", "--xml", str(xml))
    assert rc == 6   # DEVICE_NOT_FOUND: planning failed, nothing else was needed
    assert loaded == {"yaml"}


def test_check_of_the_host_reads_no_profile_domain_or_processes(dirs):
    # an empty host: the IOMMU checks fail; systemd is asked (no bus here: a WARN)
    rc, loaded = imported(dirs, "check")
    assert rc == 31   # CHECK_FAILED
    assert loaded <= {"gi", "pydbus"}


def test_init_of_an_existing_profile_stops_before_libvirt_and_systemd(dirs):
    write_profile(dirs, "win11", "")
    rc, loaded = imported(dirs, "init", "win11")
    assert rc == 30 and loaded == set()   # PROFILE_EXISTS, nothing else read
