"""The packaged hook as libvirt sees it: a link in ``/etc/libvirt/hooks/qemu.d/`` to the hook
file (the Debian package's ``/etc/libvirt/hooks/qemu.d/vfio-hookd`` ->
``/usr/libexec/vfio-hookd/qemu-hook``). libvirt runs every *executable* entry of ``qemu.d`` and
checks that with ``stat``, which follows links (seen with libvirt 9.0.0; docs/hooks.rst only says
"executable"): a real libvirtd (``testbed.libvirtd``, private mount namespace) starting a domain
that has a profile runs the hook from the unpacked .deb through such a link, and with no daemon
listening the hook refuses the start with its one line. Needs root and the packages
``scripts/setup`` installs; anything missing fails, never skips.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO
from testbed.domains import tiny_domain_xml
from testbed.libvirtd import run_in_private_libvirt

pytestmark = pytest.mark.libvirt

SCRIPT = """set -u
ln -s "$HOOK" /etc/libvirt/hooks/qemu.d/vfio-hookd
virsh -c qemu:///system create "$XML"
echo "create-rc $?"
virsh -c qemu:///system destroy linktest >/dev/null 2>&1
exit 0
"""


def test_libvirt_runs_the_packaged_hook_through_its_link(tmp_path):
    out = subprocess.run([os.path.join(REPO, "scripts", "build-deb")], capture_output=True,
                         text=True, timeout=600, check=True).stdout.split()[-1]
    deb = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".deb")][0]
    root = tmp_path / "root"
    subprocess.run(["dpkg", "-x", deb, str(root)], check=True, timeout=60)
    hook = root / "usr/libexec/vfio-hookd/qemu-hook"
    assert os.readlink(root / "etc/libvirt/hooks/qemu.d/vfio-hookd") == "/usr/libexec/vfio-hookd/qemu-hook"
    config = tmp_path / "config"
    (config / "vms").mkdir(parents=True)
    (config / "vms" / "linktest.yaml").write_text("devices: auto\n")
    xml = tmp_path / "linktest.xml"
    xml.write_text(tiny_domain_xml("linktest"))
    # a hook of its own in qemu.d at libvirtd's start: libvirt then looks at qemu.d's entries
    # on every call, so the link made afterwards is found as a package install would be after
    # the postinst's reload (FIELD-NOTES §1)
    first = tmp_path / "00-noop"
    first.write_text("#!/bin/sh\nexit 0\n")
    first.chmod(0o755)
    r = run_in_private_libvirt(tmp_path / "state", ["bash", "-c", SCRIPT], hooks=[first],
                               binds=[(config, "/etc/vfio-hookd")],
                               env=dict(os.environ, HOOK=str(hook), XML=str(xml)),
                               timeout_s=180)
    log = f"{r.stdout}\n{r.stderr}"
    assert r.returncode == 0, log
    assert "create-rc 1" in r.stdout, log
    assert "Hook script execution failed" in log and "DAEMON_UNREACHABLE: " in log, log
